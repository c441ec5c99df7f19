// See remaskKernel.h. Two kernels: pickKernel (one CTA per position, sweeps the vocabulary once) and
// commitKernel (one CTA per row: rank of every position among the row's masked ones, ties to the
// lower index, then the threshold or top-k rule). Compiles with nvcc alone (no TensorRT headers).
#include "remaskKernel.h"

#include <cfloat>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace nemodiff
{
namespace
{

constexpr int kPickThreads = 256;

template <typename T>
__device__ __forceinline__ float toFloat(T x);
template <>
__device__ __forceinline__ float toFloat<float>(float x)
{
    return x;
}
template <>
__device__ __forceinline__ float toFloat<__half>(__half x)
{
    return __half2float(x);
}
template <>
__device__ __forceinline__ float toFloat<__nv_bfloat16>(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}

// the reference computes softmax in the logits' dtype: round the confidence the same way
template <typename T>
__device__ __forceinline__ float roundLike(float x);
template <>
__device__ __forceinline__ float roundLike<float>(float x)
{
    return x;
}
template <>
__device__ __forceinline__ float roundLike<__half>(float x)
{
    return __half2float(__float2half_rn(x));
}
template <>
__device__ __forceinline__ float roundLike<__nv_bfloat16>(float x)
{
    return __bfloat162float(__float2bfloat16_rn(x));
}

struct Pick
{
    float m;     // running max logit
    float s;     // sum of exp(logit - m)
    float best;  // best score (logit + temperature * noise)
    int32_t idx; // its vocabulary index (lowest on ties)
};

__device__ __forceinline__ Pick combine(Pick a, Pick b)
{
    Pick r;
    r.m = fmaxf(a.m, b.m);
    float sa = a.s == 0.f ? 0.f : a.s * expf(a.m - r.m);
    float sb = b.s == 0.f ? 0.f : b.s * expf(b.m - r.m);
    r.s = sa + sb;
    bool takeB = b.best > a.best || (b.best == a.best && b.idx < a.idx);
    r.best = takeB ? b.best : a.best;
    r.idx = takeB ? b.idx : a.idx;
    return r;
}

template <typename T>
__global__ void pickKernel(T const* __restrict__ logits, float const* __restrict__ noise, int64_t* __restrict__ token,
    float* __restrict__ conf, int32_t V, float temperature)
{
    int64_t const row = blockIdx.x; // b * L + l
    T const* x = logits + row * V;
    float const* g = noise ? noise + row * V : nullptr;
    Pick p{-FLT_MAX, 0.f, -FLT_MAX, INT32_MAX};
    for (int32_t v = threadIdx.x; v < V; v += blockDim.x)
    {
        float const xv = toFloat<T>(x[v]);
        float const score = g ? xv + temperature * g[v] : xv;
        Pick q{xv, 1.f, score, v};
        p = combine(p, q);
    }
    __shared__ Pick shared[kPickThreads];
    shared[threadIdx.x] = p;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1)
    {
        if (threadIdx.x < stride)
        {
            shared[threadIdx.x] = combine(shared[threadIdx.x], shared[threadIdx.x + stride]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
    {
        Pick const r = shared[0];
        token[row] = r.idx;
        conf[row] = roundLike<T>(expf(toFloat<T>(x[r.idx]) - r.m) / r.s);
    }
}

__global__ void commitKernel(int64_t const* __restrict__ canvas, int32_t const* __restrict__ active,
    int64_t const* __restrict__ quota, int64_t const* __restrict__ token, float const* __restrict__ conf,
    int64_t* __restrict__ canvasOut, int32_t* __restrict__ commit, int32_t L, int64_t maskId, int32_t policy,
    float threshold)
{
    extern __shared__ float score[]; // [L]: confidence of masked positions, -1 elsewhere
    int32_t const b = blockIdx.x;
    int64_t const base = static_cast<int64_t>(b) * L;
    bool const rowActive = active[b] != 0;
    for (int32_t i = threadIdx.x; i < L; i += blockDim.x)
    {
        bool const masked = rowActive && canvas[base + i] == maskId;
        score[i] = masked ? conf[base + i] : -1.f;
    }
    __syncthreads();
    // per row: quota >= 0 -> the top-k rule (fixed steps); quota < 0 (or none) -> the threshold rule,
    // unless the node's policy is top-k (then a negative quota commits nothing)
    int64_t const q = quota ? quota[b] : -1;
    bool const topk = policy == kRemaskTopK || q >= 0;
    for (int32_t i = threadIdx.x; i < L; i += blockDim.x)
    {
        float const si = score[i];
        bool const masked = si >= 0.f;
        int32_t rank = 0;
        for (int32_t j = 0; j < L; ++j)
        {
            float const sj = score[j];
            rank += (sj > si || (sj == si && j < i)) ? 1 : 0;
        }
        bool c;
        if (topk)
        {
            c = masked && rank < q;
        }
        else
        {
            c = masked && (rank == 0 || conf[base + i] >= threshold);
        }
        commit[base + i] = c ? 1 : 0;
        canvasOut[base + i] = c ? token[base + i] : canvas[base + i];
    }
}

template <typename T>
cudaError_t launchPick(void const* logits, float const* noise, int64_t* token, float* conf, int32_t rows, int32_t V,
    float temperature, cudaStream_t stream)
{
    pickKernel<T><<<rows, kPickThreads, 0, stream>>>(static_cast<T const*>(logits), noise, token, conf, V, temperature);
    return cudaGetLastError();
}

} // namespace

extern "C" cudaError_t nemodiffRemaskLaunch(void const* logits, int32_t dtype, int64_t const* canvas,
    int32_t const* active, int64_t const* quota, float const* noise, int64_t* canvasOut, int64_t* token, float* conf,
    int32_t* commit, int32_t B, int32_t L, int32_t V, int64_t maskId, int32_t policy, float threshold, float temperature,
    cudaStream_t stream)
{
    if (B <= 0 || L <= 0)
    {
        return cudaSuccess;
    }
    if (V <= 0)
    {
        return cudaErrorInvalidValue;
    }
    float const* g = temperature > 0.f ? noise : nullptr;
    cudaError_t err;
    switch (dtype)
    {
    case kRemaskFloat: err = launchPick<float>(logits, g, token, conf, B * L, V, temperature, stream); break;
    case kRemaskHalf: err = launchPick<__half>(logits, g, token, conf, B * L, V, temperature, stream); break;
    case kRemaskBFloat16: err = launchPick<__nv_bfloat16>(logits, g, token, conf, B * L, V, temperature, stream); break;
    default: return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess)
    {
        return err;
    }
    int const threads = L < 1024 ? ((L + 31) / 32) * 32 : 1024;
    commitKernel<<<B, threads, L * sizeof(float), stream>>>(
        canvas, active, quota, token, conf, canvasOut, commit, L, maskId, policy, threshold);
    return cudaGetLastError();
}

} // namespace nemodiff

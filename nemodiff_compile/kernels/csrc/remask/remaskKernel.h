// nemodiff::Remask CUDA kernels: one refinement pass's token pick and commit rule, fused over the
// vocabulary (online softmax: max and sum of exponentials in one sweep, no probabilities stored).
// Semantics: nemodiff_compile/plugins/remask/spec.py (the torch reference is the truth).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace nemodiff
{

enum RemaskDType : int32_t
{
    kRemaskFloat = 0,
    kRemaskHalf = 1,
    kRemaskBFloat16 = 2
};

enum RemaskPolicy : int32_t
{
    kRemaskThreshold = 0,
    kRemaskTopK = 1
};

// logits [B, L, V] (dtype), canvas [B, L] int64, active [B] bool, quota [B] int64 (top-k; may be
// null for the threshold policy), noise [B, L, V] float32 or null -> canvasOut, token [B, L] int64,
// conf [B, L] float32, commit [B, L] bool. Returns cudaSuccess or the launch error.
extern "C" cudaError_t nemodiffRemaskLaunch(void const* logits, int32_t dtype, int64_t const* canvas,
    bool const* active, int64_t const* quota, float const* noise, int64_t* canvasOut, int64_t* token,
    float* conf, bool* commit, int32_t B, int32_t L, int32_t V, int64_t maskId, int32_t policy,
    float threshold, float temperature, cudaStream_t stream);

} // namespace nemodiff

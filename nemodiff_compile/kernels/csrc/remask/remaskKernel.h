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

// logits [B, L, V] (dtype), canvas [B, L] int64, active [B] int32 (nonzero: the row refines), quota [B]
// int64 (per row: >= 0 commit that many, the top-k rule; < 0 the threshold rule unless policy is top-k;
// may be null: the threshold rule), noise [B, L, V] float32 or null -> canvasOut,
// token [B, L] int64, conf [B, L] float32, commit [B, L] int32 (0/1). No bool at this boundary: TensorRT
// documents kBOOL as unsupported for plugin I/O. Returns cudaSuccess or the launch error.
extern "C" cudaError_t nemodiffRemaskLaunch(void const* logits, int32_t dtype, int64_t const* canvas,
    int32_t const* active, int64_t const* quota, float const* noise, int64_t* canvasOut, int64_t* token,
    float* conf, int32_t* commit, int32_t B, int32_t L, int32_t V, int64_t maskId, int32_t policy,
    float threshold, float temperature, cudaStream_t stream);

} // namespace nemodiff

// Stand-in for the CUDA runtime header, used by the plugin compile test only where no CUDA toolkit is
// installed: the two names the plugin's host code uses.
#pragma once

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t
{
    cudaSuccess = 0
};

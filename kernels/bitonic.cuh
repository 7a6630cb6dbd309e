/*
 * bitonic.cuh: the block-wide bitonic sort the selection kernels share. Needs nothing but the
 * CUDA built-ins (threadIdx, blockDim, __syncthreads), so tests/test_gpu_select_emul.cpp can
 * run it on the CPU as well.
 */
#ifndef AFFINITY_KERNELS_BITONIC_CUH
#define AFFINITY_KERNELS_BITONIC_CUH

#include <stdint.h>

/* Sorts buf[0..n) (n a power of two) descending, with all threads of the block. Must be called
 * by every thread; ends with a barrier. */
__device__ __forceinline__ void kernels__bitonic_sort_desc(unsigned long long *buf, uint32_t n)
{
    for (uint32_t size = 2; size <= n; size <<= 1) {
        for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
            for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
                uint32_t j = i ^ stride;
                if (j > i) {
                    unsigned long long a = buf[i], b = buf[j];
                    bool desc = (i & size) == 0;
                    if (desc ? (a < b) : (a > b)) {
                        buf[i] = b;
                        buf[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
}

#endif

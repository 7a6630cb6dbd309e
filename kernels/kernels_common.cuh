/*
 * kernels_common.cuh: what every .cu file in kernels/ shares — the error macros that turn a CUDA or
 * cuBLAS failure into a status (never an abort), the private layouts of the device, table and
 * workspace objects, and the small device helpers (half conversion, block sort, key packing).
 *
 * Rule kept here: no function in kernels/ aborts, prints or exits; a failure fills kernels_err
 * and the function returns through its single `out:` label.
 */
#ifndef AFFINITY_KERNELS_COMMON_CUH
#define AFFINITY_KERNELS_COMMON_CUH

#ifdef KERNELS_EMULATE
/* tests/gpu_emul_runtime.h: the CUDA runtime, cuBLAS and the built-ins on the CPU, for tests. */
#include "gpu_emul_runtime.h"
#else
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
/* kernel<<<grid, block, shared, stream>>>(args), written as a macro so the CPU emulation used
 * by the tests can launch the same kernels. */
#define KERNELS_LAUNCH(kernel, grid, block, shared, stream) kernel<<<grid, block, shared, stream>>>
#endif
#include <stdarg.h>
#include <stdio.h>

#include "affinity_kernels.h"
#include "bitonic.cuh"

/* Fills err (when not NULL) and returns code. */
int kernels__fail(kernels_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Both macros need `int rc` and a label `out` in the calling function. */
#define KCUDA(err, call)                                                                           \
    do {                                                                                           \
        cudaError_t kc_e_ = (call);                                                                \
        if (kc_e_ != cudaSuccess) {                                                                \
            (void)cudaGetLastError();                                                              \
            rc = kernels__fail(                                                                    \
                (err), kc_e_ == cudaErrorMemoryAllocation ? AFF_ENOMEM : AFF_EDEVICE,              \
                "%s failed: %s (%s:%d)", #call, cudaGetErrorString(kc_e_), __FILE__, __LINE__);    \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

#define KCUBLAS(err, call)                                                                         \
    do {                                                                                           \
        cublasStatus_t kb_s_ = (call);                                                             \
        if (kb_s_ != CUBLAS_STATUS_SUCCESS) {                                                      \
            rc = kernels__fail(                                                                    \
                (err), kb_s_ == CUBLAS_STATUS_ALLOC_FAILED ? AFF_ENOMEM : AFF_EDEVICE,             \
                "%s failed: %s (%s:%d)", #call, cublasGetStatusString(kb_s_), __FILE__, __LINE__); \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

/* After a kernel launch: reports a launch configuration error. */
#define KLAUNCH(err) KCUDA(err, cudaGetLastError())

struct kernels_device {
    int ordinal;
    int sm_count;
    cudaDeviceProp prop;
};

struct kernels_table {
    kernels_device *dev;
    uint32_t dim, dpad;
    kernels_storage storage;
    kernels_metric metric;
    uint32_t count, capacity;
    void *vectors;      /* capacity × dpad, __half or float, padding zero */
    float *norms;       /* capacity: |x|² of the stored (rounded) values */
    uint32_t *category; /* capacity */
    float *price;       /* capacity */
    uint32_t *flags;    /* capacity: bit 0 available, bits 8..15 tag count */
    uint64_t *bloom;    /* capacity */
    uint32_t *tags;     /* capacity × KERNELS_MAX_TAGS */
    cudaStream_t stream;
    void *staging; /* device staging for writes, moves and reads */
    size_t staging_bytes;
};

/* A growable device buffer. */
typedef struct kbuf {
    void *p;
    size_t bytes;
} kbuf;

/* A growable pinned host buffer. */
typedef struct khostbuf {
    void *p;
    size_t bytes;
} khostbuf;

struct kernels_workspace {
    kernels_device *dev;
    uint32_t max_batch;
    cudaStream_t stream;
    cublasHandle_t cublas;
    cudaEvent_t ev_start, ev_stop;
    kbuf qin, qdev, qnorm, meta, filters, arena, scores, best[2], cand[2], out_keys, out_rows,
        out_scores, out_counts;
    khostbuf h_in, h_out;
};

/* Grows b to at least bytes (contents are not kept). Returns 0 or a negative status. */
int kernels__buf_reserve(kbuf *b, size_t bytes, kernels_err *err);
void kernels__buf_free(kbuf *b);
int kernels__hostbuf_reserve(khostbuf *b, size_t bytes, kernels_err *err);
void kernels__hostbuf_free(khostbuf *b);

static inline size_t kernels__elem_bytes(kernels_storage s)
{
    return s == KERNELS_STORAGE_FP16 ? sizeof(__half) : sizeof(float);
}

static inline kernels_attr_cols kernels__cols(const kernels_table *t)
{
    kernels_attr_cols c;
    c.category = t->category;
    c.price = t->price;
    c.flags = t->flags;
    c.bloom = t->bloom;
    c.tags = t->tags;
    return c;
}

/* Element load/store for both storages. */
__device__ __forceinline__ float kernels__load(const __half *p, size_t i)
{
    return __half2float(p[i]);
}
__device__ __forceinline__ float kernels__load(const float *p, size_t i)
{
    return p[i];
}
__device__ __forceinline__ void kernels__store(__half *p, size_t i, float v)
{
    p[i] = __float2half_rn(v);
}
__device__ __forceinline__ void kernels__store(float *p, size_t i, float v)
{
    p[i] = v;
}
/* The value an fp32 input becomes once stored. */
__device__ __forceinline__ float kernels__round(const __half *, float v)
{
    return __half2float(__float2half_rn(v));
}
__device__ __forceinline__ float kernels__round(const float *, float v)
{
    return v;
}

/* Sum over a block (blockDim.x a multiple of 32, ≤ 1024); result valid in every thread. */
__device__ __forceinline__ float kernels__block_sum(float v, float *shared32)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    float s = 0.0f;
    uint32_t nw = blockDim.x >> 5;
    for (uint32_t w = 0; w < nw; w++)
        s += shared32[w];
    return s;
}

#endif

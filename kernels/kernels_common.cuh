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
/* The launch's dynamic shared memory, as 8-byte words. */
#define KERNELS_DYNAMIC_SHARED(name)                        extern __shared__ unsigned long long name[]
#endif
/* #pragma unroll for nvcc; nothing for the host compiler of the emulation. */
#ifdef KERNELS_EMULATE
#define KERNELS_UNROLL
#else
#define KERNELS_UNROLL _Pragma("unroll")
#endif

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>

#include "affinity_kernels.h"
#include "bitonic.cuh"

/* Fills err (when not NULL) and returns code. */
int kernels__fail(kernels_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* True for the errors that poison the CUDA context for good ("sticky" errors: every later
 * runtime call of the process returns them). */
static inline bool kernels__sticky(cudaError_t e)
{
    switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorAssert:
        return true;
    default:
        return false;
    }
}

/* Fills err from a failed CUDA call (code, message, context_lost) and returns the code. */
int kernels__cuda_fail(kernels_err *err, cudaError_t e, const char *call, const char *file,
                       int line);
/* Fills err from a failed cuBLAS call; a sticky CUDA error behind it sets context_lost. */
int kernels__cublas_fail(kernels_err *err, cublasStatus_t s, const char *call, const char *file,
                         int line);
/* After a failure: waits for everything already queued on the stream, so that pinned buffers
 * and scratch are never reused or freed while a copy or kernel still reads them. Ignores the
 * outcome (the caller already has its error) and clears the non-sticky error state. */
void kernels__drain(cudaStream_t s);

/* Both macros need `int rc` and a label `out` in the calling function. */
#define KCUDA(err, call)                                                                           \
    do {                                                                                           \
        cudaError_t kc_e_ = (call);                                                                \
        if (kc_e_ != cudaSuccess) {                                                                \
            rc = kernels__cuda_fail((err), kc_e_, #call, __FILE__, __LINE__);                      \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

#define KCUBLAS(err, call)                                                                         \
    do {                                                                                           \
        cublasStatus_t kb_s_ = (call);                                                             \
        if (kb_s_ != CUBLAS_STATUS_SUCCESS) {                                                      \
            rc = kernels__cublas_fail((err), kb_s_, #call, __FILE__, __LINE__);                    \
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
    void *staging; /* device staging for writes and moves (the exclusive callers) */
    size_t staging_bytes;
    /* Reads run under the engine's shared lock, concurrently with each other: they take
     * read_lock and use their own stream and staging, never the writers' ones. */
    pthread_mutex_t read_lock;
    cudaStream_t read_stream;
    void *read_staging;
    size_t read_staging_bytes;
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

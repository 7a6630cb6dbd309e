/*
 * gpu_emul_runtime.h: just enough of the CUDA runtime, cuBLAS, cuda_fp16 and the CUDA built-ins,
 * on the CPU, to run the code of kernels/ unchanged without a GPU (tests only; C++17).
 *
 * kernels/kernels_common.cuh includes this instead of the CUDA headers when KERNELS_EMULATE is
 * defined. A launch runs the grid's blocks one after another, each on blockDim.x OS threads that
 * share the kernel's __shared__ variables (made `static`), with __syncthreads() a barrier of the
 * block and __shfl_xor_sync an exchange through memory between barriers of the warp. Device
 * memory is host memory, filled with a junk pattern when allocated so code that reads memory it
 * never wrote shows it; copies are synchronous; cublasGemmEx is a plain loop (fp16 operands are
 * _Float16, rounded to nearest even like the GPU's conversions). Not emulated: the GPU memory
 * model, timing, streams running concurrently (launches are serialized), anything the kernels
 * do not use. Slow: tests scale their sizes down when the device name says "Emulated".
 *
 * emul_fail_mallocs_after (set by a test) makes the n-th next cudaMalloc fail with
 * cudaErrorMemoryAllocation, to drive the out-of-memory paths.
 */
#ifndef AFFINITY_GPU_EMUL_RUNTIME_H
#define AFFINITY_GPU_EMUL_RUNTIME_H

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <functional>
#include <mutex>
#include <thread>
#include <vector>

/* ---- built-ins ---------------------------------------------------------------------------------
 */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline pthread_barrier_t emul_block_barrier;
inline pthread_barrier_t emul_warp_barrier[32];
inline float emul_shfl_buf[1024];
inline std::mutex emul_launch_lock; /* one launch at a time: the built-ins above are global */

inline void __syncthreads()
{
    pthread_barrier_wait(&emul_block_barrier);
}

inline float __shfl_xor_sync(unsigned, float v, int lane_mask)
{
    unsigned t = threadIdx.x, w = t >> 5;
    emul_shfl_buf[t] = v;
    pthread_barrier_wait(&emul_warp_barrier[w]);
    float r = emul_shfl_buf[t ^ (unsigned)lane_mask];
    pthread_barrier_wait(&emul_warp_barrier[w]);
    return r;
}

inline uint32_t atomicAdd(uint32_t *p, uint32_t v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

inline uint32_t min(uint32_t a, uint32_t b)
{
    return a < b ? a : b;
}

struct __half {
    _Float16 v;
};

inline __half __float2half_rn(float f)
{
    __half h;
    h.v = (_Float16)f;
    return h;
}

inline float __half2float(__half h)
{
    return (float)h.v;
}

/* Runs body() for every block of the grid, blockDim.x threads per block (1-D blocks, a multiple
 * of 32 threads), blocks in order. */
inline void emul_run_grid(dim3 g, dim3 b, const std::function<void()> &body)
{
    std::lock_guard<std::mutex> hold(emul_launch_lock);
    blockDim = b;
    gridDim = g;
    const unsigned n = b.x;
    pthread_barrier_init(&emul_block_barrier, NULL, n);
    for (unsigned w = 0; w < (n + 31) / 32; w++)
        pthread_barrier_init(&emul_warp_barrier[w], NULL, 32);
    std::vector<std::thread> th;
    for (unsigned t = 0; t < n; t++)
        th.emplace_back([t, g, &body] {
            threadIdx = dim3(t);
            for (unsigned y = 0; y < g.y; y++)
                for (unsigned x = 0; x < g.x; x++) {
                    blockIdx = dim3(x, y);
                    body();
                    pthread_barrier_wait(&emul_block_barrier); /* the block is done */
                }
        });
    for (auto &h : th)
        h.join();
    for (unsigned w = 0; w < (n + 31) / 32; w++)
        pthread_barrier_destroy(&emul_warp_barrier[w]);
    pthread_barrier_destroy(&emul_block_barrier);
}

template <typename F> struct emul_launch {
    dim3 g, b;
    F f;
    template <typename... A> void operator()(A... args)
    {
        emul_run_grid(g, b, [&] { f(args...); });
    }
};

template <typename F> emul_launch<F> emul_make_launch(dim3 g, dim3 b, F f, size_t, void *)
{
    return emul_launch<F>{g, b, f};
}

#define KERNELS_LAUNCH(kernel, grid, block, shared, stream)                                        \
    emul_make_launch(dim3(grid), dim3(block), kernel, (size_t)(shared), (void *)(stream))

namespace cub
{
/* BlockScan::InclusiveSum as CUB's: every thread calls it; reuse after a barrier. */
template <typename T, int N> struct BlockScan {
    struct TempStorage {
        T v[N];
    };
    TempStorage &s;
    explicit BlockScan(TempStorage &t) : s(t) {}
    void InclusiveSum(T in, T &out)
    {
        s.v[threadIdx.x] = in;
        __syncthreads();
        T acc = 0;
        for (unsigned i = 0; i <= threadIdx.x; i++)
            acc += s.v[i];
        out = acc;
        __syncthreads();
    }
};
} // namespace cub

/* ---- runtime ------------------------------------------------------------------------------------
 */

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind {
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3
};
#define cudaStreamNonBlocking 0x01
#define cudaHostAllocDefault  0x00

struct emul_stream {
    int unused;
};
struct emul_event {
    double ms;
};
typedef emul_stream *cudaStream_t;
typedef emul_event *cudaEvent_t;

struct cudaDeviceProp {
    char name[256];
    int multiProcessorCount;
    int major, minor;
    size_t totalGlobalMem;
};

inline int emul_fail_mallocs_after = -1; /* -1: never */
inline cudaError_t emul_last_error = cudaSuccess;

inline const char *cudaGetErrorString(cudaError_t e)
{
    return e == cudaSuccess                 ? "no error"
           : e == cudaErrorMemoryAllocation ? "out of memory (emulated)"
                                            : "invalid argument (emulated)";
}

inline cudaError_t cudaGetLastError()
{
    cudaError_t e = emul_last_error;
    emul_last_error = cudaSuccess;
    return e;
}

inline cudaError_t cudaGetDeviceCount(int *n)
{
    *n = 1;
    return cudaSuccess;
}

inline cudaError_t cudaSetDevice(int d)
{
    return d == 0 ? cudaSuccess : cudaErrorInvalidValue;
}

inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int)
{
    memset(p, 0, sizeof *p);
    strcpy(p->name, "Emulated CUDA device");
    p->multiProcessorCount = 8;
    p->major = 9;
    p->totalGlobalMem = (size_t)1 << 34;
    return cudaSuccess;
}

inline cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b)
{
    *free_b = (size_t)1 << 33;
    *total_b = (size_t)1 << 34;
    return cudaSuccess;
}

inline cudaError_t cudaMalloc(void **p, size_t n)
{
    *p = NULL;
    if (emul_fail_mallocs_after == 0) {
        emul_fail_mallocs_after = -1;
        return cudaErrorMemoryAllocation;
    }
    if (emul_fail_mallocs_after > 0) emul_fail_mallocs_after--;
    void *m = malloc(n ? n : 1);
    if (!m) return cudaErrorMemoryAllocation;
    memset(m, 0xA5, n); /* junk: a read of memory never written shows */
    *p = m;
    return cudaSuccess;
}

inline cudaError_t cudaFree(void *p)
{
    free(p);
    return cudaSuccess;
}

inline cudaError_t cudaHostAlloc(void **p, size_t n, unsigned)
{
    *p = malloc(n ? n : 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}

inline cudaError_t cudaFreeHost(void *p)
{
    free(p);
    return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind,
                                   cudaStream_t)
{
    if (n) memmove(dst, src, n);
    return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind)
{
    return cudaMemcpyAsync(dst, src, n, kind, NULL);
}

inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t)
{
    memset(p, v, n);
    return cudaSuccess;
}

inline cudaError_t cudaMemset(void *p, int v, size_t n)
{
    memset(p, v, n);
    return cudaSuccess;
}

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned)
{
    *s = new emul_stream();
    return cudaSuccess;
}

inline cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    delete s;
    return cudaSuccess;
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t)
{
    return cudaSuccess;
}

inline cudaError_t cudaEventCreate(cudaEvent_t *e)
{
    *e = new emul_event();
    return cudaSuccess;
}

inline cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    delete e;
    return cudaSuccess;
}

inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->ms = ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
    return cudaSuccess;
}

inline cudaError_t cudaEventSynchronize(cudaEvent_t)
{
    return cudaSuccess;
}

inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b)
{
    *ms = (float)(b->ms - a->ms);
    return cudaSuccess;
}

/* ---- cuBLAS
 * --------------------------------------------------------------------------------------- */

struct emul_cublas {
    cudaStream_t stream;
};
typedef emul_cublas *cublasHandle_t;
typedef int cublasStatus_t;
enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_ALLOC_FAILED = 3, CUBLAS_STATUS_INVALID_VALUE = 7 };
typedef int cublasOperation_t;
enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
typedef int cudaDataType_t;
enum { CUDA_R_32F = 0, CUDA_R_16F = 2 };
typedef int cublasComputeType_t;
enum { CUBLAS_COMPUTE_32F = 68 };
typedef int cublasGemmAlgo_t;
enum { CUBLAS_GEMM_DEFAULT = -1 };

inline const char *cublasGetStatusString(cublasStatus_t s)
{
    return s == CUBLAS_STATUS_SUCCESS ? "success" : "failure (emulated)";
}

inline cublasStatus_t cublasCreate(cublasHandle_t *h)
{
    *h = new emul_cublas();
    return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasDestroy(cublasHandle_t h)
{
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s)
{
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}

inline float emul_elem(const void *p, cudaDataType_t t, size_t i)
{
    return t == CUDA_R_16F ? __half2float(((const __half *)p)[i]) : ((const float *)p)[i];
}

/* C (m × n, column-major, fp32) = alpha · op(A) · op(B) + beta · C, as cuBLAS defines it. */
inline cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb,
                                   int m, int n, int k, const void *alpha, const void *A,
                                   cudaDataType_t at, int lda, const void *B, cudaDataType_t bt,
                                   int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc,
                                   cublasComputeType_t, cublasGemmAlgo_t)
{
    if (ct != CUDA_R_32F || m < 0 || n < 0 || k < 0 || ldc < m ||
        lda < (ta == CUBLAS_OP_N ? m : k) || ldb < (tb == CUBLAS_OP_N ? k : n))
        return CUBLAS_STATUS_INVALID_VALUE;
    const float al = *(const float *)alpha, be = *(const float *)beta;
    float *c = (float *)C;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float acc = 0.0f;
            for (int p = 0; p < k; p++) {
                size_t ai =
                    ta == CUBLAS_OP_N ? (size_t)i + (size_t)p * lda : (size_t)p + (size_t)i * lda;
                size_t bi =
                    tb == CUBLAS_OP_N ? (size_t)p + (size_t)j * ldb : (size_t)j + (size_t)p * ldb;
                acc += emul_elem(A, at, ai) * emul_elem(B, bt, bi);
            }
            size_t ci = (size_t)i + (size_t)j * ldc;
            c[ci] = be == 0.0f ? al * acc : al * acc + be * c[ci];
        }
    return CUBLAS_STATUS_SUCCESS;
}

#endif

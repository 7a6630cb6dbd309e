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
 *
 * Fault injection (tests/gpu_emul_control.h, callable from C): emul_fail_launch_after makes the
 * n-th next kernel launch fail with a chosen error instead of running. A sticky error
 * (cudaErrorIllegalAddress, ...) poisons the emulated context as a real device fault does:
 * from then on every runtime call returns it and cudaGetLastError cannot clear it. Streams count
 * the operations queued on them since their last synchronization (emul_pending_ops), so a test
 * can see work a failure path left queued.
 */
#ifndef AFFINITY_GPU_EMUL_RUNTIME_H
#define AFFINITY_GPU_EMUL_RUNTIME_H

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <atomic>
#include <functional>
#include <mutex>
#include <set>
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
inline std::mutex emul_dyn_lock;    /* guards emul_dyn_shared across a whole launch */

inline void __syncthreads()
{
    pthread_barrier_wait(&emul_block_barrier);
}

/* The calling thread's warp (32 threads; blocks are a multiple of 32). */
inline void __syncwarp(unsigned = 0xFFFFFFFFu)
{
    pthread_barrier_wait(&emul_warp_barrier[threadIdx.x >> 5]);
}

/* Dynamic shared memory of the running launch (its `shared` bytes, 8-byte aligned). */
inline std::vector<unsigned long long> emul_dyn_shared;
inline unsigned long long *emul_dynamic_shared()
{
    return emul_dyn_shared.data();
}
#define KERNELS_DYNAMIC_SHARED(name) unsigned long long *name = emul_dynamic_shared()

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

/* Launch bookkeeping (defined with the runtime below): false when the launch must not run. */
inline bool emul_launch_begin(void *stream);

template <typename F> struct emul_launch {
    dim3 g, b;
    F f;
    size_t shared;
    void *stream;
    template <typename... A> void operator()(A... args)
    {
        if (!emul_launch_begin(stream)) return;
        std::lock_guard<std::mutex> hold(emul_dyn_lock);
        /* Junk, as on a device: a kernel must initialize what it reads. */
        emul_dyn_shared.assign((shared + 7) / 8 + 1, 0xA5A5A5A5A5A5A5A5ull);
        emul_run_grid(g, b, [&] { f(args...); });
    }
};

template <typename F>
emul_launch<F> emul_make_launch(dim3 g, dim3 b, F f, size_t shared, void *stream)
{
    return emul_launch<F>{g, b, f, shared, stream};
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
/* The runtime's own numbers, so messages and classifications match a real device. */
enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchTimeout = 702,
    cudaErrorIllegalAddress = 700,
    cudaErrorHardwareStackError = 714,
    cudaErrorIllegalInstruction = 715,
    cudaErrorMisalignedAddress = 716,
    cudaErrorInvalidAddressSpace = 717,
    cudaErrorInvalidPc = 718,
    cudaErrorLaunchFailure = 719,
    cudaErrorECCUncorrectable = 214,
    cudaErrorAssert = 710,
};
enum cudaMemcpyKind {
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3
};
#define cudaStreamNonBlocking 0x01
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
#define cudaHostAllocDefault 0x00

struct emul_stream {
    std::atomic<uint64_t> pending{0}; /* operations queued since the last synchronization */
};
struct emul_event {
    double ms;
    emul_stream *stream; /* where it was last recorded */
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
inline std::atomic<int> emul_fail_launch_after{-1}; /* -1: never */
inline std::atomic<int> emul_fail_launch_code{0};
inline std::atomic<int> emul_poison{0}; /* a sticky error: the context is lost */
inline std::atomic<uint64_t> emul_launches{0};
inline std::mutex emul_streams_lock;
inline std::set<emul_stream *> emul_streams;

#define EMUL_POISONED()                                                                            \
    do {                                                                                           \
        if (int p_ = emul_poison.load()) return p_;                                                \
    } while (0)

inline void emul_queue(void *stream)
{
    if (stream) ((emul_stream *)stream)->pending++;
}

inline bool emul_launch_begin(void *stream)
{
    if (emul_poison.load()) {
        emul_last_error = emul_poison.load();
        return false;
    }
    int n = emul_fail_launch_after.load();
    if (n == 0) {
        emul_fail_launch_after = -1;
        int code = emul_fail_launch_code.load();
        if (code == 700 || code == 702 || code == 710 || (code >= 714 && code <= 719) ||
            code == 214)
            emul_poison = code; /* sticky (as kernels__sticky classifies): the context is gone */
        emul_last_error = code;
        return false;
    }
    if (n > 0) emul_fail_launch_after--;
    emul_queue(stream);
    emul_launches++;
    return true;
}

inline uint64_t emul_pending_total()
{
    std::lock_guard<std::mutex> hold(emul_streams_lock);
    uint64_t n = 0;
    for (emul_stream *s : emul_streams)
        n += s->pending.load();
    return n;
}

inline const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return "no error";
    case cudaErrorMemoryAllocation:
        return "out of memory (emulated)";
    case cudaErrorLaunchOutOfResources:
        return "too many resources requested for launch (emulated)";
    case cudaErrorIllegalAddress:
        return "an illegal memory access was encountered (emulated)";
    case cudaErrorLaunchFailure:
        return "unspecified launch failure (emulated)";
    default:
        return e >= 700 || e == 214 ? "device fault (emulated)" : "invalid argument (emulated)";
    }
}

inline cudaError_t cudaGetLastError()
{
    EMUL_POISONED();
    cudaError_t e = emul_last_error;
    emul_last_error = cudaSuccess;
    return e;
}

inline cudaError_t cudaPeekAtLastError()
{
    EMUL_POISONED();
    return emul_last_error;
}

inline cudaError_t cudaGetDeviceCount(int *n)
{
    *n = 1;
    return cudaSuccess;
}

inline cudaError_t cudaSetDevice(int d)
{
    EMUL_POISONED();
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
    EMUL_POISONED();
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
    *p = NULL;
    EMUL_POISONED();
    *p = malloc(n ? n : 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}

inline cudaError_t cudaFreeHost(void *p)
{
    free(p);
    return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind,
                                   cudaStream_t s)
{
    EMUL_POISONED();
    if (n) memmove(dst, src, n);
    emul_queue(s);
    return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind)
{
    return cudaMemcpyAsync(dst, src, n, kind, NULL);
}

inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s)
{
    EMUL_POISONED();
    memset(p, v, n);
    emul_queue(s);
    return cudaSuccess;
}

inline cudaError_t cudaMemset(void *p, int v, size_t n)
{
    memset(p, v, n);
    return cudaSuccess;
}

template <typename F> inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int)
{
    EMUL_POISONED();
    return cudaSuccess;
}

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned)
{
    *s = NULL;
    EMUL_POISONED();
    *s = new emul_stream();
    std::lock_guard<std::mutex> hold(emul_streams_lock);
    emul_streams.insert(*s);
    return cudaSuccess;
}

inline cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    {
        std::lock_guard<std::mutex> hold(emul_streams_lock);
        emul_streams.erase(s);
    }
    delete s;
    return cudaSuccess;
}

/* Waits for the stream's work: here it is already done, so it only forgets it. After a device
 * fault it still returns (with the error), as the real one does once the work is abandoned. */
inline cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    if (s) s->pending = 0;
    EMUL_POISONED();
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

inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    EMUL_POISONED();
    emul_queue(s);
    e->stream = s;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->ms = ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
    return cudaSuccess;
}

/* The work queued before the event on its stream is done (here: all of that stream's work). */
inline cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    if (e->stream) e->stream->pending = 0;
    EMUL_POISONED();
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
enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13
};
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
inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                   int m, int n, int k, const void *alpha, const void *A,
                                   cudaDataType_t at, int lda, const void *B, cudaDataType_t bt,
                                   int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc,
                                   cublasComputeType_t, cublasGemmAlgo_t)
{
    if (emul_poison.load()) return CUBLAS_STATUS_EXECUTION_FAILED;
    emul_queue(h->stream);
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

/*
 * search_fused.cu: the small-batch search path (B ≤ 32 queries, k ≤ 128) as one kernel that
 * reads the catalog once: scores in registers, per-query top-k in shared memory, filters only
 * for rows that beat the running threshold. No score tile is written to memory.
 *
 * What it computes: for each query of the batch and each block's contiguous range of rows,
 * the k best ordered keys (kernels_key) among rows passing the query's filter, best first,
 * padded with the sentinel 0. A merge launch of the block selection (select_block.cu, merge
 * mode) then reduces the blocks' lists to the final k, exactly as the tiled path merges its
 * segments, and search_decode turns keys into rows and scores. Same scores as the tiled path
 * (fp32 accumulation of the stored values times the query rounded to the storage type; only
 * the summation order differs), same tie rule (lower row first).
 *
 * How: a grid of about two blocks per SM, each block a contiguous slice of rows; each of its
 * 128 threads owns one row per step. The queries are staged through shared memory 64
 * columns at a time (fp32, as rounded to the storage type); a thread reads its row in 16-byte
 * loads (8 fp16 or 4 fp32 values; read-only path) and accumulates the dot products with all B
 * queries in registers. A score that beats its query's threshold (the k-th best of the block
 * so far) and passes the filter is queued in that query's shared buffer with a shared atomic;
 * when a queue could overflow on the next step, one warp per query sorts that query's buffer
 * (a warp-level bitonic sort of 256 keys), keeps the best K and raises the threshold. Once
 * the thresholds have risen almost nothing is queued: the kernel runs at the rate it reads
 * rows and does B fused multiply-adds per element.
 *
 * Memory traffic: the catalog once (N·dpad·2 bytes in fp16), the queries once per block from
 * L2, k keys per block and query. Shared memory: B × 256 keys + 32 × 64 floats (72 KiB at
 * B = 32, opted in above the 48 KiB default). Limits: B ≤ KERNELS_FUSED_MAX_B, k ≤
 * KERNELS_FUSED_MAX_K; chosen by kernels_choose_path (affinity_kernels.h), whose thresholds are
 * placeholders until a device run measures both paths (bench_kernels --path).
 * Unverified on a device: correctness has run only in the CPU emulation (tests/).
 */
#include "select.cuh"

#define FS_THREADS 128u
#define FS_DCHUNK  64u  /* query columns staged in shared memory at a time */
#define FS_P       256u /* keys per query buffer: the best K (≤ 128) and a queue */

static_assert(KERNELS_FUSED_MAX_K + FS_THREADS <= FS_P, "fused buffer too small");

typedef struct fused_args {
    const void *x; /* rows: n × dpad of T */
    uint32_t dpad, n;
    const void *q; /* prepared queries: nb × dpad of T, padding zero */
    uint32_t nb;
    const float *norms; /* L2 only */
    const kernels_filter *filters;
    const uint32_t *arena;
    kernels_attr_cols cols;
    uint32_t seg; /* rows per block */
    /* block s, query b: out[b * out_stride + s * k + j], j < k */
    unsigned long long *out;
    uint32_t out_stride, k;
} fused_args;

/* 16 bytes of a row as floats (8 fp16 or 4 fp32 values). */
template <typename T> __device__ __forceinline__ void fs_load16(const T *p, float *v)
{
    constexpr uint32_t E = 16 / sizeof(T);
#ifdef KERNELS_EMULATE
    T tmp[E];
    memcpy(tmp, p, 16);
#else
    const uint4 raw = __ldg(reinterpret_cast<const uint4 *>(p));
    const T *tmp = reinterpret_cast<const T *>(&raw);
#endif
    KERNELS_UNROLL
    for (uint32_t e = 0; e < E; e++)
        v[e] = kernels__load(tmp, e);
}

/* Sorts one query's FS_P keys descending with the 32 lanes of the calling warp. */
__device__ __forceinline__ void fs_warp_sort_desc(unsigned long long *buf)
{
    const uint32_t lane = threadIdx.x & 31u;
    for (uint32_t size = 2; size <= FS_P; size <<= 1) {
        for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
            for (uint32_t i = lane; i < FS_P; i += 32) {
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
            __syncwarp();
        }
    }
}

/* The warp's flush of query b: sort, keep the best K, clear the queue, raise the threshold. */
template <uint32_t K>
__device__ __forceinline__ void fs_flush(unsigned long long *buf, uint32_t *qcount,
                                         unsigned long long *thresh, uint32_t k)
{
    const uint32_t lane = threadIdx.x & 31u;
    fs_warp_sort_desc(buf);
    for (uint32_t i = K + lane; i < FS_P; i += 32)
        buf[i] = 0ull;
    if (lane == 0) {
        *qcount = 0;
        if (buf[k - 1] > *thresh) *thresh = buf[k - 1];
    }
    __syncwarp();
}

template <typename T, uint32_t K, uint32_t BT>
__global__ void __launch_bounds__(FS_THREADS) fused_scan_kernel(fused_args a)
{
    KERNELS_DYNAMIC_SHARED(dyn);
    __shared__ uint32_t qcount[KERNELS_FUSED_MAX_B];
    __shared__ unsigned long long thresh[KERNELS_FUSED_MAX_B];
    unsigned long long *buf = dyn;                    /* nb × FS_P keys */
    float *sq = (float *)(dyn + (size_t)a.nb * FS_P); /* BT × FS_DCHUNK */

    const uint32_t tid = threadIdx.x, warp = tid >> 5, nwarps = FS_THREADS / 32;
    const uint32_t nb = a.nb;
    const uint64_t r0_64 = (uint64_t)blockIdx.x * a.seg;
    const uint32_t r0 = (uint32_t)(r0_64 < a.n ? r0_64 : a.n);
    const uint32_t r1 = (uint32_t)(r0_64 + a.seg < a.n ? r0_64 + a.seg : a.n);
    const T *x = (const T *)a.x;
    const T *q = (const T *)a.q;
    constexpr uint32_t E = 16 / sizeof(T);

    for (uint32_t i = tid; i < nb * FS_P; i += FS_THREADS)
        buf[i] = 0ull;
    for (uint32_t b = tid; b < KERNELS_FUSED_MAX_B; b += FS_THREADS) {
        qcount[b] = 0;
        thresh[b] = 0ull;
    }
    __syncthreads();

    for (uint32_t base = r0; base < r1; base += FS_THREADS) {
        const uint32_t row = base + tid;
        const bool valid = row < r1;
        float acc[BT];
        KERNELS_UNROLL
        for (uint32_t b = 0; b < BT; b++)
            acc[b] = 0.0f;
        for (uint32_t c0 = 0; c0 < a.dpad; c0 += FS_DCHUNK) {
            const uint32_t dch = a.dpad - c0 < FS_DCHUNK ? a.dpad - c0 : FS_DCHUNK;
            __syncthreads(); /* the previous chunk's readers are done */
            for (uint32_t i = tid; i < nb * FS_DCHUNK; i += FS_THREADS) {
                uint32_t b = i / FS_DCHUNK, j = i % FS_DCHUNK;
                sq[i] = j < dch ? kernels__load(q, (size_t)b * a.dpad + c0 + j) : 0.0f;
            }
            __syncthreads();
            if (valid) {
                const T *xr = x + (size_t)row * a.dpad + c0;
                for (uint32_t j = 0; j < dch; j += E) {
                    float v[E];
                    fs_load16(xr + j, v);
                    KERNELS_UNROLL
                    for (uint32_t b = 0; b < BT; b++) {
                        if (b < nb) {
                            const float *qs = sq + b * FS_DCHUNK + j;
                            KERNELS_UNROLL
                            for (uint32_t e = 0; e < E; e++)
                                acc[b] += v[e] * qs[e];
                        }
                    }
                }
            }
        }
        if (valid) {
            const float norm = a.norms ? a.norms[row] : 0.0f;
            KERNELS_UNROLL
            for (uint32_t b = 0; b < BT; b++) {
                if (b < nb) {
                    float s = a.norms ? 2.0f * acc[b] - norm : acc[b];
                    unsigned long long c = kernels_key(s, row);
                    if (c > thresh[b] &&
                        (!a.filters || kernels_filter_pass(&a.filters[b], a.arena, &a.cols, row))) {
                        uint32_t pos = atomicAdd(&qcount[b], 1u);
                        buf[(size_t)b * FS_P + K + pos] = c;
                    }
                }
            }
        }
        __syncthreads();
        /* A queue that could overflow on the next step is flushed, one warp per query. */
        for (uint32_t b = warp; b < nb; b += nwarps)
            if (qcount[b] > FS_P - K - FS_THREADS)
                fs_flush<K>(buf + (size_t)b * FS_P, &qcount[b], &thresh[b], a.k);
        __syncthreads();
    }
    for (uint32_t b = warp; b < nb; b += nwarps)
        if (qcount[b] > 0) fs_flush<K>(buf + (size_t)b * FS_P, &qcount[b], &thresh[b], a.k);
    __syncthreads();
    for (uint32_t i = tid; i < nb * a.k; i += FS_THREADS) {
        uint32_t b = i / a.k, j = i % a.k;
        a.out[(size_t)b * a.out_stride + (size_t)blockIdx.x * a.k + j] = buf[(size_t)b * FS_P + j];
    }
}

template <typename T, uint32_t K, uint32_t BT>
static int fused_launch_one(const fused_args *a, uint32_t blocks, cudaStream_t stream,
                            kernels_err *err)
{
    int rc = 0;
    const size_t shared =
        (size_t)a->nb * FS_P * sizeof(unsigned long long) + (size_t)BT * FS_DCHUNK * sizeof(float);
    static bool opted_in = false; /* per instance; a benign race sets it twice at most */
    if (!opted_in) {
        void (*kernel)(fused_args) = fused_scan_kernel<T, K, BT>;
        KCUDA(err, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)((size_t)KERNELS_FUSED_MAX_B * FS_P * 8 +
                                              (size_t)KERNELS_FUSED_MAX_B * FS_DCHUNK * 4)));
        opted_in = true;
    }
    {
        void (*kernel)(fused_args) = fused_scan_kernel<T, K, BT>;
        KERNELS_LAUNCH(kernel, blocks, FS_THREADS, shared, stream)(*a);
    }
    KLAUNCH(err);
out:
    return rc;
}

template <typename T, uint32_t K>
static int fused_launch_k(const fused_args *a, uint32_t blocks, cudaStream_t stream,
                          kernels_err *err)
{
    if (a->nb <= 1) return fused_launch_one<T, K, 1>(a, blocks, stream, err);
    if (a->nb <= 8) return fused_launch_one<T, K, 8>(a, blocks, stream, err);
    return fused_launch_one<T, K, KERNELS_FUSED_MAX_B>(a, blocks, stream, err);
}

template <typename T>
static int fused_launch_t(const fused_args *a, uint32_t k_bucket, uint32_t blocks,
                          cudaStream_t stream, kernels_err *err)
{
    switch (k_bucket) {
    case 32:
        return fused_launch_k<T, 32>(a, blocks, stream, err);
    case 64:
        return fused_launch_k<T, 64>(a, blocks, stream, err);
    case 128:
        return fused_launch_k<T, 128>(a, blocks, stream, err);
    default:
        return kernels__fail(err, AFF_EINTERNAL, "fused scan: no instance for k bucket %u",
                             k_bucket);
    }
}

int search_fused_scan(const kernels_table *t, const void *queries, uint32_t nb, uint32_t k,
                      uint32_t k_bucket, const kernels_filter *filters, const uint32_t *arena,
                      uint32_t blocks, uint32_t seg, unsigned long long *out, uint32_t out_stride,
                      cudaStream_t stream, kernels_err *err)
{
    if (nb == 0 || nb > KERNELS_FUSED_MAX_B || k == 0 || k > k_bucket ||
        k_bucket > KERNELS_FUSED_MAX_K || blocks == 0)
        return kernels__fail(err, AFF_EINTERNAL, "fused scan: bad launch (B %u, k %u, bucket %u)",
                             nb, k, k_bucket);
    fused_args a;
    memset(&a, 0, sizeof a);
    a.x = t->vectors;
    a.dpad = t->dpad;
    a.n = t->count;
    a.q = queries;
    a.nb = nb;
    a.norms = t->metric == KERNELS_METRIC_L2 ? t->norms : NULL;
    a.filters = filters;
    a.arena = arena;
    a.cols = kernels__cols(t);
    a.seg = seg;
    a.out = out;
    a.out_stride = out_stride;
    a.k = k;
    if (t->storage == KERNELS_STORAGE_FP16)
        return fused_launch_t<__half>(&a, k_bucket, blocks, stream, err);
    return fused_launch_t<float>(&a, k_bucket, blocks, stream, err);
}

/*
 * select_block.cu: top-k selection for k ≤ 256 — one thread block per (segment, query) keeps
 * the k best ordered keys in shared memory and merges newcomers with a bitonic sort.
 *
 * What it computes: for each block, the k largest keys of its candidate range (select.cuh),
 * best first, padded with the sentinel 0 when fewer candidates exist. Keys are
 * (score, row) packed so that one unsigned compare gives "higher score, then lower row".
 *
 * How: shared memory holds P = 1024 keys: the current best K (K = k rounded up to a power of
 * two, 32..256) followed by a queue. Each of the 256 threads loads one candidate per step; a
 * candidate that beats the block threshold (the current k-th best, or the running best of the
 * earlier tiles) and passes the filter is appended to the queue with a shared atomic. When the
 * queue could overflow on the next step, the whole buffer is bitonic-sorted, the best K kept
 * and the threshold raised. Once the threshold has risen (after a few thousand candidates on
 * random data) almost nothing is queued, so the kernel runs at the speed of reading its input.
 *
 * Memory traffic: each candidate score is read once (4 bytes, from L2 right after the GEMM
 * wrote it); norms (L2 metric) and filter columns only for candidates above the threshold;
 * k keys (8 bytes each) written per block. Limits: k ≤ 256; adversarial orders (ascending
 * scores) make every step flush, about 55 sort stages per 256 candidates — correct, slower.
 */
#include "select.cuh"

#define SB_THREADS 256u
#define SB_QUEUE   512u
#define SB_BUF     1024u /* next power of two ≥ K + SB_QUEUE for every K ≤ 256 */

static_assert(KERNELS_BLOCK_SELECT_MAX_K + SB_QUEUE <= SB_BUF, "block select buffer too small");

/* Sorts the buffer, keeps the best K, clears the queue and raises the threshold. Called by all
 * threads of the block. */
template <uint32_t K>
__device__ __forceinline__ void sb_flush(unsigned long long *buf, uint32_t *qcount,
                                         unsigned long long *thresh, uint32_t k)
{
    kernels__bitonic_sort_desc(buf, SB_BUF);
    for (uint32_t i = K + threadIdx.x; i < SB_BUF; i += blockDim.x)
        buf[i] = 0ull;
    if (threadIdx.x == 0) {
        *qcount = 0;
        unsigned long long t = buf[k - 1];
        if (t > *thresh) *thresh = t;
    }
    __syncthreads();
}

template <uint32_t K>
__global__ void __launch_bounds__(SB_THREADS) select_block_kernel(select_args a)
{
    __shared__ unsigned long long buf[SB_BUF];
    __shared__ uint32_t qcount;
    __shared__ unsigned long long thresh;

    const uint32_t b = blockIdx.y, s = blockIdx.x;
    const select_range r = select_block_range(a, s);
    const unsigned long long prior = select_prior(a, b);
    const uint32_t total = r.n_expl + r.n_impl;

    for (uint32_t i = threadIdx.x; i < SB_BUF; i += blockDim.x)
        buf[i] = 0ull;
    if (threadIdx.x == 0) {
        qcount = 0;
        thresh = 0ull;
    }
    __syncthreads();

    for (uint32_t base = 0; base < total; base += SB_THREADS) {
        uint32_t idx = base + threadIdx.x;
        if (idx < total) {
            unsigned long long c = select_load(a, b, r, idx, thresh, prior);
            if (c) {
                uint32_t pos = atomicAdd(&qcount, 1u);
                buf[K + pos] = c;
            }
        }
        __syncthreads();
        bool full = qcount > SB_QUEUE - SB_THREADS;
        __syncthreads();
        if (full) sb_flush<K>(buf, &qcount, &thresh, a.k);
    }
    bool pending = qcount > 0;
    __syncthreads();
    if (pending) sb_flush<K>(buf, &qcount, &thresh, a.k);

    unsigned long long *out = a.out + (size_t)b * a.out_stride + (size_t)s * a.k;
    for (uint32_t j = threadIdx.x; j < a.k; j += blockDim.x)
        out[j] = buf[j];
}

int select_block_launch(const select_args *a, uint32_t k_bucket, uint32_t segments,
                        uint32_t queries, cudaStream_t stream, kernels_err *err)
{
    int rc = 0;
    dim3 grid(segments, queries);
    if (a->k == 0 || a->k > k_bucket || queries > 65535u)
        return kernels__fail(err, AFF_EINTERNAL,
                             "block select: bad launch (k %u, bucket %u, "
                             "queries %u)",
                             a->k, k_bucket, queries);
    switch (k_bucket) {
    case 32:
        KERNELS_LAUNCH(select_block_kernel<32>, grid, SB_THREADS, 0, stream)(*a);
        break;
    case 64:
        KERNELS_LAUNCH(select_block_kernel<64>, grid, SB_THREADS, 0, stream)(*a);
        break;
    case 128:
        KERNELS_LAUNCH(select_block_kernel<128>, grid, SB_THREADS, 0, stream)(*a);
        break;
    case 256:
        KERNELS_LAUNCH(select_block_kernel<256>, grid, SB_THREADS, 0, stream)(*a);
        break;
    default:
        return kernels__fail(err, AFF_EINTERNAL, "block select: no instance for k bucket %u",
                             k_bucket);
    }
    KLAUNCH(err);
out:
    return rc;
}

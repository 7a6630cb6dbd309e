/*
 * select_radix.cu: top-k selection for 256 < k ≤ 2048 — one thread block per (segment, query)
 * finds the k-th best ordered key by radix select, then gathers and sorts the k winners.
 *
 * What it computes: the same as select_block.cu (the k largest keys of the block's candidate
 * range, best first, padded with the sentinel 0), for the larger k buckets 512, 1024, 2048.
 *
 * How: keys are unique 64-bit integers (score bits, then ~row), so the k-th largest key is a
 * single value t and the answer is exactly the keys ≥ t. A first pass over the block's range
 * evaluates every candidate once (score transform, prior bound, filter), histograms its top
 * byte and copies the surviving keys into shared memory while they fit (3072 keys). Pass p then
 * builds a 256-bin histogram of byte p (most significant first) over the keys that share the
 * bytes chosen so far, and a block scan from the top bin picks the bin holding the k-th key; the
 * search stops as soon as that bin holds exactly the keys still needed — usually after 3–4
 * passes on real scores, at most 8 (many equal scores). With no more than k candidates all are
 * taken. A last pass gathers the keys ≥ t (at most 2048) and a bitonic sort orders them.
 *
 * Memory traffic: when the survivors fit in shared memory — the common case once the prior
 * bound (the k-th best of the earlier tiles) has risen, since then only the running best and a
 * few new rows survive — the range is read from global memory (mostly L2) once. Otherwise every
 * pass re-reads it and re-evaluates filter and norms. k keys written per block. Limits:
 * k ≤ 2048; about 42 KiB of shared memory for k = 2048; candidates per block < 2^32.
 */
#ifndef KERNELS_EMULATE
#include <cub/block/block_scan.cuh>
#endif

#include "select.cuh"

#define SR_THREADS 256u

/* Survivors kept in shared memory for the passes after the first. */
#define SR_CAND 3072u

template <uint32_t K>
__global__ void __launch_bounds__(SR_THREADS) select_radix_kernel(select_args a)
{
    typedef cub::BlockScan<uint32_t, SR_THREADS> block_scan;
    __shared__ typename block_scan::TempStorage scan_tmp;
    __shared__ unsigned long long buf[K];
    __shared__ unsigned long long cand[SR_CAND];
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_ncand, s_sel, s_remaining, s_bin, s_count;

    const uint32_t b = blockIdx.y, s = blockIdx.x;
    const select_range r = select_block_range(a, s);
    const unsigned long long prior = select_prior(a, b);
    const uint32_t total = r.n_expl + r.n_impl;

    /* First pass: every candidate evaluated once; top-byte histogram; survivors to shared. */
    hist[threadIdx.x] = 0;
    if (threadIdx.x == 0) s_ncand = 0;
    __syncthreads();
    for (uint32_t idx = threadIdx.x; idx < total; idx += SR_THREADS) {
        unsigned long long c = select_load(a, b, r, idx, 0ull, prior);
        if (c) {
            atomicAdd(&hist[(uint32_t)(c >> 56)], 1u);
            uint32_t pos = atomicAdd(&s_ncand, 1u);
            if (pos < SR_CAND) cand[pos] = c;
        }
    }
    __syncthreads();
    const uint32_t n_valid = s_ncand;
    const bool in_shared = n_valid <= SR_CAND;
    const uint32_t m = in_shared ? n_valid : total;

    uint32_t remaining = a.k;
    unsigned long long prefix = 0ull, mask = 0ull, thresh = 1ull; /* 1: every candidate */
    if (n_valid > a.k) {
        for (uint32_t pass = 0; pass < 8; pass++) {
            const uint32_t shift = 56u - 8u * pass;
            if (pass > 0) {
                hist[threadIdx.x] = 0;
                __syncthreads();
                for (uint32_t i = threadIdx.x; i < m; i += SR_THREADS) {
                    unsigned long long c =
                        in_shared ? cand[i] : select_load(a, b, r, i, 0ull, prior);
                    if (c && (c & mask) == prefix)
                        atomicAdd(&hist[(uint32_t)(c >> shift) & 0xFFu], 1u);
                }
                __syncthreads();
            }
            uint32_t v = hist[255u - threadIdx.x], cum;
            block_scan(scan_tmp).InclusiveSum(v, cum);
            if (v > 0 && cum >= remaining && cum - v < remaining) {
                s_sel = 255u - threadIdx.x;
                s_remaining = remaining - (cum - v);
                s_bin = v;
            }
            __syncthreads();
            prefix |= (unsigned long long)s_sel << shift;
            mask |= 0xFFull << shift;
            remaining = s_remaining;
            bool done = s_bin == remaining;
            __syncthreads(); /* everyone has read s_* and hist before they are rewritten */
            thresh = prefix;
            if (done) break;
        }
    }

    for (uint32_t i = threadIdx.x; i < K; i += SR_THREADS)
        buf[i] = 0ull;
    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < m; i += SR_THREADS) {
        unsigned long long c = in_shared ? cand[i] : select_load(a, b, r, i, 0ull, prior);
        if (c && c >= thresh) {
            uint32_t pos = atomicAdd(&s_count, 1u);
            if (pos < K) buf[pos] = c;
        }
    }
    __syncthreads();
    kernels__bitonic_sort_desc(buf, K);

    unsigned long long *out = a.out + (size_t)b * a.out_stride + (size_t)s * a.k;
    for (uint32_t j = threadIdx.x; j < a.k; j += SR_THREADS)
        out[j] = buf[j];
}

int select_radix_launch(const select_args *a, uint32_t k_bucket, uint32_t segments,
                        uint32_t queries, cudaStream_t stream, kernels_err *err)
{
    int rc = 0;
    dim3 grid(segments, queries);
    if (a->k == 0 || a->k > k_bucket || queries > 65535u)
        return kernels__fail(err, AFF_EINTERNAL,
                             "radix select: bad launch (k %u, bucket %u, "
                             "queries %u)",
                             a->k, k_bucket, queries);
    switch (k_bucket) {
    case 512:
        KERNELS_LAUNCH(select_radix_kernel<512>, grid, SR_THREADS, 0, stream)(*a);
        break;
    case 1024:
        KERNELS_LAUNCH(select_radix_kernel<1024>, grid, SR_THREADS, 0, stream)(*a);
        break;
    case 2048:
        KERNELS_LAUNCH(select_radix_kernel<2048>, grid, SR_THREADS, 0, stream)(*a);
        break;
    default:
        return kernels__fail(err, AFF_EINTERNAL, "radix select: no instance for k bucket %u",
                             k_bucket);
    }
    KLAUNCH(err);
out:
    return rc;
}

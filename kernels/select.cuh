/*
 * select.cuh: the input every top-k selection kernel reads, and the launchers of the two
 * selection algorithms (select_block.cu for k ≤ 256, select_radix.cu above).
 *
 * One thread block reduces one segment of one query's candidates to the k best ordered keys
 * (see kernels_key), written best first and padded with the sentinel 0. A block's candidates
 * are the union of two ranges:
 *   - implicit: scores of a GEMM tile, element i being row row_base + i; for L2 the kernel turns
 *     the dot product into 2 q·x - |x|² on the fly; the query's filter and the prior bound are
 *     applied here, in the same pass (a row failing either is no candidate);
 *   - explicit: ordered keys from an earlier pass (already filtered).
 * In tile mode (impl_len > 0) segment s covers implicit elements [s·impl_seg, …) and segment 0
 * also takes the whole explicit list (the running best of the earlier tiles). In merge mode
 * (impl_len == 0) segment s covers explicit elements [s·expl_seg, …).
 * Keys are unique within a block's union (rows are), which both algorithms rely on.
 */
#ifndef AFFINITY_KERNELS_SELECT_CUH
#define AFFINITY_KERNELS_SELECT_CUH

#include "kernels_common.cuh"

typedef struct select_args {
    /* explicit candidates of query b: expl[b * expl_stride + j], j < expl_len */
    const unsigned long long *expl;
    uint32_t expl_stride, expl_len, expl_seg;
    /* implicit candidates of query b: scores[b * ld + i], i < impl_len, row row_base + i */
    const float *scores;
    uint32_t ld, impl_len, impl_seg, row_base;
    const float *norms;            /* L2 only: squared row norms (NULL for inner product) */
    const kernels_filter *filters; /* per query, NULL: none */
    const uint32_t *arena;
    kernels_attr_cols cols;
    /* prior bound of query b: implicit candidates must beat prior[b * prior_stride +
     * prior_index] (the k-th best of the earlier tiles); NULL: none */
    const unsigned long long *prior;
    uint32_t prior_stride, prior_index;
    /* output of (segment s, query b): out[b * out_stride + s * k + j], j < k */
    unsigned long long *out;
    uint32_t out_stride, k;
} select_args;

typedef kernels_block_range select_range;

__device__ __forceinline__ select_range select_block_range(const select_args &a, uint32_t s)
{
    return kernels_select_range(a.expl_len, a.expl_seg, a.impl_len, a.impl_seg, s);
}

/* The key of element idx of block (r, b), or 0 when it is no candidate or does not beat
 * floor. The filter runs only for rows that beat floor, so it costs little once the block's
 * threshold has risen. */
__device__ __forceinline__ unsigned long long select_load(const select_args &a, uint32_t b,
                                                          const select_range &r, uint32_t idx,
                                                          unsigned long long floor,
                                                          unsigned long long prior)
{
    if (idx < r.n_expl) {
        unsigned long long c = a.expl[(size_t)b * a.expl_stride + r.expl_begin + idx];
        return c > floor ? c : 0ull;
    }
    uint32_t i = r.impl_begin + (idx - r.n_expl);
    uint32_t row = a.row_base + i;
    float s = a.scores[(size_t)b * a.ld + i];
    if (a.norms) s = 2.0f * s - a.norms[row];
    unsigned long long c = kernels_key(s, row);
    if (c <= floor || c <= prior) return 0ull;
    if (a.filters && !kernels_filter_pass(&a.filters[b], a.arena, &a.cols, row)) return 0ull;
    return c;
}

__device__ __forceinline__ unsigned long long select_prior(const select_args &a, uint32_t b)
{
    return a.prior ? a.prior[(size_t)b * a.prior_stride + a.prior_index] : 0ull;
}

/* Launch grid: (segments, queries). k_bucket is kernels_k_bucket(a.k). */
int select_block_launch(const select_args *a, uint32_t k_bucket, uint32_t segments,
                        uint32_t queries, cudaStream_t stream, kernels_err *err);
int select_radix_launch(const select_args *a, uint32_t k_bucket, uint32_t segments,
                        uint32_t queries, cudaStream_t stream, kernels_err *err);
/* The fused small-batch scan (search_fused.cu): block s of `blocks` reduces rows
 * [s·seg, (s+1)·seg) of t to the k best keys of each of the nb prepared queries (storage
 * type, dpad columns), written to out[b * out_stride + s * k + j]. */
int search_fused_scan(const kernels_table *t, const void *queries, uint32_t nb, uint32_t k,
                      uint32_t k_bucket, const kernels_filter *filters, const uint32_t *arena,
                      uint32_t blocks, uint32_t seg, unsigned long long *out, uint32_t out_stride,
                      cudaStream_t stream, kernels_err *err);

#endif

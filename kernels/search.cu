/*
 * search.cu: batched exact top-k over a table — tiled cuBLAS GEMM, per-tile selection with the
 * filters applied in the same pass, and a running merge, so the B × N score matrix is never
 * written whole.
 *
 * What it computes: for each query q_b, the k_b rows with the highest score (q·x for inner
 * product; 2 q·x - |x|² - |q|² = -|q - x|² for L2, from precomputed row norms, no second pass)
 * among rows 0..count-1 that pass the query's filter, best first, ties by lower row.
 *
 * Paths: kernels_choose_path picks, per chunk, the fused small-batch scan (search_fused.cu:
 * one kernel reads the catalog once, then a merge launch) or the tiled path below. Both end in
 * the same running-best layout and search_decode.
 *
 * How the tiled path works, per chunk of B ≤ max_batch queries:
 *   1. upload queries, k, offsets and filters (pinned buffers), convert queries to the storage
 *      type with zero padding and compute |q|²;
 *   2. for each tile of T rows (T·B·4 bytes ≤ 32 MiB so the score tile stays in L2): one GEMM
 *      (fp16 in, fp32 accumulate; fp32 storage uses fp32 GEMM), then one selection launch over
 *      (segments, B) blocks that reduces the tile plus the running best of the earlier tiles
 *      to k keys per segment; the k-th best so far is a prior bound, so rows that cannot enter
 *      the result skip the filter; if the tile was cut into several segments, merge launches
 *      reduce the segment lists (each level at least 8× smaller) to the new running best;
 *   3. decode keys into rows and scores in the engine's output layout and download them.
 * Everything runs on the workspace's stream; other workspaces overlap on theirs.
 *
 * Memory traffic per batch: the catalog once (N·dpad·2 bytes in fp16) by the GEMM, plus the
 * score tiles written and read back mostly through L2 (B·N·4 bytes each way), plus k keys per
 * segment. Limits: k ≤ 2048; B ≤ 65535 per launch (the chunk size); rows < 2^32 - 1.
 */
#include <string.h>

#include "select.cuh"

/* Bytes of one score tile (B × T × 4); the CPU emulation used by tests sets it smaller so that
 * small tables still span many tiles. */
#ifndef SEARCH_TILE_BUDGET
#define SEARCH_TILE_BUDGET ((uint64_t)32 << 20)
#endif

template <typename T>
__global__ void search_prepare_queries(const float *qin, uint32_t dim, uint32_t dpad, T *qout,
                                       float *qnorm)
{
    __shared__ float red[32];
    const uint32_t b = blockIdx.x;
    float acc = 0.0f;
    for (uint32_t j = threadIdx.x; j < dpad; j += blockDim.x) {
        float v = j < dim ? qin[(size_t)b * dim + j] : 0.0f;
        kernels__store(qout, (size_t)b * dpad + j, v);
        acc += v * v;
    }
    float sum = kernels__block_sum(acc, red);
    if (threadIdx.x == 0) qnorm[b] = sum;
}

/* meta: k[0..B) then offsets[0..B). */
__global__ void search_decode(const unsigned long long *best, uint32_t kmax, const uint32_t *meta,
                              uint32_t nb, const float *qnorm, int l2, uint32_t *rows,
                              float *scores, uint32_t *counts)
{
    const uint32_t b = blockIdx.x;
    const uint32_t kb = meta[b], off = meta[nb + b];
    const unsigned long long *mine = best + (size_t)b * kmax;
    for (uint32_t j = threadIdx.x; j < kb; j += blockDim.x) {
        unsigned long long c = mine[j];
        if (c) {
            float s = kernels_key_score(c);
            if (l2) s -= qnorm[b];
            rows[off + j] = kernels_key_row(c);
            scores[off + j] = s;
            if (j + 1 == kb || mine[j + 1] == 0ull) counts[b] = j + 1;
        } else if (j == 0) {
            counts[b] = 0;
        }
    }
}

static int search_select(const select_args *a, uint32_t k_bucket, uint32_t segments,
                         uint32_t queries, cudaStream_t stream, kernels_err *err)
{
    if (k_bucket <= KERNELS_BLOCK_SELECT_MAX_K)
        return select_block_launch(a, k_bucket, segments, queries, stream, err);
    return select_radix_launch(a, k_bucket, segments, queries, stream, err);
}

/* Merge levels: len keys per query in ws->cand[0] (segment lists of k_bucket-selected keys)
 * down to kmax keys per query in next. Each level is at least eightfold smaller. */
static int search_merge(kernels_workspace *ws, uint32_t len, uint32_t nb, uint32_t kb,
                        uint32_t kmax, uint32_t target_blocks, unsigned long long *next,
                        kernels_err *err)
{
    int rc = 0;
    uint32_t c = 0;
    for (bool more = true; more;) {
        kernels_segments ms = kernels_plan_segments(len, nb, kb, target_blocks);
        select_args m;
        memset(&m, 0, sizeof m);
        m.expl = (const unsigned long long *)ws->cand[c].p;
        m.expl_stride = len;
        m.expl_len = len;
        m.expl_seg = ms.length;
        m.k = kmax;
        if (ms.count == 1) {
            m.out = next;
            m.out_stride = kmax;
            more = false;
        } else {
            m.out = (unsigned long long *)ws->cand[1 - c].p;
            m.out_stride = ms.count * kmax;
        }
        if ((rc = search_select(&m, kb, ms.count, nb, ws->stream, err))) return rc;
        len = ms.count * kmax;
        c = 1 - c;
    }
    return rc;
}

/* One chunk of at most ws->max_batch queries; results go to the caller's arrays at out_base. */
static int search_chunk(kernels_workspace *ws, const kernels_table *t, const kernels_search_args *a,
                        uint32_t q0, uint32_t nb, size_t out_base, bool any_filter,
                        kernels_err *err)
{
    int rc = 0;
    const uint32_t n = t->count, dim = t->dim, dpad = t->dpad;
    const size_t esz = kernels__elem_bytes(t->storage);
    const bool l2 = t->metric == KERNELS_METRIC_L2;
    const uint32_t target_blocks = 4u * (uint32_t)ws->dev->sm_count;

    uint32_t kmax = 0;
    size_t total_out = 0;
    for (uint32_t i = 0; i < nb; i++) {
        uint32_t k = a->k[q0 + i];
        if (k > kmax) kmax = k;
        total_out += k;
    }
    const uint32_t kb = kernels_k_bucket(kmax);
    const kernels_path path =
        a->path != KERNELS_PATH_AUTO ? a->path : kernels_choose_path(nb, kb, n);
    if (path == KERNELS_PATH_FUSED && (nb > KERNELS_FUSED_MAX_B || kb > KERNELS_FUSED_MAX_K))
        return kernels__fail(err, AFF_EINVAL,
                             "the fused path serves at most %u queries with k <= %u (chunk of %u, "
                             "k bucket %u)",
                             KERNELS_FUSED_MAX_B, KERNELS_FUSED_MAX_K, nb, kb);
    const bool fused = path == KERNELS_PATH_FUSED;
    const uint32_t tile = fused ? 0 : kernels_plan_tile_rows(n, nb, SEARCH_TILE_BUDGET);
    const uint32_t ntiles = fused ? 0 : (uint32_t)(((uint64_t)n + tile - 1) / tile);
    const kernels_segments seg =
        fused ? kernels_segments{1, 0} : kernels_plan_segments(tile, nb, kb, target_blocks);
    uint32_t fseg = 0;
    const uint32_t fblocks = fused ? kernels_plan_fused_blocks(n, ws->dev->sm_count, &fseg) : 0;

    const size_t in_bytes = (size_t)nb * dim * 4 + (size_t)nb * 8 +
                            (any_filter ? (size_t)nb * sizeof(kernels_filter) : 0);
    const size_t out_bytes = total_out * 8 + (size_t)nb * 4;
    const size_t best_bytes = (size_t)nb * kmax * 8;
    const uint32_t lists = fused ? fblocks : seg.count; /* k-lists per query before merging */
    const size_t cand_bytes = lists > 1 ? (size_t)nb * lists * kmax * 8 : 8;
    if ((rc = kernels__buf_reserve(&ws->qin, (size_t)nb * dim * 4, err)) ||
        (rc = kernels__buf_reserve(&ws->qdev, (size_t)nb * dpad * esz, err)) ||
        (rc = kernels__buf_reserve(&ws->qnorm, (size_t)nb * 4, err)) ||
        (rc = kernels__buf_reserve(&ws->meta, (size_t)nb * 8, err)) ||
        (rc = kernels__buf_reserve(&ws->filters, (size_t)nb * sizeof(kernels_filter), err)) ||
        (rc = kernels__buf_reserve(&ws->scores, fused ? 4 : (size_t)tile * nb * 4, err)) ||
        (rc = kernels__buf_reserve(&ws->best[0], best_bytes, err)) ||
        (rc = kernels__buf_reserve(&ws->best[1], best_bytes, err)) ||
        (rc = kernels__buf_reserve(&ws->cand[0], cand_bytes, err)) ||
        (rc = kernels__buf_reserve(&ws->cand[1], cand_bytes, err)) ||
        (rc = kernels__buf_reserve(&ws->out_rows, total_out * 4, err)) ||
        (rc = kernels__buf_reserve(&ws->out_scores, total_out * 4, err)) ||
        (rc = kernels__buf_reserve(&ws->out_counts, (size_t)nb * 4, err)) ||
        (rc = kernels__hostbuf_reserve(&ws->h_in, in_bytes, err)) ||
        (rc = kernels__hostbuf_reserve(&ws->h_out, out_bytes, err)))
        goto out;

    {
        /* Stage the inputs in pinned memory and upload them. */
        char *h = (char *)ws->h_in.p;
        memcpy(h, a->queries + (size_t)q0 * dim, (size_t)nb * dim * 4);
        uint32_t *meta = (uint32_t *)(h + (size_t)nb * dim * 4);
        uint32_t off = 0;
        for (uint32_t i = 0; i < nb; i++) {
            meta[i] = a->k[q0 + i];
            meta[nb + i] = off;
            off += a->k[q0 + i];
        }
        KCUDA(err, cudaMemcpyAsync(ws->qin.p, h, (size_t)nb * dim * 4, cudaMemcpyHostToDevice,
                                   ws->stream));
        KCUDA(err, cudaMemcpyAsync(ws->meta.p, meta, (size_t)nb * 8, cudaMemcpyHostToDevice,
                                   ws->stream));
        if (any_filter) {
            char *hf = h + (size_t)nb * dim * 4 + (size_t)nb * 8;
            memcpy(hf, a->filters + q0, (size_t)nb * sizeof(kernels_filter));
            KCUDA(err, cudaMemcpyAsync(ws->filters.p, hf, (size_t)nb * sizeof(kernels_filter),
                                       cudaMemcpyHostToDevice, ws->stream));
        }
    }

    if (t->storage == KERNELS_STORAGE_FP16) {
        KERNELS_LAUNCH(search_prepare_queries<__half>, nb, 128, 0, ws->stream)
        ((const float *)ws->qin.p, dim, dpad, (__half *)ws->qdev.p, (float *)ws->qnorm.p);
    } else {
        KERNELS_LAUNCH(search_prepare_queries<float>, nb, 128, 0, ws->stream)
        ((const float *)ws->qin.p, dim, dpad, (float *)ws->qdev.p, (float *)ws->qnorm.p);
    }
    KLAUNCH(err);

    {
        const cudaDataType_t ab = t->storage == KERNELS_STORAGE_FP16 ? CUDA_R_16F : CUDA_R_32F;
        const float alpha = 1.0f, beta = 0.0f;
        uint32_t p = 0; /* best[p] holds the running best of the tiles done so far */
        if (fused) {
            unsigned long long *best = (unsigned long long *)ws->best[0].p;
            if ((rc = search_fused_scan(t, ws->qdev.p, nb, kmax, kb,
                                        any_filter ? (const kernels_filter *)ws->filters.p : NULL,
                                        (const uint32_t *)ws->arena.p, fblocks, fseg,
                                        fblocks > 1 ? (unsigned long long *)ws->cand[0].p : best,
                                        fblocks > 1 ? fblocks * kmax : kmax, ws->stream, err)))
                goto out;
            if (fblocks > 1 &&
                (rc = search_merge(ws, fblocks * kmax, nb, kb, kmax, target_blocks, best, err)))
                goto out;
        }
        for (uint32_t ti = 0; ti < ntiles; ti++) {
            const uint32_t rb = ti * tile;
            const uint32_t rows = n - rb < tile ? n - rb : tile;
            const char *x = (const char *)t->vectors + (size_t)rb * dpad * esz;
            KCUBLAS(err, cublasGemmEx(ws->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)nb,
                                      (int)dpad, &alpha, x, ab, (int)dpad, ws->qdev.p, ab,
                                      (int)dpad, &beta, ws->scores.p, CUDA_R_32F, (int)tile,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));

            unsigned long long *prev = (unsigned long long *)ws->best[p].p;
            unsigned long long *next = (unsigned long long *)ws->best[1 - p].p;
            select_args s;
            memset(&s, 0, sizeof s);
            s.expl = ti > 0 ? prev : NULL;
            s.expl_stride = kmax;
            s.expl_len = ti > 0 ? kmax : 0;
            s.scores = (const float *)ws->scores.p;
            s.ld = tile;
            s.impl_len = rows;
            s.impl_seg = seg.length;
            s.row_base = rb;
            s.norms = l2 ? t->norms : NULL;
            s.filters = any_filter ? (const kernels_filter *)ws->filters.p : NULL;
            s.arena = (const uint32_t *)ws->arena.p;
            s.cols = kernels__cols(t);
            s.prior = ti > 0 ? prev : NULL;
            s.prior_stride = kmax;
            s.prior_index = kmax - 1;
            s.k = kmax;
            if (seg.count == 1) {
                s.out = next;
                s.out_stride = kmax;
            } else {
                s.out = (unsigned long long *)ws->cand[0].p;
                s.out_stride = seg.count * kmax;
            }
            if ((rc = search_select(&s, kb, seg.count, nb, ws->stream, err))) goto out;
            /* Merge levels: segment lists -> new running best. */
            if (seg.count > 1 &&
                (rc = search_merge(ws, seg.count * kmax, nb, kb, kmax, target_blocks, next, err)))
                goto out;
            p = 1 - p;
        }

        KERNELS_LAUNCH(search_decode, nb, 256, 0, ws->stream)
        ((const unsigned long long *)ws->best[p].p, kmax, (const uint32_t *)ws->meta.p, nb,
         (const float *)ws->qnorm.p, l2 ? 1 : 0, (uint32_t *)ws->out_rows.p,
         (float *)ws->out_scores.p, (uint32_t *)ws->out_counts.p);
        KLAUNCH(err);
    }

    {
        char *h = (char *)ws->h_out.p;
        uint32_t *h_rows = (uint32_t *)h;
        float *h_scores = (float *)(h + total_out * 4);
        uint32_t *h_counts = (uint32_t *)(h + total_out * 8);
        KCUDA(err, cudaMemcpyAsync(h_rows, ws->out_rows.p, total_out * 4, cudaMemcpyDeviceToHost,
                                   ws->stream));
        KCUDA(err, cudaMemcpyAsync(h_scores, ws->out_scores.p, total_out * 4,
                                   cudaMemcpyDeviceToHost, ws->stream));
        KCUDA(err, cudaMemcpyAsync(h_counts, ws->out_counts.p, (size_t)nb * 4,
                                   cudaMemcpyDeviceToHost, ws->stream));
        KCUDA(err, cudaStreamSynchronize(ws->stream));
        memcpy(a->out_rows + out_base, h_rows, total_out * 4);
        memcpy(a->out_scores + out_base, h_scores, total_out * 4);
        memcpy(a->out_counts + q0, h_counts, (size_t)nb * 4);
    }
out:
    return rc;
}

int kernels_search(kernels_workspace *ws, const kernels_table *t, const kernels_search_args *a,
                   kernels_err *err)
{
    int rc = 0;
    bool any_filter = false;
    size_t out_base = 0;
    if (!ws || !t || !a ||
        (a->nq && (!a->queries || !a->k || !a->out_rows || !a->out_scores || !a->out_counts)))
        return kernels__fail(err, AFF_EINVAL, "kernels_search: missing argument");
    for (uint32_t i = 0; i < a->nq; i++) {
        if (a->k[i] == 0 || a->k[i] > KERNELS_MAX_K)
            return kernels__fail(err, AFF_EINVAL, "query %u: k %u outside 1..%u", i, a->k[i],
                                 KERNELS_MAX_K);
        if (a->filters && a->filters[i].flags) any_filter = true;
    }
    if (a->elapsed_ms) *a->elapsed_ms = 0.0f;
    if (a->nq == 0) return 0;
    if (t->count == 0) {
        memset(a->out_counts, 0, (size_t)a->nq * sizeof *a->out_counts);
        return 0;
    }

    KCUDA(err, cudaSetDevice(ws->dev->ordinal));
    KCUDA(err, cudaEventRecord(ws->ev_start, ws->stream));
    if (any_filter && a->arena_words) {
        size_t bytes = (size_t)a->arena_words * 4;
        if ((rc = kernels__buf_reserve(&ws->arena, bytes, err)) ||
            (rc = kernels__hostbuf_reserve(&ws->h_in, bytes, err)))
            goto out;
        memcpy(ws->h_in.p, a->arena, bytes);
        KCUDA(err,
              cudaMemcpyAsync(ws->arena.p, ws->h_in.p, bytes, cudaMemcpyHostToDevice, ws->stream));
        /* h_in is reused by the chunks below. */
        KCUDA(err, cudaStreamSynchronize(ws->stream));
    }
    for (uint32_t q0 = 0; q0 < a->nq; q0 += ws->max_batch) {
        uint32_t nb = a->nq - q0 < ws->max_batch ? a->nq - q0 : ws->max_batch;
        if ((rc = search_chunk(ws, t, a, q0, nb, out_base, any_filter, err))) goto out;
        for (uint32_t i = 0; i < nb; i++)
            out_base += a->k[q0 + i];
    }
    KCUDA(err, cudaEventRecord(ws->ev_stop, ws->stream));
    KCUDA(err, cudaEventSynchronize(ws->ev_stop));
    if (a->elapsed_ms) KCUDA(err, cudaEventElapsedTime(a->elapsed_ms, ws->ev_start, ws->ev_stop));
out:
    /* A failure may leave uploads, kernels and downloads queued: drain them before the pinned
     * buffers and scratch can be reused by the next call (or freed by a growing reserve). */
    if (rc) kernels__drain(ws->stream);
    return rc;
}

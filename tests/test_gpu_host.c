/*
 * The CUDA backend's host-side logic, checked without a device: ordered keys, k buckets, tile
 * and segment plans, the select pipeline's tiling and merging (simulated on the CPU with the
 * same plans and block ranges the kernels use), the device filter predicate against
 * backend_filter_matches(), move batching against sequential application, write dedupe and
 * capacity growth. The helpers under test live in kernels/affinity_kernels.h (static inline,
 * shared with the .cu files) and src/gpu_plan.c, so this suite runs in CI with or without CUDA.
 * Random tests print their seed.
 */
#include "gpu_plan.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "test_rng.h"

/* ---- ordered keys ------------------------------------------------------------------------- */

/* The result order the keys must reproduce: higher score first (NaN below everything, -0 equal
 * to +0), then lower row. */
static bool ref_better(float sa, uint32_t ra, float sb, uint32_t rb)
{
    bool na = isnan(sa), nb = isnan(sb);
    if (na != nb) return nb;
    if (!na && sa != sb) return sa > sb;
    return ra < rb;
}

static float pick_score(void)
{
    static const float special[] = {0.0f, -0.0f, 1.0f, -1.0f, 1e-38f, -1e-38f, 3e38f, -3e38f};
    switch (rng() % 6) {
    case 0:
        return special[rng() % 8];
    case 1:
        return (rng() & 1) ? INFINITY : -INFINITY;
    case 2:
        return NAN;
    default:
        return (float)((int)(rng() % 2001) - 1000) / 64.0f;
    }
}

Test(gpu_host, keys_order_like_score_then_row)
{
    seed_test();
    for (int i = 0; i < 200000; i++) {
        float sa = pick_score(), sb = pick_score();
        uint32_t ra = rng() % 64, rb = rng() % 64;
        if (rng() % 4 == 0) ra = KERNELS_MAX_ROWS - (rng() % 3);
        if (ra == rb && sa == sb) continue;
        if (ra == rb) continue; /* keys are only compared for distinct rows */
        uint64_t ka = kernels_key(sa, ra), kb = kernels_key(sb, rb);
        cr_assert_eq(ka > kb, ref_better(sa, ra, sb, rb), "(%g,%u) vs (%g,%u)", sa, ra, sb, rb);
        cr_assert_neq(ka, 0u, "a real candidate is never the sentinel");
        cr_assert_eq(kernels_key_row(ka), ra);
        float back = kernels_key_score(ka);
        if (isnan(sa))
            cr_assert(isnan(back));
        else
            cr_assert(back == sa && !signbit(back) == !(signbit(sa) && sa != 0.0f),
                      "%g came back as %g", sa, back);
    }
}

Test(gpu_host, sentinel_loses_to_every_candidate)
{
    cr_assert_eq(kernels_key_row(0), UINT32_MAX);
    cr_assert_gt(kernels_key(NAN, KERNELS_MAX_ROWS), 0u);
    cr_assert_gt(kernels_key(-INFINITY, 0), kernels_key(NAN, 0));
}

/* ---- plans ---------------------------------------------------------------------------------- */

Test(gpu_host, k_buckets_are_powers_of_two_covering_k)
{
    cr_assert_eq(kernels_k_bucket(0), 0);
    cr_assert_eq(kernels_k_bucket(1), 32);
    cr_assert_eq(kernels_k_bucket(32), 32);
    cr_assert_eq(kernels_k_bucket(33), 64);
    cr_assert_eq(kernels_k_bucket(256), 256);
    cr_assert_eq(kernels_k_bucket(257), 512);
    cr_assert_eq(kernels_k_bucket(1000), 1024);
    cr_assert_eq(kernels_k_bucket(2048), 2048);
    cr_assert_eq(kernels_k_bucket(2049), 0);
    for (uint32_t k = 1; k <= KERNELS_MAX_K; k++) {
        uint32_t b = kernels_k_bucket(k);
        cr_assert(b >= k && (b & (b - 1)) == 0 && (b == 32 || b / 2 < k), "k %u bucket %u", k, b);
    }
}

Test(gpu_host, padded_rows_are_16_byte_aligned)
{
    for (uint32_t d = 1; d <= 300; d++) {
        uint32_t h = kernels_padded_dim(d, KERNELS_STORAGE_FP16);
        uint32_t f = kernels_padded_dim(d, KERNELS_STORAGE_FP32);
        cr_assert(h >= d && h < d + 8 && (h * 2) % 16 == 0);
        cr_assert(f >= d && f < d + 4 && (f * 4) % 16 == 0);
    }
}

Test(gpu_host, tile_rows_respect_budget_and_cover_small_tables)
{
    seed_test();
    for (int i = 0; i < 20000; i++) {
        uint32_t n = rng() % 20000000 + 1, b = rng() % 4096 + 1;
        uint64_t budget = (uint64_t)(rng() % 64 + 1) << 20;
        uint32_t t = kernels_plan_tile_rows(n, b, budget);
        cr_assert(t >= 256 && t % 256 == 0, "tile %u", t);
        cr_assert(t == 256 || (uint64_t)t * b * 4 <= budget, "tile %u over budget", t);
        cr_assert(t <= (n + 255) / 256 * 256 || t == 256);
    }
    cr_assert_eq(kernels_plan_tile_rows(1000, 1, 32u << 20), 1024);
}

Test(gpu_host, segments_cover_the_list_and_shrink_it)
{
    seed_test();
    for (int i = 0; i < 50000; i++) {
        uint32_t len = rng() % 10000000 + 1, b = rng() % 2048 + 1;
        uint32_t kb = kernels_k_bucket(rng() % KERNELS_MAX_K + 1);
        kernels_segments s = kernels_plan_segments(len, b, kb, 528);
        cr_assert_geq(s.count, 1);
        cr_assert_geq((uint64_t)s.count * s.length, len, "segments miss elements");
        cr_assert_lt((uint64_t)(s.count - 1) * s.length, len, "an empty segment");
        if (s.count > 1) {
            cr_assert_geq(s.length, 8 * kb - 255, "segment %u too short for k %u", s.length, kb);
            cr_assert_leq(s.count, (528 + b - 1) / b);
        }
    }
}

/* ---- the select pipeline, simulated ------------------------------------------------------------
 */

static int cmp_key_desc(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x < y) - (x > y);
}

/* What one selection block computes: the k largest keys of its range (floored by the prior for
 * implicit candidates, which must also pass `pass`), padded with 0. */
static void sim_block(const uint64_t *expl, const float *scores, uint32_t row_base,
                      kernels_block_range r, uint64_t prior, const bool *pass, uint32_t k,
                      uint64_t *out)
{
    uint32_t n = r.n_expl + r.n_impl;
    uint64_t *tmp = calloc(n + 1, sizeof *tmp);
    uint32_t m = 0;
    for (uint32_t i = 0; i < r.n_expl; i++)
        if (expl[r.expl_begin + i]) tmp[m++] = expl[r.expl_begin + i];
    for (uint32_t i = 0; i < r.n_impl; i++) {
        uint32_t row = row_base + r.impl_begin + i;
        uint64_t c = kernels_key(scores[r.impl_begin + i], row);
        if (c > prior && pass[row]) tmp[m++] = c;
    }
    qsort(tmp, m, sizeof *tmp, cmp_key_desc);
    for (uint32_t j = 0; j < k; j++)
        out[j] = j < m ? tmp[j] : 0;
    free(tmp);
}

/* One query through the search.cu loop: tiles, segments, prior bound, merge levels. */
static void sim_search(const float *scores, const bool *pass, uint32_t n, uint32_t k,
                       uint32_t batch, uint64_t budget, uint64_t *best)
{
    const uint32_t kb = kernels_k_bucket(k), target = 528;
    const uint32_t tile = kernels_plan_tile_rows(n, batch, budget);
    const kernels_segments seg = kernels_plan_segments(tile, batch, kb, target);
    uint64_t *prev = calloc(k, 8), *next = calloc(k, 8);
    uint64_t *cand[2] = {calloc((size_t)seg.count * k, 8), calloc((size_t)seg.count * k, 8)};
    for (uint32_t rb = 0, ti = 0; rb < n; rb += tile, ti++) {
        uint32_t rows = n - rb < tile ? n - rb : tile;
        uint64_t prior = ti > 0 ? prev[k - 1] : 0;
        for (uint32_t s = 0; s < seg.count; s++) {
            kernels_block_range r = kernels_select_range(ti > 0 ? k : 0, 0, rows, seg.length, s);
            sim_block(prev, scores + rb, rb, r, prior, pass, k,
                      seg.count == 1 ? next : cand[0] + (size_t)s * k);
        }
        uint32_t len = seg.count * k, c = 0;
        bool more = seg.count > 1;
        while (more) {
            kernels_segments ms = kernels_plan_segments(len, batch, kb, target);
            for (uint32_t s = 0; s < ms.count; s++) {
                kernels_block_range r = kernels_select_range(len, ms.length, 0, 0, s);
                sim_block(cand[c], NULL, 0, r, 0, pass, k,
                          ms.count == 1 ? next : cand[1 - c] + (size_t)s * k);
            }
            more = ms.count > 1;
            len = ms.count * k;
            c = 1 - c;
        }
        uint64_t *t = prev;
        prev = next;
        next = t;
    }
    memcpy(best, prev, (size_t)k * 8);
    free(prev);
    free(next);
    free(cand[0]);
    free(cand[1]);
}

Test(gpu_host, tiled_selection_equals_a_full_sort)
{
    seed_test();
    for (int round = 0; round < 60; round++) {
        uint32_t n = rng() % 200000 + 1;
        uint32_t k = (rng() % 3 == 0) ? rng() % KERNELS_MAX_K + 1 : rng() % 300 + 1;
        uint32_t batch = (rng() % 2) ? 1 : rng() % 64 + 1;
        uint64_t budget = (uint64_t)(rng() % 8 + 1) << 14; /* small: many tiles */
        float *scores = malloc((size_t)n * sizeof *scores);
        bool *pass = malloc(n);
        uint64_t *all = malloc((size_t)n * 8), *best = malloc((size_t)k * 8);
        uint32_t levels = rng() % 3 == 0 ? 4 : 100000; /* few distinct values: many ties */
        uint32_t m = 0;
        for (uint32_t i = 0; i < n; i++) {
            scores[i] = (float)(rng() % levels) - (float)levels / 2;
            pass[i] = rng() % 5 != 0;
            if (pass[i]) all[m++] = kernels_key(scores[i], i);
        }
        qsort(all, m, 8, cmp_key_desc);
        sim_search(scores, pass, n, k, batch, budget, best);
        for (uint32_t j = 0; j < k; j++)
            cr_assert_eq(best[j], j < m ? all[j] : 0, "n %u k %u batch %u: position %u", n, k,
                         batch, j);
        free(scores);
        free(pass);
        free(all);
        free(best);
    }
}

/* ---- filters ----------------------------------------------------------------------------------
 */

Test(gpu_host, device_filter_agrees_with_the_reference)
{
    seed_test();
    enum { ROWS = 400, QUERIES = 300 };
    static backend_row_attrs attrs[ROWS];
    static uint32_t cat[ROWS], flags[ROWS], tags[ROWS * KERNELS_MAX_TAGS];
    static float price[ROWS];
    static uint64_t bloom[ROWS];
    for (uint32_t r = 0; r < ROWS; r++) {
        backend_row_attrs *a = &attrs[r];
        memset(a, 0, sizeof *a);
        a->category = rng() % 200;
        a->price = (float)(rng() % 100);
        a->available = rng() % 2;
        a->n_tags = rng() % 5;
        uint32_t t = rng() % 20 + 1;
        for (uint32_t i = 0; i < a->n_tags; i++) {
            a->tags[i] = t;
            a->tag_bloom |= backend_tag_bit(t);
            t += rng() % 90 + 1;
        }
        cat[r] = a->category;
        price[r] = a->price;
        flags[r] = (a->available ? 1u : 0u) | (a->n_tags << 8);
        bloom[r] = a->tag_bloom;
        for (uint32_t i = 0; i < KERNELS_MAX_TAGS; i++)
            tags[r * KERNELS_MAX_TAGS + i] = i < a->n_tags ? a->tags[i] : 0;
    }
    kernels_attr_cols cols = {cat, price, flags, bloom, tags};

    static backend_filter fs[QUERIES];
    static const backend_filter *fp[QUERIES];
    static uint64_t catbits[QUERIES][4];
    static uint32_t ftags[QUERIES][8], excl[QUERIES][50];
    for (uint32_t q = 0; q < QUERIES; q++) {
        backend_filter *f = &fs[q];
        backend_filter_init(f);
        fp[q] = rng() % 8 == 0 ? NULL : f;
        if (rng() % 2) {
            f->category_words = rng() % 5; /* may be shorter than the category range */
            for (uint32_t w = 0; w < f->category_words; w++)
                catbits[q][w % 4] = ((uint64_t)rng() << 32) | rng();
            f->category_bits = catbits[q];
        }
        if (rng() % 2) {
            uint32_t t = rng() % 30 + 1;
            f->n_tags = rng() % 8 + 1;
            for (uint32_t i = 0; i < f->n_tags; i++) {
                ftags[q][i] = t;
                f->tag_bloom |= backend_tag_bit(t);
                t += rng() % 60 + 1;
            }
            f->tags = ftags[q];
        }
        if (rng() % 3 == 0) f->price_min = (float)(rng() % 50);
        if (rng() % 3 == 0) f->price_max = (float)(rng() % 100);
        f->available_only = rng() % 3 == 0;
        if (rng() % 2) {
            uint32_t r = rng() % 20;
            f->n_exclude_rows = rng() % 50;
            for (uint32_t i = 0; i < f->n_exclude_rows; i++) {
                excl[q][i] = r;
                r += rng() % 15 + 1;
            }
            f->exclude_rows = excl[q];
        }
    }
    kernels_filter enc[QUERIES];
    gpu_filter_arena arena = {0};
    cr_assert_eq(gpu_plan_encode_filters(fp, QUERIES, enc, &arena), 0);
    for (uint32_t q = 0; q < QUERIES; q++) {
        if (!fp[q]) cr_assert_eq(enc[q].flags, 0);
        for (uint32_t r = 0; r < ROWS; r++)
            cr_assert_eq(kernels_filter_pass(&enc[q], arena.words, &cols, r),
                         backend_filter_matches(fp[q], &attrs[r], r), "query %u row %u", q, r);
    }
    /* An initialized (empty) filter compiles to "match everything". */
    backend_filter empty;
    backend_filter_init(&empty);
    const backend_filter *ep = &empty;
    cr_assert_eq(gpu_plan_encode_filters(&ep, 1, enc, &arena), 0);
    cr_assert_eq(enc[0].flags, 0);
    cr_assert_eq(gpu_plan_encode_filters(NULL, 3, enc, &arena), 0);
    cr_assert_eq(enc[2].flags, 0);
    gpu_filter_arena_free(&arena);
}

/* ---- moves, dedupe, capacity -------------------------------------------------------------------
 */

Test(gpu_host, move_batches_match_sequential_moves)
{
    seed_test();
    enum { ROWS = 64 };
    for (int round = 0; round < 3000; round++) {
        uint32_t n = rng() % 40 + 1;
        uint32_t src[40], dst[40], ends[40], nb = 0;
        for (uint32_t i = 0; i < n; i++) {
            src[i] = rng() % ROWS;
            dst[i] = rng() % ROWS;
        }
        uint32_t seq[ROWS], par[ROWS];
        for (uint32_t r = 0; r < ROWS; r++)
            seq[r] = par[r] = r * 7 + 1;
        for (uint32_t i = 0; i < n; i++)
            seq[dst[i]] = seq[src[i]];
        cr_assert_eq(gpu_plan_move_batches(src, dst, n, ends, &nb), 0);
        cr_assert(nb >= 1 && nb <= n && ends[nb - 1] == n);
        for (uint32_t j = 0, b0 = 0; j < nb; b0 = ends[j], j++) {
            cr_assert_gt(ends[j], b0, "empty batch");
            uint32_t before[ROWS];
            memcpy(before, par, sizeof par);
            /* Parallel: every move reads the state before the batch. */
            for (uint32_t i = b0; i < ends[j]; i++)
                par[dst[i]] = before[src[i]];
        }
        cr_assert_arr_eq(seq, par, sizeof seq, "round %d: batches change the result", round);
    }
}

Test(gpu_host, engine_style_deletes_need_few_batches)
{
    /* Holes filled with the last rows: one batch unless a hole is itself a later source. */
    uint32_t src[] = {99, 98, 97}, dst[] = {3, 10, 50}, ends[3], nb;
    cr_assert_eq(gpu_plan_move_batches(src, dst, 3, ends, &nb), 0);
    cr_assert_eq(nb, 1);
    uint32_t src2[] = {9, 8}, dst2[] = {8, 3};
    cr_assert_eq(gpu_plan_move_batches(src2, dst2, 2, ends, &nb), 0);
    cr_assert_eq(nb, 2);
    cr_assert_eq(ends[0], 1);
}

Test(gpu_host, dedupe_keeps_the_last_write)
{
    uint32_t rows[] = {5, 7, 5, 9, 7, 7, 1}, keep[7], m;
    cr_assert_eq(gpu_plan_dedupe_rows(rows, 7, keep, &m), 0);
    uint32_t want[] = {2, 3, 5, 6};
    cr_assert_eq(m, 4);
    cr_assert_arr_eq(keep, want, sizeof want);
    uint32_t uniq[] = {3, 1, 2};
    cr_assert_eq(gpu_plan_dedupe_rows(uniq, 3, keep, &m), 0);
    cr_assert_eq(m, 3);
    cr_assert(keep[0] == 0 && keep[1] == 1 && keep[2] == 2);
}

Test(gpu_host, capacity_grows_geometrically)
{
    cr_assert_eq(gpu_plan_capacity(2000, 1500), 2000);
    cr_assert_eq(gpu_plan_capacity(0, 1), GPU_PLAN_MIN_CAPACITY);
    cr_assert_eq(gpu_plan_capacity(2000, 2001), 3000);
    cr_assert_eq(gpu_plan_capacity(2000, 10000), 10000);
    cr_assert_eq(gpu_plan_capacity(4000000000u, 4000000001ull), KERNELS_MAX_ROWS);
    /* Appending one row at a time grows O(log n) times. */
    uint32_t cap = 0, grows = 0;
    for (uint64_t n = 1; n <= 10000000; n++) {
        uint32_t c = gpu_plan_capacity(cap, n);
        if (c != cap) grows++;
        cap = c;
    }
    cr_assert_lt(grows, 40);
}

Test(gpu_host, bench_values_are_reproducible)
{
    /* Golden values shared with bench/torch_baseline.py (its self-check uses the same ones). */
    cr_assert_float_eq(kernels_bench_value(42, 0), kernels_bench_value(42, 0), 0);
    for (uint64_t i = 0; i < 100000; i++) {
        float v = kernels_bench_value(7, i * 7919);
        cr_assert(v >= -1.0f && v < 1.0f);
    }
    printf("bench values seed 1: %.9g %.9g %.9g\n", kernels_bench_value(1, 0),
           kernels_bench_value(1, 1), kernels_bench_value(1, 123456789));
}

/* The fused scan's blocks cover rows 0..n-1 exactly once, none empty, at most two per SM. */
Test(gpu_host, fused_blocks_cover_every_row_once)
{
    const uint32_t ns[] = {1, 127, 128, 129, 5000, 40000, 1000000, 10000000, 0xFFFFFF00u};
    const uint32_t sms[] = {1, 8, 132};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
        for (size_t j = 0; j < sizeof sms / sizeof sms[0]; j++) {
            uint32_t seg = 0, blocks = kernels_plan_fused_blocks(ns[i], sms[j], &seg);
            cr_assert_geq(blocks, 1);
            cr_assert_leq(blocks, 2 * sms[j], "n %u sm %u: %u blocks", ns[i], sms[j], blocks);
            cr_assert_eq(seg % 128, 0, "whole steps");
            cr_assert_geq((uint64_t)blocks * seg, ns[i], "n %u sm %u: rows left over", ns[i],
                          sms[j]);
            cr_assert_lt((uint64_t)(blocks - 1) * seg, ns[i], "n %u sm %u: an empty block", ns[i],
                         sms[j]);
        }
    cr_assert_eq(kernels_choose_path(32, 128, 1), KERNELS_PATH_FUSED);
    cr_assert_eq(kernels_choose_path(33, 32, 1), KERNELS_PATH_TILED);
    cr_assert_eq(kernels_choose_path(1, 256, 1), KERNELS_PATH_TILED);
    cr_assert_eq(kernels_choose_path(0, 32, 1), KERNELS_PATH_TILED);
}

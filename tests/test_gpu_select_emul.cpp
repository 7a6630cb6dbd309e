/*
 * The two top-k selection kernels (kernels/select_block.cu, kernels/select_radix.cu) run on the
 * CPU: each thread block is emulated by 256 OS threads sharing the kernel's __shared__
 * variables, with __syncthreads() as a barrier and shared atomics as CPU atomics, so the real
 * kernel code — queueing, flushing, bitonic sort, radix passes, block scans, the filter and the
 * prior bound — runs unchanged and is compared with a sort on the CPU. It cannot show GPU
 * memory-model or performance problems, but it checks the algorithms and their barriers
 * without a device; the device suites repeat the comparison on the GPU.
 *
 * The kernels come from tests/gpu_emul_kernels.cpp (the kernels library built against
 * tests/gpu_emul_runtime.h); this file calls their launchers. Random tests print their seed.
 */
#ifndef KERNELS_EMULATE
#define KERNELS_EMULATE 1
#endif

#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "select.cuh"

/* Launches the selection for bucket kb through the kernels' own launchers. */
static void run_select(const select_args &a, uint32_t kb, uint32_t segs, uint32_t queries)
{
    kernels_err err = {0, false, {0}};
    int rc = kb <= KERNELS_BLOCK_SELECT_MAX_K
                 ? select_block_launch(&a, kb, segs, queries, NULL, &err)
                 : select_radix_launch(&a, kb, segs, queries, NULL, &err);
    cr_assert_eq(rc, 0, "launch: %s", err.msg);
}

/* ---- inputs and the reference ------------------------------------------------------------------
 */

static uint64_t rng_state;

static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static void seed_test(void)
{
    unsigned seed = (unsigned)time(NULL) ^ (unsigned)clock() ^ (unsigned)getpid();
    rng_state = 0x9E3779B97F4A7C15ull ^ seed;
    printf("seed %u\n", seed);
    fflush(stdout);
}

enum order { ORDER_RANDOM, ORDER_ASCENDING, ORDER_TIES, ORDER_SPECIAL };

static float make_score(order o, uint32_t i)
{
    switch (o) {
    case ORDER_ASCENDING:
        return (float)i * 0.5f; /* every candidate beats the threshold: flush every step */
    case ORDER_TIES:
        return (float)(rng() % 3);
    case ORDER_SPECIAL: {
        static const float v[] = {INFINITY, -INFINITY, NAN, 0.0f, -0.0f, 1.0f, -1.0f, 3e38f};
        return rng() % 3 ? v[rng() % 8] : (float)(rng() % 100);
    }
    default:
        return (float)(rng() % 1000000) / 1000.0f - 500.0f;
    }
}

/* Row attributes and one filter (category any-of, exclusion list, price bound). */
struct filter_fixture {
    std::vector<uint32_t> cat, flags, tags;
    std::vector<float> price;
    std::vector<uint64_t> bloom;
    std::vector<uint32_t> arena;
    kernels_filter f[2];
    kernels_attr_cols cols;
};

static void make_filter(filter_fixture &fx, uint32_t rows)
{
    fx.cat.resize(rows);
    fx.flags.resize(rows);
    fx.tags.assign((size_t)rows * KERNELS_MAX_TAGS, 0);
    fx.price.resize(rows);
    fx.bloom.assign(rows, 0);
    for (uint32_t r = 0; r < rows; r++) {
        fx.cat[r] = rng() % 40;
        fx.flags[r] = rng() % 4 ? 1u : 0u;
        fx.price[r] = (float)(rng() % 100);
    }
    fx.arena.assign(2, 0);
    fx.arena[0] = rng();
    fx.arena[1] = rng();
    for (uint32_t r = rng() % 7; r < rows && fx.arena.size() < 2 + 500; r += rng() % 13 + 1)
        fx.arena.push_back(r);
    memset(fx.f, 0, sizeof fx.f);
    fx.f[0].flags = KERNELS_FILTER_CATEGORY | KERNELS_FILTER_EXCLUDE | KERNELS_FILTER_PRICE |
                    KERNELS_FILTER_AVAILABLE;
    fx.f[0].category_off = 0;
    fx.f[0].category_words32 = 2;
    fx.f[0].exclude_off = 2;
    fx.f[0].n_exclude = (uint32_t)fx.arena.size() - 2;
    fx.f[0].price_min = 10.0f;
    fx.f[0].price_max = 90.0f;
    fx.f[1].price_min = -INFINITY;
    fx.f[1].price_max = INFINITY; /* query 1: no filter */
    fx.cols = {fx.cat.data(), fx.price.data(), fx.flags.data(), fx.bloom.data(), fx.tags.data()};
}

static void expect_block(const select_args &a, uint32_t b, uint32_t s, const char *what)
{
    kernels_block_range r = kernels_select_range(a.expl_len, a.expl_seg, a.impl_len, a.impl_seg, s);
    unsigned long long prior = a.prior ? a.prior[(size_t)b * a.prior_stride + a.prior_index] : 0;
    std::vector<unsigned long long> want;
    for (uint32_t i = 0; i < r.n_expl; i++) {
        unsigned long long c = a.expl[(size_t)b * a.expl_stride + r.expl_begin + i];
        if (c) want.push_back(c);
    }
    for (uint32_t i = 0; i < r.n_impl; i++) {
        uint32_t j = r.impl_begin + i, row = a.row_base + j;
        float sc = a.scores[(size_t)b * a.ld + j];
        if (a.norms) sc = 2.0f * sc - a.norms[row];
        unsigned long long c = kernels_key(sc, row);
        if (c > prior && (!a.filters || kernels_filter_pass(&a.filters[b], a.arena, &a.cols, row)))
            want.push_back(c);
    }
    std::sort(want.begin(), want.end(), std::greater<unsigned long long>());
    const unsigned long long *got = a.out + (size_t)b * a.out_stride + (size_t)s * a.k;
    for (uint32_t j = 0; j < a.k; j++) {
        unsigned long long w = j < want.size() ? want[j] : 0ull;
        cr_assert_eq(got[j], w, "%s: query %u segment %u position %u: got %016llx want %016llx",
                     what, b, s, j, got[j], w);
    }
}

/* One tile-mode launch: 2 queries, implicit scores in segments, a running best list for
 * segment 0 and its k-th key as the prior bound, optional L2 norms and filter. */
static void tile_case(uint32_t kb, uint32_t k, uint32_t n, uint32_t seg_len, order o, bool l2,
                      bool filtered, bool with_prev)
{
    const uint32_t queries = 2, row_base = 5000, segs = (n + seg_len - 1) / seg_len;
    std::vector<float> scores((size_t)queries * n), norms(row_base + n);
    for (uint32_t b = 0; b < queries; b++)
        for (uint32_t i = 0; i < n; i++)
            scores[(size_t)b * n + i] = make_score(o, i);
    for (auto &v : norms)
        v = (float)(rng() % 50);
    /* The running best of earlier tiles: sorted keys of rows < row_base, zero-padded. */
    std::vector<unsigned long long> prev((size_t)queries * k, 0);
    if (with_prev) {
        for (uint32_t b = 0; b < queries; b++) {
            uint32_t m = rng() % 2 ? k : rng() % (k + 1);
            std::vector<unsigned long long> ks;
            for (uint32_t j = 0; j < m; j++)
                ks.push_back(kernels_key(make_score(ORDER_RANDOM, j), (j * 4999u) % row_base));
            std::sort(ks.begin(), ks.end(), std::greater<unsigned long long>());
            ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
            std::copy(ks.begin(), ks.end(), prev.begin() + (size_t)b * k);
        }
    }
    filter_fixture fx;
    make_filter(fx, row_base + n);
    std::vector<unsigned long long> out((size_t)queries * segs * k, 0xDEADull);
    select_args a;
    memset(&a, 0, sizeof a);
    a.expl = with_prev ? prev.data() : NULL;
    a.expl_stride = k;
    a.expl_len = with_prev ? k : 0;
    a.scores = scores.data();
    a.ld = n;
    a.impl_len = n;
    a.impl_seg = seg_len;
    a.row_base = row_base;
    a.norms = l2 ? norms.data() : NULL;
    a.filters = filtered ? fx.f : NULL;
    a.arena = fx.arena.data();
    a.cols = fx.cols;
    a.prior = with_prev ? prev.data() : NULL;
    a.prior_stride = k;
    a.prior_index = k - 1;
    a.out = out.data();
    a.out_stride = segs * k;
    a.k = k;
    run_select(a, kb, segs, queries);
    char what[128];
    snprintf(what, sizeof what, "tile kb %u k %u n %u seg %u order %d l2 %d filter %d prev %d", kb,
             k, n, seg_len, (int)o, l2, filtered, with_prev);
    for (uint32_t b = 0; b < queries; b++)
        for (uint32_t s = 0; s < segs; s++)
            expect_block(a, b, s, what);
}

/* One merge-mode launch over explicit key lists (unique rows, zeros mixed in). */
static void merge_case(uint32_t kb, uint32_t k, uint32_t len, uint32_t seg_len)
{
    const uint32_t queries = 2, segs = (len + seg_len - 1) / seg_len;
    std::vector<unsigned long long> in((size_t)queries * len);
    for (uint32_t b = 0; b < queries; b++)
        for (uint32_t i = 0; i < len; i++)
            in[(size_t)b * len + i] =
                rng() % 10 == 0 ? 0 : kernels_key(make_score(ORDER_TIES, i), i);
    std::vector<unsigned long long> out((size_t)queries * segs * k, 0xDEADull);
    select_args a;
    memset(&a, 0, sizeof a);
    a.expl = in.data();
    a.expl_stride = len;
    a.expl_len = len;
    a.expl_seg = seg_len;
    a.out = out.data();
    a.out_stride = segs * k;
    a.k = k;
    run_select(a, kb, segs, queries);
    char what[96];
    snprintf(what, sizeof what, "merge kb %u k %u len %u seg %u", kb, k, len, seg_len);
    for (uint32_t b = 0; b < queries; b++)
        for (uint32_t s = 0; s < segs; s++)
            expect_block(a, b, s, what);
}

/* ---- tests ------------------------------------------------------------------------------------
 */

static const uint32_t block_buckets[] = {32, 64, 128, 256};
static const uint32_t radix_buckets[] = {512, 1024, 2048};

static uint32_t pick_k(uint32_t kb)
{
    switch (rng() % 4) {
    case 0:
        return kb;
    case 1:
        return 1;
    case 2:
        return kb / 2 + 1;
    default:
        return rng() % kb + 1;
    }
}

Test(gpu_select_emul, block_select_matches_a_sort)
{
    seed_test();
    for (uint32_t kb : block_buckets) {
        for (int o = 0; o < 4; o++) {
            uint32_t k = pick_k(kb), n = rng() % 5000 + 1, seg = (rng() % 8 + 1) * 256;
            tile_case(kb, k, n, seg, (order)o, rng() % 2, rng() % 2, rng() % 2);
        }
        merge_case(kb, pick_k(kb), rng() % 4000 + 1, 1024);
    }
    /* Fewer candidates than k, and an empty segment. */
    tile_case(256, 256, 100, 256, ORDER_RANDOM, false, true, false);
    tile_case(32, 10, 300, 256, ORDER_TIES, false, false, true);
}

Test(gpu_select_emul, radix_select_matches_a_sort)
{
    seed_test();
    for (uint32_t kb : radix_buckets) {
        for (int o = 0; o < 4; o++) {
            uint32_t k = kb / 2 + 1 + rng() % (kb / 2), n = rng() % 9000 + 1;
            uint32_t seg = (rng() % 16 + 1) * 512;
            tile_case(kb, k, n, seg, (order)o, rng() % 2, rng() % 2, rng() % 2);
        }
        merge_case(kb, kb / 2 + 1 + rng() % (kb / 2), rng() % 12000 + 1, 4096);
    }
    /* Survivors that fit in shared memory, and a range that does not (passes re-read it). */
    tile_case(1024, 700, 2500, 4096, ORDER_RANDOM, false, false, true);
    tile_case(1024, 700, 20000, 32768, ORDER_RANDOM, true, false, false);
    merge_case(512, 300, 9000, 9000);
    tile_case(2048, 1500, 3072, 4096, ORDER_RANDOM, false, false, false); /* exactly fits */
    tile_case(2048, 1500, 3073, 4096, ORDER_RANDOM, false, false, false); /* one too many */
    /* All scores equal: the radix passes run into the row bits. */
    tile_case(512, 300, 3000, 4096, ORDER_TIES, false, false, false);
    tile_case(2048, 2048, 2047, 4096, ORDER_RANDOM, true, false, false);
    tile_case(2048, 2048, 6000, 8192, ORDER_SPECIAL, false, true, true);
}

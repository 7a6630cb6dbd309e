/*
 * test_pipeline.c: the ranking pipeline. pipeline_rank on plain arrays against brute-force
 * references (score order, boosts with the stated score rule, pins, promotion shares, the
 * category cap, diversity measured, exploration share and replay), rule validation naming
 * fields, and the whole service in process (a real CPU engine, batcher, store and profiles):
 * reasons naming the nearest history item, none-of filters, popularity with rules, presets
 * from a file with reload.
 */
#include <criterion/criterion.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "catalog.h"
#include "log.h"
#include "pipeline.h"
#include "rng.h"

/* ---- pipeline_rank on plain arrays -------------------------------------------------------- */

#define NC  200
#define DIM 8

typedef struct pool {
    char ids[NC][16];
    pipeline_candidate c[NC];
    float vec[NC][DIM];
    uint32_t n;
} pool;

/* n candidates with random scores (descending, as an engine returns them), categories
 * 1..n_cats, and per-category unit vectors with a little noise. */
static void pool_make(pool *p, uint32_t n, uint32_t n_cats, uint64_t seed)
{
    aff_rng r = {seed};
    p->n = n;
    float s = 1.0f;
    for (uint32_t i = 0; i < n; i++) {
        snprintf(p->ids[i], sizeof p->ids[i], "i%03u", i);
        s -= (float)(aff_rng_uniform(&r) * 0.01);
        uint32_t cat = 1 + (uint32_t)(aff_rng_next(&r) % n_cats);
        double norm = 0;
        for (int d = 0; d < DIM; d++) {
            p->vec[i][d] = (float)((d == (int)(cat % DIM) ? 1.0 : 0.0) + 0.05 * aff_rng_normal(&r));
            norm += p->vec[i][d] * p->vec[i][d];
        }
        for (int d = 0; d < DIM; d++)
            p->vec[i][d] /= (float)sqrt(norm);
        p->c[i] = (pipeline_candidate){.id = p->ids[i],
                                       .score = s,
                                       .category = cat,
                                       .matches = 1,
                                       .vector = p->vec[i],
                                       .organic = true};
    }
}

static pipeline_rank_input input(const pool *p, const pipeline_rules *r, uint32_t k,
                                 const pipeline_candidate *const *pinned)
{
    return (pipeline_rank_input){.rules = r,
                                 .k = k,
                                 .dim = DIM,
                                 .cands = p->c,
                                 .n = p->n,
                                 .pinned = pinned,
                                 .organic_reason = PIPELINE_REASON_MATCHES_VECTOR,
                                 .seed = 1};
}

static uint32_t rank(const pipeline_rank_input *in, pipeline_hit *out)
{
    uint32_t n = 0;
    aff_err err;
    cr_assert_eq(pipeline_rank(in, out, &n, &err), AFF_OK, "%s", err.msg);
    return n;
}

static int find(const pool *p, const char *id)
{
    for (uint32_t i = 0; i < p->n; i++)
        if (strcmp(p->ids[i], id) == 0) return (int)i;
    return -1;
}

/* The engine queries a ranked request makes: over-fetch for room to reorder, the cap inside
 * the organic query (doubled beside boosts), a promotion's k for its slots twice over. */
Test(pipeline_shape, rules_set_the_engine_queries)
{
    pipeline_rules r = {0};
    pipeline_query_shape sh = pipeline_query_shape_of(&r, 10);
    cr_assert(sh.organic_k == 10 && sh.organic_cap == 0 && sh.promotion_k == 0,
              "no rules: %u %u %u", sh.organic_k, sh.organic_cap, sh.promotion_k);
    r.has_max_per_category = true;
    r.max_per_category = 3;
    sh = pipeline_query_shape_of(&r, 10);
    cr_assert(sh.organic_k == 15 && sh.organic_cap == 3 && sh.promotion_k == 0, "cap: %u %u %u",
              sh.organic_k, sh.organic_cap, sh.promotion_k);
    pipeline_boost boost = {.weight = 0.05f};
    pipeline_promotion promos[2] = {{.name = "a", .share = 0.2f}, {.name = "b", .share = 0.5f}};
    r.boosts = &boost;
    r.n_boosts = 1;
    r.promotions = promos;
    r.n_promotions = 1;
    sh = pipeline_query_shape_of(&r, 10);
    cr_assert(sh.organic_k == 15 && sh.organic_cap == 6 && sh.promotion_k == 8,
              "cap, boost, promotion of 2 slots: %u %u %u", sh.organic_k, sh.organic_cap,
              sh.promotion_k);
    r.n_promotions = 2; /* the largest promotion sets every promotion's k: 5 slots */
    sh = pipeline_query_shape_of(&r, 10);
    cr_assert_eq(sh.promotion_k, 14);
    sh = pipeline_query_shape_of(&r, 40);
    cr_assert(sh.organic_k == 60 && sh.promotion_k == 44, "k 40: %u %u", sh.organic_k,
              sh.promotion_k);
    sh = pipeline_query_shape_of(&r, AFF_MAX_K);
    cr_assert(sh.organic_k == AFF_MAX_K && sh.promotion_k == AFF_MAX_K,
              "k at the limit stays there: %u %u", sh.organic_k, sh.promotion_k);
}

Test(pipeline_rank, no_rules_is_score_order)
{
    pool p;
    pool_make(&p, 50, 5, 7);
    pipeline_rules r = {0};
    pipeline_hit out[10];
    pipeline_rank_input in = input(&p, &r, 10, NULL);
    cr_assert_eq(rank(&in, out), 10);
    for (int i = 0; i < 10; i++) {
        cr_assert_str_eq(out[i].id, p.ids[i]);
        cr_assert_eq(out[i].reason.kind, PIPELINE_REASON_MATCHES_VECTOR);
    }
}

/* The reference: adjusted = score + sum of matching weights (ip) or score - sum (l2); take
 * the k best by adjusted score, ties by candidate order. */
static void boost_reference(const pool *p, const pipeline_rules *r, bool l2, uint32_t k,
                            char (*ids)[16], float *scores)
{
    float adj[NC];
    bool used[NC] = {0};
    for (uint32_t i = 0; i < p->n; i++) {
        float w = 0;
        for (uint32_t b = 0; b < r->n_boosts; b++)
            if (p->c[i].matches & (1u << (1 + b))) w += r->boosts[b].weight;
        adj[i] = l2 ? p->c[i].score - w : p->c[i].score + w;
    }
    for (uint32_t t = 0; t < k; t++) {
        int best = -1;
        for (uint32_t i = 0; i < p->n; i++) {
            if (used[i]) continue;
            if (best < 0 || (l2 ? adj[i] < adj[best] : adj[i] > adj[best])) best = (int)i;
        }
        used[best] = true;
        snprintf(ids[t], 16, "%s", p->ids[best]);
        scores[t] = adj[best];
    }
}

Test(pipeline_rank, boosts_and_buries_match_the_score_rule)
{
    for (int l2 = 0; l2 < 2; l2++) {
        for (uint64_t seed = 1; seed <= 20; seed++) {
            pool p;
            pool_make(&p, 100, 6, seed);
            aff_rng rng = {seed * 31};
            if (l2) /* l2: scores are distances, lower first, ascending from the engine */
                for (uint32_t i = 0; i < p.n; i++)
                    p.c[i].score = 2.0f - p.c[i].score;
            pipeline_boost boosts[3] = {{.weight = 0.02f}, {.weight = -0.03f}, {.weight = 0.5f}};
            for (uint32_t i = 0; i < p.n; i++)
                for (int b = 0; b < 3; b++)
                    if (aff_rng_uniform(&rng) < (b == 2 ? 0.02 : 0.3))
                        p.c[i].matches |= 1u << (1 + b);
            pipeline_rules r = {.boosts = boosts, .n_boosts = 3};
            pipeline_hit out[10];
            pipeline_rank_input in = input(&p, &r, 10, NULL);
            in.lower_is_better = l2;
            cr_assert_eq(rank(&in, out), 10);
            char ids[10][16];
            float scores[10];
            boost_reference(&p, &r, l2, 10, ids, scores);
            for (int i = 0; i < 10; i++) {
                cr_assert_str_eq(out[i].id, ids[i], "seed %llu l2 %d position %d",
                                 (unsigned long long)seed, l2, i);
                cr_assert_float_eq(out[i].score, scores[i], 1e-6);
            }
        }
    }
}

Test(pipeline_rank, pins_land_at_exact_positions)
{
    pool p;
    pool_make(&p, 60, 4, 3);
    /* one pinned item is a candidate (at rank 40), one is not a candidate at all */
    pipeline_candidate outside = {.id = "outside", .score = -1.0f, .matches = 1};
    const pipeline_candidate *pinned[2] = {&p.c[40], &outside};
    pipeline_pin pins[2] = {{.item_id = p.ids[40], .position = 1},
                            {.item_id = "outside", .position = 7}};
    pipeline_rules r = {.pins = pins, .n_pins = 2};
    pipeline_hit out[10];
    pipeline_rank_input in = input(&p, &r, 10, pinned);
    cr_assert_eq(rank(&in, out), 10);
    cr_assert_str_eq(out[0].id, p.ids[40]);
    cr_assert_eq(out[0].reason.kind, PIPELINE_REASON_PINNED);
    cr_assert_str_eq(out[6].id, "outside");
    cr_assert_eq(out[6].reason.kind, PIPELINE_REASON_PINNED);
    /* the other 8 slots: the best 8 candidates, in order */
    int o = 0;
    for (int i = 0; i < 10; i++) {
        if (i == 0 || i == 6) continue;
        cr_assert_str_eq(out[i].id, p.ids[o], "position %d", i + 1);
        o++;
    }
}

Test(pipeline_rank, promotion_share_is_exact_and_takes_the_best_matches)
{
    for (uint64_t seed = 1; seed <= 20; seed++) {
        pool p;
        pool_make(&p, 120, 5, seed);
        aff_rng rng = {seed};
        for (uint32_t i = 0; i < p.n; i++) /* promotion 0 is bit 1 (no boosts) */
            if (aff_rng_uniform(&rng) < 0.15) p.c[i].matches |= 2u;
        pipeline_promotion promo = {.name = "summer", .share = 0.3f};
        pipeline_rules r = {.promotions = &promo, .n_promotions = 1};
        pipeline_hit out[10];
        pipeline_rank_input in = input(&p, &r, 10, NULL);
        cr_assert_eq(rank(&in, out), 10);
        int promoted = 0;
        for (int i = 0; i < 10; i++) {
            if (out[i].reason.kind != PIPELINE_REASON_PROMOTED) continue;
            promoted++;
            cr_assert_str_eq(out[i].reason.promotion, "summer");
        }
        cr_assert_eq(promoted, 3, "seed %llu: %d promoted", (unsigned long long)seed, promoted);
        /* reference: the 3 best matching candidates are promoted; the 7 best of the rest are
         * organic; all are ordered by score (no diversity) */
        char want[10][16];
        int n_want = 0, got_promo = 0;
        bool used[NC] = {0};
        for (uint32_t i = 0; i < p.n && got_promo < 3; i++)
            if (p.c[i].matches & 2u) {
                used[i] = true;
                got_promo++;
            }
        int org = 0;
        for (uint32_t i = 0; i < p.n && org < 7; i++)
            if (!used[i]) {
                used[i] = true;
                org++;
            }
        for (uint32_t i = 0; i < p.n; i++)
            if (used[i]) snprintf(want[n_want++], 16, "%s", p.ids[i]);
        cr_assert_eq(n_want, 10);
        for (int i = 0; i < 10; i++)
            cr_assert_str_eq(out[i].id, want[i], "seed %llu position %d", (unsigned long long)seed,
                             i);
    }
}

Test(pipeline_rank, category_cap_holds_and_matches_greedy_reference)
{
    for (uint64_t seed = 1; seed <= 20; seed++) {
        pool p;
        pool_make(&p, 150, 4, seed);
        pipeline_rules r = {.has_max_per_category = true, .max_per_category = 2};
        pipeline_hit out[8];
        pipeline_rank_input in = input(&p, &r, 8, NULL);
        uint32_t n = rank(&in, out);
        cr_assert_eq(n, 8); /* 4 categories x 2 */
        uint32_t counts[8] = {0};
        uint32_t used = 0;
        for (uint32_t i = 0; i < p.n && used < 8; i++) {
            uint32_t cat = p.c[i].category;
            if (counts[cat] == 2) continue;
            counts[cat]++;
            cr_assert_str_eq(out[used].id, p.ids[i], "seed %llu", (unsigned long long)seed);
            used++;
        }
    }
}

static uint32_t distinct_categories(const pool *p, const pipeline_hit *h, uint32_t n)
{
    uint32_t seen = 0, count = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t cat = p->c[find(p, h[i].id)].category;
        if (!(seen & (1u << cat))) count++;
        seen |= 1u << cat;
    }
    return count;
}

Test(pipeline_rank, diversity_raises_distinct_categories_in_the_top_10)
{
    double sum[3] = {0};
    const float lambdas[3] = {0.0f, 0.3f, 0.8f};
    for (uint64_t seed = 1; seed <= 20; seed++) {
        pool p;
        /* 40 candidates, as the pipeline over-fetches for k = 10; the best-scored half is all
         * category 1, so without diversity the top 10 is one category */
        pool_make(&p, 40, 8, seed);
        for (uint32_t i = 0; i < 20; i++) {
            p.c[i].category = 1;
            memcpy(p.vec[i], p.vec[0], sizeof p.vec[i]);
            for (int d = 0; d < DIM; d++)
                p.vec[i][d] = d == 1 ? 1.0f : 0.0f;
        }
        for (int l = 0; l < 3; l++) {
            pipeline_rules r = {.has_diversity = true, .diversity = lambdas[l]};
            pipeline_hit out[10];
            pipeline_rank_input in = input(&p, &r, 10, NULL);
            cr_assert_eq(rank(&in, out), 10);
            sum[l] += distinct_categories(&p, out, 10);
        }
    }
    printf("distinct categories in the top 10 (mean of 20): lambda 0: %.2f, 0.3: %.2f, 0.8: %.2f\n",
           sum[0] / 20, sum[1] / 20, sum[2] / 20);
    cr_assert_eq(sum[0], 20.0, "lambda 0 keeps score order (one category)");
    cr_assert_gt(sum[1], sum[0]);
    cr_assert_geq(sum[2], sum[1]);
    cr_assert_gt(sum[2], 20.0 * 4, "lambda 0.8: most of the top 10 in distinct categories");
}

Test(pipeline_rank, exploration_share_is_exact_and_replayable)
{
    pool p;
    pool_make(&p, 100, 5, 11);
    pipeline_rules r = {.has_exploration = true, .exploration_share = 0.2f};
    pipeline_hit a[10], b[10], c[10];
    pipeline_rank_input in = input(&p, &r, 10, NULL);
    in.seed = 42;
    cr_assert_eq(rank(&in, a), 10);
    cr_assert_eq(rank(&in, b), 10);
    in.seed = 43;
    cr_assert_eq(rank(&in, c), 10);
    int explored = 0;
    bool differs = false;
    for (int i = 0; i < 10; i++) {
        cr_assert_str_eq(a[i].id, b[i].id, "same seed, same list");
        cr_assert_eq(a[i].reason.kind, b[i].reason.kind);
        differs |= strcmp(a[i].id, c[i].id) != 0;
        if (a[i].reason.kind == PIPELINE_REASON_EXPLORATION) {
            explored++;
            cr_assert_geq(find(&p, a[i].id), 8, "explored items come from beyond the top 8");
        }
    }
    cr_assert_eq(explored, 2);
    cr_assert(differs, "another seed explores other items");
}

Test(pipeline_rank, exploration_draws_novel_candidates_first)
{
    pool p;
    pool_make(&p, 30, 5, 12);
    /* novel: i020 (organic, far down the list) and i029, which is not organic but explorable
     * (a new item from the newest-items source); nothing else */
    p.c[20].novelty = PIPELINE_NOVEL_RARE;
    p.c[29].novelty = PIPELINE_NOVEL_NEW;
    p.c[29].organic = false;
    p.c[29].explorable = true;
    pipeline_rules r = {
        .has_exploration = true, .exploration_share = 0.2f, .exploration_rarely_shown_below = 1.0f};
    pipeline_hit a[10], b[10];
    pipeline_rank_input in = input(&p, &r, 10, NULL);
    in.favour_novel = true;
    for (uint64_t seed = 1; seed <= 20; seed++) {
        in.seed = seed;
        cr_assert_eq(rank(&in, a), 10);
        cr_assert_eq(rank(&in, b), 10);
        int explored = 0;
        for (int i = 0; i < 10; i++) {
            cr_assert_str_eq(a[i].id, b[i].id, "same seed, same list");
            if (a[i].reason.kind != PIPELINE_REASON_EXPLORATION) continue;
            explored++;
            cr_assert(strcmp(a[i].id, "i020") == 0 || strcmp(a[i].id, "i029") == 0,
                      "seed %llu explored %s, not a novel candidate", (unsigned long long)seed,
                      a[i].id);
        }
        cr_assert_eq(explored, 2, "both novel candidates, whatever the seed");
    }
    /* one novel candidate for two slots: it, and one uniform draw from the rest */
    p.c[29].novelty = 0;
    in.seed = 5;
    cr_assert_eq(rank(&in, a), 10);
    int novel = 0, explored = 0;
    for (int i = 0; i < 10; i++) {
        if (a[i].reason.kind != PIPELINE_REASON_EXPLORATION) continue;
        explored++;
        novel += strcmp(a[i].id, "i020") == 0;
    }
    cr_assert_eq(explored, 2);
    cr_assert_eq(novel, 1);
}

Test(exposure, served_counts_decay_and_first_upserts_stay)
{
    aff_exposure *x;
    aff_err err;
    cr_assert_eq(exposure_create(&x, 100.0, &err), AFF_OK);
    const char *ab[2] = {"a", "b"};
    const int64_t first[2] = {1000, 0};
    cr_assert_eq(exposure_note_upsert(x, "c", ab, first, 2, 5000, &err), AFF_OK);
    const int64_t later[1] = {9999};
    cr_assert_eq(exposure_note_upsert(x, "c", ab, later, 1, 9999, &err), AFF_OK);
    exposure_note_served(x, "c", ab, 1, 10000);
    exposure_note_served(x, "c", ab, 1, 10000);
    exposure_note_served(x, "other", ab, 1, 10000); /* another collection: nothing */
    exposure_info info[2];
    exposure_lookup(x, "c", ab, 2, 10000, info);
    cr_assert_eq(info[0].first_ms, 1000, "a known id keeps its first upsert");
    cr_assert_eq(info[1].first_ms, 5000, "0 means now");
    cr_assert_float_eq(info[0].served, 2.0f, 1e-6);
    cr_assert_float_eq(info[1].served, 0.0f, 1e-6);
    exposure_lookup(x, "c", ab, 1, 110000, info); /* one half-life later */
    cr_assert_float_eq(info[0].served, 1.0f, 1e-6);
    exposure_note_served(x, "c", ab, 1, 110000); /* 1 + 1 */
    exposure_lookup(x, "c", ab, 1, 210000, info);
    cr_assert_float_eq(info[0].served, 1.0f, 1e-6);
    char newest[4][AFF_MAX_ID_LEN + 1];
    cr_assert_eq(exposure_newest(x, "c", 0, newest, 4), 2);
    cr_assert_str_eq(newest[0], "b");
    cr_assert_str_eq(newest[1], "a");
    cr_assert_eq(exposure_newest(x, "c", 2000, newest, 4), 1, "a is older than 2000");
    exposure_forget(x, "c", ab, 1);
    exposure_lookup(x, "c", ab, 2, 10000, info);
    cr_assert_eq(info[0].first_ms, 0, "forgotten");
    cr_assert_eq(info[1].first_ms, 5000, "b moved into a's slot, intact");
    cr_assert_eq(exposure_newest(x, "c", 0, newest, 4), 1);
    exposure_drop(x, "c");
    exposure_lookup(x, "c", ab, 2, 10000, info);
    cr_assert_eq(info[1].first_ms, 0);
    exposure_destroy(x);
}

Test(pipeline_rank, combined_rules_keep_every_guarantee)
{
    for (uint64_t seed = 1; seed <= 30; seed++) {
        pool p;
        pool_make(&p, 200, 6, seed);
        aff_rng rng = {seed + 99};
        for (uint32_t i = 0; i < p.n; i++) {
            if (aff_rng_uniform(&rng) < 0.3) p.c[i].matches |= 2u; /* boost 0 */
            if (aff_rng_uniform(&rng) < 0.2) p.c[i].matches |= 4u; /* promotion 0 */
        }
        pipeline_boost boost = {.weight = 0.05f};
        pipeline_promotion promo = {.name = "p", .share = 0.2f};
        pipeline_pin pin = {.item_id = p.ids[150], .position = 3};
        const pipeline_candidate *pinned[1] = {&p.c[150]};
        pipeline_rules r = {.boosts = &boost,
                            .n_boosts = 1,
                            .promotions = &promo,
                            .n_promotions = 1,
                            .pins = &pin,
                            .n_pins = 1,
                            .has_max_per_category = true,
                            .max_per_category = 3,
                            .has_diversity = true,
                            .diversity = 0.3f,
                            .has_exploration = true,
                            .exploration_share = 0.1f};
        pipeline_hit out[10];
        pipeline_rank_input in = input(&p, &r, 10, pinned);
        in.seed = seed;
        cr_assert_eq(rank(&in, out), 10);
        cr_assert_str_eq(out[2].id, p.ids[150]);
        uint32_t counts[8] = {0};
        int promoted = 0, explored = 0;
        for (int i = 0; i < 10; i++) {
            for (int j = 0; j < i; j++)
                cr_assert_str_neq(out[i].id, out[j].id, "an item twice");
            if (i != 2) counts[p.c[find(&p, out[i].id)].category]++;
            promoted += out[i].reason.kind == PIPELINE_REASON_PROMOTED;
            explored += out[i].reason.kind == PIPELINE_REASON_EXPLORATION;
            if (out[i].reason.kind == PIPELINE_REASON_PROMOTED)
                cr_assert(p.c[find(&p, out[i].id)].matches & 4u);
        }
        for (int cat = 0; cat < 8; cat++)
            cr_assert_leq(counts[cat], 3, "category %d over the cap", cat);
        cr_assert_eq(promoted, 2);
        cr_assert_eq(explored, 1);
    }
}

/* ---- rule validation ------------------------------------------------------------------------ */

static void expect_invalid(const pipeline_rules *r, uint32_t k, const char *field)
{
    aff_err err = {0};
    cr_assert_eq(pipeline_validate_rules(r, k, "rules", &err), AFF_EINVAL, "%s accepted", field);
    cr_assert(strstr(err.msg, field), "message \"%s\" does not name %s", err.msg, field);
}

Test(pipeline_rules, every_bad_rule_names_its_field)
{
    pipeline_rules r = {.has_diversity = true, .diversity = 1.5f};
    expect_invalid(&r, 10, "rules.diversity");
    r = (pipeline_rules){.has_diversity = true, .diversity = -0.1f};
    expect_invalid(&r, 10, "rules.diversity");
    r = (pipeline_rules){.has_exploration = true, .exploration_share = 1.2f};
    expect_invalid(&r, 10, "rules.exploration.share");
    r = (pipeline_rules){.has_exploration = true,
                         .exploration_share = 0.1f,
                         .exploration_rarely_shown_below = -1.0f};
    expect_invalid(&r, 10, "rules.exploration.rarely_shown_below");
    r.exploration_rarely_shown_below = NAN;
    expect_invalid(&r, 10, "rules.exploration.rarely_shown_below");
    pipeline_promotion pr[2] = {{.name = "a", .share = 1.5f}, {.name = "b", .share = 0.2f}};
    aff_filter_init(&pr[0].filter);
    aff_filter_init(&pr[1].filter);
    const char *cat = "shoes";
    pr[0].filter.categories = &cat;
    pr[0].filter.n_categories = 1;
    pr[1].filter = pr[0].filter;
    r = (pipeline_rules){.promotions = pr, .n_promotions = 1};
    expect_invalid(&r, 10, "rules.promotions[0].share");
    pr[0].share = 0.9f;
    r = (pipeline_rules){.promotions = pr, .n_promotions = 2};
    expect_invalid(&r, 10, "add up to"); /* 0.9 + 0.2 > 1 */
    pr[1].name = "";
    pr[0].share = 0.1f;
    expect_invalid(&r, 10, "rules.promotions[1].name");
    pr[1].name = "b";
    aff_filter_init(&pr[1].filter);
    expect_invalid(&r, 10, "rules.promotions[1].filter");
    pipeline_pin pins[2] = {{.item_id = "x", .position = 11}, {.item_id = "y", .position = 2}};
    r = (pipeline_rules){.pins = pins, .n_pins = 1};
    expect_invalid(&r, 10, "rules.pins[0].position");
    pins[0].position = 2;
    r = (pipeline_rules){.pins = pins, .n_pins = 2};
    expect_invalid(&r, 10, "rules.pins[1].position");
    pins[1] = (pipeline_pin){.item_id = "x", .position = 3};
    expect_invalid(&r, 10, "rules.pins[1].item_id");
    pipeline_boost b = {.weight = NAN};
    aff_filter_init(&b.filter);
    b.filter.categories = &cat;
    b.filter.n_categories = 1;
    r = (pipeline_rules){.boosts = &b, .n_boosts = 1};
    expect_invalid(&r, 10, "rules.boosts[0].weight");
    b.weight = 1;
    aff_filter_init(&b.filter);
    expect_invalid(&r, 10, "rules.boosts[0].filter");
    /* and a good set passes */
    b.filter.categories = &cat;
    b.filter.n_categories = 1;
    pins[1].item_id = "y";
    r = (pipeline_rules){.boosts = &b,
                         .n_boosts = 1,
                         .pins = pins,
                         .n_pins = 2,
                         .promotions = pr,
                         .n_promotions = 1,
                         .has_diversity = true,
                         .diversity = 0.5f};
    aff_err err;
    cr_assert_eq(pipeline_validate_rules(&r, 10, "rules", &err), AFF_OK, "%s", err.msg);
}

/* ---- the service in process ---------------------------------------------------------------- */

#define SDIM    16
#define NCATS   4
#define PER_CAT 30
#define N_ITEMS (NCATS * PER_CAT)

static const char *const scats[NCATS] = {"shoes", "books", "garden", "toys"};

typedef struct svc {
    aff_store *store;
    aff_engine *engine;
    aff_catalog *catalog;
    aff_profiles *profiles;
    batcher *bat;
    aff_pipeline *pl;
    aff_exposure *exposure;
    char ids[N_ITEMS][16];
    float vec[N_ITEMS][SDIM];
} svc;

static void svc_start(svc *s, const char *presets)
{
    aff_log_set_level(AFF_LOG_WARN);
    aff_err err = {0};
    memset(s, 0, sizeof *s);
    store_config sc = {.dir = NULL};
    cr_assert_eq(store_create(&s->store, &sc, &err), AFF_OK, "%s", err.msg);
    profiles_config pc;
    profiles_config_init(&pc);
    cr_assert_eq(profiles_create(&s->profiles, s->store, &pc, &err), AFF_OK, "%s", err.msg);
    engine_config ec = {.backend = ENGINE_BACKEND_CPU, .faiss = {.threads = 1}};
    cr_assert_eq(engine_create(&s->engine, &ec, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(catalog_create(&s->catalog, s->engine, s->store, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(exposure_create(&s->exposure, EXPOSURE_DEFAULT_HALF_LIFE_S, &err), AFF_OK);
    catalog_attach_exposure(s->catalog, s->exposure);
    engine_collection_spec spec = {.name = "shop", .dim = SDIM, .metric = AFF_METRIC_COSINE};
    cr_assert_eq(catalog_create_collection(s->catalog, &spec, &err), AFF_OK, "%s", err.msg);
    aff_rng r = {5};
    float centroid[NCATS][SDIM];
    for (int c = 0; c < NCATS; c++)
        for (int d = 0; d < SDIM; d++)
            centroid[c][d] = (float)aff_rng_normal(&r);
    aff_item items[N_ITEMS];
    static const char *sale = "sale", *fresh = "new";
    for (int i = 0; i < N_ITEMS; i++) {
        int c = i / PER_CAT;
        snprintf(s->ids[i], sizeof s->ids[i], "%s-%02d", scats[c], i % PER_CAT);
        for (int d = 0; d < SDIM; d++)
            s->vec[i][d] = centroid[c][d] + 0.3f * (float)aff_rng_normal(&r);
        items[i] = (aff_item){.id = s->ids[i],
                              .vector = s->vec[i],
                              .dim = SDIM,
                              .attrs.category = scats[c],
                              .attrs.tags = i % 3 == 0   ? &sale
                                      : i % 3 == 1 ? &fresh
                                                   : NULL,
                              .attrs.n_tags = i % 3 == 2 ? 0 : 1,
                              .attrs.price = (float)(i % 10),
                              .attrs.available = true};
    }
    cr_assert_eq(catalog_upsert(s->catalog, "shop", items, N_ITEMS, &err), AFF_OK, "%s", err.msg);
    batcher_config bc = {.max_batch = 64, .max_wait_us = 100, .queue_limit = 1024};
    batcher_exec ex = batcher_engine_exec(s->engine);
    cr_assert_eq(batcher_create(&s->bat, &bc, &ex, &err), AFF_OK, "%s", err.msg);
    pipeline_config plc = {.engine = s->engine,
                           .batcher = s->bat,
                           .profiles = s->profiles,
                           .exposure = s->exposure,
                           .presets_path = presets};
    cr_assert_eq(pipeline_create(&s->pl, &plc, &err), AFF_OK, "%s", err.msg);
}

static void svc_stop(svc *s)
{
    batcher_destroy(s->bat);
    pipeline_destroy(s->pl);
    catalog_destroy(s->catalog);
    exposure_destroy(s->exposure);
    profiles_destroy(s->profiles);
    engine_destroy(s->engine);
    store_destroy(s->store);
}

typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
} waiter;

static void wake(pipeline_job *job, void *user)
{
    (void)job;
    waiter *w = user;
    pthread_mutex_lock(&w->mu);
    w->done = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* Runs req to completion; returns the start's error, or the job (destroy it). */
static int run(svc *s, const pipeline_request *req, pipeline_job **job, aff_err *err)
{
    waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false};
    bool pending;
    int rc = pipeline_start(s->pl, req, 0, wake, &w, job, &pending, err);
    if (rc) return rc;
    pthread_mutex_lock(&w.mu);
    while (pending && !w.done)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    return AFF_OK;
}

static void events(svc *s, const char *user, const int *items, int n)
{
    profiles_event ev[16];
    for (int i = 0; i < n; i++)
        ev[i] = (profiles_event){.item_id = s->ids[items[i]], .type = PROFILES_EVENT_VIEW};
    uint32_t applied = 0, n_rej = 0;
    profiles_rejection rej[16];
    aff_err err;
    cr_assert_eq(
        profiles_put_events(s->profiles, "shop", user, ev, (size_t)n, &applied, rej, &n_rej, &err),
        AFF_OK, "%s", err.msg);
    cr_assert_eq(applied, (uint32_t)n);
}

static int index_of(const svc *s, const char *id)
{
    for (int i = 0; i < N_ITEMS; i++)
        if (strcmp(s->ids[i], id) == 0) return i;
    return -1;
}

static float cosine(const float *a, const float *b)
{
    double ab = 0, aa = 0, bb = 0;
    for (int d = 0; d < SDIM; d++) {
        ab += (double)a[d] * b[d];
        aa += (double)a[d] * a[d];
        bb += (double)b[d] * b[d];
    }
    return (float)(ab / sqrt(aa * bb));
}

/* Recommends k = 20 for "ann" (history: items 3, 35, 70, 71) with rules (NULL: none) and
 * checks every SIMILAR_TO_HISTORY_ITEM reason against the nearest history item by brute force;
 * returns how many hits carry one. */
static uint32_t check_history_reasons(svc *s, const pipeline_rules *rules)
{
    const int hist[4] = {3, 35, 70, 71}; /* shoes, books, garden x2 */
    pipeline_request req = {.kind = PIPELINE_RECOMMEND,
                            .collection = "shop",
                            .user_id = "ann",
                            .k = 20,
                            .rules = rules};
    pipeline_job *job;
    aff_err err;
    cr_assert_eq(run(s, &req, &job, &err), AFF_OK, "%s", err.msg);
    const pipeline_output *o = pipeline_job_output(job);
    cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
    cr_assert_eq(o->source, PIPELINE_SOURCE_PROFILE);
    cr_assert_eq(strlen(o->recommendation_id), 32);
    cr_assert_eq(o->n_hits[0], 20);
    uint32_t n_similar = 0;
    for (uint32_t i = 0; i < o->n_hits[0]; i++) {
        const pipeline_hit *h = &o->hits[0][i];
        if (h->reason.kind != PIPELINE_REASON_SIMILAR_TO_HISTORY_ITEM) continue;
        n_similar++;
        int hi = index_of(s, h->id);
        int best = -1;
        float best_v = -2;
        for (int t = 0; t < 4; t++) {
            if (hist[t] == hi) continue;
            float v = cosine(s->vec[hi], s->vec[hist[t]]);
            if (v > best_v) {
                best_v = v;
                best = hist[t];
            }
        }
        cr_assert_str_eq(h->reason.related_id, s->ids[best], "hit %s", h->id);
    }
    pipeline_job_destroy(job);
    return n_similar;
}

Test(pipeline_service, reasons_name_the_nearest_history_item)
{
    svc s;
    svc_start(&s, NULL);
    const int hist[4] = {3, 35, 70, 71};
    events(&s, "ann", hist, 4);
    cr_assert_eq(check_history_reasons(&s, NULL), 20, "every hit is explained by the history");
    /* With a pin and diversity the candidates' rows are read for ranking and the reasons take
     * the hits' rows from them: the same nearest items. */
    pipeline_pin pin = {.item_id = s.ids[50], .position = 2};
    pipeline_rules rules = {.pins = &pin,
                            .n_pins = 1,
                            .has_diversity = true,
                            .diversity = 0.4f,
                            .has_max_per_category = true,
                            .max_per_category = 8};
    cr_assert_eq(check_history_reasons(&s, &rules), 19, "all but the pin");
    svc_stop(&s);
}

Test(pipeline_service, none_of_filters_exclude_categories_and_tags)
{
    svc s;
    svc_start(&s, NULL);
    const char *ex_cat[1] = {"shoes"}, *ex_tag[1] = {"sale"};
    aff_filter f;
    aff_filter_init(&f);
    f.exclude_categories = ex_cat;
    f.n_exclude_categories = 1;
    f.exclude_tags = ex_tag;
    f.n_exclude_tags = 1;
    pipeline_request req = {.kind = PIPELINE_RECOMMEND,
                            .collection = "shop",
                            .vector = s.vec[0], /* a shoe: shoes would win without the filter */
                            .dim = SDIM,
                            .k = 30,
                            .filter = &f};
    pipeline_job *job;
    aff_err err;
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    const pipeline_output *o = pipeline_job_output(job);
    cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
    /* brute force: the 30 best by cosine among items neither shoes nor tagged sale */
    bool ok[N_ITEMS];
    for (int i = 0; i < N_ITEMS; i++)
        ok[i] = i / PER_CAT != 0 && i % 3 != 0;
    cr_assert_eq(o->n_hits[0], 30);
    for (uint32_t r = 0; r < 30; r++) {
        int best = -1;
        for (int i = 0; i < N_ITEMS; i++)
            if (ok[i] && (best < 0 || cosine(s.vec[0], s.vec[i]) > cosine(s.vec[0], s.vec[best])))
                best = i;
        ok[best] = false;
        cr_assert_str_eq(o->hits[0][r].id, s.ids[best], "rank %u", r);
        cr_assert_eq(o->hits[0][r].reason.kind, PIPELINE_REASON_MATCHES_VECTOR);
    }
    pipeline_job_destroy(job);
    /* the popularity evaluator agrees */
    const int views[6] = {0, 1, 2, 31, 32, 33};
    events(&s, "pop", views, 6);
    req = (pipeline_request){.kind = PIPELINE_RECOMMEND,
                             .collection = "shop",
                             .user_id = "newcomer",
                             .k = 10,
                             .filter = &f};
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    o = pipeline_job_output(job);
    cr_assert_eq(o->source, PIPELINE_SOURCE_POPULARITY);
    cr_assert_eq(o->n_hits[0], 2, "books-01 and books-02 pass; shoes and sale-tagged do not");
    for (uint32_t i = 0; i < o->n_hits[0]; i++) {
        int idx = index_of(&s, o->hits[0][i].id);
        cr_assert(idx / PER_CAT != 0 && idx % 3 != 0, "%s passed", o->hits[0][i].id);
        cr_assert_eq(o->hits[0][i].reason.kind, PIPELINE_REASON_POPULAR);
    }
    pipeline_job_destroy(job);
    svc_stop(&s);
}

Test(pipeline_service, rules_on_similar_items_and_popularity)
{
    svc s;
    svc_start(&s, NULL);
    const char *promo_cat[1] = {"toys"};
    pipeline_promotion promo = {.name = "toy-week", .share = 0.4f};
    aff_filter_init(&promo.filter);
    promo.filter.categories = promo_cat;
    promo.filter.n_categories = 1;
    pipeline_pin pin = {.item_id = "garden-05", .position = 2};
    pipeline_rules rules = {.promotions = &promo, .n_promotions = 1, .pins = &pin, .n_pins = 1};
    const char *item = "shoes-00";
    pipeline_request req = {.kind = PIPELINE_SIMILAR,
                            .collection = "shop",
                            .item_ids = &item,
                            .n_item_ids = 1,
                            .k = 10,
                            .rules = &rules};
    pipeline_job *job;
    aff_err err;
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    const pipeline_output *o = pipeline_job_output(job);
    cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
    cr_assert_eq(o->n_hits[0], 10);
    int promoted = 0;
    for (uint32_t i = 0; i < 10; i++) {
        const pipeline_hit *h = &o->hits[0][i];
        cr_assert_str_neq(h->id, "shoes-00");
        if (i == 1) {
            cr_assert_str_eq(h->id, "garden-05");
            cr_assert_eq(h->reason.kind, PIPELINE_REASON_PINNED);
        } else if (h->reason.kind == PIPELINE_REASON_PROMOTED) {
            promoted++;
            cr_assert(strncmp(h->id, "toys-", 5) == 0);
            cr_assert_str_eq(h->reason.promotion, "toy-week");
        } else {
            cr_assert_eq(h->reason.kind, PIPELINE_REASON_SIMILAR_TO_ITEM);
            cr_assert_str_eq(h->reason.related_id, "shoes-00");
        }
    }
    cr_assert_eq(promoted, 4);
    pipeline_job_destroy(job);

    /* cold start with the same rules: popular items, pins and promotions still hold */
    const int views[3] = {10, 40, 41};
    events(&s, "someone", views, 3);
    req = (pipeline_request){.kind = PIPELINE_RECOMMEND,
                             .collection = "shop",
                             .user_id = "newcomer",
                             .k = 5,
                             .rules = &rules};
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    o = pipeline_job_output(job);
    cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
    cr_assert_eq(o->source, PIPELINE_SOURCE_POPULARITY);
    cr_assert_str_eq(o->hits[0][1].id, "garden-05");
    pipeline_job_destroy(job);

    /* a pinned id that does not exist */
    pin.item_id = "nope";
    req = (pipeline_request){.kind = PIPELINE_SIMILAR,
                             .collection = "shop",
                             .item_ids = &item,
                             .n_item_ids = 1,
                             .k = 10,
                             .rules = &rules};
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    o = pipeline_job_output(job);
    cr_assert_eq(o->status, AFF_EINVAL);
    cr_assert(strstr(o->err.msg, "rules.pins[0].item_id"), "%s", o->err.msg);
    pipeline_job_destroy(job);
    svc_stop(&s);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

Test(pipeline_service, presets_from_a_file_with_reload)
{
    char path[] = "/tmp/aff-presets-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    close(fd);
    write_file(path, "{\"presets\": {\"home\": {\"pins\": [{\"item_id\": \"books-07\", "
                     "\"position\": 1}], \"max_per_category\": 2}}}");
    svc s;
    svc_start(&s, path);
    pipeline_request req = {.kind = PIPELINE_RECOMMEND,
                            .collection = "shop",
                            .vector = s.vec[0],
                            .dim = SDIM,
                            .k = 6,
                            .preset = "home"};
    pipeline_job *job;
    aff_err err;
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    const pipeline_output *o = pipeline_job_output(job);
    cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
    cr_assert_str_eq(o->hits[0][0].id, "books-07");
    int shoes = 0;
    for (uint32_t i = 0; i < o->n_hits[0]; i++)
        shoes += strncmp(o->hits[0][i].id, "shoes-", 6) == 0;
    cr_assert_eq(shoes, 2, "the preset's cap");
    pipeline_job_destroy(job);

    req.preset = "nope";
    cr_assert_eq(run(&s, &req, &job, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "preset \"nope\""), "%s", err.msg);

    /* a request's pin at position 1 conflicts with the preset's: named */
    pipeline_pin pin = {.item_id = "toys-01", .position = 1};
    pipeline_rules rules = {.pins = &pin, .n_pins = 1};
    req.preset = "home";
    req.rules = &rules;
    cr_assert_eq(run(&s, &req, &job, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "rules.pins[1].position"), "%s", err.msg);
    req.rules = NULL;

    /* change the file: picked up within about a second */
    sleep(1);
    write_file(path, "{\"presets\": {\"home\": {\"pins\": [{\"item_id\": \"toys-03\", "
                     "\"position\": 1}]}, \"other\": {}}}");
    sleep(1);
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    cr_assert_str_eq(pipeline_job_output(job)->hits[0][0].id, "toys-03");
    pipeline_job_destroy(job);

    /* a bad file keeps the previous presets */
    sleep(1);
    write_file(path, "{\"presets\": {\"home\": {\"diversity\": 3}}}");
    cr_assert_eq(pipeline_reload_presets(s.pl, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "presets.home.diversity"), "%s", err.msg);
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    cr_assert_str_eq(pipeline_job_output(job)->hits[0][0].id, "toys-03");
    pipeline_job_destroy(job);
    svc_stop(&s);
    unlink(path);
}

/* ---- pages ------------------------------------------------------------------------------------
 */

static void page_wake(pipeline_page *page, void *user)
{
    (void)page;
    wake(NULL, user);
}

static int run_page(svc *s, const pipeline_page_request *req, pipeline_page **page, aff_err *err)
{
    waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false};
    bool pending;
    int rc = pipeline_page_start(s->pl, req, 0, page_wake, &w, page, &pending, err);
    if (rc) return rc;
    pthread_mutex_lock(&w.mu);
    while (pending && !w.done)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    return AFF_OK;
}

/* Every slot full, no id twice on the page, every hit with a reason. */
static void check_page(const pipeline_page_output *o, pipeline_reason_kind organic)
{
    cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
    cr_assert_eq(strlen(o->recommendation_id), 32);
    for (uint32_t s = 0; s < o->n_slots; s++) {
        cr_assert_eq(o->n_hits[s], o->slots[s].k, "slot %s: %u of %u", o->slots[s].name,
                     o->n_hits[s], o->slots[s].k);
        for (uint32_t i = 0; i < o->n_hits[s]; i++) {
            const pipeline_hit *h = &o->hits[s][i];
            cr_assert_neq(h->reason.kind, PIPELINE_REASON_UNSPECIFIED);
            if (h->reason.kind != PIPELINE_REASON_PINNED &&
                h->reason.kind != PIPELINE_REASON_PROMOTED)
                cr_assert_eq(h->reason.kind, organic, "%s", h->id);
            for (uint32_t t = 0; t <= s; t++)
                for (uint32_t j = 0; j < (t == s ? i : o->n_hits[t]); j++)
                    cr_assert_str_neq(o->hits[t][j].id, h->id, "%s twice on the page", h->id);
        }
    }
}

Test(pipeline_page, fills_every_slot_without_repeating_an_item)
{
    svc s;
    svc_start(&s, NULL);
    const int hist[3] = {0, 1, 2};
    events(&s, "ann", hist, 3);
    const char *toys[1] = {"toys"};
    aff_filter toy_filter;
    aff_filter_init(&toy_filter);
    toy_filter.categories = toys;
    toy_filter.n_categories = 1;
    pipeline_pin pin = {.item_id = "shoes-05", .position = 1};
    pipeline_rules pinned = {.pins = &pin, .n_pins = 1};
    pipeline_slot slots[4] = {
        {.name = "for-you", .collection = "shop", .k = 8},
        {.name = "more", .collection = "shop", .k = 8, .rules = &pinned}, /* shoes-05 is above */
        {.name = "toys", .collection = "shop", .k = 4, .filter = &toy_filter},
        {.name = "again", .collection = "shop", .k = 6},
    };
    pipeline_page_request req = {.user_id = "ann", .slots = slots, .n_slots = 4};
    pipeline_page *page;
    aff_err err;
    cr_assert_eq(run_page(&s, &req, &page, &err), AFF_OK, "%s", err.msg);
    const pipeline_page_output *o = pipeline_page_output_of(page);
    check_page(o, PIPELINE_REASON_SIMILAR_TO_HISTORY_ITEM);
    cr_assert_eq(o->sources[0], PIPELINE_SOURCE_PROFILE);
    bool first_has_pin = false;
    for (uint32_t i = 0; i < o->n_hits[0]; i++)
        first_has_pin |= strcmp(o->hits[0][i].id, "shoes-05") == 0;
    cr_assert(first_has_pin, "ann's own page starts with shoes, shoes-05 among them");
    for (uint32_t i = 0; i < o->n_hits[2]; i++)
        cr_assert(strncmp(o->hits[2][i].id, "toys-", 5) == 0);
    pipeline_page_destroy(page);

    /* a cold-start shopper gets a popular page: 24 items have events, the page asks for 24 */
    int popular[24];
    for (int i = 0; i < 24; i++)
        popular[i] = i * 5;
    events(&s, "crowd", popular, 12);
    events(&s, "crowd2", popular + 12, 12);
    slots[1].rules = NULL;
    slots[2].filter = NULL;
    slots[2].k = 2;
    req.user_id = "newcomer";
    cr_assert_eq(run_page(&s, &req, &page, &err), AFF_OK, "%s", err.msg);
    o = pipeline_page_output_of(page);
    check_page(o, PIPELINE_REASON_POPULAR);
    for (uint32_t i = 0; i < o->n_slots; i++)
        cr_assert_eq(o->sources[i], PIPELINE_SOURCE_POPULARITY);
    pipeline_page_destroy(page);
    slots[1].rules = &pinned;
    slots[2].filter = &toy_filter;
    slots[2].k = 4;

    /* errors name the slot */
    slots[3].k = 0;
    req.user_id = "ann";
    cr_assert_eq(run_page(&s, &req, &page, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "slots[3].k"), "%s", err.msg);
    slots[3].k = 6;
    slots[3].collection = "nope";
    cr_assert_eq(run_page(&s, &req, &page, &err), AFF_OK, "%s", err.msg);
    o = pipeline_page_output_of(page);
    cr_assert_eq(o->status, AFF_ENOTFOUND);
    cr_assert(strstr(o->err.msg, "slots[3] (again)"), "%s", o->err.msg);
    pipeline_page_destroy(page);
    svc_stop(&s);
}

Test(pipeline_page, layouts_come_from_the_serving_config)
{
    char path[] = "/tmp/aff-layouts-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    close(fd);
    write_file(path,
               "{\"presets\": {\"cap1\": {\"max_per_category\": 1}},"
               " \"layouts\": {\"home\": ["
               "  {\"name\": \"hero\", \"collection\": \"shop\", \"k\": 1},"
               "  {\"name\": \"mixed\", \"collection\": \"shop\", \"k\": 4, \"preset\": \"cap1\"},"
               "  {\"name\": \"books\", \"collection\": \"shop\", \"k\": 3,"
               "   \"filter\": {\"categories\": [\"books\"]}}]}}");
    svc s;
    svc_start(&s, path);
    const int hist[2] = {40, 41};
    events(&s, "bob", hist, 2);
    pipeline_page_request req = {.user_id = "bob", .layout = "home"};
    pipeline_page *page;
    aff_err err;
    cr_assert_eq(run_page(&s, &req, &page, &err), AFF_OK, "%s", err.msg);
    const pipeline_page_output *o = pipeline_page_output_of(page);
    check_page(o, PIPELINE_REASON_SIMILAR_TO_HISTORY_ITEM);
    cr_assert_eq(o->n_slots, 3);
    cr_assert_str_eq(o->slots[1].name, "mixed");
    char cats_seen[4] = {0};
    for (uint32_t i = 0; i < o->n_hits[1]; i++) {
        int c = index_of(&s, o->hits[1][i].id) / PER_CAT;
        cr_assert_eq(cats_seen[c], 0, "the cap1 preset allows one per category");
        cats_seen[c] = 1;
    }
    pipeline_page_destroy(page);
    req.layout = "away";
    cr_assert_eq(run_page(&s, &req, &page, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "layout \"away\""), "%s", err.msg);
    svc_stop(&s);
    unlink(path);
}

/* ---- traits and audiences ----------------------------------------------------------------------
 */

static void typed_events(svc *s, const char *user, const int *items, const profiles_event_kind *k,
                         int n)
{
    profiles_event ev[16];
    for (int i = 0; i < n; i++)
        ev[i] = (profiles_event){.item_id = s->ids[items[i]], .type = k[i]};
    uint32_t applied = 0, n_rej = 0;
    profiles_rejection rej[16];
    aff_err err;
    cr_assert_eq(
        profiles_put_events(s->profiles, "shop", user, ev, (size_t)n, &applied, rej, &n_rej, &err),
        AFF_OK, "%s", err.msg);
    cr_assert_eq(applied, (uint32_t)n, "%s", n_rej ? rej[0].reason : "");
}

Test(pipeline_traits, traits_from_synthetic_histories)
{
    svc s;
    svc_start(&s, NULL);
    const profiles_event_kind V = PROFILES_EVENT_VIEW, P = PROFILES_EVENT_PURCHASE,
                              C = PROFILES_EVENT_ADD_TO_CART;
    /* prices are index % 10: items 9, 19, 29 cost 9; items 1, 11 cost 1 */
    const int thrifty_items[5] = {9, 19, 29, 1, 11};
    const profiles_event_kind thrifty_kinds[5] = {V, V, V, P, P};
    typed_events(&s, "thrifty", thrifty_items, thrifty_kinds, 5);
    const int lavish_items[2] = {1, 9};
    const profiles_event_kind lavish_kinds[2] = {V, P};
    typed_events(&s, "lavish", lavish_items, lavish_kinds, 2);
    const int carter_items[2] = {5, 6};
    const profiles_event_kind carter_kinds[2] = {C, V};
    typed_events(&s, "carter", carter_items, carter_kinds, 2);

    profiles_traits t;
    aff_err err;
    cr_assert_eq(profiles_user_traits(s.profiles, "shop", "thrifty", &t, &err), AFF_OK, "%s",
                 err.msg);
    cr_assert_float_eq(t.price_sensitivity, 0.5f + 0.5f * 8.0f / 9.0f, 1e-5);
    cr_assert_eq(t.frequency_90d, 2);
    cr_assert_float_eq(t.monetary_90d, 2.0, 1e-9);
    cr_assert_eq(t.r, 5);
    cr_assert_eq(t.f, 3);
    cr_assert_eq(t.m, 2);
    cr_assert_float_eq(t.loyalty, 7.0f / 12.0f, 1e-6);
    cr_assert_float_eq(t.activity, 5.0f / 7.0f, 1e-6);
    cr_assert_float_eq(t.purchase_intent, 0.15f, 1e-6); /* three views in the last hour */
    cr_assert_lt(t.recency_days, 0.01f);

    cr_assert_eq(profiles_user_traits(s.profiles, "shop", "lavish", &t, &err), AFF_OK);
    cr_assert_float_eq(t.price_sensitivity, 0.5f - 0.5f * 8.0f / 9.0f, 1e-5);
    cr_assert_eq(profiles_user_traits(s.profiles, "shop", "carter", &t, &err), AFF_OK);
    cr_assert_float_eq(t.purchase_intent, 0.55f, 1e-6, "an open cart and one view");
    cr_assert_float_eq(t.price_sensitivity, 0.5f + 0.5f / 6.0f, 1e-6, "carted 5, viewed 6");
    const int bought[1] = {5};
    const profiles_event_kind buy[1] = {P};
    typed_events(&s, "carter", bought, buy, 1);
    cr_assert_eq(profiles_user_traits(s.profiles, "shop", "carter", &t, &err), AFF_OK);
    cr_assert_float_eq(t.purchase_intent, 0.05f, 1e-6, "the cart was bought");
    cr_assert_eq(profiles_user_traits(s.profiles, "shop", "nobody", &t, &err), AFF_ENOTFOUND);

    /* audiences: a promotion for price-sensitive shoppers, a boost for mobile at any hour */
    const char *toys[1] = {"toys"}, *mobile[1] = {"mobile"};
    pipeline_audience sensitive, on_mobile;
    pipeline_audience_init(&sensitive);
    sensitive.min_price_sensitivity = 0.7f;
    pipeline_audience_init(&on_mobile);
    on_mobile.devices = mobile;
    on_mobile.n_devices = 1;
    pipeline_promotion promo = {.name = "deals", .share = 0.3f, .audience = &sensitive};
    aff_filter_init(&promo.filter);
    promo.filter.categories = toys;
    promo.filter.n_categories = 1;
    const char *sale[1] = {"sale"};
    pipeline_boost boost = {.weight = 10.0f, .audience = &on_mobile};
    aff_filter_init(&boost.filter);
    boost.filter.tags = sale; /* items with index % 3 == 0 */
    boost.filter.n_tags = 1;
    pipeline_rules rules = {.promotions = &promo, .n_promotions = 1};
    pipeline_request req = {
        .kind = PIPELINE_RECOMMEND, .collection = "shop", .k = 10, .rules = &rules};
    const char *users[2] = {"thrifty", "lavish"};
    for (int u = 0; u < 2; u++) {
        req.user_id = users[u];
        pipeline_job *job;
        cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
        const pipeline_output *o = pipeline_job_output(job);
        cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
        int promoted = 0;
        for (uint32_t i = 0; i < o->n_hits[0]; i++)
            promoted += o->hits[0][i].reason.kind == PIPELINE_REASON_PROMOTED;
        cr_assert_eq(promoted, u == 0 ? 3 : 0, "%s: %d promoted", users[u], promoted);
        pipeline_job_destroy(job);
    }
    rules = (pipeline_rules){.boosts = &boost, .n_boosts = 1};
    pipeline_context ctx = {.device = "mobile", .hour = -1};
    req.user_id = "lavish";
    for (int c = 0; c < 2; c++) {
        req.context = c == 0 ? &ctx : NULL;
        pipeline_job *job;
        cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
        const pipeline_output *o = pipeline_job_output(job);
        cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
        int sale_on_top = 0;
        for (uint32_t i = 0; i < 3; i++)
            sale_on_top += index_of(&s, o->hits[0][i].id) % 3 == 0;
        if (c == 0) cr_assert_eq(sale_on_top, 3, "boosted on mobile");
        if (c == 0) cr_assert_gt(o->hits[0][0].score, 5.0f, "score + 10");
        if (c == 1) cr_assert_lt(o->hits[0][0].score, 1.5f, "no boost without the context");
        pipeline_job_destroy(job);
    }
    /* a bad audience names its field */
    sensitive.min_price_sensitivity = 1.5f;
    rules = (pipeline_rules){.promotions = &promo, .n_promotions = 1};
    cr_assert_eq(pipeline_validate_rules(&rules, 10, "rules", &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "rules.promotions[0].audience.min_price_sensitivity"), "%s", err.msg);
    svc_stop(&s);
}

Test(pipeline_rules, the_documented_serving_config_example_loads)
{
    svc s;
    svc_start(&s, AFF_SOURCE_DIR "/docs/serving-config.example.json");
    pipeline_request req = {.kind = PIPELINE_RECOMMEND,
                            .collection = "shop",
                            .vector = s.vec[0],
                            .dim = SDIM,
                            .k = 10,
                            .preset = "discover"};
    pipeline_job *job;
    aff_err err;
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(pipeline_job_output(job)->status, AFF_OK);
    cr_assert_neq(pipeline_job_output(job)->exploration_seed, 0);
    pipeline_job_destroy(job);
    svc_stop(&s);
}

Test(pipeline_service, a_cap_gives_way_only_when_candidates_run_out)
{
    svc s;
    svc_start(&s, NULL);
    pipeline_rules rules = {.has_max_per_category = true, .max_per_category = 1};
    pipeline_request req = {.kind = PIPELINE_RECOMMEND,
                            .collection = "shop",
                            .vector = s.vec[0],
                            .dim = SDIM,
                            .k = 8,
                            .rules = &rules};
    pipeline_job *job;
    aff_err err;
    cr_assert_eq(run(&s, &req, &job, &err), AFF_OK, "%s", err.msg);
    const pipeline_output *o = pipeline_job_output(job);
    cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
    cr_assert_eq(o->n_hits[0], 8, "filled although only 4 categories exist");
    /* k' = 2k = 16 holds 3 categories, 64 still 3 (shoes cluster), 256 all 120 items */
    cr_assert_eq(o->rounds, 3, "two deeper rounds first");
    int seen[NCATS] = {0};
    for (uint32_t i = 0; i < 4; i++) {
        int c = index_of(&s, o->hits[0][i].id) / PER_CAT;
        cr_assert_eq(seen[c]++, 0, "the first 4 keep the cap: one per category");
    }
    pipeline_job_destroy(job);
    svc_stop(&s);
}

/* ---- exploration by age and served count, through the service ----------------------------- */

static void recommend_ids(svc *s, const pipeline_rules *rules, uint32_t k, char (*out)[16],
                          pipeline_reason_kind *kinds)
{
    pipeline_request req = {.kind = PIPELINE_RECOMMEND,
                            .collection = "shop",
                            .vector = s->vec[0],
                            .dim = SDIM,
                            .k = k,
                            .rules = rules};
    pipeline_job *job;
    aff_err err;
    cr_assert_eq(run(s, &req, &job, &err), AFF_OK, "%s", err.msg);
    const pipeline_output *o = pipeline_job_output(job);
    cr_assert_eq(o->status, AFF_OK, "%s", o->err.msg);
    cr_assert_eq(o->n_hits[0], k);
    for (uint32_t i = 0; i < k; i++) {
        snprintf(out[i], 16, "%.15s", o->hits[0][i].id);
        if (kinds) kinds[i] = o->hits[0][i].reason.kind;
    }
    pipeline_job_destroy(job);
}

Test(pipeline_service, exploration_favours_items_the_server_rarely_showed)
{
    svc s;
    svc_start(&s, NULL);
    char top15[15][16], shown[10][16];
    recommend_ids(&s, NULL, 15, top15, NULL); /* served once: the top 15 */
    for (int round = 0; round < 10; round++)  /* the top 10 ten more times: 11 */
        recommend_ids(&s, NULL, 10, shown, NULL);
    /* 1 exploration slot; the pool (k + max(5, k/2) = 15) beyond the 9 organic items holds
     * ranks 10..15: rank 10 was served 11 times, ranks 11..15 once. Below 8 they are rare. */
    pipeline_rules r = {
        .has_exploration = true, .exploration_share = 0.1f, .exploration_rarely_shown_below = 8.0f};
    for (uint64_t seed = 1; seed <= 20; seed++) {
        r.exploration_seed = seed;
        char got[10][16];
        pipeline_reason_kind kinds[10];
        recommend_ids(&s, &r, 10, got, kinds);
        int explored = 0;
        for (int i = 0; i < 10; i++) {
            if (kinds[i] != PIPELINE_REASON_EXPLORATION) continue;
            explored++;
            int rank = -1;
            for (int t = 0; t < 15; t++)
                if (strcmp(top15[t], got[i]) == 0) rank = t;
            /* each pick is served once more: in 20 picks at most two of the five reach 8 and
             * leave the rare tier, so it never empties (uniform draws over ranks 10..15 would
             * pick rank 10 in 20 seeds with probability 1 - (5/6)^20 = 97%) */
            cr_assert(rank >= 10 && rank <= 14, "seed %llu explored %s (rank %d)",
                      (unsigned long long)seed, got[i], rank);
        }
        cr_assert_eq(explored, 1);
    }
    svc_stop(&s);
}

Test(exposure, first_upsert_times_survive_a_restart)
{
    char dir[] = "/tmp/aff-exposure-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    aff_err err;
    int64_t first = 0;
    for (int life = 0; life < 2; life++) {
        aff_store *store;
        store_config sc = {.dir = dir};
        cr_assert_eq(store_create(&store, &sc, &err), AFF_OK, "%s", err.msg);
        aff_engine *eng;
        engine_config ec = {.backend = ENGINE_BACKEND_CPU, .faiss = {.threads = 1}};
        cr_assert_eq(engine_create(&eng, &ec, &err), AFF_OK, "%s", err.msg);
        aff_catalog *cat;
        cr_assert_eq(catalog_create(&cat, eng, store, &err), AFF_OK);
        aff_exposure *x;
        cr_assert_eq(exposure_create(&x, EXPOSURE_DEFAULT_HALF_LIFE_S, &err), AFF_OK);
        catalog_attach_exposure(cat, x);
        cr_assert_eq(catalog_rebuild(cat, NULL, &err), AFF_OK, "%s", err.msg);
        const char *id = "it";
        exposure_info info;
        if (life == 0) {
            engine_collection_spec spec = {.name = "c", .dim = 2, .metric = AFF_METRIC_IP};
            cr_assert_eq(catalog_create_collection(cat, &spec, &err), AFF_OK, "%s", err.msg);
            const float v[2] = {1, 0};
            aff_item it = {.id = id, .vector = v, .dim = 2, .attrs = {.price = 1, .available = true}};
            cr_assert_eq(catalog_upsert(cat, "c", &it, 1, &err), AFF_OK, "%s", err.msg);
            exposure_lookup(x, "c", &id, 1, 0, &info);
            first = info.first_ms;
            cr_assert_gt(first, 1000000000000, "a wall-clock time in ms");
            usleep(20 * 1000);
            it.attrs.price = 2; /* a later upsert keeps the first time, in memory and on disk */
            cr_assert_eq(catalog_upsert(cat, "c", &it, 1, &err), AFF_OK, "%s", err.msg);
        }
        exposure_lookup(x, "c", &id, 1, 0, &info);
        cr_assert_eq(info.first_ms, first, "life %d", life);
        catalog_destroy(cat);
        exposure_destroy(x);
        engine_destroy(eng);
        store_destroy(store);
    }
    char cmd[64];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

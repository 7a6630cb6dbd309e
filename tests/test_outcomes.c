/*
 * test_outcomes.c: the measurement modules on their own — attribution rules of outcomes.c
 * (dedup, implied impressions, window, cap, collections, unattributed), its time buckets and
 * Wilson intervals; experiments.c's assignment, Thompson shares and persistence in a real
 * LMDB store on disk.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "experiments.h"
#include "outcomes.h"
#include "store.h"

static int64_t fake_now = 1764500000000; /* 2025-11-30, on a minute boundary + 20 s */

static int64_t clock_fake(void *ctx)
{
    (void)ctx;
    return fake_now;
}

static aff_outcomes *make(uint32_t window_s, uint32_t max_records)
{
    aff_outcomes *o;
    aff_err err;
    outcomes_config cfg = {.window_s = window_s, .max_records = max_records, .now_ms = clock_fake};
    cr_assert_eq(outcomes_create(&o, &cfg, &err), AFF_OK, "%s", err.msg);
    return o;
}

static const char *const ITEMS[] = {"a", "b", "c"};
#define ID1 "0123456789abcdef0123456789abcdef"
#define ID2 "fedcba9876543210fedcba9876543210"

static void record(aff_outcomes *o, const char *id, const char *coll, const char *surface,
                   const char *arm)
{
    aff_err err;
    outcomes_labels l = {
        .collection = coll, .surface = surface, .experiment = arm ? "x" : NULL, .arm = arm};
    cr_assert_eq(outcomes_record(o, id, &l, ITEMS, 3, &err), AFF_OK, "%s", err.msg);
}

static outcomes_result query(aff_outcomes *o, const char *coll)
{
    outcomes_result r;
    aff_err err;
    outcomes_query q = {.collection = coll};
    cr_assert_eq(outcomes_query_run(o, &q, &r, &err), AFF_OK, "%s", err.msg);
    return r;
}

Test(outcomes, attributes_dedups_and_implies_impressions)
{
    aff_outcomes *o = make(3600, 1000);
    record(o, ID1, "shop", "home", "B");
    outcomes_attribution a;
    outcomes_attribute(o, "shop", ID1, "a", OUTCOMES_IMPRESSION, 0, &a);
    cr_assert(a.attributed && !a.duplicate && a.counted[OUTCOMES_IMPRESSION]);
    cr_assert_str_eq(a.experiment, "x");
    cr_assert_str_eq(a.arm, "B");
    outcomes_attribute(o, "shop", ID1, "a", OUTCOMES_IMPRESSION, 0, &a);
    cr_assert(a.attributed && a.duplicate && !a.counted[OUTCOMES_IMPRESSION]);
    /* a purchase of b without a reported impression counts the impression too */
    outcomes_attribute(o, "shop", ID1, "b", OUTCOMES_PURCHASE, 42.5, &a);
    cr_assert(a.counted[OUTCOMES_PURCHASE] && a.counted[OUTCOMES_IMPRESSION]);
    outcomes_attribute(o, "shop", ID1, "b", OUTCOMES_PURCHASE, 42.5, &a); /* duplicate */
    cr_assert(a.duplicate);
    outcomes_attribute(o, "shop", ID1, "a", OUTCOMES_CLICK, 0, &a);
    cr_assert(a.counted[OUTCOMES_CLICK] && !a.counted[OUTCOMES_IMPRESSION]);
    /* not shown, another collection, unknown id, malformed id: unattributed */
    outcomes_attribute(o, "shop", ID1, "zzz", OUTCOMES_CLICK, 0, &a);
    cr_assert(!a.attributed);
    outcomes_attribute(o, "other", ID1, "a", OUTCOMES_CLICK, 0, &a);
    cr_assert(!a.attributed);
    outcomes_attribute(o, "shop", ID2, "a", OUTCOMES_CLICK, 0, &a);
    cr_assert(!a.attributed);
    outcomes_attribute(o, "shop", "xyz", "a", OUTCOMES_IMPRESSION, 0, &a);
    cr_assert(!a.attributed);

    outcomes_result r = query(o, "shop");
    cr_assert_eq(r.n_rows, 1);
    cr_assert_str_eq(r.rows[0].surface, "home");
    cr_assert_str_eq(r.rows[0].strategy, "default");
    cr_assert_eq(r.rows[0].c.responses, 1);
    cr_assert_eq(r.rows[0].c.n[OUTCOMES_IMPRESSION], 2);
    cr_assert_eq(r.rows[0].c.n[OUTCOMES_CLICK], 1);
    cr_assert_eq(r.rows[0].c.n[OUTCOMES_ADD_TO_CART], 0);
    cr_assert_eq(r.rows[0].c.n[OUTCOMES_PURCHASE], 1);
    cr_assert_eq(r.rows[0].c.revenue, 42.5);
    cr_assert_eq(r.unattributed[OUTCOMES_CLICK], 2); /* "other" is filtered out */
    cr_assert_eq(r.unattributed[OUTCOMES_IMPRESSION], 1);
    outcomes_result_free(&r);
    r = query(o, "other");
    cr_assert_eq(r.n_rows, 0);
    cr_assert_eq(r.unattributed[OUTCOMES_CLICK], 1);
    outcomes_result_free(&r);
    outcomes_destroy(o);
}

Test(outcomes, window_and_cap_forget_old_recommendations)
{
    aff_outcomes *o = make(60, 1000);
    record(o, ID1, "shop", "home", NULL);
    fake_now += 60001;
    outcomes_attribution a;
    outcomes_attribute(o, "shop", ID1, "a", OUTCOMES_CLICK, 0, &a);
    cr_assert(!a.attributed, "past the window");
    outcomes_destroy(o);

    /* cap 16 over 16 shards: one record per shard; ids with equal low nibble share a shard */
    o = make(3600, 16);
    record(o, "00000000000000000000000000000001", "shop", "home", NULL);
    record(o, "00000000000000000000000000000011", "shop", "home", NULL);
    size_t n;
    outcomes_usage(o, &n, NULL);
    cr_assert_eq(n, 1);
    outcomes_attribute(o, "shop", "00000000000000000000000000000001", "a", OUTCOMES_CLICK, 0, &a);
    cr_assert(!a.attributed, "evicted by the cap");
    outcomes_attribute(o, "shop", "00000000000000000000000000000011", "a", OUTCOMES_CLICK, 0, &a);
    cr_assert(a.attributed);
    outcomes_destroy(o);
}

Test(outcomes, one_page_id_per_collection)
{
    aff_outcomes *o = make(3600, 1000);
    record(o, ID1, "products", "home", NULL);
    record(o, ID1, "banners", "home", NULL);
    outcomes_attribution a;
    outcomes_attribute(o, "banners", ID1, "c", OUTCOMES_CLICK, 0, &a);
    cr_assert(a.attributed);
    outcomes_attribute(o, "products", ID1, "c", OUTCOMES_CLICK, 0, &a);
    cr_assert(a.attributed && !a.duplicate);
    outcomes_destroy(o);
}

Test(outcomes, buckets_by_minute_with_points)
{
    aff_outcomes *o = make(86400, 1000);
    fake_now = 1764500040000; /* minute m */
    int64_t m0 = fake_now / 60000 * 60000;
    record(o, ID1, "shop", "home", NULL);
    outcomes_attribute(o, "shop", ID1, "a", OUTCOMES_IMPRESSION, 0, NULL);
    fake_now += 120000; /* minute m + 2 */
    outcomes_attribute(o, "shop", ID1, "b", OUTCOMES_IMPRESSION, 0, NULL);
    outcomes_attribute(o, "shop", ID1, "b", OUTCOMES_CLICK, 0, NULL);
    outcomes_result r;
    aff_err err;
    outcomes_query q = {.collection = "shop", .from_ms = m0, .step_ms = 60000};
    cr_assert_eq(outcomes_query_run(o, &q, &r, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(r.n_rows, 1);
    cr_assert_eq(r.rows[0].n_points, 3);
    cr_assert_eq(r.rows[0].points[0].start_ms, m0);
    cr_assert_eq(r.rows[0].points[0].c.n[OUTCOMES_IMPRESSION], 1);
    cr_assert_eq(r.rows[0].points[1].c.n[OUTCOMES_IMPRESSION], 0);
    cr_assert_eq(r.rows[0].points[2].c.n[OUTCOMES_IMPRESSION], 1);
    cr_assert_eq(r.rows[0].points[2].c.n[OUTCOMES_CLICK], 1);
    outcomes_result_free(&r);
    /* a range that holds only minute m + 2 */
    q = (outcomes_query){.collection = "shop", .from_ms = m0 + 120000};
    cr_assert_eq(outcomes_query_run(o, &q, &r, &err), AFF_OK);
    cr_assert_eq(r.rows[0].c.n[OUTCOMES_IMPRESSION], 1);
    cr_assert_eq(r.rows[0].c.responses, 0);
    outcomes_result_free(&r);
    q = (outcomes_query){.step_ms = 30000};
    cr_assert_eq(outcomes_query_run(o, &q, &r, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "step_s"));
    outcomes_destroy(o);
}

Test(outcomes, wilson_interval)
{
    double lo, hi;
    outcomes_wilson(10, 100, &lo, &hi);
    cr_assert_float_eq(lo, 0.055229137061, 1e-12);
    cr_assert_float_eq(hi, 0.174365661505, 1e-12);
    outcomes_wilson(0, 20, &lo, &hi);
    cr_assert_eq(lo, 0.0);
    cr_assert_float_eq(hi, 0.161125158053, 1e-12);
    outcomes_wilson(20, 20, &lo, &hi);
    cr_assert_float_eq(lo, 0.838874841947, 1e-12);
    cr_assert_eq(hi, 1.0);
    outcomes_wilson(0, 0, &lo, &hi);
    cr_assert(lo == 0.0 && hi == 0.0);
}

/* ---- experiments ---- */

Test(experiments, pick_follows_cumulative_shares)
{
    const double s[3] = {0.2, 0.0, 0.8};
    cr_assert_eq(experiments_pick(s, 3, 0.0), 0);
    cr_assert_eq(experiments_pick(s, 3, 0.1999), 0);
    cr_assert_eq(experiments_pick(s, 3, 0.2), 2);
    cr_assert_eq(experiments_pick(s, 3, 0.999999), 2);
}

Test(experiments, assignment_points_are_stable_and_uniform)
{
    cr_assert_eq(experiments_point("exp", "alice"), experiments_point("exp", "alice"));
    cr_assert_neq(experiments_point("exp", "alice"), experiments_point("exp2", "alice"));
    int below = 0;
    char user[32];
    for (int i = 0; i < 10000; i++) {
        snprintf(user, sizeof user, "user-%d", i);
        double u = experiments_point("exp", user);
        cr_assert(u >= 0.0 && u < 1.0);
        below += u < 0.3;
    }
    /* binomial(10000, 0.3): sd 45.8; 5 sd either side */
    cr_assert(below > 3000 - 230 && below < 3000 + 230, "%d of 10000 below 0.3", below);
}

Test(experiments, thompson_shares)
{
    double s[2];
    uint64_t imp[2] = {1000, 1000}, suc[2] = {40, 200};
    experiments_thompson(imp, suc, 2, 0.1, 7, 1, s);
    cr_assert_float_eq(s[0], 0.1, 1e-12, "the floor");
    cr_assert_float_eq(s[1], 0.9, 1e-12, "a clear winner takes all but the floor");
    double t[2];
    experiments_thompson(imp, suc, 2, 0.1, 7, 1, t);
    cr_assert(s[0] == t[0] && s[1] == t[1], "same state, same shares");
    uint64_t eq_imp[2] = {100, 100}, eq_suc[2] = {10, 10};
    experiments_thompson(eq_imp, eq_suc, 2, 0.0, 7, 3, s);
    cr_assert(fabs(s[0] - 0.5) < 0.03, "equal arms: %g", s[0]);
    cr_assert_float_eq(s[0] + s[1], 1.0, 1e-12);
}

static bool preset_ok(void *ctx, const char *name)
{
    (void)ctx;
    return strcmp(name, "p1") == 0 || strcmp(name, "p2") == 0;
}

static aff_experiments *open_ex(const char *dir, aff_store **store)
{
    aff_err err;
    store_config scfg = {.dir = dir};
    cr_assert_eq(store_create(store, &scfg, &err), AFF_OK, "%s", err.msg);
    experiments_config cfg = {.store = *store, .preset_exists = preset_ok};
    aff_experiments *ex;
    cr_assert_eq(experiments_create(&ex, &cfg, &err), AFF_OK, "%s", err.msg);
    return ex;
}

Test(experiments, validates_persists_and_updates_the_bandit)
{
    char dir[] = "/tmp/aff-test-experiments-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    aff_store *store;
    aff_experiments *ex = open_ex(dir, &store);
    aff_err err;
    experiment d = {.id = "e1", .collection = "shop", .surface = "home", .n_arms = 2};
    snprintf(d.arms[0].name, sizeof d.arms[0].name, "a");
    snprintf(d.arms[0].preset, sizeof d.arms[0].preset, "p1");
    d.arms[0].share = 0.25;
    snprintf(d.arms[1].name, sizeof d.arms[1].name, "b");
    snprintf(d.arms[1].preset, sizeof d.arms[1].preset, "p3");
    d.arms[1].share = 0.75;
    cr_assert_eq(experiments_add(ex, &d, NULL, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "experiment.arms[1].preset"), "%s", err.msg);
    snprintf(d.arms[1].preset, sizeof d.arms[1].preset, "p2");
    d.arms[1].share = 0.7;
    cr_assert_eq(experiments_add(ex, &d, NULL, &err), AFF_EINVAL);
    cr_assert_str_eq(err.msg, "experiment.arms: the shares add up to 0.95; they must add up to 1");
    d.arms[1].share = 0.75;
    d.bandit = (experiments_bandit){
        .enabled = true, .metric = EXPERIMENTS_METRIC_CTR, .update_every = 10, .seed = 3};
    cr_assert_eq(experiments_add(ex, &d, NULL, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(experiments_add(ex, &d, NULL, &err), AFF_EEXIST);

    experiments_assignment as;
    cr_assert(!experiments_assign(ex, "shop", "pdp", "u1", &as));
    cr_assert(experiments_assign(ex, "shop", "home", "u1", &as));
    uint32_t want = experiments_point("e1", "u1") < 0.25 ? 0 : 1;
    cr_assert_str_eq(as.arm.name, want ? "b" : "a");

    /* 10 impressions of b with 5 clicks, none for a: one update */
    bool imp_click[OUTCOMES_KINDS] = {true, true, false, false};
    bool imp[OUTCOMES_KINDS] = {true, false, false, false};
    for (int i = 0; i < 10; i++)
        experiments_observe(ex, "e1", "b", i < 5 ? imp_click : imp);
    experiment e;
    cr_assert_eq(experiments_get(ex, "e1", &e, &err), AFF_OK);
    cr_assert_eq(e.version, 1);
    cr_assert_eq(e.impressions[1], 10);
    cr_assert_eq(e.successes[1], 5);
    double shares[2];
    experiments_thompson(e.impressions, e.successes, 2, EXPERIMENTS_DEFAULT_FLOOR, 3, 1, shares);
    cr_assert(e.shares[0] == shares[0] && e.shares[1] == shares[1]);

    experiments_destroy(ex);
    store_destroy(store);
    ex = open_ex(dir, &store); /* after a restart: the same state */
    experiment e2;
    cr_assert_eq(experiments_get(ex, "e1", &e2, &err), AFF_OK);
    cr_assert(e2.running);
    cr_assert_eq(e2.version, 1);
    cr_assert(e2.shares[0] == e.shares[0] && e2.shares[1] == e.shares[1]);
    cr_assert_str_eq(e2.arms[1].preset, "p2");
    cr_assert_eq(experiments_stop(ex, "e1", &e2, &err), AFF_OK);
    cr_assert(!e2.running);
    cr_assert(!experiments_assign(ex, "shop", "home", "u1", &as));
    cr_assert_eq(experiments_running(ex), 0);
    experiments_destroy(ex);
    store_destroy(store);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

Test(outcomes, series_beyond_the_cap_count_under_overflow)
{
    aff_outcomes *o = make(3600, 100000);
    char surface[16], id[33];
    for (int i = 0; i < OUTCOMES_MAX_SERIES + 100; i++) {
        snprintf(surface, sizeof surface, "s%d", i);
        snprintf(id, sizeof id, "%032x", i + 1);
        record(o, id, "shop", surface, NULL);
    }
    outcomes_result r;
    aff_err err;
    outcomes_query q = {0};
    cr_assert_eq(outcomes_query_run(o, &q, &r, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(r.n_rows, OUTCOMES_MAX_SERIES);
    uint64_t total = 0, overflow = 0;
    for (size_t i = 0; i < r.n_rows; i++) {
        total += r.rows[i].c.responses;
        if (strcmp(r.rows[i].collection, "(overflow)") == 0) overflow = r.rows[i].c.responses;
    }
    cr_assert_eq(total, OUTCOMES_MAX_SERIES + 100, "nothing is lost");
    cr_assert_eq(overflow, 101);
    outcomes_result_free(&r);
    /* an overflowed answer is still attributed (to the overflow series) */
    outcomes_attribution a;
    snprintf(id, sizeof id, "%032x", OUTCOMES_MAX_SERIES + 100);
    outcomes_attribute(o, "shop", id, "a", OUTCOMES_CLICK, 0, &a);
    cr_assert(a.attributed);
    outcomes_destroy(o);
}

/*
 * The engine on the FAISS backend against a brute-force reference written here (double
 * precision dot products, full sort). Results are compared the way FAISS's own GPU tests do:
 * scores position by position (within a float tolerance), and every returned id must exist,
 * pass the filter and carry its true score, so ties may come back in any order without
 * failing the test. Random data; each test prints its seed.
 */
#include "engine.h"

#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

#include "test_rng.h"

/* ---- reference ------------------------------------------------------------------------ */

typedef struct ref_item {
    char id[32];
    float *vec;
    char category[16];
    char tags[3][16];
    uint32_t n_tags;
    float price;
    bool available;
    bool alive;
} ref_item;

typedef struct ref_coll {
    uint32_t dim;
    aff_metric metric;
    ref_item *items;
    uint32_t n, cap;
} ref_coll;

static aff_engine *engine;
/* One arena lent to every checked search of a test, as a batcher worker lends its own to
 * every batch: answers must not depend on what earlier searches left in it. */
static aff_scratch *worker_arena;

static void engine_setup(void)
{
    aff_log_set_level(AFF_LOG_WARN);
    aff_err err = {0};
    engine_config cfg = {.backend = ENGINE_BACKEND_CPU};
    cr_assert_eq(engine_create(&engine, &cfg, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(aff_scratch_create(&worker_arena), AFF_OK);
}

static void engine_teardown(void)
{
    engine_destroy(engine);
    engine = NULL;
    aff_scratch_destroy(worker_arena);
    worker_arena = NULL;
}

TestSuite(engine, .init = engine_setup, .fini = engine_teardown, .timeout = 300);

static void make_collection(const char *name, uint32_t dim, aff_metric metric, ref_coll *ref)
{
    aff_err err = {0};
    engine_collection_spec spec = {.name = name, .dim = dim, .metric = metric};
    cr_assert_eq(engine_create_collection(engine, &spec, &err), AFF_OK, "%s", err.msg);
    *ref = (ref_coll){.dim = dim, .metric = metric};
}

static const char *const categories[] = {"shoes", "shirts", "bags",  "hats",    "socks",
                                         "belts", "coats",  "jeans", "dresses", "watches"};
static const char *const tag_pool[] = {"sale", "new", "eco", "premium", "kids", "unisex"};

/* Adds n random items to both the engine and the reference (ids "<prefix><i>"). */
static void add_random(const char *coll, ref_coll *ref, uint32_t n, const char *prefix)
{
    if (ref->n + n > ref->cap) {
        ref->cap = (ref->n + n) * 2;
        ref->items = realloc(ref->items, ref->cap * sizeof *ref->items);
    }
    aff_item *items = calloc(n, sizeof *items);
    const char *(*tagp)[3] = calloc(n, sizeof *tagp);
    for (uint32_t i = 0; i < n; i++) {
        ref_item *r = &ref->items[ref->n + i];
        *r = (ref_item){0};
        snprintf(r->id, sizeof r->id, "%s%u", prefix, ref->n + i);
        r->vec = malloc(ref->dim * sizeof(float));
        for (uint32_t j = 0; j < ref->dim; j++)
            r->vec[j] = rng_unit();
        snprintf(r->category, sizeof r->category, "%s", categories[rng() % 10]);
        r->n_tags = rng() % 4;
        for (uint32_t t = 0; t < r->n_tags; t++) {
            snprintf(r->tags[t], sizeof r->tags[t], "%s", tag_pool[rng() % 6]);
            tagp[i][t] = r->tags[t];
        }
        r->price = (float)(rng() % 10000) / 100.0f;
        r->available = rng() % 4 != 0;
        r->alive = true;
        items[i] = (aff_item){.id = r->id,
                              .vector = r->vec,
                              .dim = ref->dim,
                              .attrs.category = r->category,
                              .attrs.tags = tagp[i],
                              .attrs.n_tags = r->n_tags,
                              .attrs.price = r->price,
                              .attrs.available = r->available};
    }
    aff_err err = {0};
    cr_assert_eq(engine_upsert(engine, coll, items, n, &err), AFF_OK, "%s", err.msg);
    ref->n += n;
    free(items);
    free(tagp);
}

static ref_item *ref_find(ref_coll *ref, const char *id)
{
    for (uint32_t i = 0; i < ref->n; i++)
        if (ref->items[i].alive && strcmp(ref->items[i].id, id) == 0) return &ref->items[i];
    return NULL;
}

static void ref_free(ref_coll *ref)
{
    for (uint32_t i = 0; i < ref->n; i++)
        free(ref->items[i].vec);
    free(ref->items);
}

static bool ref_passes(const ref_item *r, const aff_filter *f, const char *self)
{
    if (!r->alive || (self && strcmp(r->id, self) == 0)) return false;
    if (!f) return true;
    if (f->available_only && !r->available) return false;
    if (!(r->price >= f->price_min && r->price <= f->price_max)) return false;
    if (f->n_categories) {
        bool any = false;
        for (uint32_t i = 0; i < f->n_categories; i++)
            any |= strcmp(f->categories[i], r->category) == 0;
        if (!any) return false;
    }
    if (f->n_tags) {
        bool any = false;
        for (uint32_t i = 0; i < f->n_tags; i++)
            for (uint32_t t = 0; t < r->n_tags; t++)
                any |= strcmp(f->tags[i], r->tags[t]) == 0;
        if (!any) return false;
    }
    for (uint32_t i = 0; i < f->n_exclude_ids; i++)
        if (strcmp(f->exclude_ids[i], r->id) == 0) return false;
    for (uint32_t i = 0; i < f->n_exclude_categories; i++)
        if (strcmp(f->exclude_categories[i], r->category) == 0) return false;
    for (uint32_t i = 0; i < f->n_exclude_tags; i++)
        for (uint32_t t = 0; t < r->n_tags; t++)
            if (strcmp(f->exclude_tags[i], r->tags[t]) == 0) return false;
    return true;
}

/* The score the API reports for (query, item): ip, cosine of normalized vectors, or squared
 * L2 distance. */
static double ref_score(const ref_coll *ref, const float *q, const float *x)
{
    double dot = 0, qq = 0, xx = 0, l2 = 0;
    for (uint32_t j = 0; j < ref->dim; j++) {
        dot += (double)q[j] * x[j];
        qq += (double)q[j] * q[j];
        xx += (double)x[j] * x[j];
        l2 += ((double)q[j] - x[j]) * ((double)q[j] - x[j]);
    }
    if (ref->metric == AFF_METRIC_COSINE) return dot / sqrt(qq * xx);
    if (ref->metric == AFF_METRIC_L2) return l2;
    return dot;
}

static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x > y ? -1 : x < y;
}

static int cmp_asc(const void *a, const void *b)
{
    return -cmp_desc(a, b);
}

static double tolerance(const ref_coll *ref, double value)
{
    return 1e-4 * (1.0 + fabs(value)) * (ref->metric == AFF_METRIC_IP ? sqrt(ref->dim) : 1.0);
}

/* Asserts that hits[0..n) is a correct top-k answer for (q, k, f, self). */
static void check_answer(ref_coll *ref, const float *q, uint32_t k, const aff_filter *f,
                         const char *self, const aff_hit *hits, uint32_t n, const char *what)
{
    double *expect = malloc((ref->n + 1) * sizeof *expect);
    uint32_t m = 0;
    for (uint32_t i = 0; i < ref->n; i++)
        if (ref_passes(&ref->items[i], f, self)) expect[m++] = ref_score(ref, q, ref->items[i].vec);
    qsort(expect, m, sizeof *expect, ref->metric == AFF_METRIC_L2 ? cmp_asc : cmp_desc);
    uint32_t want = m < k ? m : k;
    cr_assert_eq(n, want, "%s: %u hits, expected %u (k=%u, %u items pass)", what, n, want, k, m);
    for (uint32_t i = 0; i < n; i++) {
        ref_item *r = ref_find(ref, hits[i].id);
        cr_assert_not_null(r, "%s: hit %u id \"%s\" is not a live item", what, i, hits[i].id);
        cr_assert(ref_passes(r, f, self), "%s: hit \"%s\" fails the filter", what, hits[i].id);
        double truth = ref_score(ref, q, r->vec);
        cr_assert(fabs(hits[i].score - truth) <= tolerance(ref, truth),
                  "%s: hit %u \"%s\" score %.6f, true score %.6f", what, i, hits[i].id,
                  (double)hits[i].score, truth);
        cr_assert(fabs(hits[i].score - expect[i]) <= tolerance(ref, expect[i]),
                  "%s: position %u score %.6f, expected %.6f", what, i, (double)hits[i].score,
                  expect[i]);
        for (uint32_t j = 0; j < i; j++)
            cr_assert_str_neq(hits[i].id, hits[j].id, "%s: duplicate id", what);
    }
    free(expect);
}

/* Runs queries (one batch) and checks each answer. */
static void search_and_check(const char *coll, ref_coll *ref, const aff_query *qs, uint32_t nq,
                             const char *what)
{
    size_t total = 0;
    for (uint32_t i = 0; i < nq; i++)
        total += qs[i].k;
    aff_hit *hits = calloc(total, sizeof *hits);
    uint32_t *n_hits = calloc(nq, sizeof *n_hits);
    aff_err *errs = calloc(nq, sizeof *errs);
    int rc = engine_search(engine, worker_arena, coll, qs, nq, hits, n_hits, errs);
    cr_assert_eq(rc, AFF_OK, "%s: %s", what, errs[0].msg);
    size_t off = 0;
    for (uint32_t i = 0; i < nq; i++) {
        char label[96];
        snprintf(label, sizeof label, "%s query %u/%u", what, i, nq);
        const float *qv = qs[i].vector;
        if (!qv) qv = ref_find(ref, qs[i].item_id)->vec;
        check_answer(ref, qv, qs[i].k, qs[i].filter, qs[i].vector ? NULL : qs[i].item_id,
                     hits + off, n_hits[i], label);
        off += qs[i].k;
    }
    free(hits);
    free(n_hits);
    free(errs);
}

static float *random_queries(uint32_t nq, uint32_t dim)
{
    float *q = malloc((size_t)nq * dim * sizeof *q);
    for (size_t i = 0; i < (size_t)nq * dim; i++)
        q[i] = rng_unit();
    return q;
}

/* Runs the same random queries at batch sizes that take each backend path. */
static void check_batches(const char *coll, ref_coll *ref, uint32_t k, const aff_filter *f,
                          const char *what)
{
    static const uint32_t sizes[] = {1, 3, 8, 40};
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        uint32_t nq = sizes[s];
        float *q = random_queries(nq, ref->dim);
        aff_query *qs = calloc(nq, sizeof *qs);
        for (uint32_t i = 0; i < nq; i++)
            qs[i] = (aff_query){
                .vector = q + (size_t)i * ref->dim, .dim = ref->dim, .k = k, .filter = f};
        char label[96];
        snprintf(label, sizeof label, "%s nq=%u k=%u", what, nq, k);
        search_and_check(coll, ref, qs, nq, label);
        free(qs);
        free(q);
    }
}

/* ---- search correctness -------------------------------------------------------------------- */

static void metric_matches_reference(aff_metric metric, const char *name)
{
    seed_test();
    ref_coll ref;
    make_collection(name, 24, metric, &ref);
    add_random(name, &ref, 3000, "p");
    check_batches(name, &ref, 10, NULL, name);
    check_batches(name, &ref, 100, NULL, name);
    ref_free(&ref);
}

Test(engine, inner_product_matches_reference)
{
    metric_matches_reference(AFF_METRIC_IP, "ip");
}

Test(engine, cosine_matches_reference)
{
    metric_matches_reference(AFF_METRIC_COSINE, "cosine");
}

Test(engine, l2_matches_reference)
{
    metric_matches_reference(AFF_METRIC_L2, "l2");
}

Test(engine, k_of_one_all_and_more_than_all)
{
    seed_test();
    ref_coll ref;
    make_collection("small", 8, AFF_METRIC_IP, &ref);
    add_random("small", &ref, 50, "s");
    check_batches("small", &ref, 1, NULL, "k=1");
    check_batches("small", &ref, 50, NULL, "k=n");
    check_batches("small", &ref, 1024, NULL, "k>n");
    ref_free(&ref);
}

Test(engine, empty_collection_returns_no_hits)
{
    ref_coll ref;
    make_collection("empty", 4, AFF_METRIC_COSINE, &ref);
    float q[4] = {1, 0, 0, 0};
    aff_query qs = {.vector = q, .dim = 4, .k = 5};
    aff_hit hits[5];
    uint32_t n = 99;
    aff_err err;
    cr_assert_eq(engine_search(engine, NULL, "empty", &qs, 1, hits, &n, &err), AFF_OK);
    cr_assert_eq(n, 0);
}

Test(engine, ties_are_deterministic_and_by_insertion_order)
{
    ref_coll ref;
    make_collection("ties", 4, AFF_METRIC_IP, &ref);
    /* 20 identical vectors: every score ties. */
    float v[4] = {0.5f, 0.5f, 0.5f, 0.5f};
    aff_item items[20];
    char ids[20][8];
    for (int i = 0; i < 20; i++) {
        snprintf(ids[i], sizeof ids[i], "t%02d", i);
        items[i] = (aff_item){.id = ids[i], .vector = v, .dim = 4, .attrs.price = 1, .attrs.available = true};
    }
    aff_err err;
    cr_assert_eq(engine_upsert(engine, "ties", items, 20, &err), AFF_OK);
    for (uint32_t nq = 1; nq <= 8; nq *= 8) {
        aff_query qs[8];
        for (uint32_t i = 0; i < nq; i++)
            qs[i] = (aff_query){.vector = v, .dim = 4, .k = 5};
        aff_hit hits[40];
        uint32_t n[8];
        aff_err errs[8];
        cr_assert_eq(engine_search(engine, NULL, "ties", qs, nq, hits, n, errs), AFF_OK);
        for (uint32_t q = 0; q < nq; q++) {
            cr_assert_eq(n[q], 5);
            for (int i = 0; i < 5; i++)
                cr_assert_str_eq(hits[q * 5 + i].id, ids[i], "nq=%u: ties go to earlier rows", nq);
        }
    }
}

/* ---- filters ------------------------------------------------------------------------------------
 */

Test(engine, filters_of_every_kind)
{
    seed_test();
    ref_coll ref;
    make_collection("shop", 16, AFF_METRIC_COSINE, &ref);
    add_random("shop", &ref, 4000, "sku");

    aff_filter f;
    const char *cats[] = {"shoes", "bags", "no-such-category"};
    aff_filter_init(&f);
    f.categories = cats;
    f.n_categories = 3;
    check_batches("shop", &ref, 20, &f, "categories");

    const char *tags[] = {"eco", "premium"};
    aff_filter_init(&f);
    f.tags = tags;
    f.n_tags = 2;
    check_batches("shop", &ref, 20, &f, "tags");

    aff_filter_init(&f);
    f.price_min = 10;
    f.price_max = 20;
    check_batches("shop", &ref, 20, &f, "price range");

    aff_filter_init(&f);
    f.price_min = 99.5f;
    check_batches("shop", &ref, 20, &f, "price min only");

    aff_filter_init(&f);
    f.available_only = true;
    check_batches("shop", &ref, 20, &f, "available only");

    aff_filter_init(&f);
    f.categories = cats;
    f.n_categories = 1;
    f.tags = tags;
    f.n_tags = 1;
    f.price_max = 50;
    f.available_only = true;
    check_batches("shop", &ref, 50, &f, "combined");

    const char *unknown_cat[] = {"nothing"};
    aff_filter_init(&f);
    f.categories = unknown_cat;
    f.n_categories = 1;
    check_batches("shop", &ref, 20, &f, "unknown category matches nothing");

    aff_filter_init(&f);
    f.price_min = 200;
    check_batches("shop", &ref, 20, &f, "empty price range");
    ref_free(&ref);
}

/* Re-upserts ref item i with category cat (same vector and other attributes). */
static void set_category(const char *coll, ref_coll *ref, uint32_t i, const char *cat)
{
    ref_item *r = &ref->items[i];
    snprintf(r->category, sizeof r->category, "%s", cat);
    const char *tg[3] = {r->tags[0], r->tags[1], r->tags[2]};
    aff_item it = {.id = r->id,
                   .vector = r->vec,
                   .dim = ref->dim,
                   .attrs.category = r->category,
                   .attrs.tags = tg,
                   .attrs.n_tags = r->n_tags,
                   .attrs.price = r->price,
                   .attrs.available = r->available};
    aff_err err = {0};
    cr_assert_eq(engine_upsert(engine, coll, &it, 1, &err), AFF_OK, "%s", err.msg);
}

/* A category holding few rows (here 1-5% of them) is read from the backend's per-category row
 * lists instead of scanned (docs/cpu-precision.md): its answers must follow category changes,
 * deletes (which move the last row into the hole) and re-inserts. */
Test(engine, narrow_category_filters_follow_upserts_and_deletes)
{
    seed_test();
    ref_coll ref;
    make_collection("narrow", 16, AFF_METRIC_COSINE, &ref);
    add_random("narrow", &ref, 3000, "n");
    for (uint32_t i = 0; i < ref.n; i += 30) /* 100 items move into "rare" */
        set_category("narrow", &ref, i, "rare");
    for (uint32_t i = ref.n - 40; i < ref.n; i++) /* and the last 40 rows, which deletes move */
        set_category("narrow", &ref, i, "rare");
    const char *rare[] = {"rare"};
    aff_filter f;
    aff_filter_init(&f);
    f.categories = rare;
    f.n_categories = 1;
    check_batches("narrow", &ref, 10, &f, "rare");
    check_batches("narrow", &ref, 150, &f, "rare, k above its items");

    /* a third of them leave, a third are deleted, the rest stay; rows move under the lists */
    const char *gone[40];
    uint32_t ng = 0;
    for (uint32_t i = 0; i < ref.n; i += 30) {
        if (i % 90 == 30) set_category("narrow", &ref, i, "shoes");
        if (i % 90 == 60 && ng < 40) {
            gone[ng++] = ref.items[i].id;
            ref.items[i].alive = false;
        }
    }
    size_t nd = 0;
    aff_err err = {0};
    cr_assert_eq(engine_delete(engine, "narrow", gone, ng, &nd, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(nd, ng);
    for (uint32_t i = 5; i < ref.n; i += 97) /* others of every category are deleted too */
        if (ref.items[i].alive && strcmp(ref.items[i].category, "rare") != 0) {
            const char *id = ref.items[i].id;
            cr_assert_eq(engine_delete(engine, "narrow", &id, 1, &nd, &err), AFF_OK);
            ref.items[i].alive = false;
        }
    check_batches("narrow", &ref, 10, &f, "rare after moves and deletes");
    check_batches("narrow", &ref, 150, &f, "rare after moves and deletes, k above its items");
    const char *two[] = {"rare", "no-such-category"};
    aff_filter_init(&f);
    f.categories = two;
    f.n_categories = 2;
    f.price_max = 50;
    f.available_only = true;
    check_batches("narrow", &ref, 20, &f, "rare, cheap and available");
    ref_free(&ref);
}

Test(engine, exclusion_lists_of_0_1_and_5000_ids)
{
    seed_test();
    ref_coll ref;
    make_collection("ex", 12, AFF_METRIC_IP, &ref);
    add_random("ex", &ref, 8000, "e");
    aff_filter f;
    aff_filter_init(&f);
    check_batches("ex", &ref, 30, &f, "0 exclusions");

    /* Exclude the current best answer of a fixed query. */
    float *q = random_queries(1, ref.dim);
    aff_query one = {.vector = q, .dim = ref.dim, .k = 1};
    aff_hit best;
    uint32_t n;
    aff_err err;
    cr_assert_eq(engine_search(engine, NULL, "ex", &one, 1, &best, &n, &err), AFF_OK);
    const char *ex1[] = {best.id};
    f.exclude_ids = ex1;
    f.n_exclude_ids = 1;
    aff_query qf = {.vector = q, .dim = ref.dim, .k = 10, .filter = &f};
    search_and_check("ex", &ref, &qf, 1, "1 exclusion");
    aff_hit top[10];
    aff_err e10;
    uint32_t n10;
    cr_assert_eq(engine_search(engine, NULL, "ex", &qf, 1, top, &n10, &e10), AFF_OK);
    for (uint32_t i = 0; i < n10; i++)
        cr_assert_str_neq(top[i].id, best.id);

    const char **many = malloc(5000 * sizeof *many);
    for (int i = 0; i < 5000; i++)
        many[i] = ref.items[(rng() % ref.n)].id; /* duplicates allowed */
    f.exclude_ids = many;
    f.n_exclude_ids = 5000;
    check_batches("ex", &ref, 30, &f, "5000 exclusions");
    const char *unknown[] = {"not-an-item"};
    f.exclude_ids = unknown;
    f.n_exclude_ids = 1;
    check_batches("ex", &ref, 30, &f, "unknown exclusion");
    free(many);
    free(q);
    ref_free(&ref);
}

/* ---- writes
 * -------------------------------------------------------------------------------------- */

Test(engine, deleted_and_reupserted_ids)
{
    seed_test();
    ref_coll ref;
    make_collection("del", 10, AFF_METRIC_L2, &ref);
    add_random("del", &ref, 2000, "d");
    /* Delete a random third, one id twice and one unknown id. */
    const char **ids = malloc(800 * sizeof *ids);
    uint32_t nd = 0;
    for (uint32_t i = 0; i < ref.n; i++)
        if (rng() % 3 == 0 && nd < 790) ids[nd++] = ref.items[i].id;
    ids[nd++] = ids[0];
    ids[nd++] = "never-existed";
    size_t deleted = 0;
    aff_err err;
    cr_assert_eq(engine_delete(engine, "del", ids, nd, &deleted, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(deleted, nd - 2);
    for (uint32_t i = 0; i < nd - 2; i++)
        ref_find(&ref, ids[i])->alive = false;
    check_batches("del", &ref, 50, NULL, "after deletes");
    engine_collection_info info;
    cr_assert_eq(engine_describe_collection(engine, "del", &info, &err), AFF_OK);
    cr_assert_eq(info.n_items, 2000 - (nd - 2));

    /* Deleted ids are gone for get and for similar-item queries. */
    item_record item;
    cr_assert_eq(engine_get_item(engine, "del", ids[0], &item, NULL, &err), AFF_ENOTFOUND);

    /* Re-upsert half of the deleted ids with new vectors, and overwrite some live ones. */
    for (uint32_t i = 0; i < nd - 2; i += 2) {
        ref_item *r = NULL;
        for (uint32_t j = 0; j < ref.n; j++)
            if (strcmp(ref.items[j].id, ids[i]) == 0) r = &ref.items[j];
        for (uint32_t j = 0; j < ref.dim; j++)
            r->vec[j] = rng_unit();
        r->alive = true;
        const char *tg[3] = {r->tags[0], r->tags[1], r->tags[2]};
        aff_item it = {.id = r->id,
                       .vector = r->vec,
                       .dim = ref.dim,
                       .attrs.category = r->category,
                       .attrs.tags = tg,
                       .attrs.n_tags = r->n_tags,
                       .attrs.price = r->price,
                       .attrs.available = r->available};
        cr_assert_eq(engine_upsert(engine, "del", &it, 1, &err), AFF_OK, "%s", err.msg);
    }
    for (uint32_t i = 1; i < ref.n; i += 7) {
        ref_item *r = &ref.items[i];
        if (!r->alive) continue;
        for (uint32_t j = 0; j < ref.dim; j++)
            r->vec[j] = rng_unit();
        r->price = 5;
        const char *tg[3] = {r->tags[0], r->tags[1], r->tags[2]};
        aff_item it = {.id = r->id,
                       .vector = r->vec,
                       .dim = ref.dim,
                       .attrs.category = r->category,
                       .attrs.tags = tg,
                       .attrs.n_tags = r->n_tags,
                       .attrs.price = r->price,
                       .attrs.available = r->available};
        cr_assert_eq(engine_upsert(engine, "del", &it, 1, &err), AFF_OK, "%s", err.msg);
    }
    check_batches("del", &ref, 50, NULL, "after re-upserts");
    aff_filter f;
    aff_filter_init(&f);
    f.price_max = 5;
    f.price_min = 5;
    check_batches("del", &ref, 50, &f, "overwritten attributes");
    free(ids);
    ref_free(&ref);
}

Test(engine, duplicate_ids_in_one_upsert_last_wins)
{
    float a[2] = {1, 0}, b[2] = {0, 1};
    aff_item items[2] = {
        {.id = "x", .vector = a, .dim = 2, .attrs.price = 1, .attrs.category = "first"},
        {.id = "x", .vector = b, .dim = 2, .attrs.price = 2, .attrs.category = "second"},
    };
    ref_coll ref;
    make_collection("dup", 2, AFF_METRIC_IP, &ref);
    aff_err err;
    cr_assert_eq(engine_upsert(engine, "dup", items, 2, &err), AFF_OK);
    item_record it;
    float v[2];
    cr_assert_eq(engine_get_item(engine, "dup", "x", &it, v, &err), AFF_OK);
    cr_assert_str_eq(it.category, "second");
    cr_assert_float_eq(it.price, 2.0f, 1e-6);
    cr_assert_float_eq(v[1], 1.0f, 1e-6);
    engine_collection_info info;
    cr_assert_eq(engine_describe_collection(engine, "dup", &info, &err), AFF_OK);
    cr_assert_eq(info.n_items, 1);
}

Test(engine, get_item_returns_attributes_and_vector)
{
    float v[3] = {3, 4, 0};
    const char *tags[] = {"sale", "new", "sale"};
    aff_item it = {.id = "sku-1",
                   .vector = v,
                   .dim = 3,
                   .attrs.category = "shoes",
                   .attrs.tags = tags,
                   .attrs.n_tags = 3,
                   .attrs.price = 19.99f,
                   .attrs.available = true};
    ref_coll ref;
    make_collection("get", 3, AFF_METRIC_COSINE, &ref);
    aff_err err;
    cr_assert_eq(engine_upsert(engine, "get", &it, 1, &err), AFF_OK);
    item_record out;
    float got[3];
    cr_assert_eq(engine_get_item(engine, "get", "sku-1", &out, got, &err), AFF_OK);
    cr_assert_str_eq(out.id, "sku-1");
    cr_assert_str_eq(out.category, "shoes");
    cr_assert_eq(out.n_tags, 2, "duplicate tags collapse");
    cr_assert(out.available);
    cr_assert_float_eq(out.price, 19.99f, 1e-5);
    /* Cosine collections store normalized vectors. */
    cr_assert_float_eq(got[0], 0.6f, 1e-6);
    cr_assert_float_eq(got[1], 0.8f, 1e-6);
}

Test(engine, similar_items_exclude_the_item_itself)
{
    seed_test();
    ref_coll ref;
    make_collection("sim", 8, AFF_METRIC_COSINE, &ref);
    add_random("sim", &ref, 500, "i");
    aff_query qs[6];
    for (int i = 0; i < 6; i++)
        qs[i] = (aff_query){.item_id = ref.items[rng() % ref.n].id, .k = 10};
    search_and_check("sim", &ref, qs, 1, "similar nq=1");
    search_and_check("sim", &ref, qs, 6, "similar nq=6");
    aff_query missing = {.item_id = "nope", .k = 3};
    aff_hit hits[3];
    uint32_t n;
    aff_err err;
    cr_assert_eq(engine_search(engine, NULL, "sim", &missing, 1, hits, &n, &err), AFF_ENOTFOUND);
    cr_assert(strstr(err.msg, "nope"));
    ref_free(&ref);
}

Test(engine, batch_with_one_bad_query_answers_the_others)
{
    seed_test();
    ref_coll ref;
    make_collection("mixed", 8, AFF_METRIC_IP, &ref);
    add_random("mixed", &ref, 300, "m");
    float *q = random_queries(3, 8);
    aff_query qs[3] = {
        {.vector = q, .dim = 8, .k = 5},
        {.vector = q + 8, .dim = 7, .k = 5}, /* wrong dimension */
        {.vector = q + 16, .dim = 8, .k = 5},
    };
    aff_hit hits[15];
    uint32_t n[3];
    aff_err errs[3];
    cr_assert_eq(engine_search(engine, NULL, "mixed", qs, 3, hits, n, errs), AFF_EINVAL);
    cr_assert_eq(errs[0].code, AFF_OK);
    cr_assert_eq(errs[1].code, AFF_EINVAL);
    cr_assert(strstr(errs[1].msg, "dimension is 8"), "%s", errs[1].msg);
    cr_assert_eq(errs[2].code, AFF_OK);
    cr_assert_eq(n[0], 5);
    cr_assert_eq(n[1], 0);
    check_answer(&ref, q + 16, 5, NULL, NULL, hits + 10, n[2], "third query");
    free(q);
    ref_free(&ref);
}

/* ---- re-ranking
 * ------------------------------------------------------------------------------------- */

Test(engine, rerank_blends_scores_and_puts_unknown_ids_last)
{
    float vx[2] = {1, 0}, vy[2] = {0, 1}, vz[2] = {0.7f, 0.7f};
    aff_item items[3] = {
        {.id = "x", .vector = vx, .dim = 2},
        {.id = "y", .vector = vy, .dim = 2},
        {.id = "z", .vector = vz, .dim = 2},
    };
    ref_coll ref;
    make_collection("rr", 2, AFF_METRIC_IP, &ref);
    aff_err err;
    cr_assert_eq(engine_upsert(engine, "rr", items, 3, &err), AFF_OK);
    float user[2] = {1, 0};
    const char *cands[] = {"y", "ghost", "x", "z"};
    float base[] = {0.9f, 5.0f, 0.1f, 0.5f};
    aff_rerank_query q = {
        .vector = user, .dim = 2, .ids = cands, .base_scores = base, .n = 4, .weight = 0.5f};
    aff_rerank_hit out[4];
    aff_err qe;
    cr_assert_eq(engine_rerank(engine, NULL, "rr", &q, 1, out, &qe), AFF_OK, "%s", qe.msg);
    /* blended: y = 0.45, x = 0.55, z = 0.6; ghost unknown → last. */
    cr_assert_eq(out[0].index, 3);
    cr_assert_eq(out[1].index, 2);
    cr_assert_eq(out[2].index, 0);
    cr_assert_eq(out[3].index, 1);
    cr_assert_not(out[3].found);
    cr_assert_float_eq(out[0].blended, 0.6f, 1e-5);
    cr_assert_float_eq(out[0].affinity, 0.7f, 1e-5);
    cr_assert_float_eq(out[1].base, 0.1f, 1e-6);

    /* weight 1: pure affinity; weight 0: the caller's order by base score. */
    q.weight = 1;
    cr_assert_eq(engine_rerank(engine, NULL, "rr", &q, 1, out, &qe), AFF_OK);
    cr_assert_eq(out[0].index, 2);
    q.weight = 0;
    cr_assert_eq(engine_rerank(engine, NULL, "rr", &q, 1, out, &qe), AFF_OK);
    cr_assert_eq(out[0].index, 0);

    /* A batch: a bad query does not disturb its neighbours' output slots. */
    aff_rerank_query batch[3] = {q, q, q};
    batch[0].weight = 1;
    batch[1].weight = 2; /* invalid */
    batch[2].weight = 1;
    aff_rerank_hit outb[12];
    aff_err qes[3];
    cr_assert_eq(engine_rerank(engine, NULL, "rr", batch, 3, outb, qes), AFF_EINVAL);
    cr_assert_eq(qes[1].code, AFF_EINVAL);
    cr_assert_eq(outb[0].index, 2);
    cr_assert_eq(outb[8].index, 2);
}

/* ---- collections
 * ------------------------------------------------------------------------------------ */

Test(engine, collections_create_list_describe_drop)
{
    aff_err err;
    engine_collection_spec a = {.name = "products", .dim = 64, .metric = AFF_METRIC_COSINE};
    engine_collection_spec b = {.name = "banners", .dim = 8, .metric = AFF_METRIC_IP};
    cr_assert_eq(engine_create_collection(engine, &a, &err), AFF_OK);
    cr_assert_eq(engine_create_collection(engine, &b, &err), AFF_OK);
    cr_assert_eq(engine_create_collection(engine, &a, &err), AFF_EEXIST);
    cr_assert(strstr(err.msg, "already exists"));
    engine_collection_info *infos;
    size_t n;
    cr_assert_eq(engine_list_collections(engine, &infos, &n, &err), AFF_OK);
    cr_assert_eq(n, 2);
    cr_assert_str_eq(infos[0].name, "banners");
    cr_assert_str_eq(infos[1].name, "products");
    cr_assert_eq(infos[1].dim, 64);
    cr_assert_str_eq(infos[1].backend, "faiss-cpu");
    free(infos);
    cr_assert_eq(engine_drop_collection(engine, "banners", &err), AFF_OK);
    cr_assert_eq(engine_drop_collection(engine, "banners", &err), AFF_ENOTFOUND);
    engine_collection_info info;
    cr_assert_eq(engine_describe_collection(engine, "banners", &info, &err), AFF_ENOTFOUND);
    cr_assert_eq(engine_describe_collection(engine, "products", &info, &err), AFF_OK);
    cr_assert_eq(info.n_items, 0);
    cr_assert_gt(info.memory_bytes, 0);
}

Test(engine, hnsw_collection_finds_near_neighbours_and_filters_exactly)
{
    seed_test();
    aff_err err;
    engine_collection_spec spec = {.name = "graph",
                                   .dim = 16,
                                   .metric = AFF_METRIC_L2,
                                   .index = BACKEND_INDEX_HNSW,
                                   .hnsw_ef_search = 128};
    cr_assert_eq(engine_create_collection(engine, &spec, &err), AFF_OK, "%s", err.msg);
    ref_coll ref = {.dim = 16, .metric = AFF_METRIC_L2};
    add_random("graph", &ref, 2000, "g");
    /* An item's own vector finds the item first (distance 0). */
    for (int i = 0; i < 20; i++) {
        ref_item *r = &ref.items[rng() % ref.n];
        aff_query q = {.vector = r->vec, .dim = 16, .k = 1};
        aff_hit hit;
        uint32_t n;
        cr_assert_eq(engine_search(engine, NULL, "graph", &q, 1, &hit, &n, &err), AFF_OK);
        cr_assert_eq(n, 1);
        cr_assert_str_eq(hit.id, r->id);
    }
    aff_filter f;
    aff_filter_init(&f);
    f.available_only = true;
    check_batches("graph", &ref, 10, &f, "hnsw filtered (exact path)");
    /* After deletes the graph is rebuilt: deleted ids never come back. */
    const char *gone[] = {ref.items[0].id, ref.items[1].id};
    size_t nd;
    cr_assert_eq(engine_delete(engine, "graph", gone, 2, &nd, &err), AFF_OK);
    ref.items[0].alive = ref.items[1].alive = false;
    aff_query q = {.vector = ref.items[0].vec, .dim = 16, .k = 10};
    aff_hit hits[10];
    uint32_t n;
    cr_assert_eq(engine_search(engine, NULL, "graph", &q, 1, hits, &n, &err), AFF_OK);
    for (uint32_t i = 0; i < n; i++) {
        cr_assert_str_neq(hits[i].id, gone[0]);
        cr_assert_str_neq(hits[i].id, gone[1]);
    }
    ref_free(&ref);
}

/* ---- bad input
 * --------------------------------------------------------------------------------------- */

Test(engine, bad_collection_specs_are_rejected)
{
    aff_err err;
    engine_collection_spec bad[] = {
        {.name = "", .dim = 4},
        {.name = "has space", .dim = 4},
        {.name = "x", .dim = 0},
        {.name = "x", .dim = AFF_MAX_DIM + 1},
        {.name = "x", .dim = 4, .metric = (aff_metric)9},
        {.name = "x", .dim = 4, .index = (backend_index_kind)7},
        {.name = "this-name-is-far-too-long-for-a-collection-because-it-has-more-than-64-chars",
         .dim = 4},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        aff__err_clear(&err);
        cr_assert_eq(engine_create_collection(engine, &bad[i], &err), AFF_EINVAL, "case %zu", i);
        cr_assert_neq(err.msg[0], '\0', "case %zu has a message", i);
    }
    engine_collection_info *infos;
    size_t n;
    cr_assert_eq(engine_list_collections(engine, &infos, &n, &err), AFF_OK);
    cr_assert_eq(n, 0, "nothing half-created");
    free(infos);
}

Test(engine, bad_items_are_rejected_and_nothing_is_applied)
{
    ref_coll ref;
    make_collection("strict", 3, AFF_METRIC_COSINE, &ref);
    float good[3] = {1, 2, 3}, nan_v[3] = {1, NAN, 3}, inf_v[3] = {INFINITY, 0, 0},
          zero[3] = {0, 0, 0};
    char long_id[AFF_MAX_ID_LEN + 2];
    memset(long_id, 'a', sizeof long_id - 1);
    long_id[sizeof long_id - 1] = '\0';
    const char *tags17[17];
    for (int i = 0; i < 17; i++)
        tags17[i] = "t";
    const char *empty_tag[] = {""};
    struct {
        aff_item item;
        const char *expect;
    } cases[] = {
        {{.id = "a", .vector = good, .dim = 2}, "dimension is 3"},
        {{.id = "a", .vector = nan_v, .dim = 3}, "NaN"},
        {{.id = "a", .vector = inf_v, .dim = 3}, "Inf"},
        {{.id = "a", .vector = zero, .dim = 3}, "all zeros"},
        {{.id = "", .vector = good, .dim = 3}, "empty"},
        {{.id = NULL, .vector = good, .dim = 3}, "empty"},
        {{.id = long_id, .vector = good, .dim = 3}, "longer than 128"},
        {{.id = "a", .vector = good, .dim = 3, .attrs.tags = tags17, .attrs.n_tags = 17}, "at most 16"},
        {{.id = "a", .vector = good, .dim = 3, .attrs.tags = empty_tag, .attrs.n_tags = 1}, "tag 0"},
        {{.id = "a", .vector = good, .dim = 3, .attrs.price = NAN}, "price"},
        {{.id = "a", .vector = NULL, .dim = 3}, "vector"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        aff_item batch[2] = {{.id = "fine", .vector = good, .dim = 3}, cases[i].item};
        aff_err err = {0};
        cr_assert_eq(engine_upsert(engine, "strict", batch, 2, &err), AFF_EINVAL, "case %zu", i);
        cr_assert(strstr(err.msg, cases[i].expect), "case %zu: message \"%s\" lacks \"%s\"", i,
                  err.msg, cases[i].expect);
    }
    engine_collection_info info;
    aff_err err;
    cr_assert_eq(engine_describe_collection(engine, "strict", &info, &err), AFF_OK);
    cr_assert_eq(info.n_items, 0, "a rejected batch applies nothing");
    aff_item it = {.id = "a", .vector = good, .dim = 3};
    cr_assert_eq(engine_upsert(engine, "nope", &it, 1, &err), AFF_ENOTFOUND);
    cr_assert(strstr(err.msg, "nope"));
}

Test(engine, bad_queries_are_rejected_with_reasons)
{
    ref_coll ref;
    make_collection("q", 2, AFF_METRIC_IP, &ref);
    float v[2] = {1, 1}, nan_v[2] = {NAN, 1};
    aff_filter inverted;
    aff_filter_init(&inverted);
    inverted.price_min = 10;
    inverted.price_max = 1;
    aff_filter nan_price;
    aff_filter_init(&nan_price);
    nan_price.price_min = NAN;
    const char *empty[] = {""};
    aff_filter empty_cat;
    aff_filter_init(&empty_cat);
    empty_cat.categories = empty;
    empty_cat.n_categories = 1;
    struct {
        aff_query q;
        const char *expect;
    } cases[] = {
        {{.vector = v, .dim = 2, .k = 0}, "out of range 1..1024"},
        {{.vector = v, .dim = 2, .k = AFF_MAX_K + 1}, "out of range 1..1024"},
        {{.vector = v, .dim = 3, .k = 1}, "dimension is 2"},
        {{.vector = nan_v, .dim = 2, .k = 1}, "NaN"},
        {{.vector = NULL, .item_id = "", .k = 1}, "empty"},
        {{.vector = v, .dim = 2, .k = 1, .filter = &inverted}, "above price_max"},
        {{.vector = v, .dim = 2, .k = 1, .filter = &nan_price}, "NaN"},
        {{.vector = v, .dim = 2, .k = 1, .filter = &empty_cat}, "filter category"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        aff_err err = {0};
        cr_assert_eq(engine_validate_query(engine, "q", &cases[i].q, &err), AFF_EINVAL, "case %zu",
                     i);
        cr_assert(strstr(err.msg, cases[i].expect), "case %zu: \"%s\" lacks \"%s\"", i, err.msg,
                  cases[i].expect);
        aff_hit hits[2000];
        uint32_t n;
        cr_assert_eq(engine_search(engine, NULL, "q", &cases[i].q, 1, hits, &n, &err), AFF_EINVAL);
    }
    aff_query ok = {.vector = v, .dim = 2, .k = 1};
    aff_err err;
    cr_assert_eq(engine_validate_query(engine, "missing", &ok, &err), AFF_ENOTFOUND);
    aff_hit hit;
    uint32_t n;
    cr_assert_eq(engine_search(engine, NULL, "missing", &ok, 1, &hit, &n, &err), AFF_ENOTFOUND);
}

/* ---- concurrency
 * --------------------------------------------------------------------------------------- */

typedef struct writer_arg {
    uint32_t dim;
    atomic_int rounds; /* rounds completed */
    atomic_bool done;  /* the writer has finished (all rounds, or an error) */
} writer_arg;

/* Upserts and deletes "churn-*" items while the readers search. */
static void *writer_main(void *p)
{
    writer_arg *w = p;
    float *v = malloc(w->dim * sizeof *v);
    char id[32];
    for (int round = 0; round < 400; round++) {
        for (uint32_t j = 0; j < w->dim; j++)
            v[j] = (float)((round * 7 + j) % 13) / 13.0f - 0.5f;
        v[0] = -1; /* far from the probes below */
        snprintf(id, sizeof id, "churn-%d", round % 50);
        aff_item it = {.id = id, .vector = v, .dim = w->dim, .attrs.price = 1};
        aff_err err;
        if (engine_upsert(engine, "conc", &it, 1, &err) != AFF_OK) break;
        if (round % 3 == 0) {
            const char *ids[] = {id};
            engine_delete(engine, "conc", ids, 1, NULL, &err);
        }
        atomic_store(&w->rounds, round + 1);
    }
    free(v);
    atomic_store(&w->done, true);
    return NULL;
}

Test(engine, concurrent_search_during_upsert_and_delete)
{
    seed_test();
    ref_coll ref;
    make_collection("conc", 8, AFF_METRIC_COSINE, &ref);
    add_random("conc", &ref, 1000, "base");
    writer_arg w = {.dim = 8};
    pthread_t th;
    pthread_create(&th, NULL, writer_main, &w);
    /* Every base item's own vector must find that item first, whatever the writer does. The
     * reader keeps going until the writer has finished, so the two always overlap. */
    for (int i = 0; i < 600 || !atomic_load(&w.done); i++) {
        ref_item *r = &ref.items[rng() % ref.n];
        aff_query q[4];
        for (int j = 0; j < 4; j++)
            q[j] = (aff_query){.vector = r->vec, .dim = 8, .k = 3};
        uint32_t nq = 1 + (uint32_t)(i % 4);
        aff_hit hits[12];
        uint32_t n[4];
        aff_err errs[4];
        cr_assert_eq(engine_search(engine, NULL, "conc", q, nq, hits, n, errs), AFF_OK, "%s",
                     errs[0].msg);
        for (uint32_t j = 0; j < nq; j++) {
            cr_assert_eq(n[j], 3);
            cr_assert_str_eq(hits[j * 3].id, r->id);
            cr_assert(hits[j * 3].score >= hits[j * 3 + 1].score);
        }
    }
    pthread_join(th, NULL);
    cr_assert_eq(atomic_load(&w.rounds), 400, "the writer stopped early");
    const char *churn[50];
    char names[50][16];
    for (int i = 0; i < 50; i++) {
        snprintf(names[i], sizeof names[i], "churn-%d", i);
        churn[i] = names[i];
    }
    aff_err err;
    cr_assert_eq(engine_delete(engine, "conc", churn, 50, NULL, &err), AFF_OK);
    check_batches("conc", &ref, 5, NULL, "after churn");
    ref_free(&ref);
}

Test(engine, noop_backend_runs_bookkeeping_without_scoring)
{
    aff_engine *noop;
    aff_err err = {0};
    engine_config cfg = {.backend = ENGINE_BACKEND_NOOP};
    cr_assert_eq(engine_create(&noop, &cfg, &err), AFF_OK, "%s", err.msg);
    engine_collection_spec spec = {.name = "n", .dim = 2, .metric = AFF_METRIC_IP};
    cr_assert_eq(engine_create_collection(noop, &spec, &err), AFF_OK);
    float v[2] = {1, 2};
    aff_item items[3] = {{.id = "a", .vector = v, .dim = 2},
                         {.id = "b", .vector = v, .dim = 2},
                         {.id = "c", .vector = v, .dim = 2}};
    cr_assert_eq(engine_upsert(noop, "n", items, 3, &err), AFF_OK);
    aff_query q = {.vector = v, .dim = 2, .k = 2};
    aff_hit hits[2];
    uint32_t n;
    cr_assert_eq(engine_search(noop, NULL, "n", &q, 1, hits, &n, &err), AFF_OK);
    cr_assert_eq(n, 2);
    cr_assert_str_eq(hits[0].id, "a");
    backend_info info;
    engine_backend_info(noop, &info);
    cr_assert_str_eq(info.name, "noop");
    engine_destroy(noop);
}

Test(engine, filter_items_agrees_with_search_semantics)
{
    seed_test();
    ref_coll ref;
    make_collection("fi", 4, AFF_METRIC_IP, &ref);
    add_random("fi", &ref, 300, "f");
    /* The filter is built around one random item with a tag (not item 3, which is excluded),
     * so it passes at least one item whatever the seed. */
    uint32_t anchor = 0;
    while (anchor == 3 || ref.items[anchor].n_tags == 0)
        anchor++;
    const char *cats[] = {ref.items[anchor].category, "hats"};
    const char *tags[] = {ref.items[anchor].tags[0]};
    aff_filter f;
    aff_filter_init(&f);
    f.categories = cats;
    f.n_categories = 2;
    f.tags = tags;
    f.n_tags = 1;
    f.price_max = ref.items[anchor].price > 60 ? ref.items[anchor].price : 60;
    const char *excluded[] = {ref.items[3].id};
    f.exclude_ids = excluded;
    f.n_exclude_ids = 1;
    const char *ids[302];
    bool pass[302];
    for (uint32_t i = 0; i < ref.n; i++)
        ids[i] = ref.items[i].id;
    ids[300] = "unknown";
    ids[301] = NULL;
    aff_err err;
    cr_assert_eq(engine_filter_items(engine, "fi", ids, 302, &f, pass, &err), AFF_OK, "%s",
                 err.msg);
    uint32_t passing = 0;
    for (uint32_t i = 0; i < ref.n; i++) {
        cr_assert_eq(pass[i], ref_passes(&ref.items[i], &f, NULL), "item %u", i);
        passing += pass[i];
    }
    cr_assert_gt(passing, 0, "the filter passes its anchor item %u", anchor);
    cr_assert_not(pass[3]);
    cr_assert_not(pass[300]);
    cr_assert_not(pass[301]);
    cr_assert_eq(engine_filter_items(engine, "fi", ids, 2, NULL, pass, &err), AFF_OK);
    cr_assert(pass[0] && pass[1]);
    ref_free(&ref);
}

Test(engine, a_worker_arena_serves_repeated_searches_without_allocating)
{
    ref_coll ref;
    make_collection("arena", 16, AFF_METRIC_COSINE, &ref);
    add_random("arena", &ref, 3000, "a");
    const char *cat[] = {"shoes", "bags"};
    const char *tag[] = {"sale"};
    const char *ex[] = {"a1", "a2"};
    aff_filter f;
    aff_filter_init(&f);
    f.categories = cat;
    f.n_categories = 2;
    f.exclude_tags = tag;
    f.n_exclude_tags = 1;
    f.exclude_ids = ex;
    f.n_exclude_ids = 2;
    float *q = random_queries(8, 16);
    aff_query qs[8];
    for (uint32_t i = 0; i < 8; i++)
        qs[i] = (aff_query){.vector = q + i * 16, .dim = 16, .k = 20, .filter = i % 2 ? &f : NULL};
    qs[7] = (aff_query){.item_id = "a7", .k = 20, .filter = &f};
    aff_hit hits[8 * 20], fresh[8 * 20];
    uint32_t n[8], n_fresh[8];
    aff_err errs[8];
    size_t warm = 0;
    for (int round = 0; round < 50; round++) {
        size_t nq = 1 + (size_t)round % 8; /* batch sizes that take the scan paths */
        cr_assert_eq(engine_search(engine, worker_arena, "arena", qs + 8 - nq, nq, hits, n, errs),
                     AFF_OK, "%s", errs[0].msg);
        cr_assert_eq(engine_search(engine, NULL, "arena", qs + 8 - nq, nq, fresh, n_fresh, errs),
                     AFF_OK, "%s", errs[0].msg);
        for (size_t i = 0; i < nq; i++) {
            cr_assert_eq(n[i], n_fresh[i]);
            for (uint32_t h = 0; h < n[i]; h++) {
                cr_assert_str_eq(hits[i * 20 + h].id, fresh[i * 20 + h].id, "round %d", round);
                cr_assert_float_eq(hits[i * 20 + h].score, fresh[i * 20 + h].score, 0);
            }
        }
        if (round == 7) warm = aff_scratch_allocations(worker_arena); /* every size seen */
    }
    check_batches("arena", &ref, 10, &f, "arena filtered"); /* the checked path, same arena */
    cr_assert_eq(aff_scratch_allocations(worker_arena) > 0, true);
    cr_assert_leq(aff_scratch_allocations(worker_arena), warm + 1,
                  "after warm-up the arena allocates at most once more (check_batches' nq = 40)");
    free(q);
    ref_free(&ref);
}

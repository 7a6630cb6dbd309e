/*
 * The CPU backend's bf16 and int8 scans (src/cpu_score.c) against a plain fp32 reference sort
 * written here, through the real backend (writes, overwrites, deletes as the engine does them,
 * the cold fp32 store). Every kernel set this CPU has is run, the portable one always, so the
 * fallback is exercised on every machine; the fp32 path runs through the same checks.
 *
 * The reference scores each passing row with cpu_dot_rows, the scorer the re-ranking uses, so a
 * bf16/int8 answer must equal it exactly: the same rows in the same order (ties by lower row)
 * with the same scores. The fp32 path (FAISS/BLAS for larger batches) rounds differently, so it
 * is compared by value within a tolerance, ties in any order. Random data; each test prints its
 * seed (AFF_TEST_SEED replays one).
 */
#include "cpu_score.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "engine.h"
#include "log.h"

#include "test_rng.h"

TestSuite(cpu_score, .timeout = 600);

typedef enum data_kind {
    DATA_UNIFORM,  /* uniform in [-1, 1] */
    DATA_TIES,     /* rows drawn from 5 distinct vectors on a coarse grid: many equal scores */
    DATA_SCALES,   /* rows scaled by 1e-3 .. 1e3, some all-zero */
    DATA_NEARTIES, /* one base vector plus tiny per-row noise: scores within float rounding */
    /* rows around 5 centres, the category of a row its centre's (1..5; 0 for 1 row in 10 with
     * a cap), queries near a centre: a query's best rows crowd its own category, as in a shop */
    DATA_CLUSTERED,
} data_kind;

typedef struct ref_table {
    uint32_t dim, n;
    aff_metric metric;
    float *vec; /* n × dim, the rows as the backend holds them */
    backend_row_attrs *attrs;
} ref_table;

static void fill_row(float *x, uint32_t dim, data_kind kind, const float *pool)
{
    switch (kind) {
    case DATA_UNIFORM:
        for (uint32_t j = 0; j < dim; j++)
            x[j] = rng_unit();
        break;
    case DATA_TIES:
        memcpy(x, pool + (size_t)(rng() % 5) * dim, dim * sizeof *x);
        break;
    case DATA_SCALES: {
        float s = rng() % 10 == 0 ? 0.0f : powf(10.0f, (float)(rng() % 7) - 3.0f);
        for (uint32_t j = 0; j < dim; j++)
            x[j] = s * rng_unit();
        break;
    }
    case DATA_NEARTIES:
        for (uint32_t j = 0; j < dim; j++)
            x[j] = pool[j] + 1e-6f * rng_unit();
        break;
    case DATA_CLUSTERED: /* run_case picks the centre (the row's category) */
        break;
    }
}

/* A DATA_CLUSTERED row or query: centre c of pool plus noise. */
static void fill_clustered(float *x, uint32_t dim, const float *pool, uint32_t c)
{
    for (uint32_t j = 0; j < dim; j++)
        x[j] = pool[(size_t)c * dim + j] + 0.3f * rng_unit();
}

static float ref_score(const ref_table *t, const float *q, uint32_t row)
{
    float d;
    cpu_dot_rows(q, t->vec + (size_t)row * t->dim, 1, t->dim, &d);
    return t->metric == AFF_METRIC_L2
               ? 2.0f * d - cpu_sq_norm(t->vec + (size_t)row * t->dim, t->dim)
               : d;
}

typedef struct scored {
    float s;
    uint32_t row;
} scored;

static int cmp_scored(const void *a, const void *b)
{
    const scored *x = a, *y = b;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    return x->row < y->row ? -1 : x->row > y->row;
}

/* Checks one query's answer against the reference. exact: same rows, same order, same bits. */
static void check_query(const ref_table *t, const float *q, uint32_t k, const backend_filter *f,
                        uint32_t cap, const uint32_t *rows, const float *scores, uint32_t count,
                        bool exact, const char *what)
{
    scored *all = malloc((t->n + 1) * sizeof *all);
    uint32_t m = 0;
    for (uint32_t r = 0; r < t->n; r++)
        if (!f || backend_filter_matches(f, &t->attrs[r], r))
            all[m++] = (scored){ref_score(t, q, r), r};
    qsort(all, m, sizeof *all, cmp_scored);
    if (cap) { /* best first, skipping a category that holds cap already (category 0: none) */
        uint32_t held[256] = {0}, kept = 0;
        for (uint32_t i = 0; i < m; i++) {
            uint32_t c = t->attrs[all[i].row].category;
            cr_assert_lt(c, 256);
            if (c && held[c] == cap) continue;
            held[c] += c ? 1 : 0;
            all[kept++] = all[i];
        }
        m = kept;
    }
    float shift = t->metric == AFF_METRIC_L2 ? -cpu_sq_norm(q, t->dim) : 0.0f;
    uint32_t want = k < m ? k : m;
    cr_assert_eq(count, want, "%s: %u results, want %u", what, count, want);
    for (uint32_t i = 0; i < want; i++) {
        float ref = all[i].s + shift;
        if (exact) {
            cr_assert(rows[i] == all[i].row && scores[i] == ref,
                      "%s: hit %u is row %u score %.9g, want row %u score %.9g", what, i, rows[i],
                      (double)scores[i], all[i].row, (double)ref);
        } else {
            float tol = 1e-4f * (1.0f + fabsf(ref));
            cr_assert(fabsf(scores[i] - ref) <= tol, "%s: hit %u score %.9g, want %.9g", what, i,
                      (double)scores[i], (double)ref);
            cr_assert(rows[i] < t->n &&
                          (!f || backend_filter_matches(f, &t->attrs[rows[i]], rows[i])),
                      "%s: hit %u is row %u, which does not pass", what, i, rows[i]);
            float own = ref_score(t, q, rows[i]) + shift;
            cr_assert(fabsf(own - scores[i]) <= tol, "%s: row %u scored %.9g, its score is %.9g",
                      what, rows[i], (double)scores[i], (double)own);
        }
    }
    free(all);
}

typedef struct case_spec {
    backend_precision precision;
    backend_cpu_isa isa;
    aff_metric metric;
    data_kind kind;
    uint32_t n, dim, nq;
    uint32_t k;          /* 0: random per query in 1..n+5 */
    bool filter;         /* category filter plus exclusions on every other query */
    uint32_t deletes;    /* rows deleted (last row moved into the hole) after loading */
    uint32_t overwrites; /* rows rewritten in place after loading */
    bool shared;         /* odd queries repeat the previous query's vector (same_as) */
    /* 40 categories, filters admitting one (2.5%: read from the category lists even beside a
     * scan) or two (5%: read alone, ride on a shared scan); overwrites change categories */
    bool narrow;
    uint32_t cap; /* backend_search.max_per_category on every query (0: none); 1 row in 10 has no category */
    /* 200 categories (ids sharing their low 6 bits, as the scan's per-query counts bucket
     * them), and every fourth query's filter also bounds the price (read from attributes) */
    bool wide;
    /* With shared and cap: odd queries are uncapped, share the previous query's vector and
     * admit one category, as a promotion beside its capped organic query: query 4m+1 the
     * previous query's own category (DATA_CLUSTERED: the crowded one, whose rows the capped
     * query's floor would drop), 4m+3 another */
    bool promo;
} case_spec;

/* Builds a backend table as the case says, mirrors it in a reference, searches, compares. */
static void run_case(const case_spec *cs)
{
    char what[160];
    snprintf(what, sizeof what, "%s/%s metric %d kind %d n %u dim %u nq %u k %u",
             cpu_precision_name(cs->precision), cpu_isa_name(cs->isa), (int)cs->metric,
             (int)cs->kind, cs->n, cs->dim, cs->nq, cs->k);
    aff_err err = {0};
    backend *b = NULL;
    backend_faiss_config cfg = {.precision = cs->precision, .isa = cs->isa};
    cr_assert_eq(backend_faiss_create(&b, &cfg, &err), AFF_OK, "%s", err.msg);
    backend_table *bt = NULL;
    backend_table_params p = {.dim = cs->dim, .metric = cs->metric, .initial_capacity = 13};
    cr_assert_eq(b->ops->table_create(b, &p, &bt, &err), AFF_OK, "%s", err.msg);

    ref_table t = {.dim = cs->dim, .n = cs->n, .metric = cs->metric};
    t.vec = malloc((size_t)cs->n * cs->dim * sizeof *t.vec + 1);
    t.attrs = calloc(cs->n + 1, sizeof *t.attrs);
    float *pool = malloc(5 * (size_t)cs->dim * sizeof *pool);
    for (uint32_t i = 0; i < 5 * cs->dim; i++)
        pool[i] = (float)((int)(rng() % 9) - 4) * 0.25f;
    uint32_t *rows = malloc((cs->n + 1) * sizeof *rows);
    for (uint32_t r = 0; r < cs->n; r++) {
        fill_row(t.vec + (size_t)r * cs->dim, cs->dim, cs->kind, pool);
        t.attrs[r] = (backend_row_attrs){
            .category = 1 + rng() % (cs->wide ? 200 : cs->narrow ? 40 : 4), .available = 1};
        if (cs->kind == DATA_CLUSTERED) {
            t.attrs[r].category = 1 + rng() % 5;
            fill_clustered(t.vec + (size_t)r * cs->dim, cs->dim, pool, t.attrs[r].category - 1);
        }
        if (cs->wide) t.attrs[r].price = (float)(rng() % 100);
        if (cs->cap && rng() % 10 == 0) t.attrs[r].category = 0;
        rows[r] = r;
    }
    /* Appends in two writes, so capacity grows under a live table. */
    uint32_t half = cs->n / 2;
    cr_assert_eq(bt->ops->table_write(bt, rows, half, t.vec, t.attrs, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(bt->ops->table_write(bt, rows + half, cs->n - half, t.vec + (size_t)half * cs->dim,
                                      t.attrs + half, &err),
                 AFF_OK, "%s", err.msg);
    for (uint32_t i = 0; i < cs->overwrites && t.n; i++) {
        uint32_t r = rng() % t.n;
        fill_row(t.vec + (size_t)r * cs->dim, cs->dim, cs->kind, pool);
        if (cs->narrow) t.attrs[r].category = 1 + rng() % 40;
        if (cs->wide) t.attrs[r].category = 1 + rng() % 200;
        cr_assert_eq(
            bt->ops->table_write(bt, &r, 1, t.vec + (size_t)r * cs->dim, &t.attrs[r], &err), AFF_OK,
            "%s", err.msg);
    }
    for (uint32_t i = 0; i < cs->deletes && t.n; i++) {
        uint32_t hole = rng() % t.n, last = t.n - 1;
        cr_assert_eq(bt->ops->table_move(bt, &last, &hole, hole == last ? 0 : 1, last, &err),
                     AFF_OK, "%s", err.msg);
        memmove(t.vec + (size_t)hole * cs->dim, t.vec + (size_t)last * cs->dim,
                cs->dim * sizeof *t.vec);
        t.attrs[hole] = t.attrs[last];
        t.n = last;
    }
    cr_assert_eq(bt->ops->table_count(bt), t.n, "%s: count", what);

    /* Queries and their filters. */
    float *q = malloc((size_t)cs->nq * cs->dim * sizeof *q);
    uint32_t *k = malloc(cs->nq * sizeof *k);
    const backend_filter **filters = calloc(cs->nq, sizeof *filters);
    backend_filter *fs = calloc(cs->nq, sizeof *fs);
    uint64_t cat_bits = (1u << 1) | (1u << 3), one_cat = 1u << 3, two_cats = (1u << 3) | (1u << 5);
    uint32_t *excl = malloc(8 * sizeof *excl);
    uint32_t n_excl = 0;
    for (uint32_t r = 0; r < t.n && n_excl < 8; r += 1 + rng() % 7)
        excl[n_excl++] = r;
    size_t total = 0;
    uint32_t *same = malloc(cs->nq * sizeof *same);
    uint32_t *qcat = malloc(cs->nq * sizeof *qcat); /* DATA_CLUSTERED: the query's centre + 1 */
    uint64_t *promo_bits = malloc(cs->nq * sizeof *promo_bits);
    uint32_t *caps = malloc(cs->nq * sizeof *caps);
    for (uint32_t i = 0; i < cs->nq; i++) {
        same[i] = cs->shared && i % 2 ? i - 1 : i;
        qcat[i] = 1 + rng() % 5;
        caps[i] = cs->promo && i % 2 ? 0 : cs->cap;
        if (same[i] != i)
            memcpy(q + (size_t)i * cs->dim, q + (size_t)(i - 1) * cs->dim, cs->dim * sizeof *q);
        else if (cs->kind == DATA_CLUSTERED)
            fill_clustered(q + (size_t)i * cs->dim, cs->dim, pool, qcat[i] - 1);
        else if (cs->kind == DATA_TIES || cs->kind == DATA_NEARTIES)
            memcpy(q + (size_t)i * cs->dim, pool + (size_t)(rng() % 5) * cs->dim,
                   cs->dim * sizeof *q);
        else
            for (uint32_t j = 0; j < cs->dim; j++)
                q[(size_t)i * cs->dim + j] = rng_unit();
        k[i] = cs->k ? cs->k : 1 + rng() % (cs->n + 5);
        if (k[i] > AFF_MAX_K) k[i] = AFF_MAX_K;
        total += k[i];
        if (cs->filter && i % 2 == 0) {
            backend_filter_init(&fs[i]);
            fs[i].category_bits = !cs->narrow ? &cat_bits : i % 4 ? &one_cat : &two_cats;
            fs[i].category_words = 1;
            fs[i].exclude_rows = excl;
            fs[i].n_exclude_rows = n_excl;
            if (cs->wide) { /* categories 1 and 3 hold 1%: the price-bounded one scans */
                fs[i].category_bits = i % 4 ? NULL : &cat_bits;
                fs[i].price_min = i % 4 ? 20.0f : -INFINITY;
                fs[i].price_max = i % 4 ? 70.0f : INFINITY;
            }
            filters[i] = &fs[i];
        }
        if (cs->promo && i % 2) {
            uint32_t c = i % 4 == 1 ? qcat[i - 1] : 1 + (qcat[i - 1] % 5);
            promo_bits[i] = (uint64_t)1 << c;
            backend_filter_init(&fs[i]);
            fs[i].category_bits = &promo_bits[i];
            fs[i].category_words = 1;
            filters[i] = &fs[i];
        }
    }
    uint32_t *out_rows = malloc((total + 1) * sizeof *out_rows);
    float *out_scores = malloc((total + 1) * sizeof *out_scores);
    uint32_t *counts = malloc(cs->nq * sizeof *counts);
    backend_search s = {.queries = q,
                        .nq = cs->nq,
                        .k = k,
                        .filters = filters,
                        .same_as = same,
                        .max_per_category = cs->cap ? caps : NULL,
                        .out_rows = out_rows,
                        .out_scores = out_scores,
                        .out_counts = counts};
    cr_assert_eq(bt->ops->table_search(bt, &s, &err), AFF_OK, "%s: %s", what, err.msg);
    bool exact = cs->precision != BACKEND_PRECISION_FP32;
    size_t off = 0;
    for (uint32_t i = 0; i < cs->nq; i++) {
        check_query(&t, q + (size_t)i * cs->dim, k[i], filters[i], caps[i], out_rows + off,
                    out_scores + off, counts[i], exact, what);
        off += k[i];
    }
    /* The cold store answers reads and gather-scores with the rows as written. */
    if (t.n) {
        uint32_t r = rng() % t.n;
        float *v = malloc(cs->dim * sizeof *v);
        cr_assert_eq(bt->ops->table_read(bt, &r, 1, v, &err), AFF_OK, "%s", err.msg);
        cr_assert(memcmp(v, t.vec + (size_t)r * cs->dim, cs->dim * sizeof *v) == 0,
                  "%s: row %u reads back changed", what, r);
        free(v);
    }
    free(out_rows);
    free(out_scores);
    free(counts);
    free(caps);
    free(qcat);
    free(promo_bits);
    free(excl);
    free(same);
    free(fs);
    free(filters);
    free(k);
    free(q);
    free(rows);
    free(pool);
    free(t.vec);
    free(t.attrs);
    bt->ops->table_destroy(bt);
    b->ops->destroy(b);
}

/* The kernel sets to test here: the portable one always, and each vector set this CPU has. */
static uint32_t isas(backend_cpu_isa *out)
{
    uint32_t n = 0;
    backend_cpu_isa best = cpu_isa_detect(BACKEND_CPU_ISA_AUTO);
    for (backend_cpu_isa i = BACKEND_CPU_ISA_SCALAR; i <= best; i++)
        out[n++] = i;
    return n;
}

static const backend_precision quantized[] = {BACKEND_PRECISION_BF16, BACKEND_PRECISION_INT8};

Test(cpu_score, fixed_k_edges_match_the_reference)
{
    seed_test();
    aff_log_set_level(AFF_LOG_WARN);
    backend_cpu_isa list[4];
    uint32_t ni = isas(list);
    const uint32_t n = 300, ks[] = {1, n, n + 7};
    for (uint32_t pi = 0; pi < 2; pi++)
        for (uint32_t ii = 0; ii < ni; ii++)
            for (uint32_t ki = 0; ki < 3; ki++)
                for (int metric = 0; metric <= 2; metric += 2) {
                    case_spec cs = {.precision = quantized[pi],
                                    .isa = list[ii],
                                    .metric = (aff_metric)metric,
                                    .kind = DATA_UNIFORM,
                                    .n = n,
                                    .dim = 37,
                                    .nq = 5,
                                    .k = ks[ki],
                                    .filter = ki == 1};
                    run_case(&cs);
                }
}

Test(cpu_score, ties_and_near_ties_match_the_reference)
{
    seed_test();
    aff_log_set_level(AFF_LOG_WARN);
    backend_cpu_isa list[4];
    uint32_t ni = isas(list);
    const data_kind kinds[] = {DATA_TIES, DATA_NEARTIES, DATA_SCALES};
    for (uint32_t pi = 0; pi < 2; pi++)
        for (uint32_t ii = 0; ii < ni; ii++)
            for (uint32_t di = 0; di < 3; di++) {
                case_spec cs = {.precision = quantized[pi],
                                .isa = list[ii],
                                .metric = di == 2 ? AFF_METRIC_L2 : AFF_METRIC_IP,
                                .kind = kinds[di],
                                .n = 500,
                                .dim = 16,
                                .nq = 9,
                                .k = 10,
                                .filter = true};
                run_case(&cs);
            }
}

Test(cpu_score, filters_deletes_and_overwrites_match_the_reference)
{
    seed_test();
    aff_log_set_level(AFF_LOG_WARN);
    backend_cpu_isa list[4];
    uint32_t ni = isas(list);
    for (uint32_t pi = 0; pi < 2; pi++)
        for (uint32_t ii = 0; ii < ni; ii++) {
            /* n × dim above the threading cut-off: both threads scan and their heaps merge. */
            case_spec cs = {.precision = quantized[pi],
                            .isa = list[ii],
                            .metric = AFF_METRIC_IP,
                            .kind = DATA_UNIFORM,
                            .n = 4000,
                            .dim = 64,
                            .nq = 7,
                            .k = 0,
                            .filter = true,
                            .deletes = 300,
                            .overwrites = 200};
            run_case(&cs);
            cs.shared = true; /* a filtered and an unfiltered query share each scan */
            run_case(&cs);
        }
}

Test(cpu_score, narrow_filters_read_category_lists_and_match_the_reference)
{
    seed_test();
    aff_log_set_level(AFF_LOG_WARN);
    backend_cpu_isa list[4];
    uint32_t ni = isas(list);
    for (uint32_t pi = 0; pi < 2; pi++)
        for (uint32_t ii = 0; ii < ni; ii++)
            for (int metric = 0; metric <= 2; metric += 2) {
                /* deletes move rows between lists, overwrites change their category */
                case_spec cs = {.precision = quantized[pi],
                                .isa = list[ii],
                                .metric = (aff_metric)metric,
                                .kind = DATA_UNIFORM,
                                .n = 3000,
                                .dim = 45, /* 32 + 8 + 5: every loop of the dot products */
                                .nq = 8,
                                .k = 0,
                                .filter = true,
                                .deletes = 400,
                                .overwrites = 300,
                                .narrow = true};
                run_case(&cs);
                cs.shared = true;
                run_case(&cs);
                cs.kind = DATA_TIES; /* equal scores: lower row first on both paths */
                cs.k = 7;
                run_case(&cs);
            }
}

/* backend_search.max_per_category: the capped top-k (best first, a full category skipped)
 * exactly, on the scan (several threads), on category lists, beside shared scans, with ties,
 * over many categories. */
Test(cpu_score, a_category_cap_gives_the_capped_top_k)
{
    seed_test();
    aff_log_set_level(AFF_LOG_WARN);
    backend_cpu_isa list[4];
    uint32_t ni = isas(list);
    for (uint32_t pi = 0; pi < 2; pi++)
        for (uint32_t ii = 0; ii < ni; ii++)
            for (uint32_t cap = 1; cap <= 3; cap += 2) {
                case_spec cs = {.precision = quantized[pi],
                                .isa = list[ii],
                                .metric = AFF_METRIC_IP,
                                .kind = DATA_UNIFORM,
                                .n = 4000,
                                .dim = 45,
                                .nq = 8,
                                .k = 12,
                                .filter = true,
                                .deletes = 100,
                                .cap = cap};
                run_case(&cs); /* 4 categories: the cap binds, category-0 rows fill the rest */
                cs.narrow = true;
                cs.shared = true;
                cs.k = 0;
                run_case(&cs);
                cs.kind = DATA_TIES;
                cs.k = 9;
                cs.metric = AFF_METRIC_L2;
                run_case(&cs);
                /* 200 categories (several per low-6-bit bucket of the scan's per-query counts),
                 * filters that read attributes (a price range) beside ones that do not,
                 * overwrites moving rows between categories */
                cs = (case_spec){.precision = quantized[pi],
                                 .isa = list[ii],
                                 .metric = AFF_METRIC_IP,
                                 .kind = DATA_UNIFORM,
                                 .n = 6000,
                                 .dim = 40,
                                 .nq = 8,
                                 .k = 60, /* more than one entry per bucket */
                                 .filter = true,
                                 .deletes = 50,
                                 .overwrites = 50,
                                 .cap = cap,
                                 .wide = true};
                run_case(&cs);
                cs.shared = true;
                cs.metric = AFF_METRIC_L2;
                cs.k = 0;
                run_case(&cs);
            }
}

/* A capped query on a catalog whose categories follow the vectors: the kernel drops the rows of
 * its crowded categories under their floors, but not those an uncapped query of the same
 * vector admits (a promotion of the crowded category, or of another): each query's answer is
 * still the exact (capped) top-k. */
Test(cpu_score, a_cap_on_clustered_rows_drops_only_what_no_query_takes)
{
    seed_test();
    aff_log_set_level(AFF_LOG_WARN);
    backend_cpu_isa list[4];
    uint32_t ni = isas(list);
    for (uint32_t pi = 0; pi < 2; pi++)
        for (uint32_t ii = 0; ii < ni; ii++)
            for (uint32_t cap = 1; cap <= 3; cap++) {
                case_spec cs = {.precision = quantized[pi],
                                .isa = list[ii],
                                .metric = AFF_METRIC_IP,
                                .kind = DATA_CLUSTERED,
                                .n = 6000,
                                .dim = 64,
                                .nq = 8,
                                .k = 4 * cap + 3, /* a full category, more than k / cap rows */
                                .deletes = 30,
                                .cap = cap};
                run_case(&cs); /* capped queries alone */
                cs.shared = true;
                cs.promo = true;
                run_case(&cs);
                cs.metric = AFF_METRIC_L2;
                cs.filter = true; /* the capped queries exclude rows too */
                cs.k = 0;
                run_case(&cs);
            }
}

/* The category lists directly: a narrow query reads them (stats.posted counts its rows, nothing
 * of it is scanned) and answers bit for bit what the scan answers without them. */
Test(cpu_score, category_lists_answer_as_the_scan_does)
{
    seed_test();
    const uint32_t n = 4000, dim = 128, nq = 6; /* a dimension with its own gather copy */
    backend_cpu_isa isa = cpu_isa_detect(BACKEND_CPU_ISA_AUTO);
    cpu_codes c;
    cpu_codes_init(&c, BACKEND_PRECISION_INT8, dim, isa);
    cr_assert_eq(cpu_codes_reserve(&c, n), AFF_OK);
    float *x = malloc((size_t)n * dim * sizeof *x);
    backend_row_attrs *attrs = calloc(n, sizeof *attrs);
    cpu_cat_rows idx = {0};
    uint32_t in_cat[4] = {0}; /* categories 1..3 */
    for (uint32_t r = 0; r < n; r++) {
        for (uint32_t j = 0; j < dim; j++)
            x[(size_t)r * dim + j] = rng_unit();
        cpu_codes_set(&c, r, x + (size_t)r * dim);
        attrs[r] = (backend_row_attrs){.category = r % 50 == 7 ? 2 : 1 + rng() % 2 * 2,
                                       .available = 1};
        if (attrs[r].category == 2) attrs[r].price = (float)(r / 50 % 10);
        in_cat[attrs[r].category]++;
        cr_assert_eq(cpu_cat_rows_add(&idx, r, attrs[r].category), AFF_OK);
    }
    /* a row leaves category 2 and comes back: the list stays consistent */
    uint32_t moved = 7;
    cpu_cat_rows_remove(&idx, moved, 2);
    cr_assert_eq(idx.n[2], in_cat[2] - 1);
    cr_assert_eq(cpu_cat_rows_add(&idx, moved, 2), AFF_OK);
    cr_assert_eq(idx.n[2], in_cat[2]);
    cr_assert(!idx.broken);

    float *q = malloc((size_t)nq * dim * sizeof *q);
    for (uint32_t i = 0; i < nq * dim; i++)
        q[i] = rng_unit();
    uint64_t cat2 = 1u << 2, cat3 = 1u << 3;
    uint32_t excl[3] = {7, 57, 107}; /* rows of category 2 */
    backend_filter f_narrow, f_price, f_broad;
    backend_filter_init(&f_narrow);
    f_narrow.category_bits = &cat2;
    f_narrow.category_words = 1;
    f_narrow.exclude_rows = excl;
    f_narrow.n_exclude_rows = 3;
    f_price = f_narrow;
    f_price.price_min = 3;
    f_price.price_max = 6;
    backend_filter_init(&f_broad);
    f_broad.category_bits = &cat3;
    f_broad.category_words = 1;
    /* queries 1 and 3 share query 0's and 2's vectors (a promotion beside its organic query) */
    const backend_filter *filters[6] = {NULL, &f_narrow, &f_broad, &f_price, &f_narrow, NULL};
    uint32_t same[6] = {0, 0, 2, 2, 4, 5}, k[6] = {10, 8, 10, 5, 80, 3};
    /* caps on a scanned and a posted query: the category column (with the lists) and the
     * attributes (without them) must give the same capped answer */
    uint32_t caps[6] = {2, 0, 0, 2, 0, 1};
    for (uint32_t i = 0; i < nq; i++)
        if (same[i] != i) memcpy(q + (size_t)i * dim, q + (size_t)same[i] * dim, dim * sizeof *q);
    uint32_t rows[2][116], counts[2][6];
    float scores[2][116];
    size_t offsets[6];
    for (uint32_t i = 0, off = 0; i < nq; off += k[i], i++)
        offsets[i] = off;
    cpu_search_stats st[2];
    for (int with = 0; with < 2; with++) {
        cpu_search_table t = {.codes = &c,
                              .isa = isa,
                              .rows = x,
                              .attrs = attrs,
                              .cat_rows = with ? &idx : NULL,
                              .count = n,
                              .threads = 1};
        backend_search s = {.queries = q,
                            .nq = nq,
                            .k = k,
                            .filters = filters,
                            .same_as = same,
                            .max_per_category = caps,
                            .out_rows = rows[with],
                            .out_scores = scores[with],
                            .out_counts = counts[with]};
        aff_err err = {0};
        cr_assert_eq(cpu_score_search(&t, &s, offsets, &st[with], &err), AFF_OK, "%s", err.msg);
    }
    cr_assert_eq(st[0].posted, 0);
    /* queries 1, 3 and 4 (category 2: 80 rows, 2%) read the list; category 3 (~49%) scans */
    cr_assert_eq(st[1].posted, 3 * (uint64_t)in_cat[2], "posted %llu, want %u",
                 (unsigned long long)st[1].posted, 3 * in_cat[2]);
    for (uint32_t i = 0; i < nq; i++) {
        cr_assert_eq(counts[1][i], counts[0][i], "query %u: %u hits, scan %u", i, counts[1][i],
                     counts[0][i]);
        for (uint32_t h = 0; h < counts[0][i]; h++)
            cr_assert(rows[1][offsets[i] + h] == rows[0][offsets[i] + h] &&
                          scores[1][offsets[i] + h] == scores[0][offsets[i] + h],
                      "query %u hit %u: row %u score %.9g, scan row %u score %.9g", i, h,
                      rows[1][offsets[i] + h], (double)scores[1][offsets[i] + h],
                      rows[0][offsets[i] + h], (double)scores[0][offsets[i] + h]);
    }
    cr_assert_eq(counts[1][4], in_cat[2] - 3, "k above the category's rows: all of them but the "
                                              "excluded ones");
    for (uint32_t i = 0; i < nq; i++) { /* the caps hold */
        uint32_t held[4] = {0};
        for (uint32_t h = 0; h < counts[1][i]; h++)
            held[attrs[rows[1][offsets[i] + h]].category]++;
        for (uint32_t cc = 1; cc < 4 && caps[i]; cc++)
            cr_assert_leq(held[cc], caps[i], "query %u: %u rows of category %u", i, held[cc], cc);
    }
    cr_assert_eq(counts[1][0], 6, "query 0: two of each category, then nothing passes");
    cr_assert_eq(counts[1][3], 2, "query 3: one category, capped at 2");
    for (uint32_t h = 0; h < counts[1][3]; h++) {
        uint32_t r = rows[1][offsets[3] + h];
        cr_assert(attrs[r].category == 2 && attrs[r].price >= 3 && attrs[r].price <= 6 &&
                      r != 7 && r != 57 && r != 107,
                  "row %u does not pass the filter", r);
    }
    cpu_cat_rows_free(&idx);
    cpu_codes_free(&c);
    free(attrs);
    free(x);
    free(q);
}

Test(cpu_score, random_sizes_match_the_reference)
{
    seed_test();
    aff_log_set_level(AFF_LOG_WARN);
    backend_cpu_isa list[4];
    uint32_t ni = isas(list);
    for (int round = 0; round < 12; round++) {
        case_spec cs = {.precision = quantized[rng() % 2],
                        .isa = list[rng() % ni],
                        .metric = rng() % 2 ? AFF_METRIC_L2 : AFF_METRIC_IP,
                        .kind = (data_kind)(rng() % 4),
                        .n = 1 + rng() % 3000,
                        .dim = 1 + rng() % 70,
                        .nq = 1 + rng() % 12,
                        .k = 0,
                        .filter = rng() % 2,
                        .deletes = rng() % 20,
                        .overwrites = rng() % 20,
                        .shared = rng() % 2};
        run_case(&cs);
    }
}

Test(cpu_score, fp32_fallback_matches_the_reference)
{
    seed_test();
    aff_log_set_level(AFF_LOG_WARN);
    for (uint32_t nq = 1; nq <= 9; nq += 8) {
        case_spec cs = {.precision = BACKEND_PRECISION_FP32,
                        .isa = BACKEND_CPU_ISA_SCALAR,
                        .metric = AFF_METRIC_IP,
                        .kind = DATA_UNIFORM,
                        .n = 2000,
                        .dim = 33,
                        .nq = nq,
                        .k = 0,
                        .filter = true,
                        .deletes = 50,
                        .overwrites = 50};
        run_case(&cs);
    }
}

/* The rule's premise, |q.x - a| <= e, checked directly against a double-precision dot, at small
 * dims too (where Cauchy-Schwarz is nearly tight, so a missing term shows). */
Test(cpu_score, every_bound_holds)
{
    seed_test();
    backend_cpu_isa list[4];
    uint32_t ni = isas(list);
    const uint32_t dims[] = {1, 2, 3, 5, 16, 37, 128};
    float *pool = malloc(5 * 128 * sizeof *pool);
    for (uint32_t i = 0; i < 5 * 128; i++)
        pool[i] = (float)((int)(rng() % 9) - 4) * 0.25f;
    /* Codes built for the portable kernels (8-bit int8) and for this CPU's best (7-bit with
     * AVX2); every kernel set reads both. */
    const backend_cpu_isa builds[] = {BACKEND_CPU_ISA_SCALAR, list[ni - 1]};
    for (uint32_t pi = 0; pi < 4; pi++)
        for (uint32_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
            const uint32_t dim = dims[di], n = 64;
            cpu_codes c;
            cpu_codes_init(&c, quantized[pi % 2], dim, builds[pi / 2]);
            cr_assert_eq(cpu_codes_reserve(&c, n), AFF_OK);
            float *x = malloc((size_t)n * dim * sizeof *x), *q = malloc(dim * sizeof *q);
            for (uint32_t r = 0; r < n; r++) {
                fill_row(x + (size_t)r * dim, dim, (data_kind)(r % 4), pool);
                cpu_codes_set(&c, r, x + (size_t)r * dim);
            }
            for (uint32_t trial = 0; trial < 200; trial++) {
                for (uint32_t j = 0; j < dim; j++)
                    q[j] = rng_unit() * (trial % 3 == 0 ? 1e3f : 1.0f);
                uint32_t r = rng() % n;
                double exact = 0;
                for (uint32_t j = 0; j < dim; j++)
                    exact += (double)q[j] * x[(size_t)r * dim + j];
                for (uint32_t ii = 0; ii < ni; ii++) {
                    float a, e;
                    cr_assert_eq(cpu_score_bound(&c, list[ii], q, r, &a, &e), AFF_OK);
                    cr_assert(fabs(exact - (double)a) <= (double)e,
                              "%s/%s dim %u row %u: |%.9g - %.9g| > %.9g",
                              cpu_precision_name(quantized[pi % 2]), cpu_isa_name(list[ii]), dim, r,
                              exact, (double)a, (double)e);
                }
            }
            free(x);
            free(q);
            cpu_codes_free(&c);
        }
    free(pool);
}

Test(cpu_score, empty_table_returns_nothing)
{
    aff_err err = {0};
    backend *b = NULL;
    backend_faiss_config cfg = {.precision = BACKEND_PRECISION_INT8};
    cr_assert_eq(backend_faiss_create(&b, &cfg, &err), AFF_OK, "%s", err.msg);
    backend_table *bt = NULL;
    backend_table_params p = {.dim = 8, .metric = AFF_METRIC_IP};
    cr_assert_eq(b->ops->table_create(b, &p, &bt, &err), AFF_OK, "%s", err.msg);
    float q[8] = {1};
    uint32_t k = 5, rows[5], count = 99;
    float scores[5];
    backend_search s = {.queries = q,
                        .nq = 1,
                        .k = &k,
                        .out_rows = rows,
                        .out_scores = scores,
                        .out_counts = &count};
    cr_assert_eq(bt->ops->table_search(bt, &s, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(count, 0);
    bt->ops->table_destroy(bt);
    b->ops->destroy(b);
}

Test(cpu_score, precision_names_parse_and_bad_ones_fail)
{
    backend_precision p = BACKEND_PRECISION_AUTO;
    cr_assert_eq(cpu_precision_parse("int8", &p), AFF_OK);
    cr_assert_eq(p, BACKEND_PRECISION_INT8);
    cr_assert_eq(cpu_precision_parse("BF16", &p), AFF_OK);
    cr_assert_eq(p, BACKEND_PRECISION_BF16);
    cr_assert_eq(cpu_precision_parse("fp32", &p), AFF_OK);
    cr_assert_eq(p, BACKEND_PRECISION_FP32);
    cr_assert_eq(cpu_precision_parse("fp16", &p), AFF_EINVAL);
    cr_assert_eq(p, BACKEND_PRECISION_FP32, "a failed parse changes nothing");
    cr_assert_eq(cpu_isa_detect(BACKEND_CPU_ISA_SCALAR), BACKEND_CPU_ISA_SCALAR);
    cr_assert_eq(cpu_precision_default(BACKEND_CPU_ISA_SCALAR), BACKEND_PRECISION_FP32);
}

Test(cpu_score, engine_rejects_an_unknown_precision)
{
    aff_log_set_level(AFF_LOG_WARN);
    aff_engine *e = NULL;
    aff_err err = {0};
    engine_config cfg = {.backend = ENGINE_BACKEND_CPU};
    cr_assert_eq(engine_create(&e, &cfg, &err), AFF_OK, "%s", err.msg);
    engine_collection_spec spec = {
        .name = "c", .dim = 4, .metric = AFF_METRIC_IP, .precision = (backend_precision)9};
    cr_assert_eq(engine_create_collection(e, &spec, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "precision"), "message names the field: %s", err.msg);
    spec.precision = BACKEND_PRECISION_BF16;
    cr_assert_eq(engine_create_collection(e, &spec, &err), AFF_OK, "%s", err.msg);
    engine_destroy(e);
}

Test(cpu_score, the_flag_and_its_environment_variable_set_the_precision)
{
    aff_config cfg;
    aff_err err = {0};
    unsetenv("AFFINITY_CPU_PRECISION");
    char *plain[] = {"affinityd", NULL};
    cr_assert_eq(config_parse(&cfg, 1, plain, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(cfg.cpu_precision, BACKEND_PRECISION_AUTO);
    char *flag[] = {"affinityd", "--cpu-precision", "bf16", NULL};
    cr_assert_eq(config_parse(&cfg, 3, flag, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(cfg.cpu_precision, BACKEND_PRECISION_BF16);
    setenv("AFFINITY_CPU_PRECISION", "int8", 1);
    cr_assert_eq(config_parse(&cfg, 1, plain, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(cfg.cpu_precision, BACKEND_PRECISION_INT8);
    char *eq[] = {"affinityd", "--cpu-precision=fp32", NULL};
    cr_assert_eq(config_parse(&cfg, 2, eq, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(cfg.cpu_precision, BACKEND_PRECISION_FP32, "the flag wins over the environment");
    char *bad[] = {"affinityd", "--cpu-precision", "fp16", NULL};
    cr_assert_eq(config_parse(&cfg, 3, bad, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "--cpu-precision") && strstr(err.msg, "fp16"),
              "the message names the flag and the value: %s", err.msg);
    unsetenv("AFFINITY_CPU_PRECISION");
}

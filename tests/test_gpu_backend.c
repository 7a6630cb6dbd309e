/*
 * The CUDA backend (and, for k up to 2048, the kernels directly) against a plain CPU reference
 * written here: double-precision scores of every row, the filter predicate
 * backend_filter_matches(), a full sort by (score descending, row ascending).
 *
 * How results are compared: position by position on scores (the j-th best score may differ
 * from the reference's j-th best only by the scoring error bound), every returned row must
 * exist, pass the filter, appear once and carry its own reference score within the bound,
 * scores must be non-increasing and the count must be min(k, rows passing). Ties therefore
 * come back in any order without failing — except with exactly representable data (small
 * integers), where the ids themselves must match the reference, lower row first on ties.
 *
 * Error bounds (stated, then asserted):
 *   fp32 storage: |err| ≤ (dim + 4) · 2^-21 · (2 Σ|q_i x_i| + Σ x_i² + Σ q_i²) + 1e-6
 *     (fp32 accumulation; 4× the textbook dim · 2^-23 for tensor-core summation order);
 *   fp16 storage: add 1.01 · 2^-10 · (2 Σ|q_i x_i| + Σ x_i²) + dim · 2^-22 — q and x are
 *     each rounded to fp16 (relative 2^-11 each, absolute 2^-25 below fp16's normal range)
 *     before the product; L2 also uses the rounded |x|².
 *
 * Without a device every test skips with the runtime's reason (cr_skip_test). Random tests
 * print their seed.
 */
#include "backend.h"
#include "engine.h"
#include "gpu_plan.h"
#ifdef KERNELS_EMULATE
#include "gpu_emul_control.h"
#endif

#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_rng.h"

/* ---- randomness -------------------------------------------------------------------------------
 */

/* ---- device --------------------------------------------------------------------------------- */

/* Sizes are divided by this on the CPU emulation of the device (tests/gpu_emul_runtime.h),
 * which is thousands of times slower than a GPU. */
static uint32_t emul_div = 1;

static uint32_t scaled(uint32_t n)
{
    return n / emul_div > 0 ? n / emul_div : 1;
}

static void note_device(const char *name)
{
    if (strncmp(name, "Emulated", 8) == 0) emul_div = 16;
}

static backend *open_gpu(bool fp32, uint32_t max_batch)
{
    backend *b = NULL;
    aff_err err = {0};
    backend_gpu_config cfg = {.device = 0, .fp32 = fp32, .max_batch = max_batch};
    int rc = backend_gpu_create(&b, &cfg, &err);
    if (rc == AFF_EDEVICE) cr_skip_test("%s", err.msg);
    cr_assert_eq(rc, AFF_OK, "backend_gpu_create: %s", err.msg);
    backend_info info;
    b->ops->describe(b, &info);
    note_device(info.device);
    return b;
}

/* ---- reference ------------------------------------------------------------------------------ */

typedef struct ref_table {
    uint32_t dim, n, cap;
    aff_metric metric;
    bool fp16;
    float *vec;
    backend_row_attrs *attrs;
    backend_table *t;
} ref_table;

static void ref_open(ref_table *r, backend *b, uint32_t dim, aff_metric metric, bool fp16,
                     uint32_t initial_capacity)
{
    memset(r, 0, sizeof *r);
    r->dim = dim;
    r->metric = metric;
    r->fp16 = fp16;
    backend_table_params p = {.dim = dim, .metric = metric, .initial_capacity = initial_capacity};
    aff_err err = {0};
    cr_assert_eq(b->ops->table_create(b, &p, &r->t, &err), AFF_OK, "%s", err.msg);
}

static void ref_close(ref_table *r)
{
    if (r->t) r->t->ops->table_destroy(r->t);
    free(r->vec);
    free(r->attrs);
}

static void random_attrs(backend_row_attrs *a)
{
    memset(a, 0, sizeof *a);
    a->category = rng() % 20 + 1;
    a->price = (float)(rng() % 101);
    a->available = rng() % 4 != 0;
    a->n_tags = rng() % 4;
    uint32_t t = rng() % 10 + 1;
    for (uint32_t i = 0; i < a->n_tags; i++) {
        a->tags[i] = t;
        a->tag_bloom |= backend_tag_bit(t);
        t += rng() % 12 + 1;
    }
}

/* Writes rows (given, or appends when rows == NULL) with the given vectors (or random ones)
 * through the backend and into the reference. */
static void ref_write(ref_table *r, const uint32_t *rows_in, uint32_t n, const float *vec_in,
                      int value_kind)
{
    uint32_t *rows = malloc((n ? n : 1) * sizeof *rows);
    float *vec = malloc(((size_t)n * r->dim + 1) * sizeof *vec);
    backend_row_attrs *attrs = malloc((n ? n : 1) * sizeof *attrs);
    uint32_t appended = 0;
    for (uint32_t i = 0; i < n; i++) {
        rows[i] = rows_in ? rows_in[i] : r->n + i;
        if (rows[i] >= r->n) appended++;
        for (uint32_t d = 0; d < r->dim; d++)
            vec[(size_t)i * r->dim + d] = vec_in       ? vec_in[(size_t)i * r->dim + d]
                                          : value_kind ? (float)((int)(rng() % 3) - 1)
                                                       : rng_unit();
        random_attrs(&attrs[i]);
    }
    aff_err err = {0};
    int rc = r->t->ops->table_write(r->t, rows, n, vec, attrs, &err);
    cr_assert_eq(rc, AFF_OK, "table_write: %s", err.msg);
    if (r->n + appended > r->cap) {
        r->cap = (r->n + appended) * 2;
        r->vec = realloc(r->vec, (size_t)r->cap * r->dim * sizeof *r->vec);
        r->attrs = realloc(r->attrs, (size_t)r->cap * sizeof *r->attrs);
    }
    for (uint32_t i = 0; i < n; i++) {
        memcpy(r->vec + (size_t)rows[i] * r->dim, vec + (size_t)i * r->dim, r->dim * 4);
        r->attrs[rows[i]] = attrs[i];
    }
    r->n += appended;
    cr_assert_eq(r->t->ops->table_count(r->t), r->n);
    free(rows);
    free(vec);
    free(attrs);
}

/* Deletes rows the way the engine does: each hole, highest first, filled with the last row. */
static void ref_delete(ref_table *r, uint32_t *dead, uint32_t nd)
{
    for (uint32_t i = 0; i < nd; i++) /* sort descending, unique */
        for (uint32_t j = i + 1; j < nd; j++)
            if (dead[j] > dead[i]) {
                uint32_t t = dead[i];
                dead[i] = dead[j];
                dead[j] = t;
            }
    uint32_t m = 0;
    for (uint32_t i = 0; i < nd; i++)
        if (m == 0 || dead[m - 1] != dead[i]) dead[m++] = dead[i];
    uint32_t *src = malloc((m + 1) * 4), *dst = malloc((m + 1) * 4), moves = 0, count = r->n;
    for (uint32_t i = 0; i < m; i++) {
        uint32_t last = --count;
        if (dead[i] != last) {
            src[moves] = last;
            dst[moves] = dead[i];
            moves++;
        }
    }
    aff_err err = {0};
    cr_assert_eq(r->t->ops->table_move(r->t, src, dst, moves, count, &err), AFF_OK, "%s", err.msg);
    for (uint32_t i = 0; i < moves; i++) {
        memcpy(r->vec + (size_t)dst[i] * r->dim, r->vec + (size_t)src[i] * r->dim, r->dim * 4);
        r->attrs[dst[i]] = r->attrs[src[i]];
    }
    r->n = count;
    cr_assert_eq(r->t->ops->table_count(r->t), r->n);
    free(src);
    free(dst);
}

typedef struct ref_hit {
    double score;
    uint32_t row;
} ref_hit;

static int cmp_hit(const void *a, const void *b)
{
    const ref_hit *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->row > y->row) - (x->row < y->row);
}

static double ref_score(const ref_table *r, const float *q, uint32_t row, double *bound)
{
    const float *x = r->vec + (size_t)row * r->dim;
    double dot = 0, absdot = 0, xx = 0, qq = 0;
    for (uint32_t d = 0; d < r->dim; d++) {
        dot += (double)q[d] * x[d];
        absdot += fabs((double)q[d] * x[d]);
        xx += (double)x[d] * x[d];
        qq += (double)q[d] * q[d];
    }
    double b = (r->dim + 4) * ldexp(1.0, -21) * (2 * absdot + xx + qq) + 1e-6;
    if (r->fp16) /* relative rounding, plus fp16's subnormal spacing for tiny components */
        b += 1.01 * ldexp(1.0, -10) * (2 * absdot + xx) + r->dim * ldexp(1.0, -22);
    *bound = b;
    if (r->metric == AFF_METRIC_L2) return 2 * dot - xx - qq;
    return dot;
}

/* Checks one query's results against the reference (see the file comment). exact: the data is
 * exactly representable, so ids must match too. */
static void check_query(const ref_table *r, const float *q, uint32_t k, const backend_filter *f,
                        const uint32_t *rows, const float *scores, uint32_t count, bool exact,
                        const char *what)
{
    ref_hit *hits = malloc((r->n + 1) * sizeof *hits);
    double tol = 0;
    uint32_t m = 0;
    for (uint32_t row = 0; row < r->n; row++) {
        if (!backend_filter_matches(f, &r->attrs[row], row)) continue;
        double b;
        hits[m].score = ref_score(r, q, row, &b);
        hits[m].row = row;
        if (b > tol) tol = b;
        m++;
    }
    qsort(hits, m, sizeof *hits, cmp_hit);
    uint32_t want = k < m ? k : m;
    cr_assert_eq(count, want, "%s: %u hits, expected %u (k %u, %u rows pass)", what, count, want, k,
                 m);
    char *seen = calloc(r->n + 1, 1);
    for (uint32_t j = 0; j < count; j++) {
        cr_assert_lt(rows[j], r->n, "%s: row %u out of range", what, rows[j]);
        cr_assert(!seen[rows[j]], "%s: row %u returned twice", what, rows[j]);
        seen[rows[j]] = 1;
        cr_assert(backend_filter_matches(f, &r->attrs[rows[j]], rows[j]),
                  "%s: row %u fails the filter", what, rows[j]);
        double b, own = ref_score(r, q, rows[j], &b);
        cr_assert(fabs(scores[j] - own) <= b, "%s: row %u scored %.9g, reference %.9g (bound %g)",
                  what, rows[j], scores[j], own, b);
        cr_assert(fabs(scores[j] - hits[j].score) <= tol,
                  "%s: position %u scored %.9g, reference %.9g (bound %g)", what, j, scores[j],
                  hits[j].score, tol);
        if (j > 0) cr_assert(scores[j] <= scores[j - 1], "%s: scores increase at %u", what, j);
        if (exact) {
            cr_assert_eq(rows[j], hits[j].row, "%s: position %u row %u, reference row %u", what, j,
                         rows[j], hits[j].row);
            cr_assert_eq((double)scores[j], hits[j].score, "%s: exact score", what);
        }
    }
    free(seen);
    free(hits);
}

/* Runs nq random queries (k per query, optional filters) and checks each. */
static void run_queries_on(const ref_table *r, const float *given, uint32_t nq, const uint32_t *k,
                           const backend_filter *const *filters, bool exact, int value_kind,
                           const char *what, uint32_t *rows_out)
{
    float *q = malloc(((size_t)nq * r->dim + 1) * 4);
    size_t total = 0;
    for (uint32_t i = 0; i < nq; i++)
        total += k[i];
    uint32_t *rows = malloc((total + 1) * 4), *counts = malloc((nq + 1) * 4);
    float *scores = malloc((total + 1) * 4);
    for (size_t i = 0; i < (size_t)nq * r->dim; i++)
        q[i] = given ? given[i] : value_kind ? (float)((int)(rng() % 3) - 1) : rng_unit();
    backend_search s = {.queries = q,
                        .nq = nq,
                        .k = k,
                        .filters = filters,
                        .out_rows = rows,
                        .out_scores = scores,
                        .out_counts = counts};
    aff_err err = {0};
    cr_assert_eq(r->t->ops->table_search(r->t, &s, &err), AFF_OK, "%s: %s", what, err.msg);
    size_t off = 0;
    for (uint32_t i = 0; i < nq; i++) {
        char label[160];
        snprintf(label, sizeof label, "%s query %u", what, i);
        check_query(r, q + (size_t)i * r->dim, k[i], filters ? filters[i] : NULL, rows + off,
                    scores + off, counts[i], exact, label);
        off += k[i];
    }
    if (rows_out) memcpy(rows_out, rows, total * 4);
    free(q);
    free(rows);
    free(counts);
    free(scores);
}

static void run_queries(const ref_table *r, uint32_t nq, const uint32_t *k,
                        const backend_filter *const *filters, bool exact, int value_kind,
                        const char *what)
{
    run_queries_on(r, NULL, nq, k, filters, exact, value_kind, what, NULL);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void run_uniform(const ref_table *r, uint32_t nq, uint32_t k, bool exact, int value_kind,
                        const char *what)
{
    uint32_t *ks = malloc(nq * 4);
    for (uint32_t i = 0; i < nq; i++)
        ks[i] = k;
    run_queries(r, nq, ks, NULL, exact, value_kind, what);
    free(ks);
}

/* ---- tests ---------------------------------------------------------------------------------- */

Test(gpu_backend, reports_no_device_as_edevice)
{
    backend *b = NULL;
    aff_err err = {0};
    int rc = backend_gpu_create(&b, &(backend_gpu_config){0}, &err);
    if (rc != AFF_OK) {
        cr_assert_eq(rc, AFF_EDEVICE, "without a device the code is EDEVICE, got %d", rc);
        cr_assert_neq(err.msg[0], '\0', "the reason is given");
        cr_skip_test("%s", err.msg);
    }
    backend_info info;
    b->ops->describe(b, &info);
    cr_assert_str_eq(info.name, "cuda");
    cr_assert_neq(info.device[0], '\0');
    cr_assert_gt(info.memory_total, 0);
    b->ops->destroy(b);
}

Test(gpu_backend, k_one_k_n_and_k_beyond_n)
{
    seed_test();
    for (int fp32 = 0; fp32 < 2; fp32++) {
        backend *b = open_gpu(fp32, 64);
        ref_table r;
        ref_open(&r, b, 37, AFF_METRIC_IP, !fp32, 0);
        ref_write(&r, NULL, 500, NULL, 0);
        run_uniform(&r, 5, 1, false, 0, "k=1");
        run_uniform(&r, 5, 500, false, 0, "k=n");
        run_uniform(&r, 5, 1024, false, 0, "k>n");
        ref_close(&r);
        b->ops->destroy(b);
    }
}

Test(gpu_backend, empty_table_returns_nothing)
{
    backend *b = open_gpu(false, 64);
    ref_table r;
    ref_open(&r, b, 8, AFF_METRIC_IP, true, 0);
    run_uniform(&r, 3, 10, false, 0, "empty");
    ref_close(&r);
    b->ops->destroy(b);
}

Test(gpu_backend, ties_break_by_lower_row)
{
    seed_test();
    /* Components in {-1, 0, 1}: every score is a small integer, exact in fp16 and fp32, so
     * the order is fully determined and ids must match the reference. */
    for (int metric = 0; metric < 2; metric++) {
        backend *b = open_gpu(false, 64);
        ref_table r;
        ref_open(&r, b, 16, metric ? AFF_METRIC_L2 : AFF_METRIC_IP, true, 0);
        ref_write(&r, NULL, 3000, NULL, 1);
        run_uniform(&r, 7, 1, true, 1, "ties k=1");
        run_uniform(&r, 7, 100, true, 1, "ties k=100");
        run_uniform(&r, 7, 1000, true, 1, "ties k=1000");
        ref_close(&r);
        b->ops->destroy(b);
    }
}

static void random_filter(backend_filter *f, uint64_t *catbits, uint32_t *tags, uint32_t *excl,
                          uint32_t n_rows)
{
    backend_filter_init(f);
    if (rng() % 2) {
        f->category_words = 1;
        catbits[0] = ((uint64_t)rng() << 32) | rng();
        f->category_bits = catbits;
    }
    if (rng() % 3 == 0) {
        f->n_tags = rng() % 3 + 1;
        uint32_t t = rng() % 10 + 1;
        for (uint32_t i = 0; i < f->n_tags; i++) {
            tags[i] = t;
            f->tag_bloom |= backend_tag_bit(t);
            t += rng() % 10 + 1;
        }
        f->tags = tags;
    }
    if (rng() % 3 == 0) {
        f->price_min = (float)(rng() % 50);
        f->price_max = f->price_min + (float)(rng() % 60);
    }
    f->available_only = rng() % 3 == 0;
    if (rng() % 2 && n_rows) {
        uint32_t r = rng() % 5;
        for (uint32_t i = 0; i < 64 && r < n_rows; i++) {
            excl[i] = r;
            f->n_exclude_rows = i + 1;
            r += rng() % 7 + 1;
        }
        f->exclude_rows = excl;
    }
}

Test(gpu_backend, filters_and_exclusions)
{
    seed_test();
    enum { NQ = 24 };
    for (int fp32 = 0; fp32 < 2; fp32++) {
        backend *b = open_gpu(fp32, 8); /* several chunks */
        ref_table r;
        ref_open(&r, b, 24, fp32 ? AFF_METRIC_L2 : AFF_METRIC_IP, !fp32, 0);
        ref_write(&r, NULL, scaled(20000), NULL, 0);
        static backend_filter fs[NQ];
        static uint64_t cat[NQ][1];
        static uint32_t tags[NQ][4], excl[NQ][64];
        const backend_filter *fp[NQ];
        uint32_t ks[NQ];
        for (uint32_t i = 0; i < NQ; i++) {
            random_filter(&fs[i], cat[i], tags[i], excl[i], r.n);
            fp[i] = i % 5 == 4 ? NULL : &fs[i];
            ks[i] = i % 3 == 0 ? 1000 : i % 3 == 1 ? 10 : 200;
        }
        run_queries(&r, NQ, ks, fp, false, 0, "filters");

        /* Exclude exactly the best rows of an unfiltered query: the next ones take their place. */
        float q[24];
        for (int i = 0; i < 24; i++)
            q[i] = rng_unit();
        uint32_t k50 = 50, top[50];
        run_queries_on(&r, q, 1, &k50, NULL, false, 0, "unfiltered", top);
        qsort(top, 50, 4, cmp_u32);
        backend_filter ex;
        backend_filter_init(&ex);
        ex.exclude_rows = top;
        ex.n_exclude_rows = 50;
        const backend_filter *exp = &ex;
        run_queries_on(&r, q, 1, &k50, &exp, false, 0, "top rows excluded", NULL);
        ref_close(&r);
        b->ops->destroy(b);
    }
}

Test(gpu_backend, random_sizes_against_reference)
{
    seed_test();
    for (int round = 0; round<12; round += emul_div> 1 ? 3 : 1) {
        bool fp32 = rng() % 2;
        backend *b = open_gpu(fp32, rng() % 2 ? 1024 : 5);
        ref_table r;
        uint32_t dim = rng() % 300 + 1;
        ref_open(&r, b, dim, rng() % 2 ? AFF_METRIC_L2 : AFF_METRIC_IP, !fp32, rng() % 2000);
        uint32_t n = rng() % scaled(60000) + 1;
        ref_write(&r, NULL, n, NULL, 0);
        uint32_t nq = rng() % 20 + 1, ks[20];
        for (uint32_t i = 0; i < nq; i++)
            ks[i] = rng() % 2 ? rng() % AFF_MAX_K + 1 : rng() % 64 + 1;
        char what[96];
        snprintf(what, sizeof what, "round %d (n %u dim %u fp32 %d)", round, n, dim, fp32);
        run_queries(&r, nq, ks, NULL, false, 0, what);
        ref_close(&r);
        b->ops->destroy(b);
    }
}

Test(gpu_backend, many_tiles_and_segments)
{
    seed_test();
    /* 300k rows: one tile cut into many segments for a few queries (merge levels), and several
     * tiles for 64 queries (running best, prior bound). */
    backend *b = open_gpu(false, 1024);
    ref_table r;
    ref_open(&r, b, 32, AFF_METRIC_IP, true, 0);
    for (int i = 0; i < 6; i++)
        ref_write(&r, NULL, scaled(50000), NULL, 0);
    run_uniform(&r, 2, 100, false, 0, "segments k=100");
    run_uniform(&r, 2, 1000, false, 0, "segments k=1000");
    const uint32_t nq = emul_div > 1 ? 16 : 64; /* the emulation's tiles are smaller */
    run_uniform(&r, nq, 10, false, 0, "tiles k=10");
    run_uniform(&r, nq, 700, false, 0, "tiles k=700");
    ref_close(&r);
    b->ops->destroy(b);
}

Test(gpu_backend, overwrites_moves_and_deletes)
{
    seed_test();
    for (int fp32 = 0; fp32 < 2; fp32++) {
        backend *b = open_gpu(fp32, 64);
        ref_table r;
        ref_open(&r, b, 20, AFF_METRIC_IP, !fp32, 0);
        ref_write(&r, NULL, 4000, NULL, 0);
        /* Overwrite random rows, some twice in one call (the last write wins), and append. */
        uint32_t rows[300];
        for (uint32_t i = 0; i < 300; i++)
            rows[i] = i < 250 ? rng() % r.n : r.n + (i - 250);
        rows[10] = rows[20];
        float *vec = malloc(300 * 20 * 4);
        for (uint32_t i = 0; i < 300 * 20; i++)
            vec[i] = rng_unit();
        ref_write(&r, rows, 300, vec, 0);
        free(vec);
        run_uniform(&r, 6, 50, false, 0, "after overwrite");
        /* Deletes, including the last rows and chains the engine produces. */
        uint32_t dead[400];
        for (int round = 0; round < 5; round++) {
            uint32_t nd = rng() % 400 + 1;
            for (uint32_t i = 0; i < nd; i++)
                dead[i] = rng() % 3 == 0 ? r.n - 1 - rng() % 50 : rng() % r.n;
            ref_delete(&r, dead, nd);
            run_uniform(&r, 4, 300, false, 0, "after delete");
        }
        /* Stored vectors moved intact. */
        uint32_t probe[5] = {0, 1, r.n / 2, r.n - 2, r.n - 1};
        float out[5 * 20];
        aff_err err = {0};
        cr_assert_eq(r.t->ops->table_read(r.t, probe, 5, out, &err), AFF_OK, "%s", err.msg);
        for (uint32_t i = 0; i < 5; i++)
            for (uint32_t d = 0; d < 20; d++) {
                float want = r.vec[(size_t)probe[i] * 20 + d];
                float tol = fp32 ? 0.0f : fmaxf(ldexpf(fabsf(want), -11), ldexpf(1.0f, -24));
                cr_assert(fabsf(out[i * 20 + d] - want) <= tol, "row %u col %u: %g vs %g", probe[i],
                          d, out[i * 20 + d], want);
            }
        /* Delete everything. */
        uint32_t *all = malloc(r.n * 4), n = r.n;
        for (uint32_t i = 0; i < n; i++)
            all[i] = i;
        ref_delete(&r, all, n);
        free(all);
        run_uniform(&r, 2, 10, false, 0, "all deleted");
        ref_close(&r);
        b->ops->destroy(b);
    }
}

Test(gpu_backend, grows_past_capacity)
{
    seed_test();
    backend *b = open_gpu(true, 64);
    ref_table r;
    ref_open(&r, b, 40, AFF_METRIC_L2, false, 16);
    uint64_t mem0 = r.t->ops->table_memory(r.t);
    for (int i = 0; i < 40; i++)
        ref_write(&r, NULL, rng() % 300 + 1, NULL, 0);
    cr_assert_gt(r.t->ops->table_memory(r.t), mem0, "capacity grew");
    run_uniform(&r, 5, 100, false, 0, "after growth");
    uint32_t probe[3] = {0, 15, 16};
    float out[3 * 40];
    aff_err err = {0};
    cr_assert_eq(r.t->ops->table_read(r.t, probe, 3, out, &err), AFF_OK, "%s", err.msg);
    for (uint32_t i = 0; i < 3; i++)
        cr_assert_arr_eq(out + i * 40, r.vec + (size_t)probe[i] * 40, 40 * 4,
                         "row %u changed while growing", probe[i]);
    ref_close(&r);
    b->ops->destroy(b);
}

Test(gpu_backend, rejects_bad_writes_and_changes_nothing)
{
    backend *b = open_gpu(false, 64);
    ref_table r;
    ref_open(&r, b, 4, AFF_METRIC_IP, true, 0);
    ref_write(&r, NULL, 10, NULL, 0);
    float bad[4] = {1, NAN, 0, 0}, inf[4] = {INFINITY, 0, 0, 0}, ok[4] = {1, 2, 3, 4};
    backend_row_attrs a;
    memset(&a, 0, sizeof a);
    uint32_t row = 10, gap = 12;
    aff_err err = {0};
    cr_assert_eq(r.t->ops->table_write(r.t, &row, 1, bad, &a, &err), AFF_EINVAL);
    cr_assert_eq(r.t->ops->table_write(r.t, &row, 1, inf, &a, &err), AFF_EINVAL);
    cr_assert_eq(r.t->ops->table_write(r.t, &gap, 1, ok, &a, &err), AFF_EINVAL);
    a.price = NAN;
    cr_assert_eq(r.t->ops->table_write(r.t, &row, 1, ok, &a, &err), AFF_EINVAL);
    cr_assert_eq(r.t->ops->table_count(r.t), 10);
    run_uniform(&r, 2, 10, false, 0, "after rejected writes");
    ref_close(&r);
    b->ops->destroy(b);
}

Test(gpu_backend, score_gathers_and_dots)
{
    seed_test();
    for (int metric = 0; metric < 2; metric++) {
        backend *b = open_gpu(false, 64);
        ref_table r;
        ref_open(&r, b, 70, metric ? AFF_METRIC_L2 : AFF_METRIC_IP, true, 0);
        ref_write(&r, NULL, 3000, NULL, 0);
        enum { NQ = 9 };
        uint32_t offsets[NQ + 1] = {0};
        for (uint32_t i = 0; i < NQ; i++)
            offsets[i + 1] = offsets[i] + (i == 3 ? 0 : rng() % 1000 + 1);
        uint32_t *rows = malloc(offsets[NQ] * 4 + 4);
        float *scores = malloc(offsets[NQ] * 4 + 4), *q = malloc(NQ * 70 * 4);
        for (uint32_t j = 0; j < offsets[NQ]; j++)
            rows[j] = rng() % r.n;
        for (uint32_t i = 0; i < NQ * 70; i++)
            q[i] = rng_unit();
        aff_err err = {0};
        cr_assert_eq(r.t->ops->table_score(r.t, q, NQ, offsets, rows, scores, &err), AFF_OK, "%s",
                     err.msg);
        for (uint32_t i = 0; i < NQ; i++)
            for (uint32_t j = offsets[i]; j < offsets[i + 1]; j++) {
                double bound, want = ref_score(&r, q + i * 70, rows[j], &bound);
                cr_assert(fabs(scores[j] - want) <= bound, "query %u row %u: %g vs %g", i, rows[j],
                          scores[j], want);
            }
        free(rows);
        free(scores);
        free(q);
        ref_close(&r);
        b->ops->destroy(b);
    }
}

typedef struct search_job {
    const ref_table *r;
    int value_kind;
} search_job;

static void *search_thread(void *arg)
{
    const search_job *j = arg;
    for (int i = 0; i < 5; i++)
        run_uniform(j->r, 3, 50, true, j->value_kind, "concurrent");
    return NULL;
}

Test(gpu_backend, concurrent_searches_share_the_table)
{
    seed_test();
    backend *b = open_gpu(false, 64);
    ref_table r;
    ref_open(&r, b, 16, AFF_METRIC_IP, true, 0);
    ref_write(&r, NULL, 5000, NULL, 1);
    search_job job = {&r, 1};
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, search_thread, &job);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    ref_close(&r);
    b->ops->destroy(b);
}

/* ---- the kernels directly: k up to 2048 ---------------------------------------------------------
 */

Test(gpu_kernels, k_up_to_2048)
{
    seed_test();
    kernels_err kerr = {0};
    int n_dev = 0;
    if (kernels_device_count(&n_dev, &kerr) != 0 || n_dev == 0)
        cr_skip_test("%s", kerr.msg[0] ? kerr.msg : "no CUDA device present");
    kernels_device *dev = NULL;
    kernels_table *t = NULL;
    kernels_workspace *ws = NULL;
    cr_assert_eq(kernels_device_open(&dev, 0, &kerr), 0, "%s", kerr.msg);
    kernels_device_info info;
    kernels_device_describe(dev, &info);
    note_device(info.name);
    cr_assert_eq(kernels_workspace_create(&ws, dev, 3, &kerr), 0, "%s", kerr.msg); /* chunks */
    const uint32_t dim = 48, n = 9000;
    cr_assert_eq(
        kernels_table_create(&t, dev, dim, KERNELS_STORAGE_FP32, KERNELS_METRIC_IP, n, &kerr), 0,
        "%s", kerr.msg);
    float *x = malloc((size_t)n * dim * 4);
    uint32_t *rows = malloc(n * 4);
    for (uint32_t i = 0; i < n; i++)
        rows[i] = i;
    /* Values on a coarse grid so many scores tie exactly. */
    for (size_t i = 0; i < (size_t)n * dim; i++)
        x[i] = (float)((int)(rng() % 5) - 2) * 0.5f;
    cr_assert_eq(kernels_table_write(t, rows, n, x, NULL, n, &kerr), 0, "%s", kerr.msg);

    enum { NQ = 7 };
    const uint32_t ks[NQ] = {2048, 2047, 1500, 513, 257, 256, 1};
    float q[NQ * 48];
    for (uint32_t i = 0; i < NQ * dim; i++)
        q[i] = (float)((int)(rng() % 5) - 2) * 0.25f;
    size_t total = 0;
    for (uint32_t i = 0; i < NQ; i++)
        total += ks[i];
    uint32_t *out_rows = malloc(total * 4), counts[NQ];
    float *out_scores = malloc(total * 4), ms = -1;
    kernels_search_args a = {.queries = q,
                             .nq = NQ,
                             .k = ks,
                             .out_rows = out_rows,
                             .out_scores = out_scores,
                             .out_counts = counts,
                             .elapsed_ms = &ms};
    cr_assert_eq(kernels_search(ws, t, &a, &kerr), 0, "%s", kerr.msg);
    cr_assert_geq(ms, 0.0f);
    ref_hit *hits = malloc(n * sizeof *hits);
    size_t off = 0;
    for (uint32_t i = 0; i < NQ; i++) {
        for (uint32_t r = 0; r < n; r++) {
            double s = 0;
            for (uint32_t d = 0; d < dim; d++)
                s += (double)q[i * dim + d] * x[(size_t)r * dim + d];
            hits[r].score = s;
            hits[r].row = r;
        }
        qsort(hits, n, sizeof *hits, cmp_hit);
        cr_assert_eq(counts[i], ks[i]);
        /* Quarter-grid data: every score is exact, so rows must match, ties by lower row. */
        for (uint32_t j = 0; j < ks[i]; j++) {
            cr_assert_eq((double)out_scores[off + j], hits[j].score, "k %u position %u", ks[i], j);
            cr_assert_eq(out_rows[off + j], hits[j].row, "k %u position %u", ks[i], j);
        }
        off += ks[i];
    }
    free(hits);
    free(out_rows);
    free(out_scores);
    free(x);
    free(rows);
    kernels_table_destroy(t);
    kernels_workspace_destroy(ws);
    kernels_device_close(dev);
}

/* ---- concurrent reads (GetItems, SimilarItems by id) -------------------------------------- */

typedef struct read_job {
    kernels_table *t;
    const float *x;
    uint32_t dim, n, seed;
    int failures;
} read_job;

static void *kernel_reader(void *arg)
{
    read_job *j = arg;
    uint32_t s = j->seed;
    float *out = malloc((size_t)600 * j->dim * 4);
    uint32_t rows[600];
    for (int it = 0; it < 40; it++) {
        /* Different sizes: the read staging grows while other readers use it. */
        uint32_t m = 1 + (s = s * 1103515245u + 12345u) % (it % 8 == 7 ? 600 : 8);
        for (uint32_t i = 0; i < m; i++)
            rows[i] = (s = s * 1103515245u + 12345u) % j->n;
        kernels_err kerr = {0};
        if (kernels_table_read(j->t, rows, m, out, &kerr) != 0) {
            j->failures++;
            continue;
        }
        for (uint32_t i = 0; i < m; i++)
            if (memcmp(out + (size_t)i * j->dim, j->x + (size_t)rows[i] * j->dim, j->dim * 4))
                j->failures++;
    }
    free(out);
    return NULL;
}

/* kernels_table_read used to share the writers' staging buffer and stream with no lock: two
 * readers interleaved and one read the other's rows (or a freed buffer). */
Test(gpu_kernels, concurrent_table_reads_get_their_own_rows)
{
    kernels_err kerr = {0};
    int n_dev = 0;
    if (kernels_device_count(&n_dev, &kerr) != 0 || n_dev == 0)
        cr_skip_test("%s", kerr.msg[0] ? kerr.msg : "no CUDA device present");
    kernels_device *dev = NULL;
    kernels_table *t = NULL;
    cr_assert_eq(kernels_device_open(&dev, 0, &kerr), 0, "%s", kerr.msg);
    const uint32_t dim = 24, n = 3000;
    cr_assert_eq(
        kernels_table_create(&t, dev, dim, KERNELS_STORAGE_FP32, KERNELS_METRIC_IP, n, &kerr), 0,
        "%s", kerr.msg);
    float *x = malloc((size_t)n * dim * 4);
    uint32_t *rows = malloc(n * 4);
    for (uint32_t i = 0; i < n; i++)
        rows[i] = i;
    for (size_t i = 0; i < (size_t)n * dim; i++)
        x[i] = (float)(i % 9973) * 0.5f;
    cr_assert_eq(kernels_table_write(t, rows, n, x, NULL, n, &kerr), 0, "%s", kerr.msg);
    enum { THREADS = 4 };
    read_job jobs[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        jobs[i] = (read_job){.t = t, .x = x, .dim = dim, .n = n, .seed = 77u + (uint32_t)i};
        pthread_create(&th[i], NULL, kernel_reader, &jobs[i]);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(jobs[i].failures, 0, "reader %d got %d wrong or failed reads", i,
                     jobs[i].failures);
    }
    free(x);
    free(rows);
    kernels_table_destroy(t);
    kernels_device_close(dev);
}

/* The engine over the GPU backend: GetItems and SimilarItems (search by item id, which reads
 * the item's vector first) from several threads under the shared read lock, against answers
 * computed one at a time beforehand. */
enum { ENG_DIM = 12, ENG_ITEMS = 1500, ENG_K = 10 };

static aff_engine *open_engine(bool fp32)
{
    aff_engine *e = NULL;
    aff_err err = {0};
    engine_config cfg = {.backend = ENGINE_BACKEND_GPU,
                         .faiss = {.threads = 1},
                         .gpu = {.device = 0, .fp32 = fp32, .max_batch = 64}};
    int rc = engine_create(&e, &cfg, &err);
    if (rc == AFF_EDEVICE) cr_skip_test("%s", err.msg);
    cr_assert_eq(rc, AFF_OK, "engine_create: %s", err.msg);
    backend_info info;
    engine_backend_info(e, &info);
    note_device(info.device);
    return e;
}

static float eng_value(uint32_t item, uint32_t d)
{
    return (float)((int)((item * 7919u + d * 104729u) % 17u) - 8) * 0.25f;
}

static void eng_fill(aff_engine *e, const char *coll, aff_metric metric)
{
    aff_err err = {0};
    engine_collection_spec spec = {.name = coll, .dim = ENG_DIM, .metric = metric};
    cr_assert_eq(engine_create_collection(e, &spec, &err), AFF_OK, "%s", err.msg);
    static char ids[ENG_ITEMS][16];
    static float vec[ENG_ITEMS][ENG_DIM];
    aff_item *items = calloc(ENG_ITEMS, sizeof *items);
    for (uint32_t i = 0; i < ENG_ITEMS; i++) {
        snprintf(ids[i], sizeof ids[i], "item%u", i);
        for (uint32_t d = 0; d < ENG_DIM; d++)
            vec[i][d] = eng_value(i, d);
        items[i] = (aff_item){.id = ids[i], .vector = vec[i], .dim = ENG_DIM, .attrs.available = true};
    }
    cr_assert_eq(engine_upsert(e, coll, items, ENG_ITEMS, &err), AFF_OK, "%s", err.msg);
    free(items);
}

typedef struct eng_job {
    aff_engine *e;
    const aff_hit *want; /* ENG_ITEMS × ENG_K, by item */
    const uint32_t *want_n;
    uint32_t seed, step; /* items with expected answers: multiples of step */
    int failures;
    char first[256];
} eng_job;

static void eng_fail(eng_job *j, const char *what, uint32_t item)
{
    if (j->failures++ == 0) snprintf(j->first, sizeof j->first, "%.200s (item %u)", what, item);
}

static void *eng_worker(void *arg)
{
    eng_job *j = arg;
    uint32_t s = j->seed;
    for (int it = 0; it < 30; it++) {
        uint32_t item = (s = s * 1103515245u + 12345u) % (ENG_ITEMS / j->step) * j->step;
        char id[16];
        snprintf(id, sizeof id, "item%u", item);
        if (it % 2 == 0) {
            item_record got;
            float v[ENG_DIM];
            aff_err err = {0};
            if (engine_get_item(j->e, "c", id, &got, v, &err) != AFF_OK) {
                eng_fail(j, err.msg, item);
                continue;
            }
            for (uint32_t d = 0; d < ENG_DIM; d++)
                if (v[d] != eng_value(item, d)) {
                    eng_fail(j, "GetItems returned another row's vector", item);
                    break;
                }
        } else {
            aff_query q = {.item_id = id, .k = ENG_K};
            aff_hit hits[ENG_K];
            uint32_t n = 0;
            aff_err qe = {0};
            if (engine_search(j->e, "c", &q, 1, hits, &n, &qe) != AFF_OK) {
                eng_fail(j, qe.msg, item);
                continue;
            }
            if (n != j->want_n[item]) {
                eng_fail(j, "SimilarItems returned a different count", item);
                continue;
            }
            for (uint32_t h = 0; h < n; h++)
                if (strcmp(hits[h].id, j->want[(size_t)item * ENG_K + h].id) != 0 ||
                    hits[h].score != j->want[(size_t)item * ENG_K + h].score) {
                    eng_fail(j, "SimilarItems returned other items", item);
                    break;
                }
        }
    }
    return NULL;
}

Test(gpu_engine, concurrent_get_items_and_similar_items)
{
    aff_engine *e = open_engine(false);
    eng_fill(e, "c", AFF_METRIC_IP);
    aff_hit *want = calloc((size_t)ENG_ITEMS * ENG_K, sizeof *want);
    uint32_t *want_n = calloc(ENG_ITEMS, sizeof *want_n);
    /* Quarter-grid data: scores are exact in fp16 and fp32; ties go to the lower row. */
    const uint32_t step = emul_div > 1 ? 25 : 1; /* the emulation: 60 items */
    for (uint32_t i = 0; i < ENG_ITEMS; i += step) {
        char id[16];
        snprintf(id, sizeof id, "item%u", i);
        aff_query q = {.item_id = id, .k = ENG_K};
        aff_err qe = {0};
        cr_assert_eq(engine_search(e, "c", &q, 1, want + (size_t)i * ENG_K, &want_n[i], &qe),
                     AFF_OK, "%s", qe.msg);
        for (uint32_t h = 0; h < want_n[i]; h++)
            cr_assert_str_neq(want[(size_t)i * ENG_K + h].id, id, "the item itself is excluded");
    }
    enum { THREADS = 4 };
    eng_job jobs[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        jobs[i] = (eng_job){
            .e = e, .want = want, .want_n = want_n, .seed = 5u + (uint32_t)i, .step = step};
        pthread_create(&th[i], NULL, eng_worker, &jobs[i]);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < THREADS; i++)
        cr_assert_eq(jobs[i].failures, 0, "thread %d: %d failures, first: %s", i, jobs[i].failures,
                     jobs[i].first);
    free(want);
    free(want_n);
    engine_destroy(e);
}

/* ---- fp16 range of queries ---------------------------------------------------------------- */

Test(gpu_backend, fp16_rejects_queries_beyond_its_range)
{
    backend *b = open_gpu(false, 64);
    ref_table r;
    ref_open(&r, b, 8, AFF_METRIC_IP, true, 0);
    ref_write(&r, NULL, 300, NULL, 0);
    float q[2 * 8] = {0};
    for (int i = 0; i < 16; i++)
        q[i] = 0.5f;
    q[8 + 3] = 70000.0f; /* query 1, component 3: inf in fp16, inf * 0 = NaN scores */
    uint32_t ks[2] = {5, 5}, rows[10], counts[2];
    float scores[10];
    backend_search s = {.queries = q,
                        .nq = 2,
                        .k = ks,
                        .out_rows = rows,
                        .out_scores = scores,
                        .out_counts = counts};
    aff_err err = {0};
    cr_assert_eq(r.t->ops->table_search(r.t, &s, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "query 1") && strstr(err.msg, "component 3") &&
                  strstr(err.msg, "65504"),
              "the message names the query, the component and the range: %s", err.msg);
    q[8 + 3] = -65504.0f; /* the largest fp16 magnitude is fine */
    run_queries_on(&r, q, 2, ks, NULL, false, 0, "at the fp16 limit", NULL);
    backend_info info;
    b->ops->describe(b, &info);
    cr_assert_eq(info.max_abs_component, 65504.0f);
    ref_close(&r);
    b->ops->destroy(b);

    b = open_gpu(true, 64); /* fp32 storage has no such limit */
    ref_open(&r, b, 8, AFF_METRIC_IP, false, 0);
    ref_write(&r, NULL, 300, NULL, 0);
    q[8 + 3] = 70000.0f;
    run_queries_on(&r, q, 2, ks, NULL, false, 0, "fp32 beyond fp16", NULL);
    b->ops->describe(b, &info);
    cr_assert_eq(info.max_abs_component, 0.0f);
    ref_close(&r);
    b->ops->destroy(b);
}

Test(gpu_engine, fp16_range_is_invalid_argument_before_batching)
{
    aff_engine *e = open_engine(false);
    aff_err err = {0};
    engine_collection_spec ip = {.name = "ip", .dim = 4, .metric = AFF_METRIC_IP};
    engine_collection_spec cos = {.name = "cos", .dim = 4, .metric = AFF_METRIC_COSINE};
    cr_assert_eq(engine_create_collection(e, &ip, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(engine_create_collection(e, &cos, &err), AFF_OK, "%s", err.msg);
    float big[4] = {1, 2, 1e5f, 0};
    aff_query q = {.vector = big, .dim = 4, .k = 3};
    cr_assert_eq(engine_validate_query(e, "ip", &q, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "query vector") && strstr(err.msg, "index 2") &&
                  strstr(err.msg, "65504"),
              "%s", err.msg);
    aff_item it = {.id = "a", .vector = big, .dim = 4, .attrs.available = true};
    cr_assert_eq(engine_upsert(e, "ip", &it, 1, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "\"a\"") && strstr(err.msg, "65504"), "%s", err.msg);
    /* Cosine vectors are normalized before they reach the device: no limit. */
    cr_assert_eq(engine_validate_query(e, "cos", &q, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(engine_upsert(e, "cos", &it, 1, &err), AFF_OK, "%s", err.msg);
    engine_destroy(e);
}

/* ---- failures and device faults (fault injection: emulated device only) -------------------- */
#ifdef KERNELS_EMULATE

/* A launch that fails mid-search (not a device fault) used to return with the uploads before
 * it still queued; the next call then reused the pinned buffers under them. */
Test(gpu_faults, a_failed_search_leaves_nothing_queued)
{
    seed_test();
    backend *b = open_gpu(false, 64);
    ref_table r;
    ref_open(&r, b, 16, AFF_METRIC_IP, true, 0);
    ref_write(&r, NULL, 3000, NULL, 0);
    /* Launches of this search: query preparation, selection (or the fused scan and its
     * merge), decode; each in turn fails. */
    for (int at = 0; at < 3; at++) {
        emul_inject_launch_failure(at, EMUL_ERR_LAUNCH_OUT_OF_RESOURCES);
        float q[3 * 16];
        for (int i = 0; i < 3 * 16; i++)
            q[i] = rng_unit();
        uint32_t ks[3] = {10, 10, 10}, rows[30], counts[3];
        float scores[30];
        backend_search s = {.queries = q,
                            .nq = 3,
                            .k = ks,
                            .out_rows = rows,
                            .out_scores = scores,
                            .out_counts = counts};
        aff_err err = {0};
        cr_assert_eq(r.t->ops->table_search(r.t, &s, &err), AFF_EDEVICE, "launch %d fails", at);
        cr_assert(strstr(err.msg, "resources"), "the runtime's reason: %s", err.msg);
        cr_assert_eq(emul_pending_ops(), 0, "launch %d failed: %llu operations left queued", at,
                     (unsigned long long)emul_pending_ops());
        run_uniform(&r, 3, 10, false, 0, "after a failed search"); /* the device still works */
    }
    backend_info info;
    b->ops->describe(b, &info);
    cr_assert_eq(info.device_faults, 0, "a launch error is not a device fault");
    cr_assert_eq(info.tables_on_cpu, 0);
    ref_close(&r);
    b->ops->destroy(b);
}

Test(gpu_faults, a_failed_write_leaves_nothing_queued)
{
    seed_test();
    backend *b = open_gpu(true, 64);
    ref_table r;
    ref_open(&r, b, 16, AFF_METRIC_L2, false, 0);
    ref_write(&r, NULL, 500, NULL, 0);
    emul_inject_launch_failure(0, EMUL_ERR_LAUNCH_OUT_OF_RESOURCES);
    float v[16] = {1};
    backend_row_attrs a;
    memset(&a, 0, sizeof a);
    uint32_t row = 3;
    aff_err err = {0};
    cr_assert_eq(r.t->ops->table_write(r.t, &row, 1, v, &a, &err), AFF_EDEVICE);
    cr_assert_eq(emul_pending_ops(), 0, "%llu operations left queued",
                 (unsigned long long)emul_pending_ops());
    cr_assert_eq(r.t->ops->table_count(r.t), 500);
    ref_close(&r);
    b->ops->destroy(b);
}

/* A sticky fault (illegal address) loses the context for good: the search that met it is
 * answered by FAISS from the host copy, every table moves to the CPU on its next call, and
 * describe() says so. */
Test(gpu_faults, a_device_fault_hands_every_table_to_the_cpu)
{
    seed_test();
    backend *b = open_gpu(false, 64);
    ref_table r, r2;
    ref_open(&r, b, 20, AFF_METRIC_IP, true, 0);
    ref_open(&r2, b, 6, AFF_METRIC_L2, true, 0);
    ref_write(&r, NULL, 2000, NULL, 0);
    ref_write(&r2, NULL, 700, NULL, 0);
    run_uniform(&r, 2, 20, false, 0, "before the fault");
    backend_info info;
    b->ops->describe(b, &info);
    cr_assert_eq(info.device_faults, 0);

    emul_inject_launch_failure(1, EMUL_ERR_ILLEGAL_ADDRESS);
    run_uniform(&r, 4, 30, false, 0, "the search that met the fault, retried on the CPU");
    b->ops->describe(b, &info);
    cr_assert_geq(info.device_faults, 1);
    cr_assert_eq(info.tables_on_cpu, 1, "only the table that was called so far");
    cr_assert(strstr(info.fault, "illegal memory access"), "reason: %s", info.fault);
    cr_assert_str_eq(info.name, "cuda");

    /* Every later call works, on the CPU: writes, deletes, reads, scores, the other table. */
    ref_write(&r, NULL, 300, NULL, 0);
    uint32_t dead[50];
    for (uint32_t i = 0; i < 50; i++)
        dead[i] = rng() % r.n;
    ref_delete(&r, dead, 50);
    run_uniform(&r, 3, 100, false, 0, "on the CPU after writes and deletes");
    run_uniform(&r2, 3, 7, false, 0, "the second table, handed over on its first call");
    b->ops->describe(b, &info);
    cr_assert_eq(info.tables_on_cpu, 2);
    uint32_t probe[2] = {0, r.n - 1};
    float out[2 * 20];
    aff_err err = {0};
    cr_assert_eq(r.t->ops->table_read(r.t, probe, 2, out, &err), AFF_OK, "%s", err.msg);
    for (int i = 0; i < 2; i++)
        cr_assert_arr_eq(out + i * 20, r.vec + (size_t)probe[i] * 20, 20 * 4);
    uint32_t offsets[2] = {0, 2};
    float sc[2], q[20];
    for (int i = 0; i < 20; i++)
        q[i] = rng_unit();
    cr_assert_eq(r.t->ops->table_score(r.t, q, 1, offsets, probe, sc, &err), AFF_OK, "%s", err.msg);
    for (int i = 0; i < 2; i++) {
        double bound, want = ref_score(&r, q, probe[i], &bound);
        cr_assert(fabs(sc[i] - want) <= bound, "score %d: %g vs %g", i, sc[i], want);
    }

    /* A table created after the fault lives on the CPU from the start. */
    ref_table r3;
    ref_open(&r3, b, 5, AFF_METRIC_IP, true, 0);
    ref_write(&r3, NULL, 100, NULL, 0);
    run_uniform(&r3, 2, 10, false, 0, "created after the fault");
    b->ops->describe(b, &info);
    cr_assert_eq(info.tables_on_cpu, 3);
    ref_close(&r3);
    ref_close(&r2);
    ref_close(&r);
    b->ops->destroy(b);
}

/* A write that meets the fault is kept: the CPU table is built from the host copy with it. */
Test(gpu_faults, a_write_that_meets_a_device_fault_is_kept)
{
    seed_test();
    backend *b = open_gpu(false, 64);
    ref_table r;
    ref_open(&r, b, 10, AFF_METRIC_IP, true, 0);
    ref_write(&r, NULL, 400, NULL, 0);
    emul_inject_launch_failure(0, EMUL_ERR_ILLEGAL_ADDRESS);
    ref_write(&r, NULL, 50, NULL, 0); /* asserts AFF_OK and the new count */
    run_uniform(&r, 3, 25, false, 0, "after the write that met the fault");
    backend_info info;
    b->ops->describe(b, &info);
    cr_assert_geq(info.device_faults, 1);
    cr_assert_eq(info.tables_on_cpu, 1);
    ref_close(&r);
    b->ops->destroy(b);
}

/* Through the engine: the fault shows in engine_backend_info (ServerInfo and /metrics read it)
 * and searches keep answering. */
Test(gpu_faults, the_engine_keeps_serving_and_reports_the_fault)
{
    aff_engine *e = open_engine(false);
    eng_fill(e, "c", AFF_METRIC_IP);
    aff_query q = {.item_id = "item7", .k = ENG_K};
    aff_hit before[ENG_K], after[ENG_K];
    uint32_t nb = 0, na = 0;
    aff_err qe = {0};
    cr_assert_eq(engine_search(e, "c", &q, 1, before, &nb, &qe), AFF_OK, "%s", qe.msg);
    emul_inject_launch_failure(0, EMUL_ERR_ILLEGAL_ADDRESS);
    cr_assert_eq(engine_search(e, "c", &q, 1, after, &na, &qe), AFF_OK, "%s", qe.msg);
    cr_assert_eq(na, nb);
    for (uint32_t h = 0; h < na; h++) {
        cr_assert_str_eq(after[h].id, before[h].id, "hit %u", h);
        cr_assert_eq(after[h].score, before[h].score, "hit %u (exact data)", h);
    }
    backend_info info;
    engine_backend_info(e, &info);
    cr_assert_geq(info.device_faults, 1);
    cr_assert_eq(info.tables_on_cpu, 1);
    cr_assert_neq(info.fault[0], '\0');
    engine_destroy(e);
}

#endif /* KERNELS_EMULATE */

/* ---- the fused small-batch path against the tiled path and a CPU reference ------------------ */

/* Both paths forced on the same exact data (quarter grid: every score exact in fp16 and fp32,
 * so rows must match the reference, ties by lower row), both storages and metrics, B from 1 to
 * 32 (all three register tilings), k buckets 32 to 128, several fused blocks plus merge. */
Test(gpu_kernels, fused_and_tiled_paths_match_the_reference)
{
    seed_test();
    kernels_err kerr = {0};
    int n_dev = 0;
    if (kernels_device_count(&n_dev, &kerr) != 0 || n_dev == 0)
        cr_skip_test("%s", kerr.msg[0] ? kerr.msg : "no CUDA device present");
    kernels_device *dev = NULL;
    cr_assert_eq(kernels_device_open(&dev, 0, &kerr), 0, "%s", kerr.msg);
    kernels_device_info info;
    kernels_device_describe(dev, &info);
    note_device(info.name);
    kernels_workspace *ws = NULL;
    cr_assert_eq(kernels_workspace_create(&ws, dev, 32, &kerr), 0, "%s", kerr.msg);
    const uint32_t n = emul_div > 1 ? 2500 : 40000;
    const uint32_t dims[2] = {20, 72};
    for (int st = 0; st < 2; st++) {
        for (int metric = 0; metric < 2; metric++) {
            /* The emulation is slow: there, fp16 with inner product and fp32 with L2 only. */
            if (emul_div > 1 && st != metric) continue;
            const uint32_t dim = dims[(st + metric) % 2];
            kernels_table *t = NULL;
            cr_assert_eq(
                kernels_table_create(&t, dev, dim, st ? KERNELS_STORAGE_FP32 : KERNELS_STORAGE_FP16,
                                     metric ? KERNELS_METRIC_L2 : KERNELS_METRIC_IP, n, &kerr),
                0, "%s", kerr.msg);
            float *x = malloc((size_t)n * dim * 4);
            uint32_t *rows = malloc(n * 4);
            for (uint32_t i = 0; i < n; i++)
                rows[i] = i;
            for (size_t i = 0; i < (size_t)n * dim; i++)
                x[i] = (float)((int)(rng() % 5) - 2) * 0.5f;
            cr_assert_eq(kernels_table_write(t, rows, n, x, NULL, n, &kerr), 0, "%s", kerr.msg);
            const uint32_t nbs[3] = {1, 5, 32};
            const uint32_t kss[4] = {1, 10, 64, 128};
            for (int bi = 0; bi < 3; bi++) {
                for (int ki = 0; ki < 4; ki++) {
                    if (emul_div > 1 && ki % 2 == 0 && !(ki == 0 && bi == 0)) continue;
                    const uint32_t nq = nbs[bi];
                    uint32_t ks[32];
                    float *q = malloc((size_t)nq * dim * 4);
                    for (uint32_t i = 0; i < nq; i++)
                        ks[i] = i % 3 == 2 ? kss[ki] / 2 + 1 : kss[ki]; /* mixed k */
                    for (size_t i = 0; i < (size_t)nq * dim; i++)
                        q[i] = (float)((int)(rng() % 5) - 2) * 0.25f;
                    size_t total = 0;
                    for (uint32_t i = 0; i < nq; i++)
                        total += ks[i];
                    uint32_t *orow[2], cnt[2][32];
                    float *osc[2];
                    for (int path = 0; path < 2; path++) {
                        orow[path] = malloc(total * 4);
                        osc[path] = malloc(total * 4);
                        kernels_search_args a = {.queries = q,
                                                 .nq = nq,
                                                 .k = ks,
                                                 .out_rows = orow[path],
                                                 .out_scores = osc[path],
                                                 .out_counts = cnt[path],
                                                 .path = path ? KERNELS_PATH_FUSED
                                                              : KERNELS_PATH_TILED};
                        cr_assert_eq(kernels_search(ws, t, &a, &kerr), 0, "path %d: %s", path,
                                     kerr.msg);
                    }
                    ref_hit *hits = malloc(n * sizeof *hits);
                    size_t off = 0;
                    for (uint32_t i = 0; i < nq; i++) {
                        for (uint32_t r = 0; r < n; r++) {
                            double dot = 0, xx = 0, qq = 0;
                            for (uint32_t d = 0; d < dim; d++) {
                                double qv = q[i * dim + d], xv = x[(size_t)r * dim + d];
                                dot += qv * xv;
                                xx += xv * xv;
                                qq += qv * qv;
                            }
                            hits[r].score = metric ? 2 * dot - xx - qq : dot;
                            hits[r].row = r;
                        }
                        qsort(hits, n, sizeof *hits, cmp_hit);
                        for (int path = 0; path < 2; path++) {
                            cr_assert_eq(cnt[path][i], ks[i], "path %d B %u query %u count", path,
                                         nq, i);
                            for (uint32_t j = 0; j < ks[i]; j++) {
                                cr_assert_eq(orow[path][off + j], hits[j].row,
                                             "path %d st %d metric %d B %u k %u query %u "
                                             "position %u",
                                             path, st, metric, nq, ks[i], i, j);
                                cr_assert_eq((double)osc[path][off + j], hits[j].score,
                                             "path %d score at %u", path, j);
                            }
                        }
                        off += ks[i];
                    }
                    free(hits);
                    for (int path = 0; path < 2; path++) {
                        free(orow[path]);
                        free(osc[path]);
                    }
                    free(q);
                }
            }
            /* A forced fused path the chunk cannot take is refused, not run wrong. */
            uint32_t k200 = 200, r200[200], c1;
            float s200[200], q1[72] = {0};
            kernels_search_args bad = {.queries = q1,
                                       .nq = 1,
                                       .k = &k200,
                                       .out_rows = r200,
                                       .out_scores = s200,
                                       .out_counts = &c1,
                                       .path = KERNELS_PATH_FUSED};
            cr_assert_eq(kernels_search(ws, t, &bad, &kerr), AFF_EINVAL);
            free(x);
            free(rows);
            kernels_table_destroy(t);
        }
    }
    kernels_workspace_destroy(ws);
    kernels_device_close(dev);
}

/* The backend's automatic choice sends small batches with k <= 128 through the fused scan;
 * filters and exclusions there are applied only to rows beating the threshold. */
Test(gpu_backend, small_batches_with_filters_take_the_fused_path)
{
    seed_test();
    cr_assert_eq(kernels_choose_path(1, 32, 1000), KERNELS_PATH_FUSED);
    cr_assert_eq(kernels_choose_path(32, 128, 1000), KERNELS_PATH_FUSED);
    cr_assert_eq(kernels_choose_path(33, 32, 1000), KERNELS_PATH_TILED);
    cr_assert_eq(kernels_choose_path(8, 256, 1000), KERNELS_PATH_TILED);
    enum { NQ = 20 };
    for (int fp32 = 0; fp32 < 2; fp32++) {
        backend *b = open_gpu(fp32, 64);
        ref_table r;
        ref_open(&r, b, 24, fp32 ? AFF_METRIC_IP : AFF_METRIC_L2, !fp32, 0);
        ref_write(&r, NULL, scaled(40000), NULL, 0);
        static backend_filter fs[NQ];
        static uint64_t cat[NQ][1];
        static uint32_t tags[NQ][4], excl[NQ][64];
        const backend_filter *fp[NQ];
        uint32_t ks[NQ];
        for (uint32_t i = 0; i < NQ; i++) {
            random_filter(&fs[i], cat[i], tags[i], excl[i], r.n);
            fp[i] = i % 4 == 3 ? NULL : &fs[i];
            ks[i] = i % 3 == 0 ? 128 : i % 3 == 1 ? 1 : 37;
        }
        run_queries(&r, NQ, ks, fp, false, 0, "fused with filters");
        run_uniform(&r, 1, 100, false, 0, "fused B=1");
        ref_close(&r);
        b->ops->destroy(b);
    }
}

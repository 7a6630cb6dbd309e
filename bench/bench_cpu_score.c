/*
 * bench_cpu_score: the CPU backend's scan alone, per precision and kernel set, on one table:
 * queries/second, CPU time per query and the rows re-ranked in fp32 per query (the candidate
 * set of the rule in src/cpu_score.h).
 *
 *   bench_cpu_score [--n 100000] [--dim 128] [--nq 256] [--k 10] [--seconds 1] [--only int8]
 *                   [--filter-shares 0.05,0.1,0.25,0.5] [--capped CLUSTERS]
 *
 * --filter-shares: then int8 (best kernels) with every query filtered to categories holding
 * that share of the rows (20 categories of 5%), scanning the table (no category lists: the
 * block column skips blocks without those categories) against the category lists
 * (cpu_cat_rows: a query whose categories hold at most 1/CPU_POSTING_SHARE of the rows reads
 * their fp32 rows instead of scanning), the choice CPU_POSTING_SHARE makes.
 * fp32 is the backend's own fp32 path (threaded scan or sgemm); bf16 and int8 call
 * cpu_score_search directly. Each figure is the best of 3 interleaved rounds.
 * --capped C: then int8 (best kernels) on a clustered table (C clusters, category = cluster %
 * 25, as bench_pipeline's BENCH_CLUSTERS) with shopper-like queries (the normalized mean of 20
 * random rows): the bare query (k) against the ranking pipeline's capped organic query
 * (k + max(k/2, 5), at most 3 and 6 per category) and against that query with a promotion
 * beside it, medians of 5 interleaved rounds.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <omp.h>

#include "backend.h"
#include "cpu_score.h"
#include "log.h"

static double clock_s(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static float rng_normal(void)
{
    float s = 0;
    for (int i = 0; i < 4; i++) {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        s += (float)(rng_state >> 40) / (float)(1 << 24) - 0.5f;
    }
    return s;
}

typedef struct run {
    double qps, cpu_us, cand, reported;
} run;

typedef struct setup {
    uint32_t n, dim, nq, k;
    double seconds;
    float *data, *queries;
    backend_row_attrs *attrs;
    uint32_t *kk, *rows, *counts;
    float *scores;
    size_t *offsets;
    const backend_filter **filters; /* per query, or NULL */
    const cpu_cat_rows *lists;      /* or NULL */
    const uint64_t *block_cats;     /* or NULL */
    const uint32_t *per_cat;        /* per query max_per_category, or NULL */
    const uint32_t *same_as;        /* backend_search.same_as, or NULL */
} setup;

/* kind: 0 = backend fp32 table; else a cpu_codes scan with that precision and ISA. */
static run measure(setup *su, backend_table *fp32, const cpu_codes *codes, backend_cpu_isa isa)
{
    backend_search s = {.queries = su->queries,
                        .nq = su->nq,
                        .k = su->kk,
                        .filters = su->filters,
                        .max_per_category = su->per_cat,
                        .same_as = su->same_as,
                        .out_rows = su->rows,
                        .out_scores = su->scores,
                        .out_counts = su->counts};
    cpu_search_table t = {.codes = codes,
                          .isa = isa,
                          .rows = su->data,
                          .attrs = su->attrs,
                          .block_cats = su->block_cats,
                          .cat_rows = su->lists,
                          .count = su->n,
                          .threads = omp_get_max_threads()};
    aff_err err = {0};
    uint64_t batches = 0, cand = 0, reported = 0;
    double t0 = clock_s(CLOCK_MONOTONIC), c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID), now;
    do {
        cpu_search_stats st = {0};
        int rc = fp32 ? fp32->ops->table_search(fp32, &s, &err)
                      : cpu_score_search(&t, &s, su->offsets, &st, &err);
        if (rc != AFF_OK) {
            fprintf(stderr, "search: %s\n", err.msg);
            exit(1);
        }
        cand += st.candidates;
        reported += st.reported;
        batches++;
        now = clock_s(CLOCK_MONOTONIC);
    } while (now - t0 < su->seconds || batches < 2);
    double q = (double)batches * su->nq;
    return (run){q / (now - t0), (clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0) * 1e6 / q,
                 (double)cand / q, (double)reported / q};
}

/* --filter-shares: int8 queries filtered to a share of the rows' categories, the table scan
 * against the search given the category lists. */
static void filtered_runs(setup *su, const cpu_codes *codes, backend_cpu_isa isa,
                          const char *shares)
{
    enum { CATS = 20 };
    cpu_cat_rows lists = {0};
    uint64_t *block_cats = calloc((su->n + 7) / 8, sizeof *block_cats);
    for (uint32_t r = 0; r < su->n; r++) {
        su->attrs[r].category = 1 + r % CATS;
        if (cpu_cat_rows_add(&lists, r, su->attrs[r].category) != AFF_OK) exit(1);
    }
    for (uint32_t b = 0; b < (su->n + 7) / 8; b++)
        block_cats[b] = cpu_block_cats(su->attrs, b, su->n);
    const backend_filter **filters = malloc(su->nq * sizeof *filters);
    printf("\nint8 (%s), every query filtered to categories holding a share of the rows (%d "
           "categories of %.0f%%), best of 3 rounds:\n\n",
           cpu_isa_name(isa), CATS, 100.0 / CATS);
    printf("| share | table scan CPU us/q | with the category lists CPU us/q | lists / table |\n");
    printf("|---|---|---|---|\n");
    for (const char *p = shares; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
        const double share = atof(p);
        uint32_t m = (uint32_t)lround(share * CATS);
        m = m < 1 ? 1 : m > CATS ? CATS : m;
        uint64_t bits = 0;
        for (uint32_t c = 1; c <= m; c++)
            bits |= 1ull << c;
        backend_filter f;
        backend_filter_init(&f);
        f.category_bits = &bits;
        f.category_words = 1;
        for (uint32_t q = 0; q < su->nq; q++)
            filters[q] = &f;
        su->filters = filters;
        su->block_cats = block_cats;
        double best[2] = {INFINITY, INFINITY};
        for (int round = 0; round < 3; round++)
            for (int with = 0; with < 2; with++) {
                su->lists = with ? &lists : NULL;
                best[with] = fmin(best[with], measure(su, NULL, codes, isa).cpu_us);
            }
        printf("| %.2f | %.1f | %.1f | %.3f |\n", (double)m / CATS, best[0], best[1],
               best[1] / best[0]);
    }
    su->filters = NULL;
    su->lists = NULL;
    su->block_cats = NULL;
    free(filters);
    free(block_cats);
    cpu_cat_rows_free(&lists);
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* --capped: the bare query against the pipeline's capped organic query on a clustered table. */
static void capped_runs(setup *su, backend_cpu_isa isa, uint32_t clusters)
{
    enum { CATS = 25, ROUNDS = 5, HISTORY = 20 };
    const uint32_t n = su->n, dim = su->dim;
    float *centres = malloc((size_t)clusters * dim * sizeof *centres);
    for (size_t i = 0; i < (size_t)clusters * dim; i++)
        centres[i] = 4.0f * rng_normal();
    cpu_cat_rows lists = {0};
    uint64_t *block_cats = calloc((n + 7) / 8, sizeof *block_cats);
    for (uint32_t r = 0; r < n; r++) {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        const uint32_t cl = (uint32_t)(rng_state >> 33) % clusters;
        float *v = su->data + (size_t)r * dim;
        double norm = 0;
        for (uint32_t d = 0; d < dim; d++) {
            v[d] = centres[(size_t)cl * dim + d] + 0.6f * 4.0f * rng_normal();
            norm += (double)v[d] * v[d];
        }
        for (uint32_t d = 0; d < dim; d++)
            v[d] = (float)(v[d] / sqrt(norm));
        su->attrs[r].category = 1 + cl % CATS;
        if (cpu_cat_rows_add(&lists, r, su->attrs[r].category) != AFF_OK) exit(1);
    }
    for (uint32_t b = 0; b < (n + 7) / 8; b++)
        block_cats[b] = cpu_block_cats(su->attrs, b, n);
    for (uint32_t q = 0; q < su->nq; q++) {
        float *v = su->queries + (size_t)q * dim;
        memset(v, 0, dim * sizeof *v);
        for (int h = 0; h < HISTORY; h++) {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            const float *x = su->data + (size_t)((rng_state >> 33) % n) * dim;
            for (uint32_t d = 0; d < dim; d++)
                v[d] += x[d] / HISTORY;
        }
    }
    cpu_codes codes;
    cpu_codes_init(&codes, BACKEND_PRECISION_INT8, dim, isa);
    if (cpu_codes_reserve(&codes, n) != AFF_OK) exit(1);
    for (uint32_t r = 0; r < n; r++)
        cpu_codes_set(&codes, r, su->data + (size_t)r * dim);
    su->lists = &lists;
    su->block_cats = block_cats;
    /* Modes: bare (k); capped organic (kc, at most 3 or 6 per category); the organic query at
     * most 6 per category with a promotion beside it on the same vector (one category, k 8,
     * as pipeline_query_shape_of() gives a 20% promotion of k = 10), as the pipeline asks. */
    enum { MODES = 4 };
    const uint32_t k = su->k, kc = k + (k / 2 > 5 ? k / 2 : 5), kp = 8, nq = su->nq;
    const uint32_t caps[MODES] = {0, 3, 6, 6}, ks[MODES] = {k, kc, kc, kc};
    uint64_t promo_bits = 1ull << 8;
    backend_filter promo;
    backend_filter_init(&promo);
    promo.category_bits = &promo_bits;
    promo.category_words = 1;
    uint32_t *per_cat = calloc(2 * nq, sizeof *per_cat);
    uint32_t *kk = malloc(2 * nq * sizeof *kk);
    uint32_t *same_as = malloc(2 * nq * sizeof *same_as);
    const backend_filter **filters = calloc(2 * nq, sizeof *filters);
    size_t *offsets = malloc(2 * nq * sizeof *offsets);
    uint32_t *rows = malloc((size_t)2 * nq * kc * sizeof *rows);
    float *scores = malloc((size_t)2 * nq * kc * sizeof *scores);
    uint32_t *counts = malloc(2 * nq * sizeof *counts);
    float *const one = su->queries;
    float *two = malloc((size_t)2 * nq * dim * sizeof *two); /* each shopper twice */
    for (uint32_t q = 0; q < 2 * nq; q++)
        memcpy(two + (size_t)q * dim, one + (size_t)(q / 2) * dim, dim * sizeof *two);
    uint32_t *const keep_k = su->kk, *const keep_rows = su->rows;
    size_t *const keep_off = su->offsets;
    float *const keep_scores = su->scores;
    uint32_t *const keep_counts = su->counts;
    su->counts = counts;
    su->kk = kk;
    su->offsets = offsets;
    su->rows = rows;
    su->scores = scores;
    double us[MODES][ROUNDS];
    run last[MODES];
    for (int round = 0; round < ROUNDS; round++)
        for (int m = 0; m < MODES; m++) {
            const bool pair = m == MODES - 1;
            su->nq = pair ? 2 * nq : nq;
            su->queries = pair ? two : one;
            su->filters = pair ? filters : NULL;
            su->same_as = pair ? same_as : NULL;
            size_t off = 0;
            for (uint32_t q = 0; q < su->nq; q++) {
                const bool is_promo = pair && q % 2;
                kk[q] = is_promo ? kp : ks[m];
                per_cat[q] = is_promo ? 0 : caps[m];
                filters[q] = is_promo ? &promo : NULL;
                same_as[q] = is_promo ? q - 1 : q;
                offsets[q] = off;
                off += kk[q];
            }
            su->per_cat = caps[m] ? per_cat : NULL;
            last[m] = measure(su, NULL, &codes, isa);
            us[m][round] = last[m].cpu_us * (pair ? 2 : 1); /* per shopper */
            if (pair) { /* per shopper, as the other modes */
                last[m].reported *= 2;
                last[m].cand *= 2;
            }
        }
    su->nq = nq;
    su->queries = one;
    printf("\nint8 (%s), %u clusters, category = cluster %% %d, shopper-like queries (mean of %d "
           "rows), medians of %d rounds, per shopper:\n\n",
           cpu_isa_name(isa), clusters, CATS, HISTORY, ROUNDS);
    printf("| queries | CPU us | reported rows | re-ranked rows | x bare |\n");
    printf("|---|---|---|---|---|\n");
    double med[MODES];
    for (int m = 0; m < MODES; m++) {
        qsort(us[m], ROUNDS, sizeof us[m][0], cmp_double);
        med[m] = us[m][ROUNDS / 2];
        char name[96];
        if (m == MODES - 1)
            snprintf(name, sizeof name,
                     "k = %u, at most %u per category, + promotion (1 category, k = %u)", ks[m],
                     caps[m], kp);
        else if (caps[m])
            snprintf(name, sizeof name, "k = %u, at most %u per category", ks[m], caps[m]);
        else
            snprintf(name, sizeof name, "bare, k = %u", ks[m]);
        printf("| %s | %.1f | %.1f | %.1f | %.3f |\n", name, med[m], last[m].reported,
               last[m].cand, med[m] / med[0]);
    }
    su->kk = keep_k;
    su->offsets = keep_off;
    su->rows = keep_rows;
    su->scores = keep_scores;
    su->counts = keep_counts;
    su->per_cat = NULL;
    su->same_as = NULL;
    su->filters = NULL;
    su->lists = NULL;
    su->block_cats = NULL;
    free(per_cat);
    free(kk);
    free(same_as);
    free(filters);
    free(offsets);
    free(rows);
    free(scores);
    free(counts);
    free(two);
    cpu_codes_free(&codes);
    free(block_cats);
    free(centres);
    cpu_cat_rows_free(&lists);
}

int main(int argc, char **argv)
{
    setup su = {.n = 100000, .dim = 128, .nq = 256, .k = 10, .seconds = 1.0};
    const char *only = NULL, *shares = NULL;
    uint32_t clusters = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--only"))
            only = argv[i + 1];
        else if (!strcmp(argv[i], "--filter-shares"))
            shares = argv[i + 1];
        else if (!strcmp(argv[i], "--capped"))
            clusters = (uint32_t)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--n"))
            su.n = (uint32_t)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--dim"))
            su.dim = (uint32_t)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--nq"))
            su.nq = (uint32_t)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--k"))
            su.k = (uint32_t)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds"))
            su.seconds = atof(argv[i + 1]);
        else {
            fprintf(stderr,
                    "usage: %s [--n N] [--dim D] [--nq Q] [--k K] [--seconds S] [--only "
                    "fp32|bf16|int8] [--filter-shares F,F,...] [--capped CLUSTERS]\n",
                    argv[0]);
            return 2;
        }
    }
    aff_log_set_level(AFF_LOG_WARN);
    su.data = malloc((size_t)su.n * su.dim * sizeof(float));
    su.queries = malloc((size_t)su.nq * su.dim * sizeof(float));
    su.attrs = calloc(su.n, sizeof *su.attrs);
    su.kk = malloc(su.nq * sizeof *su.kk);
    su.offsets = malloc(su.nq * sizeof *su.offsets);
    su.rows = malloc((size_t)su.nq * su.k * sizeof *su.rows);
    su.scores = malloc((size_t)su.nq * su.k * sizeof *su.scores);
    su.counts = malloc(su.nq * sizeof *su.counts);
    for (size_t i = 0; i < (size_t)su.n * su.dim; i++)
        su.data[i] = rng_normal();
    for (size_t i = 0; i < (size_t)su.nq * su.dim; i++)
        su.queries[i] = rng_normal();
    for (uint32_t q = 0; q < su.nq; q++) {
        su.kk[q] = su.k;
        su.offsets[q] = (size_t)q * su.k;
    }
    uint32_t *all = malloc(su.n * sizeof *all);
    for (uint32_t r = 0; r < su.n; r++) {
        all[r] = r;
        su.attrs[r].available = 1;
    }

    aff_err err = {0};
    backend *b = NULL;
    backend_faiss_config cfg = {.precision = BACKEND_PRECISION_FP32};
    backend_table *fp32 = NULL;
    backend_table_params p = {.dim = su.dim, .metric = AFF_METRIC_IP};
    if (backend_faiss_create(&b, &cfg, &err) != AFF_OK ||
        b->ops->table_create(b, &p, &fp32, &err) != AFF_OK ||
        fp32->ops->table_write(fp32, all, su.n, su.data, su.attrs, &err) != AFF_OK) {
        fprintf(stderr, "fp32 table: %s\n", err.msg);
        return 1;
    }
    const backend_precision precs[] = {BACKEND_PRECISION_BF16, BACKEND_PRECISION_INT8};
    cpu_codes codes[2];
    for (int i = 0; i < 2; i++) {
        cpu_codes_init(&codes[i], precs[i], su.dim, BACKEND_CPU_ISA_AUTO);
        if (cpu_codes_reserve(&codes[i], su.n) != AFF_OK) return 1;
        for (uint32_t r = 0; r < su.n; r++)
            cpu_codes_set(&codes[i], r, su.data + (size_t)r * su.dim);
    }
    backend_cpu_isa best = cpu_isa_detect(BACKEND_CPU_ISA_AUTO);
    printf("N=%u d=%u nq=%u k=%u threads=%d best ISA %s; best of 3 rounds of %.1f s\n\n", su.n,
           su.dim, su.nq, su.k, omp_get_max_threads(), cpu_isa_name(best), su.seconds);
    enum { MAXC = 1 + 2 * 3 };
    run best_run[MAXC];
    const char *label[MAXC];
    const char *isa_label[MAXC];
    const cpu_codes *cfgc[MAXC];
    backend_cpu_isa cisa[MAXC];
    int nc = 0;
    label[nc] = "fp32";
    isa_label[nc] = "FAISS/BLAS + scan";
    cfgc[nc] = NULL;
    cisa[nc++] = BACKEND_CPU_ISA_AUTO;
    for (int i = 0; i < 2; i++)
        for (backend_cpu_isa isa = BACKEND_CPU_ISA_AVX2; isa <= best; isa++) {
            label[nc] = cpu_precision_name(precs[i]);
            isa_label[nc] = cpu_isa_name(isa);
            cfgc[nc] = &codes[i];
            cisa[nc++] = isa;
        }
    for (int i = 0; i < nc; i++)
        best_run[i] = (run){0, INFINITY, 0, 0};
    for (int round = 0; round < 3; round++)
        for (int i = 0; i < nc; i++) {
            if (only && strcmp(only, label[i]) != 0) continue;
            run r = measure(&su, cfgc[i] ? NULL : fp32, cfgc[i], cisa[i]);
            best_run[i].qps = fmax(best_run[i].qps, r.qps);
            best_run[i].cpu_us = fmin(best_run[i].cpu_us, r.cpu_us);
            best_run[i].cand = r.cand;
            best_run[i].reported = r.reported;
        }
    /* recall@k of each configuration against the fp32 answer (one batch, ids compared). */
    backend_search s = {.queries = su.queries,
                        .nq = su.nq,
                        .k = su.kk,
                        .out_rows = su.rows,
                        .out_scores = su.scores,
                        .out_counts = su.counts};
    uint32_t *ref = malloc((size_t)su.nq * su.k * sizeof *ref);
    if (fp32->ops->table_search(fp32, &s, &err) != AFF_OK) return 1;
    memcpy(ref, su.rows, (size_t)su.nq * su.k * sizeof *ref);
    double recall[MAXC];
    for (int i = 0; i < nc; i++) {
        cpu_search_table t = {.codes = cfgc[i],
                              .isa = cisa[i],
                              .rows = su.data,
                              .attrs = su.attrs,
                              .count = su.n,
                              .threads = omp_get_max_threads()};
        if (cfgc[i] && cpu_score_search(&t, &s, su.offsets, NULL, &err) != AFF_OK) return 1;
        if (!cfgc[i]) memcpy(su.rows, ref, (size_t)su.nq * su.k * sizeof *ref);
        uint64_t hit = 0;
        for (uint32_t q = 0; q < su.nq; q++)
            for (uint32_t x = 0; x < su.k; x++)
                for (uint32_t y = 0; y < su.k; y++)
                    if (su.rows[(size_t)q * su.k + x] == ref[(size_t)q * su.k + y]) {
                        hit++;
                        break;
                    }
        recall[i] = (double)hit / ((double)su.nq * su.k);
    }
    free(ref);
    printf("| precision | kernels | q/s | CPU us/q | reported rows/q | re-ranked rows/q | x fp32 "
           "(CPU) | recall@k vs fp32 |\n");
    printf("|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < nc; i++)
        printf("| %s | %s | %.0f | %.0f | %.1f | %.1f | %.2f | %.4f |\n", label[i], isa_label[i],
               best_run[i].qps, best_run[i].cpu_us, best_run[i].reported, best_run[i].cand,
               best_run[0].cpu_us / best_run[i].cpu_us, recall[i]);
    if (shares) filtered_runs(&su, &codes[1], best, shares);
    if (clusters) capped_runs(&su, best, clusters);
    for (int i = 0; i < 2; i++)
        cpu_codes_free(&codes[i]);
    fp32->ops->table_destroy(fp32);
    b->ops->destroy(b);
    return 0;
}

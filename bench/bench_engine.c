/*
 * bench_engine: queries/second through the engine (FAISS CPU backend) and through FAISS
 * directly, on the same data and queries in the same run.
 *
 *   bench_engine [--sizes 100000,1000000] [--dim 128] [--seconds 1.0] [--out FILE.md]
 *
 * For each N, nq ∈ {1, 16, 256} and k ∈ {10, 100}: FAISS IndexFlatIP direct (OpenBLAS threads
 * on all cores, BLAS from 2 queries up: its best configuration here), the engine
 * unfiltered, and the engine with category filters passing 50%, 10% and 1% of the items
 * (100 categories assigned uniformly, so the selectivity is exact). Ratios: engine/FAISS for
 * unfiltered (target ≥ 0.95), filtered/unfiltered for the engine (target ≥ 0.7 at 10-50%).
 * Each figure is the best of 3 interleaved rounds, each the rate over at least `seconds` of
 * back-to-back batches after one warm-up batch; queries come from a pool of random vectors.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/utils/distances_c.h>

#include "cpu_score.h"
#include "engine.h"
#include "log.h"

#define N_CATEGORIES 100

/* OpenBLAS's thread control (weak: absent with another BLAS). FAISS direct runs with OpenBLAS
 * threads on every core, as FAISS expects; the engine's backend runs BLAS single-threaded and
 * splits rows across its own threads. Each side is measured in its own best configuration. */
extern void openblas_set_num_threads(int threads) __attribute__((weak));

static void blas_threads(int n)
{
    if (openblas_set_num_threads) openblas_set_num_threads(n);
}
#define QUERY_POOL 4096
#define ROUNDS     3

static double clock_s(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double now_s(void)
{
    return clock_s(CLOCK_MONOTONIC);
}

/* A measurement: wall-clock rate, and process CPU time (all threads) per query, which other
 * processes on a shared machine disturb far less than the rate. */
typedef struct rate {
    double qps;
    double cpu_us; /* CPU microseconds per query */
} rate;

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;

static float rng_normal(void)
{
    /* Sum of uniforms: close enough to Gaussian for benchmark data. */
    float s = 0;
    for (int i = 0; i < 4; i++) {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        s += (float)(rng_state >> 40) / (float)(1 << 24) - 0.5f;
    }
    return s;
}

typedef struct bench_ctx {
    uint32_t n, dim;
    double seconds;
    float *data;    /* n × dim */
    float *queries; /* QUERY_POOL × dim */
    aff_engine *engine;
    const char *coll; /* the collection run_engine searches */
    FaissIndex *faiss;
    char (*ids)[16];
    const char *cat_names[N_CATEGORIES];
    char cat_buf[N_CATEGORIES][8];
} bench_ctx;

/* Runs fn until `seconds` have passed (after one warm-up call); returns queries/second. */
typedef int (*batch_fn)(bench_ctx *c, uint32_t nq, uint32_t k, const aff_filter *f,
                        uint32_t pool_off);

static rate measure(bench_ctx *c, batch_fn fn, uint32_t nq, uint32_t k, const aff_filter *f)
{
    uint32_t off = 0;
    if (fn(c, nq, k, f, off) != 0) return (rate){-1, -1};
    double t0 = now_s(), cpu0 = clock_s(CLOCK_PROCESS_CPUTIME_ID), t;
    uint64_t done = 0;
    int batches = 0;
    do {
        off = (off + nq) % (QUERY_POOL - nq);
        if (fn(c, nq, k, f, off) != 0) return (rate){-1, -1};
        done += nq;
        batches++;
        t = now_s();
    } while (t - t0 < c->seconds || batches < 3);
    double cpu = clock_s(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
    return (rate){(double)done / (t - t0), cpu * 1e6 / (double)done};
}

/* Keeps the best of several rounds: the highest rate and the lowest CPU per query. */
static void keep_best(rate *best, rate r)
{
    if (r.qps > best->qps) best->qps = r.qps;
    if (r.cpu_us >= 0 && (best->cpu_us <= 0 || r.cpu_us < best->cpu_us)) best->cpu_us = r.cpu_us;
}

static rate measure_faiss(bench_ctx *c, batch_fn fn, uint32_t nq, uint32_t k)
{
    blas_threads((int)sysconf(_SC_NPROCESSORS_ONLN));
    rate r = measure(c, fn, nq, k, NULL);
    blas_threads(1);
    return r;
}

static int run_faiss(bench_ctx *c, uint32_t nq, uint32_t k, const aff_filter *f, uint32_t off)
{
    (void)f;
    static float *dist;
    static idx_t *labels;
    static size_t cap;
    if ((size_t)nq * k > cap) {
        cap = (size_t)nq * k;
        dist = realloc(dist, cap * sizeof *dist);
        labels = realloc(labels, cap * sizeof *labels);
    }
    return faiss_Index_search(c->faiss, nq, c->queries + (size_t)off * c->dim, k, dist, labels);
}

static int run_engine(bench_ctx *c, uint32_t nq, uint32_t k, const aff_filter *f, uint32_t off)
{
    static aff_query *qs;
    static aff_hit *hits;
    static uint32_t *n_hits;
    static aff_err *errs;
    static size_t cap_q, cap_h;
    if (nq > cap_q) {
        cap_q = nq;
        qs = realloc(qs, cap_q * sizeof *qs);
        n_hits = realloc(n_hits, cap_q * sizeof *n_hits);
        errs = realloc(errs, cap_q * sizeof *errs);
    }
    if ((size_t)nq * k > cap_h) {
        cap_h = (size_t)nq * k;
        hits = realloc(hits, cap_h * sizeof *hits);
    }
    for (uint32_t i = 0; i < nq; i++)
        qs[i] = (aff_query){
            .vector = c->queries + (size_t)(off + i) * c->dim, .dim = c->dim, .k = k, .filter = f};
    int rc = engine_search(c->engine, c->coll, qs, nq, hits, n_hits, errs);
    if (rc != AFF_OK) fprintf(stderr, "engine_search: %s\n", errs[0].msg);
    return rc;
}

static int load_data(bench_ctx *c)
{
    size_t total = (size_t)c->n * c->dim;
    c->data = malloc(total * sizeof(float));
    c->queries = malloc((size_t)QUERY_POOL * c->dim * sizeof(float));
    c->ids = malloc((size_t)c->n * sizeof *c->ids);
    if (!c->data || !c->queries || !c->ids) return -1;
    for (size_t i = 0; i < total; i++)
        c->data[i] = rng_normal();
    for (size_t i = 0; i < (size_t)QUERY_POOL * c->dim; i++)
        c->queries[i] = rng_normal();
    for (int i = 0; i < N_CATEGORIES; i++) {
        snprintf(c->cat_buf[i], sizeof c->cat_buf[i], "c%d", i);
        c->cat_names[i] = c->cat_buf[i];
    }
    if (faiss_IndexFlatIP_new_with(&c->faiss, c->dim) != 0 ||
        faiss_Index_add(c->faiss, c->n, c->data) != 0)
        return -1;
    return 0;
}

/* Creates collection `name` with the given CPU precision and loads every item into it. */
static int load_collection(bench_ctx *c, const char *name, backend_precision precision)
{
    aff_err err = {0};
    engine_collection_spec spec = {
        .name = name, .dim = c->dim, .metric = AFF_METRIC_IP, .precision = precision};
    if (engine_create_collection(c->engine, &spec, &err) != AFF_OK) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    enum { CHUNK = 10000 };
    aff_item *items = calloc(CHUNK, sizeof *items);
    for (uint32_t base = 0; base < c->n; base += CHUNK) {
        uint32_t m = c->n - base < CHUNK ? c->n - base : CHUNK;
        for (uint32_t i = 0; i < m; i++) {
            uint32_t r = base + i;
            snprintf(c->ids[r], sizeof c->ids[r], "sku-%u", r);
            items[i] = (aff_item){.id = c->ids[r],
                                  .vector = c->data + (size_t)r * c->dim,
                                  .dim = c->dim,
                                  .attrs.category = c->cat_names[r % N_CATEGORIES],
                                  .attrs.price = (float)(r % 1000),
                                  .attrs.available = true};
        }
        if (engine_upsert(c->engine, name, items, m, &err) != AFF_OK) {
            fprintf(stderr, "%s\n", err.msg);
            free(items);
            return -1;
        }
    }
    free(items);
    return 0;
}

static int load(bench_ctx *c)
{
    c->coll = "bench";
    return load_data(c) != 0 ? -1 : load_collection(c, "bench", BACKEND_PRECISION_FP32);
}

static void unload_data(bench_ctx *c)
{
    faiss_Index_free(c->faiss);
    free(c->data);
    free(c->queries);
    free(c->ids);
}

static void unload(bench_ctx *c)
{
    aff_err err;
    engine_drop_collection(c->engine, "bench", &err);
    unload_data(c);
}

/* kB of anonymous and file-backed resident memory of this process (/proc/self/status). */
static void rss_kb(long *anon, long *file)
{
    *anon = *file = -1;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        sscanf(line, "RssAnon: %ld", anon);
        sscanf(line, "RssFile: %ld", file);
    }
    fclose(f);
}

/* ---- precision comparison (issue 16) ------------------------------------------------------ */

#define MAX_PREC 3

/* FAISS IndexFlatIP (its best configuration, as above) against the engine with each CPU
 * precision in its own collection, loaded together, measured in interleaved rounds; each also
 * with a category filter passing 10% of the items. Then bytes per item. */
static int run_precisions(aff_engine *engine, const char *sizes, uint32_t dim, double seconds,
                          const backend_precision *precs, int n_prec, FILE *out)
{
    char names[MAX_PREC][32];
    char head[2048];
    int len = snprintf(head, sizeof head, "| N | nq | k | FAISS IndexFlatIP |");
    for (int i = 0; i < n_prec; i++)
        len +=
            snprintf(head + len, sizeof head - (size_t)len, " %s |", cpu_precision_name(precs[i]));
    for (int i = 0; i < n_prec; i++)
        len += snprintf(head + len, sizeof head - (size_t)len, " %s/FAISS |",
                        cpu_precision_name(precs[i]));
    for (int i = 0; i < n_prec; i++)
        len += snprintf(head + len, sizeof head - (size_t)len, " %s 10%% filter |",
                        cpu_precision_name(precs[i]));
    for (int i = 0; i < n_prec; i++)
        len += snprintf(head + len, sizeof head - (size_t)len, " %s 10%%/FAISS |",
                        cpu_precision_name(precs[i]));
    len += snprintf(head + len, sizeof head - (size_t)len, " FAISS CPU us/q |");
    for (int i = 0; i < n_prec; i++)
        len += snprintf(head + len, sizeof head - (size_t)len, " %s CPU us/q |",
                        cpu_precision_name(precs[i]));
    for (int i = 0; i < n_prec; i++)
        len += snprintf(head + len, sizeof head - (size_t)len, " %s CPU x FAISS |",
                        cpu_precision_name(precs[i]));
    len += snprintf(head + len, sizeof head - (size_t)len, "\n|");
    for (int i = 0; i < 5 + 6 * n_prec; i++)
        len += snprintf(head + len, sizeof head - (size_t)len, "---|");
    snprintf(head + len, sizeof head - (size_t)len, "\n");
    fputs(head, stdout);
    if (out) fputs(head, out);

    char mem[4096];
    int mlen = snprintf(mem, sizeof mem,
                        "\n| N | collection | engine accounting B/item | RssAnon delta B/item | "
                        "RssFile delta B/item |\n|---|---|---|---|---|\n");
    const char *p = sizes;
    while (*p) {
        uint32_t n = (uint32_t)strtoul(p, (char **)&p, 10);
        if (*p == ',') p++;
        bench_ctx c = {.n = n, .dim = dim, .seconds = seconds, .engine = engine};
        if (load_data(&c) != 0) return -1;
        for (int i = 0; i < n_prec; i++) {
            snprintf(names[i], sizeof names[i], "bench-%s", cpu_precision_name(precs[i]));
            long a0, f0, a1, f1;
            rss_kb(&a0, &f0);
            if (load_collection(&c, names[i], precs[i]) != 0) return -1;
            rss_kb(&a1, &f1);
            engine_collection_info info;
            aff_err err = {0};
            engine_describe_collection(engine, names[i], &info, &err);
            mlen += snprintf(mem + mlen, sizeof mem - (size_t)mlen,
                             "| %u | %s | %.0f | %.0f | %.0f |\n", n, names[i],
                             (double)info.memory_bytes / n, (double)(a1 - a0) * 1024.0 / n,
                             (double)(f1 - f0) * 1024.0 / n);
        }
        static const uint32_t nqs[] = {1, 16, 256};
        static const uint32_t ks[] = {10, 100};
        for (size_t a = 0; a < 3; a++) {
            for (size_t b = 0; b < 2; b++) {
                uint32_t nq = nqs[a], k = ks[b];
                rate faiss = {0}, unf[MAX_PREC] = {{0}}, filt[MAX_PREC] = {{0}};
                aff_filter f;
                aff_filter_init(&f);
                f.categories = c.cat_names;
                f.n_categories = N_CATEGORIES / 10;
                for (int round = 0; round < ROUNDS; round++) {
                    keep_best(&faiss, measure_faiss(&c, run_faiss, nq, k));
                    for (int i = 0; i < n_prec; i++) {
                        c.coll = names[i];
                        keep_best(&unf[i], measure(&c, run_engine, nq, k, NULL));
                        keep_best(&filt[i], measure(&c, run_engine, nq, k, &f));
                    }
                }
                char line[2048];
                int l = snprintf(line, sizeof line, "| %u | %u | %u | %.0f |", n, nq, k, faiss.qps);
                for (int i = 0; i < n_prec; i++)
                    l += snprintf(line + l, sizeof line - (size_t)l, " %.0f |", unf[i].qps);
                for (int i = 0; i < n_prec; i++)
                    l += snprintf(line + l, sizeof line - (size_t)l, " %.2f |",
                                  unf[i].qps / faiss.qps);
                for (int i = 0; i < n_prec; i++)
                    l += snprintf(line + l, sizeof line - (size_t)l, " %.0f |", filt[i].qps);
                for (int i = 0; i < n_prec; i++)
                    l += snprintf(line + l, sizeof line - (size_t)l, " %.2f |",
                                  filt[i].qps / faiss.qps);
                l += snprintf(line + l, sizeof line - (size_t)l, " %.0f |", faiss.cpu_us);
                for (int i = 0; i < n_prec; i++)
                    l += snprintf(line + l, sizeof line - (size_t)l, " %.0f |", unf[i].cpu_us);
                for (int i = 0; i < n_prec; i++)
                    l += snprintf(line + l, sizeof line - (size_t)l, " %.2f |",
                                  faiss.cpu_us / unf[i].cpu_us);
                snprintf(line + l, sizeof line - (size_t)l, "\n");
                fputs(line, stdout);
                fflush(stdout);
                if (out) fputs(line, out);
            }
        }
        aff_err err;
        for (int i = 0; i < n_prec; i++)
            engine_drop_collection(engine, names[i], &err);
        unload_data(&c);
    }
    fputs(mem, stdout);
    if (out) fputs(mem, out);
    return 0;
}

/* OpenMP reads OMP_WAIT_POLICY once at start-up: re-exec with it set (see README). */
static void ensure_passive_omp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY")) return;
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);
}

int main(int argc, char **argv)
{
    ensure_passive_omp(argv);
    const char *sizes = "100000,1000000";
    const char *out_path = NULL;
    const char *precisions = NULL;
    uint32_t dim = 128;
    double seconds = 1.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--sizes") && i + 1 < argc)
            sizes = argv[++i];
        else if (!strcmp(argv[i], "--dim") && i + 1 < argc)
            dim = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--out") && i + 1 < argc)
            out_path = argv[++i];
        else if (!strcmp(argv[i], "--precisions") && i + 1 < argc)
            precisions = argv[++i];
        else {
            fprintf(stderr,
                    "usage: %s [--sizes N,N] [--dim D] [--seconds S] [--out FILE] "
                    "[--precisions fp32,int8,bf16]\n",
                    argv[0]);
            return 2;
        }
    }
    aff_log_set_level(AFF_LOG_WARN);
    aff_engine *engine;
    aff_err err = {0};
    engine_config cfg = {.backend = ENGINE_BACKEND_CPU};
    if (engine_create(&engine, &cfg, &err) != AFF_OK) {
        fprintf(stderr, "engine: %s\n", err.msg);
        return 1;
    }
    backend_info info;
    engine_backend_info(engine, &info);
    /* FAISS at its best: BLAS from 2 queries up (default 20; ~7x faster for 2..19 here). */
    faiss_set_distance_compute_blas_threshold(2);
    FILE *out = out_path ? fopen(out_path, "w") : NULL;
    char host[64] = "?";
    gethostname(host, sizeof host);
    if (precisions) {
        backend_precision precs[MAX_PREC];
        int n_prec = 0;
        char list[64];
        snprintf(list, sizeof list, "%s", precisions);
        for (char *tok = strtok(list, ","); tok && n_prec < MAX_PREC; tok = strtok(NULL, ","))
            if (cpu_precision_parse(tok, &precs[n_prec++]) != AFF_OK) {
                fprintf(stderr, "unknown precision %s\n", tok);
                return 2;
            }
        char head[1024];
        snprintf(
            head, sizeof head,
            "# CPU precision benchmark\n\nMachine: %s, %ld cores (%s). d=%u, metric=ip, "
            "flat. Queries/second, best of %d interleaved rounds of >= %.1f s after "
            "warm-up; CPU us/q: process CPU time (all threads) per query, lowest of the rounds "
            "(less "
            "disturbed by other processes than the rates). Every engine precision returns the fp32 "
            "top-k; the 10%% filter columns are the engine filtered against FAISS unfiltered.\n\n",
            info.device, sysconf(_SC_NPROCESSORS_ONLN), host, dim, ROUNDS, seconds);
        fputs(head, stdout);
        if (out) fputs(head, out);
        int rc = run_precisions(engine, sizes, dim, seconds, precs, n_prec, out);
        if (out) fclose(out);
        engine_destroy(engine);
        return rc ? 1 : 0;
    }
    char head[1024];
    snprintf(head, sizeof head,
             "# Engine benchmark\n\nMachine: %s, %ld cores (%s). d=%u, metric=ip, flat index. "
             "Rates: queries/second, best of 3 interleaved rounds of >= %.1f s after warm-up. CPU "
             "us/q: process CPU time (all threads) per query, lowest of the rounds.\n\n"
             "| N | nq | k | FAISS direct | engine | engine/FAISS | 50%% filter | 10%% filter | "
             "1%% filter | 50%%/unf | 10%%/unf | 1%%/unf | FAISS CPU us/q | engine CPU us/q | "
             "10%% filter CPU us/q |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
             info.device, sysconf(_SC_NPROCESSORS_ONLN), host, dim, seconds);
    fputs(head, stdout);
    if (out) fputs(head, out);

    const char *p = sizes;
    double worst_unf = INFINITY, worst_filt = INFINITY;
    while (*p) {
        uint32_t n = (uint32_t)strtoul(p, (char **)&p, 10);
        if (*p == ',') p++;
        bench_ctx c = {.n = n, .dim = dim, .seconds = seconds, .engine = engine};
        if (load(&c) != 0) {
            fprintf(stderr, "loading N=%u failed\n", n);
            return 1;
        }
        static const uint32_t nqs[] = {1, 16, 256};
        static const uint32_t ks[] = {10, 100};
        static const uint32_t passing[] = {50, 10, 1}; /* categories of 100 */
        for (size_t a = 0; a < 3; a++) {
            for (size_t b = 0; b < 2; b++) {
                uint32_t nq = nqs[a], k = ks[b];
                /* Best of ROUNDS interleaved rounds: noise on a shared machine only ever
                 * slows a run down, and interleaving exposes each series to the same noise. */
                rate faiss = {0}, unf = {0}, filt[3] = {{0}};
                for (int round = 0; round < ROUNDS; round++) {
                    keep_best(&faiss, measure_faiss(&c, run_faiss, nq, k));
                    keep_best(&unf, measure(&c, run_engine, nq, k, NULL));
                    for (int s = 0; s < 3; s++) {
                        aff_filter f;
                        aff_filter_init(&f);
                        f.categories = c.cat_names;
                        f.n_categories = passing[s];
                        keep_best(&filt[s], measure(&c, run_engine, nq, k, &f));
                    }
                }
                char line[512];
                snprintf(line, sizeof line,
                         "| %u | %u | %u | %.0f | %.0f | %.2f | %.0f | %.0f | %.0f | %.2f | %.2f "
                         "| %.2f | %.0f | %.0f | %.0f |\n",
                         n, nq, k, faiss.qps, unf.qps, unf.qps / faiss.qps, filt[0].qps,
                         filt[1].qps, filt[2].qps, filt[0].qps / unf.qps, filt[1].qps / unf.qps,
                         filt[2].qps / unf.qps, faiss.cpu_us, unf.cpu_us, filt[1].cpu_us);
                fputs(line, stdout);
                fflush(stdout);
                if (out) fputs(line, out);
                worst_unf = fmin(worst_unf, unf.qps / faiss.qps);
                worst_filt = fmin(worst_filt, fmin(filt[0].qps, filt[1].qps) / unf.qps);
            }
        }
        unload(&c);
    }
    char tail[256];
    snprintf(tail, sizeof tail,
             "\nWorst engine/FAISS (unfiltered): %.2f (target >= 0.95). Worst filtered/unfiltered "
             "at 10-50%%: %.2f (target >= 0.70).\n",
             worst_unf, worst_filt);
    fputs(tail, stdout);
    if (out) {
        fputs(tail, out);
        fclose(out);
    }
    engine_destroy(engine);
    return 0;
}

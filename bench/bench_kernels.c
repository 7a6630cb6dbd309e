/*
 * bench_kernels: the kernel benchmark of the CUDA backend, plus a self-check.
 *
 * Benchmark (default): for each N × d catalog (fp16, filled on the device with
 * kernels_bench_value(seed), the generator bench/torch_baseline.py reproduces) and each batch
 * size B and k, the time of one kernels_search call (CUDA events around query upload, GEMM
 * tiles, selection, result download), median of many runs after warm-up; from it GB/s (one
 * pass over the catalog, N·d·2 bytes), TFLOP/s (2·B·N·d) and the ratio to the floor
 * max(N·d·2 / copy bandwidth, 2·B·N·d / GEMM rate), both ceilings measured first in the same
 * run. Also the device memory the table takes against N·d·2. One JSON object per line goes
 * to --out (and a readable table to stdout).
 *
 * Self-check (--check): small random tables through kernels_search and kernels_score against
 * a CPU brute force (double precision, full sort), for k from 1 to 2048, both storages, both
 * metrics and filters; exit status 1 on any mismatch. It needs only nvcc and the CUDA
 * libraries, so bench/gpu_suite.sh runs it even where the full build's dependencies are absent.
 *
 * Paths (--paths auto,tiled,fused): each point is timed through every listed search path
 * (kernels_path) that can serve it; "path" in the JSON. --quick times tiled and fused side by
 * side so that a device run can fill kernels_choose_path's placeholder table.
 *
 * Usage: bench_kernels [--check] [--quick] [--out FILE] [--seed S] [--iters N]
 *                      [--n 1000000,10000000] [--d 128,256] [--b 1,16,128,1024] [--k 10,100,1000]
 *                      [--paths auto,tiled,fused]
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "affinity_kernels.h"

#define MAX_LIST 16

typedef struct list {
    uint64_t v[MAX_LIST];
    int n;
} list;

static int parse_list(const char *s, list *out)
{
    out->n = 0;
    while (*s && out->n < MAX_LIST) {
        char *end;
        unsigned long long x = strtoull(s, &end, 10);
        if (end == s) return -1;
        out->v[out->n++] = x;
        s = *end == ',' ? end + 1 : end;
    }
    return out->n > 0 ? 0 : -1;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* ---- self-check --------------------------------------------------------------------------- */

static uint64_t rng_state = 88172645463325252ull;

static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

typedef struct hit {
    double s;
    uint32_t row;
} hit;

static int cmp_hit(const void *a, const void *b)
{
    const hit *x = a, *y = b;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    return (x->row > y->row) - (x->row < y->row);
}

static double ref_score(const float *q, const float *x, uint32_t dim, bool l2, bool fp16,
                        double *bound)
{
    double dot = 0, ad = 0, xx = 0, qq = 0;
    for (uint32_t d = 0; d < dim; d++) {
        dot += (double)q[d] * x[d];
        ad += fabs((double)q[d] * x[d]);
        xx += (double)x[d] * x[d];
        qq += (double)q[d] * q[d];
    }
    *bound = (dim + 4) * ldexp(1.0, -21) * (2 * ad + xx + qq) + 1e-6;
    if (fp16) *bound += 1.01 * ldexp(1.0, -10) * (2 * ad + xx) + dim * ldexp(1.0, -22);
    return l2 ? 2 * dot - xx - qq : dot;
}

/* The row passes the encoded filter (checked with the shared predicate on host copies). */
static bool row_passes(const kernels_filter *f, const uint32_t *arena, const kernels_attr_cols *c,
                       uint32_t row)
{
    return !f || kernels_filter_pass(f, arena, c, row);
}

static int check_case(kernels_device *dev, kernels_workspace *ws, uint32_t n, uint32_t dim,
                      kernels_storage st, kernels_metric metric, bool grid, bool filtered)
{
    kernels_err err = {0};
    kernels_table *t = NULL;
    int failures = 0;
    const bool l2 = metric == KERNELS_METRIC_L2, fp16 = st == KERNELS_STORAGE_FP16;
    enum { NQ = 10 };
    static const uint32_t ks[NQ] = {1, 10, 32, 33, 256, 257, 1000, 1024, 2047, 2048};
    float *x = malloc((size_t)n * dim * 4), q[NQ * 64];
    uint32_t *rows = malloc((size_t)n * 4);
    kernels_row_attrs *attrs = calloc(n, sizeof *attrs);
    uint32_t *cat = malloc(n * 4), *flags = malloc(n * 4), *tags = calloc((size_t)n * 16, 4);
    float *price = malloc(n * 4);
    uint64_t *bloom = calloc(n, 8);
    for (size_t i = 0; i < (size_t)n * dim; i++)
        x[i] = grid ? (float)((int)(rng() % 5) - 2) * 0.5f
                    : (float)(rng() % 2000001) / 1000000.0f - 1.0f;
    for (uint32_t i = 0; i < n; i++) {
        rows[i] = i;
        attrs[i].category = cat[i] = rng() % 10 + 1;
        attrs[i].price = price[i] = (float)(rng() % 100);
        attrs[i].available = rng() % 3 != 0;
        attrs[i].n_tags = rng() % 3;
        for (uint32_t j = 0; j < attrs[i].n_tags; j++) {
            attrs[i].tags[j] = tags[(size_t)i * 16 + j] = j * 5 + rng() % 5 + 1;
            attrs[i].tag_bloom |= (uint64_t)1 << (attrs[i].tags[j] & 63u);
        }
        bloom[i] = attrs[i].tag_bloom;
        flags[i] = (attrs[i].available ? 1u : 0u) | (attrs[i].n_tags << 8);
    }
    kernels_attr_cols cols = {cat, price, flags, bloom, tags};
    for (uint32_t i = 0; i < NQ * dim; i++)
        q[i] = grid ? (float)((int)(rng() % 5) - 2) * 0.25f
                    : (float)(rng() % 2000001) / 1000000.0f - 1.0f;
    /* Filters: arena = [category bits (2 words)][tags 2][exclude 20]. */
    uint32_t arena[24];
    arena[0] = 0x2AAu; /* categories 1, 3, 5, 7, 9 */
    arena[1] = 0;
    arena[2] = 3;
    arena[3] = 7;
    for (uint32_t i = 0; i < 20; i++)
        arena[4 + i] = i * 3;
    kernels_filter fs[NQ];
    memset(fs, 0, sizeof fs);
    for (uint32_t i = 0; i < NQ; i++) {
        fs[i].price_min = -INFINITY;
        fs[i].price_max = INFINITY;
        if (!filtered || i % 2) continue;
        fs[i].flags = KERNELS_FILTER_CATEGORY | KERNELS_FILTER_EXCLUDE | KERNELS_FILTER_PRICE;
        fs[i].category_off = 0;
        fs[i].category_words32 = 2;
        fs[i].exclude_off = 4;
        fs[i].n_exclude = 20;
        fs[i].price_max = 70.0f;
        if (i % 4 == 0) {
            fs[i].flags |= KERNELS_FILTER_TAGS | KERNELS_FILTER_AVAILABLE;
            fs[i].tags_off = 2;
            fs[i].n_tags = 2;
            fs[i].tag_bloom = (1ull << 3) | (1ull << 7);
        }
    }
    size_t total = 0;
    for (uint32_t i = 0; i < NQ; i++)
        total += ks[i];
    uint32_t *out_rows = malloc(total * 4), counts[NQ];
    float *out_scores = malloc(total * 4);
    hit *hits = malloc((size_t)n * sizeof *hits);

    if (kernels_table_create(&t, dev, dim, st, metric, n / 3, &err) ||
        kernels_table_reserve(t, n, &err) || kernels_table_write(t, rows, n, x, attrs, n, &err)) {
        fprintf(stderr, "check: table: %s\n", err.msg);
        failures++;
        goto out;
    }
    kernels_search_args a = {.queries = q,
                             .nq = NQ,
                             .k = ks,
                             .filters = filtered ? fs : NULL,
                             .arena = arena,
                             .arena_words = 24,
                             .out_rows = out_rows,
                             .out_scores = out_scores,
                             .out_counts = counts};
    if (kernels_search(ws, t, &a, &err)) {
        fprintf(stderr, "check: search: %s\n", err.msg);
        failures++;
        goto out;
    }
    size_t off = 0;
    for (uint32_t i = 0; i < NQ && failures < 20; i++) {
        const kernels_filter *f = filtered ? &fs[i] : NULL;
        uint32_t m = 0;
        double tol = 0;
        for (uint32_t r = 0; r < n; r++) {
            if (!row_passes(f, arena, &cols, r)) continue;
            double b;
            hits[m].s = ref_score(q + (size_t)i * dim, x + (size_t)r * dim, dim, l2, fp16, &b);
            hits[m].row = r;
            tol = b > tol ? b : tol;
            m++;
        }
        qsort(hits, m, sizeof *hits, cmp_hit);
        uint32_t want = ks[i] < m ? ks[i] : m;
        if (counts[i] != want) {
            fprintf(stderr, "check: n %u dim %u k %u: %u hits, want %u\n", n, dim, ks[i], counts[i],
                    want);
            failures++;
        }
        for (uint32_t j = 0; j < want && j < counts[i]; j++) {
            uint32_t r = out_rows[off + j];
            double b,
                own = r < n ? ref_score(q + (size_t)i * dim, x + (size_t)r * dim, dim, l2, fp16, &b)
                            : NAN;
            bool ok = r < n && row_passes(f, arena, &cols, r) &&
                      fabs(out_scores[off + j] - own) <= b &&
                      fabs(out_scores[off + j] - hits[j].s) <= tol &&
                      (j == 0 || out_scores[off + j] <= out_scores[off + j - 1]);
            if (grid) ok = ok && r == hits[j].row && (double)out_scores[off + j] == hits[j].s;
            if (!ok) {
                fprintf(stderr,
                        "check: n %u dim %u %s %s k %u pos %u: row %u score %.9g, reference row "
                        "%u score %.9g\n",
                        n, dim, fp16 ? "fp16" : "fp32", l2 ? "l2" : "ip", ks[i], j, r,
                        out_scores[off + j], hits[j].row, hits[j].s);
                failures++;
                break;
            }
        }
        off += ks[i];
    }

    /* Gather-and-dot on the same table. */
    {
        uint32_t offsets[NQ + 1] = {0}, *cand = malloc(NQ * 50 * 4);
        float *sc = malloc(NQ * 50 * 4);
        for (uint32_t i = 0; i < NQ; i++) {
            offsets[i + 1] = offsets[i] + 50;
            for (uint32_t j = 0; j < 50; j++)
                cand[i * 50 + j] = rng() % n;
        }
        if (kernels_score(ws, t, q, NQ, offsets, cand, sc, &err)) {
            fprintf(stderr, "check: score: %s\n", err.msg);
            failures++;
        } else {
            for (uint32_t j = 0; j < NQ * 50; j++) {
                double b, want = ref_score(q + (size_t)(j / 50) * dim, x + (size_t)cand[j] * dim,
                                           dim, l2, fp16, &b);
                if (fabs(sc[j] - want) > b) {
                    fprintf(stderr, "check: score %u: %.9g vs %.9g\n", j, sc[j], want);
                    failures++;
                    break;
                }
            }
        }
        free(cand);
        free(sc);
    }
out:
    printf("check n=%u dim=%u %s %s %s%s: %s\n", n, dim, fp16 ? "fp16" : "fp32", l2 ? "l2" : "ip",
           grid ? "grid" : "uniform", filtered ? " filtered" : "", failures ? "FAIL" : "ok");
    kernels_table_destroy(t);
    free(x);
    free(rows);
    free(attrs);
    free(cat);
    free(flags);
    free(tags);
    free(price);
    free(bloom);
    free(out_rows);
    free(out_scores);
    free(hits);
    return failures;
}

static int run_check(kernels_device *dev)
{
    kernels_err err = {0};
    kernels_workspace *ws = NULL;
    int failures = 0;
    if (kernels_workspace_create(&ws, dev, 4, &err)) {
        fprintf(stderr, "check: workspace: %s\n", err.msg);
        return 1;
    }
    static const uint32_t sizes[][2] = {{3000, 40}, {70000, 17}, {300000, 8}};
    kernels_device_info info;
    kernels_device_describe(dev, &info);
    /* The CPU emulation of the device (tests/gpu_emul_runtime.h) is far slower: small sizes. */
    int n_sizes = strncmp(info.name, "Emulated", 8) == 0 ? 1 : 3;
    for (int s = 0; s < n_sizes; s++)
        for (int v = 0; v < 8; v++)
            failures +=
                check_case(dev, ws, sizes[s][0], sizes[s][1],
                           (v & 1) ? KERNELS_STORAGE_FP32 : KERNELS_STORAGE_FP16,
                           (v & 2) ? KERNELS_METRIC_L2 : KERNELS_METRIC_IP, v & 4, (v + s) % 2);
    kernels_workspace_destroy(ws);
    printf("check: %s\n", failures ? "FAILED" : "all ok");
    return failures ? 1 : 0;
}

/* ---- benchmark ------------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    list ns, ds, bs, kl;
    parse_list("1000000,10000000", &ns);
    parse_list("128,256", &ds);
    parse_list("1,16,128,1024", &bs);
    parse_list("10,100,1000", &kl);
    const char *out_path = NULL;
    uint64_t seed = 1;
    int iters = 30;
    bool check = false;
    kernels_path paths[3] = {KERNELS_PATH_AUTO};
    int n_paths = 1;
    static const char *const path_names[3] = {"auto", "tiled", "fused"};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--check"))
            check = true;
        else if (!strcmp(a, "--quick")) {
            parse_list("1000000", &ns);
            parse_list("128", &ds);
            parse_list("1,16,32,128", &bs);
            parse_list("10,100,1000", &kl);
            paths[0] = KERNELS_PATH_TILED;
            paths[1] = KERNELS_PATH_FUSED;
            n_paths = 2;
            iters = 10;
        } else if (v && !strcmp(a, "--out"))
            out_path = argv[++i];
        else if (v && !strcmp(a, "--seed"))
            seed = strtoull(argv[++i], NULL, 10);
        else if (v && !strcmp(a, "--iters"))
            iters = atoi(argv[++i]);
        else if (v && !strcmp(a, "--n") && !parse_list(v, &ns))
            i++;
        else if (v && !strcmp(a, "--d") && !parse_list(v, &ds))
            i++;
        else if (v && !strcmp(a, "--b") && !parse_list(v, &bs))
            i++;
        else if (v && !strcmp(a, "--k") && !parse_list(v, &kl))
            i++;
        else if (v && !strcmp(a, "--paths")) {
            n_paths = 0;
            for (const char *p = v; *p && n_paths < 3;) {
                int found = -1;
                for (int j = 0; j < 3; j++)
                    if (!strncmp(p, path_names[j], strlen(path_names[j]))) found = j;
                if (found < 0) break;
                paths[n_paths++] = (kernels_path)found;
                p += strlen(path_names[found]);
                if (*p == ',') p++;
            }
            if (n_paths == 0) {
                fprintf(stderr, "bench_kernels: --paths takes auto, tiled, fused\n");
                return 2;
            }
            i++;
        } else {
            fprintf(stderr,
                    "usage: %s [--check] [--quick] [--out FILE] [--seed S] [--iters N] "
                    "[--n LIST] [--d LIST] [--b LIST] [--k LIST] [--paths LIST]\n",
                    argv[0]);
            return 2;
        }
    }
    if (iters < 3) iters = 3;

    kernels_err err = {0};
    kernels_device *dev = NULL;
    if (kernels_device_open(&dev, 0, &err)) {
        fprintf(stderr, "bench_kernels: %s\n", err.msg);
        return 3;
    }
    kernels_device_info info;
    kernels_device_describe(dev, &info);
    printf("device: %s, %d SMs, %.1f GiB\n", info.name, info.sm_count,
           (double)info.memory_total / (1u << 30));
    if (check) {
        int rc = run_check(dev);
        kernels_device_close(dev);
        return rc;
    }

    FILE *out = out_path ? fopen(out_path, "w") : NULL;
    if (out_path && !out) {
        perror(out_path);
        return 2;
    }
    /* Line by line: a run cut by its time limit still leaves every finished row. */
    if (out) setvbuf(out, NULL, _IOLBF, 0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    double copy_gbps = 0, gemm_tflops = 0;
    if (kernels_bench_copy_bandwidth(dev, (uint64_t)1 << 30, 20, &copy_gbps, &err) ||
        kernels_bench_gemm_rate(dev, 8192, 8192, 8192, 10, &gemm_tflops, &err)) {
        fprintf(stderr, "bench_kernels: ceilings: %s\n", err.msg);
        return 3;
    }
    printf("ceilings: copy %.0f GB/s (read+write), fp16 GEMM %.1f TFLOP/s\n", copy_gbps,
           gemm_tflops);
    if (out)
        fprintf(out,
                "{\"kind\":\"ceilings\",\"device\":\"%s\",\"sm_count\":%d,\"memory_total\":%llu,"
                "\"copy_gbps\":%.1f,\"gemm_tflops\":%.2f}\n",
                info.name, info.sm_count, (unsigned long long)info.memory_total, copy_gbps,
                gemm_tflops);
    printf("%9s %4s %5s %5s %6s %10s %8s %8s %9s %6s\n", "N", "d", "B", "k", "path", "ms/batch",
           "GB/s", "TFLOP/s", "floor ms", "ratio");

    uint32_t max_b = 0;
    for (int i = 0; i < bs.n; i++)
        max_b = bs.v[i] > max_b ? (uint32_t)bs.v[i] : max_b;
    kernels_workspace *ws = NULL;
    if (kernels_workspace_create(&ws, dev, max_b, &err)) {
        fprintf(stderr, "bench_kernels: workspace: %s\n", err.msg);
        return 3;
    }
    int status = 0;
    for (int ni = 0; ni < ns.n; ni++) {
        for (int di = 0; di < ds.n; di++) {
            const uint32_t n = (uint32_t)ns.v[ni], dim = (uint32_t)ds.v[di];
            kernels_device_info before, after;
            kernels_table *t = NULL;
            kernels_device_describe(dev, &before);
            if (kernels_table_create(&t, dev, dim, KERNELS_STORAGE_FP16, KERNELS_METRIC_IP, n,
                                     &err) ||
                kernels_table_fill_random(t, n, seed, &err)) {
                fprintf(stderr, "bench_kernels: N %u d %u: %s\n", n, dim, err.msg);
                kernels_table_destroy(t);
                status = 1;
                continue;
            }
            kernels_device_describe(dev, &after);
            const double catalog = (double)n * dim * 2;
            const uint64_t vec_bytes =
                (uint64_t)n * kernels_padded_dim(dim, KERNELS_STORAGE_FP16) * 2;
            printf("memory N %u d %u: table %.1f MiB (vectors %.1f MiB = %.3f x N*d*2; norms and "
                   "attributes %.1f MiB), device used grew %.1f MiB\n",
                   n, dim, kernels_table_bytes(t) / 1048576.0, vec_bytes / 1048576.0,
                   vec_bytes / catalog, (kernels_table_bytes(t) - vec_bytes) / 1048576.0,
                   ((double)before.memory_free - (double)after.memory_free) / 1048576.0);
            if (out)
                fprintf(out,
                        "{\"kind\":\"memory\",\"n\":%u,\"d\":%u,\"catalog_bytes\":%.0f,"
                        "\"vector_bytes\":%llu,\"table_bytes\":%llu,\"device_used_delta\":%.0f}\n",
                        n, dim, catalog, (unsigned long long)vec_bytes,
                        (unsigned long long)kernels_table_bytes(t),
                        (double)before.memory_free - (double)after.memory_free);
            for (int bi = 0; bi < bs.n; bi++) {
                const uint32_t nb = (uint32_t)bs.v[bi];
                float *q = malloc((size_t)nb * dim * 4);
                for (size_t i = 0; i < (size_t)nb * dim; i++)
                    q[i] = kernels_bench_value(seed + 1, i);
                for (int pk = 0; pk < kl.n * n_paths; pk++) {
                    const int ki = pk / n_paths;
                    const kernels_path path = paths[pk % n_paths];
                    const uint32_t k = (uint32_t)kl.v[ki];
                    if (path == KERNELS_PATH_FUSED &&
                        (nb > KERNELS_FUSED_MAX_B || kernels_k_bucket(k) > KERNELS_FUSED_MAX_K))
                        continue; /* the fused scan cannot serve this point */
                    uint32_t *kk = malloc(nb * 4), *rows = malloc((size_t)nb * k * 4),
                             *counts = malloc(nb * 4);
                    float *scores = malloc((size_t)nb * k * 4), *ms = malloc(iters * 4);
                    for (uint32_t i = 0; i < nb; i++)
                        kk[i] = k;
                    float elapsed = 0;
                    kernels_search_args a = {.queries = q,
                                             .nq = nb,
                                             .k = kk,
                                             .out_rows = rows,
                                             .out_scores = scores,
                                             .out_counts = counts,
                                             .elapsed_ms = &elapsed,
                                             .path = path};
                    int runs = 0;
                    double spent = 0;
                    for (int w = 0; w < 3 && !status; w++)
                        if (kernels_search(ws, t, &a, &err)) status = 1;
                    for (; !status && runs < iters && (runs < 5 || spent < 3000.0); runs++) {
                        if (kernels_search(ws, t, &a, &err)) {
                            status = 1;
                            break;
                        }
                        ms[runs] = elapsed;
                        spent += elapsed;
                    }
                    if (status) {
                        fprintf(stderr, "bench_kernels: N %u d %u B %u k %u: %s\n", n, dim, nb, k,
                                err.msg);
                    } else {
                        qsort(ms, runs, sizeof *ms, cmp_float);
                        double med = ms[runs / 2], sec = med * 1e-3;
                        double flops = 2.0 * nb * (double)n * dim;
                        double floor_s = catalog / (copy_gbps * 1e9);
                        double gemm_s = flops / (gemm_tflops * 1e12);
                        if (gemm_s > floor_s) floor_s = gemm_s;
                        printf("%9u %4u %5u %5u %6s %10.3f %8.0f %8.1f %9.3f %6.2f\n", n, dim, nb,
                               k, path_names[path], med, catalog / sec / 1e9, flops / sec / 1e12,
                               floor_s * 1e3, sec / floor_s);
                        if (out) {
                            fprintf(out,
                                    "{\"kind\":\"search\",\"n\":%u,\"d\":%u,\"b\":%u,\"k\":%u,"
                                    "\"path\":\"%s\",\"runs\":%d,\"ms_median\":%.4f,"
                                    "\"ms_min\":%.4f,\"gbps\":%.1f,\"tflops\":%.2f,"
                                    "\"floor_ms\":%.4f,\"ratio\":%.3f,\"top_rows\":[",
                                    n, dim, nb, k, path_names[path], runs, med, ms[0],
                                    catalog / sec / 1e9, flops / sec / 1e12, floor_s * 1e3,
                                    sec / floor_s);
                            for (uint32_t j = 0; j < counts[0] && j < 10; j++)
                                fprintf(out, "%s%u", j ? "," : "", rows[j]);
                            fprintf(out, "],\"top_scores\":[");
                            for (uint32_t j = 0; j < counts[0] && j < 10; j++)
                                fprintf(out, "%s%.6g", j ? "," : "", scores[j]);
                            fprintf(out, "]}\n");
                            fflush(out);
                        }
                    }
                    free(kk);
                    free(rows);
                    free(counts);
                    free(scores);
                    free(ms);
                    if (status) break;
                }
                free(q);
                if (status) break;
            }
            kernels_table_destroy(t);
            if (status) break;
        }
        if (status) break;
    }
    kernels_workspace_destroy(ws);
    kernels_device_close(dev);
    if (out) fclose(out);
    return status;
}

/*
 * bench_als: the iALS trainer on its own (no server): training time and memory on ML-1M or a
 * synthetic set, and ML-1M strong-generalisation quality with exact fold-in, for tuning.
 * The end-to-end quality benchmark through gRPC is bench/quality.
 *
 *   bench_als ml1m DATA_DIR [--factors 64] [--epochs 10] [--lambda L] [--alpha0 A] [--cg N]
 *   bench_als synthetic N_EVENTS [--users U] [--items I] [--factors 64] [--epochs 10]
 *   either with [--device cpu|gpu] (default cpu): gpu trains through the CUDA backend's
 *   training device (kernels/als.cu) and fails, rather than report a CPU time, when the
 *   epochs did not run there.
 *
 * ml1m reads DATA_DIR/ml-1m-full-resn/{train,test}.txt (every interaction of every user; see
 * shared/data/README.md), holds out 1,000 test users (seed 42), trains on the others and, for
 * each test user, folds in a random 80% of their items and ranks the other 20% against every
 * item not in the history: Recall@20/50 (normalised by min(R, |held out|)), NDCG@10/100.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "als.h"
#include "backend.h"
#include "rng.h"

typedef struct user_items {
    uint32_t *items;
    uint32_t n, cap;
} user_items;

static void push(user_items *u, uint32_t item)
{
    if (u->n == u->cap) {
        u->cap = u->cap ? 2 * u->cap : 16;
        u->items = realloc(u->items, u->cap * sizeof *u->items);
        if (!u->items) abort();
    }
    u->items[u->n++] = item;
}

static uint32_t read_file(const char *path, user_items *users, uint32_t max_users,
                          uint32_t *max_item)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        exit(2);
    }
    char *line = NULL;
    size_t cap = 0;
    uint32_t n_users = 0;
    while (getline(&line, &cap, f) > 0) {
        char *s = line, *end;
        unsigned long u = strtoul(s, &end, 10);
        if (end == s || u >= max_users) continue;
        s = end;
        for (;;) {
            unsigned long it = strtoul(s, &end, 10);
            if (end == s) break;
            push(&users[u], (uint32_t)it);
            if (it > *max_item) *max_item = (uint32_t)it;
            s = end;
        }
        if (u + 1 > n_users) n_users = (uint32_t)u + 1;
    }
    free(line);
    fclose(f);
    return n_users;
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double cpu_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static long max_rss_mb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024;
}

static bool print_epoch(void *ctx, uint32_t e, uint32_t n, double loss)
{
    (void)ctx;
    fprintf(stderr, "  epoch %u/%u loss %.5f\n", e, n, loss);
    return true;
}

static void parse_params(int argc, char **argv, int from, als_params *p)
{
    for (int i = from; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--factors"))
            p->factors = (uint32_t)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--epochs"))
            p->epochs = (uint32_t)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--lambda"))
            p->lambda = (float)atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--alpha0"))
            p->alpha0 = (float)atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--cg"))
            p->cg_steps = (uint32_t)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads"))
            p->threads = (uint32_t)atoi(argv[i + 1]);
    }
}

/* The training device --device names: NULL for the CPU, the CUDA backend's for gpu (*b holds
 * the backend; the caller destroys it). Exits when gpu is asked for and none is usable. */
static const als_device *device_for(int argc, char **argv, als_device *dev, backend **b)
{
    const char *want = "cpu";
    *b = NULL;
    for (int i = 3; i + 1 < argc; i += 2)
        if (!strcmp(argv[i], "--device")) want = argv[i + 1];
    if (!strcmp(want, "cpu")) return NULL;
    if (strcmp(want, "gpu") != 0) {
        fprintf(stderr, "--device must be cpu or gpu\n");
        exit(2);
    }
#ifdef AFFINITY_HAVE_CUDA
    aff_err err = {0};
    if (backend_gpu_create(b, &(backend_gpu_config){0}, &err) != AFF_OK) {
        fprintf(stderr, "--device gpu: %s\n", err.msg);
        exit(1);
    }
    if (!(*b)->ops->trainer || !(*b)->ops->trainer(*b, dev)) {
        fprintf(stderr, "--device gpu: the CUDA backend offers no training device\n");
        exit(1);
    }
    backend_info info;
    (*b)->ops->describe(*b, &info);
    printf("training device: %s\n", info.device);
    return dev;
#else
    (void)dev;
    fprintf(stderr, "--device gpu: this build has no CUDA (built with AFFINITY_GPU=OFF)\n");
    exit(2);
#endif
}

/* After training on a device: fails when the epochs fell back to the CPU. */
static int check_device(const als_device *dev, const als_report *rep)
{
    if (dev && !rep->on_device) {
        fprintf(stderr, "--device gpu: training ran on the CPU instead: %s\n", rep->device_error);
        return 1;
    }
    return 0;
}

typedef struct scored {
    float s;
    uint32_t item;
} scored;

static int cmp_scored(const void *a, const void *b)
{
    const scored *x = a, *y = b;
    return x->s < y->s ? 1 : x->s > y->s ? -1 : (x->item > y->item) - (x->item < y->item);
}

static int run_ml1m(const char *dir, int argc, char **argv)
{
    enum { MAX_USERS = 7000 };
    user_items *users = calloc(MAX_USERS, sizeof *users);
    char path[4096];
    uint32_t max_item = 0;
    snprintf(path, sizeof path, "%s/ml-1m-full-resn/train.txt", dir);
    uint32_t nu = read_file(path, users, MAX_USERS, &max_item);
    snprintf(path, sizeof path, "%s/ml-1m-full-resn/test.txt", dir);
    uint32_t nu2 = read_file(path, users, MAX_USERS, &max_item);
    if (nu2 > nu) nu = nu2;
    uint32_t ni = max_item + 1;

    /* 1,000 test users by a seeded shuffle; the rest train. */
    uint32_t *perm = malloc(nu * sizeof *perm);
    for (uint32_t i = 0; i < nu; i++)
        perm[i] = i;
    aff_rng rng = {42};
    for (uint32_t i = nu - 1; i > 0; i--) {
        uint32_t j = (uint32_t)(aff_rng_next(&rng) % (i + 1));
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    uint32_t n_test = 1000, n_train = nu - n_test;
    uint64_t nnz = 0;
    for (uint32_t i = 0; i < n_train; i++)
        nnz += users[perm[n_test + i]].n;
    uint64_t *rp = malloc((n_train + 1) * sizeof *rp);
    uint32_t *col = malloc(nnz * sizeof *col);
    float *conf = malloc(nnz * sizeof *conf);
    rp[0] = 0;
    for (uint32_t i = 0; i < n_train; i++) {
        user_items *u = &users[perm[n_test + i]];
        for (uint32_t k = 0; k < u->n; k++) {
            col[rp[i] + k] = u->items[k];
            conf[rp[i] + k] = 1.0f;
        }
        rp[i + 1] = rp[i] + u->n;
    }
    als_params p;
    als_params_init(&p);
    p.epochs = 10;
    parse_params(argc, argv, 3, &p);
    als_matrix m = {.n_rows = n_train, .n_cols = ni, .row_ptr = rp, .col = col, .conf = conf};
    float *uf = malloc((size_t)n_train * p.factors * sizeof(float));
    float *vf = malloc((size_t)ni * p.factors * sizeof(float));
    als_report rep;
    aff_err err;
    als_device dev_store;
    backend *gpu = NULL;
    const als_device *dev = device_for(argc, argv, &dev_store, &gpu);
    double t0 = now_s(), c0 = cpu_s();
    if (als_train(&m, &p, dev, uf, vf, print_epoch, NULL, &rep, &err)) {
        fprintf(stderr, "train: %s\n", err.msg);
        return 1;
    }
    if (check_device(dev, &rep)) return 1;
    double train_s = now_s() - t0, train_cpu = cpu_s() - c0;

    /* Fold-in and full ranking for the test users. */
    float *gram = malloc((size_t)p.factors * p.factors * sizeof(float));
    als_gramian(vf, ni, p.factors, gram);
    float *scratch = malloc(als_solve_scratch_floats(p.factors) * sizeof(float));
    float *x = malloc(p.factors * sizeof(float));
    scored *sc = malloc(ni * sizeof *sc);
    uint8_t *mark = calloc(ni, 1);
    float *ones = malloc(ni * sizeof(float));
    for (uint32_t i = 0; i < ni; i++)
        ones[i] = 1.0f;
    double r20 = 0, r50 = 0, n10 = 0, n100 = 0, fold_s = 0;
    uint32_t evaluated = 0;
    aff_rng split = {7};
    for (uint32_t t = 0; t < n_test; t++) {
        user_items *u = &users[perm[t]];
        if (u->n < 5) continue;
        for (uint32_t i = u->n - 1; i > 0; i--) {
            uint32_t j = (uint32_t)(aff_rng_next(&split) % (i + 1));
            uint32_t tmp = u->items[i];
            u->items[i] = u->items[j];
            u->items[j] = tmp;
        }
        uint32_t n_hist = (uint32_t)(u->n * 0.8);
        double f0 = now_s();
        als_solve_row(vf, gram, p.factors, n_train, &p, u->items, ones, n_hist, x, scratch);
        fold_s += now_s() - f0;
        uint32_t nc = 0;
        for (uint32_t k = 0; k < n_hist; k++)
            mark[u->items[k]] = 1;
        for (uint32_t i = 0; i < ni; i++) {
            if (mark[i]) continue;
            float s = 0;
            for (uint32_t k = 0; k < p.factors; k++)
                s += x[k] * vf[(size_t)i * p.factors + k];
            sc[nc++] = (scored){s, i};
        }
        for (uint32_t k = 0; k < n_hist; k++)
            mark[u->items[k]] = 0;
        for (uint32_t k = n_hist; k < u->n; k++)
            mark[u->items[k]] = 2;
        qsort(sc, nc, sizeof *sc, cmp_scored);
        uint32_t n_held = u->n - n_hist, hit20 = 0, hit50 = 0;
        double dcg10 = 0, dcg100 = 0, idcg10 = 0, idcg100 = 0;
        for (uint32_t r = 0; r < 100 && r < nc; r++) {
            if (mark[sc[r].item] != 2) continue;
            if (r < 20) hit20++;
            if (r < 50) hit50++;
            if (r < 10) dcg10 += 1.0 / log2(r + 2.0);
            dcg100 += 1.0 / log2(r + 2.0);
        }
        for (uint32_t r = 0; r < n_held && r < 100; r++) {
            if (r < 10) idcg10 += 1.0 / log2(r + 2.0);
            idcg100 += 1.0 / log2(r + 2.0);
        }
        for (uint32_t k = n_hist; k < u->n; k++)
            mark[u->items[k]] = 0;
        r20 += (double)hit20 / (n_held < 20 ? n_held : 20);
        r50 += (double)hit50 / (n_held < 50 ? n_held : 50);
        n10 += dcg10 / idcg10;
        n100 += dcg100 / idcg100;
        evaluated++;
    }
    printf("ml1m strong generalisation: users train %u test %u, items %u, train events %llu\n",
           n_train, evaluated, ni, (unsigned long long)nnz);
    printf("params: factors %u epochs %u lambda %g alpha0 %g nu %g cg_steps %u threads %u\n",
           p.factors, p.epochs, p.lambda, p.alpha0, p.nu, p.cg_steps, p.threads);
    printf("train %.2f s wall, %.2f s CPU (%u epochs, final loss %.5f), max RSS %ld MB\n", train_s,
           train_cpu, rep.epochs_run, rep.loss, max_rss_mb());
    printf("fold-in %.3f ms per test user (exact solve of the 80%% history)\n",
           fold_s * 1e3 / evaluated);
    /* Fold-in cost at a 500-item history (the server's default history length). */
    {
        uint32_t hist[500];
        float c500[500];
        for (uint32_t k = 0; k < 500; k++) {
            hist[k] = (k * 7919u) % ni;
            c500[k] = 1.0f + (float)(k % 3);
        }
        double f0 = cpu_s();
        for (int it = 0; it < 200; it++)
            als_solve_row(vf, gram, p.factors, ni, &p, hist, c500, 500, x, scratch);
        printf("fold-in at a 500-item history: %.3f ms CPU per solve (d = %u)\n",
               (cpu_s() - f0) * 1e3 / 200, p.factors);
    }
    printf("Recall@20 %.4f  Recall@50 %.4f  NDCG@10 %.4f  NDCG@100 %.4f\n", r20 / evaluated,
           r50 / evaluated, n10 / evaluated, n100 / evaluated);
    if (gpu) gpu->ops->destroy(gpu);
    return 0;
}

static int run_synthetic(long n_events, int argc, char **argv)
{
    uint32_t nu = 200000, ni = 50000;
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--users")) nu = (uint32_t)atoi(argv[i + 1]);
        if (!strcmp(argv[i], "--items")) ni = (uint32_t)atoi(argv[i + 1]);
    }
    als_params p;
    als_params_init(&p);
    p.epochs = 10;
    parse_params(argc, argv, 3, &p);
    /* Events spread evenly over users, items Zipf-like (item = floor(ni * u^2)). */
    uint64_t *rp = malloc(((size_t)nu + 1) * sizeof *rp);
    uint32_t *col = malloc((size_t)n_events * sizeof *col);
    float *conf = malloc((size_t)n_events * sizeof *conf);
    aff_rng rng = {1};
    uint64_t k = 0;
    for (uint32_t u = 0; u < nu; u++) {
        rp[u] = k;
        uint64_t want = (uint64_t)n_events * (u + 1) / nu;
        while (k < want) {
            double r = aff_rng_uniform(&rng);
            col[k] = (uint32_t)(ni * r * r);
            conf[k] = 1.0f + (float)(aff_rng_next(&rng) % 3);
            k++;
        }
    }
    rp[nu] = k;
    als_matrix m = {.n_rows = nu, .n_cols = ni, .row_ptr = rp, .col = col, .conf = conf};
    float *uf = malloc((size_t)nu * p.factors * sizeof(float));
    float *vf = malloc((size_t)ni * p.factors * sizeof(float));
    als_report rep;
    aff_err err;
    als_device dev_store;
    backend *gpu = NULL;
    const als_device *dev = device_for(argc, argv, &dev_store, &gpu);
    double t0 = now_s(), c0 = cpu_s();
    if (als_train(&m, &p, dev, uf, vf, print_epoch, NULL, &rep, &err)) {
        fprintf(stderr, "train: %s\n", err.msg);
        return 1;
    }
    if (check_device(dev, &rep)) return 1;
    double wall = now_s() - t0, cpu = cpu_s() - c0;
    printf("synthetic: %ld events, %u users, %u items, factors %u, epochs %u, cg_steps %u\n",
           n_events, nu, ni, p.factors, p.epochs, p.cg_steps);
    printf("train %.2f s wall, %.2f s CPU, final loss %.5f, max RSS %ld MB\n", wall, cpu, rep.loss,
           max_rss_mb());
    if (gpu) gpu->ops->destroy(gpu);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "ml1m")) return run_ml1m(argv[2], argc, argv);
    if (argc >= 3 && !strcmp(argv[1], "synthetic")) return run_synthetic(atol(argv[2]), argc, argv);
    fprintf(stderr, "usage: bench_als ml1m DATA_DIR [options] | synthetic N_EVENTS [options]\n");
    return 2;
}

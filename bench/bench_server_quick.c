/*
 * bench_server_quick.c: a quick measurement of affinityd's Search path against raw FAISS.
 *
 *   bench_server_quick [--n 100000] [--dim 128] [--k 10] [--seconds 5] [--batched-max 256]
 *                      [--binary path/to/affinityd]
 *
 * 1. Raw FAISS, in this process: an exact IndexFlatIP over the same N×d catalog, searched
 *    with faiss_Index_search in batches of 64 and 256 queries: the batched throughput ceiling.
 * 2. affinityd, started twice (max_batch = --batched-max, then max_batch = 1), loaded over
 *    gRPC with the same catalog; Search calls of one query (k) from 1, 16, 64 and 256 client
 * threads sharing one channel (closed loop, as many calls in flight as threads) for --seconds each.
 *    Reports calls/s, p50 and p99 latency, and the server's own batch counters.
 * Client and server share the machine: on a small machine the client's threads take CPU the
 * server could have used, so server figures are a lower bound. Output: Markdown on stdout.
 */
#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "affinity/v1/affinity.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "transport_client.h"

typedef struct opts {
    int n, dim, k;
    double seconds;
    int batched_max;
    const char *binary;
} opts;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CPU seconds (user + system) used so far by this process. */
static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

/* CPU seconds used so far by process pid (from /proc/pid/stat), 0 when unreadable. */
static double proc_cpu_s(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');
    unsigned long utime = 0, stime = 0;
    if (!p ||
        sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return 0;
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rng_f(uint64_t *s)
{
    return (float)((double)(rng_next(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* ---- raw FAISS ------------------------------------------------------------------------- */

/* Queries per second of raw FAISS at one batch size; *cpu_ms_per_query gets the CPU time
 * (all threads) per query. */
static double faiss_qps(const float *xb, int n, int d, int k, int batch, double seconds,
                        double *cpu_ms_per_query)
{
    FaissIndexFlatIP *idx = NULL;
    if (faiss_IndexFlatIP_new_with(&idx, d) || faiss_Index_add(idx, n, xb)) {
        fprintf(stderr, "faiss: %s\n", faiss_get_last_error());
        exit(1);
    }
    uint64_t seed = 77;
    float *q = malloc(sizeof(float) * (size_t)batch * d);
    float *dist = malloc(sizeof(float) * (size_t)batch * k);
    idx_t *labels = malloc(sizeof(idx_t) * (size_t)batch * k);
    for (int i = 0; i < batch * d; i++)
        q[i] = rng_f(&seed);
    faiss_Index_search(idx, batch, q, k, dist, labels); /* warm-up */
    long queries = 0;
    double c0 = self_cpu_s();
    double t0 = now_s(), t;
    do {
        faiss_Index_search(idx, batch, q, k, dist, labels);
        queries += batch;
        t = now_s();
    } while (t - t0 < seconds);
    free(q);
    free(dist);
    free(labels);
    faiss_Index_free(idx);
    *cpu_ms_per_query = (self_cpu_s() - c0) * 1e3 / (double)queries;
    return (double)queries / (t - t0);
}

/* ---- the server ------------------------------------------------------------------------- */

typedef struct server {
    pid_t pid;
    char target[64];
    char dir[64];
} server;

static void server_start(server *s, const opts *o, int max_batch)
{
    snprintf(s->dir, sizeof s->dir, "/tmp/affinity-bench-XXXXXX");
    if (!mkdtemp(s->dir)) {
        perror("mkdtemp");
        exit(1);
    }
    char port_file[128], log_file[128], mb[16];
    snprintf(port_file, sizeof port_file, "%s/port", s->dir);
    snprintf(log_file, sizeof log_file, "%s/affinityd.log", s->dir);
    snprintf(mb, sizeof mb, "%d", max_batch);
    pid_t parent = getpid();
    s->pid = fork();
    if (s->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        int fd = open(log_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 1);
        dup2(fd, 2);
        execl(o->binary, o->binary, "--listen", "127.0.0.1:0", "--port-file", port_file,
              "--backend", "cpu", "--max-batch", mb, "--queue-limit", "100000", "--log-level",
              "warn", (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 6000; i++) {
        FILE *f = fopen(port_file, "r");
        int port = 0;
        if (f) {
            int ok = fscanf(f, "%d", &port);
            fclose(f);
            if (ok == 1 && port > 0) {
                snprintf(s->target, sizeof s->target, "127.0.0.1:%d", port);
                return;
            }
        }
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "affinityd did not start (log in %s)\n", log_file);
    exit(1);
}

static void server_stop(server *s)
{
    kill(s->pid, SIGTERM);
    int status;
    waitpid(s->pid, &status, 0);
    char path[160];
    snprintf(path, sizeof path, "%s/port", s->dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/affinityd.log", s->dir);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        unlink(path);
    else
        fprintf(stderr, "affinityd exited with status %d; log kept in %s\n", status, path);
    rmdir(s->dir);
}

static void check(int rc, const transport_call_status *st, const char *what)
{
    if (rc) {
        fprintf(stderr, "%s: %d %s\n", what, st->code, st->message);
        exit(1);
    }
}

static void load_catalog(transport_client *c, const float *xb, const opts *o)
{
    transport_call_status st;
    Affinity__V1__CreateCollectionRequest cr = AFFINITY__V1__CREATE_COLLECTION_REQUEST__INIT;
    cr.name = "bench";
    cr.dimension = (uint32_t)o->dim;
    cr.metric = AFFINITY__V1__METRIC__METRIC_INNER_PRODUCT;
    ProtobufCMessage *resp = NULL;
    check(transport_client_unary(c, TRANSPORT_METHOD_CREATE_COLLECTION, &cr.base,
                                 &affinity__v1__create_collection_response__descriptor, 0, &resp,
                                 &st),
          &st, "CreateCollection");
    transport_client_free(resp);
    transport_client_stream *s = NULL;
    aff_err err;
    if (transport_client_stream_open(c, TRANSPORT_METHOD_UPSERT_ITEMS, 600000, &s, &err)) {
        fprintf(stderr, "UpsertItems: %s\n", err.msg);
        exit(1);
    }
    enum { CHUNK = 2000 };
    static Affinity__V1__Item items[CHUNK];
    static Affinity__V1__Item *ptrs[CHUNK];
    static char ids[CHUNK][16];
    for (int base = 0; base < o->n; base += CHUNK) {
        int m = o->n - base < CHUNK ? o->n - base : CHUNK;
        for (int i = 0; i < m; i++) {
            affinity__v1__item__init(&items[i]);
            snprintf(ids[i], sizeof ids[i], "i%d", base + i);
            items[i].id = ids[i];
            items[i].n_vector = (size_t)o->dim;
            items[i].vector = (float *)xb + (size_t)(base + i) * o->dim;
            ptrs[i] = &items[i];
        }
        Affinity__V1__UpsertItemsRequest ur = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
        ur.collection = "bench";
        ur.n_items = (size_t)m;
        ur.items = ptrs;
        if (transport_client_stream_send(s, &ur.base, &err)) break;
    }
    check(transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor, &resp,
                                         &st),
          &st, "UpsertItems");
    transport_client_free(resp);
    transport_client_stream_destroy(s);
}

typedef struct loader {
    pthread_t th;
    transport_client *c;
    const opts *o;
    uint64_t seed;
    volatile int *stop;
    double *lat; /* seconds per call */
    long n_lat, cap;
    long errors;
} loader;

static void *loader_main(void *arg)
{
    loader *l = arg;
    const opts *o = l->o;
    float *v = malloc(sizeof(float) * (size_t)o->dim);
    Affinity__V1__Query q = AFFINITY__V1__QUERY__INIT, *qp = &q;
    q.n_vector = (size_t)o->dim;
    q.vector = v;
    Affinity__V1__SearchRequest req = AFFINITY__V1__SEARCH_REQUEST__INIT;
    req.collection = "bench";
    req.k = (uint32_t)o->k;
    req.n_queries = 1;
    req.queries = &qp;
    while (!*l->stop) {
        for (int j = 0; j < o->dim; j++)
            v[j] = rng_f(&l->seed);
        transport_call_status st;
        ProtobufCMessage *resp = NULL;
        double t0 = now_s();
        int rc =
            transport_client_unary(l->c, TRANSPORT_METHOD_SEARCH, &req.base,
                                   &affinity__v1__search_response__descriptor, 60000, &resp, &st);
        double dt = now_s() - t0;
        transport_client_free(resp);
        if (rc) {
            l->errors++;
            continue;
        }
        if (l->n_lat == l->cap) {
            l->cap = l->cap ? 2 * l->cap : 4096;
            l->lat = realloc(l->lat, sizeof(double) * (size_t)l->cap);
        }
        l->lat[l->n_lat++] = dt;
    }
    free(v);
    return NULL;
}

typedef struct result {
    double qps, p50_ms, p99_ms;
    double server_cpu_ms, client_cpu_ms; /* CPU time per call */
    long errors;
} result;

static result run_load(transport_client *c, const opts *o, int threads, pid_t server_pid)
{
    loader *ls = calloc((size_t)threads, sizeof *ls);
    volatile int stop = 0;
    /* warm-up of 0.5 s is measured separately and discarded */
    for (int phase = 0; phase < 2; phase++) {
        stop = 0;
        for (int i = 0; i < threads; i++) {
            ls[i].n_lat = 0;
            ls[i].errors = 0;
            ls[i].c = c;
            ls[i].o = o;
            ls[i].seed = 1000u * (uint64_t)i + (uint64_t)phase;
            ls[i].stop = &stop;
            pthread_create(&ls[i].th, NULL, loader_main, &ls[i]);
        }
        double t0 = now_s(), server_c0 = proc_cpu_s(server_pid), client_c0 = self_cpu_s();
        double dur = phase == 0 ? 0.5 : o->seconds;
        while (now_s() - t0 < dur) {
            struct timespec ts = {0, 10000000};
            nanosleep(&ts, NULL);
        }
        stop = 1;
        for (int i = 0; i < threads; i++)
            pthread_join(ls[i].th, NULL);
        if (phase == 1) {
            double elapsed = now_s() - t0;
            long total = 0, errors = 0;
            for (int i = 0; i < threads; i++) {
                total += ls[i].n_lat;
                errors += ls[i].errors;
            }
            double *all = malloc(sizeof(double) * (size_t)(total ? total : 1));
            long k = 0;
            for (int i = 0; i < threads; i++)
                for (long j = 0; j < ls[i].n_lat; j++)
                    all[k++] = ls[i].lat[j];
            qsort(all, (size_t)total, sizeof *all, cmp_double);
            double per = total ? 1e3 / (double)total : 0;
            result r = {.qps = (double)total / elapsed,
                        .p50_ms = total ? all[total / 2] * 1e3 : 0,
                        .p99_ms = total ? all[(long)((double)total * 0.99)] * 1e3 : 0,
                        .errors = errors,
                        .server_cpu_ms = (proc_cpu_s(server_pid) - server_c0) * per,
                        .client_cpu_ms = (self_cpu_s() - client_c0) * per};
            free(all);
            for (int i = 0; i < threads; i++)
                free(ls[i].lat);
            free(ls);
            return r;
        }
    }
    return (result){0};
}

static void server_stats(transport_client *c, char *out, size_t size)
{
    Affinity__V1__GetServerInfoRequest req = AFFINITY__V1__GET_SERVER_INFO_REQUEST__INIT;
    Affinity__V1__ServerInfo *info = NULL;
    transport_call_status st;
    if (transport_client_unary(c, TRANSPORT_METHOD_GET_SERVER_INFO, &req.base,
                               &affinity__v1__server_info__descriptor, 0,
                               (ProtobufCMessage **)&info, &st)) {
        snprintf(out, size, "n/a");
        return;
    }
    Affinity__V1__BatchStats *b = info->batch_stats;
    snprintf(out, size, "%llu calls in %llu batches (mean %.1f, max %llu)",
             (unsigned long long)b->requests, (unsigned long long)b->batches,
             b->batches ? (double)b->requests / (double)b->batches : 0.0,
             (unsigned long long)b->max_batch_seen);
    transport_client_free(&info->base);
}

int main(int argc, char **argv)
{
    opts o = {.n = 100000,
              .dim = 128,
              .k = 10,
              .seconds = 5,
              .batched_max = 256,
              .binary = AFF_BINARY_DIR "/src/affinityd"};
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--n"))
            o.n = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--dim"))
            o.dim = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--k"))
            o.k = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds"))
            o.seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--batched-max"))
            o.batched_max = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--binary"))
            o.binary = argv[i + 1];
        else {
            fprintf(stderr, "unknown flag %s\n", argv[i]);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    uint64_t seed = 12345;
    float *xb = malloc(sizeof(float) * (size_t)o.n * o.dim);
    for (long i = 0; i < (long)o.n * o.dim; i++)
        xb[i] = rng_f(&seed);

    printf("## Search throughput: affinityd vs raw FAISS\n\n");
    printf("Catalog N=%d, d=%d, inner product, k=%d; one query per Search call; %.0f s per "
           "point after 0.5 s warm-up.\n\n",
           o.n, o.dim, o.k, o.seconds);
    double cpu1, cpu64, cpu256;
    double raw64 = faiss_qps(xb, o.n, o.dim, o.k, 64, o.seconds, &cpu64);
    double raw256 = faiss_qps(xb, o.n, o.dim, o.k, 256, o.seconds, &cpu256);
    double raw1 = faiss_qps(xb, o.n, o.dim, o.k, 1, o.seconds, &cpu1);
    printf("### Raw FAISS (IndexFlatIP, faiss_Index_search, in-process)\n\n");
    printf("| batch | queries/s | CPU ms per query |\n|---:|---:|---:|\n| 1 | %.0f | %.3f |\n"
           "| 64 | %.0f | %.3f |\n| 256 | %.0f | %.3f |\n\n",
           raw1, cpu1, raw64, cpu64, raw256, cpu256);
    double raw_best = raw64 > raw256 ? raw64 : raw256;

    int conc[4] = {1, 16, 64, 256};
    result res[2][4];
    char stats[2][4][160];
    int mb[2] = {o.batched_max, 1};
    for (int m = 0; m < 2; m++) {
        server s;
        server_start(&s, &o, mb[m]);
        transport_client *c = NULL;
        transport_client_options co = {.target = s.target, .timeout_ms = 600000};
        aff_err err;
        if (transport_client_create(&c, &co, &err)) {
            fprintf(stderr, "%s\n", err.msg);
            return 1;
        }
        load_catalog(c, xb, &o);
        for (int i = 0; i < 4; i++) {
            res[m][i] = run_load(c, &o, conc[i], s.pid);
            server_stats(c, stats[m][i], sizeof stats[m][i]);
        }
        transport_client_destroy(c);
        server_stop(&s);
    }
    printf("### affinityd Search over gRPC (loopback, client on the same machine)\n\n");
    printf("| max_batch | calls in flight | calls/s | p50 ms | p99 ms | errors | server CPU ms "
           "per call | client CPU ms per call | server batch counters (cumulative) |\n"
           "|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for (int m = 0; m < 2; m++)
        for (int i = 0; i < 4; i++)
            printf("| %d | %d | %.0f | %.2f | %.2f | %ld | %.3f | %.3f | %s |\n", mb[m], conc[i],
                   res[m][i].qps, res[m][i].p50_ms, res[m][i].p99_ms, res[m][i].errors,
                   res[m][i].server_cpu_ms, res[m][i].client_cpu_ms, stats[m][i]);
    double best_batched = 0, best_unbatched = 0;
    for (int i = 0; i < 3; i++) { /* the targets are for 1, 16 and 64 in flight */
        if (res[0][i].qps > best_batched) best_batched = res[0][i].qps;
        if (res[1][i].qps > best_unbatched) best_unbatched = res[1][i].qps;
    }
    printf("\n### Against the targets\n\n");
    printf("- batched (max_batch=%d) best at ≤ 64 in flight %.0f calls/s = **%.2f×** raw FAISS "
           "batched (best of 64/256: %.0f q/s), **%.2f×** raw FAISS at batch 64 (%.0f q/s, the "
           "largest batch 64 calls in flight can form); target ≥ 0.8×\n",
           o.batched_max, best_batched, best_batched / raw_best, raw_best, best_batched / raw64,
           raw64);
    printf("- CPU cost: the server spends %.3f ms of CPU per call at 64 in flight (raw FAISS: "
           "%.3f ms per query at batch 64); the client beside it spends %.3f ms per call. On 2 "
           "cores the client's share is CPU the server cannot use, so calls/s here understates "
           "a server whose clients run elsewhere; CPU per call is the fairer comparison: "
           "**%.2f×** raw FAISS efficiency at batch 64\n",
           res[0][2].server_cpu_ms, cpu64, res[0][2].client_cpu_ms,
           res[0][2].server_cpu_ms > 0 ? cpu64 / res[0][2].server_cpu_ms : 0);
    printf("- at 256 in flight: %.0f calls/s = **%.2f×** raw FAISS batch 256\n", res[0][3].qps,
           res[0][3].qps / raw256);
    printf("- batched vs max_batch=1 at 64 in flight: %.0f / %.0f = **%.1f×**; best vs best: "
           "**%.1f×**; target ≥ 20×\n",
           res[0][2].qps, res[1][2].qps, res[1][2].qps > 0 ? res[0][2].qps / res[1][2].qps : 0,
           best_unbatched > 0 ? best_batched / best_unbatched : 0);
    free(xb);
    return 0;
}

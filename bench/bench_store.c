/*
 * bench_store.c: events ingested per second through profiles_put_events with durable
 * (fsync'ed) LMDB commits, single events and batches, plus catalog bulk-load speed and the
 * latency ingestion adds to concurrent Recommend planning (profiles_plan_recommend: the
 * store-side part of a Recommend by user id).
 *
 *   bench_store [--dir DIR] [--items N] [--dim D] [--users U] [--seconds S] [--no-sync]
 *
 * --no-sync skips fsync (not durable): the CPU cost of ingestion without the disk.
 * DIR defaults to a fresh directory under $TMPDIR or /tmp, removed afterwards. Prints a
 * Markdown report on stdout.
 */
#include <ftw.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hdr.h"
#include "log.h"
#include "profiles.h"
#include "store.h"

typedef struct opts {
    const char *dir;
    uint32_t items, dim, users;
    double seconds;
    bool no_sync;
} opts;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static _Thread_local uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void die(const char *what, int rc, const aff_err *err)
{
    fprintf(stderr, "bench_store: %s: %s (%s)\n", what, aff_status_name(rc), err->msg);
    exit(1);
}

/* Loads the catalog in batches of 1000 items; returns items per second. */
static double load_catalog(aff_store *s, const opts *o)
{
    aff_err err = {0};
    store_collection c = {.name = "shop", .dim = o->dim, .metric = AFF_METRIC_COSINE};
    int rc = store_put_collection(s, &c, &err);
    if (rc) die("create collection", rc, &err);
    enum { BATCH = 1000 };
    static char ids[BATCH][32], catnames[BATCH][16];
    aff_item items[BATCH];
    float *vecs = malloc((size_t)BATCH * o->dim * sizeof(float));
    double t0 = now_s();
    for (uint32_t start = 0; start < o->items; start += BATCH) {
        uint32_t m = o->items - start < BATCH ? o->items - start : BATCH;
        for (uint32_t k = 0; k < m; k++) {
            snprintf(ids[k], sizeof ids[k], "item-%u", start + k);
            snprintf(catnames[k], sizeof catnames[k], "cat-%u", (start + k) % 50);
            for (uint32_t j = 0; j < o->dim; j++)
                vecs[(size_t)k * o->dim + j] = (float)(rng() % 2001) / 1000.0f - 1.0f;
            items[k] = (aff_item){.id = ids[k],
                                    .vector = vecs + (size_t)k * o->dim,
                                    .dim = o->dim,
                                    .attrs.category = catnames[k],
                                    .attrs.price = (float)(rng() % 10000) / 100.0f,
                                    .attrs.available = true};
        }
        if ((rc = store_put_items(s, "shop", items, m, &err))) die("put items", rc, &err);
    }
    double dt = now_s() - t0;
    free(vecs);
    return o->items / dt;
}

typedef struct ingest_result {
    uint64_t events, calls;
    double seconds;
    hdr_hist lat; /* per call, ns */
} ingest_result;

/* Sends batches of `batch` random events for random users for `seconds`. */
static void ingest(aff_profiles *p, const opts *o, uint32_t batch, double seconds, ingest_result *r)
{
    char ids[1000][32];
    profiles_event ev[1000];
    profiles_rejection rej[1000];
    static const profiles_event_kind kinds[8] = {
        PROFILES_EVENT_VIEW,        PROFILES_EVENT_VIEW,    PROFILES_EVENT_VIEW,
        PROFILES_EVENT_VIEW,        PROFILES_EVENT_CLICK,   PROFILES_EVENT_CLICK,
        PROFILES_EVENT_ADD_TO_CART, PROFILES_EVENT_PURCHASE};
    memset(r, 0, sizeof *r);
    hdr_init(&r->lat);
    double t0 = now_s(), t;
    do {
        char user[32];
        snprintf(user, sizeof user, "user-%u", (uint32_t)(rng() % o->users));
        for (uint32_t i = 0; i < batch; i++) {
            snprintf(ids[i], sizeof ids[i], "item-%u", (uint32_t)(rng() % o->items));
            ev[i] = (profiles_event){.item_id = ids[i], .type = kinds[rng() % 8]};
        }
        aff_err err = {0};
        uint32_t applied = 0, n_rej = 0;
        double c0 = now_s();
        int rc = profiles_put_events(p, "shop", user, ev, batch, &applied, rej, &n_rej, &err);
        t = now_s();
        if (rc || applied != batch) die("put events", rc ? rc : AFF_EINTERNAL, &err);
        hdr_record(&r->lat, (uint64_t)((t - c0) * 1e9));
        r->events += batch;
        r->calls++;
    } while (t - t0 < seconds);
    r->seconds = t - t0;
}

typedef struct ingest_arg {
    aff_profiles *p;
    const opts *o;
    uint32_t batch;
    uint64_t seed;
    ingest_result r;
} ingest_arg;

static void *ingest_thread(void *arg)
{
    ingest_arg *a = arg;
    rng_state = a->seed;
    ingest(a->p, a->o, a->batch, a->o->seconds, &a->r);
    return NULL;
}

/* `threads` callers ingesting concurrently (their commits are grouped by the store). */
static void ingest_concurrent(aff_profiles *p, const opts *o, uint32_t batch, int threads,
                              ingest_result *total)
{
    ingest_arg a[64];
    pthread_t th[64];
    for (int i = 0; i < threads; i++) {
        a[i] = (ingest_arg){.p = p, .o = o, .batch = batch, .seed = 0x1234567ull * (i + 1)};
        pthread_create(&th[i], NULL, ingest_thread, &a[i]);
    }
    memset(total, 0, sizeof *total);
    hdr_init(&total->lat);
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        total->events += a[i].r.events;
        total->calls += a[i].r.calls;
        if (a[i].r.seconds > total->seconds) total->seconds = a[i].r.seconds;
        hdr_merge(&total->lat, &a[i].r.lat);
    }
}

typedef struct reader_arg {
    aff_profiles *p;
    const opts *o;
    _Atomic int *stop;
    hdr_hist lat;
} reader_arg;

static void *recommend_reader(void *arg)
{
    reader_arg *a = arg;
    const char *excl[] = {"purchase"};
    hdr_init(&a->lat);
    while (!atomic_load(a->stop)) {
        char user[32];
        snprintf(user, sizeof user, "user-%u", (uint32_t)(rng() % a->o->users));
        profiles_plan plan;
        aff_err err = {0};
        double t0 = now_s();
        int rc = profiles_plan_recommend(a->p, "shop", user, excl, 1, NULL, &plan, &err);
        double t1 = now_s();
        if (rc) die("plan recommend", rc, &err);
        profiles_plan_release(&plan);
        hdr_record(&a->lat, (uint64_t)((t1 - t0) * 1e9));
    }
    return NULL;
}

/* Recommend-planning latency for `seconds`, with or without a concurrent batch ingester. */
static void recommend_latency(aff_profiles *p, const opts *o, bool with_ingest, double seconds,
                              hdr_hist *out, ingest_result *ing)
{
    _Atomic int stop = 0;
    reader_arg a = {.p = p, .o = o, .stop = &stop};
    pthread_t th;
    pthread_create(&th, NULL, recommend_reader, &a);
    if (with_ingest) {
        ingest(p, o, 100, seconds, ing);
    } else {
        struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
        nanosleep(&ts, NULL);
    }
    atomic_store(&stop, 1);
    pthread_join(th, NULL);
    *out = a.lat;
}

static void print_ingest(const char *name, const ingest_result *r)
{
    printf("| %s | %llu | %.2f | %.0f | %.0f | %.2f | %.2f | %.2f |\n", name,
           (unsigned long long)r->events, r->seconds, r->events / r->seconds, r->calls / r->seconds,
           hdr_value_at(&r->lat, 0.5) / 1e6, hdr_value_at(&r->lat, 0.99) / 1e6,
           hdr_value_at(&r->lat, 1.0) / 1e6);
}

int main(int argc, char **argv)
{
    opts o = {.items = 100000, .dim = 64, .users = 10000, .seconds = 5};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            o.dir = argv[++i];
        else if (!strcmp(argv[i], "--items") && i + 1 < argc)
            o.items = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dim") && i + 1 < argc)
            o.dim = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--users") && i + 1 < argc)
            o.users = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            o.seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--no-sync"))
            o.no_sync = true;
        else {
            fprintf(stderr,
                    "usage: %s [--dir DIR] [--items N] [--dim D] [--users U] "
                    "[--seconds S] [--no-sync]\n",
                    argv[0]);
            return 2;
        }
    }
    aff_log_set_level(AFF_LOG_WARN);
    char tmp[512];
    bool own_dir = !o.dir;
    if (own_dir) {
        const char *t = getenv("TMPDIR");
        snprintf(tmp, sizeof tmp, "%s/bench-store-XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(tmp)) {
            perror("mkdtemp");
            return 1;
        }
        o.dir = tmp;
    }

    aff_store *s = NULL;
    aff_profiles *p = NULL;
    aff_err err = {0};
    store_config sc = {.dir = o.dir, .no_sync = o.no_sync};
    int rc = store_create(&s, &sc, &err);
    if (rc) die("open store", rc, &err);
    if ((rc = profiles_create(&p, s, NULL, &err))) die("profiles", rc, &err);

    printf("## bench_store\n\n");
    printf("Store in `%s` (%s). Catalog %u items × %u dims, "
           "%u users, events of random types on random items.\n\n",
           own_dir ? "$TMPDIR/bench-store-XXXXXX" : o.dir,
           o.no_sync ? "NOT durable: --no-sync, no fsync" : "durable: fsync on every commit",
           o.items, o.dim, o.users);
    double ips = load_catalog(s, &o);
    printf("Catalog bulk load (batches of 1000 items, one commit each): **%.0f items/s**\n\n", ips);

    printf("### Events ingested (profiles_put_events, one commit per call)\n\n");
    printf("| events per call | events | seconds | events/s | calls/s | p50 ms | p99 ms | max ms "
           "|\n|---|---|---|---|---|---|---|---|\n");
    ingest_result r;
    ingest(p, &o, 1, o.seconds, &r);
    print_ingest("1", &r);
    ingest(p, &o, 10, o.seconds, &r);
    print_ingest("10", &r);
    ingest(p, &o, 100, o.seconds, &r);
    print_ingest("100", &r);
    ingest(p, &o, 1000, o.seconds, &r);
    print_ingest("1000", &r);
    store_stats g0, g1;
    store_get_stats(s, &g0);
    ingest_concurrent(p, &o, 1, 16, &r);
    store_get_stats(s, &g1);
    print_ingest("1, 16 concurrent callers", &r);
    double per_commit = (double)(g1.writes - g0.writes) / (double)(g1.commits - g0.commits);
    ingest_concurrent(p, &o, 100, 4, &r);
    print_ingest("100, 4 concurrent callers", &r);

    printf("\nWith 16 concurrent single-event callers the store committed %.1f calls per commit "
           "on average (group commit).\n",
           per_commit);
    printf("\n### Recommend planning latency (profile + purchase exclusions, one read txn)\n\n");
    printf("| load | plans | p50 µs | p99 µs | max µs | concurrent events/s |\n"
           "|---|---|---|---|---|---|\n");
    hdr_hist lat;
    recommend_latency(p, &o, false, o.seconds, &lat, &r);
    printf("| alone | %llu | %.1f | %.1f | %.1f | - |\n", (unsigned long long)lat.total,
           hdr_value_at(&lat, 0.5) / 1e3, hdr_value_at(&lat, 0.99) / 1e3,
           hdr_value_at(&lat, 1.0) / 1e3);
    recommend_latency(p, &o, true, o.seconds, &lat, &r);
    printf("| with batch-100 ingestion | %llu | %.1f | %.1f | %.1f | %.0f |\n",
           (unsigned long long)lat.total, hdr_value_at(&lat, 0.5) / 1e3,
           hdr_value_at(&lat, 0.99) / 1e3, hdr_value_at(&lat, 1.0) / 1e3, r.events / r.seconds);

    store_stats st;
    store_get_stats(s, &st);
    printf("\nStore after the run: %.1f MiB used, map %.0f MiB, %llu writes in %llu commits "
           "(group commit), %llu map grows.\n",
           st.used_bytes / 1048576.0, st.map_size / 1048576.0, (unsigned long long)st.writes,
           (unsigned long long)st.commits, (unsigned long long)st.map_grows);
    profiles_destroy(p);
    store_destroy(s);
    if (own_dir) nftw(tmp, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

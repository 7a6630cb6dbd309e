/*
 * bench_widgets.c: the CPU cost of the widgets (issue 13), in one process and one run, so the
 * ratios hold on a loaded machine.
 *
 *   ingest   process CPU per event of profiles_put_events (the durable events path every
 *            PutEvents and ImportEvents call runs) with the widget observer against the same
 *            calls without it, on one store (in-memory LMDB, no fsync), alternating in rounds
 *            of `round` calls; each user's widget window is full (user_events = 100) before
 *            measuring. The gRPC decode and the response, which a server adds to both, are
 *            left out, so the ratio is the strictest one.
 *   serve    process CPU per call of each widget recipe through the pipeline (filters and
 *            reasons as served), against Recommend by user_id through the same pipeline at N
 *            items: one call at a time (a batch of one) and with `inflight` calls batched.
 *   memory   widgets_get_stats after the events: bytes held, events held, neighbours.
 *   rebuild  widgets_rebuild from the store's histories (what a restart does), timed.
 *
 * Events: U users; sessions of 4..8 events (session_id), every fourth ending in an order of
 * 3 purchases (order_id), items drawn from a heavy-headed law over N items (the top 1% of
 * items take about a fifth of the draws).
 * With BENCH_WIDGETS_STREAM=load the events are instead those of the replication load
 * (bench/affinity_load.c's PutEvents, as bench/replication.py sends them): each call one user
 * (Zipf s = 1 over the users), no session or order id, items Zipf s = 1 over the N items, 70%
 * view, 20% click, 7% add-to-cart, 3% purchase, every event of a call at one time stamp and
 * calls 5 ms apart, so a user's calls share a 30-minute basket.
 * Usage: bench_widgets [N] [d] [users] [events] [calls] [inflight] [events per call]
 *
 *   bench_widgets --apply ITEMS USERS CALLS PER_CALL: widgets_apply alone (no store) on the
 *   replication load's stream, CALLS calls of PER_CALL events; prints the CPU per event and a
 *   digest of every answer (all three co-occurrence recipes for every item, trending, best
 *   sellers, and both user recipes for every user): two builds that print the same digest
 *   answer the same (the load-proof figure is its callgrind instruction count).
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_calls.h"
#include "catalog.h"
#include "log.h"
#include "pipeline.h"
#include "rng.h"
#include "widgets.h"
#include "zipf.h"

static uint32_t N = 100000, D = 128, USERS = 2000, EVENTS = 400000, CALLS = 2000, INFLIGHT = 256,
                PER_CALL = 1;
#define N_CATS 50

static void load(aff_catalog *cat, uint32_t n, uint32_t dim, aff_rng *r)
{
    aff_err err;
    engine_collection_spec spec = {.name = "products", .dim = dim, .metric = AFF_METRIC_COSINE};
    if (catalog_create_collection(cat, &spec, &err)) bench_die("create", &err);
    static char cats[N_CATS][16];
    for (int c = 0; c < N_CATS; c++)
        snprintf(cats[c], sizeof cats[c], "cat%02d", c);
    const uint32_t chunk = 4096;
    float *vec = malloc((size_t)chunk * dim * sizeof *vec);
    char(*ids)[24] = malloc(chunk * sizeof *ids);
    aff_item *items = malloc(chunk * sizeof *items);
    for (uint32_t base = 0; base < n; base += chunk) {
        uint32_t m = n - base < chunk ? n - base : chunk;
        for (uint32_t i = 0; i < m; i++) {
            for (uint32_t d = 0; d < dim; d++)
                vec[(size_t)i * dim + d] = (float)aff_rng_normal(r);
            snprintf(ids[i], sizeof ids[i], "p%u", base + i);
            items[i] = (aff_item){.id = ids[i],
                                  .vector = vec + (size_t)i * dim,
                                  .dim = dim,
                                  .attrs.category = cats[(base + i) % N_CATS],
                                  .attrs.price = (float)(aff_rng_next(r) % 100),
                                  .attrs.available = true};
        }
        if (catalog_upsert(cat, "products", items, m, &err)) bench_die("upsert", &err);
    }
    free(vec);
    free(ids);
    free(items);
}

/* An item index with a heavy head: about a third of the draws hit the top 1% of items. */
static uint32_t draw_item(aff_rng *r)
{
    double u = (double)(aff_rng_next(r) >> 11) / 9007199254740992.0;
    return (uint32_t)(pow(u, 3.0) * N) % N;
}

/* The synthetic event stream: per user, sessions of views with an occasional order; or, with
 * load set, the replication load's calls. */
typedef struct stream {
    bool load;
    zipf zi, zu;
    aff_rng r;
    uint32_t *left; /* views left in each user's session */
    uint32_t *sess; /* each user's session number */
    uint32_t *prev; /* each user's last item */
    int64_t t;      /* the clock of the stream (ms) */
    char items[1000][16], sids[1000][24], oids[1000][24];
    store_kv kv[1000];
    profiles_event ev[1000];
} stream;

/* Fills n events of one user into s->ev. */
static const char *next_events(stream *s, uint32_t n, char *user, size_t ulen)
{
    if (s->load) {
        snprintf(user, ulen, "u%u", (uint32_t)zipf_draw(&s->zu, &s->r));
        for (uint32_t i = 0; i < n; i++) {
            snprintf(s->items[i], sizeof s->items[i], "p%u", (uint32_t)zipf_draw(&s->zi, &s->r));
            double u = aff_rng_uniform(&s->r);
            s->ev[i] = (profiles_event){.item_id = s->items[i],
                                        .type = u < 0.70   ? PROFILES_EVENT_VIEW
                                                : u < 0.90 ? PROFILES_EVENT_CLICK
                                                : u < 0.97 ? PROFILES_EVENT_ADD_TO_CART
                                                           : PROFILES_EVENT_PURCHASE,
                                        .timestamp_ms = s->t};
        }
        s->t += 5;
        return user;
    }
    uint32_t u = (uint32_t)(aff_rng_next(&s->r) % USERS);
    snprintf(user, ulen, "u%u", u);
    for (uint32_t i = 0; i < n; i++) {
        if (s->left[u] == 0) {
            s->sess[u]++;
            s->left[u] = 4 + (uint32_t)(aff_rng_next(&s->r) % 5);
        }
        s->left[u]--;
        bool buy = s->left[u] < 3 && s->sess[u] % 4 == 0; /* an order of 3 ends the session */
        /* Items come in bundles of 8 (i / 8): a session stays in its bundle 60% of the time,
         * so pairs repeat as in a shop. */
        uint32_t it = aff_rng_next(&s->r) % 10 < 6 && s->left[u] + 1 < 8
                          ? s->prev[u] / 8 * 8 + (uint32_t)(aff_rng_next(&s->r) % 8)
                          : draw_item(&s->r);
        if (it >= N) it = draw_item(&s->r);
        s->prev[u] = it;
        snprintf(s->items[i], sizeof s->items[i], "p%u", it);
        snprintf(s->sids[i], sizeof s->sids[i], "%u-%u", u, s->sess[u]);
        snprintf(s->oids[i], sizeof s->oids[i], "o%u-%u", u, s->sess[u]);
        s->kv[i] = buy ? (store_kv){"order_id", s->oids[i]} : (store_kv){"session_id", s->sids[i]};
        s->t += 50;
        s->ev[i] = (profiles_event){.item_id = s->items[i],
                                    .type = buy ? PROFILES_EVENT_PURCHASE : PROFILES_EVENT_VIEW,
                                    .timestamp_ms = s->t,
                                    .context = &s->kv[i],
                                    .n_context = 1};
    }
    return user;
}

static void put(aff_profiles *p, stream *s, uint32_t n)
{
    char user[16];
    next_events(s, n, user, sizeof user);
    uint32_t applied, nrej;
    profiles_rejection rej[1000];
    aff_err err;
    if (profiles_put_events(p, "products", user, s->ev, n, &applied, rej, &nrej, &err))
        bench_die("events", &err);
    if (applied != n) {
        fprintf(stderr, "bench_widgets: %u of %u applied: %s\n", applied, n, rej[0].reason);
        exit(1);
    }
}

static void job_done(pipeline_job *job, void *user)
{
    (void)job;
    (void)user;
    bench_count_one();
}

/* bench_widgets --memory ITEMS EVENTS USERS: the widget statistics alone (widgets_apply,
 * no store) after EVENTS events of the stream over ITEMS items and USERS users; reports the
 * module's own count of bytes and the process's peak resident set. */
static int memory_mode(uint32_t items, uint64_t events, uint32_t users)
{
    N = items;
    USERS = users;
    aff_err err;
    aff_widgets *w;
    widgets_config wc;
    widgets_config_init(&wc);
    if (widgets_create(&w, &wc, &err)) bench_die("widgets", &err);
    stream *s = calloc(1, sizeof *s);
    s->r = (aff_rng){777};
    s->left = calloc(USERS, sizeof *s->left);
    s->sess = calloc(USERS, sizeof *s->sess);
    s->prev = calloc(USERS, sizeof *s->prev);
    s->t = 1790000000000LL;
    double t0 = bench_cpu_s();
    store_event se[10];
    uint64_t *seq = calloc(USERS, sizeof *seq);
    uint64_t seqs[10];
    for (uint64_t e = 0; e < events; e += 10) {
        char user[16];
        next_events(s, 10, user, sizeof user);
        uint32_t u = (uint32_t)atoi(user + 1);
        for (int i = 0; i < 10; i++) {
            se[i] = (store_event){.item_id = s->ev[i].item_id,
                                  .type = s->ev[i].type == PROFILES_EVENT_PURCHASE ? "purchase" : "view",
                                  .ts_ms = s->ev[i].timestamp_ms,
                                  .context = s->ev[i].context,
                                  .n_context = 1};
            seqs[i] = seq[u]++;
        }
        if (widgets_apply(w, "products", user, se, seqs, 10, &err)) bench_die("apply", &err);
        if (e % 10000000 == 0 && e) {
            widgets_stats st;
            widgets_get_stats(w, &st);
            printf("  %llu events: %.1f MiB, %llu items, %llu neighbours, %llu events held\n",
                   (unsigned long long)e, (double)st.bytes / 1048576.0,
                   (unsigned long long)st.items, (unsigned long long)st.neighbours,
                   (unsigned long long)st.events_held);
            fflush(stdout);
        }
    }
    double cpu = bench_cpu_s() - t0;
    widgets_stats st;
    widgets_get_stats(w, &st);
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long hwm_kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmHWM:", 6) == 0) hwm_kb = atol(line + 6);
    if (f) fclose(f);
    printf("memory: %u items in the catalog, %llu events, %u users (window %u events, %u "
           "neighbours per item and table)\n",
           items, (unsigned long long)events, users, wc.user_events, wc.max_neighbours);
    printf("  widget statistics %.1f MiB (module count): %llu items seen, %llu neighbours, %llu "
           "events held\n",
           (double)st.bytes / 1048576.0, (unsigned long long)st.items,
           (unsigned long long)st.neighbours, (unsigned long long)st.events_held);
    printf("  process peak RSS %.1f MiB; %.2f us CPU per event applied\n", hwm_kb / 1024.0,
           cpu / (double)events * 1e6);
    widgets_destroy(w);
    free(seq);
    free(s->left);
    free(s->sess);
    free(s->prev);
    free(s);
    return 0;
}

static const char *type_name(profiles_event_kind k)
{
    switch (k) {
    case PROFILES_EVENT_CLICK:
        return "click";
    case PROFILES_EVENT_ADD_TO_CART:
        return "add_to_cart";
    case PROFILES_EVENT_PURCHASE:
        return "purchase";
    default:
        return "view";
    }
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ ((const unsigned char *)p)[i]) * 1099511628211ull;
    return h;
}

/* Folds one widget answer (ids, related ids, score bits) into h; counts its hits. */
static uint64_t digest_answer(aff_widgets *w, const widgets_request *q, uint64_t h, uint64_t *hits)
{
    widgets_result res;
    aff_err err;
    if (widgets_candidates(w, q, 1000, &res, &err)) bench_die("candidates", &err);
    for (uint32_t i = 0; i < res.n; i++) {
        h = fnv(h, res.hits[i].id, strlen(res.hits[i].id) + 1);
        if (res.hits[i].related) h = fnv(h, res.hits[i].related, strlen(res.hits[i].related) + 1);
        h = fnv(h, &res.hits[i].score, sizeof res.hits[i].score);
    }
    h = fnv(h, &res.n, sizeof res.n);
    *hits += res.n;
    widgets_result_release(&res);
    return h;
}

static int64_t apply_now;
static int64_t apply_clock(void *ctx)
{
    (void)ctx;
    return apply_now;
}

/* bench_widgets --apply ITEMS USERS CALLS PER_CALL (the header says what it measures). */
static int apply_mode(uint32_t items, uint32_t users, uint32_t calls, uint32_t per_call)
{
    N = items;
    USERS = users;
    if (per_call < 1 || per_call > 1000) {
        fprintf(stderr, "bench_widgets: PER_CALL must be 1..1000\n");
        return 2;
    }
    aff_err err;
    aff_widgets *w;
    widgets_config wc;
    widgets_config_init(&wc);
    wc.now_ms = apply_clock;
    if (widgets_create(&w, &wc, &err)) bench_die("widgets", &err);
    stream *s = calloc(1, sizeof *s);
    s->r = (aff_rng){777};
    s->load = true;
    if (zipf_init(&s->zi, items, 1.0, 11) || zipf_init(&s->zu, users, 1.0, 7)) {
        fprintf(stderr, "bench_widgets: out of memory\n");
        return 1;
    }
    s->t = 1790000000000LL;
    uint64_t *seq = calloc(users, sizeof *seq), *seqs = calloc(per_call, sizeof *seqs);
    store_event *se = calloc(per_call, sizeof *se);
    double cpu = 0;
    for (uint32_t k = 0; k < calls; k++) {
        char user[16];
        next_events(s, per_call, user, sizeof user);
        uint32_t u = (uint32_t)atoi(user + 1);
        for (uint32_t i = 0; i < per_call; i++) {
            se[i] = (store_event){.item_id = s->ev[i].item_id,
                                  .type = type_name(s->ev[i].type),
                                  .ts_ms = s->ev[i].timestamp_ms};
            seqs[i] = seq[u]++;
        }
        double t0 = bench_cpu_s();
        if (widgets_apply(w, "products", user, se, seqs, per_call, &err)) bench_die("apply", &err);
        cpu += bench_cpu_s() - t0;
    }
    widgets_stats st;
    widgets_get_stats(w, &st);
    printf("apply: %u calls of %u events (replication load stream), %u items, %u users\n", calls,
           per_call, items, users);
    printf("  %.2f us CPU per event in widgets_apply\n", cpu / ((double)calls * per_call) * 1e6);
    printf("  %llu items seen, %llu users, %llu events held, %llu neighbours, %.1f MiB\n",
           (unsigned long long)st.items, (unsigned long long)st.users,
           (unsigned long long)st.events_held, (unsigned long long)st.neighbours,
           (double)st.bytes / 1048576.0);
    /* The digest of every answer, at the stream's end. */
    apply_now = s->t;
    uint64_t h = 1469598103934665603ull, hits = 0;
    h = fnv(h, &st.neighbours, sizeof st.neighbours);
    h = fnv(h, &st.events_held, sizeof st.events_held);
    for (int r = 1; r < WIDGETS_RECIPE_COUNT; r++) {
        widgets_request q = {.recipe = (widgets_recipe)r, .collection = "products"};
        char id[2][16];
        const char *ctx[2] = {id[0], id[1]};
        if (widgets_recipe_needs_items(q.recipe)) {
            q.item_ids = ctx;
            for (uint32_t i = 0; i < items; i++) {
                snprintf(id[0], sizeof id[0], "p%u", i);
                snprintf(id[1], sizeof id[1], "p%u", (i * 7 + 3) % items);
                q.n_item_ids = i % 5 == 4 ? 2 : 1; /* every fifth: a cart of two */
                h = digest_answer(w, &q, h, &hits);
            }
        } else if (widgets_recipe_needs_user(q.recipe)) {
            for (uint32_t u = 0; u < users; u++) {
                snprintf(id[0], sizeof id[0], "u%u", u);
                q.user_id = id[0];
                h = digest_answer(w, &q, h, &hits);
            }
        } else {
            h = digest_answer(w, &q, h, &hits);
        }
    }
    printf("  answers digest %016llx (%llu hits)\n", (unsigned long long)h,
           (unsigned long long)hits);
    widgets_destroy(w);
    free(seq);
    free(seqs);
    free(se);
    zipf_free(&s->zi);
    zipf_free(&s->zu);
    free(s);
    return 0;
}

int main(int argc, char **argv)
{
    bench_set_name("bench_widgets");
    if (argc > 1 && strcmp(argv[1], "--memory") == 0) {
        if (argc < 5) {
            fprintf(stderr, "usage: bench_widgets --memory ITEMS EVENTS USERS\n");
            return 2;
        }
        return memory_mode((uint32_t)atoi(argv[2]), strtoull(argv[3], NULL, 10),
                           (uint32_t)atoi(argv[4]));
    }
    if (argc > 1 && strcmp(argv[1], "--apply") == 0) {
        if (argc < 6) {
            fprintf(stderr, "usage: bench_widgets --apply ITEMS USERS CALLS PER_CALL\n");
            return 2;
        }
        return apply_mode((uint32_t)atoi(argv[2]), (uint32_t)atoi(argv[3]), (uint32_t)atoi(argv[4]),
                          (uint32_t)atoi(argv[5]));
    }
    if (argc > 1) N = (uint32_t)atoi(argv[1]);
    if (argc > 2) D = (uint32_t)atoi(argv[2]);
    if (argc > 3) USERS = (uint32_t)atoi(argv[3]);
    if (argc > 4) EVENTS = (uint32_t)atoi(argv[4]);
    if (argc > 5) CALLS = (uint32_t)atoi(argv[5]);
    if (argc > 6) INFLIGHT = (uint32_t)atoi(argv[6]);
    if (argc > 7) PER_CALL = (uint32_t)atoi(argv[7]);
    aff_log_set_level(AFF_LOG_WARN);
    aff_err err;
    aff_store *store;
    aff_profiles *with, *without;
    aff_widgets *wid;
    aff_engine *eng;
    aff_catalog *cat;
    batcher *bat;
    aff_pipeline *pl;
    store_config sc = {.dir = NULL};
    if (store_create(&store, &sc, &err)) bench_die("store", &err);
    widgets_config wc;
    widgets_config_init(&wc);
    if (widgets_create(&wid, &wc, &err)) bench_die("widgets", &err);
    profiles_config pc;
    profiles_config_init(&pc);
    if (profiles_create(&without, store, &pc, &err)) bench_die("profiles", &err);
    widgets_observer(wid, &pc.observer);
    if (profiles_create(&with, store, &pc, &err)) bench_die("profiles", &err);
    engine_config ec = {.backend = ENGINE_BACKEND_CPU};
    if (engine_create(&eng, &ec, &err)) bench_die("engine", &err);
    if (catalog_create(&cat, eng, store, &err)) bench_die("catalog", &err);
    aff_rng r = {12345};
    load(cat, N, D, &r);

    /* ---- ingest ---- */
    stream *s = calloc(1, sizeof *s);
    s->r = (aff_rng){777};
    const char *kind = getenv("BENCH_WIDGETS_STREAM");
    if ((s->load = kind && strcmp(kind, "load") == 0)) {
        if (zipf_init(&s->zi, N, 1.0, 11) || zipf_init(&s->zu, USERS, 1.0, 7)) {
            fprintf(stderr, "bench_widgets: out of memory\n");
            return 1;
        }
    }
    s->left = calloc(USERS, sizeof *s->left);
    s->sess = calloc(USERS, sizeof *s->sess);
    s->prev = calloc(USERS, sizeof *s->prev);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    s->t = (int64_t)now.tv_sec * 1000 - (int64_t)EVENTS * 50 * 2; /* ends about now */
    /* Fill: every window full (widgets see these; the plain path does the same work). */
    uint32_t fill = USERS * 110;
    if (fill > EVENTS) fill = EVENTS;
    double t0 = bench_cpu_s();
    for (uint32_t e = 0; e < fill; e += PER_CALL)
        put(with, s, PER_CALL);
    double fill_s = bench_cpu_s() - t0;
    const uint32_t round = 500;
    double cpu_with = 0, cpu_without = 0;
    uint64_t ev_with = 0, ev_without = 0;
    for (uint32_t e = fill; e < EVENTS;) {
        for (int which = 0; which < 2; which++) {
            double c0 = bench_cpu_s();
            for (uint32_t i = 0; i < round; i++)
                put(which ? without : with, s, PER_CALL);
            double c = bench_cpu_s() - c0;
            if (which) {
                cpu_without += c;
                ev_without += (uint64_t)round * PER_CALL;
            } else {
                cpu_with += c;
                ev_with += (uint64_t)round * PER_CALL;
            }
            e += round * PER_CALL;
        }
    }
    double us_with = cpu_with / (double)ev_with * 1e6, us_without = cpu_without / (double)ev_without * 1e6;
    printf("ingest (%u event%s per call, %u users, N = %u)\n", PER_CALL, PER_CALL > 1 ? "s" : "",
           USERS, N);
    printf("  fill            %u events in %.2f s CPU (%.1f us per event)\n", fill, fill_s,
           fill_s / fill * 1e6);
    printf("  with widgets    %8.2f us CPU per event (%llu events)\n", us_with,
           (unsigned long long)ev_with);
    printf("  without         %8.2f us CPU per event (%llu events)\n", us_without,
           (unsigned long long)ev_without);
    printf("  with / without  = %.3f   (target <= 1.20)\n", us_with / us_without);
    widgets_stats st;
    widgets_get_stats(wid, &st);
    printf("memory: %.1f MiB for %llu items, %llu users, %llu events held, %llu neighbours "
           "(%.1f bytes per event held)\n",
           (double)st.bytes / 1048576.0, (unsigned long long)st.items,
           (unsigned long long)st.users, (unsigned long long)st.events_held,
           (unsigned long long)st.neighbours, (double)st.bytes / (double)st.events_held);
    fflush(stdout);

    /* ---- rebuild: what a restart does, from the store's histories (both instances' events) */
    struct timespec w0, w1;
    clock_gettime(CLOCK_MONOTONIC, &w0);
    double r0 = bench_cpu_s();
    if (widgets_rebuild(wid, store, &err)) bench_die("rebuild", &err);
    double rcpu = bench_cpu_s() - r0;
    clock_gettime(CLOCK_MONOTONIC, &w1);
    widgets_get_stats(wid, &st);
    printf("rebuild from the stored histories: %llu events applied in %.2f s (%.2f s CPU, %.2f us "
           "CPU per event)\n",
           (unsigned long long)st.events_held,
           (double)(w1.tv_sec - w0.tv_sec) + (double)(w1.tv_nsec - w0.tv_nsec) * 1e-9, rcpu,
           rcpu / (double)st.events_held * 1e6);
    fflush(stdout);

    /* ---- serve ---- */
    batcher_config bc = {.max_batch = 256, .max_wait_us = 2000, .queue_limit = 100000};
    batcher_exec ex = batcher_engine_exec(eng);
    if (batcher_create(&bat, &bc, &ex, &err)) bench_die("batcher", &err);
    pipeline_config plc = {.engine = eng, .batcher = bat, .profiles = with, .widgets = wid};
    if (pipeline_create(&pl, &plc, &err)) bench_die("pipeline", &err);
    pipeline_request *preq = calloc(INFLIGHT, sizeof *preq);
    pipeline_job **jobs = calloc(INFLIGHT, sizeof *jobs);
    static char users[256][16], ctx[256][3][16];
    const char *ctxp[256][3];
    static const char *cat07 = "cat07";
    aff_filter catf;
    aff_filter_init(&catf);
    catf.categories = &cat07;
    catf.n_categories = 1;
    struct {
        const char *name;
        widgets_recipe recipe;
        uint32_t n_items;
        bool user, by_cat;
        uint32_t inflight;
    } modes[] = {
        {"recommend (1 at a time)", WIDGETS_RECIPE_PERSONALIZED, 0, true, false, 1},
        {"recommend (batched)", WIDGETS_RECIPE_PERSONALIZED, 0, true, false, INFLIGHT},
        {"frequently_bought_together", WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER, 1, false, false, 1},
        {"fbt, cart of 3", WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER, 3, false, false, 1},
        {"also_viewed", WIDGETS_RECIPE_ALSO_VIEWED, 1, false, false, 1},
        {"also_bought", WIDGETS_RECIPE_ALSO_BOUGHT, 1, false, false, 1},
        {"trending", WIDGETS_RECIPE_TRENDING, 0, false, false, 1},
        {"trending, one category", WIDGETS_RECIPE_TRENDING, 0, false, true, 1},
        {"best_sellers", WIDGETS_RECIPE_BEST_SELLERS, 0, false, false, 1},
        {"best_sellers, one category", WIDGETS_RECIPE_BEST_SELLERS, 0, false, true, 1},
        {"buy_it_again", WIDGETS_RECIPE_BUY_IT_AGAIN, 0, true, false, 1},
        {"recently_viewed", WIDGETS_RECIPE_RECENTLY_VIEWED, 0, true, false, 1},
    };
    size_t n_modes = sizeof modes / sizeof *modes;
    double per_call[16] = {0}, hits[16] = {0};
    aff_rng qr = {99};
    printf("\nserve (N = %u, d = %u, k = 10, %u calls each, process CPU per call)\n", N, D, CALLS);
    for (size_t m = 0; m < n_modes; m++) {
        uint32_t inflight = modes[m].inflight;
        for (int measured = 0; measured < 2; measured++) {
            uint32_t total = measured ? CALLS : (inflight > 64 ? inflight : 64);
            bench_reset();
            double c0 = bench_cpu_s();
            uint32_t sent = 0;
            while (sent < total) {
                uint32_t wave = total - sent < inflight ? total - sent : inflight;
                uint32_t base = bench_done();
                for (uint32_t i = 0; i < wave; i++) {
                    snprintf(users[i], sizeof users[i], "u%u",
                             (uint32_t)(aff_rng_next(&qr) % USERS));
                    for (uint32_t c = 0; c < modes[m].n_items; c++) {
                        snprintf(ctx[i][c], sizeof ctx[i][c], "p%u", draw_item(&qr));
                        ctxp[i][c] = ctx[i][c];
                    }
                    preq[i] = (pipeline_request){.kind = PIPELINE_RECOMMEND,
                                                 .collection = "products",
                                                 .user_id = modes[m].user ? users[i] : NULL,
                                                 .k = 10,
                                                 .recipe = modes[m].recipe,
                                                 .item_ids = ctxp[i],
                                                 .n_item_ids = modes[m].n_items,
                                                 .filter = modes[m].by_cat ? &catf : NULL};
                    bool pending = false;
                    if (pipeline_start(pl, &preq[i], 0, job_done, NULL, &jobs[i], &pending, &err))
                        bench_die(modes[m].name, &err);
                    if (!pending) bench_count_one();
                }
                bench_wait_for(base + wave);
                for (uint32_t i = 0; i < wave; i++) {
                    const pipeline_output *o = pipeline_job_output(jobs[i]);
                    if (o->status) bench_die("job", &o->err);
                    if (measured) hits[m] += o->n_hits[0];
                    pipeline_job_destroy(jobs[i]);
                }
                sent += wave;
            }
            if (measured) per_call[m] = (bench_cpu_s() - c0) / CALLS;
        }
        printf("  %-28s %9.1f us CPU per call  (%.1f hits)", modes[m].name, per_call[m] * 1e6,
               hits[m] / CALLS);
        if (m >= 2)
            printf("  %.3f x single, %.3f x batched", per_call[m] / per_call[0],
                   per_call[m] / per_call[1]);
        printf("\n");
        fflush(stdout);
    }
    pipeline_destroy(pl);
    batcher_destroy(bat);
    catalog_destroy(cat);
    engine_destroy(eng);
    profiles_destroy(with);
    profiles_destroy(without);
    widgets_destroy(wid);
    store_destroy(store);
    free(s->left);
    free(s->sess);
    free(s->prev);
    zipf_free(&s->zi);
    zipf_free(&s->zu);
    free(s);
    free(preq);
    free(jobs);
    return 0;
}

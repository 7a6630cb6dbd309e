/*
 * bench_pipeline.c: the CPU cost of the ranking pipeline against the bare engine call, in one
 * process and one run (so the ratio holds on a loaded machine). N items of dimension d in one
 * collection with categories and tags, shoppers with stored profiles; a real batcher
 * (max_batch 256) packs `inflight` concurrent calls, as a server under batched load does.
 *
 *   bare      batcher SEARCH with each shopper's profile vector (the engine call alone)
 *   pipeline  Recommend by user_id through the pipeline, no rules (profile read, reasons)
 *   rules     the same with every rule on: boost, bury, pin, promotion 20%, category cap 3,
 *             diversity 0.3, exploration 10%
 *   page      RecommendPage, 4 slots: banners 1, categories 6, products 12, offers 2
 *   shape     (BENCH_MODES=4 only) batcher SEARCH of the engine queries the rules make at
 *             k = 10 (pipeline_query_shape_of: every rule on, the organic query k 15 at most
 *             6 per category and the promotion's k 8, its category) on one vector, without
 *             the history exclusions: the engine's share of "rules", the rest being the
 *             pipeline's own work
 *
 * Reported: process CPU seconds per call (all threads, CLOCK_PROCESS_CPUTIME_ID) and ratios.
 * The modes run in turn, BENCH_ROUNDS times (default 3): each ratio is the median of the
 * rounds' own ratios (each against the bare call of the same round), so a burst of other work
 * on the machine moves one round, not the figure.
 * Usage: bench_pipeline [N] [d] [calls] [inflight]
 *
 * BENCH_CLUSTERS=C: the products are clustered as `affinity_load gen --clusters C` writes them
 * (unit vectors around C random centres, the category of an item cluster % 25), so categories
 * follow the vectors as in a real shop and bench/pipeline_server.sh's catalog is reproduced in
 * process (a shopper's best items then crowd few categories: what a category cap costs there).
 * Default: vectors and categories independent (random).
 * BENCH_PROMO_CATS=P: the promotion covers P categories (cat07, cat08, ...; default 1), for the
 * cost of a broad promotion (riding on the organic scan or scanning its own categories).
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

static uint32_t N = 100000, D = 128, CALLS = 4096, INFLIGHT = 256;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of v[0..n) (n <= 15; v is left as it was). */
static double median_of(const double *v, uint32_t n)
{
    double s[15];
    memcpy(s, v, n * sizeof *s);
    qsort(s, n, sizeof *s, cmp_double);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

/* "label = median of the rounds' a/b   note   [each round's]" (nothing when a mode did not run). */
static void print_ratio(const char *label, const double *a, const double *b, uint32_t n,
                        const char *note)
{
    double r[15];
    for (uint32_t i = 0; i < n; i++) {
        if (a[i] <= 0 || b[i] <= 0) return;
        r[i] = a[i] / b[i];
    }
    printf("%s = %.3f   %s [rounds:", label, median_of(r, n), note);
    for (uint32_t i = 0; i < n; i++)
        printf(" %.3f", r[i]);
    printf("]\n");
}
#define USERS  1024
#define N_CATS 50

/* affinity_load gen's categories: cluster % this */
#define GEN_CATS 25

/* clusters: 0, independent vectors and categories; else BENCH_CLUSTERS (see the top). */
static void load(aff_catalog *cat, const char *name, uint32_t n, uint32_t dim, uint32_t clusters,
                 aff_rng *r)
{
    aff_err err;
    engine_collection_spec spec = {.name = name, .dim = dim, .metric = AFF_METRIC_COSINE};
    if (catalog_create_collection(cat, &spec, &err)) bench_die("create", &err);
    static char cats[N_CATS][16];
    static const char *tag_names[4] = {"sale", "new", "eco", "gift"};
    for (int c = 0; c < N_CATS; c++)
        snprintf(cats[c], sizeof cats[c], "cat%02d", c);
    const uint32_t chunk = 4096;
    float *vec = malloc((size_t)chunk * dim * sizeof *vec);
    char(*ids)[24] = malloc(chunk * sizeof *ids);
    aff_item *items = malloc(chunk * sizeof *items);
    float *centres = malloc(((size_t)clusters + 1) * dim * sizeof *centres);
    for (size_t i = 0; i < (size_t)clusters * dim; i++)
        centres[i] = (float)aff_rng_normal(r);
    for (uint32_t base = 0; base < n; base += chunk) {
        uint32_t m = n - base < chunk ? n - base : chunk;
        for (uint32_t i = 0; i < m; i++) {
            float *v = vec + (size_t)i * dim;
            uint32_t c;
            if (clusters) { /* a centre plus noise, normalized (affinity_load gen) */
                uint32_t cl = (uint32_t)(aff_rng_next(r) % clusters);
                double norm = 0;
                for (uint32_t d = 0; d < dim; d++) {
                    v[d] = centres[(size_t)cl * dim + d] + 0.6f * (float)aff_rng_normal(r);
                    norm += (double)v[d] * v[d];
                }
                for (uint32_t d = 0; d < dim; d++)
                    v[d] = (float)(v[d] / sqrt(norm));
                c = cl % GEN_CATS;
            } else {
                for (uint32_t d = 0; d < dim; d++)
                    v[d] = (float)aff_rng_normal(r);
                c = (uint32_t)(aff_rng_next(r) % N_CATS);
            }
            snprintf(ids[i], sizeof ids[i], "%s-%u", name, base + i);
            items[i] = (aff_item){.id = ids[i],
                                  .vector = vec + (size_t)i * dim,
                                  .dim = dim,
                                  .attrs.category = cats[c],
                                  .attrs.tags = &tag_names[(base + i) % 4],
                                  .attrs.n_tags = 1,
                                  .attrs.price = (float)(aff_rng_next(r) % 100),
                                  .attrs.available = true};
        }
        if (catalog_upsert(cat, name, items, m, &err)) bench_die("upsert", &err);
    }
    free(centres);
    free(vec);
    free(ids);
    free(items);
}

static void bare_done(batcher_request *br)
{
    (void)br;
    bench_count_one();
}

static void job_done(pipeline_job *job, void *user)
{
    (void)job;
    (void)user;
    bench_count_one();
}

static void page_done(pipeline_page *page, void *user)
{
    (void)page;
    (void)user;
    bench_count_one();
}

int main(int argc, char **argv)
{
    bench_set_name("bench_pipeline");
    if (argc > 1) N = (uint32_t)atoi(argv[1]);
    if (argc > 2) D = (uint32_t)atoi(argv[2]);
    if (argc > 3) CALLS = (uint32_t)atoi(argv[3]);
    if (argc > 4) INFLIGHT = (uint32_t)atoi(argv[4]);
    aff_log_set_level(AFF_LOG_WARN);
    aff_err err;
    aff_store *store;
    aff_profiles *prof;
    aff_engine *eng;
    aff_catalog *cat;
    batcher *bat;
    aff_pipeline *pl;
    store_config sc = {.dir = NULL};
    if (store_create(&store, &sc, &err)) bench_die("store", &err);
    profiles_config pc;
    profiles_config_init(&pc);
    if (profiles_create(&prof, store, &pc, &err)) bench_die("profiles", &err);
    engine_config ec = {.backend = ENGINE_BACKEND_CPU};
    if (engine_create(&eng, &ec, &err)) bench_die("engine", &err);
    if (catalog_create(&cat, eng, store, &err)) bench_die("catalog", &err);
    aff_rng r = {12345};
    const uint32_t clusters = getenv("BENCH_CLUSTERS") ? (uint32_t)atoi(getenv("BENCH_CLUSTERS")) : 0;
    load(cat, "products", N, D, clusters, &r);
    load(cat, "banners", 200, D, 0, &r);
    load(cat, "categories", 50, D, 0, &r);
    load(cat, "offers", 100, D, 0, &r);
    batcher_config bc = {.max_batch = 256, .max_wait_us = 2000, .queue_limit = 100000};
    batcher_exec ex = batcher_engine_exec(eng);
    if (batcher_create(&bat, &bc, &ex, &err)) bench_die("batcher", &err);
    pipeline_config plc = {.engine = eng, .batcher = bat, .profiles = prof};
    if (pipeline_create(&pl, &plc, &err)) bench_die("pipeline", &err);

    /* shoppers: 20 views each in products (and 2 in each small collection) */
    static char users[USERS][16];
    float *uvec = malloc((size_t)USERS * D * sizeof *uvec);
    for (int u = 0; u < USERS; u++) {
        snprintf(users[u], sizeof users[u], "u%04d", u);
        char items[20][24];
        profiles_event ev[20];
        for (int i = 0; i < 20; i++) {
            snprintf(items[i], sizeof items[i], "products-%u", (uint32_t)(aff_rng_next(&r) % N));
            ev[i] = (profiles_event){.item_id = items[i], .type = PROFILES_EVENT_VIEW};
        }
        uint32_t applied, nrej;
        profiles_rejection rej[20];
        if (profiles_put_events(prof, "products", users[u], ev, 20, &applied, rej, &nrej, &err))
            bench_die("events", &err);
        const char *small[3] = {"banners", "categories", "offers"};
        const uint32_t sizes[3] = {200, 50, 100};
        for (int c = 0; c < 3; c++) {
            for (int i = 0; i < 2; i++) {
                snprintf(items[i], sizeof items[i], "%s-%u", small[c],
                         (uint32_t)(aff_rng_next(&r) % sizes[c]));
                ev[i] = (profiles_event){.item_id = items[i], .type = PROFILES_EVENT_VIEW};
            }
            if (profiles_put_events(prof, small[c], users[u], ev, 2, &applied, rej, &nrej, &err))
                bench_die("events", &err);
        }
        bool found;
        if (profiles_user_vector(prof, "products", users[u], uvec + (size_t)u * D, D, &found,
                                 &err) ||
            !found)
            bench_die("profile", &err);
    }

    /* rules: every kind on */
    static const char *sale = "sale", *eco = "eco";
    static char gift_names[N_CATS][16];
    static const char *gift_cats[N_CATS];
    const char *promo_env = getenv("BENCH_PROMO_CATS");
    const int n_gift = promo_env && atoi(promo_env) > 0
                           ? (atoi(promo_env) < N_CATS - 7 ? atoi(promo_env) : N_CATS - 7)
                           : 1;
    for (int c = 0; c < n_gift; c++) {
        snprintf(gift_names[c], sizeof gift_names[c], "cat%02d", 7 + c);
        gift_cats[c] = gift_names[c];
    }
    pipeline_boost boosts[2] = {0};
    aff_filter_init(&boosts[0].filter);
    boosts[0].filter.tags = &sale;
    boosts[0].filter.n_tags = 1;
    boosts[0].weight = 0.05f;
    aff_filter_init(&boosts[1].filter);
    boosts[1].filter.tags = &eco;
    boosts[1].filter.n_tags = 1;
    boosts[1].weight = -0.05f;
    pipeline_promotion promo = {.name = "gifts", .share = 0.2f};
    aff_filter_init(&promo.filter);
    promo.filter.categories = gift_cats;
    promo.filter.n_categories = (uint32_t)n_gift;
    pipeline_pin pin = {.item_id = "products-7", .position = 3};
    pipeline_rules rules = {.boosts = boosts,
                            .n_boosts = 2,
                            .pins = &pin,
                            .n_pins = 1,
                            .promotions = &promo,
                            .n_promotions = 1,
                            .has_max_per_category = true,
                            .max_per_category = 3,
                            .has_diversity = true,
                            .diversity = 0.3f,
                            .has_exploration = true,
                            .exploration_share = 0.1f,
                            .exploration_seed = 7};
    /* BENCH_RULES=list of b,p,m,c,d,e (boosts, pins, promotions, cap, diversity,
     * exploration) turns rules off one by one for a breakdown; default: all on. */
    const char *only = getenv("BENCH_RULES");
    if (only) {
        if (!strchr(only, 'b')) rules.n_boosts = 0;
        if (!strchr(only, 'p')) rules.n_pins = 0;
        if (!strchr(only, 'm')) rules.n_promotions = 0;
        if (!strchr(only, 'c')) rules.has_max_per_category = false;
        if (!strchr(only, 'd')) rules.has_diversity = false;
        if (!strchr(only, 'e')) rules.has_exploration = false;
    }

    aff_query *q = calloc(INFLIGHT, sizeof *q);
    /* BENCH_BARE_K: the bare engine call's k (default 10), to measure what over-fetching costs */
    const uint32_t bare_k = getenv("BENCH_BARE_K") ? (uint32_t)atoi(getenv("BENCH_BARE_K")) : 10;
    aff_hit *hits = calloc((size_t)INFLIGHT * bare_k, sizeof *hits);
    uint32_t *n_hits = calloc(INFLIGHT, sizeof *n_hits);
    aff_err *qerr = calloc(INFLIGHT, sizeof *qerr);
    batcher_request *br = calloc(INFLIGHT, sizeof *br);
    pipeline_request *preq = calloc(INFLIGHT, sizeof *preq);
    pipeline_job **jobs = calloc(INFLIGHT, sizeof *jobs);
    pipeline_page_request *pgreq = calloc(INFLIGHT, sizeof *pgreq);
    pipeline_page **pages = calloc(INFLIGHT, sizeof *pages);
    pipeline_slot slots[4] = {{.name = "hero", .collection = "banners", .k = 1},
                              {.name = "categories", .collection = "categories", .k = 6},
                              {.name = "for-you", .collection = "products", .k = 12},
                              {.name = "offers", .collection = "offers", .k = 2}};
    /* BENCH_USERS=n: calls cycle over the first n shoppers (default all 1024): with fewer,
     * every shopper comes back within a run (a warm per-shopper cache, as on a busy site). */
    uint32_t active_users = USERS;
    if (getenv("BENCH_USERS")) {
        int n = atoi(getenv("BENCH_USERS"));
        active_users = n >= 1 && n <= USERS ? (uint32_t)n : USERS;
    }
    const char *mode_names[5] = {"bare engine", "pipeline", "pipeline+rules", "page(4 slots)",
                                 "rules' engine"};
    /* mode 4: the organic query and, with a promotion, the promotion's, as the rules make them */
    const pipeline_query_shape shape = pipeline_query_shape_of(&rules, 10);
    const uint32_t SHAPE_Q = shape.promotion_k ? 2 : 1,
                   SHAPE_K = shape.organic_k + shape.promotion_k;
    aff_query *shape_q = calloc((size_t)INFLIGHT * SHAPE_Q, sizeof *shape_q);
    aff_hit *shape_hits = calloc((size_t)INFLIGHT * SHAPE_K, sizeof *shape_hits);
    uint32_t *shape_n = calloc((size_t)INFLIGHT * SHAPE_Q, sizeof *shape_n);
    aff_err *shape_err = calloc((size_t)INFLIGHT * SHAPE_Q, sizeof *shape_err);
    enum { MAX_ROUNDS = 15 };
    uint32_t n_rounds = 3;
    if (getenv("BENCH_ROUNDS")) {
        int n = atoi(getenv("BENCH_ROUNDS"));
        n_rounds = n >= 1 && n <= MAX_ROUNDS ? (uint32_t)n : n_rounds;
    }
    double per_call[5][MAX_ROUNDS] = {{0}};
    double rounds[5] = {0};
    double per_batch[5] = {0}; /* requests per engine batch: slow submission splits batches */
    /* BENCH_MODES=digits (0 bare, 1 pipeline, 2 rules, 3 page) runs only those (profiling). */
    const char *modes = getenv("BENCH_MODES");
    /* every round runs every mode once, in turn (one loop body, not re-indented) */
    for (uint32_t round = 0; round < n_rounds; round++)
    for (int mode = 0; mode < 5; mode++) {
        if (modes ? !strchr(modes, '0' + mode) : mode == 4) continue;
        uint32_t calls = mode == 3 ? CALLS / 4 : CALLS;
        /* a warm-up round, then the measured ones */
        for (int measured = 0; measured < 2; measured++) {
            uint32_t total = measured ? calls : INFLIGHT;
            bench_reset();
            batcher_stats bs0;
            batcher_get_stats(bat, &bs0);
            double t0 = bench_cpu_s();
            uint32_t sent = 0;
            while (sent < total) {
                uint32_t wave = total - sent < INFLIGHT ? total - sent : INFLIGHT;
                uint32_t base = bench_done();
                for (uint32_t i = 0; i < wave; i++) {
                    uint32_t u = (sent + i) % active_users;
                    bool pending = false;
                    if (mode == 0) {
                        q[i] = (aff_query){.vector = uvec + (size_t)u * D, .dim = D, .k = bare_k};
                        br[i] = (batcher_request){.kind = BATCHER_SEARCH,
                                                  .collection = "products",
                                                  .nq = 1,
                                                  .queries = &q[i],
                                                  .hits = hits + (size_t)i * bare_k,
                                                  .n_hits = &n_hits[i],
                                                  .query_errs = &qerr[i],
                                                  .done = bare_done};
                        if (batcher_submit(bat, &br[i], &err)) bench_die("submit", &err);
                    } else if (mode == 4) {
                        aff_query *sq = shape_q + (size_t)i * SHAPE_Q;
                        sq[0] = (aff_query){.vector = uvec + (size_t)u * D,
                                            .dim = D,
                                            .k = shape.organic_k,
                                            .max_per_category = shape.organic_cap};
                        if (SHAPE_Q == 2)
                            sq[1] = (aff_query){.vector = uvec + (size_t)u * D,
                                                .dim = D,
                                                .k = shape.promotion_k,
                                                .filter = &promo.filter};
                        br[i] = (batcher_request){.kind = BATCHER_SEARCH,
                                                  .collection = "products",
                                                  .nq = SHAPE_Q,
                                                  .scans = 1,
                                                  .queries = sq,
                                                  .hits = shape_hits + (size_t)i * SHAPE_K,
                                                  .n_hits = shape_n + (size_t)i * SHAPE_Q,
                                                  .query_errs = shape_err + (size_t)i * SHAPE_Q,
                                                  .done = bare_done};
                        if (batcher_submit(bat, &br[i], &err)) bench_die("submit", &err);
                    } else if (mode < 3) {
                        preq[i] = (pipeline_request){.kind = PIPELINE_RECOMMEND,
                                                     .collection = "products",
                                                     .user_id = users[u],
                                                     .k = 10,
                                                     .rules = mode == 2 ? &rules : NULL};
                        if (pipeline_start(pl, &preq[i], 0, job_done, NULL, &jobs[i], &pending,
                                           &err))
                            bench_die("pipeline", &err);
                        if (!pending) bench_count_one();
                    } else {
                        pgreq[i] = (pipeline_page_request){
                            .user_id = users[u], .slots = slots, .n_slots = 4};
                        if (pipeline_page_start(pl, &pgreq[i], 0, page_done, NULL, &pages[i],
                                                &pending, &err))
                            bench_die("page", &err);
                        if (!pending) bench_count_one();
                    }
                }
                bench_wait_for(base + wave);
                for (uint32_t i = 0; i < wave; i++) {
                    if (mode == 1 || mode == 2) {
                        const pipeline_output *o = pipeline_job_output(jobs[i]);
                        if (o->status) bench_die("job", &o->err);
                        if (measured) rounds[mode] += o->rounds;
                        pipeline_job_destroy(jobs[i]);
                    } else if (mode == 3) {
                        const pipeline_page_output *o = pipeline_page_output_of(pages[i]);
                        if (o->status) bench_die("page", &o->err);
                        pipeline_page_destroy(pages[i]);
                    }
                }
                sent += wave;
            }
            if (measured) {
                per_call[mode][round] = (bench_cpu_s() - t0) / calls;
                batcher_stats bs1;
                batcher_get_stats(bat, &bs1);
                uint64_t nb = bs1.batches - bs0.batches;
                per_batch[mode] +=
                    nb ? (double)(bs1.requests - bs0.requests) / (double)nb / n_rounds : 0;
            }
        }
        printf("round %u  %-16s %8.1f us CPU per call\n", round + 1, mode_names[mode],
               per_call[mode][round] * 1e6);
        fflush(stdout);
    }
    printf("\n");
    for (int mode = 0; mode < 5; mode++) {
        if (modes ? !strchr(modes, '0' + mode) : mode == 4) continue;
        uint32_t calls = mode == 3 ? CALLS / 4 : CALLS;
        printf("%-16s %8.1f us CPU per call (median)", mode_names[mode],
               median_of(per_call[mode], n_rounds) * 1e6);
        if (mode == 1 || mode == 2)
            printf("  (%.2f engine rounds per call)", rounds[mode] / calls / n_rounds);
        printf("  [%.1f requests per batch]\n", per_batch[mode]);
    }
    printf("\nN = %u, d = %u, k = 10, %u calls (%u pages), %u in flight, batcher max_batch 256, "
           "%u rounds\n",
           N, D, CALLS, CALLS / 4, INFLIGHT, n_rounds);
    if (clusters)
        printf("products clustered: %u clusters, category = cluster %% %u (BENCH_CLUSTERS)\n",
               clusters, GEN_CATS);
    if (n_gift > 1) printf("promotion: %d categories (BENCH_PROMO_CATS)\n", n_gift);
    print_ratio("pipeline / bare       ", per_call[1], per_call[0], n_rounds, "");
    print_ratio("pipeline+rules / bare ", per_call[2], per_call[0], n_rounds, "(target <= 1.10)");
    print_ratio("page(4) / pipeline    ", per_call[3], per_call[1], n_rounds, "(target <= 2.0)");
    print_ratio("rules' engine / bare  ", per_call[4], per_call[0], n_rounds, "");
    print_ratio("pipeline+rules / rules' engine", per_call[2], per_call[4], n_rounds, "");
    free(shape_q);
    free(shape_hits);
    free(shape_n);
    free(shape_err);
    pipeline_destroy(pl);
    batcher_destroy(bat);
    catalog_destroy(cat);
    engine_destroy(eng);
    profiles_destroy(prof);
    store_destroy(store);
    return 0;
}

/*
 * test_search_allocs.c: heap allocations per call on the serving hot path, counted in a real
 * affinityd by an LD_PRELOAD interposer (malloc_count.c), for Search (with and without a
 * filter), Recommend and SimilarItems, on the FAISS fp32 path and on the int8 cpu_score path.
 *
 * The server is started with the interposer and loaded; after a warm-up (which grows every
 * per-worker scratch buffer to its steady size) the count is read, CALLS calls are made one
 * after another from one client, and the count is read again: the difference over CALLS is
 * the allocations per call of the whole process (gRPC core included), which must stay at or
 * under the bound below. Background threads allocate too (timers, the metrics thread), which
 * the average over CALLS calls makes negligible. The server's CPU time per call (from
 * /proc/<pid>/stat) is printed beside it.
 *
 * Measuring another build: AFFINITYD=<path to affinityd> runs the same calls against that
 * binary, AFF_ALLOC_CALLS=<n> changes the number of calls, AFF_ALLOC_REPORT=1 prints a
 * Markdown table row per measurement, and the bounds are not asserted (a baseline exceeds them).
 *
 * Not built with sanitizers: ASan must be the first allocator interposed.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "malloc_count.h"
#include "server_helpers.h"

#define DIM     32
#define N_ITEMS 2000
#define N_CATS  8

/* The most heap allocations one call may make, gRPC core and protobuf-c included (about 16 of
 * a Search's). Measured on this code: Search 18-19 (21-22 with a filter, whose decoding takes
 * 3), Recommend 30-31, SimilarItems 24-25 (44-45 and 33-34 before the pipeline's arrays were
 * blocks: bench/results/2026-11-30-cpu-2core/pipeline.md); before the per-worker arenas
 * 40-53, 57-66 and 47-56 (bench/results/2026-11-30-cpu-2core/search-allocations.md). The
 * bounds leave room for background threads, and fail when the engine, backend or pipeline
 * path allocates per call again. */
static const double max_allocs[] = {24.0, 27.0, 36.0, 30.0}; /* by call_kind */

static char ids[N_ITEMS][16];
static const char *const cats[N_CATS] = {"c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"};

static void upsert_catalog(transport_client *cl)
{
    ts_create_collection(cl, "shop", DIM, AFFINITY__V1__METRIC__METRIC_COSINE);
    static float vecs[N_ITEMS][DIM];
    static Affinity__V1__Item items[N_ITEMS];
    static Affinity__V1__Item *ptrs[N_ITEMS];
    uint64_t seed = 7;
    for (int i = 0; i < N_ITEMS; i++) {
        snprintf(ids[i], sizeof ids[i], "sku-%04d", i);
        for (int j = 0; j < DIM; j++)
            vecs[i][j] = ts_randf(&seed);
        affinity__v1__item__init(&items[i]);
        items[i].id = ids[i];
        items[i].n_vector = DIM;
        items[i].vector = vecs[i];
        items[i].category = (char *)cats[i % N_CATS];
        items[i].price = (float)(i % 50);
        ptrs[i] = &items[i];
    }
    ts_upsert_items(cl, "shop", ptrs, N_ITEMS);
}

static void put_views(transport_client *cl, const char *user)
{
    Affinity__V1__Event e[5];
    Affinity__V1__Event *p[5];
    for (int i = 0; i < 5; i++) {
        affinity__v1__event__init(&e[i]);
        e[i].item_id = ids[i * 17];
        e[i].type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW;
        p[i] = &e[i];
    }
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = "shop";
    req.user_id = (char *)user;
    req.n_events = 5;
    req.events = p;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_PUT_EVENTS, &req,
                         &affinity__v1__put_events_response__descriptor, 0, NULL, &st),
                 0, "%s", st.message);
}

typedef enum call_kind { C_SEARCH, C_SEARCH_FILTERED, C_RECOMMEND, C_SIMILAR } call_kind;
static const char *const kind_names[] = {"Search", "Search + category filter", "Recommend",
                                         "SimilarItems"};

/* One call of `kind`; asserts it succeeded with 10 hits. */
static void one_call(transport_client *cl, call_kind kind, const float *q)
{
    transport_call_status st;
    if (kind == C_SEARCH || kind == C_SEARCH_FILTERED) {
        Affinity__V1__Query query = AFFINITY__V1__QUERY__INIT;
        query.n_vector = DIM;
        query.vector = (float *)q;
        query.k = 10;
        Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
        char *cat = "c3";
        if (kind == C_SEARCH_FILTERED) {
            f.n_categories = 1;
            f.categories = &cat;
            query.filter = &f;
        }
        Affinity__V1__Query *qp = &query;
        Affinity__V1__SearchRequest req = AFFINITY__V1__SEARCH_REQUEST__INIT;
        req.collection = "shop";
        req.n_queries = 1;
        req.queries = &qp;
        Affinity__V1__SearchResponse *resp = NULL;
        cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SEARCH, &req,
                             &affinity__v1__search_response__descriptor, 0, &resp, &st),
                     0, "%s", st.message);
        cr_assert_eq(resp->n_results, 1);
        cr_assert_eq(resp->results[0]->n_hits, 10);
        transport_client_free(&resp->base);
    } else if (kind == C_RECOMMEND) {
        Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
        req.collection = "shop";
        req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
        req.user_id = "u1";
        req.k = 10;
        Affinity__V1__RecommendResponse *resp = NULL;
        cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RECOMMEND, &req,
                             &affinity__v1__recommend_response__descriptor, 0, &resp, &st),
                     0, "%s", st.message);
        cr_assert_eq(resp->n_hits, 10);
        transport_client_free(&resp->base);
    } else {
        Affinity__V1__SimilarItemsRequest req = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
        req.collection = "shop";
        char *item = ids[42];
        req.n_item_ids = 1;
        req.item_ids = &item;
        req.k = 10;
        Affinity__V1__SimilarItemsResponse *resp = NULL;
        cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SIMILAR_ITEMS, &req,
                             &affinity__v1__similar_items_response__descriptor, 0, &resp, &st),
                     0, "%s", st.message);
        cr_assert_eq(resp->n_results, 1);
        cr_assert_eq(resp->results[0]->n_hits, 10);
        transport_client_free(&resp->base);
    }
}

/* user + system CPU seconds of pid. */
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
    unsigned long ut = 0, st = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return 0;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static void measure(const char *precision)
{
    char count_path[] = "/tmp/affinity-malloc-count-XXXXXX";
    int fd = mkstemp(count_path);
    cr_assert_geq(fd, 0);
    close(fd);
    bool report = getenv("AFF_ALLOC_REPORT") != NULL;
    int calls = getenv("AFF_ALLOC_CALLS") ? atoi(getenv("AFF_ALLOC_CALLS")) : 2000;
    cr_assert_gt(calls, 0);
    setenv("LD_PRELOAD", AFF_MALLOC_COUNT_LIB, 1);
    setenv("AFF_MALLOC_COUNT_FILE", count_path, 1);
    const char *args[] = {"--cpu-precision", precision, "--log-level", "warn", NULL};
    test_server srv;
    ts_start_serving(&srv, args);
    unsetenv("LD_PRELOAD");
    unsetenv("AFF_MALLOC_COUNT_FILE");
    cr_assert_neq(malloc_count_read(count_path), UINT64_MAX, "the interposer did not load");
    transport_client *cl = ts_client(&srv, NULL);
    upsert_catalog(cl);
    put_views(cl, "u1");
    uint64_t seed = 99;
    float q[DIM];
    for (int j = 0; j < DIM; j++)
        q[j] = ts_randf(&seed);
    for (call_kind kind = C_SEARCH; kind <= C_SIMILAR; kind++) {
        for (int i = 0; i < 200; i++) /* warm-up: scratch buffers reach their size */
            one_call(cl, kind, q);
        uint64_t a0 = malloc_count_read(count_path);
        double c0 = proc_cpu_s(srv.pid);
        for (int i = 0; i < calls; i++)
            one_call(cl, kind, q);
        uint64_t a1 = malloc_count_read(count_path);
        double c1 = proc_cpu_s(srv.pid);
        double per_call = (double)(a1 - a0) / calls;
        double cpu_us = (c1 - c0) * 1e6 / calls;
        fprintf(stderr, "%s| %s | %s | %d | %.2f | %.1f |\n", report ? "" : "allocs: ", precision,
                kind_names[kind], calls, per_call, cpu_us);
        if (!report)
            cr_expect_leq(per_call, max_allocs[kind], "%s (%s): %.2f allocations per call, bound %.0f",
                          kind_names[kind], precision, per_call, max_allocs[kind]);
    }
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&srv, 15, 20000), 0);
    unlink(count_path);
}

TestSuite(search_allocs, .timeout = 300);

Test(search_allocs, fp32_faiss_path_stays_under_the_bound)
{
    measure("fp32");
}

Test(search_allocs, int8_cpu_score_path_stays_under_the_bound)
{
    measure("int8");
}

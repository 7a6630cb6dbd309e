/*
 * test_server_ops.c: end-to-end operational behaviour of affinityd on the demo shop:
 * batching under concurrency, back-pressure, deadlines in the queue, bearer tokens, TLS with
 * a generated self-signed certificate, graceful shutdown with calls in flight, start-up
 * errors and configuration from the environment.
 *
 * Heavy calls (1024 queries against 100,000 items) keep the single batch worker busy for a
 * while so that queues form; every wait polls the server's own counters, bounded in time.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "demo.h"
#include "server_helpers.h"

#define HEAVY_QUERIES 1024

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* A Search of nq random queries (k = 10) on the demo products; returns the gRPC code. */
static int search_products(transport_client *c, int nq, uint32_t timeout_ms, uint64_t seed,
                           transport_call_status *st)
{
    static __thread float v[HEAVY_QUERIES][DEMO_DIM];
    static __thread Affinity__V1__Query q[HEAVY_QUERIES];
    static __thread Affinity__V1__Query *qp[HEAVY_QUERIES];
    for (int i = 0; i < nq; i++) {
        for (int j = 0; j < DEMO_DIM; j++)
            v[i][j] = ts_randf(&seed);
        affinity__v1__query__init(&q[i]);
        q[i].n_vector = DEMO_DIM;
        q[i].vector = v[i];
        qp[i] = &q[i];
    }
    Affinity__V1__SearchRequest req = AFFINITY__V1__SEARCH_REQUEST__INIT;
    req.collection = "products";
    req.k = 10;
    req.n_queries = (size_t)nq;
    req.queries = qp;
    return ts_call(c, TRANSPORT_METHOD_SEARCH, &req, &affinity__v1__search_response__descriptor,
                   timeout_ms, NULL, st);
}

typedef struct worker {
    pthread_t th;
    transport_client *c;
    int calls, nq;
    uint64_t seed;
    pthread_barrier_t *start;
    int codes[64];
    char first_error[600];
} worker;

static void *worker_main(void *arg)
{
    worker *w = arg;
    if (w->start) pthread_barrier_wait(w->start);
    for (int i = 0; i < w->calls && i < 64; i++) {
        transport_call_status st;
        w->codes[i] = search_products(w->c, w->nq, 120000, w->seed + (uint64_t)i, &st);
        if (w->codes[i] && !w->first_error[0])
            snprintf(w->first_error, sizeof w->first_error, "%d %s", st.code, st.message);
    }
    return NULL;
}

static int count_code(const worker *w, int n, int code)
{
    int k = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < w[i].calls; j++)
            k += w[i].codes[j] == code;
    return k;
}

/* Polls GetServerInfo until pred(stats) holds or timeout_ms passes. */
static bool wait_stats(transport_client *c, bool (*pred)(const Affinity__V1__BatchStats *),
                       int timeout_ms)
{
    int64_t until = ts_now_ms() + timeout_ms;
    while (ts_now_ms() < until) {
        Affinity__V1__ServerInfo *info = ts_server_info(c);
        bool ok = pred(info->batch_stats);
        transport_client_free(&info->base);
        if (ok) return true;
        sleep_ms(5);
    }
    return false;
}

static bool busy_with_one_queued(const Affinity__V1__BatchStats *s)
{
    return s->queued >= 1;
}

/* All three calls of the shutdown test have reached the server (dispatched or queued; requests
 * counts at dispatch) and some are still queued. */
static bool three_arrived_one_queued(const Affinity__V1__BatchStats *s)
{
    return s->requests + s->queued >= 3 && s->queued >= 1;
}

static bool one_expired(const Affinity__V1__BatchStats *s)
{
    return s->expired_deadline >= 1;
}

static const char *const demo_args[] = {"--demo", NULL};

Test(server_ops, batching_merges_concurrent_calls)
{
    test_server s;
    ts_start_serving(&s, demo_args);
    transport_client *c = ts_client(&s, NULL);
    enum { NT = 16 };
    worker w[NT];
    memset(w, 0, sizeof w);
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, NT);
    for (int i = 0; i < NT; i++) {
        w[i] = (worker){.c = c, .calls = 20, .nq = 1, .seed = 1000u * (uint64_t)i, .start = &start};
        pthread_create(&w[i].th, NULL, worker_main, &w[i]);
    }
    for (int i = 0; i < NT; i++)
        pthread_join(w[i].th, NULL);
    cr_assert_eq(count_code(w, NT, 0), NT * 20, "failures: %s", w[0].first_error);
    Affinity__V1__ServerInfo *info = ts_server_info(c);
    Affinity__V1__BatchStats *b = info->batch_stats;
    cr_log_info("batches %llu for %llu calls, largest %llu", (unsigned long long)b->batches,
                (unsigned long long)b->requests, (unsigned long long)b->max_batch_seen);
    cr_assert_eq(b->requests, NT * 20);
    cr_assert_gt(b->max_batch_seen, 1, "no batch merged two calls");
    cr_assert_lt(b->batches, b->requests);
    uint64_t merged = 0;
    for (size_t i = 1; i < b->n_size_histogram; i++)
        merged += b->size_histogram[i];
    cr_assert_gt(merged, 0);
    transport_client_free(&info->base);
    transport_client_destroy(c);
    cr_assert_eq(ts_stop(&s, SIGTERM, 60000), 0);
}

Test(server_ops, full_queue_answers_resource_exhausted_at_once)
{
    test_server s;
    static const char *const args[] = {"--demo", "--queue-limit", "1", NULL};
    ts_start_serving(&s, args);
    transport_client *c = ts_client(&s, NULL);
    enum { NT = 6 };
    worker w[NT];
    int rejected = 0, ok = 0;
    for (int round = 0; round < 5 && (!rejected || !ok); round++) {
        memset(w, 0, sizeof w);
        pthread_barrier_t start;
        pthread_barrier_init(&start, NULL, NT);
        for (int i = 0; i < NT; i++) {
            w[i] = (worker){
                .c = c, .calls = 1, .nq = HEAVY_QUERIES, .seed = (uint64_t)i, .start = &start};
            pthread_create(&w[i].th, NULL, worker_main, &w[i]);
        }
        for (int i = 0; i < NT; i++)
            pthread_join(w[i].th, NULL);
        pthread_barrier_destroy(&start);
        rejected += count_code(w, NT, TS_RESOURCE_EXHAUSTED);
        ok += count_code(w, NT, TS_OK);
        cr_assert_eq(count_code(w, NT, TS_RESOURCE_EXHAUSTED) + count_code(w, NT, TS_OK), NT);
    }
    cr_assert_gt(rejected, 0, "no call was refused with a queue of 1");
    cr_assert_gt(ok, 0);
    Affinity__V1__ServerInfo *info = ts_server_info(c);
    cr_assert_eq(info->batch_stats->rejected_queue_full, (uint64_t)rejected);
    transport_client_free(&info->base);
    transport_client_destroy(c);
    cr_assert_eq(ts_stop(&s, SIGTERM, 60000), 0);
}

Test(server_ops, expired_calls_are_not_computed)
{
    test_server s;
    ts_start_serving(&s, demo_args);
    transport_client *c = ts_client(&s, NULL);
    enum { NH = 4 };
    worker w[NH];
    memset(w, 0, sizeof w);
    for (int i = 0; i < NH; i++) {
        w[i] = (worker){.c = c, .calls = 1, .nq = HEAVY_QUERIES, .seed = (uint64_t)i};
        pthread_create(&w[i].th, NULL, worker_main, &w[i]);
    }
    /* One heavy call runs, others wait (each goes alone: 1024 queries > max_batch): a small
     * call queued now waits behind all of them. */
    cr_assert(wait_stats(c, busy_with_one_queued, 60000), "no queue formed");
    transport_call_status st;
    int code = search_products(c, 1, 100, 7, &st);
    cr_assert_eq(code, TS_DEADLINE_EXCEEDED, "%d %s", code, st.message);
    /* The server drops it when its turn comes, without computing it. */
    cr_assert(wait_stats(c, one_expired, 60000), "the expired call was not counted");
    for (int i = 0; i < NH; i++)
        pthread_join(w[i].th, NULL);
    cr_assert_eq(count_code(w, NH, 0), NH, "%s", w[0].first_error);
    transport_client_destroy(c);
    cr_assert_eq(ts_stop(&s, SIGTERM, 60000), 0);
}

Test(server_ops, bearer_token_is_required_except_for_health)
{
    char dir[] = "/tmp/affinity-e2e-XXXXXX";
    cr_assert(mkdtemp(dir));
    char token_path[300];
    snprintf(token_path, sizeof token_path, "%s/token", dir);
    FILE *f = fopen(token_path, "w");
    fputs("s3cret-Token_42\n", f);
    fclose(f);
    const char *args[] = {"--token-file", token_path, NULL};
    test_server s;
    cr_assert_eq(ts_start(&s, dir, args), 0);
    cr_assert(ts_wait_serving(&s, NULL), "health must not need the token");

    transport_call_status st;
    Affinity__V1__ListCollectionsRequest req = AFFINITY__V1__LIST_COLLECTIONS_REQUEST__INIT;
    transport_client *none = ts_client(&s, NULL);
    cr_assert_eq(ts_call(none, TRANSPORT_METHOD_LIST_COLLECTIONS, &req,
                         &affinity__v1__list_collections_response__descriptor, 0, NULL, &st),
                 TS_UNAUTHENTICATED);
    cr_assert(strstr(st.message, "Bearer"), "%s", st.message);
    cr_assert_eq(ts_health(none), 1);
    transport_client *wrong = ts_client(&s, "s3cret-Token_43");
    cr_assert_eq(ts_call(wrong, TRANSPORT_METHOD_LIST_COLLECTIONS, &req,
                         &affinity__v1__list_collections_response__descriptor, 0, NULL, &st),
                 TS_UNAUTHENTICATED);
    transport_client *prefix = ts_client(&s, "s3cret-Token_4");
    cr_assert_eq(ts_call(prefix, TRANSPORT_METHOD_LIST_COLLECTIONS, &req,
                         &affinity__v1__list_collections_response__descriptor, 0, NULL, &st),
                 TS_UNAUTHENTICATED);
    transport_client *right = ts_client(&s, "s3cret-Token_42");
    cr_assert_eq(ts_call(right, TRANSPORT_METHOD_LIST_COLLECTIONS, &req,
                         &affinity__v1__list_collections_response__descriptor, 0, NULL, &st),
                 TS_OK, "%s", st.message);
    /* streams are checked too */
    transport_client_stream *up = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(none, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &up, &err),
                 0);
    cr_assert_eq(transport_client_stream_finish(up, NULL, NULL, &st), AFF_EUNAUTHENTICATED);
    transport_client_stream_destroy(up);
    transport_client_destroy(none);
    transport_client_destroy(wrong);
    transport_client_destroy(prefix);
    transport_client_destroy(right);
    cr_assert_eq(ts_stop(&s, SIGTERM, 60000), 0);
}

Test(server_ops, tls_with_a_self_signed_certificate)
{
    char dir[] = "/tmp/affinity-e2e-XXXXXX";
    cr_assert(mkdtemp(dir));
    char cmd[1024], cert[300], key[300];
    snprintf(cert, sizeof cert, "%s/cert.pem", dir);
    snprintf(key, sizeof key, "%s/key.pem", dir);
    snprintf(cmd, sizeof cmd,
             "openssl req -x509 -newkey rsa:2048 -nodes -keyout %s -out %s -days 1 "
             "-subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 "
             ">/dev/null 2>&1",
             key, cert);
    cr_assert_eq(system(cmd), 0, "openssl failed");
    const char *args[] = {"--tls-cert", cert, "--tls-key", key, NULL};
    test_server s;
    cr_assert_eq(ts_start(&s, dir, args), 0);
    if (!ts_wait_serving(&s, cert)) {
        ts_dump_log(&s);
        cr_assert_fail("no TLS health answer");
    }
    transport_client *tls = NULL;
    transport_client_options o = {.target = s.target,
                                  .tls_root_cert_file = cert,
                                  .tls_server_name = "localhost",
                                  .timeout_ms = 30000};
    aff_err err;
    cr_assert_eq(transport_client_create(&tls, &o, &err), 0, "%s", err.msg);
    Affinity__V1__ServerInfo *info = ts_server_info(tls);
    cr_assert_str_eq(info->backend, "faiss-cpu");
    transport_client_free(&info->base);
    /* A plaintext client cannot talk to it. */
    transport_client *plain = NULL;
    transport_client_options po = {.target = s.target, .timeout_ms = 5000};
    cr_assert_eq(transport_client_create(&plain, &po, &err), 0);
    cr_assert_neq(ts_health(plain), 1);
    transport_client_destroy(plain);
    transport_client_destroy(tls);
    cr_assert_eq(ts_stop(&s, SIGTERM, 60000), 0);
}

Test(server_ops, graceful_shutdown_finishes_calls_in_flight)
{
    test_server s;
    static const char *const args[] = {
        "--demo", "--grace-seconds", "60", "--drain-notice-ms", "8000", NULL};
    ts_start_serving(&s, args);
    transport_client *c = ts_client(&s, NULL);
    enum { NT = 3 };
    worker w[NT];
    memset(w, 0, sizeof w);
    for (int i = 0; i < NT; i++) {
        w[i] = (worker){.c = c, .calls = 1, .nq = HEAVY_QUERIES, .seed = 100u + (uint64_t)i};
        pthread_create(&w[i].th, NULL, worker_main, &w[i]);
    }
    /* SIGTERM only once every call has reached the server: a call that arrives after it
     * is rightly answered UNAVAILABLE, which is not what this test is about. */
    cr_assert(wait_stats(c, three_arrived_one_queued, 60000), "no calls in flight");
    int64_t t_term = ts_now_ms();
    kill(s.pid, SIGTERM);
    /* During the notice period: NOT_SERVING, and new calls get UNAVAILABLE. */
    int health = 1;
    while (health == 1 && ts_now_ms() - t_term < 7000)
        health = ts_health(c);
    cr_assert_eq(health, 2, "health stayed %d after SIGTERM", health);
    transport_call_status st;
    int code = search_products(c, 1, 30000, 1, &st);
    cr_assert_eq(code, TS_UNAVAILABLE, "%d %s", code, st.message);
    for (int i = 0; i < NT; i++)
        pthread_join(w[i].th, NULL);
    cr_assert_eq(count_code(w, NT, TS_OK), NT, "in-flight calls failed: %s | %s | %s",
                 w[0].first_error, w[1].first_error, w[2].first_error);
    transport_client_destroy(c);
    int status = ts_stop(&s, SIGTERM, 60000);
    if (status != 0) ts_dump_log(&s);
    cr_assert_eq(status, 0, "exit status %d", status);
}

Test(server_ops, a_taken_port_is_an_error)
{
    test_server a, b;
    ts_start_serving(&a, NULL);
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", a.port);
    const char *args[] = {"--listen", listen, NULL};
    cr_assert_eq(ts_start(&b, NULL, args), -1, "a second server bound the same port");
    FILE *f = fopen(b.log_path, "r");
    cr_assert(f);
    char buf[8192] = {0};
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    cr_assert(strstr(buf, "cannot listen"), "%s", buf);
    cr_assert(strstr(buf, "already in use"), "%s", buf); /* the cause, not a guess */
    cr_assert(!strstr(buf, "No address added"), "gRPC's dump reached the log: %s", buf);
    ts_remove_dir(&b);
    cr_assert_eq(ts_stop(&a, SIGTERM, 60000), 0);
}

Test(server_ops, bad_flags_fail_with_a_clear_message)
{
    const char *args[] = {"--max-batch", "0", NULL};
    test_server s;
    cr_assert_eq(ts_start(&s, NULL, args), -1);
    FILE *f = fopen(s.log_path, "r");
    cr_assert(f);
    char buf[4096] = {0};
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    cr_assert(strstr(buf, "--max-batch") && strstr(buf, "1..65536"), "%s", buf);
    ts_remove_dir(&s);
}

Test(server_ops, configuration_comes_from_the_environment)
{
    setenv("AFFINITY_MAX_BATCH", "32", 1);
    setenv("AFFINITY_MAX_WAIT_US", "750", 1);
    test_server s;
    static const char *const args[] = {"--max-wait-us", "500", NULL}; /* the flag wins */
    ts_start_serving(&s, args);
    unsetenv("AFFINITY_MAX_BATCH");
    unsetenv("AFFINITY_MAX_WAIT_US");
    transport_client *c = ts_client(&s, NULL);
    Affinity__V1__ServerInfo *info = ts_server_info(c);
    cr_assert_eq(info->max_batch, 32);
    cr_assert_eq(info->max_wait_us, 500);
    transport_client_free(&info->base);
    transport_client_destroy(c);
    cr_assert_eq(ts_stop(&s, SIGINT, 60000), 0);
}

/* Reads the metrics port from the server log ("metrics on port N"), polling. */
static int metrics_port_from_log(const test_server *s)
{
    int64_t until = ts_now_ms() + 30000;
    while (ts_now_ms() < until) {
        FILE *f = fopen(s->log_path, "r");
        char line[2048];
        while (f && fgets(line, sizeof line, f)) {
            const char *p = strstr(line, "metrics on port ");
            if (p) {
                fclose(f);
                return atoi(p + strlen("metrics on port "));
            }
        }
        if (f) fclose(f);
        sleep_ms(10);
    }
    return 0;
}

static char *http_get(int port, const char *path)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) return NULL;
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    ssize_t r;
    while ((r = read(fd, buf + len, cap - len - 1)) > 0) {
        len += (size_t)r;
        if (len + 1 == cap) buf = realloc(buf, cap *= 2);
    }
    buf[len] = '\0';
    close(fd);
    return buf;
}

Test(server_ops, metrics_count_calls_and_batches)
{
    test_server s;
    static const char *const args[] = {"--demo", "--metrics-listen", "127.0.0.1:0", NULL};
    ts_start_serving(&s, args);
    int port = metrics_port_from_log(&s);
    cr_assert_gt(port, 0, "no metrics port in the log");
    transport_client *c = ts_client(&s, NULL);
    transport_call_status st;
    for (int i = 0; i < 3; i++)
        cr_assert_eq(search_products(c, 1, 30000, (uint64_t)i, &st), 0, "%s", st.message);
    cr_assert_eq(search_products(c, 1, 30000, 9, &st), 0);
    char *body = http_get(port, "/metrics");
    cr_assert(body, "GET /metrics failed");
    cr_assert(strstr(body, "affinity_requests_total{method=\"Search\",code=\"OK\"} 4"), "%s", body);
    cr_assert(strstr(body, "affinity_batch_size_count"), "%s", body);
    free(body);
    transport_client_destroy(c);
    cr_assert_eq(ts_stop(&s, SIGTERM, 60000), 0);
}

Test(server_ops, restarts_itself_with_passive_openmp)
{
    /* OpenMP reads OMP_WAIT_POLICY once at load: affinityd re-executes itself with PASSIVE. */
    unsetenv("OMP_WAIT_POLICY");
    test_server s;
    ts_start_serving(&s, NULL);
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/environ", (int)s.pid);
    FILE *f = fopen(path, "r");
    cr_assert(f);
    char env[65536];
    size_t n = fread(env, 1, sizeof env - 1, f);
    fclose(f);
    bool found = false;
    for (size_t i = 0; i < n; i += strlen(env + i) + 1) {
        env[n] = '\0';
        if (strcmp(env + i, "OMP_WAIT_POLICY=PASSIVE") == 0) found = true;
    }
    cr_assert(found, "OMP_WAIT_POLICY=PASSIVE is not in the server's environment");
    cr_assert_eq(ts_stop(&s, SIGTERM, 60000), 0);
}

Test(server_ops, demo_shop_is_loaded_and_clustered)
{
    test_server s;
    ts_start_serving(&s, demo_args);
    transport_client *c = ts_client(&s, NULL);
    transport_call_status st;
    Affinity__V1__ListCollectionsRequest lr = AFFINITY__V1__LIST_COLLECTIONS_REQUEST__INIT;
    Affinity__V1__ListCollectionsResponse *list = NULL;
    cr_assert_eq(ts_call(c, TRANSPORT_METHOD_LIST_COLLECTIONS, &lr,
                         &affinity__v1__list_collections_response__descriptor, 0, &list, &st),
                 0);
    const char *names[] = {"banners", "categories", "offers", "products"};
    uint64_t counts[] = {8, DEMO_CATEGORIES, 10, DEMO_PRODUCTS};
    cr_assert_eq(list->n_collections, 4);
    for (int i = 0; i < 4; i++) {
        cr_assert_str_eq(list->collections[i]->name, names[i]);
        cr_assert_eq(list->collections[i]->item_count, counts[i], "%s", names[i]);
        cr_assert_eq(list->collections[i]->dimension, DEMO_DIM);
    }
    transport_client_free(&list->base);

    /* Neighbours of a product are mostly from its own category. */
    char *ids[] = {"p000123"};
    Affinity__V1__GetItemsRequest gr = AFFINITY__V1__GET_ITEMS_REQUEST__INIT;
    gr.collection = "products";
    gr.n_ids = 1;
    gr.ids = ids;
    Affinity__V1__GetItemsResponse *item = NULL;
    cr_assert_eq(ts_call(c, TRANSPORT_METHOD_GET_ITEMS, &gr,
                         &affinity__v1__get_items_response__descriptor, 0, &item, &st),
                 0);
    cr_assert_eq(item->n_items, 1);
    char category[64];
    snprintf(category, sizeof category, "%s", item->items[0]->category);
    transport_client_free(&item->base);
    Affinity__V1__SimilarItemsRequest sr = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
    sr.collection = "products";
    sr.n_item_ids = 1;
    sr.item_ids = ids;
    sr.k = 20;
    Affinity__V1__SimilarItemsResponse *sim = NULL;
    cr_assert_eq(ts_call(c, TRANSPORT_METHOD_SIMILAR_ITEMS, &sr,
                         &affinity__v1__similar_items_response__descriptor, 0, &sim, &st),
                 0, "%s", st.message);
    cr_assert_eq(sim->results[0]->n_hits, 20);
    char *hit_ids[20];
    for (int i = 0; i < 20; i++)
        hit_ids[i] = sim->results[0]->hits[i]->id;
    gr.n_ids = 20;
    gr.ids = hit_ids;
    cr_assert_eq(ts_call(c, TRANSPORT_METHOD_GET_ITEMS, &gr,
                         &affinity__v1__get_items_response__descriptor, 0, &item, &st),
                 0);
    int same = 0;
    for (size_t i = 0; i < item->n_items; i++)
        same += strcmp(item->items[i]->category, category) == 0;
    cr_assert_geq(same, 16, "only %d of 20 neighbours share the category %s", same, category);
    transport_client_free(&item->base);
    transport_client_free(&sim->base);
    transport_client_destroy(c);
    cr_assert_eq(ts_stop(&s, SIGTERM, 60000), 0);
}

/*
 * test_metrics.c: the Prometheus registry and its HTTP endpoint, scraped over a real socket.
 *
 * Each test starts the endpoint on 127.0.0.1 with an ephemeral port, updates metrics through
 * the public functions and reads /metrics with a tiny HTTP/1.1 client, then checks exact
 * exposition lines (names, label order, values, cumulative buckets).
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "metrics.h"

typedef struct http_reply {
    int status;
    char *headers; /* status line and headers, NUL-terminated */
    char *body;    /* NUL-terminated */
} http_reply;

static void http_reply_free(http_reply *r)
{
    free(r->headers);
    free(r->body);
}

/* Sends one request with Connection: close and reads the whole reply. */
static void http_request(uint16_t port, const char *method, const char *path, http_reply *out)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert(fd >= 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0, "connect to port %u",
                 (unsigned)port);

    char req[256];
    int n =
        snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                 method, path);
    cr_assert_eq(write(fd, req, (size_t)n), n);

    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    cr_assert(buf);
    for (;;) {
        if (cap - len < 4096) {
            cap *= 2;
            buf = realloc(buf, cap);
            cr_assert(buf);
        }
        ssize_t got = read(fd, buf + len, cap - len - 1);
        cr_assert(got >= 0);
        if (got == 0) break;
        len += (size_t)got;
    }
    buf[len] = '\0';
    close(fd);

    char *split = strstr(buf, "\r\n\r\n");
    cr_assert(split, "no end of headers in reply: %s", buf);
    *split = '\0';
    out->headers = strdup(buf);
    out->body = strdup(split + 4);
    cr_assert(sscanf(buf, "HTTP/1.%*d %d", &out->status) == 1, "bad status line: %s", buf);
    free(buf);
}

static bool has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p++) {
        if ((p == text || p[-1] == '\n') && (p[n] == '\n' || p[n] == '\0')) return true;
    }
    return false;
}

#define assert_line(text, line) cr_assert(has_line(text, line), "missing line: %s", line)
#define refute_line(text, line) cr_assert(!has_line(text, line), "unexpected line: %s", line)

static aff_metrics *start(void)
{
    aff_metrics *m = NULL;
    aff_err err;
    int rc = metrics_create(&m, "127.0.0.1:0", &err);
    cr_assert_eq(rc, 0, "metrics_create: %s", err.msg);
    cr_assert_neq(metrics_port(m), 0);
    return m;
}

static void collections_hook(aff_metrics *m, metrics_scrape *scrape, void *ctx)
{
    int *calls = ctx;
    (*calls)++;
    metrics_scrape_collection(scrape, "products", 1200);
    metrics_scrape_collection(scrape, "odd\"name\\", 7);
    metrics_set_gpu_memory(m, 1024, 4096);
}

Test(metrics, serves_exact_lines_over_http)
{
    aff_metrics *m = start();
    int hook_calls = 0;
    metrics_set_scrape_hook(m, collections_hook, &hook_calls);
    metrics_set_backend(m, "cuda", "NVIDIA H100 80GB HBM3");
    metrics_observe_request(m, METRICS_METHOD_RECOMMEND, 0, 3000000);   /* 3 ms */
    metrics_observe_request(m, METRICS_METHOD_RECOMMEND, 0, 20000000);  /* 20 ms */
    metrics_observe_request(m, METRICS_METHOD_SEARCH, 3, 50000);        /* 50 us */
    metrics_observe_request(m, METRICS_METHOD_PUT_EVENTS, 99, 1000000); /* bad code */
    metrics_observe_batch(m, 1);
    metrics_observe_batch(m, 32);
    metrics_observe_batch(m, 33);
    metrics_observe_batch(m, 10000);
    metrics_observe_queue_wait(m, 10000);   /* exactly the first bound */
    metrics_observe_queue_wait(m, 3000000); /* 3 ms */
    metrics_add_queue_depth(m, 5);
    metrics_add_queue_depth(m, -2);
    metrics_add_events(m, METRICS_EVENT_VIEW, 3);
    metrics_add_events(m, METRICS_EVENT_PURCHASE, 1);
    metrics_add_events(m, (metrics_event_type)9, 100); /* ignored */

    http_reply r;
    http_request(metrics_port(m), "GET", "/metrics", &r);
    cr_assert_eq(r.status, 200);
    cr_assert(strstr(r.headers, "Content-Type: text/plain; version=0.0.4; charset=utf-8"),
              "headers: %s", r.headers);
    cr_assert_eq(hook_calls, 1);
    const char *b = r.body;

    char build[128];
    snprintf(build, sizeof build, "affinity_build_info{version=\"%s\"} 1", aff_version());
    assert_line(b, build);
    assert_line(b, "# TYPE affinity_build_info gauge");
    assert_line(b, "affinity_backend_info{backend=\"cuda\",device=\"NVIDIA H100 80GB HBM3\"} 1");
    assert_line(b, "affinity_serving 1");

    assert_line(b, "# TYPE affinity_requests_total counter");
    assert_line(b, "affinity_requests_total{method=\"Recommend\",code=\"OK\"} 2");
    assert_line(b, "affinity_requests_total{method=\"Search\",code=\"INVALID_ARGUMENT\"} 1");
    assert_line(b, "affinity_requests_total{method=\"PutEvents\",code=\"UNKNOWN\"} 1");
    refute_line(b, "affinity_requests_total{method=\"Search\",code=\"OK\"} 0");

    assert_line(b, "# TYPE affinity_request_duration_seconds histogram");
    cr_assert(
        strstr(b,
               "affinity_request_duration_seconds_bucket{method=\"Recommend\",le=\"0.0025\"} 0\n"
               "affinity_request_duration_seconds_bucket{method=\"Recommend\",le=\"0.005\"} 1\n"
               "affinity_request_duration_seconds_bucket{method=\"Recommend\",le=\"0.01\"} 1\n"
               "affinity_request_duration_seconds_bucket{method=\"Recommend\",le=\"0.025\"} 2\n"),
        "Recommend buckets wrong:\n%s", b);
    assert_line(b, "affinity_request_duration_seconds_bucket{method=\"Recommend\",le=\"+Inf\"} 2");
    assert_line(b, "affinity_request_duration_seconds_sum{method=\"Recommend\"} 0.023");
    assert_line(b, "affinity_request_duration_seconds_count{method=\"Recommend\"} 2");
    assert_line(b, "affinity_request_duration_seconds_bucket{method=\"Search\",le=\"0.0001\"} 1");
    assert_line(b, "affinity_request_duration_seconds_sum{method=\"Search\"} 0.00005");
    cr_assert(!strstr(b, "method=\"GetUser\""), "methods never called are not listed");

    assert_line(b, "# TYPE affinity_batch_size histogram");
    assert_line(b, "affinity_batch_size_bucket{le=\"1\"} 1");
    assert_line(b, "affinity_batch_size_bucket{le=\"16\"} 1");
    assert_line(b, "affinity_batch_size_bucket{le=\"32\"} 2");
    assert_line(b, "affinity_batch_size_bucket{le=\"64\"} 3");
    assert_line(b, "affinity_batch_size_bucket{le=\"4096\"} 3");
    assert_line(b, "affinity_batch_size_bucket{le=\"+Inf\"} 4");
    assert_line(b, "affinity_batch_size_sum 10066");
    assert_line(b, "affinity_batch_size_count 4");

    assert_line(b, "affinity_queue_wait_seconds_bucket{le=\"1e-05\"} 1");
    assert_line(b, "affinity_queue_wait_seconds_bucket{le=\"0.0025\"} 1");
    assert_line(b, "affinity_queue_wait_seconds_bucket{le=\"0.005\"} 2");
    assert_line(b, "affinity_queue_wait_seconds_sum 0.00301");
    assert_line(b, "affinity_queue_wait_seconds_count 2");

    assert_line(b, "# TYPE affinity_queue_depth gauge");
    assert_line(b, "affinity_queue_depth 3");
    assert_line(b, "affinity_events_ingested_total{type=\"view\"} 3");
    assert_line(b, "affinity_events_ingested_total{type=\"purchase\"} 1");
    assert_line(b, "affinity_events_ingested_total{type=\"click\"} 0");
    assert_line(b, "affinity_collection_items{collection=\"products\"} 1200");
    assert_line(b, "affinity_collection_items{collection=\"odd\\\"name\\\\\"} 7");
    assert_line(b, "affinity_gpu_memory_used_bytes 1024");
    assert_line(b, "affinity_gpu_memory_total_bytes 4096");
    cr_assert(strstr(b, "\nprocess_start_time_seconds "), "no process_start_time_seconds");

    /* Every sample line belongs to a family announced by a TYPE line before it. */
    char *copy = strdup(b), *save = NULL;
    char last_family[128] = "";
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "# TYPE ", 7) == 0) {
            sscanf(line + 7, "%127s", last_family);
        } else if (line[0] != '#') {
            cr_assert(last_family[0] && strncmp(line, last_family, strlen(last_family)) == 0,
                      "sample outside its family: %s (family %s)", line, last_family);
        }
    }
    free(copy);
    http_reply_free(&r);
    metrics_destroy(m);
}

Test(metrics, healthz_follows_serving)
{
    aff_metrics *m = start();
    http_reply r;
    http_request(metrics_port(m), "GET", "/healthz", &r);
    cr_assert_eq(r.status, 200);
    cr_assert_str_eq(r.body, "ok\n");
    http_reply_free(&r);

    metrics_set_serving(m, false);
    http_request(metrics_port(m), "GET", "/healthz", &r);
    cr_assert_eq(r.status, 503);
    cr_assert_str_eq(r.body, "draining\n");
    http_reply_free(&r);

    http_request(metrics_port(m), "GET", "/metrics", &r);
    assert_line(r.body, "affinity_serving 0");
    http_reply_free(&r);
    metrics_destroy(m);
}

Test(metrics, refuses_other_paths_and_methods)
{
    aff_metrics *m = start();
    http_reply r;
    http_request(metrics_port(m), "GET", "/nope", &r);
    cr_assert_eq(r.status, 404);
    http_reply_free(&r);
    http_request(metrics_port(m), "POST", "/metrics", &r);
    cr_assert_eq(r.status, 405);
    cr_assert(strstr(r.headers, "Allow: GET, HEAD"), "headers: %s", r.headers);
    http_reply_free(&r);
    http_request(metrics_port(m), "HEAD", "/metrics", &r);
    cr_assert_eq(r.status, 200);
    cr_assert_str_eq(r.body, "");
    http_reply_free(&r);
    metrics_destroy(m);
}

#define THREADS    4
#define PER_THREAD 20000

static void *hammer(void *arg)
{
    aff_metrics *m = arg;
    for (int i = 0; i < PER_THREAD; i++) {
        metrics_observe_request(m, METRICS_METHOD_RERANK, 0, 1000); /* 1 us */
        metrics_observe_batch(m, 2);
        metrics_add_queue_depth(m, 1);
        metrics_add_queue_depth(m, -1);
        metrics_add_events(m, METRICS_EVENT_CLICK, 1);
    }
    return NULL;
}

Test(metrics, counts_exactly_from_many_threads)
{
    aff_metrics *m = start();
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, hammer, m), 0);
    /* Scrapes while the threads run must not disturb them. */
    for (int i = 0; i < 3; i++) {
        http_reply r;
        http_request(metrics_port(m), "GET", "/metrics", &r);
        cr_assert_eq(r.status, 200);
        http_reply_free(&r);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);

    http_reply r;
    http_request(metrics_port(m), "GET", "/metrics", &r);
    assert_line(r.body, "affinity_requests_total{method=\"Rerank\",code=\"OK\"} 80000");
    assert_line(r.body, "affinity_request_duration_seconds_count{method=\"Rerank\"} 80000");
    assert_line(r.body, "affinity_request_duration_seconds_sum{method=\"Rerank\"} 0.08");
    assert_line(r.body, "affinity_batch_size_bucket{le=\"2\"} 80000");
    assert_line(r.body, "affinity_batch_size_sum 160000");
    assert_line(r.body, "affinity_queue_depth 0");
    assert_line(r.body, "affinity_events_ingested_total{type=\"click\"} 80000");
    http_reply_free(&r);
    metrics_destroy(m);
}

Test(metrics, rejects_bad_listen_addresses)
{
    const char *bad[] = {"nope",          "127.0.0.1", "127.0.0.1:", "127.0.0.1:99999",
                         "127.0.0.1:80a", "[::1",      "[::1]9090",  "a:b:c"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        aff_metrics *m = (aff_metrics *)0x1;
        aff_err err;
        cr_assert_eq(metrics_create(&m, bad[i], &err), AFF_EINVAL, "%s accepted", bad[i]);
        cr_assert_null(m);
        cr_assert(strstr(err.msg, "host:port"), "message for %s: %s", bad[i], err.msg);
    }
}

Test(metrics, reports_a_port_in_use)
{
    aff_metrics *first = start();
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)metrics_port(first));
    aff_metrics *second = NULL;
    aff_err err;
    cr_assert_eq(metrics_create(&second, addr, &err), AFF_EIO);
    cr_assert_null(second);
    cr_assert(strstr(err.msg, "cannot listen"), "%s", err.msg);
    metrics_destroy(first);
}

Test(metrics, works_without_an_endpoint_and_with_null)
{
    aff_metrics *m = NULL;
    aff_err err;
    cr_assert_eq(metrics_create(&m, "", &err), 0);
    cr_assert_eq(metrics_port(m), 0);
    metrics_observe_request(m, METRICS_METHOD_GET_SERVER_INFO, 14, 2500000000ull);
    metrics_observe_request(m, METRICS_METHOD_COUNT, 0, 1); /* out of range: ignored */
    char *text = NULL;
    size_t len = 0;
    cr_assert_eq(metrics_render(m, &text, &len, &err), 0);
    cr_assert_eq(strlen(text), len);
    assert_line(text, "affinity_requests_total{method=\"GetServerInfo\",code=\"UNAVAILABLE\"} 1");
    assert_line(text,
                "affinity_request_duration_seconds_bucket{method=\"GetServerInfo\",le=\"2.5\"} 1");
    assert_line(text, "affinity_request_duration_seconds_sum{method=\"GetServerInfo\"} 2.5");
    cr_assert(!strstr(text, "affinity_gpu_memory"), "GPU gauges before any GPU report");
    cr_assert(!strstr(text, "affinity_backend_info{"), "backend sample before it is set");
    free(text);
    metrics_destroy(m);

    /* A NULL registry takes every update and does nothing. */
    metrics_observe_request(NULL, METRICS_METHOD_SEARCH, 0, 1);
    metrics_observe_batch(NULL, 1);
    metrics_observe_queue_wait(NULL, 1);
    metrics_add_queue_depth(NULL, 1);
    metrics_set_queue_depth(NULL, 1);
    metrics_add_events(NULL, METRICS_EVENT_VIEW, 1);
    metrics_set_gpu_memory(NULL, 1, 2);
    metrics_set_serving(NULL, false);
    metrics_set_backend(NULL, "x", "y");
    metrics_set_scrape_hook(NULL, NULL, NULL);
    cr_assert_eq(metrics_port(NULL), 0);
    metrics_destroy(NULL);
}

Test(metrics, maps_method_names)
{
    metrics_method mm;
    cr_assert_eq(metrics_method_from_name("Recommend", &mm), 0);
    cr_assert_eq(mm, METRICS_METHOD_RECOMMEND);
    cr_assert_eq(metrics_method_from_name("/affinity.v1.Affinity/BatchRecommend", &mm), 0);
    cr_assert_eq(mm, METRICS_METHOD_BATCH_RECOMMEND);
    cr_assert_eq(metrics_method_from_name("/grpc.health.v1.Health/Check", &mm), AFF_ENOTFOUND);
    cr_assert_eq(metrics_method_from_name("recommend", &mm), AFF_ENOTFOUND);
    cr_assert_eq(metrics_method_from_name(NULL, &mm), AFF_ENOTFOUND);
    for (int i = 0; i < METRICS_METHOD_COUNT; i++) {
        cr_assert_eq(metrics_method_from_name(metrics_method_name((metrics_method)i), &mm), 0);
        cr_assert_eq((int)mm, i);
    }
    cr_assert_null(metrics_method_name(METRICS_METHOD_COUNT));
}

Test(metrics, empty_host_listens_on_every_address)
{
    aff_metrics *m = NULL;
    aff_err err;
    cr_assert_eq(metrics_create(&m, ":0", &err), 0, "%s", err.msg);
    http_reply r;
    http_request(metrics_port(m), "GET", "/healthz", &r);
    cr_assert_eq(r.status, 200);
    http_reply_free(&r);
    metrics_destroy(m);
}

Test(metrics, reports_gpu_device_faults_and_degraded_health)
{
    aff_metrics *m = start();
    http_reply r;
    http_request(metrics_port(m), "GET", "/metrics", &r);
    cr_assert_null(strstr(r.body, "affinity_gpu_device_faults_total"),
                   "absent until the GPU backend reports");
    http_reply_free(&r);

    metrics_set_device_faults(m, 0, 0);
    http_request(metrics_port(m), "GET", "/healthz", &r);
    cr_assert_str_eq(r.body, "ok\n");
    http_reply_free(&r);
    http_request(metrics_port(m), "GET", "/metrics", &r);
    assert_line(r.body, "affinity_gpu_device_faults_total 0");
    assert_line(r.body, "affinity_gpu_tables_on_cpu 0");
    http_reply_free(&r);

    metrics_set_device_faults(m, 3, 2);
    http_request(metrics_port(m), "GET", "/metrics", &r);
    assert_line(r.body, "affinity_gpu_device_faults_total 3");
    assert_line(r.body, "affinity_gpu_tables_on_cpu 2");
    http_reply_free(&r);
    http_request(metrics_port(m), "GET", "/healthz", &r);
    cr_assert_eq(r.status, 200, "still serving, from the CPU");
    cr_assert(strncmp(r.body, "ok (degraded: a GPU device fault", 32) == 0, "%s", r.body);
    http_reply_free(&r);
    metrics_destroy(m);
}

static void model_hook(aff_metrics *m, metrics_scrape *scrape, void *ctx)
{
    (void)m, (void)ctx;
    metrics_scrape_model(scrape, "products", 3, 0.5, 2.25, 1000, true);
    metrics_scrape_model(scrape, "banners", 0, 0, 0, 0, false); /* never trained */
}

Test(metrics, reports_learned_models_per_collection)
{
    aff_metrics *m = NULL;
    aff_err err;
    cr_assert_eq(metrics_create(&m, "", &err), 0);
    metrics_set_scrape_hook(m, model_hook, NULL);
    char *text = NULL;
    cr_assert_eq(metrics_render(m, &text, NULL, &err), 0);
    assert_line(text, "affinity_model_version{collection=\"products\"} 3");
    assert_line(text, "affinity_model_version{collection=\"banners\"} 0");
    assert_line(text, "affinity_model_loss{collection=\"products\"} 0.5");
    assert_line(text, "affinity_model_train_seconds{collection=\"products\"} 2.25");
    assert_line(text, "affinity_model_events{collection=\"products\"} 1000");
    assert_line(text, "affinity_model_training{collection=\"products\"} 1");
    assert_line(text, "affinity_model_training{collection=\"banners\"} 0");
    cr_assert(!strstr(text, "affinity_model_loss{collection=\"banners\"}"),
              "no loss for a collection without a model");
    cr_assert(strstr(text, "# TYPE affinity_model_version gauge"), "%s", text);
    free(text);
    metrics_destroy(m);
}

/*
 * metrics.h: the server's Prometheus metrics and the HTTP endpoint that serves them.
 *
 * A fixed registry, known at compile time: request counters by method and gRPC code, latency
 * histograms by method, batch size and queue wait histograms, gauges, and a scrape hook the
 * server fills in for values it owns (items per collection, GPU memory). Updates are relaxed
 * atomic adds on preallocated slots, safe from any thread and free of locks and allocation;
 * every update function accepts m == NULL and then does nothing, so callers need no
 * "metrics enabled?" branches.
 *
 * metrics_create() with a listen address starts a libmicrohttpd daemon on its own thread:
 *   GET /metrics   the text exposition format 0.0.4 (text/plain; version=0.0.4)
 *   GET /healthz   200 "ok" while serving, 503 "draining" after metrics_set_serving(m, false)
 *   GET <prefix>/… the pages of metrics_set_http_handler (the web console, console.h)
 * Exposed names (units in the name, counters end in _total):
 *   affinity_build_info{version}                       gauge, 1
 *   affinity_backend_info{backend,device}              gauge, 1 (after metrics_set_backend)
 *   affinity_serving                                   gauge, 1 serving / 0 draining
 *   affinity_requests_total{method,code}               counter (series appear on first use)
 *   affinity_request_duration_seconds{method}          histogram (methods seen so far)
 *   affinity_batch_size                                histogram, queries per engine call
 *   affinity_queue_wait_seconds                        histogram, time queued per request
 *   affinity_queue_depth                               gauge, requests queued now
 *   affinity_events_ingested_total{type}               counter, every type always listed
 *   affinity_collection_items{collection}              gauge (from the scrape hook)
 *   affinity_recommendations_served_total, affinity_outcomes_total{...,outcome},
 *   affinity_outcome_revenue_total, affinity_outcomes_unattributed_total{collection,outcome},
 *   affinity_attribution_records, affinity_measurement_memory_bytes,
 *   affinity_experiments_running                       measurement (from the scrape hook)
 *   affinity_gpu_memory_used_bytes, _total_bytes       gauges (after metrics_set_gpu_memory)
 *   process_start_time_seconds                         gauge
 */
#ifndef AFFINITY_METRICS_H
#define AFFINITY_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "event_types.h"
#include "status.h"

typedef struct aff_metrics aff_metrics;

/* The affinity.v1.Affinity methods: X(enum suffix, method name as in the .proto). */
#define METRICS_METHOD_MAP(X)                                                                      \
    X(CREATE_COLLECTION, "CreateCollection")                                                       \
    X(DROP_COLLECTION, "DropCollection")                                                           \
    X(LIST_COLLECTIONS, "ListCollections")                                                         \
    X(DESCRIBE_COLLECTION, "DescribeCollection")                                                   \
    X(UPSERT_ITEMS, "UpsertItems")                                                                 \
    X(DELETE_ITEMS, "DeleteItems")                                                                 \
    X(GET_ITEMS, "GetItems")                                                                       \
    X(SEARCH, "Search")                                                                            \
    X(SIMILAR_ITEMS, "SimilarItems")                                                               \
    X(RECOMMEND, "Recommend")                                                                      \
    X(RERANK, "Rerank")                                                                            \
    X(BATCH_RECOMMEND, "BatchRecommend")                                                           \
    X(PUT_EVENTS, "PutEvents")                                                                     \
    X(GET_USER, "GetUser")                                                                         \
    X(DELETE_USER, "DeleteUser")                                                                   \
    X(IMPORT_EVENTS, "ImportEvents")                                                               \
    X(GET_SERVER_INFO, "GetServerInfo")                                                            \
    X(TRAIN, "Train")                                                                              \
    X(GET_MODEL, "GetModel")                                                                       \
    X(GET_SEGMENT, "GetSegment")                                                                   \
    X(GET_STATS, "GetStats")                                                                       \
    X(CREATE_EXPERIMENT, "CreateExperiment")                                                       \
    X(GET_EXPERIMENT, "GetExperiment")                                                             \
    X(LIST_EXPERIMENTS, "ListExperiments")                                                         \
    X(STOP_EXPERIMENT, "StopExperiment")

typedef enum metrics_method {
#define METRICS__METHOD_ENUM(name, str) METRICS_METHOD_##name,
    METRICS_METHOD_MAP(METRICS__METHOD_ENUM)
#undef METRICS__METHOD_ENUM
        METRICS_METHOD_COUNT
} metrics_method;

/* Event types, numbered as affinity.v1.EventType (so a proto value casts directly). */
typedef enum metrics_event_type {
#define METRICS__EVENT_ENUM(name, value, str, weight) METRICS_EVENT_##name = value,
    AFF_EVENT_TYPES(METRICS__EVENT_ENUM)
#undef METRICS__EVENT_ENUM
        METRICS_EVENT_CUSTOM = AFF_EVENT_CUSTOM,
#define METRICS__MEVENT_ENUM(name, value, str) METRICS_EVENT_##name = value,
    AFF_EVENT_MEASUREMENT_TYPES(METRICS__MEVENT_ENUM)
#undef METRICS__MEVENT_ENUM
} metrics_event_type;

/* Starts the registry and, when listen_addr is a non-empty "host:port" ("0.0.0.0:9090",
 * "127.0.0.1:0" for a free port, "[::]:9090", ":9090" for every address), the HTTP daemon.
 * NULL or "" makes a registry without an endpoint (metrics_render still works).
 * AFF_EINVAL for a malformed address, AFF_EIO when the port cannot be bound, AFF_ENOMEM. */
int metrics_create(aff_metrics **out, const char *listen_addr, aff_err *err);
/* Stops the HTTP daemon (waiting for a scrape in progress) and frees everything. NULL: no-op. */
void metrics_destroy(aff_metrics *m);
/* The bound TCP port, or 0 without an endpoint. */
uint16_t metrics_port(const aff_metrics *m);

/* ---- updates: any thread, lock-free, m == NULL is a no-op ---- */

/* One finished call: grpc_code is a grpc_status_code value (0..16; others count as
 * UNKNOWN), duration_ns the time from receiving the call to sending its status. */
void metrics_observe_request(aff_metrics *m, metrics_method method, int grpc_code,
                             uint64_t duration_ns);
/* One engine call that computed `queries` queries together. */
void metrics_observe_batch(aff_metrics *m, uint64_t queries);
/* One request's time in the batcher's queue (batcher_request.wait_ns). */
void metrics_observe_queue_wait(aff_metrics *m, uint64_t wait_ns);
void metrics_set_queue_depth(aff_metrics *m, int64_t depth);
void metrics_add_queue_depth(aff_metrics *m, int64_t delta);
/* n events of one type applied to profiles. Unknown types are ignored. */
void metrics_add_events(aff_metrics *m, metrics_event_type type, uint64_t n);
/* Device memory in bytes; the two gauges appear from the first call on. */
void metrics_set_gpu_memory(aff_metrics *m, uint64_t used_bytes, uint64_t total_bytes);
/* GPU backend device faults (backend_info.device_faults, tables_on_cpu): exported as
 * affinity_gpu_device_faults_total and affinity_gpu_tables_on_cpu once set; with faults > 0
 * /healthz still answers 200 but says "ok (degraded: ...)". Call from the scrape hook. */
void metrics_set_device_faults(aff_metrics *m, uint64_t faults, uint32_t tables_on_cpu);
/* Serving (true, the initial state) or draining: affinity_serving and /healthz follow it. */
void metrics_set_serving(aff_metrics *m, bool serving);
/* The backend in use, e.g. ("cuda", "NVIDIA H100 80GB HBM3") or ("faiss-cpu", "x86_64").
 * Strings are copied (truncated to 127 bytes). Takes a lock: call at start-up, not per call. */
void metrics_set_backend(aff_metrics *m, const char *backend, const char *device);

/* ---- scrape hook ---- */

typedef struct metrics_scrape metrics_scrape;
/* Called at the start of every scrape, on the scraping thread, never twice at once. It may
 * call the update functions (metrics_set_gpu_memory, metrics_set_queue_depth) and
 * metrics_scrape_collection. It must not call metrics_render or metrics_destroy. */
typedef void (*metrics_scrape_fn)(aff_metrics *m, metrics_scrape *scrape, void *ctx);
/* Installs (or with fn NULL removes) the hook; ctx is borrowed until replaced or destroy. */
void metrics_set_scrape_hook(aff_metrics *m, metrics_scrape_fn fn, void *ctx);
/* From inside the hook: one affinity_collection_items{collection="name"} sample. */
void metrics_scrape_collection(metrics_scrape *scrape, const char *collection, uint64_t items);
/* The collection's learned model (model.h): version (0: none), final loss, training seconds,
 * interactions learned from, and whether a job is running now. */
void metrics_scrape_model(metrics_scrape *scrape, const char *collection, uint64_t version,
                          double loss, double train_seconds, uint64_t events, bool training);

/* measurement (outcomes.h), from inside the hook: one series' totals since start as
 * affinity_recommendations_served_total, affinity_outcomes_total{...,outcome} and
 * affinity_outcome_revenue_total, labelled collection, surface, strategy, experiment, arm;
 * outcomes[] in the order impression, click, add_to_cart, purchase. */
typedef struct metrics_outcome_labels {
    const char *collection, *surface, *strategy, *experiment, *arm;
} metrics_outcome_labels;
void metrics_scrape_outcomes(metrics_scrape *scrape, const metrics_outcome_labels *labels,
                             uint64_t served, const uint64_t outcomes[4], double revenue);
/* affinity_outcomes_unattributed_total{collection,outcome}. */
void metrics_scrape_unattributed(metrics_scrape *scrape, const char *collection,
                                 const uint64_t outcomes[4]);
/* affinity_attribution_records, affinity_measurement_memory_bytes and
 * affinity_experiments_running gauges. */
void metrics_scrape_measurement(metrics_scrape *scrape, uint64_t records, uint64_t bytes,
                                uint64_t experiments_running);

/* ---- other pages on the endpoint (the web console) ---- */

/* One GET or HEAD request for a path under the handler's prefix. Borrowed for the call. */
typedef struct metrics_http_request {
    const char *path;          /* e.g. "/console/api/stats" (no query string) */
    const char *authorization; /* the Authorization header, or NULL */
    /* A query-string argument, decoded, or NULL when absent. */
    const char *(*arg)(const struct metrics_http_request *r, const char *name);
    void *conn; /* for arg */
} metrics_http_request;
/* The handler's answer: body (len bytes) is malloc'ed and freed after sending, unless
 * body_static (then it must live for the process). Every answer gets a Content-Security-Policy
 * that allows no resource from anywhere (inline script and style, fetches to this origin
 * only), nosniff, no-referrer and no-store. */
typedef struct metrics_http_response {
    unsigned status; /* HTTP status; preset to 404 */
    const char *content_type;
    char *body;
    size_t len;
    bool body_static;
} metrics_http_response;
/* Runs on the HTTP daemon's thread, one request at a time. */
typedef void (*metrics_http_fn)(void *ctx, const metrics_http_request *req,
                                metrics_http_response *resp);
/* Serves every path equal to prefix or under prefix + "/" with fn (NULL: none). ctx is
 * borrowed until replaced or destroy; replacing waits for a page in progress. */
void metrics_set_http_handler(aff_metrics *m, const char *prefix, metrics_http_fn fn, void *ctx);

/* ---- reading ---- */

/* Renders the exposition text (runs the hook). *out is NUL-terminated and malloc'd: the
 * caller frees it. 0 or AFF_ENOMEM. Thread-safe. */
int metrics_render(aff_metrics *m, char **out, size_t *len, aff_err *err);
/* Maps "Recommend" or "/affinity.v1.Affinity/Recommend" to its metrics_method; AFF_ENOTFOUND
 * otherwise. */
int metrics_method_from_name(const char *name, metrics_method *out);
/* "Recommend" for METRICS_METHOD_RECOMMEND; NULL when out of range. */
const char *metrics_method_name(metrics_method method);
/* The canonical name of a gRPC status code ("OK", "INVALID_ARGUMENT", ...); "UNKNOWN_CODE"
 * outside 0..16. */
const char *metrics_grpc_code_name(int code);

#endif

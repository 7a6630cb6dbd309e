/*
 * metrics.c: the Prometheus registry and its libmicrohttpd endpoint (see metrics.h).
 *
 * Every series lives in a preallocated slot of aff_metrics, so an update is one or two
 * relaxed atomic adds: no lock, no allocation, no lookup by string. Histograms keep
 * per-bucket (not cumulative) counts plus an integer sum in the observation's own unit
 * (nanoseconds or queries); the scrape loads each slot once, cumulates the buckets and
 * derives _count from them, so a scrape always shows _count equal to the +Inf bucket.
 * Two locks, both off the hot path: info_lock guards the backend strings and the hook
 * pointer; render_lock makes scrapes (and so hook calls) one at a time.
 */
#include "metrics.h"

#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

#define METRICS_GRPC_CODES   17
#define METRICS_GRPC_UNKNOWN 2
#define METRICS_EVENT_TYPES  AFF_EVENT_VALUE_LIMIT /* index = metrics_event_type; 0 unused */
#define METRICS_HIST_MAX     16
#define METRICS_INFO_LEN     128
#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

/* A histogram's fixed upper bounds, in the unit observations are given in, with the `le`
 * label text for each and the divisor that turns the integer sum into the metric's unit. */
typedef struct hist_spec {
    size_t n;
    uint64_t bounds[METRICS_HIST_MAX];
    const char *labels[METRICS_HIST_MAX];
    uint64_t unit; /* 1e9 for nanoseconds → seconds, 1 for plain counts */
} hist_spec;

static const hist_spec latency_spec = {
    16,
    {100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 25000000, 50000000, 100000000,
     250000000, 500000000, 1000000000, 2500000000, 5000000000, 10000000000},
    {"0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
     "0.25", "0.5", "1", "2.5", "5", "10"},
    1000000000,
};

static const hist_spec queue_wait_spec = {
    16,
    {10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 25000000,
     50000000, 100000000, 250000000, 500000000, 1000000000},
    {"1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01",
     "0.025", "0.05", "0.1", "0.25", "0.5", "1"},
    1000000000,
};

static const hist_spec batch_spec = {
    13,
    {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096},
    {"1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1024", "2048", "4096"},
    1,
};

typedef struct hist {
    _Atomic uint64_t buckets[METRICS_HIST_MAX + 1]; /* last: above every bound (+Inf) */
    _Atomic uint64_t sum;
} hist;

struct aff_metrics {
    _Atomic uint64_t requests[METRICS_METHOD_COUNT][METRICS_GRPC_CODES];
    hist latency[METRICS_METHOD_COUNT];
    hist batch_size;
    hist queue_wait;
    _Atomic int64_t queue_depth;
    _Atomic uint64_t events[METRICS_EVENT_TYPES];
    _Atomic uint64_t gpu_used;
    _Atomic uint64_t gpu_total;
    atomic_bool gpu_set;
    _Atomic uint64_t device_faults; /* GPU backend: calls that found the CUDA context lost */
    _Atomic uint32_t tables_on_cpu; /* GPU backend: tables handed to FAISS after a fault */
    atomic_bool faults_set;
    atomic_bool serving;
    double start_time; /* Unix seconds */

    pthread_mutex_t info_lock; /* backend, device, backend_set, hook, hook_ctx */
    char backend[METRICS_INFO_LEN];
    char device[METRICS_INFO_LEN];
    bool backend_set;
    metrics_scrape_fn hook;
    void *hook_ctx;
    /* pages under http_prefix (the web console); http_mu is held while the handler runs, so
     * removing the handler waits for a page in progress */
    pthread_mutex_t http_mu;
    char http_prefix[32];
    metrics_http_fn http_fn;
    void *http_ctx;
    pthread_mutex_t render_lock;

    struct MHD_Daemon *daemon;
    uint16_t port;
};

static const char *const method_names[METRICS_METHOD_COUNT] = {
#define METRICS__METHOD_NAME(name, str) str,
    METRICS_METHOD_MAP(METRICS__METHOD_NAME)
#undef METRICS__METHOD_NAME
};

static const char *const grpc_code_names[METRICS_GRPC_CODES] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *metrics_grpc_code_name(int code)
{
    return code >= 0 && code < METRICS_GRPC_CODES ? grpc_code_names[code] : "UNKNOWN_CODE";
}

static const char *const event_type_names[METRICS_EVENT_TYPES] = {
#define METRICS__EVENT_NAME(name, value, str, weight) [value] = str,
    AFF_EVENT_TYPES(METRICS__EVENT_NAME)
#undef METRICS__EVENT_NAME
        [AFF_EVENT_CUSTOM] = "custom",
#define METRICS__MEVENT_NAME(name, value, str) [value] = str,
    AFF_EVENT_MEASUREMENT_TYPES(METRICS__MEVENT_NAME)
#undef METRICS__MEVENT_NAME
};

/* ---- updates ---------------------------------------------------------------------------- */

static void hist_observe(hist *h, const hist_spec *spec, uint64_t value)
{
    size_t i = 0;
    while (i < spec->n && value > spec->bounds[i])
        i++;
    atomic_fetch_add_explicit(&h->buckets[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum, value, memory_order_relaxed);
}

void metrics_observe_request(aff_metrics *m, metrics_method method, int grpc_code,
                             uint64_t duration_ns)
{
    if (!m || (unsigned)method >= METRICS_METHOD_COUNT) return;
    if (grpc_code < 0 || grpc_code >= METRICS_GRPC_CODES) grpc_code = METRICS_GRPC_UNKNOWN;
    atomic_fetch_add_explicit(&m->requests[method][grpc_code], 1, memory_order_relaxed);
    hist_observe(&m->latency[method], &latency_spec, duration_ns);
}

void metrics_observe_batch(aff_metrics *m, uint64_t queries)
{
    if (m) hist_observe(&m->batch_size, &batch_spec, queries);
}

void metrics_observe_queue_wait(aff_metrics *m, uint64_t wait_ns)
{
    if (m) hist_observe(&m->queue_wait, &queue_wait_spec, wait_ns);
}

void metrics_set_queue_depth(aff_metrics *m, int64_t depth)
{
    if (m) atomic_store_explicit(&m->queue_depth, depth, memory_order_relaxed);
}

void metrics_add_queue_depth(aff_metrics *m, int64_t delta)
{
    if (m) atomic_fetch_add_explicit(&m->queue_depth, delta, memory_order_relaxed);
}

void metrics_add_events(aff_metrics *m, metrics_event_type type, uint64_t n)
{
    if (!m || type < METRICS_EVENT_VIEW || (int)type >= METRICS_EVENT_TYPES) return;
    atomic_fetch_add_explicit(&m->events[type], n, memory_order_relaxed);
}

void metrics_set_gpu_memory(aff_metrics *m, uint64_t used_bytes, uint64_t total_bytes)
{
    if (!m) return;
    atomic_store_explicit(&m->gpu_used, used_bytes, memory_order_relaxed);
    atomic_store_explicit(&m->gpu_total, total_bytes, memory_order_relaxed);
    atomic_store_explicit(&m->gpu_set, true, memory_order_release);
}

void metrics_set_device_faults(aff_metrics *m, uint64_t faults, uint32_t tables_on_cpu)
{
    if (!m) return;
    atomic_store_explicit(&m->device_faults, faults, memory_order_relaxed);
    atomic_store_explicit(&m->tables_on_cpu, tables_on_cpu, memory_order_relaxed);
    atomic_store_explicit(&m->faults_set, true, memory_order_release);
}

void metrics_set_serving(aff_metrics *m, bool serving)
{
    if (m) atomic_store_explicit(&m->serving, serving, memory_order_relaxed);
}

void metrics_set_backend(aff_metrics *m, const char *backend, const char *device)
{
    if (!m) return;
    pthread_mutex_lock(&m->info_lock);
    snprintf(m->backend, sizeof m->backend, "%s", backend ? backend : "");
    snprintf(m->device, sizeof m->device, "%s", device ? device : "");
    m->backend_set = true;
    pthread_mutex_unlock(&m->info_lock);
}

void metrics_set_http_handler(aff_metrics *m, const char *prefix, metrics_http_fn fn, void *ctx)
{
    if (!m) return;
    pthread_mutex_lock(&m->http_mu);
    snprintf(m->http_prefix, sizeof m->http_prefix, "%s", fn && prefix ? prefix : "");
    m->http_fn = fn;
    m->http_ctx = fn ? ctx : NULL;
    pthread_mutex_unlock(&m->http_mu);
}

void metrics_set_scrape_hook(aff_metrics *m, metrics_scrape_fn fn, void *ctx)
{
    if (!m) return;
    pthread_mutex_lock(&m->info_lock);
    m->hook = fn;
    m->hook_ctx = fn ? ctx : NULL;
    pthread_mutex_unlock(&m->info_lock);
}

const char *metrics_method_name(metrics_method method)
{
    if ((unsigned)method >= METRICS_METHOD_COUNT) return NULL;
    return method_names[method];
}

int metrics_method_from_name(const char *name, metrics_method *out)
{
    static const char prefix[] = "/affinity.v1.Affinity/";
    if (!name) return AFF_ENOTFOUND;
    if (strncmp(name, prefix, sizeof prefix - 1) == 0) name += sizeof prefix - 1;
    for (int i = 0; i < METRICS_METHOD_COUNT; i++) {
        if (strcmp(name, method_names[i]) == 0) {
            *out = (metrics_method)i;
            return AFF_OK;
        }
    }
    return AFF_ENOTFOUND;
}

/* ---- rendering -------------------------------------------------------------------------- */

/* A growing text buffer; after an allocation failure it drops further text and remembers. */
typedef struct sbuf {
    char *p;
    size_t len;
    size_t cap;
    bool oom;
} sbuf;

struct metrics_scrape {
    sbuf lines; /* affinity_collection_items samples */
    /* per-collection model samples, one buffer per metric (Prometheus wants each metric's
     * samples together under its header) */
    sbuf model_version, model_loss, model_seconds, model_events, model_training;
    /* measurement (outcomes.h): totals per series, unattributed events, gauges */
    sbuf served, outcomes, revenue, unattributed, measure_gauges;
};

static void sb_vprintf(sbuf *b, const char *fmt, va_list ap)
{
    if (b->oom) return;
    for (;;) {
        size_t room = b->cap - b->len;
        va_list aq;
        va_copy(aq, ap);
        int n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, aq);
        va_end(aq);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap : 4096;
        while (cap - b->len <= (size_t)n)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

__attribute__((format(printf, 2, 3))) static void sb_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    sb_vprintf(b, fmt, ap);
    va_end(ap);
}

/* A label value with \, " and newline escaped as the exposition format requires. */
static void sb_label_value(sbuf *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            sb_printf(b, "\\\\");
        else if (*s == '"')
            sb_printf(b, "\\\"");
        else if (*s == '\n')
            sb_printf(b, "\\n");
        else
            sb_printf(b, "%c", *s);
    }
}

static void sb_header(sbuf *b, const char *name, const char *type, const char *help)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* value / unit as the shortest exact decimal: 23000000 / 1e9 → "0.023". */
static void sb_scaled(sbuf *b, uint64_t value, uint64_t unit)
{
    if (unit == 1) {
        sb_printf(b, "%" PRIu64, value);
        return;
    }
    uint64_t whole = value / unit, frac = value % unit;
    int digits = 0;
    for (uint64_t u = unit; u > 1; u /= 10)
        digits++;
    if (frac == 0) {
        sb_printf(b, "%" PRIu64, whole);
        return;
    }
    while (frac % 10 == 0) {
        frac /= 10;
        digits--;
    }
    sb_printf(b, "%" PRIu64 ".%0*" PRIu64, whole, digits, frac);
}

/* One histogram's samples; label is "" or `name="value",` ready to precede le. */
static void render_hist(sbuf *b, const char *name, const char *label, const hist *h,
                        const hist_spec *spec)
{
    uint64_t cumulative = 0;
    for (size_t i = 0; i <= spec->n; i++) {
        cumulative += atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
        sb_printf(b, "%s_bucket{%sle=\"%s\"} %" PRIu64 "\n", name, label,
                  i < spec->n ? spec->labels[i] : "+Inf", cumulative);
    }
    size_t label_len = strlen(label);
    /* The label text minus its trailing comma, for _sum and _count. */
    if (label_len > 0)
        sb_printf(b, "%s_sum{%.*s} ", name, (int)(label_len - 1), label);
    else
        sb_printf(b, "%s_sum ", name);
    sb_scaled(b, atomic_load_explicit(&h->sum, memory_order_relaxed), spec->unit);
    if (label_len > 0)
        sb_printf(b, "\n%s_count{%.*s} %" PRIu64 "\n", name, (int)(label_len - 1), label,
                  cumulative);
    else
        sb_printf(b, "\n%s_count %" PRIu64 "\n", name, cumulative);
}

static uint64_t hist_total(const hist *h, const hist_spec *spec)
{
    uint64_t n = 0;
    for (size_t i = 0; i <= spec->n; i++)
        n += atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
    return n;
}

static void model_sample(sbuf *b, const char *collection, const char *fmt, double v)
{
    sb_printf(b, "%s{collection=\"", "");
    sb_label_value(b, collection);
    sb_printf(b, fmt, v);
}

void metrics_scrape_model(metrics_scrape *scrape, const char *collection, uint64_t version,
                          double loss, double train_seconds, uint64_t events, bool training)
{
    if (!scrape || !collection) return;
    static const char *const names[5] = {"affinity_model_version", "affinity_model_loss",
                                         "affinity_model_train_seconds", "affinity_model_events",
                                         "affinity_model_training"};
    sbuf *bufs[5] = {&scrape->model_version, &scrape->model_loss, &scrape->model_seconds,
                     &scrape->model_events, &scrape->model_training};
    const double vals[5] = {(double)version, loss, train_seconds, (double)events, training};
    for (int i = 0; i < 5; i++) {
        if (i > 0 && i < 4 && !version) continue; /* no model: only version 0 and training */
        sb_printf(bufs[i], "%s", names[i]);
        model_sample(bufs[i], collection, "\"} %.17g\n", vals[i]);
    }
}

/* The outcome kinds (outcomes.h order) by their event types' names. */
static const metrics_event_type outcome_types[4] = {METRICS_EVENT_IMPRESSION, METRICS_EVENT_CLICK,
                                                    METRICS_EVENT_ADD_TO_CART,
                                                    METRICS_EVENT_PURCHASE};
static const char *outcome_name(int k)
{
    return event_type_names[outcome_types[k]];
}

/* {collection="..",surface="..",strategy="..",experiment="..",arm=".." (no closing brace) */
static void outcome_labels(sbuf *b, const char *name, const metrics_outcome_labels *l)
{
    const char *keys[5] = {"collection", "surface", "strategy", "experiment", "arm"};
    const char *vals[5] = {l->collection, l->surface, l->strategy, l->experiment, l->arm};
    sb_printf(b, "%s{", name);
    for (int i = 0; i < 5; i++) {
        sb_printf(b, "%s%s=\"", i ? "," : "", keys[i]);
        sb_label_value(b, vals[i] ? vals[i] : "");
        sb_printf(b, "\"");
    }
}

void metrics_scrape_outcomes(metrics_scrape *scrape, const metrics_outcome_labels *l,
                             uint64_t served, const uint64_t outcomes[4], double revenue)
{
    if (!scrape || !l) return;
    outcome_labels(&scrape->served, "affinity_recommendations_served_total", l);
    sb_printf(&scrape->served, "} %" PRIu64 "\n", served);
    for (int k = 0; k < 4; k++) {
        outcome_labels(&scrape->outcomes, "affinity_outcomes_total", l);
        sb_printf(&scrape->outcomes, ",outcome=\"%s\"} %" PRIu64 "\n", outcome_name(k),
                  outcomes[k]);
    }
    outcome_labels(&scrape->revenue, "affinity_outcome_revenue_total", l);
    sb_printf(&scrape->revenue, "} %.17g\n", revenue);
}

void metrics_scrape_unattributed(metrics_scrape *scrape, const char *collection,
                                 const uint64_t outcomes[4])
{
    if (!scrape || !collection) return;
    for (int k = 0; k < 4; k++) {
        sb_printf(&scrape->unattributed, "affinity_outcomes_unattributed_total{collection=\"");
        sb_label_value(&scrape->unattributed, collection);
        sb_printf(&scrape->unattributed, "\",outcome=\"%s\"} %" PRIu64 "\n", outcome_name(k),
                  outcomes[k]);
    }
}

void metrics_scrape_measurement(metrics_scrape *scrape, uint64_t records, uint64_t bytes,
                                uint64_t experiments_running)
{
    if (!scrape) return;
    sbuf *b = &scrape->measure_gauges;
    sb_header(b, "affinity_attribution_records", "gauge",
              "Recommendations remembered for attribution.");
    sb_printf(b, "affinity_attribution_records %" PRIu64 "\n", records);
    sb_header(b, "affinity_measurement_memory_bytes", "gauge",
              "Bytes held by attribution records and outcome series.");
    sb_printf(b, "affinity_measurement_memory_bytes %" PRIu64 "\n", bytes);
    sb_header(b, "affinity_experiments_running", "gauge", "Experiments running now.");
    sb_printf(b, "affinity_experiments_running %" PRIu64 "\n", experiments_running);
}

void metrics_scrape_collection(metrics_scrape *scrape, const char *collection, uint64_t items)
{
    if (!scrape || !collection) return;
    sb_printf(&scrape->lines, "affinity_collection_items{collection=\"");
    sb_label_value(&scrape->lines, collection);
    sb_printf(&scrape->lines, "\"} %" PRIu64 "\n", items);
}

static void render_all(aff_metrics *m, sbuf *b, const sbuf *collections,
                       const metrics_scrape *scrape)
{
    char backend[METRICS_INFO_LEN], device[METRICS_INFO_LEN];
    bool backend_set;
    pthread_mutex_lock(&m->info_lock);
    backend_set = m->backend_set;
    memcpy(backend, m->backend, sizeof backend);
    memcpy(device, m->device, sizeof device);
    pthread_mutex_unlock(&m->info_lock);

    sb_header(b, "affinity_build_info", "gauge", "Affinity build, as a constant 1.");
    sb_printf(b, "affinity_build_info{version=\"");
    sb_label_value(b, aff_version());
    sb_printf(b, "\"} 1\n");

    sb_header(b, "affinity_backend_info", "gauge", "Scoring backend and device in use.");
    if (backend_set) {
        sb_printf(b, "affinity_backend_info{backend=\"");
        sb_label_value(b, backend);
        sb_printf(b, "\",device=\"");
        sb_label_value(b, device);
        sb_printf(b, "\"} 1\n");
    }

    sb_header(b, "affinity_serving", "gauge", "1 while serving, 0 while draining for shutdown.");
    sb_printf(b, "affinity_serving %d\n",
              atomic_load_explicit(&m->serving, memory_order_relaxed) ? 1 : 0);

    sb_header(b, "affinity_requests_total", "counter",
              "gRPC calls handled, by method and status code.");
    for (int i = 0; i < METRICS_METHOD_COUNT; i++) {
        for (int c = 0; c < METRICS_GRPC_CODES; c++) {
            uint64_t n = atomic_load_explicit(&m->requests[i][c], memory_order_relaxed);
            if (n)
                sb_printf(b, "affinity_requests_total{method=\"%s\",code=\"%s\"} %" PRIu64 "\n",
                          method_names[i], grpc_code_names[c], n);
        }
    }

    sb_header(b, "affinity_request_duration_seconds", "histogram",
              "Time from receiving a call to sending its status, by method.");
    for (int i = 0; i < METRICS_METHOD_COUNT; i++) {
        if (hist_total(&m->latency[i], &latency_spec) == 0) continue;
        char label[64];
        snprintf(label, sizeof label, "method=\"%s\",", method_names[i]);
        render_hist(b, "affinity_request_duration_seconds", label, &m->latency[i], &latency_spec);
    }

    sb_header(b, "affinity_batch_size", "histogram",
              "Queries computed together in one engine call.");
    render_hist(b, "affinity_batch_size", "", &m->batch_size, &batch_spec);

    sb_header(b, "affinity_queue_wait_seconds", "histogram",
              "Time a request waited in the batcher's queue.");
    render_hist(b, "affinity_queue_wait_seconds", "", &m->queue_wait, &queue_wait_spec);

    sb_header(b, "affinity_queue_depth", "gauge", "Requests waiting in the batcher's queues.");
    sb_printf(b, "affinity_queue_depth %" PRId64 "\n",
              atomic_load_explicit(&m->queue_depth, memory_order_relaxed));

    sb_header(b, "affinity_events_ingested_total", "counter",
              "Behaviour events applied to user profiles, by type.");
    for (int t = METRICS_EVENT_VIEW; t < METRICS_EVENT_TYPES; t++)
        sb_printf(b, "affinity_events_ingested_total{type=\"%s\"} %" PRIu64 "\n",
                  event_type_names[t], atomic_load_explicit(&m->events[t], memory_order_relaxed));

    sb_header(b, "affinity_collection_items", "gauge", "Items stored in each collection.");
    if (collections->len) sb_printf(b, "%.*s", (int)collections->len, collections->p);
    if (scrape) {
        static const struct {
            const char *name, *type, *help;
            size_t off;
        } model_metrics[] = {
            {"affinity_model_version", "gauge", "Version of the learned model serving the collection.",
             offsetof(metrics_scrape, model_version)},
            {"affinity_model_loss", "gauge", "Final training objective / interactions of that model.",
             offsetof(metrics_scrape, model_loss)},
            {"affinity_model_train_seconds", "gauge", "How long that model took to train.",
             offsetof(metrics_scrape, model_seconds)},
            {"affinity_model_events", "gauge", "(user, item) interactions that model learned from.",
             offsetof(metrics_scrape, model_events)},
            {"affinity_model_training", "gauge", "1 while a training job runs on the collection.",
             offsetof(metrics_scrape, model_training)},
        };
        for (size_t i = 0; i < sizeof model_metrics / sizeof model_metrics[0]; i++) {
            const sbuf *mb = (const sbuf *)((const char *)scrape + model_metrics[i].off);
            if (!mb->len) continue;
            sb_header(b, model_metrics[i].name, model_metrics[i].type, model_metrics[i].help);
            sb_printf(b, "%.*s", (int)mb->len, mb->p);
        }
        static const struct {
            const char *name, *help;
            size_t off;
        } outcome_metrics[] = {
            {"affinity_recommendations_served_total",
             "Recommendations answered, by collection, surface, strategy, experiment and arm.",
             offsetof(metrics_scrape, served)},
            {"affinity_outcomes_total",
             "Attributed impressions, clicks, add-to-carts and purchases, by series and outcome.",
             offsetof(metrics_scrape, outcomes)},
            {"affinity_outcome_revenue_total", "Revenue of attributed purchases, by series.",
             offsetof(metrics_scrape, revenue)},
            {"affinity_outcomes_unattributed_total",
             "Outcome events whose recommendation_id could not be attributed.",
             offsetof(metrics_scrape, unattributed)},
        };
        for (size_t i = 0; i < sizeof outcome_metrics / sizeof outcome_metrics[0]; i++) {
            const sbuf *mb = (const sbuf *)((const char *)scrape + outcome_metrics[i].off);
            if (!mb->len) continue;
            sb_header(b, outcome_metrics[i].name, "counter", outcome_metrics[i].help);
            sb_printf(b, "%.*s", (int)mb->len, mb->p);
        }
        if (scrape->measure_gauges.len)
            sb_printf(b, "%.*s", (int)scrape->measure_gauges.len, scrape->measure_gauges.p);
    }

    if (atomic_load_explicit(&m->gpu_set, memory_order_acquire)) {
        sb_header(b, "affinity_gpu_memory_used_bytes", "gauge", "Device memory in use.");
        sb_printf(b, "affinity_gpu_memory_used_bytes %" PRIu64 "\n",
                  atomic_load_explicit(&m->gpu_used, memory_order_relaxed));
        sb_header(b, "affinity_gpu_memory_total_bytes", "gauge", "Device memory in total.");
        sb_printf(b, "affinity_gpu_memory_total_bytes %" PRIu64 "\n",
                  atomic_load_explicit(&m->gpu_total, memory_order_relaxed));
    }
    if (atomic_load_explicit(&m->faults_set, memory_order_acquire)) {
        sb_header(b, "affinity_gpu_device_faults_total", "counter",
                  "GPU calls that found the CUDA context lost (a sticky device fault).");
        sb_printf(b, "affinity_gpu_device_faults_total %" PRIu64 "\n",
                  atomic_load_explicit(&m->device_faults, memory_order_relaxed));
        sb_header(b, "affinity_gpu_tables_on_cpu", "gauge",
                  "Collections served by FAISS on the CPU after a GPU device fault.");
        sb_printf(b, "affinity_gpu_tables_on_cpu %" PRIu32 "\n",
                  atomic_load_explicit(&m->tables_on_cpu, memory_order_relaxed));
    }

    sb_header(b, "process_start_time_seconds", "gauge",
              "Start time of the process since the Unix epoch in seconds.");
    sb_printf(b, "process_start_time_seconds %.3f\n", m->start_time);
}

static void scrape_free(metrics_scrape *s)
{
    free(s->lines.p);
    free(s->model_version.p);
    free(s->model_loss.p);
    free(s->model_seconds.p);
    free(s->model_events.p);
    free(s->model_training.p);
    free(s->served.p);
    free(s->outcomes.p);
    free(s->revenue.p);
    free(s->unattributed.p);
    free(s->measure_gauges.p);
}

int metrics_render(aff_metrics *m, char **out, size_t *len, aff_err *err)
{
    sbuf b = {0};
    metrics_scrape scrape;
    memset(&scrape, 0, sizeof scrape);
    int rc = AFF_OK;

    pthread_mutex_lock(&m->render_lock);
    pthread_mutex_lock(&m->info_lock);
    metrics_scrape_fn hook = m->hook;
    void *hook_ctx = m->hook_ctx;
    pthread_mutex_unlock(&m->info_lock);
    if (hook) hook(m, &scrape, hook_ctx);
    render_all(m, &b, &scrape.lines, &scrape);
    pthread_mutex_unlock(&m->render_lock);

    if (b.oom || scrape.lines.oom || !b.p) {
        rc = aff__fail(err, AFF_ENOMEM, "metrics: out of memory rendering the exposition");
        free(b.p);
        goto out;
    }
    *out = b.p;
    if (len) *len = b.len;
out:
    scrape_free(&scrape);
    return rc;
}

/* ---- HTTP endpoint ---------------------------------------------------------------------- */

/* Runs the scrape hook for its updates alone (what /healthz reports comes from it too). */
static void refresh(aff_metrics *m)
{
    metrics_scrape scrape;
    memset(&scrape, 0, sizeof scrape);
    pthread_mutex_lock(&m->render_lock);
    pthread_mutex_lock(&m->info_lock);
    metrics_scrape_fn hook = m->hook;
    void *hook_ctx = m->hook_ctx;
    pthread_mutex_unlock(&m->info_lock);
    if (hook) hook(m, &scrape, hook_ctx);
    pthread_mutex_unlock(&m->render_lock);
    scrape_free(&scrape);
}

static enum MHD_Result send_text(struct MHD_Connection *c, unsigned status, const char *text)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static const char *http_arg(const metrics_http_request *r, const char *name)
{
    return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name);
}

/* A page of the registered handler: read-only, never cached, nothing from elsewhere. */
static enum MHD_Result serve_handler(struct MHD_Connection *c, const char *url, metrics_http_fn fn,
                                     void *ctx)
{
    metrics_http_request req = {.path = url,
                                .authorization = MHD_lookup_connection_value(
                                    c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION),
                                .arg = http_arg,
                                .conn = c};
    metrics_http_response resp = {.status = MHD_HTTP_NOT_FOUND};
    fn(ctx, &req, &resp);
    struct MHD_Response *r;
    if (resp.body_static)
        r = MHD_create_response_from_buffer(resp.len, resp.body, MHD_RESPMEM_PERSISTENT);
    else
        r = MHD_create_response_from_buffer(resp.len, resp.body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        if (!resp.body_static) free(resp.body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE,
                            resp.content_type ? resp.content_type : "text/plain; charset=utf-8");
    MHD_add_response_header(r, "Content-Security-Policy",
                            "default-src 'none'; script-src 'unsafe-inline'; style-src "
                            "'unsafe-inline'; connect-src 'self'; img-src data:; "
                            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (resp.status == MHD_HTTP_UNAUTHORIZED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    enum MHD_Result ret = MHD_queue_response(c, resp.status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result handle_request(void *cls, struct MHD_Connection *c, const char *url,
                                      const char *method, const char *version,
                                      const char *upload_data, size_t *upload_data_size,
                                      void **con_cls)
{
    aff_metrics *m = cls;
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return send_text(c, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    if (strcmp(url, "/healthz") == 0) {
        refresh(m);
        if (atomic_load_explicit(&m->serving, memory_order_relaxed) &&
            atomic_load_explicit(&m->device_faults, memory_order_relaxed) > 0)
            return send_text(c, MHD_HTTP_OK,
                             "ok (degraded: a GPU device fault moved the collections to FAISS on "
                             "the CPU; see affinity_gpu_device_faults_total)\n");
        if (atomic_load_explicit(&m->serving, memory_order_relaxed))
            return send_text(c, MHD_HTTP_OK, "ok\n");
        return send_text(c, MHD_HTTP_SERVICE_UNAVAILABLE, "draining\n");
    }
    pthread_mutex_lock(&m->http_mu);
    size_t plen = strlen(m->http_prefix);
    if (m->http_fn && plen && strncmp(url, m->http_prefix, plen) == 0 &&
        (url[plen] == '\0' || url[plen] == '/')) {
        enum MHD_Result ret = serve_handler(c, url, m->http_fn, m->http_ctx);
        pthread_mutex_unlock(&m->http_mu);
        return ret;
    }
    pthread_mutex_unlock(&m->http_mu);
    if (strcmp(url, "/metrics") != 0)
        return send_text(c, MHD_HTTP_NOT_FOUND, "not found: try /metrics or /healthz\n");

    char *text = NULL;
    size_t len = 0;
    aff_err err;
    if (metrics_render(m, &text, &len, &err) != AFF_OK)
        return send_text(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory\n");
    struct MHD_Response *r = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, METRICS_CONTENT_TYPE);
    enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

static void log_mhd(void *cls, const char *fmt, va_list ap)
{
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    aff_log(AFF_LOG_WARN, "metrics http: %s", line);
}

/* Splits "host:port", "[v6]:port" or ":port" into host ("" = every address) and port. */
static int split_listen(const char *addr, char *host, size_t host_cap, char *port, size_t port_cap,
                        aff_err *err)
{
    const char *colon;
    size_t host_len;
    if (addr[0] == '[') {
        const char *close = strchr(addr, ']');
        if (!close || close[1] != ':') goto bad;
        host_len = (size_t)(close - addr - 1);
        if (host_len >= host_cap) goto bad;
        memcpy(host, addr + 1, host_len);
        colon = close + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon) goto bad;
        host_len = (size_t)(colon - addr);
        if (host_len >= host_cap || memchr(addr, ':', host_len)) goto bad;
        memcpy(host, addr, host_len);
    }
    host[host_len] = '\0';
    const char *p = colon + 1;
    size_t plen = strlen(p);
    if (plen == 0 || plen > 5 || plen >= port_cap || strspn(p, "0123456789") != plen ||
        atoi(p) > 65535)
        goto bad;
    memcpy(port, p, plen + 1);
    return AFF_OK;
bad:
    return aff__fail(err, AFF_EINVAL,
                     "metrics listen address \"%s\": want host:port, [ipv6]:port or :port "
                     "with a port of 0..65535",
                     addr);
}

/* A bound, listening TCP socket for addr; *port_out is the port it got. */
static int open_listener(const char *addr, int *fd_out, uint16_t *port_out, aff_err *err)
{
    char host[256], port[8];
    struct addrinfo hints = {0}, *res = NULL;
    int fd = -1, rc = split_listen(addr, host, sizeof host, port, sizeof port, err);
    if (rc) return rc;

    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (gai != 0) {
        rc = aff__fail(err, AFF_EINVAL, "metrics listen address \"%s\": %s", addr,
                       gai_strerror(gai));
        goto out;
    }
    int last_errno = 0;
    /* With no host, prefer the IPv6 wildcard with IPV6_V6ONLY off: it takes IPv4 too. */
    for (int pass = 0; pass < 2 && fd < 0; pass++) {
        for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
            if ((pass == 0) != (!host[0] && ai->ai_family == AF_INET6)) continue;
            fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
            if (fd < 0) {
                last_errno = errno;
                continue;
            }
            int one = 1, zero = 0;
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
            if (ai->ai_family == AF_INET6 && !host[0])
                setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
            if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 64) != 0) {
                last_errno = errno;
                close(fd);
                fd = -1;
            }
        }
    }
    if (fd < 0) {
        rc = aff__fail(err, AFF_EIO, "metrics: cannot listen on %s: %s", addr,
                       strerror(last_errno ? last_errno : EADDRNOTAVAIL));
        goto out;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        rc = aff__fail(err, AFF_EIO, "metrics: getsockname: %s", strerror(errno));
        close(fd);
        goto out;
    }
    *port_out = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                         : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    *fd_out = fd;
out:
    if (res) freeaddrinfo(res);
    return rc;
}

int metrics_create(aff_metrics **out, const char *listen_addr, aff_err *err)
{
    int rc = AFF_OK, fd = -1;
    aff_metrics *m = calloc(1, sizeof *m);
    *out = NULL;
    if (!m) return aff__fail(err, AFF_ENOMEM, "metrics: out of memory");
    pthread_mutex_init(&m->info_lock, NULL);
    pthread_mutex_init(&m->render_lock, NULL);
    pthread_mutex_init(&m->http_mu, NULL);
    atomic_store(&m->serving, true);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    m->start_time = (double)now.tv_sec + (double)(now.tv_nsec / 1000000) / 1e3;

    if (listen_addr && listen_addr[0]) {
        rc = open_listener(listen_addr, &fd, &m->port, err);
        if (rc) goto out;
        /* epoll (or poll) on an internal thread: select() would fail once gRPC connections
         * push descriptor numbers past FD_SETSIZE. */
        m->daemon = MHD_start_daemon(
            MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL, handle_request, m,
            MHD_OPTION_EXTERNAL_LOGGER, log_mhd, NULL, MHD_OPTION_LISTEN_SOCKET, fd,
            MHD_OPTION_CONNECTION_LIMIT, (unsigned int)64, MHD_OPTION_CONNECTION_TIMEOUT,
            (unsigned int)10, MHD_OPTION_END);
        if (!m->daemon) {
            rc =
                aff__fail(err, AFF_EIO, "metrics: cannot start the HTTP daemon on %s", listen_addr);
            goto out;
        }
        fd = -1; /* the daemon owns it now and closes it when stopped */
        char port[8];
        snprintf(port, sizeof port, "%u", (unsigned)m->port);
        aff_log_kv(AFF_LOG_INFO, "metrics listening", "address", listen_addr, "port", port, NULL);
    }
    *out = m;
out:
    if (fd >= 0) close(fd);
    if (rc) {
        metrics_destroy(m);
    }
    return rc;
}

void metrics_destroy(aff_metrics *m)
{
    if (!m) return;
    if (m->daemon) MHD_stop_daemon(m->daemon);
    pthread_mutex_destroy(&m->render_lock);
    pthread_mutex_destroy(&m->info_lock);
    pthread_mutex_destroy(&m->http_mu);
    free(m);
}

uint16_t metrics_port(const aff_metrics *m)
{
    return m ? m->port : 0;
}

/*
 * config.c: owns the table of flags (name, environment variable, type, range, help) and
 * their parsing and validation. Rules kept: one table drives parsing, --help and the
 * start-up log, so a flag cannot be documented and parsed differently; no global state.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_score.h"
#include "event_types.h"

typedef enum opt_type {
    OPT_STRING, /* char[size] */
    OPT_U32,    /* uint32_t within [min, max] */
    OPT_INT,    /* int within [min, max] */
    OPT_BOOL,   /* bool; a flag without value means true */
    OPT_BACKEND,
    OPT_LOG_LEVEL,
    OPT_EVENT_WEIGHTS, /* config_event_weights, from "name=weight,..." */
    OPT_HOURS,         /* double hours within (0, max] */
    OPT_ACTION,        /* --help, --version: bool, never from the environment */
    OPT_PRECISION,     /* backend_precision: auto, fp32, bf16, int8 */
} opt_type;

typedef struct opt_def {
    const char *name; /* without the leading "--" */
    opt_type type;
    size_t offset;
    size_t size; /* OPT_STRING: buffer size */
    long long min, max;
    const char *def; /* default, as text, for --help */
    const char *help;
    bool secret_path; /* log "set"/"unset" rather than the value */
} opt_def;

#define STR(field, ...)                                                                            \
    .type = OPT_STRING, .offset = offsetof(aff_config, field),                                     \
    .size = sizeof(((aff_config *)0)->field)
#define U32(field, lo, hi)                                                                         \
    .type = OPT_U32, .offset = offsetof(aff_config, field), .min = lo, .max = hi
#define INT(field, lo, hi)                                                                         \
    .type = OPT_INT, .offset = offsetof(aff_config, field), .min = lo, .max = hi
#define BOOL(field)      .type = OPT_BOOL, .offset = offsetof(aff_config, field)
#define HOURS(field, hi) .type = OPT_HOURS, .offset = offsetof(aff_config, field), .max = hi

static const opt_def opts[] = {
    {"listen", STR(listen), .def = "0.0.0.0:50051",
     .help = "address to serve gRPC on, host:port (port 0: any free port; see --port-file)"},
    {"threads", U32(threads, 1, 64), .def = "2", .help = "gRPC completion-queue threads, 1..64"},
    {"backend", .type = OPT_BACKEND, .offset = offsetof(aff_config, backend), .def = "auto",
     .help = "scoring backend: auto (GPU when usable, else CPU), gpu (or fail), cpu (FAISS), "
             "noop (no scoring: the transport-ceiling benchmark baseline)"},
    {"max-batch", U32(max_batch, 1, 65536), .def = "256",
     .help = "most queries packed into one engine call, 1..65536 (1 turns batching off)"},
    {"max-wait-us", U32(max_wait_us, 0, 1000000), .def = "2000",
     .help = "with --batch-workers > 1: how long a partial batch waits beside a running one, "
             "0..1000000 microseconds"},
    {"queue-limit", U32(queue_limit, 1, 1000000), .def = "4096",
     .help = "calls waiting per collection before new ones get RESOURCE_EXHAUSTED, 1..1000000"},
    {"batch-workers", U32(batch_workers, 1, 64), .def = "1",
     .help = "engine calls that may run at once, 1..64"},
    {"max-message-bytes", U32(max_message_bytes, 1024, 1073741824), .def = "67108864",
     .help = "largest gRPC message received or sent, 1024..1073741824 bytes; larger ones get "
             "RESOURCE_EXHAUSTED"},
    {"tls-cert", STR(tls_cert), .def = "",
     .help = "PEM certificate chain file; with --tls-key serves TLS instead of plaintext"},
    {"tls-key", STR(tls_key), .def = "", .help = "PEM private key file for --tls-cert"},
    {"token-file", STR(token_file), .def = "", .secret_path = true,
     .help = "file holding a bearer token; every call but health must send "
             "\"authorization: Bearer <token>\""},
    {"data-dir", STR(data_dir), .def = "",
     .help = "directory for durable storage (collections, items, users); empty: in memory"},
    {"metrics-listen", STR(metrics_listen), .def = "",
     .help = "host:port for the Prometheus metrics endpoint; empty: off"},
    {"port-file", STR(port_file), .def = "",
     .help = "write the bound gRPC port to this file once listening (for --listen ...:0)"},
    {"demo", BOOL(demo), .def = "false",
     .help = "load the built-in demo shop (100,000 products, categories, banners, offers)"},
    {"log-level", .type = OPT_LOG_LEVEL, .offset = offsetof(aff_config, log_level), .def = "info",
     .help = "debug, info, warn, error or off"},
    {"grace-seconds", U32(grace_seconds, 0, 3600), .def = "10",
     .help = "after SIGTERM/SIGINT, how long in-flight calls may still finish, 0..3600"},
    {"drain-notice-ms", U32(drain_notice_ms, 0, 600000), .def = "0",
     .help = "after SIGTERM/SIGINT, keep listening this long with health NOT_SERVING and new "
             "calls answered UNAVAILABLE before closing the port, 0..600000 (part of the grace "
             "period)"},
    {"gpu-device", INT(gpu_device, 0, 255), .def = "0", .help = "CUDA device ordinal, 0..255"},
    {"fp32", BOOL(fp32), .def = "false",
     .help = "keep the GPU catalog in fp32 instead of fp16 (twice the memory)"},
    {"cpu-threads", U32(cpu_threads, 0, 1024), .def = "0",
     .help = "FAISS/BLAS threads for the CPU backend, 0 = all cores"},
    {"cpu-precision", .type = OPT_PRECISION, .offset = offsetof(aff_config, cpu_precision),
     .def = "auto",
     .help = "how the CPU backend scores flat collections: fp32, bf16 or int8 (a compact copy "
             "scanned first, candidates re-ranked in fp32: the same top-k as fp32), or auto "
             "(int8 on CPUs with AVX2, else fp32)"},
    {"event-weights", .type = OPT_EVENT_WEIGHTS, .offset = offsetof(aff_config, event_weights),
     .def = "view=1,click=2,add_to_cart=4,purchase=8",
     .help = "behaviour event weights, name=weight,...: the built-in view, click, add_to_cart "
             "and purchase (unnamed ones keep their default) and up to 28 custom types "
             "([a-z0-9_], 1..31 bytes) that PutEvents may send as EVENT_TYPE_CUSTOM; weights "
             "are finite and >= 0 (0: counted, but moves no profile or popularity)"},
    {"profile-half-life-hours", HOURS(profile_half_life_hours, 876000), .def = "336",
     .help = "half-life of an event's weight in a user's profile, hours in (0, 876000] "
             "(336 = 14 days): an event this much older counts half"},
    {"popularity-half-life-hours", HOURS(popularity_half_life_hours, 876000), .def = "168",
     .help = "half-life of an event in the popularity ranking that answers users without a "
             "profile, hours in (0, 876000] (168 = 7 days)"},
    {"history-length", U32(history_length, 1, 100000), .def = "500",
     .help = "recent events kept per user and collection, 1..100000 (exclusions by event "
             "type cover all time regardless)"},
    {"train-interval-s", U32(train_interval_s, 0, 31536000), .def = "3600",
     .help = "retrain a collection's model (iALS) in the background this often when it has new "
             "events, seconds, 0..31536000 (0: off)"},
    {"train-after-events", U32(train_after_events, 0, 4000000000u), .def = "0",
     .help = "also retrain once a collection has this many new events, 0..4000000000 (0: off)"},
    {"model-factors", U32(model_factors, 8, 512), .def = "64",
     .help = "default learned factors d for collections that set none, 8..512"},
    {"model-epochs", U32(model_epochs, 1, 1000), .def = "12",
     .help = "default training epochs for collections that set none, 1..1000"},
    {"train-threads", U32(train_threads, 0, 1024), .def = "0",
     .help = "threads per training job (run at low priority), 0 = all cores"},
    {"fold-in-history", U32(fold_in_history, 0, 1000000), .def = "0",
     .help = "a Recommend by user id folds in only the user's most recent this many items "
             "(by their latest event), 0..1000000 (0: all)"},
    /* ---- pipeline ---- */
    {"serving-config", STR(serving_config), .def = "",
     .help = "JSON file of named rule presets (boosts, pins, promotions, caps, diversity, "
             "exploration) that requests select with `preset`; re-read when it changes "
             "(checked at most once a second); empty: none"},
    /* ---- connection limits (issue 12) ---- */
    {"max-connections", U32(max_connections, 0, 1000000), .def = "0",
     .help = "client connections open at once, 0..1000000; more are refused (closed at once, "
             "with a log line); 0: RLIMIT_NOFILE less a headroom of 1/8 (at least 64)"},
    {"idle-timeout-ms", U32(idle_timeout_ms, 1000, 86400000), .def = "300000",
     .help = "close a connection that has had no call for this long, 1000..86400000 ms"},
    {"handshake-timeout-ms", U32(handshake_timeout_ms, 100, 600000), .def = "10000",
     .help = "a new connection must finish its TLS and HTTP/2 handshake (preface and "
             "SETTINGS) within this, 100..600000 ms, or it is closed"},
    {"max-header-bytes", U32(max_header_bytes, 8192, 1048576), .def = "65536",
     .help = "largest request metadata (all headers of one call) accepted, 8192..1048576 "
             "bytes; gRPC 1.51 answers a larger one by closing the whole connection, so keep "
             "this above what clients send"},
    {"heap-trim-mib", U32(heap_trim_mib, 0, 65536), .def = "16",
     .help = "when malloc holds more than this many MiB freed but not returned to the system "
             "(after an overload storm), return it (checked every second), 0..65536; 0: off"},
    {"tokens-file", STR(tokens_file), .def = "", .secret_path = true,
     .help = "file of role tokens, one per line: \"admin TOKEN\" or \"serving TOKEN\", "
             "optionally followed by COLLECTION,... to limit the token to those; serving "
             "tokens may search, recommend, send events and read, not change the catalog "
             "(see docs/security.md)"},
    {"tls-client-ca", STR(tls_client_ca), .def = "",
     .help = "with --tls-cert: require client certificates signed by this CA (PEM), i.e. "
             "mutual TLS"},
    {"event-retention-days", U32(event_retention_days, 0, 36500), .def = "0",
     .help = "erase behaviour events older than this many days, and what derives from them "
             "(history, per-item aggregates, type index; the profile is recomputed), at "
             "start-up and every --event-retention-interval-s; events older than this are "
             "refused; 0..36500, 0: keep until DeleteUser"},
    {"event-retention-interval-s", U32(event_retention_interval_s, 1, 86400), .def = "600",
     .help = "seconds between event retention passes, 1..86400; with --log each pass "
             "publishes a retention cut that every replica applies at the same log position"},
    {"attribution-window-s", U32(attribution_window_s, 60, 2592000), .def = "86400",
     .help = "measurement: impressions, clicks, add-to-carts and purchases that carry a "
             "recommendation_id count toward that recommendation for this long after it was "
             "served, 60..2592000 s"},
    {"attribution-max-records", U32(attribution_max_records, 0, 100000000), .def = "500000",
     .help = "measurement: recommendations remembered for attribution at most (about "
             "80 + 9 x k bytes each; the oldest are forgotten first), 0..100000000; 0: no "
             "recording, attribution or outcome metrics at all (experiments still assign)"},
    /* ---- widgets (issue 13) ---- */
    {"widgets", BOOL(widgets), .def = "true",
     .help = "keep the widget statistics (frequently bought together, also viewed/bought, "
             "trending, buy it again, recently viewed, best sellers) as events arrive; false: "
             "widget recipes answer nothing (measures the cost of maintenance)"},
    {"widget-session-key", STR(widget_session_key),
     .def = "session_id", .help = "event context key holding the session id (also viewed)"},
    {"widget-order-key", STR(widget_order_key),
     .def = "order_id",
     .help = "event context key holding the order id (frequently bought together); purchases "
             "without it use the session id"},
    {"widget-window-minutes", U32(widget_window_minutes, 1, 10080), .def = "30",
     .help = "events without a session or order id are grouped by this time bucket, "
             "1..10080 minutes"},
    {"widget-neighbours", U32(widget_neighbours, 1, 10000), .def = "50",
     .help = "co-occurring items kept per item and table (bounds memory: 8 bytes each), "
             "1..10000"},
    {"widget-min-support", U32(widget_min_support, 1, 1000000), .def = "2",
     .help = "baskets a pair of items must share before it is shown, 1..1000000"},
    {"widget-user-events", U32(widget_user_events, 1, 100000), .def = "100",
     .help = "recent events per user the widgets count (at most --history-length; 24 bytes "
             "each in memory), 1..100000"},
    {"trend-short-hours", HOURS(trend_short_hours, 876000), .def = "24",
     .help = "trending: half-life of the short (recent) rate, hours"},
    {"trend-long-hours", HOURS(trend_long_hours, 876000), .def = "336",
     .help = "trending: half-life of the long (baseline) rate, hours; longer than "
             "--trend-short-hours"},
    {"trend-min-events", U32(trend_min_events, 0, 1000000), .def = "5",
     .help = "trending: the least decayed event count in the short window, 0..1000000"},
    {"best-seller-half-life-hours", HOURS(best_seller_half_life_hours, 876000), .def = "168",
     .help = "best sellers: half-life of a purchase, hours (168 = 7 days)"},
    {"widget-refresh-ms", U32(widget_refresh_ms, 0, 3600000), .def = "1000",
     .help = "trending and best sellers rank every item: the ranking is kept this long, "
             "0..3600000 ms (0: ranked on every call)"},
    /* ---- replication (issue 15, docs/replication.md) ---- */
    {"log", STR(log_urls), .def = "",
     .help = "replicate through a NATS JetStream write log: nats://host:port[,nats://...] "
             "(tls://... with --log-tls-ca); every write goes through the log and every "
             "replica applies it in order; empty: single node"},
    {"log-stream", STR(log_stream), .def = "AFFINITY",
     .help = "the JetStream stream of the write log (created when missing; subjects "
             "\"<stream>.>\")"},
    {"log-replicas", U32(log_replicas, 1, 5), .def = "3",
     .help = "replicas of the stream when this replica creates it, 1..5"},
    {"log-creds", STR(log_creds), .def = "", .secret_path = true,
     .help = "NATS user credentials file (JWT and nkey seed) for the write log"},
    {"log-token-file", STR(log_token_file), .def = "", .secret_path = true,
     .help = "file holding a NATS authentication token for the write log"},
    {"log-user", STR(log_user), .def = "",
     .help = "NATS user name for the write log (with --log-password-file)"},
    {"log-password-file", STR(log_password_file), .def = "", .secret_path = true,
     .help = "file holding the NATS password of --log-user"},
    {"log-tls-ca", STR(log_tls_ca), .def = "",
     .help = "PEM CA that the NATS servers' certificates must chain to (turns TLS on)"},
    {"log-tls-cert", STR(log_tls_cert), .def = "",
     .help = "PEM client certificate for mutual TLS with NATS (with --log-tls-key)"},
    {"log-tls-key", STR(log_tls_key), .def = "", .help = "PEM private key for --log-tls-cert"},
    {"log-ack", STR(log_ack), .def = "applied",
     .help = "when a write is answered: applied (committed to the stream and applied on this "
             "replica, so a read here sees it) or committed (once the stream committed it)"},
    {"log-apply-nice", INT(log_apply_nice, -20, 19), .def = "-10",
     .help = "scheduling niceness of the thread that applies the write log, -20..19: it is "
             "every write's critical path, so by default it runs ahead of the serving threads "
             "(a negative value needs CAP_SYS_NICE; without it the thread keeps the process's "
             "and a warning says so); 0: the process's own"},
    {"log-dedup-window-s", U32(log_dedup_window_s, 1, 86400), .def = "120",
     .help = "how long the stream remembers request ids to drop retried writes, 1..86400 s"},
    {"bootstrap-from", STR(bootstrap_from), .def = "",
     .help = "with --log and an empty --data-dir: start from a snapshot of this replica "
             "(host:port, GetSnapshot with --token-file's token) and replay the log from its "
             "sequence"},
    {"snapshot-dir", STR(snapshot_dir), .def = "",
     .help = "write snapshots of the store here every --snapshot-interval-s (and, with --log, "
             "truncate the log below the oldest kept one); empty: none"},
    {"snapshot-interval-s", U32(snapshot_interval_s, 1, 31536000), .def = "3600",
     .help = "seconds between snapshots, 1..31536000"},
    {"snapshot-keep", U32(snapshot_keep, 1, 64), .def = "2",
     .help = "newest snapshots kept, 1..64; older ones are deleted"},
    {"log-retain-records", U32(log_retain_records, 0, 4000000000u), .def = "0",
     .help = "records the log keeps below the oldest kept snapshot, 0..4000000000"},
    {"kafka-brokers", STR(kafka_brokers), .def = "",
     .help = "with --log: consume behaviour events (JSON, one per message) from Kafka at "
             "these bootstrap servers and write them through the log; empty: off"},
    {"kafka-topic", STR(kafka_topic), .def = "", .help = "the Kafka topic of --kafka-brokers"},
    {"kafka-group", STR(kafka_group), .def = "affinityd",
     .help = "the Kafka consumer group (one group for all replicas: each message once)"},
    {"kafka-collection", STR(kafka_collection), .def = "",
     .help = "the collection the Kafka events go to"},
    {"min-sequence-wait-ms", U32(min_sequence_wait_ms, 0, 60000), .def = "1000",
     .help = "how long a read with min_log_sequence waits for this replica to apply it "
             "before answering UNAVAILABLE, 0..60000 ms"},
    {"help", .type = OPT_ACTION, .offset = offsetof(aff_config, help), .def = "",
     .help = "print this help and exit"},
    {"version", .type = OPT_ACTION, .offset = offsetof(aff_config, version), .def = "",
     .help = "print the version and exit"},
};
#define N_OPTS (sizeof opts / sizeof opts[0])

const char *config_backend_name(engine_backend_choice b)
{
    switch (b) {
    case ENGINE_BACKEND_GPU:
        return "gpu";
    case ENGINE_BACKEND_CPU:
        return "cpu";
    case ENGINE_BACKEND_NOOP:
        return "noop";
    default:
        return "auto";
    }
}

/* "max-batch" -> "AFFINITY_MAX_BATCH". */
static void env_name(const opt_def *o, char *buf, size_t size)
{
    size_t n = (size_t)snprintf(buf, size, "AFFINITY_");
    for (const char *p = o->name; *p && n + 1 < size; p++)
        buf[n++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
    buf[n] = '\0';
}

static bool parse_bool(const char *v, bool *out)
{
    static const char *const yes[] = {"1", "true", "yes", "on"};
    static const char *const no[] = {"0", "false", "no", "off"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(v, yes[i]) == 0) {
            *out = true;
            return true;
        }
        if (strcasecmp(v, no[i]) == 0) {
            *out = false;
            return true;
        }
    }
    return false;
}

static bool valid_type_name(const char *s, size_t n)
{
    if (n == 0 || n > STORE_MAX_TYPE_LEN) return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '_'))
            return false;
    return true;
}

/* Parses "name=weight,..." into *out: built-in types not named keep their defaults. */
static int parse_event_weights(const char *value, const char *source, config_event_weights *out,
                               aff_err *err)
{
    static const char *const builtin[AFF_EVENT_BUILTIN_COUNT] = {
#define CONFIG__EVENT_NAME(name, value, str, weight) [value - 1] = str,
        AFF_EVENT_TYPES(CONFIG__EVENT_NAME)
#undef CONFIG__EVENT_NAME
    };
    static const float defaults[AFF_EVENT_BUILTIN_COUNT] = {
#define CONFIG__EVENT_WEIGHT(name, value, str, weight) [value - 1] = weight,
        AFF_EVENT_TYPES(CONFIG__EVENT_WEIGHT)
#undef CONFIG__EVENT_WEIGHT
    };
    config_event_weights w = {.view = defaults[0],
                              .click = defaults[1],
                              .add_to_cart = defaults[2],
                              .purchase = defaults[3]};
    float *slots[4] = {&w.view, &w.click, &w.add_to_cart, &w.purchase};
    bool seen_builtin[4] = {false};
    const char *p = value;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *eq = memchr(p, '=', len);
        if (!eq)
            return aff__fail(err, AFF_EINVAL,
                             "%s: '%.*s' is not name=weight (e.g. view=1,purchase=8,wishlist=3)",
                             source, (int)len, p);
        size_t nlen = (size_t)(eq - p);
        char num[64];
        size_t vlen = len - nlen - 1;
        if (vlen == 0 || vlen >= sizeof num)
            return aff__fail(err, AFF_EINVAL, "%s: '%.*s' has no weight", source, (int)len, p);
        memcpy(num, eq + 1, vlen);
        num[vlen] = '\0';
        char *nend = NULL;
        errno = 0;
        float weight = strtof(num, &nend);
        if (*nend || errno || !isfinite(weight) || weight < 0)
            return aff__fail(err, AFF_EINVAL,
                             "%s: weight '%s' of '%.*s' is not a finite number >= 0", source, num,
                             (int)nlen, p);
        if (!valid_type_name(p, nlen))
            return aff__fail(err, AFF_EINVAL,
                             "%s: event type '%.*s' must be 1..%d bytes of [a-z0-9_]", source,
                             (int)nlen, p, STORE_MAX_TYPE_LEN);
        int b = -1;
        for (int i = 0; i < 4; i++)
            if (strlen(builtin[i]) == nlen && strncmp(builtin[i], p, nlen) == 0) b = i;
        bool dup = b >= 0 && seen_builtin[b];
        for (uint32_t i = 0; i < w.n_custom && !dup; i++)
            dup = strlen(w.custom_names[i]) == nlen && strncmp(w.custom_names[i], p, nlen) == 0;
        if (dup)
            return aff__fail(err, AFF_EINVAL, "%s: event type '%.*s' is given twice", source,
                             (int)nlen, p);
        if (b >= 0) {
            *slots[b] = weight;
            seen_builtin[b] = true;
        } else {
            if (w.n_custom == PROFILES_MAX_CUSTOM_TYPES)
                return aff__fail(err, AFF_EINVAL, "%s: at most %d custom event types", source,
                                 PROFILES_MAX_CUSTOM_TYPES);
            memcpy(w.custom_names[w.n_custom], p, nlen);
            w.custom_names[w.n_custom][nlen] = '\0';
            w.custom_weights[w.n_custom++] = weight;
        }
        if (!end) break;
        p = end + 1;
        if (!*p)
            return aff__fail(err, AFF_EINVAL, "%s: a trailing comma; give name=weight pairs",
                             source);
    }
    *out = w;
    return 0;
}

/* Stores value into the field of o; `source` names where it came from for messages. */
static int set_opt(aff_config *c, const opt_def *o, const char *value, const char *source,
                   aff_err *err)
{
    char *field = (char *)c + o->offset;
    switch (o->type) {
    case OPT_STRING:
        if (strlen(value) >= o->size)
            return aff__fail(err, AFF_EINVAL, "%s: value is too long (at most %zu bytes)", source,
                             o->size - 1);
        memcpy(field, value, strlen(value) + 1);
        return 0;
    case OPT_U32:
    case OPT_INT: {
        char *end = NULL;
        errno = 0;
        long long v = strtoll(value, &end, 10);
        if (!*value || *end || errno || v < o->min || v > o->max)
            return aff__fail(err, AFF_EINVAL, "%s: '%s' is not an integer in %lld..%lld", source,
                             value, o->min, o->max);
        if (o->type == OPT_U32)
            *(uint32_t *)field = (uint32_t)v;
        else
            *(int *)field = (int)v;
        return 0;
    }
    case OPT_BOOL:
    case OPT_ACTION:
        if (!parse_bool(value, (bool *)field))
            return aff__fail(err, AFF_EINVAL, "%s: '%s' is not a boolean (true/false, 1/0)", source,
                             value);
        return 0;
    case OPT_BACKEND: {
        engine_backend_choice *b = (engine_backend_choice *)field;
        if (strcmp(value, "auto") == 0)
            *b = ENGINE_BACKEND_AUTO;
        else if (strcmp(value, "gpu") == 0)
            *b = ENGINE_BACKEND_GPU;
        else if (strcmp(value, "cpu") == 0)
            *b = ENGINE_BACKEND_CPU;
        else if (strcmp(value, "noop") == 0)
            *b = ENGINE_BACKEND_NOOP;
        else
            return aff__fail(err, AFF_EINVAL,
                             "%s: '%s' is not a backend (auto, gpu, cpu, or noop for benchmarks)",
                             source, value);
        return 0;
    }
    case OPT_EVENT_WEIGHTS:
        return parse_event_weights(value, source, (config_event_weights *)field, err);
    case OPT_HOURS: {
        char *end = NULL;
        errno = 0;
        double v = strtod(value, &end);
        if (!*value || *end || errno || !(v > 0) || v > (double)o->max)
            return aff__fail(err, AFF_EINVAL, "%s: '%s' is not a number of hours in (0, %lld]",
                             source, value, o->max);
        *(double *)field = v;
        return 0;
    }
    case OPT_PRECISION:
        if (cpu_precision_parse(value, (backend_precision *)field) != AFF_OK)
            return aff__fail(err, AFF_EINVAL,
                             "%s: '%s' is not a precision (auto, fp32, bf16, int8)", source, value);
        return 0;
    case OPT_LOG_LEVEL:
        if (aff_log_parse_level(value, (aff_log_level *)field))
            return aff__fail(err, AFF_EINVAL,
                             "%s: '%s' is not a log level (debug, info, warn, error, off)", source,
                             value);
        return 0;
    }
    return aff__fail(err, AFF_EINTERNAL, "%s: unknown option type", source);
}

static int check_file(const char *flag, const char *path, aff_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return aff__fail(err, AFF_EINVAL, "--%s: cannot open '%s': %s", flag, path,
                         strerror(errno));
    fclose(f);
    return 0;
}

/* Cross-field checks once every source has been applied. */
static int validate(const aff_config *c, aff_err *err)
{
    const char *colon = strrchr(c->listen, ':');
    if (!c->listen[0] || !colon || colon == c->listen || !colon[1])
        return aff__fail(err, AFF_EINVAL,
                         "--listen: '%s' is not host:port (e.g. 0.0.0.0:50051 or [::]:0)",
                         c->listen);
    char *end = NULL;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535)
        return aff__fail(err, AFF_EINVAL, "--listen: port '%s' is not in 0..65535", colon + 1);
    if (!!c->tls_cert[0] != !!c->tls_key[0])
        return aff__fail(err, AFF_EINVAL,
                         "--tls-cert and --tls-key go together: give both or neither");
    if (c->tls_cert[0] && check_file("tls-cert", c->tls_cert, err))
        return err ? err->code : AFF_EINVAL;
    if (c->tls_key[0] && check_file("tls-key", c->tls_key, err))
        return err ? err->code : AFF_EINVAL;
    if (c->token_file[0] && check_file("token-file", c->token_file, err))
        return err ? err->code : AFF_EINVAL;
    if (c->tokens_file[0] && check_file("tokens-file", c->tokens_file, err))
        return err ? err->code : AFF_EINVAL;
    if (c->tls_client_ca[0] && !c->tls_cert[0])
        return aff__fail(err, AFF_EINVAL,
                         "--tls-client-ca needs --tls-cert and --tls-key: client certificates "
                         "are checked only on TLS connections");
    if (c->tls_client_ca[0] && check_file("tls-client-ca", c->tls_client_ca, err))
        return err ? err->code : AFF_EINVAL;
    if (c->metrics_listen[0] && !strchr(c->metrics_listen, ':'))
        return aff__fail(err, AFF_EINVAL, "--metrics-listen: '%s' is not host:port",
                         c->metrics_listen);
    if (c->kafka_brokers[0] && (!c->log_urls[0] || !c->kafka_topic[0] || !c->kafka_collection[0]))
        return aff__fail(err, AFF_EINVAL,
                         "--kafka-brokers needs --log, --kafka-topic and --kafka-collection");
    if (c->bootstrap_from[0] && !c->log_urls[0])
        return aff__fail(err, AFF_EINVAL, "--bootstrap-from needs --log (it replays the log)");
    if (strcmp(c->log_ack, "applied") != 0 && strcmp(c->log_ack, "committed") != 0)
        return aff__fail(err, AFF_EINVAL, "--log-ack: '%s' is not applied or committed",
                         c->log_ack);
    if (c->log_urls[0]) {
        if (strncmp(c->log_urls, "nats://", 7) != 0 && strncmp(c->log_urls, "tls://", 6) != 0)
            return aff__fail(err, AFF_EINVAL,
                             "--log: '%.200s' is not nats://host:port[,nats://host:port...]",
                             c->log_urls);
        for (const char *p = c->log_stream; *p; p++)
            if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
                  (*p >= '0' && *p <= '9') || *p == '_' || *p == '-'))
                return aff__fail(err, AFF_EINVAL,
                                 "--log-stream: '%s' may hold only [A-Za-z0-9_-]", c->log_stream);
        if (!c->log_stream[0])
            return aff__fail(err, AFF_EINVAL, "--log-stream: empty");
        if (c->bootstrap_from[0] && !c->data_dir[0])
            return aff__fail(err, AFF_EINVAL, "--bootstrap-from needs --data-dir");
        if (c->demo)
            return aff__fail(err, AFF_EINVAL,
                             "--demo and --log do not go together: load the demo shop through "
                             "one replica's API instead");
        if (!!c->log_tls_cert[0] != !!c->log_tls_key[0])
            return aff__fail(err, AFF_EINVAL,
                             "--log-tls-cert and --log-tls-key go together: give both or neither");
        if (!!c->log_user[0] != !!c->log_password_file[0])
            return aff__fail(err, AFF_EINVAL,
                             "--log-user and --log-password-file go together: give both or "
                             "neither");
        const char *files[][2] = {{"log-creds", c->log_creds},
                                  {"log-token-file", c->log_token_file},
                                  {"log-password-file", c->log_password_file},
                                  {"log-tls-ca", c->log_tls_ca},
                                  {"log-tls-cert", c->log_tls_cert},
                                  {"log-tls-key", c->log_tls_key}};
        for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
            if (files[i][1][0] && check_file(files[i][0], files[i][1], err))
                return err ? err->code : AFF_EINVAL;
    }
    return 0;
}

int config_parse(aff_config *out, int argc, char **argv, aff_err *err)
{
    int rc = 0;
    char source[160];
    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < N_OPTS; i++) {
        if (opts[i].type == OPT_ACTION || !opts[i].def[0]) continue;
        snprintf(source, sizeof source, "default of --%s", opts[i].name);
        rc = set_opt(out, &opts[i], opts[i].def, source, err);
        if (rc) goto out;
    }
    for (size_t i = 0; i < N_OPTS; i++) {
        if (opts[i].type == OPT_ACTION) continue;
        char name[96];
        env_name(&opts[i], name, sizeof name);
        const char *v = getenv(name);
        if (!v) continue;
        snprintf(source, sizeof source, "%s", name);
        rc = set_opt(out, &opts[i], v, source, err);
        if (rc) goto out;
    }
    for (int a = 1; a < argc; a++) {
        const char *arg = argv[a];
        /* The short spellings people try first. */
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "help") == 0) arg = "--help";
        if (strcmp(arg, "-V") == 0 || strcmp(arg, "version") == 0) arg = "--version";
        if (strncmp(arg, "--", 2) != 0) {
            rc = aff__fail(err, AFF_EINVAL,
                           "unexpected argument '%s' (flags start with --; "
                           "see --help)",
                           arg);
            goto out;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const opt_def *o = NULL;
        for (size_t i = 0; i < N_OPTS && !o; i++)
            if (strlen(opts[i].name) == len && strncmp(opts[i].name, name, len) == 0) o = &opts[i];
        if (!o) {
            rc = aff__fail(err, AFF_EINVAL, "unknown flag '%.*s' (see --help)", (int)len + 2, arg);
            goto out;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (!value && (o->type == OPT_BOOL || o->type == OPT_ACTION)) value = "true";
        if (!value) {
            if (a + 1 >= argc) {
                rc = aff__fail(err, AFF_EINVAL, "--%s needs a value (see --help)", o->name);
                goto out;
            }
            value = argv[++a];
        }
        snprintf(source, sizeof source, "--%s", o->name);
        rc = set_opt(out, o, value, source, err);
        if (rc) goto out;
    }
    if (!out->help && !out->version) rc = validate(out, err);
out:
    return rc;
}

void config_usage(FILE *f, const char *prog)
{
    fprintf(f,
            "Usage: %s [flags]\n\n"
            "Affinity %s: personalization server (gRPC API affinity.v1).\n"
            "Every flag has an environment variable; the flag wins when both are set.\n"
            "Boolean flags take no value or =true/=false.\n\n",
            prog, AFF_VERSION_STRING);
    for (size_t i = 0; i < N_OPTS; i++) {
        const opt_def *o = &opts[i];
        char env[96], head[160];
        env_name(o, env, sizeof env);
        const char *arg = o->type == OPT_BOOL || o->type == OPT_ACTION ? "" : " VALUE";
        snprintf(head, sizeof head, "--%s%s", o->name, arg);
        fprintf(f, "  %-26s %s\n", head, o->help);
        if (o->type == OPT_ACTION) continue;
        fprintf(f, "  %-26s env %s; default: %s\n", "", env, o->def[0] ? o->def : "(empty)");
    }
}

void config_log(const aff_config *c)
{
    char vals[N_OPTS][64 + CONFIG_PATH_MAX];
    const char *kv[2 * N_OPTS + 1];
    size_t n = 0;
    for (size_t i = 0; i < N_OPTS; i++) {
        const opt_def *o = &opts[i];
        const char *field = (const char *)c + o->offset;
        char *v = vals[i];
        switch (o->type) {
        case OPT_STRING:
            if (o->secret_path)
                snprintf(v, sizeof vals[0], "%s", field[0] ? "(set, redacted)" : "");
            else
                snprintf(v, sizeof vals[0], "%s", field);
            break;
        case OPT_U32:
            snprintf(v, sizeof vals[0], "%u", *(const uint32_t *)field);
            break;
        case OPT_INT:
            snprintf(v, sizeof vals[0], "%d", *(const int *)field);
            break;
        case OPT_BOOL:
            snprintf(v, sizeof vals[0], "%s", *(const bool *)field ? "true" : "false");
            break;
        case OPT_BACKEND:
            snprintf(v, sizeof vals[0], "%s",
                     config_backend_name(*(const engine_backend_choice *)field));
            break;
        case OPT_PRECISION:
            snprintf(v, sizeof vals[0], "%s",
                     cpu_precision_name(*(const backend_precision *)field));
            break;
        case OPT_LOG_LEVEL: {
            static const char *const names[] = {"debug", "info", "warn", "error", "off"};
            int l = *(const aff_log_level *)field;
            snprintf(v, sizeof vals[0], "%s", l >= 0 && l <= AFF_LOG_OFF ? names[l] : "?");
            break;
        }
        case OPT_EVENT_WEIGHTS: {
            const config_event_weights *w = (const config_event_weights *)field;
            int len = snprintf(v, sizeof vals[0], "view=%g,click=%g,add_to_cart=%g,purchase=%g",
                               (double)w->view, (double)w->click, (double)w->add_to_cart,
                               (double)w->purchase);
            for (uint32_t j = 0; j < w->n_custom && len > 0 && (size_t)len < sizeof vals[0]; j++)
                len += snprintf(v + len, sizeof vals[0] - (size_t)len, ",%s=%g", w->custom_names[j],
                                (double)w->custom_weights[j]);
            break;
        }
        case OPT_HOURS:
            snprintf(v, sizeof vals[0], "%g", *(const double *)field);
            break;
        case OPT_ACTION:
            continue;
        }
        kv[n++] = o->name;
        kv[n++] = v;
    }
    aff_log_fields(AFF_LOG_INFO, "configuration", kv, n / 2);
}

void config_profiles(const aff_config *c, profiles_config *out, profiles_custom_type *custom)
{
    profiles_config_init(out);
    const config_event_weights *w = &c->event_weights;
    out->weight_view = w->view;
    out->weight_click = w->click;
    out->weight_add_to_cart = w->add_to_cart;
    out->weight_purchase = w->purchase;
    for (uint32_t i = 0; i < w->n_custom; i++)
        custom[i] =
            (profiles_custom_type){.name = w->custom_names[i], .weight = w->custom_weights[i]};
    out->custom_types = custom;
    out->n_custom_types = w->n_custom;
    out->half_life_s = c->profile_half_life_hours * 3600.0;
    out->popularity_half_life_s = c->popularity_half_life_hours * 3600.0;
    out->history_len = c->history_length;
    out->retention_ms = (int64_t)c->event_retention_days * 86400000;
}

void config_widgets(const aff_config *c, widgets_config *out)
{
    widgets_config_init(out);
    out->maintain = c->widgets;
    out->session_key = c->widget_session_key;
    out->order_key = c->widget_order_key;
    out->window_ms = (int64_t)c->widget_window_minutes * 60000;
    out->max_neighbours = c->widget_neighbours;
    out->min_support = c->widget_min_support;
    out->user_events =
        c->widget_user_events < c->history_length ? c->widget_user_events : c->history_length;
    out->trend_short_half_life_s = c->trend_short_hours * 3600.0;
    out->trend_long_half_life_s = c->trend_long_hours * 3600.0;
    out->trend_min_events = c->trend_min_events;
    out->best_seller_half_life_s = c->best_seller_half_life_hours * 3600.0;
    out->refresh_ms = c->widget_refresh_ms;
}

void config_model(const aff_config *c, model_config *out)
{
    model_config_init(out);
    out->defaults.factors = c->model_factors;
    out->defaults.epochs = c->model_epochs;
    out->half_life_s = c->profile_half_life_hours * 3600.0;
    out->train_interval_s = c->train_interval_s;
    out->train_after_events = c->train_after_events;
    out->train_threads = c->train_threads;
    out->fold_in_history = c->fold_in_history;
}

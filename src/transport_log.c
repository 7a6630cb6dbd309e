/*
 * transport_log.c: replication at the transport (docs/replication.md). With --log, the
 * write RPCs are not applied where they arrive: the request is decoded and checked for
 * scope as always, stamped with this replica's time once, wrapped in a LogRecord and
 * published to the write log (replog.c). Every replica's apply thread decodes each record in
 * sequence order and runs the very handler single-node mode runs (rpc_put_events,
 * rpc_delete_user, ...) on a capture call (tcall.capture) with the record's time as the
 * profiles clock and the record's sequence stamped into the store transaction; the replica
 * that published it hands the captured answer, plus log_sequence (field 110), to its client.
 * So the validation and decisions of single-node mode are the ones applied everywhere, in
 * one order, and the modules' own hooks keep working.
 *
 * Serving calls that carry min_log_sequence wait (on a blocking-work thread, never on a
 * completion-queue thread) up to --min-sequence-wait-ms for this replica to apply it, then
 * answer UNAVAILABLE.
 *
 * Records with a handler of their own (own_records): stream messages (UpsertItems,
 * ImportEvents) and a trained model on its way to every replica (ModelPart, ModelCommit;
 * transport_model.c). A Train record runs the Train handler everywhere (parameters saved on
 * every replica), but only the replica that published it starts the job (tcall.log_own).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "replog.h"
#include "event_types.h"
#include "store.h"
#include "transport_handlers.h"
#include "transport_import.h"
#include "transport_model.h"

#define LOG_RECORD_VERSION   1
#define LOG_RESULTS          1024 /* answers kept for this replica's own records */
#define LOG_LAGS             4096 /* apply lags kept for GetServerInfo */
#define LOG_UNCOMMITTED      512  /* ≥ the log's batch (REPLOG_BATCH records) */
#define LOG_USER_BUCKETS     64   /* user-keyed subjects "u.<bucket>" (per-bucket purges) */
#define FIELD_REQUEST_ID     110
#define FIELD_LOG_SEQUENCE   110
#define FIELD_MIN_SEQUENCE   111
#define FIELD_LATE           118 /* request_id / min_log_sequence of the messages that gained
                                    them later (ImportEvents, Train, GetModel) */
#define LOG_DEFAULT_WAIT_MS  10000 /* a write without a deadline */

/* The answers of records this replica published, by sequence, until their callers take
 * them (a ring: an answer nobody took in time is dropped when its slot is reused). */
typedef struct tlog_results {
    pthread_mutex_t mu;
    struct {
        uint64_t seq;
        tcapture cap;
    } slot[LOG_RESULTS];
    double lag_ms[LOG_LAGS]; /* the last records' apply lags (apply thread writes) */
    uint64_t n_lags;
    /* Stamps of the records applied since the last commit: their lag is measured when they
     * become visible (transport_log_commit), not when their handler returned. Apply thread. */
    int64_t uncommitted[LOG_UNCOMMITTED];
    uint32_t n_uncommitted;
} tlog_results;

int transport__log_init(transport *t)
{
    t->log_results = calloc(1, sizeof *t->log_results);
    if (!t->log_results) return AFF_ENOMEM;
    pthread_mutex_init(&t->log_results->mu, NULL);
    return 0;
}

void transport__log_fini(transport *t)
{
    if (!t->log_results) return;
    for (size_t i = 0; i < LOG_RESULTS; i++)
        transport__capture_free(&t->log_results->slot[i].cap);
    pthread_mutex_destroy(&t->log_results->mu);
    free(t->log_results);
    t->log_results = NULL;
}

void transport__capture_free(tcapture *cap)
{
    free(cap->bytes);
    memset(cap, 0, sizeof *cap);
}

/* Appends varint field `field` (16..2047) = seq to a serialized message. */
static bool append_varint_field(tcapture *cap, unsigned field, uint64_t seq)
{
    uint8_t tail[12];
    size_t n = 0;
    tail[n++] = (uint8_t)(((field << 3) & 0x7f) | 0x80); /* tag, varint type */
    tail[n++] = (uint8_t)((field << 3) >> 7);
    do {
        uint8_t b = seq & 0x7f;
        seq >>= 7;
        tail[n++] = seq ? (uint8_t)(b | 0x80) : b;
    } while (seq);
    uint8_t *grown = realloc(cap->bytes, cap->len + n);
    if (!grown) return false;
    memcpy(grown + cap->len, tail, n);
    cap->bytes = grown;
    cap->len += n;
    return true;
}

bool transport__append_log_sequence(tcapture *cap, uint64_t seq)
{
    return append_varint_field(cap, FIELD_LOG_SEQUENCE, seq);
}

/* The request's field `number` when it is a string (request_id) or uint64 (min sequence). */
static const ProtobufCFieldDescriptor *field_of(const ProtobufCMessage *m, unsigned number,
                                                ProtobufCType type)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field(m->descriptor, number);
    return f && f->type == type && f->label != PROTOBUF_C_LABEL_REPEATED ? f : NULL;
}

static const char *request_id_of(const ProtobufCMessage *m)
{
    const ProtobufCFieldDescriptor *f = field_of(m, FIELD_REQUEST_ID, PROTOBUF_C_TYPE_STRING);
    if (!f) f = field_of(m, FIELD_LATE, PROTOBUF_C_TYPE_STRING);
    if (!f) return NULL;
    const char *id = *(const char *const *)((const char *)m + f->offset);
    return id && id[0] ? id : NULL;
}

static uint64_t min_sequence_of(const ProtobufCMessage *m)
{
    const ProtobufCFieldDescriptor *f = field_of(m, FIELD_MIN_SEQUENCE, PROTOBUF_C_TYPE_UINT64);
    if (!f) f = field_of(m, FIELD_LATE, PROTOBUF_C_TYPE_UINT64);
    return f ? *(const uint64_t *)((const char *)m + f->offset) : 0;
}

/* The method's short name ("PutEvents") from its path. */
static const char *short_name(const tmethod_def *def)
{
    const char *slash = strrchr(def->path, '/');
    return slash ? slash + 1 : def->path;
}

static const tmethod_def *method_by_name(const char *name)
{
    for (size_t i = 0; i < transport__n_methods; i++) {
        const tmethod_def *d = &transport__methods[i];
        if (strncmp(d->path, "/affinity.v1.Affinity/", 22) == 0 && strcmp(short_name(d), name) == 0)
            return d;
    }
    return NULL;
}

/* Writes that go through the log as unary records. UpsertItems (a stream) publishes one
 * record per stream message from transport_catalog.c. */
static bool replicated(const char *name)
{
    /* CreateExperiment/StopExperiment (measurement): every replica stores the experiment, so
     * assignment (a hash of user and experiment) agrees everywhere. */
    static const char *const names[] = {"CreateCollection", "DropCollection",  "DeleteItems",
                                        "PutEvents",        "DeleteUser",      "SetUserOptOut",
                                        "CreateExperiment", "StopExperiment",  "Train"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(names[i], name) == 0) return true;
    return false;
}

static uint32_t fnv1a(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

/* The subject a record goes to: user-keyed records by bucket of the user id (so DeleteUser
 * finds one user's events by reading one bucket), DeleteUser records on REPLOG_SUBJECT_ERASED
 * (overwritten, not only purged, when truncated), the rest on "c" (catalog). */
static void subject_of(const char *method, const ProtobufCMessage *req, char *out, size_t size)
{
    const char *user = NULL;
    if (strcmp(method, "PutEvents") == 0)
        user = ((const Affinity__V1__PutEventsRequest *)req)->user_id;
    else if (strcmp(method, "SetUserOptOut") == 0)
        user = ((const Affinity__V1__SetUserOptOutRequest *)req)->user_id;
    if (strcmp(method, "DeleteUser") == 0)
        snprintf(out, size, "%s", REPLOG_SUBJECT_ERASED); /* erased at truncation */
    else if (user)
        snprintf(out, size, "u.%02u", fnv1a(user) % LOG_USER_BUCKETS);
    else if (strcmp(method, "ImportEvents") == 0) /* many users' events */
        snprintf(out, size, "i");
    else if (strncmp(method, "Model", 5) == 0) /* a trained model's parts and commit */
        snprintf(out, size, "m");
    else
        snprintf(out, size, "c");
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Milliseconds left before the call's deadline (LOG_DEFAULT_WAIT_MS without one). */
static int64_t ms_left(const tcall *c)
{
    int64_t dl = tcall_deadline_ns(c);
    if (!dl) return LOG_DEFAULT_WAIT_MS;
    int64_t left = (dl - batcher_now_ns()) / 1000000;
    return left > 0 ? left : 0;
}

/* Takes the answer of seq out of the results ring; false when it is not there. */
static bool take_result(transport *t, uint64_t seq, tcapture *out)
{
    tlog_results *r = t->log_results;
    bool found = false;
    pthread_mutex_lock(&r->mu);
    size_t i = seq % LOG_RESULTS;
    if (r->slot[i].seq == seq) {
        *out = r->slot[i].cap;
        memset(&r->slot[i].cap, 0, sizeof r->slot[i].cap);
        r->slot[i].seq = 0;
        found = true;
    }
    pthread_mutex_unlock(&r->mu);
    return found;
}

/* Wraps req in a LogRecord stamped now and publishes it, waiting at most timeout_ms for the
 * stream's commit. Returns 0 with *seq, or a negative aff_status with msg set. */
static int publish_record(transport *t, const char *method, const ProtobufCMessage *req,
                          int64_t timeout_ms, uint64_t *seq, char *msg, size_t msg_size)
{
    Affinity__V1__LogRecord rec = AFFINITY__V1__LOG_RECORD__INIT;
    rec.version = LOG_RECORD_VERSION;
    rec.method = (char *)method;
    rec.time_ms = wall_ms();
    const char *rid = request_id_of(req);
    rec.request_id = (char *)(rid ? rid : "");
    rec.origin = t->cfg.log_origin;
    rec.request.len = protobuf_c_message_get_packed_size(req);
    rec.request.data = malloc(rec.request.len ? rec.request.len : 1);
    size_t len = 0;
    uint8_t *buf = NULL;
    if (rec.request.data) {
        protobuf_c_message_pack(req, rec.request.data);
        len = protobuf_c_message_get_packed_size(&rec.base);
        buf = malloc(len);
    }
    if (!buf) {
        free(rec.request.data);
        snprintf(msg, msg_size, "out of memory encoding a log record");
        return AFF_ENOMEM;
    }
    protobuf_c_message_pack(&rec.base, buf);
    free(rec.request.data);
    char subject[16];
    subject_of(method, req, subject, sizeof subject);
    aff_err err;
    int rc = replog_publish(t->cfg.log, subject, buf, len, rid, timeout_ms, seq, &err);
    free(buf);
    if (rc) snprintf(msg, msg_size, "%s", err.msg);
    return rc;
}

int transport__log_publish(transport *t, const char *method, const ProtobufCMessage *req,
                           int64_t timeout_ms, uint64_t *seq, char *msg, size_t msg_size)
{
    return publish_record(t, method, req, timeout_ms, seq, msg, msg_size);
}

int transport__log_write(tcall *c, const char *method, const ProtobufCMessage *req,
                         tcapture *out, uint64_t *seq, char *msg, size_t msg_size)
{
    transport *t = c->t;
    memset(out, 0, sizeof *out);
    int rc = publish_record(t, method, req, ms_left(c), seq, msg, msg_size);
    if (rc) return rc;
    if (t->cfg.log_ack_committed) return 0; /* answered with the sequence alone */
    if (!replog_wait_applied(t->cfg.log, *seq, ms_left(c))) {
        snprintf(msg, msg_size,
                 "the write is committed to the log as sequence %" PRIu64
                 " but this replica has not applied it before the deadline; it will be "
                 "applied (a retry with the same request_id is safe)",
                 *seq);
        return AFF_EUNAVAILABLE;
    }
    if (!take_result(t, *seq, out)) {
        /* A retry deduplicated by the stream (the first call took the answer), or an
         * answer that waited too long: the write is applied; its counts are not known. */
        out->code = 0;
        out->bytes = NULL;
        out->len = 0;
    }
    return 0;
}

int transport_log_ingest_event(void *ctx, const char *collection, const char *user_id,
                               const char *item_id, const char *type, int64_t timestamp_ms,
                               double value, const char *request_id, uint64_t *seq, aff_err *err)
{
    transport *t = ctx;
    Affinity__V1__Event ev = AFFINITY__V1__EVENT__INIT;
    Affinity__V1__Event *evs[1] = {&ev};
    ev.item_id = (char *)item_id;
    ev.timestamp_ms = timestamp_ms;
    ev.value = value;
    ev.type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CUSTOM;
    ev.custom_type = (char *)type;
#define AFF__EVENT_NAME(name, v, text, w)                                                          \
    if (strcasecmp(type, text) == 0) {                                                             \
        ev.type = (Affinity__V1__EventType)(v);                                                    \
        ev.custom_type = (char *)"";                                                               \
    }
    AFF_EVENT_TYPES(AFF__EVENT_NAME)
#undef AFF__EVENT_NAME
    if (strcasecmp(type, "cart") == 0) { /* the alias eventfile.h documents */
        ev.type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_ADD_TO_CART;
        ev.custom_type = (char *)"";
    }
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = (char *)collection;
    req.user_id = (char *)user_id;
    req.n_events = 1;
    req.events = evs;
    req.request_id = (char *)request_id;
    char msg[512];
    int rc = publish_record(t, "PutEvents", &req.base, LOG_DEFAULT_WAIT_MS, seq, msg, sizeof msg);
    return rc ? aff__fail(err, rc, "%s", msg) : 0;
}

/* ---- erasure of a deleted user's raw events from the stream (docs/replication.md) ---------- */

typedef struct erase_target {
    const char *collection; /* "": every collection */
    const char *user;
} erase_target;

/* Whether a published record is one of the target user's PutEvents (in the collection). */
static bool is_users_events(void *ctx, const uint8_t *data, size_t len)
{
    const erase_target *tg = ctx;
    Affinity__V1__LogRecord *rec = affinity__v1__log_record__unpack(NULL, len, data);
    bool match = false;
    if (rec && strcmp(rec->method, "PutEvents") == 0) {
        Affinity__V1__PutEventsRequest *r = affinity__v1__put_events_request__unpack(
            NULL, rec->request.len, rec->request.data);
        match = r && strcmp(r->user_id, tg->user) == 0 &&
                (!tg->collection[0] || strcmp(r->collection, tg->collection) == 0);
        if (r) affinity__v1__put_events_request__free_unpacked(r, NULL);
    }
    if (rec) affinity__v1__log_record__free_unpacked(rec, NULL);
    return match;
}

/* After a DeleteUser record (sequence seq) was applied here without error: securely erases
 * the user's PutEvents records below it from the stream (their bucket's subject), so the raw
 * events leave the stream's message files before the call is answered. A failure is logged,
 * not returned: the user is erased from every replica's state either way, and truncation
 * below the next snapshots removes the records later (the stated bound). Opt-out records are
 * kept: the opt-out outlives DeleteUser and lagging replicas must still apply it. */
static void erase_deleted_users_events(tcall *c, uint64_t seq)
{
    const Affinity__V1__DeleteUserRequest *r = (const void *)c->req;
    erase_target tg = {.collection = r->collection, .user = r->user_id};
    char bucket[16], seqs[24], n[24];
    snprintf(bucket, sizeof bucket, "u.%02u", fnv1a(r->user_id) % LOG_USER_BUCKETS);
    snprintf(seqs, sizeof seqs, "%" PRIu64, seq);
    uint64_t erased = 0;
    aff_err err;
    int rc = replog_erase_records(c->t->cfg.log, bucket, seq, is_users_events, &tg, &erased, &err);
    snprintf(n, sizeof n, "%" PRIu64, erased);
    if (rc)
        aff_log_kv(AFF_LOG_WARN,
                   "DeleteUser: the user's events could not all be erased from the write log "
                   "now; truncation removes them later",
                   "sequence", seqs, "erased", n, "error", err.msg, NULL);
    else
        aff_log_kv(AFF_LOG_INFO, "DeleteUser: the user's events erased from the write log",
                   "sequence", seqs, "records", n, NULL);
}

/* Whether the DeleteUser record seq was applied here without error (with --log-ack
 * committed the caller has not waited for it: wait now, within the call's deadline). */
static bool delete_user_applied(tcall *c, const tcapture *cap, uint64_t seq)
{
    if (!c->t->cfg.log_ack_committed) return cap->code == 0;
    if (!replog_wait_applied(c->t->cfg.log, seq, ms_left(c))) return false;
    tcapture applied;
    if (!take_result(c->t, seq, &applied)) return false;
    bool ok = applied.code == 0;
    transport__capture_free(&applied);
    return ok;
}

/* ---- retention cuts through the log (retention_start_replicated) ----------------------------- */

#define RETAIN_METHOD "RetainEvents"

int transport_log_publish_retention(void *ctx, int64_t cutoff_ms, aff_err *err)
{
    transport *t = ctx;
    if (!t->cfg.log) return aff__fail(err, AFF_EUNAVAILABLE, "the write log is not set yet");
    char rid[48];
    snprintf(rid, sizeof rid, "retain/%" PRId64, cutoff_ms);
    Affinity__V1__LogRecord rec = AFFINITY__V1__LOG_RECORD__INIT;
    rec.version = LOG_RECORD_VERSION;
    rec.method = (char *)RETAIN_METHOD;
    rec.time_ms = wall_ms();
    rec.request_id = rid;
    rec.origin = t->cfg.log_origin;
    rec.retain_before_ms = cutoff_ms;
    size_t len = protobuf_c_message_get_packed_size(&rec.base);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return aff__fail(err, AFF_ENOMEM, "out of memory encoding a retention cut");
    protobuf_c_message_pack(&rec.base, buf);
    uint64_t seq = 0;
    int rc = replog_publish(t->cfg.log, "c", buf, len, rid, LOG_DEFAULT_WAIT_MS, &seq, err);
    free(buf);
    return rc;
}

/* Applies a retention cut at its position in the log (apply thread): the same cut, the same
 * state, so every replica erases the same events. */
static void apply_retention(transport *t, const Affinity__V1__LogRecord *rec, uint64_t seq)
{
    aff_err err;
    uint64_t users = 0, events = 0;
    replog_set_record_time(rec->time_ms);
    store_set_log_sequence(seq);
    int rc = profiles_expire(t->cfg.profiles, rec->retain_before_ms, &users, &events, &err);
    store_set_log_sequence(0);
    replog_set_record_time(0);
    char seqs[24], cut[24], n_users[24], n_events[24];
    snprintf(seqs, sizeof seqs, "%" PRIu64, seq);
    snprintf(cut, sizeof cut, "%" PRId64, rec->retain_before_ms);
    snprintf(n_users, sizeof n_users, "%" PRIu64, users);
    snprintf(n_events, sizeof n_events, "%" PRIu64, events);
    if (rc)
        aff_log_kv(AFF_LOG_ERROR, "write log: a retention cut failed", "sequence", seqs,
                   "before ms", cut, "error", err.msg, NULL);
    else
        aff_log_kv(AFF_LOG_INFO, "event retention cut applied", "sequence", seqs, "before ms",
                   cut, "users", n_users, "events", n_events, NULL);
}

/* A unary write in log mode (blocking-work thread): publish, wait, answer. */
static void log_write_job(tcall *c)
{
    tcapture cap;
    uint64_t seq = 0;
    char msg[512];
    int rc = transport__log_write(c, short_name(c->def), c->req, &cap, &seq, msg, sizeof msg);
    if (rc) {
        transport__fail(c, rc, "%s", msg);
        return;
    }
    if (strcmp(short_name(c->def), "DeleteUser") == 0 && delete_user_applied(c, &cap, seq))
        erase_deleted_users_events(c, seq);
    if (cap.code) {
        tcall_finish(c, cap.code, cap.msg, NULL);
    } else if (!append_varint_field(&cap, /* TrainResponse.log_sequence is field 118 */
                                    strcmp(short_name(c->def), "Train") == 0 ? FIELD_LATE
                                                                            : FIELD_LOG_SEQUENCE,
                                    seq)) {
        transport__fail(c, AFF_ENOMEM, "out of memory encoding the response");
    } else {
        tcall_finish_packed(c, cap.bytes, cap.len);
    }
    transport__capture_free(&cap);
}

static uint32_t min_wait_ms(const transport *t)
{
    return t->cfg.min_sequence_wait_ms ? t->cfg.min_sequence_wait_ms : 1000;
}

bool transport__log_behind(const tcall *c, uint64_t want)
{
    return c->t->cfg.log && want && replog_applied(c->t->cfg.log) < want;
}

int transport__log_wait_sequence(tcall *c, uint64_t want, aff_err *err)
{
    int64_t wait = min_wait_ms(c->t);
    int64_t left = ms_left(c);
    if (tcall_deadline_ns(c) && left < wait) wait = left;
    if (replog_wait_applied(c->t->cfg.log, want, wait)) return 0;
    return aff__fail(err, AFF_EUNAVAILABLE,
                     "min_log_sequence %" PRIu64 " is not applied on this replica yet "
                     "(applied %" PRIu64 ") after %" PRId64 " ms; retry here or on another "
                     "replica",
                     want, replog_applied(c->t->cfg.log), wait);
}

/* A serving call behind its min_log_sequence (blocking-work thread): wait, then serve. */
static void min_sequence_job(tcall *c)
{
    aff_err err;
    if (transport__log_wait_sequence(c, min_sequence_of(c->req), &err)) {
        tcall_fail(c, &err);
        return;
    }
    c->def->unary(c, c->req);
}

bool transport__log_route(tcall *c)
{
    const char *name = short_name(c->def);
    if (replicated(name)) {
        transport__defer(c, log_write_job);
        return true;
    }
    if (transport__log_behind(c, min_sequence_of(c->req))) {
        transport__defer(c, min_sequence_job);
        return true;
    }
    return false;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

void transport__log_lag(transport *t, double *p50, double *p99)
{
    static _Thread_local double sorted[LOG_LAGS];
    pthread_mutex_lock(&t->log_results->mu);
    size_t n = t->log_results->n_lags < LOG_LAGS ? (size_t)t->log_results->n_lags : LOG_LAGS;
    memcpy(sorted, t->log_results->lag_ms, n * sizeof *sorted);
    pthread_mutex_unlock(&t->log_results->mu);
    *p50 = *p99 = 0;
    if (!n) return;
    qsort(sorted, n, sizeof *sorted, cmp_double);
    *p50 = sorted[(n - 1) / 2];
    *p99 = sorted[(size_t)((double)(n - 1) * 0.99)];
}

/* Records applied by a handler of their own rather than their method's unary handler. */
typedef struct own_record {
    const char *method;
    const ProtobufCMessageDescriptor *desc;
    void (*apply)(tcall *c, ProtobufCMessage *req);
} own_record;

static const own_record *own_record_of(const char *method)
{
    static const own_record records[] = {
        {"UpsertItems", &affinity__v1__upsert_items_request__descriptor,
         transport__apply_upsert_items},
        {"ImportEvents", &affinity__v1__import_events_request__descriptor,
         transport__apply_import_events},
        {"ModelPart", &affinity__v1__model_part_record__descriptor, transport__apply_model_part},
        {"ModelCommit", &affinity__v1__model_commit_record__descriptor,
         transport__apply_model_commit},
    };
    for (size_t i = 0; i < sizeof records / sizeof records[0]; i++)
        if (strcmp(records[i].method, method) == 0) return &records[i];
    return NULL;
}

/* Keeps the answer of a record this replica published for its waiting caller. */
static void put_result(transport *t, uint64_t seq, tcapture *cap)
{
    tlog_results *r = t->log_results;
    pthread_mutex_lock(&r->mu);
    size_t i = seq % LOG_RESULTS;
    transport__capture_free(&r->slot[i].cap);
    r->slot[i].seq = seq;
    r->slot[i].cap = *cap;
    pthread_mutex_unlock(&r->mu);
    memset(cap, 0, sizeof *cap);
}

void transport_log_apply(void *ctx, uint64_t seq, const uint8_t *data, size_t len)
{
    transport *t = ctx;
    char seqs[24];
    snprintf(seqs, sizeof seqs, "%" PRIu64, seq);
    Affinity__V1__LogRecord *rec = affinity__v1__log_record__unpack(NULL, len, data);
    if (!rec || rec->version != LOG_RECORD_VERSION) {
        aff_log_kv(AFF_LOG_ERROR, "write log: skipping a record this build cannot read",
                   "sequence", seqs, NULL);
        if (rec) affinity__v1__log_record__free_unpacked(rec, NULL);
        return;
    }
    /* PutEvents records (most of the log) share the store's apply batch: one transaction for
     * consecutive ones, committed by the log (replog_config.commit). Its locks (widgets,
     * outcomes, experiments, model counters) are never held by a thread that writes to the
     * store, so holding the store's write transaction across them cannot deadlock. Any other
     * record commits the batch first and runs alone, as in single-node mode. */
    if (t->cfg.store) {
        if (strcmp(rec->method, "PutEvents") == 0) {
            store_batch_begin(t->cfg.store);
        } else {
            aff_err berr;
            if (store_batch_end(t->cfg.store, &berr))
                aff_log_kv(AFF_LOG_ERROR, "write log: apply batch not committed", "sequence",
                           seqs, "error", berr.msg, NULL);
        }
    }
    if (strcmp(rec->method, RETAIN_METHOD) == 0) {
        apply_retention(t, rec, seq);
        affinity__v1__log_record__free_unpacked(rec, NULL);
        return;
    }
    const own_record *own = own_record_of(rec->method);
    const tmethod_def *def = method_by_name(rec->method); /* NULL for internal records */
    const ProtobufCMessageDescriptor *desc = own ? own->desc : def ? def->req_desc : NULL;
    ProtobufCMessage *req =
        desc ? protobuf_c_message_unpack(desc, NULL, rec->request.len, rec->request.data) : NULL;
    if (!req || (!own && (!def->unary || !replicated(rec->method)))) {
        aff_log_kv(AFF_LOG_ERROR, "write log: skipping a record with an unknown method",
                   "sequence", seqs, "method", rec->method, NULL);
        goto out;
    }
    tcapture cap = {0};
    tcall call;
    memset(&call, 0, sizeof call);
    call.t = t;
    call.def = def;
    call.capture = &cap;
    call.log_own = strcmp(rec->origin, t->cfg.log_origin) == 0;
    call.log_sequence = seq;
    call.start_ns = batcher_now_ns();
    atomic_init(&call.refs, 1);
    pthread_mutex_init(&call.mu, NULL);
    replog_set_record_time(rec->time_ms);
    store_set_log_sequence(seq);
    if (own)
        own->apply(&call, req);
    else
        def->unary(&call, req);
    store_set_log_sequence(0);
    replog_set_record_time(0);
    pthread_mutex_destroy(&call.mu);
    if (!call.finished) {
        cap.code = GRPC_STATUS_INTERNAL;
        snprintf(cap.msg, sizeof cap.msg, "the write was not answered while applied");
    }
    tlog_results *r = t->log_results;
    if (r->n_uncommitted < LOG_UNCOMMITTED) {
        r->uncommitted[r->n_uncommitted++] = rec->time_ms;
    } else { /* cannot happen with REPLOG_BATCH ≤ LOG_UNCOMMITTED; measured now */
        pthread_mutex_lock(&r->mu);
        r->lag_ms[r->n_lags++ % LOG_LAGS] = (double)(wall_ms() - rec->time_ms);
        pthread_mutex_unlock(&r->mu);
    }
    if (call.log_own)
        put_result(t, seq, &cap);
    else
        transport__capture_free(&cap);
out:
    if (req) protobuf_c_message_free_unpacked(req, NULL);
    affinity__v1__log_record__free_unpacked(rec, NULL);
}

int transport_log_commit(void *ctx)
{
    transport *t = ctx;
    aff_err err;
    int rc = t->cfg.store ? store_batch_end(t->cfg.store, &err) : 0;
    if (rc) aff_log_kv(AFF_LOG_ERROR, "write log: apply batch not committed", "error", err.msg, NULL);
    tlog_results *r = t->log_results;
    int64_t now = wall_ms();
    pthread_mutex_lock(&r->mu);
    for (uint32_t i = 0; !rc && i < r->n_uncommitted; i++)
        r->lag_ms[r->n_lags++ % LOG_LAGS] = (double)(now - r->uncommitted[i]);
    pthread_mutex_unlock(&r->mu);
    r->n_uncommitted = 0;
    return rc;
}

/* ---- GetSnapshot: a consistent copy of the store, streamed in chunks ------------------------- */

#define SNAPSHOT_CHUNK (1u << 20)

typedef struct snap_state {
    int fd; /* the copy (already unlinked); -1 until made */
    uint64_t seq, size;
    bool started, first;
} snap_state;

static void snap_state_free(void *p)
{
    snap_state *st = p;
    if (st && st->fd >= 0) close(st->fd);
    free(st);
}

/* Sends the next chunk, or ends the call at the end of the copy (blocking-work thread). */
static void snap_send_next(tcall *c)
{
    snap_state *st = c->state;
    uint8_t *buf = malloc(SNAPSHOT_CHUNK);
    if (!buf) {
        transport__fail(c, AFF_ENOMEM, "out of memory reading the snapshot");
        return;
    }
    ssize_t n = read(st->fd, buf, SNAPSHOT_CHUNK);
    if (n < 0) {
        transport__fail(c, AFF_EIO, "reading the snapshot: %s", strerror(errno));
    } else if (n == 0 && !st->first) {
        tcall_finish(c, 0, NULL, NULL);
    } else {
        Affinity__V1__SnapshotChunk ch = AFFINITY__V1__SNAPSHOT_CHUNK__INIT;
        if (st->first) {
            ch.log_sequence = st->seq;
            ch.total_bytes = st->size;
        }
        st->first = false;
        ch.data.data = buf;
        ch.data.len = (size_t)n;
        if (!tcall_send(c, &ch.base)) /* serialized at once */
            transport__fail(c, AFF_EINTERNAL, "cannot send a snapshot chunk");
    }
    free(buf);
}

static void snap_on_send(tcall *c, bool ok)
{
    if (!ok) {
        tcall_finish(c, GRPC_STATUS_CANCELLED, "the stream broke", NULL);
        return;
    }
    transport__defer(c, snap_send_next);
}

/* Makes the copy (blocking-work thread): a temporary file, unlinked once open. */
static void snap_start(tcall *c)
{
    snap_state *st = c->state;
    const char *tmp = getenv("TMPDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/affinity-snapshot-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0) {
        transport__fail(c, AFF_EIO, "cannot create a snapshot file: %s", strerror(errno));
        return;
    }
    close(fd);
    aff_err err;
    if (store_snapshot(c->t->cfg.store, path, &st->seq, &err)) {
        tcall_fail(c, &err);
        return;
    }
    st->fd = open(path, O_RDONLY | O_CLOEXEC);
    unlink(path);
    struct stat sb;
    if (st->fd < 0 || fstat(st->fd, &sb) != 0) {
        transport__fail(c, AFF_EIO, "cannot read the snapshot back: %s", strerror(errno));
        return;
    }
    st->size = (uint64_t)sb.st_size;
    char seqs[24], size[24];
    snprintf(seqs, sizeof seqs, "%" PRIu64, st->seq);
    snprintf(size, sizeof size, "%" PRIu64, st->size);
    aff_log_kv(AFF_LOG_INFO, "snapshot served", "log sequence", seqs, "bytes", size, NULL);
    snap_send_next(c);
}

static void snap_on_recv(tcall *c, bool ok, grpc_byte_buffer *bb)
{
    snap_state *st = c->state;
    if (bb) grpc_byte_buffer_destroy(bb); /* GetSnapshotRequest has no fields */
    if (!ok) {
        tcall_finish(c, GRPC_STATUS_CANCELLED, "the stream broke", NULL);
        return;
    }
    if (st->started) return;
    st->started = true;
    transport__defer(c, snap_start);
}

void transport__rpc_get_snapshot(tcall *c)
{
    if (!c->t->cfg.store) {
        transport__fail(c, AFF_EUNSUPPORTED, "this server has no store to copy");
        return;
    }
    snap_state *st = calloc(1, sizeof *st);
    if (!st) {
        transport__fail(c, AFF_ENOMEM, "out of memory starting a snapshot");
        return;
    }
    st->fd = -1;
    st->first = true;
    c->state = st;
    c->state_free = snap_state_free;
    c->on_recv = snap_on_recv;
    c->on_send = snap_on_send;
    if (!tcall_recv(c)) transport__fail(c, AFF_EINTERNAL, "cannot read the request");
}

/*
 * transport_import.c: owns the ImportEvents handler, the client-streaming bulk import of
 * historical behaviour events (any users) into one collection.
 *
 * Rules kept: one message is in flight at a time; each is decoded and applied on a
 * blocking-work thread (profiles_import_events: one durable transaction, fsync'ed) before the
 * next is read, so a message whose send completed and was followed by a successful response
 * is on disk. Bad events are rejected one by one (index = position in the whole stream) and
 * the rest applied; a bad message (not decodable, no collection, another collection, no
 * events or too many, unknown collection) ends the call with an error that says how many
 * events were applied before it. The response, after the client's stream ends, carries the
 * counts and the first TRANSPORT_IMPORT_MAX_REPORTED rejections in stream order (a user id
 * longer than AFF_MAX_ID_LEN comes back cut to that length).
 *
 * After each message with applied events, transport_config.on_events (when set) is told how
 * many: the learning model's "retrain after N new events" trigger.
 *
 * Replication (--log, docs/replication.md): the receiving replica keeps the stream's rules
 * (one collection, 1..PROFILES_MAX_IMPORT_EVENTS events a message) and publishes each message
 * as ImportEvents log records of at most TRANSPORT_IMPORT_RECORD_BYTES of events each, with
 * the message id "<request_id>/<message>/<part>"; every replica applies a record with
 * import_events_apply, the function single-node mode runs, so the events are validated once,
 * by the profiles module, the same way everywhere. A message is answered (the next one read)
 * after its records are committed and applied here.
 */
#include "transport_import.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "affinity/v1/affinity.pb-c.h"
#include "log.h"
#include "profiles.h"
#include "transport_codec.h"
#include "transport_handlers.h"

typedef struct import_rejection {
    uint64_t index;
    char user_id[AFF_MAX_ID_LEN + 1];
    char reason[sizeof(((profiles_rejection *)0)->reason)];
} import_rejection;

typedef struct import_state {
    char collection[AFF_MAX_NAME_LEN + 1];
    uint64_t seen; /* events received in earlier messages: the stream index of the next one */
    uint64_t applied, rejected;
    uint64_t messages;
    uint64_t log_sequence;       /* replication: the last record's sequence */
    uint64_t duplicate_messages; /* replication: messages the log already held */
    char request_id[AFF_MAX_ID_LEN + 1]; /* replication: from the first message */
    import_rejection *reported; /* the first TRANSPORT_IMPORT_MAX_REPORTED; allocated lazily */
    size_t n_reported;
    bool recv_ok;              /* the receive handed to import_work (one at a time) */
    grpc_byte_buffer *recv_bb; /* owned until import_work takes it */
} import_state;

static void *xcalloc(size_t n, size_t size)
{
    return calloc(n ? n : 1, size);
}

static void import_respond(tcall *c, const import_state *st)
{
    Affinity__V1__ImportRejection *rej = xcalloc(st->n_reported, sizeof *rej);
    Affinity__V1__ImportRejection **ptrs = xcalloc(st->n_reported, sizeof *ptrs);
    if (!rej || !ptrs) {
        tcall_finish(c, aff_status_grpc_code(AFF_ENOMEM), "out of memory answering an import",
                     NULL);
        goto out;
    }
    for (size_t i = 0; i < st->n_reported; i++) {
        affinity__v1__import_rejection__init(&rej[i]);
        rej[i].index = st->reported[i].index;
        rej[i].user_id = st->reported[i].user_id;
        rej[i].reason = st->reported[i].reason;
        ptrs[i] = &rej[i];
    }
    Affinity__V1__ImportEventsResponse resp = AFFINITY__V1__IMPORT_EVENTS_RESPONSE__INIT;
    resp.applied_count = st->applied;
    resp.rejected_count = st->rejected;
    resp.n_rejected = st->n_reported;
    resp.rejected = ptrs;
    resp.log_sequence = st->log_sequence;
    resp.duplicate_messages = st->duplicate_messages;
    tcall_finish(c, 0, NULL, &resp.base);
    if (st->messages && !c->capture) {
        char applied[24], rejected[24];
        snprintf(applied, sizeof applied, "%llu", (unsigned long long)st->applied);
        snprintf(rejected, sizeof rejected, "%llu", (unsigned long long)st->rejected);
        aff_log_kv(AFF_LOG_INFO, "events imported", "collection", st->collection, "applied",
                   applied, "rejected", rejected, NULL);
    }
out:
    free(rej);
    free(ptrs);
}

/* Records one rejection (stream index, user, reason); only the first ones are kept. */
static void import_reject(import_state *st, uint64_t index, const char *user, const char *reason)
{
    st->rejected++;
    if (st->n_reported == TRANSPORT_IMPORT_MAX_REPORTED) return;
    if (!st->reported) {
        st->reported = calloc(TRANSPORT_IMPORT_MAX_REPORTED, sizeof *st->reported);
        if (!st->reported) return; /* counted, not listed */
    }
    import_rejection *r = &st->reported[st->n_reported++];
    r->index = index;
    snprintf(r->user_id, sizeof r->user_id, "%s", user ? user : "");
    snprintf(r->reason, sizeof r->reason, "%s", reason);
}

/* Checks the message's collection against the stream's; 0 or a gRPC code with msg filled. */
static int import_collection(import_state *st, const char *name, char *msg, size_t size)
{
    if (name[0]) {
        if (st->collection[0] && strcmp(st->collection, name) != 0) {
            snprintf(msg, size,
                     "message %llu names collection \"%.64s\" but the stream began with "
                     "\"%s\"; one ImportEvents stream imports into one collection",
                     (unsigned long long)st->messages, name, st->collection);
            return GRPC_STATUS_INVALID_ARGUMENT;
        }
        if (strlen(name) > AFF_MAX_NAME_LEN) {
            snprintf(msg, size, "collection name is longer than %d bytes", AFF_MAX_NAME_LEN);
            return GRPC_STATUS_INVALID_ARGUMENT;
        }
        strcpy(st->collection, name);
    } else if (!st->collection[0]) {
        snprintf(msg, size, "the first ImportEventsRequest must name the collection");
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    return 0;
}

/* Checks one decoded message against the stream's rules (its collection, its number of
 * events); 0 or a gRPC code with msg filled. */
static int import_check(import_state *st, const Affinity__V1__ImportEventsRequest *r, char *msg,
                        size_t size)
{
    int code = import_collection(st, r->collection, msg, size);
    if (code) return code;
    if (r->n_events < 1 || r->n_events > PROFILES_MAX_IMPORT_EVENTS) {
        snprintf(msg, size, "message %llu has %zu events; ImportEvents takes 1..%d per message",
                 (unsigned long long)st->messages, r->n_events, PROFILES_MAX_IMPORT_EVENTS);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    return 0;
}

/* Applies the events of r (already checked) to st->collection: the part of a message that
 * single-node mode runs where the call arrives and log mode runs on every replica's apply
 * thread. Rejections are recorded at stream index st->seen + i; st's counts grow. Returns 0
 * or a gRPC code with msg filled (then nothing of r was applied). */
static int import_events_apply(transport *t, import_state *st,
                               const Affinity__V1__ImportEventsRequest *r, char *msg, size_t size)
{
    size_t n = r->n_events;
    int code = 0;
    size_t n_kv = 0;
    for (size_t i = 0; i < n; i++)
        if (r->events[i]->event) n_kv += r->events[i]->event->n_context;
    profiles_user_event *events = xcalloc(n, sizeof *events);
    uint32_t *index = xcalloc(n, sizeof *index); /* events[j] is message event index[j] */
    store_kv *kv = xcalloc(n_kv, sizeof *kv);
    profiles_rejection *rej = xcalloc(n, sizeof *rej);
    if (!events || !index || !kv || !rej) {
        snprintf(msg, size, "out of memory reading %zu events", n);
        code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        goto out;
    }
    size_t m = 0, off = 0;
    for (size_t i = 0; i < n; i++) {
        const Affinity__V1__ImportedEvent *ie = r->events[i];
        const Affinity__V1__Event *e = ie->event;
        if (!e) continue; /* rejected below, in stream order */
        index[m] = (uint32_t)i;
        events[m++] = (profiles_user_event){.user_id = ie->user_id,
                                            .event = transport__event_from_pb(e, kv + off)};
        off += e->n_context;
    }
    uint32_t applied = 0, n_rej = 0;
    aff_err err;
    if (m && profiles_import_events(t->cfg.profiles, st->collection, events, m, &applied, rej,
                                    &n_rej, &err)) {
        snprintf(msg, size, "%s", err.msg);
        code = aff_status_grpc_code(err.code);
        goto out;
    }
    /* Merge the events without an Event and the profiles module's rejections (both ascending)
     * into stream order. */
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const Affinity__V1__ImportedEvent *ie = r->events[i];
        if (!ie->event)
            import_reject(st, st->seen + i, ie->user_id, "event is missing (ImportedEvent.event)");
        else if (k < n_rej && index[rej[k].index] == i)
            import_reject(st, st->seen + i, ie->user_id, rej[k++].reason);
    }
    st->seen += n;
    st->applied += applied;
    st->messages++;
    if (applied && t->cfg.on_events)
        t->cfg.on_events(t->cfg.on_events_ctx, st->collection, applied);
out:
    free(events);
    free(index);
    free(kv);
    free(rej);
    return code;
}

/* Log mode: publishes message r (checked) as ImportEvents records of at most
 * TRANSPORT_IMPORT_RECORD_BYTES of events each, in order, each committed and applied here
 * before the next, and merges their applied answers into st (rejection indexes shifted to
 * the stream's). An event larger than a record can carry is rejected here (it never enters
 * the log). Returns 0 or a gRPC code with msg filled; the records before a failure stay
 * committed (st counts them). */
static int import_through_log(tcall *c, const Affinity__V1__ImportEventsRequest *r, char *msg,
                              size_t size)
{
    import_state *st = c->state;
    if (st->messages == 0 && r->request_id[0]) {
        if (strlen(r->request_id) > AFF_MAX_ID_LEN) {
            snprintf(msg, size, "request_id is longer than %d bytes", AFF_MAX_ID_LEN);
            return GRPC_STATUS_INVALID_ARGUMENT;
        }
        strcpy(st->request_id, r->request_id);
    }
    bool duplicate = false;
    size_t from = 0;
    for (uint32_t part = 0; from < r->n_events; part++) {
        size_t to = from, bytes = 0;
        while (to < r->n_events) {
            size_t b = protobuf_c_message_get_packed_size(&r->events[to]->base) + 8; /* + tag */
            if (to > from && bytes + b > TRANSPORT_IMPORT_RECORD_BYTES) break;
            bytes += b;
            to++;
        }
        if (bytes > TRANSPORT_IMPORT_RECORD_BYTES) { /* one event, too large for a record */
            char why[96];
            snprintf(why, sizeof why, "the event is %zu bytes; a log record carries at most %u",
                     bytes, TRANSPORT_IMPORT_RECORD_BYTES);
            import_reject(st, st->seen + from, r->events[from]->user_id, why);
            from = to;
            continue;
        }
        Affinity__V1__ImportEventsRequest rec = AFFINITY__V1__IMPORT_EVENTS_REQUEST__INIT;
        rec.collection = st->collection;
        rec.n_events = to - from;
        rec.events = r->events + from;
        char rid[AFF_MAX_ID_LEN + 48] = "";
        if (st->request_id[0])
            snprintf(rid, sizeof rid, "%s/%llu/%u", st->request_id,
                     (unsigned long long)st->messages, part);
        rec.request_id = rid;
        tcapture cap;
        uint64_t seq = 0;
        char why[512];
        int rc = transport__log_write(c, "ImportEvents", &rec.base, &cap, &seq, why, sizeof why);
        if (rc) {
            snprintf(msg, size, "message %llu, events %zu..%zu: %.400s",
                     (unsigned long long)st->messages, from, to - 1, why);
            return aff_status_grpc_code(rc);
        }
        int code = cap.code;
        if (code) {
            snprintf(msg, size, "message %llu: %.400s", (unsigned long long)st->messages, cap.msg);
            transport__capture_free(&cap);
            return code;
        }
        /* A record always answers some applied or rejected events: no answer means the log
         * dropped this record as a duplicate of an earlier try's (transport__log_write), or
         * --log-ack committed (answered before the apply: counts unknown, as for every write). */
        Affinity__V1__ImportEventsResponse *resp =
            cap.bytes ? affinity__v1__import_events_response__unpack(NULL, cap.len, cap.bytes)
                      : NULL;
        if (!resp) {
            duplicate = !c->t->cfg.log_ack_committed;
        } else {
            st->applied += resp->applied_count;
            for (size_t j = 0; j < resp->n_rejected; j++)
                import_reject(st, st->seen + from + resp->rejected[j]->index,
                              resp->rejected[j]->user_id, resp->rejected[j]->reason);
            st->rejected += resp->rejected_count - resp->n_rejected; /* counted, not listed */
            affinity__v1__import_events_response__free_unpacked(resp, NULL);
        }
        if (seq > st->log_sequence) st->log_sequence = seq;
        transport__capture_free(&cap);
        from = to;
    }
    st->seen += r->n_events;
    st->messages++;
    st->duplicate_messages += duplicate;
    return 0;
}

/* One stream message: applied durably before the next is read. Runs on a blocking-work
 * thread. */
static void import_message(tcall *c, bool ok, grpc_byte_buffer *bb)
{
    import_state *st = c->state;
    char msg[512];
    if (!ok) {
        if (bb) grpc_byte_buffer_destroy(bb);
        tcall_finish(c, GRPC_STATUS_CANCELLED, "the stream broke before it ended", NULL);
        return;
    }
    if (!bb) { /* the client ended its stream */
        import_respond(c, st);
        return;
    }
    if (atomic_load(&c->t->draining)) {
        grpc_byte_buffer_destroy(bb);
        snprintf(msg, sizeof msg,
                 "the server is shutting down; %llu events were applied before it began",
                 (unsigned long long)st->applied);
        tcall_finish(c, GRPC_STATUS_UNAVAILABLE, msg, NULL);
        return;
    }
    char why[400];
    Affinity__V1__ImportEventsRequest *r = (void *)transport__unpack_checked(
        bb, &affinity__v1__import_events_request__descriptor, why, sizeof why);
    grpc_byte_buffer_destroy(bb);
    if (!r) {
        snprintf(msg, sizeof msg,
                 "message %llu is not a valid ImportEventsRequest%s%.300s; %llu events applied "
                 "before it",
                 (unsigned long long)st->messages, why[0] ? ": " : "", why,
                 (unsigned long long)st->applied);
        tcall_finish(c, GRPC_STATUS_INVALID_ARGUMENT, msg, NULL);
        return;
    }
    int code = import_check(st, r, msg, sizeof msg);
    if (!code && c->t->cfg.log) {
        code = import_through_log(c, r, msg, sizeof msg);
    } else if (!code && (code = import_events_apply(c->t, st, r, why, sizeof why))) {
        snprintf(msg, sizeof msg, "message %llu: %.400s", (unsigned long long)st->messages, why);
    }
    protobuf_c_message_free_unpacked(&r->base, NULL);
    if (code) {
        size_t len = strlen(msg);
        snprintf(msg + len, sizeof msg - len, "; %llu events applied before it",
                 (unsigned long long)st->applied);
        tcall_finish(c, code, msg, NULL);
    } else if (!tcall_recv(c))
        tcall_finish(c, GRPC_STATUS_INTERNAL, "cannot read the next message", NULL);
}

static void import_work(tcall *c)
{
    import_state *st = c->state;
    grpc_byte_buffer *bb = st->recv_bb;
    st->recv_bb = NULL;
    import_message(c, st->recv_ok, bb);
}

static void import_on_recv(tcall *c, bool ok, grpc_byte_buffer *bb)
{
    import_state *st = c->state;
    st->recv_ok = ok;
    st->recv_bb = bb;
    transport__defer(c, import_work);
}

static void import_state_free(void *p)
{
    import_state *st = p;
    if (!st) return;
    if (st->recv_bb) grpc_byte_buffer_destroy(st->recv_bb);
    free(st->reported);
    free(st);
}

void transport__import_events(tcall *c)
{
    import_state *st = calloc(1, sizeof *st);
    if (!st) {
        tcall_finish(c, aff_status_grpc_code(AFF_ENOMEM), "out of memory starting an import", NULL);
        return;
    }
    c->state = st;
    c->state_free = import_state_free;
    c->on_recv = import_on_recv;
    if (!tcall_recv(c))
        tcall_finish(c, aff_status_grpc_code(AFF_EINTERNAL), "cannot read the request stream",
                     NULL);
}

void transport__apply_import_events(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__ImportEventsRequest *r = (void *)msg;
    import_state *st = calloc(1, sizeof *st);
    char why[512];
    int code = st ? import_collection(st, r->collection, why, sizeof why)
                  : GRPC_STATUS_RESOURCE_EXHAUSTED;
    if (!st) snprintf(why, sizeof why, "out of memory applying an import");
    if (!code) code = import_events_apply(c->t, st, r, why, sizeof why);
    if (code)
        tcall_finish(c, code, why, NULL);
    else
        import_respond(c, st);
    import_state_free(st);
}

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
    import_rejection *reported; /* the first TRANSPORT_IMPORT_MAX_REPORTED; allocated lazily */
    size_t n_reported;
    bool recv_ok;              /* the receive handed to import_work (one at a time) */
    grpc_byte_buffer *recv_bb; /* owned until import_work takes it */
} import_state;

static void *xcalloc(size_t n, size_t size)
{
    return calloc(n ? n : 1, size);
}

static void import_respond(tcall *c)
{
    import_state *st = c->state;
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
    tcall_finish(c, 0, NULL, &resp.base);
    if (st->messages) {
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

/* Applies one decoded message; 0 or a gRPC code with msg filled (then nothing of this message
 * was applied; the caller adds how much earlier ones applied). */
static int import_apply(tcall *c, const Affinity__V1__ImportEventsRequest *r, char *msg,
                        size_t size)
{
    import_state *st = c->state;
    size_t n = r->n_events;
    int code;
    if ((code = import_collection(st, r->collection, msg, size))) return code;
    if (n < 1 || n > PROFILES_MAX_IMPORT_EVENTS) {
        snprintf(msg, size, "message %llu has %zu events; ImportEvents takes 1..%d per message",
                 (unsigned long long)st->messages, n, PROFILES_MAX_IMPORT_EVENTS);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
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
    if (m && profiles_import_events(c->t->cfg.profiles, st->collection, events, m, &applied, rej,
                                    &n_rej, &err)) {
        snprintf(msg, size, "message %llu: %s", (unsigned long long)st->messages, err.msg);
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
    if (applied && c->t->cfg.on_events)
        c->t->cfg.on_events(c->t->cfg.on_events_ctx, st->collection, applied);
out:
    free(events);
    free(index);
    free(kv);
    free(rej);
    return code;
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
        import_respond(c);
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
    int code = import_apply(c, r, msg, sizeof msg);
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
    if (c->t->cfg.log) { /* replication: imports have no log record yet */
        tcall_finish(c, aff_status_grpc_code(AFF_EPRECONDITION),
                     "ImportEvents is not replicated through the write log yet; with --log "
                     "send history as PutEvents (docs/replication.md)",
                     NULL);
        return;
    }
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

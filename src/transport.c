/*
 * transport.c: owns the gRPC server core — completion queues and their threads, the request
 * slots for every registered method and for unknown methods, the call life cycle, bearer
 * token checks, graceful shutdown. The RPC handlers live in transport_rpc.c.
 *
 * Rules kept: every tag is a ttag; a call is freed only by its last unref; no handler runs
 * with the transport mutex held; unknown methods are answered UNIMPLEMENTED at once because
 * SLOTS_UNKNOWN grpc_server_request_call slots stay armed on every queue.
 */
#include "transport.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "transport_auth.h"
#include "transport_codec.h"
#include "transport_guard.h"
#include "transport_internal.h"

#define SLOTS_PER_METHOD 2 /* armed requests per method per completion queue */
#define SLOTS_UNKNOWN    2

/* ---- call life cycle ------------------------------------------------------------------- */

static void on_request(void *arg, bool ok);
static void on_unknown(void *arg, bool ok);
static void on_final(void *arg, bool ok);
static void on_recv_done(void *arg, bool ok);
static void on_send_done(void *arg, bool ok);
static bool collection_in_scope(const tauth_key *key, const char *collection, char *msg,
                                size_t size);

static tcall *tcall_new(transport *t, grpc_completion_queue *cq, size_t def_index)
{
    tcall *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->t = t;
    c->cq = cq;
    c->def = def_index < t->n_defs ? &t->defs[def_index] : NULL;
    c->registered = c->def ? t->registered[def_index] : NULL;
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    c->status_details = grpc_empty_slice();
    atomic_init(&c->refs, 1);
    pthread_mutex_init(&c->mu, NULL);
    c->t_request = (ttag){c->def ? on_request : on_unknown, c};
    c->t_recv = (ttag){on_recv_done, c};
    c->t_send = (ttag){on_send_done, c};
    c->t_final = (ttag){on_final, c};
    return c;
}

void tcall_ref(tcall *c)
{
    atomic_fetch_add(&c->refs, 1);
}

void tcall_unref(tcall *c)
{
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    if (c->state_free) c->state_free(c->state);
    if (c->req) protobuf_c_message_free_unpacked(c->req, NULL);
    if (c->payload) grpc_byte_buffer_destroy(c->payload);
    if (c->recv_bb) grpc_byte_buffer_destroy(c->recv_bb);
    if (c->send_bb) grpc_byte_buffer_destroy(c->send_bb);
    grpc_slice_unref(c->status_details);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    if (c->call) grpc_call_unref(c->call);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Arms one request slot for method def_index (or an unknown-method slot when def_index is
 * n_defs) on cq. Failure only when shutting down or out of memory; logged. */
static void arm_slot(transport *t, grpc_completion_queue *cq, size_t def_index)
{
    tcall *c = tcall_new(t, cq, def_index);
    if (!c) {
        aff_log(AFF_LOG_ERROR, "out of memory arming a request slot");
        return;
    }
    grpc_call_error e;
    if (c->def)
        e = grpc_server_request_registered_call(t->server, c->registered, &c->call, &c->deadline,
                                                &c->md, c->def->req_desc ? &c->payload : NULL, cq,
                                                cq, &c->t_request);
    else
        e = grpc_server_request_call(t->server, &c->call, &c->details, &c->md, cq, cq,
                                     &c->t_request);
    if (e != GRPC_CALL_OK) {
        aff_log(AFF_LOG_ERROR, "cannot arm a request slot (grpc_call_error %d)", (int)e);
        tcall_unref(c);
    }
}

int64_t tcall_deadline_ns(const tcall *c)
{
    gpr_timespec d = gpr_convert_clock_type(c->deadline, GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(d, gpr_inf_future(GPR_CLOCK_MONOTONIC)) == 0) return 0;
    gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);
    gpr_timespec left = gpr_time_sub(d, now);
    int64_t left_ns = (int64_t)left.tv_sec * 1000000000 + left.tv_nsec;
    return batcher_now_ns() + left_ns;
}

static void start_batch(tcall *c, const grpc_op *ops, size_t n, ttag *tag)
{
    tcall_ref(c);
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK) {
        aff_log(AFF_LOG_ERROR, "grpc_call_start_batch failed (grpc_call_error %d)", (int)e);
        /* The tag will never come back: run its step as failed here. */
        tag->fn(tag->arg, false);
    }
}

/* A call applied from the write log keeps its answer (transport_log.c). */
static void capture_finish(tcall *c, int grpc_code, const char *msg, const ProtobufCMessage *resp)
{
    tcapture *cap = c->capture;
    c->finished = true;
    cap->code = grpc_code;
    snprintf(cap->msg, sizeof cap->msg, "%s", msg ? msg : "");
    if (grpc_code == 0 && resp) {
        cap->len = protobuf_c_message_get_packed_size(resp);
        cap->bytes = malloc(cap->len ? cap->len : 1);
        if (!cap->bytes) {
            cap->code = GRPC_STATUS_RESOURCE_EXHAUSTED;
            snprintf(cap->msg, sizeof cap->msg, "out of memory encoding the response");
            cap->len = 0;
        } else {
            protobuf_c_message_pack(resp, cap->bytes);
        }
    }
}

/* Answers the call once: bb (taken; NULL: no message) when grpc_code is 0, else the status.
 * A call applied from the write log keeps resp in its capture instead. */
static void finish(tcall *c, int grpc_code, const char *msg, const ProtobufCMessage *resp,
                   grpc_byte_buffer *bb)
{
    pthread_mutex_lock(&c->mu);
    if (c->capture && !c->finished) {
        capture_finish(c, grpc_code, msg, resp);
        pthread_mutex_unlock(&c->mu);
        return;
    }
    if (c->finished) {
        pthread_mutex_unlock(&c->mu);
        if (bb) grpc_byte_buffer_destroy(bb);
        return;
    }
    c->finished = true;
    grpc_op ops[4];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->sent_initial_md) {
        c->sent_initial_md = true;
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    }
    if (grpc_code == 0 && resp && !bb) bb = transport__pack(resp);
    if (grpc_code == 0 && (resp || bb)) {
        c->send_bb = bb;
        if (!c->send_bb) {
            grpc_code = GRPC_STATUS_RESOURCE_EXHAUSTED;
            msg = "out of memory encoding the response";
        } else {
            ops[n].op = GRPC_OP_SEND_MESSAGE;
            ops[n++].data.send_message.send_message = c->send_bb;
        }
    } else if (bb) {
        grpc_byte_buffer_destroy(bb);
    }
    grpc_slice_unref(c->status_details);
    c->status_details = grpc_slice_from_copied_string(msg ? msg : "");
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    if (c->trailer_key) {
        c->trailer.key = grpc_slice_from_static_string(c->trailer_key);
        c->trailer.value = grpc_slice_from_static_string(c->trailer_value);
        ops[n].data.send_status_from_server.trailing_metadata_count = 1;
        ops[n].data.send_status_from_server.trailing_metadata = &c->trailer;
    }
    ops[n].data.send_status_from_server.status = (grpc_status_code)grpc_code;
    ops[n++].data.send_status_from_server.status_details = &c->status_details;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    pthread_mutex_unlock(&c->mu);
    if (c->def && c->t->metric_ids[c->def - c->t->defs] >= 0)
        metrics_observe_request(c->t->cfg.metrics,
                                (metrics_method)c->t->metric_ids[c->def - c->t->defs], grpc_code,
                                (uint64_t)(batcher_now_ns() - c->start_ns));
    if (grpc_code != 0)
        aff_log_kv(AFF_LOG_DEBUG, "call failed", "method", c->def ? c->def->path : "(unknown)",
                   "status", msg ? msg : "", NULL);
    start_batch(c, ops, n, &c->t_final);
}

void tcall_finish(tcall *c, int grpc_code, const char *msg, const ProtobufCMessage *resp)
{
    finish(c, grpc_code, msg, resp, NULL);
}

void tcall_finish_packed(tcall *c, const uint8_t *bytes, size_t len)
{
    grpc_slice sl = grpc_slice_from_copied_buffer((const char *)bytes, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    finish(c, 0, NULL, NULL, bb);
}

void tcall_set_trailer(tcall *c, const char *key, const char *value)
{
    pthread_mutex_lock(&c->mu);
    c->trailer_key = key;
    snprintf(c->trailer_value, sizeof c->trailer_value, "%s", value);
    pthread_mutex_unlock(&c->mu);
}

void tcall_fail(tcall *c, const aff_err *err)
{
    tcall_finish(c, aff_status_grpc_code(err->code), err->msg, NULL);
}

bool tcall_recv(tcall *c)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    tcall_ref(c);
    if (grpc_call_start_batch(c->call, &op, 1, &c->t_recv, NULL) != GRPC_CALL_OK) {
        tcall_unref(c);
        return false;
    }
    return true;
}

bool tcall_send(tcall *c, const ProtobufCMessage *msg)
{
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    pthread_mutex_lock(&c->mu);
    if (!c->sent_initial_md) {
        c->sent_initial_md = true;
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    }
    if (c->send_bb) grpc_byte_buffer_destroy(c->send_bb);
    c->send_bb = transport__pack(msg);
    grpc_byte_buffer *bb = c->send_bb;
    pthread_mutex_unlock(&c->mu);
    if (!bb) return false;
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = bb;
    tcall_ref(c);
    if (grpc_call_start_batch(c->call, ops, n, &c->t_send, NULL) != GRPC_CALL_OK) {
        tcall_unref(c);
        return false;
    }
    return true;
}

/* A streamed message from a key limited to collections names one of them (or none: later
 * UpsertItems messages may leave the collection out). */
static bool stream_message_in_scope(const tcall *c, grpc_byte_buffer *bb, char *msg, size_t size)
{
    const ProtobufCMessageDescriptor *desc = transport__auth_stream_desc(c->def->path);
    if (!desc) return true;
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, bb)) return true; /* the handler reports it */
    grpc_slice s = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    char collection[AFF_MAX_NAME_LEN + 2];
    bool ok = !transport__auth_peek_collection(desc, GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s),
                                               collection, sizeof collection) ||
              !collection[0] || collection_in_scope(c->key, collection, msg, size);
    grpc_slice_unref(s);
    return ok;
}

static void on_recv_done(void *arg, bool ok)
{
    tcall *c = arg;
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    char msg[200];
    if (bb && c->key && c->key->collections && c->def &&
        !stream_message_in_scope(c, bb, msg, sizeof msg)) {
        grpc_byte_buffer_destroy(bb);
        tcall_finish(c, GRPC_STATUS_PERMISSION_DENIED, msg, NULL);
    } else if (c->on_recv)
        c->on_recv(c, ok, bb);
    else if (bb)
        grpc_byte_buffer_destroy(bb);
    tcall_unref(c);
}

static void on_send_done(void *arg, bool ok)
{
    tcall *c = arg;
    if (c->on_send) c->on_send(c, ok);
    tcall_unref(c);
}

static void on_final(void *arg, bool ok)
{
    tcall_unref(arg);
}

/* ---- authentication -------------------------------------------------------------------- */

/* The key the call presents when the server needs one: NULL with *code/msg set when the call
 * must be refused (UNAUTHENTICATED: no valid token; PERMISSION_DENIED: the key's role is too
 * low for the method). Without authentication every call passes with key NULL. */
static bool admit(const transport *t, const tcall *c, const char *path, const tauth_key **key,
                  int *code, char *msg, size_t size)
{
    *key = NULL;
    if (!t->auth) return true;
    *key = transport__auth_find(t->auth, &c->md);
    if (!*key) {
        *code = GRPC_STATUS_UNAUTHENTICATED;
        snprintf(msg, size,
                 "missing or wrong bearer token: send metadata \"authorization: Bearer "
                 "<token>\" with one of the server's tokens");
        return false;
    }
    if ((*key)->role < transport__auth_method_role(path)) {
        *code = GRPC_STATUS_PERMISSION_DENIED;
        snprintf(msg, size,
                 "%.200s needs an admin token; this token has the serving role (search, "
                 "recommend, events and reads only)",
                 path);
        return false;
    }
    return true;
}

/* Refuses (PERMISSION_DENIED) a request naming a collection outside the key's scope. */
static bool collection_in_scope(const tauth_key *key, const char *collection, char *msg,
                                size_t size)
{
    if (!key || transport__auth_collection_ok(key, collection)) return true;
    if (collection[0])
        snprintf(msg, size, "this token may not use collection \"%.64s\"", collection);
    else
        snprintf(msg, size,
                 "this token is limited to some collections; name one of them in the request");
    return false;
}

/* ---- blocking work ----------------------------------------------------------------------- */

static void *blocking_thread(void *arg)
{
    transport *t = arg;
    for (;;) {
        pthread_mutex_lock(&t->jobs_mu);
        while (!t->jobs_head && !t->jobs_stop)
            pthread_cond_wait(&t->jobs_cv, &t->jobs_mu);
        tjob *j = t->jobs_head;
        if (j) {
            t->jobs_head = j->next;
            if (!t->jobs_head) t->jobs_tail = NULL;
        }
        pthread_mutex_unlock(&t->jobs_mu);
        if (!j) return NULL; /* stopping and the queue is empty */
        j->fn(j->c);
        tcall_unref(j->c);
        free(j);
    }
}

void transport__defer(tcall *c, void (*fn)(tcall *c))
{
    transport *t = c->t;
    tjob *j = malloc(sizeof *j);
    if (!j || !t->n_workers) { /* no memory or no workers: run it here rather than fail */
        free(j);
        fn(c);
        return;
    }
    tcall_ref(c);
    *j = (tjob){.c = c, .fn = fn};
    pthread_mutex_lock(&t->jobs_mu);
    if (t->jobs_tail)
        t->jobs_tail->next = j;
    else
        t->jobs_head = j;
    t->jobs_tail = j;
    pthread_cond_signal(&t->jobs_cv);
    pthread_mutex_unlock(&t->jobs_mu);
}

bool transport__key_may_use(const tcall *c, const char *collection)
{
    return !c->key || transport__auth_collection_ok(c->key, collection);
}

static void run_unary(tcall *c)
{
    c->def->unary(c, c->req);
}

/* ---- request dispatch ------------------------------------------------------------------ */

/* A decoded unary request's "collection" field is within the key's scope (requests without
 * that field pass). */
static bool request_in_scope(const tcall *c, const ProtobufCMessage *req, char *msg, size_t size)
{
    const ProtobufCFieldDescriptor *fd =
        protobuf_c_message_descriptor_get_field_by_name(req->descriptor, "collection");
    if (!fd || fd->type != PROTOBUF_C_TYPE_STRING || fd->label == PROTOBUF_C_LABEL_REPEATED)
        return true;
    const char *collection = *(const char *const *)((const char *)req + fd->offset);
    return collection_in_scope(c->key, collection ? collection : "", msg, size);
}

static void on_request(void *arg, bool ok)
{
    tcall *c = arg;
    transport *t = c->t;
    if (!ok) { /* the server is shutting down: the slot is returned unused */
        tcall_unref(c);
        return;
    }
    c->start_ns = batcher_now_ns();
    if (!atomic_load(&t->draining)) arm_slot(t, c->cq, (size_t)(c->def - t->defs));

    int code = 0;
    char amsg[400];
    if (!c->def->open && !admit(t, c, c->def->path, &c->key, &code, amsg, sizeof amsg)) {
        tcall_finish(c, code, amsg, NULL);
    } else if (atomic_load(&t->draining) && !c->def->open) {
        tcall_finish(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down; retry elsewhere",
                     NULL);
    } else if (!atomic_load(&t->serving) && !c->def->open) {
        tcall_finish(c, GRPC_STATUS_UNAVAILABLE,
                     "the server is starting (loading the catalog from storage); retry when "
                     "health reports SERVING",
                     NULL);
    } else if (c->def->req_desc) {
        char why[400];
        c->req = transport__unpack_checked(c->payload, c->def->req_desc, why, sizeof why);
        if (!c->req) {
            char msg[560];
            if (why[0])
                snprintf(msg, sizeof msg, "%s: %s", c->def->req_desc->short_name, why);
            else
                snprintf(msg, sizeof msg, "the request is not a valid %s message",
                         c->def->req_desc->name);
            tcall_finish(c, GRPC_STATUS_INVALID_ARGUMENT, msg, NULL);
        } else if (c->key && c->key->collections &&
                   !request_in_scope(c, c->req, amsg, sizeof amsg)) {
            tcall_finish(c, GRPC_STATUS_PERMISSION_DENIED, amsg, NULL);
        } else if (t->cfg.log && transport__log_route(c)) {
            /* taken by the write log (transport_log.c) */
        } else if (c->def->blocking) {
            transport__defer(c, run_unary);
        } else {
            c->def->unary(c, c->req);
        }
    } else {
        c->def->stream(c);
    }
    tcall_unref(c);
}

static void on_unknown(void *arg, bool ok)
{
    tcall *c = arg;
    transport *t = c->t;
    if (!ok) {
        tcall_unref(c);
        return;
    }
    if (!atomic_load(&t->draining)) arm_slot(t, c->cq, t->n_defs);
    if (t->auth && !transport__auth_find(t->auth, &c->md)) {
        /* without a token, say nothing about what is offered */
        tcall_finish(c, GRPC_STATUS_UNAUTHENTICATED,
                     "missing or wrong bearer token: send metadata "
                     "\"authorization: Bearer <token>\" with one of the server's tokens",
                     NULL);
        tcall_unref(c);
        return;
    }
    /* The method slice is not NUL-terminated. */
    char path[201], msg[360];
    size_t mlen = GRPC_SLICE_LENGTH(c->details.method);
    if (mlen > 200) mlen = 200;
    memcpy(path, GRPC_SLICE_START_PTR(c->details.method), mlen);
    path[mlen] = '\0';
    snprintf(msg, sizeof msg,
             "method %s is not implemented; this server offers affinity.v1.Affinity, "
             "grpc.health.v1.Health/Check and grpc.reflection.v1(alpha).ServerReflection",
             path);
    tcall_finish(c, GRPC_STATUS_UNIMPLEMENTED, msg, NULL);
    tcall_unref(c);
}

static void *cq_thread(void *arg)
{
    grpc_completion_queue *cq = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        ttag *tag = ev.tag;
        tag->fn(tag->arg, ev.success != 0);
    }
    return NULL;
}

static void on_shutdown(void *arg, bool ok)
{
    transport *t = arg;
    pthread_mutex_lock(&t->mu);
    t->shutdown_done = true;
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

/* ---- public API ------------------------------------------------------------------------ */

/* Why gRPC could not listen on host:port: binds a socket there itself to learn the errno,
 * instead of guessing from gRPC's generic failure. */
static void listen_problem(const char *listen, char *why, size_t size)
{
    char host[256];
    snprintf(host, sizeof host, "%s", listen);
    char *colon = strrchr(host, ':');
    if (!colon) {
        snprintf(why, size, "not host:port");
        return;
    }
    *colon = '\0';
    const char *port = colon + 1;
    char *h = host;
    if (h[0] == '[') { /* [::1]:port */
        h++;
        char *close = strchr(h, ']');
        if (close) *close = '\0';
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    int g = getaddrinfo(h[0] ? h : NULL, port, &hints, &ai);
    if (g) {
        snprintf(why, size, "cannot resolve the address: %s", gai_strerror(g));
        return;
    }
    int e = 0;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        e = bind(fd, a->ai_addr, a->ai_addrlen) == 0 ? 0 : errno;
        close(fd);
        if (e) break;
    }
    freeaddrinfo(ai);
    if (e == EADDRINUSE)
        snprintf(why, size, "port %.16s is already in use by another process", port);
    else if (e == EADDRNOTAVAIL)
        snprintf(why, size, "%.100s is not an address of this machine", h);
    else if (e == EACCES)
        snprintf(why, size, "permission denied (ports below 1024 need privileges)");
    else if (e)
        snprintf(why, size, "%s", strerror(e));
    else
        snprintf(why, size,
                 "the address is free, so the TLS certificate and key are probably not a "
                 "valid pair");
}

/* gRPC's own log lines become JSON lines of ours. The failure of grpc_server_add_http2_port
 * is reported by transport_create in one sentence, so gRPC's dump of it goes to debug. */
static void grpc_log_to_ours(gpr_log_func_args *args)
{
    aff_log_level level = args->severity == GPR_LOG_SEVERITY_ERROR  ? AFF_LOG_ERROR
                          : args->severity == GPR_LOG_SEVERITY_INFO ? AFF_LOG_INFO
                                                                    : AFF_LOG_DEBUG;
    if (strncmp(args->message, "grpc_server_add_http2_port", 26) == 0 ||
        strstr(args->message, "No address added out of total"))
        level = AFF_LOG_DEBUG;
    char where[160];
    snprintf(where, sizeof where, "%s:%d", args->file ? args->file : "?", args->line);
    aff_log_kv(level, "grpc", "at", where, "detail", args->message, NULL);
}

static char *slurp(const char *path, aff_err *err, const char *what)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        aff__fail(err, AFF_EINVAL, "cannot read %s '%s': %s", what, path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 8192;
            char *b2 = realloc(buf, cap);
            if (!b2) {
                free(buf);
                fclose(f);
                aff__fail(err, AFF_ENOMEM, "out of memory reading %s", what);
                return NULL;
            }
            buf = b2;
        }
        size_t n = fread(buf + len, 1, 4096, f);
        len += n;
        if (n == 0) break;
    }
    fclose(f);
    buf[len] = '\0';
    return buf;
}

int transport_create(transport **out, const transport_config *cfg, aff_engine *engine, batcher *b,
                     aff_err *err)
{
    int rc = 0;
    transport *t = NULL;
    char *cert = NULL, *key = NULL, *client_ca = NULL;
    grpc_server_credentials *creds = NULL;
    *out = NULL;
    if (!cfg->catalog || !cfg->profiles || !cfg->pipeline)
        return aff__fail(err, AFF_EINVAL,
                         "transport: a catalog, profiles and a pipeline are required");
    gpr_set_log_function(grpc_log_to_ours);
    grpc_init();
    t = calloc(1, sizeof *t);
    if (!t) {
        grpc_shutdown();
        return aff__fail(err, AFF_ENOMEM, "out of memory creating the server");
    }
    t->cfg = *cfg;
    t->cfg.token = NULL;
    t->engine = engine;
    t->batcher = b;
    t->defs = transport__methods;
    t->n_defs = transport__n_methods;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    pthread_mutex_init(&t->jobs_mu, NULL);
    pthread_cond_init(&t->jobs_cv, NULL);
    atomic_init(&t->serving, false);
    atomic_init(&t->draining, false);
    atomic_init(&t->closing, false);
    t->shutdown_tag = (ttag){on_shutdown, t};
    if ((rc = transport__auth_create(&t->auth, cfg->token, cfg->tokens_file, err))) goto out;
    if (cfg->log_origin[0] && transport__log_init(t)) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory creating the server");
        goto out;
    }
    t->n_threads = cfg->threads ? cfg->threads : 1;
    t->cqs = calloc(t->n_threads, sizeof *t->cqs);
    t->threads = calloc(t->n_threads, sizeof *t->threads);
    t->registered = calloc(t->n_defs, sizeof *t->registered);
    t->metric_ids = calloc(t->n_defs, sizeof *t->metric_ids);
    if (!t->cqs || !t->threads || !t->registered || !t->metric_ids) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory creating the server");
        goto out;
    }

    /* Connections: a peer that never finishes its handshake, or holds a connection without
     * calls, or stops answering pings, is closed, so idle sockets cannot pile up. */
    int idle_ms = cfg->idle_timeout_ms ? (int)cfg->idle_timeout_ms : 300000;
    int handshake_ms = cfg->handshake_timeout_ms ? (int)cfg->handshake_timeout_ms : 10000;
    /* gRPC 1.51 closes the whole connection (not just the call) when a call's headers pass
     * this limit, so it is set well above the 8 KiB default. */
    int header_bytes = cfg->max_header_bytes ? (int)cfg->max_header_bytes : 65536;
    grpc_arg args[] = {
        {.type = GRPC_ARG_INTEGER,
         .key = (char *)GRPC_ARG_MAX_METADATA_SIZE,
         .value.integer = header_bytes},
        {.type = GRPC_ARG_INTEGER, .key = (char *)GRPC_ARG_ALLOW_REUSEPORT, .value.integer = 0},
        {.type = GRPC_ARG_INTEGER,
         .key = (char *)GRPC_ARG_MAX_CONNECTION_IDLE_MS,
         .value.integer = idle_ms},
        {.type = GRPC_ARG_INTEGER,
         .key = (char *)GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS,
         .value.integer = handshake_ms},
        {.type = GRPC_ARG_INTEGER,
         .key = (char *)GRPC_ARG_KEEPALIVE_TIME_MS,
         .value.integer = 60000},
        {.type = GRPC_ARG_INTEGER,
         .key = (char *)GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
         .value.integer = 20000},
        {.type = GRPC_ARG_INTEGER,
         .key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
         .value.integer = (int)cfg->max_message_bytes},
        {.type = GRPC_ARG_INTEGER,
         .key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH,
         .value.integer = (int)cfg->max_message_bytes},
    };
    grpc_channel_args ca = {.num_args = sizeof args / sizeof args[0], .args = args};
    t->server = grpc_server_create(&ca, NULL);
    for (uint32_t i = 0; i < t->n_threads; i++) {
        t->cqs[i] = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(t->server, t->cqs[i], NULL);
    }
    for (size_t i = 0; i < t->n_defs; i++) {
        metrics_method mm;
        t->metric_ids[i] = metrics_method_from_name(t->defs[i].path, &mm) == 0 ? (int)mm : -1;
        t->registered[i] = grpc_server_register_method(
            t->server, t->defs[i].path, NULL,
            t->defs[i].req_desc ? GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER : GRPC_SRM_PAYLOAD_NONE,
            0);
        if (!t->registered[i]) {
            rc = aff__fail(err, AFF_EINTERNAL, "cannot register method %s", t->defs[i].path);
            goto out;
        }
    }

    for (uint32_t i = 0; i < TRANSPORT_BLOCKING_THREADS; i++) {
        int e = pthread_create(&t->workers[i], NULL, blocking_thread, t);
        if (e) {
            rc = aff__fail(err, AFF_EINTERNAL, "cannot start a worker thread: %s", strerror(e));
            goto out;
        }
        t->n_workers++;
    }
    for (uint32_t i = 0; i < t->n_threads; i++) {
        int e = pthread_create(&t->threads[i], NULL, cq_thread, t->cqs[i]);
        if (e) {
            rc = aff__fail(err, AFF_EINTERNAL, "cannot start a server thread: %s", strerror(e));
            goto out;
        }
        t->n_started++;
    }
    if (cfg->tls_cert_file && cfg->tls_cert_file[0]) {
        cert = slurp(cfg->tls_cert_file, err, "TLS certificate");
        if (!cert) {
            rc = err ? err->code : AFF_EINVAL;
            goto out;
        }
        key = slurp(cfg->tls_key_file, err, "TLS key");
        if (!key) {
            rc = err ? err->code : AFF_EINVAL;
            goto out;
        }
        if (!strstr(cert, "-----BEGIN CERTIFICATE-----")) {
            rc = aff__fail(err, AFF_EINVAL, "TLS certificate '%s' holds no PEM certificate",
                           cfg->tls_cert_file);
            goto out;
        }
        if (!strstr(key, "PRIVATE KEY-----")) {
            rc = aff__fail(err, AFF_EINVAL, "TLS key '%s' holds no PEM private key",
                           cfg->tls_key_file);
            goto out;
        }
        if (cfg->tls_client_ca_file && cfg->tls_client_ca_file[0]) {
            client_ca = slurp(cfg->tls_client_ca_file, err, "client CA");
            if (!client_ca) {
                rc = err ? err->code : AFF_EINVAL;
                goto out;
            }
            if (!strstr(client_ca, "-----BEGIN CERTIFICATE-----")) {
                rc = aff__fail(err, AFF_EINVAL, "client CA '%s' holds no PEM certificate",
                               cfg->tls_client_ca_file);
                goto out;
            }
        }
        grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
        creds = grpc_ssl_server_credentials_create_ex(
            client_ca, &pair, 1,
            client_ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                      : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
    } else {
        creds = grpc_insecure_server_credentials_create();
    }
    if (!creds) {
        rc = aff__fail(err, AFF_EINVAL, "the TLS certificate or key is not valid PEM");
        goto out;
    }
    t->port = grpc_server_add_http2_port(t->server, cfg->listen, creds);
    if (t->port <= 0) {
        char why[300];
        listen_problem(cfg->listen, why, sizeof why);
        rc = aff__fail(err, AFF_EINVAL, "cannot listen on %s: %s", cfg->listen, why);
        goto out;
    }
    t->guarded = true;
    transport__guard_start(cfg->max_connections);
    grpc_server_start(t->server);
    t->started = true;
    for (uint32_t i = 0; i < t->n_threads; i++) {
        for (size_t m = 0; m <= t->n_defs; m++)
            for (int k = 0; k < (m < t->n_defs ? SLOTS_PER_METHOD : SLOTS_UNKNOWN); k++)
                arm_slot(t, t->cqs[i], m);
    }
    *out = t;
    t = NULL;
out:
    if (creds) grpc_server_credentials_release(creds);
    free(cert);
    free(client_ca);
    if (key) {
        memset(key, 0, strlen(key));
        free(key);
    }
    transport_destroy(t);
    return rc;
}

int transport_port(const transport *t)
{
    return t->port;
}

void transport_set_log(transport *t, aff_replog *log)
{
    t->cfg.log = log;
}

void transport_set_serving(transport *t, bool serving)
{
    atomic_store(&t->serving, serving);
}

bool transport__serving(const transport *t)
{
    /* replication: a replica that lost records to a truncation serves stale answers only */
    return atomic_load(&t->serving) && !atomic_load(&t->draining) &&
           !(t->cfg.log && replog_needs_bootstrap(t->cfg.log));
}

static bool wait_shutdown(transport *t, int64_t until_ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t left = until_ns - batcher_now_ns();
    if (left < 0) left = 0;
    int64_t abs = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec + left;
    ts.tv_sec = abs / 1000000000;
    ts.tv_nsec = abs % 1000000000;
    pthread_mutex_lock(&t->mu);
    while (!t->shutdown_done)
        if (pthread_cond_timedwait(&t->cv, &t->mu, &ts) == ETIMEDOUT) break;
    bool done = t->shutdown_done;
    pthread_mutex_unlock(&t->mu);
    return done;
}

int transport_shutdown(transport *t, uint32_t notice_ms, uint32_t grace_ms)
{
    int rc = 0;
    pthread_mutex_lock(&t->mu);
    bool started = t->shutdown_started;
    t->shutdown_started = true;
    pthread_mutex_unlock(&t->mu);
    if (started || !t->started) return 0;
    int64_t t0 = batcher_now_ns();
    atomic_store(&t->draining, true);
    if (notice_ms) {
        /* Still listening: health says NOT_SERVING and new calls get UNAVAILABLE, so load
         * balancers and clients move away before the port closes. */
        aff_log(AFF_LOG_INFO, "draining: health NOT_SERVING, new calls UNAVAILABLE for %u ms",
                notice_ms);
        struct timespec ts = {.tv_sec = notice_ms / 1000,
                              .tv_nsec = (long)(notice_ms % 1000) * 1000000};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
    aff_log(AFF_LOG_INFO, "closing: no new calls, %u ms for calls in flight", grace_ms);
    atomic_store(&t->closing, true);
    grpc_server_shutdown_and_notify(t->server, t->cqs[0], &t->shutdown_tag);
    if (!wait_shutdown(t, t0 + (int64_t)grace_ms * 1000000)) {
        aff_log(AFF_LOG_WARN, "grace period over: cancelling the calls still running");
        rc = AFF_EDEADLINE;
        grpc_server_cancel_all_calls(t->server);
        if (t->batcher) batcher_stop(t->batcher);
        wait_shutdown(t, INT64_MAX / 2);
    }
    return rc;
}

int transport_check_console_auth(const transport *t, const char *authorization)
{
    if (!t->auth) return AFF_OK;
    const tauth_key *k = transport__auth_find_value(t->auth, authorization);
    if (!k) return AFF_EUNAUTHENTICATED;
    return k->role == TRANSPORT_ROLE_ADMIN && !k->collections ? AFF_OK : AFF_EPRECONDITION;
}

void transport_destroy(transport *t)
{
    if (!t) return;
    if (t->started) transport_shutdown(t, 0, 0);
    /* Blocking work first: its calls may still answer, which needs the completion queues. */
    pthread_mutex_lock(&t->jobs_mu);
    t->jobs_stop = true;
    pthread_cond_broadcast(&t->jobs_cv);
    pthread_mutex_unlock(&t->jobs_mu);
    for (uint32_t i = 0; i < t->n_workers; i++)
        pthread_join(t->workers[i], NULL);
    if (t->server) grpc_server_destroy(t->server);
    if (t->guarded) transport__guard_stop();
    for (uint32_t i = 0; t->cqs && i < t->n_threads; i++)
        if (t->cqs[i]) grpc_completion_queue_shutdown(t->cqs[i]);
    for (uint32_t i = 0; i < t->n_started; i++)
        pthread_join(t->threads[i], NULL);
    for (uint32_t i = 0; t->cqs && i < t->n_threads; i++)
        if (t->cqs[i]) grpc_completion_queue_destroy(t->cqs[i]);
    free(t->cqs);
    free(t->threads);
    free(t->registered);
    free(t->metric_ids);
    transport__auth_destroy(t->auth);
    transport__log_fini(t);
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->jobs_cv);
    pthread_mutex_destroy(&t->jobs_mu);
    free(t);
    grpc_shutdown();
}

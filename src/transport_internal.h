/*
 * transport_internal.h: what transport.c (the server core: completion queues, call life
 * cycle, auth, health) shares with transport_rpc.c (the affinity.v1 handlers). Only
 * transport*.c include it.
 *
 * A call (tcall) is reference-counted: the request handler holds one reference while it
 * runs, each gRPC operation batch in flight holds one, and each request in the batcher holds
 * one. The last unref frees the call and everything it owns. A handler answers a unary call
 * exactly once, with tcall_finish (from any thread).
 *
 * Blocking work: store and profile calls wait on disk (fsync). Methods marked `blocking` run
 * on the transport's own worker threads (transport__defer), so a completion-queue thread
 * never sleeps in fsync and the serving calls it should be reading stay fast.
 */
#ifndef AFFINITY_TRANSPORT_INTERNAL_H
#define AFFINITY_TRANSPORT_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include "affinity/v1/affinity.pb-c.h"
#include "batcher.h"
#include "engine.h"
#include "transport.h"

typedef struct tcall tcall;

/* Replication: where a call applied from the write log leaves its answer instead of sending
 * it (transport_log.c). code is the gRPC status; bytes (malloc'd, owned by the capture) the
 * serialized response when code is 0. */
typedef struct tcapture {
    int code;
    char msg[512];
    uint8_t *bytes;
    size_t len;
} tcapture;

/* A completion-queue tag: every event's tag points at one of these. */
typedef struct ttag {
    void (*fn)(void *arg, bool ok);
    void *arg;
} ttag;

/* One RPC the server knows. Unary methods have req_desc and unary; streaming ones stream. */
typedef struct tmethod_def {
    const char *path;
    const ProtobufCMessageDescriptor *req_desc; /* NULL: streaming */
    bool open;                                  /* true: no bearer token needed (health) */
    bool blocking; /* unary: the handler waits on disk; run it on a worker (transport__defer) */
    /* Handles a decoded request; req belongs to the call (freed with it). */
    void (*unary)(tcall *c, ProtobufCMessage *req);
    /* Starts a streaming call (the handler drives recv/send with tcall_recv/tcall_send). */
    void (*stream)(tcall *c);
} tmethod_def;

struct tcall {
    transport *t;
    const tmethod_def *def; /* NULL: an unknown method */
    void *registered;       /* the method's handle, for re-arming */
    grpc_completion_queue *cq;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details; /* unknown methods only */
    grpc_byte_buffer *payload; /* unary request bytes */
    grpc_byte_buffer *recv_bb; /* streaming: the last message received */
    grpc_byte_buffer *send_bb; /* the message being sent */
    grpc_slice status_details;
    int cancelled; /* from RECV_CLOSE_ON_SERVER */
    bool sent_initial_md;
    int64_t start_ns; /* when the call arrived (batcher clock), for latency metrics */
    bool finished;
    const struct tauth_key *key; /* the caller's key (NULL without authentication) */
    /* One trailing-metadata pair sent with the status (tcall_set_trailer); NULL key: none. */
    const char *trailer_key;
    char trailer_value[32];
    grpc_metadata trailer;
    atomic_int refs;
    pthread_mutex_t mu; /* streaming handlers' state */
    ttag t_request, t_recv, t_send, t_final;
    /* set by the handler */
    ProtobufCMessage *req; /* decoded unary request */
    void *state;           /* handler state, freed with state_free when the call ends */
    void (*state_free)(void *state);
    void (*on_recv)(tcall *c, bool ok, grpc_byte_buffer *bb); /* streaming: takes bb */
    void (*on_send)(tcall *c, bool ok);
    tcapture *capture; /* replication: a call applied from the log answers into this */
    bool log_own;      /* replication: applying a record this replica published */
    uint64_t log_sequence; /* replication: the sequence of the record being applied */
};

/* Work waiting for a blocking-work thread. */
typedef struct tjob {
    struct tjob *next;
    tcall *c;
    void (*fn)(tcall *c);
} tjob;

#define TRANSPORT_BLOCKING_THREADS 16 /* concurrent fsync-bound calls (they share commits) */

struct transport {
    transport_config cfg;
    struct tauth *auth; /* bearer-token keys and roles; NULL: no authentication */
    aff_engine *engine;
    batcher *batcher;
    grpc_server *server;
    grpc_completion_queue **cqs;
    pthread_t *threads;
    uint32_t n_threads; /* completion queues, one thread each */
    uint32_t n_started; /* threads running */
    bool started;       /* grpc_server_start was called */
    bool guarded;       /* transport__guard_start was called */
    int port;
    atomic_bool serving;
    atomic_bool draining; /* health NOT_SERVING, new calls UNAVAILABLE */
    atomic_bool closing;  /* grpc_server_shutdown_and_notify called: stop re-arming */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool shutdown_started, shutdown_done;
    ttag shutdown_tag;
    const tmethod_def *defs;
    size_t n_defs;
    void **registered; /* per def */
    int *metric_ids;   /* per def: metrics_method, or -1 (health) */
    pthread_t workers[TRANSPORT_BLOCKING_THREADS];
    uint32_t n_workers; /* blocking-work threads running */
    pthread_mutex_t jobs_mu;
    pthread_cond_t jobs_cv;
    tjob *jobs_head, *jobs_tail;
    bool jobs_stop; /* workers finish the queue, then exit */
    struct tlog_results *log_results; /* replication: answers of this replica's records */
};

/* The affinity.v1 and health method table (transport_rpc.c). */
extern const tmethod_def transport__methods[];
extern const size_t transport__n_methods;

void tcall_ref(tcall *c);
void tcall_unref(tcall *c);
/* Answers the call: resp (may be NULL when code != 0) is serialized at once and not kept.
 * Sends initial metadata if not yet sent. Thread-safe; the second call is ignored. */
void tcall_finish(tcall *c, int grpc_code, const char *msg, const ProtobufCMessage *resp);
/* Sends key: value (key a static lower-case string) as trailing metadata with the call's
 * status, e.g. a count a client needs on failure too. Call before tcall_finish. */
void tcall_set_trailer(tcall *c, const char *key, const char *value);
/* tcall_finish with an already serialized response (code 0). */
void tcall_finish_packed(tcall *c, const uint8_t *bytes, size_t len);
/* tcall_finish with the gRPC code of err->code and err->msg. */
void tcall_fail(tcall *c, const aff_err *err);
/* Streaming: starts receiving the next message; c->on_recv runs with it (NULL at the end of
 * the client's stream). Returns false when the operation could not start. */
bool tcall_recv(tcall *c);
/* Streaming: sends one message (initial metadata first if needed); c->on_send runs when
 * gRPC has taken it. One send at a time. */
bool tcall_send(tcall *c, const ProtobufCMessage *msg);
/* Runs fn(c) on a blocking-work thread, holding a reference on c until fn returned. Jobs run
 * in FIFO order; fn answers the call (or drives its stream) as a handler would. */
void transport__defer(tcall *c, void (*fn)(tcall *c));
/* ---- replication (transport_log.c, docs/replication.md) ---- */
/* With --log: takes a decoded unary call that must go through the write log (a write), be
 * refused in log mode, or wait for min_log_sequence; true when it took the call. Runs on the
 * completion-queue thread. */
bool transport__log_route(tcall *c);
/* Whether this replica (with --log) has not applied sequence `want` yet (0: never behind). */
bool transport__log_behind(const tcall *c, uint64_t want);
/* Waits (blocking: a blocking-work thread only) up to --min-sequence-wait-ms, bounded by the
 * call's deadline, for this replica to apply `want`: 0, or AFF_EUNAVAILABLE with the message
 * every serving call answers (min_log_sequence). */
int transport__log_wait_sequence(tcall *c, uint64_t want, aff_err *err);
/* With --log: publishes req (method's request) as one log record and waits for the stream
 * (and, with --log-ack applied, this replica's apply) within the call's deadline; out gets
 * the applied answer, *seq the sequence. Returns 0 or a negative aff_status with msg set. */
int transport__log_write(tcall *c, const char *method, const ProtobufCMessage *req,
                         tcapture *out, uint64_t *seq, char *msg, size_t msg_size);
/* With --log: publishes req as one record of `method` (not a call's: e.g. a model's parts)
 * and waits at most timeout_ms for the stream's commit. 0 with *seq, or a negative
 * aff_status with msg set. Any thread. */
int transport__log_publish(transport *t, const char *method, const ProtobufCMessage *req,
                           int64_t timeout_ms, uint64_t *seq, char *msg, size_t msg_size);
/* Appends log_sequence (field 110) to a serialized response in place; false: no memory. */
bool transport__append_log_sequence(tcapture *cap, uint64_t seq);
void transport__capture_free(tcapture *cap);
/* GetSnapshot (server streaming, admin role): a compacted copy of the store in chunks. */
void transport__rpc_get_snapshot(tcall *c);
/* Apply lag percentiles over the last records applied (ms); 0 before any. */
void transport__log_lag(transport *t, double *p50, double *p99);
/* Creates and frees t->log_results (with --log); 0 or AFF_ENOMEM. */
int transport__log_init(transport *t);
void transport__log_fini(transport *t);
/* Applies one UpsertItemsRequest that names its collection (transport_catalog.c), answering
 * an UpsertItemsResponse: the apply side of UpsertItems records. */
void transport__apply_upsert_items(tcall *c, ProtobufCMessage *msg);

/* Health: SERVING (catalog loaded and not draining). */
bool transport__serving(const transport *t);
/* Whether the call's key may use collection (true without authentication or for a key of
 * every collection); for requests that name a collection only indirectly (GetExperiment). */
bool transport__key_may_use(const tcall *c, const char *collection);
/* The call's deadline on the batcher's clock (0: none). */
int64_t tcall_deadline_ns(const tcall *c);

#endif

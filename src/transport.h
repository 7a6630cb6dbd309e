/*
 * transport.h: the gRPC server (affinity.v1.Affinity and grpc.health.v1.Health) on gRPC C
 * core's asynchronous API.
 *
 * The transport decodes requests, checks the bearer token, and either answers on its
 * completion-queue thread (collections, catalog, server info, health) or hands plain C
 * requests on: Search to the batcher, SimilarItems, Recommend, Rerank, BatchRecommend and
 * RecommendPage to the ranking pipeline (which decides and queues them), answering from the
 * completion callback. No gRPC or protobuf type leaks out of this
 * header.
 *
 * Life cycle: transport_create binds and starts serving with health NOT_SERVING (every call
 * but health is answered UNAVAILABLE until then, so nothing writes during the start-up
 * rebuild); transport_set_serving(true) once the catalog is loaded; transport_shutdown drains;
 * transport_destroy frees. The engine and batcher are borrowed and must outlive the
 * transport (destroy the batcher only after transport_shutdown returned); so must the
 * catalog and profiles, whose calls block on disk and run on the transport's threads.
 */
#ifndef AFFINITY_TRANSPORT_H
#define AFFINITY_TRANSPORT_H

#include <stdbool.h>
#include <stdint.h>

#include "batcher.h"
#include "catalog.h"
#include "engine.h"
#include "experiments.h"
#include "metrics.h"
#include "outcomes.h"
#include "model.h"
#include "pipeline.h"
#include "profiles.h"
#include "replog.h"
#include "store.h"
#include "status.h"

typedef struct transport transport;

typedef struct transport_config {
    const char *listen;         /* host:port; port 0 picks a free port */
    uint32_t threads;           /* completion-queue threads, ≥ 1 */
    uint32_t max_message_bytes; /* larger messages get RESOURCE_EXHAUSTED */
    const char *tls_cert_file;  /* NULL or "": plaintext */
    const char *tls_key_file;
    const char *tls_client_ca_file; /* mTLS: PEM CA that client certificates must chain to */
    const char *token;              /* admin bearer token; NULL or "": none; copied */
    const char *tokens_file;        /* "ROLE TOKEN [COLLECTION,...]" lines; NULL: none */
    uint32_t max_batch;             /* reported by GetServerInfo */
    uint32_t max_wait_us;           /* reported by GetServerInfo */
    aff_catalog *catalog;           /* durable catalog writes; GetServerInfo.persistent; borrowed */
    aff_profiles *profiles;         /* events and profiles; borrowed */
    aff_model *model;    /* learned models (Train, Recommend by model); NULL: none; borrowed */
    aff_metrics *metrics;           /* per-call counters and latencies; NULL: none; borrowed */
    /* Told after events were applied durably (each PutEvents call, each ImportEvents
     * message): n_applied new events in collection. Runs on the blocking-work thread that
     * applied them, maybe on several at once: keep it quick and thread-safe (e.g. add to a
     * counter that triggers a retrain). NULL: none. */
    void (*on_events)(void *ctx, const char *collection, uint64_t n_applied);
    void *on_events_ctx;
    aff_pipeline *pipeline;        /* the recommendation pipeline serving calls use; borrowed */
    aff_outcomes *outcomes;        /* measurement: attribution of events; NULL: none; borrowed */
    aff_experiments *experiments;  /* measurement: the experiment RPCs; NULL: none; borrowed */
    aff_widgets *widgets;          /* widget statistics (GetServerInfo); NULL: none; borrowed */
    uint32_t max_connections;      /* 0: from RLIMIT_NOFILE (transport_guard.h) */
    uint32_t idle_timeout_ms;      /* 0: 300000 */
    uint32_t handshake_timeout_ms; /* 0: 10000 */
    uint32_t max_header_bytes;     /* request metadata limit; 0: 65536 */
    /* Replication (docs/replication.md): writes go through this write log and are applied
     * by transport__log_apply on its thread; NULL: single-node mode. Borrowed; create the
     * log after the transport and destroy it before. */
    aff_replog *log;
    aff_store *store;              /* GetSnapshot copies it; NULL: GetSnapshot unsupported */
    bool log_ack_committed;        /* answer writes once committed, not once applied here */
    uint32_t min_sequence_wait_ms; /* the longest wait for min_log_sequence; 0: 1000 */
    char log_origin[40];           /* this process's id in the records it publishes */
} transport_config;
/* Sets the write log after creation (the log's apply thread calls into the transport). */
void transport_set_log(transport *t, aff_replog *log);
/* The write log's apply callback (replog_apply_fn), ctx the transport: decodes one record
 * and applies it with the handler single-node mode runs (transport_log.c). Needs
 * cfg.log_origin set at creation. */
void transport_log_apply(void *ctx, uint64_t seq, const uint8_t *data, size_t len);
/* The write log's commit callback (replog_config.commit), ctx the transport: commits the
 * store's apply batch (store_batch_end) and records the apply lag of the records it made
 * visible (record stamp -> now; GetServerInfo log_apply_lag_*). Non-zero when the commit
 * failed. */
int transport_log_commit(void *ctx);
/* model_config.publish with --log (ctx the transport, with the log set): puts a trained
 * model's blob through the write log as ModelPart records of at most 512 KiB and one
 * ModelCommit, retrying each while the log is unavailable (up to 2 minutes, not while the
 * server drains), and returns once the commit is committed. Runs on the job's thread. */
int transport_log_publish_model(void *ctx, const char *collection, const void *blob, size_t len,
                                aff_err *err);
/* model_config.request_train with --log (ctx the transport, with the log set): publishes a
 * Train record for the collection with its parameters and message id
 * "auto-train/<collection>/<version>", waiting at most 5 s for the commit. */
int transport_log_request_train(void *ctx, const char *collection, uint64_t version,
                                aff_err *err);
/* Publishes one behaviour event as a PutEvents record (ctx the transport, with the log set):
 * type is a built-in name (view, click, add_to_cart or cart, purchase; any case) or a custom
 * type; request_id deduplicates. Returns once the stream committed it (*seq), not once
 * applied; AFF_EUNAVAILABLE when the log did not commit it. For the Kafka consumer. */
int transport_log_ingest_event(void *ctx, const char *collection, const char *user_id,
                               const char *item_id, const char *type, int64_t timestamp_ms,
                               double value, const char *request_id, uint64_t *seq, aff_err *err);

/* Publishes a retention cut (retention_publish_fn; ctx the transport, with the log set) as
 * a "RetainEvents" record with message id "retain/<cutoff_ms>", so cuts published by several
 * replicas for the same cutoff are deduplicated by the stream; every replica applies it with
 * profiles_expire at its position in the log. AFF_EUNAVAILABLE when not committed. */
int transport_log_publish_retention(void *ctx, int64_t cutoff_ms, aff_err *err);

/* Binds cfg->listen and starts serving (health NOT_SERVING). Errors: AFF_EINVAL (bad
 * address, port taken, unreadable TLS files), AFF_ENOMEM. cfg is copied. */
int transport_create(transport **out, const transport_config *cfg, aff_engine *engine, batcher *b,
                     aff_err *err);
/* The port actually bound (useful with port 0). */
int transport_port(const transport *t);
/* Health: SERVING when true. Thread-safe. */
void transport_set_serving(transport *t, bool serving);
/* Drains: health NOT_SERVING and new calls UNAVAILABLE at once; after notice_ms stops
 * accepting calls and connections; calls in flight get until grace_ms (counted from the
 * start) to finish, then the rest are cancelled. Returns 0 when every call finished in
 * time, AFF_EDEADLINE when some had to be cancelled. Only the first call does anything. */
int transport_shutdown(transport *t, uint32_t notice_ms, uint32_t grace_ms);
/* The web console's check of an HTTP Authorization header against the same keys as the API:
 * AFF_OK when authentication is off or it is an admin key for every collection;
 * AFF_EUNAUTHENTICATED when missing or unknown; AFF_EPRECONDITION for another key (the
 * console shows every collection and shoppers' data, as ExportUser does). Thread-safe. */
int transport_check_console_auth(const transport *t, const char *authorization);
/* Stops the threads and frees the server. Shuts down first (grace 0) if needed. NULL: no-op. */
void transport_destroy(transport *t);

#endif

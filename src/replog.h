/*
 * replog.h: the replicated write log on NATS JetStream (docs/replication.md). It owns the
 * connection, the stream, publishing and the apply thread; it knows nothing of what a record
 * means (opaque bytes in, opaque bytes out) and includes no gRPC or protobuf header.
 *
 * Publishing: replog_publish returns only after the stream committed the record (a quorum of
 * its replicas stored it) and hands back its sequence; any failure (no connection, no leader,
 * timeout) is AFF_EUNAVAILABLE and nothing was acknowledged. The JetStream message id is the
 * caller's request id, so a retried publish within the stream's dedup window is dropped by
 * the stream and answered with the first record's sequence.
 *
 * Applying: one thread consumes the stream in order from the sequence after `start_sequence`
 * with an ordered consumer and calls apply(ctx, seq, bytes, len) for each record; after a
 * batch (the records already waiting, at most REPLOG_BATCH records and 4 ms from its first) it
 * calls commit once and then publishes the batch's last `seq` as applied (replog_applied,
 * replog_wait_applied). The
 * records' writes carry their sequence (store_set_log_sequence puts seq into the same LMDB
 * transaction); the stream, not the local store, is what makes them durable (no fsync). On
 * any failure (connection lost, leader lost, consumer gone) the thread waits and resumes from
 * the last applied sequence; it never stops before replog_destroy.
 */
#ifndef AFFINITY_REPLOG_H
#define AFFINITY_REPLOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct aff_replog aff_replog;

/* Applies one record; runs on the apply thread only. The return value is logged, the record
 * counts as applied either way (a record is rejected the same on every replica). */
typedef void (*replog_apply_fn)(void *ctx, uint64_t seq, const uint8_t *data, size_t len);

typedef struct replog_config {
    const char *urls;         /* "nats://host:port[,nats://host:port...]" */
    const char *stream;       /* stream name; subjects are "<stream>.>" */
    int replicas;             /* stream replicas when this replica creates the stream */
    const char *creds_file;   /* NATS user credentials (JWT + nkey); NULL or "": none */
    const char *user;         /* user name and password; NULL or "": none */
    const char *password;
    const char *token;        /* NATS token; NULL or "": none */
    const char *tls_ca_file;  /* verify the servers with this CA (enables TLS); NULL: none */
    const char *tls_cert_file; /* client certificate and key for mutual TLS; NULL: none */
    const char *tls_key_file;
    uint64_t start_sequence; /* the last sequence already applied (from the store) */
    uint32_t dedup_window_s; /* the stream's duplicate window; default 120 */
    /* The apply thread's niceness (setpriority on the thread, -20..19); 0: left as the
     * process's. Lower than the process's needs CAP_SYS_NICE: refused, the thread keeps the
     * process's and a warning is logged once. The thread is named "log-apply"; threads it
     * starts (the NATS library's timer thread) inherit both. */
    int apply_nice;
    replog_apply_fn apply;
    void *apply_ctx;
    /* Commits the records applied so far (the store's apply batch); runs on the apply thread
     * after a batch (the records already waiting, up to REPLOG_BATCH records and 4 ms), before they
     * count as applied. Non-zero: the thread applies nothing more and replog_needs_bootstrap turns
     * true (a restart resumes from the last committed record). NULL: none. */
    int (*commit)(void *ctx);
    void *commit_ctx;
} replog_config;

/* Connects (retrying in the background when no server answers yet), creates the stream when
 * it does not exist, and starts the apply thread. Errors: AFF_EINVAL (bad URL or options),
 * AFF_ENOMEM. Never fails because the servers are down: it keeps retrying. */
int replog_create(aff_replog **out, const replog_config *cfg, aff_err *err);
/* Stops the apply thread (after the record it is applying) and wakes every waiter; publish
 * still works until replog_destroy. NULL: no-op. */
void replog_stop(aff_replog *log);
/* Stops (if not yet) and closes the connection. NULL: no-op. */
void replog_destroy(aff_replog *log);

/* Publishes one record (copied) on subject "<stream>.<subject_suffix>" with msg_id for
 * deduplication (NULL or "": none) and waits at most timeout_ms for the stream's
 * acknowledgement. *seq: its sequence. AFF_EUNAVAILABLE when not committed in time. */
int replog_publish(aff_replog *log, const char *subject_suffix, const void *data, size_t len,
                   const char *msg_id, int64_t timeout_ms, uint64_t *seq, aff_err *err);

/* Records published on this subject suffix hold personal data that must leave NATS's files
 * at truncation: replog_truncate erases them (overwrites) before it purges. Keep them few. */
#define REPLOG_SUBJECT_ERASED "d"

/* Truncates the stream: removes every record below `below` (JetStream purge up to it; a
 * purge may leave the bytes of purged records in the first message block, so the records on
 * REPLOG_SUBJECT_ERASED below it are securely erased first). First publishes a marker on "<stream>.t" holding `below`, so a replica that had not
 * applied them yet sees that it missed records (replog_needs_bootstrap) rather than
 * silently skipping them. AFF_EUNAVAILABLE when the log cannot do it now. */
int replog_truncate(aff_replog *log, uint64_t below, aff_err *err);
/* Decides whether a record (its bytes as published) is to be erased. */
typedef bool (*replog_match_fn)(void *ctx, const uint8_t *data, size_t len);
/* Securely erases the records on "<stream>.<subject_suffix>" below sequence `below` that
 * match (NULL: all): JetStream's message erase, which overwrites the record's bytes with
 * random data in every stream replica's message files (not only marks it deleted). Reads
 * the subject with its own ordered consumer (not the apply thread's); blocking, a few ms per
 * record read. *n_erased: how many were erased. AFF_EUNAVAILABLE when the log cannot do it
 * now (some may be erased). NATS's Raft WAL keeps the original bytes until NATS compacts it
 * (docs/replication.md, Erasure). */
int replog_erase_records(aff_replog *log, const char *subject_suffix, uint64_t below,
                         replog_match_fn match, void *ctx, uint64_t *n_erased, aff_err *err);
/* True when this replica stopped applying and must be restarted (health reports
 * NOT_SERVING): records it had not applied were truncated away (restart it with
 * --bootstrap-from), or applied records could not be committed to its store (a plain restart
 * resumes from the last committed record). */
bool replog_needs_bootstrap(const aff_replog *log);
/* True once the stream was found or created (it may still be electing a leader). */
bool replog_stream_ready(const aff_replog *log);
/* The last sequence applied by this replica. Thread-safe. */
uint64_t replog_applied(const aff_replog *log);
/* The stream's last sequence as last learned (from publishes and stream info). */
uint64_t replog_last_known(const aff_replog *log);
/* Waits until seq is applied or timeout_ms passed; true when applied. Thread-safe. */
bool replog_wait_applied(aff_replog *log, uint64_t seq, int64_t timeout_ms);
/* Asks the stream for its last sequence (timeout_ms); AFF_EUNAVAILABLE when it cannot. */
int replog_stream_last(aff_replog *log, int64_t timeout_ms, uint64_t *out, aff_err *err);

/* The clock replicas agree on: inside apply, the applying record's time (set by the apply
 * callback with replog_set_record_time); on any other thread, the real-time clock. Unix ms;
 * ctx is unused (the signature of profiles_config.now_ms). */
int64_t replog_now_ms(void *ctx);
void replog_set_record_time(int64_t time_ms);

#endif

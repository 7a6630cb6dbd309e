/*
 * store.h: durable storage of everything the server is told, in LMDB under --data-dir.
 *
 * The store holds collections (their specs), items (vector and attributes), and for the
 * profiles module: user profiles, a bounded history of recent events per user, per-user
 * interaction aggregates, a per-user index of item ids by event type, and per-collection
 * popularity counters with a ranking index. It owns every key and value encoding (see
 * store.c's header comment); profiles.c owns the arithmetic and calls the txn accessors.
 *
 * Durability: a function that writes returns 0 only after its LMDB transaction committed
 * with fsync (unless the store was opened with no_sync or in memory). A failed write changes
 * nothing: LMDB's copy-on-write B-tree never exposes a half-written transaction, and a failed
 * commit (disk full, I/O error) leaves the previous state intact and returns AFF_EIO.
 * Group commit, twice over: a batched call (store_put_items, profiles_put_events with many
 * events) is one transaction, and concurrent store_update calls are queued and committed
 * together (up to 64 per commit, one fsync); a call that fails is taken out and the group
 * run again without it, so it leaves no trace and does not affect the others. Every caller
 * returns after the shared commit.
 *
 * Map size: the memory map grows by doubling whenever a write transaction runs out of room;
 * callers never see "map full". Growing needs every transaction of this process closed, so
 * every transaction holds a process-wide read/write lock shared and growth takes it
 * exclusively.
 *
 * In-memory mode (dir == NULL): the same LMDB code on a private temporary directory under
 * $TMPDIR (or /tmp) whose files are unlinked right after opening, so nothing is left behind
 * even on a crash; commits skip fsync. One code path for both modes keeps the in-memory
 * server's behaviour identical to the persistent one's, minus durability.
 *
 * Threading: every function may be called from any thread. Reads run concurrently with each
 * other and with one writer (LMDB MVCC: a read sees the last commit before it began); writers
 * are serialized by LMDB. A store_update/store_view callback must not call any store
 * function other than the store_txn_* accessors on its own txn (it would deadlock against a
 * pending map growth). One process per data dir: a second store_create on the same dir fails
 * with AFF_EUNAVAILABLE while the first is open.
 */
#ifndef AFFINITY_STORE_H
#define AFFINITY_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "item.h"
#include "status.h"

typedef struct aff_store aff_store;
typedef struct store_txn store_txn;

typedef struct store_config {
    const char *dir;           /* created if missing (one level); NULL: in-memory mode */
    uint64_t initial_map_size; /* bytes; 0 = 256 MiB. Only a lower bound: it grows as needed */
    uint32_t max_readers;      /* concurrent read transactions; 0 = 1024 */
    bool no_sync;              /* skip fsync on commit: not durable (benchmarks, tests, a
                                * replica of the write log); with dir, the map is written in
                                * place (MDB_WRITEMAP: data.mdb is as large as the map, sparse)
                                * and store_destroy flushes it once */
} store_config;

/* Opens (creating if needed) the store in cfg->dir. AFF_EIO with the OS reason when the
 * directory cannot be used; AFF_EUNAVAILABLE when another store has it open; AFF_EINTERNAL
 * when it holds a store of an unknown format version. */
int store_create(aff_store **out, const store_config *cfg, aff_err *err);
/* Closes the store. No call may be running on it. NULL is a no-op. */
void store_destroy(aff_store *s);
/* False in in-memory mode. */
bool store_persistent(const aff_store *s);

typedef struct store_stats {
    uint64_t map_size;   /* current map size in bytes */
    uint64_t used_bytes; /* pages in use in the map */
    uint64_t commits;    /* write transactions committed (and fsync'ed) since open */
    uint64_t writes;     /* successful store_update calls (≥ commits: group commit) */
    uint64_t map_grows;  /* times the map was grown since open */
} store_stats;
void store_get_stats(aff_store *s, store_stats *out);

/* ---- transactions ---------------------------------------------------------------------- */

/* A callback run inside a transaction. Returns 0 to commit (store_update) or a negative
 * aff_status to abort; the store passes that code back to the caller. */
typedef int (*store_txn_fn)(store_txn *txn, void *ctx, aff_err *err);

/* Runs fn in a write transaction and commits it durably; returns fn's status or the commit's
 * failure. fn may run on another thread (the group's leader) and more than once: when the map
 * fills, the group is aborted, the map grown and fn run again from the start, so fn must
 * reset any output it writes into ctx and have no other side effects. fn's writes are
 * discarded when it returns an error; err receives its message. */
int store_update(aff_store *s, store_txn_fn fn, void *ctx, aff_err *err);
/* Replication (docs/replication.md): the write-log sequence the calling thread is applying;
 * every store_update made on this thread until the next call commits the highest such
 * sequence in the same transaction as its writes (key "log.applied_seq" in the meta
 * database), so the applied sequence and the writes that applied it are durable together.
 * 0: writes carry no sequence (single-node mode, and every thread but the log's apply
 * thread). */
void store_set_log_sequence(uint64_t seq);
/* Replication: an apply batch. Between store_batch_begin and store_batch_end, the
 * store_update calls made on the calling thread run in one write transaction (opened at the
 * first, committed after every STORE_BATCH_MAX of them and at store_batch_end, with the
 * highest store_set_log_sequence among them), so the pages that consecutive records share
 * (popularity, branch pages) are copied and committed once per batch, not once per record;
 * store_view on this thread reads the batch's uncommitted writes. Other threads' writes wait
 * for the batch's commit. A callback that fails after writing cannot be undone alone: the
 * whole uncommitted batch is dropped and every later write of this store fails (AFF_EIO)
 * until a restart, which re-applies the dropped records from the log; one that fails before
 * writing just returns its error. The map is grown before a batch opens so that a batch does
 * not fill it. Only for callers whose other locks no thread holds while writing to the store
 * (the log's apply thread, for PutEvents records). store_batch_begin on a thread with an open
 * batch is a no-op. */
void store_batch_begin(aff_store *s);
/* Commits the calling thread's batch and ends it; an error when the batch (or an earlier
 * one) failed or the commit did. No batch open: 0 unless an earlier batch failed. */
int store_batch_end(aff_store *s, aff_err *err);
/* Writes a consistent, compact copy of the whole store to path (one LMDB file), synced;
 * *seq: the log sequence applied in that copy (0 without --log). A replica started on the
 * copy (as <data-dir>/data.mdb) replays the log from seq + 1. The copy is rebuilt record by
 * record from one read transaction (MDB_APPEND), not page by page: LMDB pages keep bytes
 * of deleted records (free gaps, branch separator keys), and an erased user must not be
 * readable from a snapshot. Runs beside readers and writers. On failure path is removed. */
int store_snapshot(aff_store *s, const char *path, uint64_t *seq, aff_err *err);
/* Flushes every commit so far to disk (for stores opened with no_sync, which store_destroy
 * also flushes once). */
int store_sync(aff_store *s, aff_err *err);
/* Records seq as applied in a commit of its own (a record that wrote nothing). */
int store_mark_log_sequence(aff_store *s, uint64_t seq, aff_err *err);
/* The last applied log sequence committed (0: none). */
int store_log_sequence(aff_store *s, uint64_t *out, aff_err *err);
/* Runs fn in one read transaction (a consistent snapshot). */
int store_view(aff_store *s, store_txn_fn fn, void *ctx, aff_err *err);
/* The txn's store, e.g. to read its configuration. */
aff_store *store_txn_store(store_txn *txn);

/* Scan callbacks return 0 to go on, a positive value to stop early (the scan returns 0), or a
 * negative aff_status to stop with that error. Pointers they receive are valid only during
 * the call. */

/* ---- collections ----------------------------------------------------------------------- */

typedef struct store_collection {
    char name[AFF_MAX_NAME_LEN + 1];
    uint32_t dim;
    aff_metric metric;
    backend_index_kind index;
    uint32_t hnsw_m, hnsw_ef_search;
    bool learned_only; /* no content vectors (items are stored with one 0) */
    /* Bumped by every delete of an item and every re-upsert that changes an item's vector:
     * profiles computed at an older generation are recomputed on next use. Store-owned:
     * ignored by store_put_collection. */
    uint64_t generation;
} store_collection;

/* Records a new collection. AFF_EEXIST when one of that name exists. The caller (the engine
 * wiring) has validated the spec. */
int store_put_collection(aff_store *s, const store_collection *c, aff_err *err);
/* Erases a collection with its items, profiles, events and popularity. *existed may be NULL.
 * One transaction: a large collection makes a large one. */
int store_drop_collection(aff_store *s, const char *name, bool *existed, aff_err *err);
/* *out: malloc'ed array of *n collections sorted by name; the caller frees it. */
int store_list_collections(aff_store *s, store_collection **out, size_t *n, aff_err *err);
/* AFF_ENOTFOUND when there is no such collection. */
int store_txn_get_collection(store_txn *txn, const char *name, store_collection *out, aff_err *err);

/* ---- items ----------------------------------------------------------------------------- */

/* Items are written as aff_item and read back as item_record (item.h). */

/* Inserts or replaces n items of an existing collection in one durable transaction (a later
 * duplicate id wins). Checks ids, dims, finiteness and attribute lengths of all items before
 * writing any: AFF_EINVAL names the first bad one; AFF_ENOTFOUND for an unknown collection. */
int store_put_items(aff_store *s, const char *collection, const aff_item *items, size_t n,
                    aff_err *err);
/* Deletes the ids that exist (and their popularity counters) in one durable transaction and
 * bumps the collection's generation when any existed. *n_deleted may be NULL. */
int store_delete_items(aff_store *s, const char *collection, const char *const *ids, size_t n,
                       size_t *n_deleted, aff_err *err);
/* Copies one item: attributes into *out (may be NULL), its dim floats into vector (may be
 * NULL). AFF_ENOTFOUND when the item (or collection) is unknown. */
int store_get_item(aff_store *s, const char *collection, const char *id, item_record *out,
                   float *vector, aff_err *err);
int store_txn_get_item(store_txn *txn, const char *collection, const char *id,
                       item_record *out, float *vector, aff_err *err);

/* ---- start-up rebuild ------------------------------------------------------------------ */

typedef struct store_rebuild_progress {
    uint64_t collections; /* collections announced so far */
    uint64_t items;       /* items delivered so far */
    uint64_t items_total; /* items in the store when the rebuild began */
    double elapsed_s;
} store_rebuild_progress;

/* What store_rebuild calls. Each callback runs outside any transaction (it may call anything,
 * including store functions) and returns 0 or a negative aff_status that stops the rebuild. */
typedef struct store_rebuild_ops {
    /* Once per collection, before its items. */
    int (*collection)(void *ctx, const store_collection *c, aff_err *err);
    /* Items of collection c in batches of at most batch_size, in id order. Vectors are
     * n × c->dim floats, row-major; all pointers are valid only during the call. */
    int (*items)(void *ctx, const store_collection *c, const aff_item *items, size_t n,
                 aff_err *err);
    /* After every batch (may be NULL). */
    void (*progress)(void *ctx, const store_rebuild_progress *p);
    void *ctx;
    size_t batch_size; /* 0 = 4096 */
} store_rebuild_ops;

/* Delivers every collection and then its items, one read transaction per batch (writers are
 * not blocked for long; items written during the rebuild may or may not be delivered, so run
 * it before accepting writes). Logs a progress line every 5 s and a final line with counts
 * and duration. *out (may be NULL) receives the final counts. */
int store_rebuild(aff_store *s, const store_rebuild_ops *ops, store_rebuild_progress *out,
                  aff_err *err);

/* ---- profiles' records ------------------------------------------------------------------ */

#define STORE_MAX_TYPE_LEN    31  /* an event type name: "view", "purchase", custom ... */
#define STORE_MAX_EVENT_TYPES 32  /* distinct event types counted per profile */
#define STORE_MAX_CONTEXT     16  /* context entries per event */
#define STORE_MAX_CONTEXT_LEN 256 /* bytes in a context key or value */

typedef struct store_type_count {
    char type[STORE_MAX_TYPE_LEN + 1];
    uint64_t count;
} store_type_count;

/* A user's profile in one collection. sum (dim floats) travels separately. */
typedef struct store_profile {
    uint32_t dim;
    uint64_t generation;   /* the collection generation sum was computed at */
    int64_t ref_ms;        /* the time sum and weight are decayed to */
    int64_t last_event_ms; /* latest event timestamp */
    uint64_t next_seq;     /* sequence number of the next event in the history */
    uint32_t n_history;    /* events held: sequence numbers next_seq - n_history .. - 1 */
    double weight;         /* decayed total weight at ref_ms */
    uint32_t n_counts;
    store_type_count counts[STORE_MAX_EVENT_TYPES];
} store_profile;

typedef struct store_kv {
    const char *key;
    const char *value;
} store_kv;

/* One event of a user's history. */
typedef struct store_event {
    const char *item_id;
    const char *type;
    int64_t ts_ms;
    double value;
    const store_kv *context;
    uint32_t n_context;
} store_event;

/* What one user did with one item, aggregated over all time. */
typedef struct store_interaction {
    int64_t ref_ms;  /* the time weight is decayed to (the latest event's time) */
    double weight;   /* decayed, type-weighted sum of this item's events at ref_ms */
    int64_t last_ms; /* latest event time */
    uint64_t count;  /* events */
} store_interaction;

/* A collection's popularity counter for one item. The decayed score at time T (ms) with
 * half-life H (ms) is 2^(log_score - T/H); log_score does not change with time (it only
 * grows with events), so it also orders the ranking index. */
typedef struct store_popularity {
    double log_score;
    uint64_t count;
    int64_t last_ms;
    /* The score the ranking index files the item under (kept by the store; callers copy it
     * from the counter they read): rank_log_score <= log_score < rank_log_score +
     * STORE_POP_RANK_SLACK. */
    double rank_log_score;
} store_popularity;

/* The ranking index moves an item only once its log_score grew by this much (log2 units: a
 * factor of 2^0.5) since it was filed, so most counter updates of a busy item leave the index
 * alone; readers of store_txn_scan_popular get the exact order back from this bound. */
#define STORE_POP_RANK_SLACK 0.5

/* AFF_ENOTFOUND when the user has no profile in the collection. sum may be NULL. */
int store_txn_get_profile(store_txn *txn, const char *collection, const char *user,
                          store_profile *out, float *sum, aff_err *err);
int store_txn_put_profile(store_txn *txn, const char *collection, const char *user,
                          const store_profile *p, const float *sum, aff_err *err);

int store_txn_put_event(store_txn *txn, const char *collection, const char *user, uint64_t seq,
                        const store_event *e, aff_err *err);
int store_txn_delete_event(store_txn *txn, const char *collection, const char *user, uint64_t seq,
                           aff_err *err);
typedef int (*store_event_fn)(void *ctx, uint64_t seq, const store_event *e);
/* The user's history, oldest first. */
int store_txn_scan_events(store_txn *txn, const char *collection, const char *user,
                          store_event_fn fn, void *ctx, aff_err *err);

/* AFF_ENOTFOUND when the user never interacted with the item. */
int store_txn_get_interaction(store_txn *txn, const char *collection, const char *user,
                              const char *item, store_interaction *out, aff_err *err);
int store_txn_put_interaction(store_txn *txn, const char *collection, const char *user,
                              const char *item, const store_interaction *in, aff_err *err);
typedef int (*store_interaction_fn)(void *ctx, const char *item, const store_interaction *in);
/* Every item the user interacted with, in item id order. */
int store_txn_scan_interactions(store_txn *txn, const char *collection, const char *user,
                                store_interaction_fn fn, void *ctx, aff_err *err);

typedef int (*store_user_interaction_fn)(void *ctx, const char *user, const char *item,
                                         const store_interaction *in);
/* Every (user, item) interaction of the collection, by user then item id (the trainer's
 * input). One read transaction: run it with store_view. */
int store_txn_scan_collection_interactions(store_txn *txn, const char *collection,
                                           store_user_interaction_fn fn, void *ctx, aff_err *err);

/* Records that the user had an event of `type` with `item` at ts_ms (the latest one wins). */
int store_txn_mark_type(store_txn *txn, const char *collection, const char *user, const char *type,
                        const char *item, int64_t ts_ms, aff_err *err);
typedef int (*store_id_fn)(void *ctx, const char *id);
/* Every item the user had an event of `type` with, in id order; cost O(those items). */
int store_txn_scan_type(store_txn *txn, const char *collection, const char *user, const char *type,
                        store_id_fn fn, void *ctx, aff_err *err);

/* Erases the user's profile, history, interactions and type index in the collection.
 * *existed (may be NULL) tells whether there was a profile. */
int store_txn_delete_user(store_txn *txn, const char *collection, const char *user, bool *existed,
                          aff_err *err);

/* AFF_ENOTFOUND when the item has no counter. */
int store_txn_get_popularity(store_txn *txn, const char *collection, const char *item,
                             store_popularity *out, aff_err *err);
/* Writes the counter (p->log_score must not be below old->log_score) and refiles the item in
 * the ranking index when its score left [rank_log_score, rank_log_score +
 * STORE_POP_RANK_SLACK). old is the counter as read (NULL when there was none);
 * p->rank_log_score is ignored. */
int store_txn_put_popularity(store_txn *txn, const char *collection, const char *item,
                             const store_popularity *old, const store_popularity *p, aff_err *err);
typedef int (*store_popularity_fn)(void *ctx, const char *item, const store_popularity *p);
/* Counters by rank_log_score descending (ties by item id), each as it is now. An item's
 * log_score is below its rank_log_score + STORE_POP_RANK_SLACK, so a reader after the best k
 * may stop once the next rank_log_score + STORE_POP_RANK_SLACK is at most the k-th best
 * log_score seen. fn returns nonzero to stop (a positive value is not an error). */
int store_txn_scan_popular(store_txn *txn, const char *collection, store_popularity_fn fn,
                           void *ctx, aff_err *err);

/* ---- models ---------------------------------------------------------------------------------- */

/* The collection's learned model as an opaque blob (model.c owns its layout), replaced whole in
 * one durable transaction. AFF_ENOTFOUND when the collection does not exist. Dropping the
 * collection erases it. */
int store_put_model(aff_store *s, const char *collection, const void *blob, size_t len,
                    aff_err *err);
/* *blob: a malloc'ed copy (the caller frees it). AFF_ENOTFOUND when none is stored. */
int store_get_model(aff_store *s, const char *collection, void **blob, size_t *len, aff_err *err);
/* Replication: a model blob arrives through the write log in parts (see transport_log.c).
 * Part `index` of upload `upload` (copied); kept until store_commit_model or the collection's
 * drop. AFF_ENOTFOUND for an unknown collection. */
int store_put_model_part(aff_store *s, const char *collection, uint64_t upload, uint32_t index,
                         const void *data, size_t len, aff_err *err);
/* Parts 0..n-1 of the upload concatenated; *blob malloc'ed (the caller frees it).
 * AFF_ENOTFOUND when a part is missing. */
int store_get_model_parts(aff_store *s, const char *collection, uint64_t upload, uint32_t n,
                          void **blob, size_t *len, aff_err *err);
/* Puts the collection's model blob (as store_put_model) and deletes the parts of `upload`
 * and of every lower upload id (abandoned ones), in one transaction. */
int store_commit_model(aff_store *s, const char *collection, uint64_t upload, const void *blob,
                       size_t len, aff_err *err);

/* ---- personalization opt-outs (issue 12) ---- */

/* The collection name that stands for every collection in an opt-out (no collection can be
 * named "*"). */
#define STORE_ALL_COLLECTIONS "*"
/* AFF_ENOTFOUND when the user has not opted out in collection (or "*"). since_ms may be
 * NULL. Dropping a collection drops its opt-outs. */
int store_txn_get_opt_out(store_txn *txn, const char *collection, const char *user,
                          int64_t *since_ms, aff_err *err);
int store_txn_put_opt_out(store_txn *txn, const char *collection, const char *user,
                          int64_t since_ms, aff_err *err);
int store_txn_delete_opt_out(store_txn *txn, const char *collection, const char *user,
                             bool *existed, aff_err *err);

/* ---- event retention (issue 12) ---- */

/* Every user with a profile in the collection, in id order. */
int store_txn_scan_users(store_txn *txn, const char *collection, store_id_fn fn, void *ctx,
                         aff_err *err);
int store_txn_delete_interaction(store_txn *txn, const char *collection, const char *user,
                                 const char *item, aff_err *err);
typedef int (*store_mark_fn)(void *ctx, const char *item, int64_t last_ms);
/* store_txn_scan_type with each mark's time. */
int store_txn_scan_type_marks(store_txn *txn, const char *collection, const char *user,
                              const char *type, store_mark_fn fn, void *ctx, aff_err *err);
int store_txn_unmark_type(store_txn *txn, const char *collection, const char *user,
                          const char *type, const char *item, aff_err *err);

/* ---- experiments (measurement) ---- */

/* An experiment's state as an opaque blob (experiments.c owns its layout), keyed by its id
 * and replaced whole in one durable transaction. */
int store_put_experiment(aff_store *s, const char *id, const void *blob, size_t len, aff_err *err);
/* fn(ctx, id, blob, len) for every stored experiment in id order; the blob is valid during the
 * call only. fn returns 0 to go on, > 0 to stop, < 0 (an aff_status) to fail the scan. */
typedef int (*store_blob_fn)(void *ctx, const char *id, const void *blob, size_t len);
int store_scan_experiments(aff_store *s, store_blob_fn fn, void *ctx, aff_err *err);

#endif

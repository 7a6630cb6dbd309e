/*
 * batcher.h: dynamic batching between the transport and the engine.
 *
 * Requests are plain C structs with a completion callback; the batcher knows no gRPC, CUDA or
 * FAISS. Each (collection, kind) pair has its own FIFO queue. A worker thread takes the
 * oldest queue that is ready and packs its requests, oldest first, into one engine call
 * (engine_search for SEARCH, engine_rerank for RERANK) of at most max_batch scans (a single
 * request with more than max_batch goes alone). A request's scans are its queries, less those
 * that share a vector with another query of the request (batcher_request.scans: the engine
 * scores such a vector once for all of them, so they cost a heap, not a scan). A queue is
 * ready when a worker is free and
 *   - no batch is running at all (the backend is idle), or
 *   - it holds max_batch scans or more, or
 *   - its oldest request has waited max_wait_us.
 * With one worker (the default) the first rule always holds when the worker is free: requests
 * that arrive while a batch runs are packed into the next one. With more workers, a second
 * batch starts beside a running one only when it is full or has waited max_wait_us.
 *
 * Deadlines: a request whose deadline has passed when its batch forms is completed with
 * AFF_EDEADLINE and never computed. Back-pressure: a queue holds at most queue_limit
 * requests; batcher_submit refuses more at once with AFF_EFULL.
 *
 * Ownership: from a successful batcher_submit until its done callback, the request (and
 * everything it points to) belongs to the batcher; the submitter must not touch it. The
 * callback is called exactly once, from a batcher worker thread (or from batcher_destroy's
 * thread for requests still queued at shutdown), and the request is the callee's again.
 */
#ifndef AFFINITY_BATCHER_H
#define AFFINITY_BATCHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "status.h"

typedef struct batcher batcher;

typedef enum batcher_kind {
    BATCHER_SEARCH = 0, /* aff_query → aff_hit lists (Search, SimilarItems, Recommend) */
    BATCHER_RERANK = 1, /* aff_rerank_query → aff_rerank_hit lists (Rerank) */
} batcher_kind;

typedef struct batcher_request batcher_request;
typedef void (*batcher_done_fn)(batcher_request *req);

/* One call's worth of queries. Fields above "outputs" are set by the submitter; outputs are
 * filled by the batcher before `done` runs. */
struct batcher_request {
    batcher_kind kind;
    const char *collection; /* NUL-terminated, ≤ AFF_MAX_NAME_LEN bytes */
    int64_t deadline_ns;    /* batcher_now_ns() clock; 0 = no deadline */
    size_t nq;              /* queries in this request, ≥ 1 */
    /* What the request counts against max_batch: its distinct query vectors when queries
     * share one (the pipeline's organic query and its promotions' queries: the engine scores
     * the vector once, backend_search.same_as), 1..nq; 0 = nq */
    size_t scans;
    /* SEARCH: nq queries; hits has room for sum(k) entries, n_hits for nq. */
    const aff_query *queries;
    aff_hit *hits;
    uint32_t *n_hits;
    /* RERANK: nq queries; rerank_out has room for sum(n) entries. */
    const aff_rerank_query *rerank;
    aff_rerank_hit *rerank_out;
    aff_err *query_errs; /* nq entries: each query's outcome */
    batcher_done_fn done;
    void *user; /* the submitter's context, untouched */

    /* outputs */
    int status; /* AFF_OK: per-query outcomes in query_errs; AFF_EDEADLINE or
                   AFF_EUNAVAILABLE: the request was not computed (detail in err) */
    aff_err err;
    uint64_t wait_ns; /* time spent queued */

    /* private to the batcher */
    batcher_request *next;
    int64_t enqueued_ns;
};

/* Runs one packed batch. The default executor calls the engine; tests plug in their own.
 * scratch is the calling worker's arena (scratch.h): each worker owns one for its lifetime and
 * lends it to every batch it runs, so a warmed-up worker computes without heap allocations. */
typedef struct batcher_exec {
    int (*search)(void *ctx, aff_scratch *scratch, const char *collection,
                  const aff_query *queries, size_t nq, aff_hit *hits, uint32_t *n_hits,
                  aff_err *query_errs);
    int (*rerank)(void *ctx, aff_scratch *scratch, const char *collection,
                  const aff_rerank_query *queries, size_t nq, aff_rerank_hit *out,
                  aff_err *query_errs);
    void *ctx;
} batcher_exec;

/* An executor that forwards to engine_search / engine_rerank on `e` (borrowed). */
batcher_exec batcher_engine_exec(aff_engine *e);

typedef struct batcher_config {
    uint32_t max_batch;   /* scans per engine call (batcher_request.scans), ≥ 1 */
    uint32_t max_wait_us; /* see the header comment */
    uint32_t queue_limit; /* requests queued per (collection, kind), ≥ 1 */
    uint32_t workers;     /* engine calls that may run at once; 0 = 1 */
    /* Optional observer, called by a worker (without locks held) as each batch starts:
     * queries in the batch and requests still queued. For metrics; must be quick. */
    void (*on_batch)(void *ctx, uint64_t queries, uint64_t queued);
    void *on_batch_ctx;
} batcher_config;

#define BATCHER_HIST_BUCKETS 16

/* Counters since creation. size_histogram[i] counts batches of [2^i, 2^(i+1)) requests (the
 * last bucket is open-ended). */
typedef struct batcher_stats {
    uint64_t batches;        /* engine calls */
    uint64_t requests;       /* requests computed */
    uint64_t queries;        /* queries computed */
    uint64_t max_batch_seen; /* most requests in one batch */
    uint64_t size_histogram[BATCHER_HIST_BUCKETS];
    uint64_t queue_wait_us_total;
    uint64_t rejected_queue_full;
    uint64_t expired_deadline;
    uint64_t queued; /* requests waiting now */
} batcher_stats;

/* Creates a batcher and starts its workers. exec is copied. */
int batcher_create(batcher **out, const batcher_config *cfg, const batcher_exec *exec,
                   aff_err *err);
/* batcher_stop, then waits for running batches to finish and joins the workers.
 * NULL: no-op. */
void batcher_destroy(batcher *b);

/* Stops accepting (later submits get AFF_EUNAVAILABLE) and completes every queued request
 * with AFF_EUNAVAILABLE; batches already running finish normally. Idempotent; thread-safe. */
void batcher_stop(batcher *b);

/* Queues req. 0: queued, `done` will run. AFF_EFULL (queue full), AFF_EUNAVAILABLE
 * (shutting down) or AFF_EINVAL: refused, `done` will not run. Thread-safe. */
int batcher_submit(batcher *b, batcher_request *req, aff_err *err);

/* Waits until nothing is queued or running, or until timeout_ms passes. Returns 0 or
 * AFF_EDEADLINE. Thread-safe. */
int batcher_wait_idle(batcher *b, uint32_t timeout_ms);

void batcher_get_stats(batcher *b, batcher_stats *out);

/* CLOCK_MONOTONIC in nanoseconds: the clock of deadline_ns. */
int64_t batcher_now_ns(void);

#endif

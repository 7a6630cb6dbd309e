/*
 * batcher.c: owns the per-(collection, kind) request queues, the worker threads that pack
 * them into engine calls, and the batching counters. Rules kept: one mutex guards every queue
 * and counter; callbacks and engine calls run without it held; every request submitted is
 * completed exactly once.
 */
#include "batcher.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct bqueue {
    char collection[AFF_MAX_NAME_LEN + 1];
    batcher_kind kind;
    batcher_request *head, *tail;
    uint32_t count;    /* requests queued */
    uint64_t scans_total; /* scans queued (request_scans) */
    struct bqueue *next;
} bqueue;

/* A worker's reusable buffers for packing one batch; grown, never shrunk. Owned by the
 * worker thread (worker_main) and freed when it exits. */
typedef struct bscratch {
    aff_scratch *arena; /* lent to the executor for each batch; NULL if it could not be made */
    aff_query *queries;
    size_t queries_cap;
    aff_rerank_query *rerank;
    size_t rerank_cap;
    aff_hit *hits;
    size_t hits_cap;
    aff_rerank_hit *rerank_out;
    size_t rerank_out_cap;
    uint32_t *n_hits;
    size_t n_hits_cap;
    aff_err *errs;
    size_t errs_cap;
} bscratch;

struct batcher {
    batcher_config cfg;
    batcher_exec exec;
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* workers: something queued, a batch ended, or stopping */
    pthread_cond_t idle_cv; /* batcher_wait_idle: a batch ended */
    bqueue *queues;
    uint32_t running; /* batches being computed */
    uint64_t queued;  /* requests in all queues */
    bool stopping;
    pthread_t *threads;
    uint32_t n_threads;
    batcher_stats stats;
};

int64_t batcher_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static struct timespec abs_time(int64_t ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    return ts;
}

/* ---- the engine executor ---------------------------------------------------------------- */

static int exec_engine_search(void *ctx, aff_scratch *scratch, const char *collection,
                              const aff_query *queries, size_t nq, aff_hit *hits,
                              uint32_t *n_hits, aff_err *query_errs)
{
    return engine_search(ctx, scratch, collection, queries, nq, hits, n_hits, query_errs);
}

static int exec_engine_rerank(void *ctx, aff_scratch *scratch, const char *collection,
                              const aff_rerank_query *queries, size_t nq, aff_rerank_hit *out,
                              aff_err *query_errs)
{
    return engine_rerank(ctx, scratch, collection, queries, nq, out, query_errs);
}

batcher_exec batcher_engine_exec(aff_engine *e)
{
    return (batcher_exec){.search = exec_engine_search, .rerank = exec_engine_rerank, .ctx = e};
}

/* ---- helpers ------------------------------------------------------------------------------ */

/* What r counts against max_batch (batcher_request.scans). */
static size_t request_scans(const batcher_request *r)
{
    return r->scans && r->scans < r->nq ? r->scans : r->nq;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *q = realloc(*p, n * elem);
    if (!q) return AFF_ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

static void scratch_free(bscratch *s)
{
    free(s->queries);
    free(s->rerank);
    free(s->hits);
    free(s->rerank_out);
    free(s->n_hits);
    free(s->errs);
    aff_scratch_destroy(s->arena);
}

/* Output slots one request needs: sum of k (SEARCH) or of candidate counts (RERANK). */
static size_t request_out_len(const batcher_request *r)
{
    size_t n = 0;
    for (size_t i = 0; i < r->nq; i++)
        n += r->kind == BATCHER_SEARCH ? r->queries[i].k : r->rerank[i].n;
    return n;
}

static void complete_failed(batcher_request *r, int code, const char *msg)
{
    r->status = aff__fail(&r->err, code, "%s", msg);
    r->done(r);
}

static unsigned hist_bucket(uint64_t n)
{
    unsigned b = 0;
    while (n > 1 && b + 1 < BATCHER_HIST_BUCKETS) {
        n >>= 1;
        b++;
    }
    return b;
}

/* ---- running one batch --------------------------------------------------------------------- */

/* Packs the requests of list (all of one queue) into one engine call and completes them.
 * Called without the lock. */
static void run_batch(batcher *b, bscratch *s, const char *collection, batcher_kind kind,
                      batcher_request *list)
{
    size_t nq = 0, nout = 0;
    for (batcher_request *r = list; r; r = r->next) {
        nq += r->nq;
        nout += request_out_len(r);
    }
    int rc = grow((void **)&s->errs, &s->errs_cap, nq, sizeof *s->errs);
    if (kind == BATCHER_SEARCH) {
        if (!rc) rc = grow((void **)&s->queries, &s->queries_cap, nq, sizeof *s->queries);
        if (!rc) rc = grow((void **)&s->n_hits, &s->n_hits_cap, nq, sizeof *s->n_hits);
        if (!rc) rc = grow((void **)&s->hits, &s->hits_cap, nout ? nout : 1, sizeof *s->hits);
    } else {
        if (!rc) rc = grow((void **)&s->rerank, &s->rerank_cap, nq, sizeof *s->rerank);
        if (!rc)
            rc = grow((void **)&s->rerank_out, &s->rerank_out_cap, nout ? nout : 1,
                      sizeof *s->rerank_out);
    }
    if (rc) {
        for (batcher_request *r = list, *next; r; r = next) {
            next = r->next;
            complete_failed(r, AFF_ENOMEM, "out of memory while forming a batch");
        }
        return;
    }

    size_t qi = 0;
    for (batcher_request *r = list; r; r = r->next) {
        for (size_t i = 0; i < r->nq; i++, qi++) {
            if (kind == BATCHER_SEARCH)
                s->queries[qi] = r->queries[i];
            else
                s->rerank[qi] = r->rerank[i];
            aff__err_clear(&s->errs[qi]);
        }
    }
    if (kind == BATCHER_SEARCH)
        b->exec.search(b->exec.ctx, s->arena, collection, s->queries, nq, s->hits, s->n_hits,
                       s->errs);
    else
        b->exec.rerank(b->exec.ctx, s->arena, collection, s->rerank, nq, s->rerank_out, s->errs);

    /* Hand each request its slice of the outputs, then complete it. */
    qi = 0;
    size_t off = 0;
    for (batcher_request *r = list, *next; r; r = next) {
        next = r->next;
        size_t len = request_out_len(r);
        if (kind == BATCHER_SEARCH) {
            memcpy(r->hits, s->hits + off, len * sizeof *s->hits);
            memcpy(r->n_hits, s->n_hits + qi, r->nq * sizeof *s->n_hits);
        } else {
            memcpy(r->rerank_out, s->rerank_out + off, len * sizeof *s->rerank_out);
        }
        memcpy(r->query_errs, s->errs + qi, r->nq * sizeof *s->errs);
        off += len;
        qi += r->nq;
        r->status = AFF_OK;
        aff__err_clear(&r->err);
        r->done(r);
    }
}

/* The queue a free worker should serve now, or NULL; *wake_ns gets the earliest time a
 * waiting queue becomes ready by age (INT64_MAX: none). Lock held. */
static bqueue *pick_queue(batcher *b, int64_t now, int64_t *wake_ns)
{
    bqueue *best = NULL;
    int64_t max_wait = (int64_t)b->cfg.max_wait_us * 1000;
    *wake_ns = INT64_MAX;
    for (bqueue *q = b->queues; q; q = q->next) {
        if (!q->count) continue;
        int64_t since = q->head->enqueued_ns;
        bool ready =
            b->running == 0 || q->scans_total >= b->cfg.max_batch || now - since >= max_wait;
        if (ready) {
            if (!best || since < best->head->enqueued_ns) best = q;
        } else if (since + max_wait < *wake_ns) {
            *wake_ns = since + max_wait;
        }
    }
    return best;
}

static void *worker_main(void *arg)
{
    batcher *b = arg;
    bscratch s = {0};
    if (aff_scratch_create(&s.arena) != AFF_OK) s.arena = NULL; /* the engine makes its own */
    char collection[AFF_MAX_NAME_LEN + 1];

    pthread_mutex_lock(&b->mu);
    while (!b->stopping) {
        int64_t now = batcher_now_ns(), wake;
        bqueue *q = pick_queue(b, now, &wake);
        if (!q) {
            if (wake == INT64_MAX) {
                pthread_cond_wait(&b->work_cv, &b->mu);
            } else {
                struct timespec ts = abs_time(wake);
                pthread_cond_timedwait(&b->work_cv, &b->mu, &ts);
            }
            continue;
        }

        /* Take requests oldest first up to max_batch scans; expired ones go aside. */
        batcher_request *batch = NULL, **batch_tail = &batch, *expired = NULL;
        uint64_t nq = 0, nscans = 0, nreq = 0, wait_ns = 0, n_expired = 0;
        while (q->head) {
            batcher_request *r = q->head;
            if (r->deadline_ns && r->deadline_ns <= now) {
                q->head = r->next;
                r->next = expired;
                expired = r;
            } else if (nreq == 0 || nscans + request_scans(r) <= b->cfg.max_batch) {
                q->head = r->next;
                r->next = NULL;
                *batch_tail = r;
                batch_tail = &r->next;
                nq += r->nq;
                nscans += request_scans(r);
                nreq++;
                r->wait_ns = (uint64_t)(now - r->enqueued_ns);
                wait_ns += r->wait_ns;
            } else {
                break;
            }
            q->count--;
            q->scans_total -= request_scans(r);
            b->queued--;
            if (r->deadline_ns && r->deadline_ns <= now) n_expired++;
        }
        if (!q->head) q->tail = NULL;
        b->stats.expired_deadline += n_expired;
        batcher_kind kind = q->kind;
        memcpy(collection, q->collection, sizeof collection);
        if (nreq) {
            b->running++;
            b->stats.batches++;
            b->stats.requests += nreq;
            b->stats.queries += nq;
            if (nreq > b->stats.max_batch_seen) b->stats.max_batch_seen = nreq;
            b->stats.size_histogram[hist_bucket(nreq)]++;
            b->stats.queue_wait_us_total += wait_ns / 1000;
        }
        pthread_mutex_unlock(&b->mu);

        for (batcher_request *r = expired, *next; r; r = next) {
            next = r->next;
            r->wait_ns = (uint64_t)(now - r->enqueued_ns);
            complete_failed(r, AFF_EDEADLINE,
                            "the call's deadline passed while it waited in the batch queue");
        }
        if (nreq) run_batch(b, &s, collection, kind, batch);

        pthread_mutex_lock(&b->mu);
        if (nreq) b->running--;
        pthread_cond_broadcast(&b->work_cv);
        pthread_cond_broadcast(&b->idle_cv);
    }
    pthread_mutex_unlock(&b->mu);
    scratch_free(&s);
    return NULL;
}

/* ---- public API ---------------------------------------------------------------------------- */

int batcher_create(batcher **out, const batcher_config *cfg, const batcher_exec *exec, aff_err *err)
{
    int rc = 0;
    batcher *b = NULL;
    *out = NULL;
    if (!cfg || !exec || !exec->search || !exec->rerank || cfg->max_batch < 1 ||
        cfg->queue_limit < 1) {
        rc = aff__fail(err, AFF_EINVAL,
                       "batcher needs max_batch >= 1, queue_limit >= 1 and an executor");
        goto out;
    }
    b = calloc(1, sizeof *b);
    if (!b) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory creating the batcher");
        goto out;
    }
    b->cfg = *cfg;
    if (b->cfg.workers == 0) b->cfg.workers = 1;
    b->exec = *exec;
    pthread_mutex_init(&b->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->work_cv, &ca);
    pthread_cond_init(&b->idle_cv, &ca);
    pthread_condattr_destroy(&ca);
    b->threads = calloc(b->cfg.workers, sizeof *b->threads);
    if (!b->threads) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory creating the batcher");
        goto out;
    }
    for (uint32_t i = 0; i < b->cfg.workers; i++) {
        int e = pthread_create(&b->threads[i], NULL, worker_main, b);
        if (e) {
            rc = aff__fail(err, AFF_EINTERNAL, "cannot start a batcher thread: %s", strerror(e));
            goto out;
        }
        b->n_threads++;
    }
    *out = b;
    b = NULL;
out:
    batcher_destroy(b);
    return rc;
}

void batcher_stop(batcher *b)
{
    pthread_mutex_lock(&b->mu);
    b->stopping = true;
    batcher_request *left = NULL;
    for (bqueue *q = b->queues; q; q = q->next) {
        while (q->head) {
            batcher_request *r = q->head;
            q->head = r->next;
            r->next = left;
            left = r;
        }
        q->tail = NULL;
        q->count = 0;
        q->scans_total = 0;
    }
    b->queued = 0;
    pthread_cond_broadcast(&b->work_cv);
    pthread_mutex_unlock(&b->mu);

    for (batcher_request *r = left, *next; r; r = next) {
        next = r->next;
        complete_failed(r, AFF_EUNAVAILABLE, "the server is shutting down; retry elsewhere");
    }
}

void batcher_destroy(batcher *b)
{
    if (!b) return;
    batcher_stop(b);
    for (uint32_t i = 0; i < b->n_threads; i++)
        pthread_join(b->threads[i], NULL);
    free(b->threads);
    for (bqueue *q = b->queues, *next; q; q = next) {
        next = q->next;
        free(q);
    }
    pthread_cond_destroy(&b->work_cv);
    pthread_cond_destroy(&b->idle_cv);
    pthread_mutex_destroy(&b->mu);
    free(b);
}

int batcher_submit(batcher *b, batcher_request *req, aff_err *err)
{
    int rc = 0;
    if (!req || !req->done || !req->collection || req->nq == 0 || !req->query_errs ||
        strlen(req->collection) > AFF_MAX_NAME_LEN ||
        (req->kind == BATCHER_SEARCH && (!req->queries || !req->hits || !req->n_hits)) ||
        (req->kind == BATCHER_RERANK && (!req->rerank || !req->rerank_out)) ||
        (req->kind != BATCHER_SEARCH && req->kind != BATCHER_RERANK))
        return aff__fail(err, AFF_EINVAL, "malformed batcher request");

    pthread_mutex_lock(&b->mu);
    if (b->stopping) {
        rc = aff__fail(err, AFF_EUNAVAILABLE, "the server is shutting down; retry elsewhere");
        goto out;
    }
    bqueue *q = b->queues;
    while (q && !(q->kind == req->kind && strcmp(q->collection, req->collection) == 0))
        q = q->next;
    if (!q) {
        q = calloc(1, sizeof *q);
        if (!q) {
            rc = aff__fail(err, AFF_ENOMEM, "out of memory queueing the call");
            goto out;
        }
        strcpy(q->collection, req->collection);
        q->kind = req->kind;
        q->next = b->queues;
        b->queues = q;
    }
    if (q->count >= b->cfg.queue_limit) {
        b->stats.rejected_queue_full++;
        rc = aff__fail(err, AFF_EFULL,
                       "the queue of collection '%s' is full (%u calls waiting, the limit set "
                       "by --queue-limit); retry with backoff",
                       req->collection, b->cfg.queue_limit);
        goto out;
    }
    req->next = NULL;
    req->enqueued_ns = batcher_now_ns();
    req->wait_ns = 0;
    if (q->tail)
        q->tail->next = req;
    else
        q->head = req;
    q->tail = req;
    q->count++;
    q->scans_total += request_scans(req);
    b->queued++;
    pthread_cond_signal(&b->work_cv);
out:
    pthread_mutex_unlock(&b->mu);
    return rc;
}

int batcher_wait_idle(batcher *b, uint32_t timeout_ms)
{
    int rc = 0;
    int64_t until = batcher_now_ns() + (int64_t)timeout_ms * 1000000;
    struct timespec ts = abs_time(until);
    pthread_mutex_lock(&b->mu);
    while (b->queued || b->running) {
        if (pthread_cond_timedwait(&b->idle_cv, &b->mu, &ts) == ETIMEDOUT) {
            rc = (b->queued || b->running) ? AFF_EDEADLINE : 0;
            break;
        }
    }
    pthread_mutex_unlock(&b->mu);
    return rc;
}

void batcher_get_stats(batcher *b, batcher_stats *out)
{
    pthread_mutex_lock(&b->mu);
    *out = b->stats;
    out->queued = b->queued;
    pthread_mutex_unlock(&b->mu);
}

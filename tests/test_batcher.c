/*
 * test_batcher.c: the batcher against a fake executor (no engine): packing, max_batch,
 * max_wait_us, deadlines, back-pressure, shutdown and per-collection queues.
 */
#include <criterion/criterion.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "batcher.h"

/* ---- a fake executor that can be held closed ---------------------------------------------- */

#define MAX_CALLS 64

typedef struct fake {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool gate_closed; /* executor calls block while true */
    int calls;
    int in_call;
    size_t call_nq[MAX_CALLS];
    char call_collection[MAX_CALLS][AFF_MAX_NAME_LEN + 1];
    int completed; /* done callbacks seen */
} fake;

static void fake_init(fake *f)
{
    memset(f, 0, sizeof *f);
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
}

static void fake_enter(fake *f, const char *collection, size_t nq)
{
    pthread_mutex_lock(&f->mu);
    if (f->calls < MAX_CALLS) {
        f->call_nq[f->calls] = nq;
        snprintf(f->call_collection[f->calls], sizeof f->call_collection[0], "%s", collection);
    }
    f->calls++;
    f->in_call++;
    pthread_cond_broadcast(&f->cv);
    while (f->gate_closed)
        pthread_cond_wait(&f->cv, &f->mu);
    f->in_call--;
    pthread_mutex_unlock(&f->mu);
}

/* Query i of the batch gets k hits with id "<item_id or q>:<j>" and score = batch position. */
static int fake_search(void *ctx, aff_scratch *scratch, const char *collection,
                       const aff_query *q, size_t nq, aff_hit *hits, uint32_t *n_hits,
                       aff_err *errs)
{
    (void)scratch;
    fake_enter(ctx, collection, nq);
    size_t off = 0;
    for (size_t i = 0; i < nq; i++) {
        for (uint32_t j = 0; j < q[i].k; j++) {
            hits[off + j].score = (float)i;
            snprintf(hits[off + j].id, sizeof hits[0].id, "%s:%u",
                     q[i].item_id ? q[i].item_id : "q", j);
        }
        n_hits[i] = q[i].k;
        off += q[i].k;
        aff__err_clear(&errs[i]);
        if (q[i].item_id && strcmp(q[i].item_id, "bad") == 0)
            aff__fail(&errs[i], AFF_ENOTFOUND, "item 'bad' not found");
    }
    return AFF_OK;
}

static int fake_rerank(void *ctx, aff_scratch *scratch, const char *collection,
                       const aff_rerank_query *q, size_t nq, aff_rerank_hit *out, aff_err *errs)
{
    (void)scratch;
    fake_enter(ctx, collection, nq);
    size_t off = 0;
    for (size_t i = 0; i < nq; i++) {
        for (uint32_t j = 0; j < q[i].n; j++)
            out[off + j] =
                (aff_rerank_hit){.index = q[i].n - 1 - j, .found = true, .blended = (float)j};
        off += q[i].n;
        aff__err_clear(&errs[i]);
    }
    return AFF_OK;
}

static void fake_close(fake *f)
{
    pthread_mutex_lock(&f->mu);
    f->gate_closed = true;
    pthread_mutex_unlock(&f->mu);
}

static void fake_open(fake *f)
{
    pthread_mutex_lock(&f->mu);
    f->gate_closed = false;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

/* Waits (bounded) until pred holds; returns whether it did. */
static bool fake_wait(fake *f, int calls, int in_call, int completed)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 20;
    bool ok = true;
    pthread_mutex_lock(&f->mu);
    while (f->calls < calls || f->in_call < in_call || f->completed < completed) {
        if (pthread_cond_timedwait(&f->cv, &f->mu, &ts)) {
            ok = false;
            break;
        }
    }
    pthread_mutex_unlock(&f->mu);
    return ok;
}

/* ---- requests ----------------------------------------------------------------------------- */

typedef struct treq {
    batcher_request req;
    aff_query q[4];
    aff_hit hits[4 * 8];
    uint32_t n_hits[4];
    aff_rerank_query rq[2];
    aff_rerank_hit rout[2 * 8];
    const char *ids[8];
    aff_err errs[4];
    fake *f;
    bool done;
    int64_t done_ns;
} treq;

static void treq_done(batcher_request *r)
{
    treq *t = r->user;
    pthread_mutex_lock(&t->f->mu);
    t->done = true;
    t->done_ns = batcher_now_ns();
    t->f->completed++;
    pthread_cond_broadcast(&t->f->cv);
    pthread_mutex_unlock(&t->f->mu);
}

static void treq_search(treq *t, fake *f, const char *collection, size_t nq, uint32_t k,
                        const char *item_id)
{
    memset(t, 0, sizeof *t);
    t->f = f;
    for (size_t i = 0; i < nq; i++)
        t->q[i] = (aff_query){.item_id = item_id, .k = k};
    t->req = (batcher_request){.kind = BATCHER_SEARCH,
                               .collection = collection,
                               .nq = nq,
                               .queries = t->q,
                               .hits = t->hits,
                               .n_hits = t->n_hits,
                               .query_errs = t->errs,
                               .done = treq_done,
                               .user = t};
}

static batcher *make(fake *f, uint32_t max_batch, uint32_t max_wait_us, uint32_t queue_limit,
                     uint32_t workers)
{
    batcher_config cfg = {.max_batch = max_batch,
                          .max_wait_us = max_wait_us,
                          .queue_limit = queue_limit,
                          .workers = workers};
    batcher_exec ex = {.search = fake_search, .rerank = fake_rerank, .ctx = f};
    batcher *b = NULL;
    aff_err err;
    cr_assert_eq(batcher_create(&b, &cfg, &ex, &err), 0, "%s", err.msg);
    return b;
}

static void submit_ok(batcher *b, treq *t)
{
    aff_err err;
    int rc = batcher_submit(b, &t->req, &err);
    cr_assert_eq(rc, 0, "submit: %s", err.msg);
}

/* ---- tests -------------------------------------------------------------------------------- */

Test(batcher, computes_one_request_and_returns_its_slice)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 64, 1000, 16, 1);
    treq t;
    treq_search(&t, &f, "shop", 3, 2, "x");
    submit_ok(b, &t);
    cr_assert(fake_wait(&f, 1, 0, 1));
    cr_assert_eq(t.req.status, AFF_OK);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(t.n_hits[i], 2);
        cr_assert_eq(t.errs[i].code, AFF_OK);
        cr_assert_float_eq(t.hits[2 * i].score, (float)i, 0);
        cr_assert_str_eq(t.hits[2 * i + 1].id, "x:1");
    }
    batcher_destroy(b);
}

Test(batcher, merges_requests_that_arrive_while_the_backend_is_busy)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 64, 1000000, 64, 1);
    static treq t[11];
    fake_close(&f);
    treq_search(&t[0], &f, "shop", 1, 1, "first");
    submit_ok(b, &t[0]);
    cr_assert(fake_wait(&f, 1, 1, 0), "first batch never started");
    for (int i = 1; i < 11; i++) {
        treq_search(&t[i], &f, "shop", 1, 3, i == 5 ? "bad" : "later");
        submit_ok(b, &t[i]);
    }
    fake_open(&f);
    cr_assert(fake_wait(&f, 2, 0, 11));
    cr_assert_eq(f.calls, 2, "expected 2 engine calls, got %d", f.calls);
    cr_assert_eq(f.call_nq[1], 10);
    /* Each request got its own slice: score = position in the packed batch. */
    for (int i = 1; i < 11; i++) {
        cr_assert_float_eq(t[i].hits[0].score, (float)(i - 1), 0);
        cr_assert_eq(t[i].errs[0].code, i == 5 ? AFF_ENOTFOUND : AFF_OK);
    }
    batcher_stats st;
    batcher_get_stats(b, &st);
    cr_assert_eq(st.batches, 2);
    cr_assert_eq(st.requests, 11);
    cr_assert_eq(st.max_batch_seen, 10);
    cr_assert_eq(st.size_histogram[0], 1); /* the batch of 1 */
    cr_assert_eq(st.size_histogram[3], 1); /* the batch of 10: [8, 16) */
    batcher_destroy(b);
}

Test(batcher, never_packs_more_than_max_batch_queries)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 4, 1000000, 64, 1);
    static treq t[11];
    fake_close(&f);
    treq_search(&t[0], &f, "shop", 1, 1, NULL);
    submit_ok(b, &t[0]);
    cr_assert(fake_wait(&f, 1, 1, 0));
    for (int i = 1; i < 11; i++) {
        treq_search(&t[i], &f, "shop", 1, 1, NULL);
        submit_ok(b, &t[i]);
    }
    fake_open(&f);
    cr_assert(fake_wait(&f, 4, 0, 11));
    cr_assert_eq(f.calls, 4);
    cr_assert_eq(f.call_nq[1], 4);
    cr_assert_eq(f.call_nq[2], 4);
    cr_assert_eq(f.call_nq[3], 2);
    batcher_destroy(b);
}

/* A request whose queries share vectors (the pipeline's organic query and its promotions')
 * counts its scans against max_batch, not its queries: 2-query requests of 1 scan pack 4 to
 * a batch of max_batch 4 (8 queries); counted by queries they would pack 2. */
Test(batcher, counts_a_shared_vector_once_against_max_batch)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 4, 1000000, 64, 1);
    static treq t[10];
    fake_close(&f);
    treq_search(&t[0], &f, "shop", 1, 1, NULL);
    submit_ok(b, &t[0]);
    cr_assert(fake_wait(&f, 1, 1, 0));
    for (int i = 1; i < 10; i++) {
        treq_search(&t[i], &f, "shop", 2, 1, NULL);
        t[i].req.scans = i == 9 ? 0 : 1; /* the last one: 0 = its 2 queries count */
        submit_ok(b, &t[i]);
    }
    fake_open(&f);
    cr_assert(fake_wait(&f, 4, 0, 10));
    cr_assert_eq(f.calls, 4, "%d engine calls", f.calls);
    cr_assert_eq(f.call_nq[1], 8, "4 requests of 1 scan each: %zu queries", f.call_nq[1]);
    cr_assert_eq(f.call_nq[2], 8);
    cr_assert_eq(f.call_nq[3], 2, "the 0-scans request counts its 2 queries");
    for (int i = 1; i < 10; i++)
        cr_assert_eq(t[i].n_hits[1], 1, "request %d got both queries' hits", i);
    batcher_stats st;
    batcher_get_stats(b, &st);
    cr_assert_eq(st.queries, 19);
    batcher_destroy(b);
}

Test(batcher, sends_a_request_larger_than_max_batch_alone)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 2, 1000, 64, 1);
    treq t;
    treq_search(&t, &f, "shop", 4, 1, NULL);
    submit_ok(b, &t);
    cr_assert(fake_wait(&f, 1, 0, 1));
    cr_assert_eq(f.call_nq[0], 4);
    batcher_destroy(b);
}

Test(batcher, flushes_when_wait_expires)
{
    /* Two workers: while one batch runs, a second starts only when full or when its oldest
     * request has waited max_wait_us (50 ms here). */
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 100, 50000, 64, 2);
    treq t0, t1;
    fake_close(&f);
    treq_search(&t0, &f, "shop", 1, 1, NULL);
    submit_ok(b, &t0);
    cr_assert(fake_wait(&f, 1, 1, 0));
    treq_search(&t1, &f, "shop", 1, 1, NULL);
    int64_t t_submit = batcher_now_ns();
    submit_ok(b, &t1);
    /* The second batch starts while the first is still held. */
    cr_assert(fake_wait(&f, 2, 2, 0), "the waiting request was never flushed");
    int64_t started = batcher_now_ns();
    cr_assert_geq(started - t_submit, 45 * 1000000LL, "flushed after %lld ns",
                  (long long)(started - t_submit));
    fake_open(&f);
    cr_assert(fake_wait(&f, 2, 0, 2));
    batcher_destroy(b);
}

Test(batcher, flushes_a_full_queue_beside_a_running_batch)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 3, 60000000, 64, 2); /* max_wait 60 s: only "full" can trigger */
    static treq t[4];
    fake_close(&f);
    treq_search(&t[0], &f, "shop", 1, 1, NULL);
    submit_ok(b, &t[0]);
    cr_assert(fake_wait(&f, 1, 1, 0));
    for (int i = 1; i < 4; i++) {
        treq_search(&t[i], &f, "shop", 1, 1, NULL);
        submit_ok(b, &t[i]);
    }
    cr_assert(fake_wait(&f, 2, 2, 0), "a full queue did not start a batch");
    cr_assert_eq(f.call_nq[1], 3);
    fake_open(&f);
    cr_assert(fake_wait(&f, 2, 0, 4));
    batcher_destroy(b);
}

Test(batcher, answers_expired_requests_without_computing_them)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 64, 1000, 64, 1);
    treq t0, t1, t2;
    fake_close(&f);
    treq_search(&t0, &f, "shop", 1, 1, NULL);
    submit_ok(b, &t0);
    cr_assert(fake_wait(&f, 1, 1, 0));
    treq_search(&t1, &f, "shop", 1, 1, "late");
    t1.req.deadline_ns = batcher_now_ns() + 1000000; /* 1 ms */
    submit_ok(b, &t1);
    treq_search(&t2, &f, "shop", 1, 1, "fine");
    t2.req.deadline_ns = batcher_now_ns() + 60LL * 1000000000;
    submit_ok(b, &t2);
    /* Let t1's deadline pass (a time condition, not synchronization). */
    while (batcher_now_ns() < t1.req.deadline_ns + 1000000) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    fake_open(&f);
    cr_assert(fake_wait(&f, 2, 0, 3));
    cr_assert_eq(t1.req.status, AFF_EDEADLINE);
    cr_assert_eq(t2.req.status, AFF_OK);
    cr_assert_eq(f.calls, 2);
    cr_assert_eq(f.call_nq[1], 1, "the expired request was computed");
    batcher_stats st;
    batcher_get_stats(b, &st);
    cr_assert_eq(st.expired_deadline, 1);
    batcher_destroy(b);
}

Test(batcher, rejects_at_once_when_the_queue_is_full)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 64, 1000, 2, 1);
    treq t[4];
    fake_close(&f);
    treq_search(&t[0], &f, "shop", 1, 1, NULL);
    submit_ok(b, &t[0]);
    cr_assert(fake_wait(&f, 1, 1, 0)); /* running, no longer queued */
    treq_search(&t[1], &f, "shop", 1, 1, NULL);
    treq_search(&t[2], &f, "shop", 1, 1, NULL);
    treq_search(&t[3], &f, "shop", 1, 1, NULL);
    submit_ok(b, &t[1]);
    submit_ok(b, &t[2]);
    aff_err err;
    cr_assert_eq(batcher_submit(b, &t[3].req, &err), AFF_EFULL);
    cr_assert(strstr(err.msg, "full") != NULL, "%s", err.msg);
    /* Another collection has its own queue. */
    treq other;
    treq_search(&other, &f, "banners", 1, 1, NULL);
    submit_ok(b, &other);
    batcher_stats st;
    batcher_get_stats(b, &st);
    cr_assert_eq(st.rejected_queue_full, 1);
    cr_assert_eq(st.queued, 3);
    fake_open(&f);
    cr_assert(fake_wait(&f, 3, 0, 4));
    cr_assert(!t[3].done, "a refused request must not be completed");
    batcher_destroy(b);
}

Test(batcher, never_mixes_collections_in_one_batch)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 64, 1000, 64, 1);
    static treq t[9];
    fake_close(&f);
    treq_search(&t[0], &f, "a", 1, 1, NULL);
    submit_ok(b, &t[0]);
    cr_assert(fake_wait(&f, 1, 1, 0));
    for (int i = 1; i < 9; i++) {
        treq_search(&t[i], &f, i % 2 ? "a" : "b", 1, 1, NULL);
        submit_ok(b, &t[i]);
    }
    fake_open(&f);
    cr_assert(fake_wait(&f, 3, 0, 9));
    cr_assert_eq(f.calls, 3);
    cr_assert_str_eq(f.call_collection[1], "a"); /* oldest first */
    cr_assert_eq(f.call_nq[1], 4);
    cr_assert_str_eq(f.call_collection[2], "b");
    cr_assert_eq(f.call_nq[2], 4);
    batcher_destroy(b);
}

Test(batcher, reranks_through_the_rerank_executor)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 64, 1000, 64, 1);
    treq t;
    memset(&t, 0, sizeof t);
    t.f = &f;
    static const float v[2] = {1, 0};
    const char *ids[3] = {"a", "b", "c"};
    t.rq[0] = (aff_rerank_query){.vector = v, .ids = ids, .n = 3, .weight = 0.5f};
    t.rq[1] = (aff_rerank_query){.vector = v, .ids = ids, .n = 2, .weight = 0.5f};
    t.req = (batcher_request){.kind = BATCHER_RERANK,
                              .collection = "shop",
                              .nq = 2,
                              .rerank = t.rq,
                              .rerank_out = t.rout,
                              .query_errs = t.errs,
                              .done = treq_done,
                              .user = &t};
    submit_ok(b, &t);
    cr_assert(fake_wait(&f, 1, 0, 1));
    cr_assert_eq(t.req.status, AFF_OK);
    cr_assert_eq(t.rout[0].index, 2);
    cr_assert_eq(t.rout[3].index, 1); /* second query's slice starts at 3 */
    batcher_destroy(b);
}

typedef struct destroyer {
    batcher *b;
} destroyer;

static void *destroy_thread(void *arg)
{
    batcher_destroy(((destroyer *)arg)->b);
    return NULL;
}

Test(batcher, shutdown_answers_queued_requests_unavailable)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 64, 1000, 64, 1);
    static treq t[4];
    fake_close(&f);
    treq_search(&t[0], &f, "shop", 1, 1, NULL);
    submit_ok(b, &t[0]);
    cr_assert(fake_wait(&f, 1, 1, 0));
    for (int i = 1; i < 4; i++) {
        treq_search(&t[i], &f, "shop", 1, 1, NULL);
        submit_ok(b, &t[i]);
    }
    destroyer d = {b};
    pthread_t th;
    pthread_create(&th, NULL, destroy_thread, &d);
    /* The queued three are answered while the running batch is still held. */
    cr_assert(fake_wait(&f, 1, 1, 3));
    for (int i = 1; i < 4; i++)
        cr_assert_eq(t[i].req.status, AFF_EUNAVAILABLE);
    fake_open(&f);
    pthread_join(th, NULL);
    cr_assert(t[0].done);
    cr_assert_eq(t[0].req.status, AFF_OK);
    cr_assert_eq(f.calls, 1);
}

Test(batcher, wait_idle_returns_when_work_is_done)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 64, 1000, 64, 1);
    fake_close(&f);
    treq t;
    treq_search(&t, &f, "shop", 1, 1, NULL);
    submit_ok(b, &t);
    cr_assert(fake_wait(&f, 1, 1, 0));
    cr_assert_eq(batcher_wait_idle(b, 20), AFF_EDEADLINE);
    fake_open(&f);
    cr_assert_eq(batcher_wait_idle(b, 20000), 0);
    cr_assert(t.done);
    batcher_destroy(b);
}

Test(batcher, refuses_malformed_requests)
{
    fake f;
    fake_init(&f);
    batcher *b = make(&f, 64, 1000, 64, 1);
    treq t;
    treq_search(&t, &f, "shop", 1, 1, NULL);
    t.req.nq = 0;
    aff_err err;
    cr_assert_eq(batcher_submit(b, &t.req, &err), AFF_EINVAL);
    batcher_config bad = {.max_batch = 0, .queue_limit = 1};
    batcher_exec ex = {.search = fake_search, .rerank = fake_rerank, .ctx = &f};
    batcher *b2 = NULL;
    cr_assert_eq(batcher_create(&b2, &bad, &ex, &err), AFF_EINVAL);
    cr_assert_null(b2);
    batcher_destroy(b);
}

/*
 * affinity_load.c: the Affinity load generator, on gRPC core's async API.
 *
 *   affinity_load gen --rows N --dim D --queries Q --out DIR   writes a synthetic catalog
 *   affinity_load run --addr HOST:PORT --collection C [...]     drives load, reports latency
 *
 * `run` owns one completion queue per worker thread and several channels (one TCP connection
 * each); every call is one grpc_call_start_batch with all six ops, so a call costs one
 * completion. Requests are serialized once, up front, into pools drawn with Zipf-skewed
 * users and items; the hot loop only picks a pool entry and sends it, so the client spends
 * its CPU on gRPC, not on protobuf.
 *
 * Closed loop: C calls in flight for the duration. Open loop: Poisson arrivals at a target
 * rate; each call's latency is measured from its intended start, and arrivals that find all
 * slots busy wait in a backlog with their intended time (no coordinated omission), so
 * overload shows as latency. Only calls intended to start inside the measurement window
 * (after the warm-up) are counted. The process is bounded in time by an alarm and only
 * talks to the address it is given.
 */
#include <errno.h>
#include <getopt.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "affinity/v1/affinity.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "hdr.h"
#include "vecfile.h"
#include "rng.h"
#include "metrics.h"
#include "zipf.h"

/* ---- call kinds ------------------------------------------------------------------------ */

/* K_HEALTH (grpc.health.v1 Check) touches neither batcher nor engine: the transport alone.
 * K_PAGE: RecommendPage of the serving config's layout --layout for a stored shopper. */
enum { K_RECOMMEND, K_SIMILAR, K_RERANK, K_SEARCH, K_EVENTS, K_HEALTH, K_PAGE, K_COUNT };

static const char *const kind_names[K_COUNT] = {"recommend", "similar", "rerank", "search",
                                                "events",    "health",  "page"};
static const char *const kind_methods[K_COUNT] = {
    "/affinity.v1.Affinity/Recommend", "/affinity.v1.Affinity/SimilarItems",
    "/affinity.v1.Affinity/Rerank",    "/affinity.v1.Affinity/Search",
    "/affinity.v1.Affinity/PutEvents", "/grpc.health.v1.Health/Check",
    "/affinity.v1.Affinity/RecommendPage"};

#define N_CODES     18 /* gRPC codes 0..16, plus "UNSENT" (open-loop arrivals never sent) */
#define CODE_UNSENT 17
/* Names for the codes counted here: gRPC's own, plus UNSENT. */
static const char *code_name(int code)
{
    return code == CODE_UNSENT ? "UNSENT" : metrics_grpc_code_name(code);
}

/* ---- configuration ---------------------------------------------------------------------- */

typedef struct load_config {
    const char *addr;
    const char *tls_ca;
    const char *tls_server_name;
    const char *token_file;
    const char *collection;
    const char *queries_path;
    const char *item_prefix;
    const char *user_prefix;
    const char *json_out;
    const char *tsv_out;
    const char *label;
    bool open_loop;
    uint32_t concurrency;
    double rate;
    double duration_s;
    double warmup_s;
    uint32_t channels;
    uint32_t threads;
    uint32_t max_in_flight;
    uint32_t k;
    uint32_t dim;     /* 0: from DescribeCollection */
    uint64_t n_items; /* 0: from DescribeCollection */
    uint64_t n_users;
    double zipf_s;
    uint32_t pool;
    uint32_t rerank_candidates;
    uint32_t events_per_call;
    uint32_t timeout_ms;
    uint64_t seed;
    bool recommend_by_vector;
    const char *preset; /* Recommend's serving-config preset, or NULL */
    const char *layout; /* RecommendPage's serving-config layout (page calls) */
    double mix[K_COUNT];
} load_config;

/* ---- small utilities ------------------------------------------------------------------- */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* gRPC's monotonic clock and CLOCK_MONOTONIC share an epoch only up to an offset; deadlines
 * are therefore built from gpr_now() plus a relative time. */
static gpr_timespec deadline_in_ns(int64_t ns)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_nanos(ns, GPR_TIMESPAN));
}

static int read_file_string(const char *path, char **out)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || st.st_size > (1 << 24)) {
        fclose(f);
        return -1;
    }
    char *buf = malloc((size_t)st.st_size + 1);
    size_t n = buf ? fread(buf, 1, (size_t)st.st_size, f) : 0;
    fclose(f);
    if (!buf) return -1;
    buf[n] = '\0';
    *out = buf;
    return 0;
}

/* ---- the load context -------------------------------------------------------------------- */

typedef struct req_pool {
    grpc_slice *msgs;
    uint32_t n;
} req_pool;

typedef struct load_ctx {
    load_config cfg;
    grpc_channel **channels;
    grpc_slice methods[K_COUNT];
    grpc_metadata auth_md;
    bool has_auth;
    req_pool pools[K_COUNT];
    double mix_cdf[K_COUNT];
    int64_t t_start, t_window, t_end; /* CLOCK_MONOTONIC ns */
} load_ctx;

typedef struct call_slot {
    grpc_call *call;
    int kind;
    int64_t intended_ns;
    grpc_metadata_array md_in, md_trail;
    grpc_byte_buffer *send, *recv;
    grpc_status_code status;
    grpc_slice details;
} call_slot;

typedef struct worker {
    load_ctx *ctx;
    uint32_t id;
    pthread_t thread;
    grpc_completion_queue *cq;
    call_slot *slots;
    uint32_t n_slots;
    uint32_t *free_slots;
    uint32_t n_free;
    uint32_t next_channel, n_channels; /* this worker uses channels id, id+T, id+2T, ... */
    aff_rng rng;
    /* Open loop: Poisson arrivals waiting for a free slot, by intended start time. */
    double rate;
    int64_t next_arrival;
    int64_t *backlog;
    size_t backlog_cap, backlog_head, backlog_len;
    /* Results (calls intended to start inside the window). */
    hdr_hist *hist;
    hdr_hist *hist_kind[K_COUNT];
    uint64_t codes[N_CODES];
    uint64_t kind_calls[K_COUNT], kind_errors[K_COUNT];
    uint64_t issued, completed_in_window;
    char first_error[N_CODES][160];
} worker;

static int pick_kind(const load_ctx *ctx, aff_rng *r)
{
    double u = aff_rng_uniform(r);
    for (int k = 0; k < K_COUNT; k++)
        if (u < ctx->mix_cdf[k]) return k;
    return K_COUNT - 1;
}

static void slot_release(call_slot *s)
{
    grpc_metadata_array_destroy(&s->md_in);
    grpc_metadata_array_destroy(&s->md_trail);
    if (s->send) grpc_byte_buffer_destroy(s->send);
    if (s->recv) grpc_byte_buffer_destroy(s->recv);
    grpc_slice_unref(s->details);
    if (s->call) grpc_call_unref(s->call);
    s->send = s->recv = NULL;
    s->call = NULL;
    s->details = grpc_empty_slice();
}

/* Starts one call on a free slot; returns false (slot freed again) if gRPC refused it. */
static bool worker_issue(worker *w, int64_t intended)
{
    load_ctx *ctx = w->ctx;
    uint32_t si = w->free_slots[--w->n_free];
    call_slot *s = &w->slots[si];
    int kind = pick_kind(ctx, &w->rng);
    const req_pool *p = &ctx->pools[kind];
    grpc_slice msg = p->msgs[aff_rng_next(&w->rng) % p->n];
    grpc_channel *ch = ctx->channels[w->id + w->next_channel * ctx->cfg.threads];
    w->next_channel = (w->next_channel + 1) % w->n_channels;
    s->kind = kind;
    s->intended_ns = intended;
    s->call =
        grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, w->cq, ctx->methods[kind], NULL,
                                 deadline_in_ns((int64_t)ctx->cfg.timeout_ms * 1000000), NULL);
    s->send = grpc_raw_byte_buffer_create(&msg, 1);
    grpc_metadata_array_init(&s->md_in);
    grpc_metadata_array_init(&s->md_trail);
    s->recv = NULL;
    s->details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = ctx->has_auth ? 1 : 0;
    ops[0].data.send_initial_metadata.metadata = ctx->has_auth ? &ctx->auth_md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = s->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->md_in;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &s->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &s->md_trail;
    ops[5].data.recv_status_on_client.status = &s->status;
    ops[5].data.recv_status_on_client.status_details = &s->details;
    grpc_call_error e = grpc_call_start_batch(s->call, ops, 6, s, NULL);
    if (e != GRPC_CALL_OK) {
        fprintf(stderr, "affinity_load: grpc_call_start_batch failed (%d)\n", (int)e);
        slot_release(s);
        w->free_slots[w->n_free++] = si;
        return false;
    }
    w->issued++;
    return true;
}

static bool in_window(const load_ctx *ctx, int64_t intended)
{
    return intended >= ctx->t_window && intended < ctx->t_end;
}

static void worker_complete(worker *w, call_slot *s, bool ok)
{
    int64_t done = now_ns();
    if (in_window(w->ctx, s->intended_ns)) {
        int code = ok ? (int)s->status : GRPC_STATUS_UNKNOWN;
        if (code < 0 || code > 16) code = GRPC_STATUS_UNKNOWN;
        uint64_t lat = (uint64_t)(done - s->intended_ns);
        hdr_record(w->hist, lat);
        hdr_record(w->hist_kind[s->kind], lat);
        w->codes[code]++;
        w->kind_calls[s->kind]++;
        w->completed_in_window++;
        if (code != GRPC_STATUS_OK) {
            w->kind_errors[s->kind]++;
            if (!w->first_error[code][0]) {
                char *d = grpc_slice_to_c_string(s->details);
                snprintf(w->first_error[code], sizeof(w->first_error[code]), "%s: %s",
                         kind_names[s->kind], d);
                gpr_free(d);
            }
        }
    }
    slot_release(s);
    w->free_slots[w->n_free++] = (uint32_t)(s - w->slots);
}

static void backlog_push(worker *w, int64_t t)
{
    if (w->backlog_len == w->backlog_cap) {
        size_t cap = w->backlog_cap ? w->backlog_cap * 2 : 4096;
        int64_t *nb = malloc(cap * sizeof(int64_t));
        if (!nb) {
            /* Counted as unsent when the arrival cannot even be remembered. */
            if (in_window(w->ctx, t)) w->codes[CODE_UNSENT]++;
            return;
        }
        for (size_t i = 0; i < w->backlog_len; i++)
            nb[i] = w->backlog[(w->backlog_head + i) % w->backlog_cap];
        free(w->backlog);
        w->backlog = nb;
        w->backlog_cap = cap;
        w->backlog_head = 0;
    }
    w->backlog[(w->backlog_head + w->backlog_len) % w->backlog_cap] = t;
    w->backlog_len++;
}

static int64_t backlog_pop(worker *w)
{
    int64_t t = w->backlog[w->backlog_head];
    w->backlog_head = (w->backlog_head + 1) % w->backlog_cap;
    w->backlog_len--;
    return t;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    load_ctx *ctx = w->ctx;
    const int64_t timeout_ns = (int64_t)ctx->cfg.timeout_ms * 1000000;
    /* Open loop: arrivals intended before t_end are still sent after it, for up to one call
     * timeout; whatever is left then counts as unsent. Every call has a deadline, so all are
     * done by drain_limit. */
    const int64_t send_limit = ctx->t_end + timeout_ns;
    const int64_t drain_limit = send_limit + timeout_ns + 2000000000;
    for (;;) {
        int64_t now = now_ns();
        if (ctx->cfg.open_loop) {
            while (w->next_arrival <= now && w->next_arrival < ctx->t_end) {
                backlog_push(w, w->next_arrival);
                w->next_arrival += (int64_t)(-log(1.0 - aff_rng_uniform(&w->rng)) / w->rate * 1e9);
            }
            if (now < send_limit)
                while (w->backlog_len > 0 && w->n_free > 0)
                    if (!worker_issue(w, backlog_pop(w))) break;
        } else if (now < ctx->t_end) {
            while (w->n_free > 0)
                if (!worker_issue(w, now)) break;
        }
        bool sending_done =
            now >= ctx->t_end && (!ctx->cfg.open_loop || w->backlog_len == 0 || now >= send_limit);
        if (sending_done && w->n_free == w->n_slots) break;
        if (now > drain_limit) break;
        int64_t wake = now + 50000000;
        if (now < ctx->t_end) {
            if (ctx->cfg.open_loop && w->next_arrival < wake) wake = w->next_arrival;
            if (wake > ctx->t_end) wake = ctx->t_end;
        }
        int64_t wait = wake - now;
        if (wait < 0) wait = 0;
        grpc_event ev = grpc_completion_queue_next(w->cq, deadline_in_ns(wait), NULL);
        while (ev.type == GRPC_OP_COMPLETE) {
            worker_complete(w, ev.tag, ev.success != 0);
            /* Drain what is ready before going back to issue. */
            ev = grpc_completion_queue_next(w->cq, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
        }
    }
    /* Arrivals never sent still happened: count them, with the latency they had so far. */
    int64_t end = now_ns();
    while (w->backlog_len > 0) {
        int64_t t = backlog_pop(w);
        if (in_window(ctx, t)) {
            w->codes[CODE_UNSENT]++;
            hdr_record(w->hist, (uint64_t)(end - t));
        }
    }
    return NULL;
}

/* ---- blocking unary calls (setup and server stats only) ------------------------------------ */

/* Calls method with the packed request on ch and unpacks the reply with desc. On success
 * *out is the message (free with protobuf_c_message_free_unpacked). Returns the gRPC status;
 * detail gets the status message. */
static int unary_call(load_ctx *ctx, grpc_channel *ch, const char *method,
                      const ProtobufCMessage *req, const ProtobufCMessageDescriptor *desc,
                      ProtobufCMessage **out, char *detail, size_t detail_len)
{
    *out = NULL;
    detail[0] = '\0';
    size_t len = protobuf_c_message_get_packed_size(req);
    grpc_slice req_slice = grpc_slice_malloc(len);
    protobuf_c_message_pack(req, GRPC_SLICE_START_PTR(req_slice));
    grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&req_slice, 1);
    grpc_slice_unref(req_slice);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_slice m = grpc_slice_from_static_string(method);
    grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m, NULL,
                                               deadline_in_ns((int64_t)10 * 1000000000), NULL);
    grpc_metadata_array md_in, md_trail;
    grpc_metadata_array_init(&md_in);
    grpc_metadata_array_init(&md_trail);
    grpc_byte_buffer *recv = NULL;
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = ctx->has_auth ? 1 : 0;
    ops[0].data.send_initial_metadata.metadata = ctx->has_auth ? &ctx->auth_md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_in;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &md_trail;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    int tag = 1;
    if (grpc_call_start_batch(call, ops, 6, &tag, NULL) == GRPC_CALL_OK) {
        grpc_event ev =
            grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type != GRPC_OP_COMPLETE) status = GRPC_STATUS_UNKNOWN;
    }
    char *d = grpc_slice_to_c_string(details);
    snprintf(detail, detail_len, "%s", d);
    gpr_free(d);
    if (status == GRPC_STATUS_OK && recv) {
        grpc_byte_buffer_reader rd;
        if (grpc_byte_buffer_reader_init(&rd, recv)) {
            grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
            *out = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(all),
                                             GRPC_SLICE_START_PTR(all));
            grpc_slice_unref(all);
            grpc_byte_buffer_reader_destroy(&rd);
        }
        if (!*out) {
            status = GRPC_STATUS_INTERNAL;
            snprintf(detail, detail_len, "cannot parse the %s reply", method);
        }
    }
    if (recv) grpc_byte_buffer_destroy(recv);
    grpc_byte_buffer_destroy(send);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&md_in);
    grpc_metadata_array_destroy(&md_trail);
    grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
    return (int)status;
}

typedef struct batch_snapshot {
    bool valid;
    uint64_t batches, requests, max_seen, wait_us, rejected, expired;
    uint64_t hist[32];
    uint32_t max_batch, max_wait_us;
    char backend[64];
} batch_snapshot;

static void server_stats(load_ctx *ctx, batch_snapshot *snap)
{
    memset(snap, 0, sizeof(*snap));
    Affinity__V1__GetServerInfoRequest req = AFFINITY__V1__GET_SERVER_INFO_REQUEST__INIT;
    ProtobufCMessage *out = NULL;
    char detail[256];
    int st = unary_call(ctx, ctx->channels[0], "/affinity.v1.Affinity/GetServerInfo", &req.base,
                        &affinity__v1__server_info__descriptor, &out, detail, sizeof(detail));
    if (st != 0 || !out) return;
    Affinity__V1__ServerInfo *info = (Affinity__V1__ServerInfo *)out;
    snprintf(snap->backend, sizeof(snap->backend), "%s", info->backend);
    snap->max_batch = info->max_batch;
    snap->max_wait_us = info->max_wait_us;
    if (info->batch_stats) {
        const Affinity__V1__BatchStats *b = info->batch_stats;
        snap->valid = true;
        snap->batches = b->batches;
        snap->requests = b->requests;
        snap->max_seen = b->max_batch_seen;
        snap->wait_us = b->queue_wait_us_total;
        snap->rejected = b->rejected_queue_full;
        snap->expired = b->expired_deadline;
        for (size_t i = 0; i < b->n_size_histogram && i < 32; i++)
            snap->hist[i] = b->size_histogram[i];
    }
    protobuf_c_message_free_unpacked(out, NULL);
}

/* ---- request pools ------------------------------------------------------------------------ */

static grpc_slice pack_slice(const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(len);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    return s;
}

typedef struct pool_inputs {
    const float *queries; /* nq x dim */
    uint64_t nq;
    zipf items, users;
} pool_inputs;

static void id_of(char *buf, size_t len, const char *prefix, uint64_t i)
{
    snprintf(buf, len, "%s%llu", prefix, (unsigned long long)i);
}

static int build_pools(load_ctx *ctx, pool_inputs *in, aff_rng *r)
{
    const load_config *c = &ctx->cfg;
    char **ids = NULL;
    int rc = -1;
    uint32_t nc =
        c->rerank_candidates > c->events_per_call ? c->rerank_candidates : c->events_per_call;
    ids = calloc(nc + 1, sizeof(char *));
    if (!ids) goto out;
    for (uint32_t i = 0; i <= nc; i++)
        if (!(ids[i] = malloc(AFF_MAX_ID_LEN + 1))) goto out;
    char user[AFF_MAX_ID_LEN + 1];
    for (int kind = 0; kind < K_COUNT; kind++) {
        req_pool *p = &ctx->pools[kind];
        p->n = c->mix[kind] > 0 ? c->pool : 1;
        if (kind == K_SEARCH && c->mix[kind] > 0 && c->queries_path)
            p->n = in->nq < 65536 ? (uint32_t)in->nq : 65536;
        p->msgs = calloc(p->n, sizeof(grpc_slice));
        if (!p->msgs) goto out;
        for (uint32_t j = 0; j < p->n; j++) {
            const float *qv =
                in->queries + (size_t)((kind == K_SEARCH ? j : aff_rng_next(r)) % in->nq) * c->dim;
            id_of(user, sizeof(user), c->user_prefix, zipf_draw(&in->users, r));
            Affinity__V1__UserVector uv = AFFINITY__V1__USER_VECTOR__INIT;
            uv.n_values = c->dim;
            uv.values = (float *)qv;
            switch (kind) {
            case K_SEARCH: {
                Affinity__V1__Query q = AFFINITY__V1__QUERY__INIT;
                Affinity__V1__Query *qp = &q;
                q.n_vector = c->dim;
                q.vector = (float *)qv;
                Affinity__V1__SearchRequest m = AFFINITY__V1__SEARCH_REQUEST__INIT;
                m.collection = (char *)c->collection;
                m.n_queries = 1;
                m.queries = &qp;
                m.k = c->k;
                p->msgs[j] = pack_slice(&m.base);
                break;
            }
            case K_RECOMMEND: {
                Affinity__V1__RecommendRequest m = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
                m.collection = (char *)c->collection;
                m.k = c->k;
                if (c->preset) m.preset = (char *)c->preset;
                if (c->recommend_by_vector) {
                    m.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_VECTOR;
                    m.user_vector = &uv;
                } else {
                    m.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
                    m.user_id = user;
                }
                p->msgs[j] = pack_slice(&m.base);
                break;
            }
            case K_SIMILAR: {
                id_of(ids[0], AFF_MAX_ID_LEN + 1, c->item_prefix, zipf_draw(&in->items, r));
                Affinity__V1__SimilarItemsRequest m = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
                m.collection = (char *)c->collection;
                m.n_item_ids = 1;
                m.item_ids = ids;
                m.k = c->k;
                p->msgs[j] = pack_slice(&m.base);
                break;
            }
            case K_RERANK: {
                uint32_t n = c->rerank_candidates;
                Affinity__V1__RerankCandidate *cands = calloc(n, sizeof(*cands));
                Affinity__V1__RerankCandidate **cp = calloc(n, sizeof(*cp));
                if (!cands || !cp) {
                    free(cands);
                    free(cp);
                    goto out;
                }
                for (uint32_t i = 0; i < n; i++) {
                    Affinity__V1__RerankCandidate init = AFFINITY__V1__RERANK_CANDIDATE__INIT;
                    cands[i] = init;
                    id_of(ids[i], AFF_MAX_ID_LEN + 1, c->item_prefix, zipf_draw(&in->items, r));
                    cands[i].id = ids[i];
                    cands[i].base_score = 1.0f - (float)i / (float)n;
                    cp[i] = &cands[i];
                }
                Affinity__V1__RerankRequest m = AFFINITY__V1__RERANK_REQUEST__INIT;
                m.collection = (char *)c->collection;
                if (c->recommend_by_vector) {
                    m.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_VECTOR;
                    m.user_vector = &uv;
                } else {
                    m.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_ID;
                    m.user_id = user;
                }
                m.n_candidates = n;
                m.candidates = cp;
                p->msgs[j] = pack_slice(&m.base);
                free(cands);
                free(cp);
                break;
            }
            case K_PAGE: {
                Affinity__V1__RecommendPageRequest m = AFFINITY__V1__RECOMMEND_PAGE_REQUEST__INIT;
                m.user_id = user;
                m.layout = (char *)c->layout;
                p->msgs[j] = pack_slice(&m.base);
                break;
            }
            case K_HEALTH: {
                Grpc__Health__V1__HealthCheckRequest m =
                    GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
                p->msgs[j] = pack_slice(&m.base);
                break;
            }
            case K_EVENTS: {
                uint32_t n = c->events_per_call;
                Affinity__V1__Event *evs = calloc(n, sizeof(*evs));
                Affinity__V1__Event **ep = calloc(n, sizeof(*ep));
                if (!evs || !ep) {
                    free(evs);
                    free(ep);
                    goto out;
                }
                for (uint32_t i = 0; i < n; i++) {
                    Affinity__V1__Event init = AFFINITY__V1__EVENT__INIT;
                    evs[i] = init;
                    id_of(ids[i], AFF_MAX_ID_LEN + 1, c->item_prefix, zipf_draw(&in->items, r));
                    evs[i].item_id = ids[i];
                    double u = aff_rng_uniform(r);
                    evs[i].type = u < 0.70   ? AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW
                                  : u < 0.90 ? AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CLICK
                                  : u < 0.97 ? AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_ADD_TO_CART
                                             : AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE;
                    ep[i] = &evs[i];
                }
                Affinity__V1__PutEventsRequest m = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
                m.collection = (char *)c->collection;
                m.user_id = user;
                m.n_events = n;
                m.events = ep;
                p->msgs[j] = pack_slice(&m.base);
                free(evs);
                free(ep);
                break;
            }
            }
        }
    }
    rc = 0;
out:
    if (ids)
        for (uint32_t i = 0; i <= nc; i++)
            free(ids[i]);
    free(ids);
    return rc;
}

/* ---- output -------------------------------------------------------------------------------- */

typedef struct load_result {
    hdr_hist *hist;
    hdr_hist *hist_kind[K_COUNT];
    uint64_t codes[N_CODES];
    uint64_t kind_calls[K_COUNT], kind_errors[K_COUNT];
    uint64_t calls, ok;
    char first_error[N_CODES][160];
    batch_snapshot before, after;
    double window_s;
    double client_cpu_s, client_wall_s; /* this process, from the first call to the last */
    double start_unix_s, end_unix_s;    /* the same span on the wall clock (merging runs) */
} load_result;

static double unix_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double ms(uint64_t ns)
{
    return (double)ns / 1e6;
}

static void json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static void json_latency(FILE *f, const hdr_hist *h)
{
    fprintf(f,
            "{\"count\": %llu, \"mean_ms\": %.4f, \"p50_ms\": %.4f, \"p90_ms\": %.4f, "
            "\"p99_ms\": %.4f, \"p999_ms\": %.4f, \"max_ms\": %.4f}",
            (unsigned long long)h->total, hdr_mean(h) / 1e6, ms(hdr_value_at(h, 0.5)),
            ms(hdr_value_at(h, 0.9)), ms(hdr_value_at(h, 0.99)), ms(hdr_value_at(h, 0.999)),
            ms(h->total ? h->max : 0));
}

static void batch_delta(const load_result *res, uint64_t *batches, uint64_t *requests,
                        uint64_t hist[32])
{
    *batches = res->after.batches - res->before.batches;
    *requests = res->after.requests - res->before.requests;
    for (int i = 0; i < 32; i++)
        hist[i] = res->after.hist[i] - res->before.hist[i];
}

static int write_json(const load_ctx *ctx, const load_result *res, const char *path)
{
    const load_config *c = &ctx->cfg;
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "affinity_load: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    fprintf(f, "{\n  \"label\": ");
    json_string(f, c->label ? c->label : "");
    fprintf(f, ",\n  \"addr\": ");
    json_string(f, c->addr);
    fprintf(f, ",\n  \"collection\": ");
    json_string(f, c->collection);
    fprintf(f,
            ",\n  \"mode\": \"%s\",\n  \"concurrency\": %u,\n  \"target_rate\": %.1f,\n"
            "  \"duration_s\": %.3f,\n  \"warmup_s\": %.3f,\n  \"channels\": %u,\n"
            "  \"threads\": %u,\n  \"k\": %u,\n  \"dim\": %u,\n  \"items\": %llu,\n"
            "  \"users\": %llu,\n  \"zipf_s\": %.3f,\n  \"tls\": %s,\n  \"mix\": {",
            c->open_loop ? "open" : "closed", c->open_loop ? c->max_in_flight : c->concurrency,
            c->open_loop ? c->rate : 0.0, res->window_s, c->warmup_s, c->channels, c->threads, c->k,
            c->dim, (unsigned long long)c->n_items, (unsigned long long)c->n_users, c->zipf_s,
            c->tls_ca ? "true" : "false");
    for (int k = 0; k < K_COUNT; k++)
        fprintf(f, "%s\"%s\": %.3f", k ? ", " : "", kind_names[k], c->mix[k]);
    fprintf(f,
            "},\n  \"calls\": %llu,\n  \"ok\": %llu,\n  \"achieved_rps\": %.2f,\n"
            "  \"ok_rps\": %.2f,\n  \"client_cpu_cores\": %.3f,\n"
            "  \"start_unix_s\": %.3f,\n  \"end_unix_s\": %.3f,\n  \"latency\": ",
            (unsigned long long)res->calls, (unsigned long long)res->ok,
            (double)res->calls / res->window_s, (double)res->ok / res->window_s,
            res->client_wall_s > 0 ? res->client_cpu_s / res->client_wall_s : 0.0,
            res->start_unix_s, res->end_unix_s);
    json_latency(f, res->hist);
    fprintf(f, ",\n  \"by_kind\": {");
    bool first = true;
    for (int k = 0; k < K_COUNT; k++) {
        if (res->kind_calls[k] == 0) continue;
        fprintf(f, "%s\n    \"%s\": {\"calls\": %llu, \"errors\": %llu, \"latency\": ",
                first ? "" : ",", kind_names[k], (unsigned long long)res->kind_calls[k],
                (unsigned long long)res->kind_errors[k]);
        json_latency(f, res->hist_kind[k]);
        fputc('}', f);
        first = false;
    }
    fprintf(f, "\n  },\n  \"errors\": {");
    first = true;
    for (int i = 1; i < N_CODES; i++) {
        if (!res->codes[i]) continue;
        fprintf(f, "%s\"%s\": %llu", first ? "" : ", ", code_name(i),
                (unsigned long long)res->codes[i]);
        first = false;
    }
    fprintf(f, "},\n  \"error_examples\": {");
    first = true;
    for (int i = 1; i < N_CODES; i++) {
        if (!res->first_error[i][0]) continue;
        fprintf(f, "%s\"%s\": ", first ? "" : ", ", code_name(i));
        json_string(f, res->first_error[i]);
        first = false;
    }
    fprintf(f, "},\n  \"server\": ");
    if (res->before.valid && res->after.valid) {
        uint64_t batches, requests, hist[32];
        batch_delta(res, &batches, &requests, hist);
        fprintf(f,
                "{\"backend\": \"%s\", \"max_batch\": %u, \"max_wait_us\": %u, "
                "\"batches\": %llu, \"requests\": %llu, \"mean_batch\": %.3f, "
                "\"max_batch_seen\": %llu, \"mean_queue_wait_us\": %.1f, "
                "\"rejected_queue_full\": %llu, \"expired_deadline\": %llu, "
                "\"batch_size_histogram_log2\": [",
                res->after.backend, res->after.max_batch, res->after.max_wait_us,
                (unsigned long long)batches, (unsigned long long)requests,
                batches ? (double)requests / (double)batches : 0.0,
                (unsigned long long)res->after.max_seen,
                requests ? (double)(res->after.wait_us - res->before.wait_us) / (double)requests
                         : 0.0,
                (unsigned long long)(res->after.rejected - res->before.rejected),
                (unsigned long long)(res->after.expired - res->before.expired));
        int last = 0;
        for (int i = 0; i < 32; i++)
            if (hist[i]) last = i;
        for (int i = 0; i <= last; i++)
            fprintf(f, "%s%llu", i ? ", " : "", (unsigned long long)hist[i]);
        fprintf(f, "]}");
    } else {
        fprintf(f, "null");
    }
    fprintf(f, "\n}\n");
    return fclose(f) == 0 ? 0 : -1;
}

static void print_summary(const load_ctx *ctx, const load_result *res)
{
    const load_config *c = &ctx->cfg;
    const hdr_hist *h = res->hist;
    printf("affinity_load %s: %s loop, ", c->label ? c->label : "",
           c->open_loop ? "open" : "closed");
    if (c->open_loop)
        printf("target %.0f calls/s (max %u in flight)", c->rate, c->max_in_flight);
    else
        printf("%u in flight", c->concurrency);
    printf(", %u channels, %u threads, %.1f s after %.1f s warm-up\n", c->channels, c->threads,
           res->window_s, c->warmup_s);
    printf("  calls      %llu (%llu ok), %.1f calls/s achieved, %.1f ok/s\n",
           (unsigned long long)res->calls, (unsigned long long)res->ok,
           (double)res->calls / res->window_s, (double)res->ok / res->window_s);
    printf("  client     %.2f cores of CPU (user + system, this load generator)\n",
           res->client_wall_s > 0 ? res->client_cpu_s / res->client_wall_s : 0.0);
    printf("  latency ms p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f  mean %.3f\n",
           ms(hdr_value_at(h, 0.5)), ms(hdr_value_at(h, 0.9)), ms(hdr_value_at(h, 0.99)),
           ms(hdr_value_at(h, 0.999)), ms(h->total ? h->max : 0), hdr_mean(h) / 1e6);
    for (int k = 0; k < K_COUNT; k++)
        if (res->kind_calls[k])
            printf("  %-10s %llu calls, %llu errors, p50 %.3f ms, p99 %.3f ms\n", kind_names[k],
                   (unsigned long long)res->kind_calls[k], (unsigned long long)res->kind_errors[k],
                   ms(hdr_value_at(res->hist_kind[k], 0.5)),
                   ms(hdr_value_at(res->hist_kind[k], 0.99)));
    for (int i = 1; i < N_CODES; i++)
        if (res->codes[i])
            printf("  error      %s x %llu (%s)\n", code_name(i), (unsigned long long)res->codes[i],
                   res->first_error[i]);
    if (res->before.valid && res->after.valid) {
        uint64_t batches, requests, hist[32];
        batch_delta(res, &batches, &requests, hist);
        printf("  server     %s, max_batch %u: %llu batches, mean size %.2f, sizes (log2 "
               "buckets):",
               res->after.backend, res->after.max_batch, (unsigned long long)batches,
               batches ? (double)requests / (double)batches : 0.0);
        for (int i = 0; i < 32; i++)
            if (hist[i]) printf(" [%u,%u):%llu", 1u << i, 2u << i, (unsigned long long)hist[i]);
        printf("\n");
    } else {
        printf("  server     batch statistics unavailable (GetServerInfo failed)\n");
    }
    fflush(stdout);
}

static int append_tsv(const load_ctx *ctx, const load_result *res, const char *path)
{
    const load_config *c = &ctx->cfg;
    struct stat st;
    bool fresh = stat(path, &st) != 0 || st.st_size == 0;
    FILE *f = fopen(path, "a");
    if (!f) return -1;
    if (fresh)
        fprintf(f, "# label\tmode\tconcurrency\ttarget_rps\tachieved_rps\tok_rps\tp50_ms\tp90_ms"
                   "\tp99_ms\tp999_ms\tmax_ms\terrors\tmean_batch\n");
    uint64_t batches = 0, requests = 0, hist[32];
    if (res->before.valid && res->after.valid) batch_delta(res, &batches, &requests, hist);
    const hdr_hist *h = res->hist;
    fprintf(f, "%s\t%s\t%u\t%.1f\t%.1f\t%.1f\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%llu\t%.3f\n",
            c->label ? c->label : "-", c->open_loop ? "open" : "closed",
            c->open_loop ? c->max_in_flight : c->concurrency, c->open_loop ? c->rate : 0.0,
            (double)res->calls / res->window_s, (double)res->ok / res->window_s,
            ms(hdr_value_at(h, 0.5)), ms(hdr_value_at(h, 0.9)), ms(hdr_value_at(h, 0.99)),
            ms(hdr_value_at(h, 0.999)), ms(h->total ? h->max : 0),
            (unsigned long long)(res->calls - res->ok),
            batches ? (double)requests / (double)batches : 0.0);
    return fclose(f) == 0 ? 0 : -1;
}

/* ---- run ---------------------------------------------------------------------------------- */

static int parse_mix(const char *s, double mix[K_COUNT])
{
    for (int k = 0; k < K_COUNT; k++)
        mix[k] = 0;
    char *copy = strdup(s);
    if (!copy) return -1;
    int rc = 0;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq) {
            rc = -1;
            break;
        }
        *eq = '\0';
        int k = -1;
        for (int i = 0; i < K_COUNT; i++)
            if (strcmp(tok, kind_names[i]) == 0) k = i;
        char *end;
        double v = strtod(eq + 1, &end);
        if (k < 0 || *end || v < 0) {
            rc = -1;
            break;
        }
        mix[k] = v;
    }
    free(copy);
    double total = 0;
    for (int k = 0; k < K_COUNT; k++)
        total += mix[k];
    return rc == 0 && total > 0 ? 0 : -1;
}

static void usage_run(FILE *f)
{
    fprintf(f,
            "usage: affinity_load run --addr HOST:PORT --collection NAME [options]\n"
            "  --mode closed|open       closed: --concurrency calls in flight; open: Poisson\n"
            "                           arrivals at --rate calls/s (default closed)\n"
            "  --concurrency C          calls in flight, closed loop (default 16)\n"
            "  --rate R                 target calls/s, open loop\n"
            "  --max-in-flight M        open loop cap on calls in flight (default 2048)\n"
            "  --duration S             measured seconds (default 10)\n"
            "  --warmup S               seconds before measuring (default 2)\n"
            "  --channels N             connections (default 4)\n"
            "  --threads T              completion-queue threads (default 1)\n"
            "  --mix LIST               weights, e.g. recommend=40,similar=20,rerank=10,\n"
            "                           search=20,events=10 (the default); health=1 calls\n"
            "                           grpc.health.v1 Check (transport only, no engine);\n"
            "                           page=1 calls RecommendPage (needs --layout)\n"
            "  --k K                    results per query (default 10)\n"
            "  --queries FILE           query vectors (.npy/.fvecs); default random unit vectors\n"
            "  --dim D, --items N       catalog shape (default: DescribeCollection)\n"
            "  --item-prefix P          item ids are P0..P(N-1) (default item-)\n"
            "  --users U                distinct users (default 100000), ids user-0..\n"
            "  --user-prefix P          (default user-)\n"
            "  --zipf S                 popularity skew exponent (default 1.0)\n"
            "  --preset NAME            Recommend with this serving-config preset (rules)\n"
            "  --layout NAME            the serving-config layout page calls ask for\n"
            "  --recommend-by user|vector  Recommend and Rerank by user id (stored profile) or\n"
            "                           by a user vector from the query set (default user)\n"
            "  --rerank-candidates N    (default 100); --events-per-call N (default 1)\n"
            "  --pool N                 pre-built requests per kind (default 4096)\n"
            "  --timeout-ms MS          per-call deadline (default 1000)\n"
            "  --tls-ca FILE            TLS with this root certificate (PEM)\n"
            "  --tls-server-name NAME   expected certificate name (default: from --addr)\n"
            "  --token-file FILE        bearer token sent as `authorization: Bearer ...`\n"
            "  --json FILE              write the result as JSON\n"
            "  --tsv FILE               append one summary line (for sweeps)\n"
            "  --label TEXT             name of this run in outputs\n"
            "  --seed N                 (default 42)\n");
}

static int run_main(int argc, char **argv)
{
    load_ctx ctx;
    memset(&ctx, 0, sizeof(ctx));
    load_config *c = &ctx.cfg;
    c->addr = NULL;
    c->collection = NULL;
    c->item_prefix = "item-";
    c->user_prefix = "user-";
    c->concurrency = 16;
    c->max_in_flight = 2048;
    c->duration_s = 10;
    c->warmup_s = 2;
    c->channels = 4;
    c->threads = 1;
    c->k = 10;
    c->n_users = 100000;
    c->zipf_s = 1.0;
    c->pool = 4096;
    c->rerank_candidates = 100;
    c->events_per_call = 1;
    c->timeout_ms = 1000;
    c->seed = 42;
    parse_mix("recommend=40,similar=20,rerank=10,search=20,events=10", c->mix);

    static const struct option opts[] = {{"addr", 1, 0, 'a'},
                                         {"collection", 1, 0, 'c'},
                                         {"mode", 1, 0, 'm'},
                                         {"concurrency", 1, 0, 'C'},
                                         {"rate", 1, 0, 'r'},
                                         {"max-in-flight", 1, 0, 'M'},
                                         {"duration", 1, 0, 'd'},
                                         {"warmup", 1, 0, 'w'},
                                         {"channels", 1, 0, 'n'},
                                         {"threads", 1, 0, 't'},
                                         {"mix", 1, 0, 'x'},
                                         {"k", 1, 0, 'k'},
                                         {"queries", 1, 0, 'q'},
                                         {"dim", 1, 0, 'D'},
                                         {"items", 1, 0, 'I'},
                                         {"item-prefix", 1, 0, 'P'},
                                         {"users", 1, 0, 'U'},
                                         {"user-prefix", 1, 0, 'Q'},
                                         {"zipf", 1, 0, 'z'},
                                         {"recommend-by", 1, 0, 'R'},
                                         {"preset", 1, 0, 'N'},
                                         {"layout", 1, 0, 'L'},
                                         {"rerank-candidates", 1, 0, 'K'},
                                         {"events-per-call", 1, 0, 'E'},
                                         {"pool", 1, 0, 'p'},
                                         {"timeout-ms", 1, 0, 'T'},
                                         {"tls-ca", 1, 0, 'A'},
                                         {"tls-server-name", 1, 0, 'S'},
                                         {"token-file", 1, 0, 'F'},
                                         {"json", 1, 0, 'j'},
                                         {"tsv", 1, 0, 'v'},
                                         {"label", 1, 0, 'l'},
                                         {"seed", 1, 0, 's'},
                                         {"help", 0, 0, 'h'},
                                         {0, 0, 0, 0}};
    int opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'a':
            c->addr = optarg;
            break;
        case 'c':
            c->collection = optarg;
            break;
        case 'm':
            if (strcmp(optarg, "open") == 0)
                c->open_loop = true;
            else if (strcmp(optarg, "closed") == 0)
                c->open_loop = false;
            else {
                fprintf(stderr, "affinity_load: --mode must be closed or open\n");
                return 2;
            }
            break;
        case 'C':
            c->concurrency = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'r':
            c->rate = strtod(optarg, NULL);
            break;
        case 'M':
            c->max_in_flight = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'd':
            c->duration_s = strtod(optarg, NULL);
            break;
        case 'w':
            c->warmup_s = strtod(optarg, NULL);
            break;
        case 'n':
            c->channels = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 't':
            c->threads = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'x':
            if (parse_mix(optarg, c->mix) != 0) {
                fprintf(stderr,
                        "affinity_load: bad --mix '%s'; kinds: recommend, similar, "
                        "rerank, search, events, health with weights >= 0, e.g. search=1\n",
                        optarg);
                return 2;
            }
            break;
        case 'k':
            c->k = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'q':
            c->queries_path = optarg;
            break;
        case 'D':
            c->dim = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'I':
            c->n_items = strtoull(optarg, NULL, 10);
            break;
        case 'P':
            c->item_prefix = optarg;
            break;
        case 'U':
            c->n_users = strtoull(optarg, NULL, 10);
            break;
        case 'Q':
            c->user_prefix = optarg;
            break;
        case 'z':
            c->zipf_s = strtod(optarg, NULL);
            break;
        case 'R':
            c->recommend_by_vector = strcmp(optarg, "vector") == 0;
            break;
        case 'N':
            c->preset = optarg;
            break;
        case 'L':
            c->layout = optarg;
            break;
        case 'K':
            c->rerank_candidates = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'E':
            c->events_per_call = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'p':
            c->pool = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'T':
            c->timeout_ms = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'A':
            c->tls_ca = optarg;
            break;
        case 'S':
            c->tls_server_name = optarg;
            break;
        case 'F':
            c->token_file = optarg;
            break;
        case 'j':
            c->json_out = optarg;
            break;
        case 'v':
            c->tsv_out = optarg;
            break;
        case 'l':
            c->label = optarg;
            break;
        case 's':
            c->seed = strtoull(optarg, NULL, 10);
            break;
        case 'h':
            usage_run(stdout);
            return 0;
        default:
            usage_run(stderr);
            return 2;
        }
    }
    if (!c->addr || !c->collection) {
        fprintf(stderr, "affinity_load: --addr and --collection are required\n");
        usage_run(stderr);
        return 2;
    }
    if (c->channels < 1 || c->threads < 1 || c->threads > 64 || c->duration_s <= 0 ||
        c->duration_s > 3600 || c->warmup_s < 0 || c->warmup_s > 600 || c->k < 1 ||
        c->k > AFF_MAX_K || c->pool < 1 || c->timeout_ms < 1 || c->n_users < 1 ||
        c->rerank_candidates < 1 || c->rerank_candidates > AFF_MAX_RERANK_CANDIDATES ||
        c->events_per_call < 1 || c->events_per_call > 1000 ||
        (c->open_loop && (c->rate <= 0 || c->max_in_flight < 1)) ||
        (!c->open_loop && c->concurrency < 1)) {
        fprintf(stderr, "affinity_load: an option is out of range (see --help)\n");
        return 2;
    }
    if (c->mix[K_PAGE] > 0 && !c->layout) {
        fprintf(stderr, "affinity_load: --mix page=... needs --layout NAME (a serving-config "
                        "layout)\n");
        return 2;
    }
    if (c->channels < c->threads) c->channels = c->threads;

    int rc = 1;
    float *queries = NULL;
    char *ca_pem = NULL, *token = NULL, *auth_value = NULL;
    worker *workers = NULL;
    pool_inputs in;
    memset(&in, 0, sizeof(in));
    load_result res;
    memset(&res, 0, sizeof(res));
    grpc_channel_credentials *creds = NULL;

    /* A hard bound on the process's lifetime, whatever the server does. */
    alarm((unsigned)(c->warmup_s + c->duration_s + 2 * (c->timeout_ms / 1000.0) + 60));

    grpc_init();
    if (c->token_file) {
        if (read_file_string(c->token_file, &token) != 0) {
            fprintf(stderr, "affinity_load: cannot read --token-file %s\n", c->token_file);
            goto out;
        }
        size_t n = strlen(token);
        while (n && (token[n - 1] == '\n' || token[n - 1] == '\r' || token[n - 1] == ' '))
            token[--n] = '\0';
        auth_value = malloc(n + 8);
        if (!auth_value) goto out;
        snprintf(auth_value, n + 8, "Bearer %s", token);
        ctx.auth_md.key = grpc_slice_from_static_string("authorization");
        ctx.auth_md.value = grpc_slice_from_copied_string(auth_value);
        ctx.has_auth = true;
    }
    if (c->tls_ca) {
        if (read_file_string(c->tls_ca, &ca_pem) != 0) {
            fprintf(stderr, "affinity_load: cannot read --tls-ca %s\n", c->tls_ca);
            goto out;
        }
        creds = grpc_ssl_credentials_create(ca_pem, NULL, NULL, NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    ctx.channels = calloc(c->channels, sizeof(grpc_channel *));
    if (!ctx.channels) goto out;
    for (uint32_t i = 0; i < c->channels; i++) {
        grpc_arg args[5];
        int na = 0;
        args[na].type = GRPC_ARG_INTEGER;
        args[na].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
        args[na++].value.integer = -1;
        args[na].type = GRPC_ARG_INTEGER;
        args[na].key = (char *)GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL;
        args[na++].value.integer = 1;
        /* A distinct argument per channel keeps each on its own connection. */
        args[na].type = GRPC_ARG_INTEGER;
        args[na].key = (char *)"affinity.load.channel_index";
        args[na++].value.integer = (int)i;
        args[na].type = GRPC_ARG_INTEGER;
        args[na].key = (char *)GRPC_ARG_ENABLE_RETRIES;
        args[na++].value.integer = 0;
        if (c->tls_server_name) {
            args[na].type = GRPC_ARG_STRING;
            args[na].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
            args[na++].value.string = (char *)c->tls_server_name;
        }
        grpc_channel_args ca = {(size_t)na, args};
        ctx.channels[i] = grpc_channel_create(c->addr, creds, &ca);
    }
    for (int k = 0; k < K_COUNT; k++)
        ctx.methods[k] = grpc_slice_from_static_string(kind_methods[k]);

    /* The collection's shape, which also proves the address, TLS and token work. */
    if (c->dim == 0 || c->n_items == 0) {
        Affinity__V1__DescribeCollectionRequest req =
            AFFINITY__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
        req.name = (char *)c->collection;
        ProtobufCMessage *out = NULL;
        char detail[256];
        int st =
            unary_call(&ctx, ctx.channels[0], "/affinity.v1.Affinity/DescribeCollection", &req.base,
                       &affinity__v1__collection_info__descriptor, &out, detail, sizeof(detail));
        if (st != 0) {
            fprintf(stderr, "affinity_load: DescribeCollection(%s) at %s failed: %s (%s)\n",
                    c->collection, c->addr, code_name(st), detail);
            goto out;
        }
        Affinity__V1__CollectionInfo *ci = (Affinity__V1__CollectionInfo *)out;
        if (c->dim == 0) c->dim = ci->dimension;
        if (c->n_items == 0) c->n_items = ci->item_count;
        protobuf_c_message_free_unpacked(out, NULL);
    }
    if (c->dim < 1 || c->n_items < 1) {
        fprintf(stderr, "affinity_load: collection %s has dim %u and %llu items; need both > 0\n",
                c->collection, c->dim, (unsigned long long)c->n_items);
        goto out;
    }

    aff_rng r0 = {c->seed};
    if (c->queries_path) {
        aff_err err = {0};
        uint64_t nq;
        uint32_t qd;
        if (vecfile_load(c->queries_path, &queries, &nq, &qd, &err) != 0) {
            fprintf(stderr, "affinity_load: %s\n", err.msg);
            goto out;
        }
        if (qd != c->dim || nq == 0) {
            fprintf(stderr,
                    "affinity_load: %s has %llu vectors of dimension %u; the collection "
                    "has dimension %u\n",
                    c->queries_path, (unsigned long long)nq, qd, c->dim);
            goto out;
        }
        in.nq = nq;
    } else {
        in.nq = c->pool;
        queries = malloc(in.nq * c->dim * sizeof(float));
        if (!queries) goto out;
        for (uint64_t i = 0; i < in.nq; i++) {
            double norm = 0;
            float *v = queries + i * c->dim;
            for (uint32_t j = 0; j < c->dim; j++) {
                v[j] = (float)aff_rng_normal(&r0);
                norm += (double)v[j] * v[j];
            }
            for (uint32_t j = 0; j < c->dim; j++)
                v[j] = (float)(v[j] / sqrt(norm));
        }
    }
    in.queries = queries;
    if (zipf_init(&in.items, c->n_items, c->zipf_s, c->seed) != 0 ||
        zipf_init(&in.users, c->n_users, c->zipf_s, c->seed * 31 + 7) != 0) {
        fprintf(stderr, "affinity_load: out of memory\n");
        goto out;
    }
    if (build_pools(&ctx, &in, &r0) != 0) {
        fprintf(stderr, "affinity_load: out of memory building request pools\n");
        goto out;
    }
    double total = 0;
    for (int k = 0; k < K_COUNT; k++)
        total += c->mix[k];
    double acc = 0;
    for (int k = 0; k < K_COUNT; k++) {
        acc += c->mix[k] / total;
        ctx.mix_cdf[k] = acc;
    }

    workers = calloc(c->threads, sizeof(worker));
    if (!workers) goto out;
    uint32_t slots_total = c->open_loop ? c->max_in_flight : c->concurrency;
    for (uint32_t i = 0; i < c->threads; i++) {
        worker *w = &workers[i];
        w->ctx = &ctx;
        w->id = i;
        w->rng.s = c->seed * 1000003 + i + 1;
        w->n_slots = slots_total / c->threads + (i < slots_total % c->threads ? 1 : 0);
        if (w->n_slots == 0) w->n_slots = 1;
        w->slots = calloc(w->n_slots, sizeof(call_slot));
        w->free_slots = calloc(w->n_slots, sizeof(uint32_t));
        w->hist = malloc(sizeof(hdr_hist));
        bool ok = w->slots && w->free_slots && w->hist;
        for (int k = 0; k < K_COUNT; k++)
            ok = ok && (w->hist_kind[k] = malloc(sizeof(hdr_hist)));
        if (!ok) {
            fprintf(stderr, "affinity_load: out of memory\n");
            goto out;
        }
        hdr_init(w->hist);
        for (int k = 0; k < K_COUNT; k++)
            hdr_init(w->hist_kind[k]);
        for (uint32_t j = 0; j < w->n_slots; j++) {
            w->free_slots[j] = j;
            w->slots[j].details = grpc_empty_slice();
        }
        w->n_free = w->n_slots;
        w->rate = c->rate / c->threads;
        w->n_channels = (c->channels - i + c->threads - 1) / c->threads;
        w->cq = grpc_completion_queue_create_for_next(NULL);
    }

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    ctx.t_start = now_ns();
    res.start_unix_s = unix_s();
    ctx.t_window = ctx.t_start + (int64_t)(c->warmup_s * 1e9);
    ctx.t_end = ctx.t_window + (int64_t)(c->duration_s * 1e9);
    for (uint32_t i = 0; i < c->threads; i++) {
        workers[i].next_arrival = ctx.t_start;
        if (pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]) != 0) {
            fprintf(stderr, "affinity_load: cannot start a thread\n");
            c->threads = i;
            break;
        }
    }
    /* Server-side batch statistics over the window. */
    int64_t t = now_ns();
    if (ctx.t_window > t) {
        struct timespec ts = {(ctx.t_window - t) / 1000000000, (ctx.t_window - t) % 1000000000};
        nanosleep(&ts, NULL);
    }
    server_stats(&ctx, &res.before);
    t = now_ns();
    if (ctx.t_end > t) {
        struct timespec ts = {(ctx.t_end - t) / 1000000000, (ctx.t_end - t) % 1000000000};
        nanosleep(&ts, NULL);
    }
    server_stats(&ctx, &res.after);
    for (uint32_t i = 0; i < c->threads; i++)
        pthread_join(workers[i].thread, NULL);
    getrusage(RUSAGE_SELF, &ru1);
    res.client_wall_s = (double)(now_ns() - ctx.t_start) / 1e9;
    res.end_unix_s = unix_s();
    res.client_cpu_s = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                       (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                       (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                       (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;

    res.hist = malloc(sizeof(hdr_hist));
    bool ok = res.hist != NULL;
    for (int k = 0; k < K_COUNT; k++)
        ok = ok && (res.hist_kind[k] = malloc(sizeof(hdr_hist)));
    if (!ok) goto out;
    hdr_init(res.hist);
    for (int k = 0; k < K_COUNT; k++)
        hdr_init(res.hist_kind[k]);
    for (uint32_t i = 0; i < c->threads; i++) {
        worker *w = &workers[i];
        hdr_merge(res.hist, w->hist);
        for (int k = 0; k < K_COUNT; k++) {
            hdr_merge(res.hist_kind[k], w->hist_kind[k]);
            res.kind_calls[k] += w->kind_calls[k];
            res.kind_errors[k] += w->kind_errors[k];
        }
        for (int j = 0; j < N_CODES; j++) {
            res.codes[j] += w->codes[j];
            if (!res.first_error[j][0] && w->first_error[j][0])
                memcpy(res.first_error[j], w->first_error[j], sizeof(res.first_error[j]));
        }
    }
    if (res.codes[CODE_UNSENT])
        snprintf(res.first_error[CODE_UNSENT], sizeof(res.first_error[CODE_UNSENT]),
                 "open-loop arrivals still waiting for a free slot when the run ended");
    for (int j = 0; j < N_CODES; j++)
        res.calls += res.codes[j];
    res.ok = res.codes[0];
    res.window_s = c->duration_s;
    print_summary(&ctx, &res);
    rc = 0;
    if (c->json_out && write_json(&ctx, &res, c->json_out) != 0) rc = 1;
    if (c->tsv_out && append_tsv(&ctx, &res, c->tsv_out) != 0) {
        fprintf(stderr, "affinity_load: cannot append to %s\n", c->tsv_out);
        rc = 1;
    }
    if (res.calls == 0) {
        fprintf(stderr, "affinity_load: no calls completed in the window\n");
        rc = 1;
    }
out:
    if (workers) {
        for (uint32_t i = 0; i < c->threads; i++) {
            worker *w = &workers[i];
            if (w->cq) {
                grpc_completion_queue_shutdown(w->cq);
                while (grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
                           .type != GRPC_QUEUE_SHUTDOWN)
                    ;
                grpc_completion_queue_destroy(w->cq);
            }
            free(w->slots);
            free(w->free_slots);
            free(w->backlog);
            free(w->hist);
            for (int k = 0; k < K_COUNT; k++)
                free(w->hist_kind[k]);
        }
        free(workers);
    }
    free(res.hist);
    for (int k = 0; k < K_COUNT; k++)
        free(res.hist_kind[k]);
    for (int k = 0; k < K_COUNT; k++) {
        for (uint32_t j = 0; ctx.pools[k].msgs && j < ctx.pools[k].n; j++)
            grpc_slice_unref(ctx.pools[k].msgs[j]);
        free(ctx.pools[k].msgs);
    }
    zipf_free(&in.items);
    zipf_free(&in.users);
    free(queries);
    if (ctx.channels) {
        for (uint32_t i = 0; i < c->channels; i++)
            if (ctx.channels[i]) grpc_channel_destroy(ctx.channels[i]);
        free(ctx.channels);
    }
    if (creds) grpc_channel_credentials_release(creds);
    if (ctx.has_auth) grpc_slice_unref(ctx.auth_md.value);
    free(auth_value);
    free(token);
    free(ca_pem);
    grpc_shutdown();
    return rc;
}

/* ---- gen ----------------------------------------------------------------------------------- */

/* Writes a clustered synthetic catalog: unit vectors around `clusters` random centres, one
 * category per cluster, and queries drawn from the same distribution. */
static int gen_main(int argc, char **argv)
{
    uint64_t rows = 100000, nq = 10000;
    uint32_t dim = 128, clusters = 100;
    uint64_t seed = 42;
    const char *out_dir = NULL;
    const char *prefix = "item-";
    static const struct option opts[] = {
        {"rows", 1, 0, 'r'},        {"dim", 1, 0, 'd'},  {"queries", 1, 0, 'q'},
        {"clusters", 1, 0, 'c'},    {"out", 1, 0, 'o'},  {"seed", 1, 0, 's'},
        {"item-prefix", 1, 0, 'P'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    int opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'r':
            rows = strtoull(optarg, NULL, 10);
            break;
        case 'd':
            dim = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'q':
            nq = strtoull(optarg, NULL, 10);
            break;
        case 'c':
            clusters = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'o':
            out_dir = optarg;
            break;
        case 's':
            seed = strtoull(optarg, NULL, 10);
            break;
        case 'P':
            prefix = optarg;
            break;
        case 'h':
        default:
            fprintf(opt == 'h' ? stdout : stderr,
                    "usage: affinity_load gen --out DIR [--rows N (100000)] [--dim D (128)]\n"
                    "         [--queries Q (10000)] [--clusters C (100)] [--seed S]\n"
                    "         [--item-prefix P (item-)]\n"
                    "writes DIR/catalog.npy, DIR/catalog.csv (id,category,tags,price,available)\n"
                    "and DIR/queries.npy; vectors are unit length (cosine = inner product)\n");
            return opt == 'h' ? 0 : 2;
        }
    }
    if (!out_dir || rows < 1 || dim < 1 || dim > AFF_MAX_DIM || nq < 1 || clusters < 1) {
        fprintf(stderr, "affinity_load gen: --out is required and sizes must be positive\n");
        return 2;
    }
    /* Create --out (and its parents) when missing, like mkdir -p. */
    char made[4096];
    snprintf(made, sizeof made, "%s", out_dir);
    for (char *p = made + 1;; p++) {
        char c = *p;
        if (c != '/' && c != '\0') continue;
        *p = '\0';
        if (mkdir(made, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "affinity_load gen: cannot create %s: %s\n", made, strerror(errno));
            return 1;
        }
        *p = c;
        if (c == '\0') break;
    }
    int rc = 1;
    float *centres = malloc((size_t)clusters * dim * sizeof(float));
    float *data = malloc((size_t)(rows > nq ? rows : nq) * dim * sizeof(float));
    FILE *csv = NULL;
    char path[4096];
    aff_err err = {0};
    aff_rng r = {seed};
    if (!centres || !data) {
        fprintf(stderr, "affinity_load gen: out of memory\n");
        goto out;
    }
    for (size_t i = 0; i < (size_t)clusters * dim; i++)
        centres[i] = (float)aff_rng_normal(&r);
    /* Items and queries alike: a centre plus noise, normalized. */
    for (int pass = 0; pass < 2; pass++) {
        uint64_t n = pass == 0 ? rows : nq;
        if (pass == 0) {
            snprintf(path, sizeof(path), "%s/catalog.csv", out_dir);
            csv = fopen(path, "w");
            if (!csv) {
                fprintf(stderr, "affinity_load gen: cannot write %s: %s\n", path, strerror(errno));
                goto out;
            }
            fprintf(csv, "id,category,tags,price,available\n");
        }
        for (uint64_t i = 0; i < n; i++) {
            uint32_t cl = (uint32_t)(aff_rng_next(&r) % clusters);
            float *v = data + i * dim;
            double norm = 0;
            for (uint32_t j = 0; j < dim; j++) {
                v[j] = centres[(size_t)cl * dim + j] + 0.6f * (float)aff_rng_normal(&r);
                norm += (double)v[j] * v[j];
            }
            for (uint32_t j = 0; j < dim; j++)
                v[j] = (float)(v[j] / sqrt(norm));
            if (pass == 0)
                fprintf(csv, "%s%llu,cat-%u,tag-%u|tag-%u,%.2f,%s\n", prefix, (unsigned long long)i,
                        cl % 25, (unsigned)(aff_rng_next(&r) % 50),
                        (unsigned)(aff_rng_next(&r) % 50), 1.0 + aff_rng_uniform(&r) * 499.0,
                        aff_rng_uniform(&r) < 0.9 ? "true" : "false");
        }
        snprintf(path, sizeof(path), "%s/%s", out_dir, pass == 0 ? "catalog.npy" : "queries.npy");
        if (vecfile_write(path, data, n, dim, &err) != 0) {
            fprintf(stderr, "affinity_load gen: %s\n", err.msg);
            goto out;
        }
        if (pass == 0) {
            if (fclose(csv) != 0) {
                csv = NULL;
                fprintf(stderr, "affinity_load gen: write failed on catalog.csv\n");
                goto out;
            }
            csv = NULL;
        }
    }
    printf("affinity_load gen: %llu items and %llu queries of dimension %u in %s\n",
           (unsigned long long)rows, (unsigned long long)nq, dim, out_dir);
    rc = 0;
out:
    if (csv) fclose(csv);
    free(centres);
    free(data);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        fprintf(argc < 2 ? stderr : stdout,
                "usage: affinity_load gen|run [options]   (affinity_load <cmd> --help)\n");
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "gen") == 0) return gen_main(argc - 1, argv + 1);
    if (strcmp(argv[1], "run") == 0) return run_main(argc - 1, argv + 1);
    fprintf(stderr, "affinity_load: unknown command '%s'; use gen or run\n", argv[1]);
    return 2;
}

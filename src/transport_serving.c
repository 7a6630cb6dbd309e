/*
 * transport_serving.c: the affinity.v1 serving handlers: Search (raw vectors, straight to the
 * batcher) and SimilarItems, Recommend, Rerank and BatchRecommend (through the pipeline, which
 * decides everything: source, rules, diversity, exploration, reasons). Here: decode into
 * plain structs, call, encode. Input rules are checked by the pipeline and the engine.
 *
 * Ownership: a unary call's decoded request (c->req) outlives its pipeline job, whose request
 * borrows from it; the job belongs to the pipeline from a pending pipeline_start until its
 * done callback, which answers the call and destroys the job.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"
#include "pipeline.h"
#include "transport_codec.h"
#include "transport_handlers.h"

#define MAX_QUERIES_PER_CALL   1024 /* Search queries in one request */
#define STREAM_MAX_OUTSTANDING 256  /* BatchRecommend requests read but not yet answered */

/* ---- decoding ----------------------------------------------------------------------------------
 */

static void filter_from_pb(const Affinity__V1__Filter *f, aff_filter *out)
{
    aff_filter_init(out);
    if (!f) return;
    out->categories = (const char *const *)f->categories;
    out->n_categories = (uint32_t)f->n_categories;
    out->tags = (const char *const *)f->tags;
    out->n_tags = (uint32_t)f->n_tags;
    if (f->price_min) out->price_min = f->price_min->value;
    if (f->price_max) out->price_max = f->price_max->value;
    out->available_only = f->available_only;
    out->exclude_ids = (const char *const *)f->exclude_ids;
    out->n_exclude_ids = (uint32_t)f->n_exclude_ids;
    out->exclude_categories = (const char *const *)f->exclude_categories;
    out->n_exclude_categories = (uint32_t)f->n_exclude_categories;
    out->exclude_tags = (const char *const *)f->exclude_tags;
    out->n_exclude_tags = (uint32_t)f->n_exclude_tags;
}

/* A decoded request for the pipeline; points into the protobuf message it was made from. */
typedef struct serve_req {
    pipeline_request req;
    aff_filter filter;
    pipeline_rules rules;
    pipeline_boost *boosts;
    pipeline_pin *pins;
    pipeline_promotion *promotions;
    pipeline_audience *audiences; /* per boost, then per promotion */
    pipeline_context context;
    int *exclude_types;
    const char **candidate_ids;
    float *base_scores;
} serve_req;

static void serve_req_free(serve_req *s)
{
    if (!s) return;
    free(s->boosts);
    free(s->pins);
    free(s->promotions);
    free(s->audiences);
    free(s->exclude_types);
    free(s->candidate_ids);
    free(s->base_scores);
    free(s);
}

/* NULL when pb is NULL; else out, filled. */
static const pipeline_audience *audience_from_pb(const Affinity__V1__Audience *pb,
                                                 pipeline_audience *out)
{
    if (!pb) return NULL;
    pipeline_audience_init(out);
    if (pb->min_price_sensitivity) out->min_price_sensitivity = pb->min_price_sensitivity->value;
    if (pb->max_price_sensitivity) out->max_price_sensitivity = pb->max_price_sensitivity->value;
    if (pb->min_loyalty) out->min_loyalty = pb->min_loyalty->value;
    if (pb->min_activity) out->min_activity = pb->min_activity->value;
    if (pb->min_purchase_intent) out->min_purchase_intent = pb->min_purchase_intent->value;
    out->devices = (const char *const *)pb->devices;
    out->n_devices = (uint32_t)pb->n_devices;
    out->locales = (const char *const *)pb->locales;
    out->n_locales = (uint32_t)pb->n_locales;
    /* out of range values stay out of range, so the pipeline names them */
    if (pb->from_hour) out->from_hour = pb->from_hour->value > 23 ? 24 : (int)pb->from_hour->value;
    if (pb->to_hour) out->to_hour = pb->to_hour->value > 23 ? 24 : (int)pb->to_hour->value;
    return out;
}

/* NULL when pb is NULL; else out, filled. */
static const pipeline_context *context_from_pb(const Affinity__V1__RequestContext *pb,
                                               pipeline_context *out)
{
    if (!pb) return NULL;
    out->device = pb->device;
    out->locale = pb->locale;
    out->hour = pb->hour ? (pb->hour->value > 23 ? 24 : (int)pb->hour->value) : -1;
    return out;
}

/* Counts are capped only to bound memory; the pipeline checks the limits with field names. */
static bool rules_from_pb(const Affinity__V1__Rules *r, serve_req *s)
{
    if (!r) return true;
    pipeline_rules *o = &s->rules;
    s->boosts = transport__calloc(r->n_boosts, sizeof *s->boosts);
    s->pins = transport__calloc(r->n_pins, sizeof *s->pins);
    s->promotions = transport__calloc(r->n_promotions, sizeof *s->promotions);
    s->audiences = transport__calloc(r->n_boosts + r->n_promotions, sizeof *s->audiences);
    if (!s->boosts || !s->pins || !s->promotions || !s->audiences) return false;
    for (size_t i = 0; i < r->n_boosts; i++) {
        filter_from_pb(r->boosts[i]->filter, &s->boosts[i].filter);
        s->boosts[i].weight = r->boosts[i]->weight;
        s->boosts[i].audience = audience_from_pb(r->boosts[i]->audience, &s->audiences[i]);
    }
    for (size_t i = 0; i < r->n_pins; i++)
        s->pins[i] =
            (pipeline_pin){.item_id = r->pins[i]->item_id, .position = r->pins[i]->position};
    for (size_t i = 0; i < r->n_promotions; i++) {
        s->promotions[i].name = r->promotions[i]->name;
        filter_from_pb(r->promotions[i]->filter, &s->promotions[i].filter);
        s->promotions[i].share = r->promotions[i]->share;
        s->promotions[i].audience =
            audience_from_pb(r->promotions[i]->audience, &s->audiences[r->n_boosts + i]);
    }
    o->boosts = s->boosts;
    o->n_boosts = (uint32_t)r->n_boosts;
    o->pins = s->pins;
    o->n_pins = (uint32_t)r->n_pins;
    o->promotions = s->promotions;
    o->n_promotions = (uint32_t)r->n_promotions;
    if (r->max_per_category) {
        o->has_max_per_category = true;
        o->max_per_category = r->max_per_category->value;
    }
    if (r->diversity) {
        o->has_diversity = true;
        o->diversity = r->diversity->value;
    }
    if (r->exploration) {
        o->has_exploration = true;
        o->exploration_share = r->exploration->share;
        o->exploration_seed = r->exploration->seed;
        o->exploration_new_age_s = r->exploration->new_item_age_s;
        o->exploration_rarely_shown_below = r->exploration->rarely_shown_below;
    }
    s->req.rules = o;
    return true;
}

static serve_req *recommend_from_pb(const Affinity__V1__RecommendRequest *r)
{
    serve_req *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    pipeline_request *q = &s->req;
    q->kind = PIPELINE_RECOMMEND;
    q->collection = r->collection;
    q->space = (pipeline_space)r->space;
    if (r->user_case == AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID) {
        q->user_id = r->user_id;
    } else if (r->user_case == AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_VECTOR &&
               r->user_vector) {
        q->vector = r->user_vector->n_values ? r->user_vector->values : (const float *)"";
        q->dim = (uint32_t)r->user_vector->n_values;
    }
    q->k = r->k;
    filter_from_pb(r->filter, &s->filter);
    q->filter = &s->filter;
    s->exclude_types = transport__calloc(r->n_exclude_event_types, sizeof *s->exclude_types);
    if (!s->exclude_types) goto nomem;
    for (size_t i = 0; i < r->n_exclude_event_types; i++)
        s->exclude_types[i] = (int)r->exclude_event_types[i];
    q->exclude_event_types = s->exclude_types;
    q->n_exclude_event_types = (uint32_t)r->n_exclude_event_types;
    q->preset = r->preset;
    q->context = context_from_pb(r->context, &s->context);
    q->surface = r->surface;
    q->recipe = (widgets_recipe)r->recipe; /* unknown values stay unknown: the pipeline names them */
    q->item_ids = (const char *const *)r->item_ids;
    q->n_item_ids = (uint32_t)r->n_item_ids;
    if (!rules_from_pb(r->rules, s)) goto nomem;
    return s;
nomem:
    serve_req_free(s);
    return NULL;
}

/* ---- encoding ----------------------------------------------------------------------------------
 */

/* Protobuf hits for one pipeline list (arrays allocated here, freed by hits_pb_free). */
typedef struct hits_pb {
    Affinity__V1__Hit *hits;
    Affinity__V1__Hit **ptrs;
    Affinity__V1__Reason *reasons;
} hits_pb;

static bool hits_to_pb(const pipeline_hit *const *lists, const uint32_t *n, uint32_t n_lists,
                       hits_pb *out)
{
    size_t total = 0;
    for (uint32_t l = 0; l < n_lists; l++)
        total += n[l];
    /* one allocation (hits_pb_free frees it by hits): hits, then ptrs, then reasons (each
     * element 8-byte aligned) */
    char *block = transport__calloc(total ? total : 1, sizeof *out->hits + sizeof *out->ptrs +
                                                           sizeof *out->reasons);
    if (!block) return false;
    out->hits = (Affinity__V1__Hit *)(void *)block;
    out->ptrs = (Affinity__V1__Hit **)(void *)(block + total * sizeof *out->hits);
    out->reasons = (Affinity__V1__Reason *)(void *)(block + total * (sizeof *out->hits +
                                                                     sizeof *out->ptrs));
    size_t h = 0;
    for (uint32_t l = 0; l < n_lists; l++) {
        for (uint32_t i = 0; i < n[l]; i++, h++) {
            const pipeline_hit *ph = &lists[l][i];
            Affinity__V1__Reason *rs = &out->reasons[h];
            affinity__v1__reason__init(rs);
            rs->kind = (Affinity__V1__ReasonKind)ph->reason.kind;
            rs->related_item_id = (char *)ph->reason.related_id;
            if (ph->reason.promotion) rs->promotion = (char *)ph->reason.promotion;
            affinity__v1__hit__init(&out->hits[h]);
            out->hits[h].id = (char *)ph->id;
            out->hits[h].score = ph->score;
            out->hits[h].reason = rs;
            out->ptrs[h] = &out->hits[h];
        }
    }
    return true;
}

static void hits_pb_free(hits_pb *h)
{
    free(h->hits); /* the block of hits, ptrs and reasons */
}

/* ---- Search: raw vectors straight to the batcher ----------------------------------------------
 */

/* Everything one Search call needs from its decoding to its response, in one allocation made
 * by rpc_search (search_state_new): the request's queries and filters, the batcher's outputs,
 * and the protobuf response arrays search_done fills. Owned by the tcall (c->state); the
 * batcher borrows br and the arrays from batcher_submit until search_done. */
typedef struct search_state {
    batcher_request br;
    aff_query *queries;   /* nq */
    aff_filter *filters;  /* nq */
    aff_hit *hits;        /* total_k */
    uint32_t *n_hits;     /* nq */
    aff_err *errs;        /* nq */
    Affinity__V1__QueryResult *res, **res_ptrs; /* nq */
    Affinity__V1__Hit *pb_hits, **pb_hit_ptrs;  /* total_k */
} search_state;

/* Takes an array of n elements of size bytes from the block at *next (16-byte aligned). */
static void *carve(char **next, size_t n, size_t size)
{
    void *p = *next;
    *next += (n * size + 15) & ~(size_t)15;
    return p;
}

static search_state *search_state_new(size_t nq, size_t total_k)
{
    size_t per_q = sizeof(aff_query) + sizeof(aff_filter) + sizeof(uint32_t) + sizeof(aff_err) +
                   sizeof(Affinity__V1__QueryResult) + sizeof(Affinity__V1__QueryResult *);
    size_t per_k = sizeof(aff_hit) + sizeof(Affinity__V1__Hit) + sizeof(Affinity__V1__Hit *);
    size_t bytes = ((sizeof(search_state) + 15) & ~(size_t)15) + nq * per_q + total_k * per_k +
                   16 * 10; /* each array's alignment padding */
    char *next = calloc(1, bytes);
    if (!next) return NULL;
    search_state *st = carve(&next, 1, sizeof *st);
    st->queries = carve(&next, nq, sizeof *st->queries);
    st->filters = carve(&next, nq, sizeof *st->filters);
    st->hits = carve(&next, total_k, sizeof *st->hits);
    st->n_hits = carve(&next, nq, sizeof *st->n_hits);
    st->errs = carve(&next, nq, sizeof *st->errs);
    st->res = carve(&next, nq, sizeof *st->res);
    st->res_ptrs = carve(&next, nq, sizeof *st->res_ptrs);
    st->pb_hits = carve(&next, total_k, sizeof *st->pb_hits);
    st->pb_hit_ptrs = carve(&next, total_k, sizeof *st->pb_hit_ptrs);
    return st;
}

static void search_state_free(void *p)
{
    free(p);
}

static void search_done(batcher_request *br)
{
    tcall *c = br->user;
    search_state *st = c->state;
    metrics_observe_queue_wait(c->t->cfg.metrics, br->wait_ns);
    size_t i = 0;
    while (br->status == AFF_OK && i < br->nq && st->errs[i].code == AFF_OK)
        i++;
    if (br->status != AFF_OK) {
        tcall_fail(c, &br->err);
    } else if (i < br->nq) {
        aff_err e = st->errs[i];
        if (br->nq > 1) aff__fail(&e, st->errs[i].code, "query %zu: %s", i, st->errs[i].msg);
        tcall_fail(c, &e);
    } else {
        size_t off = 0, h = 0;
        for (size_t q = 0; q < br->nq; q++) {
            Affinity__V1__QueryResult *res = &st->res[q];
            affinity__v1__query_result__init(res);
            res->n_hits = st->n_hits[q];
            res->hits = st->pb_hit_ptrs + h;
            for (uint32_t j = 0; j < st->n_hits[q]; j++, h++) {
                Affinity__V1__Hit *hit = &st->pb_hits[h];
                affinity__v1__hit__init(hit);
                hit->id = st->hits[off + j].id;
                hit->score = st->hits[off + j].score;
                st->pb_hit_ptrs[h] = hit;
            }
            off += st->queries[q].k;
            st->res_ptrs[q] = res;
        }
        Affinity__V1__SearchResponse resp = AFFINITY__V1__SEARCH_RESPONSE__INIT;
        resp.n_results = br->nq;
        resp.results = st->res_ptrs;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    tcall_unref(c);
}

void rpc_search(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__SearchRequest *r = (void *)msg;
    aff_err err;
    uint32_t dim;
    size_t nq = r->n_queries, total_k = 0;
    if (engine_collection_dim(c->t->engine, r->collection, &dim, &err)) {
        tcall_fail(c, &err);
        return;
    }
    if (nq < 1 || nq > MAX_QUERIES_PER_CALL) {
        transport__fail(c, AFF_EINVAL, "%zu queries; Search takes 1..%d per call", nq,
                        MAX_QUERIES_PER_CALL);
        return;
    }
    for (size_t i = 0; i < nq; i++) {
        uint32_t k = r->queries[i]->k ? r->queries[i]->k : r->k;
        if (k < 1 || k > AFF_MAX_K) {
            if (nq > 1)
                transport__fail(c, AFF_EINVAL,
                                "query %zu: k = %u is out of range 1..%d (set k on the request "
                                "or the query)",
                                i, k, AFF_MAX_K);
            else
                transport__fail(c, AFF_EINVAL, "k = %u is out of range 1..%d", k, AFF_MAX_K);
            return;
        }
        total_k += k;
    }
    search_state *st = search_state_new(nq, total_k);
    if (!st) {
        transport__fail(c, AFF_ENOMEM, "out of memory preparing %zu queries", nq);
        return;
    }
    c->state = st;
    c->state_free = search_state_free;
    for (size_t i = 0; i < nq; i++) {
        const Affinity__V1__Query *q = r->queries[i];
        if (q->n_vector == 0) {
            transport__fail(c, AFF_EINVAL,
                            "query %zu has no vector; Search needs %u values per query", i, dim);
            return;
        }
        filter_from_pb(q->filter ? q->filter : r->filter, &st->filters[i]);
        st->queries[i] = (aff_query){.vector = q->vector,
                                     .dim = (uint32_t)q->n_vector,
                                     .k = q->k ? q->k : r->k,
                                     .filter = &st->filters[i]};
        if (engine_validate_query(c->t->engine, r->collection, &st->queries[i], &err)) {
            if (nq > 1) {
                aff_err e2;
                aff__fail(&e2, err.code, "query %zu: %s", i, err.msg);
                tcall_fail(c, &e2);
            } else {
                tcall_fail(c, &err);
            }
            return;
        }
    }
    st->br = (batcher_request){.kind = BATCHER_SEARCH,
                               .collection = r->collection,
                               .deadline_ns = tcall_deadline_ns(c),
                               .nq = nq,
                               .queries = st->queries,
                               .hits = st->hits,
                               .n_hits = st->n_hits,
                               .query_errs = st->errs,
                               .done = search_done,
                               .user = c};
    tcall_ref(c);
    if (batcher_submit(c->t->batcher, &st->br, &err)) {
        tcall_unref(c);
        tcall_fail(c, &err);
    }
}

/* ---- unary pipeline calls: SimilarItems, Recommend, Rerank ------------------------------------
 */

typedef struct unary_state {
    serve_req *sr;
    pipeline_job *job;
} unary_state;

static void unary_state_free(void *p)
{
    unary_state *st = p;
    if (!st) return;
    pipeline_job_destroy(st->job);
    serve_req_free(st->sr);
    free(st);
}

static void respond_similar(tcall *c, const pipeline_output *o)
{
    hits_pb hp = {0};
    Affinity__V1__QueryResult *res = transport__calloc(o->n_results, sizeof *res);
    Affinity__V1__QueryResult **rp = transport__calloc(o->n_results, sizeof *rp);
    if (!res || !rp || !hits_to_pb(o->hits, o->n_hits, o->n_results, &hp)) {
        transport__fail(c, AFF_ENOMEM, "out of memory encoding results");
    } else {
        size_t h = 0;
        for (uint32_t i = 0; i < o->n_results; i++) {
            affinity__v1__query_result__init(&res[i]);
            res[i].n_hits = o->n_hits[i];
            res[i].hits = hp.ptrs + h;
            h += o->n_hits[i];
            rp[i] = &res[i];
        }
        Affinity__V1__SimilarItemsResponse resp = AFFINITY__V1__SIMILAR_ITEMS_RESPONSE__INIT;
        resp.n_results = o->n_results;
        resp.results = rp;
        resp.recommendation_id = (char *)o->recommendation_id;
        resp.exploration_seed = o->exploration_seed;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    hits_pb_free(&hp);
    free(res);
    free(rp);
}

static void respond_recommend(tcall *c, const pipeline_output *o)
{
    const Affinity__V1__RecommendRequest *r = (void *)c->req;
    hits_pb hp = {0};
    if (!hits_to_pb(o->hits, o->n_hits, 1, &hp)) {
        transport__fail(c, AFF_ENOMEM, "out of memory encoding results");
    } else {
        Affinity__V1__RecommendResponse resp = AFFINITY__V1__RECOMMEND_RESPONSE__INIT;
        resp.n_hits = o->n_hits[0];
        resp.hits = hp.ptrs;
        resp.source = (Affinity__V1__RecommendSource)o->source;
        resp.request_id = r->request_id;
        resp.recommendation_id = (char *)o->recommendation_id;
        resp.exploration_seed = o->exploration_seed;
        resp.experiment = (char *)o->experiment;
        resp.arm = (char *)o->arm;
        resp.strategy = (char *)o->strategy;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    hits_pb_free(&hp);
}

static void respond_rerank(tcall *c, const pipeline_output *o)
{
    const serve_req *sr = ((unary_state *)c->state)->sr;
    uint32_t n = o->n_rerank;
    Affinity__V1__RerankedItem *items = transport__calloc(n, sizeof *items);
    Affinity__V1__RerankedItem **ptrs = transport__calloc(n, sizeof *ptrs);
    Affinity__V1__Reason *reasons = transport__calloc(n, sizeof *reasons);
    if (!items || !ptrs || !reasons) {
        transport__fail(c, AFF_ENOMEM, "out of memory encoding results");
    } else {
        for (uint32_t i = 0; i < n; i++) {
            const aff_rerank_hit *h = &o->rerank[i];
            affinity__v1__reranked_item__init(&items[i]);
            items[i].id = (char *)sr->req.candidate_ids[h->index];
            items[i].base_score = h->base;
            items[i].affinity = o->rerank_without_profile ? 0.0f : h->affinity;
            items[i].score = h->blended;
            items[i].found = h->found;
            if (o->rerank_reasons) {
                const pipeline_reason *pr = &o->rerank_reasons[i];
                affinity__v1__reason__init(&reasons[i]);
                reasons[i].kind = (Affinity__V1__ReasonKind)pr->kind;
                reasons[i].related_item_id = (char *)pr->related_id;
                items[i].reason = &reasons[i];
            }
            ptrs[i] = &items[i];
        }
        Affinity__V1__RerankResponse resp = AFFINITY__V1__RERANK_RESPONSE__INIT;
        resp.n_items = n;
        resp.items = ptrs;
        resp.source = (Affinity__V1__RecommendSource)o->source;
        resp.recommendation_id = (char *)o->recommendation_id;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    free(items);
    free(ptrs);
    free(reasons);
}

static void unary_respond(tcall *c, pipeline_job *job)
{
    const pipeline_output *o = pipeline_job_output(job);
    unary_state *st = c->state;
    if (o->status != AFF_OK) {
        tcall_fail(c, &o->err);
    } else if (st->sr->req.kind == PIPELINE_SIMILAR) {
        respond_similar(c, o);
    } else if (st->sr->req.kind == PIPELINE_RERANK) {
        respond_rerank(c, o);
    } else {
        respond_recommend(c, o);
    }
}

static void unary_done(pipeline_job *job, void *user)
{
    tcall *c = user;
    unary_state *st = c->state;
    st->job = job;
    metrics_observe_queue_wait(c->t->cfg.metrics, pipeline_job_output(job)->queue_wait_ns);
    unary_respond(c, job);
    tcall_unref(c);
}

/* Starts sr (owned by the call from here on) and answers when it finishes. */
static void unary_run(tcall *c, serve_req *sr)
{
    unary_state *st = calloc(1, sizeof *st);
    if (!st || !sr) {
        free(st);
        serve_req_free(sr);
        transport__fail(c, AFF_ENOMEM, "out of memory preparing the query");
        return;
    }
    st->sr = sr;
    c->state = st;
    c->state_free = unary_state_free;
    aff_err err;
    bool pending;
    pipeline_job *job;
    tcall_ref(c);
    if (pipeline_start(c->t->cfg.pipeline, &sr->req, tcall_deadline_ns(c), unary_done, c, &job,
                       &pending, &err)) {
        tcall_unref(c);
        tcall_fail(c, &err);
        return;
    }
    if (pending) return; /* unary_done answers (perhaps already has) */
    st->job = job;
    unary_respond(c, job);
    tcall_unref(c);
}

void rpc_similar_items(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__SimilarItemsRequest *r = (void *)msg;
    serve_req *s = calloc(1, sizeof *s);
    if (s) {
        s->req = (pipeline_request){.kind = PIPELINE_SIMILAR,
                                    .collection = r->collection,
                                    .space = (pipeline_space)r->space,
                                    .item_ids = (const char *const *)r->item_ids,
                                    .n_item_ids = (uint32_t)r->n_item_ids,
                                    .k = r->k,
                                    .filter = &s->filter,
                                    .preset = r->preset,
                                    .context = context_from_pb(r->context, &s->context),
                                    .surface = r->surface};
        filter_from_pb(r->filter, &s->filter);
        if (!rules_from_pb(r->rules, s)) {
            serve_req_free(s);
            s = NULL;
        }
    }
    unary_run(c, s);
}

void rpc_recommend(tcall *c, ProtobufCMessage *msg)
{
    unary_run(c, recommend_from_pb((const Affinity__V1__RecommendRequest *)msg));
}

void rpc_rerank(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__RerankRequest *r = (void *)msg;
    serve_req *s = calloc(1, sizeof *s);
    /* Room for the allowed count; the pipeline refuses more before reading any. */
    size_t n = r->n_candidates <= AFF_MAX_RERANK_CANDIDATES ? r->n_candidates : 0;
    if (s) {
        s->candidate_ids = transport__calloc(n, sizeof *s->candidate_ids);
        s->base_scores = transport__calloc(n, sizeof *s->base_scores);
    }
    if (!s || !s->candidate_ids || !s->base_scores) {
        serve_req_free(s);
        unary_run(c, NULL);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        s->candidate_ids[i] = r->candidates[i]->id;
        s->base_scores[i] = r->candidates[i]->base_score;
    }
    pipeline_request *q = &s->req;
    q->kind = PIPELINE_RERANK;
    q->collection = r->collection;
    if (r->user_case == AFFINITY__V1__RERANK_REQUEST__USER_USER_ID) {
        q->user_id = r->user_id;
    } else if (r->user_case == AFFINITY__V1__RERANK_REQUEST__USER_USER_VECTOR && r->user_vector) {
        q->vector = r->user_vector->n_values ? r->user_vector->values : (const float *)"";
        q->dim = (uint32_t)r->user_vector->n_values;
    }
    q->candidate_ids = s->candidate_ids;
    q->base_scores = s->base_scores;
    q->n_candidates = r->n_candidates < UINT32_MAX ? (uint32_t)r->n_candidates : UINT32_MAX;
    q->weight = r->affinity_weight ? r->affinity_weight->value : 0.5f;
    q->surface = r->surface;
    unary_run(c, s);
}

/* ---- BatchRecommend: many users in, results out in request order ------------------------------
 */

typedef struct bitem {
    struct bitem *next;
    struct bitem *next_waiting; /* in bstream.waiting: behind its min_log_sequence */
    tcall *c;
    Affinity__V1__RecommendRequest *req; /* owned */
    serve_req *sr;                       /* owned; borrows from req */
    pipeline_job *job;                   /* owned once finished */
    bool done;
    int code; /* gRPC code of this request's outcome */
    char msg[256];
} bitem;

typedef struct bstream {
    pthread_mutex_t mu;
    bitem *head, *tail;
    bitem *waiting, *waiting_tail; /* not started: this replica is behind min_log_sequence */
    bool waiter;                   /* a blocking-work job is draining `waiting` */
    uint32_t outstanding; /* read, not yet answered */
    uint64_t received;
    bool recv_done, recv_paused, send_pending, finished, broken;
} bstream;

static void bitem_free(bitem *it)
{
    if (!it) return;
    pipeline_job_destroy(it->job);
    serve_req_free(it->sr);
    if (it->req) protobuf_c_message_free_unpacked(&it->req->base, NULL);
    free(it);
}

static void bstream_free(void *p)
{
    bstream *s = p;
    if (!s) return;
    for (bitem *it = s->head, *next; it; it = next) {
        next = it->next;
        bitem_free(it);
    }
    pthread_mutex_destroy(&s->mu);
    free(s);
}

static void bitem_send(tcall *c, bitem *it)
{
    Affinity__V1__RecommendResponse resp = AFFINITY__V1__RECOMMEND_RESPONSE__INIT;
    hits_pb hp = {0};
    if (it->req) resp.request_id = it->req->request_id;
    if (it->code == 0) {
        const pipeline_output *o = pipeline_job_output(it->job);
        if (!hits_to_pb(o->hits, o->n_hits, 1, &hp)) {
            it->code = GRPC_STATUS_RESOURCE_EXHAUSTED;
            snprintf(it->msg, sizeof it->msg, "out of memory encoding results");
        } else {
            resp.n_hits = o->n_hits[0];
            resp.hits = hp.ptrs;
            resp.source = (Affinity__V1__RecommendSource)o->source;
            resp.recommendation_id = (char *)o->recommendation_id;
            resp.exploration_seed = o->exploration_seed;
            resp.experiment = (char *)o->experiment;
            resp.arm = (char *)o->arm;
            resp.strategy = (char *)o->strategy;
        }
    }
    if (it->code != 0) {
        resp.error_code = it->code;
        resp.error_message = it->msg;
    }
    bool ok = tcall_send(c, &resp.base);
    hits_pb_free(&hp);
    if (!ok) {
        bstream *s = c->state;
        s->send_pending = false;
        s->broken = true;
    }
}

/* Sends the next answer in order, resumes reading, or ends the call. s->mu held. */
static void bstream_pump(tcall *c, bstream *s)
{
    while (!s->send_pending && s->head && s->head->done) {
        bitem *it = s->head;
        s->head = it->next;
        if (!s->head) s->tail = NULL;
        s->outstanding--;
        if (!s->broken) {
            s->send_pending = true;
            bitem_send(c, it);
        }
        bitem_free(it);
    }
    if (s->recv_paused && !s->recv_done && s->outstanding < STREAM_MAX_OUTSTANDING) {
        s->recv_paused = false;
        if (!tcall_recv(c)) s->recv_done = s->broken = true;
    }
    if (!s->finished && s->recv_done && !s->head && !s->send_pending) {
        s->finished = true;
        if (s->broken)
            tcall_finish(c, GRPC_STATUS_CANCELLED, "the stream broke", NULL);
        else
            tcall_finish(c, 0, NULL, NULL);
    }
}

/* Records a finished job's outcome. s->mu held. */
static void bitem_finished(bitem *it, pipeline_job *job)
{
    const pipeline_output *o = pipeline_job_output(job);
    it->job = job;
    if (o->status != AFF_OK) {
        it->code = aff_status_grpc_code(o->status);
        snprintf(it->msg, sizeof it->msg, "%s", o->err.msg);
    }
    it->done = true;
}

static void bitem_done(pipeline_job *job, void *user)
{
    bitem *it = user;
    tcall *c = it->c;
    bstream *s = c->state;
    metrics_observe_queue_wait(c->t->cfg.metrics, pipeline_job_output(job)->queue_wait_ns);
    pthread_mutex_lock(&s->mu);
    bitem_finished(it, job);
    bstream_pump(c, s);
    pthread_mutex_unlock(&s->mu);
    tcall_unref(c);
}

/* Starts the pipeline job of a decoded request. s->mu held. */
static int bitem_start(tcall *c, bitem *it, aff_err *err)
{
    if (!(it->sr = recommend_from_pb(it->req)))
        return aff__fail(err, AFF_ENOMEM, "out of memory preparing the query");
    /* The job's completion takes s->mu, which this thread holds until it has queued it. */
    bool pending;
    pipeline_job *job;
    tcall_ref(c);
    int rc = pipeline_start(c->t->cfg.pipeline, &it->sr->req, tcall_deadline_ns(c), bitem_done,
                            it, &job, &pending, err);
    if (rc || !pending) tcall_unref(c);
    if (!rc && !pending) bitem_finished(it, job);
    return rc;
}

/* Requests behind their min_log_sequence (blocking-work thread): waits for each in turn (the
 * bounded wait of every serving call), then starts it or answers it UNAVAILABLE; the stream
 * goes on either way and answers stay in request order. Once a wait ran out, requests that
 * want that sequence or a later one are answered UNAVAILABLE at once (one bounded wait per
 * run, not one per request, while the replica is stuck). */
static void bstream_wait_job(tcall *c)
{
    bstream *s = c->state;
    uint64_t missed = 0; /* the lowest sequence a wait of this run ran out on */
    aff_err missed_err;
    pthread_mutex_lock(&s->mu);
    for (bitem *it; (it = s->waiting);) {
        pthread_mutex_unlock(&s->mu);
        aff_err err;
        uint64_t want = it->req->min_log_sequence;
        int rc = 0;
        if (missed && want >= missed && transport__log_behind(c, missed)) {
            rc = AFF_EUNAVAILABLE;
            err = missed_err;
        } else if ((rc = transport__log_wait_sequence(c, want, &err)) != 0) {
            missed = want;
            missed_err = err;
        }
        pthread_mutex_lock(&s->mu);
        s->waiting = it->next_waiting;
        if (!s->waiting) s->waiting_tail = NULL;
        if (!rc) rc = bitem_start(c, it, &err);
        if (rc) {
            it->done = true;
            it->code = aff_status_grpc_code(rc);
            snprintf(it->msg, sizeof it->msg, "%s", err.msg);
        }
        bstream_pump(c, s);
    }
    s->waiter = false;
    pthread_mutex_unlock(&s->mu);
}

static void bstream_on_recv(tcall *c, bool ok, grpc_byte_buffer *bb)
{
    bstream *s = c->state;
    pthread_mutex_lock(&s->mu);
    if (!ok || !bb) {
        if (!ok) s->broken = true;
        s->recv_done = true;
        if (bb) grpc_byte_buffer_destroy(bb);
        bstream_pump(c, s);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    bitem *it = calloc(1, sizeof *it);
    if (!it) {
        grpc_byte_buffer_destroy(bb);
        s->recv_done = s->broken = true;
        bstream_pump(c, s);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    it->c = c;
    bool start_waiter = false;
    char why[400];
    it->req = (void *)transport__unpack_checked(bb, &affinity__v1__recommend_request__descriptor,
                                                why, sizeof why);
    grpc_byte_buffer_destroy(bb);
    aff_err err;
    int rc;
    if (!it->req) {
        rc = aff__fail(&err, AFF_EINVAL, "message %llu is not a valid RecommendRequest%s%s",
                       (unsigned long long)s->received, why[0] ? ": " : "", why);
    } else if (atomic_load(&c->t->draining)) {
        rc = aff__fail(&err, AFF_EUNAVAILABLE, "the server is shutting down; retry elsewhere");
    } else if (s->waiting || transport__log_behind(c, it->req->min_log_sequence)) {
        /* Behind (or after a request that is): wait on a blocking-work thread, in order. */
        rc = 0;
        if (s->waiting_tail)
            s->waiting_tail->next_waiting = it;
        else
            s->waiting = it;
        s->waiting_tail = it;
        start_waiter = !s->waiter;
        s->waiter = true;
    } else {
        rc = bitem_start(c, it, &err);
    }
    if (rc) {
        it->done = true;
        it->code = aff_status_grpc_code(rc);
        snprintf(it->msg, sizeof it->msg, "%s", err.msg);
    }
    s->received++;
    s->outstanding++;
    if (s->tail)
        s->tail->next = it;
    else
        s->head = it;
    s->tail = it;
    if (s->outstanding < STREAM_MAX_OUTSTANDING) {
        if (!tcall_recv(c)) s->recv_done = s->broken = true;
    } else {
        s->recv_paused = true;
    }
    bstream_pump(c, s);
    pthread_mutex_unlock(&s->mu);
    if (start_waiter) transport__defer(c, bstream_wait_job); /* runs here without workers */
}

static void bstream_on_send(tcall *c, bool ok)
{
    bstream *s = c->state;
    pthread_mutex_lock(&s->mu);
    s->send_pending = false;
    if (!ok) s->broken = true;
    bstream_pump(c, s);
    pthread_mutex_unlock(&s->mu);
}

void rpc_batch_recommend(tcall *c)
{
    bstream *s = calloc(1, sizeof *s);
    if (!s) {
        transport__fail(c, AFF_ENOMEM, "out of memory starting a stream");
        return;
    }
    pthread_mutex_init(&s->mu, NULL);
    c->state = s;
    c->state_free = bstream_free;
    c->on_recv = bstream_on_recv;
    c->on_send = bstream_on_send;
    if (!tcall_recv(c)) transport__fail(c, AFF_EINTERNAL, "cannot read the request stream");
}

/* ---- RecommendPage ------------------------------------------------------------------------------
 */

typedef struct page_state {
    pipeline_page_request req;
    pipeline_slot *slots;
    serve_req *slot_reqs; /* per slot: filter and rules storage */
    size_t n_slot_reqs;
    int *exclude_types;
    pipeline_context context;
    pipeline_page *page;
} page_state;

static void page_state_free(void *p)
{
    page_state *st = p;
    if (!st) return;
    pipeline_page_destroy(st->page);
    for (size_t i = 0; st->slot_reqs && i < st->n_slot_reqs; i++) {
        free(st->slot_reqs[i].boosts);
        free(st->slot_reqs[i].pins);
        free(st->slot_reqs[i].promotions);
        free(st->slot_reqs[i].audiences);
    }
    free(st->slot_reqs);
    free(st->slots);
    free(st->exclude_types);
    free(st);
}

static void page_respond(tcall *c, pipeline_page *page)
{
    const Affinity__V1__RecommendPageRequest *r = (void *)c->req;
    const pipeline_page_output *o = pipeline_page_output_of(page);
    if (o->status != AFF_OK) {
        tcall_fail(c, &o->err);
        return;
    }
    hits_pb hp = {0};
    Affinity__V1__SlotResult *res = transport__calloc(o->n_slots, sizeof *res);
    Affinity__V1__SlotResult **rp = transport__calloc(o->n_slots, sizeof *rp);
    if (!res || !rp || !hits_to_pb(o->hits, o->n_hits, o->n_slots, &hp)) {
        transport__fail(c, AFF_ENOMEM, "out of memory encoding the page");
    } else {
        size_t h = 0;
        for (uint32_t s = 0; s < o->n_slots; s++) {
            affinity__v1__slot_result__init(&res[s]);
            res[s].name = (char *)o->slots[s].name;
            res[s].collection = (char *)o->slots[s].collection;
            res[s].n_hits = o->n_hits[s];
            res[s].hits = hp.ptrs + h;
            res[s].source = (Affinity__V1__RecommendSource)o->sources[s];
            h += o->n_hits[s];
            rp[s] = &res[s];
        }
        Affinity__V1__RecommendPageResponse resp = AFFINITY__V1__RECOMMEND_PAGE_RESPONSE__INIT;
        resp.n_slots = o->n_slots;
        resp.slots = rp;
        resp.recommendation_id = (char *)o->recommendation_id;
        resp.request_id = r->request_id;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    hits_pb_free(&hp);
    free(res);
    free(rp);
}

static void page_done(pipeline_page *page, void *user)
{
    tcall *c = user;
    ((page_state *)c->state)->page = page;
    page_respond(c, page);
    tcall_unref(c);
}

void rpc_recommend_page(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__RecommendPageRequest *r = (void *)msg;
    size_t n = r->n_slots <= PIPELINE_MAX_SLOTS ? r->n_slots : 0; /* the pipeline refuses more */
    page_state *st = calloc(1, sizeof *st);
    if (st) {
        st->req.context = context_from_pb(r->context, &st->context);
        c->state = st;
        c->state_free = page_state_free;
        st->slots = transport__calloc(n, sizeof *st->slots);
        st->slot_reqs = transport__calloc(n, sizeof *st->slot_reqs);
        st->exclude_types = transport__calloc(r->n_exclude_event_types, sizeof *st->exclude_types);
    }
    if (!st || !st->slots || !st->slot_reqs || !st->exclude_types) {
        transport__fail(c, AFF_ENOMEM, "out of memory preparing the page");
        return;
    }
    st->req.n_slots = (uint32_t)n;
    st->n_slot_reqs = n;
    for (size_t i = 0; i < n; i++) {
        const Affinity__V1__PageSlot *ps = r->slots[i];
        serve_req *sr = &st->slot_reqs[i];
        filter_from_pb(ps->filter, &sr->filter);
        if (!rules_from_pb(ps->rules, sr)) {
            transport__fail(c, AFF_ENOMEM, "out of memory preparing the page");
            return;
        }
        st->slots[i] = (pipeline_slot){.name = ps->name,
                                       .collection = ps->collection,
                                       .k = ps->k,
                                       .filter = &sr->filter,
                                       .preset = ps->preset,
                                       .rules = sr->req.rules};
    }
    if (r->n_slots > PIPELINE_MAX_SLOTS) st->req.n_slots = (uint32_t)r->n_slots; /* refused */
    for (size_t i = 0; i < r->n_exclude_event_types; i++)
        st->exclude_types[i] = (int)r->exclude_event_types[i];
    st->req.user_id = r->user_id;
    st->req.slots = st->slots;
    st->req.layout = r->layout;
    st->req.surface = r->surface;
    st->req.exclude_event_types = st->exclude_types;
    st->req.n_exclude_event_types = (uint32_t)r->n_exclude_event_types;
    aff_err err;
    bool pending;
    pipeline_page *page;
    tcall_ref(c);
    if (pipeline_page_start(c->t->cfg.pipeline, &st->req, tcall_deadline_ns(c), page_done, c, &page,
                            &pending, &err)) {
        tcall_unref(c);
        tcall_fail(c, &err);
        return;
    }
    if (pending) return; /* page_done answers (perhaps already has) */
    st->page = page;
    page_respond(c, page);
    tcall_unref(c);
}

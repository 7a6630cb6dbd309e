/*
 * test_server_model.c: learning end to end, a real affinityd through gRPC: a learned-only
 * collection (dimension 0) with planted taste groups, Train in the background, Recommend by
 * the folded-in user factor (equal to a re-solve of that user computed here from the model's
 * item factors), filters and exclusions in the behaviour space, SimilarItems and Rerank by
 * learned affinity, segments, a model swap under concurrent Recommend calls, a restart that
 * serves identical answers, and bad input that changes nothing.
 */
#include <criterion/criterion.h>

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "als.h"
#include "server_helpers.h"

#define TS_FAILED_PRECONDITION 9
#define GROUPS                 3
#define PER_GROUP              20
#define N_ITEMS                (GROUPS * PER_GROUP)
#define N_USERS                36

static char item_ids[N_ITEMS][16];
static char categories[GROUPS][8];

static int group_of(const char *id)
{
    return atoi(id + 1) % GROUPS;
}

/* fold_in_history: the --fold-in-history flag's value (NULL: the default). */
static void start_with(test_server *s, const char *data_dir, const char *fold_in_history)
{
    const char *args[] = {"--data-dir",         data_dir, "--log-level",       "warn",
                          "--train-interval-s", "0",      "--fold-in-history", fold_in_history,
                          NULL};
    if (!fold_in_history) args[6] = NULL;
    if (ts_start(s, NULL, args) != 0 || !ts_wait_serving(s, NULL)) {
        ts_dump_log(s);
        cr_assert_fail("affinityd did not start");
    }
}

static void start_on(test_server *s, const char *data_dir)
{
    start_with(s, data_dir, NULL);
}

/* A collection with content vectors of dim (0: learned-only) and a model of `factors`. */
static int create_shop(transport_client *cl, const char *name, uint32_t dim, uint32_t factors,
                       transport_call_status *st)
{
    Affinity__V1__ModelParams mp = AFFINITY__V1__MODEL_PARAMS__INIT;
    mp.factors = factors;
    mp.epochs = 10;
    Affinity__V1__CreateCollectionRequest cr = AFFINITY__V1__CREATE_COLLECTION_REQUEST__INIT;
    cr.name = (char *)name;
    cr.dimension = dim;
    cr.model = &mp;
    Affinity__V1__CreateCollectionResponse *resp = NULL;
    int code = ts_call(cl, TRANSPORT_METHOD_CREATE_COLLECTION, &cr,
                       &affinity__v1__create_collection_response__descriptor, 0, &resp, st);
    transport_client_free((ProtobufCMessage *)resp);
    return code;
}

/* Sends one UpsertItems stream of n items; returns its status code. */
static int upsert_stream(transport_client *cl, const char *name, Affinity__V1__Item **ptrs,
                         size_t n)
{
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0);
    Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    req.collection = (char *)name;
    req.n_items = n;
    req.items = ptrs;
    transport_client_stream_send(s, &req.base, &err);
    transport_call_status st;
    ProtobufCMessage *resp = NULL;
    transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor, &resp, &st);
    transport_client_free((ProtobufCMessage *)resp);
    transport_client_stream_destroy(s);
    return st.code;
}

/* Items "i0".."i59"; item i is in category "g<i % 3>". vectors: N_ITEMS x 4 content vectors,
 * or NULL for none. */
static int upsert_items(transport_client *cl, const char *name, float *vectors)
{
    Affinity__V1__Item items[N_ITEMS];
    Affinity__V1__Item *ptrs[N_ITEMS];
    for (int i = 0; i < N_ITEMS; i++) {
        snprintf(item_ids[i], sizeof item_ids[i], "i%d", i);
        affinity__v1__item__init(&items[i]);
        items[i].id = item_ids[i];
        items[i].category = categories[i % GROUPS];
        items[i].price = (float)i;
        if (vectors) {
            items[i].n_vector = 4;
            items[i].vector = vectors + (size_t)i * 4;
        }
        ptrs[i] = &items[i];
    }
    return upsert_stream(cl, name, ptrs, N_ITEMS);
}

/* Views of n items of group g by user, chosen by a seeded walk, at time at_ms (0: now). */
static void put_views_at(transport_client *cl, const char *name, const char *user, int g, int n,
                         int offset, int64_t at_ms)
{
    Affinity__V1__Event ev[PER_GROUP];
    Affinity__V1__Event *ptrs[PER_GROUP];
    for (int k = 0; k < n; k++) {
        affinity__v1__event__init(&ev[k]);
        ev[k].item_id = item_ids[((offset + k * 7) % PER_GROUP) * GROUPS + g];
        ev[k].type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW;
        ev[k].timestamp_ms = at_ms;
        ptrs[k] = &ev[k];
    }
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = (char *)name;
    req.user_id = (char *)user;
    req.n_events = (size_t)n;
    req.events = ptrs;
    Affinity__V1__PutEventsResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_PUT_EVENTS, &req,
                         &affinity__v1__put_events_response__descriptor, 0, &resp, &st),
                 TS_OK, "%s", st.message);
    cr_assert_eq(resp->applied_count, (uint32_t)n);
    transport_client_free((ProtobufCMessage *)resp);
}

static void put_views(transport_client *cl, const char *name, const char *user, int g, int n,
                      int offset)
{
    put_views_at(cl, name, user, g, n, offset, 0);
}

static void seed_users(transport_client *cl, const char *name)
{
    char user[16];
    for (int u = 0; u < N_USERS; u++) {
        snprintf(user, sizeof user, "u%d", u);
        put_views(cl, name, user, u % GROUPS, 8, u);
    }
}

static Affinity__V1__ModelInfo *get_model(transport_client *cl, const char *name)
{
    Affinity__V1__GetModelRequest req = AFFINITY__V1__GET_MODEL_REQUEST__INIT;
    req.collection = (char *)name;
    Affinity__V1__ModelInfo *m = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_MODEL, &req,
                         &affinity__v1__model_info__descriptor, 0, &m, &st),
                 TS_OK, "%s", st.message);
    return m;
}

static int train(transport_client *cl, const char *name, const Affinity__V1__ModelParams *params,
                 transport_call_status *st, uint64_t *job)
{
    Affinity__V1__TrainRequest req = AFFINITY__V1__TRAIN_REQUEST__INIT;
    req.collection = (char *)name;
    req.params = (Affinity__V1__ModelParams *)params;
    Affinity__V1__TrainResponse *resp = NULL;
    int code = ts_call(cl, TRANSPORT_METHOD_TRAIN, &req, &affinity__v1__train_response__descriptor,
                       0, &resp, st);
    if (code == TS_OK && job) *job = resp->job_id;
    transport_client_free((ProtobufCMessage *)resp);
    return code;
}

/* Trains and waits until the job is over; returns the model's version. */
static uint64_t train_and_wait(transport_client *cl, const char *name)
{
    transport_call_status st;
    uint64_t job = 0;
    cr_assert_eq(train(cl, name, NULL, &st, &job), TS_OK, "%s", st.message);
    cr_assert(job > 0);
    for (int i = 0; i < 600; i++) {
        Affinity__V1__ModelInfo *m = get_model(cl, name);
        bool done = m->job && m->job->id == job && !m->job->running;
        uint64_t version = m->version;
        bool ok = strcmp(m->state, "ready") == 0;
        char error[256];
        snprintf(error, sizeof error, "%s", m->job ? m->job->error : "");
        transport_client_free((ProtobufCMessage *)m);
        if (done) {
            cr_assert(ok && error[0] == '\0', "training failed: %s", error);
            return version;
        }
        usleep(50000);
    }
    cr_assert_fail("training did not finish in 30 s");
    return 0;
}

static Affinity__V1__RecommendResponse *recommend(transport_client *cl, const char *name,
                                                  const char *user, uint32_t k,
                                                  const char *category, bool exclude_views)
{
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    req.collection = (char *)name;
    req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
    req.user_id = (char *)user;
    req.k = k;
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    char *cats[1] = {(char *)category};
    if (category) {
        f.n_categories = 1;
        f.categories = cats;
        req.filter = &f;
    }
    Affinity__V1__EventType views[1] = {AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW};
    if (exclude_views) {
        req.n_exclude_event_types = 1;
        req.exclude_event_types = views;
    }
    Affinity__V1__RecommendResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RECOMMEND, &req,
                         &affinity__v1__recommend_response__descriptor, 0, &resp, &st),
                 TS_OK, "%s", st.message);
    return resp;
}

/* GetItems of "shop" with the behaviour-space vectors; the caller frees the response. */
static Affinity__V1__GetItemsResponse *behaviour_items(transport_client *cl, char **ids, size_t n)
{
    Affinity__V1__GetItemsRequest gr = AFFINITY__V1__GET_ITEMS_REQUEST__INIT;
    gr.collection = "shop";
    gr.n_ids = n;
    gr.ids = ids;
    gr.include_vectors = true;
    gr.space = AFFINITY__V1__SPACE__SPACE_BEHAVIOUR;
    Affinity__V1__GetItemsResponse *items = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_ITEMS, &gr,
                         &affinity__v1__get_items_response__descriptor, 0, &items, &st),
                 TS_OK, "%s", st.message);
    return items;
}

static void init_names(void)
{
    for (int g = 0; g < GROUPS; g++)
        snprintf(categories[g], sizeof categories[g], "g%d", g);
}

/* A server on a fresh data dir (path into dir) with the learned-only collection "shop", its
 * items and the seeded shoppers' events, trained once; returns the model's version. */
static uint64_t start_trained_shop(char *dir, size_t dir_size, const char *what, test_server *s,
                                   transport_client **cl)
{
    init_names();
    ts_make_dir(dir, dir_size, what);
    start_on(s, dir);
    *cl = ts_client(s, NULL);
    transport_call_status st;
    cr_assert_eq(create_shop(*cl, "shop", 0, 8, &st), TS_OK, "%s", st.message);
    cr_assert_eq(upsert_items(*cl, "shop", NULL), TS_OK);
    seed_users(*cl, "shop");
    return train_and_wait(*cl, "shop");
}

Test(server_model, learns_taste_groups_and_folds_in_new_users)
{
    char dir[256];
    test_server s;
    transport_client *cl;
    uint64_t version = start_trained_shop(dir, sizeof dir, "model", &s, &cl);
    transport_call_status st;
    cr_assert(version >= 1);

    Affinity__V1__DescribeCollectionRequest dr = AFFINITY__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
    dr.name = "shop";
    Affinity__V1__CollectionInfo *info = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DESCRIBE_COLLECTION, &dr,
                         &affinity__v1__collection_info__descriptor, 0, &info, &st),
                 TS_OK);
    cr_assert_eq(info->dimension, 0);
    cr_assert_eq(info->n_spaces, 1);
    cr_assert_str_eq(info->spaces[0], "behaviour");
    cr_assert(info->model && strcmp(info->model->state, "ready") == 0);
    cr_assert_eq(info->model->users, N_USERS);
    cr_assert_eq(info->model->items, N_ITEMS);
    cr_assert_eq(info->model->params->factors, 8);
    transport_client_free((ProtobufCMessage *)info);

    /* A new shopper who viewed three items of group 1 gets group 1, from the model. */
    put_views(cl, "shop", "newcomer", 1, 3, 0);
    Affinity__V1__RecommendResponse *r = recommend(cl, "shop", "newcomer", 5, NULL, true);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_MODEL);
    cr_assert_eq(r->n_hits, 5);
    for (size_t i = 0; i < r->n_hits; i++)
        cr_assert_eq(group_of(r->hits[i]->id), 1, "hit %zu is %s", i, r->hits[i]->id);

    /* Fold-in equals a re-solve of that user against the model's item factors. */
    char *ids[N_ITEMS];
    for (int i = 0; i < N_ITEMS; i++)
        ids[i] = item_ids[i];
    Affinity__V1__GetItemsResponse *items = behaviour_items(cl, ids, N_ITEMS);
    cr_assert_eq(items->n_items, N_ITEMS);
    static float factors[N_ITEMS * 8];
    for (size_t i = 0; i < items->n_items; i++) {
        cr_assert_eq(items->items[i]->n_vector, 8);
        memcpy(factors + i * 8, items->items[i]->vector, 8 * sizeof(float));
    }
    transport_client_free((ProtobufCMessage *)items);
    Affinity__V1__ModelInfo *m = get_model(cl, "shop");
    als_params p;
    als_params_init(&p);
    p.factors = 8;
    p.lambda = m->params->lambda->value;
    p.alpha0 = m->params->alpha0->value;
    p.nu = m->params->nu->value;
    transport_client_free((ProtobufCMessage *)m);
    float gram[64], x[8], conf[3] = {1, 1, 1};
    uint32_t idx[3];
    for (int k = 0; k < 3; k++)
        idx[k] = (uint32_t)(((k * 7) % PER_GROUP) * GROUPS + 1);
    als_gramian(factors, N_ITEMS, 8, gram);
    float *scratch = malloc(als_solve_scratch_floats(8) * sizeof(float));
    cr_assert(als_solve_row(factors, gram, 8, N_ITEMS, &p, idx, conf, 3, x, scratch));
    free(scratch);
    for (size_t i = 0; i < r->n_hits; i++) {
        int row = atoi(r->hits[i]->id + 1);
        float score = 0;
        for (int j = 0; j < 8; j++)
            score += x[j] * factors[row * 8 + j];
        cr_assert(fabsf(score - r->hits[i]->score) <= 1e-4f + 1e-3f * fabsf(score),
                  "hit %s: server %g, re-solve %g", r->hits[i]->id, r->hits[i]->score, score);
    }
    transport_client_free((ProtobufCMessage *)r);

    /* Read-your-writes: an unknown shopper gets popular items, and right after their first
     * events (group 2) the model's answer for them. */
    r = recommend(cl, "shop", "switcher", 3, NULL, true);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY);
    transport_client_free((ProtobufCMessage *)r);
    put_views(cl, "shop", "switcher", 2, 4, 3);
    r = recommend(cl, "shop", "switcher", 3, NULL, true);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_MODEL);
    for (size_t i = 0; i < r->n_hits; i++)
        cr_assert_eq(group_of(r->hits[i]->id), 2, "hit %zu is %s", i, r->hits[i]->id);
    transport_client_free((ProtobufCMessage *)r);

    /* Filters and exclusions apply in the behaviour space. */
    r = recommend(cl, "shop", "newcomer", 20, "g0", true);
    cr_assert(r->n_hits > 0);
    for (size_t i = 0; i < r->n_hits; i++)
        cr_assert_eq(group_of(r->hits[i]->id), 0);
    transport_client_free((ProtobufCMessage *)r);
    r = recommend(cl, "shop", "u0", N_ITEMS, NULL, true);
    cr_assert_eq(r->n_hits, N_ITEMS - 8, "the 8 viewed items are excluded");
    transport_client_free((ProtobufCMessage *)r);

    /* SimilarItems in the behaviour space: "shoppers who liked this also liked". */
    Affinity__V1__SimilarItemsRequest sr = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
    char *one[1] = {item_ids[4]}; /* group 1 */
    sr.collection = "shop";
    sr.n_item_ids = 1;
    sr.item_ids = one;
    sr.k = 5;
    Affinity__V1__SimilarItemsResponse *sim = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SIMILAR_ITEMS, &sr,
                         &affinity__v1__similar_items_response__descriptor, 0, &sim, &st),
                 TS_OK, "%s", st.message);
    cr_assert_eq(sim->results[0]->n_hits, 5);
    for (size_t i = 0; i < 5; i++) {
        cr_assert_eq(group_of(sim->results[0]->hits[i]->id), 1);
        cr_assert_str_neq(sim->results[0]->hits[i]->id, item_ids[4]);
    }
    transport_client_free((ProtobufCMessage *)sim);

    /* Segments: the shoppers most drawn to a group-2 item are group-2 shoppers. */
    Affinity__V1__GetSegmentRequest seg = AFFINITY__V1__GET_SEGMENT_REQUEST__INIT;
    char *sitem[1] = {item_ids[5]};
    seg.collection = "shop";
    seg.n_item_ids = 1;
    seg.item_ids = sitem;
    seg.k = 6;
    Affinity__V1__GetSegmentResponse *sg = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_SEGMENT, &seg,
                         &affinity__v1__get_segment_response__descriptor, 0, &sg, &st),
                 TS_OK, "%s", st.message);
    cr_assert_eq(sg->n_users, 6);
    for (size_t i = 0; i < sg->n_users; i++)
        cr_assert_eq(atoi(sg->users[i]->user_id + 1) % GROUPS, 2, "%s", sg->users[i]->user_id);
    transport_client_free((ProtobufCMessage *)sg);

    /* Rerank by the learned affinity: the group-2 candidate first for a group-2 shopper. */
    Affinity__V1__RerankCandidate cand[3];
    Affinity__V1__RerankCandidate *cp[3];
    const int pick[3] = {0, 1, 2};
    for (int i = 0; i < 3; i++) {
        affinity__v1__rerank_candidate__init(&cand[i]);
        cand[i].id = item_ids[30 + pick[i]];
        cp[i] = &cand[i];
    }
    Affinity__V1__FloatValue w = AFFINITY__V1__FLOAT_VALUE__INIT;
    w.value = 1.0f;
    Affinity__V1__RerankRequest rr = AFFINITY__V1__RERANK_REQUEST__INIT;
    rr.collection = "shop";
    rr.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_ID;
    rr.user_id = "switcher";
    rr.n_candidates = 3;
    rr.candidates = cp;
    rr.affinity_weight = &w;
    Affinity__V1__RerankResponse *rres = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RERANK, &rr,
                         &affinity__v1__rerank_response__descriptor, 0, &rres, &st),
                 TS_OK, "%s", st.message);
    cr_assert_eq(rres->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_MODEL);
    cr_assert_eq(group_of(rres->items[0]->id), 2, "%s first", rres->items[0]->id);
    transport_client_free((ProtobufCMessage *)rres);

    /* A restart serves the same model and the same answers. */
    Affinity__V1__RecommendResponse *before = recommend(cl, "shop", "newcomer", 10, NULL, false);
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    start_on(&s, dir);
    cl = ts_client(&s, NULL);
    m = get_model(cl, "shop");
    cr_assert_eq(m->version, version);
    transport_client_free((ProtobufCMessage *)m);
    Affinity__V1__RecommendResponse *after = recommend(cl, "shop", "newcomer", 10, NULL, false);
    cr_assert_eq(after->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_MODEL);
    cr_assert_eq(after->n_hits, before->n_hits);
    for (size_t i = 0; i < after->n_hits; i++) {
        cr_assert_str_eq(after->hits[i]->id, before->hits[i]->id);
        /* Confidences decay with time (half-life 14 days): seconds apart, scores agree to
         * about 1e-6. */
        cr_assert(fabsf(after->hits[i]->score - before->hits[i]->score) <=
                      1e-5f * fabsf(before->hits[i]->score) + 1e-6f,
                  "%s: %g then %g", after->hits[i]->id, before->hits[i]->score,
                  after->hits[i]->score);
    }
    transport_client_free((ProtobufCMessage *)before);
    transport_client_free((ProtobufCMessage *)after);
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    ts_remove_path(dir);
}

typedef struct hammer {
    const test_server *s;
    atomic_bool stop;
    atomic_int calls, errors, not_model;
} hammer;

static void *hammer_main(void *arg)
{
    hammer *h = arg;
    transport_client *cl = ts_client(h->s, NULL);
    while (!atomic_load(&h->stop)) {
        Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
        req.collection = "shop";
        req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
        req.user_id = "u1";
        req.k = 10;
        Affinity__V1__RecommendResponse *resp = NULL;
        transport_call_status st;
        int code = ts_call(cl, TRANSPORT_METHOD_RECOMMEND, &req,
                           &affinity__v1__recommend_response__descriptor, 0, &resp, &st);
        atomic_fetch_add(&h->calls, 1);
        if (code != TS_OK) {
            atomic_fetch_add(&h->errors, 1);
            fprintf(stderr, "Recommend failed during a swap: %d %s\n", code, st.message);
        } else {
            if (resp->source != AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_MODEL ||
                resp->n_hits != 10)
                atomic_fetch_add(&h->not_model, 1);
            for (size_t i = 1; i < resp->n_hits; i++)
                if (resp->hits[i]->score > resp->hits[i - 1]->score)
                    atomic_fetch_add(&h->errors, 1);
            transport_client_free((ProtobufCMessage *)resp);
        }
    }
    transport_client_destroy(cl);
    return NULL;
}

Test(server_model, model_swaps_under_concurrent_recommend_never_error)
{
    char dir[256];
    test_server s;
    transport_client *cl;
    uint64_t v1 = start_trained_shop(dir, sizeof dir, "swap", &s, &cl);
    hammer h = {.s = &s};
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, hammer_main, &h);
    uint64_t v = v1;
    for (int round = 0; round < 4; round++) {
        uint64_t nv = train_and_wait(cl, "shop");
        cr_assert(nv > v, "version %llu after %llu", (unsigned long long)nv, (unsigned long long)v);
        v = nv;
    }
    atomic_store(&h.stop, true);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    cr_assert(atomic_load(&h.calls) > 0);
    cr_assert_eq(atomic_load(&h.errors), 0, "%d of %d calls failed or were unsorted",
                 atomic_load(&h.errors), atomic_load(&h.calls));
    cr_assert_eq(atomic_load(&h.not_model), 0);
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    ts_remove_path(dir);
}

Test(server_model, bad_input_gets_a_clear_error_and_changes_nothing)
{
    init_names();
    char dir[256];
    ts_make_dir(dir, sizeof dir, "modelbad");
    test_server s;
    start_on(&s, dir);
    transport_client *cl = ts_client(&s, NULL);
    transport_call_status st;

    /* Model parameters out of range, at creation: nothing is created. */
    cr_assert_eq(create_shop(cl, "bad", 0, 1000, &st), TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "model.factors"), "%s", st.message);
    Affinity__V1__DescribeCollectionRequest dr = AFFINITY__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
    dr.name = "bad";
    Affinity__V1__CollectionInfo *info = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DESCRIBE_COLLECTION, &dr,
                         &affinity__v1__collection_info__descriptor, 0, &info, &st),
                 TS_NOT_FOUND);

    cr_assert_eq(create_shop(cl, "shop", 0, 8, &st), TS_OK, "%s", st.message);
    /* A learned-only collection takes no vectors, and has no content space to search. */
    static float ones[N_ITEMS * 4];
    for (int i = 0; i < N_ITEMS * 4; i++)
        ones[i] = 1.0f;
    cr_assert_eq(upsert_items(cl, "shop", ones), TS_INVALID_ARGUMENT);
    cr_assert_eq(upsert_items(cl, "shop", NULL), TS_OK);
    float q[1] = {1};
    Affinity__V1__Query query = AFFINITY__V1__QUERY__INIT;
    query.n_vector = 1;
    query.vector = q;
    Affinity__V1__Query *qp[1] = {&query};
    Affinity__V1__SearchRequest sr = AFFINITY__V1__SEARCH_REQUEST__INIT;
    sr.collection = "shop";
    sr.n_queries = 1;
    sr.queries = qp;
    sr.k = 3;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SEARCH, &sr,
                         &affinity__v1__search_response__descriptor, 0, NULL, &st),
                 TS_FAILED_PRECONDITION, "%s", st.message);

    /* Training with no events; unknown collection; parameters out of range. */
    cr_assert_eq(train(cl, "shop", NULL, &st, NULL), TS_FAILED_PRECONDITION, "%s", st.message);
    cr_assert(strstr(st.message, "no events"), "%s", st.message);
    cr_assert_eq(train(cl, "nope", NULL, &st, NULL), TS_NOT_FOUND, "%s", st.message);
    seed_users(cl, "shop");
    Affinity__V1__ModelParams mp = AFFINITY__V1__MODEL_PARAMS__INIT;
    mp.factors = 3;
    cr_assert_eq(train(cl, "shop", &mp, &st, NULL), TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "params.factors"), "%s", st.message);
    Affinity__V1__FloatValue neg = AFFINITY__V1__FLOAT_VALUE__INIT;
    neg.value = -1;
    mp.factors = 0;
    mp.alpha0 = &neg;
    cr_assert_eq(train(cl, "shop", &mp, &st, NULL), TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "params.alpha0"), "%s", st.message);
    Affinity__V1__ModelInfo *m = get_model(cl, "shop");
    cr_assert_str_eq(m->state, "none", "a refused Train starts nothing");
    cr_assert(m->job == NULL);
    transport_client_free((ProtobufCMessage *)m);

    /* The behaviour space before any model: FAILED_PRECONDITION; Recommend falls back. */
    Affinity__V1__SimilarItemsRequest sim = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
    char *one[1] = {item_ids[0]};
    sim.collection = "shop";
    sim.n_item_ids = 1;
    sim.item_ids = one;
    sim.k = 3;
    sim.space = AFFINITY__V1__SPACE__SPACE_BEHAVIOUR;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SIMILAR_ITEMS, &sim,
                         &affinity__v1__similar_items_response__descriptor, 0, NULL, &st),
                 TS_FAILED_PRECONDITION, "%s", st.message);
    Affinity__V1__RecommendResponse *r = recommend(cl, "shop", "u1", 3, NULL, false);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY);
    transport_client_free((ProtobufCMessage *)r);
    Affinity__V1__GetSegmentRequest seg = AFFINITY__V1__GET_SEGMENT_REQUEST__INIT;
    seg.collection = "shop";
    seg.n_item_ids = 1;
    seg.item_ids = one;
    seg.k = 3;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_SEGMENT, &seg,
                         &affinity__v1__get_segment_response__descriptor, 0, NULL, &st),
                 TS_FAILED_PRECONDITION, "%s", st.message);
    seg.k = 0;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_SEGMENT, &seg,
                         &affinity__v1__get_segment_response__descriptor, 0, NULL, &st),
                 TS_INVALID_ARGUMENT, "%s", st.message);
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    ts_remove_path(dir);
}

/* Content vectors of 4: item i sits on its group's axis (i % 3) with an item-specific
 * wobble on the fourth. */
static void content_vector(int i, float *v)
{
    for (int k = 0; k < 4; k++)
        v[k] = 0.0f;
    v[i % GROUPS] = 1.0f;
    v[3] = 0.05f * (float)((i * 37) % 11) / 11.0f;
}

static bool has_hit(const Affinity__V1__RecommendResponse *r, const char *id)
{
    for (size_t i = 0; i < r->n_hits; i++)
        if (strcmp(r->hits[i]->id, id) == 0) return true;
    return false;
}

/* Items that have content vectors and no events yet are placed in the behaviour space by the
 * content -> factor map fitted at training: a new group-1 item is recommended at once to a
 * group-1 shopper (among the group's unseen items) and not to a group-0 shopper, and its
 * learned-space neighbours are group-1 items. The map is refitted on restart. */
Test(server_model, a_new_item_with_content_is_recommendable_at_once)
{
    char dir[256];
    test_server s;
    transport_client *cl;
    init_names();
    ts_make_dir(dir, sizeof dir, "model-map");
    start_on(&s, dir);
    cl = ts_client(&s, NULL);
    transport_call_status st;
    cr_assert_eq(create_shop(cl, "shop", 4, 8, &st), TS_OK, "%s", st.message);
    static float vecs[N_ITEMS * 4];
    for (int i = 0; i < N_ITEMS; i++)
        content_vector(i, vecs + i * 4);
    cr_assert_eq(upsert_items(cl, "shop", vecs), TS_OK);
    seed_users(cl, "shop");
    train_and_wait(cl, "shop");

    /* Before it exists, "fresh" is in no answer; after the upsert (no events, no training),
     * it is. */
    float fv[4];
    content_vector(1, fv);
    fv[3] = 0.02f;
    Affinity__V1__Item fresh = AFFINITY__V1__ITEM__INIT;
    fresh.id = "fresh";
    fresh.category = categories[1];
    fresh.n_vector = 4;
    fresh.vector = fv;
    Affinity__V1__Item *fp[1] = {&fresh};
    cr_assert_eq(upsert_stream(cl, "shop", fp, 1), TS_OK);

    for (int round = 0; round < 2; round++) {
        /* u1 (group 1): "fresh" ranks among the 5 best, behind group-1 items only. */
        Affinity__V1__RecommendResponse *r = recommend(cl, "shop", "u1", 5, NULL, true);
        cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_MODEL);
        cr_assert_eq(r->n_hits, 5);
        cr_assert(has_hit(r, "fresh"), "round %d: \"fresh\" is not among u1's 5 best", round);
        for (size_t i = 0; i < r->n_hits && strcmp(r->hits[i]->id, "fresh") != 0; i++)
            cr_assert_eq(group_of(r->hits[i]->id), 1, "round %d: hit %zu is %s", round, i,
                         r->hits[i]->id);
        transport_client_free((ProtobufCMessage *)r);
        r = recommend(cl, "shop", "u0", 12, NULL, true);
        cr_assert(!has_hit(r, "fresh"), "round %d: a group-0 shopper got \"fresh\"", round);
        transport_client_free((ProtobufCMessage *)r);

        /* Its behaviour-space vector exists (8 factors) and its neighbours are group 1. */
        Affinity__V1__SimilarItemsRequest sr = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
        char *one[1] = {"fresh"};
        sr.collection = "shop";
        sr.n_item_ids = 1;
        sr.item_ids = one;
        sr.k = 5;
        sr.space = AFFINITY__V1__SPACE__SPACE_BEHAVIOUR;
        Affinity__V1__SimilarItemsResponse *sim = NULL;
        cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SIMILAR_ITEMS, &sr,
                             &affinity__v1__similar_items_response__descriptor, 0, &sim, &st),
                     TS_OK, "%s", st.message);
        cr_assert_eq(sim->results[0]->n_hits, 5);
        for (size_t i = 0; i < 5; i++)
            cr_assert_eq(group_of(sim->results[0]->hits[i]->id), 1, "neighbour %s",
                         sim->results[0]->hits[i]->id);
        transport_client_free((ProtobufCMessage *)sim);
        Affinity__V1__GetItemsResponse *items = behaviour_items(cl, one, 1);
        cr_assert_eq(items->n_items, 1);
        cr_assert_eq(items->items[0]->n_vector, 8);
        transport_client_free((ProtobufCMessage *)items);

        if (round == 0) { /* the same after a restart: the map is refitted at load */
            transport_client_destroy(cl);
            cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
            start_on(&s, dir);
            cl = ts_client(&s, NULL);
        }
    }
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    ts_remove_path(dir);
}

/* --fold-in-history 3: a shopper who viewed five group-0 items two hours ago and three group-2
 * items an hour ago is folded in from the three most recent items only, so every
 * recommendation is group 2 (with the whole history group 0 wins: this test fails without the
 * flag); a shopper with the same views in the opposite order gets group 0. */
Test(server_model, fold_in_reads_only_the_most_recent_history)
{
    char dir[256];
    test_server s;
    init_names();
    ts_make_dir(dir, sizeof dir, "model-recent");
    start_with(&s, dir, "3");
    transport_client *cl = ts_client(&s, NULL);
    transport_call_status st;
    cr_assert_eq(create_shop(cl, "shop", 0, 8, &st), TS_OK, "%s", st.message);
    cr_assert_eq(upsert_items(cl, "shop", NULL), TS_OK);
    seed_users(cl, "shop");
    train_and_wait(cl, "shop");
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    const int64_t now_ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
    put_views_at(cl, "shop", "mover", 0, 5, 0, now_ms - 7200000);
    put_views_at(cl, "shop", "mover", 2, 3, 0, now_ms - 3600000);
    put_views_at(cl, "shop", "stayer", 2, 3, 0, now_ms - 7200000);
    put_views_at(cl, "shop", "stayer", 0, 5, 0, now_ms - 3600000);
    Affinity__V1__RecommendResponse *r = recommend(cl, "shop", "mover", 5, NULL, true);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_MODEL);
    cr_assert_eq(r->n_hits, 5);
    for (size_t i = 0; i < r->n_hits; i++)
        cr_assert_eq(group_of(r->hits[i]->id), 2, "mover's hit %zu is %s", i, r->hits[i]->id);
    transport_client_free((ProtobufCMessage *)r);
    r = recommend(cl, "shop", "stayer", 5, NULL, true);
    for (size_t i = 0; i < r->n_hits; i++)
        cr_assert_eq(group_of(r->hits[i]->id), 0, "stayer's hit %zu is %s", i, r->hits[i]->id);
    transport_client_free((ProtobufCMessage *)r);
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    ts_remove_path(dir);
}

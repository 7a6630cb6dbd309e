/*
 * test_server.c: end-to-end tests of every affinity.v1 RPC against a real affinityd on a
 * loopback port, called with the real C client. Results are checked against a brute-force
 * reference computed here on the same data; every status code comes from a real bad request.
 */
#include <criterion/criterion.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server_helpers.h"

#define N_ITEMS 3000
#define DIM     16
#define N_CATS  5

/* ---- the reference catalog ---------------------------------------------------------------- */

typedef struct catalog {
    float vec[N_ITEMS][DIM];
    char id[N_ITEMS][16];
    char cat[N_ITEMS][8];
    const char *tag[N_ITEMS];
    float price[N_ITEMS];
    bool available[N_ITEMS];
} catalog;

static catalog cat_data;

static void catalog_build(catalog *c, uint64_t seed)
{
    for (int i = 0; i < N_ITEMS; i++) {
        for (int j = 0; j < DIM; j++)
            c->vec[i][j] = ts_randf(&seed);
        snprintf(c->id[i], sizeof c->id[i], "item-%04d", i);
        snprintf(c->cat[i], sizeof c->cat[i], "cat%d", i % N_CATS);
        c->tag[i] = i % 3 == 0 ? "red" : i % 3 == 1 ? "blue" : "green";
        c->price[i] = (float)(i % 100);
        c->available[i] = i % 7 != 0;
    }
}

/* Streams the catalog into `collection` in batches of 500 items. */
static void catalog_upsert(transport_client *cl, const char *collection, const catalog *c)
{
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0,
                 "%s", err.msg);
    static Affinity__V1__Item items[500];
    static Affinity__V1__Item *ptrs[500];
    static char *tags[500][1];
    for (int base = 0; base < N_ITEMS; base += 500) {
        Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
        req.collection = base == 0 ? (char *)collection : (char *)"";
        for (int i = 0; i < 500; i++) {
            int g = base + i;
            affinity__v1__item__init(&items[i]);
            items[i].id = (char *)c->id[g];
            items[i].n_vector = DIM;
            items[i].vector = (float *)c->vec[g];
            items[i].category = (char *)c->cat[g];
            tags[i][0] = (char *)c->tag[g];
            items[i].n_tags = 1;
            items[i].tags = tags[i];
            items[i].price = c->price[g];
            items[i].available = c->available[g];
            items[i].available_set = true;
            ptrs[i] = &items[i];
        }
        req.n_items = 500;
        req.items = ptrs;
        cr_assert_eq(transport_client_stream_send(s, &req.base, &err), 0, "%s", err.msg);
    }
    Affinity__V1__UpsertItemsResponse *resp = NULL;
    transport_call_status st;
    int rc = transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                            (ProtobufCMessage **)&resp, &st);
    cr_assert_eq(rc, 0, "UpsertItems: %d %s", st.code, st.message);
    cr_assert_eq(resp->upserted_count, N_ITEMS);
    transport_client_free(&resp->base);
    transport_client_stream_destroy(s);
}

typedef struct ref_filter {
    const char *category; /* NULL: any */
    const char *tag;      /* NULL: any */
    float price_min, price_max;
    bool available_only;
    int exclude; /* item index or -1 */
} ref_filter;

static bool ref_match(const catalog *c, int i, const ref_filter *f)
{
    if (!f) return true;
    if (f->category && strcmp(c->cat[i], f->category) != 0) return false;
    if (f->tag && strcmp(c->tag[i], f->tag) != 0) return false;
    if (c->price[i] < f->price_min || c->price[i] > f->price_max) return false;
    if (f->available_only && !c->available[i]) return false;
    return i != f->exclude;
}

typedef struct ref_hit {
    int index;
    float score;
} ref_hit;

static float dot(const float *a, const float *b)
{
    float s = 0;
    for (int j = 0; j < DIM; j++)
        s += a[j] * b[j];
    return s;
}

/* Top-k by inner product, ties by lower index. Returns the number of hits. */
static int ref_search(const catalog *c, const float *q, int k, const ref_filter *f, ref_hit *out)
{
    int n = 0;
    for (int i = 0; i < N_ITEMS; i++) {
        if (!ref_match(c, i, f)) continue;
        ref_hit h = {i, dot(q, c->vec[i])};
        int pos = n < k ? n : k;
        while (pos > 0 && (out[pos - 1].score < h.score ||
                           (out[pos - 1].score == h.score && out[pos - 1].index > h.index))) {
            if (pos < k) out[pos] = out[pos - 1];
            pos--;
        }
        if (pos < k) {
            out[pos] = h;
            if (n < k) n++;
        }
    }
    return n;
}

/* Hits from the server equal the reference: same scores in order; ids equal where scores
 * are distinct (on ties either order is acceptable). */
static void expect_hits(Affinity__V1__Hit **hits, size_t n_hits, const ref_hit *ref, int n_ref,
                        const char *what)
{
    cr_assert_eq((int)n_hits, n_ref, "%s: %zu hits, expected %d", what, n_hits, n_ref);
    for (int i = 0; i < n_ref; i++) {
        float want = ref[i].score;
        cr_assert(fabsf(hits[i]->score - want) <= 1e-4f * (1 + fabsf(want)),
                  "%s: hit %d score %f, expected %f", what, i, hits[i]->score, want);
        bool tie =
            (i > 0 && ref[i - 1].score == want) || (i + 1 < n_ref && ref[i + 1].score == want);
        if (!tie) cr_assert_str_eq(hits[i]->id, cat_data.id[ref[i].index], "%s: hit %d", what, i);
    }
}

static test_server srv;
static transport_client *cl;

static void start_with_catalog(void)
{
    catalog_build(&cat_data, 42);
    static const char *const args[] = {"--max-message-bytes", "1048576", NULL};
    ts_start_serving(&srv, args);
    cl = ts_client(&srv, NULL);
    ts_create_collection(cl, "shop", DIM, AFFINITY__V1__METRIC__METRIC_INNER_PRODUCT);
    catalog_upsert(cl, "shop", &cat_data);
}

static void stop_server(void)
{
    transport_client_destroy(cl);
    cl = NULL;
    int code = ts_stop(&srv, SIGTERM, 60000);
    if (code != 0) ts_dump_log(&srv);
    cr_expect_eq(code, 0, "affinityd exited with %d", code);
}

/* ---- collections and catalog -------------------------------------------------------------- */

Test(server, collections_lifecycle, .init = start_with_catalog, .fini = stop_server)
{
    transport_call_status st;
    Affinity__V1__CreateCollectionRequest cr = AFFINITY__V1__CREATE_COLLECTION_REQUEST__INIT;
    cr.name = "banners";
    cr.dimension = 8;
    cr.metric = AFFINITY__V1__METRIC__METRIC_L2;
    Affinity__V1__CreateCollectionResponse *created = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_CREATE_COLLECTION, &cr,
                         &affinity__v1__create_collection_response__descriptor, 0, &created, &st),
                 0, "%s", st.message);
    cr_assert_str_eq(created->collection->name, "banners");
    cr_assert_eq(created->collection->dimension, 8);
    cr_assert_eq(created->collection->metric, AFFINITY__V1__METRIC__METRIC_L2);
    cr_assert_str_eq(created->collection->backend, "faiss-cpu");
    transport_client_free(&created->base);

    /* ALREADY_EXISTS */
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_CREATE_COLLECTION, &cr,
                         &affinity__v1__create_collection_response__descriptor, 0, NULL, &st),
                 TS_ALREADY_EXISTS, "%d %s", st.code, st.message);
    cr_assert(strstr(st.message, "banners"), "%s", st.message);

    Affinity__V1__ListCollectionsRequest lr = AFFINITY__V1__LIST_COLLECTIONS_REQUEST__INIT;
    Affinity__V1__ListCollectionsResponse *list = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_LIST_COLLECTIONS, &lr,
                         &affinity__v1__list_collections_response__descriptor, 0, &list, &st),
                 0);
    cr_assert_eq(list->n_collections, 2);
    cr_assert_str_eq(list->collections[0]->name, "banners");
    cr_assert_str_eq(list->collections[1]->name, "shop");
    cr_assert_eq(list->collections[1]->item_count, N_ITEMS);
    transport_client_free(&list->base);

    Affinity__V1__DescribeCollectionRequest dr = AFFINITY__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
    dr.name = "shop";
    Affinity__V1__CollectionInfo *info = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DESCRIBE_COLLECTION, &dr,
                         &affinity__v1__collection_info__descriptor, 0, &info, &st),
                 0);
    cr_assert_eq(info->item_count, N_ITEMS);
    cr_assert_eq(info->dimension, DIM);
    cr_assert_eq(info->metric, AFFINITY__V1__METRIC__METRIC_INNER_PRODUCT);
    cr_assert_gt(info->memory_bytes, (uint64_t)N_ITEMS * DIM * 4 - 1);
    transport_client_free(&info->base);

    Affinity__V1__DropCollectionRequest drop = AFFINITY__V1__DROP_COLLECTION_REQUEST__INIT;
    drop.name = "banners";
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DROP_COLLECTION, &drop,
                         &affinity__v1__drop_collection_response__descriptor, 0, NULL, &st),
                 0);
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DROP_COLLECTION, &drop,
                         &affinity__v1__drop_collection_response__descriptor, 0, NULL, &st),
                 TS_NOT_FOUND);
    dr.name = "banners";
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DESCRIBE_COLLECTION, &dr,
                         &affinity__v1__collection_info__descriptor, 0, NULL, &st),
                 TS_NOT_FOUND);
    cr_assert(strstr(st.message, "banners"), "%s", st.message);
}

Test(server, upsert_get_delete_items, .init = start_with_catalog, .fini = stop_server)
{
    transport_call_status st;
    char *ids[] = {"item-0005", "nope", "item-2999"};
    Affinity__V1__GetItemsRequest gr = AFFINITY__V1__GET_ITEMS_REQUEST__INIT;
    gr.collection = "shop";
    gr.n_ids = 3;
    gr.ids = ids;
    gr.include_vectors = true;
    Affinity__V1__GetItemsResponse *got = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_ITEMS, &gr,
                         &affinity__v1__get_items_response__descriptor, 0, &got, &st),
                 0, "%s", st.message);
    cr_assert_eq(got->n_items, 2);
    cr_assert_eq(got->n_missing_ids, 1);
    cr_assert_str_eq(got->missing_ids[0], "nope");
    cr_assert_str_eq(got->items[0]->id, "item-0005");
    cr_assert_str_eq(got->items[0]->category, cat_data.cat[5]);
    cr_assert_eq(got->items[0]->n_tags, 1);
    cr_assert_str_eq(got->items[0]->tags[0], cat_data.tag[5]);
    cr_assert_float_eq(got->items[0]->price, cat_data.price[5], 0);
    cr_assert_eq(got->items[0]->available, cat_data.available[5]);
    cr_assert_eq(got->items[1]->n_vector, DIM);
    for (int j = 0; j < DIM; j++)
        cr_assert_float_eq(got->items[1]->vector[j], cat_data.vec[2999][j], 1e-6);
    transport_client_free(&got->base);

    /* A bad batch in the middle of a stream: earlier batches stay applied. */
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0);
    float v[DIM] = {1}, bad[DIM - 1] = {1};
    Affinity__V1__Item it = AFFINITY__V1__ITEM__INIT, *itp = &it;
    it.id = "new-1";
    it.n_vector = DIM;
    it.vector = v;
    Affinity__V1__UpsertItemsRequest ur = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    ur.collection = "shop";
    ur.n_items = 1;
    ur.items = &itp;
    cr_assert_eq(transport_client_stream_send(s, &ur.base, &err), 0);
    Affinity__V1__Item it2 = AFFINITY__V1__ITEM__INIT, *itp2 = &it2;
    it2.id = "new-2";
    it2.n_vector = DIM - 1;
    it2.vector = bad;
    ur.items = &itp2;
    ur.collection = "";
    transport_client_stream_send(s, &ur.base, &err); /* may fail once the server has ended */
    int rc = transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                            NULL, &st);
    cr_assert_eq(rc, AFF_EINVAL);
    cr_assert_eq(st.code, TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "dimension") && strstr(st.message, "1 items applied"), "%s",
              st.message);
    transport_client_stream_destroy(s);

    char *del_ids[] = {"new-1", "item-0001", "nope"};
    Affinity__V1__DeleteItemsRequest del = AFFINITY__V1__DELETE_ITEMS_REQUEST__INIT;
    del.collection = "shop";
    del.n_ids = 3;
    del.ids = del_ids;
    Affinity__V1__DeleteItemsResponse *dresp = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DELETE_ITEMS, &del,
                         &affinity__v1__delete_items_response__descriptor, 0, &dresp, &st),
                 0, "%s", st.message);
    cr_assert_eq(dresp->deleted_count, 2);
    transport_client_free(&dresp->base);
    gr.n_ids = 1;
    gr.ids = &del_ids[1];
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_ITEMS, &gr,
                         &affinity__v1__get_items_response__descriptor, 0, &got, &st),
                 0);
    cr_assert_eq(got->n_items, 0);
    cr_assert_eq(got->n_missing_ids, 1);
    transport_client_free(&got->base);
}

/* ---- serving ------------------------------------------------------------------------------ */

Test(server, search_equals_brute_force, .init = start_with_catalog, .fini = stop_server)
{
    uint64_t seed = 7;
    float qv[4][DIM];
    for (int q = 0; q < 4; q++)
        for (int j = 0; j < DIM; j++)
            qv[q][j] = ts_randf(&seed);
    /* query 0: request defaults (k=10, no filter); 1: own k=3; 2: own filter; 3: k=1 */
    Affinity__V1__Query qs[4], *qp[4];
    for (int q = 0; q < 4; q++) {
        affinity__v1__query__init(&qs[q]);
        qs[q].n_vector = DIM;
        qs[q].vector = qv[q];
        qp[q] = &qs[q];
    }
    qs[1].k = 3;
    qs[3].k = 1;
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    char *cats[] = {"cat2"}, *tags[] = {"red"}, *excl[] = {"item-0042"};
    Affinity__V1__FloatValue pmin = AFFINITY__V1__FLOAT_VALUE__INIT,
                             pmax = AFFINITY__V1__FLOAT_VALUE__INIT;
    pmin.value = 10;
    pmax.value = 60;
    f.n_categories = 1;
    f.categories = cats;
    f.n_tags = 1;
    f.tags = tags;
    f.price_min = &pmin;
    f.price_max = &pmax;
    f.available_only = true;
    f.n_exclude_ids = 1;
    f.exclude_ids = excl;
    qs[2].filter = &f;
    Affinity__V1__SearchRequest req = AFFINITY__V1__SEARCH_REQUEST__INIT;
    req.collection = "shop";
    req.k = 10;
    req.n_queries = 4;
    req.queries = qp;
    Affinity__V1__SearchResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SEARCH, &req,
                         &affinity__v1__search_response__descriptor, 0, &resp, &st),
                 0, "%s", st.message);
    cr_assert_eq(resp->n_results, 4);
    ref_hit ref[10];
    ref_filter rf = {.category = "cat2",
                     .tag = "red",
                     .price_min = 10,
                     .price_max = 60,
                     .available_only = true,
                     .exclude = 42};
    int k[4] = {10, 3, 10, 1};
    for (int q = 0; q < 4; q++) {
        int n = ref_search(&cat_data, qv[q], k[q], q == 2 ? &rf : NULL, ref);
        char what[32];
        snprintf(what, sizeof what, "query %d", q);
        expect_hits(resp->results[q]->hits, resp->results[q]->n_hits, ref, n, what);
    }
    transport_client_free(&resp->base);
}

Test(server, similar_items_exclude_the_item, .init = start_with_catalog, .fini = stop_server)
{
    char *ids[] = {"item-0010", "item-1234"};
    Affinity__V1__SimilarItemsRequest req = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
    req.collection = "shop";
    req.n_item_ids = 2;
    req.item_ids = ids;
    req.k = 5;
    Affinity__V1__SimilarItemsResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SIMILAR_ITEMS, &req,
                         &affinity__v1__similar_items_response__descriptor, 0, &resp, &st),
                 0, "%s", st.message);
    cr_assert_eq(resp->n_results, 2);
    int idx[2] = {10, 1234};
    for (int q = 0; q < 2; q++) {
        ref_hit ref[5];
        ref_filter rf = {.price_min = -INFINITY, .price_max = INFINITY, .exclude = idx[q]};
        int n = ref_search(&cat_data, cat_data.vec[idx[q]], 5, &rf, ref);
        expect_hits(resp->results[q]->hits, resp->results[q]->n_hits, ref, n, ids[q]);
    }
    transport_client_free(&resp->base);

    /* NOT_FOUND for an unknown item */
    char *missing[] = {"item-0010", "no-such-item"};
    req.item_ids = missing;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SIMILAR_ITEMS, &req,
                         &affinity__v1__similar_items_response__descriptor, 0, NULL, &st),
                 TS_NOT_FOUND, "%d %s", st.code, st.message);
    cr_assert(strstr(st.message, "no-such-item"), "%s", st.message);
}

Test(server, recommend_by_vector_equals_brute_force, .init = start_with_catalog,
     .fini = stop_server)
{
    uint64_t seed = 99;
    float uv[DIM];
    for (int j = 0; j < DIM; j++)
        uv[j] = ts_randf(&seed);
    Affinity__V1__UserVector u = AFFINITY__V1__USER_VECTOR__INIT;
    u.n_values = DIM;
    u.values = uv;
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    char *excl[] = {"item-0000", "item-0001"};
    f.n_exclude_ids = 2;
    f.exclude_ids = excl;
    f.available_only = true;
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    req.collection = "shop";
    req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_VECTOR;
    req.user_vector = &u;
    req.k = 20;
    req.filter = &f;
    req.request_id = "abc-123";
    Affinity__V1__RecommendResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RECOMMEND, &req,
                         &affinity__v1__recommend_response__descriptor, 0, &resp, &st),
                 0, "%s", st.message);
    cr_assert_str_eq(resp->request_id, "abc-123");
    cr_assert_eq(resp->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_VECTOR);
    ref_hit ref[20];
    /* excluded: item 0 (also unavailable) and item 1 */
    ref_filter rf = {
        .price_min = -INFINITY, .price_max = INFINITY, .available_only = true, .exclude = 1};
    int n = ref_search(&cat_data, uv, 20, &rf, ref);
    expect_hits(resp->hits, resp->n_hits, ref, n, "recommend");
    transport_client_free(&resp->base);

    /* by user_id: an unknown user gets the popularity answer (empty: no events yet);
     * test_server_profiles.c covers profiles */
    Affinity__V1__RecommendRequest byid = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    byid.collection = "shop";
    byid.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
    byid.user_id = "u1";
    byid.k = 5;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RECOMMEND, &byid,
                         &affinity__v1__recommend_response__descriptor, 0, &resp, &st),
                 0, "%s", st.message);
    cr_assert_eq(resp->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY);
    cr_assert_eq(resp->n_hits, 0);
    transport_client_free(&resp->base);
}

Test(server, rerank_blends_scores, .init = start_with_catalog, .fini = stop_server)
{
    uint64_t seed = 5;
    float uv[DIM];
    for (int j = 0; j < DIM; j++)
        uv[j] = ts_randf(&seed);
    Affinity__V1__UserVector u = AFFINITY__V1__USER_VECTOR__INIT;
    u.n_values = DIM;
    u.values = uv;
    enum { NC = 50 };
    Affinity__V1__RerankCandidate cands[NC], *cp[NC];
    char ids[NC][16];
    for (int i = 0; i < NC; i++) {
        affinity__v1__rerank_candidate__init(&cands[i]);
        if (i == 7)
            snprintf(ids[i], sizeof ids[i], "unknown-id");
        else
            snprintf(ids[i], sizeof ids[i], "item-%04d", i * 37);
        cands[i].id = ids[i];
        cands[i].base_score = (float)(NC - i) / NC;
        cp[i] = &cands[i];
    }
    Affinity__V1__FloatValue w = AFFINITY__V1__FLOAT_VALUE__INIT;
    w.value = 0.25f;
    Affinity__V1__RerankRequest req = AFFINITY__V1__RERANK_REQUEST__INIT;
    req.collection = "shop";
    req.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_VECTOR;
    req.user_vector = &u;
    req.n_candidates = NC;
    req.candidates = cp;
    req.affinity_weight = &w;
    Affinity__V1__RerankResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RERANK, &req,
                         &affinity__v1__rerank_response__descriptor, 0, &resp, &st),
                 0, "%s", st.message);
    cr_assert_eq(resp->n_items, NC);
    float prev = INFINITY;
    for (int i = 0; i < NC; i++) {
        Affinity__V1__RerankedItem *it = resp->items[i];
        if (i == NC - 1) { /* unknown ids rank last */
            cr_assert_str_eq(it->id, "unknown-id");
            cr_assert(!it->found);
            continue;
        }
        cr_assert(it->found, "%s", it->id);
        int idx = atoi(it->id + 5);
        float aff = dot(uv, cat_data.vec[idx]);
        int pos = idx / 37;
        float base = (float)(NC - pos) / NC;
        cr_assert_float_eq(it->affinity, aff, 1e-4);
        cr_assert_float_eq(it->base_score, base, 1e-6);
        cr_assert_float_eq(it->score, 0.75f * base + 0.25f * aff, 1e-4);
        cr_assert_leq(it->score, prev + 1e-6f, "not sorted at %d", i);
        prev = it->score;
    }
    transport_client_free(&resp->base);

    req.n_candidates = 0;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RERANK, &req,
                         &affinity__v1__rerank_response__descriptor, 0, NULL, &st),
                 TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "1..1000"), "%s", st.message);
}

Test(server, batch_recommend_streams_answers_in_order, .init = start_with_catalog,
     .fini = stop_server)
{
    enum { NU = 300, K = 4 };
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_BATCH_RECOMMEND, 0, &s, &err),
                 0);
    static float uv[NU][DIM];
    uint64_t seed = 11;
    /* Send everything first, then read: the server must keep order and flow control. */
    for (int i = 0; i < NU; i++) {
        for (int j = 0; j < DIM; j++)
            uv[i][j] = ts_randf(&seed);
        Affinity__V1__UserVector u = AFFINITY__V1__USER_VECTOR__INIT;
        u.n_values = i == 150 ? DIM - 2 : DIM; /* one bad request in the middle */
        u.values = uv[i];
        Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
        req.collection = "shop";
        req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_VECTOR;
        req.user_vector = &u;
        req.k = K;
        char rid[16];
        snprintf(rid, sizeof rid, "r%d", i);
        req.request_id = rid;
        cr_assert_eq(transport_client_stream_send(s, &req.base, &err), 0, "send %d: %s", i,
                     err.msg);
    }
    cr_assert_eq(transport_client_stream_close_send(s, &err), 0);
    for (int i = 0; i < NU; i++) {
        Affinity__V1__RecommendResponse *r = NULL;
        int got = transport_client_stream_recv(s, &affinity__v1__recommend_response__descriptor,
                                               (ProtobufCMessage **)&r, &err);
        cr_assert_eq(got, 1, "answer %d missing", i);
        char rid[16];
        snprintf(rid, sizeof rid, "r%d", i);
        cr_assert_str_eq(r->request_id, rid);
        if (i == 150) {
            cr_assert_eq(r->error_code, TS_INVALID_ARGUMENT);
            cr_assert(strstr(r->error_message, "dimension"), "%s", r->error_message);
        } else {
            cr_assert_eq(r->error_code, 0, "%d: %s", i, r->error_message);
            ref_hit ref[K];
            int n = ref_search(&cat_data, uv[i], K, NULL, ref);
            expect_hits(r->hits, r->n_hits, ref, n, rid);
        }
        transport_client_free(&r->base);
    }
    ProtobufCMessage *extra = NULL;
    cr_assert_eq(transport_client_stream_recv(s, &affinity__v1__recommend_response__descriptor,
                                              &extra, &err),
                 0);
    transport_call_status st;
    cr_assert_eq(transport_client_stream_finish(s, NULL, NULL, &st), 0, "%s", st.message);
    transport_client_stream_destroy(s);

    /* The batcher merged the stream's requests. */
    Affinity__V1__ServerInfo *info = ts_server_info(cl);
    cr_assert_gt(info->batch_stats->max_batch_seen, 1);
    transport_client_free(&info->base);
}

/* ---- status codes ----------------------------------------------------------------------- */

static int search_status(const char *collection, float *v, size_t n, uint32_t k,
                         Affinity__V1__Filter *f, transport_call_status *st)
{
    Affinity__V1__Query q = AFFINITY__V1__QUERY__INIT, *qp = &q;
    q.n_vector = n;
    q.vector = v;
    Affinity__V1__SearchRequest req = AFFINITY__V1__SEARCH_REQUEST__INIT;
    req.collection = (char *)collection;
    req.k = k;
    req.filter = f;
    req.n_queries = 1;
    req.queries = &qp;
    return ts_call(cl, TRANSPORT_METHOD_SEARCH, &req, &affinity__v1__search_response__descriptor, 0,
                   NULL, st);
}

Test(server, every_error_has_its_status_code, .init = start_with_catalog, .fini = stop_server)
{
    transport_call_status st;
    float v[DIM] = {0.5f};
    /* INVALID_ARGUMENT: dimension */
    cr_assert_eq(search_status("shop", v, DIM - 1, 5, NULL, &st), 3, "%s", st.message);
    cr_assert(strstr(st.message, "dimension is 16"), "%s", st.message);
    cr_assert_eq(search_status("shop", NULL, 0, 5, NULL, &st), 3);
    cr_assert(strstr(st.message, "no vector"), "%s", st.message);
    /* NaN */
    float nan_v[DIM] = {0};
    nan_v[3] = NAN;
    cr_assert_eq(search_status("shop", nan_v, DIM, 5, NULL, &st), 3);
    cr_assert(strstr(st.message, "NaN"), "%s", st.message);
    /* k out of range */
    cr_assert_eq(search_status("shop", v, DIM, 0, NULL, &st), 3);
    cr_assert(strstr(st.message, "1..1024"), "%s", st.message);
    cr_assert_eq(search_status("shop", v, DIM, 5000, NULL, &st), 3);
    /* malformed filter */
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    Affinity__V1__FloatValue lo = AFFINITY__V1__FLOAT_VALUE__INIT,
                             hi = AFFINITY__V1__FLOAT_VALUE__INIT;
    lo.value = 50;
    hi.value = 10;
    f.price_min = &lo;
    f.price_max = &hi;
    cr_assert_eq(search_status("shop", v, DIM, 5, &f, &st), 3);
    cr_assert(strstr(st.message, "price"), "%s", st.message);
    /* NOT_FOUND: collection */
    cr_assert_eq(search_status("nope", v, DIM, 5, NULL, &st), 5);
    cr_assert(strstr(st.message, "nope"), "%s", st.message);
    /* empty id in SimilarItems */
    char *empty[] = {""};
    Affinity__V1__SimilarItemsRequest sr = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
    sr.collection = "shop";
    sr.n_item_ids = 1;
    sr.item_ids = empty;
    sr.k = 3;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SIMILAR_ITEMS, &sr,
                         &affinity__v1__similar_items_response__descriptor, 0, NULL, &st),
                 3, "%s", st.message);
    cr_assert(strstr(st.message, "empty"), "%s", st.message);
    /* too many rerank candidates */
    static Affinity__V1__RerankCandidate cands[1001];
    static Affinity__V1__RerankCandidate *cp[1001];
    for (int i = 0; i < 1001; i++) {
        affinity__v1__rerank_candidate__init(&cands[i]);
        cands[i].id = "item-0001";
        cp[i] = &cands[i];
    }
    Affinity__V1__UserVector u = AFFINITY__V1__USER_VECTOR__INIT;
    u.n_values = DIM;
    u.values = v;
    Affinity__V1__RerankRequest rr = AFFINITY__V1__RERANK_REQUEST__INIT;
    rr.collection = "shop";
    rr.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_VECTOR;
    rr.user_vector = &u;
    rr.n_candidates = 1001;
    rr.candidates = cp;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RERANK, &rr,
                         &affinity__v1__rerank_response__descriptor, 0, NULL, &st),
                 3);
    cr_assert(strstr(st.message, "1001 candidates"), "%s", st.message);
    /* INVALID_ARGUMENT on CreateCollection */
    Affinity__V1__CreateCollectionRequest cr = AFFINITY__V1__CREATE_COLLECTION_REQUEST__INIT;
    cr.name = "bad name!";
    cr.dimension = 8;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_CREATE_COLLECTION, &cr,
                         &affinity__v1__create_collection_response__descriptor, 0, NULL, &st),
                 3, "%s", st.message);
    cr.name = "ok";
    cr.dimension = 5000; /* 0 is valid: a learned-only collection */
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_CREATE_COLLECTION, &cr,
                         &affinity__v1__create_collection_response__descriptor, 0, NULL, &st),
                 3);
    cr_assert(strstr(st.message, "1..4096"), "%s", st.message);
    /* RESOURCE_EXHAUSTED: a message over --max-message-bytes (1 MiB here) */
    enum { BIG = 300000 };
    float *big = calloc(BIG, sizeof *big);
    cr_assert_eq(search_status("shop", big, BIG, 5, NULL, &st), 8, "%d %s", st.code, st.message);
    free(big);
    /* UNIMPLEMENTED: an unknown method is answered at once, not at the deadline */
    Affinity__V1__GetServerInfoRequest gi = AFFINITY__V1__GET_SERVER_INFO_REQUEST__INIT;
    int64_t t0 = ts_now_ms();
    cr_assert_eq(ts_call(cl, "/affinity.v1.Affinity/NoSuchMethod", &gi,
                         &affinity__v1__server_info__descriptor, 30000, NULL, &st),
                 12);
    cr_assert_lt(ts_now_ms() - t0, 10000);
    cr_assert(strstr(st.message, "NoSuchMethod"), "%s", st.message);
    /* profiles: empty requests are INVALID_ARGUMENT (test_server_profiles.c has the rest) */
    Affinity__V1__PutEventsRequest pe = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    pe.collection = "shop";
    pe.user_id = "u1";
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_PUT_EVENTS, &pe,
                         &affinity__v1__put_events_response__descriptor, 0, NULL, &st),
                 3);
    cr_assert(strstr(st.message, "1..1000"), "%s", st.message);
    Affinity__V1__GetUserRequest gu = AFFINITY__V1__GET_USER_REQUEST__INIT;
    gu.collection = "shop";
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_USER, &gu,
                         &affinity__v1__get_user_response__descriptor, 0, NULL, &st),
                 3);
    Affinity__V1__DeleteUserRequest du = AFFINITY__V1__DELETE_USER_REQUEST__INIT;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DELETE_USER, &du,
                         &affinity__v1__delete_user_response__descriptor, 0, NULL, &st),
                 3);
}

Test(server, health_and_server_info, .init = start_with_catalog, .fini = stop_server)
{
    transport_call_status st;
    cr_assert_eq(ts_health(cl), 1);
    Grpc__Health__V1__HealthCheckRequest hr = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    hr.service = "affinity.v1.Affinity";
    Grpc__Health__V1__HealthCheckResponse *h = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_HEALTH_CHECK, &hr,
                         &grpc__health__v1__health_check_response__descriptor, 0, &h, &st),
                 0);
    cr_assert_eq(h->status, 1);
    transport_client_free(&h->base);
    hr.service = "other.Service";
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_HEALTH_CHECK, &hr,
                         &grpc__health__v1__health_check_response__descriptor, 0, NULL, &st),
                 5);
    /* Watch: answered UNIMPLEMENTED (clients poll Check) */
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_HEALTH_WATCH, 0, &s, &err), 0);
    hr.service = "";
    transport_client_stream_send(s, &hr.base, &err);
    cr_assert_eq(transport_client_stream_finish(s, NULL, NULL, &st), AFF_EUNSUPPORTED);
    cr_assert(strstr(st.message, "Check"), "%s", st.message);
    transport_client_stream_destroy(s);

    Affinity__V1__ServerInfo *info = ts_server_info(cl);
    cr_assert_str_eq(info->version, AFF_VERSION_STRING);
    cr_assert_str_eq(info->backend, "faiss-cpu");
    cr_assert_eq(info->max_batch, 256);
    cr_assert(!info->persistent);
    cr_assert_eq(info->batch_stats->n_size_histogram, 16);
    /* Issue 17: GPU device faults (none on the CPU backend; fields 80-82 are sent). */
    cr_assert_eq(info->device_faults, 0);
    cr_assert_eq(info->tables_on_cpu, 0);
    cr_assert_str_eq(info->device_fault, "");
    transport_client_free(&info->base);
}

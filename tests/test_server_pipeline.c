/*
 * test_server_pipeline.c: the ranking pipeline through a real affinityd and a real client:
 * rules on Recommend, BatchRecommend and SimilarItems (pins exact, promotion share exact and
 * named, category cap, none-of filters), reasons on every hit, a unique recommendation_id on
 * every response, replayable exploration, presets from --serving-config, and
 * INVALID_ARGUMENT naming the field for every bad rule (the server keeps serving).
 */
#include <criterion/criterion.h>

#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "server_helpers.h"

#define DIM       16
#define N_CATS    4
#define N_PER_CAT 25
#define N_ITEMS   (N_CATS * N_PER_CAT)

static const char *const cat_names[N_CATS] = {"shoes", "books", "garden", "toys"};
static char ids[N_ITEMS][16];
static float vecs[N_ITEMS][DIM];

/* Upserts n items into "shop" in one UpsertItems stream. */
static void upsert_items(transport_client *c, Affinity__V1__Item **items, size_t n)
{
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(c, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0);
    Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    req.collection = "shop";
    req.n_items = n;
    req.items = items;
    cr_assert_eq(transport_client_stream_send(s, &req.base, &err), 0);
    transport_call_status st;
    Affinity__V1__UpsertItemsResponse *resp = NULL;
    transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                   (ProtobufCMessage **)&resp, &st);
    cr_assert_eq(st.code, 0, "%s", st.message);
    transport_client_free(&resp->base);
    transport_client_stream_destroy(s);
}

static void upsert_shop(transport_client *cl)
{
    ts_create_collection(cl, "shop", DIM, AFFINITY__V1__METRIC__METRIC_COSINE);
    uint64_t seed = 17;
    float centroid[N_CATS][DIM];
    for (int c = 0; c < N_CATS; c++)
        for (int j = 0; j < DIM; j++)
            centroid[c][j] = ts_randf(&seed);
    Affinity__V1__Item items[N_ITEMS];
    Affinity__V1__Item *ptrs[N_ITEMS];
    static char *sale = "sale";
    for (int i = 0; i < N_ITEMS; i++) {
        int c = i / N_PER_CAT;
        snprintf(ids[i], sizeof ids[i], "%s-%02d", cat_names[c], i % N_PER_CAT);
        for (int j = 0; j < DIM; j++)
            vecs[i][j] = centroid[c][j] + 0.15f * ts_randf(&seed);
        affinity__v1__item__init(&items[i]);
        items[i].id = ids[i];
        items[i].n_vector = DIM;
        items[i].vector = vecs[i];
        items[i].category = (char *)cat_names[c];
        if (i % 2 == 0) {
            items[i].n_tags = 1;
            items[i].tags = &sale;
        }
        items[i].price = 10.0f + (float)(i % 7);
        ptrs[i] = &items[i];
    }
    upsert_items(cl, ptrs, N_ITEMS);
}

static void put_views(transport_client *cl, const char *user, const int *items, int n)
{
    Affinity__V1__Event e[8];
    Affinity__V1__Event *p[8];
    for (int i = 0; i < n; i++) {
        affinity__v1__event__init(&e[i]);
        e[i].item_id = ids[items[i]];
        e[i].type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW;
        p[i] = &e[i];
    }
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = "shop";
    req.user_id = (char *)user;
    req.n_events = (size_t)n;
    req.events = p;
    Affinity__V1__PutEventsResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_PUT_EVENTS, &req,
                         &affinity__v1__put_events_response__descriptor, 0, &resp, &st),
                 0, "%s", st.message);
    cr_assert_eq(resp->applied_count, (uint32_t)n);
    transport_client_free(&resp->base);
}

static int recommend(transport_client *cl, Affinity__V1__RecommendRequest *req,
                     Affinity__V1__RecommendResponse **resp, transport_call_status *st)
{
    *resp = NULL;
    return ts_call(cl, TRANSPORT_METHOD_RECOMMEND, req,
                   &affinity__v1__recommend_response__descriptor, 0, resp, st);
}

static bool is_hex32(const char *s)
{
    if (strlen(s) != 32) return false;
    for (int i = 0; i < 32; i++)
        if (!strchr("0123456789abcdef", s[i])) return false;
    return true;
}

/* A Recommend request for "shop" by the vector of item v, k = 10 (uv holds the vector). */
static void vector_request(Affinity__V1__RecommendRequest *req, Affinity__V1__UserVector *uv, int v)
{
    affinity__v1__recommend_request__init(req);
    affinity__v1__user_vector__init(uv);
    uv->n_values = DIM;
    uv->values = vecs[v];
    req->collection = "shop";
    req->user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_VECTOR;
    req->user_vector = uv;
    req->k = 10;
}

static test_server srv;
static transport_client *cl;
static char presets_path[256];

static void start(void)
{
    const char *text =
        "{\"presets\": {\"home\": {\"pins\": [{\"item_id\": \"toys-03\", \"position\": 2}],"
        " \"promotions\": [{\"name\": \"book-fair\", \"filter\": {\"categories\": [\"books\"]},"
        " \"share\": 0.3}]}},"
        " \"collections\": {\"banners\": {\"ranked_by\": \"shop\"}}}";
    ts_write_temp_file(presets_path, sizeof presets_path, "presets", text);
    const char *args[] = {"--serving-config", presets_path, NULL};
    ts_start_serving(&srv, args);
    cl = ts_client(&srv, NULL);
    upsert_shop(cl);
}

static void stop(void)
{
    transport_client_destroy(cl);
    ts_stop(&srv, 15, 20000);
    unlink(presets_path);
}

TestSuite(server_pipeline, .init = start, .fini = stop, .timeout = 120);

Test(server_pipeline, recommend_with_rules_reasons_and_ids)
{
    const int hist[3] = {1, 2, 3}; /* shoes */
    put_views(cl, "ann", hist, 3);
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    req.collection = "shop";
    req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
    req.user_id = "ann";
    req.k = 10;
    Affinity__V1__Rules rules = AFFINITY__V1__RULES__INIT;
    Affinity__V1__Pin pin = AFFINITY__V1__PIN__INIT;
    pin.item_id = "garden-07";
    pin.position = 4;
    Affinity__V1__Pin *pins[1] = {&pin};
    rules.n_pins = 1;
    rules.pins = pins;
    Affinity__V1__Promotion promo = AFFINITY__V1__PROMOTION__INIT;
    Affinity__V1__Filter pf = AFFINITY__V1__FILTER__INIT;
    char *toys = "toys";
    pf.n_categories = 1;
    pf.categories = &toys;
    promo.name = "toy-week";
    promo.filter = &pf;
    promo.share = 0.2f;
    Affinity__V1__Promotion *promos[1] = {&promo};
    rules.n_promotions = 1;
    rules.promotions = promos;
    Affinity__V1__UInt32Value cap = AFFINITY__V1__UINT32_VALUE__INIT;
    cap.value = 3;
    rules.max_per_category = &cap;
    req.rules = &rules;
    Affinity__V1__RecommendResponse *r1, *r2;
    transport_call_status st;
    cr_assert_eq(recommend(cl, &req, &r1, &st), 0, "%s", st.message);
    cr_assert_eq(r1->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE);
    cr_assert_eq(r1->n_hits, 10);
    cr_assert(is_hex32(r1->recommendation_id), "%s", r1->recommendation_id);
    int promoted = 0, shoes = 0;
    for (size_t i = 0; i < r1->n_hits; i++) {
        const Affinity__V1__Hit *h = r1->hits[i];
        cr_assert_not_null(h->reason, "hit %zu without a reason", i);
        if (i == 3) {
            cr_assert_str_eq(h->id, "garden-07");
            cr_assert_eq(h->reason->kind, AFFINITY__V1__REASON_KIND__REASON_KIND_PINNED);
            continue;
        }
        if (h->reason->kind == AFFINITY__V1__REASON_KIND__REASON_KIND_PROMOTED) {
            promoted++;
            cr_assert_str_eq(h->reason->promotion, "toy-week");
            cr_assert(strncmp(h->id, "toys-", 5) == 0, "%s", h->id);
        } else {
            cr_assert_eq(h->reason->kind,
                         AFFINITY__V1__REASON_KIND__REASON_KIND_SIMILAR_TO_HISTORY_ITEM);
            cr_assert(strncmp(h->reason->related_item_id, "shoes-0", 7) == 0, "%s",
                      h->reason->related_item_id);
        }
        shoes += strncmp(h->id, "shoes-", 6) == 0;
    }
    cr_assert_eq(promoted, 2);
    cr_assert_eq(shoes, 3, "the cap keeps shoes at 3");
    cr_assert_eq(recommend(cl, &req, &r2, &st), 0, "%s", st.message);
    cr_assert_str_neq(r1->recommendation_id, r2->recommendation_id);
    transport_client_free(&r1->base);
    transport_client_free(&r2->base);
}

Test(server_pipeline, exploration_replays_with_its_seed)
{
    Affinity__V1__RecommendRequest req;
    Affinity__V1__UserVector uv;
    vector_request(&req, &uv, 30);
    Affinity__V1__Rules rules = AFFINITY__V1__RULES__INIT;
    Affinity__V1__Exploration ex = AFFINITY__V1__EXPLORATION__INIT;
    ex.share = 0.3f;
    rules.exploration = &ex;
    req.rules = &rules;
    Affinity__V1__RecommendResponse *a, *b;
    transport_call_status st;
    cr_assert_eq(recommend(cl, &req, &a, &st), 0, "%s", st.message);
    cr_assert_neq(a->exploration_seed, 0);
    ex.seed = a->exploration_seed;
    cr_assert_eq(recommend(cl, &req, &b, &st), 0, "%s", st.message);
    cr_assert_eq(a->n_hits, 10);
    cr_assert_eq(b->n_hits, 10);
    int explored = 0;
    for (size_t i = 0; i < 10; i++) {
        cr_assert_str_eq(a->hits[i]->id, b->hits[i]->id, "replayed with the reported seed");
        explored += a->hits[i]->reason->kind == AFFINITY__V1__REASON_KIND__REASON_KIND_EXPLORATION;
    }
    cr_assert_eq(explored, 3);
    transport_client_free(&a->base);
    transport_client_free(&b->base);
}

Test(server_pipeline, presets_none_of_filters_and_similar_items)
{
    /* the "home" preset from --serving-config, with a none-of filter on the request */
    Affinity__V1__RecommendRequest req;
    Affinity__V1__UserVector uv;
    vector_request(&req, &uv, 0);
    req.preset = "home";
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    char *sale = "sale";
    f.n_exclude_tags = 1;
    f.exclude_tags = &sale;
    req.filter = &f;
    Affinity__V1__RecommendResponse *r;
    transport_call_status st;
    cr_assert_eq(recommend(cl, &req, &r, &st), 0, "%s", st.message);
    cr_assert_eq(r->n_hits, 10);
    cr_assert_str_eq(r->hits[1]->id, "toys-03");
    int books = 0;
    for (size_t i = 0; i < r->n_hits; i++) {
        int idx = -1;
        for (int j = 0; j < N_ITEMS; j++)
            if (strcmp(ids[j], r->hits[i]->id) == 0) idx = j;
        cr_assert_geq(idx, 0);
        if (i != 1) cr_assert_eq(idx % 2, 1, "%s is tagged sale", r->hits[i]->id);
        if (r->hits[i]->reason->kind == AFFINITY__V1__REASON_KIND__REASON_KIND_PROMOTED) {
            books++;
            cr_assert_str_eq(r->hits[i]->reason->promotion, "book-fair");
        }
    }
    cr_assert_eq(books, 3);
    transport_client_free(&r->base);

    /* SimilarItems: exclude a category, reasons name the item */
    Affinity__V1__SimilarItemsRequest sreq = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
    char *items[2] = {"books-01", "garden-02"};
    char *books_cat = "books";
    Affinity__V1__Filter sf = AFFINITY__V1__FILTER__INIT;
    sf.n_exclude_categories = 1;
    sf.exclude_categories = &books_cat;
    sreq.collection = "shop";
    sreq.n_item_ids = 2;
    sreq.item_ids = items;
    sreq.k = 5;
    sreq.filter = &sf;
    Affinity__V1__SimilarItemsResponse *sr = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SIMILAR_ITEMS, &sreq,
                         &affinity__v1__similar_items_response__descriptor, 0, &sr, &st),
                 0, "%s", st.message);
    cr_assert(is_hex32(sr->recommendation_id));
    cr_assert_eq(sr->n_results, 2);
    for (size_t q = 0; q < 2; q++) {
        cr_assert_eq(sr->results[q]->n_hits, 5);
        for (size_t i = 0; i < 5; i++) {
            const Affinity__V1__Hit *h = sr->results[q]->hits[i];
            cr_assert(strncmp(h->id, "books-", 6) != 0, "%s", h->id);
            cr_assert_eq(h->reason->kind, AFFINITY__V1__REASON_KIND__REASON_KIND_SIMILAR_TO_ITEM);
            cr_assert_str_eq(h->reason->related_item_id, items[q]);
        }
    }
    transport_client_free(&sr->base);
}

Test(server_pipeline, batch_recommend_carries_rules_reasons_and_ids)
{
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_BATCH_RECOMMEND, 0, &s, &err),
                 0);
    Affinity__V1__Rules rules = AFFINITY__V1__RULES__INIT;
    Affinity__V1__Pin pin = AFFINITY__V1__PIN__INIT;
    pin.item_id = "books-09";
    pin.position = 1;
    Affinity__V1__Pin *pins[1] = {&pin};
    rules.n_pins = 1;
    rules.pins = pins;
    for (int i = 0; i < 3; i++) {
        Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
        req.collection = "shop";
        req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
        req.user_id = i == 0 ? "nobody" : "ann";
        req.k = i == 2 ? 0 : 4; /* the third is invalid: an error in the stream */
        req.rules = &rules;
        cr_assert_eq(transport_client_stream_send(s, &req.base, &err), 0);
    }
    transport_client_stream_close_send(s, &err);
    for (int i = 0; i < 3; i++) {
        Affinity__V1__RecommendResponse *resp = NULL;
        cr_assert_eq(transport_client_stream_recv(s, &affinity__v1__recommend_response__descriptor,
                                                  (ProtobufCMessage **)&resp, &err),
                     1);
        if (i == 2) {
            cr_assert_eq(resp->error_code, TS_INVALID_ARGUMENT);
            cr_assert(strstr(resp->error_message, "k = 0"), "%s", resp->error_message);
        } else {
            cr_assert_eq(resp->error_code, 0, "%s", resp->error_message);
            cr_assert(is_hex32(resp->recommendation_id));
            cr_assert_geq(resp->n_hits, 1);
            cr_assert_str_eq(resp->hits[0]->id, "books-09");
            cr_assert_eq(resp->hits[0]->reason->kind,
                         AFFINITY__V1__REASON_KIND__REASON_KIND_PINNED);
        }
        transport_client_free(&resp->base);
    }
    transport_call_status st;
    cr_assert_eq(transport_client_stream_finish(s, NULL, NULL, &st), 0);
    transport_client_stream_destroy(s);
}

/* One bad rule: INVALID_ARGUMENT whose message names field. */
static void expect_bad(Affinity__V1__RecommendRequest *req, const char *field)
{
    Affinity__V1__RecommendResponse *r = NULL;
    transport_call_status st;
    int code = recommend(cl, req, &r, &st);
    cr_assert_eq(code, TS_INVALID_ARGUMENT, "%s: code %d (%s)", field, code, st.message);
    cr_assert(strstr(st.message, field), "message \"%s\" does not name %s", st.message, field);
}

Test(server_pipeline, every_bad_rule_is_invalid_argument_naming_the_field)
{
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    req.collection = "shop";
    req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
    req.user_id = "ann";
    req.k = 5;
    req.preset = "no-such-preset";
    expect_bad(&req, "preset \"no-such-preset\"");
    req.preset = "";
    Affinity__V1__Rules rules = AFFINITY__V1__RULES__INIT;
    req.rules = &rules;
    Affinity__V1__FloatValue div = AFFINITY__V1__FLOAT_VALUE__INIT;
    div.value = 1.5f;
    rules.diversity = &div;
    expect_bad(&req, "rules.diversity");
    rules.diversity = NULL;
    Affinity__V1__Promotion promo = AFFINITY__V1__PROMOTION__INIT;
    Affinity__V1__Filter pf = AFFINITY__V1__FILTER__INIT;
    char *toys = "toys";
    pf.n_categories = 1;
    pf.categories = &toys;
    promo.name = "p";
    promo.filter = &pf;
    promo.share = 1.5f;
    Affinity__V1__Promotion *promos[1] = {&promo};
    rules.n_promotions = 1;
    rules.promotions = promos;
    expect_bad(&req, "rules.promotions[0].share");
    rules.n_promotions = 0;
    Affinity__V1__Pin pin = AFFINITY__V1__PIN__INIT;
    pin.item_id = "toys-01";
    pin.position = 6;
    Affinity__V1__Pin *pins[1] = {&pin};
    rules.n_pins = 1;
    rules.pins = pins;
    expect_bad(&req, "rules.pins[0].position");
    pin.position = 1;
    pin.item_id = "no-such-item";
    expect_bad(&req, "rules.pins[0].item_id");
    rules.n_pins = 0;
    Affinity__V1__Exploration ex = AFFINITY__V1__EXPLORATION__INIT;
    ex.share = -0.5f;
    rules.exploration = &ex;
    expect_bad(&req, "rules.exploration.share");
    rules.exploration = NULL;
    Affinity__V1__Boost boost = AFFINITY__V1__BOOST__INIT;
    boost.weight = 1.0f;
    Affinity__V1__Boost *boosts[1] = {&boost};
    rules.n_boosts = 1;
    rules.boosts = boosts;
    expect_bad(&req, "rules.boosts[0].filter");
    rules.n_boosts = 0;
    /* and the server still answers */
    Affinity__V1__RecommendResponse *r = NULL;
    transport_call_status st;
    cr_assert_eq(recommend(cl, &req, &r, &st), 0, "%s", st.message);
    transport_client_free(&r->base);
}

static Affinity__V1__RecommendPageResponse *page(const char *user, Affinity__V1__PageSlot **slots,
                                                 size_t n, int *code, transport_call_status *st)
{
    Affinity__V1__RecommendPageRequest req = AFFINITY__V1__RECOMMEND_PAGE_REQUEST__INIT;
    req.user_id = (char *)user;
    req.n_slots = n;
    req.slots = slots;
    req.request_id = "page-1";
    Affinity__V1__RecommendPageResponse *resp = NULL;
    *code = ts_call(cl, TRANSPORT_METHOD_RECOMMEND_PAGE, &req,
                    &affinity__v1__recommend_page_response__descriptor, 0, &resp, st);
    return resp;
}

Test(server_pipeline, recommend_page_fills_every_slot_once)
{
    /* a second collection: banners, linked to nothing, same dimension */
    ts_create_collection(cl, "banners", DIM, AFFINITY__V1__METRIC__METRIC_COSINE);
    Affinity__V1__Item items[5];
    Affinity__V1__Item *ptrs[5];
    char bid[5][16];
    for (int i = 0; i < 5; i++) {
        affinity__v1__item__init(&items[i]);
        snprintf(bid[i], sizeof bid[i], "banner-%d", i);
        items[i].id = bid[i];
        items[i].n_vector = DIM;
        items[i].vector = vecs[i * 20];
        ptrs[i] = &items[i];
    }
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0);
    Affinity__V1__UpsertItemsRequest up = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    up.collection = "banners";
    up.n_items = 5;
    up.items = ptrs;
    cr_assert_eq(transport_client_stream_send(s, &up.base, &err), 0);
    transport_call_status st;
    Affinity__V1__UpsertItemsResponse *ur = NULL;
    transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                   (ProtobufCMessage **)&ur, &st);
    cr_assert_eq(st.code, 0, "%s", st.message);
    transport_client_free(&ur->base);
    transport_client_stream_destroy(s);

    const int hist[2] = {26, 27}; /* books */
    put_views(cl, "cat", hist, 2);
    Affinity__V1__PageSlot sl[4];
    Affinity__V1__PageSlot *sp[4];
    const char *names[4] = {"hero", "for-you", "more", "toys"};
    const char *colls[4] = {"banners", "shop", "shop", "shop"};
    const uint32_t ks[4] = {1, 6, 6, 3};
    Affinity__V1__Filter toys = AFFINITY__V1__FILTER__INIT;
    char *toy_cat = "toys";
    toys.n_categories = 1;
    toys.categories = &toy_cat;
    for (int i = 0; i < 4; i++) {
        affinity__v1__page_slot__init(&sl[i]);
        sl[i].name = (char *)names[i];
        sl[i].collection = (char *)colls[i];
        sl[i].k = ks[i];
        sp[i] = &sl[i];
    }
    sl[3].filter = &toys;
    int code;
    Affinity__V1__RecommendPageResponse *r = page("cat", sp, 4, &code, &st);
    cr_assert_eq(code, 0, "%s", st.message);
    cr_assert(is_hex32(r->recommendation_id));
    cr_assert_str_eq(r->request_id, "page-1");
    cr_assert_eq(r->n_slots, 4);
    cr_assert_eq(r->slots[0]->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE,
                 "banners are ranked by the shopper's shop profile (serving config)");
    cr_assert_eq(r->slots[0]->n_hits, 1);
    for (size_t i = 1; i < 4; i++) {
        const Affinity__V1__SlotResult *res = r->slots[i];
        cr_assert_str_eq(res->name, names[i]);
        cr_assert_eq(res->n_hits, ks[i], "slot %s", names[i]);
        cr_assert_eq(res->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE);
        for (size_t j = 0; j < res->n_hits; j++) {
            cr_assert_not_null(res->hits[j]->reason);
            cr_assert_eq(res->hits[j]->reason->kind,
                         AFFINITY__V1__REASON_KIND__REASON_KIND_SIMILAR_TO_HISTORY_ITEM);
            for (size_t t = 1; t <= i; t++)
                for (size_t u = 0; u < (t == i ? j : r->slots[t]->n_hits); u++)
                    cr_assert_str_neq(r->slots[t]->hits[u]->id, res->hits[j]->id, "twice: %s",
                                      res->hits[j]->id);
        }
    }
    transport_client_free(&r->base);

    /* a bad slot is INVALID_ARGUMENT naming it; nothing else changes */
    sl[2].k = 0;
    r = page("cat", sp, 4, &code, &st);
    cr_assert_eq(code, TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "slots[2].k"), "%s", st.message);
    sl[2].k = 6;
    r = page("", sp, 4, &code, &st);
    cr_assert_eq(code, TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "user_id"), "%s", st.message);
    sl[1].collection = "nope";
    r = page("cat", sp, 4, &code, &st);
    cr_assert_eq(code, TS_NOT_FOUND, "%d %s", code, st.message);
    cr_assert(strstr(st.message, "slots[1] (for-you)"), "%s", st.message);
}

Test(server_pipeline, banners_linked_to_products_are_ranked_by_the_product_profile)
{
    ts_create_collection(cl, "banners", DIM, AFFINITY__V1__METRIC__METRIC_COSINE);
    /* banner-<c> links to three items of category c and has no vector of its own */
    Affinity__V1__Item items[N_CATS];
    Affinity__V1__Item *ptrs[N_CATS];
    char bid[N_CATS][16];
    char *links[N_CATS][3];
    for (int c = 0; c < N_CATS; c++) {
        affinity__v1__item__init(&items[c]);
        snprintf(bid[c], sizeof bid[c], "banner-%s", cat_names[c]);
        items[c].id = bid[c];
        for (int l = 0; l < 3; l++)
            links[c][l] = ids[c * N_PER_CAT + l];
        items[c].n_linked_ids = 3;
        items[c].linked_ids = links[c];
        items[c].linked_collection = "shop";
        ptrs[c] = &items[c];
    }
    transport_client_stream *s = NULL;
    aff_err err;
    transport_call_status st;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0);
    Affinity__V1__UpsertItemsRequest up = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    up.collection = "banners";
    up.n_items = N_CATS;
    up.items = ptrs;
    cr_assert_eq(transport_client_stream_send(s, &up.base, &err), 0);
    Affinity__V1__UpsertItemsResponse *ur = NULL;
    transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                   (ProtobufCMessage **)&ur, &st);
    cr_assert_eq(st.code, 0, "%s", st.message);
    cr_assert_eq(ur->upserted_count, N_CATS);
    transport_client_free(&ur->base);
    transport_client_stream_destroy(s);

    /* a shopper who only ever looked at garden products */
    const int hist[3] = {2 * N_PER_CAT + 5, 2 * N_PER_CAT + 6, 2 * N_PER_CAT + 7};
    put_views(cl, "gardener", hist, 3);
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    req.collection = "banners";
    req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
    req.user_id = "gardener";
    req.k = 2;
    Affinity__V1__RecommendResponse *r;
    cr_assert_eq(recommend(cl, &req, &r, &st), 0, "%s", st.message);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE);
    cr_assert_eq(r->n_hits, 2);
    cr_assert_str_eq(r->hits[0]->id, "banner-garden");
    cr_assert_eq(r->hits[0]->reason->kind,
                 AFFINITY__V1__REASON_KIND__REASON_KIND_SIMILAR_TO_HISTORY_ITEM);
    cr_assert(strncmp(r->hits[0]->reason->related_item_id, "garden-0", 8) == 0, "%s",
              r->hits[0]->reason->related_item_id);
    transport_client_free(&r->base);

    /* a cold-start shopper: the crowd's products (the gardener's) rank the banners */
    req.user_id = "newcomer";
    cr_assert_eq(recommend(cl, &req, &r, &st), 0, "%s", st.message);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY);
    cr_assert_eq(r->n_hits, 2);
    cr_assert_str_eq(r->hits[0]->id, "banner-garden");
    cr_assert_eq(r->hits[0]->reason->kind, AFFINITY__V1__REASON_KIND__REASON_KIND_POPULAR);
    transport_client_free(&r->base);

    /* a link to nothing is refused, naming the item */
    char *none[1] = {"no-such-product"};
    items[0].n_linked_ids = 1;
    items[0].linked_ids = none;
    up.n_items = 1;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0);
    transport_client_stream_send(s, &up.base, &err);
    ur = NULL;
    transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                   (ProtobufCMessage **)&ur, &st);
    cr_assert_eq(st.code, TS_INVALID_ARGUMENT, "%s", st.message);
    cr_assert(strstr(st.message, "items[0]"), "%s", st.message);
    if (ur) transport_client_free(&ur->base);
    transport_client_stream_destroy(s);
}

Test(server_pipeline, traits_in_get_user_and_audiences_in_rules)
{
    const int hist[3] = {1, 2, 3};
    put_views(cl, "tess", hist, 3);
    Affinity__V1__GetUserRequest gr = AFFINITY__V1__GET_USER_REQUEST__INIT;
    gr.collection = "shop";
    gr.user_id = "tess";
    Affinity__V1__GetUserResponse *u = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_USER, &gr,
                         &affinity__v1__get_user_response__descriptor, 0, &u, &st),
                 0, "%s", st.message);
    cr_assert_not_null(u->traits);
    cr_assert_float_eq(u->traits->activity, 3.0f / 7.0f, 1e-5);
    cr_assert_float_eq(u->traits->price_sensitivity, 0.5f, 1e-6, "nothing bought: neutral");
    cr_assert_eq(u->traits->rfm_recency, 5);
    cr_assert_eq(u->traits->rfm_frequency, 1);
    cr_assert_float_eq(u->traits->purchase_intent, 0.15f, 1e-5);
    transport_client_free(&u->base);

    /* a promotion for shoppers with purchase intent >= 0.1 and a tablet-only one */
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    req.collection = "shop";
    req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
    req.user_id = "tess";
    req.k = 10;
    Affinity__V1__Rules rules = AFFINITY__V1__RULES__INIT;
    Affinity__V1__Promotion p1 = AFFINITY__V1__PROMOTION__INIT, p2 = AFFINITY__V1__PROMOTION__INIT;
    Affinity__V1__Filter f1 = AFFINITY__V1__FILTER__INIT, f2 = AFFINITY__V1__FILTER__INIT;
    char *garden = "garden", *toys = "toys";
    f1.n_categories = 1;
    f1.categories = &garden;
    f2.n_categories = 1;
    f2.categories = &toys;
    Affinity__V1__Audience a1 = AFFINITY__V1__AUDIENCE__INIT, a2 = AFFINITY__V1__AUDIENCE__INIT;
    Affinity__V1__FloatValue intent = AFFINITY__V1__FLOAT_VALUE__INIT;
    intent.value = 0.1f;
    a1.min_purchase_intent = &intent;
    char *tablet = "tablet";
    a2.n_devices = 1;
    a2.devices = &tablet;
    p1.name = "garden-intent";
    p1.filter = &f1;
    p1.share = 0.2f;
    p1.audience = &a1;
    p2.name = "toys-tablet";
    p2.filter = &f2;
    p2.share = 0.2f;
    p2.audience = &a2;
    Affinity__V1__Promotion *promos[2] = {&p1, &p2};
    rules.n_promotions = 2;
    rules.promotions = promos;
    req.rules = &rules;
    Affinity__V1__RequestContext ctx = AFFINITY__V1__REQUEST_CONTEXT__INIT;
    ctx.device = "phone";
    req.context = &ctx;
    Affinity__V1__RecommendResponse *r;
    cr_assert_eq(recommend(cl, &req, &r, &st), 0, "%s", st.message);
    int garden_promo = 0, toys_promo = 0;
    for (size_t i = 0; i < r->n_hits; i++) {
        if (r->hits[i]->reason->kind != AFFINITY__V1__REASON_KIND__REASON_KIND_PROMOTED) continue;
        garden_promo += strcmp(r->hits[i]->reason->promotion, "garden-intent") == 0;
        toys_promo += strcmp(r->hits[i]->reason->promotion, "toys-tablet") == 0;
    }
    cr_assert_eq(garden_promo, 2);
    cr_assert_eq(toys_promo, 0, "a phone is not a tablet");
    transport_client_free(&r->base);

    Affinity__V1__FloatValue bad = AFFINITY__V1__FLOAT_VALUE__INIT;
    bad.value = 2.0f;
    a1.min_loyalty = &bad;
    expect_bad(&req, "rules.promotions[0].audience.min_loyalty");
    a1.min_loyalty = NULL;
    Affinity__V1__UInt32Value hour = AFFINITY__V1__UINT32_VALUE__INIT;
    hour.value = 30;
    ctx.hour = &hour;
    expect_bad(&req, "context.hour");
}

/* ---- issue 11 remainder: reasons on Rerank, SIGHUP reload, exploration of new items ---- */

static float cosine(const float *a, const float *b)
{
    double ab = 0, aa = 0, bb = 0;
    for (int j = 0; j < DIM; j++) {
        ab += (double)a[j] * b[j];
        aa += (double)a[j] * a[j];
        bb += (double)b[j] * b[j];
    }
    return (float)(ab / sqrt(aa * bb));
}

static int rerank(transport_client *c, Affinity__V1__RerankRequest *req,
                  Affinity__V1__RerankResponse **resp, transport_call_status *st)
{
    *resp = NULL;
    return ts_call(c, TRANSPORT_METHOD_RERANK, req, &affinity__v1__rerank_response__descriptor, 0,
                   resp, st);
}

Test(server_pipeline, rerank_items_carry_reasons)
{
    const int hist[2] = {3, 60}; /* shoes-03, garden-10 */
    put_views(cl, "rita", hist, 2);
    const int cand_items[4] = {5, 27, 61, 90}; /* shoes, books, garden, toys */
    Affinity__V1__RerankCandidate cands[5], *cp[5];
    for (int i = 0; i < 5; i++) {
        affinity__v1__rerank_candidate__init(&cands[i]);
        cands[i].id = i < 4 ? ids[cand_items[i]] : "no-such-item";
        cands[i].base_score = (float)(5 - i);
        cp[i] = &cands[i];
    }
    Affinity__V1__RerankRequest req = AFFINITY__V1__RERANK_REQUEST__INIT;
    req.collection = "shop";
    req.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_ID;
    req.user_id = "rita";
    req.n_candidates = 5;
    req.candidates = cp;
    Affinity__V1__RerankResponse *resp;
    transport_call_status st;
    cr_assert_eq(rerank(cl, &req, &resp, &st), 0, "%s", st.message);
    cr_assert_eq(resp->n_items, 5);
    for (size_t i = 0; i < resp->n_items; i++) {
        const Affinity__V1__RerankedItem *it = resp->items[i];
        cr_assert_not_null(it->reason, "every re-ranked item has a reason");
        if (!it->found) {
            cr_assert_str_eq(it->id, "no-such-item");
            cr_assert_eq(it->reason->kind, AFFINITY__V1__REASON_KIND__REASON_KIND_CALLER_SCORE);
            continue;
        }
        cr_assert_eq(it->reason->kind,
                     AFFINITY__V1__REASON_KIND__REASON_KIND_SIMILAR_TO_HISTORY_ITEM);
        int at = -1;
        for (int c = 0; c < 4; c++)
            if (strcmp(it->id, ids[cand_items[c]]) == 0) at = cand_items[c];
        cr_assert_geq(at, 0);
        /* the nearer of the two history items, by the vectors the test upserted */
        int nearest =
            cosine(vecs[at], vecs[hist[0]]) >= cosine(vecs[at], vecs[hist[1]]) ? hist[0] : hist[1];
        cr_assert_str_eq(it->reason->related_item_id, ids[nearest], "%s", it->id);
    }
    transport_client_free(&resp->base);

    /* no personal signal: the caller's order decides, and says so */
    req.user_id = "nobody-here";
    cr_assert_eq(rerank(cl, &req, &resp, &st), 0, "%s", st.message);
    for (size_t i = 0; i < resp->n_items; i++)
        cr_assert_eq(resp->items[i]->reason->kind,
                     AFFINITY__V1__REASON_KIND__REASON_KIND_CALLER_SCORE);
    transport_client_free(&resp->base);

    /* a vector */
    Affinity__V1__UserVector uv = AFFINITY__V1__USER_VECTOR__INIT;
    uv.n_values = DIM;
    uv.values = vecs[40];
    req.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_VECTOR;
    req.user_vector = &uv;
    cr_assert_eq(rerank(cl, &req, &resp, &st), 0, "%s", st.message);
    for (size_t i = 0; i < resp->n_items; i++)
        cr_assert_eq(resp->items[i]->reason->kind,
                     resp->items[i]->found ? AFFINITY__V1__REASON_KIND__REASON_KIND_MATCHES_VECTOR
                                           : AFFINITY__V1__REASON_KIND__REASON_KIND_CALLER_SCORE);
    transport_client_free(&resp->base);
}

/* Recommend with preset "home" for vecs[0]: how many hits are pinned at position 2. */
static int home_pin_at_2(const char *expect_id)
{
    Affinity__V1__RecommendRequest req;
    Affinity__V1__UserVector uv;
    vector_request(&req, &uv, 0);
    req.preset = "home";
    Affinity__V1__RecommendResponse *resp;
    transport_call_status st;
    cr_assert_eq(recommend(cl, &req, &resp, &st), 0, "%s", st.message);
    int ok = resp->n_hits >= 2 && strcmp(resp->hits[1]->id, expect_id) == 0 &&
             resp->hits[1]->reason->kind == AFFINITY__V1__REASON_KIND__REASON_KIND_PINNED;
    transport_client_free(&resp->base);
    return ok;
}

Test(server_pipeline, sighup_reloads_the_serving_config)
{
    cr_assert(home_pin_at_2("toys-03"), "the preset as started");
    /* A new preset in the file, with the file's modification time put back, so that only the
     * signal (not the once-a-second mtime check) can make the server read it. */
    struct stat before;
    cr_assert_eq(stat(presets_path, &before), 0);
    const char *text =
        "{\"presets\": {\"home\": {\"pins\": [{\"item_id\": \"books-07\", \"position\": 2}]}},"
        " \"collections\": {\"banners\": {\"ranked_by\": \"shop\"}}}";
    FILE *f = fopen(presets_path, "w");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(text, 1, strlen(text), f), strlen(text));
    fclose(f);
    struct timespec times[2] = {before.st_atim, before.st_mtim};
    cr_assert_eq(utimensat(AT_FDCWD, presets_path, times, 0), 0);
    usleep(1200 * 1000); /* past the mtime check's interval: it runs and sees no change */
    cr_assert(home_pin_at_2("toys-03"), "no reload without a signal (mtime unchanged)");
    cr_assert_eq(kill(srv.pid, SIGHUP), 0);
    bool reloaded = false;
    for (int i = 0; i < 100 && !reloaded; i++) {
        reloaded = home_pin_at_2("books-07");
        if (!reloaded) usleep(20 * 1000);
    }
    cr_assert(reloaded, "SIGHUP made the server read the new preset");
    cr_assert_eq(ts_health(cl), 1, "still serving after SIGHUP");
}

Test(server_pipeline, exploration_favours_an_item_upserted_just_now)
{
    /* The shop was upserted when the suite started; 1.5 s later a new item arrives, far from
     * the shopper: the relevance ranking would never show it, but exploration with
     * new_item_age_s = 1 favours it (the only item younger than 1 s) and takes it from the
     * newest items. */
    usleep(1500 * 1000);
    float far[DIM];
    for (int j = 0; j < DIM; j++)
        far[j] = -vecs[0][j];
    Affinity__V1__Item item = AFFINITY__V1__ITEM__INIT;
    item.id = "brand-new";
    item.n_vector = DIM;
    item.vector = far;
    item.category = "toys";
    Affinity__V1__Item *ip = &item;
    upsert_items(cl, &ip, 1);
    transport_call_status st;

    Affinity__V1__RecommendRequest req;
    Affinity__V1__UserVector uv;
    vector_request(&req, &uv, 0);
    Affinity__V1__Rules rules = AFFINITY__V1__RULES__INIT;
    Affinity__V1__Exploration ex = AFFINITY__V1__EXPLORATION__INIT;
    ex.share = 0.1f; /* one slot */
    ex.new_item_age_s = 1;
    rules.exploration = &ex;
    req.rules = &rules;
    for (uint64_t seed = 1; seed <= 3; seed++) {
        ex.seed = seed;
        Affinity__V1__RecommendResponse *resp;
        cr_assert_eq(recommend(cl, &req, &resp, &st), 0, "%s", st.message);
        cr_assert_eq(resp->n_hits, 10);
        int explored = 0;
        for (size_t i = 0; i < resp->n_hits; i++) {
            if (resp->hits[i]->reason->kind != AFFINITY__V1__REASON_KIND__REASON_KIND_EXPLORATION)
                continue;
            explored++;
            cr_assert_str_eq(resp->hits[i]->id, "brand-new", "seed %llu", (unsigned long long)seed);
        }
        cr_assert_eq(explored, 1, "seed %llu", (unsigned long long)seed);
        transport_client_free(&resp->base);
    }
}

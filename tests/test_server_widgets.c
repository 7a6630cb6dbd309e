/*
 * test_server_widgets.c: the shop's standard widgets (RecommendRequest.recipe) through a real
 * affinityd and a real client, each on a small hand-built event log with its exact expected
 * list: frequently bought together (one item and a cart; popularity-corrected, minimum
 * support), also viewed (session ids and the time-bucket fallback), also bought, trending
 * (overall and per category), best sellers (decayed purchases, per category), buy it again
 * (learned re-purchase interval, most due first), recently viewed (filters apply). Also:
 * DeleteUser and opt-out remove the per-user widgets, a dropped collection forgets its
 * widgets, layout slots take recipes, a restart rebuilds every list exactly
 * (the same lists and scores as the incremental state, with users whose window overflowed),
 * the events ImportEvents brings count like PutEvents', and bad requests are
 * INVALID_ARGUMENT naming the field.
 *
 * Expected co-occurrence lists follow from Dunning's G² (docs/widgets.md), computed by hand
 * for each log below (the values are in the comments).
 */
#include <criterion/criterion.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "server_helpers.h"

#define DIM    4
#define DAY_MS 86400000LL
#define HOUR   3600000LL

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Items "id:category" (category optional). */
static void shop(transport_client *cl, const char *coll, const char *const *items, int n)
{
    ts_create_collection(cl, coll, DIM, AFFINITY__V1__METRIC__METRIC_COSINE);
    Affinity__V1__Item it[32];
    Affinity__V1__Item *ptrs[32];
    char ids[32][32], cats[32][32];
    static float vec[32][DIM];
    uint64_t seed = 5;
    cr_assert_leq(n, 32);
    for (int i = 0; i < n; i++) {
        affinity__v1__item__init(&it[i]);
        snprintf(ids[i], sizeof ids[i], "%s", items[i]);
        char *colon = strchr(ids[i], ':');
        cats[i][0] = 0;
        if (colon) {
            snprintf(cats[i], sizeof cats[i], "%s", colon + 1);
            *colon = 0;
            it[i].category = cats[i];
        }
        for (int d = 0; d < DIM; d++)
            vec[i][d] = ts_randf(&seed);
        it[i].id = ids[i];
        it[i].n_vector = DIM;
        it[i].vector = vec[i];
        it[i].available = true;
        ptrs[i] = &it[i];
    }
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0);
    Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    req.collection = (char *)coll;
    req.n_items = (size_t)n;
    req.items = ptrs;
    cr_assert_eq(transport_client_stream_send(s, &req.base, &err), 0);
    transport_call_status st;
    Affinity__V1__UpsertItemsResponse *resp = NULL;
    transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                   (ProtobufCMessage **)&resp, &st);
    cr_assert_eq(st.code, 0, "%s", st.message);
    transport_client_free(&resp->base);
    transport_client_stream_destroy(s);
}

/* One event: "item", type, time, and an optional context key/value. */
typedef struct ev {
    const char *item;
    int type; /* EventType */
    int64_t ts;
    const char *key, *value;
} ev;

#define VIEW     AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW
#define CLICK    AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CLICK
#define PURCHASE AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE

static void put(transport_client *cl, const char *coll, const char *user, const ev *evs, int n)
{
    Affinity__V1__Event e[64];
    Affinity__V1__Event *p[64];
    Affinity__V1__Event__ContextEntry ce[64];
    Affinity__V1__Event__ContextEntry *cp[64];
    cr_assert_leq(n, 64);
    for (int i = 0; i < n; i++) {
        affinity__v1__event__init(&e[i]);
        e[i].item_id = (char *)evs[i].item;
        e[i].type = evs[i].type;
        e[i].timestamp_ms = evs[i].ts;
        if (evs[i].key) {
            affinity__v1__event__context_entry__init(&ce[i]);
            ce[i].key = (char *)evs[i].key;
            ce[i].value = (char *)evs[i].value;
            cp[i] = &ce[i];
            e[i].n_context = 1;
            e[i].context = &cp[i];
        }
        p[i] = &e[i];
    }
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = (char *)coll;
    req.user_id = (char *)user;
    req.n_events = (size_t)n;
    req.events = p;
    Affinity__V1__PutEventsResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_PUT_EVENTS, &req,
                         &affinity__v1__put_events_response__descriptor, 0, &resp, &st),
                 0, "%s", st.message);
    cr_assert_eq(resp->applied_count, (uint32_t)n, "%s: %u of %d applied", user,
                 resp->applied_count, n);
    transport_client_free(&resp->base);
}

/* The same user buying items in one order. */
static void order(transport_client *cl, const char *coll, const char *user, const char *oid,
                  const char *items, int64_t ts)
{
    ev e[16];
    static char one[16][2];
    int n = 0;
    for (const char *c = items; *c; c++, n++) {
        one[n][0] = *c;
        one[n][1] = 0;
        e[n] = (ev){one[n], PURCHASE, ts, "order_id", oid};
    }
    put(cl, coll, user, e, n);
}

typedef struct widget_query {
    const char *coll;
    int recipe;
    const char *user;
    const char *const *items;
    int n_items;
    uint32_t k;
    Affinity__V1__Filter *filter;
    Affinity__V1__Rules *rules;
} widget_query;

static int ask(transport_client *cl, const widget_query *q, Affinity__V1__RecommendResponse **out,
               transport_call_status *st)
{
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    req.collection = (char *)q->coll;
    req.recipe = q->recipe;
    if (q->user) {
        req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
        req.user_id = (char *)q->user;
    }
    req.n_item_ids = (size_t)q->n_items;
    req.item_ids = (char **)q->items;
    req.k = q->k ? q->k : 10;
    req.filter = q->filter;
    req.rules = q->rules;
    *out = NULL;
    return ts_call(cl, TRANSPORT_METHOD_RECOMMEND, &req,
                   &affinity__v1__recommend_response__descriptor, 0, out, st);
}

/* Asserts the answer's ids are exactly `want` (comma-separated, "" for none). */
static Affinity__V1__RecommendResponse *expect(transport_client *cl, const widget_query *q,
                                               const char *want)
{
    Affinity__V1__RecommendResponse *r;
    transport_call_status st;
    cr_assert_eq(ask(cl, q, &r, &st), 0, "%s", st.message);
    char got[512] = "";
    for (size_t i = 0; i < r->n_hits; i++) {
        if (i) strcat(got, ",");
        strcat(got, r->hits[i]->id);
    }
    cr_assert_str_eq(got, want, "recipe %d on %s: got [%s], want [%s]", q->recipe, q->coll, got,
                     want);
    return r;
}

static void expect_bad(transport_client *cl, const widget_query *q, const char *field)
{
    Affinity__V1__RecommendResponse *r;
    transport_call_status st;
    int code = ask(cl, q, &r, &st);
    cr_assert_eq(code, TS_INVALID_ARGUMENT, "code %d: %s", code, st.message);
    cr_assert(strstr(st.message, field), "message \"%s\" does not name %s", st.message, field);
}

static void delete_user(transport_client *cl, const char *coll, const char *user)
{
    Affinity__V1__DeleteUserRequest req = AFFINITY__V1__DELETE_USER_REQUEST__INIT;
    req.collection = (char *)coll;
    req.user_id = (char *)user;
    Affinity__V1__DeleteUserResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DELETE_USER, &req,
                         &affinity__v1__delete_user_response__descriptor, 0, &resp, &st),
                 0, "%s", st.message);
    transport_client_free(&resp->base);
}

#define R(name) AFFINITY__V1__RECIPE__RECIPE_##name
#define REASON(name) AFFINITY__V1__REASON_KIND__REASON_KIND_##name

static test_server srv;
static transport_client *cl;
static char config_path[64];

/* A serving config whose layout "shelf" shows a shopper's recently viewed items, then best
 * sellers (widgets that need no item ids can fill page slots). */
static void start(void)
{
    const char *text =
        "{\"presets\": {}, \"layouts\": {\"shelf\": ["
        "{\"name\": \"again\", \"collection\": \"pg\", \"k\": 2, \"recipe\": \"recently_viewed\"},"
        "{\"name\": \"top\", \"collection\": \"pg\", \"k\": 3, \"recipe\": \"best_sellers\"}]}}";
    ts_write_temp_file(config_path, sizeof config_path, "widgets", text);
    const char *args[] = {"--log-level", "warn", "--serving-config", config_path, NULL};
    ts_start_serving(&srv, args);
    cl = ts_client(&srv, NULL);
}

static void stop(void)
{
    transport_client_destroy(cl);
    ts_stop(&srv, SIGTERM, 20000);
    unlink(config_path);
}

TestSuite(server_widgets, .init = start, .fini = stop, .timeout = 120);

/* Orders (each a different shopper): o1 ABCP, o2 ABP, o3 ABDP, o4 ACP, o5 EFP, o6 EFP,
 * o7 CEP. N = 7 baskets; P is in every one (no association: P never shows), D shares one
 * basket with A (below the minimum support of 2). G² with A: B 5.062 (3 of A's 4 baskets,
 * B's all), C 0.196 (2 of A's 4, C's 3); with E: F 4.557. */
static void orders_log(transport_client *c, const char *coll, int64_t t)
{
    order(c, coll, "u1", "o1", "ABCP", t);
    order(c, coll, "u2", "o2", "ABP", t);
    order(c, coll, "u3", "o3", "ABDP", t);
    order(c, coll, "u4", "o4", "ACP", t);
    order(c, coll, "u5", "o5", "EFP", t);
    order(c, coll, "u6", "o6", "EFP", t);
    order(c, coll, "u7", "o7", "CEP", t);
}

static const char *const fbt_items[] = {"A:x", "B:y", "C:x", "D:x", "E:x",
                                        "F:x", "G:x", "P:x"};

Test(server_widgets, frequently_bought_together_one_item_and_a_cart)
{
    shop(cl, "fbt", fbt_items, 8);
    orders_log(cl, "fbt", wall_ms() - HOUR);
    const char *a[] = {"A"};
    widget_query q = {.coll = "fbt", .recipe = R(FREQUENTLY_BOUGHT_TOGETHER), .items = a,
                      .n_items = 1};
    Affinity__V1__RecommendResponse *r = expect(cl, &q, "B,C");
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_FREQUENTLY_BOUGHT_TOGETHER);
    cr_assert_float_eq(r->hits[0]->score, 5.0620323f, 1e-4);
    cr_assert_float_eq(r->hits[1]->score, 0.1964510f, 1e-4);
    for (size_t i = 0; i < r->n_hits; i++) {
        cr_assert_eq(r->hits[i]->reason->kind, REASON(BOUGHT_TOGETHER));
        cr_assert_str_eq(r->hits[i]->reason->related_item_id, "A");
    }
    transport_client_free(&r->base);
    /* A cart of A and E: B (5.062 from A), F (4.557 from E), C (0.196 from A). */
    const char *cart[] = {"A", "E"};
    q.items = cart;
    q.n_items = 2;
    r = expect(cl, &q, "B,F,C");
    cr_assert_str_eq(r->hits[1]->reason->related_item_id, "E");
    transport_client_free(&r->base);
    /* Filters apply: category y (B) excluded. */
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    char *y = "y";
    f.n_exclude_categories = 1;
    f.exclude_categories = &y;
    q.filter = &f;
    transport_client_free(&expect(cl, &q, "F,C")->base);
    /* Rules apply: a pin at position 1. */
    q.filter = NULL;
    q.items = a;
    q.n_items = 1;
    Affinity__V1__Rules rules = AFFINITY__V1__RULES__INIT;
    Affinity__V1__Pin pin = AFFINITY__V1__PIN__INIT;
    pin.item_id = "G";
    pin.position = 1;
    Affinity__V1__Pin *pins[1] = {&pin};
    rules.n_pins = 1;
    rules.pins = pins;
    q.rules = &rules;
    r = expect(cl, &q, "G,B,C");
    cr_assert_eq(r->hits[0]->reason->kind, REASON(PINNED));
    transport_client_free(&r->base);
}

Test(server_widgets, also_bought_spans_a_shoppers_orders)
{
    shop(cl, "ab", fbt_items, 8);
    int64_t t = wall_ms() - 3 * DAY_MS;
    orders_log(cl, "ab", t);
    /* u1 and u2 later buy G (with P, still in every order) in other orders: also bought
     * (same shopper), never bought together. Users: A in u1..u4; G in u1, u2: G² 2.831;
     * B 5.062; C 0.196. */
    order(cl, "ab", "u1", "o8", "GP", t + DAY_MS);
    order(cl, "ab", "u2", "o9", "GP", t + 2 * DAY_MS);
    const char *a[] = {"A"};
    widget_query q = {.coll = "ab", .recipe = R(ALSO_BOUGHT), .items = a, .n_items = 1};
    Affinity__V1__RecommendResponse *r = expect(cl, &q, "B,G,C");
    cr_assert_eq(r->hits[1]->reason->kind, REASON(ALSO_BOUGHT));
    cr_assert_float_eq(r->hits[1]->score, 2.8305968f, 1e-4);
    transport_client_free(&r->base);
    q.recipe = R(FREQUENTLY_BOUGHT_TOGETHER);
    transport_client_free(&expect(cl, &q, "B,C")->base);
}

Test(server_widgets, also_viewed_by_session_and_by_time_bucket)
{
    static const char *const items[] = {"X", "Y", "Z", "W", "Q"};
    shop(cl, "av", items, 5);
    int64_t t = wall_ms() - HOUR;
    /* Sessions: v1 XYZ, v2 XY, v3 YZW (ids); v4 XY and v5 XY (no id: one time bucket each,
     * same timestamp); v6 ZW, v7 WQ. N = 7. X: Y in all 4 of X's (Y in 5): associated;
     * Z once. Z: W 2 of 3 (W in 3): associated; Y 2 of 3 (Y in 5): not. Were the id-less
     * views not grouped, X and Y would share 2 of 9 baskets: not associated. */
    ev v1[] = {{"X", VIEW, t, "session_id", "s1"}, {"Y", CLICK, t + 1000, "session_id", "s1"},
               {"Z", VIEW, t + 2000, "session_id", "s1"}};
    ev v2[] = {{"X", VIEW, t, "session_id", "s2"}, {"Y", VIEW, t + 1000, "session_id", "s2"}};
    ev v3[] = {{"Y", VIEW, t, "session_id", "s3"}, {"Z", VIEW, t, "session_id", "s3"},
               {"W", VIEW, t, "session_id", "s3"}};
    ev v4[] = {{"X", VIEW, t, NULL, NULL}, {"Y", VIEW, t, NULL, NULL}};
    ev v6[] = {{"Z", VIEW, t, "session_id", "s6"}, {"W", VIEW, t, "session_id", "s6"}};
    ev v7[] = {{"W", VIEW, t, "session_id", "s7"}, {"Q", VIEW, t, "session_id", "s7"}};
    put(cl, "av", "v1", v1, 3);
    put(cl, "av", "v2", v2, 2);
    put(cl, "av", "v3", v3, 3);
    put(cl, "av", "v4", v4, 2);
    put(cl, "av", "v5", v4, 2);
    put(cl, "av", "v6", v6, 2);
    put(cl, "av", "v7", v7, 2);
    const char *x[] = {"X"}, *z[] = {"Z"};
    widget_query q = {.coll = "av", .recipe = R(ALSO_VIEWED), .items = x, .n_items = 1};
    Affinity__V1__RecommendResponse *r = expect(cl, &q, "Y");
    cr_assert_eq(r->hits[0]->reason->kind, REASON(ALSO_VIEWED));
    cr_assert_str_eq(r->hits[0]->reason->related_item_id, "X");
    transport_client_free(&r->base);
    q.items = z;
    transport_client_free(&expect(cl, &q, "W")->base);
}

Test(server_widgets, trending_overall_and_per_category)
{
    static const char *const items[] = {"t1:hot", "t2:hot", "t3:cool", "t4:cool"};
    shop(cl, "tr", items, 4);
    int64_t now = wall_ms();
    char user[16];
    /* t1: 8 views in the last hour. t3: 6 views in the last two hours, 3 ten days ago.
     * t2: 20 views 15-20 days ago, 1 today: falling. t4: 2 views now: below the minimum
     * volume (5). Score (s - E) / sqrt(E + 1): t1 ≈ 5.8, t3 ≈ 4.4. */
    for (int i = 0; i < 8; i++) {
        snprintf(user, sizeof user, "a%d", i);
        ev e = {"t1", VIEW, now - HOUR + i * 60000, NULL, NULL};
        put(cl, "tr", user, &e, 1);
    }
    for (int i = 0; i < 6; i++) {
        snprintf(user, sizeof user, "b%d", i);
        ev e[2] = {{"t3", VIEW, now - 2 * HOUR + i * 60000, NULL, NULL},
                   {"t3", VIEW, now - 10 * DAY_MS, NULL, NULL}};
        put(cl, "tr", user, e, i < 3 ? 2 : 1);
    }
    for (int i = 0; i < 20; i++) {
        snprintf(user, sizeof user, "c%d", i);
        ev e = {"t2", VIEW, now - 15 * DAY_MS - i * 6 * HOUR, NULL, NULL};
        put(cl, "tr", user, &e, 1);
    }
    ev late = {"t2", VIEW, now - HOUR, NULL, NULL};
    put(cl, "tr", "c0", &late, 1);
    ev t4[2] = {{"t4", VIEW, now, NULL, NULL}, {"t4", CLICK, now, NULL, NULL}};
    put(cl, "tr", "d0", t4, 2);
    widget_query q = {.coll = "tr", .recipe = R(TRENDING)};
    Affinity__V1__RecommendResponse *r = expect(cl, &q, "t1,t3");
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_TRENDING);
    cr_assert_eq(r->hits[0]->reason->kind, REASON(TRENDING));
    cr_assert_gt(r->hits[0]->score, 5.0f);
    cr_assert_lt(r->hits[0]->score, 6.5f);
    transport_client_free(&r->base);
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    char *cool = "cool";
    f.n_categories = 1;
    f.categories = &cool;
    q.filter = &f;
    transport_client_free(&expect(cl, &q, "t3")->base);
}

Test(server_widgets, best_sellers_decayed_purchases_per_category)
{
    static const char *const items[] = {"b1:a", "b2:a", "b3:z", "b4:z"};
    shop(cl, "bs", items, 4);
    int64_t now = wall_ms();
    /* b1: 3 purchases now (3.0); b3: 2 now (2.0); b2: 5 fourteen days ago (two half-lives:
     * 1.25); b4: 10 views, no purchase. */
    ev b1[3] = {{"b1", PURCHASE, now, NULL, NULL}, {"b1", PURCHASE, now, NULL, NULL},
                {"b1", PURCHASE, now, NULL, NULL}};
    put(cl, "bs", "s1", b1, 3);
    ev b3[2] = {{"b3", PURCHASE, now, NULL, NULL}, {"b3", PURCHASE, now, NULL, NULL}};
    put(cl, "bs", "s2", b3, 2);
    ev b2[5];
    for (int i = 0; i < 5; i++)
        b2[i] = (ev){"b2", PURCHASE, now - 14 * DAY_MS, NULL, NULL};
    put(cl, "bs", "s3", b2, 5);
    ev b4[10];
    for (int i = 0; i < 10; i++)
        b4[i] = (ev){"b4", VIEW, now, NULL, NULL};
    put(cl, "bs", "s4", b4, 10);
    widget_query q = {.coll = "bs", .recipe = R(BEST_SELLERS)};
    Affinity__V1__RecommendResponse *r = expect(cl, &q, "b1,b3,b2");
    cr_assert_float_eq(r->hits[0]->score, 3.0f, 0.01);
    cr_assert_float_eq(r->hits[2]->score, 1.25f, 0.01);
    cr_assert_eq(r->hits[0]->reason->kind, REASON(BEST_SELLER));
    transport_client_free(&r->base);
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    char *z = "z";
    f.n_categories = 1;
    f.categories = &z;
    q.filter = &f;
    transport_client_free(&expect(cl, &q, "b3")->base);
}

Test(server_widgets, buy_it_again_most_due_first_and_delete_user)
{
    static const char *const items[] = {"milk:food", "coffee:drink", "tv:tech"};
    shop(cl, "ba", items, 3);
    int64_t now = wall_ms();
    /* Intervals learned from others: milk 7 days (x1, x2), coffee 30 days (x3); nobody
     * bought a tv twice. "me" bought milk 6 days ago (due 6/7), coffee 45 days ago (due
     * 1.5) and a tv 100 days ago (no interval: not shown). */
    ev x1[3] = {{"milk", PURCHASE, now - 20 * DAY_MS, NULL, NULL},
                {"milk", PURCHASE, now - 13 * DAY_MS, NULL, NULL},
                {"tv", PURCHASE, now - 13 * DAY_MS, NULL, NULL}};
    ev x2[2] = {{"milk", PURCHASE, now - 30 * DAY_MS, NULL, NULL},
                {"milk", PURCHASE, now - 23 * DAY_MS, NULL, NULL}};
    ev x3[2] = {{"coffee", PURCHASE, now - 90 * DAY_MS, NULL, NULL},
                {"coffee", PURCHASE, now - 60 * DAY_MS, NULL, NULL}};
    ev me[3] = {{"tv", PURCHASE, now - 100 * DAY_MS, NULL, NULL},
                {"coffee", PURCHASE, now - 45 * DAY_MS, NULL, NULL},
                {"milk", PURCHASE, now - 6 * DAY_MS, NULL, NULL}};
    put(cl, "ba", "x1", x1, 3);
    put(cl, "ba", "x2", x2, 2);
    put(cl, "ba", "x3", x3, 2);
    put(cl, "ba", "me", me, 3);
    widget_query q = {.coll = "ba", .recipe = R(BUY_IT_AGAIN), .user = "me"};
    Affinity__V1__RecommendResponse *r = expect(cl, &q, "coffee,milk");
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_BUY_IT_AGAIN);
    cr_assert_float_eq(r->hits[0]->score, 1.5f, 0.001);
    cr_assert_float_eq(r->hits[1]->score, 6.0f / 7.0f, 0.001);
    cr_assert_eq(r->hits[0]->reason->kind, REASON(BOUGHT_BEFORE));
    transport_client_free(&r->base);
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    char *drink = "drink";
    f.n_exclude_categories = 1;
    f.exclude_categories = &drink;
    q.filter = &f;
    transport_client_free(&expect(cl, &q, "milk")->base);
    q.filter = NULL;
    /* x3 is erased: nobody re-bought coffee any more. Then "me" is erased: nothing. */
    delete_user(cl, "ba", "x3");
    transport_client_free(&expect(cl, &q, "milk")->base);
    delete_user(cl, "ba", "me");
    transport_client_free(&expect(cl, &q, "")->base);
}

Test(server_widgets, recently_viewed_distinct_newest_first_with_filters)
{
    static const char *const items[] = {"a", "b", "c", "d", "e"};
    shop(cl, "rv", items, 5);
    int64_t t = wall_ms() - HOUR;
    ev e[6] = {{"a", VIEW, t, NULL, NULL},         {"b", VIEW, t + 1000, NULL, NULL},
               {"a", VIEW, t + 2000, NULL, NULL},  {"c", VIEW, t + 3000, NULL, NULL},
               {"d", CLICK, t + 4000, NULL, NULL}, {"e", PURCHASE, t + 5000, NULL, NULL}};
    put(cl, "rv", "v", e, 6);
    put(cl, "rv", "w", e, 6);
    put(cl, "rv", "z", e + 5, 1);
    widget_query q = {.coll = "rv", .recipe = R(RECENTLY_VIEWED), .user = "v"};
    Affinity__V1__RecommendResponse *r = expect(cl, &q, "d,c,a,b");
    cr_assert_eq(r->hits[0]->reason->kind, REASON(RECENTLY_VIEWED));
    transport_client_free(&r->base);
    q.k = 2;
    transport_client_free(&expect(cl, &q, "d,c")->base);
    q.k = 0;
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    char *cid = "c";
    f.n_exclude_ids = 1;
    f.exclude_ids = &cid;
    q.filter = &f;
    transport_client_free(&expect(cl, &q, "d,a,b")->base);
    q.filter = NULL;
    delete_user(cl, "rv", "v");
    transport_client_free(&expect(cl, &q, "")->base);
    /* Opting out erases the shopper's widgets too; non-personal widgets still answer. */
    Affinity__V1__SetUserOptOutRequest oo = AFFINITY__V1__SET_USER_OPT_OUT_REQUEST__INIT;
    oo.collection = "";
    oo.user_id = "w";
    oo.opt_out = true;
    Affinity__V1__SetUserOptOutResponse *oresp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, "/affinity.v1.Affinity/SetUserOptOut", &oo,
                         &affinity__v1__set_user_opt_out_response__descriptor, 0, &oresp, &st),
                 0, "%s", st.message);
    transport_client_free(&oresp->base);
    q.user = "w";
    transport_client_free(&expect(cl, &q, "")->base);
    widget_query bs = {.coll = "rv", .recipe = R(BEST_SELLERS), .user = "w"};
    transport_client_free(&expect(cl, &bs, "e")->base);
}

Test(server_widgets, imported_events_count_like_put_events)
{
    static const char *const items[] = {"m1", "m2", "m3"};
    shop(cl, "im", items, 3);
    int64_t t = wall_ms() - HOUR;
    Affinity__V1__Event e[3];
    Affinity__V1__ImportedEvent ie[3];
    Affinity__V1__ImportedEvent *p[3];
    const char *seq[3] = {"m2", "m3", "m1"};
    for (int i = 0; i < 3; i++) {
        affinity__v1__event__init(&e[i]);
        affinity__v1__imported_event__init(&ie[i]);
        e[i].item_id = (char *)seq[i];
        e[i].type = VIEW;
        e[i].timestamp_ms = t + i * 1000;
        ie[i].user_id = "importer";
        ie[i].event = &e[i];
        p[i] = &ie[i];
    }
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_IMPORT_EVENTS, 60000, &s, &err), 0);
    Affinity__V1__ImportEventsRequest req = AFFINITY__V1__IMPORT_EVENTS_REQUEST__INIT;
    req.collection = "im";
    req.n_events = 3;
    req.events = p;
    cr_assert_eq(transport_client_stream_send(s, &req.base, &err), 0);
    ProtobufCMessage *resp = NULL;
    transport_call_status st;
    transport_client_stream_finish(s, &affinity__v1__import_events_response__descriptor, &resp, &st);
    transport_client_stream_destroy(s);
    cr_assert_eq(st.code, 0, "%s", st.message);
    transport_client_free(resp);
    widget_query q = {.coll = "im", .recipe = R(RECENTLY_VIEWED), .user = "importer"};
    transport_client_free(&expect(cl, &q, "m1,m3,m2")->base);
}

Test(server_widgets, page_layout_slots_take_recipes)
{
    static const char *const items[] = {"p1", "p2", "p3", "p4"};
    shop(cl, "pg", items, 4);
    int64_t t = wall_ms() - HOUR;
    /* Best sellers p1 (3), p2 (2), p3 (1); the shopper viewed p4 then p1. The page shows
     * [p1, p4] as recently viewed; best sellers then leave out p1 (shown above): [p2, p3]. */
    ev b[6] = {{"p1", PURCHASE, t, NULL, NULL}, {"p1", PURCHASE, t, NULL, NULL},
               {"p1", PURCHASE, t, NULL, NULL}, {"p2", PURCHASE, t, NULL, NULL},
               {"p2", PURCHASE, t, NULL, NULL}, {"p3", PURCHASE, t, NULL, NULL}};
    put(cl, "pg", "buyer", b, 6);
    ev v[2] = {{"p4", VIEW, t, NULL, NULL}, {"p1", VIEW, t + 1000, NULL, NULL}};
    put(cl, "pg", "shopper", v, 2);
    Affinity__V1__RecommendPageRequest req = AFFINITY__V1__RECOMMEND_PAGE_REQUEST__INIT;
    req.user_id = "shopper";
    req.layout = "shelf";
    Affinity__V1__RecommendPageResponse *r = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RECOMMEND_PAGE, &req,
                         &affinity__v1__recommend_page_response__descriptor, 0, &r, &st),
                 0, "%s", st.message);
    cr_assert_eq(r->n_slots, 2);
    cr_assert_eq(r->slots[0]->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_RECENTLY_VIEWED);
    cr_assert_eq(r->slots[0]->n_hits, 2);
    cr_assert_str_eq(r->slots[0]->hits[0]->id, "p1");
    cr_assert_str_eq(r->slots[0]->hits[1]->id, "p4");
    cr_assert_eq(r->slots[1]->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_BEST_SELLERS);
    cr_assert_eq(r->slots[1]->n_hits, 2);
    cr_assert_str_eq(r->slots[1]->hits[0]->id, "p2");
    cr_assert_str_eq(r->slots[1]->hits[1]->id, "p3");
    transport_client_free(&r->base);
}

Test(server_widgets, a_dropped_collection_forgets_its_widgets)
{
    static const char *const items[] = {"d1", "d2"};
    shop(cl, "dc", items, 2);
    ev e = {"d1", PURCHASE, wall_ms() - HOUR, NULL, NULL};
    put(cl, "dc", "buyer", &e, 1);
    widget_query q = {.coll = "dc", .recipe = R(BEST_SELLERS)};
    transport_client_free(&expect(cl, &q, "d1")->base);
    Affinity__V1__DropCollectionRequest drop = AFFINITY__V1__DROP_COLLECTION_REQUEST__INIT;
    drop.name = "dc";
    Affinity__V1__DropCollectionResponse *dr = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DROP_COLLECTION, &drop,
                         &affinity__v1__drop_collection_response__descriptor, 0, &dr, &st),
                 0, "%s", st.message);
    transport_client_free(&dr->base);
    shop(cl, "dc", items, 2);
    transport_client_free(&expect(cl, &q, "")->base);
    q.recipe = R(RECENTLY_VIEWED);
    q.user = "buyer";
    transport_client_free(&expect(cl, &q, "")->base);
}

Test(server_widgets, bad_requests_name_the_field)
{
    static const char *const items[] = {"i1", "i2"};
    shop(cl, "bad", items, 2);
    const char *one[] = {"i1"};
    widget_query q = {.coll = "bad", .recipe = 99};
    expect_bad(cl, &q, "recipe = 99");
    q.recipe = R(FREQUENTLY_BOUGHT_TOGETHER);
    expect_bad(cl, &q, "item_ids");
    const char *many[65];
    for (int i = 0; i < 65; i++)
        many[i] = "i1";
    q.items = many;
    q.n_items = 65;
    expect_bad(cl, &q, "item_ids");
    q.recipe = R(TRENDING);
    q.items = one;
    q.n_items = 1;
    expect_bad(cl, &q, "item_ids");
    q.recipe = R(PERSONALIZED);
    expect_bad(cl, &q, "item_ids");
    q.items = NULL;
    q.n_items = 0;
    q.recipe = R(BUY_IT_AGAIN);
    expect_bad(cl, &q, "user_id");
    q.recipe = R(RECENTLY_VIEWED);
    expect_bad(cl, &q, "user_id");
    /* The server keeps serving. */
    q.recipe = R(TRENDING);
    transport_client_free(&expect(cl, &q, "")->base);
}

/* ---- restart: the rebuilt statistics equal the incremental ones ---- */

static void start_on(test_server *s, const char *data_dir)
{
    const char *args[] = {"--data-dir", data_dir, "--log-level", "warn",
                          "--widget-user-events", "4", NULL};
    if (ts_start(s, NULL, args) != 0 || !ts_wait_serving(s, NULL)) {
        ts_dump_log(s);
        cr_assert_fail("affinityd did not start");
    }
}

#define N_SNAP 8
#define SNAP_HITS 64

/* Every widget's answer: as text (ids and scores to 4 significant digits) in out, its ids
 * alone ("id,id,...") in ids and its scores in full in scores (at most SNAP_HITS each). */
typedef struct snap {
    char out[N_SNAP][1024], ids[N_SNAP][1024];
    float scores[N_SNAP][SNAP_HITS];
} snap;

static void snapshot(transport_client *c, snap *sn)
{
    const char *a[] = {"A"}, *cart[] = {"A", "E"}, *x[] = {"X"};
    widget_query qs[N_SNAP] = {
        {.coll = "rs", .recipe = R(FREQUENTLY_BOUGHT_TOGETHER), .items = a, .n_items = 1},
        {.coll = "rs", .recipe = R(FREQUENTLY_BOUGHT_TOGETHER), .items = cart, .n_items = 2},
        {.coll = "rs", .recipe = R(ALSO_BOUGHT), .items = a, .n_items = 1},
        {.coll = "rs", .recipe = R(ALSO_VIEWED), .items = x, .n_items = 1},
        {.coll = "rs", .recipe = R(TRENDING)},
        {.coll = "rs", .recipe = R(BEST_SELLERS)},
        {.coll = "rs", .recipe = R(BUY_IT_AGAIN), .user = "u5"},
        {.coll = "rs", .recipe = R(RECENTLY_VIEWED), .user = "viewer"},
    };
    for (int i = 0; i < N_SNAP; i++) {
        Affinity__V1__RecommendResponse *r;
        transport_call_status st;
        cr_assert_eq(ask(c, &qs[i], &r, &st), 0, "%s", st.message);
        sn->out[i][0] = sn->ids[i][0] = 0;
        cr_assert_leq(r->n_hits, SNAP_HITS);
        for (size_t h = 0; h < r->n_hits; h++) {
            sn->scores[i][h] = r->hits[h]->score;
            char one[64];
            /* Scores to 4 significant digits: decayed sums are summed in another order. */
            snprintf(one, sizeof one, "%s%s=%.4g", h ? "," : "", r->hits[h]->id,
                     (double)r->hits[h]->score);
            strcat(sn->out[i], one);
            snprintf(one, sizeof one, "%s%s", h ? "," : "", r->hits[h]->id);
            strcat(sn->ids[i], one);
        }
        transport_client_free(&r->base);
    }
}

Test(server_widgets, restart_rebuilds_the_same_lists, .timeout = 180)
{
    char data[256];
    ts_make_dir(data, sizeof data, "widgets");
    test_server s;
    start_on(&s, data);
    transport_client *c = ts_client(&s, NULL);
    static const char *const items[] = {"A", "B", "C", "D", "E", "F", "G", "P", "X", "Y", "Z"};
    shop(c, "rs", items, 11);
    int64_t now = wall_ms();
    orders_log(c, "rs", now - 40 * DAY_MS);
    order(c, "rs", "u5", "o8", "E", now - 10 * DAY_MS); /* u5 re-buys E after 30 days */
    order(c, "rs", "u2", "o9", "G", now - 9 * DAY_MS);
    for (int i = 0; i < 6; i++) {
        ev v[2] = {{"X", VIEW, now - HOUR, "session_id", "s"}, {"Y", VIEW, now - HOUR, "session_id", "s"}};
        char user[8];
        snprintf(user, sizeof user, "w%d", i);
        put(c, "rs", user, v, 2);
    }
    /* viewer's window is 4 events: the first three (Z, X, Z) fall out of it, and with them
     * its Z-X session; recently viewed is what remains. */
    ev vw[7] = {{"Z", VIEW, now - 5 * HOUR, "session_id", "z"}, {"X", VIEW, now - 5 * HOUR, "session_id", "z"},
                {"Z", VIEW, now - 4 * HOUR, "session_id", "z"}, {"Y", VIEW, now - 3 * HOUR, NULL, NULL},
                {"B", VIEW, now - 2 * HOUR, NULL, NULL},       {"Y", VIEW, now - HOUR, NULL, NULL},
                {"C", CLICK, now - HOUR + 1, NULL, NULL}};
    put(c, "rs", "viewer", vw, 7);
    static snap before_snap, after_snap; /* large for the stack */
    snapshot(c, &before_snap);
    char(*before)[1024] = before_snap.out, (*after)[1024] = after_snap.out;
    cr_assert(strncmp(before[0], "B=", 2) == 0, "%s", before[0]);
    cr_assert_str_eq(before[6], "E=0.3333", "buy it again: %s", before[6]);
    cr_assert(strncmp(before[7], "C=", 2) == 0 && strstr(before[7], ",Y=") && strstr(before[7], ",B=") &&
                  !strstr(before[7], "Z") && !strstr(before[7], "X"),
              "recently viewed: %s", before[7]);
    Affinity__V1__ServerInfo *info = ts_server_info(c);
    cr_assert_gt(info->widget_events_held, 0);
    cr_assert_gt(info->widget_neighbours, 0);
    cr_assert_gt(info->widget_memory_bytes, 0);
    uint64_t held = info->widget_events_held;
    transport_client_free(&info->base);
    transport_client_destroy(c);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);

    start_on(&s, data);
    c = ts_client(&s, NULL);
    snapshot(c, &after_snap);
    for (int i = 0; i < N_SNAP; i++) {
        cr_log_info("widget %d: %s", i, before[i]);
        cr_assert(before[i][0], "widget %d answered nothing: not a test", i);
    }
    /* The same ids in the same order; the same scores but for the decay of the seconds the
     * restart took (trending and best sellers decay against the clock: days of half-life, so
     * well under 1e-3) and the order decayed sums are added in. */
    for (int i = 0; i < N_SNAP; i++) {
        cr_assert_str_eq(after_snap.ids[i], before_snap.ids[i],
                         "widget %d after the restart: [%s], before [%s]", i, after[i], before[i]);
        size_t n = 0; /* hits: the ids are the same */
        for (const char *p = before[i]; *p; p++)
            n += *p == '=';
        for (size_t h = 0; h < n; h++) {
            const float x = before_snap.scores[i][h], y = after_snap.scores[i][h];
            cr_assert(fabsf(x - y) <= 1e-3f * fmaxf(fabsf(x), fabsf(y)) + 1e-6f,
                      "widget %d, hit %zu: score %.7g after the restart, %.7g before (%s)", i, h,
                      (double)y, (double)x, before[i]);
        }
    }
    info = ts_server_info(c);
    cr_assert_eq(info->widget_events_held, held);
    transport_client_free(&info->base);
    transport_client_destroy(c);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    ts_remove_path(data);
}

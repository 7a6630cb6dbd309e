/*
 * test_server_profiles.c: end-to-end durability and profiles of a real affinityd, through
 * gRPC: restart on the same --data-dir with identical answers, SIGKILL in the middle of a
 * stream of writes (ten rounds: every acknowledged write present, nothing half-written), and
 * the behaviour of profiles (category affinity, exclusions, popularity for new users,
 * DeleteUser, item deletes, per-event rejections, Rerank and BatchRecommend by user id).
 *
 * The catalog: N_CATS categories of N_PER_CAT items each, clustered around one centroid per
 * category, so a user who interacts with one category has a profile near its centroid.
 */
#include <criterion/criterion.h>

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "server_helpers.h"

#define DIM       16
#define N_CATS    4
#define N_PER_CAT 25
#define N_ITEMS   (N_CATS * N_PER_CAT)

static const char *const cat_names[N_CATS] = {"shoes", "books", "garden", "toys"};

typedef struct shop {
    char id[N_ITEMS][16];
    float vec[N_ITEMS][DIM];
    int cat[N_ITEMS];
    float price[N_ITEMS];
} shop;

static shop sh;

static void shop_build(uint64_t seed)
{
    float centroid[N_CATS][DIM];
    for (int c = 0; c < N_CATS; c++)
        for (int j = 0; j < DIM; j++)
            centroid[c][j] = ts_randf(&seed);
    for (int i = 0; i < N_ITEMS; i++) {
        int c = i / N_PER_CAT;
        snprintf(sh.id[i], sizeof sh.id[i], "%s-%02d", cat_names[c], i % N_PER_CAT);
        for (int j = 0; j < DIM; j++)
            sh.vec[i][j] = centroid[c][j] + 0.15f * ts_randf(&seed);
        sh.cat[i] = c;
        sh.price[i] = 10.0f + (float)(i % 7);
    }
}

/* The category index of an item id of the shop. */
static int cat_of(const char *id)
{
    for (int c = 0; c < N_CATS; c++)
        if (strncmp(id, cat_names[c], strlen(cat_names[c])) == 0) return c;
    return -1;
}

/* ---- calls ---------------------------------------------------------------------------------- */

/* Upserts items [from, to) of the shop in messages of `per_msg`; returns the gRPC code. */
static int upsert_range(transport_client *cl, const char *collection, int from, int to, int per_msg)
{
    transport_client_stream *s = NULL;
    aff_err err;
    if (transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err)) return -1;
    Affinity__V1__Item items[N_ITEMS];
    Affinity__V1__Item *ptrs[N_ITEMS];
    char *cats[N_ITEMS];
    for (int base = from; base < to; base += per_msg) {
        Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
        req.collection = (char *)collection;
        int n = to - base < per_msg ? to - base : per_msg;
        for (int i = 0; i < n; i++) {
            int g = base + i;
            affinity__v1__item__init(&items[i]);
            items[i].id = sh.id[g];
            items[i].n_vector = DIM;
            items[i].vector = sh.vec[g];
            cats[i] = (char *)cat_names[sh.cat[g]];
            items[i].category = cats[i];
            items[i].price = sh.price[g];
            ptrs[i] = &items[i];
        }
        req.n_items = (size_t)n;
        req.items = ptrs;
        if (transport_client_stream_send(s, &req.base, &err)) break;
    }
    Affinity__V1__UpsertItemsResponse *resp = NULL;
    transport_call_status st;
    transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                   (ProtobufCMessage **)&resp, &st);
    transport_client_free(resp ? &resp->base : NULL);
    transport_client_stream_destroy(s);
    return st.code;
}

static void setup_shop(transport_client *cl, const char *collection)
{
    ts_create_collection(cl, collection, DIM, AFFINITY__V1__METRIC__METRIC_COSINE);
    cr_assert_eq(upsert_range(cl, collection, 0, N_ITEMS, 40), 0);
}

typedef struct ev {
    const char *item;
    Affinity__V1__EventType type;
} ev;

/* PutEvents; returns the gRPC code, the response in *out when not NULL. */
static int put_events(transport_client *cl, const char *collection, const char *user, const ev *evs,
                      size_t n, Affinity__V1__PutEventsResponse **out, transport_call_status *st)
{
    Affinity__V1__Event *e = calloc(n ? n : 1, sizeof *e);
    Affinity__V1__Event **p = calloc(n ? n : 1, sizeof *p);
    for (size_t i = 0; i < n; i++) {
        affinity__v1__event__init(&e[i]);
        e[i].item_id = (char *)evs[i].item;
        e[i].type = evs[i].type;
        p[i] = &e[i];
    }
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = (char *)collection;
    req.user_id = (char *)user;
    req.n_events = n;
    req.events = p;
    int code = ts_call(cl, TRANSPORT_METHOD_PUT_EVENTS, &req,
                       &affinity__v1__put_events_response__descriptor, 0, out, st);
    free(e);
    free(p);
    return code;
}

/* PutEvents that must apply every event. */
static void put_ok(transport_client *cl, const char *collection, const char *user, const ev *evs,
                   size_t n)
{
    Affinity__V1__PutEventsResponse *r = NULL;
    transport_call_status st;
    cr_assert_eq(put_events(cl, collection, user, evs, n, &r, &st), 0, "PutEvents: %s", st.message);
    cr_assert_eq(r->applied_count, n, "%zu rejected; first: %s", r->n_rejected,
                 r->n_rejected ? r->rejected[0]->reason : "");
    transport_client_free(&r->base);
}

static Affinity__V1__RecommendResponse *recommend_user(transport_client *cl, const char *collection,
                                                       const char *user, uint32_t k,
                                                       const Affinity__V1__EventType *exclude,
                                                       size_t n_exclude,
                                                       Affinity__V1__Filter *filter)
{
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    req.collection = (char *)collection;
    req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
    req.user_id = (char *)user;
    req.k = k;
    req.n_exclude_event_types = n_exclude;
    req.exclude_event_types = (Affinity__V1__EventType *)exclude;
    req.filter = filter;
    Affinity__V1__RecommendResponse *resp = NULL;
    transport_call_status st;
    int code = ts_call(cl, TRANSPORT_METHOD_RECOMMEND, &req,
                       &affinity__v1__recommend_response__descriptor, 0, &resp, &st);
    cr_assert_eq(code, 0, "Recommend %s: %d %s", user, code, st.message);
    return resp;
}

static bool has_hit(const Affinity__V1__RecommendResponse *r, const char *id)
{
    for (size_t i = 0; i < r->n_hits; i++)
        if (strcmp(r->hits[i]->id, id) == 0) return true;
    return false;
}

static Affinity__V1__GetUserResponse *get_user(transport_client *cl, const char *collection,
                                               const char *user, int *code)
{
    Affinity__V1__GetUserRequest req = AFFINITY__V1__GET_USER_REQUEST__INIT;
    req.collection = (char *)collection;
    req.user_id = (char *)user;
    Affinity__V1__GetUserResponse *resp = NULL;
    transport_call_status st;
    *code = ts_call(cl, TRANSPORT_METHOD_GET_USER, &req,
                    &affinity__v1__get_user_response__descriptor, 0, &resp, &st);
    return resp;
}

static uint64_t event_count(const Affinity__V1__GetUserResponse *u, const char *type)
{
    for (size_t i = 0; i < u->n_event_counts; i++)
        if (strcmp(u->event_counts[i]->key, type) == 0) return u->event_counts[i]->value;
    return 0;
}

static Affinity__V1__SearchResponse *search(transport_client *cl, const char *collection,
                                            const float *v, uint32_t k)
{
    Affinity__V1__Query q = AFFINITY__V1__QUERY__INIT;
    q.n_vector = DIM;
    q.vector = (float *)v;
    Affinity__V1__Query *qp = &q;
    Affinity__V1__SearchRequest req = AFFINITY__V1__SEARCH_REQUEST__INIT;
    req.collection = (char *)collection;
    req.n_queries = 1;
    req.queries = &qp;
    req.k = k;
    Affinity__V1__SearchResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_SEARCH, &req,
                         &affinity__v1__search_response__descriptor, 0, &resp, &st),
                 0, "Search: %s", st.message);
    return resp;
}

static int delete_items(transport_client *cl, const char *collection, const char *const *ids,
                        size_t n)
{
    Affinity__V1__DeleteItemsRequest req = AFFINITY__V1__DELETE_ITEMS_REQUEST__INIT;
    req.collection = (char *)collection;
    req.n_ids = n;
    req.ids = (char **)ids;
    transport_call_status st;
    return ts_call(cl, TRANSPORT_METHOD_DELETE_ITEMS, &req,
                   &affinity__v1__delete_items_response__descriptor, 0, NULL, &st);
}

static const char *const data_args_tail[] = {"--log-level", "info", NULL};

/* Starts affinityd on data_dir (NULL: in memory) with extra args; waits for SERVING. */
static void start_on(test_server *s, const char *data_dir, const char *const *extra)
{
    const char *args[32];
    int n = 0;
    if (data_dir) {
        args[n++] = "--data-dir";
        args[n++] = data_dir;
    }
    for (int i = 0; extra && extra[i]; i++)
        args[n++] = extra[i];
    for (int i = 0; data_args_tail[i]; i++)
        args[n++] = data_args_tail[i];
    args[n] = NULL;
    if (ts_start(s, NULL, args) != 0) {
        ts_dump_log(s);
        cr_assert_fail("affinityd did not start");
    }
    if (!ts_wait_serving(s, NULL)) {
        ts_dump_log(s);
        cr_assert_fail("affinityd never reported SERVING");
    }
}

/* ---- restart ------------------------------------------------------------------------------ */

/* Everything the restart test compares, read from a running server. */
typedef struct snapshot {
    char search_ids[10][32];
    float search_scores[10];
    size_t n_search;
    char rec_ids[10][32];
    float rec_scores[10];
    size_t n_rec;
    int rec_source;
    char pop_ids[10][32];
    size_t n_pop;
    int pop_source;
    uint64_t views, purchases;
    int64_t last_event_ms;
    uint32_t history;
    char top_cat[64];
    uint64_t items;
    bool persistent;
} snapshot;

static void take_snapshot(transport_client *cl, snapshot *s)
{
    memset(s, 0, sizeof *s);
    Affinity__V1__SearchResponse *sr = search(cl, "shop", sh.vec[7], 10);
    s->n_search = sr->results[0]->n_hits;
    for (size_t i = 0; i < s->n_search; i++) {
        snprintf(s->search_ids[i], 32, "%s", sr->results[0]->hits[i]->id);
        s->search_scores[i] = sr->results[0]->hits[i]->score;
    }
    transport_client_free(&sr->base);
    const Affinity__V1__EventType purchase = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE;
    Affinity__V1__RecommendResponse *r =
        recommend_user(cl, "shop", "alice", 10, &purchase, 1, NULL);
    s->n_rec = r->n_hits;
    s->rec_source = r->source;
    for (size_t i = 0; i < s->n_rec; i++) {
        snprintf(s->rec_ids[i], 32, "%s", r->hits[i]->id);
        s->rec_scores[i] = r->hits[i]->score;
    }
    transport_client_free(&r->base);
    r = recommend_user(cl, "shop", "newcomer", 10, NULL, 0, NULL);
    s->n_pop = r->n_hits;
    s->pop_source = r->source;
    for (size_t i = 0; i < s->n_pop; i++)
        snprintf(s->pop_ids[i], 32, "%s", r->hits[i]->id);
    transport_client_free(&r->base);
    int code;
    Affinity__V1__GetUserResponse *u = get_user(cl, "shop", "alice", &code);
    cr_assert_eq(code, 0);
    s->views = event_count(u, "view");
    s->purchases = event_count(u, "purchase");
    s->last_event_ms = u->last_event_ms;
    s->history = u->history_length;
    if (u->n_top_categories)
        snprintf(s->top_cat, sizeof s->top_cat, "%s", u->top_categories[0]->category);
    transport_client_free(&u->base);
    Affinity__V1__DescribeCollectionRequest dr = AFFINITY__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
    dr.name = "shop";
    Affinity__V1__CollectionInfo *ci = NULL;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DESCRIBE_COLLECTION, &dr,
                         &affinity__v1__collection_info__descriptor, 0, &ci, NULL),
                 0);
    s->items = ci->item_count;
    transport_client_free(&ci->base);
    Affinity__V1__ServerInfo *info = ts_server_info(cl);
    s->persistent = info->persistent;
    transport_client_free(&info->base);
}

Test(server_profiles, restart_on_the_same_data_dir_gives_identical_answers)
{
    shop_build(11);
    char data[128];
    ts_make_dir(data, sizeof data, "data");
    test_server s;
    start_on(&s, data, NULL);
    transport_client *cl = ts_client(&s, NULL);
    setup_shop(cl, "shop");
    ev alice[] = {{sh.id[25], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW},
                  {sh.id[26], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW},
                  {sh.id[27], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CLICK},
                  {sh.id[28], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE}};
    put_ok(cl, "shop", "alice", alice, 4);
    ev bob[] = {{sh.id[60], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE},
                {sh.id[61], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_ADD_TO_CART}};
    put_ok(cl, "shop", "bob", bob, 2);
    /* a deleted item stays deleted */
    const char *gone[] = {sh.id[3]};
    cr_assert_eq(delete_items(cl, "shop", gone, 1), 0);

    snapshot before, after;
    take_snapshot(cl, &before);
    cr_assert(before.persistent);
    cr_assert_eq(before.rec_source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE);
    cr_assert_eq(before.pop_source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY);
    cr_assert_eq(before.items, N_ITEMS - 1);
    cr_assert_eq(before.n_pop, 6);
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);

    start_on(&s, data, NULL);
    cl = ts_client(&s, NULL);
    take_snapshot(cl, &after);
    cr_assert_eq(after.items, before.items);
    cr_assert(after.persistent);
    cr_assert_eq(after.n_search, before.n_search);
    for (size_t i = 0; i < before.n_search; i++) {
        cr_assert_str_eq(after.search_ids[i], before.search_ids[i]);
        cr_assert_float_eq(after.search_scores[i], before.search_scores[i], 1e-6);
    }
    cr_assert_eq(after.rec_source, before.rec_source);
    cr_assert_eq(after.n_rec, before.n_rec);
    for (size_t i = 0; i < before.n_rec; i++) {
        cr_assert_str_eq(after.rec_ids[i], before.rec_ids[i]);
        cr_assert_float_eq(after.rec_scores[i], before.rec_scores[i], 1e-6);
    }
    cr_assert_eq(after.pop_source, before.pop_source);
    cr_assert_eq(after.n_pop, before.n_pop);
    for (size_t i = 0; i < before.n_pop; i++)
        cr_assert_str_eq(after.pop_ids[i], before.pop_ids[i]);
    cr_assert_eq(after.views, 2);
    cr_assert_eq(after.purchases, 1);
    cr_assert_eq(after.views, before.views);
    cr_assert_eq(after.purchases, before.purchases);
    cr_assert_eq(after.last_event_ms, before.last_event_ms);
    cr_assert_eq(after.history, 4);
    cr_assert_str_eq(after.top_cat, "books");
    cr_assert_str_eq(after.top_cat, before.top_cat);
    /* writes still work after the restart, and the deleted item is still gone */
    ev more[] = {{sh.id[29], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW}};
    put_ok(cl, "shop", "alice", more, 1);
    Affinity__V1__PutEventsResponse *pr = NULL;
    ev dead[] = {{sh.id[3], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW}};
    cr_assert_eq(put_events(cl, "shop", "alice", dead, 1, &pr, NULL), 0);
    cr_assert_eq(pr->applied_count, 0);
    transport_client_free(&pr->base);
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    ts_remove_path(data);
}

/* ---- behaviour ------------------------------------------------------------------------------ */

static test_server bs;
static transport_client *bcl;

static void start_behaviour(void)
{
    static const char *const extra[] = {"--event-weights", "view=1,purchase=8,wishlist=3", NULL};
    shop_build(23);
    start_on(&bs, NULL, extra);
    bcl = ts_client(&bs, NULL);
    setup_shop(bcl, "shop");
}

static void stop_behaviour(void)
{
    transport_client_destroy(bcl);
    bcl = NULL;
    int code = ts_stop(&bs, SIGTERM, 30000);
    if (code != 0) ts_dump_log(&bs);
    cr_assert_eq(code, 0);
}

Test(server_profiles, a_buyer_of_one_category_gets_that_category, .init = start_behaviour,
     .fini = stop_behaviour)
{
    /* garden = items 50..74: views of five, purchases of two */
    ev evs[] = {{sh.id[50], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW},
                {sh.id[51], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW},
                {sh.id[52], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW},
                {sh.id[53], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW},
                {sh.id[54], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW},
                {sh.id[50], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE},
                {sh.id[53], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE}};
    put_ok(bcl, "shop", "gardener", evs, 7);
    Affinity__V1__RecommendResponse *r = recommend_user(bcl, "shop", "gardener", 10, NULL, 0, NULL);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE);
    cr_assert_eq(r->n_hits, 10);
    for (size_t i = 0; i < r->n_hits; i++)
        cr_assert_eq(cat_of(r->hits[i]->id), 2, "hit %zu is %s", i, r->hits[i]->id);
    transport_client_free(&r->base);

    /* purchases excluded when asked, at once (read-your-writes) */
    const Affinity__V1__EventType purchase = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE;
    r = recommend_user(bcl, "shop", "gardener", N_PER_CAT, &purchase, 1, NULL);
    cr_assert_eq(r->n_hits, N_PER_CAT);
    cr_assert(!has_hit(r, sh.id[50]) && !has_hit(r, sh.id[53]));
    cr_assert(has_hit(r, sh.id[51]));
    transport_client_free(&r->base);

    /* the request's filter applies to profile answers too */
    char *cats[] = {"toys"};
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    f.n_categories = 1;
    f.categories = cats;
    r = recommend_user(bcl, "shop", "gardener", 5, NULL, 0, &f);
    cr_assert_eq(r->n_hits, 5);
    for (size_t i = 0; i < r->n_hits; i++)
        cr_assert_eq(cat_of(r->hits[i]->id), 3);
    transport_client_free(&r->base);

    /* GetUser: counts, history, top category */
    int code;
    Affinity__V1__GetUserResponse *u = get_user(bcl, "shop", "gardener", &code);
    cr_assert_eq(code, 0);
    cr_assert_eq(event_count(u, "view"), 5);
    cr_assert_eq(event_count(u, "purchase"), 2);
    cr_assert_eq(u->history_length, 7);
    cr_assert_gt(u->last_event_ms, 0);
    cr_assert_geq(u->n_top_categories, 1);
    cr_assert_str_eq(u->top_categories[0]->category, "garden");
    cr_assert_float_eq(u->top_categories[0]->weight, 1.0f, 1e-5);
    transport_client_free(&u->base);

    /* BatchRecommend by user id: profile, popularity and vector answers, in order */
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(bcl, TRANSPORT_METHOD_BATCH_RECOMMEND, 0, &s, &err),
                 0);
    const char *users[] = {"gardener", "stranger", NULL};
    for (int i = 0; i < 3; i++) {
        Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
        Affinity__V1__UserVector uv = AFFINITY__V1__USER_VECTOR__INIT;
        req.collection = "shop";
        req.k = 3;
        char rid[8];
        snprintf(rid, sizeof rid, "r%d", i);
        req.request_id = rid;
        if (users[i]) {
            req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
            req.user_id = (char *)users[i];
        } else {
            uv.n_values = DIM;
            uv.values = sh.vec[0];
            req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_VECTOR;
            req.user_vector = &uv;
        }
        cr_assert_eq(transport_client_stream_send(s, &req.base, &err), 0);
    }
    transport_client_stream_close_send(s, &err);
    const int want[] = {AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE,
                        AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY,
                        AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_VECTOR};
    for (int i = 0; i < 3; i++) {
        Affinity__V1__RecommendResponse *resp = NULL;
        cr_assert_eq(transport_client_stream_recv(s, &affinity__v1__recommend_response__descriptor,
                                                  (ProtobufCMessage **)&resp, &err),
                     1);
        char rid[8];
        snprintf(rid, sizeof rid, "r%d", i);
        cr_assert_str_eq(resp->request_id, rid);
        cr_assert_eq(resp->error_code, 0, "%s", resp->error_message);
        cr_assert_eq(resp->source, want[i]);
        cr_assert_eq(resp->n_hits, 3);
        transport_client_free(&resp->base);
    }
    transport_call_status st;
    cr_assert_eq(transport_client_stream_finish(s, NULL, NULL, &st), 0);
    transport_client_stream_destroy(s);
}

Test(server_profiles, new_users_get_popular_items_and_deletes_never_come_back,
     .init = start_behaviour, .fini = stop_behaviour)
{
    /* popularity: books-00 bought by three users, books-01 viewed by two, toys-00 viewed once */
    ev buy[] = {{sh.id[25], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE}};
    ev view[] = {{sh.id[26], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW}};
    ev toy[] = {{sh.id[75], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW}};
    put_ok(bcl, "shop", "u1", buy, 1);
    put_ok(bcl, "shop", "u2", buy, 1);
    put_ok(bcl, "shop", "u3", buy, 1);
    put_ok(bcl, "shop", "u1", view, 1);
    put_ok(bcl, "shop", "u2", view, 1);
    put_ok(bcl, "shop", "u3", toy, 1);

    Affinity__V1__RecommendResponse *r = recommend_user(bcl, "shop", "nobody", 10, NULL, 0, NULL);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY);
    cr_assert_eq(r->n_hits, 3);
    cr_assert_str_eq(r->hits[0]->id, sh.id[25]);
    cr_assert_str_eq(r->hits[1]->id, sh.id[26]);
    cr_assert_str_eq(r->hits[2]->id, sh.id[75]);
    cr_assert_gt(r->hits[0]->score, r->hits[1]->score);
    transport_client_free(&r->base);

    /* the request's filter applies to popularity answers */
    char *cats[] = {"toys"};
    Affinity__V1__Filter f = AFFINITY__V1__FILTER__INIT;
    f.n_categories = 1;
    f.categories = cats;
    r = recommend_user(bcl, "shop", "nobody", 10, NULL, 0, &f);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY);
    cr_assert_eq(r->n_hits, 1);
    cr_assert_str_eq(r->hits[0]->id, sh.id[75]);
    transport_client_free(&r->base);

    /* DeleteUser: the user becomes unknown and falls back to popularity */
    Affinity__V1__DeleteUserRequest du = AFFINITY__V1__DELETE_USER_REQUEST__INIT;
    du.collection = "shop";
    du.user_id = "u1";
    Affinity__V1__DeleteUserResponse *dr = NULL;
    cr_assert_eq(ts_call(bcl, TRANSPORT_METHOD_DELETE_USER, &du,
                         &affinity__v1__delete_user_response__descriptor, 0, &dr, NULL),
                 0);
    cr_assert(dr->existed);
    transport_client_free(&dr->base);
    int code;
    Affinity__V1__GetUserResponse *u = get_user(bcl, "shop", "u1", &code);
    cr_assert_eq(code, TS_NOT_FOUND);
    cr_assert_null(u);
    r = recommend_user(bcl, "shop", "u1", 10, NULL, 0, NULL);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY);
    transport_client_free(&r->base);
    du.collection = ""; /* every collection; nothing left */
    cr_assert_eq(ts_call(bcl, TRANSPORT_METHOD_DELETE_USER, &du,
                         &affinity__v1__delete_user_response__descriptor, 0, &dr, NULL),
                 0);
    cr_assert(!dr->existed);
    transport_client_free(&dr->base);

    /* item deletes: gone from popularity and from profile answers */
    const char *gone[] = {sh.id[25], sh.id[27]};
    cr_assert_eq(delete_items(bcl, "shop", gone, 2), 0);
    r = recommend_user(bcl, "shop", "nobody", 10, NULL, 0, NULL);
    cr_assert_eq(r->n_hits, 2);
    cr_assert(!has_hit(r, sh.id[25]));
    transport_client_free(&r->base);
    r = recommend_user(bcl, "shop", "u2", N_ITEMS, NULL, 0, NULL);
    cr_assert_eq(r->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE);
    cr_assert_eq(r->n_hits, N_ITEMS - 2);
    cr_assert(!has_hit(r, sh.id[25]) && !has_hit(r, sh.id[27]));
    transport_client_free(&r->base);

    /* Rerank by user id: u2 likes books; an unknown user keeps the caller's order */
    Affinity__V1__RerankCandidate c0 = AFFINITY__V1__RERANK_CANDIDATE__INIT,
                                  c1 = AFFINITY__V1__RERANK_CANDIDATE__INIT;
    c0.id = sh.id[80]; /* toys */
    c0.base_score = 0.9f;
    c1.id = sh.id[30]; /* books */
    c1.base_score = 0.1f;
    Affinity__V1__RerankCandidate *cands[] = {&c0, &c1};
    Affinity__V1__FloatValue w = AFFINITY__V1__FLOAT_VALUE__INIT;
    w.value = 1.0f;
    Affinity__V1__RerankRequest rr = AFFINITY__V1__RERANK_REQUEST__INIT;
    rr.collection = "shop";
    rr.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_ID;
    rr.user_id = "u2";
    rr.n_candidates = 2;
    rr.candidates = cands;
    rr.affinity_weight = &w;
    Affinity__V1__RerankResponse *rres = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(bcl, TRANSPORT_METHOD_RERANK, &rr,
                         &affinity__v1__rerank_response__descriptor, 0, &rres, &st),
                 0, "%s", st.message);
    cr_assert_eq(rres->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE);
    cr_assert_str_eq(rres->items[0]->id, sh.id[30]);
    transport_client_free(&rres->base);
    rr.user_id = "nobody";
    cr_assert_eq(ts_call(bcl, TRANSPORT_METHOD_RERANK, &rr,
                         &affinity__v1__rerank_response__descriptor, 0, &rres, &st),
                 0, "%s", st.message);
    cr_assert_eq(rres->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_UNSPECIFIED);
    cr_assert_str_eq(rres->items[0]->id, sh.id[80]);
    cr_assert_float_eq(rres->items[0]->score, 0.9f, 1e-6);
    cr_assert_float_eq(rres->items[0]->affinity, 0.0f, 1e-6);
    transport_client_free(&rres->base);
}

Test(server_profiles, bad_events_are_rejected_one_by_one, .init = start_behaviour,
     .fini = stop_behaviour)
{
    Affinity__V1__Event e[8];
    Affinity__V1__Event *p[8];
    for (int i = 0; i < 8; i++) {
        affinity__v1__event__init(&e[i]);
        e[i].item_id = sh.id[i];
        e[i].type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW;
        p[i] = &e[i];
    }
    e[1].item_id = "no-such-item";
    e[2].type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_UNSPECIFIED;
    e[3].type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CUSTOM;
    e[3].custom_type = "not_configured";
    e[4].timestamp_ms = (int64_t)time(NULL) * 1000 + 7LL * 24 * 3600 * 1000; /* a week ahead */
    e[5].value = NAN;
    e[6].type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CUSTOM;
    e[6].custom_type = "wishlist"; /* configured with --event-weights */
    e[7].item_id = "";
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = "shop";
    req.user_id = "picky";
    req.n_events = 8;
    req.events = p;
    Affinity__V1__PutEventsResponse *r = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(bcl, TRANSPORT_METHOD_PUT_EVENTS, &req,
                         &affinity__v1__put_events_response__descriptor, 0, &r, &st),
                 0, "%s", st.message);
    cr_assert_eq(r->applied_count, 2);
    cr_assert_eq(r->n_rejected, 6);
    const struct {
        uint32_t index;
        const char *reason;
    } want[] = {{1, "unknown item id"}, {2, "event type"}, {3, "not_configured"},
                {4, "timestamp"},       {5, "finite"},     {7, "item id"}};
    for (size_t i = 0; i < 6; i++) {
        cr_assert_eq(r->rejected[i]->index, want[i].index);
        cr_assert(strstr(r->rejected[i]->reason, want[i].reason), "%u: %s", want[i].index,
                  r->rejected[i]->reason);
    }
    transport_client_free(&r->base);
    int code;
    Affinity__V1__GetUserResponse *u = get_user(bcl, "shop", "picky", &code);
    cr_assert_eq(code, 0);
    cr_assert_eq(event_count(u, "view"), 1);
    cr_assert_eq(event_count(u, "wishlist"), 1);
    cr_assert_eq(u->history_length, 2);
    transport_client_free(&u->base);

    /* whole-call errors */
    ev one[] = {{sh.id[0], AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW}};
    cr_assert_eq(put_events(bcl, "nope", "picky", one, 1, NULL, &st), TS_NOT_FOUND);
    cr_assert(strstr(st.message, "nope"), "%s", st.message);
    cr_assert_eq(put_events(bcl, "shop", "", one, 1, NULL, &st), TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "user id"), "%s", st.message);
    cr_assert_eq(put_events(bcl, "shop", "picky", one, 0, NULL, &st), TS_INVALID_ARGUMENT);
    ev *many = calloc(1001, sizeof *many);
    for (int i = 0; i < 1001; i++)
        many[i] = one[0];
    cr_assert_eq(put_events(bcl, "shop", "picky", many, 1001, NULL, &st), TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "1..1000"), "%s", st.message);
    free(many);
    u = get_user(bcl, "nope", "picky", &code);
    cr_assert_eq(code, TS_NOT_FOUND);
    /* a bad exclusion type */
    Affinity__V1__RecommendRequest rq = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    Affinity__V1__EventType bad = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_UNSPECIFIED;
    rq.collection = "shop";
    rq.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
    rq.user_id = "picky";
    rq.k = 5;
    rq.n_exclude_event_types = 1;
    rq.exclude_event_types = &bad;
    cr_assert_eq(ts_call(bcl, TRANSPORT_METHOD_RECOMMEND, &rq,
                         &affinity__v1__recommend_response__descriptor, 0, NULL, &st),
                 TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "exclude_event_types"), "%s", st.message);
    rq.n_exclude_event_types = 0;
    rq.k = 0;
    cr_assert_eq(ts_call(bcl, TRANSPORT_METHOD_RECOMMEND, &rq,
                         &affinity__v1__recommend_response__descriptor, 0, NULL, &st),
                 TS_INVALID_ARGUMENT);
    rq.k = 5;
    rq.user_id = "";
    cr_assert_eq(ts_call(bcl, TRANSPORT_METHOD_RECOMMEND, &rq,
                         &affinity__v1__recommend_response__descriptor, 0, NULL, &st),
                 TS_INVALID_ARGUMENT);
}

Test(server_profiles, bad_profile_flags_fail_with_a_clear_message)
{
    static const struct {
        const char *flag, *value, *expect;
    } cases[] = {
        {"--event-weights", "view=x", "not a finite number"},
        {"--event-weights", "Bad=1", "[a-z0-9_]"},
        {"--event-weights", "view=1,view=2", "twice"},
        {"--profile-half-life-hours", "0", "hours"},
        {"--popularity-half-life-hours", "-3", "hours"},
        {"--history-length", "0", "1..100000"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char cmd[512];
        snprintf(cmd, sizeof cmd, "%s/src/affinityd %s '%s' 2>&1", AFF_BINARY_DIR, cases[i].flag,
                 cases[i].value);
        FILE *f = popen(cmd, "r");
        cr_assert(f);
        char out[1024] = "";
        size_t n = fread(out, 1, sizeof out - 1, f);
        out[n] = '\0';
        int status = pclose(f);
        cr_assert_eq(WEXITSTATUS(status), 2, "%s %s: %s", cases[i].flag, cases[i].value, out);
        cr_assert(strstr(out, cases[i].flag) && strstr(out, cases[i].expect), "%s", out);
    }
}

/* ---- crash ---------------------------------------------------------------------------------- */

/* Writers record what the server acknowledged; after a SIGKILL and a restart every
 * acknowledged write must be there, and the one in flight wholly or not at all. */
#define CRASH_ROUNDS    10
#define CRASH_BATCH     20   /* items per UpsertItems call */
#define CRASH_EVENTS    10   /* events per PutEvents call */
#define CRASH_MAX_CALLS 4000 /* per kind, all rounds together */

typedef struct crash_log {
    pthread_mutex_t mu;
    int batches_acked[CRASH_MAX_CALLS]; /* 1: acknowledged; 2: sent, outcome unknown */
    int n_batches;                      /* batch numbers used so far */
    int users_acked[CRASH_MAX_CALLS];   /* same, per events call (one user each) */
    int n_users;
    uint64_t steady_acked; /* events acknowledged for user "steady" (one per call) */
    uint64_t steady_sent;  /* acknowledged plus at most one in flight */
    atomic_bool stop;
    const char *target;
    float base_vec[DIM];
} crash_log;

static void batch_item(int b, int i, char *id, size_t size, float *v)
{
    snprintf(id, size, "b%04d-%02d", b, i);
    for (int j = 0; j < DIM; j++)
        v[j] = (float)((b * 31 + i * 7 + j) % 13) - 6.0f + 0.5f;
}

static void *crash_upserter(void *arg)
{
    crash_log *L = arg;
    transport_client *cl = NULL;
    transport_client_options o = {.target = L->target, .timeout_ms = 10000};
    aff_err err;
    if (transport_client_create(&cl, &o, &err)) return NULL;
    Affinity__V1__Item items[CRASH_BATCH];
    Affinity__V1__Item *ptrs[CRASH_BATCH];
    char ids[CRASH_BATCH][16];
    float vecs[CRASH_BATCH][DIM];
    while (!atomic_load(&L->stop)) {
        pthread_mutex_lock(&L->mu);
        int b = L->n_batches < CRASH_MAX_CALLS ? L->n_batches++ : -1;
        if (b >= 0) L->batches_acked[b] = 2;
        pthread_mutex_unlock(&L->mu);
        if (b < 0) break;
        for (int i = 0; i < CRASH_BATCH; i++) {
            batch_item(b, i, ids[i], sizeof ids[i], vecs[i]);
            affinity__v1__item__init(&items[i]);
            items[i].id = ids[i];
            items[i].n_vector = DIM;
            items[i].vector = vecs[i];
            items[i].category = "crash";
            ptrs[i] = &items[i];
        }
        transport_client_stream *s = NULL;
        if (transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err)) break;
        Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
        req.collection = "crash";
        req.n_items = CRASH_BATCH;
        req.items = ptrs;
        transport_client_stream_send(s, &req.base, &err);
        Affinity__V1__UpsertItemsResponse *resp = NULL;
        transport_call_status st;
        int rc = transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                                (ProtobufCMessage **)&resp, &st);
        transport_client_free(resp ? &resp->base : NULL);
        transport_client_stream_destroy(s);
        if (rc) break; /* killed: the outcome of batch b stays unknown */
        pthread_mutex_lock(&L->mu);
        L->batches_acked[b] = 1;
        pthread_mutex_unlock(&L->mu);
    }
    transport_client_destroy(cl);
    return NULL;
}

static void *crash_eventer(void *arg)
{
    crash_log *L = arg;
    transport_client *cl = NULL;
    transport_client_options o = {.target = L->target, .timeout_ms = 10000};
    aff_err err;
    if (transport_client_create(&cl, &o, &err)) return NULL;
    ev evs[CRASH_EVENTS];
    for (int i = 0; i < CRASH_EVENTS; i++)
        evs[i] = (ev){i % 2 ? "base-1" : "base-0", AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW};
    for (uint64_t round = 0; !atomic_load(&L->stop); round++) {
        transport_call_status st;
        if (round % 2 == 0) {
            /* one user per call, CRASH_EVENTS events: all or nothing */
            pthread_mutex_lock(&L->mu);
            int u = L->n_users < CRASH_MAX_CALLS ? L->n_users++ : -1;
            if (u >= 0) L->users_acked[u] = 2;
            pthread_mutex_unlock(&L->mu);
            if (u < 0) break;
            char user[32];
            snprintf(user, sizeof user, "user-%04d", u);
            Affinity__V1__PutEventsResponse *r = NULL;
            int code = put_events(cl, "crash", user, evs, CRASH_EVENTS, &r, &st);
            bool ok = code == 0 && r->applied_count == CRASH_EVENTS;
            transport_client_free(r ? &r->base : NULL);
            if (!ok) break;
            pthread_mutex_lock(&L->mu);
            L->users_acked[u] = 1;
            pthread_mutex_unlock(&L->mu);
        } else {
            /* one event for "steady": its count grows by exactly the acknowledged calls */
            pthread_mutex_lock(&L->mu);
            L->steady_sent = L->steady_acked + 1;
            pthread_mutex_unlock(&L->mu);
            int code = put_events(cl, "crash", "steady", evs, 1, NULL, &st);
            if (code != 0) break;
            pthread_mutex_lock(&L->mu);
            L->steady_acked++;
            pthread_mutex_unlock(&L->mu);
        }
    }
    transport_client_destroy(cl);
    return NULL;
}

/* Checks the store after a restart against the log; settles the unknown outcomes. */
static void crash_verify(transport_client *cl, crash_log *L, int round)
{
    /* items: every acknowledged batch wholly present, an unknown one wholly or not at all */
    for (int b = 0; b < L->n_batches; b++) {
        char ids[CRASH_BATCH][16];
        char *ptrs[CRASH_BATCH];
        float v[CRASH_BATCH][DIM];
        for (int i = 0; i < CRASH_BATCH; i++) {
            batch_item(b, i, ids[i], sizeof ids[i], v[i]);
            ptrs[i] = ids[i];
        }
        Affinity__V1__GetItemsRequest req = AFFINITY__V1__GET_ITEMS_REQUEST__INIT;
        req.collection = "crash";
        req.n_ids = CRASH_BATCH;
        req.ids = ptrs;
        req.include_vectors = true;
        Affinity__V1__GetItemsResponse *r = NULL;
        transport_call_status st;
        cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_GET_ITEMS, &req,
                             &affinity__v1__get_items_response__descriptor, 0, &r, &st),
                     0, "%s", st.message);
        size_t found = r->n_items;
        if (L->batches_acked[b] == 1)
            cr_assert_eq(found, CRASH_BATCH, "round %d: acknowledged batch %d has %zu of %d items",
                         round, b, found, CRASH_BATCH);
        else
            cr_assert(found == 0 || found == CRASH_BATCH,
                      "round %d: batch %d in flight at the kill is half there (%zu items)", round,
                      b, found);
        for (size_t i = 0; i < found; i++) {
            cr_assert_eq(r->items[i]->n_vector, DIM);
            /* cosine collection: stored normalized; compare directions */
            float dot = 0, n1 = 0, n2 = 0;
            int idx = atoi(strchr(r->items[i]->id, '-') + 1);
            for (int j = 0; j < DIM; j++) {
                dot += r->items[i]->vector[j] * v[idx][j];
                n1 += r->items[i]->vector[j] * r->items[i]->vector[j];
                n2 += v[idx][j] * v[idx][j];
            }
            cr_assert_float_eq(dot / sqrtf(n1 * n2), 1.0f, 1e-4, "item %s", r->items[i]->id);
        }
        if (found) L->batches_acked[b] = 1;
        transport_client_free(&r->base);
    }
    /* events: each user has all of its call's events or (only if in flight) none */
    for (int u = 0; u < L->n_users; u++) {
        char user[32];
        snprintf(user, sizeof user, "user-%04d", u);
        int code;
        Affinity__V1__GetUserResponse *r = get_user(cl, "crash", user, &code);
        if (L->users_acked[u] == 1) {
            cr_assert_eq(code, 0, "round %d: acknowledged %s is missing", round, user);
        } else {
            cr_assert(code == 0 || code == TS_NOT_FOUND);
        }
        if (code == 0) {
            cr_assert_eq(event_count(r, "view"), CRASH_EVENTS, "round %d: %s is half written",
                         round, user);
            cr_assert_eq(r->history_length, CRASH_EVENTS);
            L->users_acked[u] = 1;
            transport_client_free(&r->base);
        } else {
            L->users_acked[u] = 0;
        }
    }
    int code;
    Affinity__V1__GetUserResponse *r = get_user(cl, "crash", "steady", &code);
    uint64_t n = code == 0 ? event_count(r, "view") : 0;
    cr_assert(n >= L->steady_acked && n <= L->steady_sent,
              "round %d: steady has %llu events; %llu acknowledged, %llu sent", round,
              (unsigned long long)n, (unsigned long long)L->steady_acked,
              (unsigned long long)L->steady_sent);
    L->steady_acked = L->steady_sent = n;
    transport_client_free(r ? &r->base : NULL);
}

Test(server_profiles, sigkill_mid_stream_loses_no_acknowledged_write, .timeout = 300)
{
    char data[128];
    ts_make_dir(data, sizeof data, "crash");
    crash_log *L = calloc(1, sizeof *L);
    pthread_mutex_init(&L->mu, NULL);
    uint64_t seed = 99;
    test_server s;
    for (int round = 0; round < CRASH_ROUNDS; round++) {
        start_on(&s, data, NULL);
        transport_client *cl = ts_client(&s, NULL);
        if (round == 0) {
            ts_create_collection(cl, "crash", DIM, AFFINITY__V1__METRIC__METRIC_COSINE);
            /* two base items the events name */
            transport_client_stream *st = NULL;
            aff_err err;
            cr_assert_eq(
                transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &st, &err), 0);
            Affinity__V1__Item it[2];
            Affinity__V1__Item *ip[2] = {&it[0], &it[1]};
            float v[2][DIM];
            for (int i = 0; i < 2; i++) {
                affinity__v1__item__init(&it[i]);
                it[i].id = i ? "base-1" : "base-0";
                for (int j = 0; j < DIM; j++)
                    v[i][j] = ts_randf(&seed);
                it[i].n_vector = DIM;
                it[i].vector = v[i];
            }
            Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
            req.collection = "crash";
            req.n_items = 2;
            req.items = ip;
            cr_assert_eq(transport_client_stream_send(st, &req.base, &err), 0);
            transport_call_status cs;
            cr_assert_eq(transport_client_stream_finish(st, NULL, NULL, &cs), 0, "%s", cs.message);
            transport_client_stream_destroy(st);
        } else {
            crash_verify(cl, L, round);
        }
        /* write for 150..650 ms from two threads, then SIGKILL the server mid-stream */
        L->target = s.target;
        atomic_store(&L->stop, false);
        pthread_t up, evt;
        pthread_create(&up, NULL, crash_upserter, L);
        pthread_create(&evt, NULL, crash_eventer, L);
        struct timespec ts = {0, (long)(150 + ts_rand(&seed) % 500) * 1000000L};
        nanosleep(&ts, NULL);
        cr_assert_eq(ts_stop(&s, SIGKILL, 10000), 128 + SIGKILL);
        atomic_store(&L->stop, true);
        pthread_join(up, NULL);
        pthread_join(evt, NULL);
        transport_client_destroy(cl);
        ts_remove_dir(&s);
        cr_log_info("round %d: %d batches, %d event calls, steady %llu", round, L->n_batches,
                    L->n_users, (unsigned long long)L->steady_acked);
    }
    /* the last kill's writes, then a clean stop */
    start_on(&s, data, NULL);
    transport_client *cl = ts_client(&s, NULL);
    crash_verify(cl, L, CRASH_ROUNDS);
    int acked = 0;
    for (int b = 0; b < L->n_batches; b++)
        acked += L->batches_acked[b] == 1;
    cr_assert_gt(acked, CRASH_ROUNDS, "too few writes were acknowledged to test anything");
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    pthread_mutex_destroy(&L->mu);
    free(L);
    ts_remove_path(data);
}

Test(server_profiles, old_interests_fade_with_the_half_life, .init = start_behaviour,
     .fini = stop_behaviour)
{
    /* Ten purchases of shoes 90 days ago (6.4 half-lives of 14 days: weight 80 -> 0.9) and
     * five views of toys now (weight 5): without decay shoes would dominate 16 to 1; with
     * it the profile has moved to toys. */
    int64_t now = (int64_t)time(NULL) * 1000, old = now - 90LL * 24 * 3600 * 1000;
    Affinity__V1__Event e[15];
    Affinity__V1__Event *p[15];
    for (int i = 0; i < 15; i++) {
        affinity__v1__event__init(&e[i]);
        bool shoes = i < 10;
        e[i].item_id = sh.id[shoes ? i : 75 + (i - 10)];
        e[i].type = shoes ? AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE
                          : AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW;
        e[i].timestamp_ms = shoes ? old : now;
        p[i] = &e[i];
    }
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = "shop";
    req.user_id = "fickle";
    req.n_events = 15;
    req.events = p;
    Affinity__V1__PutEventsResponse *r = NULL;
    cr_assert_eq(ts_call(bcl, TRANSPORT_METHOD_PUT_EVENTS, &req,
                         &affinity__v1__put_events_response__descriptor, 0, &r, NULL),
                 0);
    cr_assert_eq(r->applied_count, 15);
    transport_client_free(&r->base);
    Affinity__V1__RecommendResponse *rec = recommend_user(bcl, "shop", "fickle", 5, NULL, 0, NULL);
    cr_assert_eq(rec->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE);
    for (size_t i = 0; i < rec->n_hits; i++)
        cr_assert_eq(cat_of(rec->hits[i]->id), 3, "hit %zu is %s", i, rec->hits[i]->id);
    transport_client_free(&rec->base);
    int code;
    Affinity__V1__GetUserResponse *u = get_user(bcl, "shop", "fickle", &code);
    cr_assert_eq(code, 0);
    cr_assert_str_eq(u->top_categories[0]->category, "toys");
    cr_assert_eq(event_count(u, "purchase"), 10);
    transport_client_free(&u->base);
}

Test(server_profiles, demo_is_stored_once_with_a_data_dir, .timeout = 120)
{
    char data[128];
    ts_make_dir(data, sizeof data, "demo");
    static const char *const demo[] = {"--demo", NULL};
    test_server s;
    for (int run = 0; run < 2; run++) {
        start_on(&s, data, demo);
        transport_client *cl = ts_client(&s, NULL);
        if (run == 0) {
            ev evs[] = {{"p000001", AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE}};
            put_ok(cl, "products", "demo-user", evs, 1);
            const char *gone[] = {"p000002"};
            cr_assert_eq(delete_items(cl, "products", gone, 1), 0);
        }
        Affinity__V1__DescribeCollectionRequest dr =
            AFFINITY__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
        dr.name = "products";
        Affinity__V1__CollectionInfo *ci = NULL;
        cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_DESCRIBE_COLLECTION, &dr,
                             &affinity__v1__collection_info__descriptor, 0, &ci, NULL),
                     0);
        /* the second start rebuilt the stored shop (with the delete) instead of reloading */
        cr_assert_eq(ci->item_count, 99999);
        transport_client_free(&ci->base);
        int code;
        Affinity__V1__GetUserResponse *u = get_user(cl, "products", "demo-user", &code);
        cr_assert_eq(code, 0);
        transport_client_free(&u->base);
        transport_client_destroy(cl);
        cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
    }
    ts_remove_path(data);
}

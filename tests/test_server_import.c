/*
 * test_server_import.c: ImportEvents end to end, a real affinityd through gRPC: events of
 * many users in one stream applied as PutEvents applies them (same profiles, same answers),
 * per-event rejections with their stream index, user and reason, per-call errors
 * (INVALID_ARGUMENT / NOT_FOUND) that change nothing, and SIGKILL: every event of an
 * acknowledged import survives a kill and restart, and a kill in the middle of a stream leaves
 * each message all there or not at all.
 */
#include <criterion/criterion.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "server_helpers.h"

#define DIM     8
#define N_ITEMS 40

static char item_ids[N_ITEMS][16];

static void start_on(test_server *s, const char *data_dir)
{
    const char *args[8];
    int n = 0;
    if (data_dir) {
        args[n++] = "--data-dir";
        args[n++] = data_dir;
    }
    args[n++] = "--log-level";
    args[n++] = "warn";
    args[n] = NULL;
    if (ts_start(s, NULL, args) != 0 || !ts_wait_serving(s, NULL)) {
        ts_dump_log(s);
        cr_assert_fail("affinityd did not start");
    }
}

/* Creates collection `name` with N_ITEMS items "i0".."i39" (random vectors, seed 7). */
static void setup_catalog(transport_client *cl, const char *name)
{
    ts_create_collection(cl, name, DIM, AFFINITY__V1__METRIC__METRIC_COSINE);
    uint64_t seed = 7;
    static float vec[N_ITEMS][DIM];
    Affinity__V1__Item items[N_ITEMS];
    Affinity__V1__Item *ptrs[N_ITEMS];
    for (int i = 0; i < N_ITEMS; i++) {
        snprintf(item_ids[i], sizeof item_ids[i], "i%d", i);
        for (int j = 0; j < DIM; j++)
            vec[i][j] = ts_randf(&seed);
        affinity__v1__item__init(&items[i]);
        items[i].id = item_ids[i];
        items[i].n_vector = DIM;
        items[i].vector = vec[i];
        ptrs[i] = &items[i];
    }
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0);
    Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    req.collection = (char *)name;
    req.n_items = N_ITEMS;
    req.items = ptrs;
    cr_assert_eq(transport_client_stream_send(s, &req.base, &err), 0);
    transport_call_status st;
    ProtobufCMessage *resp = NULL;
    cr_assert_eq(transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                                &resp, &st),
                 0, "UpsertItems: %s", st.message);
    transport_client_free(resp);
    transport_client_stream_destroy(s);
}

/* ---- building import messages ------------------------------------------------------------- */

typedef struct iev {
    const char *user; /* NULL: an ImportedEvent without an Event */
    const char *item;
    Affinity__V1__EventType type;
    const char *custom;
    int64_t ts;
    double value;
} iev;

typedef struct imsg {
    const char *collection; /* NULL: omitted */
    const iev *evs;
    size_t n;
} imsg;

/* Streams the messages; returns the call's gRPC code, the response in *out (may be NULL).
 * Stops sending at the first failed send (the server ended the call). */
static int import(transport_client *cl, const imsg *msgs, size_t n_msgs,
                  Affinity__V1__ImportEventsResponse **out, transport_call_status *st)
{
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(cl, TRANSPORT_METHOD_IMPORT_EVENTS, 60000, &s, &err),
                 0);
    for (size_t m = 0; m < n_msgs; m++) {
        size_t n = msgs[m].n;
        Affinity__V1__Event *e = calloc(n + 1, sizeof *e);
        Affinity__V1__ImportedEvent *ie = calloc(n + 1, sizeof *ie);
        Affinity__V1__ImportedEvent **p = calloc(n + 1, sizeof *p);
        for (size_t i = 0; i < n; i++) {
            const iev *v = &msgs[m].evs[i];
            affinity__v1__event__init(&e[i]);
            affinity__v1__imported_event__init(&ie[i]);
            e[i].item_id = (char *)(v->item ? v->item : "");
            e[i].type = v->type;
            if (v->custom) e[i].custom_type = (char *)v->custom;
            e[i].timestamp_ms = v->ts;
            e[i].value = v->value;
            ie[i].user_id = (char *)(v->user ? v->user : "nobody");
            ie[i].event = v->user ? &e[i] : NULL;
            p[i] = &ie[i];
        }
        Affinity__V1__ImportEventsRequest req = AFFINITY__V1__IMPORT_EVENTS_REQUEST__INIT;
        if (msgs[m].collection) req.collection = (char *)msgs[m].collection;
        req.n_events = n;
        req.events = p;
        int rc = transport_client_stream_send(s, &req.base, &err);
        free(e);
        free(ie);
        free(p);
        if (rc) break;
    }
    ProtobufCMessage *resp = NULL;
    transport_client_stream_finish(s, &affinity__v1__import_events_response__descriptor, &resp, st);
    transport_client_stream_destroy(s);
    if (out)
        *out = (Affinity__V1__ImportEventsResponse *)resp;
    else
        transport_client_free(resp);
    return st->code;
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

static uint64_t count_of(const Affinity__V1__GetUserResponse *u, const char *type)
{
    for (size_t i = 0; i < u->n_event_counts; i++)
        if (strcmp(u->event_counts[i]->key, type) == 0) return u->event_counts[i]->value;
    return 0;
}

/* GetUser's counts of view/click/add_to_cart/purchase and its history length; all zero and
 * false when the user is unknown. */
static bool user_counts(transport_client *cl, const char *collection, const char *user,
                        uint64_t counts[4], uint32_t *history)
{
    static const char *const names[4] = {"view", "click", "add_to_cart", "purchase"};
    int code;
    Affinity__V1__GetUserResponse *u = get_user(cl, collection, user, &code);
    memset(counts, 0, 4 * sizeof counts[0]);
    *history = 0;
    if (code == TS_NOT_FOUND) return false;
    cr_assert_eq(code, 0, "GetUser %s: %d", user, code);
    for (int t = 0; t < 4; t++)
        counts[t] = count_of(u, names[t]);
    *history = u->history_length;
    transport_client_free(&u->base);
    return true;
}

static Affinity__V1__RecommendResponse *recommend(transport_client *cl, const char *collection,
                                                  const char *user)
{
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    req.collection = (char *)collection;
    req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
    req.user_id = (char *)user;
    req.k = 10;
    Affinity__V1__RecommendResponse *resp = NULL;
    transport_call_status st;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_RECOMMEND, &req,
                         &affinity__v1__recommend_response__descriptor, 0, &resp, &st),
                 0, "Recommend: %s", st.message);
    return resp;
}

static void assert_same_hits(const Affinity__V1__RecommendResponse *a,
                             const Affinity__V1__RecommendResponse *b)
{
    cr_assert_eq(a->source, b->source);
    cr_assert_eq(a->n_hits, b->n_hits);
    for (size_t i = 0; i < a->n_hits; i++) {
        cr_assert_str_eq(a->hits[i]->id, b->hits[i]->id, "hit %zu", i);
        cr_assert_float_eq(a->hits[i]->score, b->hits[i]->score, 1e-5, "hit %zu", i);
    }
}

#define V  AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW
#define C  AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CLICK
#define A  AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_ADD_TO_CART
#define P  AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE
#define CU AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CUSTOM

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- behaviour ------------------------------------------------------------------------------ */

Test(server_import, applies_many_users_and_rejects_bad_events_one_by_one, .timeout = 180)
{
    test_server s;
    start_on(&s, NULL);
    transport_client *cl = ts_client(&s, NULL);
    setup_catalog(cl, "shop");
    int64_t t0 = now_ms() - 3600 * 1000;
    char long_user[200];
    memset(long_user, 'u', sizeof long_user - 1);
    long_user[sizeof long_user - 1] = '\0';
    /* Message 0: users interleaved (u1 twice, apart), an unknown item, bad user ids and an
     * ImportedEvent without its Event. */
    const iev m0[] = {
        {"u1", "i1", V, NULL, t0, 0},          /* 0 */
        {"u1", "i2", P, NULL, t0 + 1000, 2.5}, /* 1 */
        {"u2", "i3", C, NULL, t0 + 2000, 0},   /* 2 */
        {"u2", "nope", V, NULL, t0, 0},        /* 3 rejected: unknown item */
        {"", "i4", V, NULL, t0, 0},            /* 4 rejected: empty user id */
        {"u1", "i5", A, NULL, t0 + 3000, 0},   /* 5 */
        {long_user, "i6", V, NULL, t0, 0},     /* 6 rejected: user id too long */
        {NULL, NULL, V, NULL, 0, 0},           /* 7 rejected: no event */
    };
    /* Message 1 omits the collection. */
    const iev m1[] = {
        {"u3", "i7", CU, "wishlist", t0, 0},                 /* 8 rejected: not configured */
        {"u3", "i8", V, NULL, now_ms() + 3 * 86400000LL, 0}, /* 9 rejected: future */
        {"u3", "i9", V, NULL, t0, NAN},                      /* 10 rejected: value */
        {"u3", "i10", V, NULL, 0, 0},                        /* 11: ts 0 = now */
        {"u2", "i11", P, NULL, t0 + 5000, 1},                /* 12 */
        {"u3", "", V, NULL, t0, 0},                          /* 13 rejected: item id */
        {"u3", "i12", AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_UNSPECIFIED, NULL, t0, 0}, /* 14 */
        {"u3", "i12", V, "wishlist", t0, 0}, /* 15 rejected: custom_type without CUSTOM */
    };
    /* Message 2 repeats the collection. */
    const iev m2[] = {{"u1", "i1", V, NULL, t0 + 9000, 0}, /* 16 */
                      {"u4", "i13", P, NULL, t0, 0}};      /* 17 */
    const imsg msgs[] = {{"shop", m0, 8}, {NULL, m1, 8}, {"shop", m2, 2}};
    Affinity__V1__ImportEventsResponse *r = NULL;
    transport_call_status st;
    cr_assert_eq(import(cl, msgs, 3, &r, &st), 0, "ImportEvents: %d %s", st.code, st.message);
    cr_assert_eq(r->applied_count, 8);
    cr_assert_eq(r->rejected_count, 10);
    cr_assert_eq(r->n_rejected, 10);
    static const struct {
        uint64_t index;
        const char *user;
        const char *reason;
    } want[] = {{3, "u2", "unknown item id 'nope'"},
                {4, "", "user id"},
                {6, NULL, "user id"},
                {7, "nobody", "event is missing"},
                {8, "u3", "'wishlist' is not configured"},
                {9, "u3", "timestamp"},
                {10, "u3", "finite"},
                {13, "u3", "item id"},
                {14, "u3", "event type must be"},
                {15, "u3", "custom_type 'wishlist' is set but type is not"}};
    for (size_t i = 0; i < 10; i++) {
        const Affinity__V1__ImportRejection *x = r->rejected[i];
        cr_assert_eq(x->index, want[i].index, "rejection %zu: index %llu, want %llu", i,
                     (unsigned long long)x->index, (unsigned long long)want[i].index);
        if (want[i].user)
            cr_assert_str_eq(x->user_id, want[i].user);
        else /* a too-long id comes back cut to the 128 bytes ids may have */
            cr_assert(strlen(x->user_id) == 128 && strncmp(x->user_id, long_user, 128) == 0);
        cr_assert(strstr(x->reason, want[i].reason), "rejection %zu: '%s' lacks '%s'", i, x->reason,
                  want[i].reason);
    }
    transport_client_free(&r->base);

    uint64_t cnt[4];
    uint32_t hist;
    cr_assert(user_counts(cl, "shop", "u1", cnt, &hist));
    cr_assert(cnt[0] == 2 && cnt[1] == 0 && cnt[2] == 1 && cnt[3] == 1 && hist == 4);
    cr_assert(user_counts(cl, "shop", "u2", cnt, &hist));
    cr_assert(cnt[0] == 0 && cnt[1] == 1 && cnt[3] == 1 && hist == 2);
    cr_assert(user_counts(cl, "shop", "u3", cnt, &hist));
    cr_assert(cnt[0] == 1 && hist == 1);
    cr_assert(user_counts(cl, "shop", "u4", cnt, &hist));
    cr_assert(cnt[3] == 1 && hist == 1);

    /* Imported and put events make the same profile: u1's events again through PutEvents
     * for p1 give the same recommendations. */
    const iev u1_events[] = {m0[0], m0[1], m0[5], m2[0]};
    Affinity__V1__Event pe[4];
    Affinity__V1__Event *pp[4];
    for (int i = 0; i < 4; i++) {
        affinity__v1__event__init(&pe[i]);
        pe[i].item_id = (char *)u1_events[i].item;
        pe[i].type = u1_events[i].type;
        pe[i].timestamp_ms = u1_events[i].ts;
        pe[i].value = u1_events[i].value;
        pp[i] = &pe[i];
    }
    Affinity__V1__PutEventsRequest preq = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    preq.collection = "shop";
    preq.user_id = "p1";
    preq.n_events = 4;
    preq.events = pp;
    cr_assert_eq(ts_call(cl, TRANSPORT_METHOD_PUT_EVENTS, &preq,
                         &affinity__v1__put_events_response__descriptor, 0, NULL, &st),
                 0);
    Affinity__V1__RecommendResponse *ra = recommend(cl, "shop", "u1");
    Affinity__V1__RecommendResponse *rb = recommend(cl, "shop", "p1");
    cr_assert_eq(ra->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE);
    assert_same_hits(ra, rb);
    transport_client_free(&ra->base);
    transport_client_free(&rb->base);
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
}

Test(server_import, bad_calls_fail_with_clear_errors_and_change_nothing, .timeout = 180)
{
    test_server s;
    start_on(&s, NULL);
    transport_client *cl = ts_client(&s, NULL);
    setup_catalog(cl, "shop");
    /* What a new user is shown (popularity), before any import. */
    const iev seed[] = {{"seed", "i20", P, NULL, 0, 0}};
    const imsg seed_msg[] = {{"shop", seed, 1}};
    transport_call_status st;
    cr_assert_eq(import(cl, seed_msg, 1, NULL, &st), 0, "%s", st.message);
    Affinity__V1__RecommendResponse *before = recommend(cl, "shop", "newcomer");

    const iev good[] = {{"x1", "i1", P, NULL, 0, 0}, {"x1", "i2", P, NULL, 0, 0}};
    /* Unknown collection: NOT_FOUND naming it. */
    const imsg unknown[] = {{"nowhere", good, 2}};
    cr_assert_eq(import(cl, unknown, 1, NULL, &st), TS_NOT_FOUND, "%d %s", st.code, st.message);
    cr_assert(strstr(st.message, "nowhere"), "%s", st.message);
    /* No collection in the first message. */
    const imsg nameless[] = {{NULL, good, 2}};
    cr_assert_eq(import(cl, nameless, 1, NULL, &st), TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "collection"), "%s", st.message);
    /* No events; too many events. */
    const imsg empty[] = {{"shop", good, 0}};
    cr_assert_eq(import(cl, empty, 1, NULL, &st), TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "1..10000"), "%s", st.message);
    iev *many = calloc(10001, sizeof *many);
    for (int i = 0; i < 10001; i++)
        many[i] = (iev){"x1", "i1", V, NULL, 0, 0};
    const imsg too_many[] = {{"shop", many, 10001}};
    cr_assert_eq(import(cl, too_many, 1, NULL, &st), TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "10001 events"), "%s", st.message);
    free(many);
    /* A later message naming another collection: the call fails there, the earlier message
     * stays applied (it was durable before the next was read), the bad one is not. */
    const iev later[] = {{"x2", "i3", P, NULL, 0, 0}};
    const imsg switching[] = {{"shop", later, 1}, {"other", good, 2}};
    cr_assert_eq(import(cl, switching, 2, NULL, &st), TS_INVALID_ARGUMENT);
    cr_assert(strstr(st.message, "other") && strstr(st.message, "1 events applied before"), "%s",
              st.message);
    /* Every event bad: all rejected, nothing written. */
    const iev bad[] = {{"x1", "nope", P, NULL, 0, 0}, {"x1", "i1", CU, "nosuch", 0, 0}};
    const imsg all_bad[] = {{"shop", bad, 2}};
    Affinity__V1__ImportEventsResponse *r = NULL;
    cr_assert_eq(import(cl, all_bad, 1, &r, &st), 0);
    cr_assert_eq(r->applied_count, 0);
    cr_assert_eq(r->rejected_count, 2);
    transport_client_free(&r->base);
    /* 1,500 rejections over two messages: all counted, the first 1,000 listed in order. */
    iev *unknown_items = calloc(750, sizeof *unknown_items);
    for (int i = 0; i < 750; i++)
        unknown_items[i] = (iev){"x1", "nope", V, NULL, 0, 0};
    const imsg lots[] = {{"shop", unknown_items, 750}, {NULL, unknown_items, 750}};
    cr_assert_eq(import(cl, lots, 2, &r, &st), 0, "%s", st.message);
    cr_assert_eq(r->applied_count, 0);
    cr_assert_eq(r->rejected_count, 1500);
    cr_assert_eq(r->n_rejected, 1000);
    for (size_t i = 0; i < r->n_rejected; i++)
        cr_assert_eq(r->rejected[i]->index, i);
    transport_client_free(&r->base);
    free(unknown_items);
    /* An empty stream: OK, nothing. */
    cr_assert_eq(import(cl, NULL, 0, &r, &st), 0);
    cr_assert_eq(r->applied_count + r->rejected_count, 0);
    transport_client_free(&r->base);

    uint64_t cnt[4];
    uint32_t hist;
    cr_assert_not(user_counts(cl, "shop", "x1", cnt, &hist), "x1 must not exist");
    cr_assert(user_counts(cl, "shop", "x2", cnt, &hist));
    cr_assert(cnt[3] == 1 && hist == 1);
    /* Popularity moved only by x2's purchase of i3 and the seed: i1 and i2 are where they
     * were (a failed call changed no counter). */
    Affinity__V1__RecommendResponse *after = recommend(cl, "shop", "newcomer");
    cr_assert_eq(after->source, AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY);
    for (size_t i = 0; i < after->n_hits; i++)
        cr_assert(strcmp(after->hits[i]->id, "i1") != 0 && strcmp(after->hits[i]->id, "i2") != 0,
                  "i1/i2 became popular through a failed import");
    cr_assert(before->n_hits >= 1 && strcmp(before->hits[0]->id, "i20") == 0);
    transport_client_free(&before->base);
    transport_client_free(&after->base);
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s, SIGTERM, 30000), 0);
}

/* ---- durability ----------------------------------------------------------------------------- */

#define K_USERS      30
#define K_PER_USER   120 /* events per user in the acknowledged import */
#define K_PER_MSG    400
#define K_MID_USERS  40 /* the interrupted stream: one user per message */
#define K_MID_EVENTS 50

/* Event j of user u in the acknowledged import: type by j % 4, item by (u + j) % N_ITEMS. */
static Affinity__V1__EventType k_type(int j)
{
    return (Affinity__V1__EventType)(1 + j % 4);
}

Test(server_import, sigkill_loses_no_acknowledged_event, .timeout = 300)
{
    char data[256];
    ts_make_dir(data, sizeof data, "import");
    test_server s;
    start_on(&s, data);
    transport_client *cl = ts_client(&s, NULL);
    setup_catalog(cl, "shop");
    int64_t t0 = now_ms() - 86400000LL;

    /* An acknowledged import: K_USERS users' events interleaved in messages of K_PER_MSG. */
    size_t total = (size_t)K_USERS * K_PER_USER;
    iev *evs = calloc(total, sizeof *evs);
    static char users[K_USERS + K_MID_USERS][16];
    for (int u = 0; u < K_USERS + K_MID_USERS; u++)
        snprintf(users[u], sizeof users[u], "user-%d", u);
    for (size_t i = 0; i < total; i++) {
        int u = (int)(i % K_USERS), j = (int)(i / K_USERS);
        evs[i] = (iev){users[u], item_ids[(u + j) % N_ITEMS], k_type(j), NULL, t0 + (int64_t)i, 0};
    }
    size_t n_msgs = (total + K_PER_MSG - 1) / K_PER_MSG;
    imsg *msgs = calloc(n_msgs, sizeof *msgs);
    for (size_t m = 0; m < n_msgs; m++) {
        size_t from = m * K_PER_MSG;
        msgs[m] = (imsg){m == 0 ? "shop" : NULL, evs + from,
                         total - from < K_PER_MSG ? total - from : K_PER_MSG};
    }
    Affinity__V1__ImportEventsResponse *r = NULL;
    transport_call_status st;
    cr_assert_eq(import(cl, msgs, n_msgs, &r, &st), 0, "%s", st.message);
    cr_assert_eq(r->applied_count, total);
    cr_assert_eq(r->rejected_count, 0);
    transport_client_free(&r->base);

    /* A second stream, one user per message, killed while it runs. */
    iev *mid = calloc((size_t)K_MID_USERS * K_MID_EVENTS, sizeof *mid);
    imsg mid_msgs[K_MID_USERS];
    for (int u = 0; u < K_MID_USERS; u++) {
        for (int j = 0; j < K_MID_EVENTS; j++)
            mid[u * K_MID_EVENTS + j] =
                (iev){users[K_USERS + u], item_ids[j % N_ITEMS], V, NULL, t0 + j, 0};
        mid_msgs[u] = (imsg){"shop", mid + u * K_MID_EVENTS, K_MID_EVENTS};
    }
    pid_t killer = fork();
    cr_assert(killer >= 0);
    if (killer == 0) {
        usleep(150 * 1000);
        kill(s.pid, SIGKILL);
        _exit(0);
    }
    int code = import(cl, mid_msgs, K_MID_USERS, &r, &st);
    if (code == 0) transport_client_free(&r->base);
    int ws;
    waitpid(killer, &ws, 0);
    cr_assert_eq(ts_stop(&s, SIGKILL, 10000), 128 + SIGKILL);
    transport_client_destroy(cl);

    /* Restart on the same data: every acknowledged event is there, each interrupted message
     * all or nothing. */
    test_server s2;
    start_on(&s2, data);
    cl = ts_client(&s2, NULL);
    for (int u = 0; u < K_USERS; u++) {
        uint64_t cnt[4];
        uint32_t hist;
        cr_assert(user_counts(cl, "shop", users[u], cnt, &hist), "%s lost", users[u]);
        for (int t = 0; t < 4; t++)
            cr_assert_eq(cnt[t], K_PER_USER / 4, "%s type %d: %llu events", users[u], t + 1,
                         (unsigned long long)cnt[t]);
        cr_assert_eq(hist, K_PER_USER);
    }
    int whole = 0;
    for (int u = 0; u < K_MID_USERS; u++) {
        uint64_t cnt[4];
        uint32_t hist;
        bool there = user_counts(cl, "shop", users[K_USERS + u], cnt, &hist);
        if (!there) continue;
        cr_assert_eq(cnt[0], K_MID_EVENTS, "message of %s is half there", users[K_USERS + u]);
        cr_assert_eq(hist, K_MID_EVENTS);
        whole++;
    }
    cr_log_info("interrupted stream (code %d): %d of %d messages applied", code, whole,
                K_MID_USERS);
    if (code == 0) cr_assert_eq(whole, K_MID_USERS, "acknowledged, yet not all there");
    transport_client_destroy(cl);
    cr_assert_eq(ts_stop(&s2, SIGTERM, 30000), 0);
    ts_remove_path(data);
    free(evs);
    free(mid);
    free(msgs);
}

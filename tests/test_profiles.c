/*
 * test_profiles.c: shoppers' profiles on a real store (LMDB in a temp dir) and, where a
 * ranking over the catalog is the point, a real engine on the CPU backend fed the same items.
 *
 * The catalog: three categories, each clustered around its own axis of an 8-d space, so
 * "the user's interests" have a checkable direction.
 */
#include <criterion/criterion.h>

#include <ftw.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine.h"
#include "log.h"
#include "profiles.h"
#include "store.h"

#define DIM     8
#define PER_CAT 10
#define DAY_MS  (86400LL * 1000)
#define T0      (1767225600000LL) /* 2026-01-01, the tests' "now" */

static const char *const cats[3] = {"shoes", "books", "toys"};

static char dir[256];
static aff_store *store;
static aff_profiles *prof;
static aff_engine *engine;
static int64_t clock_ms = T0;

static int64_t test_clock(void *ctx)
{
    return *(int64_t *)ctx;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void item_id(char *out, size_t cap, int cat, int j)
{
    snprintf(out, cap, "%s-%d", cats[cat], j);
}

static void item_vec(int cat, int j, float *v)
{
    memset(v, 0, DIM * sizeof *v);
    v[cat] = 1.0f;
    v[3 + j % 5] = 0.1f * (float)(j + 1);
}

static void open_all(const profiles_config *pc)
{
    aff_err err = {0};
    store_config sc = {.dir = dir};
    cr_assert_eq(store_create(&store, &sc, &err), AFF_OK, "%s", err.msg);
    profiles_config def;
    if (!pc) {
        profiles_config_init(&def);
        def.now_ms = test_clock;
        def.now_ctx = &clock_ms;
        pc = &def;
    }
    cr_assert_eq(profiles_create(&prof, store, pc, &err), AFF_OK, "%s", err.msg);
}

static void close_all(void)
{
    profiles_destroy(prof);
    store_destroy(store);
    prof = NULL;
    store = NULL;
}

/* Stores the catalog in the store and, when with_engine, in a CPU engine too. */
static void load_catalog(bool with_engine)
{
    aff_err err = {0};
    store_collection c = {.name = "shop", .dim = DIM, .metric = AFF_METRIC_COSINE};
    cr_assert_eq(store_put_collection(store, &c, &err), AFF_OK, "%s", err.msg);
    char ids[3 * PER_CAT][32];
    float vecs[3 * PER_CAT][DIM];
    aff_item items[3 * PER_CAT];
    for (int cat = 0; cat < 3; cat++) {
        for (int j = 0; j < PER_CAT; j++) {
            int i = cat * PER_CAT + j;
            item_id(ids[i], sizeof ids[i], cat, j);
            item_vec(cat, j, vecs[i]);
            items[i] = (aff_item){.id = ids[i],
                                    .vector = vecs[i],
                                    .dim = DIM,
                                    .attrs.category = cats[cat],
                                    .attrs.price = (float)j,
                                    .attrs.available = j != 9};
        }
    }
    cr_assert_eq(store_put_items(store, "shop", items, 3 * PER_CAT, &err), AFF_OK, "%s", err.msg);
    if (with_engine) {
        engine_config ec = {.backend = ENGINE_BACKEND_CPU, .faiss = {.threads = 1}};
        cr_assert_eq(engine_create(&engine, &ec, &err), AFF_OK, "%s", err.msg);
        engine_collection_spec spec = {.name = "shop", .dim = DIM, .metric = AFF_METRIC_COSINE};
        cr_assert_eq(engine_create_collection(engine, &spec, &err), AFF_OK, "%s", err.msg);
        cr_assert_eq(engine_upsert(engine, "shop", items, 3 * PER_CAT, &err), AFF_OK, "%s",
                     err.msg);
    }
}

static void setup(void)
{
    aff_log_set_level(AFF_LOG_WARN);
    snprintf(dir, sizeof dir, "/tmp/aff-profiles-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    clock_ms = T0;
    open_all(NULL);
    load_catalog(false);
}

static void teardown(void)
{
    close_all();
    engine_destroy(engine);
    engine = NULL;
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

TestSuite(profiles, .init = setup, .fini = teardown, .timeout = 120);

static profiles_event ev(int cat, int j, profiles_event_kind type, int64_t ts)
{
    static char ids[64][32];
    static int next;
    char *id = ids[next++ % 64];
    item_id(id, 32, cat, j);
    return (profiles_event){.item_id = id, .type = type, .timestamp_ms = ts};
}

static void put(const char *user, const profiles_event *events, size_t n)
{
    aff_err err = {0};
    uint32_t applied = 0, n_rej = 0;
    profiles_rejection rej[64];
    cr_assert_eq(profiles_put_events(prof, "shop", user, events, n, &applied, rej, &n_rej, &err),
                 AFF_OK, "%s", err.msg);
    cr_assert_eq(n_rej, 0, "rejected: %s", n_rej ? rej[0].reason : "");
    cr_assert_eq(applied, n);
}

static float dot(const float *a, const float *b)
{
    float s = 0;
    for (int i = 0; i < DIM; i++)
        s += a[i] * b[i];
    return s;
}

static void user_vector(const char *user, float *v)
{
    bool found = false;
    aff_err err = {0};
    cr_assert_eq(profiles_user_vector(prof, "shop", user, v, DIM, &found, &err), AFF_OK, "%s",
                 err.msg);
    cr_assert(found, "user %s has no profile", user);
}

/* The category whose axis the vector leans to most. */
static int leaning(const float *v)
{
    int best = 0;
    for (int c = 1; c < 3; c++)
        if (v[c] > v[best]) best = c;
    return best;
}

/* History visitors. */
typedef struct hist {
    int n;
    int64_t ts[16];
} hist;

static int collect(void *ctx, uint64_t seq, const store_event *e)
{
    hist *h = ctx;
    if (h->n < 16) h->ts[h->n] = e->ts_ms;
    h->n++;
    return 0;
}

static int count(void *ctx, uint64_t seq, const store_event *e)
{
    (*(int *)ctx)++;
    return 0;
}

typedef struct last_seen {
    double value;
    char ctx[64];
} last_seen;

static int last_event(void *c, uint64_t seq, const store_event *e)
{
    last_seen *l = c;
    l->value = e->value;
    l->ctx[0] = '\0';
    for (uint32_t i = 0; i < e->n_context; i++)
        snprintf(l->ctx + strlen(l->ctx), sizeof l->ctx - strlen(l->ctx), "%s%s=%s", i ? "," : "",
                 e->context[i].key, e->context[i].value);
    return 0;
}

Test(profiles, user_who_views_and_buys_shoes_is_recommended_shoes_minus_purchases)
{
    engine_config ec = {.backend = ENGINE_BACKEND_CPU, .faiss = {.threads = 1}};
    aff_err err = {0};
    cr_assert_eq(engine_create(&engine, &ec, &err), AFF_OK, "%s", err.msg);
    engine_collection_spec spec = {.name = "shop", .dim = DIM, .metric = AFF_METRIC_COSINE};
    cr_assert_eq(engine_create_collection(engine, &spec, &err), AFF_OK, "%s", err.msg);
    for (int cat = 0; cat < 3; cat++) {
        for (int j = 0; j < PER_CAT; j++) {
            char id[32];
            float v[DIM];
            item_id(id, sizeof id, cat, j);
            item_vec(cat, j, v);
            aff_item it = {.id = id,
                           .vector = v,
                           .dim = DIM,
                           .attrs.category = cats[cat],
                           .attrs.price = (float)j,
                           .attrs.available = j != 9};
            cr_assert_eq(engine_upsert(engine, "shop", &it, 1, &err), AFF_OK, "%s", err.msg);
        }
    }

    profiles_event e[] = {
        ev(0, 1, PROFILES_EVENT_VIEW, T0 - 3 * DAY_MS),
        ev(0, 2, PROFILES_EVENT_VIEW, T0 - 2 * DAY_MS),
        ev(0, 2, PROFILES_EVENT_PURCHASE, T0 - DAY_MS),
        ev(1, 0, PROFILES_EVENT_VIEW, T0 - DAY_MS),
        ev(0, 3, PROFILES_EVENT_ADD_TO_CART, T0),
    };
    put("alice", e, 5);

    const char *excl[] = {"purchase"};
    profiles_plan plan;
    cr_assert_eq(profiles_plan_recommend(prof, "shop", "alice", excl, 1, NULL, &plan, &err), AFF_OK,
                 "%s", err.msg);
    cr_assert_eq(plan.source, PROFILES_SOURCE_PROFILE);
    cr_assert_eq(plan.n_excluded, 1);
    cr_assert_str_eq(plan.filter.exclude_ids[0], "shoes-2");

    aff_query q = {.vector = plan.vector, .dim = plan.dim, .k = 5, .filter = &plan.filter};
    aff_hit hits[5];
    uint32_t n_hits = 0;
    aff_err qerr = {0};
    cr_assert_eq(engine_search(engine, NULL, "shop", &q, 1, hits, &n_hits, &qerr), AFF_OK, "%s",
                 qerr.msg);
    cr_assert_eq(n_hits, 5);
    for (uint32_t i = 0; i < n_hits; i++) {
        cr_assert(strncmp(hits[i].id, "shoes-", 6) == 0, "hit %u is %s", i, hits[i].id);
        cr_assert_str_neq(hits[i].id, "shoes-2", "the purchased item is excluded");
    }
    profiles_plan_release(&plan);

    /* Without the exclusion the purchased item is among the best. */
    cr_assert_eq(profiles_plan_recommend(prof, "shop", "alice", NULL, 0, NULL, &plan, &err),
                 AFF_OK);
    q = (aff_query){.vector = plan.vector, .dim = plan.dim, .k = 10, .filter = &plan.filter};
    aff_hit all[10];
    cr_assert_eq(engine_search(engine, NULL, "shop", &q, 1, all, &n_hits, &qerr), AFF_OK);
    bool seen = false;
    for (uint32_t i = 0; i < n_hits; i++)
        seen = seen || strcmp(all[i].id, "shoes-2") == 0;
    cr_assert(seen);
    profiles_plan_release(&plan);
}

Test(profiles, purchases_stay_excluded_beyond_the_bounded_history)
{
    close_all();
    profiles_config pc;
    profiles_config_init(&pc);
    pc.history_len = 10;
    pc.now_ms = test_clock;
    pc.now_ctx = &clock_ms;
    open_all(&pc);
    profiles_event first = ev(2, 4, PROFILES_EVENT_PURCHASE, T0 - 10 * DAY_MS);
    put("bob", &first, 1);
    for (int i = 0; i < 60; i++) {
        profiles_event v = ev(1, i % PER_CAT, PROFILES_EVENT_VIEW, T0 - DAY_MS + i);
        put("bob", &v, 1);
    }
    profiles_user_info info;
    cr_assert_eq(profiles_get_user(prof, "shop", "bob", &info, NULL), AFF_OK);
    cr_assert_eq(info.history_length, 10);

    const char *excl[] = {"purchase"};
    profiles_plan plan;
    aff_err err = {0};
    cr_assert_eq(profiles_plan_recommend(prof, "shop", "bob", excl, 1, NULL, &plan, &err), AFF_OK);
    cr_assert_eq(plan.n_excluded, 1);
    cr_assert_str_eq(plan.filter.exclude_ids[0], "toys-4");
    profiles_plan_release(&plan);

    /* The history keeps exactly the last 10 events, oldest first. */
    hist h = {0};
    cr_assert_eq(profiles_history(prof, "shop", "bob", collect, &h, NULL), AFF_OK);
    cr_assert_eq(h.n, 10);
    cr_assert_eq(h.ts[0], T0 - DAY_MS + 50);
    cr_assert_eq(h.ts[9], T0 - DAY_MS + 59);
}

Test(profiles, unknown_user_gets_popular_items_through_the_filter)
{
    /* toys-1: two purchases (16); books-2: five views (5); shoes-3: one click (2);
     * shoes-9: three purchases but unavailable. */
    profiles_event a[] = {ev(2, 1, PROFILES_EVENT_PURCHASE, T0), ev(1, 2, PROFILES_EVENT_VIEW, T0),
                          ev(1, 2, PROFILES_EVENT_VIEW, T0), ev(0, 3, PROFILES_EVENT_CLICK, T0),
                          ev(0, 9, PROFILES_EVENT_PURCHASE, T0)};
    profiles_event b[] = {
        ev(2, 1, PROFILES_EVENT_PURCHASE, T0), ev(1, 2, PROFILES_EVENT_VIEW, T0),
        ev(1, 2, PROFILES_EVENT_VIEW, T0),     ev(1, 2, PROFILES_EVENT_VIEW, T0),
        ev(0, 9, PROFILES_EVENT_PURCHASE, T0), ev(0, 9, PROFILES_EVENT_PURCHASE, T0)};
    put("u1", a, 5);
    put("u2", b, 6);

    profiles_plan plan;
    aff_err err = {0};
    const char *excl[] = {"purchase"};
    cr_assert_eq(profiles_plan_recommend(prof, "shop", "stranger", excl, 1, NULL, &plan, &err),
                 AFF_OK);
    cr_assert_eq(plan.source, PROFILES_SOURCE_POPULARITY);
    cr_assert_null(plan.vector);
    cr_assert_eq(plan.n_excluded, 0);

    aff_hit hits[10];
    uint32_t n = 0;
    cr_assert_eq(profiles_popular(prof, "shop", 10, &plan.filter, hits, &n, &err), AFF_OK, "%s",
                 err.msg);
    cr_assert_eq(n, 4);
    cr_assert_str_eq(hits[0].id, "shoes-9");
    cr_assert_float_eq(hits[0].score, 24.0f, 1e-3);
    cr_assert_str_eq(hits[1].id, "toys-1");
    cr_assert_float_eq(hits[1].score, 16.0f, 1e-3);
    cr_assert_str_eq(hits[2].id, "books-2");
    cr_assert_float_eq(hits[2].score, 5.0f, 1e-3);
    cr_assert_str_eq(hits[3].id, "shoes-3");
    profiles_plan_release(&plan);

    /* Same filters as a search: availability, category, exclusions. */
    aff_filter f = {.price_min = -INFINITY, .price_max = INFINITY, .available_only = true};
    cr_assert_eq(profiles_popular(prof, "shop", 10, &f, hits, &n, &err), AFF_OK);
    cr_assert_eq(n, 3);
    cr_assert_str_eq(hits[0].id, "toys-1");
    const char *only[] = {"books", "shoes"};
    const char *skip[] = {"books-2"};
    f = (aff_filter){.categories = only,
                     .n_categories = 2,
                     .price_min = -INFINITY,
                     .price_max = INFINITY,
                     .exclude_ids = skip,
                     .n_exclude_ids = 1};
    cr_assert_eq(profiles_popular(prof, "shop", 10, &f, hits, &n, &err), AFF_OK);
    cr_assert_eq(n, 2);
    cr_assert_str_eq(hits[0].id, "shoes-9");
    cr_assert_str_eq(hits[1].id, "shoes-3");
    cr_assert_eq(profiles_popular(prof, "shop", 1, NULL, hits, &n, &err), AFF_OK);
    cr_assert_eq(n, 1);
    f = (aff_filter){.price_min = 5.0f, .price_max = 1.0f};
    cr_assert_eq(profiles_popular(prof, "shop", 1, &f, hits, &n, &err), AFF_EINVAL);
    cr_assert_eq(profiles_popular(prof, "shop", 0, NULL, hits, &n, &err), AFF_EINVAL);
    cr_assert_eq(profiles_popular(prof, "nope", 1, NULL, hits, &n, &err), AFF_ENOTFOUND);

    /* A week later (the popularity half-life) every score has halved. */
    clock_ms = T0 + 7 * DAY_MS;
    cr_assert_eq(profiles_popular(prof, "shop", 1, NULL, hits, &n, &err), AFF_OK);
    cr_assert_float_eq(hits[0].score, 12.0f, 1e-3);
}

/* The popular items of the collection against a brute-force reference over the events. */
static void check_popular(const double *ref, uint32_t k, const char *only_cat)
{
    /* reference: every item with a score, passing the category, best first (ties by id) */
    int order[3 * PER_CAT], n_ref = 0;
    char ids[3 * PER_CAT][32];
    for (int i = 0; i < 3 * PER_CAT; i++) {
        item_id(ids[i], sizeof ids[i], i / PER_CAT, i % PER_CAT);
        if (ref[i] > 0 && (!only_cat || strcmp(cats[i / PER_CAT], only_cat) == 0))
            order[n_ref++] = i;
    }
    for (int a = 1; a < n_ref; a++)
        for (int b = a; b > 0; b--) {
            int x = order[b - 1], y = order[b];
            if (ref[x] > ref[y] || (ref[x] == ref[y] && strcmp(ids[x], ids[y]) < 0)) break;
            order[b - 1] = y;
            order[b] = x;
        }
    aff_filter f = {.price_min = -INFINITY, .price_max = INFINITY};
    if (only_cat) {
        f.categories = &only_cat;
        f.n_categories = 1;
    }
    aff_hit hits[3 * PER_CAT];
    uint32_t n = 0;
    aff_err err = {0};
    cr_assert_eq(profiles_popular(prof, "shop", k, only_cat ? &f : NULL, hits, &n, &err), AFF_OK,
                 "%s", err.msg);
    const uint32_t want = (uint32_t)n_ref < k ? (uint32_t)n_ref : k;
    cr_assert_eq(n, want, "k %u: %u hits, want %u", k, n, want);
    for (uint32_t i = 0; i < n; i++) {
        cr_assert_str_eq(hits[i].id, ids[order[i]], "k %u, rank %u: %s (%.6f), want %s (%.6f)", k,
                         i, hits[i].id, hits[i].score, ids[order[i]], ref[order[i]]);
        cr_assert(fabs(hits[i].score - ref[order[i]]) <= 1e-4 * ref[order[i]], "%s: %f vs %f",
                  hits[i].id, hits[i].score, ref[order[i]]);
    }
}

Test(profiles, popular_items_are_exact_while_the_ranking_index_lags)
{
    /* The ranking index refiles an item only once its score grew by STORE_POP_RANK_SLACK
     * (log2: x1.41). toys-2: six views now (6, filed at log2 6 = 2.58); shoes-4: a purchase a
     * day ago (8 x 2^(-1/7) = 7.25, filed at 2.86). Two more calls add a view a day old each
     * to toys-2: 7.81, still filed at 2.58 (below 2.58 + 0.5), under shoes-4's 2.86, yet the
     * better item now. */
    const double day = pow(2.0, -1.0 / 7.0);
    profiles_event six[6];
    for (int i = 0; i < 6; i++)
        six[i] = ev(2, 2, PROFILES_EVENT_VIEW, T0);
    put("u1", six, 6);
    profiles_event buy = ev(0, 4, PROFILES_EVENT_PURCHASE, T0 - DAY_MS);
    put("u2", &buy, 1);
    for (int i = 0; i < 2; i++) {
        profiles_event view = ev(2, 2, PROFILES_EVENT_VIEW, T0 - DAY_MS);
        put("u3", &view, 1);
    }
    double ref[3 * PER_CAT] = {0};
    ref[2 * PER_CAT + 2] = 6 + 2 * day;
    ref[4] = 8 * day;
    check_popular(ref, 1, NULL);
    check_popular(ref, 2, NULL);

    /* Then many small calls on a skewed catalog: most counters move within their slack. */
    const double weight[4] = {1, 2, 4, 8}; /* view, click, add to cart, purchase */
    const profiles_event_kind kinds[4] = {PROFILES_EVENT_VIEW, PROFILES_EVENT_CLICK,
                                          PROFILES_EVENT_ADD_TO_CART, PROFILES_EVENT_PURCHASE};
    unsigned seed = 11;
    for (int round = 0; round < 60; round++) {
        profiles_event e[8];
        int n = 1 + rand_r(&seed) % 8;
        for (int i = 0; i < n; i++) {
            int r = rand_r(&seed) % 100;
            int item = r < 40 ? r % 3 : r < 70 ? 3 + r % 7 : rand_r(&seed) % (3 * PER_CAT);
            int t = rand_r(&seed) % 4;
            int64_t age = (int64_t)(rand_r(&seed) % 3000) * 60000; /* up to ~2 days */
            e[i] = ev(item / PER_CAT, item % PER_CAT, kinds[t], T0 - age);
            ref[item] += weight[t] * pow(2.0, -(double)age / (7.0 * DAY_MS));
        }
        char user[16];
        snprintf(user, sizeof user, "v%d", round % 5);
        put(user, e, (size_t)n);
        if (round % 10 == 9) {
            check_popular(ref, 1, NULL);
            check_popular(ref, 5, NULL);
            check_popular(ref, 3 * PER_CAT, NULL);
            check_popular(ref, 3, "books");
        }
    }
}

Test(profiles, decay_makes_old_interests_fade)
{
    profiles_event e[11];
    for (int i = 0; i < 10; i++)
        e[i] = ev(0, i, PROFILES_EVENT_PURCHASE, T0 - 120 * DAY_MS); /* 80 weight, 8.6 HL ago */
    e[10] = ev(1, 0, PROFILES_EVENT_VIEW, T0);                       /* 1 weight, now */
    put("carol", e, 11);
    float v[DIM];
    user_vector("carol", v);
    cr_assert_eq(leaning(v), 1, "recent books beat old shoes: %f %f", v[0], v[1]);

    /* Without decay (a half-life of a century) the shoe purchases dominate. */
    close_all();
    profiles_config pc;
    profiles_config_init(&pc);
    pc.half_life_s = 100 * 365 * 86400.0;
    pc.now_ms = test_clock;
    pc.now_ctx = &clock_ms;
    open_all(&pc);
    put("dave", e, 11);
    user_vector("dave", v);
    cr_assert_eq(leaning(v), 0);
}

Test(profiles, profile_is_the_decayed_weighted_sum_in_any_event_order)
{
    /* Events out of time order, one repeated item, mixed types. */
    const int64_t ts[6] = {T0,          T0 - 20 * DAY_MS, T0 - 3 * DAY_MS, T0 - 40 * DAY_MS,
                           T0 - DAY_MS, T0 - 3 * DAY_MS};
    const profiles_event_kind kinds[6] = {PROFILES_EVENT_VIEW,  PROFILES_EVENT_PURCHASE,
                                          PROFILES_EVENT_CLICK, PROFILES_EVENT_ADD_TO_CART,
                                          PROFILES_EVENT_VIEW,  PROFILES_EVENT_PURCHASE};
    const int cat[6] = {0, 1, 2, 1, 0, 2}, idx[6] = {1, 2, 3, 2, 5, 7};
    const double w[5] = {0, 1, 2, 4, 8};
    double want[DIM] = {0};
    for (int i = 0; i < 6; i++) {
        profiles_event e = ev(cat[i], idx[i], kinds[i], ts[i]);
        put("erin", &e, 1);
        float x[DIM];
        item_vec(cat[i], idx[i], x);
        float nx = sqrtf(dot(x, x));
        double f = w[kinds[i]] * exp2(-(double)(T0 - ts[i]) / (14.0 * DAY_MS));
        for (int d = 0; d < DIM; d++)
            want[d] += f * x[d] / nx;
    }
    double norm = 0;
    for (int d = 0; d < DIM; d++)
        norm += want[d] * want[d];
    norm = sqrt(norm);
    float v[DIM];
    user_vector("erin", v);
    for (int d = 0; d < DIM; d++)
        cr_assert_float_eq(v[d], (float)(want[d] / norm), 1e-5, "dim %d: %f vs %f", d, v[d],
                           want[d] / norm);
}

Test(profiles, delete_user_erases_everything_durably)
{
    profiles_event e[] = {ev(0, 1, PROFILES_EVENT_PURCHASE, T0), ev(1, 1, PROFILES_EVENT_VIEW, T0)};
    put("frank", e, 2);
    put("grace", e, 2);
    bool existed = false;
    aff_err err = {0};
    cr_assert_eq(profiles_delete_user(prof, NULL, "frank", &existed, &err), AFF_OK, "%s", err.msg);
    cr_assert(existed);
    close_all();
    open_all(NULL);
    profiles_user_info info;
    cr_assert_eq(profiles_get_user(prof, "shop", "frank", &info, &err), AFF_ENOTFOUND);
    const char *excl[] = {"purchase", "view"};
    profiles_plan plan;
    cr_assert_eq(profiles_plan_recommend(prof, "shop", "frank", excl, 2, NULL, &plan, &err),
                 AFF_OK);
    cr_assert_eq(plan.source, PROFILES_SOURCE_POPULARITY);
    cr_assert_eq(plan.n_excluded, 0);
    profiles_plan_release(&plan);
    int n = 0;
    cr_assert_eq(profiles_history(prof, "shop", "frank", count, &n, NULL), AFF_OK);
    cr_assert_eq(n, 0);
    cr_assert_eq(profiles_delete_user(prof, "shop", "frank", &existed, &err), AFF_OK);
    cr_assert_not(existed);
    /* Another user is untouched. */
    cr_assert_eq(profiles_get_user(prof, "shop", "grace", &info, &err), AFF_OK);
    cr_assert_eq(info.history_length, 2);
}

Test(profiles, survives_a_restart_with_identical_answers)
{
    profiles_event e[] = {ev(2, 1, PROFILES_EVENT_CLICK, T0 - DAY_MS),
                          ev(2, 5, PROFILES_EVENT_PURCHASE, T0), ev(0, 5, PROFILES_EVENT_VIEW, T0)};
    e[2].value = 12.5;
    store_kv ctx[] = {{"device", "mobile"}, {"session", "s-1"}};
    e[2].context = ctx;
    e[2].n_context = 2;
    put("heidi", e, 3);
    float before[DIM], after[DIM];
    user_vector("heidi", before);
    aff_hit hb[5], ha[5];
    uint32_t nb, na;
    cr_assert_eq(profiles_popular(prof, "shop", 5, NULL, hb, &nb, NULL), AFF_OK);
    close_all();
    open_all(NULL);
    user_vector("heidi", after);
    cr_assert_arr_eq(before, after, sizeof before);
    cr_assert_eq(profiles_popular(prof, "shop", 5, NULL, ha, &na, NULL), AFF_OK);
    cr_assert_eq(na, nb);
    for (uint32_t i = 0; i < na; i++) {
        cr_assert_str_eq(ha[i].id, hb[i].id);
        cr_assert_eq(ha[i].score, hb[i].score);
    }
    /* Value and context come back with the event. */
    last_seen l = {0};
    cr_assert_eq(profiles_history(prof, "shop", "heidi", last_event, &l, NULL), AFF_OK);
    cr_assert_eq(l.value, 12.5);
    cr_assert_str_eq(l.ctx, "device=mobile,session=s-1");
}

Test(profiles, bad_events_are_rejected_one_by_one)
{
    profiles_event e[] = {
        ev(0, 1, PROFILES_EVENT_VIEW, T0),
        {.item_id = "no-such-item", .type = PROFILES_EVENT_VIEW},
        ev(0, 2, PROFILES_EVENT_UNSPECIFIED, T0),
        {.item_id = "shoes-3", .type = PROFILES_EVENT_CUSTOM, .custom_type = "wishlist"},
        ev(0, 4, PROFILES_EVENT_VIEW, T0 + 3 * DAY_MS),
        ev(0, 5, PROFILES_EVENT_CLICK, 0),
    };
    uint32_t applied = 0, n_rej = 0;
    profiles_rejection rej[6];
    aff_err err = {0};
    cr_assert_eq(profiles_put_events(prof, "shop", "ivan", e, 6, &applied, rej, &n_rej, &err),
                 AFF_OK, "%s", err.msg);
    cr_assert_eq(applied, 2);
    cr_assert_eq(n_rej, 4);
    cr_assert_eq(rej[0].index, 1);
    cr_assert(strstr(rej[0].reason, "unknown item id 'no-such-item'"), "%s", rej[0].reason);
    cr_assert_eq(rej[1].index, 2);
    cr_assert_eq(rej[2].index, 3);
    cr_assert(strstr(rej[2].reason, "wishlist"), "%s", rej[2].reason);
    cr_assert_eq(rej[3].index, 4);
    cr_assert(strstr(rej[3].reason, "timestamp"), "%s", rej[3].reason);
    profiles_user_info info;
    cr_assert_eq(profiles_get_user(prof, "shop", "ivan", &info, NULL), AFF_OK);
    cr_assert_eq(info.last_event_ms, T0, "timestamp 0 means now");

    cr_assert_eq(profiles_put_events(prof, "nope", "ivan", e, 1, &applied, rej, &n_rej, &err),
                 AFF_ENOTFOUND);
    cr_assert_eq(profiles_put_events(prof, "shop", "", e, 1, &applied, rej, &n_rej, &err),
                 AFF_EINVAL);
    cr_assert_eq(profiles_put_events(prof, "shop", "ivan", e, 0, &applied, rej, &n_rej, &err),
                 AFF_EINVAL);
}

Test(profiles, deleted_items_stop_contributing_and_never_come_back)
{
    profiles_event e[] = {ev(0, 1, PROFILES_EVENT_PURCHASE, T0),
                          ev(0, 2, PROFILES_EVENT_PURCHASE, T0), ev(1, 3, PROFILES_EVENT_VIEW, T0)};
    put("judy", e, 3);
    float v[DIM];
    user_vector("judy", v);
    cr_assert_eq(leaning(v), 0);

    const char *gone[] = {"shoes-1", "shoes-2"};
    size_t n_del = 0;
    cr_assert_eq(store_delete_items(store, "shop", gone, 2, &n_del, NULL), AFF_OK);
    cr_assert_eq(n_del, 2);
    user_vector("judy", v);
    float want[DIM];
    item_vec(1, 3, want);
    float nw = sqrtf(dot(want, want));
    for (int d = 0; d < DIM; d++)
        cr_assert_float_eq(v[d], want[d] / nw, 1e-6, "only books-3 is left");

    aff_hit hits[10];
    uint32_t n;
    cr_assert_eq(profiles_popular(prof, "shop", 10, NULL, hits, &n, NULL), AFF_OK);
    cr_assert_eq(n, 1);
    cr_assert_str_eq(hits[0].id, "books-3");

    /* The next write persists the recomputed profile; an event on a deleted item is refused. */
    profiles_event more = ev(1, 4, PROFILES_EVENT_VIEW, T0);
    put("judy", &more, 1);
    user_vector("judy", v);
    cr_assert_eq(leaning(v), 1);
    cr_assert_lt(v[0], 1e-6);
    profiles_event dead = ev(0, 1, PROFILES_EVENT_VIEW, T0);
    uint32_t applied, n_rej;
    profiles_rejection rej[1];
    cr_assert_eq(profiles_put_events(prof, "shop", "judy", &dead, 1, &applied, rej, &n_rej, NULL),
                 AFF_OK);
    cr_assert_eq(n_rej, 1);

    /* A user whose every item was deleted falls back to popularity. */
    profiles_event only = ev(2, 6, PROFILES_EVENT_VIEW, T0);
    put("ken", &only, 1);
    const char *toy[] = {"toys-6"};
    cr_assert_eq(store_delete_items(store, "shop", toy, 1, NULL, NULL), AFF_OK);
    profiles_plan plan;
    cr_assert_eq(profiles_plan_recommend(prof, "shop", "ken", NULL, 0, NULL, &plan, NULL), AFF_OK);
    cr_assert_eq(plan.source, PROFILES_SOURCE_POPULARITY);
    profiles_plan_release(&plan);
}

Test(profiles, reupserted_item_vector_updates_profiles)
{
    profiles_event e = ev(2, 0, PROFILES_EVENT_PURCHASE, T0);
    put("liz", &e, 1);
    float v[DIM];
    user_vector("liz", v);
    cr_assert_eq(leaning(v), 2);
    /* toys-0 is re-upserted as a book-like vector. */
    float nv[DIM] = {0, 2, 0, 0, 0, 0, 0, 0};
    aff_item it = {.id = "toys-0", .vector = nv, .dim = DIM, .attrs.category = "toys"};
    cr_assert_eq(store_put_items(store, "shop", &it, 1, NULL), AFF_OK);
    user_vector("liz", v);
    cr_assert_float_eq(v[1], 1.0f, 1e-6);
}

Test(profiles, get_user_reports_counts_activity_and_top_categories)
{
    profiles_event e[] = {ev(0, 1, PROFILES_EVENT_VIEW, T0 - 5 * DAY_MS),
                          ev(0, 1, PROFILES_EVENT_PURCHASE, T0 - 4 * DAY_MS),
                          ev(1, 2, PROFILES_EVENT_VIEW, T0 - 2 * DAY_MS),
                          ev(1, 3, PROFILES_EVENT_VIEW, T0 - 2 * DAY_MS),
                          ev(1, 5, PROFILES_EVENT_VIEW, T0 - 2 * DAY_MS),
                          ev(2, 4, PROFILES_EVENT_CLICK, T0 - DAY_MS)};
    /* Decayed weights now: shoes 1·2^(-5/14) + 8·2^(-4/14) ≈ 7.3, books 3·2^(-2/14) ≈ 2.7,
     * toys 2·2^(-1/14) ≈ 1.9. */
    put("mia", e, 6);
    profiles_user_info info;
    aff_err err = {0};
    cr_assert_eq(profiles_get_user(prof, "shop", "mia", &info, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(info.last_event_ms, T0 - DAY_MS);
    cr_assert_eq(info.history_length, 6);
    uint64_t views = 0, buys = 0, clicks = 0;
    for (uint32_t i = 0; i < info.n_counts; i++) {
        if (!strcmp(info.counts[i].type, "view")) views = info.counts[i].count;
        if (!strcmp(info.counts[i].type, "purchase")) buys = info.counts[i].count;
        if (!strcmp(info.counts[i].type, "click")) clicks = info.counts[i].count;
    }
    cr_assert_eq(views, 4);
    cr_assert_eq(buys, 1);
    cr_assert_eq(clicks, 1);
    cr_assert_eq(info.n_top_categories, 3);
    cr_assert_str_eq(info.top_categories[0].category, "shoes");
    cr_assert_str_eq(info.top_categories[1].category, "books");
    cr_assert_str_eq(info.top_categories[2].category, "toys");
    float total = 0;
    for (uint32_t i = 0; i < 3; i++)
        total += info.top_categories[i].weight;
    cr_assert_float_eq(total, 1.0f, 1e-5);
    cr_assert_eq(profiles_get_user(prof, "shop", "nobody", &info, &err), AFF_ENOTFOUND);
}

Test(profiles, custom_event_types_carry_their_configured_weights)
{
    close_all();
    profiles_custom_type custom[] = {{"wishlist", 50.0f}, {"impression", 0.0f}};
    profiles_config pc;
    profiles_config_init(&pc);
    pc.custom_types = custom;
    pc.n_custom_types = 2;
    pc.now_ms = test_clock;
    pc.now_ctx = &clock_ms;
    open_all(&pc);
    profiles_event e[] = {
        ev(0, 1, PROFILES_EVENT_PURCHASE, T0),
        {.item_id = "books-1",
         .type = PROFILES_EVENT_CUSTOM,
         .custom_type = "wishlist",
         .timestamp_ms = T0},
        {.item_id = "toys-1",
         .type = PROFILES_EVENT_CUSTOM,
         .custom_type = "impression",
         .timestamp_ms = T0},
    };
    put("nina", e, 3);
    float v[DIM];
    user_vector("nina", v);
    cr_assert_eq(leaning(v), 1, "the wishlist (50) outweighs the purchase (8)");
    cr_assert_float_eq(v[2], 0.0f, 1e-7, "a zero-weight type adds nothing");
    const char *excl[] = {"wishlist"};
    profiles_plan plan;
    cr_assert_eq(profiles_plan_recommend(prof, "shop", "nina", excl, 1, NULL, &plan, NULL), AFF_OK);
    cr_assert_eq(plan.n_excluded, 1);
    cr_assert_str_eq(plan.filter.exclude_ids[0], "books-1");
    profiles_plan_release(&plan);

    profiles_custom_type clash[] = {{"view", 1.0f}};
    pc.custom_types = clash;
    pc.n_custom_types = 1;
    aff_profiles *bad = NULL;
    cr_assert_eq(profiles_create(&bad, store, &pc, NULL), AFF_EINVAL);
    profiles_custom_type neg[] = {{"meh", -1.0f}};
    pc.custom_types = neg;
    cr_assert_eq(profiles_create(&bad, store, &pc, NULL), AFF_EINVAL);
}

Test(profiles, request_exclusions_and_user_exclusions_combine)
{
    profiles_event e[] = {ev(0, 1, PROFILES_EVENT_PURCHASE, T0), ev(0, 2, PROFILES_EVENT_VIEW, T0)};
    put("oscar", e, 2);
    const char *req_ex[] = {"shoes-7"};
    const char *cat_only[] = {"shoes"};
    aff_filter f = {.categories = cat_only,
                    .n_categories = 1,
                    .price_min = 1.0f,
                    .price_max = INFINITY,
                    .exclude_ids = req_ex,
                    .n_exclude_ids = 1};
    const char *excl[] = {"purchase", "view"};
    profiles_plan plan;
    cr_assert_eq(profiles_plan_recommend(prof, "shop", "oscar", excl, 2, &f, &plan, NULL), AFF_OK);
    cr_assert_eq(plan.filter.n_exclude_ids, 3);
    cr_assert_str_eq(plan.filter.exclude_ids[0], "shoes-7");
    cr_assert_eq(plan.filter.n_categories, 1);
    cr_assert_eq(plan.filter.price_min, 1.0f);
    profiles_plan_release(&plan);
}

Test(profiles, works_without_a_data_dir)
{
    close_all();
    aff_err err = {0};
    store_config sc = {0};
    cr_assert_eq(store_create(&store, &sc, &err), AFF_OK, "%s", err.msg);
    profiles_config pc;
    profiles_config_init(&pc);
    pc.now_ms = test_clock;
    pc.now_ctx = &clock_ms;
    cr_assert_eq(profiles_create(&prof, store, &pc, &err), AFF_OK);
    load_catalog(false);
    profiles_event e[] = {ev(1, 1, PROFILES_EVENT_PURCHASE, T0)};
    put("pat", e, 1);
    float v[DIM];
    user_vector("pat", v);
    cr_assert_eq(leaning(v), 1);
}

/* ---- crash safety ---------------------------------------------------------------------------- */

#define CRASH_BATCH 10

/* The child: forever, upserts a batch of CRASH_BATCH items, then puts 5 events on them for
 * one of 5 users, acknowledging each committed write on the pipe ("I <n>" / "E <n>"). */
static void crash_child(int fd, int start)
{
    aff_store *s = NULL;
    aff_profiles *p = NULL;
    store_config sc = {.dir = dir};
    if (store_create(&s, &sc, NULL) || profiles_create(&p, s, NULL, NULL)) _exit(3);
    for (int n = start;; n++) {
        char ids[CRASH_BATCH][32];
        float vecs[CRASH_BATCH][DIM];
        aff_item items[CRASH_BATCH];
        for (int j = 0; j < CRASH_BATCH; j++) {
            snprintf(ids[j], sizeof ids[j], "k-%d-%d", n, j);
            item_vec(j % 3, n, vecs[j]);
            items[j] = (aff_item){.id = ids[j], .vector = vecs[j], .dim = DIM};
        }
        if (store_put_items(s, "shop", items, CRASH_BATCH, NULL)) _exit(4);
        char line[32];
        int len = snprintf(line, sizeof line, "I %d\n", n);
        if (write(fd, line, (size_t)len) != len) _exit(5);
        profiles_event ev5[5];
        for (int j = 0; j < 5; j++)
            ev5[j] = (profiles_event){.item_id = ids[j], .type = PROFILES_EVENT_VIEW};
        char user[16];
        snprintf(user, sizeof user, "u%d", n % 5);
        uint32_t applied = 0;
        if (profiles_put_events(p, "shop", user, ev5, 5, &applied, NULL, NULL, NULL) ||
            applied != 5)
            _exit(6);
        len = snprintf(line, sizeof line, "E %d\n", n);
        if (write(fd, line, (size_t)len) != len) _exit(7);
    }
}

static uint64_t user_views(const char *user)
{
    profiles_user_info info;
    if (profiles_get_user(prof, "shop", user, &info, NULL) != AFF_OK) return 0;
    for (uint32_t i = 0; i < info.n_counts; i++)
        if (!strcmp(info.counts[i].type, "view")) return info.counts[i].count;
    return 0;
}

/* Ten times: a writer process is killed with SIGKILL mid-stream; the store reopens cleanly
 * with every acknowledged write, and no batch is half there. */
Test(profiles, acknowledged_writes_survive_sigkill, .timeout = 120)
{
    int next = 0; /* first batch number of the next round */
    uint64_t acked_ev[5] = {0};
    srand(12345);
    for (int round = 0; round < 10; round++) {
        close_all();
        int fds[2];
        cr_assert_eq(pipe(fds), 0);
        pid_t pid = fork();
        cr_assert_neq(pid, -1);
        if (pid == 0) {
            close(fds[0]);
            crash_child(fds[1], next);
        }
        close(fds[1]);
        usleep((useconds_t)(20000 + rand() % 80000));
        kill(pid, SIGKILL);
        int wst;
        waitpid(pid, &wst, 0);
        cr_assert(WIFSIGNALED(wst), "the writer died on its own (status %d)", wst);
        FILE *f = fdopen(fds[0], "r");
        char kind;
        int n, last_items = next - 1;
        while (fscanf(f, " %c %d", &kind, &n) == 2) {
            if (kind == 'I')
                last_items = n;
            else
                acked_ev[n % 5] += 5;
        }
        fclose(f);

        open_all(NULL);
        /* Every acknowledged batch is there in full, with its vectors. */
        for (int b = next; b <= last_items; b++) {
            for (int j = 0; j < CRASH_BATCH; j++) {
                char id[32];
                float v[DIM], want[DIM];
                snprintf(id, sizeof id, "k-%d-%d", b, j);
                cr_assert_eq(store_get_item(store, "shop", id, NULL, v, NULL), AFF_OK,
                             "round %d: acknowledged %s is missing", round, id);
                item_vec(j % 3, b, want);
                cr_assert_arr_eq(v, want, sizeof v);
            }
        }
        /* The batch in flight is all there or not at all. */
        int in_flight = 0;
        for (int j = 0; j < CRASH_BATCH; j++) {
            char id[32];
            snprintf(id, sizeof id, "k-%d-%d", last_items + 1, j);
            in_flight += store_get_item(store, "shop", id, NULL, NULL, NULL) == AFF_OK;
        }
        cr_assert(in_flight == 0 || in_flight == CRASH_BATCH, "round %d: half a batch (%d)", round,
                  in_flight);
        /* Acknowledged events are there; at most the one unacknowledged call beyond. */
        uint64_t total_acked = 0, total_seen = 0;
        for (int u = 0; u < 5; u++) {
            char user[16];
            snprintf(user, sizeof user, "u%d", u);
            uint64_t seen = user_views(user);
            cr_assert_geq(seen, acked_ev[u], "round %d: %s lost events", round, user);
            cr_assert_eq(seen % 5, 0, "round %d: %s has a partial call", round, user);
            total_acked += acked_ev[u];
            total_seen += seen;
            acked_ev[u] = seen; /* a committed but unacknowledged call counts from now on */
        }
        cr_assert_leq(total_seen, total_acked + 5);
        next = last_items + 1 + (in_flight ? 1 : 0);
    }
    cr_log_info("%d batches written across 10 kills", next);
    cr_assert_gt(next, 10, "the writer made progress (%d batches)", next);
}

/* ---- restart through the engine ------------------------------------------------------------- */

static int rebuild_collection(void *ctx, const store_collection *c, aff_err *err)
{
    engine_collection_spec spec = {.name = c->name,
                                   .dim = c->dim,
                                   .metric = c->metric,
                                   .index = c->index,
                                   .hnsw_m = c->hnsw_m,
                                   .hnsw_ef_search = c->hnsw_ef_search};
    return engine_create_collection(ctx, &spec, err);
}

static int rebuild_items(void *ctx, const store_collection *c, const aff_item *items, size_t n,
                         aff_err *err)
{
    return engine_upsert(ctx, c->name, items, n, err);
}

/* Recommend for `user` the way the server will: plan, then search or popularity. */
static uint32_t recommend(const char *user, aff_hit *hits, profiles_source *source)
{
    const char *excl[] = {"purchase"};
    profiles_plan plan;
    aff_err err = {0};
    cr_assert_eq(profiles_plan_recommend(prof, "shop", user, excl, 1, NULL, &plan, &err), AFF_OK,
                 "%s", err.msg);
    uint32_t n = 0;
    *source = plan.source;
    if (plan.source == PROFILES_SOURCE_PROFILE) {
        aff_query q = {.vector = plan.vector, .dim = plan.dim, .k = 8, .filter = &plan.filter};
        cr_assert_eq(engine_search(engine, NULL, "shop", &q, 1, hits, &n, &err), AFF_OK, "%s", err.msg);
    } else {
        cr_assert_eq(profiles_popular(prof, "shop", 8, &plan.filter, hits, &n, &err), AFF_OK);
    }
    profiles_plan_release(&plan);
    return n;
}

/* The server's restart: a new engine rebuilt from the store gives identical answers. */
Test(profiles, restart_rebuilds_the_engine_with_identical_answers)
{
    aff_err err = {0};
    engine_config ec = {.backend = ENGINE_BACKEND_CPU, .faiss = {.threads = 1}};
    cr_assert_eq(engine_create(&engine, &ec, &err), AFF_OK, "%s", err.msg);
    store_rebuild_ops ops = {
        .collection = rebuild_collection, .items = rebuild_items, .ctx = engine, .batch_size = 7};
    cr_assert_eq(store_rebuild(store, &ops, NULL, &err), AFF_OK, "%s", err.msg);
    profiles_event e[] = {ev(1, 1, PROFILES_EVENT_PURCHASE, T0 - DAY_MS),
                          ev(1, 4, PROFILES_EVENT_VIEW, T0), ev(2, 2, PROFILES_EVENT_CLICK, T0)};
    put("quinn", e, 3);
    aff_hit before[2][8], after[2][8];
    uint32_t nb[2], na[2];
    profiles_source sb[2], sa[2];
    const char *users[2] = {"quinn", "stranger"};
    for (int i = 0; i < 2; i++)
        nb[i] = recommend(users[i], before[i], &sb[i]);
    cr_assert_eq(sb[0], PROFILES_SOURCE_PROFILE);
    cr_assert_eq(sb[1], PROFILES_SOURCE_POPULARITY);
    cr_assert_eq(nb[0], 8);
    for (uint32_t i = 0; i < nb[0]; i++)
        cr_assert_str_neq(before[0][i].id, "books-1", "purchased");

    engine_destroy(engine);
    close_all();
    open_all(NULL);
    cr_assert_eq(engine_create(&engine, &ec, &err), AFF_OK, "%s", err.msg);
    ops.ctx = engine;
    store_rebuild_progress pr;
    cr_assert_eq(store_rebuild(store, &ops, &pr, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(pr.items, 3 * PER_CAT);
    for (int i = 0; i < 2; i++) {
        na[i] = recommend(users[i], after[i], &sa[i]);
        cr_assert_eq(sa[i], sb[i]);
        cr_assert_eq(na[i], nb[i]);
        for (uint32_t j = 0; j < na[i]; j++) {
            cr_assert_str_eq(after[i][j].id, before[i][j].id, "user %s hit %u", users[i], j);
            cr_assert_eq(after[i][j].score, before[i][j].score);
        }
    }
}

/* ImportEvents' bulk path: events of several users interleaved in one call give each user
 * exactly the profile that profiles_put_events gives for that user's events in the same
 * order; bad events (a bad user id included) are rejected with their call index. */
Test(profiles, import_matches_put_events_and_rejects_one_by_one)
{
    profiles_event a[3] = {ev(0, 1, PROFILES_EVENT_VIEW, T0 - 5 * DAY_MS),
                           ev(0, 2, PROFILES_EVENT_PURCHASE, T0 - 2 * DAY_MS),
                           ev(1, 3, PROFILES_EVENT_CLICK, T0 - DAY_MS)};
    profiles_event b[2] = {ev(2, 4, PROFILES_EVENT_ADD_TO_CART, T0 - 3 * DAY_MS),
                           ev(2, 5, PROFILES_EVENT_VIEW, 0)};
    profiles_event unknown = {.item_id = "nope", .type = PROFILES_EVENT_VIEW};
    profiles_event nan_value = ev(1, 1, PROFILES_EVENT_VIEW, T0);
    nan_value.value = NAN;
    profiles_user_event im[] = {
        {"ann", a[0]},      {"ann", a[1]}, {"bob", b[0]}, {"", a[2]},    {"ann", unknown},
        {"bob", nan_value}, {"ann", a[2]}, {NULL, b[1]},  {"bob", b[1]},
    };
    size_t n = sizeof im / sizeof im[0];
    profiles_rejection rej[16];
    uint32_t applied = 0, n_rej = 0;
    aff_err err = {0};
    cr_assert_eq(profiles_import_events(prof, "shop", im, n, &applied, rej, &n_rej, &err), AFF_OK,
                 "%s", err.msg);
    cr_assert_eq(applied, 5);
    cr_assert_eq(n_rej, 4);
    const uint32_t want_index[4] = {3, 4, 5, 7};
    const char *want_reason[4] = {"user id", "unknown item id 'nope'", "finite", "user id"};
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(rej[i].index, want_index[i], "rejection %d at %u", i, rej[i].index);
        cr_assert(strstr(rej[i].reason, want_reason[i]), "%s", rej[i].reason);
    }
    put("ann2", a, 3);
    put("bob2", b, 2);
    float va[DIM], vb[DIM], wa[DIM], wb[DIM];
    user_vector("ann", va);
    user_vector("ann2", wa);
    user_vector("bob", vb);
    user_vector("bob2", wb);
    cr_assert_arr_eq(va, wa, sizeof va, "imported and put profiles of ann differ");
    cr_assert_arr_eq(vb, wb, sizeof vb, "imported and put profiles of bob differ");
    profiles_user_info info;
    cr_assert_eq(profiles_get_user(prof, "shop", "ann", &info, &err), AFF_OK);
    cr_assert_eq(info.history_length, 3);

    /* Per-call errors apply nothing. */
    profiles_user_event one[] = {{"carl", a[0]}};
    cr_assert_eq(profiles_import_events(prof, "nowhere", one, 1, &applied, rej, &n_rej, &err),
                 AFF_ENOTFOUND);
    cr_assert(strstr(err.msg, "nowhere"), "%s", err.msg);
    cr_assert_eq(profiles_import_events(prof, "shop", one, 0, &applied, rej, &n_rej, &err),
                 AFF_EINVAL);
    cr_assert_eq(profiles_import_events(prof, "shop", one, PROFILES_MAX_IMPORT_EVENTS + 1, &applied,
                                        rej, &n_rej, &err),
                 AFF_EINVAL);
    cr_assert_eq(profiles_get_user(prof, "shop", "carl", &info, &err), AFF_ENOTFOUND);
}

/* ---- recent items (reasons' history, cached per shopper) ---------------------------------- */

/* What profiles_recent_items must answer, from the stored history: the distinct items of the
 * newest PROFILES_RECENT_EVENTS events, newest first, at most PROFILES_RECENT_ITEMS. */
typedef struct all_items {
    int n;
    char ids[600][32];
} all_items;

static int collect_items(void *ctx, uint64_t seq, const store_event *e)
{
    all_items *a = ctx;
    if (a->n < 600) snprintf(a->ids[a->n++], sizeof a->ids[0], "%s", e->item_id);
    return 0;
}

static void expect_recent(const char *user, const char *const *want, uint32_t n_want)
{
    char got[PROFILES_RECENT_ITEMS][AFF_MAX_ID_LEN + 1];
    uint32_t n = 99;
    aff_err err = {0};
    for (int round = 0; round < 2; round++) { /* the store's answer, then the cached one */
        cr_assert_eq(profiles_recent_items(prof, "shop", user, got, &n, &err), AFF_OK, "%s",
                     err.msg);
        cr_assert_eq(n, n_want, "round %d: %u items, want %u", round, n, n_want);
        for (uint32_t i = 0; i < n; i++)
            cr_assert_str_eq(got[i], want[i], "round %d item %u", round, i);
    }
}

static void expect_recent_is_history(const char *user)
{
    static all_items a;
    a.n = 0;
    cr_assert_eq(profiles_history(prof, "shop", user, collect_items, &a, NULL), AFF_OK);
    const char *want[PROFILES_RECENT_ITEMS];
    uint32_t m = 0;
    for (int i = a.n - 1; i >= 0 && i >= a.n - PROFILES_RECENT_EVENTS && m < PROFILES_RECENT_ITEMS;
         i--) {
        bool dup = false;
        for (uint32_t t = 0; t < m && !dup; t++)
            dup = strcmp(want[t], a.ids[i]) == 0;
        if (!dup) want[m++] = a.ids[i];
    }
    expect_recent(user, want, m);
}

Test(profiles, recent_items_are_the_newest_distinct_and_follow_every_write)
{
    profiles_event e[] = {ev(0, 1, PROFILES_EVENT_VIEW, T0 - 10 * DAY_MS),
                          ev(1, 2, PROFILES_EVENT_VIEW, T0 - 9 * DAY_MS),
                          ev(0, 1, PROFILES_EVENT_CLICK, T0 - 8 * DAY_MS),
                          ev(2, 3, PROFILES_EVENT_VIEW, T0 - 7 * DAY_MS)};
    put("rita", e, 4);
    expect_recent("rita", (const char *[]){"toys-3", "shoes-1", "books-2"}, 3);
    expect_recent("nobody", NULL, 0);

    profiles_event more = ev(1, 2, PROFILES_EVENT_VIEW, T0 - 2 * DAY_MS);
    put("rita", &more, 1); /* a put forgets the cached answer */
    expect_recent("rita", (const char *[]){"books-2", "toys-3", "shoes-1"}, 3);

    profiles_user_event im = {.user_id = "rita", .event = ev(2, 0, PROFILES_EVENT_VIEW, T0)};
    uint32_t applied = 0, n_rej = 0;
    profiles_rejection rej[1];
    aff_err err = {0};
    cr_assert_eq(profiles_import_events(prof, "shop", &im, 1, &applied, rej, &n_rej, &err), AFF_OK,
                 "%s", err.msg);
    cr_assert_eq(applied, 1);
    expect_recent("rita", (const char *[]){"toys-0", "books-2", "toys-3", "shoes-1"}, 4);

    /* retention: events before the cutoff go, and with them the cached answer */
    uint64_t n_users = 0, n_events = 0;
    cr_assert_eq(profiles_expire(prof, T0 - 5 * DAY_MS, &n_users, &n_events, &err), AFF_OK, "%s",
                 err.msg);
    cr_assert_eq(n_events, 4);
    expect_recent("rita", (const char *[]){"toys-0", "books-2"}, 2);

    bool existed = false;
    cr_assert_eq(profiles_delete_user(prof, "shop", "rita", &existed, &err), AFF_OK, "%s", err.msg);
    cr_assert(existed);
    expect_recent("rita", NULL, 0);
    profiles_event again = ev(0, 5, PROFILES_EVENT_VIEW, T0);
    put("rita", &again, 1);
    expect_recent("rita", (const char *[]){"shoes-5"}, 1);

    bool erased = false;
    cr_assert_eq(profiles_set_opt_out(prof, NULL, "rita", true, &erased, &err), AFF_OK, "%s",
                 err.msg);
    cr_assert(erased);
    expect_recent("rita", NULL, 0);
    cr_assert_eq(profiles_set_opt_out(prof, NULL, "rita", false, &erased, &err), AFF_OK, "%s",
                 err.msg);

    /* more events than the window: only the newest PROFILES_RECENT_EVENTS count */
    profiles_event old[2] = {ev(0, 7, PROFILES_EVENT_VIEW, T0 - 3 * DAY_MS),
                             ev(0, 8, PROFILES_EVENT_VIEW, T0 - 3 * DAY_MS)};
    put("sara", old, 2);
    expect_recent("sara", (const char *[]){"shoes-8", "shoes-7"}, 2);
    for (int i = 0; i < PROFILES_RECENT_EVENTS; i++) { /* each put advances the cached answer */
        profiles_event x = ev(1 + i % 2, i % 5, PROFILES_EVENT_VIEW, T0 - 2 * DAY_MS + i);
        put("sara", &x, 1);
        if (i == PROFILES_RECENT_EVENTS - 2) /* shoes-7 left the window, shoes-8 not yet */
            expect_recent("sara",
                          (const char *[]){"books-1", "toys-0", "books-4", "toys-3", "books-2",
                                           "toys-1", "books-0", "toys-4", "books-3", "toys-2",
                                           "shoes-8"},
                          11);
    }
    expect_recent("sara", (const char *[]){"toys-2", "books-1", "toys-0", "books-4", "toys-3",
                                           "books-2", "toys-1", "books-0", "toys-4", "books-3"},
                  10);
    expect_recent_is_history("sara");
}

typedef struct writer_arg {
    const char *user;
    int n;
} writer_arg;

static void *writer_main(void *arg)
{
    writer_arg *w = arg;
    for (int i = 0; i < w->n; i++) {
        profiles_event x = ev(i % 3, (i * 7) % PER_CAT, PROFILES_EVENT_VIEW, T0 + i);
        aff_err err = {0};
        uint32_t applied = 0, n_rej = 0;
        profiles_rejection rej[1];
        if (profiles_put_events(prof, "shop", w->user, &x, 1, &applied, rej, &n_rej, &err) ||
            applied != 1)
            return (void *)1;
    }
    return NULL;
}

/* Reads racing writes never leave an answer older than the committed history cached. */
Test(profiles, recent_items_stay_current_under_concurrent_writes)
{
    for (int run = 0; run < 5; run++) {
        writer_arg w = {.user = "tom", .n = 150};
        pthread_t t;
        cr_assert_eq(pthread_create(&t, NULL, writer_main, &w), 0);
        char got[PROFILES_RECENT_ITEMS][AFF_MAX_ID_LEN + 1];
        uint32_t n;
        aff_err err = {0};
        for (int i = 0; i < 300; i++)
            cr_assert_eq(profiles_recent_items(prof, "shop", "tom", got, &n, &err), AFF_OK);
        void *rc;
        pthread_join(t, &rc);
        cr_assert_null(rc);
        expect_recent_is_history("tom");
    }
}

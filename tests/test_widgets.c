/*
 * test_widgets.c: the widget statistics on their own (widgets.c). The central property:
 * maintaining them incrementally — users' events interleaved, windows overflowing, users
 * forgotten (DeleteUser), events expired — gives exactly the answers of a rebuild that replays
 * only what the stored histories hold at the end. Also the neighbour cap and bad settings.
 */
#include <criterion/criterion.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "widgets.h"

#define N_USERS  60
#define N_ITEMS  30
#define N_EVENTS 3000
#define WINDOW   16
#define NOW      1800000000000LL /* a fixed clock */
#define DAY      86400000LL

static int64_t fixed_now(void *ctx)
{
    return ctx ? *(const int64_t *)ctx : NOW;
}

typedef struct hist_event {
    uint64_t seq;
    char item[8], type[12], ctx_key[16], ctx_val[8];
    int64_t ts;
    bool alive;
} hist_event;

typedef struct history {
    hist_event ev[N_EVENTS];
    uint32_t n;
    uint64_t next_seq;
} history;

static history hist[N_USERS];
static char user_ids[N_USERS][8];

static store_event as_store(const hist_event *h, store_kv *kv)
{
    store_event e = {.item_id = h->item, .type = h->type, .ts_ms = h->ts};
    if (h->ctx_key[0]) {
        kv->key = h->ctx_key;
        kv->value = h->ctx_val;
        e.context = kv;
        e.n_context = 1;
    }
    return e;
}

static aff_widgets *make(uint32_t max_neighbours)
{
    widgets_config cfg;
    widgets_config_init(&cfg);
    cfg.user_events = WINDOW;
    cfg.max_neighbours = max_neighbours;
    cfg.min_support = 1;
    cfg.trend_min_events = 1;
    cfg.now_ms = fixed_now;
    aff_widgets *w = NULL;
    aff_err err;
    cr_assert_eq(widgets_create(&w, &cfg, &err), 0, "%s", err.msg);
    return w;
}

/* Every answer of every recipe as text. */
static char *answers(aff_widgets *w)
{
    size_t cap = 1 << 20, len = 0;
    char *out = malloc(cap);
    out[0] = 0;
    aff_err err;
    for (int r = 1; r < WIDGETS_RECIPE_COUNT; r++) {
        int n_ctx = widgets_recipe_needs_items(r) ? N_ITEMS + 1 : 1;
        int n_users = widgets_recipe_needs_user(r) ? N_USERS : 1;
        for (int c = 0; c < n_ctx; c++) {
            for (int u = 0; u < n_users; u++) {
                char item[8], item2[8];
                snprintf(item, sizeof item, "i%d", c % N_ITEMS);
                snprintf(item2, sizeof item2, "i%d", (c * 7 + 3) % N_ITEMS);
                const char *ctx[2] = {item, item2};
                widgets_request q = {.recipe = r, .collection = "c"};
                if (widgets_recipe_needs_items(r)) {
                    q.item_ids = ctx;
                    q.n_item_ids = c == N_ITEMS ? 2 : 1; /* the last one: a cart */
                }
                if (widgets_recipe_needs_user(r)) q.user_id = user_ids[u];
                widgets_result res;
                cr_assert_eq(widgets_candidates(w, &q, 1000, &res, &err), 0, "%s", err.msg);
                len += (size_t)snprintf(out + len, cap - len, "\n%d/%d/%d:", r, c, u);
                for (uint32_t h = 0; h < res.n; h++)
                    len += (size_t)snprintf(out + len, cap - len, " %s=%.6g<%s", res.hits[h].id,
                                            (double)res.hits[h].score,
                                            res.hits[h].related ? res.hits[h].related : "");
                widgets_result_release(&res);
                cr_assert_lt(len, cap - 256);
            }
        }
    }
    return out;
}

static void apply_one(aff_widgets *w, int u, const hist_event *h)
{
    store_kv kv;
    store_event e = as_store(h, &kv);
    aff_err err;
    cr_assert_eq(widgets_apply(w, "c", user_ids[u], &e, &h->seq, 1, &err), 0, "%s", err.msg);
}

Test(widgets, incremental_equals_rebuild_from_the_histories)
{
    uint64_t seed = 0x5eed;
    cr_log_info("seed %llu", (unsigned long long)seed);
    memset(hist, 0, sizeof hist);
    for (int u = 0; u < N_USERS; u++)
        snprintf(user_ids[u], sizeof user_ids[u], "u%d", u);
    aff_widgets *inc = make(1000);
    static const char *const types[] = {"view", "click", "add_to_cart", "purchase", "purchase"};
    int64_t expire_at = NOW - 50 * DAY;
    for (int i = 0; i < N_EVENTS; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t r = seed >> 11;
        int u = (int)(r % N_USERS);
        history *hu = &hist[u];
        hist_event *h = &hu->ev[hu->n++];
        h->seq = hu->next_seq++;
        h->alive = true;
        /* Skewed items, so some pairs repeat. */
        int item = (int)((r >> 8) % N_ITEMS);
        if ((r >> 20) % 3 == 0) item %= 5;
        snprintf(h->item, sizeof h->item, "i%d", item);
        snprintf(h->type, sizeof h->type, "%s", types[(r >> 30) % 5]);
        h->ts = NOW - (int64_t)((r >> 34) % (90 * 24)) * 3600000LL;
        switch ((r >> 45) % 3) {
        case 0:
            snprintf(h->ctx_key, sizeof h->ctx_key, "session_id");
            snprintf(h->ctx_val, sizeof h->ctx_val, "s%d", (int)((r >> 48) % 4));
            break;
        case 1:
            snprintf(h->ctx_key, sizeof h->ctx_key, "order_id");
            snprintf(h->ctx_val, sizeof h->ctx_val, "o%d", (int)((r >> 48) % 3));
            break;
        default:
            break;
        }
        apply_one(inc, u, h);
        /* Mirror the stored history: its window of the last WINDOW events. */
        uint32_t alive = 0;
        for (uint32_t j = hu->n; j-- > 0;)
            if (hu->ev[j].alive && ++alive > WINDOW) hu->ev[j].alive = false;
        if (i % 500 == 499) { /* DeleteUser now and then */
            int victim = (int)((r >> 50) % N_USERS);
            widgets_forget_user(inc, "c", user_ids[victim]);
            for (uint32_t j = 0; j < hist[victim].n; j++)
                hist[victim].ev[j].alive = false;
        }
    }
    /* Retention: every event older than 50 days goes. */
    widgets_expire(inc, expire_at);
    for (int u = 0; u < N_USERS; u++)
        for (uint32_t j = 0; j < hist[u].n; j++)
            if (hist[u].ev[j].ts < expire_at) hist[u].ev[j].alive = false;

    aff_widgets *reb = make(1000);
    for (int u = 0; u < N_USERS; u++)
        for (uint32_t j = 0; j < hist[u].n; j++)
            if (hist[u].ev[j].alive) apply_one(reb, u, &hist[u].ev[j]);
    widgets_stats si, sr;
    widgets_get_stats(inc, &si);
    widgets_get_stats(reb, &sr);
    cr_assert_eq(si.events_held, sr.events_held);
    cr_assert_eq(si.neighbours, sr.neighbours);
    cr_assert_gt(si.neighbours, 100, "too few pairs to be a test: %llu",
                 (unsigned long long)si.neighbours);
    char *a = answers(inc), *b = answers(reb);
    cr_assert(strlen(a) > 5000, "answers too short to be a test");
    if (strcmp(a, b) != 0) {
        size_t k = 0;
        while (a[k] == b[k])
            k++;
        size_t from = k > 200 ? k - 200 : 0;
        cr_assert_fail("incremental and rebuilt answers differ at %zu:\n%.400s\n---\n%.400s", k,
                       a + from, b + from);
    }
    free(a);
    free(b);
    widgets_destroy(inc);
    widgets_destroy(reb);
}

Test(widgets, neighbour_lists_are_capped)
{
    aff_widgets *w = make(3);
    /* One basket of 10 items bought together, twice (two users): every item has 9
     * co-occurring items, but keeps 3. */
    for (int u = 0; u < 2; u++) {
        for (int i = 0; i < 10; i++) {
            hist_event h = {.seq = (uint64_t)i, .ts = NOW - DAY};
            snprintf(h.item, sizeof h.item, "i%d", i);
            snprintf(h.type, sizeof h.type, "purchase");
            snprintf(h.ctx_key, sizeof h.ctx_key, "order_id");
            snprintf(h.ctx_val, sizeof h.ctx_val, "o");
            snprintf(user_ids[u], sizeof user_ids[u], "u%d", u);
            apply_one(w, u, &h);
        }
    }
    widgets_stats st;
    widgets_get_stats(w, &st);
    cr_assert_leq(st.neighbours, 3ull * 10 * 3, "%llu", (unsigned long long)st.neighbours);
    const char *ctx[1] = {"i0"};
    widgets_request q = {.recipe = WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER,
                         .collection = "c",
                         .item_ids = ctx,
                         .n_item_ids = 1};
    widgets_result res;
    aff_err err;
    cr_assert_eq(widgets_candidates(w, &q, 100, &res, &err), 0);
    cr_assert_leq(res.n, 3);
    widgets_result_release(&res);
    widgets_destroy(w);
}

static const char *first_best_seller(aff_widgets *w, char *out)
{
    widgets_request q = {.recipe = WIDGETS_RECIPE_BEST_SELLERS, .collection = "c"};
    widgets_result res;
    aff_err err;
    cr_assert_eq(widgets_candidates(w, &q, 10, &res, &err), 0);
    snprintf(out, 16, "%s", res.n ? res.hits[0].id : "");
    widgets_result_release(&res);
    return out;
}

Test(widgets, rankings_are_kept_for_refresh_ms)
{
    int64_t clock = NOW;
    widgets_config cfg;
    widgets_config_init(&cfg);
    cfg.now_ms = fixed_now;
    cfg.now_ctx = &clock;
    cfg.refresh_ms = 1000;
    aff_widgets *w = NULL;
    aff_err err;
    cr_assert_eq(widgets_create(&w, &cfg, &err), 0);
    snprintf(user_ids[0], sizeof user_ids[0], "u0");
    snprintf(user_ids[1], sizeof user_ids[1], "u1");
    hist_event a = {.seq = 0, .ts = NOW}, b = {.seq = 0, .ts = NOW}, b2 = {.seq = 1, .ts = NOW};
    snprintf(a.item, sizeof a.item, "a");
    snprintf(b.item, sizeof b.item, "b");
    snprintf(b2.item, sizeof b2.item, "b");
    snprintf(a.type, sizeof a.type, "purchase");
    snprintf(b.type, sizeof b.type, "purchase");
    snprintf(b2.type, sizeof b2.type, "purchase");
    apply_one(w, 0, &a);
    char top[16];
    cr_assert_str_eq(first_best_seller(w, top), "a");
    apply_one(w, 1, &b);
    apply_one(w, 1, &b2); /* b now sells twice as much */
    clock += 999;
    cr_assert_str_eq(first_best_seller(w, top), "a", "ranked again before refresh_ms");
    clock += 1;
    cr_assert_str_eq(first_best_seller(w, top), "b");
    widgets_destroy(w);
}

Test(widgets, bad_settings_and_requests)
{
    widgets_config cfg;
    widgets_config_init(&cfg);
    cfg.trend_long_half_life_s = cfg.trend_short_half_life_s;
    aff_widgets *w = NULL;
    aff_err err;
    cr_assert_eq(widgets_create(&w, &cfg, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "long trend window"), "%s", err.msg);
    widgets_config_init(&cfg);
    cfg.session_key = "";
    cr_assert_eq(widgets_create(&w, &cfg, &err), AFF_EINVAL);
    widgets_request q = {.recipe = WIDGETS_RECIPE_ALSO_VIEWED, .collection = "c"};
    cr_assert_eq(widgets_validate(&q, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "item_ids"), "%s", err.msg);
    q.recipe = WIDGETS_RECIPE_RECENTLY_VIEWED;
    cr_assert_eq(widgets_validate(&q, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "user_id"), "%s", err.msg);
    q.recipe = (widgets_recipe)42;
    cr_assert_eq(widgets_validate(&q, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "recipe = 42"), "%s", err.msg);
    widgets_recipe r;
    cr_assert(widgets_recipe_parse("fbt", &r));
    cr_assert_eq(r, WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER);
    cr_assert(widgets_recipe_parse("buy_it_again", &r));
    cr_assert_eq(r, WIDGETS_RECIPE_BUY_IT_AGAIN);
    cr_assert_not(widgets_recipe_parse("nope", &r));
}

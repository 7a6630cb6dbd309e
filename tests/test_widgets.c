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

/* ---- the capped neighbour lists against a pair-by-pair reference ------------------------------
 * widgets.c queues the pair updates of a call and applies them list by list (with a position
 * index, and only the last of an item's capped inserts): the reference below applies every
 * pair at once, in event order, as the module did before. At the cap the state depends on the
 * order of updates on each list (a new neighbour replaces the last one seen once), so equal
 * answers at a small cap mean the same order. */

#define REF_ITEMS  150
#define REF_USERS  4
#define REF_WINDOW 120
#define REF_CAP    20 /* ≥ 16: the module's position index is used */
enum { REF_SESSION, REF_ORDER, REF_USER, REF_TABLES };
enum { REF_OTHER, REF_VIEW, REF_PURCHASE };

typedef struct ref_event {
    int item, kind;
    char basket[32];
} ref_event;

typedef struct ref_list {
    int item[REF_CAP];
    uint32_t count[REF_CAP];
    uint32_t n;
} ref_list;

typedef struct ref_state {
    ref_event win[REF_USERS][REF_WINDOW + 1];
    uint32_t n_win[REF_USERS];
    ref_list nb[REF_TABLES][REF_ITEMS];
    uint32_t baskets[REF_TABLES][REF_ITEMS];
    uint64_t n_baskets[REF_TABLES];
    uint64_t replaced, refused; /* new pairs at a full list: in place of one seen once, or not */
} ref_state;

static void ref_add_pair(ref_state *s, ref_list *l, int other, int sign)
{
    uint32_t i = 0;
    while (i < l->n && l->item[i] != other)
        i++;
    if (i < l->n) {
        if (sign > 0) {
            l->count[i]++;
        } else if (--l->count[i] == 0) {
            l->n--;
            l->item[i] = l->item[l->n];
            l->count[i] = l->count[l->n];
        }
        return;
    }
    if (sign < 0) return;
    if (l->n < REF_CAP) {
        l->item[l->n] = other;
        l->count[l->n++] = 1;
        return;
    }
    for (uint32_t k = l->n; k-- > 0;) {
        if (l->count[k] == 1) {
            l->item[k] = other;
            s->replaced++;
            return;
        }
    }
    s->refused++;
}

/* Event i of user u enters (+1) or leaves (-1) table t: its pairs with the other items of its
 * basket, each distinct item once, in window order, both directions. */
static void ref_cooc(ref_state *s, int u, uint32_t i, int t, int sign)
{
    const ref_event *e = &s->win[u][i];
    int kind = t == REF_SESSION ? REF_VIEW : REF_PURCHASE, others[REF_WINDOW];
    uint32_t n = 0;
    bool present = false, any = false;
    for (uint32_t j = 0; j < s->n_win[u]; j++) {
        const ref_event *o = &s->win[u][j];
        if (j == i || o->kind != kind || (t != REF_USER && strcmp(o->basket, e->basket) != 0))
            continue;
        any = true;
        if (o->item == e->item) {
            present = true;
            continue;
        }
        bool dup = false;
        for (uint32_t k = 0; k < n && !dup; k++)
            dup = others[k] == o->item;
        if (!dup) others[n++] = o->item;
    }
    if (present) return;
    s->baskets[t][e->item] += (uint32_t)sign;
    if (!any) s->n_baskets[t] += (uint64_t)(int64_t)sign;
    ref_list *l = &s->nb[t][e->item];
    /* Pairs the item's list holds first, then the new ones: the order of the module's pass. */
    bool done[REF_WINDOW] = {false};
    for (uint32_t k = 0; k < l->n;) {
        uint32_t j = 0;
        while (j < n && (others[j] != l->item[k] || done[j]))
            j++;
        if (j == n) {
            k++;
            continue;
        }
        done[j] = true;
        if (sign > 0)
            l->count[k++]++;
        else if (--l->count[k] > 0)
            k++;
        else {
            l->n--;
            l->item[k] = l->item[l->n];
            l->count[k] = l->count[l->n];
        }
    }
    for (uint32_t j = 0; j < n; j++) {
        if (sign > 0 && !done[j]) ref_add_pair(s, l, others[j], +1);
        ref_add_pair(s, &s->nb[t][others[j]], e->item, sign);
    }
}

static void ref_terms(ref_state *s, int u, uint32_t i, int sign)
{
    int kind = s->win[u][i].kind;
    if (kind == REF_VIEW) ref_cooc(s, u, i, REF_SESSION, sign);
    if (kind != REF_PURCHASE) return;
    ref_cooc(s, u, i, REF_ORDER, sign);
    ref_cooc(s, u, i, REF_USER, sign);
}

static void ref_remove(ref_state *s, int u, uint32_t i)
{
    ref_terms(s, u, i, -1);
    memmove(&s->win[u][i], &s->win[u][i + 1], (s->n_win[u] - i - 1) * sizeof s->win[u][0]);
    s->n_win[u]--;
}

static double ref_xlogx(double x)
{
    return x > 0 ? x * log(x) : 0.0;
}

/* Dunning's G², as widgets.h defines the score (Mahout's formulation). */
static double ref_llr(double k11, double k12, double k21, double k22)
{
    double row = ref_xlogx(k11 + k12 + k21 + k22) - ref_xlogx(k11 + k12) - ref_xlogx(k21 + k22);
    double col = ref_xlogx(k11 + k12 + k21 + k22) - ref_xlogx(k11 + k21) - ref_xlogx(k12 + k22);
    double mat = ref_xlogx(k11 + k12 + k21 + k22) - ref_xlogx(k11) - ref_xlogx(k12) -
                 ref_xlogx(k21) - ref_xlogx(k22);
    double g = 2.0 * (row + col - mat);
    return g > 0 ? g : 0.0;
}

typedef struct ref_hit {
    char id[8];
    double score;
} ref_hit;

static int ref_hit_cmp(const void *a, const void *b)
{
    const ref_hit *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return strcmp(x->id, y->id);
}

/* Every co-occurrence answer (each item as the context) of the module against the reference. */
static void ref_compare(aff_widgets *w, const ref_state *s, uint32_t min_support, const char *when)
{
    static const widgets_recipe recipes[REF_TABLES] = {
        [REF_SESSION] = WIDGETS_RECIPE_ALSO_VIEWED,
        [REF_ORDER] = WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER,
        [REF_USER] = WIDGETS_RECIPE_ALSO_BOUGHT};
    uint64_t entries = 0;
    for (int t = 0; t < REF_TABLES; t++) {
        double N = (double)s->n_baskets[t];
        for (int a = 0; a < REF_ITEMS; a++) {
            const ref_list *l = &s->nb[t][a];
            entries += l->n;
            ref_hit want[REF_CAP];
            uint32_t n = 0;
            for (uint32_t j = 0; j < l->n; j++) {
                if (l->count[j] < min_support) continue;
                double nab = l->count[j], na = s->baskets[t][a], nb = s->baskets[t][l->item[j]];
                if (nab * N <= na * nb) continue;
                double k22 = N - na - nb + nab;
                double g = ref_llr(nab, na - nab, nb - nab, k22 > 0 ? k22 : 0);
                if (!(g > 0)) continue;
                snprintf(want[n].id, sizeof want[n].id, "i%d", l->item[j]);
                want[n++].score = g;
            }
            qsort(want, n, sizeof *want, ref_hit_cmp);
            char ctx[8];
            snprintf(ctx, sizeof ctx, "i%d", a);
            const char *ids[1] = {ctx};
            widgets_request q = {
                .recipe = recipes[t], .collection = "c", .item_ids = ids, .n_item_ids = 1};
            widgets_result res;
            aff_err err;
            cr_assert_eq(widgets_candidates(w, &q, 1000, &res, &err), 0, "%s", err.msg);
            cr_assert_eq(res.n, n, "%s: table %d, item %s: %u hits, the reference %u", when, t, ctx,
                         res.n, n);
            for (uint32_t h = 0; h < n; h++) {
                cr_assert_str_eq(res.hits[h].id, want[h].id, "%s: table %d, item %s, hit %u", when,
                                 t, ctx, h);
                cr_assert_eq(res.hits[h].score, (float)want[h].score,
                             "%s: table %d, item %s, hit %u: %.9g vs %.9g", when, t, ctx, h,
                             (double)res.hits[h].score, want[h].score);
            }
            widgets_result_release(&res);
        }
    }
    widgets_stats st;
    widgets_get_stats(w, &st);
    cr_assert_eq(st.neighbours, entries, "%s: %llu neighbours, the reference %llu", when,
                 (unsigned long long)st.neighbours, (unsigned long long)entries);
}

Test(widgets, capped_lists_match_the_pair_by_pair_reference)
{
    static ref_state s;
    memset(&s, 0, sizeof s);
    for (int u = 0; u < REF_USERS; u++)
        snprintf(user_ids[u], sizeof user_ids[u], "u%d", u);
    widgets_config cfg;
    widgets_config_init(&cfg);
    cfg.user_events = REF_WINDOW;
    cfg.max_neighbours = REF_CAP;
    cfg.min_support = 2;
    cfg.now_ms = fixed_now;
    aff_widgets *w = NULL;
    aff_err err;
    cr_assert_eq(widgets_create(&w, &cfg, &err), 0, "%s", err.msg);
    static const char *const types[] = {"view",        "view",     "view",    "click",
                                        "add_to_cart", "purchase", "purchase"};
    static hist_event call[1200];
    static store_event se[1200];
    static store_kv kv[1200];
    uint64_t seqs[1200], next_seq[REF_USERS] = {0}, seed = 0xca11ed;
    uint64_t full_lists = 0; /* the most lists at the cap at a comparison */
    for (int c = 0; c < 160; c++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        int u = (int)((seed >> 33) % REF_USERS);
        /* Mostly calls of up to 100 events; every tenth a long one (more queued updates than
         * the module holds at once). */
        uint32_t n = c % 10 == 9 ? 1200 : 1 + (uint32_t)((seed >> 40) % 100);
        int64_t ts = NOW - DAY + (int64_t)c * 600000; /* 10 min apart: baskets span calls */
        for (uint32_t i = 0; i < n; i++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            uint64_t r = seed >> 11;
            hist_event *h = &call[i];
            memset(h, 0, sizeof *h);
            h->seq = next_seq[u]++;
            h->ts = ts;
            /* Skewed items: the head's lists fill with established pairs, the tail's with
             * pairs seen once. */
            int item = (int)(r % REF_ITEMS);
            if ((r >> 10) % 4 != 0) item %= 24;
            snprintf(h->item, sizeof h->item, "i%d", item);
            snprintf(h->type, sizeof h->type, "%s", types[(r >> 16) % 7]);
            if ((r >> 20) % 4 == 0) {
                snprintf(h->ctx_key, sizeof h->ctx_key, "session_id");
                snprintf(h->ctx_val, sizeof h->ctx_val, "s%d", (int)((r >> 24) % 3));
            } else if ((r >> 20) % 4 == 1 && strcmp(h->type, "purchase") == 0) {
                snprintf(h->ctx_key, sizeof h->ctx_key, "order_id");
                snprintf(h->ctx_val, sizeof h->ctx_val, "o%d", (int)((r >> 24) % 3));
            }
            se[i] = as_store(h, &kv[i]);
            seqs[i] = h->seq;
            /* The reference: the event enters, the oldest beyond the window leave. */
            ref_event *re = &s.win[u][s.n_win[u]];
            re->item = item;
            re->kind = strcmp(h->type, "purchase") == 0      ? REF_PURCHASE
                       : strcmp(h->type, "add_to_cart") == 0 ? REF_OTHER
                                                             : REF_VIEW;
            bool purchase = re->kind == REF_PURCHASE;
            if (purchase && strcmp(h->ctx_key, "order_id") == 0)
                snprintf(re->basket, sizeof re->basket, "o:%s", h->ctx_val);
            else if (strcmp(h->ctx_key, "session_id") == 0)
                snprintf(re->basket, sizeof re->basket, "s:%s", h->ctx_val);
            else
                snprintf(re->basket, sizeof re->basket, "t:%lld",
                         (long long)(ts / (30 * 60 * 1000)));
            s.n_win[u]++;
            ref_terms(&s, u, s.n_win[u] - 1, +1);
            while (s.n_win[u] > REF_WINDOW)
                ref_remove(&s, u, 0);
        }
        cr_assert_eq(widgets_apply(w, "c", user_ids[u], se, seqs, n, &err), 0, "%s", err.msg);
        if (c % 40 == 39) { /* DeleteUser: the user's events leave newest first */
            int victim = (int)((seed >> 20) % REF_USERS);
            widgets_forget_user(w, "c", user_ids[victim]);
            while (s.n_win[victim])
                ref_remove(&s, victim, s.n_win[victim] - 1);
        }
        if (c % 20 == 19) {
            uint64_t full = 0;
            for (int t = 0; t < REF_TABLES; t++)
                for (int a = 0; a < REF_ITEMS; a++)
                    full += s.nb[t][a].n == REF_CAP;
            if (full > full_lists) full_lists = full;
            char when[32];
            snprintf(when, sizeof when, "after call %d", c);
            ref_compare(w, &s, cfg.min_support, when);
        }
    }
    cr_log_info("lists at the cap: %llu; new pairs there: %llu replaced one, %llu refused",
                (unsigned long long)full_lists, (unsigned long long)s.replaced,
                (unsigned long long)s.refused);
    cr_assert(full_lists > 50 && s.replaced > 10000 && s.refused > 10,
              "too little at the cap to be a test: %llu lists, %llu replaced, %llu refused",
              (unsigned long long)full_lists, (unsigned long long)s.replaced,
              (unsigned long long)s.refused);
    widgets_destroy(w);
}

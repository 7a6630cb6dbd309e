/*
 * widgets.c: the statistics behind the shop's standard widgets (widgets.h has the
 * definitions). Owns, per collection: an item table (id → position, interned), each item's
 * neighbour lists in three co-occurrence tables, decayed counters and re-purchase intervals,
 * and every user's window of recent events. Rules it keeps: every statistic is a sum of
 * per-event terms computed against the event's user window, so adding and removing an event
 * are exact inverses (the decayed sums up to rounding), and the state is a function of the
 * windows, not of the order events arrived in (except at a full neighbour list).
 */
#include "widgets.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "log.h"
#include "strmap.h"

enum { T_ORDER = 0, T_SESSION = 1, T_USER = 2, N_TABLES = 3 };
enum { K_OTHER = 0, K_VIEW = 1, K_PURCHASE = 2 }; /* what an event is to the widgets */

/* One event of a user window: 24 bytes. seq_kind: the history sequence number << 8 | kind. */
typedef struct wevent {
    uint64_t seq_kind;
    int64_t ts;
    uint32_t item;
    uint32_t basket; /* hash of the order or session basket key */
} wevent;
#define EV_SEQ(e)  ((e)->seq_kind >> 8)
#define EV_KIND(e) ((int)((e)->seq_kind & 0xff))

/* An item's neighbours in one table: item[k] was in count[k] baskets with it. The ids and
 * the counts are two arrays in one allocation (NBR_COUNT: count = item + cap), so the search
 * for a neighbour (the widgets' hottest loop, once per pair of basket events) reads 4 bytes per
 * entry. n1 counts the entries with count 1 (the ones a new neighbour may replace at the cap).
 * head..tail chains the pair updates pending on the list (pend ops, 1-based; 0: none): the
 * updates of one widgets_apply call are applied list by list (flush_pending), in the order
 * they were made on each list, so the lists end exactly as if applied one by one, and each
 * list is read into the cache once per batch instead of once per pair. 24 bytes. */
typedef struct nbr_list {
    uint32_t *item;
    uint16_t n, cap, n1; /* cap ≤ max_neighbours ≤ 10000 */
    uint32_t head, tail;
} nbr_list;
#define NBR_COUNT(l) ((l)->item + (l)->cap)

/* A pair update waiting on a neighbour list: count `other` once more (PEND_LESS clear) or once
 * less (set); next: the list's next pending op (1-based), 0 at the tail. */
typedef struct pend {
    uint32_t other, next;
} pend;
#define PEND_LESS         0x80000000u
#define PEND_MAX          8192 /* ops held before every list is brought up to date (64 KB) */
#define PEND_SMALL_BASKET 8    /* fewer other items: lists with nothing pending updated at once */

/* Per item slot, under the write lock: in == epoch when the item is in the basket being
 * updated; seen == epoch once its pair with the updated item was counted. One 8-byte slot, so
 * the two tests cost one cache line. */
typedef struct wmark {
    uint32_t in, seen;
} wmark;

/* Per item slot, while one list's pending ops are applied: the item is at position k of the
 * list when stamp is the list's (flush_list). */
typedef struct wpos {
    uint32_t stamp, k;
} wpos;

typedef struct witem {
    const char *id; /* the item map's key */
    nbr_list nb[N_TABLES];
    uint32_t baskets[N_TABLES]; /* baskets holding the item */
    uint32_t trend_n, best_n;   /* events behind the sums (0: the sums are exactly 0) */
    double trend_s, trend_l, best; /* sums of 2^((ts - base) / H) */
    int64_t *iv;                   /* re-purchase intervals (ms), sorted */
    uint32_t n_iv, cap_iv;
} witem;

typedef struct wuser {
    const char *id; /* the user map's key; NULL: a free slot */
    wevent *ev;     /* by sequence number */
    uint32_t n, cap;
} wuser;

typedef struct cand {
    uint32_t item;
    uint32_t related; /* UINT32_MAX: none */
    double score;
} cand;

/* A collection-wide ranking (trending, best sellers), best first, kept for refresh_ms. */
typedef struct ranking {
    cand *v;
    uint32_t n;
    bool truncated, valid;
    int64_t at_ms;
} ranking;

typedef struct wcoll {
    char name[AFF_MAX_NAME_LEN + 1];
    pthread_rwlock_t lock;
    strmap *items;
    witem *it;
    uint32_t n_items, cap_items;
    strmap *users;
    wuser *us;
    uint32_t n_us, cap_us;
    uint32_t *free_us;
    uint32_t n_free;
    uint64_t n_baskets[N_TABLES];
    uint64_t events_held;
    bool has_base;
    int64_t base_ms;
    uint32_t *scratch; /* user_events entries (under the write lock) */
    wmark *mark;       /* per item slot (under the write lock) */
    uint32_t epoch;
    wpos *pos; /* per item slot (under the write lock) */
    uint32_t pos_stamp;
    /* Pair updates not yet applied to their lists (under the write lock; none once the lock is
     * released): the ops, and the lists holding some, as item << 2 | table, in first-use order. */
    pend *pend;
    uint64_t *dirty;
    uint32_t n_pend, n_dirty;
    pthread_mutex_t cache_mu; /* guards cache; taken inside the collection's lock */
    ranking cache[2];         /* trending, best sellers */
} wcoll;

struct aff_widgets {
    widgets_config cfg;
    char session_key[STORE_MAX_CONTEXT_LEN + 1], order_key[STORE_MAX_CONTEXT_LEN + 1];
    double hs_ms, hl_ms, hb_ms; /* half-lives */
    pthread_mutex_t mu;         /* guards the collection list */
    wcoll **colls;
    size_t n_colls, cap_colls;
};

static const char *const recipe_names[WIDGETS_RECIPE_COUNT] = {
    "personalized",    "frequently_bought_together", "also_viewed",     "also_bought",
    "trending",        "buy_it_again",               "recently_viewed", "best_sellers"};

const char *widgets_recipe_name(widgets_recipe r)
{
    return (unsigned)r < WIDGETS_RECIPE_COUNT ? recipe_names[r] : NULL;
}

bool widgets_recipe_parse(const char *name, widgets_recipe *out)
{
    static const struct {
        const char *alias;
        widgets_recipe r;
    } aliases[] = {{"fbt", WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER},
                   {"bought_together", WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER}};
    for (int i = 0; i < WIDGETS_RECIPE_COUNT; i++) {
        if (strcmp(name, recipe_names[i]) == 0) {
            *out = (widgets_recipe)i;
            return true;
        }
    }
    for (size_t i = 0; i < sizeof aliases / sizeof *aliases; i++) {
        if (strcmp(name, aliases[i].alias) == 0) {
            *out = aliases[i].r;
            return true;
        }
    }
    return false;
}

bool widgets_recipe_needs_items(widgets_recipe r)
{
    return r == WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER || r == WIDGETS_RECIPE_ALSO_VIEWED ||
           r == WIDGETS_RECIPE_ALSO_BOUGHT;
}

bool widgets_recipe_needs_user(widgets_recipe r)
{
    return r == WIDGETS_RECIPE_BUY_IT_AGAIN || r == WIDGETS_RECIPE_RECENTLY_VIEWED;
}

void widgets_config_init(widgets_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->session_key = "session_id";
    cfg->order_key = "order_id";
    cfg->window_ms = 30 * 60 * 1000;
    cfg->max_neighbours = 50;
    cfg->min_support = 2;
    cfg->user_events = 100;
    cfg->trend_short_half_life_s = 86400.0;
    cfg->trend_long_half_life_s = 14 * 86400.0;
    cfg->trend_min_events = 5.0;
    cfg->best_seller_half_life_s = 7 * 86400.0;
    cfg->refresh_ms = 1000;
    cfg->maintain = true;
}

int widgets_create(aff_widgets **out, const widgets_config *cfg, aff_err *err)
{
    *out = NULL;
    widgets_config def;
    if (!cfg) {
        widgets_config_init(&def);
        cfg = &def;
    }
    const char *sk = cfg->session_key ? cfg->session_key : "", *ok = cfg->order_key ? cfg->order_key : "";
    if (!*sk || strlen(sk) > STORE_MAX_CONTEXT_LEN || !*ok || strlen(ok) > STORE_MAX_CONTEXT_LEN)
        return aff__fail(err, AFF_EINVAL, "widgets: the session and order keys need 1..%d bytes",
                         STORE_MAX_CONTEXT_LEN);
    if (cfg->window_ms < 1000)
        return aff__fail(err, AFF_EINVAL, "widgets: the basket window must be at least 1 s");
    if (cfg->max_neighbours < 1 || cfg->max_neighbours > 10000)
        return aff__fail(err, AFF_EINVAL, "widgets: neighbours per item must be 1..10000, not %u",
                         cfg->max_neighbours);
    if (cfg->min_support < 1)
        return aff__fail(err, AFF_EINVAL, "widgets: minimum support must be at least 1");
    if (cfg->user_events < 1 || cfg->user_events > 100000)
        return aff__fail(err, AFF_EINVAL, "widgets: events per user must be 1..100000, not %u",
                         cfg->user_events);
    double hs = cfg->trend_short_half_life_s, hl = cfg->trend_long_half_life_s,
           hb = cfg->best_seller_half_life_s;
    if (!(hs >= 60 && isfinite(hs)) || !(hl > hs && isfinite(hl)) || !(hb >= 60 && isfinite(hb)))
        return aff__fail(err, AFF_EINVAL,
                         "widgets: half-lives must be at least a minute, the long trend window "
                         "longer than the short one");
    if (!(cfg->trend_min_events >= 0 && isfinite(cfg->trend_min_events)))
        return aff__fail(err, AFF_EINVAL, "widgets: trend minimum volume must be ≥ 0");
    aff_widgets *w = calloc(1, sizeof *w);
    if (!w) return aff__fail(err, AFF_ENOMEM, "widgets: out of memory");
    w->cfg = *cfg;
    snprintf(w->session_key, sizeof w->session_key, "%s", sk);
    snprintf(w->order_key, sizeof w->order_key, "%s", ok);
    w->cfg.session_key = w->session_key;
    w->cfg.order_key = w->order_key;
    w->hs_ms = hs * 1000.0;
    w->hl_ms = hl * 1000.0;
    w->hb_ms = hb * 1000.0;
    pthread_mutex_init(&w->mu, NULL);
    *out = w;
    return AFF_OK;
}

/* Frees a collection's statistics, leaving it empty (the caller holds the write lock or is
 * the only user). Maps are recreated; when that fails they stay NULL and the collection
 * answers nothing and ignores events until the next reset. */
static void coll_clear(wcoll *c)
{
    for (uint32_t i = 0; i < c->n_items; i++) {
        for (int t = 0; t < N_TABLES; t++)
            free(c->it[i].nb[t].item);
        free(c->it[i].iv);
    }
    for (uint32_t u = 0; u < c->n_us; u++)
        free(c->us[u].ev);
    free(c->it);
    free(c->us);
    free(c->free_us);
    free(c->mark);
    free(c->pos);
    c->mark = NULL;
    c->pos = NULL;
    c->epoch = c->pos_stamp = 0;
    c->n_pend = c->n_dirty = 0;
    strmap_destroy(c->items);
    strmap_destroy(c->users);
    c->it = NULL;
    c->us = NULL;
    c->free_us = NULL;
    c->items = c->users = NULL;
    c->n_items = c->cap_items = c->n_us = c->cap_us = c->n_free = 0;
    memset(c->n_baskets, 0, sizeof c->n_baskets);
    c->events_held = 0;
    c->has_base = false;
    for (int i = 0; i < 2; i++) {
        free(c->cache[i].v);
        c->cache[i] = (ranking){0};
    }
    if (strmap_create(&c->items, 1024) || strmap_create(&c->users, 1024)) {
        strmap_destroy(c->items);
        strmap_destroy(c->users);
        c->items = c->users = NULL;
    }
}

static void coll_free(wcoll *c)
{
    if (!c) return;
    coll_clear(c);
    strmap_destroy(c->items);
    strmap_destroy(c->users);
    free(c->scratch);
    free(c->pend);
    free(c->dirty);
    pthread_mutex_destroy(&c->cache_mu);
    pthread_rwlock_destroy(&c->lock);
    free(c);
}

void widgets_destroy(aff_widgets *w)
{
    if (!w) return;
    for (size_t i = 0; i < w->n_colls; i++)
        coll_free(w->colls[i]);
    free(w->colls);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

static int64_t now_ms(const aff_widgets *w)
{
    if (w->cfg.now_ms) return w->cfg.now_ms(w->cfg.now_ctx);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The collection's statistics; created when create is set (else NULL when absent). A
 * collection, once created, lives as long as the module (a drop empties it), so callers may
 * use the pointer after the list lock is released. */
static wcoll *coll_get(aff_widgets *w, const char *name, bool create)
{
    wcoll *c = NULL;
    pthread_mutex_lock(&w->mu);
    for (size_t i = 0; i < w->n_colls && !c; i++)
        if (strcmp(w->colls[i]->name, name) == 0) c = w->colls[i];
    if (!c && create && strlen(name) <= AFF_MAX_NAME_LEN) {
        if (w->n_colls == w->cap_colls) {
            size_t cap = w->cap_colls ? 2 * w->cap_colls : 8;
            wcoll **n = realloc(w->colls, cap * sizeof *n);
            if (!n) goto out;
            w->colls = n;
            w->cap_colls = cap;
        }
        c = calloc(1, sizeof *c);
        if (!c) goto out;
        snprintf(c->name, sizeof c->name, "%s", name);
        pthread_rwlock_init(&c->lock, NULL);
        pthread_mutex_init(&c->cache_mu, NULL);
        c->scratch = malloc((size_t)w->cfg.user_events * sizeof *c->scratch);
        c->pend = malloc(PEND_MAX * sizeof *c->pend);
        c->dirty = malloc(PEND_MAX * sizeof *c->dirty);
        coll_clear(c);
        if (!c->items || !c->scratch || !c->pend || !c->dirty) {
            coll_free(c);
            c = NULL;
            goto out;
        }
        w->colls[w->n_colls++] = c;
    }
out:
    pthread_mutex_unlock(&w->mu);
    return c;
}

/* ---- maintenance ------------------------------------------------------------------------------ */

static uint32_t hash32(const char *tag, const char *s)
{
    uint64_t h = strmap_hash(tag, strlen(tag)) ^ strmap_hash(s, strlen(s));
    return (uint32_t)(h ^ (h >> 32)) | 1u; /* never 0: 0 is "no basket" */
}

static const char *context_value(const store_event *e, const char *key)
{
    for (uint32_t i = 0; i < e->n_context; i++)
        if (strcmp(e->context[i].key, key) == 0 && e->context[i].value[0])
            return e->context[i].value;
    return NULL;
}

/* The event's basket key (widgets.h: Baskets). */
static uint32_t basket_of(const aff_widgets *w, const store_event *e, int kind)
{
    const char *v = NULL;
    if (kind == K_PURCHASE && (v = context_value(e, w->order_key))) return hash32("o", v);
    if ((v = context_value(e, w->session_key))) return hash32("s", v);
    /* The bucket number in decimal (what "%lld" writes), without snprintf: once per event. */
    long long t = (long long)(e->ts_ms / w->cfg.window_ms);
    char b[32], *p = b + sizeof b;
    unsigned long long u = t < 0 ? 0ull - (unsigned long long)t : (unsigned long long)t;
    *--p = '\0';
    do
        *--p = (char)('0' + u % 10);
    while (u /= 10);
    if (t < 0) *--p = '-';
    return hash32("t", p);
}

static int kind_of(const char *type)
{
    if (strcmp(type, "view") == 0 || strcmp(type, "click") == 0) return K_VIEW;
    if (strcmp(type, "purchase") == 0) return K_PURCHASE;
    return K_OTHER;
}

static int item_intern(wcoll *c, const char *id, uint32_t *out)
{
    if (strmap_get(c->items, id, out)) return AFF_OK;
    if (c->n_items == c->cap_items) {
        uint32_t cap = c->cap_items ? 2 * c->cap_items : 1024;
        witem *n = realloc(c->it, (size_t)cap * sizeof *n);
        if (n) c->it = n;
        wmark *m = realloc(c->mark, (size_t)cap * sizeof *m);
        if (m) c->mark = m;
        wpos *ps = realloc(c->pos, (size_t)cap * sizeof *ps);
        if (ps) c->pos = ps;
        if (!n || !m || !ps) return AFF_ENOMEM;
        memset(c->mark + c->cap_items, 0, (size_t)(cap - c->cap_items) * sizeof *m);
        memset(c->pos + c->cap_items, 0, (size_t)(cap - c->cap_items) * sizeof *ps);
        c->cap_items = cap;
    }
    const char *key;
    if (strmap_put(c->items, id, c->n_items, &key)) return AFF_ENOMEM;
    memset(&c->it[c->n_items], 0, sizeof c->it[0]);
    c->it[c->n_items].id = key;
    *out = c->n_items++;
    return AFF_OK;
}

static wuser *user_find(wcoll *c, const char *id)
{
    uint32_t u;
    return strmap_get(c->users, id, &u) ? &c->us[u] : NULL;
}

static wuser *user_intern(wcoll *c, const char *id)
{
    wuser *u = user_find(c, id);
    if (u) return u;
    uint32_t slot;
    if (c->n_free) {
        slot = c->free_us[--c->n_free];
    } else {
        if (c->n_us == c->cap_us) {
            uint32_t cap = c->cap_us ? 2 * c->cap_us : 1024;
            wuser *n = realloc(c->us, (size_t)cap * sizeof *n);
            uint32_t *f = realloc(c->free_us, (size_t)cap * sizeof *f);
            if (n) c->us = n;
            if (f) c->free_us = f;
            if (!n || !f) return NULL;
            c->cap_us = cap;
        }
        slot = c->n_us++;
    }
    const char *key;
    if (strmap_put(c->users, id, slot, &key)) {
        c->free_us[c->n_free++] = slot;
        return NULL;
    }
    c->us[slot] = (wuser){.id = key};
    return &c->us[slot];
}

static void user_release(wcoll *c, wuser *u)
{
    free(u->ev);
    uint32_t slot = (uint32_t)(u - c->us);
    strmap_remove(c->users, u->id);
    *u = (wuser){0};
    c->free_us[c->n_free++] = slot;
}

/* Moves every decayed sum's base to ts: keeps exponents (ts - base) / H small. */
static void rebase(const aff_widgets *w, wcoll *c, int64_t ts)
{
    double d = (double)(ts - c->base_ms);
    double fs = exp2(-d / w->hs_ms), fl = exp2(-d / w->hl_ms), fb = exp2(-d / w->hb_ms);
    for (uint32_t i = 0; i < c->n_items; i++) {
        c->it[i].trend_s *= fs;
        c->it[i].trend_l *= fl;
        c->it[i].best *= fb;
    }
    c->base_ms = ts;
}

/* Removes entry k, whose count is 1 (the last one takes its place). */
static void nbr_remove(nbr_list *l, uint32_t k)
{
    uint32_t *count = NBR_COUNT(l);
    l->n--;
    l->n1--;
    l->item[k] = l->item[l->n];
    count[k] = count[l->n];
}

/* Counts entry k once more / once less (removing it at 0). */
static void nbr_inc(nbr_list *l, uint32_t k)
{
    uint32_t *count = NBR_COUNT(l);
    if (count[k]++ == 1) l->n1--;
}

static bool nbr_dec(nbr_list *l, uint32_t k)
{
    uint32_t *count = NBR_COUNT(l);
    if (count[k] == 1) {
        nbr_remove(l, k);
        return false;
    }
    if (--count[k] == 1) l->n1++;
    return true;
}

/* Records a new neighbour (not in the list) under the cap: appended, else (the list at the
 * cap) in place of the last neighbour seen once, whose id goes to *replaced. Returns the
 * position, or UINT32_MAX when not recorded. */
static __attribute__((noinline)) void nbr_grow(const aff_widgets *w, nbr_list *l)
{
    uint32_t cap = l->cap ? 2u * l->cap : 4;
    if (cap > w->cfg.max_neighbours) cap = w->cfg.max_neighbours;
    uint32_t *v = malloc(2 * (size_t)cap * sizeof *v);
    if (!v) return; /* not recorded: as if capped */
    if (l->n) {
        memcpy(v, l->item, l->n * sizeof *v);
        memcpy(v + cap, NBR_COUNT(l), l->n * sizeof *v);
    }
    free(l->item);
    l->item = v;
    l->cap = (uint16_t)cap;
}

static inline uint32_t nbr_insert(const aff_widgets *w, nbr_list *l, uint32_t other,
                                  uint32_t *replaced)
{
    *replaced = UINT32_MAX;
    if (l->n == l->cap) {
        if (l->cap < w->cfg.max_neighbours) nbr_grow(w, l);
        if (l->n == l->cap && l->cap < w->cfg.max_neighbours) return UINT32_MAX; /* no memory */
    }
    uint32_t *count = NBR_COUNT(l);
    if (l->n < l->cap) {
        l->item[l->n] = other;
        count[l->n] = 1;
        l->n1++;
        return l->n++;
    }
    if (!l->n1) return UINT32_MAX; /* every neighbour established: not recorded */
    uint32_t i = l->n;
    while (count[--i] != 1) /* the last neighbour seen once (n1 > 0: there is one) */
        ;
    *replaced = l->item[i];
    l->item[i] = other;
    return i;
}

/* The first index of `other` in l, or l->n. With SSE2, eight entries per step (this search
 * runs once per pair of basket events: the widgets' hottest loop). */
static uint32_t nbr_find(const nbr_list *l, uint32_t other)
{
    const uint32_t *v = l->item;
    uint32_t n = l->n, i = 0;
#ifdef __SSE2__
    const __m128i key = _mm_set1_epi32((int)other);
    for (; i + 8 <= n; i += 8) {
        __m128i a = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(v + i)), key);
        __m128i b = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(v + i + 4)), key);
        if (_mm_movemask_epi8(_mm_or_si128(a, b))) break;
    }
#endif
    for (; i < n; i++)
        if (v[i] == other) return i;
    return n;
}

static void nbr_add(const aff_widgets *w, nbr_list *l, uint32_t other, int sign)
{
    uint32_t i = nbr_find(l, other), replaced;
    if (i == l->n) {
        if (sign > 0) nbr_insert(w, l, other, &replaced); /* else: pushed out by the cap earlier */
    } else if (sign > 0) {
        nbr_inc(l, i);
    } else {
        nbr_dec(l, i);
    }
}

/* nbr_add with the list's positions in c->pos under stamp st (found in O(1), kept up to date). */
static void nbr_add_indexed(const aff_widgets *w, wcoll *c, nbr_list *l, uint32_t st,
                            uint32_t other, int sign)
{
    wpos *p = &c->pos[other];
    if (p->stamp != st) {
        if (sign < 0) return; /* pushed out by the cap earlier */
        uint32_t replaced, k = nbr_insert(w, l, other, &replaced);
        if (k == UINT32_MAX) return;
        if (replaced != UINT32_MAX) c->pos[replaced].stamp = 0;
        *p = (wpos){st, k};
    } else if (sign > 0) {
        nbr_inc(l, p->k);
    } else {
        uint32_t k = p->k;
        if (!nbr_dec(l, k)) { /* removed: the last entry moved to k */
            p->stamp = 0;
            if (k < l->n) c->pos[l->item[k]].k = k;
        }
    }
}

/* Applies the list's pending ops, in the order they were made. With several ops on a long list
 * the positions of its items are indexed first (c->pos), so each op costs O(1), not a search. */
static void flush_list(const aff_widgets *w, wcoll *c, nbr_list *l)
{
    if (l->head != l->tail && l->n >= 16) {
        if (++c->pos_stamp == 0) { /* wrapped: no stale stamp may equal the new one */
            memset(c->pos, 0, (size_t)c->cap_items * sizeof *c->pos);
            c->pos_stamp = 1;
        }
        const uint32_t st = c->pos_stamp;
        for (uint32_t k = 0; k < l->n; k++)
            c->pos[l->item[k]] = (wpos){st, k};
        for (uint32_t op = l->head; op;) {
            const pend *p = &c->pend[op - 1];
            nbr_add_indexed(w, c, l, st, p->other, p->next & PEND_LESS ? -1 : 1);
            op = p->next & ~PEND_LESS;
        }
    } else {
        for (uint32_t op = l->head; op;) {
            const pend *p = &c->pend[op - 1];
            nbr_add(w, l, p->other, p->next & PEND_LESS ? -1 : 1);
            op = p->next & ~PEND_LESS;
        }
    }
    l->head = l->tail = 0;
}

/* Brings every list up to date (before the write lock is released, or when the ops are at
 * PEND_MAX). Lists are independent, so their order here does not matter. */
static void flush_pending(const aff_widgets *w, wcoll *c)
{
    const uint64_t *d = c->dirty;
    for (uint32_t k = 0; k < c->n_dirty; k++) {
        if (k + 4 < c->n_dirty) __builtin_prefetch(&c->it[d[k + 4] >> 2].nb[d[k + 4] & 3]);
        if (k + 2 < c->n_dirty) __builtin_prefetch(c->it[d[k + 2] >> 2].nb[d[k + 2] & 3].item);
        flush_list(w, c, &c->it[d[k] >> 2].nb[d[k] & 3]);
    }
    c->n_dirty = c->n_pend = 0;
}

/* Queues a pair update on item x's list in table t. (Inlined: called once per pair.) */
static inline __attribute__((always_inline)) void
defer_add(const aff_widgets *w, wcoll *c, uint32_t x, int t, uint32_t other, int sign)
{
    if (c->n_pend == PEND_MAX) flush_pending(w, c);
    uint32_t id = ++c->n_pend;
    c->pend[id - 1] = (pend){.other = other, .next = sign < 0 ? PEND_LESS : 0};
    nbr_list *l = &c->it[x].nb[t];
    if (l->tail) {
        c->pend[l->tail - 1].next |= id;
    } else {
        l->head = id;
        c->dirty[c->n_dirty++] = (uint64_t)x << 2 | (uint64_t)t;
    }
    l->tail = id;
}

static int iv_cmp(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void iv_add(witem *it, int64_t v, int sign)
{
    if (v < WIDGETS_REBUY_MIN_MS) return;
    if (sign < 0) {
        int64_t *f = bsearch(&v, it->iv, it->n_iv, sizeof *it->iv, iv_cmp);
        if (!f) return;
        memmove(f, f + 1, (size_t)(it->iv + it->n_iv - f - 1) * sizeof *f);
        it->n_iv--;
        return;
    }
    if (it->n_iv == it->cap_iv) {
        uint32_t cap = it->cap_iv ? 2 * it->cap_iv : 4;
        int64_t *n = realloc(it->iv, (size_t)cap * sizeof *n);
        if (!n) return;
        it->iv = n;
        it->cap_iv = cap;
    }
    uint32_t at = it->n_iv;
    while (at > 0 && it->iv[at - 1] > v)
        at--;
    memmove(it->iv + at + 1, it->iv + at, (size_t)(it->n_iv - at) * sizeof *it->iv);
    it->iv[at] = v;
    it->n_iv++;
}

/* Adds (sign +1) or removes (-1) the terms of co-occurrence table t for event i of u, against
 * the other events of its basket in the window. */
static void cooc_terms(const aff_widgets *w, wcoll *c, const wuser *u, uint32_t i, int t, int sign)
{
    const wevent *e = &u->ev[i];
    const uint64_t kind = t == T_SESSION ? K_VIEW : K_PURCHASE;
    const uint32_t item = e->item, basket = e->basket;
    if (++c->epoch == 0) { /* wrapped: no stale mark may equal the new epoch */
        memset(c->mark, 0, (size_t)c->cap_items * sizeof *c->mark);
        c->epoch = 1;
    }
    const uint32_t ep = c->epoch;
    wmark *mk = c->mark;
    /* The basket's events (e itself among them), and its distinct other items in order. */
    uint32_t n = 0, in_basket = 0, same = 0;
    for (uint32_t j = 0; j < u->n; j++) {
        const wevent *o = &u->ev[j];
        if ((o->seq_kind & 0xff) != kind || (t != T_USER && o->basket != basket)) continue;
        in_basket++;
        uint32_t x = o->item;
        if (x == item) {
            if (++same > 1) return;  /* the item is in the basket already: nothing changes */
        } else if (mk[x].in != ep) { /* each distinct item once */
            mk[x].in = ep;
            c->scratch[n++] = x;
        }
    }
    bool others = in_basket > 1;
    witem *a = &c->it[e->item];
    a->baskets[t] += (uint32_t)sign;
    if (!others) c->n_baskets[t] += (uint64_t)(int64_t)sign;
    /* The item's own list, brought up to date first: one pass over it for the pairs it holds,
     * then the new ones. */
    nbr_list *l = &a->nb[t];
    flush_list(w, c, l);
    for (uint32_t k = 0; k < l->n;) {
        uint32_t x = l->item[k];
        if (mk[x].in != ep || mk[x].seen == ep) {
            k++;
            continue;
        }
        mk[x].seen = ep;
        if (sign > 0)
            nbr_inc(l, k++);
        else if (nbr_dec(l, k))
            k++;
        /* else removed: look at the moved entry next */
    }
    /* The new pairs into the item's own list. Once it is full for good (at the cap), each
     * insert replaces the same entry (the last seen once: it stays so), so only the last one
     * of them is recorded: the rest are skipped. */
    if (sign > 0) {
        uint32_t last = UINT32_MAX, replaced;
        for (uint32_t j = 0; j < n; j++) {
            uint32_t x = c->scratch[j];
            if (mk[x].seen == ep) continue;
            if (l->n == l->cap && l->cap == w->cfg.max_neighbours)
                last = x;
            else
                nbr_insert(w, l, x, &replaced);
        }
        if (last != UINT32_MAX) nbr_insert(w, l, last, &replaced);
    }
    /* The other items' lists: queued (flush_pending), each in its own order. In a small basket
     * a list with nothing pending is updated at once (queueing pays off only when a list gets
     * several updates per call, which takes large baskets). */
    if (n >= PEND_SMALL_BASKET) {
        for (uint32_t j = 0; j < n; j++)
            defer_add(w, c, c->scratch[j], t, e->item, sign);
        return;
    }
    for (uint32_t j = 0; j < n; j++) {
        nbr_list *lx = &c->it[c->scratch[j]].nb[t];
        if (!lx->tail)
            nbr_add(w, lx, e->item, sign);
        else
            defer_add(w, c, c->scratch[j], t, e->item, sign);
    }
}

/* Adds or removes every term of event i of u (u->ev[i] is in the window either way). */
static void event_terms(const aff_widgets *w, wcoll *c, const wuser *u, uint32_t i, int sign)
{
    const wevent *e = &u->ev[i];
    witem *a = &c->it[e->item];
    double d = (double)(e->ts - c->base_ms);
    a->trend_n += (uint32_t)sign;
    a->trend_s += sign * exp2(d / w->hs_ms);
    a->trend_l += sign * exp2(d / w->hl_ms);
    if (a->trend_n == 0) a->trend_s = a->trend_l = 0;
    int kind = EV_KIND(e);
    if (kind == K_VIEW) cooc_terms(w, c, u, i, T_SESSION, sign);
    if (kind != K_PURCHASE) return;
    a->best_n += (uint32_t)sign;
    a->best += sign * exp2(d / w->hb_ms);
    if (a->best_n == 0) a->best = 0;
    cooc_terms(w, c, u, i, T_ORDER, sign);
    cooc_terms(w, c, u, i, T_USER, sign);
    /* Re-purchase intervals: the event splits (or joins) the gap between the user's
     * neighbouring purchases of the same item, ordered by (time, sequence). */
    const wevent *prev = NULL, *next = NULL;
    for (uint32_t j = 0; j < u->n; j++) {
        const wevent *o = &u->ev[j];
        if (j == i || EV_KIND(o) != K_PURCHASE || o->item != e->item) continue;
        bool before = o->ts < e->ts || (o->ts == e->ts && EV_SEQ(o) < EV_SEQ(e));
        if (before && (!prev || o->ts > prev->ts || (o->ts == prev->ts && EV_SEQ(o) > EV_SEQ(prev))))
            prev = o;
        if (!before && (!next || o->ts < next->ts || (o->ts == next->ts && EV_SEQ(o) < EV_SEQ(next))))
            next = o;
    }
    if (prev && next) iv_add(a, next->ts - prev->ts, -sign);
    if (prev) iv_add(a, e->ts - prev->ts, sign);
    if (next) iv_add(a, next->ts - e->ts, sign);
}

static void remove_event(const aff_widgets *w, wcoll *c, wuser *u, uint32_t i)
{
    event_terms(w, c, u, i, -1);
    memmove(u->ev + i, u->ev + i + 1, (size_t)(u->n - i - 1) * sizeof *u->ev);
    u->n--;
    c->events_held--;
}

/* Adds one event to u's window (in sequence order) and drops the oldest beyond the window. */
static int add_event(const aff_widgets *w, wcoll *c, wuser *u, const wevent *ev)
{
    uint32_t at = u->n;
    while (at > 0 && EV_SEQ(&u->ev[at - 1]) >= EV_SEQ(ev)) {
        if (EV_SEQ(&u->ev[at - 1]) == EV_SEQ(ev)) return AFF_OK; /* applied already */
        at--;
    }
    if (u->n == w->cfg.user_events && at == 0) return AFF_OK; /* older than the window */
    if (u->n == u->cap) {
        uint32_t cap = u->cap ? 2 * u->cap : 8;
        if (cap > w->cfg.user_events) cap = w->cfg.user_events;
        if (cap <= u->n) cap = u->n + 1;
        wevent *n = realloc(u->ev, (size_t)cap * sizeof *n);
        if (!n) return AFF_ENOMEM;
        u->ev = n;
        u->cap = cap;
    }
    if (!c->has_base) {
        c->base_ms = ev->ts;
        c->has_base = true;
    } else {
        double hmin = w->hs_ms < w->hb_ms ? w->hs_ms : w->hb_ms;
        if ((double)(ev->ts - c->base_ms) / hmin > 512) rebase(w, c, ev->ts);
    }
    memmove(u->ev + at + 1, u->ev + at, (size_t)(u->n - at) * sizeof *u->ev);
    u->ev[at] = *ev;
    u->n++;
    c->events_held++;
    event_terms(w, c, u, at, +1);
    while (u->n > w->cfg.user_events)
        remove_event(w, c, u, 0);
    return AFF_OK;
}

int widgets_apply(aff_widgets *w, const char *collection, const char *user,
                  const store_event *events, const uint64_t *seqs, size_t n, aff_err *err)
{
    if (!w->cfg.maintain || n == 0) return AFF_OK;
    wcoll *c = coll_get(w, collection, true);
    if (!c) return aff__fail(err, AFF_ENOMEM, "widgets: out of memory");
    int rc = AFF_OK;
    pthread_rwlock_wrlock(&c->lock);
    wuser *u = c->items ? user_intern(c, user) : NULL;
    if (!u) {
        rc = aff__fail(err, AFF_ENOMEM, "widgets: out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        wevent ev = {.ts = events[i].ts_ms};
        int kind = kind_of(events[i].type);
        ev.seq_kind = seqs[i] << 8 | (uint64_t)kind;
        ev.basket = kind == K_OTHER ? 0 : basket_of(w, &events[i], kind);
        if (item_intern(c, events[i].item_id, &ev.item) || add_event(w, c, u, &ev)) {
            rc = aff__fail(err, AFF_ENOMEM, "widgets: out of memory");
            break;
        }
    }
    flush_pending(w, c);
    if (u->n == 0) user_release(c, u);
out:
    pthread_rwlock_unlock(&c->lock);
    return rc;
}

static void forget_in(const aff_widgets *w, wcoll *c, const char *user)
{
    pthread_rwlock_wrlock(&c->lock);
    wuser *u = c->users ? user_find(c, user) : NULL;
    if (u) {
        while (u->n)
            remove_event(w, c, u, u->n - 1);
        flush_pending(w, c);
        user_release(c, u);
    }
    pthread_rwlock_unlock(&c->lock);
}

/* Calls fn for every collection (or the one named only). Lock order: the list lock, then a
 * collection's lock. */
static void each_coll(aff_widgets *w, const char *only,
                      void (*fn)(aff_widgets *, wcoll *, const void *), const void *arg)
{
    pthread_mutex_lock(&w->mu);
    for (size_t i = 0; i < w->n_colls; i++)
        if (!only || strcmp(w->colls[i]->name, only) == 0) fn(w, w->colls[i], arg);
    pthread_mutex_unlock(&w->mu);
}

static void forget_fn(aff_widgets *w, wcoll *c, const void *user)
{
    forget_in(w, c, user);
}

void widgets_forget_user(aff_widgets *w, const char *collection, const char *user)
{
    each_coll(w, collection && *collection ? collection : NULL, forget_fn, user);
}

static void expire_fn(aff_widgets *w, wcoll *c, const void *arg)
{
    int64_t cutoff = *(const int64_t *)arg;
    pthread_rwlock_wrlock(&c->lock);
    for (uint32_t s = 0; s < c->n_us && c->users; s++) {
        wuser *u = &c->us[s];
        if (!u->id) continue;
        for (uint32_t i = u->n; i-- > 0;)
            if (u->ev[i].ts < cutoff) remove_event(w, c, u, i);
        if (u->n == 0) user_release(c, u);
    }
    flush_pending(w, c);
    pthread_rwlock_unlock(&c->lock);
}

void widgets_expire(aff_widgets *w, int64_t cutoff_ms)
{
    each_coll(w, NULL, expire_fn, &cutoff_ms);
}

static void clear_fn(aff_widgets *w, wcoll *c, const void *arg)
{
    (void)w;
    (void)arg;
    pthread_rwlock_wrlock(&c->lock);
    coll_clear(c);
    pthread_rwlock_unlock(&c->lock);
}

void widgets_drop_collection(aff_widgets *w, const char *collection)
{
    each_coll(w, collection, clear_fn, NULL);
}

/* ---- the observer and the rebuild ------------------------------------------------------------- */

static void on_applied(void *ctx, const char *collection, const char *user,
                       const store_event *events, const uint64_t *seqs, size_t n)
{
    aff_err err = {0};
    if (widgets_apply(ctx, collection, user, events, seqs, n, &err))
        aff_log(AFF_LOG_WARN, "widgets: %s (a restart rebuilds the statistics)", err.msg);
}

static void on_erased(void *ctx, const char *collection, const char *user)
{
    widgets_forget_user(ctx, collection, user);
}

static void on_expired(void *ctx, int64_t cutoff_ms)
{
    widgets_expire(ctx, cutoff_ms);
}

void widgets_observer(aff_widgets *w, profiles_observer *out)
{
    *out = (profiles_observer){
        .applied = on_applied, .user_erased = on_erased, .expired = on_expired, .ctx = w};
}

typedef struct replay_ctx {
    aff_widgets *w;
    const char *collection;
    wcoll *coll;
    char (*users)[AFF_MAX_ID_LEN + 1];
    size_t n_users, cap_users;
    const char *user;
    uint32_t skip; /* the user's oldest events, outside the window */
    uint32_t seen;
    int status;
    aff_err *err;
} replay_ctx;

static int replay_user_id(void *ctx, const char *id)
{
    replay_ctx *r = ctx;
    if (r->n_users == r->cap_users) {
        size_t cap = r->cap_users ? 2 * r->cap_users : 256;
        void *n = realloc(r->users, cap * sizeof *r->users);
        if (!n) return AFF_ENOMEM;
        r->users = n;
        r->cap_users = cap;
    }
    snprintf(r->users[r->n_users++], sizeof r->users[0], "%s", id);
    return 0;
}

static int replay_users_fn(store_txn *txn, void *ctx, aff_err *err)
{
    replay_ctx *r = ctx;
    r->n_users = 0;
    int rc = store_txn_scan_users(txn, r->collection, replay_user_id, r, err);
    return rc > 0 ? aff__fail(err, AFF_ENOMEM, "widgets: out of memory") : rc;
}

static int replay_event(void *ctx, uint64_t seq, const store_event *e)
{
    replay_ctx *r = ctx;
    if (r->seen++ < r->skip) return 0;
    return widgets_apply(r->w, r->collection, r->user, e, &seq, 1, r->err);
}

static int replay_history_fn(store_txn *txn, void *ctx, aff_err *err)
{
    replay_ctx *r = ctx;
    forget_in(r->w, r->coll, r->user); /* a view runs once, but stay idempotent */
    /* Count the held events first (retention may leave gaps), then apply the last
     * user_events of them: the window incremental maintenance holds. */
    r->seen = 0;
    r->skip = UINT32_MAX;
    int rc = store_txn_scan_events(txn, r->collection, r->user, replay_event, r, err);
    if (rc) return rc;
    r->skip = r->seen > r->w->cfg.user_events ? r->seen - r->w->cfg.user_events : 0;
    r->seen = 0;
    return store_txn_scan_events(txn, r->collection, r->user, replay_event, r, err);
}

int widgets_rebuild(aff_widgets *w, aff_store *store, aff_err *err)
{
    each_coll(w, NULL, clear_fn, NULL);
    if (!w->cfg.maintain) return AFF_OK;
    store_collection *cols = NULL;
    size_t n_cols = 0;
    int rc = store_list_collections(store, &cols, &n_cols, err);
    replay_ctx r = {.w = w, .err = err};
    uint64_t users = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (size_t ci = 0; ci < n_cols && !rc; ci++) {
        r.collection = cols[ci].name;
        if (!(r.coll = coll_get(w, r.collection, true))) {
            rc = aff__fail(err, AFF_ENOMEM, "widgets: out of memory");
            break;
        }
        if ((rc = store_view(store, replay_users_fn, &r, err))) break;
        for (size_t u = 0; u < r.n_users && !rc; u++) {
            r.user = r.users[u];
            rc = store_view(store, replay_history_fn, &r, err);
        }
        users += r.n_users;
    }
    free(r.users);
    free(cols);
    if (rc == AFF_OK) {
        widgets_stats st;
        widgets_get_stats(w, &st);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        aff_log(AFF_LOG_INFO,
                "widgets rebuilt from the stored histories: %llu users, %llu events, %llu items, "
                "%.1f MiB, %.2f s",
                (unsigned long long)users, (unsigned long long)st.events_held,
                (unsigned long long)st.items, (double)st.bytes / 1048576.0,
                (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9);
    }
    return rc;
}

/* ---- answers ---------------------------------------------------------------------------------- */

int widgets_validate(const widgets_request *r, aff_err *err)
{
    if ((unsigned)r->recipe >= WIDGETS_RECIPE_COUNT || r->recipe == WIDGETS_RECIPE_PERSONALIZED)
        return aff__fail(err, AFF_EINVAL,
                         "recipe = %d is not a widget recipe; use RECIPE_FREQUENTLY_BOUGHT_TOGETHER, "
                         "RECIPE_ALSO_VIEWED, RECIPE_ALSO_BOUGHT, RECIPE_TRENDING, "
                         "RECIPE_BUY_IT_AGAIN, RECIPE_RECENTLY_VIEWED or RECIPE_BEST_SELLERS",
                         (int)r->recipe);
    const char *name = recipe_names[r->recipe];
    if (widgets_recipe_needs_items(r->recipe)) {
        if (r->n_item_ids < 1 || r->n_item_ids > WIDGETS_MAX_CONTEXT)
            return aff__fail(err, AFF_EINVAL,
                             "item_ids: recipe %s needs 1..%d item ids (the item or the cart), "
                             "not %u",
                             name, WIDGETS_MAX_CONTEXT, r->n_item_ids);
        for (uint32_t i = 0; i < r->n_item_ids; i++) {
            size_t len = r->item_ids[i] ? strlen(r->item_ids[i]) : 0;
            if (len < 1 || len > AFF_MAX_ID_LEN)
                return aff__fail(err, AFF_EINVAL, "item_ids[%u] must be 1..%d bytes", i,
                                 AFF_MAX_ID_LEN);
        }
    } else if (r->n_item_ids) {
        return aff__fail(err, AFF_EINVAL, "item_ids: recipe %s takes no item ids (%u given)",
                         name, r->n_item_ids);
    }
    if (widgets_recipe_needs_user(r->recipe) && (!r->user_id || !*r->user_id))
        return aff__fail(err, AFF_EINVAL, "user_id: recipe %s needs the shopper's user_id", name);
    return AFF_OK;
}

static int cand_cmp(const void *a, const void *b, void *ctx)
{
    const cand *x = a, *y = b;
    const wcoll *c = ctx;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return strcmp(c->it[x->item].id, c->it[y->item].id);
}

/* Sift-down for a heap whose top is the worst candidate. */
static void heap_down(cand *h, uint32_t n, uint32_t i, const wcoll *c)
{
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && cand_cmp(&h[l], &h[m], (void *)c) > 0) m = l;
        if (r < n && cand_cmp(&h[r], &h[m], (void *)c) > 0) m = r;
        if (m == i) return;
        cand t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Keeps the best max of the n candidates, sorted; *truncated when some were dropped. */
static uint32_t select_best(cand *v, uint32_t n, uint32_t max, const wcoll *c, bool *truncated)
{
    *truncated = n > max;
    if (n > max) {
        for (uint32_t i = max / 2; i-- > 0;)
            heap_down(v, max, i, c);
        for (uint32_t i = max; i < n; i++) {
            if (cand_cmp(&v[i], &v[0], (void *)c) < 0) {
                v[0] = v[i];
                heap_down(v, max, 0, c);
            }
        }
        n = max;
    }
    if (n > 1) qsort_r(v, n, sizeof *v, cand_cmp, (void *)c);
    return n;
}

/* Dunning's G² for the 2×2 co-occurrence table (Mahout's formulation). */
static double xlogx(double x)
{
    return x > 0 ? x * log(x) : 0.0;
}

static double llr(double k11, double k12, double k21, double k22)
{
    double row = xlogx(k11 + k12 + k21 + k22) - xlogx(k11 + k12) - xlogx(k21 + k22);
    double col = xlogx(k11 + k12 + k21 + k22) - xlogx(k11 + k21) - xlogx(k12 + k22);
    double mat = xlogx(k11 + k12 + k21 + k22) - xlogx(k11) - xlogx(k12) - xlogx(k21) - xlogx(k22);
    double g = 2.0 * (row + col - mat);
    return g > 0 ? g : 0.0;
}

static int cand_by_item(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    return (x->item > y->item) - (x->item < y->item);
}

static int cooc_candidates(const aff_widgets *w, const wcoll *c, int t, const widgets_request *r,
                           cand **out, uint32_t *n_out)
{
    uint32_t ctx[WIDGETS_MAX_CONTEXT], nctx = 0;
    for (uint32_t i = 0; i < r->n_item_ids; i++) {
        uint32_t a;
        if (strmap_get(c->items, r->item_ids[i], &a)) ctx[nctx++] = a;
    }
    size_t total = 0;
    for (uint32_t i = 0; i < nctx; i++)
        total += c->it[ctx[i]].nb[t].n;
    cand *v = malloc((total ? total : 1) * sizeof *v);
    if (!v) return AFF_ENOMEM;
    double N = (double)c->n_baskets[t];
    uint32_t n = 0;
    for (uint32_t i = 0; i < nctx; i++) {
        const witem *a = &c->it[ctx[i]];
        const nbr_list *l = &a->nb[t];
        const uint32_t *count = NBR_COUNT(l);
        for (uint32_t j = 0; j < l->n; j++) {
            if (count[j] < w->cfg.min_support) continue;
            double nab = count[j], na = a->baskets[t], nb = c->it[l->item[j]].baskets[t];
            if (nab * N <= na * nb) continue; /* not positively associated */
            double k22 = N - na - nb + nab;
            v[n++] = (cand){.item = l->item[j],
                            .related = ctx[i],
                            .score = llr(nab, na - nab, nb - nab, k22 > 0 ? k22 : 0)};
        }
    }
    /* Sum per item (a cart), remembering the context item that contributed most. */
    if (n > 1) qsort(v, n, sizeof *v, cand_by_item);
    uint32_t m = 0;
    for (uint32_t i = 0, end; i < n; i = end) {
        cand sum = v[i];
        double best = v[i].score;
        for (end = i + 1; end < n && v[end].item == v[i].item; end++) {
            sum.score += v[end].score;
            if (v[end].score > best) {
                best = v[end].score;
                sum.related = v[end].related;
            }
        }
        bool in_ctx = false;
        for (uint32_t k = 0; k < nctx && !in_ctx; k++)
            in_ctx = ctx[k] == sum.item;
        if (!in_ctx && sum.score > 0) v[m++] = sum;
    }
    *out = v;
    *n_out = m;
    return AFF_OK;
}

static int all_items_candidates(const aff_widgets *w, const wcoll *c, widgets_recipe recipe,
                                cand **out, uint32_t *n_out)
{
    cand *v = malloc((c->n_items ? c->n_items : 1) * sizeof *v);
    if (!v) return AFF_ENOMEM;
    double d = (double)(now_ms(w) - c->base_ms);
    double fs = exp2(-d / w->hs_ms), fl = exp2(-d / w->hl_ms), fb = exp2(-d / w->hb_ms);
    double ratio = w->hs_ms / w->hl_ms;
    uint32_t n = 0;
    for (uint32_t i = 0; i < c->n_items; i++) {
        const witem *it = &c->it[i];
        if (recipe == WIDGETS_RECIPE_TRENDING) {
            if (!it->trend_n) continue;
            double s = it->trend_s * fs, e = it->trend_l * fl * ratio;
            if (s < w->cfg.trend_min_events || s <= e) continue;
            v[n++] = (cand){.item = i, .related = UINT32_MAX, .score = (s - e) / sqrt(e + 1.0)};
        } else {
            if (!it->best_n) continue;
            double s = it->best * fb;
            if (s > 0) v[n++] = (cand){.item = i, .related = UINT32_MAX, .score = s};
        }
    }
    *out = v;
    *n_out = n;
    return AFF_OK;
}

static int user_candidates(const aff_widgets *w, const wcoll *c, const widgets_request *r,
                           cand **out, uint32_t *n_out)
{
    uint32_t u;
    *out = NULL;
    *n_out = 0;
    if (!strmap_get(c->users, r->user_id, &u)) return AFF_OK;
    const wuser *us = &c->us[u];
    cand *v = malloc((us->n ? us->n : 1) * sizeof *v);
    if (!v) return AFF_ENOMEM;
    uint32_t n = 0;
    if (r->recipe == WIDGETS_RECIPE_RECENTLY_VIEWED) {
        /* Newest first by (time, sequence): the window is in sequence order. */
        const wevent **views = malloc((us->n ? us->n : 1) * sizeof *views);
        if (!views) {
            free(v);
            return AFF_ENOMEM;
        }
        uint32_t nv = 0;
        for (uint32_t i = 0; i < us->n; i++)
            if (EV_KIND(&us->ev[i]) == K_VIEW) views[nv++] = &us->ev[i];
        for (uint32_t i = 1; i < nv; i++) { /* insertion sort by time: nearly sorted already */
            const wevent *x = views[i];
            uint32_t j = i;
            while (j > 0 && views[j - 1]->ts > x->ts) {
                views[j] = views[j - 1];
                j--;
            }
            views[j] = x;
        }
        for (uint32_t i = nv; i-- > 0;) {
            bool dup = false;
            for (uint32_t k = 0; k < n && !dup; k++)
                dup = v[k].item == views[i]->item;
            if (dup) continue;
            v[n] = (cand){.item = views[i]->item, .related = UINT32_MAX, .score = 1.0 / (n + 1)};
            n++;
        }
        free(views);
    } else { /* BUY_IT_AGAIN */
        int64_t now = now_ms(w);
        for (uint32_t i = 0; i < us->n; i++) {
            const wevent *e = &us->ev[i];
            if (EV_KIND(e) != K_PURCHASE) continue;
            const witem *it = &c->it[e->item];
            if (!it->n_iv) continue;
            uint32_t k = 0;
            while (k < n && v[k].item != e->item)
                k++;
            double median = 0.5 * ((double)it->iv[(it->n_iv - 1) / 2] + (double)it->iv[it->n_iv / 2]);
            double due = (double)(now - e->ts) / median;
            if (k == n)
                v[n++] = (cand){.item = e->item, .related = UINT32_MAX, .score = due};
            else if (due < v[k].score)
                v[k].score = due; /* the last purchase counts */
        }
    }
    *out = v;
    *n_out = n;
    return AFF_OK;
}

/* The first max entries of the collection's trending or best-seller ranking (a copy in *out),
 * computed again when older than refresh_ms. Called under the collection's read lock. */
static int ranking_prefix(const aff_widgets *w, wcoll *c, widgets_recipe recipe, uint32_t max,
                          cand **out, uint32_t *n_out, bool *truncated)
{
    ranking *rk = &c->cache[recipe == WIDGETS_RECIPE_TRENDING ? 0 : 1];
    int64_t now = now_ms(w);
    int rc = AFF_OK;
    pthread_mutex_lock(&c->cache_mu);
    if (!rk->valid || now - rk->at_ms >= (int64_t)w->cfg.refresh_ms || now < rk->at_ms) {
        cand *v;
        uint32_t n;
        if ((rc = all_items_candidates(w, c, recipe, &v, &n))) goto out;
        free(rk->v);
        rk->n = select_best(v, n, WIDGETS_SCAN_LIMIT, c, &rk->truncated);
        rk->v = v;
        rk->valid = true;
        rk->at_ms = now;
    }
    uint32_t n = rk->n < max ? rk->n : max;
    *out = malloc((n ? n : 1) * sizeof **out);
    if (!*out) {
        rc = AFF_ENOMEM;
        goto out;
    }
    memcpy(*out, rk->v, n * sizeof **out);
    *n_out = n;
    *truncated = rk->truncated || rk->n > max;
out:
    pthread_mutex_unlock(&c->cache_mu);
    return rc;
}

int widgets_candidates(aff_widgets *w, const widgets_request *r, uint32_t max, widgets_result *out,
                       aff_err *err)
{
    memset(out, 0, sizeof *out);
    wcoll *c = coll_get(w, r->collection, false);
    if (!c || max == 0) return AFF_OK;
    pthread_rwlock_rdlock(&c->lock);
    if (!c->items) {
        pthread_rwlock_unlock(&c->lock);
        return AFF_OK;
    }
    cand *v = NULL;
    uint32_t n = 0;
    int rc;
    switch (r->recipe) {
    case WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER:
        rc = cooc_candidates(w, c, T_ORDER, r, &v, &n);
        break;
    case WIDGETS_RECIPE_ALSO_VIEWED:
        rc = cooc_candidates(w, c, T_SESSION, r, &v, &n);
        break;
    case WIDGETS_RECIPE_ALSO_BOUGHT:
        rc = cooc_candidates(w, c, T_USER, r, &v, &n);
        break;
    case WIDGETS_RECIPE_TRENDING:
    case WIDGETS_RECIPE_BEST_SELLERS:
        rc = ranking_prefix(w, c, r->recipe, max, &v, &n, &out->truncated);
        break;
    default:
        rc = user_candidates(w, c, r, &v, &n);
        break;
    }
    if (rc == AFF_OK) {
        bool cut;
        n = select_best(v, n, max, c, &cut);
        out->truncated = out->truncated || cut;
        size_t bytes = 0;
        for (uint32_t i = 0; i < n; i++) {
            bytes += strlen(c->it[v[i].item].id) + 1;
            if (v[i].related != UINT32_MAX) bytes += strlen(c->it[v[i].related].id) + 1;
        }
        out->hits = malloc((n ? n : 1) * sizeof *out->hits);
        out->pool = malloc(bytes ? bytes : 1);
        if (!out->hits || !out->pool) {
            rc = AFF_ENOMEM;
        } else {
            char *p = out->pool;
            for (uint32_t i = 0; i < n; i++) {
                widgets_hit *h = &out->hits[i];
                size_t l = strlen(c->it[v[i].item].id) + 1;
                h->id = memcpy(p, c->it[v[i].item].id, l);
                p += l;
                h->related = NULL;
                if (v[i].related != UINT32_MAX) {
                    l = strlen(c->it[v[i].related].id) + 1;
                    h->related = memcpy(p, c->it[v[i].related].id, l);
                    p += l;
                }
                h->score = (float)v[i].score;
            }
            out->n = n;
        }
    }
    pthread_rwlock_unlock(&c->lock);
    free(v);
    if (rc) {
        widgets_result_release(out);
        return aff__fail(err, AFF_ENOMEM, "widgets: out of memory ranking candidates");
    }
    return AFF_OK;
}

void widgets_result_release(widgets_result *r)
{
    free(r->hits);
    free(r->pool);
    memset(r, 0, sizeof *r);
}

static void stats_fn(aff_widgets *w, wcoll *c, const void *arg)
{
    widgets_stats *s = (widgets_stats *)arg;
    pthread_rwlock_rdlock(&c->lock);
    s->collections++;
    if (!c->items) {
        pthread_rwlock_unlock(&c->lock);
        return;
    }
    s->items += c->n_items;
    s->users += strmap_count(c->users);
    s->events_held += c->events_held;
    s->bytes += sizeof *c + strmap_memory(c->items) + strmap_memory(c->users) +
                (size_t)c->cap_items * (sizeof *c->it + sizeof *c->mark + sizeof *c->pos) +
                (size_t)c->cap_us * (sizeof *c->us + 4) +
                PEND_MAX * (sizeof *c->pend + sizeof *c->dirty) +
                (size_t)w->cfg.user_events * sizeof *c->scratch;
    for (uint32_t i = 0; i < c->n_items; i++) {
        for (int t = 0; t < N_TABLES; t++) {
            s->neighbours += c->it[i].nb[t].n;
            s->bytes += (size_t)c->it[i].nb[t].cap * 2 * sizeof(uint32_t);
        }
        s->bytes += (size_t)c->it[i].cap_iv * sizeof(int64_t);
    }
    for (uint32_t u = 0; u < c->n_us; u++)
        s->bytes += (size_t)c->us[u].cap * sizeof(wevent);
    for (int i = 0; i < 2; i++)
        s->bytes += (size_t)c->cache[i].n * sizeof(cand);
    pthread_rwlock_unlock(&c->lock);
}

void widgets_get_stats(aff_widgets *w, widgets_stats *out)
{
    memset(out, 0, sizeof *out);
    each_coll(w, NULL, stats_fn, out);
}

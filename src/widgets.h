/*
 * widgets.h: the shop's standard widgets, as statistics kept incrementally from events:
 * frequently bought together, also viewed, also bought, trending, buy it again, recently
 * viewed and best sellers. Each is a candidate source of the ranking pipeline (pipeline.c),
 * which applies filters, rules, diversity, exploration and reasons to it like to any other.
 *
 * What the statistics are a function of. For every user of a collection the module keeps the
 * user's last `user_events` events (a window of the user's stored history: the profiles module
 * keeps the last history_len ≥ user_events, in application order), and every statistic below
 * is exactly a sum of per-user terms over those windows. An event that leaves a window (the
 * user's newer events push it out, DeleteUser, opt-out, retention) takes its terms with it, so
 * the state after any sequence of events equals a rebuild from the stored histories (what
 * widgets_rebuild does at start-up), up to floating-point rounding in the decayed sums and
 * except where an item's neighbour list was full (see the cap below).
 *
 * Baskets. A purchase belongs to its user's order basket: the value of context[order_key]
 * (default "order_id"), else of context[session_key], else the time bucket floor(ts / window)
 * (default 30 min). A view or click belongs to its user's session basket: context[session_key]
 * (default "session_id"), else the time bucket. All of a user's purchases in the window form
 * the user's purchase basket. Baskets are per user: the same session id of two users is two
 * baskets.
 *
 * Co-occurrence (three tables: orders, sessions, users' purchases). n_a = baskets holding a,
 * n_ab = baskets holding a and b, N = baskets. Item b is a neighbour of a when n_ab ≥
 * min_support and n_ab N > n_a n_b (positively associated); its score is Dunning's
 * log-likelihood ratio G² of the 2×2 table (n_ab, n_a - n_ab, n_b - n_ab, N - n_a - n_b + n_ab),
 * which corrects for popularity (a best seller in every basket scores 0). For several context
 * items (a cart) the scores of each b add up; the reason names the context item that
 * contributed most. Cap: each item keeps at most max_neighbours neighbours per table; when
 * the list is full a new neighbour replaces one seen only once (else it is not recorded), so
 * established neighbours are never pushed out. Memory: ≤ 3 × items × max_neighbours × 8 bytes
 * for the lists, 160 bytes per item slot for the rest (its statistics, and the marks and
 * pending-update chains the updates use) plus its id in the item map, 24 bytes per event held in the users' windows
 * (≤ users × user_events), and 128 KB per collection for the pair updates a call queues (they
 * are applied list by list before the call returns, so no answer ever sees them pending).
 *
 * Trending (all event types, weight 1): s = the decayed count with half-life
 * trend_short_half_life, l = with trend_long_half_life, E = l × short/long (the count the
 * long-run rate predicts for the short window). Items with s ≥ trend_min_events and s > E
 * score (s - E) / sqrt(E + 1): the excess over the long-run rate in Poisson standard units.
 * Best sellers: purchases only, decayed with best_seller_half_life; score = the decayed count.
 * Both rank every item, so the ranking (its best WIDGETS_SCAN_LIMIT) is kept and computed again
 * once it is refresh_ms old: an answer may be that much behind the events.
 *
 * Buy it again: the re-purchase interval of an item is the median over all users' consecutive
 * purchases of it at least an hour apart; items nobody re-bought have none and are not shown.
 * The user's purchased items with an interval score due = (now - last purchase) / interval,
 * most due first. Recently viewed: the user's last distinct viewed or clicked items, newest
 * first, score = 1 / rank.
 *
 * Threading: every function may be called from any thread; each collection has a read/write
 * lock (updates exclusive, candidate reads shared).
 */
#ifndef AFFINITY_WIDGETS_H
#define AFFINITY_WIDGETS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "profiles.h"
#include "status.h"
#include "store.h"

typedef struct aff_widgets aff_widgets;

/* Values match affinity.v1.Recipe. */
typedef enum widgets_recipe {
    WIDGETS_RECIPE_PERSONALIZED = 0, /* not a widget: the shopper's profile or model */
    WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER = 1,
    WIDGETS_RECIPE_ALSO_VIEWED = 2,
    WIDGETS_RECIPE_ALSO_BOUGHT = 3,
    WIDGETS_RECIPE_TRENDING = 4,
    WIDGETS_RECIPE_BUY_IT_AGAIN = 5,
    WIDGETS_RECIPE_RECENTLY_VIEWED = 6,
    WIDGETS_RECIPE_BEST_SELLERS = 7,
} widgets_recipe;

#define WIDGETS_RECIPE_COUNT   8
#define WIDGETS_MAX_CONTEXT    64    /* item_ids of one widget request (a cart) */
#define WIDGETS_SCAN_LIMIT     10000 /* candidates one widget answer ranks at most */
#define WIDGETS_REBUY_MIN_MS   3600000 /* purchases closer than this are one purchase */

typedef struct widgets_config {
    const char *session_key;       /* default "session_id" (copied) */
    const char *order_key;         /* default "order_id" (copied) */
    int64_t window_ms;             /* basket time bucket without a key; default 30 min */
    uint32_t max_neighbours;       /* per item per table; default 50 */
    uint32_t min_support;          /* baskets a pair needs; default 2 */
    uint32_t user_events;          /* events per user considered; default 100 */
    double trend_short_half_life_s; /* default 1 day */
    double trend_long_half_life_s;  /* default 14 days */
    double trend_min_events;        /* short-window decayed count; default 5 */
    double best_seller_half_life_s; /* default 7 days */
    /* Trending and best sellers rank every item of the collection: the ranking is kept and
     * computed again once it is this old (default 1000 ms; 0: on every call). */
    uint32_t refresh_ms;
    bool maintain; /* false: events are not counted (measuring the cost; widgets answer empty) */
    int64_t (*now_ms)(void *ctx); /* NULL: the real-time clock (tests set it) */
    void *now_ctx;
} widgets_config;

void widgets_config_init(widgets_config *cfg);

/* AFF_EINVAL naming the bad setting. */
int widgets_create(aff_widgets **out, const widgets_config *cfg, aff_err *err);
void widgets_destroy(aff_widgets *w);

/* The name of a recipe ("frequently_bought_together", ...) and back; NULL / false when
 * unknown. The CLI and the serving config use these names. */
const char *widgets_recipe_name(widgets_recipe r);
bool widgets_recipe_parse(const char *name, widgets_recipe *out);
/* Whether the recipe needs item ids (a context) or a user id. */
bool widgets_recipe_needs_items(widgets_recipe r);
bool widgets_recipe_needs_user(widgets_recipe r);

/* Applies n events of one user (already stored durably, with their history sequence numbers
 * seqs[i]). Events' pointers are borrowed for the call. AFF_ENOMEM leaves the statistics
 * without the event (logged by the caller; a rebuild restores them). */
int widgets_apply(aff_widgets *w, const char *collection, const char *user,
                  const store_event *events, const uint64_t *seqs, size_t n, aff_err *err);
/* Removes everything the user contributed, in one collection or every one (NULL or ""). */
void widgets_forget_user(aff_widgets *w, const char *collection, const char *user);
/* Removes every event older than cutoff_ms (retention), in every collection. */
void widgets_expire(aff_widgets *w, int64_t cutoff_ms);
/* Forgets a collection. */
void widgets_drop_collection(aff_widgets *w, const char *collection);

/* Clears everything and replays every collection's stored histories (start-up). */
int widgets_rebuild(aff_widgets *w, aff_store *store, aff_err *err);

/* The profiles observer that keeps w up to date (profiles_config.observer). */
void widgets_observer(aff_widgets *w, profiles_observer *out);

typedef struct widgets_request {
    widgets_recipe recipe;
    const char *collection;
    const char *user_id;         /* BUY_IT_AGAIN, RECENTLY_VIEWED */
    const char *const *item_ids; /* FBT, ALSO_*: the context (one item or a cart) */
    uint32_t n_item_ids;
} widgets_request;

typedef struct widgets_hit {
    const char *id;      /* into the result's pool */
    const char *related; /* the context item behind it, or NULL */
    float score;
} widgets_hit;

/* Owns its memory; release with widgets_result_release. */
typedef struct widgets_result {
    widgets_hit *hits; /* score descending, ties by id */
    uint32_t n;
    bool truncated; /* more candidates exist beyond max */
    char *pool;     /* the ids */
} widgets_result;

/* Checks a widget request's own fields (recipe, item_ids, user_id); AFF_EINVAL names the
 * field ("recipe", "item_ids", "user_id"). */
int widgets_validate(const widgets_request *r, aff_err *err);

/* Up to max candidates of a validated request, best first, context items excluded, at the
 * module's clock now. An unknown collection, item or user gives none. */
int widgets_candidates(aff_widgets *w, const widgets_request *r, uint32_t max, widgets_result *out,
                       aff_err *err);
void widgets_result_release(widgets_result *r);

typedef struct widgets_stats {
    uint64_t collections, items, users, events_held;
    uint64_t neighbours; /* entries over the three tables */
    uint64_t bytes;      /* memory held by the statistics */
} widgets_stats;
void widgets_get_stats(aff_widgets *w, widgets_stats *out);

#endif

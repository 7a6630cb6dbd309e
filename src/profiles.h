/*
 * profiles.h: shoppers' behaviour events, their profile vectors, exclusions and popularity.
 *
 * Events. Each event names an item of the collection, a type (view, click, add_to_cart,
 * purchase, or a custom type configured with a weight), a time (default now), an optional
 * value and optional context; all are stored in the user's bounded history.
 *
 * Profile vector. For user u in a collection, with type weights w(type) and half-life H:
 *
 *     s_u(T) = sum over u's events i of  w(type_i) * 2^(-(T - t_i) / H) * x(item_i)
 *     profile_u = s_u(T) / |s_u(T)|
 *
 * x(item) is the item's stored vector, normalized first in cosine collections. T only scales
 * s_u, so the profile's direction does not depend on when it is read: decay weighs events
 * against each other (an event H older counts half as much). The store keeps s_u decayed to
 * ref_ms = the latest event time; an event at t ≥ ref_ms does s = 2^(-(t - ref_ms)/H) s +
 * w x, ref_ms = t; an older event adds 2^(-(ref_ms - t)/H) w x. Incremental, O(dim) per event.
 * The same sum is kept per (user, item) as a scalar, so the profile can be recomputed exactly
 * from the per-item aggregates without the full history.
 *
 * Deleted and changed items. A delete or a vector-changing re-upsert bumps the collection's
 * generation in the store. A profile computed at an older generation is recomputed from the
 * user's per-item aggregates with the current item vectors, skipping deleted items: lazily
 * on the next read (not persisted by reads) and persisted by the next write. Deleted items
 * also lose their popularity counters, and the engine never returns deleted ids.
 *
 * Exclusions. Every (user, type, item) is indexed, all time (not just the bounded history),
 * so "exclude what the user purchased" costs O(items purchased), whatever the history length.
 *
 * Popularity. Per collection and item: P(T) = sum over all users' events of
 * w(type) * 2^(-(T - t)/H_pop), kept as log2 P(T) + T/H_pop (time-invariant), which orders a
 * ranking index; the top items are a prefix scan.
 *
 * DeleteUser erases the user's profile, history, per-item aggregates and type index. The
 * popularity counters keep the user's past contributions: they are anonymous per-item sums
 * with no link back to the user (and cannot be un-decayed exactly).
 *
 * Threading: every function may be called from any thread; writes are serialized by the
 * store, reads see the last committed write (a Recommend after PutEvents returned sees it).
 */
#ifndef AFFINITY_PROFILES_H
#define AFFINITY_PROFILES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "event_types.h"
#include "store.h"

typedef struct aff_profiles aff_profiles;

/* Values match affinity.v1.EventType. */
typedef enum profiles_event_kind {
    PROFILES_EVENT_UNSPECIFIED = 0,
#define PROFILES__EVENT_ENUM(name, value, str, weight) PROFILES_EVENT_##name = value,
    AFF_EVENT_TYPES(PROFILES__EVENT_ENUM)
#undef PROFILES__EVENT_ENUM
        PROFILES_EVENT_CUSTOM = AFF_EVENT_CUSTOM,
} profiles_event_kind;

/* Values match affinity.v1.RecommendSource. */
typedef enum profiles_source {
    PROFILES_SOURCE_PROFILE = 2,
    PROFILES_SOURCE_POPULARITY = 3,
} profiles_source;

#define PROFILES_MAX_EVENTS       1000 /* events in one profiles_put_events call */
#define PROFILES_MAX_CUSTOM_TYPES 28
#define PROFILES_TOP_CATEGORIES   10

typedef struct profiles_custom_type {
    const char *name; /* [a-z0-9_], 1..STORE_MAX_TYPE_LEN bytes, not a built-in name */
    float weight;     /* finite, ≥ 0 */
} profiles_custom_type;

/* Told about every change to the stored histories, after it committed, on the calling thread
 * (outside any transaction: a callback may read the store). Pointers are borrowed for the
 * call. Callbacks may be NULL. */
typedef struct profiles_observer {
    /* Events appended to user's history; seqs[i] is events[i]'s sequence number there. */
    void (*applied)(void *ctx, const char *collection, const char *user, const store_event *events,
                    const uint64_t *seqs, size_t n);
    /* Everything of the user erased (DeleteUser, opt-out); collection NULL: everywhere. */
    void (*user_erased)(void *ctx, const char *collection, const char *user);
    /* Retention erased every event older than cutoff_ms. */
    void (*expired)(void *ctx, int64_t cutoff_ms);
    void *ctx;
} profiles_observer;

typedef struct profiles_config {
    float weight_view;                        /* default 1 */
    float weight_click;                       /* default 2 */
    float weight_add_to_cart;                 /* default 4 */
    float weight_purchase;                    /* default 8 */
    const profiles_custom_type *custom_types; /* copied by profiles_create */
    uint32_t n_custom_types;
    double half_life_s;            /* profile decay; default 14 days */
    double popularity_half_life_s; /* popularity decay; default 7 days */
    uint32_t history_len;          /* events kept per user; default 500 */
    uint32_t popular_scan_limit;   /* ranked items examined per popularity answer; 10000 */
    /* The clock in Unix milliseconds; NULL: the real-time clock. For tests. */
    int64_t (*now_ms)(void *ctx);
    void *now_ctx;
    /* Event retention (issue 12): events older than this are refused and erased by
     * profiles_expire; 0: kept until DeleteUser. */
    int64_t retention_ms;
    profiles_observer observer; /* copied; all NULL: none */
} profiles_config;

/* Fills cfg with the defaults above. */
void profiles_config_init(profiles_config *cfg);

/* Creates the profiles module on a store it borrows (the store must outlive it).
 * AFF_EINVAL when a weight, half-life or custom type is out of range. */
int profiles_create(aff_profiles **out, aff_store *store, const profiles_config *cfg, aff_err *err);
void profiles_destroy(aff_profiles *p);

/* "view", "click", "add_to_cart", "purchase"; NULL for UNSPECIFIED and CUSTOM. */
const char *profiles_event_kind_name(profiles_event_kind kind);

typedef struct profiles_event {
    const char *item_id;
    profiles_event_kind type;
    const char *custom_type; /* with PROFILES_EVENT_CUSTOM: a configured type name */
    int64_t timestamp_ms;    /* Unix ms; 0 = now; at most one day in the future */
    double value;            /* optional (dwell seconds, quantity); stored, not weighted */
    const store_kv *context; /* n_context ≤ STORE_MAX_CONTEXT entries */
    uint32_t n_context;
} profiles_event;

typedef struct profiles_rejection {
    uint32_t index; /* position in the call's events */
    char reason[160];
} profiles_rejection;

/* Applies a user's events to the collection in one durable transaction: profile, history,
 * exclusion index and popularity change together and before the call returns. Events that
 * are invalid (unknown item id, unknown type, a custom_type without PROFILES_EVENT_CUSTOM,
 * bad timestamp, non-finite value or bad context) are rejected one by one into rejected[]
 * (capacity n) and the rest applied. Returns AFF_OK even when some were
 * rejected; an error (unknown collection, bad user id, n out of 1..PROFILES_MAX_EVENTS,
 * AFF_EIO) means nothing was applied. */
int profiles_put_events(aff_profiles *p, const char *collection, const char *user_id,
                        const profiles_event *events, size_t n, uint32_t *n_applied,
                        profiles_rejection *rejected, uint32_t *n_rejected, aff_err *err);

#define PROFILES_MAX_IMPORT_EVENTS 10000 /* events in one profiles_import_events call */

/* One event of a bulk import: any user's. */
typedef struct profiles_user_event {
    const char *user_id; /* 1..AFF_MAX_ID_LEN bytes; otherwise the event is rejected */
    profiles_event event;
} profiles_user_event;

/* Applies events of many users (historical imports) in ONE durable transaction, each event
 * exactly as profiles_put_events would (the same code: each run of consecutive events of one
 * user is applied as one profiles_put_events call's events are, so keep a user's events
 * together for speed). Invalid events, a bad user id included, are rejected one by one into
 * rejected[] (capacity n; index = position in events) and the rest applied. Returns AFF_OK
 * even when some were rejected; an error (unknown collection: AFF_ENOTFOUND; n out of
 * 1..PROFILES_MAX_IMPORT_EVENTS; AFF_EIO) means nothing was applied. */
int profiles_import_events(aff_profiles *p, const char *collection,
                           const profiles_user_event *events, size_t n, uint32_t *n_applied,
                           profiles_rejection *rejected, uint32_t *n_rejected, aff_err *err);

/* What a Recommend by user id runs on. Owns its memory; release with profiles_plan_release. */
typedef struct profiles_plan {
    profiles_source source; /* PROFILE: search with vector; POPULARITY: profiles_popular */
    uint32_t dim;
    float *vector; /* PROFILE: dim floats of unit length; else NULL */
    /* The request's filter with exclude_ids extended by the items the user had the
     * requested event types with. Pass it to engine_search or profiles_popular. Its
     * categories, tags and the request's own exclude ids stay borrowed from the request's
     * filter: keep that alive as long as the plan. */
    aff_filter filter;
    uint32_t n_excluded; /* ids added from the user's events */
    const char **exclude_ids;
    char *id_storage;
} profiles_plan;

/* Reads the user's profile and exclusions in one snapshot. exclude_types are type names
 * (profiles_event_kind_name() or custom names); filter may be NULL. An unknown user, or one
 * whose profile is empty (no weighted events, or only deleted items), gets POPULARITY.
 * AFF_ENOTFOUND for an unknown collection. */
int profiles_plan_recommend(aff_profiles *p, const char *collection, const char *user_id,
                            const char *const *exclude_types, size_t n_exclude_types,
                            const aff_filter *filter, profiles_plan *out, aff_err *err);
void profiles_plan_release(profiles_plan *plan);

/* The user's unit profile vector (dim floats), e.g. for Rerank by user id. *found is false
 * (and vector untouched) when the user has no usable profile. */
int profiles_user_vector(aff_profiles *p, const char *collection, const char *user_id,
                         float *vector, uint32_t dim, bool *found, aff_err *err);

/* Cold start: up to k items of the collection by decayed popularity score, best first, that
 * pass filter (NULL: all; semantics of the engine's aff_filter, evaluated on the stored item
 * attributes). score is the decayed weighted event count now. At most popular_scan_limit
 * ranked items are examined, so a very narrow filter may return fewer than k. */
int profiles_popular(aff_profiles *p, const char *collection, uint32_t k, const aff_filter *filter,
                     aff_hit *hits, uint32_t *n_hits, aff_err *err);

typedef struct profiles_category_weight {
    char category[AFF_MAX_ATTR_LEN + 1];
    float weight; /* share of the user's decayed weight on categorized items, 0..1 */
} profiles_category_weight;

typedef struct profiles_user_info {
    uint32_t n_counts; /* event counts by type name, all time */
    store_type_count counts[STORE_MAX_EVENT_TYPES];
    int64_t last_event_ms;
    uint32_t history_length; /* events in the bounded history */
    uint32_t n_top_categories;
    profiles_category_weight top_categories[PROFILES_TOP_CATEGORIES]; /* heaviest first */
} profiles_user_info;

/* What is held about a user (GetUser). AFF_ENOTFOUND when the user is unknown. Top
 * categories weigh each item the user interacted with by its decayed event weight now. */
int profiles_get_user(aff_profiles *p, const char *collection, const char *user_id,
                      profiles_user_info *out, aff_err *err);

/* Erases the user from one collection, or from every collection when collection is NULL or
 * "", in one durable transaction. *existed (may be NULL): whether anything was held. */
int profiles_delete_user(aff_profiles *p, const char *collection, const char *user_id,
                         bool *existed, aff_err *err);

/* The user's recent distinct items (reasons name the nearest of them): at most
 * PROFILES_RECENT_ITEMS distinct item ids among the user's newest PROFILES_RECENT_EVENTS
 * events, newest first, copied into out[0 .. *n). *n = 0 for an unknown user.
 *
 * Answered from a bounded cache (PROFILES_RECENT_SLOTS entries, one per collection and user,
 * direct-mapped: a colliding user replaces the entry) so a Recommend reads no history from the
 * store once the shopper's entry is warm. Every write of a user's events through this module
 * (put, import, delete, opt-out, expiry) removes the user's entry after it commits, and an
 * entry read from a snapshot older than such a write is never stored, so the answer is never
 * older than the committed history. (A dropped collection's entries stay until the user's
 * next event there removes them: only a user with a profile is asked for, and a profile in a
 * re-created collection needs a new event first.) */
#define PROFILES_RECENT_ITEMS  32
#define PROFILES_RECENT_EVENTS 128
#define PROFILES_RECENT_SLOTS  4096
int profiles_recent_items(aff_profiles *p, const char *collection, const char *user_id,
                          char (*out)[AFF_MAX_ID_LEN + 1], uint32_t *n, aff_err *err);

/* Calls fn for each event in the user's bounded history, oldest first, inside a read
 * transaction (fn must not call store or profiles functions). */
int profiles_history(aff_profiles *p, const char *collection, const char *user_id,
                     store_event_fn fn, void *ctx, aff_err *err);

/* ---- shopper traits (pipeline) ---------------------------------------------------------- */

/* Traits computed from the user's bounded history in one snapshot, at the profiles clock:
 *   price_sensitivity  0.5 + 0.5 (V - B) / max(V, B), with V the mean price of items viewed
 *                      or clicked and B of items carted or purchased: 1 buys far cheaper than
 *                      browses, 0 far dearer, 0.5 neutral (or no purchases yet)
 *   recency_days       days since the last event
 *   frequency_90d      purchases in the last 90 days
 *   monetary_90d       sum over them of price x max(1, value)
 *   r, f, m            RFM scores 1..5: recency <= 1, 7, 30, 90 days; purchases >= 10, 5, 2,
 *                      1; spend >= 1000, 300, 100, > 0
 *   loyalty            (r + f + m - 3) / 12, 0..1
 *   activity           events per day over the last 7 days
 *   purchase_intent    min(1, 0.5 x items carted in the last 24 h and not bought since +
 *                      0.05 x views in the last hour), 0..1 */
typedef struct profiles_traits {
    float price_sensitivity;
    float recency_days;
    uint32_t frequency_90d;
    double monetary_90d;
    uint8_t r, f, m;
    float loyalty;
    float activity;
    float purchase_intent;
} profiles_traits;

/* AFF_ENOTFOUND when the user has no history in the collection. */
int profiles_user_traits(aff_profiles *p, const char *collection, const char *user_id,
                         profiles_traits *out, aff_err *err);

/* ---- privacy (issue 12) ---- */

/* What a data-access export of one user in one collection reports, in one snapshot. The
 * pointers given to the callbacks are valid only during the call; a non-zero return stops
 * the export and is returned. */
typedef struct profiles_export_fns {
    store_event_fn on_event;             /* the bounded history, oldest first */
    store_interaction_fn on_interaction; /* per-item aggregates, all time, by item id */
    /* the all-time (type, item) index behind exclusions, by type then item id */
    int (*on_type_item)(void *ctx, const char *type, const char *item);
    void *ctx;
} profiles_export_fns;

/* Reports everything held about user_id in collection (besides the profiles_get_user
 * summary): history, interactions and the type index. AFF_ENOTFOUND when the user has no
 * profile there. Popularity counters are anonymous per-item sums and are not part of it. */
int profiles_export(aff_profiles *p, const char *collection, const char *user_id,
                    const profiles_export_fns *fns, aff_err *err);

/* Personalization opt-out of user_id in one collection, or in every collection (collection
 * NULL or "", including collections created later). Opting out erases what is held about the
 * user there (as profiles_delete_user) in the same durable transaction, and from then on
 * nothing about the user is kept: profiles_put_events rejects the user's events unstored,
 * and Recommend by user id answers from popularity. opt_out false removes that opt-out.
 * *erased (may be NULL): whether anything was erased. The opt-out record itself is kept
 * (DeleteUser does not remove it) so that the choice is honoured. */
int profiles_set_opt_out(aff_profiles *p, const char *collection, const char *user_id, bool opt_out,
                         bool *erased, aff_err *err);
/* Whether user_id opted out in collection (*here; "" or NULL: not asked) and in every
 * collection (*everywhere). */
int profiles_opted_out(aff_profiles *p, const char *collection, const char *user_id, bool *here,
                       bool *everywhere, aff_err *err);

/* Event retention: erases every event older than cutoff_ms (Unix ms) and what derives from
 * it, in every collection: history entries, per-item aggregates whose latest event is older,
 * type-index marks older than the cutoff; the profile is recomputed from what remains, and a
 * user with nothing left is erased entirely. An aggregate whose latest event is recent keeps
 * the decayed weight of its item's older events until it, too, expires; event counts by type
 * are totals and stay; popularity counters are anonymous and stay. One durable transaction
 * per user with expired data. *n_users and *n_events (may be NULL): users changed, history
 * events erased. */
int profiles_expire(aff_profiles *p, int64_t cutoff_ms, uint64_t *n_users, uint64_t *n_events,
                    aff_err *err);

#endif

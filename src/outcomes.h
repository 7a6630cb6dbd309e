/*
 * outcomes.h: what happened after a recommendation was shown — the measurement half of the
 * continuous-optimization loop.
 *
 * Every answered recommendation (pipeline.c) is recorded here under its recommendation_id:
 * the series it counts toward — (collection, surface, strategy, experiment, arm) — the items
 * it showed (as 64-bit hashes of their ids) and when. A record lives for the attribution
 * window, and at most max_records are kept (the oldest go first). Outcome events that carry
 * a recommendation_id (impression, click, add-to-cart, purchase with value = revenue) are
 * attributed to that record when it is still kept, belongs to the event's collection and
 * showed the event's item; otherwise they are counted as unattributed (per collection and
 * type). Each (response, item) counts each outcome at most once; a click, add-to-cart or
 * purchase of an item whose impression was not reported counts the impression too, so rates
 * never exceed 1.
 *
 * Counts are kept per series in one-minute buckets over the last OUTCOMES_BUCKETS minutes
 * (a ring; older minutes are dropped) plus totals since start (for Prometheus). At most
 * OUTCOMES_MAX_SERIES series exist; what would make more counts under one series whose
 * collection and strategy are "(overflow)".
 *
 * Memory: a record takes about 80 + 9 * items bytes (plus allocator overhead); a series
 * OUTCOMES_BUCKETS * 32 bytes (46 KiB). Nothing here is durable: counts restart at zero with
 * the process (the experiments module keeps what its bandit needs).
 *
 * Threading: every function may be called from any thread. Records are sharded by id, each
 * shard under its own mutex; series and counts are under one mutex (short sections).
 */
#ifndef AFFINITY_OUTCOMES_H
#define AFFINITY_OUTCOMES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct aff_outcomes aff_outcomes;

#define OUTCOMES_BUCKET_MS     60000    /* one bucket per minute */
#define OUTCOMES_BUCKETS       1440     /* 24 hours of buckets per series */
#define OUTCOMES_MAX_STEP_MS   86400000 /* the longest step of a time series */
#define OUTCOMES_MAX_SERIES    1024
#define OUTCOMES_MAX_LABEL     64   /* surface, strategy, experiment and arm names */
#define OUTCOMES_MAX_ITEMS     1024 /* items remembered per recommendation */
#define OUTCOMES_ID_LEN        32   /* recommendation ids: 32 hex digits */
#define OUTCOMES_DEFAULT_STRAT "default"
#define OUTCOMES_UNATTRIBUTED  "(unattributed)" /* the strategy of unattributed counts */

/* The outcome kinds, in the order they are counted. */
typedef enum outcomes_kind {
    OUTCOMES_IMPRESSION = 0,
    OUTCOMES_CLICK = 1,
    OUTCOMES_ADD_TO_CART = 2,
    OUTCOMES_PURCHASE = 3,
    OUTCOMES_KINDS = 4,
} outcomes_kind;

typedef struct outcomes_config {
    uint32_t window_s;    /* attribution window; 1..30 days (checked by config.c) */
    uint32_t max_records; /* recommendations kept at most; >= 1 */
    /* The clock in Unix milliseconds; NULL: CLOCK_REALTIME. Tests move time with it. */
    int64_t (*now_ms)(void *ctx);
    void *now_ctx;
} outcomes_config;

int outcomes_create(aff_outcomes **out, const outcomes_config *cfg, aff_err *err);
void outcomes_destroy(aff_outcomes *o);

/* What a recommendation counts toward. Strings are copied (truncated to
 * OUTCOMES_MAX_LABEL bytes); NULL or "" for surface, experiment and arm means none, for
 * strategy OUTCOMES_DEFAULT_STRAT. */
typedef struct outcomes_labels {
    const char *collection;
    const char *surface;
    const char *strategy;
    const char *experiment;
    const char *arm;
} outcomes_labels;

/* Records one answered recommendation (id: 32 hex digits, as the pipeline makes them) that
 * showed items[0..n) (only the first OUTCOMES_MAX_ITEMS are remembered). Counts one response
 * for the series. AFF_ENOMEM when a record cannot be allocated (the response is still
 * counted); AFF_EINVAL for an id that is not 32 hex digits. */
int outcomes_record(aff_outcomes *o, const char *id, const outcomes_labels *labels,
                    const char *const *items, uint32_t n, aff_err *err);

/* The result of attributing one event. */
typedef struct outcomes_attribution {
    bool attributed; /* counted toward a recommendation's series */
    bool duplicate;  /* attributed before: counted nothing now */
    /* when attributed: the series' experiment and arm ("" when none), and which kinds were
     * newly counted (an implied impression too) */
    char experiment[OUTCOMES_MAX_LABEL + 1];
    char arm[OUTCOMES_MAX_LABEL + 1];
    bool counted[OUTCOMES_KINDS];
} outcomes_attribution;

/* Attributes one outcome event of collection: kind, item_id, the recommendation_id it
 * carries, and value (revenue of a purchase; ignored otherwise). Never fails: anything that
 * cannot be attributed is counted as unattributed. out may be NULL. */
void outcomes_attribute(aff_outcomes *o, const char *collection, const char *recommendation_id,
                        const char *item_id, outcomes_kind kind, double value,
                        outcomes_attribution *out);

/* ---- reading ---- */

typedef struct outcomes_counts {
    uint64_t responses;
    uint64_t n[OUTCOMES_KINDS];
    double revenue;
} outcomes_counts;

typedef struct outcomes_point {
    int64_t start_ms;
    outcomes_counts c;
} outcomes_point;

/* One series' counts over a range. Strings are copies owned by the result. */
typedef struct outcomes_row {
    char collection[AFF_MAX_NAME_LEN + 1];
    char surface[OUTCOMES_MAX_LABEL + 1];
    char strategy[OUTCOMES_MAX_LABEL + 1];
    char experiment[OUTCOMES_MAX_LABEL + 1];
    char arm[OUTCOMES_MAX_LABEL + 1];
    outcomes_counts c;
    outcomes_point *points; /* n_points, with step_ms > 0; owned by the result */
    uint32_t n_points;
} outcomes_row;

typedef struct outcomes_query {
    const char *collection; /* NULL or "": any */
    const char *surface;
    const char *experiment;
    int64_t from_ms, to_ms; /* bucket starts in [from, to] count; 0, 0: everything kept */
    uint32_t step_ms;       /* > 0: points per step (a multiple of OUTCOMES_BUCKET_MS up to
                               OUTCOMES_MAX_STEP_MS; checked here, named "step_s") */
} outcomes_query;

typedef struct outcomes_result {
    outcomes_row *rows;
    size_t n_rows;
    uint64_t unattributed[OUTCOMES_KINDS]; /* matching the collection filter and range */
    int64_t from_ms, to_ms;                /* the range used */
} outcomes_result;

/* Rows of the series matching q (series with no count in the range are left out), ordered by
 * collection, surface, experiment, arm, strategy. AFF_EINVAL names the bad field ("step_s",
 * "from_ms"); AFF_ENOMEM. Free with outcomes_result_free. */
int outcomes_query_run(aff_outcomes *o, const outcomes_query *q, outcomes_result *out,
                       aff_err *err);
void outcomes_result_free(outcomes_result *r);

/* Totals since start of every series, for the Prometheus scrape: fn runs once per series
 * (unattributed counts come as a row with every label "" but collection and strategy
 * OUTCOMES_UNATTRIBUTED), under the counts lock: keep it quick and do not call back in. */
typedef void (*outcomes_total_fn)(void *ctx, const outcomes_labels *labels,
                                  const outcomes_counts *c);
void outcomes_foreach_total(aff_outcomes *o, outcomes_total_fn fn, void *ctx);

/* Recommendations kept now, and bytes they and the series take. */
void outcomes_usage(aff_outcomes *o, size_t *records, size_t *bytes);

/* Whether s is a valid surface, strategy, experiment or arm name: 1..OUTCOMES_MAX_LABEL
 * bytes of [A-Za-z0-9_.:-]. */
bool outcomes_label_ok(const char *s);

/* Wilson score interval (95 %) for successes out of n; [0, 0] when n == 0. */
void outcomes_wilson(uint64_t successes, uint64_t n, double *low, double *high);

/* The canonical name of a kind ("impression", "click", "add_to_cart", "purchase"). */
const char *outcomes_kind_name(outcomes_kind kind);

#endif

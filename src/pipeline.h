/*
 * pipeline.h: the one place where a recommendation is decided, on plain C structs.
 *
 * Every serving call that ranks items for a shopper (Recommend, BatchRecommend, SimilarItems,
 * Rerank, and the popularity path for cold-start shoppers) runs the same steps:
 *
 *   plan        who the shopper is and which vector, against which engine collection (the
 *               "space"), answers: pipeline_user_source(); rules merged from a preset and the
 *               request and validated once, here
 *   candidates  the engine through the batcher (or popularity), over-fetched (k' > k) when
 *               rules, diversity or exploration need room; each promotion's query runs beside
 *               the organic one in the same engine pass (same vector, scored once); rules
 *               that starve (caps) get up to two deeper rounds; exploration adds the newest
 *               items
 *   filters     the request's filter runs inside the engine's scoring pass (any-of and
 *               none-of categories and tags, price, availability, exclusions)
 *   rules       boosts and buries, promotions with a reserved share, a cap per category,
 *               pins at exact positions
 *   diversity   MMR over the item vectors with weight lambda
 *   exploration a seeded share of slots from the candidates the ranking would not show
 *   reasons     one reason per hit (cheap: a few hundred dot products per call)
 *
 * Score rule for boosts: a candidate's adjusted score is
 *     ip, cosine:  score + sum of the weights of the boosts whose filter it passes
 *     l2:          score - that sum      (l2 scores are squared distances, lower first)
 * so a positive weight lifts an item and a negative weight buries it, in score units.
 *
 * Selection (pipeline_rank), with P pins, slots_j = round(share_j * k) per promotion and
 * x = round(exploration.share * k):
 *   1. promotions, in order: the best adjusted items passing the promotion's filter (and the
 *      request's) fill slots_j slots each, reason PROMOTED with the promotion's name;
 *   2. organic: greedy MMR over the remaining candidates until k - P - x items are chosen,
 *      mmr(c) = (1 - lambda) * rel(c) - lambda * max over chosen s of cos(c, s), with rel
 *      the adjusted score scaled to 0..1 over the candidates (lambda = 0: score order);
 *   3. exploration: x items drawn uniformly (splitmix64 with the request's seed) from the
 *      candidates not chosen (organic or explorable), those with novelty bits first when
 *      favour_novel is set, reason EXPLORATION;
 *   4. ordering: organic items keep their selection order; promoted and exploration items
 *      are merged in by adjusted score (placed before the first organic item they beat);
 *   5. pins are inserted at their exact 1-based positions, reason PINNED.
 * The category cap (max_per_category; 0 = none) holds for steps 1-3; items without a
 * category are never capped; pins are exempt. Promoted items count toward the cap. When the
 * candidates run out under the cap (after a deeper round), it gives way: the slots it would
 * leave empty are filled in score order.
 *
 * Threading: pipeline functions may be called from any thread. A started job's completion
 * runs on a batcher worker thread.
 */
#ifndef AFFINITY_PIPELINE_H
#define AFFINITY_PIPELINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "batcher.h"
#include "engine.h"
#include "experiments.h"
#include "exposure.h"
#include "model.h"
#include "outcomes.h"
#include "profiles.h"
#include "status.h"
#include "widgets.h"

typedef struct aff_pipeline aff_pipeline;

#define PIPELINE_MAX_BOOSTS     16
#define PIPELINE_MAX_PINS       64
#define PIPELINE_MAX_PROMOTIONS 8
#define PIPELINE_MAX_NAME_LEN   64 /* promotion and preset names */
#define PIPELINE_HISTORY_ITEMS  32 /* recent distinct history items considered for reasons */

/* Which part of the system produced a recommendation. Values match
 * affinity.v1.RecommendSource (the pipeline's own values are 10..19). */
typedef enum pipeline_source {
    PIPELINE_SOURCE_UNSPECIFIED = 0,
    PIPELINE_SOURCE_VECTOR = 1,     /* the request's vector */
    PIPELINE_SOURCE_PROFILE = 2,    /* the stored content profile of the user */
    PIPELINE_SOURCE_POPULARITY = 3, /* cold start */
    PIPELINE_SOURCE_ITEM = 10,      /* SimilarItems: the given item's vector */
    PIPELINE_SOURCE_MODEL = 20,     /* the learned model: the user's folded-in factor */
    /* widgets (30..39): PIPELINE_SOURCE_WIDGET + recipe, e.g. 33 for trending */
    PIPELINE_SOURCE_WIDGET = 29,
} pipeline_source;

/* Where a request ranks: values match affinity.v1.Space. */
typedef enum pipeline_space {
    PIPELINE_SPACE_AUTO = 0,      /* Recommend/Rerank: the model when it knows the user, else
                                     content; SimilarItems: content (behaviour when the
                                     collection has no content vectors) */
    PIPELINE_SPACE_CONTENT = 1,   /* the shop's vectors */
    PIPELINE_SPACE_BEHAVIOUR = 2, /* the learned factors (model.h) */
} pipeline_space;

/* Why an item is shown. Values match affinity.v1.ReasonKind. */
typedef enum pipeline_reason_kind {
    PIPELINE_REASON_UNSPECIFIED = 0,
    PIPELINE_REASON_SIMILAR_TO_HISTORY_ITEM = 1,   /* related_id: the nearest history item */
    PIPELINE_REASON_SIMILAR_TO_ITEM = 2,           /* related_id: the SimilarItems query item */
    PIPELINE_REASON_MATCHES_VECTOR = 3,            /* near the request's user vector */
    PIPELINE_REASON_LIKED_BY_SIMILAR_SHOPPERS = 4, /* a learned model answered */
    PIPELINE_REASON_POPULAR = 5,
    PIPELINE_REASON_TRENDING = 6,
    PIPELINE_REASON_PROMOTED = 7, /* promotion: the promotion's name */
    PIPELINE_REASON_PINNED = 8,
    PIPELINE_REASON_EXPLORATION = 9,
    PIPELINE_REASON_CALLER_SCORE = 20, /* Rerank: the caller's base score decided */
    /* widgets; trending items get PIPELINE_REASON_TRENDING */
    PIPELINE_REASON_BOUGHT_TOGETHER = 10, /* related_id: the context item */
    PIPELINE_REASON_ALSO_VIEWED = 11,     /* related_id: the context item */
    PIPELINE_REASON_ALSO_BOUGHT = 12,     /* related_id: the context item */
    PIPELINE_REASON_BOUGHT_BEFORE = 13,
    PIPELINE_REASON_RECENTLY_VIEWED = 14,
    PIPELINE_REASON_BEST_SELLER = 15,
} pipeline_reason_kind;

typedef struct pipeline_reason {
    pipeline_reason_kind kind;
    char related_id[AFF_MAX_ID_LEN + 1]; /* "" when none */
    const char *promotion;               /* PROMOTED: the name (borrowed from the job); NULL */
} pipeline_reason;

typedef struct pipeline_hit {
    char id[AFF_MAX_ID_LEN + 1];
    float score; /* the engine's (or popularity's) score, adjusted by boosts */
    pipeline_reason reason;
} pipeline_hit;

/* ---- rules -------------------------------------------------------------------------------- */

/* Who a rule is for: shopper traits (profiles_traits, computed from events) and the request's
 * context. Every part set must hold; pipeline_audience_init opens every part. */
typedef struct pipeline_audience {
    float min_price_sensitivity, max_price_sensitivity; /* 0..1 */
    float min_loyalty, min_activity, min_purchase_intent;
    const char *const *devices; /* any-of; n_devices == 0: any */
    uint32_t n_devices;
    const char *const *locales; /* any-of */
    uint32_t n_locales;
    int from_hour, to_hour; /* 0..23 inclusive, wrapping when from > to; -1: any hour */
} pipeline_audience;

void pipeline_audience_init(pipeline_audience *a);

/* The request's context, for audiences. */
typedef struct pipeline_context {
    const char *device; /* NULL or "": unknown */
    const char *locale;
    int hour; /* 0..23; -1: the server's hour now (UTC) */
} pipeline_context;

typedef struct pipeline_boost {
    aff_filter filter;                 /* items passing it get weight added (see the score rule) */
    float weight;                      /* finite; negative buries */
    const pipeline_audience *audience; /* NULL: everyone */
} pipeline_boost;

typedef struct pipeline_pin {
    const char *item_id;
    uint32_t position; /* 1..k */
} pipeline_pin;

typedef struct pipeline_promotion {
    const char *name; /* 1..PIPELINE_MAX_NAME_LEN bytes; reported in the hit's reason */
    aff_filter filter;
    float share;                       /* (0, 1]: round(share * k) slots are reserved */
    const pipeline_audience *audience; /* NULL: everyone */
} pipeline_promotion;

/* Rules of one request or preset. Arrays and strings are borrowed. A field is "set" when
 * has_* is true, so a request can override a preset's value with 0. */
typedef struct pipeline_rules {
    const pipeline_boost *boosts;
    uint32_t n_boosts;
    const pipeline_pin *pins;
    uint32_t n_pins;
    const pipeline_promotion *promotions;
    uint32_t n_promotions;
    bool has_max_per_category;
    uint32_t max_per_category; /* 0 = no cap */
    bool has_diversity;
    float diversity; /* MMR weight lambda, 0..1; 0 = off */
    bool has_exploration;
    float exploration_share;   /* 0..1 */
    uint64_t exploration_seed; /* 0: a fresh random seed (reported in the output) */
    /* What exploration favours (see "Exploration" in docs/pipeline.md); 0 = not a criterion:
     * items first upserted at most this many seconds ago ("new"; they also join the
     * candidates, up to PIPELINE_NEW_ITEMS of the newest), and items the server returned
     * fewer than this many times lately (decayed served count, exposure.h: "rarely shown") */
    uint32_t exploration_new_age_s;
    float exploration_rarely_shown_below;
} pipeline_rules;

/* Checks rules against k; field names in messages are those of affinity.v1.Rules prefixed
 * with `field` (e.g. "rules.promotions[1].share"). AFF_EINVAL when a rule is bad. */
int pipeline_validate_rules(const pipeline_rules *r, uint32_t k, const char *field, aff_err *err);

/* The engine queries a ranked request for k results under rules r makes (one definition: the
 * pipeline builds its queries from it, bench_pipeline's "rules' engine" mode sends the same
 * shape without the pipeline): the organic query's k and category cap (0: none; the rules'
 * cap, doubled when a boost may reorder a category's items) and every promotion query's k
 * (0: no promotion). Each k is at most AFF_MAX_K. */
typedef struct pipeline_query_shape {
    uint32_t organic_k, organic_cap, promotion_k;
} pipeline_query_shape;
pipeline_query_shape pipeline_query_shape_of(const pipeline_rules *r, uint32_t k);

/* ---- ranking on plain arrays (the core of the pipeline; used directly by tests) ----------- */

typedef struct pipeline_candidate {
    const char *id;
    float score;       /* as reported (engine or popularity score) */
    uint32_t category; /* 0 = none; equal ids = equal categories */
    /* bit 0: passes the request's filter; bit 1 + b: passes boost b's filter;
     * bit 1 + n_boosts + j: passes promotion j's filter */
    uint64_t matches;
    const float *vector; /* unit length for diversity; NULL when lambda is 0 */
    bool organic;        /* from the main query (else only from a promotion's query) */
    bool explorable;     /* not organic, but exploration may draw it (a new item) */
    uint8_t novelty;     /* PIPELINE_NOVEL_* bits: what exploration favours */
} pipeline_candidate;

#define PIPELINE_NOVEL_NEW  1u /* first upserted within exploration_new_age_s */
#define PIPELINE_NOVEL_RARE 2u /* served fewer than exploration_rarely_shown_below times */
#define PIPELINE_NEW_ITEMS  32 /* newest items added as exploration candidates, at most */

typedef struct pipeline_rank_input {
    const pipeline_rules *rules; /* validated; merged */
    uint32_t k;
    bool lower_is_better;            /* l2 */
    uint32_t dim;                    /* of the vectors */
    const pipeline_candidate *cands; /* distinct ids, organic ones in engine order */
    uint32_t n;
    /* pinned[i]: the candidate for rules->pins[i] (scored; may be outside cands), or NULL
     * when the pinned id is not in the collection (the pin is then skipped) */
    const pipeline_candidate *const *pinned;
    pipeline_reason_kind organic_reason;
    const char *organic_related; /* related id for organic hits, or NULL */
    uint64_t seed;               /* exploration */
    /* exploration draws from candidates with novelty bits first, then the others (set when a
     * rule names exploration_new_age_s or exploration_rarely_shown_below) */
    bool favour_novel;
    bool relax_cap; /* no deeper pool exists: fill slots the cap left empty in score order */
} pipeline_rank_input;

/* Selects and orders up to k hits (see the header comment). out has room for k. Organic
 * hits get organic_reason (callers refine it afterwards, e.g. the nearest history item).
 * Never fails: scratch space is bounded by n and k (AFF_ENOMEM only when malloc fails). */
int pipeline_rank(const pipeline_rank_input *in, pipeline_hit *out, uint32_t *n_out, aff_err *err);

/* ---- the service ------------------------------------------------------------------------- */

typedef struct pipeline_config {
    aff_engine *engine;     /* borrowed */
    batcher *batcher;       /* borrowed */
    aff_profiles *profiles; /* borrowed */
    aff_model *model;       /* learned models; NULL: none; borrowed */
    aff_exposure *exposure; /* item ages and served counts; NULL: none (no item counts as new
                               or rarely shown, nothing is counted); borrowed */
    aff_widgets *widgets;   /* widget statistics; NULL: widget recipes fail; borrowed */
    /* A JSON file of named rule presets ("serving configs"), or NULL/"": none. Re-read when
     * its modification time changes (checked at most once a second). Format: docs. */
    const char *presets_path;
    /* measurement: every answered recommendation is recorded here (its recommendation_id,
     * labels and items) for attribution; NULL: none; borrowed */
    aff_outcomes *outcomes;
} pipeline_config;

/* AFF_EINVAL when the presets file cannot be read or holds a bad preset (message names the
 * preset and field). */
int pipeline_create(aff_pipeline **out, const pipeline_config *cfg, aff_err *err);
void pipeline_destroy(aff_pipeline *p);

/* Re-reads the presets file now. On error the previous presets stay in force. */
int pipeline_reload_presets(aff_pipeline *p, aff_err *err);
/* Whether the presets in force have one named name (experiments_config.preset_exists). */
bool pipeline_has_preset(void *p, const char *name);
/* measurement: Recommend calls naming a surface are assigned an arm by the experiment running
 * there (experiments.h), which serves with the arm's preset, space, diversity and exploration
 * over the request's. Call before serving; ex is borrowed. */
void pipeline_attach_experiments(aff_pipeline *p, aff_experiments *ex);

typedef enum pipeline_kind {
    PIPELINE_RECOMMEND = 0, /* user_id or vector; k hits */
    PIPELINE_SIMILAR = 1,   /* item_ids; k hits each */
    PIPELINE_RERANK = 2,    /* user_id or vector; candidates re-ranked */
} pipeline_kind;

/* One request, borrowed by its job until pipeline_job_destroy. */
typedef struct pipeline_request {
    pipeline_kind kind;
    const char *collection;
    pipeline_space space; /* validated by pipeline_start: AUTO, CONTENT or BEHAVIOUR */
    const char *user_id;  /* RECOMMEND, RERANK: the stored shopper, or NULL */
    const float *vector;  /* RECOMMEND, RERANK: the shopper's vector when user_id is NULL */
    uint32_t dim;
    /* SIMILAR: the items; RECOMMEND with a widget recipe: its context (an item or a cart) */
    const char *const *item_ids;
    uint32_t n_item_ids;
    /* RECOMMEND: the candidate source; WIDGETS_RECIPE_PERSONALIZED (0): the shopper's model or
     * profile, else the widget (user_id optional or required by the recipe, vector unused) */
    widgets_recipe recipe;
    uint32_t k;
    const aff_filter *filter;       /* NULL: none */
    const int *exclude_event_types; /* affinity.v1.EventType values; user_id only */
    uint32_t n_exclude_event_types;
    const char *preset;              /* NULL or "": none */
    const pipeline_rules *rules;     /* NULL: none; applied over the preset */
    const pipeline_context *context; /* NULL: unknown device and locale, the hour now */
    /* RERANK */
    const char *const *candidate_ids;
    const float *base_scores;
    uint32_t n_candidates;
    float weight; /* 0..1 */
    /* measurement */
    const char *surface; /* where the answer is shown (metrics; experiments); NULL or "" */
    bool unrecorded;     /* not recorded for attribution (a page records itself whole) */
} pipeline_request;

/* The outcome of a job; valid once it finished. */
typedef struct pipeline_output {
    int status; /* AFF_OK, or the failure (err) */
    aff_err err;
    pipeline_source source;
    char recommendation_id[33];      /* 128 random bits, hex */
    uint64_t exploration_seed;       /* the seed used (0 when no exploration) */
    uint32_t n_results;              /* RECOMMEND: 1; SIMILAR: one per item id */
    const pipeline_hit *const *hits; /* n_results lists */
    const uint32_t *n_hits;
    /* RERANK */
    const aff_rerank_hit *rerank;
    const pipeline_reason *rerank_reasons; /* n_rerank, parallel to rerank */
    uint32_t n_rerank;
    bool rerank_without_profile; /* an unknown user: base scores only, affinity 0 */
    uint64_t queue_wait_ns;      /* time the candidates waited in the batcher */
    uint32_t rounds;             /* engine rounds: 1, or 2-3 when caps needed a deeper pool */
    /* measurement: what the metrics count the answer under; experiment and arm "" when no
     * experiment assigned it */
    char experiment[OUTCOMES_MAX_LABEL + 1];
    char arm[OUTCOMES_MAX_LABEL + 1];
    char strategy[OUTCOMES_MAX_LABEL + 1];
} pipeline_output;

typedef struct pipeline_job pipeline_job;
typedef void (*pipeline_done_fn)(pipeline_job *job, void *user);

/* Validates req completely, plans it and starts it. On failure nothing started, *out is NULL
 * and err says which field was wrong. On success *out is the job: when *pending, done(job,
 * user) runs exactly once later on a batcher thread; otherwise the output is ready now and
 * done never runs. The caller destroys the job after reading its output. */
int pipeline_start(aff_pipeline *p, const pipeline_request *req, int64_t deadline_ns,
                   pipeline_done_fn done, void *user, pipeline_job **out, bool *pending,
                   aff_err *err);
const pipeline_output *pipeline_job_output(const pipeline_job *job);
void pipeline_job_destroy(pipeline_job *job);

/* ---- pages ------------------------------------------------------------------------------- */

#define PIPELINE_MAX_SLOTS 16

/* One slot of a page: k items of a collection, with its own filter and rules. */
typedef struct pipeline_slot {
    const char *name;         /* 1..PIPELINE_MAX_NAME_LEN bytes */
    const char *collection;   /* the items shown in the slot */
    uint32_t k;               /* 1..AFF_MAX_K */
    const aff_filter *filter; /* NULL: none */
    const char *preset;       /* NULL or "": none */
    const pipeline_rules *rules;
    /* the slot's candidate source: the shopper's (default), or a widget that needs no item
     * ids (trending, best_sellers, buy_it_again, recently_viewed; layouts' "recipe") */
    widgets_recipe recipe;
} pipeline_slot;

/* A personalized page: explicit slots, or a layout named in the serving config (its "layouts"
 * member: {"layouts": {"home": [{"name": ..., "collection": ..., "k": ..., "preset": ...,
 * "recipe": ..., "filter": {...}}]}}). Borrowed by the page until pipeline_page_destroy. */
typedef struct pipeline_page_request {
    const char *user_id; /* the shopper; unknown shoppers get popular items in every slot */
    const pipeline_slot *slots;
    uint32_t n_slots; /* 0: use layout */
    const char *layout;
    const int *exclude_event_types; /* as pipeline_request; applied in every slot */
    uint32_t n_exclude_event_types;
    const pipeline_context *context;
    const char *surface; /* measurement: NULL or "": the layout's name, else "page" */
} pipeline_page_request;

typedef struct pipeline_page_output {
    int status; /* AFF_OK, or the first failure (err names the slot) */
    aff_err err;
    char recommendation_id[33];
    uint32_t n_slots;
    const pipeline_slot *slots;      /* resolved (the layout's when one was named) */
    const pipeline_hit *const *hits; /* per slot */
    const uint32_t *n_hits;
    const pipeline_source *sources;
} pipeline_page_output;

typedef struct pipeline_page pipeline_page;
typedef void (*pipeline_page_done_fn)(pipeline_page *page, void *user);

/* Fills every slot of a page in one call, one pipeline job (one engine query) per slot.
 * Slots of different collections run at once; slots of one collection run in slot order,
 * each with the items its collection's earlier slots show added to its exclusions, so no
 * item appears twice and every slot fills when the collection has enough items. A request
 * pin of an item shown earlier is dropped (the slot fills organically); a preset's pin of
 * such an item is dropped from the later slot after ranking. Every hit carries its reason.
 * Same contract as pipeline_start for errors, pending and done. */
int pipeline_page_start(aff_pipeline *p, const pipeline_page_request *req, int64_t deadline_ns,
                        pipeline_page_done_fn done, void *user, pipeline_page **out, bool *pending,
                        aff_err *err);
const pipeline_page_output *pipeline_page_output_of(const pipeline_page *page);
void pipeline_page_destroy(pipeline_page *page);

/* ---- the seam for shopper sources ---------------------------------------------------------- */

/* What answers for a shopper: the vector and the engine collection ("space") it is searched
 * against. POPULARITY has no vector. */
typedef struct pipeline_user_source {
    pipeline_source source;
    char space[AFF_MAX_NAME_LEN + 1];   /* engine collection searched with vector (a model's
                                           behaviour space is an internal collection) */
    char history[AFF_MAX_NAME_LEN + 1]; /* whose history explains the hits (reasons) */
    uint32_t dim;
    float *vector;               /* owned (free()); NULL for POPULARITY */
    pipeline_reason_kind reason; /* default reason of the hits it produces */
} pipeline_user_source;

/* Decides who answers for user_id in collection, in this order: the learned model (unless
 * space is CONTENT): the user's factor folded in from their current events, searched in the
 * model's behaviour space, reason LIKED_BY_SIMILAR_SHOPPERS (with space BEHAVIOUR and no factor,
 * popularity); the content profile of
 * ranked_by (another collection of the same dimension whose behaviour ranks this one, e.g.
 * products for banners; from the serving config's "collections"; NULL: none) searched
 * against collection; the user's own content profile in collection (plan, the profiles
 * module's snapshot of vector and exclusions already read for this request); for a
 * cold-start shopper in a ranked_by collection, the popularity-weighted mean vector of
 * ranked_by's popular items (source POPULARITY, searched); else popularity itself.
 * A learned model plugs in here first: look up the user's factor and, when found, answer
 * with its source, its factor space (an engine collection holding the item factors under the
 * same ids) and reason LIKED_BY_SIMILAR_SHOPPERS. */
int pipeline_user_source_resolve(aff_pipeline *p, const char *collection, const char *user_id,
                                 pipeline_space space, const char *ranked_by,
                                 const profiles_plan *plan, pipeline_user_source *out,
                                 aff_err *err);

#endif

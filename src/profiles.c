/*
 * profiles.c: owns event validation, type weights, the decay arithmetic of profiles and
 * popularity, and the filter evaluation of popularity answers. All state lives in the store
 * (see profiles.h for the formulas); this module holds only its frozen configuration, so it
 * needs no lock of its own.
 */
#include "profiles.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "strmap.h"

#define DAY_S           86400.0
#define FUTURE_SLACK_MS (24 * 3600 * 1000LL)

typedef struct type_weight {
    char name[STORE_MAX_TYPE_LEN + 1];
    float weight;
} type_weight;

struct aff_profiles {
    aff_store *store;
    type_weight types[4 + PROFILES_MAX_CUSTOM_TYPES]; /* built-ins first, in kind order */
    uint32_t n_types;
    double half_life_ms;
    double pop_half_life_ms;
    uint32_t history_len;
    uint32_t popular_scan_limit;
    int64_t (*now_ms)(void *ctx);
    void *now_ctx;
    profiles_observer observer;
    int64_t retention_ms; /* 0: no retention limit */
    struct recent_cache *recent; /* profiles_recent_items */
};

static int recent_cache_create(struct recent_cache **out);
static void recent_cache_destroy(struct recent_cache *c);
static void recent_forget(aff_profiles *p, const char *collection, const char *user);
static void recent_forget_all(aff_profiles *p);
static void recent_advance(aff_profiles *p, const char *collection, const char *user,
                           uint64_t first, const store_event *events, size_t k);

static const char *const builtin_names[AFF_EVENT_BUILTIN_COUNT] = {
#define PROFILES__EVENT_NAME(name, value, str, weight) [value - 1] = str,
    AFF_EVENT_TYPES(PROFILES__EVENT_NAME)
#undef PROFILES__EVENT_NAME
};

void profiles_config_init(profiles_config *cfg)
{
#define PROFILES__EVENT_WEIGHT(name, value, str, weight) [value - 1] = weight,
    static const float weights[AFF_EVENT_BUILTIN_COUNT] = {AFF_EVENT_TYPES(PROFILES__EVENT_WEIGHT)};
#undef PROFILES__EVENT_WEIGHT
    *cfg = (profiles_config){
        .weight_view = weights[PROFILES_EVENT_VIEW - 1],
        .weight_click = weights[PROFILES_EVENT_CLICK - 1],
        .weight_add_to_cart = weights[PROFILES_EVENT_ADD_TO_CART - 1],
        .weight_purchase = weights[PROFILES_EVENT_PURCHASE - 1],
        .half_life_s = 14 * DAY_S,
        .popularity_half_life_s = 7 * DAY_S,
        .history_len = 500,
        .popular_scan_limit = 10000,
    };
}

const char *profiles_event_kind_name(profiles_event_kind kind)
{
    if (kind >= PROFILES_EVENT_VIEW && kind <= PROFILES_EVENT_PURCHASE)
        return builtin_names[kind - PROFILES_EVENT_VIEW];
    return NULL;
}

static bool valid_weight(float w)
{
    return isfinite(w) && w >= 0.0f;
}

static bool valid_type_name(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > STORE_MAX_TYPE_LEN) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return false;
    }
    return true;
}

int profiles_create(aff_profiles **out, aff_store *store, const profiles_config *cfg, aff_err *err)
{
    profiles_config def;
    if (!cfg) {
        profiles_config_init(&def);
        cfg = &def;
    }
    *out = NULL;
    const float builtin[4] = {cfg->weight_view, cfg->weight_click, cfg->weight_add_to_cart,
                              cfg->weight_purchase};
    for (int i = 0; i < 4; i++) {
        if (!valid_weight(builtin[i]))
            return aff__fail(err, AFF_EINVAL, "profiles: weight of '%s' must be finite and ≥ 0",
                             builtin_names[i]);
    }
    if (!(cfg->half_life_s > 0 && isfinite(cfg->half_life_s)) ||
        !(cfg->popularity_half_life_s > 0 && isfinite(cfg->popularity_half_life_s)))
        return aff__fail(err, AFF_EINVAL, "profiles: half-lives must be positive");
    if (cfg->history_len == 0)
        return aff__fail(err, AFF_EINVAL, "profiles: history length must be at least 1");
    if (cfg->n_custom_types > PROFILES_MAX_CUSTOM_TYPES)
        return aff__fail(err, AFF_EINVAL, "profiles: at most %d custom event types",
                         PROFILES_MAX_CUSTOM_TYPES);
    aff_profiles *p = calloc(1, sizeof *p);
    if (!p) return aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    for (int i = 0; i < 4; i++) {
        strcpy(p->types[i].name, builtin_names[i]);
        p->types[i].weight = builtin[i];
    }
    p->n_types = 4;
    for (uint32_t i = 0; i < cfg->n_custom_types; i++) {
        const profiles_custom_type *ct = &cfg->custom_types[i];
        if (!valid_type_name(ct->name) || !valid_weight(ct->weight)) {
            free(p);
            return aff__fail(err, AFF_EINVAL,
                             "profiles: custom event type %u needs a name of 1..%d bytes of "
                             "[a-z0-9_] and a finite weight ≥ 0",
                             i, STORE_MAX_TYPE_LEN);
        }
        for (uint32_t j = 0; j < p->n_types; j++) {
            if (strcmp(p->types[j].name, ct->name) == 0) {
                free(p);
                return aff__fail(err, AFF_EINVAL, "profiles: event type '%s' defined twice",
                                 ct->name);
            }
        }
        strcpy(p->types[p->n_types].name, ct->name);
        p->types[p->n_types].weight = ct->weight;
        p->n_types++;
    }
    p->store = store;
    p->half_life_ms = cfg->half_life_s * 1000.0;
    p->pop_half_life_ms = cfg->popularity_half_life_s * 1000.0;
    p->history_len = cfg->history_len;
    p->retention_ms = cfg->retention_ms > 0 ? cfg->retention_ms : 0;
    p->popular_scan_limit = cfg->popular_scan_limit ? cfg->popular_scan_limit : 10000;
    p->now_ms = cfg->now_ms;
    p->now_ctx = cfg->now_ctx;
    p->observer = cfg->observer;
    if (recent_cache_create(&p->recent)) {
        free(p);
        return aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    }
    *out = p;
    return AFF_OK;
}

void profiles_destroy(aff_profiles *p)
{
    if (!p) return;
    recent_cache_destroy(p->recent);
    free(p);
}

static int64_t now_ms(const aff_profiles *p)
{
    if (p->now_ms) return p->now_ms(p->now_ctx);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* 2^(-dt/h): the factor an amount decays by over dt ms. */
static double decay(double dt_ms, double half_life_ms)
{
    return exp2(-dt_ms / half_life_ms);
}

static bool valid_id(const char *s, size_t max)
{
    size_t n = s ? strlen(s) : 0;
    return n >= 1 && n <= max;
}

static void normalize(float *v, uint32_t dim)
{
    double ss = 0;
    for (uint32_t i = 0; i < dim; i++)
        ss += (double)v[i] * v[i];
    if (ss > 0 && isfinite(ss)) {
        float inv = (float)(1.0 / sqrt(ss));
        for (uint32_t i = 0; i < dim; i++)
            v[i] *= inv;
    }
}

/* Adds amount w at time t to a decayed sum (sum may be NULL for a scalar-only sum). */
static void decayed_add(double half_life_ms, int64_t *ref_ms, double *weight, float *sum,
                        const float *x, uint32_t dim, double w, int64_t t)
{
    if (t >= *ref_ms) {
        double f = decay((double)(t - *ref_ms), half_life_ms);
        *weight = *weight * f + w;
        if (sum) {
            for (uint32_t i = 0; i < dim; i++)
                sum[i] = (float)(sum[i] * f + w * x[i]);
        }
        *ref_ms = t;
    } else {
        double g = w * decay((double)(*ref_ms - t), half_life_ms);
        *weight += g;
        if (sum) {
            for (uint32_t i = 0; i < dim; i++)
                sum[i] = (float)(sum[i] + g * x[i]);
        }
    }
}

/* ---- recomputation after deletes and re-upserts ------------------------------------------ */

typedef struct recompute_ctx {
    store_txn *txn;
    const aff_profiles *p;
    const store_collection *c;
    int64_t ref_ms;
    float *sum, *x;
    double weight;
    aff_err *err;
} recompute_ctx;

static int recompute_visit(void *ctx, const char *item, const store_interaction *in)
{
    recompute_ctx *r = ctx;
    int status = store_txn_get_item(r->txn, r->c->name, item, NULL, r->x, r->err);
    if (status == AFF_ENOTFOUND) {
        aff__err_clear(r->err);
        return 0; /* deleted: contributes nothing */
    }
    if (status) return status;
    if (r->c->metric == AFF_METRIC_COSINE) normalize(r->x, r->c->dim);
    double g = in->weight * decay((double)(r->ref_ms - in->ref_ms), r->p->half_life_ms);
    r->weight += g;
    for (uint32_t i = 0; i < r->c->dim; i++)
        r->sum[i] = (float)(r->sum[i] + g * r->x[i]);
    return 0;
}

/* Rebuilds prof's sum and weight from the user's per-item aggregates with the current item
 * vectors, at prof->ref_ms, and stamps the collection's generation. x: dim floats scratch. */
static int recompute_profile(store_txn *txn, const aff_profiles *p, const store_collection *c,
                             const char *user, store_profile *prof, float *sum, float *x,
                             aff_err *err)
{
    memset(sum, 0, (size_t)c->dim * sizeof *sum);
    recompute_ctx r = {txn, p, c, prof->ref_ms, sum, x, 0.0, err};
    int status = store_txn_scan_interactions(txn, c->name, user, recompute_visit, &r, err);
    if (status) return status;
    prof->weight = r.weight;
    prof->generation = c->generation;
    return AFF_OK;
}

/* ---- put events ----------------------------------------------------------------------------- */

/* One applied event's popularity term, w * 2^(t/H_pop) as its log2; written per item at the
 * end of the transaction (flush_popularity), so an item with many events in one call costs
 * one counter update. */
typedef struct pop_term {
    const char *item; /* borrowed from the call's events */
    double log_term;
    int64_t ts;
    size_t seq; /* order of application: ties in the sort keep it, so sums are deterministic */
} pop_term;

typedef struct put_ctx {
    aff_profiles *p;
    const char *collection;
    const char *user;                   /* profiles_put_events: the one user */
    const profiles_event *events;       /* profiles_put_events: n events of user */
    const profiles_user_event *uevents; /* profiles_import_events: n events of any users */
    size_t n;
    int64_t now;
    float *sum, *x;        /* AFF_MAX_DIM floats each */
    profiles_event *group; /* import: scratch for one user's run of events (n entries) */
    pop_term *pop;         /* n entries: the transaction's popularity terms */
    size_t n_pop;
    /* For the observer (NULL when none): each applied event as stored, its history sequence
     * number and its user, in application order (n entries). */
    store_event *done;
    uint64_t *done_seq;
    const char **done_user;
    size_t n_done;
    uint32_t applied, n_rejected;
    profiles_rejection *rejected;
} put_ctx;

static void reject(put_ctx *c, size_t i, const char *fmt, const char *arg)
{
    if (c->rejected) {
        profiles_rejection *r = &c->rejected[c->n_rejected];
        r->index = (uint32_t)i;
        snprintf(r->reason, sizeof r->reason, fmt, arg);
    }
    c->n_rejected++;
}

/* The configured type of an event, or NULL. */
static const type_weight *event_type(const aff_profiles *p, const profiles_event *e)
{
    if (e->type >= PROFILES_EVENT_VIEW && e->type <= PROFILES_EVENT_PURCHASE)
        return &p->types[e->type - PROFILES_EVENT_VIEW];
    if (e->type == PROFILES_EVENT_CUSTOM && e->custom_type) {
        for (uint32_t i = 4; i < p->n_types; i++) {
            if (strcmp(p->types[i].name, e->custom_type) == 0) return &p->types[i];
        }
    }
    return NULL;
}

static bool valid_context(const profiles_event *e)
{
    if (e->n_context > STORE_MAX_CONTEXT || (e->n_context && !e->context)) return false;
    for (uint32_t i = 0; i < e->n_context; i++) {
        const store_kv *kv = &e->context[i];
        if (!kv->key || !kv->value || !*kv->key || strlen(kv->key) > STORE_MAX_CONTEXT_LEN ||
            strlen(kv->value) > STORE_MAX_CONTEXT_LEN)
            return false;
    }
    return true;
}

static void count_type(store_profile *prof, const char *type)
{
    for (uint32_t i = 0; i < prof->n_counts; i++) {
        if (strcmp(prof->counts[i].type, type) == 0) {
            prof->counts[i].count++;
            return;
        }
    }
    if (prof->n_counts < STORE_MAX_EVENT_TYPES) {
        snprintf(prof->counts[prof->n_counts].type, sizeof prof->counts[0].type, "%s", type);
        prof->counts[prof->n_counts].count = 1;
        prof->n_counts++;
    }
}

/* log2(2^a + 2^b) without overflow; -INFINITY stands for an empty sum. */
static double log2_add(double a, double b)
{
    if (a == -INFINITY) return b;
    if (b == -INFINITY) return a;
    double hi = a > b ? a : b, lo = a > b ? b : a;
    return hi + log2(1.0 + exp2(lo - hi));
}

static int apply_event(store_txn *txn, put_ctx *c, const store_collection *col, const char *user,
                       store_profile *prof, const type_weight *tw, const profiles_event *e,
                       int64_t ts, aff_err *err)
{
    const aff_profiles *p = c->p;
    double w = tw->weight;
    int status;
    if (w > 0) {
        if (col->metric == AFF_METRIC_COSINE) normalize(c->x, col->dim);
        decayed_add(p->half_life_ms, &prof->ref_ms, &prof->weight, c->sum, c->x, col->dim, w, ts);
    } else if (ts > prof->ref_ms) {
        decayed_add(p->half_life_ms, &prof->ref_ms, &prof->weight, c->sum, c->x, col->dim, 0.0, ts);
    }

    store_interaction in = {.ref_ms = 0, .weight = 0, .last_ms = ts, .count = 0};
    status = store_txn_get_interaction(txn, c->collection, user, e->item_id, &in, err);
    if (status && status != AFF_ENOTFOUND) return status;
    decayed_add(p->half_life_ms, &in.ref_ms, &in.weight, NULL, NULL, 0, w, ts);
    in.count++;
    if (ts > in.last_ms) in.last_ms = ts;
    if ((status = store_txn_put_interaction(txn, c->collection, user, e->item_id, &in, err)) ||
        (status = store_txn_mark_type(txn, c->collection, user, tw->name, e->item_id, ts, err)))
        return status;

    if (w > 0) {
        c->pop[c->n_pop] = (pop_term){.item = e->item_id,
                                      .log_term = log2(w) + (double)ts / p->pop_half_life_ms,
                                      .ts = ts,
                                      .seq = c->n_pop};
        c->n_pop++;
    }

    store_event se = {.item_id = e->item_id,
                      .type = tw->name,
                      .ts_ms = ts,
                      .value = e->value,
                      .context = e->context,
                      .n_context = e->n_context};
    if ((status = store_txn_put_event(txn, c->collection, user, prof->next_seq, &se, err)))
        return status;
    if (c->done) {
        c->done[c->n_done] = se;
        c->done_seq[c->n_done] = prof->next_seq;
        c->done_user[c->n_done++] = user;
    }
    prof->next_seq++;
    prof->n_history++;
    while (prof->n_history > p->history_len) {
        uint64_t oldest = prof->next_seq - prof->n_history;
        if ((status = store_txn_delete_event(txn, c->collection, user, oldest, err))) return status;
        prof->n_history--;
    }
    count_type(prof, tw->name);
    if (ts > prof->last_event_ms) prof->last_event_ms = ts;
    return AFF_OK;
}

static int cmp_pop_term(const void *a, const void *b)
{
    const pop_term *x = a, *y = b;
    int d = strcmp(x->item, y->item);
    if (d) return d;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Adds the transaction's popularity terms to the items' counters, one update per item, in
 * item id order. */
static int flush_popularity(store_txn *txn, put_ctx *c, aff_err *err)
{
    qsort(c->pop, c->n_pop, sizeof *c->pop, cmp_pop_term);
    for (size_t i = 0, end; i < c->n_pop; i = end) {
        const char *item = c->pop[i].item;
        double log_sum = -INFINITY;
        int64_t last = c->pop[i].ts;
        for (end = i; end < c->n_pop && strcmp(c->pop[end].item, item) == 0; end++) {
            log_sum = log2_add(log_sum, c->pop[end].log_term);
            if (c->pop[end].ts > last) last = c->pop[end].ts;
        }
        store_popularity old, pop = {.log_score = -INFINITY, .count = 0, .last_ms = last};
        int status = store_txn_get_popularity(txn, c->collection, item, &old, err);
        if (status && status != AFF_ENOTFOUND) return status;
        bool had = status == AFF_OK;
        if (had) pop = old;
        pop.log_score = log2_add(pop.log_score, log_sum);
        pop.count += end - i;
        if (last > pop.last_ms) pop.last_ms = last;
        if ((status =
                 store_txn_put_popularity(txn, c->collection, item, had ? &old : NULL, &pop, err)))
            return status;
    }
    return AFF_OK;
}

/* Whether the user opted out in collection, or in every collection. */
static int opt_out_in(store_txn *txn, const char *collection, const char *user, bool *out,
                      aff_err *err)
{
    *out = false;
    const char *const scopes[2] = {collection, STORE_ALL_COLLECTIONS};
    for (int i = 0; i < 2; i++) {
        int status = store_txn_get_opt_out(txn, scopes[i], user, NULL, err);
        if (status == AFF_OK) {
            *out = true;
            return AFF_OK;
        }
        if (status != AFF_ENOTFOUND) return status;
        aff__err_clear(err);
    }
    return AFF_OK;
}

/* Why event e cannot be applied (checked before the store is read), or NULL; *arg receives
 * the reason's %s argument. */
static const char *event_problem(const put_ctx *c, const profiles_event *e, const type_weight *tw,
                                 int64_t ts, const char **arg)
{
    *arg = "";
    if (!valid_id(e->item_id, AFF_MAX_ID_LEN)) return "item id must be 1..128 bytes%s";
    if (e->custom_type && *e->custom_type && e->type != PROFILES_EVENT_CUSTOM) {
        *arg = e->custom_type;
        return "custom_type '%.64s' is set but type is not EVENT_TYPE_CUSTOM; set one or the "
               "other";
    }
    if (!tw) {
        if (e->type != PROFILES_EVENT_CUSTOM)
            return "event type must be view, click, add_to_cart, purchase or custom%s";
        if (!e->custom_type || !*e->custom_type)
            return "EVENT_TYPE_CUSTOM needs custom_type (a type configured with "
                   "--event-weights)%s";
        *arg = e->custom_type;
        return "custom event type '%.64s' is not configured on the server";
    }
    if (ts < 0 || ts > c->now + FUTURE_SLACK_MS)
        return "timestamp must be Unix milliseconds, not negative and at most one day ahead%s";
    if (c->p->retention_ms && ts < c->now - c->p->retention_ms)
        return "timestamp is older than the event retention period (--event-retention-days)%s";
    if (!isfinite(e->value)) return "value must be a finite number%s";
    if (!valid_context(e))
        return "context: at most 16 entries, keys 1..256 bytes, values ≤ 256 bytes%s";
    return NULL;
}

/* Applies n events of one user inside txn: reads the user's profile, applies each valid event
 * (rejecting the others with index first + i) and writes the profile back when any applied.
 * The one per-user path of profiles_put_events and profiles_import_events. */
static int apply_user_events(store_txn *txn, put_ctx *c, const store_collection *col,
                             const char *user, const profiles_event *events, size_t n, size_t first,
                             aff_err *err)
{
    const aff_profiles *p = c->p;
    store_profile prof;
    uint32_t applied = 0;
    bool opted_out = false;
    int status = opt_out_in(txn, c->collection, user, &opted_out, err);
    if (status) return status;
    if (opted_out) { /* no profile kept: nothing about the user is stored */
        for (size_t i = 0; i < n; i++)
            reject(c, first + i, "user '%.64s' opted out of personalization: the event is not stored",
                   user);
        return AFF_OK;
    }
    status = store_txn_get_profile(txn, c->collection, user, &prof, c->sum, err);
    if (status == AFF_ENOTFOUND) {
        memset(&prof, 0, sizeof prof);
        prof.dim = col->dim;
        prof.generation = col->generation;
        prof.ref_ms = 0;
        memset(c->sum, 0, (size_t)col->dim * sizeof(float));
        aff__err_clear(err);
    } else if (status) {
        return status;
    } else if (prof.dim != col->dim) {
        return aff__fail(err, AFF_EINTERNAL,
                         "profiles: profile of '%s' has dimension %u, the "
                         "collection %u",
                         user, prof.dim, col->dim);
    } else if (prof.generation != col->generation) {
        if ((status = recompute_profile(txn, p, col, user, &prof, c->sum, c->x, err)))
            return status;
    }

    for (size_t i = 0; i < n; i++) {
        const profiles_event *e = &events[i];
        const type_weight *tw = event_type(p, e);
        int64_t ts = e->timestamp_ms ? e->timestamp_ms : c->now;
        const char *arg, *problem = event_problem(c, e, tw, ts, &arg);
        if (problem) {
            reject(c, first + i, problem, arg);
            continue;
        }
        status = store_txn_get_item(txn, c->collection, e->item_id, NULL, c->x, err);
        if (status == AFF_ENOTFOUND) {
            aff__err_clear(err);
            reject(c, first + i, "unknown item id '%.120s'", e->item_id);
            continue;
        }
        if (status) return status;
        if ((status = apply_event(txn, c, col, user, &prof, tw, e, ts, err))) return status;
        applied++;
    }
    c->applied += applied;
    if (applied == 0) return AFF_OK; /* nothing to write for this user */
    return store_txn_put_profile(txn, c->collection, user, &prof, c->sum, err);
}

/* The applied events are recorded for the observer and for the recent items cache. */
static int observe_alloc(const aff_profiles *p, put_ctx *c, size_t n, aff_err *err)
{
    (void)p;
    c->done = malloc(n * sizeof *c->done);
    c->done_seq = malloc(n * sizeof *c->done_seq);
    c->done_user = malloc(n * sizeof *c->done_user);
    if (!c->done || !c->done_seq || !c->done_user)
        return aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    return AFF_OK;
}

static void observe_free(put_ctx *c)
{
    free(c->done);
    free(c->done_seq);
    free(c->done_user);
}

/* Tells the observer about the committed events, one call per run of one user's events. */
static void observe_applied(const aff_profiles *p, put_ctx *c)
{
    if (!c->done || !p->observer.applied) return;
    for (size_t i = 0, end; i < c->n_done; i = end) {
        for (end = i + 1; end < c->n_done && c->done_user[end] == c->done_user[i]; end++)
            ;
        p->observer.applied(p->observer.ctx, c->collection, c->done_user[i], c->done + i,
                            c->done_seq + i, end - i);
    }
}

/* One transaction for the whole call. profiles_put_events: its one user's events (the id was
 * checked); profiles_import_events: each run of consecutive events of one user goes through
 * apply_user_events (one profile read and write per run). With nothing applied the (empty)
 * transaction commits. */
static int put_events_fn(store_txn *txn, void *ctx, aff_err *err)
{
    put_ctx *c = ctx;
    c->applied = 0;
    c->n_rejected = 0;
    c->n_pop = 0;
    c->n_done = 0;
    store_collection col;
    int status = store_txn_get_collection(txn, c->collection, &col, err);
    if (status) return status;
    if (!c->uevents && (status = apply_user_events(txn, c, &col, c->user, c->events, c->n, 0, err)))
        return status;
    for (size_t i = 0, end; c->uevents && i < c->n; i = end) {
        const char *user = c->uevents[i].user_id;
        for (end = i + 1; end < c->n; end++) {
            const char *u = c->uevents[end].user_id;
            if (u != user && (!u || !user || strcmp(u, user) != 0)) break;
        }
        if (!valid_id(user, AFF_MAX_ID_LEN)) {
            for (size_t j = i; j < end; j++)
                reject(c, j, "user id must be 1..128 bytes%s", "");
            continue;
        }
        for (size_t j = i; j < end; j++)
            c->group[j - i] = c->uevents[j].event;
        if ((status = apply_user_events(txn, c, &col, user, c->group, end - i, i, err)))
            return status;
    }
    return flush_popularity(txn, c, err);
}

/* After a put committed (status AFF_OK) or failed: each user's cached recent items advance
 * by the applied events (one run of one user's events at a time, in application order);
 * after a failure they are forgotten. */
static void recent_after_put(put_ctx *c, int status)
{
    if (status == AFF_OK && c->done) {
        for (size_t i = 0, end; i < c->n_done; i = end) {
            for (end = i + 1; end < c->n_done && c->done_user[end] == c->done_user[i] &&
                              c->done_seq[end] == c->done_seq[end - 1] + 1;
                 end++)
                ;
            recent_advance(c->p, c->collection, c->done_user[i], c->done_seq[i], c->done + i,
                           end - i);
        }
        return;
    }
    for (size_t i = 0, end; c->uevents && i < c->n; i = end) {
        const char *user = c->uevents[i].user_id;
        for (end = i + 1; end < c->n; end++) {
            const char *u = c->uevents[end].user_id;
            if (u != user && (!u || !user || strcmp(u, user) != 0)) break;
        }
        if (user) recent_forget(c->p, c->collection, user);
    }
    if (!c->uevents) recent_forget(c->p, c->collection, c->user);
}

/* Runs put_events_fn for a checked call (c set up by the entry point) and reports its counts:
 * the one write path of profiles_put_events and profiles_import_events. */
static int put_events_run(put_ctx *c, uint32_t *n_applied, uint32_t *n_rejected, aff_err *err)
{
    int status = AFF_OK;
    c->now = now_ms(c->p);
    c->sum = malloc(2 * AFF_MAX_DIM * sizeof(float));
    c->pop = malloc(c->n * sizeof *c->pop);
    c->group = c->uevents ? malloc(c->n * sizeof *c->group) : NULL;
    if (!c->sum || !c->pop || (c->uevents && !c->group))
        status = aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    else if ((status = observe_alloc(c->p, c, c->n, err)) == AFF_OK) {
        c->x = c->sum + AFF_MAX_DIM;
        status = store_update(c->p->store, put_events_fn, c, err);
        recent_after_put(c, status);
        if (status == AFF_OK) observe_applied(c->p, c);
    }
    observe_free(c);
    if (n_applied) *n_applied = status ? 0 : c->applied;
    if (n_rejected) *n_rejected = status ? 0 : c->n_rejected;
    free(c->sum);
    free(c->pop);
    free(c->group);
    return status;
}

int profiles_put_events(aff_profiles *p, const char *collection, const char *user_id,
                        const profiles_event *events, size_t n, uint32_t *n_applied,
                        profiles_rejection *rejected, uint32_t *n_rejected, aff_err *err)
{
    if (n_applied) *n_applied = 0;
    if (n_rejected) *n_rejected = 0;
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    if (n == 0 || n > PROFILES_MAX_EVENTS || !events)
        return aff__fail(err, AFF_EINVAL, "a call carries 1..%d events, not %zu",
                         PROFILES_MAX_EVENTS, n);
    put_ctx c = {.p = p,
                 .collection = collection,
                 .user = user_id,
                 .events = events,
                 .n = n,
                 .rejected = rejected};
    return put_events_run(&c, n_applied, n_rejected, err);
}

int profiles_import_events(aff_profiles *p, const char *collection,
                           const profiles_user_event *events, size_t n, uint32_t *n_applied,
                           profiles_rejection *rejected, uint32_t *n_rejected, aff_err *err)
{
    if (n_applied) *n_applied = 0;
    if (n_rejected) *n_rejected = 0;
    if (n == 0 || n > PROFILES_MAX_IMPORT_EVENTS || !events)
        return aff__fail(err, AFF_EINVAL, "an import message carries 1..%d events, not %zu",
                         PROFILES_MAX_IMPORT_EVENTS, n);
    put_ctx c = {.p = p, .collection = collection, .uevents = events, .n = n, .rejected = rejected};
    return put_events_run(&c, n_applied, n_rejected, err);
}

/* ---- recent items cache (profiles_recent_items) ------------------------------------------ */

#define RECENT_STRIPES 64 /* slot s is guarded by mu[s % RECENT_STRIPES] */

typedef struct recent_slot {
    uint64_t hash; /* of collection and user */
    char *blob;    /* NULL: empty; else collection \0 user \0 then n ids, each \0-terminated */
    uint32_t n;
    /* The history the answer is of: events [next_seq - n_hist, next_seq), every one of them
     * held (gapless; a put then advances the entry instead of dropping it). */
    bool gapless;
    uint32_t n_hist;
    uint64_t next_seq;
    uint64_t seq[PROFILES_RECENT_ITEMS]; /* item i's newest event */
} recent_slot;

typedef struct recent_cache {
    pthread_mutex_t mu[RECENT_STRIPES];
    /* Bumped (under mu) by every write that changes entries of the stripe: a miss stores its
     * answer only if its stripe's gen is unchanged since before its read snapshot. */
    uint64_t gen[RECENT_STRIPES];
    recent_slot slot[PROFILES_RECENT_SLOTS];
} recent_cache;

static uint64_t recent_hash(const char *collection, const char *user)
{
    uint64_t h = 1469598103934665603u;
    for (const char *s = collection; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211u;
    h = (h ^ 0xffu) * 1099511628211u; /* separator: no byte of a name or id */
    for (const char *s = user; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211u;
    return h;
}

static bool recent_is(const recent_slot *s, uint64_t h, const char *collection, const char *user)
{
    if (!s->blob || s->hash != h || strcmp(s->blob, collection) != 0) return false;
    return strcmp(s->blob + strlen(s->blob) + 1, user) == 0;
}

/* A slot's blob for these ids (NULL when out of memory). */
static char *recent_blob(const char *collection, const char *user, const char *const *ids,
                         uint32_t n)
{
    size_t lc = strlen(collection) + 1, lu = strlen(user) + 1, len[PROFILES_RECENT_ITEMS];
    size_t total = lc + lu;
    for (uint32_t i = 0; i < n; i++)
        total += len[i] = strlen(ids[i]) + 1;
    char *blob = malloc(total), *w = blob;
    if (!blob) return NULL;
    memcpy(w, collection, lc);
    memcpy(w += lc, user, lu);
    w += lu;
    for (uint32_t i = 0; i < n; i++) {
        memcpy(w, ids[i], len[i]);
        w += len[i];
    }
    return blob;
}

/* The slot's ids, pointing into its blob. */
static void recent_ids(const recent_slot *s, const char **ids)
{
    const char *id = s->blob + strlen(s->blob) + 1;
    id += strlen(id) + 1;
    for (uint32_t i = 0; i < s->n; i++) {
        ids[i] = id;
        id += strlen(id) + 1;
    }
}

static int recent_cache_create(recent_cache **out)
{
    recent_cache *c = calloc(1, sizeof *c);
    if (!c) return AFF_ENOMEM;
    for (int i = 0; i < RECENT_STRIPES; i++)
        pthread_mutex_init(&c->mu[i], NULL);
    *out = c;
    return AFF_OK;
}

static void recent_cache_destroy(recent_cache *c)
{
    if (!c) return;
    for (int i = 0; i < RECENT_STRIPES; i++)
        pthread_mutex_destroy(&c->mu[i]);
    for (size_t i = 0; i < PROFILES_RECENT_SLOTS; i++)
        free(c->slot[i].blob);
    free(c);
}

/* After a write of (collection, user)'s events committed: removes the entry. */
static void recent_forget(aff_profiles *p, const char *collection, const char *user)
{
    recent_cache *c = p->recent;
    uint64_t h = recent_hash(collection, user);
    size_t at = h % PROFILES_RECENT_SLOTS, st = at % RECENT_STRIPES;
    char *old = NULL;
    pthread_mutex_lock(&c->mu[st]);
    c->gen[st]++;
    if (recent_is(&c->slot[at], h, collection, user)) {
        old = c->slot[at].blob;
        c->slot[at].blob = NULL;
    }
    pthread_mutex_unlock(&c->mu[st]);
    free(old);
}

/* After a write that may touch any collection's entries of a user: removes every entry. */
static void recent_forget_all(aff_profiles *p)
{
    recent_cache *c = p->recent;
    for (size_t st = 0; st < RECENT_STRIPES; st++) {
        pthread_mutex_lock(&c->mu[st]);
        c->gen[st]++;
        for (size_t at = st; at < PROFILES_RECENT_SLOTS; at += RECENT_STRIPES) {
            free(c->slot[at].blob);
            c->slot[at].blob = NULL;
        }
        pthread_mutex_unlock(&c->mu[st]);
    }
}

/* After a put of k events of (collection, user) committed with sequence numbers first ..
 * first + k - 1 (events[i] has first + i): the entry, when it holds the history just before
 * them, advances to the answer a scan would give now (the new items first, newest first, then
 * the older ones still within the newest PROFILES_RECENT_EVENTS events, at most
 * PROFILES_RECENT_ITEMS); any other entry of the user is removed. */
static void recent_advance(aff_profiles *p, const char *collection, const char *user,
                           uint64_t first, const store_event *events, size_t k)
{
    recent_cache *c = p->recent;
    uint64_t h = recent_hash(collection, user);
    size_t at = h % PROFILES_RECENT_SLOTS, st = at % RECENT_STRIPES;
    recent_slot *s = &c->slot[at];
    char *old = NULL;
    pthread_mutex_lock(&c->mu[st]);
    c->gen[st]++;
    if (recent_is(s, h, collection, user)) {
        const char *was[PROFILES_RECENT_ITEMS]; /* into old, freed below */
        recent_ids(s, was);
        old = s->blob;
        s->blob = NULL;
        if (s->gapless && s->next_seq == first) {
            uint64_t next = first + k;
            uint32_t n_hist = (uint32_t)(s->n_hist + k < p->history_len ? s->n_hist + k
                                                                         : p->history_len);
            uint64_t window = n_hist < PROFILES_RECENT_EVENTS ? n_hist : PROFILES_RECENT_EVENTS;
            const char *ids[PROFILES_RECENT_ITEMS];
            uint64_t seq[PROFILES_RECENT_ITEMS];
            uint32_t m = 0;
            for (size_t i = k; i > 0 && m < PROFILES_RECENT_ITEMS; i--) {
                uint64_t q = first + i - 1;
                if (q + window < next) break; /* outside the window (and so is the rest) */
                bool dup = false;
                for (uint32_t t = 0; t < m && !dup; t++)
                    dup = strcmp(ids[t], events[i - 1].item_id) == 0;
                if (dup) continue;
                seq[m] = q;
                ids[m++] = events[i - 1].item_id;
            }
            for (uint32_t i = 0; i < s->n && m < PROFILES_RECENT_ITEMS; i++) {
                if (s->seq[i] + window < next) break; /* older ones are outside too */
                bool dup = false;
                for (uint32_t t = 0; t < m && !dup; t++)
                    dup = strcmp(ids[t], was[i]) == 0;
                if (dup) continue;
                seq[m] = s->seq[i];
                ids[m++] = was[i];
            }
            if ((s->blob = recent_blob(collection, user, ids, m))) {
                s->n = m;
                s->n_hist = n_hist;
                s->next_seq = next;
                memcpy(s->seq, seq, m * sizeof *seq);
            }
        }
    }
    pthread_mutex_unlock(&c->mu[st]);
    free(old);
}

/* The newest events in a ring, for profiles_recent_items' miss. */
typedef struct recent_ring {
    char (*ids)[AFF_MAX_ID_LEN + 1]; /* PROFILES_RECENT_EVENTS */
    uint64_t seq[PROFILES_RECENT_EVENTS];
    uint64_t seen;
    const char *collection, *user;
    store_profile prof;
    bool found;
} recent_ring;

static int recent_visit(void *ctx, uint64_t seq, const store_event *e)
{
    recent_ring *r = ctx;
    char *slot = r->ids[r->seen % PROFILES_RECENT_EVENTS];
    size_t len = strnlen(e->item_id, AFF_MAX_ID_LEN);
    memcpy(slot, e->item_id, len);
    slot[len] = 0;
    r->seq[r->seen % PROFILES_RECENT_EVENTS] = seq;
    r->seen++;
    return 0;
}

static int recent_fn(store_txn *txn, void *ctx, aff_err *err)
{
    recent_ring *r = ctx;
    r->seen = 0;
    r->found = false;
    int status = store_txn_get_profile(txn, r->collection, r->user, &r->prof, NULL, err);
    if (status == AFF_ENOTFOUND) {
        aff__err_clear(err);
        return AFF_OK;
    }
    if (status) return status;
    r->found = true;
    return store_txn_scan_events(txn, r->collection, r->user, recent_visit, r, err);
}

int profiles_recent_items(aff_profiles *p, const char *collection, const char *user_id,
                          char (*out)[AFF_MAX_ID_LEN + 1], uint32_t *n, aff_err *err)
{
    *n = 0;
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    recent_cache *c = p->recent;
    uint64_t h = recent_hash(collection, user_id);
    size_t at = h % PROFILES_RECENT_SLOTS, st = at % RECENT_STRIPES;
    pthread_mutex_lock(&c->mu[st]);
    uint64_t gen0 = c->gen[st];
    const recent_slot *s = &c->slot[at];
    if (recent_is(s, h, collection, user_id)) {
        const char *ids[PROFILES_RECENT_ITEMS];
        recent_ids(s, ids);
        for (uint32_t i = 0; i < s->n; i++)
            memcpy(out[i], ids[i], strlen(ids[i]) + 1);
        *n = s->n;
        pthread_mutex_unlock(&c->mu[st]);
        return AFF_OK;
    }
    pthread_mutex_unlock(&c->mu[st]);

    /* A miss: the profile and the newest events from the store, then the distinct items,
     * newest first. */
    recent_ring *r = malloc(sizeof *r);
    char(*ring)[AFF_MAX_ID_LEN + 1] = malloc(PROFILES_RECENT_EVENTS * sizeof *ring);
    if (!r || !ring) {
        free(r);
        free(ring);
        return aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    }
    *r = (recent_ring){.ids = ring, .collection = collection, .user = user_id};
    int status = store_view(p->store, recent_fn, r, err);
    if (status == AFF_ENOTFOUND) { /* an unknown collection: no history */
        aff__err_clear(err);
        status = AFF_OK;
    }
    uint32_t m = 0;
    const char *ids[PROFILES_RECENT_ITEMS];
    uint64_t seq[PROFILES_RECENT_ITEMS];
    for (uint64_t q = r->seen; !status && q > 0 && q + PROFILES_RECENT_EVENTS > r->seen &&
                              m < PROFILES_RECENT_ITEMS;
         q--) {
        const char *id = ring[(q - 1) % PROFILES_RECENT_EVENTS];
        bool dup = false;
        for (uint32_t i = 0; i < m && !dup; i++)
            dup = strcmp(out[i], id) == 0;
        if (dup) continue;
        memcpy(out[m], id, strlen(id) + 1);
        seq[m] = r->seq[(q - 1) % PROFILES_RECENT_EVENTS];
        ids[m] = out[m];
        m++;
    }
    *n = m;
    /* Stored (for a known user) only when no write of this stripe committed since the lookup
     * above: the answer may come from a snapshot older than that write. Best effort: without
     * memory, no entry. */
    char *blob = !status && r->found ? recent_blob(collection, user_id, ids, m) : NULL;
    if (blob) {
        pthread_mutex_lock(&c->mu[st]);
        if (c->gen[st] == gen0) {
            recent_slot *w = &c->slot[at];
            char *old = w->blob;
            *w = (recent_slot){.hash = h,
                               .blob = blob,
                               .n = m,
                               .gapless = r->seen == r->prof.n_history,
                               .n_hist = r->prof.n_history,
                               .next_seq = r->prof.next_seq};
            memcpy(w->seq, seq, m * sizeof *seq);
            blob = old;
        }
        pthread_mutex_unlock(&c->mu[st]);
        free(blob);
    }
    free(ring);
    free(r);
    return status;
}

/* ---- reading profiles ------------------------------------------------------------------------ */

typedef struct id_list {
    const char **ptrs;
    size_t n, cap;
    char *chars;
    size_t chars_n, chars_cap;
} id_list;

/* Appends an id; pointers are fixed up by id_list_finish (chars may move while growing). */
static int id_list_add(id_list *l, const char *id)
{
    size_t len = strlen(id) + 1;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        const char **np = realloc(l->ptrs, cap * sizeof *np);
        if (!np) return AFF_ENOMEM;
        l->ptrs = np;
        l->cap = cap;
    }
    if (l->chars_n + len > l->chars_cap) {
        size_t cap = l->chars_cap ? l->chars_cap * 2 : 4096;
        while (cap < l->chars_n + len)
            cap *= 2;
        char *nc = realloc(l->chars, cap);
        if (!nc) return AFF_ENOMEM;
        l->chars = nc;
        l->chars_cap = cap;
    }
    memcpy(l->chars + l->chars_n, id, len);
    l->ptrs[l->n++] = (const char *)(uintptr_t)l->chars_n; /* offset until finished */
    l->chars_n += len;
    return AFF_OK;
}

static void id_list_finish(id_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        l->ptrs[i] = l->chars + (uintptr_t)l->ptrs[i];
}

static void id_list_free(id_list *l)
{
    free(l->ptrs);
    free(l->chars);
    *l = (id_list){0};
}

static int id_visit(void *ctx, const char *id)
{
    return id_list_add(ctx, id);
}

typedef struct plan_ctx {
    aff_profiles *p;
    const char *collection, *user;
    const char *const *types;
    size_t n_types;
    uint32_t dim;     /* out */
    float *vector;    /* out: AFF_MAX_DIM floats */
    float *x;         /* scratch */
    bool has_vector;  /* out */
    bool want_vector; /* false: exclusions only */
    id_list ids;      /* out */
} plan_ctx;

/* Reads the user's normalized profile vector into c->vector (recomputing a stale one in
 * memory) and sets has_vector when it is usable. */
static int read_vector(store_txn *txn, plan_ctx *c, const store_collection *col, aff_err *err)
{
    store_profile prof;
    c->has_vector = false;
    int status = store_txn_get_profile(txn, c->collection, c->user, &prof, c->vector, err);
    if (status == AFF_ENOTFOUND) {
        aff__err_clear(err);
        return AFF_OK;
    }
    if (status) return status;
    if (prof.dim != col->dim)
        return AFF_OK; /* cannot happen: dropping a collection erases its profiles */
    if (prof.generation != col->generation &&
        (status = recompute_profile(txn, c->p, col, c->user, &prof, c->vector, c->x, err)))
        return status;
    double ss = 0;
    for (uint32_t i = 0; i < col->dim; i++)
        ss += (double)c->vector[i] * c->vector[i];
    if (!(ss > 0) || !isfinite(ss)) return AFF_OK;
    normalize(c->vector, col->dim);
    c->has_vector = true;
    return AFF_OK;
}

static int plan_fn(store_txn *txn, void *ctx, aff_err *err)
{
    plan_ctx *c = ctx;
    id_list_free(&c->ids);
    store_collection col;
    int status = store_txn_get_collection(txn, c->collection, &col, err);
    if (status) return status;
    c->dim = col.dim;
    if (c->want_vector && (status = read_vector(txn, c, &col, err))) return status;
    for (size_t i = 0; i < c->n_types; i++) {
        if (!valid_type_name(c->types[i]))
            return aff__fail(err, AFF_EINVAL, "exclude event type '%s' is not a type name",
                             c->types[i] ? c->types[i] : "(null)");
        status =
            store_txn_scan_type(txn, c->collection, c->user, c->types[i], id_visit, &c->ids, err);
        if (status == AFF_ENOMEM)
            return aff__fail(err, AFF_ENOMEM, "profiles: out of memory for exclusions");
        if (status) return status;
    }
    return AFF_OK;
}

void profiles_plan_release(profiles_plan *plan)
{
    if (!plan) return;
    free(plan->vector);
    free(plan->exclude_ids);
    free(plan->id_storage);
    memset(plan, 0, sizeof *plan);
}

static void filter_open(aff_filter *f)
{
    memset(f, 0, sizeof *f);
    f->price_min = -INFINITY;
    f->price_max = INFINITY;
}

int profiles_plan_recommend(aff_profiles *p, const char *collection, const char *user_id,
                            const char *const *exclude_types, size_t n_exclude_types,
                            const aff_filter *filter, profiles_plan *out, aff_err *err)
{
    memset(out, 0, sizeof *out);
    plan_ctx c = {.p = p,
                  .collection = collection,
                  .user = user_id,
                  .types = exclude_types,
                  .n_types = n_exclude_types,
                  .want_vector = true};
    int status = AFF_OK;
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    c.vector = malloc(2 * AFF_MAX_DIM * sizeof(float));
    if (!c.vector) {
        status = aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
        goto out;
    }
    c.x = c.vector + AFF_MAX_DIM;
    if ((status = store_view(p->store, plan_fn, &c, err))) goto out;
    id_list_finish(&c.ids);

    out->dim = c.dim;
    out->source = c.has_vector ? PROFILES_SOURCE_PROFILE : PROFILES_SOURCE_POPULARITY;
    if (c.has_vector) {
        out->vector = malloc((size_t)c.dim * sizeof(float));
        if (!out->vector) {
            status = aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
            goto out;
        }
        memcpy(out->vector, c.vector, (size_t)c.dim * sizeof(float));
    }
    if (filter)
        out->filter = *filter;
    else
        filter_open(&out->filter);
    uint32_t n_req = filter ? filter->n_exclude_ids : 0;
    if (c.ids.n) {
        size_t total = (size_t)n_req + c.ids.n;
        out->exclude_ids = malloc(total * sizeof *out->exclude_ids);
        if (!out->exclude_ids || total > UINT32_MAX) {
            status = aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
            goto out;
        }
        for (uint32_t i = 0; i < n_req; i++)
            out->exclude_ids[i] = filter->exclude_ids[i];
        memcpy(out->exclude_ids + n_req, c.ids.ptrs, c.ids.n * sizeof *c.ids.ptrs);
        out->id_storage = c.ids.chars;
        c.ids.chars = NULL;
        out->n_excluded = (uint32_t)c.ids.n;
        out->filter.exclude_ids = out->exclude_ids;
        out->filter.n_exclude_ids = (uint32_t)total;
    }
out:
    if (status) profiles_plan_release(out);
    id_list_free(&c.ids);
    free(c.vector);
    return status;
}

int profiles_user_vector(aff_profiles *p, const char *collection, const char *user_id,
                         float *vector, uint32_t dim, bool *found, aff_err *err)
{
    *found = false;
    plan_ctx c = {.p = p, .collection = collection, .user = user_id, .want_vector = true};
    int status = AFF_OK;
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    c.vector = malloc(2 * AFF_MAX_DIM * sizeof(float));
    if (!c.vector) return aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    c.x = c.vector + AFF_MAX_DIM;
    if ((status = store_view(p->store, plan_fn, &c, err))) goto out;
    if (c.dim != dim) {
        status = aff__fail(err, AFF_EINVAL, "collection '%s' has dimension %u, not %u", collection,
                           c.dim, dim);
        goto out;
    }
    if (c.has_vector) {
        memcpy(vector, c.vector, (size_t)dim * sizeof(float));
        *found = true;
    }
out:
    id_list_free(&c.ids);
    free(c.vector);
    return status;
}

/* ---- popularity ------------------------------------------------------------------------------ */

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

typedef struct popular_ctx {
    aff_profiles *p;
    const char *collection;
    uint32_t k;
    const aff_filter *filter;
    const char **excluded; /* sorted */
    size_t n_excluded;
    double now_units; /* now / popularity half-life */
    aff_hit *hits;   /* best first: log_scores descending, ties by id */
    double *logs;    /* k: hits[i]'s log_score */
    uint32_t n_hits, scanned;
    store_txn *txn;
    item_record rec;
    aff_err *err;
} popular_ctx;

static bool any_of(const char *s, const char *const *set, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        if (set[i] && strcmp(s, set[i]) == 0) return true;
    }
    return false;
}

/* The engine's aff_filter semantics on a stored item (exclusions are checked separately). */
static bool filter_passes(const aff_filter *f, const item_record *r)
{
    if (!f) return true;
    if (f->available_only && !r->available) return false;
    if (!(r->price >= f->price_min && r->price <= f->price_max)) return false;
    if (f->n_categories &&
        (!r->category[0] || !any_of(r->category, f->categories, f->n_categories)))
        return false;
    if (f->n_tags) {
        bool any = false;
        for (uint32_t i = 0; i < r->n_tags && !any; i++)
            any = any_of(r->tags[i], f->tags, f->n_tags);
        if (!any) return false;
    }
    if (f->n_exclude_categories && r->category[0] &&
        any_of(r->category, f->exclude_categories, f->n_exclude_categories))
        return false;
    for (uint32_t i = 0; i < r->n_tags && f->n_exclude_tags; i++)
        if (any_of(r->tags[i], f->exclude_tags, f->n_exclude_tags)) return false;
    return true;
}

/* Is (log_score a, id x) ranked before (b, y)? */
static bool popular_before(double a, const char *x, double b, const char *y)
{
    return a > b || (a == b && strcmp(x, y) < 0);
}

/* Visits the ranking index best filing score first and keeps the best k that pass: an item's
 * score is below its filing score + STORE_POP_RANK_SLACK, so once that is at most the k-th
 * best score held, no later item can enter. */
static int popular_visit(void *ctx, const char *item, const store_popularity *pop)
{
    popular_ctx *c = ctx;
    if (c->scanned++ >= c->p->popular_scan_limit) return 1;
    const bool full = c->n_hits == c->k;
    if (full && pop->rank_log_score + STORE_POP_RANK_SLACK <= c->logs[c->k - 1]) return 1;
    if (full && !popular_before(pop->log_score, item, c->logs[c->k - 1], c->hits[c->k - 1].id))
        return 0;
    if (c->n_excluded &&
        bsearch(&item, c->excluded, c->n_excluded, sizeof *c->excluded, cmp_str_ptr))
        return 0;
    int status = store_txn_get_item(c->txn, c->collection, item, &c->rec, NULL, c->err);
    if (status == AFF_ENOTFOUND) {
        aff__err_clear(c->err);
        return 0;
    }
    if (status) return status;
    if (!filter_passes(c->filter, &c->rec)) return 0;
    uint32_t at = full ? c->k - 1 : c->n_hits++; /* the worst leaves when full */
    for (; at > 0 && popular_before(pop->log_score, item, c->logs[at - 1], c->hits[at - 1].id);
         at--) {
        c->hits[at] = c->hits[at - 1];
        c->logs[at] = c->logs[at - 1];
    }
    c->logs[at] = pop->log_score;
    aff_hit *h = &c->hits[at];
    h->score = (float)exp2(pop->log_score - c->now_units);
    snprintf(h->id, sizeof h->id, "%s", item);
    return 0;
}

static int popular_fn(store_txn *txn, void *ctx, aff_err *err)
{
    popular_ctx *c = ctx;
    c->n_hits = 0;
    c->scanned = 0;
    c->txn = txn;
    c->err = err;
    store_collection col;
    int status = store_txn_get_collection(txn, c->collection, &col, err);
    if (status) return status;
    return store_txn_scan_popular(txn, c->collection, popular_visit, c, err);
}

int profiles_popular(aff_profiles *p, const char *collection, uint32_t k, const aff_filter *filter,
                     aff_hit *hits, uint32_t *n_hits, aff_err *err)
{
    *n_hits = 0;
    if (k == 0 || k > AFF_MAX_K)
        return aff__fail(err, AFF_EINVAL, "k must be 1..%d, not %u", AFF_MAX_K, k);
    if (filter && (isnan(filter->price_min) || isnan(filter->price_max) ||
                   filter->price_min > filter->price_max))
        return aff__fail(err, AFF_EINVAL, "filter price bounds must be numbers with min ≤ max");
    popular_ctx c = {.p = p,
                     .collection = collection,
                     .k = k,
                     .filter = filter,
                     .now_units = (double)now_ms(p) / p->pop_half_life_ms,
                     .hits = hits};
    int status = AFF_OK;
    c.logs = malloc(k * sizeof *c.logs);
    if (!c.logs) return aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    if (filter && filter->n_exclude_ids) {
        c.excluded = malloc(filter->n_exclude_ids * sizeof *c.excluded);
        if (!c.excluded) {
            free(c.logs);
            return aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
        }
        for (uint32_t i = 0; i < filter->n_exclude_ids; i++) {
            if (filter->exclude_ids[i]) c.excluded[c.n_excluded++] = filter->exclude_ids[i];
        }
        qsort(c.excluded, c.n_excluded, sizeof *c.excluded, cmp_str_ptr);
    }
    status = store_view(p->store, popular_fn, &c, err);
    *n_hits = status ? 0 : c.n_hits;
    free(c.excluded);
    free(c.logs);
    return status;
}

/* ---- GetUser, DeleteUser, history -------------------------------------------------------------
 */

typedef struct category_acc {
    strmap *index; /* category -> position in cats */
    profiles_category_weight *cats;
    double *weights;
    size_t n, cap;
    double total;
} category_acc;

typedef struct user_ctx {
    aff_profiles *p;
    const char *collection, *user;
    int64_t now;
    profiles_user_info *out;
    store_txn *txn;
    item_record rec;
    category_acc acc;
    aff_err *err;
} user_ctx;

static int category_visit(void *ctx, const char *item, const store_interaction *in)
{
    user_ctx *u = ctx;
    int status = store_txn_get_item(u->txn, u->collection, item, &u->rec, NULL, u->err);
    if (status == AFF_ENOTFOUND) {
        aff__err_clear(u->err);
        return 0;
    }
    if (status) return status;
    if (!u->rec.category[0]) return 0;
    double w = in->weight * decay((double)(u->now - in->ref_ms), u->p->half_life_ms);
    category_acc *a = &u->acc;
    uint32_t pos;
    if (!strmap_get(a->index, u->rec.category, &pos)) {
        if (a->n == a->cap) {
            size_t cap = a->cap ? a->cap * 2 : 16;
            profiles_category_weight *nc = realloc(a->cats, cap * sizeof *nc);
            if (!nc) return aff__fail(u->err, AFF_ENOMEM, "profiles: out of memory");
            a->cats = nc;
            double *nw = realloc(a->weights, cap * sizeof *nw);
            if (!nw) return aff__fail(u->err, AFF_ENOMEM, "profiles: out of memory");
            a->weights = nw;
            a->cap = cap;
        }
        pos = (uint32_t)a->n;
        if (strmap_put(a->index, u->rec.category, pos, NULL))
            return aff__fail(u->err, AFF_ENOMEM, "profiles: out of memory");
        snprintf(a->cats[pos].category, sizeof a->cats[pos].category, "%s", u->rec.category);
        a->weights[pos] = 0;
        a->n++;
    }
    a->weights[pos] += w;
    a->total += w;
    return 0;
}

static int get_user_fn(store_txn *txn, void *ctx, aff_err *err)
{
    user_ctx *u = ctx;
    u->txn = txn;
    u->err = err;
    store_profile prof;
    int status = store_txn_get_profile(txn, u->collection, u->user, &prof, NULL, err);
    if (status) return status;
    profiles_user_info *o = u->out;
    o->n_counts = prof.n_counts;
    memcpy(o->counts, prof.counts, sizeof o->counts);
    o->last_event_ms = prof.last_event_ms;
    o->history_length = prof.n_history;
    return store_txn_scan_interactions(txn, u->collection, u->user, category_visit, u, err);
}

int profiles_get_user(aff_profiles *p, const char *collection, const char *user_id,
                      profiles_user_info *out, aff_err *err)
{
    memset(out, 0, sizeof *out);
    user_ctx u = {.p = p, .collection = collection, .user = user_id, .now = now_ms(p), .out = out};
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    if (strmap_create(&u.acc.index, 16))
        return aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    int status = store_view(p->store, get_user_fn, &u, err);
    if (status == AFF_OK) {
        /* Top PROFILES_TOP_CATEGORIES by weight: a partial selection sort (n is small). */
        category_acc *a = &u.acc;
        for (uint32_t t = 0; t < PROFILES_TOP_CATEGORIES && t < a->n; t++) {
            size_t best = t;
            for (size_t i = t + 1; i < a->n; i++) {
                if (a->weights[i] > a->weights[best] ||
                    (a->weights[i] == a->weights[best] &&
                     strcmp(a->cats[i].category, a->cats[best].category) < 0))
                    best = i;
            }
            profiles_category_weight tc = a->cats[t];
            double tw = a->weights[t];
            a->cats[t] = a->cats[best];
            a->weights[t] = a->weights[best];
            a->cats[best] = tc;
            a->weights[best] = tw;
            out->top_categories[t] = a->cats[t];
            out->top_categories[t].weight = a->total > 0 ? (float)(a->weights[t] / a->total) : 0.0f;
            out->n_top_categories = t + 1;
        }
    } else {
        memset(out, 0, sizeof *out);
    }
    strmap_destroy(u.acc.index);
    free(u.acc.cats);
    free(u.acc.weights);
    return status;
}

typedef struct delete_ctx {
    const char *user;
    const store_collection *cols;
    size_t n_cols;
    bool existed;
} delete_ctx;

static int delete_user_fn(store_txn *txn, void *ctx, aff_err *err)
{
    delete_ctx *d = ctx;
    d->existed = false;
    for (size_t i = 0; i < d->n_cols; i++) {
        bool existed = false;
        int status = store_txn_delete_user(txn, d->cols[i].name, d->user, &existed, err);
        if (status) return status;
        d->existed = d->existed || existed;
    }
    return AFF_OK;
}

int profiles_delete_user(aff_profiles *p, const char *collection, const char *user_id,
                         bool *existed, aff_err *err)
{
    store_collection one;
    store_collection *all = NULL;
    delete_ctx d = {.user = user_id};
    int status = AFF_OK;
    if (existed) *existed = false;
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    if (collection && *collection) {
        if (strlen(collection) > AFF_MAX_NAME_LEN)
            return aff__fail(err, AFF_EINVAL, "collection name longer than %d bytes",
                             AFF_MAX_NAME_LEN);
        memset(&one, 0, sizeof one);
        snprintf(one.name, sizeof one.name, "%s", collection);
        d.cols = &one;
        d.n_cols = 1;
    } else {
        if ((status = store_list_collections(p->store, &all, &d.n_cols, err))) goto out;
        d.cols = all;
    }
    status = store_update(p->store, delete_user_fn, &d, err);
    if (collection && *collection)
        recent_forget(p, collection, user_id);
    else
        recent_forget_all(p);
    if (status == AFF_OK && p->observer.user_erased)
        p->observer.user_erased(p->observer.ctx, collection && *collection ? collection : NULL,
                                user_id);
    if (existed && status == AFF_OK) *existed = d.existed;
out:
    free(all);
    return status;
}

typedef struct history_ctx {
    const char *collection, *user;
    store_event_fn fn;
    void *ctx;
} history_ctx;

static int history_fn(store_txn *txn, void *ctx, aff_err *err)
{
    history_ctx *h = ctx;
    return store_txn_scan_events(txn, h->collection, h->user, h->fn, h->ctx, err);
}

int profiles_history(aff_profiles *p, const char *collection, const char *user_id,
                     store_event_fn fn, void *ctx, aff_err *err)
{
    history_ctx h = {collection, user_id, fn, ctx};
    return store_view(p->store, history_fn, &h, err);
}

/* ---- shopper traits ------------------------------------------------------------------------- */

#define TRAITS_MAX_CARTS 64

typedef struct traits_ctx {
    aff_profiles *p;
    const char *collection, *user;
    int64_t now;
    store_txn *txn;
    item_record rec;
    aff_err *err;
    uint64_t events;
    int64_t last_ms;
    double browse_sum, buy_sum;
    uint32_t browse_n, buy_n;
    uint32_t purchases_90d, events_7d, views_1h;
    double spend_90d;
    struct {
        char id[AFF_MAX_ID_LEN + 1];
        int64_t cart_ms, bought_ms;
    } carts[TRAITS_MAX_CARTS];
    uint32_t n_carts;
} traits_ctx;

static int traits_visit(void *ctx, uint64_t seq, const store_event *e)
{
    (void)seq;
    traits_ctx *t = ctx;
    const int64_t day = 86400000;
    t->events++;
    if (e->ts_ms > t->last_ms) t->last_ms = e->ts_ms;
    int64_t age = t->now - e->ts_ms;
    bool view = strcmp(e->type, "view") == 0, click = strcmp(e->type, "click") == 0;
    bool cart = strcmp(e->type, "add_to_cart") == 0, buy = strcmp(e->type, "purchase") == 0;
    if (age <= 7 * day) t->events_7d++;
    if (view && age <= 3600000) t->views_1h++;
    if (!(view || click || cart || buy)) return 0;
    int status = store_txn_get_item(t->txn, t->collection, e->item_id, &t->rec, NULL, t->err);
    if (status == AFF_ENOTFOUND) { /* deleted since: no price */
        aff__err_clear(t->err);
        return 0;
    }
    if (status) return status;
    double price = t->rec.price;
    if (view || click) {
        t->browse_sum += price;
        t->browse_n++;
    } else {
        t->buy_sum += price;
        t->buy_n++;
    }
    if (buy && age <= 90 * day) {
        t->purchases_90d++;
        t->spend_90d += price * (e->value > 1 ? e->value : 1);
    }
    if ((cart || buy) && age <= day) {
        uint32_t i = 0;
        while (i < t->n_carts && strcmp(t->carts[i].id, e->item_id) != 0)
            i++;
        if (i == t->n_carts) {
            if (t->n_carts == TRAITS_MAX_CARTS || buy) return 0;
            snprintf(t->carts[i].id, sizeof t->carts[i].id, "%s", e->item_id);
            t->carts[i].cart_ms = t->carts[i].bought_ms = INT64_MIN;
            t->n_carts++;
        }
        if (cart && e->ts_ms > t->carts[i].cart_ms) t->carts[i].cart_ms = e->ts_ms;
        if (buy && e->ts_ms > t->carts[i].bought_ms) t->carts[i].bought_ms = e->ts_ms;
    }
    return 0;
}

static int traits_fn(store_txn *txn, void *ctx, aff_err *err)
{
    traits_ctx *t = ctx;
    t->txn = txn;
    t->err = err;
    return store_txn_scan_events(txn, t->collection, t->user, traits_visit, t, err);
}

static uint8_t score5(double v, const double th[4])
{
    for (int i = 0; i < 4; i++)
        if (v >= th[i]) return (uint8_t)(5 - i);
    return 1;
}

int profiles_user_traits(aff_profiles *p, const char *collection, const char *user_id,
                         profiles_traits *out, aff_err *err)
{
    memset(out, 0, sizeof *out);
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    traits_ctx *t = calloc(1, sizeof *t);
    if (!t) return aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    t->p = p;
    t->collection = collection;
    t->user = user_id;
    t->now = now_ms(p);
    t->last_ms = INT64_MIN;
    int status = store_view(p->store, traits_fn, t, err);
    if (!status && !t->events)
        status = aff__fail(err, AFF_ENOTFOUND, "user \"%s\" has no history in \"%s\"", user_id,
                           collection);
    if (status) {
        free(t);
        return status;
    }
    double v = t->browse_n ? t->browse_sum / t->browse_n : 0;
    double b = t->buy_n ? t->buy_sum / t->buy_n : 0;
    double hi = v > b ? v : b;
    out->price_sensitivity =
        t->browse_n && t->buy_n && hi > 0 ? (float)(0.5 + 0.5 * (v - b) / hi) : 0.5f;
    out->recency_days = (float)((double)(t->now - t->last_ms) / 86400000.0);
    if (out->recency_days < 0) out->recency_days = 0;
    out->frequency_90d = t->purchases_90d;
    out->monetary_90d = t->spend_90d;
    /* recency: fewer days is better, so score the negated value */
    static const double r_th[4] = {-1, -7, -30, -90}, f_th[4] = {10, 5, 2, 1},
                        m_th[4] = {1000, 300, 100, 1e-9};
    out->r = score5(-out->recency_days, r_th);
    out->f = score5(t->purchases_90d, f_th);
    out->m = score5(t->spend_90d, m_th);
    out->loyalty = (float)(out->r + out->f + out->m - 3) / 12.0f;
    out->activity = (float)t->events_7d / 7.0f;
    uint32_t open = 0;
    for (uint32_t i = 0; i < t->n_carts; i++)
        open += t->carts[i].cart_ms != INT64_MIN && t->carts[i].bought_ms < t->carts[i].cart_ms;
    double intent = 0.5 * open + 0.05 * t->views_1h;
    out->purchase_intent = (float)(intent < 1 ? intent : 1);
    free(t);
    return AFF_OK;
}

/* ---- privacy: export (issue 12) ---------------------------------------------------------- */

typedef struct export_ctx {
    const char *collection, *user;
    const profiles_export_fns *fns;
    const char *type; /* the type being scanned */
} export_ctx;

static int export_type_item(void *ctx, const char *id)
{
    export_ctx *x = ctx;
    return x->fns->on_type_item(x->fns->ctx, x->type, id);
}

static int export_fn(store_txn *txn, void *ctx, aff_err *err)
{
    export_ctx *x = ctx;
    store_profile prof;
    int rc = store_txn_get_profile(txn, x->collection, x->user, &prof, NULL, err);
    if (rc) return rc;
    if ((rc = store_txn_scan_events(txn, x->collection, x->user, x->fns->on_event, x->fns->ctx,
                                    err)))
        return rc;
    if ((rc = store_txn_scan_interactions(txn, x->collection, x->user, x->fns->on_interaction,
                                          x->fns->ctx, err)))
        return rc;
    for (uint32_t i = 0; i < prof.n_counts; i++) {
        x->type = prof.counts[i].type;
        if ((rc = store_txn_scan_type(txn, x->collection, x->user, x->type, export_type_item, x,
                                      err)))
            return rc;
    }
    return AFF_OK;
}

int profiles_export(aff_profiles *p, const char *collection, const char *user_id,
                    const profiles_export_fns *fns, aff_err *err)
{
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    export_ctx x = {.collection = collection, .user = user_id, .fns = fns};
    return store_view(p->store, export_fn, &x, err);
}

/* ---- privacy: opt-out (issue 12) --------------------------------------------------------- */

typedef struct opt_out_ctx {
    const char *collection; /* a name or STORE_ALL_COLLECTIONS */
    const char *user;
    bool opt_out;
    int64_t now;
    const store_collection *cols; /* whose data is erased when opting out */
    size_t n_cols;
    bool erased;
} opt_out_ctx;

static int opt_out_fn(store_txn *txn, void *ctx, aff_err *err)
{
    opt_out_ctx *o = ctx;
    o->erased = false;
    int status;
    if (!o->opt_out) return store_txn_delete_opt_out(txn, o->collection, o->user, NULL, err);
    if ((status = store_txn_put_opt_out(txn, o->collection, o->user, o->now, err))) return status;
    for (size_t i = 0; i < o->n_cols; i++) {
        bool existed = false;
        if ((status = store_txn_delete_user(txn, o->cols[i].name, o->user, &existed, err)))
            return status;
        o->erased = o->erased || existed;
    }
    return AFF_OK;
}

int profiles_set_opt_out(aff_profiles *p, const char *collection, const char *user_id, bool opt_out,
                         bool *erased, aff_err *err)
{
    store_collection one, *all = NULL;
    opt_out_ctx o = {.user = user_id, .opt_out = opt_out, .now = now_ms(p)};
    if (erased) *erased = false;
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    int status = AFF_OK;
    if (collection && *collection) {
        memset(&one, 0, sizeof one);
        snprintf(one.name, sizeof one.name, "%s", collection);
        o.collection = collection;
        o.cols = &one;
        o.n_cols = 1;
    } else {
        o.collection = STORE_ALL_COLLECTIONS;
        if (opt_out && (status = store_list_collections(p->store, &all, &o.n_cols, err)))
            return status;
        o.cols = all;
    }
    status = store_update(p->store, opt_out_fn, &o, err);
    if (collection && *collection)
        recent_forget(p, collection, user_id);
    else
        recent_forget_all(p);
    if (!status && opt_out && p->observer.user_erased)
        p->observer.user_erased(p->observer.ctx, collection && *collection ? collection : NULL,
                                user_id);
    if (!status && erased) *erased = o.erased;
    free(all);
    return status;
}

typedef struct opted_ctx {
    const char *collection, *user;
    bool here, everywhere;
} opted_ctx;

static int opted_fn(store_txn *txn, void *ctx, aff_err *err)
{
    opted_ctx *o = ctx;
    int status = AFF_OK;
    if (o->collection[0]) {
        status = store_txn_get_opt_out(txn, o->collection, o->user, NULL, err);
        if (status == AFF_ENOTFOUND) {
            aff__err_clear(err);
        } else if (status) {
            return status;
        } else {
            o->here = true;
        }
    }
    status = store_txn_get_opt_out(txn, STORE_ALL_COLLECTIONS, o->user, NULL, err);
    if (status == AFF_ENOTFOUND) {
        aff__err_clear(err);
        return AFF_OK;
    }
    if (!status) o->everywhere = true;
    return status;
}

int profiles_opted_out(aff_profiles *p, const char *collection, const char *user_id, bool *here,
                       bool *everywhere, aff_err *err)
{
    if (!valid_id(user_id, AFF_MAX_ID_LEN))
        return aff__fail(err, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
    opted_ctx o = {.collection = collection ? collection : "", .user = user_id};
    int status = store_view(p->store, opted_fn, &o, err);
    *here = o.here;
    *everywhere = o.everywhere;
    return status;
}

/* ---- event retention (issue 12) ------------------------------------------------------------ */

typedef struct expire_ctx {
    aff_profiles *p;
    const store_collection *col;
    const char *user;
    int64_t cutoff;
    float *sum, *x;
    /* filled while scanning */
    uint64_t min_kept_seq;
    bool any_kept, any_expired;
    uint64_t n_events; /* expired history events */
    uint64_t *seqs;    /* expired event sequence numbers */
    size_t n_seqs, cap_seqs;
    char (*items)[AFF_MAX_ID_LEN + 1]; /* expired interactions or marks */
    size_t n_items, cap_items;
    size_t n_kept_interactions;
} expire_ctx;

static int push_seq(expire_ctx *x, uint64_t seq)
{
    if (x->n_seqs == x->cap_seqs) {
        size_t cap = x->cap_seqs ? 2 * x->cap_seqs : 64;
        uint64_t *n = realloc(x->seqs, cap * sizeof *n);
        if (!n) return AFF_ENOMEM;
        x->seqs = n;
        x->cap_seqs = cap;
    }
    x->seqs[x->n_seqs++] = seq;
    return 0;
}

static int push_item(expire_ctx *x, const char *item)
{
    if (x->n_items == x->cap_items) {
        size_t cap = x->cap_items ? 2 * x->cap_items : 64;
        void *n = realloc(x->items, cap * sizeof *x->items);
        if (!n) return AFF_ENOMEM;
        x->items = n;
        x->cap_items = cap;
    }
    snprintf(x->items[x->n_items++], sizeof x->items[0], "%s", item);
    return 0;
}

static int expire_event_visit(void *ctx, uint64_t seq, const store_event *e)
{
    expire_ctx *x = ctx;
    if (e->ts_ms < x->cutoff) return push_seq(x, seq);
    if (!x->any_kept || seq < x->min_kept_seq) x->min_kept_seq = seq;
    x->any_kept = true;
    return 0;
}

static int expire_interaction_visit(void *ctx, const char *item, const store_interaction *in)
{
    expire_ctx *x = ctx;
    if (in->last_ms < x->cutoff) return push_item(x, item);
    x->n_kept_interactions++;
    return 0;
}

static int expire_mark_visit(void *ctx, const char *item, int64_t last_ms)
{
    expire_ctx *x = ctx;
    return last_ms < x->cutoff ? push_item(x, item) : 0;
}

/* One user in one collection, inside a write transaction. */
static int expire_user_fn(store_txn *txn, void *ctx, aff_err *err)
{
    expire_ctx *x = ctx;
    const char *c = x->col->name;
    store_profile prof;
    x->n_seqs = x->n_items = x->n_kept_interactions = 0;
    x->any_kept = x->any_expired = false;
    x->n_events = 0;
    int status = store_txn_get_profile(txn, c, x->user, &prof, x->sum, err);
    if (status == AFF_ENOTFOUND) {
        aff__err_clear(err);
        return AFF_OK;
    }
    if (status) return status;
    /* History: erase expired events; the window [next_seq - n_history, next_seq) still holds
     * every kept event (gaps are allowed: trimming deletes by sequence number). */
    if ((status = store_txn_scan_events(txn, c, x->user, expire_event_visit, x, err)))
        return status < 0 ? status : aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    for (size_t i = 0; i < x->n_seqs; i++)
        if ((status = store_txn_delete_event(txn, c, x->user, x->seqs[i], err))) return status;
    x->n_events = x->n_seqs;
    x->any_expired = x->n_seqs > 0;
    prof.n_history = x->any_kept ? (uint32_t)(prof.next_seq - x->min_kept_seq) : 0;
    /* Per-item aggregates whose latest event expired. */
    x->n_items = 0;
    if ((status = store_txn_scan_interactions(txn, c, x->user, expire_interaction_visit, x, err)))
        return status < 0 ? status : aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
    for (size_t i = 0; i < x->n_items; i++)
        if ((status = store_txn_delete_interaction(txn, c, x->user, x->items[i], err)))
            return status;
    bool interactions_expired = x->n_items > 0;
    x->any_expired = x->any_expired || interactions_expired;
    /* Type-index marks older than the cutoff. */
    for (uint32_t t = 0; t < prof.n_counts; t++) {
        x->n_items = 0;
        const char *type = prof.counts[t].type;
        if ((status = store_txn_scan_type_marks(txn, c, x->user, type, expire_mark_visit, x, err)))
            return status < 0 ? status : aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
        for (size_t i = 0; i < x->n_items; i++)
            if ((status = store_txn_unmark_type(txn, c, x->user, type, x->items[i], err)))
                return status;
        x->any_expired = x->any_expired || x->n_items > 0;
    }
    if (!x->any_expired) return AFF_OK;
    if (x->n_kept_interactions == 0 && !x->any_kept)
        return store_txn_delete_user(txn, c, x->user, NULL, err);
    if (interactions_expired &&
        (status = recompute_profile(txn, x->p, x->col, x->user, &prof, x->sum, x->x, err)))
        return status;
    return store_txn_put_profile(txn, c, x->user, &prof, x->sum, err);
}

typedef struct user_list {
    char (*ids)[AFF_MAX_ID_LEN + 1];
    size_t n, cap;
} user_list;

static int collect_user(void *ctx, const char *id)
{
    user_list *l = ctx;
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 256;
        void *n = realloc(l->ids, cap * sizeof *l->ids);
        if (!n) return AFF_ENOMEM;
        l->ids = n;
        l->cap = cap;
    }
    snprintf(l->ids[l->n++], sizeof l->ids[0], "%s", id);
    return 0;
}

typedef struct users_ctx {
    const char *collection;
    user_list *list;
} users_ctx;

static int list_users_fn(store_txn *txn, void *ctx, aff_err *err)
{
    users_ctx *u = ctx;
    u->list->n = 0;
    int status = store_txn_scan_users(txn, u->collection, collect_user, u->list, err);
    return status > 0 ? aff__fail(err, AFF_ENOMEM, "profiles: out of memory") : status;
}

int profiles_expire(aff_profiles *p, int64_t cutoff_ms, uint64_t *n_users, uint64_t *n_events,
                    aff_err *err)
{
    store_collection *cols = NULL;
    size_t n_cols = 0;
    user_list users = {0};
    expire_ctx x = {.p = p, .cutoff = cutoff_ms};
    uint64_t changed = 0, erased = 0;
    int status = store_list_collections(p->store, &cols, &n_cols, err);
    if (status) return status;
    x.sum = malloc(2 * AFF_MAX_DIM * sizeof(float));
    if (!x.sum) {
        status = aff__fail(err, AFF_ENOMEM, "profiles: out of memory");
        goto out;
    }
    x.x = x.sum + AFF_MAX_DIM;
    for (size_t ci = 0; ci < n_cols && !status; ci++) {
        users_ctx uc = {cols[ci].name, &users};
        if ((status = store_view(p->store, list_users_fn, &uc, err))) break;
        x.col = &cols[ci];
        for (size_t ui = 0; ui < users.n && !status; ui++) {
            x.user = users.ids[ui];
            status = store_update(p->store, expire_user_fn, &x, err);
            recent_forget(p, cols[ci].name, x.user);
            if (status == AFF_ENOTFOUND) { /* the collection was dropped meanwhile */
                aff__err_clear(err);
                status = AFF_OK;
                break;
            }
            if (!status && x.any_expired) {
                changed++;
                erased += x.n_events;
            }
        }
    }
    if (status == AFF_OK && p->observer.expired) p->observer.expired(p->observer.ctx, cutoff_ms);
out:
    if (n_users) *n_users = changed;
    if (n_events) *n_events = erased;
    free(x.sum);
    free(x.seqs);
    free(x.items);
    free(users.ids);
    free(cols);
    return status;
}

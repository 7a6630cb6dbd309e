/*
 * experiments.c: the experiment table, its validation, persistence (one JSON document per
 * experiment in the store's experiments database), assignment and the Thompson-sampling
 * bandit (see experiments.h).
 */
#include "experiments.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "jsonv.h"
#include "jsonw.h"
#include "log.h"
#include "rng.h"
#include "strmap.h"

#define SHARE_TOLERANCE 1e-6

struct aff_experiments {
    experiments_config cfg;
    pthread_mutex_t mu;
    experiment *list; /* EXPERIMENTS_MAX slots */
    size_t n;
    bool *updating; /* per slot: a bandit update is being computed or stored */
};

static int64_t clock_ms(void *ctx)
{
    (void)ctx;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- encoding ------------------------------------------------------------------------------ */

/* The stored form; counts as decimal strings would be exact, but every count stays far below
 * 2^53, so JSON numbers are exact too. */
static void encode(const experiment *e, jsonw *b)
{
    jsonw_printf(b, "{\"v\":1,\"id\":");
    jsonw_str(b, e->id);
    jsonw_printf(b, ",\"collection\":");
    jsonw_str(b, e->collection);
    jsonw_printf(b, ",\"surface\":");
    jsonw_str(b, e->surface);
    jsonw_printf(b,
                 ",\"running\":%s,\"created_ms\":%lld,\"stopped_ms\":%lld,\"version\":%llu,"
                 "\"bandit\":{\"enabled\":%s,\"metric\":%d,\"has_floor\":%s,\"floor\":%.17g,"
                 "\"update_every\":%u,\"seed\":\"%llu\"},\"arms\":[",
                 e->running ? "true" : "false", (long long)e->created_ms, (long long)e->stopped_ms,
                 (unsigned long long)e->version, e->bandit.enabled ? "true" : "false",
                 e->bandit.metric, e->bandit.has_floor ? "true" : "false", e->bandit.floor,
                 e->bandit.update_every, (unsigned long long)e->bandit.seed);
    for (uint32_t i = 0; i < e->n_arms; i++) {
        const experiments_arm *a = &e->arms[i];
        jsonw_printf(b, "%s{\"name\":", i ? "," : "");
        jsonw_str(b, a->name);
        jsonw_printf(b, ",\"preset\":");
        jsonw_str(b, a->preset);
        jsonw_printf(b,
                     ",\"share\":%.17g,\"space\":%d,\"has_diversity\":%s,\"diversity\":%.9g,"
                     "\"has_exploration\":%s,\"exploration_share\":%.9g,\"current\":%.17g,"
                     "\"impressions\":%llu,\"successes\":%llu}",
                     a->share, a->space, a->has_diversity ? "true" : "false", (double)a->diversity,
                     a->has_exploration ? "true" : "false", (double)a->exploration_share,
                     e->shares[i], (unsigned long long)e->impressions[i],
                     (unsigned long long)e->successes[i]);
    }
    jsonw_printf(b, "]}");
}

static double num(const jsonv *o, const char *k)
{
    const jsonv *v = jsonv_get(o, k);
    return v && v->type == JSONV_NUMBER ? v->number : 0.0;
}

static bool flag(const jsonv *o, const char *k)
{
    const jsonv *v = jsonv_get(o, k);
    return v && v->type == JSONV_BOOL && v->boolean;
}

static void str(const jsonv *o, const char *k, char *out, size_t cap)
{
    const jsonv *v = jsonv_get(o, k);
    snprintf(out, cap, "%s", v && v->type == JSONV_STRING ? v->string : "");
}

static int decode(const char *id, const void *blob, size_t len, experiment *e, aff_err *err)
{
    jsonv *t = NULL;
    int rc = jsonv_parse(blob, len, &t, err);
    if (rc) return aff__fail(err, AFF_EINTERNAL, "experiment %s: corrupt record", id);
    const jsonv *arms = jsonv_get(t, "arms"), *bandit = jsonv_get(t, "bandit");
    if (num(t, "v") != 1 || !arms || arms->type != JSONV_ARRAY || arms->n < 1 ||
        arms->n > EXPERIMENTS_MAX_ARMS || !bandit) {
        jsonv_free(t);
        return aff__fail(err, AFF_EINTERNAL, "experiment %s: corrupt record", id);
    }
    memset(e, 0, sizeof *e);
    str(t, "id", e->id, sizeof e->id);
    str(t, "collection", e->collection, sizeof e->collection);
    str(t, "surface", e->surface, sizeof e->surface);
    e->running = flag(t, "running");
    e->created_ms = (int64_t)num(t, "created_ms");
    e->stopped_ms = (int64_t)num(t, "stopped_ms");
    e->version = (uint64_t)num(t, "version");
    e->bandit.enabled = flag(bandit, "enabled");
    e->bandit.metric = (int)num(bandit, "metric");
    e->bandit.has_floor = flag(bandit, "has_floor");
    e->bandit.floor = num(bandit, "floor");
    e->bandit.update_every = (uint32_t)num(bandit, "update_every");
    const jsonv *seed = jsonv_get(bandit, "seed");
    e->bandit.seed = seed && seed->type == JSONV_STRING ? strtoull(seed->string, NULL, 10) : 0;
    e->n_arms = (uint32_t)arms->n;
    for (uint32_t i = 0; i < e->n_arms; i++) {
        const jsonv *a = &arms->items[i];
        experiments_arm *o = &e->arms[i];
        str(a, "name", o->name, sizeof o->name);
        str(a, "preset", o->preset, sizeof o->preset);
        o->share = num(a, "share");
        o->space = (int)num(a, "space");
        o->has_diversity = flag(a, "has_diversity");
        o->diversity = (float)num(a, "diversity");
        o->has_exploration = flag(a, "has_exploration");
        o->exploration_share = (float)num(a, "exploration_share");
        e->shares[i] = num(a, "current");
        e->impressions[i] = (uint64_t)num(a, "impressions");
        e->successes[i] = (uint64_t)num(a, "successes");
    }
    jsonv_free(t);
    return AFF_OK;
}

static int persist(aff_experiments *ex, const experiment *e, aff_err *err)
{
    jsonw b = {0};
    encode(e, &b);
    int rc = b.oom ? aff__fail(err, AFF_ENOMEM, "out of memory storing an experiment")
                   : store_put_experiment(ex->cfg.store, e->id, b.p, b.len, err);
    free(b.p);
    return rc;
}

/* ---- life cycle ---------------------------------------------------------------------------- */

static int load_one(void *ctx, const char *id, const void *blob, size_t len)
{
    aff_experiments *ex = ctx;
    aff_err err;
    if (ex->n >= EXPERIMENTS_MAX) return 1;
    if (decode(id, blob, len, &ex->list[ex->n], &err)) {
        aff_log(AFF_LOG_WARN, "%s: skipped", err.msg);
        return 0;
    }
    ex->n++;
    return 0;
}

int experiments_create(aff_experiments **out, const experiments_config *cfg, aff_err *err)
{
    *out = NULL;
    aff_experiments *ex = calloc(1, sizeof *ex);
    if (!ex) return aff__fail(err, AFF_ENOMEM, "experiments: out of memory");
    ex->cfg = *cfg;
    if (!ex->cfg.now_ms) ex->cfg.now_ms = clock_ms;
    pthread_mutex_init(&ex->mu, NULL);
    ex->list = calloc(EXPERIMENTS_MAX, sizeof *ex->list);
    ex->updating = calloc(EXPERIMENTS_MAX, sizeof *ex->updating);
    if (!ex->list || !ex->updating) {
        experiments_destroy(ex);
        return aff__fail(err, AFF_ENOMEM, "experiments: out of memory");
    }
    int rc = store_scan_experiments(ex->cfg.store, load_one, ex, err);
    if (rc) {
        experiments_destroy(ex);
        return rc;
    }
    *out = ex;
    return AFF_OK;
}

void experiments_destroy(aff_experiments *ex)
{
    if (!ex) return;
    pthread_mutex_destroy(&ex->mu);
    free(ex->list);
    free(ex->updating);
    free(ex);
}

/* ---- validation ---------------------------------------------------------------------------- */

static int validate(const aff_experiments *ex, const experiment *d, aff_err *err)
{
    if (!outcomes_label_ok(d->id))
        return aff__fail(err, AFF_EINVAL,
                         "experiment.id: \"%.64s\" must be 1..%d bytes of [A-Za-z0-9_.:-]", d->id,
                         OUTCOMES_MAX_LABEL);
    if (!outcomes_label_ok(d->surface))
        return aff__fail(err, AFF_EINVAL,
                         "experiment.surface: \"%.64s\" must be 1..%d bytes of [A-Za-z0-9_.:-]",
                         d->surface, OUTCOMES_MAX_LABEL);
    if (d->n_arms < 2 || d->n_arms > EXPERIMENTS_MAX_ARMS)
        return aff__fail(err, AFF_EINVAL, "experiment.arms: %u arms; an experiment has 2..%d",
                         d->n_arms, EXPERIMENTS_MAX_ARMS);
    double sum = 0.0;
    for (uint32_t i = 0; i < d->n_arms; i++) {
        const experiments_arm *a = &d->arms[i];
        if (!outcomes_label_ok(a->name))
            return aff__fail(err, AFF_EINVAL,
                             "experiment.arms[%u].name: \"%.64s\" must be 1..%d bytes of "
                             "[A-Za-z0-9_.:-]",
                             i, a->name, OUTCOMES_MAX_LABEL);
        for (uint32_t j = 0; j < i; j++)
            if (strcmp(d->arms[j].name, a->name) == 0)
                return aff__fail(err, AFF_EINVAL,
                                 "experiment.arms[%u].name: \"%s\" is also arms[%u].name; arm "
                                 "names must be distinct",
                                 i, a->name, j);
        if (!isfinite(a->share) || a->share < 0.0 || a->share > 1.0)
            return aff__fail(err, AFF_EINVAL, "experiment.arms[%u].share = %g is outside 0..1", i,
                             a->share);
        sum += a->share;
        if (a->preset[0] &&
            (!ex->cfg.preset_exists || !ex->cfg.preset_exists(ex->cfg.preset_ctx, a->preset)))
            return aff__fail(err, AFF_EINVAL,
                             "experiment.arms[%u].preset: \"%.64s\" is not a preset of the "
                             "serving config (--serving-config)",
                             i, a->preset);
        if (a->space < 0 || a->space > 2)
            return aff__fail(err, AFF_EINVAL,
                             "experiment.arms[%u].space = %d is unknown; use SPACE_CONTENT or "
                             "SPACE_BEHAVIOUR (or leave it unset)",
                             i, a->space);
        if (a->has_diversity && !(a->diversity >= 0.0f && a->diversity <= 1.0f))
            return aff__fail(err, AFF_EINVAL, "experiment.arms[%u].diversity = %g is outside 0..1",
                             i, (double)a->diversity);
        if (a->has_exploration && !(a->exploration_share >= 0.0f && a->exploration_share <= 1.0f))
            return aff__fail(err, AFF_EINVAL,
                             "experiment.arms[%u].exploration_share = %g is outside 0..1", i,
                             (double)a->exploration_share);
    }
    if (fabs(sum - 1.0) > SHARE_TOLERANCE)
        return aff__fail(err, AFF_EINVAL,
                         "experiment.arms: the shares add up to %.6g; they must add up to 1", sum);
    const experiments_bandit *b = &d->bandit;
    if (b->enabled) {
        if (b->metric < 0 || b->metric > EXPERIMENTS_METRIC_CONVERSION)
            return aff__fail(err, AFF_EINVAL, "experiment.bandit.metric = %d is unknown",
                             b->metric);
        double floor = b->has_floor ? b->floor : EXPERIMENTS_DEFAULT_FLOOR;
        if (!isfinite(floor) || floor < 0.0 || floor * d->n_arms > 1.0 + SHARE_TOLERANCE)
            return aff__fail(err, AFF_EINVAL,
                             "experiment.bandit.floor = %g must be >= 0 and at most 1 / %u arms",
                             floor, d->n_arms);
        if (b->update_every && (b->update_every < 10 || b->update_every > 1000000))
            return aff__fail(err, AFF_EINVAL,
                             "experiment.bandit.update_every = %u is outside 10..1000000 (0: %d)",
                             b->update_every, EXPERIMENTS_DEFAULT_EVERY);
    }
    return AFF_OK;
}

static experiment *find(aff_experiments *ex, const char *id)
{
    for (size_t i = 0; i < ex->n; i++)
        if (strcmp(ex->list[i].id, id) == 0) return &ex->list[i];
    return NULL;
}

int experiments_add(aff_experiments *ex, const experiment *def, experiment *out, aff_err *err)
{
    int rc = validate(ex, def, err);
    if (rc) return rc;
    experiment e = *def;
    e.running = true;
    e.created_ms = ex->cfg.now_ms(ex->cfg.now_ctx);
    e.stopped_ms = 0;
    e.version = 0;
    e.since_update = 0;
    if (e.bandit.enabled) {
        if (!e.bandit.has_floor) e.bandit.floor = EXPERIMENTS_DEFAULT_FLOOR;
        e.bandit.has_floor = true;
        if (!e.bandit.update_every) e.bandit.update_every = EXPERIMENTS_DEFAULT_EVERY;
        if (!e.bandit.metric) e.bandit.metric = EXPERIMENTS_METRIC_CONVERSION;
    }
    for (uint32_t i = 0; i < e.n_arms; i++) {
        e.shares[i] = e.arms[i].share;
        e.impressions[i] = e.successes[i] = 0;
    }
    pthread_mutex_lock(&ex->mu);
    if (find(ex, e.id)) {
        rc = aff__fail(err, AFF_EEXIST, "experiment \"%s\" already exists (ids are never reused)",
                       e.id);
        goto out;
    }
    for (size_t i = 0; i < ex->n; i++)
        if (ex->list[i].running && strcmp(ex->list[i].collection, e.collection) == 0 &&
            strcmp(ex->list[i].surface, e.surface) == 0) {
            rc = aff__fail(err, AFF_EPRECONDITION,
                           "experiment \"%s\" already runs on surface \"%s\" of collection "
                           "\"%s\"; stop it first",
                           ex->list[i].id, e.surface, e.collection);
            goto out;
        }
    if (ex->n >= EXPERIMENTS_MAX) {
        rc = aff__fail(err, AFF_EFULL, "the server keeps at most %d experiments", EXPERIMENTS_MAX);
        goto out;
    }
    /* Stored under the lock: two adds of one id cannot both pass the check. Adds are rare. */
    if ((rc = persist(ex, &e, err))) goto out;
    ex->list[ex->n++] = e;
    if (out) *out = e;
out:
    pthread_mutex_unlock(&ex->mu);
    return rc;
}

int experiments_get(aff_experiments *ex, const char *id, experiment *out, aff_err *err)
{
    pthread_mutex_lock(&ex->mu);
    experiment *e = find(ex, id);
    if (e) *out = *e;
    pthread_mutex_unlock(&ex->mu);
    return e ? AFF_OK : aff__fail(err, AFF_ENOTFOUND, "experiment \"%.64s\" is unknown", id);
}

static int cmp_id(const void *a, const void *b)
{
    return strcmp(((const experiment *)a)->id, ((const experiment *)b)->id);
}

int experiments_list(aff_experiments *ex, const char *collection, experiment **out, size_t *n,
                     aff_err *err)
{
    pthread_mutex_lock(&ex->mu);
    experiment *l = malloc((ex->n ? ex->n : 1) * sizeof *l);
    size_t m = 0;
    if (l)
        for (size_t i = 0; i < ex->n; i++)
            if (!collection || !collection[0] || strcmp(ex->list[i].collection, collection) == 0)
                l[m++] = ex->list[i];
    pthread_mutex_unlock(&ex->mu);
    if (!l) return aff__fail(err, AFF_ENOMEM, "out of memory listing experiments");
    qsort(l, m, sizeof *l, cmp_id);
    *out = l;
    *n = m;
    return AFF_OK;
}

int experiments_stop(aff_experiments *ex, const char *id, experiment *out, aff_err *err)
{
    int rc = AFF_OK;
    pthread_mutex_lock(&ex->mu);
    experiment *e = find(ex, id);
    if (!e) {
        rc = aff__fail(err, AFF_ENOTFOUND, "experiment \"%.64s\" is unknown", id);
    } else if (e->running) {
        experiment s = *e;
        s.running = false;
        s.stopped_ms = ex->cfg.now_ms(ex->cfg.now_ctx);
        if (!(rc = persist(ex, &s, err))) *e = s;
    }
    if (!rc && out) *out = *e;
    pthread_mutex_unlock(&ex->mu);
    return rc;
}

size_t experiments_running(aff_experiments *ex)
{
    size_t n = 0;
    pthread_mutex_lock(&ex->mu);
    for (size_t i = 0; i < ex->n; i++)
        n += ex->list[i].running;
    pthread_mutex_unlock(&ex->mu);
    return n;
}

/* ---- assignment ---------------------------------------------------------------------------- */

double experiments_point(const char *experiment_id, const char *user_id)
{
    char key[OUTCOMES_MAX_LABEL + AFF_MAX_ID_LEN + 2];
    int n = snprintf(key, sizeof key, "%s%c%s", experiment_id, 0x1f, user_id);
    uint64_t h = strmap_hash(key, (size_t)(n < (int)sizeof key ? n : (int)sizeof key - 1));
    /* one splitmix64 round: the string hash's low bits pick table slots, not fractions */
    aff_rng r = {h};
    return (double)(aff_rng_next(&r) >> 11) * (1.0 / 9007199254740992.0);
}

uint32_t experiments_pick(const double *shares, uint32_t n, double u)
{
    double c = 0.0;
    for (uint32_t i = 0; i < n; i++) {
        c += shares[i];
        if (u < c) return i;
    }
    /* rounding left u above the last boundary: the last arm with a share */
    for (uint32_t i = n; i-- > 0;)
        if (shares[i] > 0.0) return i;
    return 0;
}

bool experiments_assign(aff_experiments *ex, const char *collection, const char *surface,
                        const char *user_id, experiments_assignment *out)
{
    if (!ex || !surface || !surface[0] || !user_id || !user_id[0]) return false;
    bool found = false;
    pthread_mutex_lock(&ex->mu);
    for (size_t i = 0; i < ex->n && !found; i++) {
        const experiment *e = &ex->list[i];
        if (!e->running || strcmp(e->surface, surface) || strcmp(e->collection, collection))
            continue;
        uint32_t a = experiments_pick(e->shares, e->n_arms, experiments_point(e->id, user_id));
        memcpy(out->experiment, e->id, sizeof out->experiment);
        out->arm = e->arms[a];
        out->version = e->version;
        found = true;
    }
    pthread_mutex_unlock(&ex->mu);
    return found;
}

/* ---- results ------------------------------------------------------------------------------- */

int experiments_arm_stats(aff_outcomes *o, const experiment *e, uint32_t step_ms,
                          outcomes_row rows[EXPERIMENTS_MAX_ARMS], aff_err *err)
{
    for (uint32_t i = 0; i < e->n_arms; i++) {
        memset(&rows[i], 0, sizeof rows[i]);
        snprintf(rows[i].collection, sizeof rows[i].collection, "%s", e->collection);
        snprintf(rows[i].surface, sizeof rows[i].surface, "%s", e->surface);
        snprintf(rows[i].experiment, sizeof rows[i].experiment, "%s", e->id);
        snprintf(rows[i].arm, sizeof rows[i].arm, "%s", e->arms[i].name);
        snprintf(rows[i].strategy, sizeof rows[i].strategy, "%s",
                 e->arms[i].preset[0] ? e->arms[i].preset : OUTCOMES_DEFAULT_STRAT);
    }
    if (!o) return AFF_OK;
    outcomes_query q = {.collection = e->collection,
                        .experiment = e->id,
                        .from_ms = e->created_ms,
                        .to_ms = e->stopped_ms,
                        .step_ms = step_ms};
    outcomes_result res;
    int rc = outcomes_query_run(o, &q, &res, err);
    if (rc) return rc;
    for (size_t r = 0; r < res.n_rows; r++) {
        const outcomes_row *row = &res.rows[r];
        for (uint32_t i = 0; i < e->n_arms; i++) {
            if (strcmp(row->arm, e->arms[i].name)) continue;
            outcomes_row *a = &rows[i];
            a->c.responses += row->c.responses;
            for (int k = 0; k < OUTCOMES_KINDS; k++)
                a->c.n[k] += row->c.n[k];
            a->c.revenue += row->c.revenue;
            if (row->n_points && !a->points) {
                a->points = calloc(row->n_points, sizeof *a->points);
                if (!a->points) {
                    outcomes_result_free(&res);
                    return aff__fail(err, AFF_ENOMEM, "out of memory encoding an experiment");
                }
                a->n_points = row->n_points;
                for (uint32_t p = 0; p < row->n_points; p++)
                    a->points[p].start_ms = row->points[p].start_ms;
            }
            for (uint32_t p = 0; p < row->n_points && p < a->n_points; p++) {
                for (int k = 0; k < OUTCOMES_KINDS; k++)
                    a->points[p].c.n[k] += row->points[p].c.n[k];
                a->points[p].c.revenue += row->points[p].c.revenue;
            }
        }
    }
    outcomes_result_free(&res);
    return AFF_OK;
}

/* ---- bandit -------------------------------------------------------------------------------- */

/* Gamma(shape >= 1, 1): Marsaglia and Tsang (2000). */
static double gamma_draw(aff_rng *r, double shape)
{
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x, v;
        do {
            x = aff_rng_normal(r);
            v = 1.0 + c * x;
        } while (v <= 0.0);
        v = v * v * v;
        double u = aff_rng_uniform(r);
        if (u < 1.0 - 0.0331 * x * x * x * x) return d * v;
        if (log(u) < 0.5 * x * x + d * (1.0 - v + log(v))) return d * v;
    }
}

void experiments_thompson(const uint64_t *impressions, const uint64_t *successes, uint32_t n,
                          double floor, uint64_t seed, uint64_t version, double *shares)
{
    aff_rng r = {seed ^ (version * 0x9e3779b97f4a7c15ull)};
    uint32_t wins[EXPERIMENTS_MAX_ARMS] = {0};
    for (int d = 0; d < EXPERIMENTS_BANDIT_DRAWS; d++) {
        double best = -1.0;
        uint32_t arg = 0;
        for (uint32_t i = 0; i < n; i++) {
            uint64_t s = successes[i] < impressions[i] ? successes[i] : impressions[i];
            double x = gamma_draw(&r, 1.0 + (double)s);
            double y = gamma_draw(&r, 1.0 + (double)(impressions[i] - s));
            double b = x / (x + y);
            if (b > best) {
                best = b;
                arg = i;
            }
        }
        wins[arg]++;
    }
    double rest = 1.0 - floor * n;
    if (rest < 0.0) rest = 0.0;
    for (uint32_t i = 0; i < n; i++)
        shares[i] = floor + rest * (double)wins[i] / EXPERIMENTS_BANDIT_DRAWS;
}

void experiments_observe(aff_experiments *ex, const char *experiment_id, const char *arm,
                         const bool counted[OUTCOMES_KINDS])
{
    if (!ex || !experiment_id || !experiment_id[0]) return;
    pthread_mutex_lock(&ex->mu);
    experiment *e = find(ex, experiment_id);
    uint32_t a = 0;
    if (e)
        while (a < e->n_arms && strcmp(e->arms[a].name, arm))
            a++;
    if (!e || !e->running || !e->bandit.enabled || a == e->n_arms) {
        pthread_mutex_unlock(&ex->mu);
        return;
    }
    int success_kind =
        e->bandit.metric == EXPERIMENTS_METRIC_CTR ? OUTCOMES_CLICK : OUTCOMES_PURCHASE;
    if (counted[OUTCOMES_IMPRESSION]) {
        e->impressions[a]++;
        e->since_update++;
    }
    if (counted[success_kind]) e->successes[a]++;
    size_t slot = (size_t)(e - ex->list);
    bool update = e->since_update >= e->bandit.update_every && !ex->updating[slot];
    experiment snap;
    if (update) {
        ex->updating[slot] = true;
        e->since_update = 0;
        snap = *e;
    }
    pthread_mutex_unlock(&ex->mu);
    if (!update) return;

    /* Outside the lock: 10^4 draws per arm and an fsync. Counts that arrive meanwhile go on
     * accumulating in the live entry and count toward the next update. */
    snap.version++;
    experiments_thompson(snap.impressions, snap.successes, snap.n_arms, snap.bandit.floor,
                         snap.bandit.seed, snap.version, snap.shares);
    aff_err err;
    int rc = persist(ex, &snap, &err);
    pthread_mutex_lock(&ex->mu);
    e = &ex->list[slot];
    ex->updating[slot] = false;
    if (rc == AFF_OK && e->running) {
        e->version = snap.version;
        memcpy(e->shares, snap.shares, sizeof e->shares);
    }
    pthread_mutex_unlock(&ex->mu);
    if (rc) aff_log(AFF_LOG_WARN, "experiment %s: bandit update not stored: %s", snap.id, err.msg);
}

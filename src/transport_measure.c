/*
 * transport_measure.c: the measurement RPCs — GetStats (outcomes.h) and the experiment calls
 * CreateExperiment, GetExperiment, ListExperiments, StopExperiment (experiments.h): decode,
 * call the module that owns the rule, encode. Rates and Wilson intervals are computed here
 * from the counts the modules return (outcomes_wilson), so GetStats and the web console say
 * the same.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "transport_handlers.h"
#include "transport_measure.h"

/* ---- encoding of counts ---------------------------------------------------------------------- */

static double rate(uint64_t a, uint64_t b)
{
    return b ? (double)a / (double)b : 0.0;
}

/* Storage for the messages one StatsRow points to. */
typedef struct row_pb {
    Affinity__V1__StatsRow row;
    Affinity__V1__Interval ctr, conv;
    Affinity__V1__StatsPoint *points;
    Affinity__V1__StatsPoint **point_ptrs;
} row_pb;

static bool row_to_pb(const outcomes_row *r, row_pb *st)
{
    Affinity__V1__StatsRow *o = &st->row;
    affinity__v1__stats_row__init(o);
    affinity__v1__interval__init(&st->ctr);
    affinity__v1__interval__init(&st->conv);
    o->collection = (char *)r->collection;
    o->surface = (char *)r->surface;
    o->strategy = (char *)r->strategy;
    o->experiment = (char *)r->experiment;
    o->arm = (char *)r->arm;
    const outcomes_counts *c = &r->c;
    uint64_t imp = c->n[OUTCOMES_IMPRESSION];
    o->responses = c->responses;
    o->impressions = imp;
    o->clicks = c->n[OUTCOMES_CLICK];
    o->add_to_carts = c->n[OUTCOMES_ADD_TO_CART];
    o->purchases = c->n[OUTCOMES_PURCHASE];
    o->revenue = c->revenue;
    o->ctr = rate(o->clicks, imp);
    o->add_to_cart_rate = rate(o->add_to_carts, imp);
    o->conversion_rate = rate(o->purchases, imp);
    o->revenue_per_mille = imp ? c->revenue * 1000.0 / (double)imp : 0.0;
    outcomes_wilson(o->clicks, imp, &st->ctr.low, &st->ctr.high);
    outcomes_wilson(o->purchases, imp, &st->conv.low, &st->conv.high);
    o->ctr_interval = &st->ctr;
    o->conversion_interval = &st->conv;
    st->points = NULL;
    st->point_ptrs = NULL;
    if (r->n_points) {
        st->points = calloc(r->n_points, sizeof *st->points);
        st->point_ptrs = calloc(r->n_points, sizeof *st->point_ptrs);
        if (!st->points || !st->point_ptrs) return false;
        for (uint32_t i = 0; i < r->n_points; i++) {
            Affinity__V1__StatsPoint *p = &st->points[i];
            affinity__v1__stats_point__init(p);
            p->start_ms = r->points[i].start_ms;
            p->impressions = r->points[i].c.n[OUTCOMES_IMPRESSION];
            p->clicks = r->points[i].c.n[OUTCOMES_CLICK];
            p->add_to_carts = r->points[i].c.n[OUTCOMES_ADD_TO_CART];
            p->purchases = r->points[i].c.n[OUTCOMES_PURCHASE];
            p->revenue = r->points[i].c.revenue;
            st->point_ptrs[i] = p;
        }
        o->n_points = r->n_points;
        o->points = st->point_ptrs;
    }
    return true;
}

static void row_pb_free(row_pb *st)
{
    free(st->points);
    free(st->point_ptrs);
}

void transport__rpc_get_stats(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__GetStatsRequest *r = (void *)msg;
    aff_err err;
    if (!c->t->cfg.outcomes) {
        transport__fail(c, AFF_EUNSUPPORTED, "this server keeps no outcome metrics");
        return;
    }
    if (r->collection[0] && !transport__require_collection(c, r->collection)) return;
    outcomes_query q = {.collection = r->collection,
                        .surface = r->surface,
                        .experiment = r->experiment,
                        .from_ms = r->from_ms,
                        .to_ms = r->to_ms,
                        .step_ms = r->step_s > UINT32_MAX / 1000 ? UINT32_MAX : r->step_s * 1000u};
    outcomes_result res;
    if (outcomes_query_run(c->t->cfg.outcomes, &q, &res, &err)) {
        tcall_fail(c, &err);
        return;
    }
    row_pb *rows = transport__calloc(res.n_rows, sizeof *rows);
    Affinity__V1__StatsRow **ptrs = transport__calloc(res.n_rows, sizeof *ptrs);
    size_t done = 0;
    bool ok = rows && ptrs;
    for (; ok && done < res.n_rows; done++) {
        ok = row_to_pb(&res.rows[done], &rows[done]);
        ptrs[done] = &rows[done].row;
    }
    if (!ok) {
        transport__fail(c, AFF_ENOMEM, "out of memory encoding statistics");
    } else {
        Affinity__V1__GetStatsResponse__UnattributedEntry un[OUTCOMES_KINDS];
        Affinity__V1__GetStatsResponse__UnattributedEntry *un_ptrs[OUTCOMES_KINDS];
        for (int k = 0; k < OUTCOMES_KINDS; k++) {
            affinity__v1__get_stats_response__unattributed_entry__init(&un[k]);
            un[k].key = (char *)outcomes_kind_name((outcomes_kind)k);
            un[k].value = res.unattributed[k];
            un_ptrs[k] = &un[k];
        }
        Affinity__V1__GetStatsResponse resp = AFFINITY__V1__GET_STATS_RESPONSE__INIT;
        resp.n_rows = res.n_rows;
        resp.rows = ptrs;
        resp.n_unattributed = OUTCOMES_KINDS;
        resp.unattributed = un_ptrs;
        resp.from_ms = res.from_ms;
        resp.to_ms = res.to_ms;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    for (size_t i = 0; rows && i < done; i++)
        row_pb_free(&rows[i]);
    free(rows);
    free(ptrs);
    outcomes_result_free(&res);
}

/* ---- experiments ------------------------------------------------------------------------------
 */

/* Copies a string field; false (and the call failed, naming the field) when it is too long. */
static bool copy_field(tcall *c, char *dst, size_t cap, const char *src, const char *field)
{
    if (strlen(src) >= cap) {
        transport__fail(c, AFF_EINVAL, "%s: at most %zu bytes", field, cap - 1);
        return false;
    }
    memcpy(dst, src, strlen(src) + 1);
    return true;
}

/* Decodes pb into *e (input fields only); the experiments module validates the values. */
static bool experiment_from_pb(tcall *c, const Affinity__V1__Experiment *pb, experiment *e)
{
    memset(e, 0, sizeof *e);
    if (!pb) {
        transport__fail(c, AFF_EINVAL, "experiment is required");
        return false;
    }
    if (!copy_field(c, e->id, sizeof e->id, pb->id, "experiment.id") ||
        !copy_field(c, e->collection, sizeof e->collection, pb->collection,
                    "experiment.collection") ||
        !copy_field(c, e->surface, sizeof e->surface, pb->surface, "experiment.surface"))
        return false;
    if (pb->n_arms > EXPERIMENTS_MAX_ARMS) {
        transport__fail(c, AFF_EINVAL, "experiment.arms: %zu arms; an experiment has 2..%d",
                        pb->n_arms, EXPERIMENTS_MAX_ARMS);
        return false;
    }
    e->n_arms = (uint32_t)pb->n_arms;
    for (uint32_t i = 0; i < e->n_arms; i++) {
        const Affinity__V1__ExperimentArm *a = pb->arms[i];
        experiments_arm *o = &e->arms[i];
        char field[48];
        snprintf(field, sizeof field, "experiment.arms[%u].name", i);
        if (!copy_field(c, o->name, sizeof o->name, a->name, field)) return false;
        snprintf(field, sizeof field, "experiment.arms[%u].preset", i);
        if (!copy_field(c, o->preset, sizeof o->preset, a->preset, field)) return false;
        o->share = a->share;
        o->space = (int)a->space;
        if (a->diversity) {
            o->has_diversity = true;
            o->diversity = a->diversity->value;
        }
        if (a->exploration_share) {
            o->has_exploration = true;
            o->exploration_share = a->exploration_share->value;
        }
    }
    if (pb->bandit) {
        e->bandit.enabled = pb->bandit->enabled;
        e->bandit.metric = (int)pb->bandit->metric;
        if (pb->bandit->floor) {
            e->bandit.has_floor = true;
            e->bandit.floor = pb->bandit->floor->value;
        }
        e->bandit.update_every = pb->bandit->update_every;
        e->bandit.seed = pb->bandit->seed;
    }
    return true;
}

/* Storage for one ExperimentResult. */
typedef struct result_pb {
    Affinity__V1__ExperimentResult res;
    Affinity__V1__Experiment exp;
    Affinity__V1__Bandit bandit;
    Affinity__V1__FloatValue floor;
    Affinity__V1__ExperimentArm arms[EXPERIMENTS_MAX_ARMS];
    Affinity__V1__ExperimentArm *arm_ptrs[EXPERIMENTS_MAX_ARMS];
    Affinity__V1__FloatValue div[EXPERIMENTS_MAX_ARMS], expl[EXPERIMENTS_MAX_ARMS];
    double shares[EXPERIMENTS_MAX_ARMS];
    Affinity__V1__ArmResult results[EXPERIMENTS_MAX_ARMS];
    Affinity__V1__ArmResult *result_ptrs[EXPERIMENTS_MAX_ARMS];
    outcomes_row rows[EXPERIMENTS_MAX_ARMS];
    row_pb row_pbs[EXPERIMENTS_MAX_ARMS];
    experiment e;
} result_pb;

static void result_pb_free(result_pb *st)
{
    for (uint32_t i = 0; i < st->e.n_arms; i++) {
        row_pb_free(&st->row_pbs[i]);
        free(st->rows[i].points);
        st->rows[i].points = NULL;
    }
}

static int result_to_pb(transport *t, const experiment *e, uint32_t step_s, result_pb *st,
                        aff_err *err)
{
    memset(st, 0, sizeof *st);
    st->e = *e;
    e = &st->e;
    int rc = experiments_arm_stats(t->cfg.outcomes, e, step_s * 1000u, st->rows, err);
    if (rc) return rc;
    Affinity__V1__Experiment *x = &st->exp;
    affinity__v1__experiment__init(x);
    x->id = (char *)e->id;
    x->collection = (char *)e->collection;
    x->surface = (char *)e->surface;
    x->running = e->running;
    x->created_ms = e->created_ms;
    x->stopped_ms = e->stopped_ms;
    x->bandit_version = e->version;
    x->n_current_shares = e->n_arms;
    x->current_shares = (double *)e->shares;
    affinity__v1__bandit__init(&st->bandit);
    st->bandit.enabled = e->bandit.enabled;
    st->bandit.metric = (Affinity__V1__BanditMetric)e->bandit.metric;
    st->bandit.update_every = e->bandit.update_every;
    st->bandit.seed = e->bandit.seed;
    if (e->bandit.has_floor) {
        affinity__v1__float_value__init(&st->floor);
        st->floor.value = (float)e->bandit.floor;
        st->bandit.floor = &st->floor;
    }
    x->bandit = &st->bandit;
    x->n_arms = e->n_arms;
    x->arms = st->arm_ptrs;
    Affinity__V1__ExperimentResult *res = &st->res;
    affinity__v1__experiment_result__init(res);
    res->experiment = x;
    res->n_arms = e->n_arms;
    res->arms = st->result_ptrs;
    for (uint32_t i = 0; i < e->n_arms; i++) {
        const experiments_arm *a = &e->arms[i];
        Affinity__V1__ExperimentArm *pa = &st->arms[i];
        affinity__v1__experiment_arm__init(pa);
        pa->name = (char *)a->name;
        pa->share = a->share;
        pa->preset = (char *)a->preset;
        pa->space = (Affinity__V1__Space)a->space;
        if (a->has_diversity) {
            affinity__v1__float_value__init(&st->div[i]);
            st->div[i].value = a->diversity;
            pa->diversity = &st->div[i];
        }
        if (a->has_exploration) {
            affinity__v1__float_value__init(&st->expl[i]);
            st->expl[i].value = a->exploration_share;
            pa->exploration_share = &st->expl[i];
        }
        st->arm_ptrs[i] = pa;
        Affinity__V1__ArmResult *ar = &st->results[i];
        affinity__v1__arm_result__init(ar);
        ar->arm = (char *)a->name;
        ar->share = e->shares[i];
        if (!row_to_pb(&st->rows[i], &st->row_pbs[i]))
            return aff__fail(err, AFF_ENOMEM, "out of memory encoding an experiment");
        ar->stats = &st->row_pbs[i].row;
        ar->bandit_impressions = e->impressions[i];
        ar->bandit_successes = e->successes[i];
        st->result_ptrs[i] = ar;
    }
    return AFF_OK;
}

static void finish_result(tcall *c, const experiment *e, uint32_t step_s)
{
    aff_err err;
    result_pb *st = malloc(sizeof *st);
    if (!st) {
        transport__fail(c, AFF_ENOMEM, "out of memory encoding an experiment");
        return;
    }
    if (result_to_pb(c->t, e, step_s, st, &err))
        tcall_fail(c, &err);
    else
        tcall_finish(c, 0, NULL, &st->res.base);
    result_pb_free(st);
    free(st);
}

static bool have_experiments(tcall *c)
{
    if (c->t->cfg.experiments) return true;
    transport__fail(c, AFF_EUNSUPPORTED, "this server runs no experiments");
    return false;
}

void transport__rpc_create_experiment(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__CreateExperimentRequest *r = (void *)msg;
    aff_err err;
    experiment e;
    if (!have_experiments(c) || !experiment_from_pb(c, r->experiment, &e)) return;
    if (!e.collection[0]) {
        transport__fail(c, AFF_EINVAL, "experiment.collection is required");
        return;
    }
    if (!transport__require_collection(c, e.collection)) return;
    experiment out;
    if (experiments_add(c->t->cfg.experiments, &e, &out, &err)) {
        tcall_fail(c, &err);
        return;
    }
    finish_result(c, &out, 0);
}

/* The experiment a call names, when the server keeps experiments, it exists and the call's
 * token may use its collection; otherwise the call is answered and false returned. */
static bool experiment_of_call(tcall *c, const char *id, experiment *e)
{
    aff_err err;
    if (!have_experiments(c)) return false;
    if (experiments_get(c->t->cfg.experiments, id, e, &err)) {
        tcall_fail(c, &err);
        return false;
    }
    if (!transport__key_may_use(c, e->collection)) {
        tcall_finish(c, GRPC_STATUS_PERMISSION_DENIED,
                     "this token may not use this experiment's collection", NULL);
        return false;
    }
    return true;
}

void transport__rpc_get_experiment(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__GetExperimentRequest *r = (void *)msg;
    experiment e;
    if (!experiment_of_call(c, r->id, &e)) return;
    finish_result(c, &e, r->step_s > UINT32_MAX / 1000 ? UINT32_MAX / 1000 : r->step_s);
}

void transport__rpc_stop_experiment(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__StopExperimentRequest *r = (void *)msg;
    aff_err err;
    experiment e;
    if (!experiment_of_call(c, r->id, &e)) return;
    if (experiments_stop(c->t->cfg.experiments, r->id, &e, &err)) {
        tcall_fail(c, &err);
        return;
    }
    finish_result(c, &e, 0);
}

void transport__rpc_list_experiments(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__ListExperimentsRequest *r = (void *)msg;
    aff_err err;
    if (!have_experiments(c)) return;
    if (r->collection[0] && !transport__require_collection(c, r->collection)) return;
    experiment *list = NULL;
    size_t n = 0;
    if (experiments_list(c->t->cfg.experiments, r->collection, &list, &n, &err)) {
        tcall_fail(c, &err);
        return;
    }
    result_pb *st = transport__calloc(n, sizeof *st);
    Affinity__V1__ExperimentResult **ptrs = transport__calloc(n, sizeof *ptrs);
    size_t done = 0;
    int rc = st && ptrs ? AFF_OK : aff__fail(&err, AFF_ENOMEM, "out of memory listing");
    for (; !rc && done < n; done++) {
        rc = result_to_pb(c->t, &list[done], 0, &st[done], &err);
        ptrs[done] = &st[done].res;
    }
    if (rc) {
        tcall_fail(c, &err);
    } else {
        Affinity__V1__ListExperimentsResponse resp = AFFINITY__V1__LIST_EXPERIMENTS_RESPONSE__INIT;
        resp.n_experiments = n;
        resp.experiments = ptrs;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    for (size_t i = 0; st && i < done; i++)
        result_pb_free(&st[i]);
    free(st);
    free(ptrs);
    free(list);
}

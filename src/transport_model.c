/*
 * transport_model.c: owns the learning RPCs: decoding their parameters (validated once, by
 * als_params_check, with the field named here), starting jobs, and encoding model state. No
 * learning logic: that is model.c's.
 */
#include "transport_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const space_content = "content", *const space_behaviour = "behaviour";

int transport__model_params(const Affinity__V1__ModelParams *pb, const als_params *base,
                            const char *prefix, als_params *out, aff_err *err)
{
    *out = *base;
    if (!pb) return AFF_OK;
    if (pb->factors) out->factors = pb->factors;
    if (pb->lambda) out->lambda = pb->lambda->value;
    if (pb->alpha0) out->alpha0 = pb->alpha0->value;
    if (pb->epochs) out->epochs = pb->epochs;
    if (pb->nu) out->nu = pb->nu->value;
    if (pb->cg_steps) out->cg_steps = pb->cg_steps->value;
    int status = als_params_check(out, err);
    if (status) {
        char msg[sizeof err->msg];
        snprintf(msg, sizeof msg, "%s", err->msg);
        /* als_params_check names the field first ("factors = 3 is ..."). */
        return aff__fail(err, status, "%s.%s", prefix, msg);
    }
    return AFF_OK;
}

static void params_to_pb(const als_params *p, Affinity__V1__ModelParams *pb,
                         Affinity__V1__FloatValue *f, Affinity__V1__UInt32Value *cg)
{
    affinity__v1__model_params__init(pb);
    for (int i = 0; i < 3; i++)
        affinity__v1__float_value__init(&f[i]);
    affinity__v1__uint32_value__init(cg);
    pb->factors = p->factors;
    pb->epochs = p->epochs;
    f[0].value = p->lambda;
    f[1].value = p->alpha0;
    f[2].value = p->nu;
    cg->value = p->cg_steps;
    pb->lambda = &f[0];
    pb->alpha0 = &f[1];
    pb->nu = &f[2];
    pb->cg_steps = cg;
}

static void model_info_to_pb(tmodel_pb *st)
{
    const model_info *mi = &st->mi;
    Affinity__V1__ModelInfo *info = &st->info;
    affinity__v1__model_info__init(info);
    info->state = (char *)model_state_name(mi->state);
    if (mi->has_model) {
        info->version = mi->current.id;
        info->trained_at_ms = mi->current.trained_at_ms;
        info->events_used = mi->current.events_used;
        info->users = mi->current.users;
        info->items = mi->current.items;
        info->epochs = mi->current.epochs;
        info->loss = mi->current.loss;
        info->duration_s = mi->current.duration_s;
        params_to_pb(&mi->current.params, &st->params, st->floats, &st->cg[0]);
        info->params = &st->params;
    }
    params_to_pb(&mi->params, &st->next, st->floats + 3, &st->cg[1]);
    info->next_params = &st->next;
    info->events_since_train = mi->events_since_train;
    if (mi->job_id) {
        affinity__v1__training_job__init(&st->job);
        st->job.id = mi->job_id;
        st->job.running = mi->job_running;
        st->job.epoch = mi->job_epoch;
        st->job.epochs = mi->job_epochs;
        st->job.loss = mi->job_loss;
        st->job.started_ms = mi->job_started_ms;
        st->job.error = (char *)mi->last_error;
        info->job = &st->job;
    }
}

void transport__collection_model(transport *t, const char *collection,
                                 Affinity__V1__CollectionInfo *info, tmodel_pb *st)
{
    info->spaces = st->spaces;
    info->n_spaces = 0;
    if (info->dimension > 0) st->spaces[info->n_spaces++] = (char *)space_content;
    aff_err err;
    if (!t->cfg.model || model_get_info(t->cfg.model, collection, &st->mi, &err) != AFF_OK) return;
    if (st->mi.has_model) st->spaces[info->n_spaces++] = (char *)space_behaviour;
    model_info_to_pb(st);
    info->model = &st->info;
}

static bool require_model_module(tcall *c)
{
    if (c->t->cfg.model) return true;
    tcall_finish(c, aff_status_grpc_code(AFF_EUNSUPPORTED),
                 "learning is not enabled on this server", NULL);
    return false;
}

void transport__rpc_train(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__TrainRequest *r = (void *)msg;
    aff_err err;
    if (!require_model_module(c)) return;
    aff_model *m = c->t->cfg.model;
    als_params base, p;
    uint64_t job = 0;
    bool running = false;
    if (model_get_params(m, r->collection, &base, &err) ||
        transport__model_params(r->params, &base, "params", &p, &err) ||
        (r->save_params && model_configure(m, r->collection, &p, &err)) ||
        model_train(m, r->collection, &p, &job, &running, &err)) {
        tcall_fail(c, &err);
        return;
    }
    tmodel_pb st;
    if (model_get_info(m, r->collection, &st.mi, &err)) {
        tcall_fail(c, &err);
        return;
    }
    model_info_to_pb(&st);
    Affinity__V1__TrainResponse resp = AFFINITY__V1__TRAIN_RESPONSE__INIT;
    resp.job_id = job;
    resp.already_running = running;
    resp.model = &st.info;
    tcall_finish(c, 0, NULL, &resp.base);
}

void transport__rpc_get_model(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__GetModelRequest *r = (void *)msg;
    aff_err err;
    if (!require_model_module(c)) return;
    tmodel_pb st;
    if (model_get_info(c->t->cfg.model, r->collection, &st.mi, &err)) {
        tcall_fail(c, &err);
        return;
    }
    model_info_to_pb(&st);
    tcall_finish(c, 0, NULL, &st.info.base);
}

void transport__rpc_get_segment(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__GetSegmentRequest *r = (void *)msg;
    aff_err err;
    if (!require_model_module(c)) return;
    if (r->n_item_ids == 0 || r->n_item_ids > 1024) {
        tcall_finish(c, aff_status_grpc_code(AFF_EINVAL), "item_ids must hold 1..1024 ids", NULL);
        return;
    }
    uint32_t k = r->k;
    model_segment_hit *hits = k >= 1 && k <= 100000 ? malloc((size_t)k * sizeof *hits) : NULL;
    Affinity__V1__SegmentUser *users = NULL, **ptrs = NULL;
    uint32_t n = 0;
    if (k < 1 || k > 100000) {
        tcall_finish(c, aff_status_grpc_code(AFF_EINVAL), "k must be 1..100000", NULL);
        return;
    }
    if (!hits) {
        tcall_finish(c, aff_status_grpc_code(AFF_ENOMEM), "out of memory", NULL);
        return;
    }
    if (model_segment(c->t->cfg.model, r->collection, (const char *const *)r->item_ids,
                      r->n_item_ids, k, hits, &n, &err)) {
        tcall_fail(c, &err);
        goto out;
    }
    users = calloc(n ? n : 1, sizeof *users);
    ptrs = calloc(n ? n : 1, sizeof *ptrs);
    if (!users || !ptrs) {
        tcall_finish(c, aff_status_grpc_code(AFF_ENOMEM), "out of memory", NULL);
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        affinity__v1__segment_user__init(&users[i]);
        users[i].user_id = hits[i].user;
        users[i].score = hits[i].score;
        ptrs[i] = &users[i];
    }
    model_info mi;
    Affinity__V1__GetSegmentResponse resp = AFFINITY__V1__GET_SEGMENT_RESPONSE__INIT;
    if (model_get_info(c->t->cfg.model, r->collection, &mi, &err) == AFF_OK && mi.has_model)
        resp.model_version = mi.current.id;
    resp.n_users = n;
    resp.users = ptrs;
    tcall_finish(c, 0, NULL, &resp.base);
out:
    free(hits);
    free(users);
    free(ptrs);
}

/*
 * transport_model.c: owns the learning RPCs: decoding their parameters (validated once, by
 * als_params_check, with the field named here), starting jobs, and encoding model state. No
 * learning logic: that is model.c's.
 *
 * Replication (--log, docs/replication.md): a Train record is applied on every replica (its
 * parameters saved everywhere when save_params is set) but only the replica that published
 * it trains. Its job hands the model's blob to transport_log_publish_model, which puts it
 * through the log as ModelPart records and one ModelCommit; every replica installs it when
 * it applies the commit (model_install_blob), with the commit's sequence as the version, so
 * replicas at the same log position serve the same model.
 */
#include "transport_model.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "log.h"

#define MODEL_PART_BYTES      (512u << 10) /* blob bytes per ModelPart record (< 1 MiB) */
#define MODEL_PUBLISH_TRY_MS  10000        /* one publish's wait for the stream */
#define MODEL_PUBLISH_BUDGET  120000       /* retries of one record, ms */

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
        /* from the log: only the replica that received the call trains */
        ((!c->capture || c->log_own) &&
         model_train(m, r->collection, &p, &job, &running, &err))) {
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

/* ---- replication: a trained model through the write log ---------------------------------- */

static uint64_t fnv1a64(const uint8_t *p, size_t n)
{
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Publishes one record, retrying while the log is unavailable (a repeated part or commit is
 * harmless: a part is rewritten with the same bytes, a second commit finds no parts). */
static int publish_retrying(transport *t, const char *method, const ProtobufCMessage *req,
                            uint64_t *seq, char *msg, size_t msg_size)
{
    int64_t until = mono_ms() + MODEL_PUBLISH_BUDGET;
    for (;;) {
        int rc = transport__log_publish(t, method, req, MODEL_PUBLISH_TRY_MS, seq, msg, msg_size);
        if (rc != AFF_EUNAVAILABLE || mono_ms() > until || atomic_load(&t->draining)) return rc;
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 500 * 1000000L};
        nanosleep(&pause, NULL);
    }
}

int transport_log_publish_model(void *ctx, const char *collection, const void *blob, size_t len,
                                aff_err *err)
{
    transport *t = ctx;
    /* Upload ids grow with time (store_commit_model drops older, abandoned uploads' parts);
     * the low bits tell apart uploads of the same millisecond. */
    uint32_t noise = 0;
    if (getrandom(&noise, sizeof noise, 0) != (ssize_t)sizeof noise) noise = (uint32_t)mono_ms();
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t upload = ((uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_nsec / 1000000) << 20 |
                      (noise & 0xfffff);
    uint32_t parts = (uint32_t)((len + MODEL_PART_BYTES - 1) / MODEL_PART_BYTES);
    char msg[512];
    uint64_t seq = 0;
    for (uint32_t i = 0; i < parts; i++) {
        Affinity__V1__ModelPartRecord pr = AFFINITY__V1__MODEL_PART_RECORD__INIT;
        size_t off = (size_t)i * MODEL_PART_BYTES;
        pr.collection = (char *)collection;
        pr.upload = upload;
        pr.index = i;
        pr.data.data = (uint8_t *)blob + off;
        pr.data.len = len - off < MODEL_PART_BYTES ? len - off : MODEL_PART_BYTES;
        int rc = publish_retrying(t, "ModelPart", &pr.base, &seq, msg, sizeof msg);
        if (rc)
            return aff__fail(err, rc, "model: part %u of %u not committed to the write log: %s",
                             i, parts, msg);
    }
    Affinity__V1__ModelCommitRecord cr = AFFINITY__V1__MODEL_COMMIT_RECORD__INIT;
    cr.collection = (char *)collection;
    cr.upload = upload;
    cr.parts = parts;
    cr.bytes = len;
    cr.checksum = fnv1a64(blob, len);
    int rc = publish_retrying(t, "ModelCommit", &cr.base, &seq, msg, sizeof msg);
    if (rc) return aff__fail(err, rc, "model: commit not written to the write log: %s", msg);
    char v[24], b[24];
    snprintf(v, sizeof v, "%" PRIu64, seq);
    snprintf(b, sizeof b, "%zu", len);
    aff_log_kv(AFF_LOG_INFO, "model published through the write log", "collection", collection,
               "version", v, "bytes", b, NULL);
    /* Not waiting for this replica's install: a DropCollection being applied joins this job. */
    return AFF_OK;
}

int transport_log_request_train(void *ctx, const char *collection, uint64_t version,
                                aff_err *err)
{
    transport *t = ctx;
    char rid[AFF_MAX_NAME_LEN + 48];
    snprintf(rid, sizeof rid, "auto-train/%s/%" PRIu64, collection, version);
    Affinity__V1__TrainRequest req = AFFINITY__V1__TRAIN_REQUEST__INIT;
    req.collection = (char *)collection;
    req.request_id = rid;
    uint64_t seq = 0;
    char msg[512];
    int rc = transport__log_publish(t, "Train", &req.base, 5000, &seq, msg, sizeof msg);
    return rc ? aff__fail(err, rc, "%s", msg) : AFF_OK;
}

void transport__apply_model_part(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__ModelPartRecord *r = (void *)msg;
    aff_err err;
    if (store_put_model_part(c->t->cfg.store, r->collection, r->upload, r->index, r->data.data,
                             r->data.len, &err)) {
        tcall_fail(c, &err);
        return;
    }
    tcall_finish(c, 0, NULL, NULL);
}

void transport__apply_model_commit(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__ModelCommitRecord *r = (void *)msg;
    aff_err err = {0};
    void *blob = NULL;
    size_t len = 0;
    char v[24];
    snprintf(v, sizeof v, "%" PRIu64, c->log_sequence);
    int status = c->t->cfg.model ? AFF_OK
                                 : aff__fail(&err, AFF_EUNSUPPORTED,
                                             "learning is not enabled on this server");
    if (!status)
        status = store_get_model_parts(c->t->cfg.store, r->collection, r->upload, r->parts, &blob,
                                       &len, &err);
    if (!status && (len != r->bytes || fnv1a64(blob, len) != r->checksum))
        status = aff__fail(&err, AFF_EINTERNAL,
                           "model upload %" PRIu64 ": the parts hold %zu bytes that do not "
                           "match the commit (%" PRIu64 " bytes, checksum)",
                           r->upload, len, r->bytes);
    if (!status)
        status = model_install_blob(c->t->cfg.model, r->collection, blob, len, c->log_sequence,
                                    r->upload, &err);
    free(blob);
    if (status) {
        aff_log_kv(AFF_LOG_ERROR, "model from the write log not installed", "collection",
                   r->collection, "version", v, "error", err.msg, NULL);
        tcall_fail(c, &err);
        return;
    }
    aff_log_kv(AFF_LOG_INFO, "model installed from the write log", "collection", r->collection,
               "version", v, NULL);
    tcall_finish(c, 0, NULL, NULL);
}

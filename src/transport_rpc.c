/*
 * transport_rpc.c: the affinity.v1 and grpc.health.v1 method table (the one list of methods
 * the server knows), the helpers the handler files share (transport_handlers.h), and the
 * operations and health handlers. The handlers live by service area:
 *   transport_catalog.c  collections and items          (catalog, engine)
 *   transport_serving.c  Search, SimilarItems, Recommend, Rerank, BatchRecommend (pipeline)
 *   transport_events.c   PutEvents, GetUser, DeleteUser (profiles)
 * Rules every handler keeps: it answers its call exactly once (tcall_finish / tcall_fail);
 * request memory belongs to the call (c->req) and per-call state to c->state; it decodes,
 * calls the module that owns the decision, and encodes; input rules are checked by that
 * module, not here. Methods that block on disk (fsync) are marked BLOCKING and run on the
 * transport's blocking-work threads (transport_internal.h).
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "affinity/v1/affinity.pb-c.h"
#include "catalog.h"
#include "grpc/health/v1/health.pb-c.h"
#include "log.h"
#include "metrics.h"
#include "profiles.h"
#include "transport_codec.h"
#include "transport_handlers.h"
#include "transport_import.h"
#include "transport_measure.h"
#include "transport_model.h"
#include "transport_privacy.h"
#include "transport_reflection.h"

/* ---- helpers shared by the handler files (transport_handlers.h) ---------------------------- */

void transport__fail(tcall *c, int aff_code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    tcall_finish(c, aff_status_grpc_code(aff_code), msg, NULL);
}

void *transport__calloc(size_t n, size_t size)
{
    return calloc(n ? n : 1, size);
}

bool transport__require_collection(tcall *c, const char *collection)
{
    aff_err err;
    uint32_t dim;
    if (engine_collection_dim(c->t->engine, collection, &dim, &err) == AFF_OK) return true;
    tcall_fail(c, &err);
    return false;
}

/* ---- operations and health ---------------------------------------------------------------- */

static void rpc_get_server_info(tcall *c, ProtobufCMessage *msg)
{
    transport *t = c->t;
    backend_info bi;
    batcher_stats bs;
    engine_backend_info(t->engine, &bi);
    batcher_get_stats(t->batcher, &bs);
    Affinity__V1__BatchStats stats = AFFINITY__V1__BATCH_STATS__INIT;
    stats.batches = bs.batches;
    stats.requests = bs.requests;
    stats.queries = bs.queries;
    stats.max_batch_seen = bs.max_batch_seen;
    stats.n_size_histogram = BATCHER_HIST_BUCKETS;
    stats.size_histogram = bs.size_histogram;
    stats.queue_wait_us_total = bs.queue_wait_us_total;
    stats.rejected_queue_full = bs.rejected_queue_full;
    stats.expired_deadline = bs.expired_deadline;
    stats.queued = bs.queued;
    Affinity__V1__ServerInfo info = AFFINITY__V1__SERVER_INFO__INIT;
    info.version = (char *)AFF_VERSION_STRING;
    info.backend = bi.name;
    info.device = bi.device;
    info.device_memory_used = bi.memory_used;
    info.device_memory_total = bi.memory_total;
    info.max_batch = t->cfg.max_batch;
    info.max_wait_us = t->cfg.max_wait_us;
    info.batch_stats = &stats;
    info.persistent = catalog_persistent(t->cfg.catalog);
    info.device_faults = bi.device_faults; /* issue 17: GPU device faults */
    info.tables_on_cpu = bi.tables_on_cpu;
    info.device_fault = bi.fault;
    if (t->cfg.widgets) { /* issue 13 */
        widgets_stats ws;
        widgets_get_stats(t->cfg.widgets, &ws);
        info.widget_events_held = ws.events_held;
        info.widget_neighbours = ws.neighbours;
        info.widget_memory_bytes = ws.bytes;
    }
    if (t->cfg.log) { /* replication */
        info.log_enabled = true;
        info.log_applied_sequence = replog_applied(t->cfg.log);
        info.log_last_sequence = replog_last_known(t->cfg.log);
        transport__log_lag(t, &info.log_apply_lag_p50_ms, &info.log_apply_lag_p99_ms);
    }
    tcall_finish(c, 0, NULL, &info.base);
}

static void rpc_health_check(tcall *c, ProtobufCMessage *msg)
{
    const Grpc__Health__V1__HealthCheckRequest *r = (void *)msg;
    if (r->service[0] && strcmp(r->service, "affinity.v1.Affinity") != 0) {
        transport__fail(c, AFF_ENOTFOUND,
                        "unknown service \"%.128s\"; this server reports \"\" and "
                        "\"affinity.v1.Affinity\"",
                        r->service);
        return;
    }
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = transport__serving(c->t)
                      ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                      : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
    tcall_finish(c, 0, NULL, &resp.base);
}

static void rpc_health_watch(tcall *c)
{
    tcall_finish(c, GRPC_STATUS_UNIMPLEMENTED,
                 "grpc.health.v1.Health/Watch is not supported; poll Health/Check", NULL);
}

/* ---- the method table --------------------------------------------------------------------- */

#define AFF_PATH(m) "/affinity.v1.Affinity/" m
#define UNARY(m, desc, fn)                                                                         \
    {                                                                                              \
        AFF_PATH(m), &affinity__v1__##desc##__descriptor, false, false, fn, NULL                   \
    }
#define BLOCKING(m, desc, fn)                                                                      \
    {                                                                                              \
        AFF_PATH(m), &affinity__v1__##desc##__descriptor, false, true, fn, NULL                    \
    }
#define STREAM(m, fn)                                                                              \
    {                                                                                              \
        AFF_PATH(m), NULL, false, false, NULL, fn                                                  \
    }

const tmethod_def transport__methods[] = {
    BLOCKING("CreateCollection", create_collection_request, rpc_create_collection),
    BLOCKING("DropCollection", drop_collection_request, rpc_drop_collection),
    UNARY("ListCollections", list_collections_request, rpc_list_collections),
    UNARY("DescribeCollection", describe_collection_request, rpc_describe_collection),
    STREAM("UpsertItems", rpc_upsert_items),
    BLOCKING("DeleteItems", delete_items_request, rpc_delete_items),
    UNARY("GetItems", get_items_request, rpc_get_items),
    UNARY("Search", search_request, rpc_search),
    UNARY("SimilarItems", similar_items_request, rpc_similar_items),
    UNARY("Recommend", recommend_request, rpc_recommend),
    UNARY("Rerank", rerank_request, rpc_rerank),
    STREAM("BatchRecommend", rpc_batch_recommend),
    UNARY("RecommendPage", recommend_page_request, rpc_recommend_page),
    BLOCKING("PutEvents", put_events_request, rpc_put_events),
    UNARY("GetUser", get_user_request, rpc_get_user),
    BLOCKING("DeleteUser", delete_user_request, rpc_delete_user),
    STREAM("ImportEvents", transport__import_events),       /* transport_import.c */
    BLOCKING("Train", train_request, transport__rpc_train), /* transport_model.c */
    UNARY("GetModel", get_model_request, transport__rpc_get_model),
    UNARY("GetSegment", get_segment_request, transport__rpc_get_segment),
    BLOCKING("ExportUser", export_user_request, transport__rpc_export_user), /* issue 12 */
    BLOCKING("SetUserOptOut", set_user_opt_out_request, transport__rpc_set_user_opt_out),
    UNARY("GetServerInfo", get_server_info_request, rpc_get_server_info),
    /* measurement (transport_measure.c); creating and stopping store durably */
    UNARY("GetStats", get_stats_request, transport__rpc_get_stats),
    BLOCKING("CreateExperiment", create_experiment_request, transport__rpc_create_experiment),
    UNARY("GetExperiment", get_experiment_request, transport__rpc_get_experiment),
    UNARY("ListExperiments", list_experiments_request, transport__rpc_list_experiments),
    BLOCKING("StopExperiment", stop_experiment_request, transport__rpc_stop_experiment),
    STREAM("GetSnapshot", transport__rpc_get_snapshot), /* replication: transport_log.c */
    {"/grpc.health.v1.Health/Check", &grpc__health__v1__health_check_request__descriptor, true,
     false, rpc_health_check, NULL},
    {"/grpc.health.v1.Health/Watch", NULL, true, false, NULL, rpc_health_watch},
    /* issue 12: server reflection (transport_reflection.c) */
    {TRANSPORT_REFLECTION_V1, NULL, false, false, NULL, transport__reflection_info},
    {TRANSPORT_REFLECTION_V1ALPHA, NULL, false, false, NULL, transport__reflection_info},
};
const size_t transport__n_methods = sizeof transport__methods / sizeof transport__methods[0];

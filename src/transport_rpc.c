/*
 * transport_rpc.c: owns the affinity.v1 and grpc.health.v1 handlers: decoding requests into
 * engine structs, validation with messages that say what is allowed, batcher submission and
 * response encoding. Rules kept: every handler answers its call exactly once (tcall_finish /
 * tcall_fail); request memory belongs to the call (c->req) and per-call state to c->state;
 * serving calls reach the engine only through the batcher.
 *
 * Durable writes and profiles: catalog writes go through the catalog (engine, then a durable
 * store commit; the call is answered only after it), PutEvents/GetUser/DeleteUser and
 * Recommend/Rerank by user_id through the profiles module. Writes block on disk (fsync):
 * their methods are marked blocking and run on the transport's blocking-work threads (see
 * transport_internal.h), never on a completion-queue thread or the batcher's. Profile reads
 * (a snapshot, no fsync) run where the call arrives.
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
#include "transport_internal.h"
#include "transport_privacy.h"
#include "transport_reflection.h"

#define MAX_QUERIES_PER_CALL   1024   /* Search/SimilarItems queries in one request */
#define MAX_IDS_PER_CALL       100000 /* GetItems/DeleteItems ids in one request */
#define STREAM_MAX_OUTSTANDING 256    /* BatchRecommend requests read but not yet answered */

/* ---- small helpers ---------------------------------------------------------------------- */

static void fail(tcall *c, int aff_code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void fail(tcall *c, int aff_code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    tcall_finish(c, aff_status_grpc_code(aff_code), msg, NULL);
}

static void *xcalloc(size_t n, size_t size)
{
    return calloc(n ? n : 1, size);
}

static void filter_from_pb(const Affinity__V1__Filter *f, aff_filter *out)
{
    aff_filter_init(out);
    if (!f) return;
    out->categories = (const char *const *)f->categories;
    out->n_categories = (uint32_t)f->n_categories;
    out->tags = (const char *const *)f->tags;
    out->n_tags = (uint32_t)f->n_tags;
    if (f->price_min) out->price_min = f->price_min->value;
    if (f->price_max) out->price_max = f->price_max->value;
    out->available_only = f->available_only;
    out->exclude_ids = (const char *const *)f->exclude_ids;
    out->n_exclude_ids = (uint32_t)f->n_exclude_ids;
}

static Affinity__V1__Metric metric_to_pb(aff_metric m)
{
    switch (m) {
    case AFF_METRIC_IP:
        return AFFINITY__V1__METRIC__METRIC_INNER_PRODUCT;
    case AFF_METRIC_L2:
        return AFFINITY__V1__METRIC__METRIC_L2;
    default:
        return AFFINITY__V1__METRIC__METRIC_COSINE;
    }
}

/* Fills info (strings point into ci and bi, which must outlive the packing). */
static void collection_info_to_pb(const engine_collection_info *ci, const backend_info *bi,
                                  Affinity__V1__CollectionInfo *info)
{
    affinity__v1__collection_info__init(info);
    info->name = (char *)ci->name;
    info->dimension = ci->dim;
    info->metric = metric_to_pb(ci->metric);
    info->index = ci->index == BACKEND_INDEX_HNSW ? AFFINITY__V1__INDEX_KIND__INDEX_KIND_HNSW
                                                  : AFFINITY__V1__INDEX_KIND__INDEX_KIND_FLAT;
    info->item_count = ci->n_items;
    info->memory_bytes = ci->memory_bytes;
    info->backend = (char *)(ci->backend[0] ? ci->backend : bi->name);
    info->device = (char *)bi->device;
    info->hnsw_m = ci->hnsw_m;
    info->hnsw_ef_search = ci->hnsw_ef_search;
}

/* ---- behaviour events and profiles ------------------------------------------------------- */

/* Checks that the collection exists (NOT_FOUND from the engine, with its message). */
static bool require_collection(tcall *c, const char *collection)
{
    aff_err err;
    uint32_t dim;
    if (engine_collection_dim(c->t->engine, collection, &dim, &err) == AFF_OK) return true;
    tcall_fail(c, &err);
    return false;
}

/* A rejection the transport decides itself (before the profiles module sees the event). */
static bool event_precheck(const Affinity__V1__Event *e, char *reason, size_t size)
{
    if (!isfinite(e->value)) {
        snprintf(reason, size, "value must be a finite number");
        return false;
    }
    if (e->custom_type[0] && e->type != AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CUSTOM) {
        snprintf(reason, size,
                 "custom_type '%.64s' is set but type is not EVENT_TYPE_CUSTOM; set one or "
                 "the other",
                 e->custom_type);
        return false;
    }
    if (e->type == AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CUSTOM && !e->custom_type[0]) {
        snprintf(reason, size,
                 "EVENT_TYPE_CUSTOM needs custom_type (a type configured with "
                 "--event-weights)");
        return false;
    }
    return true;
}

/* PutEvents: one durable transaction for the call's valid events; each invalid one comes
 * back as a RejectedEvent with its position and reason. */
static void rpc_put_events(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__PutEventsRequest *r = (void *)msg;
    aff_err err;
    size_t n = r->n_events;
    if (!require_collection(c, r->collection)) return;
    size_t user_len = strnlen(r->user_id, AFF_MAX_ID_LEN + 1);
    if (user_len == 0 || user_len > AFF_MAX_ID_LEN) {
        fail(c, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
        return;
    }
    if (n < 1 || n > PROFILES_MAX_EVENTS) {
        fail(c, AFF_EINVAL, "%zu events; PutEvents takes 1..%d per call", n, PROFILES_MAX_EVENTS);
        return;
    }
    size_t n_kv = 0;
    for (size_t i = 0; i < n; i++)
        n_kv += r->events[i]->n_context;
    profiles_event *events = xcalloc(n, sizeof *events);
    uint32_t *index = xcalloc(n, sizeof *index); /* events[j] is request event index[j] */
    store_kv *kv = xcalloc(n_kv, sizeof *kv);
    profiles_rejection *rej = xcalloc(n, sizeof *rej);
    Affinity__V1__RejectedEvent *out = xcalloc(n, sizeof *out);
    Affinity__V1__RejectedEvent **out_ptrs = xcalloc(n, sizeof *out_ptrs);
    char(*reasons)[160] = xcalloc(n, sizeof *reasons);
    bool *pre_rejected = xcalloc(n, sizeof *pre_rejected);
    if (!events || !index || !kv || !rej || !out || !out_ptrs || !reasons || !pre_rejected) {
        fail(c, AFF_ENOMEM, "out of memory reading %zu events", n);
        goto out;
    }
    size_t m = 0, off = 0;
    for (size_t i = 0; i < n; i++) {
        const Affinity__V1__Event *e = r->events[i];
        if (!event_precheck(e, reasons[i], sizeof reasons[i])) {
            pre_rejected[i] = true;
            continue;
        }
        for (size_t j = 0; j < e->n_context; j++)
            kv[off + j] = (store_kv){.key = e->context[j]->key, .value = e->context[j]->value};
        index[m] = (uint32_t)i;
        events[m++] = (profiles_event){.item_id = e->item_id,
                                       .type = (profiles_event_kind)e->type,
                                       .custom_type = e->custom_type[0] ? e->custom_type : NULL,
                                       .timestamp_ms = e->timestamp_ms,
                                       .value = e->value,
                                       .context = kv + off,
                                       .n_context = (uint32_t)e->n_context};
        off += e->n_context;
    }
    uint32_t applied = 0, n_rej = 0;
    if (m && profiles_put_events(c->t->cfg.profiles, r->collection, r->user_id, events, m, &applied,
                                 rej, &n_rej, &err)) {
        tcall_fail(c, &err);
        goto out;
    }
    /* The profiles module reports in its own (ascending) order: map back and merge. */
    for (uint32_t k = 0; k < n_rej; k++) {
        uint32_t i = index[rej[k].index];
        pre_rejected[i] = true;
        snprintf(reasons[i], sizeof reasons[i], "%s", rej[k].reason);
    }
    size_t n_out = 0;
    for (size_t i = 0; i < n; i++) {
        if (!pre_rejected[i]) { /* applied: counted by type (affinity_events_total) */
            metrics_add_events(c->t->cfg.metrics, (metrics_event_type)r->events[i]->type, 1);
            continue;
        }
        affinity__v1__rejected_event__init(&out[n_out]);
        out[n_out].index = (uint32_t)i;
        out[n_out].reason = reasons[i];
        out_ptrs[n_out] = &out[n_out];
        n_out++;
    }
    Affinity__V1__PutEventsResponse resp = AFFINITY__V1__PUT_EVENTS_RESPONSE__INIT;
    resp.applied_count = applied;
    resp.n_rejected = n_out;
    resp.rejected = out_ptrs;
    tcall_finish(c, 0, NULL, &resp.base);
out:
    free(events);
    free(index);
    free(kv);
    free(rej);
    free(out);
    free(out_ptrs);
    free(reasons);
    free(pre_rejected);
}

static void rpc_get_user(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__GetUserRequest *r = (void *)msg;
    aff_err err;
    if (!require_collection(c, r->collection)) return;
    profiles_user_info *info = malloc(sizeof *info);
    if (!info) {
        fail(c, AFF_ENOMEM, "out of memory reading a user");
        return;
    }
    int rc = profiles_get_user(c->t->cfg.profiles, r->collection, r->user_id, info, &err);
    if (rc == AFF_ENOTFOUND) {
        fail(c, AFF_ENOTFOUND,
             "user '%.128s' is unknown in collection '%s' (no events, or deleted)", r->user_id,
             r->collection);
    } else if (rc) {
        tcall_fail(c, &err);
    } else {
        Affinity__V1__GetUserResponse__EventCountsEntry counts[STORE_MAX_EVENT_TYPES];
        Affinity__V1__GetUserResponse__EventCountsEntry *count_ptrs[STORE_MAX_EVENT_TYPES];
        Affinity__V1__CategoryWeight cats[PROFILES_TOP_CATEGORIES];
        Affinity__V1__CategoryWeight *cat_ptrs[PROFILES_TOP_CATEGORIES];
        for (uint32_t i = 0; i < info->n_counts; i++) {
            affinity__v1__get_user_response__event_counts_entry__init(&counts[i]);
            counts[i].key = info->counts[i].type;
            counts[i].value = info->counts[i].count;
            count_ptrs[i] = &counts[i];
        }
        for (uint32_t i = 0; i < info->n_top_categories; i++) {
            affinity__v1__category_weight__init(&cats[i]);
            cats[i].category = info->top_categories[i].category;
            cats[i].weight = info->top_categories[i].weight;
            cat_ptrs[i] = &cats[i];
        }
        Affinity__V1__GetUserResponse resp = AFFINITY__V1__GET_USER_RESPONSE__INIT;
        resp.user_id = r->user_id;
        resp.n_event_counts = info->n_counts;
        resp.event_counts = count_ptrs;
        resp.last_event_ms = info->last_event_ms;
        resp.n_top_categories = info->n_top_categories;
        resp.top_categories = cat_ptrs;
        resp.history_length = info->history_length;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    free(info);
}

/* DeleteUser: erases the user from one collection, or from all with an empty collection,
 * durably; answered after the commit. */
static void rpc_delete_user(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__DeleteUserRequest *r = (void *)msg;
    aff_err err;
    if (r->collection[0] && !require_collection(c, r->collection)) return;
    bool existed = false;
    if (profiles_delete_user(c->t->cfg.profiles, r->collection, r->user_id, &existed, &err)) {
        tcall_fail(c, &err);
        return;
    }
    Affinity__V1__DeleteUserResponse resp = AFFINITY__V1__DELETE_USER_RESPONSE__INIT;
    resp.existed = existed;
    tcall_finish(c, 0, NULL, &resp.base);
}

/* ---- collections ------------------------------------------------------------------------ */

static void rpc_create_collection(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__CreateCollectionRequest *r = (void *)msg;
    aff_err err;
    engine_collection_spec spec = {.name = r->name,
                                   .dim = r->dimension,
                                   .hnsw_m = r->hnsw_m,
                                   .hnsw_ef_search = r->hnsw_ef_search};
    switch (r->metric) {
    case AFFINITY__V1__METRIC__METRIC_UNSPECIFIED:
    case AFFINITY__V1__METRIC__METRIC_COSINE:
        spec.metric = AFF_METRIC_COSINE;
        break;
    case AFFINITY__V1__METRIC__METRIC_INNER_PRODUCT:
        spec.metric = AFF_METRIC_IP;
        break;
    case AFFINITY__V1__METRIC__METRIC_L2:
        spec.metric = AFF_METRIC_L2;
        break;
    default:
        fail(c, AFF_EINVAL,
             "metric %d is unknown; use METRIC_COSINE, METRIC_INNER_PRODUCT or "
             "METRIC_L2",
             (int)r->metric);
        return;
    }
    switch (r->index) {
    case AFFINITY__V1__INDEX_KIND__INDEX_KIND_UNSPECIFIED:
    case AFFINITY__V1__INDEX_KIND__INDEX_KIND_FLAT:
        spec.index = BACKEND_INDEX_FLAT;
        break;
    case AFFINITY__V1__INDEX_KIND__INDEX_KIND_HNSW:
        spec.index = BACKEND_INDEX_HNSW;
        break;
    default:
        fail(c, AFF_EINVAL, "index %d is unknown; use INDEX_KIND_FLAT or INDEX_KIND_HNSW",
             (int)r->index);
        return;
    }
    if (catalog_create_collection(c->t->cfg.catalog, &spec, &err)) {
        tcall_fail(c, &err);
        return;
    }
    engine_collection_info ci;
    backend_info bi;
    if (engine_describe_collection(c->t->engine, r->name, &ci, &err)) {
        tcall_fail(c, &err);
        return;
    }
    engine_backend_info(c->t->engine, &bi);
    Affinity__V1__CollectionInfo info;
    collection_info_to_pb(&ci, &bi, &info);
    Affinity__V1__CreateCollectionResponse resp = AFFINITY__V1__CREATE_COLLECTION_RESPONSE__INIT;
    resp.collection = &info;
    tcall_finish(c, 0, NULL, &resp.base);
}

static void rpc_drop_collection(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__DropCollectionRequest *r = (void *)msg;
    aff_err err;
    if (catalog_drop_collection(c->t->cfg.catalog, r->name, &err)) {
        tcall_fail(c, &err);
        return;
    }
    Affinity__V1__DropCollectionResponse resp = AFFINITY__V1__DROP_COLLECTION_RESPONSE__INIT;
    tcall_finish(c, 0, NULL, &resp.base);
}

static void rpc_list_collections(tcall *c, ProtobufCMessage *msg)
{
    aff_err err;
    engine_collection_info *list = NULL;
    size_t n = 0;
    if (engine_list_collections(c->t->engine, &list, &n, &err)) {
        tcall_fail(c, &err);
        return;
    }
    backend_info bi;
    engine_backend_info(c->t->engine, &bi);
    Affinity__V1__CollectionInfo *infos = xcalloc(n, sizeof *infos);
    Affinity__V1__CollectionInfo **ptrs = xcalloc(n, sizeof *ptrs);
    if (!infos || !ptrs) {
        fail(c, AFF_ENOMEM, "out of memory listing collections");
    } else {
        for (size_t i = 0; i < n; i++) {
            collection_info_to_pb(&list[i], &bi, &infos[i]);
            ptrs[i] = &infos[i];
        }
        Affinity__V1__ListCollectionsResponse resp = AFFINITY__V1__LIST_COLLECTIONS_RESPONSE__INIT;
        resp.n_collections = n;
        resp.collections = ptrs;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    free(infos);
    free(ptrs);
    free(list);
}

static void rpc_describe_collection(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__DescribeCollectionRequest *r = (void *)msg;
    aff_err err;
    engine_collection_info ci;
    backend_info bi;
    if (engine_describe_collection(c->t->engine, r->name, &ci, &err)) {
        tcall_fail(c, &err);
        return;
    }
    engine_backend_info(c->t->engine, &bi);
    Affinity__V1__CollectionInfo info;
    collection_info_to_pb(&ci, &bi, &info);
    tcall_finish(c, 0, NULL, &info.base);
}

/* ---- catalog ------------------------------------------------------------------------------ */

typedef struct upsert_state {
    char collection[AFF_MAX_NAME_LEN + 1];
    uint64_t upserted;
    uint64_t batches;
    bool recv_ok;              /* the receive handed to upsert_work (one at a time) */
    grpc_byte_buffer *recv_bb; /* owned until upsert_work takes it */
} upsert_state;

static void upsert_finish(tcall *c, int code, const char *msg)
{
    upsert_state *st = c->state;
    if (code != 0) { /* the count applied before the failure, for clients (issue 12) */
        char n[24];
        snprintf(n, sizeof n, "%llu", (unsigned long long)st->upserted);
        tcall_set_trailer(c, "affinity-upserted-count", n);
        tcall_finish(c, code, msg, NULL);
        return;
    }
    Affinity__V1__UpsertItemsResponse resp = AFFINITY__V1__UPSERT_ITEMS_RESPONSE__INIT;
    resp.upserted_count = st->upserted;
    tcall_finish(c, 0, NULL, &resp.base);
}

static int cmp_item_id(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* How many different ids items[0..n) carry (the last of a repeated id wins the upsert). */
static size_t distinct_ids(const aff_item *items, size_t n)
{
    const char **ids = n > 1 ? malloc(n * sizeof *ids) : NULL;
    if (!ids) return n;
    for (size_t i = 0; i < n; i++)
        ids[i] = items[i].id;
    qsort(ids, n, sizeof *ids, cmp_item_id);
    size_t m = 1;
    for (size_t i = 1; i < n; i++)
        m += strcmp(ids[i], ids[i - 1]) != 0;
    free(ids);
    return m;
}

/* One stream message: applied durably (engine, then one store commit) before the next is
 * read. Runs on a blocking-work thread. */
static void upsert_message(tcall *c, bool ok, grpc_byte_buffer *bb)
{
    upsert_state *st = c->state;
    char msg[512];
    if (!ok) {
        if (bb) grpc_byte_buffer_destroy(bb);
        upsert_finish(c, GRPC_STATUS_CANCELLED, "the stream broke before it ended");
        return;
    }
    if (!bb) { /* the client ended its stream */
        if (st->batches)
            aff_log_kv(AFF_LOG_INFO, "items upserted", "collection", st->collection, NULL);
        upsert_finish(c, 0, NULL);
        return;
    }
    if (atomic_load(&c->t->draining)) {
        grpc_byte_buffer_destroy(bb);
        snprintf(msg, sizeof msg,
                 "the server is shutting down; %llu items were applied before it began",
                 (unsigned long long)st->upserted);
        upsert_finish(c, GRPC_STATUS_UNAVAILABLE, msg);
        return;
    }
    char why[400];
    Affinity__V1__UpsertItemsRequest *r = (void *)transport__unpack_checked(
        bb, &affinity__v1__upsert_items_request__descriptor, why, sizeof why);
    grpc_byte_buffer_destroy(bb);
    if (!r) {
        snprintf(msg, sizeof msg,
                 "message %llu is not a valid UpsertItemsRequest%s%.400s; %llu items applied "
                 "before it",
                 (unsigned long long)st->batches, why[0] ? ": " : "", why,
                 (unsigned long long)st->upserted);
        upsert_finish(c, GRPC_STATUS_INVALID_ARGUMENT, msg);
        return;
    }
    int code = 0;
    aff_item *items = NULL;
    if (r->collection[0]) {
        if (st->collection[0] && strcmp(st->collection, r->collection) != 0) {
            snprintf(msg, sizeof msg,
                     "message %llu names collection \"%.64s\" but the stream began with "
                     "\"%s\"; one UpsertItems stream loads one collection",
                     (unsigned long long)st->batches, r->collection, st->collection);
            code = GRPC_STATUS_INVALID_ARGUMENT;
            goto out;
        }
        if (strlen(r->collection) > AFF_MAX_NAME_LEN) {
            snprintf(msg, sizeof msg, "collection name is longer than %d bytes", AFF_MAX_NAME_LEN);
            code = GRPC_STATUS_INVALID_ARGUMENT;
            goto out;
        }
        strcpy(st->collection, r->collection);
    } else if (!st->collection[0]) {
        snprintf(msg, sizeof msg, "the first UpsertItemsRequest must name the collection");
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    items = xcalloc(r->n_items, sizeof *items);
    if (!items) {
        snprintf(msg, sizeof msg, "out of memory reading %zu items", r->n_items);
        code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        goto out;
    }
    for (size_t i = 0; i < r->n_items; i++) {
        const Affinity__V1__Item *it = r->items[i];
        items[i] = (aff_item){.id = it->id,
                              .vector = it->vector,
                              .dim = (uint32_t)it->n_vector,
                              .category = it->category,
                              .tags = (const char *const *)it->tags,
                              .n_tags = (uint32_t)it->n_tags,
                              .price = it->price,
                              .available = it->available_set ? it->available : true};
    }
    aff_err err;
    uint32_t dim;
    if (!r->n_items && engine_collection_dim(c->t->engine, st->collection, &dim, &err)) {
        snprintf(msg, sizeof msg, "message %llu: %s", (unsigned long long)st->batches, err.msg);
        code = aff_status_grpc_code(err.code);
        goto out;
    }
    if (r->n_items && catalog_upsert(c->t->cfg.catalog, st->collection, items, r->n_items, &err)) {
        snprintf(msg, sizeof msg, "message %llu: %s; %llu items applied before it",
                 (unsigned long long)st->batches, err.msg, (unsigned long long)st->upserted);
        code = aff_status_grpc_code(err.code);
        goto out;
    }
    st->upserted += distinct_ids(items, r->n_items); /* a repeated id is one item */
    st->batches++;
out:
    free(items);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    if (code)
        upsert_finish(c, code, msg);
    else if (!tcall_recv(c))
        upsert_finish(c, GRPC_STATUS_INTERNAL, "cannot read the next message");
}

static void upsert_work(tcall *c)
{
    upsert_state *st = c->state;
    grpc_byte_buffer *bb = st->recv_bb;
    st->recv_bb = NULL;
    upsert_message(c, st->recv_ok, bb);
}

static void upsert_on_recv(tcall *c, bool ok, grpc_byte_buffer *bb)
{
    upsert_state *st = c->state;
    st->recv_ok = ok;
    st->recv_bb = bb;
    transport__defer(c, upsert_work);
}

static void upsert_state_free(void *p)
{
    upsert_state *st = p;
    if (st && st->recv_bb) grpc_byte_buffer_destroy(st->recv_bb);
    free(st);
}

static void rpc_upsert_items(tcall *c)
{
    upsert_state *st = calloc(1, sizeof *st);
    if (!st) {
        fail(c, AFF_ENOMEM, "out of memory starting an upsert");
        return;
    }
    c->state = st;
    c->state_free = upsert_state_free;
    c->on_recv = upsert_on_recv;
    if (!tcall_recv(c)) fail(c, AFF_EINTERNAL, "cannot read the request stream");
}

static void rpc_delete_items(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__DeleteItemsRequest *r = (void *)msg;
    aff_err err;
    if (r->n_ids > MAX_IDS_PER_CALL) {
        fail(c, AFF_EINVAL, "%zu ids; DeleteItems takes at most %d per call", r->n_ids,
             MAX_IDS_PER_CALL);
        return;
    }
    size_t deleted = 0;
    if (catalog_delete(c->t->cfg.catalog, r->collection, (const char *const *)r->ids, r->n_ids,
                       &deleted, &err)) {
        tcall_fail(c, &err);
        return;
    }
    Affinity__V1__DeleteItemsResponse resp = AFFINITY__V1__DELETE_ITEMS_RESPONSE__INIT;
    resp.deleted_count = deleted;
    tcall_finish(c, 0, NULL, &resp.base);
}

static void rpc_get_items(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__GetItemsRequest *r = (void *)msg;
    aff_err err;
    uint32_t dim = 0;
    if (r->n_ids > MAX_IDS_PER_CALL) {
        fail(c, AFF_EINVAL, "%zu ids; GetItems takes at most %d per call", r->n_ids,
             MAX_IDS_PER_CALL);
        return;
    }
    if (engine_collection_dim(c->t->engine, r->collection, &dim, &err)) {
        tcall_fail(c, &err);
        return;
    }
    size_t n = r->n_ids;
    if (r->include_vectors &&
        (uint64_t)n * dim * sizeof(float) > (uint64_t)c->t->cfg.max_message_bytes) {
        fail(c, AFF_EFULL,
             "%zu vectors of dimension %u would exceed the %u-byte message limit; ask for "
             "fewer ids per call or leave include_vectors off",
             n, dim, c->t->cfg.max_message_bytes);
        return;
    }
    engine_item *found = xcalloc(n, sizeof *found);
    float *vectors = r->include_vectors ? xcalloc(n * dim, sizeof *vectors) : NULL;
    Affinity__V1__Item *items = xcalloc(n, sizeof *items);
    Affinity__V1__Item **item_ptrs = xcalloc(n, sizeof *item_ptrs);
    char **tag_ptrs = xcalloc(n * AFF_MAX_TAGS_PER_ITEM, sizeof *tag_ptrs);
    char **missing = xcalloc(n, sizeof *missing);
    if (!found || (r->include_vectors && !vectors) || !items || !item_ptrs || !tag_ptrs ||
        !missing) {
        fail(c, AFF_ENOMEM, "out of memory reading %zu items", n);
        goto out;
    }
    size_t nf = 0, nm = 0;
    for (size_t i = 0; i < n; i++) {
        float *v = vectors ? vectors + nf * dim : NULL;
        int rc = engine_get_item(c->t->engine, r->collection, r->ids[i], &found[nf], v, &err);
        if (rc == AFF_ENOTFOUND) {
            missing[nm++] = r->ids[i];
            continue;
        }
        if (rc) {
            tcall_fail(c, &err);
            goto out;
        }
        Affinity__V1__Item *it = &items[nf];
        affinity__v1__item__init(it);
        it->id = found[nf].id;
        it->category = found[nf].category;
        it->n_tags = found[nf].n_tags;
        it->tags = tag_ptrs + nf * AFF_MAX_TAGS_PER_ITEM;
        for (uint32_t j = 0; j < found[nf].n_tags; j++)
            it->tags[j] = found[nf].tags[j];
        it->price = found[nf].price;
        it->available = found[nf].available;
        it->available_set = true;
        if (v) {
            it->n_vector = dim;
            it->vector = v;
        }
        item_ptrs[nf] = it;
        nf++;
    }
    Affinity__V1__GetItemsResponse resp = AFFINITY__V1__GET_ITEMS_RESPONSE__INIT;
    resp.n_items = nf;
    resp.items = item_ptrs;
    resp.n_missing_ids = nm;
    resp.missing_ids = missing;
    tcall_finish(c, 0, NULL, &resp.base);
out:
    free(found);
    free(vectors);
    free(items);
    free(item_ptrs);
    free(tag_ptrs);
    free(missing);
}

/* ---- serving through the batcher ---------------------------------------------------------- */

/* A Recommend request made ready: either a query to queue (q, whose filter points into the
 * job, so the job must not move once prepared) or, for a user without a profile, the
 * popularity answer already computed (answered). */
typedef struct recommend_job {
    aff_query q;
    aff_filter f;       /* the request's filter; its arrays are borrowed from the request */
    profiles_plan plan; /* by user_id: profile vector and exclusions; owned when has_plan */
    bool has_plan;
    bool answered; /* POPULARITY: the hits are final, nothing to queue */
    Affinity__V1__RecommendSource source;
} recommend_job;

static void recommend_job_release(recommend_job *j)
{
    if (j->has_plan) profiles_plan_release(&j->plan);
    j->has_plan = false;
}

/* One unary serving call: its queries, outputs and batcher request. */
typedef struct serve_state {
    batcher_request br;
    aff_query *queries;
    aff_filter *filters;
    aff_rerank_query rerank;
    const char **rerank_ids;
    float *base_scores;
    aff_hit *hits;
    uint32_t *n_hits;
    aff_rerank_hit *rerank_out;
    aff_err *errs;
    void (*respond)(tcall *c, struct serve_state *st); /* called when all queries succeeded */
    const char *what;                                  /* "query", "item", ... for error messages */
    recommend_job job;                                 /* Recommend */
    float *user_vector;                                /* Rerank by user_id: the profile */
    Affinity__V1__RecommendSource rerank_source;
    bool rerank_without_profile; /* Rerank of an unknown user: base scores only */
} serve_state;

static void serve_state_free(void *p)
{
    serve_state *st = p;
    if (!st) return;
    free(st->queries);
    free(st->filters);
    free(st->base_scores);
    free(st->rerank_ids);
    free(st->hits);
    free(st->n_hits);
    free(st->rerank_out);
    free(st->errs);
    recommend_job_release(&st->job);
    free(st->user_vector);
    free(st);
}

static serve_state *serve_state_new(tcall *c, size_t nq, size_t n_out, bool rerank)
{
    serve_state *st = calloc(1, sizeof *st);
    if (!st) return NULL;
    c->state = st;
    c->state_free = serve_state_free;
    st->errs = xcalloc(nq, sizeof *st->errs);
    if (rerank) {
        st->rerank_out = xcalloc(n_out, sizeof *st->rerank_out);
        st->base_scores = xcalloc(n_out, sizeof *st->base_scores);
        if (!st->rerank_out || !st->base_scores || !st->errs) return NULL;
    } else {
        st->queries = xcalloc(nq, sizeof *st->queries);
        st->filters = xcalloc(nq, sizeof *st->filters);
        st->n_hits = xcalloc(nq, sizeof *st->n_hits);
        st->hits = xcalloc(n_out, sizeof *st->hits);
        if (!st->queries || !st->filters || !st->n_hits || !st->hits || !st->errs) return NULL;
    }
    return st;
}

static void serve_done(batcher_request *br)
{
    tcall *c = br->user;
    serve_state *st = c->state;
    metrics_observe_queue_wait(c->t->cfg.metrics, br->wait_ns);
    if (br->status != AFF_OK) {
        tcall_fail(c, &br->err);
    } else {
        size_t i = 0;
        while (i < br->nq && st->errs[i].code == AFF_OK)
            i++;
        if (i < br->nq) {
            aff_err e = st->errs[i];
            if (br->nq > 1)
                aff__fail(&e, st->errs[i].code, "%s %zu: %s", st->what, i, st->errs[i].msg);
            tcall_fail(c, &e);
        } else {
            st->respond(c, st);
        }
    }
    tcall_unref(c);
}

/* Hands the prepared state to the batcher; answers the call itself on refusal. */
static void serve_submit(tcall *c, serve_state *st, const char *collection, batcher_kind kind,
                         size_t nq)
{
    aff_err err;
    st->br = (batcher_request){.kind = kind,
                               .collection = collection,
                               .deadline_ns = tcall_deadline_ns(c),
                               .nq = nq,
                               .queries = st->queries,
                               .hits = st->hits,
                               .n_hits = st->n_hits,
                               .rerank = &st->rerank,
                               .rerank_out = st->rerank_out,
                               .query_errs = st->errs,
                               .done = serve_done,
                               .user = c};
    tcall_ref(c);
    if (batcher_submit(c->t->batcher, &st->br, &err)) {
        tcall_unref(c);
        tcall_fail(c, &err);
    }
}

/* Encodes nq hit lists as QueryResults into out (arrays allocated here; freed by caller
 * with results_free). */
typedef struct results_pb {
    Affinity__V1__QueryResult *results;
    Affinity__V1__QueryResult **result_ptrs;
    Affinity__V1__Hit *hits;
    Affinity__V1__Hit **hit_ptrs;
} results_pb;

static bool results_to_pb(const aff_hit *hits, const uint32_t *n_hits, const aff_query *q,
                          size_t nq, results_pb *out)
{
    size_t total = 0;
    for (size_t i = 0; i < nq; i++)
        total += n_hits[i];
    out->results = xcalloc(nq, sizeof *out->results);
    out->result_ptrs = xcalloc(nq, sizeof *out->result_ptrs);
    out->hits = xcalloc(total, sizeof *out->hits);
    out->hit_ptrs = xcalloc(total, sizeof *out->hit_ptrs);
    if (!out->results || !out->result_ptrs || !out->hits || !out->hit_ptrs) return false;
    size_t off = 0, h = 0;
    for (size_t i = 0; i < nq; i++) {
        Affinity__V1__QueryResult *r = &out->results[i];
        affinity__v1__query_result__init(r);
        r->n_hits = n_hits[i];
        r->hits = out->hit_ptrs + h;
        for (uint32_t j = 0; j < n_hits[i]; j++, h++) {
            affinity__v1__hit__init(&out->hits[h]);
            out->hits[h].id = (char *)hits[off + j].id;
            out->hits[h].score = hits[off + j].score;
            out->hit_ptrs[h] = &out->hits[h];
        }
        off += q[i].k;
        out->result_ptrs[i] = r;
    }
    return true;
}

static void results_free(results_pb *r)
{
    free(r->results);
    free(r->result_ptrs);
    free(r->hits);
    free(r->hit_ptrs);
}

static void respond_search(tcall *c, serve_state *st)
{
    results_pb r = {0};
    if (!results_to_pb(st->hits, st->n_hits, st->queries, st->br.nq, &r)) {
        fail(c, AFF_ENOMEM, "out of memory encoding results");
    } else if (c->def->req_desc == &affinity__v1__search_request__descriptor) {
        Affinity__V1__SearchResponse resp = AFFINITY__V1__SEARCH_RESPONSE__INIT;
        resp.n_results = st->br.nq;
        resp.results = r.result_ptrs;
        tcall_finish(c, 0, NULL, &resp.base);
    } else {
        Affinity__V1__SimilarItemsResponse resp = AFFINITY__V1__SIMILAR_ITEMS_RESPONSE__INIT;
        resp.n_results = st->br.nq;
        resp.results = r.result_ptrs;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    results_free(&r);
}

/* Checks the query count and sums k; fails the call and returns false when out of range. */
static bool check_k(tcall *c, uint32_t k, size_t index, size_t nq, const char *what)
{
    if (k >= 1 && k <= AFF_MAX_K) return true;
    if (nq > 1)
        fail(c, AFF_EINVAL,
             "%s %zu: k = %u is out of range 1..%d (set k on the request or the "
             "query)",
             what, index, k, AFF_MAX_K);
    else
        fail(c, AFF_EINVAL, "k = %u is out of range 1..%d", k, AFF_MAX_K);
    return false;
}

static void rpc_search(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__SearchRequest *r = (void *)msg;
    aff_err err;
    uint32_t dim;
    size_t nq = r->n_queries, total_k = 0;
    if (engine_collection_dim(c->t->engine, r->collection, &dim, &err)) {
        tcall_fail(c, &err);
        return;
    }
    if (nq < 1 || nq > MAX_QUERIES_PER_CALL) {
        fail(c, AFF_EINVAL, "%zu queries; Search takes 1..%d per call", nq, MAX_QUERIES_PER_CALL);
        return;
    }
    for (size_t i = 0; i < nq; i++) {
        uint32_t k = r->queries[i]->k ? r->queries[i]->k : r->k;
        if (!check_k(c, k, i, nq, "query")) return;
        total_k += k;
    }
    serve_state *st = serve_state_new(c, nq, total_k, false);
    if (!st) {
        fail(c, AFF_ENOMEM, "out of memory preparing %zu queries", nq);
        return;
    }
    st->respond = respond_search;
    st->what = "query";
    for (size_t i = 0; i < nq; i++) {
        const Affinity__V1__Query *q = r->queries[i];
        if (q->n_vector == 0) {
            fail(c, AFF_EINVAL, "query %zu has no vector; Search needs %u values per query", i,
                 dim);
            return;
        }
        filter_from_pb(q->filter ? q->filter : r->filter, &st->filters[i]);
        st->queries[i] = (aff_query){.vector = q->vector,
                                     .dim = (uint32_t)q->n_vector,
                                     .k = q->k ? q->k : r->k,
                                     .filter = &st->filters[i]};
        if (engine_validate_query(c->t->engine, r->collection, &st->queries[i], &err)) {
            if (nq > 1) {
                aff_err e2;
                aff__fail(&e2, err.code, "query %zu: %s", i, err.msg);
                tcall_fail(c, &e2);
            } else {
                tcall_fail(c, &err);
            }
            return;
        }
    }
    serve_submit(c, st, r->collection, BATCHER_SEARCH, nq);
}

static void rpc_similar_items(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__SimilarItemsRequest *r = (void *)msg;
    aff_err err;
    uint32_t dim;
    size_t nq = r->n_item_ids;
    if (engine_collection_dim(c->t->engine, r->collection, &dim, &err)) {
        tcall_fail(c, &err);
        return;
    }
    if (nq < 1 || nq > MAX_QUERIES_PER_CALL) {
        fail(c, AFF_EINVAL, "%zu item ids; SimilarItems takes 1..%d per call", nq,
             MAX_QUERIES_PER_CALL);
        return;
    }
    if (!check_k(c, r->k, 0, 1, "item")) return;
    serve_state *st = serve_state_new(c, nq, nq * r->k, false);
    if (!st) {
        fail(c, AFF_ENOMEM, "out of memory preparing %zu queries", nq);
        return;
    }
    st->respond = respond_search;
    st->what = "item";
    for (size_t i = 0; i < nq; i++) {
        filter_from_pb(r->filter, &st->filters[i]);
        st->queries[i] =
            (aff_query){.item_id = r->item_ids[i], .k = r->k, .filter = &st->filters[i]};
        if (engine_validate_query(c->t->engine, r->collection, &st->queries[i], &err)) {
            aff_err e2;
            aff__fail(&e2, err.code, "item %zu: %s", i, err.msg);
            tcall_fail(c, nq > 1 ? &e2 : &err);
            return;
        }
    }
    serve_submit(c, st, r->collection, BATCHER_SEARCH, nq);
}

/* Recommend by user_id: the user's profile as the query vector, or the collection's popular
 * items when the user has none; both through the request's filter and the exclusions of
 * exclude_event_types. Reads the store (no fsync). */
static int recommend_user_prepare(transport *t, const Affinity__V1__RecommendRequest *r,
                                  recommend_job *j, aff_hit *hits, uint32_t *n_hits, aff_err *err)
{
    const char *types[4];
    size_t nt = 0;
    for (size_t i = 0; i < r->n_exclude_event_types; i++) {
        const char *name = profiles_event_kind_name((profiles_event_kind)r->exclude_event_types[i]);
        if (!name)
            return aff__fail(err, AFF_EINVAL,
                             "exclude_event_types[%zu] = %d; use EVENT_TYPE_VIEW, "
                             "EVENT_TYPE_CLICK, EVENT_TYPE_ADD_TO_CART or EVENT_TYPE_PURCHASE",
                             i, (int)r->exclude_event_types[i]);
        bool dup = false;
        for (size_t k = 0; k < nt; k++)
            dup = dup || types[k] == name;
        if (!dup) types[nt++] = name;
    }
    int rc = profiles_plan_recommend(t->cfg.profiles, r->collection, r->user_id, types, nt, &j->f,
                                     &j->plan, err);
    if (rc) return rc;
    j->has_plan = true;
    if (j->plan.source == PROFILES_SOURCE_PROFILE) {
        j->source = AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE;
        j->q = (aff_query){
            .vector = j->plan.vector, .dim = j->plan.dim, .k = r->k, .filter = &j->plan.filter};
        return engine_validate_query(t->engine, r->collection, &j->q, err);
    }
    j->source = AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY;
    j->answered = true;
    j->q = (aff_query){.k = r->k, .filter = &j->plan.filter};
    return profiles_popular(t->cfg.profiles, r->collection, r->k, &j->plan.filter, hits, n_hits,
                            err);
}

/* Validates a Recommend request and makes j ready (see recommend_job); hits has room for
 * r->k hits. The job points into r, which must outlive it. */
static int recommend_prepare(transport *t, const Affinity__V1__RecommendRequest *r,
                             recommend_job *j, aff_hit *hits, uint32_t *n_hits, aff_err *err)
{
    uint32_t dim;
    int rc = engine_collection_dim(t->engine, r->collection, &dim, err);
    if (rc) return rc;
    if (r->k < 1 || r->k > AFF_MAX_K)
        return aff__fail(err, AFF_EINVAL, "k = %u is out of range 1..%d", r->k, AFF_MAX_K);
    filter_from_pb(r->filter, &j->f);
    if (r->user_case == AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID)
        return recommend_user_prepare(t, r, j, hits, n_hits, err);
    if (r->user_case != AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_VECTOR || !r->user_vector)
        return aff__fail(err, AFF_EINVAL, "set user_vector (or user_id) to say who the user is");
    if (r->n_exclude_event_types)
        return aff__fail(err, AFF_EINVAL,
                         "exclude_event_types needs a user_id with history; a user_vector has "
                         "none (use filter.exclude_ids instead)");
    if (r->user_vector->n_values == 0)
        return aff__fail(err, AFF_EINVAL, "user_vector is empty; it needs %u values", dim);
    j->source = AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_VECTOR;
    j->q = (aff_query){.vector = r->user_vector->values,
                       .dim = (uint32_t)r->user_vector->n_values,
                       .k = r->k,
                       .filter = &j->f};
    rc = engine_validate_query(t->engine, r->collection, &j->q, err);
    if (rc == AFF_EINVAL && strstr(err->msg, "query vector"))
        aff__fail(err, rc, "user_vector: %s", err->msg);
    return rc;
}

/* Room for the hits of a Recommend before it is validated (k out of range fails later). */
static uint32_t recommend_room(const Affinity__V1__RecommendRequest *r)
{
    return r->k >= 1 && r->k <= AFF_MAX_K ? r->k : 1;
}

static void respond_recommend(tcall *c, serve_state *st)
{
    const Affinity__V1__RecommendRequest *r = (void *)c->req;
    results_pb rp = {0};
    if (!results_to_pb(st->hits, st->n_hits, st->queries, 1, &rp)) {
        fail(c, AFF_ENOMEM, "out of memory encoding results");
    } else {
        Affinity__V1__RecommendResponse resp = AFFINITY__V1__RECOMMEND_RESPONSE__INIT;
        resp.n_hits = rp.results[0].n_hits;
        resp.hits = rp.results[0].hits;
        resp.source = st->job.source;
        resp.request_id = r->request_id;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    results_free(&rp);
}

static void rpc_recommend(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__RecommendRequest *r = (void *)msg;
    aff_err err;
    serve_state *st = serve_state_new(c, 1, recommend_room(r), false);
    if (!st) {
        fail(c, AFF_ENOMEM, "out of memory preparing the query");
        return;
    }
    st->respond = respond_recommend;
    st->what = "query";
    if (recommend_prepare(c->t, r, &st->job, st->hits, &st->n_hits[0], &err)) {
        tcall_fail(c, &err);
        return;
    }
    st->queries[0] = st->job.q;
    if (st->job.answered)
        respond_recommend(c, st);
    else
        serve_submit(c, st, r->collection, BATCHER_SEARCH, 1);
}

static void respond_rerank(tcall *c, serve_state *st)
{
    uint32_t n = st->rerank.n;
    Affinity__V1__RerankedItem *items = xcalloc(n, sizeof *items);
    Affinity__V1__RerankedItem **ptrs = xcalloc(n, sizeof *ptrs);
    if (!items || !ptrs) {
        fail(c, AFF_ENOMEM, "out of memory encoding results");
    } else {
        for (uint32_t i = 0; i < n; i++) {
            const aff_rerank_hit *h = &st->rerank_out[i];
            affinity__v1__reranked_item__init(&items[i]);
            items[i].id = (char *)st->rerank.ids[h->index];
            items[i].base_score = h->base;
            items[i].affinity = st->rerank_without_profile ? 0.0f : h->affinity;
            items[i].score = h->blended;
            items[i].found = h->found;
            ptrs[i] = &items[i];
        }
        Affinity__V1__RerankResponse resp = AFFINITY__V1__RERANK_RESPONSE__INIT;
        resp.n_items = n;
        resp.items = ptrs;
        resp.source = st->rerank_source;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    free(items);
    free(ptrs);
}

/* Rerank by user_vector, or by user_id with the user's profile (source PROFILE). A user
 * without a profile keeps the caller's ranking: weight 0, so the blended score is the base
 * score (affinity reported as 0, source UNSPECIFIED: nothing personal was used). */
static void rpc_rerank(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__RerankRequest *r = (void *)msg;
    aff_err err;
    uint32_t dim;
    if (engine_collection_dim(c->t->engine, r->collection, &dim, &err)) {
        tcall_fail(c, &err);
        return;
    }
    bool by_id = r->user_case == AFFINITY__V1__RERANK_REQUEST__USER_USER_ID;
    if (!by_id &&
        (r->user_case != AFFINITY__V1__RERANK_REQUEST__USER_USER_VECTOR || !r->user_vector)) {
        fail(c, AFF_EINVAL, "set user_vector (or user_id) to say who the user is");
        return;
    }
    size_t n = r->n_candidates;
    if (n < 1 || n > AFF_MAX_RERANK_CANDIDATES) {
        fail(c, AFF_EINVAL, "%zu candidates; Rerank takes 1..%d", n, AFF_MAX_RERANK_CANDIDATES);
        return;
    }
    float weight = r->affinity_weight ? r->affinity_weight->value : 0.5f;
    if (!(weight >= 0.0f && weight <= 1.0f)) {
        fail(c, AFF_EINVAL, "affinity_weight %g is outside 0..1", (double)weight);
        return;
    }
    serve_state *st = serve_state_new(c, 1, n, true);
    const char **ids = st ? (st->rerank_ids = xcalloc(n, sizeof *ids)) : NULL;
    if (!st || !ids) {
        fail(c, AFF_ENOMEM, "out of memory preparing %zu candidates", n);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        ids[i] = r->candidates[i]->id;
        st->base_scores[i] = r->candidates[i]->base_score;
    }
    const float *vector;
    uint32_t vdim;
    if (by_id) {
        bool found = false;
        st->user_vector = xcalloc(dim, sizeof *st->user_vector);
        if (!st->user_vector) {
            fail(c, AFF_ENOMEM, "out of memory reading the user's profile");
            return;
        }
        if (profiles_user_vector(c->t->cfg.profiles, r->collection, r->user_id, st->user_vector,
                                 dim, &found, &err)) {
            tcall_fail(c, &err);
            return;
        }
        if (found) {
            st->rerank_source = AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE;
        } else {
            st->user_vector[0] = 1.0f; /* any valid vector: weight 0 ignores it */
            st->rerank_without_profile = true;
            st->rerank_source = AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_UNSPECIFIED;
            weight = 0.0f;
        }
        vector = st->user_vector;
        vdim = dim;
    } else {
        vector = r->user_vector->values;
        vdim = (uint32_t)r->user_vector->n_values;
        st->rerank_source = AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_VECTOR;
    }
    st->rerank = (aff_rerank_query){.vector = vector,
                                    .dim = vdim,
                                    .ids = ids,
                                    .base_scores = st->base_scores,
                                    .n = (uint32_t)n,
                                    .weight = weight};
    st->respond = respond_rerank;
    st->what = "query";
    serve_submit(c, st, r->collection, BATCHER_RERANK, 1);
}

/* ---- BatchRecommend: many users in, results out in request order -------------------------- */

typedef struct bitem {
    struct bitem *next;
    tcall *c;
    Affinity__V1__RecommendRequest *req; /* owned */
    batcher_request br;
    recommend_job job;
    aff_hit *hits;
    uint32_t n_hits;
    aff_err qerr;
    bool done;
    int code; /* gRPC code of this request's outcome */
    char msg[256];
} bitem;

typedef struct bstream {
    pthread_mutex_t mu;
    bitem *head, *tail;
    uint32_t outstanding; /* read, not yet answered */
    uint64_t received;
    bool recv_done, recv_paused, send_pending, finished, broken;
} bstream;

static void bitem_free(bitem *it)
{
    if (!it) return;
    recommend_job_release(&it->job);
    if (it->req) protobuf_c_message_free_unpacked(&it->req->base, NULL);
    free(it->hits);
    free(it);
}

static void bstream_free(void *p)
{
    bstream *s = p;
    if (!s) return;
    for (bitem *it = s->head, *next; it; it = next) {
        next = it->next;
        bitem_free(it);
    }
    pthread_mutex_destroy(&s->mu);
    free(s);
}

static void bitem_send(tcall *c, bitem *it)
{
    Affinity__V1__RecommendResponse resp = AFFINITY__V1__RECOMMEND_RESPONSE__INIT;
    Affinity__V1__Hit *hits = NULL;
    Affinity__V1__Hit **ptrs = NULL;
    if (it->req) resp.request_id = it->req->request_id;
    if (it->code == 0) {
        hits = xcalloc(it->n_hits, sizeof *hits);
        ptrs = xcalloc(it->n_hits, sizeof *ptrs);
        if (!hits || !ptrs) {
            it->code = GRPC_STATUS_RESOURCE_EXHAUSTED;
            snprintf(it->msg, sizeof it->msg, "out of memory encoding results");
        } else {
            for (uint32_t j = 0; j < it->n_hits; j++) {
                affinity__v1__hit__init(&hits[j]);
                hits[j].id = it->hits[j].id;
                hits[j].score = it->hits[j].score;
                ptrs[j] = &hits[j];
            }
            resp.n_hits = it->n_hits;
            resp.hits = ptrs;
            resp.source = it->job.source;
        }
    }
    if (it->code != 0) {
        resp.error_code = it->code;
        resp.error_message = it->msg;
    }
    bool ok = tcall_send(c, &resp.base);
    free(hits);
    free(ptrs);
    if (!ok) {
        bstream *s = c->state;
        s->send_pending = false;
        s->broken = true;
    }
}

/* Sends the next answer in order, resumes reading, or ends the call. s->mu held. */
static void bstream_pump(tcall *c, bstream *s)
{
    while (!s->send_pending && s->head && s->head->done) {
        bitem *it = s->head;
        s->head = it->next;
        if (!s->head) s->tail = NULL;
        s->outstanding--;
        if (!s->broken) {
            s->send_pending = true;
            bitem_send(c, it);
        }
        bitem_free(it);
    }
    if (s->recv_paused && !s->recv_done && s->outstanding < STREAM_MAX_OUTSTANDING) {
        s->recv_paused = false;
        if (!tcall_recv(c)) s->recv_done = s->broken = true;
    }
    if (!s->finished && s->recv_done && !s->head && !s->send_pending) {
        s->finished = true;
        if (s->broken)
            tcall_finish(c, GRPC_STATUS_CANCELLED, "the stream broke", NULL);
        else
            tcall_finish(c, 0, NULL, NULL);
    }
}

static void bitem_done(batcher_request *br)
{
    bitem *it = br->user;
    tcall *c = it->c;
    bstream *s = c->state;
    metrics_observe_queue_wait(c->t->cfg.metrics, br->wait_ns);
    pthread_mutex_lock(&s->mu);
    if (br->status != AFF_OK) {
        it->code = aff_status_grpc_code(br->status);
        snprintf(it->msg, sizeof it->msg, "%s", br->err.msg);
    } else if (it->qerr.code != AFF_OK) {
        it->code = aff_status_grpc_code(it->qerr.code);
        snprintf(it->msg, sizeof it->msg, "%s", it->qerr.msg);
    }
    it->done = true;
    bstream_pump(c, s);
    pthread_mutex_unlock(&s->mu);
    tcall_unref(c);
}

static void bstream_on_recv(tcall *c, bool ok, grpc_byte_buffer *bb)
{
    bstream *s = c->state;
    pthread_mutex_lock(&s->mu);
    if (!ok || !bb) {
        if (!ok) s->broken = true;
        s->recv_done = true;
        if (bb) grpc_byte_buffer_destroy(bb);
        bstream_pump(c, s);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    bitem *it = calloc(1, sizeof *it);
    if (!it) {
        grpc_byte_buffer_destroy(bb);
        s->recv_done = s->broken = true;
        bstream_pump(c, s);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    it->c = c;
    char why[400];
    it->req = (void *)transport__unpack_checked(bb, &affinity__v1__recommend_request__descriptor,
                                                why, sizeof why);
    grpc_byte_buffer_destroy(bb);
    aff_err err;
    int rc;
    if (!it->req) {
        rc = aff__fail(&err, AFF_EINVAL, "message %llu is not a valid RecommendRequest%s%s",
                       (unsigned long long)s->received, why[0] ? ": " : "", why);
    } else if (atomic_load(&c->t->draining)) {
        rc = aff__fail(&err, AFF_EUNAVAILABLE, "the server is shutting down; retry elsewhere");
    } else if (!(it->hits = xcalloc(recommend_room(it->req), sizeof *it->hits))) {
        rc = aff__fail(&err, AFF_ENOMEM, "out of memory preparing the query");
    } else {
        rc = recommend_prepare(c->t, it->req, &it->job, it->hits, &it->n_hits, &err);
    }
    if (!rc && it->job.answered) {
        it->done = true; /* popularity: answered at once, in order with the others */
    } else if (!rc) {
        it->br = (batcher_request){.kind = BATCHER_SEARCH,
                                   .collection = it->req->collection,
                                   .deadline_ns = tcall_deadline_ns(c),
                                   .nq = 1,
                                   .queries = &it->job.q,
                                   .hits = it->hits,
                                   .n_hits = &it->n_hits,
                                   .query_errs = &it->qerr,
                                   .done = bitem_done,
                                   .user = it};
        tcall_ref(c);
        rc = batcher_submit(c->t->batcher, &it->br, &err);
        if (rc) tcall_unref(c);
    }
    if (rc) {
        it->done = true;
        it->code = aff_status_grpc_code(rc);
        snprintf(it->msg, sizeof it->msg, "%s", err.msg);
    }
    s->received++;
    s->outstanding++;
    if (s->tail)
        s->tail->next = it;
    else
        s->head = it;
    s->tail = it;
    if (s->outstanding < STREAM_MAX_OUTSTANDING) {
        if (!tcall_recv(c)) s->recv_done = s->broken = true;
    } else {
        s->recv_paused = true;
    }
    bstream_pump(c, s);
    pthread_mutex_unlock(&s->mu);
}

static void bstream_on_send(tcall *c, bool ok)
{
    bstream *s = c->state;
    pthread_mutex_lock(&s->mu);
    s->send_pending = false;
    if (!ok) s->broken = true;
    bstream_pump(c, s);
    pthread_mutex_unlock(&s->mu);
}

static void rpc_batch_recommend(tcall *c)
{
    bstream *s = calloc(1, sizeof *s);
    if (!s) {
        fail(c, AFF_ENOMEM, "out of memory starting a stream");
        return;
    }
    pthread_mutex_init(&s->mu, NULL);
    c->state = s;
    c->state_free = bstream_free;
    c->on_recv = bstream_on_recv;
    c->on_send = bstream_on_send;
    if (!tcall_recv(c)) fail(c, AFF_EINTERNAL, "cannot read the request stream");
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
    tcall_finish(c, 0, NULL, &info.base);
}

static void rpc_health_check(tcall *c, ProtobufCMessage *msg)
{
    const Grpc__Health__V1__HealthCheckRequest *r = (void *)msg;
    if (r->service[0] && strcmp(r->service, "affinity.v1.Affinity") != 0) {
        fail(c, AFF_ENOTFOUND,
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
    BLOCKING("PutEvents", put_events_request, rpc_put_events),
    UNARY("GetUser", get_user_request, rpc_get_user),
    BLOCKING("DeleteUser", delete_user_request, rpc_delete_user),
    BLOCKING("ExportUser", export_user_request, transport__rpc_export_user), /* issue 12 */
    BLOCKING("SetUserOptOut", set_user_opt_out_request, transport__rpc_set_user_opt_out),
    UNARY("GetServerInfo", get_server_info_request, rpc_get_server_info),
    {"/grpc.health.v1.Health/Check", &grpc__health__v1__health_check_request__descriptor, true,
     false, rpc_health_check, NULL},
    {"/grpc.health.v1.Health/Watch", NULL, true, false, NULL, rpc_health_watch},
    /* issue 12: server reflection (transport_reflection.c) */
    {TRANSPORT_REFLECTION_V1, NULL, false, false, NULL, transport__reflection_info},
    {TRANSPORT_REFLECTION_V1ALPHA, NULL, false, false, NULL, transport__reflection_info},
};
const size_t transport__n_methods = sizeof transport__methods / sizeof transport__methods[0];

/*
 * transport_catalog.c: the affinity.v1 handlers for collections and the catalog
 * (Create/Drop/List/DescribeCollection, UpsertItems, DeleteItems, GetItems): decode, call the
 * catalog (engine, then a durable store commit) or the engine, encode. Writes block on disk
 * and run on the transport's blocking-work threads.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "catalog.h"
#include "log.h"
#include "transport_client.h"
#include "transport_codec.h"
#include "transport_handlers.h"
#include "transport_model.h"

#define MAX_IDS_PER_CALL 100000 /* GetItems/DeleteItems ids in one request */

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
    info->dimension = ci->learned_only ? 0 : ci->dim;
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

/* ---- collections ------------------------------------------------------------------------ */

/* A collection's CollectionInfo and the storage it points into. */
typedef struct collection_pb {
    engine_collection_info ci;
    backend_info bi;
    tmodel_pb model;
    Affinity__V1__CollectionInfo info;
} collection_pb;

/* Fills out for collection name, or fails the call (NOT_FOUND) and returns false. */
static bool describe(tcall *c, const char *name, collection_pb *out)
{
    aff_err err;
    if (engine_describe_collection(c->t->engine, name, &out->ci, &err)) {
        tcall_fail(c, &err);
        return false;
    }
    engine_backend_info(c->t->engine, &out->bi);
    collection_info_to_pb(&out->ci, &out->bi, &out->info);
    transport__collection_model(c->t, name, &out->info, &out->model);
    return true;
}

void rpc_create_collection(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__CreateCollectionRequest *r = (void *)msg;
    aff_err err;
    /* dimension 0: no content space; the collection learns its vectors from events. */
    engine_collection_spec spec = {.name = r->name,
                                   .dim = r->dimension ? r->dimension : 1,
                                   .learned_only = r->dimension == 0,
                                   .hnsw_m = r->hnsw_m,
                                   .hnsw_ef_search = r->hnsw_ef_search};
    if (spec.learned_only && r->metric != AFFINITY__V1__METRIC__METRIC_UNSPECIFIED &&
        r->metric != AFFINITY__V1__METRIC__METRIC_INNER_PRODUCT) {
        transport__fail(c, AFF_EINVAL,
                        "dimension 0 makes a learned-only collection (inner product of learned "
                        "factors); leave metric unset or use METRIC_INNER_PRODUCT");
        return;
    }
    if (spec.learned_only && r->index == AFFINITY__V1__INDEX_KIND__INDEX_KIND_HNSW) {
        transport__fail(c, AFF_EINVAL,
                        "dimension 0 (learned-only) collections use INDEX_KIND_FLAT");
        return;
    }
    switch (r->metric) {
    case AFFINITY__V1__METRIC__METRIC_UNSPECIFIED:
    case AFFINITY__V1__METRIC__METRIC_COSINE:
        spec.metric = spec.learned_only ? AFF_METRIC_IP : AFF_METRIC_COSINE;
        break;
    case AFFINITY__V1__METRIC__METRIC_INNER_PRODUCT:
        spec.metric = AFF_METRIC_IP;
        break;
    case AFFINITY__V1__METRIC__METRIC_L2:
        spec.metric = AFF_METRIC_L2;
        break;
    default:
        transport__fail(c, AFF_EINVAL,
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
        transport__fail(c, AFF_EINVAL,
                        "index %d is unknown; use INDEX_KIND_FLAT or INDEX_KIND_HNSW",
                        (int)r->index);
        return;
    }
    als_params params;
    if (r->model && c->t->cfg.model) {
        als_params defaults;
        model_default_params(c->t->cfg.model, &defaults);
        if (transport__model_params(r->model, &defaults, "model", &params, &err)) {
            tcall_fail(c, &err);
            return;
        }
    }
    if (catalog_create_collection(c->t->cfg.catalog, &spec, &err)) {
        tcall_fail(c, &err);
        return;
    }
    if (r->model && c->t->cfg.model &&
        model_configure(c->t->cfg.model, r->name, &params, &err) != AFF_OK) {
        aff_err derr;
        catalog_drop_collection(c->t->cfg.catalog, r->name, &derr);
        tcall_fail(c, &err);
        return;
    }
    collection_pb cp;
    if (!describe(c, r->name, &cp)) return;
    Affinity__V1__CreateCollectionResponse resp = AFFINITY__V1__CREATE_COLLECTION_RESPONSE__INIT;
    resp.collection = &cp.info;
    tcall_finish(c, 0, NULL, &resp.base);
}

void rpc_drop_collection(tcall *c, ProtobufCMessage *msg)
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

void rpc_list_collections(tcall *c, ProtobufCMessage *msg)
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
    Affinity__V1__CollectionInfo *infos = transport__calloc(n, sizeof *infos);
    Affinity__V1__CollectionInfo **ptrs = transport__calloc(n, sizeof *ptrs);
    tmodel_pb *msts = transport__calloc(n, sizeof *msts);
    if (!infos || !ptrs || !msts) {
        transport__fail(c, AFF_ENOMEM, "out of memory listing collections");
    } else {
        for (size_t i = 0; i < n; i++) {
            collection_info_to_pb(&list[i], &bi, &infos[i]);
            transport__collection_model(c->t, list[i].name, &infos[i], &msts[i]);
            ptrs[i] = &infos[i];
        }
        Affinity__V1__ListCollectionsResponse resp = AFFINITY__V1__LIST_COLLECTIONS_RESPONSE__INIT;
        resp.n_collections = n;
        resp.collections = ptrs;
        tcall_finish(c, 0, NULL, &resp.base);
    }
    free(infos);
    free(ptrs);
    free(msts);
    free(list);
}

void rpc_describe_collection(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__DescribeCollectionRequest *r = (void *)msg;
    collection_pb cp;
    if (describe(c, r->name, &cp)) tcall_finish(c, 0, NULL, &cp.info.base);
}

/* ---- catalog ------------------------------------------------------------------------------ */

typedef struct upsert_state {
    char collection[AFF_MAX_NAME_LEN + 1];
    uint64_t upserted;
    uint64_t batches;
    uint64_t log_sequence; /* replication: the last record's sequence (0 without --log) */
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
    resp.log_sequence = st->log_sequence;
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

/* Applies one UpsertItemsRequest to collection (engine, then one store commit): the part
 * of an UpsertItems stream message that single-node mode runs where the call arrives and log
 * mode runs on every replica's apply thread. batch and upserted_before only word messages.
 * Returns 0 and *n_upserted (distinct ids), or a gRPC code with msg set. */
static int upsert_apply(transport *t, const char *collection,
                        const Affinity__V1__UpsertItemsRequest *r, uint64_t batch,
                        uint64_t upserted_before, char *msg, size_t msg_size, uint64_t *n_upserted)
{
    int code = 0;
    aff_item *items = NULL;
    float *linked = NULL; /* derived vectors of linked items */
    items = transport__calloc(r->n_items, sizeof *items);
    if (!items) {
        snprintf(msg, msg_size, "out of memory reading %zu items", r->n_items);
        code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        goto out;
    }
    for (size_t i = 0; i < r->n_items; i++) {
        const Affinity__V1__Item *it = r->items[i];
        items[i] = (aff_item){.id = it->id,
                              .vector = it->vector,
                              .dim = (uint32_t)it->n_vector,
                              .attrs.category = it->category,
                              .attrs.tags = (const char *const *)it->tags,
                              .attrs.n_tags = (uint32_t)it->n_tags,
                              .attrs.price = it->price,
                              .attrs.available = it->available_set ? it->available : true};
    }
    aff_err err;
    /* Linked items without a vector: derived from what they link to (the catalog decides). */
    size_t n_linked = 0;
    for (size_t i = 0; i < r->n_items; i++)
        n_linked += r->items[i]->n_vector == 0 && r->items[i]->n_linked_ids;
    if (n_linked) {
        uint32_t dim;
        if (engine_collection_dim(t->engine, collection, &dim, &err)) {
            snprintf(msg, msg_size, "message %llu: %s", (unsigned long long)batch, err.msg);
            code = aff_status_grpc_code(err.code);
            goto out;
        }
        if (!(linked = transport__calloc(n_linked * dim, sizeof *linked))) {
            snprintf(msg, msg_size, "out of memory deriving linked vectors");
            code = GRPC_STATUS_RESOURCE_EXHAUSTED;
            goto out;
        }
        for (size_t i = 0, l = 0; i < r->n_items; i++) {
            const Affinity__V1__Item *it = r->items[i];
            if (it->n_vector || !it->n_linked_ids) continue;
            char field[32];
            snprintf(field, sizeof field, "items[%zu]", i);
            const char *lc = it->linked_collection[0] ? it->linked_collection : collection;
            if (catalog_link_vector(t->cfg.catalog, lc, (const char *const *)it->linked_ids,
                                    it->n_linked_ids, dim, field, linked + l * dim, &err)) {
                snprintf(msg, msg_size, "message %llu: %s; %llu items applied before it",
                         (unsigned long long)batch, err.msg,
                         (unsigned long long)upserted_before);
                code = aff_status_grpc_code(err.code);
                goto out;
            }
            items[i].vector = linked + l * dim;
            items[i].dim = dim;
            l++;
        }
    }
    uint32_t coll_dim;
    if (!r->n_items && engine_collection_dim(t->engine, collection, &coll_dim, &err)) {
        snprintf(msg, msg_size, "message %llu: %s", (unsigned long long)batch, err.msg);
        code = aff_status_grpc_code(err.code);
        goto out;
    }
    if (r->n_items && catalog_upsert(t->cfg.catalog, collection, items, r->n_items, &err)) {
        snprintf(msg, msg_size, "message %llu: %s; %llu items applied before it",
                 (unsigned long long)batch, err.msg, (unsigned long long)upserted_before);
        code = aff_status_grpc_code(err.code);
        goto out;
    }
    *n_upserted = distinct_ids(items, r->n_items); /* a repeated id is one item */
out:
    free(items);
    free(linked);
    return code;
}

void transport__apply_upsert_items(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__UpsertItemsRequest *r = (void *)msg;
    char why[512];
    uint64_t n = 0;
    int code = upsert_apply(c->t, r->collection, r, 0, 0, why, sizeof why, &n);
    if (code) {
        tcall_finish(c, code, why, NULL);
        return;
    }
    Affinity__V1__UpsertItemsResponse resp = AFFINITY__V1__UPSERT_ITEMS_RESPONSE__INIT;
    resp.upserted_count = n;
    tcall_finish(c, 0, NULL, &resp.base);
}

/* Log mode: one stream message becomes one UpsertItems record naming the collection; the
 * answer comes back from this replica's apply. Returns a gRPC code with msg set on failure. */
static int upsert_through_log(tcall *c, Affinity__V1__UpsertItemsRequest *r, char *msg,
                              size_t msg_size, uint64_t *n_upserted)
{
    upsert_state *st = c->state;
    char *saved = r->collection;
    r->collection = st->collection;
    tcapture cap;
    uint64_t seq = 0;
    char why[512];
    int rc = transport__log_write(c, "UpsertItems", &r->base, &cap, &seq, why, sizeof why);
    r->collection = saved;
    if (rc) {
        snprintf(msg, msg_size, "message %llu: %.400s; %llu items applied before it",
                 (unsigned long long)st->batches, why, (unsigned long long)st->upserted);
        return aff_status_grpc_code(rc);
    }
    int code = cap.code;
    *n_upserted = 0;
    if (code) {
        snprintf(msg, msg_size, "message %llu: %.400s; %llu items applied before it",
                 (unsigned long long)st->batches, cap.msg, (unsigned long long)st->upserted);
    } else if (cap.bytes) {
        Affinity__V1__UpsertItemsResponse *resp =
            affinity__v1__upsert_items_response__unpack(NULL, cap.len, cap.bytes);
        if (resp) *n_upserted = resp->upserted_count;
        if (resp) affinity__v1__upsert_items_response__free_unpacked(resp, NULL);
    }
    if (!code && seq > st->log_sequence) st->log_sequence = seq;
    transport__capture_free(&cap);
    return code;
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
    uint64_t n = 0;
    if (c->t->cfg.log)
        code = upsert_through_log(c, r, msg, sizeof msg, &n);
    else
        code = upsert_apply(c->t, st->collection, r, st->batches, st->upserted, msg, sizeof msg, &n);
    if (code) goto out;
    st->upserted += n;
    st->batches++;
out:
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

void rpc_upsert_items(tcall *c)
{
    upsert_state *st = calloc(1, sizeof *st);
    if (!st) {
        transport__fail(c, AFF_ENOMEM, "out of memory starting an upsert");
        return;
    }
    c->state = st;
    c->state_free = upsert_state_free;
    c->on_recv = upsert_on_recv;
    if (!tcall_recv(c)) transport__fail(c, AFF_EINTERNAL, "cannot read the request stream");
}

void rpc_delete_items(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__DeleteItemsRequest *r = (void *)msg;
    aff_err err;
    if (r->n_ids > MAX_IDS_PER_CALL) {
        transport__fail(c, AFF_EINVAL, "%zu ids; DeleteItems takes at most %d per call", r->n_ids,
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

void rpc_get_items(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__GetItemsRequest *r = (void *)msg;
    aff_err err;
    uint32_t dim = 0;
    if (r->n_ids > MAX_IDS_PER_CALL) {
        transport__fail(c, AFF_EINVAL, "%zu ids; GetItems takes at most %d per call", r->n_ids,
                        MAX_IDS_PER_CALL);
        return;
    }
    if (engine_collection_dim(c->t->engine, r->collection, &dim, &err)) {
        tcall_fail(c, &err);
        return;
    }
    /* Where vectors come from: the collection itself, or its behaviour space. */
    char space[MODEL_SPACE_NAME_LEN + 1] = "";
    bool has_content = true;
    if (r->space == AFFINITY__V1__SPACE__SPACE_BEHAVIOUR) {
        bool found = false;
        if (c->t->cfg.model &&
            model_space(c->t->cfg.model, r->collection, space, &dim, &found, &err)) {
            tcall_fail(c, &err);
            return;
        }
        if (!found) {
            transport__fail(c, AFF_EPRECONDITION,
                            "space SPACE_BEHAVIOUR needs a trained model; collection \"%s\" has "
                            "none yet",
                            r->collection);
            return;
        }
    } else if (r->space != AFFINITY__V1__SPACE__SPACE_UNSPECIFIED &&
               r->space != AFFINITY__V1__SPACE__SPACE_CONTENT) {
        transport__fail(c, AFF_EINVAL, "space %d is unknown; use SPACE_CONTENT or SPACE_BEHAVIOUR",
                        (int)r->space);
        return;
    } else if (engine_collection_has_content(c->t->engine, r->collection, &has_content, &err)) {
        tcall_fail(c, &err);
        return;
    }
    size_t n = r->n_ids;
    if (r->include_vectors &&
        (uint64_t)n * dim * sizeof(float) > (uint64_t)c->t->cfg.max_message_bytes) {
        transport__fail(
            c, AFF_EFULL,
            "%zu vectors of dimension %u would exceed the %u-byte message limit; ask for "
            "fewer ids per call or leave include_vectors off",
            n, dim, c->t->cfg.max_message_bytes);
        return;
    }
    item_record *found = transport__calloc(n, sizeof *found);
    float *vectors = r->include_vectors ? transport__calloc(n * dim, sizeof *vectors) : NULL;
    Affinity__V1__Item *items = transport__calloc(n, sizeof *items);
    Affinity__V1__Item **item_ptrs = transport__calloc(n, sizeof *item_ptrs);
    char **tag_ptrs = transport__calloc(n * AFF_MAX_TAGS_PER_ITEM, sizeof *tag_ptrs);
    char **missing = transport__calloc(n, sizeof *missing);
    if (!found || (r->include_vectors && !vectors) || !items || !item_ptrs || !tag_ptrs ||
        !missing) {
        transport__fail(c, AFF_ENOMEM, "out of memory reading %zu items", n);
        goto out;
    }
    size_t nf = 0, nm = 0;
    for (size_t i = 0; i < n; i++) {
        float *v = vectors && has_content ? vectors + nf * dim : NULL;
        int rc = engine_get_item(c->t->engine, r->collection, r->ids[i], &found[nf],
                                 space[0] ? NULL : v, &err);
        if (rc == AFF_ENOTFOUND) {
            missing[nm++] = r->ids[i];
            continue;
        }
        if (rc) {
            tcall_fail(c, &err);
            goto out;
        }
        if (v && space[0]) {
            item_record tmp;
            aff_err serr;
            if (engine_get_item(c->t->engine, space, r->ids[i], &tmp, v, &serr) != AFF_OK)
                v = NULL; /* not learned yet */
        }
        Affinity__V1__Item *it = &items[nf];
        transport_item_to_pb(&found[nf], tag_ptrs + nf * AFF_MAX_TAGS_PER_ITEM, it);
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

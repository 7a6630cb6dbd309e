/*
 * transport_privacy.c: owns ExportUser, the answer to a shopper's data-access request: for
 * each collection that holds anything about the user, the GetUser summary, the stored event
 * history, the per-item aggregates and the all-time type index. Rules kept: everything the
 * response points at is owned by one export (freed with it after the answer is serialized);
 * one collection that cannot be read fails the call rather than giving a partial export.
 */
#include "transport_privacy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "affinity/v1/affinity.pb-c.h"
#include "profiles.h"

/* Every allocation of one export, freed together. */
typedef struct export_mem {
    void **blocks;
    size_t n, cap;
    bool oom;
} export_mem;

static void *mem_keep(export_mem *m, void *p)
{
    if (!p) {
        m->oom = true;
        return NULL;
    }
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 64;
        void **b = realloc(m->blocks, cap * sizeof *b);
        if (!b) {
            free(p);
            m->oom = true;
            return NULL;
        }
        m->blocks = b;
        m->cap = cap;
    }
    return m->blocks[m->n++] = p;
}

static char *mem_str(export_mem *m, const char *s)
{
    return mem_keep(m, strdup(s ? s : ""));
}

static void mem_free(export_mem *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->blocks[i]);
    free(m->blocks);
}

/* A growable array of message pointers. */
typedef struct ptr_vec {
    void **v;
    size_t n, cap;
} ptr_vec;

static bool vec_push(export_mem *m, ptr_vec *pv, void *p)
{
    if (!p) return false;
    if (pv->n == pv->cap) {
        size_t cap = pv->cap ? pv->cap * 2 : 16;
        void **v = mem_keep(m, malloc(cap * sizeof *v));
        if (!v) return false;
        if (pv->n) memcpy(v, pv->v, pv->n * sizeof *v);
        pv->v = v; /* the old array stays in m until the end */
        pv->cap = cap;
    }
    pv->v[pv->n++] = p;
    return true;
}

typedef struct export_one {
    export_mem *m;
    ptr_vec events, interactions, types;
    Affinity__V1__ExportedTypeIndex *last_type;
    ptr_vec last_type_items;
} export_one;

static int on_event(void *ctx, uint64_t seq, const store_event *e)
{
    (void)seq;
    export_one *x = ctx;
    Affinity__V1__ExportedEvent *ev = mem_keep(x->m, malloc(sizeof *ev));
    if (!ev) return AFF_ENOMEM;
    affinity__v1__exported_event__init(ev);
    ev->item_id = mem_str(x->m, e->item_id);
    ev->type = mem_str(x->m, e->type);
    ev->timestamp_ms = e->ts_ms;
    ev->value = e->value;
    if (e->n_context) {
        ev->context = mem_keep(x->m, calloc(e->n_context, sizeof *ev->context));
        for (uint32_t i = 0; ev->context && i < e->n_context; i++) {
            Affinity__V1__ExportedEvent__ContextEntry *kv = mem_keep(x->m, malloc(sizeof *kv));
            if (!kv) return AFF_ENOMEM;
            affinity__v1__exported_event__context_entry__init(kv);
            kv->key = mem_str(x->m, e->context[i].key);
            kv->value = mem_str(x->m, e->context[i].value);
            ev->context[ev->n_context++] = kv;
        }
    }
    return x->m->oom || !vec_push(x->m, &x->events, ev) ? AFF_ENOMEM : 0;
}

static int on_interaction(void *ctx, const char *item, const store_interaction *in)
{
    export_one *x = ctx;
    Affinity__V1__ExportedInteraction *it = mem_keep(x->m, malloc(sizeof *it));
    if (!it) return AFF_ENOMEM;
    affinity__v1__exported_interaction__init(it);
    it->item_id = mem_str(x->m, item);
    it->count = in->count;
    it->last_ms = in->last_ms;
    it->weight = in->weight;
    return x->m->oom || !vec_push(x->m, &x->interactions, it) ? AFF_ENOMEM : 0;
}

static void close_type(export_one *x)
{
    if (!x->last_type) return;
    x->last_type->n_item_ids = x->last_type_items.n;
    x->last_type->item_ids = (char **)x->last_type_items.v;
    x->last_type = NULL;
    x->last_type_items = (ptr_vec){0};
}

static int on_type_item(void *ctx, const char *type, const char *item)
{
    export_one *x = ctx;
    if (!x->last_type || strcmp(x->last_type->type, type) != 0) {
        close_type(x);
        Affinity__V1__ExportedTypeIndex *ti = mem_keep(x->m, malloc(sizeof *ti));
        if (!ti) return AFF_ENOMEM;
        affinity__v1__exported_type_index__init(ti);
        ti->type = mem_str(x->m, type);
        if (!vec_push(x->m, &x->types, ti)) return AFF_ENOMEM;
        x->last_type = ti;
    }
    return x->m->oom || !vec_push(x->m, &x->last_type_items, mem_str(x->m, item)) ? AFF_ENOMEM : 0;
}

/* Fills out for one collection; AFF_ENOTFOUND when it holds nothing about the user. */
static int export_collection(tcall *c, const char *collection, const char *user, export_mem *m,
                             Affinity__V1__UserExport *out, aff_err *err)
{
    profiles_user_info *info = mem_keep(m, malloc(sizeof *info));
    if (!info) return aff__fail(err, AFF_ENOMEM, "out of memory exporting a user");
    int rc = profiles_get_user(c->t->cfg.profiles, collection, user, info, err);
    if (rc) return rc;
    export_one x = {.m = m};
    profiles_export_fns fns = {.on_event = on_event,
                               .on_interaction = on_interaction,
                               .on_type_item = on_type_item,
                               .ctx = &x};
    rc = profiles_export(c->t->cfg.profiles, collection, user, &fns, err);
    if (rc == AFF_ENOMEM || m->oom)
        return aff__fail(err, AFF_ENOMEM, "out of memory exporting a user");
    if (rc) return rc;
    close_type(&x);
    Affinity__V1__GetUserResponse *sum = mem_keep(m, malloc(sizeof *sum));
    Affinity__V1__GetUserResponse__EventCountsEntry **counts =
        mem_keep(m, calloc(info->n_counts + 1, sizeof *counts));
    Affinity__V1__CategoryWeight **cats =
        mem_keep(m, calloc(info->n_top_categories + 1, sizeof *cats));
    if (!sum || !counts || !cats) return aff__fail(err, AFF_ENOMEM, "out of memory");
    affinity__v1__get_user_response__init(sum);
    sum->user_id = (char *)user;
    for (uint32_t i = 0; i < info->n_counts; i++) {
        Affinity__V1__GetUserResponse__EventCountsEntry *e = mem_keep(m, malloc(sizeof *e));
        if (!e) return aff__fail(err, AFF_ENOMEM, "out of memory");
        affinity__v1__get_user_response__event_counts_entry__init(e);
        e->key = info->counts[i].type;
        e->value = info->counts[i].count;
        counts[sum->n_event_counts++] = e;
    }
    for (uint32_t i = 0; i < info->n_top_categories; i++) {
        Affinity__V1__CategoryWeight *w = mem_keep(m, malloc(sizeof *w));
        if (!w) return aff__fail(err, AFF_ENOMEM, "out of memory");
        affinity__v1__category_weight__init(w);
        w->category = info->top_categories[i].category;
        w->weight = info->top_categories[i].weight;
        cats[sum->n_top_categories++] = w;
    }
    sum->event_counts = counts;
    sum->top_categories = cats;
    sum->last_event_ms = info->last_event_ms;
    sum->history_length = info->history_length;
    affinity__v1__user_export__init(out);
    out->collection = (char *)collection;
    out->summary = sum;
    out->n_events = x.events.n;
    out->events = (Affinity__V1__ExportedEvent **)x.events.v;
    out->n_interactions = x.interactions.n;
    out->interactions = (Affinity__V1__ExportedInteraction **)x.interactions.v;
    out->n_type_index = x.types.n;
    out->type_index = (Affinity__V1__ExportedTypeIndex **)x.types.v;
    return 0;
}

void transport__rpc_export_user(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__ExportUserRequest *r = (void *)msg;
    aff_err err;
    export_mem m = {0};
    engine_collection_info *infos = NULL;
    size_t n_infos = 0;
    if (r->collection[0]) {
        uint32_t dim;
        if (engine_collection_dim(c->t->engine, r->collection, &dim, &err)) {
            tcall_fail(c, &err);
            return;
        }
    } else if (engine_list_collections(c->t->engine, &infos, &n_infos, &err)) {
        tcall_fail(c, &err);
        return;
    }
    size_t n_names = r->collection[0] ? 1 : n_infos;
    Affinity__V1__UserExport *exports = calloc(n_names + 1, sizeof *exports);
    Affinity__V1__UserExport **ptrs = calloc(n_names + 1, sizeof *ptrs);
    size_t n_out = 0;
    int rc = exports && ptrs ? 0 : aff__fail(&err, AFF_ENOMEM, "out of memory exporting a user");
    for (size_t i = 0; !rc && i < n_names; i++) {
        const char *name = r->collection[0] ? r->collection : infos[i].name;
        rc = export_collection(c, name, r->user_id, &m, &exports[n_out], &err);
        if (rc == AFF_ENOTFOUND) { /* nothing held here */
            rc = 0;
            continue;
        }
        if (!rc) {
            ptrs[n_out] = &exports[n_out];
            n_out++;
        }
    }
    /* The opt-out records are data about the user too. */
    char **opted = calloc(n_names + 2, sizeof *opted);
    size_t n_opted = 0;
    if (!rc && !opted) rc = aff__fail(&err, AFF_ENOMEM, "out of memory exporting a user");
    for (size_t i = 0; !rc && i <= n_names; i++) {
        const char *name = i == n_names ? "" : r->collection[0] ? r->collection : infos[i].name;
        bool here = false, everywhere = false;
        rc = profiles_opted_out(c->t->cfg.profiles, name, r->user_id, &here, &everywhere, &err);
        if (!rc && here) opted[n_opted++] = (char *)name;
        if (!rc && i == n_names && everywhere) opted[n_opted++] = "*";
    }
    if (rc) {
        tcall_fail(c, &err);
    } else {
        Affinity__V1__ExportUserResponse resp = AFFINITY__V1__EXPORT_USER_RESPONSE__INIT;
        resp.n_opted_out = n_opted;
        resp.opted_out = opted;
        resp.user_id = r->user_id;
        resp.n_collections = n_out;
        resp.collections = ptrs;
        resp.note = "Not included: popularity counters, which are anonymous per-item sums "
                    "with no link to the user. DeleteUser erases everything listed here but "
                    "the opt-out records, which are kept so that the choice is honoured.";
        tcall_finish(c, 0, NULL, &resp.base);
    }
    free(opted);
    free(exports);
    free(ptrs);
    free(infos);
    mem_free(&m);
}

void transport__rpc_set_user_opt_out(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__SetUserOptOutRequest *r = (void *)msg;
    aff_err err;
    uint32_t dim;
    if (r->collection[0] && engine_collection_dim(c->t->engine, r->collection, &dim, &err)) {
        tcall_fail(c, &err);
        return;
    }
    bool erased = false;
    if (profiles_set_opt_out(c->t->cfg.profiles, r->collection, r->user_id, r->opt_out, &erased,
                             &err)) {
        tcall_fail(c, &err);
        return;
    }
    Affinity__V1__SetUserOptOutResponse resp = AFFINITY__V1__SET_USER_OPT_OUT_RESPONSE__INIT;
    resp.erased = erased;
    tcall_finish(c, 0, NULL, &resp.base);
}

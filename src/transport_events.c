/*
 * transport_events.c: the affinity.v1 handlers for behaviour events and shoppers (PutEvents,
 * GetUser, DeleteUser): decode, call the profiles module, encode. Measurement: impressions go
 * to the outcomes module only; clicks, add-to-carts and purchases that carry a
 * recommendation_id are attributed there after the profiles module applied them, and an
 * attributed outcome of an experiment arm feeds its bandit. PutEvents and DeleteUser
 * block on disk (fsync) and run on the transport's blocking-work threads; GetUser reads a
 * snapshot where the call arrives.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "profiles.h"
#include "transport_handlers.h"

/* A rejection the transport decides itself (before the profiles module sees the event). */
static bool event_precheck(const Affinity__V1__Event *e, char *reason, size_t size)
{
    if (e->type == AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_IMPRESSION) {
        size_t n = strnlen(e->item_id, AFF_MAX_ID_LEN + 1);
        if (n < 1 || n > AFF_MAX_ID_LEN) {
            snprintf(reason, size, "item_id must be 1..%d bytes", AFF_MAX_ID_LEN);
            return false;
        }
    }
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

/* Attributes an applied event: every impression (one without a recommendation_id counts as
 * unattributed), and clicks, add-to-carts and purchases that carry a recommendation_id. */
static void attribute(transport *t, const char *collection, const Affinity__V1__Event *e)
{
    outcomes_kind kind;
    switch (e->type) {
    case AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_IMPRESSION:
        kind = OUTCOMES_IMPRESSION;
        break;
    case AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CLICK:
        kind = OUTCOMES_CLICK;
        break;
    case AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_ADD_TO_CART:
        kind = OUTCOMES_ADD_TO_CART;
        break;
    case AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE:
        kind = OUTCOMES_PURCHASE;
        break;
    default:
        return;
    }
    if (!t->cfg.outcomes || (kind != OUTCOMES_IMPRESSION && !e->recommendation_id[0])) return;
    outcomes_attribution a;
    outcomes_attribute(t->cfg.outcomes, collection, e->recommendation_id, e->item_id, kind,
                       e->value, &a);
    if (a.attributed && a.experiment[0])
        experiments_observe(t->cfg.experiments, a.experiment, a.arm, a.counted);
}

profiles_event transport__event_from_pb(const Affinity__V1__Event *e, store_kv *kv)
{
    for (size_t j = 0; j < e->n_context; j++)
        kv[j] = (store_kv){.key = e->context[j]->key, .value = e->context[j]->value};
    return (profiles_event){.item_id = e->item_id,
                            .type = (profiles_event_kind)e->type,
                            .custom_type = e->custom_type[0] ? e->custom_type : NULL,
                            .timestamp_ms = e->timestamp_ms,
                            .value = e->value,
                            .context = kv,
                            .n_context = (uint32_t)e->n_context};
}

/* PutEvents: one durable transaction for the call's valid events; each invalid one comes
 * back as a RejectedEvent with its position and reason. */
void rpc_put_events(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__PutEventsRequest *r = (void *)msg;
    aff_err err;
    size_t n = r->n_events;
    if (!transport__require_collection(c, r->collection)) return;
    size_t user_len = strnlen(r->user_id, AFF_MAX_ID_LEN + 1);
    if (user_len == 0 || user_len > AFF_MAX_ID_LEN) {
        transport__fail(c, AFF_EINVAL, "user id must be 1..%d bytes", AFF_MAX_ID_LEN);
        return;
    }
    if (n < 1 || n > PROFILES_MAX_EVENTS) {
        transport__fail(c, AFF_EINVAL, "%zu events; PutEvents takes 1..%d per call", n,
                        PROFILES_MAX_EVENTS);
        return;
    }
    size_t n_kv = 0;
    for (size_t i = 0; i < n; i++)
        n_kv += r->events[i]->n_context;
    profiles_event *events = transport__calloc(n, sizeof *events);
    uint32_t *index = transport__calloc(n, sizeof *index); /* events[j] is request event index[j] */
    store_kv *kv = transport__calloc(n_kv, sizeof *kv);
    profiles_rejection *rej = transport__calloc(n, sizeof *rej);
    Affinity__V1__RejectedEvent *out = transport__calloc(n, sizeof *out);
    Affinity__V1__RejectedEvent **out_ptrs = transport__calloc(n, sizeof *out_ptrs);
    char(*reasons)[160] = transport__calloc(n, sizeof *reasons);
    bool *pre_rejected = transport__calloc(n, sizeof *pre_rejected);
    if (!events || !index || !kv || !rej || !out || !out_ptrs || !reasons || !pre_rejected) {
        transport__fail(c, AFF_ENOMEM, "out of memory reading %zu events", n);
        goto out;
    }
    size_t m = 0, off = 0;
    uint32_t impressions = 0;
    for (size_t i = 0; i < n; i++) {
        const Affinity__V1__Event *e = r->events[i];
        if (!event_precheck(e, reasons[i], sizeof reasons[i])) {
            pre_rejected[i] = true;
            continue;
        }
        if (e->type == AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_IMPRESSION) {
            impressions++; /* measurement only: never a profile event */
            continue;
        }
        index[m] = (uint32_t)i;
        events[m++] = transport__event_from_pb(e, kv + off);
        off += e->n_context;
    }
    uint32_t applied = 0, n_rej = 0;
    if (m && profiles_put_events(c->t->cfg.profiles, r->collection, r->user_id, events, m, &applied,
                                 rej, &n_rej, &err)) {
        tcall_fail(c, &err);
        goto out;
    }
    if (applied && c->t->cfg.on_events)
        c->t->cfg.on_events(c->t->cfg.on_events_ctx, r->collection, applied);
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
            attribute(c->t, r->collection, r->events[i]);
            continue;
        }
        affinity__v1__rejected_event__init(&out[n_out]);
        out[n_out].index = (uint32_t)i;
        out[n_out].reason = reasons[i];
        out_ptrs[n_out] = &out[n_out];
        n_out++;
    }
    Affinity__V1__PutEventsResponse resp = AFFINITY__V1__PUT_EVENTS_RESPONSE__INIT;
    resp.applied_count = applied + impressions;
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

void rpc_get_user(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__GetUserRequest *r = (void *)msg;
    aff_err err;
    if (!transport__require_collection(c, r->collection)) return;
    profiles_user_info *info = malloc(sizeof *info);
    if (!info) {
        transport__fail(c, AFF_ENOMEM, "out of memory reading a user");
        return;
    }
    int rc = profiles_get_user(c->t->cfg.profiles, r->collection, r->user_id, info, &err);
    if (rc == AFF_ENOTFOUND) {
        transport__fail(c, AFF_ENOTFOUND,
                        "user '%.128s' is unknown in collection '%s' (no events, or deleted)",
                        r->user_id, r->collection);
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
        profiles_traits tr;
        Affinity__V1__Traits traits = AFFINITY__V1__TRAITS__INIT;
        if (profiles_user_traits(c->t->cfg.profiles, r->collection, r->user_id, &tr, &err) ==
            AFF_OK) {
            traits.price_sensitivity = tr.price_sensitivity;
            traits.recency_days = tr.recency_days;
            traits.frequency_90d = tr.frequency_90d;
            traits.monetary_90d = tr.monetary_90d;
            traits.rfm_recency = tr.r;
            traits.rfm_frequency = tr.f;
            traits.rfm_monetary = tr.m;
            traits.loyalty = tr.loyalty;
            traits.activity = tr.activity;
            traits.purchase_intent = tr.purchase_intent;
            resp.traits = &traits;
        }
        tcall_finish(c, 0, NULL, &resp.base);
    }
    free(info);
}

/* DeleteUser: erases the user from one collection, or from all with an empty collection,
 * durably; answered after the commit. */
void rpc_delete_user(tcall *c, ProtobufCMessage *msg)
{
    const Affinity__V1__DeleteUserRequest *r = (void *)msg;
    aff_err err;
    if (r->collection[0] && !transport__require_collection(c, r->collection)) return;
    bool existed = false;
    if (profiles_delete_user(c->t->cfg.profiles, r->collection, r->user_id, &existed, &err)) {
        tcall_fail(c, &err);
        return;
    }
    Affinity__V1__DeleteUserResponse resp = AFFINITY__V1__DELETE_USER_RESPONSE__INIT;
    resp.existed = existed;
    tcall_finish(c, 0, NULL, &resp.base);
}

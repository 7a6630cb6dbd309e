/*
 * transport_handlers.h: the affinity.v1 handlers, by service area, and the helpers their files
 * share. Only transport*.c include it. Each handler answers its call exactly once.
 */
#ifndef AFFINITY_TRANSPORT_HANDLERS_H
#define AFFINITY_TRANSPORT_HANDLERS_H

#include <stdbool.h>
#include <stddef.h>

#include "profiles.h"
#include "transport_internal.h"

/* ---- shared helpers (transport_rpc.c) ---- */

/* Answers the call with the gRPC code of aff_code and a printf-style message. */
void transport__fail(tcall *c, int aff_code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* calloc that never asks for 0 bytes (NULL only when out of memory). */
void *transport__calloc(size_t n, size_t size);
/* Checks that the collection exists; otherwise fails the call (NOT_FOUND) and returns false. */
bool transport__require_collection(tcall *c, const char *collection);

/* ---- collections and catalog (transport_catalog.c) ---- */
void rpc_create_collection(tcall *c, ProtobufCMessage *msg);
void rpc_drop_collection(tcall *c, ProtobufCMessage *msg);
void rpc_list_collections(tcall *c, ProtobufCMessage *msg);
void rpc_describe_collection(tcall *c, ProtobufCMessage *msg);
void rpc_upsert_items(tcall *c);
void rpc_delete_items(tcall *c, ProtobufCMessage *msg);
void rpc_get_items(tcall *c, ProtobufCMessage *msg);

/* ---- serving (transport_serving.c) ---- */
void rpc_search(tcall *c, ProtobufCMessage *msg);
void rpc_similar_items(tcall *c, ProtobufCMessage *msg);
void rpc_recommend(tcall *c, ProtobufCMessage *msg);
void rpc_rerank(tcall *c, ProtobufCMessage *msg);
void rpc_batch_recommend(tcall *c);
void rpc_recommend_page(tcall *c, ProtobufCMessage *msg);

/* ---- behaviour events and shoppers (transport_events.c) ---- */
void rpc_put_events(tcall *c, ProtobufCMessage *msg);
void rpc_get_user(tcall *c, ProtobufCMessage *msg);
void rpc_delete_user(tcall *c, ProtobufCMessage *msg);
/* The profiles module's view of one proto Event, borrowing e's strings; its context pairs are
 * written to kv (e->n_context entries, the caller's). The one conversion of PutEvents and
 * ImportEvents. */
profiles_event transport__event_from_pb(const Affinity__V1__Event *e, store_kv *kv);

#endif

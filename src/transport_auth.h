/*
 * transport_auth.h: who may call what. Bearer tokens carry a role, and optionally a list of
 * collections:
 *
 *   serving  Search, SimilarItems, Recommend, Rerank, BatchRecommend, PutEvents, GetUser,
 *            SetUserOptOut,
 *            GetItems, ListCollections, DescribeCollection, GetServerInfo, reflection,
 *            GetStats, GetExperiment, ListExperiments
 *   admin    everything: also CreateCollection, DropCollection, UpsertItems, DeleteItems,
 *            DeleteUser, ExportUser and any method not listed under serving
 *
 * A key limited to collections may only name those (a request without a collection, such
 * as DeleteUser for every collection, is refused; ListCollections and GetServerInfo name
 * none and are allowed). Tokens come from --token-file (one admin token, as before) and
 * --tokens-file (lines "ROLE TOKEN [COLLECTION,...]", '#' comments). Health is always open.
 * Only transport*.c include this header.
 */
#ifndef AFFINITY_TRANSPORT_AUTH_H
#define AFFINITY_TRANSPORT_AUTH_H

#include <stdbool.h>
#include <stddef.h>

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include "status.h"

typedef enum transport_role {
    TRANSPORT_ROLE_SERVING = 1,
    TRANSPORT_ROLE_ADMIN = 2,
} transport_role;

typedef struct tauth_key {
    char *bearer; /* "Bearer <token>" */
    transport_role role;
    char **collections; /* NULL: every collection */
    size_t n_collections;
} tauth_key;

typedef struct tauth tauth;

/* Builds the key list from admin_token (NULL or "": none) and the file at tokens_file (NULL
 * or "": none). *out is NULL when neither gives a key (no authentication). Errors:
 * AFF_EINVAL naming the file, line and problem; AFF_ENOMEM. */
int transport__auth_create(tauth **out, const char *admin_token, const char *tokens_file,
                           aff_err *err);
void transport__auth_destroy(tauth *a);
/* Keys in force (0 when a is NULL). */
size_t transport__auth_count(const tauth *a);
/* The key presented in md's "authorization" header, or NULL. Every key is compared in time
 * that depends only on the lengths. */
const tauth_key *transport__auth_find(const tauth *a, const grpc_metadata_array *md);
/* The key whose "Bearer <token>" equals value (an HTTP Authorization header), or NULL. */
const tauth_key *transport__auth_find_value(const tauth *a, const char *value);
/* The role the method at path needs (admin unless it is a serving method). */
transport_role transport__auth_method_role(const char *path);
/* May key k use collection name ("" means every collection)? */
bool transport__auth_collection_ok(const tauth_key *k, const char *name);
/* The collection named by a request: the string field "collection" of desc, read from the
 * serialized bytes (msg, len). false when desc has no such field; *out is "" when unset. */
bool transport__auth_peek_collection(const ProtobufCMessageDescriptor *desc, const uint8_t *msg,
                                     size_t len, char *out, size_t size);
/* The request descriptor of a streaming method's messages (NULL: not a known stream). */
const ProtobufCMessageDescriptor *transport__auth_stream_desc(const char *path);

#endif

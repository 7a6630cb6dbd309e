/*
 * transport_auth.c: owns the bearer-token keys, their roles and collection scopes, and the
 * method-to-role table (see transport_auth.h). transport.c asks it once per call (and once
 * per streamed message for keys limited to collections).
 */
#include "transport_auth.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "affinity/v1/affinity.pb-c.h"
#include "transport_codec.h"

#define MAX_KEYS 256

struct tauth {
    tauth_key keys[MAX_KEYS];
    size_t n;
};

/* Methods a serving key may call; every other method needs an admin key (fail closed). */
static const char *const serving_methods[] = {
    "/affinity.v1.Affinity/Search",
    "/affinity.v1.Affinity/SimilarItems",
    "/affinity.v1.Affinity/Recommend",
    "/affinity.v1.Affinity/Rerank",
    "/affinity.v1.Affinity/BatchRecommend",
    "/affinity.v1.Affinity/PutEvents",
    "/affinity.v1.Affinity/GetUser",
    "/affinity.v1.Affinity/SetUserOptOut", /* a shopper's own choice, relayed by the shop */
    "/affinity.v1.Affinity/GetItems",
    "/affinity.v1.Affinity/ListCollections",
    "/affinity.v1.Affinity/DescribeCollection",
    "/affinity.v1.Affinity/GetServerInfo",
    "/affinity.v1.Affinity/GetStats", /* measurement: reading outcomes and experiments */
    "/affinity.v1.Affinity/GetExperiment",
    "/affinity.v1.Affinity/ListExperiments",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
};

transport_role transport__auth_method_role(const char *path)
{
    for (size_t i = 0; i < sizeof serving_methods / sizeof serving_methods[0]; i++)
        if (strcmp(path, serving_methods[i]) == 0) return TRANSPORT_ROLE_SERVING;
    return TRANSPORT_ROLE_ADMIN;
}

const ProtobufCMessageDescriptor *transport__auth_stream_desc(const char *path)
{
    if (strcmp(path, "/affinity.v1.Affinity/UpsertItems") == 0)
        return &affinity__v1__upsert_items_request__descriptor;
    if (strcmp(path, "/affinity.v1.Affinity/BatchRecommend") == 0)
        return &affinity__v1__recommend_request__descriptor;
    return NULL;
}

static void key_free(tauth_key *k)
{
    if (k->bearer) {
        memset(k->bearer, 0, strlen(k->bearer));
        free(k->bearer);
    }
    for (size_t i = 0; i < k->n_collections; i++)
        free(k->collections[i]);
    free(k->collections);
    memset(k, 0, sizeof *k);
}

void transport__auth_destroy(tauth *a)
{
    if (!a) return;
    for (size_t i = 0; i < a->n; i++)
        key_free(&a->keys[i]);
    free(a);
}

size_t transport__auth_count(const tauth *a)
{
    return a ? a->n : 0;
}

static int add_key(tauth *a, const char *token, transport_role role, const char *collections,
                   const char *where, aff_err *err)
{
    if (a->n == MAX_KEYS)
        return aff__fail(err, AFF_EINVAL, "%s: more than %d tokens", where, MAX_KEYS);
    tauth_key *k = &a->keys[a->n];
    size_t n = strlen(token) + 8;
    k->bearer = malloc(n);
    if (!k->bearer) return aff__fail(err, AFF_ENOMEM, "out of memory reading tokens");
    snprintf(k->bearer, n, "Bearer %s", token);
    k->role = role;
    a->n++;
    if (!collections || !collections[0]) return 0;
    for (const char *p = collections; *p;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (len == 0 || len > AFF_MAX_NAME_LEN)
            return aff__fail(err, AFF_EINVAL,
                             "%s: collection names are 1..%d bytes, separated by commas", where,
                             AFF_MAX_NAME_LEN);
        char **c2 = realloc(k->collections, (k->n_collections + 1) * sizeof *c2);
        if (!c2) return aff__fail(err, AFF_ENOMEM, "out of memory reading tokens");
        k->collections = c2;
        if (!(c2[k->n_collections] = strndup(p, len)))
            return aff__fail(err, AFF_ENOMEM, "out of memory reading tokens");
        k->n_collections++;
        p += len + (comma ? 1 : 0);
    }
    return 0;
}

static int load_file(tauth *a, const char *path, aff_err *err)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return aff__fail(err, AFF_EINVAL, "--tokens-file: cannot open '%s': %s", path,
                         strerror(errno));
    char line[8192], where[1200];
    int rc = 0;
    for (unsigned no = 1; fgets(line, sizeof line, f); no++) {
        snprintf(where, sizeof where, "--tokens-file %s line %u", path, no);
        char *hash = strchr(line, '#');
        if (hash) *hash = '\0';
        char role[32], token[4096], cols[4096];
        cols[0] = '\0';
        int n = sscanf(line, "%31s %4095s %4095s", role, token, cols);
        if (n <= 0) continue; /* blank or comment */
        transport_role r;
        if (strcmp(role, "admin") == 0) {
            r = TRANSPORT_ROLE_ADMIN;
        } else if (strcmp(role, "serving") == 0) {
            r = TRANSPORT_ROLE_SERVING;
        } else {
            rc = aff__fail(err, AFF_EINVAL,
                           "%s: role '%.31s' is not admin or serving (format: ROLE TOKEN "
                           "[COLLECTION,...])",
                           where, role);
            break;
        }
        if (n < 2 || strlen(token) < 16) {
            rc = aff__fail(err, AFF_EINVAL, "%s: the token is missing or shorter than 16 bytes",
                           where);
            break;
        }
        for (const char *p = token; *p; p++)
            if (!isgraph((unsigned char)*p)) {
                rc = aff__fail(err, AFF_EINVAL, "%s: the token must be printable ASCII", where);
                goto out;
            }
        if ((rc = add_key(a, token, r, n == 3 ? cols : NULL, where, err))) break;
        memset(token, 0, sizeof token);
    }
out:
    memset(line, 0, sizeof line);
    fclose(f);
    if (!rc && a->n == 0) rc = aff__fail(err, AFF_EINVAL, "--tokens-file %s holds no token", path);
    return rc;
}

int transport__auth_create(tauth **out, const char *admin_token, const char *tokens_file,
                           aff_err *err)
{
    *out = NULL;
    bool any = (admin_token && admin_token[0]) || (tokens_file && tokens_file[0]);
    if (!any) return 0;
    tauth *a = calloc(1, sizeof *a);
    if (!a) return aff__fail(err, AFF_ENOMEM, "out of memory reading tokens");
    int rc = 0;
    if (admin_token && admin_token[0])
        rc = add_key(a, admin_token, TRANSPORT_ROLE_ADMIN, NULL, "--token-file", err);
    if (!rc && tokens_file && tokens_file[0]) rc = load_file(a, tokens_file, err);
    if (rc) {
        transport__auth_destroy(a);
        return rc;
    }
    *out = a;
    return 0;
}

/* Compares in time that depends only on the lengths, not on where the bytes differ. */
static bool equal_const_time(const uint8_t *a, size_t na, const uint8_t *b, size_t nb)
{
    uint8_t diff = (uint8_t)(na != nb);
    for (size_t i = 0; i < nb; i++)
        diff |= (uint8_t)(b[i] ^ (i < na ? a[i] : 0));
    return diff == 0;
}

const tauth_key *transport__auth_find(const tauth *a, const grpc_metadata_array *md)
{
    const tauth_key *found = NULL;
    for (size_t i = 0; i < md->count; i++) {
        const grpc_slice *k = &md->metadata[i].key;
        if (GRPC_SLICE_LENGTH(*k) != 13 || memcmp(GRPC_SLICE_START_PTR(*k), "authorization", 13))
            continue;
        const grpc_slice *v = &md->metadata[i].value;
        for (size_t j = 0; j < a->n; j++)
            if (equal_const_time(GRPC_SLICE_START_PTR(*v), GRPC_SLICE_LENGTH(*v),
                                 (const uint8_t *)a->keys[j].bearer, strlen(a->keys[j].bearer)) &&
                !found)
                found = &a->keys[j];
    }
    return found;
}

const tauth_key *transport__auth_find_value(const tauth *a, const char *value)
{
    const tauth_key *found = NULL;
    size_t n = value ? strlen(value) : 0;
    for (size_t j = 0; value && j < a->n; j++)
        if (equal_const_time((const uint8_t *)value, n, (const uint8_t *)a->keys[j].bearer,
                             strlen(a->keys[j].bearer)) &&
            !found)
            found = &a->keys[j];
    return found;
}

bool transport__auth_collection_ok(const tauth_key *k, const char *name)
{
    if (!k->collections) return true;
    if (!name[0]) return false;
    for (size_t i = 0; i < k->n_collections; i++)
        if (strcmp(k->collections[i], name) == 0) return true;
    return false;
}

bool transport__auth_peek_collection(const ProtobufCMessageDescriptor *desc, const uint8_t *msg,
                                     size_t len, char *out, size_t size)
{
    const ProtobufCFieldDescriptor *fd =
        protobuf_c_message_descriptor_get_field_by_name(desc, "collection");
    if (!fd || fd->type != PROTOBUF_C_TYPE_STRING || fd->label == PROTOBUF_C_LABEL_REPEATED)
        return false;
    out[0] = '\0';
    const uint8_t *p = msg, *end = msg + len, *data;
    uint32_t num;
    unsigned wt;
    size_t n;
    while (p < end && transport__wire_next(&p, end, &num, &wt, &data, &n))
        if (num == fd->id && wt == 2) /* the last occurrence wins, as in protobuf */
            snprintf(out, size, "%.*s", (int)(n < size ? n : size - 1), (const char *)data);
    return true;
}

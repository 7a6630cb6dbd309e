/*
 * transport_client.h: a small blocking client for the Affinity gRPC API, on gRPC C core.
 *
 * Used by the tests, the `affinity` CLI and the benchmarks. Messages are protobuf-c messages
 * (the caller includes the generated affinity/v1/affinity.pb-c.h); this header itself needs
 * only <protobuf-c/protobuf-c.h>, so no gRPC type leaks out of it.
 *
 * Method paths are full gRPC paths, e.g. "/affinity.v1.Affinity/Search" or
 * "/grpc.health.v1.Health/Check"; the TRANSPORT_METHOD_* macros below name them all.
 *
 * Status: every call returns 0 when the RPC finished with gRPC status OK, else a negative
 * aff_status mapped from the gRPC status code (AFF_EINVAL for INVALID_ARGUMENT, AFF_ENOTFOUND
 * for NOT_FOUND, ...; AFF_EUNAVAILABLE when the server cannot be reached). The exact gRPC
 * code and the server's message go to the transport_call_status out-parameter (may be NULL).
 *
 * Ownership: a decoded response is owned by the caller and freed with
 * transport_client_free(msg) (protobuf_c_message_free_unpacked with the default allocator).
 *
 * Threading: one transport_client may be used by many threads at once (each call has its own
 * completion queue; the channel is shared). A stream belongs to one thread, except that on a
 * bidirectional stream one thread may send (send/close_send) while another receives (recv).
 * A bearer token given at creation is sent as "authorization: Bearer <token>" on every call.
 */
#ifndef AFFINITY_TRANSPORT_CLIENT_H
#define AFFINITY_TRANSPORT_CLIENT_H

#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "item.h"
#include "status.h"

#define TRANSPORT_METHOD_CREATE_COLLECTION   "/affinity.v1.Affinity/CreateCollection"
#define TRANSPORT_METHOD_DROP_COLLECTION     "/affinity.v1.Affinity/DropCollection"
#define TRANSPORT_METHOD_LIST_COLLECTIONS    "/affinity.v1.Affinity/ListCollections"
#define TRANSPORT_METHOD_DESCRIBE_COLLECTION "/affinity.v1.Affinity/DescribeCollection"
#define TRANSPORT_METHOD_UPSERT_ITEMS        "/affinity.v1.Affinity/UpsertItems"
#define TRANSPORT_METHOD_DELETE_ITEMS        "/affinity.v1.Affinity/DeleteItems"
#define TRANSPORT_METHOD_GET_ITEMS           "/affinity.v1.Affinity/GetItems"
#define TRANSPORT_METHOD_SEARCH              "/affinity.v1.Affinity/Search"
#define TRANSPORT_METHOD_SIMILAR_ITEMS       "/affinity.v1.Affinity/SimilarItems"
#define TRANSPORT_METHOD_RECOMMEND           "/affinity.v1.Affinity/Recommend"
#define TRANSPORT_METHOD_RERANK              "/affinity.v1.Affinity/Rerank"
#define TRANSPORT_METHOD_BATCH_RECOMMEND     "/affinity.v1.Affinity/BatchRecommend"
#define TRANSPORT_METHOD_RECOMMEND_PAGE      "/affinity.v1.Affinity/RecommendPage"
#define TRANSPORT_METHOD_PUT_EVENTS          "/affinity.v1.Affinity/PutEvents"
#define TRANSPORT_METHOD_GET_USER            "/affinity.v1.Affinity/GetUser"
#define TRANSPORT_METHOD_DELETE_USER         "/affinity.v1.Affinity/DeleteUser"
#define TRANSPORT_METHOD_IMPORT_EVENTS       "/affinity.v1.Affinity/ImportEvents"
#define TRANSPORT_METHOD_GET_SERVER_INFO     "/affinity.v1.Affinity/GetServerInfo"
#define TRANSPORT_METHOD_TRAIN               "/affinity.v1.Affinity/Train"
#define TRANSPORT_METHOD_GET_MODEL           "/affinity.v1.Affinity/GetModel"
#define TRANSPORT_METHOD_GET_SEGMENT         "/affinity.v1.Affinity/GetSegment"
#define TRANSPORT_METHOD_GET_STATS           "/affinity.v1.Affinity/GetStats"
#define TRANSPORT_METHOD_CREATE_EXPERIMENT   "/affinity.v1.Affinity/CreateExperiment"
#define TRANSPORT_METHOD_GET_EXPERIMENT      "/affinity.v1.Affinity/GetExperiment"
#define TRANSPORT_METHOD_LIST_EXPERIMENTS    "/affinity.v1.Affinity/ListExperiments"
#define TRANSPORT_METHOD_STOP_EXPERIMENT     "/affinity.v1.Affinity/StopExperiment"
#define TRANSPORT_METHOD_HEALTH_CHECK        "/grpc.health.v1.Health/Check"
#define TRANSPORT_METHOD_HEALTH_WATCH        "/grpc.health.v1.Health/Watch"

/* The wire Item (affinity.v1.Item) for one item's id and attributes, vector left empty: out
 * borrows r's strings, and tag_ptrs (AFF_MAX_TAGS_PER_ITEM entries, the caller's) receives the
 * tag pointers. The one item_record -> Item conversion, for the server's GetItems answers and
 * for clients that send records (`affinity load`). */
struct Affinity__V1__Item;
void transport_item_to_pb(const item_record *r, char **tag_ptrs, struct Affinity__V1__Item *out);

typedef struct transport_client transport_client;
typedef struct transport_client_stream transport_client_stream;

typedef struct transport_client_options {
    const char *target;             /* "host:port", e.g. "127.0.0.1:50051"; required */
    const char *token;              /* bearer token; NULL or "": no authorization header */
    const char *tls_root_cert_file; /* PEM file of the CA (or self-signed cert) to trust;
                                       NULL: plaintext connection */
    const char *tls_server_name;    /* name to verify in the server certificate instead of
                                       the target's host; NULL: the target's host */
    uint32_t timeout_ms;            /* default deadline of each call; 0 = 30,000 ms */
    uint32_t max_message_bytes;     /* largest message sent or received; 0 = 64 MiB */
} transport_client_options;

/* The outcome of one call as the server (or the gRPC library) reported it. */
typedef struct transport_call_status {
    int code;          /* gRPC status code: 0 OK, 3 INVALID_ARGUMENT, 5 NOT_FOUND, ... */
    char message[512]; /* the status message, truncated if longer */
} transport_call_status;

/* Creates a client for opts->target. Connects lazily: an unreachable server shows up on the
 * first call (AFF_EUNAVAILABLE), not here. Errors: AFF_EINVAL (bad options), AFF_EIO (the
 * root certificate file cannot be read). opts is copied. */
int transport_client_create(transport_client **out, const transport_client_options *opts,
                            aff_err *err);
/* Destroys the client; calls still running on other threads must have returned. NULL: no-op. */
void transport_client_destroy(transport_client *c);

/* Frees a message returned by this library. NULL: no-op. */
void transport_client_free(ProtobufCMessage *msg);

/* One unary call: sends req to `method`, waits for the response and decodes it with
 * resp_desc into *resp (caller frees with transport_client_free; NULL on failure).
 * timeout_ms 0 uses the client's default. */
int transport_client_unary(transport_client *c, const char *method, const ProtobufCMessage *req,
                           const ProtobufCMessageDescriptor *resp_desc, uint32_t timeout_ms,
                           ProtobufCMessage **resp, transport_call_status *status);

/* ---- streams (client-streaming UpsertItems, bidirectional BatchRecommend) -------------- */

/* Opens a streaming call to `method` with a deadline of timeout_ms (0: client default) for
 * the whole stream. */
int transport_client_stream_open(transport_client *c, const char *method, uint32_t timeout_ms,
                                 transport_client_stream **out, aff_err *err);
/* Sends one message; blocks until gRPC has taken it (flow control). A failure here usually
 * means the server ended the call: transport_client_stream_finish reports its status. */
int transport_client_stream_send(transport_client_stream *s, const ProtobufCMessage *msg,
                                 aff_err *err);
/* Half-closes the sending side: the server sees the end of the request stream. */
int transport_client_stream_close_send(transport_client_stream *s, aff_err *err);
/* Bidirectional streams: receives the next response into *msg (decoded with desc; caller
 * frees). Returns 1 when a message arrived, 0 at the end of the response stream (then call
 * transport_client_stream_finish for the status), negative on a local error. */
int transport_client_stream_recv(transport_client_stream *s, const ProtobufCMessageDescriptor *desc,
                                 ProtobufCMessage **msg, aff_err *err);
/* Ends the call and reports its status. For client-streaming calls it half-closes (if not
 * done yet) and receives the single response into *resp (resp_desc and resp may be NULL for
 * bidirectional streams whose messages were read with recv). Returns as the unary call does. */
int transport_client_stream_finish(transport_client_stream *s,
                                   const ProtobufCMessageDescriptor *resp_desc,
                                   ProtobufCMessage **resp, transport_call_status *status);
/* Cancels the call if it is still running and frees the stream. NULL: no-op. */
void transport_client_stream_destroy(transport_client_stream *s);

/* Replication: fetches the server's GetSnapshot stream into the file path (created,
 * fsynced; removed on failure); *seq: the log sequence the copy holds. */
int transport_client_fetch_snapshot(transport_client *c, const char *path, uint64_t *seq,
                                    transport_call_status *status, aff_err *err);

/* Maps a gRPC status code to the aff_status the functions above return (0 for OK). */
int transport_client_status_to_aff(int grpc_code);

#endif

/*
 * server_helpers.h: start and stop a real affinityd for end-to-end tests, and small helpers
 * around transport_client.
 *
 * Each server runs in its own temporary directory (port file, log, certificates), listens on
 * 127.0.0.1:0 and writes its bound port with --port-file; the child dies with the test
 * process (PR_SET_PDEATHSIG), so a failed assertion never leaves a server behind.
 */
#ifndef AFFINITY_TESTS_SERVER_HELPERS_H
#define AFFINITY_TESTS_SERVER_HELPERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "affinity/v1/affinity.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "transport_client.h"

/* gRPC status codes, so tests need no gRPC header. */
#define TS_OK                 0
#define TS_CANCELLED          1
#define TS_INVALID_ARGUMENT   3
#define TS_DEADLINE_EXCEEDED  4
#define TS_NOT_FOUND          5
#define TS_ALREADY_EXISTS     6
#define TS_RESOURCE_EXHAUSTED 8
#define TS_UNIMPLEMENTED      12
#define TS_UNAVAILABLE        14
#define TS_UNAUTHENTICATED    16

typedef struct test_server {
    pid_t pid;
    int port;
    char dir[256];
    char target[64];
    char log_path[320];
} test_server;

/* Starts affinityd with args (NULL-terminated, after the ones the helper adds:
 * --listen 127.0.0.1:0 --port-file ... --backend cpu) and waits up to 120 s for the port
 * file. dir may be NULL (a fresh temporary directory) or an existing one. 0 or -1. */
int ts_start(test_server *s, const char *dir, const char *const *args);
/* Polls Health/Check until SERVING (up to 120 s). Uses a plaintext client unless
 * tls_root is given. */
bool ts_wait_serving(test_server *s, const char *tls_root);
/* Starts and waits for SERVING; asserts on failure. */
void ts_start_serving(test_server *s, const char *const *args);
/* Sends sig and waits up to timeout_ms for the exit; returns the exit status (0..255),
 * 128 + signal when killed by one, -1 on timeout (then the server is killed). A clean exit
 * (0) removes the server's directory; otherwise it stays for the log. */
int ts_stop(test_server *s, int sig, int timeout_ms);
/* Deletes the server's temporary directory (ts_stop does so after a clean exit). */
void ts_remove_dir(const test_server *s);
/* Makes a fresh directory /tmp/affinity-e2e-<what>-XXXXXX (e.g. a --data-dir that outlives
 * several servers) into out; asserts on failure. */
void ts_make_dir(char *out, size_t size, const char *what);
/* Writes text into a fresh file /tmp/affinity-e2e-<what>-XXXXXX (e.g. a --serving-config)
 * whose path goes into out; asserts on failure. The caller unlinks it. */
void ts_write_temp_file(char *out, size_t size, const char *what, const char *text);
/* Deletes a directory made by ts_make_dir (or any /tmp/affinity-e2e-* one) with its files. */
void ts_remove_path(const char *dir);
/* Prints the server log to stderr (for failed tests). */
void ts_dump_log(const test_server *s);

/* A client for s (token may be NULL). Asserts on failure. */
transport_client *ts_client(const test_server *s, const char *token);

/* Unary call helper: returns the gRPC status code; *resp set on OK (free with
 * transport_client_free). */
int ts_call(transport_client *c, const char *method, const void *req,
            const ProtobufCMessageDescriptor *resp_desc, uint32_t timeout_ms, void *resp,
            transport_call_status *st);

/* Creates collection name (cosine unless metric given) or asserts. */
void ts_create_collection(transport_client *c, const char *name, uint32_t dim,
                          Affinity__V1__Metric metric);
/* Upserts n items into collection in one UpsertItems stream message, or asserts. */
void ts_upsert_items(transport_client *c, const char *collection, Affinity__V1__Item **items,
                     size_t n);
/* Health/Check status (SERVING = 1, NOT_SERVING = 2) or -code on a failed call. */
int ts_health(transport_client *c);
/* GetServerInfo or asserts; free with transport_client_free. */
Affinity__V1__ServerInfo *ts_server_info(transport_client *c);

/* Deterministic PRNG for test data. */
uint64_t ts_rand(uint64_t *state);
float ts_randf(uint64_t *state); /* uniform in [-1, 1) */
/* Milliseconds on a monotonic clock. */
int64_t ts_now_ms(void);

#endif

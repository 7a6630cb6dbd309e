/*
 * server_helpers.c: owns starting, probing and stopping affinityd child processes for the
 * end-to-end suites.
 */
#include "server_helpers.h"

#include <criterion/criterion.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int64_t ts_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

uint64_t ts_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

float ts_randf(uint64_t *s)
{
    return (float)((double)(ts_rand(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

int ts_start(test_server *s, const char *dir, const char *const *args)
{
    memset(s, 0, sizeof s[0]);
    if (dir) {
        snprintf(s->dir, sizeof s->dir, "%s", dir);
    } else {
        snprintf(s->dir, sizeof s->dir, "/tmp/affinity-e2e-XXXXXX");
        if (!mkdtemp(s->dir)) return -1;
    }
    char port_file[320];
    snprintf(port_file, sizeof port_file, "%s/port", s->dir);
    snprintf(s->log_path, sizeof s->log_path, "%s/affinityd.log", s->dir);
    unlink(port_file);

    const char *argv[64];
    int n = 0;
    const char *binary = getenv("AFFINITYD"); /* another build, for measurements */
    argv[n++] = binary && *binary ? binary : AFF_BINARY_DIR "/src/affinityd";
    argv[n++] = "--listen";
    argv[n++] = "127.0.0.1:0";
    argv[n++] = "--port-file";
    argv[n++] = port_file;
    argv[n++] = "--backend";
    argv[n++] = "cpu";
    for (int i = 0; args && args[i] && n < 62; i++)
        argv[n++] = args[i];
    argv[n] = NULL;

    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        int fd = open(s->log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    s->pid = pid;
    int64_t until = ts_now_ms() + 120000;
    while (ts_now_ms() < until) {
        FILE *f = fopen(port_file, "r");
        if (f) {
            int port = 0;
            int ok = fscanf(f, "%d", &port);
            fclose(f);
            if (ok == 1 && port > 0) {
                s->port = port;
                snprintf(s->target, sizeof s->target, "127.0.0.1:%d", port);
                return 0;
            }
        }
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            s->pid = 0;
            return -1;
        }
        sleep_ms(20);
    }
    return -1;
}

transport_client *ts_client(const test_server *s, const char *token)
{
    transport_client *c = NULL;
    transport_client_options o = {.target = s->target, .token = token, .timeout_ms = 60000};
    aff_err err;
    cr_assert_eq(transport_client_create(&c, &o, &err), 0, "client: %s", err.msg);
    return c;
}

int ts_call(transport_client *c, const char *method, const void *req,
            const ProtobufCMessageDescriptor *resp_desc, uint32_t timeout_ms, void *resp,
            transport_call_status *st)
{
    transport_call_status local;
    if (!st) st = &local;
    ProtobufCMessage *out = NULL;
    transport_client_unary(c, method, req, resp_desc, timeout_ms, &out, st);
    if (resp)
        *(ProtobufCMessage **)resp = out;
    else
        transport_client_free(out);
    return st->code;
}

int ts_health(transport_client *c)
{
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    Grpc__Health__V1__HealthCheckResponse *resp = NULL;
    transport_call_status st;
    int code = ts_call(c, TRANSPORT_METHOD_HEALTH_CHECK, &req,
                       &grpc__health__v1__health_check_response__descriptor, 5000, &resp, &st);
    if (code != 0) return -code;
    int status = (int)resp->status;
    transport_client_free(&resp->base);
    return status;
}

bool ts_wait_serving(test_server *s, const char *tls_root)
{
    transport_client *c = NULL;
    transport_client_options o = {.target = s->target,
                                  .timeout_ms = 5000,
                                  .tls_root_cert_file = tls_root,
                                  .tls_server_name = tls_root ? "localhost" : NULL};
    aff_err err;
    if (transport_client_create(&c, &o, &err)) return false;
    bool ok = false;
    int64_t until = ts_now_ms() + 120000;
    while (!ok && ts_now_ms() < until) {
        ok = ts_health(c) == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
        if (!ok) sleep_ms(20);
    }
    transport_client_destroy(c);
    return ok;
}

void ts_dump_log(const test_server *s)
{
    FILE *f = fopen(s->log_path, "r");
    if (!f) return;
    char line[1024];
    fprintf(stderr, "---- %s ----\n", s->log_path);
    while (fgets(line, sizeof line, f))
        fputs(line, stderr);
    fclose(f);
}

void ts_start_serving(test_server *s, const char *const *args)
{
    if (ts_start(s, NULL, args) != 0) {
        ts_dump_log(s);
        cr_assert_fail("affinityd did not start");
    }
    if (!ts_wait_serving(s, NULL)) {
        ts_dump_log(s);
        cr_assert_fail("affinityd never reported SERVING");
    }
}

/* Removes the server's files (kept when a test fails, for its log). */
static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path);
}

void ts_remove_path(const char *dir)
{
    if (strncmp(dir, "/tmp/affinity-e2e-", 18) == 0)
        nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
}

void ts_remove_dir(const test_server *s)
{
    ts_remove_path(s->dir);
}

void ts_make_dir(char *out, size_t size, const char *what)
{
    int n = snprintf(out, size, "/tmp/affinity-e2e-%s-XXXXXX", what);
    cr_assert(n > 0 && (size_t)n < size && mkdtemp(out), "cannot make a directory for %s", what);
}

void ts_write_temp_file(char *out, size_t size, const char *what, const char *text)
{
    int n = snprintf(out, size, "/tmp/affinity-e2e-%s-XXXXXX", what);
    cr_assert(n > 0 && (size_t)n < size, "path too long for %s", what);
    int fd = mkstemp(out);
    cr_assert_geq(fd, 0, "cannot make a file for %s", what);
    size_t len = strlen(text);
    cr_assert_eq(write(fd, text, len), (ssize_t)len, "cannot write %s", out);
    close(fd);
}

int ts_stop(test_server *s, int sig, int timeout_ms)
{
    if (s->pid <= 0) return -1;
    kill(s->pid, sig);
    int64_t until = ts_now_ms() + timeout_ms;
    int status = 0;
    for (;;) {
        pid_t r = waitpid(s->pid, &status, WNOHANG);
        if (r == s->pid) break;
        if (ts_now_ms() > until) {
            kill(s->pid, SIGKILL);
            waitpid(s->pid, &status, 0);
            s->pid = 0;
            return -1;
        }
        sleep_ms(10);
    }
    s->pid = 0;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code == 0) ts_remove_dir(s);
    return code;
}

void ts_create_collection(transport_client *c, const char *name, uint32_t dim,
                          Affinity__V1__Metric metric)
{
    Affinity__V1__CreateCollectionRequest req = AFFINITY__V1__CREATE_COLLECTION_REQUEST__INIT;
    req.name = (char *)name;
    req.dimension = dim;
    req.metric = metric;
    transport_call_status st;
    int code = ts_call(c, TRANSPORT_METHOD_CREATE_COLLECTION, &req,
                       &affinity__v1__create_collection_response__descriptor, 0, NULL, &st);
    cr_assert_eq(code, 0, "CreateCollection %s: %d %s", name, code, st.message);
}

void ts_upsert_items(transport_client *c, const char *collection, Affinity__V1__Item **items,
                     size_t n)
{
    transport_client_stream *s = NULL;
    aff_err err;
    cr_assert_eq(transport_client_stream_open(c, TRANSPORT_METHOD_UPSERT_ITEMS, 0, &s, &err), 0,
                 "%s", err.msg);
    Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    req.collection = (char *)collection;
    req.n_items = n;
    req.items = items;
    cr_assert_eq(transport_client_stream_send(s, &req.base, &err), 0, "%s", err.msg);
    transport_call_status st;
    Affinity__V1__UpsertItemsResponse *resp = NULL;
    transport_client_stream_finish(s, &affinity__v1__upsert_items_response__descriptor,
                                   (ProtobufCMessage **)&resp, &st);
    cr_assert_eq(st.code, 0, "UpsertItems %s: %s", collection, st.message);
    transport_client_free(&resp->base);
    transport_client_stream_destroy(s);
}

Affinity__V1__ServerInfo *ts_server_info(transport_client *c)
{
    Affinity__V1__GetServerInfoRequest req = AFFINITY__V1__GET_SERVER_INFO_REQUEST__INIT;
    Affinity__V1__ServerInfo *info = NULL;
    transport_call_status st;
    int code = ts_call(c, TRANSPORT_METHOD_GET_SERVER_INFO, &req,
                       &affinity__v1__server_info__descriptor, 0, &info, &st);
    cr_assert_eq(code, 0, "GetServerInfo: %d %s", code, st.message);
    return info;
}

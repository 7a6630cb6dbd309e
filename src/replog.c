/*
 * replog.c: the replicated write log on NATS JetStream (cnats). Owns one connection, the
 * stream's creation, publishing with deduplication, and the apply thread (an ordered
 * consumer read in sequence order). See replog.h for the contract and docs/replication.md
 * for the guarantees.
 *
 * Failure rules kept here: the connection retries forever (MaxReconnect -1, also when the
 * first connect finds no server); publish waits at most its caller's time and reports
 * AFF_EUNAVAILABLE; the apply thread recreates its consumer from the last applied sequence
 * after any error or a stall, and never exits before replog_destroy.
 */
#include "replog.h"

#include <errno.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

#define REPLOG_MAX_SERVERS  16
#define REPLOG_POLL_MS      200  /* the apply thread's longest sleep between checks */
#define REPLOG_STALL_MS     3000 /* behind the stream with nothing arriving: resubscribe */
#define REPLOG_RETRY_MS     250
#define REPLOG_BATCH        256  /* records applied before they are reported applied */
#define REPLOG_BATCH_MS     4    /* and at most this long after the batch's first record */
#define REPLOG_REPORT_MS    5000 /* while unconnected: how often the reason is logged */
#define REPLOG_ERASE_WAIT_MS 5000 /* erasure scan: longest wait for the next record */
#define REPLOG_RETIRED_KEPT 4    /* replaced connections kept before they are destroyed */

struct aff_replog {
    replog_config cfg; /* strings below are owned copies */
    char *urls, *servers, *stream, *creds, *user, *password, *token, *ca, *cert, *key;
    char subjects[160];
    natsOptions *opts;
    const char *server_list[REPLOG_MAX_SERVERS]; /* point into urls */
    int n_servers;
    /* The connection and its JetStream context. Replaced (by the apply thread) when the
     * library closed the connection for good (it does after repeated authorization
     * errors): atomic, and the replaced ones are kept until replog_destroy (`retired`), so
     * a publisher that loaded the old pointer still holds a valid, closed connection. */
    natsConnection *_Atomic nc;
    jsCtx *_Atomic js;
    struct retired_conn {
        struct retired_conn *next;
        natsConnection *nc;
        jsCtx *js;
    } *retired;
    pthread_t thread;
    bool thread_started;
    atomic_bool stop;
    atomic_bool stream_ready;
    atomic_bool needs_bootstrap;
    atomic_bool halted; /* a batch could not be committed: nothing more is applied */
    char marker_subject[160]; /* "<stream>.t": truncation markers */
    _Atomic uint64_t applied;
    _Atomic uint64_t last_known;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* broadcast on each applied record */
};

static _Thread_local int64_t tls_record_time_ms;

int64_t replog_now_ms(void *ctx)
{
    (void)ctx;
    if (tls_record_time_ms) return tls_record_time_ms;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void replog_set_record_time(int64_t time_ms)
{
    tls_record_time_ms = time_ms;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static char *dup_or_null(const char *s)
{
    return s && s[0] ? strdup(s) : NULL;
}

static void raise_last_known(aff_replog *log, uint64_t seq)
{
    uint64_t cur = atomic_load(&log->last_known);
    while (seq > cur && !atomic_compare_exchange_weak(&log->last_known, &cur, seq)) {
    }
}

/* Creates the stream when it does not exist; true when it exists now. */
static bool ensure_stream(aff_replog *log)
{
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus s = js_GetStreamInfo(&si, log->js, log->stream, NULL, &jerr);
    if (s == NATS_OK) {
        raise_last_known(log, si->State.LastSeq);
        jsStreamInfo_Destroy(si);
        return true;
    }
    if (s != NATS_NOT_FOUND && jerr != JSStreamNotFoundErr) return false;
    jsStreamConfig sc;
    jsStreamConfig_Init(&sc);
    const char *subjects[1] = {log->subjects};
    sc.Name = log->stream;
    sc.Subjects = subjects;
    sc.SubjectsLen = 1;
    sc.Storage = js_FileStorage;
    sc.Replicas = log->cfg.replicas;
    sc.Duplicates = (int64_t)log->cfg.dedup_window_s * 1000000000LL;
    s = js_AddStream(&si, log->js, &sc, NULL, &jerr);
    if (s == NATS_OK) {
        aff_log_kv(AFF_LOG_INFO, "write log stream created", "stream", log->stream, NULL);
        jsStreamInfo_Destroy(si);
        return true;
    }
    aff_log_kv(AFF_LOG_WARN, "cannot create the write log stream", "stream", log->stream,
               "error", natsStatus_GetText(s), NULL);
    return false;
}

static natsSubscription *subscribe(aff_replog *log)
{
    natsSubscription *sub = NULL;
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = log->stream;
    so.Ordered = true;
    /* Idle heartbeats every second: after a stream-leader change the library notices a stalled
     * ordered consumer within a few seconds and recreates it (its default is 5 s). */
    so.Config.Heartbeat = 1000000000LL;
    uint64_t from = atomic_load(&log->applied) + 1;
    so.Config.DeliverPolicy = js_DeliverByStartSequence;
    so.Config.OptStartSeq = from;
    jsErrCode jerr = 0;
    natsStatus s = js_SubscribeSync(&sub, log->js, log->subjects, NULL, &so, &jerr);
    if (s != NATS_OK) {
        aff_log_kv(AFF_LOG_WARN, "write log: cannot subscribe; retrying", "error",
                   natsStatus_GetText(s), NULL);
        return NULL;
    }
    return sub;
}

/* Commits the batch (cfg.commit) and publishes its last sequence as applied. No fsync here:
 * the records are durable in the stream, their writes and sequence are committed together in
 * the store (the OS holds them when the process dies), and a store a machine crash may have
 * torn is refused at start (docs/replication.md, "Local durability"). When the commit fails
 * nothing more is applied (log->halted) and health reports NOT_SERVING. */
static void finish_batch(aff_replog *log, uint64_t *last, uint32_t *n)
{
    *n = 0;
    if (log->cfg.commit && log->cfg.commit(log->cfg.commit_ctx) != 0) {
        aff_log(AFF_LOG_ERROR, "write log: applied records could not be committed to the store; "
                               "this replica stops applying (restart it: it resumes from its "
                               "last committed record)");
        atomic_store(&log->halted, true);
        atomic_store(&log->needs_bootstrap, true);
        return;
    }
    pthread_mutex_lock(&log->mu);
    atomic_store(&log->applied, *last);
    pthread_cond_broadcast(&log->cv);
    pthread_mutex_unlock(&log->mu);
    raise_last_known(log, *last);
}

/* Whether the stream was truncated past `next` (the first sequence not applied here): the
 * last truncation marker says below which sequence records were removed. */
static bool truncated_past(aff_replog *log, uint64_t next)
{
    natsMsg *m = NULL;
    if (js_GetLastMsg(&m, log->js, log->stream, log->marker_subject, NULL, NULL) != NATS_OK)
        return false;
    char buf[32] = "";
    int n = natsMsg_GetDataLength(m);
    if (n > 0 && n < (int)sizeof buf) memcpy(buf, natsMsg_GetData(m), (size_t)n);
    natsMsg_Destroy(m);
    return strtoull(buf, NULL, 10) > next;
}

static int make_options(aff_replog *log, bool background_retry, natsOptions **out, aff_err *err);

/* Opens a new connection (retrying in the background like the first) in place of one the
 * library closed for good; the old one is retired, not destroyed at once (see `nc`). Called
 * only when a probe connection just worked, so a wrong credential does not churn
 * connections. Apply thread only, with no subscription open on the old connection. */
static void replace_connection(aff_replog *log)
{
    struct retired_conn *r = malloc(sizeof *r);
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    natsStatus s = natsConnection_Connect(&nc, log->opts);
    if (!r || (s != NATS_OK && s != NATS_NOT_YET_CONNECTED) ||
        natsConnection_JetStream(&js, nc, NULL) != NATS_OK) {
        natsConnection_Destroy(nc);
        free(r);
        return; /* tried again at the next report */
    }
    r->nc = log->nc;
    r->js = log->js;
    r->next = log->retired;
    log->retired = r;
    /* Keep the last REPLOG_RETIRED_KEPT: an older one was replaced at least that many
     * report intervals ago, and every call on a closed connection returns at once. */
    int kept = 1;
    for (struct retired_conn *p = r; p->next; p = p->next, kept++) {
        if (kept < REPLOG_RETIRED_KEPT) continue;
        struct retired_conn *old = p->next;
        p->next = NULL;
        for (struct retired_conn *next; old; old = next) {
            next = old->next;
            jsCtx_Destroy(old->js);
            natsConnection_Destroy(old->nc);
            free(old);
        }
        break;
    }
    log->js = js;
    log->nc = nc;
    atomic_store(&log->stream_ready, false);
}

/* Logs, at most every REPLOG_REPORT_MS while the connection is down, why it is: the library
 * retrying in the background keeps only "no server available", so one connection attempt
 * with the same options and no retry is made here to learn the reason ("Authorization
 * Violation", a TLS handshake or certificate failure, a refused connection...). A wrong
 * credential or certificate so shows in the log while the connection keeps retrying. Apply
 * thread only. */
static void report_unconnected(aff_replog *log, int64_t *last_report)
{
    if (natsConnection_Status(log->nc) == NATS_CONN_STATUS_CONNECTED) return;
    int64_t now = mono_ms();
    if (*last_report && now - *last_report < REPLOG_REPORT_MS) return;
    *last_report = now;
    char why[512] = "unknown";
    bool probe_ok = false;
    natsOptions *o = NULL;
    natsConnection *probe = NULL;
    aff_err err;
    if (make_options(log, false, &o, &err) == AFF_OK) {
        natsStatus s = natsConnection_Connect(&probe, o);
        if (s == NATS_OK) {
            probe_ok = true;
            snprintf(why, sizeof why, "none: the servers take a new connection now");
        } else {
            const char *text = nats_GetLastError(NULL);
            snprintf(why, sizeof why, "%s%s%s", natsStatus_GetText(s), text && text[0] ? ": " : "",
                     text ? text : "");
        }
    }
    natsConnection_Destroy(probe);
    natsOptions_Destroy(o);
    aff_log_kv(AFF_LOG_WARN, "write log: cannot connect to NATS; retrying", "servers",
               log->servers, "reason", why, NULL);
    if (probe_ok && natsConnection_Status(log->nc) == NATS_CONN_STATUS_CLOSED) {
        aff_log(AFF_LOG_WARN, "write log: the NATS library gave up its connection (it does "
                              "after authorization errors); opening a new one");
        replace_connection(log);
    }
}

/* Gives the calling (apply) thread niceness `nice`; best effort (see replog_config). */
static void set_apply_nice(int nice)
{
    if (!nice) return;
    errno = 0;
    int now = getpriority(PRIO_PROCESS, 0);
    if (errno) now = 0;
    if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice) != 0) {
        char want[16], have[16];
        snprintf(want, sizeof want, "%d", nice);
        snprintf(have, sizeof have, "%d", now);
        aff_log_kv(AFF_LOG_WARN,
                   "write log: cannot change the apply thread's niceness (needs CAP_SYS_NICE "
                   "to raise it); it runs at the process's",
                   "wanted", want, "niceness", have, "error", strerror(errno), NULL);
    }
}

static void *apply_thread(void *arg)
{
    aff_replog *log = arg;
    /* Named for operators (top -H); threads it starts (the NATS library starts its timer
     * thread on first use) inherit the name and the niceness. */
    pthread_setname_np(pthread_self(), "log-apply");
    set_apply_nice(log->cfg.apply_nice);
    natsSubscription *sub = NULL;
    int64_t last_progress = mono_ms();
    uint64_t batch_last = 0; /* applied, not yet committed */
    uint32_t batch_n = 0;
    int64_t batch_start = 0; /* when the batch's first record was taken */
    int64_t last_report = 0;
    while (!atomic_load(&log->stop)) {
        if (atomic_load(&log->halted)) {
            natsSubscription_Destroy(sub);
            sub = NULL;
            sleep_ms(REPLOG_POLL_MS);
            continue;
        }
        if (!atomic_load(&log->stream_ready)) {
            if (natsConnection_Status(log->nc) != NATS_CONN_STATUS_CONNECTED ||
                !ensure_stream(log)) {
                report_unconnected(log, &last_report);
                sleep_ms(REPLOG_RETRY_MS);
                continue;
            }
            atomic_store(&log->stream_ready, true);
        }
        if (!sub) {
            if (natsConnection_Status(log->nc) != NATS_CONN_STATUS_CONNECTED ||
                !(sub = subscribe(log))) {
                report_unconnected(log, &last_report);
                sleep_ms(REPLOG_RETRY_MS);
                continue;
            }
            last_progress = mono_ms();
        }
        natsMsg *msg = NULL;
        natsStatus s = natsSubscription_NextMsg(&msg, sub, REPLOG_POLL_MS);
        if (s != NATS_OK && batch_n) finish_batch(log, &batch_last, &batch_n);
        if (s == NATS_TIMEOUT) {
            /* Behind the stream with nothing arriving: the consumer may have been lost with
             * a server; start a new one from the last applied sequence. */
            if (atomic_load(&log->last_known) > atomic_load(&log->applied) &&
                mono_ms() - last_progress > REPLOG_STALL_MS) {
                aff_log(AFF_LOG_WARN, "write log: no progress while behind; resubscribing");
                natsSubscription_Destroy(sub);
                sub = NULL;
            }
            continue;
        }
        if (s != NATS_OK) {
            aff_log_kv(AFF_LOG_WARN, "write log: consumer failed; resubscribing", "error",
                       natsStatus_GetText(s), NULL);
            natsSubscription_Destroy(sub);
            sub = NULL;
            sleep_ms(REPLOG_RETRY_MS);
            continue;
        }
        jsMsgMetaData *meta = NULL;
        if (natsMsg_GetMetaData(&meta, msg) != NATS_OK) {
            natsMsg_Destroy(msg);
            continue; /* not a stream message (flow control is handled by the library) */
        }
        uint64_t seq = meta->Sequence.Stream;
        jsMsgMetaData_Destroy(meta);
        if (!batch_n) batch_start = mono_ms();
        uint64_t expected = (batch_last > atomic_load(&log->applied) ? batch_last
                                                                     : atomic_load(&log->applied)) +
                            1;
        if (seq > expected && truncated_past(log, expected)) {
            natsMsg_Destroy(msg);
            if (batch_n) finish_batch(log, &batch_last, &batch_n);
            natsSubscription_Destroy(sub);
            sub = NULL;
            char a[24];
            snprintf(a, sizeof a, "%llu", (unsigned long long)(expected - 1));
            aff_log_kv(AFF_LOG_ERROR,
                       "write log: records this replica had not applied were truncated; "
                       "restart it with --bootstrap-from a peer",
                       "applied", a, NULL);
            atomic_store(&log->needs_bootstrap, true);
            while (!atomic_load(&log->stop))
                sleep_ms(REPLOG_POLL_MS);
            break;
        }
        const char *subj = natsMsg_GetSubject(msg);
        if (subj && strcmp(subj, log->marker_subject) == 0) {
            /* a truncation marker: no record to apply, but it takes a sequence */
            batch_last = seq > batch_last ? seq : batch_last;
            batch_n++;
        } else if (seq > batch_last && seq > atomic_load(&log->applied)) {
            log->cfg.apply(log->cfg.apply_ctx, seq, (const uint8_t *)natsMsg_GetData(msg),
                           (size_t)natsMsg_GetDataLength(msg));
            replog_set_record_time(0);
            batch_last = seq;
            batch_n++;
            last_progress = mono_ms();
        }
        natsMsg_Destroy(msg);
        int pending = 0;
        if (batch_n < REPLOG_BATCH && mono_ms() - batch_start < REPLOG_BATCH_MS &&
            natsSubscription_GetPending(sub, &pending, NULL) == NATS_OK && pending > 0)
            continue; /* more records waiting: one commit for all of them, within REPLOG_BATCH_MS */
        if (batch_n) finish_batch(log, &batch_last, &batch_n);
    }
    if (batch_n) finish_batch(log, &batch_last, &batch_n);
    natsSubscription_Destroy(sub);
    return NULL;
}

static void on_disconnected(natsConnection *nc, void *closure)
{
    (void)nc, (void)closure;
    aff_log(AFF_LOG_WARN, "write log: disconnected from NATS; reconnecting");
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    (void)nc, (void)closure;
    aff_log(AFF_LOG_INFO, "write log: reconnected to NATS");
}

static int nats_fail(aff_err *err, natsStatus s, const char *what)
{
    return aff__fail(err, AFF_EINVAL, "--log: %s: %s", what, natsStatus_GetText(s));
}

/* The connection's options: servers, credentials, TLS. background_retry: the library keeps
 * trying forever (the replica's connection); false: one attempt (report_unconnected). */
static int make_options(aff_replog *log, bool background_retry, natsOptions **out, aff_err *err)
{
    natsStatus s;
    int status = AFF_OK;
    natsOptions *o = NULL;
    if ((s = natsOptions_Create(&o)) != NATS_OK ||
        (s = natsOptions_SetServers(o, log->server_list, log->n_servers)) != NATS_OK) {
        status = nats_fail(err, s, "server list");
        goto out;
    }
    natsOptions_SetName(o, "affinityd");
    natsOptions_SetTimeout(o, 2000);
    if (background_retry) {
        natsOptions_SetMaxReconnect(o, -1);
        natsOptions_SetReconnectWait(o, REPLOG_RETRY_MS);
        natsOptions_SetPingInterval(o, 1000);
        natsOptions_SetMaxPingsOut(o, 2);
        /* With a callback the first connect does not block: the start goes on and the
         * library keeps trying in the background (without one it would wait here forever). */
        natsOptions_SetRetryOnFailedConnect(o, true, on_reconnected, log);
        natsOptions_SetDisconnectedCB(o, on_disconnected, log);
        natsOptions_SetReconnectedCB(o, on_reconnected, log);
    } else {
        natsOptions_SetAllowReconnect(o, false);
    }
    if (log->creds &&
        (s = natsOptions_SetUserCredentialsFromFiles(o, log->creds, NULL)) != NATS_OK) {
        status = nats_fail(err, s, "--log-creds");
        goto out;
    }
    if (log->user && (s = natsOptions_SetUserInfo(o, log->user, log->password)) != NATS_OK) {
        status = nats_fail(err, s, "--log-user");
        goto out;
    }
    if (log->token && (s = natsOptions_SetToken(o, log->token)) != NATS_OK) {
        status = nats_fail(err, s, "--log-token-file");
        goto out;
    }
    if (log->ca) {
        if ((s = natsOptions_SetSecure(o, true)) != NATS_OK ||
            (s = natsOptions_LoadCATrustedCertificates(o, log->ca)) != NATS_OK) {
            status = nats_fail(err, s, "--log-tls-ca");
            goto out;
        }
    }
    if (log->cert && (s = natsOptions_LoadCertificatesChain(o, log->cert, log->key)) != NATS_OK) {
        status = nats_fail(err, s, "--log-tls-cert/--log-tls-key");
        goto out;
    }
out:
    if (status) {
        natsOptions_Destroy(o);
        o = NULL;
    }
    *out = o;
    return status;
}

int replog_create(aff_replog **out, const replog_config *cfg, aff_err *err)
{
    int status = AFF_OK;
    natsStatus s;
    aff_replog *log = calloc(1, sizeof *log);
    if (!log) return aff__fail(err, AFF_ENOMEM, "out of memory creating the write log");
    log->cfg = *cfg;
    if (!log->cfg.dedup_window_s) log->cfg.dedup_window_s = 120;
    if (log->cfg.replicas < 1) log->cfg.replicas = 1;
    pthread_mutex_init(&log->mu, NULL);
    pthread_cond_init(&log->cv, NULL);
    atomic_store(&log->applied, cfg->start_sequence);
    atomic_store(&log->last_known, cfg->start_sequence);
    log->urls = strdup(cfg->urls);
    log->servers = strdup(cfg->urls); /* log->urls is cut into tokens */
    log->stream = strdup(cfg->stream);
    log->creds = dup_or_null(cfg->creds_file);
    log->user = dup_or_null(cfg->user);
    log->password = dup_or_null(cfg->password);
    log->token = dup_or_null(cfg->token);
    log->ca = dup_or_null(cfg->tls_ca_file);
    log->cert = dup_or_null(cfg->tls_cert_file);
    log->key = dup_or_null(cfg->tls_key_file);
    if (!log->urls || !log->servers || !log->stream) {
        status = aff__fail(err, AFF_ENOMEM, "out of memory creating the write log");
        goto fail;
    }
    snprintf(log->subjects, sizeof log->subjects, "%s.>", log->stream);
    snprintf(log->marker_subject, sizeof log->marker_subject, "%s.t", log->stream);

    const char *servers[REPLOG_MAX_SERVERS];
    int n_servers = 0;
    for (char *save = NULL, *tok = strtok_r(log->urls, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (n_servers == REPLOG_MAX_SERVERS) {
            status = aff__fail(err, AFF_EINVAL, "--log: at most %d server URLs",
                               REPLOG_MAX_SERVERS);
            goto fail;
        }
        servers[n_servers++] = tok;
    }
    if (!n_servers) {
        status = aff__fail(err, AFF_EINVAL, "--log: no server URL");
        goto fail;
    }
    memcpy(log->server_list, servers, sizeof servers);
    log->n_servers = n_servers;
    if ((status = make_options(log, true, &log->opts, err))) goto fail;
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    s = natsConnection_Connect(&nc, log->opts);
    log->nc = nc;
    if (s == NATS_NOT_YET_CONNECTED) {
        /* the apply thread logs why (report_unconnected) and the library keeps trying */
    } else if (s != NATS_OK) {
        status = nats_fail(err, s, "connect");
        goto fail;
    }
    s = natsConnection_JetStream(&js, nc, NULL);
    log->js = js;
    if (s != NATS_OK) {
        status = nats_fail(err, s, "JetStream context");
        goto fail;
    }
    if (pthread_create(&log->thread, NULL, apply_thread, log) != 0) {
        status = aff__fail(err, AFF_ENOMEM, "cannot start the write log's apply thread");
        goto fail;
    }
    log->thread_started = true;
    *out = log;
    return AFF_OK;
fail:
    replog_destroy(log);
    return status;
}

void replog_stop(aff_replog *log)
{
    if (!log) return;
    atomic_store(&log->stop, true);
    if (log->thread_started) pthread_join(log->thread, NULL);
    log->thread_started = false;
    pthread_mutex_lock(&log->mu);
    pthread_cond_broadcast(&log->cv); /* waiters see stop and return */
    pthread_mutex_unlock(&log->mu);
}

void replog_destroy(aff_replog *log)
{
    if (!log) return;
    replog_stop(log);
    jsCtx_Destroy(log->js);
    natsConnection_Destroy(log->nc);
    for (struct retired_conn *r = log->retired, *next; r; r = next) {
        next = r->next;
        jsCtx_Destroy(r->js);
        natsConnection_Destroy(r->nc);
        free(r);
    }
    natsOptions_Destroy(log->opts);
    pthread_mutex_destroy(&log->mu);
    pthread_cond_destroy(&log->cv);
    free(log->urls);
    free(log->servers);
    free(log->stream);
    free(log->creds);
    free(log->user);
    free(log->password);
    free(log->token);
    free(log->ca);
    free(log->cert);
    free(log->key);
    free(log);
    nats_Close();
}

int replog_publish(aff_replog *log, const char *subject_suffix, const void *data, size_t len,
                   const char *msg_id, int64_t timeout_ms, uint64_t *seq, aff_err *err)
{
    char subject[256];
    snprintf(subject, sizeof subject, "%s.%s", log->stream, subject_suffix);
    if (timeout_ms < 1) timeout_ms = 1;
    if (natsConnection_Status(log->nc) != NATS_CONN_STATUS_CONNECTED)
        return aff__fail(err, AFF_EUNAVAILABLE,
                         "the write log is unreachable (reconnecting to NATS); nothing was "
                         "written, retry");
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = timeout_ms;
    po.MsgId = msg_id && msg_id[0] ? msg_id : NULL;
    jsPubAck *pa = NULL;
    jsErrCode jerr = 0;
    natsStatus s = js_Publish(&pa, log->js, subject, data, (int)len, &po, &jerr);
    if (s != NATS_OK) {
        jsPubAck_Destroy(pa);
        return aff__fail(err, AFF_EUNAVAILABLE,
                         "the write log did not commit the write within %lld ms (%s%s); it "
                         "was not acknowledged, retry with the same request_id",
                         (long long)timeout_ms, natsStatus_GetText(s),
                         jerr ? ", stream unavailable" : "");
    }
    *seq = pa->Sequence;
    raise_last_known(log, pa->Sequence);
    jsPubAck_Destroy(pa);
    return AFF_OK;
}

int replog_truncate(aff_replog *log, uint64_t below, aff_err *err)
{
    char text[32];
    int n = snprintf(text, sizeof text, "%llu", (unsigned long long)below);
    uint64_t seq;
    int rc = replog_publish(log, "t", text, (size_t)n, NULL, 5000, &seq, err);
    if (rc) return rc;
    uint64_t erased = 0;
    rc = replog_erase_records(log, REPLOG_SUBJECT_ERASED, below, NULL, NULL, &erased, err);
    if (rc) return rc;
    jsOptions o;
    jsOptions_Init(&o);
    o.Wait = 5000;
    o.Stream.Purge.Sequence = below;
    jsErrCode jerr = 0;
    natsStatus s = js_PurgeStream(log->js, log->stream, &o, &jerr);
    if (s != NATS_OK)
        return aff__fail(err, AFF_EUNAVAILABLE, "the write log could not be truncated: %s",
                         natsStatus_GetText(s));
    return AFF_OK;
}

bool replog_needs_bootstrap(const aff_replog *log)
{
    return atomic_load(&((aff_replog *)log)->needs_bootstrap);
}

bool replog_stream_ready(const aff_replog *log)
{
    return atomic_load(&((aff_replog *)log)->stream_ready);
}

uint64_t replog_applied(const aff_replog *log)
{
    return atomic_load(&((aff_replog *)log)->applied);
}

uint64_t replog_last_known(const aff_replog *log)
{
    return atomic_load(&((aff_replog *)log)->last_known);
}

bool replog_wait_applied(aff_replog *log, uint64_t seq, int64_t timeout_ms)
{
    if (atomic_load(&log->applied) >= seq) return true;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (timeout_ms % 1000) * 1000000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&log->mu);
    while (atomic_load(&log->applied) < seq && !atomic_load(&log->stop))
        if (pthread_cond_timedwait(&log->cv, &log->mu, &until) == ETIMEDOUT) break;
    bool ok = atomic_load(&log->applied) >= seq;
    pthread_mutex_unlock(&log->mu);
    return ok;
}

int replog_stream_last(aff_replog *log, int64_t timeout_ms, uint64_t *out, aff_err *err)
{
    jsOptions o;
    jsOptions_Init(&o);
    o.Wait = timeout_ms;
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    if (natsConnection_Status(log->nc) != NATS_CONN_STATUS_CONNECTED)
        return aff__fail(err, AFF_EUNAVAILABLE, "the write log is unreachable");
    natsStatus s = js_GetStreamInfo(&si, log->js, log->stream, &o, &jerr);
    if (s == NATS_NOT_FOUND || jerr == JSStreamNotFoundErr) {
        *out = 0;
        return AFF_OK;
    }
    if (s != NATS_OK)
        return aff__fail(err, AFF_EUNAVAILABLE, "the write log's stream info: %s",
                         natsStatus_GetText(s));
    *out = si->State.LastSeq;
    raise_last_known(log, si->State.LastSeq);
    jsStreamInfo_Destroy(si);
    return AFF_OK;
}

/* ---- erasure: secure deletes of chosen records (DeleteUser, truncation) -------------------- */

/* The sequence of the last record on `subject`, 0 when it has none (or cannot be asked). */
static uint64_t last_on_subject(aff_replog *log, const char *subject)
{
    natsMsg *m = NULL;
    if (js_GetLastMsg(&m, log->js, log->stream, subject, NULL, NULL) != NATS_OK) return 0;
    uint64_t seq = natsMsg_GetSequence(m);
    natsMsg_Destroy(m);
    return seq;
}

int replog_erase_records(aff_replog *log, const char *subject_suffix, uint64_t below,
                         replog_match_fn match, void *ctx, uint64_t *n_erased, aff_err *err)
{
    char subject[256];
    snprintf(subject, sizeof subject, "%s.%s", log->stream, subject_suffix);
    *n_erased = 0;
    if (natsConnection_Status(log->nc) != NATS_CONN_STATUS_CONNECTED)
        return aff__fail(err, AFF_EUNAVAILABLE, "the write log is unreachable; nothing erased");
    uint64_t last = last_on_subject(log, subject);
    if (!last) return AFF_OK; /* no record on the subject (or none left) */
    uint64_t end = last < below ? last : below - 1; /* the last sequence to look at */
    natsSubscription *sub = NULL;
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = log->stream;
    so.Ordered = true;
    so.Config.DeliverPolicy = js_DeliverAll;
    jsErrCode jerr = 0;
    natsStatus s = js_SubscribeSync(&sub, log->js, subject, NULL, &so, &jerr);
    if (s != NATS_OK)
        return aff__fail(err, AFF_EUNAVAILABLE, "cannot read '%s' to erase records: %s", subject,
                         natsStatus_GetText(s));
    int status = AFF_OK;
    for (;;) {
        natsMsg *msg = NULL;
        s = natsSubscription_NextMsg(&msg, sub, REPLOG_ERASE_WAIT_MS);
        if (s != NATS_OK) {
            status = aff__fail(err, AFF_EUNAVAILABLE,
                               "reading '%s' to erase records stopped: %s (%llu erased)", subject,
                               natsStatus_GetText(s), (unsigned long long)*n_erased);
            break;
        }
        jsMsgMetaData *meta = NULL;
        if (natsMsg_GetMetaData(&meta, msg) != NATS_OK) {
            natsMsg_Destroy(msg);
            continue;
        }
        uint64_t seq = meta->Sequence.Stream;
        uint64_t pending = meta->NumPending;
        jsMsgMetaData_Destroy(meta);
        bool erase = seq <= end && (!match || match(ctx, (const uint8_t *)natsMsg_GetData(msg),
                                                     (size_t)natsMsg_GetDataLength(msg)));
        natsMsg_Destroy(msg);
        if (erase) {
            jsOptions o;
            jsOptions_Init(&o);
            o.Wait = 5000;
            jerr = 0;
            s = js_EraseMsg(log->js, log->stream, seq, &o, &jerr);
            if (s != NATS_OK && jerr != JSSequenceNotFoundErr && jerr != JSNoMessageFoundErr) {
                status = aff__fail(err, AFF_EUNAVAILABLE,
                                   "cannot erase record %llu: %s (%llu erased)",
                                   (unsigned long long)seq, natsStatus_GetText(s),
                                   (unsigned long long)*n_erased);
                break;
            }
            if (s == NATS_OK) (*n_erased)++;
        }
        if (seq >= end || !pending) break;
    }
    natsSubscription_Destroy(sub);
    return status;
}

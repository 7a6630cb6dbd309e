/*
 * main.c: affinityd — flags and environment, start-up, signals and graceful shutdown.
 *
 * Start-up order: configuration (frozen from here on) → store (LMDB under --data-dir, or a
 * private in-memory one) → profiles → engine and backend → catalog → metrics (endpoint
 * optional) → batcher → gRPC server (health NOT_SERVING, every other call UNAVAILABLE) → port
 * file → rebuild of the engine from the store (logged with progress and its duration) → demo
 * catalog (optional) → health SERVING. SIGTERM/SIGINT only write a byte to a pipe that main()
 * waits on (see stop_pipe_w). Shutdown: health NOT_SERVING, no new calls, in-flight calls get
 * --grace-seconds to finish, then the rest are cancelled; then the transport, batcher,
 * profiles, catalog, engine and finally the store (every acknowledged write is already
 * committed) are closed; exit 0.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "batcher.h"
#include "catalog.h"
#include "config.h"
#include "console.h"
#include "demo.h"
#include "engine.h"
#include "experiments.h"
#include "exposure.h"
#include "heap.h"
#include "kafka_in.h"
#include "log.h"
#include "metrics.h"
#include "outcomes.h"
#include "pipeline.h"
#include "profiles.h"
#include "replog.h"
#include "snapshots.h"
#include "transport_client.h"
#include "retention.h"
#include "store.h"
#include "transport.h"

/* OpenMP reads OMP_WAIT_POLICY once, when the library loads: without PASSIVE, idle FAISS and
 * OpenBLAS threads spin and steal the cores the server needs (4-25x slower on small
 * machines). If it is unset, set it and re-execute this binary with the same arguments. */
static void ensure_passive_openmp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY")) return;
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);
    fprintf(stderr, "affinityd: warning: cannot re-execute with OMP_WAIT_POLICY=PASSIVE: %s\n",
            strerror(errno));
}

/* Reads the bearer token: the file's content without surrounding whitespace. */
static int read_token(const char *flag, const char *path, char *out, size_t size, aff_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return aff__fail(err, AFF_EINVAL, "--%s: cannot open '%s': %s", flag, path,
                         strerror(errno));
    size_t n = fread(out, 1, size - 1, f);
    bool more = fgetc(f) != EOF;
    fclose(f);
    if (more)
        return aff__fail(err, AFF_EINVAL, "--%s: the token is longer than %zu bytes", flag,
                         size - 2);
    out[n] = '\0';
    size_t start = strspn(out, " \t\r\n");
    memmove(out, out + start, n - start + 1);
    n = strlen(out);
    while (n && strchr(" \t\r\n", out[n - 1]))
        out[--n] = '\0';
    if (!n) return aff__fail(err, AFF_EINVAL, "--%s: '%s' holds no token", flag, path);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)out[i] < 0x21 || (unsigned char)out[i] > 0x7e)
            return aff__fail(err, AFF_EINVAL,
                             "--%s: the token must be printable ASCII without spaces", flag);
    return 0;
}

/* Writes the port to path atomically (a temporary file renamed into place). */
static int write_port_file(const char *path, int port, aff_err *err)
{
    char tmp[CONFIG_PATH_MAX + 16];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%d\n", port) < 0 || fclose(f) != 0 || rename(tmp, path) != 0)
        return aff__fail(err, AFF_EIO, "--port-file: cannot write '%s': %s", path, strerror(errno));
    return 0;
}

/* The write end of the stop pipe. The one piece of mutable global state besides the
 * configuration: a signal handler can reach nothing else. Libraries (OpenBLAS) start threads
 * before main() with every signal unblocked, so blocking signals and sigwait() is not enough:
 * a SIGTERM could land on such a thread and kill the process. A handler that writes one byte
 * is safe wherever the signal lands; later signals during the drain change nothing. */
static int stop_pipe_w = -1;

static void on_stop_signal(int sig)
{
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    if (write(stop_pipe_w, &b, 1) < 0) {
        /* the pipe is full: a stop is already pending */
    }
    errno = saved;
}

static int stop_pipe_r = -1;

static int install_stop_handler(aff_err *err)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0)
        return aff__fail(err, AFF_EINTERNAL, "cannot create the signal pipe: %s", strerror(errno));
    stop_pipe_r = fds[0];
    stop_pipe_w = fds[1];
    int fl = fcntl(stop_pipe_r, F_GETFL);
    fcntl(stop_pipe_r, F_SETFL, fl & ~O_NONBLOCK);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL); /* not a stop: main() re-reads the serving config */
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

/* Scrape hook of the GPU backend: device memory and device faults (see backend_gpu.c). */
/* batcher_config.on_batch: batch sizes and queue depth into the metrics registry. */
static void observe_batch(void *ctx, uint64_t queries, uint64_t queued)
{
    metrics_observe_batch(ctx, queries);
    metrics_set_queue_depth(ctx, (int64_t)queued);
}

/* What the scrape hook reads. */
typedef struct scrape_ctx {
    aff_engine *engine;
    aff_model *model;
    aff_outcomes *outcomes;
    aff_experiments *experiments;
    metrics_scrape *scrape; /* during outcomes_foreach_total */
} scrape_ctx;

/* outcomes_foreach_total callback: one series into the scrape. */
static void scrape_outcome(void *ctx, const outcomes_labels *l, const outcomes_counts *c)
{
    const scrape_ctx *sc = ctx;
    if (strcmp(l->strategy, OUTCOMES_UNATTRIBUTED) == 0) {
        metrics_scrape_unattributed(sc->scrape, l->collection, c->n);
        return;
    }
    metrics_outcome_labels ml = {l->collection, l->surface, l->strategy, l->experiment, l->arm};
    metrics_scrape_outcomes(sc->scrape, &ml, c->responses, c->n, c->revenue);
}

/* Scrape hook: items and model state per collection, device memory and device faults, read
 * when Prometheus asks. */
static void scrape_engine(aff_metrics *m, metrics_scrape *scrape, void *ctx)
{
    scrape_ctx *sc = ctx;
    if (sc->outcomes) {
        size_t records = 0, bytes = 0;
        sc->scrape = scrape;
        outcomes_foreach_total(sc->outcomes, scrape_outcome, sc);
        outcomes_usage(sc->outcomes, &records, &bytes);
        metrics_scrape_measurement(scrape, records, bytes,
                                   sc->experiments ? experiments_running(sc->experiments) : 0);
    }
    aff_engine *engine = sc->engine;
    engine_collection_info *infos = NULL;
    size_t n = 0;
    aff_err err;
    if (engine_list_collections(engine, &infos, &n, &err) == 0)
        for (size_t i = 0; i < n; i++) {
            metrics_scrape_collection(scrape, infos[i].name, infos[i].n_items);
            model_info mi;
            if (sc->model && model_get_info(sc->model, infos[i].name, &mi, &err) == AFF_OK)
                metrics_scrape_model(scrape, infos[i].name, mi.has_model ? mi.current.id : 0,
                                     mi.current.loss, mi.current.duration_s,
                                     mi.current.events_used, mi.job_running);
        }
    free(infos);
    backend_info bi;
    engine_backend_info(engine, &bi);
    if (bi.memory_total) metrics_set_gpu_memory(m, bi.memory_used, bi.memory_total);
    if (strcmp(bi.name, "cuda") == 0) metrics_set_device_faults(m, bi.device_faults, bi.tables_on_cpu);
}

/* Blocks until SIGTERM, SIGINT or SIGHUP arrives; returns which. */
static int wait_stop_signal(void)
{
    unsigned char b = 0;
    for (;;) {
        ssize_t n = read(stop_pipe_r, &b, 1);
        if (n == 1) return b;
        if (n < 0 && errno != EINTR) return SIGTERM;
    }
}

/* The replica's store skips fsync between batches (main: scfg.no_sync with --log). A
 * process crash loses nothing the OS holds, but a machine crash may leave LMDB torn. The
 * marker file holds the kernel's boot id while the replica runs; found at start with another
 * boot id, the machine went down under a running replica and the store is refused. */
#define BOOT_MARKER "replica.running"

static void read_boot_id(char *out, size_t size)
{
    out[0] = '\0';
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (!f) return;
    if (!fgets(out, (int)size, f)) out[0] = '\0';
    fclose(f);
    out[strcspn(out, "\n")] = '\0';
}

static int check_boot_marker(const char *dir, aff_err *err)
{
    char path[CONFIG_PATH_MAX + 32], boot[64], seen[64] = "";
    snprintf(path, sizeof path, "%s/%s", dir, BOOT_MARKER);
    read_boot_id(boot, sizeof boot);
    FILE *f = fopen(path, "r");
    if (f) {
        if (!fgets(seen, sizeof seen, f)) seen[0] = '\0';
        fclose(f);
        seen[strcspn(seen, "\n")] = '\0';
        if (boot[0] && seen[0] && strcmp(seen, boot) != 0)
            return aff__fail(err, AFF_EPRECONDITION,
                             "--data-dir '%s': the machine restarted while this replica was "
                             "running with --log, so the store may hold torn writes; empty the "
                             "directory (the replica replays the write log) and start again",
                             dir);
    }
    f = fopen(path, "w");
    if (!f || fprintf(f, "%s\n", boot) < 0 || fflush(f) != 0 || fsync(fileno(f)) != 0) {
        if (f) fclose(f);
        return aff__fail(err, AFF_EIO, "--data-dir: cannot write '%s': %s", path, strerror(errno));
    }
    fclose(f);
    return 0;
}

static void remove_boot_marker(const char *dir)
{
    char path[CONFIG_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/%s", dir, BOOT_MARKER);
    unlink(path);
}

/* --bootstrap-from: a data dir without a store gets the peer's snapshot as its store
 * (<data-dir>/data.mdb), which then replays the log from the snapshot's sequence. A data dir
 * that already has a store keeps it (a restart). */
static int bootstrap(const aff_config *cfg, const char *token, aff_err *err)
{
    char path[CONFIG_PATH_MAX + 32], tmp[CONFIG_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/data.mdb", cfg->data_dir);
    snprintf(tmp, sizeof tmp, "%s/data.mdb.bootstrap", cfg->data_dir);
    if (access(path, F_OK) == 0) {
        aff_log(AFF_LOG_INFO, "--bootstrap-from: the data dir has a store; not bootstrapped");
        return 0;
    }
    if (mkdir(cfg->data_dir, 0755) != 0 && errno != EEXIST)
        return aff__fail(err, AFF_EIO, "--data-dir: cannot create '%s': %s", cfg->data_dir,
                         strerror(errno));
    transport_client *client = NULL;
    transport_client_options o = {.target = cfg->bootstrap_from,
                                  .token = token,
                                  .timeout_ms = 3600000};
    transport_call_status st;
    uint64_t seq = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = transport_client_create(&client, &o, err);
    if (!rc) rc = transport_client_fetch_snapshot(client, tmp, &seq, &st, err);
    transport_client_destroy(client);
    if (rc) return aff__fail(err, rc, "--bootstrap-from %s: %s", cfg->bootstrap_from, err->msg);
    if (rename(tmp, path) != 0)
        return aff__fail(err, AFF_EIO, "--bootstrap-from: cannot install '%s': %s", path,
                         strerror(errno));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    char a[24], secs[24];
    snprintf(a, sizeof a, "%llu", (unsigned long long)seq);
    snprintf(secs, sizeof secs, "%.3f",
             (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    aff_log_kv(AFF_LOG_INFO, "bootstrapped from a snapshot", "peer", cfg->bootstrap_from,
               "log sequence", a, "seconds", secs, NULL);
    return 0;
}

/* A random id for this process in the write log's records (its own answers come back to
 * it). */
static void make_origin(char *out, size_t size)
{
    uint8_t b[12] = {0};
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, b, sizeof b) != (ssize_t)sizeof b) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t x = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)getpid();
        memcpy(b, &x, sizeof x);
    }
    if (fd >= 0) close(fd);
    size_t n = 0;
    for (size_t i = 0; i < sizeof b && n + 2 < size; i++)
        n += (size_t)snprintf(out + n, size - n, "%02x", b[i]);
}

/* Replication: health stays NOT_SERVING until this replica applied the stream up to its
 * last sequence as seen once the log answers (retrying while it does not). Returns 0 when
 * caught up, or the stop signal that arrived first. */
static int wait_caught_up(aff_replog *log, uint64_t start)
{
    char from[24];
    snprintf(from, sizeof from, "%llu", (unsigned long long)start);
    aff_log_kv(AFF_LOG_INFO, "catching up with the write log", "from sequence", from, NULL);
    uint64_t target = 0;
    bool known = false;
    int64_t last_note = 0;
    for (int64_t waited = 0;; waited += 100) {
        struct pollfd pfd = {.fd = stop_pipe_r, .events = POLLIN};
        if (poll(&pfd, 1, 100) > 0) {
            int sig = wait_stop_signal();
            if (sig != SIGHUP) return sig; /* the serving config is read again once serving */
        }
        aff_err err;
        if (!known && replog_stream_ready(log) &&
            replog_stream_last(log, 2000, &target, &err) == AFF_OK)
            known = true;
        if (known && replog_applied(log) >= target) break;
        if (waited - last_note >= 5000) {
            last_note = waited;
            char a[24], t[24];
            snprintf(a, sizeof a, "%llu", (unsigned long long)replog_applied(log));
            snprintf(t, sizeof t, "%llu", (unsigned long long)target);
            aff_log_kv(AFF_LOG_INFO, "still catching up", "applied", a, "target",
                       known ? t : "(log unreachable)", NULL);
        }
    }
    char a[24];
    snprintf(a, sizeof a, "%llu", (unsigned long long)replog_applied(log));
    aff_log_kv(AFF_LOG_INFO, "caught up with the write log", "applied", a, NULL);
    return 0;
}

/* Applied events count toward the model's --train-after-events trigger. */
static void note_events(void *ctx, const char *collection, uint64_t n_applied)
{
    model_note_events(ctx, collection, n_applied);
}

int main(int argc, char **argv)
{
    int rc = 1;
    aff_config cfg;
    aff_err err = {0};
    char token[4096] = "";
    char log_token[4096] = "";
    char log_password[4096] = "";
    aff_replog *replog = NULL;
    aff_snapshots *snaps = NULL;
    aff_kafka_in *kafka = NULL;
    aff_store *store = NULL;
    aff_profiles *profiles = NULL;
    aff_widgets *widgets = NULL;
    aff_engine *engine = NULL;
    aff_catalog *catalog = NULL;
    aff_model *model = NULL;
    batcher *bat = NULL;
    aff_metrics *metrics = NULL;
    transport *server = NULL;
    aff_pipeline *pipeline = NULL;
    aff_exposure *exposure = NULL;
    heap_trimmer *trimmer = NULL;
    retention *keeper = NULL;
    aff_outcomes *outcomes = NULL;
    aff_experiments *experiments = NULL;
    aff_console *console = NULL;

    ensure_passive_openmp(argv);
    if (config_parse(&cfg, argc, argv, &err)) {
        fprintf(stderr, "affinityd: %s\n", err.msg);
        return 2;
    }
    if (cfg.help) {
        config_usage(stdout, "affinityd");
        return 0;
    }
    if (cfg.version) {
        printf("affinityd %s\n", AFF_VERSION_STRING);
        return 0;
    }
    aff_log_set_level(cfg.log_level);

    if (install_stop_handler(&err)) goto fail;

    aff_log_kv(AFF_LOG_INFO, "affinityd starting", "version", AFF_VERSION_STRING, NULL);
    config_log(&cfg);
    if (cfg.token_file[0] && read_token("token-file", cfg.token_file, token, sizeof token, &err))
        goto fail;
    if (cfg.log_token_file[0] &&
        read_token("log-token-file", cfg.log_token_file, log_token, sizeof log_token, &err))
        goto fail;
    if (cfg.log_password_file[0] && read_token("log-password-file", cfg.log_password_file,
                                                log_password, sizeof log_password, &err))
        goto fail;

    /* Storage first: a data dir that cannot be used (or is held by another process) stops
     * the start before anything listens. */
    /* With --log the store is a replica of the log: commits skip fsync (the stream holds
     * the records durably; replog.h) and the store is flushed at a clean stop; a machine
     * crash under a running replica is caught by check_boot_marker. */
    if (cfg.bootstrap_from[0] && bootstrap(&cfg, token, &err)) goto fail;
    store_config scfg = {.dir = cfg.data_dir[0] ? cfg.data_dir : NULL,
                         .no_sync = cfg.log_urls[0] != '\0'};
    if (store_create(&store, &scfg, &err)) goto fail;
    if (cfg.log_urls[0] && cfg.data_dir[0] && check_boot_marker(cfg.data_dir, &err)) goto fail;
    if (!cfg.data_dir[0])
        aff_log(AFF_LOG_WARN, "in memory only: no --data-dir, everything is lost at exit");
    profiles_config pcfg;
    profiles_custom_type custom[PROFILES_MAX_CUSTOM_TYPES];
    config_profiles(&cfg, &pcfg, custom);
    /* Widget statistics follow every change of the stored histories (profiles' observer). */
    widgets_config wcfg;
    config_widgets(&cfg, &wcfg);
    if (widgets_create(&widgets, &wcfg, &err)) goto fail;
    widgets_observer(widgets, &pcfg.observer);
    /* Replication: every replica applies a record with the record's time as "now". */
    if (cfg.log_urls[0]) pcfg.now_ms = replog_now_ms;
    if (profiles_create(&profiles, store, &pcfg, &err)) goto fail;

    engine_config ecfg = {
        .backend = cfg.backend,
        .faiss = {.threads = (int)cfg.cpu_threads, .precision = cfg.cpu_precision},
        .gpu = {.device = cfg.gpu_device, .fp32 = cfg.fp32, .max_batch = cfg.max_batch}};
    if (engine_create(&engine, &ecfg, &err)) goto fail;
    backend_info bi;
    engine_backend_info(engine, &bi);
    aff_log_kv(AFF_LOG_INFO, "backend in use", "requested", config_backend_name(cfg.backend),
               "backend", bi.name, "device", bi.device, NULL);
    if (catalog_create(&catalog, engine, store, &err)) goto fail;
    model_config mcfg;
    config_model(&cfg, &mcfg);
    /* Replication: a fold-in is a function of the log position, not of the read's moment. */
    mcfg.fold_in_data_clock = cfg.log_urls[0] != '\0';
    if (model_create(&model, engine, store, &mcfg, &err)) goto fail;
    catalog_attach_model(catalog, model);
    /* Item ages (first upserts, from the store during the rebuild) and served counts for
     * exploration. */
    if (exposure_create(&exposure, EXPOSURE_DEFAULT_HALF_LIFE_S, &err)) goto fail;
    catalog_attach_exposure(catalog, exposure);
    catalog_attach_widgets(catalog, widgets);

    /* Metrics: the registry always exists (updates are cheap); the HTTP endpoint runs when
     * --metrics-listen is set. The transport counts calls and latencies, the batcher reports
     * batch sizes and queue depth through on_batch. */
    if (metrics_create(&metrics, cfg.metrics_listen, &err)) goto fail;
    metrics_set_backend(metrics, bi.name, bi.device);
    outcomes_config ocfg = {.window_s = cfg.attribution_window_s,
                            .max_records = cfg.attribution_max_records};
    if (cfg.attribution_max_records && outcomes_create(&outcomes, &ocfg, &err)) goto fail;
    scrape_ctx sctx = {.engine = engine, .model = model, .outcomes = outcomes};
    metrics_set_scrape_hook(metrics, scrape_engine, &sctx);
    if (cfg.metrics_listen[0])
        aff_log(AFF_LOG_INFO, "metrics on port %u", (unsigned)metrics_port(metrics));

    batcher_config bcfg = {.max_batch = cfg.max_batch,
                           .max_wait_us = cfg.max_wait_us,
                           .queue_limit = cfg.queue_limit,
                           .workers = cfg.batch_workers,
                           .on_batch = observe_batch,
                           .on_batch_ctx = metrics};
    batcher_exec exec = batcher_engine_exec(engine);
    if (batcher_create(&bat, &bcfg, &exec, &err)) goto fail;
    pipeline_config plcfg = {.engine = engine,
                             .batcher = bat,
                             .profiles = profiles,
                             .model = model,
                             .exposure = exposure,
                             .presets_path = cfg.serving_config,
                             .outcomes = outcomes,
                             .widgets = widgets};
    if (pipeline_create(&pipeline, &plcfg, &err)) goto fail;
    experiments_config xcfg = {
        .store = store, .preset_exists = pipeline_has_preset, .preset_ctx = pipeline};
    /* With the log, creation and stop times are the record's time: the same on every replica. */
    if (cfg.log_urls[0]) xcfg.now_ms = replog_now_ms;
    if (experiments_create(&experiments, &xcfg, &err)) goto fail;
    pipeline_attach_experiments(pipeline, experiments);
    sctx.experiments = experiments;

    transport_config tcfg = {.listen = cfg.listen,
                             .threads = cfg.threads,
                             .max_message_bytes = cfg.max_message_bytes,
                             .tls_cert_file = cfg.tls_cert,
                             .tls_key_file = cfg.tls_key,
                             .token = token,
                             .tokens_file = cfg.tokens_file,
                             .tls_client_ca_file = cfg.tls_client_ca,
                             .max_batch = cfg.max_batch,
                             .max_wait_us = cfg.max_wait_us,
                             .catalog = catalog,
                             .profiles = profiles,
                             .model = model,
                             .on_events = note_events,
                             .on_events_ctx = model,
                             .metrics = metrics,
                             .pipeline = pipeline,
                             .outcomes = outcomes,
                             .experiments = experiments,
                             .widgets = widgets,
                             .max_connections = cfg.max_connections,
                             .idle_timeout_ms = cfg.idle_timeout_ms,
                             .handshake_timeout_ms = cfg.handshake_timeout_ms,
                             .max_header_bytes = cfg.max_header_bytes,
                             .store = store,
                             .log_ack_committed = strcmp(cfg.log_ack, "committed") == 0,
                             .min_sequence_wait_ms = cfg.min_sequence_wait_ms};
    if (cfg.log_urls[0]) make_origin(tcfg.log_origin, sizeof tcfg.log_origin);
    if (transport_create(&server, &tcfg, engine, bat, &err)) goto fail;
    char port[16];
    snprintf(port, sizeof port, "%d", transport_port(server));
    aff_log_kv(AFF_LOG_INFO, "listening", "address", cfg.listen, "port", port, "tls",
               cfg.tls_cert[0] ? "on" : "off", "auth",
               token[0] || cfg.tokens_file[0] ? "bearer tokens" : "off", "client certificates",
               cfg.tls_client_ca[0] ? "required" : "off", NULL);
    if (cfg.port_file[0] && write_port_file(cfg.port_file, transport_port(server), &err)) goto fail;
    /* The web console on the metrics port (read-only; the API's tokens). */
    console_config ccfg = {.engine = engine,
                           .model = model,
                           .profiles = profiles,
                           .pipeline = pipeline,
                           .outcomes = outcomes,
                           .experiments = experiments,
                           .transport = server,
                           .backend = bi.name,
                           .device = bi.device};
    if (console_create(&console, &ccfg, &err)) goto fail;
    metrics_set_http_handler(metrics, "/console", console_handle, console);

    /* The engine is rebuilt from the store while health says NOT_SERVING and every other
     * call is refused, so no write can race the rebuild. */
    if (catalog_rebuild(catalog, NULL, &err)) goto fail;
    /* --demo goes through the durable path like any client's writes, so the demo shop
     * survives restarts with --data-dir and profiles can use its items. When the store
     * already holds a demo collection (an earlier --demo run, possibly with changes made
     * since), the demo is not loaded again: the stored state wins. */
    if (cfg.demo && demo_present(engine))
        aff_log(AFF_LOG_INFO, "demo shop already in the store: not loaded again");
    else if (cfg.demo && demo_load(catalog, &err))
        goto fail;
    /* Widget statistics: replayed from the stored histories before any event arrives. */
    if (widgets_rebuild(widgets, store, &err)) goto fail;
    /* Learned models: the last trained version of each collection serves at once. */
    if (model_load_all(model, &err)) goto fail;
    /* After the rebuild, before serving: the first retention pass runs beside the serving. */
    if (cfg.event_retention_days && !cfg.log_urls[0] &&
        retention_start(&keeper, profiles, cfg.event_retention_days,
                        cfg.event_retention_interval_s * 1000, &err))
        goto fail;
    if (cfg.heap_trim_mib &&
        heap_trimmer_start(&trimmer, 1000, (size_t)cfg.heap_trim_mib << 20, &err))
        goto fail;
    int sig = 0;
    if (cfg.log_urls[0]) {
        uint64_t applied = 0;
        if (store_log_sequence(store, &applied, &err)) goto fail;
        replog_config rcfg = {.urls = cfg.log_urls,
                              .stream = cfg.log_stream,
                              .replicas = (int)cfg.log_replicas,
                              .creds_file = cfg.log_creds,
                              .token = log_token,
                              .user = cfg.log_user,
                              .password = log_password,
                              .tls_ca_file = cfg.log_tls_ca,
                              .tls_cert_file = cfg.log_tls_cert,
                              .tls_key_file = cfg.log_tls_key,
                              .start_sequence = applied,
                              .dedup_window_s = cfg.log_dedup_window_s,
                              .apply_nice = cfg.log_apply_nice,
                              .apply = transport_log_apply,
                              .apply_ctx = server,
                              .commit = transport_log_commit,
                              .commit_ctx = server};
        /* A trained model goes through the log and is installed by every replica. */
        model_set_replication(model, transport_log_publish_model, transport_log_request_train,
                              server);
        if (replog_create(&replog, &rcfg, &err)) goto fail;
        transport_set_log(server, replog);
        /* With the log, retention cuts are log records every replica applies in order. */
        if (cfg.event_retention_days &&
            retention_start_replicated(&keeper, cfg.event_retention_days,
                                       cfg.event_retention_interval_s * 1000,
                                       transport_log_publish_retention, server, &err))
            goto fail;
        sig = wait_caught_up(replog, applied);
    }
    if (!sig && cfg.kafka_brokers[0]) {
        kafka_in_config kcfg = {.brokers = cfg.kafka_brokers,
                                .topic = cfg.kafka_topic,
                                .group = cfg.kafka_group,
                                .collection = cfg.kafka_collection,
                                .ingest = transport_log_ingest_event,
                                .ingest_ctx = server};
        if (kafka_in_start(&kafka, &kcfg, &err)) goto fail;
    }
    if (!sig && cfg.snapshot_dir[0]) {
        snapshots_config sncfg = {.dir = cfg.snapshot_dir,
                                  .interval_s = cfg.snapshot_interval_s,
                                  .keep = cfg.snapshot_keep,
                                  .retain_records = cfg.log_retain_records,
                                  .log = replog};
        if (snapshots_start(&snaps, store, &sncfg, &err)) goto fail;
    }
    if (!sig) {
        transport_set_serving(server, true);
        metrics_set_serving(metrics, true);
        aff_log(AFF_LOG_INFO, "serving");
        while ((sig = wait_stop_signal()) == SIGHUP) {
            /* SIGHUP: re-read the serving config now (a bad file keeps the previous one) */
            aff_err rerr;
            if (!cfg.serving_config[0])
                aff_log(AFF_LOG_WARN, "SIGHUP: no --serving-config to reload");
            else if (pipeline_reload_presets(pipeline, &rerr))
                aff_log_kv(AFF_LOG_ERROR, "SIGHUP: serving config not reloaded; the previous one stays",
                           "error", rerr.msg, NULL);
            else
                aff_log_kv(AFF_LOG_INFO, "SIGHUP: serving config reloaded", "path", cfg.serving_config,
                           NULL);
        }
    }
    aff_log_kv(AFF_LOG_INFO, "shutting down", "signal", sig == SIGTERM ? "SIGTERM" : "SIGINT",
               NULL);
    metrics_set_serving(metrics, false);
    uint32_t grace_ms = cfg.grace_seconds * 1000u;
    if (transport_shutdown(server, cfg.drain_notice_ms < grace_ms ? cfg.drain_notice_ms : grace_ms,
                           grace_ms))
        aff_log(AFF_LOG_WARN, "some calls did not finish within %u s and were cancelled",
                cfg.grace_seconds);
    rc = 0;
    goto out;
fail:
    aff_log_kv(AFF_LOG_ERROR, "start-up failed", "error", err.msg, NULL);
    fprintf(stderr, "affinityd: %s\n", err.msg);
out:
    metrics_set_http_handler(metrics, NULL, NULL, NULL); /* waits for a page in progress */
    console_destroy(console);
    heap_trimmer_stop(trimmer);
    retention_stop(keeper);
    kafka_in_stop(kafka);
    snapshots_stop(snaps);
    /* The log's apply thread calls into the transport and the modules: it stops first; the
     * log itself goes after the transport, whose blocking-work threads may still use it. */
    replog_stop(replog);
    transport_destroy(server);
    replog_destroy(replog);
    batcher_destroy(bat);
    pipeline_destroy(pipeline);
    metrics_destroy(metrics);
    experiments_destroy(experiments);
    outcomes_destroy(outcomes);
    profiles_destroy(profiles);
    catalog_destroy(catalog);
    exposure_destroy(exposure);
    widgets_destroy(widgets);
    model_destroy(model);
    engine_destroy(engine);
    store_destroy(store);
    if (rc == 0) aff_log(AFF_LOG_INFO, "stopped");
    memset(token, 0, sizeof token);
    memset(log_token, 0, sizeof log_token);
    memset(log_password, 0, sizeof log_password);
    if (rc == 0 && cfg.log_urls[0] && cfg.data_dir[0]) remove_boot_marker(cfg.data_dir);
    return rc;
}

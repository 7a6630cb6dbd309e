/*
 * transport_guard.c: owns the connection limit and the descriptor-exhaustion recovery (see
 * transport_guard.h for why gRPC 1.51 needs them).
 *
 * How: this file defines accept4() and close(). A program linking it exports them, so the
 * dynamic linker binds libgrpc's calls to these definitions (symbol interposition); each
 * forwards to the C library's own function found with dlsym(RTLD_NEXT). The state below is
 * process-wide by nature (there is one descriptor table per process); it is the only mutable
 * global state outside the configuration and is written only under guard_mu or atomically.
 *
 * Rules kept: accept4 returns either a connection within the limit or -1; when it refuses
 * connections it drains the listener's backlog first (gRPC's poller is edge-triggered, so a
 * backlog left behind would not wake it again); a refusal is logged at most once a second
 * with the counts; close() of an untracked descriptor costs one relaxed load.
 */
#include "transport_guard.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

#define MAX_TRACKED (1u << 20) /* descriptors beyond this are passed through uncounted */

typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);
typedef int (*close_fn)(int);

static _Atomic(accept4_fn) real_accept4_p;
static _Atomic(close_fn) real_close_p;
static atomic_bool active;
static atomic_uint n_open;
static atomic_uint_fast64_t n_refused;
/* [n_tracked]: 1 when the descriptor is an accepted connection. Set once (n_tracked first),
 * published with release order, never freed: a close() may run at any time. */
static _Atomic(atomic_uchar *) tracked_p;
static uint32_t n_tracked;
static uint32_t limit;
static pthread_mutex_t guard_mu = PTHREAD_MUTEX_INITIALIZER; /* reserve_fd, last_log_s */
static int reserve_fd = -1;
static int64_t last_log_s;

static accept4_fn real_accept4(void)
{
    accept4_fn f = atomic_load_explicit(&real_accept4_p, memory_order_acquire);
    if (!f) {
        f = (accept4_fn)dlsym(RTLD_NEXT, "accept4");
        atomic_store_explicit(&real_accept4_p, f, memory_order_release);
    }
    return f;
}

static close_fn real_close(void)
{
    close_fn f = atomic_load_explicit(&real_close_p, memory_order_acquire);
    if (!f) {
        f = (close_fn)dlsym(RTLD_NEXT, "close");
        atomic_store_explicit(&real_close_p, f, memory_order_release);
    }
    return f;
}

static void log_refusal(const char *why)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    pthread_mutex_lock(&guard_mu);
    bool due = ts.tv_sec != last_log_s;
    if (due) last_log_s = ts.tv_sec;
    pthread_mutex_unlock(&guard_mu);
    if (due)
        aff_log(AFF_LOG_WARN,
                "refusing new connections: %s (%u open, limit %u from --max-connections; %llu "
                "refused so far)",
                why, atomic_load(&n_open), limit, (unsigned long long)atomic_load(&n_refused));
}

/* Out of descriptors: frees the reserve, accepts the oldest waiting connection and closes it
 * at once, and takes the reserve back. true when a connection was shed (try again). */
static bool shed_one(int listen_fd)
{
    pthread_mutex_lock(&guard_mu);
    bool shed = false;
    if (reserve_fd >= 0) {
        real_close()(reserve_fd);
        reserve_fd = -1;
        int c = real_accept4()(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0) {
            real_close()(c);
            shed = true;
        }
        reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    }
    pthread_mutex_unlock(&guard_mu);
    if (shed) {
        atomic_fetch_add(&n_refused, 1);
        log_refusal("the process is out of file descriptors");
    }
    return shed;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
    for (;;) {
        int c = real_accept4()(fd, addr, addrlen, flags);
        if (!atomic_load_explicit(&active, memory_order_relaxed)) return c;
        if (c >= 0) {
            atomic_uchar *tracked = atomic_load_explicit(&tracked_p, memory_order_acquire);
            if (!tracked || (uint32_t)c >= n_tracked) return c;
            if (atomic_fetch_add(&n_open, 1) < limit) {
                atomic_store(&tracked[c], 1);
                return c;
            }
            atomic_fetch_sub(&n_open, 1);
            real_close()(c);
            atomic_fetch_add(&n_refused, 1);
            log_refusal("the connection limit is reached");
            continue; /* drain the backlog: the poller will not wake for it again */
        }
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            if (shed_one(fd)) continue;
            errno = EAGAIN; /* keep gRPC's listener armed; the next connection wakes it */
        }
        return -1;
    }
}

int close(int fd)
{
    atomic_uchar *tracked = atomic_load_explicit(&tracked_p, memory_order_acquire);
    if (tracked && fd >= 0 && (uint32_t)fd < n_tracked &&
        atomic_exchange_explicit(&tracked[fd], 0, memory_order_relaxed))
        atomic_fetch_sub(&n_open, 1);
    return real_close()(fd);
}

uint32_t transport__guard_start(uint32_t max_connections)
{
    struct rlimit rl = {0, 0};
    getrlimit(RLIMIT_NOFILE, &rl);
    uint64_t nofile = rl.rlim_cur == RLIM_INFINITY ? MAX_TRACKED : (uint64_t)rl.rlim_cur;
    if (nofile > MAX_TRACKED) nofile = MAX_TRACKED;
    /* Headroom for the store, gRPC's wakeup descriptors, metrics and log files. */
    uint64_t headroom = nofile / 8 > 64 ? nofile / 8 : 64;
    uint64_t auto_limit = nofile > headroom + 16 ? nofile - headroom : 16;
    pthread_mutex_lock(&guard_mu);
    if (!atomic_load(&tracked_p)) {
        atomic_uchar *tracked = calloc(nofile, sizeof *tracked);
        n_tracked = tracked ? (uint32_t)nofile : 0;
        atomic_store_explicit(&tracked_p, tracked, memory_order_release);
    }
    limit = max_connections ? max_connections : (uint32_t)auto_limit;
    if (reserve_fd < 0) reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    pthread_mutex_unlock(&guard_mu);
    real_accept4();
    real_close();
    atomic_store(&active, true);
    aff_log(AFF_LOG_INFO, "connection limit %u (RLIMIT_NOFILE %llu)", limit,
            (unsigned long long)nofile);
    return limit;
}

void transport__guard_stop(void)
{
    atomic_store(&active, false);
    pthread_mutex_lock(&guard_mu);
    if (reserve_fd >= 0) real_close()(reserve_fd);
    reserve_fd = -1;
    pthread_mutex_unlock(&guard_mu);
}

void transport__guard_counts(uint32_t *open_now, uint64_t *refused)
{
    *open_now = atomic_load(&n_open);
    *refused = atomic_load(&n_refused);
}

/*
 * snapshots.c: periodic store snapshots and write-log truncation (snapshots.h). Owns the
 * snapshot directory: files are written as .tmp and renamed into place, so a listed
 * snapshot-<seq>.mdb is always complete.
 */
#include "snapshots.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

#define SNAPSHOTS_MAX 64

struct aff_snapshots {
    aff_store *store;
    snapshots_config cfg;
    char dir[4096];
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
};

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The sequences of the complete snapshots in the directory, ascending. */
static size_t list_snapshots(const char *dir, uint64_t *seqs, size_t max)
{
    DIR *d = opendir(dir);
    size_t n = 0;
    if (!d) return 0;
    for (struct dirent *e; (e = readdir(d)) && n < max;) {
        unsigned long long seq;
        char tail[8];
        if (sscanf(e->d_name, "snapshot-%llu.%7s", &seq, tail) == 2 && strcmp(tail, "mdb") == 0)
            seqs[n++] = seq;
    }
    closedir(d);
    qsort(seqs, n, sizeof *seqs, cmp_u64);
    return n;
}

int snapshots_run_once(aff_snapshots *s, aff_err *err)
{
    char tmp[4200], path[4200];
    snprintf(tmp, sizeof tmp, "%s/snapshot.tmp", s->dir);
    uint64_t seq = 0;
    int rc = store_snapshot(s->store, tmp, &seq, err);
    if (rc) return rc;
    snprintf(path, sizeof path, "%s/snapshot-%020" PRIu64 ".mdb", s->dir, seq);
    if (rename(tmp, path) != 0) {
        unlink(tmp);
        return aff__fail(err, AFF_EIO, "snapshot: cannot rename to '%s': %s", path,
                         strerror(errno));
    }
    uint64_t seqs[SNAPSHOTS_MAX];
    size_t n = list_snapshots(s->dir, seqs, SNAPSHOTS_MAX);
    for (size_t i = 0; n > s->cfg.keep && i < n - s->cfg.keep; i++) {
        snprintf(path, sizeof path, "%s/snapshot-%020" PRIu64 ".mdb", s->dir, seqs[i]);
        unlink(path);
    }
    char a[24];
    snprintf(a, sizeof a, "%" PRIu64, seq);
    aff_log_kv(AFF_LOG_INFO, "snapshot written", "log sequence", a, NULL);
    n = list_snapshots(s->dir, seqs, SNAPSHOTS_MAX);
    if (!s->cfg.log || !n) return 0;
    uint64_t oldest = seqs[0];
    if (oldest <= s->cfg.retain_records) return 0;
    uint64_t below = oldest + 1 - s->cfg.retain_records;
    rc = replog_truncate(s->cfg.log, below, err);
    if (rc) return rc;
    snprintf(a, sizeof a, "%" PRIu64, below);
    aff_log_kv(AFF_LOG_INFO, "write log truncated", "below sequence", a, NULL);
    return 0;
}

static void *snapshot_thread(void *arg)
{
    aff_snapshots *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += s->cfg.interval_s;
        while (!s->stop && pthread_cond_timedwait(&s->cv, &s->mu, &until) != ETIMEDOUT) {
        }
        if (s->stop) break;
        pthread_mutex_unlock(&s->mu);
        aff_err err;
        if (snapshots_run_once(s, &err))
            aff_log_kv(AFF_LOG_WARN, "snapshot or truncation failed; next interval retries",
                       "error", err.msg, NULL);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int snapshots_start(aff_snapshots **out, aff_store *store, const snapshots_config *cfg,
                    aff_err *err)
{
    aff_snapshots *s = calloc(1, sizeof *s);
    if (!s) return aff__fail(err, AFF_ENOMEM, "out of memory starting snapshots");
    s->store = store;
    s->cfg = *cfg;
    if (!s->cfg.keep) s->cfg.keep = 1;
    if (!s->cfg.interval_s) s->cfg.interval_s = 1;
    snprintf(s->dir, sizeof s->dir, "%s", cfg->dir);
    s->cfg.dir = s->dir;
    if (mkdir(s->dir, 0700) != 0 && errno != EEXIST) {
        int e = errno;
        free(s);
        return aff__fail(err, AFF_EIO, "--snapshot-dir: cannot create '%s': %s", cfg->dir,
                         strerror(e));
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    if (pthread_create(&s->thread, NULL, snapshot_thread, s) != 0) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        free(s);
        return aff__fail(err, AFF_ENOMEM, "cannot start the snapshot thread");
    }
    *out = s;
    return 0;
}

void snapshots_stop(aff_snapshots *s)
{
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

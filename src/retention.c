/*
 * retention.c: owns the event-retention thread (see retention.h). Rules kept: one pass at a
 * time; every pass logs what it erased; a failed pass is logged and retried at the next
 * interval, never fatal. With --log a pass publishes its cut as a log record instead
 * (retention_start_replicated), so every replica erases the same events at the same point.
 */
#include "retention.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

struct retention {
    aff_profiles *profiles;         /* NULL when passes publish their cut */
    retention_publish_fn publish;   /* with --log: the cut goes through the log */
    void *publish_ctx;
    int64_t retention_ms;
    uint32_t interval_ms;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
};

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void run_pass(retention *r)
{
    aff_err err;
    uint64_t users = 0, events = 0;
    int64_t cutoff = wall_ms() - r->retention_ms;
    if (r->publish) {
        cutoff -= cutoff % r->interval_ms;
        if (r->publish(r->publish_ctx, cutoff, &err))
            aff_log_kv(AFF_LOG_WARN, "event retention: the cut could not be published; "
                                     "retrying at the next interval",
                       "error", err.msg, NULL);
        return;
    }
    if (profiles_expire(r->profiles, cutoff, &users, &events, &err))
        aff_log_kv(AFF_LOG_ERROR, "event retention pass failed; retrying later", "error", err.msg,
                   NULL);
    else if (users)
        aff_log(AFF_LOG_INFO,
                "event retention: erased %llu history events and derived data of %llu users "
                "(older than %lld days)",
                (unsigned long long)events, (unsigned long long)users,
                (long long)(r->retention_ms / 86400000));
}

static void *retention_thread(void *arg)
{
    retention *r = arg;
    pthread_mutex_lock(&r->mu);
    while (!r->stop) {
        pthread_mutex_unlock(&r->mu);
        run_pass(r);
        pthread_mutex_lock(&r->mu);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t ns = (int64_t)ts.tv_nsec + (int64_t)r->interval_ms * 1000000;
        ts.tv_sec += (time_t)(ns / 1000000000);
        ts.tv_nsec = (long)(ns % 1000000000);
        while (!r->stop && pthread_cond_timedwait(&r->cv, &r->mu, &ts) != ETIMEDOUT)
            ;
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

static int start(retention **out, aff_profiles *profiles, retention_publish_fn publish,
                 void *publish_ctx, uint32_t days, uint32_t interval_ms, aff_err *err)
{
    *out = NULL;
    retention *r = calloc(1, sizeof *r);
    if (!r) return aff__fail(err, AFF_ENOMEM, "out of memory starting event retention");
    r->profiles = profiles;
    r->publish = publish;
    r->publish_ctx = publish_ctx;
    r->retention_ms = (int64_t)days * 86400000;
    r->interval_ms = interval_ms ? interval_ms : 600000;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    int e = pthread_create(&r->thread, NULL, retention_thread, r);
    if (e) {
        pthread_cond_destroy(&r->cv);
        pthread_mutex_destroy(&r->mu);
        free(r);
        return aff__fail(err, AFF_EINTERNAL, "cannot start event retention: %s", strerror(e));
    }
    *out = r;
    return 0;
}

int retention_start(retention **out, aff_profiles *profiles, uint32_t days, uint32_t interval_ms,
                    aff_err *err)
{
    return start(out, profiles, NULL, NULL, days, interval_ms, err);
}

int retention_start_replicated(retention **out, uint32_t days, uint32_t interval_ms,
                               retention_publish_fn publish, void *ctx, aff_err *err)
{
    return start(out, NULL, publish, ctx, days, interval_ms, err);
}

void retention_stop(retention *r)
{
    if (!r) return;
    pthread_mutex_lock(&r->mu);
    r->stop = true;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->thread, NULL);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

/*
 * heap.c: owns the heap trimmer thread (see heap.h for why it exists). Rules kept: the thread
 * only reads malloc statistics and calls malloc_trim; stopping wakes it at once.
 */
#include "heap.h"

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

struct heap_trimmer {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* signalled by heap_trimmer_stop */
    bool stop;
    uint32_t interval_ms;
    size_t threshold;
};

void heap_usage(size_t *free_bytes, size_t *used_bytes)
{
    struct mallinfo2 mi = mallinfo2();
    *free_bytes = mi.fordblks + mi.fsmblks;
    *used_bytes = mi.uordblks + mi.hblkhd;
}

static void *trim_thread(void *arg)
{
    heap_trimmer *t = arg;
    pthread_mutex_lock(&t->mu);
    while (!t->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t ns = (int64_t)ts.tv_nsec + (int64_t)t->interval_ms * 1000000;
        ts.tv_sec += (time_t)(ns / 1000000000);
        ts.tv_nsec = (long)(ns % 1000000000);
        while (!t->stop && pthread_cond_timedwait(&t->cv, &t->mu, &ts) != ETIMEDOUT)
            ;
        if (t->stop) break;
        pthread_mutex_unlock(&t->mu);
        size_t free_bytes, used;
        heap_usage(&free_bytes, &used);
        if (free_bytes > t->threshold) {
            malloc_trim(0);
            size_t after, used_after;
            heap_usage(&after, &used_after);
            aff_log(AFF_LOG_DEBUG, "heap trimmed: %zu MiB free in malloc before, %zu MiB in use",
                    free_bytes >> 20, used_after >> 20);
        }
        pthread_mutex_lock(&t->mu);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

int heap_trimmer_start(heap_trimmer **out, uint32_t interval_ms, size_t threshold_bytes,
                       aff_err *err)
{
    *out = NULL;
    heap_trimmer *t = calloc(1, sizeof *t);
    if (!t) return aff__fail(err, AFF_ENOMEM, "out of memory starting the heap trimmer");
    t->interval_ms = interval_ms ? interval_ms : 1000;
    t->threshold = threshold_bytes;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    int e = pthread_create(&t->thread, NULL, trim_thread, t);
    if (e) {
        pthread_cond_destroy(&t->cv);
        pthread_mutex_destroy(&t->mu);
        free(t);
        return aff__fail(err, AFF_EINTERNAL, "cannot start the heap trimmer: %s", strerror(e));
    }
    *out = t;
    return 0;
}

void heap_trimmer_stop(heap_trimmer *t)
{
    if (!t) return;
    pthread_mutex_lock(&t->mu);
    t->stop = true;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
    pthread_join(t->thread, NULL);
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

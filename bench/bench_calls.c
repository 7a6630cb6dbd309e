/* bench_calls.c: see bench_calls.h. */
#include "bench_calls.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint32_t done;
} ctr = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};

static const char *bench_name = "bench";

void bench_set_name(const char *prog)
{
    bench_name = prog;
}

void bench_count_one(void)
{
    pthread_mutex_lock(&ctr.mu);
    ctr.done++;
    pthread_cond_signal(&ctr.cv);
    pthread_mutex_unlock(&ctr.mu);
}

uint32_t bench_done(void)
{
    pthread_mutex_lock(&ctr.mu);
    uint32_t n = ctr.done;
    pthread_mutex_unlock(&ctr.mu);
    return n;
}

void bench_reset(void)
{
    pthread_mutex_lock(&ctr.mu);
    ctr.done = 0;
    pthread_mutex_unlock(&ctr.mu);
}

void bench_wait_for(uint32_t n)
{
    pthread_mutex_lock(&ctr.mu);
    while (ctr.done < n)
        pthread_cond_wait(&ctr.cv, &ctr.mu);
    pthread_mutex_unlock(&ctr.mu);
}

double bench_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void bench_die(const char *what, const aff_err *err)
{
    fprintf(stderr, "%s: %s: %s\n", bench_name, what, err->msg);
    exit(1);
}

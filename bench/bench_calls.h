/*
 * bench_calls.h: what the in-process pipeline benchmarks (bench_pipeline, bench_widgets) share
 * to drive asynchronous calls and time them: a completion counter that callbacks bump from the
 * batcher's threads and the main thread waits on, process CPU time, and a fatal error exit.
 */
#ifndef AFFINITY_BENCH_CALLS_H
#define AFFINITY_BENCH_CALLS_H

#include <stdint.h>

#include "status.h"

/* One call finished (any thread). */
void bench_count_one(void);
/* Calls finished since the last reset (or the start). */
uint32_t bench_done(void);
/* Starts counting from 0 again; only while no call is in flight. */
void bench_reset(void);
/* Blocks until n calls have finished since the last reset. */
void bench_wait_for(uint32_t n);
/* The process's CPU time (all threads), seconds. */
double bench_cpu_s(void);
/* Prints "PROG: what: err->msg" (PROG set by bench_set_name) and exits 1. */
void bench_die(const char *what, const aff_err *err);
void bench_set_name(const char *prog);

#endif

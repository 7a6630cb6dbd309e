/*
 * heap.h: gives freed heap memory back to the operating system.
 *
 * Why: glibc's malloc gives each busy thread its own arena. After an overload storm (tens of
 * thousands of calls queued, refused and freed across ~30 gRPC, batcher and worker threads)
 * the arenas hold tens of megabytes of free but fragmented memory; glibc returns only free
 * space at the top of each heap by itself, so RSS climbs with each storm although nothing is leaked (measured in
 * bench/results/2026-11-30-cpu-2core/overload_storms.md: 153 MB mapped by malloc, 82 MB in
 * use). A trimmer thread checks the free bytes every interval and calls malloc_trim(0) when
 * they pass a threshold.
 */
#ifndef AFFINITY_HEAP_H
#define AFFINITY_HEAP_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct heap_trimmer heap_trimmer;

/* Starts the trimmer thread: every interval_ms, when malloc's free bytes exceed
 * threshold_bytes, malloc_trim(0). Errors: AFF_ENOMEM, AFF_EINTERNAL (no thread). */
int heap_trimmer_start(heap_trimmer **out, uint32_t interval_ms, size_t threshold_bytes,
                       aff_err *err);
/* Stops and frees the trimmer. NULL: no-op. */
void heap_trimmer_stop(heap_trimmer *t);
/* Bytes malloc holds free (in all arenas) and in use, now. */
void heap_usage(size_t *free_bytes, size_t *used_bytes);

#endif

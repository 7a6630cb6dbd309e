/*
 * scratch.h: a per-worker scratch arena for the serving hot path, so that a search makes no
 * heap allocation once its worker has warmed up.
 *
 * A worker thread (a batcher worker) owns one arena and passes it down the call it runs
 * (engine_search, engine_rerank -> backend -> cpu_score/topk). Each call starts with
 * aff_scratch_reset(), then takes the temporary arrays it needs with aff_scratch_take(); all
 * of them stay valid until the next reset, and nothing is freed one by one. When a call needs
 * more than the arena holds, a further block is allocated; the next reset replaces all the
 * blocks by one block of their total size, so the arena grows to the largest call it has
 * served and from then on allocates nothing.
 *
 * Threading: an arena belongs to one thread at a time. Only the thread that owns it may take
 * from it (not the OpenMP threads a backend fans out to: take their buffers before the
 * parallel region). Memory is never returned to the system before aff_scratch_destroy, except
 * that a reset after a call that needed more than AFF_SCRATCH_KEEP bytes shrinks the arena
 * back, so one huge request does not pin its memory for the worker's lifetime.
 */
#ifndef AFFINITY_SCRATCH_H
#define AFFINITY_SCRATCH_H

#include <stddef.h>

#define AFF_SCRATCH_KEEP ((size_t)64 << 20) /* bytes an idle arena may keep */

typedef struct aff_scratch aff_scratch;

/* 0 or AFF_ENOMEM. The arena starts empty (its first use allocates). */
int aff_scratch_create(aff_scratch **out);
void aff_scratch_destroy(aff_scratch *s); /* NULL: no-op */

/* Releases everything taken since the last reset (the memory stays with the arena). */
void aff_scratch_reset(aff_scratch *s);

/* n bytes aligned to 64, valid until the next reset; NULL when out of memory. The contents
 * are undefined; aff_scratch_zero returns zeroed bytes. n == 0 returns a valid pointer. */
void *aff_scratch_take(aff_scratch *s, size_t n);
void *aff_scratch_zero(aff_scratch *s, size_t n);

/* n elements of size bytes each, with overflow checked: NULL on overflow or out of memory. */
void *aff_scratch_array(aff_scratch *s, size_t n, size_t size);

/* For a function with an optional arena: returns s when it is not NULL (without resetting it:
 * the caller's takes stay valid), else a new arena stored in *tmp, which the function destroys
 * when it returns (*tmp stays NULL when s was given). NULL when out of memory. */
aff_scratch *aff_scratch_or_temp(aff_scratch *s, aff_scratch **tmp);

/* Heap allocations the arena has made since it was created (for tests and measurements). */
size_t aff_scratch_allocations(const aff_scratch *s);

#endif

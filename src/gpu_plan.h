/*
 * gpu_plan.h: the host-side planning of the CUDA backend that needs no device — compiling
 * filters for the device, ordering row moves into conflict-free parallel batches, dropping
 * duplicate rows from a write, and growing capacity. Plain C; built with or without CUDA so
 * the unit tests run everywhere. The device formats come from kernels/affinity_kernels.h
 * (plain C11 too).
 */
#ifndef AFFINITY_GPU_PLAN_H
#define AFFINITY_GPU_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "../kernels/affinity_kernels.h"
#include "backend.h"

/* Rows reserved when a table is created without a size hint. */
#define GPU_PLAN_MIN_CAPACITY 1024u

/* The capacity to grow to so that `needed` rows fit: unchanged when they already fit, else
 * the larger of needed and 1.5 × current (at least GPU_PLAN_MIN_CAPACITY), capped at
 * KERNELS_MAX_ROWS. Geometric growth keeps appends amortized O(1) device copies per row. */
uint32_t gpu_plan_capacity(uint32_t current, uint64_t needed);

/* A growable word arena the filters of one batch are compiled into. */
typedef struct gpu_filter_arena {
    uint32_t *words;
    size_t len, cap;
} gpu_filter_arena;

void gpu_filter_arena_free(gpu_filter_arena *a);

/* Compiles filters[0..nq) (NULL array or NULL entry: no filter) into out[0..nq), appending
 * variable parts to the arena (which is reset first). Returns 0, AFF_ENOMEM, or AFF_EINVAL
 * when the arena would pass 2^32 words. kernels_filter_pass(out[i], arena, ...) agrees with
 * backend_filter_matches(filters[i], ...) on every row with a finite price. */
int gpu_plan_encode_filters(const backend_filter *const *filters, uint32_t nq, kernels_filter *out,
                            gpu_filter_arena *arena);

/* Splits the moves (src[i] -> dst[i], to be applied in order) into consecutive batches whose
 * moves can run in parallel with the same result: within a batch no move reads or writes a
 * row an earlier move of the batch writes, and none writes a row an earlier one reads.
 * batch_end[j] is one past the last move of batch j; *n_batches ≤ n. batch_end has n entries.
 * Returns 0 or AFF_ENOMEM. */
int gpu_plan_move_batches(const uint32_t *src, const uint32_t *dst, uint32_t n, uint32_t *batch_end,
                          uint32_t *n_batches);

/* Indices (ascending) of the writes to keep when rows repeat: the last write of each row
 * wins. keep has n entries. Returns 0 or AFF_ENOMEM. */
int gpu_plan_dedupe_rows(const uint32_t *rows, uint32_t n, uint32_t *keep, uint32_t *n_keep);

#endif

/*
 * topk.h: bounded top-k selection on the host, shared by the CPU backend, the GPU backend's
 * host-side merge and the tests' reference.
 *
 * Order: a higher score is better; among equal scores the lower row is better. NaN scores are
 * never accepted. A heap keeps its worst entry at the top so a candidate is rejected with one
 * comparison. A heap's two arrays come from a scratch arena (scratch.h) and live until its
 * next reset; nothing is freed per heap.
 */
#ifndef AFFINITY_TOPK_H
#define AFFINITY_TOPK_H

#include <stdbool.h>
#include <stdint.h>

#include "scratch.h"

typedef struct topk_heap {
    float *scores;
    uint32_t *rows;
    /* NULL, or (topk_init_tagged) per entry a value that moves with it: a capped selection
     * keeps each entry's category here, so counting a category's entries reads nothing else */
    uint32_t *tags;
    uint32_t k; /* capacity */
    uint32_t n; /* entries held, ≤ k */
} topk_heap;

/* An empty heap with room for k entries (k 0 counts as 1), its arrays taken from scratch.
 * Returns 0 or AFF_ENOMEM. */
int topk_init(topk_heap *h, uint32_t k, aff_scratch *scratch);
/* The same with a tag per entry (topk_heap.tags). Returns 0 or AFF_ENOMEM. */
int topk_init_tagged(topk_heap *h, uint32_t k, aff_scratch *scratch);

/* True when (score, row) is better than (other_score, other_row). */
static inline bool topk_better(float score, uint32_t row, float other_score, uint32_t other_row)
{
    return score > other_score || (score == other_score && row < other_row);
}

/* True when pushing (score, row) would change the heap. */
static inline bool topk_would_accept(const topk_heap *h, float score, uint32_t row)
{
    if (score != score) return false;
    if (h->n < h->k) return true;
    return topk_better(score, row, h->scores[0], h->rows[0]);
}

/* Adds (score, row) when topk_would_accept() says so; otherwise does nothing. A tagged heap
 * takes tag with it (ignored by an untagged one). */
void topk_push(topk_heap *h, float score, uint32_t row);
void topk_push_tagged(topk_heap *h, float score, uint32_t row, uint32_t tag);
/* Entry i (< h->n) becomes (score, row[, tag]), which must be better than the entry it
 * replaces (a capped selection swapping a group's worst for a better one of the same group). */
void topk_replace(topk_heap *h, uint32_t i, float score, uint32_t row, uint32_t tag);
/* Pushes every entry of src into dst (untagged heaps). */
void topk_merge(topk_heap *dst, const topk_heap *src);
/* Sorts the entries best first in place (tags along) and returns their number. The heap is no
 * longer a heap afterwards: reset h->n = 0 before reusing it. */
uint32_t topk_sort(topk_heap *h);
/* Sorts parallel arrays best first (score descending, then row ascending). */
void topk_sort_pairs(float *scores, uint32_t *rows, uint32_t n);

#endif

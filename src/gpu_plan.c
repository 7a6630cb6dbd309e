/*
 * gpu_plan.c: owns the CUDA backend's device-free planning (see gpu_plan.h). Keeps: no CUDA,
 * no global state; every allocation is released before return except the caller's arena.
 */
#include "gpu_plan.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

uint32_t gpu_plan_capacity(uint32_t current, uint64_t needed)
{
    if (needed <= current) return current;
    uint64_t grown = (uint64_t)current + current / 2;
    if (grown < GPU_PLAN_MIN_CAPACITY) grown = GPU_PLAN_MIN_CAPACITY;
    if (grown < needed) grown = needed;
    if (grown > KERNELS_MAX_ROWS) grown = KERNELS_MAX_ROWS;
    return (uint32_t)grown;
}

void gpu_filter_arena_free(gpu_filter_arena *a)
{
    if (!a) return;
    free(a->words);
    a->words = NULL;
    a->len = a->cap = 0;
}

/* Appends n words (or n zero words when src is NULL); *off receives their offset. */
static int arena_push(gpu_filter_arena *a, const uint32_t *src, size_t n, uint32_t *off)
{
    if (a->len + n > 0xFFFFFFFFu) return AFF_EINVAL;
    if (a->len + n > a->cap) {
        size_t cap = a->cap ? a->cap : 256;
        while (cap < a->len + n)
            cap *= 2;
        uint32_t *w = realloc(a->words, cap * sizeof *w);
        if (!w) return AFF_ENOMEM;
        a->words = w;
        a->cap = cap;
    }
    if (n && src)
        memcpy(a->words + a->len, src, n * sizeof *src);
    else if (n)
        memset(a->words + a->len, 0, n * sizeof *a->words);
    *off = (uint32_t)a->len;
    a->len += n;
    return 0;
}

int gpu_plan_encode_filters(const backend_filter *const *filters, uint32_t nq, kernels_filter *out,
                            gpu_filter_arena *arena)
{
    int rc = 0;
    arena->len = 0;
    for (uint32_t i = 0; i < nq; i++) {
        const backend_filter *f = filters ? filters[i] : NULL;
        kernels_filter *k = &out[i];
        memset(k, 0, sizeof *k);
        k->price_min = -INFINITY;
        k->price_max = INFINITY;
        if (!f) continue;
        if (f->n_exclude_tags) return AFF_EUNSUPPORTED; /* no device form yet (none-of tags) */
        if (f->available_only) k->flags |= KERNELS_FILTER_AVAILABLE;
        if (!(f->price_min == -INFINITY && f->price_max == INFINITY)) {
            k->flags |= KERNELS_FILTER_PRICE;
            k->price_min = f->price_min;
            k->price_max = f->price_max;
        }
        if (f->category_bits) {
            k->flags |= KERNELS_FILTER_CATEGORY;
            size_t words32 = (size_t)f->category_words * 2;
            if (words32 > 0xFFFFFFFFu) return AFF_EINVAL;
            if ((rc = arena_push(arena, NULL, words32, &k->category_off))) return rc;
            for (uint32_t w = 0; w < f->category_words; w++) {
                arena->words[k->category_off + 2 * w] = (uint32_t)f->category_bits[w];
                arena->words[k->category_off + 2 * w + 1] = (uint32_t)(f->category_bits[w] >> 32);
            }
            k->category_words32 = (uint32_t)words32;
        }
        if (f->n_tags) {
            k->flags |= KERNELS_FILTER_TAGS;
            k->tag_bloom = f->tag_bloom;
            k->n_tags = f->n_tags;
            if ((rc = arena_push(arena, f->tags, f->n_tags, &k->tags_off))) return rc;
        }
        if (f->n_exclude_rows) {
            k->flags |= KERNELS_FILTER_EXCLUDE;
            k->n_exclude = f->n_exclude_rows;
            if ((rc = arena_push(arena, f->exclude_rows, f->n_exclude_rows, &k->exclude_off)))
                return rc;
        }
    }
    return 0;
}

/*
 * A set of row numbers that can be emptied in O(1): a slot belongs to the set only when its
 * generation is the current one, so starting a new batch is one increment. Open addressing
 * with linear probing; a probe stops at the first slot not of the current generation, which is
 * sound because slots only ever turn current within a generation.
 */
typedef struct row_set {
    uint32_t *keys;
    uint32_t *gen;
    uint32_t mask;
    uint32_t cur;
} row_set;

static int row_set_init(row_set *s, uint32_t n)
{
    uint32_t cap = 16;
    while (cap < 2u * n + 2u && cap < 0x80000000u)
        cap <<= 1;
    s->keys = calloc(cap, sizeof *s->keys);
    s->gen = calloc(cap, sizeof *s->gen);
    s->mask = cap - 1;
    s->cur = 1;
    if (!s->keys || !s->gen) {
        free(s->keys);
        free(s->gen);
        return AFF_ENOMEM;
    }
    return 0;
}

static void row_set_free(row_set *s)
{
    free(s->keys);
    free(s->gen);
}

static uint32_t row_hash(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

static bool row_set_has(const row_set *s, uint32_t key)
{
    for (uint32_t i = row_hash(key) & s->mask;; i = (i + 1) & s->mask) {
        if (s->gen[i] != s->cur) return false;
        if (s->keys[i] == key) return true;
    }
}

/* Adds key; returns true when it was already present. */
static bool row_set_add(row_set *s, uint32_t key)
{
    for (uint32_t i = row_hash(key) & s->mask;; i = (i + 1) & s->mask) {
        if (s->gen[i] != s->cur) {
            s->gen[i] = s->cur;
            s->keys[i] = key;
            return false;
        }
        if (s->keys[i] == key) return true;
    }
}

int gpu_plan_move_batches(const uint32_t *src, const uint32_t *dst, uint32_t n, uint32_t *batch_end,
                          uint32_t *n_batches)
{
    row_set reads, writes;
    *n_batches = 0;
    if (n == 0) return 0;
    if (row_set_init(&reads, n)) return AFF_ENOMEM;
    if (row_set_init(&writes, n)) {
        row_set_free(&reads);
        return AFF_ENOMEM;
    }
    uint32_t nb = 0;
    for (uint32_t i = 0; i < n; i++) {
        bool conflict = row_set_has(&writes, src[i]) || row_set_has(&writes, dst[i]) ||
                        row_set_has(&reads, dst[i]);
        if (conflict) {
            batch_end[nb++] = i;
            reads.cur++;
            writes.cur++;
        }
        row_set_add(&reads, src[i]);
        row_set_add(&writes, dst[i]);
    }
    batch_end[nb++] = n;
    *n_batches = nb;
    row_set_free(&reads);
    row_set_free(&writes);
    return 0;
}

int gpu_plan_dedupe_rows(const uint32_t *rows, uint32_t n, uint32_t *keep, uint32_t *n_keep)
{
    row_set seen;
    *n_keep = 0;
    if (n == 0) return 0;
    if (row_set_init(&seen, n)) return AFF_ENOMEM;
    uint32_t m = 0;
    for (uint32_t i = n; i-- > 0;)
        if (!row_set_add(&seen, rows[i])) keep[m++] = i;
    for (uint32_t i = 0; i < m / 2; i++) {
        uint32_t t = keep[i];
        keep[i] = keep[m - 1 - i];
        keep[m - 1 - i] = t;
    }
    *n_keep = m;
    row_set_free(&seen);
    return 0;
}

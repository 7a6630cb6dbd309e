/*
 * scratch.c: the per-worker arena of scratch.h: a list of blocks, bump allocation in the
 * newest, consolidation into one block at reset.
 */
#include "scratch.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "affinity/affinity.h"

#define ALIGN     64
#define MIN_BLOCK ((size_t)64 << 10)

typedef struct block {
    struct block *prev; /* older block; NULL for the first */
    size_t size, used;  /* bytes of data[], bytes taken */
    _Alignas(ALIGN) unsigned char data[];
} block;

struct aff_scratch {
    block *top;         /* newest block (the one taken from); NULL when empty */
    size_t total;       /* sum of the blocks' sizes */
    size_t allocations; /* blocks allocated so far */
};

int aff_scratch_create(aff_scratch **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? AFF_OK : AFF_ENOMEM;
}

static void free_blocks(aff_scratch *s)
{
    for (block *b = s->top, *prev; b; b = prev) {
        prev = b->prev;
        free(b);
    }
    s->top = NULL;
    s->total = 0;
}

void aff_scratch_destroy(aff_scratch *s)
{
    if (!s) return;
    free_blocks(s);
    free(s);
}

static block *new_block(aff_scratch *s, size_t size)
{
    if (size > SIZE_MAX - sizeof(block)) return NULL;
    block *b = aligned_alloc(ALIGN, (sizeof(block) + size + ALIGN - 1) / ALIGN * ALIGN);
    if (!b) return NULL;
    b->prev = s->top;
    b->size = size;
    b->used = 0;
    s->top = b;
    s->total += size;
    s->allocations++;
    return b;
}

void aff_scratch_reset(aff_scratch *s)
{
    if (!s->top) return;
    if (s->top->prev || s->total > AFF_SCRATCH_KEEP) {
        /* Several blocks (the last call outgrew the arena): one block of their total size
         * holds the next call of that size. Out of memory here leaves the arena empty; the
         * next take tries again. */
        size_t want = s->total > AFF_SCRATCH_KEEP ? AFF_SCRATCH_KEEP : s->total;
        free_blocks(s);
        new_block(s, want);
        return;
    }
    s->top->used = 0;
}

void *aff_scratch_take(aff_scratch *s, size_t n)
{
    if (n > SIZE_MAX - ALIGN) return NULL;
    size_t need = (n + ALIGN - 1) / ALIGN * ALIGN;
    block *b = s->top;
    if (!b || b->size - b->used < need) {
        size_t size = s->total > MIN_BLOCK ? s->total : MIN_BLOCK; /* at least double */
        if (size < need) size = need;
        if (!(b = new_block(s, size))) return NULL;
    }
    void *p = b->data + b->used;
    b->used += need;
    return p;
}

void *aff_scratch_zero(aff_scratch *s, size_t n)
{
    void *p = aff_scratch_take(s, n);
    if (p) memset(p, 0, n);
    return p;
}

void *aff_scratch_array(aff_scratch *s, size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size) return NULL;
    return aff_scratch_take(s, n * size);
}

aff_scratch *aff_scratch_or_temp(aff_scratch *s, aff_scratch **tmp)
{
    *tmp = NULL;
    if (s) return s;
    return aff_scratch_create(tmp) == AFF_OK ? *tmp : NULL;
}

size_t aff_scratch_allocations(const aff_scratch *s)
{
    return s->allocations;
}

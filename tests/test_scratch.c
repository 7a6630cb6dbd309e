/*
 * test_scratch.c: the per-worker arena (scratch.h): alignment, no overlap, reuse without heap
 * allocation once warmed up, consolidation after a call that outgrew it, the cap on what an
 * idle arena keeps, zeroing, overflow.
 */
#include <criterion/criterion.h>

#include <stdint.h>
#include <string.h>

#include "affinity/affinity.h"
#include "scratch.h"

static aff_scratch *make(void)
{
    aff_scratch *s = NULL;
    cr_assert_eq(aff_scratch_create(&s), AFF_OK);
    cr_assert_eq(aff_scratch_allocations(s), 0, "an arena starts empty");
    return s;
}

Test(scratch, takes_are_aligned_and_disjoint)
{
    aff_scratch *s = make();
    unsigned char *p[8];
    size_t sizes[8] = {1, 63, 64, 65, 0, 1000, 7, 4096};
    for (int i = 0; i < 8; i++) {
        p[i] = aff_scratch_take(s, sizes[i]);
        cr_assert_not_null(p[i]);
        cr_assert_eq((uintptr_t)p[i] % 64, 0, "take %d is not 64-byte aligned", i);
        memset(p[i], i + 1, sizes[i]);
    }
    for (int i = 0; i < 8; i++)
        for (size_t j = 0; j < sizes[i]; j++)
            cr_assert_eq(p[i][j], i + 1, "take %d was overwritten at byte %zu", i, j);
    aff_scratch_destroy(s);
}

Test(scratch, a_warm_arena_allocates_nothing)
{
    aff_scratch *s = make();
    for (int round = 0; round < 100; round++) {
        aff_scratch_reset(s);
        for (int i = 0; i < 50; i++)
            cr_assert_not_null(aff_scratch_take(s, 100));
    }
    cr_assert_eq(aff_scratch_allocations(s), 1, "one block serves every round");
    aff_scratch_destroy(s);
}

Test(scratch, outgrowing_consolidates_into_one_block_at_reset)
{
    aff_scratch *s = make();
    /* 1 MiB in 64 KiB pieces: more than the first block, so further blocks are added. */
    for (int i = 0; i < 16; i++)
        cr_assert_not_null(aff_scratch_take(s, 64 << 10));
    size_t grown = aff_scratch_allocations(s);
    cr_assert_gt(grown, 1);
    aff_scratch_reset(s); /* one block of the total */
    cr_assert_eq(aff_scratch_allocations(s), grown + 1);
    for (int round = 0; round < 10; round++) {
        for (int i = 0; i < 16; i++)
            cr_assert_not_null(aff_scratch_take(s, 64 << 10));
        aff_scratch_reset(s);
    }
    cr_assert_eq(aff_scratch_allocations(s), grown + 1, "the same load needs no new block");
    aff_scratch_destroy(s);
}

Test(scratch, an_idle_arena_keeps_at_most_the_cap)
{
    aff_scratch *s = make();
    cr_assert_not_null(aff_scratch_take(s, AFF_SCRATCH_KEEP + 1));
    aff_scratch_reset(s); /* shrinks to the cap */
    size_t after_reset = aff_scratch_allocations(s);
    cr_assert_not_null(aff_scratch_take(s, AFF_SCRATCH_KEEP));
    cr_assert_eq(aff_scratch_allocations(s), after_reset, "the cap itself still fits");
    cr_assert_not_null(aff_scratch_take(s, 1));
    cr_assert_eq(aff_scratch_allocations(s), after_reset + 1, "beyond the cap a block is added");
    aff_scratch_destroy(s);
}

Test(scratch, zero_clears_reused_memory)
{
    aff_scratch *s = make();
    memset(aff_scratch_take(s, 256), 0xab, 256);
    aff_scratch_reset(s);
    unsigned char *z = aff_scratch_zero(s, 256);
    cr_assert_not_null(z);
    for (int i = 0; i < 256; i++)
        cr_assert_eq(z[i], 0, "byte %d", i);
    aff_scratch_destroy(s);
}

Test(scratch, overflowing_sizes_fail_cleanly)
{
    aff_scratch *s = make();
    cr_assert_null(aff_scratch_array(s, SIZE_MAX / 2, 4));
    cr_assert_null(aff_scratch_take(s, SIZE_MAX));
    cr_assert_not_null(aff_scratch_take(s, 8), "the arena still works afterwards");
    aff_scratch_destroy(s);
    aff_scratch_destroy(NULL);
}

Test(scratch, or_temp_lends_the_given_arena_or_makes_one)
{
    aff_scratch *s = make(), *tmp = (aff_scratch *)1;
    cr_assert_eq(aff_scratch_or_temp(s, &tmp), s);
    cr_assert_null(tmp);
    aff_scratch *got = aff_scratch_or_temp(NULL, &tmp);
    cr_assert_not_null(got);
    cr_assert_eq(got, tmp);
    aff_scratch_destroy(tmp);
    aff_scratch_destroy(s);
}

/*
 * test_rng.h: the tests' seeded xorshift generator. Each test process has its own state.
 * seed_test() picks a seed (AFF_TEST_SEED replays one), prints "seed N" so a failure can be
 * reproduced, and returns it.
 */
#ifndef AFFINITY_TEST_RNG_H
#define AFFINITY_TEST_RNG_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static inline uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

/* Uniform in [-1, 1] on a grid of 1e-6. */
static inline float rng_unit(void)
{
    return (float)(rng() % 2000001) / 1000000.0f - 1.0f;
}

static inline unsigned seed_test(void)
{
    const char *fixed = getenv("AFF_TEST_SEED");
    unsigned seed = fixed ? (unsigned)strtoul(fixed, NULL, 10)
                          : (unsigned)time(NULL) ^ (unsigned)clock() ^ (unsigned)getpid();
    rng_state = 0x9E3779B97F4A7C15ull ^ seed;
    printf("seed %u\n", seed);
    fflush(stdout);
    return seed;
}

#endif

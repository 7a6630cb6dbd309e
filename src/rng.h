/*
 * rng.h: splitmix64, the project's one deterministic generator for generated data (the demo
 * shop, the load generator's catalogs and arrivals). Small, fast, the same on every platform;
 * a state is one uint64_t owned by its user. Not for anything secret.
 */
#ifndef AFFINITY_RNG_H
#define AFFINITY_RNG_H

#include <math.h>
#include <stdint.h>

typedef struct aff_rng {
    uint64_t s;
} aff_rng;

static inline uint64_t aff_rng_next(aff_rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static inline double aff_rng_uniform(aff_rng *r)
{
    return (double)(aff_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* Standard normal (Box-Muller). */
static inline double aff_rng_normal(aff_rng *r)
{
    double u1 = aff_rng_uniform(r), u2 = aff_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

#endif

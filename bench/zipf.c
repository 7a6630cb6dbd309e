/*
 * zipf.c: Zipf-like popularity over n ids (zipf.h).
 */
#include "zipf.h"

#include <math.h>
#include <stdlib.h>

static uint64_t gcd_u64(uint64_t a, uint64_t b)
{
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

int zipf_init(zipf *z, uint64_t n, double s, uint64_t seed)
{
    z->n = n;
    z->cdf = malloc(n * sizeof(double));
    if (!z->cdf) return -1;
    double acc = 0;
    for (uint64_t i = 0; i < n; i++) {
        acc += 1.0 / pow((double)(i + 1), s);
        z->cdf[i] = acc;
    }
    for (uint64_t i = 0; i < n; i++)
        z->cdf[i] /= acc;
    z->mult = 2654435761u % n;
    if (z->mult == 0) z->mult = 1;
    while (gcd_u64(z->mult, n) != 1)
        z->mult++;
    z->offset = seed % n;
    return 0;
}

uint64_t zipf_draw(const zipf *z, aff_rng *r)
{
    double u = aff_rng_uniform(r);
    uint64_t lo = 0, hi = z->n - 1;
    while (lo < hi) {
        uint64_t mid = (lo + hi) / 2;
        if (z->cdf[mid] < u)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (lo * z->mult + z->offset) % z->n;
}

void zipf_free(zipf *z)
{
    free(z->cdf);
    z->cdf = NULL;
}

/*
 * zipf.h: Zipf-like popularity over n ids, as the load generator (affinity_load) and the
 * widgets benchmark (bench_widgets) draw items and users: rank r is drawn with probability
 * ~ 1/(r+1)^s, and ranks are scattered over ids by a fixed permutation so that popular ids are
 * not simply 0, 1, 2.
 */
#ifndef AFFINITY_BENCH_ZIPF_H
#define AFFINITY_BENCH_ZIPF_H

#include <stdint.h>

#include "rng.h"

typedef struct zipf {
    double *cdf;
    uint64_t n, mult, offset;
} zipf;

/* -1 when out of memory. n ≥ 1. */
int zipf_init(zipf *z, uint64_t n, double s, uint64_t seed);
uint64_t zipf_draw(const zipf *z, aff_rng *r);
void zipf_free(zipf *z);

#endif

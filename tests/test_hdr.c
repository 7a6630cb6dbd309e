/* The load generator's latency histogram (bench/hdr.c) against exact sorted percentiles. */
#include "../bench/hdr.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

Test(hdr, buckets_cover_values_contiguously)
{
    uint64_t prev_hi = 0;
    for (uint32_t b = 0; b < HDR_BUCKETS - 1; b++) {
        uint64_t lo, hi;
        hdr_bucket_range(b, &lo, &hi);
        cr_assert(b == 0 || lo == prev_hi + 1, "bucket %u starts at %llu", b,
                  (unsigned long long)lo);
        cr_assert_eq(hdr_bucket_of(lo), b);
        cr_assert_eq(hdr_bucket_of(hi), b);
        cr_assert(hi - lo <= lo / 128 + 1, "bucket %u too wide", b);
        prev_hi = hi;
    }
    cr_assert_eq(hdr_bucket_of(UINT64_MAX), HDR_BUCKETS - 1);
}

Test(hdr, percentiles_within_one_percent_of_exact)
{
    unsigned seed = (unsigned)time(NULL);
    printf("hdr seed %u\n", seed);
    srand(seed);
    enum { N = 20000 };
    static uint64_t v[N];
    hdr_hist *h = malloc(sizeof(*h)), *h2 = malloc(sizeof(*h2));
    hdr_init(h);
    hdr_init(h2);
    for (int i = 0; i < N; i++) {
        /* Log-uniform from 1 us to 1 s, like latencies. */
        double e = 3.0 + 6.0 * rand() / (double)RAND_MAX;
        v[i] = (uint64_t)(pow(10.0, e));
        hdr_record(i % 2 ? h : h2, v[i]);
    }
    hdr_merge(h, h2);
    qsort(v, N, sizeof(v[0]), cmp_u64);
    cr_assert_eq(h->total, N);
    cr_assert_eq(hdr_value_at(h, 1.0), v[N - 1]);
    cr_assert_eq(hdr_value_at(h, 0.0), v[0]);
    const double qs[] = {0.5, 0.9, 0.99, 0.999};
    for (size_t i = 0; i < 4; i++) {
        uint64_t exact = v[(size_t)(qs[i] * N + 0.999999) - 1];
        uint64_t got = hdr_value_at(h, qs[i]);
        cr_assert(got >= exact && got <= exact + exact / 100 + 1, "q %.3f exact %llu got %llu",
                  qs[i], (unsigned long long)exact, (unsigned long long)got);
    }
    hdr_init(h2);
    cr_assert_eq(hdr_value_at(h2, 0.99), 0);
    free(h);
    free(h2);
}

/*
 * hdr.h: a small latency histogram with log-linear buckets (the HDR histogram idea).
 *
 * Values are non-negative integers (the load generator records nanoseconds). Values below
 * 2^HDR_SUB_BITS get one bucket each; above that every power of two is split into
 * 2^HDR_SUB_BITS equal buckets, so a reported value is within 1/128 (0.8 %) of the truth.
 * Values up to 2^HDR_MAX_EXP are recorded; larger ones are clamped into the last bucket
 * (the exact maximum is kept separately). Not thread-safe: each thread owns one histogram
 * and the results are merged with hdr_merge().
 */
#ifndef AFFINITY_BENCH_HDR_H
#define AFFINITY_BENCH_HDR_H

#include <stdint.h>

#define HDR_SUB_BITS 7
#define HDR_MAX_EXP  42 /* 2^42 ns = 73 minutes */
#define HDR_BUCKETS  ((HDR_MAX_EXP - HDR_SUB_BITS + 2) << HDR_SUB_BITS)

typedef struct hdr_hist {
    uint64_t counts[HDR_BUCKETS];
    uint64_t total;
    uint64_t min, max;
    double sum;
} hdr_hist;

/* Resets h to empty. */
void hdr_init(hdr_hist *h);
void hdr_record(hdr_hist *h, uint64_t value);
/* Adds every count of src into dst. */
void hdr_merge(hdr_hist *dst, const hdr_hist *src);
/* The value at quantile q (0..1): the highest value equivalent to the bucket holding the
 * ceil(q * total)-th smallest sample, clamped to the exact maximum; 0 when empty. */
uint64_t hdr_value_at(const hdr_hist *h, double q);
double hdr_mean(const hdr_hist *h);
/* Bucket index of a value and the inclusive value range a bucket covers (for tests). */
uint32_t hdr_bucket_of(uint64_t value);
void hdr_bucket_range(uint32_t bucket, uint64_t *lo, uint64_t *hi);

#endif

/*
 * hdr.c: owns the log-linear bucket arithmetic of hdr.h. No allocation, no locks.
 */
#include "hdr.h"

#include <string.h>

void hdr_init(hdr_hist *h)
{
    memset(h, 0, sizeof(*h));
    h->min = UINT64_MAX;
}

uint32_t hdr_bucket_of(uint64_t value)
{
    const uint64_t sub = (uint64_t)1 << HDR_SUB_BITS;
    if (value < sub) return (uint32_t)value;
    int msb = 63 - __builtin_clzll(value);
    if (msb > HDR_MAX_EXP) return HDR_BUCKETS - 1;
    int shift = msb - HDR_SUB_BITS;
    uint64_t top = value >> shift; /* sub .. 2*sub-1 */
    return (uint32_t)(((uint64_t)(shift + 1) << HDR_SUB_BITS) + (top - sub));
}

void hdr_bucket_range(uint32_t bucket, uint64_t *lo, uint64_t *hi)
{
    const uint64_t sub = (uint64_t)1 << HDR_SUB_BITS;
    if (bucket < sub) {
        *lo = *hi = bucket;
        return;
    }
    int shift = (int)(bucket >> HDR_SUB_BITS) - 1;
    uint64_t top = (bucket & (sub - 1)) + sub;
    *lo = top << shift;
    *hi = ((top + 1) << shift) - 1;
}

void hdr_record(hdr_hist *h, uint64_t value)
{
    h->counts[hdr_bucket_of(value)]++;
    h->total++;
    h->sum += (double)value;
    if (value < h->min) h->min = value;
    if (value > h->max) h->max = value;
}

void hdr_merge(hdr_hist *dst, const hdr_hist *src)
{
    if (src->total == 0) return;
    for (uint32_t i = 0; i < HDR_BUCKETS; i++)
        dst->counts[i] += src->counts[i];
    dst->total += src->total;
    dst->sum += src->sum;
    if (src->min < dst->min) dst->min = src->min;
    if (src->max > dst->max) dst->max = src->max;
}

uint64_t hdr_value_at(const hdr_hist *h, double q)
{
    if (h->total == 0) return 0;
    if (q <= 0) return h->min;
    if (q >= 1) return h->max;
    uint64_t rank = (uint64_t)(q * (double)h->total);
    if ((double)rank < q * (double)h->total) rank++;
    if (rank == 0) rank = 1;
    uint64_t seen = 0;
    for (uint32_t i = 0; i < HDR_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            uint64_t lo, hi;
            hdr_bucket_range(i, &lo, &hi);
            if (hi > h->max) hi = h->max;
            if (hi < h->min) hi = h->min;
            return hi;
        }
    }
    return h->max;
}

double hdr_mean(const hdr_hist *h)
{
    return h->total ? h->sum / (double)h->total : 0.0;
}

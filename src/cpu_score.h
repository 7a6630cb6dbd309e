/*
 * cpu_score.h: the CPU backend's reduced-precision scan with exact fp32 re-ranking.
 *
 * A table scored in bf16 or int8 keeps a compact copy of its vectors (cpu_codes) and, per row,
 * the numbers that bound the scan's error. A search scans the compact copy, keeps every row
 * that could still be in the fp32 top-k, and re-scores only those rows from the fp32 vectors.
 *
 * The candidate rule (docs/cpu-precision.md). For query q and row x, with q~ and x~ their
 * rounded copies (int8: per-vector scale s times a code, round to nearest; bf16: round to nearest
 * even), the scan computes a(x) = q~ . x~ (int8: s_q s_x times the exact integer dot of the
 * codes; bf16: an fp32 dot) and a bound
 *   e(x) = |q - q~|_2 |x|_2 + |q~|_2 |x - x~|_2 + (2d + 16) 2^-24 |q|_2 |x|_2,
 * so that |q.x - a(x)| <= e(x): q.x - q~.x~ = (q - q~).x + q~.(x - x~), each term bounded by
 * Cauchy-Schwarz with rounding errors measured (per row at write time, per query at search
 * time), not assumed; the last term covers the float accumulation error of both the scan and the
 * fp32 reference. Let L be the k-th largest lower bound a - e over the rows that pass the filter.
 * A row with a + e < L scores below k rows for certain, so the candidates are the passing rows
 * with a + e >= L; their fp32 scores, ordered as topk.h orders them (score, then lower row), give
 * the fp32 top-k, ties included. (For L2 the bounds carry through score = 2 q.x - |x|^2 - |q|^2.)
 * Inputs are finite; the bf16 instructions may flush subnormal inputs, an error below 2^-126 per
 * element that the slack term does not claim to cover.
 *
 * Kernels: portable C (any CPU), AVX2+FMA (int8 through VPMADDUBSW, bf16 widened to fp32) and
 * AVX-512 (int8 through VPDPBUSD, bf16 through VDPBF16PS), chosen at run time from the CPU's
 * features, never above the caller's cap.
 *
 * Threading: cpu_codes is written only under the table's write lock (backend.h); searches
 * read it concurrently.
 */
#ifndef AFFINITY_CPU_SCORE_H
#define AFFINITY_CPU_SCORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "status.h"

/* The widest kernel set this CPU runs, at most `cap` (AUTO: no cap). */
backend_cpu_isa cpu_isa_detect(backend_cpu_isa cap);
const char *cpu_isa_name(backend_cpu_isa isa);
const char *cpu_precision_name(backend_precision p);
/* Parses "fp32", "bf16", "int8" or "auto". Returns 0 or AFF_EINVAL. */
int cpu_precision_parse(const char *s, backend_precision *out);
/* The precision AUTO stands for on this ISA: int8 where a vector kernel exists, else fp32. */
backend_precision cpu_precision_default(backend_cpu_isa isa);

/* A compact copy of a table's vectors: rows in blocks of 8, each block `steps` slots of 32
 * bytes (int8: 4 dims of 8 rows as unsigned code + range + 1; bf16: 2 dims of 8 rows), plus per row
 * the scale, |x|_2 and |x - x~|_2 that the bounds use. Owns its arrays. */
typedef struct cpu_codes {
    backend_precision precision; /* BF16 or INT8 */
    uint32_t dim;
    uint32_t steps;    /* 32-byte slots per block: ceil(dim / 4) or ceil(dim / 2) */
    int code_range;    /* int8: codes lie in [-code_range, code_range], stored + code_range + 1 */
    uint32_t capacity; /* rows, a multiple of 8 */
    uint8_t *blocks;   /* capacity / 8 blocks of steps * 32 bytes, 64-byte aligned */
    float *scale;      /* int8: s_x (x~ = s_x c); bf16: 1 */
    float *norm;       /* |x|_2, rounded up */
    float *err;        /* |x - x~|_2, rounded up */
} cpu_codes;

/* Sets up an empty copy (no rows). precision is BF16 or INT8; isa: the kernels that will scan
 * it (int8 codes take 7 bits for the AVX2 kernel, 8 for the others; every kernel reads both). */
void cpu_codes_init(cpu_codes *c, backend_precision precision, uint32_t dim, backend_cpu_isa isa);
void cpu_codes_free(cpu_codes *c);
/* Grows the capacity to at least `rows`. Returns 0 or AFF_ENOMEM (then unchanged). */
int cpu_codes_reserve(cpu_codes *c, uint32_t rows);
/* Encodes fp32 vector x (dim finite floats) into row `row` < capacity. */
void cpu_codes_set(cpu_codes *c, uint32_t row, const float *x);
/* Copies row src over row dst. */
void cpu_codes_copy(cpu_codes *c, uint32_t dst, uint32_t src);
/* Bytes the first `rows` rows occupy (capacity past the written rows is never touched, so
 * never resident). */
uint64_t cpu_codes_bytes(const cpu_codes *c, uint32_t rows);
/* Bytes per row, for documentation and benchmarks. */
double cpu_codes_bytes_per_row(backend_precision p, uint32_t dim);

/* Dot products of one fp32 query with n consecutive fp32 rows (the exact scorer). */
void cpu_dot_rows(const float *q, const float *rows, uint32_t n, uint32_t dim, float *out);
/* |x|^2 as the L2 scores use it (one definition for the stored norms and the queries). */
float cpu_sq_norm(const float *x, uint32_t dim);

/* The scan's view of one row for query q (inner product), computed by the kernels of `isa`:
 * *approx = a(x) and *bound = e(x) of the rule above. For tests and diagnostics. Returns 0,
 * AFF_ENOMEM, or AFF_EINTERNAL if the kernel did not report the row. */
int cpu_score_bound(const cpu_codes *c, backend_cpu_isa isa, const float *q, uint32_t row,
                    float *approx, float *bound);

/* The rows of each category, kept beside a table's attribute column so a query whose filter
 * admits few rows (a promotion of one category, a category page) reads only those rows in
 * fp32 instead of scanning the whole table: their exact scores, computed as the re-rank
 * computes them, so the result is the same as the scan's. Lists are unordered (a delete swaps
 * the last entry into the hole); `slot` says where each row sits in its category's list.
 * Maintained by the table's writer (under its write lock), read by searches. When a list
 * cannot grow (out of memory) the index is marked broken and searches scan as before (and
 * read categories from the attributes). */
typedef struct cpu_cat_rows {
    uint32_t **rows;   /* per category id: its rows */
    uint32_t *n, *cap; /* per category id */
    uint32_t n_cats;   /* category ids 0..n_cats-1 have a (possibly empty) list */
    uint32_t *slot;    /* per row: its index in rows[category] */
    /* Per row: its category (attrs[row].category), the compact copy the scan reads: a row it
     * reports costs 4 bytes of this column, not a cache line of attributes. */
    uint32_t *cat;
    uint32_t slot_cap; /* rows slot and cat have room for */
    bool broken;
} cpu_cat_rows;

/* Adds `row` (< AFF limits, not yet listed) to category `cat`'s list. Returns 0 or AFF_ENOMEM
 * (then the index is broken: searches no longer use it). */
int cpu_cat_rows_add(cpu_cat_rows *x, uint32_t row, uint32_t cat);
/* Removes `row`, listed under category `cat`. */
void cpu_cat_rows_remove(cpu_cat_rows *x, uint32_t row, uint32_t cat);
void cpu_cat_rows_free(cpu_cat_rows *x);
/* Bytes the index holds. */
uint64_t cpu_cat_rows_bytes(const cpu_cat_rows *x);

/* Everything a reduced-precision search reads. Borrowed for the call. */
typedef struct cpu_search_table {
    const cpu_codes *codes;
    backend_cpu_isa isa;            /* kernels to use (already detected, not AUTO) */
    const float *rows;              /* count × dim fp32 vectors: the exact scores */
    const float *sq_norms;          /* L2: |x|^2 per row (capacity entries); IP: NULL */
    const backend_row_attrs *attrs; /* count entries */
    /* Per block of 8 rows, the OR of backend_tag_bit(category) over its rows (a superset is
     * fine), or NULL: lets a query with a category filter skip blocks that hold none of its
     * categories before any row of them is looked at (narrow filters report far fewer rows). */
    const uint64_t *block_cats;
    /* The rows of each category, or NULL: a query whose filter admits categories holding at
     * most count / CPU_POSTING_SHARE rows reads those rows alone (exactly) instead of taking
     * part in the scan. */
    const cpu_cat_rows *cat_rows;
    uint32_t count;
    int threads;
} cpu_search_table;

/* The block_cats entry for rows [8b, 8b + 8) ∩ [0, count) of attrs. */
uint64_t cpu_block_cats(const backend_row_attrs *attrs, uint32_t b, uint32_t count);

/* A query reads its categories' rows instead of scanning when they are at most 1/this of the
 * table (a row read this way costs about what the int8 scan pays for 4 rows: 75 instructions
 * against 20 at d = 128, N = 100k)... */
#define CPU_POSTING_SHARE 10u
/* ...or, when its vector is scanned anyway for another query of the batch (same_as), at most
 * 1/this: riding on that scan costs a heap and reports, which at N = 100k cost about as much as
 * reading 3% of the rows (bench/results/2026-11-30-cpu-2core/pipeline.md, fourth session). */
#define CPU_POSTING_RIDE 32u

/* The statistics of one search, for tests and benchmarks (may be NULL). */
typedef struct cpu_search_stats {
    uint64_t candidates; /* rows re-ranked in fp32, over all queries */
    uint64_t reported;   /* rows the scan could not rule out on first sight (before L rose) */
    uint64_t posted;     /* rows scored from category lists (queries that did not scan) */
} cpu_search_stats;

/* Runs the batch: query i writes its hits at offsets[i] as backend.h describes, in the order of
 * topk.h, with fp32 scores. Returns 0 or AFF_ENOMEM. */
int cpu_score_search(const cpu_search_table *t, const backend_search *s, const size_t *offsets,
                     cpu_search_stats *stats, aff_err *err);

#endif

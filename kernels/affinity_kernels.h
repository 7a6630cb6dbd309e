/*
 * affinity_kernels.h: the only face of kernels/ — a GPU-resident catalog and the batched exact
 * top-k search, re-rank scoring and benchmark timers over it, and the iALS training solves
 * (kernels_als). Plain C11; no CUDA type leaks out.
 *
 * Objects: a kernels_device (one CUDA device, opened once), kernels_table (one collection's
 * rows on that device: vectors in fp16 or fp32, padded rows, squared norms and attribute
 * columns) and kernels_workspace (one stream, one cuBLAS handle, pinned host buffers and device
 * scratch that grow to the largest batch seen and are then reused: no allocation per batch).
 *
 * Errors: every function that can fail returns 0 or a negative aff_status and fills a
 * kernels_err. A CUDA or cuBLAS failure is AFF_EDEVICE (AFF_ENOMEM when device memory ran
 * out), never an abort. Threading: a table is used by one writer at a time (the engine's lock);
 * a workspace by one caller at a time; different workspaces run concurrently on their streams.
 *
 * The second half of the header is host-side planning and encoding that the .cu files and the
 * host tests share (k buckets, tiles, segments, ordered keys, the filter predicate); it is
 * written once, as static inline functions, so the device and the CPU tests run the same code.
 */
#ifndef AFFINITY_KERNELS_H
#define AFFINITY_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "affinity/affinity.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__CUDACC__)
#define KERNELS_HD __host__ __device__ __forceinline__
#else
#define KERNELS_HD static inline
#endif

/* Largest k any selection kernel supports (the engine's AFF_MAX_K is smaller). */
#define KERNELS_MAX_K 2048u
/* Largest k served by the shared-memory bitonic block selection; above it, radix select. */
#define KERNELS_BLOCK_SELECT_MAX_K 256u
/* Tags stored per row (equal to AFF_MAX_TAGS_PER_ITEM). */
#define KERNELS_MAX_TAGS 16u
/* Rows are addressed by uint32; UINT32_MAX is reserved as the "no row" sentinel. */
#define KERNELS_MAX_ROWS 0xFFFFFFFEu

typedef struct kernels_err {
    int code;
    /* true when the failure was a sticky device fault (illegal address, launch failure, ECC,
     * ...): the CUDA context is unusable from then on and every later call fails too. */
    bool context_lost;
    char msg[256];
} kernels_err;

typedef struct kernels_device kernels_device;
typedef struct kernels_table kernels_table;
typedef struct kernels_workspace kernels_workspace;

typedef enum kernels_metric {
    KERNELS_METRIC_IP = 0, /* score = q·x */
    KERNELS_METRIC_L2 = 1, /* score = -(|q - x|²) = 2 q·x - |x|² - |q|² */
} kernels_metric;

typedef enum kernels_storage {
    KERNELS_STORAGE_FP16 = 0,
    KERNELS_STORAGE_FP32 = 1,
} kernels_storage;

typedef struct kernels_device_info {
    char name[128];
    int ordinal;
    int sm_count;
    int cc_major, cc_minor;
    uint64_t memory_total; /* bytes */
    uint64_t memory_free;  /* bytes, at the time of the call */
} kernels_device_info;

/* ---- device ------------------------------------------------------------------------------- */

/* Number of CUDA devices. Any runtime error (no driver, "driver version is insufficient", ...)
 * is AFF_EDEVICE with the runtime's reason; the caller treats it as "no GPU". */
int kernels_device_count(int *count, kernels_err *err);
/* Opens device `ordinal`: selects it and creates its primary context. */
int kernels_device_open(kernels_device **out, int ordinal, kernels_err *err);
void kernels_device_close(kernels_device *d);
/* Name, SM count and memory of the device. Memory figures are best effort (0 on error). */
void kernels_device_describe(kernels_device *d, kernels_device_info *out);

/* ---- tables ------------------------------------------------------------------------------- */

/* The attributes of one row as the kernels store them (mirrors backend_row_attrs). */
typedef struct kernels_row_attrs {
    uint32_t category;
    uint32_t n_tags;                 /* ≤ KERNELS_MAX_TAGS */
    uint32_t tags[KERNELS_MAX_TAGS]; /* sorted ascending */
    uint64_t tag_bloom;
    float price;
    uint8_t available;
} kernels_row_attrs;

/* Creates an empty table of `dim` (1..AFF_MAX_DIM) columns with room for `capacity` rows. */
int kernels_table_create(kernels_table **out, kernels_device *d, uint32_t dim,
                         kernels_storage storage, kernels_metric metric, uint32_t capacity,
                         kernels_err *err);
void kernels_table_destroy(kernels_table *t);
uint32_t kernels_table_count(const kernels_table *t);
uint32_t kernels_table_capacity(const kernels_table *t);
uint32_t kernels_table_dim(const kernels_table *t);
/* Device bytes held by the table (rows at capacity, columns, write staging). */
uint64_t kernels_table_bytes(const kernels_table *t);
/* Device bytes one row occupies at capacity: padded vector, norm and attribute columns; a
 * table whose rows carry tags adds 4 × KERNELS_MAX_TAGS bytes a row for the tag column. */
uint64_t kernels_table_row_bytes(uint32_t dim, kernels_storage storage);
/* Grows capacity to `capacity` rows (no-op when already that large), copying the live rows
 * device to device. On failure the table is unchanged; out of memory is AFF_ENOMEM with the
 * bytes that were needed in the message. */
int kernels_table_reserve(kernels_table *t, uint32_t capacity, kernels_err *err);
/* Writes n rows (all distinct, each < capacity) from host vectors (n × dim floats) and attrs,
 * then sets the row count to new_count. Synchronous. */
int kernels_table_write(kernels_table *t, const uint32_t *rows, uint32_t n, const float *vectors,
                        const kernels_row_attrs *attrs, uint32_t new_count, kernels_err *err);
/* Copies row src[i] over row dst[i] for all i in parallel, device to device (vector, norm and
 * attributes). The caller guarantees no dst is another move's src or dst (see
 * gpu_plan_move_batches); then sets the row count to new_count. Synchronous. */
int kernels_table_move(kernels_table *t, const uint32_t *src, const uint32_t *dst, uint32_t n,
                       uint32_t new_count, kernels_err *err);
/* Copies the stored vectors of n rows (each < count) to out (n × dim floats). Synchronous.
 * Safe to call from several threads at once on one table (the engine calls it under its shared
 * read lock, concurrently with searches): reads take the table's read mutex, which guards the
 * read staging buffer and the table's stream; writes and moves are the engine's exclusive
 * callers. */
int kernels_table_read(kernels_table *t, const uint32_t *rows, uint32_t n, float *out,
                       kernels_err *err);
/* Benchmarks: appends rows count..count+n-1 filled on the device with kernels_bench_value()
 * (seeded, reproducible by other tools) and no attributes. */
int kernels_table_fill_random(kernels_table *t, uint32_t n, uint64_t seed, kernels_err *err);

/* ---- search ------------------------------------------------------------------------------- */

/* A backend_filter compiled for the device (see gpu_plan_encode_filters). Variable parts live
 * in a word arena shared by the batch: category bits as 32-bit words (bit c in word c >> 5),
 * tags and excluded rows sorted ascending. flags == 0 matches every row. */
typedef struct kernels_filter {
    uint32_t flags; /* KERNELS_FILTER_* */
    uint32_t category_off, category_words32;
    uint32_t tags_off, n_tags;
    uint32_t exclude_off, n_exclude;
    uint32_t reserved;
    uint64_t tag_bloom;
    float price_min, price_max;
} kernels_filter;

#define KERNELS_FILTER_AVAILABLE 0x1u
#define KERNELS_FILTER_PRICE     0x2u
#define KERNELS_FILTER_CATEGORY  0x4u
#define KERNELS_FILTER_TAGS      0x8u
#define KERNELS_FILTER_EXCLUDE   0x10u

/* How a batch is searched (see kernels_choose_path). */
typedef enum kernels_path {
    KERNELS_PATH_AUTO = 0,  /* kernels_choose_path decides */
    KERNELS_PATH_TILED = 1, /* cuBLAS GEMM tiles + selection + merge (any B, k) */
    KERNELS_PATH_FUSED = 2, /* one scan kernel + merge (B ≤ KERNELS_FUSED_MAX_B, k bucket ≤
                               KERNELS_FUSED_MAX_K) */
} kernels_path;

#define KERNELS_FUSED_MAX_B 32u
#define KERNELS_FUSED_MAX_K 128u

/* One batch: query i writes up to k[i] hits, best first, at offset k[0] + ... + k[i-1] in
 * out_rows/out_scores, and their number in out_counts[i]. Ties are broken by lower row. */
typedef struct kernels_search_args {
    const float *queries; /* nq × dim */
    uint32_t nq;
    const uint32_t *k;             /* per query, 1..KERNELS_MAX_K */
    const kernels_filter *filters; /* nq entries, or NULL: no filters */
    const uint32_t *arena;         /* filter arena */
    uint32_t arena_words;
    uint32_t *out_rows;
    float *out_scores;
    uint32_t *out_counts;
    float *elapsed_ms; /* if not NULL: device time of the whole call (CUDA events) */
    kernels_path path; /* AUTO (0) unless a benchmark or test forces one; a forced FUSED on a
                          chunk it cannot serve is AFF_EINVAL */
} kernels_search_args;

/* Creates a workspace planned for batches of up to max_batch queries (larger calls are cut
 * into chunks). Scratch grows on first use to the largest batch, dim and k seen. */
int kernels_workspace_create(kernels_workspace **out, kernels_device *d, uint32_t max_batch,
                             kernels_err *err);
void kernels_workspace_destroy(kernels_workspace *ws);
uint64_t kernels_workspace_bytes(const kernels_workspace *ws);

/* Exact top-k of every query over rows 0..count-1 of t. Synchronous. */
int kernels_search(kernels_workspace *ws, const kernels_table *t, const kernels_search_args *a,
                   kernels_err *err);
/* Gather-and-dot: scores[j] for j in offsets[i]..offsets[i+1]-1 is query i's score against
 * rows[j] (each < count), with the table's metric as in kernels_search. Synchronous. */
int kernels_score(kernels_workspace *ws, const kernels_table *t, const float *queries, uint32_t nq,
                  const uint32_t *offsets, const uint32_t *rows, float *scores, kernels_err *err);

/* ---- training (als.cu) -------------------------------------------------------------------- */

/* One iALS training job's state on the device: both orientations of the interaction matrix,
 * per-row regularisation, both factor matrices, the Gramian and scratch (see als.cu). Created
 * per job, used by one thread, destroyed at its end; it runs on its own stream beside search. */
typedef struct kernels_als kernels_als;

/* The job, all host arrays, borrowed for the duration of kernels_als_create. The user side is
 * users x items in compressed rows (user_ptr: n_users + 1 offsets), the item side its
 * transpose; confidences and per-row lambdas are already computed (src/als.c). */
typedef struct kernels_als_problem {
    uint32_t n_users, n_items;
    uint32_t d; /* 1..512 */
    const uint64_t *user_ptr;
    const uint32_t *user_items;
    const float *user_conf;
    const uint64_t *item_ptr;
    const uint32_t *item_users;
    const float *item_conf;
    const float *user_lambda, *item_lambda; /* n_users, n_items */
    float alpha0;
    uint32_t cg_steps;          /* ≥ 1: CG steps per row solve */
    const float *user_factors;  /* initial values, n_users x d */
    const float *item_factors;  /* initial values, n_items x d */
} kernels_als_problem;

/* Uploads the problem. AFF_EINVAL for a d out of range or an empty side; AFF_ENOMEM when the
 * device memory does not suffice. */
int kernels_als_create(kernels_als **out, kernels_device *d, const kernels_als_problem *p,
                       kernels_err *err);
void kernels_als_destroy(kernels_als *a);
/* Solves every user row (users = true) or item row against the other side. Synchronous. */
int kernels_als_half_epoch(kernels_als *a, bool users, kernels_err *err);
/* The objective of src/als.h, not yet divided by the number of entries. Synchronous. */
int kernels_als_objective(kernels_als *a, double *sum, kernels_err *err);
/* Copies both factor matrices down. Synchronous. */
int kernels_als_read(kernels_als *a, float *user_factors, float *item_factors, kernels_err *err);

/* ---- benchmark timers (CUDA events) -------------------------------------------------------- */

/* Device-to-device copy bandwidth: median over iters copies of `bytes`, in GB/s counting read
 * plus write (2 × bytes per copy). */
int kernels_bench_copy_bandwidth(kernels_device *d, uint64_t bytes, int iters, double *gbps,
                                 kernels_err *err);
/* cuBLAS fp16-in/fp32-accumulate GEMM rate for an m×n×k product, median over iters, TFLOP/s. */
int kernels_bench_gemm_rate(kernels_device *d, int m, int n, int k, int iters, double *tflops,
                            kernels_err *err);

/* ---- shared host/device helpers ---------------------------------------------------------------
 */

/* The value at flat index i (= row * dim + col) of a benchmark data set with this seed: a
 * 32-bit integer hash mapped to [-1, 1). bench/torch_baseline.py reproduces it exactly. */
KERNELS_HD float kernels_bench_value(uint64_t seed, uint64_t i)
{
    uint32_t x = (uint32_t)(i * 0x9E3779B1u) ^ (uint32_t)(i >> 32) ^ (uint32_t)seed;
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    x ^= x >> 16;
    return (float)(x >> 8) * (1.0f / 8388608.0f) - 1.0f;
}

/* Bucket (a power of two, 32..KERNELS_MAX_K) a k is rounded up to; 0 when k is 0 or too big. */
KERNELS_HD uint32_t kernels_k_bucket(uint32_t k)
{
    if (k == 0 || k > KERNELS_MAX_K) return 0;
    uint32_t b = 32;
    while (b < k)
        b <<= 1;
    return b;
}

/*
 * The path for one chunk of nb queries whose largest k rounds to k_bucket, over n_rows rows.
 *
 * PLACEHOLDER TABLE, unverified on a device: no GPU has run either path yet. The fused scan
 * reads the catalog once and writes no score tile, so it should win where the tiled path is
 * bound by its per-tile launches and score traffic (small B); the GEMM wins as B grows (the
 * fused scan does B·dpad FMAs per row on CUDA cores, not tensor cores). The first device run
 * (bench_kernels --path tiled|fused over B × k) replaces these bounds with measured ones.
 */
#define KERNELS_CHOOSE_FUSED_MAX_B    32u  /* placeholder */
#define KERNELS_CHOOSE_FUSED_MAX_K    128u /* placeholder (the fused kernel's own limit) */
#define KERNELS_CHOOSE_FUSED_MIN_ROWS 1u   /* placeholder */

KERNELS_HD kernels_path kernels_choose_path(uint32_t nb, uint32_t k_bucket, uint32_t n_rows)
{
    if (nb >= 1 && nb <= KERNELS_CHOOSE_FUSED_MAX_B && nb <= KERNELS_FUSED_MAX_B && k_bucket >= 1 &&
        k_bucket <= KERNELS_CHOOSE_FUSED_MAX_K && k_bucket <= KERNELS_FUSED_MAX_K &&
        n_rows >= KERNELS_CHOOSE_FUSED_MIN_ROWS)
        return KERNELS_PATH_FUSED;
    return KERNELS_PATH_TILED;
}

/* Blocks of the fused scan over n_rows: about two per SM, each a slice of whole 128-row steps.
 * *seg receives the rows per block. */
KERNELS_HD uint32_t kernels_plan_fused_blocks(uint32_t n_rows, uint32_t sm_count, uint32_t *seg)
{
    uint64_t steps = ((uint64_t)n_rows + 127u) / 128u;
    uint64_t want = 2u * (uint64_t)(sm_count ? sm_count : 1);
    if (steps == 0) steps = 1;
    if (want > steps) want = steps;
    uint64_t per = (steps + want - 1) / want; /* steps per block */
    *seg = (uint32_t)(per * 128u);
    return (uint32_t)((steps + per - 1) / per);
}

/* Columns padded so every row starts on a 16-byte boundary: dim rounded up to 8 (fp16) or 4. */
KERNELS_HD uint32_t kernels_padded_dim(uint32_t dim, kernels_storage storage)
{
    uint32_t m = storage == KERNELS_STORAGE_FP16 ? 8u : 4u;
    return (dim + m - 1) / m * m;
}

/*
 * Ordered keys. A candidate (score, row) is packed into one uint64 whose unsigned order is the
 * result order: score descending, then row ascending. High word: the float's bits made
 * monotone (NaN lowest, -0 folded into +0); low word: ~row. The key 0 is the "no candidate"
 * sentinel (row UINT32_MAX) and loses to every real candidate, -inf and NaN included.
 */
KERNELS_HD uint32_t kernels_score_bits(float s)
{
    union {
        float f;
        uint32_t u;
    } v;
    v.f = s;
    if (s != s) return 0;
    if (s == 0.0f) v.u = 0;
    return (v.u & 0x80000000u) ? ~v.u : (v.u | 0x80000000u);
}

KERNELS_HD float kernels_bits_score(uint32_t b)
{
    union {
        float f;
        uint32_t u;
    } v;
    v.u = (b & 0x80000000u) ? (b & 0x7FFFFFFFu) : ~b;
    return v.f;
}

KERNELS_HD uint64_t kernels_key(float score, uint32_t row)
{
    return ((uint64_t)kernels_score_bits(score) << 32) | (uint64_t)(uint32_t)~row;
}

KERNELS_HD uint32_t kernels_key_row(uint64_t key)
{
    return ~(uint32_t)key;
}

KERNELS_HD float kernels_key_score(uint64_t key)
{
    return kernels_bits_score((uint32_t)(key >> 32));
}

/* Rows of one GEMM tile: the score tile (batch × rows × 4 bytes) stays within budget_bytes so
 * it can live in L2, at least 256 rows, a multiple of 256, and no more than the table needs. */
KERNELS_HD uint32_t kernels_plan_tile_rows(uint32_t n_rows, uint32_t batch, uint64_t budget_bytes)
{
    uint64_t t = budget_bytes / ((uint64_t)(batch ? batch : 1) * 4u);
    t = t / 256u * 256u;
    if (t < 256u) t = 256u;
    uint64_t need = ((uint64_t)n_rows + 255u) / 256u * 256u;
    if (need < 256u) need = 256u;
    if (t > need) t = need;
    if (t > 0x40000000u) t = 0x40000000u;
    return (uint32_t)t;
}

/* A list of `len` elements per query split into segments that one thread block each reduces to
 * k candidates. Enough segments to give the device about target_blocks blocks, but each at
 * least max(8 × k_bucket, 4096) long so every level shrinks the data at least eightfold. */
typedef struct kernels_segments {
    uint32_t count;  /* segments per query, ≥ 1 */
    uint32_t length; /* elements per segment (the last may be shorter) */
} kernels_segments;

KERNELS_HD kernels_segments kernels_plan_segments(uint32_t len, uint32_t batch, uint32_t k_bucket,
                                                  uint32_t target_blocks)
{
    kernels_segments s;
    uint32_t min_len = 8u * k_bucket > 4096u ? 8u * k_bucket : 4096u;
    uint32_t by_len = len / min_len;
    uint32_t b = batch ? batch : 1;
    uint32_t want = (target_blocks + b - 1) / b;
    uint32_t n = by_len < want ? by_len : want;
    if (n < 1) n = 1;
    uint32_t l = (uint32_t)(((uint64_t)len + n - 1) / n);
    l = (l + 255u) / 256u * 256u;
    if (l == 0) l = 256u;
    s.length = l;
    s.count = (uint32_t)(((uint64_t)len + l - 1) / l);
    if (s.count < 1) s.count = 1;
    return s;
}

/* The candidates thread block s of a selection launch reads (see kernels/select.cuh): in tile
 * mode (impl_len > 0) segment s of the score tile plus, for s == 0, the whole explicit list
 * (the running best of the earlier tiles); in merge mode segment s of the explicit list. */
typedef struct kernels_block_range {
    uint32_t expl_begin, n_expl, impl_begin, n_impl;
} kernels_block_range;

KERNELS_HD kernels_block_range kernels_select_range(uint32_t expl_len, uint32_t expl_seg,
                                                    uint32_t impl_len, uint32_t impl_seg,
                                                    uint32_t s)
{
    kernels_block_range r = {0, 0, 0, 0};
    if (impl_len > 0) {
        uint64_t i0 = (uint64_t)s * impl_seg, i1 = i0 + impl_seg;
        if (i1 > impl_len) i1 = impl_len;
        r.impl_begin = (uint32_t)(i0 < impl_len ? i0 : impl_len);
        r.n_impl = i1 > i0 ? (uint32_t)(i1 - i0) : 0;
        r.n_expl = s == 0 ? expl_len : 0;
    } else {
        uint64_t e0 = (uint64_t)s * expl_seg, e1 = e0 + expl_seg;
        if (e1 > expl_len) e1 = expl_len;
        r.expl_begin = (uint32_t)(e0 < expl_len ? e0 : expl_len);
        r.n_expl = e1 > e0 ? (uint32_t)(e1 - e0) : 0;
    }
    return r;
}

/* Columns a filter reads, row-indexed (tags: KERNELS_MAX_TAGS per row). */
typedef struct kernels_attr_cols {
    const uint32_t *category;
    const float *price;
    const uint32_t *flags; /* bit 0: available; bits 8..15: number of tags */
    const uint64_t *bloom;
    const uint32_t *tags;
} kernels_attr_cols;

KERNELS_HD bool kernels_sorted_contains(const uint32_t *a, uint32_t n, uint32_t v)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (a[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && a[lo] == v;
}

/* The device form of backend_filter_matches(): same answer for every row whose price is finite
 * (the backend rejects non-finite prices at write). Cheap tests first. */
KERNELS_HD bool kernels_filter_pass(const kernels_filter *f, const uint32_t *arena,
                                    const kernels_attr_cols *c, uint32_t row)
{
    uint32_t fl = f->flags;
    if (fl == 0) return true;
    if ((fl & KERNELS_FILTER_AVAILABLE) && !(c->flags[row] & 1u)) return false;
    if (fl & KERNELS_FILTER_PRICE) {
        float p = c->price[row];
        if (!(p >= f->price_min && p <= f->price_max)) return false;
    }
    if (fl & KERNELS_FILTER_CATEGORY) {
        uint32_t cat = c->category[row];
        uint32_t w = cat >> 5;
        if (w >= f->category_words32 || !((arena[f->category_off + w] >> (cat & 31u)) & 1u))
            return false;
    }
    if (fl & KERNELS_FILTER_TAGS) {
        if (!(c->bloom[row] & f->tag_bloom)) return false;
        uint32_t nt = (c->flags[row] >> 8) & 0xFFu;
        bool any = false;
        for (uint32_t i = 0; i < nt && !any; i++)
            any = kernels_sorted_contains(arena + f->tags_off, f->n_tags,
                                          c->tags[(size_t)row * KERNELS_MAX_TAGS + i]);
        if (!any) return false;
    }
    if ((fl & KERNELS_FILTER_EXCLUDE) &&
        kernels_sorted_contains(arena + f->exclude_off, f->n_exclude, row))
        return false;
    return true;
}

#ifdef __cplusplus
}
#endif

#endif /* AFFINITY_KERNELS_H */

/*
 * backend.h: the interface every scoring backend implements (FAISS on the CPU, our CUDA
 * kernels on the GPU), as a table of function pointers so the engine cannot tell them apart.
 *
 * A backend knows rows, never item ids: the engine maps ids to dense rows 0..count-1 and keeps
 * them dense (a delete moves the last row into the hole, see table_move). A backend_table holds
 * one collection's vectors and the attribute columns filters read.
 *
 * Threading contract (enforced by the engine's per-collection read/write lock):
 *   - table_write and table_move never run concurrently with anything else on the same table;
 *   - table_search, table_score and table_read may run concurrently with each other on the
 *     same table; a backend that cannot overlap them serializes internally;
 *   - calls on different tables may run concurrently.
 * Scores are always "higher is better": inner product (cosine is inner product on vectors the
 * engine normalized) or, for L2, the negated squared distance. Ties are broken by lower row.
 */
#ifndef AFFINITY_BACKEND_H
#define AFFINITY_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "als.h"
#include "scratch.h"
#include "status.h"

typedef enum aff_metric {
    AFF_METRIC_IP = 0,     /* inner product, higher is better */
    AFF_METRIC_COSINE = 1, /* inner product of normalized vectors */
    AFF_METRIC_L2 = 2,     /* squared Euclidean distance, lower is better */
} aff_metric;

typedef enum backend_index_kind {
    BACKEND_INDEX_FLAT = 0, /* exact search */
    BACKEND_INDEX_HNSW = 1, /* approximate graph search (CPU backend only) */
} backend_index_kind;

/* The attributes of one row, in interned form. Category and tag ids are small integers the
 * engine assigns per collection; 0 is never a valid id (category 0 means "none"). */
typedef struct backend_row_attrs {
    /* The fields every filter reads come first, in one cache line. */
    uint32_t category;
    float price;
    uint64_t tag_bloom; /* OR of backend_tag_bit(tag) over tags */
    uint8_t available;
    uint8_t n_tags;
    uint32_t tags[AFF_MAX_TAGS_PER_ITEM]; /* sorted ascending, unique */
} backend_row_attrs;

/* A filter compiled by the engine into row space. A zeroed struct with price bounds at
 * -INFINITY/INFINITY matches every row; backend_filter_init() makes one. Borrowed by the
 * backend for the duration of one search call. */
typedef struct backend_filter {
    const uint64_t *category_bits; /* bit c set: category c passes; NULL: any category */
    uint32_t category_words;       /* length of category_bits in 64-bit words */
    const uint32_t *tags;          /* any-of, sorted ascending; n_tags == 0: any tags */
    uint32_t n_tags;
    uint64_t tag_bloom;         /* OR of backend_tag_bit() over tags */
    float price_min, price_max; /* inclusive bounds */
    uint8_t available_only;
    const uint32_t *exclude_rows; /* sorted ascending, unique */
    uint32_t n_exclude_rows;
    const uint32_t *exclude_tags; /* none-of, sorted ascending; n_exclude_tags == 0: none */
    uint32_t n_exclude_tags;
    uint64_t exclude_tag_bloom; /* OR of backend_tag_bit() over exclude_tags */
} backend_filter;

static inline uint64_t backend_tag_bit(uint32_t tag)
{
    return (uint64_t)1 << (tag & 63u);
}

static inline void backend_filter_init(backend_filter *f)
{
    *f = (backend_filter){0};
    f->price_min = -__builtin_inff();
    f->price_max = __builtin_inff();
}

/* True when the filter has no attribute tests and no exclusions (it matches every row). */
static inline bool backend_filter_is_empty(const backend_filter *f)
{
    return !f || (!f->category_bits && f->n_tags == 0 && !f->available_only &&
                  f->price_min == -__builtin_inff() && f->price_max == __builtin_inff() &&
                  f->n_exclude_rows == 0 && f->n_exclude_tags == 0);
}

static inline bool backend__sorted_contains(const uint32_t *a, uint32_t n, uint32_t v)
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

/* True when f tests availability, price or tags: anything beyond the category and the
 * excluded rows, which a backend can check without reading the row's attributes (prices are
 * finite, item.c, so unbounded price limits admit every row). */
static inline bool backend_filter_tests_attrs(const backend_filter *f)
{
    return f->available_only || f->n_tags || f->n_exclude_tags ||
           f->price_min != -__builtin_inff() || f->price_max != __builtin_inff();
}

/* f's category test alone: does a row of `category` pass it? */
static inline bool backend_filter_category_passes(const backend_filter *f, uint32_t category)
{
    if (!f->category_bits) return true;
    uint32_t w = category >> 6;
    return w < f->category_words && ((f->category_bits[w] >> (category & 63u)) & 1u);
}

/* f's excluded rows alone: is `row` not among them? */
static inline bool backend_filter_row_passes(const backend_filter *f, uint32_t row)
{
    return !f->n_exclude_rows || !backend__sorted_contains(f->exclude_rows, f->n_exclude_rows, row);
}

/* The reference predicate: does `row` with attributes `a` pass filter `f` (NULL passes)?
 * Backends may evaluate it differently (on the device, vectorized) but must agree with it. */
static inline bool backend_filter_matches(const backend_filter *f, const backend_row_attrs *a,
                                          uint32_t row)
{
    if (!f) return true;
    if (f->available_only && !a->available) return false;
    if (!(a->price >= f->price_min && a->price <= f->price_max)) return false;
    if (!backend_filter_category_passes(f, a->category)) return false;
    if (f->n_tags) {
        if (!(a->tag_bloom & f->tag_bloom)) return false;
        bool any = false;
        for (uint32_t i = 0; i < a->n_tags && !any; i++)
            any = backend__sorted_contains(f->tags, f->n_tags, a->tags[i]);
        if (!any) return false;
    }
    if (f->n_exclude_tags && (a->tag_bloom & f->exclude_tag_bloom)) {
        for (uint32_t i = 0; i < a->n_tags; i++)
            if (backend__sorted_contains(f->exclude_tags, f->n_exclude_tags, a->tags[i]))
                return false;
    }
    return backend_filter_row_passes(f, row);
}

typedef struct backend backend;
typedef struct backend_table backend_table;

/* How the CPU backend scores a flat table (docs/cpu-precision.md). BF16 and INT8 scan a compact
 * copy of the catalog and re-rank a provably sufficient candidate set in fp32, so every
 * precision returns the fp32 top-k; the fp32 rows then live in a cold, file-backed array. */
typedef enum backend_precision {
    BACKEND_PRECISION_AUTO = 0, /* table: the backend's default; backend: fastest exact one */
    BACKEND_PRECISION_FP32 = 1,
    BACKEND_PRECISION_BF16 = 2,
    BACKEND_PRECISION_INT8 = 3,
} backend_precision;

/* The widest instruction set the CPU backend's own kernels may use (AUTO: what the CPU has). */
typedef enum backend_cpu_isa {
    BACKEND_CPU_ISA_AUTO = 0,
    BACKEND_CPU_ISA_SCALAR = 1, /* portable C, any CPU */
    BACKEND_CPU_ISA_AVX2 = 2,   /* AVX2 + FMA */
    BACKEND_CPU_ISA_AVX512 = 3, /* AVX-512 VL with VNNI (int8) and BF16 (bf16) where present */
} backend_cpu_isa;

typedef struct backend_table_params {
    uint32_t dim;              /* 1..AFF_MAX_DIM */
    aff_metric metric;         /* COSINE arrives as normalized vectors; treat as IP */
    backend_index_kind index;  /* FLAT unless the collection asked for HNSW */
    uint32_t hnsw_m;           /* HNSW graph degree (default 32) */
    uint32_t hnsw_ef_search;   /* HNSW search breadth (default 64) */
    uint32_t initial_capacity; /* rows to reserve; 0 = backend default */

    backend_precision precision; /* CPU backend, flat tables only; AUTO = backend default */
} backend_table_params;

/* One batch of searches. Query i writes its hits at offset(i) = k[0] + ... + k[i-1] in
 * out_rows/out_scores, best first, and their number (≤ k[i], fewer when fewer rows pass)
 * in out_counts[i]. */
typedef struct backend_search {
    const float *queries; /* nq × dim, row-major */
    uint32_t nq;
    const uint32_t *k;                    /* per query, 1..AFF_MAX_K */
    const backend_filter *const *filters; /* per query; NULL array or NULL entry: no filter */
    /* NULL, or per query: same_as[q] = p < q when query q's vector equals query p's (and p's
     * own same_as is p), so a backend may score the vector once and feed both heaps (a
     * ranking pipeline asks for the shopper's vector under several filters). A hint:
     * ignoring it gives the same results. */
    const uint32_t *same_as;
    /* NULL, or per query: 0, or at most this many hits per category (rows of category 0,
     * none, are never capped): the k best of the union of each category's cap best, which is
     * what taking rows best first and skipping a full category gives. A ranking pipeline with
     * a category cap asks for it so a shopper whose best rows crowd one category still gets a
     * full pool in one scan. The CPU backend's reduced-precision tables honour it; other
     * tables may return the uncapped top-k, so a caller applies its cap again. */
    const uint32_t *max_per_category;
    uint32_t *out_rows;
    float *out_scores;
    uint32_t *out_counts;
    /* The calling worker's arena (scratch.h), already reset by the engine: a backend takes its
     * temporary arrays from it (never resetting it) on the calling thread, before any parallel
     * region. NULL (direct calls from tests and tools): the backend uses an arena of its own
     * for the call. */
    aff_scratch *scratch;
} backend_search;

typedef struct backend_info {
    char name[32];         /* "faiss-cpu" or "cuda" */
    char device[128];      /* e.g. "NVIDIA H100 80GB HBM3" or the CPU model */
    uint64_t memory_used;  /* bytes held by all tables (device memory for the GPU) */
    uint64_t memory_total; /* device memory size, 0 on the CPU */
    /* Largest |component| a stored or query vector may have (0: any finite value). The GPU's
     * fp16 catalog holds ±65504; the engine rejects larger values with INVALID_ARGUMENT. */
    float max_abs_component;
    /* Device faults (calls that found the CUDA context lost) and, after one, how many tables
     * were handed to the CPU fallback; fault holds the first fault's reason ("" if none). */
    uint64_t device_faults;
    uint32_t tables_on_cpu;
    char fault[256];
} backend_info;

typedef struct backend_ops {
    void (*destroy)(backend *b);
    void (*describe)(backend *b, backend_info *out);

    int (*table_create)(backend *b, const backend_table_params *p, backend_table **out,
                        aff_err *err);
    void (*table_destroy)(backend_table *t);

    /* Writes n rows: rows[i] < count overwrites, rows[i] == count (in increasing order)
     * appends. vectors: n × dim (already normalized for cosine); attrs: n entries. */
    int (*table_write)(backend_table *t, const uint32_t *rows, uint32_t n, const float *vectors,
                       const backend_row_attrs *attrs, aff_err *err);
    /* Copies row src[i] over row dst[i] for i = 0..n-1 in order, then truncates the table to
     * new_count rows. The engine uses it to fill holes left by deletes with the last rows. */
    int (*table_move)(backend_table *t, const uint32_t *src, const uint32_t *dst, uint32_t n,
                      uint32_t new_count, aff_err *err);

    int (*table_search)(backend_table *t, const backend_search *s, aff_err *err);
    /* Gather-and-dot for re-ranking: scores[j] for j in offsets[i]..offsets[i+1]-1 is the
     * score of query i against rows[j]. offsets has nq + 1 entries. */
    int (*table_score)(backend_table *t, const float *queries, uint32_t nq, const uint32_t *offsets,
                       const uint32_t *rows, float *scores, aff_err *err);
    /* Copies the stored vectors of n rows into out (n × dim floats). */
    int (*table_read)(backend_table *t, const uint32_t *rows, uint32_t n, float *out, aff_err *err);
    uint32_t (*table_count)(const backend_table *t);
    uint64_t (*table_memory)(const backend_table *t); /* bytes this table holds */

    /* Optional (NULL: the backend trains nothing itself): fills *out with the backend's
     * training device (als.h) and returns true when it has a usable one now. The device stays
     * valid as long as the backend. */
    bool (*trainer)(backend *b, als_device *out);
} backend_ops;

/* Every backend instance starts with this header; implementations embed it first. */
struct backend {
    const backend_ops *ops;
};

/* Every table starts with this header too, so callers can reach the ops from a table. */
struct backend_table {
    const backend_ops *ops;
};

typedef struct backend_faiss_config {
    int threads;                 /* OpenMP threads for FAISS/BLAS; 0 = all cores */
    backend_precision precision; /* default for flat tables; AUTO = fastest exact one */
    backend_cpu_isa isa;         /* cap on the kernels' instruction set; AUTO = detect */
} backend_faiss_config;

/* Creates the FAISS CPU backend. */
int backend_faiss_create(backend **out, const backend_faiss_config *cfg, aff_err *err);

typedef struct backend_gpu_config {
    int device;         /* CUDA device ordinal */
    bool fp32;          /* store the catalog as fp32 instead of fp16 */
    uint32_t max_batch; /* largest query batch to plan buffers for */
    /* The FAISS backend a table is handed to after a device fault (see backend_gpu.c). */
    backend_faiss_config fallback;
} backend_gpu_config;

/* Creates the CUDA backend. Returns AFF_EUNSUPPORTED when built without CUDA and
 * AFF_EDEVICE (with the reason) when no usable device is present.
 *
 * After a device fault (a sticky CUDA error: the context is lost for the rest of the process)
 * the backend does not try to recover the context: it hands each table, on its next call, to
 * a FAISS CPU table rebuilt from the host copy it keeps of every row, retries the failed call
 * there, and reports the fault in backend_info (device_faults, tables_on_cpu, fault). */
int backend_gpu_create(backend **out, const backend_gpu_config *cfg, aff_err *err);

/* Creates the no-op backend (stores no vectors, scores nothing): the transport-ceiling
 * baseline for benchmarks. */
int backend_noop_create(backend **out, aff_err *err);

#endif

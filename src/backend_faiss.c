/*
 * backend_faiss.c: the CPU backend. Owns one FAISS flat index per table (the vector store),
 * an optional FAISS HNSW graph over the same vectors, and the attribute column filters read.
 *
 * Search paths, chosen per batch (measured in bench/bench_engine.c, see bench/results/):
 *   - small batches (nq < SCAN_MAX_NQ): our own scan, rows split across OpenMP threads, each
 *     thread computing dot products with a vectorized loop and keeping per-query top-k heaps,
 *     filters checked only for rows that would enter a heap. FAISS runs a single query on
 *     one thread; this uses every core.
 *   - larger batches, filtered or not: rows split across OpenMP threads once per search; each
 *     thread scores its slice tile by tile with single-threaded sgemm and feeds the same heaps.
 *     FAISS instead enters a parallel region per 1024-row tile and leans on OpenBLAS's own
 *     thread pool, whose idle threads spin (sched_yield) and take CPU from the gRPC threads;
 *     and FAISS 1.7.3 leaves its BLAS path entirely when given an IDSelector (50% selectivity
 *     fell from ~6,800 to ~150 queries/s at N=100k). So BLAS runs single-threaded here
 *     (openblas_set_num_threads(1) at start-up) and the parallelism is ours.
 *   - bf16/int8 tables (backend_precision, --cpu-precision) keep no FAISS index: cpu_score.c
 *     scans a compact copy of the rows for every batch size, filtered or not, and re-ranks a
 *     provable candidate set in fp32 from `cold`, an mmap of an unlinked file under $TMPDIR.
 *   - HNSW tables answer unfiltered queries from the FAISS graph; filtered queries take the
 *     exact path (a graph walk cannot promise k filtered results). Rows overwritten or moved
 *     mark the graph stale; it is rebuilt on the next HNSW search (HNSW suits append-mostly
 *     catalogs).
 * Scores are "higher is better": inner product, or for L2 the negated squared distance,
 * computed as 2 q.x - |x|^2 - |q|^2 from stored row norms. Ties go to the lower row.
 *
 * Threading: see backend.h. Searches on one table may run concurrently; the lazy HNSW rebuild
 * is the only mutation a search makes and is serialized by hnsw_lock.
 */
#include "backend.h"

#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/impl/AuxIndexStructures_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/utils/distances_c.h>

#include "cpu_score.h"
#include "log.h"
#include "topk.h"

/* Batches smaller than this use the threaded scan instead of BLAS. */
#define SCAN_MAX_NQ 4

/* OpenBLAS's thread control; weak so another BLAS still links (then BLAS threads as it will). */
extern void openblas_set_num_threads(int threads) __attribute__((weak));

/* Fortran BLAS, as FAISS itself calls it (column-major). */
extern int sgemm_(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                  const float *alpha, const float *a, const int *lda, const float *b,
                  const int *ldb, const float *beta, float *c, const int *ldc);

typedef struct faiss_backend {
    backend base;
    int threads;
    backend_precision precision; /* default for flat tables, never AUTO */
    backend_cpu_isa isa;         /* kernels in use, never AUTO */
    _Atomic uint64_t memory_used;
    char cpu_model[128];
} faiss_backend;

typedef struct faiss_table {
    backend_table base;
    faiss_backend *owner;
    uint32_t dim;
    aff_metric metric;
    backend_index_kind index_kind;
    uint32_t hnsw_m, hnsw_ef_search;
    FaissIndex *flat;            /* IndexFlatIP / IndexFlatL2: rows 0..count-1; fp32 tables */
    backend_precision precision; /* FP32, or BF16/INT8: codes + cold below instead of flat */
    cpu_codes codes;             /* bf16/int8: the compact copy the scan reads */
    float *cold;                 /* bf16/int8: fp32 rows, file-backed (re-ranking, reads) */
    size_t cold_bytes;           /* mapped length of cold */
    int cold_fd;                 /* the unlinked file behind cold, or -1 (anonymous) */
    FaissIndex *hnsw;            /* HNSW over the same vectors, or NULL */
    bool hnsw_stale;             /* rows changed in place since the graph was built */
    pthread_mutex_t hnsw_lock;   /* guards hnsw and hnsw_stale during searches */
    backend_row_attrs *attrs;    /* capacity entries */
    uint64_t *block_cats;        /* bf16/int8: capacity / 8 entries, cpu_block_cats() */
    cpu_cat_rows cat_rows;       /* bf16/int8: rows 0..count-1 by category (narrow filters) */
    float *sq_norms;             /* L2 only: |x|^2 per row, capacity entries */
    uint32_t count, capacity;
    uint64_t accounted; /* bytes last added to owner->memory_used */
} faiss_table;

static const char *faiss_error_text(void)
{
    const char *e = faiss_get_last_error();
    return e ? e : "unknown FAISS error";
}

/* ---- memory accounting ------------------------------------------------------------- */

static bool quantized(const faiss_table *t)
{
    return t->precision != BACKEND_PRECISION_FP32;
}

/* Resident bytes: the fp32 rows of a bf16/int8 table live in a file-backed map the kernel may
 * evict (only re-ranking and reads touch it), so they are not counted; cold_bytes says how
 * large that map is. */
static uint64_t table_bytes(const faiss_table *t)
{
    uint64_t bytes = quantized(t) ? cpu_codes_bytes(&t->codes, t->count)
                                  : (uint64_t)t->count * t->dim * sizeof(float);
    bytes += (uint64_t)t->capacity * sizeof(backend_row_attrs);
    if (quantized(t)) bytes += cpu_cat_rows_bytes(&t->cat_rows);
    if (t->sq_norms) bytes += (uint64_t)t->capacity * sizeof(float);
    if (t->hnsw) /* vectors again plus about 2·M links of 8 bytes per row */
        bytes += (uint64_t)t->count * (t->dim * sizeof(float) + 2u * t->hnsw_m * 8u);
    return bytes;
}

static void account(faiss_table *t)
{
    uint64_t now = table_bytes(t);
    if (now >= t->accounted)
        atomic_fetch_add(&t->owner->memory_used, now - t->accounted);
    else
        atomic_fetch_sub(&t->owner->memory_used, t->accounted - now);
    t->accounted = now;
}

/* ---- table lifecycle ------------------------------------------------------------------- */

/* The cold fp32 rows of a bf16/int8 table: a MAP_SHARED map of an unlinked file under $TMPDIR
 * (or /tmp), so its pages are clean page cache once written back and the kernel may drop them;
 * anonymous memory when no file can be made. */
static void cold_open(faiss_table *t)
{
    const char *dir = getenv("TMPDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/affinity-cold-XXXXXX", dir && *dir ? dir : "/tmp");
    t->cold_fd = mkstemp(path);
    if (t->cold_fd >= 0)
        unlink(path);
    else
        aff_log_kv(AFF_LOG_WARN, "no file for the cold fp32 rows: keeping them in memory", "path",
                   path, NULL);
}

static int cold_reserve(faiss_table *t, uint64_t rows, aff_err *err)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t bytes = ((size_t)rows * t->dim * sizeof(float) + page - 1) / page * page;
    if (bytes <= t->cold_bytes) return AFF_OK;
    if (t->cold_fd >= 0 && ftruncate(t->cold_fd, (off_t)bytes) != 0)
        return aff__fail(err, AFF_EIO, "cannot grow the cold vector file to %zu bytes", bytes);
    void *p = t->cold
                  ? mremap(t->cold, t->cold_bytes, bytes, MREMAP_MAYMOVE)
                  : mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                         t->cold_fd >= 0 ? MAP_SHARED : MAP_PRIVATE | MAP_ANONYMOUS, t->cold_fd, 0);
    if (p == MAP_FAILED)
        return aff__fail(err, AFF_ENOMEM, "cannot map %zu bytes of cold vectors", bytes);
    t->cold = p;
    t->cold_bytes = bytes;
    return AFF_OK;
}

static int table_reserve(faiss_table *t, uint32_t rows, aff_err *err)
{
    if (rows <= t->capacity) return AFF_OK;
    uint64_t cap = t->capacity ? t->capacity : 1024;
    while (cap < rows)
        cap *= 2;
    cap = (cap + 7) & ~(uint64_t)7; /* the bf16/int8 kernels read whole blocks of 8 rows */
    if (cap > UINT32_MAX - 7) cap = UINT32_MAX - 7;
    backend_row_attrs *attrs = realloc(t->attrs, cap * sizeof *attrs);
    if (!attrs)
        return aff__fail(err, AFF_ENOMEM, "cannot grow attribute column to %llu rows",
                         (unsigned long long)cap);
    t->attrs = attrs;
    if (t->metric == AFF_METRIC_L2) {
        float *norms = realloc(t->sq_norms, cap * sizeof *norms);
        if (!norms)
            return aff__fail(err, AFF_ENOMEM, "cannot grow norm column to %llu rows",
                             (unsigned long long)cap);
        t->sq_norms = norms;
    }
    if (quantized(t)) {
        uint64_t *bc = realloc(t->block_cats, cap / 8 * sizeof *bc);
        if (!bc)
            return aff__fail(err, AFF_ENOMEM, "cannot grow the block column to %llu rows",
                             (unsigned long long)cap);
        t->block_cats = bc;
        if (cpu_codes_reserve(&t->codes, (uint32_t)cap) != AFF_OK)
            return aff__fail(err, AFF_ENOMEM, "cannot grow the %s codes to %llu rows",
                             cpu_precision_name(t->precision), (unsigned long long)cap);
        int rc = cold_reserve(t, cap, err);
        if (rc != AFF_OK) return rc;
    }
    t->capacity = (uint32_t)cap;
    return AFF_OK;
}

static int faiss_table_create(backend *b, const backend_table_params *p, backend_table **out,
                              aff_err *err);
static void faiss_table_destroy(backend_table *bt);

static float *flat_rows(faiss_table *t)
{
    if (quantized(t)) return t->cold;
    float *xb = NULL;
    size_t size = 0;
    faiss_IndexFlat_xb(t->flat, &xb, &size);
    return xb;
}

static int hnsw_build(faiss_table *t, aff_err *err)
{
    char desc[32];
    snprintf(desc, sizeof desc, "HNSW%u,Flat", t->hnsw_m);
    FaissMetricType metric = t->metric == AFF_METRIC_L2 ? METRIC_L2 : METRIC_INNER_PRODUCT;
    FaissIndex *graph = NULL;
    FaissParameterSpace *ps = NULL;
    int rc = AFF_OK;
    if (faiss_index_factory(&graph, (int)t->dim, desc, metric) != 0) {
        rc = aff__fail(err, AFF_EINTERNAL, "FAISS HNSW create failed: %s", faiss_error_text());
        goto out;
    }
    if (t->count && faiss_Index_add(graph, t->count, flat_rows(t)) != 0) {
        rc = aff__fail(err, AFF_ENOMEM, "FAISS HNSW build failed: %s", faiss_error_text());
        goto out;
    }
    if (faiss_ParameterSpace_new(&ps) != 0 ||
        faiss_ParameterSpace_set_index_parameter(ps, graph, "efSearch", t->hnsw_ef_search) != 0) {
        rc = aff__fail(err, AFF_EINTERNAL, "FAISS efSearch: %s", faiss_error_text());
        goto out;
    }
    if (t->hnsw) faiss_Index_free(t->hnsw);
    t->hnsw = graph;
    graph = NULL;
    t->hnsw_stale = false;
out:
    if (graph) faiss_Index_free(graph);
    faiss_ParameterSpace_free(ps);
    return rc;
}

static int faiss_table_create(backend *b, const backend_table_params *p, backend_table **out,
                              aff_err *err)
{
    faiss_backend *fb = (faiss_backend *)b;
    *out = NULL;
    faiss_table *t = calloc(1, sizeof *t);
    if (!t) return aff__fail(err, AFF_ENOMEM, "out of memory creating a table");
    t->base.ops = b->ops;
    t->owner = fb;
    t->dim = p->dim;
    t->metric = p->metric;
    t->index_kind = p->index;
    t->hnsw_m = p->hnsw_m ? p->hnsw_m : 32;
    t->hnsw_ef_search = p->hnsw_ef_search ? p->hnsw_ef_search : 64;
    pthread_mutex_init(&t->hnsw_lock, NULL);
    t->cold_fd = -1;
    /* HNSW walks the graph over fp32 vectors: reduced precision applies to flat tables. */
    t->precision = p->index == BACKEND_INDEX_HNSW           ? BACKEND_PRECISION_FP32
                   : p->precision == BACKEND_PRECISION_AUTO ? fb->precision
                                                            : p->precision;
    int rc;
    if (t->precision > BACKEND_PRECISION_INT8) {
        rc = aff__fail(err, AFF_EINTERNAL, "unknown precision %d", (int)t->precision);
        goto fail;
    }
    int frc = 0;
    if (quantized(t)) {
        cpu_codes_init(&t->codes, t->precision, p->dim, fb->isa);
        cold_open(t);
    } else {
        frc = p->metric == AFF_METRIC_L2 ? faiss_IndexFlatL2_new_with(&t->flat, p->dim)
                                         : faiss_IndexFlatIP_new_with(&t->flat, p->dim);
    }
    if (frc != 0) {
        rc = aff__fail(err, AFF_ENOMEM, "FAISS flat index: %s", faiss_error_text());
        goto fail;
    }
    if ((rc = table_reserve(t, p->initial_capacity ? p->initial_capacity : 1024, err)) != AFF_OK)
        goto fail;
    if (p->index == BACKEND_INDEX_HNSW && (rc = hnsw_build(t, err)) != AFF_OK) goto fail;
    account(t);
    *out = &t->base;
    return AFF_OK;
fail:
    faiss_table_destroy(&t->base);
    return rc;
}

static void faiss_table_destroy(backend_table *bt)
{
    faiss_table *t = (faiss_table *)bt;
    if (!t) return;
    atomic_fetch_sub(&t->owner->memory_used, t->accounted);
    if (t->flat) faiss_Index_free(t->flat);
    if (t->hnsw) faiss_Index_free(t->hnsw);
    pthread_mutex_destroy(&t->hnsw_lock);
    cpu_codes_free(&t->codes);
    if (t->cold) munmap(t->cold, t->cold_bytes);
    if (t->cold_fd >= 0) close(t->cold_fd);
    free(t->attrs);
    free(t->block_cats);
    cpu_cat_rows_free(&t->cat_rows);
    free(t->sq_norms);
    free(t);
}

/* ---- writes ----------------------------------------------------------------------------- */

static int faiss_table_write(backend_table *bt, const uint32_t *rows, uint32_t n,
                             const float *vectors, const backend_row_attrs *attrs, aff_err *err)
{
    faiss_table *t = (faiss_table *)bt;
    uint32_t appended = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (rows[i] == t->count + appended)
            appended++;
        else if (rows[i] >= t->count)
            return aff__fail(err, AFF_EINTERNAL, "row %u is past the table end %u", rows[i],
                             t->count + appended);
    }
    int rc = table_reserve(t, t->count + appended, err);
    if (rc != AFF_OK) return rc;
    float *packed = NULL;
    if (appended && !quantized(t)) {
        packed = malloc((size_t)appended * t->dim * sizeof *packed);
        if (!packed) return aff__fail(err, AFF_ENOMEM, "out of memory staging %u rows", appended);
        for (uint32_t i = 0, a = 0; i < n; i++)
            if (rows[i] >= t->count)
                memcpy(packed + (size_t)a++ * t->dim, vectors + (size_t)i * t->dim,
                       t->dim * sizeof(float));
        if (faiss_Index_add(t->flat, appended, packed) != 0) {
            rc = aff__fail(err, AFF_ENOMEM, "FAISS add of %u rows failed: %s", appended,
                           faiss_error_text());
            goto out;
        }
    }
    /* Rows past the old count are now in the flat index (bf16/int8: capacity is reserved);
     * bring the columns along. */
    float *xb = flat_rows(t);
    bool overwrote = false;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t r = rows[i];
        const float *v = vectors + (size_t)i * t->dim;
        if (r < t->count || quantized(t)) {
            memcpy(xb + (size_t)r * t->dim, v, t->dim * sizeof(float));
            overwrote |= r < t->count;
        }
        if (quantized(t)) {
            cpu_codes_set(&t->codes, r, v);
            /* a failed add breaks the index: searches scan (cpu_cat_rows) */
            if (r < t->count) cpu_cat_rows_remove(&t->cat_rows, r, t->attrs[r].category);
            (void)cpu_cat_rows_add(&t->cat_rows, r, attrs[i].category);
        }
        t->attrs[r] = attrs[i];
        if (t->sq_norms) t->sq_norms[r] = cpu_sq_norm(v, t->dim);
    }
    if (t->hnsw) {
        pthread_mutex_lock(&t->hnsw_lock);
        if (overwrote)
            t->hnsw_stale = true;
        else if (appended && !t->hnsw_stale && faiss_Index_add(t->hnsw, appended, packed) != 0)
            t->hnsw_stale = true; /* rebuilt from the flat store on the next search */
        pthread_mutex_unlock(&t->hnsw_lock);
    }
    t->count += appended;
    for (uint32_t i = 0; quantized(t) && i < n; i++)
        t->block_cats[rows[i] / 8] = cpu_block_cats(t->attrs, rows[i] / 8, t->count);
    account(t);
out:
    free(packed);
    return rc;
}

static int faiss_table_move(backend_table *bt, const uint32_t *src, const uint32_t *dst, uint32_t n,
                            uint32_t new_count, aff_err *err)
{
    faiss_table *t = (faiss_table *)bt;
    if (new_count > t->count)
        return aff__fail(err, AFF_EINTERNAL, "cannot truncate %u rows to %u", t->count, new_count);
    float *xb = flat_rows(t);
    for (uint32_t i = 0; i < n; i++) {
        if (src[i] >= t->count || dst[i] >= t->count)
            return aff__fail(err, AFF_EINTERNAL, "move %u -> %u outside %u rows", src[i], dst[i],
                             t->count);
        memmove(xb + (size_t)dst[i] * t->dim, xb + (size_t)src[i] * t->dim, t->dim * sizeof(float));
        if (quantized(t) && dst[i] != src[i]) {
            cpu_cat_rows_remove(&t->cat_rows, dst[i], t->attrs[dst[i]].category);
            (void)cpu_cat_rows_add(&t->cat_rows, dst[i], t->attrs[src[i]].category);
        }
        t->attrs[dst[i]] = t->attrs[src[i]];
        if (t->sq_norms) t->sq_norms[dst[i]] = t->sq_norms[src[i]];
        if (quantized(t)) cpu_codes_copy(&t->codes, dst[i], src[i]);
    }
    for (uint32_t i = 0; quantized(t) && i < n; i++) /* a superset after truncation is fine */
        t->block_cats[dst[i] / 8] = cpu_block_cats(t->attrs, dst[i] / 8, t->count);
    bool truncating = new_count < t->count;
    if (truncating && quantized(t)) {
        for (uint32_t r = new_count; r < t->count; r++)
            cpu_cat_rows_remove(&t->cat_rows, r, t->attrs[r].category);
        t->count = new_count;
    } else if (truncating) {
        FaissIDSelectorRange *tail = NULL;
        if (faiss_IDSelectorRange_new(&tail, new_count, t->count) != 0)
            return aff__fail(err, AFF_ENOMEM, "FAISS selector: %s", faiss_error_text());
        size_t removed = 0;
        int frc = faiss_Index_remove_ids(t->flat, (const FaissIDSelector *)tail, &removed);
        faiss_IDSelectorRange_free(tail);
        if (frc != 0 || removed != t->count - new_count)
            return aff__fail(err, AFF_EINTERNAL, "FAISS truncate to %u rows failed: %s", new_count,
                             faiss_error_text());
        t->count = new_count;
    }
    if (t->hnsw && (n || truncating)) {
        pthread_mutex_lock(&t->hnsw_lock);
        t->hnsw_stale = true;
        pthread_mutex_unlock(&t->hnsw_lock);
    }
    account(t);
    return AFF_OK;
}

/* ---- search ----------------------------------------------------------------------------- */

static bool filter_active(const backend_search *s, uint32_t q)
{
    return s->filters && s->filters[q] && !backend_filter_is_empty(s->filters[q]);
}

static const backend_filter *filter_of(const backend_search *s, uint32_t q)
{
    return filter_active(s, q) ? s->filters[q] : NULL;
}

/* The score a candidate must reach to be looked at: the heap's worst entry once it is full,
 * else -inf (everything but NaN gets in). Ties at the threshold take the slow path, where
 * topk_would_accept() applies the row order. */
static inline float heap_threshold(const topk_heap *h)
{
    return h->n < h->k ? -__builtin_inff() : h->scores[0];
}

/* The slow path of offer_rows: exact acceptance test, then the filter, then the heap. */
static inline void offer_one(const faiss_table *t, topk_heap *h, const backend_filter *f, float s,
                             uint32_t row, float *thresh)
{
    if (!topk_would_accept(h, s, row)) return;
    if (f && !backend_filter_matches(f, &t->attrs[row], row)) return;
    topk_push(h, s, row);
    *thresh = heap_threshold(h);
}

/* Offers row scores[0..n) (rows first_row..) to one query's heap. The loop does one compare
 * per score against a threshold kept in a register; the filter is checked only for rows that
 * would enter the heap. L2 scores arrive as q.x and become 2 q.x - |x|^2 (-|q|^2 is added at
 * the end, in emit). */
static void offer_rows(const faiss_table *t, topk_heap *h, const backend_filter *f,
                       const float *scores, uint32_t first_row, uint32_t n)
{
    float thresh = heap_threshold(h);
    if (t->sq_norms) {
        const float *norms = t->sq_norms + first_row;
        for (uint32_t j = 0; j < n; j++) {
            float s = 2.0f * scores[j] - norms[j];
            if (s >= thresh) offer_one(t, h, f, s, first_row + j, &thresh);
        }
    } else {
        for (uint32_t j = 0; j < n; j++)
            if (scores[j] >= thresh) offer_one(t, h, f, scores[j], first_row + j, &thresh);
    }
}

/* Final per-query output: heap sorted best first; L2 scores shifted by -|q|^2. */
static void emit(const faiss_table *t, const backend_search *s, uint32_t q, size_t off,
                 topk_heap *h)
{
    uint32_t n = topk_sort(h);
    float shift = t->sq_norms ? -cpu_sq_norm(s->queries + (size_t)q * t->dim, t->dim) : 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        s->out_rows[off + i] = h->rows[i];
        s->out_scores[off + i] = h->scores[i] + shift;
    }
    s->out_counts[q] = n;
}

/* Small batches: every thread scans a slice of the rows for all queries, then the per-thread
 * heaps are merged. */
static int search_scan(faiss_table *t, const backend_search *s, const size_t *offsets,
                       aff_scratch *scratch, aff_err *err)
{
    const uint32_t nq = s->nq, count = t->count, dim = t->dim;
    const float *xb = flat_rows(t);
    int nthreads = omp_get_max_threads();
    if ((uint64_t)count * dim < 1u << 16) nthreads = 1; /* not worth waking a second thread */
    uint32_t kmax = 0;
    for (uint32_t q = 0; q < nq; q++)
        kmax = s->k[q] > kmax ? s->k[q] : kmax;
    topk_heap *heaps = aff_scratch_array(scratch, (size_t)nthreads * nq, sizeof *heaps);
    if (!heaps) return aff__fail(err, AFF_ENOMEM, "out of memory for %u heaps", nthreads * nq);
    for (int i = 0; i < nthreads * (int)nq; i++)
        if (topk_init(&heaps[i], s->k[i % nq], scratch) != AFF_OK)
            return aff__fail(err, AFF_ENOMEM, "out of memory for top-%u heaps", kmax);

#pragma omp parallel num_threads(nthreads)
    {
        int tid = omp_get_thread_num();
        int nt = omp_get_num_threads();
        enum { CHUNK = 1024 };
        float scores[CHUNK];
        uint64_t lo = (uint64_t)count * tid / nt, hi = (uint64_t)count * (tid + 1) / nt;
        for (uint64_t r0 = lo; r0 < hi; r0 += CHUNK) {
            uint32_t n = (uint32_t)(hi - r0 < CHUNK ? hi - r0 : CHUNK);
            for (uint32_t q = 0; q < nq; q++) {
                cpu_dot_rows(s->queries + (size_t)q * dim, xb + r0 * dim, n, dim, scores);
                offer_rows(t, &heaps[(size_t)tid * nq + q], filter_of(s, q), scores, (uint32_t)r0,
                           n);
            }
        }
    }
    for (uint32_t q = 0; q < nq; q++) {
        for (int th = 1; th < nthreads; th++)
            topk_merge(&heaps[q], &heaps[(size_t)th * nq + q]);
        emit(t, s, q, offsets[q], &heaps[q]);
    }
    return AFF_OK;
}

/* Queries handled per parallel pass of search_split (bounds heap and tile memory). */
#define SPLIT_MAX_NQ 512
/* Scores each thread buffers per sgemm tile: nq × tile_rows floats (1 MiB: 1024 rows at nq = 256,
 * large enough for BLAS to run near its peak, small enough to stay in L2 on current x86). */
#define SPLIT_TILE_SCORES (1u << 18)

/* Larger batches: each thread takes a contiguous slice of rows and scores it tile by tile with
 * single-threaded sgemm, offering every tile to its own per-query heaps; heaps are merged at
 * the end. One parallel region per pass, no BLAS threads. */
static int search_split(faiss_table *t, const backend_search *s, const size_t *offsets,
                        aff_scratch *scratch, aff_err *err)
{
    const uint32_t count = t->count;
    const int dim = (int)t->dim;
    int nthreads = omp_get_max_threads();
    if ((uint64_t)count * t->dim < 1u << 16) nthreads = 1;
    const uint32_t group = s->nq < SPLIT_MAX_NQ ? s->nq : SPLIT_MAX_NQ;
    uint32_t tile = SPLIT_TILE_SCORES / group;
    tile = tile < 64 ? 64 : tile > 8192 ? 8192 : tile;
    float *scores = aff_scratch_array(scratch, (size_t)nthreads * group * tile, sizeof *scores);
    topk_heap *heaps = aff_scratch_array(scratch, (size_t)nthreads * group, sizeof *heaps);
    if (!scores || !heaps)
        return aff__fail(err, AFF_ENOMEM, "out of memory for %d x %u x %u scores", nthreads,
                         group, tile);
    int rc = AFF_OK;
    const float *xb = flat_rows(t);
    for (uint32_t g0 = 0; g0 < s->nq && rc == AFF_OK; g0 += group) {
        const uint32_t gq = s->nq - g0 < group ? s->nq - g0 : group;
        for (uint32_t i = 0; i < (uint32_t)nthreads * gq && rc == AFF_OK; i++)
            if (topk_init(&heaps[i], s->k[g0 + i % gq], scratch) != AFF_OK)
                rc = aff__fail(err, AFF_ENOMEM, "out of memory for top-k heaps");
        if (rc != AFF_OK) break;
#pragma omp parallel num_threads(nthreads)
        {
            const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
            const uint32_t lo = (uint32_t)((uint64_t)count * tid / nt);
            const uint32_t hi = (uint32_t)((uint64_t)count * (tid + 1) / nt);
            float *sc = scores + (size_t)tid * group * tile;
            topk_heap *mine = heaps + (size_t)tid * gq;
            const float one = 1.0f, zero = 0.0f;
            const int m = (int)gq;
            for (uint32_t r0 = lo; r0 < hi; r0 += tile) {
                int n = (int)(hi - r0 < tile ? hi - r0 : tile);
                /* Column-major: C (n x m) = A^T (n x d) * B (d x m); column q of C (contiguous)
                 * is query q's scores for rows r0..r0+n-1. */
                sgemm_("T", "N", &n, &m, &dim, &one, xb + (size_t)r0 * dim, &dim,
                       s->queries + (size_t)g0 * dim, &dim, &zero, sc, &n);
                for (uint32_t q = 0; q < gq; q++)
                    offer_rows(t, &mine[q], filter_of(s, g0 + q), sc + (size_t)q * n, r0,
                               (uint32_t)n);
            }
        }
        for (uint32_t q = 0; q < gq; q++) {
            for (int th = 1; th < nthreads; th++)
                topk_merge(&heaps[q], &heaps[(size_t)th * gq + q]);
            emit(t, s, g0 + q, offsets[g0 + q], &heaps[q]);
        }
    }
    return rc;
}

/* Unfiltered batches through the FAISS HNSW graph. */
static int search_faiss(faiss_table *t, FaissIndex *index, const backend_search *s,
                        const size_t *offsets, aff_scratch *scratch, aff_err *err)
{
    uint32_t kmax = 0;
    for (uint32_t q = 0; q < s->nq; q++)
        kmax = s->k[q] > kmax ? s->k[q] : kmax;
    if (kmax > t->count) kmax = t->count;
    float *dist = aff_scratch_array(scratch, (size_t)s->nq * kmax, sizeof *dist);
    idx_t *labels = aff_scratch_array(scratch, (size_t)s->nq * kmax, sizeof *labels);
    int rc = AFF_OK;
    if (!dist || !labels) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory for %u x %u results", s->nq, kmax);
        goto out;
    }
    if (faiss_Index_search(index, s->nq, s->queries, kmax, dist, labels) != 0) {
        rc = aff__fail(err, AFF_EINTERNAL, "FAISS search failed: %s", faiss_error_text());
        goto out;
    }
    for (uint32_t q = 0; q < s->nq; q++) {
        uint32_t want = s->k[q] < kmax ? s->k[q] : kmax, n = 0;
        float *sc = s->out_scores + offsets[q];
        uint32_t *rw = s->out_rows + offsets[q];
        for (uint32_t i = 0; i < kmax && n < want; i++) {
            idx_t label = labels[(size_t)q * kmax + i];
            if (label < 0) continue;
            float d = dist[(size_t)q * kmax + i];
            sc[n] = t->metric == AFF_METRIC_L2 ? -d : d;
            rw[n] = (uint32_t)label;
            n++;
        }
        /* FAISS does not promise an order among equal scores: make it lower row first. */
        topk_sort_pairs(sc, rw, n);
        s->out_counts[q] = n;
    }
out:
    return rc;
}

static int faiss_table_search(backend_table *bt, const backend_search *req, aff_err *err)
{
    faiss_table *t = (faiss_table *)bt;
    if (req->nq == 0) return AFF_OK;
    /* Every path below takes its temporary arrays from the caller's arena (or one of its own
     * for a direct call). */
    aff_scratch *tmp, *scratch = aff_scratch_or_temp(req->scratch, &tmp);
    size_t *offsets = scratch ? aff_scratch_array(scratch, req->nq, sizeof *offsets) : NULL;
    if (!offsets) {
        aff_scratch_destroy(tmp);
        return aff__fail(err, AFF_ENOMEM, "out of memory");
    }
    backend_search with = *req;
    with.scratch = scratch;
    const backend_search *s = &with;
    size_t off = 0;
    bool any_filter = false;
    for (uint32_t q = 0; q < s->nq; q++) {
        offsets[q] = off;
        off += s->k[q];
        any_filter |= filter_active(s, q);
        s->out_counts[q] = 0;
    }
    int rc = AFF_OK;
    if (t->count == 0) goto out;
    if (t->hnsw && !any_filter) {
        pthread_mutex_lock(&t->hnsw_lock);
        if (!t->hnsw_stale || (rc = hnsw_build(t, err)) == AFF_OK)
            rc = search_faiss(t, t->hnsw, s, offsets, scratch, err);
        pthread_mutex_unlock(&t->hnsw_lock);
    } else if (quantized(t)) {
        cpu_search_table st = {.codes = &t->codes,
                               .isa = t->owner->isa,
                               .rows = t->cold,
                               .sq_norms = t->sq_norms,
                               .attrs = t->attrs,
                               .block_cats = t->block_cats,
                               .cat_rows = &t->cat_rows,
                               .count = t->count,
                               .threads = t->owner->threads};
        rc = cpu_score_search(&st, s, offsets, NULL, err);
    } else if (s->nq < SCAN_MAX_NQ) {
        rc = search_scan(t, s, offsets, scratch, err);
    } else {
        rc = search_split(t, s, offsets, scratch, err);
    }
out:
    aff_scratch_destroy(tmp);
    return rc;
}

static int faiss_table_score(backend_table *bt, const float *queries, uint32_t nq,
                             const uint32_t *offsets, const uint32_t *rows, float *scores,
                             aff_err *err)
{
    faiss_table *t = (faiss_table *)bt;
    const float *xb = flat_rows(t);
    for (uint32_t q = 0; q < nq; q++) {
        const float *qv = queries + (size_t)q * t->dim;
        float qn = t->sq_norms ? cpu_sq_norm(qv, t->dim) : 0.0f;
        for (uint32_t j = offsets[q]; j < offsets[q + 1]; j++) {
            if (rows[j] >= t->count)
                return aff__fail(err, AFF_EINTERNAL, "row %u outside %u rows", rows[j], t->count);
            float s;
            cpu_dot_rows(qv, xb + (size_t)rows[j] * t->dim, 1, t->dim, &s);
            scores[j] = t->sq_norms ? 2.0f * s - t->sq_norms[rows[j]] - qn : s;
        }
    }
    return AFF_OK;
}

static int faiss_table_read(backend_table *bt, const uint32_t *rows, uint32_t n, float *out,
                            aff_err *err)
{
    faiss_table *t = (faiss_table *)bt;
    const float *xb = flat_rows(t);
    for (uint32_t i = 0; i < n; i++) {
        if (rows[i] >= t->count)
            return aff__fail(err, AFF_EINTERNAL, "row %u outside %u rows", rows[i], t->count);
        memcpy(out + (size_t)i * t->dim, xb + (size_t)rows[i] * t->dim, t->dim * sizeof(float));
    }
    return AFF_OK;
}

static uint32_t faiss_table_count(const backend_table *bt)
{
    return ((const faiss_table *)bt)->count;
}

static uint64_t faiss_table_memory(const backend_table *bt)
{
    return table_bytes((const faiss_table *)bt);
}

/* ---- backend ---------------------------------------------------------------------------- */

static void faiss_backend_destroy(backend *b)
{
    free(b);
}

static void faiss_backend_describe(backend *b, backend_info *out)
{
    faiss_backend *fb = (faiss_backend *)b;
    *out = (backend_info){0};
    snprintf(out->name, sizeof out->name, "faiss-cpu");
    snprintf(out->device, sizeof out->device, "%.80s (%d threads, %s, %s)", fb->cpu_model,
             fb->threads, cpu_isa_name(fb->isa), cpu_precision_name(fb->precision));
    out->memory_used = atomic_load(&fb->memory_used);
}

static const backend_ops faiss_ops = {
    .destroy = faiss_backend_destroy,
    .describe = faiss_backend_describe,
    .table_create = faiss_table_create,
    .table_destroy = faiss_table_destroy,
    .table_write = faiss_table_write,
    .table_move = faiss_table_move,
    .table_search = faiss_table_search,
    .table_score = faiss_table_score,
    .table_read = faiss_table_read,
    .table_count = faiss_table_count,
    .table_memory = faiss_table_memory,
};

static void read_cpu_model(char *buf, size_t size)
{
    snprintf(buf, size, "CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) == 0) {
            char *colon = strchr(line, ':');
            if (colon) {
                colon += 1 + (colon[1] == ' ');
                colon[strcspn(colon, "\n")] = '\0';
                snprintf(buf, size, "%s", colon);
            }
            break;
        }
    }
    fclose(f);
}

int backend_faiss_create(backend **out, const backend_faiss_config *cfg, aff_err *err)
{
    *out = NULL;
    faiss_backend *fb = calloc(1, sizeof *fb);
    if (!fb) return aff__fail(err, AFF_ENOMEM, "out of memory creating the FAISS backend");
    fb->base.ops = &faiss_ops;
    if (cfg && cfg->threads > 0) omp_set_num_threads(cfg->threads);
    fb->threads = omp_get_max_threads();
    fb->isa = cpu_isa_detect(cfg ? cfg->isa : BACKEND_CPU_ISA_AUTO);
    fb->precision = cfg && cfg->precision != BACKEND_PRECISION_AUTO
                        ? cfg->precision
                        : cpu_precision_default(fb->isa);
    /* Our threads split the rows; each calls BLAS on its own slice (see the file comment). */
    if (openblas_set_num_threads) openblas_set_num_threads(1);
    read_cpu_model(fb->cpu_model, sizeof fb->cpu_model);
    const char *wait = getenv("OMP_WAIT_POLICY");
    if (!wait || strcasecmp(wait, "passive") != 0)
        aff_log(AFF_LOG_WARN, "OMP_WAIT_POLICY is not PASSIVE: OpenMP and OpenBLAS threads "
                              "will spin against each other (4-25x slower searches)");
    *out = &fb->base;
    return AFF_OK;
}

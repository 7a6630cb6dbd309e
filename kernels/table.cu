/*
 * table.cu: the device-resident catalog of one collection and its incremental updates.
 *
 * What it stores: `capacity` rows of `dpad` columns (dim rounded up so each row starts on a
 * 16-byte boundary; padding is zero so GEMMs over dpad are exact), in fp16 (default) or fp32;
 * per row the squared norm of the stored (rounded) vector for L2 scoring, and the attribute
 * columns filters read: category, price, flags (available bit, tag count), tag bloom word and
 * up to 16 tag ids (a column allocated only once some row has tags).
 *
 * Updates are incremental, never a re-upload: a write scatters only the given rows (converted
 * and normed on the device); appends write past count; capacity grows by device-to-device
 * copies when the caller reserves more (gpu_plan_capacity grows it geometrically). Deletes
 * have no tombstones: the engine keeps rows dense by moving the last rows into the holes and
 * truncating (backend table_move), which here is a device-to-device row copy kernel — so
 * search never skips dead rows and never needs compaction.
 *
 * Memory traffic: a write moves n × dim × 4 bytes over PCIe plus attributes, through a device
 * staging buffer of at most 16 MiB (larger writes go in chunks); a move reads and writes n rows
 * on the device; a read gathers n rows and downloads n × dim × 4 bytes. Limits: rows < 2^32-1,
 * dim ≤ AFF_MAX_DIM; all calls are synchronous on the table's own stream.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels_common.cuh"

#define TABLE_STAGING_MAX ((size_t)16 << 20)

static size_t align16(size_t x)
{
    return (x + 15) / 16 * 16;
}

uint64_t kernels_table_row_bytes(uint32_t dim, kernels_storage storage)
{
    return (uint64_t)kernels_padded_dim(dim, storage) * kernels__elem_bytes(storage) +
           4 /* norm */ + 4 /* category */ + 4 /* price */ + 4 /* flags */ + 8 /* bloom */;
}

/* The column arrays of one capacity, allocated or freed together. */
typedef struct table_cols {
    void *vectors;
    float *norms;
    uint32_t *category;
    float *price;
    uint32_t *flags;
    uint64_t *bloom;
    uint32_t *tags;
} table_cols;

static void table_cols_free(table_cols *c)
{
    void *ptrs[] = {c->vectors, c->norms, c->category, c->price, c->flags, c->bloom, c->tags};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
        if (ptrs[i]) (void)cudaFree(ptrs[i]);
    memset(c, 0, sizeof *c);
}

static int table_cols_alloc(table_cols *c, uint32_t dpad, kernels_storage storage, uint32_t cap,
                            bool with_tags, kernels_err *err)
{
    int rc = 0;
    size_t n = cap ? cap : 1;
    struct {
        void **p;
        size_t bytes;
    } parts[] = {
        {&c->vectors, n * dpad * kernels__elem_bytes(storage)},
        {(void **)&c->norms, n * 4},
        {(void **)&c->category, n * 4},
        {(void **)&c->price, n * 4},
        {(void **)&c->flags, n * 4},
        {(void **)&c->bloom, n * 8},
        {(void **)&c->tags, with_tags ? n * 4 * KERNELS_MAX_TAGS : 0},
    };
    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        if (parts[i].bytes == 0) continue;
        cudaError_t e = cudaMalloc(parts[i].p, parts[i].bytes);
        if (e != cudaSuccess) {
            size_t free_b = 0, total_b = 0;
            (void)cudaGetLastError();
            (void)cudaMemGetInfo(&free_b, &total_b);
            (void)cudaGetLastError();
            rc = kernels__fail(
                err, e == cudaErrorMemoryAllocation ? AFF_ENOMEM : AFF_EDEVICE,
                "device memory: a table of %u rows × %u columns needs %llu bytes, "
                "%zu bytes free (%s)",
                cap, dpad,
                (unsigned long long)((uint64_t)n * (kernels_table_row_bytes(dpad, storage) +
                                                    (with_tags ? 4 * KERNELS_MAX_TAGS : 0))),
                free_b, cudaGetErrorString(e));
            if (err) err->context_lost = kernels__sticky(e);
            table_cols_free(c);
            return rc;
        }
    }
    return 0;
}

static table_cols table_cols_of(const kernels_table *t)
{
    table_cols c = {t->vectors, t->norms, t->category, t->price, t->flags, t->bloom, t->tags};
    return c;
}

static void table_cols_set(kernels_table *t, const table_cols *c)
{
    t->vectors = c->vectors;
    t->norms = c->norms;
    t->category = c->category;
    t->price = c->price;
    t->flags = c->flags;
    t->bloom = c->bloom;
    t->tags = c->tags;
}

/* Grows a staging buffer (contents are not kept). Only its owner's stream may use it. */
static int staging_reserve(void **buf, size_t *have, size_t bytes, kernels_err *err)
{
    int rc = 0;
    if (bytes <= *have) return 0;
    if (*buf) {
        (void)cudaFree(*buf);
        *buf = NULL;
        *have = 0;
    }
    KCUDA(err, cudaMalloc(buf, bytes));
    *have = bytes;
out:
    return rc;
}

static int table_staging(kernels_table *t, size_t bytes, kernels_err *err)
{
    return staging_reserve(&t->staging, &t->staging_bytes, bytes, err);
}

int kernels_table_create(kernels_table **out, kernels_device *d, uint32_t dim,
                         kernels_storage storage, kernels_metric metric, uint32_t capacity,
                         kernels_err *err)
{
    int rc = 0;
    kernels_table *t = NULL;
    table_cols c;
    *out = NULL;
    if (!d || dim == 0 || dim > AFF_MAX_DIM || capacity > KERNELS_MAX_ROWS)
        return kernels__fail(err, AFF_EINVAL,
                             "table: dim %u outside 1..%u or capacity %u too "
                             "large",
                             dim, (unsigned)AFF_MAX_DIM, capacity);
    t = (kernels_table *)calloc(1, sizeof *t);
    if (!t) return kernels__fail(err, AFF_ENOMEM, "out of host memory");
    t->dev = d;
    t->dim = dim;
    t->storage = storage;
    t->metric = metric;
    t->dpad = kernels_padded_dim(dim, storage);
    pthread_mutex_init(&t->read_lock, NULL);
    KCUDA(err, cudaSetDevice(d->ordinal));
    KCUDA(err, cudaStreamCreateWithFlags(&t->stream, cudaStreamNonBlocking));
    KCUDA(err, cudaStreamCreateWithFlags(&t->read_stream, cudaStreamNonBlocking));
    if ((rc = table_cols_alloc(&c, t->dpad, storage, capacity, false, err))) goto out;
    table_cols_set(t, &c);
    t->capacity = capacity;
    *out = t;
    t = NULL;
out:
    kernels_table_destroy(t);
    return rc;
}

void kernels_table_destroy(kernels_table *t)
{
    if (!t) return;
    (void)cudaSetDevice(t->dev->ordinal);
    if (t->stream) (void)cudaStreamSynchronize(t->stream);
    if (t->read_stream) (void)cudaStreamSynchronize(t->read_stream);
    table_cols c = table_cols_of(t);
    table_cols_free(&c);
    if (t->staging) (void)cudaFree(t->staging);
    if (t->read_staging) (void)cudaFree(t->read_staging);
    if (t->stream) (void)cudaStreamDestroy(t->stream);
    if (t->read_stream) (void)cudaStreamDestroy(t->read_stream);
    (void)cudaGetLastError();
    pthread_mutex_destroy(&t->read_lock);
    free(t);
}

uint32_t kernels_table_count(const kernels_table *t)
{
    return t ? t->count : 0;
}

uint32_t kernels_table_capacity(const kernels_table *t)
{
    return t ? t->capacity : 0;
}

uint32_t kernels_table_dim(const kernels_table *t)
{
    return t ? t->dim : 0;
}

uint64_t kernels_table_bytes(const kernels_table *t)
{
    if (!t) return 0;
    uint64_t rows = t->capacity ? t->capacity : 1;
    return rows * kernels_table_row_bytes(t->dim, t->storage) +
           (t->tags ? rows * 4 * KERNELS_MAX_TAGS : 0) + t->staging_bytes + t->read_staging_bytes;
}

int kernels_table_reserve(kernels_table *t, uint32_t capacity, kernels_err *err)
{
    int rc = 0;
    table_cols nc, oc;
    memset(&nc, 0, sizeof nc);
    if (capacity <= t->capacity) return 0;
    if (capacity > KERNELS_MAX_ROWS)
        return kernels__fail(err, AFF_EFULL, "table: %u rows requested, at most %u", capacity,
                             KERNELS_MAX_ROWS);
    KCUDA(err, cudaSetDevice(t->dev->ordinal));
    if ((rc = table_cols_alloc(&nc, t->dpad, t->storage, capacity, t->tags != NULL, err))) goto out;
    if (t->count) {
        size_t n = t->count;
        cudaStream_t s = t->stream;
        KCUDA(err,
              cudaMemcpyAsync(nc.vectors, t->vectors, n * t->dpad * kernels__elem_bytes(t->storage),
                              cudaMemcpyDeviceToDevice, s));
        KCUDA(err, cudaMemcpyAsync(nc.norms, t->norms, n * 4, cudaMemcpyDeviceToDevice, s));
        KCUDA(err, cudaMemcpyAsync(nc.category, t->category, n * 4, cudaMemcpyDeviceToDevice, s));
        KCUDA(err, cudaMemcpyAsync(nc.price, t->price, n * 4, cudaMemcpyDeviceToDevice, s));
        KCUDA(err, cudaMemcpyAsync(nc.flags, t->flags, n * 4, cudaMemcpyDeviceToDevice, s));
        KCUDA(err, cudaMemcpyAsync(nc.bloom, t->bloom, n * 8, cudaMemcpyDeviceToDevice, s));
        if (t->tags)
            KCUDA(err, cudaMemcpyAsync(nc.tags, t->tags, n * 4 * KERNELS_MAX_TAGS,
                                       cudaMemcpyDeviceToDevice, s));
        KCUDA(err, cudaStreamSynchronize(s));
    }
    oc = table_cols_of(t);
    table_cols_set(t, &nc);
    t->capacity = capacity;
    table_cols_free(&oc);
    memset(&nc, 0, sizeof nc);
out:
    if (rc) kernels__drain(t->stream); /* copies into nc may still be queued */
    table_cols_free(&nc);
    return rc;
}

/* One block per written row: convert, pad, norm, attributes. attrs NULL: defaults. */
template <typename T>
__global__ void table_write_rows(T *x, uint32_t dim, uint32_t dpad, float *norms,
                                 uint32_t *category, float *price, uint32_t *flags, uint64_t *bloom,
                                 uint32_t *tags, const uint32_t *rows, const float *vec,
                                 const kernels_row_attrs *attrs)
{
    __shared__ float red[32];
    const uint32_t i = blockIdx.x, row = rows[i];
    float acc = 0.0f;
    for (uint32_t j = threadIdx.x; j < dpad; j += blockDim.x) {
        float v = j < dim ? vec[(size_t)i * dim + j] : 0.0f;
        kernels__store(x, (size_t)row * dpad + j, v);
        float r = kernels__round(x, v);
        acc += r * r;
    }
    float sum = kernels__block_sum(acc, red);
    uint32_t nt = attrs && tags ? min(attrs[i].n_tags, KERNELS_MAX_TAGS) : 0;
    if (threadIdx.x == 0) {
        norms[row] = sum;
        category[row] = attrs ? attrs[i].category : 0;
        price[row] = attrs ? attrs[i].price : 0.0f;
        flags[row] = (attrs ? (attrs[i].available ? 1u : 0u) : 1u) | (nt << 8);
        bloom[row] = attrs ? attrs[i].tag_bloom : 0ull;
    }
    for (uint32_t k = threadIdx.x; tags && k < KERNELS_MAX_TAGS; k += blockDim.x)
        tags[(size_t)row * KERNELS_MAX_TAGS + k] = k < nt ? attrs[i].tags[k] : 0u;
}

int kernels_table_write(kernels_table *t, const uint32_t *rows, uint32_t n, const float *vectors,
                        const kernels_row_attrs *attrs, uint32_t new_count, kernels_err *err)
{
    int rc = 0;
    if (new_count > t->capacity)
        return kernels__fail(err, AFF_EINTERNAL, "table write: count %u beyond capacity %u",
                             new_count, t->capacity);
    for (uint32_t i = 0; i < n; i++)
        if (rows[i] >= t->capacity)
            return kernels__fail(err, AFF_EINTERNAL, "table write: row %u beyond capacity %u",
                                 rows[i], t->capacity);
    const size_t per_row = (size_t)t->dim * 4 + 4 + sizeof(kernels_row_attrs);
    uint32_t chunk = (uint32_t)(TABLE_STAGING_MAX / per_row);
    if (chunk == 0) chunk = 1;
    KCUDA(err, cudaSetDevice(t->dev->ordinal));
    if (attrs && !t->tags) {
        /* The tag column appears with the first tagged row (64 bytes a row). */
        bool any = false;
        for (uint32_t i = 0; i < n && !any; i++)
            any = attrs[i].n_tags > 0;
        if (any) {
            size_t tb = (size_t)(t->capacity ? t->capacity : 1) * 4 * KERNELS_MAX_TAGS;
            cudaError_t e = cudaMalloc((void **)&t->tags, tb);
            if (e != cudaSuccess) {
                (void)cudaGetLastError();
                t->tags = NULL;
                rc = kernels__fail(err, e == cudaErrorMemoryAllocation ? AFF_ENOMEM : AFF_EDEVICE,
                                   "device memory: the tag column of %u rows needs %zu bytes (%s)",
                                   t->capacity, tb, cudaGetErrorString(e));
                if (err) err->context_lost = kernels__sticky(e);
                goto out;
            }
            KCUDA(err, cudaMemsetAsync(t->tags, 0, tb, t->stream));
        }
    }
    for (uint32_t i0 = 0; i0 < n; i0 += chunk) {
        uint32_t m = n - i0 < chunk ? n - i0 : chunk;
        size_t vec_b = (size_t)m * t->dim * 4;
        size_t rows_off = align16(vec_b), attrs_off = align16(rows_off + (size_t)m * 4);
        size_t total = attrs_off + (attrs ? (size_t)m * sizeof(kernels_row_attrs) : 0);
        if ((rc = table_staging(t, total, err))) goto out;
        char *st = (char *)t->staging;
        KCUDA(err, cudaMemcpyAsync(st, vectors + (size_t)i0 * t->dim, vec_b, cudaMemcpyHostToDevice,
                                   t->stream));
        KCUDA(err, cudaMemcpyAsync(st + rows_off, rows + i0, (size_t)m * 4, cudaMemcpyHostToDevice,
                                   t->stream));
        if (attrs)
            KCUDA(err,
                  cudaMemcpyAsync(st + attrs_off, attrs + i0, (size_t)m * sizeof(kernels_row_attrs),
                                  cudaMemcpyHostToDevice, t->stream));
        const kernels_row_attrs *d_attrs =
            attrs ? (const kernels_row_attrs *)(st + attrs_off) : NULL;
        if (t->storage == KERNELS_STORAGE_FP16) {
            KERNELS_LAUNCH(table_write_rows<__half>, m, 128, 0, t->stream)
            ((__half *)t->vectors, t->dim, t->dpad, t->norms, t->category, t->price, t->flags,
             t->bloom, t->tags, (const uint32_t *)(st + rows_off), (const float *)st, d_attrs);
        } else {
            KERNELS_LAUNCH(table_write_rows<float>, m, 128, 0, t->stream)
            ((float *)t->vectors, t->dim, t->dpad, t->norms, t->category, t->price, t->flags,
             t->bloom, t->tags, (const uint32_t *)(st + rows_off), (const float *)st, d_attrs);
        }
        KLAUNCH(err);
        KCUDA(err, cudaStreamSynchronize(t->stream));
    }
    t->count = new_count;
out:
    if (rc) kernels__drain(t->stream);
    return rc;
}

/* One block per move: vector, norm and attributes of row src[i] onto row dst[i]. */
template <typename T>
__global__ void table_move_rows(T *x, uint32_t dpad, float *norms, uint32_t *category, float *price,
                                uint32_t *flags, uint64_t *bloom, uint32_t *tags,
                                const uint32_t *src, const uint32_t *dst)
{
    const uint32_t s = src[blockIdx.x], d = dst[blockIdx.x];
    if (s == d) return;
    for (uint32_t j = threadIdx.x; j < dpad; j += blockDim.x)
        x[(size_t)d * dpad + j] = x[(size_t)s * dpad + j];
    if (threadIdx.x == 0) {
        norms[d] = norms[s];
        category[d] = category[s];
        price[d] = price[s];
        flags[d] = flags[s];
        bloom[d] = bloom[s];
    }
    for (uint32_t k = threadIdx.x; tags && k < KERNELS_MAX_TAGS; k += blockDim.x)
        tags[(size_t)d * KERNELS_MAX_TAGS + k] = tags[(size_t)s * KERNELS_MAX_TAGS + k];
}

int kernels_table_move(kernels_table *t, const uint32_t *src, const uint32_t *dst, uint32_t n,
                       uint32_t new_count, kernels_err *err)
{
    int rc = 0;
    if (new_count > t->capacity)
        return kernels__fail(err, AFF_EINTERNAL, "table move: count %u beyond capacity %u",
                             new_count, t->capacity);
    for (uint32_t i = 0; i < n; i++)
        if (src[i] >= t->capacity || dst[i] >= t->capacity)
            return kernels__fail(err, AFF_EINTERNAL, "table move: row beyond capacity %u",
                                 t->capacity);
    const uint32_t chunk = (uint32_t)(TABLE_STAGING_MAX / 8);
    KCUDA(err, cudaSetDevice(t->dev->ordinal));
    for (uint32_t i0 = 0; i0 < n; i0 += chunk) {
        uint32_t m = n - i0 < chunk ? n - i0 : chunk;
        size_t dst_off = align16((size_t)m * 4);
        if ((rc = table_staging(t, dst_off + (size_t)m * 4, err))) goto out;
        char *st = (char *)t->staging;
        KCUDA(err, cudaMemcpyAsync(st, src + i0, (size_t)m * 4, cudaMemcpyHostToDevice, t->stream));
        KCUDA(err, cudaMemcpyAsync(st + dst_off, dst + i0, (size_t)m * 4, cudaMemcpyHostToDevice,
                                   t->stream));
        if (t->storage == KERNELS_STORAGE_FP16) {
            KERNELS_LAUNCH(table_move_rows<__half>, m, 128, 0, t->stream)
            ((__half *)t->vectors, t->dpad, t->norms, t->category, t->price, t->flags, t->bloom,
             t->tags, (const uint32_t *)st, (const uint32_t *)(st + dst_off));
        } else {
            KERNELS_LAUNCH(table_move_rows<float>, m, 128, 0, t->stream)
            ((float *)t->vectors, t->dpad, t->norms, t->category, t->price, t->flags, t->bloom,
             t->tags, (const uint32_t *)st, (const uint32_t *)(st + dst_off));
        }
        KLAUNCH(err);
        KCUDA(err, cudaStreamSynchronize(t->stream));
    }
    t->count = new_count;
out:
    if (rc) kernels__drain(t->stream);
    return rc;
}

template <typename T>
__global__ void table_read_rows(const T *x, uint32_t dim, uint32_t dpad, const uint32_t *rows,
                                float *out)
{
    const uint32_t i = blockIdx.x, row = rows[i];
    for (uint32_t j = threadIdx.x; j < dim; j += blockDim.x)
        out[(size_t)i * dim + j] = kernels__load(x, (size_t)row * dpad + j);
}

int kernels_table_read(kernels_table *t, const uint32_t *rows, uint32_t n, float *out,
                       kernels_err *err)
{
    int rc = 0;
    for (uint32_t i = 0; i < n; i++)
        if (rows[i] >= t->count)
            return kernels__fail(err, AFF_EINVAL, "table read: row %u beyond count %u", rows[i],
                                 t->count);
    const size_t per_row = (size_t)t->dim * 4 + 4;
    uint32_t chunk = (uint32_t)(TABLE_STAGING_MAX / per_row);
    if (chunk == 0) chunk = 1;
    /* Concurrent readers (GetItems, SimilarItems by id) share the read stream and staging one
     * at a time; they never touch the writers' staging (writers hold the engine's lock alone). */
    pthread_mutex_lock(&t->read_lock);
    KCUDA(err, cudaSetDevice(t->dev->ordinal));
    for (uint32_t i0 = 0; i0 < n; i0 += chunk) {
        uint32_t m = n - i0 < chunk ? n - i0 : chunk;
        size_t out_off = align16((size_t)m * 4);
        if ((rc = staging_reserve(&t->read_staging, &t->read_staging_bytes,
                                  out_off + (size_t)m * t->dim * 4, err)))
            goto out;
        char *st = (char *)t->read_staging;
        KCUDA(err, cudaMemcpyAsync(st, rows + i0, (size_t)m * 4, cudaMemcpyHostToDevice,
                                   t->read_stream));
        if (t->storage == KERNELS_STORAGE_FP16) {
            KERNELS_LAUNCH(table_read_rows<__half>, m, 128, 0, t->read_stream)
            ((const __half *)t->vectors, t->dim, t->dpad, (const uint32_t *)st,
             (float *)(st + out_off));
        } else {
            KERNELS_LAUNCH(table_read_rows<float>, m, 128, 0, t->read_stream)
            ((const float *)t->vectors, t->dim, t->dpad, (const uint32_t *)st,
             (float *)(st + out_off));
        }
        KLAUNCH(err);
        KCUDA(err, cudaMemcpyAsync(out + (size_t)i0 * t->dim, st + out_off, (size_t)m * t->dim * 4,
                                   cudaMemcpyDeviceToHost, t->read_stream));
        KCUDA(err, cudaStreamSynchronize(t->read_stream));
    }
out:
    if (rc) kernels__drain(t->read_stream);
    pthread_mutex_unlock(&t->read_lock);
    return rc;
}

template <typename T>
__global__ void table_fill_values(T *x, uint32_t dim, uint32_t dpad, uint32_t row0, uint32_t n,
                                  uint64_t seed)
{
    const size_t total = (size_t)n * dpad;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t row = row0 + e / dpad;
        uint32_t col = (uint32_t)(e % dpad);
        float v = col < dim ? kernels_bench_value(seed, (uint64_t)row * dim + col) : 0.0f;
        kernels__store(x, row * dpad + col, v);
    }
}

template <typename T>
__global__ void table_fill_norms(const T *x, uint32_t dpad, uint32_t row0, float *norms,
                                 uint32_t *flags)
{
    __shared__ float red[32];
    const size_t row = row0 + blockIdx.x;
    float acc = 0.0f;
    for (uint32_t j = threadIdx.x; j < dpad; j += blockDim.x) {
        float v = kernels__load(x, row * dpad + j);
        acc += v * v;
    }
    float sum = kernels__block_sum(acc, red);
    if (threadIdx.x == 0) {
        norms[row] = sum;
        flags[row] = 1u;
    }
}

int kernels_table_fill_random(kernels_table *t, uint32_t n, uint64_t seed, kernels_err *err)
{
    int rc = 0;
    const uint32_t r0 = t->count;
    if ((uint64_t)r0 + n > t->capacity)
        return kernels__fail(err, AFF_EINVAL, "fill: %u + %u rows beyond capacity %u", r0, n,
                             t->capacity);
    if (n == 0) return 0;
    KCUDA(err, cudaSetDevice(t->dev->ordinal));
    KCUDA(err, cudaMemsetAsync(t->category + r0, 0, (size_t)n * 4, t->stream));
    KCUDA(err, cudaMemsetAsync(t->price + r0, 0, (size_t)n * 4, t->stream));
    KCUDA(err, cudaMemsetAsync(t->bloom + r0, 0, (size_t)n * 8, t->stream));
    if (t->tags)
        KCUDA(err, cudaMemsetAsync(t->tags + (size_t)r0 * KERNELS_MAX_TAGS, 0,
                                   (size_t)n * 4 * KERNELS_MAX_TAGS, t->stream));
    if (t->storage == KERNELS_STORAGE_FP16) {
        KERNELS_LAUNCH(table_fill_values<__half>, 4096, 256, 0, t->stream)
        ((__half *)t->vectors, t->dim, t->dpad, r0, n, seed);
        KLAUNCH(err);
        KERNELS_LAUNCH(table_fill_norms<__half>, n, 128, 0, t->stream)
        ((const __half *)t->vectors, t->dpad, r0, t->norms, t->flags);
    } else {
        KERNELS_LAUNCH(table_fill_values<float>, 4096, 256, 0, t->stream)
        ((float *)t->vectors, t->dim, t->dpad, r0, n, seed);
        KLAUNCH(err);
        KERNELS_LAUNCH(table_fill_norms<float>, n, 128, 0, t->stream)
        ((const float *)t->vectors, t->dpad, r0, t->norms, t->flags);
    }
    KLAUNCH(err);
    KCUDA(err, cudaStreamSynchronize(t->stream));
    t->count = r0 + n;
out:
    if (rc) kernels__drain(t->stream);
    return rc;
}

/*
 * backend_gpu.c: the CUDA backend — backend_ops on top of kernels/affinity_kernels.h, the only
 * CUDA-facing header it includes (no CUDA type appears here).
 *
 * Owns: the opened device, a small pool of workspaces (each a stream, a cuBLAS handle, pinned
 * buffers and device scratch; a search or score call takes one for its duration, so concurrent
 * calls run on different streams and overlap), and per table a kernels_table on the device.
 * Validates everything the kernels assume: rows in range, appends in order, finite values,
 * k ≤ KERNELS_MAX_K. Writes grow capacity geometrically (gpu_plan_capacity); moves are cut into
 * conflict-free batches (gpu_plan_move_batches) so each batch is one parallel device copy.
 *
 * Errors: a CUDA error is AFF_EDEVICE with the runtime's reason; running out of device memory
 * on a write is AFF_ENOMEM with the bytes that were needed. Nothing aborts.
 *
 * Host copy and device faults: every table keeps a host copy of its rows (fp32 vectors as
 * written and their attributes; N × dim × 4 bytes plus 80 a row of host memory). Reads
 * (GetItems, SimilarItems by id) are served from it, so they never touch the device. A sticky
 * device fault (illegal address, launch failure, ECC: the CUDA context is lost for the rest of
 * the process) is not recovered: the backend marks itself faulted, and each table, on its next
 * call, is handed to a FAISS CPU table rebuilt from the host copy; the call that met the fault
 * is retried there, so no request fails for it. backend_info reports the fault (device_faults,
 * tables_on_cpu, the first reason), the engine passes it to ServerInfo and /metrics.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "gpu_plan.h"
#include "log.h"
#include "status.h"

_Static_assert(KERNELS_MAX_TAGS == AFF_MAX_TAGS_PER_ITEM, "tag columns must hold every tag");
_Static_assert(KERNELS_MAX_K >= AFF_MAX_K, "selection kernels must cover the engine's k");

#define GPU_WORKSPACES        2
#define GPU_DEFAULT_MAX_BATCH 1024u

typedef struct gpu_slot {
    kernels_workspace *ws;
    kernels_filter *filters; /* host, filters_cap entries */
    uint32_t filters_cap;
    gpu_filter_arena arena;
    bool busy;
} gpu_slot;

typedef struct gpu_backend {
    backend base;
    kernels_device *dev;
    kernels_device_info info;
    bool fp32;
    backend_faiss_config fallback_cfg;
    pthread_mutex_t lock; /* slots, fault_msg, cpu */
    pthread_cond_t cond;
    gpu_slot slots[GPU_WORKSPACES];
    _Atomic uint64_t table_bytes; /* sum of kernels_table_bytes over live tables */
    /* Device faults: once faulted, every table moves to `cpu` on its next call. */
    atomic_bool faulted;
    _Atomic uint64_t faults;
    _Atomic uint32_t tables_on_cpu;
    char fault_msg[256];
    backend *cpu; /* the FAISS fallback, created with the first handover */
} gpu_backend;

/* The host copy of a table's rows, in row order (see the file comment). */
typedef struct gpu_mirror {
    float *vec;
    backend_row_attrs *attrs;
    uint32_t n, cap;
} gpu_mirror;

typedef struct gpu_table {
    backend_table base;
    gpu_backend *b;
    kernels_table *kt; /* NULL for a table created after a device fault */
    uint32_t dim;
    backend_table_params params;
    uint64_t bytes; /* this table's share of b->table_bytes */
    gpu_mirror mirror;
    pthread_mutex_t cpu_lock;     /* serializes the handover */
    _Atomic(backend_table *) cpu; /* set once handed to the CPU; then every call goes there */
} gpu_table;

static const backend_ops gpu_ops;
static void gpu_table_destroy(backend_table *bt);
static uint32_t gpu_table_count(const backend_table *bt);

static int gpu_fail(aff_err *err, const kernels_err *kerr)
{
    return aff__fail(err, kerr->code ? kerr->code : AFF_EDEVICE, "%s", kerr->msg);
}

/* ---- host copy ------------------------------------------------------------------------------ */

static void mirror_free(gpu_mirror *m)
{
    free(m->vec);
    free(m->attrs);
    memset(m, 0, sizeof *m);
}

/* Room for `rows` rows; contents kept. */
static int mirror_reserve(gpu_mirror *m, uint32_t dim, uint64_t rows, aff_err *err)
{
    if (rows <= m->cap) return AFF_OK;
    uint64_t cap = (uint64_t)m->cap + m->cap / 2;
    if (cap < rows) cap = rows;
    if (cap < 64) cap = 64;
    float *v = realloc(m->vec, (size_t)cap * dim * sizeof *v);
    if (!v)
        return aff__fail(err, AFF_ENOMEM, "out of host memory for %llu rows",
                         (unsigned long long)cap);
    m->vec = v;
    backend_row_attrs *a = realloc(m->attrs, (size_t)cap * sizeof *a);
    if (!a)
        return aff__fail(err, AFF_ENOMEM, "out of host memory for %llu rows",
                         (unsigned long long)cap);
    m->attrs = a;
    m->cap = (uint32_t)cap;
    return AFF_OK;
}

/* Applies a validated write (capacity reserved): in order, so a repeated row keeps the last. */
static void mirror_write(gpu_mirror *m, uint32_t dim, const uint32_t *rows, uint32_t n,
                         const float *vectors, const backend_row_attrs *attrs)
{
    for (uint32_t i = 0; i < n; i++) {
        memcpy(m->vec + (size_t)rows[i] * dim, vectors + (size_t)i * dim, dim * sizeof(float));
        m->attrs[rows[i]] = attrs[i];
        if (rows[i] >= m->n) m->n = rows[i] + 1;
    }
}

static void mirror_move(gpu_mirror *m, uint32_t dim, const uint32_t *src, const uint32_t *dst,
                        uint32_t n, uint32_t new_count)
{
    for (uint32_t i = 0; i < n; i++) {
        if (src[i] == dst[i]) continue;
        memcpy(m->vec + (size_t)dst[i] * dim, m->vec + (size_t)src[i] * dim, dim * sizeof(float));
        m->attrs[dst[i]] = m->attrs[src[i]];
    }
    m->n = new_count;
}

/* ---- device faults and the CPU handover ----------------------------------------------------- */

/* Records a call that found the context lost; the first one is logged and kept as the reason. */
static void gpu_note_fault(gpu_backend *b, const kernels_err *kerr)
{
    atomic_fetch_add(&b->faults, 1);
    pthread_mutex_lock(&b->lock);
    bool first = !atomic_load(&b->faulted);
    if (first) {
        snprintf(b->fault_msg, sizeof b->fault_msg, "%s", kerr->msg);
        atomic_store(&b->faulted, true);
    }
    pthread_mutex_unlock(&b->lock);
    if (first)
        aff_log_kv(AFF_LOG_ERROR,
                   "GPU device fault: the CUDA context is lost; every collection moves to FAISS "
                   "on the CPU on its next call",
                   "reason", kerr->msg, NULL);
}

static int gpu_cpu_backend(gpu_backend *b, backend **out, aff_err *err)
{
    int rc = AFF_OK;
    pthread_mutex_lock(&b->lock);
    if (!b->cpu) rc = backend_faiss_create(&b->cpu, &b->fallback_cfg, err);
    *out = b->cpu;
    pthread_mutex_unlock(&b->lock);
    return rc;
}

/* The table's CPU copy, built from the host copy on first use. Safe from concurrent readers. */
static int gpu_handover(gpu_table *t, backend_table **out, aff_err *err)
{
    int rc = AFF_OK;
    backend_table *c = atomic_load(&t->cpu);
    uint32_t *rows = NULL;
    if (c) {
        *out = c;
        return AFF_OK;
    }
    pthread_mutex_lock(&t->cpu_lock);
    c = atomic_load(&t->cpu);
    if (!c) {
        backend *cpu = NULL;
        if ((rc = gpu_cpu_backend(t->b, &cpu, err))) goto out;
        backend_table_params p = t->params;
        p.initial_capacity = t->mirror.n;
        if ((rc = cpu->ops->table_create(cpu, &p, &c, err))) goto out;
        enum { CHUNK = 8192 };
        rows = malloc(CHUNK * sizeof *rows);
        if (!rows) rc = aff__fail(err, AFF_ENOMEM, "out of memory moving a table to the CPU");
        for (uint32_t r0 = 0; !rc && r0 < t->mirror.n; r0 += CHUNK) {
            uint32_t m = t->mirror.n - r0 < CHUNK ? t->mirror.n - r0 : CHUNK;
            for (uint32_t i = 0; i < m; i++)
                rows[i] = r0 + i;
            rc = c->ops->table_write(c, rows, m, t->mirror.vec + (size_t)r0 * t->dim,
                                     t->mirror.attrs + r0, err);
        }
        if (rc) {
            c->ops->table_destroy(c);
            c = NULL;
            goto out;
        }
        atomic_store(&t->cpu, c);
        atomic_fetch_add(&t->b->tables_on_cpu, 1);
        char n[24];
        snprintf(n, sizeof n, "%u", t->mirror.n);
        aff_log_kv(AFF_LOG_WARN, "table handed to the CPU backend after a device fault", "rows", n,
                   NULL);
    }
out:
    pthread_mutex_unlock(&t->cpu_lock);
    free(rows);
    *out = c;
    return rc;
}

/* The CPU table to use instead of the device: already handed over, or the backend is faulted
 * (then hands over now). *cpu NULL: use the device. */
static int gpu_route(gpu_table *t, backend_table **cpu, aff_err *err)
{
    *cpu = atomic_load(&t->cpu);
    if (*cpu || !atomic_load(&t->b->faulted)) return AFF_OK;
    return gpu_handover(t, cpu, err);
}

/* Brings the backend's byte total in line with the table's current size. */
static void gpu_table_account(gpu_table *t)
{
    uint64_t now = t->kt ? kernels_table_bytes(t->kt) : 0;
    if (now >= t->bytes)
        atomic_fetch_add(&t->b->table_bytes, now - t->bytes);
    else
        atomic_fetch_sub(&t->b->table_bytes, t->bytes - now);
    t->bytes = now;
}

static gpu_slot *gpu_slot_acquire(gpu_backend *b)
{
    pthread_mutex_lock(&b->lock);
    for (;;) {
        for (int i = 0; i < GPU_WORKSPACES; i++) {
            if (!b->slots[i].busy) {
                b->slots[i].busy = true;
                pthread_mutex_unlock(&b->lock);
                return &b->slots[i];
            }
        }
        pthread_cond_wait(&b->cond, &b->lock);
    }
}

static void gpu_slot_release(gpu_backend *b, gpu_slot *s)
{
    pthread_mutex_lock(&b->lock);
    s->busy = false;
    pthread_cond_signal(&b->cond);
    pthread_mutex_unlock(&b->lock);
}

static void gpu_destroy(backend *base)
{
    gpu_backend *b = (gpu_backend *)base;
    if (!b) return;
    for (int i = 0; i < GPU_WORKSPACES; i++) {
        kernels_workspace_destroy(b->slots[i].ws);
        free(b->slots[i].filters);
        gpu_filter_arena_free(&b->slots[i].arena);
    }
    kernels_device_close(b->dev);
    if (b->cpu) b->cpu->ops->destroy(b->cpu);
    pthread_cond_destroy(&b->cond);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

static void gpu_describe(backend *base, backend_info *out)
{
    gpu_backend *b = (gpu_backend *)base;
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "cuda");
    snprintf(out->device, sizeof out->device, "%.127s", b->info.name);
    uint64_t used = atomic_load(&b->table_bytes);
    pthread_mutex_lock(&b->lock);
    for (int i = 0; i < GPU_WORKSPACES; i++)
        if (!b->slots[i].busy) used += kernels_workspace_bytes(b->slots[i].ws);
    pthread_mutex_unlock(&b->lock);
    out->memory_used = used;
    out->memory_total = b->info.memory_total;
    out->max_abs_component = b->fp32 ? 0.0f : 65504.0f;
    out->device_faults = atomic_load(&b->faults);
    out->tables_on_cpu = atomic_load(&b->tables_on_cpu);
    pthread_mutex_lock(&b->lock);
    snprintf(out->fault, sizeof out->fault, "%s", b->fault_msg);
    pthread_mutex_unlock(&b->lock);
}

static int gpu_table_create(backend *base, const backend_table_params *p, backend_table **out,
                            aff_err *err)
{
    gpu_backend *b = (gpu_backend *)base;
    kernels_err kerr = {0};
    *out = NULL;
    if (p->dim == 0 || p->dim > AFF_MAX_DIM)
        return aff__fail(err, AFF_EINVAL, "dimension %u outside 1..%u", p->dim, AFF_MAX_DIM);
    gpu_table *t = calloc(1, sizeof *t);
    if (!t) return aff__fail(err, AFF_ENOMEM, "out of memory creating a table");
    t->base.ops = &gpu_ops;
    t->b = b;
    t->dim = p->dim;
    t->params = *p;
    pthread_mutex_init(&t->cpu_lock, NULL);
    atomic_init(&t->cpu, NULL);
    uint32_t cap = p->initial_capacity ? p->initial_capacity : GPU_PLAN_MIN_CAPACITY;
    if (cap > KERNELS_MAX_ROWS) cap = KERNELS_MAX_ROWS;
    int rc = AFF_OK;
    if (!atomic_load(&b->faulted)) {
        /* HNSW is a CPU index; on the GPU every collection is searched exactly. */
        rc = kernels_table_create(
            &t->kt, b->dev, p->dim, b->fp32 ? KERNELS_STORAGE_FP32 : KERNELS_STORAGE_FP16,
            p->metric == AFF_METRIC_L2 ? KERNELS_METRIC_L2 : KERNELS_METRIC_IP, cap, &kerr);
        if (rc && kerr.context_lost) {
            gpu_note_fault(b, &kerr);
            rc = AFF_OK;
        } else if (rc) {
            rc = gpu_fail(err, &kerr);
        }
    }
    backend_table *cpu = NULL;
    if (!rc && !t->kt) rc = gpu_handover(t, &cpu, err); /* faulted: straight to the CPU */
    if (rc) {
        gpu_table_destroy(&t->base);
        return rc;
    }
    gpu_table_account(t);
    *out = &t->base;
    return AFF_OK;
}

static void gpu_table_destroy(backend_table *bt)
{
    gpu_table *t = (gpu_table *)bt;
    if (!t) return;
    atomic_fetch_sub(&t->b->table_bytes, t->bytes);
    kernels_table_destroy(t->kt);
    backend_table *cpu = atomic_load(&t->cpu);
    if (cpu) {
        cpu->ops->table_destroy(cpu);
        atomic_fetch_sub(&t->b->tables_on_cpu, 1);
    }
    mirror_free(&t->mirror);
    pthread_mutex_destroy(&t->cpu_lock);
    free(t);
}

static int gpu_table_write(backend_table *bt, const uint32_t *rows, uint32_t n,
                           const float *vectors, const backend_row_attrs *attrs, aff_err *err)
{
    gpu_table *t = (gpu_table *)bt;
    kernels_err kerr = {0};
    int rc = AFF_OK;
    uint32_t *keep = NULL, *krows = NULL;
    float *kvec = NULL;
    kernels_row_attrs *kattrs = NULL;
    const uint32_t count = gpu_table_count(&t->base), dim = t->dim;

    uint64_t next = count;
    for (uint32_t i = 0; i < n; i++) {
        if (rows[i] < count) continue;
        if (rows[i] != next)
            return aff__fail(err, AFF_EINVAL,
                             "write %u: row %u is neither stored (< %u) nor the "
                             "next append (%llu)",
                             i, rows[i], count, (unsigned long long)next);
        next++;
    }
    if (next > KERNELS_MAX_ROWS)
        return aff__fail(err, AFF_EFULL, "a GPU table holds at most %u rows", KERNELS_MAX_ROWS);
    /* fp16 holds magnitudes up to 65504; larger components would become infinite. */
    const float limit = t->b->fp32 ? INFINITY : 65504.0f;
    for (size_t j = 0; j < (size_t)n * dim; j++) {
        if (!isfinite(vectors[j]))
            return aff__fail(err, AFF_EINVAL, "write %zu: vector component %zu is not finite",
                             j / dim, j % dim);
        if (fabsf(vectors[j]) > limit)
            return aff__fail(err, AFF_EINVAL,
                             "write %zu: vector component %zu (%g) exceeds the fp16 range of the "
                             "GPU catalog (|x| <= 65504; start the server with fp32 storage)",
                             j / dim, j % dim, (double)vectors[j]);
    }
    for (uint32_t i = 0; i < n; i++) {
        if (!isfinite(attrs[i].price))
            return aff__fail(err, AFF_EINVAL, "write %u: price is not finite", i);
        if (attrs[i].n_tags > KERNELS_MAX_TAGS)
            return aff__fail(err, AFF_EINVAL, "write %u: %u tags, at most %u", i, attrs[i].n_tags,
                             KERNELS_MAX_TAGS);
    }
    if (n == 0) return AFF_OK;
    backend_table *cpu = NULL;
    if ((rc = gpu_route(t, &cpu, err))) return rc;
    if (cpu) return cpu->ops->table_write(cpu, rows, n, vectors, attrs, err);
    if ((rc = mirror_reserve(&t->mirror, dim, next, err))) return rc;

    uint32_t m = 0;
    keep = malloc((size_t)n * sizeof *keep);
    krows = malloc((size_t)n * sizeof *krows);
    kattrs = malloc((size_t)n * sizeof *kattrs);
    if (!keep || !krows || !kattrs || gpu_plan_dedupe_rows(rows, n, keep, &m) != 0) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory writing %u rows", n);
        goto out;
    }
    const float *vsrc = vectors;
    if (m < n) {
        /* A row written twice: the last write wins, as if applied in order. */
        kvec = malloc((size_t)m * dim * sizeof *kvec);
        if (!kvec) {
            rc = aff__fail(err, AFF_ENOMEM, "out of memory writing %u rows", n);
            goto out;
        }
        for (uint32_t j = 0; j < m; j++)
            memcpy(kvec + (size_t)j * dim, vectors + (size_t)keep[j] * dim, dim * sizeof *kvec);
        vsrc = kvec;
    }
    for (uint32_t j = 0; j < m; j++) {
        const backend_row_attrs *a = &attrs[keep[j]];
        kernels_row_attrs *k = &kattrs[j];
        memset(k, 0, sizeof *k);
        krows[j] = rows[keep[j]];
        k->category = a->category;
        k->n_tags = a->n_tags;
        memcpy(k->tags, a->tags, a->n_tags * sizeof a->tags[0]);
        k->tag_bloom = a->tag_bloom;
        k->price = a->price;
        k->available = a->available ? 1 : 0;
    }

    uint32_t cap = kernels_table_capacity(t->kt);
    uint32_t want = gpu_plan_capacity(cap, next);
    if (want > cap && kernels_table_reserve(t->kt, want, &kerr) != 0) {
        if (kerr.code == AFF_ENOMEM && !kerr.context_lost && want > next) {
            /* Geometric growth did not fit; try the exact size before giving up. */
            memset(&kerr, 0, sizeof kerr);
            if (kernels_table_reserve(t->kt, (uint32_t)next, &kerr) != 0) goto dev_fail;
        } else {
            goto dev_fail;
        }
    }
    if (kernels_table_write(t->kt, krows, m, vsrc, kattrs, (uint32_t)next, &kerr) != 0)
        goto dev_fail;
    mirror_write(&t->mirror, dim, rows, n, vectors, attrs);
    goto out;
dev_fail:
    if (kerr.context_lost) {
        /* The write is valid: keep it in the host copy, which the CPU table is built from. */
        gpu_note_fault(t->b, &kerr);
        mirror_write(&t->mirror, dim, rows, n, vectors, attrs);
        rc = gpu_handover(t, &cpu, err);
    } else {
        rc = gpu_fail(err, &kerr);
    }
out:
    gpu_table_account(t);
    free(keep);
    free(krows);
    free(kvec);
    free(kattrs);
    return rc;
}

static int gpu_table_move(backend_table *bt, const uint32_t *src, const uint32_t *dst, uint32_t n,
                          uint32_t new_count, aff_err *err)
{
    gpu_table *t = (gpu_table *)bt;
    kernels_err kerr = {0};
    int rc = AFF_OK;
    uint32_t *ends = NULL, nb = 0;
    const uint32_t count = gpu_table_count(&t->base);
    if (new_count > count)
        return aff__fail(err, AFF_EINVAL, "move: new count %u above count %u", new_count, count);
    for (uint32_t i = 0; i < n; i++)
        if (src[i] >= count || dst[i] >= count)
            return aff__fail(err, AFF_EINVAL, "move %u: rows %u -> %u outside 0..%u", i, src[i],
                             dst[i], count);
    backend_table *cpu = NULL;
    if ((rc = gpu_route(t, &cpu, err))) return rc;
    if (cpu) return cpu->ops->table_move(cpu, src, dst, n, new_count, err);
    if (n == 0) {
        if (kernels_table_move(t->kt, NULL, NULL, 0, new_count, &kerr) != 0) goto dev_fail;
        mirror_move(&t->mirror, t->dim, src, dst, 0, new_count);
        goto out;
    }
    ends = malloc((size_t)n * sizeof *ends);
    if (!ends || gpu_plan_move_batches(src, dst, n, ends, &nb) != 0) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory planning %u moves", n);
        goto out;
    }
    for (uint32_t j = 0, b0 = 0; j < nb; b0 = ends[j], j++) {
        uint32_t c = j + 1 == nb ? new_count : count;
        if (kernels_table_move(t->kt, src + b0, dst + b0, ends[j] - b0, c, &kerr) != 0)
            goto dev_fail;
    }
    mirror_move(&t->mirror, t->dim, src, dst, n, new_count);
    goto out;
dev_fail:
    if (kerr.context_lost) {
        gpu_note_fault(t->b, &kerr);
        mirror_move(&t->mirror, t->dim, src, dst, n, new_count);
        rc = gpu_handover(t, &cpu, err);
    } else {
        rc = gpu_fail(err, &kerr);
    }
out:
    free(ends);
    return rc;
}

static int gpu_table_search(backend_table *bt, const backend_search *s, aff_err *err)
{
    gpu_table *t = (gpu_table *)bt;
    kernels_err kerr = {0};
    int rc = AFF_OK;
    bool any_filter = false;
    for (uint32_t i = 0; i < s->nq; i++) {
        if (s->k[i] == 0 || s->k[i] > KERNELS_MAX_K)
            return aff__fail(err, AFF_EINVAL, "query %u: k %u outside 1..%u", i, s->k[i],
                             KERNELS_MAX_K);
        if (s->filters && s->filters[i]) any_filter = true;
    }
    /* Queries are converted to the storage type: in fp16 a component beyond ±65504 would
     * become infinite and inf × 0 = NaN scores (the engine checks this before batching too). */
    if (!t->b->fp32) {
        const float *q = s->queries;
        for (size_t j = 0; j < (size_t)s->nq * t->dim; j++)
            if (!(fabsf(q[j]) <= 65504.0f))
                return aff__fail(err, AFF_EINVAL,
                                 "query %zu: vector component %zu (%g) is outside the fp16 range "
                                 "of the GPU catalog (finite, |x| <= 65504)",
                                 j / t->dim, j % t->dim, (double)q[j]);
    }
    if (s->nq == 0) return AFF_OK;
    backend_table *cpu = NULL;
    if ((rc = gpu_route(t, &cpu, err))) return rc;
    if (cpu) return cpu->ops->table_search(cpu, s, err);
    gpu_slot *slot = gpu_slot_acquire(t->b);
    kernels_search_args a = {
        .queries = s->queries,
        .nq = s->nq,
        .k = s->k,
        .out_rows = s->out_rows,
        .out_scores = s->out_scores,
        .out_counts = s->out_counts,
    };
    if (any_filter) {
        if (slot->filters_cap < s->nq) {
            kernels_filter *f = realloc(slot->filters, (size_t)s->nq * sizeof *f);
            if (!f) {
                rc = aff__fail(err, AFF_ENOMEM, "out of memory compiling %u filters", s->nq);
                goto out;
            }
            slot->filters = f;
            slot->filters_cap = s->nq;
        }
        if ((rc = gpu_plan_encode_filters(s->filters, s->nq, slot->filters, &slot->arena))) {
            rc = aff__fail(err, rc, "cannot compile the filters of %u queries", s->nq);
            goto out;
        }
        a.filters = slot->filters;
        a.arena = slot->arena.words;
        a.arena_words = (uint32_t)slot->arena.len;
    }
    if (kernels_search(slot->ws, t->kt, &a, &kerr) != 0) rc = gpu_fail(err, &kerr);
out:
    gpu_slot_release(t->b, slot);
    if (rc && kerr.context_lost) {
        /* Retried on the CPU: the caller sees the answer, health and metrics see the fault. */
        gpu_note_fault(t->b, &kerr);
        if ((rc = gpu_handover(t, &cpu, err)) == AFF_OK) rc = cpu->ops->table_search(cpu, s, err);
    }
    return rc;
}

static int gpu_table_score(backend_table *bt, const float *queries, uint32_t nq,
                           const uint32_t *offsets, const uint32_t *rows, float *scores,
                           aff_err *err)
{
    gpu_table *t = (gpu_table *)bt;
    kernels_err kerr = {0};
    int rc = AFF_OK;
    if (nq == 0) return AFF_OK;
    backend_table *cpu = NULL;
    if ((rc = gpu_route(t, &cpu, err))) return rc;
    if (cpu) return cpu->ops->table_score(cpu, queries, nq, offsets, rows, scores, err);
    gpu_slot *slot = gpu_slot_acquire(t->b);
    if (kernels_score(slot->ws, t->kt, queries, nq, offsets, rows, scores, &kerr) != 0)
        rc = gpu_fail(err, &kerr);
    gpu_slot_release(t->b, slot);
    if (rc && kerr.context_lost) {
        gpu_note_fault(t->b, &kerr);
        if ((rc = gpu_handover(t, &cpu, err)) == AFF_OK)
            rc = cpu->ops->table_score(cpu, queries, nq, offsets, rows, scores, err);
    }
    return rc;
}

static int gpu_table_read(backend_table *bt, const uint32_t *rows, uint32_t n, float *out,
                          aff_err *err)
{
    gpu_table *t = (gpu_table *)bt;
    if (n == 0) return AFF_OK;
    backend_table *cpu = atomic_load(&t->cpu);
    if (cpu) return cpu->ops->table_read(cpu, rows, n, out, err);
    /* From the host copy: exact, no device round trip, and safe for concurrent readers (writes
     * and moves, the only changes, run alone under the engine's lock). */
    for (uint32_t i = 0; i < n; i++)
        if (rows[i] >= t->mirror.n)
            return aff__fail(err, AFF_EINVAL, "read %u: row %u outside 0..%u", i, rows[i],
                             t->mirror.n);
    for (uint32_t i = 0; i < n; i++)
        memcpy(out + (size_t)i * t->dim, t->mirror.vec + (size_t)rows[i] * t->dim,
               t->dim * sizeof *out);
    return AFF_OK;
}

static uint32_t gpu_table_count(const backend_table *bt)
{
    const gpu_table *t = (const gpu_table *)bt;
    backend_table *cpu = atomic_load(&((gpu_table *)t)->cpu);
    return cpu ? cpu->ops->table_count(cpu) : t->mirror.n;
}

static uint64_t gpu_table_memory(const backend_table *bt)
{
    const gpu_table *t = (const gpu_table *)bt;
    backend_table *cpu = atomic_load(&((gpu_table *)t)->cpu);
    return (t->kt ? kernels_table_bytes(t->kt) : 0) + (cpu ? cpu->ops->table_memory(cpu) : 0);
}

/* ---- training device (als.h over kernels/als.cu) --------------------------------------------- */

typedef struct gpu_train {
    gpu_backend *b;
    kernels_als *a;
} gpu_train;

/* A failed training call: a device fault is noted as for any other call (the tables move to
 * the CPU); either way als_train retrains on the CPU. */
static int gpu_train_fail(gpu_backend *b, const kernels_err *kerr, aff_err *err)
{
    if (kerr->context_lost) gpu_note_fault(b, kerr);
    return gpu_fail(err, kerr);
}

static int gpu_train_begin(void *ctx, const als_device_job *job, void **state, aff_err *err)
{
    gpu_backend *b = ctx;
    kernels_err kerr = {0};
    *state = NULL;
    if (atomic_load(&b->faulted))
        return aff__fail(err, AFF_EDEVICE, "the GPU faulted earlier: %s", b->fault_msg);
    gpu_train *t = calloc(1, sizeof *t);
    if (!t) return aff__fail(err, AFF_ENOMEM, "out of memory starting GPU training");
    t->b = b;
    kernels_als_problem kp = {.n_users = job->users->n_rows,
                              .n_items = job->users->n_cols,
                              .d = job->params->factors,
                              .user_ptr = job->users->row_ptr,
                              .user_items = job->users->col,
                              .user_conf = job->users->conf,
                              .item_ptr = job->items->row_ptr,
                              .item_users = job->items->col,
                              .item_conf = job->items->conf,
                              .user_lambda = job->user_lambda,
                              .item_lambda = job->item_lambda,
                              .alpha0 = job->params->alpha0,
                              .cg_steps = job->params->cg_steps,
                              .user_factors = job->user_factors,
                              .item_factors = job->item_factors};
    if (kernels_als_create(&t->a, b->dev, &kp, &kerr) != 0) {
        free(t);
        return gpu_train_fail(b, &kerr, err);
    }
    *state = t;
    return AFF_OK;
}

static int gpu_train_half_epoch(void *state, bool users, aff_err *err)
{
    gpu_train *t = state;
    kernels_err kerr = {0};
    return kernels_als_half_epoch(t->a, users, &kerr) ? gpu_train_fail(t->b, &kerr, err) : AFF_OK;
}

static int gpu_train_objective(void *state, double *sum, aff_err *err)
{
    gpu_train *t = state;
    kernels_err kerr = {0};
    return kernels_als_objective(t->a, sum, &kerr) ? gpu_train_fail(t->b, &kerr, err) : AFF_OK;
}

static int gpu_train_read(void *state, float *user_factors, float *item_factors, aff_err *err)
{
    gpu_train *t = state;
    kernels_err kerr = {0};
    return kernels_als_read(t->a, user_factors, item_factors, &kerr)
               ? gpu_train_fail(t->b, &kerr, err)
               : AFF_OK;
}

static void gpu_train_end(void *state)
{
    gpu_train *t = state;
    kernels_als_destroy(t->a);
    free(t);
}

static bool gpu_trainer(backend *bb, als_device *out)
{
    gpu_backend *b = (gpu_backend *)bb;
    if (atomic_load(&b->faulted)) return false;
    *out = (als_device){.ctx = b,
                        .begin = gpu_train_begin,
                        .half_epoch = gpu_train_half_epoch,
                        .objective = gpu_train_objective,
                        .read = gpu_train_read,
                        .end = gpu_train_end};
    return true;
}

static const backend_ops gpu_ops = {
    .destroy = gpu_destroy,
    .describe = gpu_describe,
    .table_create = gpu_table_create,
    .table_destroy = gpu_table_destroy,
    .table_write = gpu_table_write,
    .table_move = gpu_table_move,
    .table_search = gpu_table_search,
    .table_score = gpu_table_score,
    .table_read = gpu_table_read,
    .table_count = gpu_table_count,
    .table_memory = gpu_table_memory,
    .trainer = gpu_trainer,
};

int backend_gpu_create(backend **out, const backend_gpu_config *cfg, aff_err *err)
{
    kernels_err kerr = {0};
    int rc = AFF_OK, n = 0;
    gpu_backend *b = NULL;
    *out = NULL;
    if (kernels_device_count(&n, &kerr) != 0) return aff__fail(err, AFF_EDEVICE, "%s", kerr.msg);
    if (n == 0) return aff__fail(err, AFF_EDEVICE, "no CUDA device found");
    int ordinal = cfg ? cfg->device : 0;
    if (ordinal < 0 || ordinal >= n)
        return aff__fail(err, AFF_EDEVICE, "CUDA device %d requested but %d present", ordinal, n);
    b = calloc(1, sizeof *b);
    if (!b) return aff__fail(err, AFF_ENOMEM, "out of memory creating the GPU backend");
    b->base.ops = &gpu_ops;
    b->fp32 = cfg && cfg->fp32;
    if (cfg) b->fallback_cfg = cfg->fallback;
    atomic_init(&b->faulted, false);
    atomic_init(&b->faults, 0);
    atomic_init(&b->tables_on_cpu, 0);
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->cond, NULL);
    atomic_init(&b->table_bytes, 0);
    if (kernels_device_open(&b->dev, ordinal, &kerr) != 0) {
        rc = aff__fail(err, AFF_EDEVICE, "%s", kerr.msg);
        goto out;
    }
    kernels_device_describe(b->dev, &b->info);
    uint32_t max_batch = cfg && cfg->max_batch ? cfg->max_batch : GPU_DEFAULT_MAX_BATCH;
    for (int i = 0; i < GPU_WORKSPACES; i++) {
        if (kernels_workspace_create(&b->slots[i].ws, b->dev, max_batch, &kerr) != 0) {
            rc = gpu_fail(err, &kerr);
            goto out;
        }
    }
    char mem[32];
    snprintf(mem, sizeof mem, "%llu", (unsigned long long)b->info.memory_total);
    aff_log_kv(AFF_LOG_INFO, "CUDA device opened", "device", b->info.name, "memory_bytes", mem,
               "storage", b->fp32 ? "fp32" : "fp16", NULL);
    *out = &b->base;
    b = NULL;
out:
    gpu_destroy(b ? &b->base : NULL);
    return rc;
}

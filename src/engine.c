/*
 * engine.c: owns the collection registry, each collection's id <-> row mapping, attribute
 * vocabularies (categories and tags interned to small ids), validation, filter compilation
 * and the backend choice. The backend owns vectors and scoring (backend.h).
 *
 * Rules kept here:
 *   - Rows are dense, 0..count-1. Upserts of new ids append; a delete moves the last row into
 *     the hole (table_move), so backends never scan dead rows and need no compaction.
 *   - Every call validates all of its input before it changes anything. Backend calls happen
 *     before the engine's own maps change, so a failed backend call leaves the engine as it
 *     was (a device fault in the middle of a GPU write is reported as AFF_EDEVICE).
 *   - Locking: the registry mutex guards only the list of collections; each collection has a
 *     writer-preferring rwlock (searches share it; writes take it alone) and a reference count
 *     so a drop never frees a collection a search still holds.
 */
#include "engine.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "strmap.h"

/* Interned strings of one attribute (categories or tags). Id 0 is never used. */
typedef struct vocab {
    strmap *map;        /* string -> id; owns the strings */
    const char **names; /* id -> string (points into map's keys) */
    uint32_t next;      /* next id to hand out; starts at 1 */
    uint32_t cap;
} vocab;

typedef struct collection {
    char name[AFF_MAX_NAME_LEN + 1];
    uint32_t dim;
    aff_metric metric;
    backend_index_kind index;
    uint32_t hnsw_m, hnsw_ef_search;
    bool learned_only; /* no content vectors: zero rows (engine.h) */
    atomic_int refs;
    pthread_rwlock_t lock;
    const backend_ops *ops;
    backend_table *table;
    strmap *ids;              /* id -> row; owns the id strings */
    const char **row_ids;     /* row -> id (points into ids' keys) */
    backend_row_attrs *attrs; /* row -> attributes */
    /* row -> the tags in the order the item gave them: indexes into attrs[row].tags, which
     * the backends need sorted (issue 12: GetItems returns tags as they were sent). */
    uint8_t (*tag_order)[AFF_MAX_TAGS_PER_ITEM];
    uint32_t count, capacity;
    vocab categories, tags;
    float max_abs; /* backend_info.max_abs_component: largest |component| the backend stores */
} collection;

struct aff_engine {
    backend *backend;
    backend_info info;
    pthread_mutex_t lock; /* guards colls and n_colls only */
    collection **colls;
    size_t n_colls, cap_colls;
};

/* ---- small helpers ------------------------------------------------------------------ */

static const char *metric_name(aff_metric m)
{
    return m == AFF_METRIC_IP ? "ip" : m == AFF_METRIC_COSINE ? "cosine" : "l2";
}

void aff_filter_init(aff_filter *f)
{
    *f = (aff_filter){0};
    f->price_min = -INFINITY;
    f->price_max = INFINITY;
}

static int check_string(const char *s, size_t max, const char *what, aff_err *err)
{
    if (!s || !*s)
        return aff__fail(err, AFF_EINVAL, "%s is empty; it must be 1..%zu bytes", what, max);
    size_t len = strnlen(s, max + 1);
    if (len > max) return aff__fail(err, AFF_EINVAL, "%s is longer than %zu bytes", what, max);
    return AFF_OK;
}

/* max_abs > 0: the backend's range for values it stores or scores unnormalized (the GPU's
 * fp16 catalog); cosine vectors are normalized first and need no limit. */
static int check_vector_range(const float *v, uint32_t got, uint32_t dim, aff_metric metric,
                              float max_abs, const char *what, aff_err *err);

static int check_vector(const float *v, uint32_t got, uint32_t dim, aff_metric metric,
                        const char *what, aff_err *err)
{
    return check_vector_range(v, got, dim, metric, 0.0f, what, err);
}

static int check_vector_range(const float *v, uint32_t got, uint32_t dim, aff_metric metric,
                              float max_abs, const char *what, aff_err *err)
{
    if (!v || got != dim)
        return aff__fail(err, AFF_EINVAL, "%s has %u values; the collection's dimension is %u",
                         what, v ? got : 0, dim);
    float sq = 0;
    for (uint32_t j = 0; j < dim; j++) {
        if (!isfinite(v[j]))
            return aff__fail(err, AFF_EINVAL, "%s has a non-finite value (%s) at index %u", what,
                             isnan(v[j]) ? "NaN" : "Inf", j);
        if (max_abs > 0 && metric != AFF_METRIC_COSINE && fabsf(v[j]) > max_abs)
            return aff__fail(err, AFF_EINVAL,
                             "%s has a value (%g) at index %u outside ±%g, the range of this "
                             "server's fp16 GPU catalog (start it with fp32 storage for larger "
                             "values)",
                             what, (double)v[j], j, (double)max_abs);
        sq += v[j] * v[j];
    }
    if (!isfinite(sq))
        return aff__fail(err, AFF_EINVAL, "%s is too large (its squared norm overflows float)",
                         what);
    if (metric == AFF_METRIC_COSINE && sq == 0)
        return aff__fail(err, AFF_EINVAL,
                         "%s is all zeros; cosine collections need a non-zero vector", what);
    return AFF_OK;
}

/* Copies v into out, normalized when the metric is cosine. */
static void prepare_vector(const float *v, uint32_t dim, aff_metric metric, float *out)
{
    if (metric != AFF_METRIC_COSINE) {
        memcpy(out, v, dim * sizeof(float));
        return;
    }
    double sq = 0;
    for (uint32_t j = 0; j < dim; j++)
        sq += (double)v[j] * v[j];
    float inv = (float)(1.0 / sqrt(sq));
    for (uint32_t j = 0; j < dim; j++)
        out[j] = v[j] * inv;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Sorts and removes duplicates; returns the new length. */
static uint32_t sort_unique(uint32_t *a, uint32_t n)
{
    if (n < 2) return n;
    qsort(a, n, sizeof *a, cmp_u32);
    uint32_t m = 1;
    for (uint32_t i = 1; i < n; i++)
        if (a[i] != a[m - 1]) a[m++] = a[i];
    return m;
}

/* ---- vocabularies ----------------------------------------------------------------------- */

static int vocab_init(vocab *v)
{
    *v = (vocab){.next = 1};
    return strmap_create(&v->map, 64);
}

static void vocab_free(vocab *v)
{
    strmap_destroy(v->map);
    free(v->names);
}

/* The id of s, interning it when new. Returns 0 or AFF_ENOMEM. */
static int vocab_intern(vocab *v, const char *s, uint32_t *id)
{
    if (strmap_get(v->map, s, id)) return AFF_OK;
    if (v->next >= v->cap) {
        uint32_t cap = v->cap ? v->cap * 2 : 64;
        const char **names = realloc(v->names, cap * sizeof *names);
        if (!names) return AFF_ENOMEM;
        v->names = names;
        v->cap = cap;
    }
    const char *key;
    if (strmap_put(v->map, s, v->next, &key) != AFF_OK) return AFF_ENOMEM;
    v->names[v->next] = key;
    *id = v->next++;
    return AFF_OK;
}

static size_t vocab_memory(const vocab *v)
{
    return strmap_memory(v->map) + v->cap * sizeof(char *);
}

/* ---- collections: lifetime and registry ------------------------------------------------ */

static void collection_free(collection *c)
{
    if (!c) return;
    if (c->table) c->ops->table_destroy(c->table);
    strmap_destroy(c->ids);
    vocab_free(&c->categories);
    vocab_free(&c->tags);
    free(c->row_ids);
    free(c->attrs);
    free(c->tag_order);
    pthread_rwlock_destroy(&c->lock);
    free(c);
}

static void collection_release(collection *c)
{
    if (c && atomic_fetch_sub(&c->refs, 1) == 1) collection_free(c);
}

/* Finds a collection and takes a reference; the caller releases it. */
static int collection_acquire(aff_engine *e, const char *name, collection **out, aff_err *err)
{
    *out = NULL;
    if (!name || !*name) return aff__fail(err, AFF_EINVAL, "collection name is empty");
    pthread_mutex_lock(&e->lock);
    for (size_t i = 0; i < e->n_colls; i++) {
        if (strcmp(e->colls[i]->name, name) == 0) {
            *out = e->colls[i];
            atomic_fetch_add(&(*out)->refs, 1);
            break;
        }
    }
    pthread_mutex_unlock(&e->lock);
    if (!*out) return aff__fail(err, AFF_ENOTFOUND, "collection \"%.64s\" does not exist", name);
    return AFF_OK;
}

static int check_collection_name(const char *name, aff_err *err)
{
    int rc = check_string(name, AFF_MAX_NAME_LEN, "collection name", err);
    if (rc != AFF_OK) return rc;
    for (const char *p = name; *p; p++) {
        char ch = *p;
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '_' || ch == '-' || ch == '.';
        if (!ok)
            return aff__fail(err, AFF_EINVAL,
                             "collection name \"%.64s\" has '%c'; allowed: A-Z a-z 0-9 _ - .", name,
                             ch);
    }
    return AFF_OK;
}

int engine_create_collection(aff_engine *e, const engine_collection_spec *spec, aff_err *err)
{
    int rc = spec->internal && spec->name && spec->name[0] == ENGINE_INTERNAL_PREFIX
                 ? check_collection_name(spec->name + 1, err)
                 : check_collection_name(spec->name, err);
    if (rc != AFF_OK) return rc;
    if (spec->learned_only && spec->dim != 1)
        return aff__fail(err, AFF_EINTERNAL, "a learned-only collection is created with dim 1");
    if (spec->dim < 1 || spec->dim > AFF_MAX_DIM)
        return aff__fail(err, AFF_EINVAL, "dimension %u is out of range 1..%d", spec->dim,
                         AFF_MAX_DIM);
    if (spec->metric != AFF_METRIC_IP && spec->metric != AFF_METRIC_COSINE &&
        spec->metric != AFF_METRIC_L2)
        return aff__fail(err, AFF_EINVAL, "unknown metric %d; use ip, cosine or l2",
                         (int)spec->metric);
    if (spec->index != BACKEND_INDEX_FLAT && spec->index != BACKEND_INDEX_HNSW)
        return aff__fail(err, AFF_EINVAL, "unknown index kind %d; use flat or hnsw",
                         (int)spec->index);
    if (spec->hnsw_m > 256 || spec->hnsw_ef_search > 4096)
        return aff__fail(err, AFF_EINVAL, "hnsw_m must be ≤ 256 and hnsw_ef_search ≤ 4096");
    if ((unsigned)spec->precision > BACKEND_PRECISION_INT8)
        return aff__fail(err, AFF_EINVAL, "unknown precision %d; use auto, fp32, bf16 or int8",
                         (int)spec->precision);

    collection *c = calloc(1, sizeof *c);
    if (!c) return aff__fail(err, AFF_ENOMEM, "out of memory creating a collection");
    snprintf(c->name, sizeof c->name, "%s", spec->name);
    c->dim = spec->dim;
    c->metric = spec->metric;
    c->max_abs = e->info.max_abs_component;
    c->index = spec->index;
    c->hnsw_m = spec->hnsw_m ? spec->hnsw_m : 32;
    c->hnsw_ef_search = spec->hnsw_ef_search ? spec->hnsw_ef_search : 64;
    c->learned_only = spec->learned_only;
    atomic_init(&c->refs, 1);
    c->ops = e->backend->ops;
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&c->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (strmap_create(&c->ids, 1024) != AFF_OK || vocab_init(&c->categories) != AFF_OK ||
        vocab_init(&c->tags) != AFF_OK) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory creating a collection");
        goto fail;
    }
    backend_table_params params = {
        .dim = c->dim,
        .metric = c->metric,
        .index = c->index,
        .hnsw_m = c->hnsw_m,
        .hnsw_ef_search = c->hnsw_ef_search,
        .precision = spec->precision,
    };
    if ((rc = c->ops->table_create(e->backend, &params, &c->table, err)) != AFF_OK) goto fail;

    pthread_mutex_lock(&e->lock);
    for (size_t i = 0; i < e->n_colls; i++) {
        if (strcmp(e->colls[i]->name, c->name) == 0) {
            pthread_mutex_unlock(&e->lock);
            rc = aff__fail(err, AFF_EEXIST, "collection \"%s\" already exists", c->name);
            goto fail;
        }
    }
    if (e->n_colls == e->cap_colls) {
        size_t cap = e->cap_colls ? e->cap_colls * 2 : 8;
        collection **colls = realloc(e->colls, cap * sizeof *colls);
        if (!colls) {
            pthread_mutex_unlock(&e->lock);
            rc = aff__fail(err, AFF_ENOMEM, "out of memory registering a collection");
            goto fail;
        }
        e->colls = colls;
        e->cap_colls = cap;
    }
    e->colls[e->n_colls++] = c;
    pthread_mutex_unlock(&e->lock);
    if (!spec->internal)
        aff_log_kv(AFF_LOG_INFO, "collection created", "collection", c->name, "metric",
                   metric_name(c->metric), "index",
                   c->index == BACKEND_INDEX_HNSW ? "hnsw" : "flat", NULL);
    return AFF_OK;
fail:
    collection_free(c);
    return rc;
}

int engine_drop_collection(aff_engine *e, const char *name, aff_err *err)
{
    collection *found = NULL;
    pthread_mutex_lock(&e->lock);
    for (size_t i = 0; i < e->n_colls; i++) {
        if (name && strcmp(e->colls[i]->name, name) == 0) {
            found = e->colls[i];
            e->colls[i] = e->colls[--e->n_colls];
            break;
        }
    }
    pthread_mutex_unlock(&e->lock);
    if (!found)
        return aff__fail(err, AFF_ENOTFOUND, "collection \"%.64s\" does not exist",
                         name ? name : "");
    aff_log_kv(AFF_LOG_INFO, "collection dropped", "collection", found->name, NULL);
    collection_release(found);
    return AFF_OK;
}

/* Fills info; the caller holds c->lock for reading. */
static void describe_locked(aff_engine *e, collection *c, engine_collection_info *out)
{
    *out = (engine_collection_info){0};
    snprintf(out->name, sizeof out->name, "%s", c->name);
    out->dim = c->dim;
    out->metric = c->metric;
    out->index = c->index;
    out->hnsw_m = c->hnsw_m;
    out->hnsw_ef_search = c->hnsw_ef_search;
    out->learned_only = c->learned_only;
    out->n_items = c->count;
    out->memory_bytes = c->ops->table_memory(c->table) + strmap_memory(c->ids) +
                        (uint64_t)c->capacity *
                            (sizeof(char *) + sizeof(backend_row_attrs) + AFF_MAX_TAGS_PER_ITEM) +
                        vocab_memory(&c->categories) + vocab_memory(&c->tags);
    snprintf(out->backend, sizeof out->backend, "%s", e->info.name);
}

int engine_describe_collection(aff_engine *e, const char *name, engine_collection_info *out,
                               aff_err *err)
{
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    pthread_rwlock_rdlock(&c->lock);
    describe_locked(e, c, out);
    pthread_rwlock_unlock(&c->lock);
    collection_release(c);
    return AFF_OK;
}

int engine_collection_has_content(aff_engine *e, const char *name, bool *has_content, aff_err *err)
{
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    *has_content = !c->learned_only;
    collection_release(c);
    return AFF_OK;
}

int engine_collection_dim(aff_engine *e, const char *name, uint32_t *dim, aff_err *err)
{
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    *dim = c->dim;
    collection_release(c);
    return AFF_OK;
}

int engine_collection_shape(aff_engine *e, const char *name, uint32_t *dim, aff_metric *metric,
                            aff_err *err)
{
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    *dim = c->dim;
    *metric = c->metric;
    collection_release(c);
    return AFF_OK;
}

static int cmp_info_name(const void *a, const void *b)
{
    return strcmp(((const engine_collection_info *)a)->name,
                  ((const engine_collection_info *)b)->name);
}

int engine_list_collections(aff_engine *e, engine_collection_info **out, size_t *n, aff_err *err)
{
    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&e->lock);
    size_t count = e->n_colls;
    collection **held = calloc(count ? count : 1, sizeof *held);
    if (!held) {
        pthread_mutex_unlock(&e->lock);
        return aff__fail(err, AFF_ENOMEM, "out of memory listing collections");
    }
    size_t listed = 0;
    for (size_t i = 0; i < count; i++) {
        if (e->colls[i]->name[0] == ENGINE_INTERNAL_PREFIX) continue; /* behaviour spaces */
        held[listed] = e->colls[i];
        atomic_fetch_add(&held[listed++]->refs, 1);
    }
    count = listed;
    pthread_mutex_unlock(&e->lock);
    engine_collection_info *infos = calloc(count ? count : 1, sizeof *infos);
    for (size_t i = 0; i < count; i++) {
        if (infos) {
            pthread_rwlock_rdlock(&held[i]->lock);
            describe_locked(e, held[i], &infos[i]);
            pthread_rwlock_unlock(&held[i]->lock);
        }
        collection_release(held[i]);
    }
    free(held);
    if (!infos) return aff__fail(err, AFF_ENOMEM, "out of memory listing collections");
    qsort(infos, count, sizeof *infos, cmp_info_name);
    *out = infos;
    *n = count;
    return AFF_OK;
}

/* ---- engine lifetime --------------------------------------------------------------------- */

static int choose_backend(const engine_config *cfg, backend **out, aff_err *err)
{
    engine_backend_choice choice = cfg ? cfg->backend : ENGINE_BACKEND_AUTO;
    backend_faiss_config faiss_cfg = cfg ? cfg->faiss : (backend_faiss_config){0};
    if (choice == ENGINE_BACKEND_CPU) return backend_faiss_create(out, &faiss_cfg, err);
    if (choice == ENGINE_BACKEND_NOOP) {
        aff_log(AFF_LOG_WARN, "no-op backend selected: results are meaningless (benchmarks only)");
        return backend_noop_create(out, err);
    }
#ifdef AFFINITY_HAVE_CUDA
    backend_gpu_config gpu_cfg = cfg ? cfg->gpu : (backend_gpu_config){0};
    gpu_cfg.fallback = faiss_cfg; /* after a device fault, tables move to FAISS */
    aff_err gpu_err = {0};
    int rc = backend_gpu_create(out, &gpu_cfg, &gpu_err);
    if (rc == AFF_OK) return AFF_OK;
    if (choice == ENGINE_BACKEND_GPU)
        return aff__fail(err, rc, "GPU backend requested but unusable: %s", gpu_err.msg);
    aff_log_kv(AFF_LOG_INFO, "GPU backend unavailable, using FAISS on the CPU", "reason",
               gpu_err.msg, NULL);
#else
    if (choice == ENGINE_BACKEND_GPU)
        return aff__fail(err, AFF_EUNSUPPORTED,
                         "GPU backend requested but this build has no CUDA support "
                         "(configure with -DAFFINITY_GPU=ON)");
    aff_log(AFF_LOG_INFO, "built without CUDA: using FAISS on the CPU");
#endif
    return backend_faiss_create(out, &faiss_cfg, err);
}

int engine_create(aff_engine **out, const engine_config *cfg, aff_err *err)
{
    *out = NULL;
    aff_engine *e = calloc(1, sizeof *e);
    if (!e) return aff__fail(err, AFF_ENOMEM, "out of memory creating the engine");
    int rc = choose_backend(cfg, &e->backend, err);
    if (rc != AFF_OK) {
        free(e);
        return rc;
    }
    e->backend->ops->describe(e->backend, &e->info);
    pthread_mutex_init(&e->lock, NULL);
    aff_log_kv(AFF_LOG_INFO, "backend selected", "backend", e->info.name, "device", e->info.device,
               NULL);
    *out = e;
    return AFF_OK;
}

void engine_destroy(aff_engine *e)
{
    if (!e) return;
    for (size_t i = 0; i < e->n_colls; i++)
        collection_release(e->colls[i]);
    free(e->colls);
    pthread_mutex_destroy(&e->lock);
    e->backend->ops->destroy(e->backend);
    free(e);
}

void engine_backend_info(aff_engine *e, backend_info *out)
{
    e->backend->ops->describe(e->backend, out);
}

bool engine_trainer(aff_engine *e, als_device *out)
{
    const backend_ops *ops = e->backend->ops;
    return ops->trainer && ops->trainer(e->backend, out);
}

/* ---- items --------------------------------------------------------------------------------- */

static int validate_item(const collection *c, const aff_item *it, size_t index, aff_err *err)
{
    char what[64];
    snprintf(what, sizeof what, "item %zu id", index);
    int rc = check_string(it->id, AFF_MAX_ID_LEN, what, err);
    if (rc != AFF_OK) return rc;
    char vwhat[AFF_MAX_ID_LEN + 64];
    snprintf(vwhat, sizeof vwhat, "vector of item \"%s\"", it->id);
    if (c->learned_only) {
        if (it->dim != 0)
            return aff__fail(err, AFF_EINVAL,
                             "item \"%s\" has a vector but collection \"%s\" learns its vectors "
                             "from events (created with dimension 0): send items without vectors",
                             it->id, c->name);
    } else if ((rc = check_vector_range(it->vector, it->dim, c->dim, c->metric, c->max_abs, vwhat,
                                        err)) != AFF_OK) {
        return rc;
    }
    return item_attrs_check(&it->attrs, it->id, err);
}

/* Grows the row -> id and row -> attrs arrays to hold `rows` rows. */
static int reserve_rows(collection *c, uint32_t rows, aff_err *err)
{
    if (rows <= c->capacity) return AFF_OK;
    uint64_t cap = c->capacity ? c->capacity : 1024;
    while (cap < rows)
        cap *= 2;
    const char **ids = realloc(c->row_ids, cap * sizeof *ids);
    if (!ids)
        return aff__fail(err, AFF_ENOMEM, "out of memory growing to %llu rows",
                         (unsigned long long)cap);
    c->row_ids = ids;
    backend_row_attrs *attrs = realloc(c->attrs, cap * sizeof *attrs);
    if (!attrs)
        return aff__fail(err, AFF_ENOMEM, "out of memory growing to %llu rows",
                         (unsigned long long)cap);
    c->attrs = attrs;
    uint8_t(*order)[AFF_MAX_TAGS_PER_ITEM] = realloc(c->tag_order, cap * sizeof *order);
    if (!order)
        return aff__fail(err, AFF_ENOMEM, "out of memory growing to %llu rows",
                         (unsigned long long)cap);
    c->tag_order = order;
    c->capacity = (uint32_t)cap;
    return AFF_OK;
}

/* Interns an item's category and tags into row attributes. Caller holds the write lock. */
static int build_attrs(collection *c, const item_attrs *it, backend_row_attrs *a,
                       uint8_t order[AFF_MAX_TAGS_PER_ITEM], aff_err *err)
{
    *a = (backend_row_attrs){.price = it->price, .available = it->available};
    if (it->category && *it->category &&
        vocab_intern(&c->categories, it->category, &a->category) != AFF_OK)
        return aff__fail(err, AFF_ENOMEM, "out of memory interning a category");
    uint32_t given[AFF_MAX_TAGS_PER_ITEM], n_given = 0;
    for (uint32_t t = 0; t < it->n_tags; t++) {
        uint32_t id;
        if (vocab_intern(&c->tags, it->tags[t], &id) != AFF_OK)
            return aff__fail(err, AFF_ENOMEM, "out of memory interning a tag");
        bool dup = false;
        for (uint32_t k = 0; k < n_given && !dup; k++)
            dup = given[k] == id;
        if (!dup) given[n_given++] = id; /* the first occurrence keeps its place */
    }
    memcpy(a->tags, given, n_given * sizeof *given);
    a->n_tags = (uint8_t)sort_unique(a->tags, n_given);
    for (uint32_t k = 0; k < n_given; k++)
        for (uint8_t t = 0; t < a->n_tags; t++)
            if (a->tags[t] == given[k]) order[k] = t;
    for (uint32_t t = 0; t < a->n_tags; t++)
        a->tag_bloom |= backend_tag_bit(a->tags[t]);
    return AFF_OK;
}

int engine_upsert(aff_engine *e, const char *name, const aff_item *items, size_t n, aff_err *err)
{
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    uint32_t *rows = NULL;
    size_t *pick = NULL;
    char **new_keys = NULL;
    float *vectors = NULL;
    backend_row_attrs *attrs = NULL;
    uint8_t(*orders)[AFF_MAX_TAGS_PER_ITEM] = NULL;
    strmap *seen = NULL;
    bool locked = false;
    size_t m = 0; /* distinct ids */
    if (n == 0) goto out;
    if (n > UINT32_MAX / 2) {
        rc = aff__fail(err, AFF_EINVAL, "too many items in one call");
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        if ((rc = validate_item(c, &items[i], i, err)) != AFF_OK) goto out;

    /* A later duplicate of an id in the same call wins: keep each id's last occurrence. */
    pick = malloc(n * sizeof *pick);
    if (!pick || strmap_create(&seen, n) != AFF_OK) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory upserting %zu items", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        if (strmap_put(seen, items[i].id, (uint32_t)i, NULL) != AFF_OK) {
            rc = aff__fail(err, AFF_ENOMEM, "out of memory upserting %zu items", n);
            goto out;
        }
    for (size_t i = 0; i < n; i++) {
        uint32_t last;
        strmap_get(seen, items[i].id, &last);
        if (last == i) pick[m++] = i;
    }
    rows = malloc(m * sizeof *rows);
    new_keys = calloc(m, sizeof *new_keys);
    vectors = malloc(m * c->dim * sizeof *vectors);
    attrs = malloc(m * sizeof *attrs);
    orders = malloc(m * sizeof *orders);
    if (!rows || !new_keys || !vectors || !attrs || !orders) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory upserting %zu items", n);
        goto out;
    }

    pthread_rwlock_wrlock(&c->lock);
    locked = true;
    uint32_t appended = 0;
    for (size_t j = 0; j < m; j++) {
        const aff_item *it = &items[pick[j]];
        uint32_t row;
        if (strmap_get(c->ids, it->id, &row)) {
            rows[j] = row;
        } else {
            rows[j] = c->count + appended++;
            if (!(new_keys[j] = strdup(it->id))) {
                rc = aff__fail(err, AFF_ENOMEM, "out of memory upserting %zu items", n);
                goto out;
            }
        }
        if ((rc = build_attrs(c, &it->attrs, &attrs[j], orders[j], err)) != AFF_OK) goto out;
        if (c->learned_only)
            memset(vectors + j * c->dim, 0, c->dim * sizeof *vectors);
        else
            prepare_vector(it->vector, c->dim, c->metric, vectors + j * c->dim);
    }
    if ((uint64_t)c->count + appended > UINT32_MAX - 1) {
        rc = aff__fail(err, AFF_EFULL, "collection \"%s\" cannot hold more than %u items", c->name,
                       UINT32_MAX - 1);
        goto out;
    }
    if ((rc = reserve_rows(c, c->count + appended, err)) != AFF_OK) goto out;
    if (strmap_reserve(c->ids, (size_t)c->count + appended) != AFF_OK) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory growing the id map");
        goto out;
    }
    if ((rc = c->ops->table_write(c->table, rows, (uint32_t)m, vectors, attrs, err)) != AFF_OK)
        goto out;
    /* The backend holds the rows now; nothing below can fail. */
    for (size_t j = 0; j < m; j++) {
        uint32_t row = rows[j];
        if (new_keys[j]) {
            const char *key;
            strmap_put_owned(c->ids, new_keys[j], row, &key);
            new_keys[j] = NULL;
            c->row_ids[row] = key;
        }
        c->attrs[row] = attrs[j];
        memcpy(c->tag_order[row], orders[j], sizeof orders[j]);
    }
    c->count += appended;
out:
    if (locked) pthread_rwlock_unlock(&c->lock);
    for (size_t j = 0; new_keys && j < m; j++)
        free(new_keys[j]);
    free(new_keys);
    free(rows);
    free(pick);
    free(vectors);
    free(attrs);
    free(orders);
    strmap_destroy(seen);
    collection_release(c);
    return rc;
}

static int cmp_u32_desc(const void *a, const void *b)
{
    return -cmp_u32(a, b);
}

int engine_delete(aff_engine *e, const char *name, const char *const *ids, size_t n,
                  size_t *n_deleted, aff_err *err)
{
    if (n_deleted) *n_deleted = 0;
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    uint32_t *dead = NULL, *src = NULL, *dst = NULL;
    bool locked = false;
    for (size_t i = 0; i < n; i++) {
        char what[48];
        snprintf(what, sizeof what, "id %zu", i);
        if ((rc = check_string(ids[i], AFF_MAX_ID_LEN, what, err)) != AFF_OK) goto out;
    }
    if (n == 0) goto out;
    dead = malloc(n * sizeof *dead);
    src = malloc(n * sizeof *src);
    dst = malloc(n * sizeof *dst);
    if (!dead || !src || !dst) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory deleting %zu ids", n);
        goto out;
    }
    pthread_rwlock_wrlock(&c->lock);
    locked = true;
    uint32_t nd = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t row;
        if (strmap_get(c->ids, ids[i], &row)) dead[nd++] = row;
    }
    nd = sort_unique(dead, nd);
    qsort(dead, nd, sizeof *dead, cmp_u32_desc);
    /* Fill each hole, highest first, with the current last row. */
    uint32_t moves = 0, count = c->count;
    for (uint32_t i = 0; i < nd; i++) {
        uint32_t last = --count;
        if (dead[i] != last) {
            src[moves] = last;
            dst[moves] = dead[i];
            moves++;
        }
    }
    if ((rc = c->ops->table_move(c->table, src, dst, moves, count, err)) != AFF_OK) goto out;
    for (uint32_t i = 0; i < nd; i++)
        strmap_remove(c->ids, c->row_ids[dead[i]]);
    for (uint32_t i = 0; i < moves; i++) {
        c->row_ids[dst[i]] = c->row_ids[src[i]];
        c->attrs[dst[i]] = c->attrs[src[i]];
        memcpy(c->tag_order[dst[i]], c->tag_order[src[i]], sizeof c->tag_order[0]);
        strmap_set(c->ids, c->row_ids[dst[i]], dst[i]);
    }
    c->count = count;
    if (n_deleted) *n_deleted = nd;
out:
    if (locked) pthread_rwlock_unlock(&c->lock);
    free(dead);
    free(src);
    free(dst);
    collection_release(c);
    return rc;
}

/* The attributes of row `row` (read lock held). */
static void item_copy(const collection *c, uint32_t row, item_record *out)
{
    *out = (item_record){0};
    const backend_row_attrs *a = &c->attrs[row];
    snprintf(out->id, sizeof out->id, "%s", c->row_ids[row]);
    if (a->category)
        snprintf(out->category, sizeof out->category, "%s", c->categories.names[a->category]);
    out->n_tags = a->n_tags;
    for (uint32_t t = 0; t < a->n_tags; t++) /* in the order the item gave them */
        snprintf(out->tags[t], sizeof out->tags[t], "%s",
                 c->tags.names[a->tags[c->tag_order[row][t]]]);
    out->price = a->price;
    out->available = a->available;
}

int engine_get_item(aff_engine *e, const char *name, const char *id, item_record *out,
                    float *vector, aff_err *err)
{
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    if ((rc = check_string(id, AFF_MAX_ID_LEN, "item id", err)) != AFF_OK) goto out_release;
    pthread_rwlock_rdlock(&c->lock);
    uint32_t row;
    if (!strmap_get(c->ids, id, &row)) {
        rc = aff__fail(err, AFF_ENOTFOUND, "item \"%s\" is not in collection \"%s\"", id, c->name);
        goto out;
    }
    item_copy(c, row, out);
    if (vector) rc = c->ops->table_read(c->table, &row, 1, vector, err);
out:
    pthread_rwlock_unlock(&c->lock);
out_release:
    collection_release(c);
    return rc;
}

int engine_scan_items(aff_engine *e, const char *name, engine_item_visit_fn fn, void *ctx,
                      aff_err *err)
{
    enum { SCAN_BATCH = 256 };
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    float *vec = NULL;
    uint32_t *rows = NULL;
    item_record *item = malloc(sizeof *item);
    if (!c->learned_only) {
        vec = malloc((size_t)SCAN_BATCH * c->dim * sizeof *vec);
        rows = malloc(SCAN_BATCH * sizeof *rows);
    }
    if (!item || (!c->learned_only && (!vec || !rows))) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory scanning collection \"%s\"", c->name);
        goto out_release;
    }
    pthread_rwlock_rdlock(&c->lock);
    for (uint32_t r0 = 0; r0 < c->count && rc == AFF_OK; r0 += SCAN_BATCH) {
        const uint32_t nb = c->count - r0 < SCAN_BATCH ? c->count - r0 : SCAN_BATCH;
        if (vec) {
            for (uint32_t i = 0; i < nb; i++)
                rows[i] = r0 + i;
            if ((rc = c->ops->table_read(c->table, rows, nb, vec, err)) != AFF_OK) break;
        }
        for (uint32_t i = 0; i < nb && rc == AFF_OK; i++) {
            item_copy(c, r0 + i, item);
            rc = fn(ctx, item, vec ? vec + (size_t)i * c->dim : NULL, err);
        }
    }
    pthread_rwlock_unlock(&c->lock);
out_release:
    free(item);
    free(vec);
    free(rows);
    collection_release(c);
    return rc;
}

/* ---- filters ------------------------------------------------------------------------------ */

/* A filter compiled into row space; its arrays come from a scratch arena (valid until the
 * arena's next reset). */
typedef struct compiled_filter {
    backend_filter f;
    bool matches_nothing; /* e.g. only unknown categories were asked for */
} compiled_filter;

static int validate_filter(const aff_filter *f, aff_err *err)
{
    if (!f) return AFF_OK;
    int rc;
    for (uint32_t i = 0; i < f->n_categories; i++)
        if ((rc = check_string(f->categories[i], AFF_MAX_ATTR_LEN, "filter category", err)))
            return rc;
    for (uint32_t i = 0; i < f->n_tags; i++)
        if ((rc = check_string(f->tags[i], AFF_MAX_ATTR_LEN, "filter tag", err))) return rc;
    for (uint32_t i = 0; i < f->n_exclude_ids; i++)
        if ((rc = check_string(f->exclude_ids[i], AFF_MAX_ID_LEN, "excluded id", err))) return rc;
    for (uint32_t i = 0; i < f->n_exclude_categories; i++)
        if ((rc = check_string(f->exclude_categories[i], AFF_MAX_ATTR_LEN,
                               "filter exclude_categories entry", err)))
            return rc;
    for (uint32_t i = 0; i < f->n_exclude_tags; i++)
        if ((rc = check_string(f->exclude_tags[i], AFF_MAX_ATTR_LEN, "filter exclude_tags entry",
                               err)))
            return rc;
    if (isnan(f->price_min) || isnan(f->price_max))
        return aff__fail(err, AFF_EINVAL, "filter price bounds must be numbers, not NaN");
    if (f->price_min > f->price_max)
        return aff__fail(err, AFF_EINVAL, "filter price_min %g is above price_max %g",
                         (double)f->price_min, (double)f->price_max);
    return AFF_OK;
}

/* Compiles f (may be NULL) for collection c plus an optional excluded row (UINT32_MAX: none),
 * with its arrays taken from scratch. The caller holds c->lock. */
static int compile_filter(const collection *c, const aff_filter *f, uint32_t self_row,
                          aff_scratch *scratch, compiled_filter *cf, aff_err *err)
{
    *cf = (compiled_filter){0};
    backend_filter_init(&cf->f);
    uint32_t n_ex = (f ? f->n_exclude_ids : 0) + (self_row != UINT32_MAX);
    if (n_ex) {
        uint32_t *rows = aff_scratch_array(scratch, n_ex, sizeof *rows);
        if (!rows) goto nomem;
        uint32_t m = 0;
        for (uint32_t i = 0; f && i < f->n_exclude_ids; i++) {
            uint32_t row;
            if (strmap_get(c->ids, f->exclude_ids[i], &row)) rows[m++] = row;
        }
        if (self_row != UINT32_MAX) rows[m++] = self_row;
        cf->f.n_exclude_rows = sort_unique(rows, m);
        cf->f.exclude_rows = rows;
    }
    if (!f) return AFF_OK;
    cf->f.price_min = f->price_min;
    cf->f.price_max = f->price_max;
    cf->f.available_only = f->available_only;
    uint64_t *category_bits = NULL;
    if (f->n_categories) {
        uint32_t words = (c->categories.next + 63) / 64;
        if (!(category_bits = aff_scratch_zero(scratch, words * sizeof *category_bits)))
            goto nomem;
        bool any = false;
        for (uint32_t i = 0; i < f->n_categories; i++) {
            uint32_t id;
            if (strmap_get(c->categories.map, f->categories[i], &id)) {
                category_bits[id >> 6] |= (uint64_t)1 << (id & 63);
                any = true;
            }
        }
        cf->f.category_bits = category_bits;
        cf->f.category_words = words;
        cf->matches_nothing |= !any;
    }
    if (f->n_exclude_categories) {
        /* None-of categories: the complement as an any-of set (category 0, "none", passes),
         * intersected with the any-of set when there is one. Every backend reads it as is. */
        uint32_t words = (c->categories.next + 63) / 64;
        if (!category_bits) {
            if (!(category_bits =
                      aff_scratch_zero(scratch, (words ? words : 1) * sizeof *category_bits)))
                goto nomem;
            for (uint32_t id = 0; id < c->categories.next; id++)
                category_bits[id >> 6] |= (uint64_t)1 << (id & 63);
            cf->f.category_bits = category_bits;
            cf->f.category_words = words;
        }
        for (uint32_t i = 0; i < f->n_exclude_categories; i++) {
            uint32_t id;
            if (strmap_get(c->categories.map, f->exclude_categories[i], &id))
                category_bits[id >> 6] &= ~((uint64_t)1 << (id & 63));
        }
    }
    if (f->n_exclude_tags) {
        uint32_t *tags = aff_scratch_array(scratch, f->n_exclude_tags, sizeof *tags);
        if (!tags) goto nomem;
        uint32_t m = 0;
        for (uint32_t i = 0; i < f->n_exclude_tags; i++)
            if (strmap_get(c->tags.map, f->exclude_tags[i], &tags[m])) m++;
        m = sort_unique(tags, m);
        for (uint32_t i = 0; i < m; i++)
            cf->f.exclude_tag_bloom |= backend_tag_bit(tags[i]);
        cf->f.exclude_tags = tags;
        cf->f.n_exclude_tags = m;
    }
    if (f->n_tags) {
        uint32_t *tags = aff_scratch_array(scratch, f->n_tags, sizeof *tags);
        if (!tags) goto nomem;
        uint32_t m = 0;
        for (uint32_t i = 0; i < f->n_tags; i++)
            if (strmap_get(c->tags.map, f->tags[i], &tags[m])) m++;
        m = sort_unique(tags, m);
        for (uint32_t i = 0; i < m; i++)
            cf->f.tag_bloom |= backend_tag_bit(tags[i]);
        cf->f.tags = tags;
        cf->f.n_tags = m;
        cf->matches_nothing |= m == 0;
    }
    return AFF_OK;
nomem:
    return aff__fail(err, AFF_ENOMEM, "out of memory compiling a filter");
}

/* ---- search ---------------------------------------------------------------------------------- */

static int validate_query(const collection *c, const aff_query *q, aff_err *err)
{
    if (c->learned_only)
        return aff__fail(err, AFF_EPRECONDITION,
                         "collection \"%s\" has no content vectors (created with dimension 0): "
                         "rank it in its behaviour space (SPACE_BEHAVIOUR) once a model is "
                         "trained",
                         c->name);
    if (q->k < 1 || q->k > AFF_MAX_K)
        return aff__fail(err, AFF_EINVAL, "k = %u is out of range 1..%d", q->k, AFF_MAX_K);
    int rc;
    if (q->vector) {
        if ((rc = check_vector_range(q->vector, q->dim, c->dim, c->metric, c->max_abs,
                                     "query vector", err)))
            return rc;
    } else if ((rc = check_string(q->item_id, AFF_MAX_ID_LEN, "query item id", err))) {
        return rc;
    }
    return validate_filter(q->filter, err);
}

int engine_validate_query(aff_engine *e, const char *name, const aff_query *q, aff_err *err)
{
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    rc = validate_query(c, q, err);
    collection_release(c);
    return rc;
}

/* Batch entry for engine_search and engine_rerank: clears every query's outcome and takes a
 * reference on the collection; when that fails, every query gets the same error. */
static int acquire_for_batch(aff_engine *e, const char *name, size_t nq, aff_err *query_errs,
                             collection **out)
{
    for (size_t i = 0; i < nq; i++)
        aff__err_clear(&query_errs[i]);
    aff_err cerr;
    int rc = collection_acquire(e, name, out, &cerr);
    if (rc != AFF_OK)
        for (size_t i = 0; i < nq; i++)
            query_errs[i] = cerr;
    return rc;
}

/* AFF_OK when every query succeeded, else the first failed query's code. */
static int first_failure(const aff_err *query_errs, size_t nq)
{
    for (size_t i = 0; i < nq; i++)
        if (query_errs[i].code != AFF_OK) return query_errs[i].code;
    return AFF_OK;
}

/* backend_search.same_as for nb prepared query vectors: a query whose vector equals the
 * previous one's (a pipeline's organic and promotion queries for one shopper arrive side by
 * side) shares its scan. Taken from scratch; NULL when no two neighbours are equal, or out of
 * memory (a hint). */
static uint32_t *same_vectors(const float *qbuf, uint32_t nb, uint32_t dim, aff_scratch *scratch)
{
    uint32_t *same = NULL;
    for (uint32_t b = 1; b < nb; b++) {
        if (memcmp(qbuf + (size_t)b * dim, qbuf + (size_t)(b - 1) * dim, dim * sizeof *qbuf))
            continue;
        if (!same) {
            if (!(same = aff_scratch_array(scratch, nb, sizeof *same))) return NULL;
            for (uint32_t i = 0; i < nb; i++)
                same[i] = i;
        }
        same[b] = same[b - 1];
    }
    return same;
}

int engine_search(aff_engine *e, aff_scratch *scratch, const char *name,
                  const aff_query *queries, size_t nq, aff_hit *hits, uint32_t *n_hits,
                  aff_err *query_errs)
{
    for (size_t i = 0; i < nq; i++)
        n_hits[i] = 0;
    if (nq == 0) return AFF_OK;
    collection *c;
    int rc = acquire_for_batch(e, name, nq, query_errs, &c);
    if (rc != AFF_OK) return rc;
    if (scratch) aff_scratch_reset(scratch);
    aff_scratch *tmp, *sc = aff_scratch_or_temp(scratch, &tmp);
    size_t *offsets = sc ? aff_scratch_array(sc, nq, sizeof *offsets) : NULL;
    uint32_t *batch_of = sc ? aff_scratch_array(sc, nq, sizeof *batch_of) : NULL;
    uint32_t *ks = sc ? aff_scratch_array(sc, nq, sizeof *ks) : NULL;
    uint32_t *caps = sc ? aff_scratch_array(sc, nq, sizeof *caps) : NULL;
    compiled_filter *cfs = sc ? aff_scratch_array(sc, nq, sizeof *cfs) : NULL;
    const backend_filter **fps = sc ? aff_scratch_array(sc, nq, sizeof *fps) : NULL;
    float *qbuf = sc ? aff_scratch_array(sc, nq * c->dim, sizeof *qbuf) : NULL;
    uint32_t *rows = NULL, *counts = NULL;
    float *scores = NULL;
    bool locked = false;
    if (!offsets || !batch_of || !ks || !caps || !cfs || !fps || !qbuf) {
        rc = AFF_ENOMEM;
        goto fail_all;
    }
    size_t off = 0;
    for (size_t i = 0; i < nq; i++) {
        offsets[i] = off;
        off += queries[i].k <= AFF_MAX_K ? queries[i].k : 0;
        validate_query(c, &queries[i], &query_errs[i]);
    }
    pthread_rwlock_rdlock(&c->lock);
    locked = true;
    uint32_t nb = 0;
    size_t total_k = 0;
    bool any_cap = false;
    for (size_t i = 0; i < nq; i++) {
        const aff_query *q = &queries[i];
        if (query_errs[i].code != AFF_OK) continue;
        uint32_t self = UINT32_MAX;
        float *qv = qbuf + (size_t)nb * c->dim;
        if (q->vector) {
            prepare_vector(q->vector, c->dim, c->metric, qv);
        } else {
            if (!strmap_get(c->ids, q->item_id, &self)) {
                aff__fail(&query_errs[i], AFF_ENOTFOUND, "item \"%s\" is not in collection \"%s\"",
                          q->item_id, c->name);
                continue;
            }
            if (c->ops->table_read(c->table, &self, 1, qv, &query_errs[i]) != AFF_OK) continue;
        }
        if (compile_filter(c, q->filter, self, sc, &cfs[nb], &query_errs[i]) != AFF_OK) continue;
        if (cfs[nb].matches_nothing) continue;
        fps[nb] = &cfs[nb].f;
        ks[nb] = q->k;
        caps[nb] = q->max_per_category;
        any_cap |= q->max_per_category > 0;
        batch_of[nb] = (uint32_t)i;
        total_k += q->k;
        nb++;
    }
    rows = aff_scratch_array(sc, total_k ? total_k : 1, sizeof *rows);
    scores = aff_scratch_array(sc, total_k ? total_k : 1, sizeof *scores);
    counts = aff_scratch_array(sc, nb ? nb : 1, sizeof *counts);
    if (!rows || !scores || !counts) {
        rc = AFF_ENOMEM;
        goto fail_all;
    }
    if (nb) {
        uint32_t *same = same_vectors(qbuf, nb, c->dim, sc);
        backend_search s = {
            .queries = qbuf,
            .nq = nb,
            .k = ks,
            .filters = fps,
            .same_as = same,
            .max_per_category = any_cap ? caps : NULL,
            .out_rows = rows,
            .out_scores = scores,
            .out_counts = counts,
            .scratch = sc,
        };
        aff_err berr = {0};
        rc = c->ops->table_search(c->table, &s, &berr);
        if (rc != AFF_OK) {
            for (uint32_t b = 0; b < nb; b++)
                query_errs[batch_of[b]] = berr;
            goto done;
        }
        size_t boff = 0;
        for (uint32_t b = 0; b < nb; b++) {
            uint32_t qi = batch_of[b];
            aff_hit *out = hits + offsets[qi];
            for (uint32_t h = 0; h < counts[b]; h++) {
                uint32_t row = rows[boff + h];
                float score = scores[boff + h];
                out[h].score = c->metric == AFF_METRIC_L2 ? -score : score;
                const char *id = c->row_ids[row];
                memcpy(out[h].id, id, strlen(id) + 1); /* ids are ≤ AFF_MAX_ID_LEN */
            }
            n_hits[qi] = counts[b];
            boff += ks[b];
        }
    }
done:
    rc = first_failure(query_errs, nq);
    goto out;
fail_all:
    for (size_t i = 0; i < nq; i++)
        aff__fail(&query_errs[i], AFF_ENOMEM, "out of memory running a batch of %zu queries", nq);
out:
    if (locked) pthread_rwlock_unlock(&c->lock);
    aff_scratch_destroy(tmp);
    collection_release(c);
    return rc;
}

int engine_filter_items(aff_engine *e, const char *name, const char *const *ids, size_t n,
                        const aff_filter *filter, bool *pass, aff_err *err)
{
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    compiled_filter cf = {0};
    aff_scratch *tmp = NULL;
    if ((rc = validate_filter(filter, err)) != AFF_OK) goto out_release;
    if (!aff_scratch_or_temp(NULL, &tmp)) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory compiling a filter");
        goto out_release;
    }
    pthread_rwlock_rdlock(&c->lock);
    if ((rc = compile_filter(c, filter, UINT32_MAX, tmp, &cf, err)) != AFF_OK) goto out;
    for (size_t i = 0; i < n; i++) {
        uint32_t row;
        pass[i] = ids[i] && !cf.matches_nothing && strmap_get(c->ids, ids[i], &row) &&
                  backend_filter_matches(&cf.f, &c->attrs[row], row);
    }
out:
    pthread_rwlock_unlock(&c->lock);
out_release:
    aff_scratch_destroy(tmp);
    collection_release(c);
    return rc;
}

int engine_classify_items(aff_engine *e, const char *name, const char *const *ids, size_t n,
                          const aff_filter *const *filters, uint32_t n_filters,
                          engine_item_class *out, float *vectors, aff_err *err)
{
    if (n_filters > 64)
        return aff__fail(err, AFF_EINVAL, "%u filters; at most 64 at once", n_filters);
    for (uint32_t j = 0; j < n_filters; j++) {
        int rc = validate_filter(filters[j], err);
        if (rc != AFF_OK) return rc;
    }
    collection *c;
    int rc = collection_acquire(e, name, &c, err);
    if (rc != AFF_OK) return rc;
    compiled_filter cfs[64];
    aff_scratch *tmp;
    aff_scratch_or_temp(NULL, &tmp);
    uint32_t *rows = tmp ? aff_scratch_array(tmp, n ? n : 1, sizeof *rows) : NULL;
    if (!rows) {
        aff_scratch_destroy(tmp);
        collection_release(c);
        return aff__fail(err, AFF_ENOMEM, "out of memory classifying %zu items", n);
    }
    pthread_rwlock_rdlock(&c->lock);
    for (uint32_t j = 0; j < n_filters; j++)
        if ((rc = compile_filter(c, filters[j], UINT32_MAX, tmp, &cfs[j], err)) != AFF_OK)
            goto out;
    size_t n_found = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t row;
        out[i] = (engine_item_class){0};
        if (!ids[i] || !strmap_get(c->ids, ids[i], &row)) continue;
        const backend_row_attrs *a = &c->attrs[row];
        out[i].found = true;
        out[i].category = a->category;
        for (uint32_t j = 0; j < n_filters; j++)
            if (!filters[j] ||
                (!cfs[j].matches_nothing && backend_filter_matches(&cfs[j].f, a, row)))
                out[i].matches |= (uint64_t)1 << j;
        rows[n_found++] = row;
    }
    if (vectors && n) {
        float *found = aff_scratch_array(tmp, (n_found ? n_found : 1) * c->dim, sizeof *found);
        if (!found) {
            rc = aff__fail(err, AFF_ENOMEM, "out of memory reading %zu vectors", n_found);
            goto out;
        }
        if (n_found && (rc = c->ops->table_read(c->table, rows, (uint32_t)n_found, found, err)))
            goto out;
        for (size_t i = 0, f = 0; i < n; i++) {
            float *v = vectors + i * c->dim;
            if (out[i].found)
                memcpy(v, found + (f++) * c->dim, c->dim * sizeof *v);
            else
                memset(v, 0, c->dim * sizeof *v);
        }
    }
out:
    pthread_rwlock_unlock(&c->lock);
    aff_scratch_destroy(tmp);
    collection_release(c);
    return rc;
}

/* ---- re-ranking --------------------------------------------------------------------------------
 */

static int validate_rerank(const collection *c, const aff_rerank_query *q, aff_err *err)
{
    int rc = check_vector(q->vector, q->dim, c->dim, c->metric, "user vector", err);
    if (rc != AFF_OK) return rc;
    if (q->n < 1 || q->n > AFF_MAX_RERANK_CANDIDATES)
        return aff__fail(err, AFF_EINVAL, "%u candidates; re-ranking takes 1..%d", q->n,
                         AFF_MAX_RERANK_CANDIDATES);
    if (!(q->weight >= 0.0f && q->weight <= 1.0f))
        return aff__fail(err, AFF_EINVAL, "affinity weight %g is outside 0..1", (double)q->weight);
    for (uint32_t i = 0; i < q->n; i++) {
        char what[48];
        snprintf(what, sizeof what, "candidate %u id", i);
        if ((rc = check_string(q->ids[i], AFF_MAX_ID_LEN, what, err))) return rc;
        if (q->base_scores && !isfinite(q->base_scores[i]))
            return aff__fail(err, AFF_EINVAL, "base score of candidate %u is not finite", i);
    }
    return AFF_OK;
}

/* Entries query q takes in the output: its candidate count, 0 when that is out of range. */
static uint32_t rerank_span(const aff_rerank_query *q)
{
    return q->n <= AFF_MAX_RERANK_CANDIDATES ? q->n : 0;
}

static int cmp_rerank(const void *a, const void *b)
{
    const aff_rerank_hit *x = a, *y = b;
    if (x->found != y->found) return x->found ? -1 : 1;
    if (x->found && x->blended != y->blended) return x->blended > y->blended ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

int engine_rerank(aff_engine *e, aff_scratch *scratch, const char *name,
                  const aff_rerank_query *queries, size_t nq, aff_rerank_hit *out,
                  aff_err *query_errs)
{
    if (nq == 0) return AFF_OK;
    collection *c;
    int rc = acquire_for_batch(e, name, nq, query_errs, &c);
    if (rc != AFF_OK) return rc;
    size_t total = 0;
    for (size_t i = 0; i < nq; i++)
        total += rerank_span(&queries[i]);
    if (scratch) aff_scratch_reset(scratch);
    aff_scratch *tmp, *sc = aff_scratch_or_temp(scratch, &tmp);
    float *qbuf = sc ? aff_scratch_array(sc, nq * c->dim, sizeof *qbuf) : NULL;
    uint32_t *offsets = sc ? aff_scratch_array(sc, nq + 1, sizeof *offsets) : NULL;
    uint32_t *rows = sc ? aff_scratch_array(sc, total ? total : 1, sizeof *rows) : NULL;
    float *scores = sc ? aff_scratch_array(sc, total ? total : 1, sizeof *scores) : NULL;
    uint32_t *slot_of = sc ? aff_scratch_array(sc, nq, sizeof *slot_of) : NULL;
    if (!qbuf || !offsets || !rows || !scores || !slot_of) {
        for (size_t i = 0; i < nq; i++)
            aff__fail(&query_errs[i], AFF_ENOMEM, "out of memory re-ranking");
        rc = AFF_ENOMEM;
        goto out;
    }
    pthread_rwlock_rdlock(&c->lock);
    uint32_t nb = 0, nrows = 0;
    size_t oo = 0;
    for (size_t i = 0; i < nq; i++) {
        const aff_rerank_query *q = &queries[i];
        if (validate_rerank(c, q, &query_errs[i]) != AFF_OK) {
            slot_of[i] = UINT32_MAX;
            oo += rerank_span(q);
            continue;
        }
        prepare_vector(q->vector, c->dim, c->metric, qbuf + (size_t)nb * c->dim);
        offsets[nb] = nrows;
        for (uint32_t j = 0; j < q->n; j++) {
            aff_rerank_hit *h = &out[oo + j];
            uint32_t row;
            *h = (aff_rerank_hit){.index = j, .base = q->base_scores ? q->base_scores[j] : 0};
            if (strmap_get(c->ids, q->ids[j], &row)) {
                h->found = true;
                rows[nrows++] = row;
            }
        }
        slot_of[i] = nb++;
        oo += q->n;
    }
    offsets[nb] = nrows;
    aff_err berr = {0};
    int brc =
        nrows ? c->ops->table_score(c->table, qbuf, nb, offsets, rows, scores, &berr) : AFF_OK;
    pthread_rwlock_unlock(&c->lock);
    oo = 0;
    for (size_t i = 0; i < nq; i++) {
        const aff_rerank_query *q = &queries[i];
        if (slot_of[i] == UINT32_MAX) {
            oo += rerank_span(q);
            continue;
        }
        if (brc != AFF_OK) {
            query_errs[i] = berr;
            oo += q->n;
            continue;
        }
        uint32_t next = offsets[slot_of[i]];
        for (uint32_t j = 0; j < q->n; j++) {
            aff_rerank_hit *h = &out[oo + j];
            if (h->found) h->affinity = scores[next++];
            h->blended =
                h->found ? (1.0f - q->weight) * h->base + q->weight * h->affinity : h->base;
        }
        qsort(out + oo, q->n, sizeof *out, cmp_rerank);
        oo += q->n;
    }
    rc = first_failure(query_errs, nq);
out:
    aff_scratch_destroy(tmp);
    collection_release(c);
    return rc;
}

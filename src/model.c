/*
 * model.c: owns per-collection model state (parameters, the current and previous versions, the
 * running job), the training job (store scan -> sparse matrix -> als_train -> persist ->
 * install), the behaviour spaces in the engine, the model blob's encoding, and the automatic
 * triggers. See model.h for the rules it keeps.
 *
 * Locks, in order: aff_model.mu (the collection list) -> mcoll.mu (job state, parameters, space
 * mirroring and installs) -> mcoll.cur_mu (the current-version pointer; held only to take a
 * reference). Readers on the serving path take only cur_mu.
 *
 * Blob layout (store's "models" database, little-endian, version 1):
 *   u8 ver=1, u8 has_model, u16 0, params: u32 factors, f32 lambda, f32 alpha0, f32 nu,
 *   u32 epochs, u32 cg_steps;
 *   with a model: u64 id, i64 trained_at_ms, u64 events_used, u64 users, u32 epochs_run,
 *   u32 n_items, f64 loss, f64 duration_s, u32 n_users_kept, u32 0,
 *   n_items x (u16 len + item id), n_users_kept x (u16 len + user id),
 *   f32 item_factors[n_items x d], f32 user_factors[n_users_kept x d].
 */
#include "model.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "strmap.h"

#define BLOB_VERSION     1
#define SPACE_BATCH      1024
#define MAX_SEGMENT_K    100000
#define SCHEDULER_TICK_S 1
#define AUTO_TRAIN_RETRY_MS (30 * 60 * 1000) /* replication: ask again for one version */

/* One published model: immutable, shared by reference. */
typedef struct mversion {
    atomic_uint refs;
    model_version_info info;
    uint32_t d, n_items, n_users;
    char **item_ids; /* n_items, into ids_storage */
    char **user_ids; /* n_users */
    char *ids_storage;
    strmap *rows;        /* item id -> row */
    float *item_factors; /* n_items x d */
    float *user_factors; /* n_users x d (the trainer's, for segments) */
    float *gram;         /* item Gramian, d x d */
    /* Content -> factor map (als.h) for items with a content vector and no events yet; fitted
     * when the collection has content vectors and enough items have both. */
    bool has_map;
    als_content_map map;
    uint64_t mapped_items; /* items placed by the map when the space was built */
    bool space_built;
} mversion;

typedef struct mcoll {
    char name[AFF_MAX_NAME_LEN + 1];
    pthread_mutex_t mu;
    pthread_mutex_t cur_mu;
    mversion *cur, *prev;
    als_params params;
    /* the job */
    bool running, joinable;
    pthread_t thread;
    atomic_bool cancel;
    uint64_t job_id;
    uint32_t job_epoch, job_epochs;
    double job_loss;
    int64_t job_started_ms;
    als_params job_params;
    char last_error[256];
    bool failed;
    atomic_uint_fast64_t events_since;
    int64_t last_trained_ms;
    /* replication: the last training this replica asked the log for (request_train) */
    bool auto_asked;
    uint64_t auto_version;
    int64_t auto_ms;
    struct aff_model *m;
} mcoll;

struct aff_model {
    aff_engine *e;
    aff_store *s;
    model_config cfg;
    pthread_mutex_t mu;
    mcoll **colls;
    size_t n_colls, cap_colls;
    atomic_uint_fast64_t next_version; /* model ids, also space names */
    atomic_uint_fast64_t next_job;
    pthread_t scheduler;
    bool scheduler_running;
    pthread_mutex_t stop_mu;
    pthread_cond_t stop_cv;
    bool stop;
};

void model_config_init(model_config *cfg)
{
    *cfg =
        (model_config){.half_life_s = 14 * 86400.0, .train_interval_s = 0, .train_after_events = 0};
    als_params_init(&cfg->defaults);
}

const char *model_state_name(model_state s)
{
    switch (s) {
    case MODEL_STATE_TRAINING:
        return "training";
    case MODEL_STATE_READY:
        return "ready";
    case MODEL_STATE_FAILED:
        return "failed";
    default:
        return "none";
    }
}

static int64_t now_ms(const aff_model *m)
{
    if (m->cfg.now_ms) return m->cfg.now_ms(m->cfg.now_ctx);
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* ---- versions ------------------------------------------------------------------------------ */

static void version_free(mversion *v)
{
    if (!v) return;
    strmap_destroy(v->rows);
    free(v->item_ids);
    free(v->user_ids);
    free(v->ids_storage);
    free(v->item_factors);
    free(v->user_factors);
    free(v->gram);
    als_content_map_free(&v->map);
    free(v);
}

static void version_release(aff_model *m, mversion *v)
{
    if (!v || atomic_fetch_sub(&v->refs, 1) != 1) return;
    if (v->space_built) {
        aff_err err;
        engine_drop_collection(m->e, v->info.space, &err);
    }
    version_free(v);
}

static mversion *version_acquire(mcoll *c)
{
    pthread_mutex_lock(&c->cur_mu);
    mversion *v = c->cur;
    if (v) atomic_fetch_add(&v->refs, 1);
    pthread_mutex_unlock(&c->cur_mu);
    return v;
}

/* Fills rows, gram and space name of a version whose ids and factors are set. */
static int version_finish(aff_model *m, mversion *v, aff_err *err)
{
    if (strmap_create(&v->rows, v->n_items) != AFF_OK ||
        !(v->gram = malloc((size_t)v->d * v->d * sizeof(float))))
        return aff__fail(err, AFF_ENOMEM, "model: out of memory");
    for (uint32_t i = 0; i < v->n_items; i++)
        if (strmap_put(v->rows, v->item_ids[i], i, NULL) != AFF_OK)
            return aff__fail(err, AFF_ENOMEM, "model: out of memory");
    als_gramian(v->item_factors, v->n_items, v->d, v->gram);
    uint64_t sid = atomic_fetch_add(&m->next_version, 1);
    snprintf(v->info.space, sizeof v->info.space, "%cb%llu", ENGINE_INTERNAL_PREFIX,
             (unsigned long long)sid);
    atomic_init(&v->refs, 1);
    return AFF_OK;
}

/* ---- collections --------------------------------------------------------------------------- */

/* The collection's state, created on first use; NULL (with err) when the engine does not know
 * the collection. */
static mcoll *coll_get(aff_model *m, const char *name, aff_err *err)
{
    uint32_t dim;
    if (engine_collection_dim(m->e, name, &dim, err) != AFF_OK) return NULL;
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < m->n_colls; i++)
        if (strcmp(m->colls[i]->name, name) == 0) {
            pthread_mutex_unlock(&m->mu);
            return m->colls[i];
        }
    mcoll *c = NULL;
    if (m->n_colls == m->cap_colls) {
        size_t cap = m->cap_colls ? 2 * m->cap_colls : 8;
        mcoll **colls = realloc(m->colls, cap * sizeof *colls);
        if (!colls) goto oom;
        m->colls = colls;
        m->cap_colls = cap;
    }
    if (!(c = calloc(1, sizeof *c))) goto oom;
    snprintf(c->name, sizeof c->name, "%s", name);
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->cur_mu, NULL);
    c->params = m->cfg.defaults;
    c->last_trained_ms = now_ms(m);
    c->m = m;
    atomic_init(&c->cancel, false);
    atomic_init(&c->events_since, 0);
    m->colls[m->n_colls++] = c;
    pthread_mutex_unlock(&m->mu);
    return c;
oom:
    pthread_mutex_unlock(&m->mu);
    aff__fail(err, AFF_ENOMEM, "model: out of memory");
    return NULL;
}

/* Looks a collection's state up without creating it (hooks on the write path). */
static mcoll *coll_find(aff_model *m, const char *name)
{
    mcoll *c = NULL;
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < m->n_colls && !c; i++)
        if (strcmp(m->colls[i]->name, name) == 0) c = m->colls[i];
    pthread_mutex_unlock(&m->mu);
    return c;
}

/* ---- blob encoding ------------------------------------------------------------------------- */

typedef struct wbuf {
    uint8_t *p;
    size_t n, cap;
    bool oom;
} wbuf;

static void wb(wbuf *w, const void *src, size_t n)
{
    if (w->oom) return;
    if (w->n + n > w->cap) {
        size_t cap = w->cap ? w->cap : 4096;
        while (cap < w->n + n)
            cap *= 2;
        uint8_t *p = realloc(w->p, cap);
        if (!p) {
            w->oom = true;
            return;
        }
        w->p = p;
        w->cap = cap;
    }
    memcpy(w->p + w->n, src, n);
    w->n += n;
}
#define WB(w, type, v)                                                                             \
    do {                                                                                           \
        type tmp_ = (v);                                                                           \
        wb((w), &tmp_, sizeof tmp_);                                                               \
    } while (0)

static void wb_params(wbuf *w, const als_params *p)
{
    WB(w, uint32_t, p->factors);
    WB(w, float, p->lambda);
    WB(w, float, p->alpha0);
    WB(w, float, p->nu);
    WB(w, uint32_t, p->epochs);
    WB(w, uint32_t, p->cg_steps);
}

static void wb_id(wbuf *w, const char *id)
{
    uint16_t len = (uint16_t)strlen(id);
    wb(w, &len, 2);
    wb(w, id, len);
}

/* Encodes params and, when v is not NULL, the model. */
static int blob_encode(const als_params *params, const mversion *v, wbuf *w, aff_err *err)
{
    WB(w, uint8_t, BLOB_VERSION);
    WB(w, uint8_t, v != NULL);
    WB(w, uint16_t, 0);
    wb_params(w, params);
    if (v) {
        WB(w, uint64_t, v->info.id);
        WB(w, int64_t, v->info.trained_at_ms);
        WB(w, uint64_t, v->info.events_used);
        WB(w, uint64_t, v->info.users);
        WB(w, uint32_t, v->info.epochs);
        WB(w, uint32_t, v->n_items);
        WB(w, double, v->info.loss);
        WB(w, double, v->info.duration_s);
        WB(w, uint32_t, v->n_users);
        WB(w, uint32_t, 0);
        wb_params(w, &v->info.params);
        for (uint32_t i = 0; i < v->n_items; i++)
            wb_id(w, v->item_ids[i]);
        for (uint32_t i = 0; i < v->n_users; i++)
            wb_id(w, v->user_ids[i]);
        wb(w, v->item_factors, (size_t)v->n_items * v->d * sizeof(float));
        wb(w, v->user_factors, (size_t)v->n_users * v->d * sizeof(float));
    }
    if (w->oom) return aff__fail(err, AFF_ENOMEM, "model: out of memory encoding");
    return AFF_OK;
}

typedef struct rbuf {
    const uint8_t *p;
    size_t n, at;
    bool bad;
} rbuf;

static const void *rb(rbuf *r, size_t n)
{
    if (r->bad || r->n - r->at < n) {
        r->bad = true;
        return NULL;
    }
    const void *p = r->p + r->at;
    r->at += n;
    return p;
}
#define RB(r, type, out)                                                                           \
    do {                                                                                           \
        const void *p_ = rb((r), sizeof(type));                                                    \
        type tmp_ = 0;                                                                             \
        if (p_) memcpy(&tmp_, p_, sizeof tmp_);                                                    \
        (out) = tmp_;                                                                              \
    } while (0)

static void rb_params(rbuf *r, als_params *p)
{
    RB(r, uint32_t, p->factors);
    RB(r, float, p->lambda);
    RB(r, float, p->alpha0);
    RB(r, float, p->nu);
    RB(r, uint32_t, p->epochs);
    RB(r, uint32_t, p->cg_steps);
}

/* Reads n ids into fresh pointers into storage (appended at *used). */
static bool rb_ids(rbuf *r, uint32_t n, char **out, char *storage, size_t *used)
{
    for (uint32_t i = 0; i < n; i++) {
        uint16_t len;
        RB(r, uint16_t, len);
        const char *s = rb(r, len);
        if (!s || len == 0 || len > AFF_MAX_ID_LEN) return false;
        memcpy(storage + *used, s, len);
        storage[*used + len] = '\0';
        out[i] = storage + *used;
        *used += (size_t)len + 1;
    }
    return true;
}

/* Decodes a blob into params and (when it holds one) a version without rows/gram/space. */
static int blob_decode(const void *blob, size_t len, als_params *params, mversion **out,
                       aff_err *err)
{
    *out = NULL;
    rbuf r = {.p = blob, .n = len};
    uint8_t ver, has;
    uint16_t pad;
    RB(&r, uint8_t, ver);
    RB(&r, uint8_t, has);
    RB(&r, uint16_t, pad);
    (void)pad;
    if (r.bad || ver != BLOB_VERSION)
        return aff__fail(err, AFF_EINTERNAL, "model: stored model has unknown version %u", ver);
    als_params_init(params);
    rb_params(&r, params);
    if (!has) return r.bad ? aff__fail(err, AFF_EINTERNAL, "model: corrupt stored model") : AFF_OK;
    mversion *v = calloc(1, sizeof *v);
    if (!v) return aff__fail(err, AFF_ENOMEM, "model: out of memory");
    uint32_t zero;
    RB(&r, uint64_t, v->info.id);
    RB(&r, int64_t, v->info.trained_at_ms);
    RB(&r, uint64_t, v->info.events_used);
    RB(&r, uint64_t, v->info.users);
    RB(&r, uint32_t, v->info.epochs);
    RB(&r, uint32_t, v->n_items);
    RB(&r, double, v->info.loss);
    RB(&r, double, v->info.duration_s);
    RB(&r, uint32_t, v->n_users);
    RB(&r, uint32_t, zero);
    (void)zero;
    als_params_init(&v->info.params);
    rb_params(&r, &v->info.params);
    v->d = v->info.params.factors;
    v->info.items = v->n_items;
    aff_err perr;
    if (r.bad || als_params_check(&v->info.params, &perr) != AFF_OK) goto corrupt;
    size_t max_ids = (size_t)v->n_items + v->n_users;
    if (max_ids > len) goto corrupt;
    v->item_ids = calloc(v->n_items ? v->n_items : 1, sizeof *v->item_ids);
    v->user_ids = calloc(v->n_users ? v->n_users : 1, sizeof *v->user_ids);
    v->ids_storage = malloc(len + 1);
    v->item_factors = malloc(((size_t)v->n_items * v->d + 1) * sizeof(float));
    v->user_factors = malloc(((size_t)v->n_users * v->d + 1) * sizeof(float));
    if (!v->item_ids || !v->user_ids || !v->ids_storage || !v->item_factors || !v->user_factors) {
        version_free(v);
        return aff__fail(err, AFF_ENOMEM, "model: out of memory loading a model");
    }
    size_t used = 0;
    if (!rb_ids(&r, v->n_items, v->item_ids, v->ids_storage, &used) ||
        !rb_ids(&r, v->n_users, v->user_ids, v->ids_storage, &used))
        goto corrupt;
    const void *f = rb(&r, (size_t)v->n_items * v->d * sizeof(float));
    if (!f) goto corrupt;
    memcpy(v->item_factors, f, (size_t)v->n_items * v->d * sizeof(float));
    f = rb(&r, (size_t)v->n_users * v->d * sizeof(float));
    if (!f) goto corrupt;
    memcpy(v->user_factors, f, (size_t)v->n_users * v->d * sizeof(float));
    *out = v;
    return AFF_OK;
corrupt:
    version_free(v);
    return aff__fail(err, AFF_EINTERNAL, "model: corrupt stored model");
}

/* ---- behaviour spaces ---------------------------------------------------------------------- */

/* An item of a behaviour space: the catalog item's attributes (a, whose strings tags[] points
 * into) with a learned or mapped vector of d floats. */
static aff_item space_item(const item_record *a, const char **tags, const float *vector,
                           uint32_t d)
{
    return (aff_item){.id = a->id, .vector = vector, .dim = d, .attrs = item_record_attrs(a, tags)};
}

/* ---- content -> factor map (items with a content vector and no events) --------------------- */

typedef struct map_fit_ctx {
    const mversion *v;
    float *x, *f;
    size_t n;
    uint32_t dim_in;
} map_fit_ctx;

static int map_fit_visit(void *ctx, const item_record *item, const float *vector, aff_err *err)
{
    (void)err;
    map_fit_ctx *fc = ctx;
    uint32_t row;
    if (!vector || !strmap_get(fc->v->rows, item->id, &row) || fc->n >= fc->v->n_items) return 0;
    memcpy(fc->x + fc->n * fc->dim_in, vector, fc->dim_in * sizeof(float));
    memcpy(fc->f + fc->n * fc->v->d, fc->v->item_factors + (size_t)row * fc->v->d,
           fc->v->d * sizeof(float));
    fc->n++;
    return 0;
}

/* Fits v's content map from the items that have both a content vector and a learned factor
 * (v->rows set). Without content vectors or with too few such items v has no map; a failure
 * only loses the map (logged), never the model. */
static void map_fit(aff_model *m, const char *collection, mversion *v)
{
    aff_err err = {0};
    bool content = false;
    uint32_t dim_in = 0;
    if (engine_collection_has_content(m->e, collection, &content, &err) != AFF_OK || !content ||
        engine_collection_dim(m->e, collection, &dim_in, &err) != AFF_OK)
        return;
    map_fit_ctx fc = {.v = v, .dim_in = dim_in};
    fc.x = malloc(((size_t)v->n_items * dim_in + 1) * sizeof(float));
    fc.f = malloc(((size_t)v->n_items * v->d + 1) * sizeof(float));
    int status = !fc.x || !fc.f ? aff__fail(&err, AFF_ENOMEM, "content map: out of memory")
                                : engine_scan_items(m->e, collection, map_fit_visit, &fc, &err);
    if (status == AFF_OK)
        status = als_content_map_fit(fc.x, fc.f, fc.n, dim_in, v->d, &v->map, &err);
    v->has_map = status == AFF_OK;
    if (status && status != AFF_EPRECONDITION)
        aff_log_kv(AFF_LOG_WARN, "content map not fitted", "collection", collection, "error",
                   err.msg, NULL);
    free(fc.x);
    free(fc.f);
}

enum { MAP_BATCH = 256 };

typedef struct map_space_ctx {
    aff_model *m;
    mversion *v;
    item_record *attrs; /* MAP_BATCH */
    float *fac;         /* MAP_BATCH x d */
    size_t n;
} map_space_ctx;

static int map_space_flush(map_space_ctx *sc, aff_err *err)
{
    aff_item items[MAP_BATCH];
    const char *tags[MAP_BATCH][AFF_MAX_TAGS_PER_ITEM];
    for (size_t i = 0; i < sc->n; i++)
        items[i] = space_item(&sc->attrs[i], tags[i], sc->fac + i * sc->v->d, sc->v->d);
    int status = sc->n ? engine_upsert(sc->m->e, sc->v->info.space, items, sc->n, err) : AFF_OK;
    sc->v->mapped_items += sc->n;
    sc->n = 0;
    return status;
}

static int map_space_visit(void *ctx, const item_record *item, const float *vector, aff_err *err)
{
    map_space_ctx *sc = ctx;
    uint32_t row;
    if (!vector || strmap_get(sc->v->rows, item->id, &row)) return 0;
    sc->attrs[sc->n] = *item;
    als_content_map_apply(&sc->v->map, vector, sc->fac + sc->n * sc->v->d);
    if (++sc->n == MAP_BATCH) return map_space_flush(sc, err);
    return 0;
}

/* Adds every item of the collection that the model does not know but that has a content
 * vector to v's space, at its mapped factor. */
static int map_space_build(aff_model *m, mcoll *c, mversion *v, aff_err *err)
{
    if (!v->has_map) return AFF_OK;
    map_space_ctx sc = {.m = m, .v = v};
    sc.attrs = malloc(MAP_BATCH * sizeof *sc.attrs);
    sc.fac = malloc((size_t)MAP_BATCH * v->d * sizeof *sc.fac);
    int status = !sc.attrs || !sc.fac
                     ? aff__fail(err, AFF_ENOMEM, "model: out of memory building a space")
                     : engine_scan_items(m->e, c->name, map_space_visit, &sc, err);
    if (status == AFF_OK) status = map_space_flush(&sc, err);
    free(sc.attrs);
    free(sc.fac);
    return status;
}

/* Creates v's engine collection from its factors and the items' current attributes in the
 * collection. Called with c->mu held, so catalog writes cannot interleave. Items the catalog
 * deleted since training are left out. */
static int space_build(aff_model *m, mcoll *c, mversion *v, aff_err *err)
{
    engine_collection_spec spec = {.name = v->info.space,
                                   .internal = true,
                                   .dim = v->d,
                                   .metric = AFF_METRIC_IP,
                                   .index = BACKEND_INDEX_FLAT};
    int status = engine_create_collection(m->e, &spec, err);
    if (status) return status;
    v->space_built = true;
    item_record *attrs = malloc(SPACE_BATCH * sizeof *attrs);
    aff_item *items = malloc(SPACE_BATCH * sizeof *items);
    const char *(*tags)[AFF_MAX_TAGS_PER_ITEM] = malloc(SPACE_BATCH * sizeof *tags);
    if (!attrs || !items || !tags) {
        status = aff__fail(err, AFF_ENOMEM, "model: out of memory building a space");
        goto out;
    }
    size_t n = 0;
    for (uint32_t i = 0; i <= v->n_items; i++) {
        if (i < v->n_items) {
            aff_err gerr;
            int g = engine_get_item(m->e, c->name, v->item_ids[i], &attrs[n], NULL, &gerr);
            if (g == AFF_ENOTFOUND) continue;
            if (g) {
                status = aff__fail(err, g, "%s", gerr.msg);
                goto out;
            }
            items[n] = space_item(&attrs[n], tags[n], v->item_factors + (size_t)i * v->d, v->d);
            n++;
        }
        if (n == SPACE_BATCH || (i == v->n_items && n > 0)) {
            if ((status = engine_upsert(m->e, v->info.space, items, n, err))) goto out;
            n = 0;
        }
    }
    status = map_space_build(m, c, v, err);
out:
    free(attrs);
    free(items);
    free(tags);
    return status;
}

/* Makes v current (c->mu held); the previous-but-one version loses the collection's reference
 * and with it, once no query holds it, its space. */
static void install(aff_model *m, mcoll *c, mversion *v)
{
    pthread_mutex_lock(&c->cur_mu);
    mversion *old_prev = c->prev;
    c->prev = c->cur;
    c->cur = v;
    pthread_mutex_unlock(&c->cur_mu);
    version_release(m, old_prev);
}

/* ---- training ------------------------------------------------------------------------------ */

typedef struct train_data {
    aff_model *m;
    double half_life_ms;
    int64_t now;
    strmap *items; /* item id -> column */
    char **item_ids;
    uint32_t n_items;
    size_t cap_items;
    char **user_ids;
    uint32_t n_users;
    size_t cap_users, cap_rp;
    uint64_t *row_ptr;
    uint32_t *col;
    float *conf;
    uint64_t nnz;
    size_t cap_col, cap_conf;
    char last_user[AFF_MAX_ID_LEN + 1];
    bool oom;
} train_data;

static bool grow(void **p, size_t *cap_io, size_t need, size_t elem)
{
    if (need <= *cap_io) return true;
    size_t cap = *cap_io ? *cap_io : 1024;
    while (cap < need)
        cap *= 2;
    void *q = realloc(*p, cap * elem);
    if (!q) return false;
    *p = q;
    *cap_io = cap;
    return true;
}

static int collect_visit(void *ctx, const char *user, const char *item, const store_interaction *in)
{
    train_data *t = ctx;
    double r = in->weight * exp2(-(double)(t->now - in->ref_ms) / t->half_life_ms);
    float c = als_confidence(r);
    if (!(c > 0)) return 0;
    if (strcmp(user, t->last_user) != 0) {
        if (!grow((void **)&t->user_ids, &t->cap_users, (size_t)t->n_users + 1,
                  sizeof *t->user_ids) ||
            !grow((void **)&t->row_ptr, &t->cap_rp, (size_t)t->n_users + 2, sizeof *t->row_ptr) ||
            !(t->user_ids[t->n_users] = strdup(user)))
            return AFF_ENOMEM;
        t->row_ptr[t->n_users] = t->nnz;
        t->n_users++;
        t->row_ptr[t->n_users] = t->nnz;
        snprintf(t->last_user, sizeof t->last_user, "%s", user);
    }
    uint32_t colno;
    if (!strmap_get(t->items, item, &colno)) {
        if (!grow((void **)&t->item_ids, &t->cap_items, (size_t)t->n_items + 1,
                  sizeof *t->item_ids))
            return AFF_ENOMEM;
        const char *key;
        if (strmap_put(t->items, item, t->n_items, &key) != AFF_OK) return AFF_ENOMEM;
        t->item_ids[t->n_items] = (char *)key;
        colno = t->n_items++;
    }
    if (!grow((void **)&t->col, &t->cap_col, t->nnz + 1, sizeof *t->col) ||
        !grow((void **)&t->conf, &t->cap_conf, t->nnz + 1, sizeof *t->conf))
        return AFF_ENOMEM;
    t->col[t->nnz] = colno;
    t->conf[t->nnz] = c;
    t->nnz++;
    t->row_ptr[t->n_users] = t->nnz;
    return 0;
}

typedef struct collect_ctx {
    train_data *t;
    const char *collection;
} collect_ctx;

static int collect_fn(store_txn *txn, void *ctx, aff_err *err)
{
    collect_ctx *cc = ctx;
    int status =
        store_txn_scan_collection_interactions(txn, cc->collection, collect_visit, cc->t, err);
    if (status == AFF_ENOMEM)
        return aff__fail(err, AFF_ENOMEM, "model: out of memory reading events");
    return status;
}

static void train_data_free(train_data *t)
{
    strmap_destroy(t->items);
    for (uint32_t i = 0; i < t->n_users; i++)
        free(t->user_ids[i]);
    free(t->user_ids);
    free(t->item_ids);
    free(t->row_ptr);
    free(t->col);
    free(t->conf);
}

/* Drops columns of items the engine no longer has (deleted since their events). */
static int drop_deleted_items(aff_model *m, const char *collection, train_data *t, aff_err *err)
{
    if (t->n_items == 0) return AFF_OK;
    bool *pass = malloc(t->n_items * sizeof *pass);
    uint32_t *remap = malloc(t->n_items * sizeof *remap);
    int status = AFF_OK;
    if (!pass || !remap) {
        status = aff__fail(err, AFF_ENOMEM, "model: out of memory");
        goto out;
    }
    if ((status = engine_filter_items(m->e, collection, (const char *const *)t->item_ids,
                                      t->n_items, NULL, pass, err)))
        goto out;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < t->n_items; i++) {
        remap[i] = pass[i] ? kept : UINT32_MAX;
        if (pass[i]) t->item_ids[kept++] = t->item_ids[i];
    }
    if (kept == t->n_items) goto out;
    uint64_t w = 0;
    for (uint32_t u = 0; u < t->n_users; u++) {
        uint64_t from = t->row_ptr[u], to = t->row_ptr[u + 1];
        t->row_ptr[u] = w;
        for (uint64_t k = from; k < to; k++) {
            if (remap[t->col[k]] == UINT32_MAX) continue;
            t->col[w] = remap[t->col[k]];
            t->conf[w++] = t->conf[k];
        }
    }
    t->row_ptr[t->n_users] = w;
    t->nnz = w;
    t->n_items = kept;
out:
    free(pass);
    free(remap);
    return status;
}

static bool job_progress(void *ctx, uint32_t epoch, uint32_t epochs, double loss)
{
    mcoll *c = ctx;
    pthread_mutex_lock(&c->mu);
    c->job_epoch = epoch;
    c->job_epochs = epochs;
    c->job_loss = loss;
    pthread_mutex_unlock(&c->mu);
    return !atomic_load(&c->cancel);
}

/* Replication: encodes v (ids and factors; its id is given at install) with the collection's
 * parameters and hands it to the configured publish hook. */
static int job_publish(aff_model *m, mcoll *c, const mversion *v, aff_err *err)
{
    wbuf w = {0};
    pthread_mutex_lock(&c->mu);
    als_params params = c->params;
    pthread_mutex_unlock(&c->mu);
    int status = blob_encode(&params, v, &w, err);
    if (!status) status = m->cfg.publish(m->cfg.publish_ctx, c->name, w.p, w.n, err);
    free(w.p);
    return status;
}

/* The whole job: read, train, persist, install. Runs without c->mu except where noted. */
static int run_job(aff_model *m, mcoll *c, const als_params *p, aff_err *err)
{
    train_data t = {.m = m, .half_life_ms = m->cfg.half_life_s * 1000.0, .now = now_ms(m)};
    mversion *v = NULL;
    wbuf w = {0};
    int status;
    /* In publish mode every replica restarts the count when it installs the model. */
    uint64_t events_at_start = m->cfg.publish ? 0 : atomic_exchange(&c->events_since, 0);
    if (strmap_create(&t.items, 1024) != AFF_OK) {
        status = aff__fail(err, AFF_ENOMEM, "model: out of memory");
        goto out;
    }
    collect_ctx cc = {.t = &t, .collection = c->name};
    if ((status = store_view(m->s, collect_fn, &cc, err))) goto out;
    if ((status = drop_deleted_items(m, c->name, &t, err))) goto out;
    if (t.nnz == 0) {
        status = aff__fail(err, AFF_EPRECONDITION,
                           "collection \"%s\" has no events on its items to learn from", c->name);
        goto out;
    }
    if (!(v = calloc(1, sizeof *v))) {
        status = aff__fail(err, AFF_ENOMEM, "model: out of memory");
        goto out;
    }
    v->d = p->factors;
    v->n_items = t.n_items;
    v->n_users = t.n_users;
    v->item_factors = malloc((size_t)t.n_items * v->d * sizeof(float));
    v->user_factors = malloc((size_t)t.n_users * v->d * sizeof(float));
    v->item_ids = malloc(t.n_items * sizeof *v->item_ids);
    v->user_ids = malloc((t.n_users ? t.n_users : 1) * sizeof *v->user_ids);
    size_t storage = 0;
    for (uint32_t i = 0; i < t.n_items; i++)
        storage += strlen(t.item_ids[i]) + 1;
    for (uint32_t i = 0; i < t.n_users; i++)
        storage += strlen(t.user_ids[i]) + 1;
    v->ids_storage = malloc(storage + 1);
    if (!v->item_factors || !v->user_factors || !v->item_ids || !v->user_ids || !v->ids_storage) {
        status = aff__fail(err, AFF_ENOMEM, "model: out of memory for factors");
        goto out;
    }
    size_t at = 0;
    for (uint32_t i = 0; i < t.n_items; i++) {
        v->item_ids[i] = strcpy(v->ids_storage + at, t.item_ids[i]);
        at += strlen(t.item_ids[i]) + 1;
    }
    for (uint32_t i = 0; i < t.n_users; i++) {
        v->user_ids[i] = strcpy(v->ids_storage + at, t.user_ids[i]);
        at += strlen(t.user_ids[i]) + 1;
    }
    als_matrix mat = {.n_rows = t.n_users,
                      .n_cols = t.n_items,
                      .row_ptr = t.row_ptr,
                      .col = t.col,
                      .conf = t.conf};
    als_params tp = *p;
    tp.threads = m->cfg.train_threads;
    als_report rep = {0};
    als_device dev;
    const bool have_dev = engine_trainer(m->e, &dev);
    if ((status = als_train(&mat, &tp, have_dev ? &dev : NULL, v->user_factors, v->item_factors,
                            job_progress, c, &rep, err)))
        goto out;
    if (have_dev && !rep.on_device)
        aff_log_kv(AFF_LOG_WARN, "training ran on the CPU instead of the GPU", "collection",
                   c->name, "reason", rep.device_error, NULL);
    v->info = (model_version_info){.trained_at_ms = now_ms(m),
                                   .events_used = t.nnz,
                                   .users = t.n_users,
                                   .items = t.n_items,
                                   .epochs = rep.epochs_run,
                                   .loss = rep.loss,
                                   .duration_s = rep.seconds,
                                   .params = *p};
    if (m->cfg.publish) { /* replication: installed by every replica from the log */
        status = job_publish(m, c, v, err);
        version_free(v);
        v = NULL;
        goto out;
    }
    if ((status = version_finish(m, v, err))) goto out;
    v->info.id = strtoull(v->info.space + 2, NULL, 10);
    map_fit(m, c->name, v);

    pthread_mutex_lock(&c->mu);
    als_params params = c->params;
    pthread_mutex_unlock(&c->mu);
    if ((status = blob_encode(&params, v, &w, err)) ||
        (status = store_put_model(m->s, c->name, w.p, w.n, err)))
        goto out;
    pthread_mutex_lock(&c->mu);
    status = space_build(m, c, v, err);
    if (status == AFF_OK) {
        install(m, c, v);
        c->last_trained_ms = v->info.trained_at_ms;
        v = NULL;
    }
    pthread_mutex_unlock(&c->mu);
out:
    if (status) atomic_fetch_add(&c->events_since, events_at_start);
    if (v && atomic_load(&v->refs) == 0) /* failed before version_finish took a reference */
        version_free(v);
    else if (v)
        version_release(m, v);
    free(w.p);
    train_data_free(&t);
    return status;
}

static void job_finish(mcoll *c, int status, const aff_err *err)
{
    pthread_mutex_lock(&c->mu);
    c->running = false;
    c->failed = status != AFF_OK;
    snprintf(c->last_error, sizeof c->last_error, "%s", status ? err->msg : "");
    pthread_mutex_unlock(&c->mu);
}

static void *job_thread(void *arg)
{
    mcoll *c = arg;
    aff_model *m = c->m;
    /* Training yields to serving: this thread and the OpenMP team it starts run niced. */
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 10);
    aff_err err = {0};
    int status = run_job(m, c, &c->job_params, &err);
    char id[24];
    snprintf(id, sizeof id, "%llu", (unsigned long long)c->job_id);
    if (status)
        aff_log_kv(AFF_LOG_WARN, "training failed", "collection", c->name, "job", id, "error",
                   err.msg, NULL);
    else if (m->cfg.publish)
        aff_log_kv(AFF_LOG_INFO, "training done; the model goes through the write log",
                   "collection", c->name, "job", id, NULL);
    else {
        mversion *v = version_acquire(c);
        char line[200];
        snprintf(line, sizeof line,
                 "model %llu: %llu events, %u epochs, loss %.5f, %.2f s, %llu items placed by "
                 "the content map",
                 v ? (unsigned long long)v->info.id : 0ULL,
                 v ? (unsigned long long)v->info.events_used : 0ULL, v ? v->info.epochs : 0,
                 v ? v->info.loss : 0.0, v ? v->info.duration_s : 0.0,
                 v ? (unsigned long long)v->mapped_items : 0ULL);
        version_release(m, v);
        aff_log_kv(AFF_LOG_INFO, "training done", "collection", c->name, "job", id, "model", line,
                   NULL);
    }
    job_finish(c, status, &err);
    return NULL;
}

/* Starts a job on c (c->mu held by the caller). */
static int job_start(aff_model *m, mcoll *c, const als_params *p, aff_err *err)
{
    if (c->joinable) {
        pthread_join(c->thread, NULL);
        c->joinable = false;
    }
    c->job_params = p ? *p : c->params;
    c->job_id = atomic_fetch_add(&m->next_job, 1);
    c->job_epoch = 0;
    c->job_epochs = c->job_params.epochs;
    c->job_loss = 0;
    c->job_started_ms = now_ms(m);
    c->last_error[0] = '\0';
    atomic_store(&c->cancel, false);
    c->running = true;
    int e = pthread_create(&c->thread, NULL, job_thread, c);
    if (e) {
        c->running = false;
        return aff__fail(err, AFF_ENOMEM, "model: cannot start a training thread");
    }
    c->joinable = true;
    return AFF_OK;
}

typedef struct any_ctx {
    bool found;
} any_ctx;

static int any_visit(void *ctx, const char *user, const char *item, const store_interaction *in)
{
    (void)user, (void)item, (void)in;
    ((any_ctx *)ctx)->found = true;
    return 1;
}

typedef struct any_fn_ctx {
    const char *collection;
    any_ctx a;
} any_fn_ctx;

static int any_fn(store_txn *txn, void *ctx, aff_err *err)
{
    any_fn_ctx *c = ctx;
    c->a.found = false;
    return store_txn_scan_collection_interactions(txn, c->collection, any_visit, &c->a, err);
}

int model_train(aff_model *m, const char *collection, const als_params *p, uint64_t *job_id,
                bool *already_running, aff_err *err)
{
    *job_id = 0;
    *already_running = false;
    mcoll *c = coll_get(m, collection, err);
    if (!c) return err->code;
    int status;
    if (p && (status = als_params_check(p, err))) return status;
    any_fn_ctx any = {.collection = collection};
    if ((status = store_view(m->s, any_fn, &any, err))) return status;
    if (!any.a.found)
        return aff__fail(err, AFF_EPRECONDITION,
                         "collection \"%s\" has no events to learn from; send events first "
                         "(PutEvents or ImportEvents)",
                         collection);
    pthread_mutex_lock(&c->mu);
    if (c->running) {
        *already_running = true;
        *job_id = c->job_id;
        status = AFF_OK;
    } else if ((status = job_start(m, c, p, err)) == AFF_OK) {
        *job_id = c->job_id;
    }
    pthread_mutex_unlock(&c->mu);
    return status;
}

int model_train_sync(aff_model *m, const char *collection, const als_params *p, aff_err *err)
{
    mcoll *c = coll_get(m, collection, err);
    if (!c) return err->code;
    int status;
    if (p && (status = als_params_check(p, err))) return status;
    pthread_mutex_lock(&c->mu);
    if (c->running) {
        pthread_mutex_unlock(&c->mu);
        return aff__fail(err, AFF_EUNAVAILABLE, "a training job is already running");
    }
    c->running = true;
    c->job_id = atomic_fetch_add(&m->next_job, 1);
    als_params jp = p ? *p : c->params;
    pthread_mutex_unlock(&c->mu);
    status = run_job(m, c, &jp, err);
    job_finish(c, status, err);
    return status;
}

/* ---- configuration and info --------------------------------------------------------------- */

int model_configure(aff_model *m, const char *collection, const als_params *p, aff_err *err)
{
    int status = als_params_check(p, err);
    if (status) return status;
    mcoll *c = coll_get(m, collection, err);
    if (!c) return err->code;
    pthread_mutex_lock(&c->mu);
    mversion *v = version_acquire(c);
    wbuf w = {0};
    status = blob_encode(p, v, &w, err);
    if (!status) status = store_put_model(m->s, collection, w.p, w.n, err);
    if (!status) c->params = *p;
    pthread_mutex_unlock(&c->mu);
    version_release(m, v);
    free(w.p);
    return status;
}

void model_default_params(const aff_model *m, als_params *out)
{
    *out = m->cfg.defaults;
}

int model_get_params(aff_model *m, const char *collection, als_params *out, aff_err *err)
{
    mcoll *c = coll_get(m, collection, err);
    if (!c) return err->code;
    pthread_mutex_lock(&c->mu);
    *out = c->params;
    pthread_mutex_unlock(&c->mu);
    return AFF_OK;
}

int model_get_info(aff_model *m, const char *collection, model_info *out, aff_err *err)
{
    memset(out, 0, sizeof *out);
    mcoll *c = coll_get(m, collection, err);
    if (!c) return err->code;
    /* The version is read under c->mu, as installs happen: a finished job's report and the
     * model it installed are seen together. */
    pthread_mutex_lock(&c->mu);
    mversion *v = version_acquire(c);
    out->has_model = v != NULL;
    if (v) out->current = v->info;
    out->job_running = c->running;
    out->job_id = c->job_id;
    out->job_epoch = c->job_epoch;
    out->job_epochs = c->job_epochs;
    out->job_loss = c->job_loss;
    out->job_started_ms = c->job_started_ms;
    snprintf(out->last_error, sizeof out->last_error, "%s", c->last_error);
    out->params = c->params;
    out->state = c->running  ? MODEL_STATE_TRAINING
                 : v         ? MODEL_STATE_READY
                 : c->failed ? MODEL_STATE_FAILED
                             : MODEL_STATE_NONE;
    pthread_mutex_unlock(&c->mu);
    out->events_since_train = atomic_load(&c->events_since);
    version_release(m, v);
    return AFF_OK;
}

int model_install_blob(aff_model *m, const char *collection, const void *blob, size_t len,
                       uint64_t version, uint64_t upload, aff_err *err)
{
    mcoll *c = coll_get(m, collection, err);
    if (!c) return err->code;
    als_params ignored;
    mversion *v = NULL;
    wbuf w = {0};
    int status = blob_decode(blob, len, &ignored, &v, err);
    if (status) return status;
    if (!v) return aff__fail(err, AFF_EINVAL, "model: the model record holds no model");
    if ((status = version_finish(m, v, err))) {
        version_free(v); /* not published: no reference, no space */
        return status;
    }
    v->info.id = version;
    map_fit(m, c->name, v);
    pthread_mutex_lock(&c->mu);
    status = blob_encode(&c->params, v, &w, err);
    if (!status) status = store_commit_model(m->s, c->name, upload, w.p, w.n, err);
    if (!status) status = space_build(m, c, v, err);
    if (!status) {
        install(m, c, v);
        c->last_trained_ms = v->info.trained_at_ms;
        c->failed = false;
        atomic_store(&c->events_since, 0);
        v = NULL;
    }
    pthread_mutex_unlock(&c->mu);
    if (v) version_release(m, v);
    free(w.p);
    return status;
}

/* ---- serving ------------------------------------------------------------------------------- */

typedef struct fold_ctx {
    const mversion *v;
    double half_life_ms;
    int64_t now; /* 0: decided after the scan (model_config.fold_in_data_clock) */
    uint32_t *idx;
    float *conf;
    int64_t *at;    /* each interaction's latest event time */
    double *weight; /* with a deferred clock: each interaction's weight at `at` */
    size_t n, cap_idx, cap_conf, cap_at, cap_weight;
} fold_ctx;

static int fold_visit(void *ctx, const char *item, const store_interaction *in)
{
    fold_ctx *f = ctx;
    uint32_t row;
    if (!strmap_get(f->v->rows, item, &row)) return 0;
    float c = f->now ? als_confidence(in->weight *
                                      exp2(-(double)(f->now - in->ref_ms) / f->half_life_ms))
                     : 1.0f; /* computed after the scan */
    if (!(c > 0)) return 0;
    if (!grow((void **)&f->idx, &f->cap_idx, f->n + 1, sizeof *f->idx) ||
        !grow((void **)&f->conf, &f->cap_conf, f->n + 1, sizeof *f->conf) ||
        !grow((void **)&f->at, &f->cap_at, f->n + 1, sizeof *f->at) ||
        (!f->now && !grow((void **)&f->weight, &f->cap_weight, f->n + 1, sizeof *f->weight)))
        return AFF_ENOMEM;
    f->idx[f->n] = row;
    f->at[f->n] = in->ref_ms;
    if (!f->now) f->weight[f->n] = in->weight;
    f->conf[f->n++] = c;
    return 0;
}

/* With model_config.fold_in_data_clock: decays the scanned interactions to max(the model's
 * training time, the latest of them) and drops those without confidence. */
static void fold_data_clock(fold_ctx *f)
{
    int64_t now = f->v->info.trained_at_ms;
    for (size_t i = 0; i < f->n; i++)
        if (f->at[i] > now) now = f->at[i];
    size_t kept = 0;
    for (size_t i = 0; i < f->n; i++) {
        float c = als_confidence(f->weight[i] * exp2(-(double)(now - f->at[i]) / f->half_life_ms));
        if (!(c > 0)) continue;
        f->idx[kept] = f->idx[i];
        f->at[kept] = f->at[i];
        f->conf[kept++] = c;
    }
    f->n = kept;
}

typedef struct fold_entry {
    int64_t at;
    uint32_t idx;
    float conf;
} fold_entry;

static int cmp_recent(const void *a, const void *b)
{
    const fold_entry *x = a, *y = b;
    if (x->at != y->at) return x->at < y->at ? 1 : -1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

/* Keeps the `keep` interactions with the most recent events (ties: lower model row first). */
static int fold_keep_recent(fold_ctx *f, uint32_t keep, aff_err *err)
{
    fold_entry *e = malloc(f->n * sizeof *e);
    if (!e) return aff__fail(err, AFF_ENOMEM, "model: out of memory");
    for (size_t i = 0; i < f->n; i++)
        e[i] = (fold_entry){f->at[i], f->idx[i], f->conf[i]};
    qsort(e, f->n, sizeof *e, cmp_recent);
    for (uint32_t i = 0; i < keep; i++) {
        f->idx[i] = e[i].idx;
        f->conf[i] = e[i].conf;
    }
    f->n = keep;
    free(e);
    return AFF_OK;
}

typedef struct fold_fn_ctx {
    fold_ctx f;
    const char *collection, *user;
} fold_fn_ctx;

static int fold_fn(store_txn *txn, void *ctx, aff_err *err)
{
    fold_fn_ctx *c = ctx;
    c->f.n = 0;
    int status = store_txn_scan_interactions(txn, c->collection, c->user, fold_visit, &c->f, err);
    if (status == AFF_ENOMEM) return aff__fail(err, AFF_ENOMEM, "model: out of memory");
    return status;
}

int model_user_factor(aff_model *m, const char *collection, const char *user,
                      model_user_factor_out *out, aff_err *err)
{
    out->found = false;
    out->n_known = 0;
    mcoll *c = coll_get(m, collection, err);
    if (!c) return err->code;
    mversion *v = version_acquire(c);
    if (!v) return AFF_OK;
    fold_fn_ctx fc = {.f = {.v = v,
                            .half_life_ms = m->cfg.half_life_s * 1000.0,
                            .now = m->cfg.fold_in_data_clock ? 0 : now_ms(m)},
                      .collection = collection,
                      .user = user};
    float *scratch = NULL;
    int status = store_view(m->s, fold_fn, &fc, err);
    if (!status && !fc.f.now) fold_data_clock(&fc.f);
    if (status || fc.f.n == 0) goto out;
    if (m->cfg.fold_in_history && fc.f.n > m->cfg.fold_in_history &&
        (status = fold_keep_recent(&fc.f, m->cfg.fold_in_history, err)))
        goto out;
    if (!(scratch = malloc(als_solve_scratch_floats(v->d) * sizeof(float)))) {
        status = aff__fail(err, AFF_ENOMEM, "model: out of memory");
        goto out;
    }
    if (als_solve_row(v->item_factors, v->gram, v->d, v->n_items, &v->info.params, fc.f.idx,
                      fc.f.conf, fc.f.n, out->vector, scratch)) {
        out->found = true;
        out->dim = v->d;
        out->version = v->info.id;
        out->n_known = (uint32_t)fc.f.n;
        snprintf(out->space, sizeof out->space, "%s", v->info.space);
    }
out:
    free(scratch);
    free(fc.f.idx);
    free(fc.f.conf);
    free(fc.f.at);
    free(fc.f.weight);
    version_release(m, v);
    return status;
}

int model_space(aff_model *m, const char *collection, char space[MODEL_SPACE_NAME_LEN + 1],
                uint32_t *dim, bool *found, aff_err *err)
{
    *found = false;
    mcoll *c = coll_get(m, collection, err);
    if (!c) return err->code;
    mversion *v = version_acquire(c);
    if (v) {
        *found = true;
        *dim = v->d;
        snprintf(space, MODEL_SPACE_NAME_LEN + 1, "%s", v->info.space);
    }
    version_release(m, v);
    return AFF_OK;
}

typedef struct seg_entry {
    float score;
    uint32_t user;
} seg_entry;

static int cmp_seg(const void *a, const void *b)
{
    const seg_entry *x = a, *y = b;
    if (x->score != y->score) return x->score < y->score ? 1 : -1;
    return (x->user > y->user) - (x->user < y->user);
}

int model_segment(aff_model *m, const char *collection, const char *const *item_ids, size_t n_items,
                  uint32_t k, model_segment_hit *out, uint32_t *n_out, aff_err *err)
{
    *n_out = 0;
    if (k < 1 || k > MAX_SEGMENT_K)
        return aff__fail(err, AFF_EINVAL, "k = %u is out of range 1..%d", k, MAX_SEGMENT_K);
    if (n_items == 0) return aff__fail(err, AFF_EINVAL, "item_ids is empty");
    mcoll *c = coll_get(m, collection, err);
    if (!c) return err->code;
    mversion *v = version_acquire(c);
    if (!v)
        return aff__fail(err, AFF_EPRECONDITION,
                         "collection \"%s\" has no trained model yet; call Train first",
                         collection);
    int status = AFF_OK;
    float *q = calloc(v->d, sizeof *q);
    seg_entry *heap = malloc(((size_t)v->n_users + 1) * sizeof *heap);
    if (!q || !heap) {
        status = aff__fail(err, AFF_ENOMEM, "model: out of memory");
        goto out;
    }
    for (size_t i = 0; i < n_items; i++) {
        uint32_t row;
        if (!item_ids[i] || !strmap_get(v->rows, item_ids[i], &row)) {
            status = aff__fail(err, AFF_ENOTFOUND,
                               "item_ids[%zu] = \"%.64s\" is not in the model (no events yet)", i,
                               item_ids[i] ? item_ids[i] : "");
            goto out;
        }
        for (uint32_t j = 0; j < v->d; j++)
            q[j] += v->item_factors[(size_t)row * v->d + j] / (float)n_items;
    }
    /* Every user's score; a full sort of U entries is fine for campaign-sized calls. */
    for (uint32_t u = 0; u < v->n_users; u++) {
        const float *x = v->user_factors + (size_t)u * v->d;
        float s = 0;
        for (uint32_t j = 0; j < v->d; j++)
            s += x[j] * q[j];
        heap[u] = (seg_entry){s, u};
    }
    qsort(heap, v->n_users, sizeof *heap, cmp_seg);
    uint32_t n = v->n_users < k ? v->n_users : k;
    for (uint32_t i = 0; i < n; i++) {
        snprintf(out[i].user, sizeof out[i].user, "%s", v->user_ids[heap[i].user]);
        out[i].score = heap[i].score;
    }
    *n_out = n;
out:
    free(q);
    free(heap);
    version_release(m, v);
    return status;
}

/* ---- hooks --------------------------------------------------------------------------------- */

void model_note_events(aff_model *m, const char *collection, uint64_t n)
{
    if (!m || n == 0) return;
    aff_err err;
    mcoll *c = coll_get(m, collection, &err);
    if (c) atomic_fetch_add(&c->events_since, n);
}

void model_on_upsert(aff_model *m, const char *collection, const aff_item *items, size_t n)
{
    if (!m) return;
    mcoll *c = coll_find(m, collection);
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    mversion *v = version_acquire(c);
    if (v && v->space_built) {
        /* Attributes follow the catalog; the learned vector stays. Items the model does not
         * know get their content vector's mapped factor when the model has a map (the vector
         * as the engine stored it, normalized for cosine, as in the fit); without one they join
         * at the next training. */
        aff_item *mirror = malloc(n * sizeof *mirror);
        float *mapped = v->has_map ? malloc(n * (size_t)v->d * sizeof *mapped) : NULL;
        float *content = v->has_map ? malloc((size_t)v->map.dim_in * sizeof *content) : NULL;
        item_record *stored = v->has_map ? malloc(sizeof *stored) : NULL;
        const bool can_map = mapped && content && stored;
        size_t k = 0;
        for (size_t i = 0; mirror && i < n; i++) {
            uint32_t row;
            const float *vec;
            if (strmap_get(v->rows, items[i].id, &row)) {
                vec = v->item_factors + (size_t)row * v->d;
            } else {
                aff_err gerr;
                if (!can_map || items[i].dim != v->map.dim_in ||
                    engine_get_item(m->e, collection, items[i].id, stored, content, &gerr) !=
                        AFF_OK)
                    continue;
                als_content_map_apply(&v->map, content, mapped + k * v->d);
                vec = mapped + k * v->d;
            }
            mirror[k] = items[i];
            mirror[k].vector = vec;
            mirror[k].dim = v->d;
            k++;
        }
        aff_err err;
        if (mirror && k && engine_upsert(m->e, v->info.space, mirror, k, &err) != AFF_OK)
            aff_log_kv(AFF_LOG_WARN, "behaviour space update failed", "collection", collection,
                       "error", err.msg, NULL);
        free(mirror);
        free(mapped);
        free(content);
        free(stored);
    }
    pthread_mutex_unlock(&c->mu);
    version_release(m, v);
}

void model_on_delete(aff_model *m, const char *collection, const char *const *ids, size_t n)
{
    if (!m) return;
    mcoll *c = coll_find(m, collection);
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    pthread_mutex_lock(&c->cur_mu);
    mversion *vs[2] = {c->cur, c->prev};
    pthread_mutex_unlock(&c->cur_mu);
    for (int i = 0; i < 2; i++) {
        if (!vs[i] || !vs[i]->space_built) continue;
        aff_err err;
        engine_delete(m->e, vs[i]->info.space, ids, n, NULL, &err);
    }
    pthread_mutex_unlock(&c->mu);
}

void model_on_drop(aff_model *m, const char *collection)
{
    if (!m) return;
    mcoll *c = coll_find(m, collection);
    if (!c) return;
    atomic_store(&c->cancel, true);
    pthread_mutex_lock(&c->mu);
    bool joinable = c->joinable;
    pthread_t th = c->thread;
    c->joinable = false;
    pthread_mutex_unlock(&c->mu);
    if (joinable) pthread_join(th, NULL);
    pthread_mutex_lock(&c->mu);
    pthread_mutex_lock(&c->cur_mu);
    mversion *cur = c->cur, *prev = c->prev;
    c->cur = c->prev = NULL;
    pthread_mutex_unlock(&c->cur_mu);
    c->params = m->cfg.defaults;
    c->failed = false;
    c->last_error[0] = '\0';
    c->job_id = 0;
    atomic_store(&c->events_since, 0);
    pthread_mutex_unlock(&c->mu);
    version_release(m, cur);
    version_release(m, prev);
}

/* ---- start-up and the scheduler ------------------------------------------------------------ */

int model_load_all(aff_model *m, aff_err *err)
{
    engine_collection_info *infos = NULL;
    size_t n = 0;
    int status = engine_list_collections(m->e, &infos, &n, err);
    if (status) return status;
    uint64_t max_id = 0;
    for (size_t i = 0; i < n && !status; i++) {
        void *blob = NULL;
        size_t len = 0;
        int g = store_get_model(m->s, infos[i].name, &blob, &len, err);
        if (g == AFF_ENOTFOUND) {
            aff__err_clear(err);
            continue;
        }
        if (g) {
            status = g;
            break;
        }
        als_params params;
        mversion *v = NULL;
        status = blob_decode(blob, len, &params, &v, err);
        free(blob);
        if (status) break;
        mcoll *c = coll_get(m, infos[i].name, err);
        if (!c) {
            version_free(v);
            status = err->code;
            break;
        }
        pthread_mutex_lock(&c->mu);
        c->params = params;
        if (v) {
            uint64_t id = v->info.id;
            if ((status = version_finish(m, v, err)) == AFF_OK) {
                map_fit(m, c->name, v);
                status = space_build(m, c, v, err);
            }
            if (status) {
                pthread_mutex_unlock(&c->mu);
                version_release(m, v);
                break;
            }
            v->info.id = id;
            if (id > max_id) max_id = id;
            c->last_trained_ms = v->info.trained_at_ms;
            install(m, c, v);
            char line[120];
            snprintf(line, sizeof line, "model %llu: %llu items, %u factors",
                     (unsigned long long)id, (unsigned long long)v->info.items, v->d);
            aff_log_kv(AFF_LOG_INFO, "model loaded", "collection", c->name, "model", line, NULL);
        }
        pthread_mutex_unlock(&c->mu);
    }
    free(infos);
    /* New versions get ids above every stored one. */
    uint64_t next = atomic_load(&m->next_version);
    if (next <= max_id) atomic_store(&m->next_version, max_id + 1);
    return status;
}

/* Replication: whether this replica should ask the log for a training of c now (c->mu
 * held): not yet asked for the current version, or asked long ago (the replica that kept the
 * record may have died). *version: the current version (0: none). */
static bool auto_train_due(aff_model *m, mcoll *c, int64_t now, uint64_t *version)
{
    mversion *v = version_acquire(c);
    *version = v ? v->info.id : 0;
    version_release(m, v);
    if (c->auto_asked && c->auto_version == *version && now - c->auto_ms < AUTO_TRAIN_RETRY_MS)
        return false;
    c->auto_asked = true;
    c->auto_version = *version;
    c->auto_ms = now;
    return true;
}

static void *scheduler_main(void *arg)
{
    aff_model *m = arg;
    pthread_mutex_lock(&m->stop_mu);
    while (!m->stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += SCHEDULER_TICK_S;
        pthread_cond_timedwait(&m->stop_cv, &m->stop_mu, &until);
        if (m->stop) break;
        pthread_mutex_unlock(&m->stop_mu);
        int64_t now = now_ms(m);
        pthread_mutex_lock(&m->mu);
        size_t n = m->n_colls;
        mcoll **colls = malloc((n ? n : 1) * sizeof *colls);
        if (colls && n) memcpy(colls, m->colls, n * sizeof *colls);
        pthread_mutex_unlock(&m->mu);
        for (size_t i = 0; colls && i < n; i++) {
            mcoll *c = colls[i];
            /* Read under c->mu: an install resets the count under it, so the count and the
             * version auto_train_due reads belong to one model. Read before the lock, a count
             * from before an install (which may hold c->mu a while) would ask for a training
             * of the model just installed: a second training for the same events. */
            pthread_mutex_lock(&c->mu);
            uint64_t since = atomic_load(&c->events_since);
            bool due = !c->running && since > 0 &&
                       ((m->cfg.train_after_events && since >= m->cfg.train_after_events) ||
                        (m->cfg.train_interval_s &&
                         now - c->last_trained_ms >= (int64_t)m->cfg.train_interval_s * 1000));
            aff_err err;
            uint64_t ask = 0;
            bool asking = due && m->cfg.request_train && auto_train_due(m, c, now, &ask);
            if (due && !m->cfg.request_train && job_start(m, c, NULL, &err) != AFF_OK)
                aff_log_kv(AFF_LOG_WARN, "cannot start training", "collection", c->name, "error",
                           err.msg, NULL);
            pthread_mutex_unlock(&c->mu);
            if (asking && m->cfg.request_train(m->cfg.publish_ctx, c->name, ask, &err) != AFF_OK) {
                aff_log_kv(AFF_LOG_WARN, "cannot ask for a training through the write log",
                           "collection", c->name, "error", err.msg, NULL);
                pthread_mutex_lock(&c->mu);
                c->auto_asked = false; /* ask again at the next tick */
                pthread_mutex_unlock(&c->mu);
            }
        }
        free(colls);
        pthread_mutex_lock(&m->stop_mu);
    }
    pthread_mutex_unlock(&m->stop_mu);
    return NULL;
}

int model_create(aff_model **out, aff_engine *e, aff_store *s, const model_config *cfg,
                 aff_err *err)
{
    *out = NULL;
    int status = als_params_check(&cfg->defaults, err);
    if (status) return status;
    if (!(cfg->half_life_s > 0)) return aff__fail(err, AFF_EINVAL, "half-life must be > 0");
    aff_model *m = calloc(1, sizeof *m);
    if (!m) return aff__fail(err, AFF_ENOMEM, "model: out of memory");
    m->e = e;
    m->s = s;
    m->cfg = *cfg;
    pthread_mutex_init(&m->mu, NULL);
    pthread_mutex_init(&m->stop_mu, NULL);
    pthread_cond_init(&m->stop_cv, NULL);
    atomic_init(&m->next_version, 1);
    atomic_init(&m->next_job, 1);
    if (cfg->train_interval_s || cfg->train_after_events) {
        if (pthread_create(&m->scheduler, NULL, scheduler_main, m)) {
            model_destroy(m);
            return aff__fail(err, AFF_ENOMEM, "model: cannot start the scheduler");
        }
        m->scheduler_running = true;
    }
    *out = m;
    return AFF_OK;
}

void model_set_replication(aff_model *m,
                           int (*publish)(void *ctx, const char *collection, const void *blob,
                                          size_t len, aff_err *err),
                           int (*request_train)(void *ctx, const char *collection,
                                                uint64_t version, aff_err *err),
                           void *ctx)
{
    m->cfg.publish = publish;
    m->cfg.publish_ctx = ctx;
    m->cfg.request_train = request_train;
}

void model_destroy(aff_model *m)
{
    if (!m) return;
    if (m->scheduler_running) {
        pthread_mutex_lock(&m->stop_mu);
        m->stop = true;
        pthread_cond_broadcast(&m->stop_cv);
        pthread_mutex_unlock(&m->stop_mu);
        pthread_join(m->scheduler, NULL);
    }
    for (size_t i = 0; i < m->n_colls; i++) {
        mcoll *c = m->colls[i];
        atomic_store(&c->cancel, true);
        if (c->joinable) pthread_join(c->thread, NULL);
        version_release(m, c->cur);
        version_release(m, c->prev);
        pthread_mutex_destroy(&c->mu);
        pthread_mutex_destroy(&c->cur_mu);
        free(c);
    }
    free(m->colls);
    pthread_mutex_destroy(&m->mu);
    pthread_mutex_destroy(&m->stop_mu);
    pthread_cond_destroy(&m->stop_cv);
    free(m);
}

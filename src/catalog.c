/*
 * catalog.c: owns the order of engine and store calls for catalog writes and the start-up
 * rebuild (see catalog.h). Rules kept: the engine validates before the store writes; a write
 * returns 0 only after the store committed; one mutex orders writes on both.
 */
#include "catalog.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "exposure.h"
#include "log.h"

struct aff_catalog {
    aff_engine *engine;
    aff_store *store;
    aff_model *model;         /* behaviour spaces mirrored after each write; NULL: none */
    aff_exposure *exposure;   /* first-upsert times fed after each write; NULL: none */
    aff_widgets *widgets;     /* widget statistics forgotten with a dropped collection */
    pthread_mutex_t write_mu; /* held across the engine call and the store commit */
};

void catalog_attach_model(aff_catalog *c, aff_model *m)
{
    pthread_mutex_lock(&c->write_mu);
    c->model = m;
    pthread_mutex_unlock(&c->write_mu);
}

void catalog_attach_exposure(aff_catalog *c, aff_exposure *x)
{
    pthread_mutex_lock(&c->write_mu);
    c->exposure = x;
    pthread_mutex_unlock(&c->write_mu);
}

void catalog_attach_widgets(aff_catalog *c, aff_widgets *w)
{
    pthread_mutex_lock(&c->write_mu);
    c->widgets = w;
    pthread_mutex_unlock(&c->write_mu);
}

int catalog_create(aff_catalog **out, aff_engine *e, aff_store *s, aff_err *err)
{
    *out = NULL;
    aff_catalog *c = calloc(1, sizeof *c);
    if (!c) return aff__fail(err, AFF_ENOMEM, "catalog: out of memory");
    c->engine = e;
    c->store = s;
    pthread_mutex_init(&c->write_mu, NULL);
    *out = c;
    return AFF_OK;
}

void catalog_destroy(aff_catalog *c)
{
    if (!c) return;
    pthread_mutex_destroy(&c->write_mu);
    free(c);
}

bool catalog_persistent(const aff_catalog *c)
{
    return store_persistent(c->store);
}

/* ---- rebuild ------------------------------------------------------------------------------ */

static int rebuild_collection(void *ctx, const store_collection *sc, aff_err *err)
{
    aff_catalog *c = ctx;
    engine_collection_spec spec = {.name = sc->name,
                                   .dim = sc->dim,
                                   .metric = sc->metric,
                                   .index = sc->index,
                                   .hnsw_m = sc->hnsw_m,
                                   .hnsw_ef_search = sc->hnsw_ef_search,
                                   .learned_only = sc->learned_only};
    return engine_create_collection(c->engine, &spec, err);
}

static int rebuild_items(void *ctx, const store_collection *sc, const aff_item *items, size_t n,
                         aff_err *err)
{
    aff_catalog *c = ctx;
    aff_item *batch = calloc(n ? n : 1, sizeof *batch);
    if (!batch) return aff__fail(err, AFF_ENOMEM, "out of memory rebuilding '%s'", sc->name);
    for (size_t i = 0; i < n; i++) {
        batch[i] = items[i];
        if (sc->learned_only) batch[i].vector = NULL, batch[i].dim = 0;
    }
    int rc = engine_upsert(c->engine, sc->name, batch, n, err);
    const char **ids = c->exposure && rc == AFF_OK ? calloc(n ? n : 1, sizeof *ids) : NULL;
    int64_t *first = ids ? calloc(n ? n : 1, sizeof *first) : NULL;
    if (c->exposure && rc == AFF_OK && !first)
        rc = aff__fail(err, AFF_ENOMEM, "out of memory rebuilding '%s'", sc->name);
    for (size_t i = 0; first && i < n; i++) {
        ids[i] = items[i].id;
        first[i] = items[i].first_upsert_ms ? items[i].first_upsert_ms : 1; /* unknown: old */
    }
    if (first)
        rc = exposure_note_upsert(c->exposure, sc->name, ids, first, n, exposure_now_ms(), err);
    free(ids);
    free(first);
    free(batch);
    return rc;
}

int catalog_rebuild(aff_catalog *c, store_rebuild_progress *out, aff_err *err)
{
    store_rebuild_ops ops = {
        .collection = rebuild_collection, .items = rebuild_items, .progress = NULL, .ctx = c};
    pthread_mutex_lock(&c->write_mu);
    int rc = store_rebuild(c->store, &ops, out, err);
    pthread_mutex_unlock(&c->write_mu);
    return rc;
}

/* ---- writes ------------------------------------------------------------------------------- */

int catalog_create_collection(aff_catalog *c, const engine_collection_spec *spec, aff_err *err)
{
    pthread_mutex_lock(&c->write_mu);
    int rc = engine_create_collection(c->engine, spec, err);
    if (rc) goto out;
    engine_collection_info ci;
    if ((rc = engine_describe_collection(c->engine, spec->name, &ci, err))) goto undo;
    /* The engine filled in defaults (HNSW parameters): store what it serves. */
    store_collection sc = {.dim = ci.dim,
                           .metric = ci.metric,
                           .index = ci.index,
                           .hnsw_m = ci.hnsw_m,
                           .hnsw_ef_search = ci.hnsw_ef_search,
                           .learned_only = ci.learned_only};
    memcpy(sc.name, ci.name, sizeof sc.name);
    if ((rc = store_put_collection(c->store, &sc, err))) goto undo;
    goto out;
undo:;
    aff_err drop_err;
    if (engine_drop_collection(c->engine, spec->name, &drop_err))
        aff_log_kv(AFF_LOG_ERROR, "cannot undo a collection the store refused", "collection",
                   spec->name, "error", drop_err.msg, NULL);
out:
    pthread_mutex_unlock(&c->write_mu);
    return rc;
}

int catalog_drop_collection(aff_catalog *c, const char *name, aff_err *err)
{
    uint32_t dim;
    pthread_mutex_lock(&c->write_mu);
    int rc = engine_collection_dim(c->engine, name, &dim, err);
    if (rc == AFF_OK && (rc = store_drop_collection(c->store, name, NULL, err)) == AFF_OK)
        rc = engine_drop_collection(c->engine, name, err);
    if (rc == AFF_OK) model_on_drop(c->model, name);
    if (rc == AFF_OK) exposure_drop(c->exposure, name);
    if (rc == AFF_OK && c->widgets) widgets_drop_collection(c->widgets, name);
    pthread_mutex_unlock(&c->write_mu);
    return rc;
}

int catalog_upsert(aff_catalog *c, const char *collection, const aff_item *items, size_t n,
                   aff_err *err)
{
    /* Learned-only collections store one 0 per item (the engine has validated that they came
     * without vectors before the store sees them). */
    static const float zero_vector[1] = {0.0f};
    const int64_t now = exposure_now_ms();
    aff_item *si = calloc(n ? n : 1, sizeof *si);
    if (!si) return aff__fail(err, AFF_ENOMEM, "out of memory writing %zu items", n);
    for (size_t i = 0; i < n; i++) {
        si[i] = items[i];
        if (!si[i].dim) si[i].vector = zero_vector, si[i].dim = 1;
        si[i].first_upsert_ms = now;
    }
    pthread_mutex_lock(&c->write_mu);
    int rc = engine_upsert(c->engine, collection, items, n, err);
    if (rc == AFF_OK && n) rc = store_put_items(c->store, collection, si, n, err);
    if (rc == AFF_OK && n) model_on_upsert(c->model, collection, items, n);
    if (rc == AFF_OK && c->exposure && n) {
        /* new ids get now; known ids keep their first upsert (as the store did) */
        const char **ids = calloc(n, sizeof *ids);
        aff_err xerr;
        for (size_t i = 0; ids && i < n; i++)
            ids[i] = items[i].id;
        if (!ids || exposure_note_upsert(c->exposure, collection, ids, NULL, n, now, &xerr))
            aff_log_kv(AFF_LOG_WARN, "item ages not noted: out of memory", "collection", collection,
                       NULL);
        free(ids);
    }
    pthread_mutex_unlock(&c->write_mu);
    free(si);
    return rc;
}

int catalog_link_vector(aff_catalog *c, const char *linked_collection, const char *const *ids,
                        size_t n, uint32_t dim, const char *field, float *out, aff_err *err)
{
    uint32_t ldim;
    int rc = engine_collection_dim(c->engine, linked_collection, &ldim, err);
    if (rc) return rc;
    if (ldim != dim)
        return aff__fail(err, AFF_EINVAL,
                         "%s: linked_collection \"%s\" has dimension %u, the item needs %u", field,
                         linked_collection, ldim, dim);
    if (n < 1 || n > 1000)
        return aff__fail(err, AFF_EINVAL, "%s: %zu linked_ids; an item links 1..1000", field, n);
    engine_item_class *cls = calloc(n, sizeof *cls);
    float *vec = calloc(n * dim, sizeof *vec);
    if (!cls || !vec) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory linking %zu items", n);
        goto out;
    }
    if ((rc = engine_classify_items(c->engine, linked_collection, ids, n, NULL, 0, cls, vec, err)))
        goto out;
    memset(out, 0, dim * sizeof *out);
    size_t found = 0;
    for (size_t i = 0; i < n; i++) {
        if (!cls[i].found) continue;
        found++;
        for (uint32_t d = 0; d < dim; d++)
            out[d] += vec[i * dim + d];
    }
    if (!found) {
        rc = aff__fail(err, AFF_EINVAL, "%s: none of its %zu linked_ids is in \"%s\"", field, n,
                       linked_collection);
        goto out;
    }
    for (uint32_t d = 0; d < dim; d++)
        out[d] /= (float)found;
out:
    free(cls);
    free(vec);
    return rc;
}

int catalog_delete(aff_catalog *c, const char *collection, const char *const *ids, size_t n,
                   size_t *n_deleted, aff_err *err)
{
    if (n_deleted) *n_deleted = 0;
    /* The engine's id rule, checked before the store commits so that the engine cannot
     * refuse the delete afterwards. */
    for (size_t i = 0; i < n; i++) {
        size_t len = ids[i] ? strnlen(ids[i], AFF_MAX_ID_LEN + 1) : 0;
        if (len == 0 || len > AFF_MAX_ID_LEN)
            return aff__fail(err, AFF_EINVAL, "id %zu is %s; ids are 1..%d bytes", i,
                             len ? "too long" : "empty", AFF_MAX_ID_LEN);
    }
    uint32_t dim;
    pthread_mutex_lock(&c->write_mu);
    int rc = engine_collection_dim(c->engine, collection, &dim, err);
    if (rc == AFF_OK && n &&
        (rc = store_delete_items(c->store, collection, ids, n, NULL, err)) == 0)
        rc = engine_delete(c->engine, collection, ids, n, n_deleted, err);
    if (rc == AFF_OK) model_on_delete(c->model, collection, ids, n);
    if (rc == AFF_OK) exposure_forget(c->exposure, collection, ids, n);
    pthread_mutex_unlock(&c->write_mu);
    return rc;
}

/*
 * catalog.h: durable catalog writes (collections and items) on the engine and the store
 * together, and the start-up rebuild of the engine from the store.
 *
 * The engine validates and serves, the store makes a write durable; a write is reported as
 * done only after its LMDB transaction committed, so nothing unacknowledged is promised
 * (docs/storage.md, "Wiring into the server"):
 *   create: engine, then store; on a store error the engine's collection is dropped again;
 *   drop:   store (items, profiles, events, popularity), then engine;
 *   upsert: engine (full validation), then store, one transaction per call;
 *   delete: store, then engine (ids are checked first, so the engine cannot refuse after
 *           the store committed).
 * When the store fails after the engine accepted an upsert (disk full, I/O error), the
 * caller gets the error and the engine keeps the new items until the next restart, when the
 * store's state wins; a retry makes both agree.
 *
 * Threading: every function may be called from any thread. Catalog writes are serialized by
 * one mutex held across the engine call and the store commit, so the engine and the store
 * apply concurrent writes in the same order. They block on fsync: call them from transport
 * threads, never from the batcher's. Reads go to the engine directly.
 */
#ifndef AFFINITY_CATALOG_H
#define AFFINITY_CATALOG_H

#include <stdbool.h>
#include <stddef.h>

#include "engine.h"
#include "model.h"
#include "status.h"
#include "store.h"
#include "widgets.h"

typedef struct aff_catalog aff_catalog;

/* Borrows e and s; both must outlive the catalog. */
int catalog_create(aff_catalog **out, aff_engine *e, aff_store *s, aff_err *err);
/* NULL is a no-op. */
void catalog_destroy(aff_catalog *c);
/* From now on every committed write is mirrored into m's behaviour spaces, under the catalog's
 * write lock (model_on_upsert/_delete/_drop). Call once at start-up; m outlives the catalog. */
void catalog_attach_model(aff_catalog *c, aff_model *m);
/* From now on (and in catalog_rebuild) items' first-upsert times go to x, and deletes and
 * drops make it forget them. Call once at start-up, before the rebuild; x outlives c. */
struct aff_exposure;
void catalog_attach_exposure(aff_catalog *c, struct aff_exposure *x);

/* From now on a dropped collection's widget statistics are forgotten with it. Call once at
 * start-up; w outlives the catalog. */
void catalog_attach_widgets(aff_catalog *c, aff_widgets *w);

/* Loads every collection and item of the store into the engine (which must hold none of
 * them). The store logs progress every 5 s and a final line with counts and seconds; *out
 * (may be NULL) receives the counts. Run it before any write is accepted. */
int catalog_rebuild(aff_catalog *c, store_rebuild_progress *out, aff_err *err);

/* False in in-memory mode. */
bool catalog_persistent(const aff_catalog *c);

int catalog_create_collection(aff_catalog *c, const engine_collection_spec *spec, aff_err *err);
/* AFF_ENOTFOUND when there is no such collection. */
int catalog_drop_collection(aff_catalog *c, const char *name, aff_err *err);
/* Upserts n ≥ 1 items into both, one durable transaction. */
int catalog_upsert(aff_catalog *c, const char *collection, const aff_item *items, size_t n,
                   aff_err *err);
/* A linked item's vector (a banner or offer linked to products or categories, given without
 * a vector of its own): the mean of the linked items' vectors in linked_collection (as
 * stored: unit length in cosine collections), dim floats into out. AFF_ENOTFOUND for an
 * unknown collection; AFF_EINVAL when the dimensions differ or none of the ids exists
 * (field names the item, e.g. "items[3]"). Reads only; the caller upserts the result. */
int catalog_link_vector(aff_catalog *c, const char *linked_collection, const char *const *ids,
                        size_t n, uint32_t dim, const char *field, float *out, aff_err *err);
/* Deletes the ids that exist from both; *n_deleted (may be NULL) counts them. */
int catalog_delete(aff_catalog *c, const char *collection, const char *const *ids, size_t n,
                   size_t *n_deleted, aff_err *err);

#endif

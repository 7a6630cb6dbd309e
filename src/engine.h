/*
 * engine.h: collections of items with vectors and attributes, and the searches over them.
 *
 * The engine owns the id <-> row mapping, validation, filter compilation and the choice of
 * backend; the backend owns the vectors and the scoring. Every function validates its input
 * completely before changing anything: a call that fails changes nothing.
 *
 * Threading: every function may be called from any thread. Each collection has a read/write
 * lock (writer-preferring): searches, scores and reads share it, upserts and deletes take it
 * exclusively, so a search sees a write either wholly or not at all. Collections are
 * reference-counted: a drop waits for nothing; searches already running on it finish.
 */
#ifndef AFFINITY_ENGINE_H
#define AFFINITY_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "item.h"
#include "scratch.h"
#include "status.h"

typedef struct aff_engine aff_engine;

typedef enum engine_backend_choice {
    ENGINE_BACKEND_AUTO = 0, /* GPU when one is usable, else FAISS */
    ENGINE_BACKEND_GPU = 1,  /* GPU or fail */
    ENGINE_BACKEND_CPU = 2,  /* FAISS */
    ENGINE_BACKEND_NOOP = 3, /* no scoring at all: the transport-ceiling benchmark baseline */
} engine_backend_choice;

typedef struct engine_config {
    engine_backend_choice backend;
    backend_faiss_config faiss;
    backend_gpu_config gpu;
} engine_config;

/* Creates an engine and its backend. On AUTO the reason the GPU was not chosen is logged. */
int engine_create(aff_engine **out, const engine_config *cfg, aff_err *err);
void engine_destroy(aff_engine *e);
/* The backend in use: name, device, memory. */
void engine_backend_info(aff_engine *e, backend_info *out);
/* The backend's iALS training device (backend_ops.trainer): false when it has none (the CPU
 * backend, a GPU build without a device, or after a device fault). */
bool engine_trainer(aff_engine *e, als_device *out);

/* ---- collections ---------------------------------------------------------------------- */

/* Names of internal collections (the behaviour spaces of model.h) start with this character,
 * which client names cannot contain; engine_list_collections leaves them out. */
#define ENGINE_INTERNAL_PREFIX '#'

typedef struct engine_collection_spec {
    const char *name; /* [A-Za-z0-9_.-], 1..AFF_MAX_NAME_LEN bytes; internal: '#' + that */
    bool internal;    /* an internal collection (name starts with ENGINE_INTERNAL_PREFIX) */
    /* No content space: items come without vectors (aff_item.dim 0) and rank only in the
     * collection's learned behaviour space (model.h). dim must be 1: the backend keeps a zero
     * row per item for attributes and filters. */
    bool learned_only;
    uint32_t dim;     /* 1..AFF_MAX_DIM */
    aff_metric metric;
    backend_index_kind index; /* FLAT (default) or HNSW */
    uint32_t hnsw_m;          /* 0 = 32 */
    uint32_t hnsw_ef_search;  /* 0 = 64 */

    backend_precision precision; /* CPU backend, flat index: AUTO = --cpu-precision */
} engine_collection_spec;

typedef struct engine_collection_info {
    char name[AFF_MAX_NAME_LEN + 1];
    uint32_t dim;
    aff_metric metric;
    backend_index_kind index;
    uint32_t hnsw_m, hnsw_ef_search;
    uint64_t n_items;
    uint64_t memory_bytes; /* backend table plus the engine's id and attribute maps */
    char backend[32];
    bool learned_only;
} engine_collection_info;

int engine_create_collection(aff_engine *e, const engine_collection_spec *spec, aff_err *err);
int engine_drop_collection(aff_engine *e, const char *name, aff_err *err);
int engine_describe_collection(aff_engine *e, const char *name, engine_collection_info *out,
                               aff_err *err);
/* *out is a malloc'ed array of *n entries sorted by name; the caller frees it. */
int engine_list_collections(aff_engine *e, engine_collection_info **out, size_t *n, aff_err *err);

/* Whether the collection has a content space (false: learned-only). */
int engine_collection_has_content(aff_engine *e, const char *name, bool *has_content,
                                  aff_err *err);

/* Name, dim and metric of a collection, for validation before batching. */
int engine_collection_dim(aff_engine *e, const char *name, uint32_t *dim, aff_err *err);
/* Dimension and metric of a collection. */
int engine_collection_shape(aff_engine *e, const char *name, uint32_t *dim, aff_metric *metric,
                            aff_err *err);

/* ---- items ---------------------------------------------------------------------------- */

/* The item types (aff_item, item_attrs, item_record) and their one check are in item.h. */

/* Inserts or replaces n items (a later duplicate id in the same call wins). All items are
 * validated before any is applied. */
int engine_upsert(aff_engine *e, const char *collection, const aff_item *items, size_t n,
                  aff_err *err);
/* Deletes the ids that exist; unknown ids are skipped. *n_deleted (may be NULL) counts the
 * ids that existed. Deleted ids are invisible to every search that starts after the call. */
int engine_delete(aff_engine *e, const char *collection, const char *const *ids, size_t n,
                  size_t *n_deleted, aff_err *err);

/* Copies item `id` into *out and, when vector is not NULL, its dim floats into vector
 * (normalized for cosine collections). AFF_ENOTFOUND when the id is unknown. */
int engine_get_item(aff_engine *e, const char *collection, const char *id, item_record *out,
                    float *vector, aff_err *err);

/* Visits every item of the collection, in row order, with its attributes and its stored
 * vector (dim floats, normalized for cosine; NULL in a learned-only collection). Both are
 * borrowed for the call. The scan holds the collection's read lock throughout, so it sees one
 * consistent catalog and writers to this collection wait until it ends: fn must not write to
 * this collection (reads, and writes to other collections, are fine). fn returns 0 to go on or
 * a negative aff_status (with err filled) to stop the scan with it. */
typedef int (*engine_item_visit_fn)(void *ctx, const item_record *item, const float *vector,
                                    aff_err *err);
int engine_scan_items(aff_engine *e, const char *collection, engine_item_visit_fn fn, void *ctx,
                      aff_err *err);

/* ---- search --------------------------------------------------------------------------- */

typedef struct aff_filter {
    const char *const *categories; /* any-of; n_categories == 0: any category */
    uint32_t n_categories;
    const char *const *tags; /* any-of; n_tags == 0: any tags */
    uint32_t n_tags;
    float price_min; /* inclusive; -INFINITY when open */
    float price_max; /* inclusive; INFINITY when open */
    bool available_only;
    const char *const *exclude_ids; /* any length; unknown ids are ignored */
    uint32_t n_exclude_ids;
    const char *const *exclude_categories; /* none-of: the item's category is none of these */
    uint32_t n_exclude_categories;
    const char *const *exclude_tags; /* none-of: the item has none of these tags */
    uint32_t n_exclude_tags;
} aff_filter;

/* An aff_filter that matches everything. */
void aff_filter_init(aff_filter *f);

typedef struct aff_query {
    const float *vector;      /* dim floats; NULL to search by item_id */
    uint32_t dim;             /* floats in vector; must equal the collection's dimension */
    const char *item_id;      /* with vector NULL: that item's vector, the item excluded */
    uint32_t k;               /* 1..AFF_MAX_K */
    const aff_filter *filter; /* NULL: no filter */
    /* 0, or at most this many hits per category (items without one are never capped):
     * backend_search.max_per_category. Honoured where the backend can (the CPU backend's
     * int8/bf16 tables); elsewhere the hits are the uncapped top-k, so a caller that needs
     * the cap applies it again (the ranking pipeline does). */
    uint32_t max_per_category;
} aff_query;

typedef struct aff_hit {
    float score; /* ip/cosine: higher first; l2: squared distance, lower first */
    char id[AFF_MAX_ID_LEN + 1];
} aff_hit;

/* Checks one query against a collection without running it (dimension, finiteness, k,
 * filter shape, item id). The transport calls it before queueing so bad requests fail fast. */
int engine_validate_query(aff_engine *e, const char *collection, const aff_query *q, aff_err *err);

/* Runs nq queries on one collection as one backend batch. Query i's hits go to
 * hits[off(i)..] with off(i) = k[0] + ... + k[i-1], best first, and their number to
 * n_hits[i]; its outcome to query_errs[i]. Returns AFF_OK when every query succeeded, else
 * the code of the first failure (a failed query leaves the others intact). Ties in score
 * are broken by row (insertion order unless deletes moved rows), so results are
 * deterministic for a given state.
 * scratch: the calling worker's arena (scratch.h), borrowed; the call resets it and takes
 * every temporary array of the engine and the backend from it, so a warmed-up worker searches
 * without heap allocations. NULL: a temporary arena for this call only (tests, tools). */
int engine_search(aff_engine *e, aff_scratch *scratch, const char *collection,
                  const aff_query *queries, size_t nq, aff_hit *hits, uint32_t *n_hits,
                  aff_err *query_errs);

/* pass[i] = item ids[i] exists and passes filter (NULL: exists). One evaluator for every
 * caller that ranks items itself (e.g. popularity), with the same semantics as search. */
int engine_filter_items(aff_engine *e, const char *collection, const char *const *ids, size_t n,
                        const aff_filter *filter, bool *pass, aff_err *err);

/* What engine_classify_items reports per id. */
typedef struct engine_item_class {
    bool found;        /* false: the id is not in the collection (the rest is zero) */
    uint32_t category; /* the collection's interned category id; 0 = none. Equal ids, equal
                          categories; valid for comparisons within one call only */
    uint64_t matches;  /* bit j set: the item passes filters[j] */
} engine_item_class;

/* Classifies n ids of a collection under one read lock, for callers that rank candidates
 * themselves (the pipeline's rules, caps and diversity): out[i] as above for up to 64
 * filters (each with the semantics of search, NULL entries match every item), and, when
 * vectors is not NULL, each found item's dim floats at vectors + i * dim (normalized for
 * cosine collections; zeros for ids not found). AFF_EINVAL for a malformed filter or more
 * than 64 filters. */
int engine_classify_items(aff_engine *e, const char *collection, const char *const *ids, size_t n,
                          const aff_filter *const *filters, uint32_t n_filters,
                          engine_item_class *out, float *vectors, aff_err *err);

/* ---- re-ranking ------------------------------------------------------------------------ */

typedef struct aff_rerank_query {
    const float *vector;      /* the user: dim floats */
    uint32_t dim;             /* floats in vector; must equal the collection's dimension */
    const char *const *ids;   /* candidates, 1..AFF_MAX_RERANK_CANDIDATES */
    const float *base_scores; /* the caller's scores (e.g. from a search engine); NULL = 0 */
    uint32_t n;
    float weight; /* blended = (1 - weight) * base + weight * affinity, 0..1 */
} aff_rerank_query;

typedef struct aff_rerank_hit {
    uint32_t index; /* position in the caller's candidate list */
    bool found;     /* false: id not in the collection; ranked after all found ids */
    float affinity; /* user-item score (0 when not found); l2: negated squared distance */
    float base;
    float blended;
} aff_rerank_hit;

/* Re-ranks nq candidate lists. Query i's n_i results go to out[off(i)..] with
 * off(i) = n_0 + ... + n_{i-1}, by blended score descending, ties in candidate order.
 * Per-query outcomes, the return value and scratch work as in engine_search. */
int engine_rerank(aff_engine *e, aff_scratch *scratch, const char *collection,
                  const aff_rerank_query *queries, size_t nq, aff_rerank_hit *out,
                  aff_err *query_errs);

#endif

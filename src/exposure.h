/*
 * exposure.h: what exploration knows about each item: when it was first upserted (its age)
 * and how often the server has shown it lately (a decayed count of the responses that
 * returned it). Kept in memory per collection; first-upsert times come from the store (each
 * item's value records its first upsert) through the catalog, served counts from the
 * pipeline. Client-reported impressions are a different signal and do not feed it.
 *
 * Served count: each time a response returns the item, count = count * 2^(-dt / half_life)
 * + 1, dt the time since the last update; read at time T it is decayed to T the same way.
 *
 * Threading: every function may be called from any thread (one mutex).
 */
#ifndef AFFINITY_EXPOSURE_H
#define AFFINITY_EXPOSURE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct aff_exposure aff_exposure;

#define EXPOSURE_DEFAULT_HALF_LIFE_S (24.0 * 3600.0)
#define EXPOSURE_RECENT              256 /* newest first-upserted ids kept per collection */

/* The wall clock in ms since the epoch: the time base of every *_ms here. */
int64_t exposure_now_ms(void);

/* half_life_s > 0 (EXPOSURE_DEFAULT_HALF_LIFE_S: a day). */
int exposure_create(aff_exposure **out, double half_life_s, aff_err *err);
void exposure_destroy(aff_exposure *x); /* NULL is a no-op */

/* Items were upserted: an id seen for the first time gets first_ms[i] (or now_ms when
 * first_ms is NULL or first_ms[i] is 0: a record from before first-upsert times were kept
 * counts as old, so callers pass 1 for "long ago"); an id already known keeps its time. */
int exposure_note_upsert(aff_exposure *x, const char *collection, const char *const *ids,
                         const int64_t *first_ms, size_t n, int64_t now_ms, aff_err *err);
/* Items were deleted, or the collection dropped: forgotten. */
void exposure_forget(aff_exposure *x, const char *collection, const char *const *ids, size_t n);
void exposure_drop(aff_exposure *x, const char *collection);

/* A response returned these items at now_ms. Unknown ids are ignored. */
void exposure_note_served(aff_exposure *x, const char *collection, const char *const *ids, size_t n,
                          int64_t now_ms);

typedef struct exposure_info {
    int64_t first_ms; /* first upsert (ms since the epoch); 0: unknown id */
    float served;     /* decayed served count at now_ms */
} exposure_info;

void exposure_lookup(aff_exposure *x, const char *collection, const char *const *ids, size_t n,
                     int64_t now_ms, exposure_info *out);

/* Up to max ids of the collection first upserted at or after since_ms, newest first, from
 * the last EXPOSURE_RECENT first upserts (ids still present). Copies into ids_out. */
size_t exposure_newest(aff_exposure *x, const char *collection, int64_t since_ms,
                       char (*ids_out)[AFF_MAX_ID_LEN + 1], size_t max);

#endif

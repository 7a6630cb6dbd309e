/*
 * exposure.c: first-upsert times and decayed served counts per item (see exposure.h).
 * Rules kept here: one entry per (collection, id) while the id exists; a known id's first
 * upsert time never changes; served counts only decay between updates.
 */
#include "exposure.h"

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "strmap.h"

typedef struct item_x {
    int64_t first_ms;
    int64_t served_ms; /* when served was last brought up to date */
    float served;
} item_x;

typedef struct coll_x {
    char name[AFF_MAX_NAME_LEN + 1];
    strmap *ids;       /* id -> index into items */
    item_x *items;     /* n entries */
    const char **keys; /* the map's copy of each entry's id */
    size_t n, cap;
    /* a ring of the last EXPOSURE_RECENT first upserts */
    char (*recent)[AFF_MAX_ID_LEN + 1];
    int64_t recent_ms[EXPOSURE_RECENT];
    size_t recent_seen;
} coll_x;

struct aff_exposure {
    pthread_mutex_t mu;
    double half_life_s;
    coll_x **colls;
    size_t n, cap;
};

int64_t exposure_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int exposure_create(aff_exposure **out, double half_life_s, aff_err *err)
{
    *out = NULL;
    if (!(half_life_s > 0) || !isfinite(half_life_s))
        return aff__fail(err, AFF_EINVAL, "the served-count half-life must be > 0 seconds");
    aff_exposure *x = calloc(1, sizeof *x);
    if (!x) return aff__fail(err, AFF_ENOMEM, "out of memory for item exposure");
    pthread_mutex_init(&x->mu, NULL);
    x->half_life_s = half_life_s;
    *out = x;
    return AFF_OK;
}

static void coll_free(coll_x *c)
{
    if (!c) return;
    strmap_destroy(c->ids);
    free(c->items);
    free(c->keys);
    free(c->recent);
    free(c);
}

void exposure_destroy(aff_exposure *x)
{
    if (!x) return;
    for (size_t i = 0; i < x->n; i++)
        coll_free(x->colls[i]);
    free(x->colls);
    pthread_mutex_destroy(&x->mu);
    free(x);
}

/* The collection's entry (created when create is true), or NULL. Caller holds mu. */
static coll_x *coll_of(aff_exposure *x, const char *name, bool create)
{
    for (size_t i = 0; i < x->n; i++)
        if (strcmp(x->colls[i]->name, name) == 0) return x->colls[i];
    if (!create || strlen(name) > AFF_MAX_NAME_LEN) return NULL;
    if (x->n == x->cap) {
        size_t cap = x->cap ? 2 * x->cap : 8;
        coll_x **a = realloc(x->colls, cap * sizeof *a);
        if (!a) return NULL;
        x->colls = a;
        x->cap = cap;
    }
    coll_x *c = calloc(1, sizeof *c);
    if (!c || strmap_create(&c->ids, 1024) ||
        !(c->recent = calloc(EXPOSURE_RECENT, sizeof *c->recent))) {
        coll_free(c);
        return NULL;
    }
    memcpy(c->name, name, strlen(name) + 1);
    x->colls[x->n++] = c;
    return c;
}

/* The served count of e decayed to now_ms. */
static float decayed(const aff_exposure *x, const item_x *e, int64_t now_ms)
{
    if (e->served <= 0.0f || now_ms <= e->served_ms) return e->served;
    double dt = (double)(now_ms - e->served_ms) / 1000.0;
    return (float)(e->served * exp2(-dt / x->half_life_s));
}

int exposure_note_upsert(aff_exposure *x, const char *collection, const char *const *ids,
                         const int64_t *first_ms, size_t n, int64_t now_ms, aff_err *err)
{
    if (!x || !n) return AFF_OK;
    int rc = AFF_OK;
    pthread_mutex_lock(&x->mu);
    coll_x *c = coll_of(x, collection, true);
    if (!c) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory for item exposure");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t idx;
        if (strmap_get(c->ids, ids[i], &idx)) continue;
        if (c->n == c->cap) {
            size_t cap = c->cap ? 2 * c->cap : 1024;
            item_x *items = realloc(c->items, cap * sizeof *items);
            if (items) c->items = items;
            const char **keys = items ? realloc(c->keys, cap * sizeof *keys) : NULL;
            if (!keys) {
                rc = aff__fail(err, AFF_ENOMEM, "out of memory for item exposure");
                goto out;
            }
            c->keys = keys;
            c->cap = cap;
        }
        int64_t t = first_ms && first_ms[i] ? first_ms[i] : now_ms;
        if (strmap_put(c->ids, ids[i], (uint32_t)c->n, &c->keys[c->n])) {
            rc = aff__fail(err, AFF_ENOMEM, "out of memory for item exposure");
            goto out;
        }
        c->items[c->n++] = (item_x){.first_ms = t, .served_ms = t};
        size_t slot = c->recent_seen++ % EXPOSURE_RECENT;
        snprintf(c->recent[slot], sizeof c->recent[slot], "%s", ids[i]);
        c->recent_ms[slot] = t;
    }
out:
    pthread_mutex_unlock(&x->mu);
    return rc;
}

void exposure_forget(aff_exposure *x, const char *collection, const char *const *ids, size_t n)
{
    if (!x) return;
    pthread_mutex_lock(&x->mu);
    coll_x *c = coll_of(x, collection, false);
    for (size_t i = 0; c && i < n; i++) {
        uint32_t idx;
        if (!strmap_get(c->ids, ids[i], &idx)) continue;
        strmap_remove(c->ids, ids[i]);
        size_t last = --c->n;
        if (idx != last) { /* the last entry fills the hole */
            c->items[idx] = c->items[last];
            c->keys[idx] = c->keys[last];
            strmap_set(c->ids, c->keys[idx], idx);
        }
    }
    pthread_mutex_unlock(&x->mu);
}

void exposure_drop(aff_exposure *x, const char *collection)
{
    if (!x) return;
    pthread_mutex_lock(&x->mu);
    for (size_t i = 0; i < x->n; i++) {
        if (strcmp(x->colls[i]->name, collection) != 0) continue;
        coll_free(x->colls[i]);
        x->colls[i] = x->colls[--x->n];
        break;
    }
    pthread_mutex_unlock(&x->mu);
}

void exposure_note_served(aff_exposure *x, const char *collection, const char *const *ids, size_t n,
                          int64_t now_ms)
{
    if (!x || !n) return;
    pthread_mutex_lock(&x->mu);
    coll_x *c = coll_of(x, collection, false);
    for (size_t i = 0; c && i < n; i++) {
        uint32_t idx;
        if (!strmap_get(c->ids, ids[i], &idx)) continue;
        item_x *e = &c->items[idx];
        e->served = decayed(x, e, now_ms) + 1.0f;
        if (now_ms > e->served_ms) e->served_ms = now_ms;
    }
    pthread_mutex_unlock(&x->mu);
}

void exposure_lookup(aff_exposure *x, const char *collection, const char *const *ids, size_t n,
                     int64_t now_ms, exposure_info *out)
{
    memset(out, 0, n * sizeof *out);
    if (!x) return;
    pthread_mutex_lock(&x->mu);
    coll_x *c = coll_of(x, collection, false);
    for (size_t i = 0; c && i < n; i++) {
        uint32_t idx;
        if (!strmap_get(c->ids, ids[i], &idx)) continue;
        out[i] = (exposure_info){.first_ms = c->items[idx].first_ms,
                                 .served = decayed(x, &c->items[idx], now_ms)};
    }
    pthread_mutex_unlock(&x->mu);
}

size_t exposure_newest(aff_exposure *x, const char *collection, int64_t since_ms,
                       char (*ids_out)[AFF_MAX_ID_LEN + 1], size_t max)
{
    if (!x) return 0;
    size_t m = 0;
    pthread_mutex_lock(&x->mu);
    coll_x *c = coll_of(x, collection, false);
    size_t have = c ? (c->recent_seen < EXPOSURE_RECENT ? c->recent_seen : EXPOSURE_RECENT) : 0;
    for (size_t back = 1; back <= have && m < max; back++) {
        size_t slot = (c->recent_seen - back) % EXPOSURE_RECENT;
        uint32_t idx;
        /* still present, and the same item (not deleted and upserted again later) */
        if (c->recent_ms[slot] < since_ms || !strmap_get(c->ids, c->recent[slot], &idx) ||
            c->items[idx].first_ms != c->recent_ms[slot])
            continue;
        memcpy(ids_out[m++], c->recent[slot], sizeof c->recent[slot]);
    }
    pthread_mutex_unlock(&x->mu);
    return m;
}

/*
 * outcomes.c: recommendation records, attribution and outcome counts (see outcomes.h).
 *
 * Records: OUTCOMES_SHARDS shards chosen by the id's low bits, each a chained hash table plus
 * a list from oldest to newest; a record past the window or beyond the shard's share of
 * max_records is unlinked from the oldest end when the shard is next written, and a lookup
 * ignores an expired record. A record is one allocation: header, item hashes, then one byte
 * of counted-outcome flags per item.
 *
 * Series: an array indexed through a strmap of the joined labels; each owns a ring of
 * OUTCOMES_BUCKETS one-minute buckets tagged with their minute, so a slot from an older day
 * reads as empty and is reset when written. Lock order: a shard's mutex, then counts_mu.
 */
#include "outcomes.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "event_types.h"
#include "strmap.h"

#define OUTCOMES_SHARDS 16
#define SEP             "\x1f"
#define UNATTRIBUTED    OUTCOMES_UNATTRIBUTED
#define OVERFLOW        "(overflow)"

typedef struct bucket {
    uint32_t minute; /* minutes since the epoch this slot counts; 0: never written */
    uint32_t responses;
    uint32_t n[OUTCOMES_KINDS];
    double revenue;
} bucket;

typedef struct series {
    char collection[AFF_MAX_NAME_LEN + 1];
    char surface[OUTCOMES_MAX_LABEL + 1];
    char strategy[OUTCOMES_MAX_LABEL + 1];
    char experiment[OUTCOMES_MAX_LABEL + 1];
    char arm[OUTCOMES_MAX_LABEL + 1];
    bool unattributed;
    outcomes_counts total;
    bucket *ring;
} series;

typedef struct rec {
    uint64_t hi, lo;
    struct rec *chain;         /* next in the hash bucket */
    struct rec *older, *newer; /* age list */
    int64_t created_ms;
    uint64_t collection_hash;
    uint32_t series;
    uint32_t n;
    uint64_t items[]; /* n hashes, then n flag bytes */
} rec;

typedef struct shard {
    pthread_mutex_t mu;
    rec **table;
    size_t mask;
    rec *oldest, *newest;
    size_t count, cap, bytes;
} shard;

struct aff_outcomes {
    outcomes_config cfg;
    int64_t window_ms;
    shard shards[OUTCOMES_SHARDS];
    pthread_mutex_t counts_mu;
    strmap *index;
    series *series;
    uint32_t n_series;
};

static int64_t clock_ms(void *ctx)
{
    (void)ctx;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t now_ms(const aff_outcomes *o)
{
    return o->cfg.now_ms(o->cfg.now_ctx);
}

/* The names are the event types' (event_types.h): one definition. */
static const char *const event_names[AFF_EVENT_VALUE_LIMIT] = {
#define OUTCOMES__EVENT_NAME(name, value, str, weight) [value] = str,
    AFF_EVENT_TYPES(OUTCOMES__EVENT_NAME)
#undef OUTCOMES__EVENT_NAME
#define OUTCOMES__MEVENT_NAME(name, value, str) [value] = str,
        AFF_EVENT_MEASUREMENT_TYPES(OUTCOMES__MEVENT_NAME)
#undef OUTCOMES__MEVENT_NAME
};
static const int kind_events[OUTCOMES_KINDS] = {AFF_EVENT_IMPRESSION, 2 /* click */,
                                                3 /* add_to_cart */, 4 /* purchase */};

const char *outcomes_kind_name(outcomes_kind kind)
{
    return kind < OUTCOMES_KINDS ? event_names[kind_events[kind]] : NULL;
}

int outcomes_create(aff_outcomes **out, const outcomes_config *cfg, aff_err *err)
{
    *out = NULL;
    aff_outcomes *o = calloc(1, sizeof *o);
    if (!o) return aff__fail(err, AFF_ENOMEM, "outcomes: out of memory");
    o->cfg = *cfg;
    if (!o->cfg.now_ms) o->cfg.now_ms = clock_ms;
    if (!o->cfg.max_records) o->cfg.max_records = 1;
    o->window_ms = (int64_t)cfg->window_s * 1000;
    pthread_mutex_init(&o->counts_mu, NULL);
    size_t per = (o->cfg.max_records + OUTCOMES_SHARDS - 1) / OUTCOMES_SHARDS;
    size_t slots = 64;
    while (slots < per && slots < ((size_t)1 << 24))
        slots <<= 1;
    for (int i = 0; i < OUTCOMES_SHARDS; i++) {
        shard *s = &o->shards[i];
        pthread_mutex_init(&s->mu, NULL);
        s->cap = per;
        s->mask = slots - 1;
        s->table = calloc(slots, sizeof *s->table);
        if (!s->table) goto nomem;
    }
    o->series = calloc(OUTCOMES_MAX_SERIES, sizeof *o->series);
    if (!o->series || strmap_create(&o->index, 64)) goto nomem;
    *out = o;
    return AFF_OK;
nomem:
    outcomes_destroy(o);
    return aff__fail(err, AFF_ENOMEM, "outcomes: out of memory for %u records", cfg->max_records);
}

void outcomes_destroy(aff_outcomes *o)
{
    if (!o) return;
    for (int i = 0; i < OUTCOMES_SHARDS; i++) {
        shard *s = &o->shards[i];
        for (rec *r = s->oldest, *next; r; r = next) {
            next = r->newer;
            free(r);
        }
        free(s->table);
        pthread_mutex_destroy(&s->mu);
    }
    if (o->series)
        for (uint32_t i = 0; i < o->n_series; i++)
            free(o->series[i].ring);
    free(o->series);
    strmap_destroy(o->index);
    pthread_mutex_destroy(&o->counts_mu);
    free(o);
}

/* ---- series -------------------------------------------------------------------------------- */

static void copy_label(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

/* The series of labels, made when missing (counts_mu held). UINT32_MAX when out of memory. */
static uint32_t series_of(aff_outcomes *o, const outcomes_labels *l, bool unattributed)
{
    char key[AFF_MAX_NAME_LEN + 4 * OUTCOMES_MAX_LABEL + 16];
    const char *strategy = l->strategy && l->strategy[0] ? l->strategy : OUTCOMES_DEFAULT_STRAT;
    if (unattributed) strategy = UNATTRIBUTED;
    snprintf(key, sizeof key, "%.64s" SEP "%.64s" SEP "%.64s" SEP "%.64s" SEP "%.64s",
             l->collection ? l->collection : "", l->surface ? l->surface : "", strategy,
             l->experiment ? l->experiment : "", l->arm ? l->arm : "");
    uint32_t idx;
    if (strmap_get(o->index, key, &idx)) return idx;
    outcomes_labels over = {.collection = OVERFLOW, .surface = "", .strategy = OVERFLOW};
    if (o->n_series >= OUTCOMES_MAX_SERIES - 1 &&
        !(l->collection && !strcmp(l->collection, OVERFLOW)))
        return series_of(o, &over, false);
    series *s = &o->series[o->n_series];
    memset(s, 0, sizeof *s);
    if (!(s->ring = calloc(OUTCOMES_BUCKETS, sizeof *s->ring))) return UINT32_MAX;
    if (strmap_put(o->index, key, o->n_series, NULL)) {
        free(s->ring);
        s->ring = NULL;
        return UINT32_MAX;
    }
    copy_label(s->collection, sizeof s->collection, l->collection);
    copy_label(s->surface, sizeof s->surface, l->surface);
    copy_label(s->strategy, sizeof s->strategy, strategy);
    copy_label(s->experiment, sizeof s->experiment, l->experiment);
    copy_label(s->arm, sizeof s->arm, l->arm);
    s->unattributed = unattributed;
    return o->n_series++;
}

static bucket *bucket_now(series *s, int64_t t_ms)
{
    uint32_t minute = (uint32_t)(t_ms / OUTCOMES_BUCKET_MS);
    bucket *b = &s->ring[minute % OUTCOMES_BUCKETS];
    if (b->minute != minute) {
        memset(b, 0, sizeof *b);
        b->minute = minute;
    }
    return b;
}

/* Adds to series idx (counts_mu held). */
static void count(aff_outcomes *o, uint32_t idx, int64_t t, uint32_t responses,
                  const bool kinds[OUTCOMES_KINDS], double revenue)
{
    if (idx == UINT32_MAX) return;
    series *s = &o->series[idx];
    bucket *b = bucket_now(s, t);
    b->responses += responses;
    s->total.responses += responses;
    for (int k = 0; k < OUTCOMES_KINDS; k++)
        if (kinds && kinds[k]) {
            b->n[k]++;
            s->total.n[k]++;
        }
    b->revenue += revenue;
    s->total.revenue += revenue;
}

/* ---- records ------------------------------------------------------------------------------- */

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool parse_id(const char *id, uint64_t *hi, uint64_t *lo)
{
    if (!id) return false;
    uint64_t v[2] = {0, 0};
    for (int i = 0; i < OUTCOMES_ID_LEN; i++) {
        int h = hexval(id[i]);
        if (h < 0) return false;
        v[i / 16] = v[i / 16] << 4 | (uint64_t)h;
    }
    if (id[OUTCOMES_ID_LEN]) return false;
    *hi = v[0];
    *lo = v[1];
    return true;
}

static uint64_t id_hash(const char *s)
{
    return strmap_hash(s, strlen(s));
}

static size_t rec_size(uint32_t n)
{
    return sizeof(rec) + (size_t)n * (sizeof(uint64_t) + 1);
}

static rec **slot_of(shard *s, uint64_t lo)
{
    return &s->table[(lo >> 4) & s->mask];
}

/* Unlinks and frees the oldest record of s (mu held). */
static void drop_oldest(shard *s)
{
    rec *r = s->oldest;
    rec **pp = slot_of(s, r->lo);
    while (*pp != r)
        pp = &(*pp)->chain;
    *pp = r->chain;
    s->oldest = r->newer;
    if (s->oldest)
        s->oldest->older = NULL;
    else
        s->newest = NULL;
    s->count--;
    s->bytes -= rec_size(r->n);
    free(r);
}

int outcomes_record(aff_outcomes *o, const char *id, const outcomes_labels *labels,
                    const char *const *items, uint32_t n, aff_err *err)
{
    uint64_t hi, lo;
    if (!parse_id(id, &hi, &lo))
        return aff__fail(err, AFF_EINVAL, "recommendation id must be %d hex digits",
                         OUTCOMES_ID_LEN);
    int64_t t = now_ms(o);
    pthread_mutex_lock(&o->counts_mu);
    uint32_t idx = series_of(o, labels, false);
    count(o, idx, t, 1, NULL, 0.0);
    pthread_mutex_unlock(&o->counts_mu);
    if (idx == UINT32_MAX) return aff__fail(err, AFF_ENOMEM, "outcomes: out of memory");

    if (n > OUTCOMES_MAX_ITEMS) n = OUTCOMES_MAX_ITEMS;
    rec *r = malloc(rec_size(n));
    if (!r) return aff__fail(err, AFF_ENOMEM, "outcomes: out of memory recording");
    *r = (rec){.hi = hi,
               .lo = lo,
               .created_ms = t,
               .series = idx,
               .n = n,
               .collection_hash = id_hash(labels->collection ? labels->collection : "")};
    for (uint32_t i = 0; i < n; i++)
        r->items[i] = id_hash(items[i]);
    memset((uint8_t *)(r->items + n), 0, n);

    shard *s = &o->shards[lo % OUTCOMES_SHARDS];
    pthread_mutex_lock(&s->mu);
    while (s->oldest && (s->count >= s->cap || t - s->oldest->created_ms > o->window_ms))
        drop_oldest(s);
    rec **pp = slot_of(s, lo);
    r->chain = *pp;
    *pp = r;
    r->older = s->newest;
    if (s->newest)
        s->newest->newer = r;
    else
        s->oldest = r;
    s->newest = r;
    s->count++;
    s->bytes += rec_size(n);
    pthread_mutex_unlock(&s->mu);
    return AFF_OK;
}

static void count_unattributed(aff_outcomes *o, const char *collection, outcomes_kind kind,
                               int64_t t)
{
    bool kinds[OUTCOMES_KINDS] = {false};
    kinds[kind] = true;
    outcomes_labels l = {.collection = collection};
    pthread_mutex_lock(&o->counts_mu);
    count(o, series_of(o, &l, true), t, 0, kinds, 0.0);
    pthread_mutex_unlock(&o->counts_mu);
}

void outcomes_attribute(aff_outcomes *o, const char *collection, const char *recommendation_id,
                        const char *item_id, outcomes_kind kind, double value,
                        outcomes_attribution *out)
{
    outcomes_attribution local;
    if (!out) out = &local;
    memset(out, 0, sizeof *out);
    if (kind >= OUTCOMES_KINDS) return;
    int64_t t = now_ms(o);
    uint64_t hi, lo;
    if (!parse_id(recommendation_id, &hi, &lo)) {
        count_unattributed(o, collection, kind, t);
        return;
    }
    uint64_t item = id_hash(item_id), coll = id_hash(collection);
    shard *s = &o->shards[lo % OUTCOMES_SHARDS];
    pthread_mutex_lock(&s->mu);
    rec *r = *slot_of(s, lo);
    /* a page across collections keeps one record per collection under its one id */
    while (r && (r->hi != hi || r->lo != lo || r->collection_hash != coll))
        r = r->chain;
    uint32_t i = 0;
    if (r && t - r->created_ms > o->window_ms) r = NULL;
    if (r)
        while (i < r->n && r->items[i] != item)
            i++;
    if (!r || i == r->n) {
        pthread_mutex_unlock(&s->mu);
        count_unattributed(o, collection, kind, t);
        return;
    }
    uint8_t *flags = (uint8_t *)(r->items + r->n) + i;
    out->attributed = true;
    if (*flags & (1u << kind)) out->duplicate = true;
    out->counted[kind] = !out->duplicate;
    if (kind != OUTCOMES_IMPRESSION && !(*flags & 1u)) out->counted[OUTCOMES_IMPRESSION] = true;
    for (int k = 0; k < OUTCOMES_KINDS; k++)
        if (out->counted[k]) *flags |= (uint8_t)(1u << k);
    uint32_t idx = r->series;
    pthread_mutex_lock(&o->counts_mu);
    const series *se = &o->series[idx];
    memcpy(out->experiment, se->experiment, sizeof out->experiment);
    memcpy(out->arm, se->arm, sizeof out->arm);
    count(o, idx, t, 0, out->counted,
          kind == OUTCOMES_PURCHASE && out->counted[kind] && isfinite(value) ? value : 0.0);
    pthread_mutex_unlock(&o->counts_mu);
    pthread_mutex_unlock(&s->mu);
}

/* ---- reading ------------------------------------------------------------------------------- */

static bool label_ok(const char *want, const char *have)
{
    return !want || !want[0] || strcmp(want, have) == 0;
}

static void add_bucket(outcomes_counts *c, const bucket *b)
{
    c->responses += b->responses;
    for (int k = 0; k < OUTCOMES_KINDS; k++)
        c->n[k] += b->n[k];
    c->revenue += b->revenue;
}

static int cmp_row(const void *a, const void *b)
{
    const outcomes_row *x = a, *y = b;
    int c;
    if ((c = strcmp(x->collection, y->collection))) return c;
    if ((c = strcmp(x->surface, y->surface))) return c;
    if ((c = strcmp(x->experiment, y->experiment))) return c;
    if ((c = strcmp(x->arm, y->arm))) return c;
    return strcmp(x->strategy, y->strategy);
}

int outcomes_query_run(aff_outcomes *o, const outcomes_query *q, outcomes_result *out, aff_err *err)
{
    memset(out, 0, sizeof *out);
    int64_t now = now_ms(o);
    int64_t to = q->to_ms ? q->to_ms : now;
    int64_t oldest = (now / OUTCOMES_BUCKET_MS - (OUTCOMES_BUCKETS - 1)) * OUTCOMES_BUCKET_MS;
    int64_t from = q->from_ms ? q->from_ms : oldest;
    if (q->from_ms < 0 || q->to_ms < 0 || from > to)
        return aff__fail(err, AFF_EINVAL, "from_ms = %lld must be >= 0 and <= to_ms = %lld",
                         (long long)from, (long long)to);
    if (q->step_ms % OUTCOMES_BUCKET_MS || q->step_ms > OUTCOMES_MAX_STEP_MS)
        return aff__fail(err, AFF_EINVAL, "step_s = %u must be a multiple of %d up to %d",
                         q->step_ms / 1000, OUTCOMES_BUCKET_MS / 1000, OUTCOMES_MAX_STEP_MS / 1000);
    if (from < oldest) from = oldest;
    if (to > now) to = now;
    if (from > to) from = to;
    int64_t from_min = from / OUTCOMES_BUCKET_MS, to_min = to / OUTCOMES_BUCKET_MS;
    uint32_t step_min = q->step_ms / OUTCOMES_BUCKET_MS;
    uint32_t n_points = step_min ? (uint32_t)((to_min - from_min) / step_min + 1) : 0;
    out->from_ms = from_min * OUTCOMES_BUCKET_MS;
    out->to_ms = to;

    int rc = AFF_OK;
    pthread_mutex_lock(&o->counts_mu);
    out->rows = calloc(o->n_series ? o->n_series : 1, sizeof *out->rows);
    if (!out->rows) {
        rc = aff__fail(err, AFF_ENOMEM, "outcomes: out of memory");
        goto unlock;
    }
    for (uint32_t i = 0; i < o->n_series; i++) {
        const series *s = &o->series[i];
        if (!label_ok(q->collection, s->collection)) continue;
        if (!s->unattributed &&
            (!label_ok(q->surface, s->surface) || !label_ok(q->experiment, s->experiment)))
            continue;
        outcomes_row *row = &out->rows[out->n_rows];
        memset(row, 0, sizeof *row);
        if (n_points && !s->unattributed) {
            row->points = calloc(n_points, sizeof *row->points);
            if (!row->points) {
                rc = aff__fail(err, AFF_ENOMEM, "outcomes: out of memory");
                goto unlock;
            }
            row->n_points = n_points;
            for (uint32_t p = 0; p < n_points; p++)
                row->points[p].start_ms = (from_min + (int64_t)p * step_min) * OUTCOMES_BUCKET_MS;
        }
        for (int64_t m = from_min; m <= to_min; m++) {
            const bucket *b = &s->ring[m % OUTCOMES_BUCKETS];
            if (b->minute != (uint32_t)m) continue;
            if (s->unattributed) {
                for (int k = 0; k < OUTCOMES_KINDS; k++)
                    out->unattributed[k] += b->n[k];
                continue;
            }
            add_bucket(&row->c, b);
            if (row->points) add_bucket(&row->points[(m - from_min) / step_min].c, b);
        }
        bool any = row->c.responses || row->c.revenue != 0.0;
        for (int k = 0; k < OUTCOMES_KINDS; k++)
            any = any || row->c.n[k];
        if (s->unattributed || !any) {
            free(row->points);
            continue;
        }
        memcpy(row->collection, s->collection, sizeof row->collection);
        memcpy(row->surface, s->surface, sizeof row->surface);
        memcpy(row->strategy, s->strategy, sizeof row->strategy);
        memcpy(row->experiment, s->experiment, sizeof row->experiment);
        memcpy(row->arm, s->arm, sizeof row->arm);
        out->n_rows++;
    }
unlock:
    pthread_mutex_unlock(&o->counts_mu);
    if (rc) {
        outcomes_result_free(out);
        return rc;
    }
    qsort(out->rows, out->n_rows, sizeof *out->rows, cmp_row);
    return AFF_OK;
}

void outcomes_result_free(outcomes_result *r)
{
    if (!r || !r->rows) return;
    for (size_t i = 0; i < r->n_rows; i++)
        free(r->rows[i].points);
    free(r->rows);
    r->rows = NULL;
    r->n_rows = 0;
}

void outcomes_foreach_total(aff_outcomes *o, outcomes_total_fn fn, void *ctx)
{
    pthread_mutex_lock(&o->counts_mu);
    for (uint32_t i = 0; i < o->n_series; i++) {
        const series *s = &o->series[i];
        outcomes_labels l = {.collection = s->collection,
                             .surface = s->surface,
                             .strategy = s->strategy,
                             .experiment = s->experiment,
                             .arm = s->arm};
        fn(ctx, &l, &s->total);
    }
    pthread_mutex_unlock(&o->counts_mu);
}

void outcomes_usage(aff_outcomes *o, size_t *records, size_t *bytes)
{
    size_t n = 0, b = 0;
    for (int i = 0; i < OUTCOMES_SHARDS; i++) {
        shard *s = &o->shards[i];
        pthread_mutex_lock(&s->mu);
        n += s->count;
        b += s->bytes + (s->mask + 1) * sizeof(rec *);
        pthread_mutex_unlock(&s->mu);
    }
    pthread_mutex_lock(&o->counts_mu);
    b += (size_t)o->n_series * OUTCOMES_BUCKETS * sizeof(bucket) + strmap_memory(o->index) +
         OUTCOMES_MAX_SERIES * sizeof(series);
    pthread_mutex_unlock(&o->counts_mu);
    if (records) *records = n;
    if (bytes) *bytes = b;
}

bool outcomes_label_ok(const char *s)
{
    size_t n = strnlen(s, OUTCOMES_MAX_LABEL + 1);
    if (n < 1 || n > OUTCOMES_MAX_LABEL) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == ':' || c == '-'))
            return false;
    }
    return true;
}

void outcomes_wilson(uint64_t successes, uint64_t n, double *low, double *high)
{
    if (n == 0) {
        *low = *high = 0.0;
        return;
    }
    const double z = 1.959963984540054;
    double p = (double)successes / (double)n, nn = (double)n;
    double denom = 1.0 + z * z / nn;
    double centre = (p + z * z / (2.0 * nn)) / denom;
    double half = z * sqrt(p * (1.0 - p) / nn + z * z / (4.0 * nn * nn)) / denom;
    *low = centre - half < 0.0 ? 0.0 : centre - half;
    *high = centre + half > 1.0 ? 1.0 : centre + half;
}

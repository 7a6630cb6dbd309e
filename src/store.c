/*
 * store.c: owns the LMDB environment, its named databases and every on-disk encoding.
 *
 * Files: <dir>/data.mdb and <dir>/lock.mdb (LMDB), <dir>/affinity.lock (flock: one process
 * per data dir). Named databases and their keys; "lp(s)" is one length byte then the bytes
 * (every name and id is at most 255 bytes), which keeps composite keys unambiguous: the key
 * of (c, u) is never a prefix of the key of another (c, u').
 *
 *   meta          "format"                               -> u32 format version (1)
 *   collections   name (raw bytes)                       -> collection v1
 *   items         lp(collection) lp(item)                -> item v1
 *   profiles      lp(collection) lp(user)                -> profile v1
 *   events        lp(collection) lp(user) be64(seq)      -> event v1
 *   interactions  lp(collection) lp(user) lp(item)       -> interaction v1
 *   by_type       lp(collection) lp(user) lp(type) lp(item) -> by_type v1
 *   popularity    lp(collection) lp(item)                -> popularity v1
 *   pop_rank      lp(collection) be64(ord(-rank_log_score)) lp(item) -> empty (written before
 *                 the slack: a copy of the popularity value, ignored)
 *   models        lp(collection)                         -> an opaque blob (model.c's encoding,
 *                                                            versioned by its first byte)
 *                 lp(collection) be64(upload) be32(index) -> raw bytes: a piece of a model
 *                                                            on its way through the write log
 *                                                            (replication), until its commit
 *   opt_out       lp(collection or "*") lp(user)          -> opt_out v1 (issue 12)
 *   experiments   lp(experiment id)                      -> an opaque blob (experiments.c's
 *                                                            encoding; measurement)
 *
 * Values start with a version byte (1 today); readers reject other versions as corrupt
 * (AFF_EINTERNAL). Integers and floats are in host byte order (little-endian on every
 * platform we build for): a store is not portable across byte orders. Layouts (bytes):
 *
 *   collection   u8 ver, u8 metric, u8 index, u8 flags (bit 0: learned-only), u32 dim, u32 hnsw_m, u32 hnsw_ef,
 *                u64 generation                                               (24 bytes)
 *   item         u8 ver, u8 available, u16 n_tags, f32 price, u32 dim, f32 vector[dim],
 *                u16 len + category, n_tags x (u16 len + tag), i64 first_upsert_ms
 *                (values written before it existed end with the tags: read as 0)
 *   profile      u8 ver, u8 n_counts, u16 0, u32 dim, u64 generation, i64 ref_ms,
 *                i64 last_event_ms, u64 next_seq, u32 n_history, u32 0, f64 weight,
 *                f32 sum[dim], n_counts x (u8 len + type name, u64 count)
 *   event        u8 ver, u8 type_len, u16 item_len, u16 n_context, u16 0, i64 ts_ms,
 *                f64 value, type, item, n_context x (u16 len + key, u16 len + value)
 *   interaction  u8 ver, 7 x u8 0, i64 ref_ms, f64 weight, i64 last_ms, u64 count (40 bytes)
 *   by_type      u8 ver, 7 x u8 0, i64 last_ms                                 (16 bytes)
 *   popularity   u8 ver, 7 x u8 0, f64 log_score, u64 count, i64 last_ms,
 *                f64 rank_log_score                                          (40 bytes)
 *                (32-byte values, written before the slack, are filed at log_score)
 *   opt_out      u8 ver, 7 x u8 0, i64 since_ms                                (16 bytes)
 *
 * ord(x) maps a double to a u64 whose unsigned order is the numeric order, so a forward scan
 * of pop_rank within a collection yields counters best first.
 *
 * Map growth: every transaction holds resize_lock shared; a writer that gets MDB_MAP_FULL
 * aborts, takes the lock exclusively, doubles the map (unless another thread already grew
 * it) and runs its callback again. The lock prefers writers so a stream of readers cannot
 * starve growth, which is why callbacks must not open a second transaction.
 */
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

#define STORE_FORMAT           1
#define STORE_VALUE_VERSION    1
#define STORE_DEFAULT_MAP_SIZE (256ull << 20)
#define STORE_MIN_MAP_SIZE     (1ull << 20)
#define STORE_DEFAULT_READERS  1024
#define STORE_KEY_MAX          511
#define STORE_REBUILD_BATCH    4096
#define STORE_GROUP_MAX        64 /* writes committed together at most */
#define STORE_BATCH_MAX        8  /* store_update calls in one apply batch's transaction */
#define STORE_BATCH_HEADROOM   (256ull << 20) /* free map bytes ensured before a batch opens */

enum {
    DB_META,
    DB_COLLECTIONS,
    DB_ITEMS,
    DB_PROFILES,
    DB_EVENTS,
    DB_INTERACTIONS,
    DB_BY_TYPE,
    DB_POPULARITY,
    DB_POP_RANK,
    DB_MODELS,
    DB_OPT_OUT, /* issue 12: personalization opt-outs */
    DB_EXPERIMENTS, /* measurement: A/B experiments and their bandit state */
    DB_COUNT
};

static const char *const db_names[DB_COUNT] = {
    "meta",    "collections", "items",    "profiles", "events",  "interactions",
    "by_type", "popularity",  "pop_rank", "models",   "opt_out", "experiments",
};

/* One store_update call waiting in the group-commit queue (on its caller's stack). */
typedef struct write_req {
    store_txn_fn fn;
    void *ctx;
    int status;
    bool done; /* set by the leader under gc_mu; the caller may return after that */
    uint64_t log_sequence; /* the write log record this write applies (0: none) */
    aff_err err;
    struct write_req *next;
} write_req;

struct aff_store {
    MDB_env *env;
    MDB_dbi dbi[DB_COUNT];
    pthread_rwlock_t resize_lock;
    bool resize_lock_ready;
    bool persistent;
    bool no_sync; /* commits skip fsync (store_config.no_sync) */
    int lock_fd;
    _Atomic uint64_t commits;
    _Atomic uint64_t writes;
    _Atomic uint64_t grows;
    atomic_bool batch_failed; /* an apply batch could not be committed: writes refused */
    /* Group commit: writers queue here; one leader at a time runs the queue. */
    pthread_mutex_t gc_mu;
    pthread_cond_t gc_cv;
    write_req *gc_head, *gc_tail;
    bool gc_busy;
};

struct store_txn {
    aff_store *s;
    MDB_txn *txn;
    int mdb_rc; /* the first LMDB failure inside the callback; 0 when none */
    bool wrote; /* a put or delete was made (apply batches: a failure after one poisons) */
    bool rw;    /* a write transaction (rmw cursors may be opened) */
    /* Per database, a cursor that db_get_rmw left on the key it read, so that the write of
     * the same key that follows (a read-modify-write of a counter) overwrites the value in
     * place instead of searching the tree again. Write transactions only; LMDB closes them
     * when the transaction ends, and whoever ends it drops them with the store_txn. */
    MDB_cursor *rmw[DB_COUNT];
    /* The collection record this transaction read last (store_txn_get_collection runs once
     * per event read); any write of a collection record in the transaction drops it. */
    bool coll_valid;
    store_collection coll;
};

/* ---- errors ---------------------------------------------------------------------------- */

/* Records an LMDB failure: MAP_FULL (retried by store_update) and TXN_FULL map to AFF_EFULL,
 * everything else (EIO, ENOSPC, corruption) to AFF_EIO with LMDB's message. */
static int mdb_fail(store_txn *t, aff_err *err, int rc, const char *what)
{
    if (t && !t->mdb_rc) t->mdb_rc = rc;
    int code = AFF_EIO;
    if (rc == MDB_MAP_FULL || rc == MDB_TXN_FULL) code = AFF_EFULL;
    return aff__fail(err, code, "store: %s: %s", what, mdb_strerror(rc));
}

static int corrupt(aff_err *err, const char *what)
{
    return aff__fail(err, AFF_EINTERNAL, "store: corrupt %s record", what);
}

/* ---- keys ------------------------------------------------------------------------------ */

typedef struct key_buf {
    uint8_t b[STORE_KEY_MAX];
    size_t n;
} key_buf;

static bool kb_str(key_buf *k, const char *s, size_t max)
{
    size_t len = s ? strlen(s) : 0;
    if (len > max || len > 255 || k->n + 1 + len > sizeof k->b) return false;
    k->b[k->n++] = (uint8_t)len;
    memcpy(k->b + k->n, s, len);
    k->n += len;
    return true;
}

static void kb_u64be(key_buf *k, uint64_t v)
{
    for (int i = 7; i >= 0; i--)
        k->b[k->n++] = (uint8_t)(v >> (i * 8));
}

static MDB_val kb_val(const key_buf *k)
{
    return (MDB_val){.mv_size = k->n, .mv_data = (void *)k->b};
}

static bool has_prefix(const MDB_val *k, const key_buf *prefix)
{
    return k->mv_size >= prefix->n && memcmp(k->mv_data, prefix->b, prefix->n) == 0;
}

/* Builds lp(collection) [lp(a) [lp(b) [lp(c)]]]; false when a part is too long. */
static bool make_key(key_buf *k, const char *collection, const char *a, size_t amax, const char *b,
                     size_t bmax, const char *c, size_t cmax)
{
    k->n = 0;
    if (!collection || !*collection || !kb_str(k, collection, AFF_MAX_NAME_LEN)) return false;
    if (a && (!*a || !kb_str(k, a, amax))) return false;
    if (b && (!*b || !kb_str(k, b, bmax))) return false;
    if (c && (!*c || !kb_str(k, c, cmax))) return false;
    return true;
}

static int bad_key(aff_err *err)
{
    return aff__fail(err, AFF_EINVAL,
                     "store: empty or too long name or id (collection ≤ %d, ids ≤ %d, event "
                     "types ≤ %d bytes)",
                     AFF_MAX_NAME_LEN, AFF_MAX_ID_LEN, STORE_MAX_TYPE_LEN);
}

static uint64_t ord_double(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return (u >> 63) ? ~u : (u | (1ull << 63));
}

/* ---- value encoding -------------------------------------------------------------------- */

typedef struct wr {
    uint8_t *p;
} wr;

static void w_bytes(wr *w, const void *src, size_t n)
{
    if (n) memcpy(w->p, src, n);
    w->p += n;
}
static void w_u8(wr *w, uint8_t v)
{
    *w->p++ = v;
}
static void w_u16(wr *w, uint16_t v)
{
    w_bytes(w, &v, sizeof v);
}
static void w_u32(wr *w, uint32_t v)
{
    w_bytes(w, &v, sizeof v);
}
static void w_u64(wr *w, uint64_t v)
{
    w_bytes(w, &v, sizeof v);
}
static void w_i64(wr *w, int64_t v)
{
    w_bytes(w, &v, sizeof v);
}
static void w_f32(wr *w, float v)
{
    w_bytes(w, &v, sizeof v);
}
static void w_f64(wr *w, double v)
{
    w_bytes(w, &v, sizeof v);
}
static void w_zero(wr *w, size_t n)
{
    memset(w->p, 0, n);
    w->p += n;
}

typedef struct rd {
    const uint8_t *p, *end;
    bool bad;
} rd;

static rd rd_of(const MDB_val *v)
{
    return (rd){.p = v->mv_data, .end = (const uint8_t *)v->mv_data + v->mv_size};
}
static const uint8_t *r_take(rd *r, size_t n)
{
    if (r->bad || (size_t)(r->end - r->p) < n) {
        r->bad = true;
        return NULL;
    }
    const uint8_t *p = r->p;
    r->p += n;
    return p;
}
static void r_copy(rd *r, void *dst, size_t n)
{
    const uint8_t *p = r_take(r, n);
    if (p)
        memcpy(dst, p, n);
    else
        memset(dst, 0, n);
}
static uint8_t r_u8(rd *r)
{
    uint8_t v;
    r_copy(r, &v, sizeof v);
    return v;
}
static uint16_t r_u16(rd *r)
{
    uint16_t v;
    r_copy(r, &v, sizeof v);
    return v;
}
static uint32_t r_u32(rd *r)
{
    uint32_t v;
    r_copy(r, &v, sizeof v);
    return v;
}
static uint64_t r_u64(rd *r)
{
    uint64_t v;
    r_copy(r, &v, sizeof v);
    return v;
}
static int64_t r_i64(rd *r)
{
    int64_t v;
    r_copy(r, &v, sizeof v);
    return v;
}
static float r_f32(rd *r)
{
    float v;
    r_copy(r, &v, sizeof v);
    return v;
}
static double r_f64(rd *r)
{
    double v;
    r_copy(r, &v, sizeof v);
    return v;
}
/* Copies a u16-length string into dst (cap bytes with the NUL). */
static void r_str16(rd *r, char *dst, size_t cap)
{
    uint16_t len = r_u16(r);
    const uint8_t *p = r_take(r, len);
    if (!p || len >= cap) {
        r->bad = true;
        dst[0] = '\0';
        return;
    }
    memcpy(dst, p, len);
    dst[len] = '\0';
}
static bool r_version(rd *r)
{
    return r_u8(r) == STORE_VALUE_VERSION && !r->bad;
}

#define COLLECTION_SIZE 24

static void encode_collection(uint8_t *dst, const store_collection *c)
{
    wr w = {dst};
    w_u8(&w, STORE_VALUE_VERSION);
    w_u8(&w, (uint8_t)c->metric);
    w_u8(&w, (uint8_t)c->index);
    w_u8(&w, c->learned_only ? 1 : 0);
    w_u32(&w, c->dim);
    w_u32(&w, c->hnsw_m);
    w_u32(&w, c->hnsw_ef_search);
    w_u64(&w, c->generation);
}

static int decode_collection(const MDB_val *k, const MDB_val *v, store_collection *c, aff_err *err)
{
    rd r = rd_of(v);
    memset(c, 0, sizeof *c);
    if (!r_version(&r) || k->mv_size > AFF_MAX_NAME_LEN) return corrupt(err, "collection");
    memcpy(c->name, k->mv_data, k->mv_size);
    c->name[k->mv_size] = '\0';
    c->metric = (aff_metric)r_u8(&r);
    c->index = (backend_index_kind)r_u8(&r);
    c->learned_only = (r_u8(&r) & 1) != 0;
    c->dim = r_u32(&r);
    c->hnsw_m = r_u32(&r);
    c->hnsw_ef_search = r_u32(&r);
    c->generation = r_u64(&r);
    if (r.bad || c->dim == 0 || c->dim > AFF_MAX_DIM) return corrupt(err, "collection");
    return AFF_OK;
}

static size_t item_size(const aff_item *it)
{
    const item_attrs *a = &it->attrs;
    size_t n = 12 + (size_t)it->dim * 4 + 2 + (a->category ? strlen(a->category) : 0);
    for (uint32_t i = 0; i < a->n_tags; i++)
        n += 2 + strlen(a->tags[i]);
    return n + 8; /* the first upsert time */
}

/* The trailer after the tags: the first upsert time (values written before it existed end
 * with the tags; they decode as 0). */
static void encode_item(uint8_t *dst, const aff_item *it, int64_t first_ms)
{
    const item_attrs *a = &it->attrs;
    wr w = {dst};
    w_u8(&w, STORE_VALUE_VERSION);
    w_u8(&w, a->available ? 1 : 0);
    w_u16(&w, (uint16_t)a->n_tags);
    w_f32(&w, a->price);
    w_u32(&w, it->dim);
    w_bytes(&w, it->vector, (size_t)it->dim * 4);
    size_t clen = a->category ? strlen(a->category) : 0;
    w_u16(&w, (uint16_t)clen);
    w_bytes(&w, a->category, clen);
    for (uint32_t i = 0; i < a->n_tags; i++) {
        size_t tlen = strlen(a->tags[i]);
        w_u16(&w, (uint16_t)tlen);
        w_bytes(&w, a->tags[i], tlen);
    }
    w_u64(&w, (uint64_t)first_ms);
}

/* Decodes an item value; out and vector may be NULL. The id comes from the caller. */
static int decode_item(const MDB_val *v, uint32_t dim, item_record *out, float *vector,
                       aff_err *err)
{
    rd r = rd_of(v);
    if (!r_version(&r)) return corrupt(err, "item");
    bool available = r_u8(&r) != 0;
    uint16_t n_tags = r_u16(&r);
    float price = r_f32(&r);
    uint32_t vdim = r_u32(&r);
    if (r.bad || vdim != dim || n_tags > AFF_MAX_TAGS_PER_ITEM) return corrupt(err, "item");
    const uint8_t *vec = r_take(&r, (size_t)dim * 4);
    if (vec && vector) memcpy(vector, vec, (size_t)dim * 4);
    if (out) {
        out->available = available;
        out->price = price;
        out->n_tags = n_tags;
        r_str16(&r, out->category, sizeof out->category);
        for (uint32_t i = 0; i < n_tags; i++)
            r_str16(&r, out->tags[i], sizeof out->tags[i]);
        out->first_upsert_ms = r.end - r.p >= 8 ? (int64_t)r_u64(&r) : 0;
    }
    return r.bad ? corrupt(err, "item") : AFF_OK;
}

static size_t profile_size(const store_profile *p)
{
    size_t n = 64 + (size_t)p->dim * 4;
    for (uint32_t i = 0; i < p->n_counts; i++)
        n += 1 + strlen(p->counts[i].type) + 8;
    return n;
}

static void encode_profile(uint8_t *dst, const store_profile *p, const float *sum)
{
    wr w = {dst};
    w_u8(&w, STORE_VALUE_VERSION);
    w_u8(&w, (uint8_t)p->n_counts);
    w_u16(&w, 0);
    w_u32(&w, p->dim);
    w_u64(&w, p->generation);
    w_i64(&w, p->ref_ms);
    w_i64(&w, p->last_event_ms);
    w_u64(&w, p->next_seq);
    w_u32(&w, p->n_history);
    w_u32(&w, 0);
    w_f64(&w, p->weight);
    w_bytes(&w, sum, (size_t)p->dim * 4);
    for (uint32_t i = 0; i < p->n_counts; i++) {
        size_t len = strlen(p->counts[i].type);
        w_u8(&w, (uint8_t)len);
        w_bytes(&w, p->counts[i].type, len);
        w_u64(&w, p->counts[i].count);
    }
}

static int decode_profile(const MDB_val *v, store_profile *p, float *sum, aff_err *err)
{
    rd r = rd_of(v);
    memset(p, 0, sizeof *p);
    if (!r_version(&r)) return corrupt(err, "profile");
    p->n_counts = r_u8(&r);
    r_u16(&r);
    p->dim = r_u32(&r);
    p->generation = r_u64(&r);
    p->ref_ms = r_i64(&r);
    p->last_event_ms = r_i64(&r);
    p->next_seq = r_u64(&r);
    p->n_history = r_u32(&r);
    r_u32(&r);
    p->weight = r_f64(&r);
    if (r.bad || p->n_counts > STORE_MAX_EVENT_TYPES || p->dim == 0 || p->dim > AFF_MAX_DIM)
        return corrupt(err, "profile");
    const uint8_t *s = r_take(&r, (size_t)p->dim * 4);
    if (s && sum) memcpy(sum, s, (size_t)p->dim * 4);
    for (uint32_t i = 0; i < p->n_counts && !r.bad; i++) {
        uint8_t len = r_u8(&r);
        const uint8_t *name = r_take(&r, len);
        if (!name || len > STORE_MAX_TYPE_LEN) {
            r.bad = true;
            break;
        }
        memcpy(p->counts[i].type, name, len);
        p->counts[i].type[len] = '\0';
        p->counts[i].count = r_u64(&r);
    }
    return r.bad ? corrupt(err, "profile") : AFF_OK;
}

/* ---- transactions ------------------------------------------------------------------------ */

static uint64_t current_map_size(aff_store *s)
{
    MDB_envinfo info;
    mdb_env_info(s->env, &info);
    return (uint64_t)info.me_mapsize;
}

/* Doubles the map unless another thread already grew it past `seen`. Takes resize_lock
 * exclusively, so no transaction of this process is open while LMDB remaps. */
static int store_grow(aff_store *s, uint64_t seen, aff_err *err)
{
    int status = AFF_OK;
    pthread_rwlock_wrlock(&s->resize_lock);
    uint64_t now = current_map_size(s);
    if (now <= seen) {
        uint64_t next = seen * 2;
        int rc = mdb_env_set_mapsize(s->env, (size_t)next);
        if (rc) {
            status = aff__fail(err, AFF_EIO, "store: cannot grow the map to %llu bytes: %s",
                               (unsigned long long)next, mdb_strerror(rc));
            goto out;
        }
        atomic_fetch_add(&s->grows, 1);
        aff_log(AFF_LOG_INFO, "store map grown from %llu to %llu MiB",
                (unsigned long long)(seen >> 20), (unsigned long long)(next >> 20));
    }
out:
    pthread_rwlock_unlock(&s->resize_lock);
    return status;
}

/* Adopts a map size another process set (MDB_MAP_RESIZED); only possible if someone opened
 * the files behind our lock, but cheap to handle. */
static int store_adopt_size(aff_store *s, aff_err *err)
{
    pthread_rwlock_wrlock(&s->resize_lock);
    int rc = mdb_env_set_mapsize(s->env, 0);
    pthread_rwlock_unlock(&s->resize_lock);
    return rc ? mdb_fail(NULL, err, rc, "adopt map size") : AFF_OK;
}

/* Sets every request of a group that has not failed on its own to the group's failure. */
static void fail_group(write_req *group, const aff_err *e)
{
    for (write_req *r = group; r; r = r->next) {
        if (r->status == AFF_OK) {
            r->status = e->code;
            r->err = *e;
        }
    }
}

/* The log sequence the calling thread is applying (store_set_log_sequence). */
static _Thread_local uint64_t tls_log_sequence;

static const MDB_val log_sequence_key = {.mv_size = 15, .mv_data = "log.applied_seq"};

/* Records the highest log sequence among the group's writes in the group's transaction, so
 * the sequence and the writes that applied it commit (or vanish) together. */
static void put_log_sequence(store_txn *t, const write_req *group)
{
    uint64_t seq = 0;
    for (const write_req *r = group; r; r = r->next)
        if (r->status == AFF_OK && r->log_sequence > seq) seq = r->log_sequence;
    if (!seq) return;
    MDB_val k = log_sequence_key, v;
    uint64_t old = 0;
    if (mdb_get(t->txn, t->s->dbi[DB_META], &k, &v) == 0 && v.mv_size == sizeof old)
        memcpy(&old, v.mv_data, sizeof old);
    if (seq <= old) return;
    v = (MDB_val){.mv_size = sizeof seq, .mv_data = &seq};
    int rc = mdb_put(t->txn, t->s->dbi[DB_META], &k, &v, 0);
    if (rc) mdb_fail(t, NULL, rc, "log sequence");
}

static int get_log_sequence_fn(store_txn *t, void *ctx, aff_err *err)
{
    uint64_t *out = ctx;
    MDB_val k = log_sequence_key, v;
    *out = 0;
    int rc = mdb_get(t->txn, t->s->dbi[DB_META], &k, &v);
    if (rc == MDB_NOTFOUND) return AFF_OK;
    if (rc) return mdb_fail(t, err, rc, "read log sequence");
    if (v.mv_size == sizeof *out) memcpy(out, v.mv_data, sizeof *out);
    return AFF_OK;
}

/* Copies every live record of the source read transaction into the empty environment dst
 * with MDB_APPEND (keys arrive in order), committing every STORE_COPY_BATCH records. */
#define STORE_COPY_BATCH 20000

static int copy_records(aff_store *s, MDB_txn *src, MDB_env *dst, aff_err *err)
{
    MDB_txn *w = NULL;
    MDB_cursor *cur = NULL;
    int rc = mdb_txn_begin(dst, NULL, 0, &w);
    for (int i = 0; rc == 0 && i < DB_COUNT; i++) {
        MDB_dbi to;
        if ((rc = mdb_dbi_open(w, db_names[i], MDB_CREATE, &to))) break;
        if ((rc = mdb_cursor_open(src, s->dbi[i], &cur))) break;
        MDB_val k, v;
        size_t n = 0;
        for (int op = MDB_FIRST; (rc = mdb_cursor_get(cur, &k, &v, op)) == 0; op = MDB_NEXT) {
            if ((rc = mdb_put(w, to, &k, &v, MDB_APPEND))) break;
            if (++n % STORE_COPY_BATCH == 0) {
                if ((rc = mdb_txn_commit(w)) || (rc = mdb_txn_begin(dst, NULL, 0, &w))) {
                    w = NULL;
                    break;
                }
            }
        }
        mdb_cursor_close(cur);
        cur = NULL;
        if (rc == MDB_NOTFOUND) rc = 0;
    }
    if (w && rc == 0) {
        rc = mdb_txn_commit(w);
        w = NULL;
    }
    if (w) mdb_txn_abort(w);
    return rc ? mdb_fail(NULL, err, rc, "snapshot copy") : AFF_OK;
}

int store_snapshot(aff_store *s, const char *path, uint64_t *seq, aff_err *err)
{
    int status = AFF_OK;
    MDB_env *dst = NULL;
    store_txn t = {.s = s};
    *seq = 0;
    unlink(path);
    MDB_envinfo info;
    int rc = mdb_env_create(&dst);
    if (!rc) rc = mdb_env_set_maxdbs(dst, DB_COUNT + 2);
    if (!rc) rc = mdb_env_info(s->env, &info);
    if (!rc) rc = mdb_env_set_mapsize(dst, info.me_mapsize);
    if (!rc) rc = mdb_env_open(dst, path, MDB_NOSUBDIR | MDB_NOLOCK | MDB_NOSYNC, 0600);
    if (rc) {
        status = aff__fail(err, AFF_EIO, "snapshot: cannot create '%s': %s", path,
                           mdb_strerror(rc));
        goto out;
    }
    /* One read transaction: the copy is the state at one log sequence. Holding the resize
     * lock keeps the map from being grown under it (as store_view does). */
    pthread_rwlock_rdlock(&s->resize_lock);
    rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &t.txn);
    if (rc) {
        pthread_rwlock_unlock(&s->resize_lock);
        status = mdb_fail(NULL, err, rc, "snapshot read");
        goto out;
    }
    status = get_log_sequence_fn(&t, seq, err);
    if (!status) status = copy_records(s, t.txn, dst, err);
    mdb_txn_abort(t.txn);
    pthread_rwlock_unlock(&s->resize_lock);
    if (!status && (rc = mdb_env_sync(dst, 1)))
        status = aff__fail(err, AFF_EIO, "snapshot: sync '%s': %s", path, mdb_strerror(rc));
out:
    if (dst) mdb_env_close(dst);
    if (status) unlink(path);
    return status;
}

int store_sync(aff_store *s, aff_err *err)
{
    int rc = mdb_env_sync(s->env, 1);
    return rc ? mdb_fail(NULL, err, rc, "sync") : AFF_OK;
}

void store_set_log_sequence(uint64_t seq)
{
    tls_log_sequence = seq;
}

int store_log_sequence(aff_store *s, uint64_t *out, aff_err *err)
{
    return store_view(s, get_log_sequence_fn, out, err);
}

static int put_log_sequence_fn(store_txn *t, void *ctx, aff_err *err)
{
    (void)t, (void)ctx, (void)err;
    return AFF_OK;
}

int store_mark_log_sequence(aff_store *s, uint64_t seq, aff_err *err)
{
    uint64_t saved = tls_log_sequence;
    tls_log_sequence = seq;
    int rc = store_update(s, put_log_sequence_fn, NULL, err);
    tls_log_sequence = saved;
    return rc;
}

/* Runs a group of writes in one transaction and one durable commit. A request whose callback
 * fails is taken out of the group and the transaction is run again without it, so its writes
 * leave no trace and the others still commit (callbacks are re-runnable by contract; failing
 * callbacks are rare, as validation happens before writing). LMDB's nested transactions
 * would avoid the re-run but cost a 2 MiB allocation each. When the map fills, the group is
 * aborted, the map grown and the group run again. */
static void run_group(aff_store *s, write_req *group)
{
    for (write_req *r = group; r; r = r->next)
        r->status = AFF_OK;
    for (;;) {
        aff_err e = {0};
        pthread_rwlock_rdlock(&s->resize_lock);
        uint64_t seen = current_map_size(s);
        store_txn t = {.s = s, .rw = true};
        bool retry = false, any = false;
        int rc = mdb_txn_begin(s->env, NULL, 0, &t.txn);
        if (rc) {
            pthread_rwlock_unlock(&s->resize_lock);
            if (rc == MDB_MAP_RESIZED && store_adopt_size(s, &e) == AFF_OK) continue;
            if (rc != MDB_MAP_RESIZED) mdb_fail(NULL, &e, rc, "begin write transaction");
            fail_group(group, &e);
            return;
        }
        for (write_req *r = group; r && !retry; r = r->next) {
            if (r->status != AFF_OK) continue; /* failed in an earlier run */
            aff__err_clear(&r->err);
            int st = r->fn(&t, r->ctx, &r->err);
            if (t.mdb_rc == MDB_MAP_FULL) {
                retry = true;
            } else if (st != AFF_OK || t.mdb_rc) {
                r->status = st != AFF_OK ? st : mdb_fail(NULL, &r->err, t.mdb_rc, "write");
                retry = true; /* run the others again without it */
            }
            any = true;
        }
        if (!retry && any) {
            put_log_sequence(&t, group);
            if (t.mdb_rc && t.mdb_rc != MDB_MAP_FULL) {
                mdb_txn_abort(t.txn);
                pthread_rwlock_unlock(&s->resize_lock);
                mdb_fail(NULL, &e, t.mdb_rc, "log sequence");
                fail_group(group, &e);
                return;
            }
            retry = t.mdb_rc == MDB_MAP_FULL;
        }
        if (retry || !any) {
            mdb_txn_abort(t.txn);
            pthread_rwlock_unlock(&s->resize_lock);
            if (!any) return;
            if (t.mdb_rc == MDB_MAP_FULL && (rc = store_grow(s, seen, &e)) != AFF_OK) {
                fail_group(group, &e);
                return;
            }
            continue;
        }
        rc = mdb_txn_commit(t.txn);
        pthread_rwlock_unlock(&s->resize_lock);
        if (rc == MDB_MAP_FULL) {
            if (store_grow(s, seen, &e) == AFF_OK) continue;
            fail_group(group, &e);
            return;
        }
        if (rc) {
            mdb_fail(NULL, &e, rc, "commit");
            fail_group(group, &e);
            return;
        }
        atomic_fetch_add(&s->commits, 1);
        return;
    }
}

/* ---- apply batches (replication) -------------------------------------------------------- */

/* The calling thread's apply batch: store_update calls made between store_batch_begin and
 * store_batch_end run in one write transaction, opened at the first of them. */
typedef struct apply_batch {
    aff_store *s;    /* non-NULL between begin and end */
    store_txn t;     /* t.txn: NULL until the first write */
    uint32_t writes; /* store_update calls run in t */
    uint64_t seq;    /* the highest log sequence among them */
    aff_err failure; /* set when a callback or LMDB failed inside the batch */
    bool failed;
} apply_batch;

static _Thread_local apply_batch tls_batch;

static int batch_refused(aff_err *err)
{
    return aff__fail(err, AFF_EIO,
                     "store: an apply batch could not be committed; this replica stopped "
                     "applying the write log (restart it: it resumes from its last committed "
                     "record)");
}

/* Commits the open transaction of the batch (if any) with its log sequence. */
static int batch_commit(apply_batch *b, aff_err *err)
{
    aff_store *s = b->s;
    if (!b->t.txn) return b->failed ? batch_refused(err) : AFF_OK;
    int status = AFF_OK;
    if (b->failed) {
        mdb_txn_abort(b->t.txn);
        status = aff__fail(err, b->failure.code ? b->failure.code : AFF_EIO, "%s",
                           b->failure.msg);
    } else {
        write_req last = {.status = AFF_OK, .log_sequence = b->seq};
        put_log_sequence(&b->t, &last);
        int rc = b->t.mdb_rc ? b->t.mdb_rc : mdb_txn_commit(b->t.txn);
        if (b->t.mdb_rc) mdb_txn_abort(b->t.txn);
        if (rc) {
            status = mdb_fail(NULL, err, rc, "commit of an apply batch");
        } else {
            atomic_fetch_add(&s->commits, 1);
            atomic_fetch_add(&s->writes, b->writes);
        }
    }
    pthread_rwlock_unlock(&s->resize_lock);
    b->t = (store_txn){.s = s};
    b->writes = 0;
    b->seq = 0;
    if (status) atomic_store(&s->batch_failed, true);
    return status;
}

/* Opens the batch's transaction; first grows the map so that a batch (at most
 * STORE_BATCH_MAX writes) cannot fill it: a write inside a batch cannot be undone alone. */
static int batch_open(apply_batch *b, aff_err *err)
{
    aff_store *s = b->s;
    for (;;) {
        MDB_envinfo info;
        MDB_stat st;
        pthread_rwlock_rdlock(&s->resize_lock);
        mdb_env_info(s->env, &info);
        mdb_env_stat(s->env, &st);
        uint64_t used = ((uint64_t)info.me_last_pgno + 1) * st.ms_psize;
        uint64_t size = info.me_mapsize;
        uint64_t room = size / 8 > STORE_BATCH_HEADROOM ? size / 8 : STORE_BATCH_HEADROOM;
        if (used + room <= size) break;
        pthread_rwlock_unlock(&s->resize_lock);
        int status = store_grow(s, size, err);
        if (status) return status;
    }
    int rc = mdb_txn_begin(s->env, NULL, 0, &b->t.txn);
    if (rc) {
        pthread_rwlock_unlock(&s->resize_lock);
        b->t.txn = NULL;
        return mdb_fail(NULL, err, rc, "begin an apply batch");
    }
    b->t.mdb_rc = 0;
    b->t.rw = true;
    return AFF_OK;
}

/* store_update inside the calling thread's batch. */
static int batch_update(apply_batch *b, store_txn_fn fn, void *ctx, aff_err *err)
{
    if (b->failed || atomic_load(&b->s->batch_failed)) return batch_refused(err);
    int status;
    if (b->t.txn && b->writes >= STORE_BATCH_MAX && (status = batch_commit(b, err)))
        return status;
    if (!b->t.txn && (status = batch_open(b, err))) {
        atomic_store(&b->s->batch_failed, true);
        return status;
    }
    aff_err e = {0};
    b->t.wrote = false;
    status = fn(&b->t, ctx, &e);
    if (status == AFF_OK && b->t.mdb_rc) status = mdb_fail(NULL, &e, b->t.mdb_rc, "write");
    if (status && !b->t.wrote && !b->t.mdb_rc) { /* refused before writing: nothing to undo */
        if (err) *err = e;
        return status;
    }
    if (status) {
        /* Its writes cannot be taken out of the shared transaction: the batch is dropped, and
         * with it every write since the last commit, which the modules' memory already holds.
         * The replica stops applying (store_batch_end fails) and a restart re-applies them. */
        b->failed = true;
        b->failure = e;
        atomic_store(&b->s->batch_failed, true);
        aff_log_kv(AFF_LOG_ERROR, "store: a write failed inside an apply batch; the replica stops "
                   "applying the write log", "error", e.msg, NULL);
        if (err) *err = e;
        return status;
    }
    b->writes++;
    if (tls_log_sequence > b->seq) b->seq = tls_log_sequence;
    return AFF_OK;
}

void store_batch_begin(aff_store *s)
{
    if (!tls_batch.s) tls_batch = (apply_batch){.s = s, .t = {.s = s}};
}

int store_batch_end(aff_store *s, aff_err *err)
{
    apply_batch *b = &tls_batch;
    if (!b->s) return atomic_load(&s->batch_failed) ? batch_refused(err) : AFF_OK;
    int status = batch_commit(b, err);
    tls_batch = (apply_batch){0};
    return status;
}

int store_update(aff_store *s, store_txn_fn fn, void *ctx, aff_err *err)
{
    if (tls_batch.s == s) return batch_update(&tls_batch, fn, ctx, err);
    if (atomic_load(&s->batch_failed)) return batch_refused(err);
    write_req req = {.fn = fn, .ctx = ctx, .log_sequence = tls_log_sequence};
    pthread_mutex_lock(&s->gc_mu);
    if (s->gc_tail)
        s->gc_tail->next = &req;
    else
        s->gc_head = &req;
    s->gc_tail = &req;
    while (!req.done) {
        if (s->gc_busy) {
            pthread_cond_wait(&s->gc_cv, &s->gc_mu);
            continue;
        }
        /* Lead: take up to STORE_GROUP_MAX queued writes (ours among them) as one group. */
        s->gc_busy = true;
        write_req *group = s->gc_head, *last = group;
        for (int i = 1; i < STORE_GROUP_MAX && last->next; i++)
            last = last->next;
        s->gc_head = last->next;
        if (!s->gc_head) s->gc_tail = NULL;
        last->next = NULL;
        pthread_mutex_unlock(&s->gc_mu);
        run_group(s, group);
        pthread_mutex_lock(&s->gc_mu);
        for (write_req *r = group, *next; r; r = next) {
            next = r->next;
            r->done = true;
        }
        s->gc_busy = false;
        pthread_cond_broadcast(&s->gc_cv);
    }
    pthread_mutex_unlock(&s->gc_mu);
    if (req.status == AFF_OK)
        atomic_fetch_add(&s->writes, 1);
    else if (err)
        *err = req.err;
    return req.status;
}

int store_view(aff_store *s, store_txn_fn fn, void *ctx, aff_err *err)
{
    /* Inside an apply batch this thread reads its own uncommitted writes, as it would have
     * read them committed one by one. */
    if (tls_batch.s == s && tls_batch.t.txn) return fn(&tls_batch.t, ctx, err);
    for (;;) {
        pthread_rwlock_rdlock(&s->resize_lock);
        store_txn t = {.s = s};
        int rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &t.txn);
        if (rc) {
            pthread_rwlock_unlock(&s->resize_lock);
            if (rc == MDB_MAP_RESIZED) {
                int status = store_adopt_size(s, err);
                if (status) return status;
                continue;
            }
            return mdb_fail(NULL, err, rc, "begin read transaction");
        }
        int status = fn(&t, ctx, err);
        mdb_txn_abort(t.txn);
        pthread_rwlock_unlock(&s->resize_lock);
        return status;
    }
}

aff_store *store_txn_store(store_txn *txn)
{
    return txn->s;
}

/* Generic helpers on one database. get: AFF_ENOTFOUND when absent. */
static int db_get(store_txn *t, int db, const key_buf *k, MDB_val *v, aff_err *err)
{
    MDB_val key = kb_val(k);
    int rc = mdb_get(t->txn, t->s->dbi[db], &key, v);
    if (rc == MDB_NOTFOUND) return aff__fail(err, AFF_ENOTFOUND, "store: not found");
    return rc ? mdb_fail(t, err, rc, "read") : AFF_OK;
}

/* Reserves size bytes for key's value and returns where to write them. */
static int db_reserve(store_txn *t, int db, const key_buf *k, size_t size, uint8_t **dst,
                      aff_err *err)
{
    MDB_val key = kb_val(k), v = {.mv_size = size, .mv_data = NULL};
    t->wrote = true;
    int rc = mdb_put(t->txn, t->s->dbi[db], &key, &v, MDB_RESERVE);
    if (rc) return mdb_fail(t, err, rc, "write");
    *dst = v.mv_data;
    return AFF_OK;
}

/* db_get for a value that is written back next (db_reserve_rmw): in a write transaction the
 * read goes through the transaction's cursor of db, which stays on the key. */
static int db_get_rmw(store_txn *t, int db, const key_buf *k, MDB_val *v, aff_err *err)
{
    if (!t->rw) return db_get(t, db, k, v, err);
    if (!t->rmw[db] && mdb_cursor_open(t->txn, t->s->dbi[db], &t->rmw[db]) != 0) {
        t->rmw[db] = NULL;
        return db_get(t, db, k, v, err);
    }
    MDB_val key = kb_val(k);
    int rc = mdb_cursor_get(t->rmw[db], &key, v, MDB_SET_KEY);
    if (rc == MDB_NOTFOUND) return aff__fail(err, AFF_ENOTFOUND, "store: not found");
    return rc ? mdb_fail(t, err, rc, "read") : AFF_OK;
}

/* db_reserve of key k, in place when db_get_rmw left the cursor on k and the value keeps its
 * size (checked here: any write in between may have moved the cursor). */
static int db_reserve_rmw(store_txn *t, int db, const key_buf *k, size_t size, uint8_t **dst,
                          aff_err *err)
{
    MDB_cursor *c = t->rw ? t->rmw[db] : NULL;
    MDB_val ck, cv;
    if (c && mdb_cursor_get(c, &ck, &cv, MDB_GET_CURRENT) == 0 && ck.mv_size == k->n &&
        cv.mv_size == size && memcmp(ck.mv_data, k->b, k->n) == 0) {
        MDB_val key = kb_val(k), v = {.mv_size = size, .mv_data = NULL};
        t->wrote = true;
        int rc = mdb_cursor_put(c, &key, &v, MDB_CURRENT | MDB_RESERVE);
        if (rc) return mdb_fail(t, err, rc, "write");
        *dst = v.mv_data;
        return AFF_OK;
    }
    return db_reserve(t, db, k, size, dst, err);
}

/* Deletes key; *existed (may be NULL) tells whether it was there. */
static int db_del(store_txn *t, int db, const key_buf *k, bool *existed, aff_err *err)
{
    MDB_val key = kb_val(k);
    t->wrote = true;
    int rc = mdb_del(t->txn, t->s->dbi[db], &key, NULL);
    if (existed) *existed = rc == 0;
    if (rc == MDB_NOTFOUND) return AFF_OK;
    return rc ? mdb_fail(t, err, rc, "delete") : AFF_OK;
}

typedef int (*visit_fn)(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err);

/* Calls visit for every key starting with prefix, in key order, beginning at `from` (a key at
 * or after the prefix; NULL: the prefix itself). visit returns 0 to go on, > 0 to stop. */
static int scan_prefix(store_txn *t, int db, const key_buf *prefix, const key_buf *from,
                       visit_fn visit, void *ctx, aff_err *err)
{
    MDB_cursor *cur = NULL;
    int status = AFF_OK;
    int rc = mdb_cursor_open(t->txn, t->s->dbi[db], &cur);
    if (rc) return mdb_fail(t, err, rc, "open cursor");
    MDB_val k = kb_val(from ? from : prefix), v;
    rc = mdb_cursor_get(cur, &k, &v, k.mv_size ? MDB_SET_RANGE : MDB_FIRST);
    while (rc == 0 && has_prefix(&k, prefix)) {
        int r = visit(ctx, &k, &v, err);
        if (r < 0) {
            status = r;
            goto out;
        }
        if (r > 0) goto out;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (rc && rc != MDB_NOTFOUND) status = mdb_fail(t, err, rc, "scan");
out:
    mdb_cursor_close(cur);
    return status;
}

/* Deletes every key starting with prefix. */
static int del_prefix(store_txn *t, int db, const key_buf *prefix, uint64_t *n_deleted,
                      aff_err *err)
{
    MDB_cursor *cur = NULL;
    int status = AFF_OK;
    int rc = mdb_cursor_open(t->txn, t->s->dbi[db], &cur);
    if (rc) return mdb_fail(t, err, rc, "open cursor");
    for (;;) {
        MDB_val k = kb_val(prefix), v;
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
        if (rc == MDB_NOTFOUND || (rc == 0 && !has_prefix(&k, prefix))) break;
        t->wrote = true;
        if (rc == 0) rc = mdb_cursor_del(cur, 0);
        if (rc) {
            status = mdb_fail(t, err, rc, "delete range");
            goto out;
        }
        if (n_deleted) (*n_deleted)++;
    }
out:
    mdb_cursor_close(cur);
    return status;
}

/* ---- open and close ---------------------------------------------------------------------- */

static int open_databases(aff_store *s, aff_err *err)
{
    MDB_txn *txn = NULL;
    int status = AFF_OK;
    int rc = mdb_txn_begin(s->env, NULL, 0, &txn);
    if (rc) return mdb_fail(NULL, err, rc, "begin");
    for (int i = 0; i < DB_COUNT; i++) {
        rc = mdb_dbi_open(txn, db_names[i], MDB_CREATE, &s->dbi[i]);
        if (rc) {
            status = mdb_fail(NULL, err, rc, "open database");
            goto out;
        }
    }
    MDB_val k = {.mv_size = 6, .mv_data = "format"}, v;
    rc = mdb_get(txn, s->dbi[DB_META], &k, &v);
    if (rc == MDB_NOTFOUND) {
        uint32_t format = STORE_FORMAT;
        v = (MDB_val){.mv_size = sizeof format, .mv_data = &format};
        rc = mdb_put(txn, s->dbi[DB_META], &k, &v, 0);
    } else if (rc == 0) {
        uint32_t format = 0;
        if (v.mv_size == sizeof format) memcpy(&format, v.mv_data, sizeof format);
        if (format != STORE_FORMAT) {
            status = aff__fail(err, AFF_EINTERNAL,
                               "store: unknown store format %u (this build reads format %u)",
                               format, STORE_FORMAT);
            goto out;
        }
    }
    if (rc) {
        status = mdb_fail(NULL, err, rc, "format record");
        goto out;
    }
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) status = mdb_fail(NULL, err, rc, "commit");
out:
    if (txn) mdb_txn_abort(txn);
    return status;
}

int store_create(aff_store **out, const store_config *cfg, aff_err *err)
{
    int status = AFF_OK;
    char path[4096];
    bool temp_dir = false;
    store_config def = {0};
    if (!cfg) cfg = &def;
    *out = NULL;
    aff_store *s = calloc(1, sizeof *s);
    if (!s) return aff__fail(err, AFF_ENOMEM, "store: out of memory");
    s->lock_fd = -1;
    s->persistent = cfg->dir != NULL;
    s->no_sync = cfg->no_sync;

    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&s->resize_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    s->resize_lock_ready = true;
    pthread_mutex_init(&s->gc_mu, NULL);
    pthread_cond_init(&s->gc_cv, NULL);

    if (cfg->dir) {
        if (snprintf(path, sizeof path, "%s", cfg->dir) >= (int)sizeof path) {
            status = aff__fail(err, AFF_EINVAL, "store: data dir path too long");
            goto out;
        }
        if (mkdir(path, 0755) != 0 && errno != EEXIST) {
            status = aff__fail(err, AFF_EIO, "store: cannot create data dir %s: %s", path,
                               strerror(errno));
            goto out;
        }
        char lock_path[4200];
        snprintf(lock_path, sizeof lock_path, "%s/affinity.lock", path);
        s->lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (s->lock_fd < 0) {
            status =
                aff__fail(err, AFF_EIO, "store: cannot open %s: %s", lock_path, strerror(errno));
            goto out;
        }
        if (flock(s->lock_fd, LOCK_EX | LOCK_NB) != 0) {
            status = errno == EWOULDBLOCK
                         ? aff__fail(err, AFF_EUNAVAILABLE,
                                     "store: data dir %s is in use by another process", path)
                         : aff__fail(err, AFF_EIO, "store: cannot lock %s: %s", lock_path,
                                     strerror(errno));
            goto out;
        }
    } else {
        const char *tmp = getenv("TMPDIR");
        if (!tmp || !*tmp) tmp = "/tmp";
        if (snprintf(path, sizeof path, "%s/affinity-mem-XXXXXX", tmp) >= (int)sizeof path ||
            !mkdtemp(path)) {
            status = aff__fail(err, AFF_EIO, "store: cannot create a temporary dir in %s: %s", tmp,
                               strerror(errno));
            goto out;
        }
        temp_dir = true;
    }

    int rc = mdb_env_create(&s->env);
    if (rc) {
        status = mdb_fail(NULL, err, rc, "create environment");
        goto out;
    }
    uint64_t map_size = cfg->initial_map_size ? cfg->initial_map_size : STORE_DEFAULT_MAP_SIZE;
    if (map_size < STORE_MIN_MAP_SIZE) map_size = STORE_MIN_MAP_SIZE;
    mdb_env_set_maxdbs(s->env, DB_COUNT + 2);
    mdb_env_set_mapsize(s->env, (size_t)map_size);
    mdb_env_set_maxreaders(s->env, cfg->max_readers ? cfg->max_readers : STORE_DEFAULT_READERS);
    unsigned flags = MDB_NOTLS;
    if (cfg->no_sync || !cfg->dir) flags |= MDB_NOSYNC | MDB_NOMETASYNC;
    /* A persistent store without fsync (a replica of the write log) is written in place:
     * a commit then makes no write system call (the dirty pages are already in the map) and
     * the kernel writes each page back once, not once per commit. LMDB extends data.mdb to
     * the map size (a sparse file). Not for in-memory mode, which keeps its temporary file
     * small. Without readahead on that map (MDB_NORDAHEAD: MADV_RANDOM): the first write to
     * a page past the data reached so far faults, and readahead would then zero and map a
     * large window of the sparse file in that one fault (measured: 20-38 ms of one apply
     * every ~2 s at 20k events/s, a stall every replica took at the same record). */
    if (cfg->no_sync && cfg->dir) flags |= MDB_WRITEMAP | MDB_NORDAHEAD;
    rc = mdb_env_open(s->env, path, flags, 0644);
    if (rc) {
        status = aff__fail(err, AFF_EIO, "store: cannot open the store in %s: %s", path,
                           mdb_strerror(rc));
        goto out;
    }
    if (temp_dir) {
        /* LMDB keeps its descriptors; the names can go now, so no crash leaves files. */
        char f[4200];
        snprintf(f, sizeof f, "%s/data.mdb", path);
        unlink(f);
        snprintf(f, sizeof f, "%s/lock.mdb", path);
        unlink(f);
        rmdir(path);
        temp_dir = false;
    }
    if ((status = open_databases(s, err))) goto out;
    aff_log_kv(AFF_LOG_INFO, "store opened", "dir", cfg->dir ? cfg->dir : "(in memory)", "mode",
               cfg->dir ? (cfg->no_sync ? "persistent, no fsync" : "persistent") : "in memory",
               NULL);
    *out = s;
    s = NULL;
out:
    if (temp_dir) {
        char f[4200];
        snprintf(f, sizeof f, "%s/data.mdb", path);
        unlink(f);
        snprintf(f, sizeof f, "%s/lock.mdb", path);
        unlink(f);
        rmdir(path);
    }
    store_destroy(s);
    return status;
}

void store_destroy(aff_store *s)
{
    if (!s) return;
    /* A store opened with no_sync is flushed once here: a clean stop leaves it on disk. */
    if (s->env && s->persistent && s->no_sync && mdb_env_sync(s->env, 1))
        aff_log(AFF_LOG_ERROR, "store: cannot flush the store to disk at close");
    if (s->env) mdb_env_close(s->env);
    if (s->lock_fd >= 0) close(s->lock_fd); /* releases the flock */
    if (s->resize_lock_ready) {
        pthread_rwlock_destroy(&s->resize_lock);
        pthread_mutex_destroy(&s->gc_mu);
        pthread_cond_destroy(&s->gc_cv);
    }
    free(s);
}

bool store_persistent(const aff_store *s)
{
    return s->persistent;
}

void store_get_stats(aff_store *s, store_stats *out)
{
    MDB_envinfo info;
    MDB_stat st;
    pthread_rwlock_rdlock(&s->resize_lock);
    mdb_env_info(s->env, &info);
    mdb_env_stat(s->env, &st);
    pthread_rwlock_unlock(&s->resize_lock);
    out->map_size = info.me_mapsize;
    out->used_bytes = (uint64_t)(info.me_last_pgno + 1) * st.ms_psize;
    out->commits = atomic_load(&s->commits);
    out->writes = atomic_load(&s->writes);
    out->map_grows = atomic_load(&s->grows);
}

/* ---- collections ------------------------------------------------------------------------ */

int store_txn_get_collection(store_txn *txn, const char *name, store_collection *out, aff_err *err)
{
    size_t len = name ? strlen(name) : 0;
    if (len == 0 || len > AFF_MAX_NAME_LEN) return bad_key(err);
    if (txn->coll_valid && strcmp(txn->coll.name, name) == 0) {
        *out = txn->coll;
        return AFF_OK;
    }
    MDB_val k = {.mv_size = len, .mv_data = (void *)name}, v;
    int rc = mdb_get(txn->txn, txn->s->dbi[DB_COLLECTIONS], &k, &v);
    if (rc == MDB_NOTFOUND)
        return aff__fail(err, AFF_ENOTFOUND, "collection '%s' does not exist", name);
    if (rc) return mdb_fail(txn, err, rc, "read collection");
    int status = decode_collection(&k, &v, out, err);
    if (status == AFF_OK) {
        txn->coll = *out;
        txn->coll_valid = true;
    }
    return status;
}

static int put_collection_raw(store_txn *t, const store_collection *c, aff_err *err)
{
    MDB_val k = {.mv_size = strlen(c->name), .mv_data = (void *)c->name};
    MDB_val v = {.mv_size = COLLECTION_SIZE};
    t->wrote = true;
    t->coll_valid = false;
    int rc = mdb_put(t->txn, t->s->dbi[DB_COLLECTIONS], &k, &v, MDB_RESERVE);
    if (rc) return mdb_fail(t, err, rc, "write collection");
    encode_collection(v.mv_data, c);
    return AFF_OK;
}

static int put_collection_fn(store_txn *t, void *ctx, aff_err *err)
{
    const store_collection *c = ctx;
    store_collection old;
    int status = store_txn_get_collection(t, c->name, &old, err);
    if (status == AFF_OK)
        return aff__fail(err, AFF_EEXIST, "collection '%s' already exists", c->name);
    if (status != AFF_ENOTFOUND) return status;
    aff__err_clear(err);
    store_collection fresh = *c;
    fresh.generation = 0;
    return put_collection_raw(t, &fresh, err);
}

int store_put_collection(aff_store *s, const store_collection *c, aff_err *err)
{
    size_t len = strnlen(c->name, sizeof c->name);
    if (len == 0 || len > AFF_MAX_NAME_LEN || c->dim == 0 || c->dim > AFF_MAX_DIM)
        return aff__fail(err, AFF_EINVAL,
                         "store: collection needs a name of 1..%d bytes and "
                         "a dimension of 1..%d",
                         AFF_MAX_NAME_LEN, AFF_MAX_DIM);
    return store_update(s, put_collection_fn, (void *)c, err);
}

typedef struct drop_ctx {
    const char *name;
    bool existed;
} drop_ctx;

static int drop_collection_fn(store_txn *t, void *ctx, aff_err *err)
{
    drop_ctx *d = ctx;
    d->existed = false;
    key_buf prefix;
    if (!make_key(&prefix, d->name, NULL, 0, NULL, 0, NULL, 0)) return bad_key(err);
    int status;
    for (int db = DB_ITEMS; db < DB_COUNT; db++) {
        if ((status = del_prefix(t, db, &prefix, NULL, err))) return status;
    }
    key_buf k = {.n = 0};
    memcpy(k.b, d->name, strlen(d->name));
    k.n = strlen(d->name);
    t->coll_valid = false;
    return db_del(t, DB_COLLECTIONS, &k, &d->existed, err);
}

int store_drop_collection(aff_store *s, const char *name, bool *existed, aff_err *err)
{
    drop_ctx d = {.name = name};
    int status = store_update(s, drop_collection_fn, &d, err);
    if (existed) *existed = d.existed;
    return status;
}

typedef struct list_ctx {
    store_collection *v;
    size_t n, cap;
} list_ctx;

static int list_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    list_ctx *l = ctx;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        store_collection *nv = realloc(l->v, cap * sizeof *nv);
        if (!nv) return aff__fail(err, AFF_ENOMEM, "store: out of memory");
        l->v = nv;
        l->cap = cap;
    }
    int status = decode_collection(k, v, &l->v[l->n], err);
    if (status == AFF_OK) l->n++;
    return status;
}

static int list_fn(store_txn *t, void *ctx, aff_err *err)
{
    key_buf empty = {.n = 0};
    return scan_prefix(t, DB_COLLECTIONS, &empty, NULL, list_visit, ctx, err);
}

int store_list_collections(aff_store *s, store_collection **out, size_t *n, aff_err *err)
{
    list_ctx l = {0};
    int status = store_view(s, list_fn, &l, err);
    if (status) {
        free(l.v);
        l = (list_ctx){0};
    }
    *out = l.v;
    *n = l.n;
    return status;
}

/* ---- items ------------------------------------------------------------------------------ */

static int check_item(const aff_item *it, size_t i, uint32_t dim, aff_err *err)
{
    size_t idlen = it->id ? strlen(it->id) : 0;
    if (idlen == 0 || idlen > AFF_MAX_ID_LEN)
        return aff__fail(err, AFF_EINVAL, "item %zu: id must be 1..%d bytes", i, AFF_MAX_ID_LEN);
    if (it->dim != dim || !it->vector)
        return aff__fail(err, AFF_EINVAL,
                         "item '%s': vector has %u values, the collection "
                         "has dimension %u",
                         it->id, it->dim, dim);
    for (uint32_t j = 0; j < dim; j++) {
        if (!isfinite(it->vector[j]))
            return aff__fail(err, AFF_EINVAL, "item '%s': vector value %u is not finite", it->id,
                             j);
    }
    /* The engine has checked the attributes by the same rule; what becomes durable is
     * checked again so that nothing the decoder would reject is ever written. */
    return item_attrs_check(&it->attrs, it->id, err);
}

typedef struct put_items_ctx {
    const char *collection;
    const aff_item *items;
    size_t n;
    item_record scratch; /* an old value, decoded */
} put_items_ctx;

static int put_items_fn(store_txn *t, void *ctx, aff_err *err)
{
    put_items_ctx *p = ctx;
    store_collection c;
    int status = store_txn_get_collection(t, p->collection, &c, err);
    if (status) return status;
    for (size_t i = 0; i < p->n; i++) {
        if ((status = check_item(&p->items[i], i, c.dim, err))) return status;
    }
    bool changed = false;
    for (size_t i = 0; i < p->n; i++) {
        const aff_item *it = &p->items[i];
        key_buf k;
        make_key(&k, p->collection, it->id, AFF_MAX_ID_LEN, NULL, 0, NULL, 0);
        MDB_val old;
        status = db_get(t, DB_ITEMS, &k, &old, err);
        int64_t first_ms = it->first_upsert_ms;
        if (status == AFF_OK) {
            item_record *was = &p->scratch;
            /* an existing item keeps its first upsert time (0 stays 0: unknown, counts old) */
            if ((status = decode_item(&old, c.dim, was, NULL, err))) return status;
            first_ms = was->first_upsert_ms;
            /* A changed vector invalidates profiles that summed the old one. */
            if (old.mv_size < 12 + (size_t)c.dim * 4 ||
                memcmp((const uint8_t *)old.mv_data + 12, it->vector, (size_t)c.dim * 4) != 0)
                changed = true;
        } else if (status != AFF_ENOTFOUND) {
            return status;
        }
        uint8_t *dst;
        if ((status = db_reserve(t, DB_ITEMS, &k, item_size(it), &dst, err))) return status;
        encode_item(dst, it, first_ms);
    }
    aff__err_clear(err);
    if (changed) {
        c.generation++;
        return put_collection_raw(t, &c, err);
    }
    return AFF_OK;
}

int store_put_items(aff_store *s, const char *collection, const aff_item *items, size_t n,
                    aff_err *err)
{
    put_items_ctx p = {.collection = collection, .items = items, .n = n};
    return store_update(s, put_items_fn, &p, err);
}

typedef struct delete_items_ctx {
    const char *collection;
    const char *const *ids;
    size_t n;
    size_t n_deleted;
} delete_items_ctx;

/* pop_rank's key of item filed under rank_log_score. */
static bool rank_key(key_buf *k, const char *collection, const char *item, double rank_log_score)
{
    if (!make_key(k, collection, NULL, 0, NULL, 0, NULL, 0)) return false;
    kb_u64be(k, ord_double(-rank_log_score));
    return item && *item && kb_str(k, item, AFF_MAX_ID_LEN);
}

static int delete_items_fn(store_txn *t, void *ctx, aff_err *err)
{
    delete_items_ctx *d = ctx;
    d->n_deleted = 0;
    store_collection c;
    int status = store_txn_get_collection(t, d->collection, &c, err);
    if (status) return status;
    for (size_t i = 0; i < d->n; i++) {
        key_buf k;
        if (!make_key(&k, d->collection, d->ids[i], AFF_MAX_ID_LEN, NULL, 0, NULL, 0))
            continue; /* an id that cannot exist */
        bool existed;
        if ((status = db_del(t, DB_ITEMS, &k, &existed, err))) return status;
        if (!existed) continue;
        d->n_deleted++;
        store_popularity pop;
        status = store_txn_get_popularity(t, d->collection, d->ids[i], &pop, err);
        if (status == AFF_OK) {
            key_buf rk;
            rank_key(&rk, d->collection, d->ids[i], pop.rank_log_score);
            if ((status = db_del(t, DB_POP_RANK, &rk, NULL, err)) ||
                (status = db_del(t, DB_POPULARITY, &k, NULL, err)))
                return status;
        } else if (status != AFF_ENOTFOUND) {
            return status;
        }
    }
    aff__err_clear(err);
    if (d->n_deleted) {
        c.generation++;
        return put_collection_raw(t, &c, err);
    }
    return AFF_OK;
}

int store_delete_items(aff_store *s, const char *collection, const char *const *ids, size_t n,
                       size_t *n_deleted, aff_err *err)
{
    delete_items_ctx d = {collection, ids, n, 0};
    int status = store_update(s, delete_items_fn, &d, err);
    if (n_deleted) *n_deleted = status == AFF_OK ? d.n_deleted : 0;
    return status;
}

int store_txn_get_item(store_txn *txn, const char *collection, const char *id,
                       item_record *out, float *vector, aff_err *err)
{
    store_collection c;
    int status = store_txn_get_collection(txn, collection, &c, err);
    if (status) return status;
    key_buf k;
    if (!make_key(&k, collection, id, AFF_MAX_ID_LEN, NULL, 0, NULL, 0))
        return aff__fail(err, AFF_ENOTFOUND, "item id must be 1..%d bytes", AFF_MAX_ID_LEN);
    MDB_val v;
    status = db_get(txn, DB_ITEMS, &k, &v, err);
    if (status == AFF_ENOTFOUND)
        return aff__fail(err, AFF_ENOTFOUND, "item '%s' is not in collection '%s'", id, collection);
    if (status) return status;
    if (out) snprintf(out->id, sizeof out->id, "%s", id);
    return decode_item(&v, c.dim, out, vector, err);
}

typedef struct get_item_ctx {
    const char *collection, *id;
    item_record *out;
    float *vector;
} get_item_ctx;

static int get_item_fn(store_txn *t, void *ctx, aff_err *err)
{
    get_item_ctx *g = ctx;
    return store_txn_get_item(t, g->collection, g->id, g->out, g->vector, err);
}

int store_get_item(aff_store *s, const char *collection, const char *id, item_record *out,
                   float *vector, aff_err *err)
{
    get_item_ctx g = {collection, id, out, vector};
    return store_view(s, get_item_fn, &g, err);
}

/* ---- rebuild ------------------------------------------------------------------------------ */

typedef struct rebuild_batch {
    const store_collection *c;
    size_t cap, n;
    aff_item *items;
    item_record *recs;
    const char *(*tag_ptrs)[AFF_MAX_TAGS_PER_ITEM];
    float *vectors;
    key_buf last; /* key of the last item delivered; n == 0: none yet */
    bool started;
} rebuild_batch;

static int rebuild_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    rebuild_batch *b = ctx;
    if (b->started && k->mv_size == b->last.n && memcmp(k->mv_data, b->last.b, b->last.n) == 0)
        return 0; /* the previous batch's last item */
    if (b->n == b->cap) return 1;
    size_t i = b->n;
    const uint8_t *kb = k->mv_data;
    size_t clen = kb[0];
    if (k->mv_size < clen + 2 || kb[clen + 1] != k->mv_size - clen - 2 ||
        k->mv_size - clen - 2 > AFF_MAX_ID_LEN)
        return corrupt(err, "item key");
    item_record *r = &b->recs[i];
    memcpy(r->id, kb + clen + 2, kb[clen + 1]);
    r->id[kb[clen + 1]] = '\0';
    float *vec = b->vectors + i * b->c->dim;
    int status = decode_item(v, b->c->dim, r, vec, err);
    if (status) return status;
    b->items[i] = (aff_item){.id = r->id,
                             .vector = vec,
                             .dim = b->c->dim,
                             .attrs = item_record_attrs(r, b->tag_ptrs[i]),
                             .first_upsert_ms = r->first_upsert_ms};
    memcpy(b->last.b, k->mv_data, k->mv_size);
    b->last.n = k->mv_size;
    b->n++;
    return 0;
}

static int rebuild_fn(store_txn *t, void *ctx, aff_err *err)
{
    rebuild_batch *b = ctx;
    key_buf prefix;
    make_key(&prefix, b->c->name, NULL, 0, NULL, 0, NULL, 0);
    b->n = 0;
    return scan_prefix(t, DB_ITEMS, &prefix, b->started ? &b->last : NULL, rebuild_visit, b, err);
}

static int count_items_fn(store_txn *t, void *ctx, aff_err *err)
{
    MDB_stat st;
    int rc = mdb_stat(t->txn, t->s->dbi[DB_ITEMS], &st);
    if (rc) return mdb_fail(t, err, rc, "stat");
    *(uint64_t *)ctx = st.ms_entries;
    return AFF_OK;
}

static double seconds_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) * 1e-9;
}

int store_rebuild(aff_store *s, const store_rebuild_ops *ops, store_rebuild_progress *out,
                  aff_err *err)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    store_rebuild_progress pr = {0};
    store_collection *cols = NULL;
    size_t n_cols = 0;
    rebuild_batch b = {0};
    double last_log = 0;
    int status;
    if ((status = store_view(s, count_items_fn, &pr.items_total, err)) ||
        (status = store_list_collections(s, &cols, &n_cols, err)))
        goto out;
    b.cap = ops->batch_size ? ops->batch_size : STORE_REBUILD_BATCH;
    for (size_t ci = 0; ci < n_cols; ci++) {
        const store_collection *c = &cols[ci];
        if (ops->collection && (status = ops->collection(ops->ctx, c, err))) goto out;
        pr.collections++;
        free(b.vectors);
        b.vectors = malloc(b.cap * c->dim * sizeof(float));
        if (!b.items) {
            b.items = calloc(b.cap, sizeof *b.items);
            b.recs = calloc(b.cap, sizeof *b.recs);
            b.tag_ptrs = calloc(b.cap, sizeof *b.tag_ptrs);
        }
        if (!b.vectors || !b.items || !b.recs || !b.tag_ptrs) {
            status = aff__fail(err, AFF_ENOMEM, "store: out of memory for a rebuild batch");
            goto out;
        }
        b.c = c;
        b.started = false;
        for (;;) {
            if ((status = store_view(s, rebuild_fn, &b, err))) goto out;
            if (b.n == 0) break;
            b.started = true;
            if (ops->items && (status = ops->items(ops->ctx, c, b.items, b.n, err))) goto out;
            pr.items += b.n;
            pr.elapsed_s = seconds_since(&t0);
            if (ops->progress) ops->progress(ops->ctx, &pr);
            if (pr.elapsed_s - last_log >= 5.0) {
                last_log = pr.elapsed_s;
                aff_log(AFF_LOG_INFO, "store rebuild: %llu of %llu items after %.1f s",
                        (unsigned long long)pr.items, (unsigned long long)pr.items_total,
                        pr.elapsed_s);
            }
            if (b.n < b.cap) break;
        }
    }
    pr.elapsed_s = seconds_since(&t0);
    aff_log(AFF_LOG_INFO, "store rebuilt: %llu collections, %llu items in %.3f s",
            (unsigned long long)pr.collections, (unsigned long long)pr.items, pr.elapsed_s);
out:
    if (out) *out = pr;
    free(cols);
    free(b.vectors);
    free(b.items);
    free(b.recs);
    free(b.tag_ptrs);
    return status;
}

/* ---- profiles -------------------------------------------------------------------------------- */

static bool user_key(key_buf *k, const char *collection, const char *user)
{
    return make_key(k, collection, user, AFF_MAX_ID_LEN, NULL, 0, NULL, 0);
}

int store_txn_get_profile(store_txn *txn, const char *collection, const char *user,
                          store_profile *out, float *sum, aff_err *err)
{
    key_buf k;
    if (!user_key(&k, collection, user)) return bad_key(err);
    MDB_val v;
    int status = db_get(txn, DB_PROFILES, &k, &v, err);
    if (status == AFF_ENOTFOUND)
        return aff__fail(err, AFF_ENOTFOUND, "user '%s' is unknown in collection '%s'", user,
                         collection);
    return status ? status : decode_profile(&v, out, sum, err);
}

int store_txn_put_profile(store_txn *txn, const char *collection, const char *user,
                          const store_profile *p, const float *sum, aff_err *err)
{
    key_buf k;
    if (!user_key(&k, collection, user)) return bad_key(err);
    if (p->n_counts > STORE_MAX_EVENT_TYPES || p->dim == 0 || p->dim > AFF_MAX_DIM)
        return aff__fail(err, AFF_EINVAL, "store: bad profile shape");
    for (uint32_t i = 0; i < p->n_counts; i++) {
        if (strnlen(p->counts[i].type, sizeof p->counts[i].type) > STORE_MAX_TYPE_LEN)
            return bad_key(err);
    }
    uint8_t *dst;
    int status = db_reserve(txn, DB_PROFILES, &k, profile_size(p), &dst, err);
    if (status == AFF_OK) encode_profile(dst, p, sum);
    return status;
}

static bool event_key(key_buf *k, const char *collection, const char *user, uint64_t seq)
{
    if (!user_key(k, collection, user)) return false;
    kb_u64be(k, seq);
    return true;
}

int store_txn_put_event(store_txn *txn, const char *collection, const char *user, uint64_t seq,
                        const store_event *e, aff_err *err)
{
    key_buf k;
    if (!event_key(&k, collection, user, seq)) return bad_key(err);
    size_t tlen = e->type ? strlen(e->type) : 0, ilen = e->item_id ? strlen(e->item_id) : 0;
    if (tlen == 0 || tlen > STORE_MAX_TYPE_LEN || ilen == 0 || ilen > AFF_MAX_ID_LEN ||
        e->n_context > STORE_MAX_CONTEXT)
        return aff__fail(err, AFF_EINVAL, "store: bad event shape");
    size_t size = 32 + tlen + ilen;
    for (uint32_t i = 0; i < e->n_context; i++) {
        size_t kl = strlen(e->context[i].key), vl = strlen(e->context[i].value);
        if (kl > STORE_MAX_CONTEXT_LEN || vl > STORE_MAX_CONTEXT_LEN)
            return aff__fail(err, AFF_EINVAL, "store: context entry longer than %d bytes",
                             STORE_MAX_CONTEXT_LEN);
        size += 4 + kl + vl;
    }
    uint8_t *dst;
    int status = db_reserve(txn, DB_EVENTS, &k, size, &dst, err);
    if (status) return status;
    wr w = {dst};
    w_u8(&w, STORE_VALUE_VERSION);
    w_u8(&w, (uint8_t)tlen);
    w_u16(&w, (uint16_t)ilen);
    w_u16(&w, (uint16_t)e->n_context);
    w_u16(&w, 0);
    w_i64(&w, e->ts_ms);
    w_f64(&w, e->value);
    w_bytes(&w, e->type, tlen);
    w_bytes(&w, e->item_id, ilen);
    for (uint32_t i = 0; i < e->n_context; i++) {
        size_t kl = strlen(e->context[i].key), vl = strlen(e->context[i].value);
        w_u16(&w, (uint16_t)kl);
        w_bytes(&w, e->context[i].key, kl);
        w_u16(&w, (uint16_t)vl);
        w_bytes(&w, e->context[i].value, vl);
    }
    return AFF_OK;
}

int store_txn_delete_event(store_txn *txn, const char *collection, const char *user, uint64_t seq,
                           aff_err *err)
{
    key_buf k;
    if (!event_key(&k, collection, user, seq)) return bad_key(err);
    return db_del(txn, DB_EVENTS, &k, NULL, err);
}

typedef struct events_scan {
    size_t prefix_len;
    store_event_fn fn;
    void *ctx;
} events_scan;

static int events_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    events_scan *es = ctx;
    if (k->mv_size != es->prefix_len + 8) return corrupt(err, "event key");
    uint64_t seq = 0;
    const uint8_t *kb = (const uint8_t *)k->mv_data + es->prefix_len;
    for (int i = 0; i < 8; i++)
        seq = (seq << 8) | kb[i];
    rd r = rd_of(v);
    if (!r_version(&r)) return corrupt(err, "event");
    uint8_t tlen = r_u8(&r);
    uint16_t ilen = r_u16(&r), nctx = r_u16(&r);
    r_u16(&r);
    int64_t ts = r_i64(&r);
    double value = r_f64(&r);
    char type[STORE_MAX_TYPE_LEN + 1], item[AFF_MAX_ID_LEN + 1];
    const uint8_t *tp = r_take(&r, tlen), *ip = r_take(&r, ilen);
    if (!tp || !ip || tlen > STORE_MAX_TYPE_LEN || ilen > AFF_MAX_ID_LEN ||
        nctx > STORE_MAX_CONTEXT)
        return corrupt(err, "event");
    memcpy(type, tp, tlen);
    type[tlen] = '\0';
    memcpy(item, ip, ilen);
    item[ilen] = '\0';
    char ctx_buf[STORE_MAX_CONTEXT][2][STORE_MAX_CONTEXT_LEN + 1];
    store_kv kv[STORE_MAX_CONTEXT];
    for (uint16_t i = 0; i < nctx; i++) {
        r_str16(&r, ctx_buf[i][0], sizeof ctx_buf[i][0]);
        r_str16(&r, ctx_buf[i][1], sizeof ctx_buf[i][1]);
        kv[i] = (store_kv){ctx_buf[i][0], ctx_buf[i][1]};
    }
    if (r.bad) return corrupt(err, "event");
    store_event e = {.item_id = item,
                     .type = type,
                     .ts_ms = ts,
                     .value = value,
                     .context = kv,
                     .n_context = nctx};
    return es->fn(es->ctx, seq, &e);
}

int store_txn_scan_events(store_txn *txn, const char *collection, const char *user,
                          store_event_fn fn, void *ctx, aff_err *err)
{
    key_buf prefix;
    if (!user_key(&prefix, collection, user)) return bad_key(err);
    events_scan es = {prefix.n, fn, ctx};
    return scan_prefix(txn, DB_EVENTS, &prefix, NULL, events_visit, &es, err);
}

#define INTERACTION_SIZE 40

static int decode_interaction(const MDB_val *v, store_interaction *out, aff_err *err)
{
    rd r = rd_of(v);
    if (!r_version(&r)) return corrupt(err, "interaction");
    r_take(&r, 7);
    out->ref_ms = r_i64(&r);
    out->weight = r_f64(&r);
    out->last_ms = r_i64(&r);
    out->count = r_u64(&r);
    return r.bad ? corrupt(err, "interaction") : AFF_OK;
}

int store_txn_get_interaction(store_txn *txn, const char *collection, const char *user,
                              const char *item, store_interaction *out, aff_err *err)
{
    key_buf k;
    if (!make_key(&k, collection, user, AFF_MAX_ID_LEN, item, AFF_MAX_ID_LEN, NULL, 0))
        return bad_key(err);
    MDB_val v;
    int status = db_get_rmw(txn, DB_INTERACTIONS, &k, &v, err);
    return status ? status : decode_interaction(&v, out, err);
}

int store_txn_put_interaction(store_txn *txn, const char *collection, const char *user,
                              const char *item, const store_interaction *in, aff_err *err)
{
    key_buf k;
    if (!make_key(&k, collection, user, AFF_MAX_ID_LEN, item, AFF_MAX_ID_LEN, NULL, 0))
        return bad_key(err);
    uint8_t *dst;
    int status = db_reserve_rmw(txn, DB_INTERACTIONS, &k, INTERACTION_SIZE, &dst, err);
    if (status) return status;
    wr w = {dst};
    w_u8(&w, STORE_VALUE_VERSION);
    w_zero(&w, 7);
    w_i64(&w, in->ref_ms);
    w_f64(&w, in->weight);
    w_i64(&w, in->last_ms);
    w_u64(&w, in->count);
    return AFF_OK;
}

/* Reads the trailing lp(item) of a key whose first `skip` bytes are a known prefix. */
static bool key_tail_id(const MDB_val *k, size_t skip, char *out)
{
    if (k->mv_size < skip + 1) return false;
    const uint8_t *p = (const uint8_t *)k->mv_data + skip;
    size_t len = p[0];
    if (len == 0 || len > AFF_MAX_ID_LEN || k->mv_size != skip + 1 + len) return false;
    memcpy(out, p + 1, len);
    out[len] = '\0';
    return true;
}

typedef struct tail_scan {
    size_t prefix_len;
    store_interaction_fn ifn;
    store_id_fn idfn;
    void *ctx;
} tail_scan;

static int interactions_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    tail_scan *ts = ctx;
    char item[AFF_MAX_ID_LEN + 1];
    store_interaction in;
    if (!key_tail_id(k, ts->prefix_len, item)) return corrupt(err, "interaction key");
    int status = decode_interaction(v, &in, err);
    return status ? status : ts->ifn(ts->ctx, item, &in);
}

typedef struct all_interactions {
    size_t prefix_len;
    store_user_interaction_fn fn;
    void *ctx;
} all_interactions;

static int all_interactions_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    all_interactions *a = ctx;
    char user[AFF_MAX_ID_LEN + 1], item[AFF_MAX_ID_LEN + 1];
    store_interaction in;
    /* key: lp(collection) lp(user) lp(item) */
    if (k->mv_size < a->prefix_len + 1) return corrupt(err, "interaction key");
    const uint8_t *p = (const uint8_t *)k->mv_data + a->prefix_len;
    size_t ulen = p[0];
    if (ulen == 0 || ulen > AFF_MAX_ID_LEN || k->mv_size < a->prefix_len + 1 + ulen + 1)
        return corrupt(err, "interaction key");
    memcpy(user, p + 1, ulen);
    user[ulen] = '\0';
    if (!key_tail_id(k, a->prefix_len + 1 + ulen, item)) return corrupt(err, "interaction key");
    int status = decode_interaction(v, &in, err);
    return status ? status : a->fn(a->ctx, user, item, &in);
}

int store_txn_scan_collection_interactions(store_txn *txn, const char *collection,
                                           store_user_interaction_fn fn, void *ctx, aff_err *err)
{
    key_buf prefix;
    if (!make_key(&prefix, collection, NULL, 0, NULL, 0, NULL, 0)) return bad_key(err);
    all_interactions a = {.prefix_len = prefix.n, .fn = fn, .ctx = ctx};
    return scan_prefix(txn, DB_INTERACTIONS, &prefix, NULL, all_interactions_visit, &a, err);
}

/* ---- models ---------------------------------------------------------------------------------- */

/* lp(collection) be64(upload) be32(index): sorted by upload, then index, right after the
 * collection's model key lp(collection). */
static bool part_key(key_buf *k, const char *collection, uint64_t upload, uint32_t index)
{
    if (!make_key(k, collection, NULL, 0, NULL, 0, NULL, 0)) return false;
    kb_u64be(k, upload);
    for (int i = 3; i >= 0; i--)
        k->b[k->n++] = (uint8_t)(index >> (i * 8));
    return true;
}

static uint64_t part_upload(const MDB_val *k, size_t prefix_len)
{
    const uint8_t *p = (const uint8_t *)k->mv_data + prefix_len;
    uint64_t u = 0;
    for (int i = 0; i < 8; i++)
        u = u << 8 | p[i];
    return u;
}

typedef struct model_put {
    const char *collection;
    bool part; /* replication: part `index` of upload `upload`, not the model */
    uint64_t upload;
    uint32_t index;
    const void *blob;
    size_t len;
} model_put;

static int put_model_fn(store_txn *t, void *ctx, aff_err *err)
{
    model_put *m = ctx;
    store_collection c;
    int status = store_txn_get_collection(t, m->collection, &c, err);
    if (status) return status;
    key_buf k;
    if (!(m->part ? part_key(&k, m->collection, m->upload, m->index)
                  : make_key(&k, m->collection, NULL, 0, NULL, 0, NULL, 0)))
        return bad_key(err);
    uint8_t *dst;
    if ((status = db_reserve(t, DB_MODELS, &k, m->len, &dst, err))) return status;
    if (m->len) memcpy(dst, m->blob, m->len);
    return AFF_OK;
}

int store_put_model(aff_store *s, const char *collection, const void *blob, size_t len,
                    aff_err *err)
{
    if (len == 0) return aff__fail(err, AFF_EINVAL, "store: empty model");
    model_put m = {.collection = collection, .blob = blob, .len = len};
    return store_update(s, put_model_fn, &m, err);
}

typedef struct model_get {
    const char *collection;
    void *blob;
    size_t len;
} model_get;

static int get_model_fn(store_txn *t, void *ctx, aff_err *err)
{
    model_get *m = ctx;
    free(m->blob);
    m->blob = NULL;
    key_buf k;
    if (!make_key(&k, m->collection, NULL, 0, NULL, 0, NULL, 0)) return bad_key(err);
    MDB_val v;
    int status = db_get(t, DB_MODELS, &k, &v, err);
    if (status) return status;
    if (!(m->blob = malloc(v.mv_size ? v.mv_size : 1)))
        return aff__fail(err, AFF_ENOMEM, "store: out of memory reading a model");
    memcpy(m->blob, v.mv_data, v.mv_size);
    m->len = v.mv_size;
    return AFF_OK;
}

int store_get_model(aff_store *s, const char *collection, void **blob, size_t *len, aff_err *err)
{
    model_get m = {.collection = collection};
    int status = store_view(s, get_model_fn, &m, err);
    if (status) {
        free(m.blob);
        m.blob = NULL;
        m.len = 0;
    }
    *blob = m.blob;
    *len = m.len;
    return status;
}

/* ---- model parts (replication: a model on its way through the write log) ------------------- */

int store_put_model_part(aff_store *s, const char *collection, uint64_t upload, uint32_t index,
                         const void *data, size_t len, aff_err *err)
{
    model_put m = {.collection = collection, .part = true, .upload = upload, .index = index,
                   .blob = data, .len = len};
    return store_update(s, put_model_fn, &m, err);
}

typedef struct parts_get {
    const char *collection;
    uint64_t upload;
    uint32_t n;
    uint8_t *blob;
    size_t len;
} parts_get;

static int get_parts_fn(store_txn *t, void *ctx, aff_err *err)
{
    parts_get *pg = ctx;
    free(pg->blob);
    pg->blob = NULL;
    pg->len = 0;
    size_t total = 0;
    for (int pass = 0; pass < 2; pass++) { /* sizes, then copies */
        if (pass == 1 && !(pg->blob = malloc(total ? total : 1)))
            return aff__fail(err, AFF_ENOMEM, "store: out of memory reading a model's parts");
        for (uint32_t i = 0; i < pg->n; i++) {
            key_buf k;
            if (!part_key(&k, pg->collection, pg->upload, i)) return bad_key(err);
            MDB_val v;
            int status = db_get(t, DB_MODELS, &k, &v, err);
            if (status == AFF_ENOTFOUND)
                return aff__fail(err, AFF_ENOTFOUND,
                                 "store: part %u of %u of model upload %llu is missing", i, pg->n,
                                 (unsigned long long)pg->upload);
            if (status) return status;
            if (pass == 0) {
                total += v.mv_size;
            } else {
                memcpy(pg->blob + pg->len, v.mv_data, v.mv_size);
                pg->len += v.mv_size;
            }
        }
    }
    return AFF_OK;
}

int store_get_model_parts(aff_store *s, const char *collection, uint64_t upload, uint32_t n,
                          void **blob, size_t *len, aff_err *err)
{
    parts_get pg = {.collection = collection, .upload = upload, .n = n};
    int status = store_view(s, get_parts_fn, &pg, err);
    if (status) {
        free(pg.blob);
        pg.blob = NULL;
        pg.len = 0;
    }
    *blob = pg.blob;
    *len = pg.len;
    return status;
}

typedef struct model_commit {
    model_put put;
    uint64_t upload;
} model_commit;

static int commit_model_fn(store_txn *t, void *ctx, aff_err *err)
{
    model_commit *mc = ctx;
    int status = put_model_fn(t, &mc->put, err);
    if (status) return status;
    key_buf prefix, from;
    if (!make_key(&prefix, mc->put.collection, NULL, 0, NULL, 0, NULL, 0) ||
        !part_key(&from, mc->put.collection, 0, 0))
        return bad_key(err);
    MDB_cursor *cur = NULL;
    int rc = mdb_cursor_open(t->txn, t->s->dbi[DB_MODELS], &cur);
    if (rc) return mdb_fail(t, err, rc, "open cursor");
    for (;;) { /* parts of this upload and of older (abandoned) ones, in key order */
        MDB_val k = kb_val(&from), v;
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
        if (rc == MDB_NOTFOUND || (rc == 0 && (!has_prefix(&k, &prefix) ||
                                               k.mv_size != from.n ||
                                               part_upload(&k, prefix.n) > mc->upload))) {
            rc = 0;
            break;
        }
        if (rc == 0) rc = mdb_cursor_del(cur, 0);
        if (rc) break;
    }
    mdb_cursor_close(cur);
    return rc ? mdb_fail(t, err, rc, "delete model parts") : AFF_OK;
}

int store_commit_model(aff_store *s, const char *collection, uint64_t upload, const void *blob,
                       size_t len, aff_err *err)
{
    if (len == 0) return aff__fail(err, AFF_EINVAL, "store: empty model");
    model_commit mc = {.put = {.collection = collection, .blob = blob, .len = len},
                       .upload = upload};
    return store_update(s, commit_model_fn, &mc, err);
}

int store_txn_scan_interactions(store_txn *txn, const char *collection, const char *user,
                                store_interaction_fn fn, void *ctx, aff_err *err)
{
    key_buf prefix;
    if (!user_key(&prefix, collection, user)) return bad_key(err);
    tail_scan ts = {.prefix_len = prefix.n, .ifn = fn, .ctx = ctx};
    return scan_prefix(txn, DB_INTERACTIONS, &prefix, NULL, interactions_visit, &ts, err);
}

int store_txn_mark_type(store_txn *txn, const char *collection, const char *user, const char *type,
                        const char *item, int64_t ts_ms, aff_err *err)
{
    key_buf k;
    if (!make_key(&k, collection, user, AFF_MAX_ID_LEN, type, STORE_MAX_TYPE_LEN, item,
                  AFF_MAX_ID_LEN))
        return bad_key(err);
    uint8_t *dst;
    int status = db_reserve(txn, DB_BY_TYPE, &k, 16, &dst, err);
    if (status) return status;
    wr w = {dst};
    w_u8(&w, STORE_VALUE_VERSION);
    w_zero(&w, 7);
    w_i64(&w, ts_ms);
    return AFF_OK;
}

static int type_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    tail_scan *ts = ctx;
    char item[AFF_MAX_ID_LEN + 1];
    if (!key_tail_id(k, ts->prefix_len, item)) return corrupt(err, "by_type key");
    return ts->idfn(ts->ctx, item);
}

int store_txn_scan_type(store_txn *txn, const char *collection, const char *user, const char *type,
                        store_id_fn fn, void *ctx, aff_err *err)
{
    key_buf prefix;
    if (!make_key(&prefix, collection, user, AFF_MAX_ID_LEN, type, STORE_MAX_TYPE_LEN, NULL, 0))
        return bad_key(err);
    tail_scan ts = {.prefix_len = prefix.n, .idfn = fn, .ctx = ctx};
    return scan_prefix(txn, DB_BY_TYPE, &prefix, NULL, type_visit, &ts, err);
}

int store_txn_delete_user(store_txn *txn, const char *collection, const char *user, bool *existed,
                          aff_err *err)
{
    key_buf k;
    if (!user_key(&k, collection, user)) return bad_key(err);
    bool had_profile = false;
    uint64_t n = 0;
    int status;
    if ((status = db_del(txn, DB_PROFILES, &k, &had_profile, err)) ||
        (status = del_prefix(txn, DB_EVENTS, &k, &n, err)) ||
        (status = del_prefix(txn, DB_INTERACTIONS, &k, &n, err)) ||
        (status = del_prefix(txn, DB_BY_TYPE, &k, &n, err)))
        return status;
    if (existed) *existed = had_profile || n > 0;
    return AFF_OK;
}

#define POPULARITY_SIZE 40
#define POPULARITY_SIZE_V0 32 /* before rank_log_score */

static void encode_popularity(uint8_t *dst, const store_popularity *p)
{
    wr w = {dst};
    w_u8(&w, STORE_VALUE_VERSION);
    w_zero(&w, 7);
    w_f64(&w, p->log_score);
    w_u64(&w, p->count);
    w_i64(&w, p->last_ms);
    w_f64(&w, p->rank_log_score);
}

static int decode_popularity(const MDB_val *v, store_popularity *out, aff_err *err)
{
    rd r = rd_of(v);
    if (!r_version(&r)) return corrupt(err, "popularity");
    r_take(&r, 7);
    out->log_score = r_f64(&r);
    out->count = r_u64(&r);
    out->last_ms = r_i64(&r);
    out->rank_log_score = v->mv_size == POPULARITY_SIZE_V0 ? out->log_score : r_f64(&r);
    return r.bad ? corrupt(err, "popularity") : AFF_OK;
}

int store_txn_get_popularity(store_txn *txn, const char *collection, const char *item,
                             store_popularity *out, aff_err *err)
{
    key_buf k;
    if (!make_key(&k, collection, item, AFF_MAX_ID_LEN, NULL, 0, NULL, 0)) return bad_key(err);
    MDB_val v;
    int status = db_get_rmw(txn, DB_POPULARITY, &k, &v, err);
    return status ? status : decode_popularity(&v, out, err);
}


int store_txn_put_popularity(store_txn *txn, const char *collection, const char *item,
                             const store_popularity *old, const store_popularity *p, aff_err *err)
{
    key_buf k;
    if (!make_key(&k, collection, item, AFF_MAX_ID_LEN, NULL, 0, NULL, 0)) return bad_key(err);
    if (!isfinite(p->log_score))
        return aff__fail(err, AFF_EINVAL, "store: popularity score is not finite");
    store_popularity rec = *p;
    /* Stays filed where it is while the score is within the slack above its filing score. */
    const bool stays = old && old->rank_log_score <= p->log_score &&
                       p->log_score < old->rank_log_score + STORE_POP_RANK_SLACK;
    rec.rank_log_score = stays ? old->rank_log_score : p->log_score;
    int status;
    if (!stays) {
        key_buf ok, rk;
        if (!rank_key(&rk, collection, item, rec.rank_log_score)) return bad_key(err);
        if (old) {
            rank_key(&ok, collection, item, old->rank_log_score);
            if ((status = db_del(txn, DB_POP_RANK, &ok, NULL, err))) return status;
        }
        uint8_t *unused;
        if ((status = db_reserve(txn, DB_POP_RANK, &rk, 0, &unused, err))) return status;
    }
    uint8_t *dst;
    if ((status = db_reserve_rmw(txn, DB_POPULARITY, &k, POPULARITY_SIZE, &dst, err)))
        return status;
    encode_popularity(dst, &rec);
    return AFF_OK;
}

typedef struct popular_scan {
    store_txn *txn;
    const char *collection;
    size_t prefix_len;
    store_popularity_fn fn;
    void *ctx;
} popular_scan;

static int popular_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    (void)v; /* empty, or a stale copy written before the slack */
    popular_scan *ps = ctx;
    char item[AFF_MAX_ID_LEN + 1];
    if (!key_tail_id(k, ps->prefix_len + 8, item)) return corrupt(err, "pop_rank key");
    key_buf pk;
    if (!make_key(&pk, ps->collection, item, AFF_MAX_ID_LEN, NULL, 0, NULL, 0))
        return corrupt(err, "pop_rank key");
    MDB_val pv;
    store_popularity p;
    int status = db_get(ps->txn, DB_POPULARITY, &pk, &pv, err);
    if (status == AFF_ENOTFOUND) return corrupt(err, "pop_rank entry without a counter");
    if (status || (status = decode_popularity(&pv, &p, err))) return status;
    return ps->fn(ps->ctx, item, &p);
}

int store_txn_scan_popular(store_txn *txn, const char *collection, store_popularity_fn fn,
                           void *ctx, aff_err *err)
{
    key_buf prefix;
    if (!make_key(&prefix, collection, NULL, 0, NULL, 0, NULL, 0)) return bad_key(err);
    popular_scan ps = {
        .txn = txn, .collection = collection, .prefix_len = prefix.n, .fn = fn, .ctx = ctx};
    return scan_prefix(txn, DB_POP_RANK, &prefix, NULL, popular_visit, &ps, err);
}

/* ---- personalization opt-outs (issue 12) ------------------------------------------------- */

#define OPT_OUT_SIZE 16

int store_txn_get_opt_out(store_txn *txn, const char *collection, const char *user,
                          int64_t *since_ms, aff_err *err)
{
    key_buf k;
    if (!user_key(&k, collection, user)) return bad_key(err);
    MDB_val v;
    int status = db_get(txn, DB_OPT_OUT, &k, &v, err);
    if (status) return status;
    rd r = rd_of(&v);
    if (!r_version(&r)) return corrupt(err, "opt_out");
    r_take(&r, 7);
    int64_t since = r_i64(&r);
    if (r.bad) return corrupt(err, "opt_out");
    if (since_ms) *since_ms = since;
    return AFF_OK;
}

int store_txn_put_opt_out(store_txn *txn, const char *collection, const char *user,
                          int64_t since_ms, aff_err *err)
{
    key_buf k;
    if (!user_key(&k, collection, user)) return bad_key(err);
    uint8_t *dst;
    int status = db_reserve(txn, DB_OPT_OUT, &k, OPT_OUT_SIZE, &dst, err);
    if (status) return status;
    wr w = {dst};
    w_u8(&w, STORE_VALUE_VERSION);
    w_zero(&w, 7);
    w_i64(&w, since_ms);
    return AFF_OK;
}

int store_txn_delete_opt_out(store_txn *txn, const char *collection, const char *user,
                             bool *existed, aff_err *err)
{
    key_buf k;
    if (!user_key(&k, collection, user)) return bad_key(err);
    return db_del(txn, DB_OPT_OUT, &k, existed, err);
}

/* ---- event retention (issue 12) ------------------------------------------------------------ */

typedef struct users_scan {
    size_t prefix_len;
    store_id_fn fn;
    void *ctx;
} users_scan;

static int users_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    (void)v;
    users_scan *us = ctx;
    char user[AFF_MAX_ID_LEN + 1];
    if (!key_tail_id(k, us->prefix_len, user)) return corrupt(err, "profile key");
    return us->fn(us->ctx, user);
}

int store_txn_scan_users(store_txn *txn, const char *collection, store_id_fn fn, void *ctx,
                         aff_err *err)
{
    key_buf prefix;
    if (!make_key(&prefix, collection, NULL, 0, NULL, 0, NULL, 0)) return bad_key(err);
    users_scan us = {prefix.n, fn, ctx};
    return scan_prefix(txn, DB_PROFILES, &prefix, NULL, users_visit, &us, err);
}

int store_txn_delete_interaction(store_txn *txn, const char *collection, const char *user,
                                 const char *item, aff_err *err)
{
    key_buf k;
    if (!make_key(&k, collection, user, AFF_MAX_ID_LEN, item, AFF_MAX_ID_LEN, NULL, 0))
        return bad_key(err);
    return db_del(txn, DB_INTERACTIONS, &k, NULL, err);
}

typedef struct marks_scan {
    size_t prefix_len;
    store_mark_fn fn;
    void *ctx;
} marks_scan;

static int marks_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    marks_scan *ms = ctx;
    char item[AFF_MAX_ID_LEN + 1];
    if (!key_tail_id(k, ms->prefix_len, item)) return corrupt(err, "by_type key");
    rd r = rd_of(v);
    if (!r_version(&r)) return corrupt(err, "by_type");
    r_take(&r, 7);
    int64_t last_ms = r_i64(&r);
    if (r.bad) return corrupt(err, "by_type");
    return ms->fn(ms->ctx, item, last_ms);
}

int store_txn_scan_type_marks(store_txn *txn, const char *collection, const char *user,
                              const char *type, store_mark_fn fn, void *ctx, aff_err *err)
{
    key_buf prefix;
    if (!make_key(&prefix, collection, user, AFF_MAX_ID_LEN, type, STORE_MAX_TYPE_LEN, NULL, 0))
        return bad_key(err);
    marks_scan ms = {prefix.n, fn, ctx};
    return scan_prefix(txn, DB_BY_TYPE, &prefix, NULL, marks_visit, &ms, err);
}

int store_txn_unmark_type(store_txn *txn, const char *collection, const char *user,
                          const char *type, const char *item, aff_err *err)
{
    key_buf k;
    if (!make_key(&k, collection, user, AFF_MAX_ID_LEN, type, STORE_MAX_TYPE_LEN, item,
                  AFF_MAX_ID_LEN))
        return bad_key(err);
    return db_del(txn, DB_BY_TYPE, &k, NULL, err);
}

/* ---- experiments (measurement) ---------------------------------------------------------- */

typedef struct experiment_put {
    const char *id;
    const void *blob;
    size_t len;
} experiment_put;

static int put_experiment_fn(store_txn *t, void *ctx, aff_err *err)
{
    const experiment_put *e = ctx;
    key_buf k;
    if (!make_key(&k, e->id, NULL, 0, NULL, 0, NULL, 0)) return bad_key(err);
    uint8_t *dst;
    int status = db_reserve(t, DB_EXPERIMENTS, &k, e->len, &dst, err);
    if (status) return status;
    memcpy(dst, e->blob, e->len);
    return AFF_OK;
}

int store_put_experiment(aff_store *s, const char *id, const void *blob, size_t len, aff_err *err)
{
    if (len == 0) return aff__fail(err, AFF_EINVAL, "store: empty experiment");
    experiment_put e = {.id = id, .blob = blob, .len = len};
    return store_update(s, put_experiment_fn, &e, err);
}

typedef struct experiment_scan {
    store_blob_fn fn;
    void *ctx;
} experiment_scan;

static int experiments_visit(void *ctx, const MDB_val *k, const MDB_val *v, aff_err *err)
{
    const experiment_scan *es = ctx;
    const uint8_t *kp = k->mv_data;
    char id[256];
    if (k->mv_size < 1 || kp[0] + 1u != k->mv_size)
        return aff__fail(err, AFF_EINTERNAL, "store: corrupt experiment key");
    memcpy(id, kp + 1, kp[0]);
    id[kp[0]] = '\0';
    return es->fn(es->ctx, id, v->mv_data, v->mv_size);
}

static int scan_experiments_fn(store_txn *t, void *ctx, aff_err *err)
{
    key_buf empty = {.n = 0};
    return scan_prefix(t, DB_EXPERIMENTS, &empty, NULL, experiments_visit, ctx, err);
}

int store_scan_experiments(aff_store *s, store_blob_fn fn, void *ctx, aff_err *err)
{
    experiment_scan es = {fn, ctx};
    return store_view(s, scan_experiments_fn, &es, err);
}

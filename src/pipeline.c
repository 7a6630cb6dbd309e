/*
 * pipeline.c: owns the recommendation decision (see pipeline.h): planning (shopper source,
 * rules from presets and requests, validated here and only here), candidate retrieval through
 * the batcher, rules, diversity, exploration, reasons and the recommendation id.
 *
 * Rules kept here: a job has one owner at a time (the caller until pipeline_start returns,
 * then the batcher until the completion runs, then the caller again); everything a job needs
 * after it was started (merged rules, promotion filters, the preset set the rules borrow) is
 * owned or referenced by the job, so a preset reload never frees rules a job still reads.
 */
#include "pipeline.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "jsonv.h"
#include "log.h"
#include "rng.h"

/* ---- presets ------------------------------------------------------------------------------- */

/* One parsed presets file; strings point into the JSON tree it owns. Reference-counted so a
 * reload never frees rules a running job borrows. */
typedef struct preset_set {
    atomic_int refs;
    jsonv *tree;
    size_t n;
    char **names;          /* point into tree */
    pipeline_rules *rules; /* n */
    size_t n_layouts;
    char **layout_names;     /* point into tree */
    pipeline_slot **layouts; /* n_layouts arrays of layout_sizes[i] slots */
    uint32_t *layout_sizes;
    size_t n_ranked;
    char **ranked_names; /* "collections": {name: {"ranked_by": other}}; point into tree */
    char **ranked_by;
    void **allocs; /* arrays built from the tree */
    size_t n_allocs, cap_allocs;
} preset_set;

struct aff_pipeline {
    aff_engine *engine;
    batcher *batcher;
    aff_profiles *profiles;
    aff_model *model;             /* NULL: no learning */
    aff_outcomes *outcomes;       /* NULL: nothing recorded */
    aff_experiments *experiments; /* NULL: no experiments */
    aff_exposure *exposure;       /* NULL: no item ages or served counts */
    aff_widgets *widgets;         /* NULL: no widget recipes */
    char *presets_path;
    pthread_mutex_t mu; /* guards presets, mtime, checked_ns */
    preset_set *presets;
    struct timespec mtime;
    int64_t checked_ns;
};

static void preset_set_unref(preset_set *s)
{
    if (!s || atomic_fetch_sub(&s->refs, 1) != 1) return;
    for (size_t i = 0; i < s->n_allocs; i++)
        free(s->allocs[i]);
    free(s->allocs);
    free(s->names);
    free(s->rules);
    free(s->layout_names);
    free(s->layouts);
    free(s->layout_sizes);
    free(s->ranked_names);
    free(s->ranked_by);
    jsonv_free(s->tree);
    free(s);
}

static void *set_alloc(preset_set *s, size_t n, size_t size)
{
    if (s->n_allocs == s->cap_allocs) {
        size_t cap = s->cap_allocs ? 2 * s->cap_allocs : 32;
        void **a = realloc(s->allocs, cap * sizeof *a);
        if (!a) return NULL;
        s->allocs = a;
        s->cap_allocs = cap;
    }
    void *p = calloc(n ? n : 1, size);
    if (p) s->allocs[s->n_allocs++] = p;
    return p;
}

static int json_strings(preset_set *s, const jsonv *v, const char *field, const char *const **out,
                        uint32_t *n, aff_err *err)
{
    *out = NULL;
    *n = 0;
    if (!v) return AFF_OK;
    if (v->type != JSONV_ARRAY)
        return aff__fail(err, AFF_EINVAL, "%s must be an array of strings", field);
    const char **a = set_alloc(s, v->n, sizeof *a);
    if (!a) return aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
    for (size_t i = 0; i < v->n; i++) {
        if (v->items[i].type != JSONV_STRING)
            return aff__fail(err, AFF_EINVAL, "%s[%zu] must be a string", field, i);
        a[i] = v->items[i].string;
    }
    *out = a;
    *n = (uint32_t)v->n;
    return AFF_OK;
}

static int json_number(const jsonv *v, const char *field, double *out, aff_err *err)
{
    if (!v) return AFF_OK;
    if (v->type != JSONV_NUMBER) return aff__fail(err, AFF_EINVAL, "%s must be a number", field);
    *out = v->number;
    return AFF_OK;
}

static int json_filter(preset_set *s, const jsonv *v, const char *field, aff_filter *f,
                       aff_err *err)
{
    aff_filter_init(f);
    if (!v) return AFF_OK;
    if (v->type != JSONV_OBJECT) return aff__fail(err, AFF_EINVAL, "%s must be an object", field);
    char sub[160];
    int rc;
#define STRS(key, arr, cnt)                                                                        \
    snprintf(sub, sizeof sub, "%s." key, field);                                                   \
    if ((rc = json_strings(s, jsonv_get(v, key), sub, &f->arr, &f->cnt, err))) return rc;
    STRS("categories", categories, n_categories)
    STRS("tags", tags, n_tags)
    STRS("exclude_categories", exclude_categories, n_exclude_categories)
    STRS("exclude_tags", exclude_tags, n_exclude_tags)
    STRS("exclude_ids", exclude_ids, n_exclude_ids)
#undef STRS
    double d = -INFINITY;
    snprintf(sub, sizeof sub, "%s.price_min", field);
    if ((rc = json_number(jsonv_get(v, "price_min"), sub, &d, err))) return rc;
    f->price_min = (float)d;
    d = INFINITY;
    snprintf(sub, sizeof sub, "%s.price_max", field);
    if ((rc = json_number(jsonv_get(v, "price_max"), sub, &d, err))) return rc;
    f->price_max = (float)d;
    const jsonv *av = jsonv_get(v, "available_only");
    if (av && av->type != JSONV_BOOL)
        return aff__fail(err, AFF_EINVAL, "%s.available_only must be true or false", field);
    f->available_only = av && av->boolean;
    return AFF_OK;
}

/* An "audience" object, or NULL when absent. */
static int json_audience(preset_set *s, const jsonv *v, const char *field,
                         const pipeline_audience **out, aff_err *err)
{
    *out = NULL;
    if (!v) return AFF_OK;
    if (v->type != JSONV_OBJECT) return aff__fail(err, AFF_EINVAL, "%s must be an object", field);
    pipeline_audience *a = set_alloc(s, 1, sizeof *a);
    if (!a) return aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
    pipeline_audience_init(a);
    char sub[200];
    int rc;
    struct {
        const char *key;
        float *f;
    } nums[] = {{"min_price_sensitivity", &a->min_price_sensitivity},
                {"max_price_sensitivity", &a->max_price_sensitivity},
                {"min_loyalty", &a->min_loyalty},
                {"min_activity", &a->min_activity},
                {"min_purchase_intent", &a->min_purchase_intent}};
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
        double d = *nums[i].f;
        snprintf(sub, sizeof sub, "%s.%s", field, nums[i].key);
        if ((rc = json_number(jsonv_get(v, nums[i].key), sub, &d, err))) return rc;
        *nums[i].f = (float)d;
    }
    double h = -1;
    snprintf(sub, sizeof sub, "%s.from_hour", field);
    if ((rc = json_number(jsonv_get(v, "from_hour"), sub, &h, err))) return rc;
    a->from_hour = (int)h;
    h = -1;
    snprintf(sub, sizeof sub, "%s.to_hour", field);
    if ((rc = json_number(jsonv_get(v, "to_hour"), sub, &h, err))) return rc;
    a->to_hour = (int)h;
    snprintf(sub, sizeof sub, "%s.devices", field);
    if ((rc = json_strings(s, jsonv_get(v, "devices"), sub, &a->devices, &a->n_devices, err)))
        return rc;
    snprintf(sub, sizeof sub, "%s.locales", field);
    if ((rc = json_strings(s, jsonv_get(v, "locales"), sub, &a->locales, &a->n_locales, err)))
        return rc;
    *out = a;
    return AFF_OK;
}

static int json_rules(preset_set *s, const jsonv *v, const char *field, pipeline_rules *r,
                      aff_err *err)
{
    memset(r, 0, sizeof *r);
    if (v->type != JSONV_OBJECT) return aff__fail(err, AFF_EINVAL, "%s must be an object", field);
    char sub[200];
    int rc;
    const jsonv *a;
    if ((a = jsonv_get(v, "boosts"))) {
        if (a->type != JSONV_ARRAY)
            return aff__fail(err, AFF_EINVAL, "%s.boosts must be an array", field);
        pipeline_boost *b = set_alloc(s, a->n, sizeof *b);
        if (!b) return aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
        for (size_t i = 0; i < a->n; i++) {
            snprintf(sub, sizeof sub, "%s.boosts[%zu].filter", field, i);
            if ((rc = json_filter(s, jsonv_get(&a->items[i], "filter"), sub, &b[i].filter, err)))
                return rc;
            double w = NAN;
            snprintf(sub, sizeof sub, "%s.boosts[%zu].weight", field, i);
            if ((rc = json_number(jsonv_get(&a->items[i], "weight"), sub, &w, err))) return rc;
            b[i].weight = (float)w;
            snprintf(sub, sizeof sub, "%s.boosts[%zu].audience", field, i);
            if ((rc = json_audience(s, jsonv_get(&a->items[i], "audience"), sub, &b[i].audience,
                                    err)))
                return rc;
        }
        r->boosts = b;
        r->n_boosts = (uint32_t)a->n;
    }
    if ((a = jsonv_get(v, "pins"))) {
        if (a->type != JSONV_ARRAY)
            return aff__fail(err, AFF_EINVAL, "%s.pins must be an array", field);
        pipeline_pin *pn = set_alloc(s, a->n, sizeof *pn);
        if (!pn) return aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
        for (size_t i = 0; i < a->n; i++) {
            const jsonv *id = jsonv_get(&a->items[i], "item_id");
            if (!id || id->type != JSONV_STRING)
                return aff__fail(err, AFF_EINVAL, "%s.pins[%zu].item_id must be a string", field,
                                 i);
            pn[i].item_id = id->string;
            double pos = 0;
            snprintf(sub, sizeof sub, "%s.pins[%zu].position", field, i);
            if ((rc = json_number(jsonv_get(&a->items[i], "position"), sub, &pos, err))) return rc;
            if (!(pos >= 1 && pos <= AFF_MAX_K && pos == floor(pos)))
                return aff__fail(err, AFF_EINVAL, "%s is %g; it must be an integer 1..k", sub, pos);
            pn[i].position = (uint32_t)pos;
        }
        r->pins = pn;
        r->n_pins = (uint32_t)a->n;
    }
    if ((a = jsonv_get(v, "promotions"))) {
        if (a->type != JSONV_ARRAY)
            return aff__fail(err, AFF_EINVAL, "%s.promotions must be an array", field);
        pipeline_promotion *pr = set_alloc(s, a->n, sizeof *pr);
        if (!pr) return aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
        for (size_t i = 0; i < a->n; i++) {
            const jsonv *nm = jsonv_get(&a->items[i], "name");
            if (!nm || nm->type != JSONV_STRING)
                return aff__fail(err, AFF_EINVAL, "%s.promotions[%zu].name must be a string", field,
                                 i);
            pr[i].name = nm->string;
            snprintf(sub, sizeof sub, "%s.promotions[%zu].filter", field, i);
            if ((rc = json_filter(s, jsonv_get(&a->items[i], "filter"), sub, &pr[i].filter, err)))
                return rc;
            double sh = NAN;
            snprintf(sub, sizeof sub, "%s.promotions[%zu].share", field, i);
            if ((rc = json_number(jsonv_get(&a->items[i], "share"), sub, &sh, err))) return rc;
            pr[i].share = (float)sh;
            snprintf(sub, sizeof sub, "%s.promotions[%zu].audience", field, i);
            if ((rc = json_audience(s, jsonv_get(&a->items[i], "audience"), sub, &pr[i].audience,
                                    err)))
                return rc;
        }
        r->promotions = pr;
        r->n_promotions = (uint32_t)a->n;
    }
    double d = 0;
    if ((a = jsonv_get(v, "max_per_category"))) {
        snprintf(sub, sizeof sub, "%s.max_per_category", field);
        if ((rc = json_number(a, sub, &d, err))) return rc;
        if (!(d >= 0 && d <= AFF_MAX_K && d == floor(d)))
            return aff__fail(err, AFF_EINVAL, "%s is %g; it must be an integer 0..%d", sub, d,
                             AFF_MAX_K);
        r->has_max_per_category = true;
        r->max_per_category = (uint32_t)d;
    }
    if ((a = jsonv_get(v, "diversity"))) {
        snprintf(sub, sizeof sub, "%s.diversity", field);
        if ((rc = json_number(a, sub, &d, err))) return rc;
        r->has_diversity = true;
        r->diversity = (float)d;
    }
    if ((a = jsonv_get(v, "exploration"))) {
        snprintf(sub, sizeof sub, "%s.exploration.share", field);
        d = 0;
        if ((rc = json_number(jsonv_get(a, "share"), sub, &d, err))) return rc;
        r->has_exploration = true;
        r->exploration_share = (float)d;
        snprintf(sub, sizeof sub, "%s.exploration.seed", field);
        d = 0;
        if ((rc = json_number(jsonv_get(a, "seed"), sub, &d, err))) return rc;
        if (!(d >= 0 && d < 18446744073709551616.0))
            return aff__fail(err, AFF_EINVAL, "%s must be a non-negative integer", sub);
        r->exploration_seed = (uint64_t)d;
        snprintf(sub, sizeof sub, "%s.exploration.new_item_age_s", field);
        d = 0;
        if ((rc = json_number(jsonv_get(a, "new_item_age_s"), sub, &d, err))) return rc;
        if (!(d >= 0 && d <= UINT32_MAX && d == floor(d)))
            return aff__fail(err, AFF_EINVAL, "%s must be an integer 0..%u", sub, UINT32_MAX);
        r->exploration_new_age_s = (uint32_t)d;
        snprintf(sub, sizeof sub, "%s.exploration.rarely_shown_below", field);
        d = 0;
        if ((rc = json_number(jsonv_get(a, "rarely_shown_below"), sub, &d, err))) return rc;
        r->exploration_rarely_shown_below = (float)d;
    }
    /* Every rule that does not depend on k is checked now, so a bad file is refused whole. */
    return pipeline_validate_rules(r, AFF_MAX_K, field, err);
}

/* "collections": {name: {"ranked_by": "products"}}: whose profile ranks the collection. */
static int json_collections(preset_set *s, const jsonv *v, const char *path, aff_err *err)
{
    if (v->type != JSONV_OBJECT)
        return aff__fail(err, AFF_EINVAL, "presets file %s: collections must be an object", path);
    s->ranked_names = calloc(v->n ? v->n : 1, sizeof *s->ranked_names);
    s->ranked_by = calloc(v->n ? v->n : 1, sizeof *s->ranked_by);
    if (!s->ranked_names || !s->ranked_by)
        return aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
    for (size_t i = 0; i < v->n; i++) {
        const jsonv *rb = jsonv_get(&v->items[i], "ranked_by");
        if (!rb || rb->type != JSONV_STRING || !rb->string[0] ||
            strlen(rb->string) > AFF_MAX_NAME_LEN)
            return aff__fail(err, AFF_EINVAL,
                             "presets file %s: collections.%s.ranked_by must name a collection",
                             path, v->keys[i]);
        s->ranked_names[s->n_ranked] = v->keys[i];
        s->ranked_by[s->n_ranked++] = rb->string;
    }
    return AFF_OK;
}

/* "layouts": {name: [slot, ...]}; a slot's preset must name a preset of the same file. */
static int json_layouts(preset_set *s, const jsonv *v, const char *path, aff_err *err)
{
    if (v->type != JSONV_OBJECT)
        return aff__fail(err, AFF_EINVAL, "presets file %s: layouts must be an object", path);
    s->n_layouts = v->n;
    s->layout_names = calloc(v->n ? v->n : 1, sizeof *s->layout_names);
    s->layouts = calloc(v->n ? v->n : 1, sizeof *s->layouts);
    s->layout_sizes = calloc(v->n ? v->n : 1, sizeof *s->layout_sizes);
    if (!s->layout_names || !s->layouts || !s->layout_sizes)
        return aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
    for (size_t i = 0; i < v->n; i++) {
        const jsonv *a = &v->items[i];
        s->layout_names[i] = v->keys[i];
        if (a->type != JSONV_ARRAY || a->n < 1 || a->n > PIPELINE_MAX_SLOTS)
            return aff__fail(err, AFF_EINVAL,
                             "presets file %s: layouts.%s must be an array of 1..%d slots", path,
                             v->keys[i], PIPELINE_MAX_SLOTS);
        pipeline_slot *slots = set_alloc(s, a->n, sizeof *slots);
        aff_filter *filters = set_alloc(s, a->n, sizeof *filters);
        if (!slots || !filters) return aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
        for (size_t j = 0; j < a->n; j++) {
            const jsonv *sl = &a->items[j];
            char field[PIPELINE_MAX_NAME_LEN + 64];
            snprintf(field, sizeof field, "layouts.%s[%zu]", v->keys[i], j);
            const jsonv *name = jsonv_get(sl, "name"), *coll = jsonv_get(sl, "collection"),
                        *k = jsonv_get(sl, "k"), *preset = jsonv_get(sl, "preset"),
                        *recipe = jsonv_get(sl, "recipe");
            if (!name || name->type != JSONV_STRING || !coll || coll->type != JSONV_STRING || !k ||
                k->type != JSONV_NUMBER || (preset && preset->type != JSONV_STRING) ||
                (recipe && recipe->type != JSONV_STRING))
                return aff__fail(err, AFF_EINVAL,
                                 "presets file %s: %s needs name, collection (strings), k (a "
                                 "number) and optionally preset, recipe (strings) and filter",
                                 path, field);
            widgets_recipe wr = WIDGETS_RECIPE_PERSONALIZED;
            if (recipe && !widgets_recipe_parse(recipe->string, &wr))
                return aff__fail(err, AFF_EINVAL,
                                 "presets file %s: %s.recipe \"%s\" is unknown; use trending, "
                                 "best_sellers, buy_it_again, recently_viewed or personalized",
                                 path, field, recipe->string);
            if (widgets_recipe_needs_items(wr))
                return aff__fail(err, AFF_EINVAL,
                                 "presets file %s: %s.recipe \"%s\" needs item ids, which a page "
                                 "does not carry (ask Recommend with item_ids)",
                                 path, field, recipe->string);
            char sub[PIPELINE_MAX_NAME_LEN + 80];
            snprintf(sub, sizeof sub, "%s.filter", field);
            int rc = json_filter(s, jsonv_get(sl, "filter"), sub, &filters[j], err);
            if (rc) return rc;
            slots[j] = (pipeline_slot){
                .name = name->string,
                .collection = coll->string,
                .k = k->number >= 1 && k->number <= AFF_MAX_K ? (uint32_t)k->number : 0,
                .filter = &filters[j],
                .preset = preset ? preset->string : NULL,
                .recipe = wr};
            if (!slots[j].k)
                return aff__fail(err, AFF_EINVAL, "presets file %s: %s.k must be 1..%d", path,
                                 field, AFF_MAX_K);
        }
        s->layouts[i] = slots;
        s->layout_sizes[i] = (uint32_t)a->n;
    }
    return AFF_OK;
}

static int presets_load(const char *path, preset_set **out, struct timespec *mtime, aff_err *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return aff__fail(err, AFF_EINVAL, "cannot open the presets file %s: %s", path,
                         strerror(errno));
    struct stat st;
    char *text = NULL;
    int rc = AFF_OK;
    preset_set *s = NULL;
    if (fstat(fileno(f), &st) || st.st_size > (64 << 20)) {
        rc = aff__fail(err, AFF_EINVAL, "presets file %s: unreadable or larger than 64 MiB", path);
        goto out;
    }
    *mtime = st.st_mtim;
    text = malloc((size_t)st.st_size + 1);
    if (!text || fread(text, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
        rc = aff__fail(err, AFF_EINVAL, "cannot read the presets file %s", path);
        goto out;
    }
    s = calloc(1, sizeof *s);
    if (!s) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
        goto out;
    }
    atomic_init(&s->refs, 1);
    aff_err jerr;
    if (jsonv_parse(text, (size_t)st.st_size, &s->tree, &jerr)) {
        rc = aff__fail(err, AFF_EINVAL, "presets file %s: %s", path, jerr.msg);
        goto out;
    }
    const jsonv *presets = jsonv_get(s->tree, "presets");
    if (!presets || presets->type != JSONV_OBJECT) {
        rc = aff__fail(err, AFF_EINVAL,
                       "presets file %s: the top level must be {\"presets\": {name: rules}}", path);
        goto out;
    }
    s->n = presets->n;
    s->names = calloc(s->n ? s->n : 1, sizeof *s->names);
    s->rules = calloc(s->n ? s->n : 1, sizeof *s->rules);
    if (!s->names || !s->rules) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory reading presets");
        goto out;
    }
    for (size_t i = 0; i < s->n; i++) {
        char field[PIPELINE_MAX_NAME_LEN + 32];
        s->names[i] = presets->keys[i];
        size_t len = strlen(s->names[i]);
        if (len < 1 || len > PIPELINE_MAX_NAME_LEN) {
            rc = aff__fail(err, AFF_EINVAL, "presets file %s: preset names must be 1..%d bytes",
                           path, PIPELINE_MAX_NAME_LEN);
            goto out;
        }
        snprintf(field, sizeof field, "presets.%s", s->names[i]);
        if ((rc = json_rules(s, &presets->items[i], field, &s->rules[i], err))) {
            aff_err e2 = *err;
            rc = aff__fail(err, rc, "presets file %s: %s", path, e2.msg);
            goto out;
        }
    }
    const jsonv *colls = jsonv_get(s->tree, "collections");
    if (colls && (rc = json_collections(s, colls, path, err))) goto out;
    const jsonv *layouts = jsonv_get(s->tree, "layouts");
    if (layouts && (rc = json_layouts(s, layouts, path, err))) goto out;
out:
    if (rc)
        preset_set_unref(s);
    else
        *out = s;
    free(text);
    fclose(f);
    return rc;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int pipeline_reload_presets(aff_pipeline *p, aff_err *err)
{
    if (!p->presets_path) return AFF_OK;
    preset_set *s;
    struct timespec mtime;
    int rc = presets_load(p->presets_path, &s, &mtime, err);
    if (rc) return rc;
    pthread_mutex_lock(&p->mu);
    preset_set *old = p->presets;
    p->presets = s;
    p->mtime = mtime;
    pthread_mutex_unlock(&p->mu);
    preset_set_unref(old);
    return AFF_OK;
}

/* The current presets with a reference (NULL when none are configured); re-reads the file
 * when its modification time changed (checked at most once a second). */
static preset_set *presets_acquire(aff_pipeline *p)
{
    if (!p->presets_path) return NULL;
    int64_t now = now_ns();
    bool check = false;
    struct timespec seen;
    pthread_mutex_lock(&p->mu);
    if (now - p->checked_ns >= 1000000000) {
        p->checked_ns = now;
        check = true;
    }
    seen = p->mtime;
    pthread_mutex_unlock(&p->mu);
    if (check) {
        struct stat st;
        if (stat(p->presets_path, &st) == 0 &&
            (st.st_mtim.tv_sec != seen.tv_sec || st.st_mtim.tv_nsec != seen.tv_nsec)) {
            aff_err err;
            if (pipeline_reload_presets(p, &err)) {
                aff_log_kv(AFF_LOG_ERROR, "presets not reloaded; the previous ones stay", "error",
                           err.msg, NULL);
                pthread_mutex_lock(&p->mu);
                p->mtime = st.st_mtim; /* logged once per change of the file */
                pthread_mutex_unlock(&p->mu);
            } else
                aff_log_kv(AFF_LOG_INFO, "presets reloaded", "path", p->presets_path, NULL);
        }
    }
    pthread_mutex_lock(&p->mu);
    preset_set *s = p->presets;
    if (s) atomic_fetch_add(&s->refs, 1);
    pthread_mutex_unlock(&p->mu);
    return s;
}

int pipeline_create(aff_pipeline **out, const pipeline_config *cfg, aff_err *err)
{
    *out = NULL;
    aff_pipeline *p = calloc(1, sizeof *p);
    if (!p) return aff__fail(err, AFF_ENOMEM, "out of memory creating the pipeline");
    p->engine = cfg->engine;
    p->batcher = cfg->batcher;
    p->profiles = cfg->profiles;
    p->model = cfg->model;
    p->outcomes = cfg->outcomes;
    p->exposure = cfg->exposure;
    p->widgets = cfg->widgets;
    pthread_mutex_init(&p->mu, NULL);
    if (cfg->presets_path && cfg->presets_path[0]) {
        if (!(p->presets_path = strdup(cfg->presets_path))) {
            pipeline_destroy(p);
            return aff__fail(err, AFF_ENOMEM, "out of memory creating the pipeline");
        }
        int rc = pipeline_reload_presets(p, err);
        if (rc) {
            pipeline_destroy(p);
            return rc;
        }
        p->checked_ns = now_ns();
    }
    *out = p;
    return AFF_OK;
}

void pipeline_attach_experiments(aff_pipeline *p, aff_experiments *ex)
{
    p->experiments = ex;
}

void pipeline_destroy(aff_pipeline *p)
{
    if (!p) return;
    preset_set_unref(p->presets);
    pthread_mutex_destroy(&p->mu);
    free(p->presets_path);
    free(p);
}

/* ---- rules: validation and merging --------------------------------------------------------- */

static bool filter_is_set(const aff_filter *f)
{
    return f->n_categories || f->n_tags || f->n_exclude_categories || f->n_exclude_tags ||
           f->n_exclude_ids || f->available_only || f->price_min != -INFINITY ||
           f->price_max != INFINITY;
}

static uint32_t slots_of(float share, uint32_t k)
{
    return (uint32_t)floor((double)share * k + 0.5);
}

void pipeline_audience_init(pipeline_audience *a)
{
    *a = (pipeline_audience){.min_price_sensitivity = 0.0f,
                             .max_price_sensitivity = 1.0f,
                             .from_hour = -1,
                             .to_hour = -1};
}

static int validate_audience(const pipeline_audience *a, const char *field, const char *what,
                             uint32_t i, aff_err *err)
{
    if (!a) return AFF_OK;
    const struct {
        const char *name;
        float v;
    } unit[] = {{"min_price_sensitivity", a->min_price_sensitivity},
                {"max_price_sensitivity", a->max_price_sensitivity},
                {"min_loyalty", a->min_loyalty},
                {"min_purchase_intent", a->min_purchase_intent}};
    for (size_t u = 0; u < sizeof unit / sizeof unit[0]; u++)
        if (!(unit[u].v >= 0.0f && unit[u].v <= 1.0f))
            return aff__fail(err, AFF_EINVAL, "%s.%s[%u].audience.%s = %g is outside 0..1", field,
                             what, i, unit[u].name, (double)unit[u].v);
    if (a->min_price_sensitivity > a->max_price_sensitivity)
        return aff__fail(err, AFF_EINVAL,
                         "%s.%s[%u].audience.min_price_sensitivity is above max_price_sensitivity",
                         field, what, i);
    if (!(a->min_activity >= 0.0f && isfinite(a->min_activity)))
        return aff__fail(err, AFF_EINVAL, "%s.%s[%u].audience.min_activity must be >= 0", field,
                         what, i);
    if (a->from_hour < -1 || a->from_hour > 23 || a->to_hour < -1 || a->to_hour > 23 ||
        (a->from_hour < 0) != (a->to_hour < 0))
        return aff__fail(err, AFF_EINVAL,
                         "%s.%s[%u].audience.from_hour/to_hour must both be 0..23 (or both unset)",
                         field, what, i);
    return AFF_OK;
}

int pipeline_validate_rules(const pipeline_rules *r, uint32_t k, const char *field, aff_err *err)
{
    if (!r) return AFF_OK;
    int arc;
    for (uint32_t i = 0; i < r->n_boosts && i < PIPELINE_MAX_BOOSTS; i++)
        if ((arc = validate_audience(r->boosts[i].audience, field, "boosts", i, err))) return arc;
    for (uint32_t i = 0; i < r->n_promotions && i < PIPELINE_MAX_PROMOTIONS; i++)
        if ((arc = validate_audience(r->promotions[i].audience, field, "promotions", i, err)))
            return arc;
    if (r->n_boosts > PIPELINE_MAX_BOOSTS)
        return aff__fail(err, AFF_EINVAL, "%s.boosts has %u entries; at most %d", field,
                         r->n_boosts, PIPELINE_MAX_BOOSTS);
    for (uint32_t i = 0; i < r->n_boosts; i++) {
        if (!isfinite(r->boosts[i].weight))
            return aff__fail(err, AFF_EINVAL, "%s.boosts[%u].weight must be a finite number", field,
                             i);
        if (!filter_is_set(&r->boosts[i].filter))
            return aff__fail(err, AFF_EINVAL,
                             "%s.boosts[%u].filter is empty; a boost needs a filter saying "
                             "which items it lifts or buries",
                             field, i);
    }
    if (r->n_pins > PIPELINE_MAX_PINS || r->n_pins > k)
        return aff__fail(err, AFF_EINVAL, "%s.pins has %u entries; at most min(k = %u, %d)", field,
                         r->n_pins, k, PIPELINE_MAX_PINS);
    for (uint32_t i = 0; i < r->n_pins; i++) {
        const pipeline_pin *pn = &r->pins[i];
        size_t len = pn->item_id ? strnlen(pn->item_id, AFF_MAX_ID_LEN + 1) : 0;
        if (len < 1 || len > AFF_MAX_ID_LEN)
            return aff__fail(err, AFF_EINVAL, "%s.pins[%u].item_id must be 1..%d bytes", field, i,
                             AFF_MAX_ID_LEN);
        if (pn->position < 1 || pn->position > k)
            return aff__fail(err, AFF_EINVAL, "%s.pins[%u].position = %u is outside 1..k (k = %u)",
                             field, i, pn->position, k);
        for (uint32_t j = 0; j < i; j++) {
            if (r->pins[j].position == pn->position)
                return aff__fail(err, AFF_EINVAL,
                                 "%s.pins[%u].position = %u is already taken by pins[%u]", field, i,
                                 pn->position, j);
            if (strcmp(r->pins[j].item_id, pn->item_id) == 0)
                return aff__fail(err, AFF_EINVAL,
                                 "%s.pins[%u].item_id \"%s\" is already pinned by pins[%u]", field,
                                 i, pn->item_id, j);
        }
    }
    if (r->n_promotions > PIPELINE_MAX_PROMOTIONS)
        return aff__fail(err, AFF_EINVAL, "%s.promotions has %u entries; at most %d", field,
                         r->n_promotions, PIPELINE_MAX_PROMOTIONS);
    double total = 0;
    uint32_t reserved = r->n_pins;
    for (uint32_t i = 0; i < r->n_promotions; i++) {
        const pipeline_promotion *pr = &r->promotions[i];
        size_t len = pr->name ? strnlen(pr->name, PIPELINE_MAX_NAME_LEN + 1) : 0;
        if (len < 1 || len > PIPELINE_MAX_NAME_LEN)
            return aff__fail(err, AFF_EINVAL, "%s.promotions[%u].name must be 1..%d bytes", field,
                             i, PIPELINE_MAX_NAME_LEN);
        if (!(pr->share > 0.0f && pr->share <= 1.0f))
            return aff__fail(err, AFF_EINVAL, "%s.promotions[%u].share = %g is outside (0, 1]",
                             field, i, (double)pr->share);
        if (!filter_is_set(&pr->filter))
            return aff__fail(err, AFF_EINVAL,
                             "%s.promotions[%u].filter is empty; a promotion needs a filter "
                             "saying which items it promotes",
                             field, i);
        total += pr->share;
        reserved += slots_of(pr->share, k);
    }
    if (r->has_diversity && !(r->diversity >= 0.0f && r->diversity <= 1.0f))
        return aff__fail(err, AFF_EINVAL, "%s.diversity = %g is outside 0..1", field,
                         (double)r->diversity);
    if (r->has_exploration) {
        if (!(r->exploration_share >= 0.0f && r->exploration_share <= 1.0f))
            return aff__fail(err, AFF_EINVAL, "%s.exploration.share = %g is outside 0..1", field,
                             (double)r->exploration_share);
        if (!(r->exploration_rarely_shown_below >= 0.0f &&
              isfinite(r->exploration_rarely_shown_below)))
            return aff__fail(err, AFF_EINVAL,
                             "%s.exploration.rarely_shown_below = %g must be a finite number >= 0",
                             field, (double)r->exploration_rarely_shown_below);
        total += r->exploration_share;
        reserved += slots_of(r->exploration_share, k);
    }
    if (total > 1.0 + 1e-6)
        return aff__fail(err, AFF_EINVAL,
                         "%s: promotion and exploration shares add up to %g; at most 1", field,
                         total);
    if (reserved > k)
        return aff__fail(err, AFF_EINVAL,
                         "%s: pins, promotions and exploration reserve %u slots; k is %u", field,
                         reserved, k);
    return AFF_OK;
}

/* The request's rules over the preset's: lists concatenated (preset first), scalars from the
 * request when set there. Arrays are allocated into *owned (free each). */
static int merge_rules(const pipeline_rules *preset, const pipeline_rules *req, pipeline_rules *out,
                       void *owned[3], aff_err *err)
{
    static const pipeline_rules none = {0};
    if (!preset) preset = &none;
    if (!req) req = &none;
    *out = *preset;
#define CAT(arr, cnt, slot)                                                                        \
    if (preset->cnt && req->cnt) {                                                                 \
        size_t n = (size_t)preset->cnt + req->cnt;                                                 \
        void *a = malloc(n * sizeof *preset->arr);                                                 \
        if (!a) return aff__fail(err, AFF_ENOMEM, "out of memory merging rules");                  \
        memcpy(a, preset->arr, preset->cnt * sizeof *preset->arr);                                 \
        memcpy((char *)a + preset->cnt * sizeof *preset->arr, req->arr,                            \
               req->cnt * sizeof *preset->arr);                                                    \
        owned[slot] = a;                                                                           \
        out->arr = a;                                                                              \
        out->cnt = (uint32_t)n;                                                                    \
    } else if (req->cnt) {                                                                         \
        out->arr = req->arr;                                                                       \
        out->cnt = req->cnt;                                                                       \
    }
    CAT(boosts, n_boosts, 0)
    CAT(pins, n_pins, 1)
    CAT(promotions, n_promotions, 2)
#undef CAT
    if (req->has_max_per_category) {
        out->has_max_per_category = true;
        out->max_per_category = req->max_per_category;
    }
    if (req->has_diversity) {
        out->has_diversity = true;
        out->diversity = req->diversity;
    }
    if (req->has_exploration) {
        out->has_exploration = true;
        out->exploration_share = req->exploration_share;
        out->exploration_seed = req->exploration_seed;
        out->exploration_new_age_s = req->exploration_new_age_s;
        out->exploration_rarely_shown_below = req->exploration_rarely_shown_below;
    }
    return AFF_OK;
}

/* ---- ranking --------------------------------------------------------------------------------- */

/* Copies id into dst[cap] (the same truncation as snprintf "%s", without its cost). */
static void copy_id(char *dst, size_t cap, const char *id)
{
    size_t len = strnlen(id, cap - 1);
    memcpy(dst, id, len);
    dst[len] = 0;
}

/* FNV-1a of an id: equal ids, equal hashes (a cheap first test before strcmp). */
static uint64_t id_hash(const char *s)
{
    uint64_t h = 1469598103934665603u;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211u;
    return h;
}

typedef struct rank_ctx {
    const pipeline_rank_input *in;
    float *good;     /* adjusted score, higher better */
    float *adj;      /* adjusted score in the metric's sense */
    uint8_t *state;  /* 0 free, 1 chosen, 2 blocked (pinned id) */
    uint32_t *order; /* candidates by good, descending */
    uint32_t *cat_ids, *cat_counts;
    uint32_t n_cats;
} rank_ctx;

static int cmp_good_desc(const void *a, const void *b, void *ctx)
{
    const float *g = ctx;
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    if (g[x] != g[y]) return g[x] > g[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

static uint32_t *cat_slot(rank_ctx *c, uint32_t cat)
{
    for (uint32_t i = 0; i < c->n_cats; i++)
        if (c->cat_ids[i] == cat) return &c->cat_counts[i];
    return NULL;
}

static bool can_take(rank_ctx *c, uint32_t i)
{
    const pipeline_rank_input *in = c->in;
    if (c->state[i] || !(in->cands[i].matches & 1u)) return false;
    uint32_t cap = in->rules->has_max_per_category ? in->rules->max_per_category : 0;
    if (!cap || !in->cands[i].category) return true;
    uint32_t *cnt = cat_slot(c, in->cands[i].category);
    return !cnt || *cnt < cap;
}

static void take(rank_ctx *c, uint32_t i)
{
    c->state[i] = 1;
    uint32_t cat = c->in->cands[i].category;
    if (!cat) return;
    uint32_t *cnt = cat_slot(c, cat);
    if (cnt) {
        (*cnt)++;
    } else {
        c->cat_ids[c->n_cats] = cat;
        c->cat_counts[c->n_cats++] = 1;
    }
}

/* The dot product of a and b as four interleaved float sums (lane l adds the products of
 * j = l mod 4 in order; then (l0 + l1) + (l2 + l3)): reasons and diversity rank by this exact
 * value. Four-lane vectors compute the same sums with a quarter of the instructions, so the
 * independent calls of a loop overlap (reasons and MMR were most of the pipeline's own CPU). */
typedef float f32x4 __attribute__((vector_size(16)));

static float cos_sim(const float *a, const float *b, uint32_t dim)
{
    f32x4 s = {0.0f, 0.0f, 0.0f, 0.0f};
    uint32_t j = 0;
    for (; j + 4 <= dim; j += 4) {
        f32x4 x, y;
        memcpy(&x, a + j, sizeof x);
        memcpy(&y, b + j, sizeof y);
        s += x * y;
    }
    float s0 = s[0];
    for (; j < dim; j++)
        s0 += a[j] * b[j];
    return (s0 + s[1]) + (s[2] + s[3]);
}

#if defined(__x86_64__) || defined(__i386__)
/* cos_sim's tail and final sum for one row whose four lane sums are s[0..3]. */
static float dot_finish(const float *s, const float *a, const float *b, uint32_t from, uint32_t dim)
{
    float s0 = s[0];
    for (uint32_t j = from; j < dim; j++)
        s0 += a[j] * b[j];
    return (s0 + s[1]) + (s[2] + s[3]);
}

/* dots() with AVX: one 256-bit register holds two rows' four lane sums (lanes 0..3 row t,
 * 4..7 row t + 1), each lane adding the same products in the same order as cos_sim (a
 * multiply, then an add: no fused multiply-add), so every value is bit-identical; a's four
 * values are loaded once for eight rows. */
__attribute__((target("avx"))) static void dots_avx(const float *a, const float *const *b,
                                                    uint32_t m, uint32_t dim, float *out)
{
    const uint32_t d4 = dim & ~3u;
    float s[8];
    uint32_t t = 0;
    for (; t + 8 <= m; t += 8) {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        const float *const *r = b + t;
        for (uint32_t j = 0; j < d4; j += 4) {
            __m128 x4 = _mm_loadu_ps(a + j);
            __m256 x = _mm256_insertf128_ps(_mm256_castps128_ps256(x4), x4, 1);
#define ROWS2(p, q)                                                                                \
    _mm256_mul_ps(x, _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(r[p] + j)),          \
                                          _mm_loadu_ps(r[q] + j), 1))
            s0 = _mm256_add_ps(s0, ROWS2(0, 1));
            s1 = _mm256_add_ps(s1, ROWS2(2, 3));
            s2 = _mm256_add_ps(s2, ROWS2(4, 5));
            s3 = _mm256_add_ps(s3, ROWS2(6, 7));
        }
        const __m256 acc[4] = {s0, s1, s2, s3};
        for (int p = 0; p < 4; p++) {
            _mm256_storeu_ps(s, acc[p]);
            out[t + 2 * p] = dot_finish(s, a, r[2 * p], d4, dim);
            out[t + 2 * p + 1] = dot_finish(s + 4, a, r[2 * p + 1], d4, dim);
        }
    }
    for (; t + 2 <= m; t += 2) {
        __m256 s0 = _mm256_setzero_ps();
        const float *const *r = b + t;
        for (uint32_t j = 0; j < d4; j += 4) {
            __m128 x4 = _mm_loadu_ps(a + j);
            __m256 x = _mm256_insertf128_ps(_mm256_castps128_ps256(x4), x4, 1);
            s0 = _mm256_add_ps(s0, ROWS2(0, 1));
        }
#undef ROWS2
        _mm256_storeu_ps(s, s0);
        out[t] = dot_finish(s, a, r[0], d4, dim);
        out[t + 1] = dot_finish(s + 4, a, r[1], d4, dim);
    }
    for (; t < m; t++)
        out[t] = cos_sim(a, b[t], dim);
}
#endif

/* out[t] = cos_sim(a, b[t], dim) for t < m (bit-identical), as a blocked product where the
 * CPU has AVX. */
static void dots(const float *a, const float *const *b, uint32_t m, uint32_t dim, float *out)
{
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("avx")) {
        dots_avx(a, b, m, dim, out);
        return;
    }
#endif
    for (uint32_t t = 0; t < m; t++)
        out[t] = cos_sim(a, b[t], dim);
}

/* Rows packed in pairs for dots_packed: pair p's four-value chunk c holds rows 2p and 2p + 1
 * side by side (8 floats at (p * chunks + c) * 8; an odd last row is paired with zeros). */
static void pack_pairs(const float *const *rows, uint32_t m, uint32_t dim, float *packed)
{
    const uint32_t chunks = dim / 4;
    for (uint32_t p = 0; p < (m + 1) / 2; p++)
        for (uint32_t c = 0; c < chunks; c++) {
            float *o = packed + ((size_t)p * chunks + c) * 8;
            memcpy(o, rows[2 * p] + 4 * c, 4 * sizeof *o);
            if (2 * p + 1 < m)
                memcpy(o + 4, rows[2 * p + 1] + 4 * c, 4 * sizeof *o);
            else
                memset(o + 4, 0, 4 * sizeof *o);
        }
}

#if defined(__x86_64__) || defined(__i386__)
/* dots_avx over rows packed by pack_pairs: a row pair is one 256-bit load (reused for every a
 * a caller passes), the same lanes and order, so again bit-identical to cos_sim. */
__attribute__((target("avx"))) static void dots_packed_avx(const float *a, const float *packed,
                                                           const float *const *rows, uint32_t m,
                                                           uint32_t dim, float *out)
{
    const uint32_t chunks = dim / 4, d4 = dim & ~3u, pairs = (m + 1) / 2;
    float s[8];
    uint32_t p = 0;
    for (; p + 4 <= pairs; p += 4) {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        const float *b = packed + (size_t)p * chunks * 8;
        const size_t step = (size_t)chunks * 8;
        for (uint32_t c = 0; c < chunks; c++) {
            __m128 x4 = _mm_loadu_ps(a + 4 * c);
            __m256 x = _mm256_insertf128_ps(_mm256_castps128_ps256(x4), x4, 1);
            const float *bc = b + (size_t)c * 8;
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(x, _mm256_loadu_ps(bc)));
            s1 = _mm256_add_ps(s1, _mm256_mul_ps(x, _mm256_loadu_ps(bc + step)));
            s2 = _mm256_add_ps(s2, _mm256_mul_ps(x, _mm256_loadu_ps(bc + 2 * step)));
            s3 = _mm256_add_ps(s3, _mm256_mul_ps(x, _mm256_loadu_ps(bc + 3 * step)));
        }
        const __m256 acc[4] = {s0, s1, s2, s3};
        for (uint32_t q = 0; q < 4; q++) {
            uint32_t t = 2 * (p + q);
            _mm256_storeu_ps(s, acc[q]);
            out[t] = dot_finish(s, a, rows[t], d4, dim);
            if (t + 1 < m) out[t + 1] = dot_finish(s + 4, a, rows[t + 1], d4, dim);
        }
    }
    for (; p < pairs; p++) {
        __m256 s0 = _mm256_setzero_ps();
        const float *b = packed + (size_t)p * chunks * 8;
        for (uint32_t c = 0; c < chunks; c++) {
            __m128 x4 = _mm_loadu_ps(a + 4 * c);
            __m256 x = _mm256_insertf128_ps(_mm256_castps128_ps256(x4), x4, 1);
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(x, _mm256_loadu_ps(b + (size_t)c * 8)));
        }
        uint32_t t = 2 * p;
        _mm256_storeu_ps(s, s0);
        out[t] = dot_finish(s, a, rows[t], d4, dim);
        if (t + 1 < m) out[t + 1] = dot_finish(s + 4, a, rows[t + 1], d4, dim);
    }
}
#endif

/* out[t] = cos_sim(a, rows[t], dim) for t < m (bit-identical); packed: pack_pairs(rows) when
 * the CPU has AVX, else unused. */
static void dots_packed(const float *a, const float *packed, const float *const *rows, uint32_t m,
                        uint32_t dim, float *out)
{
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("avx")) {
        dots_packed_avx(a, packed, rows, m, dim, out);
        return;
    }
#endif
    (void)packed;
    for (uint32_t t = 0; t < m; t++)
        out[t] = cos_sim(a, rows[t], dim);
}

/* The next bytes of a block carved into arrays (callers keep each array's alignment). */
static void *carve(char **at, size_t bytes)
{
    void *p = *at;
    *at += bytes;
    return p;
}

typedef struct picked {
    uint32_t cand;
    pipeline_reason_kind kind;
    const char *promotion;
} picked;

/* Draws up to want exploration items uniformly from pool[0..np) (consumed) while slots
 * remain; returns how many were taken. */
static uint32_t explore_draw(rank_ctx *c, uint32_t *pool, uint32_t np, aff_rng *rng, uint32_t want,
                             uint32_t slots, picked *reserved, uint32_t *n_res, uint32_t n_org)
{
    uint32_t got = 0;
    while (got < want && np && *n_res + n_org < slots) {
        uint32_t at = (uint32_t)(aff_rng_next(rng) % np);
        uint32_t i = pool[at];
        pool[at] = pool[--np];
        if (!can_take(c, i)) continue;
        take(c, i);
        reserved[(*n_res)++] = (picked){i, PIPELINE_REASON_EXPLORATION, NULL};
        got++;
    }
    return got;
}

int pipeline_rank(const pipeline_rank_input *in, pipeline_hit *out, uint32_t *n_out, aff_err *err)
{
    *n_out = 0;
    const pipeline_rules *r = in->rules;
    uint32_t n = in->n, k = in->k;
    rank_ctx c = {.in = in};
    const size_t nn = n ? n : 1, kk = (size_t)k + 1, pool_max = 3 * (size_t)k + 10;
    /* One allocation for every array (pointer-sized ones first, then 4-byte ones, bytes last):
     * MMR's rows (pool_max), organic, reserved (kk); good, adj, maxsim, order, pool (nn);
     * cat_ids, cat_counts (kk); sims, at (pool_max); state (nn) */
    const size_t bytes = pool_max * sizeof(const float *) + 2 * kk * sizeof(picked) +
                         5 * nn * sizeof(float) + 2 * kk * sizeof(uint32_t) +
                         2 * pool_max * sizeof(float) + nn;
    char *mem = malloc(bytes), *at_mem = mem;
    if (!mem) return aff__fail(err, AFF_ENOMEM, "out of memory ranking %u candidates", n);
#define CARVE(type, count) ((type *)carve(&at_mem, (count) * sizeof(type)))
    const float **rows = CARVE(const float *, pool_max);
    picked *organic = CARVE(picked, kk);
    picked *reserved = CARVE(picked, kk);
    c.good = CARVE(float, nn);
    c.adj = CARVE(float, nn);
    float *maxsim = CARVE(float, nn);
    c.order = CARVE(uint32_t, nn);
    uint32_t *pool = CARVE(uint32_t, nn);
    c.cat_ids = CARVE(uint32_t, kk);
    c.cat_counts = CARVE(uint32_t, kk);
    float *sims = CARVE(float, pool_max);
    uint32_t *sim_at = CARVE(uint32_t, pool_max);
    c.state = CARVE(uint8_t, nn);
#undef CARVE
    memset(c.state, 0, nn);
    float sign = in->lower_is_better ? -1.0f : 1.0f;
    for (uint32_t i = 0; i < n; i++) {
        float boost = 0;
        for (uint32_t b = 0; b < r->n_boosts; b++)
            if (in->cands[i].matches & ((uint64_t)1 << (1 + b))) boost += r->boosts[b].weight;
        c.adj[i] = in->cands[i].score + sign * boost;
        c.good[i] = sign * c.adj[i];
        c.order[i] = i;
        for (uint32_t p = 0; p < r->n_pins; p++)
            if (in->pinned[p] && strcmp(in->pinned[p]->id, in->cands[i].id) == 0) c.state[i] = 2;
    }
    if (n <= 64) { /* the usual pool: an insertion sort, the same order as cmp_good_desc's */
        for (uint32_t a = 1; a < n; a++) {
            uint32_t t = c.order[a], b = a;
            while (b > 0 && cmp_good_desc(&c.order[b - 1], &t, c.good) > 0) {
                c.order[b] = c.order[b - 1];
                b--;
            }
            c.order[b] = t;
        }
    } else {
        qsort_r(c.order, n, sizeof *c.order, cmp_good_desc, c.good);
    }

    uint32_t n_pins = 0;
    for (uint32_t p = 0; p < r->n_pins; p++)
        n_pins += in->pinned[p] != NULL;
    uint32_t slots = k > n_pins ? k - n_pins : 0;
    uint32_t n_res = 0, n_org = 0;

    /* 1. promotions */
    for (uint32_t j = 0; j < r->n_promotions; j++) {
        uint32_t want = slots_of(r->promotions[j].share, k), got = 0;
        uint64_t bit = (uint64_t)1 << (1 + r->n_boosts + j);
        for (uint32_t o = 0; o < n && got < want && n_res + n_org < slots; o++) {
            uint32_t i = c.order[o];
            if (!(in->cands[i].matches & bit) || !can_take(&c, i)) continue;
            take(&c, i);
            reserved[n_res++] = (picked){i, PIPELINE_REASON_PROMOTED, r->promotions[j].name};
            got++;
        }
    }
    /* 2. organic, by MMR (lambda 0: score order) */
    uint32_t x = r->has_exploration ? slots_of(r->exploration_share, k) : 0;
    uint32_t organic_target = slots > n_res + x ? slots - n_res - x : 0;
    float lambda = r->has_diversity ? r->diversity : 0.0f;
    if (lambda > 0.0f && in->dim) {
        /* MMR looks at the best 3k + 10 organic candidates (the rest fill in
         * score order below if needed): O(k * pool * d) work. */
        uint32_t pool_n = 0;
        float gmin = INFINITY, gmax = -INFINITY;
        for (uint32_t o = 0; o < n && pool_n < pool_max; o++) {
            uint32_t i = c.order[o];
            if (!in->cands[i].organic) continue;
            pool[pool_n++] = i;
            gmin = fminf(gmin, c.good[i]);
            gmax = fmaxf(gmax, c.good[i]);
        }
        float range = gmax > gmin ? gmax - gmin : 1.0f;
        /* the reserved items' vectors (n_res <= k < pool_max rows) against each pool item:
         * the same similarities, folded by fmaxf in the same order */
        uint32_t n_rv = 0;
        for (uint32_t q = 0; q < n_res; q++)
            if (in->cands[reserved[q].cand].vector)
                rows[n_rv++] = in->cands[reserved[q].cand].vector;
        for (uint32_t p = 0; p < pool_n; p++) {
            uint32_t i = pool[p];
            maxsim[i] = -INFINITY;
            if (!in->cands[i].vector || !n_rv) continue;
            dots(in->cands[i].vector, rows, n_rv, in->dim, sims);
            for (uint32_t q = 0; q < n_rv; q++)
                maxsim[i] = fmaxf(maxsim[i], sims[q]);
        }
        while (n_org < organic_target) {
            uint32_t best = UINT32_MAX;
            float best_v = -INFINITY;
            for (uint32_t p = 0; p < pool_n; p++) {
                uint32_t i = pool[p];
                if (!can_take(&c, i)) continue;
                float rel = (c.good[i] - gmin) / range;
                float sim = maxsim[i] == -INFINITY ? 0.0f : maxsim[i];
                float v = (1.0f - lambda) * rel - lambda * sim;
                if (v > best_v) {
                    best_v = v;
                    best = i;
                }
            }
            if (best == UINT32_MAX) break;
            take(&c, best);
            organic[n_org++] = (picked){best, in->organic_reason, NULL};
            const float *bv = in->cands[best].vector;
            uint32_t nr = 0;
            for (uint32_t p = 0; bv && p < pool_n; p++) {
                uint32_t i = pool[p];
                if (c.state[i] == 0 && in->cands[i].vector) {
                    sim_at[nr] = i;
                    rows[nr++] = in->cands[i].vector;
                }
            }
            dots(bv, rows, nr, in->dim, sims);
            for (uint32_t t = 0; t < nr; t++)
                maxsim[sim_at[t]] = fmaxf(maxsim[sim_at[t]], sims[t]);
        }
    } else {
        for (uint32_t o = 0; o < n && n_org < organic_target; o++) {
            uint32_t i = c.order[o];
            if (!in->cands[i].organic || !can_take(&c, i)) continue;
            take(&c, i);
            organic[n_org++] = (picked){i, in->organic_reason, NULL};
        }
    }
    /* 3. exploration: uniform draws from the candidates not chosen, novel ones first */
    if (x) {
        uint32_t np = 0, n1 = 0;
        for (int tier = 0; tier < 2; tier++)
            for (uint32_t i = 0; i < n; i++) {
                const pipeline_candidate *cd = &in->cands[i];
                bool novel = in->favour_novel && cd->novelty;
                if ((cd->organic || cd->explorable) && (tier == 0) == novel && can_take(&c, i))
                    pool[np++] = i;
                if (tier == 0) n1 = np;
            }
        aff_rng rng = {in->seed};
        uint32_t got = 0;
        got += explore_draw(&c, pool, n1, &rng, x - got, slots, reserved, &n_res, n_org);
        got += explore_draw(&c, pool + n1, np - n1, &rng, x - got, slots, reserved, &n_res, n_org);
    }
    /* Slots still empty (too few promoted or exploration items): the next organic ones. */
    for (uint32_t o = 0; o < n && n_res + n_org < slots; o++) {
        uint32_t i = c.order[o];
        if (!in->cands[i].organic || !can_take(&c, i)) continue;
        take(&c, i);
        organic[n_org++] = (picked){i, in->organic_reason, NULL};
    }
    /* The candidates ran out under the cap: it gives way rather than leave slots empty. */
    for (uint32_t o = 0; in->relax_cap && o < n && n_res + n_org < slots; o++) {
        uint32_t i = c.order[o];
        if (!in->cands[i].organic || c.state[i] || !(in->cands[i].matches & 1u)) continue;
        take(&c, i);
        organic[n_org++] = (picked){i, in->organic_reason, NULL};
    }
    /* 4. merge reserved items (by adjusted score) into the organic order */
    for (uint32_t a = 1; a < n_res; a++) { /* insertion sort, stable, descending */
        picked t = reserved[a];
        uint32_t b = a;
        while (b > 0 && c.good[reserved[b - 1].cand] < c.good[t.cand]) {
            reserved[b] = reserved[b - 1];
            b--;
        }
        reserved[b] = t;
    }
    uint32_t m = 0, io = 0, ir = 0;
    while (io < n_org || ir < n_res) {
        picked pk;
        if (ir < n_res && (io == n_org || c.good[reserved[ir].cand] > c.good[organic[io].cand]))
            pk = reserved[ir++];
        else
            pk = organic[io++];
        pipeline_hit *h = &out[m++];
        const pipeline_candidate *cd = &in->cands[pk.cand];
        copy_id(h->id, sizeof h->id, cd->id);
        h->score = c.adj[pk.cand];
        h->reason = (pipeline_reason){.kind = pk.kind, .promotion = pk.promotion};
        if (pk.kind == in->organic_reason && in->organic_related)
            copy_id(h->reason.related_id, sizeof h->reason.related_id, in->organic_related);
    }
    /* 5. pins at their positions, ascending */
    for (uint32_t pos = 1; pos <= k; pos++) {
        for (uint32_t p = 0; p < r->n_pins; p++) {
            const pipeline_candidate *cd = in->pinned[p];
            if (r->pins[p].position != pos || !cd) continue;
            uint32_t at = pos - 1 < m ? pos - 1 : m;
            memmove(&out[at + 1], &out[at], (m - at) * sizeof *out);
            pipeline_hit *h = &out[at];
            copy_id(h->id, sizeof h->id, cd->id);
            float boost = 0;
            for (uint32_t b = 0; b < r->n_boosts; b++)
                if (cd->matches & ((uint64_t)1 << (1 + b))) boost += r->boosts[b].weight;
            h->score = cd->score + sign * boost;
            h->reason = (pipeline_reason){.kind = PIPELINE_REASON_PINNED};
            m++;
        }
    }
    *n_out = m < k ? m : k;
    free(mem);
    return AFF_OK;
}

/* ---- jobs ------------------------------------------------------------------------------------ */

struct pipeline_job {
    pipeline_output out; /* first: what the caller reads */
    aff_pipeline *p;
    const pipeline_request *req; /* &eff */
    pipeline_request eff;        /* the caller's request with an experiment arm applied */
    bool has_arm;
    experiments_assignment assign;
    pipeline_done_fn done;
    void *user;
    preset_set *presets;  /* referenced while the merged rules borrow from it */
    void *owned_rules[5]; /* merged boosts, pins, promotions; audience-filtered boosts, promos */
    pipeline_rules rules; /* merged, validated */
    bool ranked;          /* any rule, diversity or exploration: over-fetch and rank */
    uint32_t k, kq, kpromo;
    uint32_t n_groups, per_group; /* engine queries per group: 1 + promotions */
    uint32_t deepened; /* times the organic queries ran again, 4x deeper, as rules starved */
    aff_metric metric;
    uint32_t dim;
    /* The vectors candidates are compared in (pins' scores, diversity): the collection's own,
     * or, when the model answers, its behaviour space's (vdim floats, inner product). */
    const char *vcoll;
    uint32_t vdim;
    aff_metric vmetric;
    profiles_plan plan;
    bool has_plan;
    pipeline_user_source src;
    const float *qvec;      /* the query vector (NULL for SIMILAR and POPULARITY) */
    const aff_filter *base; /* the request's filter with the shopper's exclusions */
    aff_filter *promo_filters;
    const char **promo_excl;
    void *block; /* owns promo_filters .. n_hits (plan_search) or qerrs (Rerank) */
    aff_query *queries;
    aff_hit *cand;
    uint32_t *cand_n;
    size_t *cand_off;
    aff_err *qerrs;
    batcher_request br;
    pipeline_hit *hits;
    const pipeline_hit **hit_ptrs;
    uint32_t *n_hits;
    /* RERANK */
    aff_rerank_query rq;
    aff_rerank_hit *rerank_out;
    pipeline_reason *rerank_reasons;
    /* a widget recipe: its candidates (reasons' related ids come from them) */
    widgets_result widget;
};

/* Engine query q (0: organic, 1 + j: promotion j) of group g. A group's queries lie side by
 * side: they share the vector, so the engine scores it once for all of them. */
static size_t qidx(const pipeline_job *j, uint32_t g, uint32_t q)
{
    return (size_t)g * j->per_group + q;
}

/* The group of engine query i. */
static uint32_t group_of(const pipeline_job *j, size_t i)
{
    return (uint32_t)(i / j->per_group);
}

const pipeline_output *pipeline_job_output(const pipeline_job *job)
{
    return &job->out;
}

void pipeline_job_destroy(pipeline_job *j)
{
    if (!j) return;
    if (j->has_plan) profiles_plan_release(&j->plan);
    free(j->src.vector);
    for (int i = 0; i < 5; i++)
        free(j->owned_rules[i]);
    preset_set_unref(j->presets);
    free(j->block);
    free(j->cand);
    free(j->rerank_out);
    free(j->rerank_reasons);
    widgets_result_release(&j->widget);
    free(j);
}

static void recommendation_id(char out[33])
{
    uint8_t b[16];
    if (getrandom(b, sizeof b, GRND_NONBLOCK) != (ssize_t)sizeof b) {
        /* No entropy yet (early boot): unique enough from the clock and a counter. */
        static atomic_uint_fast64_t counter;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        aff_rng r = {(uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec +
                     (atomic_fetch_add(&counter, 1) << 40)};
        uint64_t a = aff_rng_next(&r), c = aff_rng_next(&r);
        memcpy(b, &a, 8);
        memcpy(b + 8, &c, 8);
    }
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hex[b[i] >> 4];
        out[2 * i + 1] = hex[b[i] & 15];
    }
    out[32] = 0;
}

/* The popularity-weighted mean of the vectors of collection's most popular items (*out NULL
 * when nothing has events). */
static int crowd_vector(aff_pipeline *p, const char *collection, uint32_t dim, float **out,
                        aff_err *err)
{
    enum { N_POP = 32 };
    *out = NULL;
    aff_hit pop[N_POP];
    uint32_t np = 0;
    int rc = profiles_popular(p->profiles, collection, N_POP, NULL, pop, &np, err);
    if (rc || !np) return rc;
    const char *ids[N_POP];
    engine_item_class cls[N_POP];
    float *vec = malloc((size_t)np * dim * sizeof *vec), *sum = calloc(dim, sizeof *sum);
    if (!vec || !sum) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory reading popular items");
        goto out;
    }
    for (uint32_t i = 0; i < np; i++)
        ids[i] = pop[i].id;
    if ((rc = engine_classify_items(p->engine, collection, ids, np, NULL, 0, cls, vec, err)))
        goto out;
    double norm = 0;
    for (uint32_t i = 0; i < np; i++)
        for (uint32_t d = 0; cls[i].found && d < dim; d++)
            sum[d] += pop[i].score * vec[(size_t)i * dim + d];
    for (uint32_t d = 0; d < dim; d++)
        norm += (double)sum[d] * sum[d];
    if (norm > 0 && isfinite(norm)) {
        *out = sum;
        sum = NULL;
    }
out:
    free(vec);
    free(sum);
    return rc;
}

int pipeline_user_source_resolve(aff_pipeline *p, const char *collection, const char *user_id,
                                 pipeline_space space, const char *ranked_by,
                                 const profiles_plan *plan, pipeline_user_source *out, aff_err *err)
{
    memset(out, 0, sizeof *out);
    copy_id(out->space, sizeof out->space, collection);
    copy_id(out->history, sizeof out->history, collection);
    /* The learned model: the user's factor folded in from their current events. */
    if (p->model && space != PIPELINE_SPACE_CONTENT) {
        model_user_factor_out *mf = malloc(sizeof *mf);
        if (!mf) return aff__fail(err, AFF_ENOMEM, "out of memory folding in the user");
        int rc = model_user_factor(p->model, collection, user_id, mf, err);
        if (rc == AFF_OK && mf->found) {
            if (!(out->vector = malloc((size_t)mf->dim * sizeof *out->vector))) {
                free(mf);
                return aff__fail(err, AFF_ENOMEM, "out of memory folding in the user");
            }
            memcpy(out->vector, mf->vector, (size_t)mf->dim * sizeof *out->vector);
            out->dim = mf->dim;
            copy_id(out->space, sizeof out->space, mf->space);
            out->source = PIPELINE_SOURCE_MODEL;
            out->reason = PIPELINE_REASON_LIKED_BY_SIMILAR_SHOPPERS;
        }
        free(mf);
        if (rc) return rc;
        if (out->source == PIPELINE_SOURCE_MODEL) return AFF_OK;
    }
    if (space == PIPELINE_SPACE_BEHAVIOUR) plan = NULL; /* the model could not place the user */
    if (space != PIPELINE_SPACE_BEHAVIOUR && ranked_by && ranked_by[0] &&
        strcmp(ranked_by, collection) != 0) {
        /* Another collection's profile ranks this one (banners by product behaviour): same
         * vector space, so the dimensions must agree. */
        uint32_t dim, rdim;
        int rc = engine_collection_dim(p->engine, collection, &dim, err);
        if (!rc) rc = engine_collection_dim(p->engine, ranked_by, &rdim, err);
        if (rc) return rc;
        if (dim != rdim)
            return aff__fail(err, AFF_EINVAL,
                             "collection \"%s\" is ranked by \"%s\" (serving config) but their "
                             "dimensions differ (%u and %u)",
                             collection, ranked_by, dim, rdim);
        bool found = false;
        if (!(out->vector = malloc((size_t)dim * sizeof *out->vector)))
            return aff__fail(err, AFF_ENOMEM, "out of memory reading the profile");
        if ((rc = profiles_user_vector(p->profiles, ranked_by, user_id, out->vector, dim, &found,
                                       err)))
            return rc;
        if (found) {
            out->dim = dim;
            out->source = PIPELINE_SOURCE_PROFILE;
            out->reason = PIPELINE_REASON_SIMILAR_TO_HISTORY_ITEM;
            copy_id(out->history, sizeof out->history, ranked_by);
            return AFF_OK;
        }
        free(out->vector);
        out->vector = NULL;
        if (plan->source != PROFILES_SOURCE_PROFILE) {
            /* A cold-start shopper: what the crowd likes in ranked_by ranks this collection. */
            if ((rc = crowd_vector(p, ranked_by, dim, &out->vector, err))) return rc;
            if (out->vector) {
                out->dim = dim;
                out->source = PIPELINE_SOURCE_POPULARITY;
                out->reason = PIPELINE_REASON_POPULAR;
                out->history[0] = 0;
                return AFF_OK;
            }
        }
    }
    if (plan && plan->source == PROFILES_SOURCE_PROFILE && plan->vector) {
        out->vector = malloc((size_t)plan->dim * sizeof *out->vector);
        if (!out->vector) return aff__fail(err, AFF_ENOMEM, "out of memory reading the profile");
        memcpy(out->vector, plan->vector, (size_t)plan->dim * sizeof *out->vector);
        out->dim = plan->dim;
        out->source = PIPELINE_SOURCE_PROFILE;
        out->reason = PIPELINE_REASON_SIMILAR_TO_HISTORY_ITEM;
        return AFF_OK;
    }
    out->space[0] = 0;
    out->source = PIPELINE_SOURCE_POPULARITY;
    out->reason = PIPELINE_REASON_POPULAR;
    return AFF_OK;
}

/* How many candidates the organic query asks for. Deeper is dearer on every backend (the int8
 * scan reports and re-ranks rows in proportion to k: bench_pipeline measured the bare engine
 * call at 1.16x for k = 20 and 1.6x for k = 50 against k = 10), so the pool is only as deep
 * as the rules need: k + max(5, k/2) for boosts, a category cap, diversity or exploration
 * (room to reorder, to skip a capped category, for MMR's choice and for exploration's draws;
 * the cap is applied inside the scan where the table can, so the pool is already capped), k
 * for pins and promotions only (pins are looked up, promotions have their own queries). When
 * the cap starves anyway (a concentrated profile on a table that cannot cap in the scan) up to
 * two rounds, each four times deeper, fill the slots (finish_group). */
static uint32_t overfetch_k(const pipeline_rules *r, uint32_t k)
{
    bool cap = r->has_max_per_category && r->max_per_category;
    bool mmr = r->has_diversity && r->diversity > 0.0f;
    bool explore = r->has_exploration && r->exploration_share > 0.0f;
    if (cap || mmr || r->n_boosts || explore) return k + (k / 2 > 5 ? k / 2 : 5);
    return k;
}

pipeline_query_shape pipeline_query_shape_of(const pipeline_rules *r, uint32_t k)
{
    pipeline_query_shape sh = {.organic_k = overfetch_k(r, k)};
    if (sh.organic_k > AFF_MAX_K) sh.organic_k = AFF_MAX_K;
    /* The organic pool holds at most the cap per category (twice it when a boost may reorder
     * a category's items), so a shopper whose best items crowd one category still gets a
     * full pool in one round (aff_query.max_per_category). */
    if (r->has_max_per_category && r->max_per_category)
        sh.organic_cap = r->n_boosts ? 2 * r->max_per_category : r->max_per_category;
    for (uint32_t q = 0; q < r->n_promotions; q++) {
        /* room for the slots twice over (the cap, pins and the organic ranking may take
         * some); the int8 scan's cost grows with k, most for narrow filters */
        uint32_t want = 2 * slots_of(r->promotions[q].share, k) + 4;
        want = want < AFF_MAX_K ? want : AFF_MAX_K;
        if (want > sh.promotion_k) sh.promotion_k = want;
    }
    return sh;
}

static bool rules_active(const pipeline_rules *r)
{
    return r->n_boosts || r->n_pins || r->n_promotions ||
           (r->has_max_per_category && r->max_per_category) ||
           (r->has_diversity && r->diversity > 0.0f) ||
           (r->has_exploration && r->exploration_share > 0.0f);
}

/* Reasons look at the shopper's recent distinct items as profiles_recent_items keeps them. */
_Static_assert(PIPELINE_HISTORY_ITEMS == PROFILES_RECENT_ITEMS,
               "reasons consider the recent items profiles keeps");

/* Refines organic SIMILAR_TO_HISTORY_ITEM reasons with the nearest recent history item
 * (another item than the hit itself). Best effort: on any failure the reasons stay without a
 * related id. The hits against the history items are one blocked product (dots): each hit's
 * row against every history item found, in history order, the first best kept. hit_rows:
 * NULL, or each hit's row in the collection as stored (NULL: not found), when the caller read
 * them already (finish_group's candidates), so only the history is looked up. */
static void explain_history(pipeline_job *j, pipeline_hit *hits, uint32_t n,
                            const float *const *hit_rows)
{
    enum { H = PIPELINE_HISTORY_ITEMS };
    const size_t m = (size_t)n + H, dim = j->dim;
    /* one allocation: recent, ids, cls, hash, rows, at, sims, a (the hits' rows, n), then the
     * floats (16-byte aligned): vec (m rows), packed (the history rows in pairs, H + 1 rows'
     * room) */
    size_t o_ids = H * sizeof(char[AFF_MAX_ID_LEN + 1]);
    size_t o_cls = o_ids + m * sizeof(const char *);
    size_t o_hash = o_cls + m * sizeof(engine_item_class);
    size_t o_rows = o_hash + H * sizeof(uint64_t);
    size_t o_at = o_rows + H * sizeof(const float *);
    size_t o_sims = o_at + H * sizeof(uint32_t);
    size_t o_a = (o_sims + H * sizeof(float) + 7) & ~(size_t)7;
    size_t o_vec = (o_a + n * sizeof(const float *) + 15) & ~(size_t)15;
    size_t o_packed = o_vec + m * dim * sizeof(float);
    char *mem = malloc(o_packed + (H + 1) * dim * sizeof(float));
    if (!mem) return;
    char(*recent)[AFF_MAX_ID_LEN + 1] = (char(*)[AFF_MAX_ID_LEN + 1]) mem;
    const char **ids = (const char **)(mem + o_ids);
    engine_item_class *cls = (engine_item_class *)(mem + o_cls);
    uint64_t *hash = (uint64_t *)(mem + o_hash);
    const float **rows = (const float **)(mem + o_rows);
    uint32_t *at = (uint32_t *)(mem + o_at);
    float *sims = (float *)(mem + o_sims);
    const float **a_rows = (const float **)(mem + o_a);
    float *vec = (float *)(mem + o_vec), *packed = (float *)(mem + o_packed);
    aff_err err;
    uint32_t nh = 0;
    if (profiles_recent_items(j->p->profiles, j->src.history, j->req->user_id, recent, &nh, &err) ||
        !nh)
        goto out;
    for (uint32_t t = 0; t < nh; t++) {
        ids[n + t] = recent[t];
        hash[t] = id_hash(recent[t]);
    }
    for (uint32_t i = 0; i < n; i++)
        ids[i] = hits[i].id;
    if (hit_rows) {
        if (engine_classify_items(j->p->engine, j->src.history, ids + n, nh, NULL, 0, cls + n,
                                  vec + (size_t)n * dim, &err))
            goto out;
        for (uint32_t i = 0; i < n; i++)
            a_rows[i] = hit_rows[i];
    } else {
        if (strcmp(j->src.history, j->req->collection) == 0) {
            if (engine_classify_items(j->p->engine, j->req->collection, ids, n + nh, NULL, 0, cls,
                                      vec, &err))
                goto out;
        } else if (engine_classify_items(j->p->engine, j->req->collection, ids, n, NULL, 0, cls,
                                         vec, &err) ||
                   engine_classify_items(j->p->engine, j->src.history, ids + n, nh, NULL, 0,
                                         cls + n, vec + (size_t)n * dim, &err)) {
            goto out;
        }
        for (uint32_t i = 0; i < n; i++)
            a_rows[i] = cls[i].found ? vec + (size_t)i * dim : NULL;
    }
    /* the history items found, in history order, packed once for every hit */
    uint32_t nr = 0;
    for (uint32_t t = 0; t < nh; t++) {
        if (!cls[n + t].found) continue;
        at[nr] = t;
        rows[nr++] = vec + (size_t)(n + t) * dim;
    }
    if (!nr) goto out;
    const bool l2 = j->metric == AFF_METRIC_L2;
    if (!l2) pack_pairs(rows, nr, (uint32_t)dim, packed);
    for (uint32_t i = 0; i < n; i++) {
        if (hits[i].reason.kind != PIPELINE_REASON_SIMILAR_TO_HISTORY_ITEM || !a_rows[i]) continue;
        const float *a = a_rows[i];
        if (l2) {
            for (uint32_t r = 0; r < nr; r++) {
                float v = 0;
                for (uint32_t d = 0; d < dim; d++)
                    v -= (a[d] - rows[r][d]) * (a[d] - rows[r][d]);
                sims[r] = v;
            }
        } else {
            dots_packed(a, packed, rows, nr, (uint32_t)dim, sims);
        }
        /* the first best history item other than the hit itself */
        uint64_t hi = id_hash(hits[i].id);
        int best = -1;
        float best_v = 0;
        for (uint32_t r = 0; r < nr; r++) {
            if (hash[at[r]] == hi && strcmp(ids[n + at[r]], hits[i].id) == 0) continue;
            if (best < 0 || sims[r] > best_v) {
                best = (int)at[r];
                best_v = sims[r];
            }
        }
        if (best >= 0) /* a history id (at most AFF_MAX_ID_LEN bytes) */
            copy_id(hits[i].reason.related_id, sizeof hits[i].reason.related_id,
                    ids[n + (uint32_t)best]);
    }
out:
    free(mem);
}

static float score_vec(const pipeline_job *j, const float *item)
{
    if (!j->qvec) return 0.0f;
    float s = 0;
    if (j->vmetric == AFF_METRIC_L2) {
        for (uint32_t d = 0; d < j->vdim; d++)
            s += (j->qvec[d] - item[d]) * (j->qvec[d] - item[d]);
        return s;
    }
    double q2 = 0;
    for (uint32_t d = 0; d < j->vdim; d++) {
        s += j->qvec[d] * item[d];
        q2 += (double)j->qvec[d] * j->qvec[d];
    }
    return j->vmetric == AFF_METRIC_COSINE && q2 > 0 ? s / (float)sqrt(q2) : s;
}

/* The sums of a's and b's squares in double, each added in index order, the two rows in the
 * two lanes of one vector (the same values as a scalar loop per row). b may be NULL. */
typedef double f64x2 __attribute__((vector_size(16)));

static void sum_squares2(const float *a, const float *b, uint32_t dim, double out[2])
{
    f64x2 s = {0.0, 0.0};
    uint32_t d = 0;
    if (b) {
        for (; d + 4 <= dim; d += 4) {
            f32x4 x, y;
            memcpy(&x, a + d, sizeof x);
            memcpy(&y, b + d, sizeof y);
            /* {a[d], b[d]}, {a[d+1], b[d+1]}, ... as doubles, in index order */
            f32x4 lo = __builtin_shufflevector(x, y, 0, 4, 1, 5);
            f32x4 hi = __builtin_shufflevector(x, y, 2, 6, 3, 7);
            f64x2 v0 = __builtin_convertvector(__builtin_shufflevector(lo, lo, 0, 1), f64x2);
            f64x2 v1 = __builtin_convertvector(__builtin_shufflevector(lo, lo, 2, 3), f64x2);
            f64x2 v2 = __builtin_convertvector(__builtin_shufflevector(hi, hi, 0, 1), f64x2);
            f64x2 v3 = __builtin_convertvector(__builtin_shufflevector(hi, hi, 2, 3), f64x2);
            s += v0 * v0;
            s += v1 * v1;
            s += v2 * v2;
            s += v3 * v3;
        }
    }
    out[0] = s[0];
    out[1] = s[1];
    for (uint32_t e = d; e < dim; e++)
        out[0] += (double)a[e] * a[e];
    for (uint32_t e = d; b && e < dim; e++)
        out[1] += (double)b[e] * b[e];
}

/* Scales each of the n rows of vec (dim floats each) to unit length for diversity: each
 * row's double sum of squares in index order, then every value times (float)(1 / sqrt(sum))
 * (rows of zeros stay). Two rows at a time in two-lane vectors (sum_squares2); the scaling
 * in four-lane vectors (the same products). */
static void normalize_rows(float *vec, uint32_t n, uint32_t dim)
{
    for (uint32_t i = 0; i < n; i += 2) {
        float *row[2] = {vec + (size_t)i * dim, vec + (size_t)(i + 1) * dim};
        double s[2];
        sum_squares2(row[0], i + 1 < n ? row[1] : NULL, dim, s);
        for (uint32_t r = 0; r < 2 && i + r < n; r++) {
            if (!(s[r] > 0)) continue;
            const float inv = (float)(1.0 / sqrt(s[r]));
            const f32x4 inv4 = {inv, inv, inv, inv};
            float *v = row[r];
            uint32_t d = 0;
            for (; d + 4 <= dim; d += 4) {
                f32x4 x;
                memcpy(&x, v + d, sizeof x);
                x *= inv4;
                memcpy(v + d, &x, sizeof x);
            }
            for (; d < dim; d++)
                v[d] *= inv;
        }
    }
}

/* Exploration's own candidates: the newest items of the collection first upserted within
 * exploration_new_age_s, not already candidates (up to PIPELINE_NEW_ITEMS, ids copied into
 * buf). Appended at cands[n..]; returns the new n. */
static uint32_t add_new_items(const pipeline_job *j, pipeline_candidate *cands, const char **ids,
                              uint32_t n, char (*buf)[AFF_MAX_ID_LEN + 1])
{
    int64_t since = exposure_now_ms() - (int64_t)j->rules.exploration_new_age_s * 1000;
    size_t m = exposure_newest(j->p->exposure, j->req->collection, since, buf, PIPELINE_NEW_ITEMS);
    for (size_t i = 0; i < m; i++) {
        bool dup = false;
        for (uint32_t t = 0; t < n && !dup; t++)
            dup = strcmp(ids[t], buf[i]) == 0;
        for (uint32_t e = 0; e < j->req->n_item_ids && !dup; e++) /* SimilarItems' own items */
            dup = strcmp(j->req->item_ids[e], buf[i]) == 0;
        if (dup) continue;
        cands[n] = (pipeline_candidate){.id = buf[i], .explorable = true};
        ids[n++] = buf[i];
    }
    return n;
}

/* Sets the novelty bits exploration favours (new: first upserted within
 * exploration_new_age_s; rarely shown: decayed served count below
 * exploration_rarely_shown_below). */
static void mark_novelty(const pipeline_job *j, pipeline_candidate *cands, uint32_t n)
{
    const pipeline_rules *r = &j->rules;
    if (!j->p->exposure || !n || (!r->exploration_new_age_s && !r->exploration_rarely_shown_below))
        return;
    const char **ids = malloc(n * sizeof *ids);
    exposure_info *info = malloc(n * sizeof *info);
    if (ids && info) {
        int64_t now = exposure_now_ms();
        for (uint32_t i = 0; i < n; i++)
            ids[i] = cands[i].id;
        exposure_lookup(j->p->exposure, j->req->collection, ids, n, now, info);
        for (uint32_t i = 0; i < n; i++) {
            uint8_t nv = 0;
            if (r->exploration_new_age_s && info[i].first_ms &&
                now - info[i].first_ms <= (int64_t)r->exploration_new_age_s * 1000)
                nv |= PIPELINE_NOVEL_NEW;
            if (info[i].served < r->exploration_rarely_shown_below) nv |= PIPELINE_NOVEL_RARE;
            cands[i].novelty = nv;
        }
    }
    free(ids);
    free(info);
}

#define RULES_STARVED 2 /* finish_group: rules left slots empty; a deeper pool may fill them */
#define MAX_DEEPEN    2 /* deeper rounds at most (the pool grows 16-fold) */

/* Ranks group g from its candidate lists (organic first, then one per promotion) into
 * j->hits. Runs on the thread that finished the candidates. */
static int finish_group(pipeline_job *j, uint32_t g, aff_err *err)
{
    pipeline_hit *out = j->hits + (size_t)g * j->k;
    const aff_hit *org = j->cand + j->cand_off[qidx(j, g, 0)];
    uint32_t n_org = j->cand_n[qidx(j, g, 0)];
    const char *related = j->req->kind == PIPELINE_SIMILAR ? j->req->item_ids[g] : NULL;
    if (!j->ranked) {
        uint32_t m = n_org < j->k ? n_org : j->k;
        for (uint32_t i = 0; i < m; i++) {
            memcpy(out[i].id, org[i].id, sizeof out[i].id);
            out[i].score = org[i].score;
            out[i].reason = (pipeline_reason){.kind = j->src.reason};
            if (related)
                copy_id(out[i].reason.related_id, sizeof out[i].reason.related_id, related);
        }
        j->n_hits[g] = m;
        if (j->src.source == PIPELINE_SOURCE_PROFILE) explain_history(j, out, m, NULL);
        return AFF_OK;
    }
    const pipeline_rules *r = &j->rules;
    uint32_t total = n_org;
    for (uint32_t q = 1; q < j->per_group; q++)
        total += j->cand_n[qidx(j, g, q)];
    bool explore = r->has_exploration && r->exploration_share > 0.0f;
    bool add_new = explore && r->exploration_new_age_s && j->p->exposure;
    char(*new_ids)[AFF_MAX_ID_LEN + 1] =
        add_new ? malloc(PIPELINE_NEW_ITEMS * sizeof *new_ids) : NULL;
    uint32_t n_all = total + (add_new ? PIPELINE_NEW_ITEMS : 0) + r->n_pins;
    /* one zeroed block: cands, ids, cls (n_all each), hash (the candidates' id_hash, n_all),
     * hit_rows (the hits' rows for reasons, at most n_all), pinned (n_pins) */
    const size_t na = n_all ? n_all : 1, np_ = r->n_pins ? r->n_pins : 1;
    const size_t per_cand = sizeof(pipeline_candidate) + sizeof(engine_item_class) +
                            sizeof(uint64_t) + sizeof(const char *) + sizeof(const float *);
    char *blk = calloc(1, na * per_cand + np_ * sizeof(const pipeline_candidate *)), *at_blk = blk;
    pipeline_candidate *cands = blk ? carve(&at_blk, na * sizeof *cands) : NULL;
    engine_item_class *cls = blk ? carve(&at_blk, na * sizeof *cls) : NULL;
    uint64_t *hash = blk ? carve(&at_blk, na * sizeof *hash) : NULL;
    const char **ids = blk ? carve(&at_blk, na * sizeof *ids) : NULL;
    const float **hit_rows = blk ? carve(&at_blk, na * sizeof *hit_rows) : NULL;
    const pipeline_candidate **pinned = blk ? carve(&at_blk, np_ * sizeof *pinned) : NULL;
    bool want_vec = (r->has_diversity && r->diversity > 0.0f) || r->n_pins || add_new;
    float *vec = want_vec ? malloc((size_t)(n_all ? n_all : 1) * j->vdim * sizeof *vec) : NULL;
    bool own_vectors = strcmp(j->vcoll, j->req->collection) == 0, normalized = false;
    int rc = AFF_OK;
    if (!blk || (want_vec && !vec) || (add_new && !new_ids)) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory ranking candidates");
        goto out;
    }
    uint32_t n = 0;
    for (uint32_t i = 0; i < n_org; i++) {
        cands[n] = (pipeline_candidate){.id = org[i].id, .score = org[i].score, .organic = true};
        hash[n] = id_hash(org[i].id);
        ids[n++] = org[i].id;
    }
    for (uint32_t q = 1; q < j->per_group; q++) {
        const aff_hit *ph = j->cand + j->cand_off[qidx(j, g, q)];
        for (uint32_t i = 0; i < j->cand_n[qidx(j, g, q)]; i++) {
            uint64_t h = id_hash(ph[i].id);
            bool dup = false;
            for (uint32_t t = 0; t < n && !dup; t++)
                dup = hash[t] == h && strcmp(ids[t], ph[i].id) == 0;
            if (dup) continue;
            cands[n] = (pipeline_candidate){.id = ph[i].id, .score = ph[i].score};
            hash[n] = h;
            ids[n++] = ph[i].id;
        }
    }
    const uint32_t first_new = n;
    if (add_new) n = add_new_items(j, cands, ids, n, new_ids);
    for (uint32_t p = 0; p < r->n_pins; p++)
        ids[n + p] = r->pins[p].item_id;
    for (uint32_t i = first_new; i < n + r->n_pins; i++)
        hash[i] = id_hash(ids[i]);
    const aff_filter *filters[1 + PIPELINE_MAX_BOOSTS + PIPELINE_MAX_PROMOTIONS];
    uint32_t nf = 0;
    filters[nf++] = j->base;
    for (uint32_t b = 0; b < r->n_boosts; b++)
        filters[nf++] = &r->boosts[b].filter;
    for (uint32_t q = 0; q < r->n_promotions; q++)
        filters[nf++] = &j->promo_filters[q];
    if ((rc = engine_classify_items(j->p->engine, j->req->collection, ids, n + r->n_pins, filters,
                                    nf, cls, own_vectors ? vec : NULL, err)))
        goto out;
    if (vec && !own_vectors) {
        /* The behaviour space's factors; items the model does not know yet get zeros. */
        engine_item_class *vcls = calloc(n + r->n_pins ? n + r->n_pins : 1, sizeof *vcls);
        if (!vcls) {
            rc = aff__fail(err, AFF_ENOMEM, "out of memory ranking candidates");
            goto out;
        }
        rc = engine_classify_items(j->p->engine, j->vcoll, ids, n + r->n_pins, NULL, 0, vcls, vec,
                                   err);
        free(vcls);
        if (rc) goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        cands[i].category = cls[i].category;
        cands[i].matches = cls[i].matches;
        if (cands[i].organic) cands[i].matches |= 1u; /* the engine applied the filter */
        if (i >= first_new)
            cands[i].score = cls[i].found ? score_vec(j, vec + (size_t)i * j->vdim) : 0.0f;
        if (!cls[i].found) cands[i].matches = 0; /* a new item deleted since */
    }
    if (explore) mark_novelty(j, cands, n);
    for (uint32_t p = 0; p < r->n_pins; p++) {
        uint32_t at = n + p;
        if (!cls[at].found) {
            rc = aff__fail(err, AFF_EINVAL,
                           "rules.pins[%u].item_id \"%s\" is not in collection \"%s\"", p,
                           r->pins[p].item_id, j->req->collection);
            goto out;
        }
        cands[at] = (pipeline_candidate){
            .id = r->pins[p].item_id, .category = cls[at].category, .matches = cls[at].matches};
        cands[at].score = score_vec(j, vec + (size_t)at * j->vdim);
        for (uint32_t i = 0; i < n; i++)
            if (hash[i] == hash[at] && strcmp(ids[i], ids[at]) == 0)
                cands[at].score = cands[i].score;
        pinned[p] = &cands[at];
    }
    if (vec && r->has_diversity && r->diversity > 0.0f) {
        /* a cosine collection's rows are stored at unit length (engine_upsert normalizes) */
        if (j->vmetric != AFF_METRIC_COSINE) {
            normalize_rows(vec, n, j->vdim);
            normalized = true;
        }
        for (uint32_t i = 0; i < n; i++)
            cands[i].vector = vec + (size_t)i * j->vdim;
    }
    /* A full pool, or one the engine capped per category (deepen() drops the cap): the
     * engine may hold more candidates than this round saw. */
    const bool engine_had_more =
        n_org == j->queries[qidx(j, g, 0)].k || j->queries[qidx(j, g, 0)].max_per_category;
    pipeline_rank_input in = {
        .rules = r,
        .k = j->k,
        .lower_is_better = j->vmetric == AFF_METRIC_L2,
        .dim = j->vdim,
        .cands = cands,
        .n = n,
        .pinned = pinned,
        .organic_reason = j->src.reason,
        .organic_related = related,
        .relax_cap = j->deepened == MAX_DEEPEN || !engine_had_more ||
                     j->queries[qidx(j, g, 0)].k == AFF_MAX_K,
        .seed = j->out.exploration_seed + g,
        .favour_novel = r->exploration_new_age_s || r->exploration_rarely_shown_below > 0.0f};
    if ((rc = pipeline_rank(&in, out, &j->n_hits[g], err))) goto out;
    if (j->n_hits[g] < j->k && engine_had_more && j->deepened < MAX_DEEPEN &&
        j->queries[qidx(j, g, 0)].k < AFF_MAX_K) {
        rc = RULES_STARVED; /* the engine had more: ask it for a deeper pool */
        goto out;
    }
    if (j->src.source == PIPELINE_SOURCE_PROFILE) {
        /* Every hit is a candidate (or a pin): with the candidates' rows read as stored, the
         * reasons take the hits' rows from them instead of looking them up again. */
        const bool reuse = vec && own_vectors && !normalized;
        for (uint32_t i = 0; reuse && i < j->n_hits[g]; i++) {
            uint64_t h = id_hash(out[i].id);
            hit_rows[i] = NULL;
            for (uint32_t c = 0; c < n + r->n_pins; c++)
                if (hash[c] == h && cls[c].found && strcmp(ids[c], out[i].id) == 0) {
                    hit_rows[i] = vec + (size_t)c * j->vdim;
                    break;
                }
        }
        explain_history(j, out, j->n_hits[g], reuse ? hit_rows : NULL);
    }
out:
    free(blk);
    free(new_ids);
    free(vec);
    return rc;
}

/* Counts the job's hits as served (exposure.h), for exploration's "rarely shown". */
static void note_served(const pipeline_job *j)
{
    if (!j->p->exposure) return;
    uint32_t total = 0;
    for (uint32_t g = 0; g < j->n_groups; g++)
        total += j->n_hits[g];
    const char *small[64]; /* most answers: no allocation */
    const char **ids = total <= 64 ? small : malloc(total * sizeof *ids);
    if (!ids) return; /* best effort: a count missed */
    uint32_t m = 0;
    for (uint32_t g = 0; g < j->n_groups; g++)
        for (uint32_t i = 0; i < j->n_hits[g]; i++)
            ids[m++] = j->hits[(size_t)g * j->k + i].id;
    exposure_note_served(j->p->exposure, j->req->collection, ids, m, exposure_now_ms());
    if (ids != small) free(ids);
}

/* Ranks every group. Returns 0 when done (or failed: out.status), RULES_STARVED when rules
 * (caps) left slots empty though the engine had more: then nothing is final and a deeper
 * round must run. */
static int finish(pipeline_job *j)
{
    if (j->out.status) return 0;
    for (uint32_t g = 0; g < j->n_groups; g++) {
        int rc = finish_group(j, g, &j->out.err);
        if (rc == RULES_STARVED) return rc;
        if ((j->out.status = rc)) return 0;
        j->hit_ptrs[g] = j->hits + (size_t)g * j->k;
    }
    note_served(j);
    return 0;
}

/* Makes every organic query four times deeper (at most AFF_MAX_K) and lays the candidate
 * buffer out again, for one more round with every query. */
static int deepen(pipeline_job *j, aff_err *err)
{
    size_t nq = (size_t)j->n_groups * j->per_group, off = 0;
    for (uint32_t g = 0; g < j->n_groups; g++) {
        aff_query *q = &j->queries[qidx(j, g, 0)];
        q->k = 4 * q->k < AFF_MAX_K ? 4 * q->k : AFF_MAX_K;
        /* starved under the cap: the cap gives way, so the deeper pool is uncapped */
        q->max_per_category = 0;
    }
    for (size_t i = 0; i < nq; i++) {
        j->cand_off[i] = off;
        off += j->queries[i].k;
        j->cand_n[i] = 0;
    }
    free(j->cand);
    if (!(j->cand = calloc(off ? off : 1, sizeof *j->cand)))
        return aff__fail(err, AFF_ENOMEM, "out of memory preparing a deeper query");
    j->deepened++;
    return AFF_OK;
}

static void batch_done(batcher_request *br);

static int cmp_rerank_hit(const void *a, const void *b)
{
    const aff_rerank_hit *x = a, *y = b;
    if (x->found != y->found) return x->found ? -1 : 1;
    if (x->blended != y->blended) return x->blended > y->blended ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index);
}

/* Rerank in the behaviour space: candidates of the collection that the model does not know
 * yet (no events before the last training) are found, with affinity 0. */
static void rerank_fix_unlearned(pipeline_job *j)
{
    uint32_t n = j->rq.n, missing = 0;
    for (uint32_t i = 0; i < n; i++)
        missing += !j->rerank_out[i].found;
    if (!missing) return;
    bool *pass = calloc(n, sizeof *pass);
    aff_err err;
    if (!pass || engine_filter_items(j->p->engine, j->req->collection, j->rq.ids, n, NULL, pass,
                                     &err) != AFF_OK) {
        free(pass);
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        aff_rerank_hit *h = &j->rerank_out[i];
        if (h->found || !pass[h->index]) continue;
        h->found = true;
        h->affinity = 0.0f;
        h->blended = (1.0f - j->rq.weight) * h->base;
    }
    qsort(j->rerank_out, n, sizeof *j->rerank_out, cmp_rerank_hit);
    free(pass);
}

/* A reason for each re-ranked candidate, as for hits: the shopper's source (with the nearest
 * history item for a profile); CALLER_SCORE where the caller's base score decided (no
 * personal signal, or an id not in the collection). Best effort: without memory, none. */
static void rerank_explain(pipeline_job *j)
{
    uint32_t n = j->out.n_rerank;
    pipeline_hit *h = calloc(n ? n : 1, sizeof *h);
    j->rerank_reasons = calloc(n ? n : 1, sizeof *j->rerank_reasons);
    if (!h || !j->rerank_reasons) {
        free(h);
        free(j->rerank_reasons);
        j->rerank_reasons = NULL;
        return;
    }
    pipeline_reason_kind kind = j->out.rerank_without_profile ? PIPELINE_REASON_CALLER_SCORE
                                : j->req->user_id             ? j->src.reason
                                                              : PIPELINE_REASON_MATCHES_VECTOR;
    for (uint32_t i = 0; i < n; i++) {
        const aff_rerank_hit *rh = &j->rerank_out[i];
        snprintf(h[i].id, sizeof h[i].id, "%s", j->req->candidate_ids[rh->index]);
        h[i].reason.kind = rh->found ? kind : PIPELINE_REASON_CALLER_SCORE;
    }
    if (kind == PIPELINE_REASON_SIMILAR_TO_HISTORY_ITEM) explain_history(j, h, n, NULL);
    for (uint32_t i = 0; i < n; i++)
        j->rerank_reasons[i] = h[i].reason;
    j->out.rerank_reasons = j->rerank_reasons;
    free(h);
}

/* Submits engine queries [from, from + n) (whole groups) as one batcher request. */
static int submit_range(pipeline_job *j, size_t from, size_t n, int64_t deadline_ns, aff_err *err)
{
    j->br = (batcher_request){.kind = BATCHER_SEARCH,
                              .collection = j->src.space,
                              .deadline_ns = deadline_ns,
                              .nq = n,
                              .scans = n / j->per_group, /* a group shares one vector */
                              .queries = j->queries + from,
                              .hits = j->cand + j->cand_off[from],
                              .n_hits = j->cand_n + from,
                              .query_errs = j->qerrs + from,
                              .done = batch_done,
                              .user = j};
    return batcher_submit(j->p->batcher, &j->br, err);
}

/* ---- measurement: experiment arms and recommendation records ------------------------------ */

/* A Recommend for a known shopper on a surface with a running experiment gets that
 * experiment's arm: its preset and space replace the request's (its diversity and exploration
 * are applied over the merged rules in plan_search). */
static void assign_arm(pipeline_job *j)
{
    pipeline_request *q = &j->eff;
    if (q->kind == PIPELINE_RECOMMEND && q->user_id && q->user_id[0] &&
        experiments_assign(j->p->experiments, q->collection, q->surface, q->user_id, &j->assign)) {
        j->has_arm = true;
        memcpy(j->out.experiment, j->assign.experiment, sizeof j->out.experiment);
        memcpy(j->out.arm, j->assign.arm.name, sizeof j->out.arm);
        if (j->assign.arm.preset[0]) q->preset = j->assign.arm.preset;
        if (j->assign.arm.space) q->space = (pipeline_space)j->assign.arm.space;
    }
    copy_id(j->out.strategy, sizeof j->out.strategy,
            q->preset && q->preset[0] ? q->preset : OUTCOMES_DEFAULT_STRAT);
}

/* Records a finished job's answer for attribution (a failed one is not an answer). Memory
 * trouble here costs the attribution of this answer, never the answer. */
static void record_job(pipeline_job *j)
{
    const pipeline_request *q = j->req;
    if (!j->p->outcomes || q->unrecorded || j->out.status != AFF_OK) return;
    size_t n = 0;
    if (q->kind == PIPELINE_RERANK) {
        n = j->out.n_rerank;
    } else {
        for (uint32_t g = 0; g < j->out.n_results; g++)
            n += j->out.n_hits[g];
    }
    const char *small[64]; /* most answers: no allocation */
    const char **ids = n <= 64 ? small : malloc(n * sizeof *ids);
    if (!ids) return;
    size_t m = 0;
    if (q->kind == PIPELINE_RERANK) {
        for (uint32_t i = 0; i < j->out.n_rerank; i++)
            if (j->out.rerank[i].found) ids[m++] = q->candidate_ids[j->out.rerank[i].index];
    } else {
        for (uint32_t g = 0; g < j->out.n_results; g++)
            for (uint32_t i = 0; i < j->out.n_hits[g]; i++)
                ids[m++] = j->out.hits[g][i].id;
    }
    outcomes_labels l = {.collection = q->collection,
                         .surface = q->surface,
                         .strategy = j->out.strategy,
                         .experiment = j->out.experiment,
                         .arm = j->out.arm};
    aff_err err;
    if (outcomes_record(j->p->outcomes, j->out.recommendation_id, &l, ids, (uint32_t)m, &err))
        aff_log(AFF_LOG_DEBUG, "recommendation not recorded: %s", err.msg);
    if (ids != small) free(ids);
}

static void batch_done(batcher_request *br)
{
    pipeline_job *j = br->user;
    j->out.queue_wait_ns += br->wait_ns;
    j->out.rounds++;
    if (br->status != AFF_OK) {
        j->out.status = br->status;
        j->out.err = br->err;
    } else if (j->req->kind != PIPELINE_RERANK) {
        for (size_t i = 0; i < br->nq; i++) {
            const aff_err *qe = &br->query_errs[i];
            if (qe->code == AFF_OK) continue;
            j->out.status = qe->code;
            uint32_t g = group_of(j, (size_t)(br->queries - j->queries) + i);
            if (j->n_groups > 1)
                aff__fail(&j->out.err, qe->code, "item %u: %s", g, qe->msg);
            else
                j->out.err = *qe;
            break;
        }
        int more = finish(j);
        if (more) {
            /* One more round with a deeper organic pool, then rank again. */
            aff_err err;
            size_t nq = (size_t)j->n_groups * j->per_group;
            int rc = deepen(j, &err);
            if (!rc) rc = submit_range(j, 0, nq, br->deadline_ns, &err);
            if (rc == AFF_OK) return; /* batch_done runs again */
            j->out.status = err.code;
            j->out.err = err;
        }
    } else if (j->qerrs[0].code != AFF_OK) {
        j->out.status = j->qerrs[0].code;
        j->out.err = j->qerrs[0];
    } else {
        if (j->src.source == PIPELINE_SOURCE_MODEL) rerank_fix_unlearned(j);
        rerank_explain(j);
    }
    record_job(j);
    j->done(j, j->user);
}

/* Popularity (cold start): candidates now, from the profiles module (a deeper second round
 * when rules starved, as for engine queries). */
static int run_popularity(pipeline_job *j, aff_err *err)
{
    for (;;) {
        for (uint32_t q = 0; q < j->per_group; q++) {
            const aff_filter *f = q == 0 ? j->base : &j->promo_filters[q - 1];
            size_t i = qidx(j, 0, q);
            int rc = profiles_popular(j->p->profiles, j->req->collection, j->queries[i].k, f,
                                      j->cand + j->cand_off[i], &j->cand_n[i], err);
            if (rc) return rc;
        }
        int more = finish(j);
        if (!more) break;
        int rc = deepen(j, err);
        if (rc) return rc;
    }
    if (j->out.status) {
        *err = j->out.err;
        return j->out.status;
    }
    return AFF_OK;
}

static int exclude_types(const pipeline_request *req, const char **types, size_t *nt, aff_err *err);

/* The widget's reason for each recipe (index: widgets_recipe). */
static const pipeline_reason_kind widget_reason[WIDGETS_RECIPE_COUNT] = {
    [WIDGETS_RECIPE_FREQUENTLY_BOUGHT_TOGETHER] = PIPELINE_REASON_BOUGHT_TOGETHER,
    [WIDGETS_RECIPE_ALSO_VIEWED] = PIPELINE_REASON_ALSO_VIEWED,
    [WIDGETS_RECIPE_ALSO_BOUGHT] = PIPELINE_REASON_ALSO_BOUGHT,
    [WIDGETS_RECIPE_TRENDING] = PIPELINE_REASON_TRENDING,
    [WIDGETS_RECIPE_BUY_IT_AGAIN] = PIPELINE_REASON_BOUGHT_BEFORE,
    [WIDGETS_RECIPE_RECENTLY_VIEWED] = PIPELINE_REASON_RECENTLY_VIEWED,
    [WIDGETS_RECIPE_BEST_SELLERS] = PIPELINE_REASON_BEST_SELLER,
};

/* The widget's view of a RECOMMEND request with a recipe. */
static widgets_request widget_request(const pipeline_request *req)
{
    return (widgets_request){.recipe = req->recipe,
                             .collection = req->collection,
                             .user_id = req->user_id,
                             .item_ids = req->item_ids,
                             .n_item_ids = req->n_item_ids};
}

/* Fills every query's candidates from the widget's list: the best items passing the query's
 * filter, in the widget's order. *deeper: 0, or how many of the widget's candidates to
 * examine next because some query got fewer than it asked for while the widget had more
 * (estimated from the share that passed, with room to spare). */
static int widget_fill(pipeline_job *j, uint32_t *deeper, aff_err *err)
{
    const widgets_result *wr = &j->widget;
    const char **ids = malloc((wr->n ? wr->n : 1) * sizeof *ids);
    bool *pass = malloc((wr->n ? wr->n : 1) * sizeof *pass);
    int rc = AFF_OK;
    *deeper = 0;
    if (!ids || !pass) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory ranking widget candidates");
        goto out;
    }
    for (uint32_t i = 0; i < wr->n; i++)
        ids[i] = wr->hits[i].id;
    for (uint32_t q = 0; q < j->per_group; q++) {
        const aff_filter *f = q == 0 ? j->base : &j->promo_filters[q - 1];
        size_t qi = qidx(j, 0, q);
        if ((rc = engine_filter_items(j->p->engine, j->req->collection, ids, wr->n, f, pass, err)))
            goto out;
        aff_hit *h = j->cand + j->cand_off[qi];
        uint32_t n = 0;
        for (uint32_t i = 0; i < wr->n && n < j->queries[qi].k; i++) {
            if (!pass[i]) continue;
            snprintf(h[n].id, sizeof h[n].id, "%s", ids[i]);
            h[n++].score = wr->hits[i].score;
        }
        j->cand_n[qi] = n;
        if (n < j->queries[qi].k && wr->truncated) {
            double want = 2.0 * wr->n * (j->queries[qi].k + 1.0) / (n + 1.0);
            uint32_t d = want > WIDGETS_SCAN_LIMIT ? WIDGETS_SCAN_LIMIT : (uint32_t)want;
            if (d < 2 * wr->n) d = 2 * wr->n;
            if (d > *deeper) *deeper = d;
        }
    }
out:
    free(ids);
    free(pass);
    return rc;
}

/* Sets the related item of the widget's hits (the context item behind each). */
static void widget_related(pipeline_job *j)
{
    for (uint32_t i = 0; i < j->n_hits[0]; i++) {
        pipeline_hit *h = &j->hits[i];
        if (h->reason.kind != j->src.reason) continue;
        for (uint32_t c = 0; c < j->widget.n; c++) {
            if (strcmp(j->widget.hits[c].id, h->id) != 0) continue;
            if (j->widget.hits[c].related)
                snprintf(h->reason.related_id, sizeof h->reason.related_id, "%s",
                         j->widget.hits[c].related);
            break;
        }
    }
}

/* A widget recipe: candidates now, from the widget statistics, examined deeper (by the share
 * that passed the filters, up to WIDGETS_SCAN_LIMIT) while filters leave a query short, then
 * ranked (a deeper round when rules starved, as for engine queries). */
static int run_widget(pipeline_job *j, aff_err *err)
{
    const pipeline_request *req = j->req;
    widgets_request wr = widget_request(req);
    uint32_t depth = 0;
    for (;;) {
        uint32_t want = 0;
        for (size_t i = 0; i < (size_t)j->per_group; i++)
            if (j->queries[i].k > want) want = j->queries[i].k;
        want = 4 * want > 64 ? 4 * want : 64;
        if (want > depth) depth = want;
        for (;;) {
            if (depth > WIDGETS_SCAN_LIMIT) depth = WIDGETS_SCAN_LIMIT;
            widgets_result_release(&j->widget);
            int rc = widgets_candidates(j->p->widgets, &wr, depth, &j->widget, err);
            uint32_t deeper = 0;
            if (rc || (rc = widget_fill(j, &deeper, err))) return rc;
            if (!deeper || depth == WIDGETS_SCAN_LIMIT) break;
            depth = deeper;
        }
        int more = finish(j);
        if (!more) break;
        int rc = deepen(j, err);
        if (rc) return rc;
    }
    if (j->out.status) {
        *err = j->out.err;
        return j->out.status;
    }
    widget_related(j);
    return AFF_OK;
}

/* Plans a widget recipe's source (RECOMMEND with recipe set): the statistics answer; a user_id
 * with exclude_event_types adds the shopper's exclusions. */
static int plan_widget(pipeline_job *j, aff_err *err)
{
    const pipeline_request *req = j->req;
    widgets_request wr = widget_request(req);
    int rc = widgets_validate(&wr, err);
    if (rc) return rc;
    if (!j->p->widgets)
        return aff__fail(err, AFF_EPRECONDITION, "widget recipes are not enabled on this server");
    if (req->vector)
        return aff__fail(err, AFF_EINVAL,
                         "user_vector: recipe %s takes a user_id (or no user), not a vector",
                         widgets_recipe_name(req->recipe));
    if (req->user_id && req->n_exclude_event_types) {
        const char *types[8];
        size_t nt;
        if ((rc = exclude_types(req, types, &nt, err))) return rc;
        if ((rc = profiles_plan_recommend(j->p->profiles, req->collection, req->user_id, types, nt,
                                          req->filter, &j->plan, err)))
            return rc;
        j->has_plan = true;
        j->base = &j->plan.filter;
    } else if (req->n_exclude_event_types) {
        return aff__fail(err, AFF_EINVAL,
                         "exclude_event_types needs a user_id with history (use "
                         "filter.exclude_ids instead)");
    }
    j->src.source = (pipeline_source)(PIPELINE_SOURCE_WIDGET + req->recipe);
    j->src.reason = widget_reason[req->recipe];
    snprintf(j->src.space, sizeof j->src.space, "%s", req->collection);
    /* Widget scores are higher-is-better whatever the collection's metric. */
    j->vmetric = AFF_METRIC_IP;
    return AFF_OK;
}

static int exclude_types(const pipeline_request *req, const char **types, size_t *nt, aff_err *err)
{
    *nt = 0;
    for (uint32_t i = 0; i < req->n_exclude_event_types; i++) {
        const char *name =
            profiles_event_kind_name((profiles_event_kind)req->exclude_event_types[i]);
        if (!name)
            return aff__fail(err, AFF_EINVAL,
                             "exclude_event_types[%u] = %d; use EVENT_TYPE_VIEW, "
                             "EVENT_TYPE_CLICK, EVENT_TYPE_ADD_TO_CART or EVENT_TYPE_PURCHASE",
                             i, req->exclude_event_types[i]);
        bool dup = false;
        for (size_t t = 0; t < *nt; t++)
            dup = dup || types[t] == name;
        if (!dup) types[(*nt)++] = name;
    }
    return AFF_OK;
}

static int find_preset(pipeline_job *j, const char *name, const pipeline_rules **out, aff_err *err)
{
    *out = NULL;
    if (!name || !name[0]) return AFF_OK;
    j->presets = presets_acquire(j->p);
    if (!j->presets)
        return aff__fail(err, AFF_EINVAL,
                         "preset \"%.64s\" is unknown: the server has no presets configured "
                         "(--serving-config)",
                         name);
    for (size_t i = 0; i < j->presets->n; i++) {
        if (strcmp(j->presets->names[i], name) == 0) {
            *out = &j->presets->rules[i];
            return AFF_OK;
        }
    }
    return aff__fail(err, AFF_EINVAL, "preset \"%.64s\" is unknown; %zu presets are configured",
                     name, j->presets->n);
}

bool pipeline_has_preset(void *pv, const char *name)
{
    aff_pipeline *p = pv;
    preset_set *s = presets_acquire(p);
    bool found = false;
    for (size_t i = 0; s && i < s->n && !found; i++)
        found = strcmp(s->names[i], name) == 0;
    preset_set_unref(s);
    return found;
}

/* The collection whose profile ranks `collection` in the serving config, or NULL. */
static const char *ranked_by(pipeline_job *j, const char *collection)
{
    if (!j->presets) j->presets = presets_acquire(j->p);
    for (size_t i = 0; j->presets && i < j->presets->n_ranked; i++)
        if (strcmp(j->presets->ranked_names[i], collection) == 0) return j->presets->ranked_by[i];
    return NULL;
}

static bool audience_needs_traits(const pipeline_audience *a)
{
    return a && (a->min_price_sensitivity > 0.0f || a->max_price_sensitivity < 1.0f ||
                 a->min_loyalty > 0.0f || a->min_activity > 0.0f || a->min_purchase_intent > 0.0f);
}

static bool any_of_str(const char *s, const char *const *set, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (s && set[i] && strcmp(s, set[i]) == 0) return true;
    return false;
}

static bool audience_matches(const pipeline_audience *a, const profiles_traits *t,
                             const pipeline_context *ctx, int hour)
{
    if (!a) return true;
    if (audience_needs_traits(a)) {
        if (!t) return false;
        if (t->price_sensitivity < a->min_price_sensitivity ||
            t->price_sensitivity > a->max_price_sensitivity || t->loyalty < a->min_loyalty ||
            t->activity < a->min_activity || t->purchase_intent < a->min_purchase_intent)
            return false;
    }
    if (a->n_devices && !any_of_str(ctx ? ctx->device : NULL, a->devices, a->n_devices))
        return false;
    if (a->n_locales && !any_of_str(ctx ? ctx->locale : NULL, a->locales, a->n_locales))
        return false;
    if (a->from_hour >= 0) {
        bool in = a->from_hour <= a->to_hour ? hour >= a->from_hour && hour <= a->to_hour
                                             : hour >= a->from_hour || hour <= a->to_hour;
        if (!in) return false;
    }
    return true;
}

/* Keeps the boosts and promotions whose audience matches this shopper and request. Traits are
 * read (one history scan) only when an audience asks for them. */
static int apply_audiences(pipeline_job *j, aff_err *err)
{
    pipeline_rules *r = &j->rules;
    bool any = false, traits_needed = false;
    for (uint32_t i = 0; i < r->n_boosts; i++) {
        any |= r->boosts[i].audience != NULL;
        traits_needed |= audience_needs_traits(r->boosts[i].audience);
    }
    for (uint32_t i = 0; i < r->n_promotions; i++) {
        any |= r->promotions[i].audience != NULL;
        traits_needed |= audience_needs_traits(r->promotions[i].audience);
    }
    if (!any) return AFF_OK;
    profiles_traits traits, *t = NULL;
    if (traits_needed && j->req->user_id) {
        const char *coll = j->src.history[0] ? j->src.history : j->req->collection;
        aff_err terr;
        int rc = profiles_user_traits(j->p->profiles, coll, j->req->user_id, &traits, &terr);
        if (rc == AFF_OK)
            t = &traits;
        else if (rc != AFF_ENOTFOUND)
            return aff__fail(err, rc, "%s", terr.msg);
    }
    const pipeline_context *ctx = j->req->context;
    int hour = ctx && ctx->hour >= 0 ? ctx->hour : -1;
    if (hour < 0) {
        time_t now = time(NULL);
        struct tm tm;
        gmtime_r(&now, &tm);
        hour = tm.tm_hour;
    }
    pipeline_boost *b = calloc(r->n_boosts ? r->n_boosts : 1, sizeof *b);
    pipeline_promotion *pr = calloc(r->n_promotions ? r->n_promotions : 1, sizeof *pr);
    if (!b || !pr) {
        free(b);
        free(pr);
        return aff__fail(err, AFF_ENOMEM, "out of memory applying audiences");
    }
    uint32_t nb = 0, np = 0;
    for (uint32_t i = 0; i < r->n_boosts; i++)
        if (audience_matches(r->boosts[i].audience, t, ctx, hour)) b[nb++] = r->boosts[i];
    for (uint32_t i = 0; i < r->n_promotions; i++)
        if (audience_matches(r->promotions[i].audience, t, ctx, hour)) pr[np++] = r->promotions[i];
    j->owned_rules[3] = b;
    j->owned_rules[4] = pr;
    r->boosts = b;
    r->n_boosts = nb;
    r->promotions = pr;
    r->n_promotions = np;
    return AFF_OK;
}

static int start_rerank(pipeline_job *j, aff_err *err)
{
    const pipeline_request *req = j->req;
    if (!req->user_id && !req->vector)
        return aff__fail(err, AFF_EINVAL, "set user_vector (or user_id) to say who the user is");
    if (req->n_candidates < 1 || req->n_candidates > AFF_MAX_RERANK_CANDIDATES)
        return aff__fail(err, AFF_EINVAL, "%u candidates; Rerank takes 1..%d", req->n_candidates,
                         AFF_MAX_RERANK_CANDIDATES);
    float weight = req->weight;
    if (!(weight >= 0.0f && weight <= 1.0f))
        return aff__fail(err, AFF_EINVAL, "affinity_weight %g is outside 0..1", (double)weight);
    const float *vector = req->vector;
    uint32_t dim = req->dim;
    const char *space = req->collection;
    j->out.source = PIPELINE_SOURCE_VECTOR;
    if (req->user_id) {
        int rc = profiles_plan_recommend(j->p->profiles, req->collection, req->user_id, NULL, 0,
                                         NULL, &j->plan, err);
        if (rc) return rc;
        j->has_plan = true;
        if ((rc = pipeline_user_source_resolve(j->p, req->collection, req->user_id, req->space,
                                               NULL, &j->plan, &j->src, err)))
            return rc;
        if (j->src.source == PIPELINE_SOURCE_POPULARITY) {
            /* No personal signal: keep the caller's ranking (weight 0, any valid vector). */
            free(j->src.vector);
            j->src.vector = calloc(j->dim, sizeof *j->src.vector);
            if (!j->src.vector) return aff__fail(err, AFF_ENOMEM, "out of memory");
            j->src.vector[0] = 1.0f;
            j->src.dim = j->dim;
            j->out.rerank_without_profile = true;
            j->out.source = PIPELINE_SOURCE_UNSPECIFIED;
            weight = 0.0f;
        } else {
            j->out.source = j->src.source;
            space = j->src.space;
        }
        vector = j->src.vector;
        dim = j->src.dim;
    }
    j->rerank_out = calloc(req->n_candidates, sizeof *j->rerank_out);
    j->qerrs = j->block = calloc(1, sizeof *j->qerrs);
    if (!j->rerank_out || !j->qerrs) return aff__fail(err, AFF_ENOMEM, "out of memory");
    j->rq = (aff_rerank_query){.vector = vector,
                               .dim = dim,
                               .ids = req->candidate_ids,
                               .base_scores = req->base_scores,
                               .n = req->n_candidates,
                               .weight = weight};
    j->out.rerank = j->rerank_out;
    j->out.n_rerank = req->n_candidates;
    j->br = (batcher_request){.kind = BATCHER_RERANK,
                              .collection = space,
                              .nq = 1,
                              .rerank = &j->rq,
                              .rerank_out = j->rerank_out,
                              .query_errs = j->qerrs,
                              .done = batch_done,
                              .user = j};
    return AFF_OK;
}

/* Plans a RECOMMEND or SIMILAR job: sources, filters, engine queries. *now is set when the
 * answer is computed already (popularity). */
static int plan_search(pipeline_job *j, bool *now, aff_err *err)
{
    const pipeline_request *req = j->req;
    *now = false;
    if (req->k < 1 || req->k > AFF_MAX_K)
        return aff__fail(err, AFF_EINVAL, "k = %u is out of range 1..%d", req->k, AFF_MAX_K);
    j->k = req->k;
    int rc;
    const pipeline_rules *preset;
    if ((rc = find_preset(j, req->preset, &preset, err))) return rc;
    if ((rc = merge_rules(preset, req->rules, &j->rules, j->owned_rules, err))) return rc;
    if (j->has_arm && j->assign.arm.has_diversity) {
        j->rules.has_diversity = true;
        j->rules.diversity = j->assign.arm.diversity;
    }
    if (j->has_arm && j->assign.arm.has_exploration) {
        j->rules.has_exploration = true;
        j->rules.exploration_share = j->assign.arm.exploration_share;
    }
    if ((rc = pipeline_validate_rules(&j->rules, j->k, "rules", err))) return rc;
    if (req->context && (req->context->hour < -1 || req->context->hour > 23))
        return aff__fail(err, AFF_EINVAL, "context.hour = %d is outside 0..23", req->context->hour);
    j->ranked = rules_active(&j->rules);
    j->base = req->filter;
    j->n_groups = 1;
    if (req->kind == PIPELINE_RECOMMEND && req->recipe != WIDGETS_RECIPE_PERSONALIZED) {
        if ((rc = plan_widget(j, err))) return rc;
    } else if (req->kind == PIPELINE_RECOMMEND && req->n_item_ids) {
        return aff__fail(err, AFF_EINVAL,
                         "item_ids: recipe RECIPE_PERSONALIZED takes no item ids (%u given); "
                         "set a widget recipe such as RECIPE_FREQUENTLY_BOUGHT_TOGETHER",
                         req->n_item_ids);
    } else if (req->kind == PIPELINE_SIMILAR) {
        if (req->n_item_ids < 1 || req->n_item_ids > 1024)
            return aff__fail(err, AFF_EINVAL, "%u item ids; SimilarItems takes 1..%d per call",
                             req->n_item_ids, 1024);
        j->n_groups = req->n_item_ids;
        j->src.source = PIPELINE_SOURCE_ITEM;
        j->src.reason = PIPELINE_REASON_SIMILAR_TO_ITEM;
        snprintf(j->src.space, sizeof j->src.space, "%s", req->collection);
        /* A learned-only collection has only its behaviour space. */
        bool has_content = true;
        if (req->space == PIPELINE_SPACE_AUTO &&
            (rc = engine_collection_has_content(j->p->engine, req->collection, &has_content, err)))
            return rc;
        if (req->space == PIPELINE_SPACE_BEHAVIOUR || !has_content) {
            bool found = false;
            uint32_t vdim = 0;
            if (j->p->model &&
                (rc = model_space(j->p->model, req->collection, j->src.space, &vdim, &found, err)))
                return rc;
            if (!found)
                return aff__fail(err, AFF_EPRECONDITION,
                                 "space SPACE_BEHAVIOUR needs a trained model; collection \"%s\" "
                                 "has none yet (call Train)",
                                 req->collection);
            j->vcoll = j->src.space;
            j->vdim = vdim;
            j->vmetric = AFF_METRIC_IP;
        }
    } else if (req->user_id) {
        const char *types[8];
        size_t nt;
        if ((rc = exclude_types(req, types, &nt, err))) return rc;
        if ((rc = profiles_plan_recommend(j->p->profiles, req->collection, req->user_id, types, nt,
                                          req->filter, &j->plan, err)))
            return rc;
        j->has_plan = true;
        j->base = &j->plan.filter;
        if ((rc = pipeline_user_source_resolve(j->p, req->collection, req->user_id, req->space,
                                               ranked_by(j, req->collection), &j->plan, &j->src,
                                               err)))
            return rc;
        j->qvec = j->src.vector;
        if (j->src.source == PIPELINE_SOURCE_MODEL) {
            j->vcoll = j->src.space;
            j->vdim = j->src.dim;
            j->vmetric = AFF_METRIC_IP;
        }
    } else {
        if (!req->vector)
            return aff__fail(err, AFF_EINVAL,
                             "set user_vector (or user_id) to say who the user is");
        if (req->n_exclude_event_types)
            return aff__fail(err, AFF_EINVAL,
                             "exclude_event_types needs a user_id with history; a user_vector "
                             "has none (use filter.exclude_ids instead)");
        if (req->dim == 0)
            return aff__fail(err, AFF_EINVAL, "user_vector is empty; it needs %u values", j->dim);
        j->src.source = PIPELINE_SOURCE_VECTOR;
        j->src.reason = PIPELINE_REASON_MATCHES_VECTOR;
        snprintf(j->src.space, sizeof j->src.space, "%s", req->collection);
        j->qvec = req->vector;
    }
    if ((rc = apply_audiences(j, err))) return rc;
    j->ranked = rules_active(&j->rules);
    j->out.source = j->src.source;
    const pipeline_rules *r = &j->rules;
    if (r->has_exploration && r->exploration_share > 0.0f) {
        j->out.exploration_seed = r->exploration_seed;
        while (!j->out.exploration_seed)
            if (getrandom(&j->out.exploration_seed, sizeof j->out.exploration_seed, 0) !=
                sizeof j->out.exploration_seed)
                j->out.exploration_seed = (uint64_t)now_ns();
    }
    /* Over-fetch when the rules need room (overfetch_k). */
    const pipeline_query_shape shape = pipeline_query_shape_of(r, j->k);
    j->kq = j->ranked ? shape.organic_k : j->k;
    j->per_group = 1 + r->n_promotions;
    /* Promotion queries: the promotion's filter plus the shopper's exclusions. */
    uint32_t n_base_ex = j->base ? j->base->n_exclude_ids : 0;
    size_t n_ex = 0;
    for (uint32_t q = 0; q < r->n_promotions; q++)
        n_ex += (size_t)r->promotions[q].filter.n_exclude_ids + n_base_ex;
    size_t nq = (size_t)j->n_groups * j->per_group;
    /* The job's arrays in one zeroed block (j->block), each at a multiple of 16 bytes. */
    const size_t n_pf = r->n_promotions ? r->n_promotions : 1, n_pe = n_ex ? n_ex : 1,
                 n_hit = (size_t)j->n_groups * j->k;
#define SZ(n, type) (((n) * sizeof(type) + 15) & ~(size_t)15)
    char *b = j->block = calloc(
        1, SZ(n_pf, aff_filter) + SZ(n_pe, const char *) + SZ(nq, aff_query) + SZ(nq, uint32_t) +
               SZ(nq, size_t) + SZ(nq, aff_err) + SZ(n_hit, pipeline_hit) +
               SZ(j->n_groups, const pipeline_hit *) + SZ(j->n_groups, uint32_t));
    if (!b) return aff__fail(err, AFF_ENOMEM, "out of memory preparing the query");
    j->promo_filters = carve(&b, SZ(n_pf, aff_filter));
    j->promo_excl = carve(&b, SZ(n_pe, const char *));
    j->queries = carve(&b, SZ(nq, aff_query));
    j->cand_n = carve(&b, SZ(nq, uint32_t));
    j->cand_off = carve(&b, SZ(nq, size_t));
    j->qerrs = carve(&b, SZ(nq, aff_err));
    j->hits = carve(&b, SZ(n_hit, pipeline_hit));
    j->hit_ptrs = carve(&b, SZ(j->n_groups, const pipeline_hit *));
    j->n_hits = carve(&b, SZ(j->n_groups, uint32_t));
#undef SZ
    size_t at = 0;
    for (uint32_t q = 0; q < r->n_promotions; q++) {
        const aff_filter *pf = &r->promotions[q].filter;
        aff_filter *f = &j->promo_filters[q];
        *f = *pf;
        f->exclude_ids = j->promo_excl + at;
        for (uint32_t i = 0; i < pf->n_exclude_ids; i++)
            j->promo_excl[at++] = pf->exclude_ids[i];
        for (uint32_t i = 0; i < n_base_ex; i++)
            j->promo_excl[at++] = j->base->exclude_ids[i];
        f->n_exclude_ids = pf->n_exclude_ids + n_base_ex;
    }
    j->kpromo = shape.promotion_k;
    for (uint32_t g = 0; g < j->n_groups; g++) {
        for (uint32_t q = 0; q < j->per_group; q++) {
            size_t i = qidx(j, g, q);
            aff_query *aq = &j->queries[i];
            aq->k = q == 0 ? j->kq : j->kpromo;
            aq->filter = q == 0 ? j->base : &j->promo_filters[q - 1];
            if (q == 0) aq->max_per_category = shape.organic_cap;
            if (req->kind == PIPELINE_SIMILAR) {
                aq->item_id = req->item_ids[g];
            } else {
                aq->vector = j->qvec;
                aq->dim = req->user_id ? j->src.dim : req->dim;
            }
        }
    }
    size_t off = 0;
    for (size_t i = 0; i < nq; i++) {
        j->cand_off[i] = off;
        off += j->queries[i].k;
    }
    j->cand = calloc(off ? off : 1, sizeof *j->cand);
    if (!j->cand) return aff__fail(err, AFF_ENOMEM, "out of memory preparing the query");
    if (j->src.source == PIPELINE_SOURCE_POPULARITY && !j->src.vector) {
        if ((rc = run_popularity(j, err))) return rc;
        *now = true;
        return AFF_OK;
    }
    if (j->src.source > PIPELINE_SOURCE_WIDGET) {
        if ((rc = run_widget(j, err))) return rc;
        *now = true;
        return AFF_OK;
    }
    /* Validate every query now, so a bad request fails before it is queued. */
    for (size_t i = 0; i < nq; i++) {
        rc = engine_validate_query(j->p->engine, j->src.space, &j->queries[i], err);
        if (rc == AFF_OK) continue;
        if (req->kind == PIPELINE_SIMILAR && j->n_groups > 1) {
            aff_err e2 = *err;
            return aff__fail(err, rc, "item %u: %s", group_of(j, i), e2.msg);
        }
        if (req->kind == PIPELINE_RECOMMEND && !req->user_id && rc == AFF_EINVAL &&
            strstr(err->msg, "query vector")) {
            aff_err e2 = *err;
            return aff__fail(err, rc, "user_vector: %s", e2.msg);
        }
        return rc;
    }
    /* One round: the organic queries and, beside each, its promotions' queries with the same
     * vector, which the engine scores in the same pass (backend_search.same_as: one scan,
     * a heap per filter), so a promotion costs heap work, not a second scan or round. */
    j->br = (batcher_request){.kind = BATCHER_SEARCH,
                              .collection = j->src.space,
                              .nq = nq,
                              .scans = j->n_groups, /* max_batch counts each group once */
                              .queries = j->queries,
                              .hits = j->cand,
                              .n_hits = j->cand_n,
                              .query_errs = j->qerrs,
                              .done = batch_done,
                              .user = j};
    return AFF_OK;
}

int pipeline_start(aff_pipeline *p, const pipeline_request *req, int64_t deadline_ns,
                   pipeline_done_fn done, void *user, pipeline_job **out, bool *pending,
                   aff_err *err)
{
    *out = NULL;
    *pending = false;
    pipeline_job *j = calloc(1, sizeof *j);
    if (!j) return aff__fail(err, AFF_ENOMEM, "out of memory preparing the query");
    j->p = p;
    j->eff = *req;
    j->req = &j->eff;
    j->done = done;
    j->user = user;
    recommendation_id(j->out.recommendation_id);
    if (req->surface && req->surface[0] && !outcomes_label_ok(req->surface)) {
        pipeline_job_destroy(j);
        return aff__fail(err, AFF_EINVAL,
                         "surface: \"%.64s\" must be 1..%d bytes of [A-Za-z0-9_.:-]", req->surface,
                         OUTCOMES_MAX_LABEL);
    }
    assign_arm(j);
    int rc = engine_collection_shape(p->engine, req->collection, &j->dim, &j->metric, err);
    j->vcoll = req->collection;
    j->vdim = j->dim;
    j->vmetric = j->metric;
    if (rc == AFF_OK && req->space != PIPELINE_SPACE_AUTO && req->space != PIPELINE_SPACE_CONTENT &&
        req->space != PIPELINE_SPACE_BEHAVIOUR)
        rc = aff__fail(err, AFF_EINVAL, "space %d is unknown; use SPACE_CONTENT or SPACE_BEHAVIOUR",
                       (int)req->space);
    bool now = false;
    if (rc == AFF_OK) {
        if (req->kind == PIPELINE_RERANK)
            rc = start_rerank(j, err);
        else
            rc = plan_search(j, &now, err);
    }
    if (rc) {
        pipeline_job_destroy(j);
        return rc;
    }
    j->out.n_results = j->n_groups;
    j->out.hits = j->hit_ptrs;
    j->out.n_hits = j->n_hits;
    if (now) {
        record_job(j);
        *out = j;
        return AFF_OK;
    }
    j->br.deadline_ns = deadline_ns;
    *out = j; /* published first: done may run before batcher_submit returns */
    if ((rc = batcher_submit(p->batcher, &j->br, err))) {
        *out = NULL;
        pipeline_job_destroy(j);
        return rc;
    }
    *pending = true;
    return AFF_OK;
}

/* ---- pages --------------------------------------------------------------------------------- */

/* Slots of different collections run at once; slots of one collection run one after another,
 * each excluding the items its collection's earlier slots show, so no item appears twice and
 * every slot still fills. */
struct pipeline_page {
    pipeline_page_output out; /* first: what the caller reads */
    aff_pipeline *p;
    const pipeline_page_request *req;
    pipeline_page_done_fn done;
    void *user;
    int64_t deadline_ns;
    preset_set *presets; /* while the layout's slots are borrowed */
    const pipeline_slot *slots;
    uint32_t n;
    pipeline_request *reqs; /* per slot */
    aff_filter *filters;    /* per slot: its filter plus the page's earlier items */
    const char **excl;      /* the exclusion lists, slot s at excl + excl_off[s] */
    size_t *excl_off;
    struct page_slot_ref {
        pipeline_page *pg;
        uint32_t slot;
    } * refs;              /* per slot: the completion's context */
    pipeline_rules *rules; /* per slot: its rules less pins of items shown earlier */
    pipeline_pin *pins;    /* per slot, PIPELINE_MAX_PINS */
    pipeline_job **jobs;
    pipeline_hit *hits; /* per slot, k of the slot */
    pipeline_hit **hit_ptrs;
    uint32_t *n_hits;
    pipeline_source *sources;
    atomic_int remaining; /* slots not finished, plus one while starting */
    pthread_mutex_t mu;   /* guards out.status / out.err */
};

const pipeline_page_output *pipeline_page_output_of(const pipeline_page *page)
{
    return &page->out;
}

void pipeline_page_destroy(pipeline_page *pg)
{
    if (!pg) return;
    for (uint32_t i = 0; pg->jobs && i < pg->n; i++)
        pipeline_job_destroy(pg->jobs[i]);
    preset_set_unref(pg->presets);
    pthread_mutex_destroy(&pg->mu);
    free(pg->reqs);
    free(pg->filters);
    free(pg->excl);
    free(pg->excl_off);
    free(pg->refs);
    free(pg->rules);
    free(pg->pins);
    free(pg->jobs);
    free(pg->hits);
    free(pg->hit_ptrs);
    free(pg->n_hits);
    free(pg->sources);
    free(pg);
}

static void page_fail(pipeline_page *pg, uint32_t slot, const aff_err *e)
{
    pthread_mutex_lock(&pg->mu);
    if (pg->out.status == AFF_OK) {
        pg->out.status = e->code ? e->code : AFF_EINTERNAL;
        aff__fail(&pg->out.err, pg->out.status, "slots[%u] (%.64s): %s", slot,
                  pg->slots[slot].name ? pg->slots[slot].name : "", e->msg);
    }
    pthread_mutex_unlock(&pg->mu);
}

static bool same_collection(const pipeline_page *pg, uint32_t a, uint32_t b)
{
    return strcmp(pg->slots[a].collection, pg->slots[b].collection) == 0;
}

static bool page_shows(const pipeline_page *pg, uint32_t before, uint32_t slot, const char *id)
{
    for (uint32_t e = 0; e < before; e++) {
        if (!same_collection(pg, e, slot)) continue;
        for (uint32_t t = 0; t < pg->n_hits[e]; t++)
            if (strcmp(pg->hit_ptrs[e][t].id, id) == 0) return true;
    }
    return false;
}

static void page_run_slot(pipeline_page *pg, uint32_t s);

/* Records a finished page for attribution under its one recommendation id: one record per
 * collection of its slots (an event names its collection), strategy "page". */
static void page_record(pipeline_page *pg)
{
    if (!pg->p->outcomes || pg->out.status != AFF_OK) return;
    size_t total = 0;
    for (uint32_t s = 0; s < pg->n; s++)
        total += pg->n_hits[s];
    const char **ids = malloc((total ? total : 1) * sizeof *ids);
    if (!ids) return;
    const char *surface = pg->req->surface && pg->req->surface[0] ? pg->req->surface
                          : pg->req->layout && pg->req->layout[0] ? pg->req->layout
                                                                  : "page";
    for (uint32_t s = 0; s < pg->n; s++) {
        bool first = true;
        for (uint32_t e = 0; e < s && first; e++)
            first = !same_collection(pg, e, s);
        if (!first) continue;
        size_t m = 0;
        for (uint32_t t = s; t < pg->n; t++) {
            if (t != s && !same_collection(pg, s, t)) continue;
            for (uint32_t i = 0; i < pg->n_hits[t]; i++)
                ids[m++] = pg->hit_ptrs[t][i].id;
        }
        outcomes_labels l = {
            .collection = pg->slots[s].collection, .surface = surface, .strategy = "page"};
        aff_err err;
        if (outcomes_record(pg->p->outcomes, pg->out.recommendation_id, &l, ids, (uint32_t)m, &err))
            aff_log(AFF_LOG_DEBUG, "page not recorded: %s", err.msg);
    }
    free(ids);
}

/* Slot s finished (or failed to start): keep its hits, start the next slot of its collection,
 * and finish the page when it was the last. Returns true when this call finished the page. */
static bool page_slot_finished(pipeline_page *pg, uint32_t s)
{
    const pipeline_output *o = pg->jobs[s] ? pipeline_job_output(pg->jobs[s]) : NULL;
    if (o && o->status) page_fail(pg, s, &o->err);
    if (o && !o->status) {
        uint32_t m = 0;
        for (uint32_t i = 0; i < o->n_hits[0] && m < pg->slots[s].k; i++)
            if (!page_shows(pg, s, s, o->hits[0][i].id)) /* pins of an item shown earlier */
                pg->hit_ptrs[s][m++] = o->hits[0][i];
        pg->n_hits[s] = m;
        pg->sources[s] = o->source;
    }
    for (uint32_t next = s + 1; next < pg->n; next++) {
        if (!same_collection(pg, s, next)) continue;
        page_run_slot(pg, next);
        break;
    }
    return atomic_fetch_sub(&pg->remaining, 1) == 1;
}

static void page_slot_done(pipeline_job *job, void *user)
{
    (void)job;
    struct page_slot_ref *ref = user;
    pipeline_page *pg = ref->pg;
    if (page_slot_finished(pg, ref->slot)) {
        page_record(pg);
        pg->done(pg, pg->user);
    }
}

/* Starts slot s with the items its collection's earlier slots show excluded. */
static void page_run_slot(pipeline_page *pg, uint32_t s)
{
    const pipeline_slot *sl = &pg->slots[s];
    aff_filter *f = &pg->filters[s];
    if (sl->filter)
        *f = *sl->filter;
    else
        aff_filter_init(f);
    const char **ex = pg->excl + pg->excl_off[s];
    uint32_t n = 0;
    for (uint32_t i = 0; sl->filter && i < sl->filter->n_exclude_ids; i++)
        ex[n++] = sl->filter->exclude_ids[i];
    for (uint32_t e = 0; e < s; e++) {
        if (!same_collection(pg, e, s)) continue;
        for (uint32_t t = 0; t < pg->n_hits[e]; t++)
            ex[n++] = pg->hit_ptrs[e][t].id;
    }
    f->exclude_ids = ex;
    f->n_exclude_ids = n;
    const pipeline_rules *rules = sl->rules;
    if (rules && rules->n_pins) { /* an item shown earlier is not pinned again */
        pipeline_rules *r = &pg->rules[s];
        pipeline_pin *pins = pg->pins + (size_t)s * PIPELINE_MAX_PINS;
        *r = *rules;
        r->n_pins = 0;
        for (uint32_t i = 0; i < rules->n_pins; i++)
            if (!page_shows(pg, s, s, rules->pins[i].item_id)) pins[r->n_pins++] = rules->pins[i];
        r->pins = pins;
        rules = r;
    }
    pg->reqs[s] = (pipeline_request){.unrecorded = true,
                                     .kind = PIPELINE_RECOMMEND,
                                     .collection = sl->collection,
                                     .user_id = pg->req->user_id,
                                     .k = sl->k,
                                     .filter = f,
                                     .exclude_event_types = pg->req->exclude_event_types,
                                     .n_exclude_event_types = pg->req->n_exclude_event_types,
                                     .preset = sl->preset,
                                     .rules = rules,
                                     .context = pg->req->context,
                                     .recipe = sl->recipe};
    bool pending = false;
    aff_err err;
    /* pipeline_start publishes the job in pg->jobs[s] before it can complete. */
    int rc = pipeline_start(pg->p, &pg->reqs[s], pg->deadline_ns, page_slot_done, &pg->refs[s],
                            &pg->jobs[s], &pending, &err);
    if (rc) page_fail(pg, s, &err);
    if (rc || !pending) {
        if (page_slot_finished(pg, s)) {
            page_record(pg);
            pg->done(pg, pg->user);
        }
    }
}

static int find_layout(pipeline_page *pg, const char *name, aff_err *err)
{
    pg->presets = presets_acquire(pg->p);
    for (size_t i = 0; pg->presets && i < pg->presets->n_layouts; i++) {
        if (strcmp(pg->presets->layout_names[i], name) == 0) {
            pg->slots = pg->presets->layouts[i];
            pg->n = pg->presets->layout_sizes[i];
            return AFF_OK;
        }
    }
    return aff__fail(err, AFF_EINVAL,
                     "layout \"%.64s\" is unknown; layouts are configured in the serving config "
                     "(--serving-config)",
                     name);
}

int pipeline_page_start(aff_pipeline *p, const pipeline_page_request *req, int64_t deadline_ns,
                        pipeline_page_done_fn done, void *user, pipeline_page **out, bool *pending,
                        aff_err *err)
{
    *out = NULL;
    *pending = false;
    pipeline_page *pg = calloc(1, sizeof *pg);
    if (!pg) return aff__fail(err, AFF_ENOMEM, "out of memory preparing the page");
    pthread_mutex_init(&pg->mu, NULL);
    pg->p = p;
    pg->req = req;
    pg->done = done;
    pg->user = user;
    pg->deadline_ns = deadline_ns;
    pg->slots = req->slots;
    pg->n = req->n_slots;
    recommendation_id(pg->out.recommendation_id);
    int rc = AFF_OK;
    if (!req->user_id || !req->user_id[0]) {
        rc = aff__fail(err, AFF_EINVAL, "user_id is required: whose page is it?");
        goto fail;
    }
    if (req->surface && req->surface[0] && !outcomes_label_ok(req->surface)) {
        rc = aff__fail(err, AFF_EINVAL, "surface: \"%.64s\" must be 1..%d bytes of [A-Za-z0-9_.:-]",
                       req->surface, OUTCOMES_MAX_LABEL);
        goto fail;
    }
    if (!pg->n && req->layout && req->layout[0] && (rc = find_layout(pg, req->layout, err)))
        goto fail;
    if (pg->n < 1 || pg->n > PIPELINE_MAX_SLOTS) {
        rc = aff__fail(err, AFF_EINVAL, "%u slots; a page has 1..%d (set slots or layout)", pg->n,
                       PIPELINE_MAX_SLOTS);
        goto fail;
    }
    size_t total_k = 0, total_ex = 0;
    if (!(pg->excl_off = calloc(pg->n, sizeof *pg->excl_off))) goto nomem;
    for (uint32_t s = 0; s < pg->n; s++) {
        const pipeline_slot *sl = &pg->slots[s];
        size_t len = sl->name ? strnlen(sl->name, PIPELINE_MAX_NAME_LEN + 1) : 0;
        if (len < 1 || len > PIPELINE_MAX_NAME_LEN) {
            rc = aff__fail(err, AFF_EINVAL, "slots[%u].name must be 1..%d bytes", s,
                           PIPELINE_MAX_NAME_LEN);
            goto fail;
        }
        if (!sl->collection || !sl->collection[0]) {
            rc = aff__fail(err, AFF_EINVAL, "slots[%u].collection is required", s);
            goto fail;
        }
        if (sl->k < 1 || sl->k > AFF_MAX_K) {
            rc = aff__fail(err, AFF_EINVAL, "slots[%u].k = %u is out of range 1..%d", s, sl->k,
                           AFF_MAX_K);
            goto fail;
        }
        char field[32];
        snprintf(field, sizeof field, "slots[%u].rules", s);
        if ((rc = pipeline_validate_rules(sl->rules, sl->k, field, err))) goto fail;
        total_k += sl->k;
        pg->excl_off[s] = total_ex;
        total_ex += sl->filter ? sl->filter->n_exclude_ids : 0;
        for (uint32_t e = 0; e < s; e++)
            if (strcmp(pg->slots[e].collection, sl->collection) == 0) total_ex += pg->slots[e].k;
    }
    pg->reqs = calloc(pg->n, sizeof *pg->reqs);
    pg->filters = calloc(pg->n, sizeof *pg->filters);
    pg->excl = calloc(total_ex ? total_ex : 1, sizeof *pg->excl);
    pg->refs = calloc(pg->n, sizeof *pg->refs);
    pg->rules = calloc(pg->n, sizeof *pg->rules);
    pg->pins = calloc((size_t)pg->n * PIPELINE_MAX_PINS, sizeof *pg->pins);
    pg->jobs = calloc(pg->n, sizeof *pg->jobs);
    pg->hits = calloc(total_k, sizeof *pg->hits);
    pg->hit_ptrs = calloc(pg->n, sizeof *pg->hit_ptrs);
    pg->n_hits = calloc(pg->n, sizeof *pg->n_hits);
    pg->sources = calloc(pg->n, sizeof *pg->sources);
    if (!pg->reqs || !pg->filters || !pg->excl || !pg->refs || !pg->rules || !pg->pins ||
        !pg->jobs || !pg->hits || !pg->hit_ptrs || !pg->n_hits || !pg->sources)
        goto nomem;
    size_t off = 0;
    for (uint32_t s = 0; s < pg->n; s++) {
        pg->refs[s] = (struct page_slot_ref){pg, s};
        pg->hit_ptrs[s] = pg->hits + off;
        off += pg->slots[s].k;
    }
    pg->out.n_slots = pg->n;
    pg->out.slots = pg->slots;
    pg->out.hits = (const pipeline_hit *const *)pg->hit_ptrs;
    pg->out.n_hits = pg->n_hits;
    pg->out.sources = pg->sources;
    atomic_init(&pg->remaining, (int)pg->n + 1);
    /* The first slot of each collection starts now; each finished slot starts the next one of
     * its collection. */
    for (uint32_t s = 0; s < pg->n; s++) {
        bool first = true;
        for (uint32_t e = 0; e < s && first; e++)
            first = strcmp(pg->slots[e].collection, pg->slots[s].collection) != 0;
        if (first) page_run_slot(pg, s);
    }
    if (atomic_fetch_sub(&pg->remaining, 1) != 1) {
        *out = pg; /* the last slot's completion calls done */
        *pending = true;
        return AFF_OK;
    }
    page_record(pg);
    *out = pg;
    return AFF_OK;
nomem:
    rc = aff__fail(err, AFF_ENOMEM, "out of memory preparing the page");
fail:
    pipeline_page_destroy(pg);
    return rc;
}

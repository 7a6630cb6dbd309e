/*
 * demo.c: owns the deterministic demo shop (see demo.h). Rules kept: one PRNG stream with a
 * fixed seed, consumed in a fixed order, so every run builds the identical catalog.
 */
#include "demo.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "rng.h"

#define DEMO_SEED    0x5eed0af1u
#define UPSERT_CHUNK 5000

const char *const demo_category_names[DEMO_CATEGORIES] = {
    "electronics", "phones",    "laptops", "audio",  "cameras",       "gaming",      "books",
    "music",       "movies",    "toys",    "baby",   "fashion-women", "fashion-men", "shoes",
    "jewelry",     "beauty",    "health",  "sports", "outdoors",      "garden",      "home",
    "kitchen",     "furniture", "pets",    "grocery"};

/* Typical price per category (the demo draws prices around it). */
static const float base_price[DEMO_CATEGORIES] = {199, 499, 999, 89, 449, 59,  15, 12, 14,
                                                  25,  35,  49,  45, 79,  149, 22, 18, 39,
                                                  69,  29,  45,  35, 299, 19,  6};

static const char *const tag_names[] = {"sale",    "new",  "bestseller", "eco",
                                        "premium", "gift", "limited",    "clearance"};
#define N_TAGS (sizeof tag_names / sizeof tag_names[0])

static void normalize(float *v)
{
    double s = 0;
    for (int j = 0; j < DEMO_DIM; j++)
        s += (double)v[j] * v[j];
    float inv = s > 0 ? (float)(1.0 / sqrt(s)) : 0;
    for (int j = 0; j < DEMO_DIM; j++)
        v[j] *= inv;
}

static int create(aff_catalog *catalog, const char *name, aff_err *err)
{
    engine_collection_spec spec = {
        .name = name, .dim = DEMO_DIM, .metric = AFF_METRIC_COSINE, .index = BACKEND_INDEX_FLAT};
    return catalog_create_collection(catalog, &spec, err);
}

bool demo_present(aff_engine *e)
{
    static const char *const names[] = {"products", "categories", "banners", "offers"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        uint32_t dim;
        if (engine_collection_dim(e, names[i], &dim, NULL) == AFF_OK) return true;
    }
    return false;
}

int demo_load(aff_catalog *catalog, aff_err *err)
{
    int rc = 0;
    aff_rng r = {DEMO_SEED};
    float(*centroid)[DEMO_DIM] = calloc(DEMO_CATEGORIES, sizeof *centroid);
    float *vecs = calloc((size_t)UPSERT_CHUNK * DEMO_DIM, sizeof *vecs);
    aff_item *items = calloc(UPSERT_CHUNK, sizeof *items);
    char(*ids)[16] = calloc(UPSERT_CHUNK, sizeof *ids);
    const char *(*tags)[3] = calloc(UPSERT_CHUNK, sizeof *tags);
    if (!centroid || !vecs || !items || !ids || !tags) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory building the demo shop");
        goto out;
    }
    for (int c = 0; c < DEMO_CATEGORIES; c++) {
        for (int j = 0; j < DEMO_DIM; j++)
            centroid[c][j] = (float)aff_rng_normal(&r);
        normalize(centroid[c]);
    }

    /* products */
    if ((rc = create(catalog, "products", err))) goto out;
    for (uint32_t base = 0; base < DEMO_PRODUCTS; base += UPSERT_CHUNK) {
        uint32_t n = DEMO_PRODUCTS - base < UPSERT_CHUNK ? DEMO_PRODUCTS - base : UPSERT_CHUNK;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t cat = (uint32_t)(aff_rng_next(&r) % DEMO_CATEGORIES);
            float *v = vecs + (size_t)i * DEMO_DIM;
            for (int j = 0; j < DEMO_DIM; j++)
                v[j] = centroid[cat][j] + 0.12f * (float)aff_rng_normal(&r);
            normalize(v);
            snprintf(ids[i], sizeof ids[i], "p%06u", base + i);
            uint32_t n_tags = (uint32_t)(aff_rng_next(&r) % 4);
            for (uint32_t t = 0; t < n_tags && t < 3; t++)
                tags[i][t] = tag_names[aff_rng_next(&r) % N_TAGS];
            float price = base_price[cat] * (float)exp(0.45 * (float)aff_rng_normal(&r));
            price = floorf(price) + 0.99f;
            bool available = aff_rng_next(&r) % 10 != 0;
            items[i] = (aff_item){.id = ids[i],
                                  .vector = v,
                                  .dim = DEMO_DIM,
                                  .attrs.category = demo_category_names[cat],
                                  .attrs.tags = tags[i],
                                  .attrs.n_tags = n_tags < 3 ? n_tags : 3,
                                  .attrs.price = price,
                                  .attrs.available = available};
        }
        if ((rc = catalog_upsert(catalog, "products", items, n, err))) goto out;
    }

    /* categories: one item per category at its centroid */
    if ((rc = create(catalog, "categories", err))) goto out;
    for (int c = 0; c < DEMO_CATEGORIES; c++)
        items[c] = (aff_item){.id = demo_category_names[c],
                              .vector = centroid[c],
                              .dim = DEMO_DIM,
                              .attrs.category = demo_category_names[c],
                              .attrs.available = true};
    if ((rc = catalog_upsert(catalog, "categories", items, DEMO_CATEGORIES, err))) goto out;

    /* banners: blends of two or three categories */
    static const struct {
        const char *id;
        int cats[3];
        const char *tag;
    } banners[] = {
        {"banner-back-to-school", {6, 2, 9}, "seasonal"},
        {"banner-summer-outdoors", {18, 17, 19}, "seasonal"},
        {"banner-home-makeover", {20, 22, 21}, "campaign"},
        {"banner-new-tech", {0, 1, 3}, "new"},
        {"banner-style-week", {11, 12, 13}, "campaign"},
        {"banner-pet-lovers", {23, 24, -1}, "campaign"},
        {"banner-gaming-night", {5, 8, 7}, "new"},
        {"banner-wellness", {15, 16, 24}, "campaign"},
    };
    if ((rc = create(catalog, "banners", err))) goto out;
    size_t nb = sizeof banners / sizeof banners[0];
    for (size_t b = 0; b < nb; b++) {
        float *v = vecs + b * DEMO_DIM;
        memset(v, 0, DEMO_DIM * sizeof *v);
        for (int k = 0; k < 3; k++)
            if (banners[b].cats[k] >= 0)
                for (int j = 0; j < DEMO_DIM; j++)
                    v[j] += centroid[banners[b].cats[k]][j];
        normalize(v);
        tags[b][0] = banners[b].tag;
        items[b] = (aff_item){.id = banners[b].id,
                              .vector = v,
                              .dim = DEMO_DIM,
                              .attrs.category = demo_category_names[banners[b].cats[0]],
                              .attrs.tags = tags[b],
                              .attrs.n_tags = 1,
                              .attrs.available = true};
    }
    if ((rc = catalog_upsert(catalog, "banners", items, nb, err))) goto out;

    /* offers: one per chosen category, near its centroid */
    static const struct {
        const char *id;
        int cat;
        float price;
    } offers[] = {
        {"offer-phones-trade-in", 1, 100},     {"offer-laptops-student", 2, 150},
        {"offer-books-3-for-2", 6, 0},         {"offer-toys-bundle", 9, 20},
        {"offer-beauty-sample-box", 15, 5},    {"offer-sports-10pct", 17, 10},
        {"offer-garden-free-delivery", 19, 0}, {"offer-kitchen-set", 21, 40},
        {"offer-pets-subscription", 23, 15},   {"offer-grocery-weekly", 24, 8},
    };
    if ((rc = create(catalog, "offers", err))) goto out;
    size_t no = sizeof offers / sizeof offers[0];
    for (size_t o = 0; o < no; o++) {
        float *v = vecs + o * DEMO_DIM;
        for (int j = 0; j < DEMO_DIM; j++)
            v[j] = centroid[offers[o].cat][j] + 0.05f * (float)aff_rng_normal(&r);
        normalize(v);
        tags[o][0] = "offer";
        items[o] = (aff_item){.id = offers[o].id,
                              .vector = v,
                              .dim = DEMO_DIM,
                              .attrs.category = demo_category_names[offers[o].cat],
                              .attrs.tags = tags[o],
                              .attrs.n_tags = 1,
                              .attrs.price = offers[o].price,
                              .attrs.available = true};
    }
    if ((rc = catalog_upsert(catalog, "offers", items, no, err))) goto out;
    aff_log(AFF_LOG_INFO,
            "demo shop loaded: products (%d items, %d categories, d=%d), categories, banners, "
            "offers",
            DEMO_PRODUCTS, DEMO_CATEGORIES, DEMO_DIM);
out:
    free(centroid);
    free(vecs);
    free(items);
    free(ids);
    free(tags);
    return rc;
}

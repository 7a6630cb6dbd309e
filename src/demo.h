/*
 * demo.h: the built-in demo shop that `affinityd --demo` loads, so a first run has something
 * to query at once.
 *
 * Collections (all cosine, d = DEMO_DIM):
 *   "products"   DEMO_PRODUCTS items "p000000".."p099999" in DEMO_CATEGORIES named categories,
 *                clustered around one centroid per category, with prices, availability
 *                (about 90% available) and tags (sale, new, bestseller, eco, premium, gift,
 *                limited, clearance);
 *   "categories" one item per category (id = the category name, vector = its centroid);
 *   "banners"    a few homepage banners, each a blend of two or three categories;
 *   "offers"     a few offers, each tied to one category.
 * Everything comes from a fixed-seed PRNG: the same binary always loads the same shop.
 */
#ifndef AFFINITY_DEMO_H
#define AFFINITY_DEMO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "catalog.h"
#include "engine.h"
#include "status.h"

#define DEMO_DIM        64
#define DEMO_PRODUCTS   100000
#define DEMO_CATEGORIES 25

/* The category names, in index order. */
extern const char *const demo_category_names[DEMO_CATEGORIES];

/* Creates and fills the four demo collections through the catalog (engine and store, so a
 * persistent server keeps them). AFF_EEXIST when one already exists. */
int demo_load(aff_catalog *catalog, aff_err *err);
/* True when e holds any of the four demo collections (e.g. rebuilt from the store). */
bool demo_present(aff_engine *e);

#endif

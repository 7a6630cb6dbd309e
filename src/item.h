/*
 * item.h: what a catalog item is — an id, a vector and its attributes (category, tags,
 * price, availability) — defined once for every module that passes items around (engine,
 * catalog, store, model, CLI readers, transport).
 *
 * Two shapes of the same attributes, for two jobs:
 *   item_attrs   a borrowed view (pointers into the caller's strings): what goes *in* to a
 *                write (aff_item), so a batch of decoded messages is never copied;
 *   item_record  an owned, fixed-size copy: what comes *out* of a read (engine, store,
 *                attribute files), valid after the source has changed or gone.
 * item_record_attrs() turns a record into a view; nothing converts the other way except the
 * engine's and store's readers, which fill records from their own encodings.
 *
 * The rule for attributes lives here, in item_attrs_check(): the engine calls it on every
 * write (its one validation of input), and the store calls it again on what it is about to
 * make durable. The proto boundary (transport_catalog.c) is the only conversion to and from
 * the wire's Item message.
 */
#ifndef AFFINITY_ITEM_H
#define AFFINITY_ITEM_H

#include <stdbool.h>
#include <stdint.h>

#include "affinity/affinity.h"
#include "status.h"

/* An item's attributes, borrowed. */
typedef struct item_attrs {
    const char *category;    /* NULL or "" = none; ≤ AFF_MAX_ATTR_LEN bytes */
    const char *const *tags; /* n_tags strings, each 1..AFF_MAX_ATTR_LEN bytes, in the
                                item's order (kept on read) */
    uint32_t n_tags;         /* ≤ AFF_MAX_TAGS_PER_ITEM */
    float price;             /* finite */
    bool available;
} item_attrs;

/* One item to write; every pointer is borrowed for the duration of the call. */
typedef struct aff_item {
    const char *id;      /* 1..AFF_MAX_ID_LEN bytes, NUL-terminated */
    const float *vector; /* dim finite floats */
    uint32_t dim;        /* floats in vector; must equal the collection's dimension (0 and
                            vector NULL in learned-only collections) */
    item_attrs attrs;
} aff_item;

/* An owned copy of one item's id and attributes (the vector, when wanted, goes to a separate
 * buffer). Plain data: copy it by assignment. */
typedef struct item_record {
    char id[AFF_MAX_ID_LEN + 1];
    char category[AFF_MAX_ATTR_LEN + 1]; /* "" = none */
    char tags[AFF_MAX_TAGS_PER_ITEM][AFF_MAX_ATTR_LEN + 1];
    uint32_t n_tags;
    float price;
    bool available;
} item_record;

/* Checks attributes against the rule above; id names the item in the message. AFF_EINVAL
 * with e.g. "tag 3 of item \"sku-1\" is empty; it must be 1..128 bytes". */
int item_attrs_check(const item_attrs *a, const char *id, aff_err *err);

/* A view of r's attributes; tag_ptrs (AFF_MAX_TAGS_PER_ITEM entries, the caller's) receives
 * the tag pointers. The view borrows r and tag_ptrs. */
item_attrs item_record_attrs(const item_record *r, const char *tag_ptrs[AFF_MAX_TAGS_PER_ITEM]);

#endif

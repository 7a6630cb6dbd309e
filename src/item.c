/*
 * item.c: the one check of an item's attributes, and the record -> view conversion. See
 * item.h.
 */
#include "item.h"

#include <math.h>
#include <string.h>

int item_attrs_check(const item_attrs *a, const char *id, aff_err *err)
{
    if (a->category && strnlen(a->category, AFF_MAX_ATTR_LEN + 1) > AFF_MAX_ATTR_LEN)
        return aff__fail(err, AFF_EINVAL, "category of item \"%s\" is longer than %d bytes", id,
                         AFF_MAX_ATTR_LEN);
    if (a->n_tags > AFF_MAX_TAGS_PER_ITEM)
        return aff__fail(err, AFF_EINVAL, "item \"%s\" has %u tags; at most %d are allowed", id,
                         a->n_tags, AFF_MAX_TAGS_PER_ITEM);
    for (uint32_t t = 0; t < a->n_tags; t++) {
        const char *tag = a->tags ? a->tags[t] : NULL;
        if (!tag || !*tag)
            return aff__fail(err, AFF_EINVAL,
                             "tag %u of item \"%s\" is empty; it must be 1..%d bytes", t, id,
                             AFF_MAX_ATTR_LEN);
        if (strnlen(tag, AFF_MAX_ATTR_LEN + 1) > AFF_MAX_ATTR_LEN)
            return aff__fail(err, AFF_EINVAL, "tag %u of item \"%s\" is longer than %d bytes", t,
                             id, AFF_MAX_ATTR_LEN);
    }
    if (!isfinite(a->price))
        return aff__fail(err, AFF_EINVAL, "price of item \"%s\" is not a finite number", id);
    return AFF_OK;
}

item_attrs item_record_attrs(const item_record *r, const char *tag_ptrs[AFF_MAX_TAGS_PER_ITEM])
{
    for (uint32_t t = 0; t < r->n_tags; t++)
        tag_ptrs[t] = r->tags[t];
    return (item_attrs){.category = r->category,
                        .tags = tag_ptrs,
                        .n_tags = r->n_tags,
                        .price = r->price,
                        .available = r->available};
}

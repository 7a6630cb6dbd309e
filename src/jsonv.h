/*
 * jsonv.h: a small JSON reader that builds a tree of values. Used by the `affinity` CLI for
 * JSONL attribute files and by tests that check the CLI's --json output.
 *
 * The whole text must be one JSON value (surrounding white space allowed). Strings are
 * decoded to UTF-8 (\uXXXX escapes included, surrogate pairs joined). Nesting is limited to
 * 64 levels. A tree is owned by the caller and freed with jsonv_free(); lookups return
 * borrowed pointers into it.
 */
#ifndef AFFINITY_JSONV_H
#define AFFINITY_JSONV_H

#include <stdbool.h>
#include <stddef.h>

#include "status.h"

typedef enum jsonv_type {
    JSONV_NULL,
    JSONV_BOOL,
    JSONV_NUMBER,
    JSONV_STRING,
    JSONV_ARRAY,
    JSONV_OBJECT,
} jsonv_type;

typedef struct jsonv jsonv;
struct jsonv {
    jsonv_type type;
    bool boolean;
    double number;
    char *string; /* JSONV_STRING: decoded; JSONV_NUMBER: the number as written */
    size_t n;     /* elements of an array or members of an object */
    jsonv *items; /* n values */
    char **keys;  /* objects: n member names, parallel to items */
};

/* Parses len bytes of text. AFF_EINVAL with the byte offset in err on malformed input. */
int jsonv_parse(const char *text, size_t len, jsonv **out, aff_err *err);
void jsonv_free(jsonv *v);
/* The member `key` of an object (the last one if repeated), or NULL. */
const jsonv *jsonv_get(const jsonv *obj, const char *key);
/* Element i of an array, or NULL. */
const jsonv *jsonv_at(const jsonv *arr, size_t i);

#endif

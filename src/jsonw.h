/*
 * jsonw.h: a growing text buffer for writing JSON (the counterpart of jsonv.h): printf-style
 * appends and quoted, escaped strings. Used by the experiments module's stored form and the
 * web console's API. Allocation failure is sticky: check `oom` once at the end.
 */
#ifndef AFFINITY_JSONW_H
#define AFFINITY_JSONW_H

#include <stdbool.h>
#include <stddef.h>

typedef struct jsonw {
    char *p; /* NUL-terminated once anything was written; malloc'ed, the caller frees it */
    size_t len, cap;
    bool oom;
} jsonw;

void jsonw_printf(jsonw *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* s as a JSON string: quotes, backslashes and control characters escaped (UTF-8 passes). */
void jsonw_str(jsonw *b, const char *s);
/* A finite double as a JSON number (non-finite values as null). */
void jsonw_num(jsonw *b, double v);

#endif

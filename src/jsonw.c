/*
 * jsonw.c: the JSON text buffer (see jsonw.h).
 */
#include "jsonw.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

void jsonw_printf(jsonw *b, const char *fmt, ...)
{
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if (b->p && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 1024;
        while (cap <= b->len + (size_t)n)
            cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) {
            b->oom = true;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
}

void jsonw_str(jsonw *b, const char *s)
{
    jsonw_printf(b, "\"");
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            jsonw_printf(b, "\\%c", c);
        else if (c < 0x20 || c == 0x7f)
            jsonw_printf(b, "\\u%04x", c);
        else if (c == '<') /* never "</script>" inside a page */
            jsonw_printf(b, "\\u003c");
        else
            jsonw_printf(b, "%c", c);
    }
    jsonw_printf(b, "\"");
}

void jsonw_num(jsonw *b, double v)
{
    if (isfinite(v))
        jsonw_printf(b, "%.17g", v);
    else
        jsonw_printf(b, "null");
}

/*
 * jsonv.c: owns the recursive-descent JSON parser of jsonv.h. Every allocation belongs to
 * the tree being built; on error the partial tree is freed before returning.
 */
#include "jsonv.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct jparser {
    const char *s;
    size_t len, pos;
    int depth;
    aff_err *err;
} jparser;

static int jfail(jparser *p, const char *what)
{
    return aff__fail(p->err, AFF_EINVAL, "malformed JSON at byte %zu: %s", p->pos, what);
}

static void skip_ws(jparser *p)
{
    while (p->pos < p->len && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' ||
                               p->s[p->pos] == '\n' || p->s[p->pos] == '\r'))
        p->pos++;
}

static void value_clear(jsonv *v)
{
    free(v->string);
    for (size_t i = 0; i < v->n; i++) {
        value_clear(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    memset(v, 0, sizeof(*v));
}

static int hex4(jparser *p, uint32_t *out)
{
    if (p->pos + 4 > p->len) return jfail(p, "short \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (uint32_t)(c - 'A' + 10);
        else
            return jfail(p, "bad hex digit in \\u escape");
    }
    *out = v;
    return AFF_OK;
}

static size_t put_utf8(char *o, uint32_t cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Parses a string at p->pos (which is at the opening quote) into a malloc'ed C string. */
static int parse_string(jparser *p, char **out)
{
    p->pos++;
    size_t start = p->pos;
    /* The decoded string is never longer than the encoded one. */
    size_t end = start;
    while (end < p->len && p->s[end] != '"') {
        if (p->s[end] == '\\') end++;
        end++;
    }
    if (end >= p->len) return jfail(p, "unterminated string");
    char *o = malloc(end - start + 1);
    if (!o) return aff__fail(p->err, AFF_ENOMEM, "out of memory");
    size_t n = 0;
    int rc = AFF_OK;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->s[p->pos++];
        if (c < 0x20) {
            rc = jfail(p, "control character in string");
            goto out;
        }
        if (c != '\\') {
            o[n++] = (char)c;
            continue;
        }
        char e = p->s[p->pos++];
        switch (e) {
        case '"':
            o[n++] = '"';
            break;
        case '\\':
            o[n++] = '\\';
            break;
        case '/':
            o[n++] = '/';
            break;
        case 'b':
            o[n++] = '\b';
            break;
        case 'f':
            o[n++] = '\f';
            break;
        case 'n':
            o[n++] = '\n';
            break;
        case 'r':
            o[n++] = '\r';
            break;
        case 't':
            o[n++] = '\t';
            break;
        case 'u': {
            uint32_t cp;
            if ((rc = hex4(p, &cp)) != AFF_OK) goto out;
            if (cp >= 0xd800 && cp < 0xdc00 && p->pos + 6 <= end && p->s[p->pos] == '\\' &&
                p->s[p->pos + 1] == 'u') {
                p->pos += 2;
                uint32_t lo;
                if ((rc = hex4(p, &lo)) != AFF_OK) goto out;
                if (lo >= 0xdc00 && lo < 0xe000)
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            }
            /* \uXXXX is 6 bytes and encodes to at most 3 (4 for a 12-byte pair). */
            n += put_utf8(o + n, cp);
            break;
        }
        default:
            rc = jfail(p, "bad escape in string");
            goto out;
        }
    }
    p->pos = end + 1;
    o[n] = '\0';
out:
    if (rc) {
        free(o);
        return rc;
    }
    *out = o;
    return AFF_OK;
}

static int parse_value(jparser *p, jsonv *v);

static int push(jparser *p, jsonv *v, size_t *cap, bool object)
{
    if (v->n < *cap) return AFF_OK;
    size_t nc = *cap ? *cap * 2 : 4;
    jsonv *items = realloc(v->items, nc * sizeof(jsonv));
    if (!items) return aff__fail(p->err, AFF_ENOMEM, "out of memory");
    v->items = items;
    if (object) {
        char **keys = realloc(v->keys, nc * sizeof(char *));
        if (!keys) return aff__fail(p->err, AFF_ENOMEM, "out of memory");
        v->keys = keys;
    }
    *cap = nc;
    return AFF_OK;
}

static int parse_container(jparser *p, jsonv *v, bool object)
{
    if (++p->depth > 64) return jfail(p, "nested deeper than 64 levels");
    char close = object ? '}' : ']';
    v->type = object ? JSONV_OBJECT : JSONV_ARRAY;
    p->pos++;
    size_t cap = 0;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == close) {
        p->pos++;
        p->depth--;
        return AFF_OK;
    }
    for (;;) {
        int rc = push(p, v, &cap, object);
        if (rc) return rc;
        jsonv *item = &v->items[v->n];
        memset(item, 0, sizeof(*item));
        if (object) {
            skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != '"') return jfail(p, "expected a member name");
            char *key;
            if ((rc = parse_string(p, &key)) != AFF_OK) return rc;
            v->keys[v->n] = key;
            skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') {
                v->n++;
                return jfail(p, "expected ':'");
            }
            p->pos++;
        }
        v->n++;
        if ((rc = parse_value(p, item)) != AFF_OK) return rc;
        skip_ws(p);
        if (p->pos < p->len && p->s[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->pos < p->len && p->s[p->pos] == close) {
            p->pos++;
            p->depth--;
            return AFF_OK;
        }
        return jfail(p, object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int parse_value(jparser *p, jsonv *v)
{
    skip_ws(p);
    if (p->pos >= p->len) return jfail(p, "unexpected end");
    char c = p->s[p->pos];
    if (c == '{' || c == '[') return parse_container(p, v, c == '{');
    if (c == '"') {
        v->type = JSONV_STRING;
        return parse_string(p, &v->string);
    }
    static const struct {
        const char *word;
        jsonv_type type;
        bool b;
    } words[] = {{"true", JSONV_BOOL, true}, {"false", JSONV_BOOL, false}, {"null", JSONV_NULL, 0}};
    for (size_t i = 0; i < 3; i++) {
        size_t wl = strlen(words[i].word);
        if (p->len - p->pos >= wl && memcmp(p->s + p->pos, words[i].word, wl) == 0) {
            v->type = words[i].type;
            v->boolean = words[i].b;
            p->pos += wl;
            return AFF_OK;
        }
    }
    size_t start = p->pos;
    while (p->pos < p->len && strchr("+-0123456789.eE", p->s[p->pos]))
        p->pos++;
    if (p->pos == start || p->pos - start > 64) return jfail(p, "unexpected character");
    char num[65];
    memcpy(num, p->s + start, p->pos - start);
    num[p->pos - start] = '\0';
    char *end;
    double d = strtod(num, &end);
    if (*end) return jfail(p, "malformed number");
    v->type = JSONV_NUMBER;
    v->number = d;
    v->string = strdup(num);
    if (!v->string) return aff__fail(p->err, AFF_ENOMEM, "out of memory");
    return AFF_OK;
}

int jsonv_parse(const char *text, size_t len, jsonv **out, aff_err *err)
{
    *out = NULL;
    jsonv *v = calloc(1, sizeof(*v));
    if (!v) return aff__fail(err, AFF_ENOMEM, "out of memory");
    jparser p = {text, len, 0, 0, err};
    int rc = parse_value(&p, v);
    if (rc == AFF_OK) {
        skip_ws(&p);
        if (p.pos != p.len) rc = jfail(&p, "text after the value");
    }
    if (rc) {
        jsonv_free(v);
        return rc;
    }
    *out = v;
    return AFF_OK;
}

void jsonv_free(jsonv *v)
{
    if (!v) return;
    value_clear(v);
    free(v);
}

const jsonv *jsonv_get(const jsonv *obj, const char *key)
{
    if (!obj || obj->type != JSONV_OBJECT) return NULL;
    for (size_t i = obj->n; i-- > 0;)
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

const jsonv *jsonv_at(const jsonv *arr, size_t i)
{
    if (!arr || arr->type != JSONV_ARRAY || i >= arr->n) return NULL;
    return &arr->items[i];
}

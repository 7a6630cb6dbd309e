/*
 * attrfile.c: owns the CSV and JSON Lines readers of attrfile.h. Lines are read with
 * getline(); a CSV field may not span lines.
 */
#include "attrfile.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "jsonv.h"

enum { COL_ID, COL_CATEGORY, COL_TAGS, COL_PRICE, COL_AVAILABLE, COL_COUNT };
static const char *const col_names[COL_COUNT] = {"id", "category", "tags", "price", "available"};

#define MAX_CSV_FIELDS 256

struct attrfile_reader {
    FILE *f;
    char path[512];
    bool jsonl;
    char *line;
    size_t line_cap;
    uint64_t line_no;
    int col_of[COL_COUNT]; /* CSV: field index of each known column, -1 when absent */
};

static int fail_at(attrfile_reader *r, aff_err *err, const char *what, const char *detail)
{
    return aff__fail(err, AFF_EINVAL, "%s:%llu: %s%s%s", r->path, (unsigned long long)r->line_no,
                     what, detail ? ": " : "", detail ? detail : "");
}

int attrfile_csv_split(char *line, char **fields, int max)
{
    int n = 0;
    char *p = line;
    for (;;) {
        if (n == max) return -1;
        if (*p == '"') {
            char *o = ++p;
            fields[n++] = o;
            for (;;) {
                if (*p == '\0') return -1; /* unterminated quote */
                if (*p == '"' && p[1] == '"') {
                    *o++ = '"';
                    p += 2;
                } else if (*p == '"') {
                    p++;
                    break;
                } else {
                    *o++ = *p++;
                }
            }
            *o = '\0';
            if (*p == ',') {
                p++;
                continue;
            }
            if (*p == '\0') return n;
            return -1;
        }
        fields[n++] = p;
        char *comma = strchr(p, ',');
        if (!comma) return n;
        *comma = '\0';
        p = comma + 1;
    }
}

static void chomp(char *s)
{
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = '\0';
}

static bool blank(const char *s)
{
    for (; *s; s++)
        if (*s != ' ' && *s != '\t') return false;
    return true;
}

int attrfile_open(attrfile_reader **out, const char *path, aff_err *err)
{
    *out = NULL;
    const char *dot = strrchr(path, '.');
    bool jsonl;
    if (dot && strcasecmp(dot, ".csv") == 0)
        jsonl = false;
    else if (dot && (strcasecmp(dot, ".jsonl") == 0 || strcasecmp(dot, ".ndjson") == 0))
        jsonl = true;
    else
        return aff__fail(err, AFF_EINVAL, "%s: unknown attribute file type; use .csv or .jsonl",
                         path);
    attrfile_reader *r = calloc(1, sizeof(*r));
    if (!r) return aff__fail(err, AFF_ENOMEM, "out of memory");
    int rc = AFF_OK;
    snprintf(r->path, sizeof(r->path), "%s", path);
    r->jsonl = jsonl;
    r->f = fopen(path, "r");
    if (!r->f) {
        rc = aff__fail(err, AFF_EIO, "%s: cannot open: %s", path, strerror(errno));
        goto out;
    }
    if (!jsonl) {
        if (getline(&r->line, &r->line_cap, r->f) < 0) {
            rc = aff__fail(err, AFF_EINVAL, "%s: empty file; a CSV header line is required", path);
            goto out;
        }
        r->line_no = 1;
        chomp(r->line);
        char *fields[MAX_CSV_FIELDS];
        int nf = attrfile_csv_split(r->line, fields, MAX_CSV_FIELDS);
        if (nf < 0) {
            rc = fail_at(r, err, "malformed CSV header", NULL);
            goto out;
        }
        for (int c = 0; c < COL_COUNT; c++)
            r->col_of[c] = -1;
        for (int i = 0; i < nf; i++) {
            char *name = fields[i];
            while (*name == ' ')
                name++;
            if (i == 0 && (unsigned char)name[0] == 0xef) /* UTF-8 byte order mark */
                name += 3;
            for (int c = 0; c < COL_COUNT; c++)
                if (strcasecmp(name, col_names[c]) == 0) r->col_of[c] = i;
        }
        if (r->col_of[COL_ID] < 0) {
            rc = fail_at(r, err, "the header has no 'id' column",
                         "columns are id, category, tags, price, available");
            goto out;
        }
    }
out:
    if (rc) {
        attrfile_close(r);
        return rc;
    }
    *out = r;
    return AFF_OK;
}

void attrfile_close(attrfile_reader *r)
{
    if (!r) return;
    if (r->f) fclose(r->f);
    free(r->line);
    free(r);
}

uint64_t attrfile_line(const attrfile_reader *r)
{
    return r->line_no;
}

static int set_str(attrfile_reader *r, aff_err *err, char *dst, size_t cap, const char *src,
                   const char *what)
{
    size_t n = strlen(src);
    if (n >= cap) {
        char detail[96];
        snprintf(detail, sizeof(detail), "%zu bytes; at most %zu allowed", n, cap - 1);
        return fail_at(r, err, what, detail);
    }
    memcpy(dst, src, n + 1);
    return AFF_OK;
}

static int add_tag(attrfile_reader *r, item_record *rec, aff_err *err, const char *tag, size_t len)
{
    if (len == 0) return AFF_OK;
    if (rec->n_tags == AFF_MAX_TAGS_PER_ITEM)
        return fail_at(r, err, "too many tags", "at most 16 per item");
    if (len > AFF_MAX_ATTR_LEN) return fail_at(r, err, "tag too long", "at most 128 bytes");
    memcpy(rec->tags[rec->n_tags], tag, len);
    rec->tags[rec->n_tags][len] = '\0';
    rec->n_tags++;
    return AFF_OK;
}

static int split_tags(attrfile_reader *r, item_record *rec, aff_err *err, const char *s)
{
    while (*s) {
        size_t len = strcspn(s, "|;");
        int rc = add_tag(r, rec, err, s, len);
        if (rc) return rc;
        s += len;
        if (*s) s++;
    }
    return AFF_OK;
}

static int parse_price(attrfile_reader *r, aff_err *err, const char *s, float *out)
{
    if (blank(s)) {
        *out = 0;
        return AFF_OK;
    }
    char *end;
    errno = 0;
    double d = strtod(s, &end);
    while (*end == ' ')
        end++;
    if (*end || errno || !(d > -3.4e38 && d < 3.4e38))
        return fail_at(r, err, "price is not a finite number", s);
    *out = (float)d;
    return AFF_OK;
}

static int parse_available(attrfile_reader *r, aff_err *err, const char *s, bool *out)
{
    if (blank(s) || strcasecmp(s, "true") == 0 || strcmp(s, "1") == 0 ||
        strcasecmp(s, "yes") == 0) {
        *out = true;
        return AFF_OK;
    }
    if (strcasecmp(s, "false") == 0 || strcmp(s, "0") == 0 || strcasecmp(s, "no") == 0) {
        *out = false;
        return AFF_OK;
    }
    return fail_at(r, err, "available must be true/false, 1/0 or yes/no", s);
}

static int next_csv(attrfile_reader *r, item_record *rec, aff_err *err)
{
    char *fields[MAX_CSV_FIELDS];
    int nf = attrfile_csv_split(r->line, fields, MAX_CSV_FIELDS);
    if (nf < 0)
        return fail_at(r, err, "malformed CSV line", "unbalanced quotes or too many fields");
    const char *val[COL_COUNT];
    for (int c = 0; c < COL_COUNT; c++)
        val[c] = r->col_of[c] >= 0 && r->col_of[c] < nf ? fields[r->col_of[c]] : "";
    int rc;
    if ((rc = set_str(r, err, rec->id, sizeof(rec->id), val[COL_ID], "id too long")) ||
        (rc = set_str(r, err, rec->category, sizeof(rec->category), val[COL_CATEGORY],
                      "category too long")) ||
        (rc = split_tags(r, rec, err, val[COL_TAGS])) ||
        (rc = parse_price(r, err, val[COL_PRICE], &rec->price)) ||
        (rc = parse_available(r, err, val[COL_AVAILABLE], &rec->available)))
        return rc;
    return AFF_OK;
}

static int next_jsonl(attrfile_reader *r, item_record *rec, aff_err *err)
{
    jsonv *v = NULL;
    aff_err jerr = {0};
    int rc = jsonv_parse(r->line, strlen(r->line), &v, &jerr);
    if (rc) return fail_at(r, err, "not valid JSON", jerr.msg);
    if (v->type != JSONV_OBJECT) {
        rc = fail_at(r, err, "each line must be a JSON object", NULL);
        goto out;
    }
    const jsonv *id = jsonv_get(v, "id");
    if (!id || (id->type != JSONV_STRING && id->type != JSONV_NUMBER)) {
        rc = fail_at(r, err, "missing \"id\" (a string)", NULL);
        goto out;
    }
    if ((rc = set_str(r, err, rec->id, sizeof(rec->id), id->string, "id too long"))) goto out;
    const jsonv *cat = jsonv_get(v, "category");
    if (cat && cat->type != JSONV_NULL) {
        if (cat->type != JSONV_STRING) {
            rc = fail_at(r, err, "\"category\" must be a string", NULL);
            goto out;
        }
        if ((rc = set_str(r, err, rec->category, sizeof(rec->category), cat->string,
                          "category too long")))
            goto out;
    }
    const jsonv *tags = jsonv_get(v, "tags");
    if (tags && tags->type == JSONV_STRING) {
        if ((rc = split_tags(r, rec, err, tags->string))) goto out;
    } else if (tags && tags->type == JSONV_ARRAY) {
        for (size_t i = 0; i < tags->n; i++) {
            const jsonv *t = &tags->items[i];
            if (t->type != JSONV_STRING) {
                rc = fail_at(r, err, "\"tags\" must be an array of strings", NULL);
                goto out;
            }
            if ((rc = add_tag(r, rec, err, t->string, strlen(t->string)))) goto out;
        }
    } else if (tags && tags->type != JSONV_NULL) {
        rc = fail_at(r, err, "\"tags\" must be an array of strings", NULL);
        goto out;
    }
    const jsonv *price = jsonv_get(v, "price");
    if (price && price->type == JSONV_NUMBER) {
        if (!(price->number > -3.4e38 && price->number < 3.4e38)) {
            rc = fail_at(r, err, "price is not a finite float", price->string);
            goto out;
        }
        rec->price = (float)price->number;
    } else if (price && price->type == JSONV_STRING) {
        if ((rc = parse_price(r, err, price->string, &rec->price))) goto out;
    } else if (price && price->type != JSONV_NULL) {
        rc = fail_at(r, err, "\"price\" must be a number", NULL);
        goto out;
    }
    const jsonv *avail = jsonv_get(v, "available");
    if (avail && avail->type == JSONV_BOOL)
        rec->available = avail->boolean;
    else if (avail && avail->type == JSONV_NUMBER)
        rec->available = avail->number != 0;
    else if (avail && avail->type == JSONV_STRING)
        rc = parse_available(r, err, avail->string, &rec->available);
    else if (avail && avail->type != JSONV_NULL)
        rc = fail_at(r, err, "\"available\" must be true or false", NULL);
out:
    jsonv_free(v);
    return rc;
}

int attrfile_next(attrfile_reader *r, item_record *rec, aff_err *err)
{
    for (;;) {
        errno = 0;
        if (getline(&r->line, &r->line_cap, r->f) < 0) {
            if (ferror(r->f))
                return aff__fail(err, AFF_EIO, "%s: read failed: %s", r->path, strerror(errno));
            return 0;
        }
        r->line_no++;
        chomp(r->line);
        if (!blank(r->line)) break;
    }
    memset(rec, 0, sizeof(*rec));
    rec->available = true;
    int rc = r->jsonl ? next_jsonl(r, rec, err) : next_csv(r, rec, err);
    if (rc) return rc;
    if (rec->id[0] == '\0') return fail_at(r, err, "empty id", "ids are 1..128 bytes");
    return 1;
}

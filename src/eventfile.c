/*
 * eventfile.c: owns the CSV and JSON Lines readers of eventfile.h. Lines are read with
 * getline(); a CSV field may not span lines (the CSV splitter is attrfile.c's).
 */
#include "eventfile.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "attrfile.h"
#include "jsonv.h"

enum { COL_USER, COL_ITEM, COL_TYPE, COL_TS, COL_VALUE, COL_COUNT };
static const char *const col_names[COL_COUNT] = {"user_id", "item_id", "type", "timestamp_ms",
                                                 "value"};

#define MAX_CSV_FIELDS 256

struct eventfile_reader {
    FILE *f;
    char path[512];
    bool jsonl;
    char *line;
    size_t line_cap;
    uint64_t line_no;
    uint64_t offset, size;
    int col_of[COL_COUNT]; /* CSV: field index of each column, -1 when absent */
    int min_fields;        /* CSV: fields a row needs to hold every required column */
};

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

/* Reads the next line into r->line (chomped); 1, 0 at the end, or AFF_EIO. */
static int read_line(eventfile_reader *r, aff_err *err)
{
    errno = 0;
    ssize_t n = getline(&r->line, &r->line_cap, r->f);
    if (n < 0) {
        if (ferror(r->f))
            return aff__fail(err, AFF_EIO, "%s: read failed: %s", r->path, strerror(errno));
        return 0;
    }
    r->offset += (uint64_t)n;
    r->line_no++;
    chomp(r->line);
    return 1;
}

int eventfile_open(eventfile_reader **out, const char *path, eventfile_format format, aff_err *err)
{
    *out = NULL;
    if (format == EVENTFILE_AUTO) {
        const char *dot = strrchr(path, '.');
        if (dot && strcasecmp(dot, ".csv") == 0)
            format = EVENTFILE_CSV;
        else if (dot && (strcasecmp(dot, ".jsonl") == 0 || strcasecmp(dot, ".ndjson") == 0))
            format = EVENTFILE_JSONL;
        else
            return aff__fail(err, AFF_EINVAL,
                             "%s: unknown event file type; name it .csv or .jsonl or give "
                             "--format csv|jsonl",
                             path);
    }
    eventfile_reader *r = calloc(1, sizeof(*r));
    if (!r) return aff__fail(err, AFF_ENOMEM, "out of memory");
    int rc = AFF_OK;
    snprintf(r->path, sizeof(r->path), "%s", path);
    r->jsonl = format == EVENTFILE_JSONL;
    r->f = fopen(path, "r");
    if (!r->f) {
        rc = aff__fail(err, AFF_EIO, "%s: cannot open: %s", path, strerror(errno));
        goto out;
    }
    struct stat sb;
    if (fstat(fileno(r->f), &sb) == 0 && S_ISREG(sb.st_mode)) r->size = (uint64_t)sb.st_size;
    if (!r->jsonl) {
        int got = read_line(r, err);
        if (got < 0) {
            rc = got;
            goto out;
        }
        if (got == 0) {
            rc = aff__fail(err, AFF_EINVAL,
                           "%s: empty file; a CSV header line is required "
                           "(user_id,item_id,type,timestamp_ms,value)",
                           path);
            goto out;
        }
        char *fields[MAX_CSV_FIELDS];
        int nf = attrfile_csv_split(r->line, fields, MAX_CSV_FIELDS);
        if (nf < 0) {
            rc = aff__fail(err, AFF_EINVAL, "%s:1: malformed CSV header", path);
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
            size_t len = strlen(name);
            while (len && name[len - 1] == ' ')
                name[--len] = '\0';
            for (int c = 0; c < COL_COUNT; c++)
                if (strcasecmp(name, col_names[c]) == 0) r->col_of[c] = i;
        }
        for (int c = COL_USER; c <= COL_TYPE; c++) {
            if (r->col_of[c] < 0) {
                rc = aff__fail(err, AFF_EINVAL,
                               "%s:1: the header has no '%s' column; columns are user_id, "
                               "item_id, type, timestamp_ms, value",
                               path, col_names[c]);
                goto out;
            }
            if (r->col_of[c] + 1 > r->min_fields) r->min_fields = r->col_of[c] + 1;
        }
    }
out:
    if (rc) {
        eventfile_close(r);
        return rc;
    }
    *out = r;
    return AFF_OK;
}

void eventfile_close(eventfile_reader *r)
{
    if (!r) return;
    if (r->f) fclose(r->f);
    free(r->line);
    free(r);
}

uint64_t eventfile_line(const eventfile_reader *r)
{
    return r->line_no;
}

uint64_t eventfile_offset(const eventfile_reader *r)
{
    return r->offset;
}

uint64_t eventfile_size(const eventfile_reader *r)
{
    return r->size;
}

static int set_field(char *dst, const char *src, const char *what, aff_err *err)
{
    size_t n = strlen(src);
    if (n > EVENTFILE_MAX_FIELD)
        return aff__fail(err, AFF_EINVAL, "%s is %zu bytes; at most %d", what, n,
                         EVENTFILE_MAX_FIELD);
    memcpy(dst, src, n + 1);
    return AFF_OK;
}

static int parse_timestamp(const char *s, int64_t *out, aff_err *err)
{
    while (*s == ' ')
        s++;
    if (!*s) {
        *out = 0;
        return AFF_OK;
    }
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    while (*end == ' ')
        end++;
    if (*end || errno || end == s)
        return aff__fail(err, AFF_EINVAL,
                         "timestamp_ms '%.40s' is not an integer (Unix milliseconds)", s);
    *out = v;
    return AFF_OK;
}

static int parse_value(const char *s, double *out, aff_err *err)
{
    while (*s == ' ')
        s++;
    if (!*s) {
        *out = 0;
        return AFF_OK;
    }
    char *end;
    errno = 0;
    double d = strtod(s, &end);
    while (*end == ' ')
        end++;
    if (*end || errno || end == s || !isfinite(d))
        return aff__fail(err, AFF_EINVAL, "value '%.40s' is not a finite number", s);
    *out = d;
    return AFF_OK;
}

static int next_csv(eventfile_reader *r, event_record *rec, aff_err *err)
{
    char *fields[MAX_CSV_FIELDS];
    int nf = attrfile_csv_split(r->line, fields, MAX_CSV_FIELDS);
    if (nf < 0)
        return aff__fail(err, AFF_EINVAL,
                         "malformed CSV line (unbalanced quotes or more than %d fields)",
                         MAX_CSV_FIELDS);
    if (nf < r->min_fields)
        return aff__fail(err, AFF_EINVAL, "%d fields; the header needs at least %d", nf,
                         r->min_fields);
    const char *val[COL_COUNT];
    for (int c = 0; c < COL_COUNT; c++)
        val[c] = r->col_of[c] >= 0 && r->col_of[c] < nf ? fields[r->col_of[c]] : "";
    int rc;
    if ((rc = set_field(rec->user_id, val[COL_USER], "user_id", err)) ||
        (rc = set_field(rec->item_id, val[COL_ITEM], "item_id", err)) ||
        (rc = set_field(rec->type, val[COL_TYPE], "type", err)) ||
        (rc = parse_timestamp(val[COL_TS], &rec->timestamp_ms, err)) ||
        (rc = parse_value(val[COL_VALUE], &rec->value, err)))
        return rc;
    return AFF_OK;
}

/* A string member (numbers allowed for ids) into dst; absent: AFF_EINVAL. */
static int json_str(const jsonv *obj, const char *key, bool numbers, char *dst, aff_err *err)
{
    const jsonv *m = jsonv_get(obj, key);
    if (!m) return aff__fail(err, AFF_EINVAL, "missing \"%s\"", key);
    if (m->type != JSONV_STRING && !(numbers && m->type == JSONV_NUMBER))
        return aff__fail(err, AFF_EINVAL, "\"%s\" must be a string%s", key,
                         numbers ? " or a number" : "");
    return set_field(dst, m->string, key, err);
}

static int next_jsonl(eventfile_reader *r, event_record *rec, aff_err *err)
{
    return eventfile_parse_json(r->line, strlen(r->line), rec, err);
}

int eventfile_parse_json(const char *text, size_t len, event_record *rec, aff_err *err)
{
    jsonv *v = NULL;
    aff_err jerr = {0};
    memset(rec, 0, sizeof *rec);
    int rc = jsonv_parse(text, len, &v, &jerr);
    if (rc) return aff__fail(err, AFF_EINVAL, "not valid JSON: %s", jerr.msg);
    if (v->type != JSONV_OBJECT) {
        rc = aff__fail(err, AFF_EINVAL, "an event must be a JSON object");
        goto out;
    }
    if ((rc = json_str(v, "user_id", true, rec->user_id, err)) ||
        (rc = json_str(v, "item_id", true, rec->item_id, err)) ||
        (rc = json_str(v, "type", false, rec->type, err)))
        goto out;
    const jsonv *ts = jsonv_get(v, "timestamp_ms");
    if (ts && (ts->type == JSONV_NUMBER || ts->type == JSONV_STRING)) {
        if ((rc = parse_timestamp(ts->string, &rec->timestamp_ms, err))) goto out;
    } else if (ts && ts->type != JSONV_NULL) {
        rc = aff__fail(err, AFF_EINVAL, "\"timestamp_ms\" must be an integer");
        goto out;
    }
    const jsonv *val = jsonv_get(v, "value");
    if (val && (val->type == JSONV_NUMBER || val->type == JSONV_STRING)) {
        if ((rc = parse_value(val->string, &rec->value, err))) goto out;
    } else if (val && val->type != JSONV_NULL) {
        rc = aff__fail(err, AFF_EINVAL, "\"value\" must be a number");
        goto out;
    }
out:
    jsonv_free(v);
    return rc;
}

int eventfile_next(eventfile_reader *r, event_record *rec, aff_err *err)
{
    for (;;) {
        int got = read_line(r, err);
        if (got <= 0) return got;
        if (!blank(r->line)) break;
    }
    memset(rec, 0, sizeof(*rec));
    int rc = r->jsonl ? next_jsonl(r, rec, err) : next_csv(r, rec, err);
    return rc ? rc : 1;
}

/*
 * eventfile.c: owns the CSV and JSON Lines readers of eventfile.h. Lines are read with
 * getline(); a CSV field may not span lines (the file layer is tablefile.c's).
 */
#include "eventfile.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jsonv.h"
#include "tablefile.h"

enum { COL_USER, COL_ITEM, COL_TYPE, COL_TS, COL_VALUE, COL_COUNT };
static const char *const col_names[COL_COUNT] = {"user_id", "item_id", "type", "timestamp_ms",
                                                 "value"};

struct eventfile_reader {
    tablefile t;
};

int eventfile_open(eventfile_reader **out, const char *path, eventfile_format format, aff_err *err)
{
    *out = NULL;
    bool jsonl = format == EVENTFILE_JSONL;
    int rc =
        format == EVENTFILE_AUTO
            ? tablefile_format(path, "event", "name it .csv or .jsonl or give --format csv|jsonl",
                               &jsonl, err)
            : AFF_OK;
    if (rc) return rc;
    eventfile_reader *r = calloc(1, sizeof(*r));
    if (!r) return aff__fail(err, AFF_ENOMEM, "out of memory");
    if ((rc = tablefile_open(&r->t, path, jsonl, col_names, COL_COUNT, 3, err))) {
        free(r);
        return rc;
    }
    *out = r;
    return AFF_OK;
}

void eventfile_close(eventfile_reader *r)
{
    if (!r) return;
    tablefile_close(&r->t);
    free(r);
}

uint64_t eventfile_line(const eventfile_reader *r)
{
    return r->t.line_no;
}

uint64_t eventfile_offset(const eventfile_reader *r)
{
    return r->t.offset;
}

uint64_t eventfile_size(const eventfile_reader *r)
{
    return r->t.size;
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
    const char *val[COL_COUNT];
    int rc = tablefile_csv_row(&r->t, val, COL_COUNT, err);
    if (rc) return rc;
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
    return eventfile_parse_json(r->t.line, strlen(r->t.line), rec, err);
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
    int got = tablefile_next_line(&r->t, err);
    if (got <= 0) return got;
    memset(rec, 0, sizeof(*rec));
    int rc = r->t.jsonl ? next_jsonl(r, rec, err) : next_csv(r, rec, err);
    return rc ? rc : 1;
}

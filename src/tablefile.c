/*
 * tablefile.c: owns what attrfile.c and eventfile.c share (tablefile.h): format by extension,
 * line reading with getline(), the CSV header and splitter.
 */
#include "tablefile.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "affinity/affinity.h"

int tablefile_format(const char *path, const char *what, const char *hint, bool *jsonl,
                     aff_err *err)
{
    const char *dot = strrchr(path, '.');
    if (dot && strcasecmp(dot, ".csv") == 0)
        *jsonl = false;
    else if (dot && (strcasecmp(dot, ".jsonl") == 0 || strcasecmp(dot, ".ndjson") == 0))
        *jsonl = true;
    else
        return aff__fail(err, AFF_EINVAL, "%s: unknown %s file type; %s", path, what, hint);
    return AFF_OK;
}

int tablefile_csv_split(char *line, char **fields, int max)
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

bool tablefile_blank(const char *s)
{
    for (; *s; s++)
        if (*s != ' ' && *s != '\t') return false;
    return true;
}

/* Reads the next line into t->line without its line break: 1, 0 at the end, or AFF_EIO. */
static int read_line(tablefile *t, aff_err *err)
{
    errno = 0;
    ssize_t n = getline(&t->line, &t->line_cap, t->f);
    if (n < 0) {
        if (ferror(t->f))
            return aff__fail(err, AFF_EIO, "%s: read failed: %s", t->path, strerror(errno));
        return 0;
    }
    t->offset += (uint64_t)n;
    t->line_no++;
    while (n && (t->line[n - 1] == '\n' || t->line[n - 1] == '\r'))
        t->line[--n] = '\0';
    return 1;
}

int tablefile_next_line(tablefile *t, aff_err *err)
{
    for (;;) {
        int got = read_line(t, err);
        if (got <= 0 || !tablefile_blank(t->line)) return got;
    }
}

/* Reads the CSV header and maps the column names. */
static int read_header(tablefile *t, const char *const *columns, int n_columns, int n_required,
                       aff_err *err)
{
    char list[256] = "";
    for (int c = 0; c < n_columns; c++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", c ? ", " : "",
                 columns[c]);
    int got = read_line(t, err);
    if (got < 0) return got;
    if (got == 0)
        return aff__fail(err, AFF_EINVAL, "%s: empty file; a CSV header line is required (%s)",
                         t->path, list);
    char *fields[TABLEFILE_MAX_FIELDS];
    int nf = tablefile_csv_split(t->line, fields, TABLEFILE_MAX_FIELDS);
    if (nf < 0) return aff__fail(err, AFF_EINVAL, "%s:1: malformed CSV header", t->path);
    for (int c = 0; c < n_columns; c++)
        t->col_of[c] = -1;
    for (int i = 0; i < nf; i++) {
        char *name = fields[i];
        if (i == 0 && strncmp(name, "\xef\xbb\xbf", 3) == 0) /* UTF-8 byte order mark */
            name += 3;
        while (*name == ' ')
            name++;
        size_t len = strlen(name);
        while (len && name[len - 1] == ' ')
            name[--len] = '\0';
        for (int c = 0; c < n_columns; c++)
            if (strcasecmp(name, columns[c]) == 0) t->col_of[c] = i;
    }
    for (int c = 0; c < n_required; c++) {
        if (t->col_of[c] < 0)
            return aff__fail(err, AFF_EINVAL, "%s:1: the header has no '%s' column; columns are %s",
                             t->path, columns[c], list);
        if (t->col_of[c] + 1 > t->min_fields) t->min_fields = t->col_of[c] + 1;
    }
    return AFF_OK;
}

int tablefile_open(tablefile *t, const char *path, bool jsonl, const char *const *columns,
                   int n_columns, int n_required, aff_err *err)
{
    *t = (tablefile){.jsonl = jsonl};
    if (n_columns > TABLEFILE_MAX_COLUMNS)
        return aff__fail(err, AFF_EINTERNAL, "%d columns; at most %d", n_columns,
                         TABLEFILE_MAX_COLUMNS);
    snprintf(t->path, sizeof t->path, "%s", path);
    t->f = fopen(path, "r");
    if (!t->f) return aff__fail(err, AFF_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(t->f), &sb) == 0 && S_ISREG(sb.st_mode)) t->size = (uint64_t)sb.st_size;
    int rc = jsonl ? AFF_OK : read_header(t, columns, n_columns, n_required, err);
    if (rc) tablefile_close(t);
    return rc;
}

void tablefile_close(tablefile *t)
{
    if (t->f) fclose(t->f);
    free(t->line);
    t->f = NULL;
    t->line = NULL;
    t->line_cap = 0;
}

int tablefile_csv_row(tablefile *t, const char **val, int n_columns, aff_err *err)
{
    char *fields[TABLEFILE_MAX_FIELDS];
    int nf = tablefile_csv_split(t->line, fields, TABLEFILE_MAX_FIELDS);
    if (nf < 0)
        return aff__fail(err, AFF_EINVAL,
                         "malformed CSV line (unbalanced quotes or more than %d fields)",
                         TABLEFILE_MAX_FIELDS);
    if (nf < t->min_fields)
        return aff__fail(err, AFF_EINVAL, "%d fields; the header needs at least %d", nf,
                         t->min_fields);
    for (int c = 0; c < n_columns; c++)
        val[c] = t->col_of[c] >= 0 && t->col_of[c] < nf ? fields[t->col_of[c]] : "";
    return AFF_OK;
}

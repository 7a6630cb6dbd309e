/*
 * tablefile.h: the part the CLI's record-file readers share (attrfile.h for item attributes,
 * eventfile.h for behaviour events): a file of records, one per line, as CSV with a header
 * that names the columns, or as JSON Lines. It owns the format choice by extension, opening,
 * reading lines (counted, line breaks removed), the CSV header's mapping of column names to
 * field indexes and the CSV field splitter; each reader keeps what its records mean.
 *
 * CSV: fields may be quoted ("a, b" with "" for a quote) but may not span lines; header names
 * match case-insensitively, surrounding spaces and a UTF-8 byte order mark are ignored, and
 * unknown columns are ignored. A tablefile belongs to one thread.
 */
#ifndef AFFINITY_TABLEFILE_H
#define AFFINITY_TABLEFILE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "status.h"

#define TABLEFILE_MAX_COLUMNS 8   /* named columns a reader may ask for */
#define TABLEFILE_MAX_FIELDS  256 /* fields on one CSV line */

typedef struct tablefile {
    FILE *f;
    char path[512];
    bool jsonl;
    char *line; /* the line last read, without its line break */
    size_t line_cap;
    uint64_t line_no;                  /* 1-based number of the line last read */
    uint64_t offset, size;             /* bytes read so far; the file's size (0 when unknown) */
    int col_of[TABLEFILE_MAX_COLUMNS]; /* CSV: field index of each named column, -1: absent */
    int min_fields;                    /* CSV: fields a row needs to hold every required column */
} tablefile;

/* The format of path by its extension: true for .jsonl and .ndjson, false for .csv (any
 * case). AFF_EINVAL for anything else, with `what` ("attribute", "event") and hint in the
 * message. */
int tablefile_format(const char *path, const char *what, const char *hint, bool *jsonl,
                     aff_err *err);

/* Opens path in the given format. For CSV it reads the header and maps the n_columns names
 * (≤ TABLEFILE_MAX_COLUMNS) to col_of; the first n_required must be present. AFF_EIO when
 * the file cannot be opened, AFF_EINVAL for an empty CSV file, a malformed header or a
 * missing required column (the message lists the columns). On failure t holds nothing. */
int tablefile_open(tablefile *t, const char *path, bool jsonl, const char *const *columns,
                   int n_columns, int n_required, aff_err *err);
void tablefile_close(tablefile *t);

/* Reads the next line that is not blank (spaces and tabs only) into t->line: 1, 0 at the end
 * of the file, or AFF_EIO. */
int tablefile_next_line(tablefile *t, aff_err *err);

/* True when s holds nothing but spaces and tabs. */
bool tablefile_blank(const char *s);

/* Splits one CSV line (no line break) in place: fields[] point into line, quoted fields are
 * unquoted. Returns the field count, or -1 for unbalanced quotes or more than max fields. */
int tablefile_csv_split(char *line, char **fields, int max);

/* The line's fields by column (col_of), "" for columns the header or the line lacks, for CSV.
 * AFF_EINVAL for a malformed line or one with fewer fields than the required columns need. */
int tablefile_csv_row(tablefile *t, const char **val, int n_columns, aff_err *err);

#endif

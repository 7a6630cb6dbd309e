/*
 * attrfile.h: reads item ids and attributes for a bulk load, from CSV or JSON Lines.
 *
 * CSV (".csv"): a header line names the columns; `id` is required, `category`, `tags`,
 * `price` and `available` are optional, other columns are ignored. Fields may be quoted
 * ("a, b" with "" for a quote). Tags are separated by '|' or ';' within their field.
 * JSON Lines (".jsonl", ".ndjson"): one object per line with the same member names; `tags`
 * is an array of strings (or one string split like CSV); unknown members are ignored.
 * `available` accepts true/false, 1/0, yes/no (empty: true). Blank lines are skipped.
 *
 * Errors are AFF_EIO (cannot open or read) or AFF_EINVAL with the file, line and what was
 * wrong. A reader belongs to one thread.
 */
#ifndef AFFINITY_ATTRFILE_H
#define AFFINITY_ATTRFILE_H

#include <stdbool.h>
#include <stdint.h>

#include "affinity/affinity.h"
#include "item.h"
#include "status.h"

typedef struct attrfile_reader attrfile_reader;

int attrfile_open(attrfile_reader **out, const char *path, aff_err *err);
void attrfile_close(attrfile_reader *r);
/* Reads the next record into *rec: returns 1 when one was read, 0 at the end, or a negative
 * aff_status. */
int attrfile_next(attrfile_reader *r, item_record *rec, aff_err *err);
/* The line number of the record last returned (1-based), for messages. */
uint64_t attrfile_line(const attrfile_reader *r);

/* Splits one CSV line (no line break) in place: fields[] point into line, quoted fields are
 * unquoted ("" is a quote). Returns the field count, or -1 for unbalanced quotes or more than
 * max fields. Shared with eventfile.c. */
int attrfile_csv_split(char *line, char **fields, int max);

#endif

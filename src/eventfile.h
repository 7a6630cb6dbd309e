/*
 * eventfile.h: reads behaviour events for `affinity events import`, from CSV or JSON Lines.
 *
 * CSV: a header line names the columns user_id, item_id, type, timestamp_ms, value (any order;
 * the first three are required, the others optional; other columns are ignored). Fields may
 * be quoted as in attrfile.h. JSON Lines: one object per line with the same member names;
 * ids may be strings or numbers, timestamp_ms and value numbers or numeric strings; unknown
 * members are ignored. Blank lines are skipped in both.
 *
 * type: view, click, add_to_cart (or cart), purchase (any case), or any other name, sent as a
 * custom type that the server must have configured. timestamp_ms: Unix milliseconds, an
 * integer; empty or absent means 0 (the server's now). value: a finite number; empty or
 * absent means 0.
 *
 * The reader checks syntax only (CSV shape, JSON, numbers, presence); whether a user id, item
 * id or type is acceptable is for the server to say. A reader belongs to one thread.
 */
#ifndef AFFINITY_EVENTFILE_H
#define AFFINITY_EVENTFILE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define EVENTFILE_MAX_FIELD 256 /* bytes in an id or type field; longer is malformed */

typedef enum eventfile_format {
    EVENTFILE_AUTO, /* by extension: .csv, .jsonl or .ndjson */
    EVENTFILE_CSV,
    EVENTFILE_JSONL,
} eventfile_format;

typedef struct event_record {
    char user_id[EVENTFILE_MAX_FIELD + 1];
    char item_id[EVENTFILE_MAX_FIELD + 1];
    char type[EVENTFILE_MAX_FIELD + 1]; /* as written (not validated) */
    int64_t timestamp_ms;               /* 0: absent */
    double value;
} event_record;

typedef struct eventfile_reader eventfile_reader;

/* Opens path and, for CSV, reads and checks its header. AFF_EIO when it cannot be read,
 * AFF_EINVAL (with path, line and reason) for an unknown extension without a format, an
 * empty file or a header without the required columns. */
int eventfile_open(eventfile_reader **out, const char *path, eventfile_format format, aff_err *err);
void eventfile_close(eventfile_reader *r);
/* Reads the next record: 1 when one was read, 0 at the end of the file, AFF_EINVAL for a
 * malformed line (err holds the reason without file and line; the reader has moved past it,
 * so call again for the next record), AFF_EIO when reading failed (stop). */
int eventfile_next(eventfile_reader *r, event_record *rec, aff_err *err);
/* Parses one event written as a JSON object (the JSON Lines format above) from text[0..len):
 * 0, or AFF_EINVAL with the reason. Used for Kafka messages too (kafka_in.h). */
int eventfile_parse_json(const char *text, size_t len, event_record *rec, aff_err *err);
/* The 1-based line number of the line last read (a record or a malformed line). */
uint64_t eventfile_line(const eventfile_reader *r);
/* Bytes of the file read so far and its size (0 when unknown), for progress. */
uint64_t eventfile_offset(const eventfile_reader *r);
uint64_t eventfile_size(const eventfile_reader *r);

#endif

/*
 * retention.h: enforces --event-retention-days. A thread runs profiles_expire at start-up and
 * every interval, so events older than the retention period (and what derives from them) are
 * erased durably while the server runs; the profiles module refuses older events at ingest.
 */
#ifndef AFFINITY_RETENTION_H
#define AFFINITY_RETENTION_H

#include <stdint.h>

#include "profiles.h"
#include "status.h"

typedef struct retention retention;

/* Starts the retention thread for days (> 0) on profiles (borrowed; must outlive it). The
 * first pass starts at once. Errors: AFF_ENOMEM, AFF_EINTERNAL. */
int retention_start(retention **out, aff_profiles *profiles, uint32_t days, uint32_t interval_ms,
                    aff_err *err);
/* Publishes a retention cut (events older than cutoff_ms go) instead of erasing here: with
 * --log the cut is a log record that every replica applies at the same position. */
typedef int (*retention_publish_fn)(void *ctx, int64_t cutoff_ms, aff_err *err);
/* Like retention_start, but each pass publishes its cut rather than applying it. The cut is
 * rounded down to a multiple of interval_ms, so replicas whose passes fall in the same
 * interval publish the same cut (and the log deduplicates it by a message id derived from
 * it). A failed publish is logged and retried at the next interval. */
int retention_start_replicated(retention **out, uint32_t days, uint32_t interval_ms,
                               retention_publish_fn publish, void *ctx, aff_err *err);
/* Stops the thread (a pass in progress finishes its current user first). NULL: no-op. */
void retention_stop(retention *r);

#endif

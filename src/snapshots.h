/*
 * snapshots.h: periodic snapshots of a replica's store and truncation of the write log
 * below them (docs/replication.md). Every interval the thread writes a compacted copy of
 * the store to <dir>/snapshot-<seq>.mdb (store_snapshot), keeps the newest `keep` copies,
 * and truncates the log below the oldest kept copy's sequence less `retain_records`, so
 * every kept snapshot can still be brought up to date from the log, and erased users' raw
 * events leave the log and the snapshots within interval × keep.
 */
#ifndef AFFINITY_SNAPSHOTS_H
#define AFFINITY_SNAPSHOTS_H

#include <stdint.h>

#include "replog.h"
#include "status.h"
#include "store.h"

typedef struct aff_snapshots aff_snapshots;

typedef struct snapshots_config {
    const char *dir;         /* where snapshot-<seq>.mdb files go (created if missing) */
    uint32_t interval_s;     /* ≥ 1 */
    uint32_t keep;           /* newest copies kept, ≥ 1 */
    uint64_t retain_records; /* records kept below the oldest kept snapshot */
    aff_replog *log;         /* NULL: snapshots only, no truncation; borrowed */
} snapshots_config;

/* Starts the thread (the first snapshot after one interval). store and cfg->log are
 * borrowed and must outlive snapshots_stop. Errors: AFF_EIO (dir), AFF_ENOMEM. */
int snapshots_start(aff_snapshots **out, aff_store *store, const snapshots_config *cfg,
                    aff_err *err);
/* Makes one snapshot now and truncates (the thread's step); for tests and shutdown. */
int snapshots_run_once(aff_snapshots *s, aff_err *err);
/* Stops the thread. NULL: no-op. */
void snapshots_stop(aff_snapshots *s);

#endif

/*
 * model.h: per-collection learned models (iALS, see als.h): background training from the
 * events the store holds, persistence and versioning, the behaviour space that serves them, and
 * the fold-in of a shopper's current events into a user factor.
 *
 * Spaces. A collection has a content space (the shop's vectors: the engine collection of the
 * same name) and, once a model is trained, a behaviour space: an engine collection named
 * "#b<N>" (a name no client can create) with one row per item of the model, its learned factor
 * as the vector (inner product) and the item's current attributes, so every filter, exclusion
 * and backend (GPU included) works on it unchanged. Catalog writes are mirrored into it
 * (model_on_upsert / model_on_delete): attributes follow the catalog, deleted items leave it.
 *
 * Versions. A model version is immutable once published; a new one is built completely (its
 * space included) before one pointer swap makes it current, so serving never sees half a model.
 * The previous version's space stays until the next swap, so a query planned just before a
 * swap still finds its space when the batcher runs it.
 *
 * Confidence. Each (user, item) interaction the store keeps is a decayed, type-weighted event
 * sum r (profiles.h); its confidence is als_confidence(r decayed to now) with the profiles'
 * half-life, so a purchase counts more than a view and old events fade.
 *
 * Fold-in. model_user_factor reads the user's interactions from the store and solves the
 * user's row exactly against the current item factors (als_solve_row): a Recommend right after
 * PutEvents sees the new events (read-your-writes), with no per-user state to keep in sync.
 *
 * Threading: every function may be called from any thread. Training runs on one background
 * thread per collection (OpenMP inside, niced); at most one job per collection at a time.
 */
#ifndef AFFINITY_MODEL_H
#define AFFINITY_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "als.h"
#include "engine.h"
#include "store.h"

typedef struct aff_model aff_model;

#define MODEL_SPACE_NAME_LEN 31

typedef struct model_config {
    als_params defaults;          /* a collection's parameters until it configures its own */
    double half_life_s;           /* event decay for confidences (the profiles' half-life) */
    uint32_t train_interval_s;    /* retrain a collection with new events this often; 0 = off */
    uint64_t train_after_events;  /* retrain after this many new events; 0 = off */
    uint32_t train_threads;       /* OpenMP threads per training job; 0 = all cores */
    uint32_t fold_in_history;     /* a fold-in reads the user's most recent this many
                                     interactions (by latest event); 0 = all */
    int64_t (*now_ms)(void *ctx); /* NULL: the real-time clock */
    void *now_ctx;
    /* Replication (--log): when set, a finished job does not persist or install its model; it
     * hands the model's blob (borrowed for the call) to publish, which puts it through the
     * write log and returns once the log committed it (non-zero: the job fails with err).
     * Every replica then installs it with model_install_blob at the log position of its
     * commit. Called on the job's thread. */
    int (*publish)(void *ctx, const char *collection, const void *blob, size_t len, aff_err *err);
    void *publish_ctx;
    /* Replication: the fold-in decays a user's interactions to max(the model's training
     * time, the user's latest interaction) instead of the real-time clock, so replicas at
     * one log position fold a user in identically (a function of the stored state only). */
    bool fold_in_data_clock;
    /* Replication: when set, the scheduler (--train-interval-s, --train-after-events) does not
     * train here: it asks for a training through the log. request_train publishes a Train
     * record whose message id names the collection and its current model version, so the
     * replicas' identical requests collapse into one record, trained by the replica whose
     * record the log kept. A replica asks at most once per version every 30 minutes. Called
     * on the scheduler thread without locks. */
    int (*request_train)(void *ctx, const char *collection, uint64_t version, aff_err *err);
} model_config;

void model_config_init(model_config *cfg);

/* Borrows e and s (both outlive the model). Starts the scheduler thread when an automatic
 * trigger is configured. */
int model_create(aff_model **out, aff_engine *e, aff_store *s, const model_config *cfg,
                 aff_err *err);
/* Replication: sets model_config.publish and .request_train (with ctx for both) after
 * creation (the transport that publishes is created after the model). Call before serving. */
void model_set_replication(aff_model *m,
                           int (*publish)(void *ctx, const char *collection, const void *blob,
                                          size_t len, aff_err *err),
                           int (*request_train)(void *ctx, const char *collection,
                                                uint64_t version, aff_err *err),
                           void *ctx);
/* Cancels running jobs, joins every thread, frees everything. NULL is a no-op. */
void model_destroy(aff_model *m);

/* Start-up: loads every collection's persisted model and parameters from the store and builds
 * their behaviour spaces. Run after the catalog rebuild, before serving. Logs each model. */
int model_load_all(aff_model *m, aff_err *err);

/* Sets the collection's training parameters (validated, persisted). */
int model_configure(aff_model *m, const char *collection, const als_params *p, aff_err *err);
/* The server's default parameters (for validating a new collection's). */
void model_default_params(const aff_model *m, als_params *out);
/* The collection's parameters (configured or the defaults). */
int model_get_params(aff_model *m, const char *collection, als_params *out, aff_err *err);

/* Starts a training job in the background and returns at once with its id. p (may be NULL)
 * overrides the collection's parameters for this job only. When a job is already running,
 * *job_id is that job's and *already_running is set. AFF_ENOTFOUND for an unknown collection;
 * AFF_EPRECONDITION when it has no events to learn from (checked before starting). */
int model_train(aff_model *m, const char *collection, const als_params *p, uint64_t *job_id,
                bool *already_running, aff_err *err);
/* Runs a training job on the calling thread (tests, benchmarks). */
int model_train_sync(aff_model *m, const char *collection, const als_params *p, aff_err *err);

typedef enum model_state {
    MODEL_STATE_NONE = 0,     /* never trained */
    MODEL_STATE_TRAINING = 1, /* a job is running (a previous model may serve meanwhile) */
    MODEL_STATE_READY = 2,    /* a model serves */
    MODEL_STATE_FAILED = 3,   /* the last job failed and no model serves; see last_error */
} model_state;

const char *model_state_name(model_state s);

typedef struct model_version_info {
    uint64_t id;           /* 1, 2, ... per server data dir */
    int64_t trained_at_ms; /* when training finished */
    uint64_t events_used;  /* (user, item) interactions learned from */
    uint64_t users, items; /* rows of the model */
    uint32_t epochs;
    double loss; /* final objective / interactions */
    double duration_s;
    als_params params;
    char space[MODEL_SPACE_NAME_LEN + 1]; /* the engine collection of its behaviour space */
} model_version_info;

typedef struct model_info {
    model_state state;
    bool has_model;
    model_version_info current; /* valid when has_model */
    bool job_running;
    uint64_t job_id; /* the running or last job; 0 = none yet */
    uint32_t job_epoch, job_epochs;
    double job_loss; /* after job_epoch epochs */
    int64_t job_started_ms;
    char last_error[256];        /* the last job's failure; "" when it succeeded */
    uint64_t events_since_train; /* events applied since the current model's data was read */
    als_params params;           /* what the next job uses */
} model_info;

/* AFF_ENOTFOUND for an unknown collection. */
int model_get_info(aff_model *m, const char *collection, model_info *out, aff_err *err);

/* Replication: installs a model that came through the write log (a blob made by a job with
 * model_config.publish) as the collection's current model with id `version` (the log
 * sequence of its commit, the same on every replica): decoded, its space built from the
 * collection's items now, persisted with store_commit_model (deleting upload's parts) and
 * swapped in before it returns; the collection's count of new events restarts from 0 (on every
 * replica alike). The collection's parameters are not changed. Runs on the apply thread. AFF_ENOTFOUND: unknown collection; AFF_EINVAL: a blob without a model. */
int model_install_blob(aff_model *m, const char *collection, const void *blob, size_t len,
                       uint64_t version, uint64_t upload, aff_err *err);

/* ---- serving ----------------------------------------------------------------------------- */

typedef struct model_user_factor_out {
    bool found; /* false: no model, or none of the user's items is in it */
    uint32_t dim;
    uint64_t version;
    uint32_t n_known; /* the user's items that the model knows */
    char space[MODEL_SPACE_NAME_LEN + 1];
    float vector[ALS_MAX_FACTORS];
} model_user_factor_out;

/* Folds the user's current interactions into a factor against the current model. */
int model_user_factor(aff_model *m, const char *collection, const char *user,
                      model_user_factor_out *out, aff_err *err);

/* The current behaviour space of the collection: *found false when no model serves. */
int model_space(aff_model *m, const char *collection, char space[MODEL_SPACE_NAME_LEN + 1],
                uint32_t *dim, bool *found, aff_err *err);

/* The users most drawn to an item (segments for campaigns), best first, from the trainer's user
 * factors (as of the last training). users[i] receives up to AFF_MAX_ID_LEN+1 bytes each.
 * AFF_EPRECONDITION when no model serves, AFF_ENOTFOUND when the item is not in it. */
typedef struct model_segment_hit {
    char user[AFF_MAX_ID_LEN + 1];
    float score;
} model_segment_hit;
int model_segment(aff_model *m, const char *collection, const char *const *item_ids, size_t n_items,
                  uint32_t k, model_segment_hit *out, uint32_t *n_out, aff_err *err);

/* ---- hooks ------------------------------------------------------------------------------- */

/* n events were applied to the collection (counts toward --train-after-events). */
void model_note_events(aff_model *m, const char *collection, uint64_t n);
/* Catalog writes, called by the catalog after they are durable, under its write lock. */
void model_on_upsert(aff_model *m, const char *collection, const aff_item *items, size_t n);
void model_on_delete(aff_model *m, const char *collection, const char *const *ids, size_t n);
void model_on_drop(aff_model *m, const char *collection);

#endif

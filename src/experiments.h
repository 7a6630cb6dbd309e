/*
 * experiments.h: A/B experiments on a surface, their deterministic assignment and the
 * optional Thompson-sampling bandit — the choosing half of the continuous-optimization loop.
 *
 * An experiment runs on (collection, surface) with 2..EXPERIMENTS_MAX_ARMS arms; each arm is
 * a serving configuration (a preset of the serving config and/or inline settings: space,
 * diversity weight, exploration share) with a traffic share; the shares add up to 1. At most
 * one experiment runs per (collection, surface). Validation lives here (experiments_add),
 * with field names as in affinity.v1.Experiment ("arms[1].preset").
 *
 * Assignment: u = hash(experiment id, user id) mapped to [0, 1), and the arm is the first
 * whose cumulative share exceeds u. The hash is the project's 64-bit string hash, the same on
 * every replica and after restarts, so a shopper keeps their arm while the shares stay.
 *
 * Bandit: each attributed impression of an arm and each success (click or purchase, by the
 * bandit's metric) is counted here (experiments_observe). Every update_every impressions the
 * shares become floor + (1 - arms * floor) * P(arm best), estimated with
 * EXPERIMENTS_BANDIT_DRAWS Thompson draws from Beta(1 + successes, 1 + impressions -
 * successes) with a generator seeded by (seed, version); the new version and shares are
 * stored durably before they are used. Same (user, experiment, version): same arm. As u is
 * fixed per shopper, a shopper changes arm only when a boundary moves past their u.
 *
 * Memory: one experiment takes sizeof(experiment) (1824 bytes) in a fixed table of
 * EXPERIMENTS_MAX (running and stopped); its outcome series live in outcomes.h.
 *
 * Threading: every function may be called from any thread (one mutex; the store write of a
 * bandit update happens outside it; experiments_add and experiments_stop hold it across
 * their durable write, a few milliseconds in which assignments wait — both are rare admin
 * calls).
 */
#ifndef AFFINITY_EXPERIMENTS_H
#define AFFINITY_EXPERIMENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "outcomes.h"
#include "status.h"
#include "store.h"

typedef struct aff_experiments aff_experiments;

#define EXPERIMENTS_MAX_ARMS      8
#define EXPERIMENTS_MAX           256 /* experiments kept, running or stopped */
#define EXPERIMENTS_BANDIT_DRAWS  10000
#define EXPERIMENTS_DEFAULT_FLOOR 0.05
#define EXPERIMENTS_DEFAULT_EVERY 100

/* Values match affinity.v1.BanditMetric (0 means conversion). */
typedef enum experiments_metric {
    EXPERIMENTS_METRIC_CTR = 1,
    EXPERIMENTS_METRIC_CONVERSION = 2,
} experiments_metric;

typedef struct experiments_arm {
    char name[OUTCOMES_MAX_LABEL + 1];
    double share;
    char preset[OUTCOMES_MAX_LABEL + 1]; /* "": none */
    int space;                           /* pipeline_space value; 0: the request's */
    bool has_diversity;
    float diversity;
    bool has_exploration;
    float exploration_share;
} experiments_arm;

typedef struct experiments_bandit {
    bool enabled;
    int metric;     /* experiments_metric; 0: conversion */
    bool has_floor; /* unset: EXPERIMENTS_DEFAULT_FLOOR */
    double floor;
    uint32_t update_every; /* 0: EXPERIMENTS_DEFAULT_EVERY */
    uint64_t seed;
} experiments_bandit;

typedef struct experiment {
    char id[OUTCOMES_MAX_LABEL + 1];
    char collection[AFF_MAX_NAME_LEN + 1];
    char surface[OUTCOMES_MAX_LABEL + 1];
    experiments_arm arms[EXPERIMENTS_MAX_ARMS];
    uint32_t n_arms;
    experiments_bandit bandit;
    /* set by the module */
    bool running;
    int64_t created_ms, stopped_ms;
    double shares[EXPERIMENTS_MAX_ARMS]; /* in force now */
    uint64_t version;                    /* bandit updates made */
    uint64_t impressions[EXPERIMENTS_MAX_ARMS], successes[EXPERIMENTS_MAX_ARMS];
    uint64_t since_update; /* impressions since the last bandit update */
} experiment;

typedef struct experiments_config {
    aff_store *store; /* borrowed; experiments persist there */
    /* Whether the serving config has a preset of that name (arms[i].preset); NULL: any name
     * is refused. */
    bool (*preset_exists)(void *ctx, const char *name);
    void *preset_ctx;
    int64_t (*now_ms)(void *ctx); /* NULL: CLOCK_REALTIME */
    void *now_ctx;
} experiments_config;

/* Loads every stored experiment. AFF_EINTERNAL for a corrupt record. */
int experiments_create(aff_experiments **out, const experiments_config *cfg, aff_err *err);
void experiments_destroy(aff_experiments *ex);

/* Validates def (every input field; the collection's existence is the caller's), stores it
 * durably and starts it; *out (may be NULL) is the stored state. AFF_EINVAL naming the field;
 * AFF_EEXIST for a known id; AFF_EPRECONDITION when another experiment runs on the same
 * collection and surface; AFF_EFULL beyond EXPERIMENTS_MAX. */
int experiments_add(aff_experiments *ex, const experiment *def, experiment *out, aff_err *err);
/* AFF_ENOTFOUND for an unknown id. */
int experiments_get(aff_experiments *ex, const char *id, experiment *out, aff_err *err);
/* Every experiment of collection (NULL or "": all), by id; *out malloc'ed (caller frees). */
int experiments_list(aff_experiments *ex, const char *collection, experiment **out, size_t *n,
                     aff_err *err);
/* Stops it durably (already stopped: unchanged). AFF_ENOTFOUND. */
int experiments_stop(aff_experiments *ex, const char *id, experiment *out, aff_err *err);

/* The running experiment on (collection, surface) and the arm it gives user_id. false (out
 * untouched) when none runs there or user_id is NULL/"". */
typedef struct experiments_assignment {
    char experiment[OUTCOMES_MAX_LABEL + 1];
    experiments_arm arm;
    uint64_t version;
} experiments_assignment;
bool experiments_assign(aff_experiments *ex, const char *collection, const char *surface,
                        const char *user_id, experiments_assignment *out);

/* The arm index for a point u in [0, 1) under shares (exposed for tests). */
uint32_t experiments_pick(const double *shares, uint32_t n, double u);
/* u for (experiment id, user id). */
double experiments_point(const char *experiment_id, const char *user_id);
/* Thompson shares for the given counts (exposed for tests). */
void experiments_thompson(const uint64_t *impressions, const uint64_t *successes, uint32_t n,
                          double floor, uint64_t seed, uint64_t version, double *shares);

/* An attributed outcome of (experiment, arm) (outcomes_attribution.counted): feeds the
 * bandit. Unknown or stopped experiments are ignored. */
void experiments_observe(aff_experiments *ex, const char *experiment, const char *arm,
                         const bool counted[OUTCOMES_KINDS]);

/* The experiment's outcome counts per arm (rows[i] for arms[i]) since it was created (until
 * it stopped), summed over surfaces and strategies, with points per step_ms when > 0 (the
 * caller frees rows[i].points). o NULL: zero counts. AFF_EINVAL, AFF_ENOMEM. */
int experiments_arm_stats(aff_outcomes *o, const experiment *e, uint32_t step_ms,
                          outcomes_row rows[EXPERIMENTS_MAX_ARMS], aff_err *err);

/* Experiments running now. */
size_t experiments_running(aff_experiments *ex);

#endif

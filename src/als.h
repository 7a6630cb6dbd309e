/*
 * als.h: implicit alternating least squares (iALS), the learning algorithm behind Affinity's
 * behaviour space. Pure arithmetic on plain arrays: no store, no engine, no threads of its own
 * beyond OpenMP inside als_train.
 *
 * Model (Hu, Koren, Volinsky 2008, with the regularisation and unobserved weight of Rendle et
 * al., "Revisiting the Performance of iALS on Item Recommendation Benchmarks", RecSys 2022).
 * Users u and items i get factors x_u, y_i in R^d. With S the observed (u, i) pairs and c_ui
 * their confidence, training minimises
 *
 *   L = sum_{(u,i) in S} c_ui (x_u.y_i - 1)^2  +  alpha0 * sum_{all u, i} (x_u.y_i)^2
 *       + lambda * sum_u (|S_u| + alpha0 |I|)^nu |x_u|^2 + lambda * sum_i (|S_i| + alpha0 |U|)^nu
 * |y_i|^2
 *
 * by alternating exact-in-expectation row solves. With the other side fixed, user u solves
 *
 *   (alpha0 G + lambda_u I + sum_{i in S_u} c_ui y_i y_i^T) x_u = sum_{i in S_u} c_ui y_i,
 *   G = Y^T Y (the item Gramian), lambda_u = lambda (|S_u| + alpha0 |I|)^nu,
 *
 * and items likewise against the user Gramian. The unobserved term costs one d x d Gramian per
 * half-epoch, not one term per (u, i) pair. Rows are solved either exactly (Cholesky) or by a
 * few conjugate-gradient steps warm-started from the previous epoch's row (cg_steps > 0),
 * which costs O(|S_u| d + d^2) per step instead of O(|S_u| d^2 + d^3).
 *
 * Fold-in: a user who was not in training (or whose events changed since) gets x_u from the
 * same exact solve against the fixed item factors: als_solve_row. Serving uses that; the
 * trainer's last user half-epoch uses it too when cg_steps == 0.
 */
#ifndef AFFINITY_ALS_H
#define AFFINITY_ALS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define ALS_MIN_FACTORS 8
#define ALS_MAX_FACTORS 512
#define ALS_MAX_EPOCHS  1000

typedef struct als_params {
    uint32_t factors;  /* d, ALS_MIN_FACTORS..ALS_MAX_FACTORS; default 64 */
    float lambda;      /* regularisation, ≥ 0, finite; default 0.007 */
    float alpha0;      /* weight of every unobserved pair, ≥ 0, finite; default 0.3 */
    float nu;          /* exponent of the frequency-scaled regularisation, 0..2; default 1 */
    uint32_t epochs;   /* 1..ALS_MAX_EPOCHS; default 12 */
    uint32_t cg_steps; /* 0 = exact Cholesky row solves; else CG steps per row (default 3) */
    float init_std;    /* factor initialisation std; 0 = 0.1 / sqrt(d) */
    uint64_t seed;     /* initialisation seed; default 1 */
    uint32_t threads;  /* 0 = all cores */
} als_params;

void als_params_init(als_params *p);
/* AFF_EINVAL naming the first field out of range. */
int als_params_check(const als_params *p, aff_err *err);

/* A sparse users x items matrix in compressed rows: row r's entries are
 * col[row_ptr[r] .. row_ptr[r+1]) with confidences conf[...] (finite, > 0). Borrowed. */
typedef struct als_matrix {
    uint32_t n_rows, n_cols;
    const uint64_t *row_ptr; /* n_rows + 1 */
    const uint32_t *col;     /* nnz, each < n_cols */
    const float *conf;       /* nnz */
} als_matrix;

/* Called after each epoch with the objective divided by nnz; return false to cancel. */
typedef bool (*als_progress_fn)(void *ctx, uint32_t epoch, uint32_t epochs, double loss);

typedef struct als_report {
    uint32_t epochs_run;
    double loss; /* final objective / nnz */
    double seconds;
    bool on_device;          /* the epochs ran on the training device (als_device) */
    char device_error[256];  /* why a device that was offered did not train ("" if it did) */
} als_report;

/* What a training device receives (all borrowed for the duration of begin): the matrix both
 * ways, every row's regularisation lambda (|S_r| + alpha0 N)^nu as als_row_lambda computes it,
 * and the initial factors. */
typedef struct als_device_job {
    const als_matrix *users; /* users x items */
    const als_matrix *items; /* its transpose */
    const float *user_lambda, *item_lambda;
    const als_params *params;
    const float *user_factors, *item_factors; /* initial values */
} als_device_job;

/*
 * A device that runs the per-epoch work of training with the same arithmetic as the CPU path
 * (same confidences, regularisation and CG steps; only the order of additions differs): the
 * GPU backend offers one (backend.h, kernels/als.cu). Every call returns 0 or a negative
 * aff_status; after begin succeeded, end is called exactly once. One job per state; the
 * device may run several states at once.
 */
typedef struct als_device {
    void *ctx;
    int (*begin)(void *ctx, const als_device_job *job, void **state, aff_err *err);
    /* Solves every user row (users = true) or every item row against the other side. */
    int (*half_epoch)(void *state, bool users, aff_err *err);
    /* The objective of this file's comment, not divided by nnz. */
    int (*objective)(void *state, double *sum, aff_err *err);
    int (*read)(void *state, float *user_factors, float *item_factors, aff_err *err);
    void (*end)(void *state);
} als_device;

/* Trains on R (users x items). user_factors (n_rows x d) and item_factors (n_cols x d) are
 * written, row-major. With dev (may be NULL) and CG row solves (cg_steps > 0) the epochs run on
 * the device; when any device call fails the job restarts on the CPU from the same
 * initialisation and report->device_error says why, so a device failure never fails training.
 * AFF_EINVAL for bad params, AFF_EPRECONDITION for an empty matrix, AFF_ECANCELLED when
 * progress returned false, AFF_ENOMEM. */
int als_train(const als_matrix *r, const als_params *p, const als_device *dev, float *user_factors,
              float *item_factors, als_progress_fn progress, void *progress_ctx,
              als_report *report, aff_err *err);

/* lambda (n + alpha0 n_other)^nu: the regularisation of a row with n entries. */
float als_row_lambda(const als_params *p, size_t n, uint32_t n_other);

/* G = F^T F for n rows of d floats (d x d, full symmetric, row-major). */
void als_gramian(const float *factors, size_t n, uint32_t d, float *gram);

/* Scratch for als_solve_row: (d*d + 3*d) floats. */
size_t als_solve_scratch_floats(uint32_t d);

/* The exact row solve shared by training and fold-in:
 *   (alpha0 G + lambda (n + alpha0 n_other)^nu I + sum_j conf_j y_j y_j^T) x = sum_j conf_j y_j
 * where y_j = other[idx[j]] (rows of d floats) and n_other is the number of rows of the other
 * side. x (d floats) is written; with n == 0, x = 0. Returns false when the system is not
 * positive definite (lambda = alpha0 = 0 and too few rows); then x = 0. */
bool als_solve_row(const float *other, const float *gram, uint32_t d, uint32_t n_other,
                   const als_params *p, const uint32_t *idx, const float *conf, size_t n, float *x,
                   float *scratch);

/*
 * Content -> factor map, for items that have a content vector but no events yet: a linear map
 * fitted at training time by ridge regression on the items that have both,
 *
 *   f(x) = f_mean + W (x - x_mean),   W = argmin sum_i |f_i - f_mean - W (x_i - x_mean)|^2
 *                                                + mu |W|_F^2,
 *   mu = ALS_MAP_RIDGE * tr(C) / dim_in,   C = sum_i (x_i - x_mean)(x_i - x_mean)^T,
 *
 * so a new item lands where items with similar content sit in the behaviour space. The ridge is
 * relative to the data's own scale (tr(C) / dim_in is the mean variance per input dimension
 * times n), so it does not depend on how the shop scales its vectors.
 */
#define ALS_MAP_RIDGE     0.1f
#define ALS_MAP_MIN_ITEMS 2

typedef struct als_content_map {
    uint32_t dim_in, d;
    float *w;      /* d x dim_in, row-major: factor j = f_mean[j] + w[j] . (x - x_mean) */
    float *x_mean; /* dim_in */
    float *f_mean; /* d */
} als_content_map;

/* Fits the map from n pairs: x (n x dim_in) and f (n x d), row-major, borrowed. *out owns its
 * arrays (als_content_map_free). AFF_EPRECONDITION with fewer than ALS_MAP_MIN_ITEMS pairs,
 * AFF_ENOMEM, AFF_EINTERNAL when the system is singular (all x equal). */
int als_content_map_fit(const float *x, const float *f, size_t n, uint32_t dim_in, uint32_t d,
                        als_content_map *out, aff_err *err);
/* f_out (d floats) = the map applied to x (dim_in floats). */
void als_content_map_apply(const als_content_map *map, const float *x, float *f_out);
void als_content_map_free(als_content_map *map);

/* Hu et al.'s confidence from Affinity's decayed, type-weighted event sum r (a view weighs 1 by
 * default): c = r for r ≤ 1 (old events fade below one view), c = 1 + ln(r) above (a purchase,
 * weight 8, counts 1 + ln 8 ≈ 3.1 views; repeats grow it slowly). 0 for r ≤ 0. */
float als_confidence(double r);

#endif

/*
 * als.c: owns the iALS arithmetic (see als.h for the objective). Rules kept: every row solve,
 * in training and in fold-in, is the same function (als_solve_row, or its CG variant during
 * training); the Gramian is recomputed once per half-epoch; no allocation per row (scratch
 * is per thread). BLAS (single-threaded, see backend_faiss.c) does the d x d work: syrk for
 * Gramians and row outer products; the parallelism over rows is OpenMP's.
 */
#include "als.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rng.h"

/* Single-precision BLAS, Fortran interface (OpenBLAS exports both; cblas.h differs between
 * Debian's alternatives, the Fortran symbols do not). */
extern void ssyrk_(const char *uplo, const char *trans, const int *n, const int *k,
                   const float *alpha, const float *a, const int *lda, const float *beta, float *c,
                   const int *ldc);
extern void sgemm_(const char *transa, const char *transb, const int *m, const int *n,
                   const int *k, const float *alpha, const float *a, const int *lda, const float *b,
                   const int *ldb, const float *beta, float *c, const int *ldc);
extern void spotrf_(const char *uplo, const int *n, float *a, const int *lda, int *info);
extern void spotrs_(const char *uplo, const int *n, const int *nrhs, const float *a, const int *lda,
                    float *b, const int *ldb, int *info);

void als_params_init(als_params *p)
{
    *p = (als_params){.factors = 64,
                      .lambda = 0.007f,
                      .alpha0 = 0.3f,
                      .nu = 1.0f,
                      .epochs = 12,
                      .cg_steps = 3,
                      .init_std = 0.0f,
                      .seed = 1,
                      .threads = 0};
}

int als_params_check(const als_params *p, aff_err *err)
{
    if (p->factors < ALS_MIN_FACTORS || p->factors > ALS_MAX_FACTORS)
        return aff__fail(err, AFF_EINVAL, "factors = %u is out of range %d..%d", p->factors,
                         ALS_MIN_FACTORS, ALS_MAX_FACTORS);
    if (!isfinite(p->lambda) || p->lambda < 0)
        return aff__fail(err, AFF_EINVAL, "lambda must be a finite number ≥ 0");
    if (!isfinite(p->alpha0) || p->alpha0 < 0)
        return aff__fail(err, AFF_EINVAL, "alpha0 must be a finite number ≥ 0");
    if (!(p->nu >= 0 && p->nu <= 2)) return aff__fail(err, AFF_EINVAL, "nu must be in 0..2");
    if (p->epochs < 1 || p->epochs > ALS_MAX_EPOCHS)
        return aff__fail(err, AFF_EINVAL, "epochs = %u is out of range 1..%d", p->epochs,
                         ALS_MAX_EPOCHS);
    if (p->cg_steps > 64) return aff__fail(err, AFF_EINVAL, "cg_steps must be 0..64");
    if (!isfinite(p->init_std) || p->init_std < 0)
        return aff__fail(err, AFF_EINVAL, "init_std must be a finite number ≥ 0");
    if (p->lambda == 0 && p->alpha0 == 0)
        return aff__fail(err, AFF_EINVAL,
                         "lambda and alpha0 are both 0: the row systems would be singular");
    return AFF_OK;
}

float als_confidence(double r)
{
    if (!(r > 0)) return 0.0f;
    if (r <= 1) return (float)r;
    return (float)(1.0 + log(r));
}

/* ---- small dense kernels ------------------------------------------------------------------ */

/* Plain loops the compiler vectorizes; they are inlined into the row solvers, which are built
 * once per instruction set (target_clones) so the loops use the widest vectors the CPU has
 * without a call per entry. */
static inline float dot(const float *a, const float *b, uint32_t d)
{
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (uint32_t i = 0; i < d; i++)
        s += a[i] * b[i];
    return s;
}

static inline void axpy(float a, const float *restrict x, float *restrict y, uint32_t d)
{
#pragma omp simd
    for (uint32_t i = 0; i < d; i++)
        y[i] += a * x[i];
}

/* y = a * x. */
static inline void scale_copy(float a, const float *restrict x, float *restrict y, size_t d)
{
#pragma omp simd
    for (size_t i = 0; i < d; i++)
        y[i] = a * x[i];
}

/* y = M x for a full symmetric d x d M, as a sum of M's columns (= its rows): no horizontal
 * reductions. */
static inline void symv(const float *restrict m, const float *restrict x, float *restrict y,
                        uint32_t d)
{
    memset(y, 0, (size_t)d * sizeof *y);
    for (uint32_t c = 0; c < d; c++)
        axpy(x[c], m + (size_t)c * d, y, d);
}

/* x86-64-v3 is AVX2 with FMA, v4 adds AVX-512 (F, BW, DQ, VL). */
#define ALS_CLONES                                                                                 \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

/* Asks for row y of the other side ahead of its use: the rows an entry list touches are
 * scattered, and the solvers are bound by waiting for them. */
static inline void prefetch_row(const float *y, uint32_t d)
{
    for (uint32_t k = 0; k < d; k += 16)
        __builtin_prefetch(y + k);
}

enum { PREFETCH_AHEAD = 4 };

void als_gramian(const float *factors, size_t n, uint32_t d, float *gram)
{
    memset(gram, 0, (size_t)d * d * sizeof(float));
    /* Column-major view: factors is a d x n matrix F' (lda = d); C = F' F'^T = F^T F. */
    const int id = (int)d, lda = (int)d;
    const float one = 1.0f, zero = 0.0f;
    for (size_t r0 = 0; r0 < n; r0 += (1u << 30) / d) {
        size_t nr = n - r0 < (1u << 30) / d ? n - r0 : (1u << 30) / d;
        int k = (int)nr;
        ssyrk_("U", "N", &id, &k, &one, factors + r0 * d, &lda, r0 ? &one : &zero, gram, &id);
    }
    /* ssyrk filled the upper triangle in column-major order = the lower one row-major;
     * mirror it so the matrix is full. */
    for (uint32_t r = 0; r < d; r++)
        for (uint32_t c = r + 1; c < d; c++)
            gram[(size_t)r * d + c] = gram[(size_t)c * d + r];
}

size_t als_solve_scratch_floats(uint32_t d)
{
    return (size_t)d * d + 3 * (size_t)d;
}

float als_row_lambda(const als_params *p, size_t n, uint32_t n_other)
{
    double base = (double)n + (double)p->alpha0 * n_other;
    return (float)(p->lambda * (p->nu == 1.0f ? base : pow(base, p->nu)));
}

/* Solves a x = b for a symmetric positive definite a (d x d, full; its upper triangle in
 * column-major order is read and overwritten by the Cholesky factor) with LAPACK. */
static bool cholesky_solve(float *a, uint32_t d, const float *b, float *x)
{
    const int n = (int)d, one = 1;
    int info = 0;
    spotrf_("U", &n, a, &n, &info);
    if (info != 0) return false;
    memcpy(x, b, (size_t)d * sizeof(float));
    spotrs_("U", &n, &one, a, &n, x, &n, &info);
    return info == 0;
}

ALS_CLONES bool als_solve_row(const float *other, const float *gram, uint32_t d,
                              uint32_t n_other, const als_params *p, const uint32_t *idx,
                              const float *conf, size_t n, float *x, float *scratch)
{
    memset(x, 0, (size_t)d * sizeof(float));
    if (n == 0) return true;
    float *a = scratch, *b = scratch + (size_t)d * d, *g = b + d;
    float lam = als_row_lambda(p, n, n_other);
    scale_copy(p->alpha0, gram, a, (size_t)d * d);
    for (uint32_t k = 0; k < d; k++)
        a[(size_t)k * d + k] += lam;
    memset(b, 0, (size_t)d * sizeof(float));
    /* A += sum c_j y_j y_j^T in blocks of 64 scaled rows through syrk; b += sum c_j y_j. */
    enum { BLOCK = 64 };
    float *blk = malloc((size_t)BLOCK * d * sizeof(float));
    if (!blk) {
        /* Rank-one updates: slower, no allocation. */
        for (size_t j = 0; j < n; j++) {
            const float *y = other + (size_t)idx[j] * d;
            for (uint32_t r = 0; r < d; r++)
                axpy(conf[j] * y[r], y, a + (size_t)r * d, d);
            axpy(conf[j], y, b, d);
        }
    } else {
        const int id = (int)d;
        const float one = 1.0f;
        for (size_t j0 = 0; j0 < n; j0 += BLOCK) {
            int nb = (int)(n - j0 < BLOCK ? n - j0 : BLOCK);
            for (int j = 0; j < nb; j++) {
                const float *y = other + (size_t)idx[j0 + j] * d;
                float c = conf[j0 + j];
                scale_copy(sqrtf(c), y, blk + (size_t)j * d, d);
                axpy(c, y, b, d);
            }
            /* Column-major: blk is d x nb; upper (col-major) = lower (row-major) of a. */
            ssyrk_("U", "N", &id, &nb, &one, blk, &id, &one, a, &id);
        }
        free(blk);
    }
    (void)g;
    if (!cholesky_solve(a, d, b, x)) {
        memset(x, 0, (size_t)d * sizeof(float));
        return false;
    }
    return true;
}

/* A few CG steps on the same system, from the current x (the previous epoch's row). */
ALS_CLONES static void cg_solve_row(const float *other, const float *gram, uint32_t d, uint32_t n_other,
                         const als_params *p, const uint32_t *idx, const float *conf, size_t n,
                         float *x, float *scratch)
{
    if (n == 0) {
        memset(x, 0, (size_t)d * sizeof(float));
        return;
    }
    float *r = scratch, *pv = r + d, *ap = pv + d;
    float lam = als_row_lambda(p, n, n_other);
    /* r = b - A x */
    symv(gram, x, r, d);
    for (uint32_t k = 0; k < d; k++)
        r[k] = -(p->alpha0 * r[k] + lam * x[k]);
    for (size_t j = 0; j < n; j++) {
        if (j + PREFETCH_AHEAD < n) prefetch_row(other + (size_t)idx[j + PREFETCH_AHEAD] * d, d);
        const float *y = other + (size_t)idx[j] * d;
        axpy(conf[j] * (1.0f - dot(y, x, d)), y, r, d);
    }
    memcpy(pv, r, (size_t)d * sizeof(float));
    float rs = dot(r, r, d);
    for (uint32_t it = 0; it < p->cg_steps && rs > 1e-20f; it++) {
        symv(gram, pv, ap, d);
        for (uint32_t k = 0; k < d; k++)
            ap[k] = p->alpha0 * ap[k] + lam * pv[k];
        for (size_t j = 0; j < n; j++) {
            if (j + PREFETCH_AHEAD < n)
                prefetch_row(other + (size_t)idx[j + PREFETCH_AHEAD] * d, d);
            const float *y = other + (size_t)idx[j] * d;
            axpy(conf[j] * dot(y, pv, d), y, ap, d);
        }
        float pap = dot(pv, ap, d);
        if (!(pap > 0)) break;
        float alpha = rs / pap;
        axpy(alpha, pv, x, d);
        axpy(-alpha, ap, r, d);
        float rs_new = dot(r, r, d);
        float beta = rs_new / rs;
        for (uint32_t k = 0; k < d; k++)
            pv[k] = r[k] + beta * pv[k];
        rs = rs_new;
    }
}

/* ---- training ------------------------------------------------------------------------------ */

/* The transpose of m (items x users) in fresh arrays. */
static int transpose(const als_matrix *m, uint64_t **row_ptr, uint32_t **col, float **conf)
{
    uint64_t nnz = m->row_ptr[m->n_rows];
    *row_ptr = calloc((size_t)m->n_cols + 1, sizeof **row_ptr);
    *col = malloc((nnz ? nnz : 1) * sizeof **col);
    *conf = malloc((nnz ? nnz : 1) * sizeof **conf);
    if (!*row_ptr || !*col || !*conf) return AFF_ENOMEM;
    uint64_t *rp = *row_ptr;
    for (uint64_t k = 0; k < nnz; k++)
        rp[m->col[k] + 1]++;
    for (uint32_t c = 0; c < m->n_cols; c++)
        rp[c + 1] += rp[c];
    uint64_t *fill = malloc(((size_t)m->n_cols + 1) * sizeof *fill);
    if (!fill) return AFF_ENOMEM;
    memcpy(fill, rp, ((size_t)m->n_cols + 1) * sizeof *fill);
    for (uint32_t r = 0; r < m->n_rows; r++)
        for (uint64_t k = m->row_ptr[r]; k < m->row_ptr[r + 1]; k++) {
            uint64_t at = fill[m->col[k]]++;
            (*col)[at] = r;
            (*conf)[at] = m->conf[k];
        }
    free(fill);
    return AFF_OK;
}

/* One half-epoch: every row of `solve` (rows x d) against the fixed `other` (n_other x d). */
static int half_epoch(const uint64_t *row_ptr, const uint32_t *col, const float *conf,
                      uint32_t rows, float *solve, const float *other, uint32_t n_other,
                      const als_params *p, float *gram, int threads)
{
    const uint32_t d = p->factors;
    als_gramian(other, n_other, d, gram);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scratch = malloc(als_solve_scratch_floats(d) * sizeof(float));
        if (!scratch) failed = 1;
#pragma omp for schedule(dynamic, 32)
        for (uint32_t r = 0; r < rows; r++) {
            if (!scratch) continue;
            size_t n = (size_t)(row_ptr[r + 1] - row_ptr[r]);
            float *x = solve + (size_t)r * d;
            if (p->cg_steps)
                cg_solve_row(other, gram, d, n_other, p, col + row_ptr[r], conf + row_ptr[r], n, x,
                             scratch);
            else
                als_solve_row(other, gram, d, n_other, p, col + row_ptr[r], conf + row_ptr[r], n, x,
                              scratch);
        }
        free(scratch);
    }
    return failed ? AFF_ENOMEM : AFF_OK;
}

/* User row r's terms of the objective (tmp: d floats, may be NULL: no unobserved term). */
ALS_CLONES static void row_objective(const als_matrix *m, const float *x, uint32_t r,
                                     const float *v, const float *gram_v, const als_params *p,
                                     float *tmp, double *obs, double *unobs, double *reg)
{
    const uint32_t d = p->factors;
    for (uint64_t k = m->row_ptr[r]; k < m->row_ptr[r + 1]; k++) {
        double e = dot(x, v + (size_t)m->col[k] * d, d) - 1.0;
        *obs += m->conf[k] * e * e;
    }
    if (tmp) {
        symv(gram_v, x, tmp, d);
        *unobs += dot(x, tmp, d);
    }
    *reg += als_row_lambda(p, m->row_ptr[r + 1] - m->row_ptr[r], m->n_cols) * dot(x, x, d);
}

/* The objective of als.h divided by nnz. */
static double objective(const als_matrix *m, const float *u, const float *v, const float *gram_v,
                        const uint64_t *item_counts, const als_params *p, int threads)
{
    const uint32_t d = p->factors;
    double obs = 0, unobs = 0, reg = 0;
#pragma omp parallel num_threads(threads) reduction(+ : obs, unobs, reg)
    {
        float *tmp = malloc((size_t)d * sizeof(float));
#pragma omp for schedule(static)
        for (uint32_t r = 0; r < m->n_rows; r++) {
            row_objective(m, u + (size_t)r * d, r, v, gram_v, p, tmp, &obs, &unobs, &reg);
        }
#pragma omp for schedule(static)
        for (uint32_t c = 0; c < m->n_cols; c++) {
            const float *y = v + (size_t)c * d;
            reg += als_row_lambda(p, item_counts[c + 1] - item_counts[c], m->n_rows) * dot(y, y, d);
        }
        free(tmp);
    }
    double nnz = (double)m->row_ptr[m->n_rows];
    return (obs + p->alpha0 * unobs + reg) / (nnz > 0 ? nnz : 1);
}

/* The epochs on a training device (als.h). 0, AFF_ECANCELLED (with err) or a device failure
 * (err holds the device's reason; the caller falls back to the CPU). */
static int train_on_device(const als_device *dev, const als_matrix *m, const als_matrix *t,
                           const als_params *p, float *user_factors, float *item_factors,
                           als_progress_fn progress, void *progress_ctx, uint32_t *epochs_run,
                           double *loss, aff_err *err)
{
    int status = AFF_OK;
    void *state = NULL;
    float *ul = malloc(((size_t)m->n_rows + 1) * sizeof *ul);
    float *il = malloc(((size_t)m->n_cols + 1) * sizeof *il);
    if (!ul || !il) {
        status = aff__fail(err, AFF_ENOMEM, "training: out of memory");
        goto out;
    }
    for (uint32_t r = 0; r < m->n_rows; r++)
        ul[r] = als_row_lambda(p, m->row_ptr[r + 1] - m->row_ptr[r], m->n_cols);
    for (uint32_t c = 0; c < m->n_cols; c++)
        il[c] = als_row_lambda(p, t->row_ptr[c + 1] - t->row_ptr[c], m->n_rows);
    als_device_job job = {.users = m,
                          .items = t,
                          .user_lambda = ul,
                          .item_lambda = il,
                          .params = p,
                          .user_factors = user_factors,
                          .item_factors = item_factors};
    if ((status = dev->begin(dev->ctx, &job, &state, err))) {
        state = NULL;
        goto out;
    }
    const double nnz = (double)m->row_ptr[m->n_rows];
    for (uint32_t e = 0; e < p->epochs; e++) {
        double sum = 0;
        if ((status = dev->half_epoch(state, true, err)) ||
            (status = dev->half_epoch(state, false, err)) ||
            (status = dev->objective(state, &sum, err)))
            goto out;
        *loss = sum / nnz;
        *epochs_run = e + 1;
        if (progress && !progress(progress_ctx, e + 1, p->epochs, *loss)) {
            status = aff__fail(err, AFF_ECANCELLED, "training cancelled after epoch %u", e + 1);
            goto out;
        }
    }
    status = dev->read(state, user_factors, item_factors, err);
out:
    if (state) dev->end(state);
    free(ul);
    free(il);
    return status;
}

/* Gaussian item factors, users at zero: the first user half-epoch solves them from the items. */
static void init_factors(const als_matrix *m, const als_params *p, float *user_factors,
                         float *item_factors)
{
    const uint32_t d = p->factors;
    float sd = p->init_std > 0 ? p->init_std : 0.1f / sqrtf((float)d);
    aff_rng rng = {p->seed};
    for (size_t k = 0; k < (size_t)m->n_cols * d; k++)
        item_factors[k] = (float)(sd * aff_rng_normal(&rng));
    memset(user_factors, 0, (size_t)m->n_rows * d * sizeof(float));
}

int als_train(const als_matrix *m, const als_params *p, const als_device *dev, float *user_factors,
              float *item_factors, als_progress_fn progress, void *progress_ctx,
              als_report *report, aff_err *err)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (report) *report = (als_report){0};
    int status = als_params_check(p, err);
    if (status) return status;
    if (m->n_rows == 0 || m->n_cols == 0 || m->row_ptr[m->n_rows] == 0)
        return aff__fail(err, AFF_EPRECONDITION,
                         "nothing to learn from: no events on items of this collection");
    const uint32_t d = p->factors;
    int threads = p->threads ? (int)p->threads : omp_get_num_procs();
    double loss = 0;
    uint32_t e = 0;
    bool on_device = false;
    char device_error[sizeof report->device_error] = "";
    uint64_t *t_ptr = NULL;
    uint32_t *t_col = NULL;
    float *t_conf = NULL, *gram = NULL;
    if (transpose(m, &t_ptr, &t_col, &t_conf) || !(gram = malloc((size_t)d * d * sizeof(float)))) {
        status = aff__fail(err, AFF_ENOMEM, "training: out of memory");
        goto out;
    }
    init_factors(m, p, user_factors, item_factors);

    if (dev && p->cg_steps > 0) {
        als_matrix t = {.n_rows = m->n_cols,
                        .n_cols = m->n_rows,
                        .row_ptr = t_ptr,
                        .col = t_col,
                        .conf = t_conf};
        aff_err derr = {0};
        status = train_on_device(dev, m, &t, p, user_factors, item_factors, progress,
                                 progress_ctx, &e, &loss, &derr);
        if (status == AFF_OK || status == AFF_ECANCELLED) {
            on_device = true;
            if (status) aff__fail(err, status, "%s", derr.msg);
            goto out;
        }
        /* The device failed: the CPU takes the whole job over from the same start. */
        snprintf(device_error, sizeof device_error, "%s", derr.msg);
        status = AFF_OK;
        e = 0;
        loss = 0;
        init_factors(m, p, user_factors, item_factors);
    } else if (dev) {
        snprintf(device_error, sizeof device_error,
                 "exact row solves (cg_steps = 0) run on the CPU only");
    }

    for (e = 0; e < p->epochs; e++) {
        if ((status = half_epoch(m->row_ptr, m->col, m->conf, m->n_rows, user_factors, item_factors,
                                 m->n_cols, p, gram, threads)) ||
            (status = half_epoch(t_ptr, t_col, t_conf, m->n_cols, item_factors, user_factors,
                                 m->n_rows, p, gram, threads))) {
            aff__fail(err, status, "training: out of memory");
            goto out;
        }
        als_gramian(item_factors, m->n_cols, d, gram);
        loss = objective(m, user_factors, item_factors, gram, t_ptr, p, threads);
        if (progress && !progress(progress_ctx, e + 1, p->epochs, loss)) {
            status = aff__fail(err, AFF_ECANCELLED, "training cancelled after epoch %u", e + 1);
            e++;
            goto out;
        }
    }
out:
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (report) {
        report->epochs_run = e;
        report->loss = loss;
        report->seconds = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
        report->on_device = on_device;
        snprintf(report->device_error, sizeof report->device_error, "%s", device_error);
    }
    free(t_ptr);
    free(t_col);
    free(t_conf);
    free(gram);
    return status;
}

/* ---- content -> factor map ------------------------------------------------------------------ */

void als_content_map_free(als_content_map *map)
{
    if (!map) return;
    free(map->w);
    free(map->x_mean);
    free(map->f_mean);
    *map = (als_content_map){0};
}

int als_content_map_fit(const float *x, const float *f, size_t n, uint32_t dim_in, uint32_t d,
                        als_content_map *out, aff_err *err)
{
    *out = (als_content_map){.dim_in = dim_in, .d = d};
    if (n < ALS_MAP_MIN_ITEMS)
        return aff__fail(err, AFF_EPRECONDITION,
                         "content map: %zu items with both a content vector and events; need %d",
                         n, ALS_MAP_MIN_ITEMS);
    enum { BLOCK = 256 };
    int status = AFF_OK;
    float *c = calloc((size_t)dim_in * dim_in, sizeof *c);
    float *b = calloc((size_t)dim_in * d, sizeof *b);
    float *xb = malloc((size_t)BLOCK * dim_in * sizeof *xb);
    float *fb = malloc((size_t)BLOCK * d * sizeof *fb);
    double *xm = calloc(dim_in, sizeof *xm), *fm = calloc(d, sizeof *fm);
    out->w = malloc((size_t)d * dim_in * sizeof *out->w);
    out->x_mean = malloc((size_t)dim_in * sizeof *out->x_mean);
    out->f_mean = malloc((size_t)d * sizeof *out->f_mean);
    if (!c || !b || !xb || !fb || !xm || !fm || !out->w || !out->x_mean || !out->f_mean) {
        status = aff__fail(err, AFF_ENOMEM, "content map: out of memory");
        goto out;
    }
    for (size_t r = 0; r < n; r++) {
        for (uint32_t i = 0; i < dim_in; i++)
            xm[i] += x[r * dim_in + i];
        for (uint32_t j = 0; j < d; j++)
            fm[j] += f[r * d + j];
    }
    for (uint32_t i = 0; i < dim_in; i++)
        out->x_mean[i] = (float)(xm[i] / (double)n);
    for (uint32_t j = 0; j < d; j++)
        out->f_mean[j] = (float)(fm[j] / (double)n);
    /* Column-major views: a centred block of rows is X' (dim_in x nb) and F' (d x nb);
     * C += X' X'^T (upper triangle), B (dim_in x d) += X' F'^T. */
    const int di = (int)dim_in, dd = (int)d;
    const float one = 1.0f;
    for (size_t r0 = 0; r0 < n; r0 += BLOCK) {
        const int nb = (int)(n - r0 < BLOCK ? n - r0 : BLOCK);
        for (int r = 0; r < nb; r++) {
            for (uint32_t i = 0; i < dim_in; i++)
                xb[(size_t)r * dim_in + i] = x[(r0 + r) * dim_in + i] - out->x_mean[i];
            for (uint32_t j = 0; j < d; j++)
                fb[(size_t)r * d + j] = f[(r0 + r) * d + j] - out->f_mean[j];
        }
        ssyrk_("U", "N", &di, &nb, &one, xb, &di, &one, c, &di);
        sgemm_("N", "T", &di, &dd, &nb, &one, xb, &di, fb, &dd, &one, b, &di);
    }
    double trace = 0;
    for (uint32_t i = 0; i < dim_in; i++)
        trace += c[(size_t)i * dim_in + i];
    const float mu = (float)(ALS_MAP_RIDGE * trace / dim_in);
    if (!(mu > 0)) {
        status = aff__fail(err, AFF_EINTERNAL,
                           "content map: every item has the same content vector");
        goto out;
    }
    for (uint32_t i = 0; i < dim_in; i++)
        c[(size_t)i * dim_in + i] += mu;
    int info = 0;
    spotrf_("U", &di, c, &di, &info);
    if (info == 0) spotrs_("U", &di, &dd, c, &di, b, &di, &info);
    if (info != 0) {
        status = aff__fail(err, AFF_EINTERNAL, "content map: the ridge system is singular");
        goto out;
    }
    /* b is W^T in column-major (dim_in x d): column j, i.e. b + j * dim_in, is row j of W. */
    memcpy(out->w, b, (size_t)d * dim_in * sizeof *out->w);
out:
    free(c);
    free(b);
    free(xb);
    free(fb);
    free(xm);
    free(fm);
    if (status) als_content_map_free(out);
    return status;
}

void als_content_map_apply(const als_content_map *map, const float *x, float *f_out)
{
    for (uint32_t j = 0; j < map->d; j++) {
        const float *w = map->w + (size_t)j * map->dim_in;
        double s = map->f_mean[j];
        for (uint32_t i = 0; i < map->dim_in; i++)
            s += (double)w[i] * (x[i] - map->x_mean[i]);
        f_out[j] = (float)s;
    }
}

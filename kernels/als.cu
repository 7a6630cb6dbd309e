/*
 * als.cu: the per-epoch work of implicit ALS (src/als.h has the objective) on the device — the
 * Gramian of the fixed side and the batched row solves by conjugate gradient — plus the
 * objective, so a training job moves factors over PCIe only at its start and end.
 *
 * What it computes. A half-epoch solves every row x of one side (users, or items) against the
 * fixed other side Y with Gramian G = YᵀY:
 *
 *   (alpha0 G + lambda_r I + sum_j c_j y_j y_jᵀ) x = sum_j c_j y_j
 *
 * by cg_steps conjugate-gradient steps warm-started from the row's current value, exactly the
 * iteration of src/als.c's cg_solve_row (same residual, same stopping rule rs ≤ 1e-20, same
 * breakdown test pAp ≤ 0). lambda_r (Rendle's lambda (|S_r| + alpha0 N)^nu) and the confidences
 * c_j are computed once on the host by src/als.c and uploaded, so both paths use the very same
 * numbers; only the order of floating-point additions differs. A row with no entries is zero.
 *
 * How. G = YᵀY is one cuBLAS GEMM in fp32 (CUBLAS_COMPUTE_32F: no TF32). The solve kernel runs
 * one block per row, blockDim = d rounded up to a warp (at most 256 threads); x, r, p and Ap
 * live in shared memory, each thread owning columns tid, tid + blockDim, .... The product
 * G·v reads G column-wise (coalesced: G is symmetric). The sum over the row's entries is done
 * 32 entries at a time per warp: lane l takes entry j0 + l and computes its whole dot product
 * y_j·v, the 32 coefficients go to shared memory, then the warp's lanes add c·y_j into the
 * warp's own accumulator column-wise (coalesced); the accumulators of the warps are summed at
 * the end. That costs two warp barriers per 32 entries instead of a shuffle reduction per entry.
 *
 * Memory traffic per CG step of a row: G once (d² × 4 bytes, from L2 for d ≤ 512), each entry's
 * row y_j twice (d × 4 bytes each), the index and confidence arrays once. Limits: d ≤ 512
 * (ALS_MAX_FACTORS; shared memory (4 + warps) × d floats ≤ 24 KiB); rows and columns < 2³²;
 * entries < 2⁶⁴. Not measured on a device yet (no GPU was lent when it was written).
 */
#include <stdlib.h>
#include <string.h>

#include "kernels_common.cuh"

#define ALS_MAX_D       512u
#define ALS_MAX_THREADS 256u

struct kernels_als {
    kernels_device *dev;
    cudaStream_t stream;
    cublasHandle_t cublas;
    uint32_t n_users, n_items, d, cg_steps;
    float alpha0;
    uint64_t nnz;
    /* users x items and its transpose, compressed rows */
    uint64_t *u_ptr, *i_ptr;
    uint32_t *u_col, *i_col;
    float *u_conf, *i_conf;
    float *u_lambda, *i_lambda; /* per row */
    float *u_fac, *i_fac;       /* n_users x d, n_items x d */
    float *gram;                /* d x d */
    float *row_out;             /* max(n_users, n_items): per-row objective terms */
    float *h_row_out;           /* host copy of row_out */
};

static uint32_t als_threads(uint32_t d)
{
    uint32_t t = (d + 31u) / 32u * 32u;
    return t > ALS_MAX_THREADS ? ALS_MAX_THREADS : t;
}

static size_t als_shared_bytes(uint32_t d)
{
    const uint32_t warps = als_threads(d) / 32u;
    return ((size_t)(4u + warps) * d + (size_t)warps * 32u) * sizeof(float);
}

/* acc_w += sum over this warp's entries of coef_j · y_j, where coef_j = c_j (1 - y_j·v) when
 * residual, else c_j (y_j·v). Leaves the block synchronized. */
__device__ __forceinline__ void als_entries(const uint32_t *col, const float *conf, uint64_t beg,
                                            uint64_t end, const float *other, uint32_t d,
                                            const float *v, bool residual, float *acc, float *coef)
{
    const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31u,
                   nwarps = blockDim.x >> 5;
    float *my = acc + (size_t)warp * d;
    float *cf = coef + (size_t)warp * 32u;
    for (uint32_t k = lane; k < d; k += 32u)
        my[k] = 0.0f;
    for (uint64_t j0 = beg + (uint64_t)warp * 32u; j0 < end; j0 += (uint64_t)nwarps * 32u) {
        const uint64_t j = j0 + lane;
        float c = 0.0f;
        if (j < end) {
            const float *y = other + (size_t)col[j] * d;
            float dot = 0.0f;
            for (uint32_t k = 0; k < d; k++)
                dot += y[k] * v[k];
            c = residual ? conf[j] * (1.0f - dot) : conf[j] * dot;
        }
        cf[lane] = c;
        __syncwarp();
        const uint32_t n = end - j0 < 32u ? (uint32_t)(end - j0) : 32u;
        for (uint32_t e = 0; e < n; e++) {
            const float *y = other + (size_t)col[j0 + e] * d;
            const float ce = cf[e];
            for (uint32_t k = lane; k < d; k += 32u)
                my[k] += ce * y[k];
        }
        __syncwarp();
    }
    __syncthreads();
}

/* The accumulators of every warp at column k. */
__device__ __forceinline__ float als_acc_sum(const float *acc, uint32_t d, uint32_t k)
{
    float s = 0.0f;
    for (uint32_t w = 0; w < (blockDim.x >> 5); w++)
        s += acc[(size_t)w * d + k];
    return s;
}

/* (G v)[k] for a symmetric G: column k, read coalesced across threads. */
__device__ __forceinline__ float als_gv(const float *gram, uint32_t d, const float *v, uint32_t k)
{
    float s = 0.0f;
    for (uint32_t c = 0; c < d; c++)
        s += gram[(size_t)c * d + k] * v[c];
    return s;
}

__global__ void als_cg_kernel(const uint64_t *row_ptr, const uint32_t *col, const float *conf,
                              const float *lambda, const float *other, const float *gram,
                              float *factors, uint32_t d, float alpha0, uint32_t cg_steps)
{
    KERNELS_DYNAMIC_SHARED(dyn);
    __shared__ float red[32];
    float *x = (float *)dyn, *r = x + d, *p = r + d, *ap = p + d;
    float *acc = ap + d;
    float *coef = acc + (size_t)(blockDim.x >> 5) * d;
    const uint32_t row = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const uint64_t beg = row_ptr[row], end = row_ptr[row + 1];
    float *xg = factors + (size_t)row * d;
    if (beg == end) { /* uniform across the block */
        for (uint32_t k = tid; k < d; k += nt)
            xg[k] = 0.0f;
        return;
    }
    const float lam = lambda[row];
    for (uint32_t k = tid; k < d; k += nt)
        x[k] = xg[k];
    __syncthreads();
    /* r = b - A x */
    als_entries(col, conf, beg, end, other, d, x, true, acc, coef);
    float part = 0.0f;
    for (uint32_t k = tid; k < d; k += nt) {
        float rk = -(alpha0 * als_gv(gram, d, x, k) + lam * x[k]) + als_acc_sum(acc, d, k);
        r[k] = rk;
        p[k] = rk;
        part += rk * rk;
    }
    float rs = kernels__block_sum(part, red); /* its barriers also publish r and p */
    for (uint32_t it = 0; it < cg_steps && rs > 1e-20f; it++) {
        als_entries(col, conf, beg, end, other, d, p, false, acc, coef);
        part = 0.0f;
        for (uint32_t k = tid; k < d; k += nt) {
            float a = alpha0 * als_gv(gram, d, p, k) + lam * p[k] + als_acc_sum(acc, d, k);
            ap[k] = a;
            part += p[k] * a;
        }
        const float pap = kernels__block_sum(part, red);
        if (!(pap > 0.0f)) break;
        const float alpha = rs / pap;
        part = 0.0f;
        for (uint32_t k = tid; k < d; k += nt) {
            x[k] += alpha * p[k];
            r[k] -= alpha * ap[k];
            part += r[k] * r[k];
        }
        const float rs_new = kernels__block_sum(part, red);
        const float beta = rs_new / rs;
        for (uint32_t k = tid; k < d; k += nt)
            p[k] = r[k] + beta * p[k];
        rs = rs_new;
        __syncthreads(); /* p is read whole by the next step */
    }
    for (uint32_t k = tid; k < d; k += nt)
        xg[k] = x[k];
}

/* Per row: sum_j c_j (x·y_j - 1)² + alpha0 xᵀG x + lambda_r |x|² (with_data), or only
 * lambda_r |x|² (the other side's regularisation). */
__global__ void als_objective_kernel(const uint64_t *row_ptr, const uint32_t *col,
                                     const float *conf, const float *lambda, const float *other,
                                     const float *gram, const float *factors, uint32_t d,
                                     float alpha0, int with_data, float *out)
{
    KERNELS_DYNAMIC_SHARED(dyn);
    __shared__ float red[32];
    float *x = (float *)dyn;
    const uint32_t row = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    for (uint32_t k = tid; k < d; k += nt)
        x[k] = factors[(size_t)row * d + k];
    __syncthreads();
    const float lam = lambda[row];
    float part = 0.0f;
    for (uint32_t k = tid; k < d; k += nt)
        part += lam * x[k] * x[k] + (with_data ? alpha0 * x[k] * als_gv(gram, d, x, k) : 0.0f);
    if (with_data) {
        const uint64_t end = row_ptr[row + 1];
        for (uint64_t j = row_ptr[row] + tid; j < end; j += nt) {
            const float *y = other + (size_t)col[j] * d;
            float dot = 0.0f;
            for (uint32_t k = 0; k < d; k++)
                dot += y[k] * x[k];
            part += conf[j] * (dot - 1.0f) * (dot - 1.0f);
        }
    }
    const float s = kernels__block_sum(part, red);
    if (tid == 0) out[row] = s;
}

/* ---- host side ------------------------------------------------------------------------------ */

template <typename T> static int als_upload(T **dst, const T *src, size_t n, cudaStream_t s,
                                            kernels_err *err)
{
    int rc = 0;
    const size_t bytes = (n ? n : 1) * sizeof(T);
    cudaError_t e = cudaMalloc((void **)dst, bytes);
    if (e != cudaSuccess) {
        *dst = NULL;
        rc = kernels__cuda_fail(err, e, "cudaMalloc", __FILE__, __LINE__);
        goto out;
    }
    if (src && n) KCUDA(err, cudaMemcpyAsync(*dst, src, n * sizeof(T), cudaMemcpyHostToDevice, s));
out:
    return rc;
}

void kernels_als_destroy(kernels_als *a)
{
    if (!a) return;
    if (a->stream) kernels__drain(a->stream);
    void *bufs[] = {a->u_ptr,    a->i_ptr, a->u_col, a->i_col, a->u_conf, a->i_conf, a->u_lambda,
                    a->i_lambda, a->u_fac, a->i_fac, a->gram,  a->row_out};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) (void)cudaFree(bufs[i]);
    if (a->cublas) (void)cublasDestroy(a->cublas);
    if (a->stream) (void)cudaStreamDestroy(a->stream);
    free(a->h_row_out);
    free(a);
}

int kernels_als_create(kernels_als **out, kernels_device *dev, const kernels_als_problem *p,
                       kernels_err *err)
{
    int rc = 0;
    kernels_als *a = NULL;
    *out = NULL;
    if (!dev || !p || p->d < 1 || p->d > ALS_MAX_D || p->n_users == 0 || p->n_items == 0)
        return kernels__fail(err, AFF_EINVAL, "kernels_als_create: d must be 1..%u and both "
                                              "sides non-empty", ALS_MAX_D);
    a = (kernels_als *)calloc(1, sizeof *a);
    if (!a) return kernels__fail(err, AFF_ENOMEM, "kernels_als_create: out of host memory");
    a->dev = dev;
    a->n_users = p->n_users;
    a->n_items = p->n_items;
    a->d = p->d;
    a->cg_steps = p->cg_steps;
    a->alpha0 = p->alpha0;
    a->nnz = p->user_ptr[p->n_users];
    {
        const size_t rows = p->n_users > p->n_items ? p->n_users : p->n_items;
        a->h_row_out = (float *)malloc(rows * sizeof(float));
        if (!a->h_row_out) {
            rc = kernels__fail(err, AFF_ENOMEM, "kernels_als_create: out of host memory");
            goto out;
        }
        KCUDA(err, cudaSetDevice(dev->ordinal));
        KCUDA(err, cudaStreamCreateWithFlags(&a->stream, cudaStreamNonBlocking));
        KCUBLAS(err, cublasCreate(&a->cublas));
        KCUBLAS(err, cublasSetStream(a->cublas, a->stream));
        const size_t d = p->d;
        if ((rc = als_upload(&a->u_ptr, p->user_ptr, (size_t)p->n_users + 1, a->stream, err)) ||
            (rc = als_upload(&a->i_ptr, p->item_ptr, (size_t)p->n_items + 1, a->stream, err)) ||
            (rc = als_upload(&a->u_col, p->user_items, a->nnz, a->stream, err)) ||
            (rc = als_upload(&a->i_col, p->item_users, a->nnz, a->stream, err)) ||
            (rc = als_upload(&a->u_conf, p->user_conf, a->nnz, a->stream, err)) ||
            (rc = als_upload(&a->i_conf, p->item_conf, a->nnz, a->stream, err)) ||
            (rc = als_upload(&a->u_lambda, p->user_lambda, p->n_users, a->stream, err)) ||
            (rc = als_upload(&a->i_lambda, p->item_lambda, p->n_items, a->stream, err)) ||
            (rc = als_upload(&a->u_fac, p->user_factors, p->n_users * d, a->stream, err)) ||
            (rc = als_upload(&a->i_fac, p->item_factors, p->n_items * d, a->stream, err)) ||
            (rc = als_upload(&a->gram, (const float *)NULL, d * d, a->stream, err)) ||
            (rc = als_upload(&a->row_out, (const float *)NULL, rows, a->stream, err)))
            goto out;
        KCUDA(err, cudaStreamSynchronize(a->stream));
    }
    *out = a;
    a = NULL;
out:
    kernels_als_destroy(a);
    return rc;
}

/* gram = fᵀ f for f (n rows of d floats, row-major): column-major f is d x n, so gram = f fᵀ. */
static int als_gramian(kernels_als *a, const float *f, uint32_t n, kernels_err *err)
{
    int rc = 0;
    const float one = 1.0f, zero = 0.0f;
    const int d = (int)a->d;
    KCUBLAS(err, cublasGemmEx(a->cublas, CUBLAS_OP_N, CUBLAS_OP_T, d, d, (int)n, &one, f,
                              CUDA_R_32F, d, f, CUDA_R_32F, d, &zero, a->gram, CUDA_R_32F, d,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
out:
    return rc;
}

int kernels_als_half_epoch(kernels_als *a, bool users, kernels_err *err)
{
    int rc = 0;
    const uint32_t rows = users ? a->n_users : a->n_items;
    const uint32_t other_n = users ? a->n_items : a->n_users;
    float *solve = users ? a->u_fac : a->i_fac;
    const float *other = users ? a->i_fac : a->u_fac;
    KCUDA(err, cudaSetDevice(a->dev->ordinal));
    /* Gram matrices beyond 2³¹ rows would need chunking; rows are < 2³² and n ≤ INT_MAX here
     * because the engine's row space is uint32 and cuBLAS takes int: split if ever larger. */
    if (other_n > 0x7FFFFFFFu)
        return kernels__fail(err, AFF_EINVAL, "kernels_als: %u rows exceed cuBLAS's int", other_n);
    if ((rc = als_gramian(a, other, other_n, err))) goto out;
    KERNELS_LAUNCH(als_cg_kernel, rows, als_threads(a->d), als_shared_bytes(a->d), a->stream)
    (users ? a->u_ptr : a->i_ptr, users ? a->u_col : a->i_col, users ? a->u_conf : a->i_conf,
     users ? a->u_lambda : a->i_lambda, other, a->gram, solve, a->d, a->alpha0, a->cg_steps);
    KLAUNCH(err);
    KCUDA(err, cudaStreamSynchronize(a->stream));
out:
    if (rc) kernels__drain(a->stream);
    return rc;
}

/* Copies n per-row terms down and adds them up in double. */
static int als_sum_rows(kernels_als *a, uint32_t n, double *sum, kernels_err *err)
{
    int rc = 0;
    KCUDA(err, cudaMemcpyAsync(a->h_row_out, a->row_out, (size_t)n * sizeof(float),
                               cudaMemcpyDeviceToHost, a->stream));
    KCUDA(err, cudaStreamSynchronize(a->stream));
    for (uint32_t i = 0; i < n; i++)
        *sum += a->h_row_out[i];
out:
    return rc;
}

int kernels_als_objective(kernels_als *a, double *sum, kernels_err *err)
{
    int rc = 0;
    *sum = 0.0;
    KCUDA(err, cudaSetDevice(a->dev->ordinal));
    if ((rc = als_gramian(a, a->i_fac, a->n_items, err))) goto out;
    KERNELS_LAUNCH(als_objective_kernel, a->n_users, als_threads(a->d), a->d * sizeof(float),
                   a->stream)
    (a->u_ptr, a->u_col, a->u_conf, a->u_lambda, a->i_fac, a->gram, a->u_fac, a->d, a->alpha0, 1,
     a->row_out);
    KLAUNCH(err);
    if ((rc = als_sum_rows(a, a->n_users, sum, err))) goto out;
    KERNELS_LAUNCH(als_objective_kernel, a->n_items, als_threads(a->d), a->d * sizeof(float),
                   a->stream)
    (a->i_ptr, a->i_col, a->i_conf, a->i_lambda, a->u_fac, a->gram, a->i_fac, a->d, a->alpha0, 0,
     a->row_out);
    KLAUNCH(err);
    if ((rc = als_sum_rows(a, a->n_items, sum, err))) goto out;
out:
    if (rc) kernels__drain(a->stream);
    return rc;
}

int kernels_als_read(kernels_als *a, float *user_factors, float *item_factors, kernels_err *err)
{
    int rc = 0;
    KCUDA(err, cudaSetDevice(a->dev->ordinal));
    KCUDA(err, cudaMemcpyAsync(user_factors, a->u_fac, (size_t)a->n_users * a->d * sizeof(float),
                               cudaMemcpyDeviceToHost, a->stream));
    KCUDA(err, cudaMemcpyAsync(item_factors, a->i_fac, (size_t)a->n_items * a->d * sizeof(float),
                               cudaMemcpyDeviceToHost, a->stream));
    KCUDA(err, cudaStreamSynchronize(a->stream));
out:
    if (rc) kernels__drain(a->stream);
    return rc;
}

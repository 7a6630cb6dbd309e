/*
 * bench_timers.cu: the two ceilings the kernel benchmark compares against, measured with CUDA
 * events on the same card in the same run.
 *
 * Copy bandwidth: a device-to-device cudaMemcpy of `bytes`, counted as read plus write
 * (2 × bytes per copy) — the rate at which a kernel can stream the catalog once. GEMM rate:
 * cublasGemmEx fp16 inputs, fp32 output and accumulation, m×n×k, 2·m·n·k flops. Both report the
 * median of `iters` timed runs after two warm-ups. Limits: needs the buffers' memory free.
 */
#include <stdlib.h>

#include "kernels_common.cuh"

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

int kernels_bench_copy_bandwidth(kernels_device *d, uint64_t bytes, int iters, double *gbps,
                                 kernels_err *err)
{
    int rc = 0;
    void *src = NULL, *dst = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    float *ms = NULL;
    *gbps = 0.0;
    if (iters < 1) iters = 1;
    ms = (float *)calloc((size_t)iters, sizeof *ms);
    if (!ms) return kernels__fail(err, AFF_ENOMEM, "out of host memory");
    KCUDA(err, cudaSetDevice(d->ordinal));
    KCUDA(err, cudaMalloc(&src, bytes));
    KCUDA(err, cudaMalloc(&dst, bytes));
    KCUDA(err, cudaMemset(src, 1, bytes));
    KCUDA(err, cudaEventCreate(&e0));
    KCUDA(err, cudaEventCreate(&e1));
    for (int i = -2; i < iters; i++) {
        KCUDA(err, cudaEventRecord(e0, 0));
        KCUDA(err, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
        KCUDA(err, cudaEventRecord(e1, 0));
        KCUDA(err, cudaEventSynchronize(e1));
        if (i >= 0) KCUDA(err, cudaEventElapsedTime(&ms[i], e0, e1));
    }
    qsort(ms, (size_t)iters, sizeof *ms, cmp_float);
    *gbps = 2.0 * (double)bytes / ((double)ms[iters / 2] * 1e-3) / 1e9;
out:
    if (e0) (void)cudaEventDestroy(e0);
    if (e1) (void)cudaEventDestroy(e1);
    if (src) (void)cudaFree(src);
    if (dst) (void)cudaFree(dst);
    free(ms);
    return rc;
}

int kernels_bench_gemm_rate(kernels_device *d, int m, int n, int k, int iters, double *tflops,
                            kernels_err *err)
{
    int rc = 0;
    __half *a = NULL, *b = NULL;
    float *c = NULL;
    cublasHandle_t h = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    float *ms = NULL;
    const float alpha = 1.0f, beta = 0.0f;
    *tflops = 0.0;
    if (iters < 1) iters = 1;
    ms = (float *)calloc((size_t)iters, sizeof *ms);
    if (!ms) return kernels__fail(err, AFF_ENOMEM, "out of host memory");
    KCUDA(err, cudaSetDevice(d->ordinal));
    KCUDA(err, cudaMalloc((void **)&a, (size_t)m * k * sizeof(__half)));
    KCUDA(err, cudaMalloc((void **)&b, (size_t)k * n * sizeof(__half)));
    KCUDA(err, cudaMalloc((void **)&c, (size_t)m * n * sizeof(float)));
    KCUDA(err, cudaMemset(a, 0x3C, (size_t)m * k * sizeof(__half))); /* 1.06, not zeros */
    KCUDA(err, cudaMemset(b, 0x3C, (size_t)k * n * sizeof(__half)));
    KCUDA(err, cudaEventCreate(&e0));
    KCUDA(err, cudaEventCreate(&e1));
    KCUBLAS(err, cublasCreate(&h));
    for (int i = -2; i < iters; i++) {
        KCUDA(err, cudaEventRecord(e0, 0));
        KCUBLAS(err, cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, a, CUDA_R_16F, k, b,
                                  CUDA_R_16F, k, &beta, c, CUDA_R_32F, m, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
        KCUDA(err, cudaEventRecord(e1, 0));
        KCUDA(err, cudaEventSynchronize(e1));
        if (i >= 0) KCUDA(err, cudaEventElapsedTime(&ms[i], e0, e1));
    }
    qsort(ms, (size_t)iters, sizeof *ms, cmp_float);
    *tflops = 2.0 * m * (double)n * k / ((double)ms[iters / 2] * 1e-3) / 1e12;
out:
    if (h) (void)cublasDestroy(h);
    if (e0) (void)cudaEventDestroy(e0);
    if (e1) (void)cudaEventDestroy(e1);
    if (a) (void)cudaFree(a);
    if (b) (void)cudaFree(b);
    if (c) (void)cudaFree(c);
    free(ms);
    return rc;
}

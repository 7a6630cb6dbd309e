/*
 * device.cu: the device and workspace objects and the growable buffers — no kernels here.
 *
 * A kernels_device selects one CUDA device; a kernels_workspace owns one stream, one cuBLAS
 * handle bound to it, two timing events, and the device scratch and pinned host buffers of
 * search and score. Buffers only grow (to the largest batch, dim and k seen), so a steady
 * stream of batches allocates nothing. Every call is checked; nothing aborts.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels_common.cuh"

int kernels__fail(kernels_err *err, int code, const char *fmt, ...)
{
    if (err) {
        err->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

int kernels__cuda_fail(kernels_err *err, cudaError_t e, const char *call, const char *file,
                       int line)
{
    const bool sticky = kernels__sticky(e);
    (void)cudaGetLastError(); /* clears a non-sticky error; a sticky one stays regardless */
    int rc = kernels__fail(err, e == cudaErrorMemoryAllocation ? AFF_ENOMEM : AFF_EDEVICE,
                           "%s failed: %s%s (%s:%d)", call, cudaGetErrorString(e),
                           sticky ? " [device fault: the CUDA context is lost]" : "", file, line);
    if (err) err->context_lost = sticky;
    return rc;
}

int kernels__cublas_fail(kernels_err *err, cublasStatus_t s, const char *call, const char *file,
                         int line)
{
    const cudaError_t behind = cudaPeekAtLastError();
    const bool sticky = kernels__sticky(behind);
    int rc = kernels__fail(err, s == CUBLAS_STATUS_ALLOC_FAILED ? AFF_ENOMEM : AFF_EDEVICE,
                           "%s failed: %s%s%s (%s:%d)", call, cublasGetStatusString(s),
                           sticky ? "; device fault: " : "",
                           sticky ? cudaGetErrorString(behind) : "", file, line);
    if (err) err->context_lost = sticky;
    return rc;
}

void kernels__drain(cudaStream_t s)
{
    if (s) (void)cudaStreamSynchronize(s);
    (void)cudaGetLastError();
}

/* A failed allocation: out of memory, or the sticky error of a lost context. */
static int alloc_fail(kernels_err *err, cudaError_t e, size_t bytes, const char *what)
{
    (void)cudaGetLastError();
    int rc = kernels__fail(err, e == cudaErrorMemoryAllocation ? AFF_ENOMEM : AFF_EDEVICE,
                           "%s of %zu bytes: %s", what, bytes, cudaGetErrorString(e));
    if (err) err->context_lost = kernels__sticky(e);
    return rc;
}

int kernels__buf_reserve(kbuf *b, size_t bytes, kernels_err *err)
{
    int rc = 0;
    void *p = NULL;
    if (bytes <= b->bytes) return 0;
    bytes = bytes + bytes / 4; /* headroom so slowly growing batches settle */
    if (b->p) {
        cudaError_t e = cudaFree(b->p);
        b->p = NULL;
        b->bytes = 0;
        KCUDA(err, e);
    }
    {
        cudaError_t e = cudaMalloc(&p, bytes);
        if (e != cudaSuccess) return alloc_fail(err, e, bytes, "device scratch");
    }
    b->p = p;
    b->bytes = bytes;
out:
    return rc;
}

void kernels__buf_free(kbuf *b)
{
    if (b->p) (void)cudaFree(b->p);
    b->p = NULL;
    b->bytes = 0;
}

int kernels__hostbuf_reserve(khostbuf *b, size_t bytes, kernels_err *err)
{
    void *p = NULL;
    if (bytes <= b->bytes) return 0;
    bytes = bytes + bytes / 4;
    if (b->p) (void)cudaFreeHost(b->p);
    b->p = NULL;
    b->bytes = 0;
    cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocDefault);
    if (e != cudaSuccess) return alloc_fail(err, e, bytes, "pinned host buffer");
    b->p = p;
    b->bytes = bytes;
    return 0;
}

void kernels__hostbuf_free(khostbuf *b)
{
    if (b->p) (void)cudaFreeHost(b->p);
    b->p = NULL;
    b->bytes = 0;
}

int kernels_device_count(int *count, kernels_err *err)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    *count = 0;
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return kernels__fail(err, AFF_EDEVICE, "no usable CUDA device: %s", cudaGetErrorString(e));
    }
    *count = n;
    return 0;
}

int kernels_device_open(kernels_device **out, int ordinal, kernels_err *err)
{
    int rc = 0, n = 0;
    kernels_device *d = NULL;
    *out = NULL;
    if ((rc = kernels_device_count(&n, err))) return rc;
    if (n <= 0) return kernels__fail(err, AFF_EDEVICE, "no CUDA device present");
    if (ordinal < 0 || ordinal >= n)
        return kernels__fail(err, AFF_EDEVICE, "CUDA device %d requested, %d present", ordinal, n);
    d = (kernels_device *)calloc(1, sizeof *d);
    if (!d) return kernels__fail(err, AFF_ENOMEM, "out of host memory");
    d->ordinal = ordinal;
    KCUDA(err, cudaSetDevice(ordinal));
    KCUDA(err, cudaGetDeviceProperties(&d->prop, ordinal));
    KCUDA(err, cudaFree(0)); /* creates the primary context now, not on the first request */
    d->sm_count = d->prop.multiProcessorCount > 0 ? d->prop.multiProcessorCount : 1;
    *out = d;
    d = NULL;
out:
    free(d);
    return rc;
}

void kernels_device_close(kernels_device *d)
{
    free(d);
}

void kernels_device_describe(kernels_device *d, kernels_device_info *out)
{
    memset(out, 0, sizeof *out);
    if (!d) return;
    snprintf(out->name, sizeof out->name, "%.127s", d->prop.name);
    out->ordinal = d->ordinal;
    out->sm_count = d->sm_count;
    out->cc_major = d->prop.major;
    out->cc_minor = d->prop.minor;
    out->memory_total = d->prop.totalGlobalMem;
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(d->ordinal) == cudaSuccess &&
        cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
        out->memory_free = free_b;
    else
        (void)cudaGetLastError();
}

int kernels_workspace_create(kernels_workspace **out, kernels_device *d, uint32_t max_batch,
                             kernels_err *err)
{
    int rc = 0;
    kernels_workspace *ws = NULL;
    *out = NULL;
    if (!d || max_batch == 0)
        return kernels__fail(err, AFF_EINVAL, "workspace: no device or max_batch 0");
    ws = (kernels_workspace *)calloc(1, sizeof *ws);
    if (!ws) return kernels__fail(err, AFF_ENOMEM, "out of host memory");
    ws->dev = d;
    ws->max_batch = max_batch > 65535u ? 65535u : max_batch;
    KCUDA(err, cudaSetDevice(d->ordinal));
    KCUDA(err, cudaStreamCreateWithFlags(&ws->stream, cudaStreamNonBlocking));
    KCUDA(err, cudaEventCreate(&ws->ev_start));
    KCUDA(err, cudaEventCreate(&ws->ev_stop));
    KCUBLAS(err, cublasCreate(&ws->cublas));
    KCUBLAS(err, cublasSetStream(ws->cublas, ws->stream));
    *out = ws;
    ws = NULL;
out:
    kernels_workspace_destroy(ws);
    return rc;
}

void kernels_workspace_destroy(kernels_workspace *ws)
{
    if (!ws) return;
    (void)cudaSetDevice(ws->dev->ordinal);
    if (ws->stream) (void)cudaStreamSynchronize(ws->stream);
    kbuf *bufs[] = {&ws->qin,     &ws->qdev,     &ws->qnorm,    &ws->meta,       &ws->filters,
                    &ws->arena,   &ws->scores,   &ws->best[0],  &ws->best[1],    &ws->cand[0],
                    &ws->cand[1], &ws->out_keys, &ws->out_rows, &ws->out_scores, &ws->out_counts};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        kernels__buf_free(bufs[i]);
    kernels__hostbuf_free(&ws->h_in);
    kernels__hostbuf_free(&ws->h_out);
    if (ws->cublas) (void)cublasDestroy(ws->cublas);
    if (ws->ev_start) (void)cudaEventDestroy(ws->ev_start);
    if (ws->ev_stop) (void)cudaEventDestroy(ws->ev_stop);
    if (ws->stream) (void)cudaStreamDestroy(ws->stream);
    (void)cudaGetLastError();
    free(ws);
}

uint64_t kernels_workspace_bytes(const kernels_workspace *ws)
{
    if (!ws) return 0;
    const kbuf *bufs[] = {&ws->qin,      &ws->qdev,       &ws->qnorm,     &ws->meta,
                          &ws->filters,  &ws->arena,      &ws->scores,    &ws->best[0],
                          &ws->best[1],  &ws->cand[0],    &ws->cand[1],   &ws->out_keys,
                          &ws->out_rows, &ws->out_scores, &ws->out_counts};
    uint64_t sum = 0;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        sum += bufs[i]->bytes;
    return sum;
}

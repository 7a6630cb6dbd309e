/*
 * gather_dot.cu: re-rank scoring — each query against its own short list of rows.
 *
 * What it computes: scores[j] = score(q_i, x_rows[j]) for j in offsets[i]..offsets[i+1]-1, with
 * the table's metric (q·x, or 2 q·x - |x|² - |q|² for L2 from the stored row norms). The query
 * stays in fp32 (it is not rounded to the storage type as the search GEMM does).
 *
 * How: one block per query holds the query in shared memory (AFF_MAX_DIM floats = 16 KiB);
 * each warp takes one candidate at a time, its lanes read consecutive columns of the row
 * (coalesced) and a shuffle reduction sums them.
 *
 * Memory traffic: each candidate row once (dpad × 2 bytes in fp16), the query once per block,
 * 4 bytes per score out. Limits: dim ≤ AFF_MAX_DIM; rows must be < count (checked on the host).
 */
#include <string.h>

#include "kernels_common.cuh"

template <typename T>
__global__ void gather_dot_kernel(const T *x, uint32_t dpad, const float *norms,
                                  const float *queries, uint32_t dim, const uint32_t *offsets,
                                  const uint32_t *rows, float *out)
{
    __shared__ float q[AFF_MAX_DIM];
    __shared__ float red[32];
    const uint32_t b = blockIdx.x;
    float acc = 0.0f;
    for (uint32_t j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = queries[(size_t)b * dim + j];
        q[j] = v;
        acc += v * v;
    }
    const float qn = kernels__block_sum(acc, red); /* its barriers also publish q[] */
    const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31u, nwarps = blockDim.x >> 5;
    const uint32_t end = offsets[b + 1];
    for (uint32_t j = offsets[b] + warp; j < end; j += nwarps) {
        const uint32_t row = rows[j];
        float dot = 0.0f;
        for (uint32_t d = lane; d < dim; d += 32)
            dot += kernels__load(x, (size_t)row * dpad + d) * q[d];
        for (int o = 16; o > 0; o >>= 1)
            dot += __shfl_xor_sync(0xFFFFFFFFu, dot, o);
        if (lane == 0) out[j] = norms ? 2.0f * dot - norms[row] - qn : dot;
    }
}

int kernels_score(kernels_workspace *ws, const kernels_table *t, const float *queries, uint32_t nq,
                  const uint32_t *offsets, const uint32_t *rows, float *scores, kernels_err *err)
{
    int rc = 0;
    if (!ws || !t || (nq && (!queries || !offsets)))
        return kernels__fail(err, AFF_EINVAL, "kernels_score: missing argument");
    if (nq == 0) return 0;
    if (offsets[0] != 0)
        return kernels__fail(err, AFF_EINVAL, "kernels_score: offsets[0] must be 0");
    for (uint32_t i = 0; i < nq; i++)
        if (offsets[i + 1] < offsets[i])
            return kernels__fail(err, AFF_EINVAL, "kernels_score: offsets decrease at %u", i);
    const uint32_t total = offsets[nq];
    for (uint32_t j = 0; j < total; j++)
        if (rows[j] >= t->count)
            return kernels__fail(err, AFF_EINVAL, "kernels_score: row %u beyond count %u", rows[j],
                                 t->count);
    if (total == 0) return 0;

    const size_t q_b = (size_t)nq * t->dim * 4, off_b = ((size_t)nq + 1) * 4,
                 rows_b = (size_t)total * 4;
    KCUDA(err, cudaSetDevice(ws->dev->ordinal));
    if ((rc = kernels__buf_reserve(&ws->qin, q_b, err)) ||
        (rc = kernels__buf_reserve(&ws->meta, off_b, err)) ||
        (rc = kernels__buf_reserve(&ws->out_rows, rows_b, err)) ||
        (rc = kernels__buf_reserve(&ws->out_scores, rows_b, err)) ||
        (rc = kernels__hostbuf_reserve(&ws->h_in, q_b + off_b + rows_b, err)) ||
        (rc = kernels__hostbuf_reserve(&ws->h_out, rows_b, err)))
        goto out;
    {
        char *h = (char *)ws->h_in.p;
        memcpy(h, queries, q_b);
        memcpy(h + q_b, offsets, off_b);
        memcpy(h + q_b + off_b, rows, rows_b);
        KCUDA(err, cudaMemcpyAsync(ws->qin.p, h, q_b, cudaMemcpyHostToDevice, ws->stream));
        KCUDA(err, cudaMemcpyAsync(ws->meta.p, h + q_b, off_b, cudaMemcpyHostToDevice, ws->stream));
        KCUDA(err, cudaMemcpyAsync(ws->out_rows.p, h + q_b + off_b, rows_b, cudaMemcpyHostToDevice,
                                   ws->stream));
    }
    {
        const float *norms = t->metric == KERNELS_METRIC_L2 ? t->norms : NULL;
        if (t->storage == KERNELS_STORAGE_FP16) {
            KERNELS_LAUNCH(gather_dot_kernel<__half>, nq, 256, 0, ws->stream)
            ((const __half *)t->vectors, t->dpad, norms, (const float *)ws->qin.p, t->dim,
             (const uint32_t *)ws->meta.p, (const uint32_t *)ws->out_rows.p,
             (float *)ws->out_scores.p);
        } else {
            KERNELS_LAUNCH(gather_dot_kernel<float>, nq, 256, 0, ws->stream)
            ((const float *)t->vectors, t->dpad, norms, (const float *)ws->qin.p, t->dim,
             (const uint32_t *)ws->meta.p, (const uint32_t *)ws->out_rows.p,
             (float *)ws->out_scores.p);
        }
        KLAUNCH(err);
    }
    KCUDA(err, cudaMemcpyAsync(ws->h_out.p, ws->out_scores.p, rows_b, cudaMemcpyDeviceToHost,
                               ws->stream));
    KCUDA(err, cudaStreamSynchronize(ws->stream));
    memcpy(scores, ws->h_out.p, rows_b);
out:
    if (rc) kernels__drain(ws->stream);
    return rc;
}

/*
 * backend_noop.c: a backend that stores no vectors and scores nothing. Searches return the
 * first min(k, count) rows with score 0. It exists for one job: measuring the transport and
 * engine ceiling (`affinityd --backend noop`, bench/run), where everything but scoring runs.
 * Never a production choice; the server logs a warning when it is selected.
 */
#include <stdlib.h>
#include <string.h>

#include "backend.h"

typedef struct noop_table {
    backend_table base;
    uint32_t dim;
    uint32_t count;
} noop_table;

static void noop_destroy(backend *b)
{
    free(b);
}

static void noop_describe(backend *b, backend_info *out)
{
    (void)b;
    *out = (backend_info){0};
    strcpy(out->name, "noop");
    strcpy(out->device, "none (benchmark baseline: no scoring)");
}

static int noop_table_create(backend *b, const backend_table_params *p, backend_table **out,
                             aff_err *err)
{
    noop_table *t = calloc(1, sizeof *t);
    if (!t) return aff__fail(err, AFF_ENOMEM, "out of memory");
    t->base.ops = b->ops;
    t->dim = p->dim;
    *out = &t->base;
    return AFF_OK;
}

static void noop_table_destroy(backend_table *t)
{
    free(t);
}

static int noop_table_write(backend_table *bt, const uint32_t *rows, uint32_t n,
                            const float *vectors, const backend_row_attrs *attrs, aff_err *err)
{
    noop_table *t = (noop_table *)bt;
    for (uint32_t i = 0; i < n; i++)
        if (rows[i] == t->count) t->count++;
    return AFF_OK;
}

static int noop_table_move(backend_table *bt, const uint32_t *src, const uint32_t *dst, uint32_t n,
                           uint32_t new_count, aff_err *err)
{
    ((noop_table *)bt)->count = new_count;
    return AFF_OK;
}

static int noop_table_search(backend_table *bt, const backend_search *s, aff_err *err)
{
    const noop_table *t = (const noop_table *)bt;
    size_t off = 0;
    for (uint32_t q = 0; q < s->nq; q++) {
        uint32_t n = s->k[q] < t->count ? s->k[q] : t->count;
        for (uint32_t i = 0; i < n; i++) {
            s->out_rows[off + i] = i;
            s->out_scores[off + i] = 0.0f;
        }
        s->out_counts[q] = n;
        off += s->k[q];
    }
    return AFF_OK;
}

static int noop_table_score(backend_table *bt, const float *queries, uint32_t nq,
                            const uint32_t *offsets, const uint32_t *rows, float *scores,
                            aff_err *err)
{
    memset(scores, 0, offsets[nq] * sizeof *scores);
    return AFF_OK;
}

static int noop_table_read(backend_table *bt, const uint32_t *rows, uint32_t n, float *out,
                           aff_err *err)
{
    memset(out, 0, (size_t)n * ((noop_table *)bt)->dim * sizeof *out);
    return AFF_OK;
}

static uint32_t noop_table_count(const backend_table *bt)
{
    return ((const noop_table *)bt)->count;
}

static uint64_t noop_table_memory(const backend_table *bt)
{
    return sizeof(noop_table);
}

static const backend_ops noop_ops = {
    .destroy = noop_destroy,
    .describe = noop_describe,
    .table_create = noop_table_create,
    .table_destroy = noop_table_destroy,
    .table_write = noop_table_write,
    .table_move = noop_table_move,
    .table_search = noop_table_search,
    .table_score = noop_table_score,
    .table_read = noop_table_read,
    .table_count = noop_table_count,
    .table_memory = noop_table_memory,
};

int backend_noop_create(backend **out, aff_err *err)
{
    backend *b = calloc(1, sizeof *b);
    if (!b) return aff__fail(err, AFF_ENOMEM, "out of memory");
    b->ops = &noop_ops;
    *out = b;
    return AFF_OK;
}

/*
 * Parity: the same catalog and the same queries through the FAISS backend (CPU) and the CUDA
 * backend (fp32 storage, so both compute in fp32) give the same rows, ties aside. Position by
 * position the rows must be equal, or — where they differ — both backends' scores at that
 * position must agree within the fp32 bound and each returned row's score must lie within it
 * too, i.e. the difference is a (near-)tie. Covers inner product and L2, filters and
 * exclusions, k from 1 to AFF_MAX_K. Skips with the runtime's reason without a device.
 */
#include "backend.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_rng.h"

typedef struct side {
    backend *b;
    backend_table *t;
} side;

static void side_open(side *s, bool gpu, uint32_t dim, aff_metric metric)
{
    aff_err err = {0};
    int rc;
    if (gpu) {
        backend_gpu_config cfg = {.device = 0, .fp32 = true, .max_batch = 256};
        rc = backend_gpu_create(&s->b, &cfg, &err);
        if (rc == AFF_EDEVICE) cr_skip_test("%s", err.msg);
    } else {
        backend_faiss_config cfg = {.threads = 2};
        rc = backend_faiss_create(&s->b, &cfg, &err);
    }
    cr_assert_eq(rc, AFF_OK, "%s backend: %s", gpu ? "GPU" : "FAISS", err.msg);
    backend_table_params p = {.dim = dim, .metric = metric};
    cr_assert_eq(s->b->ops->table_create(s->b, &p, &s->t, &err), AFF_OK, "%s", err.msg);
}

static void side_close(side *s)
{
    s->t->ops->table_destroy(s->t);
    s->b->ops->destroy(s->b);
}

static double true_score(const float *q, const float *x, uint32_t dim, aff_metric m, double *bound)
{
    double dot = 0, ad = 0, xx = 0, qq = 0;
    for (uint32_t d = 0; d < dim; d++) {
        dot += (double)q[d] * x[d];
        ad += fabs((double)q[d] * x[d]);
        xx += (double)x[d] * x[d];
        qq += (double)q[d] * q[d];
    }
    *bound = (dim + 4) * ldexp(1.0, -21) * (2 * ad + xx + qq) + 1e-6;
    return m == AFF_METRIC_L2 ? 2 * dot - xx - qq : dot;
}

/* FAISS reports L2 as a distance or a negated one depending on the backend's convention; the
 * interface says "higher is better", so both must return -|q - x|². */
static void compare(const float *q, const float *vec, uint32_t dim, aff_metric metric, uint32_t k,
                    const uint32_t *ra, const float *sa, uint32_t ca, const uint32_t *rb,
                    const float *sb, uint32_t cb, const char *what)
{
    cr_assert_eq(ca, cb, "%s: FAISS %u hits, GPU %u", what, ca, cb);
    for (uint32_t j = 0; j < ca; j++) {
        if (ra[j] == rb[j]) continue;
        double ba, bb;
        double ta = true_score(q, vec + (size_t)ra[j] * dim, dim, metric, &ba);
        double tb = true_score(q, vec + (size_t)rb[j] * dim, dim, metric, &bb);
        double tol = 2 * (ba > bb ? ba : bb);
        cr_assert(fabs(ta - tb) <= tol && fabs(sa[j] - sb[j]) <= tol,
                  "%s: position %u FAISS row %u (%.9g) vs GPU row %u (%.9g) is not a tie", what, j,
                  ra[j], sa[j], rb[j], sb[j]);
    }
}

Test(gpu_parity, same_rows_as_faiss)
{
    seed_test();
    for (int metric = 0; metric < 2; metric++) {
        aff_metric m = metric ? AFF_METRIC_L2 : AFF_METRIC_IP;
        const uint32_t dim = 64, n = 50000, nq = 40;
        side cpu, gpu;
        side_open(&gpu, true, dim, m);
        side_open(&cpu, false, dim, m);
        float *vec = malloc((size_t)n * dim * 4);
        uint32_t *rows = malloc(n * 4);
        backend_row_attrs *attrs = calloc(n, sizeof *attrs);
        for (size_t i = 0; i < (size_t)n * dim; i++)
            vec[i] = rng_unit();
        for (uint32_t i = 0; i < n; i++) {
            rows[i] = i;
            attrs[i].category = rng() % 8 + 1;
            attrs[i].price = (float)(rng() % 100);
            attrs[i].available = rng() % 3 != 0;
        }
        aff_err err = {0};
        cr_assert_eq(cpu.t->ops->table_write(cpu.t, rows, n, vec, attrs, &err), AFF_OK, "%s",
                     err.msg);
        cr_assert_eq(gpu.t->ops->table_write(gpu.t, rows, n, vec, attrs, &err), AFF_OK, "%s",
                     err.msg);

        float *q = malloc((size_t)nq * dim * 4);
        for (size_t i = 0; i < (size_t)nq * dim; i++)
            q[i] = rng_unit();
        uint32_t ks[40], total = 0;
        static backend_filter fs[40];
        static uint64_t cat[40];
        static uint32_t excl[40][16];
        const backend_filter *fp[40];
        for (uint32_t i = 0; i < nq; i++) {
            ks[i] = i % 4 == 0 ? AFF_MAX_K : i % 4 == 1 ? 1 : rng() % 200 + 1;
            total += ks[i];
            backend_filter_init(&fs[i]);
            fp[i] = NULL;
            if (i % 3 == 1) {
                cat[i] = rng() & 0x1FE;
                fs[i].category_bits = &cat[i];
                fs[i].category_words = 1;
                fs[i].available_only = true;
                fs[i].price_max = 60.0f;
                for (uint32_t e = 0; e < 16; e++)
                    excl[i][e] = e * 997;
                fs[i].exclude_rows = excl[i];
                fs[i].n_exclude_rows = 16;
                fp[i] = &fs[i];
            }
        }
        uint32_t *r_cpu = malloc(total * 4), *r_gpu = malloc(total * 4), c_cpu[40], c_gpu[40];
        float *s_cpu = malloc(total * 4), *s_gpu = malloc(total * 4);
        backend_search sc = {.queries = q, .nq = nq, .k = ks, .filters = fp, .out_rows = r_cpu, .out_scores = s_cpu, .out_counts = c_cpu};
        backend_search sg = {.queries = q, .nq = nq, .k = ks, .filters = fp, .out_rows = r_gpu, .out_scores = s_gpu, .out_counts = c_gpu};
        cr_assert_eq(cpu.t->ops->table_search(cpu.t, &sc, &err), AFF_OK, "%s", err.msg);
        cr_assert_eq(gpu.t->ops->table_search(gpu.t, &sg, &err), AFF_OK, "%s", err.msg);
        uint32_t off = 0, differ = 0;
        for (uint32_t i = 0; i < nq; i++) {
            char what[64];
            snprintf(what, sizeof what, "%s query %u (k %u)", metric ? "l2" : "ip", i, ks[i]);
            compare(q + (size_t)i * dim, vec, dim, m, ks[i], r_cpu + off, s_cpu + off, c_cpu[i],
                    r_gpu + off, s_gpu + off, c_gpu[i], what);
            for (uint32_t j = 0; j < c_cpu[i]; j++)
                differ += r_cpu[off + j] != r_gpu[off + j];
            off += ks[i];
        }
        printf("%s: %u of %u positions differ (all ties)\n", metric ? "l2" : "ip", differ, off);
        free(vec);
        free(rows);
        free(attrs);
        free(q);
        free(r_cpu);
        free(r_gpu);
        free(s_cpu);
        free(s_gpu);
        side_close(&cpu);
        side_close(&gpu);
    }
}

/*
 * test_als_gpu.c: iALS training on the device (kernels/als.cu through backend_gpu.c's training
 * device) against the CPU path of src/als.c on the same problem and the same initialisation.
 * Built twice: on the emulated device (test_als_gpu_emul, every CI run) and on a real one
 * (test_als_gpu, label gpu; skips with the runtime's reason without a device).
 *
 * Agreement (stated, then asserted): both paths do the same arithmetic in a different order of
 * fp32 additions (warp-parallel sums, a GEMM Gramian), so after E epochs every factor agrees
 * within FACTOR_TOL · (1 + |factor|) (twice that for the long rows below) and the final loss
 * within LOSS_TOL relative. Rows with no entries are exactly zero on both. A device failure
 * (an injected launch failure, a device fault) makes als_train retrain on the CPU: the result
 * is then bit-identical to the CPU run.
 */
#include "als.h"
#include "backend.h"
#ifdef KERNELS_EMULATE
#include "gpu_emul_control.h"
#endif

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_rng.h"

#define FACTOR_TOL 1e-3
#define LOSS_TOL   1e-4

typedef struct problem {
    uint32_t users, items;
    uint64_t *row_ptr;
    uint32_t *col;
    float *conf;
    als_matrix m;
} problem;

/* Users in `groups` taste groups with `per_user` entries each, mostly in their group; users
 * u % 7 == 3 have no entries and the last item never gets one. */
static void problem_make(problem *p, uint32_t users, uint32_t items, uint32_t per_user,
                         uint32_t groups)
{
    p->users = users;
    p->items = items;
    p->row_ptr = calloc(users + 1, sizeof *p->row_ptr);
    p->col = malloc((size_t)users * per_user * sizeof *p->col);
    p->conf = malloc((size_t)users * per_user * sizeof *p->conf);
    cr_assert(p->row_ptr && p->col && p->conf);
    uint64_t k = 0;
    bool *seen = calloc(items, sizeof *seen);
    for (uint32_t u = 0; u < users; u++) {
        p->row_ptr[u] = k;
        if (u % 7 == 3) continue;
        memset(seen, 0, items * sizeof *seen);
        const uint32_t g = u % groups;
        for (uint32_t e = 0; e < per_user && e < items - 1; e++) {
            uint32_t it, tries = 0;
            do { /* in the group while it has unseen items, else anywhere */
                bool in_group = e + 1 < per_user && tries++ < 8;
                it = in_group ? (rng() % ((items - 1) / groups)) * groups + g : rng() % (items - 1);
            } while (seen[it]);
            seen[it] = true;
            p->col[k] = it;
            p->conf[k] = 1.0f + (float)(rng() % 4) * 0.75f;
            k++;
        }
    }
    p->row_ptr[users] = k;
    free(seen);
    p->m = (als_matrix){.n_rows = users,
                        .n_cols = items,
                        .row_ptr = p->row_ptr,
                        .col = p->col,
                        .conf = p->conf};
}

static void problem_free(problem *p)
{
    free(p->row_ptr);
    free(p->col);
    free(p->conf);
}

/* The GPU backend (skips without a device) and its training device in *dev. */
static backend *open_trainer(als_device *dev)
{
    backend *b = NULL;
    aff_err err = {0};
    backend_gpu_config cfg = {.device = 0, .fallback = {.threads = 1}};
    int rc = backend_gpu_create(&b, &cfg, &err);
    if (rc == AFF_EDEVICE) cr_skip_test("%s", err.msg);
    cr_assert_eq(rc, AFF_OK, "backend_gpu_create: %s", err.msg);
    cr_assert(b->ops->trainer && b->ops->trainer(b, dev), "the GPU backend offers no trainer");
    return b;
}

typedef struct run {
    float *uf, *vf;
    als_report rep;
    int rc;
    aff_err err;
} run;

static void train(const problem *p, const als_params *par, const als_device *dev, run *r)
{
    r->uf = malloc((size_t)p->users * par->factors * sizeof(float));
    r->vf = malloc((size_t)p->items * par->factors * sizeof(float));
    cr_assert(r->uf && r->vf);
    r->err = (aff_err){0};
    r->rc = als_train(&p->m, par, dev, r->uf, r->vf, NULL, NULL, &r->rep, &r->err);
}

static void run_free(run *r)
{
    free(r->uf);
    free(r->vf);
}

static void assert_close(const float *a, const float *b, size_t n, double tol, const char *what)
{
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]) / (1.0 + fabs((double)b[i]));
        if (!(e <= worst)) {
            worst = e;
            at = i;
        }
    }
    printf("%s: largest relative difference %.3g (tolerance %g)\n", what, worst, tol);
    cr_assert(worst <= tol, "%s[%zu]: device %.7g vs CPU %.7g (relative error %.3g > %g)", what,
              at, a[at], b[at], worst, tol);
}

/* Trains p on the device and on the CPU and checks they agree (see the file comment). */
static void check_agreement(const problem *p, const als_params *par, double tol)
{
    als_device dev;
    backend *b = open_trainer(&dev);
    run g, c;
    train(p, par, &dev, &g);
    train(p, par, NULL, &c);
    cr_assert_eq(g.rc, AFF_OK, "device: %s", g.err.msg);
    cr_assert_eq(c.rc, AFF_OK, "CPU: %s", c.err.msg);
    cr_assert(g.rep.on_device, "the device did not train: %s", g.rep.device_error);
    cr_assert_str_empty(g.rep.device_error);
    cr_assert(!c.rep.on_device);
    cr_assert_eq(g.rep.epochs_run, par->epochs);
    const uint32_t d = par->factors;
    assert_close(g.uf, c.uf, (size_t)p->users * d, tol, "user factors");
    assert_close(g.vf, c.vf, (size_t)p->items * d, tol, "item factors");
    cr_assert(fabs(g.rep.loss - c.rep.loss) <= LOSS_TOL * fabs(c.rep.loss),
              "loss: device %.9g vs CPU %.9g", g.rep.loss, c.rep.loss);
    /* Rows with no entries: exactly zero on both paths. */
    for (uint32_t u = 3; u < p->users; u += 7)
        for (uint32_t k = 0; k < d; k++)
            cr_assert(g.uf[(size_t)u * d + k] == 0.0f && c.uf[(size_t)u * d + k] == 0.0f,
                      "user %u without entries has a nonzero factor", u);
    for (uint32_t k = 0; k < d; k++)
        cr_assert(g.vf[(size_t)(p->items - 1) * d + k] == 0.0f,
                  "the item without entries has a nonzero factor");
    /* A model worth the name: the loss is below the all-zero model's (1 per entry on average
     * weighted by confidence, so ≥ 1). */
    cr_assert(g.rep.loss < 1.0, "device loss %.4f does not improve on zero factors", g.rep.loss);
    run_free(&g);
    run_free(&c);
    b->ops->destroy(b);
}

static als_params params(uint32_t d, uint32_t epochs)
{
    als_params par;
    als_params_init(&par);
    par.factors = d;
    par.epochs = epochs;
    par.threads = 2;
    return par;
}

Test(als_gpu, device_training_matches_the_cpu_path)
{
    seed_test();
    problem p;
    problem_make(&p, 60, 41, 9, 4);
    als_params par = params(16, 4);
    par.nu = 0.5f; /* a non-trivial exponent in the regularisation */
    check_agreement(&p, &par, FACTOR_TOL);
    problem_free(&p);
}

Test(als_gpu, smallest_factor_count)
{
    seed_test();
    problem p;
    problem_make(&p, 40, 25, 6, 3);
    als_params par = params(ALS_MIN_FACTORS, 3);
    check_agreement(&p, &par, FACTOR_TOL);
    problem_free(&p);
}

/* d = 512: the most threads per block (256, two columns each) and the most shared memory. */
Test(als_gpu, largest_factor_count, .timeout = 600)
{
    seed_test();
    problem p;
    problem_make(&p, 9, 7, 4, 2);
    als_params par = params(ALS_MAX_FACTORS, 2);
    par.cg_steps = 2;
    check_agreement(&p, &par, FACTOR_TOL);
    problem_free(&p);
}

/* More entries in a row than one warp's 32-entry chunk, and more rows than a warp's worth.
 * More users than factors: with 12 users and d = 24 the item systems were so ill-conditioned
 * that fp32 summation order alone moved some factors by 0.4 % after two 3-step CG epochs
 * (seed 1795967092 in the -O0 sanitizer build). */
Test(als_gpu, long_rows_span_several_chunks)
{
    seed_test();
    problem p;
    problem_make(&p, 48, 90, 70, 2);
    als_params par = params(16, 2);
    /* 70-entry rows add up more fp32 terms in a different order: up to 4.6e-4 measured over
     * 16 seeds under -O0; a chunking bug moves factors by far more than this bound. */
    check_agreement(&p, &par, 2 * FACTOR_TOL);
    problem_free(&p);
}

static bool stop_after_two(void *ctx, uint32_t epoch, uint32_t epochs, double loss)
{
    (void)epochs, (void)loss;
    *(uint32_t *)ctx = epoch;
    return epoch < 2;
}

Test(als_gpu, cancel_stops_the_device_job)
{
    seed_test();
    problem p;
    problem_make(&p, 20, 15, 5, 3);
    als_params par = params(8, 6);
    als_device dev;
    backend *b = open_trainer(&dev);
    float *uf = malloc(20 * 8 * sizeof *uf), *vf = malloc(15 * 8 * sizeof *vf);
    uint32_t seen = 0;
    als_report rep;
    aff_err err = {0};
    cr_assert_eq(als_train(&p.m, &par, &dev, uf, vf, stop_after_two, &seen, &rep, &err),
                 AFF_ECANCELLED);
    cr_assert_eq(seen, 2);
    cr_assert_eq(rep.epochs_run, 2);
    cr_assert(rep.on_device);
    free(uf);
    free(vf);
    b->ops->destroy(b);
    problem_free(&p);
}

Test(als_gpu, exact_solves_stay_on_the_cpu)
{
    seed_test();
    problem p;
    problem_make(&p, 20, 15, 5, 3);
    als_params par = params(8, 2);
    par.cg_steps = 0;
    als_device dev;
    backend *b = open_trainer(&dev);
    run g, c;
    train(&p, &par, &dev, &g);
    train(&p, &par, NULL, &c);
    cr_assert_eq(g.rc, AFF_OK, "%s", g.err.msg);
    cr_assert(!g.rep.on_device);
    cr_assert_str_eq(g.rep.device_error, "exact row solves (cg_steps = 0) run on the CPU only");
    cr_assert_arr_eq(g.uf, c.uf, 20 * 8 * sizeof(float));
    cr_assert_arr_eq(g.vf, c.vf, 15 * 8 * sizeof(float));
    run_free(&g);
    run_free(&c);
    b->ops->destroy(b);
    problem_free(&p);
}

#ifdef KERNELS_EMULATE
/* A failed launch (not a fault) at each of the first launches of a job: training completes on
 * the CPU with the CPU's exact result, and says why. */
Test(als_gpu, a_failed_launch_hands_the_job_to_the_cpu)
{
    seed_test();
    problem p;
    problem_make(&p, 20, 15, 5, 3);
    als_params par = params(8, 2);
    run c;
    train(&p, &par, NULL, &c);
    cr_assert_eq(c.rc, AFF_OK);
    als_device dev;
    backend *b = open_trainer(&dev);
    /* Launches per epoch: user solve, item solve, two objective kernels. */
    for (int at = 0; at < 6; at += 5) {
        emul_inject_launch_failure(at, EMUL_ERR_LAUNCH_OUT_OF_RESOURCES);
        run g;
        train(&p, &par, &dev, &g);
        emul_inject_launch_failure(-1, 0);
        cr_assert_eq(g.rc, AFF_OK, "launch %d: %s", at, g.err.msg);
        cr_assert(!g.rep.on_device, "launch %d failed but the device result was kept", at);
        cr_assert(strstr(g.rep.device_error, "out of resources") ||
                      strstr(g.rep.device_error, "failed"),
                  "launch %d: device_error \"%s\"", at, g.rep.device_error);
        cr_assert_arr_eq(g.uf, c.uf, 20 * 8 * sizeof(float));
        cr_assert_arr_eq(g.vf, c.vf, 15 * 8 * sizeof(float));
        cr_assert_eq(g.rep.epochs_run, 2);
        cr_assert_eq(emul_pending_ops(), 0, "the failed job left %llu operations queued",
                     (unsigned long long)emul_pending_ops());
        run_free(&g);
        /* Not a fault: the device still trains the next job. */
        cr_assert(b->ops->trainer(b, &dev));
    }
    run_free(&c);
    b->ops->destroy(b);
    problem_free(&p);
}

/* A device fault (the context is lost) during training: the job finishes on the CPU, the
 * backend records the fault, and offers no training device afterwards. */
Test(als_gpu, a_device_fault_moves_training_to_the_cpu_for_good)
{
    seed_test();
    problem p;
    problem_make(&p, 20, 15, 5, 3);
    als_params par = params(8, 2);
    als_device dev;
    backend *b = open_trainer(&dev);
    emul_inject_launch_failure(2, EMUL_ERR_ILLEGAL_ADDRESS);
    run g, c;
    train(&p, &par, &dev, &g);
    train(&p, &par, NULL, &c);
    cr_assert_eq(g.rc, AFF_OK, "%s", g.err.msg);
    cr_assert(!g.rep.on_device);
    cr_assert_arr_eq(g.uf, c.uf, 20 * 8 * sizeof(float));
    backend_info info;
    b->ops->describe(b, &info);
    cr_assert_geq(info.device_faults, 1);
    cr_assert(!b->ops->trainer(b, &dev), "a faulted device still offers to train");
    run_free(&g);
    run_free(&c);
    b->ops->destroy(b);
    problem_free(&p);
}
#endif

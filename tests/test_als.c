/*
 * test_als.c: the iALS arithmetic on synthetic data with planted taste groups: learned
 * rankings beat popularity and random by a stated margin, the exact row solve satisfies its
 * normal equations, CG converges to it, the Gramian matches a plain sum, and bad parameters
 * and empty data are refused. Each test prints its seed (AFF_TEST_SEED replays one).
 */
#include <criterion/criterion.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "als.h"
#include "test_rng.h"

/* G groups of I/G items; each user likes one group: most events in it, a few anywhere. */
enum { G = 8, I = 400, U = 1200, PER_USER = 24, NOISE = 3 };

typedef struct planted {
    uint64_t row_ptr[U + 1];
    uint32_t col[U * PER_USER];
    float conf[U * PER_USER];
    int group[U];
} planted;

static int item_group(uint32_t item)
{
    return (int)(item % G);
}

static void plant(planted *p)
{
    uint64_t k = 0;
    for (int u = 0; u < U; u++) {
        p->group[u] = u % G;
        p->row_ptr[u] = k;
        bool seen[I] = {false};
        for (int e = 0; e < PER_USER; e++) {
            uint32_t item;
            do {
                if (e < PER_USER - NOISE)
                    item = (uint32_t)((rng() % (I / G)) * G + (uint32_t)p->group[u]);
                else
                    item = rng() % I;
            } while (seen[item]);
            seen[item] = true;
            p->col[k] = item;
            p->conf[k] = 1.0f + (float)(rng() % 3);
            k++;
        }
    }
    p->row_ptr[U] = k;
}

/* Share of the top 10 (excluding the user's items) that fall in the user's group. */
static double group_precision(const float *scores, const planted *p, int u)
{
    bool mine[I] = {false};
    for (uint64_t k = p->row_ptr[u]; k < p->row_ptr[u + 1]; k++)
        mine[p->col[k]] = true;
    int hits = 0;
    for (int r = 0; r < 10; r++) {
        int best = -1;
        for (int i = 0; i < I; i++)
            if (!mine[i] && (best < 0 || scores[i] > scores[best])) best = i;
        mine[best] = true;
        hits += item_group((uint32_t)best) == p->group[u];
    }
    return hits / 10.0;
}

Test(als, learned_rankings_beat_popularity_and_random)
{
    static planted p;
    unsigned seed = seed_test();
    plant(&p);
    als_params par;
    als_params_init(&par);
    par.factors = 16;
    par.epochs = 8;
    als_matrix m = {.n_rows = U, .n_cols = I, .row_ptr = p.row_ptr, .col = p.col, .conf = p.conf};
    float *uf = malloc(sizeof(float) * U * par.factors),
          *vf = malloc(sizeof(float) * I * par.factors);
    als_report rep;
    aff_err err;
    cr_assert_eq(als_train(&m, &par, NULL, uf, vf, NULL, NULL, &rep, &err), 0, "%s", err.msg);
    cr_assert_eq(rep.epochs_run, 8);
    cr_assert(isfinite(rep.loss) && rep.loss > 0);

    /* Popularity: item counts. */
    float pop[I] = {0};
    for (uint64_t k = 0; k < p.row_ptr[U]; k++)
        pop[p.col[k]] += 1;
    double learned = 0, popular = 0, random = 0;
    float scores[I];
    for (int u = 0; u < U; u++) {
        for (int i = 0; i < I; i++) {
            float s = 0;
            for (uint32_t j = 0; j < par.factors; j++)
                s += uf[(size_t)u * par.factors + j] * vf[(size_t)i * par.factors + j];
            scores[i] = s;
        }
        learned += group_precision(scores, &p, u);
        popular += group_precision(pop, &p, u);
        for (int i = 0; i < I; i++)
            scores[i] = rng_unit();
        random += group_precision(scores, &p, u);
    }
    learned /= U, popular /= U, random /= U;
    /* A group is 1/8 of the catalog: random and popularity land near 0.125. */
    cr_assert(learned >= 0.9, "learned precision %.3f (seed %u)", learned, seed);
    cr_assert(learned >= popular + 0.5 && learned >= random + 0.5,
              "learned %.3f popularity %.3f random %.3f", learned, popular, random);
    free(uf);
    free(vf);
}

Test(als, exact_row_solve_satisfies_its_normal_equations)
{
    enum { D = 12, N_OTHER = 50, N = 9 };
    seed_test();
    float other[N_OTHER * D], gram[D * D], x[D];
    for (int i = 0; i < N_OTHER * D; i++)
        other[i] = rng_unit() * 0.5f;
    als_gramian(other, N_OTHER, D, gram);
    /* The Gramian is F^T F. */
    for (int a = 0; a < D; a++)
        for (int b = 0; b < D; b++) {
            double s = 0;
            for (int r = 0; r < N_OTHER; r++)
                s += (double)other[r * D + a] * other[r * D + b];
            cr_assert_float_eq(gram[a * D + b], s, 1e-4);
        }
    uint32_t idx[N];
    float conf[N];
    for (int j = 0; j < N; j++) {
        idx[j] = (uint32_t)(j * 5 + 1);
        conf[j] = 1.0f + (float)j * 0.25f;
    }
    als_params p;
    als_params_init(&p);
    p.factors = D;
    p.lambda = 0.05f;
    float *scratch = malloc(als_solve_scratch_floats(D) * sizeof(float));
    cr_assert(als_solve_row(other, gram, D, N_OTHER, &p, idx, conf, N, x, scratch));
    /* A x = b with A = alpha0 G + lambda_u I + sum c y y^T, b = sum c y. */
    double lam = p.lambda * (N + p.alpha0 * N_OTHER);
    for (int a = 0; a < D; a++) {
        double ax = lam * x[a], b = 0;
        for (int c = 0; c < D; c++)
            ax += p.alpha0 * gram[a * D + c] * x[c];
        for (int j = 0; j < N; j++) {
            const float *y = other + idx[j] * D;
            double yx = 0;
            for (int c = 0; c < D; c++)
                yx += (double)y[c] * x[c];
            ax += conf[j] * y[a] * yx;
            b += conf[j] * y[a];
        }
        cr_assert_float_eq(ax, b, 1e-3, "row %d: %g vs %g", a, ax, b);
    }
    /* No observations: the zero vector. */
    cr_assert(als_solve_row(other, gram, D, N_OTHER, &p, idx, conf, 0, x, scratch));
    for (int a = 0; a < D; a++)
        cr_assert_eq(x[a], 0.0f);
    free(scratch);
}

Test(als, cg_training_reaches_the_exact_objective)
{
    static planted p;
    seed_test();
    plant(&p);
    als_matrix m = {.n_rows = U, .n_cols = I, .row_ptr = p.row_ptr, .col = p.col, .conf = p.conf};
    float *uf = malloc(sizeof(float) * U * 16), *vf = malloc(sizeof(float) * I * 16);
    als_params par;
    als_params_init(&par);
    par.factors = 16;
    par.epochs = 10;
    als_report exact, cg;
    aff_err err;
    par.cg_steps = 0;
    cr_assert_eq(als_train(&m, &par, NULL, uf, vf, NULL, NULL, &exact, &err), 0);
    par.cg_steps = 3;
    cr_assert_eq(als_train(&m, &par, NULL, uf, vf, NULL, NULL, &cg, &err), 0);
    cr_assert(fabs(cg.loss - exact.loss) <= 0.01 * exact.loss, "exact %.5f cg %.5f", exact.loss,
              cg.loss);
    free(uf);
    free(vf);
}

static bool stop_after_two(void *ctx, uint32_t epoch, uint32_t epochs, double loss)
{
    (void)loss, (void)epochs;
    *(uint32_t *)ctx = epoch;
    return epoch < 2;
}

Test(als, progress_reports_each_epoch_and_can_cancel)
{
    static planted p;
    seed_test();
    plant(&p);
    als_matrix m = {.n_rows = U, .n_cols = I, .row_ptr = p.row_ptr, .col = p.col, .conf = p.conf};
    float *uf = malloc(sizeof(float) * U * 8), *vf = malloc(sizeof(float) * I * 8);
    als_params par;
    als_params_init(&par);
    par.factors = 8;
    uint32_t seen = 0;
    als_report rep;
    aff_err err;
    cr_assert_eq(als_train(&m, &par, NULL, uf, vf, stop_after_two, &seen, &rep, &err), AFF_ECANCELLED);
    cr_assert_eq(seen, 2);
    cr_assert_eq(rep.epochs_run, 2);
    free(uf);
    free(vf);
}

Test(als, bad_parameters_and_empty_data_are_refused)
{
    als_params p;
    aff_err err;
    als_params_init(&p);
    cr_assert_eq(als_params_check(&p, &err), 0);
    p.factors = 7;
    cr_assert_eq(als_params_check(&p, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "factors"), "%s", err.msg);
    p.factors = 513;
    cr_assert_eq(als_params_check(&p, &err), AFF_EINVAL);
    als_params_init(&p);
    p.lambda = NAN;
    cr_assert_eq(als_params_check(&p, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "lambda"), "%s", err.msg);
    als_params_init(&p);
    p.alpha0 = -1;
    cr_assert_eq(als_params_check(&p, &err), AFF_EINVAL);
    als_params_init(&p);
    p.epochs = 0;
    cr_assert_eq(als_params_check(&p, &err), AFF_EINVAL);
    als_params_init(&p);
    p.lambda = 0;
    p.alpha0 = 0;
    cr_assert_eq(als_params_check(&p, &err), AFF_EINVAL);

    als_params_init(&p);
    uint64_t rp[3] = {0, 0, 0};
    als_matrix m = {.n_rows = 2, .n_cols = 4, .row_ptr = rp, .col = NULL, .conf = NULL};
    float uf[2 * 64], vf[4 * 64];
    cr_assert_eq(als_train(&m, &p, NULL, uf, vf, NULL, NULL, NULL, &err), AFF_EPRECONDITION);
}

Test(als, confidence_grows_with_weight_and_fades_with_age)
{
    cr_assert_eq(als_confidence(0), 0.0f);
    cr_assert_eq(als_confidence(-1), 0.0f);
    cr_assert_float_eq(als_confidence(0.5), 0.5f, 1e-6);
    cr_assert_float_eq(als_confidence(1), 1.0f, 1e-6);
    cr_assert(als_confidence(8) > als_confidence(4) && als_confidence(4) > als_confidence(1));
    cr_assert_float_eq(als_confidence(8), 1.0f + logf(8.0f), 1e-5);
}

/* The content map against a ridge regression written here in double precision (normal
 * equations, Gauss-Jordan): W within 1e-4 relative, f(x_mean) = f_mean, and a held-out item
 * generated by the same linear rule lands nearer its true factor than the mean does. */
Test(als, content_map_is_the_ridge_regression)
{
    seed_test();
    enum { N = 150, DI = 10, DF = 6 };
    static float x[N * DI], f[N * DF], wt[DF * DI];
    for (int k = 0; k < DF * DI; k++)
        wt[k] = rng_unit();
    for (int r = 0; r < N; r++) {
        for (int i = 0; i < DI; i++)
            x[r * DI + i] = rng_unit() + 0.5f;
        for (int j = 0; j < DF; j++) {
            double s = 0.3 * j;
            for (int i = 0; i < DI; i++)
                s += wt[j * DI + i] * x[r * DI + i];
            f[r * DF + j] = (float)(s + 0.01 * rng_unit());
        }
    }
    als_content_map map;
    aff_err err = {0};
    cr_assert_eq(als_content_map_fit(x, f, N, DI, DF, &map, &err), 0, "%s", err.msg);
    /* Reference. */
    double xm[DI] = {0}, fm[DF] = {0}, a[DI][DI + DF] = {{0}};
    for (int r = 0; r < N; r++) {
        for (int i = 0; i < DI; i++)
            xm[i] += x[r * DI + i] / (double)N;
        for (int j = 0; j < DF; j++)
            fm[j] += f[r * DF + j] / (double)N;
    }
    for (int r = 0; r < N; r++)
        for (int i = 0; i < DI; i++) {
            double xi = x[r * DI + i] - xm[i];
            for (int k = 0; k < DI; k++)
                a[i][k] += xi * (x[r * DI + k] - xm[k]);
            for (int j = 0; j < DF; j++)
                a[i][DI + j] += xi * (f[r * DF + j] - fm[j]);
        }
    double tr = 0;
    for (int i = 0; i < DI; i++)
        tr += a[i][i];
    for (int i = 0; i < DI; i++)
        a[i][i] += ALS_MAP_RIDGE * tr / DI;
    for (int p = 0; p < DI; p++) {
        double piv = a[p][p];
        for (int k = 0; k < DI + DF; k++)
            a[p][k] /= piv;
        for (int r = 0; r < DI; r++) {
            if (r == p) continue;
            double m = a[r][p];
            for (int k = 0; k < DI + DF; k++)
                a[r][k] -= m * a[p][k];
        }
    }
    for (int j = 0; j < DF; j++)
        for (int i = 0; i < DI; i++) {
            double want = a[i][DI + j], got = map.w[j * DI + i];
            cr_assert(fabs(got - want) <= 1e-4 * (1 + fabs(want)), "W[%d][%d] = %.7g, want %.7g",
                      j, i, got, want);
        }
    float xmf[DI], out[DF];
    for (int i = 0; i < DI; i++)
        xmf[i] = map.x_mean[i];
    als_content_map_apply(&map, xmf, out);
    for (int j = 0; j < DF; j++)
        cr_assert(fabs(out[j] - fm[j]) <= 1e-5 * (1 + fabs(fm[j])));
    /* A held-out item. */
    float xn[DI], fn[DF];
    for (int i = 0; i < DI; i++)
        xn[i] = rng_unit() + 0.5f;
    double err_map = 0, err_mean = 0;
    als_content_map_apply(&map, xn, fn);
    for (int j = 0; j < DF; j++) {
        double t = 0.3 * j;
        for (int i = 0; i < DI; i++)
            t += wt[j * DI + i] * xn[i];
        err_map += (fn[j] - t) * (fn[j] - t);
        err_mean += (fm[j] - t) * (fm[j] - t);
    }
    cr_assert(err_map < 0.5 * err_mean, "mapped error %.4f vs mean error %.4f", err_map, err_mean);
    als_content_map_free(&map);
}

Test(als, content_map_refuses_too_few_or_identical_items)
{
    float x[3 * 4] = {1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4}, f[3 * 2] = {1, 0, 0, 1, 1, 1};
    als_content_map map;
    aff_err err = {0};
    cr_assert_eq(als_content_map_fit(x, f, 1, 4, 2, &map, &err), AFF_EPRECONDITION);
    cr_assert_null(map.w);
    cr_assert_eq(als_content_map_fit(x, f, 3, 4, 2, &map, &err), AFF_EINTERNAL);
    cr_assert(strstr(err.msg, "same content vector"), "%s", err.msg);
    cr_assert_null(map.w);
}

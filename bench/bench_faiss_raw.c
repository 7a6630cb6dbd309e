/*
 * bench_faiss_raw.c: the CPU ceiling for Affinity's serving path: raw FAISS (exact
 * inner-product flat index, through the FAISS C API) on the same catalog and queries the load
 * generator sends, with no server, no gRPC and no batching logic.
 *
 *   bench_faiss_raw --catalog catalog.npy --queries queries.npy [--k 10]
 *                   [--batches 1,16,64,256,1024] [--seconds 3] [--json out.json]
 *
 * For each batch size B it calls faiss_Index_search on B queries at a time, cycling through
 * the query set, for about --seconds, and reports queries per second. FAISS runs in its best
 * configuration here: OpenBLAS threads on every core (its default) and BLAS from
 * --blas-threshold queries up (default 2; FAISS's own default of 20 is several times slower
 * for 2..19 queries on this hardware). Run it with OMP_WAIT_POLICY=PASSIVE like the server.
 */
#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/utils/distances_c.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vecfile.h"

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    const char *catalog = NULL, *queries_path = NULL, *json_path = NULL;
    char batches_arg[256] = "1,16,64,256,1024";
    long k = 10;
    int blas_threshold = 2;
    double seconds = 3;
    static const struct option opts[] = {{"catalog", 1, 0, 'c'},
                                         {"queries", 1, 0, 'q'},
                                         {"k", 1, 0, 'k'},
                                         {"batches", 1, 0, 'b'},
                                         {"seconds", 1, 0, 's'},
                                         {"json", 1, 0, 'j'},
                                         {"blas-threshold", 1, 0, 't'},
                                         {0, 0, 0, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            catalog = optarg;
            break;
        case 'q':
            queries_path = optarg;
            break;
        case 'k':
            k = strtol(optarg, NULL, 10);
            break;
        case 'b':
            snprintf(batches_arg, sizeof(batches_arg), "%s", optarg);
            break;
        case 's':
            seconds = strtod(optarg, NULL);
            break;
        case 'j':
            json_path = optarg;
            break;
        default:
            fprintf(stderr,
                    "usage: bench_faiss_raw --catalog F --queries F [--k K] "
                    "[--batches B1,B2,...] [--seconds S] [--blas-threshold N] [--json F]\n");
            return 2;
        }
    }
    if (!catalog || !queries_path || k < 1 || seconds <= 0) {
        fprintf(stderr, "bench_faiss_raw: --catalog and --queries are required\n");
        return 2;
    }
    int rc = 1;
    float *xb = NULL, *xq = NULL, *dist = NULL;
    idx_t *labels = NULL;
    FaissIndexFlatIP *index = NULL;
    FILE *jf = NULL;
    uint64_t nb, nq;
    uint32_t d, dq;
    aff_err err = {0};
    if (vecfile_load(catalog, &xb, &nb, &d, &err) != 0 ||
        vecfile_load(queries_path, &xq, &nq, &dq, &err) != 0) {
        fprintf(stderr, "bench_faiss_raw: %s\n", err.msg);
        goto out;
    }
    if (d != dq || nq == 0) {
        fprintf(stderr, "bench_faiss_raw: catalog dim %u, queries dim %u\n", d, dq);
        goto out;
    }
    if (blas_threshold > 0) faiss_set_distance_compute_blas_threshold(blas_threshold);
    double t0 = mono_s();
    if (faiss_IndexFlatIP_new_with(&index, d) != 0 || faiss_Index_add(index, (idx_t)nb, xb) != 0) {
        fprintf(stderr, "bench_faiss_raw: FAISS: %s\n", faiss_get_last_error());
        goto out;
    }
    printf("bench_faiss_raw: IndexFlatIP, %llu x %u, k=%ld, %llu queries, BLAS from %d queries, "
           "add %.2f s\n",
           (unsigned long long)nb, d, k, (unsigned long long)nq, blas_threshold, mono_s() - t0);
    if (json_path) {
        jf = fopen(json_path, "w");
        if (!jf) {
            fprintf(stderr, "bench_faiss_raw: cannot write %s\n", json_path);
            goto out;
        }
        fprintf(jf,
                "{\"index\": \"IndexFlatIP\", \"n\": %llu, \"dim\": %u, \"k\": %ld, "
                "\"blas_threshold\": %d, \"runs\": [",
                (unsigned long long)nb, d, k, blas_threshold);
    }
    double best = 0;
    long best_batch = 0;
    int run = 0;
    char *save = NULL;
    for (char *tok = strtok_r(batches_arg, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        long b = strtol(tok, NULL, 10);
        if (b < 1 || (uint64_t)b > nq) b = (long)nq;
        free(dist);
        free(labels);
        dist = malloc((size_t)b * (size_t)k * sizeof(float));
        labels = malloc((size_t)b * (size_t)k * sizeof(idx_t));
        if (!dist || !labels) goto out;
        /* One untimed call warms caches and thread pools. */
        faiss_Index_search(index, b, xq, k, dist, labels);
        uint64_t done = 0, off = 0;
        double start = mono_s(), el;
        do {
            if (off + (uint64_t)b > nq) off = 0;
            if (faiss_Index_search(index, b, xq + off * d, k, dist, labels) != 0) {
                fprintf(stderr, "bench_faiss_raw: FAISS: %s\n", faiss_get_last_error());
                goto out;
            }
            off += (uint64_t)b;
            done += (uint64_t)b;
            el = mono_s() - start;
        } while (el < seconds);
        double qps = (double)done / el;
        printf("  batch %5ld: %10.1f queries/s  (%.3f ms per call)\n", b, qps,
               el * 1e3 / ((double)done / (double)b));
        if (jf)
            fprintf(jf, "%s{\"batch\": %ld, \"queries\": %llu, \"seconds\": %.3f, \"qps\": %.1f}",
                    run ? ", " : "", b, (unsigned long long)done, el, qps);
        run++;
        if (qps > best) {
            best = qps;
            best_batch = b;
        }
    }
    printf("  best: %.1f queries/s at batch %ld\n", best, best_batch);
    if (jf) fprintf(jf, "], \"best_qps\": %.1f, \"best_batch\": %ld}\n", best, best_batch);
    rc = 0;
out:
    if (jf && fclose(jf) != 0) rc = 1;
    if (index) faiss_Index_free(index);
    free(xb);
    free(xq);
    free(dist);
    free(labels);
    return rc;
}

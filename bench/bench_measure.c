/*
 * bench_measure.c: the CPU cost of measurement's own work, in one process, with getrusage:
 * outcomes_record of a k-item answer, outcomes_attribute of one event (impressions, clicks,
 * unknown ids), experiments_assign, and the memory a running experiment takes. Printed as
 * JSON; bench/measure_overhead.py runs it after the server rounds and divides by the server's
 * per-call CPU from the same run.
 *
 *   bench_measure [N_RECOMMENDATIONS] [K]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "experiments.h"
#include "outcomes.h"
#include "rng.h"

static double cpu_ns(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e9 +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e3;
}

static void hex_id(aff_rng *r, char out[33])
{
    static const char hex[] = "0123456789abcdef";
    uint64_t a = aff_rng_next(r), b = aff_rng_next(r);
    for (int i = 0; i < 16; i++) {
        out[i] = hex[(a >> (60 - 4 * i)) & 15];
        out[16 + i] = hex[(b >> (60 - 4 * i)) & 15];
    }
    out[32] = 0;
}

static bool any_preset(void *ctx, const char *name)
{
    (void)ctx;
    (void)name;
    return true;
}

int main(int argc, char **argv)
{
    uint32_t n = argc > 1 ? (uint32_t)atoi(argv[1]) : 200000;
    uint32_t k = argc > 2 ? (uint32_t)atoi(argv[2]) : 10;
    aff_outcomes *o;
    aff_err err;
    outcomes_config cfg = {.window_s = 86400, .max_records = 500000};
    if (outcomes_create(&o, &cfg, &err)) return fprintf(stderr, "%s\n", err.msg), 1;
    char(*ids)[33] = malloc((size_t)n * 33);
    char(*items)[16] = malloc((size_t)k * 16 * 64);
    const char **item_ptrs = malloc(sizeof(char *) * k * 64);
    for (uint32_t i = 0; i < k * 64; i++) {
        snprintf(items[i], 16, "p%06u", i * 97);
        item_ptrs[i] = items[i];
    }
    aff_rng r = {42};
    for (uint32_t i = 0; i < n; i++)
        hex_id(&r, ids[i]);
    outcomes_labels l = {.collection = "shop",
                         .surface = "home",
                         .strategy = "preset-a",
                         .experiment = "exp",
                         .arm = "b"};
    size_t mem0;
    outcomes_usage(o, NULL, &mem0);

    double t0 = cpu_ns();
    for (uint32_t i = 0; i < n; i++)
        outcomes_record(o, ids[i], &l, item_ptrs + (i % 64) * k, k, &err);
    double t1 = cpu_ns();
    uint64_t events = 0;
    for (uint32_t i = 0; i < n; i++) {
        const char *const *its = item_ptrs + (i % 64) * k;
        for (uint32_t j = 0; j < k; j++, events++)
            outcomes_attribute(o, "shop", ids[i], its[j], OUTCOMES_IMPRESSION, 0, NULL);
        outcomes_attribute(o, "shop", ids[i], its[0], OUTCOMES_CLICK, 0, NULL);
        events++;
    }
    double t2 = cpu_ns();
    for (uint32_t i = 0; i < n; i++)
        outcomes_attribute(o, "shop", "ffffffffffffffffffffffffffffffff", "x", OUTCOMES_CLICK, 0,
                           NULL);
    double t3 = cpu_ns();
    size_t records, mem1;
    outcomes_usage(o, &records, &mem1);

    char dir[] = "/tmp/aff-bench-measure-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    aff_store *store;
    store_config scfg = {.dir = dir};
    if (store_create(&store, &scfg, &err)) return fprintf(stderr, "%s\n", err.msg), 1;
    aff_experiments *ex;
    experiments_config xcfg = {.store = store, .preset_exists = any_preset};
    if (experiments_create(&ex, &xcfg, &err)) return fprintf(stderr, "%s\n", err.msg), 1;
    experiment d = {.id = "exp", .collection = "shop", .surface = "home", .n_arms = 2};
    snprintf(d.arms[0].name, sizeof d.arms[0].name, "a");
    snprintf(d.arms[1].name, sizeof d.arms[1].name, "b");
    d.arms[0].share = d.arms[1].share = 0.5;
    if (experiments_add(ex, &d, NULL, &err)) return fprintf(stderr, "%s\n", err.msg), 1;
    experiments_assignment as;
    char user[32];
    double t4 = cpu_ns();
    for (uint32_t i = 0; i < n; i++) {
        snprintf(user, sizeof user, "user-%u", i);
        experiments_assign(ex, "shop", "home", user, &as);
    }
    double t5 = cpu_ns();
    experiments_destroy(ex);
    store_destroy(store);
    char cmd[64];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd)) return 1;

    printf("{\"n\": %u, \"k\": %u, \"record_ns\": %.1f, \"attribute_ns\": %.1f, "
           "\"unattributed_ns\": %.1f, \"assign_ns\": %.1f, \"records\": %zu, "
           "\"bytes_per_record\": %.1f, \"experiment_struct_bytes\": %zu, "
           "\"series_bytes\": %zu, \"experiments_table_bytes\": %zu}\n",
           n, k, (t1 - t0) / n, (t2 - t1) / (double)events, (t3 - t2) / n, (t5 - t4) / n, records,
           (double)(mem1 - mem0 - (size_t)OUTCOMES_BUCKETS * 32) / (double)records,
           sizeof(experiment), (size_t)OUTCOMES_BUCKETS * 32,
           (size_t)EXPERIMENTS_MAX * (sizeof(experiment) + 1));
    outcomes_destroy(o);
    free(ids);
    free(items);
    free(item_ptrs);
    return 0;
}

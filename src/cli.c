/*
 * cli.c: the `affinity` command-line client.
 *
 *   affinity [--addr HOST:PORT] [--token-file F] [--tls-ca F] [--timeout-ms MS] [--json]
 *            <command> [arguments]
 *
 * Each command is one function that builds a request, calls the server through
 * transport_client.h and prints the answer: aligned text for people, or one JSON object on
 * stdout with --json (errors too: {"error": {...}}). Exit status: 0 success, 1 the server or
 * the connection reported an error (or health is not SERVING), 2 bad usage or input file.
 *
 * This is a client program, like the tools in bench/: it builds the generated protobuf-c
 * messages that transport_client.h carries; the server's own modules still see only plain C
 * structs (only transport*.c include generated headers there). Vector and attribute files are
 * read by vecfile.c and attrfile.c.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "affinity/affinity.h"
#include "affinity/v1/affinity.pb-c.h"
#include "attrfile.h"
#include "eventfile.h"
#include "grpc/health/v1/health.pb-c.h"
#include "transport_client.h"
#include "vecfile.h"
#include "widgets.h"

#define EXIT_RPC   1
#define EXIT_USAGE 2

typedef struct cli {
    transport_client_options opts;
    transport_client *client;
    bool json;
    char *token;
} cli;

static const char *const grpc_code_names[17] = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};

static const char *code_name(int code)
{
    return code >= 0 && code < 17 ? grpc_code_names[code] : "UNKNOWN";
}

/* ---- output helpers ---------------------------------------------------------------------- */

static void jstr(const char *s)
{
    putchar('"');
    for (; s && *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch == '\n')
            printf("\\n");
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

/* A float as JSON: finite values with full precision, others as null. */
static void jfloat(double v)
{
    if (isfinite(v))
        printf("%.9g", v);
    else
        printf("null");
}

/* --json: errors go to stdout as one JSON object instead of to stderr. Set once by main()
 * before any command runs (a CLI program's only mutable global). */
static bool json_errors;

static int usage_error(const char *fmt, const char *arg)
{
    char msg[1024];
    snprintf(msg, sizeof msg, fmt, arg);
    if (json_errors) {
        printf("{\"error\": {\"code\": %d, \"name\": \"USAGE\", \"message\": ", EXIT_USAGE);
        jstr(msg);
        printf("}}\n");
        return EXIT_USAGE;
    }
    fprintf(stderr, "affinity: %s\n(see affinity --help)\n", msg);
    return EXIT_USAGE;
}

/* Reports a failed call (to stdout as JSON with --json, else to stderr). */
static int report_rpc_error(const cli *c, const char *what, int rc, const transport_call_status *st)
{
    int code = st ? st->code : 2;
    const char *msg = st && st->message[0] ? st->message : aff_strerror(rc);
    if (c->json) {
        printf("{\"error\": {\"code\": %d, \"name\": \"%s\", \"message\": ", code, code_name(code));
        jstr(msg);
        printf(", \"call\": ");
        jstr(what);
        printf("}}\n");
        return EXIT_RPC;
    }
    fprintf(stderr, "affinity: %s failed: %s: %s\n", what, code_name(code), msg);
    return EXIT_RPC;
}

static int connect_client(cli *c)
{
    if (c->client) return 0;
    aff_err err = {0};
    if (transport_client_create(&c->client, &c->opts, &err) != 0) {
        fprintf(stderr, "affinity: %s\n", err.msg);
        return EXIT_USAGE;
    }
    return 0;
}

/* One unary call; on failure the error is reported and EXIT_RPC returned. */
static int call(cli *c, const char *method, const char *what, const ProtobufCMessage *req,
                const ProtobufCMessageDescriptor *desc, ProtobufCMessage **resp)
{
    int rc = connect_client(c);
    if (rc) return rc;
    transport_call_status st = {0};
    rc = transport_client_unary(c->client, method, req, desc, 0, resp, &st);
    if (rc != 0) return report_rpc_error(c, what, rc, &st);
    return 0;
}

/* ---- argument helpers ---------------------------------------------------------------------- */

static int parse_u32(const char *s, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || end == s || v > UINT32_MAX) return -1;
    *out = (uint32_t)v;
    return 0;
}

static int parse_float(const char *s, float *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !isfinite(v)) return -1;
    *out = (float)v;
    return 0;
}

/* Parses "0.1,0.2,..." (spaces allowed) into a malloc'ed array. */
static int parse_vector(const char *s, float **out, size_t *n)
{
    size_t cap = 16, len = 0;
    float *v = malloc(cap * sizeof(float));
    if (!v) return -1;
    const char *p = s;
    while (*p) {
        while (*p == ' ' || *p == ',' || *p == '[' || *p == ']')
            p++;
        if (!*p) break;
        char *end;
        double d = strtod(p, &end);
        if (end == p) {
            free(v);
            return -1;
        }
        if (len == cap) {
            cap *= 2;
            float *nv = realloc(v, cap * sizeof(float));
            if (!nv) {
                free(v);
                return -1;
            }
            v = nv;
        }
        v[len++] = (float)d;
        p = end;
    }
    if (len == 0) {
        free(v);
        return -1;
    }
    *out = v;
    *n = len;
    return 0;
}

typedef struct str_list {
    char **v;
    size_t n;
} str_list;

static int str_list_add(str_list *l, char *s)
{
    char **nv = realloc(l->v, (l->n + 1) * sizeof(char *));
    if (!nv) return -1;
    l->v = nv;
    l->v[l->n++] = s;
    return 0;
}

/* Filter flags shared by the serving commands. */
typedef struct filter_args {
    str_list categories, tags, excludes;
    Affinity__V1__FloatValue price_min, price_max;
    bool has_min, has_max, available_only;
    Affinity__V1__Filter msg;
} filter_args;

enum {
    OPT_CATEGORY = 1000,
    OPT_TAG,
    OPT_PRICE_MIN,
    OPT_PRICE_MAX,
    OPT_AVAILABLE_ONLY,
    OPT_EXCLUDE,
};

#define FILTER_OPTIONS                                                                             \
    {"category", 1, 0, OPT_CATEGORY}, {"tag", 1, 0, OPT_TAG}, {"price-min", 1, 0, OPT_PRICE_MIN},  \
        {"price-max", 1, 0, OPT_PRICE_MAX}, {"available-only", 0, 0, OPT_AVAILABLE_ONLY},          \
    {                                                                                              \
        "exclude", 1, 0, OPT_EXCLUDE                                                               \
    }

/* Handles a filter option; returns 1 if opt was one, 0 if not, -1 on a bad value. */
static int filter_option(filter_args *f, int opt, char *arg)
{
    switch (opt) {
    case OPT_CATEGORY:
        return str_list_add(&f->categories, arg) ? -1 : 1;
    case OPT_TAG:
        return str_list_add(&f->tags, arg) ? -1 : 1;
    case OPT_EXCLUDE:
        return str_list_add(&f->excludes, arg) ? -1 : 1;
    case OPT_PRICE_MIN:
        f->has_min = true;
        return parse_float(arg, &f->price_min.value) ? -1 : 1;
    case OPT_PRICE_MAX:
        f->has_max = true;
        return parse_float(arg, &f->price_max.value) ? -1 : 1;
    case OPT_AVAILABLE_ONLY:
        f->available_only = true;
        return 1;
    }
    return 0;
}

/* The filter message, or NULL when no filter flag was given. */
static Affinity__V1__Filter *filter_msg(filter_args *f)
{
    if (!f->categories.n && !f->tags.n && !f->excludes.n && !f->has_min && !f->has_max &&
        !f->available_only)
        return NULL;
    Affinity__V1__Filter init = AFFINITY__V1__FILTER__INIT;
    Affinity__V1__FloatValue fv = AFFINITY__V1__FLOAT_VALUE__INIT;
    float lo = f->price_min.value, hi = f->price_max.value;
    f->msg = init;
    f->price_min = fv;
    f->price_max = fv;
    f->price_min.value = lo;
    f->price_max.value = hi;
    f->msg.n_categories = f->categories.n;
    f->msg.categories = f->categories.v;
    f->msg.n_tags = f->tags.n;
    f->msg.tags = f->tags.v;
    f->msg.n_exclude_ids = f->excludes.n;
    f->msg.exclude_ids = f->excludes.v;
    f->msg.price_min = f->has_min ? &f->price_min : NULL;
    f->msg.price_max = f->has_max ? &f->price_max : NULL;
    f->msg.available_only = f->available_only;
    return &f->msg;
}

static void filter_free(filter_args *f)
{
    free(f->categories.v);
    free(f->tags.v);
    free(f->excludes.v);
}

static void print_hits(cli *c, Affinity__V1__Hit **hits, size_t n)
{
    if (c->json) {
        printf("[");
        for (size_t i = 0; i < n; i++) {
            printf("%s{\"id\": ", i ? ", " : "");
            jstr(hits[i]->id);
            printf(", \"score\": ");
            jfloat(hits[i]->score);
            printf("}");
        }
        printf("]");
        return;
    }
    if (n == 0) printf("  (no results)\n");
    for (size_t i = 0; i < n; i++)
        printf("  %3zu  %-32s %10.6f\n", i + 1, hits[i]->id, (double)hits[i]->score);
}

static void print_results(cli *c, Affinity__V1__QueryResult **res, size_t n,
                          const char *const *labels)
{
    if (c->json) {
        printf("{\"results\": [");
        for (size_t i = 0; i < n; i++) {
            printf("%s{", i ? ", " : "");
            if (labels) {
                printf("\"query\": ");
                jstr(labels[i]);
                printf(", ");
            }
            printf("\"hits\": ");
            print_hits(c, res[i]->hits, res[i]->n_hits);
            printf("}");
        }
        printf("]}\n");
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (labels)
            printf("item %s:\n", labels[i]);
        else if (n > 1)
            printf("query %zu:\n", i);
        print_hits(c, res[i]->hits, res[i]->n_hits);
    }
}

static const char *metric_name(Affinity__V1__Metric m)
{
    switch (m) {
    case AFFINITY__V1__METRIC__METRIC_INNER_PRODUCT:
        return "ip";
    case AFFINITY__V1__METRIC__METRIC_L2:
        return "l2";
    default:
        return "cosine";
    }
}

static const char *index_name(Affinity__V1__IndexKind k)
{
    return k == AFFINITY__V1__INDEX_KIND__INDEX_KIND_HNSW ? "hnsw" : "flat";
}

static const char *source_name(Affinity__V1__RecommendSource s)
{
    switch (s) {
    case AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_VECTOR:
        return "vector";
    case AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_PROFILE:
        return "profile";
    case AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_POPULARITY:
        return "popularity";
    case AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_MODEL:
        return "model";
    default: { /* widgets: the source of recipe r is FREQUENTLY_BOUGHT_TOGETHER + r - 1 */
        int r = (int)s - AFFINITY__V1__RECOMMEND_SOURCE__RECOMMEND_SOURCE_FREQUENTLY_BOUGHT_TOGETHER + 1;
        const char *name = r > 0 ? widgets_recipe_name((widgets_recipe)r) : NULL;
        return name ? name : "unspecified";
    }
    }
}

/* ---- learning: model state output ------------------------------------------------------- */

/* ms since the Unix epoch as ISO-8601 UTC ("2026-11-30T07:41:02.123Z") into buf; "-" for 0. */
static const char *iso_time(int64_t ms, char *buf, size_t len)
{
    if (ms <= 0) {
        snprintf(buf, len, "-");
        return buf;
    }
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    char day[32];
    if (!gmtime_r(&secs, &tm) || strftime(day, sizeof day, "%Y-%m-%dT%H:%M:%S", &tm) == 0) {
        snprintf(buf, len, "%lld ms", (long long)ms);
        return buf;
    }
    snprintf(buf, len, "%s.%03dZ", day, (int)(ms % 1000));
    return buf;
}

static void print_params_json(const Affinity__V1__ModelParams *p)
{
    if (!p) {
        printf("null");
        return;
    }
    printf("{\"factors\": %u, \"epochs\": %u, \"lambda\": ", p->factors, p->epochs);
    if (p->lambda)
        jfloat(p->lambda->value);
    else
        printf("null");
    printf(", \"alpha0\": ");
    if (p->alpha0)
        jfloat(p->alpha0->value);
    else
        printf("null");
    printf(", \"nu\": ");
    if (p->nu)
        jfloat(p->nu->value);
    else
        printf("null");
    printf(", \"cg_steps\": ");
    if (p->cg_steps)
        printf("%u", p->cg_steps->value);
    else
        printf("null");
    printf("}");
}

/* One line: "factors 64, epochs 12, lambda 0.007, alpha0 0.3, nu 1, cg-steps 3". */
static void print_params_text(const Affinity__V1__ModelParams *p)
{
    if (!p) {
        printf("-");
        return;
    }
    printf("factors %u, epochs %u", p->factors, p->epochs);
    if (p->lambda) printf(", lambda %g", (double)p->lambda->value);
    if (p->alpha0) printf(", alpha0 %g", (double)p->alpha0->value);
    if (p->nu) printf(", nu %g", (double)p->nu->value);
    if (p->cg_steps) {
        if (p->cg_steps->value)
            printf(", cg-steps %u", p->cg_steps->value);
        else
            printf(", exact solves");
    }
}

/* A ModelInfo as one JSON object (no newline). */
static void print_model_json(const Affinity__V1__ModelInfo *m)
{
    char when[64];
    printf("{\"state\": ");
    jstr(m->state);
    printf(", \"version\": %llu, \"trained_at_ms\": %lld, \"trained_at\": ",
           (unsigned long long)m->version, (long long)m->trained_at_ms);
    if (m->trained_at_ms > 0)
        jstr(iso_time(m->trained_at_ms, when, sizeof when));
    else
        printf("null");
    printf(", \"events_used\": %llu, \"users\": %llu, \"items\": %llu, \"epochs\": %u, "
           "\"loss\": ",
           (unsigned long long)m->events_used, (unsigned long long)m->users,
           (unsigned long long)m->items, m->epochs);
    jfloat(m->loss);
    printf(", \"duration_s\": ");
    jfloat(m->duration_s);
    printf(", \"params\": ");
    print_params_json(m->params);
    printf(", \"job\": ");
    if (m->job) {
        const Affinity__V1__TrainingJob *j = m->job;
        printf("{\"id\": %llu, \"running\": %s, \"epoch\": %u, \"epochs\": %u, \"loss\": ",
               (unsigned long long)j->id, j->running ? "true" : "false", j->epoch, j->epochs);
        jfloat(j->loss);
        printf(", \"started_ms\": %lld, \"error\": ", (long long)j->started_ms);
        if (j->error && j->error[0])
            jstr(j->error);
        else
            printf("null");
        printf("}");
    } else {
        printf("null");
    }
    printf(", \"events_since_train\": %llu, \"next_params\": ",
           (unsigned long long)m->events_since_train);
    print_params_json(m->next_params);
    printf("}");
}

/* The serving model's facts, one per line, each prefixed with `indent`. */
static void print_model_text(const Affinity__V1__ModelInfo *m, const char *indent)
{
    char when[64];
    printf("%sstate               %s\n", indent, m->state);
    if (m->version) {
        printf("%sversion             %llu\n", indent, (unsigned long long)m->version);
        printf("%strained at          %s\n", indent, iso_time(m->trained_at_ms, when, sizeof when));
        printf("%sevents used         %llu\n", indent, (unsigned long long)m->events_used);
        printf("%susers               %llu\n", indent, (unsigned long long)m->users);
        printf("%sitems               %llu\n", indent, (unsigned long long)m->items);
        printf("%sfactors             %u\n", indent, m->params ? m->params->factors : 0);
        printf("%sepochs              %u\n", indent, m->epochs);
        printf("%sloss                %.6g\n", indent, m->loss);
        printf("%sduration            %.3f s\n", indent, m->duration_s);
        printf("%sparams              ", indent);
        print_params_text(m->params);
        printf("\n");
    }
    if (m->job) {
        const Affinity__V1__TrainingJob *j = m->job;
        printf("%sjob                 #%llu ", indent, (unsigned long long)j->id);
        if (j->running)
            printf("running: epoch %u/%u, loss %.6g, started %s\n", j->epoch, j->epochs, j->loss,
                   iso_time(j->started_ms, when, sizeof when));
        else if (j->error && j->error[0])
            printf("failed: %s\n", j->error);
        else
            printf("done (%u/%u epochs)\n", j->epoch, j->epochs);
    }
    printf("%sevents since train  %llu\n", indent, (unsigned long long)m->events_since_train);
    printf("%snext params         ", indent);
    print_params_text(m->next_params);
    printf("\n");
}

static void print_collection(cli *c, const Affinity__V1__CollectionInfo *ci, bool json_alone)
{
    if (c->json) {
        printf("{\"name\": ");
        jstr(ci->name);
        printf(", \"dimension\": %u, \"metric\": \"%s\", \"index\": \"%s\", \"item_count\": %llu, "
               "\"memory_bytes\": %llu, \"backend\": ",
               ci->dimension, metric_name(ci->metric), index_name(ci->index),
               (unsigned long long)ci->item_count, (unsigned long long)ci->memory_bytes);
        jstr(ci->backend);
        printf(", \"device\": ");
        jstr(ci->device);
        if (ci->index == AFFINITY__V1__INDEX_KIND__INDEX_KIND_HNSW)
            printf(", \"hnsw_m\": %u, \"hnsw_ef_search\": %u", ci->hnsw_m, ci->hnsw_ef_search);
        printf(", \"spaces\": [");
        for (size_t i = 0; i < ci->n_spaces; i++) {
            printf("%s", i ? ", " : "");
            jstr(ci->spaces[i]);
        }
        printf("], \"model\": ");
        if (ci->model)
            print_model_json(ci->model);
        else
            printf("null");
        printf("}%s", json_alone ? "\n" : "");
        return;
    }
    printf("%-24s dim %-5u %-7s %-5s %10llu items %9.1f MiB  %s %s", ci->name, ci->dimension,
           metric_name(ci->metric), index_name(ci->index), (unsigned long long)ci->item_count,
           (double)ci->memory_bytes / (1024.0 * 1024.0), ci->backend, ci->device);
    if (ci->model && ci->model->version)
        printf("  model v%llu %s", (unsigned long long)ci->model->version, ci->model->state);
    else if (ci->model)
        printf("  model %s", ci->model->state);
    printf("\n");
    if (!json_alone) return;
    /* describe: the spaces and the model in full. */
    printf("  spaces              ");
    for (size_t i = 0; i < ci->n_spaces; i++)
        printf("%s%s", i ? ", " : "", ci->spaces[i]);
    printf("%s\n", ci->n_spaces ? "" : "(none until a model is trained)");
    if (ci->model) print_model_text(ci->model, "  ");
}

static int parse_metric(const char *s, Affinity__V1__Metric *m)
{
    if (strcasecmp(s, "cosine") == 0)
        *m = AFFINITY__V1__METRIC__METRIC_COSINE;
    else if (strcasecmp(s, "ip") == 0 || strcasecmp(s, "inner_product") == 0 ||
             strcasecmp(s, "dot") == 0)
        *m = AFFINITY__V1__METRIC__METRIC_INNER_PRODUCT;
    else if (strcasecmp(s, "l2") == 0)
        *m = AFFINITY__V1__METRIC__METRIC_L2;
    else
        return -1;
    return 0;
}

/* ---- learning: parameter flags ----------------------------------------------------------- */

/* The iALS parameter flags shared by `collections create` and `train`. The server checks the
 * ranges (and names the field); here only the syntax. */
typedef struct model_flags {
    Affinity__V1__ModelParams msg;
    Affinity__V1__FloatValue lambda, alpha0, nu;
    Affinity__V1__UInt32Value cg_steps;
    bool any;
} model_flags;

enum { OPT_FACTORS = 1200, OPT_EPOCHS, OPT_LAMBDA, OPT_ALPHA0, OPT_NU, OPT_CG_STEPS };

#define MODEL_OPTIONS                                                                              \
    {"factors", 1, 0, OPT_FACTORS}, {"epochs", 1, 0, OPT_EPOCHS}, {"lambda", 1, 0, OPT_LAMBDA},    \
        {"alpha0", 1, 0, OPT_ALPHA0}, {"nu", 1, 0, OPT_NU},                                        \
    {                                                                                              \
        "cg-steps", 1, 0, OPT_CG_STEPS                                                             \
    }

#define MODEL_FLAGS_USAGE                                                                          \
    "[--factors N] [--epochs N] [--lambda X] [--alpha0 X] [--nu X] [--cg-steps N]"

static void model_flags_init(model_flags *m)
{
    memset(m, 0, sizeof *m);
    affinity__v1__model_params__init(&m->msg);
    affinity__v1__float_value__init(&m->lambda);
    affinity__v1__float_value__init(&m->alpha0);
    affinity__v1__float_value__init(&m->nu);
    affinity__v1__uint32_value__init(&m->cg_steps);
}

/* Handles a model option: 1 if opt was one, 0 if not, -1 on a bad value (reported). */
static int model_option(model_flags *m, int opt, const char *arg)
{
    bool bad = false;
    switch (opt) {
    case OPT_FACTORS:
        /* 0 would mean "unset" on the wire: refuse it rather than silently keep the default. */
        bad = parse_u32(arg, &m->msg.factors) || m->msg.factors == 0;
        break;
    case OPT_EPOCHS:
        bad = parse_u32(arg, &m->msg.epochs) || m->msg.epochs == 0;
        break;
    case OPT_LAMBDA:
        bad = parse_float(arg, &m->lambda.value);
        m->msg.lambda = &m->lambda;
        break;
    case OPT_ALPHA0:
        bad = parse_float(arg, &m->alpha0.value);
        m->msg.alpha0 = &m->alpha0;
        break;
    case OPT_NU:
        bad = parse_float(arg, &m->nu.value);
        m->msg.nu = &m->nu;
        break;
    case OPT_CG_STEPS:
        bad = parse_u32(arg, &m->cg_steps.value);
        m->msg.cg_steps = &m->cg_steps;
        break;
    default:
        return 0;
    }
    if (bad) {
        const char *what = opt == OPT_FACTORS    ? "--factors"
                           : opt == OPT_EPOCHS   ? "--epochs"
                           : opt == OPT_CG_STEPS ? "--cg-steps"
                                                 : "--lambda/--alpha0/--nu";
        fprintf(stderr, "affinity: bad %s '%s'; use %s\n(see affinity --help)\n", what, arg,
                opt == OPT_FACTORS || opt == OPT_EPOCHS ? "a positive integer"
                : opt == OPT_CG_STEPS                   ? "an integer (0: exact solves)"
                                                        : "a finite number");
        return -1;
    }
    m->any = true;
    return 1;
}

/* The parameters message, or NULL when no model flag was given (the server's values). */
static Affinity__V1__ModelParams *model_flags_msg(model_flags *m)
{
    return m->any ? &m->msg : NULL;
}

enum { OPT_SPACE = 1300 };

/* --space content|behaviour (get, similar, recommend). */
static int parse_space(const char *s, Affinity__V1__Space *out)
{
    if (strcasecmp(s, "content") == 0)
        *out = AFFINITY__V1__SPACE__SPACE_CONTENT;
    else if (strcasecmp(s, "behaviour") == 0 || strcasecmp(s, "behavior") == 0)
        *out = AFFINITY__V1__SPACE__SPACE_BEHAVIOUR;
    else
        return usage_error("bad --space '%s'; use content or behaviour", s);
    return 0;
}

/* ---- collections --------------------------------------------------------------------------- */

static int cmd_collections(cli *c, int argc, char **argv)
{
    const char *sub = argc > 1 ? argv[1] : "list";
    ProtobufCMessage *resp = NULL;
    int rc;
    if (strcmp(sub, "list") == 0) {
        Affinity__V1__ListCollectionsRequest req = AFFINITY__V1__LIST_COLLECTIONS_REQUEST__INIT;
        if ((rc = call(c, TRANSPORT_METHOD_LIST_COLLECTIONS, "ListCollections", &req.base,
                       &affinity__v1__list_collections_response__descriptor, &resp)))
            return rc;
        Affinity__V1__ListCollectionsResponse *r = (Affinity__V1__ListCollectionsResponse *)resp;
        if (c->json) printf("{\"collections\": [");
        for (size_t i = 0; i < r->n_collections; i++) {
            if (c->json && i) printf(", ");
            print_collection(c, r->collections[i], false);
        }
        if (c->json)
            printf("]}\n");
        else if (r->n_collections == 0)
            printf("(no collections)\n");
        transport_client_free(resp);
        return 0;
    }
    if (strcmp(sub, "describe") == 0 || strcmp(sub, "drop") == 0) {
        if (argc != 3) return usage_error("usage: affinity collections %s NAME", sub);
        if (sub[0] == 'd' && sub[1] == 'e') {
            Affinity__V1__DescribeCollectionRequest req =
                AFFINITY__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
            req.name = argv[2];
            if ((rc = call(c, TRANSPORT_METHOD_DESCRIBE_COLLECTION, "DescribeCollection", &req.base,
                           &affinity__v1__collection_info__descriptor, &resp)))
                return rc;
            print_collection(c, (Affinity__V1__CollectionInfo *)resp, true);
        } else {
            Affinity__V1__DropCollectionRequest req = AFFINITY__V1__DROP_COLLECTION_REQUEST__INIT;
            req.name = argv[2];
            if ((rc = call(c, TRANSPORT_METHOD_DROP_COLLECTION, "DropCollection", &req.base,
                           &affinity__v1__drop_collection_response__descriptor, &resp)))
                return rc;
            if (c->json) {
                printf("{\"dropped\": ");
                jstr(argv[2]);
                printf("}\n");
            } else {
                printf("dropped %s\n", argv[2]);
            }
        }
        transport_client_free(resp);
        return 0;
    }
    if (strcmp(sub, "create") == 0) {
        static const struct option opts[] = {{"dim", 1, 0, 'd'},    {"dimension", 1, 0, 'd'},
                                             {"metric", 1, 0, 'm'}, {"index", 1, 0, 'i'},
                                             {"hnsw-m", 1, 0, 'M'}, {"hnsw-ef", 1, 0, 'e'},
                                             MODEL_OPTIONS,         {0, 0, 0, 0}};
        Affinity__V1__CreateCollectionRequest req = AFFINITY__V1__CREATE_COLLECTION_REQUEST__INIT;
        req.metric = AFFINITY__V1__METRIC__METRIC_COSINE;
        model_flags mf;
        model_flags_init(&mf);
        bool dim_set = false, metric_set = false;
        int opt;
        argc--;
        argv++; /* getopt sees "create NAME ..." */
        optind = 0;
        while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
            int mo = model_option(&mf, opt, optarg);
            if (mo < 0) return EXIT_USAGE;
            if (mo) continue;
            switch (opt) {
            case 'd':
                if (parse_u32(optarg, &req.dimension)) return usage_error("bad --dim '%s'", optarg);
                dim_set = true;
                break;
            case 'm':
                if (parse_metric(optarg, &req.metric))
                    return usage_error("bad --metric '%s'; use cosine, ip or l2", optarg);
                metric_set = true;
                break;
            case 'i':
                if (strcmp(optarg, "flat") == 0)
                    req.index = AFFINITY__V1__INDEX_KIND__INDEX_KIND_FLAT;
                else if (strcmp(optarg, "hnsw") == 0)
                    req.index = AFFINITY__V1__INDEX_KIND__INDEX_KIND_HNSW;
                else
                    return usage_error("bad --index '%s'; use flat or hnsw", optarg);
                break;
            case 'M':
                if (parse_u32(optarg, &req.hnsw_m)) return usage_error("bad --hnsw-m '%s'", optarg);
                break;
            case 'e':
                if (parse_u32(optarg, &req.hnsw_ef_search))
                    return usage_error("bad --hnsw-ef '%s'", optarg);
                break;
            default:
                return EXIT_USAGE;
            }
        }
        if (optind != argc - 1 || !dim_set)
            return usage_error(
                "usage: affinity collections create NAME --dim D [--metric "
                "cosine|ip|l2] [--index flat|hnsw] [--hnsw-m M] [--hnsw-ef E] " MODEL_FLAGS_USAGE
                " (--dim 0: learned-only)%s",
                "");
        req.name = argv[optind];
        /* A learned-only collection ranks by inner product of learned factors; the server
         * refuses an explicit cosine there, so only send a metric that was asked for. */
        if (req.dimension == 0 && !metric_set)
            req.metric = AFFINITY__V1__METRIC__METRIC_UNSPECIFIED;
        req.model = model_flags_msg(&mf);
        if ((rc = call(c, TRANSPORT_METHOD_CREATE_COLLECTION, "CreateCollection", &req.base,
                       &affinity__v1__create_collection_response__descriptor, &resp)))
            return rc;
        Affinity__V1__CreateCollectionResponse *r = (Affinity__V1__CreateCollectionResponse *)resp;
        if (r->collection) {
            if (!c->json) printf("created ");
            print_collection(c, r->collection, true);
        } else if (c->json) {
            printf("{\"name\": ");
            jstr(req.name);
            printf("}\n");
        } else {
            printf("created %s\n", req.name);
        }
        transport_client_free(resp);
        return 0;
    }
    return usage_error("unknown subcommand 'collections %s'; use list, create, drop, describe",
                       sub);
}

/* ---- load ---------------------------------------------------------------------------------- */

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void progress(uint64_t done, uint64_t total, double secs, bool final)
{
    int width = 30;
    double frac = total ? (double)done / (double)total : 1.0;
    int fill = (int)(frac * width);
    fprintf(stderr, "\r[");
    for (int i = 0; i < width; i++)
        fputc(i < fill ? '#' : ' ', stderr);
    fprintf(stderr, "] %llu/%llu %3.0f%%  %.0f items/s", (unsigned long long)done,
            (unsigned long long)total, frac * 100, secs > 0 ? (double)done / secs : 0.0);
    if (final) fputc('\n', stderr);
    fflush(stderr);
}

/* Checks that the collection exists with the file's dimension, creating it when missing and
 * `create` is set, so a mismatch fails before any item is sent. */
static int prepare_collection(cli *c, const char *name, uint32_t dim, Affinity__V1__Metric metric,
                              bool create, const char *vec_path, bool *created)
{
    *created = false;
    int rc = connect_client(c);
    if (rc) return rc;
    Affinity__V1__DescribeCollectionRequest dreq = AFFINITY__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
    dreq.name = (char *)name;
    ProtobufCMessage *resp = NULL;
    transport_call_status st = {0};
    rc = transport_client_unary(c->client, TRANSPORT_METHOD_DESCRIBE_COLLECTION, &dreq.base,
                                &affinity__v1__collection_info__descriptor, 0, &resp, &st);
    if (rc == 0) {
        uint32_t have = ((Affinity__V1__CollectionInfo *)resp)->dimension;
        transport_client_free(resp);
        if (have != dim && !vec_path) {
            fprintf(stderr,
                    "affinity: collection %s has vectors of dimension %u; give them with "
                    "--vectors (items without vectors need a collection created with "
                    "--dim 0)\n",
                    name, have);
            return EXIT_USAGE;
        }
        if (have != dim) {
            fprintf(stderr,
                    "affinity: %s has vectors of dimension %u but collection %s has "
                    "dimension %u\n",
                    vec_path, dim, name, have);
            return EXIT_USAGE;
        }
        return 0;
    }
    if (st.code != 5 || !create) {
        if (st.code == 5)
            snprintf(st.message, sizeof(st.message),
                     "collection \"%s\" does not exist; add --create to create it", name);
        return report_rpc_error(c, "DescribeCollection", rc, &st);
    }
    Affinity__V1__CreateCollectionRequest req = AFFINITY__V1__CREATE_COLLECTION_REQUEST__INIT;
    req.name = (char *)name;
    req.dimension = dim;
    req.metric = metric;
    /* dim 0 (learned-only) ranks by inner product of learned factors; cosine is refused. */
    if (dim == 0 && metric == AFFINITY__V1__METRIC__METRIC_COSINE)
        req.metric = AFFINITY__V1__METRIC__METRIC_UNSPECIFIED;
    if ((rc = call(c, TRANSPORT_METHOD_CREATE_COLLECTION, "CreateCollection", &req.base,
                   &affinity__v1__create_collection_response__descriptor, &resp)))
        return rc;
    transport_client_free(resp);
    *created = true;
    if (!c->json)
        fprintf(stderr, "created collection %s (dim %u, %s)\n", name, dim,
                dim ? metric_name(metric) : "learned-only");
    return 0;
}

/* A load that created its collection and then failed drops it again, so a retry starts
 * clean (and nothing half-loaded stays behind). */
static void undo_create(cli *c, const char *name)
{
    Affinity__V1__DropCollectionRequest req = AFFINITY__V1__DROP_COLLECTION_REQUEST__INIT;
    req.name = (char *)name;
    ProtobufCMessage *resp = NULL;
    transport_call_status st = {0};
    if (c->client && transport_client_unary(c->client, TRANSPORT_METHOD_DROP_COLLECTION, &req.base,
                                            &affinity__v1__drop_collection_response__descriptor, 0,
                                            &resp, &st) == 0)
        fprintf(stderr, "affinity: the load failed; dropped collection %s, which it created\n",
                name);
    else
        fprintf(stderr, "affinity: the load failed; could not drop collection %s: %s\n", name,
                st.message);
    transport_client_free(resp);
}

static int cmd_load(cli *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"vectors", 1, 0, 'v'},  {"attrs", 1, 0, 'a'},       {"batch", 1, 0, 'b'},
        {"create", 0, 0, 'c'},   {"metric", 1, 0, 'm'},      {"id-prefix", 1, 0, 'p'},
        {"progress", 0, 0, 'P'}, {"no-progress", 0, 0, 'N'}, {0, 0, 0, 0}};
    const char *vec_path = NULL, *attr_path = NULL, *id_prefix = NULL;
    uint32_t batch = 500;
    bool create = false, created = false;
    int show_progress = -1;
    Affinity__V1__Metric metric = AFFINITY__V1__METRIC__METRIC_COSINE;
    int opt;
    optind = 0; /* 0: glibc re-initializes (permuting, fresh state) */
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'v':
            vec_path = optarg;
            break;
        case 'a':
            attr_path = optarg;
            break;
        case 'b':
            if (parse_u32(optarg, &batch) || batch == 0 || batch > 100000)
                return usage_error("bad --batch '%s'; 1..100000", optarg);
            break;
        case 'c':
            create = true;
            break;
        case 'm':
            if (parse_metric(optarg, &metric))
                return usage_error("bad --metric '%s'; use cosine, ip or l2", optarg);
            break;
        case 'p':
            id_prefix = optarg;
            break;
        case 'P':
            show_progress = 1;
            break;
        case 'N':
            show_progress = 0;
            break;
        default:
            return EXIT_USAGE;
        }
    }
    /* Without --vectors, --attrs alone loads items without vectors into a learned-only
     * collection (dimension 0). */
    if (optind != argc - 1 || (!attr_path && !id_prefix) || (!vec_path && !attr_path) ||
        (!vec_path && id_prefix))
        return usage_error(
            "usage: affinity load COLLECTION --vectors FILE.npy|FILE.fvecs (--attrs FILE.csv|"
            "FILE.jsonl | --id-prefix P) [--batch N] [--create [--metric cosine|ip|l2]] "
            "[--progress|--no-progress], or load COLLECTION --attrs FILE (items without "
            "vectors, for a learned-only collection)%s",
            "");
    if (!vec_path) show_progress = 0; /* the total is not known in advance */
    const char *collection = argv[optind];
    if (show_progress < 0) show_progress = isatty(2) && !c->json;

    vecfile_reader *vr = NULL;
    attrfile_reader *ar = NULL;
    transport_client_stream *stream = NULL;
    float *vecs = NULL;
    item_record *recs = NULL;
    Affinity__V1__Item *items = NULL;
    Affinity__V1__Item **item_ptrs = NULL;
    char **tag_ptrs = NULL;
    char(*ids)[AFF_MAX_ID_LEN + 1] = NULL;
    ProtobufCMessage *resp = NULL;
    aff_err err = {0};
    int rc = 0;
    if (vec_path && vecfile_open(&vr, vec_path, &err) != 0) {
        fprintf(stderr, "affinity: %s\n", err.msg);
        rc = EXIT_USAGE;
        goto out;
    }
    if (attr_path && attrfile_open(&ar, attr_path, &err) != 0) {
        fprintf(stderr, "affinity: %s\n", err.msg);
        rc = EXIT_USAGE;
        goto out;
    }
    uint32_t dim = vr ? vecfile_dim(vr) : 0;
    uint64_t total = vr ? vecfile_rows(vr) : 0;
    /* Keep each message near 1 MiB whatever the dimension. */
    uint32_t per_msg = (uint32_t)((1u << 20) / ((uint64_t)dim * 4 + 256));
    if (per_msg < 1) per_msg = 1;
    if (batch > per_msg) batch = per_msg;
    vecs = malloc(((size_t)batch * dim + 1) * sizeof(float));
    recs = calloc(batch, sizeof(item_record));
    items = calloc(batch, sizeof(*items));
    item_ptrs = calloc(batch, sizeof(*item_ptrs));
    tag_ptrs = calloc((size_t)batch * AFF_MAX_TAGS_PER_ITEM, sizeof(char *));
    ids = calloc(batch, sizeof(*ids));
    if (!vecs || !recs || !items || !item_ptrs || !tag_ptrs || !ids) {
        fprintf(stderr, "affinity: out of memory\n");
        rc = EXIT_USAGE;
        goto out;
    }
    if ((rc = prepare_collection(c, collection, dim, metric, create, vec_path, &created))) goto out;
    if ((rc = connect_client(c))) goto out;
    /* A bulk load may take long: the stream gets an hour unless --timeout-ms says more. */
    uint32_t stream_ms = c->opts.timeout_ms > 3600000 ? c->opts.timeout_ms : 3600000;
    if (transport_client_stream_open(c->client, TRANSPORT_METHOD_UPSERT_ITEMS, stream_ms, &stream,
                                     &err) != 0) {
        fprintf(stderr, "affinity: %s\n", err.msg);
        rc = EXIT_RPC;
        goto out;
    }
    double t0 = mono_s(), last_draw = 0;
    uint64_t sent = 0;
    bool send_failed = false;
    for (;;) {
        size_t n = 0;
        if (vr && vecfile_read(vr, vecs, batch, &n, &err) != 0) {
            fprintf(stderr, "\naffinity: %s\n", err.msg);
            rc = EXIT_USAGE;
            goto out;
        }
        while (!vr && n < batch) { /* no vectors: as many records as the batch holds */
            int got = attrfile_next(ar, &recs[n], &err);
            if (got < 0) {
                fprintf(stderr, "\naffinity: %s\n", err.msg);
                rc = EXIT_USAGE;
                goto out;
            }
            if (got == 0) break;
            n++;
        }
        if (n == 0) break;
        for (size_t i = 0; i < n; i++) {
            affinity__v1__item__init(&items[i]);
            if (ar) {
                int got = vr ? attrfile_next(ar, &recs[i], &err) : 1;
                if (got < 0) {
                    fprintf(stderr, "\naffinity: %s\n", err.msg);
                    rc = EXIT_USAGE;
                    goto out;
                }
                if (got == 0) {
                    fprintf(stderr,
                            "\naffinity: %s has fewer records than %s has vectors (%llu); "
                            "each vector row needs one record\n",
                            attr_path, vec_path, (unsigned long long)total);
                    rc = EXIT_USAGE;
                    goto out;
                }
                transport_item_to_pb(&recs[i], tag_ptrs + i * AFF_MAX_TAGS_PER_ITEM, &items[i]);
            } else {
                snprintf(ids[i], sizeof(ids[i]), "%s%llu", id_prefix,
                         (unsigned long long)(sent + i));
                items[i].id = ids[i];
            }
            items[i].n_vector = dim;
            items[i].vector = vecs + i * dim;
            item_ptrs[i] = &items[i];
        }
        Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
        req.collection = (char *)collection;
        req.n_items = n;
        req.items = item_ptrs;
        if (transport_client_stream_send(stream, &req.base, &err) != 0) {
            send_failed = true; /* the server ended the call; finish() says why */
            break;
        }
        sent += n;
        double now = mono_s();
        if (show_progress && now - last_draw > 0.1) {
            progress(sent, total, now - t0, false);
            last_draw = now;
        }
    }
    if (!send_failed && ar && vr) {
        item_record extra;
        int got = attrfile_next(ar, &extra, &err);
        if (got != 0) {
            fprintf(stderr, "\naffinity: %s has more records than %s has vectors (%llu)\n",
                    attr_path, vec_path, (unsigned long long)total);
            rc = EXIT_USAGE;
            goto out;
        }
    }
    transport_call_status st = {0};
    int frc = transport_client_stream_finish(
        stream, &affinity__v1__upsert_items_response__descriptor, &resp, &st);
    double secs = mono_s() - t0;
    if (show_progress) progress(sent, total, secs, true);
    if (frc != 0) {
        rc = report_rpc_error(c, "UpsertItems", frc, &st);
        goto out;
    }
    uint64_t upserted = ((Affinity__V1__UpsertItemsResponse *)resp)->upserted_count;
    if (c->json)
        printf("{\"collection\": \"%s\", \"upserted\": %llu, \"seconds\": %.3f, "
               "\"items_per_second\": %.1f}\n",
               collection, (unsigned long long)upserted, secs,
               secs > 0 ? (double)upserted / secs : 0.0);
    else
        printf("loaded %llu items into %s in %.2f s (%.0f items/s)\n", (unsigned long long)upserted,
               collection, secs, secs > 0 ? (double)upserted / secs : 0.0);
out:
    transport_client_free(resp);
    transport_client_stream_destroy(stream);
    if (rc && created) undo_create(c, collection);
    vecfile_close(vr);
    attrfile_close(ar);
    free(vecs);
    free(recs);
    free(items);
    free(item_ptrs);
    free(tag_ptrs);
    free(ids);
    return rc;
}

/* ---- items --------------------------------------------------------------------------------- */

static int cmd_get(cli *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"vectors", 0, 0, 'v'}, {"space", 1, 0, OPT_SPACE}, {0, 0, 0, 0}};
    Affinity__V1__GetItemsRequest req = AFFINITY__V1__GET_ITEMS_REQUEST__INIT;
    int opt;
    optind = 0; /* 0: glibc re-initializes (permuting, fresh state) */
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (opt == OPT_SPACE) {
            if (parse_space(optarg, &req.space)) return EXIT_USAGE;
            continue;
        }
        if (opt != 'v') return EXIT_USAGE;
        req.include_vectors = 1;
    }
    if (argc - optind < 2)
        return usage_error(
            "usage: affinity get COLLECTION ID... [--vectors [--space content|behaviour]]%s", "");
    req.collection = argv[optind];
    req.n_ids = (size_t)(argc - optind - 1);
    req.ids = argv + optind + 1;
    ProtobufCMessage *resp = NULL;
    int rc = call(c, TRANSPORT_METHOD_GET_ITEMS, "GetItems", &req.base,
                  &affinity__v1__get_items_response__descriptor, &resp);
    if (rc) return rc;
    Affinity__V1__GetItemsResponse *r = (Affinity__V1__GetItemsResponse *)resp;
    if (c->json) printf("{\"items\": [");
    for (size_t i = 0; i < r->n_items; i++) {
        const Affinity__V1__Item *it = r->items[i];
        if (c->json) {
            printf("%s{\"id\": ", i ? ", " : "");
            jstr(it->id);
            printf(", \"category\": ");
            jstr(it->category);
            printf(", \"tags\": [");
            for (size_t t = 0; t < it->n_tags; t++) {
                printf("%s", t ? ", " : "");
                jstr(it->tags[t]);
            }
            printf("], \"price\": ");
            jfloat(it->price);
            printf(", \"available\": %s", it->available || !it->available_set ? "true" : "false");
            if (req.include_vectors) {
                printf(", \"vector\": [");
                for (size_t d = 0; d < it->n_vector; d++) {
                    printf("%s", d ? ", " : "");
                    jfloat(it->vector[d]);
                }
                printf("]");
            }
            printf("}");
        } else {
            printf("%-32s category %-16s price %10.2f %s tags", it->id, it->category,
                   (double)it->price,
                   it->available || !it->available_set ? "available  " : "unavailable");
            for (size_t t = 0; t < it->n_tags; t++)
                printf(" %s", it->tags[t]);
            printf("\n");
            if (req.include_vectors) {
                printf("  [");
                for (size_t d = 0; d < it->n_vector; d++)
                    printf("%s%.6g", d ? ", " : "", (double)it->vector[d]);
                printf("]\n");
            }
        }
    }
    if (c->json) {
        printf("], \"missing_ids\": [");
        for (size_t i = 0; i < r->n_missing_ids; i++) {
            printf("%s", i ? ", " : "");
            jstr(r->missing_ids[i]);
        }
        printf("]}\n");
    } else {
        for (size_t i = 0; i < r->n_missing_ids; i++)
            printf("%-32s (not found)\n", r->missing_ids[i]);
    }
    transport_client_free(resp);
    return 0;
}

static int cmd_delete(cli *c, int argc, char **argv)
{
    if (argc < 3) return usage_error("usage: affinity delete COLLECTION ID...%s", "");
    Affinity__V1__DeleteItemsRequest req = AFFINITY__V1__DELETE_ITEMS_REQUEST__INIT;
    req.collection = argv[1];
    req.n_ids = (size_t)(argc - 2);
    req.ids = argv + 2;
    ProtobufCMessage *resp = NULL;
    int rc = call(c, TRANSPORT_METHOD_DELETE_ITEMS, "DeleteItems", &req.base,
                  &affinity__v1__delete_items_response__descriptor, &resp);
    if (rc) return rc;
    uint64_t n = ((Affinity__V1__DeleteItemsResponse *)resp)->deleted_count;
    if (c->json)
        printf("{\"deleted\": %llu}\n", (unsigned long long)n);
    else
        printf("deleted %llu of %zu ids\n", (unsigned long long)n, req.n_ids);
    transport_client_free(resp);
    return 0;
}

/* ---- serving ------------------------------------------------------------------------------- */

static int cmd_search(cli *c, int argc, char **argv)
{
    static const struct option opts[] = {{"vector", 1, 0, 'v'}, {"vectors", 1, 0, 'f'},
                                         {"limit", 1, 0, 'l'},  {"k", 1, 0, 'k'},
                                         FILTER_OPTIONS,        {0, 0, 0, 0}};
    filter_args fa;
    memset(&fa, 0, sizeof(fa));
    float *vecs = NULL;
    size_t dim = 0;
    uint64_t rows = 0;
    const char *file = NULL;
    uint32_t k = 10, limit = 1024;
    Affinity__V1__Query *queries = NULL, **qptrs = NULL;
    ProtobufCMessage *resp = NULL;
    int rc = 0, opt;
    optind = 0; /* 0: glibc re-initializes (permuting, fresh state) */
    while ((opt = getopt_long(argc, argv, "k:", opts, NULL)) != -1) {
        int f = filter_option(&fa, opt, optarg);
        if (f < 0) {
            rc = usage_error("bad filter value '%s'", optarg);
            goto out;
        }
        if (f) continue;
        switch (opt) {
        case 'v':
            free(vecs);
            vecs = NULL;
            if (parse_vector(optarg, &vecs, &dim)) {
                rc = usage_error("bad --vector '%s'; use comma-separated numbers", optarg);
                goto out;
            }
            rows = 1;
            break;
        case 'f':
            file = optarg;
            break;
        case 'l':
            if (parse_u32(optarg, &limit) || limit == 0) {
                rc = usage_error("bad --limit '%s'", optarg);
                goto out;
            }
            break;
        case 'k':
            if (parse_u32(optarg, &k)) {
                rc = usage_error("bad -k '%s'", optarg);
                goto out;
            }
            break;
        default:
            rc = EXIT_USAGE;
            goto out;
        }
    }
    if (optind != argc - 1 || (!vecs && !file)) {
        rc = usage_error("usage: affinity search COLLECTION (--vector V1,V2,... | --vectors "
                         "FILE [--limit N]) [-k K] [filter flags]%s",
                         "");
        goto out;
    }
    if (file) {
        aff_err err = {0};
        uint32_t d32;
        free(vecs);
        vecs = NULL;
        if (vecfile_load(file, &vecs, &rows, &d32, &err) != 0) {
            fprintf(stderr, "affinity: %s\n", err.msg);
            rc = EXIT_USAGE;
            goto out;
        }
        dim = d32;
        if (rows > limit) rows = limit;
    }
    queries = calloc(rows, sizeof(*queries));
    qptrs = calloc(rows, sizeof(*qptrs));
    if (!queries || !qptrs) {
        rc = EXIT_USAGE;
        goto out;
    }
    for (uint64_t i = 0; i < rows; i++) {
        Affinity__V1__Query init = AFFINITY__V1__QUERY__INIT;
        queries[i] = init;
        queries[i].n_vector = dim;
        queries[i].vector = vecs + i * dim;
        qptrs[i] = &queries[i];
    }
    Affinity__V1__SearchRequest req = AFFINITY__V1__SEARCH_REQUEST__INIT;
    req.collection = argv[optind];
    req.n_queries = rows;
    req.queries = qptrs;
    req.k = k;
    req.filter = filter_msg(&fa);
    if ((rc = call(c, TRANSPORT_METHOD_SEARCH, "Search", &req.base,
                   &affinity__v1__search_response__descriptor, &resp)))
        goto out;
    Affinity__V1__SearchResponse *r = (Affinity__V1__SearchResponse *)resp;
    print_results(c, r->results, r->n_results, NULL);
out:
    transport_client_free(resp);
    free(queries);
    free(qptrs);
    free(vecs);
    filter_free(&fa);
    return rc;
}

static int cmd_similar(cli *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"k", 1, 0, 'k'}, {"space", 1, 0, OPT_SPACE}, FILTER_OPTIONS, {0, 0, 0, 0}};
    filter_args fa;
    memset(&fa, 0, sizeof(fa));
    Affinity__V1__SimilarItemsRequest req = AFFINITY__V1__SIMILAR_ITEMS_REQUEST__INIT;
    req.k = 10;
    ProtobufCMessage *resp = NULL;
    int rc = 0, opt;
    optind = 0; /* 0: glibc re-initializes (permuting, fresh state) */
    while ((opt = getopt_long(argc, argv, "k:", opts, NULL)) != -1) {
        int f = filter_option(&fa, opt, optarg);
        if (f < 0) {
            rc = usage_error("bad filter value '%s'", optarg);
            goto out;
        }
        if (f) continue;
        if (opt == OPT_SPACE) {
            if ((rc = parse_space(optarg, &req.space))) goto out;
            continue;
        }
        if (opt != 'k' || parse_u32(optarg, &req.k)) {
            rc = usage_error("bad option%s", "");
            goto out;
        }
    }
    if (argc - optind < 2) {
        rc = usage_error("usage: affinity similar COLLECTION ITEM_ID... [-k K] "
                         "[--space content|behaviour] [filter flags]%s",
                         "");
        goto out;
    }
    req.collection = argv[optind];
    req.n_item_ids = (size_t)(argc - optind - 1);
    req.item_ids = argv + optind + 1;
    req.filter = filter_msg(&fa);
    if ((rc = call(c, TRANSPORT_METHOD_SIMILAR_ITEMS, "SimilarItems", &req.base,
                   &affinity__v1__similar_items_response__descriptor, &resp)))
        goto out;
    Affinity__V1__SimilarItemsResponse *r = (Affinity__V1__SimilarItemsResponse *)resp;
    print_results(c, r->results, r->n_results, (const char *const *)req.item_ids);
out:
    transport_client_free(resp);
    filter_free(&fa);
    return rc;
}

static int parse_event_type(const char *s, Affinity__V1__EventType *t)
{
    static const struct {
        const char *name;
        Affinity__V1__EventType type;
    } names[] = {{"view", AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_VIEW},
                 {"click", AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CLICK},
                 {"cart", AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_ADD_TO_CART},
                 {"add_to_cart", AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_ADD_TO_CART},
                 {"purchase", AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_PURCHASE},
                 {"impression", AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_IMPRESSION}};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcasecmp(s, names[i].name) == 0) {
            *t = names[i].type;
            return 0;
        }
    return -1;
}

enum { OPT_USER = 1100, OPT_VECTOR, OPT_EXCLUDE_EVENTS, OPT_CANDIDATES, OPT_WEIGHT, OPT_SURFACE,
       OPT_RECIPE, OPT_ITEM };

static int cmd_recommend(cli *c, int argc, char **argv)
{
    static const struct option opts[] = {{"user", 1, 0, OPT_USER},
                                         {"vector", 1, 0, OPT_VECTOR},
                                         {"exclude-events", 1, 0, OPT_EXCLUDE_EVENTS},
                                         {"k", 1, 0, 'k'},
                                         {"space", 1, 0, OPT_SPACE},
                                         {"surface", 1, 0, OPT_SURFACE},
                                         {"recipe", 1, 0, OPT_RECIPE},
                                         {"item", 1, 0, OPT_ITEM},
                                         FILTER_OPTIONS,
                                         {0, 0, 0, 0}};
    filter_args fa;
    memset(&fa, 0, sizeof(fa));
    char *items[WIDGETS_MAX_CONTEXT + 1];
    Affinity__V1__RecommendRequest req = AFFINITY__V1__RECOMMEND_REQUEST__INIT;
    Affinity__V1__UserVector uv = AFFINITY__V1__USER_VECTOR__INIT;
    Affinity__V1__EventType excl[8];
    req.k = 10;
    float *vec = NULL;
    ProtobufCMessage *resp = NULL;
    int rc = 0, opt;
    optind = 0; /* 0: glibc re-initializes (permuting, fresh state) */
    while ((opt = getopt_long(argc, argv, "k:", opts, NULL)) != -1) {
        int f = filter_option(&fa, opt, optarg);
        if (f < 0) {
            rc = usage_error("bad filter value '%s'", optarg);
            goto out;
        }
        if (f) continue;
        switch (opt) {
        case OPT_USER:
            req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_ID;
            req.user_id = optarg;
            break;
        case OPT_VECTOR:
            free(vec);
            vec = NULL;
            if (parse_vector(optarg, &vec, &uv.n_values)) {
                rc = usage_error("bad --vector '%s'", optarg);
                goto out;
            }
            uv.values = vec;
            req.user_case = AFFINITY__V1__RECOMMEND_REQUEST__USER_USER_VECTOR;
            req.user_vector = &uv;
            break;
        case OPT_EXCLUDE_EVENTS: {
            char *save = NULL;
            for (char *t = strtok_r(optarg, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (req.n_exclude_event_types == 8 ||
                    parse_event_type(t, &excl[req.n_exclude_event_types])) {
                    rc = usage_error("bad --exclude-events type '%s'; use view, click, cart, "
                                     "purchase",
                                     t);
                    goto out;
                }
                req.n_exclude_event_types++;
            }
            req.exclude_event_types = excl;
            break;
        }
        case 'k':
            if (parse_u32(optarg, &req.k)) {
                rc = usage_error("bad -k '%s'", optarg);
                goto out;
            }
            break;
        case OPT_SPACE:
            if ((rc = parse_space(optarg, &req.space))) goto out;
            break;
        case OPT_SURFACE:
            req.surface = optarg;
            break;
        case OPT_RECIPE: {
            widgets_recipe r;
            if (!widgets_recipe_parse(optarg, &r)) {
                rc = usage_error("bad --recipe '%s'; use fbt (frequently_bought_together), "
                                 "also_viewed, also_bought, trending, buy_it_again, "
                                 "recently_viewed, best_sellers or personalized",
                                 optarg);
                goto out;
            }
            req.recipe = (Affinity__V1__Recipe)r;
            break;
        }
        case OPT_ITEM: /* more than the server takes are sent, so it names the limit */
            if (req.n_item_ids <= WIDGETS_MAX_CONTEXT) items[req.n_item_ids++] = optarg;
            req.item_ids = items;
            break;
        default:
            rc = EXIT_USAGE;
            goto out;
        }
    }
    if (optind != argc - 1 || (req.user_case == AFFINITY__V1__RECOMMEND_REQUEST__USER__NOT_SET &&
                               req.recipe == AFFINITY__V1__RECIPE__RECIPE_PERSONALIZED)) {
        rc = usage_error("usage: affinity recommend COLLECTION (--user ID | --vector V1,V2,... | "
                         "--recipe R [--item ID]... [--user ID]) [-k K] [--exclude-events "
                         "purchase,...] [--space content|behaviour] [filter flags]%s",
                         "");
        goto out;
    }
    req.collection = argv[optind];
    req.filter = filter_msg(&fa);
    if ((rc = call(c, TRANSPORT_METHOD_RECOMMEND, "Recommend", &req.base,
                   &affinity__v1__recommend_response__descriptor, &resp)))
        goto out;
    Affinity__V1__RecommendResponse *r = (Affinity__V1__RecommendResponse *)resp;
    if (c->json) {
        printf("{\"source\": \"%s\", \"recommendation_id\": ", source_name(r->source));
        jstr(r->recommendation_id);
        printf(", \"strategy\": ");
        jstr(r->strategy);
        printf(", \"experiment\": ");
        jstr(r->experiment);
        printf(", \"arm\": ");
        jstr(r->arm);
        printf(", \"hits\": ");
        print_hits(c, r->hits, r->n_hits);
        printf("}\n");
    } else {
        printf("source: %s  recommendation: %s  strategy: %s", source_name(r->source),
               r->recommendation_id, r->strategy);
        if (r->experiment[0]) printf("  experiment: %s  arm: %s", r->experiment, r->arm);
        printf("\n");
        print_hits(c, r->hits, r->n_hits);
    }
out:
    transport_client_free(resp);
    free(vec);
    filter_free(&fa);
    return rc;
}

static int cmd_rerank(cli *c, int argc, char **argv)
{
    static const struct option opts[] = {{"user", 1, 0, OPT_USER},
                                         {"vector", 1, 0, OPT_VECTOR},
                                         {"candidates", 1, 0, OPT_CANDIDATES},
                                         {"weight", 1, 0, OPT_WEIGHT},
                                         {0, 0, 0, 0}};
    Affinity__V1__RerankRequest req = AFFINITY__V1__RERANK_REQUEST__INIT;
    Affinity__V1__UserVector uv = AFFINITY__V1__USER_VECTOR__INIT;
    Affinity__V1__FloatValue weight = AFFINITY__V1__FLOAT_VALUE__INIT;
    Affinity__V1__RerankCandidate *cands = NULL;
    Affinity__V1__RerankCandidate **cptrs = NULL;
    size_t n = 0, cap = 0;
    float *vec = NULL;
    ProtobufCMessage *resp = NULL;
    int rc = 0, opt;
    optind = 0; /* 0: glibc re-initializes (permuting, fresh state) */
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case OPT_USER:
            req.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_ID;
            req.user_id = optarg;
            break;
        case OPT_VECTOR:
            free(vec);
            vec = NULL;
            if (parse_vector(optarg, &vec, &uv.n_values)) {
                rc = usage_error("bad --vector '%s'", optarg);
                goto out;
            }
            uv.values = vec;
            req.user_case = AFFINITY__V1__RERANK_REQUEST__USER_USER_VECTOR;
            req.user_vector = &uv;
            break;
        case OPT_WEIGHT:
            if (parse_float(optarg, &weight.value)) {
                rc = usage_error("bad --weight '%s'; 0..1", optarg);
                goto out;
            }
            req.affinity_weight = &weight;
            break;
        case OPT_CANDIDATES: {
            /* id[:base_score],... */
            char *save = NULL;
            for (char *t = strtok_r(optarg, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (n == cap) {
                    cap = cap ? cap * 2 : 16;
                    Affinity__V1__RerankCandidate *nc = realloc(cands, cap * sizeof(*nc));
                    if (!nc) {
                        rc = EXIT_USAGE;
                        goto out;
                    }
                    cands = nc;
                }
                Affinity__V1__RerankCandidate init = AFFINITY__V1__RERANK_CANDIDATE__INIT;
                cands[n] = init;
                char *colon = strrchr(t, ':');
                if (colon && parse_float(colon + 1, &cands[n].base_score) == 0) *colon = '\0';
                cands[n].id = t;
                n++;
            }
            break;
        }
        default:
            rc = EXIT_USAGE;
            goto out;
        }
    }
    if (optind != argc - 1 || n == 0 ||
        req.user_case == AFFINITY__V1__RERANK_REQUEST__USER__NOT_SET) {
        rc = usage_error("usage: affinity rerank COLLECTION (--user ID | --vector V1,V2,...) "
                         "--candidates ID[:SCORE],... [--weight W]%s",
                         "");
        goto out;
    }
    cptrs = calloc(n, sizeof(*cptrs));
    if (!cptrs) {
        rc = EXIT_USAGE;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        cptrs[i] = &cands[i];
    req.collection = argv[optind];
    req.n_candidates = n;
    req.candidates = cptrs;
    if ((rc = call(c, TRANSPORT_METHOD_RERANK, "Rerank", &req.base,
                   &affinity__v1__rerank_response__descriptor, &resp)))
        goto out;
    Affinity__V1__RerankResponse *r = (Affinity__V1__RerankResponse *)resp;
    if (c->json) {
        printf("{\"source\": \"%s\", \"items\": [", source_name(r->source));
        for (size_t i = 0; i < r->n_items; i++) {
            const Affinity__V1__RerankedItem *it = r->items[i];
            printf("%s{\"id\": ", i ? ", " : "");
            jstr(it->id);
            printf(", \"score\": ");
            jfloat(it->score);
            printf(", \"base_score\": ");
            jfloat(it->base_score);
            printf(", \"affinity\": ");
            jfloat(it->affinity);
            printf(", \"found\": %s}", it->found ? "true" : "false");
        }
        printf("]}\n");
    } else {
        printf("source: %s\n  rank  %-32s %10s %10s %10s\n", source_name(r->source), "id", "score",
               "base", "affinity");
        for (size_t i = 0; i < r->n_items; i++) {
            const Affinity__V1__RerankedItem *it = r->items[i];
            printf("  %4zu  %-32s %10.6f %10.6f %10.6f%s\n", i + 1, it->id, (double)it->score,
                   (double)it->base_score, (double)it->affinity, it->found ? "" : "  (not found)");
        }
    }
out:
    transport_client_free(resp);
    free(vec);
    free(cands);
    free(cptrs);
    return rc;
}

/* ---- behaviour and users ------------------------------------------------------------------ */

static int cmd_events_import(cli *c, int argc, char **argv);

static int cmd_events(cli *c, int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "import") == 0)
        return cmd_events_import(c, argc - 1, argv + 1);
    if (argc < 4)
        return usage_error("usage: affinity events COLLECTION USER TYPE:ITEM_ID... "
                           "(TYPE: view, click, cart, purchase, or custom=NAME)%s",
                           "");
    size_t n = (size_t)(argc - 3);
    Affinity__V1__Event *evs = calloc(n, sizeof(*evs));
    Affinity__V1__Event **eps = calloc(n, sizeof(*eps));
    ProtobufCMessage *resp = NULL;
    int rc = 0;
    if (!evs || !eps) {
        rc = EXIT_USAGE;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        Affinity__V1__Event init = AFFINITY__V1__EVENT__INIT;
        evs[i] = init;
        char *arg = argv[3 + i];
        char *colon = strchr(arg, ':');
        if (!colon || colon[1] == '\0') {
            rc = usage_error("bad event '%s'; use TYPE:ITEM_ID, e.g. view:item-1", arg);
            goto out;
        }
        *colon = '\0';
        if (strncmp(arg, "custom=", 7) == 0) {
            evs[i].type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CUSTOM;
            evs[i].custom_type = arg + 7;
        } else if (parse_event_type(arg, &evs[i].type)) {
            rc = usage_error("bad event type '%s'; use view, click, cart, purchase or "
                             "custom=NAME",
                             arg);
            goto out;
        }
        evs[i].item_id = colon + 1;
        /* ITEM_ID@RECOMMENDATION_ID: the response that showed the item (32 hex digits) */
        char *at = strrchr(colon + 1, '@');
        if (at && strlen(at + 1) == 32 && strspn(at + 1, "0123456789abcdefABCDEF") == 32) {
            *at = '\0';
            evs[i].recommendation_id = at + 1;
        }
        eps[i] = &evs[i];
    }
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = argv[1];
    req.user_id = argv[2];
    req.n_events = n;
    req.events = eps;
    if ((rc = call(c, TRANSPORT_METHOD_PUT_EVENTS, "PutEvents", &req.base,
                   &affinity__v1__put_events_response__descriptor, &resp)))
        goto out;
    Affinity__V1__PutEventsResponse *r = (Affinity__V1__PutEventsResponse *)resp;
    if (c->json) {
        printf("{\"applied\": %u, \"rejected\": [", r->applied_count);
        for (size_t i = 0; i < r->n_rejected; i++) {
            printf("%s{\"index\": %u, \"reason\": ", i ? ", " : "", r->rejected[i]->index);
            jstr(r->rejected[i]->reason);
            printf("}");
        }
        printf("]}\n");
    } else {
        printf("applied %u of %zu events\n", r->applied_count, n);
        for (size_t i = 0; i < r->n_rejected; i++)
            printf("  rejected #%u: %s\n", r->rejected[i]->index, r->rejected[i]->reason);
    }
    if (r->n_rejected) rc = EXIT_RPC; /* some events were not stored: say so to scripts */
out:
    transport_client_free(resp);
    free(evs);
    free(eps);
    return rc;
}

/* ---- events import ------------------------------------------------------------------------- */

#define IMPORT_MAX_MALFORMED_LISTED 1000 /* malformed lines kept for --json output */

typedef struct import_malformed {
    uint64_t line;
    char reason[256];
} import_malformed;

typedef struct import_run {
    const char *path;
    eventfile_reader *reader;
    transport_client_stream *stream;
    uint32_t batch;
    bool show_progress, tty;
    event_record *recs;
    Affinity__V1__Event *evs;
    Affinity__V1__ImportedEvent *ies;
    Affinity__V1__ImportedEvent **ie_ptrs;
    /* Stream index -> file line, kept compact: the line of event i is i + the offset of the
     * last jump at or before i; a jump is recorded only where blank or malformed lines (or
     * the header) shift lines against indices, so memory does not grow with the events. */
    struct line_jump {
        uint64_t index, offset;
    } * jumps;
    size_t n_jumps, cap_jumps;
    uint64_t n_lines; /* events read and sent so far */
    uint64_t n_malformed;
    import_malformed *malformed; /* the first IMPORT_MAX_MALFORMED_LISTED */
    double t0, last_report;
} import_run;

static void import_progress(import_run *r, bool final)
{
    double now = mono_s();
    if (!r->show_progress) return;
    if (!final && now - r->last_report < (r->tty ? 0.1 : 5.0)) return;
    r->last_report = now;
    double secs = now - r->t0;
    uint64_t size = eventfile_size(r->reader), done = eventfile_offset(r->reader);
    double frac = size ? (double)done / (double)size : 0.0;
    double rate = secs > 0 ? (double)r->n_lines / secs : 0.0;
    if (r->tty) {
        int width = 30, fill = (int)(frac * width);
        fprintf(stderr, "\r[");
        for (int i = 0; i < width; i++)
            fputc(i < fill ? '#' : ' ', stderr);
        fprintf(stderr, "] %3.0f%%  %llu events sent  %.0f events/s", frac * 100,
                (unsigned long long)r->n_lines, rate);
        if (r->n_malformed) fprintf(stderr, "  %llu malformed", (unsigned long long)r->n_malformed);
        if (final) fputc('\n', stderr);
    } else {
        fprintf(stderr, "affinity: %s: %3.0f%%, %llu events sent, %.0f events/s\n", r->path,
                frac * 100, (unsigned long long)r->n_lines, rate);
    }
    fflush(stderr);
}

/* Fills ImportedEvent i of the message from record i. */
static void import_fill(import_run *r, size_t i)
{
    event_record *rec = &r->recs[i];
    Affinity__V1__Event *e = &r->evs[i];
    affinity__v1__event__init(e);
    e->item_id = rec->item_id;
    if (parse_event_type(rec->type, &e->type)) {
        e->type = AFFINITY__V1__EVENT_TYPE__EVENT_TYPE_CUSTOM;
        e->custom_type = rec->type;
    }
    e->timestamp_ms = rec->timestamp_ms;
    e->value = rec->value;
    affinity__v1__imported_event__init(&r->ies[i]);
    r->ies[i].user_id = rec->user_id;
    r->ies[i].event = e;
    r->ie_ptrs[i] = &r->ies[i];
}

/* Reads up to r->batch records, reporting malformed lines; *n: records read. Returns 0 or
 * EXIT_USAGE when the file cannot be read. */
static int import_read_batch(const cli *c, import_run *r, size_t *n)
{
    *n = 0;
    while (*n < r->batch) {
        aff_err err = {0};
        int got = eventfile_next(r->reader, &r->recs[*n], &err);
        if (got == 0) break;
        if (got == AFF_EINVAL) {
            uint64_t line = eventfile_line(r->reader);
            if (r->n_malformed < IMPORT_MAX_MALFORMED_LISTED) {
                r->malformed[r->n_malformed].line = line;
                snprintf(r->malformed[r->n_malformed].reason,
                         sizeof r->malformed[r->n_malformed].reason, "%s", err.msg);
            }
            r->n_malformed++;
            if (!c->json) {
                if (r->tty && r->show_progress) fputc('\n', stderr);
                fprintf(stderr, "affinity: %s:%llu: malformed, not sent: %s\n", r->path,
                        (unsigned long long)line, err.msg);
            }
            continue;
        }
        if (got < 0) {
            fprintf(stderr, "\naffinity: %s\n", err.msg);
            return EXIT_USAGE;
        }
        uint64_t offset = eventfile_line(r->reader) - r->n_lines;
        if (!r->n_jumps || r->jumps[r->n_jumps - 1].offset != offset) {
            if (r->n_jumps == r->cap_jumps) {
                size_t cap = r->cap_jumps ? r->cap_jumps * 2 : 64;
                struct line_jump *nj = realloc(r->jumps, cap * sizeof *nj);
                if (!nj) {
                    fprintf(stderr, "affinity: out of memory\n");
                    return EXIT_USAGE;
                }
                r->jumps = nj;
                r->cap_jumps = cap;
            }
            r->jumps[r->n_jumps++] = (struct line_jump){r->n_lines, offset};
        }
        r->n_lines++;
        import_fill(r, *n);
        (*n)++;
    }
    return 0;
}

/* The file line of stream event index (0 when out of range). */
static uint64_t import_line_of(const import_run *r, uint64_t index)
{
    if (index >= r->n_lines || !r->n_jumps) return 0;
    size_t lo = 0, hi = r->n_jumps; /* the last jump with jump.index <= index */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (r->jumps[mid].index <= index)
            lo = mid;
        else
            hi = mid;
    }
    return index + r->jumps[lo].offset;
}

static void import_print(const cli *c, const import_run *r, const char *collection,
                         const Affinity__V1__ImportEventsResponse *resp, double secs)
{
    double rate = secs > 0 ? (double)resp->applied_count / secs : 0.0;
    if (c->json) {
        printf("{\"collection\": ");
        jstr(collection);
        printf(", \"sent\": %llu, \"applied\": %llu, \"rejected_count\": %llu, "
               "\"malformed_count\": %llu, \"seconds\": %.3f, \"events_per_second\": %.1f, "
               "\"rejected\": [",
               (unsigned long long)r->n_lines, (unsigned long long)resp->applied_count,
               (unsigned long long)resp->rejected_count, (unsigned long long)r->n_malformed, secs,
               rate);
        for (size_t i = 0; i < resp->n_rejected; i++) {
            const Affinity__V1__ImportRejection *x = resp->rejected[i];
            uint64_t line = import_line_of(r, x->index);
            printf("%s{\"line\": %llu, \"index\": %llu, \"user_id\": ", i ? ", " : "",
                   (unsigned long long)line, (unsigned long long)x->index);
            jstr(x->user_id);
            printf(", \"reason\": ");
            jstr(x->reason);
            printf("}");
        }
        printf("], \"malformed\": [");
        uint64_t listed = r->n_malformed < IMPORT_MAX_MALFORMED_LISTED
                              ? r->n_malformed
                              : IMPORT_MAX_MALFORMED_LISTED;
        for (uint64_t i = 0; i < listed; i++) {
            printf("%s{\"line\": %llu, \"reason\": ", i ? ", " : "",
                   (unsigned long long)r->malformed[i].line);
            jstr(r->malformed[i].reason);
            printf("}");
        }
        printf("]}\n");
        return;
    }
    printf("imported %llu of %llu events into %s in %.2f s (%.0f events/s)",
           (unsigned long long)resp->applied_count, (unsigned long long)r->n_lines, collection,
           secs, rate);
    if (resp->rejected_count) printf("; %llu rejected", (unsigned long long)resp->rejected_count);
    if (r->n_malformed)
        printf("; %llu malformed lines not sent", (unsigned long long)r->n_malformed);
    printf("\n");
    for (size_t i = 0; i < resp->n_rejected; i++) {
        const Affinity__V1__ImportRejection *x = resp->rejected[i];
        uint64_t line = import_line_of(r, x->index);
        printf("  %s:%llu: rejected (user %s): %s\n", r->path, (unsigned long long)line, x->user_id,
               x->reason);
    }
    if (resp->rejected_count > resp->n_rejected)
        printf("  ... and %llu more rejected (the server lists the first %zu)\n",
               (unsigned long long)(resp->rejected_count - resp->n_rejected), resp->n_rejected);
}

static int cmd_events_import(cli *c, int argc, char **argv)
{
    static const struct option opts[] = {{"format", 1, 0, 'f'},
                                         {"batch", 1, 0, 'b'},
                                         {"progress", 0, 0, 'P'},
                                         {"no-progress", 0, 0, 'N'},
                                         {0, 0, 0, 0}};
    eventfile_format format = EVENTFILE_AUTO;
    import_run r = {.batch = 10000}; /* the most a message may carry: fewest commits */
    int show_progress = -1, opt;
    optind = 0; /* 0: glibc re-initializes (permuting, fresh state) */
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'f':
            if (strcasecmp(optarg, "csv") == 0)
                format = EVENTFILE_CSV;
            else if (strcasecmp(optarg, "jsonl") == 0 || strcasecmp(optarg, "ndjson") == 0)
                format = EVENTFILE_JSONL;
            else
                return usage_error("bad --format '%s'; use csv or jsonl", optarg);
            break;
        case 'b':
            if (parse_u32(optarg, &r.batch) || r.batch == 0 || r.batch > 10000)
                return usage_error("bad --batch '%s'; 1..10000 events per message", optarg);
            break;
        case 'P':
            show_progress = 1;
            break;
        case 'N':
            show_progress = 0;
            break;
        default:
            return EXIT_USAGE;
        }
    }
    if (optind != argc - 2)
        return usage_error("usage: affinity events import COLLECTION FILE [--format csv|jsonl] "
                           "[--batch N] [--progress|--no-progress]%s",
                           "");
    const char *collection = argv[optind];
    r.path = argv[optind + 1];
    r.tty = isatty(2);
    r.show_progress = show_progress < 0 ? true : show_progress == 1;
    if (show_progress < 0 && c->json && r.tty) r.show_progress = false;

    ProtobufCMessage *resp = NULL;
    aff_err err = {0};
    int rc = 0;
    if (eventfile_open(&r.reader, r.path, format, &err) != 0) {
        fprintf(stderr, "affinity: %s\n", err.msg);
        rc = EXIT_USAGE;
        goto out;
    }
    r.recs = malloc(r.batch * sizeof *r.recs);
    r.evs = calloc(r.batch, sizeof *r.evs);
    r.ies = calloc(r.batch, sizeof *r.ies);
    r.ie_ptrs = calloc(r.batch, sizeof *r.ie_ptrs);
    r.malformed = calloc(IMPORT_MAX_MALFORMED_LISTED, sizeof *r.malformed);
    if (!r.recs || !r.evs || !r.ies || !r.ie_ptrs || !r.malformed) {
        fprintf(stderr, "affinity: out of memory\n");
        rc = EXIT_USAGE;
        goto out;
    }
    if ((rc = connect_client(c))) goto out;
    /* A bulk import may take long: the stream gets a day unless --timeout-ms says more. */
    uint32_t stream_ms = c->opts.timeout_ms > 86400000 ? c->opts.timeout_ms : 86400000;
    if (transport_client_stream_open(c->client, TRANSPORT_METHOD_IMPORT_EVENTS, stream_ms,
                                     &r.stream, &err) != 0) {
        fprintf(stderr, "affinity: %s\n", err.msg);
        rc = EXIT_RPC;
        goto out;
    }
    r.t0 = mono_s();
    for (;;) {
        size_t n;
        if ((rc = import_read_batch(c, &r, &n))) goto out;
        if (n == 0) break;
        Affinity__V1__ImportEventsRequest req = AFFINITY__V1__IMPORT_EVENTS_REQUEST__INIT;
        req.collection = (char *)collection;
        req.n_events = n;
        req.events = r.ie_ptrs;
        if (transport_client_stream_send(r.stream, &req.base, &err) != 0)
            break; /* the server ended the call; finish() says why */
        import_progress(&r, false);
    }
    transport_call_status st = {0};
    int frc = transport_client_stream_finish(
        r.stream, &affinity__v1__import_events_response__descriptor, &resp, &st);
    double secs = mono_s() - r.t0;
    import_progress(&r, true);
    if (frc != 0) {
        rc = report_rpc_error(c, "ImportEvents", frc, &st);
        goto out;
    }
    const Affinity__V1__ImportEventsResponse *ir = (const void *)resp;
    import_print(c, &r, collection, ir, secs);
    rc = r.n_malformed ? EXIT_USAGE : ir->rejected_count ? EXIT_RPC : 0;
out:
    transport_client_free(resp);
    transport_client_stream_destroy(r.stream);
    eventfile_close(r.reader);
    free(r.recs);
    free(r.evs);
    free(r.ies);
    free(r.ie_ptrs);
    free(r.jumps);
    free(r.malformed);
    return rc;
}

static int cmd_user(cli *c, int argc, char **argv)
{
    const char *sub = argc > 1 ? argv[1] : "";
    ProtobufCMessage *resp = NULL;
    int rc;
    if (strcmp(sub, "get") == 0 && argc == 4) {
        Affinity__V1__GetUserRequest req = AFFINITY__V1__GET_USER_REQUEST__INIT;
        req.collection = argv[2];
        req.user_id = argv[3];
        if ((rc = call(c, TRANSPORT_METHOD_GET_USER, "GetUser", &req.base,
                       &affinity__v1__get_user_response__descriptor, &resp)))
            return rc;
        Affinity__V1__GetUserResponse *r = (Affinity__V1__GetUserResponse *)resp;
        if (c->json) {
            printf("{\"user_id\": ");
            jstr(r->user_id);
            printf(", \"history_length\": %u, \"last_event_ms\": %lld, \"event_counts\": {",
                   r->history_length, (long long)r->last_event_ms);
            for (size_t i = 0; i < r->n_event_counts; i++) {
                printf("%s", i ? ", " : "");
                jstr(r->event_counts[i]->key);
                printf(": %llu", (unsigned long long)r->event_counts[i]->value);
            }
            printf("}, \"top_categories\": [");
            for (size_t i = 0; i < r->n_top_categories; i++) {
                printf("%s{\"category\": ", i ? ", " : "");
                jstr(r->top_categories[i]->category);
                printf(", \"weight\": ");
                jfloat(r->top_categories[i]->weight);
                printf("}");
            }
            printf("]}\n");
        } else {
            char when[64] = "never";
            time_t secs = (time_t)(r->last_event_ms / 1000);
            struct tm tm;
            if (r->last_event_ms > 0 && gmtime_r(&secs, &tm))
                snprintf(when, sizeof when, "%04d-%02d-%02d %02d:%02d:%02d UTC", tm.tm_year + 1900,
                         tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
            printf("user %s: %u events in history, last at %s\n", r->user_id, r->history_length,
                   when);
            for (size_t i = 0; i < r->n_event_counts; i++)
                printf("  %-12s %llu\n", r->event_counts[i]->key,
                       (unsigned long long)r->event_counts[i]->value);
            for (size_t i = 0; i < r->n_top_categories; i++)
                printf("  category %-20s %.4f\n", r->top_categories[i]->category,
                       (double)r->top_categories[i]->weight);
        }
        transport_client_free(resp);
        return 0;
    }
    if (strcmp(sub, "delete") == 0 && (argc == 3 || argc == 4)) {
        Affinity__V1__DeleteUserRequest req = AFFINITY__V1__DELETE_USER_REQUEST__INIT;
        req.user_id = argv[argc - 1];
        if (argc == 4) req.collection = argv[2];
        if ((rc = call(c, TRANSPORT_METHOD_DELETE_USER, "DeleteUser", &req.base,
                       &affinity__v1__delete_user_response__descriptor, &resp)))
            return rc;
        bool existed = ((Affinity__V1__DeleteUserResponse *)resp)->existed;
        if (c->json)
            printf("{\"existed\": %s}\n", existed ? "true" : "false");
        else
            printf("%s %s\n", existed ? "deleted user" : "no such user", req.user_id);
        transport_client_free(resp);
        return 0;
    }
    return usage_error("usage: affinity user get COLLECTION USER | affinity user delete "
                       "[COLLECTION] USER%s",
                       "");
}

/* ---- learning ------------------------------------------------------------------------------ */

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Shows a running job on stderr: a bar redrawn in place on a terminal, otherwise one line each
 * time the epoch changes. *shown: the last epoch shown (UINT32_MAX: none yet). */
static void train_progress(const char *collection, const Affinity__V1__TrainingJob *j, double secs,
                           bool tty, uint32_t *shown, bool final)
{
    if (tty) {
        int width = 30;
        double frac = j->epochs ? (double)j->epoch / (double)j->epochs : 0.0;
        int fill = (int)(frac * width);
        fprintf(stderr, "\r[");
        for (int i = 0; i < width; i++)
            fputc(i < fill ? '#' : ' ', stderr);
        fprintf(stderr, "] epoch %u/%u  loss %-10.6g  %.1f s", j->epoch, j->epochs, j->loss, secs);
        if (final) fputc('\n', stderr);
    } else if (j->epoch != *shown) {
        fprintf(stderr, "affinity: training %s: epoch %u/%u, loss %.6g, %.1f s\n", collection,
                j->epoch, j->epochs, j->loss, secs);
    }
    *shown = j->epoch;
    fflush(stderr);
}

/* GetModel for collection into *out (free with transport_client_free); 0 or the exit status. */
static int get_model(cli *c, const char *collection, Affinity__V1__ModelInfo **out)
{
    Affinity__V1__GetModelRequest req = AFFINITY__V1__GET_MODEL_REQUEST__INIT;
    req.collection = (char *)collection;
    ProtobufCMessage *resp = NULL;
    int rc = call(c, TRANSPORT_METHOD_GET_MODEL, "GetModel", &req.base,
                  &affinity__v1__model_info__descriptor, &resp);
    *out = (Affinity__V1__ModelInfo *)resp;
    return rc;
}

static int cmd_train(cli *c, int argc, char **argv)
{
    enum { OPT_SAVE = 1, OPT_WAIT, OPT_NO_WAIT, OPT_PROGRESS, OPT_NO_PROGRESS };
    static const struct option opts[] = {{"save", 0, 0, OPT_SAVE},
                                         {"wait", 0, 0, OPT_WAIT},
                                         {"no-wait", 0, 0, OPT_NO_WAIT},
                                         {"progress", 0, 0, OPT_PROGRESS},
                                         {"no-progress", 0, 0, OPT_NO_PROGRESS},
                                         MODEL_OPTIONS,
                                         {0, 0, 0, 0}};
    Affinity__V1__TrainRequest req = AFFINITY__V1__TRAIN_REQUEST__INIT;
    model_flags mf;
    model_flags_init(&mf);
    bool wait = true;
    int show_progress = -1, opt;
    optind = 0; /* 0: glibc re-initializes (permuting, fresh state) */
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int mo = model_option(&mf, opt, optarg);
        if (mo < 0) return EXIT_USAGE;
        if (mo) continue;
        switch (opt) {
        case OPT_SAVE:
            req.save_params = 1;
            break;
        case OPT_WAIT:
            wait = true;
            break;
        case OPT_NO_WAIT:
            wait = false;
            break;
        case OPT_PROGRESS:
            show_progress = 1;
            break;
        case OPT_NO_PROGRESS:
            show_progress = 0;
            break;
        default:
            return EXIT_USAGE;
        }
    }
    if (optind != argc - 1)
        return usage_error("usage: affinity train COLLECTION " MODEL_FLAGS_USAGE
                           " [--save] [--wait|--no-wait] [--progress|--no-progress]%s",
                           "");
    const char *collection = argv[optind];
    bool tty = isatty(2);
    if (show_progress < 0) show_progress = !(c->json && tty);
    req.collection = (char *)collection;
    req.params = model_flags_msg(&mf);

    ProtobufCMessage *resp = NULL;
    Affinity__V1__ModelInfo *mi = NULL;
    double t0 = mono_s();
    int rc = call(c, TRANSPORT_METHOD_TRAIN, "Train", &req.base,
                  &affinity__v1__train_response__descriptor, &resp);
    if (rc) return rc;
    const Affinity__V1__TrainResponse *tr = (const void *)resp;
    uint64_t job_id = tr->job_id;
    if (tr->already_running)
        fprintf(stderr,
                "affinity: job #%llu was already training %s; %s it (it does not use this "
                "call's parameters%s)\n",
                (unsigned long long)job_id, collection, wait ? "following" : "not starting",
                req.save_params ? "; they were saved for the next job" : "");
    if (!wait) {
        if (c->json) {
            printf("{\"job_id\": %llu, \"already_running\": %s, \"model\": ",
                   (unsigned long long)job_id, tr->already_running ? "true" : "false");
            if (tr->model)
                print_model_json(tr->model);
            else
                printf("null");
            printf("}\n");
        } else {
            printf("training %s: job %llu%s\n", collection, (unsigned long long)job_id,
                   tr->already_running ? " (already running)" : "");
        }
        goto out;
    }
    /* Poll until our job is no longer the running one. */
    uint32_t shown = UINT32_MAX;
    const Affinity__V1__TrainingJob *j = NULL;
    for (;;) {
        transport_client_free(mi ? &mi->base : NULL);
        mi = NULL;
        if ((rc = get_model(c, collection, &mi))) {
            if (show_progress && tty && shown != UINT32_MAX) fputc('\n', stderr);
            goto out;
        }
        j = mi->job;
        bool ours = j && j->id == job_id;
        if (!ours || !j->running) break;
        if (show_progress) train_progress(collection, j, mono_s() - t0, tty, &shown, false);
        sleep_ms(200);
    }
    bool ours = j && j->id == job_id;
    if (show_progress && ours) train_progress(collection, j, mono_s() - t0, tty, &shown, true);
    bool failed = ours && j->error && j->error[0];
    if (c->json) {
        print_model_json(mi);
        printf("\n");
    } else if (!failed) {
        printf("trained %s: model version %llu from %llu events (%llu users, %llu items), %u "
               "epochs, loss %.6g, %.3f s\n",
               collection, (unsigned long long)mi->version, (unsigned long long)mi->events_used,
               (unsigned long long)mi->users, (unsigned long long)mi->items, mi->epochs, mi->loss,
               mi->duration_s);
    }
    if (failed) {
        fprintf(stderr, "affinity: training %s (job %llu) failed: %s\n", collection,
                (unsigned long long)job_id, j->error);
        rc = EXIT_RPC;
    }
out:
    transport_client_free(mi ? &mi->base : NULL);
    transport_client_free(resp);
    return rc;
}

static int cmd_model(cli *c, int argc, char **argv)
{
    if (argc != 3 || strcmp(argv[1], "get") != 0)
        return usage_error("usage: affinity model get COLLECTION%s", "");
    Affinity__V1__ModelInfo *mi = NULL;
    int rc = get_model(c, argv[2], &mi);
    if (rc) return rc;
    if (c->json) {
        print_model_json(mi);
        printf("\n");
    } else {
        printf("model of %s:\n", argv[2]);
        print_model_text(mi, "  ");
    }
    transport_client_free(&mi->base);
    return 0;
}

static int cmd_segment(cli *c, int argc, char **argv)
{
    static const struct option opts[] = {{"k", 1, 0, 'k'}, {0, 0, 0, 0}};
    Affinity__V1__GetSegmentRequest req = AFFINITY__V1__GET_SEGMENT_REQUEST__INIT;
    req.k = 10;
    int opt;
    optind = 0; /* 0: glibc re-initializes (permuting, fresh state) */
    while ((opt = getopt_long(argc, argv, "k:", opts, NULL)) != -1) {
        if (opt != 'k') return EXIT_USAGE;
        if (parse_u32(optarg, &req.k)) return usage_error("bad -k '%s'", optarg);
    }
    if (argc - optind < 2)
        return usage_error("usage: affinity segment COLLECTION ITEM_ID... [-k K]%s", "");
    req.collection = argv[optind];
    req.n_item_ids = (size_t)(argc - optind - 1);
    req.item_ids = argv + optind + 1;
    ProtobufCMessage *resp = NULL;
    int rc = call(c, TRANSPORT_METHOD_GET_SEGMENT, "GetSegment", &req.base,
                  &affinity__v1__get_segment_response__descriptor, &resp);
    if (rc) return rc;
    const Affinity__V1__GetSegmentResponse *r = (const void *)resp;
    if (c->json) {
        printf("{\"model_version\": %llu, \"users\": [", (unsigned long long)r->model_version);
        for (size_t i = 0; i < r->n_users; i++) {
            printf("%s{\"user_id\": ", i ? ", " : "");
            jstr(r->users[i]->user_id);
            printf(", \"score\": ");
            jfloat(r->users[i]->score);
            printf("}");
        }
        printf("]}\n");
    } else {
        printf("model version %llu\n", (unsigned long long)r->model_version);
        if (r->n_users == 0) printf("  (no users)\n");
        for (size_t i = 0; i < r->n_users; i++)
            printf("  %3zu  %-32s %10.6f\n", i + 1, r->users[i]->user_id,
                   (double)r->users[i]->score);
    }
    transport_client_free(resp);
    return 0;
}

/* ---- measurement: outcome metrics and experiments ------------------------------------------- */

/* "90s", "30m", "6h", "2d" (or plain seconds) into milliseconds; -1 when malformed. */
static int64_t parse_duration_ms(const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0)) return -1;
    double unit = 1000.0;
    if (*end == 's')
        unit = 1000.0, end++;
    else if (*end == 'm')
        unit = 60000.0, end++;
    else if (*end == 'h')
        unit = 3600000.0, end++;
    else if (*end == 'd')
        unit = 86400000.0, end++;
    if (*end) return -1;
    return (int64_t)(v * unit);
}

static void print_interval_json(const Affinity__V1__Interval *iv)
{
    printf("[");
    jfloat(iv ? iv->low : 0);
    printf(", ");
    jfloat(iv ? iv->high : 0);
    printf("]");
}

static void print_stats_row_json(const Affinity__V1__StatsRow *r)
{
    printf("{\"collection\": ");
    jstr(r->collection);
    printf(", \"surface\": ");
    jstr(r->surface);
    printf(", \"strategy\": ");
    jstr(r->strategy);
    printf(", \"experiment\": ");
    jstr(r->experiment);
    printf(", \"arm\": ");
    jstr(r->arm);
    printf(", \"responses\": %llu, \"impressions\": %llu, \"clicks\": %llu, \"add_to_carts\": "
           "%llu, \"purchases\": %llu, \"revenue\": ",
           (unsigned long long)r->responses, (unsigned long long)r->impressions,
           (unsigned long long)r->clicks, (unsigned long long)r->add_to_carts,
           (unsigned long long)r->purchases);
    jfloat(r->revenue);
    printf(", \"ctr\": ");
    jfloat(r->ctr);
    printf(", \"ctr_interval\": ");
    print_interval_json(r->ctr_interval);
    printf(", \"add_to_cart_rate\": ");
    jfloat(r->add_to_cart_rate);
    printf(", \"conversion_rate\": ");
    jfloat(r->conversion_rate);
    printf(", \"conversion_interval\": ");
    print_interval_json(r->conversion_interval);
    printf(", \"revenue_per_mille\": ");
    jfloat(r->revenue_per_mille);
    printf("}");
}

static void print_stats_header(void)
{
    printf("  %-14s %-12s %-12s %-12s %-10s %8s %8s %7s %8s %16s %7s %8s %10s\n", "collection",
           "surface", "strategy", "experiment", "arm", "served", "impr", "clicks", "CTR",
           "CTR 95% CI", "purch", "conv", "RPM");
}

static void print_stats_row_text(const Affinity__V1__StatsRow *r)
{
    printf("  %-14s %-12s %-12s %-12s %-10s %8llu %8llu %7llu %7.3f%% %6.2f-%6.2f%% %7llu "
           "%7.3f%% %10.2f\n",
           r->collection, r->surface[0] ? r->surface : "-", r->strategy,
           r->experiment[0] ? r->experiment : "-", r->arm[0] ? r->arm : "-",
           (unsigned long long)r->responses, (unsigned long long)r->impressions,
           (unsigned long long)r->clicks, 100 * r->ctr,
           100 * (r->ctr_interval ? r->ctr_interval->low : 0),
           100 * (r->ctr_interval ? r->ctr_interval->high : 0), (unsigned long long)r->purchases,
           100 * r->conversion_rate, r->revenue_per_mille);
}

static int cmd_stats(cli *c, int argc, char **argv)
{
    enum { OPT_SURF = 1, OPT_EXP, OPT_SINCE };
    static const struct option opts[] = {{"surface", 1, 0, OPT_SURF},
                                         {"experiment", 1, 0, OPT_EXP},
                                         {"since", 1, 0, OPT_SINCE},
                                         {0, 0, 0, 0}};
    Affinity__V1__GetStatsRequest req = AFFINITY__V1__GET_STATS_REQUEST__INIT;
    int opt;
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (opt == OPT_SURF) {
            req.surface = optarg;
        } else if (opt == OPT_EXP) {
            req.experiment = optarg;
        } else if (opt == OPT_SINCE) {
            int64_t ms = parse_duration_ms(optarg);
            if (ms < 0) return usage_error("bad --since '%s'; e.g. 90s, 30m, 6h, 1d", optarg);
            struct timespec now;
            clock_gettime(CLOCK_REALTIME, &now);
            req.from_ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000 - ms;
            if (req.from_ms < 1) req.from_ms = 1;
        } else {
            return EXIT_USAGE;
        }
    }
    if (argc - optind > 1)
        return usage_error("usage: affinity stats [COLLECTION] [--surface S] [--experiment E] "
                           "[--since 1h]%s",
                           "");
    if (optind < argc) req.collection = argv[optind];
    ProtobufCMessage *resp = NULL;
    int rc = call(c, TRANSPORT_METHOD_GET_STATS, "GetStats", &req.base,
                  &affinity__v1__get_stats_response__descriptor, &resp);
    if (rc) return rc;
    const Affinity__V1__GetStatsResponse *r = (const void *)resp;
    if (c->json) {
        printf("{\"from_ms\": %lld, \"to_ms\": %lld, \"unattributed\": {", (long long)r->from_ms,
               (long long)r->to_ms);
        for (size_t i = 0; i < r->n_unattributed; i++) {
            printf("%s", i ? ", " : "");
            jstr(r->unattributed[i]->key);
            printf(": %llu", (unsigned long long)r->unattributed[i]->value);
        }
        printf("}, \"rows\": [");
        for (size_t i = 0; i < r->n_rows; i++) {
            printf("%s", i ? ", " : "");
            print_stats_row_json(r->rows[i]);
        }
        printf("]}\n");
    } else {
        print_stats_header();
        for (size_t i = 0; i < r->n_rows; i++)
            print_stats_row_text(r->rows[i]);
        if (!r->n_rows) printf("  (no recommendations served in the range)\n");
        printf("unattributed:");
        for (size_t i = 0; i < r->n_unattributed; i++)
            printf(" %s %llu", r->unattributed[i]->key,
                   (unsigned long long)r->unattributed[i]->value);
        printf("\n");
    }
    transport_client_free(resp);
    return 0;
}

static void print_experiment(const cli *c, const Affinity__V1__ExperimentResult *x)
{
    const Affinity__V1__Experiment *e = x->experiment;
    if (c->json) {
        printf("{\"id\": ");
        jstr(e->id);
        printf(", \"collection\": ");
        jstr(e->collection);
        printf(", \"surface\": ");
        jstr(e->surface);
        printf(", \"running\": %s, \"created_ms\": %lld, \"stopped_ms\": %lld, \"bandit\": "
               "{\"enabled\": %s, \"version\": %llu}, \"arms\": [",
               e->running ? "true" : "false", (long long)e->created_ms, (long long)e->stopped_ms,
               e->bandit && e->bandit->enabled ? "true" : "false",
               (unsigned long long)e->bandit_version);
        for (size_t i = 0; i < x->n_arms; i++) {
            printf("%s{\"arm\": ", i ? ", " : "");
            jstr(x->arms[i]->arm);
            printf(", \"preset\": ");
            jstr(i < e->n_arms ? e->arms[i]->preset : "");
            printf(", \"share\": ");
            jfloat(x->arms[i]->share);
            printf(", \"stats\": ");
            print_stats_row_json(x->arms[i]->stats);
            printf("}");
        }
        printf("]}");
        return;
    }
    printf("experiment %s on %s/%s: %s", e->id, e->collection, e->surface,
           e->running ? "running" : "stopped");
    if (e->bandit && e->bandit->enabled)
        printf(", bandit on %s (version %llu)",
               e->bandit->metric == AFFINITY__V1__BANDIT_METRIC__BANDIT_METRIC_CTR ? "CTR"
                                                                                   : "conversion",
               (unsigned long long)e->bandit_version);
    printf("\n");
    print_stats_header();
    for (size_t i = 0; i < x->n_arms; i++) {
        printf("  share %.3f of traffic, preset %s:\n", x->arms[i]->share,
               i < e->n_arms && e->arms[i]->preset[0] ? e->arms[i]->preset : "(none)");
        print_stats_row_text(x->arms[i]->stats);
    }
}

/* --arm name=N,share=S[,preset=P][,diversity=D][,exploration=E][,space=content|behaviour] */
static int parse_arm(char *spec, Affinity__V1__ExperimentArm *a, Affinity__V1__FloatValue *div,
                     Affinity__V1__FloatValue *expl)
{
    char *save = NULL;
    for (char *kv = strtok_r(spec, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) return -1;
        *eq = '\0';
        const char *v = eq + 1;
        char *end;
        if (strcmp(kv, "name") == 0) {
            a->name = (char *)v;
        } else if (strcmp(kv, "share") == 0) {
            a->share = strtod(v, &end);
            if (*end || end == v) return -1;
        } else if (strcmp(kv, "preset") == 0) {
            a->preset = (char *)v;
        } else if (strcmp(kv, "diversity") == 0) {
            if (parse_float(v, &div->value)) return -1;
            a->diversity = div;
        } else if (strcmp(kv, "exploration") == 0) {
            if (parse_float(v, &expl->value)) return -1;
            a->exploration_share = expl;
        } else if (strcmp(kv, "space") == 0) {
            if (strcmp(v, "content") == 0)
                a->space = AFFINITY__V1__SPACE__SPACE_CONTENT;
            else if (strcmp(v, "behaviour") == 0 || strcmp(v, "behavior") == 0)
                a->space = AFFINITY__V1__SPACE__SPACE_BEHAVIOUR;
            else
                return -1;
        } else {
            return -1;
        }
    }
    return 0;
}

static int experiments_create_cmd(cli *c, int argc, char **argv)
{
    enum { O_COLL = 1, O_SURF, O_ARM, O_BANDIT, O_FLOOR, O_EVERY, O_SEED };
    static const struct option opts[] = {
        {"collection", 1, 0, O_COLL}, {"surface", 1, 0, O_SURF},
        {"arm", 1, 0, O_ARM},         {"bandit", 1, 0, O_BANDIT},
        {"floor", 1, 0, O_FLOOR},     {"update-every", 1, 0, O_EVERY},
        {"seed", 1, 0, O_SEED},       {0, 0, 0, 0}};
    enum { MAX_ARMS = 8 };
    Affinity__V1__Experiment e = AFFINITY__V1__EXPERIMENT__INIT;
    Affinity__V1__Bandit bandit = AFFINITY__V1__BANDIT__INIT;
    Affinity__V1__FloatValue floor = AFFINITY__V1__FLOAT_VALUE__INIT;
    Affinity__V1__ExperimentArm arms[MAX_ARMS];
    Affinity__V1__ExperimentArm *arm_ptrs[MAX_ARMS];
    Affinity__V1__FloatValue divs[MAX_ARMS], expls[MAX_ARMS];
    int opt;
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case O_COLL:
            e.collection = optarg;
            break;
        case O_SURF:
            e.surface = optarg;
            break;
        case O_ARM: {
            if (e.n_arms == MAX_ARMS) return usage_error("at most %s arms", "8");
            size_t i = e.n_arms;
            affinity__v1__experiment_arm__init(&arms[i]);
            affinity__v1__float_value__init(&divs[i]);
            affinity__v1__float_value__init(&expls[i]);
            if (parse_arm(optarg, &arms[i], &divs[i], &expls[i]))
                return usage_error("bad --arm '%s'; use name=N,share=S[,preset=P][,diversity="
                                   "D][,exploration=E][,space=content|behaviour]",
                                   optarg);
            arm_ptrs[i] = &arms[i];
            e.n_arms++;
            break;
        }
        case O_BANDIT:
            bandit.enabled = true;
            if (strcmp(optarg, "ctr") == 0)
                bandit.metric = AFFINITY__V1__BANDIT_METRIC__BANDIT_METRIC_CTR;
            else if (strcmp(optarg, "conversion") == 0)
                bandit.metric = AFFINITY__V1__BANDIT_METRIC__BANDIT_METRIC_CONVERSION;
            else
                return usage_error("bad --bandit '%s'; use ctr or conversion", optarg);
            break;
        case O_FLOOR:
            if (parse_float(optarg, &floor.value)) return usage_error("bad --floor '%s'", optarg);
            bandit.floor = &floor;
            break;
        case O_EVERY:
            if (parse_u32(optarg, &bandit.update_every))
                return usage_error("bad --update-every '%s'", optarg);
            break;
        case O_SEED: {
            char *end;
            errno = 0;
            bandit.seed = strtoull(optarg, &end, 10);
            if (errno || *end) return usage_error("bad --seed '%s'", optarg);
            break;
        }
        default:
            return EXIT_USAGE;
        }
    }
    if (argc - optind != 1 || !e.collection || !e.surface)
        return usage_error("usage: affinity experiments create ID --collection C --surface S "
                           "--arm name=N,share=S[,preset=P]... [--bandit ctr|conversion "
                           "[--floor F] [--update-every N] [--seed N]]%s",
                           "");
    e.id = argv[optind];
    e.arms = arm_ptrs;
    if (bandit.enabled) e.bandit = &bandit;
    Affinity__V1__CreateExperimentRequest req = AFFINITY__V1__CREATE_EXPERIMENT_REQUEST__INIT;
    req.experiment = &e;
    ProtobufCMessage *resp = NULL;
    int rc = call(c, TRANSPORT_METHOD_CREATE_EXPERIMENT, "CreateExperiment", &req.base,
                  &affinity__v1__experiment_result__descriptor, &resp);
    if (rc) return rc;
    print_experiment(c, (const void *)resp);
    if (c->json) printf("\n");
    transport_client_free(resp);
    return 0;
}

static int cmd_experiments(cli *c, int argc, char **argv)
{
    const char *sub = argc >= 2 ? argv[1] : "";
    if (strcmp(sub, "create") == 0) return experiments_create_cmd(c, argc - 1, argv + 1);
    ProtobufCMessage *resp = NULL;
    int rc;
    if (strcmp(sub, "list") == 0 && argc <= 3) {
        Affinity__V1__ListExperimentsRequest req = AFFINITY__V1__LIST_EXPERIMENTS_REQUEST__INIT;
        if (argc == 3) req.collection = argv[2];
        rc = call(c, TRANSPORT_METHOD_LIST_EXPERIMENTS, "ListExperiments", &req.base,
                  &affinity__v1__list_experiments_response__descriptor, &resp);
        if (rc) return rc;
        const Affinity__V1__ListExperimentsResponse *r = (const void *)resp;
        if (c->json) printf("{\"experiments\": [");
        for (size_t i = 0; i < r->n_experiments; i++) {
            if (c->json && i) printf(", ");
            print_experiment(c, r->experiments[i]);
        }
        if (c->json) printf("]}\n");
        if (!c->json && !r->n_experiments) printf("(no experiments)\n");
    } else if ((strcmp(sub, "get") == 0 || strcmp(sub, "stop") == 0) && argc == 3) {
        bool stop = sub[0] == 's';
        Affinity__V1__GetExperimentRequest get = AFFINITY__V1__GET_EXPERIMENT_REQUEST__INIT;
        Affinity__V1__StopExperimentRequest st = AFFINITY__V1__STOP_EXPERIMENT_REQUEST__INIT;
        get.id = st.id = argv[2];
        rc = stop ? call(c, TRANSPORT_METHOD_STOP_EXPERIMENT, "StopExperiment", &st.base,
                         &affinity__v1__experiment_result__descriptor, &resp)
                  : call(c, TRANSPORT_METHOD_GET_EXPERIMENT, "GetExperiment", &get.base,
                         &affinity__v1__experiment_result__descriptor, &resp);
        if (rc) return rc;
        print_experiment(c, (const void *)resp);
        if (c->json) printf("\n");
    } else {
        return usage_error("usage: affinity experiments list [COLLECTION] | get ID | stop ID | "
                           "create ID ...%s",
                           "");
    }
    transport_client_free(resp);
    return 0;
}

/* ---- operations ---------------------------------------------------------------------------- */

static int cmd_info(cli *c, int argc, char **argv)
{
    Affinity__V1__GetServerInfoRequest req = AFFINITY__V1__GET_SERVER_INFO_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    int rc = call(c, TRANSPORT_METHOD_GET_SERVER_INFO, "GetServerInfo", &req.base,
                  &affinity__v1__server_info__descriptor, &resp);
    if (rc) return rc;
    Affinity__V1__ServerInfo *r = (Affinity__V1__ServerInfo *)resp;
    const Affinity__V1__BatchStats *b = r->batch_stats;
    if (c->json) {
        printf("{\"version\": ");
        jstr(r->version);
        printf(", \"backend\": ");
        jstr(r->backend);
        printf(", \"device\": ");
        jstr(r->device);
        printf(", \"device_memory_used\": %llu, \"device_memory_total\": %llu, \"max_batch\": %u, "
               "\"max_wait_us\": %u, \"persistent\": %s",
               (unsigned long long)r->device_memory_used,
               (unsigned long long)r->device_memory_total, r->max_batch, r->max_wait_us,
               r->persistent ? "true" : "false");
        if (b) {
            printf(
                ", \"batch_stats\": {\"batches\": %llu, \"requests\": %llu, "
                "\"max_batch_seen\": %llu, \"queue_wait_us_total\": %llu, "
                "\"rejected_queue_full\": %llu, \"expired_deadline\": %llu, "
                "\"queries\": %llu, \"queued\": %llu, \"size_histogram\": [",
                (unsigned long long)b->batches, (unsigned long long)b->requests,
                (unsigned long long)b->max_batch_seen, (unsigned long long)b->queue_wait_us_total,
                (unsigned long long)b->rejected_queue_full, (unsigned long long)b->expired_deadline,
                (unsigned long long)b->queries, (unsigned long long)b->queued);
            for (size_t i = 0; i < b->n_size_histogram; i++)
                printf("%s%llu", i ? ", " : "", (unsigned long long)b->size_histogram[i]);
            printf("]}");
        }
        printf(", \"widget_events_held\": %llu, \"widget_neighbours\": %llu, "
               "\"widget_memory_bytes\": %llu}\n",
               (unsigned long long)r->widget_events_held, (unsigned long long)r->widget_neighbours,
               (unsigned long long)r->widget_memory_bytes);
    } else {
        printf("affinityd %s, backend %s on %s\n", r->version, r->backend, r->device);
        if (r->device_memory_total)
            printf("device memory %.1f / %.1f MiB\n", (double)r->device_memory_used / 1048576.0,
                   (double)r->device_memory_total / 1048576.0);
        printf("batching: max_batch %u, max_wait %u us; %s\n", r->max_batch, r->max_wait_us,
               r->persistent ? "persistent" : "in-memory only");
        if (b) {
            printf("batches %llu, requests %llu (mean %.2f per batch, max %llu), queue full %llu, "
                   "expired %llu\n",
                   (unsigned long long)b->batches, (unsigned long long)b->requests,
                   b->batches ? (double)b->requests / (double)b->batches : 0.0,
                   (unsigned long long)b->max_batch_seen,
                   (unsigned long long)b->rejected_queue_full,
                   (unsigned long long)b->expired_deadline);
            printf("queries %llu, queued now %llu\n", (unsigned long long)b->queries,
                   (unsigned long long)b->queued);
            for (size_t i = 0; i < b->n_size_histogram; i++)
                if (b->size_histogram[i])
                    printf("  batch size [%u, %u): %llu\n", 1u << i, 2u << i,
                           (unsigned long long)b->size_histogram[i]);
        }
        printf("widgets: %llu events held, %llu neighbours, %.1f MiB\n",
               (unsigned long long)r->widget_events_held, (unsigned long long)r->widget_neighbours,
               (double)r->widget_memory_bytes / 1048576.0);
    }
    transport_client_free(resp);
    return 0;
}

static int cmd_health(cli *c, int argc, char **argv)
{
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    if (argc > 1) req.service = argv[1];
    ProtobufCMessage *resp = NULL;
    int rc = call(c, TRANSPORT_METHOD_HEALTH_CHECK, "Health/Check", &req.base,
                  &grpc__health__v1__health_check_response__descriptor, &resp);
    if (rc) return rc;
    int status = ((Grpc__Health__V1__HealthCheckResponse *)resp)->status;
    static const char *const names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
    const char *name = status >= 0 && status <= 3 ? names[status] : "UNKNOWN";
    if (c->json)
        printf("{\"status\": \"%s\"}\n", name);
    else
        printf("%s\n", name);
    transport_client_free(resp);
    return status == 1 ? 0 : EXIT_RPC;
}

/* ---- main ---------------------------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f, "usage: affinity [global flags] COMMAND [arguments]\n"
               "\n"
               "global flags:\n"
               "  --addr HOST:PORT     server (default $AFFINITY_ADDR or 127.0.0.1:50051)\n"
               "  --token-file FILE    bearer token to send (default $AFFINITY_TOKEN_FILE)\n"
               "  --tls-ca FILE        use TLS, trusting this CA / self-signed cert (PEM)\n"
               "  --tls-server-name N  name to verify in the server certificate\n"
               "  --timeout-ms MS      deadline of each call (default 30000)\n"
               "  --json               print one JSON object (errors too) for scripts\n"
               "  --version, --help    print the version or this help (also: affinity version,\n"
               "                       affinity help)\n"
               "\n"
               "commands:\n"
               "  collections list | describe NAME | drop NAME\n"
               "  collections create NAME --dim D [--metric cosine|ip|l2] [--index flat|hnsw]\n"
               "                     [--hnsw-m M] [--hnsw-ef E] [model flags]\n"
               "                     (--dim 0: learned-only, vectors learned from events)\n"
               "  load COLLECTION --vectors F.npy|F.fvecs (--attrs F.csv|F.jsonl | --id-prefix P)\n"
               "       [--batch N] [--create [--metric M]] [--progress|--no-progress]\n"
               "  load COLLECTION --attrs F.csv|F.jsonl   items without vectors (learned-only)\n"
               "  get COLLECTION ID... [--vectors [--space content|behaviour]]\n"
               "  delete COLLECTION ID...\n"
               "  search COLLECTION (--vector V1,V2,... | --vectors FILE [--limit N]) [-k K]\n"
               "  similar COLLECTION ITEM_ID... [-k K] [--space content|behaviour]\n"
               "  recommend COLLECTION (--user ID | --vector V1,V2,...) [-k K]\n"
               "            [--exclude-events purchase,cart,...] [--space content|behaviour]\n"
               "            [--surface S]   (a running experiment on S assigns the arm)\n"
               "  recommend COLLECTION --recipe R [--item ID]... [--user ID] [-k K]   widgets:\n"
               "            R = fbt (--item: the item or the cart), also_viewed, also_bought,\n"
               "            trending, best_sellers (--category C: per category),\n"
               "            buy_it_again, recently_viewed (--user)\n"
               "  rerank COLLECTION (--user ID | --vector V...) --candidates ID[:SCORE],...\n"
               "         [--weight W]\n"
               "  events COLLECTION USER TYPE:ITEM_ID[@RECOMMENDATION_ID]...\n"
               "                        (view, click, cart, purchase, impression,\n"
               "                        custom=NAME; exit 1 if any is rejected)\n"
               "  events import COLLECTION FILE.csv|FILE.jsonl [--format csv|jsonl] [--batch N]\n"
               "         [--progress|--no-progress]   history in bulk; exit 1 if rows were\n"
               "                                      rejected, 2 if lines were malformed\n"
               "  user get COLLECTION USER | user delete [COLLECTION] USER\n"
               "  train COLLECTION [model flags] [--save] [--wait|--no-wait]\n"
               "        [--progress|--no-progress]   learn the model (iALS) from the events;\n"
               "                                     waits and shows epochs unless --no-wait;\n"
               "                                     exit 1 if the job failed\n"
               "  model get COLLECTION  the model: state, version, training job, parameters\n"
               "  segment COLLECTION ITEM_ID... [-k K]   shoppers most drawn to the items\n"
               "  stats [COLLECTION] [--surface S] [--experiment E] [--since 1h]\n"
               "                        impressions, CTR, conversion, revenue per surface,\n"
               "                        strategy and arm (attributed outcomes)\n"
               "  experiments list [COLLECTION] | get ID | stop ID\n"
               "  experiments create ID --collection C --surface S\n"
               "              --arm name=N,share=S[,preset=P][,diversity=D][,exploration=E]...\n"
               "              [--bandit ctr|conversion [--floor F] [--update-every N] [--seed N]]\n"
               "  info                  server version, backend, batching statistics\n"
               "  health [SERVICE]      grpc.health.v1 check; exit 0 only when SERVING\n"
               "\n"
               "filter flags (search, similar, recommend): --category C, --tag T (repeatable,\n"
               "any-of), --price-min P, --price-max P, --available-only, --exclude ID\n"
               "(repeatable)\n"
               "\n"
               "model flags (collections create, train): --factors N (8..512), --epochs N,\n"
               "--lambda X, --alpha0 X, --nu X, --cg-steps N (0: exact solves); train --save\n"
               "also makes them the collection's parameters\n"
               "\n"
               "load: --attrs is CSV with a header (id,category,price,available,tags; tags\n"
               "separated by '|' or ';') or JSON lines ({\"id\":..,\"category\":..,\"price\":..,\n"
               "\"available\":..,\"tags\":[..]}), one record per vector row; a failed load\n"
               "with --create drops the collection it created.\n"
               "\n"
               "exit status: 0 ok, 1 the call failed (message on stderr; with --json a JSON\n"
               "error on stdout), 2 bad usage or input\n");
}

typedef struct command {
    const char *name;
    int (*fn)(cli *c, int argc, char **argv);
} command;

static const command commands[] = {
    {"collections", cmd_collections},
    {"load", cmd_load},
    {"get", cmd_get},
    {"delete", cmd_delete},
    {"search", cmd_search},
    {"similar", cmd_similar},
    {"recommend", cmd_recommend},
    {"rerank", cmd_rerank},
    {"events", cmd_events},
    {"user", cmd_user},
    {"train", cmd_train},
    {"model", cmd_model},
    {"segment", cmd_segment},
    {"stats", cmd_stats},
    {"experiments", cmd_experiments},
    {"info", cmd_info},
    {"health", cmd_health},
};

static char *read_token(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, f);
    fclose(f);
    if (n < 0) {
        free(line);
        return strdup("");
    }
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' '))
        line[--n] = '\0';
    return line;
}

int main(int argc, char **argv)
{
    cli c;
    memset(&c, 0, sizeof(c));
    c.opts.target = getenv("AFFINITY_ADDR") ? getenv("AFFINITY_ADDR") : "127.0.0.1:50051";
    const char *token_file = getenv("AFFINITY_TOKEN_FILE");
    static const struct option opts[] = {{"addr", 1, 0, 'a'},
                                         {"token-file", 1, 0, 't'},
                                         {"tls-ca", 1, 0, 'c'},
                                         {"tls-server-name", 1, 0, 's'},
                                         {"timeout-ms", 1, 0, 'T'},
                                         {"json", 0, 0, 'j'},
                                         {"help", 0, 0, 'h'},
                                         {"version", 0, 0, 'V'},
                                         {0, 0, 0, 0}};
    int opt;
    opterr = 0; /* unknown flags get one line of ours, not the whole usage */
    /* '+': stop at the command; its own flags are parsed by the command. */
    while ((opt = getopt_long(argc, argv, "+hV", opts, NULL)) != -1) {
        switch (opt) {
        case 'a':
            c.opts.target = optarg;
            break;
        case 't':
            token_file = optarg;
            break;
        case 'c':
            c.opts.tls_root_cert_file = optarg;
            break;
        case 's':
            c.opts.tls_server_name = optarg;
            break;
        case 'T':
            if (parse_u32(optarg, &c.opts.timeout_ms) || c.opts.timeout_ms == 0)
                return usage_error("bad --timeout-ms '%s'", optarg);
            break;
        case 'j':
            c.json = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("affinity %s\n", AFF_VERSION_STRING);
            return 0;
        default:
            json_errors = c.json;
            return usage_error("unknown or incomplete global flag '%s'; global flags (before the "
                               "command): --addr --token-file --tls-ca --tls-server-name "
                               "--timeout-ms --json --version --help",
                               argv[optind - 1]);
        }
    }
    json_errors = c.json;
    if (optind >= argc) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[optind], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[optind], "version") == 0) {
        printf("affinity %s\n", AFF_VERSION_STRING);
        return 0;
    }
    if (token_file && token_file[0]) {
        c.token = read_token(token_file);
        if (!c.token) {
            char msg[1200];
            snprintf(msg, sizeof msg, "cannot read token file %s: %s", token_file, strerror(errno));
            return usage_error("%s", msg);
        }
        c.opts.token = c.token;
    }
    const char *name = argv[optind];
    int rc = -1;
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (strcmp(name, commands[i].name) == 0) {
            /* The command sees argv[0] = its name, as getopt expects. */
            rc = commands[i].fn(&c, argc - optind, argv + optind);
            break;
        }
    if (rc < 0) rc = usage_error("unknown command '%s'", name);
    fflush(stdout);
    transport_client_destroy(c.client);
    free(c.token);
    return rc;
}

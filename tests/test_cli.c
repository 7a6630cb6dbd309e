/* The `affinity` CLI end to end: a real affinityd on an ephemeral loopback port (started by
 * tests/server_helpers.c) driven by the real CLI binary; --json output is
 * parsed with jsonv and checked against what the data must give. */
#include <criterion/criterion.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "jsonv.h"
#include "server_helpers.h"
#include "vecfile.h"

#define N_ITEMS 300
#define DIM     8

static char dir[256];
static char addr[64];
static char cli_flags[1024]; /* global flags every CLI run gets (TLS, token) */
static test_server server;
static float vecs[N_ITEMS * DIM];

static const char *path_in(const char *name)
{
    static char bufs[4][512];
    static int next;
    char *b = bufs[next++ % 4];
    snprintf(b, 512, "%s/%s", dir, name);
    return b;
}

/* Starts affinityd (tests/server_helpers.c) in a fresh directory that also holds this test's
 * files, with storage so profiles work, plus `extra` flags (NULL-terminated, may be NULL). */
static void start_server_with(const char *const *extra)
{
    snprintf(dir, sizeof(dir), "/tmp/aff_test_cli_XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    const char *args[32] = {"--data-dir", path_in("data"), "--threads", "2", "--log-level", "warn"};
    int n = 6;
    for (int i = 0; extra && extra[i] && n < 31; i++)
        args[n++] = extra[i];
    args[n] = NULL;
    cr_assert_eq(ts_start(&server, dir, args), 0, "affinityd did not start");
    snprintf(addr, sizeof(addr), "%s", server.target);
}

static void stop_server(void)
{
    if (server.pid > 0 && ts_stop(&server, SIGTERM, 20000) != 0) ts_dump_log(&server);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
}

/* Runs the CLI with `args` (a shell fragment) and returns its stdout; *status is its exit
 * code. The caller frees the text. */
static char *run_cli(int *status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static char *run_cli(int *status, const char *fmt, ...)
{
    char args[2048], cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof(args), fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof(cmd), "%s/src/affinity --addr %s --timeout-ms 20000 %s %s 2>>%s/cli.err",
             AFF_BINARY_DIR, addr, cli_flags, args, dir);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    size_t cap = 4096, len = 0;
    char *out = malloc(cap);
    size_t n;
    while ((n = fread(out + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (cap - len < 1024) {
            cap *= 2;
            out = realloc(out, cap);
        }
    }
    out[len] = '\0';
    int st = pclose(p);
    *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    return out;
}

/* Runs the CLI with --json, checks the exit code and parses stdout. */
static jsonv *cli_json(int want_status, const char *args)
{
    int status;
    char *out = run_cli(&status, "--json %s", args);
    cr_assert_eq(status, want_status, "affinity %s: exit %d, want %d; stdout: %s", args, status,
                 want_status, out);
    jsonv *v = NULL;
    aff_err err = {0};
    cr_assert_eq(jsonv_parse(out, strlen(out), &v, &err), AFF_OK,
                 "affinity %s printed non-JSON: %s (%s)", args, out, err.msg);
    free(out);
    return v;
}

static double num(const jsonv *v, const char *key)
{
    const jsonv *m = jsonv_get(v, key);
    cr_assert(m && m->type == JSONV_NUMBER, "no number '%s'", key);
    return m->number;
}

static const char *str(const jsonv *v, const char *key)
{
    const jsonv *m = jsonv_get(v, key);
    cr_assert(m && m->type == JSONV_STRING, "no string '%s'", key);
    return m->string;
}

/* Unit vectors in random directions; item i is "item-i", category "cat-(i % 5)", price i. */
static void write_catalog(void)
{
    srand(1234);
    for (int i = 0; i < N_ITEMS; i++) {
        double norm = 0;
        for (int j = 0; j < DIM; j++) {
            vecs[i * DIM + j] = (float)(rand() / (double)RAND_MAX - 0.5);
            norm += vecs[i * DIM + j] * vecs[i * DIM + j];
        }
        for (int j = 0; j < DIM; j++)
            vecs[i * DIM + j] = (float)(vecs[i * DIM + j] / sqrt(norm));
    }
    aff_err err = {0};
    cr_assert_eq(vecfile_write(path_in("items.npy"), vecs, N_ITEMS, DIM, &err), AFF_OK);
    cr_assert_eq(vecfile_write(path_in("items.fvecs"), vecs, N_ITEMS, DIM, &err), AFF_OK);
    FILE *csv = fopen(path_in("items.csv"), "w");
    FILE *jl = fopen(path_in("items.jsonl"), "w");
    fprintf(csv, "id,category,tags,price,available\n");
    for (int i = 0; i < N_ITEMS; i++) {
        fprintf(csv, "item-%d,cat-%d,t%d|all,%d,%s\n", i, i % 5, i % 3, i,
                i % 7 ? "true" : "false");
        fprintf(jl,
                "{\"id\": \"item-%d\", \"category\": \"cat-%d\", \"tags\": [\"all\"], "
                "\"price\": %d, \"available\": true}\n",
                i, i % 5, i);
    }
    fclose(csv);
    fclose(jl);
}

static void setup(void)
{
    start_server_with(NULL);
    write_catalog();
}

TestSuite(cli, .init = setup, .fini = stop_server, .timeout = 120);

static void vector_arg(char *buf, size_t len, const float *v)
{
    size_t o = 0;
    for (int j = 0; j < DIM; j++)
        o += (size_t)snprintf(buf + o, len - o, "%s%.7f", j ? "," : "", (double)v[j]);
}

static void load_both(void)
{
    char args[1024];
    snprintf(args, sizeof(args), "load shop --create --metric cosine --vectors %s --attrs %s",
             path_in("items.npy"), path_in("items.csv"));
    jsonv *v = cli_json(0, args);
    cr_assert_eq(num(v, "upserted"), N_ITEMS);
    jsonv_free(v);
    snprintf(args, sizeof(args), "collections create shop2 --dim %d --metric ip", DIM);
    v = cli_json(0, args);
    jsonv_free(v);
    snprintf(args, sizeof(args), "load shop2 --batch 7 --vectors %s --attrs %s",
             path_in("items.fvecs"), path_in("items.jsonl"));
    v = cli_json(0, args);
    cr_assert_eq(num(v, "upserted"), N_ITEMS);
    jsonv_free(v);
}

Test(cli, load_npy_csv_and_fvecs_jsonl_then_list)
{
    load_both();
    jsonv *v = cli_json(0, "collections list");
    const jsonv *cols = jsonv_get(v, "collections");
    cr_assert(cols && cols->n == 2);
    cr_assert_str_eq(str(jsonv_at(cols, 0), "name"), "shop");
    cr_assert_eq(num(jsonv_at(cols, 0), "item_count"), N_ITEMS);
    cr_assert_eq(num(jsonv_at(cols, 0), "dimension"), DIM);
    cr_assert_str_eq(str(jsonv_at(cols, 0), "metric"), "cosine");
    cr_assert_str_eq(str(jsonv_at(cols, 1), "name"), "shop2");
    cr_assert_str_eq(str(jsonv_at(cols, 1), "metric"), "ip");
    cr_assert_eq(num(jsonv_at(cols, 1), "item_count"), N_ITEMS);
    jsonv_free(v);
    /* Attributes arrived: item-7 is unavailable, category cat-2, tags t1 and all. */
    v = cli_json(0, "get shop item-7 nope");
    const jsonv *it = jsonv_at(jsonv_get(v, "items"), 0);
    cr_assert_str_eq(str(it, "category"), "cat-2");
    cr_assert_eq(num(it, "price"), 7);
    cr_assert_eq(jsonv_get(it, "available")->boolean, false);
    cr_assert_eq(jsonv_get(it, "tags")->n, 2);
    cr_assert_str_eq(jsonv_at(jsonv_get(v, "missing_ids"), 0)->string, "nope");
    jsonv_free(v);
    /* Human output too. */
    int status;
    char *out = run_cli(&status, "collections describe shop");
    cr_assert_eq(status, 0);
    cr_assert(strstr(out, "shop") && strstr(out, "300 items"), "%s", out);
    free(out);
}

Test(cli, search_similar_recommend_rerank)
{
    load_both();
    char vec[512], args[2048];
    vector_arg(vec, sizeof(vec), &vecs[42 * DIM]);
    /* The item's own vector finds the item first, with cosine 1. */
    snprintf(args, sizeof(args), "search shop --vector %s -k 5", vec);
    jsonv *v = cli_json(0, args);
    const jsonv *hits = jsonv_get(jsonv_at(jsonv_get(v, "results"), 0), "hits");
    cr_assert_eq(hits->n, 5);
    cr_assert_str_eq(str(jsonv_at(hits, 0), "id"), "item-42");
    cr_assert_float_eq(num(jsonv_at(hits, 0), "score"), 1.0, 1e-4);
    for (size_t i = 1; i < hits->n; i++)
        cr_assert_leq(num(jsonv_at(hits, i), "score"), num(jsonv_at(hits, i - 1), "score"));
    jsonv_free(v);
    /* With a filter: only cat-3 items (42 % 5 == 2, so item-42 is out). */
    snprintf(args, sizeof(args), "search shop --vector %s -k 4 --category cat-3", vec);
    v = cli_json(0, args);
    hits = jsonv_get(jsonv_at(jsonv_get(v, "results"), 0), "hits");
    cr_assert_eq(hits->n, 4);
    for (size_t i = 0; i < hits->n; i++) {
        int id = atoi(str(jsonv_at(hits, i), "id") + 5);
        cr_assert_eq(id % 5, 3);
    }
    jsonv_free(v);
    /* Many queries from a file. */
    snprintf(args, sizeof(args), "search shop2 --vectors %s --limit 3 -k 1", path_in("items.npy"));
    v = cli_json(0, args);
    const jsonv *res = jsonv_get(v, "results");
    cr_assert_eq(res->n, 3);
    cr_assert_str_eq(str(jsonv_at(jsonv_get(jsonv_at(res, 2), "hits"), 0), "id"), "item-2");
    jsonv_free(v);

    v = cli_json(0, "similar shop item-42 item-5 -k 3");
    res = jsonv_get(v, "results");
    cr_assert_eq(res->n, 2);
    cr_assert_str_eq(str(jsonv_at(res, 0), "query"), "item-42");
    hits = jsonv_get(jsonv_at(res, 0), "hits");
    cr_assert_eq(hits->n, 3);
    for (size_t i = 0; i < hits->n; i++)
        cr_assert_str_neq(str(jsonv_at(hits, i), "id"), "item-42");
    jsonv_free(v);

    snprintf(args, sizeof(args), "recommend shop --vector %s -k 2 --exclude item-42", vec);
    v = cli_json(0, args);
    cr_assert_str_eq(str(v, "source"), "vector");
    hits = jsonv_get(v, "hits");
    cr_assert_eq(hits->n, 2);
    cr_assert_str_neq(str(jsonv_at(hits, 0), "id"), "item-42");
    jsonv_free(v);

    /* Rerank with weight 1: pure affinity, so item-42 comes first whatever its base score. */
    snprintf(args, sizeof(args),
             "rerank shop --vector %s --weight 1 --candidates item-1:0.9,item-42:0.1,ghost:0.5",
             vec);
    v = cli_json(0, args);
    const jsonv *items = jsonv_get(v, "items");
    cr_assert_eq(items->n, 3);
    cr_assert_str_eq(str(jsonv_at(items, 0), "id"), "item-42");
    cr_assert_float_eq(num(jsonv_at(items, 0), "base_score"), 0.1, 1e-6);
    cr_assert_str_eq(str(jsonv_at(items, 2), "id"), "ghost");
    cr_assert_eq(jsonv_get(jsonv_at(items, 2), "found")->boolean, false);
    jsonv_free(v);

    int status;
    char *out = run_cli(&status, "search shop --vector %s -k 2", vec);
    cr_assert_eq(status, 0);
    cr_assert(strstr(out, "item-42"), "%s", out);
    free(out);
}

Test(cli, health_info_and_errors)
{
    jsonv *v = cli_json(0, "health");
    cr_assert_str_eq(str(v, "status"), "SERVING");
    jsonv_free(v);
    load_both();
    v = cli_json(0, "info");
    cr_assert(jsonv_get(v, "backend") && jsonv_get(v, "max_batch"));
    jsonv_free(v);
    /* Wrong dimension: INVALID_ARGUMENT with a message naming both dimensions. */
    v = cli_json(1, "search shop --vector 1,2,3");
    const jsonv *e = jsonv_get(v, "error");
    cr_assert_not_null(e);
    cr_assert_eq(num(e, "code"), 3);
    cr_assert_str_eq(str(e, "name"), "INVALID_ARGUMENT");
    cr_assert(strstr(str(e, "message"), "3") && strstr(str(e, "message"), "8"), "%s",
              str(e, "message"));
    jsonv_free(v);
    v = cli_json(1, "collections describe nope");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "NOT_FOUND");
    jsonv_free(v);
    v = cli_json(0, "delete shop item-1 item-2 ghost");
    cr_assert_eq(num(v, "deleted"), 2);
    jsonv_free(v);
    v = cli_json(0, "collections drop shop2");
    jsonv_free(v);
    /* A load whose attribute file is short fails before anything is sent. */
    FILE *f = fopen(path_in("short.csv"), "w");
    fprintf(f, "id\na\nb\n");
    fclose(f);
    int status;
    char *out = run_cli(&status, "load shop --vectors %s --attrs %s", path_in("items.npy"),
                        path_in("short.csv"));
    cr_assert_eq(status, 2);
    free(out);
    /* A missing collection without --create, and a dimension mismatch, fail before sending. */
    char args[1024];
    snprintf(args, sizeof(args), "load nope --vectors %s --attrs %s", path_in("items.npy"),
             path_in("items.csv"));
    v = cli_json(1, args);
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "NOT_FOUND");
    cr_assert(strstr(str(jsonv_get(v, "error"), "message"), "--create"));
    jsonv_free(v);
    v = cli_json(0, "collections create four --dim 4");
    jsonv_free(v);
    out = run_cli(&status, "load four --vectors %s --attrs %s", path_in("items.npy"),
                  path_in("items.csv"));
    cr_assert_eq(status, 2);
    free(out);
    v = cli_json(0, "collections describe four");
    cr_assert_eq(num(v, "item_count"), 0);
    jsonv_free(v);
    out = run_cli(&status, "frobnicate");
    cr_assert_eq(status, 2);
    free(out);
}

Test(cli, events_and_user_profile)
{
    load_both();
    int status;
    char *out = run_cli(&status, "--json events shop u1 view:item-3 purchase:item-4");
    if (status == 1 && strstr(out, "UNIMPLEMENTED")) {
        stop_server(); /* a skipped test does not run .fini */
        cr_skip_test("this affinityd has no user profiles yet: %s", out);
    }
    free(out);
    jsonv *v = cli_json(0, "user get shop u1");
    cr_assert_eq(num(v, "history_length"), 2);
    jsonv_free(v);
    v = cli_json(0, "events shop u1 click:item-5");
    cr_assert_eq(num(v, "applied"), 1);
    jsonv_free(v);
    v = cli_json(0, "recommend shop --user u1 -k 3 --exclude-events purchase");
    cr_assert_str_eq(str(v, "source"), "profile");
    const jsonv *hits = jsonv_get(v, "hits");
    for (size_t i = 0; i < hits->n; i++)
        cr_assert_str_neq(str(jsonv_at(hits, i), "id"), "item-4");
    jsonv_free(v);
    v = cli_json(0, "user get shop u1");
    cr_assert_eq(num(v, "history_length"), 3);
    jsonv_free(v);
    v = cli_json(0, "user delete shop u1");
    cr_assert(jsonv_get(v, "existed")->boolean);
    jsonv_free(v);
}

/* Widget recipes (issue 13): recommend --recipe with --item, --user and --category. */
Test(cli, widget_recipes)
{
    load_both();
    int status;
    for (int u = 0; u < 3; u++) {
        char *out = run_cli(&status, "events shop w%d purchase:item-1 purchase:item-2", u);
        cr_assert_eq(status, 0, "%s", out);
        free(out);
    }
    char *out = run_cli(&status, "events shop w9 purchase:item-7 view:item-3 view:item-8");
    cr_assert_eq(status, 0, "%s", out);
    free(out);
    jsonv *v = cli_json(0, "recommend shop --recipe fbt --item item-1");
    cr_assert_str_eq(str(v, "source"), "frequently_bought_together");
    const jsonv *hits = jsonv_get(v, "hits");
    cr_assert_eq(hits->n, 1);
    cr_assert_str_eq(str(jsonv_at(hits, 0), "id"), "item-2");
    jsonv_free(v);
    v = cli_json(0, "recommend shop --recipe recently_viewed --user w9");
    hits = jsonv_get(v, "hits");
    cr_assert_eq(hits->n, 2);
    cr_assert_str_eq(str(jsonv_at(hits, 0), "id"), "item-8");
    cr_assert_str_eq(str(jsonv_at(hits, 1), "id"), "item-3");
    jsonv_free(v);
    /* Best sellers of category cat-2: item-2 (3 purchases) and item-7 (1). */
    v = cli_json(0, "recommend shop --recipe best_sellers --category cat-2");
    cr_assert_str_eq(str(v, "source"), "best_sellers");
    hits = jsonv_get(v, "hits");
    cr_assert_eq(hits->n, 2);
    cr_assert_str_eq(str(jsonv_at(hits, 0), "id"), "item-2");
    cr_assert_str_eq(str(jsonv_at(hits, 1), "id"), "item-7");
    jsonv_free(v);
    v = cli_json(1, "recommend shop --recipe also_viewed");
    const jsonv *e = jsonv_get(v, "error");
    cr_assert_not_null(e);
    cr_assert_str_eq(str(e, "name"), "INVALID_ARGUMENT");
    cr_assert(strstr(str(e, "message"), "item_ids"), "%s", str(e, "message"));
    jsonv_free(v);
    out = run_cli(&status, "recommend shop --recipe nope");
    cr_assert_eq(status, 2);
    free(out);
}

static void write_file(const char *name, const char *text)
{
    FILE *f = fopen(path_in(name), "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

/* The "line" members of the objects in array key of v, in order, into lines (up to max). */
static size_t lines_of(const jsonv *v, const char *key, int *lines, size_t max)
{
    const jsonv *a = jsonv_get(v, key);
    cr_assert(a && a->type == JSONV_ARRAY, "no array '%s'", key);
    for (size_t i = 0; i < a->n && i < max; i++)
        lines[i] = (int)num(jsonv_at(a, i), "line");
    return a->n;
}

Test(cli, events_import_csv_and_jsonl_with_line_numbers)
{
    load_both();
    /* CSV, messages of 2 events: lines 5, 9, 10 are rejected by the server, lines 6, 7, 11
     * and 13 are malformed and never sent. */
    write_file("events.csv", "user_id,item_id,type,timestamp_ms,value\n"
                             "u1,item-1,view,,\n"
                             "u1,item-2,purchase,1700000000000,2\n"
                             "u2,item-3,cart,1700000000001,\n"
                             "u2,nope,view,1700000000002,0\n"
                             "u3,item-4,click,notanumber,0\n"
                             "\"u3,item-5,view,1,0\n"
                             "\n"
                             "u3,item-6,wishlist,1700000000003,0\n"
                             ",item-7,view,1700000000004,0\n"
                             "u3,item-8,view,1700000000005,abc\n"
                             "u3,item-9,view\n"
                             "u4,item-10\n");
    char args[1024];
    snprintf(args, sizeof(args), "events import shop %s --batch 2", path_in("events.csv"));
    jsonv *v = cli_json(2, args);
    cr_assert_eq(num(v, "sent"), 7);
    cr_assert_eq(num(v, "applied"), 4);
    cr_assert_eq(num(v, "rejected_count"), 3);
    cr_assert_eq(num(v, "malformed_count"), 4);
    int lines[8];
    cr_assert_eq(lines_of(v, "rejected", lines, 8), 3);
    cr_assert(lines[0] == 5 && lines[1] == 9 && lines[2] == 10, "rejected lines %d %d %d", lines[0],
              lines[1], lines[2]);
    const jsonv *rej = jsonv_get(v, "rejected");
    cr_assert(strstr(str(jsonv_at(rej, 0), "reason"), "unknown item id 'nope'"));
    cr_assert(strstr(str(jsonv_at(rej, 1), "reason"), "'wishlist' is not configured"));
    cr_assert(strstr(str(jsonv_at(rej, 2), "reason"), "user id"));
    cr_assert_eq(lines_of(v, "malformed", lines, 8), 4);
    cr_assert(lines[0] == 6 && lines[1] == 7 && lines[2] == 11 && lines[3] == 13,
              "malformed lines %d %d %d %d", lines[0], lines[1], lines[2], lines[3]);
    cr_assert(strstr(str(jsonv_at(jsonv_get(v, "malformed"), 0), "reason"), "timestamp_ms"));
    jsonv_free(v);
    v = cli_json(0, "user get shop u1");
    cr_assert_eq(num(v, "history_length"), 2);
    jsonv_free(v);
    v = cli_json(0, "user get shop u3");
    cr_assert_eq(num(v, "history_length"), 1); /* only line 12 */
    jsonv_free(v);

    /* JSON Lines: line 4 rejected; 3 (bad JSON), 5 (not an object), 7 (no user_id) and 8
     * (timestamp not an integer) malformed; a numeric user id is a string id. */
    write_file(
        "events.jsonl",
        "{\"user_id\": \"j1\", \"item_id\": \"item-1\", \"type\": \"view\", "
        "\"timestamp_ms\": 1700000000000}\n"
        "{\"user_id\": \"j1\", \"item_id\": \"item-2\", \"type\": \"purchase\", \"value\": 3}\n"
        "{\"user_id\": \"j1\", \"item_id\": \"item-3\"\n"
        "{\"user_id\": \"j2\", \"item_id\": \"nope\", \"type\": \"click\"}\n"
        "[1, 2]\n"
        "{\"user_id\": 7, \"item_id\": \"item-4\", \"type\": \"add_to_cart\", "
        "\"timestamp_ms\": \"1700000000001\"}\n"
        "{\"item_id\": \"item-5\", \"type\": \"view\"}\n"
        "{\"user_id\": \"j3\", \"item_id\": \"item-6\", \"type\": \"view\", "
        "\"timestamp_ms\": 1.5}\n");
    snprintf(args, sizeof(args), "events import shop %s", path_in("events.jsonl"));
    v = cli_json(2, args);
    cr_assert_eq(num(v, "applied"), 3);
    cr_assert_eq(num(v, "rejected_count"), 1);
    cr_assert_eq(lines_of(v, "rejected", lines, 8), 1);
    cr_assert_eq(lines[0], 4);
    cr_assert_eq(lines_of(v, "malformed", lines, 8), 4);
    cr_assert(lines[0] == 3 && lines[1] == 5 && lines[2] == 7 && lines[3] == 8);
    jsonv_free(v);
    v = cli_json(0, "user get shop 7");
    cr_assert_eq(num(v, "history_length"), 1);
    cr_assert_eq(num(jsonv_get(v, "event_counts"), "add_to_cart"), 1);
    jsonv_free(v);

    /* A clean file (named .txt, so --format says what it is): exit 0. */
    write_file("clean.txt", "type,item_id,user_id\nview,item-1,c1\nclick,item-2,c1\n");
    snprintf(args, sizeof(args), "events import shop %s --format csv", path_in("clean.txt"));
    v = cli_json(0, args);
    cr_assert_eq(num(v, "applied"), 2);
    cr_assert_eq(num(v, "rejected_count") + num(v, "malformed_count"), 0);
    jsonv_free(v);
    /* Only server rejections: exit 1, the line in the human output. */
    write_file("rej.jsonl", "{\"user_id\": \"r1\", \"item_id\": \"nope\", \"type\": \"view\"}\n");
    int status;
    char *out = run_cli(&status, "events import shop %s --no-progress", path_in("rej.jsonl"));
    cr_assert_eq(status, 1, "%s", out);
    cr_assert(strstr(out, "rej.jsonl:1: rejected (user r1): unknown item id 'nope'"), "%s", out);
    free(out);
    /* An unknown collection: exit 1 with NOT_FOUND, nothing applied. */
    out = run_cli(&status, "--json events import nowhere %s --format csv", path_in("clean.txt"));
    cr_assert_eq(status, 1, "%s", out);
    cr_assert(strstr(out, "NOT_FOUND") && strstr(out, "nowhere"), "%s", out);
    free(out);
    /* Bad usage and unreadable files: exit 2. */
    out = run_cli(&status, "events import shop %s --batch 0", path_in("clean.txt"));
    cr_assert_eq(status, 2);
    free(out);
    out = run_cli(&status, "events import shop %s", path_in("clean.txt"));
    cr_assert_eq(status, 2); /* .txt without --format */
    free(out);
    write_file("nohead.csv", "user_id,item\nu,item-1\n");
    out = run_cli(&status, "events import shop %s", path_in("nohead.csv"));
    cr_assert_eq(status, 2);
    free(out);
}

/* ---- learning: train, model get, segment, --space ------------------------------------------- */

/* The text of a file (the CLI's stderr log); the caller frees it. */
static char *read_text(const char *path)
{
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "cannot open %s", path);
    size_t cap = 4096, len = 0, n;
    char *out = malloc(cap);
    while ((n = fread(out + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len < 1024) {
            cap *= 2;
            out = realloc(out, cap);
        }
    }
    out[len] = '\0';
    fclose(f);
    return out;
}

/* A learned-only collection "learned" of items li-0..li-7 without vectors, and the events of
 * two groups of shoppers: u0..u2 use li-0..li-3, u3..u5 use li-4..li-7. */
static void learned_shop(void)
{
    jsonv *v = cli_json(0, "collections create learned --dim 0 --factors 8 --epochs 4");
    cr_assert_eq(num(v, "dimension"), 0);
    cr_assert_eq(jsonv_get(v, "spaces")->n, 0);
    const jsonv *m = jsonv_get(v, "model");
    cr_assert_str_eq(str(m, "state"), "none");
    cr_assert_eq(num(jsonv_get(m, "next_params"), "factors"), 8);
    cr_assert_eq(num(jsonv_get(m, "next_params"), "epochs"), 4);
    jsonv_free(v);
    FILE *f = fopen(path_in("litems.csv"), "w");
    fprintf(f, "id,category\n");
    for (int i = 0; i < 8; i++)
        fprintf(f, "li-%d,g%d\n", i, i / 4);
    fclose(f);
    char args[1024];
    snprintf(args, sizeof(args), "load learned --attrs %s", path_in("litems.csv"));
    v = cli_json(0, args);
    cr_assert_eq(num(v, "upserted"), 8);
    jsonv_free(v);
    f = fopen(path_in("levents.csv"), "w");
    fprintf(f, "user_id,item_id,type\n");
    for (int u = 0; u < 6; u++)
        for (int i = 0; i < 4; i++)
            fprintf(f, "u%d,li-%d,%s\n", u, (u / 3) * 4 + i, i == 0 ? "purchase" : "view");
    fclose(f);
    snprintf(args, sizeof(args), "events import learned %s", path_in("levents.csv"));
    v = cli_json(0, args);
    cr_assert_eq(num(v, "applied"), 24);
    jsonv_free(v);
}

Test(cli, train_model_get_recommend_segment)
{
    learned_shop();
    /* Items with vectors are refused by a learned-only collection; items without vectors by a
     * content one, before anything is sent. */
    int status;
    char *out = run_cli(&status, "load learned --vectors %s --attrs %s", path_in("items.npy"),
                        path_in("items.csv"));
    cr_assert_eq(status, 2, "%s", out);
    free(out);
    jsonv *c4 = cli_json(0, "collections create four --dim 4");
    jsonv_free(c4);
    out = run_cli(&status, "load four --attrs %s", path_in("litems.csv"));
    cr_assert_eq(status, 2, "%s", out);
    free(out);

    /* Train and wait: the model's facts on stdout, the epochs on stderr (not a terminal). */
    out = run_cli(&status, "train learned --wait");
    cr_assert_eq(status, 0, "%s", out);
    cr_assert(strstr(out, "trained learned: model version 1 from 24 events (6 users, 8 items), 4 "
                          "epochs"),
              "%s", out);
    free(out);
    char *err = read_text(path_in("cli.err"));
    cr_assert(strstr(err, "affinity: training learned: epoch 4/4, loss "), "%s", err);
    free(err);

    jsonv *v = cli_json(0, "model get learned");
    cr_assert_str_eq(str(v, "state"), "ready");
    cr_assert_eq(num(v, "version"), 1);
    cr_assert_eq(num(v, "events_used"), 24);
    cr_assert_eq(num(v, "users"), 6);
    cr_assert_eq(num(v, "items"), 8);
    cr_assert_eq(num(v, "epochs"), 4);
    cr_assert_eq(num(jsonv_get(v, "params"), "factors"), 8);
    cr_assert_eq(num(v, "events_since_train"), 0);
    const char *when = str(v, "trained_at"); /* ISO-8601 UTC, e.g. 2026-11-30T07:41:02.123Z */
    cr_assert(strlen(when) == 24 && when[4] == '-' && when[10] == 'T' && when[23] == 'Z', "%s",
              when);
    const jsonv *job = jsonv_get(v, "job");
    cr_assert_eq(jsonv_get(job, "running")->boolean, false);
    cr_assert_eq(jsonv_get(job, "error")->type, JSONV_NULL);
    cr_assert_eq(num(job, "epoch"), 4);
    jsonv_free(v);
    out = run_cli(&status, "model get learned");
    cr_assert_eq(status, 0);
    cr_assert(strstr(out, "state               ready") && strstr(out, "version             1") &&
                  strstr(out, "factors             8"),
              "%s", out);
    free(out);

    /* Describe shows the behaviour space and the model. */
    v = cli_json(0, "collections describe learned");
    const jsonv *spaces = jsonv_get(v, "spaces");
    cr_assert_eq(spaces->n, 1);
    cr_assert_str_eq(jsonv_at(spaces, 0)->string, "behaviour");
    cr_assert_str_eq(str(jsonv_get(v, "model"), "state"), "ready");
    jsonv_free(v);
    out = run_cli(&status, "collections describe learned");
    cr_assert_eq(status, 0);
    cr_assert(strstr(out, "model v1 ready") && strstr(out, "spaces              behaviour"), "%s",
              out);
    free(out);

    /* Serving from the model. */
    v = cli_json(0, "recommend learned --user u0 -k 3");
    cr_assert_str_eq(str(v, "source"), "model");
    cr_assert_gt(jsonv_get(v, "hits")->n, 0);
    jsonv_free(v);
    out = run_cli(&status, "recommend learned --user u4 -k 2 --space behaviour");
    cr_assert_eq(status, 0);
    cr_assert(strstr(out, "source: model"), "%s", out);
    free(out);
    v = cli_json(0, "similar learned li-0 -k 3 --space behaviour");
    const jsonv *hits = jsonv_get(jsonv_at(jsonv_get(v, "results"), 0), "hits");
    cr_assert_eq(hits->n, 3);
    for (size_t i = 0; i < hits->n; i++)
        cr_assert_str_neq(str(jsonv_at(hits, i), "id"), "li-0");
    jsonv_free(v);
    out = run_cli(&status, "similar learned li-0 --space sideways");
    cr_assert_eq(status, 2);
    free(out);

    /* Segment: the shoppers of li-0 and li-1 (u0..u2) come first. */
    v = cli_json(0, "segment learned li-0 li-1 -k 3");
    cr_assert_eq(num(v, "model_version"), 1);
    const jsonv *users = jsonv_get(v, "users");
    cr_assert_eq(users->n, 3);
    for (size_t i = 0; i < users->n; i++) {
        const char *u = str(jsonv_at(users, i), "user_id");
        cr_assert(strcmp(u, "u0") == 0 || strcmp(u, "u1") == 0 || strcmp(u, "u2") == 0,
                  "segment of li-0, li-1 ranks %s at %zu", u, i);
        if (i)
            cr_assert_leq(num(jsonv_at(users, i), "score"), num(jsonv_at(users, i - 1), "score"));
    }
    jsonv_free(v);
    out = run_cli(&status, "segment learned li-5 -k 1");
    cr_assert_eq(status, 0);
    cr_assert(strstr(out, "model version 1") &&
                  (strstr(out, " u3 ") || strstr(out, " u4 ") || strstr(out, " u5 ")),
              "%s", out);
    free(out);
    v = cli_json(1, "segment learned nope");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "NOT_FOUND");
    jsonv_free(v);

    /* --no-wait returns the job; a waiting call then follows a running job or starts one. */
    v = cli_json(0, "train learned --no-wait --epochs 2");
    cr_assert_gt(num(v, "job_id"), 0);
    jsonv_free(v);
    v = cli_json(0, "train learned --epochs 3 --save");
    cr_assert_str_eq(str(v, "state"), "ready");
    cr_assert_geq(num(v, "version"), 2);
    cr_assert_eq(jsonv_get(jsonv_get(v, "job"), "running")->boolean, false);
    jsonv_free(v);
}

Test(cli, train_errors)
{
    learned_shop();
    /* The server's range check, naming the field; nothing trained. */
    jsonv *v = cli_json(1, "train learned --factors 3");
    const jsonv *e = jsonv_get(v, "error");
    cr_assert_str_eq(str(e, "name"), "INVALID_ARGUMENT");
    cr_assert(strstr(str(e, "message"), "params.factors"), "%s", str(e, "message"));
    jsonv_free(v);
    v = cli_json(0, "model get learned");
    cr_assert_str_eq(str(v, "state"), "none");
    cr_assert_eq(num(v, "version"), 0);
    jsonv_free(v);
    v = cli_json(1, "collections create bad --dim 0 --factors 1000");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "INVALID_ARGUMENT");
    cr_assert(strstr(str(jsonv_get(v, "error"), "message"), "factors"), "%s",
              str(jsonv_get(v, "error"), "message"));
    jsonv_free(v);
    /* Unknown collection. */
    v = cli_json(1, "train nowhere");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "NOT_FOUND");
    jsonv_free(v);
    v = cli_json(1, "model get nowhere");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "NOT_FOUND");
    jsonv_free(v);
    /* No events yet: FAILED_PRECONDITION, exit 1, the reason on stderr. */
    v = cli_json(0, "collections create empty --dim 0");
    jsonv_free(v);
    int status;
    char *out = run_cli(&status, "train empty");
    cr_assert_eq(status, 1, "%s", out);
    free(out);
    char *err = read_text(path_in("cli.err"));
    cr_assert(strstr(err, "Train failed: FAILED_PRECONDITION") && strstr(err, "no events"), "%s",
              err);
    free(err);
    v = cli_json(1, "segment learned li-0");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "FAILED_PRECONDITION");
    jsonv_free(v);
    /* A job that fails (its events' items were deleted after Train accepted them): exit 1, the
     * final ModelInfo with the job's error. */
    v = cli_json(0, "collections create gone --dim 0");
    jsonv_free(v);
    write_file("gone.csv", "id\nx1\nx2\n");
    out = run_cli(&status, "load gone --attrs %s", path_in("gone.csv"));
    cr_assert_eq(status, 0, "%s", out);
    free(out);
    v = cli_json(0, "events gone shopper view:x1 view:x2");
    jsonv_free(v);
    v = cli_json(0, "delete gone x1 x2");
    jsonv_free(v);
    v = cli_json(1, "train gone");
    cr_assert_str_eq(str(v, "state"), "failed");
    cr_assert_eq(num(v, "version"), 0);
    cr_assert(strstr(str(jsonv_get(v, "job"), "error"), "no events on its items"), "%s",
              str(jsonv_get(v, "job"), "error"));
    jsonv_free(v);
    out = run_cli(&status, "train gone");
    cr_assert_eq(status, 1, "%s", out);
    free(out);
    err = read_text(path_in("cli.err"));
    cr_assert(strstr(err, "affinity: training gone (job ") && strstr(err, ") failed: collection"),
              "%s", err);
    free(err);
    /* Bad flags: usage errors, exit 2, nothing sent. */
    const char *bad[] = {"train learned --factors abc",
                         "train learned --factors 0",
                         "train learned --lambda x",
                         "train learned --cg-steps -1",
                         "train learned --bogus",
                         "train",
                         "train a b",
                         "model get",
                         "model put learned",
                         "segment learned",
                         "segment learned li-0 -k x",
                         "recommend learned --user u0 --space x",
                         "collections create x --dim 0 --epochs y"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        out = run_cli(&status, "%s", bad[i]);
        cr_assert_eq(status, 2, "affinity %s: exit %d", bad[i], status);
        free(out);
    }
    v = cli_json(0, "model get learned");
    cr_assert_eq(num(v, "version"), 0);
    jsonv_free(v);
}

/* TLS with a self-signed certificate (made with openssl) and a bearer token. */
static char tls_dir[64];

static void setup_tls(void)
{
    snprintf(tls_dir, sizeof(tls_dir), "/tmp/aff_test_cli_tls_XXXXXX");
    char *tmp = tls_dir;
    cr_assert_not_null(mkdtemp(tmp));
    char cmd[1024];
    snprintf(cmd, sizeof(cmd),
             "openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/key.pem -out %s/cert.pem "
             "-days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost >/dev/null 2>&1 "
             "&& echo 'tok-123' > %s/token",
             tmp, tmp, tmp);
    if (system(cmd) != 0) cr_skip_test("openssl cannot make a test certificate");
    static char cert[256], key[256], token[256];
    snprintf(cert, sizeof(cert), "%s/cert.pem", tmp);
    snprintf(key, sizeof(key), "%s/key.pem", tmp);
    snprintf(token, sizeof(token), "%s/token", tmp);
    const char *extra[] = {"--tls-cert", cert, "--tls-key", key, "--token-file", token, NULL};
    start_server_with(extra);
    /* The certificate names localhost: connect by that name. */
    char *colon = strchr(addr, ':');
    char port[16];
    snprintf(port, sizeof(port), "%s", colon + 1);
    snprintf(addr, sizeof(addr), "localhost:%s", port);
    snprintf(cli_flags, sizeof(cli_flags), "--tls-ca %s --token-file %s", cert, token);
    write_catalog();
}

static void teardown_tls(void)
{
    stop_server();
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tls_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tls_dir);
}

TestSuite(cli_tls, .init = setup_tls, .fini = teardown_tls, .timeout = 120);

Test(cli_tls, tls_and_token)
{
    jsonv *v = cli_json(0, "health");
    cr_assert_str_eq(str(v, "status"), "SERVING");
    jsonv_free(v);
    char args[1024];
    snprintf(args, sizeof(args), "load shop --create --vectors %s --attrs %s", path_in("items.npy"),
             path_in("items.csv"));
    v = cli_json(0, args);
    cr_assert_eq(num(v, "upserted"), N_ITEMS);
    jsonv_free(v);
    char vec[512];
    vector_arg(vec, sizeof(vec), &vecs[7 * DIM]);
    snprintf(args, sizeof(args), "search shop --vector %s -k 1", vec);
    v = cli_json(0, args);
    cr_assert_str_eq(
        str(jsonv_at(jsonv_get(jsonv_at(jsonv_get(v, "results"), 0), "hits"), 0), "id"), "item-7");
    jsonv_free(v);
    /* A wrong token is refused; so is plaintext. */
    FILE *f = fopen(path_in("wrong"), "w");
    fprintf(f, "nope\n");
    fclose(f);
    char saved[1024];
    snprintf(saved, sizeof(saved), "%s", cli_flags);
    snprintf(cli_flags, sizeof(cli_flags), "--tls-ca %s/cert.pem --token-file %s", tls_dir,
             path_in("wrong"));
    v = cli_json(1, "collections list");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "UNAUTHENTICATED");
    jsonv_free(v);
    snprintf(cli_flags, sizeof(cli_flags), "--timeout-ms 3000");
    v = cli_json(1, "collections list");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "UNAVAILABLE");
    jsonv_free(v);
    snprintf(cli_flags, sizeof(cli_flags), "%s", saved);
}

/* Issue 12: what a new user trips on. */
Test(cli, newcomer_paper_cuts)
{
    int status;
    char *out = run_cli(&status, "--version");
    cr_assert_eq(status, 0);
    cr_assert(strstr(out, AFF_VERSION_STRING), "%s", out);
    free(out);
    out = run_cli(&status, "help");
    cr_assert_eq(status, 0);
    cr_assert(strstr(out, "usage: affinity") && strstr(out, "--attrs is CSV"), "%s", out);
    free(out);
    /* A global-flag typo: one JSON error (with --json), not the whole usage. */
    jsonv *v = cli_json(2, "--adr x info");
    cr_assert(strstr(str(jsonv_get(v, "error"), "message"), "--adr"));
    jsonv_free(v);
    v = cli_json(2, "frobnicate");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "USAGE");
    jsonv_free(v);
    /* info reports every batching field. */
    v = cli_json(0, "info");
    cr_assert(jsonv_get(jsonv_get(v, "batch_stats"), "queries"));
    cr_assert(jsonv_get(jsonv_get(v, "batch_stats"), "queued"));
    jsonv_free(v);
    /* A failed load --create leaves no collection behind. */
    FILE *f = fopen(path_in("dup.csv"), "w");
    fprintf(f, "id\n");
    for (int i = 0; i < N_ITEMS; i++)
        fprintf(f, "%s\n", i == N_ITEMS - 1 ? "bad\xff" : "ok");
    fclose(f);
    out = run_cli(&status, "load tmpcol --create --batch 1000 --vectors %s --attrs %s",
                  path_in("items.npy"), path_in("dup.csv"));
    cr_assert_neq(status, 0, "%s", out);
    free(out);
    v = cli_json(1, "collections describe tmpcol");
    cr_assert_str_eq(str(jsonv_get(v, "error"), "name"), "NOT_FOUND");
    jsonv_free(v);
    /* Rejected events make the exit status 1; user get prints a date, not milliseconds. */
    load_both();
    out = run_cli(&status, "events shop u9 view:item-1 view:no-such-item");
    cr_assert_eq(status, 1, "%s", out);
    cr_assert(strstr(out, "applied 1 of 2"), "%s", out);
    free(out);
    out = run_cli(&status, "user get shop u9");
    cr_assert_eq(status, 0);
    cr_assert(strstr(out, " UTC"), "%s", out);
    free(out);
}

/* measurement: experiments create/list/get/stop, recommend --surface, events with
 * ITEM@RECOMMENDATION_ID, stats. */
Test(cli, stats_and_experiments)
{
    load_both();
    jsonv *v = cli_json(1, "experiments create home-ab --collection shop --surface home "
                           "--arm name=a,share=0.5 --arm name=b,share=0.4,diversity=0.4");
    const jsonv *e = jsonv_get(v, "error");
    cr_assert_str_eq(str(e, "name"), "INVALID_ARGUMENT");
    cr_assert_str_eq(str(e, "message"),
                     "experiment.arms: the shares add up to 0.9; they must add up to 1");
    jsonv_free(v);
    v = cli_json(0, "experiments create home-ab --collection shop --surface home "
                    "--arm name=a,share=0.5 --arm name=b,share=0.5,diversity=0.4 "
                    "--bandit ctr --floor 0.2 --update-every 10 --seed 3");
    cr_assert_str_eq(str(v, "id"), "home-ab");
    cr_assert(jsonv_get(v, "running")->boolean);
    cr_assert(jsonv_get(jsonv_get(v, "bandit"), "enabled")->boolean);
    jsonv_free(v);
    v = cli_json(0, "events shop u7 view:item-3");
    jsonv_free(v);
    v = cli_json(0, "recommend shop --user u7 -k 3 --surface home");
    cr_assert_str_eq(str(v, "experiment"), "home-ab");
    char arm[8], rid[40], item[32];
    snprintf(arm, sizeof arm, "%s", str(v, "arm"));
    snprintf(rid, sizeof rid, "%s", str(v, "recommendation_id"));
    snprintf(item, sizeof item, "%s", str(jsonv_at(jsonv_get(v, "hits"), 0), "id"));
    cr_assert(strcmp(arm, "a") == 0 || strcmp(arm, "b") == 0, "%s", arm);
    jsonv_free(v);
    char args[512];
    snprintf(args, sizeof args, "events shop u7 impression:%s@%s click:%s@%s click:item-9@%s", item,
             rid, item, rid, "00000000000000000000000000000000");
    v = cli_json(0, args);
    cr_assert_eq(num(v, "applied"), 3);
    jsonv_free(v);
    v = cli_json(0, "stats shop --surface home --since 1h");
    const jsonv *rows = jsonv_get(v, "rows");
    cr_assert_eq(rows->n, 1);
    const jsonv *r = jsonv_at(rows, 0);
    cr_assert_str_eq(str(r, "arm"), arm);
    cr_assert_eq(num(r, "responses"), 1);
    cr_assert_eq(num(r, "impressions"), 1);
    cr_assert_eq(num(r, "clicks"), 1);
    cr_assert_eq(num(r, "ctr"), 1.0);
    cr_assert_eq(num(jsonv_get(v, "unattributed"), "click"), 1);
    jsonv_free(v);
    v = cli_json(0, "experiments get home-ab");
    const jsonv *arms = jsonv_get(v, "arms");
    cr_assert_eq(arms->n, 2);
    double clicks = 0;
    for (size_t i = 0; i < arms->n; i++)
        clicks += num(jsonv_get(jsonv_at(arms, i), "stats"), "clicks");
    cr_assert_eq(clicks, 1);
    jsonv_free(v);
    v = cli_json(0, "experiments stop home-ab");
    cr_assert(!jsonv_get(v, "running")->boolean);
    jsonv_free(v);
    v = cli_json(0, "experiments list");
    cr_assert_eq(jsonv_get(v, "experiments")->n, 1);
    jsonv_free(v);
    v = cli_json(2, "stats --since yesterday");
    jsonv_free(v);
}

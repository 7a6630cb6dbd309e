/*
 * console.c: the web console's page and JSON API (see console.h). Runs on the metrics
 * daemon's thread, one request at a time; a shopper lookup waits for its pipeline job (one
 * engine query) on a condition variable. The page is src/console/console.html, compiled in by
 * src/console/embed.cmake (console_page.c in the build tree).
 */
#include "console.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jsonw.h"

extern const char console_page_html[];
extern const size_t console_page_html_len;

struct aff_console {
    console_config cfg;
};

int console_create(aff_console **out, const console_config *cfg, aff_err *err)
{
    *out = NULL;
    aff_console *c = calloc(1, sizeof *c);
    if (!c) return aff__fail(err, AFF_ENOMEM, "console: out of memory");
    c->cfg = *cfg;
    *out = c;
    return AFF_OK;
}

void console_destroy(aff_console *c)
{
    free(c);
}

/* ---- answers --------------------------------------------------------------------------------- */

static void answer_text(metrics_http_response *resp, unsigned status, const char *text)
{
    resp->status = status;
    resp->content_type = "text/plain; charset=utf-8";
    resp->body = (char *)text;
    resp->len = strlen(text);
    resp->body_static = true;
}

/* Hands the buffer to the response (or answers 500 when writing it ran out of memory). */
static void answer_json(metrics_http_response *resp, jsonw *b)
{
    if (b->oom || !b->p) {
        free(b->p);
        answer_text(resp, 500, "out of memory\n");
        return;
    }
    resp->status = 200;
    resp->content_type = "application/json; charset=utf-8";
    resp->body = b->p;
    resp->len = b->len;
}

static void answer_error(metrics_http_response *resp, const aff_err *err)
{
    unsigned status = err->code == AFF_EINVAL         ? 400
                      : err->code == AFF_ENOTFOUND    ? 404
                      : err->code == AFF_EUNAVAILABLE ? 503
                                                      : 500;
    jsonw b = {0};
    jsonw_printf(&b, "{\"error\":");
    jsonw_str(&b, err->msg);
    jsonw_printf(&b, "}");
    answer_json(resp, &b);
    if (resp->status == 200) resp->status = status;
}

static const char *arg(const metrics_http_request *req, const char *name)
{
    const char *v = req->arg(req, name);
    return v ? v : "";
}

/* ---- pieces ---------------------------------------------------------------------------------- */

static void counts_json(jsonw *b, const outcomes_counts *c)
{
    uint64_t imp = c->n[OUTCOMES_IMPRESSION], clk = c->n[OUTCOMES_CLICK],
             atc = c->n[OUTCOMES_ADD_TO_CART], buy = c->n[OUTCOMES_PURCHASE];
    double lo, hi, clo, chi;
    outcomes_wilson(clk, imp, &lo, &hi);
    outcomes_wilson(buy, imp, &clo, &chi);
    jsonw_printf(b,
                 "\"responses\":%llu,\"impressions\":%llu,\"clicks\":%llu,\"add_to_carts\":%llu,"
                 "\"purchases\":%llu,\"revenue\":",
                 (unsigned long long)c->responses, (unsigned long long)imp, (unsigned long long)clk,
                 (unsigned long long)atc, (unsigned long long)buy);
    jsonw_num(b, c->revenue);
    jsonw_printf(b, ",\"ctr\":");
    jsonw_num(b, imp ? (double)clk / (double)imp : 0.0);
    jsonw_printf(b, ",\"ctr_low\":");
    jsonw_num(b, lo);
    jsonw_printf(b, ",\"ctr_high\":");
    jsonw_num(b, hi);
    jsonw_printf(b, ",\"add_to_cart_rate\":");
    jsonw_num(b, imp ? (double)atc / (double)imp : 0.0);
    jsonw_printf(b, ",\"conversion_rate\":");
    jsonw_num(b, imp ? (double)buy / (double)imp : 0.0);
    jsonw_printf(b, ",\"conversion_low\":");
    jsonw_num(b, clo);
    jsonw_printf(b, ",\"conversion_high\":");
    jsonw_num(b, chi);
    jsonw_printf(b, ",\"revenue_per_mille\":");
    jsonw_num(b, imp ? c->revenue * 1000.0 / (double)imp : 0.0);
}

static void points_json(jsonw *b, const outcomes_row *r)
{
    jsonw_printf(b, "\"points\":[");
    for (uint32_t p = 0; p < r->n_points; p++) {
        const outcomes_counts *c = &r->points[p].c;
        jsonw_printf(b,
                     "%s{\"start_ms\":%lld,\"impressions\":%llu,\"clicks\":%llu,"
                     "\"purchases\":%llu}",
                     p ? "," : "", (long long)r->points[p].start_ms,
                     (unsigned long long)c->n[OUTCOMES_IMPRESSION],
                     (unsigned long long)c->n[OUTCOMES_CLICK],
                     (unsigned long long)c->n[OUTCOMES_PURCHASE]);
    }
    jsonw_printf(b, "]");
}

static const char *metric_name(aff_metric m)
{
    return m == AFF_METRIC_COSINE ? "cosine" : m == AFF_METRIC_L2 ? "l2" : "ip";
}

/* ---- routes ---------------------------------------------------------------------------------- */

static void api_overview(aff_console *c, metrics_http_response *resp)
{
    aff_err err;
    engine_collection_info *infos = NULL;
    size_t n = 0;
    if (engine_list_collections(c->cfg.engine, &infos, &n, &err)) {
        answer_error(resp, &err);
        return;
    }
    jsonw b = {0};
    jsonw_printf(&b, "{\"version\":");
    jsonw_str(&b, AFF_VERSION_STRING);
    jsonw_printf(&b, ",\"backend\":");
    jsonw_str(&b, c->cfg.backend);
    jsonw_printf(&b, ",\"device\":");
    jsonw_str(&b, c->cfg.device);
    jsonw_printf(&b, ",\"experiments_running\":%zu,\"collections\":[",
                 c->cfg.experiments ? experiments_running(c->cfg.experiments) : 0);
    for (size_t i = 0; i < n; i++) {
        const engine_collection_info *ci = &infos[i];
        jsonw_printf(&b, "%s{\"name\":", i ? "," : "");
        jsonw_str(&b, ci->name);
        jsonw_printf(&b,
                     ",\"dim\":%u,\"metric\":\"%s\",\"items\":%llu,\"memory_bytes\":%llu,"
                     "\"model\":",
                     ci->dim, metric_name(ci->metric), (unsigned long long)ci->n_items,
                     (unsigned long long)ci->memory_bytes);
        model_info mi;
        if (c->cfg.model && model_get_info(c->cfg.model, ci->name, &mi, &err) == AFF_OK) {
            jsonw_printf(&b,
                         "{\"state\":\"%s\",\"version\":%llu,\"trained_at_ms\":%lld,"
                         "\"events_used\":%llu,\"users\":%llu,\"items\":%llu,\"loss\":",
                         model_state_name(mi.state),
                         (unsigned long long)(mi.has_model ? mi.current.id : 0),
                         (long long)(mi.has_model ? mi.current.trained_at_ms : 0),
                         (unsigned long long)(mi.has_model ? mi.current.events_used : 0),
                         (unsigned long long)(mi.has_model ? mi.current.users : 0),
                         (unsigned long long)(mi.has_model ? mi.current.items : 0));
            jsonw_num(&b, mi.has_model ? mi.current.loss : 0.0);
            jsonw_printf(&b, ",\"training\":%s,\"events_since_train\":%llu}",
                         mi.job_running ? "true" : "false",
                         (unsigned long long)mi.events_since_train);
        } else {
            jsonw_printf(&b, "null");
        }
        jsonw_printf(&b, "}");
    }
    jsonw_printf(&b, "]}");
    free(infos);
    answer_json(resp, &b);
}

static void experiment_json(aff_console *c, jsonw *b, const experiment *e, uint32_t step_ms,
                            aff_err *err, int *rc)
{
    outcomes_row rows[EXPERIMENTS_MAX_ARMS];
    memset(rows, 0, sizeof rows);
    if ((*rc = experiments_arm_stats(c->cfg.outcomes, e, step_ms, rows, err))) goto out;
    jsonw_printf(b, "{\"id\":");
    jsonw_str(b, e->id);
    jsonw_printf(b, ",\"collection\":");
    jsonw_str(b, e->collection);
    jsonw_printf(b, ",\"surface\":");
    jsonw_str(b, e->surface);
    jsonw_printf(b,
                 ",\"running\":%s,\"created_ms\":%lld,\"stopped_ms\":%lld,\"bandit\":{"
                 "\"enabled\":%s,\"metric\":\"%s\",\"floor\":",
                 e->running ? "true" : "false", (long long)e->created_ms, (long long)e->stopped_ms,
                 e->bandit.enabled ? "true" : "false",
                 e->bandit.metric == EXPERIMENTS_METRIC_CTR ? "ctr" : "conversion");
    jsonw_num(b, e->bandit.floor);
    jsonw_printf(b, ",\"update_every\":%u,\"version\":%llu},\"arms\":[", e->bandit.update_every,
                 (unsigned long long)e->version);
    for (uint32_t i = 0; i < e->n_arms; i++) {
        jsonw_printf(b, "%s{\"name\":", i ? "," : "");
        jsonw_str(b, e->arms[i].name);
        jsonw_printf(b, ",\"preset\":");
        jsonw_str(b, e->arms[i].preset);
        jsonw_printf(b, ",\"configured_share\":");
        jsonw_num(b, e->arms[i].share);
        jsonw_printf(b, ",\"share\":");
        jsonw_num(b, e->shares[i]);
        jsonw_printf(b, ",");
        counts_json(b, &rows[i].c);
        jsonw_printf(b, ",");
        points_json(b, &rows[i]);
        jsonw_printf(b, "}");
    }
    jsonw_printf(b, "]}");
out:
    for (uint32_t i = 0; i < EXPERIMENTS_MAX_ARMS; i++)
        free(rows[i].points);
}

static bool step_arg(const metrics_http_request *req, uint32_t *step_ms,
                     metrics_http_response *resp)
{
    const char *s = arg(req, "step_s");
    char *end;
    unsigned long v = *s ? strtoul(s, &end, 10) : 60;
    if ((*s && *end) || v > UINT32_MAX / 1000) { /* its range: outcomes_query_run */
        aff_err err;
        aff__fail(&err, AFF_EINVAL, "step_s must be a number of seconds");
        answer_error(resp, &err);
        return false;
    }
    *step_ms = (uint32_t)v * 1000u;
    return true;
}

static void api_experiments(aff_console *c, const metrics_http_request *req,
                            metrics_http_response *resp)
{
    aff_err err;
    uint32_t step_ms;
    if (!step_arg(req, &step_ms, resp)) return;
    experiment *list = NULL;
    size_t n = 0;
    if (c->cfg.experiments &&
        experiments_list(c->cfg.experiments, arg(req, "collection"), &list, &n, &err)) {
        answer_error(resp, &err);
        return;
    }
    jsonw b = {0};
    int rc = AFF_OK;
    jsonw_printf(&b, "{\"experiments\":[");
    for (size_t i = 0; i < n && !rc; i++) {
        if (i) jsonw_printf(&b, ",");
        experiment_json(c, &b, &list[i], step_ms, &err, &rc);
    }
    jsonw_printf(&b, "]}");
    free(list);
    if (rc) {
        free(b.p);
        answer_error(resp, &err);
        return;
    }
    answer_json(resp, &b);
}

static void api_stats(aff_console *c, const metrics_http_request *req, metrics_http_response *resp)
{
    aff_err err;
    if (!c->cfg.outcomes) {
        aff__fail(&err, AFF_EUNAVAILABLE, "no outcome metrics");
        answer_error(resp, &err);
        return;
    }
    outcomes_query q = {.collection = arg(req, "collection"),
                        .surface = arg(req, "surface"),
                        .experiment = arg(req, "experiment"),
                        .from_ms = strtoll(arg(req, "from_ms"), NULL, 10),
                        .to_ms = strtoll(arg(req, "to_ms"), NULL, 10)};
    outcomes_result res;
    if (outcomes_query_run(c->cfg.outcomes, &q, &res, &err)) {
        answer_error(resp, &err);
        return;
    }
    jsonw b = {0};
    jsonw_printf(&b, "{\"from_ms\":%lld,\"to_ms\":%lld,\"unattributed\":{", (long long)res.from_ms,
                 (long long)res.to_ms);
    for (int k = 0; k < OUTCOMES_KINDS; k++)
        jsonw_printf(&b, "%s\"%s\":%llu", k ? "," : "", outcomes_kind_name((outcomes_kind)k),
                     (unsigned long long)res.unattributed[k]);
    jsonw_printf(&b, "},\"rows\":[");
    for (size_t i = 0; i < res.n_rows; i++) {
        const outcomes_row *r = &res.rows[i];
        jsonw_printf(&b, "%s{\"collection\":", i ? "," : "");
        jsonw_str(&b, r->collection);
        jsonw_printf(&b, ",\"surface\":");
        jsonw_str(&b, r->surface);
        jsonw_printf(&b, ",\"strategy\":");
        jsonw_str(&b, r->strategy);
        jsonw_printf(&b, ",\"experiment\":");
        jsonw_str(&b, r->experiment);
        jsonw_printf(&b, ",\"arm\":");
        jsonw_str(&b, r->arm);
        jsonw_printf(&b, ",");
        counts_json(&b, &r->c);
        jsonw_printf(&b, "}");
    }
    jsonw_printf(&b, "]}");
    outcomes_result_free(&res);
    answer_json(resp, &b);
}

/* The last CONSOLE_EVENTS events of the bounded history, newest first. */
#define CONSOLE_EVENTS 50
typedef struct event_ring {
    char item[CONSOLE_EVENTS][AFF_MAX_ID_LEN + 1];
    char type[CONSOLE_EVENTS][64];
    int64_t ts[CONSOLE_EVENTS];
    double value[CONSOLE_EVENTS];
    uint64_t n;
} event_ring;

static int keep_event(void *ctx, uint64_t seq, const store_event *e)
{
    (void)seq;
    event_ring *r = ctx;
    size_t i = r->n++ % CONSOLE_EVENTS;
    snprintf(r->item[i], sizeof r->item[i], "%s", e->item_id);
    snprintf(r->type[i], sizeof r->type[i], "%s", e->type);
    r->ts[i] = e->ts_ms;
    r->value[i] = e->value;
    return 0;
}

typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
} waiter;

static void job_done(pipeline_job *job, void *user)
{
    (void)job;
    waiter *w = user;
    pthread_mutex_lock(&w->mu);
    w->done = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static const char *const reason_names[] = {"",
                                           "similar_to_history_item",
                                           "similar_to_item",
                                           "matches_vector",
                                           "liked_by_similar_shoppers",
                                           "popular",
                                           "trending",
                                           "promoted",
                                           "pinned",
                                           "exploration"};

static void recommendations_json(aff_console *c, jsonw *b, const char *collection, const char *user,
                                 const char *surface, uint32_t k)
{
    pipeline_request q = {.kind = PIPELINE_RECOMMEND,
                          .collection = collection,
                          .user_id = user,
                          .k = k,
                          .surface = surface,
                          .unrecorded = true};
    waiter w = {.done = false};
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    pipeline_job *job = NULL;
    bool pending = false;
    aff_err err;
    int rc = pipeline_start(c->cfg.pipeline, &q, batcher_now_ns() + 5000000000ll, job_done, &w,
                            &job, &pending, &err);
    if (!rc && pending) {
        pthread_mutex_lock(&w.mu);
        while (!w.done)
            pthread_cond_wait(&w.cv, &w.mu);
        pthread_mutex_unlock(&w.mu);
    }
    const pipeline_output *o = rc ? NULL : pipeline_job_output(job);
    if (o && o->status) {
        rc = o->status;
        err = o->err;
    }
    if (rc) {
        jsonw_printf(b, "{\"error\":");
        jsonw_str(b, err.msg);
        jsonw_printf(b, "}");
    } else {
        static const char *const sources[] = {[0] = "",           [1] = "vector", [2] = "profile",
                                              [3] = "popularity", [10] = "item",  [20] = "model"};
        const char *src =
            (size_t)o->source < sizeof sources / sizeof sources[0] && sources[o->source]
                ? sources[o->source]
                : "";
        jsonw_printf(b, "{\"source\":\"%s\",\"strategy\":", src);
        jsonw_str(b, o->strategy);
        jsonw_printf(b, ",\"experiment\":");
        jsonw_str(b, o->experiment);
        jsonw_printf(b, ",\"arm\":");
        jsonw_str(b, o->arm);
        jsonw_printf(b, ",\"hits\":[");
        for (uint32_t i = 0; i < o->n_hits[0]; i++) {
            const pipeline_hit *h = &o->hits[0][i];
            jsonw_printf(b, "%s{\"id\":", i ? "," : "");
            jsonw_str(b, h->id);
            jsonw_printf(b, ",\"score\":");
            jsonw_num(b, h->score);
            jsonw_printf(b, ",\"reason\":\"%s\",\"related\":",
                         (size_t)h->reason.kind < sizeof reason_names / sizeof reason_names[0]
                             ? reason_names[h->reason.kind]
                             : "");
            jsonw_str(b, h->reason.related_id);
            jsonw_printf(b, ",\"promotion\":");
            jsonw_str(b, h->reason.promotion ? h->reason.promotion : "");
            jsonw_printf(b, "}");
        }
        jsonw_printf(b, "]}");
    }
    pipeline_job_destroy(job);
    pthread_cond_destroy(&w.cv);
    pthread_mutex_destroy(&w.mu);
}

static void api_shopper(aff_console *c, const metrics_http_request *req,
                        metrics_http_response *resp)
{
    aff_err err;
    const char *collection = arg(req, "collection"), *user = arg(req, "user");
    uint32_t dim;
    if (engine_collection_dim(c->cfg.engine, collection, &dim, &err)) {
        answer_error(resp, &err);
        return;
    }
    size_t ulen = strlen(user);
    if (ulen < 1 || ulen > AFF_MAX_ID_LEN) {
        aff__fail(&err, AFF_EINVAL, "user must be 1..%d bytes", AFF_MAX_ID_LEN);
        answer_error(resp, &err);
        return;
    }
    const char *ks = arg(req, "k");
    uint32_t k = *ks ? (uint32_t)strtoul(ks, NULL, 10) : 10;
    if (k < 1 || k > 100) k = 10;
    event_ring *ring = calloc(1, sizeof *ring);
    profiles_user_info *info = malloc(sizeof *info);
    if (!ring || !info) {
        free(ring);
        free(info);
        answer_text(resp, 500, "out of memory\n");
        return;
    }
    jsonw b = {0};
    jsonw_printf(&b, "{\"collection\":");
    jsonw_str(&b, collection);
    jsonw_printf(&b, ",\"user\":");
    jsonw_str(&b, user);
    int rc = profiles_get_user(c->cfg.profiles, collection, user, info, &err);
    jsonw_printf(&b, ",\"known\":%s,\"counts\":{", rc == AFF_OK ? "true" : "false");
    for (uint32_t i = 0; rc == AFF_OK && i < info->n_counts; i++) {
        jsonw_printf(&b, "%s", i ? "," : "");
        jsonw_str(&b, info->counts[i].type);
        jsonw_printf(&b, ":%llu", (unsigned long long)info->counts[i].count);
    }
    jsonw_printf(&b, "},\"traits\":");
    profiles_traits tr;
    if (rc == AFF_OK &&
        profiles_user_traits(c->cfg.profiles, collection, user, &tr, &err) == AFF_OK) {
        jsonw_printf(&b,
                     "{\"price_sensitivity\":%.6g,\"recency_days\":%.6g,"
                     "\"frequency_90d\":%u,\"monetary_90d\":%.6g,\"rfm\":\"%u%u%u\","
                     "\"loyalty\":%.6g,\"activity\":%.6g,\"purchase_intent\":%.6g}",
                     (double)tr.price_sensitivity, (double)tr.recency_days, tr.frequency_90d,
                     tr.monetary_90d, tr.r, tr.f, tr.m, (double)tr.loyalty, (double)tr.activity,
                     (double)tr.purchase_intent);
    } else {
        jsonw_printf(&b, "null");
    }
    jsonw_printf(&b, ",\"events\":[");
    if (rc == AFF_OK &&
        profiles_history(c->cfg.profiles, collection, user, keep_event, ring, &err) == AFF_OK) {
        uint64_t shown = ring->n < CONSOLE_EVENTS ? ring->n : CONSOLE_EVENTS;
        for (uint64_t j = 0; j < shown; j++) {
            size_t i = (size_t)((ring->n - 1 - j) % CONSOLE_EVENTS);
            jsonw_printf(&b, "%s{\"item\":", j ? "," : "");
            jsonw_str(&b, ring->item[i]);
            jsonw_printf(&b, ",\"type\":");
            jsonw_str(&b, ring->type[i]);
            jsonw_printf(&b, ",\"ts_ms\":%lld,\"value\":", (long long)ring->ts[i]);
            jsonw_num(&b, ring->value[i]);
            jsonw_printf(&b, "}");
        }
    }
    jsonw_printf(&b, "],\"recommendations\":");
    recommendations_json(c, &b, collection, user, arg(req, "surface"), k);
    jsonw_printf(&b, "}");
    free(ring);
    free(info);
    answer_json(resp, &b);
}

void console_handle(void *ctx, const metrics_http_request *req, metrics_http_response *resp)
{
    aff_console *c = ctx;
    if (strcmp(req->path, "/console") == 0 || strcmp(req->path, "/console/") == 0) {
        resp->status = 200;
        resp->content_type = "text/html; charset=utf-8";
        resp->body = (char *)console_page_html;
        resp->len = console_page_html_len;
        resp->body_static = true;
        return;
    }
    if (strncmp(req->path, "/console/api/", 13) != 0) {
        answer_text(resp, 404, "not found: the console is at /console\n");
        return;
    }
    int auth = transport_check_console_auth(c->cfg.transport, req->authorization);
    if (auth == AFF_EUNAUTHENTICATED) {
        answer_text(resp, 401, "a bearer token is required (the API's admin token)\n");
        return;
    }
    if (auth) {
        answer_text(resp, 403, "the console needs an admin token for every collection\n");
        return;
    }
    const char *route = req->path + 13;
    if (strcmp(route, "overview") == 0)
        api_overview(c, resp);
    else if (strcmp(route, "experiments") == 0)
        api_experiments(c, req, resp);
    else if (strcmp(route, "stats") == 0)
        api_stats(c, req, resp);
    else if (strcmp(route, "shopper") == 0)
        api_shopper(c, req, resp);
    else
        answer_text(resp, 404, "not found: overview, experiments, stats or shopper\n");
}

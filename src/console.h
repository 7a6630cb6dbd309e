/*
 * console.h: the read-only web console, served by the metrics endpoint (metrics.h) under
 * /console: one page of plain HTML, JavaScript and SVG compiled into the binary (no CDN, no
 * request to anywhere but this server) and the JSON it reads:
 *
 *   GET /console                       the page (holds no data; asks for the token)
 *   GET /console/api/overview          server, collections and their model state
 *   GET /console/api/experiments       every experiment with per-arm counts, rates, Wilson
 *                                      intervals and per-step points (?step_s=60)
 *   GET /console/api/stats             GetStats as JSON (?collection=&surface=&experiment=)
 *   GET /console/api/shopper           ?collection=&user=[&surface=&k=]: recent events,
 *                                      traits and the recommendations they would get now,
 *                                      with reasons (not recorded, not counted)
 *
 * The API answers 401 without a valid bearer token and 403 for a key that is not an admin key
 * for every collection, when the server has tokens (transport_check_console_auth); without
 * tokens it is open, like the gRPC API. Every figure comes from the same module calls as
 * GetStats, GetExperiment, GetModel and GetUser, so the console and the API agree.
 */
#ifndef AFFINITY_CONSOLE_H
#define AFFINITY_CONSOLE_H

#include "engine.h"
#include "experiments.h"
#include "metrics.h"
#include "model.h"
#include "outcomes.h"
#include "pipeline.h"
#include "profiles.h"
#include "status.h"
#include "transport.h"

typedef struct aff_console aff_console;

typedef struct console_config {
    aff_engine *engine; /* every pointer borrowed; model, outcomes, experiments may be NULL */
    aff_model *model;
    aff_profiles *profiles;
    aff_pipeline *pipeline;
    aff_outcomes *outcomes;
    aff_experiments *experiments;
    const transport *transport; /* tokens */
    const char *backend, *device;
} console_config;

int console_create(aff_console **out, const console_config *cfg, aff_err *err);
void console_destroy(aff_console *c);
/* The metrics_http_fn to install for "/console" (ctx: the console). */
void console_handle(void *ctx, const metrics_http_request *req, metrics_http_response *resp);

#endif

/*
 * config.h: the server's configuration, from flags and AFFINITY_* environment variables.
 *
 * Every flag --name has an environment equivalent AFFINITY_NAME (dashes become underscores);
 * a flag given on the command line wins over the environment. config_parse validates every
 * value and says what was wrong and what is allowed. The configuration is the only global
 * state of the server: main() fills one aff_config before anything starts and hands out
 * const pointers; nothing changes it afterwards.
 */
#ifndef AFFINITY_CONFIG_H
#define AFFINITY_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "engine.h"
#include "log.h"
#include "model.h"
#include "profiles.h"
#include "widgets.h"
#include "status.h"

#define CONFIG_PATH_MAX 1024

/* --event-weights: the four built-in types' weights and the custom types. */
typedef struct config_event_weights {
    float view, click, add_to_cart, purchase;
    uint32_t n_custom;
    char custom_names[PROFILES_MAX_CUSTOM_TYPES][STORE_MAX_TYPE_LEN + 1];
    float custom_weights[PROFILES_MAX_CUSTOM_TYPES];
} config_event_weights;

typedef struct aff_config {
    char listen[256]; /* host:port; port 0 picks a free port */
    uint32_t threads; /* completion-queue threads */
    engine_backend_choice backend;
    uint32_t max_batch;               /* queries per engine call */
    uint32_t max_wait_us;             /* longest a request waits for a batch to fill */
    uint32_t queue_limit;             /* requests queued per collection */
    uint32_t batch_workers;           /* engine calls at once */
    uint32_t max_message_bytes;       /* largest gRPC message in or out */
    char tls_cert[CONFIG_PATH_MAX];   /* PEM certificate chain; "" = plaintext */
    char tls_key[CONFIG_PATH_MAX];    /* PEM private key */
    char token_file[CONFIG_PATH_MAX]; /* file holding the bearer token; "" = no auth */
    char data_dir[CONFIG_PATH_MAX];   /* storage directory; "" = in memory only */
    char metrics_listen[256];         /* host:port of the metrics endpoint; "" = off */
    char port_file[CONFIG_PATH_MAX];  /* where to write the bound port once listening */
    bool demo;                        /* load the built-in demo shop */
    aff_log_level log_level;
    uint32_t grace_seconds;   /* how long in-flight calls may take after SIGTERM */
    uint32_t drain_notice_ms; /* NOT_SERVING while still listening, before closing */
    int gpu_device;           /* CUDA device ordinal */
    bool fp32;                /* GPU catalog in fp32 instead of fp16 */
    uint32_t cpu_threads;     /* FAISS/BLAS threads; 0 = all cores */

    backend_precision cpu_precision; /* flat collections on the CPU backend; AUTO = fastest */

    config_event_weights event_weights;
    double profile_half_life_hours;       /* profile decay */
    double popularity_half_life_hours;    /* popularity decay */
    uint32_t history_length;              /* events kept per user */
    uint32_t train_interval_s;            /* background retraining period; 0 = off */
    uint32_t train_after_events;          /* retrain after this many new events; 0 = off */
    uint32_t model_factors;               /* default learned factors */
    uint32_t model_epochs;                /* default training epochs */
    uint32_t train_threads;               /* threads per training job; 0 = all cores */
    uint32_t fold_in_history;             /* interactions a fold-in reads; 0 = all */
    char serving_config[CONFIG_PATH_MAX]; /* rule presets (JSON); "" = none */
    uint32_t max_connections;             /* connections open at once; 0 = from RLIMIT_NOFILE */
    uint32_t idle_timeout_ms;             /* a connection without calls this long is closed */
    uint32_t handshake_timeout_ms;        /* a new connection's handshake must finish by then */
    uint32_t max_header_bytes;            /* largest request metadata (all headers) accepted */
    char tokens_file[CONFIG_PATH_MAX];    /* role tokens (transport_auth.h); "" = none */
    char tls_client_ca[CONFIG_PATH_MAX];  /* mTLS: CA of client certificates; "" = off */
    uint32_t event_retention_days;        /* 0 = events kept until DeleteUser */
    uint32_t event_retention_interval_s;  /* seconds between retention passes */
    uint32_t heap_trim_mib;               /* trim malloc's free memory past this; 0 = off */
    uint32_t attribution_window_s;        /* measurement: events attributed within this */
    uint32_t attribution_max_records;     /* measurement: recommendations remembered at most */
    /* widgets (issue 13) */
    bool widgets;                         /* maintain widget statistics from events */
    char widget_session_key[STORE_MAX_CONTEXT_LEN + 1];
    char widget_order_key[STORE_MAX_CONTEXT_LEN + 1];
    uint32_t widget_window_minutes;  /* basket time bucket without a session/order id */
    uint32_t widget_neighbours;      /* co-occurrence neighbours kept per item and table */
    uint32_t widget_min_support;     /* baskets a pair needs to be shown */
    uint32_t widget_user_events;     /* recent events per user the widgets consider */
    double trend_short_hours, trend_long_hours;
    uint32_t trend_min_events;
    double best_seller_half_life_hours;
    uint32_t widget_refresh_ms; /* trending and best sellers are ranked again this often */
    char log_urls[1024];                  /* replication: NATS servers; "" = single node */
    char log_stream[64];                  /* the stream's name */
    uint32_t log_replicas;                /* stream replicas when created here */
    char log_creds[CONFIG_PATH_MAX];      /* NATS credentials file; "" = none */
    char log_token_file[CONFIG_PATH_MAX]; /* NATS token file; "" = none */
    char log_user[256];                   /* NATS user name; "" = none */
    char log_password_file[CONFIG_PATH_MAX]; /* NATS password file (with log_user) */
    char log_tls_ca[CONFIG_PATH_MAX];     /* NATS TLS: CA; "" = plaintext */
    char log_tls_cert[CONFIG_PATH_MAX];   /* NATS mutual TLS: client certificate */
    char log_tls_key[CONFIG_PATH_MAX];
    char log_ack[16];                     /* "applied" or "committed" */
    uint32_t log_dedup_window_s;          /* the stream's duplicate window */
    int log_apply_nice;                   /* the apply thread's niceness (0: unchanged) */
    uint32_t min_sequence_wait_ms;        /* longest wait for min_log_sequence */
    char bootstrap_from[256];             /* peer host:port for the first snapshot */
    char snapshot_dir[CONFIG_PATH_MAX];   /* periodic snapshots; "" = none */
    uint32_t snapshot_interval_s;
    uint32_t snapshot_keep;
    uint32_t log_retain_records;          /* kept below the oldest snapshot */
    char kafka_brokers[1024];             /* Kafka bootstrap servers; "" = no consumer */
    char kafka_topic[256];
    char kafka_group[256];
    char kafka_collection[AFF_MAX_NAME_LEN + 1];
    bool help;                            /* --help was given: print config_usage and exit 0 */
    bool version;                         /* --version was given */
} aff_config;

/* Fills *out with defaults, then the environment, then argv. AFF_EINVAL with a message
 * naming the flag, the bad value and what is allowed. */
int config_parse(aff_config *out, int argc, char **argv, aff_err *err);
/* Writes the --help text: every flag, its environment variable and its default. */
void config_usage(FILE *f, const char *prog);
/* Logs the configuration at INFO, one field per setting; the token itself is never read
 * here, and paths are shown as given. */
void config_log(const aff_config *c);
const char *config_backend_name(engine_backend_choice b);
/* Fills a profiles configuration from c; the custom types point into c. */
void config_profiles(const aff_config *c, profiles_config *out, profiles_custom_type *custom);
/* Fills a widgets configuration from c (strings point into c); user_events is capped at the
 * history length, which holds what a rebuild replays. */
void config_widgets(const aff_config *c, widgets_config *out);
/* Fills a model configuration from c (decay from the profile half-life). */
void config_model(const aff_config *c, model_config *out);

#endif

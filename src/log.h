/*
 * log.h: structured logs, one JSON object per line on stderr.
 *
 *   {"ts":"2026-11-23T21:50:01.123Z","level":"info","msg":"backend selected","backend":"cuda"}
 *
 * aff_log() takes a printf-style message; aff_log_kv() adds string fields given as
 * key, value pairs ending with NULL. Values are JSON-escaped; callers redact secrets before
 * logging them. Thread-safe: each line is written with one write(2).
 */
#ifndef AFFINITY_LOG_H
#define AFFINITY_LOG_H

#include <stddef.h>

typedef enum aff_log_level {
    AFF_LOG_DEBUG = 0,
    AFF_LOG_INFO = 1,
    AFF_LOG_WARN = 2,
    AFF_LOG_ERROR = 3,
    AFF_LOG_OFF = 4,
} aff_log_level;

/* Lines below `level` are dropped. Set once at start-up (default INFO). */
void aff_log_set_level(aff_log_level level);
aff_log_level aff_log_get_level(void);
/* Parses "debug", "info", "warn", "error", "off"; returns 0 or AFF_EINVAL. */
int aff_log_parse_level(const char *name, aff_log_level *out);

void aff_log(aff_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* msg plus string fields: aff_log_kv(AFF_LOG_INFO, "listening", "address", addr, NULL). */
void aff_log_kv(aff_log_level level, const char *msg, ...) __attribute__((sentinel));
/* msg plus n_fields string fields given as kv[2 i] (key), kv[2 i + 1] (value). */
void aff_log_fields(aff_log_level level, const char *msg, const char *const *kv, size_t n_fields);

#endif

/*
 * log.c: owns the log level and the JSON line writer. The level is the only mutable state;
 * it is set at start-up before threads exist and read with relaxed atomics after.
 */
#include "log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "affinity/affinity.h"

static _Atomic int log_level = AFF_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

void aff_log_set_level(aff_log_level level)
{
    atomic_store_explicit(&log_level, (int)level, memory_order_relaxed);
}

aff_log_level aff_log_get_level(void)
{
    return (aff_log_level)atomic_load_explicit(&log_level, memory_order_relaxed);
}

int aff_log_parse_level(const char *name, aff_log_level *out)
{
    for (int i = 0; i <= AFF_LOG_OFF; i++) {
        if (name && strcmp(name, level_names[i]) == 0) {
            *out = (aff_log_level)i;
            return AFF_OK;
        }
    }
    return AFF_EINVAL;
}

typedef struct line_buf {
    char data[4096];
    size_t len;
} line_buf;

static void put_raw(line_buf *b, const char *s, size_t n)
{
    if (n > sizeof b->data - 8 - b->len) n = sizeof b->data - 8 - b->len;
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

/* Appends s as the inside of a JSON string. */
static void put_escaped(line_buf *b, const char *s)
{
    for (; *s && b->len < sizeof b->data - 16; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            b->data[b->len++] = '\\';
            b->data[b->len++] = (char)c;
        } else if (c == '\n') {
            put_raw(b, "\\n", 2);
        } else if (c < 0x20) {
            b->len += (size_t)snprintf(b->data + b->len, 8, "\\u%04x", c);
        } else {
            b->data[b->len++] = (char)c;
        }
    }
}

static void put_field(line_buf *b, const char *key, const char *value)
{
    put_raw(b, ",\"", 2);
    put_escaped(b, key);
    put_raw(b, "\":\"", 3);
    put_escaped(b, value ? value : "");
    put_raw(b, "\"", 1);
}

static void line_begin(line_buf *b, aff_log_level level)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    b->len = 0;
    char head[96];
    int n = snprintf(head, sizeof head,
                     "{\"ts\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"level\":\"%s\"",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, level_names[level]);
    put_raw(b, head, (size_t)n);
}

static void line_end(line_buf *b)
{
    put_raw(b, "}\n", 2);
    ssize_t ignored = write(STDERR_FILENO, b->data, b->len);
    (void)ignored;
}

void aff_log(aff_log_level level, const char *fmt, ...)
{
    if (level < aff_log_get_level() || level >= AFF_LOG_OFF) return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    line_buf b;
    line_begin(&b, level);
    put_field(&b, "msg", msg);
    line_end(&b);
}

void aff_log_kv(aff_log_level level, const char *msg, ...)
{
    if (level < aff_log_get_level() || level >= AFF_LOG_OFF) return;
    line_buf b;
    line_begin(&b, level);
    put_field(&b, "msg", msg);
    va_list ap;
    va_start(ap, msg);
    for (;;) {
        const char *key = va_arg(ap, const char *);
        if (!key) break;
        const char *value = va_arg(ap, const char *);
        put_field(&b, key, value);
    }
    va_end(ap);
    line_end(&b);
}

void aff_log_fields(aff_log_level level, const char *msg, const char *const *kv, size_t n_fields)
{
    if (level < aff_log_get_level() || level >= AFF_LOG_OFF) return;
    line_buf b;
    line_begin(&b, level);
    put_field(&b, "msg", msg);
    for (size_t i = 0; i < n_fields; i++)
        put_field(&b, kv[2 * i], kv[2 * i + 1]);
    line_end(&b);
}

/*
 * kafka_in.h: an optional Kafka consumer (librdkafka) that writes a shop's clickstream
 * through the write log (docs/replication.md, "Kafka in").
 *
 * Each Kafka message is one behaviour event as a JSON object — the JSON Lines format of
 * `affinity events import` (eventfile.h): {"user_id": "u1", "item_id": "sku-9", "type":
 * "view", "timestamp_ms": 1700000000000, "value": 0}; type a built-in name or a configured
 * custom type; timestamp_ms and value optional. Every event goes to one collection.
 *
 * Each message becomes one PutEvents record with request id "kafka/<topic>/<partition>/
 * <offset>", so a message delivered again after a crash (its offset not yet committed) is
 * dropped by the stream within its dedup window. A message's offset is committed only
 * after the log committed its record; while the log is unavailable the consumer retries
 * the same message and commits nothing. Malformed messages are logged and skipped.
 */
#ifndef AFFINITY_KAFKA_IN_H
#define AFFINITY_KAFKA_IN_H

#include <stdint.h>

#include "status.h"

typedef struct aff_kafka_in aff_kafka_in;

/* Publishes one event through the log; returns 0 once committed (transport.h:
 * transport_log_ingest_event has this shape). */
typedef int (*kafka_ingest_fn)(void *ctx, const char *collection, const char *user_id,
                               const char *item_id, const char *type, int64_t timestamp_ms,
                               double value, const char *request_id, uint64_t *seq,
                               aff_err *err);

typedef struct kafka_in_config {
    const char *brokers;    /* bootstrap.servers */
    const char *topic;
    const char *group;      /* consumer group id */
    const char *collection; /* where the events go */
    kafka_ingest_fn ingest;
    void *ingest_ctx;
} kafka_in_config;

/* Creates the consumer and starts its thread. Errors: AFF_EINVAL (librdkafka refused the
 * configuration), AFF_ENOMEM. Brokers that do not answer yet are retried by librdkafka. */
int kafka_in_start(aff_kafka_in **out, const kafka_in_config *cfg, aff_err *err);
/* Events committed to the log so far, and malformed messages skipped. */
uint64_t kafka_in_ingested(const aff_kafka_in *k);
/* Stops the thread (the current message is finished or left uncommitted) and closes the
 * consumer. NULL: no-op. */
void kafka_in_stop(aff_kafka_in *k);

#endif

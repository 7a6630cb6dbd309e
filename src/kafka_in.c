/*
 * kafka_in.c: the Kafka consumer (kafka_in.h). One thread polls librdkafka, parses each
 * message with eventfile_parse_json (the one definition of the JSON event format), hands it
 * to the ingest callback until the log committed it, then stores and commits its offset.
 * Auto commit and automatic offset storing are off, so no offset passes an event the log
 * has not committed.
 */
#include "kafka_in.h"

#include <errno.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eventfile.h"
#include "log.h"

#define KAFKA_RETRY_MS 500

struct aff_kafka_in {
    kafka_in_config cfg;
    char *brokers, *topic, *group, *collection;
    rd_kafka_t *rk;
    pthread_t thread;
    atomic_bool stop;
    _Atomic uint64_t ingested, skipped;
};

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Publishes one message's event, retrying while the log is unavailable. False: stopping
 * before it was committed (its offset must not be committed). */
static bool handle(aff_kafka_in *k, const rd_kafka_message_t *m)
{
    char where[64];
    snprintf(where, sizeof where, "%" PRId32 "/%" PRId64, m->partition, m->offset);
    event_record rec;
    aff_err err;
    if (eventfile_parse_json(m->payload, m->len, &rec, &err)) {
        aff_log_kv(AFF_LOG_WARN, "kafka: malformed event skipped", "topic", k->topic,
                   "partition/offset", where, "error", err.msg, NULL);
        atomic_fetch_add(&k->skipped, 1);
        return true;
    }
    char rid[AFF_MAX_NAME_LEN + 160];
    snprintf(rid, sizeof rid, "kafka/%s/%s", k->topic, where);
    for (bool warned = false; !atomic_load(&k->stop);) {
        uint64_t seq;
        int rc = k->cfg.ingest(k->cfg.ingest_ctx, k->collection, rec.user_id, rec.item_id,
                               rec.type, rec.timestamp_ms, rec.value, rid, &seq, &err);
        if (rc == 0) {
            atomic_fetch_add(&k->ingested, 1);
            return true;
        }
        if (rc != AFF_EUNAVAILABLE) { /* the record could not be made at all */
            aff_log_kv(AFF_LOG_WARN, "kafka: event skipped", "partition/offset", where,
                       "error", err.msg, NULL);
            atomic_fetch_add(&k->skipped, 1);
            return true;
        }
        if (!warned)
            aff_log_kv(AFF_LOG_WARN, "kafka: the write log is unavailable; retrying, no offset "
                                     "committed",
                       "partition/offset", where, NULL);
        warned = true;
        sleep_ms(KAFKA_RETRY_MS);
    }
    return false;
}

static void *consume_thread(void *arg)
{
    aff_kafka_in *k = arg;
    while (!atomic_load(&k->stop)) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(k->rk, 200);
        if (!m) continue;
        if (m->err) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                aff_log_kv(AFF_LOG_WARN, "kafka: consumer error", "error",
                           rd_kafka_message_errstr(m), NULL);
            rd_kafka_message_destroy(m);
            continue;
        }
        if (handle(k, m)) {
            rd_kafka_resp_err_t e = rd_kafka_offset_store(m->rkt, m->partition, m->offset);
            if (!e) e = rd_kafka_commit_message(k->rk, m, 1);
            if (e)
                aff_log_kv(AFF_LOG_WARN, "kafka: offset not committed (the message may come "
                                         "again; the log drops the repeat)",
                           "error", rd_kafka_err2str(e), NULL);
        }
        rd_kafka_message_destroy(m);
    }
    return NULL;
}

static int set(rd_kafka_conf_t *conf, const char *key, const char *value, aff_err *err)
{
    char errstr[512];
    if (rd_kafka_conf_set(conf, key, value, errstr, sizeof errstr) != RD_KAFKA_CONF_OK)
        return aff__fail(err, AFF_EINVAL, "kafka: %s: %s", key, errstr);
    return 0;
}

int kafka_in_start(aff_kafka_in **out, const kafka_in_config *cfg, aff_err *err)
{
    int rc = 0;
    char errstr[512];
    rd_kafka_topic_partition_list_t *topics = NULL;
    aff_kafka_in *k = calloc(1, sizeof *k);
    if (!k) return aff__fail(err, AFF_ENOMEM, "out of memory starting the Kafka consumer");
    k->cfg = *cfg;
    k->brokers = strdup(cfg->brokers);
    k->topic = strdup(cfg->topic);
    k->group = strdup(cfg->group);
    k->collection = strdup(cfg->collection);
    if (!k->brokers || !k->topic || !k->group || !k->collection) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory starting the Kafka consumer");
        goto fail;
    }
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if ((rc = set(conf, "bootstrap.servers", k->brokers, err)) ||
        (rc = set(conf, "group.id", k->group, err)) ||
        (rc = set(conf, "enable.auto.commit", "false", err)) ||
        (rc = set(conf, "enable.auto.offset.store", "false", err)) ||
        (rc = set(conf, "auto.offset.reset", "earliest", err)) ||
        (rc = set(conf, "session.timeout.ms", "10000", err)) ||
        (rc = set(conf, "client.id", "affinityd", err))) {
        rd_kafka_conf_destroy(conf);
        goto fail;
    }
    k->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    if (!k->rk) {
        rd_kafka_conf_destroy(conf);
        rc = aff__fail(err, AFF_EINVAL, "kafka: %s", errstr);
        goto fail;
    }
    rd_kafka_poll_set_consumer(k->rk);
    topics = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(topics, k->topic, RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t e = rd_kafka_subscribe(k->rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    if (e) {
        rc = aff__fail(err, AFF_EINVAL, "kafka: cannot subscribe to '%s': %s", k->topic,
                       rd_kafka_err2str(e));
        goto fail;
    }
    if (pthread_create(&k->thread, NULL, consume_thread, k) != 0) {
        rc = aff__fail(err, AFF_ENOMEM, "cannot start the Kafka consumer thread");
        goto fail;
    }
    aff_log_kv(AFF_LOG_INFO, "kafka consumer started", "brokers", k->brokers, "topic", k->topic,
               "group", k->group, "collection", k->collection, NULL);
    *out = k;
    return 0;
fail:
    if (k->rk) rd_kafka_destroy(k->rk);
    free(k->brokers);
    free(k->topic);
    free(k->group);
    free(k->collection);
    free(k);
    return rc;
}

uint64_t kafka_in_ingested(const aff_kafka_in *k)
{
    return atomic_load(&((aff_kafka_in *)k)->ingested);
}

void kafka_in_stop(aff_kafka_in *k)
{
    if (!k) return;
    atomic_store(&k->stop, true);
    pthread_join(k->thread, NULL);
    rd_kafka_consumer_close(k->rk);
    rd_kafka_destroy(k->rk);
    free(k->brokers);
    free(k->topic);
    free(k->group);
    free(k->collection);
    free(k);
}

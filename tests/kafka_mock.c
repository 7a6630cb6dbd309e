/*
 * kafka_mock.c: a Kafka cluster for tests (librdkafka's built-in mock cluster, 3 brokers on
 * loopback) with a producer, driven over stdin/stdout by tests/replication/test_kafka.py.
 *
 * Prints "brokers HOST:PORT,..." once the cluster runs, then reads commands, one a line:
 *   topic NAME           create the topic (3 partitions, replication 3); prints "ok"
 *   produce TOPIC TEXT   produce one message with TEXT (the rest of the line) as its value
 *   flush                wait until every produced message was acknowledged; prints "ok N"
 *                        (N messages delivered in all) or "error ..."
 *   quit                 (or end of input) exit
 */
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long delivered, failed;

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk, (void)opaque;
    if (m->err)
        failed++;
    else
        delivered++;
}

int main(void)
{
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "test.mock.num.brokers", "3", errstr, sizeof errstr) ||
        rd_kafka_conf_set(conf, "acks", "all", errstr, sizeof errstr)) {
        fprintf(stderr, "kafka_mock: %s\n", errstr);
        return 1;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!rk) {
        fprintf(stderr, "kafka_mock: %s\n", errstr);
        return 1;
    }
    rd_kafka_mock_cluster_t *mc = rd_kafka_handle_mock_cluster(rk);
    if (!mc) {
        fprintf(stderr, "kafka_mock: no mock cluster\n");
        return 1;
    }
    printf("brokers %s\n", rd_kafka_mock_cluster_bootstraps(mc));
    fflush(stdout);
    char line[65536];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "topic ", 6) == 0) {
            rd_kafka_resp_err_t e = rd_kafka_mock_topic_create(mc, line + 6, 3, 3);
            printf(e ? "error %s\n" : "ok\n", rd_kafka_err2str(e));
            fflush(stdout);
        } else if (strncmp(line, "produce ", 8) == 0) {
            char *topic = line + 8;
            char *text = strchr(topic, ' ');
            if (!text) continue;
            *text++ = '\0';
            rd_kafka_resp_err_t e =
                rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                  RD_KAFKA_V_VALUE(text, strlen(text)), RD_KAFKA_V_END);
            if (e) printf("error %s\n", rd_kafka_err2str(e));
            rd_kafka_poll(rk, 0);
        } else if (strcmp(line, "flush") == 0) {
            rd_kafka_resp_err_t e = rd_kafka_flush(rk, 30000);
            if (e || failed)
                printf("error %s (%ld failed)\n", rd_kafka_err2str(e), failed);
            else
                printf("ok %ld\n", delivered);
            fflush(stdout);
        } else if (strcmp(line, "quit") == 0) {
            break;
        }
    }
    rd_kafka_flush(rk, 5000);
    rd_kafka_destroy(rk);
    return 0;
}

#!/usr/bin/python3
"""Kafka in (issue 15): affinityd --kafka-brokers against librdkafka's mock cluster
(tests/kafka_mock.c), writing through a NATS JetStream log started by this test.

1. 300 JSON events (10 users x 30) and one malformed message: every user's history holds
   exactly its 30 events (the malformed one skipped).
2. The log goes down; 100 more events are produced; the replica is killed (SIGKILL) while it
   cannot publish, so it commits no offset past them; the log and the replica come back: the
   consumer group resumes from the committed offsets and every user holds exactly 40 events
   (nothing lost, nothing applied twice: the records' ids are the Kafka offsets).

    /usr/bin/python3 tests/replication/test_kafka.py --affinityd BUILD/src/affinityd \
        --kafka-mock BUILD/tests/kafka_mock --proto-dir SOURCE/proto
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import grpc

from cluster import Client, NatsCluster, Replica, retry_unavailable, stubs

COLL = "shop"
TOPIC = "clicks"
USERS = 10


class Mock:
    def __init__(self, binary):
        self.p = subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1)
        line = self.p.stdout.readline().split()
        assert line and line[0] == "brokers", line
        self.brokers = line[1]

    def cmd(self, text, answer=True):
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()
        if answer:
            r = self.p.stdout.readline().strip()
            assert r.startswith("ok"), r
            return r

    def produce(self, text):
        self.cmd("produce %s %s" % (TOPIC, text), answer=False)

    def close(self):
        try:
            self.cmd("quit", answer=False)
            self.p.wait(timeout=10)
        except Exception:
            self.p.kill()


def histories(client, r):
    out = {}
    for u in range(USERS):
        try:
            g = client.unary(r, "GetUser", client.pb.GetUserRequest(collection=COLL,
                                                                    user_id="k-u%d" % u),
                             client.pb.GetUserResponse)
            out[u] = g.history_length
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            out[u] = 0
    return out


def wait_histories(client, r, want, timeout=60):
    deadline = time.time() + timeout
    got = None
    while time.time() < deadline:
        got = histories(client, r)
        if all(v == want for v in got.values()):
            return
        if any(v > want for v in got.values()):
            break
        time.sleep(0.3)
    raise AssertionError("histories %s, want %d each:\n%s" % (got, want, r.log_tail()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--affinityd", required=True)
    ap.add_argument("--kafka-mock", required=True)
    ap.add_argument("--proto-dir", required=True)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="aff-kafka-")
    pb, health = stubs(args.proto_dir, work)
    client = Client(pb, health)
    mock = Mock(args.kafka_mock)
    mock.cmd("topic " + TOPIC)
    nats = NatsCluster(work, n=1)
    nats.start_all()
    r0 = Replica(work, "r0", args.affinityd, nats.urls(),
                 extra=["--log-replicas", "1", "--kafka-brokers", mock.brokers,
                        "--kafka-topic", TOPIC, "--kafka-collection", COLL])
    ok = False
    t0 = time.time()
    n = 0

    def produce(count):
        nonlocal n
        for _ in range(count):
            mock.produce(json.dumps({"user_id": "k-u%d" % (n % USERS),
                                     "item_id": "i%02d" % (n % 50), "type": "view"}))
            n += 1
        mock.cmd("flush")

    try:
        r0.start()
        client.wait_serving(r0)
        retry_unavailable(lambda: client.unary(
            r0, "CreateCollection",
            pb.CreateCollectionRequest(name=COLL, dimension=4, metric=pb.METRIC_INNER_PRODUCT,
                                       request_id="kc"), pb.CreateCollectionResponse))
        items = [pb.Item(id="i%02d" % k, vector=[1.0, k / 50.0, 0.5, 0.1]) for k in range(50)]
        client.upsert(r0, [pb.UpsertItemsRequest(collection=COLL, items=items)])
        produce(150)
        mock.produce("{not json")
        produce(150)
        wait_histories(client, r0, 30)
        assert "malformed event skipped" in r0.log_tail(200000), "the malformed message"
        print("300 Kafka events applied exactly once, the malformed one skipped (%.1f s)" %
              (time.time() - t0))

        nats.kill(0)
        produce(100)
        time.sleep(3)
        assert "no offset committed" in r0.log_tail(200000), r0.log_tail()
        r0.kill()
        nats.start(0)
        r0.start()
        client.wait_serving(r0)
        wait_histories(client, r0, 40)
        time.sleep(2)
        assert all(v == 40 for v in histories(client, r0).values())
        print("log outage + kill -9: the 100 events arrived once after restart (%.1f s)" %
              (time.time() - t0))
        assert r0.stop() == 0
        ok = True
        print("PASS in %.1f s" % (time.time() - t0))
    finally:
        r0.kill()
        nats.stop_all()
        mock.close()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print("work directory kept:", work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

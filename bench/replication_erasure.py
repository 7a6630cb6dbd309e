#!/usr/bin/python3
"""DeleteUser's cost with erasure from the write log (issue 15, docs/replication.md, Erasure):
one NATS JetStream node (R1) and one affinityd replica on this machine. Loads N users with one
PutEvents record each (3 events), then times 5 DeleteUser calls, each of which reads the
user's bucket subject (about N/64 records) and erases the user's records, against the median
of 20 single-event PutEvents in the same run (baseline).

    /usr/bin/python3 bench/replication_erasure.py --affinityd BUILD/src/affinityd \\
        --proto-dir proto --users 64000
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "replication"))
from cluster import Client, NatsCluster, Replica, retry_unavailable, stubs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--affinityd", required=True)
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--users", type=int, default=64000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="aff-erase-bench-")
    pb, health = stubs(args.proto_dir, work)
    client = Client(pb, health)
    nats = NatsCluster(work, n=1)
    nats.start_all()
    r = Replica(work, "r", args.affinityd, nats.urls(), extra=["--log-replicas", "1"])
    try:
        print("load average at start:", os.getloadavg())
        r.start()
        client.wait_serving(r)
        retry_unavailable(lambda: client.unary(
            r, "CreateCollection", pb.CreateCollectionRequest(
                name="s", dimension=4, metric=pb.METRIC_INNER_PRODUCT, request_id="c"),
            pb.CreateCollectionResponse))
        client.upsert(r, [pb.UpsertItemsRequest(
            collection="s", items=[pb.Item(id="i%d" % k, vector=[1, 0, 0, 0])
                                   for k in range(10)])])
        t = time.time()
        ev = [pb.Event(item_id="i1", type=pb.EVENT_TYPE_VIEW)] * 3
        for n in range(args.users):
            client.unary(r, "PutEvents", pb.PutEventsRequest(
                collection="s", user_id="u%d" % n, events=ev, request_id="e%d" % n),
                pb.PutEventsResponse)
        print("loaded %d users (one record each) in %.1f s" % (args.users, time.time() - t))
        base = []
        for n in range(20):
            t = time.time()
            client.unary(r, "PutEvents", pb.PutEventsRequest(
                collection="s", user_id="b%d" % n, events=ev[:1], request_id="b%d" % n),
                pb.PutEventsResponse)
            base.append(time.time() - t)
        base.sort()
        print("baseline: PutEvents latency, median of 20: %.1f ms" % (base[10] * 1000))
        lat = []
        for n in range(5):
            t = time.time()
            client.unary(r, "DeleteUser", pb.DeleteUserRequest(user_id="u%d" % n,
                                                               request_id="d%d" % n),
                         pb.DeleteUserResponse, timeout=60)
            lat.append(time.time() - t)
        print("DeleteUser latencies (ms):", " ".join("%.1f" % (x * 1000) for x in lat))
        print("load average at end:", os.getloadavg())
    finally:
        r.kill()
        nats.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""ImportEvents and Train through the write log (issue 15), against single-node mode in the same
run: 3 NATS JetStream nodes and 3 affinityd replicas on this machine
(tests/replication/cluster.py), and one affinityd without --log.

Measures:
  1. ImportEvents events/s: one client stream of --events events (--batch per message, one
     context entry each) into single node, then through r0 of the log cluster (answered after
     commit + apply on r0), then until applied on all 3; CPU seconds of every process.
  2. Train (--factors, 4 epochs) of the imported data: single node (call -> GetModel ready),
     and through r1 (call -> version served on the first and on all 3 replicas; the model's
     blob size and the parts published, from r1's log).

    bench/replication_import_train.py --build build [--events 200000] [--out FILE]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "replication"))
from cluster import SVC, Setup, retry_unavailable, unit  # noqa: E402
from replication import cpu_seconds  # noqa: E402

COLL = "shop"
DIM = 32


def import_all(client, addr_channel, msgs):
    fn = addr_channel.stream_unary(
        SVC + "ImportEvents", request_serializer=client.pb.ImportEventsRequest.SerializeToString,
        response_deserializer=client.pb.ImportEventsResponse.FromString)
    return fn(iter(msgs), timeout=3600)


def main():
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--build", default="build")
    extra.add_argument("--events", type=int, default=200000)
    extra.add_argument("--batch", type=int, default=5000)
    extra.add_argument("--users", type=int, default=20000)
    extra.add_argument("--items", type=int, default=5000)
    extra.add_argument("--factors", type=int, default=64)
    extra.add_argument("--out", default=None)
    a, rest = extra.parse_known_args()
    affinityd = os.path.join(a.build, "src", "affinityd")
    sys.argv = [sys.argv[0], "--affinityd", affinityd,
                "--proto-dir", os.path.join(HERE, "..", "proto")] + rest
    st = Setup("aff-repl-it-bench-", extra=["--min-sequence-wait-ms", "10000"])
    pb, client, replicas = st.pb, st.client, st.replicas
    rng = random.Random(7)
    lines = []

    def out(line=""):
        lines.append(line)
        print(line, flush=True)

    load_before = open("/proc/loadavg").read().split()[:3]
    items = [pb.Item(id="i%05d" % k, vector=unit(rng, DIM), category="c%d" % (k % 20))
             for k in range(a.items)]
    now = int(time.time() * 1000)
    msgs = []
    for start in range(0, a.events, a.batch):
        evs = [pb.ImportedEvent(user_id="u%06d" % rng.randrange(a.users),
                                event=pb.Event(item_id="i%05d" % min(int(rng.paretovariate(1.2)),
                                                                     a.items - 1)
                                               if rng.random() < 0.3 else
                                               "i%05d" % rng.randrange(a.items),
                                               type=pb.EVENT_TYPE_VIEW,
                                               timestamp_ms=now - rng.randrange(30 * 86400000),
                                               context={"session": "s%d" % rng.getrandbits(40)}))
               for _ in range(min(a.batch, a.events - start))]
        msgs.append(pb.ImportEventsRequest(collection=COLL if start == 0 else "", events=evs))
    single = None
    ok = False
    try:
        # ---- single node, same flags but no --log ----
        sdir = os.path.join(st.work, "single")
        port_file = os.path.join(st.work, "single.port")
        single = subprocess.Popen(
            [affinityd, "--listen", "127.0.0.1:0", "--port-file", port_file, "--backend", "cpu",
             "--cpu-threads", "1", "--threads", "2", "--data-dir", sdir, "--log-level", "warn",
             "--train-interval-s", "0"],
            env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            time.sleep(0.05)
        import grpc
        sch = grpc.insecure_channel("127.0.0.1:" + open(port_file).read().strip())

        class S:  # enough of a Replica for Client
            channel = sch
            name = "single"
        time.sleep(1.0)
        client.unary(S, "CreateCollection", pb.CreateCollectionRequest(
            name=COLL, dimension=DIM, metric=pb.METRIC_COSINE), pb.CreateCollectionResponse)
        client.upsert(S, [pb.UpsertItemsRequest(collection=COLL, items=items[j:j + 1000])
                          for j in range(0, a.items, 1000)])
        c0 = cpu_seconds(single.pid)
        t0 = time.time()
        r = import_all(client, sch, msgs)
        t_single = time.time() - t0
        c_single = cpu_seconds(single.pid) - c0
        assert r.applied_count == a.events, r
        t0 = time.time()
        client.unary(S, "Train", pb.TrainRequest(collection=COLL, params=pb.ModelParams(
            factors=a.factors, epochs=4)), pb.TrainResponse)
        while True:
            mi = client.unary(S, "GetModel", pb.GetModelRequest(collection=COLL), pb.ModelInfo)
            if mi.state == "ready":
                break
            time.sleep(0.05)
        t_train_single = time.time() - t0
        train_single = mi.duration_s
        sch.close()
        single.terminate()
        single.wait()
        single = None

        # ---- the log cluster ----
        st.start_replicas()
        retry_unavailable(lambda: client.unary(
            replicas[0], "CreateCollection",
            pb.CreateCollectionRequest(name=COLL, dimension=DIM, metric=pb.METRIC_COSINE,
                                       request_id="bench-create"), pb.CreateCollectionResponse))
        up = client.upsert(replicas[0], [pb.UpsertItemsRequest(collection=COLL,
                                                               items=items[j:j + 1000])
                                         for j in range(0, a.items, 1000)])
        for rp in replicas:
            client.wait_applied(rp, up.log_sequence, timeout=300)
        names = [rp.name for rp in replicas] + ["nats%d" % i for i in range(3)]
        pids = [rp.proc.pid for rp in replicas] + [p.pid for p in st.nats.procs]
        cpu0 = [cpu_seconds(p) for p in pids]
        msgs[0].request_id = "bench-import"
        t0 = time.time()
        r = import_all(client, replicas[0].channel, msgs)
        t_ack = time.time() - t0
        for rp in replicas:
            client.wait_applied(rp, r.log_sequence, timeout=3600)
        t_all = time.time() - t0
        cpu1 = [cpu_seconds(p) for p in pids]
        assert r.applied_count == a.events, r
        records = r.log_sequence - up.log_sequence

        t0 = time.time()
        tr = client.unary(replicas[1], "Train", pb.TrainRequest(
            collection=COLL, params=pb.ModelParams(factors=a.factors, epochs=4),
            request_id="bench-train"), pb.TrainResponse)
        seen = {}
        while len(seen) < 3 and time.time() - t0 < 1800:
            for rp in replicas:
                if rp.name in seen:
                    continue
                mi = client.unary(rp, "GetModel", pb.GetModelRequest(collection=COLL),
                                  pb.ModelInfo)
                if mi.version > tr.log_sequence:
                    seen[rp.name] = (time.time() - t0, mi)
            time.sleep(0.02)
        versions = set(v[1].version for v in seen.values())
        published = [json.loads(x) for x in open(os.path.join(st.work, "r1.log"))
                     if "model published through the write log" in x]
        load_after = open("/proc/loadavg").read().split()[:3]

        out("# ImportEvents and Train through the write log (3 NATS nodes, 3 replicas)")
        out()
        out("- date: %s; machine: nproc=%d; command: bench/replication_import_train.py "
            "--build %s --events %d --batch %d --users %d --items %d --factors %d" %
            (time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), os.cpu_count(), a.build,
             a.events, a.batch, a.users, a.items, a.factors))
        out("- load average before/after: %s / %s (the 2 cores are shared with other "
            "engineers' builds and tests; compare the ratios measured in this run)" %
            (" ".join(load_before), " ".join(load_after)))
        out("- data: %d events (views, one context entry each) of %d users on %d items "
            "(d = %d cosine), %d events per message" %
            (a.events, a.users, a.items, DIM, a.batch))
        out()
        out("## ImportEvents")
        out()
        out("| mode | seconds | events/s | server CPU s |")
        out("| --- | --- | --- | --- |")
        out("| single node (no --log) | %.2f | %.0f | %.1f |" %
            (t_single, a.events / t_single, c_single))
        out("| --log, answered (committed + applied on r0) | %.2f | %.0f | |" %
            (t_ack, a.events / t_ack))
        out("| --log, applied on all 3 replicas | %.2f | %.0f | %s |" %
            (t_all, a.events / t_all,
             ", ".join("%s %.1f" % (n, c1 - c0) for n, c0, c1 in zip(names, cpu0, cpu1))))
        out()
        out("- log records: %d (%.1f per %d-event message); ratio single node / log "
            "(all 3 applied): %.2f" % (records, records / len(msgs), a.batch, t_all / t_single))
        out()
        out("## Train (factors %d, 4 epochs)" % a.factors)
        out()
        out("- single node: call -> ready %.2f s (training itself %.2f s)" %
            (t_train_single, train_single))
        for name in sorted(seen):
            t, mi = seen[name]
            out("- --log, through r1: version %d served on %s after %.2f s (training %.2f s, "
                "%d items, %d users)" % (mi.version, name, t, mi.duration_s, mi.items, mi.users))
        if published:
            out("- model blob through the log: %s bytes in %d ModelPart records + 1 commit" %
                (published[-1]["bytes"], (int(published[-1]["bytes"]) + (512 << 10) - 1) //
                 (512 << 10)))
        out("- one version on all replicas: %s" % (len(versions) == 1 and len(seen) == 3))
        if a.out:
            with open(a.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        ok = True
    finally:
        if single:
            single.kill()
        st.teardown(ok)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""What measurement costs the server: CPU per Recommend with the recommendation record (and
an experiment assigning the arm) against without, CPU per ingested event with attribution
against without, and memory per running experiment.

Two affinityd processes serve the same catalog and shoppers at once: "on" (defaults: every
answer recorded, events attributed, an experiment running on the surface) and "off"
(--attribution-max-records 0: nothing recorded or attributed, no experiment; requests name the
same preset the arms use, so both rank alike). Rounds alternate which server goes first;
each phase runs the same calls against one server from one grpcio client. Server CPU is the
sum over the server's threads of /proc/PID/task/*/schedstat (on-CPU nanoseconds), read before
and after each phase, so client time and other processes' load do not count; figures are the
median over rounds of on/off ratios from the same round.

    /usr/bin/python3 bench/measure_overhead.py --affinityd build/src/affinityd \
        --proto-dir proto [--rounds 7] [--calls 1500] [--bench-measure build/bench/bench_measure]
"""
import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc

# The stub generator and port picker of the measurement test, not a copy of them.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "measure"))
from test_measurement import free_port, generate_stubs  # noqa: E402

SVC = "/affinity.v1.Affinity/"
DIM = 64
N_ITEMS = 20000
N_USERS = 400
K = 10


class Server:
    def __init__(self, args, pb, work, name, extra):
        self.pb, self.name = pb, name
        d = os.path.join(work, name)
        os.makedirs(d)
        port_file = os.path.join(d, "port")
        self.metrics_port = free_port()
        presets = os.path.join(d, "serving.json")
        with open(presets, "w") as f:
            json.dump({"presets": {"plain": {"max_per_category": 0},
                                   "plain2": {"max_per_category": 0}}}, f)
        self.proc = subprocess.Popen(
            [args.affinityd, "--listen", "127.0.0.1:0", "--port-file", port_file, "--backend",
             "cpu", "--threads", "2", "--data-dir", os.path.join(d, "data"),
             "--serving-config", presets, "--metrics-listen",
             "127.0.0.1:%d" % self.metrics_port, "--log-level", "warn"] + extra,
            stdout=open(os.path.join(d, "log"), "w"), stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        for _ in range(600):
            if os.path.exists(port_file) and open(port_file).read().strip():
                break
            time.sleep(0.05)
        self.ch = grpc.insecure_channel("127.0.0.1:" + open(port_file).read().strip())
        grpc.channel_ready_future(self.ch).result(timeout=30)
        for _ in range(600):
            try:
                self.call("ListCollections", pb.ListCollectionsRequest(),
                          pb.ListCollectionsResponse)
                break
            except grpc.RpcError:
                time.sleep(0.05)

    def call(self, method, req, resp_cls):
        fn = self.ch.unary_unary(SVC + method, request_serializer=req.__class__.SerializeToString,
                                 response_deserializer=resp_cls.FromString)
        return fn(req, timeout=60)

    def cpu_ns(self):
        total = 0
        base = "/proc/%d/task" % self.proc.pid
        for t in os.listdir(base):
            try:
                with open(os.path.join(base, t, "schedstat")) as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def gauge(self, name):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    def stop(self):
        self.ch.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def setup(s, pb, rng_seed):
    pb_ = pb
    s.call("CreateCollection", pb_.CreateCollectionRequest(name="shop", dimension=DIM,
                                                            metric=pb_.METRIC_COSINE),
           pb_.CreateCollectionResponse)
    rng = random.Random(rng_seed)
    upsert = s.ch.stream_unary(SVC + "UpsertItems",
                               request_serializer=pb_.UpsertItemsRequest.SerializeToString,
                               response_deserializer=pb_.UpsertItemsResponse.FromString)

    def batches():
        for b in range(0, N_ITEMS, 2000):
            items = [pb_.Item(id="p%05d" % i, vector=[rng.gauss(0, 1) for _ in range(DIM)],
                              category="c%d" % (i % 20), price=1.0 + i % 100, available=True,
                              available_set=True) for i in range(b, min(N_ITEMS, b + 2000))]
            yield pb_.UpsertItemsRequest(collection="shop" if b == 0 else "", items=items)
    upsert(batches(), timeout=300)
    for u in range(N_USERS):
        evs = [pb_.Event(item_id="p%05d" % rng.randrange(N_ITEMS), type=pb_.EVENT_TYPE_VIEW)
               for _ in range(5)]
        s.call("PutEvents", pb_.PutEventsRequest(collection="shop", user_id="u%04d" % u,
                                                 events=evs), pb_.PutEventsResponse)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--affinityd", required=True)
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=1500)
    ap.add_argument("--bench-measure", default="",
                    help="build/bench/bench_measure: measurement's own CPU, in-process")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="aff-measure-bench-")
    pb = generate_stubs(args.proto_dir, work)
    on = Server(args, pb, work, "on", [])
    off = Server(args, pb, work, "off", ["--attribution-max-records", "0"])
    try:
        for s in (on, off):
            setup(s, pb, 1)
        mem0 = on.gauge("affinity_measurement_memory_bytes")
        on.call("CreateExperiment", pb.CreateExperimentRequest(experiment=pb.Experiment(
            id="bench", collection="shop", surface="home",
            arms=[pb.ExperimentArm(name="a", share=0.5, preset="plain"),
                  pb.ExperimentArm(name="b", share=0.5, preset="plain2")])),
            pb.ExperimentResult)
        rec_ratio, ev_ratio, rec_us, ev_us = [], [], {"on": [], "off": []}, {"on": [], "off": []}
        for r in range(args.rounds):
            order = (on, off) if r % 2 == 0 else (off, on)
            per = {}
            for s in order:
                rng = random.Random(1000 + r)
                users = ["u%04d" % rng.randrange(N_USERS) for _ in range(args.calls)]
                preset = "" if s is on else "plain"
                t0 = s.cpu_ns()
                answers = []
                for u in users:
                    resp = s.call("Recommend", pb.RecommendRequest(
                        collection="shop", user_id=u, k=K, surface="home", preset=preset),
                        pb.RecommendResponse)
                    answers.append((u, resp.recommendation_id, [h.id for h in resp.hits]))
                t1 = s.cpu_ns()
                n_events = 0
                for u, rid, ids in answers:
                    evs = [pb.Event(item_id=i, type=pb.EVENT_TYPE_IMPRESSION, recommendation_id=rid,
                                    position=p + 1) for p, i in enumerate(ids)]
                    evs.append(pb.Event(item_id=ids[0], type=pb.EVENT_TYPE_CLICK,
                                        recommendation_id=rid))
                    evs.append(pb.Event(item_id=ids[1], type=pb.EVENT_TYPE_VIEW))
                    n_events += len(evs)
                    s.call("PutEvents", pb.PutEventsRequest(collection="shop", user_id=u,
                                                            events=evs), pb.PutEventsResponse)
                t2 = s.cpu_ns()
                name = "on" if s is on else "off"
                per[name] = ((t1 - t0) / args.calls, (t2 - t1) / n_events)
                rec_us[name].append(per[name][0] / 1e3)
                ev_us[name].append(per[name][1] / 1e3)
            rec_ratio.append(per["on"][0] / per["off"][0])
            ev_ratio.append(per["on"][1] / per["off"][1])
            print("round %d: Recommend %.1f / %.1f us CPU (x%.3f), event %.2f / %.2f us CPU "
                  "(x%.3f)" % (r, per["on"][0] / 1e3, per["off"][0] / 1e3, rec_ratio[-1],
                               per["on"][1] / 1e3, per["off"][1] / 1e3, ev_ratio[-1]),
                  flush=True)
        mem1 = on.gauge("affinity_measurement_memory_bytes")
        records = on.gauge("affinity_attribution_records")
        st = on.call("GetStats", pb.GetStatsRequest(collection="shop"), pb.GetStatsResponse)
        micro = {}
        if args.bench_measure:
            out = subprocess.run([args.bench_measure, "200000", str(K)], capture_output=True,
                                 text=True, check=True)
            micro = json.loads(out.stdout.strip().splitlines()[-1])
            rec_off = statistics.median(rec_us["off"]) * 1e3
            ev_off = statistics.median(ev_us["off"]) * 1e3
            micro["record_plus_assign_share_of_recommend"] = \
                (micro["record_ns"] + micro["assign_ns"]) / rec_off
            # per event: the attribution of one event (12 events per call: 10 impressions and
            # a click attributed, a view not looked at)
            micro["attribute_share_of_event"] = micro["attribute_ns"] * 11 / 12 / ev_off
        print(json.dumps({
            "micro": micro,
            "recommend_cpu_ratio_median": statistics.median(rec_ratio),
            "recommend_cpu_ratio_all": rec_ratio,
            "event_cpu_ratio_median": statistics.median(ev_ratio),
            "event_cpu_ratio_all": ev_ratio,
            "recommend_cpu_us_median": {k: statistics.median(v) for k, v in rec_us.items()},
            "event_cpu_us_median": {k: statistics.median(v) for k, v in ev_us.items()},
            "measurement_memory_bytes_before_experiment": mem0,
            "measurement_memory_bytes_after": mem1,
            "attribution_records": records,
            "series": len(st.rows),
            "loadavg": os.getloadavg(),
        }, indent=1))
    finally:
        on.stop()
        off.stop()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""Replication benchmark (issue 15): 3 NATS JetStream nodes and 3 affinityd replicas on this
machine (tests/replication/cluster.py), loaded by bench/affinity_load.

Measures:
  1. events/s end to end: PutEvents with 100 events per call, one affinity_load per replica
     (closed loop), then the time until every replica applied the last record; events/s =
     events acknowledged / (load time + drain time to applied on all 3).
  2. apply lag p50/p99 on each replica (GetServerInfo: record stamp -> applied here).
  3. writes blocked by a leader kill: one writer at ~50 calls/s; the stream leader node is
     killed with SIGKILL; the longest time any write waited to be acknowledged (retries with
     the same request_id on UNAVAILABLE, to any replica).
CPU time of each process (getrusage of children, /proc/<pid>/stat) and the load average are
reported with the figures.

    bench/replication.py --build build [--seconds 10] [--out FILE]
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "replication"))
from cluster import Client, NatsCluster, Replica, retry_unavailable, stubs  # noqa: E402

import grpc  # noqa: E402


def cpu_seconds(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return float("nan")


def machine_busy_seconds():
    """CPU seconds the whole machine spent busy (all processes, kernel threads included)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0,
                    help="open loop: calls/s per load process (Poisson arrivals; 3 processes), "
                         "so a fixed amount of work; 0: closed loop with --concurrency")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (NATS stores, replicas' data and logs)")
    ap.add_argument("--affinityd", default=None,
                    help="the replicas' binary (default: BUILD/src/affinityd), e.g. to compare "
                         "two builds with one load generator")
    ap.add_argument("--parts", default="1,3,4",
                    help="which measurements: 1 events end to end, 3 leader kill, 4 bootstrap")
    ap.add_argument("--perf", default=None,
                    help="record `perf record --call-graph dwarf` of replica r0 and NATS node 0 during part 1 "
                         "into this directory")
    ap.add_argument("--boot-items", type=int, default=200000,
                    help="items (d = 128) in the bootstrap measurement")
    args = ap.parse_args()
    root = os.path.dirname(HERE)
    affinityd = args.affinityd or os.path.join(args.build, "src", "affinityd")
    load = os.path.join(args.build, "bench", "affinity_load")
    work = tempfile.mkdtemp(prefix="aff-repl-bench-")
    pb, health = stubs(os.path.join(root, "proto"), work)
    client = Client(pb, health)
    nats = NatsCluster(work)
    nats.start_all()
    replicas = [Replica(work, "r%d" % i, affinityd, nats.urls()) for i in range(3)]
    lines = []

    def out(line):
        lines.append(line)
        print(line, flush=True)
    load_before = open("/proc/loadavg").read().split()[:3]
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            client.wait_serving(r)
        retry_unavailable(lambda: client.unary(
            replicas[0], "CreateCollection",
            pb.CreateCollectionRequest(name="shop", dimension=64, metric=pb.METRIC_COSINE,
                                       request_id="bench-create"), pb.CreateCollectionResponse))
        data = os.path.join(work, "data")
        subprocess.run([load, "gen", "--out", data, "--rows", "20000", "--dim", "64",
                        "--queries", "100", "--clusters", "50"], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([os.path.join(args.build, "src", "affinity"), "--addr", replicas[0].addr,
                        "load", "shop", "--vectors", os.path.join(data, "catalog.npy"),
                        "--attrs", os.path.join(data, "catalog.csv"), "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        last = client.applied(replicas[0])
        for r in replicas:
            client.wait_applied(r, last, timeout=300)
        seq0 = client.applied(replicas[0])
        cpu0 = {r.name: cpu_seconds(r.proc.pid) for r in replicas}
        cpu0.update({"nats%d" % i: cpu_seconds(p.pid) for i, p in enumerate(nats.procs)})
        busy0 = machine_busy_seconds()

        parts = set(args.parts.split(","))
        # ---- 1. events/s end to end ----
        procs = []
        perfs = []
        if args.perf and "1" in parts:
            os.makedirs(args.perf, exist_ok=True)
            for name, pid in (("r0", replicas[0].proc.pid), ("nats0", nats.procs[0].pid)):
                perfs.append(subprocess.Popen(
                    ["perf", "record", "--call-graph", "dwarf,16384", "-F", "199", "-p", str(pid), "-o",
                     os.path.join(args.perf, "%s.perf.data" % name)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        t0 = time.time()
        for i, r in enumerate(replicas):
            procs.append(subprocess.Popen(
                [load, "run", "--addr", r.addr, "--collection", "shop", "--users", "10000",
                 "--duration", str(args.seconds), "--warmup", "0", "--mix", "events=1",
                 "--events-per-call", "100"] +
                (["--mode", "open", "--rate", str(args.rate)] if args.rate else
                 ["--concurrency", str(args.concurrency)]) + [
                 "--channels", "1", "--timeout-ms", "5000", "--user-prefix", "u%d-" % i,
                 "--json", os.path.join(work, "load%d.json" % i)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        reports = []
        load_cpu = []
        for p in procs:  # wait4: each load generator's own CPU seconds
            reports.append(p.stdout.read())
            _, _, ru = os.wait4(p.pid, 0)
            p.returncode = 0
            load_cpu.append(ru.ru_utime + ru.ru_stime)
        t_load = time.time() - t0
        import json
        ok_calls = 0
        starts, ends = [], []
        for i in range(3):
            with open(os.path.join(work, "load%d.json" % i)) as f:
                j = json.load(f)
            ok_calls += int(round(j.get("ok_rps", 0) * j.get("duration_s", args.seconds)))
            starts.append(j["start_unix_s"])
            ends.append(j["end_unix_s"])
        last = max(client.applied(r) for r in replicas)
        for r in replicas:
            client.wait_applied(r, last, timeout=600)
        t_applied = time.time()
        t_all = t_applied - t0
        # The sending window: the first load process's first call to the last one's last
        # answer (the processes' start-up and exit are not the system's time).
        window = max(ends) - min(starts)
        sustained = t_applied - min(starts)
        records = last - seq0
        events = ok_calls * 100
        cpu1 = {r.name: cpu_seconds(r.proc.pid) for r in replicas}
        cpu1.update({"nats%d" % i: cpu_seconds(p.pid) for i, p in enumerate(nats.procs)})
        busy1 = machine_busy_seconds()
        for p in perfs:
            p.send_signal(signal.SIGINT)
            p.wait()
        lags = []
        for r in replicas:
            info = client.unary(r, "GetServerInfo", pb.GetServerInfoRequest(), pb.ServerInfo)
            lags.append((r.name, info.log_apply_lag_p50_ms, info.log_apply_lag_p99_ms))
        load_after = open("/proc/loadavg").read().split()[:3]

        out("## 1. Events end to end (gRPC -> log -> applied on 3 replicas)")
        out("")
        out("- 3 affinity_load processes (one per replica), %s, 100 events per call, %d s" %
            ("open loop at %g calls/s each (%g events/s offered)" % (args.rate, 300 * args.rate)
             if args.rate else "closed loop, %d calls in flight each" % args.concurrency,
             args.seconds))
        out("- records committed to the stream in the run: %d; events acknowledged: %d "
            "(ok calls x 100)" % (records, events))
        out("- load phase %.1f s; until applied on all 3 replicas %.1f s" % (t_load, t_all))
        out("- events/s with the load processes' start-up and exit counted: acknowledged %.0f; "
            "applied on all 3 %.0f" % (events / t_load, events / t_all))
        out("- **sustained events/s over the sending window (%.2f s, first call of any load "
            "process to the last answer): acknowledged %.0f; end to end, until applied on all 3 "
            "(%.2f s): %.0f**" % (window, events / window, sustained, events / sustained))
        out("- apply lag (stamp -> applied), last <=4096 records, per replica: " +
            "; ".join("%s p50 %.1f ms p99 %.1f ms" % l for l in lags))
        out("- CPU seconds during the run: " + ", ".join(
            "%s %.1f" % (k, cpu1[k] - cpu0[k]) for k in sorted(cpu1)))
        out("- load average before/after: %s / %s" % (" ".join(load_before), " ".join(load_after)))
        applied = records * 100  # every record of the run is a PutEvents of 100 events
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
        cpu.update({"load%d" % i: c for i, c in enumerate(load_cpu)})
        out("- **CPU microseconds per event** (process CPU / events in the records committed, "
            "%d): " % applied + ", ".join(
                "%s %.2f" % (k, 1e6 * cpu[k] / max(applied, 1)) for k in sorted(cpu)) +
            "; all processes %.2f" % (1e6 * sum(cpu.values()) / max(applied, 1)))
        out("- the whole machine (every process, kernel writeback included, other users' work "
            "too): %.1f CPU s busy, %.2f us per event" % (busy1 - busy0,
                                                         1e6 * (busy1 - busy0) / max(applied, 1)))
        out("")
        out("affinity_load reports:")
        out("")
        out("```")
        for rep in reports:
            out("\n".join(l for l in rep.splitlines() if "calls/s" in l or "p50" in l
                          or "ok" in l.lower())[:1500])
        out("```")
        out("")

        if "3" in parts:
            # ---- 3. writes blocked by a leader kill ----
            stop = threading.Event()
            waits = []

            def writer():
                n = 0
                while not stop.is_set():
                    req = pb.PutEventsRequest(collection="shop", user_id="lk-%d" % (n % 50),
                                              events=[pb.Event(item_id="item-%d" % (n % 1000),
                                                               type=pb.EVENT_TYPE_VIEW)],
                                              request_id="lk-%d" % n)
                    t1 = time.time()
                    i = n
                    while True:
                        r = replicas[i % 3]
                        i += 1
                        try:
                            client.unary(r, "PutEvents", req, pb.PutEventsResponse, timeout=2)
                            break
                        except grpc.RpcError:
                            time.sleep(0.02)
                    waits.append((t1, time.time() - t1))
                    n += 1
                    time.sleep(0.02)

            th = threading.Thread(target=writer)
            th.start()
            time.sleep(3)
            leader = nats.stream_leader("AFFINITY")
            t_kill = time.time()
            nats.kill(leader)
            time.sleep(15)
            stop.set()
            th.join()
            nats.start(leader)
            after = [w for t, w in waits if t >= t_kill - 2.5]
            before = [w for t, w in waits if t < t_kill - 2.5]
            out("## 3. Writes blocked by a stream-leader kill")
            out("")
            out("- one writer, ~50 PutEvents/s (1 event), 2 s deadline, retried with the same "
                "request_id on the next replica on failure; leader node n%d killed (SIGKILL)" % leader)
            out("- **longest time a write waited to be acknowledged around the kill: %.2f s**; "
                "before the kill: max %.3f s over %d writes; writes in the 15 s after: %d" %
                (max(after) if after else float("nan"), max(before) if before else float("nan"),
                 len(before), len(after)))
            out("")
        if "4" in parts:
            # ---- 4. bootstrap time: a new replica from a peer's snapshot, d = 128 ----
            data = os.path.join(work, "boot-data")
            subprocess.run([load, "gen", "--out", data, "--rows", str(args.boot_items), "--dim", "128",
                            "--queries", "10", "--clusters", "50"], check=True,
                           stdout=subprocess.DEVNULL)
            client.unary(replicas[0], "CreateCollection",
                         pb.CreateCollectionRequest(name="boot", dimension=128,
                                                    metric=pb.METRIC_COSINE, request_id="boot"),
                         pb.CreateCollectionResponse)
            tl = time.time()
            subprocess.run([os.path.join(args.build, "src", "affinity"), "--addr", replicas[0].addr,
                            "load", "boot", "--vectors", os.path.join(data, "catalog.npy"),
                            "--id-prefix", "b-", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
            t_load = time.time() - tl
            last = client.applied(replicas[0])
            for r in replicas:
                client.wait_applied(r, last, timeout=900)
            new = Replica(work, "boot", affinityd, nats.urls(),
                          extra=["--bootstrap-from", replicas[0].addr])
            tb = time.time()
            new.start()
            client.wait_serving(new, timeout=900)
            t_boot = time.time() - tb
            cpu_boot = cpu_seconds(new.proc.pid)
            info = client.unary(new, "DescribeCollection", pb.DescribeCollectionRequest(name="boot"),
                                pb.CollectionInfo)
            snap_bytes = os.path.getsize(os.path.join(new.data_dir, "data.mdb"))
            out("## 4. Bootstrap of a new replica from a peer's snapshot")
            out("")
            out("- catalog: %d items, d = 128 (loaded through the log in %.1f s), plus the events "
                "of part 1" % (args.boot_items, t_load))
            out("- new replica with --bootstrap-from: start to SERVING (snapshot made by the peer, "
                "streamed, installed, engine rebuilt, log replayed from the snapshot's sequence): "
                "**%.1f s** (its CPU time %.1f s); it serves %d items; store file %.0f MB" %
                (t_boot, cpu_boot, info.item_count,
                 snap_bytes / 1e6))
            out("- per million items at this rate: %.1f s (a linear extrapolation of this one "
                "measurement, not a measurement at 1M)" % (t_boot * 1e6 / args.boot_items))
            out("")
            new.stop()
        for r in replicas:
            r.stop()
    finally:
        for r in replicas:
            r.kill()
        nats.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

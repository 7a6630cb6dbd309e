"""Test harness for replication (issue 15): a NATS JetStream cluster and affinityd replicas on
loopback, started and killed by the tests themselves.

NatsCluster starts `nats-server -js` nodes on free loopback ports with a cluster route mesh
and a monitoring port each (the stream's leader is read from /jsz). Replica runs affinityd
with --log on those servers and its own --data-dir. Clients use grpcio with message classes
generated at test time (tests/interop/test_interop.py: generate_stubs).
"""
import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "interop"))
from test_interop import generate_stubs  # noqa: E402

SVC = "/affinity.v1.Affinity/"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class NatsCluster:
    """n nats-server nodes with JetStream, one route mesh, store dirs under workdir."""

    def __init__(self, workdir, n=3, binary="nats-server"):
        self.workdir = workdir
        self.binary = binary
        self.n = n
        self.client_ports = [free_port() for _ in range(n)]
        self.route_ports = [free_port() for _ in range(n)]
        self.http_ports = [free_port() for _ in range(n)]
        self.procs = [None] * n
        self.logs = []

    def store_dir(self, i):
        return os.path.join(self.workdir, "nats%d" % i)

    def start(self, i):
        os.makedirs(self.store_dir(i), exist_ok=True)
        conf = os.path.join(self.workdir, "nats%d.conf" % i)
        routes = ",".join("nats-route://127.0.0.1:%d" % p
                          for j, p in enumerate(self.route_ports) if j != i)
        with open(conf, "w") as f:
            f.write("server_name: n%d\nlisten: 127.0.0.1:%d\nhttp: 127.0.0.1:%d\n"
                    "jetstream { store_dir: %s }\n"
                    % (i, self.client_ports[i], self.http_ports[i], json.dumps(self.store_dir(i))))
            if self.n > 1:  # a lone node runs without a cluster block
                f.write("cluster { name: affinity-test\nlisten: 127.0.0.1:%d\nroutes: [%s] }\n"
                        % (self.route_ports[i], routes))
        log = open(os.path.join(self.workdir, "nats%d.log" % i), "a")
        self.procs[i] = subprocess.Popen([self.binary, "-c", conf], stdout=log,
                                         stderr=subprocess.STDOUT)

    def start_all(self):
        for i in range(self.n):
            self.start(i)

    def kill(self, i):
        p = self.procs[i]
        if p and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs[i] = None

    def stop_all(self):
        for i in range(self.n):
            p = self.procs[i]
            if p and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            self.procs[i] = None

    def urls(self):
        return ",".join("nats://127.0.0.1:%d" % p for p in self.client_ports)

    def jsz(self, i):
        url = "http://127.0.0.1:%d/jsz?streams=true&config=true" % self.http_ports[i]
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.load(r)

    def stream_leader(self, stream):
        """The index of the node leading stream, or None."""
        for i in range(self.n):
            if not self.procs[i]:
                continue
            try:
                z = self.jsz(i)
            except OSError:
                continue
            for acc in z.get("account_details", []):
                for st in acc.get("stream_detail", []):
                    if st.get("name") == stream:
                        leader = st.get("cluster", {}).get("leader")
                        if leader and leader.startswith("n"):
                            return int(leader[1:])
        return None


def thread_nices(pid):
    """[(thread name, niceness)] of every thread of process pid (/proc/<pid>/task/*/stat)."""
    out = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        out.append((name, int(stat.rsplit(")", 1)[1].split()[16])))  # field 19 of stat(5)
    return out


class Replica:
    """One affinityd with --log; its data dir survives kill/restart."""

    def __init__(self, workdir, name, affinityd, log_urls, extra=()):
        self.workdir = workdir
        self.name = name
        self.affinityd = affinityd
        self.log_urls = log_urls
        self.extra = list(extra)
        self.data_dir = os.path.join(workdir, name + "-data")
        self.port_file = os.path.join(workdir, name + ".port")
        self.proc = None
        self.addr = None
        self.channel = None

    def start(self):
        if os.path.exists(self.port_file):
            os.unlink(self.port_file)
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        log = open(os.path.join(self.workdir, self.name + ".log"), "a")
        self.proc = subprocess.Popen(
            [self.affinityd, "--listen", "127.0.0.1:0", "--port-file", self.port_file,
             "--backend", "cpu", "--cpu-threads", "1", "--threads", "2",
             "--data-dir", self.data_dir, "--log", self.log_urls, "--log-level", "info",
             "--train-interval-s", "0"] + self.extra,
            stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %d" % (self.name, self.proc.returncode))
            try:
                with open(self.port_file) as f:
                    port = f.read().strip()
                if port:
                    self.addr = "127.0.0.1:" + port
                    self.channel = grpc.insecure_channel(self.addr)
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        raise RuntimeError("%s wrote no port" % self.name)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.channel:
            self.channel.close()
        self.proc = None
        self.channel = None

    def stop(self):
        """SIGTERM; returns the exit code."""
        if not self.proc:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        if self.channel:
            self.channel.close()
        self.proc = None
        self.channel = None
        return rc

    def log_tail(self, n=3000):
        try:
            with open(os.path.join(self.workdir, self.name + ".log")) as f:
                return f.read()[-n:]
        except OSError:
            return ""


class Client:
    """Unary and client-streaming calls with the generated message classes."""

    def __init__(self, pb, health):
        self.pb = pb
        self.health = health

    def unary(self, replica, method, req, resp_cls, timeout=10):
        fn = replica.channel.unary_unary(SVC + method,
                                         request_serializer=req.__class__.SerializeToString,
                                         response_deserializer=resp_cls.FromString)
        return fn(req, timeout=timeout)

    def upsert(self, replica, batches, timeout=20):
        fn = replica.channel.stream_unary(
            SVC + "UpsertItems", request_serializer=self.pb.UpsertItemsRequest.SerializeToString,
            response_deserializer=self.pb.UpsertItemsResponse.FromString)
        return fn(iter(batches), timeout=timeout)

    def serving(self, replica):
        fn = replica.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=self.health.HealthCheckRequest.SerializeToString,
            response_deserializer=self.health.HealthCheckResponse.FromString)
        try:
            return fn(self.health.HealthCheckRequest(), timeout=2).status == 1
        except grpc.RpcError:
            return False

    def wait_serving(self, replica, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.serving(replica):
                return
            time.sleep(0.1)
        raise AssertionError("%s not SERVING within %d s:\n%s" %
                             (replica.name, timeout, replica.log_tail()))

    def applied(self, replica):
        info = self.unary(replica, "GetServerInfo", self.pb.GetServerInfoRequest(),
                          self.pb.ServerInfo)
        return info.log_applied_sequence

    def wait_applied(self, replica, seq, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.applied(replica) >= seq:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError("%s did not apply %d within %d s:\n%s" %
                             (replica.name, seq, timeout, replica.log_tail()))


def retry_unavailable(fn, budget_s=30):
    """Calls fn() until it does not fail with UNAVAILABLE (e.g. the stream still electing
    its first leader), at most budget_s seconds."""
    deadline = time.time() + budget_s
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.time() > deadline:
                raise
            time.sleep(0.1)


def clean_up(work, ok, keep, replicas):
    """Kills the replicas; keeps the work directory (and prints their logs) on failure or
    with --keep, else removes it."""
    replicas = [r for r in replicas if r]
    for r in replicas:
        r.kill()
    if not ok or keep:
        print("work directory kept:", work)
        for r in replicas:
            sys.stderr.write("---- %s ----\n%s\n" % (r.name, r.log_tail()))
    else:
        shutil.rmtree(work, ignore_errors=True)


def stubs(proto_dir, out_dir):
    return generate_stubs(proto_dir, out_dir)


class Setup:
    """What a replication test starts from: its command line (--affinityd, --proto-dir,
    --keep), the seed (SEED or the time, printed) and its rng, a work directory, generated
    stubs and a Client, a started n-node NATS cluster and n replicas (not started yet)."""

    def __init__(self, prefix, n=3, extra=()):
        ap = argparse.ArgumentParser()
        ap.add_argument("--affinityd", required=True)
        ap.add_argument("--proto-dir", required=True)
        ap.add_argument("--keep", action="store_true", help="keep the work directory")
        self.args = ap.parse_args()
        self.seed = int(os.environ.get("SEED", time.time()))
        print("seed", self.seed)
        self.rng = random.Random(self.seed)
        self.work = tempfile.mkdtemp(prefix=prefix)
        self.pb, health = stubs(self.args.proto_dir, self.work)
        self.client = Client(self.pb, health)
        self.nats = NatsCluster(self.work, n)
        self.nats.start_all()
        self.replicas = [Replica(self.work, "r%d" % i, self.args.affinityd, self.nats.urls(),
                                 extra=extra) for i in range(n)]

    def start_replicas(self):
        """Starts every replica and waits until each reports SERVING."""
        t0 = time.time()
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            self.client.wait_serving(r)
        print("cluster up in %.1f s" % (time.time() - t0))

    def stop_replicas(self):
        """SIGTERM to every replica; asserts each exited with 0."""
        rcs = [r.stop() for r in self.replicas]
        assert rcs == [0] * len(rcs), rcs

    def teardown(self, ok):
        """Kills what still runs; removes the work directory after a pass (without --keep),
        else names it."""
        for r in self.replicas:
            r.kill()
        self.nats.stop_all()
        if ok and not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            print("work directory kept:", self.work)


def unit(rng, dim=8):
    """A random unit vector of dim floats (the replication tests use 8)."""
    v = [rng.gauss(0, 1) for _ in range(dim)]
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def fail(msg, replicas=()):
    """Raises AssertionError(msg) after printing the replicas' log tails."""
    for r in replicas:
        sys.stderr.write("---- %s log ----\n%s\n" % (r.name, r.log_tail()))
    raise AssertionError(msg)

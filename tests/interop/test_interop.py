#!/usr/bin/python3
"""Interoperability: a gRPC client we did not write (Debian's python3-grpcio) against affinityd.

Run by ctest (label e2e) as:
    /usr/bin/python3 tests/interop/test_interop.py --affinityd BUILD/src/affinityd \
        --proto-dir SOURCE/proto

Python message classes are generated at test time with `protoc --python_out` (protobuf-compiler)
into a temporary directory; calls go through grpcio's generic channel.unary_unary /
stream_unary with the messages' own serializers, so python3-grpc-tools is not needed.
The server runs on 127.0.0.1 with port 0 and reports its port through --port-file.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import grpc

ARGS = None
PB = None  # affinity_pb2
HEALTH = None  # health_pb2
SERVER = None  # the running affinityd (subprocess.Popen)
ADDR = None
TOKEN = "interop-secret-token"
DIM = 4
SVC = "/affinity.v1.Affinity/"


def generate_stubs(proto_dir, out_dir):
    subprocess.run(
        ["protoc", "--python_out=" + out_dir, "-I" + proto_dir,
         "affinity/v1/affinity.proto", "grpc/health/v1/health.proto"],
        check=True)
    for pkg in ("affinity", "affinity/v1", "grpc", "grpc/health", "grpc/health/v1"):
        open(os.path.join(out_dir, pkg, "__init__.py"), "a").close()
    # The generated "grpc" package would shadow grpcio: import the modules by path instead.
    import importlib.util

    def load(name, rel):
        spec = importlib.util.spec_from_file_location(name, os.path.join(out_dir, rel))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return (load("affinity_pb2", "affinity/v1/affinity_pb2.py"),
            load("health_pb2", "grpc/health/v1/health_pb2.py"))


def start_server(workdir):
    port_file = os.path.join(workdir, "port")
    token_file = os.path.join(workdir, "token")
    with open(token_file, "w") as f:
        f.write(TOKEN + "\n")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    log = open(os.path.join(workdir, "affinityd.log"), "w")
    proc = subprocess.Popen(
        [ARGS.affinityd, "--listen", "127.0.0.1:0", "--port-file", port_file,
         "--backend", "cpu", "--threads", "2", "--token-file", token_file,
         "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("affinityd exited with %d; log in %s" % (proc.returncode, workdir))
        try:
            with open(port_file) as f:
                port = f.read().strip()
            if port:
                return proc, "127.0.0.1:" + port
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("affinityd did not write its port within 30 s")


def unary(channel, method, req, resp_cls, token=TOKEN, timeout=10):
    fn = channel.unary_unary(SVC + method, request_serializer=req.__class__.SerializeToString,
                             response_deserializer=resp_cls.FromString)
    md = [("authorization", "Bearer " + token)] if token else None
    return fn(req, timeout=timeout, metadata=md)


class Interop(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.channel = grpc.insecure_channel(ADDR)
        grpc.channel_ready_future(cls.channel).result(timeout=15)
        name = "interop"
        unary(cls.channel, "CreateCollection",
              PB.CreateCollectionRequest(name=name, dimension=DIM,
                                         metric=PB.METRIC_INNER_PRODUCT),
              PB.CreateCollectionResponse)
        # Client-streaming UpsertItems: three batches of items on the axes and diagonals.
        vectors = {
            "x": [1, 0, 0, 0], "y": [0, 1, 0, 0], "z": [0, 0, 1, 0], "w": [0, 0, 0, 1],
            "xy": [0.7, 0.7, 0, 0], "zw": [0, 0, 0.7, 0.7],
        }
        items = [PB.Item(id=k, vector=v, category="c-" + k[0], price=float(len(k)),
                         available=True, available_set=True) for k, v in vectors.items()]
        batches = [PB.UpsertItemsRequest(collection=name, items=items[0:2]),
                   PB.UpsertItemsRequest(items=items[2:4]),
                   PB.UpsertItemsRequest(items=items[4:])]
        upsert = cls.channel.stream_unary(
            SVC + "UpsertItems", request_serializer=PB.UpsertItemsRequest.SerializeToString,
            response_deserializer=PB.UpsertItemsResponse.FromString)
        resp = upsert(iter(batches), timeout=10,
                      metadata=[("authorization", "Bearer " + TOKEN)])
        assert resp.upserted_count == 6, resp
        cls.collection = name

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()

    def test_health_serving(self):
        check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HEALTH.HealthCheckRequest.SerializeToString,
            response_deserializer=HEALTH.HealthCheckResponse.FromString)
        # Health needs no token.
        deadline = time.time() + 10
        while True:
            resp = check(HEALTH.HealthCheckRequest(service=""), timeout=5)
            if resp.status == HEALTH.HealthCheckResponse.SERVING or time.time() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(resp.status, HEALTH.HealthCheckResponse.SERVING)

    def test_search_finds_nearest(self):
        req = PB.SearchRequest(collection=self.collection, k=3, queries=[
            PB.Query(vector=[0.9, 0.1, 0, 0]), PB.Query(vector=[0, 0, 0.1, 0.9], k=1)])
        resp = unary(self.channel, "Search", req, PB.SearchResponse)
        self.assertEqual(len(resp.results), 2)
        self.assertEqual([h.id for h in resp.results[0].hits], ["x", "xy", "y"])
        self.assertAlmostEqual(resp.results[0].hits[0].score, 0.9, places=5)
        self.assertEqual([h.id for h in resp.results[1].hits], ["w"])

    def test_search_filter_by_category(self):
        req = PB.SearchRequest(collection=self.collection, k=5,
                               queries=[PB.Query(vector=[1, 1, 0, 0])],
                               filter=PB.Filter(categories=["c-y"]))
        resp = unary(self.channel, "Search", req, PB.SearchResponse)
        self.assertEqual([h.id for h in resp.results[0].hits], ["y"])

    def test_recommend_by_vector(self):
        req = PB.RecommendRequest(collection=self.collection, k=2,
                                  user_vector=PB.UserVector(values=[0, 0, 1, 0.5]))
        resp = unary(self.channel, "Recommend", req, PB.RecommendResponse)
        # Inner products: zw 0.7 + 0.35 = 1.05, z 1.0, then w 0.5.
        self.assertEqual([h.id for h in resp.hits], ["zw", "z"])
        self.assertAlmostEqual(resp.hits[0].score, 1.05, places=5)
        self.assertEqual(resp.source, PB.RECOMMEND_SOURCE_VECTOR)

    def test_wrong_dimension_is_invalid_argument(self):
        req = PB.SearchRequest(collection=self.collection, k=3,
                               queries=[PB.Query(vector=[1, 0, 0])])
        with self.assertRaises(grpc.RpcError) as cm:
            unary(self.channel, "Search", req, PB.SearchResponse)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        details = cm.exception.details()
        self.assertIn("3", details)
        self.assertIn(str(DIM), details)
        self.assertIn("dimension", details.lower())

    def test_unknown_collection_is_not_found(self):
        req = PB.SearchRequest(collection="no-such-collection", k=3,
                               queries=[PB.Query(vector=[1, 0, 0, 0])])
        with self.assertRaises(grpc.RpcError) as cm:
            unary(self.channel, "Search", req, PB.SearchResponse)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)
        self.assertIn("no-such-collection", cm.exception.details())

    def test_missing_token_is_unauthenticated(self):
        with self.assertRaises(grpc.RpcError) as cm:
            unary(self.channel, "ListCollections", PB.ListCollectionsRequest(),
                  PB.ListCollectionsResponse, token=None)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        with self.assertRaises(grpc.RpcError) as cm:
            unary(self.channel, "ListCollections", PB.ListCollectionsRequest(),
                  PB.ListCollectionsResponse, token="wrong")
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)

    def test_unknown_method_is_unimplemented(self):
        fn = self.channel.unary_unary(SVC + "NoSuchMethod", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
        with self.assertRaises(grpc.RpcError) as cm:
            fn(b"", timeout=5, metadata=[("authorization", "Bearer " + TOKEN)])
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNIMPLEMENTED)


def main():
    global ARGS, PB, HEALTH, SERVER, ADDR
    parser = argparse.ArgumentParser()
    parser.add_argument("--affinityd", required=True)
    parser.add_argument("--proto-dir", required=True)
    ARGS, rest = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="aff_interop_") as work:
        PB, HEALTH = generate_stubs(ARGS.proto_dir, work)
        SERVER, ADDR = start_server(work)
        try:
            prog = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2)
            ok = prog.result.wasSuccessful()
        finally:
            SERVER.send_signal(signal.SIGTERM)
            try:
                rc = SERVER.wait(timeout=20)
            except subprocess.TimeoutExpired:
                SERVER.kill()
                rc = -9
            if rc != 0:
                print("affinityd exited with %d after SIGTERM" % rc, file=sys.stderr)
                ok = False
            if not ok:
                with open(os.path.join(work, "affinityd.log")) as f:
                    sys.stderr.write("---- affinityd log ----\n" + f.read()[-4000:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

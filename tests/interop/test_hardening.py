#!/usr/bin/python3
"""Hardening (issue 12) against a real affinityd with a client we did not write (grpcio).

Run by ctest (label e2e) as:
    /usr/bin/python3 tests/interop/test_hardening.py --affinityd BUILD/src/affinityd \
        --proto-dir SOURCE/proto

Covers: invalid UTF-8 and NUL bytes in string fields at any depth (INVALID_ARGUMENT naming the
field, nothing stored); unknown methods need the token; an empty UpsertItems batch to a
missing collection; descriptor exhaustion under a low RLIMIT_NOFILE and recovery within 1 s;
the connection limit and its log line; handshake and idle timeouts for silent connections.
Each group runs its own server (the flags differ); the servers write their port to a file.
"""
import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_interop  # noqa: E402  (generate_stubs)

ARGS = None
PB = None
HEALTH = None
REFL = None  # grpc.reflection.v1 messages (v1alpha has the same wire format)
WORK = None
TOKEN = "hardening-token"
SVC = "/affinity.v1.Affinity/"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class Server:
    """One affinityd in its own directory; flags after the common ones."""

    def __init__(self, name, flags, nofile=None, token=True, tls=False):
        self.dir = os.path.join(WORK, name)
        os.makedirs(self.dir)
        port_file = os.path.join(self.dir, "port")
        args = [ARGS.affinityd, "--listen", "127.0.0.1:0", "--port-file", port_file,
                "--backend", "cpu", "--threads", "2", "--log-level", "info"] + flags
        if token:
            token_file = os.path.join(self.dir, "token")
            with open(token_file, "w") as f:
                f.write(TOKEN + "\n")
            args += ["--token-file", token_file]
        self.log_path = os.path.join(self.dir, "affinityd.log")
        self.log_file = open(self.log_path, "w")
        log = self.log_file

        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
                                     preexec_fn=limit)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("affinityd exited with %d:\n%s" % (self.proc.returncode,
                                                                      self.log()))
            try:
                with open(port_file) as f:
                    port = f.read().strip()
                if port:
                    self.port = int(port)
                    self.addr = "127.0.0.1:" + port
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        else:
            self.proc.kill()
            raise RuntimeError("affinityd did not write its port within 60 s")
        if not tls:
            self.wait_serving(60)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def health(self, timeout=2.0):
        """SERVING status through a fresh channel, or the gRPC error code."""
        with grpc.insecure_channel(self.addr) as ch:
            check = ch.unary_unary("/grpc.health.v1.Health/Check",
                                   request_serializer=HEALTH.HealthCheckRequest.SerializeToString,
                                   response_deserializer=HEALTH.HealthCheckResponse.FromString)
            try:
                return check(HEALTH.HealthCheckRequest(), timeout=timeout).status
            except grpc.RpcError as e:
                return e.code()

    def wait_serving(self, seconds):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.health() == HEALTH.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise RuntimeError("affinityd not SERVING within %d s" % seconds)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9
        finally:
            self.log_file.close()


def md():
    return [("authorization", "Bearer " + TOKEN)]


def unary(channel, method, req_bytes, resp_cls, token=True):
    fn = channel.unary_unary(SVC + method, request_serializer=lambda b: b,
                             response_deserializer=resp_cls.FromString)
    return fn(req_bytes, timeout=10, metadata=md() if token else None)


def upsert(channel, messages):
    fn = channel.stream_unary(SVC + "UpsertItems", request_serializer=lambda b: b,
                              response_deserializer=PB.UpsertItemsResponse.FromString)
    return fn(iter(messages), timeout=10, metadata=md())


def patch(msg_bytes, old, new):
    """Replaces a placeholder with bytes of the same length, so the wire framing holds."""
    assert len(old) == len(new) and msg_bytes.count(old) == 1
    return msg_bytes.replace(old, new)


def wait_closed(sock, seconds):
    """Seconds until the peer closes sock (reads EOF or a reset), or None."""
    t0 = time.time()
    sock.settimeout(0.2)
    while time.time() - t0 < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.time() - t0
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.time() - t0
    return None


class Strings(unittest.TestCase):
    """Every string field is valid UTF-8 without NUL, at any depth; the error names it."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("strings", [])
        cls.ch = grpc.insecure_channel(cls.server.addr)
        unary(cls.ch, "CreateCollection",
              PB.CreateCollectionRequest(name="c", dimension=2).SerializeToString(),
              PB.CreateCollectionResponse)

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        assert cls.server.stop() == 0

    def assert_invalid(self, call, *needles):
        with self.assertRaises(grpc.RpcError) as cm:
            call()
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                         cm.exception.details())
        for n in needles:
            self.assertIn(n, cm.exception.details())

    def get_ids(self, ids):
        resp = unary(self.ch, "GetItems",
                     PB.GetItemsRequest(collection="c", ids=ids).SerializeToString(),
                     PB.GetItemsResponse)
        return sorted(it.id for it in resp.items)

    def test_invalid_utf8_item_id_is_rejected_and_not_stored(self):
        items = [PB.Item(id="ok1", vector=[1, 0]), PB.Item(id="BADX", vector=[0, 1])]
        raw = patch(PB.UpsertItemsRequest(collection="c", items=items).SerializeToString(),
                    b"BADX", b"\xff\xfeAB")
        self.assert_invalid(lambda: upsert(self.ch, [raw]), "items[1].id", "UTF-8")
        self.assertEqual(self.get_ids(["ok1", "AB"]), [])

    def test_nul_in_an_id_is_rejected(self):
        items = [PB.Item(id="nulXA", vector=[1, 0]), PB.Item(id="nulYB", vector=[0, 1])]
        raw = PB.UpsertItemsRequest(collection="c", items=items).SerializeToString()
        raw = patch(patch(raw, b"nulXA", b"nul\x00A"), b"nulYB", b"nul\x00B")
        self.assert_invalid(lambda: upsert(self.ch, [raw]), "items[0].id", "NUL")
        self.assertEqual(self.get_ids(["nul"]), [])

    def test_unary_repeated_and_map_fields_are_checked(self):
        raw = patch(PB.GetItemsRequest(collection="c", ids=["a", "b", "QQ"]).SerializeToString(),
                    b"QQ", b"\xc0\x80")  # an overlong NUL
        self.assert_invalid(lambda: unary(self.ch, "GetItems", raw, PB.GetItemsResponse),
                            "ids[2]", "UTF-8")
        ev = PB.Event(item_id="x", type=PB.EVENT_TYPE_VIEW, context={"dev": "ZZZ"})
        raw = patch(PB.PutEventsRequest(collection="c", user_id="u",
                                        events=[PB.Event(item_id="x", type=PB.EVENT_TYPE_VIEW),
                                                ev]).SerializeToString(),
                    b"ZZZ", b"\xed\xa0\x80")  # a UTF-16 surrogate
        self.assert_invalid(lambda: unary(self.ch, "PutEvents", raw, PB.PutEventsResponse),
                            "events[1].context[0].value")

    def test_valid_multibyte_utf8_is_accepted(self):
        items = [PB.Item(id="käse-🧀", vector=[1, 0], tags=["日本"])]
        resp = upsert(self.ch, [PB.UpsertItemsRequest(collection="c",
                                                      items=items).SerializeToString()])
        self.assertEqual(resp.upserted_count, 1)
        self.assertEqual(self.get_ids(["käse-🧀"]), ["käse-🧀"])

    def test_a_repeated_id_in_one_message_counts_once(self):
        items = [PB.Item(id="dup", vector=[1, 0]), PB.Item(id="dup", vector=[0, 1]),
                 PB.Item(id="single", vector=[1, 1])]
        resp = upsert(self.ch, [PB.UpsertItemsRequest(collection="c",
                                                      items=items).SerializeToString()])
        self.assertEqual(resp.upserted_count, 2)
        got = unary(self.ch, "GetItems", PB.GetItemsRequest(
            collection="c", ids=["dup"], include_vectors=True).SerializeToString(),
            PB.GetItemsResponse)
        self.assertEqual(list(got.items[0].vector), [0, 1])  # the last one wins

    def test_partial_upsert_failure_reports_the_count_as_metadata(self):
        good = PB.UpsertItemsRequest(collection="c", items=[
            PB.Item(id="p1", vector=[1, 0]), PB.Item(id="p2", vector=[0, 1])])
        bad = PB.UpsertItemsRequest(items=[PB.Item(id="p3", vector=[1, 0, 0])])
        with self.assertRaises(grpc.RpcError) as cm:
            upsert(self.ch, [good.SerializeToString(), bad.SerializeToString()])
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn(("affinity-upserted-count", "2"), cm.exception.trailing_metadata())

    def test_tag_order_is_kept(self):
        tags = ["zeta", "alpha", "mid", "alpha", "beta"]
        upsert(self.ch, [PB.UpsertItemsRequest(collection="c", items=[
            PB.Item(id="tagged", vector=[1, 0], tags=tags)]).SerializeToString()])
        got = unary(self.ch, "GetItems", PB.GetItemsRequest(
            collection="c", ids=["tagged"]).SerializeToString(), PB.GetItemsResponse)
        self.assertEqual(list(got.items[0].tags), ["zeta", "alpha", "mid", "beta"])
        # Filters still match any of them.
        resp = unary(self.ch, "Search", PB.SearchRequest(
            collection="c", k=5, queries=[PB.Query(vector=[1, 0])],
            filter=PB.Filter(tags=["beta"])).SerializeToString(), PB.SearchResponse)
        self.assertEqual([h.id for h in resp.results[0].hits], ["tagged"])

    def test_empty_batch_to_a_missing_collection_fails(self):
        with self.assertRaises(grpc.RpcError) as cm:
            upsert(self.ch, [PB.UpsertItemsRequest(collection="nope").SerializeToString()])
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(grpc.RpcError) as cm:
            upsert(self.ch, [PB.UpsertItemsRequest(collection="bad name!").SerializeToString()])
        self.assertIn(cm.exception.code(),
                      (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT))

    def test_a_large_header_does_not_break_other_calls(self):
        # gRPC 1.51 drops the whole connection past --max-header-bytes (8 KiB by default in
        # gRPC; 64 KiB here): a 20 KB header and a stream on the same connection both live.
        stream = self.ch.stream_stream(SVC + "BatchRecommend", request_serializer=lambda b: b,
                                       response_deserializer=PB.RecommendResponse.FromString)
        req = PB.RecommendRequest(collection="c", k=1,
                                  user_vector=PB.UserVector(values=[1, 0]))
        import queue
        q = queue.Queue()

        def gen():
            while True:
                x = q.get()
                if x is None:
                    return
                yield x

        answers = stream(gen(), timeout=20, metadata=md())
        q.put(req.SerializeToString())
        first = next(answers)
        lst = self.ch.unary_unary(SVC + "ListCollections", request_serializer=lambda b: b,
                                  response_deserializer=PB.ListCollectionsResponse.FromString)
        resp = lst(b"", timeout=5, metadata=md() + [("x-large", "a" * 20000)])
        self.assertIn("c", [ci.name for ci in resp.collections])
        q.put(req.SerializeToString())
        q.put(None)
        self.assertEqual(len([first] + list(answers)), 2)

    def test_unknown_method_needs_the_token(self):
        fn = self.ch.unary_unary(SVC + "NoSuchMethod", request_serializer=lambda b: b,
                                 response_deserializer=lambda b: b)
        with self.assertRaises(grpc.RpcError) as cm:
            fn(b"", timeout=5)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        self.assertNotIn("affinity.v1", cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            fn(b"", timeout=5, metadata=md())
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNIMPLEMENTED)


class Descriptors(unittest.TestCase):
    """A low RLIMIT_NOFILE, many connections: the server sheds them and recovers."""

    def test_exhaustion_then_recovery_within_one_second(self):
        # No connection limit of our own below the descriptor limit: accept4 hits EMFILE.
        server = Server("emfile", ["--max-connections", "1000000"], nofile=96, token=False)
        try:
            socks = []
            for _ in range(200):
                s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                s.sendall(PREFACE + EMPTY_SETTINGS)
                socks.append(s)
            time.sleep(1.0)
            self.assertNotEqual(server.health(timeout=1.0), HEALTH.HealthCheckResponse.SERVING)
            for s in socks:
                s.close()
            t0 = time.time()
            while server.health(timeout=0.5) != HEALTH.HealthCheckResponse.SERVING:
                self.assertLess(time.time() - t0, 5.0, "no recovery:\n" + server.log()[-3000:])
            recovered = time.time() - t0
            print("recovered %.3f s after the descriptors were freed" % recovered)
            self.assertLess(recovered, 1.0)
            self.assertIn("out of file descriptors", server.log())
        finally:
            self.assertEqual(server.stop(), 0)

    def test_connection_limit_refuses_with_a_log_line(self):
        server = Server("limit", ["--max-connections", "8"], token=False)
        try:
            socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                     for _ in range(16)]
            for s in socks:
                s.sendall(PREFACE + EMPTY_SETTINGS)
            closed = sum(1 for s in socks if wait_closed(s, 0.5) is not None)
            self.assertGreaterEqual(closed, 8)
            log = server.log()
            self.assertIn("connection limit 8", log)
            self.assertIn("refusing new connections: the connection limit is reached", log)
            for s in socks:
                s.close()
            t0 = time.time()
            while server.health(timeout=0.5) != HEALTH.HealthCheckResponse.SERVING:
                self.assertLess(time.time() - t0, 2.0)
        finally:
            self.assertEqual(server.stop(), 0)


class Timeouts(unittest.TestCase):
    """Silent connections are closed: no handshake, or a handshake and then nothing."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("timeouts", ["--handshake-timeout-ms", "500",
                                         "--idle-timeout-ms", "1500"], token=False)

    @classmethod
    def tearDownClass(cls):
        assert cls.server.stop() == 0

    def test_a_connection_that_sends_nothing_is_closed(self):
        s = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
        took = wait_closed(s, 10)
        s.close()
        self.assertIsNotNone(took, "still open after 10 s")
        self.assertLess(took, 3.0)

    def test_a_half_sent_preface_is_closed(self):
        s = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
        s.sendall(PREFACE[:10])
        took = wait_closed(s, 10)
        s.close()
        self.assertIsNotNone(took, "still open after 10 s")
        self.assertLess(took, 3.0)

    def test_an_idle_connection_after_settings_is_closed(self):
        s = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
        s.sendall(PREFACE + EMPTY_SETTINGS)
        took = wait_closed(s, 20)
        s.close()
        self.assertIsNotNone(took, "still open after 20 s")
        self.assertLess(took, 8.0)


class Reflection(unittest.TestCase):
    """grpc.reflection v1 and v1alpha serve the real descriptors (what grpcurl uses)."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("reflection", [])
        cls.ch = grpc.insecure_channel(cls.server.addr)

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        assert cls.server.stop() == 0

    def ask(self, version, requests, token=True):
        fn = self.ch.stream_stream(
            "/grpc.reflection.%s.ServerReflection/ServerReflectionInfo" % version,
            request_serializer=REFL.ServerReflectionRequest.SerializeToString,
            response_deserializer=REFL.ServerReflectionResponse.FromString)
        return list(fn(iter(requests), timeout=10, metadata=md() if token else None))

    def test_list_services_in_both_versions(self):
        want = {"affinity.v1.Affinity", "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
        for version in ("v1", "v1alpha"):
            (resp,) = self.ask(version, [REFL.ServerReflectionRequest(list_services="*")])
            self.assertEqual({s.name for s in resp.list_services_response.service}, want)
            self.assertEqual(resp.original_request.list_services, "*")

    def test_descriptors_are_the_real_ones(self):
        from google.protobuf import descriptor_pb2, descriptor_pool
        reqs = [REFL.ServerReflectionRequest(file_containing_symbol=sym) for sym in
                ("affinity.v1.Affinity", "affinity.v1.SearchRequest",
                 "affinity.v1.Affinity.Search", "affinity.v1.EventType")]
        for version in ("v1", "v1alpha"):
            answers = self.ask(version, reqs)
            self.assertEqual(len(answers), 4)
            for a in answers:
                files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                         for b in a.file_descriptor_response.file_descriptor_proto]
                self.assertEqual(files[0].name, "affinity/v1/affinity.proto")
            # What protoc produced for the Python stubs (which leave out json_name).
            local = descriptor_pb2.FileDescriptorProto.FromString(PB.DESCRIPTOR.serialized_pb)

            def strip_json_names(messages):
                for m in messages:
                    for fld in m.field:
                        fld.ClearField("json_name")
                    strip_json_names(m.nested_type)

            served = descriptor_pb2.FileDescriptorProto()
            served.CopyFrom(files[0])
            strip_json_names(served.message_type)
            self.assertEqual(served, local)
            # The files load into a fresh pool (imports included) and describe every method.
            pool = descriptor_pool.DescriptorPool()
            pending = list(files)
            while pending:
                progress = False
                for f in list(pending):
                    try:
                        pool.Add(f)
                        pending.remove(f)
                        progress = True
                    except TypeError:
                        pass
                self.assertTrue(progress, [f.name for f in pending])
            svc = pool.FindServiceByName("affinity.v1.Affinity")
            self.assertEqual({m.name for m in svc.methods},
                             set(PB.DESCRIPTOR.services_by_name["Affinity"].methods_by_name))
            self.assertEqual(svc.methods_by_name["Search"].input_type.full_name,
                             "affinity.v1.SearchRequest")

    def test_by_filename_and_errors(self):
        answers = self.ask("v1", [
            REFL.ServerReflectionRequest(file_by_filename="grpc/health/v1/health.proto"),
            REFL.ServerReflectionRequest(file_containing_symbol="no.such.Thing"),
            REFL.ServerReflectionRequest(file_by_filename="nope.proto"),
            REFL.ServerReflectionRequest(all_extension_numbers_of_type="affinity.v1.Item")])
        from google.protobuf import descriptor_pb2
        f = descriptor_pb2.FileDescriptorProto.FromString(
            answers[0].file_descriptor_response.file_descriptor_proto[0])
        self.assertEqual(f.package, "grpc.health.v1")
        self.assertEqual(answers[1].error_response.error_code, grpc.StatusCode.NOT_FOUND.value[0])
        self.assertIn("no.such.Thing", answers[1].error_response.error_message)
        self.assertEqual(answers[2].error_response.error_code, grpc.StatusCode.NOT_FOUND.value[0])
        self.assertEqual(answers[3].all_extension_numbers_response.base_type_name,
                         "affinity.v1.Item")

    def test_reflection_needs_the_token(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.ask("v1", [REFL.ServerReflectionRequest(list_services="")], token=False)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)


ADMIN = "admin-token-0123456789"
STORE = "store-token-0123456789"
SCOPED = "scoped-token-0123456789"


class Roles(unittest.TestCase):
    """Serving tokens cannot change the catalog; scoped tokens see only their collections."""

    @classmethod
    def setUpClass(cls):
        tokens = os.path.join(WORK, "tokens")
        with open(tokens, "w") as f:
            f.write("# role token [collections]\nadmin %s\nserving %s\n"
                    "serving %s shop-a  # the storefront of shop a\n" % (ADMIN, STORE, SCOPED))
        cls.server = Server("roles", ["--tokens-file", tokens], token=False)
        cls.ch = grpc.insecure_channel(cls.server.addr)
        for name in ("shop-a", "shop-b"):
            cls.call("CreateCollection", PB.CreateCollectionRequest(name=name, dimension=2),
                     PB.CreateCollectionResponse, ADMIN)
            cls.upsert([PB.UpsertItemsRequest(collection=name,
                                              items=[PB.Item(id="i1", vector=[1, 0])])], ADMIN)

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        assert cls.server.stop() == 0

    @classmethod
    def call(cls, method, req, resp_cls, token):
        fn = cls.ch.unary_unary(SVC + method, request_serializer=req.__class__.SerializeToString,
                                response_deserializer=resp_cls.FromString)
        md_ = [("authorization", "Bearer " + token)] if token else None
        return fn(req, timeout=10, metadata=md_)

    @classmethod
    def upsert(cls, reqs, token):
        fn = cls.ch.stream_unary(SVC + "UpsertItems",
                                 request_serializer=PB.UpsertItemsRequest.SerializeToString,
                                 response_deserializer=PB.UpsertItemsResponse.FromString)
        return fn(iter(reqs), timeout=10, metadata=[("authorization", "Bearer " + token)])

    def code(self, fn):
        try:
            fn()
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.last_details = e.details()
            return e.code()

    def search(self, collection, token):
        return self.call("Search", PB.SearchRequest(collection=collection, k=1,
                                                    queries=[PB.Query(vector=[1, 0])]),
                         PB.SearchResponse, token)

    def test_serving_token_serves_but_cannot_change_the_catalog(self):
        self.assertEqual(self.search("shop-a", STORE).results[0].hits[0].id, "i1")
        ev = PB.PutEventsRequest(collection="shop-a", user_id="u1",
                                 events=[PB.Event(item_id="i1", type=PB.EVENT_TYPE_VIEW)])
        self.assertEqual(self.call("PutEvents", ev, PB.PutEventsResponse, STORE).applied_count, 1)
        denied = grpc.StatusCode.PERMISSION_DENIED
        self.assertEqual(self.code(lambda: self.call(
            "DropCollection", PB.DropCollectionRequest(name="shop-a"),
            PB.DropCollectionResponse, STORE)), denied)
        self.assertIn("admin", self.last_details)
        self.assertEqual(self.code(lambda: self.call(
            "CreateCollection", PB.CreateCollectionRequest(name="x", dimension=2),
            PB.CreateCollectionResponse, STORE)), denied)
        self.assertEqual(self.code(lambda: self.call(
            "DeleteItems", PB.DeleteItemsRequest(collection="shop-a", ids=["i1"]),
            PB.DeleteItemsResponse, STORE)), denied)
        self.assertEqual(self.code(lambda: self.call(
            "DeleteUser", PB.DeleteUserRequest(collection="shop-a", user_id="u1"),
            PB.DeleteUserResponse, STORE)), denied)
        self.assertEqual(self.code(lambda: self.call(
            "ExportUser", PB.ExportUserRequest(user_id="u1"),
            PB.ExportUserResponse, STORE)), denied)
        self.assertEqual(self.code(lambda: self.upsert(
            [PB.UpsertItemsRequest(collection="shop-a", items=[PB.Item(id="i2", vector=[0, 1])])],
            STORE)), denied)
        # Nothing changed: the catalog still answers as before.
        self.assertEqual(self.search("shop-a", ADMIN).results[0].hits[0].id, "i1")
        self.assertEqual(self.code(lambda: self.search("shop-a", "not-a-token-0123456789")),
                         grpc.StatusCode.UNAUTHENTICATED)

    def test_scoped_token_sees_only_its_collections(self):
        self.assertEqual(self.search("shop-a", SCOPED).results[0].hits[0].id, "i1")
        self.assertEqual(self.code(lambda: self.search("shop-b", SCOPED)),
                         grpc.StatusCode.PERMISSION_DENIED)
        self.assertIn("shop-b", self.last_details)
        # Streams are checked message by message.
        fn = self.ch.stream_stream(SVC + "BatchRecommend",
                                   request_serializer=PB.RecommendRequest.SerializeToString,
                                   response_deserializer=PB.RecommendResponse.FromString)
        reqs = [PB.RecommendRequest(collection=c, k=1, user_vector=PB.UserVector(values=[1, 0]))
                for c in ("shop-a", "shop-b")]
        self.assertEqual(self.code(lambda: list(fn(iter(reqs), timeout=10, metadata=[
            ("authorization", "Bearer " + SCOPED)]))), grpc.StatusCode.PERMISSION_DENIED)
        # The admin token is not scoped.
        self.assertEqual(self.search("shop-b", ADMIN).results[0].hits[0].id, "i1")

    def test_a_bad_tokens_file_stops_start_up_with_a_clear_message(self):
        bad = os.path.join(WORK, "bad-tokens")
        with open(bad, "w") as f:
            f.write("root abcdefghijklmnopqrstuvwxyz\n")
        out = subprocess.run([ARGS.affinityd, "--listen", "127.0.0.1:0", "--backend", "cpu",
                              "--tokens-file", bad], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("line 1", out.stderr)
        self.assertIn("admin or serving", out.stderr)


class MutualTls(unittest.TestCase):
    """--tls-client-ca: a client without a certificate from that CA cannot call."""

    def test_client_certificate_is_required(self):
        d = os.path.join(WORK, "pki")
        os.makedirs(d)

        def ossl(*args):
            subprocess.run(["openssl"] + list(args), check=True, cwd=d,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.pem", "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out",
             "client.csr", "-subj", "/CN=client")
        ossl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "client.pem", "-days", "1")
        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out",
             "rogue.pem", "-days", "1", "-subj", "/CN=rogue")

        def read(name):
            with open(os.path.join(d, name), "rb") as f:
                return f.read()

        server = Server("mtls", ["--tls-cert", os.path.join(d, "server.pem"),
                                 "--tls-key", os.path.join(d, "server.key"),
                                 "--tls-client-ca", os.path.join(d, "ca.pem")],
                        token=False, tls=True)
        try:
            def health(key=None, cert=None):
                creds = grpc.ssl_channel_credentials(read("server.pem"), key, cert)
                with grpc.secure_channel(server.addr, creds, options=[
                        ("grpc.ssl_target_name_override", "localhost")]) as ch:
                    check = ch.unary_unary(
                        "/grpc.health.v1.Health/Check",
                        request_serializer=HEALTH.HealthCheckRequest.SerializeToString,
                        response_deserializer=HEALTH.HealthCheckResponse.FromString)
                    try:
                        return check(HEALTH.HealthCheckRequest(), timeout=5).status
                    except grpc.RpcError as e:
                        return e.code()

            self.assertEqual(health(read("client.key"), read("client.pem")),
                             HEALTH.HealthCheckResponse.SERVING)
            self.assertEqual(health(), grpc.StatusCode.UNAVAILABLE)
            self.assertEqual(health(read("rogue.key"), read("rogue.pem")),
                             grpc.StatusCode.UNAVAILABLE)
        finally:
            self.assertEqual(server.stop(), 0)


class Privacy(unittest.TestCase):
    """ExportUser answers a data-access request with everything held about a shopper."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("privacy", [])
        cls.ch = grpc.insecure_channel(cls.server.addr)
        for name in ("p1", "p2"):
            unary(cls.ch, "CreateCollection",
                  PB.CreateCollectionRequest(name=name, dimension=2).SerializeToString(),
                  PB.CreateCollectionResponse)
            upsert(cls.ch, [PB.UpsertItemsRequest(collection=name, items=[
                PB.Item(id="a", vector=[1, 0], category="shoes"),
                PB.Item(id="b", vector=[0, 1], category="hats")]).SerializeToString()])

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        assert cls.server.stop() == 0

    def put(self, collection, user, events):
        return unary(self.ch, "PutEvents", PB.PutEventsRequest(
            collection=collection, user_id=user, events=events).SerializeToString(),
            PB.PutEventsResponse)

    def export(self, collection, user):
        return unary(self.ch, "ExportUser", PB.ExportUserRequest(
            collection=collection, user_id=user).SerializeToString(), PB.ExportUserResponse)

    def test_export_holds_history_aggregates_and_type_index(self):
        self.put("p1", "alice", [
            PB.Event(item_id="a", type=PB.EVENT_TYPE_VIEW, timestamp_ms=1000,
                     context={"device": "phone"}),
            PB.Event(item_id="a", type=PB.EVENT_TYPE_PURCHASE, timestamp_ms=2000, value=2),
            PB.Event(item_id="b", type=PB.EVENT_TYPE_VIEW, timestamp_ms=3000)])
        self.put("p2", "alice", [PB.Event(item_id="b", type=PB.EVENT_TYPE_CLICK)])
        self.put("p1", "bob", [PB.Event(item_id="b", type=PB.EVENT_TYPE_VIEW)])
        resp = self.export("", "alice")
        self.assertEqual(resp.user_id, "alice")
        by = {u.collection: u for u in resp.collections}
        self.assertEqual(set(by), {"p1", "p2"})
        p1 = by["p1"]
        self.assertEqual([(e.item_id, e.type, e.timestamp_ms) for e in p1.events],
                         [("a", "view", 1000), ("a", "purchase", 2000), ("b", "view", 3000)])
        self.assertEqual(dict(p1.events[0].context), {"device": "phone"})
        self.assertEqual(p1.events[1].value, 2)
        self.assertEqual({i.item_id: i.count for i in p1.interactions}, {"a": 2, "b": 1})
        self.assertEqual({t.type: list(t.item_ids) for t in p1.type_index},
                         {"view": ["a", "b"], "purchase": ["a"]})
        self.assertEqual(dict(p1.summary.event_counts), {"view": 2, "purchase": 1})
        self.assertIn("popularity", resp.note)
        # One collection only; nobody else's data.
        only = self.export("p2", "alice")
        self.assertEqual([u.collection for u in only.collections], ["p2"])
        self.assertEqual([e.item_id for e in only.collections[0].events], ["b"])
        self.assertEqual(len(self.export("", "carol").collections), 0)
        # After DeleteUser the export is empty.
        unary(self.ch, "DeleteUser", PB.DeleteUserRequest(user_id="alice").SerializeToString(),
              PB.DeleteUserResponse)
        self.assertEqual(len(self.export("", "alice").collections), 0)
        self.assertEqual(len(self.export("", "bob").collections), 1)

    def opt_out(self, collection, user, on):
        return unary(self.ch, "SetUserOptOut", PB.SetUserOptOutRequest(
            collection=collection, user_id=user, opt_out=on).SerializeToString(),
            PB.SetUserOptOutResponse)

    def recommend(self, collection, user):
        return unary(self.ch, "Recommend", PB.RecommendRequest(
            collection=collection, user_id=user, k=2).SerializeToString(), PB.RecommendResponse)

    def test_opt_out_erases_keeps_nothing_and_answers_popular(self):
        self.put("p1", "dora", [PB.Event(item_id="b", type=PB.EVENT_TYPE_PURCHASE)])
        self.assertEqual(self.recommend("p1", "dora").source, PB.RECOMMEND_SOURCE_PROFILE)
        self.assertTrue(self.opt_out("p1", "dora", True).erased)
        self.assertEqual(len(self.export("p1", "dora").collections), 0)
        self.assertEqual(list(self.export("p1", "dora").opted_out), ["p1"])
        # Events are answered one by one and not stored; answers are popular ones.
        resp = self.put("p1", "dora", [PB.Event(item_id="a", type=PB.EVENT_TYPE_VIEW)])
        self.assertEqual(resp.applied_count, 0)
        self.assertIn("opted out", resp.rejected[0].reason)
        self.assertEqual(self.recommend("p1", "dora").source, PB.RECOMMEND_SOURCE_POPULARITY)
        self.assertEqual(len(self.export("", "dora").collections), 0)
        # Other collections are not affected; opting back in stores events again.
        self.assertEqual(self.put("p2", "dora", [PB.Event(item_id="a", type=PB.EVENT_TYPE_VIEW)])
                         .applied_count, 1)
        self.assertFalse(self.opt_out("p1", "dora", False).erased)
        self.assertEqual(self.put("p1", "dora", [PB.Event(item_id="a", type=PB.EVENT_TYPE_VIEW)])
                         .applied_count, 1)
        # Every collection at once.
        self.assertTrue(self.opt_out("", "dora", True).erased)
        self.assertEqual(list(self.export("", "dora").opted_out), ["*"])
        self.assertEqual(self.put("p2", "dora", [PB.Event(item_id="a", type=PB.EVENT_TYPE_VIEW)])
                         .applied_count, 0)
        self.assertEqual(len(self.export("", "dora").collections), 0)

    def test_opt_out_survives_a_restart(self):
        data = os.path.join(WORK, "optout-data")
        os.makedirs(data)
        for run in range(2):
            server = Server("optout-%d" % run, ["--data-dir", data])
            try:
                with grpc.insecure_channel(server.addr) as ch:
                    def call(method, req, resp_cls):
                        return unary(ch, method, req.SerializeToString(), resp_cls)
                    if run == 0:
                        call("CreateCollection", PB.CreateCollectionRequest(name="d", dimension=2),
                             PB.CreateCollectionResponse)
                        upsert(ch, [PB.UpsertItemsRequest(collection="d", items=[
                            PB.Item(id="a", vector=[1, 0])]).SerializeToString()])
                        call("SetUserOptOut", PB.SetUserOptOutRequest(
                            collection="d", user_id="erin", opt_out=True),
                            PB.SetUserOptOutResponse)
                    resp = call("PutEvents", PB.PutEventsRequest(
                        collection="d", user_id="erin",
                        events=[PB.Event(item_id="a", type=PB.EVENT_TYPE_VIEW)]),
                        PB.PutEventsResponse)
                    self.assertEqual(resp.applied_count, 0, "run %d" % run)
            finally:
                self.assertEqual(server.stop(), 0)

    def test_event_retention_erases_old_events_durably(self):
        data = os.path.join(WORK, "retention-data")
        os.makedirs(data)
        now = int(time.time() * 1000)
        old, recent = now - 3 * 86400000, now - 3600000
        ev = PB.Event
        for run, flags in enumerate([[], ["--event-retention-days", "1"], []]):
            server = Server("retention-%d" % run, ["--data-dir", data] + flags)
            try:
                with grpc.insecure_channel(server.addr) as ch:
                    def call(method, req, resp_cls):
                        return unary(ch, method, req.SerializeToString(), resp_cls)

                    def export(user):
                        return call("ExportUser", PB.ExportUserRequest(user_id=user),
                                    PB.ExportUserResponse)

                    def put(user, events):
                        return call("PutEvents", PB.PutEventsRequest(
                            collection="r", user_id=user, events=events), PB.PutEventsResponse)

                    if run == 0:
                        call("CreateCollection", PB.CreateCollectionRequest(name="r", dimension=2),
                             PB.CreateCollectionResponse)
                        upsert(ch, [PB.UpsertItemsRequest(collection="r", items=[
                            PB.Item(id=i, vector=v) for i, v in
                            (("a", [1, 0]), ("b", [0, 1]), ("c", [1, 1]))]).SerializeToString()])
                        self.assertEqual(put("old", [
                            ev(item_id="a", type=PB.EVENT_TYPE_VIEW, timestamp_ms=old),
                            ev(item_id="b", type=PB.EVENT_TYPE_PURCHASE, timestamp_ms=old)])
                            .applied_count, 2)
                        self.assertEqual(put("mixed", [
                            ev(item_id="a", type=PB.EVENT_TYPE_VIEW, timestamp_ms=old),
                            ev(item_id="c", type=PB.EVENT_TYPE_VIEW, timestamp_ms=recent)])
                            .applied_count, 2)
                        self.assertEqual(len(export("old").collections), 1)
                        continue
                    if run == 1:
                        # The first pass runs at start-up; wait for it.
                        deadline = time.time() + 20
                        # The pass logs after its transaction commits (and after the widget
                        # statistics have followed it), so wait for the line too.
                        while ((export("old").collections
                                or "event retention: erased" not in server.log())
                               and time.time() < deadline):
                            time.sleep(0.1)
                        self.assertIn("event retention: erased", server.log())
                        # Older events are refused at ingest.
                        resp = put("mixed", [ev(item_id="a", type=PB.EVENT_TYPE_VIEW,
                                                timestamp_ms=now - 2 * 86400000)])
                        self.assertEqual(resp.applied_count, 0)
                        self.assertIn("retention", resp.rejected[0].reason)
                    self.assertEqual(len(export("old").collections), 0, "run %d" % run)
                    mixed = export("mixed").collections
                    self.assertEqual(len(mixed), 1, "run %d" % run)
                    m = mixed[0]
                    self.assertEqual([(e.item_id, e.timestamp_ms) for e in m.events],
                                     [("c", recent)])
                    self.assertEqual([i.item_id for i in m.interactions], ["c"])
                    self.assertEqual({t.type: list(t.item_ids) for t in m.type_index},
                                     {"view": ["c"]})
                    rec = call("Recommend", PB.RecommendRequest(collection="r", user_id="mixed",
                                                                k=1), PB.RecommendResponse)
                    self.assertEqual(rec.source, PB.RECOMMEND_SOURCE_PROFILE)
                    self.assertEqual(rec.hits[0].id, "c")
            finally:
                self.assertEqual(server.stop(), 0)

    def test_export_errors(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.export("nope", "alice")
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(grpc.RpcError) as cm:
            self.export("p1", "")
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)


class Metrics(unittest.TestCase):
    """The metrics metrics.h promises are fed: events ingested and items per collection."""

    def test_events_and_items_are_exported(self):
        import re
        import urllib.request
        server = Server("metrics", ["--metrics-listen", "127.0.0.1:0"])
        try:
            port = re.search(r"metrics on port (\d+)", server.log()).group(1)
            with grpc.insecure_channel(server.addr) as ch:
                unary(ch, "CreateCollection",
                      PB.CreateCollectionRequest(name="m", dimension=2).SerializeToString(),
                      PB.CreateCollectionResponse)
                upsert(ch, [PB.UpsertItemsRequest(collection="m", items=[
                    PB.Item(id="a", vector=[1, 0]), PB.Item(id="b", vector=[0, 1]),
                    PB.Item(id="c", vector=[1, 1])]).SerializeToString()])
                unary(ch, "PutEvents", PB.PutEventsRequest(
                    collection="m", user_id="u", events=[
                        PB.Event(item_id="a", type=PB.EVENT_TYPE_VIEW),
                        PB.Event(item_id="b", type=PB.EVENT_TYPE_VIEW),
                        PB.Event(item_id="a", type=PB.EVENT_TYPE_PURCHASE),
                        PB.Event(item_id="nope", type=PB.EVENT_TYPE_VIEW)]).SerializeToString(),
                    PB.PutEventsResponse)
            text = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % port,
                                          timeout=10).read().decode()
            self.assertIn('affinity_collection_items{collection="m"} 3', text)
            self.assertIn('affinity_events_ingested_total{type="view"} 2', text)
            self.assertIn('affinity_events_ingested_total{type="purchase"} 1', text)
        finally:
            self.assertEqual(server.stop(), 0)


def reflection_stubs(proto_dir, out_dir):
    subprocess.run(["protoc", "--python_out=" + out_dir, "-I" + proto_dir,
                    "grpc/reflection/v1/reflection.proto"], check=True)
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "reflection_pb2", os.path.join(out_dir, "grpc/reflection/v1/reflection_pb2.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    global ARGS, PB, HEALTH, WORK, REFL
    parser = argparse.ArgumentParser()
    parser.add_argument("--affinityd", required=True)
    parser.add_argument("--proto-dir", required=True)
    ARGS, rest = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="aff_hardening_") as work:
        WORK = work
        PB, HEALTH = test_interop.generate_stubs(ARGS.proto_dir, work)
        REFL = reflection_stubs(ARGS.proto_dir, work)
        prog = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2)
        ok = prog.result.wasSuccessful()
        if not ok:
            for name in sorted(os.listdir(work)):
                log = os.path.join(work, name, "affinityd.log")
                if os.path.exists(log):
                    with open(log) as f:
                        sys.stderr.write("---- %s log ----\n%s\n" % (name, f.read()[-3000:]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

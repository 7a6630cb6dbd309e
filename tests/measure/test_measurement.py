#!/usr/bin/python3
"""Measurement end to end: impressions, attribution, GetStats, Prometheus, experiments with
deterministic assignment, the Thompson-sampling bandit, and (with --chromium) the web console
in headless Chromium.

Run by ctest (label e2e) as:
    /usr/bin/python3 tests/measure/test_measurement.py --affinityd BUILD/src/affinityd \
        --proto-dir SOURCE/proto [--chromium /usr/bin/chromium]

A real affinityd on 127.0.0.1 (port 0, --port-file) with --data-dir, a serving config of two
presets, a bearer token and --metrics-listen; Debian's python3-grpcio as the client (message
classes generated at test time with protoc, as tests/interop does). Simulated shoppers click
with a probability that depends on the arm that served them (random.Random(seed), the seed
printed); the test keeps its own counts and compares the server's figures with them exactly.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

import grpc

ARGS = None
PB = None
TOKEN = "measure-secret-token"
SVC = "/affinity.v1.Affinity/"
DIM = 8
N_ITEMS = 60
SEED = int(os.environ.get("AFF_TEST_SEED", "20261130"))
STATE = {}  # what later tests need from earlier ones (the scenario runs in order)


def generate_stubs(proto_dir, out_dir):
    subprocess.run(["protoc", "--python_out=" + out_dir, "-I" + proto_dir,
                    "affinity/v1/affinity.proto"], check=True)
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "affinity_pb2", os.path.join(out_dir, "affinity/v1/affinity_pb2.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """affinityd on a data dir that outlives restarts."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.data = os.path.join(workdir, "data")
        os.makedirs(self.data, exist_ok=True)
        self.token_file = os.path.join(workdir, "token")
        with open(self.token_file, "w") as f:
            f.write(TOKEN + "\n")
        self.tokens_file = os.path.join(workdir, "tokens")
        with open(self.tokens_file, "w") as f:
            f.write("serving reader-token-0123456\nserving scoped-token-0123456 other\n")
        self.presets = os.path.join(workdir, "serving.json")
        with open(self.presets, "w") as f:
            json.dump({"presets": {
                "control": {"diversity": 0.0},
                "treatment": {"diversity": 0.3},
                "low": {"max_per_category": 0},
                "high": {"diversity": 0.1},
            }}, f)
        self.proc = None
        self.metrics_port = None

    def start(self):
        port_file = os.path.join(self.workdir, "port")
        if os.path.exists(port_file):
            os.unlink(port_file)
        self.metrics_port = free_port()
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        self.log = open(os.path.join(self.workdir, "affinityd.log"), "a")
        self.proc = subprocess.Popen(
            [ARGS.affinityd, "--listen", "127.0.0.1:0", "--port-file", port_file,
             "--backend", "cpu", "--threads", "2", "--token-file", self.token_file,
             "--tokens-file", self.tokens_file, "--data-dir", self.data,
             "--serving-config", self.presets,
             "--metrics-listen", "127.0.0.1:%d" % self.metrics_port, "--log-level", "warn"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("affinityd exited with %d; log in %s"
                                   % (self.proc.returncode, self.workdir))
            try:
                with open(port_file) as f:
                    port = f.read().strip()
                if port:
                    self.addr = "127.0.0.1:" + port
                    self.channel = grpc.insecure_channel(self.addr)
                    grpc.channel_ready_future(self.channel).result(timeout=15)
                    self.wait_serving()
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        raise RuntimeError("affinityd did not start")

    def wait_serving(self):
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                self.call("ListCollections", PB.ListCollectionsRequest(),
                          PB.ListCollectionsResponse)
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            time.sleep(0.05)
        raise RuntimeError("affinityd did not start serving")

    def stop(self):
        if self.proc:
            self.channel.close()
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0
            self.proc = None

    def call(self, method, req, resp_cls, token=TOKEN):
        fn = self.channel.unary_unary(SVC + method,
                                      request_serializer=req.__class__.SerializeToString,
                                      response_deserializer=resp_cls.FromString)
        return fn(req, timeout=20, metadata=[("authorization", "Bearer " + token)])

    def http(self, path, token=TOKEN):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.metrics_port, path))
        if token:
            req.add_header("Authorization", "Bearer " + token)
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()


SERVER = None


def recommend(user, surface, k):
    return SERVER.call("Recommend", PB.RecommendRequest(collection="shop", user_id=user, k=k,
                                                        surface=surface),
                       PB.RecommendResponse)


def put(user, events):
    return SERVER.call("PutEvents", PB.PutEventsRequest(collection="shop", user_id=user,
                                                        events=events),
                       PB.PutEventsResponse)


def ev(item, etype, rec="", pos=0, value=0.0):
    return PB.Event(item_id=item, type=etype, recommendation_id=rec, position=pos, value=value)


def stats_rows(**kw):
    resp = SERVER.call("GetStats", PB.GetStatsRequest(**kw), PB.GetStatsResponse)
    return resp


class Measurement(unittest.TestCase):
    """The scenario, in order (unittest sorts by name: t1_..., t2_...)."""

    def test_t0_setup(self):
        SERVER.call("CreateCollection", PB.CreateCollectionRequest(
            name="shop", dimension=DIM, metric=PB.METRIC_COSINE), PB.CreateCollectionResponse)
        rng = random.Random(1)
        items = []
        for i in range(N_ITEMS):
            v = [rng.gauss(0, 1) for _ in range(DIM)]
            items.append(PB.Item(id="p%03d" % i, vector=v, category="c%d" % (i % 6),
                                 price=10.0 + i, available=True, available_set=True))
        upsert = SERVER.channel.stream_unary(
            SVC + "UpsertItems", request_serializer=PB.UpsertItemsRequest.SerializeToString,
            response_deserializer=PB.UpsertItemsResponse.FromString)
        r = upsert(iter([PB.UpsertItemsRequest(collection="shop", items=items)]), timeout=20,
                   metadata=[("authorization", "Bearer " + TOKEN)])
        self.assertEqual(r.upserted_count, N_ITEMS)

    def test_t1_bad_input(self):
        def create(arms, exp_id="bad", bandit=None):
            e = PB.Experiment(id=exp_id, collection="shop", surface="home", arms=arms)
            if bandit:
                e.bandit.CopyFrom(bandit)
            return SERVER.call("CreateExperiment", PB.CreateExperimentRequest(experiment=e),
                               PB.ExperimentResult)

        with self.assertRaises(grpc.RpcError) as cm:
            create([PB.ExperimentArm(name="a", share=0.5, preset="control"),
                    PB.ExperimentArm(name="b", share=0.4, preset="treatment")])
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("experiment.arms: the shares add up to 0.9; they must add up to 1",
                      cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            create([PB.ExperimentArm(name="a", share=0.5, preset="control"),
                    PB.ExperimentArm(name="b", share=0.5, preset="no-such-preset")])
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("experiment.arms[1].preset: \"no-such-preset\" is not a preset",
                      cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            create([PB.ExperimentArm(name="a", share=0.5), PB.ExperimentArm(name="a", share=0.5)])
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("experiment.arms[1].name", cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            create([PB.ExperimentArm(name="a", share=1.0)])
        self.assertIn("experiment.arms: 1 arms; an experiment has 2..8", cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            create([PB.ExperimentArm(name="a", share=0.5), PB.ExperimentArm(name="b", share=0.5)],
                   bandit=PB.Bandit(enabled=True, floor=PB.FloatValue(value=0.6)))
        self.assertIn("experiment.bandit.floor = 0.6", cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            create([PB.ExperimentArm(name="a", share=0.5), PB.ExperimentArm(name="b", share=0.5)],
                   exp_id="has space")
        self.assertIn("experiment.id", cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            SERVER.call("Recommend", PB.RecommendRequest(collection="shop", user_id="u", k=3,
                                                         surface="bad surface"),
                        PB.RecommendResponse)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("surface:", cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            SERVER.call("GetExperiment", PB.GetExperimentRequest(id="nope"), PB.ExperimentResult)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)
        for kw, text in ((dict(from_ms=2000, to_ms=1000), "from_ms = 2000 must be >= 0 and "
                                                          "<= to_ms = 1000"),
                         (dict(step_s=30), "step_s = 30 must be a multiple of 60")):
            with self.assertRaises(grpc.RpcError) as cm:
                stats_rows(collection="shop", **kw)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn(text, cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            e = PB.Experiment(id="x", collection="no-such", surface="home",
                              arms=[PB.ExperimentArm(name="a", share=1.0)])
            SERVER.call("CreateExperiment", PB.CreateExperimentRequest(experiment=e),
                        PB.ExperimentResult)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)
        # nothing was created by the refused calls
        lst = SERVER.call("ListExperiments", PB.ListExperimentsRequest(),
                          PB.ListExperimentsResponse)
        self.assertEqual(len(lst.experiments), 0)
        # an unknown recommendation id: accepted, counted as unattributed
        r = put("stranger", [ev("p001", PB.EVENT_TYPE_CLICK, rec="0" * 32),
                             ev("p002", PB.EVENT_TYPE_IMPRESSION, rec="not-an-id")])
        self.assertEqual(r.applied_count, 2)
        self.assertEqual(len(r.rejected), 0)
        st = stats_rows(collection="shop")
        self.assertEqual(st.unattributed["click"], 1)
        self.assertEqual(st.unattributed["impression"], 1)
        self.assertEqual(st.unattributed["purchase"], 0)
        STATE["unattributed"] = {"click": 1, "impression": 1}
        # a bad impression (no item) is rejected with its reason, the rest applied
        r = put("stranger", [ev("", PB.EVENT_TYPE_IMPRESSION), ev("p003", PB.EVENT_TYPE_VIEW)])
        self.assertEqual(r.applied_count, 1)
        self.assertEqual([(x.index, x.reason) for x in r.rejected],
                         [(0, "item_id must be 1..128 bytes")])

    def test_t2_ab_scenario(self):
        exp = PB.Experiment(id="home-ab", collection="shop", surface="home", arms=[
            PB.ExperimentArm(name="control", share=0.5, preset="control"),
            PB.ExperimentArm(name="treatment", share=0.5, preset="treatment")])
        res = SERVER.call("CreateExperiment", PB.CreateExperimentRequest(experiment=exp),
                          PB.ExperimentResult)
        self.assertTrue(res.experiment.running)
        self.assertEqual(list(res.experiment.current_shares), [0.5, 0.5])
        with self.assertRaises(grpc.RpcError) as cm:  # one running experiment per surface
            exp2 = PB.Experiment(id="home-ab2", collection="shop", surface="home",
                                 arms=exp.arms)
            SERVER.call("CreateExperiment", PB.CreateExperimentRequest(experiment=exp2),
                        PB.ExperimentResult)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        # roles: serving keys read experiments (of their collections), admin keys change them
        got = SERVER.call("GetExperiment", PB.GetExperimentRequest(id="home-ab"),
                          PB.ExperimentResult, token="reader-token-0123456")
        self.assertEqual(got.experiment.id, "home-ab")
        for method, req, token in (
                ("GetExperiment", PB.GetExperimentRequest(id="home-ab"), "scoped-token-0123456"),
                ("StopExperiment", PB.StopExperimentRequest(id="home-ab"), "reader-token-0123456"),
                ("CreateExperiment", PB.CreateExperimentRequest(experiment=exp2),
                 "reader-token-0123456")):
            with self.assertRaises(grpc.RpcError) as cm:
                SERVER.call(method, req, PB.ExperimentResult, token=token)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.PERMISSION_DENIED, method)
        with self.assertRaises(urllib.error.HTTPError) as cm:
            SERVER.http("/console/api/experiments", token="reader-token-0123456")
        self.assertEqual(cm.exception.code, 403)

        rng = random.Random(SEED)
        print("scenario seed", SEED, file=sys.stderr)
        click_p = {"control": 0.10, "treatment": 0.30}
        counts = {a: {"responses": 0, "impressions": 0, "clicks": 0, "add_to_carts": 0,
                      "purchases": 0, "revenue": 0.0} for a in click_p}
        arms = {}
        users = ["shopper-%03d" % i for i in range(120)]
        for u in users:  # some history, so every shopper gets personal answers
            put(u, [ev("p%03d" % rng.randrange(N_ITEMS), PB.EVENT_TYPE_VIEW)])
        for u in users:
            r = recommend(u, "home", 4)
            self.assertEqual(r.experiment, "home-ab")
            self.assertIn(r.arm, click_p)
            self.assertEqual(r.strategy, r.arm)  # the arm's preset names the strategy
            self.assertEqual(len(r.hits), 4)
            arms[u] = r.arm
            c = counts[r.arm]
            c["responses"] += 1
            events = [ev(h.id, PB.EVENT_TYPE_IMPRESSION, r.recommendation_id, i + 1)
                      for i, h in enumerate(r.hits)]
            c["impressions"] += len(r.hits)
            if rng.random() < click_p[r.arm]:
                item = r.hits[rng.randrange(len(r.hits))].id
                events.append(ev(item, PB.EVENT_TYPE_CLICK, r.recommendation_id))
                c["clicks"] += 1
                if rng.random() < 0.5:
                    events.append(ev(item, PB.EVENT_TYPE_ADD_TO_CART, r.recommendation_id))
                    c["add_to_carts"] += 1
                    if rng.random() < 0.5:
                        value = round(rng.uniform(5, 100), 2)
                        events.append(ev(item, PB.EVENT_TYPE_PURCHASE, r.recommendation_id,
                                         value=value))
                        c["purchases"] += 1
                        c["revenue"] += value
            # a duplicate impression counts nothing; an item not shown is unattributed
            events.append(ev(r.hits[0].id, PB.EVENT_TYPE_IMPRESSION, r.recommendation_id, 1))
            out = put(u, events)
            self.assertEqual(out.applied_count, len(events))
        # a response without a surface is counted under surface ""
        r = recommend(users[0], "", 3)
        self.assertEqual(r.experiment, "")
        self.assertEqual(r.strategy, "default")
        # both arms served, shares near 50/50 (binomial, 120 shoppers: 35..85 is > 99.9 %)
        n_t = sum(1 for a in arms.values() if a == "treatment")
        self.assertTrue(35 <= n_t <= 85, n_t)
        # assignment is stable: the same shoppers again, same arms
        for u in users[:30]:
            self.assertEqual(recommend(u, "home", 4).arm, arms[u])
            counts[arms[u]]["responses"] += 1

        st = stats_rows(collection="shop", surface="home")
        rows = {row.arm: row for row in st.rows}
        self.assertEqual(set(rows), set(click_p))
        for a, c in counts.items():
            row = rows[a]
            self.assertEqual(row.experiment, "home-ab")
            self.assertEqual(row.strategy, a)
            self.assertEqual(row.responses, c["responses"], a)
            self.assertEqual(row.impressions, c["impressions"], a)
            self.assertEqual(row.clicks, c["clicks"], a)
            self.assertEqual(row.add_to_carts, c["add_to_carts"], a)
            self.assertEqual(row.purchases, c["purchases"], a)
            self.assertAlmostEqual(row.revenue, c["revenue"], places=6)
            self.assertAlmostEqual(row.ctr, c["clicks"] / c["impressions"], places=12)
            self.assertAlmostEqual(row.revenue_per_mille,
                                   c["revenue"] * 1000 / c["impressions"], places=9)
            lo, hi = wilson(c["clicks"], c["impressions"])
            self.assertAlmostEqual(row.ctr_interval.low, lo, places=12)
            self.assertAlmostEqual(row.ctr_interval.high, hi, places=12)
        self.assertEqual(st.unattributed["click"], STATE["unattributed"]["click"])
        # GetExperiment says the same per arm
        res = SERVER.call("GetExperiment", PB.GetExperimentRequest(id="home-ab", step_s=60),
                          PB.ExperimentResult)
        for ar in res.arms:
            self.assertEqual(ar.stats.impressions, counts[ar.arm]["impressions"])
            self.assertEqual(ar.stats.clicks, counts[ar.arm]["clicks"])
            self.assertEqual(sum(p.clicks for p in ar.stats.points), counts[ar.arm]["clicks"])
        # Prometheus says the same
        _, ctype, text = SERVER.http("/metrics", token=None)
        for a, c in counts.items():
            labels = ('collection="shop",surface="home",strategy="%s",experiment="home-ab",'
                      'arm="%s"' % (a, a))
            self.assertIn('affinity_outcomes_total{%s,outcome="click"} %d'
                          % (labels, c["clicks"]), text)
            self.assertIn('affinity_outcomes_total{%s,outcome="impression"} %d'
                          % (labels, c["impressions"]), text)
            self.assertIn('affinity_recommendations_served_total{%s} %d'
                          % (labels, c["responses"]), text)
        self.assertIn('affinity_outcomes_unattributed_total{collection="shop",outcome="click"} 1',
                      text)
        self.assertIn("affinity_experiments_running 1", text)
        STATE["arms"] = arms
        STATE["counts"] = counts

    def test_t3_restart_keeps_experiment_and_assignment(self):
        SERVER.stop()
        SERVER.start()
        res = SERVER.call("GetExperiment", PB.GetExperimentRequest(id="home-ab"),
                          PB.ExperimentResult)
        self.assertTrue(res.experiment.running)
        for u, a in STATE["arms"].items():
            self.assertEqual(recommend(u, "home", 4).arm, a, u)
        # outcome counts are in memory only: they restart at zero (documented)
        st = stats_rows(collection="shop", surface="home")
        self.assertEqual(sum(r.clicks for r in st.rows), 0)
        res = SERVER.call("StopExperiment", PB.StopExperimentRequest(id="home-ab"),
                          PB.ExperimentResult)
        self.assertFalse(res.experiment.running)
        self.assertEqual(recommend("shopper-000", "home", 4).experiment, "")

    def test_t4_bandit_moves_traffic(self):
        """Two arms, CTR 0.04 vs 0.20; floor 0.1, an update every 50 impressions: within
        1500 impressions the better arm gets >= 0.8 of the traffic."""
        exp = PB.Experiment(
            id="pdp-bandit", collection="shop", surface="pdp",
            arms=[PB.ExperimentArm(name="low", share=0.5, preset="low"),
                  PB.ExperimentArm(name="high", share=0.5, preset="high")],
            bandit=PB.Bandit(enabled=True, metric=PB.BANDIT_METRIC_CTR,
                             floor=PB.FloatValue(value=0.1), update_every=50, seed=7))
        SERVER.call("CreateExperiment", PB.CreateExperimentRequest(experiment=exp),
                    PB.ExperimentResult)
        rng = random.Random(SEED + 1)
        click_p = {"low": 0.04, "high": 0.20}
        users = ["bandit-%03d" % i for i in range(300)]
        for u in users:
            put(u, [ev("p%03d" % rng.randrange(N_ITEMS), PB.EVENT_TYPE_VIEW)])
        served = []
        for i in range(1500):
            u = users[i % len(users)]
            r = recommend(u, "pdp", 1)
            served.append(r.arm)
            events = [ev(r.hits[0].id, PB.EVENT_TYPE_IMPRESSION, r.recommendation_id, 1)]
            if rng.random() < click_p[r.arm]:
                events.append(ev(r.hits[0].id, PB.EVENT_TYPE_CLICK, r.recommendation_id, 1))
            put(u, events)
        res = SERVER.call("GetExperiment", PB.GetExperimentRequest(id="pdp-bandit"),
                          PB.ExperimentResult)
        shares = dict(zip([a.name for a in res.experiment.arms], res.experiment.current_shares))
        print("bandit shares after 1500 impressions:", shares, "version",
              res.experiment.bandit_version, file=sys.stderr)
        self.assertEqual(res.experiment.bandit_version, 30)  # 1500 / 50
        self.assertGreaterEqual(shares["high"], 0.8)
        self.assertGreaterEqual(shares["low"], 0.1 - 1e-9)  # the floor holds
        late = served[-300:]
        self.assertGreaterEqual(late.count("high") / len(late), 0.7)
        self.assertEqual(sum(a.bandit_impressions for a in res.arms), 1500)
        # deterministic for a given (user, experiment, bandit version): ask again, same arm
        again = [recommend(u, "pdp", 1).arm for u in users[:50]]
        self.assertEqual(again, [recommend(u, "pdp", 1).arm for u in users[:50]])
        STATE["bandit_shares"] = shares
        # the bandit's state survives a restart: same version, same shares, same arms
        SERVER.stop()
        SERVER.start()
        res2 = SERVER.call("GetExperiment", PB.GetExperimentRequest(id="pdp-bandit"),
                           PB.ExperimentResult)
        self.assertEqual(res2.experiment.bandit_version, res.experiment.bandit_version)
        self.assertEqual(list(res2.experiment.current_shares),
                         list(res.experiment.current_shares))
        self.assertEqual([recommend(u, "pdp", 1).arm for u in users[:50]], again)


    def test_t5_pages_similar_and_rerank_are_attributed(self):
        """Every serving call is recorded: a page (one id, two slots), SimilarItems and Rerank
        under their surfaces; strategy "page" for pages, the preset or "default" otherwise."""
        page = SERVER.call("RecommendPage", PB.RecommendPageRequest(
            user_id="shopper-002", surface="page-home",
            slots=[PB.PageSlot(name="a", collection="shop", k=2),
                   PB.PageSlot(name="b", collection="shop", k=2)]), PB.RecommendPageResponse)
        ids = [h.id for sl in page.slots for h in sl.hits]
        self.assertEqual(len(ids), 4)
        sim = SERVER.call("SimilarItems", PB.SimilarItemsRequest(
            collection="shop", item_ids=["p001"], k=3, surface="pdp-similar", preset="control"),
            PB.SimilarItemsResponse)
        rr = SERVER.call("Rerank", PB.RerankRequest(
            collection="shop", user_id="shopper-002", surface="search",
            candidates=[PB.RerankCandidate(id="p005", base_score=1.0),
                        PB.RerankCandidate(id="p006", base_score=0.5),
                        PB.RerankCandidate(id="nope", base_score=0.1)]), PB.RerankResponse)
        put("shopper-002", [
            ev(ids[3], PB.EVENT_TYPE_IMPRESSION, page.recommendation_id, 4),
            ev(ids[3], PB.EVENT_TYPE_PURCHASE, page.recommendation_id, 4, value=12.5),
            ev(sim.results[0].hits[2].id, PB.EVENT_TYPE_CLICK, sim.recommendation_id, 3),
            ev("p006", PB.EVENT_TYPE_CLICK, rr.recommendation_id, 2),
            ev("nope", PB.EVENT_TYPE_IMPRESSION, rr.recommendation_id, 3)])  # not found: not shown
        rows = {r.surface: r for r in stats_rows(collection="shop").rows}
        got = {k: (rows[k].strategy, rows[k].responses, rows[k].impressions, rows[k].clicks,
                   rows[k].purchases, rows[k].revenue)
               for k in ("page-home", "pdp-similar", "search")}
        self.assertEqual(got, {"page-home": ("page", 1, 1, 0, 1, 12.5),
                               "pdp-similar": ("control", 1, 1, 1, 0, 0.0),
                               "search": ("default", 1, 1, 1, 0, 0.0)})


def wilson(s, n, z=1.959963984540054):
    if n == 0:
        return 0.0, 0.0
    p = s / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def main():
    global ARGS, PB, SERVER
    ap = argparse.ArgumentParser()
    ap.add_argument("--affinityd", required=True)
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--chromium", default="")
    ARGS, rest = ap.parse_known_args()
    if ARGS.chromium and not shutil.which(ARGS.chromium):
        print("chromium not found (%s): the console test needs Debian's chromium; run "
              "scripts/install-deps.sh" % ARGS.chromium, file=sys.stderr)
        sys.exit(1)
    work = tempfile.mkdtemp(prefix="aff-measure-")
    PB = generate_stubs(ARGS.proto_dir, work)
    SERVER = Server(work)
    SERVER.start()
    ok = False
    try:
        suite = unittest.TestSuite()
        suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(Measurement))
        if ARGS.chromium:
            import console_check
            console_check.add_tests(suite, SERVER, PB, STATE, ARGS.chromium, TOKEN)
        result = unittest.TextTestRunner(verbosity=2, failfast=True).run(suite)
        ok = result.wasSuccessful()
    finally:
        try:
            SERVER.stop()
        except Exception as e:  # report, keep the log
            print("stop failed:", e, file=sys.stderr)
            ok = False
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print("work dir kept:", work, file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""The web console in headless Chromium (Debian's chromium), against the server the
measurement scenario left behind (test_measurement.py adds these tests with --chromium).

Each page is loaded with `chromium --headless --dump-dom --virtual-time-budget` (the budget
lets the page's fetches finish before the DOM is written) and a NetLog
(--log-net-log): the page's navigation and every request it initiates -- anything it loads
or fetches -- must go to the server itself. Numbers in the DOM are
compared with what the gRPC API and the test's own counts say.
"""
import json
import os
import random
import shutil
import subprocess
import tempfile
import unittest
import urllib.error
from html.parser import HTMLParser


class Cells(HTMLParser):
    """Collects text of elements with data-field, keyed by the data-* attributes of their
    ancestors, plus every element's attributes."""

    def __init__(self):
        super().__init__()
        self.stack = []  # (tag, attrs dict)
        self.cells = []  # (context dict, field, text)
        self.elements = []  # (tag, attrs)
        self.cur = None
        self.text_of = {}  # id -> text

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a))
        if tag in ("input", "br", "meta", "link", "img"):
            return
        self.stack.append([tag, a, ""])

    def handle_endtag(self, tag):
        while self.stack:
            t, a, text = self.stack.pop()
            if self.stack:
                self.stack[-1][2] += text
            if "data-field" in a:
                ctx = {}
                for _, pa, _ in self.stack:
                    ctx.update({k: v for k, v in pa.items() if k.startswith("data-")})
                self.cells.append((ctx, a["data-field"], text))
            if "id" in a:
                self.text_of[a["id"]] = text
            if t == tag:
                break

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2] += data

    def field(self, name, **ctx):
        want = {"data-" + k.replace("_", "-"): v for k, v in ctx.items()}
        found = [t for c, f, t in self.cells
                 if f == name and all(c.get(k) == v for k, v in want.items())]
        if len(found) != 1:
            raise AssertionError("%d cells %s %s" % (len(found), name, ctx))
        return found[0]


def add_tests(suite, server, pb, state, chromium, token):
    Console.server, Console.pb, Console.state, Console.chromium = server, pb, state, chromium
    Console.token = token
    suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(Console))


class Console(unittest.TestCase):
    server = pb = state = chromium = token = None
    netlogs = []

    @classmethod
    def tearDownClass(cls):
        for path in cls.netlogs:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def load(self, fragment):
        """The DOM of /console#fragment after the page's fetches finished."""
        work = tempfile.mkdtemp(prefix="aff-chromium-")
        netlog = os.path.join(work, "net.json")
        url = "http://127.0.0.1:%d/console#%s" % (self.server.metrics_port, fragment)
        out = subprocess.run(
            [self.chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--user-data-dir=" + os.path.join(work, "profile"), "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--log-net-log=" + netlog, "--virtual-time-budget=10000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        Console.netlogs.append(netlog)
        p = Cells()
        p.feed(out.stdout)
        p.dom = out.stdout
        return p

    def ready(self, p, view):
        self.assertIn('data-ready="%s"' % view, p.dom, p.dom[-3000:])

    def test_c1_api_needs_the_token(self):
        with self.assertRaises(urllib.error.HTTPError) as cm:
            self.server.http("/console/api/overview", token=None)
        self.assertEqual(cm.exception.code, 401)
        with self.assertRaises(urllib.error.HTTPError) as cm:
            self.server.http("/console/api/overview", token="wrong")
        self.assertEqual(cm.exception.code, 401)
        status, ctype, page = self.server.http("/console", token=None)
        self.assertEqual(status, 200)
        self.assertTrue(ctype.startswith("text/html"))
        self.assertNotIn("http://", page.replace("http://www.w3.org/2000/svg", ""))
        self.assertNotIn("https://", page)
        # without a token the page asks for one and shows no data
        p = self.load("view=overview")
        self.ready(p, "error")
        self.assertTrue(any(t == "input" and a.get("id") == "token" for t, a in p.elements))
        self.assertNotIn('data-collection="shop"', p.dom)

    def test_c2_collections_and_model_state(self):
        s, pb = self.server, self.pb
        p = self.load("token=%s&view=overview" % self.token)
        self.ready(p, "overview")
        info = s.call("DescribeCollection", pb.DescribeCollectionRequest(name="shop"),
                      pb.CollectionInfo)
        model = s.call("GetModel", pb.GetModelRequest(collection="shop"), pb.ModelInfo)
        self.assertEqual(p.field("items", collection="shop"), str(info.item_count))
        self.assertEqual(p.field("dim", collection="shop"), "8")
        self.assertEqual(p.field("model-state", collection="shop"), model.state)
        self.assertEqual(p.field("model-version", collection="shop"), str(model.version))

    def test_c3_experiments_show_the_scenario_numbers(self):
        """A scripted round on the running bandit experiment; the console's per-arm cells
        equal the test's own counts and GetExperiment's."""
        s, pb = self.server, self.pb
        rng = random.Random(99)
        click_p = {"low": 0.04, "high": 0.20}
        before = s.call("GetExperiment", pb.GetExperimentRequest(id="pdp-bandit"),
                        pb.ExperimentResult)
        counts = {a.arm: [a.stats.responses, a.stats.impressions, a.stats.clicks]
                  for a in before.arms}
        for i in range(200):
            u = "console-%03d" % (i % 40)
            if i < 40:
                s.call("PutEvents", pb.PutEventsRequest(collection="shop", user_id=u, events=[
                    pb.Event(item_id="p%03d" % i, type=pb.EVENT_TYPE_VIEW)]),
                    pb.PutEventsResponse)
            r = s.call("Recommend", pb.RecommendRequest(collection="shop", user_id=u, k=2,
                                                        surface="pdp"), pb.RecommendResponse)
            c = counts[r.arm]
            c[0] += 1
            events = [pb.Event(item_id=h.id, type=pb.EVENT_TYPE_IMPRESSION,
                               recommendation_id=r.recommendation_id, position=j + 1)
                      for j, h in enumerate(r.hits)]
            c[1] += len(r.hits)
            if rng.random() < click_p[r.arm]:
                events.append(pb.Event(item_id=r.hits[0].id, type=pb.EVENT_TYPE_CLICK,
                                       recommendation_id=r.recommendation_id))
                c[2] += 1
            s.call("PutEvents", pb.PutEventsRequest(collection="shop", user_id=u, events=events),
                   pb.PutEventsResponse)
        res = s.call("GetExperiment", pb.GetExperimentRequest(id="pdp-bandit"),
                     pb.ExperimentResult)
        p = self.load("token=%s&view=experiments" % self.token)
        self.ready(p, "experiments")
        for a in res.arms:
            ctx = {"experiment": "pdp-bandit", "arm": a.arm}
            self.assertEqual(a.stats.responses, counts[a.arm][0])
            self.assertEqual(a.stats.impressions, counts[a.arm][1])
            self.assertEqual(a.stats.clicks, counts[a.arm][2])
            self.assertEqual(p.field("responses", **ctx), str(counts[a.arm][0]))
            self.assertEqual(p.field("impressions", **ctx), str(counts[a.arm][1]))
            self.assertEqual(p.field("clicks", **ctx), str(counts[a.arm][2]))
            self.assertEqual(p.field("ctr", **ctx), "%.2f %%" % (100 * a.stats.ctr))
            self.assertEqual(p.field("ctr-ci", **ctx),
                             "%.2f %% – %.2f %%" % (100 * a.stats.ctr_interval.low,
                                                    100 * a.stats.ctr_interval.high))
            self.assertEqual(p.field("share", **ctx), "%.3f" % a.share)
        # the stopped A/B experiment is listed too, and each experiment has its two charts
        self.assertIn('data-experiment="home-ab"', p.dom)
        self.assertIn('<svg width="560" height="220" id="ctr-pdp-bandit"', p.dom)
        self.assertIn('id="conv-pdp-bandit"', p.dom)

    def test_c4_shopper_lookup(self):
        s, pb = self.server, self.pb
        user = "shopper-001"
        p = self.load("token=%s&view=shopper&collection=shop&user=%s" % (self.token, user))
        self.ready(p, "shopper")
        got = s.call("GetUser", pb.GetUserRequest(collection="shop", user_id=user),
                     pb.GetUserResponse)
        counts = ", ".join("%s %d" % (k, v) for k, v in got.event_counts.items())
        self.assertIn(counts.split(", ")[0], p.text_of["counts"])
        self.assertEqual(p.field("loyalty"), "%.3f" % got.traits.loyalty)
        self.assertEqual(p.field("price_sensitivity"), "%.3f" % got.traits.price_sensitivity)
        rows = [a for t, a in p.elements if t == "tr" and "data-event" in a]
        self.assertEqual(len(rows), min(50, got.history_length))
        rec = s.call("Recommend", pb.RecommendRequest(collection="shop", user_id=user, k=10),
                     pb.RecommendResponse)
        hits = [a for t, a in p.elements if t == "li" and "data-hit" in a]
        self.assertEqual([a["data-hit"] for a in hits], [h.id for h in rec.hits])
        reason_names = {v: k for k, v in pb.ReasonKind.items()}
        self.assertEqual([a["data-reason"] for a in hits],
                         [reason_names[h.reason.kind][len("REASON_KIND_"):].lower()
                          for h in rec.hits])

    def test_c5_no_request_leaves_the_server(self):
        self.assertGreaterEqual(len(Console.netlogs), 4)
        origin = "http://127.0.0.1:%d/" % self.server.metrics_port
        seen = []
        for path in Console.netlogs:
            with open(path) as f:
                d = json.load(f)
            types = {v: k for k, v in d["constants"]["logEventTypes"].items()}
            for e in d["events"]:
                if types.get(e["type"]) != "URL_REQUEST_START_JOB":
                    continue
                params = e.get("params", {})
                # what the page asked for: its navigation, and every request it initiated
                # (scripts, styles, images, fonts, fetches). Chromium's own requests about
                # the page (autofill predictions for its forms) have no initiator.
                if params.get("initiator") != origin.rstrip("/") and \
                        params.get("request_type") != "main frame":
                    continue
                seen.append(params["url"])
                self.assertTrue(params["url"].startswith(origin), params["url"])
        self.assertTrue(any("/console/api/experiments" in u for u in seen), seen)
        self.assertTrue(any("/console/api/shopper" in u for u in seen), seen)

#!/usr/bin/python3
"""Replication end to end (issue 15): a 3-node NATS JetStream cluster and 3 affinityd replicas
on loopback, all started by this test.

1. Catalog and events from 4 concurrent writers spread over the replicas (request ids, retried
   with the same id on UNAVAILABLE); mid-stream the stream's leader node and one replica are
   killed with SIGKILL and restarted.
2. Zero acknowledged writes lost: every user's history on every replica holds exactly the
   events acknowledged for it; GetUser answers and the top-k (ids and scores) of fixed
   queries are identical on all replicas.
3. Read-your-writes: 1,000 PutEvents on one replica, each followed by a Recommend on another
   replica with min_log_sequence = the write's log_sequence: every answer comes from the
   user's profile and ranks the viewed item first.
4. BatchRecommend requests carry min_log_sequence too (one beyond the log: UNAVAILABLE in
   its place); experiments (CreateExperiment, StopExperiment) are the same on every replica.
5. The log unreachable: writes answer UNAVAILABLE within their deadline, reads go on, and
   the replica recovers by itself when the log is back.

Run by ctest (label e2e) as:
    /usr/bin/python3 tests/replication/test_replication.py --affinityd BUILD/src/affinityd \
        --proto-dir SOURCE/proto
"""
import argparse
import os
import random
import sys
import tempfile
import threading
import time

import grpc

from cluster import Client, NatsCluster, Replica, fail, stubs, thread_nices, unit

DIM = 8
N_ITEMS = 300
N_WRITERS = 4
WRITES_PER_WRITER = 60
EVENTS_PER_CALL = 5
PAIRS = 1000
COLL = "shop"


def retry_write(client, replicas, start, method, req, resp_cls, budget_s=60):
    """Sends req to replicas[start], then the next ones, with the same request_id, until one
    acknowledges it. Returns (response, tries)."""
    deadline = time.time() + budget_s
    tries = 0
    i = start
    last = None
    while time.time() < deadline:
        r = replicas[i % len(replicas)]
        i += 1
        tries += 1
        if not r.channel:
            time.sleep(0.05)
            continue
        try:
            return client.unary(r, method, req, resp_cls, timeout=5), tries
        except grpc.RpcError as e:
            last = e
            # CANCELLED: this test closed the channel of a replica it killed mid-call.
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.CANCELLED):
                raise
            time.sleep(0.05)
    raise AssertionError("%s not acknowledged within %d s: %s" % (method, budget_s, last))


def put_view(client, pb, replica, user, item, request_id):
    return client.unary(replica, "PutEvents",
                        pb.PutEventsRequest(collection=COLL, user_id=user,
                                            events=[pb.Event(item_id=item,
                                                             type=pb.EVENT_TYPE_VIEW)],
                                            request_id=request_id),
                        pb.PutEventsResponse)


def batch_stream(client, replica, reqs, timeout=20):
    fn = replica.channel.stream_stream(
        "/affinity.v1.Affinity/BatchRecommend",
        request_serializer=client.pb.RecommendRequest.SerializeToString,
        response_deserializer=client.pb.RecommendResponse.FromString)
    return list(fn(iter(reqs), timeout=timeout))


def batch_read_your_writes(client, pb, replicas, rng, seed, far):
    """PutEvents on one replica, then a BatchRecommend stream on another whose requests carry
    the writes' log sequences: each answer sees its event; a request whose sequence is beyond
    the log is answered UNAVAILABLE (error_code 14) after the bounded wait, in its place,
    and the stream goes on."""
    reqs, items = [], []
    for n in range(30):
        w = replicas[n % 3]
        item = "i%03d" % rng.randrange(N_ITEMS)
        user = "bryw-%d-%d" % (seed, n)
        put = put_view(client, pb, w, user, item, "bryw-%d-%d" % (seed, n))
        reqs.append(pb.RecommendRequest(collection=COLL, user_id=user, k=3,
                                        request_id="q%d" % n,
                                        min_log_sequence=put.log_sequence))
        items.append(item)
    reqs.insert(10, pb.RecommendRequest(collection=COLL, user_id="u0-0", k=3, request_id="far",
                                        min_log_sequence=far))
    # Right after: wants a later sequence, so it is answered at once (one bounded wait).
    reqs.insert(11, pb.RecommendRequest(collection=COLL, user_id="u0-0", k=3,
                                        request_id="farther", min_log_sequence=far + 1))
    t1 = time.time()
    answers = batch_stream(client, replicas[2], reqs)
    waited = time.time() - t1
    assert [a.request_id for a in answers] == [r.request_id for r in reqs], \
        [a.request_id for a in answers]
    far_answer, farther = answers.pop(10), answers.pop(10)
    assert far_answer.error_code == 14 and not far_answer.hits, far_answer
    assert "min_log_sequence %d is not applied" % far in far_answer.error_message, far_answer
    # The second was not waited for: it carries the first wait's answer.
    assert farther.error_code == 14 and farther.error_message == far_answer.error_message, \
        farther
    assert 2.5 <= waited <= 10, waited
    for n, (a, item) in enumerate(zip(answers, items)):
        assert a.error_code == 0, (n, a)
        if a.source != pb.RECOMMEND_SOURCE_PROFILE or a.hits[0].id != item:
            fail("BatchRecommend request %d: source %d, top %s, wanted %s" %
                 (n, a.source, a.hits[0].id if a.hits else None, item), replicas)
    print("BatchRecommend: 30 requests with min_log_sequence saw their events; two beyond "
          "the log answered UNAVAILABLE in place after one wait, %.1f s" % waited)


def experiments_replicated(client, pb, replicas, seed):
    """CreateExperiment through one replica and StopExperiment through another: every replica
    stores the same experiment (same creation and stop times: the record's time), assigns
    every shopper the same arm, and reports the same results."""
    exp_id = "exp-%d" % seed
    e = pb.Experiment(id=exp_id, collection=COLL, surface="home",
                      arms=[pb.ExperimentArm(name="a", share=0.5),
                            pb.ExperimentArm(name="b", share=0.3),
                            pb.ExperimentArm(name="c", share=0.2)])
    created = client.unary(replicas[0], "CreateExperiment",
                           pb.CreateExperimentRequest(experiment=e), pb.ExperimentResult)
    seq = client.applied(replicas[0])
    assert created.experiment.running and created.experiment.created_ms > 0, created
    for r in replicas:
        client.wait_applied(r, seq)
    got = [client.unary(r, "GetExperiment", pb.GetExperimentRequest(id=exp_id),
                        pb.ExperimentResult) for r in replicas]
    assert got[0] == got[1] == got[2], got
    assert got[0].experiment.created_ms == created.experiment.created_ms, (got[0], created)
    arms = {}
    for u in range(60):
        user = "ryw-%d-%d" % (seed, u)
        seen = []
        for r in replicas:
            rec = client.unary(r, "Recommend",
                               pb.RecommendRequest(collection=COLL, user_id=user, k=3,
                                                   surface="home"),
                               pb.RecommendResponse)
            seen.append((rec.experiment, rec.arm, [(h.id, h.score) for h in rec.hits]))
        if not seen[0] == seen[1] == seen[2]:
            fail("user %s: experiment arms differ between replicas: %s" % (user, seen), replicas)
        assert seen[0][0] == exp_id, seen
        arms[seen[0][1]] = arms.get(seen[0][1], 0) + 1
    assert sorted(arms) == ["a", "b", "c"], arms
    stopped = client.unary(replicas[1], "StopExperiment", pb.StopExperimentRequest(id=exp_id),
                           pb.ExperimentResult)
    assert not stopped.experiment.running and stopped.experiment.stopped_ms > 0, stopped
    seq = client.applied(replicas[1])
    for r in replicas:
        client.wait_applied(r, seq)
    got = [client.unary(r, "GetExperiment", pb.GetExperimentRequest(id=exp_id),
                        pb.ExperimentResult) for r in replicas]
    for g in got:
        assert not g.experiment.running, g
        assert g.experiment.stopped_ms == stopped.experiment.stopped_ms, (g, stopped)
    assert got[0] == got[1] == got[2], got
    for r in replicas:
        rec = client.unary(r, "Recommend",
                           pb.RecommendRequest(collection=COLL, user_id="ryw-%d-0" % seed, k=3,
                                               surface="home"),
                           pb.RecommendResponse)
        assert rec.experiment == "" and rec.arm == "", (r.name, rec)
    print("experiments through the log: created on r0, stopped on r1, identical on all "
          "replicas; 60 shoppers got the same arm everywhere %s" % arms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--affinityd", required=True)
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    seed = int(os.environ.get("SEED", time.time()))
    print("seed", seed)
    rng = random.Random(seed)
    work = tempfile.mkdtemp(prefix="aff-repl-")
    pb, health = stubs(args.proto_dir, work)
    client = Client(pb, health)
    nats = NatsCluster(work)
    nats.start_all()
    # r2 leaves its apply thread at the process's niceness; r0 and r1 use the default (-10)
    replicas = [Replica(work, "r%d" % i, args.affinityd, nats.urls(),
                        extra=["--min-sequence-wait-ms", "3000"] +
                        (["--log-apply-nice", "0"] if i == 2 else [])) for i in range(3)]
    ok = False
    t0 = time.time()
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            client.wait_serving(r)
        print("cluster up in %.1f s" % (time.time() - t0))

        # ---- the apply thread's priority (--log-apply-nice) ----
        base = os.getpriority(os.PRIO_PROCESS, 0)  # the replicas inherit this test's niceness
        for r in replicas:
            threads = thread_nices(r.proc.pid)
            apply = [n for name, n in threads if name == "log-apply"]
            others = set(n for name, n in threads if name != "log-apply")
            assert apply and others == {base}, (r.name, base, threads)
            if r.name == "r2":
                assert set(apply) == {base}, (r.name, threads)
            elif os.geteuid() == 0:  # CAP_SYS_NICE: the apply thread (and its own) at -10
                assert set(apply) == {-10}, (r.name, threads)
            else:  # refused: the process's niceness, and the log says why
                assert set(apply) == {base}, (r.name, threads)
                with open(os.path.join(work, r.name + ".log")) as f:
                    assert "cannot change the apply thread's niceness" in f.read()
        print("apply threads: niceness as configured")

        # ---- catalog through replica 0 ----
        resp, _ = retry_write(client, replicas, 0, "CreateCollection",
                              pb.CreateCollectionRequest(name=COLL, dimension=DIM,
                                                         metric=pb.METRIC_INNER_PRODUCT,
                                                         request_id="create-1"),
                              pb.CreateCollectionResponse)
        assert resp.log_sequence > 0, resp
        vectors = {"i%03d" % k: unit(rng, DIM) for k in range(N_ITEMS)}
        items = [pb.Item(id=k, vector=v, category="c%d" % (int(k[1:]) % 7), price=1.0)
                 for k, v in sorted(vectors.items())]
        batches = [pb.UpsertItemsRequest(collection=COLL, items=items[j:j + 100],
                                         request_id="up-%d" % j)
                   for j in range(0, N_ITEMS, 100)]
        up = client.upsert(replicas[1], batches)
        assert up.upserted_count == N_ITEMS, up
        assert up.log_sequence > resp.log_sequence, up
        for r in replicas:
            client.wait_applied(r, up.log_sequence)

        # ---- concurrent writers; the stream leader and replica 2 die mid-stream ----
        acked = {}  # user -> acknowledged events
        max_seq = [up.log_sequence]
        lock = threading.Lock()
        errors = []

        def writer(w):
            wr = random.Random(seed * 31 + w)
            try:
                for n in range(WRITES_PER_WRITER):
                    user = "u%d-%d" % (w, n % 15)
                    evs = [pb.Event(item_id="i%03d" % wr.randrange(N_ITEMS),
                                    type=pb.EVENT_TYPE_VIEW) for _ in range(EVENTS_PER_CALL)]
                    req = pb.PutEventsRequest(collection=COLL, user_id=user, events=evs,
                                              request_id="w%d-%d-%d" % (seed, w, n))
                    resp, _ = retry_write(client, replicas, w + n, "PutEvents", req,
                                          pb.PutEventsResponse)
                    assert resp.log_sequence > 0, resp
                    with lock:
                        acked[user] = acked.get(user, 0) + EVENTS_PER_CALL
                        max_seq[0] = max(max_seq[0], resp.log_sequence)
            except Exception as e:  # reported by the main thread
                errors.append(repr(e))

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(N_WRITERS)]
        tw = time.time()
        for t in threads:
            t.start()
        time.sleep(1.0)
        leader = nats.stream_leader("AFFINITY")
        assert leader is not None, "no stream leader found in /jsz"
        print("killing NATS node n%d (stream leader) and replica r2" % leader)
        nats.kill(leader)
        replicas[2].kill()
        time.sleep(2.0)
        nats.start(leader)
        replicas[2].start()
        for t in threads:
            t.join()
        print("writers done in %.1f s" % (time.time() - tw))
        if errors:
            fail("writers failed: %s" % errors[:3], replicas)
        total = sum(acked.values())
        assert total == N_WRITERS * WRITES_PER_WRITER * EVENTS_PER_CALL, total
        for r in replicas:
            client.wait_serving(r)
            client.wait_applied(r, max_seq[0])

        # ---- zero acknowledged writes lost; identical answers ----
        for user, n in sorted(acked.items()):
            answers = []
            for r in replicas:
                u = client.unary(r, "GetUser",
                                 pb.GetUserRequest(collection=COLL, user_id=user,
                                                   min_log_sequence=max_seq[0]),
                                 pb.GetUserResponse)
                if u.history_length != n:
                    fail("%s on %s: history %d, acknowledged %d" %
                         (user, r.name, u.history_length, n), replicas)
                # recency_days is measured from the read's own clock, not from the log:
                # the only field that differs with the moment of the call.
                assert 0 <= u.traits.recency_days < 1, u.traits
                u.traits.recency_days = 0
                # Category weights decay from the read's clock too: weights equal as floats
                # can differ in the last double bits, which orders such ties differently.
                cats = sorted(((-c.weight, c.category) for c in u.top_categories))
                del u.top_categories[:]
                for w, name in cats:
                    u.top_categories.add(category=name, weight=-w)
                answers.append(u)
            if len(set(a.SerializeToString(deterministic=True) for a in answers)) != 1:
                fail("GetUser(%s) differs between replicas: %s" % (user, answers), replicas)
        queries = sorted(acked)[:20]
        for user in queries:
            tops = []
            for r in replicas:
                rec = client.unary(r, "Recommend",
                                   pb.RecommendRequest(collection=COLL, user_id=user, k=10,
                                                       min_log_sequence=max_seq[0]),
                                   pb.RecommendResponse)
                assert rec.source == pb.RECOMMEND_SOURCE_PROFILE, rec
                assert len(rec.hits) == 10, rec
                tops.append([(h.id, h.score) for h in rec.hits])
            if tops[0] != tops[1] or tops[0] != tops[2]:
                fail("Recommend(%s) differs: %s" % (user, tops), replicas)
        for q in range(10):
            v = unit(rng, DIM)
            tops = []
            for r in replicas:
                s = client.unary(r, "Search",
                                 pb.SearchRequest(collection=COLL,
                                                  queries=[pb.Query(vector=v, k=10)]),
                                 pb.SearchResponse)
                tops.append([(h.id, h.score) for h in s.results[0].hits])
            assert tops[0] == tops[1] == tops[2], tops
        print("no acknowledged write lost (%d events, %d users); identical answers" %
              (total, len(acked)))

        # ---- an opt-out through one replica erases the user on all ----
        oo = client.unary(replicas[1], "SetUserOptOut",
                          pb.SetUserOptOutRequest(user_id="u1-0", opt_out=True,
                                                  request_id="oo-%d" % seed),
                          pb.SetUserOptOutResponse)
        assert oo.erased and oo.log_sequence > max_seq[0], oo
        for r in replicas:
            # UNAVAILABLE (not applied within --min-sequence-wait-ms, e.g. while a replica's
            # consumer recovers from the leader kill) is the documented cue to retry.
            for attempt in range(4):
                try:
                    client.unary(r, "GetUser",
                                 pb.GetUserRequest(collection=COLL, user_id="u1-0",
                                                   min_log_sequence=oo.log_sequence),
                                 pb.GetUserResponse)
                    fail("the opted-out user is still known on " + r.name, replicas)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAVAILABLE and attempt < 3:
                        continue
                    assert e.code() == grpc.StatusCode.NOT_FOUND, (r.name, e)
                    break
        print("SetUserOptOut through r1 erased the user on every replica")

        # ---- read-your-writes across replicas ----
        tp = time.time()
        for n in range(PAIRS):
            w, rd = replicas[n % 3], replicas[(n + 1) % 3]
            item = "i%03d" % rng.randrange(N_ITEMS)
            user = "ryw-%d-%d" % (seed, n)
            put = put_view(client, pb, w, user, item, "ryw-%d-%d" % (seed, n))
            assert put.applied_count == 1 and put.log_sequence > 0, put
            rec = client.unary(rd, "Recommend",
                               pb.RecommendRequest(collection=COLL, user_id=user, k=3,
                                                   min_log_sequence=put.log_sequence),
                               pb.RecommendResponse)
            if rec.source != pb.RECOMMEND_SOURCE_PROFILE or rec.hits[0].id != item:
                fail("pair %d: %s on %s, then Recommend on %s: source %d, top %s" %
                     (n, item, w.name, rd.name, rec.source,
                      rec.hits[0].id if rec.hits else None), replicas)
        print("%d PutEvents-then-Recommend pairs on different replicas: all saw their event "
              "(%.1f s)" % (PAIRS, time.time() - tp))

        # ---- a min_log_sequence beyond the log: UNAVAILABLE after the bounded wait ----
        far = client.applied(replicas[0]) + 1000000
        t1 = time.time()
        try:
            client.unary(replicas[0], "GetUser",
                         pb.GetUserRequest(collection=COLL, user_id="u0-0", min_log_sequence=far),
                         pb.GetUserResponse)
            fail("a min_log_sequence beyond the log was answered")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            waited = time.time() - t1
            assert 2.5 <= waited <= 6, waited
        print("min_log_sequence beyond the log: UNAVAILABLE after %.1f s" % waited)

        # ---- BatchRecommend honours min_log_sequence per request ----
        batch_read_your_writes(client, pb, replicas, rng, seed, far)

        # ---- experiments through the log: same experiment, same arms everywhere ----
        experiments_replicated(client, pb, replicas, seed)

        # ---- the log unreachable: writes UNAVAILABLE in their deadline, reads go on ----
        for i in range(3):
            nats.kill(i)
        t1 = time.time()
        try:
            client.unary(replicas[0], "PutEvents",
                         pb.PutEventsRequest(collection=COLL, user_id="down",
                                             events=[pb.Event(item_id="i000",
                                                              type=pb.EVENT_TYPE_VIEW)],
                                             request_id="down-%d" % seed),
                         pb.PutEventsResponse, timeout=3)
            fail("a write was acknowledged with the log down")
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE,
                                grpc.StatusCode.DEADLINE_EXCEEDED), e
            assert time.time() - t1 < 3.5, time.time() - t1
        u = client.unary(replicas[1], "GetUser", pb.GetUserRequest(collection=COLL,
                                                                   user_id="u0-0"),
                         pb.GetUserResponse)
        assert u.history_length == acked["u0-0"], u
        for r in replicas:
            assert r.proc.poll() is None, "%s exited with the log down" % r.name
        nats.start_all()
        resp, tries = retry_write(client, replicas, 0, "PutEvents",
                                  pb.PutEventsRequest(collection=COLL, user_id="down",
                                                      events=[pb.Event(
                                                          item_id="i000",
                                                          type=pb.EVENT_TYPE_VIEW)],
                                                      request_id="down-%d" % seed),
                                  pb.PutEventsResponse, budget_s=60)
        for r in replicas:
            client.wait_applied(r, resp.log_sequence)
            u = client.unary(r, "GetUser", pb.GetUserRequest(collection=COLL, user_id="down"),
                             pb.GetUserResponse)
            assert u.history_length == 1, (r.name, u)
        print("log outage: writes refused, reads served, recovered after %d tries" % tries)

        rcs = [r.stop() for r in replicas]
        assert rcs == [0, 0, 0], rcs
        ok = True
        print("PASS in %.1f s" % (time.time() - t0))
    finally:
        for r in replicas:
            r.kill()
        nats.stop_all()
        if not ok or args.keep:
            print("work directory kept:", work)
        else:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

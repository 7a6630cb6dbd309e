#!/usr/bin/python3
"""ImportEvents and Train through the write log (issue 15): a 3-node NATS JetStream cluster and
3 affinityd replicas on loopback, all started by this test.

1. ImportEvents through r0: messages are split into log records of at most 256 KiB of events
   (the expected number of records is computed here with the server's rule and checked against
   the log sequences used); counts and rejection indexes (in whole-stream order, across records)
   are exact; every replica holds exactly the imported histories.
2. The same import again through r1 with the same request_id: nothing applied twice, every
   message reported as a duplicate.
3. The log fails mid-import (all NATS nodes killed after message 0 was committed): the client
   gets UNAVAILABLE naming message 1 and the events applied before it; after the log is back,
   the whole stream retried through r2 with the same request_id applies messages 1.. only.
4. Train through r1 (save_params): only r1 trains; the model goes through the log and every
   replica reports the same version (> the Train record's sequence), the same metadata and
   parameters, identical Recommend top-k (ids and scores) for fixed users with
   min_log_sequence = the version, and identical GetSegment answers; a replica killed with
   SIGKILL and restarted still serves that version. A second Train through r2 (no save_params)
   replaces it everywhere and leaves the saved parameters alone.
5. Automatic retraining (--train-after-events 200 on every replica): after 300 new events the
   three schedulers each ask the log for a training of the same version; exactly one model is
   published and installed everywhere, and no second one follows.

Run by ctest (label e2e) as:
    /usr/bin/python3 tests/replication/test_import_train.py --affinityd BUILD/src/affinityd \
        --proto-dir SOURCE/proto
"""
import os
import time

import grpc

from cluster import SVC, Setup, fail, retry_unavailable, unit

DIM = 8
N_ITEMS = 200
COLL = "shop"
RECORD_BYTES = 256 << 10  # TRANSPORT_IMPORT_RECORD_BYTES


def records_of(msg):
    """How many log records the server makes of one ImportEventsRequest (its split rule)."""
    n, size = 1, 0
    for i, ev in enumerate(msg.events):
        b = ev.ByteSize() + 8
        if size and size + b > RECORD_BYTES:
            n, size = n + 1, 0
        size += b
    return n


def import_stream(client, replica, msgs, timeout=30):
    fn = replica.channel.stream_unary(
        SVC + "ImportEvents", request_serializer=client.pb.ImportEventsRequest.SerializeToString,
        response_deserializer=client.pb.ImportEventsResponse.FromString)
    return fn(iter(msgs), timeout=timeout)


def make_import(pb, rng, prefix, sizes, bad, missing, now_ms):
    """Messages of sizes[i] events for users <prefix>u0..u29 over the catalog; stream indexes in
    bad get an unknown item, those in missing no Event. Returns (messages, expected history
    length per user, expected rejection indexes)."""
    msgs, hist, index = [], {}, 0
    for m, n in enumerate(sizes):
        evs = []
        for _ in range(n):
            user = "%su%d" % (prefix, rng.randrange(30))
            if index in missing:
                evs.append(pb.ImportedEvent(user_id=user))
            else:
                item = "nope-%d" % index if index in bad else "i%03d" % rng.randrange(N_ITEMS)
                ev = pb.Event(item_id=item,
                              type=rng.choice([pb.EVENT_TYPE_VIEW, pb.EVENT_TYPE_CLICK,
                                               pb.EVENT_TYPE_PURCHASE]),
                              timestamp_ms=now_ms - rng.randrange(3 * 86400000),
                              context={"session": "s-%032x" % rng.getrandbits(128),
                                       "device": rng.choice(["mobile-app", "desktop-web"])})
                evs.append(pb.ImportedEvent(user_id=user, event=ev))
                if index not in bad:
                    hist[user] = hist.get(user, 0) + 1
            index += 1
        msgs.append(pb.ImportEventsRequest(collection=COLL if m == 0 else "", events=evs))
    return msgs, hist, sorted(bad | missing)


def check_histories(client, replicas, hist, min_seq):
    pb = client.pb
    for user, n in sorted(hist.items()):
        for r in replicas:
            u = client.unary(r, "GetUser", pb.GetUserRequest(collection=COLL, user_id=user,
                                                             min_log_sequence=min_seq),
                             pb.GetUserResponse)
            if u.history_length != n:
                fail("%s on %s: history %d, imported %d" % (user, r.name, u.history_length, n),
                     replicas)


def wait_models(client, replicas, newer_than, timeout=90):
    """Waits until every replica serves one and the same model version > newer_than."""
    pb = client.pb
    deadline = time.time() + timeout
    infos = []
    while time.time() < deadline:
        infos = [client.unary(r, "GetModel", pb.GetModelRequest(collection=COLL), pb.ModelInfo)
                 for r in replicas]
        vs = set(i.version for i in infos)
        if len(vs) == 1 and infos[0].version > newer_than and infos[0].state == "ready":
            return infos
        time.sleep(0.2)
    fail("replicas do not serve one model version > %d: %s" %
         (newer_than, [(i.version, i.state, i.job.error) for i in infos]), replicas)


def published_count(st):
    """How many models the replicas published through the log (their logs, all runs)."""
    n = 0
    for r in st.replicas:
        with open(os.path.join(st.work, r.name + ".log")) as f:
            n += sum("model published through the write log" in line for line in f)
    return n


def model_fields(info):
    return (info.version, info.trained_at_ms, info.events_used, info.users, info.items,
            info.epochs, info.loss, info.duration_s, info.params.SerializeToString(),
            info.next_params.SerializeToString(), info.events_since_train)


def main():
    st = Setup("aff-repl-it-", extra=["--min-sequence-wait-ms", "5000"])
    seed, rng, pb, client, nats, replicas = st.seed, st.rng, st.pb, st.client, st.nats, st.replicas
    ok = False
    t0 = time.time()
    try:
        st.start_replicas()
        cr = retry_unavailable(lambda: client.unary(
            replicas[0], "CreateCollection",
            pb.CreateCollectionRequest(name=COLL, dimension=DIM, metric=pb.METRIC_INNER_PRODUCT,
                                       request_id="create-%d" % seed),
            pb.CreateCollectionResponse), budget_s=60)
        items = [pb.Item(id="i%03d" % k, vector=unit(rng, DIM), category="c%d" % (k % 5), price=1.0)
                 for k in range(N_ITEMS)]
        up = client.upsert(replicas[1], [pb.UpsertItemsRequest(collection=COLL, items=items,
                                                               request_id="up-%d" % seed)])
        assert up.upserted_count == N_ITEMS and up.log_sequence > cr.log_sequence, up
        now_ms = int(time.time() * 1000)

        # ---- 1. an import through r0, split into records ----
        msgs, hist, rejected = make_import(pb, rng, "a-", [3000, 500, 500], bad={5, 3501},
                                           missing={2999}, now_ms=now_ms)
        msgs[0].request_id = "imp-a-%d" % seed
        n_records = sum(records_of(m) for m in msgs)
        assert records_of(msgs[0]) >= 2, "message 0 should need several records"
        before = up.log_sequence
        for r in replicas:
            client.wait_applied(r, before)
        imp = import_stream(client, replicas[0], msgs)
        total = sum(len(m.events) for m in msgs)
        assert imp.applied_count == total - len(rejected), imp.applied_count
        assert imp.rejected_count == len(rejected), imp.rejected_count
        assert [x.index for x in imp.rejected] == rejected, [x.index for x in imp.rejected]
        assert imp.rejected[0].reason.startswith("unknown item id 'nope-5'"), imp.rejected[0]
        assert imp.rejected[1].reason == "event is missing (ImportedEvent.event)", imp.rejected[1]
        assert imp.duplicate_messages == 0, imp
        if imp.log_sequence - before != n_records:
            fail("%d records used, %d expected" % (imp.log_sequence - before, n_records), replicas)
        check_histories(client, replicas, hist, imp.log_sequence)
        print("import of %d events in %d records: exact counts and rejections; identical "
              "histories on 3 replicas" % (total, n_records))

        # an event larger than a log record can carry is rejected where it arrives
        big = pb.ImportEventsRequest(collection=COLL, events=[
            pb.ImportedEvent(user_id="big-u", event=pb.Event(item_id="i001",
                                                             type=pb.EVENT_TYPE_VIEW)),
            pb.ImportedEvent(user_id="big-u", event=pb.Event(
                item_id="i002", type=pb.EVENT_TYPE_VIEW, context={"blob": "x" * 300000})),
            pb.ImportedEvent(user_id="big-u", event=pb.Event(item_id="i003",
                                                             type=pb.EVENT_TYPE_VIEW))])
        bi = import_stream(client, replicas[2], [big])
        assert bi.applied_count == 2 and bi.rejected_count == 1, bi
        assert bi.rejected[0].index == 1, bi.rejected
        assert bi.rejected[0].reason.startswith("the event is 3000"), bi.rejected[0]
        assert bi.rejected[0].reason.endswith("a log record carries at most 262144"), bi
        assert bi.log_sequence == imp.log_sequence + 2, (bi, imp)  # before and after it
        hist["big-u"] = 2
        imp_seq = bi.log_sequence

        # ---- 2. the same import again (same request_id) through r1: nothing twice ----
        again = import_stream(client, replicas[1], msgs)
        assert again.applied_count == 0 and again.rejected_count == 0, again
        assert again.duplicate_messages == len(msgs), again
        assert again.log_sequence <= imp.log_sequence, again
        check_histories(client, replicas, hist, imp_seq)
        print("retried import: %d duplicate messages, nothing applied twice" %
              again.duplicate_messages)

        # ---- 3. the log fails after message 0; the retry applies the rest exactly once ----
        msgs2, hist2, rejected2 = make_import(pb, rng, "b-", [400, 300, 300], bad={450},
                                              missing=set(), now_ms=now_ms)
        msgs2[0].request_id = "imp-b-%d" % seed
        seq0 = client.applied(replicas[0])

        def failing():
            yield msgs2[0]
            client.wait_applied(replicas[0], seq0 + records_of(msgs2[0]), timeout=30)
            for i in range(3):
                nats.kill(i)
            time.sleep(1.5)  # the replicas see the connections close
            yield msgs2[1]
            yield msgs2[2]

        try:
            import_stream(client, replicas[0], failing())
            fail("an import was acknowledged with the log down", replicas)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert e.details().startswith("message 1, events 0..299: "), e.details()
            assert e.details().endswith("; 400 events applied before it"), e.details()
            print("log down mid-import: %s" % e.details()[:160])
        nats.start_all()
        retry = retry_unavailable(lambda: import_stream(client, replicas[2], msgs2), budget_s=60)
        assert retry.duplicate_messages == 1, retry
        assert retry.applied_count == 600 - len(rejected2), retry
        assert [x.index for x in retry.rejected] == rejected2, retry.rejected
        for r in replicas:
            client.wait_serving(r)
        check_histories(client, replicas, hist2, retry.log_sequence)
        print("retry through r2 after the outage: message 0 dropped as a duplicate, the rest "
              "applied once on 3 replicas")

        # ---- 4. Train through r1: one training, one version everywhere ----
        tr = retry_unavailable(lambda: client.unary(
            replicas[1], "Train",
            pb.TrainRequest(collection=COLL, params=pb.ModelParams(factors=8, epochs=4),
                            save_params=True, request_id="train-1-%d" % seed),
            pb.TrainResponse), budget_s=60)
        assert tr.job_id > 0 and tr.log_sequence > retry.log_sequence, tr
        infos = wait_models(client, replicas, tr.log_sequence)
        version = infos[0].version
        if len(set(model_fields(i) for i in infos)) != 1:
            fail("GetModel differs between replicas: %s" % infos, replicas)
        assert infos[0].params.factors == 8 and infos[0].next_params.factors == 8, infos[0]
        assert infos[0].items > 0 and infos[0].users == 61, infos[0]  # a-, b- and big-u
        jobs = [i.job.id for i in infos]
        assert jobs[1] > 0 and jobs[0] == 0 and jobs[2] == 0, jobs  # only r1 trained
        users = sorted(hist)[:8] + sorted(hist2)[:4]

        def tops():
            out = []
            for user in users:
                per = []
                for r in replicas:
                    rec = client.unary(r, "Recommend",
                                       pb.RecommendRequest(collection=COLL, user_id=user, k=10,
                                                           space=pb.SPACE_BEHAVIOUR,
                                                           min_log_sequence=version),
                                       pb.RecommendResponse)
                    assert rec.source == pb.RECOMMEND_SOURCE_MODEL, (r.name, user, rec.source)
                    assert len(rec.hits) == 10, rec
                    per.append([(h.id, h.score) for h in rec.hits])
                if per[0] != per[1] or per[0] != per[2]:
                    fail("Recommend(%s) differs: %s" % (user, per), replicas)
                out.append(per[0])
            seg = []
            for r in replicas:
                s = client.unary(r, "GetSegment",
                                 pb.GetSegmentRequest(collection=COLL, item_ids=["i000", "i001"],
                                                      k=20),
                                 pb.GetSegmentResponse)
                seg.append((s.model_version, [(u.user_id, u.score) for u in s.users]))
            if seg[0] != seg[1] or seg[0] != seg[2]:
                fail("GetSegment differs: %s" % seg, replicas)
            assert seg[0][0] == version and len(seg[0][1]) == 20, seg[0]
            return out

        first = tops()
        print("Train through r1: version %d on 3 replicas; identical Recommend (ids and scores) "
              "for %d users and GetSegment" % (version, len(users)))
        replicas[0].kill()
        replicas[0].start()
        client.wait_serving(replicas[0])
        info0 = client.unary(replicas[0], "GetModel",
                             pb.GetModelRequest(collection=COLL, min_log_sequence=version),
                             pb.ModelInfo)
        assert model_fields(info0) == model_fields(infos[0]), (info0, infos[0])
        assert tops() == first
        print("r0 killed and restarted: same version and answers")

        tr2 = retry_unavailable(lambda: client.unary(
            replicas[2], "Train",
            pb.TrainRequest(collection=COLL, params=pb.ModelParams(factors=16, epochs=3),
                            request_id="train-2-%d" % seed),
            pb.TrainResponse), budget_s=60)
        assert tr2.job_id > 0 and tr2.log_sequence > version, tr2
        infos2 = wait_models(client, replicas, max(version, tr2.log_sequence))
        if len(set(model_fields(i) for i in infos2)) != 1:
            fail("GetModel differs between replicas after the second Train: %s" % infos2,
                 replicas)
        assert infos2[0].params.factors == 16 and infos2[0].next_params.factors == 8, infos2[0]
        version = infos2[0].version
        tops()
        print("Train through r2 (no save_params): version %d everywhere, saved params kept" %
              version)

        # ---- 5. automatic retraining (--train-after-events) on every replica: one training ----
        published = published_count(st)
        assert published == 2, published
        st.stop_replicas()
        for r in replicas:
            r.extra += ["--train-after-events", "200"]
        st.start_replicas()
        msgs3, hist3, _ = make_import(pb, rng, "c-", [300], bad=set(), missing=set(),
                                      now_ms=now_ms)
        msgs3[0].request_id = "imp-c-%d" % seed
        imp3 = retry_unavailable(lambda: import_stream(client, replicas[0], msgs3), budget_s=60)
        assert imp3.applied_count == 300, imp3
        infos3 = wait_models(client, replicas, max(version, imp3.log_sequence))
        if len(set(model_fields(i) for i in infos3)) != 1:
            fail("GetModel differs after the automatic training: %s" % infos3, replicas)
        time.sleep(3)  # the schedulers tick every second: no second training may follow
        infos4 = [client.unary(r, "GetModel", pb.GetModelRequest(collection=COLL), pb.ModelInfo)
                  for r in replicas]
        assert [i.version for i in infos4] == [infos3[0].version] * 3, infos4
        assert published_count(st) == 3, published_count(st)
        assert [i.events_since_train for i in infos4] == [0, 0, 0], infos4
        print("--train-after-events on 3 replicas: one training (version %d), installed "
              "everywhere" % infos3[0].version)

        st.stop_replicas()
        ok = True
        print("PASS in %.1f s" % (time.time() - t0))
    finally:
        st.teardown(ok)


if __name__ == "__main__":
    main()

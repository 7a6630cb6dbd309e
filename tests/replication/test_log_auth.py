#!/usr/bin/python3
"""The write log's credentials and TLS options (issue 15), against nats-server started by this
test with certificates made by openssl at run time.

Server A: JetStream, TLS with client certificates required (verify: true), token auth.
Server B: JetStream, user and password.

1. The right options (--log tls://..., --log-tls-ca, --log-tls-cert/--log-tls-key,
   --log-token-file; --log-user/--log-password-file on B): SERVING, writes acknowledged.
2. Wrong ones (token, password, CA, no client certificate, nats:// to a TLS server, a
   --log-creds file that holds no JWT and seed): the
   replica does not exit, stays NOT_SERVING, answers writes UNAVAILABLE, and logs the reason
   (Authorization Violation, the TLS handshake failure) while it retries.
3. Retrying: a replica with a token the server refused connects by itself once the server
   accepts that token (server restarted with it) and becomes SERVING.
4. Flags that go together: --log-user without --log-password-file is refused at start.

    /usr/bin/python3 tests/replication/test_log_auth.py --affinityd BUILD/src/affinityd \\
        --proto-dir SOURCE/proto
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import grpc

from cluster import Client, Replica, clean_up, free_port, stubs


def openssl(*args):
    subprocess.run(["openssl"] + list(args), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def make_certs(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and
    a second CA that signed nothing here."""
    p = lambda n: os.path.join(d, n)  # noqa: E731
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p(ca + ".key"),
                "-out", p(ca + ".pem"), "-days", "1", "-subj", "/CN=" + ca)
    with open(p("san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", p("san.ext")]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p(name + ".key"),
                "-out", p(name + ".csr"), "-subj", "/CN=" + name)
        openssl("x509", "-req", "-in", p(name + ".csr"), "-CA", p("ca.pem"), "-CAkey",
                p("ca.key"), "-CAcreateserial", "-out", p(name + ".pem"), "-days", "1", *ext)


class Nats:
    """One nats-server with JetStream and the given extra configuration."""

    def __init__(self, work, name, extra):
        self.work, self.name, self.extra = work, name, extra
        self.port = free_port()
        self.proc = None

    def start(self):
        conf = os.path.join(self.work, self.name + ".conf")
        with open(conf, "w") as f:
            f.write("listen: 127.0.0.1:%d\njetstream { store_dir: %s }\n%s\n"
                    % (self.port, json.dumps(os.path.join(self.work, self.name + "-js")),
                       self.extra))
        log = open(os.path.join(self.work, self.name + ".log"), "a")
        self.proc = subprocess.Popen(["nats-server", "-c", conf], stdout=log,
                                     stderr=subprocess.STDOUT)
        time.sleep(0.5)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def write_file(work, name, text):
    path = os.path.join(work, name)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


def check_good(client, pb, r, label):
    client.wait_serving(r, timeout=30)
    # The stream may still be electing its leader right after creation: retry briefly.
    deadline = time.time() + 20
    while True:
        try:
            resp = client.unary(r, "CreateCollection",
                                pb.CreateCollectionRequest(name="c-" + r.name, dimension=4,
                                                           metric=pb.METRIC_INNER_PRODUCT,
                                                           request_id="cc-" + r.name),
                                pb.CreateCollectionResponse)
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.time() > deadline:
                raise
            time.sleep(0.2)
    assert resp.log_sequence > 0, resp
    print("%s: SERVING, write acknowledged as sequence %d" % (label, resp.log_sequence))


def check_refused(client, pb, r, label, reason):
    """Alive, NOT_SERVING, writes UNAVAILABLE, the reason in the log, retried."""
    deadline = time.time() + 30
    while time.time() < deadline and r.log_tail(100000).count(reason) < 2:
        assert r.proc.poll() is None, "%s: the replica exited:\n%s" % (label, r.log_tail())
        time.sleep(0.2)
    log = r.log_tail(100000)
    assert log.count(reason) >= 2, "%s: '%s' not logged twice (retries):\n%s" % (
        label, reason, r.log_tail())
    assert r.proc.poll() is None, "%s: the replica exited" % label
    assert not client.serving(r), "%s: SERVING without the log" % label
    try:
        client.unary(r, "CreateCollection",
                     pb.CreateCollectionRequest(name="x", dimension=4, request_id="x-" + r.name),
                     pb.CreateCollectionResponse, timeout=3)
        raise AssertionError("%s: a write was acknowledged without the log" % label)
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
    print("%s: alive, NOT_SERVING, writes UNAVAILABLE, logged '%s' while retrying"
          % (label, reason))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--affinityd", required=True)
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="aff-logauth-")
    pb, health = stubs(args.proto_dir, work)
    client = Client(pb, health)
    make_certs(work)
    p = lambda n: os.path.join(work, n)  # noqa: E731
    tls = ("tls { cert_file: %s, key_file: %s, ca_file: %s, verify: true, timeout: 2 }"
           % (json.dumps(p("server.pem")), json.dumps(p("server.key")), json.dumps(p("ca.pem"))))
    a = Nats(work, "a", tls + '\nauthorization { token: "right-token" }')
    b = Nats(work, "b", 'authorization { user: "affinity", password: "right-password" }')
    token = write_file(work, "token", "right-token")
    bad_token = write_file(work, "bad-token", "wrong-token")
    password = write_file(work, "password", "right-password")
    bad_password = write_file(work, "bad-password", "wrong-password")
    url_a = "tls://127.0.0.1:%d" % a.port
    url_b = "nats://127.0.0.1:%d" % b.port
    client_cert = ["--log-tls-cert", p("client.pem"), "--log-tls-key", p("client.key")]
    common = ["--log-replicas", "1", "--log-stream", "AUTHTEST"]
    replicas = []
    ok = False
    t0 = time.time()

    def replica(name, url, extra):
        r = Replica(work, name, args.affinityd, url, extra=common + extra)
        replicas.append(r)
        r.start()
        return r

    try:
        a.start()
        b.start()
        # ---- 1. the right options ----
        r = replica("tls-token", url_a, ["--log-tls-ca", p("ca.pem"), "--log-token-file", token]
                    + client_cert)
        check_good(client, pb, r, "TLS (client certificate) + token")
        r = replica("user-password", url_b, ["--log-user", "affinity",
                                              "--log-password-file", password])
        check_good(client, pb, r, "user + password")
        # ---- 2. wrong options: clear reason, retried, never exits ----
        late = replica("wrong-token", url_a, ["--log-tls-ca", p("ca.pem"),
                                              "--log-token-file", bad_token] + client_cert)
        check_refused(client, pb, late, "wrong token", "Authorization Violation")
        r = replica("wrong-password", url_b, ["--log-user", "affinity",
                                               "--log-password-file", bad_password])
        check_refused(client, pb, r, "wrong password", "Authorization Violation")
        r = replica("wrong-ca", url_a, ["--log-tls-ca", p("other-ca.pem"),
                                        "--log-token-file", token] + client_cert)
        check_refused(client, pb, r, "a CA that did not sign the server",
                      "unable to get local issuer certificate")
        r = replica("no-client-cert", url_a, ["--log-tls-ca", p("ca.pem"),
                                              "--log-token-file", token])
        check_refused(client, pb, r, "no client certificate", "cannot connect to NATS")
        r = replica("plain-to-tls", "nats://127.0.0.1:%d" % a.port,
                    ["--log-token-file", token] + client_cert)
        check_refused(client, pb, r, "nats:// without --log-tls-ca to a TLS server",
                      "SSL handshake error")
        # --log-creds is wired to the library (a real .creds file needs NATS's operator/JWT
        # mode, not set up here): a file without a JWT and nkey seed is named as such.
        r = replica("not-creds", url_a, ["--log-tls-ca", p("ca.pem"), "--log-creds", token]
                    + client_cert)
        check_refused(client, pb, r, "--log-creds with a file that is no creds file",
                      "no nkey user seed found")
        # ---- 3. the refused replica connects by itself once its token is accepted ----
        a.stop()
        a.extra = tls + '\nauthorization { token: "wrong-token" }'
        a.start()
        check_good(client, pb, late, "the wrong-token replica after the server took its token")
        # ---- 4. flags that go together ----
        out = subprocess.run([args.affinityd, "--log", url_b, "--log-user", "affinity"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0, out
        assert "--log-user and --log-password-file go together" in out.stderr, out.stderr
        print("--log-user without --log-password-file: refused at start")
        for r in replicas:
            assert r.proc.poll() is None, "%s exited" % r.name
        assert all(r.stop() == 0 for r in replicas)
        ok = True
        print("PASS in %.1f s" % (time.time() - t0))
    finally:
        for r in replicas:
            r.kill()
        a.stop()
        b.stop()
        clean_up(work, ok, args.keep, replicas)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

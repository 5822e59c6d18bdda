"""Helpers for the cluster integration tests: etcd on loopback (free ports, temp dir), `xllm
engine` instances and `xllm service` front doors as child processes (serve_lib.Server)."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "serve"))
import serve_lib  # noqa: E402
from serve_lib import XLLM, Server  # noqa: E402,F401


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Etcd:
    def __init__(self):
        exe = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(exe):
            print("etcd is not installed (scripts/install-deps.sh installs etcd-server)")
            sys.exit(1)
        self.dir = tempfile.mkdtemp(prefix="xllm-etcd-")
        cp, pp = free_port(), free_port()
        self.url = "http://127.0.0.1:%d" % cp
        peer = "http://127.0.0.1:%d" % pp
        self.proc = subprocess.Popen(
            [exe, "--name", "n1", "--data-dir", self.dir, "--listen-client-urls", self.url,
             "--advertise-client-urls", self.url, "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", "n1=" + peer,
             "--heartbeat-interval", "50", "--election-timeout", "500"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while time.time() - t0 < 30:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("etcd did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def engine(etcd, model, name, role="mixed", *extra):
    return _spawn("engine", model, "--etcd", etcd.url, "--name", name, "--role", role,
                  "--lease-ttl-ms", "1000", *extra)


def service(etcd, model, *extra):
    return _spawn("service", model, "--etcd", etcd.url, "--lease-ttl-ms", "1000", *extra)


def _spawn(cmd, model, *args):
    """serve_lib.Server runs `xllm serve ...`; run `xllm engine|service ...` the same way."""
    real = subprocess.Popen

    def patched(argv, *a, **k):
        argv = list(argv)
        argv[1] = cmd
        if cmd == "service":
            # the service has no engine options
            i = argv.index("-t")
            del argv[i:i + 2]
        return real(argv, *a, **k)
    subprocess.Popen = patched
    try:
        srv = Server(model, *args, wait_ready=False)
    finally:
        subprocess.Popen = real
    if cmd == "engine":
        srv.wait_ready()
    return srv


class FakeInstance:
    """A mixed instance registered in etcd by hand whose generate answers break the instance RPC:
    `lines` (bytes) is the whole body of every 200 answer; /v1/instance/load answers normally."""

    def __init__(self, etcd, name, lines, cluster="default"):
        import base64
        import http.server
        import json
        fake = self
        self.calls = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, body, ctype):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.reply(json.dumps({"magic": "xllm-rpc", "version": 1, "running": 0,
                                       "waiting": 0, "kv_usage": 0.0, "in_flight": 0}).encode(),
                           "application/json")

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.calls += 1
                self.reply(lines, "application/x-ndjson")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.etcd = etcd

        def post(path, o):
            req = urllib.request.Request(etcd.url + path, json.dumps(o).encode(),
                                         {"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=5).read())

        def b64(t):
            return base64.b64encode(t.encode()).decode()
        self._post = post
        self.lease = post("/v3/lease/grant", {"TTL": 300})["ID"]
        value = json.dumps({"name": name, "incarnation": "00000000000fa4e1", "role": "mixed",
                            "addr": "127.0.0.1:%d" % self.httpd.server_address[1], "attrs": {}})
        post("/v3/kv/put", {"key": b64("/xllm/%s/instances/mixed/%s" % (cluster, name)),
                            "value": b64(value), "lease": self.lease})

    def stop(self):
        self._post("/v3/lease/revoke", {"ID": self.lease})
        self.httpd.shutdown()


def wait_for(cond, timeout, step=0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


def cluster_json(svc):
    import json
    st, out = svc.get("/v1/cluster")
    return json.loads(out) if st == 200 else None

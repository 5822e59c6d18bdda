"""Helpers for the cluster integration tests: etcd on loopback (free ports, temp dir), `xllm
engine` instances and `xllm service` front doors as child processes (serve_lib.Server)."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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

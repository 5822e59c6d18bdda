"""Helpers for the xllm serve integration tests: start the real server on a free loopback port,
plain and SSE HTTP requests (stdlib only), references from `xllm run --temp 0`, and checks."""
import atexit
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

XLLM = os.environ["XLLM_BIN"]
SHARED = os.environ.get("XLLM_SHARED") or os.environ["XLLM_SHARED_DEFAULT"]
STORIES = os.path.join(SHARED, "models/stories260K/stories260K.gguf")
QWENTOK = os.path.join(SHARED, "models/tiny/qwen3-qwentok-f16.gguf")
QWEN_TINY = os.path.join(SHARED, "models/tiny/qwen3-tiny-f16.gguf")
QWEN_TINY_Q4KM = os.path.join(SHARED, "models/tiny/qwen3-tiny-q4_k_m.gguf")

_fails = 0
_passes = 0
_servers = []


@atexit.register
def _kill_servers():
    for s in _servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def ok(cond, what, detail=""):
    global _fails, _passes
    if cond:
        _passes += 1
        print("ok - " + what, flush=True)
    else:
        _fails += 1
        print("FAIL - " + what + (": " + str(detail)[:2000] if detail != "" else ""), flush=True)
    return cond


def finish():
    print("%d passed, %d failed" % (_passes, _fails), flush=True)
    sys.exit(1 if _fails else 0)


class Server:
    """`xllm serve` on 127.0.0.1 with --port 0; the port is read from its first log line."""

    def __init__(self, model, *args, env=None, wait_ready=True, key=None):
        self.key = key
        cmd = [XLLM, "serve", "-m", model, "--host", "127.0.0.1", "--port", "0", "-t", "1"]
        cmd += list(args)
        if key:
            cmd += ["--api-key", key]
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     env=e)
        _servers.append(self)
        self.log = []
        self._ready = threading.Event()
        self._listening = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(60):
            raise RuntimeError("server did not start: " + "".join(self.log))
        if wait_ready:
            self.wait_ready()

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.log.append(line)
            m = re.search(r"listening on (http://[0-9.]+:\d+)", line)
            if m:
                self.url = m.group(1)
                u = urlparse(self.url)
                self.host, self.port = u.hostname, u.port
                self._listening.set()
            if "ready in" in line:
                self._ready.set()
        self._listening.set()
        self._ready.set()

    def wait_ready(self, timeout=120):
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError("server not ready: " + "".join(self.log))

    def conn(self, timeout=120):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def headers(self, extra=None):
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = "Bearer " + self.key
        h.update(extra or {})
        return h

    def request(self, method, path, body=None, headers=None, raw=None):
        """Returns (status, headers, bytes)."""
        c = self.conn()
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        c.request(method, path, body=data, headers=self.headers(headers))
        r = c.getresponse()
        out = r.read()
        c.close()
        return r.status, dict(r.getheaders()), out

    def post(self, path, body, headers=None):
        st, _, out = self.request("POST", path, body, headers)
        try:
            return st, json.loads(out)
        except ValueError:
            return st, out

    def get(self, path, headers=None):
        st, _, out = self.request("GET", path, None, headers)
        return st, out

    def stream(self, path, body, on_event=None, stop_after=None):
        """POST with stream=true; returns (status, [events], saw_done). on_event(ev) is called per
        event; when it returns True, or after stop_after events, the client closes the connection
        (a client that goes away)."""
        c = self.conn()
        c.request("POST", path, body=json.dumps(body), headers=self.headers())
        r = c.getresponse()
        if r.status != 200:
            out = r.read()
            c.close()
            return r.status, [json.loads(out)], False
        events, done, gone = [], False, False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.rstrip(b"\r\n")
            if not line or line.startswith(b":"):
                continue  # blank separators and comments (keep-alive pings)
            if not line.startswith(b"data: "):
                raise RuntimeError("bad SSE line %r" % line)
            payload = line[6:]
            if payload == b"[DONE]":
                done = True
                break
            ev = json.loads(payload)
            events.append(ev)
            gone = bool(on_event(ev)) if on_event else False
            if gone or (stop_after is not None and len(events) >= stop_after):
                gone = True
                break
        else:
            gone = False
        if gone:
            # go away abruptly: close the socket under the response
            try:
                (c.sock or r.fp.raw._sock).shutdown(socket.SHUT_RDWR)
            except Exception:
                pass
        c.close()
        return 200, events, done

    def metrics(self):
        st, out = self.get("/metrics")
        m = {}
        for line in out.decode().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            k, v = line.rsplit(" ", 1)
            m[k] = float(v)
        return m

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Stops the server; returns its exit code (sanitizer reports make it non-zero)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            self.log.append("(killed after %ds)\n" % timeout)
        time.sleep(0.1)
        return rc


def stream_text(events, kind="completion"):
    """Concatenated text and the finish reason of a single-choice stream."""
    text, finish = "", None
    for ev in events:
        for ch in ev.get("choices", []):
            if kind == "chat":
                text += ch.get("delta", {}).get("content") or ""
            else:
                text += ch.get("text", "")
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
    return text, finish


def run_ref(model, prompt, n, extra=()):
    """The bytes `xllm run --temp 0` prints for a prompt."""
    out = subprocess.run([XLLM, "run", "-m", model, "-p", prompt, "-n", str(n), "--temp", "0",
                          "-t", "1"] + list(extra), capture_output=True, check=True, timeout=300)
    return out.stdout


def wait_idle(srv, timeout=60):
    """Waits until no request is running or waiting; returns the last metrics."""
    t0 = time.time()
    while True:
        m = srv.metrics()
        if (m.get("xllm_requests_running", 1) == 0 and m.get("xllm_requests_waiting", 1) == 0
                and m.get("xllm_http_inflight_generations", 1) == 0):
            return m
        if time.time() - t0 > timeout:
            return m
        time.sleep(0.05)

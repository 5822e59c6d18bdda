#!/usr/bin/env python3
"""A tiny OpenAI-compatible SSE server for testing xllm bench-serve (loopback only, stdlib only).

Streams fixed chunks with known delays ("tok0 tok1 ...") and a usage chunk. Failure patterns by
arrival order of POSTs (1-based): --fail-every K answers HTTP 500, --cut-every K closes the
connection after 3 chunks, --bad-every K sends a malformed SSE event after 2 chunks. Per-request
switches come in the request body: mock_no_usage (no usage chunk), mock_tokens_per_chunk (usage
counts N tokens for each chunk). Every request body is appended to --log as one JSON line;
GET /stats answers {"requests": N, "max_active": M}.
"""
import argparse
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = None
LOCK = threading.Lock()
STATE = {"requests": 0, "active": 0, "max_active": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def send_json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "mock-model", "object": "model"}]})
        elif self.path == "/stats":
            with LOCK:
                self.send_json(200, {"requests": STATE["requests"], "max_active": STATE["max_active"]})
        else:
            self.send_json(404, {"error": {"message": "not found", "type": "not_found"}})

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def event(self, obj):
        self.chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(n)
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self.send_json(404, {"error": {"message": "unknown path " + self.path}})
            return
        if ARGS.api_key and self.headers.get("Authorization") != "Bearer " + ARGS.api_key:
            self.send_json(401, {"error": {"message": "invalid api key", "type": "auth"}})
            return
        try:
            req = json.loads(raw)
        except ValueError:
            self.send_json(400, {"error": {"message": "malformed JSON"}})
            return
        with LOCK:
            STATE["requests"] += 1
            k = STATE["requests"]
            STATE["active"] += 1
            STATE["max_active"] = max(STATE["max_active"], STATE["active"])
            if ARGS.log:
                with open(ARGS.log, "a") as f:
                    f.write(json.dumps(req) + "\n")
        try:
            self.answer(req, k)
        finally:
            with LOCK:
                STATE["active"] -= 1

    def answer(self, req, k):
        if ARGS.fail_every and k % ARGS.fail_every == 0:
            time.sleep(ARGS.ttft_ms / 1000.0)
            self.send_json(500, {"error": {"message": "mock failure %d" % k, "type": "server_error"}})
            return
        chat = self.path.endswith("/chat/completions")
        n_chunks = max(1, min(int(req.get("max_tokens", 16)), ARGS.max_chunks))
        tpc = int(req.get("mock_tokens_per_chunk", 1))
        prompt = req["messages"][-1]["content"] if chat else req.get("prompt", "")
        prompt_tokens = len(prompt.split())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": "cmpl-%d" % k, "model": "mock-model", "created": int(time.time())}
        if chat:  # role chunk first, with empty content: TTFT must not count it
            self.event(dict(base, object="chat.completion.chunk",
                            choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]))
        time.sleep(ARGS.ttft_ms / 1000.0)
        for i in range(n_chunks):
            if i:
                time.sleep(ARGS.itl_ms / 1000.0)
            if ARGS.cut_every and k % ARGS.cut_every == 0 and i == 3:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if ARGS.bad_every and k % ARGS.bad_every == 0 and i == 2:
                self.chunk(b"data: {\"choices\": [ this is not json\n\n")
                self.chunk(b"")  # end of body: the client must still count a failure
                return
            last = i == n_chunks - 1
            # the second chunk carries a NUL character (JSON "\u0000"): models emit one, a
            # client must read it
            text = "tok%d " % i if i != 1 else "t\x00k1 "
            fin = "length" if last else None
            if chat:
                choice = {"index": 0, "delta": {"content": text}, "finish_reason": fin}
                self.event(dict(base, object="chat.completion.chunk", choices=[choice]))
            else:
                choice = {"index": 0, "text": text, "finish_reason": fin}
                self.event(dict(base, object="text_completion", choices=[choice]))
        opts = req.get("stream_options") or {}
        if opts.get("include_usage") and not req.get("mock_no_usage"):
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_chunks * tpc,
                     "total_tokens": prompt_tokens + n_chunks * tpc}
            self.event(dict(base, choices=[], usage=usage))
        self.chunk(b"data: [DONE]\n\n")
        self.chunk(b"")


class Server(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request, client_address):
        # clients that abort a stream (as bench-serve does on malformed SSE) are expected
        if not isinstance(sys.exc_info()[1], (ConnectionError, BrokenPipeError)):
            super().handle_error(request, client_address)


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port-file", required=True)
    p.add_argument("--log")
    p.add_argument("--api-key")
    p.add_argument("--ttft-ms", type=float, default=50)
    p.add_argument("--itl-ms", type=float, default=5)
    p.add_argument("--max-chunks", type=int, default=16)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--cut-every", type=int, default=0)
    p.add_argument("--bad-every", type=int, default=0)
    p.add_argument("--lifetime-s", type=float, default=300, help="exit after this long")
    ARGS = p.parse_args()
    srv = Server(("127.0.0.1", 0), Handler)
    with open(ARGS.port_file + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    os.replace(ARGS.port_file + ".tmp", ARGS.port_file)
    threading.Timer(ARGS.lifetime_s, lambda: os._exit(0)).start()
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

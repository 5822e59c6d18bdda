"""Acceptance 1 and 6 of the serving issue: every endpoint of the real `xllm serve`, streamed and
not, every error code, greedy outputs under concurrency equal to `xllm run`, stop strings, and
invalid UTF-8 from a random model streamed to the end with U+FFFD."""
import json
import signal
import socket
import threading
import time

from serve_lib import (QWEN_TINY, QWEN_TINY_Q4KM, QWENTOK, STORIES, Server, finish, ok, run_ref,
                       stream_text, wait_idle)

KEY = "sk-test-123"
PROMPTS = ["Once upon a time", "The cat sat on the mat.", "Lily and Tom went to the park",
           "One day, a little bird"]
N = 32


def check_basic(srv):
    st, out = srv.get("/health")
    ok(st == 200 and json.loads(out)["status"] == "ok", "GET /health is 200 ok", out)
    st, out = srv.get("/v1/models")
    d = json.loads(out)
    ok(st == 200 and d["object"] == "list" and d["data"][0]["id"] == "stories260K",
       "GET /v1/models lists the served model", out)
    st, out = srv.get("/metrics")
    text = out.decode()
    names = ["xllm_requests_running", "xllm_requests_waiting", "xllm_kv_usage_ratio",
             "xllm_prefix_cache_hit_tokens_total", "xllm_prompt_tokens_total",
             "xllm_generation_tokens_total", "xllm_time_to_first_token_seconds_bucket",
             "xllm_time_per_output_token_seconds_count", "xllm_e2e_request_latency_seconds_sum",
             "xllm_preemptions_total", "xllm_kv_pages_used"]
    missing = [n for n in names if n not in text]
    ok(st == 200 and not missing, "GET /metrics has the Prometheus series", missing)

    st, d = srv.post("/tokenize", {"prompt": "Once upon a time", "return_token_strs": True})
    ok(st == 200 and d["tokens"][0] == 1 and d["count"] == len(d["tokens"]) == 5
       and d["token_strs"][1] == " Once", "POST /tokenize", d)
    ids = d["tokens"]
    st, d2 = srv.post("/detokenize", {"tokens": ids})
    ok(st == 200 and d2["prompt"] == "Once upon a time", "POST /detokenize round trip", d2)
    st, d3 = srv.post("/detokenize", {"tokens": [1, 99999]})
    ok(st == 400 and d3["error"]["param"] == "tokens", "detokenize rejects a bad id", d3)
    return ids


def check_greedy(srv, refs, ids):
    # non-streamed and streamed equal `xllm run`
    for p in PROMPTS:
        st, d = srv.post("/v1/completions", {"model": "stories260K", "prompt": p,
                                             "max_tokens": N, "temperature": 0})
        txt = d["choices"][0]["text"] if st == 200 else None
        ok(st == 200 and txt == refs[p], "completion == xllm run for %r" % p, (d, refs[p]))
        u = d.get("usage", {}) if st == 200 else {}
        ok(u.get("completion_tokens") == N and u.get("total_tokens") == u.get("prompt_tokens", 0) + N
           and d["choices"][0]["finish_reason"] == "length", "usage and finish_reason length", d)
    st, evs, done = srv.stream("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": N,
                                                   "temperature": 0, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    text, fin = stream_text(evs)
    ok(st == 200 and done and text == refs[PROMPTS[0]] and fin == "length",
       "streamed completion == xllm run, ends with [DONE]", (text, fin, done))
    last = evs[-1] if evs else {}
    ok(last.get("choices") == [] and last.get("usage", {}).get("completion_tokens") == N,
       "stream_options.include_usage: a final usage chunk", last)
    # token-id prompt == text prompt
    st, d = srv.post("/v1/completions", {"prompt": ids, "max_tokens": N, "temperature": 0})
    ok(st == 200 and d["choices"][0]["text"] == refs[PROMPTS[0]], "token-id prompt", d)
    # empty prompt: BOS alone, SPM leading space dropped at the start of the text
    st, d = srv.post("/v1/completions", {"prompt": "", "max_tokens": N, "temperature": 0})
    ok(st == 200 and d["choices"][0]["text"] == refs[""], "empty prompt == xllm run -p ''",
       (d, refs[""]))

    # concurrency: 16 requests at once, half streamed, all equal to the reference
    results = {}

    def one(i):
        p = PROMPTS[i % len(PROMPTS)]
        body = {"prompt": p, "max_tokens": N, "temperature": 0}
        if i % 2:
            body["stream"] = True
            st, evs, done = srv.stream("/v1/completions", body)
            results[i] = (p, stream_text(evs)[0] if done else None)
        else:
            st, d = srv.post("/v1/completions", body)
            results[i] = (p, d["choices"][0]["text"] if st == 200 else None)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    bad = [(i, r) for i, r in results.items() if r[1] != refs[r[0]]]
    ok(len(results) == 16 and not bad, "16 concurrent greedy requests == xllm run", bad)


def check_sampling(srv, refs):
    p = PROMPTS[0]
    ref = refs[p]
    # stop strings: cut before the first match, never emitted, also when split across tokens
    for stop in [" little", "re was", "girl named"]:
        if stop not in ref:
            continue
        want = ref[:ref.find(stop)]
        st, d = srv.post("/v1/completions", {"prompt": p, "max_tokens": N, "temperature": 0,
                                             "stop": [stop, "zzzz"]})
        ok(st == 200 and d["choices"][0]["text"] == want
           and d["choices"][0]["finish_reason"] == "stop", "stop %r (not streamed)" % stop, d)
        st, evs, done = srv.stream("/v1/completions", {"prompt": p, "max_tokens": N,
                                                       "temperature": 0, "stop": stop,
                                                       "stream": True})
        text, fin = stream_text(evs)
        ok(done and text == want and fin == "stop", "stop %r (streamed)" % stop, (text, want))
    # seeded sampling, n=2: reproducible, choices indexed
    body = {"prompt": p, "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "top_k": 40,
            "min_p": 0.05, "seed": 7, "n": 2, "presence_penalty": 0.5, "frequency_penalty": 0.2,
            "repetition_penalty": 1.1}
    st, d1 = srv.post("/v1/completions", body)
    st2, d2 = srv.post("/v1/completions", body)
    ok(st == 200 and st2 == 200 and [c["index"] for c in d1["choices"]] == [0, 1]
       and d1["choices"] == d2["choices"] and d1["usage"]["completion_tokens"] == 32,
       "n=2 with a seed: two choices, reproducible", (d1, d2))
    # logprobs (completions)
    st, d = srv.post("/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0,
                                         "logprobs": 3})
    lp = d["choices"][0]["logprobs"] if st == 200 else None
    ok(lp and len(lp["tokens"]) == 8 and len(lp["token_logprobs"]) == 8
       and all(len(t) <= 3 for t in lp["top_logprobs"]) and "".join(lp["tokens"]) == ref[
           :len("".join(lp["tokens"]))] and all(x <= 0 for x in lp["token_logprobs"]),
       "completions logprobs", lp)
    # ignore_eos with a max_tokens that passes the end of the story
    st, d = srv.post("/v1/completions", {"prompt": "", "max_tokens": 400, "temperature": 0,
                                         "ignore_eos": True})
    ok(st == 200 and d["usage"]["completion_tokens"] == 400
       and d["choices"][0]["finish_reason"] == "length", "ignore_eos", d.get("usage"))
    # echo, streamed and not; usage rides on the last finish chunk without include_usage
    st, d = srv.post("/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0,
                                         "echo": True})
    echoed = d["choices"][0]["text"] if st == 200 else ""
    ok(echoed.startswith(p) and ref.startswith(echoed[len(p):]) and len(echoed) > len(p),
       "echo", d)
    st, evs, done = srv.stream("/v1/completions", {"prompt": p, "max_tokens": 8,
                                                   "temperature": 0, "echo": True,
                                                   "stream": True})
    ok(done and stream_text(evs)[0] == echoed
       and evs[-1].get("usage", {}).get("completion_tokens") == 8
       and evs[-1]["choices"][0]["finish_reason"] == "length",
       "echo streamed; usage on the final chunk", evs[-1:])
    # xLLM extensions are accepted
    st, d = srv.post("/v1/completions", {"prompt": p, "max_tokens": 4, "temperature": 0,
                                         "priority": -3, "offline": False, "ttft_slo_ms": 500,
                                         "tpot_slo_ms": 50})
    ok(st == 200 and d["choices"][0]["text"] == ref[:len(d["choices"][0]["text"])],
       "priority / offline / SLO fields", d)


def check_errors(srv, key):
    def err(st, d, code, param="?"):
        e = d.get("error", {}) if isinstance(d, dict) else {}
        good = st == code and isinstance(e.get("message"), str) and "type" in e
        if param != "?":
            good = good and e.get("param") == param
        return good

    st, _, out = srv.request("POST", "/v1/completions", raw="{not json")
    ok(st == 400 and "JSON" in json.loads(out)["error"]["message"], "400 malformed JSON", out)
    for field, val in [("temperature", "hot"), ("max_tokens", -1), ("n", 0), ("top_p", 2),
                       ("stop", 5), ("logprobs", 50), ("seed", "x"), ("stream", "yes"),
                       ("priority", 1.5), ("prompt", {"a": 1})]:
        body = {"prompt": "hi", field: val}
        st, d = srv.post("/v1/completions", body)
        ok(err(st, d, 400, field), "400 names the bad field %s" % field, d)
    st, d = srv.post("/v1/completions", {"max_tokens": 3})
    ok(err(st, d, 400, "prompt"), "400 missing prompt", d)
    # the instance RPC refuses a bad body naming the field (error.param), and answers a good one
    # with a header line, one line per token and a finish line
    rpc = {"magic": "xllm-rpc", "version": 1, "prompt": [1, 403], "max_tokens": 3,
           "temperature": 0}
    for field, val, param in [("version", 2, "version"), ("seed", 7, "seed"),
                              ("prompt", [1, -5], "prompt"), ("top_logprobs", 21, "top_logprobs"),
                              ("pd_export", {"id": "1", "to": "x" * 200}, "pd_export.to")]:
        st, d = srv.post("/v1/instance/generate", dict(rpc, **{field: val}))
        ok(err(st, d, 400, param), "instance RPC: 400 names %s" % param, d)
    st, _, out = srv.request("POST", "/v1/instance/generate", rpc)
    lines = [json.loads(x) for x in out.decode().splitlines()] if st == 200 else []
    ok(len(lines) == 5 and lines[0] == {"magic": "xllm-rpc", "version": 1} and
       all("t" in x for x in lines[1:4]) and lines[4].get("finish") == "length",
       "instance RPC: a header, 3 token lines, a finish line", out)
    st, d = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 100000})
    ok(err(st, d, 400) and d["error"]["code"] == "context_length_exceeded",
       "400 context overflow", d)
    st, d = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    ok(err(st, d, 400) and "chat template" in d["error"]["message"],
       "400 chat on a model without a template", d)
    st, d = srv.post("/v1/chat/completions", {"messages": []})
    ok(err(st, d, 400, "messages"), "400 empty messages", d)
    # 401
    st, _, out = srv.request("POST", "/v1/completions", {"prompt": "hi"},
                             headers={"Authorization": "Bearer wrong"})
    ok(st == 401 and json.loads(out)["error"]["type"] == "authentication_error",
       "401 with a wrong key", out)
    st, _, out = srv.request("GET", "/v1/models", headers={"Authorization": ""})
    ok(st == 401, "401 without a key", out)
    st, _, _ = srv.request("GET", "/health", headers={"Authorization": ""})
    ok(st == 200, "/health needs no key")
    # 404, 405
    st, _, out = srv.request("GET", "/v2/nothing")
    ok(st == 404 and "error" in json.loads(out), "404 unknown path", out)
    st, h, out = srv.request("GET", "/v1/completions")
    ok(st == 405 and "error" in json.loads(out), "405 wrong method", out)
    st, _, out = srv.request("POST", "/health", {})
    ok(st == 405, "405 POST /health", out)
    # 413: over --max-body (8192), by Content-Length and by a chunked body
    big = json.dumps({"prompt": "x" * 9000})
    st, _, out = srv.request("POST", "/v1/completions", raw=big)
    ok(st == 413 and "error" in json.loads(out), "413 body over --max-body", out)
    c = srv.conn()
    c.putrequest("POST", "/v1/completions")
    c.putheader("Authorization", "Bearer " + key)
    c.putheader("Transfer-Encoding", "chunked")
    c.endheaders()
    for i in range(0, len(big), 1000):
        part = big[i:i + 1000].encode()
        c.send(b"%x\r\n%s\r\n" % (len(part), part))
    c.send(b"0\r\n\r\n")
    r = c.getresponse()
    ok(r.status == 413, "413 chunked body over --max-body", r.status)
    c.close()


def check_busy_and_drain():
    # 429: one slot, one waiting place
    srv = Server(STORIES, "--max-seqs", "1", "--max-queue", "1", "-c", "2048")
    started, release = threading.Event(), threading.Event()

    def on_event(ev):
        started.set()
        return release.is_set()  # then go away, freeing the slot

    a = threading.Thread(target=lambda: srv.stream(
        "/v1/completions", {"prompt": "", "max_tokens": 2000, "ignore_eos": True,
                            "stream": True}, on_event=on_event))
    a.start()
    started.wait(60)
    # b waits in the queue (its stream stays silent), c finds the queue full
    cb = srv.conn()
    cb.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 4}),
               headers=srv.headers())
    time.sleep(0.3)
    st, d = srv.post("/v1/completions", {"prompt": "y", "max_tokens": 4})
    ok(st == 429 and d["error"]["type"] == "rate_limit_error", "429 when the queue is full", d)
    release.set()
    a.join()
    r = cb.getresponse()
    ok(r.status == 200, "the queued request completes after the slot frees", r.status)
    cb.close()
    ok(srv.stop() == 0, "server exits cleanly (1)", "".join(srv.log[-20:]))

    # 503 while loading, then ready
    srv = Server(STORIES, "--drain-timeout", "300", env={"XLLM_SERVE_LOAD_DELAY_MS": "1500"},
                 wait_ready=False)
    st, out = srv.get("/health")
    ok(st == 503 and json.loads(out)["status"] == "loading", "503 /health while loading", out)
    st, d = srv.post("/v1/completions", {"prompt": "hi"})
    ok(st == 503 and d["error"]["code"] == "loading", "503 completions while loading", d)
    srv.wait_ready()
    st, out = srv.get("/health")
    ok(st == 200, "200 /health once loaded", out)
    # 503 while draining: a stream in flight finishes, new requests are refused
    first = threading.Event()
    res = {}

    def drained_stream():
        res["r"] = srv.stream("/v1/completions", {"prompt": "", "max_tokens": 1500,
                                                  "ignore_eos": True, "stream": True,
                                                  "stream_options": {"include_usage": True}},
                              on_event=lambda ev: first.set())

    t = threading.Thread(target=drained_stream)
    t.start()
    first.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    st, d = srv.post("/v1/completions", {"prompt": "hi"})
    st2, out2 = srv.get("/health")
    ok(st == 503 and d["error"]["code"] == "draining" and st2 == 503,
       "503 while draining", (st, d, st2))
    t.join()
    st, evs, done = res["r"]
    ok(done and evs[-1]["usage"]["completion_tokens"] == 1500,
       "the stream in flight finishes during the drain", evs[-1:])
    ok(srv.stop() == 0, "server exits cleanly after draining", "".join(srv.log[-20:]))


def check_chat(refs_qt):
    srv = Server(QWENTOK, "-c", "1024")
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Write a haiku about the sea, in Chinese: 大海"}]
    body = {"model": "qwen3-qwentok-f16", "messages": msgs, "max_completion_tokens": 24,
            "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}
    st, d = srv.post("/v1/chat/completions", body)
    ok(st == 200 and d["object"] == "chat.completion"
       and d["choices"][0]["message"]["role"] == "assistant"
       and d["usage"]["completion_tokens"] >= 1, "chat completion", d)
    content = d["choices"][0]["message"]["content"] if st == 200 else None
    st, evs, done = srv.stream("/v1/chat/completions", dict(body, stream=True))
    text, fin = stream_text(evs, "chat")
    ok(done and evs[0]["choices"][0]["delta"].get("role") == "assistant" and text == content
       and fin == d["choices"][0]["finish_reason"], "streamed chat == chat", (text, content))
    # the same prompt through /tokenize and /v1/completions gives the same text
    st, tk = srv.post("/tokenize", {"messages": msgs,
                                    "chat_template_kwargs": {"enable_thinking": False}})
    st2, dc = srv.post("/v1/completions", {"prompt": tk["tokens"], "max_tokens": 24,
                                           "temperature": 0})
    ok(st == 200 and st2 == 200 and dc["choices"][0]["text"] == content
       and tk["count"] == d["usage"]["prompt_tokens"], "chat == completion of the rendered prompt",
       (dc, content))
    # content parts, logprobs
    body2 = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                       {"type": "text", "text": "there"}]}],
             "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    st, d = srv.post("/v1/chat/completions", body2)
    lp = d["choices"][0]["logprobs"]["content"] if st == 200 else []
    ok(st == 200 and len(lp) == d["usage"]["completion_tokens"]
       and all(len(e["top_logprobs"]) == 3 and e["logprob"] <= 0 and "bytes" in e for e in lp),
       "chat logprobs / top_logprobs and text content parts", d)
    st, evs, done = srv.stream("/v1/chat/completions", dict(body2, stream=True))
    n_lp = sum(len((c.get("logprobs") or {}).get("content", [])) for ev in evs
               for c in ev["choices"])
    ok(done and n_lp == len(lp), "streamed chat logprobs", n_lp)
    st, d = srv.post("/v1/chat/completions", {"messages": [{"role": 5}]})
    ok(st == 400 and d["error"]["param"] == "messages", "400 bad message", d)
    ok(srv.stop() == 0, "chat server exits cleanly", "".join(srv.log[-20:]))


def check_invalid_utf8():
    # acceptance 6: a random-weight model emits bytes that are not UTF-8
    p = "Once upon a time, there was a little girl"
    ref = run_ref(QWEN_TINY, p, 24)
    want = ref.decode("utf-8", "replace")
    srv = Server(QWEN_TINY, "-c", "512")
    st, evs, done = srv.stream("/v1/completions", {"prompt": p, "max_tokens": 24,
                                                   "temperature": 0, "stream": True})
    text, fin = stream_text(evs)
    try:
        ref.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    ok(not valid, "the reference output is not valid UTF-8 (the case under test)", ref)
    ok(done and fin == "length" and text == want and "\ufffd" in text,
       "invalid UTF-8 streams to the end with U+FFFD", (text, want))
    st, d = srv.post("/v1/completions", {"prompt": p, "max_tokens": 24, "temperature": 0,
                                         "logprobs": 1})
    ok(st == 200 and d["choices"][0]["text"] == want, "invalid UTF-8, not streamed", d)
    ok(srv.stop() == 0, "utf-8 server exits cleanly", "".join(srv.log[-20:]))


def check_low_memory():
    """--low-memory (sub-8-bit matrices kept as decode panels only, which the prompt's products
    read too) serves a K-quant model as `xllm run --low-memory` generates."""
    p = "Once upon a time"
    ref = run_ref(QWEN_TINY_Q4KM, p, 16, ("--low-memory",)).decode("utf-8", "replace")
    srv = Server(QWEN_TINY_Q4KM, "-c", "512", "--low-memory")
    st, d = srv.post("/v1/completions", {"prompt": p, "max_tokens": 16, "temperature": 0})
    ok(st == 200 and d["choices"][0]["text"] == ref,
       "serve --low-memory completes as run --low-memory", (d, ref))
    ok(any("model loaded in low memory" in line for line in srv.log),
       "serve says it loaded in low memory", "".join(srv.log[-20:]))
    ok(srv.stop() == 0, "low-memory server exits cleanly", "".join(srv.log[-20:]))


def main():
    refs = {p: run_ref(STORIES, p, N).decode() for p in PROMPTS + [""]}
    srv = Server(STORIES, "--max-seqs", "8", "--max-body", "8192", "-c", "2048", key=KEY)
    ids = check_basic(srv)
    check_greedy(srv, refs, ids)
    check_sampling(srv, refs)
    check_errors(srv, KEY)
    m = wait_idle(srv)
    ok(m.get('xllm_http_responses_total{code="500"}', 1) == 0, "no 500s", m)
    ok(srv.stop() == 0, "server exits cleanly", "".join(srv.log[-20:]))
    check_busy_and_drain()
    check_chat(None)
    check_invalid_utf8()
    check_low_memory()
    finish()


if __name__ == "__main__":
    main()

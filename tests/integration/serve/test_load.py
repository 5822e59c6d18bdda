"""Acceptance 3: 64 concurrent streamed requests plus 16 clients that go away mid-stream, with
the prefix cache on and off: no server errors, every completed output equals the greedy
reference, and afterwards no sequence holds KV pages (only prefix-cache pages remain, none with
--no-prefix-cache)."""
import threading
import time

from serve_lib import STORIES, Server, finish, ok, run_ref, stream_text, wait_idle

# a shared prefix (reused through the prefix cache) and different endings
BASE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
        "the park with her friends. Her best friend was a boy named Tom. Tom had a big brown "
        "dog called Max, and Max liked to run after balls and sticks. Every morning Lily, Tom "
        "and Max went to the park together, and they played until it was time to go home. "
        "One day, ")
ENDS = ["she saw a big dog", "it started to rain", "her mom gave her a red ball",
        "a bird sang a song", "Tom came to play", "the sun was hot", "they found a box",
        "she lost her hat"]
N = 24


def load_round(label, srv, refs):
    results, errors = {}, []
    lock = threading.Lock()

    def complete(i):
        p = BASE + ENDS[i % len(ENDS)]
        try:
            st, evs, done = srv.stream("/v1/completions", {"prompt": p, "max_tokens": N,
                                                           "temperature": 0, "stream": True})
            with lock:
                results[i] = (p, st, done, stream_text(evs)[0])
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(repr(e))

    def leave(i):
        try:
            srv.stream("/v1/completions", {"prompt": BASE + "and then", "max_tokens": 1500,
                                           "ignore_eos": True, "stream": True},
                       stop_after=2 + i % 4)
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(repr(e))

    ts = [threading.Thread(target=complete, args=(i,)) for i in range(64)]
    ts += [threading.Thread(target=leave, args=(i,)) for i in range(16)]
    t0 = time.time()
    for i, t in enumerate(ts):
        t.start()
    for t in ts:
        t.join(300)
    dt = time.time() - t0
    bad = [(i, r) for i, r in results.items()
           if not (r[1] == 200 and r[2] and r[3] == refs[r[0]])]
    ok(len(results) == 64 and not bad and not errors,
       "%s: 64 streams complete and equal the reference (%.1f s)" % (label, dt),
       (bad[:3], errors[:3], len(results)))
    m = wait_idle(srv)
    codes = {k: v for k, v in m.items() if k.startswith("xllm_http_responses_total")}
    ok(codes.get('xllm_http_responses_total{code="500"}', 1) == 0
       and codes.get('xllm_http_responses_total{code="other"}', 1) == 0,
       "%s: no server errors" % label, codes)
    ok(m.get("xllm_client_disconnects_total", 0) >= 16,
       "%s: the 16 clients that left were noticed" % label, m.get("xllm_client_disconnects_total"))
    # the engine frees a cancelled sequence at its next step; give it that step
    t0 = time.time()
    while m.get("xllm_kv_pages_used", 1) != 0 and time.time() - t0 < 10:
        time.sleep(0.05)
        m = srv.metrics()
    return m


def main():
    refs = {BASE + e: run_ref(STORIES, BASE + e, N).decode() for e in ENDS}
    srv = Server(STORIES, "--max-seqs", "16", "-c", "2048")
    m = load_round("prefix cache on", srv, refs)
    ok(m.get("xllm_kv_pages_used") == 0, "prefix cache on: no sequence holds KV pages",
       {k: v for k, v in m.items() if k.startswith("xllm_kv")})
    ok(m.get("xllm_kv_pages_cached", 0) > 0 and m.get("xllm_prefix_cache_hit_tokens_total", 0) > 0,
       "prefix cache on: cached prefix pages remain and were hit",
       (m.get("xllm_kv_pages_cached"), m.get("xllm_prefix_cache_hit_tokens_total")))
    ok(srv.stop() == 0, "server exits cleanly (prefix cache on)", "".join(srv.log[-20:]))

    srv = Server(STORIES, "--max-seqs", "16", "-c", "2048", "--no-prefix-cache")
    m = load_round("prefix cache off", srv, refs)
    ok(m.get("xllm_kv_pages_used") == 0 and m.get("xllm_kv_pages_cached") == 0,
       "prefix cache off: no KV pages held at all",
       {k: v for k, v in m.items() if k.startswith("xllm_kv")})
    ok(srv.stop() == 0, "server exits cleanly (prefix cache off)", "".join(srv.log[-20:]))
    finish()


if __name__ == "__main__":
    main()

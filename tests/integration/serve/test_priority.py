"""Acceptance 4, asserting order, not time: with the server saturated by offline requests, an
online request gets its first token before any offline request queued ahead of it, and running
offline work is preempted for it (the metrics count the preemption). Prints the online TTFT
under that load against the unloaded TTFT."""
import threading
import time

from serve_lib import STORIES, Server, finish, ok, wait_idle

SLOTS = 2
OFFLINE = 6


def main():
    srv = Server(STORIES, "--max-seqs", str(SLOTS), "-c", "2048")
    lock = threading.Lock()
    order = []  # names, in the order their first token arrived at the client
    release = threading.Event()

    def first_token(name):
        with lock:
            if name not in order:
                order.append(name)

    def stream(name, body, leave_on_release):
        def on_event(ev):
            if any(c.get("text") for c in ev.get("choices", [])):
                first_token(name)
            return leave_on_release and release.is_set()
        return srv.stream("/v1/completions", dict(body, stream=True), on_event=on_event)

    online = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}

    # unloaded TTFT
    t0 = time.time()
    ttft = {}

    def timed(name):
        def on_event(ev):
            if name not in ttft and any(c.get("text") for c in ev.get("choices", [])):
                ttft[name] = time.time() - t0
        return on_event

    srv.stream("/v1/completions", dict(online, stream=True), on_event=timed("unloaded"))
    wait_idle(srv)

    # saturate: offline requests, long outputs; SLOTS run, the rest wait in arrival order
    offline = {"prompt": "", "max_tokens": 1800, "ignore_eos": True, "offline": True}
    threads = []
    for i in range(OFFLINE):
        t = threading.Thread(target=stream, args=("offline%d" % i, offline, True))
        t.start()
        threads.append(t)
        time.sleep(0.02)
    t_wait = time.time()
    while time.time() - t_wait < 60:
        m = srv.metrics()
        if len(order) >= SLOTS and m["xllm_requests_waiting"] == OFFLINE - SLOTS:
            break
        time.sleep(0.01)
    with lock:
        running = list(order)
    m = srv.metrics()
    ok(len(running) == SLOTS and m["xllm_requests_running"] == SLOTS
       and m["xllm_requests_waiting"] == OFFLINE - SLOTS,
       "saturated: %d offline running, %d waiting" % (SLOTS, OFFLINE - SLOTS),
       (running, m.get("xllm_requests_running"), m.get("xllm_requests_waiting")))
    pre0 = m["xllm_preemptions_total"]

    # the online request
    t0 = time.time()
    st, evs, done = srv.stream("/v1/completions", dict(online, stream=True),
                               on_event=lambda ev: (timed("loaded")(ev), first_token("online"))
                               and False)
    ok(done, "the online request completes", evs[-1:])
    with lock:
        snapshot = list(order)
    queued = ["offline%d" % i for i in range(OFFLINE) if "offline%d" % i not in running]
    pos = snapshot.index("online") if "online" in snapshot else 10**9
    ahead_first = [n for n in queued if n in snapshot and snapshot.index(n) < pos]
    ok("online" in snapshot and not ahead_first,
       "the online request's first token comes before every offline request queued ahead of it",
       (snapshot, queued))
    m = srv.metrics()
    ok(m["xllm_preemptions_total"] > pre0, "running offline work was preempted for it",
       (pre0, m["xllm_preemptions_total"]))
    print("note: online TTFT %.1f ms with %d offline requests saturating %d slots; "
          "unloaded %.1f ms" % (ttft.get("loaded", -1) * 1e3, OFFLINE, SLOTS,
                                ttft.get("unloaded", -1) * 1e3), flush=True)

    release.set()
    for t in threads:
        t.join(120)
    m = wait_idle(srv)
    t0 = time.time()
    while m.get("xllm_kv_pages_used", 1) != 0 and time.time() - t0 < 10:
        time.sleep(0.05)
        m = srv.metrics()
    ok(m.get("xllm_kv_pages_used") == 0, "afterwards no sequence holds KV pages",
       m.get("xllm_kv_pages_used"))
    ok(srv.stop() == 0, "server exits cleanly", "".join(srv.log[-20:]))
    finish()


if __name__ == "__main__":
    main()

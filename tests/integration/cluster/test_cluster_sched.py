"""Cluster scheduling over loopback (etcd, `xllm engine` instances, `xllm service`):
1. dynamic PD: a load shift towards long prompts makes the master's controller switch a decode
   instance to prefill, then a shift towards long generations switches one back; each switch is
   seen in the service's /metrics and in etcd (the instance's key moves to its new role), and
   every request of both phases completes with the output of `xllm run`;
2. offline requests fill idle capacity: they spread over idle instances, wait in the service
   while every instance runs online work, and run once it ends; none is lost."""
import base64
import json
import os
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_lib as cl  # noqa: E402
from serve_lib import STORIES, ok, finish, run_ref  # noqa: E402

SHORT = "Once upon a time"
# three different long prompts (the engines run without prefix cache, so each one is computed)
LONGS = [w + " " + " ".join(["Lily and Tom went to the park to play with the big red ball."] * 40)
         for w in ("One day", "Yesterday", "Then")]


def etcd_roles(etcd):
    """{name: role} from the instance keys /xllm/default/instances/<role>/<name>."""
    pre = b"/xllm/default/instances/"
    end = pre[:-1] + bytes([pre[-1] + 1])
    body = json.dumps({"key": base64.b64encode(pre).decode(),
                       "range_end": base64.b64encode(end).decode()}).encode()
    req = urllib.request.Request(etcd.url + "/v3/kv/range", body,
                                 {"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=5).read())
    roles = {}
    for kv in out.get("kvs", []):
        parts = base64.b64decode(kv["key"]).decode().split("/")
        roles[parts[-1]] = parts[-2]
    return roles


def engine_hist(eng, name):
    """(sum, count) of a histogram in an engine's /metrics."""
    m = eng.metrics()
    return m.get(name + "_sum", 0.0), m.get(name + "_count", 0)


def load(svc, prompts, n, clients, seconds, results, stop):
    """`clients` threads sending prompts[client % len] (max_tokens n, greedy) back to back for
    `seconds` or until stop."""
    def one(prompt):
        t_end = time.time() + seconds
        while time.time() < t_end and not stop.is_set():
            st, o = svc.post("/v1/completions", {"prompt": prompt, "max_tokens": n,
                                                 "temperature": 0, "ignore_eos": True})
            results.append((prompt, st, o["choices"][0]["text"] if st == 200 else o))
    th = [threading.Thread(target=one, args=(prompts[i % len(prompts)],))
          for i in range(clients)]
    [t.start() for t in th]
    return th


def dynamic_pd(etcd):
    p1 = cl.engine(etcd, STORIES, "p1", "prefill", "--no-prefix-cache")
    d1 = cl.engine(etcd, STORIES, "d1", "decode", "--no-prefix-cache")
    d2 = cl.engine(etcd, STORIES, "d2", "decode", "--no-prefix-cache")
    # targets from this machine's own figures: TTFT of a long prompt on an idle prefill
    # instance, and inter-token latency of one stream on an idle decode instance (the best of
    # three tries each: a busy host only makes them larger)
    ttfts, itls = [], []
    for lp in LONGS:
        s0, n0 = engine_hist(p1, "xllm_time_to_first_token_seconds")
        p1.post("/v1/completions", {"prompt": lp, "max_tokens": 1})
        s1, n1 = engine_hist(p1, "xllm_time_to_first_token_seconds")
        ttfts.append((s1 - s0) / max(n1 - n0, 1) * 1e3)
        s0, n0 = engine_hist(d1, "xllm_inter_token_latency_seconds")
        d1.post("/v1/completions", {"prompt": SHORT, "max_tokens": 64, "ignore_eos": True})
        s1, n1 = engine_hist(d1, "xllm_inter_token_latency_seconds")
        itls.append((s1 - s0) / max(n1 - n0, 1) * 1e3)
    ttft_ms, itl_ms = min(ttfts), min(itls)
    ttft_target = max(1, int(3 * ttft_ms + 0.999))
    tpot_target = max(1, int(4 * itl_ms + 0.999))
    print("  idle: long-prompt TTFT %.2f ms, inter-token %.3f ms -> targets %d / %d ms"
          % (ttft_ms, itl_ms, ttft_target, tpot_target))
    # the controller judges a side on at least 2 TTFT samples from its last 8 windows; where a
    # long prompt takes seconds (sanitizer builds, a busy host), 8 windows of 500 ms saw too
    # few completions under load to judge (a parallel ASan run once saw no switch in 60 s), so
    # the window grows with the idle TTFT
    interval = int(500 * max(1.0, ttft_ms / 1e3))
    svc = cl.service(etcd, STORIES, "--dynamic-pd", "--pd-ttft-ms", str(ttft_target),
                     "--pd-tpot-ms", str(tpot_target), "--pd-interval-ms", str(interval),
                     "--pd-cooldown-ms", str(3 * interval), "--id", "svc-dyn")
    ok(cl.wait_for(lambda: (cl.cluster_json(svc) or {}).get("master"), 10),
       "the dynamic-PD service is master")
    refs = {lp: run_ref(STORIES, lp, 1).decode() for lp in LONGS}
    refs[SHORT] = run_ref(STORIES, SHORT, 128).decode()

    def roles():
        c = cl.cluster_json(svc) or {"instances": []}
        return {i["name"]: i["role"] for i in c["instances"]}

    # phase 1: long prompts, one token each, from 10 clients: the prefill instance queues. Waits
    # scale with the idle TTFT (sanitizer builds are several times slower)
    slow = ttft_ms / 1e3
    results, stop = [], threading.Event()
    th = load(svc, LONGS, 1, 10, 300, results, stop)
    switched = cl.wait_for(lambda: sorted(roles().values()) == ["decode", "prefill", "prefill"],
                           20 + 10 * slow, 0.1)
    stop.set()
    [t.join(30 + 12 * slow) for t in th]
    m = svc.metrics()
    ok(switched, "prefill-heavy load: a decode instance became prefill",
       (roles(), {k: v for k, v in m.items() if k.startswith("xllm_pd_")}))
    ok(m.get('xllm_pd_role_switches_total{to="prefill"}', 0) >= 1,
       "/metrics counts the switch to prefill", m)
    ok(m.get('xllm_cluster_instance_role{instance="p1",role="prefill"}') is not None and
       sum(1 for k in m if k.startswith("xllm_cluster_instance_role") and 'role="prefill"' in k)
       == 2, "/metrics shows two prefill instances")
    er = etcd_roles(etcd)
    ok(sorted(er.values()) == ["decode", "prefill", "prefill"] and er == roles(),
       "etcd holds the switched role under the instance's key", er)
    good = [r for r in results if r[1] == 200 and r[2] == refs[r[0]]]
    ok(len(results) > 0 and len(good) == len(results),
       "phase 1: %d requests, every one complete and equal to xllm run" % len(results),
       [r for r in results if r not in good][:3])
    first = [n for n, r in roles().items() if n != "p1" and r == "prefill"]

    # phase 2: short prompts, long generations, from 32 clients: decode instances batch up
    results2, stop = [], threading.Event()
    th = load(svc, [SHORT], 128, 32, 300, results2, stop)
    back = cl.wait_for(lambda: sorted(roles().values()) == ["decode", "decode", "prefill"],
                       25 + 10 * slow, 0.1)
    stop.set()
    [t.join(60 + 10 * slow) for t in th]
    m = svc.metrics()
    ok(back, "decode-heavy load: a prefill instance became decode again", (roles(), m))
    ok(m.get('xllm_pd_role_switches_total{to="decode"}', 0) >= 1,
       "/metrics counts the switch to decode", m)
    er = etcd_roles(etcd)
    ok(sorted(er.values()) == ["decode", "decode", "prefill"],
       "etcd follows the second switch", er)
    good = [r for r in results2 if r[1] == 200 and r[2] == refs[r[0]]]
    ok(len(results2) > 0 and len(good) == len(results2),
       "phase 2: %d requests, every one complete and equal to xllm run" % len(results2),
       [r for r in results2 if r not in good][:3])
    ok(m.get("xllm_service_midstream_failures_total", 0) == 0 and
       m.get("xllm_service_retries_total", 0) == 0, "no request failed or was retried", m)
    print("  switched %s to prefill, then back; %d + %d requests" %
          (first, len(results), len(results2)))
    ok(svc.stop() == 0, "service stops cleanly")
    for e in (p1, d1, d2):
        ok(e.stop() == 0, "engine %s stops cleanly" % e.url)


def offline(etcd):
    m1 = cl.engine(etcd, STORIES, "o1")
    m2 = cl.engine(etcd, STORIES, "o2")
    svc = cl.service(etcd, STORIES, "--policy", "least-load", "--offline-max-inflight", "2",
                     "--id", "svc-off")
    ok(cl.wait_for(lambda: len((cl.cluster_json(svc) or {"instances": []})["instances"]) == 2,
                   10), "offline: the service sees both instances")
    ref = run_ref(STORIES, SHORT, 48).decode()
    res, lock = [], threading.Lock()

    def send(offline_, n):
        body = {"prompt": SHORT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        if offline_:
            body["offline"] = True
        st, o = svc.post("/v1/completions", body)
        with lock:
            res.append((offline_, st, o["choices"][0]["text"] if st == 200 else o))

    # online requests occupy both instances; offline ones sent meanwhile must wait
    on = [threading.Thread(target=send, args=(False, 1500)) for _ in range(2)]
    [t.start() for t in on]
    busy = cl.wait_for(lambda: all(i["in_flight"] >= 1 for i in cl.cluster_json(svc)["instances"]),
                       10, 0.01)
    ok(busy, "offline: both instances run an online request", cl.cluster_json(svc))
    off = [threading.Thread(target=send, args=(True, 48)) for _ in range(6)]
    [t.start() for t in off]
    waited = cl.wait_for(lambda: svc.metrics().get("xllm_service_offline_waiting", 0) == 6, 10)
    routed_before = {i["name"]: i["routed"] for i in cl.cluster_json(svc)["instances"]}
    ok(waited and sum(routed_before.values()) == 2,
       "offline requests wait while every instance runs online work", svc.metrics())
    [t.join(120) for t in on]
    [t.join(120) for t in off]
    ok(len(res) == 8 and all(r[1] == 200 for r in res), "offline: every request completed", res)
    ok(all(r[2] == ref for r in res if r[0]), "offline outputs equal xllm run")
    m = svc.metrics()
    ok(m.get("xllm_service_offline_waits_total", 0) == 6 and
       m.get("xllm_service_offline_waiting", 0) == 0, "/metrics counts the waits", m)
    # idle cluster: five long offline requests at once; each instance takes two (the limit)
    # and the fifth waits for one of them to end (long enough that none ends before all five
    # were routed)
    ref_long = run_ref(STORIES, SHORT, 1500).decode()
    waits = svc.metrics().get("xllm_service_offline_waits_total", 0)
    res.clear()
    off = [threading.Thread(target=send, args=(True, 1500)) for _ in range(5)]
    [t.start() for t in off]

    def in_flight():
        return sorted(i["in_flight"] for i in cl.cluster_json(svc)["instances"])
    full = cl.wait_for(lambda: in_flight() == [2, 2], 10, 0.01)
    ok(full, "offline work fills both idle instances up to the limit (2 each)", in_flight())
    [t.join(120) for t in off]
    ok(svc.metrics().get("xllm_service_offline_waits_total", 0) == waits + 1,
       "the fifth offline request waited for a free slot", svc.metrics())
    ok(len(res) == 5 and all(r[1] == 200 and r[2] == ref_long for r in res),
       "those complete too, equal to xllm run", [r[:2] for r in res])
    ok(svc.stop() == 0 and m1.stop() == 0 and m2.stop() == 0, "offline: processes stop cleanly")


def main():
    etcd = cl.Etcd()
    try:
        dynamic_pd(etcd)
        offline(etcd)
    finally:
        etcd.stop()
    finish()


main()

"""Cluster over loopback: etcd, `xllm engine` instances and `xllm service` front doors.
1. greedy outputs through the service equal `xllm run --temp 0`, for every policy;
2. kill -9 of an instance under load: every request completes or gets an explicit error, none
   hangs, the instance leaves routing within the lease TTL, the service keeps serving;
3. the master service is killed: the standby takes over within the lease time;
4. a role switch of a live instance (POST /v1/instance/role) shows in the service's routing;
5. the instances' prefix-cache events (GET /v1/instance/load?kv_since=N) feed the prefix
   policy's index: a prompt cached on an instance behind the service's back goes there;
6. an instance whose answer breaks the RPC (a bad header) fails the leg; the request is retried."""
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_lib as cl  # noqa: E402
from serve_lib import STORIES, ok, finish, run_ref, stream_text  # noqa: E402

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park"]
N = 24


def names(svc, role=None, up=True):
    c = cl.cluster_json(svc) or {"instances": []}
    return sorted(i["name"] for i in c["instances"]
                  if (role is None or i["role"] == role) and (not up or i["up"]))


def main():
    etcd = cl.Etcd()
    try:
        refs = {p: run_ref(STORIES, p, N).decode() for p in PROMPTS}
        m1 = cl.engine(etcd, STORIES, "m1")
        m2 = cl.engine(etcd, STORIES, "m2")
        svcs = {}
        for pol in ["round-robin", "least-load", "prefix", "slo"]:
            svcs[pol] = cl.service(etcd, STORIES, "--policy", pol, "--id", "svc-" + pol)
        for pol, s in svcs.items():
            ok(cl.wait_for(lambda: names(s) == ["m1", "m2"], 10), pol + ": sees both instances",
               cl.cluster_json(s))

        # 1. outputs equal xllm run, streamed and not, under concurrency, every policy
        for pol, s in svcs.items():
            res = {}

            def one(i, p, s=s, res=res):
                if i % 2:
                    st, ev, done = s.stream("/v1/completions", {"prompt": p, "max_tokens": N,
                                                               "temperature": 0, "stream": True})
                    res[i] = (st, stream_text(ev)[0] if done else None)
                else:
                    st, o = s.post("/v1/completions", {"prompt": p, "max_tokens": N,
                                                       "temperature": 0})
                    res[i] = (st, o["choices"][0]["text"] if st == 200 else o)
            th = [threading.Thread(target=one, args=(i, PROMPTS[i % 3])) for i in range(8)]
            [t.start() for t in th]
            [t.join(60) for t in th]
            good = all(res.get(i) == (200, refs[PROMPTS[i % 3]]) for i in range(8))
            ok(good, pol + ": greedy outputs equal xllm run (8 concurrent)", res)
            routed = {i["name"]: i["routed"] for i in cl.cluster_json(s)["instances"]}
            if pol in ("round-robin", "least-load"):
                ok(all(v > 0 for v in routed.values()), pol + ": both instances used", routed)
        # 5. prefix-cache events: the RPC, then the service's index fed by them
        st, o = m1.get("/v1/instance/load?kv_since=0")
        kv = json.loads(o)["kv"] if st == 200 else {}
        bt = kv.get("block_tokens", 0)
        ok(kv.get("hash") == "xxh3-chain-v1" and kv.get("reset") is True and bt > 0 and
           all(len(h) == 16 and int(h, 16) >= 0 for h in kv["stored"]) and kv["evicted"] == [],
           "instance load ?kv_since=0: the whole set of cached blocks (a reset)", kv)
        st, o = m1.get("/v1/instance/load?kv_since=%d" % kv["next"])
        kv2 = json.loads(o)["kv"]
        ok(kv2["reset"] is False and kv2["next"] >= kv["next"], "events continue from next", kv2)
        st, o = m1.get("/v1/instance/load?kv_since=x1")
        ok(st == 400 and b"kv_since" in o, "a bad kv_since is refused (400)", o)
        ok("kv" not in json.loads(m1.get("/v1/instance/load")[1]), "no kv without kv_since")

        s = svcs["prefix"]

        def prefix_blocks(name):
            return s.metrics().get('xllm_cluster_prefix_blocks{instance="%s"}' % name, 0)
        # prompts of at least two full KV blocks (the stories model's blocks are 64 tokens)
        story = "Once upon a time there was a little girl named Lily. She liked to play outside."
        long_p = " ".join([story] * 8)
        fresh = " ".join(["The little dog ran to the park to play with a red ball."] * 12)
        n_tok = len(m1.post("/tokenize", {"prompt": long_p})[1]["tokens"])
        ok(n_tok >= 2 * bt, "the long prompt spans two KV blocks (%d tokens, blocks of %d)" %
           (n_tok, bt))
        # where a prompt no instance holds goes (the tie-break), and the other instance
        before = {i["name"]: i["routed"] for i in cl.cluster_json(s)["instances"]}
        s.post("/v1/completions", {"prompt": fresh, "max_tokens": 1, "temperature": 0})
        after = {i["name"]: i["routed"] for i in cl.cluster_json(s)["instances"]}
        dflt = [k for k in after if after[k] > before[k]][0]
        other = {"m1": m1, "m2": m2}[[k for k in after if k != dflt][0]]
        oname = [k for k in after if k != dflt][0]
        # the other instance computes long_p behind the service's back: only its events tell
        b0 = prefix_blocks(oname)
        st, _ = other.post("/v1/completions", {"prompt": long_p, "max_tokens": 1,
                                               "temperature": 0})
        ok(st == 200 and cl.wait_for(lambda: prefix_blocks(oname) >= b0 + 2, 5),
           "prefix: the service learns %s's new blocks from its events" % oname,
           (b0, prefix_blocks(oname)))
        before = {i["name"]: i["routed"] for i in cl.cluster_json(s)["instances"]}
        for _ in range(4):
            s.post("/v1/completions", {"prompt": long_p, "max_tokens": 4, "temperature": 0})
        after = {i["name"]: i["routed"] for i in cl.cluster_json(s)["instances"]}
        delta = {k: after[k] - before[k] for k in after}
        ok(delta[oname] == 4 and delta[dflt] == 0,
           "prefix: a prompt goes where the events say it is cached (not to the tie-break's %s)"
           % dflt, delta)
        ok(json.loads(s.get("/v1/cluster")[1])["policy"] == "prefix", "/v1/cluster names the policy")

        # master election: exactly one of the services is master
        masters = [p for p, s in svcs.items() if cl.cluster_json(s)["master"]]
        ok(len(masters) == 1, "exactly one master service", masters)

        # 4. role switch of a live instance: seen by the service as CHANGED
        st, o = m2.post("/v1/instance/role", {"role": "decode"})
        ok(st == 200, "role switch accepted", o)
        rr = svcs["round-robin"]
        ok(cl.wait_for(lambda: names(rr, "decode") == ["m2"], 5), "service sees m2 as decode",
           cl.cluster_json(rr))
        st, o = rr.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": N,
                                            "temperature": 0})
        ok(st == 200 and o["choices"][0]["text"] == refs[PROMPTS[0]],
           "served by the mixed instance while m2 is decode-only", o)
        m2.post("/v1/instance/role", {"role": "mixed"})
        ok(cl.wait_for(lambda: names(rr, "mixed") == ["m1", "m2"], 5), "m2 mixed again")
        metrics = rr.get("/metrics")[1].decode()
        ok('xllm_cluster_instance_role{instance="m2",role="mixed"}' in metrics,
           "/metrics shows the roles")

        # 2. kill -9 an instance under load
        results = []
        lock = threading.Lock()

        def client(i):
            t0 = time.time()
            st, ev, done = rr.stream("/v1/completions", {"prompt": PROMPTS[i % 3],
                                                         "max_tokens": 400, "temperature": 0,
                                                         "ignore_eos": True, "stream": True})
            err = [e for e in ev if "error" in e]
            text, fin = stream_text(ev) if st == 200 else ("", None)
            with lock:
                results.append((i, st, done, fin, bool(err), len(text), time.time() - t0))
        th = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        [t.start() for t in th]
        cl.wait_for(lambda: (cl.cluster_json(rr) or {"instances": [{"in_flight": 0}]})
                    ["instances"][0]["in_flight"] >= 3, 5, 0.01)
        # a sanitizer report ends a process at once (halt_on_error): the ones killed here must
        # still be running when the test kills them
        ok(m1.proc.poll() is None, "m1 runs until killed (no sanitizer report)", m1.log[-20:])
        t_kill = time.time()
        m1.proc.send_signal(signal.SIGKILL)
        [t.join(90) for t in th]
        ok(len(results) == 12 and not any(t.is_alive() for t in th), "no request hangs", results)
        completed = [r for r in results if r[1] == 200 and r[2] and r[3] == "length" and not r[4]]
        errored = [r for r in results if r[4] or r[3] == "abort" or r[1] != 200]
        ok(len(completed) + len(errored) == len(results),
           "every request completed or got an explicit error", results)
        ok(cl.wait_for(lambda: names(rr, up=False) == ["m2"], 3.0),
           "the killed instance left the registry within the lease TTL (+etcd tick)",
           time.time() - t_kill)
        st, o = rr.post("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": N,
                                            "temperature": 0})
        ok(st == 200 and o["choices"][0]["text"] == refs[PROMPTS[1]],
           "the service keeps serving with the rest", o)
        m = rr.metrics()
        print("  after kill: %d completed, %d with an error event; retries %d" %
              (len(completed), len(errored), m.get("xllm_service_retries_total", 0)))
        ok(len(errored) + m.get("xllm_service_retries_total", 0) > 0,
           "the kill hit requests in flight (error events or retries)", results)

        # 3. the master service is killed; a standby takes over within the lease time
        master = [s for s in svcs.values() if cl.cluster_json(s)["master"]][0]
        others = [s for s in svcs.values() if s is not master]
        ok(master.proc.poll() is None, "the master runs until killed (no sanitizer report)",
           master.log[-20:])
        master.proc.send_signal(signal.SIGKILL)
        t0 = time.time()
        took = cl.wait_for(lambda: any(cl.cluster_json(s)["master"] for s in others), 5)
        ok(took, "a standby service took over as master (%.1f s)" % (time.time() - t0))
        for s in others:
            ok(s.stop() == 0, "standby service stops cleanly", s.log[-5:])

        # PD routes: one prefill + one decode + one mixed instance behind one service; every
        # policy routes both kinds (prefill/decode pair and mixed) and outputs equal xllm run
        p1 = cl.engine(etcd, STORIES, "p1", "prefill")
        d1 = cl.engine(etcd, STORIES, "d1", "decode")
        for pol in ["round-robin", "least-load", "prefix", "slo"]:
            # the slo service also runs the dynamic PD controller (under TSan too); with one
            # prefill and one decode instance it can never switch one (a side keeps one)
            dyn = ["--dynamic-pd", "--pd-interval-ms", "100"] if pol == "slo" else []
            s = cl.service(etcd, STORIES, "--policy", pol, "--id", "pd-" + pol, *dyn)
            ok(cl.wait_for(lambda: names(s) == ["d1", "m2", "p1"], 10), pol + ": sees p1 d1 m2")
            res = []
            for i in range(6):
                st, ev, done = s.stream("/v1/completions", {"prompt": PROMPTS[i % 3],
                                                           "max_tokens": N, "temperature": 0,
                                                           "stream": True})
                res.append(stream_text(ev)[0] == refs[PROMPTS[i % 3]] and done)
                if pol in ("least-load", "slo") and i % 2 == 0:
                    # keep the mixed instance busy so that the pair is chosen too
                    threading.Thread(target=m2.post, args=("/v1/completions", {
                        "prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True})).start()
            m = s.metrics()
            ok(all(res), pol + ": PD cluster outputs equal xllm run", res)
            if dyn:
                ok('xllm_pd_pressure{side="prefill"}' in m and
                   m.get('xllm_pd_role_switches_total{to="prefill"}') == 0,
                   pol + ": the controller runs and switches nothing with one instance per side")
            kinds = (m.get('xllm_cluster_routes_total{kind="pd"}', 0),
                     m.get('xllm_cluster_routes_total{kind="mixed"}', 0))
            if pol == "round-robin":
                ok(kinds[0] > 0 and kinds[1] > 0, pol + ": both PD pairs and mixed used", kinds)
            else:
                ok(sum(kinds) == 6, pol + ": every request routed", kinds)
            rc = s.stop()
            ok(rc == 0, pol + ": service stops cleanly (no sanitizer report)", rc)
        # the pairs really moved KV: the prefill instance exported, the decode instance imported
        # exactly as many prompts and computed none of them itself
        pm, dm = p1.metrics(), d1.metrics()
        exports, imports = pm.get("xllm_kv_exports_total", 0), dm.get("xllm_kv_imports_total", 0)
        ok(exports > 0 and imports == exports,
           "PD pairs transfer the prompt's KV (exports %d, imports %d)" % (exports, imports))
        ok(dm.get("xllm_kv_import_tokens_total", 0) > 0 and
           dm.get("xllm_prompt_tokens_cached_total", 0) == 0,
           "the decode instance received its prompts' KV", dm.get("xllm_kv_import_tokens_total"))
        ok(p1.stop() == 0 and d1.stop() == 0, "prefill and decode engines stop cleanly")

        # 5. an instance whose answer breaks the RPC: a header of another version, then a
        # well-formed stream of one wrong token. The service must fail the leg at the header
        # (not skip lines until a good header) and retry the request on m2.
        bad = cl.FakeInstance(etcd, "fake1", b'{"magic":"xllm-rpc","version":2}\n'
                              b'{"magic":"xllm-rpc","version":1}\n{"t":5,"lp":-1.0}\n'
                              b'{"finish":"stop"}\n')
        s = cl.service(etcd, STORIES, "--policy", "round-robin", "--id", "svc-fake")
        ok(cl.wait_for(lambda: names(s) == ["fake1", "m2"], 10), "sees fake1 and m2",
           cl.cluster_json(s))
        res = [s.post("/v1/completions", {"prompt": PROMPTS[i % 3], "max_tokens": N,
                                          "temperature": 0}) for i in range(4)]
        ok(all(st == 200 and o["choices"][0]["text"] == refs[PROMPTS[i % 3]]
               for i, (st, o) in enumerate(res)),
           "a bad RPC header fails the leg: every request is served by m2", res)
        retries = s.metrics().get("xllm_service_retries_total", 0)
        ok(bad.calls > 0 and retries == bad.calls,
           "each request tried on fake1 was retried (%d tries, %d retries)" % (bad.calls, retries))
        fails = {i["name"]: i["failures"] for i in cl.cluster_json(s)["instances"]}
        ok(fails.get("fake1", 0) == bad.calls, "each bad answer counts as a failure of fake1",
           fails)
        ok(s.stop() == 0, "service stops cleanly")
        bad.stop()
        ok(m2.stop() == 0, "engine stops cleanly")
    finally:
        etcd.stop()
    finish()


main()

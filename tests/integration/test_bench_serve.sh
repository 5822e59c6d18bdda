#!/usr/bin/env bash
# Drives xllm bench-serve against a mock OpenAI-compatible SSE server (mock_openai_server.py,
# loopback only): counts, token totals, structure of the report, concurrency cap, tidal classes,
# goodput, and failures (HTTP 500, streams cut mid-way, malformed SSE, unreachable server,
# missing API key) counted with a clear message, never a crash. Timing bounds are generous.
set -u
XLLM=${XLLM_BIN:?}
SHARED=${XLLM_SHARED:-${XLLM_SHARED_DEFAULT:?}}
HERE=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
fails=0 passes=0
ok() { passes=$((passes + 1)); echo "ok - $1"; }
bad() { fails=$((fails + 1)); echo "FAIL - $1"; }

# start_mock NAME [mock options...]: starts a mock, sets PORT.
start_mock() {
  local name=$1; shift
  python3 "$HERE/mock_openai_server.py" --port-file "$TMP/$name.port" --log "$TMP/$name.log" \
    --lifetime-s 240 "$@" &
  PIDS+=($!)
  for _ in $(seq 100); do [ -s "$TMP/$name.port" ] && break; sleep 0.05; done
  PORT=$(cat "$TMP/$name.port" 2>/dev/null || echo 0)
}

# bench OUT [options...]: runs bench-serve with a time bound; sets RC.
bench() {
  local out=$1; shift
  timeout 60 "$XLLM" bench-serve "$@" >"$TMP/$out.out" 2>"$TMP/$out.err"
  RC=$?
}

# check FILE PYTHON-EXPR: the expression over j (the JSON report) must be true.
check() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
ok = eval("(" + sys.argv[2] + ")", {"j": j})
if not ok:
    print("  expression false:", sys.argv[2], file=sys.stderr)
    print("  report:", json.dumps({k: v for k, v in j.items() if not isinstance(v, dict)}), file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
}

start_mock good --ttft-ms 50 --itl-ms 5
GOOD=$PORT

# 1. random prompts, completions endpoint, all at once: exact counts and sane latencies.
bench r1 --url "http://127.0.0.1:$GOOD" --dataset random --random-input 32 --num-prompts 20 \
  --max-tokens 8 --json
if [ $RC -eq 0 ] && check "$TMP/r1.out" '
j["completed"] == 20 and j["failed"] == 0 and j["first_error"] is None and
j["model"] == "mock-model" and j["endpoint"] == "completions" and
j["total_output_tokens"] == 160 and j["total_input_tokens"] == 20 * 32 and
j["ttft_ms"]["n"] == 20 and 40 <= j["ttft_ms"]["mean"] <= 5000 and
j["ttft_ms"]["p50"] <= j["ttft_ms"]["p90"] <= j["ttft_ms"]["p99"] <= j["ttft_ms"]["max"] and
j["tpot_ms"]["n"] == 20 and 3 <= j["tpot_ms"]["mean"] <= 1000 and
j["itl_ms"]["n"] == 20 * 7 and j["e2e_ms"]["n"] == 20 and
j["e2e_ms"]["mean"] >= j["ttft_ms"]["mean"] and
j["request_throughput"] > 0 and j["output_throughput"] > j["request_throughput"] and
j["total_token_throughput"] > j["output_throughput"] and 0 < j["duration_s"] < 30'
then ok "random/completions: 20 requests, 160 tokens, latencies"
else bad "random/completions report (rc $RC)"; cat "$TMP/r1.err"; fi
if python3 - "$TMP/good.log" <<'EOF'
import json, sys
reqs = [json.loads(l) for l in open(sys.argv[1])]
assert len(reqs) == 20, len(reqs)
for r in reqs:
    assert r["stream"] is True and r["stream_options"] == {"include_usage": True}, r
    assert r["max_tokens"] == 8 and r["model"] == "mock-model" and "ignore_eos" not in r
    assert len(r["prompt"].split()) == 32 and "offline" not in r and "priority" not in r
EOF
then ok "request bodies: stream, include_usage, max_tokens, model, 32-word prompts"
else bad "request bodies"; fi
rm -f "$TMP/good.log"

# 2. ShareGPT prompts on the chat endpoint under a concurrency cap of 3; --ignore-eos and
#    --extra-body reach the server; the table goes to stdout.
bench r2 --url "http://127.0.0.1:$GOOD/v1/" --endpoint chat --dataset sharegpt \
  --dataset-path "$SHARED/data/sharegpt" --num-prompts 12 --concurrency 3 --max-tokens 4 \
  --ignore-eos --extra-body '{"mock_tokens_per_chunk": 2}' --seed 3
stats=$(curl -s --noproxy 127.0.0.1 "http://127.0.0.1:$GOOD/stats")
if [ $RC -eq 0 ] && grep -q "Successful requests: *12" "$TMP/r2.out" &&
   grep -q "Failed requests: *0" "$TMP/r2.out" && grep -q "Total generated tokens: *96" "$TMP/r2.out" &&
   grep -q "^TTFT " "$TMP/r2.out" && grep -q "^TPOT " "$TMP/r2.out" &&
   grep -q "^ITL " "$TMP/r2.out" && grep -q "^E2E " "$TMP/r2.out" &&
   grep -q "chat/completions" "$TMP/r2.out"; then
  ok "sharegpt/chat table: 12 requests, usage counts 2 tokens per chunk"
else bad "sharegpt/chat table (rc $RC)"; cat "$TMP/r2.out" "$TMP/r2.err"; fi
if python3 - "$TMP/good.log" "$stats" <<'EOF'
import json, sys
reqs = [json.loads(l) for l in open(sys.argv[1])]
assert len(reqs) == 12, len(reqs)
for r in reqs:
    m = r["messages"]
    assert len(m) == 1 and m[0]["role"] == "user" and m[0]["content"], r
    assert r["ignore_eos"] is True and r["mock_tokens_per_chunk"] == 2 and r["max_tokens"] == 4
assert len({r["messages"][0]["content"] for r in reqs}) >= 6  # drawn from the dataset
EOF
then ok "chat bodies: messages from the dataset, ignore_eos, extra body"
else bad "chat bodies"; fi
rm -f "$TMP/good.log"

start_mock conc --ttft-ms 20 --itl-ms 2
bench r3 --url "http://127.0.0.1:$PORT" --dataset random --random-input 8 --num-prompts 15 \
  --concurrency 3 --max-tokens 4 --json
stats=$(curl -s --noproxy 127.0.0.1 "http://127.0.0.1:$PORT/stats")
if [ $RC -eq 0 ] && check "$TMP/r3.out" 'j["completed"] == 15 and j["concurrency"] == 3' &&
   python3 -c 'import json,sys; s=json.loads(sys.argv[1]); sys.exit(0 if s["max_active"] <= 3 and s["requests"] == 15 else 1)' "$stats"
then ok "--concurrency 3 keeps at most 3 in flight ($stats)"
else bad "--concurrency (rc $RC, $stats)"; fi

# 3. usage absent: tokens are counted from the chunks.
bench r4 --url "http://127.0.0.1:$GOOD" --dataset random --random-input 8 --num-prompts 5 \
  --max-tokens 6 --extra-body '{"mock_no_usage": true}' --json
if [ $RC -eq 0 ] && check "$TMP/r4.out" 'j["completed"] == 5 and j["total_output_tokens"] == 30 and j["total_input_tokens"] == 40'
then ok "no usage object: tokens counted from chunks, input from the estimate"
else bad "no usage (rc $RC)"; fi

# 4. Poisson arrivals at 40 req/s take a while; many streams at once all complete.
bench r5 --url "http://127.0.0.1:$GOOD" --dataset random --random-input 8 --num-prompts 20 \
  --request-rate 40 --max-tokens 2 --seed 7 --json
if [ $RC -eq 0 ] && check "$TMP/r5.out" 'j["completed"] == 20 and j["request_rate"] == 40 and j["duration_s"] > 0.12'
then ok "Poisson arrivals spread the requests"
else bad "Poisson arrivals (rc $RC)"; fi
bench r6 --url "http://127.0.0.1:$GOOD" --dataset random --random-input 8 --num-prompts 200 \
  --max-tokens 4 --json
if [ $RC -eq 0 ] && check "$TMP/r6.out" 'j["completed"] == 200 and j["failed"] == 0 and j["total_output_tokens"] == 800'
then ok "200 concurrent streams"
else bad "200 concurrent streams (rc $RC)"; head -c 600 "$TMP/r6.out"; cat "$TMP/r6.err"; fi

# 5. tidal: offline stream plus 2 bursts of 3 online requests, classes reported apart.
rm -f "$TMP/good.log"
bench r7 --url "http://127.0.0.1:$GOOD" --dataset random --random-input 8 --num-prompts 10 \
  --concurrency 2 --max-tokens 4 --tidal --burst-size 3 --bursts 2 --burst-interval 0.1 \
  --online-priority -1 --json
if [ $RC -eq 0 ] && check "$TMP/r7.out" '
j["tidal"] and j["completed"] == 16 and j["online"]["completed"] == 6 and
j["offline"]["completed"] == 10 and j["online"]["ttft_ms"]["n"] == 6 and
j["offline"]["total_output_tokens"] == 40' &&
   python3 - "$TMP/good.log" <<'EOF'
import json, sys
reqs = [json.loads(l) for l in open(sys.argv[1])]
off = [r for r in reqs if r.get("offline") is True]
on = [r for r in reqs if "offline" not in r]
assert len(off) == 10 and len(on) == 6, (len(off), len(on))
assert all(r["priority"] == -1 for r in on) and all("priority" not in r for r in off)
EOF
then ok "tidal: 10 offline + 6 online, flags sent, classes apart"
else bad "tidal (rc $RC)"; cat "$TMP/r7.err"; fi
if bench r7t --url "http://127.0.0.1:$GOOD" --dataset random --random-input 8 --num-prompts 4 \
     --max-tokens 2 --tidal --burst-size 2 --bursts 1 --burst-interval 0.05 &&
   [ $RC -eq 0 ] && grep -q "online (bursts)" "$TMP/r7t.out" && grep -q "offline (steady)" "$TMP/r7t.out"
then ok "tidal table has both classes"
else bad "tidal table (rc $RC)"; fi

# 6. goodput under SLOs.
bench r8 --url "http://127.0.0.1:$GOOD" --dataset random --random-input 8 --num-prompts 6 \
  --max-tokens 4 --slo-ttft-ms 100000 --slo-tpot-ms 100000 --json
bench r9 --url "http://127.0.0.1:$GOOD" --dataset random --random-input 8 --num-prompts 6 \
  --max-tokens 4 --slo-ttft-ms 1 --json
if check "$TMP/r8.out" 'j["good_requests"] == 6 and j["request_goodput"] > 0 and j["slo_ttft_ms"] == 100000' &&
   check "$TMP/r9.out" 'j["good_requests"] == 0 and j["completed"] == 6'
then ok "goodput: all meet a loose SLO, none a 1 ms TTFT"
else bad "goodput"; fi
bench r10 --url "http://127.0.0.1:$GOOD" --dataset random --num-prompts 3 --max-tokens 2 --slo-ttft-ms 10000
if [ $RC -eq 0 ] && grep -q "Goodput (req/s):.*3 requests met TTFT <= 10000 ms" "$TMP/r10.out"
then ok "goodput line in the table"
else bad "goodput table line"; cat "$TMP/r10.out"; fi

# 7. failures: every 5th request HTTP 500, every 7th cut after 3 chunks, every 9th malformed.
start_mock flaky --ttft-ms 10 --itl-ms 2 --fail-every 5 --cut-every 7 --bad-every 9
bench f1 --url "http://127.0.0.1:$PORT" --endpoint chat --dataset random --random-input 8 \
  --num-prompts 20 --max-tokens 8 --concurrency 1 --json
if [ $RC -eq 0 ] && check "$TMP/f1.out" '
j["completed"] == 12 and j["failed"] == 8 and "HTTP 500: mock failure 5" in j["first_error"] and
j["errors"] == {"http": 4, "stream_cut": 2, "malformed_sse": 2} and
j["total_output_tokens"] == 12 * 8 and j["ttft_ms"]["n"] == 12'
then ok "failures counted: 4 x HTTP 500, 2 cut streams, 2 malformed"
else bad "failure counting (rc $RC)"; head -c 800 "$TMP/f1.out"; cat "$TMP/f1.err"; fi
bench f2 --url "http://127.0.0.1:$PORT" --endpoint chat --dataset random --random-input 8 \
  --num-prompts 2 --max-tokens 8 --concurrency 1 --json   # requests 21 (cut, 21%7) and 22
bench f3 --url "http://127.0.0.1:$PORT" --endpoint chat --dataset random --random-input 8 \
  --num-prompts 5 --max-tokens 8 --concurrency 1 --json   # 23..27: 25 (500), 27 (malformed)
if check "$TMP/f2.out" 'j["failed"] == 1 and j["first_error"].startswith("stream cut after 3 chunks")' &&
   check "$TMP/f3.out" 'j["failed"] == 2 and j["first_error"] == "HTTP 500: mock failure 25"'
then ok "clear messages: stream cut, malformed SSE"
else bad "failure messages"; cat "$TMP/f2.out" "$TMP/f3.out" | grep first_error; fi

# 8. unreachable server, missing API key: every request fails, rc 1, one clear line, no crash.
start_mock keyed --api-key sekrit
KEYED=$PORT
bench k1 --url "http://127.0.0.1:$KEYED" --model m --dataset random --num-prompts 3 --max-tokens 2
if [ $RC -eq 1 ] && grep -q "xllm bench-serve: all 3 requests failed (first: HTTP 401: invalid api key)" "$TMP/k1.err" &&
   grep -q "Failed requests: *3" "$TMP/k1.out"
then ok "no API key: HTTP 401 counted, rc 1"
else bad "no API key (rc $RC)"; cat "$TMP/k1.err"; fi
bench k2 --url "http://127.0.0.1:$KEYED" --api-key sekrit --dataset random --num-prompts 3 --max-tokens 2 --json
if [ $RC -eq 0 ] && check "$TMP/k2.out" 'j["completed"] == 3'
then ok "--api-key is sent"
else bad "--api-key (rc $RC)"; fi
# a port nothing listens on: bind one, close it, use it
DEAD=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
bench u1 --url "http://127.0.0.1:$DEAD" --dataset random --num-prompts 4 --max-tokens 2 --timeout-s 5
if [ $RC -eq 1 ] && grep -q "all 4 requests failed (first: cannot connect" "$TMP/u1.err" &&
   ! grep -qi "sanitizer\|assert" "$TMP/u1.err"
then ok "unreachable server: $(tail -1 "$TMP/u1.err")"
else bad "unreachable server (rc $RC)"; cat "$TMP/u1.err"; fi

# 9. bad options: one line, rc 1.
expect_err() {
  local d=$1; shift
  timeout 20 "$XLLM" bench-serve "$@" >"$TMP/o" 2>"$TMP/e"; local rc=$?
  if [ $rc -eq 1 ] && [ "$(wc -l <"$TMP/e")" -eq 1 ] && grep -q "xllm bench-serve" "$TMP/e"; then
    ok "error: $d ($(cat "$TMP/e"))"
  else bad "error: $d (rc $rc)"; cat "$TMP/e"; fi
}
expect_err "bad endpoint" --endpoint foo
expect_err "bad rate" --request-rate -3
expect_err "bad url" --url 127.0.0.1:8080
expect_err "unknown option" --frobnicate
expect_err "missing dataset" --dataset-path "$TMP/nope.json"
echo '{"not": "a list"}' >"$TMP/bad.json"
expect_err "dataset not a list" --dataset-path "$TMP/bad.json"
expect_err "bad extra body" --extra-body '[1]'
if "$XLLM" bench-serve --help | grep -q -- "--request-rate"; then ok "--help"; else bad "--help"; fi

echo "# $passes passed, $fails failed"
[ $fails -eq 0 ]

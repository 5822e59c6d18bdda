#!/usr/bin/env bash
# Tidal benchmark of a 3-instance cluster on this machine, in three set-ups one after the other:
#   nopd     3 mixed instances
#   static   1 prefill + 2 decode instances
#   dynamic  1 prefill + 2 decode instances, and the service's dynamic PD controller
# Each runs `xllm bench-serve --tidal`: a steady stream of offline requests (short prompts,
# long answers) with bursts of online requests (long prompts, short answers) over it. One
# thread per instance: on a small machine the figures show behaviour, not capacity.
#
# usage: scripts/bench-cluster-pd.sh [BUILD_DIR] [OUT_DIR]
# env:   MODEL (default: a 25M-parameter llama-shaped Q8_0 made by `xllm gen-model` in OUT_DIR),
#        SETUPS ("nopd static dynamic"), TTFT_SLO_MS (2000), TPOT_SLO_MS (100), RATE (2),
#        NUM (60), BURSTS (4), BURST_SIZE (8), BURST_INTERVAL (5), ONLINE_INPUT (384),
#        ONLINE_OUTPUT (16), INPUT (64), OUTPUT (256), BASE_PORT (18300)
set -euo pipefail
build=${1:-build}
out=${2:-$build/bench-cluster}
xllm=$(cd "$build" && pwd)/xllm
mkdir -p "$out"
shared=${XLLM_SHARED:-$(dirname "$0")/../../shared}
model=${MODEL:-$out/llama-25m-q8_0.gguf}
if [ ! -f "$model" ]; then
  "$xllm" gen-model --arch llama --embd 512 --layers 8 --heads 8 --heads-kv 4 --head-dim 64 \
    --ff 1536 --type q8_0 --tokenizer "$shared/models/stories260K/stories260K.gguf" -o "$model"
fi
etcd_bin=$(command -v etcd || echo /usr/bin/etcd)
port=${BASE_PORT:-18300}
ttft=${TTFT_SLO_MS:-2000}
tpot=${TPOT_SLO_MS:-100}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_http() { # url
  for _ in $(seq 1 300); do
    curl -fs "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench-cluster-pd: $1 did not come up" >&2
  return 1
}

run_setup() { # name roles... (after --)
  local name=$1
  shift
  local dir="$out/$name"
  rm -rf "$dir"
  mkdir -p "$dir"
  local cp=$((port)) pp=$((port + 1))
  "$etcd_bin" --name n1 --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$cp" \
    --advertise-client-urls "http://127.0.0.1:$cp" --listen-peer-urls "http://127.0.0.1:$pp" \
    --initial-advertise-peer-urls "http://127.0.0.1:$pp" --initial-cluster "n1=http://127.0.0.1:$pp" \
    >"$dir/etcd.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$cp/health"
  local i=0
  for role in "$@"; do
    [ "$role" = "--" ] && break
    local ep=$((port + 10 + i))
    "$xllm" engine -m "$model" -t 1 --etcd "http://127.0.0.1:$cp" --name "e$i" --role "$role" \
      --host 127.0.0.1 --port "$ep" >"$dir/engine-$i.log" 2>&1 &
    pids+=($!)
    wait_http "http://127.0.0.1:$ep/health"
    i=$((i + 1))
  done
  local extra=()
  # the controller aims at half the SLOs, so that it moves an instance before they are missed
  [ "$name" = dynamic ] && extra=(--dynamic-pd --pd-ttft-ms $((ttft / 2)) --pd-tpot-ms $((tpot / 2))
    --pd-interval-ms 1000 --pd-cooldown-ms 3000)
  local sp=$((port + 20))
  "$xllm" service -m "$model" --etcd "http://127.0.0.1:$cp" --port "$sp" --policy least-load \
    --ttft-slo-ms "$ttft" --tpot-slo-ms "$tpot" ${extra[@]+"${extra[@]}"} >"$dir/service.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$sp/health"
  sleep 1
  "$xllm" bench-serve --url "http://127.0.0.1:$sp" --dataset random --random-input "${INPUT:-64}" \
    --random-output "${OUTPUT:-256}" --ignore-eos --num-prompts "${NUM:-60}" \
    --request-rate "${RATE:-2}" --tidal --bursts "${BURSTS:-4}" --burst-size "${BURST_SIZE:-8}" \
    --burst-interval "${BURST_INTERVAL:-5}" --online-input "${ONLINE_INPUT:-384}" \
    --online-output "${ONLINE_OUTPUT:-16}" --slo-ttft-ms "$ttft" --slo-tpot-ms "$tpot" -q --json \
    >"$dir/result.json"
  curl -fs "http://127.0.0.1:$sp/metrics" >"$dir/service-metrics.txt" || true
  cleanup
  pids=()
  python3 - "$name" "$dir/result.json" "$dir/service.log" <<'EOF'
import json, sys
name, res, log = sys.argv[1:4]
r = json.load(open(res))
on, off = r.get("online", {}), r.get("offline", {})
sw = sum(1 for line in open(log) if "dynamic PD:" in line and "->" in line)
print("%-8s goodput %.3f req/s (%d/%d good) | online: TTFT p50 %.0f p99 %.0f ms, goodput %.3f "
      "req/s | offline: TPOT p50 %.1f ms, %.1f tok/s | role switches %d" % (
          name, r["request_goodput"], r["good_requests"], r["requests"], on["ttft_ms"]["p50"],
          on["ttft_ms"]["p99"], on["request_goodput"], off["tpot_ms"]["p50"],
          off["output_throughput"], sw))
EOF
}

for s in ${SETUPS:-nopd static dynamic}; do
  case $s in
    nopd) run_setup nopd mixed mixed mixed ;;
    static) run_setup static prefill decode decode ;;
    dynamic) run_setup dynamic prefill decode decode ;;
    *) echo "bench-cluster-pd: unknown set-up $s" >&2; exit 1 ;;
  esac
done

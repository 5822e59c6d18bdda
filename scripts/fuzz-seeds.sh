#!/usr/bin/env bash
# Seeds the corpus of one fuzz target with small valid inputs; writes only into CORPUS_DIR.
# usage: scripts/fuzz-seeds.sh TARGET_NAME CORPUS_DIR   (called by scripts/run-fuzz.sh)
set -euo pipefail
name=${1:?target name}
corpus=${2:?corpus dir}
here=$(cd "$(dirname "$0")" && pwd)
shared=${XLLM_SHARED:-$here/../../shared}
mkdir -p "$corpus"
case "$name" in
  fuzz_gguf)
    python3 "$here/gen-gguf-seeds.py" "$corpus"
    # Small real files from the shared data (most are too large for -max_len and are skipped).
    shopt -s nullglob
    for f in "$shared"/models/vocab/*.gguf "$shared"/models/tiny/*.gguf; do
      if [ "$(stat -c %s "$f")" -lt 65536 ]; then
        cp -f "$f" "$corpus/shared-$(basename "$f")"
        chmod u+w "$corpus/shared-$(basename "$f")"
      fi
    done
    ;;
  fuzz_sse)
    printf ': ping\r\ndata: {"choices":[{"delta":{"content":"hi"}}]}\r\n\r\ndata: a\ndata: b\n\ndata: [DONE]\n\n' \
      >"$corpus/seed-stream"
    ;;
  fuzz_tokenizer)
    # The llama.cpp vocab test strings, each behind a control byte (tokenizer index, special
    # parsing, BOS), plus text with special tokens and invalid UTF-8.
    python3 - "$shared/models/vocab/ggml-vocab-qwen2.gguf.inp" "$corpus" <<'PY'
import sys
inp, out = sys.argv[1], sys.argv[2]
try:
    texts = open(inp, 'rb').read().split(b'\n__ggml_vocab_test__\n')
except OSError:
    texts = []
texts += [b'<|im_start|>user\nHi<|im_end|>\n<think>', b'<s>[INST] hi [/INST]</s>',
          b'\xff\xfe e\xcc\x81 \xe4\xb8\xad\xe6\x96\x87 123456 \r\n\t  x',
          '日本語のテキスト、한국어 텍스트。'.encode()]
for i, t in enumerate(texts):
    for ctl in range(0, 32, 5):
        with open(f'{out}/seed-{i:02d}-{ctl:02d}', 'wb') as f:
            f.write(bytes([ctl]) + t)
PY
    ;;
  fuzz_template)
    # The real chat templates, alone and followed by a request from the test conversations.
    shopt -s nullglob
    for f in "$shared"/models/templates/*.jinja; do
      cp -f "$f" "$corpus/shared-$(basename "$f")"
      chmod u+w "$corpus/shared-$(basename "$f")"
    done
    python3 - "$shared" "$corpus" "$here/../tests/data/chat" <<'PY'
import glob, json, os, sys
shared, corpus, chat = sys.argv[1:4]
cfg = json.load(open(os.path.join(shared, "models/tokenizers/qwen3/tokenizer_config.json")))
with open(os.path.join(corpus, "shared-qwen3.jinja"), "w") as f:
    f.write(cfg["chat_template"])
reqs = sorted(glob.glob(os.path.join(chat, "*.json")))
reqs = [r for r in reqs if not r.endswith("templates.json")]
tmpls = sorted(glob.glob(os.path.join(corpus, "shared-*.jinja")))
for i, t in enumerate(tmpls):
    r = reqs[i % len(reqs)]
    with open(os.path.join(corpus, "pair-" + os.path.basename(t)), "w") as f:
        f.write(open(t).read() + "\n@@@@\n" + open(r).read())
PY
    ;;
  fuzz_kv_frames)
    # Valid KV transfer streams for the target's identity (2 layers, 8-byte rows, context 64),
    # behind the two control bytes (mode: bit 0 = HELLO prepended; cut: piece size - 1).
    python3 - "$corpus" <<'PY'
import struct, sys
out = sys.argv[1]
def frame(t, fid, payload):
    return struct.pack('<IHHIIQ', 0x54564B58, 1, t, 0, len(payload), fid) + payload
hello = frame(1, 0, struct.pack('<QIIIIII', 0x0123456789abcdef, 2, 8, 0, 64, 0, 65536) + b'fuzz'.ljust(16, b'\0'))
def transfer(fid, n, chunk, end=True):
    s = frame(2, fid, struct.pack('<II', n, 0) + b''.join(struct.pack('<i', 100 + i) for i in range(n)))
    for il in range(2):
        for p0 in range(0, n, chunk):
            m = min(chunk, n - p0)
            s += frame(3, fid, struct.pack('<III', il, p0, m) + bytes((il * 31 + j) & 255 for j in range(16 * m)))
    if end:
        s += frame(4, fid, struct.pack('<if', 7, -0.5))
    return s
def abort(fid, msg):
    return frame(5, fid, struct.pack('<II', 1, len(msg)) + msg)
seeds = {
    'hello': (0, hello),
    'one': (0, hello + transfer(1, 5, 5)),
    'chunks': (1, transfer(2, 9, 2)),
    'two': (1, transfer(3, 3, 3, False) + transfer(4, 4, 1) + struct.pack('<B', 0)[:0] + frame(4, 3, struct.pack('<if', 1, 0.0))),
    'abort': (1, transfer(5, 6, 3, False) + abort(5, b'client left')),
    'refused': (3, transfer(6, 8, 8) + transfer(7, 8, 8)),
    'error': (1, frame(7, 0, struct.pack('<II', 2, 3) + b'bye')),
}
for name, (mode, body) in seeds.items():
    for cut in (255, 7):
        with open(f'{out}/seed-{name}-{cut}', 'wb') as f:
            f.write(bytes([mode, cut]) + body)
PY
    ;;
  fuzz_registry_json)
    # One seed per parser (first byte picks it): instance value, range, watch, lease, txn, b64.
    printf '\000{"name":"e1","incarnation":"00000000deadbeef","role":"decode","addr":"127.0.0.1:7000","attrs":{"model":"tiny"}}' >"$corpus/seed-instance"
    printf '\001{"header":{"revision":"7"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"6","version":"4","value":"YmFy","lease":"42"}],"count":"1"}' >"$corpus/seed-range"
    printf '\002{"result":{"header":{"revision":"7"},"events":[{"kv":{"key":"Zm9v","mod_revision":"5","value":"YmFy"}},{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"7"}}]}}' >"$corpus/seed-watch"
    printf '\002{"result":{"header":{"revision":"3"},"created":true}}' >"$corpus/seed-watch-created"
    printf '\002{"result":{"header":{"revision":"9"},"canceled":true,"compact_revision":"5"}}' >"$corpus/seed-watch-compacted"
    printf '\003{"result":{"header":{"revision":"1"},"ID":"4111120279692936711","TTL":"5"}}' >"$corpus/seed-lease"
    printf '\004{"header":{"revision":"3"},"succeeded":true,"responses":[{"response_put":{}}]}' >"$corpus/seed-txn"
    printf '\005L3hsbG0vZGVmYXVsdC9pbnN0YW5jZXMvZGVjb2RlL2Ux' >"$corpus/seed-b64"
    printf '\003{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}' >"$corpus/seed-error"
    ;;
  fuzz_router_kv)
    # load answers with prefix-cache events: incremental, reset, malformed hash
    printf '{"magic":"xllm-rpc","version":1,"waiting":0,"kv":{"block_tokens":64,"hash":"xxh3-chain-v1","next":4294967300,"reset":false,"more":true,"stored":["0123456789abcdef"],"evicted":["fedcba9876543210"]}}' >"$corpus/seed-events"
    printf '{"kv":{"block_tokens":16,"hash":"xxh3-chain-v1","next":5000000000,"reset":true,"more":false,"stored":["00000000000000ff","ffffffffffffffff"],"evicted":[]}}' >"$corpus/seed-reset"
    printf '{"kv":{"block_tokens":16,"hash":"xxh3-chain-v1","next":1,"reset":false,"stored":["0x00000000000000"],"evicted":[]}}' >"$corpus/seed-bad"
    ;;
  fuzz_api_request)
    # valid bodies of both endpoints (first byte: 0 completions, 1 chat)
    printf '0{"prompt":"Once upon a time","max_tokens":16,"stop":[" the","\\n"],"temperature":0}' >"$corpus/seed-completion"
    printf '0{"prompt":[1,403,407],"n":2,"seed":7,"logprobs":3,"stream":true,"stream_options":{"include_usage":true}}' >"$corpus/seed-ids"
    printf '0{"prompt":["a","b"],"stop":"ab","echo":true,"priority":-1,"offline":true,"ttft_slo_ms":100}' >"$corpus/seed-prompts"
    printf '1{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi \\u5927\\u6d77"}],"max_completion_tokens":8,"stop":["<|im"],"logprobs":true,"top_logprobs":2}' >"$corpus/seed-chat"
    printf '1{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"chat_template_kwargs":{"enable_thinking":false},"add_generation_prompt":true}' >"$corpus/seed-parts"
    ;;
  fuzz_rpc)
    # First byte: 0 a generate body, 1 a response line, 2 a response stream (then the line
    # limit / 16, 0 = default, and the seed of the cuts).
    python3 - "$corpus" <<'PY'
import json, sys
out = sys.argv[1]
full = {"magic": "xllm-rpc", "version": 1, "prompt": [1, 403, 407, 0, 31999], "max_tokens": 24,
        "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1,
        "penalty_last_n": 64, "frequency_penalty": -0.5, "presence_penalty": 2.0,
        "seed": "18446744073709551615", "ignore_eos": True, "priority": -3, "offline": False,
        "top_logprobs": 20, "ttft_slo_ms": 250, "tpot_slo_ms": 9223372036854775807}
bodies = {
    "full": full,
    "min": {"magic": "xllm-rpc", "version": 1, "prompt": [5]},
    "export": dict(full, max_tokens=1, pd_export={"id": "12345678901234567890", "to": "127.0.0.1:7100"}),
    "import": dict(full, pd_import={"id": "1"}),
}
lines = [
    {"magic": "xllm-rpc", "version": 1},
    {"t": 403, "lp": -0.25},
    {"t": 7, "lp": None, "top": [[7, -0.125], [8, None], [49999, -17.5]]},
    {"finish": "length", "n_cached": 16, "n_preempted": 1, "t_queue_ms": 0.5, "t_first_ms": 12.75},
    {"finish": "abort"},
]
def dump(o):
    return json.dumps(o, separators=(",", ":")).encode()
for name, b in bodies.items():
    open(f"{out}/seed-body-{name}", "wb").write(b"\x00" + dump(b))
for i, l in enumerate(lines):
    open(f"{out}/seed-line-{i}", "wb").write(b"\x01" + dump(l))
stream = b"".join(dump(l) + b"\n" for l in lines[:4])
for name, ctl in {"whole": b"\x00\x07", "tight": b"\x08\x01", "cut": b"\x00\xc3"}.items():
    open(f"{out}/seed-stream-{name}", "wb").write(b"\x02" + ctl + stream)
open(f"{out}/seed-stream-late", "wb").write(b"\x02\x00\x05" + stream + dump(lines[1]) + b"\n")
PY
    ;;
  *) ;;
esac

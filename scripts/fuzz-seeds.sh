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
  *) ;;
esac

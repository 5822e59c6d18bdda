#!/usr/bin/env bash
# Drives `xllm tokenize`: ids match the reference tokenizations (GGUF and Hugging Face
# directories), stdin is taken byte for byte, the flags do what they say, errors are one line.
set -u
XLLM=${XLLM_BIN:?}
SHARED=${XLLM_SHARED:-${XLLM_SHARED_DEFAULT:?}}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0 passes=0
ok() { passes=$((passes + 1)); echo "ok - $1"; }
bad() { fails=$((fails + 1)); echo "FAIL - $1"; }

QWEN_GGUF="$SHARED/models/tiny/qwen3-qwentok-f16.gguf"
QWEN_DIR="$SHARED/models/tokenizers/qwen3"
LLAMA3_DIR="$SHARED/models/tokenizers/llama3"
STORIES="$SHARED/models/stories260K/stories260K.gguf"

# 1. the Qwen tiny model's reference prompt: special tokens parsed, BOS as the vocab says (none),
#    from the GGUF and from the HF directory
python3 - "$SHARED/models/tiny/refs/qwen3-qwentok-f16.p1.json" "$TMP" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
open(sys.argv[2] + '/prompt.txt', 'wb').write(r['prompt'].encode())
open(sys.argv[2] + '/want.txt', 'w').write(' '.join(map(str, r['prompt_ids'])) + '\n')
PY
for m in "$QWEN_GGUF" "$QWEN_DIR" "$QWEN_DIR/tokenizer.json"; do
  if "$XLLM" tokenize -m "$m" --special --ids <"$TMP/prompt.txt" >"$TMP/got.txt" 2>"$TMP/err.txt" &&
     cmp -s "$TMP/got.txt" "$TMP/want.txt"; then ok "qwen prompt ids ($(basename "$m"))"
  else bad "qwen prompt ids ($(basename "$m"))"; head -3 "$TMP/err.txt"; fi
done

# 2. llama.cpp's vectors, string by string (no BOS, no special parsing): all qwen2 ones with the
#    GGUF vocab, the first 12 llama-bpe ones with Llama 3's tokenizer.json (the unit tests run all)
python3 - "$SHARED/models/vocab" "$TMP" <<'PY'
import sys
vocab, tmp = sys.argv[1], sys.argv[2]
for name, n in (('qwen2', 1000), ('llama-bpe', 12)):
    base = f'{vocab}/ggml-vocab-{name}.gguf'
    texts = open(base + '.inp', 'rb').read().split(b'\n__ggml_vocab_test__\n')[:-1]
    outs = open(base + '.out').read().split('\n')
    for i, t in enumerate(texts[:n]):
        open(f'{tmp}/{name}-{i:02d}.txt', 'wb').write(t)
        open(f'{tmp}/{name}-{i:02d}.want', 'w').write(' '.join(outs[i].split()) + '\n')
PY
check_vectors() { # name, model, minimum count
  local nv=0 nok=0 f
  for f in "$TMP/$1"-*.txt; do
    nv=$((nv + 1))
    "$XLLM" tokenize -m "$2" --no-bos --ids <"$f" >"${f%.txt}.got" 2>/dev/null &&
      cmp -s "${f%.txt}.got" "${f%.txt}.want" && nok=$((nok + 1))
  done
  if [ $nv -ge "$3" ] && [ $nok -eq $nv ]; then ok "$1 vectors ($(basename "$2")): $nok/$nv"
  else bad "$1 vectors ($(basename "$2")): $nok/$nv"; fi
}
check_vectors qwen2 "$QWEN_GGUF" 40
check_vectors llama-bpe "$LLAMA3_DIR" 12

# 3. BOS: Llama 3 adds <|begin_of_text|> unless --no-bos; stories260K (SentencePiece) adds <s>
printf 'Hello world' | "$XLLM" tokenize -m "$LLAMA3_DIR" --ids >"$TMP/o1" 2>/dev/null
printf 'Hello world' | "$XLLM" tokenize -m "$LLAMA3_DIR" --ids --no-bos >"$TMP/o2" 2>/dev/null
if [ "$(cat "$TMP/o1")" = "128000 9906 1917" ] && [ "$(cat "$TMP/o2")" = "9906 1917" ]; then ok "--no-bos"
else bad "--no-bos ($(cat "$TMP/o1") / $(cat "$TMP/o2"))"; fi
printf 'Hello' | "$XLLM" tokenize -m "$STORIES" --ids >"$TMP/o3" 2>/dev/null
if [ "$(cut -d' ' -f1 "$TMP/o3")" = "1" ]; then ok "SentencePiece BOS"; else bad "SentencePiece BOS ($(cat "$TMP/o3"))"; fi

# 4. --special: <|im_start|> is one token only when asked
printf '<|im_start|>' | "$XLLM" tokenize -m "$QWEN_DIR" --ids --special >"$TMP/s1" 2>/dev/null
printf '<|im_start|>' | "$XLLM" tokenize -m "$QWEN_DIR" --ids >"$TMP/s2" 2>/dev/null
if [ "$(cat "$TMP/s1")" = "151644" ] && [ "$(wc -w <"$TMP/s2")" -gt 1 ]; then ok "--special"
else bad "--special ($(cat "$TMP/s1") / $(cat "$TMP/s2"))"; fi

# 5. stdin byte for byte: trailing newlines, CR, NUL and invalid UTF-8 are all tokenized, and the
#    pieces (id<TAB>piece, escaped) spell the input again
printf 'a\r\n\x00b\xff \xe4\xb8\xad\n\n' >"$TMP/raw.bin"
"$XLLM" tokenize -m "$LLAMA3_DIR" --no-bos <"$TMP/raw.bin" >"$TMP/pieces.txt" 2>/dev/null
python3 - "$TMP/raw.bin" "$TMP/pieces.txt" <<'PY' && ok "pieces spell stdin byte for byte" || bad "pieces do not spell stdin"
import re, sys
raw = open(sys.argv[1], 'rb').read()
out = b''
for line in open(sys.argv[2], 'rb').read().split(b'\n')[:-1]:
    tid, piece = line.split(b'\t', 1)
    int(tid)
    def unesc(m):
        s = m.group(0)
        return {b'\\\\': b'\\', b'\\n': b'\n', b'\\r': b'\r', b'\\t': b'\t'}.get(s) or bytes([int(s[2:], 16)])
    out += re.sub(rb'\\\\|\\n|\\r|\\t|\\x[0-9A-F]{2}', unesc, piece)
sys.exit(0 if out == raw else 1)
PY

# 6. empty input: BOS only, or nothing
if [ "$(printf '' | "$XLLM" tokenize -m "$LLAMA3_DIR" --ids)" = "128000" ] &&
   [ -z "$(printf '' | "$XLLM" tokenize -m "$QWEN_DIR" --ids)" ]; then ok "empty input"
else bad "empty input"; fi

# 7. errors: one line naming the problem, exit code 1
expect_err() { # description, then the command
  local d=$1; shift
  "$@" </dev/null >"$TMP/o" 2>"$TMP/e"; local rc=$?
  if [ $rc -eq 1 ] && [ "$(wc -l <"$TMP/e")" -ge 1 ] && grep -q "xllm" "$TMP/e" && ! grep -qi "assert\|sanitizer" "$TMP/e"; then
    ok "error: $d ($(head -1 "$TMP/e"))"
  else bad "error: $d (rc $rc)"; cat "$TMP/e"; fi
}
expect_err "missing file" "$XLLM" tokenize -m "$TMP/nope.gguf"
expect_err "no -m" "$XLLM" tokenize --ids
expect_err "unknown option" "$XLLM" tokenize -m "$QWEN_DIR" --bogus
expect_err "directory without a tokenizer" "$XLLM" tokenize -m "$SHARED/models/templates"
expect_err "WordPiece vocab" "$XLLM" tokenize -m "$SHARED/models/vocab/ggml-vocab-bert-bge.gguf"

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]

#!/usr/bin/env bash
# Drives `xllm gen-model` and `xllm bench`: models written with a GGUF or a Hugging Face
# tokenizer load and tokenize as their source does, a seed fixes the weights, the bench prints
# one JSON object per test with the fields its docs promise, bad input is one line and exit 1.
set -u
XLLM=${XLLM_BIN:?}
SHARED=${XLLM_SHARED:-${XLLM_SHARED_DEFAULT:?}}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0 passes=0
ok() { passes=$((passes + 1)); echo "ok - $1"; }
bad() { fails=$((fails + 1)); echo "FAIL - $1"; }

QWEN_HF="$SHARED/models/tokenizers/qwen3"
LLAMA_HF="$SHARED/models/tokenizers/llama3"
QWEN_GGUF="$SHARED/models/tiny/qwen3-qwentok-f16.gguf"
DIMS=(--arch qwen3 --embd 128 --layers 2 --heads 4 --heads-kv 2 --head-dim 32 --ff 256)
printf 'Hello world! 12345\n\t<|im_start|>user\nCJK \xe4\xbd\xa0\xe5\xa5\xbd caf\xc3\xa9 \xf0\x9f\x8e\x89\r\n' \
  >"$TMP/text.txt"

# 1. a Hugging Face tokenizer folder: the model tokenizes as the folder does, carries its chat
#    template, and its vocab is the folder's
if "$XLLM" gen-model "${DIMS[@]}" --type q8_0 --tokenizer "$QWEN_HF" -o "$TMP/hf.gguf" \
  2>"$TMP/gen.err"; then ok "gen-model with a Hugging Face tokenizer folder"
else bad "gen-model with a Hugging Face tokenizer folder: $(cat "$TMP/gen.err")"; fi
"$XLLM" info -m "$TMP/hf.gguf" >"$TMP/info.txt" 2>&1
if grep -q "tokenizer:    gpt2, 151669 tokens" "$TMP/info.txt" &&
   grep -q "tokenizer.ggml.pre = qwen2" "$TMP/info.txt"; then ok "its vocab and pre-tokenizer"
else bad "info of the model: $(grep tokenizer "$TMP/info.txt" | head -3)"; fi
for sp in "" --special; do
  "$XLLM" tokenize -m "$QWEN_HF" --ids $sp <"$TMP/text.txt" >"$TMP/want.ids" 2>&1
  "$XLLM" tokenize -m "$TMP/hf.gguf" --ids $sp <"$TMP/text.txt" >"$TMP/got.ids" 2>&1
  if [ -s "$TMP/want.ids" ] && cmp -s "$TMP/want.ids" "$TMP/got.ids"; then
    ok "tokenizes as the folder ${sp:-(no special)}"
  else bad "tokenizes differently ${sp}: $(cat "$TMP/want.ids") / $(cat "$TMP/got.ids")"; fi
done
CHAT="$(dirname "$0")/../data/chat/multi_turn.json"
"$XLLM" chat-template -m "$QWEN_HF" -i "$CHAT" >"$TMP/want.tmpl" 2>&1
"$XLLM" chat-template -m "$TMP/hf.gguf" -i "$CHAT" >"$TMP/got.tmpl" 2>&1
if [ -s "$TMP/got.tmpl" ] && cmp -s "$TMP/want.tmpl" "$TMP/got.tmpl"; then
  ok "renders the folder's chat template"
else bad "chat template differs"; fi

# 2. a named shape keeps its vocab (Qwen: 151936 embedding rows for 151669 tokens, the rest
#    unused padding); Llama 3's tokenizer.json and its BOS
if "$XLLM" gen-model --like qwen3-0.6b --layers 1 --type q4_K_M --tokenizer "$QWEN_HF/tokenizer.json" \
  -o "$TMP/q06.gguf" 2>"$TMP/gen.err" &&
  "$XLLM" info -m "$TMP/q06.gguf" 2>&1 | grep -q "tokenizer:    gpt2, 151936 tokens"; then
  ok "a shape's vocab is kept, the tokens padded"
else bad "qwen3-0.6b shape: $(cat "$TMP/gen.err")"; fi
if "$XLLM" gen-model "${DIMS[@]}" --arch llama --type q4_0 --tokenizer "$LLAMA_HF" \
  -o "$TMP/l3.gguf" 2>"$TMP/gen.err"; then
  "$XLLM" tokenize -m "$LLAMA_HF" --ids <"$TMP/text.txt" >"$TMP/want.ids" 2>&1
  "$XLLM" tokenize -m "$TMP/l3.gguf" --ids <"$TMP/text.txt" >"$TMP/got.ids" 2>&1
  if [ "$(cut -d' ' -f1 "$TMP/got.ids")" = 128000 ] && cmp -s "$TMP/want.ids" "$TMP/got.ids"; then
    ok "Llama 3 tokenizer: BOS and ids as the folder"
  else bad "Llama 3 ids: $(cat "$TMP/want.ids") / $(cat "$TMP/got.ids")"; fi
else bad "gen-model with Llama 3's tokenizer: $(cat "$TMP/gen.err")"; fi

# 3. a GGUF tokenizer is copied; the seed fixes the weights
"$XLLM" gen-model "${DIMS[@]}" --type q4_K_M --tokenizer "$QWEN_GGUF" --seed 7 -o "$TMP/a.gguf" 2>/dev/null
"$XLLM" gen-model "${DIMS[@]}" --type q4_K_M --tokenizer "$QWEN_GGUF" --seed 7 -o "$TMP/b.gguf" 2>/dev/null
"$XLLM" gen-model "${DIMS[@]}" --type q4_K_M --tokenizer "$QWEN_GGUF" --seed 8 -o "$TMP/c.gguf" 2>/dev/null
if [ -s "$TMP/a.gguf" ] && cmp -s "$TMP/a.gguf" "$TMP/b.gguf" && ! cmp -s "$TMP/a.gguf" "$TMP/c.gguf" &&
   [ "$(stat -c %s "$TMP/a.gguf")" = "$(stat -c %s "$TMP/c.gguf")" ]; then
  ok "same seed, same file; another seed, other weights"
else bad "seeded files"; fi
"$XLLM" tokenize -m "$QWEN_GGUF" --ids --special <"$TMP/text.txt" >"$TMP/want.ids" 2>&1
"$XLLM" tokenize -m "$TMP/a.gguf" --ids --special <"$TMP/text.txt" >"$TMP/got.ids" 2>&1
if [ -s "$TMP/want.ids" ] && cmp -s "$TMP/want.ids" "$TMP/got.ids"; then ok "GGUF tokenizer copied"
else bad "GGUF tokenizer copy tokenizes differently"; fi

# 4. bench --json: one object per test, decode tests with the weight and read bandwidths
if "$XLLM" bench -m "$TMP/a.gguf" -t 2 -r 2 -p 16 -n 4 -b 1,2 --ctx 16 --steps 2 --json \
  >"$TMP/bench.json" 2>"$TMP/bench.err"; then
  if python3 - "$TMP/bench.json" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
names = [r["test"] for r in rows]
assert names == ["pp16", "tg4", "decode_b1", "decode_b2"], names
for r in rows:
    assert r["threads"] == 2 and r["tokens_per_s"] > 0 and r["stddev"] >= 0, r
    assert isinstance(r["model"], str) and r["cpu"] in ("avx512", "avx2", "scalar"), r
    if r["test"] == "pp16":
        assert "weight_gbs" not in r and "read_gbs" not in r, r
    else:
        assert r["weight_gbs"] > 0 and r["read_gbs"] > 0, r
        assert r["read_gbs_min"] <= r["read_gbs"] <= r["read_gbs_max"], r
EOF
  then ok "bench --json rows and fields"
  else bad "bench --json: $(cat "$TMP/bench.json")"; fi
else bad "bench --json failed: $(cat "$TMP/bench.err")"; fi
"$XLLM" bench -m "$TMP/a.gguf" -t 1 -r 1 -p 8 -n 2 -b 2 --ctx 8 --steps 1 >"$TMP/bench.txt" 2>&1
if grep -q "^read bandwidth (1 threads)" "$TMP/bench.txt" && grep -q "^| pp8 " "$TMP/bench.txt" &&
   grep -Eq "^\| tg2 .*GB/s of .*%\) \|$" "$TMP/bench.txt" &&
   grep -Eq "^\| decode_b2 .*GB/s of .*%\) \|$" "$TMP/bench.txt"; then ok "bench table"
else bad "bench table: $(cat "$TMP/bench.txt")"; fi

# 5. bad input: one line, exit code 1
expect_err() { # expect_err NAME GREP CMD...
  local name=$1 pat=$2
  shift 2
  "$@" >"$TMP/o" 2>"$TMP/e"
  local rc=$?
  if [ $rc -eq 1 ] && [ "$(wc -l <"$TMP/e")" -eq 1 ] && grep -q -- "$pat" "$TMP/e"; then ok "$name"
  else bad "$name (rc $rc): $(head -3 "$TMP/e")"; fi
}
expect_err "gen-model without a tokenizer" "need --tokenizer" \
  "$XLLM" gen-model "${DIMS[@]}" -o "$TMP/x.gguf"
expect_err "gen-model with a missing tokenizer" "no-such" \
  "$XLLM" gen-model "${DIMS[@]}" --tokenizer "$TMP/no-such.gguf" -o "$TMP/x.gguf"
expect_err "gen-model with an unknown shape" "unknown model 'qwen9'" \
  "$XLLM" gen-model --like qwen9 --tokenizer "$QWEN_GGUF" -o "$TMP/x.gguf"
expect_err "bench of a missing file" "xllm bench" "$XLLM" bench -m "$TMP/no-such.gguf"
expect_err "bench -r 0" "bad value" "$XLLM" bench -m "$TMP/a.gguf" -r 0

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]

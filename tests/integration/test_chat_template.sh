#!/usr/bin/env bash
# Drives `xllm chat-template`: a .jinja file, a model folder (tokenizer_config.json) and a GGUF's
# own template render exactly the jinja2 references in tests/data/chat/expected (no newline
# added); a raising template, bad JSON and bad options give a clear error and exit code 1.
set -u
XLLM=${XLLM_BIN:?}
SHARED=${XLLM_SHARED:-${XLLM_SHARED_DEFAULT:?}}
HERE=$(cd "$(dirname "$0")" && pwd)
DATA="$HERE/../data/chat"
NOW=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["now"])' "$DATA/templates.json")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0 passes=0
ok() { passes=$((passes + 1)); echo "ok - $1"; }
bad() { fails=$((fails + 1)); echo "FAIL - $1"; }

same() { # description, expected file, then the command
  local d=$1 want=$2; shift 2
  "$@" >"$TMP/out" 2>"$TMP/err"; local rc=$?
  if [ $rc -eq 0 ] && cmp -s "$TMP/out" "$want"; then ok "$d"
  else bad "$d (rc $rc)"; cat "$TMP/err"; cmp "$TMP/out" "$want" | head -3; fi
}

# 1. --template FILE with explicit tokens
same "llama-3.1 file, tools" "$DATA/expected/llama-3.1__tools_call.txt" \
  "$XLLM" chat-template --template "$SHARED/models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja" \
  -i "$DATA/tools_call.json" --bos-token '<|begin_of_text|>' --eos-token '<|eot_id|>' --now "$NOW"
same "llama-3.2 file, strftime_now pinned" "$DATA/expected/llama-3.2__multi_turn.txt" \
  "$XLLM" chat-template --template "$SHARED/models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja" \
  -i "$DATA/multi_turn.json" --bos-token '<|begin_of_text|>' --eos-token '<|eot_id|>' --now "$NOW"
same "mistral-nemo file, no generation prompt" "$DATA/expected/mistral-nemo__no_gen_prompt.txt" \
  "$XLLM" chat-template --template "$SHARED/models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja" \
  -i "$DATA/no_gen_prompt.json" --bos-token '<s>' --eos-token '</s>'
# request on stdin
same "request on stdin" "$DATA/expected/gemma-2__multi_turn.txt" \
  "$XLLM" chat-template --template "$SHARED/models/templates/google-gemma-2-2b-it.jinja" \
  -i - --bos-token '<bos>' --eos-token '<eos>' <"$DATA/multi_turn.json"

# 2. a model folder: tokenizer_config.json's template and tokens
same "qwen3 folder, thinking off" "$DATA/expected/qwen3__thinking_off.txt" \
  "$XLLM" chat-template -m "$SHARED/models/tokenizers/qwen3" -i "$DATA/thinking_off.json"
same "qwen3 folder, tool calls" "$DATA/expected/qwen3__tools_parallel.txt" \
  "$XLLM" chat-template -m "$SHARED/models/tokenizers/qwen3" -i "$DATA/tools_parallel.json"

# 3. a GGUF's tokenizer.chat_template (the tiny Qwen-tokenizer model carries Qwen3's)
GGUF="$SHARED/models/tiny/qwen3-qwentok-f16.gguf"
if [ -f "$GGUF" ]; then
  same "gguf template" "$DATA/expected/qwen3__system_user.txt" \
    "$XLLM" chat-template -m "$GGUF" -i "$DATA/system_user.json"
fi

# 4. no newline added: the output is exactly the render's bytes
printf '%s' '{"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": false}' >"$TMP/r.json"
printf '%s' '{% for m in messages %}{{ m.content }}{% endfor %}' >"$TMP/t.jinja"
"$XLLM" chat-template --template "$TMP/t.jinja" -i "$TMP/r.json" >"$TMP/o" 2>/dev/null
if [ "$(od -An -c "$TMP/o" | tr -d ' \n')" = "x" ]; then ok "no newline added"
else bad "output is not exactly 'x'"; od -c "$TMP/o"; fi

# 5. errors: a clear first line, exit code 1, nothing on stdout
expect_err() { # description, expected text in the message, then the command
  local d=$1 want=$2; shift 2
  "$@" >"$TMP/o" 2>"$TMP/e"; local rc=$?
  # the first line names the problem (option errors add the usage after it)
  if [ $rc -eq 1 ] && head -1 "$TMP/e" | grep -q "^xllm chat-template: " &&
     head -1 "$TMP/e" | grep -qF -- "$want" && [ ! -s "$TMP/o" ]; then
    ok "error: $d ($(head -1 "$TMP/e"))"
  else bad "error: $d (rc $rc)"; cat "$TMP/e"; fi
}
expect_err "template raises" "Conversation roles must alternate" \
  "$XLLM" chat-template --template "$SHARED/models/templates/google-gemma-2-2b-it.jinja" -i "$DATA/alternation_error.json"
expect_err "system role rejected" "System role not supported" \
  "$XLLM" chat-template --template "$SHARED/models/templates/google-gemma-2-2b-it.jinja" -i "$DATA/system_user.json"
printf '{"messages": [' >"$TMP/bad.json"
expect_err "bad JSON" "bad JSON" "$XLLM" chat-template --template "$TMP/t.jinja" -i "$TMP/bad.json"
printf '{}' >"$TMP/nomsg.json"
expect_err "no messages" "messages" "$XLLM" chat-template --template "$TMP/t.jinja" -i "$TMP/nomsg.json"
printf '{%% for x in %%}' >"$TMP/syntax.jinja"
expect_err "template syntax error" "line 1" "$XLLM" chat-template --template "$TMP/syntax.jinja" -i "$TMP/r.json"
expect_err "missing template" "cannot read" "$XLLM" chat-template --template "$TMP/nope.jinja" -i "$TMP/r.json"
expect_err "missing request" "cannot read" "$XLLM" chat-template --template "$TMP/t.jinja" -i "$TMP/nope.json"
expect_err "folder without config" "tokenizer_config.json" "$XLLM" chat-template -m "$TMP" -i "$TMP/r.json"
expect_err "no template source" "one of -m or --template" "$XLLM" chat-template -i "$TMP/r.json"
expect_err "unknown option" "unknown option" "$XLLM" chat-template --template "$TMP/t.jinja" -i "$TMP/r.json" --bogus

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]

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
  *) ;;
esac

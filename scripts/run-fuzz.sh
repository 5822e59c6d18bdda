#!/usr/bin/env bash
# Runs every libFuzzer target in a build folder for a bounded time each.
# usage: scripts/run-fuzz.sh BUILD_DIR SECONDS
# Corpora live under BUILD_DIR/corpus/<target> (seeded by scripts/fuzz-seeds.sh when present);
# crashes are written under BUILD_DIR/fuzz-artifacts and fail the run.
set -euo pipefail
build=${1:?build dir}
secs=${2:-60}
shopt -s nullglob
targets=("$build"/fuzz_*)
if [ ${#targets[@]} -eq 0 ]; then
  echo "run-fuzz: no fuzz targets in $build" >&2
  exit 1
fi
mkdir -p "$build/fuzz-artifacts"
for t in "${targets[@]}"; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  corpus="$build/corpus/$name"
  mkdir -p "$corpus"
  if [ -x "$(dirname "$0")/fuzz-seeds.sh" ]; then
    "$(dirname "$0")/fuzz-seeds.sh" "$name" "$corpus"
  fi
  # A dictionary tests/fuzz/<target without fuzz_>.dict is used when present.
  extra=()
  dict="$(dirname "$0")/../tests/fuzz/${name#fuzz_}.dict"
  [ -f "$dict" ] && extra+=(-dict="$dict")
  echo "run-fuzz: $name for ${secs}s"
  "$t" -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="$build/fuzz-artifacts/$name-" \
    -max_len=65536 -rss_limit_mb=2048 -timeout=25 ${extra[@]+"${extra[@]}"} "$corpus" \
    2>"$build/fuzz-$name.log" || {
      tail -50 "$build/fuzz-$name.log" >&2
      echo "run-fuzz: $name FAILED" >&2
      exit 1
    }
  grep -E "stat::number_of_executed_(runs|units)|stat::average_exec_per_sec|stat::peak_rss_mb" "$build/fuzz-$name.log" || true
done
echo "run-fuzz: all targets ok"

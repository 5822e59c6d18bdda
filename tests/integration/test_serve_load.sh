#!/usr/bin/env bash
# xllm serve under load: 64 concurrent streams + 16 clients that leave mid-stream, prefix cache
# on and off; no errors, outputs correct, no KV pages held afterwards (serve/test_load.py).
here=$(cd "$(dirname "$0")" && pwd)
exec timeout 500 python3 "$here/serve/test_load.py"

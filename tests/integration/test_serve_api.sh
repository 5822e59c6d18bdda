#!/usr/bin/env bash
# xllm serve over loopback: every endpoint, streamed and not, every error code, greedy outputs
# under concurrency equal to `xllm run`, stop strings, invalid UTF-8 (serve/test_api.py).
here=$(cd "$(dirname "$0")" && pwd)
exec timeout 500 python3 "$here/serve/test_api.py"

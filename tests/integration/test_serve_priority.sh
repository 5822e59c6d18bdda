#!/usr/bin/env bash
# xllm serve priorities: an online request overtakes queued offline work and preempts running
# offline work (serve/test_priority.py).
here=$(cd "$(dirname "$0")" && pwd)
exec timeout 300 python3 "$here/serve/test_priority.py"

#!/usr/bin/env bash
# The official openai npm client (tests/node, version pinned, installed by `make test` with
# npm ci) completes a chat and a streamed chat against xllm serve on qwen3-qwentok-f16.
# Fails (never skips) when Node or the installed client is missing: `make test` installs them.
set -u
here=$(cd "$(dirname "$0")" && pwd)
node_dir="$here/../node"
if ! command -v node >/dev/null || [ ! -d "$node_dir/node_modules/openai" ]; then
  echo "FAIL: node or tests/node/node_modules missing (make node-deps installs them with npm ci)"
  exit 1
fi
exec timeout 300 python3 - "$node_dir" <<'PY'
import os, subprocess, sys
sys.path.insert(0, os.path.join(os.path.dirname(sys.argv[1]), "integration", "serve"))
from serve_lib import QWENTOK, Server, finish, ok
srv = Server(QWENTOK, "-c", "1024", key="sk-node")
env = dict(os.environ, XLLM_URL=srv.url, XLLM_KEY="sk-node")
r = subprocess.run(["node", os.path.join(sys.argv[1], "openai_chat.mjs")], env=env, timeout=240)
ok(r.returncode == 0, "openai npm client: chat and streamed chat")
ok(srv.stop() == 0, "server exits cleanly", "".join(srv.log[-20:]))
finish()
PY

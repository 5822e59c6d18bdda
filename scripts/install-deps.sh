#!/usr/bin/env bash
# Installs the Debian packages xllm needs to build and test, only those missing.
# Runs `apt-get update` once (only when something is missing). Safe to call repeatedly.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config
  libmicrohttpd-dev libjansson-dev libcurl4-openssl-dev libpcre2-dev
  libutf8proc-dev libxxhash-dev libcmocka-dev
  clang libclang-rt-14-dev clang-format
  python3-jinja2
  etcd-server etcd-client
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

# Node and npm run the official openai client test (tests/node); any install of them will do
# (e.g. NodeSource's nodejs, which carries npm), so only the commands are checked.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  missing+=(nodejs npm)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

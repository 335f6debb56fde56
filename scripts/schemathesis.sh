#!/usr/bin/env bash
# Schemathesis against a local diracnet: every check, on the OpenAPI the server publishes.
# Bounded: --max-time SECONDS of generated requests (default 120), loopback only. Starts a
# release server (the DN18-width-16 fixture model, named `m`, with an API key so the auth
# checks run), then stops it. Exit status: Schemathesis's (0 = no failure).
#
#   scripts/schemathesis.sh [SECONDS]
#
# Installs Schemathesis into a virtual environment under ~/.cache/diracnet on first use.
# scripts/schemathesis/hooks.py tells it what a valid image is; schemathesis.toml says which
# rejections of schema-valid requests are semantic (rules JSON Schema cannot express).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-120}"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/diracnet/schemathesis-venv"
if [ ! -x "$venv/bin/st" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==4.32.5"
fi
cargo build --release --locked --bin diracnet
port=18933
key="schemathesis-$$"
work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
DIRACNET_CACHE="$work" DIRACNET_API_KEY="$key" target/release/diracnet serve \
  --host 127.0.0.1 --port "$port" --model m=tests/fixtures/models/dn18w16.safetensors \
  --device cpu --offline --log warn &
pid=$!
for _ in $(seq 300); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
PYTHONPATH=scripts/schemathesis SCHEMATHESIS_HOOKS=hooks \
  timeout $((seconds + 120)) "$venv/bin/st" --config-file scripts/schemathesis/schemathesis.toml \
  run "http://127.0.0.1:$port/openapi.json" --checks all --max-time "$seconds" \
  -H "Authorization: Bearer $key"

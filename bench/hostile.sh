#!/usr/bin/env bash
# Hostile load on loopback, bounded in requests and time: starts a release `diracnet serve`
# with the default limits on MODEL (default: the small DN18-width-16 fixture, so the figures
# are dominated by HTTP and decoding, the parts under attack), runs `hostile bombs` (32
# copies of each bomb) and `hostile storm` (1,024 clients, 20 s), then stops the server.
#
#   bench/hostile.sh [MODEL]   # MODEL: a .pth/.safetensors path (default: the DN18 fixture)
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-tests/fixtures/models/dn18w16_v03.pth}"
port=18931
cargo build --release --locked --bin diracnet --example hostile
cache="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$cache"' EXIT
DIRACNET_CACHE="$cache" target/release/diracnet serve --host 127.0.0.1 --port "$port" \
  --model "m=$model" --device cpu --offline --log warn &
pid=$!
for _ in $(seq 600); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
timeout 600 target/release/examples/hostile bombs --port "$port" --pid "$pid" --copies 32
timeout 600 target/release/examples/hostile storm --port "$port" --clients 1024 --seconds 20

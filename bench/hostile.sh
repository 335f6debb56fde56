#!/usr/bin/env bash
# Hostile load on loopback, bounded in requests and time: starts a release `diracnet serve`
# with the default limits on MODEL (default: DiracNet-18-shaped random weights, written by
# `hostile weights`: the real model's cost, no download), runs `hostile bombs` (32 copies of
# each bomb) and `hostile storm` (capacity with 256 clients, then 1,024 clients that retry at
# once, 20 s each, with a health probe every 200 ms), then stops the server.
#
#   bench/hostile.sh [MODEL]   # MODEL: a .pth/.safetensors path
set -euo pipefail
cd "$(dirname "$0")/.."
port=18931
cargo build --release --locked --bin diracnet --example hostile
work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
model="${1:-}"
if [ -z "$model" ]; then
  model="$work/random18.safetensors"
  target/release/examples/hostile weights --depth 18 "$model"
fi
# 1,024 clients and the server's connections: more descriptors than a default shell allows.
ulimit -n 8192 2>/dev/null || true
DIRACNET_CACHE="$work" target/release/diracnet serve --host 127.0.0.1 --port "$port" \
  --model "m=$model" --device cpu --offline --log warn &
pid=$!
for _ in $(seq 600); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
timeout 600 target/release/examples/hostile bombs --port "$port" --pid "$pid" --copies 32
timeout 600 target/release/examples/hostile storm --port "$port" --pid "$pid" --capacity-clients 256 \
  --clients 1024 --seconds 20

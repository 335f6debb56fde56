#!/usr/bin/env bash
# Hostile load on loopback, bounded in requests and time. Serves MODEL (default: DiracNet-18-
# shaped random weights written by `hostile weights`: the real model's cost, no download) with
# the default limits, and runs against it:
#   1. each memory bomb alone, 32 copies at once, on a fresh server (its peak RSS per bomb type);
#   2. all six bombs together, 32 copies each (192 requests at once);
#   3. `hostile storm`: capacity with 256 clients, then 1,024 clients that retry at once, 20 s
#      each, with a health probe every 200 ms;
#   4. `hostile kserve`: 16 clients sending 15 MB KServe bodies for 20 s, /healthz every 50 ms.
#
#   bench/hostile.sh [MODEL]   # MODEL: a .pth/.safetensors path
set -euo pipefail
cd "$(dirname "$0")/.."
port=18931
cargo build --release --locked --bin diracnet --example hostile
work="$(mktemp -d)"
pid=
trap 'stop; rm -rf "$work"' EXIT
model="${1:-}"
if [ -z "$model" ]; then
  model="$work/random18.safetensors"
  target/release/examples/hostile weights --depth 18 "$model"
fi
# 1,024 clients and the server's connections: more descriptors than a default shell allows.
ulimit -n 8192 2>/dev/null || true

start() {
  DIRACNET_CACHE="$work" target/release/diracnet serve --host 127.0.0.1 --port "$port" \
    --model "m=$model" --device cpu --offline --log warn &
  pid=$!
  for _ in $(seq 600); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "the server did not get ready" >&2
  exit 1
}
stop() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
  fi
}
hostile() { timeout 600 target/release/examples/hostile "$@" --port "$port"; }

for bomb in gif tiff-lzw png16 jpeg-progressive jpeg-progressive-truncated webp-lossless; do
  start
  hostile bombs --pid "$pid" --copies 32 --only "$bomb"
  stop
done
start
hostile bombs --pid "$pid" --copies 32
hostile storm --pid "$pid" --capacity-clients 256 --clients 1024 --seconds 20
hostile kserve --clients 16 --seconds 20

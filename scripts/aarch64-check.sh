#!/usr/bin/env bash
# Cross-compiles the library's tests and the parity suites for aarch64 (Graviton-class
# servers) and runs them under qemu-aarch64 user emulation: the portable kernels (no x86 SIMD)
# must give the same answers there. Speed under emulation means nothing; correctness does.
#
#   scripts/aarch64-check.sh            # needs root for apt-get the first time
#
# Installs (Debian): gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user; and the Rust
# target aarch64-unknown-linux-gnu (rustup). Runs: the unit tests (kernels, preprocessing,
# weights, batcher), tests/weights.rs (logits against PyTorch) and tests/preprocess.rs (pixels
# against OpenCV). The suites that start the server binary as a child process (cli, server)
# are not run: a child aarch64 binary needs binfmt_misc, which a container rarely has.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user \
    || { apt-get update && apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu \
      libc6-dev-arm64-cross qemu-user; }
fi
rustup target add aarch64-unknown-linux-gnu
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --locked --target aarch64-unknown-linux-gnu --lib --test weights --test preprocess

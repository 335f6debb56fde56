#!/usr/bin/env bash
# The one release build of diracnet, shared by the Dockerfiles and CI, so that CI runs the very
# commands the images run.
#
#   docker/build.sh cpu  [--out DIR]     # cargo build --release --locked
#   docker/build.sh cuda [--out DIR]     # cargo build --release --locked --features cuda,cudnn
#
# --out DIR copies the binary to DIR/diracnet (the Dockerfiles build with a cache-mounted target
# directory, so the binary has to be copied out in the same RUN). The binary's path is printed
# on the last line of stdout.
#
# Environment:
#   CUDA_COMPUTE_CAP  cuda only; default 80. candle's kernels are compiled to PTX for this one
#                     capability and JIT-compiled by the driver for any newer GPU (8.0, 8.6, 8.7,
#                     8.9, 9.0, 10.x, 12.x all run a build for 80; the JIT result is cached in
#                     CUDA_CACHE_PATH). Set 86, 89, 90, 100 or 120 for a build that runs on that
#                     capability only: 90 and up build the arch-specific `a` variants (sm_90a …),
#                     which no other GPU loads. Below 80 (75: Turing) also works.
#   CUDAFORGE_THREADS nvcc processes in parallel (default: all cores).
#   CARGO_TARGET_DIR, CARGO_BUILD_JOBS, RUSTFLAGS: as cargo reads them.
#   DIRACNET_BUILD_FEATURES  overrides the feature list (e.g. `cuda` for CUDA without cuDNN).
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

flavour="${1:-}"
[ $# -gt 0 ] && shift
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "build.sh: unknown argument $1" >&2; usage ;;
  esac
done

cd "$(dirname "$0")/.."

case "$flavour" in
  cpu)
    features="${DIRACNET_BUILD_FEATURES-}"
    ;;
  cuda)
    features="${DIRACNET_BUILD_FEATURES-cuda,cudnn}"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
    if ! command -v nvcc >/dev/null 2>&1; then
      echo "build.sh: nvcc not found. Use an NVIDIA CUDA devel image, install the CUDA toolkit," >&2
      echo "          or run scripts/cuda-toolchain.sh and source the env.sh it writes." >&2
      exit 1
    fi
    echo "build.sh: $(nvcc --version | tail -n 1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2
    ;;
  *) usage ;;
esac

args=(build --release --locked --bin diracnet)
[ -n "$features" ] && args+=(--features "$features")
echo "build.sh: cargo ${args[*]}" >&2
cargo "${args[@]}" >&2

bin="${CARGO_TARGET_DIR:-target}/release/diracnet"
[ -x "$bin" ] || { echo "build.sh: $bin was not built" >&2; exit 1; }
if [ -n "$out" ]; then
  mkdir -p "$out"
  cp "$bin" "$out/diracnet"
  bin="$out/diracnet"
fi
echo "$bin"

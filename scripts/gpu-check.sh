#!/usr/bin/env bash
# GPU check of a CUDA build of diracnet on an NVIDIA machine, in one run of a few minutes
# (scripts/gpu_check.py): f32 logits on the GPU against the CPU within 1e-3 x max|logit|, the
# f16/bf16 error and top-1 agreement, and img/s at batch 1, 8, 64, 256 next to PyTorch eager on
# the same card with the same random weights.
#
#   scripts/gpu-check.sh [BIN]      # BIN: the CUDA build (default target/release/diracnet);
#                                   # BIN.xz or BIN.zst is unpacked first
# Environment:
#   OUT      where gpu-check.json goes (default gpu-check-out)
#   DEPTHS   comma list, default 18 (18,34 doubles the time)
#   BATCHES  default 1,8,64,256;  SECONDS_PER_POINT  default 3
#   PYTHON   an interpreter with PyTorch (CUDA); default python3
#   CUDA_LIBS extra directories with the CUDA 13 libraries the binary links (libcudart.so.13,
#            libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudnn.so.9);
#            pip's nvidia-* wheels in PYTHON's site-packages are searched automatically.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:-target/release/diracnet}"
out="${OUT:-gpu-check-out}"
python="${PYTHON:-python3}"
mkdir -p "$out"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total \
  --format=csv,noheader || echo "gpu-check: nvidia-smi not found" >&2

case "$bin" in
  *.xz)  xz -dc "$bin" > "$out/diracnet"; bin="$out/diracnet"; chmod +x "$bin" ;;
  *.zst) zstd -dqc "$bin" > "$out/diracnet"; bin="$out/diracnet"; chmod +x "$bin" ;;
esac
[ -x "$bin" ] || { echo "gpu-check: $bin is not an executable" >&2; exit 2; }

# The CUDA libraries: the system's, CUDA_LIBS, then any nvidia-* wheels next to PyTorch.
wheel_libs="$("$python" - <<'PY' 2>/dev/null || true
import glob, os, site, sysconfig
roots = set(site.getsitepackages() + [sysconfig.get_paths()["purelib"]])
dirs = sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "nvidia", "*", "lib", "lib*.so*"))})
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}${CUDA_LIBS:+$CUDA_LIBS:}$wheel_libs"
missing="$(ldd "$bin" | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')"
# cuRAND (133 MB) is linked through candle but never called by diracnet; PyTorch's CUDA 13
# wheels no longer bring it. A stub with the binary's cuRAND symbols satisfies the loader.
case " $missing " in
  *" libcurand.so.10 "*)
    if command -v cc >/dev/null 2>&1; then
      stub_dir="$(mktemp -d)"
      nm -D --undefined-only "$bin" | awk '$2 ~ /^curand/ {print "int " $2 "(void) { return 1; }"}' \
        > "$stub_dir/curand_stub.c"
      cc -shared -fPIC -w -Wl,-soname,libcurand.so.10 -o "$stub_dir/libcurand.so.10" "$stub_dir/curand_stub.c"
      export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$stub_dir"
      echo "gpu-check: libcurand.so.10 not installed; using a stub (diracnet never calls cuRAND)" >&2
      missing="$(ldd "$bin" | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')"
    fi ;;
esac
if [ -n "$missing" ]; then
  echo "gpu-check: the binary's libraries are missing: $missing" >&2
  echo "  install the CUDA 13 runtime libraries (e.g. pip install 'nvidia-cuda-runtime==13.0.*'" \
       "'nvidia-cublas==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-curand==10.4.*'" \
       "'nvidia-cudnn-cu13==9.*') or point CUDA_LIBS at them" >&2
  exit 2
fi
"$bin" --version

exec timeout 600 "$python" scripts/gpu_check.py --bin "$bin" --out "$out" \
  --depths "${DEPTHS:-18}" --batches "${BATCHES:-1,8,64,256}" --seconds "${SECONDS_PER_POINT:-3}"

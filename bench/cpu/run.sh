#!/usr/bin/env bash
# CPU comparison of `diracnet bench` with ONNX Runtime (and PyTorch channels_last, OpenVINO).
#
#   bench/cpu/run.sh [--binary PATH] [--with-torch | --torch-python PY] [--openvino] [--python PY]
#                    [--seconds S] [--rounds R] [--depth 18|34|both] [--batches 1,8,32]
#                    [--threads T] [--conv-impl fast[,winograd,direct,candle]|default] [--warmup N]
#                    [--bf16 [--bf16-conv-impl fast,winograd,direct] [--bf16-cpu-isa auto,avx512]]
#                    [--no-ours] [--no-ort] [--skip-check] [--out DIR]
#
# - Makes the venv bench/cpu/.venv from PyPI (requirements.txt) the first time.
# - --with-torch also installs torch into that venv (from PyPI; set TORCH_EXTRA_INDEX_URL,
#   e.g. https://download.pytorch.org/whl/cpu, for the small CPU-only wheel), or use
#   --torch-python to take PyTorch from another Python (it needs torch and numpy only).
# - --openvino installs openvino into that venv (from PyPI) and adds it as a system; it runs the
#   same ONNX file as ONNX Runtime.
# - --bf16 adds `diracnet --dtype bf16` (a CPU with AVX512-BF16), and PyTorch bf16 / OpenVINO
#   bf16 when those are in the run; their logits are held to 1.5 % of the largest, not 1e-3.
#   --bf16-conv-impl and --bf16-cpu-isa give one bf16 row per pair (`--cpu-isa avx512` leaves
#   AMX out: AMX against AVX512-BF16 on one CPU).
# - Without --binary, builds `cargo build --release --bin diracnet` first.
# - Writes DN18/DN34 random weights (safetensors) and the same networks as ONNX into
#   bench/out/cpu/models (reused), checks every system's logits against a NumPy float64
#   reference, then runs all systems interleaved and prints the table.
# - Results: bench/out/cpu/<UTC time>/results.jsonl (one JSON line per process) and table.md.
# Defaults: 6 s per process, 3 rounds, both depths, batches 1,8,32, 2 threads, --conv-impl fast.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
binary=""
with_torch=0
openvino=0
torch_python=""
args=()

while (($#)); do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --binary=*) binary="${1#*=}"; shift ;;
    --with-torch) with_torch=1; shift ;;
    --torch-python) torch_python="$2"; shift 2 ;;
    --torch-python=*) torch_python="${1#*=}"; shift ;;
    --openvino) openvino=1; args+=("$1"); shift ;;
    --python) python="$2"; shift 2 ;;
    --python=*) python="${1#*=}"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ ! -x "$venv/bin/python" ]]; then
  echo "creating $venv" >&2
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import onnxruntime, onnx, numpy, safetensors' 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install -r "$here/requirements.txt"
fi
if ((openvino)) && ! "$venv/bin/python" -c 'import openvino' 2>/dev/null; then
  "$venv/bin/python" -m pip install openvino
fi
if ((with_torch)) && [[ -z "$torch_python" ]]; then
  if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    "$venv/bin/python" -m pip install ${TORCH_EXTRA_INDEX_URL:+--extra-index-url "$TORCH_EXTRA_INDEX_URL"} torch
  fi
  torch_python="$venv/bin/python"
fi

if [[ -z "$binary" ]]; then
  (cd "$repo" && cargo build --release --bin diracnet)
  target_dir="$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
    "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
  binary="$target_dir/release/diracnet"
fi

exec "$venv/bin/python" "$here/bench.py" --binary "$binary" \
  ${torch_python:+--torch-python "$torch_python"} ${args[@]+"${args[@]}"}

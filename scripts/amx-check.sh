#!/usr/bin/env bash
# First run of the bf16 AMX path on a CPU with AMX (issue 13), in one go: the CPU, the AMX tests
# (the tile kernel, the direct conv reading its tiles from the map, whole-model bf16 parity),
# per-layer times with AMX and with AVX512-BF16 alone, whole passes against PyTorch bf16 and
# OpenVINO bf16 (bench/cpu/run.sh), a batch-1 pass layer by layer (`bench --profile`), and, where
# cores have two threads, one thread per core.
#
#   scripts/amx-check.sh [--quick]     # --quick: DiracNet-18 only, 1 round of 4 s per point
# Environment: OUT (default amx-check-out) gets every log and the benchmark's table.
# On a CPU without AMX it still runs, and says so: the AMX tests print SKIPPED, and the "auto"
# rows equal the "avx512" ones.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-amx-check-out}"
mkdir -p "$out"
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1

{ lscpu | grep -E '^(Model name|CPU family|Model|Thread|Core|Socket|CPU\(s\))'
  echo "ISA: $(grep -m1 -ow -E 'avx512f|avx512_bf16|amx_tile|amx_bf16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  uname -r
  git log -1 --oneline; } | tee "$out/cpu.txt"
grep -qw amx_bf16 /proc/cpuinfo ||
  echo "amx-check: this CPU has no amx_bf16: the AMX tests will be SKIPPED, and nothing here measures AMX" >&2

cargo build --release --bin diracnet
echo "== AMX and bf16 tests" >&2
failed=0
cargo test --release --lib -- bf16 amx --nocapture > "$out/tests-lib.log" 2>&1 || failed=1
cargo test --release --test weights -- bf16 --nocapture > "$out/tests-weights.log" 2>&1 || failed=1
grep -hE '^test |SKIPPED|panicked|test result' "$out/tests-lib.log" "$out/tests-weights.log" || true
((failed)) && echo "amx-check: a test FAILED (logs in $out/); measuring anyway" >&2

echo "== per layer: AMX (auto), then AVX512-BF16 alone (--cpu-isa avx512)" >&2
seconds=0.5; batches=1,8,32
((quick)) && { seconds=0.3; batches=1,8; }
for isa in auto avx512; do
  extra=(); [[ $isa == auto ]] || extra=(--cpu-isa "$isa")
  cargo run --release --example conv -- --batches "$batches" --seconds "$seconds" ${extra[@]+"${extra[@]}"} \
    2>/dev/null | tee "$out/conv-$isa.txt"
done

echo "== where a batch-1 bf16 pass goes, with AMX (auto) and AVX512-BF16 alone" >&2
for isa in auto avx512; do
  target/release/diracnet --cpu-isa "$isa" bench -m random:18 --dtype bf16 --batch 1 --seconds 4 \
    --profile 2>/dev/null | tee "$out/profile-$isa.txt"
done

echo "== whole passes against PyTorch bf16 and OpenVINO bf16" >&2
bench=(--with-torch --openvino --bf16 --bf16-conv-impl "fast,winograd" --bf16-cpu-isa "auto,avx512"
       --out "$out/cpu")
if ((quick)); then bench+=(--depth 18 --rounds 1 --seconds 4); else bench+=(--depth both --rounds 2 --seconds 5); fi
bench/cpu/run.sh "${bench[@]}"
# Two hyperthreads share their core's AMX unit: one thread per core may do as well or better.
per_core="$(lscpu | awk -F: '/^Thread\(s\) per core/ {gsub(/ /, "", $2); print $2}')"
if [[ "${per_core:-1}" -gt 1 ]]; then
  cores=$(( $(nproc) / per_core ))
  echo "== bf16 DN18 with one thread per core ($cores) and one per logical CPU ($(nproc))" >&2
  for threads in "$cores" "$(nproc)"; do
    for batch in 1 8; do
      target/release/diracnet bench -m random:18 --dtype bf16 --batch "$batch" --threads "$threads" \
        --seconds 4 --json 2>/dev/null
    done
  done | tee "$out/threads.jsonl"
fi
echo "amx-check: logs and tables in $out/" >&2
exit "$failed"

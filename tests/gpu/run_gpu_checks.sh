#!/usr/bin/env bash
# Every GPU check and benchmark of megatron_ext on one CUDA machine, results into one folder.
#
#   bash tests/gpu/run_gpu_checks.sh [OUTPUT_DIR]        (default: benchmarks/results)
#
# Budget: GPU_CHECKS_BUDGET_S seconds in all (default 540, so it ends inside a 10-minute slot).
# GPU_CHECKS_TESTS_RESERVE_S is the part of it kept for the gpu-marked tests (default 100).
# GPU_CHECKS_BENCH_ARGS adds arguments to the benchmark (e.g. "--steps 20", or for a CPU rehearsal
# "--tiny --cpu --shapes 32x2 --steps 2 --warmup 1").
# In priority order it runs
#   1. the training-step benchmark (benchmarks/train_step.py): megatron_ext's default path, the
#      Hugging Face baselines (eager, Liger Kernel, torch.compile, torch.compile with SDPA's
#      causal flag) and the candidate for the
#      default (weight gradients into main_grad) at 4,096 x 2 and 8,192 x 1, then shape by shape
#      the attributions (megatron_ext with the stock RowParallelLinear, i.e. the compiled layers
#      in pieces; with megatron-core's gradient norm and clip; with the fast path off; with
#      torch's default AdamW update), then the recipe_1b preset (GQA, context 8,192, its
#      recompute settings) for its memory; every megatron_ext run records its peak memory next
#      to the dry-run estimate for one GPU; jobs that no longer fit the budget are listed as
#      skipped;
#   2. the gpu-marked tests (tests/gpu: the fast path's numerics, then fused AdamW and background
#      checkpoint saves on CUDA), with the time that is left (GPU_CHECKS_TESTS_RESERVE_S reserved).
# Written to OUTPUT_DIR: environment.txt, benchmark.log, train_step.json, train_step.md,
# gpu_tests.log. Reports are rewritten after every benchmark job, so a cut-off run keeps what
# finished.
#
# Machines without a package index: put the wheels of megatron-core 0.16.1 (and, for the Liger
# baseline, liger-kernel 0.8.5) for the machine's Python into .whl/ in the repository root (see
# benchmarks/train_step.py for the pip download command); they are installed beside the site
# packages (pip --no-index --target) before anything runs.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
out="${1:-$repo/benchmarks/results}"
mkdir -p "$out"
budget="${GPU_CHECKS_BUDGET_S:-540}"
tests_reserve="${GPU_CHECKS_TESTS_RESERVE_S:-100}"
start=$(date +%s)
python=python3

export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Install only the wheels whose distribution is not installed already.
missing=()
for wheel in .whl/*.whl; do
    [[ -e "$wheel" ]] || continue
    dist="$(basename "$wheel" | cut -d- -f1)"
    if ! $python -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" \
        2>/dev/null; then
        missing+=("$wheel")
    fi
done
if (( ${#missing[@]} )); then
    site=/tmp/megatron_ext_site
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${missing[@]}" || { echo "installing ${missing[*]} failed" >&2; exit 1; }
    export PYTHONPATH="$site:$PYTHONPATH"
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    $python - <<'EOF'
import importlib.util
from importlib.metadata import PackageNotFoundError, version

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "megatron-core", "liger-kernel", "transformer-engine"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "absent")
print("apex", "present" if importlib.util.find_spec("apex") else "absent")
if torch.cuda.is_available():
    # The card's two ceilings as found (random data, CUDA events, median of 10 after 3 warm-ups).
    def median_ms(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    print(f"bf16 {n}^3 matmul: {2 * n**3 / median_ms(lambda: a @ b) / 1e9:.0f} TFLOP/s")
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    rate = 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e9
    print(f"device-to-device copy: {rate:.2f} TB/s (bytes read + written)")
EOF
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

elapsed=$(( $(date +%s) - start ))
bench_budget=$(( budget - tests_reserve - elapsed ))
if (( bench_budget < 1 )); then bench_budget=1; fi  # 0 would mean "no budget"
echo "== benchmark (budget ${bench_budget} s)"
# shellcheck disable=SC2086  # GPU_CHECKS_BENCH_ARGS is a list of words
$python benchmarks/train_step.py --out-dir "$out" --time-budget-s "$bench_budget" \
    --memory-config examples/configs/recipe_1b.yaml ${GPU_CHECKS_BENCH_ARGS:-} \
    2>&1 | tee "$out/benchmark.log"
bench_status=${PIPESTATUS[0]}

elapsed=$(( $(date +%s) - start ))
tests_budget=$(( budget - elapsed ))
if (( tests_budget < 30 )); then tests_budget=30; fi
echo "== gpu tests (budget ${tests_budget} s)"
timeout "$tests_budget" $python -m pytest -q -m gpu tests/gpu \
    2>&1 | tee "$out/gpu_tests.log"
tests_status=${PIPESTATUS[0]}

echo "== done in $(( $(date +%s) - start )) s: benchmark exit ${bench_status}, tests exit ${tests_status}"
echo "results in $out"
exit $(( bench_status != 0 || tests_status != 0 ))

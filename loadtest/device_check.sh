#!/usr/bin/env bash
# One prepared run for a lent CUDA machine (the `device` tool, 15 minutes of device time per
# task): the CUDA tests, then the synthetic real-shape sweep, with CUDA graphs and (two levels)
# without. The machine's image holds torch, transformers and pytest; the real weights cannot
# travel, hence engine/synthetic.py.
#
#   device run, command: bash loadtest/device_check.sh, timeout_s: 540
#   bash loadtest/device_check.sh --shapes tiny      # a dry run on any CPU (CUDA tests skip)
#
# Everything it prints also lands in $OUT (or /tmp/device-check), which the tool brings back.
set -uo pipefail
out=${OUT:-/tmp/device-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/machine.txt"
"$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
transformers.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tee -a "$out/machine.txt"

timeout 180 "$python" -m pytest -q -p no:cacheprovider -rs tests/engine/test_cuda.py \
    tests/engine/test_device.py 2>&1 |
    tee "$out/tests.log"
tests=${PIPESTATUS[0]}

timeout 240 "$python" -m engine.synthetic_bench --out "$out/synthetic_bench.json" "$@" 2>&1 |
    tee "$out/synthetic_bench.log"
bench=${PIPESTATUS[0]}

# Two levels again with every forward eager: what the CUDA graphs buy.
timeout 100 "$python" -m engine.synthetic_bench --out "$out/synthetic_bench_eager.json" "$@" \
    --no-cuda-graphs --concurrency 1 8 --no-profile 2>&1 |
    tee "$out/synthetic_bench_eager.log"
eager=${PIPESTATUS[0]}

echo "tests exit $tests, bench exit $bench, eager bench exit $eager" | tee -a "$out/machine.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$eager" -eq 0 ]

#!/usr/bin/env bash
# One call on a CUDA machine whose Python already holds torch and triton (a lent GPU image):
# install lowrank without touching them, then run STEP and leave its results in RESULTS.
#
#   bash benchmarks/gpu_run.sh tests    # compiled-kernel tests (bf16, fp16, fp32; every regime)
#   bash benchmarks/gpu_run.sh bench    # the lora_linear grid for BUDGET_S seconds (--resume)
#   bash benchmarks/gpu_run.sh extra    # recompose benchmark and the lora_linear plot + table
#
# Wheels in .whl/ (lycoris-lora, tensorly, toml: packages the image lacks) are installed first.
# RESULTS (default benchmarks/results) receives the result files; on a lent machine set it to
# $OUT. `bench` exits 3 when its budget ran out with points left: copy lora_linear-cuda.json
# back into benchmarks/results/ and call again; exit 0 means the grid is complete.
set -euo pipefail
step=${1:?usage: gpu_run.sh tests|bench|extra}
results=${RESULTS:-benchmarks/results}
budget=${BUDGET_S:-540}
python=${PYTHON:-python3}
case "$step" in tests | bench | extra) ;; *) echo "unknown step: $step (tests, bench or extra)" >&2; exit 2 ;; esac
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" -m pip install -q --no-deps --no-build-isolation -e .
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
mkdir -p "$results"

case "$step" in
    tests)
        "$python" -m pytest -q -p no:cacheprovider tests/test_lora_linear.py \
            tests/test_lora_dropout.py 2>&1 | tee "$results/gpu-tests.log"
        ;;
    bench)
        [ "$results" -ef benchmarks/results ] || cp benchmarks/results/lora_linear-cuda.json \
            "$results"/ 2>/dev/null || true
        "$python" benchmarks/lora_linear.py --resume --budget-s "$budget" \
            --out "$results/lora_linear-cuda.json"
        ;;
    extra)
        "$python" benchmarks/recompose.py  # writes benchmarks/results/recompose-cuda.json
        [ "$results" -ef benchmarks/results ] || cp benchmarks/results/recompose-cuda.* "$results"/
        "$python" benchmarks/plot_lora_linear.py --json "$results/lora_linear-cuda.json" \
            --png "$results/lora_linear-cuda.png"
        ;;
esac

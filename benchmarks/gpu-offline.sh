#!/usr/bin/env bash
# The GPU checks on a CUDA machine with no network: the `gpu`-marked tests and the benchmarks.
#
#   bash benchmarks/gpu-offline.sh [OUT]     # OUT: where numbers, logs and plots go
#
# The machine's own python3 must hold torch (CUDA), transformers and pytest. What it lacks
# travels beside the checkout: wheels in .whl/ (lmcheck's own wheel among them, built with
# `pip wheel --no-deps . -w .whl`) and the verified assets in .gpucache/ (a copy of the
# LMCHECK_CACHE folder). With a network, `python3 dev.py gpu` does the same in a fresh venv.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LMCHECK_CACHE=$PWD/.gpucache LMCHECK_GPU_OUT=$out
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/lmcheck-site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/lmcheck-site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
# Five minutes in all: 180 s of benchmarks (chapter 4's training ones first: time to memorization
# with its MFU against the measured bf16 square-matmul peak, then whether torch.compile pays),
# then 120 s for the gpu tests.
timeout "${LMCHECK_BENCH_TIMEOUT:-180}" python3 -m pytest benchmarks/test_bench_training.py benchmarks \
    --benchmark-only -p no:cacheprovider \
    --benchmark-json="$out/benchmarks.json" 2>&1 | tee "$out/bench.log"
bench=$?
timeout "${LMCHECK_GPU_TIMEOUT:-120}" python3 -m pytest -m gpu -v -rs -p no:cacheprovider --durations=5 \
    -o log_cli=true --log-cli-level=INFO --junitxml="$out/gpu-tests.xml" 2>&1 | tee "$out/gpu.log"
tests=$?
echo "benchmarks exit $bench, gpu tests exit $tests"
exit $(( bench || tests ))

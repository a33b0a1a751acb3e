#!/usr/bin/env bash
# One-shot GPU check: every `gpu`-marked test and the GPU benchmarks, figures (with the device name)
# written to benchmarks/results/. Works in our venv or in any environment with torch (+ CuPy).
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh        # our venv
#   benchmarks/gpu_check.sh                                # a preinstalled torch: python3
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
status=0
"$PY" -c "import fastmem.pipelines, fastmem.kernels" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "gpu_check: could not install fastmem"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu_device.txt"
echo "== gpu tests =="
"$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests.log" || status=1
echo "== k-NN benchmark (CuPy kernels vs torch vs faiss-gpu) =="
"$PY" benchmarks/knn_gpu.py || status=1
echo "== loader benchmark (device pipeline; DALI GPU when installed) =="
"$PY" benchmarks/loaders.py --device cuda --sizes 32,64 --samples 50000 --seconds 2 --repeats 1 \
  --warmup-batches 20 --backends device,dali || status=1
echo "== train-step benchmark =="
"$PY" benchmarks/train_step.py --device cuda || status=1
exit $status

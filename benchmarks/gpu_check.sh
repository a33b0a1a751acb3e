#!/usr/bin/env bash
# One-shot GPU check (about 9 minutes): every `gpu`-marked test and the GPU benchmarks — CuPy k-NN
# kernels, loaders (device pipeline; DALI GPU when installed), train step with loader wait, probe
# extraction eager vs TensorRT (when torch-tensorrt is installed), the paper's run against the
# reference setup (projected 10,000-epoch wall time). Figures go to benchmarks/results/,
# every file named after the GPU (e.g. train_step-gpu-H100.json, gpu_tests-H100.log).
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh        # our venv
#   benchmarks/gpu_check.sh                                # a preinstalled torch (+ CuPy): python3
# COMPILE_STAGE=1 adds the torch.compile modes (about 5 more minutes: a second call).
# Each stage has a time cap (seconds; STAGE_SCALE=2 doubles them all); a stage that fails or runs
# out of time marks the check failed and the next stage still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SCALE=${STAGE_SCALE:-1}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
status=0
started=$(date +%s)
"$PY" -c "import fastmem.pipelines, fastmem.kernels" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "gpu_check: could not install fastmem"; exit 1; }
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
# The model in the GPU's name, as benchmarks/machine.py's results_tag: 'NVIDIA H100 80GB HBM3' → H100.
tag=$(echo "$gpu" | sed 's/NVIDIA//' | tr ' ' '\n' | grep '[0-9]' | grep -m1 '[A-Za-z]' | tr -cd 'A-Za-z0-9_-')
tag=${tag:-$(echo "$gpu" | sed 's/NVIDIA//' | xargs | tr -c 'A-Za-z0-9\n' '-')}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu_device-$tag.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$RESULTS/gpu_device-$tag.txt"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$(( $2 * SCALE )) t0
  shift 2
  echo "== $name (cap ${limit}s) =="
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s =="
  if [ $rc -ne 0 ]; then status=1; fi
}

stage "gpu tests (pytest -m gpu)" 210 bash -c \
  "'$PY' -m pytest -q -rP -m gpu tests/ -p no:cacheprovider 2>&1 | tee '$RESULTS/gpu_tests-$tag.log'; exit \${PIPESTATUS[0]}"
stage "k-NN benchmark (CuPy kernels vs torch vs faiss-gpu)" 60 "$PY" benchmarks/knn_gpu.py
stage "loader benchmark (device pipeline; DALI GPU when installed)" 45 \
  "$PY" benchmarks/loaders.py --device cuda --sizes 32,64 --samples 50000 --seconds 2 --repeats 1 \
  --warmup-batches 20 --backends device,dali
# Train step, the rows without compiling (fp32 NCHW, channels_last, bf16, fused Adam, CUDA graph) and the loader
# wait per pipeline; the compile modes are a separate, slow stage (COMPILE_STAGE=1) kept for a second call.
stage "train-step benchmark (eager rows, CUDA graph, loader wait)" 90 \
  "$PY" benchmarks/train_step.py --device cuda --no-compile --pipelines device
stage "extraction benchmark (eager vs TensorRT when installed)" 45 "$PY" benchmarks/extract.py --device cuda
# The paper's sizes (50,000 × 32 px, ResNet-18 + B = 65,536, batch 256, exact probe of every layer every 50
# epochs); 15 s of training per half, plus data, warm-up and the epoch-0 probes (the exact probe of the 65,536-d
# head layer spills to disk: the least known part of the stage).
stage "paper run (fastmem vs the reference setup, projected 10,000 epochs)" 120 \
  "$PY" benchmarks/paper_run.py --device cuda --seconds 15
if [ "${COMPILE_STAGE:-0}" = 1 ]; then
  stage "train-step benchmark (torch.compile modes, ResNet-18)" 300 \
    "$PY" benchmarks/train_step.py --device cuda --models resnet18 --compile-modes default,reduce-overhead,max-autotune \
    --pipelines "" --out "$RESULTS/train_step-compile-gpu-$tag.json"
fi
echo "gpu_check: $gpu, $(( $(date +%s) - started ))s in all, status $status"
exit $status

#!/usr/bin/env bash
# Every GPU figure BENCHMARKS.md and RELIABILITY.md ask for, in one call of at most 9.5 minutes.
#
# Written for the workplace's lent H100/H200 (jax[cuda], torch and torchvision installed; no
# TensorFlow, no ml_collections, no network). Before the call, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       ml_collections==1.1.0
# then run `bash benchmarks/gpu_session.sh` there with `.whl` carried. Each step has its own
# time limit, so one slow compilation cannot eat the others' time; the log goes to stdout and,
# where $OUT is set, to $OUT/gpu_session.log.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "${OUT:-/tmp}/gpu_session.log") 2>&1

# step LIMIT_S COMMAND...: runs COMMAND under a time limit, without absl's INFO/WARNING lines.
step() {
  local limit=$1; shift
  echo; echo "== $(date +%T) $*"
  timeout "$limit" "$@" 2>&1 | grep -v -E "^[IW][0-9]{4} "
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"

# 1. ResNet-50, bfloat16, batch 256, synthetic data on the device: resnet_jax against PyTorch
#    (channels-last, autocast), eager and compiled, alternating in one process.
step 120 python3 benchmarks/torch_baseline.py --model=resnet50 --batch=256 --dtype=bfloat16 \
  --compare --steps=20 --repeats=5
step 100 python3 benchmarks/torch_baseline.py --model=resnet50 --batch=256 --dtype=bfloat16 \
  --compile=default --steps=20 --repeats=5
step 180 python3 benchmarks/torch_baseline.py --model=resnet50 --batch=256 --dtype=bfloat16 \
  --compile=max-autotune --steps=20 --repeats=5

# 2. CIFAR ResNet-20 and ResNet-110 at batch 128 with the on-device input pipeline in the
#    step: 64,000 steps at the median step time must take at most 2 and 10 minutes.
step 45 python3 -m resnet_jax.benchmark --model=cifar_resnet20 --batch=128 --steps=200 \
  --repeats=5 --input_pipeline
step 60 python3 -m resnet_jax.benchmark --model=cifar_resnet110 --batch=128 --steps=100 \
  --repeats=5 --input_pipeline

# 3. What XLA's deterministic GPU ops cost (RELIABILITY.md), against the runs above.
XLA_FLAGS=--xla_gpu_deterministic_ops=true step 40 python3 -m resnet_jax.benchmark \
  --model=cifar_resnet20 --batch=128 --steps=200 --repeats=5

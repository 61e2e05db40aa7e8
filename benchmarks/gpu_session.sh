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
#
# `bash benchmarks/gpu_session.sh --check` runs every step on the CPU with tiny sizes and ten
# times the time limits: the check, before a GPU call, that the script runs in an environment
# like the GPU image's. Make one here with Python 3.12 and what that image holds (jax 0.11.2,
# flax, optax, orbax-checkpoint, chex, absl-py, etils, numpy, torch 2.11.0 and torchvision
# 0.26.0; no TensorFlow, tfds, ml_collections, clu or tensorboardX), put its bin/ first on PATH
# and run the check beside the .whl folder above.
set -uo pipefail
cd "$(dirname "$0")/.."
check=0
[[ "${1:-}" == "--check" ]] && check=1
# size FULL TINY: FULL on the GPU, TINY under --check.
size() { if (( check )); then echo "$2"; else echo "$1"; fi; }
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
  timeout "$(( check ? 10 * limit : limit ))" "$@" 2>&1 | grep -v -E "^[IW][0-9]{4} "
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"

# 1. ResNet-50, bfloat16, batch 256, synthetic data on the device: resnet_jax against PyTorch
#    (channels-last, autocast), eager and compiled, alternating in one process.
step 120 python3 benchmarks/torch_baseline.py --model=resnet50 --batch=$(size 256 2) --dtype=bfloat16 \
  --compare --steps=$(size 20 1) --repeats=$(size 5 1)
step 100 python3 benchmarks/torch_baseline.py --model=resnet50 --batch=$(size 256 2) --dtype=bfloat16 \
  --compile=default --steps=$(size 20 1) --repeats=$(size 5 1)
step 180 python3 benchmarks/torch_baseline.py --model=resnet50 --batch=$(size 256 2) --dtype=bfloat16 \
  --compile=max-autotune --steps=$(size 20 1) --repeats=$(size 5 1)

# 2. CIFAR ResNet-20 and ResNet-110 at batch 128 with the on-device input pipeline in the
#    step: 64,000 steps at the median step time must take at most 2 and 10 minutes.
step 45 python3 -m resnet_jax.tools.benchmark --model=cifar_resnet20 --batch=$(size 128 8) \
  --steps=$(size 200 1) --repeats=$(size 5 1) --input_pipeline
step 60 python3 -m resnet_jax.tools.benchmark --model=cifar_resnet110 --batch=$(size 128 8) \
  --steps=$(size 100 1) --repeats=$(size 5 1) --input_pipeline

# 3. What XLA's deterministic GPU ops cost (RELIABILITY.md), against the runs above.
XLA_FLAGS=--xla_gpu_deterministic_ops=true step 40 python3 -m resnet_jax.tools.benchmark \
  --model=cifar_resnet20 --batch=$(size 128 8) --steps=$(size 200 1) --repeats=$(size 5 1)

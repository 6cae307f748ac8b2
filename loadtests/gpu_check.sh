#!/usr/bin/env bash
# One prepared GPU check (issue 18, item 5): precision, pipeline, HTTP, training, torchrun.
#
#   bash loadtests/gpu_check.sh                 # on a GPU host (aim: under 8 minutes on one GPU)
#   bash loadtests/gpu_check.sh --quick         # on a CPU: tiny networks, a few steps (CI)
#   options: --summary FILE (default ${OUT:-.}/gpu_check_summary.md)
#            --benchmarks FILE (append the summary there; default BENCHMARKS.md, "-" to skip)
#
# Wheels: a GPU host without a package index lacks the service's pure-Python deps; fetch them
# here with loadtests/fetch_gpu_wheels.sh (into wheelhouse/) and carry that folder; this script
# installs them with pip --no-index --find-links wheelhouse when an import fails.
# Weights: seeded random networks (tests/weight_files.py via bench_pipeline.random_checkpoints).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
QUICK=0
SUMMARY="${OUT:-.}/gpu_check_summary.md"
BENCH=BENCHMARKS.md
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --summary) SUMMARY=$2; shift ;;
    --benchmarks) BENCH=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! $PY -c "import pydantic_settings, fastapi, fastapi_offline, uvicorn, multipart, prometheus_fastapi_instrumentator, redis" 2>/dev/null; then
  if [ -d wheelhouse ]; then
    $PY -m pip install -q --no-index --no-deps --find-links wheelhouse --target /tmp/gpu-check-site wheelhouse/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/gpu-check-site"
  else
    echo "missing packages and no wheelhouse/: run loadtests/fetch_gpu_wheels.sh where pip works" >&2
  fi
fi

SCRATCH=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$QUICK" = 1 ] || [ "$NGPU" = 0 ]; then
  DEVICE=cpu; WIDTH=8; PRECISIONS=fp32,bf16; MODES=fp32-cl,bf16; BATCHES=1,2
  PIPE_FLAGS="--quick --modes full,boxes8"; USERS=2; DURATION=3; WARMUP=1; STEPS=2; TBATCH=1; PHOTOS=1
else
  DEVICE=cuda; WIDTH=64; PRECISIONS=fp32,fp16,bf16; MODES=fp32,fp16,bf16; BATCHES=1,8,32
  PIPE_FLAGS="--images 64"; USERS=32; DURATION=30; WARMUP=10; STEPS=20; TBATCH=16; PHOTOS=0
fi
[ "$QUICK" = 1 ] && DEVICE=cpu

section() { echo; echo "## $1"; echo; }
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) ($([ $QUICK = 1 ] && echo quick || echo full))"
  echo
  echo "- machine: $($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() and '$DEVICE' != 'cpu' else 'CPU ' + next(l.split(':',1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')) + ', %d cores' % __import__('os').cpu_count())")"
  echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo none)"
  echo "- torch $($PY -c 'import torch; print(torch.__version__)'), torchvision $($PY -c 'import torchvision; print(torchvision.__version__)'), commit $(git rev-parse --short HEAD 2>/dev/null || echo -)"
  echo "- device $DEVICE, GPUs $NGPU, width $WIDTH"

  section "precision vs fp32 (ab error, RGB LSB, non-finite)"
  $PY loadtests/bench_precision.py --device $DEVICE --modes $MODES --width $WIDTH \
      --photos $PHOTOS --box-photos 1 2>&1 | grep -E "^\||non-finite" ; echo "exit ${PIPESTATUS[0]}"

  section "pipeline images/s and device ms/img"
  $PY loadtests/bench_pipeline.py --device $DEVICE --width $WIDTH --precisions $PRECISIONS \
      --batch-sizes $BATCHES $PIPE_FLAGS --no-write 2>&1 | grep -E "^\|" ; echo "exit ${PIPESTATUS[0]}"

  section "HTTP through serve ($USERS users, ${DURATION}s)"
  $PY -c "import sys; sys.path.insert(0,'loadtests'); from pathlib import Path; from bench_pipeline import random_checkpoints; random_checkpoints(Path('$SCRATCH/ckpt'), $WIDTH)"
  $PY loadtests/run_load.py --users $USERS --duration $DURATION --warmup $WARMUP \
      --serve "--checkpoints $SCRATCH/ckpt --no-detector" --env COLORIZE_DEVICE=$DEVICE 2>&1 | tail -n 12 ; echo "exit ${PIPESTATUS[0]}"

  section "training images/s per stage"
  $PY loadtests/bench_training.py --device $DEVICE --width $WIDTH --batch-size $TBATCH \
      --steps $STEPS --precisions ${PRECISIONS} --no-write 2>&1 | grep -E "^\|" ; echo "exit ${PIPESTATUS[0]}"

  section "torchrun, 2 processes, each stage"
  $PY -c "import sys; sys.path.insert(0,'loadtests'); from pathlib import Path; from bench_training import make_data; make_data(Path('$SCRATCH/train'), 4)" >/dev/null
  FLAGS="--data $SCRATCH/train/data --init $SCRATCH/ckpt --batch-size 1 --workers 0 --max-steps 2 --epochs 1 --no-progress"
  if [ "$DEVICE" = cuda ] && [ "$NGPU" -ge 2 ]; then
    for stage in full instance fusion; do
      $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m service train --stage $stage \
        $FLAGS --device cuda --output $SCRATCH/runs-nccl/$stage >/dev/null 2>$SCRATCH/err-$stage
      echo "| $stage | nccl x2 | exit $? |"
    done
  else
    backend="gloo x2 on $([ $DEVICE = cuda ] && echo cuda:0 || echo cpu)"
    dev=$([ $DEVICE = cuda ] && echo cuda:0 || echo cpu)
    OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_steps.py \
      $SCRATCH/runs full,instance,fusion $FLAGS --device $dev >/dev/null 2>$SCRATCH/err-ddp
    code=$?
    for stage in full instance fusion; do
      $PY -c "import torch; r=[torch.load('$SCRATCH/runs/$stage.rank%d.pt' % k) for k in (0,1)]; same=all(torch.equal(a,b) for s0,s1 in zip(r[0]['steps'],r[1]['steps']) for a,b in zip(s0['after'],s1['after'])); print('| $stage | $backend | exit %d | steps %d | ranks equal %s |' % (r[0]['code'], len(r[0]['steps']), same))" 2>/dev/null \
        || echo "| $stage | $backend | exit $code | failed: $(tail -c 300 $SCRATCH/err-ddp | tr '\n' ' ') |"
    done
  fi
} | tee "$SUMMARY"

if [ "$BENCH" != "-" ]; then
  { echo; echo "## gpu_check.sh summary"; sed 1d "$SUMMARY" | sed 's/^## /### /'; } >> "$BENCH"
fi
echo "summary: $SUMMARY"

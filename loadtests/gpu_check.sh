#!/usr/bin/env bash
# One prepared GPU check (issue 18, item 5): precision, detector boxes, pipeline, HTTP, training,
# torchrun (InstColorization's stages; issue 20: li-dcnn and zhao-pixelated).
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
# one Python start for the header (each start imports torch: seconds on a busy CPU)
$PY - "$QUICK" >"$SCRATCH/info" <<'PYEOF'
import os, sys, torch, torchvision
quick = sys.argv[1] == "1"
n = torch.cuda.device_count()
if n and not quick:
    name = torch.cuda.get_device_name(0)
else:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    isa = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()) or "AVX2" if "avx2" in flags else "no AVX2"
    name = f"CPU {cpu}, {os.cpu_count()} cores ({isa}), no GPU used"
print(n); print(name); print(torch.__version__, torchvision.__version__)
PYEOF
{ read -r NGPU; read -r MACHINE; read -r TORCHV TVV; } <"$SCRATCH/info"
NGPU=${NGPU:-0}
if [ "$QUICK" = 1 ] || [ "$NGPU" = 0 ]; then
  # CPU: width-8 networks, 64x48 photos, fp32 pipeline (bf16 is emulated on AVX2: one tiny case
  # in the precision section), 1 training step per stage, 2 torchrun steps per stage
  DEVICE=cpu; WIDTH=8; MODES=fp32-cl,bf16; BOXPHOTOS=0; PHOTOS=1
  PIPE_FLAGS="--precisions fp32 --quick --modes full,boxes8 --image-size 64x48"
  OFFLINE_FLAGS="--images 4 --batch-size 2 --size 64x48 --repeats 1"
  USERS=2; DURATION=3; WARMUP=1; STEPS=1; TBATCH=1; TPREC=fp32; DDPSTEPS=2
  DETMODES=bf16; DETSIZE=64; DETIMAGES=2; DETTHRESH=0.0
  LIFLAGS="--width-divisor 8"; ZHAOFLAGS="--width-divisor 16 --generator-layers 2 --generator-channels 16"
else
  DEVICE=cuda; WIDTH=64; MODES=fp32-cl,fp16,bf16; BOXPHOTOS=6; PHOTOS=0
  PIPE_FLAGS="--precisions fp32,fp16,bf16 --batch-sizes 1,8,32 --images 64"
  OFFLINE_FLAGS="--images 64 --batch-size 8 --repeats 2"
  USERS=32; DURATION=30; WARMUP=10; STEPS=20; TBATCH=16; TPREC=fp32,fp16,bf16; DDPSTEPS=4
  DETMODES=fp16,bf16; DETSIZE=800; DETIMAGES=8; DETTHRESH=0.05
  LIFLAGS=""; ZHAOFLAGS=""  # the full-size paper networks
fi
[ "$QUICK" = 1 ] && DEVICE=cpu

section() { echo; echo "## $1"; echo; }
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) ($([ $QUICK = 1 ] && echo quick || echo full))"
  echo
  echo "- machine: $MACHINE"
  echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo none)"
  echo "- torch $TORCHV, torchvision $TVV, commit $(git rev-parse --short HEAD 2>/dev/null || echo -)"
  echo "- device $DEVICE, GPUs $NGPU, width $WIDTH"

  section "precision vs fp32 (ab error, RGB LSB, non-finite)"
  $PY loadtests/bench_precision.py --device $DEVICE --modes $MODES --width $WIDTH \
      --photos $PHOTOS --box-photos $BOXPHOTOS 2>&1 | grep -E "^\||non-finite" ; echo "exit ${PIPESTATUS[0]}"

  section "detector box IoU vs fp32"
  $PY loadtests/bench_detector_precision.py --device $DEVICE --modes $DETMODES --size $DETSIZE \
      --images $DETIMAGES --threshold $DETTHRESH 2>&1 | grep -E "^\||^detector" ; echo "exit ${PIPESTATUS[0]}"

  section "pipeline images/s and device ms/img"
  $PY loadtests/bench_pipeline.py --device $DEVICE --width $WIDTH $PIPE_FLAGS --no-write 2>&1 | grep -E "^\|" ; echo "exit ${PIPESTATUS[0]}"

  section "offline runner: sequential vs overlapped stages"
  $PY loadtests/bench_offline.py --device $DEVICE --width $WIDTH $OFFLINE_FLAGS --no-write 2>&1 | grep -E "^\||byte-identical" ; echo "exit ${PIPESTATUS[0]}"

  section "HTTP through serve ($USERS users, ${DURATION}s)"
  # checkpoints for serve and torchrun, and the torchrun data set, in one Python start
  $PY -c "import sys; sys.path.insert(0,'loadtests'); from pathlib import Path; from bench_pipeline import random_checkpoints; from bench_training import make_data; random_checkpoints(Path('$SCRATCH/ckpt'), $WIDTH); make_data(Path('$SCRATCH/train'), 4)" >/dev/null
  $PY loadtests/run_load.py --users $USERS --duration $DURATION --warmup $WARMUP \
      --serve "--checkpoints $SCRATCH/ckpt --no-detector" --env COLORIZE_DEVICE=$DEVICE 2>&1 | tail -n 12 ; echo "exit ${PIPESTATUS[0]}"

  section "training images/s per stage"
  $PY loadtests/bench_training.py --device $DEVICE --width $WIDTH --batch-size $TBATCH \
      --steps $STEPS --precisions $TPREC --loader-batches 1 --no-write 2>&1 | grep -E "^\|" ; echo "exit ${PIPESTATUS[0]}"

  section "torchrun, 2 processes, each stage"
  FLAGS="--data $SCRATCH/train/data --init $SCRATCH/ckpt --batch-size 1 --workers 0 --max-steps $DDPSTEPS --epochs 100 --no-progress"
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
    $PY - "$SCRATCH/runs" "$backend" "$code" "$SCRATCH/err-ddp" <<'PYEOF'
import sys, torch
runs, backend, code, err = sys.argv[1:]
for stage in ("full", "instance", "fusion"):
    try:
        r = [torch.load(f"{runs}/{stage}.rank{k}.pt") for k in (0, 1)]
    except OSError:
        tail = open(err).read()[-300:].replace("\n", " ")
        print(f"| {stage} | {backend} | exit {code} | failed: {tail} |")
        continue
    same = all(torch.equal(a, b) for s0, s1 in zip(r[0]["steps"], r[1]["steps"])
               for a, b in zip(s0["after"], s1["after"]))
    print(f"| {stage} | {backend} | exit {r[0]['code']} | steps {len(r[0]['steps'])} | ranks equal {same} |")
PYEOF
  fi

  section "torchrun, 2 processes, paper models"
  # li-dcnn (BatchNorm: SyncBatchNorm on NCCL) and zhao-pixelated, 2 training + 2 validation photos
  # (sharded validation, one per rank), $DDPSTEPS steps of batch 1 per process
  mkdir -p $SCRATCH/paper/data
  $PY - "$SCRATCH/train/data/manifest.jsonl" "$SCRATCH/paper" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for i, row in enumerate(rows):
    row["split"] = "val" if i >= len(rows) - 2 else "train"
open(f"{sys.argv[2]}/data/manifest.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
open(f"{sys.argv[2]}/labels.csv", "w").write("".join(f"{r['path']},{'ab'[i % 2]}\n" for i, r in enumerate(rows)))
PYEOF
  PFLAGS="--data $SCRATCH/paper/data --batch-size 1 --workers 0 --max-steps $DDPSTEPS --epochs 100 --no-progress --log-every 1"
  LIRUN="--model li-dcnn --labels $SCRATCH/paper/labels.csv $LIFLAGS $PFLAGS"
  ZHAORUN="--model zhao-pixelated $ZHAOFLAGS $PFLAGS"
  if [ "$DEVICE" = cuda ] && [ "$NGPU" -ge 2 ]; then
    for model in li-dcnn zhao-pixelated; do
      run=$([ $model = li-dcnn ] && echo "$LIRUN" || echo "$ZHAORUN")
      $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m service train $run \
        --device cuda --output $SCRATCH/paper-nccl/$model >/dev/null 2>$SCRATCH/err-$model
      code=$?
      vals=$(grep -c '"split": "val"' $SCRATCH/paper-nccl/$model/metrics.jsonl 2>/dev/null)
      echo "| $model | nccl x2 | exit $code | validations ${vals:-0} |"
    done
  else
    backend="gloo x2 on $([ $DEVICE = cuda ] && echo cuda:0 || echo cpu)"
    dev=$([ $DEVICE = cuda ] && echo cuda:0 || echo cpu)
    OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_steps.py \
      $SCRATCH/paper-runs run:li-dcnn $LIRUN --device $dev run:zhao-pixelated $ZHAORUN --device $dev \
      >/dev/null 2>$SCRATCH/err-paper
    code=$?
    $PY - "$SCRATCH/paper-runs" "$backend" "$code" "$SCRATCH/err-paper" <<'PYEOF'
import json, sys, torch
runs, backend, code, err = sys.argv[1:]
for model in ("li-dcnn", "zhao-pixelated"):
    try:
        r = [torch.load(f"{runs}/{model}.rank{k}.pt") for k in (0, 1)]
        rows = [json.loads(line) for line in open(f"{runs}/{model}/metrics.jsonl")]
    except OSError:
        tail = open(err).read()[-300:].replace("\n", " ")
        print(f"| {model} | {backend} | exit {code} | failed: {tail} |")
        continue
    same = all(torch.equal(a, b) for s0, s1 in zip(r[0]["steps"], r[1]["steps"])
               for a, b in zip(s0["after"], s1["after"]))
    same = same and all(torch.equal(a, b) for a0, a1 in zip(r[0]["averaged"], r[1]["averaged"])
                        for a, b in zip(a0, a1))
    vals = [v["images"] for v in rows if v.get("split") == "val"]
    print(f"| {model} | {backend} | exit {r[0]['code']} | steps {len(r[0]['steps'])} | "
          f"ranks equal {same} | validations {len(vals)} of {vals[-1] if vals else 0} images |")
PYEOF
  fi
} | tee "$SUMMARY"

if [ "$BENCH" != "-" ]; then
  { echo; echo "## gpu_check.sh summary"; sed 1d "$SUMMARY" | sed 's/^## /### /'; } >> "$BENCH"
fi
echo "summary: $SUMMARY"

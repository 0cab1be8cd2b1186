#!/usr/bin/env bash
# One prepared check on one NVIDIA GPU machine (an H200) without network, in under 8 minutes:
#   info       nvidia-smi, python, jax.devices()                      -> env.json
#   setup      the missing pure/compiled wheels from benchmarks/wheels -> setup.json
#              (grain, ml_collections, ...: benchmarks/fetch_device_wheels.sh fetched them, ~6.6 MB,
#              committed; they are for CPython 3.12 x86_64, and device_setup.py puts an import stub
#              in grain's place if its wheel does not fit), the project itself through PYTHONPATH
#              (and `pip install --no-deps -e .` where pip takes it offline)
#   attention  ops/attention.py's implementations at the base model's shapes: reference softmax,
#              jax.nn.dot_product_attention XLA, cuDNN flash attention; error vs an fp32 reference,
#              forward and forward+backward time -> attention_check.json. If cuDNN fails, the
#              benchmarks below pin the XLA path (the default would pick cuDNN on this GPU).
#   parity     `python -m mxdna_jax.convert check tests/fixtures/public_small.npz` at full fp32
#              matmul precision (GPUs default to TF32, which the 1e-5 tolerances and the NMS's
#              1e-6 sensitivity do not survive)                        -> parity_public_small.json
#   forward    benchmarks/forward.py: configs/base.py's model (= ModelConfig()), batch 32 x 1,024
#              (incl. [CLS]/[SEP]), compact, bf16, real human DNA (benchmarks/data: chr20 GRCh37
#              40,000,001-40,400,000, N-free); nt/s, real tokens/seq, capacity, useful matmul FLOPs
#              and their share of a same-process 8192^3 bf16 matmul    -> forward_base_b32_L1024_bf16.json
#   train      benchmarks/train_step.py, same model/batch/dtype: MLM + aux loss, AdamW  -> train_step_*.json
#   extras     only with time left: parity at the default (TF32) precision, the forward with the XLA
#              attention for comparison
#   summary    device_check.json + device_check.md
# Every step runs under `timeout` (the smaller of its own cap and what is left of the budget,
# DEVICE_CHECK_BUDGET_S, default 450 s), so one hang cannot eat the machine time; a step that
# fails or times out is recorded in steps.tsv and the next one runs.
#
# Results go to $OUT (what the device runner brings back) or benchmarks/results/device/.
#   bash benchmarks/device_check.sh                     # on the GPU machine
#   DEVICE_CHECK_DRY=1 bash benchmarks/device_check.sh  # rehearsal on CPU: tiny config, batch 2, L 128
# PYTHON=... picks the interpreter (default: the first of python3, python, ... on PATH that imports jax).
# With the device runner: run(command="bash benchmarks/device_check.sh", timeout_s=540); then copy
# the files it brings back into benchmarks/results/device/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=${DEVICE_CHECK_DRY:-0}
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the first interpreter on PATH that has jax
  for c in python3 python python3.12 python3.13; do
    if command -v "$c" >/dev/null && timeout 120 "$c" -c "import jax" 2>/dev/null; then PY=$(command -v "$c"); break; fi
  done
  PY=${PY:-python3}
fi
if [ "$DRY" = 1 ]; then
  RES=${OUT:-/tmp/mxdna_device_check_dry}  # a rehearsal writes nothing into the repository
  BUDGET=${DEVICE_CHECK_BUDGET_S:-1500}   # 2 shared CPU cores
else
  RES=${OUT:-benchmarks/results/device}
  BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
fi
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
START=$(date +%s)
: > "$RES/steps.tsv"
exec > >(tee -a "$RES/device_check.log") 2>&1

SITE=/tmp/mxdna_device_site
STUBS=/tmp/mxdna_device_stubs
export PYTHONPATH="$STUBS:$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MXDNA_CACHE=/tmp/mxdna_cache                        # the FASTA id cache
export JAX_COMPILATION_CACHE_DIR=/tmp/mxdna_jax_cache      # a rerun on a warm machine skips compiles
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
FASTA=benchmarks/data/chr20_40M_400kb.fa.gz
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  CONFIG=tiny; BATCH=2; LEN=128; PEAK_N=512; REPEATS=2; PRNG=(--prng rbg)
  ATTN_ARGS=(--batch 4 --heads 2 --head-dim 16 --shapes 64x64 32x32 64x32 --repeats 2)
else
  CONFIG=base; BATCH=32; LEN=1024; PEAK_N=8192; REPEATS=10; PRNG=()
  # the nucleotide layers' self-attention and the MLM decoder's cross-attention at the capacity;
  # 'default' is one of the others here (the model's benchmarks below exercise it)
  ATTN_ARGS=(--batch 32 --heads 16 --head-dim 32 --shapes 1024x1024 1024x512 --repeats 10 --impls reference xla cudnn)
fi
TAG="${CONFIG}_b${BATCH}_L${LEN}_bf16"

RESERVE=20  # seconds kept for the summary
left() { echo $(( START + BUDGET - $(date +%s) )); }

# step NAME CAP_S COMMAND...: run under timeout min(CAP_S, time left - RESERVE)
step() {
  local name=$1 cap=$2 t rc t0 status
  shift 2
  t=$(( $(left) - RESERVE ))
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 15 ]; then
    echo "=== [$name] skipped: budget spent"
    printf '%s\tskipped\t0\t%s\n' "$name" "$t" >> "$RES/steps.tsv"
    return 1
  fi
  echo "=== [$name] (limit ${t}s, $(left)s of ${BUDGET}s left) $*"
  t0=$(date +%s)
  timeout -k 10 "$t" "$@"
  rc=$?
  status=ok
  [ "$rc" -ne 0 ] && status="rc=$rc"
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status=timeout
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$t" >> "$RES/steps.tsv"
  echo "=== [$name] $status after $(( $(date +%s) - t0 ))s"
  return "$rc"
}

echo "device_check: dry=$DRY python=$PY results=$RES budget=${BUDGET}s $(date -u +%FT%TZ)"
step nvidia-smi 20 nvidia-smi || true
step info 60 "$PY" - "$RES/env.json" "$DRY" <<'EOF' || true
import datetime, json, os, platform, subprocess, sys
import jax
env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "python": platform.python_version(), "machine": platform.machine(), "jax": jax.__version__,
       "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
       "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(), "dry": sys.argv[2] == "1"}
try:
    import jaxlib; env["jaxlib"] = jaxlib.__version__
    import flax; env["flax"] = flax.__version__
except Exception as e:
    env["import_error"] = repr(e)
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=15).stdout.strip()
except Exception as e:
    env["nvidia_smi"] = repr(e)
print(json.dumps(env, indent=1))
open(sys.argv[1], "w").write(json.dumps(env, indent=1) + "\n")
if env["backend"] != "gpu" and sys.argv[2] != "1":
    print("WARNING: no GPU backend; the numbers below are not the device's")
EOF

EDITABLE=(--editable)
[ "$DRY" = 1 ] && EDITABLE=()  # the rehearsal must not touch the interpreter's environment
step setup 90 "$PY" benchmarks/device_setup.py --wheels benchmarks/wheels --site "$SITE" --stubs "$STUBS" \
    "${EDITABLE[@]}" --json "$RES/setup.json" || echo "setup reported failed imports; trying the steps anyway"

ATTENTION=default
if step attention 75 "$PY" benchmarks/attention_check.py "${ATTN_ARGS[@]}" --dtype bfloat16 \
    --out "$RES/attention_check.json"; then
  if ! "$PY" -c "import json,sys; sys.exit(0 if json.load(open('$RES/attention_check.json'))['cudnn_ok'] else 1)"; then
    ATTENTION=xla
  fi
else
  ATTENTION=xla
fi
[ "$DRY" = 1 ] && ATTENTION=default  # CPU: the default is the hand-written softmax
echo "attention for the benchmarks: $ATTENTION"

step parity 110 bash -c 'out=$1; shift; "$@" > "$out"' _ "$RES/parity_public_small.json" \
    env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m mxdna_jax.convert check tests/fixtures/public_small.npz --json \
    || true

step forward 170 "$PY" benchmarks/forward.py --config "$CONFIG" --lengths "$LEN" --batch "$BATCH" --modes compact \
    --dtypes bfloat16 --no-breakdown --repeats "$REPEATS" --warmup 2 --peak-n "$PEAK_N" --peak-repeats 3 \
    --fasta "$FASTA" --attention "$ATTENTION" "${PRNG[@]}" --out "$RES" --name "forward_$TAG" || true

step train 200 "$PY" benchmarks/train_step.py --configs "$CONFIG" --lengths "$LEN" --batch "$BATCH" --modes compact \
    --dtypes bfloat16 --repeats "$REPEATS" --peak-n "$PEAK_N" --fasta "$FASTA" --attention "$ATTENTION" \
    --out "$RES" --name "train_step_$TAG" || true

# extras, only if time is left
step parity-default-precision 60 bash -c 'out=$1; shift; "$@" > "$out"' _ \
    "$RES/parity_public_small_default_precision.json" \
    "$PY" -m mxdna_jax.convert check tests/fixtures/public_small.npz --json || true
if [ "$ATTENTION" != xla ] && [ "$DRY" != 1 ]; then
  step forward-xla-attention 120 "$PY" benchmarks/forward.py --config "$CONFIG" --lengths "$LEN" --batch "$BATCH" \
      --modes compact --dtypes bfloat16 --no-breakdown --repeats "$REPEATS" --warmup 2 --peak-n "$PEAK_N" \
      --peak-repeats 3 --fasta "$FASTA" --attention xla --out "$RES" --name "forward_${TAG}_xla_attention" || true
fi

RESERVE=0
step summary 20 "$PY" benchmarks/device_summary.py "$RES" || true
echo "device_check: done in $(( $(date +%s) - START ))s; results in $RES"

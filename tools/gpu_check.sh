#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one run of about ten minutes on one GPU (issue 29).
#
#   bash tools/gpu_check.sh [--out DIR] [--vectors DIR] [--python PY] [--device DEV] [--only a,b] [--skip a,b]
#                           [--full] [--dry-run]
#
# Steps, in this order (each under a time limit; a failing step does not stop the others):
#   env            GPU, driver, torch and CUDA versions, the toolkit nvcc
#   build_ops      python -m op: builds the CUDA ops (toolkit matching torch's CUDA) and runs them once
#   gpu_tests      pytest -k cuda: CUDA kernels vs reference (values, first and second derivatives, gradcheck),
#                  the fast renderer on CUDA vs the CPU, the conformance tests on CUDA
#   conformance    tools/check_conformance.py --device DEV, float64 and float32
#   training_conformance   tools/check_training_conformance.py --device DEV (float64): the recorded training
#                  steps replayed through the CUDA kernels, R1 and path-length double backward included
#                  (fast render path; --full: both paths)
#   data           a tiny synthetic LMDB (tools/synthetic_portraits.py, prepare_data.py)
#   stage1, stage2 with --deterministic: 3 iterations in one go, and 2 then a resume for the third; the two
#                  last checkpoints must be identical (stage 1 also runs its sphere initialisation)
#   stage1_default 3 iterations of stage 1 without --deterministic (cuDNN autotuning, loader workers,
#                  --sync_every 2)
#   bench          tools/bench.py infer512 and train64 on DEV, with the CUDA ops and with CNERF_OPS=ref
#
# Writes DIR/summary.txt (a header, then one line per step: name, pass / FAIL / skipped, seconds, the step's
# last output line, e.g. a timing) as the steps finish, and each step's output to DIR/logs/<step>.log.
# Exit status 0 only if no step failed. Default DIR: runs/gpu_check (relative paths are taken from the
# repository root). --dry-run writes the summary with every step's command instead of running it.
#
# Needs no network. The GPU machine needs an NVIDIA driver, this repository with ../shared/reference beside it
# (or --vectors DIR) and a Python with: torch (a CUDA build) and torchvision, ninja and a CUDA toolkit
# (nvcc) of torch's CUDA version (for the op build; without them the ops fall back to the reference and
# build_ops fails), numpy, scipy, lmdb, Pillow, munch, ConfigArgParse, tqdm, pytest (requirements.txt).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2

out="runs/gpu_check"
vectors="$repo/../shared/reference"
py="$repo/.venv/bin/python"
device="cuda"
only=""
skip=""
full=0
dry_run=0
internal=""
args=("$@")  # passed on to the steps that run this script again (--internal STEP)
usage() { sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out|--vectors|--python|--device|--only|--skip|--internal)
      if [ $# -lt 2 ]; then echo "error: $1 needs a value" >&2; exit 2; fi
      case "$1" in
        --out) out="$2" ;; --vectors) vectors="$2" ;; --python) py="$2" ;; --device) device="$2" ;;
        --only) only="$2" ;; --skip) skip="$2" ;; --internal) internal="$2" ;;
      esac
      shift 2 ;;
    --full) full=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see bash tools/gpu_check.sh --help)" >&2; exit 2 ;;
  esac
done
if [ ! -x "$py" ] && ! command -v "$py" > /dev/null 2>&1; then
  echo "error: --python $py: not an executable" >&2; exit 2
fi

work="$out/work"
lmdb="$work/lmdb"
tiny=(--dataset_path "$lmdb" --device "$device" --renderer_spatial_output_dim 32 --width 64 --style_dim 128
      --N_samples 16 --batch 4 --chunk 2 --val_n_sample 1 --truncation_mean 16 --seed 0 --save_every 1
      --sample_every 1000)

# Exit 0 when two checkpoints hold the same tensors and values (printing which entries differ otherwise).
same_checkpoints() {
  "$py" - "$1" "$2" <<'PYTHON'
import sys
import torch
a, b = (torch.load(path, map_location="cpu", weights_only=True) for path in sys.argv[1:3])
def walk(x, y, key):
    if torch.is_tensor(x):
        return [] if torch.is_tensor(y) and x.shape == y.shape and torch.equal(x, y) else [key]
    if isinstance(x, dict):
        return [k for n in x for k in walk(x[n], y.get(n) if isinstance(y, dict) else None, f"{key}.{n}")]
    if isinstance(x, (list, tuple)):
        return [k for i, v in enumerate(x)
                for k in walk(v, y[i] if isinstance(y, (list, tuple)) and i < len(y) else None, f"{key}[{i}]")]
    return [] if x == y else [key]
differ = walk(a, b, "checkpoint")
print("resumed run identical to the uninterrupted one" if not differ else
      f"{len(differ)} entries differ, e.g. {', '.join(differ[:5])}")
sys.exit(1 if differ else 0)
PYTHON
}

# train SCRIPT FOLDER ARGS...: the uninterrupted run a (3 iterations), run b (2, then resumed for the third),
# and the comparison of their last checkpoints.
resume_check() {
  local script="$1" folder="$2" stage="$3"; shift 3
  "$py" "$script" "${tiny[@]}" "$@" --checkpoints_dir "$folder" --expname a --iter 3 &&
  "$py" "$script" "${tiny[@]}" "$@" --checkpoints_dir "$folder" --expname b --iter 2 &&
  "$py" "$script" "${tiny[@]}" "$@" --checkpoints_dir "$folder" --expname b --iter 3 --continue_training --ckpt 1 &&
  same_checkpoints "$folder/a/$stage/models_0000002.pt" "$folder/b/$stage/models_0000002.pt"
}

if [ -n "$internal" ]; then
  set -e
  case "$internal" in
    data)
      rm -rf "$work"; mkdir -p "$work"
      "$py" tools/synthetic_portraits.py --out "$work/portraits" --n 8 --size 64 --seed 0
      "$py" prepare_data.py --out_path "$lmdb" --n_worker 1 --size 64,32 --mask_path "$work/portraits/masks" \
        "$work/portraits/images" ;;
    stage1)
      resume_check train_CNeRF.py "$work/stage1" volume_renderer --size 32 --sphere_init_iter 5 --deterministic ;;
    stage2)
      resume_check train_Full.py "$work/stage2" full_pipeline --size 64 --channel_multiplier 1 --d_reg_every 2 \
        --g_reg_every 2 --deterministic --pretrain_render_path "$work/stage1/a/a_vol_renderer.pt" ;;
    stage1_default)
      "$py" train_CNeRF.py "${tiny[@]}" --size 32 --sphere_init_iter 5 --sync_every 2 \
        --checkpoints_dir "$work/stage1_default" --expname default --iter 3 ;;
    *) echo "error: --internal $internal: no such step" >&2; exit 2 ;;
  esac
  exit 0
fi

mkdir -p "$out/logs" || exit 2
summary="$out/summary.txt"
failed=0
{
  echo "# tools/gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "# device $device, python $py, vectors $vectors$([ "$dry_run" = 1 ] && echo ', dry run')"
} > "$summary"

# Whether a step is selected by --only / --skip.
selected() {
  local name="$1"
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then return 1; fi
  if [[ ",$skip," == *",$name,"* ]]; then return 1; fi
  return 0
}

record() {  # name status seconds note
  printf '%-22s %-18s %6ss  %s\n' "$1" "$2" "$3" "$4" >> "$summary"
}

# run_step NAME LIMIT_S COMMAND...: run it with its output in logs/NAME.log; one summary line.
run_step() {
  local name="$1" limit="$2"; shift 2
  local log="$out/logs/$name.log" start=$SECONDS status rc
  if ! selected "$name"; then record "$name" "skipped" 0 "not selected"; return 0; fi
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@" > "$log"; echo >> "$log"
    record "$name" "dry-run" 0 "$(tr '\n' ' ' < "$log" | cut -c1-300)"
    return 0
  fi
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" > "$log" 2>&1
  rc=$?
  if [ "$rc" = 0 ]; then status=pass
  elif [ "$rc" = 124 ]; then status="FAIL(timeout)"; failed=1
  else status="FAIL(exit $rc)"; failed=1
  fi
  record "$name" "$status" $((SECONDS - start)) "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)"
  echo "   $status"
}

skip_step() {  # name reason
  if selected "$1"; then record "$1" "skipped" 0 "$2"; else record "$1" "skipped" 0 "not selected"; fi
}

# ------------------------------------------------------------------------------------------------ steps

run_step env 60 "$py" -c "
import shutil, subprocess, torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())
if shutil.which('nvidia-smi'):
    print(subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader'],
                         capture_output=True, text=True).stdout.strip())
if shutil.which('nvcc'):
    print(subprocess.run(['nvcc', '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1])
assert torch.cuda.is_available(), 'no CUDA device visible to torch'
print('device:', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
"
run_step build_ops 300 "$py" -m op
run_step gpu_tests 240 "$py" -m pytest -q -rs -p no:cacheprovider tests -k cuda

if [ -f "$vectors/conformance_vectors.pt" ]; then
  run_step conformance 180 "$py" tools/check_conformance.py "$vectors/conformance_vectors.pt" --device "$device" \
    --dtype both
else
  skip_step conformance "no $vectors/conformance_vectors.pt"
fi
if [ -f "$vectors/training_vectors.pt" ]; then
  paths=fast; if [ "$full" = 1 ]; then paths=both; fi
  run_step training_conformance 300 "$py" tools/check_training_conformance.py "$vectors/training_vectors.pt" \
    --device "$device" --render_path "$paths"
else
  skip_step training_conformance "no $vectors/training_vectors.pt"
fi

# A few iterations of each stage on a tiny synthetic dataset; with --deterministic a resumed run must
# end exactly where an uninterrupted one does. These steps run as `gpu_check.sh ... --internal STEP`.
run_step data 120 bash "${BASH_SOURCE[0]}" "${args[@]}" --internal data
run_step stage1 240 bash "${BASH_SOURCE[0]}" "${args[@]}" --internal stage1
run_step stage2 240 bash "${BASH_SOURCE[0]}" "${args[@]}" --internal stage2
run_step stage1_default 180 bash "${BASH_SOURCE[0]}" "${args[@]}" --internal stage1_default

# Timings: the CUDA ops against the reference (CNERF_OPS=ref), same machine, same run.
for workload in infer512 train64; do
  run_step "bench_$workload" 150 "$py" tools/bench.py "$workload" --device "$device" --repeat 5
  run_step "bench_${workload}_ref" 150 env CNERF_OPS=ref "$py" tools/bench.py "$workload" --device "$device" \
    --repeat 5
done

echo "summary: $summary"
cat "$summary"
exit "$failed"

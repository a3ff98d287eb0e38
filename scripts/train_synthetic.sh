#!/usr/bin/env bash
# The synthetic-portrait model (issue 15), from nothing to the shipped checkpoints, with this project's own
# scripts only:
#   synthetic portraits -> LMDB with masks -> stage 1 (and the renderer's check on its checkpoints) -> stage 2
#   -> face parser -> the shipped-model check on every stage-2 checkpoint -> export -> curves -> metrics
# Run it again to resume: finished steps are skipped and training continues from its latest checkpoint.
#
#   bash scripts/train_synthetic.sh                # everything under runs/synthetic (SYNTH_OUT to move it)
#   SHIP=1 bash scripts/train_synthetic.sh         # also copy the results into checkpoints/ (what made the shipped model)
#   SYNTH_EXPORT_ITER=600 bash scripts/train_synthetic.sh   # export (and measure) stage-2 iteration 600, not the last
#   SYNTH_N=40 SYNTH_TRAIN_ARGS="--iter 2 --sphere_init_iter 2" SYNTH_EVAL_ARGS="--n 4 ..." ...   # a dry run
#   bash scripts/train_synthetic.sh snapshot       # the stages' latest checkpoints, weights only, into git's reach
#
# Snapshots carry an unfinished run across machines: `snapshot` writes each stage's latest checkpoint without
# its optimiser states, weights in float16, to checkpoints/progress/synthetic_stage{1,2}_models_NNNNNNN.pt
# (about 11 MB for stage 1), with the stage's loss log beside it (commit them, `git rm` the older ones). A stage
# whose folder holds nothing newer continues from its snapshot with --fresh_optimizers (Adam's moments
# restart; everything else goes on where it was) and its loss log.
#
# Recipe: configs/synthetic_stage1.yaml, then configs/synthetic_stage1_part2.yaml (stage 1 goes on with another R1
# weight on the masks), configs/synthetic_stage2.yaml (4000 portraits, seed 0, 128 px drawn,
# LMDB at 64 and 32 px). On a CPU shared with other work, OMP_NUM_THREADS=1 is much faster than 2.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# SYNTH_PYTHON: another interpreter (the test of this script's resume logic passes a stand-in)
if [ -z "${SYNTH_PYTHON:-}" ]; then bash scripts/setup_venv.sh; fi
py="${SYNTH_PYTHON:-$repo/.venv/bin/python}"
out="${SYNTH_OUT:-runs/synthetic}"
n_portraits="${SYNTH_N:-4000}"
ckpts="$out/checkpoints"
exp="$ckpts/synthetic"
export PYTHONUNBUFFERED=1
# One OpenMP thread and two render workers: fastest on a 2-core CPU, and far faster when it is shared.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CNERF_RENDER_THREADS="${CNERF_RENDER_THREADS:-2}"
mkdir -p "$out"
step() { echo; echo "== $* ($(date +%H:%M:%S))"; }

# The latest models_*.pt of a stage folder, or nothing.
latest() { { ls "$1"/models_*.pt 2>/dev/null || true; } | sort | tail -n 1; }

# The newest committed snapshot of a stage (synthetic_stage1 / synthetic_stage2), or nothing.
progress="${SYNTH_PROGRESS:-checkpoints/progress}"
snapshot_of() {
  if [ "$1" = synthetic_stage2 ] && [ "${stage1_trains:-0}" = 1 ]; then return; fi  # made on an earlier stage 1
  { ls "$progress/$1"_models_*.pt 2>/dev/null || true; } | sort | tail -n 1
}

# The iteration count a stage trains to: a `--iter N` in SYNTH_TRAIN_ARGS (as on the training scripts'
# command line, it overrides the config), else its config's `iter:` line.
target_iter() {
  local flag; flag="$(sed -n 's/.*--iter[ =]\([0-9][0-9]*\).*/\1/p' <<< "${SYNTH_TRAIN_ARGS:-}")"
  if [ -n "$flag" ]; then echo "$flag"; else sed -n 's/^iter: *\([0-9]*\).*/\1/p' "$1"; fi
}

# The iteration of a checkpoint ...models_NNNNNNN.pt (-1 for none).
ckpt_iter() { if [ -n "$1" ]; then basename "$1" .pt | sed 's/.*models_0*\([0-9]\)/\1/'; else echo -1; fi; }

# The checkpoint a stage goes on from: its folder's latest, or its snapshot when that is newer.
resume_point() {
  local last snapshot; last="$(latest "$1")"; snapshot="$(snapshot_of "$2")"
  if [ -n "$snapshot" ] && [ "$(ckpt_iter "$snapshot")" -gt "$(ckpt_iter "$last")" ]; then echo "$snapshot"
  else echo "$last"; fi
}

# Whether a stage has reached its iteration count (its last checkpoint is iteration count-1).
stage_complete() {
  local final="$1" stage_dir="$2" config="$3" name="$4"
  [ -f "$final" ] && [ "$(ckpt_iter "$(resume_point "$stage_dir" "$name")")" -ge $(( $(target_iter "$config") - 1 )) ]
}

# Train one stage: skip when complete, resume from the latest checkpoint when there is one (also after
# its iteration count was raised: training continues to the new count and rewrites the final file).
train_stage() {
  local script="$1" config="$2" stage_dir="$3" final="$4" name="$5"; shift 5
  if stage_complete "$final" "$stage_dir" "$config" "$name"; then echo "done: $final"; return; fi
  local resume=()
  local last; last="$(resume_point "$stage_dir" "$name")"
  if [ -n "$last" ]; then resume=(--continue_training --ckpt "$last"); echo "resuming from $last"; fi
  if [[ "$last" == "$progress"/* ]]; then  # a snapshot: no optimiser states; its loss log starts this folder's
    resume+=(--fresh_optimizers)
    if [ ! -f "$stage_dir/losses.jsonl" ] && [ -f "$progress/${name}_losses.jsonl" ]; then
      mkdir -p "$stage_dir" && cp "$progress/${name}_losses.jsonl" "$stage_dir/losses.jsonl"
    fi
  fi
  # shellcheck disable=SC2086  # SYNTH_TRAIN_ARGS is a list of flags
  "$py" "$script" --config "$config" --dataset_path "$out/lmdb" --checkpoints_dir "$ckpts" "${resume[@]}" "$@" \
      ${SYNTH_TRAIN_ARGS:-}
}

if [ "${1:-}" = snapshot ]; then
  mkdir -p "$progress"
  for stage in "volume_renderer synthetic_stage1" "full_pipeline synthetic_stage2"; do
    read -r folder name <<< "$stage"
    last="$(latest "$exp/$folder")"
    if [ -z "$last" ]; then echo "$name: no checkpoint in $exp/$folder"; continue; fi
    "$py" tools/strip_optimizers.py "$last" "$progress/${name}_$(basename "$last")" --half
    if [ -f "$exp/$folder/losses.jsonl" ]; then cp "$exp/$folder/losses.jsonl" "$progress/${name}_losses.jsonl"; fi
  done
  echo "commit the new files under $progress and git rm the older ones"
  exit 0
fi

step "synthetic portraits ($n_portraits, seed 0)"
if [ "$(ls "$out/portraits/images" 2>/dev/null | wc -l)" -ge "$n_portraits" ]; then echo "done: $out/portraits"
else "$py" tools/synthetic_portraits.py --out "$out/portraits" --n "$n_portraits" --size 128 --seed 0; fi

step "LMDB with masks (64 and 32 px)"
if [ -f "$out/lmdb/data.mdb" ]; then echo "done: $out/lmdb"
else "$py" prepare_data.py --out_path "$out/lmdb" --n_worker 2 --size 64,32 \
    --mask_path "$out/portraits/masks" "$out/portraits/images"; fi

step "held-out portraits for the inversion metric (20, seed 1: not in the training set)"
if [ -f "$out/heldout_lmdb/data.mdb" ]; then echo "done: $out/heldout_lmdb"
else
  "$py" tools/synthetic_portraits.py --out "$out/heldout" --n 20 --size 128 --seed 1
  "$py" prepare_data.py --out_path "$out/heldout_lmdb" --n_worker 2 --size 64,32 \
      --mask_path "$out/heldout/masks" "$out/heldout/images"
fi

step "stage 1: volume renderer at 32x32"
# In parts: each part's config continues the previous part's last checkpoint to its own `iter`.
stage1_parts=(configs/synthetic_stage1.yaml configs/synthetic_stage1_part2.yaml)
stage1_at="$(ckpt_iter "$(resume_point "$exp/volume_renderer" synthetic_stage1)")"
if [ "$stage1_at" -lt $(( $(target_iter "${stage1_parts[-1]}") - 1 )) ]; then
  # stage 1 trains on: a stage 2 (or stage-2 snapshot) of the earlier stage 1 is stale, stage 2 starts afresh
  stage1_trains=1
  if [ -d "$exp/full_pipeline" ]; then
    stale="$exp/full_pipeline_on_stage1_$stage1_at"
    mv "$exp/full_pipeline" "$stale"
    if [ -f "$exp/synthetic_full_pipeline.pt" ]; then mv "$exp/synthetic_full_pipeline.pt" "$stale/"; fi
    echo "stage 2 of the earlier stage 1 moved to $stale"
  fi
fi
for config in "${stage1_parts[@]}"; do
  echo "-- $config"
  train_stage train_CNeRF.py "$config" "$exp/volume_renderer" "$exp/synthetic_vol_renderer.pt" synthetic_stage1
done

step "the renderer's check on stage-1 checkpoints (regions its seg shows, hair-swap locality, seg leak)"
"$py" tools/track_checkpoints.py "$exp/volume_renderer" --out "$out/track_stage1" --n 16 --every 300

step "stage 2: decoder to 64 px"
train_stage train_Full.py configs/synthetic_stage2.yaml "$exp/full_pipeline" "$exp/synthetic_full_pipeline.pt" \
    synthetic_stage2

step "face parser on the same data"
if [ -f "$out/synthetic_parser.pt" ]; then echo "done: $out/synthetic_parser.pt"
else "$py" tools/train_parser.py --dataset_path "$out/lmdb" --size 64 --seed 0 --epochs 20 \
    --out "$out/synthetic_parser.pt"; fi

step "the shipped-model check on every stage-2 checkpoint (region presence, hair-swap locality)"
"$py" tools/track_checkpoints.py "$exp/full_pipeline" --out "$out/track" --n 16 --every 100

step "export the EMA generator (float16 on disk)"
if [ -n "${SYNTH_EXPORT_ITER:-}" ]; then
  chosen="$exp/full_pipeline/$(printf 'models_%07d.pt' "$SYNTH_EXPORT_ITER")"
  [ -f "$chosen" ] || { echo "SYNTH_EXPORT_ITER=$SYNTH_EXPORT_ITER: no checkpoint $chosen"; exit 1; }
else chosen="$exp/synthetic_full_pipeline.pt"; fi
"$py" tools/export_generator.py "$chosen" "$out/synthetic_portraits.pt" --half

step "loss curves"
"$py" tools/plot_losses.py --out "$out/loss_curves.png" --titles "stage 1,stage 2" \
    "$exp/volume_renderer/losses.jsonl" "$exp/full_pipeline/losses.jsonl"

step "evaluation (two processes, one per core: the inversions take longest)"
eval_common=(--trained_ckpt "$out/synthetic_portraits.pt" --dataset_path "$out/lmdb" --parser "$out/synthetic_parser.pt"
             --seed 0 --inference_samples 24)
# shellcheck disable=SC2086  # SYNTH_EVAL_ARGS is a list of flags
"$py" calc_metrics.py "${eval_common[@]}" --metrics inversion --n_inversions 20 \
    --inversion_dataset "$out/heldout_lmdb" --inversion_steps 40 --out "$out/metrics_inversion" ${SYNTH_EVAL_ARGS:-} \
    > "$out/metrics_inversion.log" 2>&1 &
inversion_pid=$!
# shellcheck disable=SC2086
"$py" calc_metrics.py "${eval_common[@]}" --metrics fid,kid,miou,locality,consistency --n 500 --n_pairs 20 \
    --n_consistency 20 --out "$out/metrics" ${SYNTH_EVAL_ARGS:-}
wait "$inversion_pid" || { echo "inversion metric failed: see $out/metrics_inversion.log"; exit 1; }
cat "$out/metrics_inversion/metrics.md"

if [ "${SHIP:-0}" = 1 ]; then
  step "ship"
  cp "$out/synthetic_portraits.pt" "$out/synthetic_parser.pt" checkpoints/
  cp "$out/loss_curves.png" checkpoints/synthetic_loss_curves.png
  echo "copied into checkpoints/"
fi
echo
echo "model:   $out/synthetic_portraits.pt"
echo "metrics: $out/metrics/metrics.json, $out/metrics_inversion/metrics.json"

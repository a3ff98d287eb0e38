#!/usr/bin/env bash
# The whole CNeRF pipeline on the CPU in under ten minutes, on built-in synthetic portraits:
#   1. training runs: synthetic portraits -> LMDB with masks -> a few iterations of stage 1 and stage 2
#      from scratch at a tiny configuration (to see training work, not to get a good model);
#   2. the shipped model (checkpoints/synthetic_portraits.pt, trained by scripts/train_synthetic.sh):
#      portraits over a camera sweep with segs and shapes, --semantics renders, a video, region edits
#      (shape and texture, several regions) with |Δ| maps, an interpolation, and the inversion of a
#      held-out portrait followed by an edit of it;
#   3. demo_out/results/index.html says what every picture shows.
# Without the shipped model (a checkout that predates it), part 2 uses the tiny model of part 1.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup_venv.sh
py="$repo/.venv/bin/python"
out="${DEMO_OUT:-demo_out}"
export PYTHONUNBUFFERED=1
# Two cores: one thread per process is faster than two on a machine doing anything else (BENCHMARKS.md).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CNERF_RENDER_THREADS="${CNERF_RENDER_THREADS:-2}"
start=$SECONDS
ckpts="$out/checkpoints"
results="$out/results"
rm -rf "$results"
step() { echo; echo "== $* ($((SECONDS - start)) s)"; }

# ---------------------------------------------------------------------------- 1. training runs
tiny=(--renderer_spatial_output_dim 16 --style_dim 64 --width 32 --N_samples 12 --channel_multiplier 1
      --d_channel_scale 0.25 --device cpu --seed 0 --precision auto)
step "synthetic portraits"
"$py" tools/synthetic_portraits.py --out "$out/portraits" --n 200 --size 64 --seed 0
step "LMDB with masks"
"$py" prepare_data.py --out_path "$out/lmdb" --n_worker 2 --size 32,16 --overwrite \
    --mask_path "$out/portraits/masks" "$out/portraits/images"
step "stage 1 from scratch: volume renderer at 16x16"
rm -rf "$ckpts/demo"
"$py" train_CNeRF.py --expname demo --checkpoints_dir "$ckpts" --dataset_path "$out/lmdb" --size 16 "${tiny[@]}" \
    --batch 2 --chunk 2 --iter "${DEMO_STAGE1_ITER:-30}" --sphere_init_iter "${DEMO_SPHERE_ITER:-100}" \
    --vol_g_lr 3e-4 --ema_decay 0.9 --sample_every 10 --save_every 30 --val_n_sample 2 --truncation_mean 500
step "stage 2 from scratch: decoder to 32x32"
"$py" train_Full.py --expname demo --checkpoints_dir "$ckpts" --dataset_path "$out/lmdb" --size 32 "${tiny[@]}" \
    --batch 2 --chunk 2 --iter "${DEMO_STAGE2_ITER:-10}" --ema_decay 0.9 --sample_every 5 --save_every 10 \
    --val_n_sample 2 --truncation_mean 500
mkdir -p "$results/training"
cp "$ckpts/demo/volume_renderer/samples/"*.png "$results/training/"
for f in "$ckpts/demo/full_pipeline/samples/"*.png; do cp "$f" "$results/training/stage2_$(basename "$f")"; done

# ---------------------------------------------------------------------------- 2. the shipped model
model="checkpoints/synthetic_portraits.pt"
if [ ! -f "$model" ]; then
  echo "note: $model is not in this checkout; showing the tiny model just trained instead"
  model="$ckpts/demo/demo_full_pipeline.pt"
fi
# The checkpoints carry their architecture options: --trained_ckpt is the only model flag needed.
m=(--trained_ckpt "$model" --device cpu --seed 0 --truncation_mean 2000 --precision auto)
fast_render=(--inference_samples 32 --surface_resolution 64 --surface_samples 64)
step "portraits over a camera sweep, with segmentations, shapes and meshes"
"$py" inference_Full.py "${m[@]}" "${fast_render[@]}" --results_dir "$results/portraits" --identities 4 \
    --truncation_ratio 0.7
step "only the eye, mouth and hair features reach the decoder (--semantics)"
"$py" inference_Full.py "${m[@]}" "${fast_render[@]}" --results_dir "$results/semantics_eye_mouth_hair" \
    --identities 4 --truncation_ratio 0.7 --semantics eye,mouth,hair --no_surface_renderings
step "video"
"$py" render_video.py "${m[@]}" "${fast_render[@]}" --results_dir "$results/video" --identities 1 --frames 24 --fps 12
step "region edits: texture and shape, several regions, with |delta| maps"
edit() {  # edit <folder> <regions> <attribute> [more flags]
  local folder="$1" regions="$2" attribute="$3"; shift 3
  "$py" edit_semantics.py "${m[@]}" --inference_samples 32 --out_dir "$results/$folder" --source 0 --reference 1 \
      --regions "$regions" --attribute "$attribute" "$@"
}
edit edit_hair_texture hair texture --interpolate 6 --video
edit edit_hair_shape hair shape
edit edit_eye_mouth_texture eye,mouth texture --source 1 --reference 2  # seed 0's portrait has no eyes in its seg
edit edit_face_neck+cloth_texture face,neck+cloth texture
step "inversion of a held-out synthetic portrait (seed 1: not in the training set), then an edit of it"
"$py" tools/synthetic_portraits.py --out "$out/heldout" --n 1 --size 64 --seed 1
"$py" invert.py "${m[@]}" --inference_samples 32 --image "$out/heldout/images/00000.png" \
    --mask "$out/heldout/masks/00000.png" --steps "${DEMO_INVERT_STEPS:-40}" --out_dir "$results/inversion" \
    --name heldout
edit edit_inverted_hair_texture hair texture --source "$results/inversion/heldout_latents.pt" --reference 2

"$py" tools/results_index.py "$results" --title "CNeRF demo: the synthetic-portrait model"
echo
echo "done in $((SECONDS - start)) s (after the environment setup)."
echo "results:     $results/index.html"
echo "model:       $model"

#!/usr/bin/env bash
# The whole CNeRF pipeline on built-in synthetic portraits, on the CPU, in a few minutes:
# synthetic portraits -> LMDB with masks -> stage 1 (volume renderer) -> stage 2 (decoder)
# -> inference with and without --semantics -> video -> a region edit -> index.html.
# A tiny configuration: the point is to exercise every step a user takes, not image quality.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup_venv.sh
py="$repo/.venv/bin/python"
out="${DEMO_OUT:-demo_out}"
# Small tensors: one thread per process avoids the two cores contending on tiny ops.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
start=$SECONDS
tiny=(--renderer_spatial_output_dim 32 --style_dim 64 --width 32 --N_samples 12 --channel_multiplier 1
      --device cpu --seed 0)
ckpts="$out/checkpoints"
results="$out/results"
rm -rf "$results"
step() { echo; echo "== $* ($((SECONDS - start)) s)"; }

step "synthetic portraits"
"$py" tools/synthetic_portraits.py --out "$out/portraits" --n 200 --size 64 --seed 0
step "LMDB with masks"
"$py" prepare_data.py --out_path "$out/lmdb" --n_worker 2 --size 64,32 --overwrite \
    --mask_path "$out/portraits/masks" "$out/portraits/images"
step "stage 1: volume renderer at 32x32"
"$py" train_CNeRF.py --expname demo --checkpoints_dir "$ckpts" --dataset_path "$out/lmdb" --size 32 "${tiny[@]}" \
    --batch 4 --chunk 4 --iter "${DEMO_STAGE1_ITER:-300}" --sphere_init_iter "${DEMO_SPHERE_ITER:-150}" \
    --sample_every 100 --save_every 100 --val_n_sample 4 --truncation_mean 1000
step "stage 2: decoder to 64x64"
"$py" train_Full.py --expname demo --checkpoints_dir "$ckpts" --dataset_path "$out/lmdb" --size 64 "${tiny[@]}" \
    --batch 4 --chunk 4 --iter "${DEMO_STAGE2_ITER:-200}" --sample_every 100 --save_every 100 --val_n_sample 4 \
    --truncation_mean 1000
model="$ckpts/demo/demo_full_pipeline.pt"
step "inference: all regions, with shapes and meshes"
"$py" inference_Full.py --trained_ckpt "$model" --results_dir "$results/inference" --identities 3 --size 64 \
    "${tiny[@]}" --truncation_ratio 0.7
step "inference: only eye and mouth features reach the decoder"
"$py" inference_Full.py --trained_ckpt "$model" --results_dir "$results/inference_eye_mouth" --identities 3 \
    --size 64 "${tiny[@]}" --truncation_ratio 0.7 --semantics eye,mouth --no_surface_renderings
step "video"
"$py" render_video.py --trained_ckpt "$model" --results_dir "$results/video" --identities 1 --size 64 "${tiny[@]}" \
    --frames 40 --fps 20
step "region edit: hair and mouth texture from another identity"
"$py" edit_semantics.py --trained_ckpt "$model" --out_dir "$results/edit" --size 64 "${tiny[@]}" \
    --source 0 --reference 1 --regions hair,mouth --attribute texture
"$py" tools/results_index.py "$results" --title "CNeRF demo (tiny configuration, synthetic portraits)"
echo
echo "done in $((SECONDS - start)) s (after the environment setup)."
echo "results:     $results/index.html"
echo "checkpoints: $ckpts/demo/ (demo_vol_renderer.pt, demo_full_pipeline.pt)"

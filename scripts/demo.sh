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
# On a CPU shared with other work, OMP_NUM_THREADS=1 is often much faster (see BENCHMARKS.md).
export PYTHONUNBUFFERED=1
start=$SECONDS
# The discriminators' widths (400-512 channels) are fixed by the architecture, so resolution is what
# keeps a CPU run short: stage 1 renders 16x16, stage 2 decodes to 32x32.
tiny=(--renderer_spatial_output_dim 16 --style_dim 64 --width 32 --N_samples 12 --channel_multiplier 1
      --device cpu --seed 0)
fast_render=(--inference_samples 24 --surface_resolution 64 --surface_samples 48)
ckpts="$out/checkpoints"
results="$out/results"
rm -rf "$results"
step() { echo; echo "== $* ($((SECONDS - start)) s)"; }

step "synthetic portraits"
"$py" tools/synthetic_portraits.py --out "$out/portraits" --n 200 --size 64 --seed 0
step "LMDB with masks"
"$py" prepare_data.py --out_path "$out/lmdb" --n_worker 2 --size 32,16 --overwrite \
    --mask_path "$out/portraits/masks" "$out/portraits/images"
step "stage 1: volume renderer at 16x16"
"$py" train_CNeRF.py --expname demo --checkpoints_dir "$ckpts" --dataset_path "$out/lmdb" --size 16 "${tiny[@]}" \
    --batch 2 --chunk 2 --iter "${DEMO_STAGE1_ITER:-40}" --sphere_init_iter "${DEMO_SPHERE_ITER:-200}" \
    --sample_every 20 --save_every 20 --val_n_sample 4 --truncation_mean 1000
step "stage 2: decoder to 32x32"
"$py" train_Full.py --expname demo --checkpoints_dir "$ckpts" --dataset_path "$out/lmdb" --size 32 "${tiny[@]}" \
    --batch 2 --chunk 2 --iter "${DEMO_STAGE2_ITER:-20}" --sample_every 10 --save_every 10 --val_n_sample 4 \
    --truncation_mean 1000
model="$ckpts/demo/demo_full_pipeline.pt"
step "inference: all regions, with shapes and meshes"
"$py" inference_Full.py --trained_ckpt "$model" --results_dir "$results/inference" --identities 3 --size 32 \
    "${tiny[@]}" "${fast_render[@]}" --truncation_ratio 0.7
step "inference: only eye and mouth features reach the decoder"
"$py" inference_Full.py --trained_ckpt "$model" --results_dir "$results/inference_eye_mouth" --identities 3 \
    --size 32 "${tiny[@]}" "${fast_render[@]}" --truncation_ratio 0.7 --semantics eye,mouth --no_surface_renderings
step "video"
"$py" render_video.py --trained_ckpt "$model" --results_dir "$results/video" --identities 1 --size 32 "${tiny[@]}" \
    "${fast_render[@]}" --frames 24 --fps 12
step "region edit: hair and mouth texture from another identity"
"$py" edit_semantics.py --trained_ckpt "$model" --out_dir "$results/edit" --size 32 "${tiny[@]}" \
    --inference_samples 24 --source 0 --reference 1 --regions hair,mouth --attribute texture
"$py" tools/results_index.py "$results" --title "CNeRF demo (tiny configuration, synthetic portraits)"
echo
echo "done in $((SECONDS - start)) s (after the environment setup)."
echo "results:     $results/index.html"
echo "checkpoints: $ckpts/demo/ (demo_vol_renderer.pt, demo_full_pipeline.pt)"

#!/usr/bin/env bash
# Stage 2: the StyleGAN2 decoder on the frozen stage-1 renderer (writes checkpoints/<expname>/<expname>_full_pipeline.pt).
# Needs checkpoints/<expname>/<expname>_vol_renderer.pt from scripts/train_CNeRF.sh (or --pretrain_render_path).
# DATASET must hold the output size (e.g. prepare_data.py --size 256,64) and masks.
set -euo pipefail
DATASET=${DATASET:-./datasets/FFHQ_lmdb}
EXPNAME=${EXPNAME:-ffhq}

case "${1:-multi}" in
  multi)   # several GPUs (published launcher; torchrun --nproc_per_node 4 works the same way)
    python -m torch.distributed.launch --nproc_per_node 4 train_Full.py \
      --expname "$EXPNAME" --dataset_path "$DATASET" --size 256 --batch 4 --chunk 4 ;;
  single)  # one GPU
    python train_Full.py --expname "$EXPNAME" --dataset_path "$DATASET" --size 256 --batch 4 --chunk 4 ;;
  cpu)     # (on a busy machine OMP_NUM_THREADS=1 is often much faster)
           # a tiny CPU run after `scripts/train_CNeRF.sh cpu` (decoder 16 -> 32)
    python train_Full.py --expname tiny --dataset_path "$DATASET" --device cpu --seed 0 \
      --renderer_spatial_output_dim 16 --size 32 --style_dim 32 --width 32 --N_samples 8 \
      --channel_multiplier 1 --batch 2 --chunk 1 --iter 20 --sample_every 10 --save_every 10 \
      --val_n_sample 2 --truncation_mean 256 ;;
  *) echo "usage: $0 [multi|single|cpu]" >&2; exit 2 ;;
esac

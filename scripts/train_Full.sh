#!/usr/bin/env bash
# Stage 2: the StyleGAN2 decoder on the frozen stage-1 renderer (writes checkpoints/<expname>/<expname>_full_pipeline.pt).
# Needs checkpoints/<expname>/<expname>_vol_renderer.pt from scripts/train_CNeRF.sh (or --pretrain_render_path).
# DATASET must hold the output size (e.g. prepare_data.py --size 512,64) and masks.
# The published recipe (--size 512, --batch 4 --chunk 4 on 4 GPUs) is configs/ffhq_stage2.yaml.
set -euo pipefail
DATASET=${DATASET:-./datasets/FFHQ_lmdb}
EXPNAME=${EXPNAME:-ffhq}

case "${1:-multi}" in
  multi)   # 4 GPUs (published launcher; torchrun --nproc_per_node 4 works the same way)
    python -m torch.distributed.launch --master_port 1234 --nproc_per_node 4 train_Full.py \
      --config configs/ffhq_stage2.yaml --expname "$EXPNAME" --dataset_path "$DATASET" ;;
  single)  # one GPU, the same per-GPU recipe
    python train_Full.py --config configs/ffhq_stage2.yaml --expname "$EXPNAME" --dataset_path "$DATASET" ;;
  cpu)     # (on a busy machine OMP_NUM_THREADS=1 is often much faster)
           # a tiny CPU run after `scripts/train_CNeRF.sh cpu` (decoder 16 -> 32)
    python train_Full.py --expname tiny --dataset_path "$DATASET" --device cpu --seed 0 \
      --renderer_spatial_output_dim 16 --size 32 --style_dim 32 --width 32 --N_samples 8 \
      --channel_multiplier 1 --batch 2 --chunk 1 --iter 20 --sample_every 10 --save_every 10 \
      --val_n_sample 2 --truncation_mean 256 ;;
  *) echo "usage: $0 [multi|single|cpu]" >&2; exit 2 ;;
esac

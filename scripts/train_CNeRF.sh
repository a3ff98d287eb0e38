#!/usr/bin/env bash
# Stage 1: the compositional volume renderer at 64x64 (writes checkpoints/<expname>/<expname>_vol_renderer.pt).
# Run from the repository root. DATASET is an LMDB made by prepare_data.py with sizes including 64 and masks.
# The published recipe is configs/ffhq_stage1.yaml; flags after it override it.
set -euo pipefail
DATASET=${DATASET:-./datasets/FFHQ_lmdb}
EXPNAME=${EXPNAME:-ffhq}

case "${1:-multi}" in
  multi)   # 4 GPUs, --batch 1 --chunk 1 each (published launcher; torchrun --nproc_per_node 4 works the same way)
    python -m torch.distributed.launch --master_port 1234 --nproc_per_node 4 train_CNeRF.py \
      --config configs/ffhq_stage1.yaml --expname "$EXPNAME" --dataset_path "$DATASET" ;;
  single)  # one GPU, as published: --batch 4 --chunk 2
    python train_CNeRF.py --config configs/ffhq_stage1.yaml --batch 4 --chunk 2 \
      --expname "$EXPNAME" --dataset_path "$DATASET" ;;
  cpu)     # (on a busy machine OMP_NUM_THREADS=1 is often much faster)
           # a tiny CPU run (seconds per iteration): 16x16 rendering on a 16-px dataset
    python train_CNeRF.py --expname tiny --dataset_path "$DATASET" --device cpu --seed 0 \
      --renderer_spatial_output_dim 16 --size 16 --style_dim 32 --width 32 --N_samples 8 \
      --batch 2 --chunk 1 --iter 20 --sphere_init_iter 20 --sample_every 10 --save_every 10 \
      --val_n_sample 2 --truncation_mean 256 ;;
  *) echo "usage: $0 [multi|single|cpu]" >&2; exit 2 ;;
esac

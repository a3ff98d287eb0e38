#!/usr/bin/env python
"""Train the face parser of calc_metrics.py on an LMDB's images and label maps.

  python tools/train_parser.py --dataset_path LMDB --size S [--out parser.pt] [--epochs 10] [--batch 8]
      [--lr 0.003] [--widths 16,32,64,128] [--holdout 0.1] [--seed 0] [--device cpu]

The LMDB (prepare_data.py --mask_path) must hold images and 19-class label maps at size S; the labels
are merged into the 9 regions of common/regions.py (no dilation). The last --holdout fraction of the images
is held out; the network (face_parser.UNet, Adam, cross-entropy, flips and small shifts) trains on the
rest. Printed and saved with the parser: the held-out IoU per region and their mean (mIoU) -- the
ceiling of calc_metrics.py's semantic-consistency metric with this parser.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.cli import UsageError, check_output, command  # noqa: E402
from common.devices import select_device  # noqa: E402
from dataset import MultiResolutionDataset  # noqa: E402
from evaluation import face_parser  # noqa: E402


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def parse_args(argv=None):
    p = OneLineParser(prog="train_parser.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_path", required=True, help="LMDB with images and label maps (prepare_data.py --mask_path)")
    p.add_argument("--size", type=int, required=True, help="image size to train at (stored in the LMDB)")
    p.add_argument("--out", default="", help="parser file to write (default: parser_<size>.pt beside the LMDB)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training images")
    p.add_argument("--batch", type=int, default=8, help="images per step (small batches learn faster per image here)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay to 0)")
    p.add_argument("--widths", default=",".join(map(str, face_parser.DEFAULT_WIDTHS)),
                   help="U-Net widths per level, finest first")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of images held out (the last ones)")
    p.add_argument("--max_images", type=int, default=0, help="use only the first N images (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")
    return p.parse_args(argv)


@command
def main(argv=None):
    args = parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--widths {args.widths!r}: expected comma-separated integers") from None
    if args.epochs < 1 or args.batch < 2 or not 0 < args.holdout < 1 or not args.lr > 0 or args.max_images < 0:
        raise UsageError("need --epochs >= 1, --batch >= 2, 0 < --holdout < 1, --lr > 0 and --max_images >= 0")
    if len(widths) < 2 or min(widths) < 1:
        raise UsageError(f"--widths {args.widths!r}: U-Net widths must be at least two positive numbers")
    if args.size % 2 ** len(widths):
        raise UsageError(f"--size {args.size} is not divisible by 2^{len(widths)} ({len(widths)} U-Net levels)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.dataset_path)), f"parser_{args.size}.pt")
    check_output(out, "--out", "file", inputs=(args.dataset_path,))
    device = select_device(args.device)
    try:
        data = MultiResolutionDataset(args.dataset_path, resolution=args.size)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--dataset_path: {error}") from None
    n = min(len(data), args.max_images) if args.max_images else len(data)
    train_idx, held_idx = face_parser.split(n, args.holdout)
    images, labels = face_parser.load_images(data, range(n))
    start = time.time()
    model = face_parser.train(images[train_idx], labels[train_idx], widths, args.epochs, args.batch, args.lr,
                              args.seed, device)
    seconds = time.time() - start
    parser = face_parser.Parser(model, out, size=args.size, own=True)
    ious, miou = face_parser.evaluate(parser, images[held_idx], labels[held_idx], device=device)
    held_out = {"miou": miou, "iou": ious, "images": len(held_idx), "dataset": os.path.abspath(args.dataset_path)}
    face_parser.save_parser(out, model, args.size, held_out)
    print(f"trained on {len(train_idx)} images for {args.epochs} epochs in {seconds:.0f} s; "
          f"held-out ({len(held_idx)} images):")
    print(face_parser.iou_table(ious, miou))
    print(f"saved {out}")


if __name__ == "__main__":
    main()

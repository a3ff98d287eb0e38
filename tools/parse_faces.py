#!/usr/bin/env python
"""Label a folder of face photographs with a face parser: one 19-class label map per image.

  python tools/parse_faces.py IMAGES OUT --parser FILE [--size N] [--batch B] [--device D]

Writes OUT/<stem>.png for every image under IMAGES (png, jpg, jpeg, webp; nested folders read, the
output flat): single-channel PNGs of CelebAMask-HQ ids 0-18 at the image's own width and height, ready
for `prepare_data.py --mask_path OUT IMAGES`.

--parser: zllrunning's BiSeNet (face-parsing.PyTorch's `79999_iter.pth`, the parser behind FFHQ label
maps in the neighbouring projects), a parser of tools/train_parser.py, or a TorchScript parser (19
classes in CelebAMask-HQ order, or 9 regions); the format is read from the file and its class order
mapped to CelebAMask-HQ ids by evaluation/face_parser.py's table for it. As upstream, each image is
resized on the PIL image to N×N (bilinear; --size, default 512; a U-Net parses at the size it was
trained at, with LANCZOS as its training images were made), BiSeNet's input normalised with the
ImageNet mean and std, and the label is the argmax of the main output at N×N, brought to the image's
size by nearest neighbour. A 9-region parser writes one id per region (regions.REGION_TO_CELEBAMASK).

Resumable: an existing OUT/<stem>.png is complete (files are written atomically) and skipped. Images
that cannot be read are listed at the end; the others are labelled.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import image_jobs  # noqa: E402
from common.cli import UsageError, command  # noqa: E402
from common.devices import select_device  # noqa: E402
from common.files import atomic_write  # noqa: E402
from evaluation import face_parser  # noqa: E402

READ_THREADS = 4  # decoding and resizing release the GIL: a few threads keep a GPU busy


def parse_args(argv=None):
    p = image_jobs.ArgumentParser(prog="parse_faces.py", description=__doc__.split("\n\n")[0])
    p.add_argument("images", metavar="IMAGES", help="folder of face photographs")
    p.add_argument("out", metavar="OUT", help="folder for the label maps (OUT/<stem>.png)")
    p.add_argument("--parser", required=True, help="BiSeNet state dict, tools/train_parser.py file or TorchScript")
    p.add_argument("--size", type=int, default=0,
                   help="side the parser sees (default 512; a U-Net parses at its trained size)")
    p.add_argument("--batch", type=int, default=8, help="images parsed at once")
    p.add_argument("--device", default=None, help="torch device (default: the accelerator if any, else cpu)")
    return p.parse_args(argv)


def read_image(path):
    """(PIL RGB image, None) or (None, the reason it cannot be read)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB"), None
    except Exception as error:  # any decoding failure of any format: the image is listed, not fatal
        return None, f"{type(error).__name__}: {error}".replace("\n", " ")


def write_label(path, label, size):
    """A label map [S,S] (uint8 ids) brought to `size` (width, height) by nearest neighbour, written atomically."""
    picture = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))  # 2-D uint8: mode L
    if picture.size != tuple(size):
        picture = picture.resize(size, Image.NEAREST)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def parse_folder(parser, images_dir, todo, outputs, size, batch, progress=True):
    """Label the images `todo` (relpaths under images_dir) into outputs[relpath]; returns (written, problems)."""
    device = parser.device
    written, problems = 0, []
    bar = tqdm(total=len(todo), desc="parsing", unit="img", disable=None if progress else True)  # a terminal only
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            loaded = list(pool.map(lambda rel: read_image(os.path.join(images_dir, rel)), chunk))
            good = [(rel, image) for rel, (image, _) in zip(chunk, loaded) if image is not None]
            problems += [f"{os.path.join(images_dir, rel)} ({reason})" for rel, (_, reason) in zip(chunk, loaded)
                         if reason is not None]
            if good:
                inputs = torch.stack([parser.input_from_pil(image, size) for _, image in good]).to(device)
                labels = parser.labels(inputs).cpu().numpy()
                list(pool.map(lambda item: write_label(outputs[item[0][0]], item[1], item[0][1].size),
                              zip(good, labels)))
                written += len(good)
            bar.update(len(chunk))
    bar.close()
    return written, problems


@command
def main(argv=None):
    args = parse_args(argv)
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: must be at least 1")
    if args.size and args.size < 32:
        raise UsageError(f"--size {args.size}: must be at least 32")
    outputs = image_jobs.input_images(args.images, args.out)
    device = select_device(args.device)
    parser = face_parser.load_parser(args.parser, device, size=args.size or None)
    if parser.own and args.size and args.size != parser.size:
        raise UsageError(f"--size {args.size}: {args.parser} is the project's U-Net, which parses at the size it "
                         f"was trained at ({parser.size}); leave --size out")
    todo, done = image_jobs.pending(outputs)
    print(f"parser {parser.label}: {len(todo)} of {len(outputs)} images to label at "
          f"{parser.input_size(args.size or None)} px")
    os.makedirs(args.out, exist_ok=True)
    written, problems = parse_folder(parser, args.images, todo, outputs, args.size or None, args.batch)
    image_jobs.finish("parse_faces.py", args.out, written, done, problems)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Merge CelebAMask-HQ's per-part annotations into one 19-class label map per image.

  python tools/celebamask_labels.py ANNO_DIR OUT

ANNO_DIR is CelebAMask-HQ-mask-anno (its part files `<k//2000>/<k:05d>_<part>.png`, 512×512; any
nesting is read). For image k it writes OUT/<k>.png: a single-channel PNG of CelebAMask-HQ ids (the
order of regions.CELEBAMASK_CLASSES), the parts painted in that order, each where its file is non-zero
(grey or colour files), a later part over an earlier one; a part without a file is absent. The stem is
the image's (CelebA-HQ-img/<k>.jpg), so

  python prepare_data.py --mask_path OUT --out_path LMDB ... CelebA-HQ-img

pairs them, and LMDB index k is image k.

Every part name and every image's part sizes are checked before anything is written: an unknown part,
a file not named <number>_<part>.png, one part in two files, parts of one image that disagree in size,
an unreadable part file or a folder without part files is a one-line error. Resumable: an existing
OUT/<k>.png is complete (files are written atomically) and skipped.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import image_jobs  # noqa: E402
from common.cli import UsageError, check_output, command  # noqa: E402
from common.files import atomic_write  # noqa: E402
from common.regions import CELEBAMASK_CLASSES  # noqa: E402

PARTS = CELEBAMASK_CLASSES[1:]  # painted in this order; part i has id i + 1
PART_FILE = re.compile(r"(\d+)_(.+)\.png", re.IGNORECASE)
SINGLE_CHANNEL = ("1", "L", "I", "I;16", "F")


def find_parts(anno_dir):
    """{image number: {part: path}} of the part files under anno_dir; a UsageError for a file that is not
    <number>_<part>.png with a known part, or a part given twice."""
    found, problems = {}, []
    for dirpath, dirnames, filenames in os.walk(anno_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(".png"):
                continue
            path = os.path.join(dirpath, name)
            match = PART_FILE.fullmatch(name)
            if match is None:
                problems.append(f"{path} is not named <number>_<part>.png")
                continue
            number, part = int(match.group(1)), match.group(2).lower()
            if part not in PARTS:
                problems.append(f"{path}: unknown part {match.group(2)!r}")
                continue
            parts = found.setdefault(number, {})
            if part in parts:
                problems.append(f"{path} and {parts[part]} are both part {part} of image {number}")
                continue
            parts[part] = path
    if problems:
        raise UsageError(f"ANNO_DIR {anno_dir}: {image_jobs.listing(problems)} (parts: {', '.join(PARTS)})")
    if not found:
        raise UsageError(f"ANNO_DIR {anno_dir}: no CelebAMask-HQ part files (<number>_<part>.png) found")
    return found


def check_sizes(number, parts):
    """The (width, height) all of an image's part files share; a UsageError naming them otherwise."""
    sizes = {}
    for part, path in parts.items():
        try:
            with Image.open(path) as image:
                sizes[path] = image.size
        except Exception as error:  # any decoding failure: the file is named
            raise UsageError(f"{path}: unreadable part file ({type(error).__name__}: {error})".replace("\n", " "))
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{os.path.basename(path)} {w}x{h}" for path, (w, h) in sizes.items())
        raise UsageError(f"the parts of image {number} disagree in size: {shown}")
    return next(iter(sizes.values()))


def part_mask(path):
    """Where a part file is non-zero: [H, W] bool (grey, palette or colour files; alpha is ignored)."""
    try:
        with Image.open(path) as image:
            if image.mode in SINGLE_CHANNEL:
                return np.asarray(image) != 0
            return (np.asarray(image.convert("RGB")) != 0).any(axis=-1)
    except Exception as error:  # any decoding failure: the file is named
        raise UsageError(f"{path}: unreadable part file ({type(error).__name__}: {error})".replace("\n", " "))


def merge_parts(parts, size):
    """The label map [H, W] uint8 of one image from its {part: path}: ids in CELEBAMASK_CLASSES order, each
    part painted over the earlier ones."""
    width, height = size
    label = np.zeros((height, width), dtype=np.uint8)
    for class_id, part in enumerate(PARTS, start=1):
        if part in parts:
            label[part_mask(parts[part])] = class_id
    return label


def write_label(path, label):
    picture = Image.fromarray(label)  # 2-D uint8: mode L
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


@command
def main(argv=None):
    p = image_jobs.ArgumentParser(prog="celebamask_labels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("anno_dir", metavar="ANNO_DIR", help="CelebAMask-HQ-mask-anno (part files <k:05d>_<part>.png)")
    p.add_argument("out", metavar="OUT", help="folder for the label maps (OUT/<k>.png)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.anno_dir):
        raise UsageError(f"ANNO_DIR {args.anno_dir}: not a folder")
    check_output(args.out, "OUT", "folder", inputs=[args.anno_dir])
    found = find_parts(args.anno_dir)
    outputs = {number: os.path.join(args.out, f"{number}.png") for number in sorted(found)}
    todo, done = image_jobs.pending(outputs)
    sizes = {number: check_sizes(number, found[number])
             for number in tqdm(todo, desc="checking", unit="img", disable=None)}
    os.makedirs(args.out, exist_ok=True)
    for number in tqdm(todo, desc="merging", unit="img", disable=None):
        write_label(outputs[number], merge_parts(found[number], sizes[number]))
    image_jobs.finish("celebamask_labels.py", args.out, len(todo), done, [], what="label maps")


if __name__ == "__main__":
    main()

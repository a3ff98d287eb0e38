"""Pack an image folder (and, optionally, its 19-class label maps) into one multi-resolution LMDB.

    python prepare_data.py --out_path OUT --n_worker N --size 512,64 [--resample lanczos|bilinear]
                           [--mask_path MASK_DIR] [--skip_unmatched] [--overwrite] INPUT_DIR

Images (png, jpg, jpeg, webp; flat or nested folders, hidden entries skipped) are indexed 0..n-1 in
sorted relative-path order, numeric names in numeric order (CelebA-HQ's 0.jpg, 1.jpg, ..., 10.jpg: LMDB
index k is image k). Each is converted to RGB, its shorter side resized to every size
(LANCZOS by default) and centre-cropped to a square, as StyleGAN2's prepare_data does.

Label maps (`--mask_path`): CelebAMask-HQ ids 0-18, one per image, matched by file stem, stored as a
single-channel PNG or a 2-D integer `.npy`, with the image's aspect ratio. They go through the same
resize (nearest neighbour) and crop, so each stays aligned with its image.

LMDB keys (all values bytes):
    f"{size}-{index:05d}"       PNG of the image at that size (the published key)
    f"mask-{size}-{index:05d}"  PNG (mode L) of the label map at that size, with --mask_path
    "sizes"                     the sizes, comma-separated, e.g. b"512,64"
    "has_masks"                 b"1" or b"0"
    "length"                    the number of images, written last
Readable by `dataset.MultiResolutionDataset`.

Safety. Everything that can be checked is checked before anything is written; problems are reported
as one line on stderr with a non-zero exit status. The LMDB is written into a temporary directory
beside OUT and renamed to OUT only once complete, so an interrupted run never leaves an OUT that
looks finished. An existing OUT is replaced only with --overwrite, and only if it is an LMDB.
"""
import argparse
import os
import shutil
import sys
import tempfile
from io import BytesIO
from multiprocessing import Pool

import numpy as np
from PIL import Image

from common.cli import UsageError, check_output, command

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MASK_EXTENSIONS = (".png", ".npy")
NUM_CLASSES = 19
RESAMPLE = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}
# Masks and images may come from different resolutions (CelebAMask-HQ: 1024px images, 512px masks);
# a relative aspect difference up to this much is rounding, beyond it the pair does not match.
ASPECT_TOLERANCE = 0.01
MAX_LISTED = 10  # problems named in an error line before '... and N more'
COMMIT_EVERY = 256  # images per LMDB write transaction


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        # argparse would print the usage block too; keep every error on a single line.
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def parse_args(argv=None):
    parser = OneLineParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_path", type=str, required=True, help="output LMDB directory")
    parser.add_argument("--size", type=str, default="128,256,512,1024",
                        help="comma-separated output sizes, e.g. 512,64")
    parser.add_argument("--n_worker", type=int, default=8, help="number of worker processes")
    parser.add_argument("--resample", type=str, default="lanczos", choices=sorted(RESAMPLE),
                        help="filter for resizing images (masks always use nearest neighbour)")
    parser.add_argument("--mask_path", type=str, default=None,
                        help="folder of 19-class label maps (.png or .npy), matched to images by stem")
    parser.add_argument("--skip_unmatched", action="store_true",
                        help="leave out images whose mask is missing or invalid instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output LMDB")
    parser.add_argument("path", type=str, help="input image folder")
    return parser.parse_args(argv)


def parse_sizes(text):
    sizes = []
    for token in text.split(","):
        token = token.strip()
        if not token.isdigit() or int(token) <= 0:
            raise UsageError(f"invalid --size value {token!r} in {text!r}: expected positive integers "
                             f"separated by commas, e.g. 512,64")
        if int(token) not in sizes:
            sizes.append(int(token))
    return sizes


def path_order_key(relpath):
    """Sort key of a relative path: folder by folder, names whose stem is a number (CelebA-HQ's 0.jpg ...
    29999.jpg) before the others and in numeric order (2 before 10), the others by name. Zero-padded names
    (FFHQ's 00000.png) keep their order."""
    parts = relpath.replace(os.sep, "/").split("/")
    key = []
    for position, name in enumerate(parts):
        number = os.path.splitext(name)[0] if position == len(parts) - 1 else name
        if number.isascii() and number.isdigit():
            key.append((0, int(number), name))
        else:
            key.append((1, 0, name))
    return key


def list_files(root, extensions):
    """Relative paths of the files under root with one of the extensions, in path_order_key order; hidden
    ones skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found, key=path_order_key)


def stem(relpath):
    return os.path.splitext(os.path.basename(relpath))[0]


def listing(items):
    shown = "; ".join(items[:MAX_LISTED])
    return shown + (f"; ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


# -- image and mask processing (run in the worker processes) ----------------------------------------

def resize_and_crop(img, size, resample):
    """Resize the shorter side to `size`, then crop the centre square (torchvision's arithmetic)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), resample)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def png_bytes(img):
    buffer = BytesIO()
    img.save(buffer, format="png")
    return buffer.getvalue()


def read_label(path):
    """A label map file -> 2-D uint8 array of ids; raises ValueError saying what is wrong."""
    try:
        if path.lower().endswith(".npy"):
            label = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                if img.mode not in ("L", "P", "I", "I;16", "1"):
                    raise ValueError(f"not a single-channel label map (PNG mode {img.mode})")
                label = np.asarray(img)
    except ValueError:
        raise
    except Exception as error:  # unreadable file of any kind
        raise ValueError(f"unreadable ({type(error).__name__}: {error})".replace("\n", " "))
    label = np.squeeze(label) if label.ndim == 3 and 1 in label.shape else label
    if label.ndim != 2:
        raise ValueError(f"not a 2-D label map (shape {label.shape})")
    if label.dtype.kind == "f" and np.all(label == np.round(label)):
        label = label.astype(np.int64)
    if label.dtype.kind not in "iub":
        raise ValueError(f"label map of non-integer type {label.dtype}")
    bad = np.unique(label[(label < 0) | (label >= NUM_CLASSES)])
    if bad.size:
        values = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
        raise ValueError(f"ids outside 0-{NUM_CLASSES - 1}: {values}")
    return label.astype(np.uint8)


def check_pair(task):
    """Validation pass: (image path, mask path or None) -> (image size or None, image error, mask error).

    Reads only the image header, but the whole mask (its ids must be checked).
    """
    image_path, mask_path = task
    try:
        with Image.open(image_path) as img:
            size = img.size
    except Exception as error:
        return None, f"{type(error).__name__}: {error}".replace("\n", " "), None
    if mask_path is None:
        return size, None, None
    try:
        label = read_label(mask_path)
    except ValueError as error:
        return size, None, str(error)
    image_aspect = size[0] / size[1]
    mask_aspect = label.shape[1] / label.shape[0]
    if abs(mask_aspect - image_aspect) > ASPECT_TOLERANCE * image_aspect:
        return size, None, (f"aspect differs from its image: mask {label.shape[1]}x{label.shape[0]}, "
                            f"image {size[0]}x{size[1]}")
    return size, None, None


def convert_pair(task):
    """Writing pass: -> ({size: image PNG}, {size: mask PNG} or None, error or None)."""
    image_path, mask_path, sizes, resample = task
    try:
        with Image.open(image_path) as img:
            img = img.convert("RGB")
        images = {size: png_bytes(resize_and_crop(img, size, resample)) for size in sizes}
    except Exception as error:  # a file whose header was fine but whose data is not
        return None, None, f"{type(error).__name__}: {error}".replace("\n", " ")
    masks = None
    if mask_path is not None:
        label = Image.fromarray(read_label(mask_path), mode="L")
        masks = {size: png_bytes(resize_and_crop(label, size, Image.NEAREST)) for size in sizes}
    return images, masks, None


def pool_map(function, tasks, n_worker, desc):
    """Ordered map with a tqdm bar, in a worker pool (or in-process for a single worker).

    The bar shows on a terminal only (disable=None), so logs and captured stderr keep just messages.
    """
    from tqdm import tqdm

    if n_worker == 1 or len(tasks) <= 1:
        yield from tqdm(map(function, tasks), total=len(tasks), desc=desc, leave=False,
                        disable=None)
        return
    with Pool(min(n_worker, len(tasks))) as pool:
        yield from tqdm(pool.imap(function, tasks, chunksize=4), total=len(tasks), desc=desc,
                        leave=False, disable=None)


# -- the run --------------------------------------------------------------------------------------

def is_lmdb_dir(path):
    return os.path.isdir(path) and set(os.listdir(path)) <= {"data.mdb", "lock.mdb"} and \
        os.path.isfile(os.path.join(path, "data.mdb"))


def validate(args):
    """Every check that needs no writing. Returns (sizes, image list, {image: mask}, skipped)."""
    sizes = parse_sizes(args.size)
    if args.n_worker < 1:
        raise UsageError(f"invalid --n_worker {args.n_worker}: must be at least 1")
    out = os.path.abspath(args.out_path)
    check_output(out, "--out_path", "folder", inputs=(args.path, args.mask_path))
    if os.path.exists(out):
        if not args.overwrite:
            raise UsageError(f"output {args.out_path} already exists; pass --overwrite to replace it")
        if not is_lmdb_dir(out) and not (os.path.isdir(out) and not os.listdir(out)):
            raise UsageError(f"output {args.out_path} exists and is not an LMDB directory; "
                             f"refusing to replace it even with --overwrite")
    if not os.path.isdir(args.path):
        raise UsageError(f"input folder {args.path} does not exist or is not a folder")
    images = list_files(args.path, IMAGE_EXTENSIONS)
    if not images:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {args.path}")

    masks = {}
    if args.mask_path is not None:
        if not os.path.isdir(args.mask_path):
            raise UsageError(f"mask folder {args.mask_path} does not exist or is not a folder")
        by_stem = {}
        for relpath in list_files(args.mask_path, MASK_EXTENSIONS):
            by_stem.setdefault(stem(relpath), []).append(relpath)
        clashes = [" and ".join(paths) for paths in by_stem.values() if len(paths) > 1]
        if clashes:
            raise UsageError(f"ambiguous masks in {args.mask_path} (one stem, several files): "
                             f"{listing(clashes)}")
        image_stems = {}
        for relpath in images:
            image_stems.setdefault(stem(relpath), []).append(relpath)
        clashes = [" and ".join(paths) for paths in image_stems.values() if len(paths) > 1]
        if clashes:
            raise UsageError(f"images in {args.path} share a stem, so masks cannot be matched: "
                             f"{listing(clashes)}")
        for relpath in images:
            if stem(relpath) in by_stem:
                masks[relpath] = os.path.join(args.mask_path, by_stem[stem(relpath)][0])

    # Read every header (and every mask) before writing: unreadable images are skipped later,
    # mismatched masks stop the run here.
    tasks = [(os.path.join(args.path, p), masks.get(p)) for p in images]
    unreadable, unmatched = {}, {}  # image relpath -> description of the problem
    for relpath, (_, image_error, mask_error) in zip(
            images, pool_map(check_pair, tasks, args.n_worker, "checking")):
        path = os.path.join(args.path, relpath)
        if image_error:
            unreadable[relpath] = f"{path} ({image_error})"
        elif args.mask_path is not None and relpath not in masks:
            unmatched[relpath] = (f"{path} (no mask named {stem(relpath)}.png or .npy in "
                                  f"{args.mask_path})")
        elif mask_error:
            unmatched[relpath] = f"{path} (mask {masks[relpath]}: {mask_error})"
    if unmatched and not args.skip_unmatched:
        raise UsageError(f"{len(unmatched)} of {len(images)} images have no usable mask, nothing "
                         f"written (pass --skip_unmatched to leave them out): "
                         f"{listing(list(unmatched.values()))}")
    keep = [p for p in images if p not in unreadable and p not in unmatched]
    if not keep:
        raise UsageError(f"none of the {len(images)} images under {args.path} can be used: "
                         f"{listing(list(unreadable.values()) + list(unmatched.values()))}")
    skipped = {"unreadable": list(unreadable.values()), "unmatched": list(unmatched.values())}
    return sizes, keep, masks, skipped


def write_lmdb(args, sizes, images, masks):
    """Write into a temporary LMDB beside OUT, then move it into place. Returns (written, unreadable)."""
    import lmdb

    out = os.path.abspath(args.out_path)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    use_masks = args.mask_path is not None
    try:
        tasks = [(os.path.join(args.path, p), masks.get(p) if use_masks else None, sizes,
                  RESAMPLE[args.resample]) for p in images]
        unreadable = []
        index = 0
        # No fsync per commit (sync=False): the LMDB only becomes OUT after the final sync below, so
        # a crash can never leave a partial one in place; commit in batches to bound memory.
        with lmdb.open(temp, map_size=1024 ** 4, readahead=False, sync=False) as env:
            txn = env.begin(write=True)
            try:
                for relpath, (image_pngs, mask_pngs, error) in zip(
                        images, pool_map(convert_pair, tasks, args.n_worker, "writing")):
                    if error:
                        path = os.path.join(args.path, relpath)
                        print(f"prepare_data.py: skipping unreadable image {path} ({error})",
                              file=sys.stderr)
                        unreadable.append(f"{path} ({error})")
                        continue
                    # Index only images that were written, so the keys stay contiguous.
                    for size in sizes:
                        txn.put(f"{size}-{index:05d}".encode(), image_pngs[size])
                        if mask_pngs is not None:
                            txn.put(f"mask-{size}-{index:05d}".encode(), mask_pngs[size])
                    index += 1
                    if index % COMMIT_EVERY == 0:
                        txn.commit()
                        txn = env.begin(write=True)
                if index == 0:
                    raise UsageError(f"none of the images under {args.path} could be decoded")
                txn.put(b"sizes", ",".join(str(s) for s in sizes).encode())
                txn.put(b"has_masks", b"1" if use_masks else b"0")
                txn.put(b"length", str(index).encode())  # last: marks the LMDB complete
                txn.commit()
            except BaseException:
                txn.abort()
                raise
            env.sync(True)
        if os.path.exists(out):  # validated: an LMDB (or empty folder) and --overwrite given
            shutil.rmtree(out)
        os.rename(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return index, unreadable


@command
def main(argv=None):
    args = parse_args(argv)
    sizes, images, masks, skipped = validate(args)
    for entry in skipped["unreadable"]:
        print(f"prepare_data.py: skipping unreadable image {entry}", file=sys.stderr)
    for entry in skipped["unmatched"]:
        print(f"prepare_data.py: skipping image without usable mask {entry}", file=sys.stderr)
    try:
        written, late_unreadable = write_lmdb(args, sizes, images, masks)
    except KeyboardInterrupt:
        print("prepare_data.py: interrupted, nothing written", file=sys.stderr)
        return 130
    n_unreadable = len(skipped["unreadable"]) + len(late_unreadable)
    n_unmatched = len(skipped["unmatched"])
    print(f"wrote {written} images to {args.out_path}: sizes {','.join(map(str, sizes))}, "
          f"masks {'yes' if args.mask_path is not None else 'no'}, "
          f"skipped {n_unreadable} unreadable and {n_unmatched} without a usable mask")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training data: the multi-resolution LMDB dataset with semantic masks (SPEC §14).

An item is (image [3,S,S] in [-1,1], low-res image [3,R,R] in [-1,1], mask [9,S,S] in {0,1}) where S is
the dataset `resolution` and R the `nerf_resolution`.

Storage. `prepare_data.py` writes one LMDB holding everything (key scheme documented there):
    f"{size}-{index:05d}"       PNG bytes of the RGB image
    f"mask-{size}-{index:05d}"  PNG bytes of the 19-class label map (mode L), optional
    "length"                    number of images (written last)
LMDBs made by the published tools have no mask keys; their label maps live in the published layout
`<path with 'lmdb' replaced by 'mask_<size>'>/<index:05d>.npy`, which is read when the LMDB has none.
"""
import os
import random
import re
from io import BytesIO

import lmdb
import numpy as np
import torch
from PIL import Image
from torch.utils import data
from torchvision import transforms

from common.regions import NUM_REGIONS, REGIONS

# Square dilation size per CelebAMask-HQ id, applied before the 19 -> 9 merge; ids not listed are
# used as they are. Small parts are grown so that they survive the low-resolution rendering.
DILATION_KERNELS = {2: 3, 4: 3, 5: 3, 10: 3, 11: 3, 12: 3, 6: 4, 7: 4, 8: 5, 9: 5}


_ENVIRONMENTS = {}


def _environment(path):
    """A read-only LMDB environment for `path`, shared within a process.

    py-lmdb refuses to open one file twice in a process (two datasets on one LMDB would fail), and an
    environment must not be used across a fork (DataLoader workers). So keep one per path, and in a
    forked child close the inherited handle (this unmaps it in the child only) and open a fresh one;
    likewise when the LMDB on disk has been replaced since it was opened.
    """
    real = os.path.realpath(path)
    # The inode tells a replaced LMDB (prepare_data.py --overwrite) from the one already open.
    inode = os.stat(os.path.join(real, "data.mdb")).st_ino
    pid, opened_inode, env = _ENVIRONMENTS.get(real, (None, None, None))
    if pid != os.getpid() or opened_inode != inode:
        if env is not None:
            env.close()
        env = lmdb.open(path, max_readers=64, readonly=True, lock=False, readahead=False,
                        meminit=False)
        _ENVIRONMENTS[real] = (os.getpid(), inode, env)
    return env


def image_key(size, index):
    return f"{size}-{index:05d}".encode("utf-8")


def mask_key(size, index):
    return f"mask-{size}-{index:05d}".encode("utf-8")


def published_mask_dir(path, resolution):
    """Where the published loader looks for label maps: the dataset path with 'lmdb' replaced.

    This is a plain string replacement, as in the published code; a path without 'lmdb' therefore
    points at the LMDB directory itself.
    """
    return str(path).replace("lmdb", f"mask_{resolution}")


def default_transform():
    """uint8 PIL image -> float tensor in [-1, 1]."""
    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), inplace=True),
    ])


def dilate(binary, k):
    """Binary dilation with a k x k square, matching OpenCV's `cv2.dilate` with its default anchor.

    OpenCV anchors the element at (k//2, k//2), so a set pixel at row/column p spreads to
    p-(k-1)//2 ... p+k//2: for even k the reach is asymmetric (k=4: one up/left, two down/right),
    which scipy's centred default would not reproduce. Pixels outside the image count as unset.
    Separable: dilate the columns, then the rows.
    """
    binary = np.asarray(binary, dtype=bool)
    if k <= 1:
        return binary.copy()
    # out[p] = OR of src[p + s] for s in [-(k//2), (k-1)//2]
    shifts = range(-(k // 2), (k - 1) // 2 + 1)
    rows = np.zeros_like(binary)
    width = binary.shape[1]
    for s in shifts:
        if s >= 0:
            rows[:, :width - s] |= binary[:, s:]
        else:
            rows[:, -s:] |= binary[:, :width + s]
    out = np.zeros_like(binary)
    height = binary.shape[0]
    for s in shifts:
        if s >= 0:
            out[:height - s] |= rows[s:]
        else:
            out[-s:] |= rows[:height + s]
    return out


def label_to_mask(label):
    """19-class label map [H, W] -> float32 region masks [9, H, W] (SPEC §14).

    One binary map per class id, dilated per DILATION_KERNELS, then summed into the regions of
    SPEC §1 and clamped to [0, 1] -- i.e. a logical OR, so regions may overlap where a dilated part
    grows over its neighbours.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D [H, W], got shape {label.shape}")
    mask = np.zeros((NUM_REGIONS,) + label.shape, dtype=bool)
    for region, (_, ids, _) in enumerate(REGIONS):
        for class_id in ids:
            part = label == class_id
            if class_id in DILATION_KERNELS and part.any():
                part = dilate(part, DILATION_KERNELS[class_id])
            mask[region] |= part
    return mask.astype(np.float32)


def process_item(img, label, flip, transform=None, nerf_resolution=64):
    """Turn one stored (image, label map) pair into a training item; the flip decision is given.

    img: PIL RGB image (S x S); label: [S, S] integer array of CelebAMask-HQ ids.
    The label map is flipped together with the image and *before* dilation (the even 4x4 kernel is
    not mirror-symmetric, so the order matters). The low-res image is the flipped image resized with
    PIL's HAMMING filter.
    """
    transform = transform or default_transform()
    label = np.asarray(label)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        label = label[:, ::-1]
    thumb = img.resize((nerf_resolution, nerf_resolution), Image.HAMMING)
    mask = torch.from_numpy(label_to_mask(label))
    return transform(img), transform(thumb), mask


class MultiResolutionDataset(data.Dataset):
    """(image, low-res image, 9-channel mask) items from an LMDB prepared by `prepare_data.py`.

    masks=False opens an LMDB for its images alone (`load` then gives no label map; items need masks).

    Each item is flipped left-right with probability 1/2 (Python's `random`, which DataLoader seeds
    per worker); `get(index, flip)` gives an item with a chosen flip.
    Raises ValueError / FileNotFoundError with a one-line message when the path is not a prepared
    LMDB, the resolution is not stored, or masks are missing.
    """

    def __init__(self, path, transform=None, resolution=256, nerf_resolution=64, masks=True):
        self.path = str(path)
        self.masks = bool(masks)
        self.transform = transform or default_transform()
        self.resolution = int(resolution)
        self.nerf_resolution = int(nerf_resolution)

        if not os.path.isdir(self.path) or not os.path.isfile(os.path.join(self.path, "data.mdb")):
            what = "does not exist" if not os.path.exists(self.path) else "has no data.mdb"
            raise FileNotFoundError(f"dataset path {self.path} is not an LMDB directory ({what}); "
                                    f"create one with prepare_data.py")
        with self._txn() as txn:
            length = txn.get(b"length")
            if length is None:
                raise ValueError(f"{self.path} is not a complete dataset LMDB: no 'length' key "
                                 f"(not made by prepare_data.py, or its writing was interrupted)")
            self.length = int(length.decode("utf-8"))
            if self.length <= 0:
                raise ValueError(f"{self.path} holds no images (length {self.length})")
            if txn.get(image_key(self.resolution, 0)) is None:
                stored = ", ".join(str(s) for s in self._stored_sizes(txn)) or "none"
                raise ValueError(f"resolution {self.resolution} is not stored in {self.path} "
                                 f"(stored: {stored}); rerun prepare_data.py with --size including it")
            mask_keys = self._count_prefix(txn, f"mask-{self.resolution}-".encode())

        self.mask_dir = None
        if not self.masks:  # images only (e.g. FID statistics): masks are neither needed nor looked for
            missing = []
        elif mask_keys == 0:
            # No masks in the LMDB: fall back to the published .npy layout beside it.
            mask_dir = published_mask_dir(self.path, self.resolution)
            if not os.path.isfile(os.path.join(mask_dir, "00000.npy")):
                raise FileNotFoundError(
                    f"no masks for {self.path} at resolution {self.resolution}: the LMDB has no "
                    f"'mask-{self.resolution}-*' keys and {os.path.join(mask_dir, '00000.npy')} does "
                    f"not exist; rerun prepare_data.py with --mask_path")
            self.mask_dir = mask_dir
            present = set(os.listdir(mask_dir))
            missing = [i for i in range(self.length) if f"{i:05d}.npy" not in present]
        elif mask_keys != self.length:
            with self._txn() as txn:
                missing = [i for i in range(self.length)
                           if txn.get(mask_key(self.resolution, i)) is None]
        else:
            missing = []
        if missing:
            where = self.mask_dir or f"{self.path} (keys mask-{self.resolution}-*)"
            shown = ", ".join(f"{i:05d}" for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(f"{len(missing)} of {self.length} images have no mask in "
                                    f"{where}: index {shown}")

    # -- LMDB access ---------------------------------------------------------------------------

    def _txn(self):
        return _environment(self.path).begin(write=False)

    @staticmethod
    def _stored_sizes(txn):
        sizes = txn.get(b"sizes")
        if sizes is not None:
            return sorted(int(s) for s in sizes.decode("utf-8").split(",") if s)
        # LMDBs from the published tool have no 'sizes' key: find the f"{size}-00000" keys.
        found = set()
        with txn.cursor() as cursor:
            for key in cursor.iternext(keys=True, values=False):
                match = re.fullmatch(rb"(\d+)-00000", key)
                if match:
                    found.add(int(match.group(1)))
        return sorted(found)

    @staticmethod
    def _count_prefix(txn, prefix):
        count = 0
        with txn.cursor() as cursor:
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    count += 1
        return count

    # -- items ---------------------------------------------------------------------------------

    def __len__(self):
        return self.length

    def load(self, index):
        """The stored (PIL RGB image, [S, S] uint8 label map) for an index, unflipped; the label map is
        None for a dataset opened with masks=False."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images in {self.path}")
        with self._txn() as txn:
            img_bytes = txn.get(image_key(self.resolution, index))
            label_bytes = None if self.mask_dir else txn.get(mask_key(self.resolution, index))
        if img_bytes is None:
            raise ValueError(f"{self.path} has no key {image_key(self.resolution, index).decode()}")
        img = Image.open(BytesIO(img_bytes)).convert("RGB")

        if not self.masks:
            return img, None
        if self.mask_dir:
            npy = os.path.join(self.mask_dir, f"{index:05d}.npy")
            if not os.path.isfile(npy):
                raise FileNotFoundError(f"no mask for index {index}: {npy} does not exist")
            label = np.load(npy, allow_pickle=False)
            source = npy
        else:
            if label_bytes is None:
                raise FileNotFoundError(f"no mask for index {index}: {self.path} has no key "
                                        f"{mask_key(self.resolution, index).decode()}")
            label = np.asarray(Image.open(BytesIO(label_bytes)))
            source = f"{self.path}:{mask_key(self.resolution, index).decode()}"
        label = np.squeeze(label)  # tolerate [1,S,S] / [S,S,1] label files
        if label.shape != (img.height, img.width):
            raise ValueError(f"mask {source} has shape {label.shape}, expected "
                             f"{(img.height, img.width)} like its image")
        return img, label

    def get(self, index, flip):
        """The item for `index` with the given flip decision."""
        img, label = self.load(index)
        return process_item(img, label, flip, self.transform, self.nerf_resolution)

    def __getitem__(self, index):
        return self.get(index, flip=random.random() < 0.5)


def data_sampler(dataset, shuffle, distributed):
    """The sampler the training scripts use: distributed, shuffled or sequential."""
    if distributed:
        return data.distributed.DistributedSampler(dataset, shuffle=shuffle)
    if shuffle:
        return data.RandomSampler(dataset)
    return data.SequentialSampler(dataset)


def sample_data(loader):
    """Iterate over a DataLoader forever (training counts iterations, not epochs)."""
    while True:
        for batch in loader:
            yield batch

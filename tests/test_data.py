"""Data side (SPEC §14): masks, dilation, the dataset, prepare_data.py and the synthetic portraits."""
import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dataset as ds  # noqa: E402
import prepare_data  # noqa: E402
from common.regions import REGION_COLORS, color_segmap, label19_to_regions  # noqa: E402
from helpers import load_script  # noqa: E402

REFERENCE = SHARED / "reference" / "data_vectors.pt"

sp = load_script("tools/synthetic_portraits.py")


# -- helpers --------------------------------------------------------------------------------------

def run_prepare(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def read_lmdb(path):
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        return {key.decode(): value for key, value in txn.cursor()}


def png_array(data):
    return np.asarray(Image.open(io.BytesIO(data)))


def write_published_layout(root, images, labels, size):
    """An LMDB as the published tool writes it (image keys + length) and masks in mask_<size>/."""
    lmdb_path = root / "faces_lmdb"
    with lmdb.open(str(lmdb_path), map_size=1 << 28) as env, env.begin(write=True) as txn:
        for i, image in enumerate(images):
            txn.put(f"{size}-{i:05d}".encode(), prepare_data.png_bytes(Image.fromarray(image)))
        txn.put(b"length", str(len(images)).encode())
    mask_dir = root / f"faces_mask_{size}"
    mask_dir.mkdir()
    for i, label in enumerate(labels):
        np.save(mask_dir / f"{i:05d}.npy", label)
    return lmdb_path, mask_dir


def assert_one_line_error(result, *fragments, status=1):
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])


def assert_nothing_written(out):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if ".partial-" in p.name]
    assert leftovers == []


def mask_pixels(channel):
    return {tuple(p) for p in np.argwhere(np.asarray(channel) > 0)}


def block(rows, cols):
    return {(r, c) for r in rows for c in cols}


@pytest.fixture(scope="module")
def portraits(tmp_path_factory):
    """Six 48px synthetic portraits: (images dir, masks dir, list of (image, label))."""
    out = tmp_path_factory.mktemp("portraits")
    images_dir, masks_dir = sp.make_portraits(str(out), n=6, size=48, seed=3)
    pairs = [(np.asarray(Image.open(os.path.join(images_dir, f"{i:05d}.png"))),
              np.asarray(Image.open(os.path.join(masks_dir, f"{i:05d}.png")))) for i in range(6)]
    return Path(images_dir), Path(masks_dir), pairs


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.exists():
        pytest.skip(f"reference data {REFERENCE} is absent (../shared beside the repository)")
    return torch.load(REFERENCE, weights_only=True)


# -- dilation and merge on hand-built label maps --------------------------------------------------

@pytest.mark.parametrize("k, rows", [(1, [5]), (3, [4, 5, 6]), (4, [4, 5, 6, 7]), (5, [3, 4, 5, 6, 7])])
def test_dilate_single_pixel_follows_opencv_anchor(k, rows):
    # A pixel at p spreads to p-(k-1)//2 ... p+k//2: for k=4 one up/left, two down/right.
    src = np.zeros((11, 12), bool)
    src[5, 5] = True
    assert mask_pixels(ds.dilate(src, k)) == block(rows, rows)


def test_dilate_stays_inside_the_image():
    src = np.zeros((6, 7), bool)
    src[0, 0] = src[5, 6] = True
    out = ds.dilate(src, 4)
    assert out.shape == (6, 7)
    # (0,0) reaches rows/cols -1..2 (clipped to 0..2); (5,6) reaches 4..7 (clipped to 4..5 / 5..6).
    assert mask_pixels(out) == block([0, 1, 2], [0, 1, 2]) | block([4, 5], [5, 6])
    assert not ds.dilate(np.zeros((5, 5), bool), 5).any()  # nothing enters from outside


def test_label_to_mask_merges_dilated_classes_exactly():
    label = np.zeros((10, 10), np.uint8)
    label[2, 3] = 6     # l_brow, 4x4 -> brow rows 1..4, cols 2..5
    label[7, 7] = 8     # l_ear, 5x5 -> ear rows 5..9, cols 5..9 (clipped)
    label[0, 9] = 15    # earring: ear region, not dilated
    label[9, 0] = 1     # skin: not dilated
    label[5, 1] = 13    # hair: not dilated
    label[0, 0] = 14    # hat -> hair region
    label[8, 2] = 17    # neck -> neck+cloth, not dilated
    mask = ds.label_to_mask(label)
    assert mask.shape == (9, 10, 10) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert mask_pixels(mask[4]) == block(range(1, 5), range(2, 6))
    assert mask_pixels(mask[6]) == block(range(5, 10), range(5, 10)) | {(0, 9)}
    assert mask_pixels(mask[1]) == {(9, 0)}
    assert mask_pixels(mask[7]) == {(5, 1), (0, 0)}
    assert mask_pixels(mask[8]) == {(8, 2)}
    assert mask_pixels(mask[0]) == {tuple(p) for p in np.argwhere(label == 0)}  # background as is
    for empty in (2, 3, 5):
        assert not mask[empty].any()


def test_label_to_mask_3x3_classes_and_clamp():
    label = np.zeros((8, 8), np.uint8)
    label[3, 3], label[3, 4] = 11, 12   # lips side by side: their 3x3 squares overlap, summed then clamped
    label[6, 1] = 2                    # nose, 3x3
    label[0, 7] = 4                    # l_eye at a corner, 3x3
    label[7, 7] = 3                    # glasses: eye region, not dilated
    mask = ds.label_to_mask(label)
    assert mask_pixels(mask[3]) == block([2, 3, 4], [2, 3, 4, 5])
    assert mask[3].max() == 1.0
    assert mask_pixels(mask[5]) == block([5, 6, 7], [0, 1, 2])
    assert mask_pixels(mask[2]) == block([0, 1], [6, 7]) | {(7, 7)}
    # Regions overlap where a dilated part grows over a neighbour: the nose covers background too.
    assert mask[0, 5, 0] == 1 and mask[5, 5, 0] == 1


def test_label_to_mask_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        ds.label_to_mask(np.zeros((2, 4, 4), np.uint8))


# -- one item: flip, thumbnail, normalisation ----------------------------------------------------

def test_flip_moves_image_and_mask_together_before_dilation():
    size = 12
    label = np.zeros((size, size), np.uint8)
    label[:, :3] = 13                 # hair strip on the left
    label[4, 6] = 6                   # one brow pixel (4x4 kernel, not mirror-symmetric)
    label[8, 7] = 2                   # one nose pixel (3x3, symmetric)
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = label * 10        # the image encodes the labels
    image[..., 1] = np.arange(size) * 20
    pil = Image.fromarray(image)

    img0, thumb0, mask0 = ds.process_item(pil, label, flip=False, nerf_resolution=6)
    img1, thumb1, mask1 = ds.process_item(pil, label, flip=True, nerf_resolution=6)
    assert torch.equal(img1, img0.flip(-1))
    assert img0.min() >= -1 and img0.max() <= 1
    assert torch.allclose(img0[0], torch.from_numpy(label * 10 / 127.5 - 1).float(), atol=1e-6)
    expected_thumb = ds.default_transform()(pil.transpose(Image.FLIP_LEFT_RIGHT).resize((6, 6), Image.HAMMING))
    assert thumb1.shape == (3, 6, 6) and torch.equal(thumb1, expected_thumb)
    # Hair (undilated) sits under the image's hair pixels after the flip.
    assert mask_pixels(mask1[7]) == block(range(size), [9, 10, 11])
    assert torch.equal(mask1[7], mask0[7].flip(-1))
    # Brow flipped to column 5 first, then dilated 4x4: cols 4..7, rows 3..6 -- not the mirror of
    # the unflipped mask (cols 5..8 -> mirrored 3..6).
    assert mask_pixels(mask0[4]) == block(range(3, 7), range(5, 9))
    assert mask_pixels(mask1[4]) == block(range(3, 7), range(4, 8))
    assert not torch.equal(mask1[4], mask0[4].flip(-1))
    assert torch.equal(mask1[5], mask0[5].flip(-1))  # 3x3 is symmetric


# -- the published loader's outputs ----------------------------------------------------------------

def test_reference_vectors_via_published_layout(reference, tmp_path):
    inputs, outputs = reference["inputs"], reference["outputs"]
    images = inputs["image_uint8_hwc"].numpy()
    labels = inputs["label19"].numpy()
    size, nerf = reference["config"]["size"], reference["config"]["nerf_resolution"]
    lmdb_path, mask_dir = write_published_layout(tmp_path, images, labels, size)
    data = ds.MultiResolutionDataset(str(lmdb_path), resolution=size, nerf_resolution=nerf)
    assert data.mask_dir == str(mask_dir) and len(data) == len(images)
    for i in range(len(images)):
        flip = bool(outputs["flipped"][i])
        image, thumb, mask = data.get(i, flip)
        assert torch.allclose(image, outputs["image"][i], atol=1e-6, rtol=0)
        assert torch.allclose(thumb, outputs["thumb"][i], atol=1e-6, rtol=0)
        assert mask.dtype == torch.float32 and torch.equal(mask, outputs["mask9"][i])
    assert bool(outputs["flipped"].any()) and not bool(outputs["flipped"].all())


def test_reference_vectors_via_prepare_data(reference, tmp_path):
    """The user's path: image PNGs + .npy label maps -> prepare_data.py -> dataset, same outputs."""
    inputs, outputs = reference["inputs"], reference["outputs"]
    size, nerf = reference["config"]["size"], reference["config"]["nerf_resolution"]
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for i, (image, label) in enumerate(zip(inputs["image_uint8_hwc"].numpy(), inputs["label19"].numpy())):
        Image.fromarray(image).save(tmp_path / "img" / f"face{i}.png")
        np.save(tmp_path / "lab" / f"face{i}.npy", label)
    out = tmp_path / "out_lmdb"
    result = run_prepare("--out_path", out, "--n_worker", 1, "--size", size,
                         "--mask_path", tmp_path / "lab", tmp_path / "img")
    assert result.returncode == 0, result.stderr
    data = ds.MultiResolutionDataset(str(out), resolution=size, nerf_resolution=nerf)
    assert data.mask_dir is None  # masks come from the LMDB
    for i in range(len(data)):
        image, thumb, mask = data.get(i, bool(outputs["flipped"][i]))
        assert torch.allclose(image, outputs["image"][i], atol=1e-6, rtol=0)
        assert torch.allclose(thumb, outputs["thumb"][i], atol=1e-6, rtol=0)
        assert torch.equal(mask, outputs["mask9"][i])


# -- the dataset ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(portraits, tmp_path_factory):
    images_dir, masks_dir, pairs = portraits
    out = tmp_path_factory.mktemp("prepared") / "synth_lmdb"
    result = run_prepare("--out_path", out, "--n_worker", 2, "--size", "48,32",
                         "--mask_path", masks_dir, images_dir)
    assert result.returncode == 0, result.stderr
    return out, result, pairs


def test_prepare_data_round_trip(prepared):
    out, result, pairs = prepared
    assert result.stdout.strip().splitlines()[-1] == (
        f"wrote 6 images to {out}: sizes 48,32, masks yes, skipped 0 unreadable and 0 without a usable mask")
    store = read_lmdb(out)
    expected_keys = {f"{p}{s}-{i:05d}" for p in ("", "mask-") for s in (48, 32) for i in range(6)}
    assert set(store) == expected_keys | {"length", "sizes", "has_masks"}
    assert store["length"] == b"6" and store["sizes"] == b"48,32" and store["has_masks"] == b"1"
    for i, (image, label) in enumerate(pairs):
        assert np.array_equal(png_array(store[f"48-{i:05d}"]), image)       # same size: lossless
        assert np.array_equal(png_array(store[f"mask-48-{i:05d}"]), label)
        small = np.asarray(Image.fromarray(image).resize((32, 32), Image.LANCZOS))
        assert np.array_equal(png_array(store[f"32-{i:05d}"]), small)
        small_label = np.asarray(Image.fromarray(label).resize((32, 32), Image.NEAREST))
        assert np.array_equal(png_array(store[f"mask-32-{i:05d}"]), small_label)


def test_dataset_reads_masks_from_lmdb(prepared):
    out, _, pairs = prepared
    data = ds.MultiResolutionDataset(str(out), resolution=48, nerf_resolution=16)
    again = ds.MultiResolutionDataset(str(out), resolution=32, nerf_resolution=16)  # same LMDB twice
    assert len(data) == 6 and len(again) == 6
    for i, (image, label) in enumerate(pairs):
        img, thumb, mask = data.get(i, flip=False)
        assert img.shape == (3, 48, 48) and thumb.shape == (3, 16, 16) and mask.shape == (9, 48, 48)
        assert torch.equal(img, ds.default_transform()(Image.fromarray(image)))
        assert torch.equal(mask, torch.from_numpy(ds.label_to_mask(label)))
    assert again.get(0, flip=False)[2].shape == (9, 32, 32)


def test_getitem_flips_at_random(prepared):
    out, _, _ = prepared
    data = ds.MultiResolutionDataset(str(out), resolution=48, nerf_resolution=16)
    plain, flipped = data.get(2, False), data.get(2, True)
    random.seed(0)
    seen = []
    for _ in range(16):
        item = data[2]
        matches = [all(torch.equal(a, b) for a, b in zip(item, ref)) for ref in (plain, flipped)]
        assert sum(matches) == 1
        seen.append(matches[1])
    assert 0 < sum(seen) < 16


def test_dataloader_workers_and_helpers(prepared):
    out, _, _ = prepared
    data = ds.MultiResolutionDataset(str(out), resolution=32, nerf_resolution=16)
    sampler = ds.data_sampler(data, shuffle=False, distributed=False)
    assert isinstance(sampler, torch.utils.data.SequentialSampler)
    assert isinstance(ds.data_sampler(data, shuffle=True, distributed=False), torch.utils.data.RandomSampler)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler, num_workers=2, drop_last=True)
    batches = ds.sample_data(loader)
    shapes = [tuple(t.shape for t in next(batches)) for _ in range(3)]  # 3 batches > 1 epoch of 1
    assert shapes == [((4, 3, 32, 32), (4, 3, 16, 16), (4, 9, 32, 32))] * 3


def test_dataset_errors(prepared, tmp_path):
    out, _, _ = prepared
    missing = tmp_path / "nowhere_lmdb"
    with pytest.raises(FileNotFoundError, match="not an LMDB directory.*does not exist") as error:
        ds.MultiResolutionDataset(str(missing))
    assert str(missing) in str(error.value)
    with pytest.raises(FileNotFoundError, match="not an LMDB directory.*no data.mdb"):
        ds.MultiResolutionDataset(str(tmp_path))

    incomplete = tmp_path / "half_lmdb"
    with lmdb.open(str(incomplete)) as env, env.begin(write=True) as txn:
        txn.put(b"64-00000", b"x")
    with pytest.raises(ValueError, match="no 'length' key"):
        ds.MultiResolutionDataset(str(incomplete), resolution=64)

    with pytest.raises(ValueError, match=r"resolution 256 is not stored .*\(stored: 32, 48\)") as error:
        ds.MultiResolutionDataset(str(out), resolution=256)
    assert "\n" not in str(error.value)


def test_dataset_lists_sizes_of_published_lmdb(tmp_path):
    # No 'sizes' key (published tool): the stored sizes are found from the image keys.
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    lmdb_path, _ = write_published_layout(tmp_path, images, [np.zeros((8, 8), np.uint8)] * 2, 8)
    with lmdb.open(str(lmdb_path)) as env, env.begin(write=True) as txn:
        txn.put(b"16-00000", b"x")
    with pytest.raises(ValueError, match=r"\(stored: 8, 16\)"):
        ds.MultiResolutionDataset(str(lmdb_path), resolution=32)


def test_dataset_without_masks_says_where_it_looked(portraits, tmp_path):
    images_dir, _, _ = portraits
    out = tmp_path / "plain_lmdb"
    assert run_prepare("--out_path", out, "--n_worker", 1, "--size", 32, images_dir).returncode == 0
    assert read_lmdb(out)["has_masks"] == b"0"
    with pytest.raises(FileNotFoundError) as error:
        ds.MultiResolutionDataset(str(out), resolution=32)
    message = str(error.value)
    assert "'mask-32-*'" in message and str(tmp_path / "plain_mask_32" / "00000.npy") in message
    assert "\n" not in message


def test_dataset_index_without_mask(tmp_path):
    images = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(4)]
    labels = [np.full((8, 8), i, np.uint8) for i in range(4)]
    lmdb_path, mask_dir = write_published_layout(tmp_path, images, labels, 8)
    (mask_dir / "00002.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 images have no mask in .*index 00002") as error:
        ds.MultiResolutionDataset(str(lmdb_path), resolution=8, nerf_resolution=4)
    assert str(mask_dir) in str(error.value)

    np.save(mask_dir / "00002.npy", labels[2])
    data = ds.MultiResolutionDataset(str(lmdb_path), resolution=8, nerf_resolution=4)
    assert torch.equal(data.get(1, False)[2][1], torch.ones(8, 8))  # label 1 = skin -> face
    (mask_dir / "00003.npy").unlink()  # removed after start-up: reported when the item is read
    with pytest.raises(FileNotFoundError, match=r"no mask for index 3: .*00003.npy does not exist"):
        data.get(3, False)
    np.save(mask_dir / "00003.npy", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"00003.npy has shape \(4, 4\), expected \(8, 8\)"):
        data.get(3, False)
    with pytest.raises(IndexError):
        data.get(4, False)


# -- prepare_data.py details ------------------------------------------------------------------------

def test_resize_and_crop_matches_stylegan2_arithmetic():
    image = Image.fromarray(np.arange(60 * 90 * 3, dtype=np.uint8).reshape(60, 90, 3))  # 90 wide
    out = prepare_data.resize_and_crop(image, 30, Image.NEAREST)
    assert out.size == (30, 30)
    expected = image.resize((45, 30), Image.NEAREST).crop((8, 0, 38, 30))  # round(7.5) = 8
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_nested_folders_sorted_order_and_formats(tmp_path):
    src = tmp_path / "src"
    for rel, value, fmt in [("b/1.png", 10, "PNG"), ("a/2.webp", 90, "WEBP"), ("c.JPG", 170, "JPEG"),
                            ("a/z/0.jpeg", 250, "JPEG")]:
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 16), (value, value, value)).save(path, format=fmt, quality=95)
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(src / ".hidden" / "x.png")
    out = tmp_path / "o_lmdb"
    result = run_prepare("--out_path", out, "--n_worker", 2, "--size", 16, "--resample", "bilinear", src)
    assert result.returncode == 0, result.stderr
    store = read_lmdb(out)
    assert store["length"] == b"4"
    # Sorted relative paths: a/2.webp, a/z/0.jpeg, b/1.png, c.JPG
    means = [png_array(store[f"16-{i:05d}"]).mean() for i in range(4)]
    assert np.allclose(means, [90, 250, 10, 170], atol=3)


def test_numeric_stems_are_indexed_in_numeric_order(tmp_path):
    """CelebA-HQ names its images 0.jpg ... 29999.jpg: LMDB index k must be image k (not 0, 1, 10, 100, ...);
    numeric folders likewise, zero-padded names keep their order, other names come after the numbers."""
    src = tmp_path / "src"
    names = ["0.png", "1.png", "2.jpg", "9.png", "10.png", "11.png", "100.png", "0200.png", "a.png", "b10.png",
             "b9.png", "3/0.png", "20/0.png"]
    for value, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (value * 10, 0, 0)).save(src / name, quality=100)
    order = ["0.png", "1.png", "2.jpg", "3/0.png", "9.png", "10.png", "11.png", "20/0.png", "100.png", "0200.png",
             "a.png", "b10.png", "b9.png"]
    assert prepare_data.list_files(str(src), prepare_data.IMAGE_EXTENSIONS) == [p.replace("/", os.sep) for p in order]
    result = run_prepare("--out_path", tmp_path / "o_lmdb", "--n_worker", 1, "--size", 8, src)
    assert result.returncode == 0, result.stderr
    store = read_lmdb(tmp_path / "o_lmdb")
    reds = [int(round(png_array(store[f"8-{i:05d}"])[..., 0].mean() / 10)) for i in range(len(order))]
    assert reds == [names.index(name) for name in order]


def test_overwrite_replaces_an_existing_lmdb(portraits, tmp_path):
    images_dir, masks_dir, _ = portraits
    out = tmp_path / "o_lmdb"
    assert run_prepare("--out_path", out, "--n_worker", 1, "--size", 16, images_dir).returncode == 0
    before = read_lmdb(out)
    assert_one_line_error(run_prepare("--out_path", out, "--size", 32, images_dir),
                          f"output {out} already exists", "--overwrite")
    assert read_lmdb(out) == before
    result = run_prepare("--out_path", out, "--n_worker", 1, "--size", 32, "--overwrite",
                         "--mask_path", masks_dir, images_dir)
    assert result.returncode == 0, result.stderr
    store = read_lmdb(out)
    assert store["sizes"] == b"32" and "16-00000" not in store and "mask-32-00005" in store
    assert [p.name for p in tmp_path.iterdir()] == ["o_lmdb"]


def test_dataset_sees_an_lmdb_replaced_in_place(portraits, tmp_path):
    images_dir, masks_dir, _ = portraits
    out = tmp_path / "r_lmdb"
    common = ("--out_path", out, "--n_worker", 1, "--mask_path", masks_dir)
    assert run_prepare(*common, "--size", 16, images_dir).returncode == 0
    assert ds.MultiResolutionDataset(str(out), resolution=16).get(0, False)[0].shape == (3, 16, 16)
    assert run_prepare(*common, "--size", 24, "--overwrite", images_dir).returncode == 0
    # A process-wide cached handle on the old file would still list size 16 only.
    assert ds.MultiResolutionDataset(str(out), resolution=24).get(0, False)[0].shape == (3, 24, 24)


def test_overwrite_refuses_a_folder_that_is_not_an_lmdb(portraits, tmp_path):
    images_dir, _, _ = portraits
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    assert_one_line_error(run_prepare("--out_path", out, "--overwrite", "--size", 16, images_dir),
                          f"output {out} exists and is not an LMDB directory")
    assert (out / "thesis.tex").read_text() == "keep me"


@pytest.fixture()
def broken_masks(portraits, tmp_path):
    """A copy of the portraits' masks with a problem made by the test; returns (images, masks, out)."""
    images_dir, masks_dir, _ = portraits
    copy = tmp_path / "masks"
    copy.mkdir()
    for name in sorted(os.listdir(masks_dir)):
        (copy / name).write_bytes((masks_dir / name).read_bytes())
    return images_dir, copy, tmp_path / "out_lmdb"


def test_image_without_mask_stops_before_writing(broken_masks):
    images_dir, masks, out = broken_masks
    (masks / "00004.png").unlink()
    result = run_prepare("--out_path", out, "--n_worker", 2, "--size", 32, "--mask_path", masks, images_dir)
    assert_one_line_error(result, "1 of 6 images have no usable mask", "nothing written",
                          str(images_dir / "00004.png"), "no mask named 00004.png or .npy", "--skip_unmatched")
    assert_nothing_written(out)


def test_skip_unmatched_leaves_the_image_out(broken_masks, portraits):
    images_dir, masks, out = broken_masks
    (masks / "00001.png").unlink()
    result = run_prepare("--out_path", out, "--n_worker", 1, "--size", 48, "--mask_path", masks,
                         "--skip_unmatched", images_dir)
    assert result.returncode == 0, result.stderr
    assert "skipping image without usable mask" in result.stderr and "00001.png" in result.stderr
    assert "skipped 0 unreadable and 1 without a usable mask" in result.stdout
    store = read_lmdb(out)
    assert store["length"] == b"5"
    pairs = portraits[2]
    kept = [pairs[i] for i in (0, 2, 3, 4, 5)]  # indices stay contiguous
    for i, (image, label) in enumerate(kept):
        assert np.array_equal(png_array(store[f"48-{i:05d}"]), image)
        assert np.array_equal(png_array(store[f"mask-48-{i:05d}"]), label)


def test_mask_with_ids_outside_range(broken_masks):
    images_dir, masks, out = broken_masks
    (masks / "00002.png").unlink()
    bad = np.zeros((48, 48), np.int64)
    bad[0, 0], bad[1, 1] = 19, 255
    np.save(masks / "00002.npy", bad)
    result = run_prepare("--out_path", out, "--n_worker", 1, "--size", 32, "--mask_path", masks, images_dir)
    assert_one_line_error(result, str(masks / "00002.npy"), "ids outside 0-18: 19, 255")
    assert_nothing_written(out)


def test_mask_with_different_aspect(broken_masks):
    images_dir, masks, out = broken_masks
    Image.fromarray(np.zeros((24, 48), np.uint8)).save(masks / "00003.png")
    result = run_prepare("--out_path", out, "--n_worker", 1, "--size", 32, "--mask_path", masks, images_dir)
    assert_one_line_error(result, str(masks / "00003.png"),
                          "aspect differs from its image: mask 48x24, image 48x48")
    assert_nothing_written(out)


def test_colour_mask_and_ambiguous_masks(broken_masks):
    images_dir, masks, out = broken_masks
    Image.new("RGB", (48, 48)).save(masks / "00005.png")
    result = run_prepare("--out_path", out, "--n_worker", 1, "--size", 32, "--mask_path", masks, images_dir)
    assert_one_line_error(result, "00005.png", "not a single-channel label map (PNG mode RGB)")
    np.save(masks / "00005.npy", np.zeros((48, 48), np.uint8))
    result = run_prepare("--out_path", out, "--n_worker", 1, "--size", 32, "--mask_path", masks, images_dir)
    assert_one_line_error(result, "ambiguous masks", "00005.npy and 00005.png")
    assert_nothing_written(out)


def test_images_sharing_a_stem_cannot_take_masks(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "src" / sub).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "src" / sub / "x.png")
    (tmp_path / "m").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "m" / "x.png")
    out = tmp_path / "o_lmdb"
    result = run_prepare("--out_path", out, "--size", 8, "--mask_path", tmp_path / "m", tmp_path / "src")
    assert_one_line_error(result, "share a stem", os.path.join("a", "x.png"), os.path.join("b", "x.png"))
    assert_nothing_written(out)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_reported_and_skipped(portraits, tmp_path, damage):
    images_dir, _, pairs = portraits
    src = tmp_path / "src"
    src.mkdir()
    for name in sorted(os.listdir(images_dir)):
        (src / name).write_bytes((images_dir / name).read_bytes())
    bad = src / "00003.png"
    # garbage: even the header fails (found while checking); truncated: the header reads but the
    # pixel data does not (found while writing).
    bad.write_bytes(b"not a png at all" if damage == "garbage" else bad.read_bytes()[:120])
    out = tmp_path / "o_lmdb"
    result = run_prepare("--out_path", out, "--n_worker", 2, "--size", 48, src)
    assert result.returncode == 0, result.stderr
    assert f"skipping unreadable image {bad}" in result.stderr
    assert "skipped 1 unreadable and 0 without a usable mask" in result.stdout
    assert "wrote 5 images" in result.stdout
    store = read_lmdb(out)
    assert store["length"] == b"5"
    for i, source in enumerate((0, 1, 2, 4, 5)):
        assert np.array_equal(png_array(store[f"48-{i:05d}"]), pairs[source][0])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_all_images_unreadable(tmp_path, damage):
    (tmp_path / "src").mkdir()
    bad = tmp_path / "src" / "a.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(bad)
    bad.write_bytes(b"junk" if damage == "garbage" else bad.read_bytes()[:60])
    out = tmp_path / "o_lmdb"
    result = run_prepare("--out_path", out, "--size", 8, tmp_path / "src")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # The last line is the error (a truncated file is found while writing, after its warning line).
    assert "none of the" in result.stderr.strip().splitlines()[-1] and str(bad) in result.stderr
    assert_nothing_written(out)


@pytest.mark.parametrize("args, status, fragments", [
    (["--size", "64,abc"], 1, ["invalid --size value 'abc' in '64,abc'"]),
    (["--size", "0"], 1, ["invalid --size value '0'"]),
    (["--n_worker", "0"], 1, ["invalid --n_worker 0"]),
    (["--resample", "cubicle"], 2, ["invalid choice: 'cubicle'"]),
    (["--mask_path", "{tmp}/no_masks"], 1, ["mask folder {tmp}/no_masks does not exist"]),
])
def test_bad_arguments(portraits, tmp_path, args, status, fragments):
    images_dir, _, _ = portraits
    out = tmp_path / "o_lmdb"
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_prepare("--out_path", out, *args, images_dir)
    assert_one_line_error(result, *[f.format(tmp=tmp_path) for f in fragments], status=status)
    assert_nothing_written(out)


def test_bad_input_folders(tmp_path):
    out = tmp_path / "o_lmdb"
    assert_one_line_error(run_prepare("--out_path", out, tmp_path / "absent"),
                          f"input folder {tmp_path / 'absent'} does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    assert_one_line_error(run_prepare("--out_path", out, tmp_path / "empty"),
                          f"no images (.png, .jpg, .jpeg, .webp) found under {tmp_path / 'empty'}")
    assert_one_line_error(run_prepare(tmp_path / "empty"), "--out_path", status=2)
    assert_nothing_written(out)


def test_interrupted_write_leaves_no_output(portraits, tmp_path, monkeypatch):
    images_dir, _, _ = portraits
    calls = []

    def failing(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    real = prepare_data.convert_pair
    monkeypatch.setattr(prepare_data, "convert_pair", failing)
    out = tmp_path / "o_lmdb"
    status = prepare_data.main(["--out_path", str(out), "--n_worker", "1", "--size", "16", str(images_dir)])
    assert status == 130 and len(calls) == 3
    assert_nothing_written(out)
    assert list(tmp_path.iterdir()) == []


# -- synthetic portraits --------------------------------------------------------------------------

def test_synthetic_portraits_are_deterministic_and_complete():
    start = time.perf_counter()
    drawn = [sp.draw_portrait(np.random.default_rng([0, i]), 128) for i in range(30)]
    assert time.perf_counter() - start < 10  # vectorised drawing: ~10 ms each
    again = sp.draw_portrait(np.random.default_rng([0, 7]), 128)
    assert np.array_equal(again[0], drawn[7][0]) and np.array_equal(again[1], drawn[7][1])
    other = sp.draw_portrait(np.random.default_rng([1, 7]), 128)
    assert not np.array_equal(other[1], drawn[7][1])

    seen = set()
    nose_offsets = []
    for image, label in drawn:
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert label.shape == (128, 128) and label.dtype == np.uint8 and label.max() <= 18
        ids = set(np.unique(label).tolist())
        assert {0, 1, 2, 4, 5, 6, 7, 11, 12, 18} <= ids and ids & {13, 14}
        seen |= ids
        cols = np.nonzero(label == 2)[1].mean() - np.nonzero(label == 1)[1].mean()
        nose_offsets.append(cols)
    assert seen == set(range(19))  # every optional part (hat, glasses, earrings, necklace) appears
    assert min(nose_offsets) < -2 and max(nose_offsets) > 2  # heads turn both ways


def test_synthetic_cli_and_layout(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "synthetic_portraits.py"), "--out",
                             str(tmp_path / "s"), "--n", "3", "--size", "32", "--seed", "5"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = ["00000.png", "00001.png", "00002.png"]
    assert sorted(os.listdir(tmp_path / "s" / "images")) == names
    assert sorted(os.listdir(tmp_path / "s" / "masks")) == names
    sp.make_portraits(str(tmp_path / "t"), n=2, size=32, seed=5)  # a prefix of the same set
    for sub in ("images", "masks"):
        for name in names[:2]:
            assert (tmp_path / "s" / sub / name).read_bytes() == (tmp_path / "t" / sub / name).read_bytes()
    assert Image.open(tmp_path / "s" / "masks" / "00000.png").mode == "L"
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "synthetic_portraits.py"), "--out",
                          str(tmp_path / "u"), "--n", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--n >= 1" in bad.stderr and not (tmp_path / "u").exists()


# -- colours --------------------------------------------------------------------------------------

def test_color_segmap():
    scores = torch.zeros(2, 9, 2, 3)
    for b in range(2):
        for r in range(2):
            for c in range(3):
                scores[b, (b * 6 + r * 3 + c) % 9, r, c] = 1.0
    coloured = color_segmap(scores)
    assert coloured.shape == (2, 2, 3, 3) and coloured.dtype == np.uint8
    assert tuple(coloured[0, 0, 0]) == (0, 0, 0)
    assert tuple(coloured[0, 0, 1]) == (239, 234, 90)
    assert tuple(coloured[0, 1, 2]) == (131, 227, 119)   # channel (3 + 2) = 5, nose
    assert tuple(coloured[1, 1, 0]) == tuple(REGION_COLORS[(6 + 3) % 9])
    single = color_segmap(scores[1].numpy())
    assert single.shape == (2, 3, 3) and np.array_equal(single, coloured[1])
    with pytest.raises(ValueError, match="expects"):
        color_segmap(torch.zeros(8, 4, 4))


def test_label19_to_regions():
    ids = np.arange(19)
    expected = [0, 1, 5, 2, 2, 2, 4, 4, 6, 6, 3, 3, 3, 7, 7, 6, 8, 8, 8]
    assert label19_to_regions(ids).tolist() == expected
    assert label19_to_regions(torch.from_numpy(ids).to(torch.uint8)).tolist() == expected

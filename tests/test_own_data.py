"""From photographs to training data (issue 27): the BiSeNet face parser and the class-order tables,
tools/parse_faces.py, tools/celebamask_labels.py, tools/align_faces.py, and the whole chain on the
project's synthetic portraits.

Nothing is downloaded: the BiSeNet files are random weights saved here in the released file's layout,
the CelebAMask-HQ tree is built by hand, the landmarks are synthetic, dlib is absent or a stand-in.
"""
import json
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.regions import (  # noqa: E402
    BISENET_CLASSES,
    BISENET_TO_CELEBAMASK,
    CELEBA_TO_REGION,
    CELEBAMASK_CLASSES,
    REGION_NAMES,
    label19_to_regions,
)
from dataset import MultiResolutionDataset, label_to_mask  # noqa: E402
from evaluation import face_parser  # noqa: E402
from helpers import load_script  # noqa: E402

parse_faces = load_script("tools/parse_faces.py")
celebamask_labels = load_script("tools/celebamask_labels.py")
align_faces = load_script("tools/align_faces.py")
synthetic_portraits = load_script("tools/synthetic_portraits.py")

SHIPPED_PARSER = ROOT / "checkpoints" / "synthetic_parser.pt"


pytestmark = pytest.mark.usefixtures("one_thread")


def run_tool(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def one_line_error(result, *needles):
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def usage_error(main, *args):
    """A command's main (common.cli.command) stopping with one 'error: ' line: the line without 'error: '."""
    with pytest.raises(SystemExit) as caught:
        main([str(a) for a in args])
    message = str(caught.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message.removeprefix("error: ")


# ------------------------------------------------------------------------------------------- BiSeNet


def random_bisenet(seed=0, n_classes=19):
    """A BiSeNet with every weight and BatchNorm statistic random (running variances positive)."""
    torch.manual_seed(seed)
    net = face_parser.BiSeNet(n_classes)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(80000)
            elif isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
    return net.eval()


@pytest.fixture(scope="module")
def bisenet_file(tmp_path_factory):
    """A random BiSeNet saved as upstream saves 79999_iter.pth: torch.save of the bare state dict."""
    net = random_bisenet()
    path = tmp_path_factory.mktemp("bisenet") / "79999_iter.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_bisenet_has_the_released_key_tree():
    state = face_parser.BiSeNet().state_dict()
    assert len(state) == 191
    assert sum(key.endswith("num_batches_tracked") for key in state) == 31
    tops = {".".join(key.split(".")[:2]) if key.startswith("cp.") else key.split(".")[0] for key in state}
    assert tops == {"cp.resnet", "cp.arm16", "cp.arm32", "cp.conv_head16", "cp.conv_head32", "cp.conv_avg", "ffm",
                    "conv_out", "conv_out16", "conv_out32"}
    assert not any(key.startswith("module.") for key in state)
    # no convolution has a bias: every ".bias" belongs to a BatchNorm
    norms = {name for name, m in face_parser.BiSeNet().named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {key.rsplit(".", 1)[0] for key in state if key.endswith(".bias")} == norms and len(norms) == 31
    shapes = {"cp.resnet.conv1.weight": (64, 3, 7, 7), "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
              "cp.resnet.layer4.1.bn2.running_var": (512,), "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
              "cp.arm32.conv_atten.weight": (128, 128, 1, 1), "cp.conv_avg.conv.weight": (128, 512, 1, 1),
              "ffm.convblk.conv.weight": (256, 256, 1, 1), "ffm.conv1.weight": (64, 256, 1, 1),
              "ffm.conv2.weight": (256, 64, 1, 1), "conv_out.conv.conv.weight": (256, 256, 3, 3),
              "conv_out.conv_out.weight": (19, 256, 1, 1), "conv_out16.conv_out.weight": (19, 64, 1, 1),
              "conv_out32.conv.conv.weight": (64, 128, 3, 3)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_bisenet_construction_and_loading_open_no_socket(monkeypatch, bisenet_file):
    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    face_parser.BiSeNet()
    assert face_parser.load_parser(bisenet_file[1]).format == "bisenet"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_random_bisenet_saved_and_reloaded_strictly(tmp_path, bisenet_file, zip_format):
    net, _ = bisenet_file
    path = tmp_path / "parser.pth"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    parser = face_parser.load_parser(path, size=64)
    assert parser.format == "bisenet" and parser.classes == BISENET_CLASSES and parser.size == 64
    assert "BiSeNet" in parser.label
    loaded = parser.module.state_dict()
    assert loaded.keys() == net.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
    assert expected.shape == (2, 19, 64, 64)
    assert torch.equal(parser.logits(x), expected)
    aux16, aux32 = net.auxiliary(x)
    assert aux16.shape == aux32.shape == (2, 19, 64, 64)
    # calc_metrics' path: images in [-1, 1] -> region probabilities (19 BiSeNet classes merged by its table)
    images = torch.rand(1, 3, 40, 40) * 2 - 1
    scores = parser.regions(images)
    assert scores.shape == (1, 9, 40, 40) and torch.allclose(scores.sum(1), torch.ones(1, 40, 40), atol=1e-5)
    with pytest.raises(face_parser.ParserError, match="FID/KID"):
        parser.features(images)


def test_bisenet_files_of_another_layout_are_one_line(tmp_path, bisenet_file):
    net, _ = bisenet_file
    state = net.state_dict()
    cases = {
        "data_parallel.pth": ({f"module.{k}": v for k, v in state.items()},
                              ["191 missing keys (first: cp.resnet.conv1.weight", "191 keys the model does not have (first: module.cp."]),
        "eleven.pth": (random_bisenet(1, n_classes=11).state_dict(),
                       ["3 shape mismatches", "conv_out.conv_out.weight (11, 256, 1, 1) != (19, 256, 1, 1)"]),
        "no_counters.pth": ({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
                            ["31 missing keys", "num_batches_tracked"]),
    }
    for name, (content, needles) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(face_parser.ParserError) as caught:
            face_parser.load_parser(tmp_path / name)
        message = str(caught.value)
        assert "\n" not in message and str(tmp_path / name) in message and "BiSeNet" in message
        for needle in needles:
            assert needle in message, message
    torch.save({"weights": state, "epoch": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(face_parser.ParserError, match="not a parser file"):
        face_parser.load_parser(tmp_path / "wrapped.pth")


# ------------------------------------------------------------------------------------- class orders


def test_bisenet_table_follows_the_names():
    for index, name in enumerate(BISENET_CLASSES):
        assert CELEBAMASK_CLASSES[BISENET_TO_CELEBAMASK[index]] == name
    assert sorted(BISENET_TO_CELEBAMASK) == list(range(19))
    # the confusions users report when the orders are mixed up
    assert BISENET_CLASSES[10] == "nose" and CELEBAMASK_CLASSES[10] == "mouth"
    assert BISENET_CLASSES[17] == "hair" and CELEBAMASK_CLASSES[17] == "neck"


class OneHotStub(torch.nn.Module):
    """Logits where column j of the image is one-hot class j: every class of a format in one picture."""

    def __init__(self, n_classes):
        super().__init__()
        self.n_classes = n_classes
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the parser a device

    def forward(self, x):
        columns = torch.arange(self.n_classes)
        logits = torch.nn.functional.one_hot(columns, self.n_classes).T.float() * 10
        return logits[None, :, None, :].expand(x.shape[0], -1, x.shape[-2], -1) + self.anchor


@pytest.mark.parametrize("format, classes", [("bisenet", BISENET_CLASSES), ("torchscript19", CELEBAMASK_CLASSES)])
def test_one_hot_stub_lands_on_the_right_class_and_region(format, classes):
    parser = face_parser.Parser(OneHotStub(19), "stub", size=19, format=format)
    labels = parser.labels(torch.zeros(1, 3, 2, 19))[0]
    for column, name in enumerate(classes):
        assert CELEBAMASK_CLASSES[int(labels[0, column])] == name
        assert int(labels[1, column]) == CELEBAMASK_CLASSES.index(name)
    regions = parser.regions(torch.zeros(1, 3, 2, 19)).argmax(1)[0, 0]
    assert regions.tolist() == [int(CELEBA_TO_REGION[CELEBAMASK_CLASSES.index(n)]) for n in classes]
    if format == "bisenet":  # spot checks, by hand
        for bisenet_index, celeba_id, region in ((10, 2, "nose"), (11, 10, "mouth"), (17, 13, "hair"),
                                                 (14, 17, "neck+cloth"), (6, 3, "eye"), (9, 15, "ear")):
            assert int(labels[0, bisenet_index]) == celeba_id
            assert REGION_NAMES[int(regions[bisenet_index])] == region


def test_region_parser_labels_split_left_and_right_at_the_face_centre():
    regions = torch.zeros(1, 4, 12, dtype=torch.long)
    regions[0, :, 4:10] = REGION_NAMES.index("face")  # face centre column: 7.0
    regions[0, 0, [1, 5, 6, 7, 11]] = REGION_NAMES.index("eye")
    regions[0, 1, [2, 8]] = REGION_NAMES.index("ear")
    regions[0, 2, 3] = REGION_NAMES.index("hair")
    labels = face_parser.regions_to_labels(regions)[0]
    names = [CELEBAMASK_CLASSES[i] for i in labels[0].tolist()]
    # image left of the centre is the person's right
    assert names == ["background", "r_eye", "background", "background", "skin", "r_eye", "r_eye", "l_eye", "skin",
                     "skin", "background", "l_eye"]
    assert [CELEBAMASK_CLASSES[i] for i in labels[1, [2, 8]].tolist()] == ["r_ear", "l_ear"]
    assert CELEBAMASK_CLASSES[int(labels[2, 3])] == "hair"
    assert (label19_to_regions(labels) == regions[0]).all()
    # no face at all: the image's centre splits
    assert face_parser.regions_to_labels(torch.full((1, 1, 4), REGION_NAMES.index("brow")))[0, 0].tolist() == [7, 7, 6, 6]


def test_bisenet_input_is_upstreams(bisenet_file):
    parser = face_parser.load_parser(bisenet_file[1], size=32)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float64) / 255
    expected = (resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    got = parser.input_from_pil(image).double().permute(1, 2, 0).numpy()
    assert np.allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------------------------ parse_faces.py


def write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)


def test_parse_faces_with_bisenet_writes_upstreams_labels(tmp_path, bisenet_file, capsys):
    net, path = bisenet_file
    images = tmp_path / "images"
    write_images(images, {"a.png": (48, 48), "b.jpg": (40, 56), "10.png": (64, 64)})
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "labels"
    parse_faces.main([str(images), str(out), "--parser", str(path), "--size", "32", "--batch", "2",
                      "--device", "cpu"])
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "wrote 3" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["10.png", "a.png", "b.png"]
    for name in ("a.png", "b.jpg", "10.png"):
        with Image.open(images / name) as opened:
            image = opened.convert("RGB")
        pixels = np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
        x = torch.from_numpy((pixels - np.array([0.485, 0.456, 0.406], np.float32))
                             / np.array([0.229, 0.224, 0.225], np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            bisenet_ids = net(x).argmax(1)[0].numpy()
        names = np.array(BISENET_CLASSES)[bisenet_ids]
        expected = np.vectorize(CELEBAMASK_CLASSES.index)(names).astype(np.uint8)
        expected = np.asarray(Image.fromarray(expected).resize(image.size, Image.NEAREST))
        written = Image.open(out / (Path(name).stem + ".png"))
        assert written.mode == "L" and written.size == image.size
        assert np.array_equal(np.asarray(written), expected), name
    assert len(np.unique(np.asarray(Image.open(out / "10.png")))) > 1
    # resumes: a done file is kept, a missing one made again
    (out / "a.png").unlink()
    before = (out / "10.png").stat().st_mtime_ns
    parse_faces.main([str(images), str(out), "--parser", str(path), "--size", "32", "--device", "cpu"])
    assert "wrote 1" in capsys.readouterr().out and (out / "a.png").is_file()
    assert (out / "10.png").stat().st_mtime_ns == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_parse_faces_bad_inputs_are_one_line(tmp_path, bisenet_file):
    images = tmp_path / "images"
    write_images(images, {"a.png": (32, 32)})
    result = run_tool("tools/parse_faces.py", images, tmp_path / "out", "--parser", tmp_path / "none.pth")
    one_line_error(result, "none.pth", "not found")
    assert not (tmp_path / "out").exists()
    assert "inside the input" in usage_error(parse_faces.main, images, images / "labels", "--parser", bisenet_file[1])
    assert "--batch" in usage_error(parse_faces.main, images, tmp_path / "o", "--parser", bisenet_file[1], "--batch", 0)
    assert "--parser" in usage_error(parse_faces.main, images, tmp_path / "o")
    (tmp_path / "empty").mkdir()
    assert "no images" in usage_error(parse_faces.main, tmp_path / "empty", tmp_path / "o", "--parser", bisenet_file[1])
    write_images(images / "sub", {"a.jpg": (32, 32)})
    assert "share a stem" in usage_error(parse_faces.main, images, tmp_path / "o", "--parser", bisenet_file[1])
    if SHIPPED_PARSER.is_file():
        assert "trained at (64)" in usage_error(parse_faces.main, images / "sub", tmp_path / "o", "--parser",
                                                SHIPPED_PARSER, "--size", 128)


# ------------------------------------------------------------------------------ celebamask_labels.py

SIDE = 8


def box(top, left, bottom, right):
    mask = np.zeros((SIDE, SIDE), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


# Part boxes of image k, shifted right by k % 3 so that images differ; overlaps on purpose:
# skin under nose, eyes over glasses, hair over skin, hat over hair, neck over necklace, cloth over neck.
PART_BOXES = {"skin": (1, 1, 7, 7), "nose": (3, 3, 5, 4), "eye_g": (2, 1, 3, 6), "l_eye": (2, 4, 3, 5),
              "hair": (0, 0, 2, 8), "hat": (0, 2, 1, 5), "neck_l": (6, 2, 8, 5), "neck": (6, 3, 8, 4),
              "cloth": (7, 0, 8, 8)}


def write_part(path, mask, style):
    value = mask.astype(np.uint8) * 255
    if style == "grey":
        Image.fromarray(value).save(path)
    elif style == "rgb":
        Image.fromarray(np.stack([value] * 3, -1)).save(path)
    else:  # palette
        Image.fromarray(np.stack([value] * 3, -1)).convert("P", palette=Image.ADAPTIVE, colors=2).save(path)


def build_annotations(root, numbers):
    """CelebAMask-HQ's layout: root/<k//2000>/<k:05d>_<part>.png; returns {k: expected label map}."""
    expected = {}
    styles = ("grey", "rgb", "palette")
    for k in numbers:
        folder = root / str(k // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        label = np.zeros((SIDE, SIDE), dtype=np.uint8)
        for j, (part, (top, left, bottom, right)) in enumerate(PART_BOXES.items()):
            if part == "hat" and k % 2:  # a missing file is an absent part
                continue
            mask = np.roll(box(top, left, bottom, right), k % 3, axis=1)
            write_part(folder / f"{k:05d}_{part}.png", mask, styles[(j + k) % 3])
        # by hand: the CelebAMask-HQ ids, painted in id order
        for part in CELEBAMASK_CLASSES[1:]:
            if part in PART_BOXES and not (part == "hat" and k % 2):
                label[np.roll(box(*PART_BOXES[part]), k % 3, axis=1)] = CELEBAMASK_CLASSES.index(part)
        expected[k] = label
    return expected


def test_celebamask_merge_pixel_by_pixel_then_prepare_data_and_dataset(tmp_path, capsys):
    numbers = list(range(12)) + [2000]
    expected = build_annotations(tmp_path / "anno", numbers)
    out = tmp_path / "labels"
    celebamask_labels.main([str(tmp_path / "anno"), str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.png" for k in numbers)
    first = np.asarray(Image.open(out / "0.png"))
    assert Image.open(out / "0.png").mode == "L"
    # overlaps, by hand (image 0: no shift, hat present)
    name = lambda row, col: CELEBAMASK_CLASSES[first[row, col]]
    assert [name(3, 3), name(2, 4), name(2, 2), name(1, 1), name(0, 3), name(0, 0), name(6, 3), name(6, 2),
            name(7, 3), name(5, 6)] == ["nose", "l_eye", "eye_g", "hair", "hat", "hair", "neck", "neck_l", "cloth",
                                        "skin"]
    assert CELEBAMASK_CLASSES[np.asarray(Image.open(out / "1.png"))[0, 3]] == "hair"  # image 1 has no hat file
    for k in numbers:
        assert np.array_equal(np.asarray(Image.open(out / f"{k}.png")), expected[k]), k
    # rerun: everything done already
    celebamask_labels.main([str(tmp_path / "anno"), str(out)])
    assert "wrote 0" in capsys.readouterr().out

    # images k.png (CelebA-HQ-img's unpadded names), twice the labels' size; k's colour encodes k
    images = tmp_path / "CelebA-HQ-img"
    images.mkdir()
    for k in numbers:
        Image.new("RGB", (2 * SIDE, 2 * SIDE), (k % 256, 10 * (k % 20), 7)).save(images / f"{k}.png")
    lmdb_path = tmp_path / "celeba_lmdb"
    result = run_tool("prepare_data.py", "--out_path", lmdb_path, "--size", SIDE, "--n_worker", 1, "--mask_path", out,
                      images)
    assert result.returncode == 0, result.stderr
    data = MultiResolutionDataset(lmdb_path, resolution=SIDE)
    assert len(data) == len(numbers)
    for index, k in enumerate(numbers):  # numeric order: 0, 1, 2, ..., 10, 11, 2000
        image, label = data.load(index)
        assert np.asarray(image)[0, 0].tolist() == [k % 256, 10 * (k % 20), 7]
        assert np.array_equal(label, expected[k]), k
        _, _, mask = data.get(index, False)
        assert torch.equal(mask, torch.from_numpy(label_to_mask(expected[k])))


def test_celebamask_bad_trees_are_one_line_and_write_nothing(tmp_path):
    anno, out = tmp_path / "anno", tmp_path / "out"
    build_annotations(anno, [0, 1])
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(anno / "0" / "00001_moustache.png")
    one_line_error(run_tool("tools/celebamask_labels.py", anno, out), "unknown part 'moustache'", "00001_moustache.png")
    assert not out.exists()
    (anno / "0" / "00001_moustache.png").unlink()
    Image.fromarray(np.zeros((SIDE * 2, SIDE * 2), np.uint8)).save(anno / "0" / "00001_hat.png")
    message = usage_error(celebamask_labels.main, anno, out)
    assert "image 1 disagree in size" in message and "00001_hat.png 16x16" in message and "00001_skin.png 8x8" in message
    assert not out.exists()
    (anno / "0" / "00001_hat.png").unlink()
    (anno / "0" / "notes.png").write_bytes(b"x")
    assert "not named <number>_<part>.png" in usage_error(celebamask_labels.main, anno, out)
    (anno / "0" / "notes.png").unlink()
    (anno / "0" / "00001_skin.png").write_bytes(b"broken")
    assert "00001_skin.png: unreadable part file" in usage_error(celebamask_labels.main, anno, out)
    assert not out.exists()
    (tmp_path / "empty" / "0").mkdir(parents=True)
    assert "no CelebAMask-HQ part files" in usage_error(celebamask_labels.main, tmp_path / "empty", out)


# ----------------------------------------------------------------------------------- align_faces.py

# An upright face (pixel-centre coordinates): eyes 60 px apart, mouth corners 60 px below them.
CANONICAL = np.array([[100.0, 120.0], [160.0, 120.0], [130.0, 150.0], [110.0, 180.0], [150.0, 180.0]])
# Where FFHQ's recipe puts them, worked out by hand (fractions of the output side): half side
# s = max(2 * 60, 1.8 * 60) = 120, centre = eye midpoint + 0.1 * (0, 60) = (130, 126), so the square runs
# from (10, 6) to (250, 246); eyes at x = (100 - 10) / 240 = 0.375 and 0.625, y = (120 - 6) / 240 = 0.475;
# mouth corners at x = 100 / 240 and 140 / 240, y = 174 / 240 = 0.725.
LANDING = np.array([[0.375, 0.475], [0.625, 0.475], [100 / 240, 0.725], [140 / 240, 0.725]])


def sixty_eight_points(five):
    """68 iBUG-order points whose eye centres, nose tip and mouth corners are `five` (the rest filler)."""
    points = np.zeros((68, 2))
    hexagon = np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3)], -1) * [9.0, 4.0]
    points[36:42] = five[0] + hexagon
    points[42:48] = five[1] + hexagon[::-1]
    points[30] = five[2]
    points[48], points[54] = five[3], five[4]
    mouth = (five[3] + five[4]) / 2
    points[49:54] = mouth + np.linspace(-1, 1, 5)[:, None] * [(five[4] - five[3])[0] / 2.5, 0] + [0, -5]
    points[55:60] = mouth + np.linspace(1, -1, 5)[:, None] * [(five[4] - five[3])[0] / 2.5, 0] + [0, 5]
    points[60:68] = mouth + np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], -1) * 6
    points[:17] = np.stack([np.linspace(five[0][0] - 30, five[1][0] + 30, 17), np.full(17, five[2][1])], -1)
    points[17:27] = np.stack([np.linspace(five[0][0] - 15, five[1][0] + 15, 10), np.full(10, five[0][1] - 15)], -1)
    points[27:30] = np.stack([np.full(3, five[2][0]), np.linspace(five[0][1], five[2][1], 5)[1:4]], -1)
    points[31:36] = five[2] + np.stack([np.linspace(-8, 8, 5), np.full(5, 4.0)], -1)
    return points


def similarity(points, angle, scale, shift):
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    return (points - 130) @ rotation.T + 130 + shift


def test_five_points_of_sixty_eight():
    five = similarity(CANONICAL, 0.3, 1.2, [5, -7])
    points = sixty_eight_points(five)
    assert np.allclose(align_faces.five_points(points), five)
    assert np.array_equal(align_faces.five_points(five), five)
    with pytest.raises(ValueError, match="68×2 or 5×2"):
        align_faces.five_points(np.zeros((7, 2)))


def test_quad_of_an_upright_face_by_hand():
    quad, side = align_faces.ffhq_quad(CANONICAL)
    assert np.allclose(quad, [[10, 6], [10, 246], [250, 246], [250, 6]]) and side == pytest.approx(240)
    # a long face: 1.8 × eye-to-mouth (1.8 × 80 = 144) beats 2 × eye distance (2 × 40 = 80)
    long_face = np.array([[110.0, 100.0], [150.0, 100.0], [130.0, 140.0], [120.0, 180.0], [140.0, 180.0]])
    quad, side = align_faces.ffhq_quad(long_face)
    assert side == pytest.approx(288) and np.allclose(quad[0], [130 - 144, 108 - 144])
    assert np.allclose(align_faces.points_in_output(CANONICAL[[0, 1, 3, 4]], align_faces.ffhq_quad(CANONICAL)[0], 64),
                       LANDING * 64 - 0.5)


def test_quad_moves_with_the_face():
    angle, scale, shift = -0.4, 0.7, np.array([30.0, -12.0])
    quad, side = align_faces.ffhq_quad(CANONICAL)
    moved, moved_side = align_faces.ffhq_quad(similarity(CANONICAL, angle, scale, shift))
    assert np.allclose(moved, similarity(quad, angle, scale, shift)) and moved_side == pytest.approx(side * scale)
    assert np.allclose(align_faces.ffhq_quad(sixty_eight_points(CANONICAL))[0], quad)
    with pytest.raises(ValueError, match="degenerate"):
        align_faces.ffhq_quad(np.zeros((5, 2)))


def dots(points, size, sigma, background=40):
    """An RGB photo with Gaussian dots: left eye red, right eye green, mouth corners blue."""
    width, height = size
    ys, xs = np.mgrid[:height, :width]
    pixels = np.full((height, width, 3), float(background))
    for point, channel in zip(points[[0, 1, 3, 4]], (0, 1, 2, 2)):
        pixels[..., channel] += 200 * np.exp(-((xs - point[0]) ** 2 + (ys - point[1]) ** 2) / (2 * sigma ** 2))
    return Image.fromarray(np.uint8(np.clip(np.rint(pixels), 0, 255)))


def dot_centres(aligned, expected, radius=4, background=40):
    """The centroid of each dot's channel in a window around where it should be."""
    pixels = np.asarray(aligned, dtype=np.float64) - background
    found = []
    for (x, y), channel in zip(expected, (0, 1, 2, 2)):
        left, top = int(round(x)) - radius, int(round(y)) - radius
        window = np.clip(pixels[top:top + 2 * radius + 1, left:left + 2 * radius + 1, channel], 0, None)
        ys, xs = np.mgrid[top:top + window.shape[0], left:left + window.shape[1]]
        found.append([(window * xs).sum() / window.sum(), (window * ys).sum() / window.sum()])
    return np.array(found)


@pytest.mark.parametrize("angle, scale, shift, photo", [
    (0.0, 1.0, (0, 0), (260, 250)),        # the square inside the photo
    (0.45, 0.8, (40, 30), (300, 280)),     # turned and smaller
    (-0.3, 1.3, (-30, -60), (260, 230)),   # over the top edge: padded by reflection
    (0.2, 2.4, (200, 160), (720, 640)),    # large: the photo is shrunk first
], ids=["inside", "turned", "padded", "shrunk"])
def test_aligned_dots_land_where_the_recipe_says(angle, scale, shift, photo):
    five = similarity(CANONICAL, angle, scale, np.array(shift, float))
    size = 64
    aligned = align_faces.align(dots(five, photo, 3 * scale), five, size)
    assert aligned.size == (size, size) and aligned.mode == "RGB"
    expected = LANDING * size - 0.5
    assert np.abs(dot_centres(aligned, expected) - expected).max() < 0.3


def test_align_faces_68_and_5_points_agree(tmp_path, capsys):
    images, five_dir, many_dir = tmp_path / "images", tmp_path / "five", tmp_path / "many"
    for folder in (images, five_dir, many_dir):
        folder.mkdir()
    faces = {"a": similarity(CANONICAL, 0.2, 0.9, np.array([20.0, 10.0])),
             "b": similarity(CANONICAL, -0.5, 1.1, np.array([-10.0, 25.0]))}
    for stem, five in faces.items():
        dots(five, (280, 300), 3).save(images / f"{stem}.png")
        np.save(five_dir / f"{stem}.npy", five)
        np.savetxt(many_dir / f"{stem}.txt", sixty_eight_points(five), delimiter=",")
    dots(CANONICAL, (280, 300), 3).save(images / "c.png")  # no landmark file: listed
    for source, out in ((five_dir, tmp_path / "out5"), (many_dir, tmp_path / "out68")):
        align_faces.main([str(images), str(out), "--landmarks", str(source), "--size", "32"])
        captured = capsys.readouterr()
        assert "c.png (no landmark file c.txt or c.npy)" in captured.err and "wrote 2" in captured.out
    for stem, five in faces.items():
        five_pixels = np.asarray(Image.open(tmp_path / "out5" / f"{stem}.png"))
        assert five_pixels.shape == (32, 32, 3)
        assert np.array_equal(five_pixels, np.asarray(Image.open(tmp_path / "out68" / f"{stem}.png")))
        with Image.open(images / f"{stem}.png") as photo:
            assert np.array_equal(five_pixels, np.asarray(align_faces.align(photo, five, 32)))


def test_align_faces_from_the_ffhq_json(tmp_path, capsys):
    images = tmp_path / "in-the-wild-images"
    images.mkdir()
    five = similarity(CANONICAL, 0.1, 1.0, np.array([10.0, 0.0]))
    points = sixty_eight_points(five)
    dots(five, (270, 260), 3).save(images / "00000.png")
    dots(five, (270, 260), 3).save(images / "00001.png")
    dots(five, (270, 260), 3).save(images / "00002.png")
    metadata = {"0": {"image": {"file_path": "images1024x1024/00000/00000.png", "face_landmarks": []},
                      "in_the_wild": {"file_path": "in-the-wild-images/00000.png",
                                      "face_landmarks": points.tolist()}},
                "1": {"in_the_wild": {"file_path": "in-the-wild-images/00001.png", "face_landmarks": [[1, 2]] * 3}}}
    json_path = tmp_path / "ffhq-dataset-v2.json"
    json_path.write_text(json.dumps(metadata))
    align_faces.main([str(images), str(tmp_path / "out"), "--landmarks", str(json_path), "--size", "32"])
    err = capsys.readouterr().err
    assert "00001.png (its landmarks in the JSON have shape (3, 2)" in err and "00002.png (no entry" in err
    with Image.open(images / "00000.png") as photo:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "00000.png")),
                              np.asarray(align_faces.align(photo, points, 32)))
    json_path.write_text(json.dumps({"0": {"image": {}}}))
    assert "not ffhq-dataset-v2.json's layout" in usage_error(align_faces.main, images, tmp_path / "o2", "--landmarks",
                                                              json_path)


def test_align_faces_without_dlib_says_how_to_get_it(tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_images(images, {"a.png": (32, 32)})
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError, installed or not
    message = usage_error(align_faces.main, images, tmp_path / "out", "--detector", "dlib")
    assert "pip install dlib" in message and "/usr/share/dlib/shape_predictor_68_face_landmarks.dat" in message
    assert "libdlib-data" in message and not (tmp_path / "out").exists()
    assert "exactly one of" in usage_error(align_faces.main, images, tmp_path / "out")


def test_align_faces_with_a_dlib_stand_in(tmp_path, monkeypatch, capsys):
    """The dlib code path, with a stand-in module that finds two faces (the larger one is aligned) in one
    photo and none in another."""
    five = similarity(CANONICAL, 0.25, 1.0, np.array([15.0, 5.0]))
    points = sixty_eight_points(five)

    class Box:
        def __init__(self, side):
            self.side = side

        def width(self):
            return self.side

        def height(self):
            return self.side

    class Shape:
        num_parts = 68

        def __init__(self, values):
            self.values = values

        def part(self, i):
            return types.SimpleNamespace(x=self.values[i][0], y=self.values[i][1])

    def detector(pixels, upsample):
        assert upsample == 1 and pixels.ndim == 3
        return [Box(10), Box(90)] if pixels[..., 0].max() > 100 else []

    def shape_predictor(path):
        return lambda pixels, face: Shape(points if face.side == 90 else points + 40)

    fake = types.SimpleNamespace(get_frontal_face_detector=lambda: detector, shape_predictor=shape_predictor)
    monkeypatch.setitem(sys.modules, "dlib", fake)
    images = tmp_path / "images"
    images.mkdir()
    dots(five, (280, 280), 3).save(images / "face.png")
    Image.new("RGB", (50, 50), (30, 30, 30)).save(images / "blank.png")
    model = tmp_path / "shape_predictor_68_face_landmarks.dat"
    assert "--dlib_model" in usage_error(align_faces.main, images, tmp_path / "out", "--detector", "dlib",
                                         "--dlib_model", model)
    model.write_bytes(b"model")
    align_faces.main([str(images), str(tmp_path / "out"), "--detector", "dlib", "--dlib_model", str(model),
                      "--size", "32"])
    assert "blank.png (dlib found no face)" in capsys.readouterr().err
    with Image.open(images / "face.png") as photo:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "face.png")),
                              np.asarray(align_faces.align(photo, points, 32)))


def test_align_faces_bad_landmark_files_are_listed(tmp_path, capsys):
    images, marks = tmp_path / "images", tmp_path / "marks"
    marks.mkdir()
    write_images(images, {"a.png": (40, 40), "b.png": (40, 40)})
    (marks / "a.txt").write_text("1 2 3 4 5 6 7")
    (marks / "b.txt").write_text("1 2 x 4")
    assert "none of the 2 images" in usage_error(align_faces.main, images, tmp_path / "out", "--landmarks", marks)
    err = capsys.readouterr().err
    assert "holds 7 numbers" in err and "unreadable landmark file" in err
    assert not list((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------- end to end


def landmarks_of(label):
    """Five landmarks of a synthetic portrait from its exact label map: eye centres (r_eye is on the image's
    left), nose centre, the leftmost and rightmost mouth pixels."""
    def centre(ids):
        ys, xs = np.nonzero(np.isin(label, ids))
        return [xs.mean(), ys.mean()]

    ys, xs = np.nonzero(np.isin(label, (10, 11, 12)))
    return np.array([centre([5]), centre([4]), centre([2]), [xs.min(), ys[xs == xs.min()].mean()],
                     [xs.max(), ys[xs == xs.max()].mean()]])


@pytest.mark.skipif(not SHIPPED_PARSER.is_file(), reason=f"{SHIPPED_PARSER.name} is not shipped in this checkout")
def test_synthetic_portraits_align_parse_pack_and_train(tmp_path):
    import prepare_data
    import train_CNeRF
    from common.checkpoint import load_checkpoint

    raw = tmp_path / "raw"
    synthetic_portraits.make_portraits(str(raw), 6, 128, 7)
    marks = tmp_path / "landmarks"
    marks.mkdir()
    truth = {}
    for path in sorted((raw / "masks").iterdir()):
        label = np.asarray(Image.open(path))
        np.savetxt(marks / f"{path.stem}.txt", landmarks_of(label))
        truth[path.stem] = (label, align_faces.ffhq_quad(landmarks_of(label))[0])
    aligned, labels = tmp_path / "aligned", tmp_path / "labels"
    align_faces.main([str(raw / "images"), str(aligned), "--landmarks", str(marks), "--size", "64"])
    parse_faces.main([str(aligned), str(labels), "--parser", str(SHIPPED_PARSER), "--device", "cpu"])
    # The parsed regions agree with the true label maps carried through the same square, clearly better than
    # with the true maps left unaligned. (The shipped parser learnt unaligned portraits, whose faces are
    # smaller than FFHQ's crop makes them: 0.74 against 0.61 here.)
    agreement, unaligned = [], []
    for stem, (label, quad) in truth.items():
        moved = Image.fromarray(label).transform((64, 64), Image.QUAD, tuple((quad + 0.5).flatten()), Image.NEAREST)
        parsed = label19_to_regions(np.asarray(Image.open(labels / f"{stem}.png")))
        assert parsed.shape == (64, 64)
        agreement.append((parsed == label19_to_regions(np.asarray(moved))).mean())
        unaligned.append((parsed == label19_to_regions(np.asarray(Image.fromarray(label).resize((64, 64), Image.NEAREST)))).mean())
    assert np.mean(agreement) > 0.7 and np.mean(agreement) > np.mean(unaligned) + 0.08, (agreement, unaligned)

    lmdb_path = tmp_path / "lmdb"
    assert prepare_data.main(["--out_path", str(lmdb_path), "--size", "8,16", "--n_worker", "1", "--mask_path",
                              str(labels), str(aligned)]) == 0
    assert len(MultiResolutionDataset(lmdb_path, resolution=16)) == 6
    from test_training import MODEL, TRAIN

    train_CNeRF.train(["--dataset_path", str(lmdb_path), "--checkpoints_dir", str(tmp_path / "ck"), "--expname", "own",
                       *MODEL, *TRAIN, "--iter", "2"])
    stage = tmp_path / "ck" / "own" / "volume_renderer"
    first, last = load_checkpoint(stage / "models_0000000.pt"), load_checkpoint(stage / "models_0000001.pt")
    assert last["iter"] == 1
    assert any(not torch.equal(first["g"][k], last["g"][k]) for k in last["g"])
    assert all(torch.isfinite(v).all() for v in last["g"].values())

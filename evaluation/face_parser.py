"""Face parsers for the evaluation metrics and for making label maps: the project's compact U-Net
trained on an LMDB's own label maps (tools/train_parser.py), zllrunning's BiSeNet (face-parsing.PyTorch,
its `79999_iter.pth` state dict), or any TorchScript face parser giving 19- or 9-class logits.

Each format states the order of its output classes, and one table per format maps them to the
CelebAMask-HQ ids and regions of common/regions.py (FORMATS, TO_CELEBAMASK); nothing is guessed:
    unet           9 regions (REGION_NAMES); input RGB in [-1, 1] at the size it was trained at
    torchscript9   9 regions; input RGB in [-1, 1]
    torchscript19  19 classes in CelebAMask-HQ order (CELEBAMASK_CLASSES); input RGB in [-1, 1]
    bisenet        19 classes in BiSeNet's order (BISENET_CLASSES, mapped by BISENET_TO_CELEBAMASK);
                   input RGB resized to 512 and normalised with the ImageNet mean and std, as upstream
A TorchScript export of BiSeNet is read as CelebAMask-HQ-ordered, so give BiSeNet as its state dict.

A Parser maps RGB images in [-1, 1] to scores over the 9 regions (`regions`), and its own input
tensors to CelebAMask-HQ label maps (`labels`, what tools/parse_faces.py writes). Its role in
calc_metrics.py: the semantic-consistency metric (parse a generated image, compare with the
generator's own segmentation), and, when no Inception file is given, the features of FID/KID (the
U-Net's pooled bottleneck).

Files are read tensors-only (torch.load weights_only=True) and strictly: every key and shape. The
project's parsers are checkpoint.save_checkpoint files holding tensors and plain values only:
    {"parser": state dict, "config": {"size": S, "widths": [...], "n_classes": 9, "regions": [names]},
     "held_out": {"miou": m, "iou": [per region], "images": count, "dataset": path}}
A BiSeNet file is its bare state dict (191 entries, no `module.` prefix).
"""
import math
import os
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_mismatches
from common.cli import UsageError
from common.regions import (
    BISENET_CLASSES,
    BISENET_TO_CELEBAMASK,
    CELEBA_TO_REGION,
    CELEBAMASK_CLASSES,
    NUM_REGIONS,
    REGION_NAMES,
    REGION_TO_CELEBAMASK,
    label19_to_regions,
)
from evaluation import metrics

DEFAULT_WIDTHS = (16, 32, 64, 128)
BISENET_SIZE = 512  # the side upstream resizes every image to
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Each parser format: (how it is named in messages, the names of its output classes in logit order).
FORMATS = {
    "unet": ("U-Net", REGION_NAMES),
    "torchscript9": ("TorchScript, 9 regions", REGION_NAMES),
    "torchscript19": ("TorchScript, 19 CelebAMask-HQ classes", CELEBAMASK_CLASSES),
    "bisenet": ("BiSeNet, 19 classes", BISENET_CLASSES),
}
# The 19-class formats: output index -> CelebAMask-HQ id. 9-class formats give regions directly.
TO_CELEBAMASK = {
    "torchscript19": np.arange(len(CELEBAMASK_CLASSES), dtype=np.int64),
    "bisenet": BISENET_TO_CELEBAMASK,
}


class ParserError(UsageError):
    """A parser file that cannot be used (one-line message naming the file)."""


# ------------------------------------------------------------------------------------------ network


def conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A compact U-Net, cheap enough to train on a CPU in minutes.

    A stride-2 stem and one more conv give the first level at half the input size (widths[0]); each
    further level halves the size (2× max pool, two convs). The decoder goes back up with bilinear
    2× upsampling, concatenation of the level's skip and one conv; a full-resolution head sees the
    upsampled features next to the input RGB (so thin parts such as brows and eyes keep sharp
    boundaries) through one more conv before the 1×1 classifier. The input side must be divisible by
    2^levels.
    """

    def __init__(self, widths=DEFAULT_WIDTHS, n_classes=NUM_REGIONS):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"U-Net widths must be at least two positive numbers, got {widths}")
        self.widths, self.n_classes = widths, int(n_classes)
        # Input: RGB and the pixel's (x, y) in [-1, 1], so where a part usually sits is learnt at once.
        self.down = nn.ModuleList([nn.Sequential(conv(5, widths[0], stride=2), conv(widths[0], widths[0]))])
        for cin, cout in zip(widths[:-1], widths[1:]):
            self.down.append(nn.Sequential(nn.MaxPool2d(2), conv(cin, cout), conv(cout, cout)))
        self.up = nn.ModuleList(conv(widths[i] + widths[i + 1], widths[i]) for i in range(len(widths) - 1))
        self.head = nn.Sequential(conv(widths[0] + 3, widths[0]), nn.Conv2d(widths[0], self.n_classes, 1))

    @staticmethod
    def with_coordinates(image):
        batch, _, height, width = image.shape
        ys = torch.linspace(-1, 1, height, device=image.device, dtype=image.dtype)
        xs = torch.linspace(-1, 1, width, device=image.device, dtype=image.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(batch, -1, -1, -1)
        return torch.cat([image, grid], 1)

    def encode(self, x):
        x = self.with_coordinates(x)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        return skips

    def forward(self, image):
        skips = self.encode(image)
        x = skips[-1]
        for i in reversed(range(len(self.up))):
            x = F.interpolate(x, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([skips[i], x], 1))
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([x, image], 1))

    def pooled_features(self, x):
        """The bottleneck averaged over space: [B, widths[-1]] (FID/KID features without Inception)."""
        return self.encode(x)[-1].mean((2, 3))


# ---------------------------------------------------------------------------------- BiSeNet network
# zllrunning's face-parsing.PyTorch BiSeNet, rebuilt from its description so that its released state
# dict (79999_iter.pth) loads strictly: the attribute names below are the file's key tree. Built from
# scratch (no ImageNet ResNet-18 download, unlike upstream's constructor): the weights come from the file.


class ConvBNReLU(nn.Module):
    """Convolution (no bias), BatchNorm, ReLU; keys conv.weight, bn.*."""

    def __init__(self, cin, cout, kernel=3, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """ResNet-18's basic block; a 1×1 projection (downsample.0 conv, downsample.1 BatchNorm) where the
    shape changes."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18Trunk(nn.Module):
    """ResNet-18 without its classifier; returns the features at 1/8, 1/16 and 1/32 of the input."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(ResidualBlock(64, 64), ResidualBlock(64, 64))
        self.layer2 = nn.Sequential(ResidualBlock(64, 128, 2), ResidualBlock(128, 128))
        self.layer3 = nn.Sequential(ResidualBlock(128, 256, 2), ResidualBlock(256, 256))
        self.layer4 = nn.Sequential(ResidualBlock(256, 512, 2), ResidualBlock(512, 512))

    def forward(self, x):
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        eighth = self.layer2(x)
        sixteenth = self.layer3(eighth)
        return eighth, sixteenth, self.layer4(sixteenth)


class AttentionRefinement(nn.Module):
    """A 3×3 ConvBNReLU whose channels are re-weighted by a sigmoid of their global average (1×1 conv,
    BatchNorm)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        features = self.conv(x)
        weights = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(features, 1))))
        return features * weights


class ContextPath(nn.Module):
    """The ResNet-18 trunk with attention refinement at 1/16 and 1/32 and the global context added,
    brought up to 1/8 and 1/16 by nearest-neighbour upsampling and 3×3 heads."""

    def __init__(self):
        super().__init__()
        self.resnet = ResNet18Trunk()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1)

    def forward(self, x):
        eighth, sixteenth, thirty_second = self.resnet(x)
        context = self.conv_avg(F.adaptive_avg_pool2d(thirty_second, 1))
        up32 = self.arm32(thirty_second) + context  # the 1×1 context broadcasts over 1/32 (nearest upsampling)
        up32 = self.conv_head32(F.interpolate(up32, size=sixteenth.shape[-2:], mode="nearest"))
        up16 = self.arm16(sixteenth) + up32
        up16 = self.conv_head16(F.interpolate(up16, size=eighth.shape[-2:], mode="nearest"))
        return eighth, up16, up32


class FeatureFusion(nn.Module):
    """Concatenated features through a 1×1 ConvBNReLU, plus themselves re-weighted by a squeeze-and-
    excitation of their global average (1×1 convs to a quarter of the channels and back)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, kernel=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial, context):
        features = self.convblk(torch.cat([spatial, context], 1))
        weights = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(features, 1)))))
        return features * weights + features


class SegmentationHead(nn.Module):
    """A 3×3 ConvBNReLU, then the 1×1 classifier (no bias)."""

    def __init__(self, cin, mid, n_classes):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet as zllrunning's face parser builds it: the context path, with ResNet-18's 1/8 features in
    place of a spatial path, fused; three heads. `forward` gives the main head's logits at the input size
    (bilinear, align_corners=True, as upstream): the one upstream takes the label from. The two auxiliary
    heads (conv_out16, conv_out32; training-time supervision) are kept so the file loads strictly, and
    `auxiliary` runs them."""

    def __init__(self, n_classes=len(BISENET_CLASSES)):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = SegmentationHead(256, 256, n_classes)
        self.conv_out16 = SegmentationHead(128, 64, n_classes)
        self.conv_out32 = SegmentationHead(128, 64, n_classes)

    def forward(self, x):
        eighth, context8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(eighth, context8))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)

    def auxiliary(self, x):
        """The auxiliary heads' logits at the input size: (from the 1/8 context, from the 1/16 context)."""
        _, context8, context16 = self.cp(x)
        return tuple(F.interpolate(head(f), size=x.shape[-2:], mode="bilinear", align_corners=True)
                     for head, f in ((self.conv_out16, context8), (self.conv_out32, context16)))


def load_bisenet_state(module, state, path):
    """Copy a BiSeNet state dict into `module` strictly: the same keys, the same shapes, or one ParserError
    line naming the first mismatches."""
    expected = module.state_dict()
    problems = state_mismatches(state, expected, allow_unused=False)
    if problems:
        raise ParserError(f"{path}: a state dict of {len(state)} tensors, not zllrunning's BiSeNet face parser "
                          f"({len(expected)} entries, the only state-dict parser this project reads): "
                          f"{'; '.join(problems)}")
    module.load_state_dict(state, strict=True)
    return module


# ------------------------------------------------------------------------------------------- loaded


def resize(images, size):
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def merge_to_regions(logits, class_to_region=CELEBA_TO_REGION):
    """19-class logits [B,19,H,W] → region probabilities [B,9,H,W]: class probabilities summed per region,
    class k going to region class_to_region[k] (default: CelebAMask-HQ order)."""
    probs = logits.float().softmax(1)
    index = torch.as_tensor(class_to_region, device=probs.device)
    out = probs.new_zeros(probs.shape[0], NUM_REGIONS, *probs.shape[2:])
    return out.index_add_(1, index, probs)


def regions_to_labels(regions):
    """Region maps [B,H,W] (ids 0-8) → CelebAMask-HQ label maps [B,H,W] by REGION_TO_CELEBAMASK: one id per
    region, the paired parts (eyes, brows, ears) split at the face's centre column (mean column of its
    'face' pixels; the image's centre where there are none)."""
    regions = regions.long()
    width = regions.shape[-1]
    columns = torch.arange(width, device=regions.device, dtype=torch.float64) + 0.5
    face = (regions == REGION_NAMES.index("face")).double()
    area = face.sum((1, 2))
    centre = torch.where(area > 0, (face.sum(1) * columns).sum(1) / area.clamp(min=1), torch.full_like(area, width / 2))
    right = columns.view(1, 1, -1) >= centre.view(-1, 1, 1)
    left_ids = torch.as_tensor([left for left, _ in REGION_TO_CELEBAMASK], device=regions.device)
    right_ids = torch.as_tensor([right for _, right in REGION_TO_CELEBAMASK], device=regions.device)
    return torch.where(right, right_ids[regions], left_ids[regions])


class Parser:
    """A loaded parser of one of the FORMATS.

    `regions(images)` gives region scores [B,9,H,W] for images [B,3,H,W] in [-1,1] (resized to the
    parser's input size and the scores back); `input_from_pil(image)` prepares one PIL image the way its
    format expects (resized on the PIL image at `size`), `labels(inputs)` turns a batch of those into
    CelebAMask-HQ label maps; `features(images)` the pooled bottleneck, for the project's own U-Net only.
    """

    def __init__(self, module, path, size=None, n_classes=NUM_REGIONS, own=False, held_out=None, format=None):
        if format is None:
            format = "unet" if own else ("torchscript19" if int(n_classes) == len(CELEBAMASK_CLASSES) else "torchscript9")
        if format not in FORMATS:
            raise ValueError(f"unknown parser format {format!r}; known: {', '.join(FORMATS)}")
        self.module, self.path, self.size, self.format = module, str(path), size, format
        self.classes = FORMATS[format][1]
        self.n_classes = len(self.classes)
        self.own, self.held_out = format == "unet", held_out

    @property
    def label(self):
        return f"{self.path} ({FORMATS[self.format][0]}{f', {self.size}px' if self.size else ''})"

    @property
    def class_to_region(self):
        """Output class → region index (one table per format)."""
        if self.format in TO_CELEBAMASK:
            return CELEBA_TO_REGION[TO_CELEBAMASK[self.format]]
        return np.arange(NUM_REGIONS)

    @property
    def device(self):
        tensor = next(iter(self.module.parameters()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def normalise(self, images):
        """RGB in [-1, 1] → what the module takes (ImageNet mean/std for BiSeNet, unchanged otherwise)."""
        if self.format != "bisenet":
            return images
        mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return ((images + 1) / 2 - mean) / std

    def input_size(self, size=None):
        """The side the module parses at: a U-Net's own; else `size`, the size given at loading, or 512."""
        if self.own:
            return self.size
        return int(size or self.size or BISENET_SIZE)

    def input_from_pil(self, image, size=None):
        """One PIL image → the module's input [3,S,S]: RGB resized on the PIL image (bilinear, as upstream
        BiSeNet does; LANCZOS for the U-Net, as prepare_data.py made its training images), then scaled."""
        side = self.input_size(size)
        resample = Image.LANCZOS if self.own else Image.BILINEAR
        rgb = np.asarray(image.convert("RGB").resize((side, side), resample), dtype=np.float32)
        return self.normalise(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None] / 127.5 - 1)[0]

    @torch.no_grad()
    def logits(self, inputs):
        out = self.module(inputs)
        if isinstance(out, (tuple, list)):  # BiSeNet-style parsers return (main, auxiliary...) logits
            out = out[0]
        return out.float()

    @torch.no_grad()
    def labels(self, inputs):
        """Module inputs [B,3,S,S] → CelebAMask-HQ label maps [B,S,S] (uint8): the argmax class through the
        format's table; a 9-region parser's regions through REGION_TO_CELEBAMASK."""
        best = self.logits(inputs).argmax(1)
        if self.format in TO_CELEBAMASK:
            return torch.as_tensor(TO_CELEBAMASK[self.format], device=best.device)[best].to(torch.uint8)
        return regions_to_labels(best).to(torch.uint8)

    @torch.no_grad()
    def regions(self, images):
        size = self.size or (BISENET_SIZE if self.format == "bisenet" else images.shape[-1])
        out = self.logits(self.normalise(resize(images, size)))
        scores = merge_to_regions(out, self.class_to_region) if self.format in TO_CELEBAMASK else out
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def features(self, images):
        if not self.own:
            raise ParserError(f"parser {self.label} has no known feature layer for FID/KID; pass --inception "
                              f"FILE or a parser trained by tools/train_parser.py")
        return self.module.pooled_features(resize(images, self.size)).double()


def is_torchscript(path):
    """TorchScript archives are zip files with code/ and constants.pkl entries; torch.save files have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_torchscript(path):
    """torch.jit.load on the CPU, without its deprecation warning (TorchScript is how these published
    parsers and detectors are distributed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu")


def load_parser(path, device="cpu", size=None):
    """A Parser from a tools/train_parser.py file, a BiSeNet state dict or a TorchScript module (19 or 9
    output classes); the format is read from the file.

    `size` sets the input size of a TorchScript parser (default: the images' own size) or a BiSeNet
    (default 512, as upstream); a U-Net always parses at the size it was trained at. Raises ParserError
    with one line.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ParserError(f"parser file {path} not found")
    if is_torchscript(path):
        try:
            module = load_torchscript(path).eval().to(device)
        except Exception as error:
            raise ParserError(f"{path}: not a loadable TorchScript parser ({str(error).splitlines()[0][:150]})") \
                from None
        probe_size = int(size or 64)
        try:
            with torch.no_grad():
                out = module(torch.zeros(1, 3, probe_size, probe_size, device=device))
        except Exception as error:
            raise ParserError(f"{path}: TorchScript parser fails on a [1,3,{probe_size},{probe_size}] image "
                              f"({str(error).splitlines()[0][:150]})") from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not torch.is_tensor(out) or out.ndim != 4 or out.shape[1] not in (len(CELEBAMASK_CLASSES), NUM_REGIONS):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ParserError(f"{path}: parser gives {shape} for one image; expected logits [1, C, H, W] with "
                              f"C = {len(CELEBAMASK_CLASSES)} (CelebAMask-HQ classes) or {NUM_REGIONS} (regions)")
        return Parser(module, path, size=size, n_classes=out.shape[1])
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as error:
        raise ParserError(str(error)) from None
    if "parser" not in ckpt and ckpt and all(torch.is_tensor(value) for value in ckpt.values()):
        module = load_bisenet_state(BiSeNet(), ckpt, path)
        return Parser(module.float().eval().to(device), path, size=int(size or BISENET_SIZE), format="bisenet")
    config = ckpt.get("config")
    if not isinstance(ckpt.get("parser"), dict) or not isinstance(config, dict):
        raise ParserError(f"{path}: not a parser file (expected the entries 'parser' and 'config' written by "
                          f"tools/train_parser.py, a BiSeNet state dict, or a TorchScript module; found "
                          f"{sorted(map(str, ckpt))[:6]})")
    n_classes = int(config.get("n_classes", -1))
    if n_classes != NUM_REGIONS:
        raise ParserError(f"{path}: parser has {n_classes} classes; expected {NUM_REGIONS} (the regions of common/regions.py)")
    try:
        module = UNet(config["widths"], n_classes)
        module.load_state_dict(ckpt["parser"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise ParserError(f"{path}: parser weights do not fit its config ({str(error).splitlines()[0][:150]})") \
            from None
    return Parser(module.eval().to(device), path, size=int(config["size"]), own=True, held_out=ckpt.get("held_out"))


def save_parser(path, module, size, held_out):
    save_checkpoint({"parser": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                     "config": {"size": int(size), "widths": list(module.widths), "n_classes": module.n_classes,
                                "regions": list(REGION_NAMES)},
                     "held_out": held_out}, path)


# --------------------------------------------------------------------------------------------- data


def load_images(dataset, indices, labels=True, progress=True):
    """(uint8 images [N,3,S,S], region maps uint8 [N,S,S] or None) of dataset items (dataset.py's
    MultiResolutionDataset, unflipped)."""
    images, regions = [], []
    for i in tqdm(indices, desc="reading images", disable=not progress, leave=False):
        img, label = dataset.load(int(i))
        images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        if labels:
            regions.append(torch.from_numpy(np.asarray(label19_to_regions(label), dtype=np.uint8)))
    return torch.stack(images), (torch.stack(regions) if labels else None)


def to_float(images):
    """uint8 [...,3,H,W] → float in [-1, 1]."""
    return images.float() / 127.5 - 1


def split(n, holdout):
    """(train indices, held-out indices): the last max(1, round(holdout·n)) images are held out."""
    held = max(1, int(round(float(holdout) * n)))
    if held >= n:
        raise UsageError(f"holding out {held} of {n} images leaves none to train on")
    return list(range(n - held)), list(range(n - held, n))


# ----------------------------------------------------------------------------------------- training


def augment(images, labels, generator, shift):
    """Random left-right flips (safe: regions merge left and right) and translations by up to `shift` px."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
    if shift > 0:
        dx, dy = (torch.randint(-shift, shift + 1, (2,), generator=generator)).tolist()
        pad = (shift, shift, shift, shift)
        images = F.pad(images, pad, mode="replicate")[..., shift + dy:shift + dy + images.shape[-2],
                                                      shift + dx:shift + dx + images.shape[-1]]
        labels = F.pad(labels[:, None].float(), pad, mode="replicate")[:, 0].long()[
            ..., shift + dy:shift + dy + labels.shape[-2], shift + dx:shift + dx + labels.shape[-1]]
    return images, labels


def train(images, labels, widths=DEFAULT_WIDTHS, epochs=10, batch=8, lr=3e-3, seed=0, device="cpu",
          shift=None, progress=True):
    """Train a U-Net on uint8 images [N,3,S,S] and region maps [N,S,S]: Adam, class-weighted cross-entropy,
    learning rate on a cosine schedule to 0, flips and small shifts. Returns the network in eval mode."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    if size % 2 ** len(widths):
        raise UsageError(f"image size {size} is not divisible by 2^{len(widths)} (U-Net with {len(widths)} levels)")
    shift = max(1, size // 16) if shift is None else shift
    model = UNet(widths).to(device)
    # Small regions (eyes, brows, mouth) weigh as much in the mIoU as the background: the loss weights
    # each region by 1/sqrt(its pixel frequency) (normalised to mean 1), so they are learnt early.
    counts = torch.bincount(labels.reshape(-1).long(), minlength=NUM_REGIONS).double()
    weights = (counts.sum() / counts.clamp(min=1)).sqrt()
    weights = (weights / weights[counts > 0].mean()).where(counts > 0, torch.zeros_like(weights))
    weights = weights.float().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(1, math.ceil(images.shape[0] / batch))
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    bar = tqdm(total=total, desc="training parser", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=rng)
        for start in range(0, images.shape[0], batch):
            pick = order[start:start + batch]
            if pick.numel() < 2:  # BatchNorm needs two samples
                continue
            x, y = augment(to_float(images[pick]), labels[pick].long(), rng, shift)
            loss = F.cross_entropy(model(x.to(device)), y.to(device), weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def evaluate(parser, images, labels, batch=64, device="cpu"):
    """(IoU per region, mIoU) of a Parser on uint8 images [N,3,S,S] against region maps [N,S,S]."""
    confusion = torch.zeros(NUM_REGIONS, NUM_REGIONS, dtype=torch.long)
    for start in range(0, images.shape[0], batch):
        x = to_float(images[start:start + batch]).to(device)
        pred = parser.regions(x).argmax(1).cpu()
        confusion += metrics.confusion_matrix(pred, labels[start:start + batch], NUM_REGIONS)
    ious = metrics.iou_per_class(confusion)
    return ious, metrics.mean_iou(ious)


def iou_table(ious, miou):
    """A markdown table of per-region IoU and the mean."""
    lines = ["| region | IoU |", "|---|---|"]
    lines += [f"| {name} | {'-' if math.isnan(v) else f'{v:.3f}'} |" for name, v in zip(REGION_NAMES, ious)]
    lines.append(f"| **mean** | **{miou:.3f}** |")
    return "\n".join(lines)

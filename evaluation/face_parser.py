"""A face parser for the evaluation metrics: a compact U-Net trained on the LMDB's own label maps
(tools/train_parser.py), or any TorchScript face parser giving 19- or 9-class logits.

The parser maps RGB images in [-1, 1] to scores over the 9 regions of common/regions.py. Its role in
calc_metrics.py: the semantic-consistency metric (parse a generated image, compare with the
generator's own segmentation), and, when no Inception file is given, the features of FID/KID (the
U-Net's pooled bottleneck).

Saved parsers are checkpoint.save_checkpoint files holding tensors and plain values only:
    {"parser": state dict, "config": {"size": S, "widths": [...], "n_classes": 9, "regions": [names]},
     "held_out": {"miou": m, "iou": [per region], "images": count, "dataset": path}}
"""
import math
import os
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.cli import UsageError
from common.regions import CELEBA_TO_REGION, CELEBAMASK_CLASSES, NUM_REGIONS, REGION_NAMES, label19_to_regions
from evaluation import metrics

DEFAULT_WIDTHS = (16, 32, 64, 128)


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


# ------------------------------------------------------------------------------------------- loaded


def resize(images, size):
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def merge_to_regions(logits):
    """19-class CelebAMask-HQ logits [B,19,H,W] → region probabilities [B,9,H,W] (class probabilities
    summed per region)."""
    probs = logits.float().softmax(1)
    index = torch.as_tensor(CELEBA_TO_REGION, device=probs.device)
    out = probs.new_zeros(probs.shape[0], NUM_REGIONS, *probs.shape[2:])
    return out.index_add_(1, index, probs)


class Parser:
    """A loaded parser: `regions(images)` gives region scores [B,9,H,W] for images [B,3,H,W] in [-1,1]
    (resized to the parser's input size and the scores back); `features(images)` the pooled bottleneck,
    for the project's own U-Net only."""

    def __init__(self, module, path, size=None, n_classes=NUM_REGIONS, own=False, held_out=None):
        self.module, self.path, self.size, self.n_classes = module, str(path), size, int(n_classes)
        self.own, self.held_out = own, held_out

    @property
    def label(self):
        kind = "U-Net" if self.own else f"TorchScript, {self.n_classes} classes"
        return f"{self.path} ({kind}{f', {self.size}px' if self.size else ''})"

    @torch.no_grad()
    def regions(self, images):
        size = self.size or images.shape[-1]
        out = self.module(resize(images, size))
        if isinstance(out, (tuple, list)):  # BiSeNet-style parsers return (main, auxiliary...) logits
            out = out[0]
        scores = merge_to_regions(out) if out.shape[1] == len(CELEBAMASK_CLASSES) else out.float()
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def features(self, images):
        if not self.own:
            raise ParserError(f"parser {self.path} is a TorchScript file: it has no known feature layer for "
                              f"FID/KID; pass --inception FILE or a parser trained by tools/train_parser.py")
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
    """A Parser from a tools/train_parser.py file or a TorchScript module (19 or 9 output classes).

    `size` sets a TorchScript parser's input size (default: the images' own size); a U-Net always
    parses at the size it was trained at. Raises ParserError with one line.
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
    config = ckpt.get("config")
    if not isinstance(ckpt.get("parser"), dict) or not isinstance(config, dict):
        raise ParserError(f"{path}: not a parser file (expected the entries 'parser' and 'config' written by "
                          f"tools/train_parser.py, or a TorchScript module; found {sorted(ckpt)[:6]})")
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

"""The evaluation metrics of calc_metrics.py, each run on a loaded generator: sample sets for FID/KID
and semantic consistency, edit locality, view consistency, inversion of dataset portraits.

The arithmetic lives in evaluation/metrics.py, the face parser in evaluation/face_parser.py; this module renders what they
measure. Every identity, camera and subset is drawn from a fixed seed, so two runs give the same
numbers. Images are rendered the published inference way (rendering.inference.render_codes: input_is_latent,
truncation ψ applied to the codes as the inference script does, fixed decoder noise).
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import UsageError
from common.regions import NUM_REGIONS, REGION_NAMES, color_segmap
from editing import manipulation
from evaluation import face_parser, metrics
from rendering.camera import cameras
from rendering.inference import render_codes

# Seed offsets, so that the identities of different metrics never coincide.
SAMPLE_SEED, LOCALITY_SEED, CONSISTENCY_SEED, DIVERSITY_SEED = 0, 1_000_000, 2_000_000, 3_000_000


class EvaluationError(UsageError):
    """A file or setting the evaluation cannot use (one-line message)."""


# ------------------------------------------------------------------------------------- features


def quantize(images):
    """Images in [-1, 1] rounded to 8 bits, as a saved PNG would be (dataset images are 8-bit too)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class InceptionFeatures:
    """Pool features (2048) of an Inception-v3 read from a local file: the TorchScript detector of the
    StyleGAN2-ADA / EG3D metrics (called on uint8 [B,3,H,W] with return_features=True; it resizes to
    299 itself), or a torchvision `inception_v3` state dict (images resized to 299, fed in [-1, 1],
    which is what torchvision's transform_input produces for these weights; the classifier dropped)."""

    name = "inception"

    def __init__(self, path, device):
        self.path, self.device = str(path), device
        if not os.path.isfile(self.path):
            raise EvaluationError(f"--inception {self.path}: file not found (nothing is downloaded; give a local "
                                  f"Inception-v3 TorchScript file or torchvision inception_v3 state dict)")
        if face_parser.is_torchscript(self.path):
            try:
                self.module = face_parser.load_torchscript(self.path).eval().to(device)
            except Exception as error:
                raise EvaluationError(f"--inception {self.path}: not a loadable TorchScript file "
                                      f"({str(error).splitlines()[0][:150]})") from None
            self.torchscript = True
        else:
            import torchvision

            from common.checkpoint import CheckpointError, load_checkpoint

            try:
                state = load_checkpoint(self.path)
            except CheckpointError as error:
                raise EvaluationError(f"--inception {error}") from None
            net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False,
                                                  transform_input=False)
            own = net.state_dict()
            bad = [k for k, v in own.items() if not torch.is_tensor(state.get(k)) or state[k].shape != v.shape]
            if bad:
                raise EvaluationError(f"--inception {self.path}: not a torchvision inception_v3 state dict "
                                      f"({len(bad)} missing or misshapen entries, first: {', '.join(bad[:3])})")
            net.load_state_dict({k: state[k] for k in own})
            net.fc = torch.nn.Identity()
            self.module = net.eval().to(device)
            self.torchscript = False
        try:  # one image through it now, so a wrong file fails before any rendering
            self(torch.zeros(1, 3, 32, 32, device=device))
        except EvaluationError:
            raise
        except Exception as error:
            raise EvaluationError(f"--inception {self.path}: fails on an image ({str(error).splitlines()[0][:150]})") \
                from None

    @torch.no_grad()
    def __call__(self, images):
        images = images.to(self.device)
        if self.torchscript:
            uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out = self.module(uint8, return_features=True)
        else:
            out = self.module(F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False))
        if out.ndim != 2:
            raise EvaluationError(f"--inception {self.path}: features of shape {tuple(out.shape)}, expected [B, D]")
        return out.double().cpu().numpy()


class ParserFeatures:
    """The face parser's pooled bottleneck as the features of FID/KID (when no Inception file is given)."""

    name = "parser"

    def __init__(self, parser):
        self.parser = parser
        parser.features(torch.zeros(1, 3, parser.size, parser.size, device=next(parser.module.parameters()).device))

    def __call__(self, images):
        device = next(self.parser.module.parameters()).device
        return self.parser.features(images.to(device)).cpu().numpy()


# -------------------------------------------------------------------------------------- cameras


def training_camera(camera_opt, seed):
    """One (azimuth, elevation) [1,2] drawn like the training cameras (normal, or uniform with --uniform)."""
    rng = torch.Generator().manual_seed(int(seed))
    ranges = torch.tensor([camera_opt.azim, camera_opt.elev])
    if camera_opt.uniform:
        return (torch.rand(1, 2, generator=rng) * 2 - 1) * ranges
    return torch.randn(1, 2, generator=rng) * ranges


def render_batch(generator, codes, styles, locations, camera_opt, mean, psi, return_xyz=False):
    """(rgb, seg_high[, rgb_low, xyz, (extrinsics, focal)]) of codes [B,2K,D] from locations [B,2]."""
    device = codes.device
    cam = cameras(generator.renderer.out_im_res, locations.to(device), camera_opt, device)
    out = render_codes(generator, codes, styles, cam, mean, psi, return_xyz=return_xyz)
    (rgb, seg), rgb_low = out[0], out[1]
    if not return_xyz:
        return rgb, seg
    return rgb, seg, rgb_low, out[2], (cam[0], cam[1])


# ---------------------------------------------------------------------------- generated samples


@torch.no_grad()
def sample_set(generator, opt, mean, psi, n, batch, extractor=None, parser=None, keep=8, progress=True):
    """Render n identities (seed SAMPLE_SEED + i, camera drawn like training cameras from the same seed).

    Returns dict(features [n,D] of the quantised images when an extractor is given, confusion [K,K]
    of the parser's regions against the generator's own (argmax) when a parser is given, and the first
    `keep` images, segs and parser segs for a picture)."""
    features, kept = [], {"rgb": [], "seg": [], "parsed": []}
    confusion = torch.zeros(NUM_REGIONS, NUM_REGIONS, dtype=torch.long)
    for start in tqdm(range(0, n, batch), desc="generated samples", disable=not progress):
        seeds = list(range(SAMPLE_SEED + start, SAMPLE_SEED + min(n, start + batch)))
        codes, styles = manipulation.latents_from_seeds(generator, seeds, mean, psi)
        locations = torch.cat([training_camera(opt.camera, s) for s in seeds])
        rgb, seg = render_batch(generator, codes, styles, locations, opt.camera, mean, psi)
        rgb = quantize(rgb)
        if extractor is not None:
            features.append(extractor(rgb))
        parsed = None
        if parser is not None:
            parsed = parser.regions(rgb)
            confusion += metrics.confusion_matrix(parsed.argmax(1).cpu(), seg.argmax(1).cpu(), NUM_REGIONS)
        if len(kept["rgb"]) < keep:
            kept["rgb"] += list(rgb[:keep].cpu())
            kept["seg"] += list(seg[:keep].cpu())
            if parsed is not None:
                kept["parsed"] += list(parsed[:keep].cpu())
    return {"features": np.concatenate(features) if features else None, "confusion": confusion,
            "kept": {k: v[:keep] for k, v in kept.items()}}


def diversity_labels(generator, opt, mean, psi, n, batch, progress=True):
    """Region labels (argmax of the output seg) of n identities (seed DIVERSITY_SEED + i): each under a camera
    drawn like the training cameras, and all under the frontal camera. Returns (training [n,H,W],
    frontal [n,H,W])."""
    training, frontal = [], []
    for start in tqdm(range(0, n, batch), desc="diversity", disable=not progress):
        seeds = list(range(DIVERSITY_SEED + start, DIVERSITY_SEED + min(n, start + batch)))
        codes, styles = manipulation.latents_from_seeds(generator, seeds, mean, psi)
        locations = torch.cat([training_camera(opt.camera, s) for s in seeds])
        training.append(render_batch(generator, codes, styles, locations, opt.camera, mean, psi)[1].argmax(1).cpu())
        frontal.append(render_batch(generator, codes, styles, torch.zeros_like(locations), opt.camera, mean,
                                    psi)[1].argmax(1).cpu())
    return torch.cat(training), torch.cat(frontal)


def diversity_summary(labels):
    """What the diversity metric reports of label maps [N,H,W]: per region the mean and the standard
    deviation (over images) of its area fraction, and the pairwise difference (metrics.pairwise_difference)."""
    areas = metrics.area_fractions(labels, NUM_REGIONS)
    return {"area_mean": areas.mean(0).tolist(), "area_std": areas.std(0, unbiased=False).tolist(),
            "pairwise_difference": metrics.pairwise_difference(labels)}


def dataset_features(dataset, indices, extractor, batch=64, progress=True, desc="dataset images"):
    """Features [N,D] of the dataset's images at `indices` (unflipped, 8-bit as stored)."""
    out = []
    for start in tqdm(range(0, len(indices), batch), desc=desc, disable=not progress):
        images, _ = face_parser.load_images(dataset, indices[start:start + batch], labels=False, progress=False)
        out.append(extractor(face_parser.to_float(images)))
    return np.concatenate(out)


def data_halves(length, m, seed=0):
    """Two disjoint index sets of m images each (a fixed random permutation of the dataset)."""
    perm = np.random.default_rng(seed).permutation(length)
    return sorted(perm[:m].tolist()), sorted(perm[m:2 * m].tolist())


# ------------------------------------------------------------------------------------- locality


@torch.no_grad()
def locality(generator, opt, mean, psi, pairs, attributes, min_area, chunk=8, progress=True):
    """Region swaps of identity pairs, frontal view (seeds LOCALITY_SEED + 2p and + 2p + 1).

    For each pair, attribute and region k: the source's codes with region k's `attribute` code(s) taken
    from the reference; M = the pixels whose argmax of the source's rendered seg is k, |Δ| the per-pixel
    mean absolute RGB change (images in [-1, 1]). A pair counts for region k when M covers at least
    `min_area` of the image (and not all of it). Returns {attribute: [per region dict(pairs, area,
    outside, inside, ratio)]} with means over the counted pairs (ratio: mean of outside/inside),
    and an example (rgb, source seg, deltas) of the first pair for a picture.
    """
    n_regions = generator.n_render
    stats = {a: [{"outside": [], "inside": [], "ratio": [], "area": []} for _ in range(n_regions)]
             for a in attributes}
    example = None
    for p in tqdm(range(pairs), desc="locality pairs", disable=not progress):
        codes, styles = manipulation.latents_from_seeds(generator, [LOCALITY_SEED + 2 * p, LOCALITY_SEED + 2 * p + 1],
                                                        mean, psi)
        edits = [manipulation.swap_region_codes(codes[:1], codes[1:], [k], a) for a in attributes for k in range(n_regions)]
        batch = torch.cat([codes[:1]] + edits)
        # Source and edits rendered the same way, so pixels an edit leaves alone match to round-off.
        rgbs = []
        for start in range(0, batch.shape[0], chunk):
            part = batch[start:start + chunk]
            rgb, seg = render_batch(generator, part, styles[:1].expand(part.shape[0], -1),
                                    torch.zeros(part.shape[0], 2), opt.camera, mean, psi)
            rgbs.append(rgb)
            if start == 0:
                labels = seg[0].argmax(0)
                source_seg = seg[0]
        rgb = torch.cat(rgbs)
        deltas = (rgb[1:] - rgb[:1]).abs().mean(1)
        for j, a in enumerate(attributes):
            for k in range(n_regions):
                mask = labels == k
                area = mask.double().mean().item()
                measured = metrics.locality(deltas[j * n_regions + k], mask)
                if measured is None or area < min_area:
                    continue
                outside, inside = measured
                entry = stats[a][k]
                entry["outside"].append(outside)
                entry["inside"].append(inside)
                entry["ratio"].append(outside / inside if inside > 0 else math.inf)
                entry["area"].append(area)
        if example is None:
            example = (rgb.cpu(), source_seg.cpu(), deltas.cpu())
    summary = {a: [{"pairs": len(e["ratio"]),
                    **{key: (float(np.mean(e[key])) if e[key] else None) for key in ("area", "outside", "inside",
                                                                                     "ratio")}}
                   for e in stats[a]] for a in attributes}
    return summary, example


# ------------------------------------------------------------------------- frontal portrait check


# What a portrait shows (ears may hide under hair): the regions the check of a shipped model asks for.
PORTRAIT_REGIONS = ("background", "face", "eye", "mouth", "brow", "nose", "hair", "neck+cloth")


def _top_row(mask):
    return int(mask.any(1).nonzero()[0])


def _centroid_row(mask):
    rows = torch.arange(mask.shape[0], dtype=torch.float32, device=mask.device)[:, None].expand_as(mask)
    return float((rows * mask).sum() / mask.sum())


def placement_problems(labels):
    """Where a portrait's parts are implausible, as short sentences (none: an empty list). labels [N,H,W]
    region indices: the face larger than eye, mouth and nose; eyes above the mouth, the face above the
    neck+cloth, the hair's top at or above the face's (each when both parts are shown)."""
    index = {name: k for k, name in enumerate(REGION_NAMES)}
    problems = []
    for i in range(labels.shape[0]):
        part = {name: (labels[i] == index[name]).float() for name in ("face", "eye", "mouth", "nose", "hair",
                                                                      "neck+cloth")}
        area = {name: float(mask.mean()) for name, mask in part.items()}
        if area["face"] <= max(area["eye"], area["mouth"], area["nose"]):
            problems.append(f"portrait {i}: face not the largest part")
        if area["eye"] and area["mouth"] and _centroid_row(part["eye"]) >= _centroid_row(part["mouth"]):
            problems.append(f"portrait {i}: eyes below mouth")
        if area["face"] and area["neck+cloth"] and _centroid_row(part["face"]) >= _centroid_row(part["neck+cloth"]):
            problems.append(f"portrait {i}: neck above face")
        if area["face"] and area["hair"] and _top_row(part["hair"]) > _top_row(part["face"]):
            problems.append(f"portrait {i}: no hair above the face")
    return problems


def mask_leak(seg, labels):
    """How far a rendered seg [N,K,H,W] is from one-hot: per region, the mean |seg_k| over the pixels whose
    argmax (labels [N,H,W]) is another region (0 when every pixel is that region's). The renderer's seg is
    the mask heads' raw values summed along the ray (SPEC §7, no softmax), and the same values weight each
    region's colour at every point, so a texture edit of a region reaches every pixel where its seg is not
    zero (how far depends also on how much the edit changes the region's colour logits)."""
    return {name: float(seg[:, k][labels != k].abs().mean()) if bool((labels != k).any()) else 0.0
            for k, name in enumerate(REGION_NAMES)}


def _region_check(rgb, labels, swapped, region):
    """Which regions labels [N,H,W] show (portraits showing each, mean area fraction and its spread over
    the portraits), how much two portraits' labels differ (metrics.pairwise_difference: the head's variety,
    the camera being the same), their placement problems, and the swap's mean |Δ| (RGB mean) inside
    `region`'s pixels and outside them."""
    area = torch.stack([(labels == k).float().mean((1, 2)) for k in range(len(REGION_NAMES))], 1)  # [N,K]
    delta = (swapped - rgb).abs().mean(1)
    inside_mask = labels == region
    inside = float(delta[inside_mask].mean()) if inside_mask.any() else 0.0
    outside = float(delta[~inside_mask].mean()) if (~inside_mask).any() else 0.0
    return {"shown": {name: int((area[:, k] > 0).sum()) for k, name in enumerate(REGION_NAMES)},
            "area": {name: float(area[:, k].mean()) for k, name in enumerate(REGION_NAMES)},
            "spread": {name: float(area[:, k].std(unbiased=False)) for k, name in enumerate(REGION_NAMES)},
            "pairwise_difference": metrics.pairwise_difference(labels) if len(labels) >= 2 else 0.0,
            "problems": placement_problems(labels),
            "swap": {"region": REGION_NAMES[region], "inside": inside, "outside": outside,
                     "ratio": outside / inside if inside > 0 else math.inf}}


@torch.no_grad()
def portrait_check(generator, opt, mean, psi, seeds, swap_region="hair"):
    """The shipped model's test, measured: frontal portraits of `seeds` (manipulation.latents_from_seeds, ψ),
    which regions their seg (argmax) shows, where, and a texture swap of `swap_region` (each portrait
    takes the next one's texture code).

    Returns dict(n, renderer, low) and, for a generator with the decoder, the output's measures at the top
    level. The measures (_region_check): shown {region name: portraits showing it}, area {region name: mean
    area fraction}, problems (placement_problems), swap {region, inside, outside, ratio}: mean |Δ| (RGB
    mean, images in [-1, 1]) inside the region's pixels and outside them. `renderer` holds them for the
    volume renderer's own low-res image and seg (which the decoder starts from) with its mask_leak; the
    pictures are rgb [N,3,H,W], labels [N,H,W] and swapped rgb (top level: output; `low`: renderer)."""
    region = REGION_NAMES.index(swap_region)
    codes, styles = manipulation.latents_from_seeds(generator, seeds, mean, psi)
    cam = cameras(generator.renderer.out_im_res, torch.zeros(len(seeds), 2), opt.camera, mean[0].device)
    (rgb, seg), rgb_low, seg_low = render_codes(generator, codes, styles, cam, mean, psi)
    edited = manipulation.swap_region_codes(codes, torch.roll(codes, 1, 0), [region], "texture")
    (swapped, _), swapped_low, _ = render_codes(generator, edited, styles, cam, mean, psi)
    labels_low = seg_low.argmax(1)
    renderer = _region_check(rgb_low, labels_low, swapped_low, region)
    renderer["mask_leak"] = mask_leak(seg_low, labels_low)
    result = {"n": len(seeds), "renderer": renderer,
              "low": {"rgb": rgb_low.cpu(), "labels": labels_low.cpu(), "swapped": swapped_low.cpu()}}
    if rgb is not None:  # the full pipeline: the decoder's output
        labels = seg.argmax(1)
        result.update(_region_check(rgb, labels, swapped, region), rgb=rgb.cpu(), labels=labels.cpu(),
                      swapped=swapped.cpu())
    return result


# ----------------------------------------------------------------------------------- consistency


@torch.no_grad()
def consistency(generator, opt, mean, psi, n, azimuth, tolerance=1.5, progress=True):
    """Each identity (seed CONSISTENCY_SEED + i) from azimuth -a and +a (elevation 0); each view warped
    onto the other through its rendered surface (metrics.reprojection), both directions averaged.

    Returns per-identity lists: visible (fraction of the image seen in both), colour_error (output
    images), colour_error_renderer (the renderer's low-resolution RGB, 3D-consistent up to its
    view-dependent colour), seg_agreement; and an example for a picture.
    """
    keys = ("visible", "colour_error", "colour_error_renderer", "seg_agreement")
    results = {k: [] for k in keys}
    example = None
    size = generator.size
    locations = torch.tensor([[-azimuth, 0.0], [azimuth, 0.0]])
    for i in tqdm(range(n), desc="view pairs", disable=not progress):
        codes, styles = manipulation.latents_from_seeds(generator, [CONSISTENCY_SEED + i], mean, psi)
        rgb, seg, rgb_low, xyz, (extrinsics, focal) = render_batch(
            generator, codes.expand(2, -1, -1), styles.expand(2, -1), locations, opt.camera, mean, psi,
            return_xyz=True)
        focal_high = focal * (size / generator.renderer.out_im_res)
        order = [0, 1], [1, 0]
        a, b = order
        high = metrics.reprojection(rgb[a], rgb[b], xyz[a], xyz[b], (extrinsics[a], focal_high[a]),
                                    (extrinsics[b], focal_high[b]), seg[a], seg[b], tolerance)
        low = metrics.reprojection(rgb_low[a], rgb_low[b], xyz[a], xyz[b], (extrinsics[a], focal[a]),
                                   (extrinsics[b], focal[b]), tolerance=tolerance)
        for key, source in (("visible", high), ("colour_error", high), ("seg_agreement", high)):
            results[key].append(float(np.nanmean(source[key])))
        results["colour_error_renderer"].append(float(np.nanmean(low["colour_error"])))
        if example is None:
            example = (rgb.cpu(), seg.cpu())
    return results, example


# ------------------------------------------------------------------------------------- inversion


def inversion(generator, opt, mean, psi, dataset, indices, steps, lr, progress=True):
    """Invert dataset portraits (manipulation.invert: pixel L2, from the mean latent and a frontal camera; the
    label map is not used by the fit) and compare the reconstruction with the portrait: PSNR, SSIM
    (scikit-image) and the confusion of the rendered seg's regions against the true label map.
    Returns (per-image list of dict(index, psnr, ssim), confusion [K,K], pictures)."""
    param = next(generator.parameters())
    rows, pictures = [], []
    confusion = torch.zeros(NUM_REGIONS, NUM_REGIONS, dtype=torch.long)
    for index in tqdm(indices, desc="inversions", disable=not progress):
        images, regions = face_parser.load_images(dataset, [index], progress=False)
        target = face_parser.to_float(images).to(device=param.device, dtype=param.dtype)
        result = manipulation.invert(generator, target, mean, psi, opt.camera, steps=steps, lr=lr, progress=False)
        rgb = quantize(result["rgb"])
        rows.append({"index": int(index), "psnr": metrics.psnr(rgb, target), "ssim": metrics.ssim(rgb[0], target[0]),
                     "camera": [round(v, 4) for v in result["camera"][0].tolist()]})
        confusion += metrics.confusion_matrix(result["seg"].argmax(1).cpu(), regions.long(), NUM_REGIONS)
        pictures.append((target[0].cpu(), rgb[0].cpu(), regions[0], result["seg"][0].cpu()))
    return rows, confusion, pictures


# ---------------------------------------------------------------------------------------- pictures


def region_image(labels):
    """Region indices [H,W] → uint8 colour image."""
    return color_segmap(F.one_hot(torch.as_tensor(labels).long(), NUM_REGIONS).permute(2, 0, 1).float())


def heat(delta):
    """|Δ| map [H,W] (0..2) → uint8 grey image, scaled so that 0.5 is white."""
    x = (delta.clamp(0, 0.5) / 0.5 * 255).round().to(torch.uint8).cpu().numpy()
    return np.repeat(x[..., None], 3, axis=-1)

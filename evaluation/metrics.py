"""The arithmetic of the evaluation metrics (calc_metrics.py), free of any model: Fréchet distance,
kernel distance, IoU, pixel reprojection between two rendered views, edit locality, PSNR / SSIM.

Everything here takes plain arrays or tensors, so each formula can be checked against a known answer
(tests/test_metrics.py).
"""
import math
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------- feature distances


def feature_statistics(features):
    """(mean [D], covariance [D,D]) of features [N,D] in float64 (the unbiased covariance, as
    StyleGAN2-ADA's and torch-fidelity's FID use)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance of two Gaussians: |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½).

    The matrix square root is scipy's sqrtm; its tiny imaginary part (round-off for a product of two
    covariances) is dropped, and a singular product gets a small ridge first, as in the common FID
    implementations.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: means {mu1.shape} / {mu2.shape}, "
                         f"covariances {sigma1.shape} / {sigma2.shape}")
    with warnings.catch_warnings():  # a singular product is handled below, not warned about
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.all(np.isfinite(root)):
            ridge = np.eye(sigma1.shape[0]) * 1e-6
            root = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    root = np.real(root)
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))
    return max(value, 0.0)


def fid(features_a, features_b):
    """Fréchet distance of the Gaussians fitted to two feature sets [N,D], [M,D]."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def polynomial_kernel(x, y):
    """k(x, y) = (x·y / D + 1)³, the kernel of KID (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(features_a, features_b, num_subsets=100, max_subset_size=1000, seed=0):
    """Kernel Inception Distance: the unbiased MMD² with the cubic polynomial kernel, averaged over
    `num_subsets` random subsets of min(N, M, max_subset_size) features from each set (the
    StyleGAN2-ADA estimator). Returns (mean, standard deviation over the subsets). A fixed `seed`
    makes it repeatable."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {a.shape} and {b.shape}")
    m = min(a.shape[0], b.shape[0], int(max_subset_size))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {a.shape[0]} and {b.shape[0]}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(num_subsets)):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


# ------------------------------------------------------------------------------------ segmentation


def confusion_matrix(pred, target, n_classes):
    """[C,C] counts (row: target class, column: predicted class) of two integer label maps of one shape."""
    pred, target = torch.as_tensor(pred).long().reshape(-1), torch.as_tensor(target).long().reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"label maps differ in size: {pred.numel()} and {target.numel()} pixels")
    index = target.cpu() * n_classes + pred.cpu()
    return torch.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_per_class(confusion):
    """IoU per class from a confusion matrix: |P ∩ T| / |P ∪ T|; NaN for a class in neither."""
    conf = torch.as_tensor(confusion).double()
    hits = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, math.nan)).tolist()


def mean_iou(ious):
    """Mean over the classes that occur (NaN entries skipped); NaN when none does."""
    present = [v for v in ious if not math.isnan(v)]
    return float(np.mean(present)) if present else math.nan


# ---------------------------------------------------------------------------------- reprojection


def project(points, extrinsics, focal, size):
    """Pixel coordinates (x, y), continuous with pixel centres at +0.5, and the depth in front of the
    camera, of world points [B,...,3] seen by cameras (camera-to-world [B,3,4], focal [B] in pixels of
    an image `size` pixels wide), inverting camera.camera_rays: a ray through (x, y) has the camera
    direction ((x - W/2) / f, -(y - H/2) / f, -1)."""
    batch = points.shape[0]
    rotation, origin = extrinsics[:, :, :3], extrinsics[:, :, 3]
    flat = points.reshape(batch, -1, 3) - origin[:, None]
    local = flat @ rotation  # world → camera: R^T (p - o), as row vectors
    depth = -local[..., 2]
    f = focal.reshape(batch, 1)
    safe = depth.clamp(min=1e-8)
    x = size * 0.5 + f * local[..., 0] / safe
    y = size * 0.5 - f * local[..., 1] / safe
    shape = points.shape[:-1]
    return x.reshape(shape), y.reshape(shape), depth.reshape(shape)


def sample_at(image, x, y, mode="bilinear"):
    """image [B,C,H,W] read at continuous pixel coordinates x, y [B,h,w] (pixel centres at +0.5)."""
    height, width = image.shape[-2:]
    grid = torch.stack([x / width * 2 - 1, y / height * 2 - 1], -1)
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode="border", align_corners=False)


def reprojection(rgb_a, rgb_b, xyz_a, xyz_b, cam_a, cam_b, seg_a=None, seg_b=None, tolerance=1.5):
    """Warp view B onto view A through A's rendered surface and compare where both views see it.

    rgb_* [B,3,H,W] in [-1,1]; xyz_* [B,3,r,r] the renderer's expected surface points (world), bilinearly
    resized to H×W when r < H; cam_* = (extrinsics [B,3,4], focal [B,...] in pixels at H); seg_* optional
    region scores [B,K,H,W] (argmax compared, B's read at the nearest pixel).

    A pixel of A counts as seen in both views when its surface point p lands inside B and B's surface
    point there is p again within `tolerance` pixel footprints (|p_B - p| < tolerance · depth / f):
    otherwise B sees something else there (occlusion) or nothing. Returns per image: visible fraction,
    mean absolute colour error over the visible pixels (mean over channels, images in [-1, 1]) and,
    with segs, the fraction of visible pixels whose regions agree.
    """
    size = rgb_a.shape[-1]
    if xyz_a.shape[-1] != size:
        xyz_a = F.interpolate(xyz_a, size=rgb_a.shape[-2:], mode="bilinear", align_corners=False)
        xyz_b = F.interpolate(xyz_b, size=rgb_a.shape[-2:], mode="bilinear", align_corners=False)
    points = xyz_a.permute(0, 2, 3, 1)  # [B,H,W,3]
    x, y, depth = project(points, cam_b[0], cam_b[1].reshape(-1), size)
    inside = (x >= 0) & (x <= size) & (y >= 0) & (y <= size) & (depth > 0)
    seen = sample_at(xyz_b, x, y).permute(0, 2, 3, 1)
    footprint = depth.abs() / cam_b[1].reshape(-1, 1, 1)
    visible = inside & ((seen - points).norm(dim=-1) < tolerance * footprint)
    colour = (sample_at(rgb_b, x, y) - rgb_a).abs().mean(1)  # [B,H,W]
    count = visible.flatten(1).sum(1)
    result = {"visible": (count.double() / visible[0].numel()).tolist(),
              "colour_error": torch.where(count > 0, (colour * visible).flatten(1).sum(1) / count.clamp(min=1),
                                          torch.full_like(count, math.nan, dtype=colour.dtype)).tolist()}
    if seg_a is not None and seg_b is not None:
        labels_b = sample_at(seg_b.argmax(1, keepdim=True).to(rgb_a.dtype), x, y, mode="nearest")[:, 0]
        agree = (labels_b.long() == seg_a.argmax(1)) & visible
        result["seg_agreement"] = torch.where(count > 0, agree.flatten(1).sum(1).double() / count.clamp(min=1),
                                              torch.full_like(count, math.nan, dtype=torch.double)).tolist()
    return result


# --------------------------------------------------------------------------------------- diversity


def area_fractions(labels, n_classes):
    """Fraction of each image's pixels in each class: labels [N,H,W] (class indices) → [N, n_classes]."""
    labels = torch.as_tensor(labels).long().flatten(1)
    counts = torch.zeros(labels.shape[0], n_classes, dtype=torch.float64)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float64))
    return counts / labels.shape[1]


def pairwise_difference(labels):
    """Mean fraction of pixels whose class differs between two images, over the disjoint pairs (0, 1),
    (2, 3), … of labels [N,H,W] (N >= 2; an odd last image is left out)."""
    labels = torch.as_tensor(labels)
    if labels.shape[0] < 2:
        raise ValueError(f"pairwise_difference needs at least 2 label maps, got {labels.shape[0]}")
    pairs = labels.shape[0] // 2 * 2
    return (labels[0:pairs:2] != labels[1:pairs:2]).double().mean().item()


# ---------------------------------------------------------------------------------------- locality


def locality(delta, mask):
    """(mean |Δ| outside the region, mean |Δ| inside) for a change map delta [H,W] and a region mask
    [H,W]; None when the region is empty or covers everything (no ratio is defined)."""
    mask = mask.bool()
    if not mask.any() or mask.all():
        return None
    return delta[~mask].mean().item(), delta[mask].mean().item()


# --------------------------------------------------------------------------------- image quality


def psnr(a, b):
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    mse = (torch.as_tensor(a).double() - torch.as_tensor(b).double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def ssim(a, b):
    """Structural similarity (scikit-image, Gaussian-free 7×7 windows, colour channels averaged) of two
    images [3,H,W] in [-1, 1]."""
    from skimage.metrics import structural_similarity

    x = torch.as_tensor(a).detach().double().cpu().permute(1, 2, 0).numpy()
    y = torch.as_tensor(b).detach().double().cpu().permute(1, 2, 0).numpy()
    win = min(7, x.shape[0], x.shape[1])
    win -= 1 - win % 2  # an odd window that fits
    return float(structural_similarity(x, y, data_range=2.0, channel_axis=-1, win_size=win))

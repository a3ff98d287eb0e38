"""Evaluation (issue 14): metrics.py against known answers, the face parser, calc_metrics.py end to end.

Known answers: Fréchet distance and KID of identical sets and of Gaussians / point masses with known
parameters, IoU of hand-made maps, reprojection through a hand-set sphere SDF. The scripts run as
subprocesses with one thread on a random tiny model (16 px output) and a synthetic LMDB.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from test_inference import assert_one_line_error, make_sphere, tiny_options  # noqa: E402

from common.checkpoint import save_checkpoint  # noqa: E402
from common.regions import REGION_NAMES  # noqa: E402
from editing import manipulation  # noqa: E402
from evaluation import (
    face_parser,  # noqa: E402
    measures,  # noqa: E402
    metrics,  # noqa: E402
)
from helpers import save_random_generator  # noqa: E402
from rendering import loading as gen  # noqa: E402
from rendering.camera import cameras  # noqa: E402
from rendering.latents import mean_latent  # noqa: E402

TINY = ["--size", "16", "--renderer_spatial_output_dim", "8", "--style_dim", "32", "--width", "32",
        "--N_samples", "8", "--channel_multiplier", "1", "--truncation_mean", "200"]
RUN = [*TINY, "--inference_samples", "8"]  # calc_metrics' own flag: 8 samples per ray keeps it fast


def run_script(script, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CNERF_RENDER_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=timeout, env=env)


# ----------------------------------------------------------------------------------- FID and KID


def test_fid_of_identical_sets_is_zero_and_of_shifted_sets_the_squared_shift():
    x = np.random.default_rng(0).normal(size=(500, 6))
    assert metrics.fid(x, x) == pytest.approx(0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0, 0, 0.5, 0])  # same covariance: FD = |shift|²
    assert metrics.fid(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    # Diagonal covariances: FD = |Δμ|² + Σ (√s1 - √s2)².
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 5.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # A full covariance A and c·A: tr(A + cA - 2√c A) = (1 - √c)² tr A.
    m = rng.normal(size=(3, 3))
    a = m @ m.T + np.eye(3)
    assert metrics.frechet_distance(mu1, a, mu1, 4 * a) == pytest.approx(np.trace(a), rel=1e-9)
    # From samples of those Gaussians: close to the analytic value.
    x = rng.multivariate_normal(mu1, np.diag(s1), size=40000)
    y = rng.multivariate_normal(mu2, np.diag(s2), size=40000)
    assert metrics.fid(x, y) == pytest.approx(expected, rel=0.03)


def cubic(u):
    return (u + 1) ** 3


def test_kid_of_point_masses_is_the_exact_mmd():
    p, q = np.array([0.5, -1.0]), np.array([2.0, 1.0])
    x, y = np.tile(p, (30, 1)), np.tile(q, (40, 1))
    expected = cubic(p @ p / 2) + cubic(q @ q / 2) - 2 * cubic(p @ q / 2)
    value, std = metrics.kid(x, y, num_subsets=5)
    assert value == pytest.approx(expected, rel=1e-9)
    assert std == pytest.approx(0, abs=1e-9)


def test_kid_of_one_dimensional_samples_is_the_exact_u_statistic():
    # For D = 1 the kernel (xy + 1)³ is a polynomial, so the unbiased MMD² of whole sets follows from
    # power sums S_k = Σ x^k: Σ_{i≠j} k(x_i, x_j) = Σ_k c_k (S_k² - S_2k) + n(n-1), c = (1, 3, 3, 1).
    rng = np.random.default_rng(4)
    x, y = rng.normal(0.0, 0.5, (300, 1)), rng.normal(0.6, 0.3, (300, 1))

    def power(v, k):
        return float(np.sum(v ** k))

    def within(v):
        n = len(v)
        pairs = sum(c * (power(v, k) ** 2 - power(v, 2 * k)) for k, c in ((3, 1), (2, 3), (1, 3)))
        return (pairs + n * (n - 1)) / (n * (n - 1))

    cross = (power(x, 3) * power(y, 3) + 3 * power(x, 2) * power(y, 2) + 3 * power(x, 1) * power(y, 1)
             + len(x) * len(y)) / (len(x) * len(y))
    value, std = metrics.kid(x, y, num_subsets=1, max_subset_size=300)
    assert value == pytest.approx(within(x) + within(y) - 2 * cross, rel=1e-9)


def test_kid_of_one_dimensional_gaussians_matches_the_analytic_mmd():
    # For independent x, y: E (xy + 1)³ = E x³ E y³ + 3 E x² E y² + 3 E x E y + 1.
    def moments(m, s):
        return m, m * m + s * s, m ** 3 + 3 * m * s * s

    def expect(a, b):
        return a[2] * b[2] + 3 * a[1] * b[1] + 3 * a[0] * b[0] + 1

    pa, pb = moments(0.0, 0.5), moments(0.6, 0.3)
    expected = expect(pa, pa) + expect(pb, pb) - 2 * expect(pa, pb)
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.0, 0.5, (3000, 1)), rng.normal(0.6, 0.3, (3000, 1))
    value, _ = metrics.kid(x, y, num_subsets=30, max_subset_size=1000)
    assert value == pytest.approx(expected, rel=0.15)  # the cubic kernel's sampling spread is ~10 %
    same, _ = metrics.kid(x, x, num_subsets=30, max_subset_size=1000)
    assert abs(same) < 0.02 * expected


def test_kid_is_repeatable_with_a_seed():
    x, y = np.random.default_rng(3).normal(size=(2, 300, 4))
    assert metrics.kid(x, y, 20, 100, seed=7) == metrics.kid(x, y, 20, 100, seed=7)


# ------------------------------------------------------------------------------------------- IoU


def test_diversity_arithmetic_of_hand_made_maps():
    a = torch.tensor([[0, 0], [1, 1]])  # background half, face half
    b = torch.tensor([[0, 1], [1, 1]])  # one more face pixel
    c = torch.tensor([[2, 2], [2, 2]])  # all eye
    areas = metrics.area_fractions(torch.stack([a, b, c]), 3)
    assert areas.tolist() == [[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]
    # pairs (a, b) and (c, a): 1 of 4 and 4 of 4 pixels differ; an odd last map is left out
    assert metrics.pairwise_difference(torch.stack([a, b, c, a, b])) == pytest.approx((0.25 + 1.0) / 2)
    assert metrics.pairwise_difference(torch.stack([a, a])) == 0
    summary = measures.diversity_summary(torch.stack([a, b]))
    assert summary["area_std"][0] == pytest.approx(0.125) and summary["area_std"][1] == pytest.approx(0.125)
    assert summary["area_std"][2] == 0 and summary["pairwise_difference"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.pairwise_difference(a[None])


def test_iou_of_hand_made_maps():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 0, 1, 1],
                           [2, 2, 2, 2],
                           [2, 2, 2, 2]])
    pred = torch.tensor([[0, 0, 0, 1],
                         [0, 0, 1, 1],
                         [2, 2, 2, 2],
                         [2, 2, 2, 4]])
    conf = metrics.confusion_matrix(pred, target, 5)
    ious = metrics.iou_per_class(conf)
    assert ious[0] == pytest.approx(4 / 5)  # 4 hits, union 5
    assert ious[1] == pytest.approx(3 / 4)
    assert ious[2] == pytest.approx(7 / 8)
    assert math.isnan(ious[3])  # in neither map: left out of the mean
    assert ious[4] == 0  # predicted only
    assert metrics.mean_iou(ious) == pytest.approx((4 / 5 + 3 / 4 + 7 / 8 + 0) / 4)
    assert metrics.iou_per_class(metrics.confusion_matrix(target, target, 3)) == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------- reprojection


@pytest.fixture(scope="module")
def sphere():
    """A hand-set sphere SDF generator (radius 0.06 at the origin), its means and one view pair ±0.3 rad."""
    torch.manual_seed(0)
    generator = make_sphere(gen.build_generator(tiny_options(), "cpu", 32))
    opt = tiny_options()
    mean = mean_latent(generator, 100)
    codes, styles = manipulation.latents_from_seeds(generator, [0], mean, 1.0)
    locations = torch.tensor([[-0.3, 0.0], [0.3, 0.0]])
    rgb, seg, rgb_low, xyz, cam = measures.render_batch(generator, codes.expand(2, -1, -1), styles.expand(2, -1),
                                                        locations, opt.camera, mean, 1.0, return_xyz=True)
    return dict(generator=generator, opt=opt, mean=mean, xyz=xyz, cam=cam, rgb_low=rgb_low)


def surface_texture(xyz):
    """A colour pattern fixed on the surface: a function of the world point, so both views agree."""
    return torch.sin(xyz * 40)


def warp(sphere, rgb, cam_b=None, shift=0):
    xyz, (extrinsics, focal) = sphere["xyz"], sphere["cam"]
    a, b = [0, 1], [1, 0]
    cam_b = cam_b if cam_b is not None else (extrinsics[b], focal[b])
    return metrics.reprojection(rgb[a], rgb[b].roll(shift, -1), xyz[a], xyz[b], (extrinsics[a], focal[a]), cam_b)


def test_reprojection_of_a_consistent_sphere_pair_has_near_zero_error(sphere):
    xyz = sphere["xyz"]
    assert (xyz.norm(dim=1).max() - 0.06).abs() < 0.01  # the hand-set surface is there
    good = warp(sphere, surface_texture(xyz))
    for visible, error in zip(good["visible"], good["colour_error"]):
        assert 0.15 < visible < 0.3  # the sphere covers ~26 % of each view; most of it is seen in both
        assert error < 0.02
    # The renderer's own colours are a function of the surface point too.
    assert max(warp(sphere, sphere["rgb_low"])["colour_error"]) < 0.02


def test_reprojection_of_a_shifted_pair_does_not(sphere):
    texture = surface_texture(sphere["xyz"])
    good = max(warp(sphere, texture)["colour_error"])
    shifted = warp(sphere, texture, shift=2)  # view B moved by 2 pixels
    assert min(shifted["colour_error"]) > 8 * good
    # View B claimed at azimuth +0.1 instead of +0.3: the sphere looks the same from there, but its
    # surface pattern is warped from the wrong points.
    extrinsics, focal, _, _ = cameras(32, torch.tensor([[0.1, 0.0], [-0.3, 0.0]]), sphere["opt"].camera, "cpu")
    wrong = warp(sphere, texture, cam_b=(extrinsics, focal))
    assert wrong["colour_error"][0] > 5 * good


def test_consistency_metric_on_the_sphere(sphere):
    results, _ = measures.consistency(sphere["generator"], sphere["opt"], sphere["mean"], 1.0, 1, 0.3,
                                      progress=False)
    assert 0.15 < results["visible"][0] < 0.3
    assert results["colour_error_renderer"][0] < 0.02
    assert results["seg_agreement"][0] > 0.5


# ---------------------------------------------------------------------------------------- parser


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory):
    """Synthetic portraits: an LMDB at 32 and 16 px with label maps, one at 16 px without, and a tiny model."""
    folder = tmp_path_factory.mktemp("metrics_data")
    sys.path.insert(0, str(ROOT / "tools"))
    import synthetic_portraits

    images, masks = synthetic_portraits.make_portraits(str(folder / "portraits"), n=240, size=32, seed=3)
    for args in (["--size", "32,16", "--mask_path", masks, "--out_path", folder / "lmdb"],
                 ["--size", "16", "--out_path", folder / "no_masks"]):
        result = run_script("prepare_data.py", "--n_worker", "1", *args, images)
        assert result.returncode == 0, result.stderr
    model = folder / "tiny.pt"
    save_random_generator(model, TINY)
    return dict(lmdb=folder / "lmdb", no_masks=folder / "no_masks", model=model, folder=folder)


@pytest.fixture(scope="module")
def trained_parser(lmdbs):
    out = lmdbs["folder"] / "parser.pt"
    result = run_script("tools/train_parser.py", "--dataset_path", lmdbs["lmdb"], "--size", 32, "--out", out,
                        "--epochs", 20, "--batch", 8, "--device", "cpu")
    return result, out


def test_parser_learns_synthetic_portraits_to_a_high_held_out_miou(trained_parser):
    result, out = trained_parser
    assert result.returncode == 0, result.stderr
    assert "| **mean** |" in result.stdout
    parser = face_parser.load_parser(out)
    held = parser.held_out
    assert held["images"] == 24  # the last 10 % of 240
    assert held["miou"] > 0.5, result.stdout
    for name in ("background", "face", "hair", "neck+cloth"):
        assert held["iou"][REGION_NAMES.index(name)] > 0.75, result.stdout
    # The saved file rebuilds the same network: its held-out numbers are reproduced from the file.
    from dataset import MultiResolutionDataset

    data = MultiResolutionDataset(str(Path(held["dataset"])), resolution=32)
    images, labels = face_parser.load_images(data, range(216, 240), progress=False)
    ious, miou = face_parser.evaluate(parser, images, labels)
    assert miou == pytest.approx(held["miou"], abs=1e-6)


def test_parser_file_errors_are_one_line(tmp_path, lmdbs):
    wrong = tmp_path / "five.pt"
    net = face_parser.UNet((4, 8), n_classes=5)
    save_checkpoint({"parser": net.state_dict(), "config": {"size": 16, "widths": [4, 8], "n_classes": 5}}, wrong)
    with pytest.raises(face_parser.ParserError, match="5 classes"):
        face_parser.load_parser(wrong)
    scripted = tmp_path / "five_script.pt"
    torch.jit.script(torch.nn.Conv2d(3, 5, 1)).save(str(scripted))
    with pytest.raises(face_parser.ParserError, match="expected logits"):
        face_parser.load_parser(scripted)
    nineteen = tmp_path / "nineteen.pt"
    torch.jit.script(torch.nn.Conv2d(3, 19, 1)).save(str(nineteen))
    parser = face_parser.load_parser(nineteen)
    scores = parser.regions(torch.zeros(2, 3, 16, 16))
    assert scores.shape == (2, 9, 16, 16)
    assert torch.allclose(scores.sum(1), torch.ones(2, 16, 16))  # 19 class probabilities merged into 9 regions
    result = run_script("calc_metrics.py", "--trained_ckpt", lmdbs["model"], "--dataset_path", lmdbs["lmdb"], *RUN,
                        "--metrics", "miou", "--parser", scripted, "--out", tmp_path / "out")
    assert_one_line_error(result, str(scripted), "expected logits")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_calc_metrics_accepts_a_bisenet_parser(lmdbs, tmp_path):
    """--parser takes zllrunning's BiSeNet state dict (here random weights in its layout): the format is read
    from the file; it has no feature layer for FID/KID, which is one line."""
    bisenet = tmp_path / "79999_iter.pth"
    torch.manual_seed(0)
    torch.save(face_parser.BiSeNet().state_dict(), bisenet)
    common = ["--trained_ckpt", lmdbs["model"], "--dataset_path", lmdbs["lmdb"], *RUN, "--n", 2, "--parser", bisenet,
              "--parser_size", 32]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_main(*common, "--metrics", "miou", "--out", tmp_path / "a") is None
        assert_one_line(run_main(*common, "--metrics", "fid", "--out", tmp_path / "b"), "BiSeNet", "FID/KID")
    finally:
        torch.set_num_threads(threads)
    miou = read_report(tmp_path / "a")["results"]["miou"]
    assert "BiSeNet" in miou["parser"] and "32px" in miou["parser"] and 0 <= miou["value"] <= 1


# ------------------------------------------------------------------------------ calc_metrics.py


def read_report(folder):
    with open(folder / "metrics.json") as handle:
        return json.load(handle)


def test_calc_metrics_end_to_end_is_repeatable(lmdbs, trained_parser, tmp_path, monkeypatch):
    _, parser = trained_parser
    common = ["--trained_ckpt", lmdbs["model"], "--dataset_path", lmdbs["lmdb"], *RUN, "--n", 12,
              "--n_pairs", 2, "--n_consistency", 2, "--n_inversions", 2, "--inversion_steps", 4, "--kid_subsets", 10,
              "--n_diversity", 12]
    # A 32 px parser on 16 px images: calc_metrics resizes the images to the parser's size.
    first = run_script("calc_metrics.py", *common, "--parser", parser, "--out", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    report = read_report(tmp_path / "a")["results"]
    assert set(report) == {"fid_parser", "kid_parser", "miou", "locality", "consistency", "inversion", "diversity"}
    diversity = report["diversity"]
    assert diversity["identities"] == 12 and set(diversity["pairwise_difference"]) == {"model", "model_frontal", "data"}
    assert all(0 <= v <= 1 for v in diversity["pairwise_difference"].values())
    assert all(sum(areas.values()) == pytest.approx(1) for areas in diversity["area_mean"].values())
    assert diversity["spread"]["face"]["data"] > 0  # the synthetic portraits' faces differ in size
    assert report["fid_parser"]["value"] > 0 and report["fid_parser"]["data_vs_data"] >= 0
    assert report["fid_parser"]["images"] == 12
    assert report["miou"]["parser_ceiling"] is not None and 0 <= report["miou"]["value"] <= 1
    assert set(report["locality"]) == {"texture", "shape"}
    inversion = report["inversion"]
    assert len(inversion["images"]) == 2 and [r["index"] for r in inversion["images"]] == [238, 239]
    assert math.isfinite(inversion["psnr"]) and -1 <= inversion["ssim"] <= 1 and 0 <= inversion["miou"] <= 1
    for picture in ("samples.png", "locality.png", "consistency.png", "inversions.png", "diversity.png", "metrics.md"):
        assert (tmp_path / "a" / picture).is_file()
    assert "generated samples" in first.stderr  # progress bars
    # The same numbers again in this process, with the subprocess's thread settings (float32 results may
    # differ in the last bits with another thread count: the chunks and SIMD tails change).
    monkeypatch.setenv("CNERF_RENDER_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_main(*common, "--parser", parser, "--out", tmp_path / "b", "--metrics", "fid,kid,locality") is None
    finally:
        torch.set_num_threads(threads)
    again = read_report(tmp_path / "b")["results"]
    for key in ("fid_parser", "kid_parser", "locality"):
        assert again[key] == report[key]


def run_main(*args):
    """calc_metrics.main in this process: (exit message or None)."""
    import calc_metrics

    try:
        calc_metrics.main([str(a) for a in args])
    except SystemExit as stop:
        return str(stop.code)
    return None


def assert_one_line(message, *needles):
    assert message is not None and message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_calc_metrics_bad_inputs_are_one_line(lmdbs, tmp_path):
    common = ["--trained_ckpt", lmdbs["model"], *RUN, "--out", tmp_path / "out"]
    missing = tmp_path / "inception.pt"
    assert_one_line(run_main(*common, "--dataset_path", lmdbs["lmdb"], "--metrics", "fid", "--inception", missing),
                    str(missing), "not found")
    assert_one_line(run_main(*common, "--dataset_path", lmdbs["no_masks"], "--metrics", "miou"), "--parser", "no masks")
    assert_one_line(run_main(*common, "--dataset_path", lmdbs["no_masks"], "--metrics", "inversion"),
                    "inversion", "no masks")
    assert_one_line(run_main(*common, "--dataset_path", lmdbs["lmdb"], "--metrics", "fid,sharpness"), "sharpness", "valid")
    not_inception = tmp_path / "not_inception.pt"
    save_checkpoint({"weight": torch.zeros(3)}, not_inception)
    assert_one_line(run_main(*common, "--dataset_path", lmdbs["lmdb"], "--metrics", "kid", "--inception", not_inception),
                    str(not_inception), "inception_v3")
    assert not (tmp_path / "out").exists()


class Detector(torch.nn.Module):
    """Stands in for the StyleGAN2-ADA Inception TorchScript: called on uint8 images with return_features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or not return_features:
            raise RuntimeError("expects uint8 images and return_features=True")
        return x.float().mean((2, 3))


def test_inception_files_load_from_local_files_only(tmp_path):
    scripted = tmp_path / "detector.pt"
    torch.jit.script(Detector()).save(str(scripted))
    features = measures.InceptionFeatures(scripted, "cpu")
    images = torch.full((2, 3, 8, 8), -1.0)
    images[1] = 1.0
    assert np.allclose(features(images), [[0, 0, 0], [255, 255, 255]])
    import torchvision

    state = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    path = tmp_path / "inception_v3.pt"
    save_checkpoint(state, path)
    del state
    features = measures.InceptionFeatures(path, "cpu")
    assert features(torch.zeros(1, 3, 16, 16)).shape == (1, 2048)  # the pool features, classifier dropped
    path.unlink()


def test_placement_problems_of_drawn_and_of_upside_down_portraits():
    """The shipped model's placement check (measures.placement_problems) passes the synthetic portraits'
    exact label maps and names what is wrong in the same maps upside down or without a face."""
    sys.path.insert(0, str(ROOT / "tools"))
    import synthetic_portraits

    from common.regions import label19_to_regions

    maps = [label19_to_regions(synthetic_portraits.draw_portrait(np.random.default_rng([11, i]), 64)[1])
            for i in range(8)]
    labels = torch.as_tensor(np.stack(maps))
    assert measures.placement_problems(labels) == []
    upside_down = measures.placement_problems(labels.flip(1))
    for i in range(8):
        assert f"portrait {i}: eyes below mouth" in upside_down and f"portrait {i}: neck above face" in upside_down
    faceless = labels.clone()
    faceless[faceless == REGION_NAMES.index("face")] = REGION_NAMES.index("background")
    assert "portrait 0: face not the largest part" in measures.placement_problems(faceless[:1])


def test_portrait_check_counts_regions_and_measures_the_swap(sphere):
    """On a tiny model: region counts and areas are those of the returned label maps, and the swap's
    |Δ| is zero when the texture comes from the same identity (seeds 4, 4), non-zero from another."""
    generator, opt, mean = sphere["generator"], sphere["opt"], sphere["mean"]
    same = measures.portrait_check(generator, opt, mean, 0.7, [4, 4], swap_region="face")
    assert same["swap"]["inside"] == 0.0 and same["swap"]["outside"] == 0.0 and same["n"] == 2
    assert torch.equal(same["rgb"], same["swapped"])
    other = measures.portrait_check(generator, opt, mean, 0.7, [4, 5], swap_region="face")
    labels = other["labels"]
    for k, name in enumerate(REGION_NAMES):
        assert other["shown"][name] == int(sum(bool((labels[i] == k).any()) for i in range(2)))
        assert other["area"][name] == pytest.approx(float((labels == k).float().mean()), abs=1e-6)
        fractions = (labels == k).float().mean((1, 2))
        assert other["spread"][name] == pytest.approx(abs(float(fractions[0] - fractions[1])) / 2, abs=1e-6)
    assert other["pairwise_difference"] == pytest.approx(float((labels[0] != labels[1]).float().mean()), abs=1e-6)
    assert same["pairwise_difference"] == 0.0 and set(same["spread"].values()) == {0.0}
    delta = (other["swapped"] - other["rgb"]).abs().mean(1)
    face = labels == REGION_NAMES.index("face")
    if face.any():
        assert other["swap"]["inside"] == pytest.approx(float(delta[face].mean()), rel=1e-5)
    assert other["swap"]["outside"] == pytest.approx(float(delta[~face].mean()), rel=1e-5)
    assert float(delta.max()) > 0
    # The renderer's part: the same measures on its own low-res image and seg.
    low, pictures = other["renderer"], other["low"]
    assert pictures["rgb"].shape[-1] == generator.renderer.out_im_res < other["rgb"].shape[-1]
    for k, name in enumerate(REGION_NAMES):
        assert low["shown"][name] == int(sum(bool((pictures["labels"][i] == k).any()) for i in range(2)))
    delta_low = (pictures["swapped"] - pictures["rgb"]).abs().mean(1)
    face_low = pictures["labels"] == REGION_NAMES.index("face")
    assert low["swap"]["outside"] == pytest.approx(float(delta_low[~face_low].mean()), rel=1e-5)
    assert same["renderer"]["swap"]["outside"] == 0.0 and set(low["mask_leak"]) == set(REGION_NAMES)


def test_mask_leak_is_the_mean_magnitude_off_the_region():
    """measures.mask_leak: per region, mean |seg_k| over pixels labelled otherwise; 0 for a one-hot seg."""
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    labels[0, 0, 0] = 1
    seg = F.one_hot(labels, len(REGION_NAMES)).permute(0, 3, 1, 2).float()
    assert all(v == 0 for v in measures.mask_leak(seg, labels).values())
    seg[0, 1, 1, :] = torch.tensor([0.2, -0.4])  # region 1 leaks into two of its three off pixels
    leak = measures.mask_leak(seg, labels)
    assert leak[REGION_NAMES[1]] == pytest.approx(0.6 / 3) and leak[REGION_NAMES[0]] == 0
    seg_all = torch.zeros(1, len(REGION_NAMES), 2, 2)
    assert measures.mask_leak(seg_all, torch.zeros(1, 2, 2, dtype=torch.long))[REGION_NAMES[0]] == 0.0

"""Semantic editing and inversion (issue 5) on a random-weight tiny generator."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import imaging  # noqa: E402
from common.checkpoint import save_checkpoint  # noqa: E402
from common.regions import NUM_REGIONS  # noqa: E402
from editing import manipulation  # noqa: E402
from evaluation import metrics  # noqa: E402
from helpers import TINY_FULL, save_random_generator  # noqa: E402
from rendering import loading as gen  # noqa: E402
from rendering.camera import cameras  # noqa: E402
from rendering.inference import render_codes, render_views  # noqa: E402
from rendering.latents import LatentFileError, load_latents, mean_latent, save_latents  # noqa: E402

# Decoder 8 → 16: the smallest configuration the full pipeline supports, so the file stays fast.
TINY = TINY_FULL
# The scripts render with 64 samples per ray by default (the published inference); 8 keeps this fast.
SAMPLES = 8
RUN = [*TINY, "--inference_samples", str(SAMPLES)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path, option tree, loaded eval generator (SAMPLES per ray), truncation means) of a
    random tiny model."""
    folder = tmp_path_factory.mktemp("tiny_model")
    path = folder / "tiny.pt"
    opt = save_random_generator(path, TINY)
    loaded, _ = gen.load_models(opt, "cpu", n_samples=SAMPLES)
    return path, opt, loaded, mean_latent(loaded, opt.inference.truncation_mean)


def run_script(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def argv(*args):
    return [str(a) for a in args]


def split_grid(path, rows, cols, size):
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (rows * size, cols * size, 3)
    return [[grid[r * size:(r + 1) * size, c * size:(c + 1) * size] for c in range(cols)] for r in range(rows)]


# ------------------------------------------------------------------------------------ code logic


def test_swap_takes_exactly_the_chosen_slots():
    torch.manual_seed(1)
    source, reference = torch.randn(3, 18, 8), torch.randn(3, 18, 8)
    for regions in ([7], [3, 7], [0, 2, 8]):
        for attribute, parity in (("shape", (0,)), ("texture", (1,)), ("both", (0, 1))):
            edited = manipulation.swap_region_codes(source, reference, regions, attribute)
            chosen = {2 * k + p for k in regions for p in parity}
            for slot in range(18):
                expected = reference if slot in chosen else source
                assert torch.equal(edited[:, slot], expected[:, slot]), (regions, attribute, slot)
    # One reference for a batch of sources is broadcast; the inputs are not modified.
    before = source.clone()
    edited = manipulation.swap_region_codes(source, reference[:1], [1], "texture")
    assert torch.equal(edited[:, 3], reference[:1, 3].expand(3, -1)) and torch.equal(source, before)
    with pytest.raises(ValueError, match="attribute"):
        manipulation.swap_region_codes(source, reference, [1], "colour")
    with pytest.raises(ValueError, match="differ"):
        manipulation.swap_region_codes(source, torch.randn(3, 16, 8), [1])


def test_interpolation_ends_at_source_and_swap_and_moves_only_chosen_slots():
    torch.manual_seed(2)
    source, reference = torch.randn(1, 18, 8), torch.randn(1, 18, 8)
    steps = manipulation.interpolate_codes(source, reference, [7], "shape", 4)
    assert steps.shape == (4, 1, 18, 8)
    assert torch.equal(steps[0], source)
    assert torch.equal(steps[-1], manipulation.swap_region_codes(source, reference, [7], "shape"))
    others = [s for s in range(18) if s != 14]
    assert torch.equal(steps[:, :, others], source[:, others].expand(4, -1, -1, -1))
    assert torch.allclose(steps[1, 0, 14], source[0, 14] + (reference[0, 14] - source[0, 14]) / 3, atol=1e-6)


def test_resample_changes_only_chosen_slots(tiny):
    _, _, generator, mean = tiny
    source, _ = manipulation.latents_from_seeds(generator, [3], mean, 0.7)
    fresh = manipulation.resample_codes(generator, source, [3], "texture", 3, mean, 0.7, seed=5)
    assert fresh.shape == (3, 18, generator.style_dim)
    others = [s for s in range(18) if s != 7]
    assert torch.equal(fresh[:, others], source[:, others].expand(3, -1, -1))
    assert not torch.allclose(fresh[0, 7], source[0, 7]) and not torch.allclose(fresh[0, 7], fresh[1, 7])


def test_edit_without_chosen_codes_renders_the_source_exactly(tiny):
    _, opt, generator, mean = tiny
    codes, styles = manipulation.latents_from_seeds(generator, [3, 8], mean, 0.7)
    locations = manipulation.edit_locations(opt, 2)
    untouched = manipulation.swap_region_codes(codes[:1], codes[1:], [], "both")
    rgb, seg = manipulation.render_identities(generator, torch.cat([codes[:1], untouched]), styles[:1].repeat(2, 1),
                                              locations, opt, mean)
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(seg[0], seg[1])
    # ...while a real swap changes the picture (the check above is not vacuous).
    swapped = manipulation.swap_region_codes(codes[:1], codes[1:], list(range(NUM_REGIONS)), "both")
    rgb2, _ = manipulation.render_identities(generator, swapped, styles[:1], locations, opt, mean)
    assert (rgb2[0] - rgb[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------- edit_semantics


def test_edit_semantics_writes_grid_and_latents_that_round_trip(tiny, tmp_path):
    import edit_semantics

    path, opt, generator, mean = tiny
    out = tmp_path / "edit"
    edit_semantics.main(argv("--trained_ckpt", path, *RUN, "--source", "3", "--reference", "8", "--regions",
                             "hair,mouth", "--attribute", "texture", "--n_views", "2", "--interpolate", "3",
                             "--resample", "2", "--out_dir", out))
    codes, styles = manipulation.latents_from_seeds(generator, [3, 8], mean, 0.7)
    expected = manipulation.swap_region_codes(codes[:1], codes[1:], [3, 7], "texture")
    data = load_latents(out / "edit_latents.pt", style_dim=32, n_regions=NUM_REGIONS)
    assert torch.equal(data["codes"], expected) and torch.equal(data["styles_global"], styles[:1])
    inter = load_latents(out / "interpolation_latents.pt", 32, NUM_REGIONS)
    assert inter["codes"].shape == (3, 18, 32)
    assert torch.equal(inter["codes"][0], codes[0]) and torch.equal(inter["codes"][-1], expected[0])
    assert load_latents(out / "resample_latents.pt", 32, NUM_REGIONS)["codes"].shape == (2, 18, 32)

    # Grid: source, seg, reference, seg, edited, seg, |Δ| over 2 views; rows are what the codes render.
    grid = split_grid(out / "edit_grid.png", 7, 2, 16)
    rgb, _ = manipulation.render_identities(generator, torch.cat([codes, expected]), torch.cat([styles, styles[:1]]),
                                            manipulation.edit_locations(opt, 2), opt, mean)
    pixels = imaging.to_uint8(rgb)
    for row, identity in ((0, 0), (2, 1), (4, 2)):
        for view in range(2):
            assert np.array_equal(grid[row][view], pixels[identity, view])
    assert not np.array_equal(grid[4][0], grid[0][0])  # the edit changed the picture
    for view in range(2):  # the |Δ| row: grey mean |edited - source| per pixel, saturating at 0.5
        delta = (rgb[2, view] - rgb[0, view]).abs().mean(0).clamp(0, 0.5) / 0.5 * 255
        assert np.array_equal(grid[6][view][..., 0], delta.round().to(torch.uint8).numpy())
        assert np.array_equal(grid[6][view][..., 0], grid[6][view][..., 2])
    split_grid(out / "interpolation.png", 6, 2, 16)
    split_grid(out / "resample.png", 4, 2, 16)

    # The edited file as a source, with the same texture codes swapped in again: every code is the
    # source's, so the edited rows reproduce the source rows exactly, and both the file's rendering.
    again = tmp_path / "again"
    edit_semantics.main(argv("--trained_ckpt", path, *RUN, "--source", out / "edit_latents.pt", "--reference", "8",
                             "--regions", "7,3", "--attribute", "texture", "--n_views", "2", "--out_dir", again))
    grid2 = split_grid(again / "edit_grid.png", 7, 2, 16)
    for view in range(2):
        assert np.array_equal(grid2[4][view], grid2[0][view]) and np.array_equal(grid2[5][view], grid2[1][view])
        assert not grid2[6][view].any()  # nothing changed: a black |Δ| map
        assert np.array_equal(grid2[0][view], grid[4][view])
    assert torch.equal(load_latents(again / "edit_latents.pt")["codes"], expected)


def test_inference_full_accepts_edited_latents(tiny, tmp_path):
    if not (ROOT / "inference_Full.py").exists():
        pytest.skip("inference_Full.py not present yet")
    import inference_Full

    path, opt, generator, mean = tiny
    codes, styles = manipulation.latents_from_seeds(generator, [4], mean, 0.7)
    edited = manipulation.swap_region_codes(codes, manipulation.latents_from_seeds(generator, [9], mean, 0.7)[0], [7])
    save_latents(tmp_path / "edit.pt", edited, styles)
    inference_Full.main(argv("--trained_ckpt", path, *RUN, "--latents", tmp_path / "edit.pt", "--results_dir",
                             tmp_path / "inf", "--no_surface_renderings"))
    row = np.asarray(Image.open(tmp_path / "inf" / "0_img.png").convert("RGB"))
    assert row.shape == (16, 160, 3)  # the published 10-view sweep
    first = manipulation.edit_locations(opt, 0)[:1]
    rgb, _ = render_views(generator, edited, styles, first, opt, mean)
    assert np.array_equal(row[:, :16], imaging.to_uint8(rgb[0]))


# -------------------------------------------------------------------------------------- inversion


def test_inversion_of_a_generated_image_lowers_the_loss_by_a_large_factor(tiny):
    _, opt, generator, mean = tiny
    codes, styles = manipulation.latents_from_seeds(generator, [6], mean, 0.7)
    location = torch.tensor([[0.15, -0.05]])
    with torch.no_grad():
        cam = cameras(8, location, opt.camera, "cpu")
        (target, target_seg), _, _ = render_codes(generator, codes, styles, cam, mean, 0.7)
    weights = {k: v.clone() for k, v in generator.state_dict().items()}
    result = manipulation.invert(generator, target, mean, 0.7, opt.camera, steps=20, lr=0.1, progress=False)
    assert result["losses"][-1] < result["losses"][0] / 8, result["losses"][::5]
    assert not torch.equal(result["camera"], torch.zeros(1, 2))  # the camera was optimised too
    with torch.no_grad():  # where the inversion started: the mean latent, frontal camera
        start = render_codes(generator, mean[0].view(1, 1, -1).repeat(1, 18, 1), mean[0],
                             cameras(8, torch.zeros(1, 2), opt.camera, "cpu"), mean, 0.7)[0][0]
    assert metrics.psnr(result["rgb"], target) > metrics.psnr(start, target) + 6
    # Only the variables moved: the generator's weights are untouched.
    assert all(torch.equal(v, weights[k]) for k, v in generator.state_dict().items())


def test_invert_script_writes_image_and_latents(tiny, tmp_path):
    import invert

    path, opt, generator, mean = tiny
    codes, styles = manipulation.latents_from_seeds(generator, [2], mean, 0.7)
    rgb, seg = render_views(generator, codes, styles, torch.zeros(1, 2), opt, mean)
    Image.fromarray(imaging.to_uint8(rgb[0])).save(tmp_path / "face.png")
    label = np.full((16, 16), 1, dtype=np.uint8)
    label[:4] = 13  # hair on top, skin elsewhere (CelebAMask-HQ ids)
    np.save(tmp_path / "face_mask.npy", label)
    invert.main(argv("--trained_ckpt", path, *RUN, "--image", tmp_path / "face.png", "--mask",
                     tmp_path / "face_mask.npy", "--steps", "1", "--n_views", "1", "--out_dir", tmp_path / "inv"))
    grid = split_grid(tmp_path / "inv" / "face_inversion.png", 2, 3, 16)
    assert np.array_equal(grid[0][0], imaging.to_uint8(rgb[0]))  # the target, as read back
    assert (grid[1][0][:4] == [107, 137, 198]).all() and (grid[1][0][4:] == [239, 234, 90]).all()
    data = load_latents(tmp_path / "inv" / "face_latents.pt", 32, NUM_REGIONS)
    assert data["codes"].shape == (1, 18, 32) and data["camera"].shape == (1, 2)
    # The file renders the reconstruction shown in the grid (column 1) from its camera.
    rec, _ = render_views(generator, data["codes"], data["styles_global"], data["camera"], opt, mean)
    assert np.abs(imaging.to_uint8(rec[0]).astype(int) - grid[0][1].astype(int)).max() <= 1


# ------------------------------------------------------------------------------------- bad inputs


def test_unknown_region_exits_with_one_line(tiny):
    result = run_script("edit_semantics.py", "--trained_ckpt", tiny[0], *RUN, "--regions", "hair,tail")
    assert_one_line_error(result, "'tail'", "valid regions", "7=hair")


def test_unreadable_image_exits_with_one_line(tiny, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    result = run_script("invert.py", "--trained_ckpt", tiny[0], *RUN, "--image", bad, "--out_dir", tmp_path / "o")
    assert_one_line_error(result, str(bad), "not a readable image")
    assert not (tmp_path / "o").exists()


def test_latent_file_of_another_configuration_is_refused(tiny, tmp_path):
    other = tmp_path / "other.pt"
    save_latents(other, torch.zeros(1, 18, 64), torch.zeros(1, 64))
    result = run_script("edit_semantics.py", "--trained_ckpt", tiny[0], *RUN, "--source", other, "--regions",
                        "hair", "--out_dir", tmp_path / "o")
    assert_one_line_error(result, str(other), "style_dim 64", "expects 32")
    assert not (tmp_path / "o").exists()
    with pytest.raises(LatentFileError, match="18 codes"):
        save_latents(tmp_path / "k.pt", torch.zeros(1, 18, 32), torch.zeros(1, 32))
        load_latents(tmp_path / "k.pt", style_dim=32, n_regions=8)


def test_latent_files_with_non_finite_or_malformed_values_are_refused(tiny, tmp_path):
    """load_latents, which every command reading latents uses, refuses NaN / Inf and malformed entries
    with one line naming the file; inference_Full.py stops on it before rendering."""
    good = (torch.zeros(2, 18, 32), torch.zeros(2, 32))
    cases = {
        "nan_codes": (dict(codes=good[0].clone().index_fill_(2, torch.tensor([3]), float("nan"))),
                      "codes holds non-finite values"),
        "inf_styles": (dict(styles_global=torch.full((2, 32), float("inf"))), "styles_global holds non-finite"),
        "inf_camera": (dict(camera=torch.tensor([[0.0, 0.0], [float("-inf"), 0.0]])), "camera holds non-finite"),
        "bad_camera": (dict(camera=torch.zeros(2, 3)), "malformed camera (2, 3)"),
        "int_codes": (dict(codes=torch.zeros(2, 18, 32, dtype=torch.int64)), "must be floating point"),
        "empty": (dict(codes=torch.zeros(0, 18, 32), styles_global=torch.zeros(0, 32)), "holds no latents"),
    }
    for name, (changes, needle) in cases.items():
        payload = {"codes": good[0], "styles_global": good[1], "style_dim": 32, "n_regions": 9, "truncated": True}
        payload.update(changes)
        path = tmp_path / f"{name}.pt"
        save_checkpoint(payload, path)
        with pytest.raises(LatentFileError) as caught:
            load_latents(path, style_dim=32, n_regions=NUM_REGIONS)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and needle in message and "\n" not in message, (name, message)
    save_checkpoint({"codes": good[0], "styles_global": good[1], "camera": torch.zeros(2, 2)}, tmp_path / "ok.pt")
    assert load_latents(tmp_path / "ok.pt", style_dim=32, n_regions=NUM_REGIONS)["codes"].shape == (2, 18, 32)
    result = run_script("inference_Full.py", "--trained_ckpt", tiny[0], *RUN, "--latents", tmp_path / "nan_codes.pt",
                        "--results_dir", tmp_path / "out")
    assert_one_line_error(result, "nan_codes.pt: codes holds non-finite values")
    assert not (tmp_path / "out").exists()


def test_invert_refuses_lpips_and_bad_masks(tiny, tmp_path):
    import invert

    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    with pytest.raises(SystemExit, match="lpips_weights is not supported"):
        invert.main(argv("--trained_ckpt", tiny[0], *RUN, "--image", tmp_path / "img.png", "--lpips_weights", "x.pt"))
    np.save(tmp_path / "m.npy", np.full((16, 16), 25))
    with pytest.raises(SystemExit, match=r"m\.npy: class ids must be 0\.\.18, found 25\.\.25"):
        invert.main(argv("--trained_ckpt", tiny[0], *RUN, "--image", tmp_path / "img.png", "--mask", tmp_path / "m.npy"))


def test_perceptual_loss_uses_only_a_local_vgg16_state_dict(tmp_path):
    import invert

    torch.manual_seed(3)
    features = {f"features.{k}": v for k, v in manipulation.vgg16_features().state_dict().items()}
    # The layout is torchvision's VGG16 (configuration "D"): the same keys and shapes up to relu4_3.
    from torchvision.models.vgg import cfgs, make_layers

    vgg = make_layers(cfgs["D"])[:23].state_dict()
    assert {k: v.shape for k, v in vgg.items()} == {k[len("features."):]: v.shape for k, v in features.items()}
    save_checkpoint(features, tmp_path / "vgg.pt")
    loss = invert.load_perceptual(str(tmp_path / "vgg.pt"), "cpu")
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(a, a).item() == 0 and loss(a, b).item() > 0
    a.requires_grad_(True)
    loss(a, b).backward()
    assert a.grad.abs().sum() > 0  # differentiable in the image, as the inversion needs
    del features["features.0.weight"]
    save_checkpoint(features, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: not a torchvision VGG16 state dict .*features\.0\.weight"):
        invert.load_perceptual(str(tmp_path / "bad.pt"), "cpu")

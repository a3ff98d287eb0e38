"""Training stages (SPEC §11-13, issue 3) on a tiny configuration and a handful of synthetic portraits.

Stage 1 renders 8×8 and stage 2 decodes to 16×16: the discriminators' channel counts are fixed by the
published architecture, so the rendering resolution is what keeps these runs at about a second per
iteration on two CPU cores.
"""
import importlib.util
import os
import random
import shutil
import socket
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

import distributed as dist_utils  # noqa: E402
import train_CNeRF  # noqa: E402
import train_Full  # noqa: E402
from common import devices  # noqa: E402
from common.checkpoint import CheckpointError, load_checkpoint, load_generator  # noqa: E402
from common.cli import UsageError  # noqa: E402
from common.regions import REGION_NAMES  # noqa: E402
from helpers import load_script  # noqa: E402
from model import Generator, volume_d_last_width  # noqa: E402
from options import default_options, model_options  # noqa: E402
from training import data_order, loop, params, randomness  # noqa: E402
from training import steps as training_steps  # noqa: E402

MODEL = ["--renderer_spatial_output_dim", "8", "--style_dim", "32", "--width", "32", "--N_samples", "8",
         "--channel_multiplier", "1", "--n_render", "9"]
TRAIN = ["--batch", "2", "--chunk", "1", "--val_n_sample", "1", "--truncation_mean", "64", "--device", "cpu",
         "--seed", "3", "--sphere_init_iter", "2", "--sample_every", "100", "--save_every", "100"]
STAGE1_KEYS = {"g", "gd", "sd", "g_ema", "g_optim", "gd_optim", "sd_optim", "iter"}
STAGE2_KEYS = {"g", "d", "g_ema", "g_optim", "d_optim", "iter", "mean_path_length"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six synthetic portraits packed at 8 (stage 1) and 16 (stage 2) pixels."""
    root = tmp_path_factory.mktemp("portraits")
    portraits = load_script("tools/synthetic_portraits.py")
    portraits.make_portraits(str(root / "raw"), 6, 64, 0)
    result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--out_path", str(root / "lmdb"),
                             "--size", "8,16", "--n_worker", "1", "--mask_path", str(root / "raw" / "masks"),
                             str(root / "raw" / "images")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return root / "lmdb"


def args(data, ckdir, expname, *extra):
    return ["--dataset_path", str(data), "--checkpoints_dir", str(ckdir), "--expname", expname,
            *MODEL, *TRAIN, *map(str, extra)]


def tensors_equal(a, b):
    """Deep equality of checkpoint entries (state dicts, optimiser states, lists, numbers)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def differing(a, b, prefix=""):
    return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    """Two stage-1 iterations (with a 2-step sphere initialisation); the checkpoints directory."""
    ckdir = tmp_path_factory.mktemp("ck1")
    train_CNeRF.train(args(data, ckdir, "exp", "--iter", 2))
    return ckdir


@pytest.fixture(scope="module")
def stage2(data, stage1):
    """Two stage-2 iterations on top of `stage1`, both regularisers active at every step."""
    train_Full.train(args(data, stage1, "exp", "--size", 16, "--iter", 2, "--d_reg_every", 1, "--g_reg_every", 1))
    return stage1


# ------------------------------------------------------------------------------------- stage 1


def test_stage1_writes_published_files_and_trains(stage1):
    exp = stage1 / "exp"
    stage = exp / "volume_renderer"
    assert sorted(p.name for p in stage.glob("*.pt")) == ["models_0000000.pt", "models_0000001.pt",
                                                          "sdf_init_models_0000000.pt"]
    ckpt = load_checkpoint(stage / "models_0000001.pt")  # weights_only=True: tensors and plain containers
    assert STAGE1_KEYS <= set(ckpt)
    assert ckpt["iter"] == 1 and len(ckpt["rng"]) == 1
    first = load_checkpoint(stage / "models_0000000.pt")
    init = load_checkpoint(stage / "sdf_init_models_0000000.pt")["g"]
    # Every trained part moved between iteration 0 and 1, and from the sphere initialisation.
    for key in ("g", "gd", "sd", "g_ema"):
        assert differing(first[key], ckpt[key]), key
    assert differing(init, ckpt["g"], "renderer.network.")
    # The initial SDF network takes no gradient in the training pass (sdf0 is computed without one).
    assert not differing(init, ckpt["g"], "renderer.init_network.")
    # The EMA lags behind the generator.
    assert differing(ckpt["g"], ckpt["g_ema"], "renderer.network.")
    for name, value in ckpt["g"].items():
        assert torch.isfinite(value).all(), name
    final = load_checkpoint(exp / "exp_vol_renderer.pt")
    assert tensors_equal(final["g_ema"], ckpt["g_ema"])
    assert final["config"]["model"]["renderer_spatial_output_dim"] == 8 and final["config"]["rendering"]["width"] == 32
    # One loss record per iteration, for tools/plot_losses.py.
    import json
    records = [json.loads(line) for line in (stage / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert {"d", "sd", "g", "eikonal"} <= set(records[0]) and all(np.isfinite(v) for v in records[1].values())


def test_mode_seeking_loss_is_the_mask_gap_per_latent_gap_of_each_pair():
    from losses import mode_seeking_loss
    torch.manual_seed(0)
    seg = torch.rand(4, 9, 8, 8) * 4
    z = torch.randn(4, 32)
    p = seg.softmax(1)
    gaps = [float((p[a] - p[a + 1]).abs().mean() / (z[a] - z[a + 1]).abs().mean()) for a in (0, 2)]
    assert float(mode_seeking_loss(seg, [z])) == pytest.approx(-sum(gaps) / 2, rel=1e-6)
    # A pair drawn twice from one latent with one mask adds nothing; style mixing's two latents both count.
    same = torch.cat([seg[:2], seg[:1], seg[:1]])
    assert float(mode_seeking_loss(same, [z])) == pytest.approx(-gaps[0] / 2, rel=1e-6)
    assert float(mode_seeking_loss(seg, [z, z])) == pytest.approx(float(mode_seeking_loss(seg, [z])), rel=1e-6)
    # The same value added to every region's mask does not count, and descending the loss moves each pair's
    # region maps apart.
    assert float(mode_seeking_loss(seg + 5, [z])) == pytest.approx(float(mode_seeking_loss(seg, [z])), rel=1e-5)
    seg.requires_grad_(True)
    mode_seeking_loss(seg, [z]).backward()
    moved = (seg.detach() - 0.1 * seg.grad).softmax(1)
    assert (moved[0::2] - moved[1::2]).abs().sum() > (p[0::2] - p[1::2]).abs().sum()


def generator_phase_cameras(monkeypatch):
    """A list that collects the camera poses of every generator-phase render (the ones with an eikonal term)."""
    seen = []
    forward = Generator.forward

    def recording(self, styles, cam_poses, *rest, **options):
        if torch.is_grad_enabled() and options.get("return_eikonal"):
            seen.append(cam_poses.detach().clone())
        return forward(self, styles, cam_poses, *rest, **options)

    monkeypatch.setattr(Generator, "forward", recording)
    return seen


def test_area_distribution_loss_compares_the_chunks_sorted_areas_with_the_data_quantiles():
    from losses import AREA_TEMPERATURE, area_distribution_loss

    def masks(areas, size=10):
        """0/1 masks, as real ones are, whose regions k = 0, 1, ... take the next areas[b][k]·size² pixels of sample b."""
        seg = torch.zeros(len(areas), len(areas[0]), size * size)
        for b, row in enumerate(areas):
            start = 0
            for k, area in enumerate(row):
                count = round(area * size * size)
                seg[b, k, start:start + count] = 1.0
                start += count
        return seg.view(len(areas), -1, size, size)

    quantiles = torch.tensor([[0.5, 0.1, 0.1], [0.7, 0.2, 0.4]])  # per region, rising
    spread = torch.tensor([0.1, 0.05, 0.1])
    # The data's own spread, in either order in the chunk: nothing to move. One region's two areas 0.1 off:
    # 0.1 over its spread, averaged over the three regions.
    assert float(area_distribution_loss(masks([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4]]), quantiles, spread)) < 2e-3
    off = masks([[0.7, 0.1, 0.2], [0.5, 0.2, 0.3]])
    assert float(area_distribution_loss(off, quantiles, spread)) == pytest.approx(1 / 3, abs=2e-3)
    # One head for both latents: per region 0.1, 0.05 and 0.15 from the quantiles, over the spread.
    same = masks([[0.6, 0.15, 0.25]] * 2)
    assert float(area_distribution_loss(same, quantiles, spread)) == pytest.approx((1 + 1 + 1.5) / 3, abs=2e-3)
    # Haze does not count: region 2 at a tenth of its strength over the background adds no area (its raw
    # channel mean would grow by 0.06).
    haze = same.clone()
    haze[:, 2] += 0.1 * same[:, 0]
    assert float(area_distribution_loss(haze, quantiles, spread)) == pytest.approx(
        float(area_distribution_loss(same, quantiles, spread)), abs=2e-3)
    # Descending it parts two heads of two regions: the one with less background is pushed to less still.
    seg = (0.5 * masks([[0.6, 0.4]] * 2) + 0.01 * torch.randn(2, 2, 10, 10)).requires_grad_(True)  # unsaturated
    area_distribution_loss(seg, torch.tensor([[0.5, 0.3], [0.7, 0.5]]), torch.tensor([0.1, 0.1])).backward()
    smaller = int((seg.detach() / AREA_TEMPERATURE).softmax(1)[:, 0].mean((1, 2)).argmin())
    assert float(seg.grad[smaller, 0].sum()) > 0 > float(seg.grad[1 - smaller, 0].sum())


def test_area_term_reads_the_data_and_rides_the_generator_loss(data, tmp_path, monkeypatch):
    """--area_lambda: the target is the label maps' region-area quantiles and spread; the generator phase renders
    its chunk under one camera and logs the weighted term; a chunk of one is refused (it has no spread)."""
    import json

    from common.regions import label19_to_regions
    from dataset import MultiResolutionDataset
    from evaluation.metrics import area_fractions
    dataset = MultiResolutionDataset(str(data), resolution=8, nerf_resolution=8)
    quantiles, spread = training_steps.area_target(dataset, 3, "cpu", progress=False)
    assert quantiles.shape == (3, len(REGION_NAMES)) and spread.shape == (len(REGION_NAMES),)
    areas = area_fractions(np.stack([label19_to_regions(dataset.load(i)[1]) for i in range(len(dataset))]),
                           len(REGION_NAMES))
    face, background = REGION_NAMES.index("face"), REGION_NAMES.index("background")
    middle_two = areas[:, face].sort().values[2:4].mean()  # 6 maps: the median is the mean of the middle two
    assert float(quantiles[1, face]) == pytest.approx(float(middle_two), abs=1e-6)
    assert float(quantiles[0, background]) < float(quantiles[2, background])
    assert float(spread[face]) == pytest.approx(max(float(areas[:, face].std(unbiased=False)), 0.005), rel=1e-5)
    assert float(spread.min()) == pytest.approx(training_steps.AREA_SPREAD_FLOOR)  # a region these maps never vary
    seen = generator_phase_cameras(monkeypatch)
    folder = tmp_path / "area"
    train_CNeRF.train(args(data, folder, "exp", "--iter", 1, "--batch", 3, "--chunk", 3, "--area_lambda", 2))
    (cam,) = seen
    assert torch.equal(cam[0], cam[1]) and torch.equal(cam[0], cam[2])
    record = json.loads((folder / "exp" / "volume_renderer" / "losses.jsonl").read_text().splitlines()[0])
    assert record["g_area"] > 0 and np.isfinite(record["g_area"])
    with pytest.raises(SystemExit) as exit_info:
        train_CNeRF.main(args(data, tmp_path / "one", "exp", "--iter", 1, "--area_lambda", 1))
    assert "--area_lambda" in str(exit_info.value.code) and "not 1" in str(exit_info.value.code)
    assert not (tmp_path / "one").exists()
    with pytest.raises(SystemExit) as exit_info:
        train_CNeRF.main(args(data, tmp_path / "packed", "exp", "--iter", 1, "--chunk", 2, "--area_lambda", 1,
                              "--d_pack", 2))
    assert "--area_lambda" in str(exit_info.value.code) and "--d_pack 2" in str(exit_info.value.code)


def test_diversity_term_renders_each_pair_under_one_camera(data, tmp_path, monkeypatch):
    """--diversity_lambda: the generator phase's pairs share a camera and its loss carries the term; at 0 (the
    published default) every sample has its own camera."""
    import json
    seen = generator_phase_cameras(monkeypatch)
    for weight in (0, 5):
        seen.clear()
        folder = tmp_path / str(weight)
        train_CNeRF.train(args(data, folder, "exp", "--iter", 1, "--chunk", 2, "--diversity_lambda", weight))
        (cam,) = seen
        assert torch.equal(cam[0], cam[1]) == (weight > 0)
        record = json.loads((folder / "exp" / "volume_renderer" / "losses.jsonl").read_text().splitlines()[0])
        assert ("g_diversity" in record) == (weight > 0)
    assert record["g_diversity"] < 0
    with pytest.raises(SystemExit) as exit_info:
        train_CNeRF.main(args(data, tmp_path / "odd", "exp", "--iter", 1, "--diversity_lambda", 1))
    assert "--chunk must be even, not 1" in str(exit_info.value.code)


def test_stage1_sphere_init_runs_with_the_gan_optimiser(stage1):
    """The published sphere initialisation steps the generator's GAN optimiser, whose state carries on:
    after 2 sphere-init steps and 2 iterations, Adam has counted 2 steps for the initial SDF network
    (no gradient in GAN training), 4 for the mapping and 2 for the region generators."""
    ckpt = load_checkpoint(stage1 / "exp" / "volume_renderer" / "models_0000001.pt")
    opt = default_options(MODEL)
    model_opt, renderer_opt = model_options(opt)
    names = [name for name, _ in Generator(model_opt, renderer_opt, full_pipeline=False).named_parameters()]
    state = ckpt["g_optim"]["state"]
    step = lambda name: int(state[names.index(name)]["step"])
    assert step("renderer.init_network.sdf_linear.weight") == 2
    assert step("style.0.weight") == 4 and step("renderer.network.0.sdf_linear.weight") == 2
    assert ckpt["g_optim"]["param_groups"][0]["lr"] == 2e-5


def test_stage1_sample_grid(stage1):
    samples = sorted((stage1 / "exp" / "volume_renderer" / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["0000000.png", "0000001.png"]
    grid = np.asarray(Image.open(samples[-1]))
    # One identity row: 8 views, each a 64-px image beside its 64-px coloured segmentation, 2-px gaps.
    assert grid.shape == (64, 8 * 128 + 7 * 2, 3)
    seg = grid[:, 64:128]
    assert len(np.unique(seg.reshape(-1, 3), axis=0)) >= 1
    assert not np.array_equal(grid[:, :64], seg)


# ------------------------------------------------------------------------------------- stage 2


def test_stage2_starts_from_stage1_and_keeps_the_renderer(stage2):
    exp = stage2 / "exp"
    renderer = load_checkpoint(exp / "exp_vol_renderer.pt")["g_ema"]
    ckpt = load_checkpoint(exp / "full_pipeline" / "models_0000001.pt")
    first = load_checkpoint(exp / "full_pipeline" / "models_0000000.pt")
    assert STAGE2_KEYS <= set(ckpt)
    for entry in ("g", "g_ema"):
        for key, value in renderer.items():  # style.* and renderer.*: bit-identical to stage 1's EMA
            assert torch.equal(ckpt[entry][key], value), (entry, key)
    assert differing(first["g"], ckpt["g"], "decoder.") and differing(first["g"], ckpt["g"], "feature_transfer.")
    assert differing(first["d"], ckpt["d"])
    assert differing(ckpt["g"], ckpt["g_ema"], "decoder.")
    assert ckpt["mean_path_length"] > 0 and np.isfinite(ckpt["mean_path_length"])
    # The final file loads strictly into a full generator at this configuration.
    opt = default_options(MODEL + ["--size", "16"])
    model_opt, renderer_opt = model_options(opt)
    g = Generator(model_opt, renderer_opt, ema=True, full_pipeline=True)
    load_generator(g, exp / "exp_full_pipeline.pt")
    assert torch.equal(g.state_dict()["decoder.conv1.conv.weight"], ckpt["g_ema"]["decoder.conv1.conv.weight"])
    grid = np.asarray(Image.open(exp / "full_pipeline" / "samples" / "0000001.png"))
    assert grid.shape == (64, 8 * 2 * 128 + 15 * 2, 3)


def test_track_checkpoints_measures_each_checkpoint_once(stage2, tmp_path, monkeypatch):
    """tools/track_checkpoints.py: the shipped-model check on every stage-2 checkpoint (output and renderer),
    written as JSON, a plot and a picture per checkpoint; a rerun measures only what is new; a stage-1
    folder gets the renderer's part alone."""
    track = load_script("tools/track_checkpoints.py")
    folder = stage2 / "exp" / "full_pipeline"
    records = track.track(str(folder), str(tmp_path), n=2, every=1, mean_samples=64, progress=False)
    assert [r["iter"] for r in records] == [0, 1]
    for r in records:
        low = r["renderer"]
        assert r["n"] == 2 and set(r["shown"]) == set(low["shown"]) == set(low["mask_leak"]) == set(REGION_NAMES)
        assert sum(r["area"].values()) == pytest.approx(1) and sum(low["shown"].values()) >= 2
        assert r["swap"]["region"] == low["swap"]["region"] == "hair" and r["swap"]["inside"] >= 0
        assert all(leak >= 0 for leak in low["mask_leak"].values())
        assert (tmp_path / f"portraits_{r['iter']:07d}.png").is_file()
    picture = np.asarray(Image.open(tmp_path / "portraits_0000001.png"))
    assert picture.shape == (64, 6 * 64 + 5 * 2, 3)  # two portraits in a row: image, seg, |Δ| at 64 px each
    assert (tmp_path / "track.png").is_file()
    monkeypatch.setattr(track, "measure", lambda *a: pytest.fail("measured a checkpoint twice"))
    (tmp_path / "track.png").unlink()
    assert track.track(str(folder), str(tmp_path), n=2, every=1, progress=False) == records
    assert (tmp_path / "track.png").is_file()  # replotted from the log, e.g. after records were removed by hand
    with pytest.raises(CheckpointError, match="holds no training checkpoint"):
        track.track(str(tmp_path), str(tmp_path / "x"), progress=False)
    # seeds from 100 (the test renders 0-7), recorded; a log of other portraits is not extended
    assert all(r["first_seed"] == 100 and r["psi"] == 0.7 for r in records)
    with pytest.raises(UsageError, match="measured on other portraits"):
        track.track(str(folder), str(tmp_path), n=2, every=1, progress=False, first_seed=0)
    monkeypatch.undo()

    stage1 = track.track(str(stage2 / "exp" / "volume_renderer"), str(tmp_path / "stage1"), n=2, every=1,
                         mean_samples=64, progress=False)
    assert [r["iter"] for r in stage1] == [0, 1]  # models_*.pt only, not sdf_init_models_*.pt
    for r in stage1:
        assert "shown" not in r and "swap" not in r and set(r["renderer"]["shown"]) == set(REGION_NAMES)
    picture = np.asarray(Image.open(tmp_path / "stage1" / "portraits_0000001.png"))
    assert picture.shape == (64, 6 * 64 + 5 * 2, 3) and (tmp_path / "stage1" / "track.png").is_file()


def test_stage2_without_stage1_renderer_exits_with_message(data, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train_Full.main(args(data, tmp_path, "missing", "--size", 16, "--iter", 1))
    message = str(exit_info.value.code)
    assert message.startswith("error: no stage-1 renderer at ")
    assert str(tmp_path / "missing" / "missing_vol_renderer.pt") in message and "--pretrain_render_path" in message
    assert "\n" not in message
    assert not (tmp_path / "missing" / "full_pipeline").exists()
    with pytest.raises(SystemExit) as exit_info:
        train_Full.main(args(data, tmp_path, "missing", "--size", 16, "--iter", 1,
                             "--pretrain_render_path", tmp_path / "nope.pt"))
    assert "nope.pt: file not found" in str(exit_info.value.code)


# ------------------------------------------------------------------------------- resume, safety


def test_stage1_resume_is_exact(data, tmp_path):
    """4 iterations in one go == 2, then resume and 2 more (fixed seed, CPU, num_workers 0)."""
    train_CNeRF.train(args(data, tmp_path / "a", "exp", "--iter", 4))
    train_CNeRF.train(args(data, tmp_path / "b", "exp", "--iter", 2))
    train_CNeRF.train(args(data, tmp_path / "b", "exp", "--iter", 4, "--continue_training", "--ckpt", 1))
    a = load_checkpoint(tmp_path / "a" / "exp" / "volume_renderer" / "models_0000003.pt")
    b = load_checkpoint(tmp_path / "b" / "exp" / "volume_renderer" / "models_0000003.pt")
    for key in ("g", "gd", "sd", "g_ema", "g_optim", "gd_optim", "sd_optim", "iter", "rng"):
        assert tensors_equal(a[key], b[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_cuda_with_deterministic_is_exact(data, tmp_path):
    """On a GPU, --deterministic: 3 stage-1 iterations in one go == 2, then resume and 1 more (the RNG state
    restored from the CPU, cuDNN/cuBLAS deterministic); stage 2 the same."""
    cuda = ["--device", "cuda", "--deterministic"]
    train_CNeRF.train(args(data, tmp_path / "a", "exp", "--iter", 3, *cuda))
    train_CNeRF.train(args(data, tmp_path / "b", "exp", "--iter", 2, *cuda))
    train_CNeRF.train(args(data, tmp_path / "b", "exp", "--iter", 3, "--continue_training", "--ckpt", 1, *cuda))
    a = load_checkpoint(tmp_path / "a" / "exp" / "volume_renderer" / "models_0000002.pt")
    b = load_checkpoint(tmp_path / "b" / "exp" / "volume_renderer" / "models_0000002.pt")
    for key in ("g", "gd", "sd", "g_ema", "g_optim", "gd_optim", "sd_optim", "iter", "rng"):
        assert tensors_equal(a[key], b[key]), key
    stage2 = ("--size", 16, "--d_reg_every", 1, "--g_reg_every", 1, *cuda,
              "--pretrain_render_path", tmp_path / "a" / "exp" / "exp_vol_renderer.pt")
    train_Full.train(args(data, tmp_path / "c", "exp", "--iter", 2, *stage2))
    train_Full.train(args(data, tmp_path / "d", "exp", "--iter", 1, *stage2))
    train_Full.train(args(data, tmp_path / "d", "exp", "--iter", 2, "--continue_training", "--ckpt", 0, *stage2))
    c = load_checkpoint(tmp_path / "c" / "exp" / "full_pipeline" / "models_0000001.pt")
    d = load_checkpoint(tmp_path / "d" / "exp" / "full_pipeline" / "models_0000001.pt")
    for key in ("g", "d", "g_ema", "g_optim", "d_optim", "mean_path_length", "rng"):
        assert tensors_equal(c[key], d[key]), key


def test_resume_from_a_checkpoint_stripped_of_its_optimisers(data, tmp_path):
    """tools/strip_optimizers.py keeps all a run needs but the Adam moments: with --fresh_optimizers the
    run continues from it exactly as from the full checkpoint with its optimiser states ignored; without
    the flag it stops with one line; the moments restart (Adam's step count is the new iterations')."""
    strip = load_script("tools/strip_optimizers.py")
    train_CNeRF.train(args(data, tmp_path / "a", "exp", "--iter", 2))
    full = tmp_path / "a" / "exp" / "volume_renderer" / "models_0000001.pt"
    for name in ("b", "c", "d"):
        shutil.copytree(tmp_path / "a", tmp_path / name)
    slim = tmp_path / "slim.pt"
    strip.strip(full, slim)
    snapshot = load_checkpoint(slim)
    assert not any(key.endswith("_optim") for key in snapshot) and snapshot["iter"] == 1
    assert slim.stat().st_size < full.stat().st_size / 2
    with pytest.raises(CheckpointError, match=r"slim.pt: not a stage-1 training checkpoint \(no 'g_optim' entry\)"):
        train_CNeRF.train(args(data, tmp_path / "b", "exp", "--iter", 4, "--continue_training", "--ckpt", slim))
    train_CNeRF.train(args(data, tmp_path / "b", "exp", "--iter", 4, "--continue_training", "--ckpt", slim,
                           "--fresh_optimizers"))
    train_CNeRF.train(args(data, tmp_path / "c", "exp", "--iter", 4, "--continue_training", "--ckpt", full,
                           "--fresh_optimizers"))
    train_CNeRF.train(args(data, tmp_path / "d", "exp", "--iter", 4, "--continue_training", "--ckpt", full))
    b, c, d = (load_checkpoint(tmp_path / name / "exp" / "volume_renderer" / "models_0000003.pt") for name in "bcd")
    for key in ("g", "gd", "sd", "g_ema", "g_optim", "rng"):
        assert tensors_equal(b[key], c[key]), key
    assert differing(b["g"], d["g"])  # the moments matter: a run with its saved optimiser states differs
    steps = {float(state["step"]) for state in b["g_optim"]["state"].values()}
    assert steps == {2.0}, steps  # two iterations since the fresh start (none before)
    # a snapshot at a stage's last iteration: no iterations, the final file is written from it
    train_CNeRF.train(args(data, tmp_path / "f", "exp", "--iter", 2, "--continue_training", "--ckpt", slim,
                           "--fresh_optimizers"))
    final = load_checkpoint(tmp_path / "f" / "exp" / "exp_vol_renderer.pt")
    assert tensors_equal(final["g_ema"], snapshot["g_ema"]) and final["iter"] == 1
    half = tmp_path / "half.pt"
    strip.strip(full, half, half=True)
    assert load_checkpoint(half)["g"][next(iter(snapshot["g"]))].dtype == torch.float16
    train_CNeRF.train(args(data, tmp_path / "e", "exp", "--iter", 3, "--continue_training", "--ckpt", half,
                           "--fresh_optimizers"))
    e = load_checkpoint(tmp_path / "e" / "exp" / "volume_renderer" / "models_0000002.pt")
    assert all(value.dtype == torch.float32 for value in e["g"].values() if value.is_floating_point())
    with pytest.raises(CheckpointError, match="slim.pt: not a training checkpoint with optimiser states"):
        strip.strip(slim, tmp_path / "again.pt")


def test_reseed_starts_fresh_random_streams_on_a_resumed_run(data, tmp_path):
    """--reseed: the continuation draws from --seed's streams, not the checkpoint's, so two seeds give two
    runs of the same continuation (run-to-run noise), the same seed gives the same run, and the new seed is
    recorded; without --continue_training it is refused in one line."""
    train_CNeRF.train(args(data, tmp_path / "a", "exp", "--iter", 2))
    start = tmp_path / "a" / "exp" / "volume_renderer" / "models_0000001.pt"
    runs = {"kept": (), "seed5": ("--reseed", "--seed", 5), "again5": ("--reseed", "--seed", 5),
            "seed6": ("--reseed", "--seed", 6)}
    for name, extra in runs.items():
        train_CNeRF.train(args(data, tmp_path / name, "exp", "--iter", 4, "--continue_training", "--ckpt", start,
                               *extra))
    last = {name: load_checkpoint(tmp_path / name / "exp" / "volume_renderer" / "models_0000003.pt") for name in runs}
    assert last["kept"]["seed"] == 3 and last["seed5"]["seed"] == 5 and last["seed6"]["seed"] == 6
    assert tensors_equal(last["seed5"]["g"], last["again5"]["g"])
    assert differing(last["seed5"]["g"], last["seed6"]["g"]) and differing(last["seed5"]["g"], last["kept"]["g"])
    with pytest.raises(UsageError, match="--reseed: only with --continue_training"):
        train_CNeRF.train(args(data, tmp_path / "b", "exp", "--iter", 2, "--reseed"))


def test_resume_takes_the_architecture_from_the_checkpoint(data, tmp_path):
    """--d_channel_scale (and every model flag) is saved with the run: resuming needs none of them, and a
    contradicting one stops with one line naming the flag and the checkpoint."""
    train_CNeRF.train(args(data, tmp_path, "exp", "--iter", 1, "--d_channel_scale", 0.5, "--no_sphere_init"))
    first = load_checkpoint(tmp_path / "exp" / "volume_renderer" / "models_0000000.pt")
    assert first["gd"]["convs_img.0.conv.weight"].shape[0] == 200  # 400 published channels at 8x8, halved
    resume = ["--dataset_path", str(data), "--checkpoints_dir", str(tmp_path), "--expname", "exp", *TRAIN,
              "--iter", 2, "--continue_training", "--ckpt", 0]
    train_CNeRF.train(list(map(str, resume)))  # no model flags at all
    second = load_checkpoint(tmp_path / "exp" / "volume_renderer" / "models_0000001.pt")
    assert second["iter"] == 1 and second["gd"]["convs_img.0.conv.weight"].shape[0] == 200
    with pytest.raises(CheckpointError, match=r"--width 64: .*models_0000000.pt was trained with --width 32"):
        train_CNeRF.train(list(map(str, resume + ["--width", 64])))


def test_stage2_resume_is_exact(data, stage1, tmp_path):
    """Stage 2, path-length mean included: 2 iterations vs 1 + 1 (both regularisers every step, so
    the resumed step uses the restored running mean)."""
    common = ("--size", 16, "--d_reg_every", 1, "--g_reg_every", 1,
              "--pretrain_render_path", stage1 / "exp" / "exp_vol_renderer.pt")
    train_Full.train(args(data, tmp_path / "a", "exp", "--iter", 2, *common))
    train_Full.train(args(data, tmp_path / "b", "exp", "--iter", 1, *common))
    assert load_checkpoint(tmp_path / "b" / "exp" / "full_pipeline" / "models_0000000.pt")["mean_path_length"] > 0
    train_Full.train(args(data, tmp_path / "b", "exp", "--iter", 2, "--continue_training", "--ckpt", 0, *common))
    a = load_checkpoint(tmp_path / "a" / "exp" / "full_pipeline" / "models_0000001.pt")
    b = load_checkpoint(tmp_path / "b" / "exp" / "full_pipeline" / "models_0000001.pt")
    for key in ("g", "d", "g_ema", "g_optim", "d_optim", "iter", "mean_path_length", "rng"):
        assert tensors_equal(a[key], b[key]), key


def test_resume_checkpoint_keeps_the_rng_state_on_the_cpu_whatever_the_device(stage1):
    """Issue 29: a resume checkpoint read onto another device (a GPU in practice; `meta` here) keeps its RNG
    states on the CPU, and restoring them continues exactly the streams of one read onto the CPU. Read the
    old way (everything onto the device) the restore fails."""
    path = stage1 / "exp" / "volume_renderer" / "models_0000001.pt"
    on_meta = loop.load_resume_checkpoint(path, "meta")
    on_cpu = loop.load_resume_checkpoint(path)
    assert next(iter(on_meta["g"].values())).device.type == "meta"  # the states went where asked
    assert next(iter(on_meta["g_optim"]["state"].values()))["exp_avg"].device.type == "meta"
    assert tensors_equal(on_meta["rng"], on_cpu["rng"])  # the RNG states did not
    draws = []
    for ckpt in (on_meta, on_cpu):
        randomness.restore_rng(ckpt, seed=3, start_iter=2)
        draws.append((random.random(), np.random.rand(), torch.rand(3)))
    assert draws[0][:2] == draws[1][:2] and torch.equal(draws[0][2], draws[1][2])
    everything_on_meta = load_checkpoint(path, map_location="meta")
    with pytest.raises((NotImplementedError, RuntimeError, TypeError)):
        randomness.restore_rng(everything_on_meta, seed=3, start_iter=2)


def test_a_non_finite_loss_found_by_a_later_check_names_its_iteration(data, stage1, tmp_path, monkeypatch):
    """--sync_every 3: the losses are checked at the end of iterations 4 and 5 only; a NaN from iteration 2
    on stops training at the check of iteration 4 with a message naming iteration 2, and nothing is
    written after it (no checkpoint, no sample grid)."""
    ckdir = tmp_path / "ck"
    shutil.copytree(stage1 / "exp", ckdir / "exp")
    stage = ckdir / "exp" / "volume_renderer"
    before = {p.name: p.read_bytes() for p in stage.glob("*.pt")}
    r1_image_and_mask = training_steps.r1_image_and_mask
    seen = []

    def nan_r1(*inputs, **options):
        r1, *rest = r1_image_and_mask(*inputs, **options)
        return (r1 * float("nan"), *rest)

    original_check = loop.FiniteGuard.check

    def counting_check(self):
        seen.append([iteration for iteration, _ in self.pending])
        return original_check(self)

    monkeypatch.setattr(training_steps, "r1_image_and_mask", nan_r1)
    monkeypatch.setattr(loop.FiniteGuard, "check", counting_check)
    with pytest.raises(SystemExit) as exit_info:
        train_CNeRF.main(args(data, ckdir, "exp", "--iter", 8, "--continue_training", "--ckpt", 1,
                              "--sync_every", 3))
    message = str(exit_info.value.code)
    assert message.startswith("error: non-finite loss at iteration 2: ") and "d_r1=nan" in message
    assert len(seen) == 1 and sorted(set(seen[0])) == [2, 3, 4]  # one check, over three iterations
    assert {p.name: p.read_bytes() for p in stage.glob("*.pt")} == before
    assert not any((stage / "samples" / f"{i:07d}.png").exists() for i in range(2, 8))


def test_finite_guard_checks_all_watched_losses_at_once():
    guard = loop.FiniteGuard()
    guard.watch({"d": torch.tensor(1.0), "r1": torch.tensor([0.5, 2.0])}, 4)
    guard.watch({"g": torch.tensor(3.0, dtype=torch.float64), "eik": 0.0}, 4)
    guard.check()  # all finite: no error, and the watched values are forgotten
    assert guard.pending == []
    guard.watch({"d": torch.tensor(1.0)}, 5)
    guard.watch({"g": torch.tensor(2.0), "path": torch.tensor([1.0, float("nan")])}, 6)
    guard.watch({"d": torch.tensor(float("inf"))}, 7)
    with pytest.raises(loop.NonFiniteLoss, match=r"^non-finite loss at iteration 6: path=nan; training stopped"):
        guard.check()
    guard.watch({"x": float("-inf")}, 9)  # a plain number is checked too
    with pytest.raises(loop.NonFiniteLoss, match="iteration 9: x=-inf"):
        guard.check()
    t = default_options(["--sync_every", "4", "--sample_every", "10", "--save_every", "100"]).training
    due = [i for i in range(3, 30) if loop.sync_due(i, 3, 29, t)]
    assert due == [6, 10, 14, 18, 20, 22, 26, 29]  # every 4th from the start, the sample grids, the last


@pytest.mark.parametrize("fused", [True, False, None])
def test_ema_update_is_bit_identical_to_the_per_parameter_loop(fused):
    """params.accumulate with two multi-tensor ops (fused, the default on accelerators) or per parameter (the
    CPU's default) gives the very bits of the published per-parameter update ema.mul_(decay).add_(param,
    alpha=1 - decay), in float32 and float64, and leaves the parameters outside the prefixes untouched."""
    opt = default_options(MODEL + ["--size", "16"])
    model_opt, renderer_opt = model_options(opt)
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = Generator(model_opt, renderer_opt, full_pipeline=True).to(dtype)
        ema = Generator(model_opt, renderer_opt, ema=True, full_pipeline=True).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        expected = {k: v.detach().clone() for k, v in ema.named_parameters()}
        decay = params.EMA_DECAY
        trained = dict(model.named_parameters())
        for name, value in expected.items():
            if name.startswith(training_steps.STAGE2_TRAINED):
                value.mul_(decay).add_(trained[name].detach(), alpha=1 - decay)
        params.accumulate(ema, model, decay, prefixes=training_steps.STAGE2_TRAINED, fused=fused)
        got = dict(ema.named_parameters())
        assert any(not torch.equal(got[k], v) for k, v in model.named_parameters())  # it did move
        for name, value in expected.items():
            assert torch.equal(got[name], value), name


def test_backend_settings(monkeypatch):
    """cuDNN autotuning on a CUDA device; with --deterministic deterministic algorithms and no TF32 instead;
    nothing at all on the CPU (its kernels are deterministic)."""
    import torch.utils.deterministic

    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    accelerator = torch.device("cuda", 0)
    try:
        torch.backends.cudnn.benchmark = False
        devices.configure_backends(torch.device("cpu"), deterministic=True)
        assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        devices.configure_backends(accelerator)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        devices.configure_backends(accelerator, deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.utils.deterministic.fill_uninitialized_memory
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        torch.utils.deterministic.fill_uninitialized_memory = saved[6]


def test_loader_workers_default(monkeypatch):
    cpu, accelerator = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data_order.loader_workers(None, cpu) == 0  # exact resume, and no cores taken from the step
    assert data_order.loader_workers(None, accelerator) == 4
    assert data_order.loader_workers(None, accelerator, deterministic=True) == 0
    assert data_order.loader_workers(2, cpu) == 2  # --num_workers as given
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data_order.loader_workers(None, accelerator) == 1  # 16 cores shared by 8 ranks


def test_failed_save_keeps_previous_checkpoint(data, stage1, tmp_path, monkeypatch):
    ckdir = tmp_path / "ck"
    shutil.copytree(stage1 / "exp", ckdir / "exp")
    target = ckdir / "exp" / "volume_renderer" / "models_0000001.pt"
    before = target.read_bytes()

    def broken_save(obj, path, *a, **k):
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")  # the disk fills up half-way through
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    # Resuming from iteration 0 re-saves models_0000001.pt: the write fails mid-way.
    with pytest.raises(SystemExit) as exit_info:
        train_CNeRF.main(args(data, ckdir, "exp", "--iter", 2, "--continue_training", "--ckpt", 0))
    message = str(exit_info.value.code)
    assert message.startswith("error: could not write") and "models_0000001.pt" in message and "intact" in message
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_non_finite_loss_stops_and_keeps_checkpoints(data, stage1, tmp_path, monkeypatch):
    ckdir = tmp_path / "ck"
    shutil.copytree(stage1 / "exp", ckdir / "exp")
    stage = ckdir / "exp" / "volume_renderer"
    before = {p.name: p.read_bytes() for p in stage.glob("*.pt")}
    r1_image_and_mask = training_steps.r1_image_and_mask

    def nan_r1(*inputs, **options):  # the options refuse --r1_img nan, so the loss itself turns NaN
        r1, *rest = r1_image_and_mask(*inputs, **options)
        return (r1 * float("nan"), *rest)

    monkeypatch.setattr(training_steps, "r1_image_and_mask", nan_r1)
    with pytest.raises(SystemExit) as exit_info:
        train_CNeRF.main(args(data, ckdir, "exp", "--iter", 4, "--continue_training", "--ckpt", 1))
    message = str(exit_info.value.code)
    assert message.startswith("error: non-finite loss at iteration 2: ")
    assert "d_r1=nan" in message and "last checkpoint is kept" in message
    assert {p.name: p.read_bytes() for p in stage.glob("*.pt")} == before
    assert not (stage / "samples" / "0000002.png").exists()


def test_bad_options_exit_with_one_line(data, tmp_path):
    for extra, fragment in ((("--device", "tpu"), "--device 'tpu' is not a torch device"), (("--chunk", 0), "--chunk must be at least 1"),
                            (("--continue_training", "--ckpt", 5), "models_0000005.pt: checkpoint file not found")):
        with pytest.raises(SystemExit) as exit_info:
            train_CNeRF.main(args(data, tmp_path, "exp", "--iter", 1, *extra))
        assert fragment in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        train_CNeRF.main(args(tmp_path / "nowhere", tmp_path, "exp", "--iter", 1))
    assert str(exit_info.value.code).startswith("error: --dataset_path: dataset path")
    assert not (tmp_path / "exp" / "volume_renderer").exists()


def test_no_sphere_init_skips_the_initialisation(data, tmp_path):
    train_CNeRF.train(args(data, tmp_path, "exp", "--iter", 1, "--no_sphere_init"))
    stage = tmp_path / "exp" / "volume_renderer"
    assert sorted(p.name for p in stage.glob("*.pt")) == ["models_0000000.pt"]
    assert load_checkpoint(stage / "models_0000000.pt")["iter"] == 0


def test_wandb_flag(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(SystemExit) as exit_info:
            train_CNeRF.main(args(data, tmp_path, "exp", "--iter", 1, "--wandb"))
        assert "--wandb needs the wandb package" in str(exit_info.value.code)
        assert not (tmp_path / "exp" / "volume_renderer").exists()
    else:
        train_CNeRF.main(args(data, tmp_path, "exp", "--iter", 1, "--wandb", "--no_sphere_init"))
        assert (tmp_path / "exp" / "wandb").is_dir()


# --------------------------------------------------------------------------------- utilities


def test_rng_state_roundtrip_is_weights_only_safe(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = randomness.rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    randomness.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def test_resumable_sampler_continues_the_stream():
    dataset = list(range(5))
    straight = iter(data_order.ResumableSampler(dataset, seed=4))
    stream = [next(straight) for _ in range(17)]
    assert sorted(stream[:5]) == list(range(5)) and stream[:5] != stream[5:10]
    resumed = iter(data_order.ResumableSampler(dataset, seed=4, start=7))
    assert [next(resumed) for _ in range(10)] == stream[7:]
    ranks = [iter(data_order.ResumableSampler(dataset, seed=4, num_replicas=2, rank=r)) for r in (0, 1)]
    first_epoch = [next(ranks[0]) for _ in range(3)] + [next(ranks[1]) for _ in range(3)]
    assert set(first_epoch) == set(range(5))


def test_small_helpers():
    with pytest.raises(loop.NonFiniteLoss, match="iteration 7: g_gan=inf"):
        loop.check_finite({"d": torch.tensor(1.0), "g_gan": torch.tensor(float("inf"))}, 7)
    loop.check_finite({"d": torch.tensor(1.0), "x": 2.0}, 0)
    assert devices.select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no cuda device is available"):
            devices.select_device("cuda")
        assert devices.select_device(None) == torch.device("cpu")
    assert dist_utils.reduce_loss_dict({"a": torch.tensor(2.0), "b": 3}) == {"a": 2.0, "b": 3.0}
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    weight, bias = a.weight.detach().clone(), a.bias.detach().clone()
    params.accumulate(a, b, 0.25, prefixes=("bias",))
    assert torch.equal(a.weight, weight)  # outside the prefixes: untouched
    assert torch.allclose(a.bias, 0.25 * bias + 0.75 * b.bias.detach())
    assert loop.should_save(5, 9, 100, 5) and not loop.should_save(6, 9, 100, 5)
    assert loop.should_save(9, 9, 100, 5) and loop.should_save(200, 999, 100, 5)
    assert not loop.should_save(205, 999, 100, 5)


# ------------------------------------------------------------------------------- distributed


def launcher_failure(result):
    """Why a multi-process run failed: rank 0's lines and every error line (the tail alone is mostly
    the launcher shutting the other rank down), then the tail."""
    lines = result.stderr.splitlines()
    own = [line for line in lines if line.startswith(("[rank0]", "error:")) or "Error" in line]
    return "\n".join(own[-60:]) + "\n--- tail ---\n" + result.stderr[-1500:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_on_cpu_gloo_both_stages(data, tmp_path):
    """torchrun for stage 1 and the published torch.distributed.launch for stage 2, 2 ranks each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    base = args(data, tmp_path, "ddp", "--iter", 2, "--batch", 2, "--chunk", 2)
    stage1 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(ROOT / "train_CNeRF.py"), *base],
                            capture_output=True, text=True, timeout=400, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert stage1.returncode == 0, launcher_failure(stage1)
    stage2 = subprocess.run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(ROOT / "train_Full.py"), *base, "--size", "16",
                             "--d_reg_every", "1", "--g_reg_every", "1"],
                            capture_output=True, text=True, timeout=400, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert stage2.returncode == 0, launcher_failure(stage2)
    exp = tmp_path / "ddp"
    ckpt1 = load_checkpoint(exp / "volume_renderer" / "models_0000001.pt")
    assert STAGE1_KEYS <= set(ckpt1) and len(ckpt1["rng"]) == 2  # one RNG state per rank
    assert not tensors_equal(ckpt1["rng"][0]["torch"], ckpt1["rng"][1]["torch"])
    ckpt2 = load_checkpoint(exp / "full_pipeline" / "models_0000001.pt")
    assert STAGE2_KEYS <= set(ckpt2) and len(ckpt2["rng"]) == 2
    renderer = load_checkpoint(exp / "ddp_vol_renderer.pt")["g_ema"]
    assert all(torch.equal(ckpt2["g"][k], v) for k, v in renderer.items())
    opt = default_options(MODEL + ["--size", "16"])
    model_opt, renderer_opt = model_options(opt)
    load_generator(Generator(model_opt, renderer_opt, ema=True, full_pipeline=True), exp / "ddp_full_pipeline.pt")
    # Only rank 0 writes: one sample grid per sampled iteration, no stray files.
    assert sorted(p.name for p in (exp / "full_pipeline" / "samples").iterdir()) == ["0000000.png", "0000001.png"]


DDP_CHILD = r"""
import os, sys
sys.path.insert(0, os.environ["CNERF_ROOT"])
import torch
from munch import Munch
import distributed as dist_utils
import train_CNeRF
from common.draws import seed_everything
from model import Generator
from options import default_options, model_options
from training import loop

out, argv = sys.argv[1], sys.argv[2:]
opt = default_options(argv)
dist_utils.setup(torch.device("cpu"))
rank = dist_utils.get_rank()
torch.manual_seed(0)  # the same initial weights on every rank
g = Generator(*model_options(opt), full_pipeline=False)
g_optim = torch.optim.Adam(g.parameters(), lr=opt.training.vol_g_lr, betas=(0.0, 0.9))
seed_everything(3, rank)  # as in training: each rank draws its own sphere-initialisation batches
before = {}
broadcast = dist_utils.broadcast_training_state
def spy(module, optimizer):
    before.update(optimizer.state_dict())
    before["optim"] = {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state_dict()["state"].items()}
    return broadcast(module, optimizer)
dist_utils.broadcast_training_state = spy
m = Munch(g=g, g_module=g, g_optim=g_optim, device=torch.device("cpu"),
          resolution=opt.model.renderer_spatial_output_dim, guard=loop.FiniteGuard())
train_CNeRF.sphere_init(m, opt, os.path.join(out, "sdf_init.pt"), False)
# Gradient averaging (stage 2's path-length step): each rank its own gradients, one missing on rank 1.
chosen = list(g.parameters())[:6]
own = [torch.randn(p.shape) for p in chosen]
for p, grad in zip(chosen, own):
    p.grad = grad.clone()
if rank == 1:
    chosen[1].grad = None  # no gradient on this rank: counts as zero
dist_utils.average_gradients(chosen)
expected = []  # the per-parameter all-reduce it replaces
for k, grad in enumerate(own):
    grad = torch.zeros_like(grad) if k == 1 and rank == 1 else grad.clone()
    torch.distributed.all_reduce(grad)
    expected.append(grad.div_(2))
torch.save({"before": before["optim"], "optim": g_optim.state_dict(), "g": g.state_dict(), "own": own,
            "averaged": [p.grad for p in chosen], "expected": expected}, os.path.join(out, f"rank{rank}.pt"))
dist_utils.cleanup()
"""


def test_ddp_ranks_start_gan_training_from_one_optimiser_state(tmp_path):
    """Two gloo ranks: after the sphere initialisation (each rank on its own draws) both hold rank 0's
    generator and Adam state; the flat gradient average equals the per-parameter all-reduce bit for bit."""
    script = tmp_path / "child.py"
    script.write_text(DDP_CHILD)
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CNERF_ROOT": str(ROOT), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONWARNINGS": "ignore"}
    argv = [str(a) for a in MODEL + ["--batch", 2, "--sphere_init_iter", 2]]
    ranks = [subprocess.Popen([sys.executable, str(script), str(tmp_path), *argv], env={**env, "RANK": str(r),
                                                                                        "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        results = [rank.communicate(timeout=200) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(err[-2000:] for _, err in results)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    some = next(iter(r0["before"]))
    assert not torch.equal(r0["before"][some]["exp_avg"], r1["before"][some]["exp_avg"])  # drifted apart
    assert tensors_equal(r0["optim"], r1["optim"]) and tensors_equal(r0["g"], r1["g"])  # rank 0's, everywhere
    assert tensors_equal(r0["optim"]["state"], {k: v for k, v in r0["before"].items()})
    assert not torch.equal(r0["own"][0], r1["own"][0])
    for averaged in (r0["averaged"], r1["averaged"]):
        assert all(torch.equal(a, b) for a, b in zip(averaged, r0["expected"]))
    assert torch.equal(r0["averaged"][1], r0["expected"][1]) and r0["averaged"][1].abs().sum() > 0


def test_packed_discriminators_train_resume_and_refuse_uneven_batches(data, tmp_path):
    """--d_pack 2: a stage-1 iteration trains discriminators whose first convolutions take two samples,
    resuming restores the packing, and a batch, chunk or diversity chunk the packs cannot divide is one line."""
    train_CNeRF.train(args(data, tmp_path, "exp", "--iter", 1, "--d_pack", 2, "--chunk", 2, "--no_sphere_init"))
    first = load_checkpoint(tmp_path / "exp" / "volume_renderer" / "models_0000000.pt")
    assert first["gd"]["convs_img.0.conv.weight"].shape[1] == 6 and first["sd"]["convs_seg.0.conv.weight"].shape[1] == 2
    resume = ["--dataset_path", str(data), "--checkpoints_dir", str(tmp_path), "--expname", "exp", *TRAIN,
              "--chunk", 2, "--iter", 2, "--continue_training", "--ckpt", 0]
    train_CNeRF.train(list(map(str, resume)))  # no --d_pack: it comes with the checkpoint
    assert load_checkpoint(tmp_path / "exp" / "volume_renderer" / "models_0000001.pt")["iter"] == 1
    with pytest.raises(loop.TrainingError, match="--d_pack 2: .* --batch must be a multiple of it, not 3"):
        train_CNeRF.train(list(map(str, resume + ["--batch", 3, "--chunk", 3])))  # the checkpoint's packing counts
    for extra, words in ((("--chunk", 1), "--chunk must be a multiple of it, not 1"),
                         (("--batch", 3, "--chunk", 3), "--batch must be a multiple of it, not 3"),
                         (("--chunk", 2, "--diversity_lambda", 1), "--chunk must be at least 4, not 2")):
        with pytest.raises(SystemExit) as exit_info:
            train_CNeRF.main(args(data, tmp_path / "bad", "exp", "--iter", 1, "--d_pack", 2, *extra))
        assert words in str(exit_info.value.code)


def test_stddev_channels_train_resume_and_refuse_a_width_they_do_not_divide(data, tmp_path):
    """--mbstd_channels F: the global discriminator's last convolution takes F stddev channels, resuming takes F
    from the checkpoint, and an F that does not divide the discriminator's width is one line, nothing written."""
    opt = default_options(args(data, tmp_path, "exp"))
    width = volume_d_last_width(opt.model.d_channel_scale)
    divisor = next(f for f in range(2, width + 1) if width % f == 0)
    train_CNeRF.train(args(data, tmp_path, "exp", "--iter", 1, "--mbstd_channels", divisor, "--no_sphere_init"))
    first = load_checkpoint(tmp_path / "exp" / "volume_renderer" / "models_0000000.pt")
    assert first["gd"]["final_conv.conv.weight"].shape[1] == width + divisor
    resume = ["--dataset_path", str(data), "--checkpoints_dir", str(tmp_path), "--expname", "exp", *TRAIN,
              "--iter", 2, "--continue_training", "--ckpt", 0]
    train_CNeRF.train(list(map(str, resume)))  # no --mbstd_channels: it comes with the checkpoint
    assert load_checkpoint(tmp_path / "exp" / "volume_renderer" / "models_0000001.pt")["iter"] == 1
    with pytest.raises(SystemExit) as exit_info:
        train_CNeRF.main(args(data, tmp_path / "bad", "exp", "--iter", 1, "--mbstd_channels", width + 1))
    assert f"--mbstd_channels {width + 1}: " in str(exit_info.value.code)
    assert f"must divide {width}" in str(exit_info.value.code)
    assert not (tmp_path / "bad").exists()


def test_resume_says_when_the_checkpoint_learning_rate_overrides_the_options(data, tmp_path, capsys):
    """Resuming restores each optimiser's learning rate with its state (published behaviour, kept); a different
    rate on the command line gets one note per optimiser, and --fresh_optimizers uses it."""
    train_CNeRF.train(args(data, tmp_path, "exp", "--iter", 1, "--no_sphere_init"))
    resume = args(data, tmp_path, "exp", "--iter", 2, "--continue_training", "--ckpt", 0, "--vol_g_lr", 1e-3)
    capsys.readouterr()
    train_CNeRF.train(resume)
    err = capsys.readouterr().err
    assert "note: g_optim resumes at the checkpoint's learning rate 2e-05, not the options' 0.001" in err
    assert "gd_optim" not in err  # its rate was not changed
    saved = load_checkpoint(tmp_path / "exp" / "volume_renderer" / "models_0000001.pt")
    assert saved["g_optim"]["param_groups"][0]["lr"] == 2e-5
    train_CNeRF.train(resume + ["--fresh_optimizers"])
    assert "note:" not in capsys.readouterr().err
    saved = load_checkpoint(tmp_path / "exp" / "volume_renderer" / "models_0000001.pt")
    assert saved["g_optim"]["param_groups"][0]["lr"] == 1e-3

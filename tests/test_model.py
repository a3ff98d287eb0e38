"""Core model: conformance with the published model, checkpoint layout and loading, chunking, dtypes."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "reference"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import check_conformance  # noqa: E402

from common.checkpoint import CheckpointError, load_generator, load_state_strict, save_checkpoint  # noqa: E402
from common.regions import NUM_REGIONS, parse_regions  # noqa: E402
from model import Generator  # noqa: E402
from options import check_ranges, default_options  # noqa: E402
from rendering.camera import generate_camera_params  # noqa: E402

TINY = ["--size", "64", "--renderer_spatial_output_dim", "16", "--style_dim", "32", "--width", "32",
        "--N_samples", "6", "--channel_multiplier", "1"]
needs_reference = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/reference is not beside the repo")


def tiny_generator(full=True, ema=True, extra=(), dtype=torch.float64, seed=0):
    opt = default_options(TINY + list(extra))
    torch.manual_seed(seed)
    g = Generator(opt.model, opt.rendering, ema=ema, full_pipeline=full).to(dtype)
    return g, opt


def cameras(opt, batch, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    cam = generate_camera_params(opt.model.renderer_spatial_output_dim, "cpu", batch=batch)
    return [t.to(dtype) for t in cam[:4]]


# ------------------------------------------------------------------------------ conformance


@needs_reference
def test_conformance_vectors_pass_in_float64_and_float32():
    result = subprocess.run([sys.executable, "tools/check_conformance.py", str(SHARED / "conformance_vectors.pt")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [l for l in result.stdout.splitlines() if l.startswith(("float64", "float32"))]
    vectors = torch.load(SHARED / "conformance_vectors.pt", weights_only=True)
    expected = sum(len(v) for v in vectors["outputs"].values())
    assert len(lines) == 2 * expected  # one line per output and dtype
    assert all(line.split()[-1] == "pass" for line in lines)


@needs_reference
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conformance_vectors_pass_on_cuda_in_float64_and_float32():
    result = subprocess.run([sys.executable, "tools/check_conformance.py", str(SHARED / "conformance_vectors.pt"),
                             "--device", "cuda"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [l for l in result.stdout.splitlines() if l.startswith("cuda")]
    vectors = torch.load(SHARED / "conformance_vectors.pt", weights_only=True)
    assert len(lines) == 2 * sum(len(v) for v in vectors["outputs"].values())
    assert all(line.split()[-1] == "pass" for line in lines)


def test_conformance_device_flag_refuses_a_missing_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = subprocess.run([sys.executable, "tools/check_conformance.py", str(tmp_path / "v.pt"), "--device",
                             "cuda"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: --device cuda: no cuda device is available on this machine (use --device cpu)\n"
    result = subprocess.run([sys.executable, "tools/check_training_conformance.py", str(tmp_path / "v.pt"),
                             "--device", "cuda"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: --device cuda: no cuda device")


def test_compare_flags_outputs_beyond_the_bound():
    reference = {"case": {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}}
    actual = {"case": {"a": torch.tensor([1.0, 2.0 + 3e-6], dtype=torch.float64), "b": torch.zeros(2)}}
    rows = {(r[0], r[1]): r for r in check_conformance.compare(reference, actual, torch.float64)}
    assert rows[("case", "a")][4] is False  # 3e-6 > 1e-6 * max(1, 2)
    assert rows[("case", "b")][4] is False and "shape" in rows[("case", "b")][5]
    actual["case"]["a"] = torch.tensor([1.0, 2.0 + 1e-6], dtype=torch.float64)
    rows = {(r[0], r[1]): r for r in check_conformance.compare(reference, actual, torch.float64)}
    assert rows[("case", "a")][4] is True


@needs_reference
def test_layout_matches_published_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "tools/check_conformance.py", "--layout",
                             str(SHARED / "state_dict_layout.json")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("keys: pass") == 5
    # A layout with one key removed and one shape changed must fail and name both.
    layout = json.loads((SHARED / "state_dict_layout.json").read_text())
    layout["generator_full"].pop("decoder.to_rgb1.bias")
    layout["discriminator_full"]["final_linear.1.weight"] = [2, 512]
    bad = tmp_path / "layout.json"
    bad.write_text(json.dumps(layout))
    result = subprocess.run([sys.executable, "tools/check_conformance.py", "--layout", str(bad)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "unexpected decoder.to_rgb1.bias" in result.stdout
    assert "final_linear.1.weight: [1, 512] != [2, 512]" in result.stdout


# ------------------------------------------------------------------------------ checkpoints


def test_published_layout_round_trip_and_strict_errors(tmp_path):
    g, _ = tiny_generator(dtype=torch.float32)
    path = tmp_path / "final_model.pt"
    save_checkpoint({"g_ema": g.state_dict()}, path)
    fresh, _ = tiny_generator(dtype=torch.float32, seed=5)
    load_generator(fresh, path)
    for key, value in g.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key

    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint file not found"):
        load_generator(fresh, tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt: not a readable tensors-only checkpoint"):
        load_generator(fresh, text)
    other, _ = tiny_generator(extra=["--width", "16"], dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"final_model\.pt: does not fit the generator.*shape mismatches.*"
                                              r"renderer\.network\.0\.shape_linears\.0\.weight \(32, 3\) != \(16, 3\)"):
        load_generator(other, path)
    # A renderer-only model takes the subset it needs from a full checkpoint.
    volume, _ = tiny_generator(full=False, dtype=torch.float32, seed=7)
    load_generator(volume, path)
    assert torch.equal(volume.renderer.sigmoid_beta, g.renderer.sigmoid_beta)
    # A full generator must use every weight: a checkpoint of a larger --size (more decoder layers) is refused.
    bigger, _ = tiny_generator(extra=["--size", "128"], dtype=torch.float32)
    save_checkpoint({"g_ema": bigger.state_dict()}, tmp_path / "size128.pt")
    with pytest.raises(CheckpointError, match=r"size128\.pt: does not fit the generator.*keys the model does not have "
                                              r"\(first: decoder\.convs\.4"):
        load_generator(fresh, tmp_path / "size128.pt")
    # A renderer-only checkpoint lacks the decoder: missing keys are named.
    save_checkpoint({"g_ema": volume.state_dict()}, tmp_path / "vol.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(first: feature_transfer"):
        load_generator(fresh, tmp_path / "vol.pt")


def test_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"g_ema": {"x": torch.zeros(1)}, "obj": Path("x")}, path)  # not a tensors-only checkpoint
    g, _ = tiny_generator(dtype=torch.float32)
    with pytest.raises(CheckpointError, match="pickled.pt: not a readable tensors-only checkpoint"):
        load_generator(g, path)


def test_strict_load_with_prefix_selects_subtree():
    g, _ = tiny_generator(dtype=torch.float32)
    other, _ = tiny_generator(dtype=torch.float32, seed=3)
    load_state_strict(other.renderer, g.state_dict(), "ckpt", "renderer", prefix="renderer.")
    assert torch.equal(other.renderer.network[3].rgb_linear.weight, g.renderer.network[3].rgb_linear.weight)
    assert not torch.equal(other.style[0].weight, g.style[0].weight)


# ------------------------------------------------------------------------------ renderer


def test_chunked_rendering_is_identical_to_unchunked():
    g, opt = tiny_generator(full=False, ema=False)
    g.train()
    g.renderer.perturb = 0.0
    cam = cameras(opt, 2)
    codes = torch.randn(2, 18, 32, dtype=torch.float64)
    whole = g.renderer(*cam, codes, return_eikonal=True, return_sdf=True, return_xyz=True, ray_chunk=0)
    chunked = g.renderer(*cam, codes, return_eikonal=True, return_sdf=True, return_xyz=True, ray_chunk=37)
    assert set(whole) == {"rgb", "seg", "sdf", "eikonal", "xyz", "mask"}
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-12, atol=1e-12)
    # Under no_grad the eikonal term is still computed (chunk by chunk) and carries no graph.
    with torch.no_grad():
        nograd = g.renderer(*cam, codes, return_eikonal=True, ray_chunk=50)
    assert not nograd["eikonal"].requires_grad
    torch.testing.assert_close(nograd["eikonal"], whole["eikonal"], rtol=1e-12, atol=1e-12)


def test_eikonal_is_gradient_of_region_sdfs_only():
    g, opt = tiny_generator(full=False, ema=False)
    g.renderer.perturb = 0.0
    cam = cameras(opt, 1)
    codes = torch.randn(1, 18, 32, dtype=torch.float64)
    base = g.renderer(*cam, codes, return_eikonal=True, return_sdf=True)
    # Scaling the initial SDF network's output changes sdf but not the eikonal term.
    with torch.no_grad():
        g.renderer.init_network.sdf_linear.weight.mul_(3.0)
    changed = g.renderer(*cam, codes, return_eikonal=True, return_sdf=True)
    assert not torch.allclose(changed["sdf"], base["sdf"])
    torch.testing.assert_close(changed["eikonal"], base["eikonal"])
    # And the eikonal term matches a finite difference of Σ_k Δsdf_k along x at one sample point.
    renderer = g.renderer
    film, _ = renderer._film(codes)
    p = torch.tensor([[[0.01, -0.02, 0.03]]], dtype=torch.float64)
    scale = 2 / 0.24  # z-normalisation 2 / (far - near)

    def region_sdf(point):
        v = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
        return sum(net(point * scale, v, f)[1] for net, f in zip(renderer.network, film)).sum()

    p.requires_grad_(True)
    grad, = torch.autograd.grad(region_sdf(p), p)
    eps = 1e-6
    dx = torch.tensor([[[eps, 0, 0]]], dtype=torch.float64)
    numeric = (region_sdf(p.detach() + dx) - region_sdf(p.detach() - dx)) / (2 * eps)
    assert abs(grad[0, 0, 0].item() - numeric.item()) < 1e-5 * max(1.0, abs(numeric.item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_generator_runs_in_both_dtypes_and_semantics_only_change_features(dtype):
    g, opt = tiny_generator(dtype=dtype)
    g.eval()
    cam = cameras(opt, 2, dtype)
    z = torch.randn(2, 32, dtype=dtype)
    with torch.no_grad():
        mean = g.mean_latent(64)
        (rgb, seg_high), thumb, xyz, sdf, mask, seg = g([z], *cam, truncation=0.7, truncation_latent=mean,
                                                        randomize_noise=False, return_xyz=True, return_sdf=True)
        (rgb_s, seg_high_s), thumb_s, xyz_s, sdf_s, mask_s, seg_s = g(
            [z], *cam, truncation=0.7, truncation_latent=mean, randomize_noise=False, return_xyz=True,
            return_sdf=True, semantics=parse_regions("eye,mouth"))
    assert rgb.dtype == dtype and rgb.shape == (2, 3, 64, 64) and seg_high.shape == (2, NUM_REGIONS, 64, 64)
    assert thumb.shape == (2, 3, 16, 16) and seg.shape == (2, NUM_REGIONS, 16, 16) and xyz.shape == (2, 3, 16, 16)
    assert sdf.shape == (2, 16, 16, 6, 1) and mask.shape == (2, 1, 16, 16)
    for a, b in [(thumb, thumb_s), (seg, seg_s), (xyz, xyz_s), (sdf, sdf_s)]:
        assert torch.equal(a, b)  # geometry, low-res image and mask come from all regions
    assert not torch.allclose(rgb, rgb_s)  # only the decoder's features change


def test_mix_styles_combinations_and_truncation():
    g, _ = tiny_generator(full=False)
    w1 = torch.zeros(64, 32, dtype=torch.float64)
    w2 = torch.ones(64, 32, dtype=torch.float64)
    torch.manual_seed(0)
    codes = g.mix_styles([w1, w2])
    pairs = codes[..., 0].view(64, 9, 2)  # (shape, texture) per region: 0 = w1, 1 = w2
    combos = {tuple(p.tolist()) for p in pairs.reshape(-1, 2)}
    assert combos == {(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)}  # (w2, w1) never occurs
    one = g.mix_styles([w2[:2]])
    assert one.shape == (2, 18, 32) and torch.equal(one, torch.ones_like(one))
    mean = [torch.full((1, 32), 0.5, dtype=torch.float64), None]
    codes, global_styles = g.styles_to_codes([w2[:2]], truncation=0.5, truncation_latent=mean, input_is_latent=True)
    assert torch.allclose(codes, torch.full_like(codes, 0.75)) and torch.allclose(global_styles[0], codes[:, 0])


def test_eval_generator_never_trains_renderer():
    g, _ = tiny_generator(ema=True)
    assert not any(p.requires_grad for p in g.renderer.parameters())
    trainable, _ = tiny_generator(ema=False)
    assert all(p.requires_grad for p in trainable.renderer.parameters())
    trainable.freeze_renderer()
    assert not any(p.requires_grad for p in trainable.renderer.parameters())
    assert all(p.requires_grad for p in trainable.decoder.parameters())


def test_region_table_parsing():
    assert parse_regions("2,3") == [2, 3]
    assert parse_regions("mouth,eye") == [2, 3]
    assert parse_regions("hair, neck+cloth") == [7, 8]
    assert parse_regions("") == []
    with pytest.raises(ValueError, match=r"unknown region 'beard'; valid regions: 0=background, 1=face"):
        parse_regions("beard")
    with pytest.raises(ValueError, match="unknown region index '9'"):
        parse_regions("9")


def test_no_hard_coded_cuda_in_sources():
    # Placing work on "cuda" by name (rather than comparing a device's type) is what must not happen.
    pattern = re.compile(r"""(device\s*=\s*|torch\.device\(|\.to\()["']cuda|\.cuda\(|\bdefault=["']cuda""")
    offenders = []
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_options_refuse_non_finite_numbers(value, capsys):
    with pytest.raises(SystemExit) as stop:
        default_options([f"--view_lambda={value}"])
    assert stop.value.code == 2
    assert f"argument --view_lambda: must be a finite number, got '{value}'" in capsys.readouterr().err
    assert default_options(["--view_lambda", "1e-3", "--azim", "-0.5"]).camera.azim == -0.5


def test_check_ranges_names_the_first_flag_out_of_range():
    """The one range check of the scripts: each rule kind, its words, the flag and value in one line."""
    from common.cli import UsageError

    ok = {"--a": (1, ">= 1"), "--b": (0.5, "> 0"), "--c": (0, ">= 0"), "--d": (1.0, "(0, 1]"), "--e": (0.0, "[0, 1)")}
    check_ranges(ok)  # nothing raised
    for checks, message in (({"--chunk": (0, ">= 1")}, "--chunk must be at least 1, got 0"),
                            ({"--lr": (0.0, "> 0")}, "--lr must be positive, got 0.0"),
                            ({"--iter": (-1, ">= 0")}, "--iter must be non-negative, got -1"),
                            ({"--psi": (0, "(0, 1]")}, "--psi must be in (0, 1], got 0"),
                            ({"--ema_decay": (1.0, "[0, 1)")}, "--ema_decay must be in [0, 1), got 1.0"),
                            ({"--n": (5, ">= 2"), "--m": (1, ">= 2"), "--k": (0, ">= 2")}, "--m must be at least 2, got 1")):
        with pytest.raises(UsageError) as error:
            check_ranges(checks)
        assert str(error.value) == message

    class StageError(UsageError):
        pass

    with pytest.raises(StageError, match="--batch must be at least 1, got 0"):
        check_ranges({"--batch": (0, ">= 1")}, StageError)
    with pytest.raises(ValueError, match="bad range rule"):
        check_ranges({"--x": (1, "at least one")})


def test_packing_groups_distant_samples_and_unpacking_restores_the_order():
    """--d_pack: sample j is packed with j + B/pack (never with its neighbour), channels sample-major;
    a per-sample head's output comes back in the input order."""
    from model import pack_samples, unpack_samples
    x = torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2, 1, 1)
    packed = pack_samples(x, 2)
    assert packed.shape == (3, 4, 1, 1)
    assert torch.equal(packed[1].flatten(), torch.cat([x[1], x[4]]).flatten())
    per_sample = torch.stack([packed[:, :2].flatten(1), packed[:, 2:].flatten(1)], 1).reshape(3, 4)
    assert torch.equal(unpack_samples(per_sample, 2), x.flatten(1))
    assert pack_samples(x, 1) is x and unpack_samples(per_sample, 1) is per_sample


def test_minibatch_stddev_channels_split_the_features():
    """--mbstd_channels F: one standard deviation per group of C/F features. A group that is the same in every
    sample of a minibatch set reads sqrt(1e-8) for that set alone, and the F values average to the published
    single channel."""
    from model import minibatch_stddev
    torch.manual_seed(0)
    x = torch.randn(8, 6, 2, 2, dtype=torch.float64)
    x[[2, 4, 6], 2:4] = x[0, 2:4]  # set 0 is samples 0, 2, 4, 6 (sample b joins set b mod 8/4)
    out = minibatch_stddev(x, channels=3)
    assert out.shape == (8, 9, 2, 2) and torch.equal(out[:, :6], x)
    stds = out[:, 6:, 0, 0]
    assert torch.equal(stds[0::2, 1], torch.full((4,), 1e-4, dtype=torch.float64))
    assert stds[1::2, 1].min() > 0.1 and stds[:, [0, 2]].min() > 0.1
    assert torch.allclose(out[:, 6:].mean(1), minibatch_stddev(x)[:, 6], atol=1e-12)
    with pytest.raises(RuntimeError):
        minibatch_stddev(x, channels=4)  # 6 features do not split into 4 groups (training refuses it first)


@pytest.mark.parametrize("which", ["global", "semantic", "stage2"])
def test_packed_discriminators_judge_each_pack_and_keep_per_sample_heads(which, monkeypatch):
    """One logit per pack, which moves with its own samples only; viewpoint and region-class heads stay
    one row per sample."""
    import model
    from model import ComponentDualBranchDiscriminator, Discriminator, VolumeRenderDiscriminator
    # the minibatch-stddev channel couples all packs by design: a constant channel here isolates the packing
    monkeypatch.setattr(model, "minibatch_stddev",
                        lambda x, channels=1: torch.cat([x, torch.zeros_like(x[:, :channels])], 1))
    opt = default_options(TINY + ["--d_pack", "2", "--d_channel_scale", "0.125", "--size", "16"])
    build = {"global": VolumeRenderDiscriminator, "semantic": ComponentDualBranchDiscriminator,
             "stage2": Discriminator}[which]
    torch.manual_seed(0)
    d = build(dict(opt.model, n_render=9))
    channels = 1 if which == "semantic" else 9
    img, seg = torch.randn(4, 3, 16, 16), torch.rand(4, channels, 16, 16)
    out = d(img, seg)
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 1)
    if which != "stage2":
        assert out[1].shape == (4, 2 if which == "global" else 9)
    img2 = img.clone()
    img2[2] += 1  # sample 2 is in pack 0 (with sample 0; packing neighbours would put it in pack 1)
    out2 = d(img2, seg)
    logits2 = out2[0] if isinstance(out2, tuple) else out2
    assert torch.equal(logits2[1], logits[1]) and not torch.equal(logits2[0], logits[0])

"""Fast renderer path vs the straightforward reference path (issue 6): outputs and parameter
gradients in float64 on a small configuration, chunk-size invariance, layout and selection."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from common import perf_utils
from losses import eikonal_loss
from model import Generator
from options import default_options, sync_region_count
from rendering import fast_render
from rendering.camera import generate_camera_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "64", "--renderer_spatial_output_dim", "8", "--style_dim", "16", "--width", "16",
        "--N_samples", "6", "--channel_multiplier", "1"]


def _opt(**rendering):
    opt = default_options(TINY)
    opt.rendering.update(rendering)
    sync_region_count(opt)
    return opt


def _make(full_pipeline, train, **rendering):
    torch.manual_seed(0)
    opt = _opt(**rendering)
    g = Generator(opt.model, opt.rendering, ema=not train, full_pipeline=full_pipeline).double()
    # Larger-than-init modulations so that every layer matters for the comparison.
    with torch.no_grad():
        for p in g.renderer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g.train(train)
    return g, opt


def _pair(full_pipeline, train, **rendering):
    g_ref, opt = _make(full_pipeline, train, **rendering)
    g_fast = copy.deepcopy(g_ref)
    g_ref.renderer.render_path = "reference"
    g_fast.renderer.render_path = "fast"
    return g_ref, g_fast, opt


def _camera(batch, res=8, seed=1):
    torch.manual_seed(seed)
    return [t.double() for t in generate_camera_params(res, "cpu", batch=batch)[:4]]


def _close(a, b, what, tol=1e-9):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} (scale {scale:.3e})"


def _stage1_step(g, cam, z):
    torch.manual_seed(5)  # same style-mixing draws in both paths
    g.zero_grad(set_to_none=True)
    _, thumb, sdf, eikonal, seg = g([z, z.flip(0)], *cam, return_sdf=True, return_eikonal=True)
    eik, min_surf = eikonal_loss(eikonal, sdf, beta=100)
    # Weighted sums so that every output pixel carries a different gradient.
    w = torch.linspace(0.5, 1.5, thumb.numel(), dtype=thumb.dtype).view_as(thumb)
    loss = (w * thumb).mean() + 0.1 * eik + 0.01 * min_surf + (seg ** 2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}
    return (thumb.detach(), sdf.detach(), eikonal.detach(), seg.detach(), loss.detach()), grads


def test_stage1_outputs_and_parameter_gradients_match_reference():
    g_ref, g_fast, opt = _pair(False, True, perturb=0.0)
    cam = _camera(2)
    torch.manual_seed(3)
    z = torch.randn(2, opt.model.style_dim, dtype=torch.float64)
    out_ref, grads_ref = _stage1_step(g_ref, cam, z)
    out_fast, grads_fast = _stage1_step(g_fast, cam, z)
    for name, a, b in zip(("thumb", "sdf", "eikonal", "seg", "loss"), out_fast, out_ref):
        _close(a, b, name)
    renderer_keys = [k for k in grads_ref if k.startswith("renderer.network.")]
    assert len(renderer_keys) > 100 and "renderer.sigmoid_beta" in grads_ref and "style.0.weight" in grads_ref
    assert set(grads_fast) == set(grads_ref)
    for name, g in grads_ref.items():
        assert g.abs().max() > 0 or name.startswith("renderer.init_network"), f"{name} has no gradient"
        _close(grads_fast[name], g, f"grad {name}")


def test_kept_and_re_rendered_chunks_give_the_same_numbers_bit_for_bit(monkeypatch):
    """Chunk graphs kept from the forward pass (lean: the reverse pass recomputed in backward), chunks
    re-rendered in backward, and a mix of both give identical outputs and gradients, serially and
    on two worker threads (gradients are added in chunk order either way)."""
    g, _, opt = _pair(False, True, perturb=1.0, raw_noise_std=0.5)
    g.renderer.render_path = "fast"
    g.renderer.fast_points = g.renderer.fast_grad_points = 6 * 10  # 7 chunks of 10 rays per 8×8 image
    one_chunk = 2.2 * 5 * 9 * 16 * 8 * 6 * 10 / 2 ** 20  # the renderer's estimate of a kept chunk (MiB)
    cam = _camera(2)
    z = torch.randn(2, opt.model.style_dim, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    results = []
    try:
        for keep_mib, threads in ((0, "1"), (0, "2"), (3.5 * one_chunk, "2"), (2048, "1"), (2048, "2")):
            g.renderer.fast_keep_mib = keep_mib
            monkeypatch.setenv("CNERF_RENDER_THREADS", threads)
            torch.manual_seed(7)  # same jitter and raw noise every time
            results.append(_stage1_step(g, cam, z))
    finally:
        torch.set_num_threads(before)
    (out0, grads0) = results[0]
    assert len(grads0) > 100
    for outs, grads in results[1:]:
        for a, b in zip(outs, out0):
            assert torch.equal(a, b)
        assert set(grads) == set(grads0)
        for name in grads0:
            assert torch.equal(grads[name], grads0[name]), name


def test_second_backward_through_kept_chunks_re_renders_them():
    """Kept chunk graphs are consumed by the first backward; with retain_graph a second backward
    re-renders those chunks and gives the same gradients again."""
    g, _, opt = _pair(False, True, perturb=0.0)
    g.renderer.render_path = "fast"
    g.renderer.fast_grad_points = 6 * 10
    cam = _camera(1)
    z = torch.randn(1, opt.model.style_dim, dtype=torch.float64)
    _, thumb, sdf, eikonal, seg = g([z], *cam, return_sdf=True, return_eikonal=True)
    loss = thumb.mean() + sum(eikonal_loss(eikonal, sdf, beta=100)) + seg.mean()
    param = g.renderer.network[3].shape_linears[1].weight
    first, = torch.autograd.grad(loss, [param], retain_graph=True)
    second, = torch.autograd.grad(loss, [param])
    assert first.abs().max() > 0 and torch.equal(first, second)


def test_kept_chunk_count_follows_the_memory_budget(monkeypatch):
    g, _, opt = _pair(False, True)
    g.renderer.render_path = "fast"
    g.renderer.fast_grad_points = 6 * 10
    seen = []
    original = fast_render.FastRender.forward

    def spy(ctx, renderer, spec, *tensors):
        seen.append(spec.keep)
        return original(ctx, renderer, spec, *tensors)

    monkeypatch.setattr(fast_render.FastRender, "forward", staticmethod(spy))
    cam = _camera(1)
    z = torch.randn(1, opt.model.style_dim, dtype=torch.float64)
    one_chunk = 2.2 * 5 * 9 * 16 * 8 * 6 * 10 / 2 ** 20
    for keep_mib, expected in ((None, 7), (0, 0), (2.5 * one_chunk, 2)):
        g.renderer.fast_keep_mib = keep_mib
        g([z], *cam, return_sdf=True, return_eikonal=True)
        assert min(seen[-1], 7) == expected
    # The budget is an option (flag or config key keep_graph_mib) read by the renderer; unset, the device's
    # default (2048 MiB on the CPU).
    assert perf_utils.default_keep_mib("cpu") == 2048 and perf_utils.default_keep_mib("meta") == 0
    for flags, expected in (([], None), (["--keep_graph_mib", "0"], 0), (["--keep_graph_mib", "300"], 300)):
        opt = default_options(TINY + flags)
        assert Generator(opt.model, opt.rendering, full_pipeline=False).renderer.fast_keep_mib == expected


def test_chunking_is_pinned(monkeypatch):
    """Issue 29: on an accelerator a chunk split is even (no sliver of a last chunk); on the CPU it stays the
    plain one, whose per-chunk gradient sums the conformance checks and tests pin."""
    assert fast_render.balanced_chunk(4096, 682) == 586  # 6 × 586 + 580, not 6 × 682 + 4
    assert fast_render.balanced_chunk(4096, 64) == 64 and fast_render.balanced_chunk(4096, 42) == 42
    assert fast_render.balanced_chunk(256, 192) == 128 and fast_render.balanced_chunk(64, 10) == 10
    for n_rays, chunk in ((4096, 682), (4096, 2730), (256, 192), (1000, 999), (7, 3), (64, 64)):
        size = fast_render.balanced_chunk(n_rays, chunk)
        sizes = [min(size, n_rays - start) for start in range(0, n_rays, size)]
        assert len(sizes) == -(-n_rays // chunk) and max(sizes) <= chunk  # as many chunks, none larger
        assert min(sizes) >= max(sizes) - len(sizes)  # and none a sliver
    seen = []
    original = fast_render.render_all
    monkeypatch.setattr(fast_render, "render_all", lambda renderer, spec, *a, **k: (
        seen.append((spec.chunk, spec.grad_chunk)), original(renderer, spec, *a, **k))[1])
    g, _, opt = _pair(False, False)
    g.renderer.render_path = "fast"
    g.renderer.fast_points, g.renderer.fast_grad_points = 6 * 10, 6 * 7
    with torch.no_grad():
        g([torch.randn(1, opt.model.style_dim, dtype=torch.float64)], *_camera(1))
    assert seen == [(10, 7)]  # CPU: 64 rays in chunks of 10 (last 4) and 7 (last 1), as before


def test_stage1_randomness_is_reused_when_re_rendering():
    """With jitter and raw noise on, gradients must come from the very samples of the forward pass:
    the fast path's gradient equals a finite difference of its own loss along a direction."""
    g, _, opt = _pair(False, True, perturb=1.0, raw_noise_std=0.5)
    g.renderer.render_path = "fast"
    cam = _camera(1)
    z = torch.randn(1, opt.model.style_dim, dtype=torch.float64)
    param = g.renderer.network[2].texture_linears[0].weight
    direction = torch.randn_like(param)

    def loss_at(offset, seed):
        with torch.no_grad():
            param.add_(offset * direction)
        torch.manual_seed(seed)
        g.zero_grad(set_to_none=True)
        _, thumb, sdf, eikonal, seg = g([z], *cam, return_sdf=True, return_eikonal=True)
        eik, min_surf = eikonal_loss(eikonal, sdf, beta=100)
        loss = thumb.mean() + eik + min_surf + seg.mean()
        loss.backward()
        with torch.no_grad():
            param.sub_(offset * direction)
        return loss.item(), (param.grad * direction).sum().item()

    _, analytic = loss_at(0.0, 11)
    eps = 1e-6
    numeric = (loss_at(eps, 11)[0] - loss_at(-eps, 11)[0]) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    # a different seed really draws different samples (so the check above is not vacuous)
    assert loss_at(0.0, 12)[0] != loss_at(0.0, 11)[0]


def test_stage2_feature_loss_gradients_match_reference():
    """Stage 2 / inversion style: gradients of an image loss through features and the decoder reach
    the latents through the (frozen) renderer identically."""
    g_ref, g_fast, opt = _pair(True, False, static_viewdirs=True, perturb=0.0)
    cam = _camera(2)
    torch.manual_seed(4)
    w = g_ref.map_styles(torch.randn(2, opt.model.style_dim, dtype=torch.float64)).detach()
    codes = w.unsqueeze(1).repeat(1, g_ref.n_latent, 1) + 0.1 * torch.randn(2, g_ref.n_latent, w.shape[-1],
                                                                            dtype=torch.float64)
    results = []
    for g in (g_ref, g_fast):
        g.freeze_renderer()
        for p in g.decoder.parameters():
            p.requires_grad_(True)
        lat = codes.clone().requires_grad_(True)
        g.zero_grad(set_to_none=True)
        (rgb, seg_high), thumb, seg = g([lat], *cam, input_is_latent=True, styles_global=[w],
                                        randomize_noise=False, semantics=[0, 2, 5])
        loss = (rgb ** 2).mean() + seg_high.mean() + thumb.mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}
        results.append((rgb.detach(), seg_high.detach(), thumb.detach(), seg.detach(), lat.grad.clone(), grads))
    ref, fast = results
    for name, a, b in zip(("rgb", "seg_high", "thumb", "seg", "latent grad"), fast[:5], ref[:5]):
        _close(a, b, name)
    assert ref[4].abs().max() > 0
    assert set(fast[5]) == set(ref[5]) and any(k.startswith("decoder.") for k in ref[5])
    assert not any(k.startswith("renderer.") for k in ref[5])
    for name, g in ref[5].items():
        _close(fast[5][name], g, f"grad {name}")


def test_inference_outputs_match_reference_with_xyz_and_no_grad_eikonal():
    g_ref, g_fast, opt = _pair(True, False, static_viewdirs=True, perturb=0.0)
    cam = _camera(2)
    z = torch.randn(2, opt.model.style_dim, dtype=torch.float64)
    outs = []
    for g in (g_ref, g_fast):
        with torch.no_grad():
            codes, _ = g.styles_to_codes([z])
            outs.append(g.renderer(*cam, codes, return_eikonal=True, return_sdf=True, return_xyz=True))
    assert set(outs[0]) == set(outs[1]) == {"rgb", "seg", "features", "sdf", "eikonal", "xyz", "mask"}
    for key in outs[0]:
        _close(outs[1][key], outs[0][key], key)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fast_path_is_chunk_size_invariant(chunk):
    g, _, opt = _pair(False, True, perturb=0.0)
    g.renderer.render_path = "fast"
    cam = _camera(1)
    z = torch.randn(1, opt.model.style_dim, dtype=torch.float64)
    results = []
    for c in (chunk, None):
        g.zero_grad(set_to_none=True)
        codes, _ = g.styles_to_codes([z], mix_styles=False)
        out = g.renderer(*cam, codes, return_eikonal=True, return_sdf=True, ray_chunk=c)
        loss = out["rgb"].mean() + eikonal_loss(out["eikonal"], out["sdf"])[0] + out["seg"].pow(2).mean()
        loss.backward()
        results.append((out, g.renderer.network[4].shape_linears[1].weight.grad.clone()))
    (a, ga), (b, gb) = results
    for key in a:
        _close(a[key].detach(), b[key].detach(), f"chunk {chunk} {key}", tol=1e-10)
    _close(ga, gb, f"chunk {chunk} grad", tol=1e-10)


def test_render_path_option_and_state_dict_layout():
    opt = _opt()
    opt.rendering.render_path = "reference"
    g_ref = Generator(opt.model, opt.rendering, full_pipeline=False)
    assert g_ref.renderer.render_path == "reference"
    opt.rendering.render_path = _opt().rendering.render_path  # the one default, the options'
    g = Generator(opt.model, opt.rendering, full_pipeline=False)
    assert g.renderer.render_path == "fast"
    assert list(g.state_dict()) == list(g_ref.state_dict())
    assert "renderer.network.8.rgb_linear.weight" in g.state_dict() and "renderer.sigmoid_beta" in g.state_dict()
    g.renderer.render_path = "quick"
    cam = generate_camera_params(8, "cpu", batch=1)[:4]
    with pytest.raises(ValueError, match="render_path"):
        g([torch.randn(1, opt.model.style_dim)], *cam)


def test_bench_tool_prints_one_line():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "train64", "--repeat", "1",
                          "--res", "8", "--samples", "4"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train64 median_s=")
    fields = dict(item.split("=") for item in lines[0].split()[1:])
    assert set(fields) == {"median_s", "min_s", "peak_rss_mib", "threads", "precision"}
    assert fields["precision"] == "fp32"  # the default: the published arithmetic
    assert float(fields["min_s"]) <= float(fields["median_s"]) and float(fields["peak_rss_mib"]) > 0


@pytest.mark.parametrize("workload", ["stage1_small", "stage2_small"])
def test_bench_times_the_real_training_iterations(workload):
    """stage1_small / stage2_small run the training scripts' own loops (on a tiny synthetic LMDB) and
    time each iteration between EMA updates; shrunk here with --extra so that the test stays short."""
    tiny = "--renderer_spatial_output_dim 8 --width 16 --style_dim 16 --N_samples 4 --batch 2 --chunk 1"
    if workload == "stage2_small":
        tiny += " --size 16"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), workload, "--repeat", "2",
                          "--d_channel_scale", "0.0625", f"--extra={tiny}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{workload} median_s="), out.stdout
    fields = dict(item.split("=") for item in lines[0].split()[1:])
    assert {"median_s", "min_s", "mean_s", "peak_rss_mib", "threads"} <= set(fields)
    assert float(fields["d_channel_scale"]) == 0.0625
    assert 0 < float(fields["min_s"]) <= float(fields["median_s"]) and float(fields["peak_rss_mib"]) > 0


def test_chunk_threads_give_the_serial_result_bit_for_bit(monkeypatch):
    """perf_utils.map_in_threads: two single-threaded workers render the same numbers as one serial
    loop, in order, and the caller's intra-op thread count is restored."""
    from common import perf_utils

    _, g, opt = _pair(True, False, static_viewdirs=True, perturb=0.0)
    g.renderer.fast_points = 6 * 5  # 5 rays per chunk: 13 chunks per 8×8 image
    cam = _camera(2)
    z = torch.randn(2, opt.model.style_dim, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = []
        for workers in ("2", "1"):
            monkeypatch.setenv("CNERF_RENDER_THREADS", workers)
            with torch.no_grad():
                codes, _ = g.styles_to_codes([z])
                outs.append(g.renderer(*cam, codes, return_sdf=True, return_xyz=True))
            assert torch.get_num_threads() == 2
        for key in outs[0]:
            assert torch.equal(outs[0][key], outs[1][key]), key

        monkeypatch.setenv("CNERF_RENDER_THREADS", "2")
        results = list(perf_utils.map_in_threads(lambda i: (i, torch.get_num_threads()), range(9), "cpu"))
        assert [i for i, _ in results] == list(range(9))
        assert {n for _, n in results} == {1}  # each worker runs its kernels single-threaded
        assert torch.get_num_threads() == 2

        monkeypatch.setenv("CNERF_RENDER_THREADS", "auto")
        with pytest.raises(SystemExit, match="CNERF_RENDER_THREADS='auto' is not a positive integer"):
            perf_utils.map_in_threads(lambda i: i, range(3), "cpu")
    finally:
        torch.set_num_threads(before)


def test_fused_leaky_relu_without_graph_is_in_place_on_a_fresh_tensor_only():
    from op.fused_act import fused_leaky_relu_ref

    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    for b in (bias, None):
        kept = x.clone()
        with torch.no_grad():
            fast = fused_leaky_relu_ref(x, b, 0.2, 2 ** 0.5)
        graph = fused_leaky_relu_ref(x.requires_grad_(True), b, 0.2, 2 ** 0.5)
        x.requires_grad_(False)
        assert torch.equal(x, kept)  # the input is never overwritten
        assert torch.equal(fast, graph.detach())
        expected = torch.nn.functional.leaky_relu(x + (0 if b is None else b.view(1, -1, 1, 1)), 0.2) * 2 ** 0.5
        assert torch.equal(fast, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_on_cuda_matches_the_cpu():
    """The fast renderer on a GPU (even chunks, graphs kept by the free-memory budget or re-rendered) gives
    the CPU's outputs and parameter gradients, in float64."""
    g_cpu, _, opt = _pair(False, True, perturb=0.0)
    g_cpu.renderer.render_path = "fast"
    cam = _camera(2)
    z = torch.randn(2, opt.model.style_dim, dtype=torch.float64)

    def step(g, device):
        g.zero_grad(set_to_none=True)
        _, thumb, sdf, eikonal, seg = g([z.to(device)], *[t.to(device) for t in cam], return_sdf=True,
                                        return_eikonal=True)
        eik, min_surf = eikonal_loss(eikonal, sdf, beta=100)
        loss = (torch.linspace(0.5, 1.5, thumb.numel(), dtype=thumb.dtype, device=device).view_as(thumb) * thumb
                ).mean() + 0.1 * eik + 0.01 * min_surf + (seg ** 2).mean()
        loss.backward()
        return [t.detach().cpu() for t in (thumb, sdf, eikonal, seg)], {
            n: p.grad.cpu() for n, p in g.named_parameters() if p.grad is not None}

    outs_cpu, grads_cpu = step(g_cpu, "cpu")
    g_gpu = copy.deepcopy(g_cpu).cuda()
    for keep_mib in (None, 0):
        g_gpu.renderer.fast_keep_mib = keep_mib
        outs, grads = step(g_gpu, "cuda")
        for name, a, b in zip(("thumb", "sdf", "eikonal", "seg"), outs, outs_cpu):
            _close(a, b, name)
        assert set(grads) == set(grads_cpu)
        for name, grad in grads_cpu.items():
            _close(grads[name], grad, f"grad {name}")

"""Inference side (SPEC §15, issue 4): inference_Full.py, render_video.py, rendering/loading.py, rendering/meshes.py.

Everything runs a tiny random-weight generator on the CPU; scripts run as subprocesses, one thread each
(the test machine has 2 shared cores, and oversubscribed threads are several times slower).
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.checkpoint import CheckpointError, load_state_strict, save_checkpoint  # noqa: E402
from common.cli import UsageError  # noqa: E402
from rendering import loading as gen  # noqa: E402
from rendering import meshes as mu  # noqa: E402
from rendering.camera import camera_rays, generate_camera_params, pixel_grid, shape_view_index, view_locations  # noqa: E402
from rendering.inference import render_surface  # noqa: E402
from rendering.latents import identity_latents, mean_latent, save_latents  # noqa: E402

TINY = ["--size", "64", "--renderer_spatial_output_dim", "32", "--style_dim", "32", "--width", "32",
        "--N_samples", "8", "--channel_multiplier", "1"]
# Cheap evaluation settings for the scripts' own flags (the published ones are 64 / 128 / 128 / 10000).
FAST = ["--inference_samples", "8", "--surface_resolution", "24", "--surface_samples", "12",
        "--truncation_mean", "200"]
SEED = 5
SIZE, SURF = 64, 24


def tiny_options(*extra):
    opt, _ = gen.parse_options(TINY + list(extra))
    return opt


def run_script(script, *args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=timeout, env=env)


def image_size(path):
    with Image.open(path) as im:
        return im.size


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ fixtures


def make_sphere(generator, radius=0.06, a=0.3):
    """Set weights so that the renderer's SDF is a sphere of `radius` around the origin: a
    sphere-initialised renderer without the 10000 fitting steps.

    Every region's Δsdf head is zeroed, so sdf = sdf0 of the initial SDF network, whose FiLM-SIREN
    computes, for network inputs x = p·2/(far-near): layer 0 with γ=1, β=π/2 gives cos(a·x_j) on three
    units; the next four layers (γ=1, identity weights, bias -1 once) pass u ≈ cos(a x_j) - 1 ≈ -a²x_j²/2
    through sin(u) ≈ u; the SDF head sums them to s(|x|² - ρ²), zero at |p| = radius, slope ≈ 1 there.
    The style codes do not matter (all γ/β weights are zero). A small β makes the surface sharp.
    """
    half_range = (1.12 - 0.88) / 2  # default dist_radius 0.12
    rho = radius / half_range
    slope = half_range / (2 * rho)  # d sdf/d|p| = s·2ρ/half_range = 1 at the surface
    with torch.no_grad():
        for net in generator.renderer.network:
            net.sdf_linear.weight.zero_()
            net.sdf_linear.bias.zero_()
        init = generator.renderer.init_network
        layers = list(init.shape_linears) + list(init.texture_linears)
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()
            layer.gamma.weight.zero_()
            layer.gamma.bias.fill_((1.0 - 30.0) / 15.0)  # γ = 15 b + 30 = 1
            layer.beta.weight.zero_()
            layer.beta.bias.zero_()
        layers[0].weight[:3, :3] = a * torch.eye(3)
        layers[0].beta.bias[:3] = 4 * (math.pi / 2)  # β = 0.25 b = π/2: sin(· + π/2) = cos(·)
        for layer in layers[1:]:
            layer.weight[:3, :3] = torch.eye(3)
        layers[1].bias[:3] = -1.0
        init.sdf_linear.weight.zero_()
        init.sdf_linear.weight[0, :3] = -2 * slope / a ** 2
        init.sdf_linear.bias.fill_(-slope * rho ** 2)
        generator.renderer.sigmoid_beta.fill_(0.002)
    return generator


@pytest.fixture(scope="module")
def tiny_generator():
    torch.manual_seed(0)
    return make_sphere(gen.build_generator(tiny_options()))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_generator):
    folder = tmp_path_factory.mktemp("ckpt")
    state = tiny_generator.state_dict()
    published = folder / "final_model.pt"
    save_checkpoint({"g_ema": state}, published)
    # This project's stage-2 layout: generator, discriminator and EMA generator (+ optimiser-like extras).
    stage2 = folder / "tiny_full_pipeline.pt"
    save_checkpoint({"g": state, "d": {"final_linear.0.weight": torch.zeros(2, 2)}, "g_ema": state}, stage2)
    other = folder / "other_size.pt"
    other_gen = gen.build_generator(tiny_options("--size", "128"))
    save_checkpoint({"g_ema": other_gen.state_dict()}, other)
    return dict(published=published, stage2=stage2, other=other, folder=folder)


@pytest.fixture(scope="module")
def sweep_runs(ckpts, tmp_path_factory):
    """The published command (with surfaces) and the same with --semantics, from the two checkpoint layouts."""
    out_all = tmp_path_factory.mktemp("all")
    out_sem = tmp_path_factory.mktemp("sem")
    common = TINY + FAST + ["--identities", "1", "--seed", SEED, "--truncation_ratio", "0.7"]
    all_regions = run_script("inference_Full.py", "--trained_ckpt", ckpts["published"], "--results_dir", out_all,
                             *common)
    subset = run_script("inference_Full.py", "--trained_ckpt", ckpts["stage2"], "--results_dir", out_sem, *common,
                        "--semantics", "eye,mouth")
    return all_regions, out_all, subset, out_sem


# ------------------------------------------------------------------------------------ inference_Full


def test_published_command_writes_every_file_with_expected_sizes(sweep_runs):
    result, out, _, _ = sweep_runs
    assert result.returncode == 0, result.stderr
    assert "identities" in result.stderr  # the progress bar
    assert image_size(out / "0_img.png") == (10 * SIZE, SIZE)  # the 10-view sweep in a row
    assert image_size(out / "0_seg.png") == (10 * SIZE, SIZE)
    assert image_size(out / "0_shape.png") == (SIZE, SIZE)
    depth = trimesh.load(out / "0_depth_mesh.obj", process=False)
    # Surface points of the sphere's pixels (background pixels are no part of the shape).
    assert 0 < len(depth.vertices) <= SURF * SURF
    assert abs(np.median(np.linalg.norm(depth.vertices, axis=1)) - 0.06) < 0.005
    mesh = trimesh.load(out / "0_mesh.obj")
    assert mesh.is_watertight and abs(mesh.volume / (4 / 3 * math.pi * 0.06 ** 3) - 1) < 0.3  # the sphere
    shape = pixels(out / "0_shape.png")
    background = (shape == 255).all(-1)
    assert background[0, 0] and background[-1, -1] and not background[SIZE // 2, SIZE // 2]  # a disc
    # Segmentations are written with the region colours only.
    from common.regions import REGION_COLORS

    colours = {tuple(c) for c in pixels(out / "0_seg.png").reshape(-1, 3)}
    assert colours <= {tuple(int(v) for v in c) for c in REGION_COLORS}
    # The sweep's views differ from one another (the camera moves).
    img = pixels(out / "0_img.png")
    assert np.abs(img[:, :SIZE] - img[:, -SIZE:]).mean() > 1


def test_semantics_subset_changes_image_not_geometry(sweep_runs):
    _, out_all, result, out_sem = sweep_runs
    assert result.returncode == 0, result.stderr  # also: the stage-2 checkpoint layout loads
    assert np.abs(pixels(out_all / "0_img.png") - pixels(out_sem / "0_img.png")).mean() > 0.5
    full = trimesh.load(out_all / "0_depth_mesh.obj", process=False)
    subset = trimesh.load(out_sem / "0_depth_mesh.obj", process=False)
    np.testing.assert_allclose(subset.vertices, full.vertices, atol=1e-6)
    assert (pixels(out_all / "0_shape.png") == pixels(out_sem / "0_shape.png")).all()


def test_seed_reproducible_and_latents_render_the_same_identity(sweep_runs, ckpts, tiny_generator, tmp_path):
    _, out_all, _, _ = sweep_runs
    opt = tiny_options("--truncation_mean", "200")
    mean = mean_latent(tiny_generator, 200)
    z = torch.randn(1, 32, generator=torch.Generator().manual_seed(SEED))  # what --seed 5 draws first
    w_raw = tiny_generator.map_styles(z).detach()
    codes, w = identity_latents(tiny_generator, z, mean, opt.inference.truncation_ratio)
    truncated = tmp_path / "truncated.pt"
    save_latents(truncated, codes, w, truncated=True)
    raw = tmp_path / "raw.pt"
    other = tiny_generator.map_styles(torch.randn(1, 32)).detach()
    save_latents(raw, torch.cat([w_raw, other]).unsqueeze(1).repeat(1, 18, 1), torch.cat([w_raw, other]),
                 truncated=False)
    reference = pixels(out_all / "0_img.png")
    # The reference came from --seed 5, whose first identity is the z drawn above: rendering it from
    # either latent file gives the same picture (and shows --seed decides the identity).
    for name, path, n in (("truncated", truncated, 1), ("raw", raw, 2)):
        out = tmp_path / name
        result = run_script("inference_Full.py", "--trained_ckpt", ckpts["published"], "--results_dir", out, *TINY,
                            *FAST, "--seed", SEED, "--no_surface_renderings", "--latents", path)
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}_{k}.png" for i in range(n) for k in ("img", "seg"))
        assert np.abs(pixels(out / "0_img.png") - reference).max() <= 1, name


def test_fixed_and_random_views(ckpts, tmp_path):
    fixed = tmp_path / "fixed"
    result = run_script("inference_Full.py", "--trained_ckpt", ckpts["published"], "--results_dir", fixed, *TINY,
                        *FAST, "--identities", "1", "--fixed_camera_angles", "--no_surface_renderings", "--seed", 1)
    assert result.returncode == 0, result.stderr
    assert image_size(fixed / "0_img.png") == (13 * SIZE, SIZE)
    assert not list(fixed.glob("*_shape.png")) and not list(fixed.glob("*.obj"))
    rand = tmp_path / "random"
    result = run_script("inference_Full.py", "--trained_ckpt", ckpts["published"], "--results_dir", rand, *TINY,
                        *FAST, "--identities", "1", "--num_views_per_id", "3", "--seed", 1, "--mesh_format", "ply",
                        "--surface_resolution", "16", "--surface_samples", "8")
    assert result.returncode == 0, result.stderr
    assert image_size(rand / "0_img.png") == (3 * SIZE, SIZE)
    assert image_size(rand / "0_seg.png") == (3 * SIZE, SIZE)
    assert (rand / "0_mesh.ply").is_file() or "no zero crossing" in result.stderr


def test_view_locations():
    opt = tiny_options()
    sweep = view_locations(opt)
    assert sweep.shape == (10, 2)
    np.testing.assert_allclose(sweep[:, 0], 0.3 * np.linspace(-1.5, 1.5, 10), atol=1e-6)
    np.testing.assert_allclose(sweep[:, 1], 0.8 * 0.15, atol=1e-7)
    assert shape_view_index(opt, 10) == 5
    fixed = view_locations(tiny_options("--fixed_camera_angles"))
    assert fixed.shape == (13, 2) and fixed[0].abs().sum() == 0
    rng = torch.Generator().manual_seed(0)
    random_views = view_locations(tiny_options("--num_views_per_id", "4", "--uniform"), rng)
    assert random_views.shape == (4, 2)
    assert (random_views[:, 0].abs() <= 0.3).all() and (random_views[:, 1].abs() <= 0.15).all()
    assert random_views[:, 0].std() > 0


# -------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_exit_with_one_clear_line(ckpts, tmp_path):
    out = tmp_path / "never"
    base = ["--results_dir", out, *TINY, *FAST, "--identities", "1"]
    missing = run_script("inference_Full.py", "--trained_ckpt", tmp_path / "nope.pt", *base)
    assert_one_line_error(missing, "nope.pt", "not found")
    other = run_script("inference_Full.py", "--trained_ckpt", ckpts["other"], *base)
    assert_one_line_error(other, "other_size.pt", "does not fit")
    region = run_script("inference_Full.py", "--trained_ckpt", ckpts["published"], *base, "--semantics", "eye,tail")
    assert_one_line_error(region, "tail", "valid regions", "2=eye")
    assert not out.exists()  # nothing half-written


def test_bad_inputs_in_process(ckpts, tmp_path, capsys):
    # The scripts' prepare() runs every check before anything is written; these take the same path.
    import inference_Full

    base = ["--results_dir", str(tmp_path / "never"), *TINY, *FAST]
    with pytest.raises(UsageError, match="'12'.*valid regions: 0=background"):
        gen.parse_semantics("2,12")
    assert gen.parse_semantics("") is None and gen.parse_semantics("mouth,2") == [2, 3]
    with pytest.raises(SystemExit) as exit_info:
        inference_Full.main(base)
    assert "--trained_ckpt" in str(exit_info.value.code) and str(exit_info.value.code).startswith("error: ")
    bad_latents = tmp_path / "wrong_dim.pt"
    save_latents(bad_latents, torch.zeros(1, 18, 16), torch.zeros(1, 16))
    with pytest.raises(SystemExit) as exit_info:
        inference_Full.main(base + ["--trained_ckpt", str(ckpts["published"]), "--latents", str(bad_latents)])
    assert "wrong_dim.pt" in exit_info.value.code and "style_dim" in exit_info.value.code
    with pytest.raises(SystemExit) as exit_info:
        inference_Full.main(base + ["--trained_ckpt", str(ckpts["published"]), "--identities", "0"])
    assert "--identities" in exit_info.value.code
    with pytest.raises(SystemExit) as exit_info:
        inference_Full.main(base + ["--trained_ckpt", str(ckpts["published"]), "--device", "nonsense"])
    assert exit_info.value.code.startswith("error: --device 'nonsense'")
    assert not (tmp_path / "never").exists()


def test_checkpoint_with_its_config_needs_no_model_flags(tiny_generator, tmp_path):
    # Final checkpoints of this project carry their architecture options: --trained_ckpt alone rebuilds
    # the model; a flag that contradicts the checkpoint is one clear line.
    import inference_Full
    from common.checkpoint import architecture_config

    path = tmp_path / "with_config.pt"
    save_checkpoint({"g_ema": tiny_generator.state_dict(), "config": architecture_config(tiny_options())}, path)
    opt, _ = gen.parse_options(["--trained_ckpt", str(path)])
    assert (opt.model.size, opt.model.style_dim, opt.rendering.width, opt.model.n_render) == (64, 32, 32, 9)
    out = tmp_path / "out"
    result = run_script("inference_Full.py", "--trained_ckpt", path, "--results_dir", out, *FAST, "--identities", "1",
                        "--no_surface_renderings", "--seed", SEED)
    assert result.returncode == 0, result.stderr
    assert image_size(out / "0_img.png") == (10 * SIZE, SIZE)
    with pytest.raises(SystemExit) as exit_info:
        inference_Full.main(["--trained_ckpt", str(path), "--size", "128", "--results_dir", str(tmp_path / "never")])
    assert exit_info.value.code == f"error: --size 128: {path} was trained with --size 64 " \
                                   "(drop the flag: the checkpoint's options are used)"
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------ render_video


def test_render_video_writes_side_by_side_mp4(ckpts, tmp_path):
    import imageio.v2 as imageio

    out = tmp_path / "videos"
    result = run_script("render_video.py", "--trained_ckpt", ckpts["published"], "--results_dir", out, *TINY, *FAST,
                        "--identities", "1", "--frames", "3", "--azim_video", "--semantics", "2,3", "--seed", 2,
                        "--surface_resolution", "16", "--surface_samples", "8")
    assert result.returncode == 0, result.stderr
    assert "videos" in result.stderr  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == ["0_video.mp4"]
    reader = imageio.get_reader(out / "0_video.mp4")
    frames = [np.asarray(f).astype(np.int16) for f in reader]
    reader.close()
    assert len(frames) == 3
    assert frames[0].shape == (SIZE, 3 * SIZE, 3)  # RGB | seg | shaded depth
    assert np.abs(frames[0][:, :SIZE] - frames[1][:, :SIZE]).mean() > 1  # the camera moves


def test_render_video_bad_inputs(ckpts, tmp_path):
    out = tmp_path / "never"
    base = ["--results_dir", out, *TINY, "--frames", "2"]
    refused = run_script("render_video.py", "--trained_ckpt", ckpts["published"], *base, "--project_noise")
    assert_one_line_error(refused, "--project_noise")
    region = run_script("render_video.py", "--trained_ckpt", ckpts["published"], *base, "--semantics", "tail")
    assert_one_line_error(region, "tail", "valid regions")
    assert not out.exists()


def test_camera_path_loops():
    import render_video

    opt = tiny_options()
    path = render_video.camera_path(8, opt.camera)
    assert path.shape == (8, 2)
    np.testing.assert_allclose(path[0].numpy(), [1.5 * 0.3, 0.0], atol=1e-6)  # starts at the widest azimuth
    np.testing.assert_allclose(path[2].numpy(), [0.0, 0.15], atol=1e-6)  # a quarter turn: highest elevation
    assert path[:, 1].abs().max() <= 0.15 + 1e-6
    azim = render_video.camera_path(8, opt.camera, azim_only=True)
    assert (azim[:, 1] == 0).all() and azim[:, 0].min() < -0.44


# ----------------------------------------------------------------------------------- shapes and meshes


def sphere_models(tiny_generator, surface_resolution=48, surface_samples=32):
    opt = tiny_options()
    generator = gen.build_generator(opt)
    generator.load_state_dict(tiny_generator.state_dict())
    surface = gen.build_surface_generator(opt, "cpu", surface_resolution, surface_samples)
    load_state_strict(surface, generator.state_dict(), "memory", what="surface renderer")
    return opt, generator, surface


def test_shape_of_a_sphere_is_a_shaded_disc_and_its_mesh_is_watertight(tiny_generator):
    radius, res = 0.06, 48
    opt, generator, surface_generator = sphere_models(tiny_generator, res)
    mean = mean_latent(generator, 50)
    codes, _ = identity_latents(generator, torch.randn(1, 32), mean, 0.7)
    surface = render_surface(generator, surface_generator, codes, torch.zeros(1, 2), opt, mean, return_sdf=True)
    assert surface.xyz.shape == (3, res, res) and surface.sdf.shape == (res, res, 32)
    # The renderer's surface points lie on the sphere wherever a ray hits it.
    hit = surface.mask[0] < 0.05  # rays that end on a surface (grazing rays at the rim mix with the far end)
    error = (surface.xyz.norm(dim=0)[hit] - radius).abs()
    expected_px = (0.5 * res / math.tan(math.radians(6))) * radius / math.sqrt(1 - radius ** 2)
    assert abs(hit.sum() / (math.pi * expected_px ** 2) - 1) < 0.2
    assert error.median() < 0.0015 and error.max() < 0.004

    mesh = mu.depth_mesh(surface.xyz, surface.mask)
    camera = surface.extrinsics[:, 3].numpy()
    facing = np.sum(mesh.face_normals * (camera - mesh.triangles_center), 1) > 0
    assert facing.mean() > 0.97  # faces flipped to face the camera

    size = 96
    image = mu.shade_mesh(mesh, surface.extrinsics, surface.focal * size / res, size).astype(np.int16)
    assert image.shape == (size, size, 3)
    background = (image == 255).all(-1)
    c = size // 2
    assert background[0, 0] and background[-1, -1] and background[0, -1]  # corners: nothing there
    expected_radius = (0.5 * size / math.tan(math.radians(6))) * radius / math.sqrt(1 - radius ** 2)
    disc = ~background
    assert abs(disc.sum() / (math.pi * expected_radius ** 2) - 1) < 0.15  # a disc of the sphere's size
    ys, xs = np.nonzero(disc)
    assert abs(ys.mean() - (c - 0.5)) < 1.5 and abs(xs.mean() - (c - 0.5)) < 1.5  # centred
    centre = image[c - 2:c + 2, c - 2:c + 2].mean()
    rim = image[c, c + int(0.8 * expected_radius)].mean()
    assert 60 < rim < centre - 20  # shaded: darker towards the rim, lit at the centre

    sdf_mesh = mu.sdf_mesh(surface.sdf, surface.points)
    assert sdf_mesh.is_watertight
    assert abs(sdf_mesh.volume / (4 / 3 * math.pi * radius ** 3) - 1) < 0.1
    assert np.abs(np.linalg.norm(sdf_mesh.vertices, axis=1) - radius).max() < 0.004


def frustum_grid(res=20, samples=16):
    extrinsics, focal, near, far, _ = generate_camera_params(res, "cpu", locations=torch.tensor([[0.1, -0.05]]))
    gx, gy = pixel_grid(res, res)
    rays_o, rays_d, _ = camera_rays(gx, gy, focal, extrinsics)
    t = torch.linspace(0, 1 - 1 / samples, samples)
    z = near.reshape(1) * (1 - t) + far.reshape(1) * t
    return (rays_o[0, :, :, None] + rays_d[0, :, :, None] * z[None, None, :, None]).double()


def test_marching_cubes_closes_cut_surfaces_and_reports_missing_ones(tmp_path):
    points = frustum_grid()
    # A sphere bigger than the frustum: the zero set is cut by the grid's sides, the mesh is still closed.
    big = points.norm(dim=-1) - 0.1
    mesh = mu.sdf_mesh(big, points)
    assert mesh.is_watertight and mesh.volume > 0
    # Positions follow the frustum: vertices on the sphere part lie at radius 0.1.
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(radii - 0.1).min() < 1e-3
    mu.save_mesh(mesh, tmp_path / "m.ply")
    assert len(trimesh.load(tmp_path / "m.ply").faces) == len(mesh.faces)
    with pytest.raises(mu.MeshError, match="no zero crossing"):
        mu.sdf_mesh(points.norm(dim=-1) + 1.0, points)
    with pytest.raises(mu.MeshError, match="no zero crossing"):
        mu.sdf_mesh(-torch.ones(points.shape[:3]), points)


def test_grid_faces_cover_the_grid_once_and_face_the_camera():
    h, w = 5, 7
    faces = mu.grid_faces(h, w)
    assert len(faces) == 2 * (h - 1) * (w - 1)
    # A plane facing the camera (camera at +z looking down -z, image y down = world -y).
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    xyz = np.stack([cols, -rows, np.zeros_like(cols)], 0).astype(np.float32)
    mesh = mu.depth_mesh(xyz)
    assert (mesh.face_normals[:, 2] > 0.99).all()
    mask = np.zeros((1, h, w), dtype=np.float32)
    mask[0, 0, 0] = 1.0  # one background pixel: the faces touching it go
    assert len(mu.depth_mesh(xyz, mask).faces) < len(faces)


def test_surface_copy_shares_weights_and_a_wrong_checkpoint_raises(ckpts):
    opt = tiny_options("--trained_ckpt", str(ckpts["published"]))
    generator, surface = gen.load_models(opt, "cpu", surface=True, surface_resolution=16, surface_samples=8)
    assert surface.renderer.out_im_res == 16 and surface.renderer.N_samples == 8
    assert generator.renderer.N_samples == gen.INFERENCE_SAMPLES and generator.renderer.static_viewdirs
    for key, value in surface.state_dict().items():
        assert torch.equal(value, generator.state_dict()[key]), key
    with pytest.raises(CheckpointError, match="does not fit"):
        gen.load_models(tiny_options("--trained_ckpt", str(ckpts["other"])), "cpu")

"""Cameras and rays: the one place that builds camera poses, pixel grids and ray samples (SPEC §3-4)."""
import math

import torch
import torch.nn.functional as F

from common import draws


def generate_camera_params(resolution, device, batch=1, locations=None, sweep=False, uniform=False,
                           azim_range=0.3, elev_range=0.15, fov_ang=6, dist_radius=0.12):
    """Sample (or place) cameras on the unit sphere looking at the origin.

    Returns (extrinsics [B,3,4] camera-to-world, focal [B,1,1], near [B,1,1], far [B,1,1],
    viewpoint [B,2] = (azimuth, elevation)). `fov_ang` is the half angle in degrees and may be a
    [B,1] tensor when `locations` is given.
    """
    if locations is not None:
        azim = locations[:, 0].view(-1, 1)
        elev = locations[:, 1].view(-1, 1)
        n = azim.shape[0]
        dist = torch.ones(n, 1, device=device)
        fov_angle = fov_ang * torch.ones(n, 1, device=device).view(-1, 1) * math.pi / 180
    elif sweep:
        azim = (-azim_range + (2 * azim_range / 7) * torch.arange(8, device=device)).view(-1, 1).repeat(batch, 1)
        elev = (-elev_range + 2 * elev_range * torch.rand(batch, 1, device=device).repeat(1, 8).view(-1, 1))
        dist = torch.ones(batch, 1, device=device).repeat(1, 8).view(-1, 1)
        fov_angle = fov_ang * torch.ones(batch, 1, device=device).repeat(1, 8).view(-1, 1) * math.pi / 180
    else:
        if uniform:
            azim = -azim_range + 2 * azim_range * torch.rand(batch, 1, device=device)
            elev = -elev_range + 2 * elev_range * torch.rand(batch, 1, device=device)
        else:
            azim = azim_range * torch.randn(batch, 1, device=device)
            elev = elev_range * torch.randn(batch, 1, device=device)
        dist = torch.ones(batch, 1, device=device)
        fov_angle = fov_ang * torch.ones(batch, 1, device=device) * math.pi / 180
    near, far = (dist - dist_radius).unsqueeze(-1), (dist + dist_radius).unsqueeze(-1)
    focal = 0.5 * resolution / torch.tan(fov_angle).unsqueeze(-1)
    viewpoint = torch.cat([azim, elev], 1)
    extrinsics = look_at_origin(azim, elev, dist)
    return extrinsics, focal, near, far, viewpoint


def look_at_origin(azim, elev, dist):
    """Camera-to-world [B,3,4] for cameras at (azim, elev, dist) looking at the origin, y up."""
    camera_dir = torch.stack([torch.cos(elev) * torch.sin(azim), torch.sin(elev),
                              torch.cos(elev) * torch.cos(azim)], dim=1).view(-1, 3)
    camera_loc = dist * camera_dir
    up = torch.tensor([[0.0, 1.0, 0.0]], device=azim.device, dtype=azim.dtype) * torch.ones_like(dist)
    z_axis = F.normalize(camera_dir, eps=1e-5)  # the camera looks along -z
    x_axis = F.normalize(torch.cross(up, z_axis, dim=1), eps=1e-5)
    y_axis = F.normalize(torch.cross(z_axis, x_axis, dim=1), eps=1e-5)
    rotation = torch.stack([x_axis, y_axis, z_axis], dim=1)  # rows x, y, z
    return torch.cat([rotation.transpose(1, 2), camera_loc[:, :, None]], dim=-1)


def pixel_grid(height, width):
    """Pixel centres (x = col + 0.5, y = row + 0.5), each [H,W], float32 like the published buffers."""
    xs = torch.linspace(0.5, width - 0.5, width)
    ys = torch.linspace(0.5, height - 0.5, height)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return x, y


def sample_depths_t(n_samples, offset_sampling=True):
    """Fractions t_k along [near, far]; built exactly so (arange(S)/S differs in the last bit)."""
    if offset_sampling:
        return torch.linspace(0.0, 1.0 - 1.0 / n_samples, n_samples)
    return torch.linspace(0.0, 1.0, n_samples)


def camera_rays(grid_x, grid_y, focal, c2w):
    """Rays for every pixel: origins [B,H,W,3], world directions [B,H,W,3], camera directions [B,H,W,3].

    grid_x, grid_y: [H,W] pixel centres; focal [B,1,1]; c2w [B,3,4].
    """
    height, width = grid_x.shape
    x = (grid_x[None] - width * 0.5) / focal
    y = -(grid_y[None] - height * 0.5) / focal
    dirs = torch.stack([x, y, -torch.ones_like(x)], -1)  # [B,H,W,3]
    rays_d = torch.sum(dirs[..., None, :] * c2w[:, None, None, :3, :3], -1)
    rays_o = c2w[:, None, None, :3, -1].expand(rays_d.shape)
    return rays_o, rays_d, dirs


def depths_along_rays(t_vals, near, far, perturb=0.0, offset_sampling=True, generator=None):
    """Sample depths z [B,N,S] for rays with near/far [B,N,1]; jitter when perturb > 0 (training only).

    Offset sampling draws one uniform number per ray and moves every sample by that fraction of its
    interval (the last interval ends at far); stratified sampling jitters each sample inside its bin.
    """
    z = near * (1.0 - t_vals) + far * t_vals
    if perturb > 0:
        if offset_sampling:
            upper = torch.cat([z[..., 1:], far], -1)
            lower = z
            shape = z.shape[:-1] + (1,)
        else:
            mids = 0.5 * (z[..., 1:] + z[..., :-1])
            upper = torch.cat([mids, z[..., -1:]], -1)
            lower = torch.cat([z[..., :1], mids], -1)
            shape = z.shape
        if generator is None:  # training draws go through draws.current() (replaceable by the conformance check)
            u = draws.current().ray_jitter(shape, z.dtype, z.device)
        else:
            u = torch.rand(shape, device=z.device, dtype=z.dtype, generator=generator)
        z = lower + (upper - lower) * u
    return z


def sweep_locations(n_views, azim_range, elev_range, azim_scale=1.5, elev_scale=0.8, device="cpu"):
    """The published inference sweep: azim = azim_range * linspace(-1.5, 1.5, n), elev = 0.8 * elev_range."""
    azim = azim_range * torch.linspace(-azim_scale, azim_scale, n_views, device=device)
    elev = elev_scale * elev_range * torch.ones(n_views, device=device)
    return torch.stack([azim, elev], -1)


def fixed_locations(azim_range, elev_range, device="cpu"):
    """13 views: frontal, then ±0.5/1/1.5 × azim range, then ±0.5/1/1.5 × elev range."""
    locs = [(0.0, 0.0)]
    for s in (0.5, 1.0, 1.5):
        locs += [(-s * azim_range, 0.0), (s * azim_range, 0.0)]
    for s in (0.5, 1.0, 1.5):
        locs += [(0.0, -s * elev_range), (0.0, s * elev_range)]
    return torch.tensor(locs, device=device)


# ------------------------------------------------------- the views of inference


def view_locations(opt, rng=None, device="cpu"):
    """[V,2] (azimuth, elevation) of the views of one identity.

    --fixed_camera_angles: the 13 fixed views; --num_views_per_id N > 1: N random views (sampled like
    training cameras); otherwise the published 10-view azimuth sweep.
    """
    cam = opt.camera
    if opt.inference.fixed_camera_angles:
        return fixed_locations(cam.azim, cam.elev, device=device)
    n = int(opt.inference.num_views_per_id)
    if n > 1:
        if cam.uniform:
            u = torch.rand(n, 2, generator=rng) * 2 - 1
            locs = u * torch.tensor([cam.azim, cam.elev])
        else:
            locs = torch.randn(n, 2, generator=rng) * torch.tensor([cam.azim, cam.elev])
        return locs.to(device)
    return sweep_locations(10, cam.azim, cam.elev, device=device)


def shape_view_index(opt, n_views):
    """The view the shape is rendered from: the sweep's middle view, else the first (frontal when fixed)."""
    if opt.inference.fixed_camera_angles or int(opt.inference.num_views_per_id) > 1:
        return 0
    return n_views // 2


def cameras(resolution, locations, camera_opt, device):
    """(extrinsics [V,3,4], focal [V,1,1], near, far) for `locations` [V,2] at `resolution`."""
    cam = generate_camera_params(resolution, device, locations=locations.to(device), fov_ang=camera_opt.fov,
                                 dist_radius=camera_opt.dist_radius)
    return cam[:4]


def surface_cameras(generator, surface_generator, locations, camera_opt, device):
    """Cameras of the surface renderer: the main renderer's with the focal scaled by the resolution ratio."""
    extrinsics, focal, near, far = cameras(generator.renderer.out_im_res, locations, camera_opt, device)
    scale = surface_generator.renderer.out_im_res / generator.renderer.out_im_res
    return extrinsics, focal * scale, near, far

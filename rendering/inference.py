"""Rendering a trained generator the published inference way (SPEC §15): an identity's images and segs
from a list of views, and the surface pass of the renderer-only copy (points, SDF volume).

Codes arrive truncated once by hand (latents.identity_latents); the generator is called with
input_is_latent, truncation ψ (the renderer codes are truncated a second time, as the published script
does), randomize_noise=False and the global styles for the decoder.
"""
import torch
from munch import Munch

from rendering.camera import camera_rays, cameras, depths_along_rays, surface_cameras


def render_codes(generator, codes, styles_global, cam, mean_latent, psi, semantics=None, return_xyz=False):
    """The published inference call of the generator, in one place: codes [B,2K,D] (truncated once by hand)
    and styles_global [B,D] under cameras `cam` (extrinsics, focal, near, far) for B views, truncated a
    second time by the generator, fixed decoder noise. Differentiable (inversion optimises through it).
    Returns the generator's output: ((rgb, seg), rgb_low, seg_low), or with return_xyz
    ((rgb, seg), rgb_low, xyz, ...)."""
    return generator([codes], *cam, input_is_latent=True, truncation=psi, truncation_latent=mean_latent,
                     randomize_noise=False, styles_global=[styles_global], semantics=semantics, return_xyz=return_xyz)


@torch.no_grad()
def render_views(generator, codes, styles_global, locations, opt, mean_latent, semantics=None, psi=None,
                 batch=4):
    """Render one identity from every location, the published inference way.

    codes [1,18,D] (already truncated once by hand), styles_global [1,D], locations [V,2].
    `psi` defaults to --truncation_ratio; the generator truncates the codes towards the renderer mean a
    second time and the decoder's mapped style towards the decoder mean. Returns
    (rgb [V,3,H,W] in [-1,1], seg [V,K,H,W]) on the generator's device.
    """
    psi = opt.inference.truncation_ratio if psi is None else psi
    device = codes.device
    cam_all = cameras(generator.renderer.out_im_res, locations, opt.camera, device)
    rgbs, segs = [], []
    for start in range(0, locations.shape[0], batch):
        cam = [t[start:start + batch] for t in cam_all]
        count = cam[0].shape[0]
        (rgb, seg), _, _ = render_codes(generator, codes[:1].expand(count, -1, -1), styles_global[:1].expand(count, -1),
                                        cam, mean_latent, psi, semantics)
        rgbs.append(rgb)
        segs.append(seg)
    return torch.cat(rgbs), torch.cat(segs)


@torch.no_grad()
def render_surface(generator, surface_generator, codes, location, opt, mean_latent, psi=None, return_sdf=False):
    """The renderer-only pass of the surface copy for one view.

    codes [1,18,D] as for render_views (truncated a second time, like the images), location [1,2].
    Returns a Munch with xyz [3,r,r] surface points, mask [1,r,r] (last sample's weight: rays that hit
    nothing), camera (extrinsics [3,4], focal scalar at the surface renderer's `resolution`), near, far, and
    with return_sdf the SDF volume
    sdf [r,r,S] and the world points of its samples points [r,r,S,3].
    """
    psi = opt.inference.truncation_ratio if psi is None else psi
    device = codes.device
    extrinsics, focal, near, far = surface_cameras(generator, surface_generator, location[:1], opt.camera, device)
    out = surface_generator([codes[:1]], extrinsics, focal, near, far, input_is_latent=True, truncation=psi,
                            truncation_latent=mean_latent, return_xyz=True, return_sdf=return_sdf)
    xyz = out[2]
    result = Munch(xyz=xyz[0], mask=out[-2][0], extrinsics=extrinsics[0], focal=float(focal.reshape(-1)[0]),
                   near=float(near.reshape(-1)[0]), far=float(far.reshape(-1)[0]),
                   resolution=surface_generator.renderer.out_im_res)
    if return_sdf:
        result.sdf = out[3][0, ..., 0]
        result.points = sample_points(surface_generator.renderer, extrinsics, focal, near, far)[0]
    return result


def sample_points(renderer, extrinsics, focal, near, far):
    """World positions [B,r,r,S,3] of the renderer's evaluation samples (the frustum-aligned SDF grid)."""
    rays_o, rays_d, _ = camera_rays(renderer.grid_x, renderer.grid_y, focal, extrinsics)
    z = depths_along_rays(renderer.t_vals.to(rays_o.dtype), near.reshape(-1, 1, 1, 1),
                          far.reshape(-1, 1, 1, 1))  # [B,1,1,S]: no jitter at inference
    return rays_o.unsqueeze(-2) + rays_d.unsqueeze(-2) * z.unsqueeze(-1)

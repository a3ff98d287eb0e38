"""Compositional volume renderer (SPEC §4, §5, §7): one FiLM-SIREN generator per semantic region,
an initial SDF network supplying a base shape, and SDF-based volume integration.

The renderer processes rays in chunks so that memory stays bounded; the outputs do not depend on
the chunk size. Parameter names follow the published checkpoint. `forward` dispatches to the fast path
(rendering/fast_render.py, the default) or the reference path (here); both use the rays, volume weights and image
layout defined here.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from common import precision
from rendering import fast_render
from rendering.camera import camera_rays, depths_along_rays, pixel_grid, sample_depths_t


def _uniform(shape, bound):
    return torch.empty(shape).uniform_(-bound, bound)


class LinearLayer(nn.Module):
    """scale * linear(x) + offset, with the published initialisations."""

    def __init__(self, in_dim, out_dim, scale=1.0, offset=0.0, init="kaiming"):
        super().__init__()
        if init == "kaiming":  # γ/β and feature heads: 0.25 * kaiming_normal(a=0.2, fan_in, leaky_relu)
            weight = torch.empty(out_dim, in_dim)
            nn.init.kaiming_normal_(weight, a=0.2, mode="fan_in", nonlinearity="leaky_relu")
            weight = 0.25 * weight
        else:  # output heads: U(±sqrt(6/in)/25)
            weight = _uniform((out_dim, in_dim), math.sqrt(6 / in_dim) / 25)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(_uniform((out_dim,), math.sqrt(1 / in_dim)))
        self.scale = scale
        self.offset = offset

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.scale != 1.0:
            out = self.scale * out
        if self.offset != 0.0:
            out = out + self.offset
        return out


class FiLMSiren(nn.Module):
    """h' = sin(γ ⊙ (W h + b) + β), γ = 15 (W_γ s + b_γ) + 30, β = 0.25 (W_β s + b_β)."""

    def __init__(self, in_dim, out_dim, style_dim, is_first=False):
        super().__init__()
        bound = 1 / 3 if is_first else math.sqrt(6 / in_dim) / 25
        self.weight = nn.Parameter(_uniform((out_dim, in_dim), bound))
        self.bias = nn.Parameter(_uniform((out_dim,), math.sqrt(1 / in_dim)))
        self.gamma = LinearLayer(style_dim, out_dim, scale=15.0, offset=30.0)
        self.beta = LinearLayer(style_dim, out_dim, scale=0.25)

    def modulation(self, style):
        """(γ, β), each [B,1,out], for a style [B,D]; computed once per image, not per sample."""
        return self.gamma(style).unsqueeze(1), self.beta(style).unsqueeze(1)

    def forward(self, x, gamma, beta):
        return torch.sin(gamma * F.linear(x, self.weight, self.bias) + beta)


class LocalGenerator(nn.Module):
    """One region's generator: shape trunk → mask head; texture trunk → sdf, feature and colour heads."""

    def __init__(self, style_dim=256, width=128, depth=3, texture_depth=2):
        super().__init__()
        self.depth = depth
        self.shape_linears = nn.ModuleList(
            [FiLMSiren(3 if i == 0 else width, width, style_dim, is_first=(i == 0)) for i in range(depth)])
        self.texture_linears = nn.ModuleList([FiLMSiren(width, width, style_dim) for _ in range(texture_depth)])
        self.mask_linears = LinearLayer(width + 3, 1, init="head")
        self.feature_linear = LinearLayer(width + 3, width)
        self.rgb_linear = LinearLayer(width, 3, init="head")
        self.sdf_linear = LinearLayer(width, 1, init="head")

    @property
    def num_styles(self):
        return len(self.shape_linears) + len(self.texture_linears)

    def modulations(self, styles):
        """styles [B, num_styles, D] → one (γ, β) pair per FiLM layer."""
        layers = list(self.shape_linears) + list(self.texture_linears)
        return [layer.modulation(styles[:, i]) for i, layer in enumerate(layers)]

    def forward(self, x, viewdirs, film, output_features=True):
        """x, viewdirs [B,N,3] → rgb logits [B,N,3], Δsdf [B,N,1], features [B,N,C] or None, mask [B,N,1]."""
        h = x
        for layer, (gamma, beta) in zip(self.shape_linears, film):
            h = layer(h, gamma, beta)
        mask = self.mask_linears(torch.cat([h, viewdirs], -1))
        for layer, (gamma, beta) in zip(self.texture_linears, film[self.depth:]):
            h = layer(h, gamma, beta)
        sdf = self.sdf_linear(h)
        features = self.feature_linear(torch.cat([h, viewdirs], -1))
        rgb = self.rgb_linear(features)
        return rgb, sdf, (features if output_features else None), mask

    def sdf_only(self, x, film):
        """Δsdf without the heads that need view directions (the initial SDF network's use)."""
        h = x
        for layer, (gamma, beta) in zip(list(self.shape_linears) + list(self.texture_linears), film):
            h = layer(h, gamma, beta)
        return self.sdf_linear(h)


def expand_codes(codes, depth=3, texture_depth=2):
    """[B, 2K, D] per-region (shape, texture) codes → [B, K, depth+texture_depth, D] FiLM styles.

    Region k's layers receive [shape]*depth + [texture]*texture_depth (SPEC §6).
    """
    batch, n_codes, dim = codes.shape
    pairs = codes.view(batch, n_codes // 2, 2, dim)
    shape = pairs[:, :, :1].expand(-1, -1, depth, -1)
    texture = pairs[:, :, 1:].expand(-1, -1, texture_depth, -1)
    return torch.cat([shape, texture], 2)


class VolumeFeatureRenderer(nn.Module):
    """Renders K region generators composed by SDF summation into an image, a semantic mask and features."""

    def __init__(self, opt, style_dim=256, out_im_res=64, mode="train"):
        super().__init__()
        self.test = mode != "train"
        self.perturb = opt.perturb
        self.offset_sampling = not opt.no_offset_sampling
        self.N_samples = opt.N_samples
        self.raw_noise_std = opt.raw_noise_std
        self.return_xyz = opt.return_xyz
        self.return_sdf = opt.return_sdf
        self.static_viewdirs = opt.static_viewdirs
        self.z_normalize = not opt.no_z_normalize
        self.force_background = opt.force_background
        self.with_sdf = not opt.no_sdf
        self.output_features = opt.output_features  # set by Generator: features only for the decoder
        self.n_render = opt.n_render
        self.depth = opt.depth
        self.width = opt.width
        self.style_dim = style_dim
        self.ray_chunk = opt.ray_chunk
        self.out_im_res = out_im_res
        self.render_path = opt.render_path
        # Fast path: points per chunk (rays = points // samples), (without, with) gradients. On the
        # CPU, small enough that the [10·128, P] activations stay in cache-friendly, reusable
        # allocations, each chunk on its own thread (perf_utils.map_in_threads); on an accelerator,
        # large enough to fill it. Set them to override.
        self.fast_points = opt.get("fast_points", None)
        self.fast_grad_points = opt.get("fast_grad_points", None)
        # With gradients, chunk graphs are kept from the forward pass (instead of re-rendering the
        # chunk in backward) up to this many MiB (--keep_graph_mib); None: perf_utils.default_keep_mib
        # (2048 on the CPU, half the free memory of a CUDA device).
        self.fast_keep_mib = opt.keep_graph_mib

        # Constant buffers are float32 values (converted by .double() like the published modules),
        # not part of the state dict.
        self.register_buffer("t_vals", sample_depths_t(self.N_samples, self.offset_sampling), persistent=False)
        grid_x, grid_y = pixel_grid(out_im_res, out_im_res)
        self.register_buffer("grid_x", grid_x, persistent=False)
        self.register_buffer("grid_y", grid_y, persistent=False)

        self.network = nn.ModuleList(
            [LocalGenerator(style_dim, self.width, self.depth) for _ in range(self.n_render)])
        self.init_network = LocalGenerator(style_dim, self.width, self.depth)
        self.sigmoid_beta = nn.Parameter(0.1 * torch.ones(1))

    @property
    def n_codes(self):
        return 2 * self.n_render

    # ----------------------------------------------------------------------------------------- rays
    def rays(self, cam_poses, focal, near, far):
        rays_o, rays_d, dirs = camera_rays(self.grid_x, self.grid_y, focal, cam_poses)
        viewdirs = dirs if self.static_viewdirs else rays_d
        viewdirs = viewdirs / torch.norm(viewdirs, dim=-1, keepdim=True)
        batch = rays_o.shape[0]
        flat = lambda t: t.reshape(batch, -1, t.shape[-1])
        near = near.reshape(batch, 1, 1).expand(batch, rays_o.shape[1] * rays_o.shape[2], 1)
        far = far.reshape(batch, 1, 1).expand_as(near)
        return flat(rays_o), flat(rays_d), flat(viewdirs), near, far

    def _points(self, rays_o, rays_d, z):
        return rays_o.unsqueeze(-2) + rays_d.unsqueeze(-2) * z.unsqueeze(-1)

    def _network_input(self, pts, near, far):
        if self.z_normalize:
            return pts * 2 / (far - near).unsqueeze(-1)
        return pts

    # --------------------------------------------------------------------------------- rendering
    def forward(self, cam_poses, focal, near, far, styles, return_eikonal=False, return_sdf=None,
                return_xyz=None, semantics=None, ray_chunk=None):
        """Render. `styles`: per-region codes [B, 2K, D].

        Returns a dict with rgb [B,3,R,R] (in [-1,1]), seg [B,K,R,R], features [B,C,R,R] (when the
        renderer outputs features), and on request sdf [B,R,R,S,1], eikonal [B,R,R,S,3],
        xyz [B,3,R,R] with the last sample's weight mask [B,1,R,R].
        `self.render_path` picks the implementation: "fast" (grouped MLPs, folded FiLM, analytic
        eikonal, per-chunk recomputation for gradients) or "reference" (the straightforward one).
        Both give the same numbers up to rounding.
        """
        if self.render_path not in ("fast", "reference"):
            raise ValueError(f"render_path must be 'fast' or 'reference', got {self.render_path!r}")
        camera_grad = any(t.requires_grad for t in (cam_poses, focal, near, far) if torch.is_tensor(t))
        # Mixed precision (common/precision.py): under bf16 autocast the fast path casts by hand, what may
        # be bf16 only; the rays, the first layer and the volume integration stay fp32, and so does the
        # whole reference path. Autocast itself is off in here.
        device_type = cam_poses.device.type
        compute_dtype = precision.compute_dtype(device_type)
        with torch.autocast(device_type, enabled=False) if compute_dtype is not None else contextlib.nullcontext():
            if self.render_path == "fast" and not (camera_grad and torch.is_grad_enabled()):
                return fast_render.forward(self, cam_poses, focal, near, far, styles, return_eikonal, return_sdf,
                                           return_xyz, semantics, ray_chunk, compute_dtype=compute_dtype)
            return self._forward_reference(cam_poses, focal, near, far, styles, return_eikonal, return_sdf,
                                           return_xyz, semantics, ray_chunk)

    def _forward_reference(self, cam_poses, focal, near, far, styles, return_eikonal=False, return_sdf=None,
                           return_xyz=None, semantics=None, ray_chunk=None):
        """The straightforward renderer: 10 separate MLPs, autograd for the eikonal term.

        Returns a dict with rgb [B,3,R,R] (in [-1,1]), seg [B,K,R,R], features [B,C,R,R] (when the
        renderer outputs features), and on request sdf [B,R,R,S,1], eikonal [B,R,R,S,3],
        xyz [B,3,R,R] with the last sample's weight mask [B,1,R,R].
        Under torch.no_grad() with return_eikonal, the eikonal term is computed chunk by chunk and
        returned without a graph.
        """
        return_sdf = self.return_sdf if return_sdf is None else return_sdf
        return_xyz = self.return_xyz if return_xyz is None else return_xyz
        batch = cam_poses.shape[0]
        rays_o, rays_d, viewdirs, near_r, far_r = self.rays(cam_poses, focal, near, far)
        film = self._film(styles)
        n_rays = rays_o.shape[1]
        chunk = ray_chunk if ray_chunk is not None else self.ray_chunk
        chunk = n_rays if not chunk or chunk <= 0 else chunk
        keep_graph = torch.is_grad_enabled()
        region_weights = self.semantic_weights(semantics, rays_o)

        pieces = []
        for start in range(0, n_rays, chunk):
            sl = slice(start, start + chunk)
            # Without an outer graph, the eikonal term still needs a local one for this chunk only.
            context = torch.enable_grad() if (return_eikonal and not keep_graph) else contextlib.nullcontext()
            with context:
                out = self._render_chunk(rays_o[:, sl], rays_d[:, sl], viewdirs[:, sl], near_r[:, sl], far_r[:, sl],
                                         film, return_eikonal, return_sdf, return_xyz, region_weights,
                                         create_graph=keep_graph)
            if not keep_graph:
                out = {k: v.detach() for k, v in out.items()}
            pieces.append(out)
        merged = {k: torch.cat([p[k] for p in pieces], 1) for k in pieces[0]}
        return self.to_images(merged, batch)

    def layer_codes(self, styles):
        """Per-region codes [B, 2K, D] → each region layer's FiLM style [B, K, depth + texture depth, D]."""
        if styles.dim() != 3 or styles.shape[1] != self.n_codes:
            raise ValueError(f"renderer styles must be [B, {self.n_codes}, {self.style_dim}], got {tuple(styles.shape)}")
        return expand_codes(styles, self.depth, len(self.network[0].texture_linears))

    def _film(self, styles):
        per_layer = self.layer_codes(styles)
        film = [net.modulations(per_layer[:, k]) for k, net in enumerate(self.network)]
        with torch.no_grad():  # the initial SDF network only supplies a fixed base shape
            film_init = self.init_network.modulations(per_layer[:, 0])
        return film, film_init

    def semantic_weights(self, semantics, like):
        """Which regions contribute features: all, or only `semantics` (a list of indices)."""
        if semantics is None or len(semantics) == 0:
            return None
        weights = torch.zeros(self.n_render, dtype=like.dtype, device=like.device)
        weights[list(semantics)] = 1
        return weights

    def _render_chunk(self, rays_o, rays_d, viewdirs, near, far, film, return_eikonal, return_sdf, return_xyz,
                      region_weights, create_graph):
        film_regions, film_init = film
        t_vals = self.t_vals.to(rays_o.dtype)
        perturb = self.perturb if (self.training and not self.test) else 0.0
        z = depths_along_rays(t_vals, near, far, perturb, self.offset_sampling)
        pts = self._points(rays_o, rays_d, z)  # [B,n,S,3]
        if return_eikonal and not pts.requires_grad:
            pts.requires_grad_(True)
        x = self._network_input(pts, near, far)
        batch, n, s, _ = x.shape
        x = x.reshape(batch, n * s, 3)
        v = viewdirs.unsqueeze(-2).expand(batch, n, s, 3).reshape(batch, n * s, 3)

        with torch.no_grad():
            sdf0 = self.init_network.sdf_only(x.detach(), film_init)
        delta_sdf = 0
        color = 0
        features = 0
        masks = []
        for k, (net, f) in enumerate(zip(self.network, film_regions)):
            rgb_k, dsdf_k, feat_k, mask_k = net(x, v, f, output_features=self.output_features)
            delta_sdf = delta_sdf + dsdf_k
            color = color + mask_k * rgb_k
            masks.append(mask_k)
            if self.output_features and (region_weights is None or region_weights[k] != 0):
                features = features + mask_k * feat_k
        sdf = sdf0 + delta_sdf
        shape4 = lambda t: t.reshape(batch, n, s, t.shape[-1])
        sdf, delta_sdf, color = shape4(sdf), shape4(delta_sdf), shape4(color)
        mask = shape4(torch.cat(masks, -1))

        weights = self.volume_weights(sdf, z, rays_d)
        out = {"rgb": -1 + 2 * torch.sum(weights * torch.sigmoid(color), -2),
               "seg": torch.sum(weights * mask, -2)}
        if self.output_features:
            out["features"] = torch.sum(weights * shape4(features), -2)
        if return_sdf:
            out["sdf"] = sdf
        if return_xyz:
            out["xyz"] = torch.sum(weights * pts, -2)
            out["mask"] = weights[..., -1, :]
        if return_eikonal:
            # sdf0 carries no gradient, so this is the gradient of Σ_k Δsdf_k over the raw points.
            out["eikonal"] = torch.autograd.grad(delta_sdf, pts, torch.ones_like(delta_sdf),
                                                 create_graph=create_graph)[0]
        return out

    def volume_weights(self, sdf, z, rays_d, noise=None, beta=None):
        """Volume-rendering weights [..., S, 1]. `noise` (the raw-noise draw) and `beta` (the
        sigmoid_beta tensor) can be supplied so that the fast path's re-rendering is identical."""
        beta = self.sigmoid_beta if beta is None else beta
        dists = z[..., 1:] - z[..., :-1]
        dists = torch.cat([dists, 1e10 * torch.ones_like(dists[..., :1])], -1)
        dists = dists * torch.norm(rays_d, dim=-1, keepdim=True)
        raw = sdf
        if noise is not None:
            raw = raw + noise
        elif self.raw_noise_std > 0 and self.training:
            raw = raw + torch.randn_like(raw) * self.raw_noise_std
        if self.with_sdf:
            sigma = torch.sigmoid(-raw / beta) / beta
        else:  # NeRF density mode (the published code for it does not run; softplus density here)
            sigma = F.softplus(raw)
        alpha = 1 - torch.exp(-sigma * dists.unsqueeze(-1))
        transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1, :]), 1.0 - alpha + 1e-10], -2), -2)
        weights = alpha * transmittance[..., :-1, :]
        if self.force_background:
            weights = torch.cat([weights[..., :-1, :], 1 - weights[..., :-1, :].sum(-2, keepdim=True)], -2)
        return weights

    def to_images(self, merged, batch):
        res = self.out_im_res
        out = {}
        for key, value in merged.items():
            if key in ("sdf", "eikonal"):
                out[key] = value.reshape(batch, res, res, *value.shape[2:])
            else:
                out[key] = value.reshape(batch, res, res, value.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return out

    # --------------------------------------------------------------------------- sphere init
    def mlp_init_pass(self, cam_poses, focal, near, far, styles):
        """Initial SDF network's sdf at stratified samples, and the target sphere |p| - (far-near)/4."""
        rays_o, rays_d, _, near_r, far_r = self.rays(cam_poses, focal, near, far)
        t_vals = self.t_vals.to(rays_o.dtype)
        z = depths_along_rays(t_vals, near_r, far_r, perturb=1.0, offset_sampling=False)
        pts = self._points(rays_o, rays_d, z)
        x = self._network_input(pts, near_r, far_r)
        per_layer = expand_codes(styles, self.depth, len(self.network[0].texture_linears))
        film = self.init_network.modulations(per_layer[:, 0])
        batch, n, s, _ = x.shape
        sdf = self.init_network.sdf_only(x.reshape(batch, n * s, 3), film).reshape(batch, n, s)
        target = pts.detach().norm(dim=-1) - (far_r - near_r) / 4
        return sdf, target

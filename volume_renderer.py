"""Compositional volume renderer (SPEC §4, §5, §7): one FiLM-SIREN generator per semantic region,
an initial SDF network supplying a base shape, and SDF-based volume integration.

The renderer processes rays in chunks so that memory stays bounded; the outputs do not depend on
the chunk size. Parameter names follow the published checkpoint.
"""
import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

import perf_utils
from camera import camera_rays, depths_along_rays, pixel_grid, sample_depths_t


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


class _SirenEikonal(torch.autograd.Function):
    """SIREN trunk of K grouped MLPs plus the eikonal term, with a hand-written first-order backward.

    forward(xt [3,P], tap, lean, W_0..W_{L-1} [K,C,Cin], b_0..b_{L-1} [K,C], w_sdf [K,1,C]) returns
    (h after layer `tap`, h_L, g [3,P]) where g = ∂(Σ_k w_sdf,k·h_L,k)/∂x. Backward reuses the
    stored sin/cos (autograd's double backward would recompute them) and needs no second order.
    `lean` stores only the sines and cosines and recomputes the reverse pass's δ and u in backward
    with the forward's own operations (same values): 2L instead of 4L-1 saved [K,C,P] tensors, for
    graphs that are kept from the forward pass until backward.
    """

    @staticmethod
    def _reverse(weights, w_sdf, cs):
        """The eikonal reverse pass: δ_{L-1} = w_sdf ⊙ cos_{L-1}; u_i = W_iᵀ δ_i; δ_{i-1} = u_i ⊙ cos_{i-1}."""
        n_layers = len(weights)
        deltas = [None] * n_layers
        us = [None] * n_layers
        deltas[-1] = w_sdf[:, 0, :].unsqueeze(-1) * cs[-1]
        for i in range(n_layers - 1, 0, -1):
            us[i] = torch.bmm(weights[i].transpose(1, 2), deltas[i])
            deltas[i - 1] = us[i] * cs[i - 1]
        return deltas, us

    @staticmethod
    def forward(ctx, xt, tap, lean, *params):
        n_layers = (len(params) - 1) // 2
        weights, biases, w_sdf = params[:n_layers], params[n_layers:2 * n_layers], params[-1]
        k, c = weights[0].shape[:2]
        a = torch.addmm(biases[0].reshape(k * c, 1), weights[0].reshape(k * c, 3), xt).view(k, c, -1)
        hs, cs = [], []
        for i in range(n_layers):
            if i:
                a = torch.baddbmm(biases[i].unsqueeze(-1), weights[i], hs[-1])
            # Inside an autograd.Function's forward: no graph, so perf_utils' faster sin/cos apply;
            # the pre-activation is not needed any more, so sin works in place.
            cs.append(perf_utils.cos(a))
            hs.append(perf_utils.sin_(a))
        del a
        deltas, us = _SirenEikonal._reverse(weights, w_sdf, cs)
        grad_x = torch.mm(weights[0].reshape(k * c, 3).t(), deltas[0].reshape(k * c, -1))
        ctx.n_layers, ctx.tap, ctx.lean = n_layers, tap, lean
        if lean:
            ctx.save_for_backward(xt, *params, *hs, *cs)
        else:
            ctx.save_for_backward(xt, *params, *hs, *cs, *deltas, *us[1:])
        return hs[tap - 1], hs[-1], grad_x

    @staticmethod
    def backward(ctx, g_tap, g_last, g_x):
        n, tap = ctx.n_layers, ctx.tap
        saved = ctx.saved_tensors
        xt, weights, w_sdf = saved[0], saved[1:1 + n], saved[2 * n + 1]
        rest = saved[2 * n + 2:]
        hs, cs = rest[:n], rest[n:2 * n]
        if g_x is None:
            deltas = us = None
        elif ctx.lean:
            deltas, us = _SirenEikonal._reverse(weights, w_sdf, cs)
        else:
            deltas, us = rest[2 * n:3 * n], (None,) + tuple(rest[3 * n:])
        k, c, p = hs[0].shape
        g_w = [None] * n
        g_b = [None] * n
        g_wsdf = None
        g_cos = [None] * n
        if g_x is not None:
            # g = W_0ᵀ δ_0;  δ_i = u_{i+1} ⊙ cos_i;  u_{i+1} = W_{i+1}ᵀ δ_{i+1};  δ_{L-1} = w_sdf ⊙ cos_{L-1}
            g_w[0] = torch.mm(deltas[0].reshape(k * c, p), g_x.t()).view(k, c, 3)
            g_delta = torch.mm(weights[0].reshape(k * c, 3), g_x).view(k, c, p)
            for i in range(n - 1):
                g_u = g_delta * cs[i]
                g_cos[i] = g_delta * us[i + 1]
                g_w[i + 1] = torch.bmm(deltas[i + 1], g_u.transpose(1, 2))
                g_delta = torch.bmm(weights[i + 1], g_u)
            g_wsdf = (g_delta * cs[-1]).sum(-1).unsqueeze(1)
            g_cos[-1] = g_delta * w_sdf[:, 0, :].unsqueeze(-1)
        g_h = g_last
        for i in range(n - 1, -1, -1):
            if i == tap - 1 and g_tap is not None:
                g_h = g_tap if g_h is None else g_h + g_tap
            g_a = None if g_h is None else g_h * cs[i]
            if g_cos[i] is not None:  # ∂cos(a)/∂a = -sin(a) = -h
                g_a = -g_cos[i] * hs[i] if g_a is None else g_a - g_cos[i] * hs[i]
            if g_a is None:
                g_h = None
                continue
            if i == 0:
                g_w0 = torch.mm(g_a.reshape(k * c, p), xt.t()).view(k, c, 3)
            else:
                g_w0 = torch.bmm(g_a, hs[i - 1].transpose(1, 2))
            g_w[i] = g_w0 if g_w[i] is None else g_w[i] + g_w0
            g_b[i] = g_a.sum(-1)
            g_h = torch.bmm(weights[i].transpose(1, 2), g_a) if i > 0 else None
        return (None, None, None, *g_w, *g_b, g_wsdf)


class _FastSpec:
    """Everything a fast render needs besides the differentiable tensors (rays, depths, flags)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class _FastRender(torch.autograd.Function):
    """Renders without a graph; backward re-renders chunk by chunk and accumulates the gradients of
    the folded weights, heads and sigmoid_beta (exact: the outputs are per-ray, chunks are disjoint).

    The first `spec.keep` chunks instead keep their graph from the forward pass (lean: sines and
    cosines only, see _SirenEikonal), so backward does not render them a second time; spec.keep is
    set by a memory budget (VolumeFeatureRenderer.fast_keep_mib). Backward goes through the chunks
    on the CPU's worker threads (perf_utils.imap_in_threads) and adds their gradients in chunk
    order, so the sums are those of a serial loop, bit for bit.
    """

    @staticmethod
    def forward(ctx, renderer, spec, *tensors):
        ctx.renderer, ctx.spec = renderer, spec
        ctx.set_materialize_grads(False)
        needs = ctx.needs_input_grad[2:]
        ctx.leaves = [t.detach().requires_grad_(need) for t, need in zip(tensors, needs)]
        if spec.keep:
            outs, ctx.kept = renderer._fast_all(spec, ctx.leaves, keep_sdf0=True, chunk=spec.grad_chunk,
                                                keep=spec.keep)
        else:
            outs, ctx.kept = renderer._fast_all(spec, ctx.leaves, keep_sdf0=True), []
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        renderer, spec, leaves, kept = ctx.renderer, ctx.spec, ctx.leaves, ctx.kept
        needs = ctx.needs_input_grad[2:]
        totals = [None] * len(leaves)
        wanted = [i for i, need in enumerate(needs) if need]

        def chunk_grads(item):
            j, (b, sl) = item
            out = None
            if j < len(kept):
                out, kept[j] = kept[j], None  # this chunk's graph is freed by the grad call below
            pairs = [(key, g[b, sl]) for key, g in zip(spec.keys, grads) if g is not None]
            if not pairs or not wanted:
                return None
            with torch.enable_grad():  # grad mode is per thread
                if out is None:
                    out = renderer._fast_chunk(spec, leaves, b, sl)
                return torch.autograd.grad([out[key] for key, _ in pairs], [leaves[i] for i in wanted],
                                           [g for _, g in pairs], allow_unused=True)

        items = enumerate(renderer._fast_chunks(spec, spec.grad_chunk))
        for got in perf_utils.imap_in_threads(chunk_grads, items, spec.rays_o.device):
            if got is None:
                continue
            for i, g in zip(wanted, got):
                if g is not None:
                    totals[i] = g if totals[i] is None else totals[i] + g
        ctx.kept = []  # consumed; a second backward (retain_graph) re-renders every chunk
        return (None, None, *totals)


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
        self.output_features = opt.get("output_features", True)
        self.n_render = opt.n_render
        self.depth = opt.depth
        self.width = opt.width
        self.style_dim = style_dim
        self.ray_chunk = opt.get("ray_chunk", 2048) or 0
        self.out_im_res = out_im_res
        self.render_path = opt.get("render_path", "fast") or "fast"
        # Fast path: points per chunk (rays = points // samples), (without, with) gradients. On the
        # CPU, small enough that the [10·128, P] activations stay in cache-friendly, reusable
        # allocations, each chunk on its own thread (perf_utils.map_in_threads); on an accelerator,
        # large enough to fill it. Set them to override.
        self.fast_points = opt.get("fast_points", None)
        self.fast_grad_points = opt.get("fast_grad_points", None)
        # With gradients, chunk graphs are kept from the forward pass (instead of re-rendering the
        # chunk in backward) up to this many MiB: by default 2048 on the CPU (CNERF_KEEP_MIB
        # overrides), none on an accelerator (untested there). Set it to override.
        self.fast_keep_mib = opt.get("fast_keep_mib", None)

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
    def _rays(self, cam_poses, focal, near, far):
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
        if self.render_path == "fast" and not (camera_grad and torch.is_grad_enabled()):
            return self._forward_fast(cam_poses, focal, near, far, styles, return_eikonal, return_sdf,
                                      return_xyz, semantics, ray_chunk)
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
        rays_o, rays_d, viewdirs, near_r, far_r = self._rays(cam_poses, focal, near, far)
        film = self._film(styles)
        n_rays = rays_o.shape[1]
        chunk = ray_chunk if ray_chunk is not None else self.ray_chunk
        chunk = n_rays if not chunk or chunk <= 0 else chunk
        keep_graph = torch.is_grad_enabled()
        region_weights = self._semantic_weights(semantics, rays_o)

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
        return self._to_images(merged, batch)

    def _film(self, styles):
        if styles.dim() != 3 or styles.shape[1] != self.n_codes:
            raise ValueError(f"renderer styles must be [B, {self.n_codes}, {self.style_dim}], got {tuple(styles.shape)}")
        per_layer = expand_codes(styles, self.depth, len(self.network[0].texture_linears))
        film = [net.modulations(per_layer[:, k]) for k, net in enumerate(self.network)]
        with torch.no_grad():  # the initial SDF network only supplies a fixed base shape
            film_init = self.init_network.modulations(per_layer[:, 0])
        return film, film_init

    def _semantic_weights(self, semantics, like):
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

        weights = self._weights(sdf, z, rays_d)
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

    def _weights(self, sdf, z, rays_d, noise=None, beta=None):
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

    def _to_images(self, merged, batch):
        res = self.out_im_res
        out = {}
        for key, value in merged.items():
            if key in ("sdf", "eikonal"):
                out[key] = value.reshape(batch, res, res, *value.shape[2:])
            else:
                out[key] = value.reshape(batch, res, res, value.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return out

    # ------------------------------------------------------------------------------- fast path
    # All region MLPs run as one batched matmul per layer ([K, C, P] activations, points last), with
    # FiLM folded into the weights once per image: γ ⊙ (W h + b) + β = (γ W) h + (γ b + β).
    # The eikonal term is the hand-written reverse pass of the SIREN trunk (first-order only), so
    # gradients of losses that use it need plain backward, not double backward. With gradients
    # needed, _FastRender renders without a graph and, in backward, re-renders chunk by chunk and
    # accumulates the parameter gradients: memory stays at one chunk's graph.

    def _fast_params(self, styles):
        """Flat list of per-image folded trunk weights + stacked heads + sigmoid_beta (with autograd),
        and the initial SDF network's folded trunk + sdf head (without)."""
        if styles.dim() != 3 or styles.shape[1] != self.n_codes:
            raise ValueError(f"renderer styles must be [B, {self.n_codes}, {self.style_dim}], got {tuple(styles.shape)}")
        texture_depth = len(self.network[0].texture_linears)
        per_layer = expand_codes(styles, self.depth, texture_depth)  # [B, K, L, D]

        def folded(nets, region_codes):
            layers = [list(net.shape_linears) + list(net.texture_linears) for net in nets]
            weights, biases = [], []
            for l in range(len(layers[0])):
                ws, bs = [], []
                for k, net_layers in enumerate(layers):
                    layer = net_layers[l]
                    gamma, beta = layer.modulation(region_codes[:, k, l])  # [B, 1, C] each
                    gamma, beta = gamma[:, 0], beta[:, 0]
                    ws.append(gamma.unsqueeze(-1) * layer.weight)
                    bs.append(gamma * layer.bias + beta)
                weights.append(torch.stack(ws, 1))  # [B, K, C, Cin]
                biases.append(torch.stack(bs, 1))   # [B, K, C]
            return weights, biases

        weights, biases = folded(self.network, per_layer)
        heads = []
        for name in ("mask_linears", "feature_linear", "rgb_linear", "sdf_linear"):
            mods = [getattr(net, name) for net in self.network]
            assert all(m.scale == 1.0 and m.offset == 0.0 for m in mods)
            heads += [torch.stack([m.weight for m in mods]), torch.stack([m.bias for m in mods])]
        with torch.no_grad():  # the initial SDF network only supplies a fixed base shape
            init_w, init_b = folded([self.init_network], per_layer[:, :1])
            init_head = (self.init_network.sdf_linear.weight.unsqueeze(0), self.init_network.sdf_linear.bias.unsqueeze(0))
        return weights + biases + heads + [self.sigmoid_beta], (init_w, init_b, init_head)

    def _fast_unpack(self, tensors):
        n_layers = (len(tensors) - 9) // 2
        names = ("mask_w", "mask_b", "feat_w", "feat_b", "rgb_w", "rgb_b", "sdf_w", "sdf_b", "beta")
        out = dict(zip(names, tensors[2 * n_layers:]))
        out["w"], out["b"] = list(tensors[:n_layers]), list(tensors[n_layers:2 * n_layers])
        return out

    @staticmethod
    def _trunk(weights, biases, xt, tap):
        """SIREN trunk on points xt [3, P]: returns (output after layer `tap`, final output),
        activations [K, C, P]. (The eikonal path uses _SirenEikonal, which also keeps the cosines.)"""
        k, c = weights[0].shape[:2]
        # Without a graph the pre-activation is dead after sin: overwrite it instead of allocating
        # another [K, C, P] buffer (less memory traffic on the CPU, same values).
        in_place = not (torch.is_grad_enabled() and (xt.requires_grad or any(w.requires_grad for w in weights)))
        act = perf_utils.sin_ if in_place else torch.sin
        a = torch.addmm(biases[0].reshape(k * c, 1), weights[0].reshape(k * c, 3), xt).view(k, c, -1)
        h = act(a)
        tapped = h if tap == 1 else None
        for l in range(1, len(weights)):
            h = act(torch.baddbmm(biases[l].unsqueeze(-1), weights[l], h))
            if l + 1 == tap:
                tapped = h
        return tapped, h

    def _fast_chunks(self, spec, chunk=None):
        n_rays = spec.rays_o.shape[1]
        chunk = chunk or spec.chunk
        for b in range(spec.rays_o.shape[0]):
            for start in range(0, n_rays, chunk):
                yield b, slice(start, start + chunk)

    def _fast_chunk(self, spec, tensors, b, sl, lean=False):
        """Render rays `sl` of image `b`; returns {key: tensor [n, ...]} for spec.keys (and sdf0).
        `lean`: a graph built here is to be kept until backward (see _SirenEikonal)."""
        p = self._fast_unpack(tensors)
        rays_o, rays_d, viewdirs = spec.rays_o[b, sl], spec.rays_d[b, sl], spec.viewdirs[b, sl]
        z = spec.z[b, sl]
        n, s = z.shape
        pts = rays_o.unsqueeze(-2) + rays_d.unsqueeze(-2) * z.unsqueeze(-1)  # [n, S, 3]
        span = (spec.far[b, sl] - spec.near[b, sl]).unsqueeze(-1)  # [n, 1, 1]
        x = pts * 2 / span if self.z_normalize else pts
        xt = x.reshape(n * s, 3).t()
        eikonal = "eikonal" in spec.keys
        weights_b = [w[b] for w in p["w"]]
        if eikonal:
            h_shape, h, grad_x = _SirenEikonal.apply(xt, self.depth, lean, *weights_b, *[v[b] for v in p["b"]],
                                                     p["sdf_w"])
        else:
            h_shape, h = self._trunk(weights_b, [v[b] for v in p["b"]], xt, self.depth)
        k, c = h.shape[:2]

        if spec.sdf0 is not None:
            sdf0 = spec.sdf0[b, sl].reshape(1, n * s)
        else:
            with torch.no_grad():
                init_w, init_b, (init_sw, init_sb) = spec.init
                _, h0 = self._trunk([w[b] for w in init_w], [v[b] for v in init_b], xt, 0)
                sdf0 = torch.baddbmm(init_sb.unsqueeze(-1), init_sw, h0)[0]  # [1, P]
                del h0

        vt = viewdirs.t()  # [3, n]; the view-direction part of a head is constant along a ray
        mask_w, feat_w, feat_b, rgb_w = p["mask_w"], p["feat_w"], p["feat_b"], p["rgb_w"]
        mask = torch.baddbmm(p["mask_b"].unsqueeze(-1), mask_w[:, :, :c], h_shape).view(k, n, s)
        mask = mask + torch.matmul(mask_w[:, :, c:], vt).view(k, n, 1)  # [K, n, S]
        delta_sdf = torch.baddbmm(p["sdf_b"].unsqueeze(-1), p["sdf_w"], h).sum(0)  # [1, P]
        sdf = (sdf0 + delta_sdf).reshape(n, s, 1)
        noise = spec.noise[b, sl] if spec.noise is not None else None
        weights = self._weights(sdf.unsqueeze(0), z.unsqueeze(0), rays_d.unsqueeze(0), noise=noise,
                                beta=p["beta"])[0]  # [n, S, 1]

        # The feature and colour heads are linear, so they are applied where they cost least (same
        # values up to rounding): rgb_k = W_c (W_f [h; v] + b_f) + b_c uses the composed 3×C matrix
        # W_c W_f per sample instead of the C×C feature layer, and the rendered features
        # Σ_i w_i Σ_k m_k,i f_k,i = Σ_k W_f (Σ_i w_i m_k,i [h_k,i; v]) + b_f Σ_i w_i m_k,i apply W_f
        # once per ray to the weighted sum of h instead of once per sample.
        view_term = torch.matmul(feat_w[:, :, c:], vt) + feat_b.unsqueeze(-1)  # [K, C, n]
        rgb = torch.bmm(torch.bmm(rgb_w, feat_w[:, :, :c]), h).view(k, 3, n, s)
        rgb = rgb + (torch.bmm(rgb_w, view_term) + p["rgb_b"].unsqueeze(-1)).unsqueeze(-1)  # [K, 3, n, S]
        color = (mask.unsqueeze(1) * rgb).sum(0)  # [3, n, S]
        weighted_mask = mask * weights.view(1, n, s)  # [K, n, S]
        seg = weighted_mask.sum(-1)  # [K, n]
        out = {"rgb": -1 + 2 * torch.sum(weights * torch.sigmoid(color.permute(1, 2, 0)), -2),
               "seg": seg.t()}
        if "features" in spec.keys:
            chosen = slice(None) if spec.selected is None else spec.selected
            pooled = (h.view(k, c, n, s)[chosen] * weighted_mask[chosen].unsqueeze(1)).sum(-1)  # [K', C, n]
            features = torch.bmm(feat_w[chosen, :, :c], pooled) + view_term[chosen] * seg[chosen].unsqueeze(1)
            out["features"] = features.sum(0).t()
        if "sdf" in spec.keys:
            out["sdf"] = sdf
        if "xyz" in spec.keys:
            out["xyz"] = torch.sum(weights * pts, -2)
            out["mask"] = weights[..., -1, :]
        if eikonal:
            # ∂(Σ_k Δsdf_k)/∂x from the trunk's reverse pass, then ∂x/∂pts = 2/(far-near).
            grad = grad_x.t().reshape(n, s, 3)
            out["eikonal"] = grad / span * 2 if self.z_normalize else grad
        out["_sdf0"] = sdf0.reshape(n, s, 1)
        return out

    def _fast_all(self, spec, tensors, keep_sdf0=False, chunk=None, keep=0):
        """Every chunk without a graph, written into [B, N, ...] per key (sdf0 kept in spec if asked).
        Chunks write straight into the outputs: thousands of small per-chunk results kept alive
        until a final concatenation fragmented the heap (measured: up to +400 MiB peak at 512 px).
        With `keep`, the first `keep` chunks are rendered with a (lean) graph instead, returned as
        a list of their outputs: (outputs, kept graphs)."""
        keys = list(spec.keys) + (["_sdf0"] if keep_sdf0 else [])
        chunks = list(self._fast_chunks(spec, chunk))
        batch, n_rays = spec.rays_o.shape[:2]
        merged = {}
        kept = [None] * min(keep, len(chunks))
        allocate = threading.Lock()

        def render(item):
            j, (b, sl) = item
            # grad mode is per thread
            with (torch.enable_grad() if j < len(kept) else torch.no_grad()):
                out = self._fast_chunk(spec, tensors, b, sl, lean=True)
            with allocate:
                for key in keys:
                    if key not in merged:
                        merged[key] = out[key].new_empty((batch, n_rays) + out[key].shape[1:])
            for key in keys:
                merged[key][b, sl] = out[key].detach()
            if j < len(kept):
                kept[j] = out

        perf_utils.map_in_threads(render, enumerate(chunks), spec.rays_o.device)
        if keep_sdf0:
            spec.sdf0 = merged.pop("_sdf0")
        outs = [merged[key] for key in spec.keys]
        return (outs, kept) if keep else outs

    def _forward_fast(self, cam_poses, focal, near, far, styles, return_eikonal=False, return_sdf=None,
                      return_xyz=None, semantics=None, ray_chunk=None):
        return_sdf = self.return_sdf if return_sdf is None else return_sdf
        return_xyz = self.return_xyz if return_xyz is None else return_xyz
        batch = cam_poses.shape[0]
        rays_o, rays_d, viewdirs, near_r, far_r = self._rays(cam_poses, focal, near, far)
        tensors, init = self._fast_params(styles)
        on_cpu = rays_o.device.type == "cpu"
        points = self.fast_points or (1024 if on_cpu else 65536)
        # Re-rendering with a graph keeps ~20 activations of [K, C, P] per chunk: smaller chunks.
        grad_points = self.fast_grad_points or (1536 if on_cpu else 16384)
        chunk = ray_chunk if ray_chunk else max(1, points // self.N_samples)
        grad_chunk = ray_chunk if ray_chunk else max(1, grad_points // self.N_samples)
        # Depths (and raw noise) for the whole image at once, so that re-rendering a chunk for the
        # gradients sees exactly the samples of the forward pass.
        t_vals = self.t_vals.to(rays_o.dtype)
        perturb = self.perturb if (self.training and not self.test) else 0.0
        z = depths_along_rays(t_vals, near_r, far_r, perturb, self.offset_sampling)
        noise = None
        if self.raw_noise_std > 0 and self.training:
            noise = torch.randn(z.shape + (1,), dtype=z.dtype, device=z.device) * self.raw_noise_std
        keys = ["rgb", "seg"] + (["features"] if self.output_features else []) + (["sdf"] if return_sdf else [])
        keys += (["eikonal"] if return_eikonal else []) + (["xyz", "mask"] if return_xyz else [])
        region_weights = self._semantic_weights(semantics, rays_o)
        selected = None if region_weights is None else torch.nonzero(region_weights).flatten().tolist()
        spec = _FastSpec(rays_o=rays_o.detach(), rays_d=rays_d.detach(), viewdirs=viewdirs.detach(),
                         near=near_r.detach(), far=far_r.detach(), z=z, noise=noise, init=init,
                         selected=selected, keys=keys, chunk=chunk, grad_chunk=grad_chunk, sdf0=None, keep=0)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            keep_mib = self.fast_keep_mib
            if keep_mib is None:
                keep_mib = perf_utils.keep_mib_setting(2048) if on_cpu else 0
            # A kept chunk holds about 2 [K, C, P] activations per trunk layer (sin and cos, or the
            # pre-activation and sin without the eikonal term); +10 % for the heads' graph.
            per_chunk = (2.2 * self.network[0].num_styles * self.n_render * self.width * z.element_size()
                         * grad_chunk * self.N_samples)
            spec.keep = int(keep_mib * 2 ** 20 // per_chunk)
            outs = _FastRender.apply(self, spec, *tensors)
        else:
            outs = self._fast_all(spec, tensors)
        return self._to_images(dict(zip(keys, outs)), batch)

    # --------------------------------------------------------------------------- sphere init
    def mlp_init_pass(self, cam_poses, focal, near, far, styles):
        """Initial SDF network's sdf at stratified samples, and the target sphere |p| - (far-near)/4."""
        rays_o, rays_d, _, near_r, far_r = self._rays(cam_poses, focal, near, far)
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

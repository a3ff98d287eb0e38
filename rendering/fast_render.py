"""The fast render path of VolumeFeatureRenderer (its default; `render_path: reference` is the plain one).

All region MLPs run as one batched matmul per layer ([K, C, P] activations, points last), with FiLM
folded into the weights once per image: γ ⊙ (W h + b) + β = (γ W) h + (γ b + β). The eikonal term is
the hand-written reverse pass of the SIREN trunk (SirenEikonal, first-order only), so gradients of
losses that use it need plain backward, not double backward. With gradients needed, FastRender renders
without a graph and, in backward, re-renders chunk by chunk and accumulates the parameter gradients:
memory stays at one chunk's graph. The renderer's parameters, options and shared steps (rays, weights,
images) stay on VolumeFeatureRenderer; every function here takes it as `renderer`.
"""
import threading

import torch

from common import perf_utils
from rendering.camera import depths_along_rays


class SirenEikonal(torch.autograd.Function):
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
        # Mixed precision (common/precision.py): the first layer is in xt's dtype, the hidden layers
        # and w_sdf may come in bf16; then every [K, C, P] activation is kept in bf16. Same dtype:
        # the .to() calls return their argument.
        low = weights[-1].dtype
        a = torch.addmm(biases[0].reshape(k * c, 1), weights[0].reshape(k * c, 3), xt).view(k, c, -1)
        hs, cs = [], []
        for i in range(n_layers):
            if i:
                a = torch.baddbmm(biases[i].unsqueeze(-1), weights[i], hs[-1])
            # Inside an autograd.Function's forward: no graph, so perf_utils' faster sin/cos apply;
            # the pre-activation is not needed any more, so sin works in place.
            cs.append(perf_utils.cos(a).to(low))
            hs.append(perf_utils.sin_(a).to(low))
        del a
        deltas, us = SirenEikonal._reverse(weights, w_sdf, cs)
        grad_x = torch.mm(weights[0].reshape(k * c, 3).t(), deltas[0].reshape(k * c, -1).to(xt.dtype))
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
            deltas, us = SirenEikonal._reverse(weights, w_sdf, cs)
        else:
            deltas, us = rest[2 * n:3 * n], (None,) + tuple(rest[3 * n:])
        k, c, p = hs[0].shape
        low, master = weights[-1].dtype, xt.dtype  # see forward
        g_w = [None] * n
        g_b = [None] * n
        g_wsdf = None
        g_cos = [None] * n
        if g_x is not None:
            # g = W_0ᵀ δ_0;  δ_i = u_{i+1} ⊙ cos_i;  u_{i+1} = W_{i+1}ᵀ δ_{i+1};  δ_{L-1} = w_sdf ⊙ cos_{L-1}
            g_w[0] = torch.mm(deltas[0].reshape(k * c, p).to(master), g_x.t()).view(k, c, 3)
            g_delta = torch.mm(weights[0].reshape(k * c, 3), g_x).view(k, c, p).to(low)
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
                g_a = g_a.to(master)
                g_w0 = torch.mm(g_a.reshape(k * c, p), xt.t()).view(k, c, 3)
            else:
                g_w0 = torch.bmm(g_a, hs[i - 1].transpose(1, 2))
            g_w[i] = g_w0 if g_w[i] is None else g_w[i] + g_w0
            g_b[i] = g_a.sum(-1)
            g_h = torch.bmm(weights[i].transpose(1, 2), g_a) if i > 0 else None
        return (None, None, None, *g_w, *g_b, g_wsdf)


class FastSpec:
    """Everything a fast render needs besides the differentiable tensors (rays, depths, flags)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class FastRender(torch.autograd.Function):
    """Renders without a graph; backward re-renders chunk by chunk and accumulates the gradients of
    the folded weights, heads and sigmoid_beta (exact: the outputs are per-ray, chunks are disjoint).

    The first `spec.keep` chunks instead keep their graph from the forward pass (lean: sines and
    cosines only, see SirenEikonal), so backward does not render them a second time; spec.keep is
    set by a memory budget (--keep_graph_mib, perf_utils.default_keep_mib). Backward goes through the chunks
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
            outs, ctx.kept = render_all(renderer, spec, ctx.leaves, keep_sdf0=True, chunk=spec.grad_chunk,
                                        keep=spec.keep)
        else:
            outs, ctx.kept = render_all(renderer, spec, ctx.leaves, keep_sdf0=True), []
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
                    out = render_chunk(renderer, spec, leaves, b, sl)
                return torch.autograd.grad([out[key] for key, _ in pairs], [leaves[i] for i in wanted],
                                           [g for _, g in pairs], allow_unused=True)

        items = enumerate(chunks(spec, spec.grad_chunk))
        for got in perf_utils.imap_in_threads(chunk_grads, items, spec.rays_o.device):
            if got is None:
                continue
            for i, g in zip(wanted, got):
                if g is not None:
                    totals[i] = g if totals[i] is None else totals[i] + g
        ctx.kept = []  # consumed; a second backward (retain_graph) re-renders every chunk
        return (None, None, *totals)


def folded_params(renderer, styles):
    """Flat list of per-image folded trunk weights + stacked heads + sigmoid_beta (with autograd),
    and the initial SDF network's folded trunk + sdf head (without)."""
    per_layer = renderer.layer_codes(styles)  # [B, K, L, D]

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

    weights, biases = folded(renderer.network, per_layer)
    heads = []
    for name in ("mask_linears", "feature_linear", "rgb_linear", "sdf_linear"):
        mods = [getattr(net, name) for net in renderer.network]
        assert all(m.scale == 1.0 and m.offset == 0.0 for m in mods)
        heads += [torch.stack([m.weight for m in mods]), torch.stack([m.bias for m in mods])]
    with torch.no_grad():  # the initial SDF network only supplies a fixed base shape
        init_w, init_b = folded([renderer.init_network], per_layer[:, :1])
        init_head = (renderer.init_network.sdf_linear.weight.unsqueeze(0), renderer.init_network.sdf_linear.bias.unsqueeze(0))
    return weights + biases + heads + [renderer.sigmoid_beta], (init_w, init_b, init_head)

def unpack(tensors):
    n_layers = (len(tensors) - 9) // 2
    names = ("mask_w", "mask_b", "feat_w", "feat_b", "rgb_w", "rgb_b", "sdf_w", "sdf_b", "beta")
    out = dict(zip(names, tensors[2 * n_layers:]))
    out["w"], out["b"] = list(tensors[:n_layers]), list(tensors[n_layers:2 * n_layers])
    return out

def trunk(weights, biases, xt, tap):
    """SIREN trunk on points xt [3, P]: returns (output after layer `tap`, final output),
    activations [K, C, P]. (The eikonal path uses SirenEikonal, which also keeps the cosines.)
    Hidden layers given in bf16 (mixed precision) make every activation after the first layer's sine bf16."""
    k, c = weights[0].shape[:2]
    # Without a graph the pre-activation is dead after sin: overwrite it instead of allocating
    # another [K, C, P] buffer (less memory traffic on the CPU, same values).
    in_place = not (torch.is_grad_enabled() and (xt.requires_grad or any(w.requires_grad for w in weights)))
    act = perf_utils.sin_ if in_place else torch.sin
    a = torch.addmm(biases[0].reshape(k * c, 1), weights[0].reshape(k * c, 3), xt).view(k, c, -1)
    h = act(a).to(weights[-1].dtype)
    tapped = h if tap == 1 else None
    for l in range(1, len(weights)):
        h = act(torch.baddbmm(biases[l].unsqueeze(-1), weights[l], h))
        if l + 1 == tap:
            tapped = h
    return tapped, h

def balanced_chunk(n_rays, chunk):
    """The chunk size that splits `n_rays` into as many chunks as `chunk` does, but evenly: no last
    chunk that is a sliver (4096 rays in chunks of 682: six of 586 and one of 580, not six of 682 and
    one of 4, whose launches would cost as much as a full chunk's)."""
    count = -(-n_rays // chunk)
    return -(-n_rays // count)


def chunks(spec, chunk=None):
    n_rays = spec.rays_o.shape[1]
    chunk = chunk or spec.chunk
    for b in range(spec.rays_o.shape[0]):
        for start in range(0, n_rays, chunk):
            yield b, slice(start, start + chunk)

def render_chunk(renderer, spec, tensors, b, sl, lean=False):
    """Render rays `sl` of image `b`; returns {key: tensor [n, ...]} for spec.keys (and sdf0).
    `lean`: a graph built here is to be kept until backward (see SirenEikonal)."""
    p = unpack(tensors)
    rays_o, rays_d, viewdirs = spec.rays_o[b, sl], spec.rays_d[b, sl], spec.viewdirs[b, sl]
    z = spec.z[b, sl]
    n, s = z.shape
    pts = rays_o.unsqueeze(-2) + rays_d.unsqueeze(-2) * z.unsqueeze(-1)  # [n, S, 3]
    span = (spec.far[b, sl] - spec.near[b, sl]).unsqueeze(-1)  # [n, 1, 1]
    x = pts * 2 / span if renderer.z_normalize else pts
    xt = x.reshape(n * s, 3).t()
    eikonal = "eikonal" in spec.keys
    # Mixed precision (common/precision.py): the hidden layers and the heads' matmuls take bf16
    # operands; the first layer, Δsdf and everything after the heads stay in the leaves' dtype.
    low = (lambda t: t) if spec.dtype is None else (lambda t: t.to(spec.dtype))
    weights_b = [w[b] for w in p["w"]]
    weights_b = weights_b[:1] + [low(w) for w in weights_b[1:]]
    biases_b = [v[b] for v in p["b"]]
    biases_b = biases_b[:1] + [low(v) for v in biases_b[1:]]
    if eikonal:
        h_shape, h, grad_x = SirenEikonal.apply(xt, renderer.depth, lean, *weights_b, *biases_b, low(p["sdf_w"]))
    else:
        h_shape, h = trunk(weights_b, biases_b, xt, renderer.depth)
    k, c = h.shape[:2]
    master = xt.dtype

    if spec.sdf0 is not None:
        sdf0 = spec.sdf0[b, sl].reshape(1, n * s)
    else:
        with torch.no_grad():
            init_w, init_b, (init_sw, init_sb) = spec.init
            init_wb = [w[b] for w in init_w]
            init_bb = [v[b] for v in init_b]
            _, h0 = trunk(init_wb[:1] + [low(w) for w in init_wb[1:]], init_bb[:1] + [low(v) for v in init_bb[1:]],
                          xt, 0)
            sdf0 = torch.baddbmm(init_sb.unsqueeze(-1), init_sw, h0.to(master))[0]  # [1, P]
            del h0

    vt = viewdirs.t()  # [3, n]; the view-direction part of a head is constant along a ray
    mask_w, feat_w, feat_b, rgb_w = p["mask_w"], p["feat_w"], p["feat_b"], p["rgb_w"]
    mask = torch.baddbmm(low(p["mask_b"]).unsqueeze(-1), low(mask_w[:, :, :c]), h_shape).view(k, n, s).to(master)
    mask = mask + torch.matmul(mask_w[:, :, c:], vt).view(k, n, 1)  # [K, n, S]
    delta_sdf = torch.baddbmm(p["sdf_b"].unsqueeze(-1), p["sdf_w"], h.to(master)).sum(0)  # [1, P]
    sdf = (sdf0 + delta_sdf).reshape(n, s, 1)
    noise = spec.noise[b, sl] if spec.noise is not None else None
    weights = renderer.volume_weights(sdf.unsqueeze(0), z.unsqueeze(0), rays_d.unsqueeze(0), noise=noise,
                                      beta=p["beta"])[0]  # [n, S, 1]

    # The feature and colour heads are linear, so they are applied where they cost least (same
    # values up to rounding): rgb_k = W_c (W_f [h; v] + b_f) + b_c uses the composed 3×C matrix
    # W_c W_f per sample instead of the C×C feature layer, and the rendered features
    # Σ_i w_i Σ_k m_k,i f_k,i = Σ_k W_f (Σ_i w_i m_k,i [h_k,i; v]) + b_f Σ_i w_i m_k,i apply W_f
    # once per ray to the weighted sum of h instead of once per sample.
    view_term = torch.matmul(feat_w[:, :, c:], vt) + feat_b.unsqueeze(-1)  # [K, C, n]
    rgb = torch.bmm(low(torch.bmm(rgb_w, feat_w[:, :, :c])), h).view(k, 3, n, s).to(master)
    rgb = rgb + (torch.bmm(rgb_w, view_term) + p["rgb_b"].unsqueeze(-1)).unsqueeze(-1)  # [K, 3, n, S]
    color = (mask.unsqueeze(1) * rgb).sum(0)  # [3, n, S]
    weighted_mask = mask * weights.view(1, n, s)  # [K, n, S]
    seg = weighted_mask.sum(-1)  # [K, n]
    out = {"rgb": -1 + 2 * torch.sum(weights * torch.sigmoid(color.permute(1, 2, 0)), -2),
           "seg": seg.t()}
    if "features" in spec.keys:
        chosen = slice(None) if spec.selected is None else spec.selected
        pooled = (h.view(k, c, n, s)[chosen] * low(weighted_mask[chosen]).unsqueeze(1)).sum(-1).to(master)  # [K', C, n]
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
        out["eikonal"] = grad / span * 2 if renderer.z_normalize else grad
    out["_sdf0"] = sdf0.reshape(n, s, 1)
    return out

def render_all(renderer, spec, tensors, keep_sdf0=False, chunk=None, keep=0):
    """Every chunk without a graph, written into [B, N, ...] per key (sdf0 kept in spec if asked).
    Chunks write straight into the outputs: thousands of small per-chunk results kept alive
    until a final concatenation fragmented the heap (measured: up to +400 MiB peak at 512 px).
    With `keep`, the first `keep` chunks are rendered with a (lean) graph instead, returned as
    a list of their outputs: (outputs, kept graphs)."""
    keys = list(spec.keys) + (["_sdf0"] if keep_sdf0 else [])
    items = list(chunks(spec, chunk))
    batch, n_rays = spec.rays_o.shape[:2]
    merged = {}
    kept = [None] * min(keep, len(items))
    allocate = threading.Lock()

    def render(item):
        j, (b, sl) = item
        # grad mode is per thread
        with (torch.enable_grad() if j < len(kept) else torch.no_grad()):
            out = render_chunk(renderer, spec, tensors, b, sl, lean=True)
        with allocate:
            for key in keys:
                if key not in merged:
                    merged[key] = out[key].new_empty((batch, n_rays) + out[key].shape[1:])
        for key in keys:
            merged[key][b, sl] = out[key].detach()
        if j < len(kept):
            kept[j] = out

    perf_utils.map_in_threads(render, enumerate(items), spec.rays_o.device)
    if keep_sdf0:
        spec.sdf0 = merged.pop("_sdf0")
    outs = [merged[key] for key in spec.keys]
    return (outs, kept) if keep else outs

def forward(renderer, cam_poses, focal, near, far, styles, return_eikonal=False, return_sdf=None,
            return_xyz=None, semantics=None, ray_chunk=None, compute_dtype=None):
    """The fast render; `compute_dtype` (bf16, or None: the weights' dtype) is the dtype of the trunk's
    hidden layers and heads (common/precision.py)."""
    return_sdf = renderer.return_sdf if return_sdf is None else return_sdf
    return_xyz = renderer.return_xyz if return_xyz is None else return_xyz
    batch = cam_poses.shape[0]
    rays_o, rays_d, viewdirs, near_r, far_r = renderer.rays(cam_poses, focal, near, far)
    tensors, init = folded_params(renderer, styles)
    on_cpu = rays_o.device.type == "cpu"
    points = renderer.fast_points or (1024 if on_cpu else 65536)
    # Re-rendering with a graph keeps ~20 activations of [K, C, P] per chunk: smaller chunks.
    grad_points = renderer.fast_grad_points or (1536 if on_cpu else 16384)
    chunk = ray_chunk if ray_chunk else max(1, points // renderer.N_samples)
    grad_chunk = ray_chunk if ray_chunk else max(1, grad_points // renderer.N_samples)
    if not on_cpu:
        # Even chunks on an accelerator, where a sliver costs a full chunk's kernel launches. The CPU
        # keeps the plain split: the gradients are summed over chunks, so another split would change
        # the last bits of pinned float32/float64 results (the conformance checks, the tests).
        n_rays = rays_o.shape[1]
        chunk, grad_chunk = balanced_chunk(n_rays, chunk), balanced_chunk(n_rays, grad_chunk)
    # Depths (and raw noise) for the whole image at once, so that re-rendering a chunk for the
    # gradients sees exactly the samples of the forward pass.
    t_vals = renderer.t_vals.to(rays_o.dtype)
    perturb = renderer.perturb if (renderer.training and not renderer.test) else 0.0
    z = depths_along_rays(t_vals, near_r, far_r, perturb, renderer.offset_sampling)
    noise = None
    if renderer.raw_noise_std > 0 and renderer.training:
        noise = torch.randn(z.shape + (1,), dtype=z.dtype, device=z.device) * renderer.raw_noise_std
    keys = ["rgb", "seg"] + (["features"] if renderer.output_features else []) + (["sdf"] if return_sdf else [])
    keys += (["eikonal"] if return_eikonal else []) + (["xyz", "mask"] if return_xyz else [])
    region_weights = renderer.semantic_weights(semantics, rays_o)
    selected = None if region_weights is None else torch.nonzero(region_weights).flatten().tolist()
    spec = FastSpec(rays_o=rays_o.detach(), rays_d=rays_d.detach(), viewdirs=viewdirs.detach(),
                    near=near_r.detach(), far=far_r.detach(), z=z, noise=noise, init=init,
                    selected=selected, keys=keys, chunk=chunk, grad_chunk=grad_chunk, sdf0=None, keep=0,
                    dtype=compute_dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        keep_mib = renderer.fast_keep_mib
        if keep_mib is None:
            keep_mib = perf_utils.default_keep_mib(rays_o.device)
        # A kept chunk holds about 2 [K, C, P] activations per trunk layer (sin and cos, or the
        # pre-activation and sin without the eikonal term); +10 % for the heads' graph.
        # (In the weights' dtype also under bf16: then as many chunks are kept, in half the memory.)
        per_chunk = (2.2 * renderer.network[0].num_styles * renderer.n_render * renderer.width * z.element_size()
                     * grad_chunk * renderer.N_samples)
        spec.keep = int(keep_mib * 2 ** 20 // per_chunk)
        outs = FastRender.apply(renderer, spec, *tensors)
    else:
        outs = render_all(renderer, spec, tensors)
    return renderer.to_images(dict(zip(keys, outs)), batch)

"""CNeRF generator and discriminators (SPEC §6, §8-10): renderer mapping network, compositional
volume renderer, StyleGAN2 decoder, and the stage-1 global / semantic and stage-2 discriminators.

Parameter and buffer names follow the published checkpoint (reference/state_dict_layout.json).
"""
import math

import torch
import torch.nn.functional as F
from munch import Munch
from torch import nn

from common import draws
from op import FusedLeakyReLU, fused_leaky_relu, upfirdn2d
from volume_renderer import VolumeFeatureRenderer

# ----------------------------------------------------------------------------- StyleGAN2 blocks


def make_kernel(k):
    k = torch.tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    """2× upsampling with the blur kernel (skips of ToRGB/ToSeg)."""

    def __init__(self, kernel, factor=2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, down=1, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, kernel, pad, upsample_factor=1):
        super().__init__()
        kernel = make_kernel(kernel)
        if upsample_factor > 1:
            kernel = kernel * upsample_factor ** 2
        self.register_buffer("kernel", kernel)
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualConv2d(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, in_dim, out_dim, bias=True, bias_init=0, lr_mul=1, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x):
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias=bias)


class MappingLinear(nn.Module):
    """Renderer mapping layer: leaky_relu(W z + b, 0.2) with gain 1."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        weight = torch.empty(out_dim, in_dim)
        nn.init.kaiming_normal_(weight, a=0.2, mode="fan_in", nonlinearity="leaky_relu")
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.empty(out_dim).uniform_(-math.sqrt(1 / in_dim), math.sqrt(1 / in_dim)))

    def forward(self, x):
        return fused_leaky_relu(F.linear(x, self.weight), self.bias, negative_slope=0.2, scale=1)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, demodulate=True, upsample=False,
                 downsample=False, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.downsample = downsample
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate

    def forward(self, x, style):
        batch, in_channel, height, width = x.shape
        style = self.modulation(style).view(batch, 1, in_channel, 1, 1)
        weight = self.scale * self.weight * style
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
            weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)
        k = self.kernel_size
        if self.upsample:
            x = x.reshape(1, batch * in_channel, height, width)
            weight = weight.transpose(1, 2).reshape(batch * in_channel, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = self.blur(out.view(batch, self.out_channel, out.shape[2], out.shape[3]))
        elif self.downsample:
            x = self.blur(x)
            x = x.reshape(1, batch * in_channel, x.shape[2], x.shape[3])
            out = F.conv2d(x, weight.view(batch * self.out_channel, in_channel, k, k), padding=0, stride=2, groups=batch)
            out = out.view(batch, self.out_channel, out.shape[2], out.shape[3])
        else:
            x = x.reshape(1, batch * in_channel, height, width)
            out = F.conv2d(x, weight.view(batch * self.out_channel, in_channel, k, k), padding=self.padding, groups=batch)
            out = out.view(batch, self.out_channel, out.shape[2], out.shape[3])
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image, noise=None):
        if noise is None:
            noise = draws.current().decoder_noise(image)
        return image + self.weight * noise


class StyledConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False, blur_kernel=(1, 3, 3, 1),
                 demodulate=True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, demodulate=demodulate,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        # In the published state dicts but unused by forward (using it would change the outputs).
        self.bias = nn.Parameter(torch.zeros(1, out_channel, 1, 1))
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style, noise=None):
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    """1×1 modulated conv (no demodulation) + bias, plus the (upsampled) skip."""

    def __init__(self, in_channel, out_channel, style_dim, upsample=True, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.has_upsample = upsample
        self.conv = ModulatedConv2d(in_channel, out_channel, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, out_channel, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            if self.has_upsample:
                skip = self.upsample(skip)
            out = out + skip
        return out


class ConvLayer(nn.Sequential):
    def __init__(self, in_channel, out_channel, kernel_size, downsample=False, blur_kernel=(1, 3, 3, 1), bias=True,
                 activate=True):
        layers = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, padding=padding, stride=stride,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_channel, out_channel, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, activate=False, bias=False)

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return (out + self.skip(x)) / math.sqrt(2)


def decoder_channels(channel_multiplier):
    m = channel_multiplier
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * m, 128: 128 * m, 256: 64 * m, 512: 32 * m, 1024: 16 * m}


# ------------------------------------------------------------------------------------- decoder


class Decoder(nn.Module):
    """StyleGAN2 upsampler from the renderer's R×R features to `size`, with an RGB and a seg branch."""

    def __init__(self, model_opt, n_seg=9, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.size = model_opt.size
        self.style_dim = 2 * model_opt.style_dim
        in_res = model_opt.renderer_spatial_output_dim
        layers = [PixelNorm(), EqualLinear(model_opt.style_dim, self.style_dim, lr_mul=model_opt.lr_mapping,
                                           activation="fused_lrelu")]
        layers += [EqualLinear(self.style_dim, self.style_dim, lr_mul=model_opt.lr_mapping, activation="fused_lrelu")
                   for _ in range(4)]
        self.style = nn.Sequential(*layers)

        self.channels = decoder_channels(model_opt.channel_multiplier)
        self.log_size = int(math.log2(self.size))
        self.input_log = int(math.log2(in_res))
        self.conv1 = StyledConv(256, self.channels[in_res], 3, self.style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(self.channels[in_res], 3, self.style_dim, upsample=False)
        self.to_seg1 = ToRGB(self.channels[in_res], n_seg, self.style_dim, upsample=False)
        self.num_layers = (self.log_size - self.input_log) * 2 + 1
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.to_segs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 2 * self.input_log + 1) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2 ** res, 2 ** res))
        in_channel = self.channels[in_res]
        for i in range(self.input_log + 1, self.log_size + 1):
            out_channel = self.channels[2 ** i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, self.style_dim, upsample=True,
                                         blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, self.style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, 3, self.style_dim))
            self.to_segs.append(ToRGB(out_channel, n_seg, self.style_dim))
            in_channel = out_channel
        self.n_latent = (self.log_size - self.input_log) * 2 + 2

    def mean_latent(self, renderer_latent):
        return self.style(renderer_latent).mean(0, keepdim=True)

    def get_latent(self, x):
        return self.style(x)

    def styles_to_latents(self, styles, inject_index=None, truncation=1, truncation_latent=None,
                          input_is_latent=False):
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if truncation < 1:
            styles = [truncation_latent[1] + truncation * (s - truncation_latent[1]) for s in styles]
        if len(styles) < 2:
            latent = styles[0].unsqueeze(1).repeat(1, self.n_latent, 1) if styles[0].ndim < 3 else styles[0]
        else:
            if inject_index is None:
                inject_index = draws.current().inject_index(self.n_latent)
            latent = torch.cat([styles[0].unsqueeze(1).repeat(1, inject_index, 1),
                                styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)], 1)
        return latent

    def forward(self, features, styles, seg_low=None, return_latents=False, inject_index=None, truncation=1,
                truncation_latent=None, input_is_latent=False, noise=None, randomize_noise=True):
        latent = self.styles_to_latents(styles, inject_index, truncation, truncation_latent, input_is_latent)
        if noise is None:
            noise = ([None] * self.num_layers if randomize_noise
                     else [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)])
        out = self.conv1(features, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        seg_skip = self.to_seg1(out, latent[:, 1], skip=seg_low)
        i = 1
        for conv_up, conv, to_rgb, to_seg, n1, n2 in zip(self.convs[::2], self.convs[1::2], self.to_rgbs,
                                                         self.to_segs, noise[1::2], noise[2::2]):
            out = conv_up(out, latent[:, i], noise=n1)
            out = conv(out, latent[:, i + 1], noise=n2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            seg_skip = to_seg(out, latent[:, i + 2], seg_skip)
            i += 2
        return skip, seg_skip, (latent if return_latents else None)


# ------------------------------------------------------------------------------------ generator


def _opt(opt):
    return opt if isinstance(opt, Munch) else Munch(opt)


class Generator(nn.Module):
    """Renderer mapping + compositional renderer (+ feature transfer and decoder when full_pipeline).

    Latent layout: per image 2K codes (`n_latent` = 18): code 2k is region k's shape code, 2k+1
    its texture code.
    """

    def __init__(self, model_opt, renderer_opt, blur_kernel=(1, 3, 3, 1), ema=False, full_pipeline=True):
        super().__init__()
        model_opt, renderer_opt = _opt(model_opt), Munch(_opt(renderer_opt))
        self.size = model_opt.size
        self.style_dim = model_opt.style_dim
        self.full_pipeline = full_pipeline
        self.is_train = not (ema or "is_test" in model_opt)
        self.train_renderer = True  # stage 2 calls freeze_renderer()
        renderer_opt.output_features = full_pipeline
        self.style = nn.Sequential(*[MappingLinear(self.style_dim, self.style_dim) for _ in range(3)])
        self.renderer = VolumeFeatureRenderer(renderer_opt, style_dim=self.style_dim,
                                              out_im_res=model_opt.renderer_spatial_output_dim,
                                              mode="train" if self.is_train else "test")
        self.n_render = self.renderer.n_render
        self.n_latent = 2 * self.n_render
        if full_pipeline:
            self.feature_transfer = ConvLayer(renderer_opt.width, 256, 3)
            self.decoder = Decoder(model_opt, n_seg=self.n_render, blur_kernel=blur_kernel)
        if not self.is_train:
            self.renderer.requires_grad_(False)

    def freeze_renderer(self):
        """Stage 2: the renderer (and its mapping) stop learning."""
        self.train_renderer = False
        self.style.requires_grad_(False)
        self.renderer.requires_grad_(False)

    def map_styles(self, z):
        """The renderer mapping network on [..., D] (applied to 2-D input only)."""
        return self.style(z.reshape(-1, z.shape[-1])).reshape(z.shape)

    def mean_latent(self, n_latent, device=None):
        device = device or next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        z = torch.randn(n_latent, self.style_dim, device=device, dtype=dtype)
        renderer_latent = self.style(z)
        decoder_mean = self.decoder.mean_latent(renderer_latent) if self.full_pipeline else None
        return [renderer_latent.mean(0, keepdim=True), decoder_mean]

    def mix_styles(self, styles):
        """Build the [B, 18, D] per-region codes from a list of styles (SPEC §6)."""
        if len(styles) == 1:
            style = styles[0]
            return style.unsqueeze(1).repeat(1, self.n_latent, 1) if style.ndim == 2 else style
        if len(styles) == 2:
            w1, w2 = styles
            batch = w1.shape[0]
            # Per region and sample: (shape, texture) = (w1,w1), (w1,w2) or (w2,w2).
            choice = draws.current().region_mix(batch, self.n_render, w1.device)
            use_w2_shape = (choice == 2)
            use_w2_texture = (choice >= 1)
            use_w2 = torch.stack([use_w2_shape, use_w2_texture], -1).reshape(batch, self.n_latent, 1)
            return torch.where(use_w2, w2.unsqueeze(1), w1.unsqueeze(1))
        return torch.stack(styles, 1)

    def styles_to_codes(self, styles, truncation=1, truncation_latent=None, input_is_latent=False, mix_styles=True):
        """Map (unless input_is_latent), truncate and mix. Returns (codes [B,18,D], global styles)."""
        if not input_is_latent:
            styles = [self.map_styles(s) for s in styles]
        if truncation < 1:
            styles = [truncation_latent[0] + truncation * (s - truncation_latent[0]) for s in styles]
        codes = self.mix_styles(styles) if mix_styles else self.mix_styles(styles[:1])
        return codes, styles

    def forward(self, styles, cam_poses, focals, near=0.88, far=1.12, return_latents=False, inject_index=None,
                truncation=1, truncation_latent=None, input_is_latent=False, noise=None, randomize_noise=True,
                return_sdf=False, return_xyz=False, return_eikonal=False, project_noise=False, mesh_path=None,
                mix_styles=True, styles_global=None, semantics=None):
        if project_noise:
            raise NotImplementedError("project_noise is not supported by the generator forward; "
                                      "render_video.py handles noise projection")
        if not (self.is_train and self.train_renderer):
            self.renderer.requires_grad_(False)
        codes, global_styles = self.styles_to_codes(styles, truncation, truncation_latent, input_is_latent,
                                                    mix_styles)
        render = self.renderer(cam_poses, focals, near, far, codes, return_eikonal=return_eikonal,
                               return_sdf=return_sdf, return_xyz=return_xyz, semantics=semantics)
        rgb = seg_high = decoder_latents = None
        if self.full_pipeline:
            global_styles = styles_global if styles_global is not None else global_styles
            if any(s.ndim != 2 for s in global_styles):
                raise ValueError("per-region codes need styles_global ([B, style_dim]) for the decoder")
            features = self.feature_transfer(render["features"])
            rgb, seg_high, decoder_latents = self.decoder(
                features, global_styles, seg_low=render["seg"], return_latents=return_latents,
                inject_index=inject_index, truncation=truncation, truncation_latent=truncation_latent,
                noise=noise, randomize_noise=randomize_noise)
        if return_latents:
            return rgb, seg_high, decoder_latents
        out = [(rgb, seg_high), render["rgb"]]
        if return_xyz:
            out.append(render["xyz"])
        if return_sdf:
            out.append(render["sdf"])
        if return_eikonal:
            out.append(render["eikonal"])
        if return_xyz:
            out.append(render["mask"])
        out.append(render["seg"])
        return tuple(out)

    def init_forward(self, styles, cam_poses, focals, near=0.88, far=1.12):
        """Sphere initialisation pass: (initial SDF network's sdf, sphere target)."""
        codes, _ = self.styles_to_codes(styles)
        return self.renderer.mlp_init_pass(cam_poses, focals, near, far, codes)


# ------------------------------------------------------------------------------- discriminators


def minibatch_stddev(x, group_size=4, channels=1):
    """Append the minibatch standard deviation as `channels` extra channels (group min(B, 4)): the features are
    split into that many groups, and each group's standard deviation over the minibatch group is averaged to one
    value. 1 is the published; more (--mbstd_channels, new) lets features that the camera barely moves, such as
    colours, show a batch of one identity on their own instead of in one average with the rest."""
    batch, channel, height, width = x.shape
    group = min(batch, group_size)
    if batch % group != 0:  # published workaround (stage 2); elsewhere this case would crash
        group = 3 if batch % 3 == 0 else 2 if batch % 2 == 0 else 1
    y = x.view(group, -1, channels, channel // channels, height, width)
    y = torch.sqrt(y.var(0, unbiased=False) + 1e-8)
    y = y.mean([2, 3, 4], keepdim=True).squeeze(2)
    y = y.repeat(group, 1, height, width)
    return torch.cat([x, y], 1)


def pack_samples(x, pack):
    """PacGAN packing (--d_pack, new; Lin et al. 2018): [B, C, H, W] → [B/pack, pack·C, H, W], so that a
    discriminator judges `pack` samples at once and can see when they are all alike. Sample j is packed
    with j + B/pack, j + 2B/pack, …: never with its neighbour, which in the generator phase of
    --diversity_lambda shares its camera (no real pack does)."""
    if pack == 1:
        return x
    batch = x.shape[0]
    return x.reshape(pack, batch // pack, *x.shape[1:]).transpose(0, 1).reshape(
        batch // pack, pack * x.shape[1], *x.shape[2:])


def unpack_samples(y, pack):
    """A per-sample head's output of packed inputs, [B/pack, pack·K] → [B, K] in the input order."""
    if pack == 1:
        return y
    return y.reshape(y.shape[0], pack, -1).transpose(0, 1).reshape(y.shape[0] * pack, -1)


class DiscConv(nn.Module):
    """nn.Conv2d (bias only when not activated) + optional leaky ReLU (gain 1) with a uniform-init bias."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, activate=False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias and not activate)
        self.activate = activate
        if activate:
            self.activation = FusedLeakyReLU(out_channels, bias=bias, scale=1)
            bound = math.sqrt(1 / (in_channels * kernel_size * kernel_size))
            nn.init.uniform_(self.activation.bias, -bound, bound)

    def forward(self, x):
        out = self.conv(x)
        return self.activation(out) if self.activate else out


def add_coords(x):
    """cat([x, y, x-coords]) with coordinates arange(n)/(n-1)*2-1 computed in float32."""
    batch, _, height, width = x.shape
    yy = torch.arange(height, dtype=torch.float32, device=x.device) / (height - 1) * 2 - 1
    xx = torch.arange(width, dtype=torch.float32, device=x.device) / (width - 1) * 2 - 1
    yy = yy.view(1, 1, height, 1).expand(batch, 1, height, width).to(x.dtype)
    xx = xx.view(1, 1, 1, width).expand(batch, 1, height, width).to(x.dtype)
    return torch.cat([x, yy, xx], 1)


class CoordConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, padding=0, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size, padding=padding, bias=bias)

    def forward(self, x):
        return self.conv(add_coords(x))


class CoordConvLayer(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, bias=True, activate=True):
        super().__init__()
        self.conv = CoordConv2d(in_channel, out_channel, kernel_size, padding=kernel_size // 2,
                                bias=bias and not activate)
        self.activate = activate
        if activate:
            self.activation = FusedLeakyReLU(out_channel, bias=bias, scale=1)
            bound = math.sqrt(1 / (in_channel * kernel_size * kernel_size))
            nn.init.uniform_(self.activation.bias, -bound, bound)

    def forward(self, x):
        out = self.conv(x)
        return self.activation(out) if self.activate else out


class VolumeRenderResBlock(nn.Module):
    def __init__(self, in_channel, out_channel):
        super().__init__()
        self.conv1 = CoordConvLayer(in_channel, out_channel, 3)
        self.conv2 = CoordConvLayer(out_channel, out_channel, 3)
        self.skip = DiscConv(in_channel, out_channel, 1) if in_channel != out_channel else None

    def forward(self, x):
        out = F.avg_pool2d(self.conv2(self.conv1(x)), 2)
        skip = F.avg_pool2d(x, 2)
        if self.skip is not None:
            skip = self.skip(skip)
        return (out + skip) / math.sqrt(2)


VOLUME_D_CHANNELS = {2: 400, 3: 400, 4: 400, 6: 400, 8: 400, 12: 400, 16: 400, 24: 400, 32: 256, 48: 256, 64: 128,
                     96: 128, 128: 64}
SEMANTIC_D_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128}


def scaled_channels(channels, scale):
    """A discriminator's channel table with every width times `scale` (--d_channel_scale; 1 = published)."""
    if scale == 1:
        return dict(channels)
    return {size: max(1, int(round(c * scale))) for size, c in channels.items()}


def _volume_branch(in_channels, init_size, channels, stop_size, activate_first=True):
    convs = [DiscConv(in_channels, channels[init_size], 1, activate=activate_first)]
    in_channel = channels[init_size]
    size = init_size // 2
    while size >= stop_size:
        convs.append(VolumeRenderResBlock(in_channel, channels[size]))
        in_channel = channels[size]
        size //= 2
    return nn.Sequential(*convs), in_channel


def volume_d_last_width(d_channel_scale):
    """The global stage-1 discriminator's width where the minibatch stddev is taken (at 2×2)."""
    return scaled_channels(VOLUME_D_CHANNELS, d_channel_scale)[2]


class VolumeRenderDiscriminator(nn.Module):
    """Stage-1 global discriminator on (low-res image, 9-channel mask): logit and viewpoint."""

    def __init__(self, opt):
        super().__init__()
        opt = _opt(opt)
        init_size = opt.renderer_spatial_output_dim
        # options.model_options derives this from --view_lambda; modules built from the plain option tree
        # (the conformance check) get the published viewpoint head.
        self.viewpoint_loss = not opt.get("no_viewpoint_loss", False)
        n_seg = opt.n_render
        self.pack = opt.get("d_pack", 1)
        self.stddev_channels = opt.get("mbstd_channels", 1)
        channels = scaled_channels(VOLUME_D_CHANNELS, opt.d_channel_scale)
        self.convs_img, in_channel = _volume_branch(3 * self.pack, init_size, channels, 2)
        self.convs_seg, _ = _volume_branch(n_seg * self.pack, init_size, channels, 2)
        self.final_conv = DiscConv(in_channel + self.stddev_channels, 1 + 2 * self.pack if self.viewpoint_loss else 1,
                                   2)

    def forward(self, img, seg):
        """Logits [B/d_pack, 1] (one per pack) and viewpoints [B, 2] (one per sample)."""
        img, seg = pack_samples(img, self.pack), pack_samples(seg, self.pack)
        out = minibatch_stddev(self.convs_img(img) + self.convs_seg(seg), channels=self.stddev_channels)
        out = self.final_conv(out)
        gan_pred = out[:, 0:1].reshape(-1, 1)
        viewpoint = unpack_samples(out[:, 1:].reshape(out.shape[0], -1), self.pack) if self.viewpoint_loss else None
        return gan_pred, viewpoint


class ComponentDualBranchDiscriminator(nn.Module):
    """Stage-1 semantic discriminator on (image, one region's mask): logit and region class."""

    def __init__(self, opt):
        super().__init__()
        opt = _opt(opt)
        init_size = opt.renderer_spatial_output_dim
        n_classes = opt.n_render
        self.pack = opt.get("d_pack", 1)
        channels = scaled_channels(SEMANTIC_D_CHANNELS, opt.d_channel_scale)
        self.convs_img, in_channel = _volume_branch(3 * self.pack, init_size, channels, 4)
        self.convs_seg, _ = _volume_branch(self.pack, init_size, channels, 4, activate_first=False)
        self.final_conv = DiscConv(in_channel + 1, channels[4], 3)
        flat = channels[4] * 2 * 2
        self.final_linear = nn.Sequential(EqualLinear(flat, channels[4], activation="fused_lrelu"),
                                          EqualLinear(channels[4], 1))
        self.class_linear = nn.Sequential(EqualLinear(flat, channels[4], activation="fused_lrelu"),
                                          EqualLinear(channels[4], n_classes * self.pack))

    def forward(self, img, mask):
        """Logits [B/d_pack, 1] (one per pack) and region-class logits [B, n_render] (one per sample)."""
        img, mask = pack_samples(img * mask, self.pack), pack_samples(mask, self.pack)
        out = minibatch_stddev(self.convs_img(img) + self.convs_seg(mask))
        out = self.final_conv(out).reshape(img.shape[0], -1)
        return self.final_linear(out), unpack_samples(self.class_linear(out), self.pack)


class Discriminator(nn.Module):
    """Stage-2 StyleGAN2 discriminator on (image, 9-channel mask) at the output size."""

    def __init__(self, opt, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        opt = _opt(opt)
        size = opt.size
        n_seg = opt.n_render
        self.pack = opt.get("d_pack", 1)
        channels = scaled_channels(decoder_channels(opt.channel_multiplier), opt.d_channel_scale)
        log_size = int(math.log2(size))

        def branch(in_channels):
            convs = [ConvLayer(in_channels, channels[size], 1)]
            in_channel = channels[size]
            for i in range(log_size, 2, -1):
                convs.append(ResBlock(in_channel, channels[2 ** (i - 1)], blur_kernel))
                in_channel = channels[2 ** (i - 1)]
            return nn.Sequential(*convs)

        self.convs_img = branch(3 * self.pack)
        self.convs_seg = branch(n_seg * self.pack)
        self.final_conv = ConvLayer(channels[4] + 1, channels[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(channels[4] * 4 * 4, channels[4], activation="fused_lrelu"),
                                          EqualLinear(channels[4], 1))

    def forward(self, img, seg):
        """Logits [B/d_pack, 1], one per pack."""
        img, seg = pack_samples(img, self.pack), pack_samples(seg, self.pack)
        out = minibatch_stddev(self.convs_img(img) + self.convs_seg(seg))
        out = self.final_conv(out).reshape(img.shape[0], -1)
        return self.final_linear(out)

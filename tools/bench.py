#!/usr/bin/env python
"""Time the two workloads of issue 6 on random weights and print one line each.

  python tools/bench.py infer512 [--repeat N] [--device cpu|cuda] [--batch B] [--render_path fast|reference]
  python tools/bench.py train64  [--repeat N] [--device cpu|cuda] [--batch B] [--render_path fast|reference]

infer512: full Generator at size 512 (channel_multiplier 2, style_dim 256, width 128, 64×64 rendering,
          64 samples per ray), B images, no grad.
train64:  stage-1 generator (full_pipeline=False) step, B images, 64×64, 24 samples: forward with
          return_sdf and return_eikonal, loss = mean(low-res image) + eikonal + minimal surface
          + mean(seg), backward.

One warm-up run, then --repeat timed runs; prints
  <workload> median_s=… min_s=… peak_rss_mib=… threads=… [peak_cuda_mib=…]
peak_rss_mib is the process's high-water mark (ru_maxrss), so it includes model construction.
--samples and --res override the samples per ray and the rendering resolution (for scaling tables).
"""
import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import perf_utils  # noqa: E402

perf_utils.configure_allocator()

import torch  # noqa: E402

from camera import generate_camera_params  # noqa: E402
from losses import eikonal_loss  # noqa: E402
from model import Generator  # noqa: E402
from options import default_options  # noqa: E402


def build(workload, device, render_path, samples=None, res=None, ray_chunk=None):
    opt = default_options()
    if ray_chunk is not None:
        opt.rendering.ray_chunk = ray_chunk
    opt.model.renderer_spatial_output_dim = res or 64
    opt.rendering.render_path = render_path
    opt.model.n_render = opt.rendering.n_render
    if workload == "infer512":
        opt.model.size = 512
        opt.rendering.N_samples = samples or 64
        opt.rendering.static_viewdirs = True
        opt.rendering.perturb = 0.0
        g = Generator(opt.model, opt.rendering, ema=True, full_pipeline=True).eval()
    else:
        opt.rendering.N_samples = samples or 24
        g = Generator(opt.model, opt.rendering, full_pipeline=False).train()
    return g.to(device), opt


def make_step(workload, g, opt, device, batch):
    res = opt.model.renderer_spatial_output_dim
    cam = generate_camera_params(res, device, batch=batch)[:4]
    z = torch.randn(batch, opt.model.style_dim, device=device)
    if workload == "infer512":
        mean = g.mean_latent(1000, device)

        def step():
            with torch.no_grad():
                (rgb, seg_high), thumb, seg = g([z], *cam, truncation=0.7, truncation_latent=mean,
                                                randomize_noise=False)
            return rgb
        return step

    def step():
        g.zero_grad(set_to_none=True)
        _, thumb, sdf, eikonal, seg = g([z], *cam, return_sdf=True, return_eikonal=True)
        eik, min_surf = eikonal_loss(eikonal, sdf, beta=100)
        loss = thumb.mean() + eik + min_surf + seg.mean()
        loss.backward()
        return loss
    return step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["infer512", "train64"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--render_path", choices=["fast", "reference"], default="fast")
    parser.add_argument("--samples", type=int, default=None, help="samples per ray (default: the workload's)")
    parser.add_argument("--res", type=int, default=None, help="rendering resolution (default 64)")
    parser.add_argument("--ray_chunk", type=int, default=None,
                        help="reference path: rays per chunk (0 = the whole image at once, like the published code)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.batch < 1:
        parser.error("--repeat and --batch must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    g, opt = build(args.workload, args.device, args.render_path, args.samples, args.res, args.ray_chunk)
    step = make_step(args.workload, g, opt, args.device, args.batch)
    step()  # warm-up: first-touch allocations, lazy kernels
    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = (f"{args.workload} median_s={statistics.median(times):.3f} min_s={min(times):.3f} "
            f"peak_rss_mib={rss:.0f} threads={torch.get_num_threads()}")
    if args.device.startswith("cuda"):
        line += f" peak_cuda_mib={torch.cuda.max_memory_allocated() / 2 ** 20:.0f}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

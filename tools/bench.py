#!/usr/bin/env python
"""Time the two workloads of issue 6 on random weights and print one line each.

  python tools/bench.py infer512 [--repeat N] [--device cpu|cuda] [--batch B] [--render_path fast|reference]
  python tools/bench.py train64  [--repeat N] [--device cpu|cuda] [--batch B] [--render_path fast|reference]
  python tools/bench.py stage1_small [--repeat N] [--device D] [--d_channel_scale S] [--ray_chunk N]
  python tools/bench.py stage2_small [--repeat N] [--device D] [--d_channel_scale S]

infer512: full Generator at size 512 (channel_multiplier 2, style_dim 256, width 128, 64×64 rendering,
          64 samples per ray), B images, no grad.
train64:  stage-1 generator (full_pipeline=False) step, B images, 64×64, 24 samples: forward with
          return_sdf and return_eikonal, loss = mean(low-res image) + eikonal + minimal surface
          + mean(seg), backward.

stage1_small / stage2_small (issue 11): one full iteration of the REAL training loops,
          train_CNeRF.train / train_Full.train run through their command line on a tiny synthetic
          LMDB (tools/synthetic_portraits.py + prepare_data.py in a temporary folder, removed
          afterwards). Timing a copy of the loop could drift from what training does (the loops
          change: lazy R1, chunked D losses); the real loop cannot. An iteration's time is the wall
          time between consecutive calls of training.params.accumulate (the EMA update, once per
          iteration at its end), so it covers data loading, both D steps with R1, the G step and
          the EMA. The first two iterations are not timed (warm-up; iteration 0 also writes a
          sample grid and a checkpoint).
  stage1_small: --renderer_spatial_output_dim 32 --size 32 --width 64 --style_dim 128 --N_samples 16
          --batch 4 --chunk 4 (global D with R1 and viewpoint loss, semantic D with R1, G with
          eikonal / minimal surface, EMA); no sphere initialisation.
  stage2_small: the same renderer (random weights, frozen), --size 64 --channel_multiplier 1,
          batch 4. Lazy R1 runs every 16 iterations and path-length regularisation every 4, so the
          default --repeat 16 times one whole period: mean_s is the amortised cost per iteration,
          median_s that of a plain iteration; path_s / r1_path_s are the extra cost over median_s of
          an iteration with path-length regularisation / with both it and R1 (iteration 16).
  cpu_s is the median process CPU time per iteration (all threads): on a shared machine, with one
  thread, it is what the iteration costs without the waiting (wall times there depend on the load).
  Their --d_channel_scale is the training flag (default 1 = published widths); --extra passes more
  training flags, e.g. --extra="--ray_chunk 64".

--precision fp32|bf16|auto is the training / inference flag (common/precision.py); the line says which ran.

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

from common import perf_utils  # noqa: E402

perf_utils.configure_allocator()

import torch  # noqa: E402

from common import precision  # noqa: E402
from losses import eikonal_loss  # noqa: E402
from model import Generator  # noqa: E402
from options import default_options  # noqa: E402
from rendering.camera import generate_camera_params  # noqa: E402


def build(workload, device, render_path, samples=None, res=None, ray_chunk=None):
    opt = default_options()
    if ray_chunk is not None:
        opt.rendering.ray_chunk = ray_chunk
    opt.model.renderer_spatial_output_dim = res or 64
    opt.rendering.render_path = render_path
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


SMALL_FLAGS = ["--renderer_spatial_output_dim", "32", "--width", "64", "--style_dim", "128", "--N_samples", "16",
               "--batch", "4", "--chunk", "4"]


def small_dataset(folder):
    """A tiny LMDB (8 synthetic portraits at 64, 32, 16 and 8 px, with masks) made by the project's own tools."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    portraits, lmdb_path = os.path.join(folder, "portraits"), os.path.join(folder, "lmdb")
    for command in ([os.path.join(root, "tools", "synthetic_portraits.py"), "--out", portraits, "--n", "8",
                     "--size", "64", "--seed", "0"],
                    [os.path.join(root, "prepare_data.py"), "--out_path", lmdb_path, "--n_worker", "1",
                     "--size", "64,32,16,8", "--mask_path", os.path.join(portraits, "masks"),
                     os.path.join(portraits, "images")]):
        subprocess.run([sys.executable] + command, check=True, stdout=subprocess.DEVNULL)
    return lmdb_path


def small_renderer(folder, extra):
    """A stage-1 renderer file (random weights, {"g_ema": ...}) at the small configuration, for stage 2."""
    from munch import Munch

    from options import default_options
    opt = default_options(SMALL_FLAGS + ["--size", "32"] + extra)
    model_opt = Munch(opt.model, n_render=opt.rendering.n_render)
    g = Generator(model_opt, Munch(opt.rendering), ema=True, full_pipeline=False)
    path = os.path.join(folder, "renderer.pt")
    torch.save({"g_ema": g.state_dict()}, path)
    return path


def time_small_training(workload, args):
    """Run the real training loop of a stage for repeat + 2 iterations; per-iteration wall times."""
    import shutil
    import tempfile

    from training import params

    folder = tempfile.mkdtemp(prefix=f"bench_{workload}_")
    try:
        lmdb_path = small_dataset(folder)
        n_iter = args.repeat + 2
        common = SMALL_FLAGS + ["--dataset_path", lmdb_path, "--checkpoints_dir", os.path.join(folder, "ckpt"),
                                "--expname", "bench", "--device", args.device, "--seed", str(args.seed),
                                "--iter", str(n_iter), "--sample_every", "1000000", "--save_every", "1000000",
                                "--val_n_sample", "1", "--truncation_mean", "16", "--num_workers", "0",
                                "--d_channel_scale", str(args.d_channel_scale),
                                "--precision", args.precision] + args.extra.split()
        if workload == "stage1_small":
            import train_CNeRF as stage
            argv = common + ["--size", "32", "--no_sphere_init"]
        else:
            import train_Full as stage
            argv = common + ["--size", "64", "--channel_multiplier", "1",
                             "--pretrain_render_path", small_renderer(folder, args.extra.split())]
        stamps, cpu_stamps = [], []
        original = params.accumulate
        profiler = None

        def timed_accumulate(*a, **k):
            nonlocal profiler
            result = original(*a, **k)
            sync(args.device)
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            if args.profile and len(stamps) == 2:  # profile the first timed iteration
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiler.__enter__()
            elif profiler is not None and len(stamps) == 3:
                profiler.__exit__(None, None, None)
                print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
                profiler = None
            return result

        params.accumulate = timed_accumulate
        try:
            stage.train(argv)
        finally:
            params.accumulate = original
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if len(stamps) != n_iter:
        raise SystemExit(f"error: params.accumulate ran {len(stamps)} times in {n_iter} iterations; "
                         f"the timing hook needs it once per iteration")
    return ([b - a for a, b in zip(stamps[1:], stamps[2:])],
            [b - a for a, b in zip(cpu_stamps[1:], cpu_stamps[2:])])


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["infer512", "train64", "stage1_small", "stage2_small"])
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs (default 3; stage2_small: 16, one lazy-regularisation period)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--render_path", choices=["fast", "reference"], default="fast")
    parser.add_argument("--samples", type=int, default=None, help="samples per ray (default: the workload's)")
    parser.add_argument("--res", type=int, default=None, help="rendering resolution (default 64)")
    parser.add_argument("--ray_chunk", type=int, default=None,
                        help="reference path: rays per chunk (0 = the whole image at once, like the published code)")
    parser.add_argument("--d_channel_scale", type=float, default=1.0,
                        help="stage1_small/stage2_small: discriminator width scale (the training flag)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="stage1_small/stage2_small: print torch.profiler's top ROWS ops of the first timed iteration")
    parser.add_argument("--extra", default="", help="stage1_small/stage2_small: more training flags")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", type=str.lower, choices=list(precision.MODES), default="fp32",
                        help="fp32 | bf16 | auto, as the training and inference flag (common/precision.py)")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 16 if args.workload == "stage2_small" else 3
    if args.repeat < 1 or args.batch < 1:
        parser.error("--repeat and --batch must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available", file=sys.stderr)
        return 2

    if args.workload in ("stage1_small", "stage2_small"):
        times, cpu_times = time_small_training(args.workload, args)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        median = statistics.median(times)
        line = (f"{args.workload} median_s={median:.3f} min_s={min(times):.3f} mean_s={statistics.mean(times):.3f} "
                f"cpu_s={statistics.median(cpu_times):.3f}")
        if args.workload == "stage2_small":
            # Timed iterations are 2..repeat+1: path-length regularisation at multiples of 4, R1 at 16.
            iters = range(2, 2 + len(times))
            path = [t for i, t in zip(iters, times) if i % 4 == 0 and i % 16 != 0]
            r1 = [t for i, t in zip(iters, times) if i % 16 == 0]
            if path:
                line += f" path_s={statistics.median(path) - median:.3f}"
            if r1:
                line += f" r1_path_s={statistics.median(r1) - median:.3f}"
        print(line + f" peak_rss_mib={rss:.0f} threads={torch.get_num_threads()} "
              f"d_channel_scale={args.d_channel_scale:g} precision={args.precision}")
        return 0

    torch.manual_seed(args.seed)
    g, opt = build(args.workload, args.device, args.render_path, args.samples, args.res, args.ray_chunk)
    mode = precision.resolve(args.precision, args.device)
    precision.apply(mode, args.device, g)
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
            f"peak_rss_mib={rss:.0f} threads={torch.get_num_threads()} precision={mode}")
    if args.device.startswith("cuda"):
        line += f" peak_cuda_mib={torch.cuda.max_memory_allocated() / 2 ** 20:.0f}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

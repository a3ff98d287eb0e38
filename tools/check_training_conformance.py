#!/usr/bin/env python
"""Training-step conformance: replay the published training step from recorded vectors (issue 13).

  python tools/check_training_conformance.py ../shared/reference/training_vectors.pt
  python tools/check_training_conformance.py VECTORS --render_path fast --cases stage1,stage2

For every case of the file (and each render path), rebuilds the case's models with the reference
weight recipe in float64, then replays each recorded iteration through this project's own training
step (training/steps.py: the functions train_CNeRF.py / train_Full.py run) with the recorded draws fed
in through `draws.using` (latents, cameras, labels, style-mixing choices, crossover, renderer
jitter, decoder noise, path noise) and compares every loss term and prediction, the activation
fingerprints, every gradient fingerprint before each optimiser step (and which parameters had no
gradient), every parameter fingerprint after it, the optimiser hyper-parameters and the EMA. One
line per compared group; exit status 0 only if every group passes. --device runs the models and the
step there (e.g. cuda: R1's and path-length's double backward through the CUDA kernels, still in float64);
the recorded draws are moved there and everything is compared on the CPU. Tolerances (the file's README):
stage 1 1e-9 (losses relative to max(1,|b|), fingerprints relative to |fp0| + sqrt(fp1) + fp1),
stage 2 1e-6 for losses and 1e-4 for fingerprints.
"""
import argparse
import math
import os
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from munch import Munch  # noqa: E402

from common import draws  # noqa: E402
from common.cli import UsageError  # noqa: E402
from common.devices import select_device  # noqa: E402
from options import BaseOptions  # noqa: E402
from tools.reference_weights import fill_recipe  # noqa: E402
from training import steps  # noqa: E402
from training.params import accumulate, ema_decay  # noqa: E402

TOLERANCE = {1: (1e-9, 1e-9), 2: (1e-6, 1e-4)}  # stage → (losses, fingerprints)
# Items the check skips because the published code is at fault there: {(phase or step name, item): reason}.
# Empty: every recorded item is reproduced.
PUBLISHED_DEFECTS = {}
DROPPED_FLAGS = {"--checkpoints_dir", "--expname"}  # scratch folder / name of the capture


class ReplayError(Exception):
    """The step asked for a draw the recorded run did not make (or of another shape)."""


def fingerprint(tensor, key):
    t = tensor.detach().to(device="cpu", dtype=torch.float64).flatten()
    v = torch.randn(t.numel(), generator=torch.Generator().manual_seed(zlib.crc32(key.encode())), dtype=torch.float64)
    return [float(t.sum()), float((t * t).sum()), float((t * v).sum())]


def fingerprint_error(ours, recorded):
    """Worst component error of a fingerprint relative to the recorded one's scale."""
    scale = abs(recorded[0]) + math.sqrt(max(recorded[1], 0.0)) + recorded[1]
    scale = scale if scale > 0 else 1.0
    return max(abs(a - b) for a, b in zip(ours, recorded)) / scale


def value_error(ours, recorded):
    b = torch.as_tensor(recorded).to(torch.float64)
    a = torch.as_tensor(ours).detach().to(device="cpu", dtype=torch.float64)
    if a.shape != b.shape:
        raise ReplayError(f"shape {tuple(a.shape)} instead of {tuple(b.shape)}")
    if not b.is_floating_point() or b.numel() == 0:
        return 0.0 if torch.equal(a, b) else math.inf
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


# --------------------------------------------------------------------------------- the recorded draws


class Replay(draws.Draws):
    """The draws of one recorded iteration, handed out in the order the step asks for them."""

    def __init__(self, phases):
        self.queues = {kind: [entry for p in phases for entry in p["draws"].get(kind, [])]
                       for kind in ("z", "camera", "labels", "path_noise")}
        self.calls = [call for p in phases for call in p["gen_calls"]]
        self.n_calls = 0
        self.call = None
        self.problems = []

    def _take(self, kind, batch=None):
        if not self.queues[kind]:
            raise ReplayError(f"the step draws more '{kind}' than the published one")
        entry = self.queues[kind].pop(0)
        return entry

    def begin_call(self, styles, camera, flags):
        """A generator call starts: its internal draws come from the next recorded call."""
        if self.n_calls >= len(self.calls):
            raise ReplayError("the step calls the generator more often than the published one")
        self.call = self.calls[self.n_calls]
        self.n_calls += 1
        self.jitter_used = 0
        self.noise_used = 0
        recorded_flags = {k: bool(v) for k, v in self.call["flags"].items() if v}
        if recorded_flags != {k: bool(v) for k, v in flags.items() if v}:
            self.problems.append(f"generator call {self.n_calls}: flags {flags} instead of {recorded_flags}")
        z = self.call["z"]
        if len(z) != len(styles) or any(a.shape != b.shape or not torch.equal(a.cpu().to(torch.float64),
                                                                              b.to(torch.float64))
                                        for a, b in zip(styles, z)):
            self.problems.append(f"generator call {self.n_calls}: latents differ from the published call's")
        for key, ours in zip(("extrinsics", "focal", "near", "far"), camera):
            if not torch.equal(torch.as_tensor(ours).cpu().to(torch.float64),
                               self.call["camera"][key].to(torch.float64)):
                self.problems.append(f"generator call {self.n_calls}: camera {key} differs from the published call's")

    def leftovers(self):
        left = [f"{len(q)} '{kind}'" for kind, q in self.queues.items() if q]
        if self.n_calls < len(self.calls):
            left.append(f"{len(self.calls) - self.n_calls} generator call(s)")
        return left

    # The draws the step makes (draws.Draws' methods).
    def mixing_noise(self, batch, latent_dim, prob, device):
        z = self._take("z")
        if z[0].shape != (batch, latent_dim):
            raise ReplayError(f"latents [{batch}, {latent_dim}] asked, published drew {list(z[0].shape)}")
        return [t.to(device=device, dtype=torch.float64).clone() for t in z]

    def camera(self, camera_opt, batch, device, resolution):
        c = self._take("camera")
        if c["extrinsics"].shape[0] != batch:
            raise ReplayError(f"{batch} cameras asked, published drew {c['extrinsics'].shape[0]}")
        return tuple(c[k].to(device=device, dtype=torch.float64) for k in ("extrinsics", "focal", "near", "far",
                                                                           "viewpoint"))

    def labels(self, n_regions, batch, device):
        labels = self._take("labels")
        if labels.shape != (batch,):
            raise ReplayError(f"{batch} labels asked, published drew {list(labels.shape)}")
        return labels.to(device).clone()

    def path_noise(self, image):
        noise = self._take("path_noise")
        if noise.shape != image.shape:
            raise ReplayError(f"path noise {list(image.shape)} asked, published drew {list(noise.shape)}")
        return noise.to(image)

    def region_mix(self, batch, n_regions, device):
        mix = self.call.get("mix")
        if mix is None or mix.shape != (n_regions, batch):
            raise ReplayError(f"style-mixing choices [{n_regions}, {batch}] asked, published call had "
                              f"{None if mix is None else list(mix.shape)}")
        return mix.t().contiguous().to(device)

    def inject_index(self, n_latent):
        if self.call.get("inject_index") is None:
            raise ReplayError("the decoder's crossover asked, the published call drew none")
        return int(self.call["inject_index"])

    def ray_jitter(self, shape, dtype, device):
        stratified = self.call.get("sphere_init_jitter")
        source = stratified if stratified is not None else self.call.get("jitter")
        if source is None:
            raise ReplayError("renderer jitter asked, the published call drew none")
        batch, rays = shape[0], shape[1]
        source = source.reshape(source.shape[0], -1, shape[-1]) if stratified is not None \
            else source.reshape(source.shape[0], -1, 1)
        if source.shape[0] != batch or self.jitter_used + rays > source.shape[1]:
            raise ReplayError(f"renderer jitter {list(shape)} asked beyond the published {list(source.shape)}")
        piece = source[:, self.jitter_used:self.jitter_used + rays]
        self.jitter_used += rays
        return piece.to(device=device, dtype=dtype).reshape(shape)

    def decoder_noise(self, image):
        noises = self.call.get("noise") or []
        if self.noise_used >= len(noises):
            raise ReplayError("more decoder noise asked than the published call drew")
        noise = noises[self.noise_used]
        self.noise_used += 1
        batch, _, height, width = image.shape
        if tuple(noise.shape) != (batch, 1, height, width):
            raise ReplayError(f"decoder noise [{batch}, 1, {height}, {width}] asked, published {list(noise.shape)}")
        return noise.to(image)


# ------------------------------------------------------------------------------------------ the models


def options_for(case, render_path, device="cpu"):
    argv, skip = [], False
    for token in case["argv"]:
        if skip:
            skip = False
            continue
        if token in DROPPED_FLAGS:
            skip = True
            continue
        argv.append(token)
    return BaseOptions().parse(argv + ["--device", str(device), "--render_path", render_path])


def build_case(case, opt, stage, device="cpu"):
    """Models, optimisers (as the training scripts build them) and name maps for one case, in float64."""
    device = torch.device(device)
    stats, seed = case["weight_stats"], case["weight_seed"]
    if stage == 1:
        g, g_ema, gd, sd = steps.build_stage1(opt, device)
        modules = {"generator": g, "g_discriminator": gd, "s_discriminator": sd}
    else:
        g, g_ema, d = steps.build_stage2(opt, device)
        modules = {"generator": g, "discriminator": d}
    for name, module in modules.items():
        if name not in stats:
            raise SystemExit(f"error: the vectors file has no weight statistics for '{name}'")
        fill_recipe(module, stats[name], seed, name)
        module.double()
    g_ema.double()
    g_ema.load_state_dict(g.state_dict())  # the published script copies the generator into its EMA
    for module in modules.values():
        module.train()
    if stage == 1:
        g_optim, gd_optim, sd_optim = steps.stage1_optimizers(opt, g, gd, sd)
        m = Munch(g=g, g_module=g, gd=gd, sd=sd, g_optim=g_optim, gd_optim=gd_optim, sd_optim=sd_optim)
        optimizers = {"g_optim": (g_optim, "generator"), "gd_optim": (gd_optim, "g_discriminator"),
                      "sd_optim": (sd_optim, "s_discriminator")}
    else:
        g_optim, d_optim = steps.stage2_optimizers(opt, g, d)
        m = Munch(g=g, g_module=g, d=d, g_optim=g_optim, d_optim=d_optim)
        optimizers = {"g_optim": (g_optim, "generator"), "d_optim": (d_optim, "discriminator")}
    m.device, m.resolution = device, opt.model.renderer_spatial_output_dim
    return m, g_ema, modules, optimizers


class StepRecorder:
    """Fingerprints of the gradients before, and of the parameters after, every optimiser step."""

    def __init__(self, optimizers, modules):
        self.steps = []
        for name, (optimizer, module_name) in optimizers.items():
            keys = {id(p): k for k, p in modules[module_name].named_parameters()}
            optimizer.register_step_pre_hook(self._before(name, module_name, keys))
            optimizer.register_step_post_hook(self._after(keys))

    def _before(self, name, module_name, keys):
        def hook(optimizer, args, kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            hyper = {}
            for group in optimizer.param_groups:
                setting = (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"], group["amsgrad"])
                hyper[setting] = hyper.get(setting, 0) + len(group["params"])
            self.steps.append({
                "optimizer": name, "module": module_name, "hyper": hyper,
                "grad": {keys[id(p)]: fingerprint(p.grad, keys[id(p)]) for p in params if p.grad is not None},
                "grad_none": sorted(keys[id(p)] for p in params if p.grad is None)})
        return hook

    def _after(self, keys):
        def hook(optimizer, args, kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.steps[-1]["param"] = {keys[id(p)]: fingerprint(p, keys[id(p)]) for p in params}
        return hook


def hook_generator(g, state):
    """Every generator call (forward or the sphere-initialisation pass) starts a recorded call."""
    def pre_hook(module, args, kwargs):
        flags = {k: kwargs.get(k, False) for k in ("return_sdf", "return_eikonal", "return_latents")}
        state.replay.begin_call(args[0], args[1:5], flags)

    g.register_forward_pre_hook(pre_hook, with_kwargs=True)
    init_forward = g.init_forward

    def init_forward_hooked(styles, cam_poses, focals, near=0.88, far=1.12):
        state.replay.begin_call(styles, (cam_poses, focals, near, far), {"init_forward": True})
        return init_forward(styles, cam_poses, focals, near, far)

    g.init_forward = init_forward_hooked


# ----------------------------------------------------------------------------------------- comparing


class Report:
    def __init__(self):
        self.failed = 0
        self.passed = 0
        self.skipped = 0

    def line(self, label, errors, tol, problems=()):
        worst = max(errors) if errors else 0.0
        ok = worst <= tol and not problems
        self.passed += ok
        self.failed += not ok
        text = f"{label:<58} worst {worst:9.2e}  tol {tol:.0e}  {'pass' if ok else 'FAIL'}"
        if problems:
            text += "  (" + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else "") + ")"
        print(text, flush=True)

    def skip(self, label, reason):
        self.skipped += 1
        print(f"{label:<58} skipped: {reason}", flush=True)


def compare_phase(report, label, name, ours, recorded, tol_loss, tol_fp):
    errors, problems = [], []
    for key, value in recorded["losses"].items():
        if (name, key) in PUBLISHED_DEFECTS:
            report.skip(f"{label} {key}", PUBLISHED_DEFECTS[(name, key)])
            continue
        if key not in ours or ours[key] is None:
            problems.append(f"no {key}")
            continue
        try:
            err = value_error(ours[key], value)
        except ReplayError as error:
            problems.append(f"{key}: {error}")
            continue
        errors.append(err)
        if err > tol_loss:
            problems.append(f"{key} {err:.1e}")
    report.line(f"{label} losses", errors, tol_loss, problems)
    errors, problems = [], []
    for key, entry in recorded.get("activations", {}).items():
        if ours.get(key) is None:
            continue  # located by the losses; not every activation is kept by the step
        if ours[key].numel() != math.prod(entry["shape"]):
            problems.append(f"{key} shape {list(ours[key].shape)} instead of {list(entry['shape'])}")
            continue
        # Another view of the same elements (e.g. rays flattened, [B,H·W,S] for [B,H,W,S]) is the same
        # activation: the fingerprint's third component depends on the element order.
        err = fingerprint_error(fingerprint(ours[key], key), entry["fingerprint"])
        errors.append(err)
        if err > tol_fp:
            problems.append(f"{key} {err:.1e}")
    report.line(f"{label} activations", errors, tol_fp, problems)


def compare_fingerprints(ours, recorded, tol):
    errors, problems = [], []
    if set(ours) != set(recorded):
        problems.append(f"keys differ: missing {sorted(set(recorded) - set(ours))[:3]}, "
                        f"extra {sorted(set(ours) - set(recorded))[:3]}")
    for key in sorted(set(ours) & set(recorded)):
        err = fingerprint_error(ours[key], recorded[key])
        errors.append(err)
        if err > tol:
            problems.append(f"{key} {err:.1e}")
    return errors, problems


def compare_step(report, label, ours, recorded, tol):
    problems = []
    if (ours["optimizer"], ours["module"]) != (recorded["optimizer"], recorded["module"]):
        problems.append(f"{ours['optimizer']} on {ours['module']} instead of {recorded['optimizer']} on "
                        f"{recorded['module']}")
    recorded_hyper = {(h["lr"], tuple(h["betas"]), h["eps"], h["weight_decay"], h["amsgrad"]): h["n_params"]
                      for h in recorded["hyper"]}
    merged = {}
    for setting, n in recorded_hyper.items():
        merged[setting] = merged.get(setting, 0) + n
    if not hyper_equal(ours["hyper"], merged):
        problems.append(f"optimiser settings {ours['hyper']} instead of {merged}")
    if sorted(ours["grad_none"]) != sorted(recorded["grad_none"]):
        problems.append(f"no gradient: {sorted(set(ours['grad_none']) ^ set(recorded['grad_none']))[:4]} differ")
    errors, grad_problems = compare_fingerprints(ours["grad"], recorded["grad"], tol)
    report.line(f"{label} gradients", errors, tol, problems + grad_problems)
    errors, param_problems = compare_fingerprints(ours.get("param", {}), recorded["param"], tol)
    report.line(f"{label} parameters", errors, tol, param_problems)


def hyper_equal(ours, recorded):
    if sum(ours.values()) != sum(recorded.values()) or len(ours) != len(recorded):
        return False
    for (lr, betas, eps, wd, ams), n in ours.items():
        match = [s for s in recorded if math.isclose(s[0], lr, rel_tol=1e-12) and
                 all(math.isclose(a, b, rel_tol=1e-12, abs_tol=0) for a, b in zip(s[1], betas)) and
                 s[2] == eps and s[3] == wd and s[4] == ams and recorded[s] == n]
        if not match:
            return False
    return True


# -------------------------------------------------------------------------------------------- replay


def run_case(report, case_name, case, render_path, device="cpu"):
    stage = 1 if "CNeRF" in case["script"] else 2
    tol_loss, tol_fp = TOLERANCE[stage]
    opt = options_for(case, render_path, device)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # construction and recipe in float32, as published
    try:
        m, g_ema, modules, optimizers = build_case(case, opt, stage, device)
        torch.set_default_dtype(torch.float64)  # the published run's own buffers (torch.zeros, ...)
        where = "" if torch.device(device).type == "cpu" else f", {device}"
        tag = f"{case_name} [{render_path}{where}]"
        for name, module in modules.items():
            params = {k: fingerprint(p, k) for k, p in module.named_parameters()}
            errors, problems = compare_fingerprints(params, case["initial_param"][name], tol_fp)
            report.line(f"{tag} initial {name}", errors, tol_fp, problems)
        recorder = StepRecorder(optimizers, modules)
        state = Munch(replay=None)
        hook_generator(m.g_module, state)
        mean_path_length = 0.0  # published run with the SPEC §17 fix: the running mean starts at 0
        for it in case["iterations"]:
            i = it["iteration"]
            phases = it["phases"]
            state.replay = Replay(phases)
            recorder.steps.clear()
            label = f"{tag} it {i}"
            try:
                with draws.using(state.replay):
                    if [p["name"] for p in phases] == ["loss"]:  # sphere initialisation
                        records = [("loss", steps.sphere_init_step(m, opt, i))]
                    else:
                        real_img = phases[0]["draws"]["real_imgs"][0].to(device=device, dtype=torch.float64)
                        real_mask = phases[0]["draws"]["real_masks"][0].to(device=device, dtype=torch.float64)
                        if stage == 1:
                            records = steps.stage1_iteration(m, opt, real_img, real_mask, i)
                        else:
                            records, mean_path_length = steps.stage2_iteration(m, opt, real_img, real_mask,
                                                                               mean_path_length, i)
            except ReplayError as error:
                report.line(f"{label} replay", [math.inf], 0, [str(error)])
                continue
            problems = state.replay.problems + [f"unused: {', '.join(state.replay.leftovers())}"] * bool(
                state.replay.leftovers())
            names = [name for name, _ in records]
            recorded_names = [p["name"] for p in phases]
            if names != recorded_names:
                problems.append(f"phases {names} instead of {recorded_names}")
            report.line(f"{label} draws and calls", [], 0, problems)
            for k, ((name, ours), recorded) in enumerate(zip(records, phases)):
                compare_phase(report, f"{label} phase {k} {name}", name, ours, recorded, tol_loss, tol_fp)
            if len(recorder.steps) != len(it["steps"]):
                report.line(f"{label} optimiser steps", [], 0,
                            [f"{len(recorder.steps)} steps instead of {len(it['steps'])}: "
                             f"{[s['optimizer'] for s in recorder.steps]} vs {[s['optimizer'] for s in it['steps']]}"])
            for k, (ours, recorded) in enumerate(zip(recorder.steps, it["steps"])):
                compare_step(report, f"{label} step {k} {recorded['optimizer']}", ours, recorded, tol_fp)
            for entry in it["ema"]:
                # The loops' own EMA update (params.accumulate, as train_CNeRF/train_Full call it).
                prefixes = steps.STAGE1_EMA if stage == 1 else steps.STAGE2_TRAINED
                accumulate(g_ema, m.g_module, ema_decay(opt), prefixes=prefixes)
                problems = [] if math.isclose(ema_decay(opt), entry["decay"], rel_tol=1e-15) else \
                    [f"decay {ema_decay(opt)} instead of {entry['decay']}"]
                params = {k: fingerprint(p, k) for k, p in g_ema.named_parameters()}
                errors, fp_problems = compare_fingerprints(params, entry["param"], tol_fp)
                report.line(f"{label} ema", errors, tol_fp, problems + fp_problems)
    finally:
        torch.set_default_dtype(default_dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vectors", help="training_vectors.pt")
    parser.add_argument("--render_path", choices=["fast", "reference", "both"], default="both")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--device", default="cpu", help="where the models and the step run (default cpu), e.g. cuda")
    args = parser.parse_args(argv)
    try:
        device = select_device(args.device)
    except UsageError as error:
        sys.exit(f"error: {error}")
    if not os.path.isfile(args.vectors):
        sys.exit(f"error: {args.vectors}: no such file")
    try:
        vectors = torch.load(args.vectors, weights_only=True)
        cases = vectors["cases"]
    except Exception as error:  # any unreadable file ends with one line
        sys.exit(f"error: {args.vectors}: not a training-vectors file ({error})")
    names = [n for n in args.cases.split(",") if n] or list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        sys.exit(f"error: --cases: {', '.join(unknown)} not in {args.vectors} (has {', '.join(cases)})")
    paths = ["fast", "reference"] if args.render_path == "both" else [args.render_path]
    report = Report()
    for path in paths:
        for name in names:
            start, cpu = time.perf_counter(), time.process_time()
            run_case(report, name, cases[name], path, device)
            print(f"{name} [{path}]: {time.perf_counter() - start:.1f} s ({time.process_time() - cpu:.1f} s CPU)",
                  flush=True)
    print(f"{report.passed} groups passed, {report.failed} failed, {report.skipped} items skipped")
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

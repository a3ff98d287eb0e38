"""Pieces shared by both training stages (train_CNeRF.py, train_Full.py).

The start and end of a run (device, process group, folders, logger, resume checkpoint; sample grid,
periodic checkpoint, final EMA model), option checks, model options, EMA, seeding, RNG capture/
restore in a tensors-only form (checkpoints load with weights_only=True), requires_grad toggles, the
resumable data order, sample grids written as PNG, the optional wandb logger and the non-finite loss
check. The training step itself is in training_steps.py.
"""
import contextlib
import json
import math
import os
import random
import sys

import numpy as np
import torch
from munch import Munch
from torch.utils import data

from common import devices
import distributed as dist_utils
from common import imaging
from rendering.camera import generate_camera_params
from common.draws import seed_everything
from options import check_ranges
from common.regions import color_segmap

EMA_DECAY = 0.5 ** (32 / (10 * 1000))  # published, per iteration
SAMPLE_VIEWS = 8  # generate_camera_params(sweep=True) gives 8 azimuths per identity


class TrainingError(devices.UsageError):
    """A problem that stops training with a one-line message (bad option, missing file, ...)."""


class NonFiniteLoss(TrainingError):
    """A loss became NaN or infinite; training stops without writing anything further."""


# ---------------------------------------------------------------------------------------- options


def ema_decay(opt):
    """--ema_decay, or the published 0.5 ** (32 / 10000) per iteration."""
    return EMA_DECAY if opt.training.ema_decay is None else opt.training.ema_decay


def validate(opt):
    """Option checks both stages share; one-line TrainingError naming the flag."""
    t = opt.training
    checks = {f"--{name}": (t[name], "> 0") for name in ("vol_g_lr", "vol_d_lr")}
    if t.ema_decay is not None:
        checks["--ema_decay"] = (t.ema_decay, "[0, 1)")
    checks["--d_channel_scale"] = (opt.model.d_channel_scale, "> 0")
    checks.update({f"--{name}": (t[name], ">= 1") for name in ("batch", "chunk", "sample_every", "save_every",
                                                                 "val_n_sample")})
    checks.update({f"--{name}": (t[name], ">= 0") for name in ("iter", "sphere_init_iter", "num_workers")})
    check_ranges(checks, TrainingError)


# ------------------------------------------------------------------------------------------- RNG


def rng_state():
    """Every RNG this program draws from, as tensors and plain lists (safe for weights_only loading).

    Python's state is (version, 625 ints, gauss_next) and NumPy's holds an array: both become int64
    tensors plus plain numbers, so no pickled custom objects end up in the checkpoint.
    """
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python_version": int(version),
        "python_state": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss_next if gauss_next is None else float(gauss_next),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    """Restore what rng_state() captured."""
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_gauss"])))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        for index in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[index].cpu().to(torch.uint8), index)


@contextlib.contextmanager
def isolated_rng(device, seed=None):
    """Run a block without disturbing the training RNG streams (sample grids, truncation means).

    Training must not depend on how often samples are drawn, or a resumed run would diverge from an
    uninterrupted one. With `seed` the block also sees the same random numbers every time.
    """
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    py_state = random.getstate()
    with torch.random.fork_rng(devices=cuda_devices):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


# ----------------------------------------------------------------------------------- parameters


def requires_grad(model, flag=True):
    for p in model.parameters():
        p.requires_grad = flag


def accumulate(ema, model, decay=0.999, prefixes=None):
    """ema ← decay·ema + (1-decay)·model for parameters (optionally only those under `prefixes`).

    Restricting to the trained sub-modules keeps frozen parts bit-identical: a·d + a·(1-d) is not
    always exactly a in floating point.
    """
    ema_params = dict(ema.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if prefixes is not None and not name.startswith(tuple(prefixes)):
                continue
            ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)


def unwrap(module):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return module.module if hasattr(module, "module") else module


# ----------------------------------------------------------------------------------- loss checks


def check_finite(losses, iteration):
    """Stop with a message naming the loss and the iteration when any loss is NaN or infinite.

    Collective under DDP: all ranks stop together (a rank leaving alone would hang the others).
    """
    bad = [name for name, value in losses.items()
           if torch.is_tensor(value) and not bool(torch.isfinite(value.detach()).all())
           or not torch.is_tensor(value) and not math.isfinite(float(value))]
    flag = torch.tensor([1.0 if bad else 0.0])
    if dist_utils.is_distributed() and dist_utils.get_world_size() > 1:
        device = next((v.device for v in losses.values() if torch.is_tensor(v)), torch.device("cpu"))
        flag = dist_utils.reduce_max(flag.to(device)).cpu()
    if float(flag) > 0:
        if bad:
            values = ", ".join(f"{name}={float(losses[name].detach().float().mean()) if torch.is_tensor(losses[name]) else float(losses[name])}"
                               for name in bad)
            raise NonFiniteLoss(f"non-finite loss at iteration {iteration}: {values}")
        raise NonFiniteLoss(f"non-finite loss at iteration {iteration} on another rank")


# ------------------------------------------------------------------------------------ data order


class ResumableSampler(data.Sampler):
    """An endless, shuffled index stream that a resumed run continues exactly.

    Epoch e is the permutation a DistributedSampler(seed, epoch=e) gives this rank (one replica when
    not distributed), so the order depends only on (seed, rank, world size) and the number of
    samples already drawn -- `start` skips those.
    """

    def __init__(self, dataset, seed=0, start=0, num_replicas=1, rank=0, shuffle=True):
        self.dataset = dataset
        self.seed = int(seed)
        self.start = int(start)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle

    def _epoch(self, epoch):
        sampler = data.distributed.DistributedSampler(self.dataset, num_replicas=self.num_replicas, rank=self.rank,
                                                      shuffle=self.shuffle, seed=self.seed, drop_last=False)
        sampler.set_epoch(epoch)
        return list(iter(sampler))

    def __iter__(self):
        per_epoch = len(self._epoch(0))
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            indices = self._epoch(epoch)
            for index in indices[offset:]:
                yield index
            offset = 0
            epoch += 1

    def __len__(self):  # endless; DataLoader only needs this for its own bookkeeping
        return 2 ** 62


def make_loader(dataset, batch, seed, start_iteration, num_workers, device):
    """A DataLoader over `dataset` that continues where iteration `start_iteration` left off."""
    sampler = ResumableSampler(dataset, seed=seed, start=start_iteration * batch,
                               num_replicas=dist_utils.get_world_size(), rank=dist_utils.get_rank())
    # Workers draw their flip decisions from seeds derived from this generator; seeding it from the
    # start iteration makes runs with workers reproducible (bit-exact resume needs num_workers 0,
    # where flips come from the main process's Python RNG, which checkpoints carry).
    generator = torch.Generator().manual_seed(int(seed) * 1000003 + start_iteration)
    return data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=num_workers,
                           pin_memory=device.type == "cuda", generator=generator,
                           persistent_workers=num_workers > 0)


def infinite(loader):
    while True:
        for batch in loader:
            yield batch


# ----------------------------------------------------------------------------------- sample grids


def image_seg_tiles(images, segs, size=None):
    """Per sample: the image beside its coloured segmentation, both at `size` (nearest upscaling)."""
    size = size or max(images.shape[-1], 64)  # tiny test renders stay visible
    colours = color_segmap(segs)  # [B,H,W,3]
    return [np.concatenate([imaging.resize_nearest(imaging.to_uint8(img), size),
                            imaging.resize_nearest(col, size)], 1)
            for img, col in zip(images, colours)]


def save_grid(path, rows, pad=2):
    """Write rows of uint8 [H,W,3] tiles as one PNG (atomically), `pad` white pixels between tiles."""
    imaging.save_image(path, imaging.image_grid(rows, pad))


# ------------------------------------------------------------------------------------------ wandb


class WandbLogger:
    """Thin optional wandb wrapper: a no-op unless --wandb, and only on rank 0.

    Works offline with WANDB_MODE=offline. Without the package, --wandb stops with a clear message.
    Whatever the flag, rank 0 also appends every logged step to `loss_log` (JSON lines, one object
    {"step": i, name: value, ...} per iteration), which tools/plot_losses.py turns into curves; a
    resumed run appends again from its resumed step (the plot keeps the last value logged for a step).
    """

    def __init__(self, enabled, project, name, config, directory, loss_log=None):
        self.run = None
        self.loss_log = loss_log if dist_utils.is_main_process() else None
        if not enabled or not dist_utils.is_main_process():
            return
        try:
            import wandb
        except ImportError:
            raise TrainingError("--wandb needs the wandb package (pip install wandb), or drop --wandb") from None
        self.wandb = wandb
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=project, name=name, config=config, dir=directory, resume="allow")

    def log(self, values, step):
        if self.loss_log:  # its folder is made at the first record: a run that fails early writes nothing
            os.makedirs(os.path.dirname(os.path.abspath(self.loss_log)), exist_ok=True)
            record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
            with open(self.loss_log, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(dict(values), step=step)

    def log_image(self, key, path, step):
        if self.run is not None:
            self.run.log({key: self.wandb.Image(path)}, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


# ---------------------------------------------------------------------------------------- options


def plain(value):
    """A Munch/option tree as plain dicts and primitives (what weights_only loading accepts)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def resolve_resume_path(ckpt, folder):
    """--ckpt N → <folder>/models_{N:07d}.pt; an existing file path is used as given."""
    if os.path.isfile(str(ckpt)):
        return str(ckpt)
    try:
        number = int(str(ckpt))
    except ValueError:
        raise TrainingError(f"--ckpt {ckpt!r}: neither an iteration number nor an existing file") from None
    return os.path.join(folder, f"models_{number:07d}.pt")


def run_training(train, argv=None):
    """Run a stage's train(argv); its known failures end with one line and a non-zero exit."""
    from common.checkpoint import CheckpointError

    try:
        train(argv)
    except (devices.UsageError, CheckpointError) as error:
        message = str(error)
        if isinstance(error, NonFiniteLoss):
            message += "; training stopped, the last checkpoint is kept"
        sys.exit(f"error: {message}")
    finally:
        dist_utils.cleanup()


def start_run(opt, stage, number, required_keys):
    """The shared start of a training stage: device and process group, folders, logger, resume checkpoint.

    Returns a Munch with device, distributed, rank, main, exp_dir, stage_dir, samples_dir, logger,
    ckpt (None unless --continue_training) and resume_path. `required_keys` are the entries a resume
    checkpoint of this stage must have.
    """
    from common.checkpoint import CheckpointError, load_checkpoint

    t = opt.training
    device = devices.select_device(opt.experiment.device, dist_utils.local_rank_from(t.local_rank))
    run = Munch(device=device, distributed=dist_utils.setup(device), rank=dist_utils.get_rank(),
                main=dist_utils.is_main_process(), ckpt=None, resume_path=None)
    run.exp_dir = os.path.join(t.checkpoints_dir, opt.experiment.expname)
    run.stage_dir = os.path.join(run.exp_dir, stage)
    run.samples_dir = os.path.join(run.stage_dir, "samples")
    # Before any heavy work, so that a missing wandb package stops the run at once.
    run.logger = WandbLogger(t.wandb, "CNeRF", f"{opt.experiment.expname}-stage{number}", plain(opt),
                             os.path.join(run.exp_dir, "wandb"), loss_log=os.path.join(run.stage_dir, "losses.jsonl"))
    if opt.experiment.continue_training:
        run.resume_path = resolve_resume_path(opt.experiment.ckpt, run.stage_dir)
        run.ckpt = load_checkpoint(run.resume_path, map_location=device)
        if opt.experiment.fresh_optimizers:  # the optimiser states are not read, so they need not be there
            required_keys = [key for key in required_keys if not key.endswith("_optim")]
        for key in required_keys:
            if key not in run.ckpt:
                raise CheckpointError(f"{run.resume_path}: not a stage-{number} training checkpoint (no '{key}' entry)")
        if isinstance(run.ckpt.get("opt"), dict):
            # The run's architecture (incl. --d_channel_scale) comes with the checkpoint: resuming needs no
            # model flags, and a contradicting one is one clear line.
            from common.checkpoint import apply_saved_config
            from options import BaseOptions

            parser = BaseOptions()
            parser.initialize()
            apply_saved_config(opt, run.ckpt["opt"], parser.parser.get_default, run.resume_path)
    return run


# ------------------------------------------------------------------------------------ run tail


def choose_seed(opt):
    """--seed, or one random seed shared by all ranks (recorded in the checkpoints)."""
    if opt.experiment.seed is not None:
        return int(opt.experiment.seed)
    return int(dist_utils.all_gather_object(int.from_bytes(os.urandom(4), "little"))[0])


def should_save(i, last, save_every, sample_every):
    """Published schedule: every save_every iterations, more often (every sample_every) before the
    first save_every; plus the last iteration so that every run can be resumed."""
    return i == last or i % save_every == 0 or (i < save_every and i % sample_every == 0)


def gather_rng():
    """Every rank's RNG state (collective), so a resumed multi-process run continues each stream."""
    return dist_utils.all_gather_object(rng_state())


def restore_optimizers(opt, ckpt, resume_path, optimizers):
    """Load each optimiser's state from the resume checkpoint (`optimizers`: checkpoint key -> optimiser),
    unless --fresh_optimizers: then they keep their initial state, as after a checkpoint stripped of them."""
    from common.checkpoint import CheckpointError

    if opt.experiment.fresh_optimizers:
        return
    try:
        for key, optimizer in optimizers.items():
            optimizer.load_state_dict(ckpt[key])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{resume_path}: optimiser state does not fit ({error})") from None


def restore_rng(ckpt, seed, start_iter):
    states = ckpt.get("rng")
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    if isinstance(states, list) and len(states) == world:
        set_rng_state(states[rank])
    else:  # another world size: streams cannot continue exactly; start fresh, reproducible ones
        seed_everything(seed + 7919 * start_iter, rank)


def save(obj, path):
    from common.checkpoint import save_checkpoint

    try:
        save_checkpoint(obj, path)
    except OSError as error:
        raise TrainingError(f"could not write checkpoint {path} ({error}); the previous checkpoint is intact") \
            from None


def end_of_iteration(run, i, last, t, write_grid, checkpoint_state):
    """The shared end of a training iteration: the sample grid (main process, every --sample_every
    and at the last iteration; `write_grid(path)`) and the periodic checkpoint (every rank gives its
    RNG state; the main process writes `checkpoint_state(rng)`)."""
    if run.main and (i % t.sample_every == 0 or i == last):
        path = os.path.join(run.samples_dir, f"{i:07d}.png")
        write_grid(path)
        run.logger.log_image("samples", path, step=i)
    if should_save(i, last, t.save_every, t.sample_every):
        rng = gather_rng()
        if run.main:
            save(checkpoint_state(rng), os.path.join(run.stage_dir, f"models_{i:07d}.pt"))


def finish_run(run, opt, g_ema, last_iter, name):
    """The final EMA model <exp_dir>/<name> (main process), then close the logger and wait for every rank.

    It carries its architecture options ("config"), so `--trained_ckpt` alone rebuilds it."""
    from common.checkpoint import architecture_config

    if run.main:
        save({"g_ema": g_ema.state_dict(), "iter": last_iter, "config": architecture_config(opt)},
             os.path.join(run.exp_dir, name))
    run.logger.finish()
    dist_utils.synchronize()
    return run.exp_dir


class Sampler:
    """Fixed identities and sweep cameras for the sample grids, drawn without touching training RNGs."""

    def __init__(self, opt, device, seed, resolution):
        self.opt = opt
        self.device = device
        n = opt.training.val_n_sample
        with isolated_rng(device, seed=seed + 12345):
            self.z = torch.randn(n, opt.model.style_dim, device=device)
            c = opt.camera
            self.cams = generate_camera_params(resolution, device, batch=n, sweep=True, uniform=c.uniform,
                                               azim_range=c.azim, elev_range=c.elev, fov_ang=c.fov,
                                               dist_radius=c.dist_radius)[:4]
        self.seed = seed

    def identity_inputs(self, k):
        views = slice(k * SAMPLE_VIEWS, (k + 1) * SAMPLE_VIEWS)
        z = self.z[k:k + 1].expand(SAMPLE_VIEWS, -1)
        return z, [c[views] for c in self.cams]

    def mean_latent(self, g_ema):
        with isolated_rng(self.device, seed=self.seed + 54321):
            return g_ema.mean_latent(self.opt.inference.truncation_mean, self.device)

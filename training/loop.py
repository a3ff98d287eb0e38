"""The start and end of a training run and of each iteration, shared by train_CNeRF.py and train_Full.py.

The start: device and process group, folders, the loss log and optional wandb logger, the resume checkpoint
(and the architecture it carries), the seed. Each iteration: the non-finite loss check, the sample grid and
the periodic checkpoint. The end: the final EMA model. Also the option checks both stages share. The
training step itself is in training/steps.py.
"""
import json
import math
import os
import sys

import torch
from munch import Munch

import distributed as dist_utils
from common import devices
from common.checkpoint import CheckpointError, apply_saved_config, architecture_config, load_checkpoint, save_checkpoint
from common.cli import UsageError, check_output, run_command
from model import volume_d_last_width
from options import BaseOptions, check_ranges
from training.randomness import gather_rng


class TrainingError(UsageError):
    """A problem that stops training with a one-line message (bad option, missing file, ...)."""


STOPPED = "training stopped, the last checkpoint is kept"


class NonFiniteLoss(TrainingError):
    """A loss became NaN or infinite; training stops without writing anything further."""


def validate(opt):
    """Option checks both stages share; one-line TrainingError naming the flag."""
    t = opt.training
    checks = {f"--{name}": (t[name], "> 0") for name in ("vol_g_lr", "vol_d_lr")}
    if t.ema_decay is not None:
        checks["--ema_decay"] = (t.ema_decay, "[0, 1)")
    checks["--d_channel_scale"] = (opt.model.d_channel_scale, "> 0")
    checks.update({f"--{name}": (t[name], ">= 1") for name in ("batch", "chunk", "sample_every", "save_every",
                                                               "val_n_sample", "sync_every")})
    checks.update({f"--{name}": (t[name], ">= 0") for name in ("iter", "sphere_init_iter", "diversity_lambda",
                                                               "area_lambda")})
    if t.num_workers is not None:
        checks["--num_workers"] = (t.num_workers, ">= 0")
    if opt.rendering.keep_graph_mib is not None:
        checks["--keep_graph_mib"] = (opt.rendering.keep_graph_mib, ">= 0")
    checks["--d_pack"] = (opt.model.d_pack, ">= 1")
    checks["--mbstd_channels"] = (opt.model.mbstd_channels, ">= 1")
    check_ranges(checks, TrainingError)
    width = volume_d_last_width(opt.model.d_channel_scale)
    if width % opt.model.mbstd_channels:
        raise TrainingError(f"--mbstd_channels {opt.model.mbstd_channels}: it splits the global discriminator's "
                            f"{width} features into equal groups, so it must divide {width}")
    check_packing(opt)
    if t.diversity_lambda > 0 and t.chunk % 2:
        raise TrainingError(f"--diversity_lambda pairs the samples of a generator chunk: --chunk must be even, "
                            f"not {t.chunk}")
    if t.area_lambda > 0 and t.chunk < 2:
        raise TrainingError("--area_lambda compares the spread of a generator chunk with the data's: --chunk must "
                            "be at least 2, not 1")
    if opt.experiment.reseed and not opt.experiment.continue_training:
        raise TrainingError("--reseed: only with --continue_training (a new run takes --seed anyway)")


def check_packing(opt):
    """--batch and --chunk against the discriminators' packs (--d_pack): checked with the options, and again
    once a resume has taken the run's own --d_pack from its checkpoint."""
    t = opt.training
    pack = opt.model.d_pack
    for name in ("batch", "chunk"):
        if t[name] % pack:
            raise TrainingError(f"--d_pack {pack}: the discriminators judge packs of {pack} samples, "
                                f"--{name} must be a multiple of it, not {t[name]}")
    if t.area_lambda > 0 and pack > 1:
        # the generator's packs would all share one camera, the discriminator's never: a tell of fakes
        raise TrainingError(f"--area_lambda renders a generator chunk under one camera: not with --d_pack {pack} "
                            f"(a pack of samples that share a camera gives the fakes away)")
    if t.diversity_lambda > 0 and pack > 1 and t.chunk < 2 * pack:
        # packs take every (chunk/pack)-th sample: with a stride of 1 a pack would hold a camera-sharing pair
        raise TrainingError(f"--d_pack {pack} with --diversity_lambda: --chunk must be at least {2 * pack}, "
                            f"not {t.chunk} (a pack must not hold a pair that shares a camera)")


def _non_finite(losses):
    """The names of the NaN or infinite entries of {name: tensor or number}."""
    return [name for name, value in losses.items()
            if torch.is_tensor(value) and not bool(torch.isfinite(value).all())
            or not torch.is_tensor(value) and not math.isfinite(float(value))]


class FiniteGuard:
    """The non-finite loss check, with one wait for the device per check instead of one per loss.

    The training steps hand each group of losses to watch(), which keeps them (detached) without looking
    at their values; check() tests everything watched since the last check with one fused isfinite
    over one concatenated tensor: one host synchronisation, and under DDP one all-reduce (every rank
    stops together; a rank leaving alone would hang the others). Only when something is wrong are the
    groups looked at one by one, for the message naming the first bad group's losses and iteration.
    """

    def __init__(self):
        self.pending = []  # (iteration, {name: detached tensor or float})

    def watch(self, losses, iteration):
        self.pending.append((iteration, {name: value.detach() if torch.is_tensor(value) else float(value)
                                         for name, value in losses.items()}))

    def check(self):
        """Raise NonFiniteLoss if any watched loss is NaN or infinite (on any rank); forget them all."""
        pending, self.pending = self.pending, []
        if not pending:  # the same on every rank: they run the same steps
            return
        tensors = [v.reshape(-1) for _, losses in pending for v in losses.values() if torch.is_tensor(v)]
        numbers_bad = any(not math.isfinite(v) for _, losses in pending for v in losses.values()
                          if not torch.is_tensor(v))
        device = tensors[0].device if tensors else torch.device("cpu")
        flag = (~torch.isfinite(torch.cat(tensors))).any() if tensors else torch.zeros((), dtype=torch.bool)
        flag = (flag | numbers_bad).to(torch.float32).reshape(1)
        if dist_utils.is_distributed() and dist_utils.get_world_size() > 1:
            flag = dist_utils.reduce_max(flag.to(device))
        if float(flag) == 0:  # the one synchronisation
            return
        for iteration, losses in pending:
            bad = _non_finite(losses)
            if bad:
                shown = {name: float(losses[name].float().mean()) if torch.is_tensor(losses[name]) else losses[name]
                         for name in bad}
                values = ", ".join(f"{name}={value}" for name, value in shown.items())
                raise NonFiniteLoss(f"non-finite loss at iteration {iteration}: {values}; {STOPPED}")
        span = f"iteration {pending[0][0]}" if pending[0][0] == pending[-1][0] else \
            f"iterations {pending[0][0]}-{pending[-1][0]}"
        raise NonFiniteLoss(f"non-finite loss at {span} on another rank; {STOPPED}")


def check_finite(losses, iteration):
    """Stop at once with a message naming the loss and the iteration when any loss is NaN or infinite
    (one synchronisation; collective under DDP). The training loops batch these checks: FiniteGuard."""
    guard = FiniteGuard()
    guard.watch(losses, iteration)
    guard.check()


def sync_due(i, start, last, t):
    """Whether iteration i ends with the loss check and the logged losses (one host synchronisation):
    every --sync_every iterations, at the last one, and whenever a sample grid or a checkpoint is written
    (a non-finite state is never saved)."""
    return (i + 1 - start) % t.sync_every == 0 or i == last or i % t.sample_every == 0 or \
        should_save(i, last, t.save_every, t.sample_every)


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
    """Run a stage's train(argv) as a command (one line for a UsageError), closing the process group whatever
    happens."""
    try:
        run_command(train, argv)
    finally:
        dist_utils.cleanup()


def start_run(opt, stage, number, required_keys):
    """The shared start of a training stage: device and process group, folders, logger, resume checkpoint.

    Returns a Munch with device, distributed, rank, main, exp_dir, stage_dir, samples_dir, logger,
    ckpt (None unless --continue_training) and resume_path. `required_keys` are the entries a resume
    checkpoint of this stage must have.
    """
    t = opt.training
    exp_dir = os.path.join(t.checkpoints_dir, opt.experiment.expname)
    check_output(exp_dir, "--checkpoints_dir/--expname", "folder", inputs=(opt.dataset.dataset_path,))
    device = devices.select_device(opt.experiment.device, dist_utils.local_rank_from(t.local_rank))
    devices.configure_backends(device, opt.experiment.deterministic)
    run = Munch(device=device, distributed=dist_utils.setup(device), rank=dist_utils.get_rank(),
                main=dist_utils.is_main_process(), ckpt=None, resume_path=None)
    run.exp_dir = exp_dir
    run.stage_dir = os.path.join(run.exp_dir, stage)
    run.samples_dir = os.path.join(run.stage_dir, "samples")
    # Before any heavy work, so that a missing wandb package stops the run at once.
    run.logger = WandbLogger(t.wandb, "CNeRF", f"{opt.experiment.expname}-stage{number}", plain(opt),
                             os.path.join(run.exp_dir, "wandb"), loss_log=os.path.join(run.stage_dir, "losses.jsonl"))
    if opt.experiment.continue_training:
        run.resume_path = resolve_resume_path(opt.experiment.ckpt, run.stage_dir)
        run.ckpt = load_resume_checkpoint(run.resume_path)
        if opt.experiment.fresh_optimizers:  # the optimiser states are not read, so they need not be there
            required_keys = [key for key in required_keys if not key.endswith("_optim")]
        for key in required_keys:
            if key not in run.ckpt:
                raise CheckpointError(f"{run.resume_path}: not a stage-{number} training checkpoint (no '{key}' entry)")
        if isinstance(run.ckpt.get("opt"), dict):
            # The run's architecture (incl. --d_channel_scale) comes with the checkpoint: resuming needs no
            # model flags, and a contradicting one is one clear line.
            parser = BaseOptions()
            parser.initialize()
            apply_saved_config(opt, run.ckpt["opt"], parser.parser.get_default, run.resume_path)
            check_packing(opt)
    return run


def load_resume_checkpoint(path, map_location="cpu"):
    """A resume checkpoint with its model and optimiser states on `map_location` and its RNG states always
    on the CPU: they are host data (Python's, NumPy's and torch's CPU generator), and read onto a GPU with
    the rest they made every resume there fail. The loops read onto the CPU: load_state_dict copies the
    weights onto the device, and the optimisers keep Adam's step counts on the host as torch expects."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if torch.device(map_location).type == "cpu":
        return ckpt
    return {key: value if key == "rng" else _to_device(value, map_location) for key, value in ckpt.items()}


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def run_seed(opt, ckpt):
    """The seed of a run: a resumed run keeps its checkpoint's (its RNG streams go on from the checkpoint),
    unless --reseed, which starts them afresh from --seed (or a random one)."""
    if ckpt is not None and "seed" in ckpt and not opt.experiment.reseed:
        return int(ckpt["seed"])
    return choose_seed(opt)


def choose_seed(opt):
    """--seed, or one random seed shared by all ranks (recorded in the checkpoints)."""
    if opt.experiment.seed is not None:
        return int(opt.experiment.seed)
    return int(dist_utils.all_gather_object(int.from_bytes(os.urandom(4), "little"))[0])


def should_save(i, last, save_every, sample_every):
    """Published schedule: every save_every iterations, more often (every sample_every) before the
    first save_every; plus the last iteration so that every run can be resumed."""
    return i == last or i % save_every == 0 or (i < save_every and i % sample_every == 0)


def restore_optimizers(opt, ckpt, resume_path, optimizers):
    """Load each optimiser's state from the resume checkpoint (`optimizers`: checkpoint key -> optimiser),
    unless --fresh_optimizers: then they keep their initial state, as after a checkpoint stripped of them."""
    if opt.experiment.fresh_optimizers:
        return
    try:
        for key, optimizer in optimizers.items():
            asked = [group["lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(ckpt[key])
            restored = [group["lr"] for group in optimizer.param_groups]
            if restored != asked and dist_utils.is_main_process():
                # torch's load_state_dict restores the learning rate too (as in the published code): say so, a
                # rate given on the command line of a resume does nothing without --fresh_optimizers
                print(f"note: {key} resumes at the checkpoint's learning rate {restored[0]:g}, not the options' "
                      f"{asked[0]:g} (--fresh_optimizers starts new optimisers at the options' rates)",
                      file=sys.stderr)
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{resume_path}: optimiser state does not fit ({error})") from None


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
            save_checkpoint(checkpoint_state(rng), os.path.join(run.stage_dir, f"models_{i:07d}.pt"))


def finish_run(run, opt, g_ema, last_iter, name):
    """The final EMA model <exp_dir>/<name> (main process), then close the logger and wait for every rank.

    It carries its architecture options ("config"), so `--trained_ckpt` alone rebuilds it."""
    if run.main:
        save_checkpoint({"g_ema": g_ema.state_dict(), "iter": last_iter, "config": architecture_config(opt)},
                        os.path.join(run.exp_dir, name))
    run.logger.finish()
    dist_utils.synchronize()
    return run.exp_dir

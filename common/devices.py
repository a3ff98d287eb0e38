"""Device selection, in one place, without naming a backend: `--device` as given, else this process's
accelerator when there is one, else the CPU."""
import os

import torch

from common.cli import UsageError


def select_device(requested=None, local_rank=0):
    """torch.device for `--device`; raises UsageError with one line for a device that cannot be used.

    None or "" picks the current accelerator (device `local_rank` under a multi-process launch) or the
    CPU; a bare accelerator type such as "cuda" also means this process's device.
    """
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    count = torch.accelerator.device_count() if accelerator is not None else 0
    if not requested:
        if accelerator is None:
            return torch.device("cpu")
        return torch.device(accelerator.type, local_rank % max(1, count))
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {requested!r} is not a torch device (examples: cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return device
    if accelerator is None or accelerator.type != device.type:
        raise UsageError(f"--device {requested}: no {device.type} device is available on this machine "
                         f"(use --device cpu)")
    if device.index is None:
        return torch.device(device.type, local_rank % max(1, count))
    if device.index >= count:
        raise UsageError(f"--device {requested}: only {count} {device.type} device(s) present")
    return device


def configure_backends(device, deterministic=False):
    """Process-wide backend settings for a training run on `device` (the same tensor shapes every
    iteration).

    CUDA: cuDNN autotuning (cudnn.benchmark), since the one-off search for each convolution shape pays
    back over thousands of iterations. With `deterministic` instead: deterministic algorithms (cuDNN,
    cuBLAS with a fixed workspace), no autotuning and no TF32, so that two runs, or a run and its resumption,
    give the same numbers; ops without a deterministic CUDA implementation warn (warn_only) rather than
    stop. Slower on a GPU: convolutions lose their fastest algorithms and TF32. On the CPU nothing is set:
    its kernels are deterministic already.
    """
    if torch.device(device).type == "cpu":
        return
    if deterministic:
        # cuBLAS reads this when it first creates a handle, i.e. before the first matmul on the device.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # This project writes every element of the tensors it leaves uninitialised: filling them with NaN
        # first (the deterministic mode's default) would only cost time.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        torch.backends.cudnn.benchmark = True

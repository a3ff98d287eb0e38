"""Device selection, in one place, without naming a backend: `--device` as given, else this process's
accelerator when there is one, else the CPU."""
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

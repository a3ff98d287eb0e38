"""Device selection without naming a backend: the available accelerator if any, else the CPU."""
import torch


def default_device(requested=None):
    """torch.device for `--device` (None or "" → the current accelerator when available, else CPU)."""
    if requested:
        try:
            return torch.device(requested)
        except RuntimeError as error:
            raise ValueError(f"--device {requested!r}: {error}") from None
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator if accelerator is not None else torch.device("cpu")

"""Distributed-training helpers (DDP): process-group setup and small collectives.

Both launchers are supported:
    torchrun --nproc_per_node N train_CNeRF.py ...                      (sets LOCAL_RANK, RANK, WORLD_SIZE)
    python -m torch.distributed.launch --nproc_per_node N train_CNeRF.py ...
        (passes --local-rank=K / --local_rank=K on the command line, and sets RANK / WORLD_SIZE)
A plain `python train_CNeRF.py ...` runs as a single process without a process group.
Every helper here is a no-op (or the identity) without a process group.
"""
import os

import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def synchronize():
    """Barrier across ranks (nothing to wait for with one process)."""
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def launched_world_size():
    """World size announced by the launcher through the environment (1 when not launched)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SystemExit(f"error: environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer")


def local_rank_from(arg_local_rank=0):
    """This process's local rank: LOCAL_RANK from the environment (torchrun) or --local_rank (launch)."""
    value = os.environ.get("LOCAL_RANK")
    if value is None:
        return int(arg_local_rank or 0)
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"error: environment variable LOCAL_RANK={value!r} is not an integer")


def setup(device, timeout_s=None):
    """Join the process group when launched with WORLD_SIZE > 1: NCCL for CUDA devices, gloo on CPU.

    `device` is this rank's torch.device (already chosen from the local rank). Returns True when a
    process group is in use.
    """
    if launched_world_size() <= 1:
        return False
    if is_distributed():
        return True
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if key not in os.environ:
            raise SystemExit(f"error: WORLD_SIZE is {os.environ['WORLD_SIZE']} but {key} is not set; "
                             f"start multi-process runs with torchrun or python -m torch.distributed.launch")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {}
    if timeout_s is not None:
        import datetime

        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    synchronize()
    return True


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


def reduce_sum(tensor):
    """Sum of `tensor` over ranks (a copy; the input is untouched)."""
    if not is_distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_max(tensor):
    if not is_distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def reduce_loss_dict(loss_dict, device=None):
    """Average each scalar loss over ranks, for display only (gradients are reduced by DDP).

    Every rank receives the averages (an all-reduce), so any rank may print them; only rank 0 does.
    Returns {name: float}. `device` is where the collective runs (NCCL needs CUDA tensors); by
    default the device of the first tensor among the values.
    """
    if not loss_dict:
        return {}
    names = sorted(loss_dict)
    values = []
    for name in names:
        value = loss_dict[name]
        if torch.is_tensor(value):
            device = device or value.device
            values.append(value.detach().float().reshape(()))
        else:
            values.append(torch.tensor(float(value)))
    device = device or torch.device("cpu")
    stacked = torch.stack([v.to(device) for v in values])
    if is_distributed() and get_world_size() > 1:
        stacked = reduce_sum(stacked) / get_world_size()
    return {name: float(v) for name, v in zip(names, stacked.cpu())}


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    if not is_distributed() or get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def average_gradients(parameters):
    """All-reduce (mean) the gradients of `parameters` across ranks, for a backward pass that ran on
    the unwrapped module (DDP cannot differentiate w.r.t. its own outputs, as path-length
    regularisation needs)."""
    if not is_distributed() or get_world_size() == 1:
        return
    world = get_world_size()
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)

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
    groups = {}
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    # One all-reduce per device and dtype over the gradients flattened into one buffer, instead of one
    # per parameter (hundreds of small collectives). Each element is summed over the ranks as before.
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def collective_device():
    """Where this process group's collectives run: this rank's CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())
    return torch.device("cpu")


def broadcast_training_state(module, optimizer):
    """Copy rank 0's parameters, buffers and optimiser state (e.g. Adam's moments and step counts) to every
    rank.

    For state each rank computed on its own before DDP takes over (the sphere initialisation runs per
    rank on its own draws): DDP's wrap broadcasts the parameters but never the optimiser, so the ranks'
    Adam moments, and with them their parameters, would drift apart from the first GAN step on. The
    ranks may even hold state for different parameters (Adam makes it at a parameter's first gradient,
    which style mixing decides): rank 0's layout is sent first, and every rank takes it.
    """
    if not is_distributed() or get_world_size() == 1:
        return
    device = collective_device()
    params = [param for group in optimizer.param_groups for param in group["params"]]
    layout = [{key: ("tensor", tuple(value.shape), str(value.dtype).replace("torch.", ""),
                     value.device == param.device) if torch.is_tensor(value) else ("value", value)
               for key, value in optimizer.state.get(param, {}).items()} for param in params]
    shared = [layout]
    dist.broadcast_object_list(shared, 0)
    # Parameters and persistent buffers (constant ones, such as expanded pixel grids, are the same everywhere).
    tensors = list(module.state_dict(keep_vars=True).values())
    for param, entries in zip(params, shared[0]):
        if not entries:
            optimizer.state.pop(param, None)
            continue
        own = optimizer.state.get(param, {})
        state = {}
        for key, entry in entries.items():
            if entry[0] == "value":
                state[key] = entry[1]
                continue
            _, shape, dtype, on_param_device = entry
            where = param.device if on_param_device else torch.device("cpu")
            value = own.get(key)
            if not (torch.is_tensor(value) and tuple(value.shape) == shape and value.device == where
                    and value.dtype == getattr(torch, dtype)):
                value = torch.zeros(shape, dtype=getattr(torch, dtype), device=where)
            state[key] = value
            tensors.append(value)
        optimizer.state[param] = state
    with torch.no_grad():
        for tensor in tensors:
            carrier = tensor if tensor.device == device and tensor.is_contiguous() else \
                tensor.to(device).contiguous()
            dist.broadcast(carrier, 0)
            if carrier is not tensor:
                tensor.copy_(carrier)

"""Every RNG a training run draws from, captured and restored in a tensors-only form (checkpoints load with
weights_only=True), so a resumed run continues each stream exactly; and blocks that draw without disturbing
them (sample grids, truncation means)."""
import contextlib
import random

import numpy as np
import torch

import distributed as dist_utils
from common.draws import seed_everything


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
    """Restore what rng_state() captured. The states are host data: tensors that were loaded onto an
    accelerator are read back from it first (a resume checkpoint read with map_location=<GPU> used to
    stop here)."""
    random.setstate((int(state["python_version"]),
                     tuple(int(v) for v in state["python_state"].cpu().tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].cpu().numpy().astype(np.uint32), int(state["numpy_pos"]),
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


def gather_rng():
    """Every rank's RNG state (collective), so a resumed multi-process run continues each stream."""
    return dist_utils.all_gather_object(rng_state())


def restore_rng(ckpt, seed, start_iter):
    states = ckpt.get("rng")
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    if isinstance(states, list) and len(states) == world:
        set_rng_state(states[rank])
    else:  # another world size: streams cannot continue exactly; start fresh, reproducible ones
        seed_everything(seed + 7919 * start_iter, rank)

"""Process-wide performance settings shared by the scripts, and CPU chunk parallelism (issue 6).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
returns it to the OS on free, so a loop that allocates and frees large tensors page-faults on every
touch (measured ~25× slower elementwise work here). `configure_allocator()` tells glibc to keep
large blocks in the heap and not to trim freed memory, so buffers are reused like a caching
allocator's. It is a no-op where glibc's mallopt is not available, and it never changes results.
"""
import collections
import concurrent.futures
import ctypes
import ctypes.util
import os

import numpy as np
import torch

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_configured = None


def _libc_function(name):
    """glibc's function `name` (ctypes), or None where there is no glibc or no such function."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def configure_allocator(enable=None):
    """Call once at startup (before the big allocations). Returns True when glibc accepted it.

    Set CNERF_MALLOPT=0 in the environment to leave the allocator alone (for comparisons).
    """
    global _configured
    if _configured is not None:
        return _configured
    if enable is None:
        enable = os.environ.get("CNERF_MALLOPT", "1") != "0"
    _configured = False
    if not enable:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0)  # no mmap-backed blocks: large tensors come from the (reused) heap
    ok &= mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)  # keep freed heap memory for the next iteration
    ok &= mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps, fewer brk calls
    # One arena for all threads: per-thread arenas would each keep their own untrimmed blocks (the
    # chunk workers of map_in_threads allocate few, large blocks, so sharing costs no contention).
    ok &= mallopt(_M_ARENA_MAX, 1)
    _configured = bool(ok)
    return _configured


def release_free_memory():
    """Give the allocator's free pages back to the system (glibc's malloc_trim; a no-op elsewhere).

    configure_allocator() keeps freed memory for reuse, which suits a loop of equal iterations; after a
    one-off peak (an inversion in the editor) that memory would stay resident for good. Returns True
    when some memory was released.
    """
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def _env_integer(name, default, minimum, what):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < minimum:
        raise SystemExit(f"error: environment variable {name}={value!r} is not {what}")
    return int(value)


def render_threads_setting(default):
    """CNERF_RENDER_THREADS from the environment (a positive integer), or `default` when unset."""
    return _env_integer("CNERF_RENDER_THREADS", default, 1, "a positive integer")


def default_keep_mib(device):
    """The memory (MiB) the fast renderer may spend by default keeping the forward pass's chunk graphs
    for backward, instead of rendering those chunks a second time there (--keep_graph_mib sets it).

    CPU: 2048. CUDA: half of what the device has free now (what the driver reports free plus what
    PyTorch's caching allocator holds unused), leaving the other half to the rest of the step (the
    discriminators, R1's double backward, the chunks re-rendered in backward). Other accelerators: 0,
    since their free memory cannot be asked.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return 2048
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + unused_cache) / 2 / 2 ** 20)
    return 0


def map_in_threads(fn, items, device):
    """[fn(item) for item in items], in order. On a CPU with several intra-op threads, the items run
    on that many Python threads with one intra-op thread each instead (torch releases the GIL in its
    kernels). For many mid-sized kernels this beats one OpenMP team: no barrier after every kernel,
    so a core taken by another process delays one item instead of every kernel (measured: infer512
    7.1 s -> 6.7 s on 2 idle cores). Each item is computed exactly as it would be serially.

    fn runs on worker threads: grad mode is per thread, so fn must set it itself.
    CNERF_RENDER_THREADS=1 in the environment turns this off (serial, OpenMP inside each kernel);
    CNERF_RENDER_THREADS=N sets the number of workers (default: torch's intra-op thread count).
    """
    return list(imap_in_threads(fn, items, device))


def imap_in_threads(fn, items, device):
    """map_in_threads as a generator: results come in order while later items are computed, with at
    most two items per worker in flight (bounded memory when each result is large and is consumed,
    e.g. summed, by the caller)."""
    items = list(items)
    threads = torch.get_num_threads()
    # CNERF_RENDER_THREADS may ask for more workers than intra-op threads: with OMP_NUM_THREADS=1
    # (no OpenMP barriers in the convolutions, the safe setting on a shared CPU) and
    # CNERF_RENDER_THREADS=2, the renderer still uses both cores.
    workers = min(render_threads_setting(threads), len(items))
    if torch.device(device).type != "cpu" or workers < 2:
        for item in items:
            yield fn(item)
        return
    try:
        # set_num_threads(1) in a worker also lowers torch's process-wide default (and MKL's);
        # the caller's setting is restored below.
        with concurrent.futures.ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                                   initargs=(1,)) as pool:
            # The caller's own work between results (e.g. summing gradients) runs single-threaded
            # too: an OpenMP team forked there would spin after each kernel on the cores the
            # workers need (measured: 5x the CPU time of a stage-1 iteration with 2 OpenMP threads).
            torch.set_num_threads(1)
            pending = collections.deque()
            queue = iter(items)
            for item in queue:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                result = pending.popleft().result()
                for item in queue:
                    pending.append(pool.submit(fn, item))
                    break
                yield result
    finally:
        torch.set_num_threads(threads)


def _numpy_float32(t):
    """The NumPy view of `t` when NumPy's sin/cos may stand in for torch's on it, else None."""
    if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad:
        return t.numpy()
    return None


def sin_(t):
    """sin in place, outside autograd graphs. On float32 CPU tensors NumPy's vectorised sin (2.4x
    faster than torch's here: 0.32 vs 0.76 ms per 590k values on one core; both within about one
    ulp of the exact value, so results differ from torch.sin only in the last bit of some values);
    float64 and other devices use torch (bit-identical to torch.sin). NumPy releases the GIL, so
    the chunk workers of map_in_threads run it in parallel."""
    a = _numpy_float32(t)
    if a is None:
        return t.sin_()
    np.sin(a, out=a)
    return t


def cos(t):
    """cos into a new tensor, outside autograd graphs; float32 CPU through NumPy, as sin_."""
    a = _numpy_float32(t)
    if a is None:
        return torch.cos(t)
    out = torch.empty_like(t)
    np.cos(a, out=out.numpy())
    return out

"""Process-wide performance settings shared by the scripts (issue 6).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
returns it to the OS on free, so a loop that allocates and frees large tensors page-faults on every
touch (measured ~25× slower elementwise work here). `configure_allocator()` tells glibc to keep
large blocks in the heap and not to trim freed memory, so buffers are reused like a caching
allocator's. It is a no-op where glibc's mallopt is not available, and it never changes results.
"""
import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_configured = None


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
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0)  # no mmap-backed blocks: large tensors come from the (reused) heap
    ok &= mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)  # keep freed heap memory for the next iteration
    ok &= mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps, fewer brk calls
    _configured = bool(ok)
    return _configured

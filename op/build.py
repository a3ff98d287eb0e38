"""Lazy ninja build of the CUDA sources, and the choice between CUDA kernels and the reference.

A CUDA extension is compiled (torch.utils.cpp_extension.load, default torch extensions dir) the first
time a CUDA tensor needs it. A failed build warns once for that extension; the reference is used for
the rest of the process. CNERF_OPS=ref forces the reference everywhere.

Compile check (no GPU needed):  python -m op   (sets TORCH_CUDA_ARCH_LIST=9.0 if unset)
"""
import glob
import os
import shutil
import time
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = {
    "fused_bias_act": ["fused_bias_act.cpp", "fused_bias_act_kernel.cu"],
    "upfirdn2d": ["upfirdn2d.cpp", "upfirdn2d_kernel.cu"],
}
_loaded = {}  # extension name -> compiled module, or None once its build has failed


def use_cuda(x):
    """True if `x` should go through the CUDA kernels (before knowing whether they build)."""
    return x.is_cuda and os.environ.get("CNERF_OPS", "").strip().lower() != "ref"


def _valid_cuda_home(path):
    return bool(path) and os.path.exists(os.path.join(path, "lib64", "libcudart.so"))


def find_cuda_home():
    """A CUDA toolkit folder holding lib64/libcudart.so, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _valid_cuda_home(c)), None)


def prepare_build_env():
    """Fill in what cpp_extension needs but cannot always guess; never overrides explicit settings."""
    import torch

    # torch guesses CUDA_HOME from `which nvcc`; for a wrapper script such as /usr/local/bin/nvcc that
    # gives /usr/local, which holds no CUDA headers or libraries. The guess is made once, when
    # cpp_extension is first imported, so set the variable first and correct the module constant
    # in case it was imported earlier.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        home = find_cuda_home()
        if home:
            os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    if os.environ.get("CUDA_HOME") and not _valid_cuda_home(cpp_extension.CUDA_HOME):
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    # Without a visible GPU torch cannot pick an architecture (compile check only): build for Hopper.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def compile_extension(name, verbose=False):
    """Build (or reuse the cached build of) one extension and import it. Raises on failure."""
    prepare_build_env()  # before importing cpp_extension, which reads CUDA_HOME on import
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=f"cnerf_{name}",
        sources=[os.path.join(_HERE, s) for s in SOURCES[name]],
        extra_cuda_cflags=["-O3"],
        verbose=verbose,
    )


def get_extension(name):
    """The compiled extension, or None when its build failed (warned about once)."""
    if name not in _loaded:
        try:
            _loaded[name] = compile_extension(name)
        except Exception as e:  # any build/import problem means: use the reference
            _loaded[name] = None
            msg = str(e).strip().splitlines()
            warnings.warn(
                f"op: building the CUDA op '{name}' failed ({type(e).__name__}: "
                f"{msg[0][:300] if msg else ''}); using the PyTorch reference instead",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded[name]


def main():
    """Compile check: build every extension, print the time each took."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    for name in SOURCES:
        t = time.time()
        compile_extension(name, verbose=args.verbose)
        print(f"{name}: built in {time.time() - t:.1f} s")

"""Lazy ninja build of the CUDA sources, and the choice between CUDA kernels and the reference.

A CUDA extension is compiled (torch.utils.cpp_extension.load, default torch extensions dir) the first
time a CUDA tensor needs it, with the CUDA toolkit that matches the CUDA version torch was built with
when there is one (a mismatched toolkit fails to build or builds kernels torch cannot load), and it
says which toolkit it used. The built kernels are then tried once on the device: a wrong
TORCH_CUDA_ARCH_LIST builds fine and fails only at a kernel launch ("no kernel image is available").
A failed build or a failed first launch warns once for that extension; the reference is used for the
rest of the process. CNERF_OPS=ref forces the reference everywhere.

Builds are exclusive per extension (a kernel lock, released when the process dies): a process that
waits for another one's build, e.g. the other ranks of a torchrun, loads its result; a `lock` file left
in the build folder by a build that was killed (which would make torch wait forever) is removed.

    python -m op            build both extensions now, e.g. before `torchrun`, so that no rank builds
                            (without a visible GPU: a compile check, TORCH_CUDA_ARCH_LIST=9.0 if unset)
"""
import contextlib
import glob
import os
import re
import shutil
import sys
import time
import warnings

try:
    import fcntl
except ImportError:  # not POSIX: builds are not made exclusive
    fcntl = None

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = {
    "fused_bias_act": ["fused_bias_act.cpp", "fused_bias_act_kernel.cu"],
    "upfirdn2d": ["upfirdn2d.cpp", "upfirdn2d_kernel.cu"],
}
_loaded = {}  # extension name -> compiled module, or None once its build or first launch has failed
_told = []  # the toolkit line, once per process


def use_cuda(x):
    """True if `x` should go through the CUDA kernels (before knowing whether they build)."""
    return x.is_cuda and os.environ.get("CNERF_OPS", "").strip().lower() != "ref"


def _valid_cuda_home(path):
    return bool(path) and os.path.exists(os.path.join(path, "lib64", "libcudart.so"))


def toolkit_version(home):
    """A toolkit folder's CUDA version as "major.minor" (from its runtime header, else version.json), or None."""
    try:
        with open(os.path.join(home, "include", "cuda_runtime_api.h")) as handle:
            match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", handle.read())
        if match:
            number = int(match.group(1))
            return f"{number // 1000}.{number % 1000 // 10}"
    except OSError:
        pass
    try:
        with open(os.path.join(home, "version.json")) as handle:
            match = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"(\d+)\.(\d+)', handle.read())
        if match:
            return f"{match.group(1)}.{match.group(2)}"
    except OSError:
        pass
    return None


def _torch_cuda_version():
    import torch

    return torch.version.cuda


def find_cuda_home(wanted=None, search=None):
    """A CUDA toolkit folder holding lib64/libcudart.so, or None.

    CUDA_HOME / CUDA_PATH when set (an explicit choice is kept). Otherwise, of the toolkit of `nvcc` on
    the PATH and `search` (default /usr/local/cuda, /usr/local/cuda-*), the first whose version is `wanted`
    (default: torch's CUDA version), else the first of the same major version, else the first found.
    """
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if _valid_cuda_home(os.environ.get(name)):
            return os.environ[name]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script (e.g. /usr/local/bin/nvcc) names its toolkit inside
            with open(nvcc, errors="replace") as handle:
                candidates += [os.path.dirname(os.path.dirname(path))
                               for path in re.findall(r"(/\S+/bin/nvcc)\b", handle.read(4096))]
        except OSError:
            pass
    candidates += search if search is not None else ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"),
                                                                                 reverse=True)
    found = []
    for path in candidates:
        if _valid_cuda_home(path) and os.path.realpath(path) not in [os.path.realpath(p) for p in found]:
            found.append(path)
    if not found:
        return None
    wanted = wanted if wanted is not None else _torch_cuda_version()
    if wanted:
        versions = {path: toolkit_version(path) for path in found}
        for same in (lambda v: v == wanted, lambda v: v is not None and v.split(".")[0] == wanted.split(".")[0]):
            match = next((path for path in found if same(versions[path])), None)
            if match:
                return match
    return found[0]


def toolkit_line(home):
    """One line naming the toolkit a build uses and whether it matches torch's CUDA version."""
    version, wanted = toolkit_version(home) if home else None, _torch_cuda_version()
    if not home:
        return "op: no CUDA toolkit found (CUDA_HOME, nvcc on the PATH, /usr/local/cuda*)"
    verdict = "matches torch's" if version == wanted else \
        f"torch was built with CUDA {wanted}: kernels may fail to build or load"
    return f"op: CUDA toolkit {home} (CUDA {version or 'unknown'}; {verdict})"


def prepare_build_env():
    """Fill in what cpp_extension needs but cannot always guess; never overrides explicit settings.
    Returns the toolkit folder used (or None)."""
    import torch

    # torch guesses CUDA_HOME from `which nvcc`; for a wrapper script such as /usr/local/bin/nvcc that
    # gives /usr/local, which holds no CUDA headers or libraries, and among several toolkits it does not
    # prefer the one matching its own CUDA version. The guess is made once, when cpp_extension is first
    # imported, so set the variable first and correct the module constant in case it was imported earlier.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        home = find_cuda_home()
        if home:
            os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and cpp_extension.CUDA_HOME != home:
        cpp_extension.CUDA_HOME = home
    # Without a visible GPU torch cannot pick an architecture (compile check only): build for Hopper.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    return home


def build_directory(name):
    """The folder torch builds extension `name` in (TORCH_EXTENSIONS_DIR or its default)."""
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(f"cnerf_{name}", verbose=False)


@contextlib.contextmanager
def exclusive_build(folder):
    """Hold this extension's build lock: an flock, which the kernel releases when its holder dies. Inside it
    no other process of this project is building here, so a `lock` file torch's own baton left behind is
    stale (its builder was killed mid-build) and would make torch wait for it forever: it is removed."""
    if fcntl is None:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "cnerf_build.flock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = os.path.join(folder, "lock")
            if os.path.exists(stale):
                print(f"op: removing {stale}, left by a build that was stopped", file=sys.stderr)
                os.remove(stale)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def compile_extension(name, verbose=False):
    """Build (or reuse the cached build of) one extension and import it. Raises on failure."""
    home = prepare_build_env()  # before importing cpp_extension, which reads CUDA_HOME on import
    from torch.utils import cpp_extension

    if not _told:
        _told.append(toolkit_line(home))
        print(_told[0], file=sys.stderr)
    with exclusive_build(build_directory(name)):
        return cpp_extension.load(
            name=f"cnerf_{name}",
            sources=[os.path.join(_HERE, s) for s in SOURCES[name]],
            extra_cuda_cflags=["-O3"],
            verbose=verbose,
        )


def first_launch(name, ext, device):
    """Run the built kernels once on `device` against the reference (a few values): raises when they
    cannot run there (e.g. "no kernel image is available": built for other architectures) or give wrong
    numbers."""
    import torch

    from .fused_act import fused_leaky_relu_ref
    from .upfirdn import upfirdn2d_ref

    x = torch.linspace(-2.0, 2.0, 24, device=device).reshape(1, 2, 3, 4)
    if name == "fused_bias_act":
        bias = torch.tensor([0.5, -0.25], device=device)
        out = ext.fused_lrelu(x, bias, 0.2, 2 ** 0.5)
        expected = fused_leaky_relu_ref(x, bias, 0.2, 2 ** 0.5)
        grad = ext.lrelu_grad(torch.ones_like(out), out, 0.2, 2 ** 0.5)
        out, expected = torch.cat([out.flatten(), grad.flatten()]), torch.cat(
            [expected.flatten(), torch.where(expected > 0, 2 ** 0.5, 0.2 * 2 ** 0.5).flatten()])
    else:
        kernel = torch.tensor([[1.0, 3.0], [3.0, 1.0]], device=device) / 8
        out, expected = ext.upfirdn2d(x, kernel, 2, 1, 1, 0, 1, 0), upfirdn2d_ref(x, kernel, 2, 1, (1, 0, 1, 0))
    if out.shape != expected.shape or not torch.allclose(out.cpu(), expected.cpu(), rtol=1e-5, atol=1e-6):
        raise RuntimeError("its results differ from the reference's")


def get_extension(name, device=None):
    """The compiled extension, or None when its build or its first launch on `device` failed (warned
    about once)."""
    if name not in _loaded:
        stage = "building"
        try:
            ext = compile_extension(name)
            if device is not None:
                stage = "running"
                first_launch(name, ext, device)
            _loaded[name] = ext
        except Exception as e:  # any build/import/launch problem means: use the reference
            _loaded[name] = None
            msg = str(e).strip().splitlines()
            hint = ""
            if stage == "running":
                hint = f" on {device} (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST') or 'unset'})"
            warnings.warn(
                f"op: {stage} the CUDA op '{name}' failed{hint} ({type(e).__name__}: "
                f"{msg[0][:300] if msg else ''}); using the PyTorch reference instead",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded[name]


def main(argv=None):
    """Build every extension now (so that no process of a later run builds, e.g. torchrun's ranks), try
    each once on the GPU when one is visible, and say where the builds are; exit 1 on failure."""
    import argparse

    import torch

    p = argparse.ArgumentParser(prog="python -m op", description=main.__doc__)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    for name in SOURCES:
        t = time.time()
        try:
            ext = compile_extension(name, verbose=args.verbose)
            if gpu:
                first_launch(name, ext, torch.device(torch.accelerator.current_accelerator().type, 0))
        except Exception as e:
            lines = str(e).strip().splitlines()
            print(f"error: op '{name}': {type(e).__name__}: {lines[0][:300] if lines else ''}", file=sys.stderr)
            return 1
        print(f"{name}: built in {time.time() - t:.1f} s{' and ran on the GPU' if gpu else ''} "
              f"({build_directory(name)})")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs' architectures"
    print(f"ready: processes with the same TORCH_EXTENSIONS_DIR and TORCH_CUDA_ARCH_LIST ({arch}) load these builds")
    return 0

"""op/: references against independent implementations, gradients of every order, the dispatcher,
the CUDA build (nvcc needed, no GPU) and CUDA-vs-reference equality (GPU needed)."""
import os
import shutil
import sys
import time
import types
import warnings

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from op import FusedLeakyReLU, build, fused_leaky_relu, fused_leaky_relu_ref, upfirdn2d, upfirdn2d_ref

upfirdn = sys.modules["op.upfirdn"]
has_gpu = torch.cuda.is_available()
BLUR = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0

# (up, down, pad, kernel shape, input H, W): StyleGAN2's uses plus odd sizes and negative pads.
CONFIGS = [
    (1, 1, (0, 0), (4, 4), 5, 6),
    (2, 1, (2, 1), (4, 4), 4, 5),   # Upsample
    (1, 2, (2, 1), (4, 4), 6, 7),   # Downsample / Blur before a stride-2 conv
    (1, 1, (1, 1), (4, 4), 5, 5),   # Blur after the transposed conv
    (2, 2, (1, 1), (3, 3), 5, 4),
    (3, 2, (-1, 2), (2, 3), 4, 5),
    (1, 1, (-2, -1), (1, 2), 6, 6),
    (2, 1, (2, 1, 0, -1), (3, 2), 3, 4),  # (x0, x1, y0, y1)
    (1, 3, (4, -1), (3, 1), 7, 5),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def upfirdn2d_numpy(x, k, up, down, pad):
    """Independent implementation: explicit zero insertion, np.pad / crop, scipy's convolution."""
    x0, x1, y0, y1 = pad if len(pad) == 4 else pad * 2
    b, c, h, w = x.shape
    out = []
    for plane in x.reshape(b * c, h, w):
        z = np.zeros((h * up, w * up))
        z[::up, ::up] = plane
        z = np.pad(z, ((max(y0, 0), max(y1, 0)), (max(x0, 0), max(x1, 0))))
        z = z[max(-y0, 0): z.shape[0] - max(-y1, 0), max(-x0, 0): z.shape[1] - max(-x1, 0)]
        out.append(convolve2d(z, k, mode="valid")[::down, ::down])
    return np.stack(out).reshape(b, c, *out[0].shape)


def rand(*shape, dtype=torch.float64, device="cpu", seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)


# ----------------------------------------------------------------------------- references

@pytest.mark.parametrize("up,down,pad,kshape,h,w", CONFIGS)
def test_upfirdn2d_ref_matches_numpy(up, down, pad, kshape, h, w):
    x, k = rand(2, 3, h, w), rand(*kshape, seed=1)
    out = upfirdn2d_ref(x, k, up, down, pad)
    np.testing.assert_allclose(out.numpy(), upfirdn2d_numpy(x.numpy(), k.numpy(), up, down, pad), atol=1e-12)
    x0, x1, y0, y1 = pad if len(pad) == 4 else pad * 2
    assert out.shape[2:] == ((h * up + y0 + y1 - kshape[0]) // down + 1, (w * up + x0 + x1 - kshape[1]) // down + 1)


def test_upfirdn2d_hand_values():
    # Convolution, not correlation: [1, 2, 3] * [1, 2] (valid) = [2+2, 3+4].
    x = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    assert upfirdn2d(x, torch.tensor([[1.0, 2.0]])).tolist() == [[[[4.0, 7.0]]]]
    # up=2 inserts a zero after every sample (rows too): [1, 0, 2, 0] * [1, 1] = [1, 2, 2].
    out = upfirdn2d(torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[1.0, 1.0]]), up=2)
    assert out.tolist() == [[[[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]]]]
    # Negative pads crop; down keeps samples 0, 2, ...
    out = upfirdn2d(torch.arange(6.0).view(1, 1, 1, 6), torch.ones(1, 1), down=2, pad=(-1, 0, 0, 0))
    assert out.tolist() == [[[[1.0, 3.0, 5.0]]]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upfirdn2d_dtypes(dtype):
    x, k = rand(2, 3, 8, 8, dtype=dtype), torch.tensor(BLUR, dtype=torch.float32)  # float32 buffer
    out = upfirdn2d(x, k * 4, up=2, pad=(2, 1))
    assert out.dtype == dtype and out.shape == (2, 3, 16, 16)
    ref = upfirdn2d_numpy(x.double().numpy(), BLUR * 4, 2, 1, (2, 1))
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_fused_leaky_relu_values():
    x, b = torch.tensor([[-1.0, 2.0], [3.0, -4.0]]), torch.tensor([0.5, -3.0])
    expected = torch.tensor([[-0.1, -0.2], [3.5, -1.4]]) * 2 ** 0.5
    torch.testing.assert_close(fused_leaky_relu(x, b), expected)
    torch.testing.assert_close(fused_leaky_relu(x, None, 0.1, 2.0), torch.tensor([[-0.2, 4.0], [6.0, -0.8]]))
    x4 = rand(2, 3, 4, 5)  # bias broadcast on dim 1
    b = rand(3, seed=1)
    ref = np.where(x4.numpy() + b.numpy()[:, None, None] > 0, 1.0, 0.2) * (x4.numpy() + b.numpy()[:, None, None])
    np.testing.assert_allclose(fused_leaky_relu(x4, b).numpy(), ref * 2 ** 0.5, atol=1e-12)


def test_fused_leaky_relu_module():
    m = FusedLeakyReLU(3)
    assert [n for n, _ in m.named_parameters()] == ["bias"] and m.bias.shape == (3,) and not m.bias.any()
    x = rand(2, 3, 4, 4)
    torch.testing.assert_close(m.double()(x), torch.nn.functional.leaky_relu(x, 0.2) * 2 ** 0.5)
    assert FusedLeakyReLU(3, bias=False).bias is None


# ----------------------------------------------------------------------------- gradients

def fused_cases():
    yield rand(3, 4, grad=True), rand(4, seed=1, grad=True)
    yield rand(2, 3, 4, 5, grad=True), rand(3, seed=1, grad=True)
    yield (rand(2, 3, 4, grad=True),)  # no bias


@pytest.mark.parametrize("case", range(3))
def test_fused_leaky_relu_ref_gradcheck(case):
    inputs = list(fused_cases())[case]
    assert torch.autograd.gradcheck(fused_leaky_relu_ref, inputs)
    assert torch.autograd.gradgradcheck(fused_leaky_relu_ref, inputs)


@pytest.mark.parametrize("up,down,pad,kshape,h,w", CONFIGS)
def test_upfirdn2d_ref_gradcheck(up, down, pad, kshape, h, w):
    x, k = rand(1, 2, h, w, grad=True), rand(*kshape, seed=1, grad=True)
    f = lambda x, k: upfirdn2d_ref(x, k, up, down, pad)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, k))
    assert torch.autograd.gradgradcheck(f, (x, k))


@pytest.mark.parametrize("up,down,pad,kshape,h,w", CONFIGS)
def test_upfirdn2d_grad_pad_is_the_adjoint(up, down, pad, kshape, h, w):
    """The CUDA backward's formula (an upfirdn2d with flipped kernel, swapped up/down) = autograd."""
    x, k = rand(1, 2, h, w, grad=True), rand(*kshape, seed=1)
    out = upfirdn2d_ref(x, k, up, down, pad)
    g = rand(*out.shape, seed=2)
    (expected,) = torch.autograd.grad(out, x, g)
    gpad = upfirdn._grad_pad(k.shape, (h, w), out.shape[2:], up, down, upfirdn._parse_pad(pad))
    torch.testing.assert_close(upfirdn2d_ref(g, k.flip([0, 1]), down, up, gpad), expected)


class FakeExtensions:
    """Stands in for the compiled extensions, computing with the references on the CPU, so the
    autograd Functions of the CUDA path (and their second-order wiring) are tested without a GPU."""

    def __init__(self):
        self.calls = 0

    def fused_lrelu(self, x, bias, slope, scale):
        self.calls += 1
        with torch.no_grad():
            return fused_leaky_relu_ref(x, bias, slope, scale)

    def lrelu_grad(self, grad, out, slope, scale):
        self.calls += 1
        g = grad * scale
        return torch.where(out > 0, g, g * slope)

    def upfirdn2d(self, x, kernel, up, down, x0, x1, y0, y1):
        self.calls += 1
        with torch.no_grad():
            return upfirdn2d_ref(x, kernel, up, down, (x0, x1, y0, y1))


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeExtensions()
    monkeypatch.setattr(build, "use_cuda", lambda x: True)
    monkeypatch.setattr(build, "_loaded", {"fused_bias_act": fake, "upfirdn2d": fake})
    return fake


@pytest.mark.parametrize("case", range(3))
def test_fused_leaky_relu_cuda_path_gradcheck_with_fake_kernels(fake_cuda, case):
    inputs = list(fused_cases())[case]
    torch.testing.assert_close(fused_leaky_relu(*inputs), fused_leaky_relu_ref(*inputs))
    assert torch.autograd.gradcheck(fused_leaky_relu, inputs)
    assert torch.autograd.gradgradcheck(fused_leaky_relu, inputs)
    assert fake_cuda.calls > 0


@pytest.mark.parametrize("up,down,pad,kshape,h,w", CONFIGS)
def test_upfirdn2d_cuda_path_gradcheck_with_fake_kernels(fake_cuda, up, down, pad, kshape, h, w):
    x, k = rand(1, 2, h, w, grad=True), rand(*kshape, seed=1)
    f = lambda x: upfirdn2d(x, k, up, down, pad)  # noqa: E731
    torch.testing.assert_close(f(x), upfirdn2d_ref(x, k, up, down, pad))
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    assert fake_cuda.calls > 0


def test_cuda_path_skips_what_the_kernels_do_not_support(fake_cuda):
    x, k = rand(1, 1, 4, 4), rand(2, 2, seed=1)
    upfirdn2d(x, k.requires_grad_())  # a trainable filter: the kernels give it no gradient
    fused_leaky_relu(x, None, negative_slope=-0.1)  # the mask is read off the output's sign
    fused_leaky_relu(x, None, scale=-1.0)
    assert fake_cuda.calls == 0


# ----------------------------------------------------------------------------- dispatcher

def test_cpu_tensors_use_the_reference(monkeypatch):
    def no_build(name, verbose=False):
        raise AssertionError("CPU tensors must not trigger a CUDA build")

    monkeypatch.setattr(build, "compile_extension", no_build)
    monkeypatch.setattr(build, "_loaded", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_leaky_relu(rand(2, 3), rand(3))
        upfirdn2d(rand(1, 1, 4, 4), rand(2, 2))
    assert build._loaded == {}


def test_cnerf_ops_ref_forces_the_reference(monkeypatch):
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("CNERF_OPS", raising=False)
    assert build.use_cuda(cuda_like) and not build.use_cuda(rand(1))
    monkeypatch.setenv("CNERF_OPS", "ref")
    assert not build.use_cuda(cuda_like)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    attempts = []

    def broken(name, verbose=False):
        attempts.append(name)
        raise RuntimeError("Error building extension 'cnerf_x': nvcc exploded")

    monkeypatch.setattr(build, "compile_extension", broken)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "use_cuda", lambda x: True)  # CPU tensors pretend to be CUDA
    x, b = rand(2, 3, 4, 4), rand(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(fused_leaky_relu(x, b), fused_leaky_relu_ref(x, b))
    assert attempts == ["fused_bias_act"]
    assert len(caught) == 1 and "fused_bias_act" in str(caught[0].message)
    assert "nvcc exploded" in str(caught[0].message)


class CannotLaunch(FakeExtensions):
    """A build for other GPU architectures: it loads, and its first kernel launch fails."""

    def fused_lrelu(self, *args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    upfirdn2d = fused_lrelu


class WrongNumbers(FakeExtensions):
    def upfirdn2d(self, x, kernel, *args):
        return super().upfirdn2d(x, kernel, *args) + 1


@pytest.mark.parametrize("extension,fragment", [(CannotLaunch, "no kernel image is available"),
                                                (WrongNumbers, "differ from the reference")])
def test_kernels_that_fail_their_first_launch_fall_back_with_one_warning(monkeypatch, extension, fragment):
    """A wrong TORCH_CUDA_ARCH_LIST builds fine and fails at the first kernel launch: the first use tries
    the kernels once on the device, and a failure (or wrong numbers) means the reference, with one warning
    per extension, instead of a crash in the middle of a run."""
    built = []
    monkeypatch.setattr(build, "compile_extension", lambda name, verbose=False: built.append(name) or extension())
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "use_cuda", lambda x: True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "5.0")
    x, b, k = rand(2, 3, 4, 4), rand(3), rand(2, 2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(fused_leaky_relu(x, b), fused_leaky_relu_ref(x, b))
            torch.testing.assert_close(upfirdn2d(x, k, 2, 1, (1, 1)), upfirdn2d_ref(x, k, 2, 1, (1, 1)))
    messages = [str(w.message) for w in caught]
    assert built == ["fused_bias_act", "upfirdn2d"] and build._loaded["upfirdn2d"] is None
    assert (build._loaded["fused_bias_act"] is None) == (extension is CannotLaunch)
    failing = [m for m in messages if fragment in m]
    assert len(failing) == len(messages) == (2 if extension is CannotLaunch else 1)
    assert all("TORCH_CUDA_ARCH_LIST=5.0" in m and "using the PyTorch reference" in m for m in failing)


def test_working_kernels_are_used_after_their_first_launch(monkeypatch):
    fake = FakeExtensions()
    monkeypatch.setattr(build, "compile_extension", lambda name, verbose=False: fake)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "use_cuda", lambda x: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_leaky_relu(rand(2, 3), rand(3))
    assert build._loaded["fused_bias_act"] is fake and fake.calls == 3  # 2 on the trial, 1 for the call


def fake_toolkit(root, name, version):
    home = root / name
    (home / "lib64").mkdir(parents=True)
    (home / "lib64" / "libcudart.so").write_text("")
    (home / "include").mkdir()
    major, minor = version.split(".")
    (home / "include" / "cuda_runtime_api.h").write_text(
        f"#define CUDART_VERSION  {int(major) * 1000 + int(minor) * 10}\n")
    return str(home)


def test_the_toolkit_matching_torchs_cuda_version_is_preferred(tmp_path, monkeypatch):
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    old, newer, same = (fake_toolkit(tmp_path, n, v) for n, v in (("cuda-12.4", "12.4"), ("cuda-13.1", "13.1"),
                                                                  ("cuda-13.0", "13.0")))
    search = [str(tmp_path / "missing"), old, newer, same]
    assert build.toolkit_version(same) == "13.0" and build.toolkit_version(str(tmp_path)) is None
    assert build.find_cuda_home("13.0", search) == same  # the exact version, though listed last
    assert build.find_cuda_home("13.2", search) == newer  # else the same major version
    assert build.find_cuda_home("11.8", search) == old  # else the first toolkit found
    assert build.find_cuda_home("13.0", [str(tmp_path / "missing")]) is None
    monkeypatch.setenv("CUDA_HOME", old)  # an explicit choice is kept
    assert build.find_cuda_home("13.0", search) == old
    monkeypatch.setattr(build, "_torch_cuda_version", lambda: "13.0")
    assert build.toolkit_line(same) == f"op: CUDA toolkit {same} (CUDA 13.0; matches torch's)"
    assert "torch was built with CUDA 13.0" in build.toolkit_line(old) and "12.4" in build.toolkit_line(old)


@pytest.mark.skipif(build.fcntl is None, reason="no flock on this system")
def test_a_build_removes_the_lock_of_a_killed_build_and_holds_its_own(tmp_path, monkeypatch):
    """torch's build baton is a plain file: a rank killed mid-build leaves it, and the next run waits for it
    forever. Builds here hold a kernel lock (gone with its process), inside which such a file is stale."""
    from torch.utils import cpp_extension

    folder = tmp_path / "cnerf_fused_bias_act"
    folder.mkdir()
    (folder / "lock").write_text("")
    seen = []

    def fake_load(name, sources, extra_cuda_cflags, verbose):
        seen.append(not (folder / "lock").exists())
        with open(folder / "cnerf_build.flock", "a") as other:  # another process's attempt
            with pytest.raises(BlockingIOError):
                build.fcntl.flock(other, build.fcntl.LOCK_EX | build.fcntl.LOCK_NB)
        return "module"

    monkeypatch.setattr(build, "prepare_build_env", lambda: None)
    monkeypatch.setattr(build, "build_directory", lambda name: str(tmp_path / f"cnerf_{name}"))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert build.compile_extension("fused_bias_act") == "module" and seen == [True]
    with open(folder / "cnerf_build.flock", "a") as other:  # released afterwards
        build.fcntl.flock(other, build.fcntl.LOCK_EX | build.fcntl.LOCK_NB)


def test_python_m_op_builds_ahead_or_says_why_not(monkeypatch, capsys):
    monkeypatch.setattr(build, "build_directory", lambda name: f"/cache/cnerf_{name}")
    monkeypatch.setattr(build, "compile_extension", lambda name, verbose=False: FakeExtensions())
    assert build.main([]) == 0
    out = capsys.readouterr().out
    assert "fused_bias_act: built in" in out and "/cache/cnerf_upfirdn2d" in out and out.rstrip().splitlines()[-1]\
        .startswith("ready: processes with the same TORCH_EXTENSIONS_DIR")

    def broken(name, verbose=False):
        raise RuntimeError("Error building extension 'cnerf_fused_bias_act'\nlong log")

    monkeypatch.setattr(build, "compile_extension", broken)
    assert build.main([]) == 1
    assert capsys.readouterr().err == "error: op 'fused_bias_act': RuntimeError: Error building extension " \
                                      "'cnerf_fused_bias_act'\n"


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.cuda_build
@pytest.mark.skipif(shutil.which("nvcc") is None and build.find_cuda_home() is None, reason="no nvcc")
def test_cuda_sources_compile(monkeypatch):
    """Builds both extensions with ninja (cached in the torch extensions dir; ~70 s fresh on 2 cores)."""
    if not has_gpu:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0")
    home = os.environ.get("CUDA_HOME") or build.find_cuda_home()
    if home:
        monkeypatch.setenv("CUDA_HOME", home)
    start = time.time()
    for name in build.SOURCES:
        ext = build.compile_extension(name)
        assert callable(getattr(ext, "upfirdn2d" if name == "upfirdn2d" else "fused_lrelu"))
    print(f"CUDA ops built in {time.time() - start:.1f} s")


gpu = pytest.mark.skipif(not has_gpu, reason="needs a CUDA GPU")


def value_and_derivatives(fn, inputs, seed=3):
    """Output, first derivatives (of <out, w>) and second derivatives (of the squared first ones,
    w.r.t. the inputs and w) — the pattern of R1 and path-length regularisation."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    w = rand(*out.shape, dtype=out.dtype, device=out.device, seed=seed, grad=True)
    first = torch.autograd.grad((out * w).sum(), inputs, create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in first), inputs + [w], allow_unused=True)
    second = [torch.zeros_like(t) if s is None else s for s, t in zip(second, inputs + [w])]
    return [out, *first, *second]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(monkeypatch, dtype):
    monkeypatch.delenv("CNERF_OPS", raising=False)
    assert build.get_extension("fused_bias_act") is not None and build.get_extension("upfirdn2d") is not None
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    dev = torch.device("cuda")
    for x, *b in fused_cases():
        inputs = [t.to(dev, dtype) for t in (x, *b)]
        cuda = value_and_derivatives(fused_leaky_relu, inputs)
        ref = value_and_derivatives(fused_leaky_relu_ref, inputs)
        for c, r in zip(cuda, ref):
            torch.testing.assert_close(c, r, **tol)
    for up, down, pad, kshape, h, w in CONFIGS:
        k = rand(*kshape, seed=1, dtype=dtype, device=dev)
        x = rand(2, 3, h, w, dtype=dtype, device=dev)
        cuda = value_and_derivatives(lambda x: upfirdn2d(x, k, up, down, pad), [x])
        ref = value_and_derivatives(lambda x: upfirdn2d_ref(x, k, up, down, pad), [x])
        for c, r in zip(cuda, ref):
            torch.testing.assert_close(c, r, **tol)


@gpu
def test_cuda_gradcheck(monkeypatch):
    monkeypatch.delenv("CNERF_OPS", raising=False)
    dev = torch.device("cuda")
    for inputs in fused_cases():
        inputs = [t.detach().to(dev).requires_grad_(True) for t in inputs]
        assert torch.autograd.gradcheck(fused_leaky_relu, inputs)
        assert torch.autograd.gradgradcheck(fused_leaky_relu, inputs)
    for up, down, pad, kshape, h, w in CONFIGS:
        k = rand(*kshape, seed=1, device=dev)
        x = rand(1, 2, h, w, device=dev, grad=True)
        f = lambda x: upfirdn2d(x, k, up, down, pad)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))

"""Mixed precision (issue 25): `--precision fp32|bf16|auto`, what runs in bfloat16, and why.

One flag for every command (options.py, experiment group). `resolve(requested, device)` turns it into
"fp32" or "bf16": `auto` is bf16 only where the device multiplies bfloat16 natively — a CPU with
AVX-512 BF16 or AMX-BF16 (the `avx512_bf16` / `amx_bf16` flags of /proc/cpuinfo), a CUDA device with
bf16 tensor cores (compute capability 8.0 or later) — and fp32 elsewhere; an explicit `bf16` on a device
without native support prints one line (it works, through conversions, but slowly) and goes on. fp32
changes nothing: no hook is installed and no cast is made, so fp32 and float64 results are the same bit
for bit as without this module.

What runs in bf16 (`apply(mode, device, *modules)` installs it on built models; nothing else changes):
  * the StyleGAN2 decoder, the feature transfer and the discriminators (except on the real images of an
    R1 step, below) run under torch.autocast(device, bfloat16): their convolutions, transposed
    convolutions and linear layers take bf16 operands (accumulating in fp32); elementwise work (bias +
    leaky ReLU, noise, blur padding) follows PyTorch's promotion and is mostly fp32. A module's floating
    outputs are cast back to float32 when it returns, so losses, their reductions, the R1 / path-length
    penalties' final products, the optimisers (whose states and master weights are the fp32
    parameters: autocast casts copies, cached only within one forward) and the EMA never see bf16.
  * the renderer (VolumeFeatureRenderer.forward) reads the autocast state on entry and then turns
    autocast off: its fast path (rendering/fast_render.py) casts by hand instead. In bf16 the
    trunk's hidden FiLM-SIREN layers (the [K, C, C] × [K, C, P] batched matmuls that are stage 1's
    cost), their sines and cosines, the heads' matmuls and the eikonal reverse pass (W_iᵀ δ_i) take
    bf16 operands; the hand-written backward of SirenEikonal works on the same bf16 activations (a
    kept chunk graph costs half as much memory).
What stays fp32 (float64 in a float64 run), and why:
  * the ray coordinates, depths and the first SIREN layer (addmm of the coordinates by γ·W_0, with
    its bias γ·b_0 + β, and its sine/cosine): the phase is tens of radians and bf16 has 8 mantissa
    bits (spacing 0.125 rad at 16), so the first layer would alias the geometry; it is a 3-wide
    contraction, cheap in fp32. Its bf16 activations feed the next layer.
  * the folded FiLM weights themselves (γ·W and γ·b + β are computed in fp32 once per image and cast
    afterwards; the cast's backward returns fp32 gradients to the fp32 leaves), both mapping networks
    (`style` modules: they set every γ, β and modulation; cheap), the truncation arithmetic;
  * everything after the heads: Δsdf, sdf0 + Δsdf, the SDF-to-density step (sigmoid(-sdf/β)/β),
    alpha, the transmittance cumprod and the volume integration, the rendered images, masks and
    features; the eikonal gradient's last product (W_0ᵀ δ_0, a 3-row matmul) and the /span scale;
  * a discriminator's pass on the real images when the R1 penalty is taken (every stage-1 iteration,
    every d_reg_every-th in stage 2): training/steps.penalised_real_pass runs it inside full_precision(),
    and the penalty's double backward follows that fp32 graph. The R1 penalty on the masks is the gradient
    of D's output with respect to a near one-hot 9-channel input, weighted by --r1_seg (100–1000). In bf16,
    on the committed stage-1 snapshot and real portraits, the global D's came out 14–19 % low and the
    gradient it gives D's weights had cosine 0.71–0.76 with fp32's (the image penalty: within 0.4 %); the
    semantic D's were off by up to 7.5 %, cosine 0.97. Keeping the mask branches (`convs_seg`) fp32 in
    every pass fixed the global D but not the semantic one; a 300-iteration stage-1 run with them in bf16
    drifted from fp32 in its R1 and viewpoint losses (docs/how_the_shipped_model_was_made.md, "bfloat16").
    The fake images' pass and the generator's pass through D stay bf16: on the snapshot's own renders the
    gradients they give the generator's image and masks have cosine >= 0.997 with fp32's.
  * the renderer's reference path (render_path: reference) and every camera-differentiable render
    (inversion with a learnt camera): fp32 throughout.
Measurements that decided it (one core of this project's Xeon, AVX-512 BF16 + AMX, torch 2.14.1):
  batched matmul [9, 128, 128] × [9, 128, 1536] 90 GFLOP/s fp32 vs 825 GFLOP/s bf16 (AMX); sin of
  1.8 M values 0.76 ms fp32 (torch), bf16 about the same after its conversions — so in bf16 the
  trunk's elementwise work, not its matmuls, is the cost, and the heads' thin matmuls (1 or 3 output
  rows) gain only from the halved reads. See BENCHMARKS.md for the workloads and the picture test
  (tests/test_precision.py) for the agreement with fp32.
"""
import contextlib
import sys
import threading

import torch

MODES = ("fp32", "bf16", "auto")
# Submodules that stay fp32 inside a bf16 model (module docstring): the mapping networks.
FP32_PARTS = ("style",)

_warned = set()
_local = threading.local()


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags (a set of words; empty where /proc/cpuinfo does not exist)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device):
    """True where `device` multiplies bfloat16 natively (AVX-512 BF16 / AMX on a CPU, compute capability
    8.0+ on CUDA)."""
    device = torch.device(device)
    if device.type == "cpu":
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index) >= (8, 0)
    return False


def resolve(requested, device, out=sys.stderr):
    """'fp32' or 'bf16' for `--precision requested` on `device` (see the module docstring). An explicit
    bf16 without native support prints one line (once per process and device type) and is kept."""
    requested = (requested or "fp32").lower()
    if requested not in MODES:
        raise ValueError(f"precision must be one of {', '.join(MODES)}, got {requested!r}")
    device = torch.device(device)
    if requested == "fp32":
        return "fp32"
    native = native_bf16(device)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if not native and device.type not in _warned:
        _warned.add(device.type)
        print(f"note: --precision bf16 on {device.type}: this device has no native bfloat16 arithmetic, "
              f"so bf16 will be slow (use fp32 or auto)", file=out)
    return "bf16"


def compute_dtype(device_type):
    """The low-precision dtype the current thread's autocast asks for on `device_type`, or None when autocast
    is off there (what the renderer reads on entry, before it turns autocast off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def to_float32(value):
    """`value` with every bf16/fp16 tensor in it (tuples, lists, dicts) cast to float32."""
    if torch.is_tensor(value):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, tuple):
        return tuple(to_float32(v) for v in value)
    if isinstance(value, list):
        return [to_float32(v) for v in value]
    if isinstance(value, dict):
        return type(value)((k, to_float32(v)) for k, v in value.items())
    return value


def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextlib.contextmanager
def full_precision():
    """Inside, on this thread, the modules apply() made bf16 run in fp32 (their hooks enter autocast disabled),
    for the passes whose input gradients are penalised: the real images' pass under the R1 penalty."""
    _local.full = getattr(_local, "full", 0) + 1
    try:
        yield
    finally:
        _local.full -= 1


def _region(module, device_type, enabled):
    """Forward hooks that run `module` inside torch.autocast(device_type, bf16, enabled) — enabled=False
    keeps it fp32 inside a bf16 region, and so does full_precision() — and cast its outputs to float32.
    The context is entered in the pre-hook and left in the (always called) post-hook, on the calling
    thread."""
    def enter(_module, _args):
        on = enabled and not getattr(_local, "full", 0)
        context = torch.autocast(device_type, dtype=torch.bfloat16, enabled=on)
        context.__enter__()
        _stack().append(context)

    def leave(_module, _args, output):
        _stack().pop().__exit__(None, None, None)
        return to_float32(output)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


def apply(mode, device, *modules):
    """Install a resolved mode on built models (Generator or discriminator modules; None entries are
    skipped). fp32 installs nothing. bf16: each module runs under bf16 autocast (fp32 inside
    full_precision()), its FP32_PARTS (the `style` mapping networks) stay fp32, its outputs come back as
    float32; the renderer picks the mode up from the autocast state. Returns the hook handles (remove()
    undoes)."""
    if mode == "fp32":
        return []
    if mode != "bf16":
        raise ValueError(f"apply() takes a resolved mode (fp32 or bf16), got {mode!r}")
    device_type = torch.device(device).type
    handles = []
    for module in modules:
        if module is None:
            continue
        handles += _region(module, device_type, True)
        for name, sub in module.named_modules():
            if name.rsplit(".", 1)[-1] in FP32_PARTS:
                handles += _region(sub, device_type, False)
    return handles


def from_options(opt, device, *modules, out=sys.stderr):
    """resolve(opt.experiment.precision) and apply it to `modules`: the resolved mode."""
    mode = resolve(opt.experiment.precision, device, out=out)
    apply(mode, device, *modules)
    return mode


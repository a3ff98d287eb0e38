"""The shipped synthetic-portrait model (checkpoints/synthetic_portraits.pt, issue 15): it loads strictly
from the file alone, renders frontal portraits whose segmentation has every region a portrait has at
plausible places, and a texture swap of the hair changes the picture mostly inside the hair.

What is asked of each region is what the model was measured to do on 64 other portraits (seeds 100-163,
README "Run 4"), not tuned on the portraits here: every region but the brows in at least 7 of the 8 (the
nose, the weakest of them, is in 57 of the 64); the brows, drawn in only 24 of the 64 (the data's 64-px
label maps: 387 of 400), in at least one portrait, which shows every region at once — the issue's "a
frontal portrait whose rendered seg has every region". No portrait may have a placement problem.

Skipped (with the reason) in a checkout that does not ship the model yet; not counted as coverage then.
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.checkpoint import load_checkpoint  # noqa: E402
from common.regions import REGION_NAMES  # noqa: E402
from evaluation import measures  # noqa: E402
from rendering import loading as gen  # noqa: E402
from rendering.latents import mean_latent  # noqa: E402

SHIPPED = ROOT / "checkpoints" / "synthetic_portraits.pt"
SEEDS = list(range(8))
PSI = 0.7

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason=f"{SHIPPED.name} is not shipped in this checkout")


@pytest.fixture(scope="module")
def check():
    """measures.portrait_check on the shipped model: 8 frontal portraits at ψ 0.7, a hair texture swap."""
    torch.set_num_threads(1)
    opt, _ = gen.parse_options(["--trained_ckpt", str(SHIPPED), "--device", "cpu"])
    generator, _ = gen.load_models(opt, torch.device("cpu"), n_samples=opt.rendering.N_samples)
    mean = mean_latent(generator, 2000)
    return measures.portrait_check(generator, opt, mean, PSI, SEEDS, swap_region="hair")


def test_loads_strictly_from_the_file_alone():
    ckpt = load_checkpoint(SHIPPED)
    assert set(ckpt) >= {"g_ema", "config"} and SHIPPED.stat().st_size <= 40 * 2 ** 20
    opt, _ = gen.parse_options(["--trained_ckpt", str(SHIPPED)])
    generator, _ = gen.load_models(opt, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in generator.parameters())  # float16 on disk, float32 loaded
    assert generator.size == ckpt["config"]["model"]["size"] >= 64
    assert generator.renderer.out_im_res == ckpt["config"]["model"]["renderer_spatial_output_dim"] >= 32


def test_frontal_portraits_have_every_region_in_place(check):
    for name in measures.PORTRAIT_REGIONS:
        if name != "brow":  # measured: brows in 24 of 64 portraits (module docstring)
            assert check["shown"][name] >= len(SEEDS) - 1, f"{name} visible in only {check['shown'][name]}/{len(SEEDS)} portraits"
    wanted = {REGION_NAMES.index(name) for name in measures.PORTRAIT_REGIONS}
    complete = [i for i, labels in enumerate(check["labels"]) if wanted <= set(labels.unique().tolist())]
    assert complete, "no portrait shows every region (" + ", ".join(measures.PORTRAIT_REGIONS) + ")"
    assert not check["problems"], "; ".join(check["problems"])


def test_hair_texture_swap_is_local(check):
    inside, outside = check["swap"]["inside"], check["swap"]["outside"]
    assert inside > 0.02, f"the swap barely changed the hair (mean |Δ| inside {inside:.4f})"
    assert outside < 0.1 * inside, f"outside/inside = {outside / inside:.3f} (inside {inside:.4f})"

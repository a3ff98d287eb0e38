"""Random-weight generators the tests save and load: one helper instead of a copy per test file."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.checkpoint import save_checkpoint  # noqa: E402
from model import Generator  # noqa: E402
from options import model_options  # noqa: E402
from rendering import loading as gen  # noqa: E402


def save_random_generator(path, argv, seed=0):
    """Save a {"g_ema": ...} checkpoint of a random full generator built from the model flags `argv`;
    returns the option tree, with --trained_ckpt set to `path`."""
    opt, _ = gen.parse_options(list(map(str, argv)))
    torch.manual_seed(seed)
    save_checkpoint({"g_ema": Generator(model_options(opt)[0], opt.rendering, ema=True).state_dict()}, path)
    opt.training.trained_ckpt = str(path)
    return opt

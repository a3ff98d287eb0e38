"""What several test files need: random-weight generators saved as checkpoints, and scripts loaded by path."""
import importlib.util
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

# The smallest full pipeline (renderer 8×8, decoder to 16 px), on the CPU: the editing and editor tests' model.
TINY_FULL = ["--size", "16", "--renderer_spatial_output_dim", "8", "--style_dim", "32", "--width", "32",
             "--N_samples", "8", "--channel_multiplier", "1", "--truncation_mean", "500", "--device", "cpu"]


def save_random_generator(path, argv, seed=0):
    """Save a {"g_ema": ...} checkpoint of a random full generator built from the model flags `argv`;
    returns the option tree, with --trained_ckpt set to `path`."""
    opt, _ = gen.parse_options(list(map(str, argv)))
    torch.manual_seed(seed)
    save_checkpoint({"g_ema": Generator(model_options(opt)[0], opt.rendering, ema=True).state_dict()}, path)
    opt.training.trained_ckpt = str(path)
    return opt


def load_script(relpath):
    """A script of the repository (e.g. "tools/track_checkpoints.py") as a module, loaded by its path:
    tools/ is not a package and must not shadow other modules on sys.path."""
    name = "script_" + str(relpath).replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Developer tools around a training run: loss curves (tools/plot_losses.py) and the shipping export
(tools/export_generator.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.checkpoint import architecture_config, load_checkpoint, load_generator, save_checkpoint  # noqa: E402
from rendering import loading as gen  # noqa: E402
from tools import export_generator, plot_losses  # noqa: E402

TINY = ["--size", "32", "--renderer_spatial_output_dim", "16", "--style_dim", "16", "--width", "16",
        "--N_samples", "4", "--channel_multiplier", "1"]


def write_log(path, records):
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def test_moving_average_is_trailing_mean():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    assert np.allclose(plot_losses.moving_average(values, 2), [1.0, 2.0, 4.0, 6.0])
    assert np.allclose(plot_losses.moving_average(values, 10), [1.0, 2.0, 3.0, 4.0])


def test_log_keeps_last_record_of_a_resumed_step_and_plots(tmp_path):
    log = tmp_path / "volume_renderer" / "losses.jsonl"
    log.parent.mkdir()
    # Steps 0-2, then a resume from step 1 logs 1 and 2 again with other values.
    write_log(log, [{"step": 0, "d": 1.0, "g": 2.0}, {"step": 1, "d": 1.5, "g": 2.5}, {"step": 2, "d": 9.0},
                    {"step": 1, "d": 0.5, "g": 1.5}, {"step": 2, "d": 0.25, "g": 1.0}])
    curves = plot_losses.read_log(str(log))
    assert list(curves["d"][0]) == [0, 1, 2] and list(curves["d"][1]) == [1.0, 0.5, 0.25]
    assert list(curves["g"][1]) == [2.0, 1.5, 1.0]
    assert sorted(curves) == ["d", "g"]  # the step is the x axis, not a curve
    out = tmp_path / "curves.png"
    plot_losses.main([str(log), str(log), "--out", str(out), "--smooth", "2"])
    with Image.open(out) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert height > 300 and width > 400  # two rows of two panels
    assert (pixels.std(axis=(0, 1)) > 10).all()  # curves and text, not a blank canvas


def test_plot_losses_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "d": 1}\nnot json\n')
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_losses.py"), str(bad), "--out",
                             str(tmp_path / "x.png")], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {bad}:2: not a loss record ('not json')"
    assert not (tmp_path / "x.png").exists()


def test_export_half_precision_loads_as_float32(tmp_path):
    opt, _ = gen.parse_options(TINY)
    torch.manual_seed(0)
    generator = gen.build_generator(opt)
    source = tmp_path / "run_full_pipeline.pt"
    save_checkpoint({"g_ema": generator.state_dict(), "iter": 41, "config": architecture_config(opt)}, source)
    shipped = tmp_path / "shipped.pt"
    export_generator.export(str(source), str(shipped), half=True)
    ckpt = load_checkpoint(shipped)
    assert ckpt["iter"] == 41 and ckpt["dtype"] == "float16" and ckpt["config"] == architecture_config(opt)
    assert all(v.dtype == torch.float16 for v in ckpt["g_ema"].values() if v.is_floating_point())
    assert shipped.stat().st_size < 0.6 * source.stat().st_size
    # Every script rebuilds it from the file alone, in float32, equal to the weights rounded to half.
    opt2, _ = gen.parse_options(["--trained_ckpt", str(shipped)])
    loaded = load_generator(gen.build_generator(opt2), str(shipped))
    for key, value in loaded.state_dict().items():
        assert value.dtype == generator.state_dict()[key].dtype
        assert torch.equal(value, generator.state_dict()[key].half().float()), key
    with pytest.raises(Exception, match="carries no 'config'"):
        save_checkpoint({"g_ema": generator.state_dict()}, tmp_path / "old.pt")
        export_generator.export(str(tmp_path / "old.pt"), str(tmp_path / "never.pt"))
    assert not (tmp_path / "never.pt").exists()


def test_export_of_a_training_checkpoint_takes_its_options(tmp_path):
    """A training checkpoint (models_*.pt) has no 'config' but its whole option tree 'opt': any iteration
    of a run exports to a file every script rebuilds from alone."""
    opt, _ = gen.parse_options(TINY)
    torch.manual_seed(1)
    generator = gen.build_generator(opt)
    plain = {group: dict(values) for group, values in opt.items() if isinstance(values, dict)}
    source = tmp_path / "models_0000300.pt"
    save_checkpoint({"g_ema": generator.state_dict(), "g": generator.state_dict(), "iter": 300, "opt": plain},
                    source)
    shipped = tmp_path / "at_300.pt"
    export_generator.export(str(source), str(shipped))
    ckpt = load_checkpoint(shipped)
    assert ckpt["iter"] == 300 and ckpt["config"] == architecture_config(opt) and "g" not in ckpt
    opt2, _ = gen.parse_options(["--trained_ckpt", str(shipped)])
    loaded = load_generator(gen.build_generator(opt2), str(shipped))
    assert all(torch.equal(v, generator.state_dict()[k]) for k, v in loaded.state_dict().items())
    save_checkpoint({"g_ema": generator.state_dict(), "opt": {"model": {}}}, tmp_path / "broken.pt")
    with pytest.raises(Exception, match="nor the 'opt' of a training checkpoint"):
        export_generator.export(str(tmp_path / "broken.pt"), str(tmp_path / "never.pt"))
    assert not (tmp_path / "never.pt").exists()

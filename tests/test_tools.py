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
from tools import compare_runs, export_generator, plot_losses  # noqa: E402

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


def test_compare_runs_averages_each_measure_over_the_window(tmp_path, monkeypatch):
    """compare_runs: loss means over the window's iterations, tracker means over the checkpoints in it
    (nested measures flattened, descriptions left out), differences to the first run, and the overlay."""
    for name, offset in (("a", 0.0), ("b", 0.5)):
        write_log(tmp_path / f"{name}.jsonl", [{"step": i, "g": i + offset, "d": 1.0} for i in range(10)])
        (tmp_path / f"{name}.json").write_text(json.dumps([
            {"iter": i, "n": 16, "first_seed": 100, "psi": 0.7, "problems": ["eye high"],
             "renderer": {"shown": {"eye": i + offset}, "swap": {"region": "hair", "ratio": 0.1 * i}}}
            for i in (0, 5, 9)]))
    runs = [f"{name}={tmp_path / name}.jsonl,{tmp_path / name}.json" for name in "ab"]
    out = tmp_path / "cmp"
    saved = compare_runs.imaging.save_figure
    legends = []

    def save_figure(path, figure, **kwargs):
        legends.append([axis.get_legend_handles_labels()[1] for axis in figure.axes if axis.get_title()])
        saved(path, figure, **kwargs)

    monkeypatch.setattr(compare_runs.imaging, "save_figure", save_figure)
    compare_runs.main([*runs, "--out", str(out), "--window", "4:9"])
    assert legends == [[["a", "b"], ["a", "b"]]]  # a panel per loss (d, g), a curve per run, named by the run
    result = json.loads((out / "comparison.json").read_text())
    measures = result["measures"]
    assert result["window"] == [4, 9] and result["checkpoints"] == {"a": [5, 9], "b": [5, 9]}
    assert measures["loss g"] == {"a": 6.5, "b": 7.0} and measures["loss d"] == {"a": 1.0, "b": 1.0}
    assert measures["track renderer.shown.eye"] == {"a": 7.0, "b": 7.5}
    assert abs(measures["track renderer.swap.ratio"]["a"] - 0.7) < 1e-9
    assert not any("region" in name or "problems" in name for name in measures)
    assert "| loss g | 6.5 | 7 | +0.5 |" in (out / "comparison.md").read_text()
    with Image.open(out / "curves.png") as image:
        assert (np.asarray(image.convert("RGB")).std(axis=(0, 1)) > 10).all()
    default = compare_runs.compare([("a", str(tmp_path / "a.jsonl"), None), ("b", str(tmp_path / "b.jsonl"), None)])
    assert default["window"] == [5, 9] and default["checkpoints"] == {"a": [], "b": []}  # second half of 0..9


@pytest.mark.parametrize("argv, message", [
    (["a=x.jsonl"], "give at least two runs to compare"),
    (["a", "b=x.jsonl"], "run 'a': expected NAME=LOSSES.jsonl[,TRACK.json]"),
    (["a=x.jsonl", "a=x.jsonl"], "two runs have the same NAME"),
    (["a=x.jsonl", "b=x.jsonl", "--window", "9:4"], "--window '9:4': expected FIRST:LAST iterations, FIRST <= LAST"),
    (["a=x.jsonl", "b=missing.jsonl"], "missing.jsonl: file not found"),
])
def test_compare_runs_bad_input_is_one_line(tmp_path, argv, message):
    write_log(tmp_path / "x.jsonl", [{"step": 0, "g": 1.0}])
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_runs.py"), *argv, "--out", "cmp"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "cmp").exists()


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
    # An option tree saved before --d_pack existed (run 4's committed snapshot) exports with its published value.
    del plain["model"]["d_pack"]
    save_checkpoint({"g_ema": generator.state_dict(), "iter": 300, "opt": plain}, tmp_path / "models_0000299.pt")
    export_generator.export(str(tmp_path / "models_0000299.pt"), str(tmp_path / "older.pt"))
    assert load_checkpoint(tmp_path / "older.pt")["config"] == architecture_config(opt)
    save_checkpoint({"g_ema": generator.state_dict(), "opt": {"model": {}}}, tmp_path / "broken.pt")
    with pytest.raises(Exception, match="nor the 'opt' of a training checkpoint"):
        export_generator.export(str(tmp_path / "broken.pt"), str(tmp_path / "never.pt"))
    assert not (tmp_path / "never.pt").exists()


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the GPU machine's Python: records each call (and CNERF_OPS), fails the op build.
echo "ops=${CNERF_OPS:-cuda} $*" >> "$FAKE_LOG"
if [ "$1" = -m ] && [ "$2" = op ]; then echo "error: op 'fused_bias_act': nvcc exploded" >&2; exit 1; fi
echo "fake result of $1 $2"
"""
GPU_STEPS = ["env", "build_ops", "gpu_tests", "conformance", "training_conformance", "data", "stage1", "stage2",
             "stage1_default", "bench_infer512", "bench_infer512_ref", "bench_train64", "bench_train64_ref"]


def run_gpu_check(tmp_path, *extra):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    vectors = tmp_path / "vectors"
    vectors.mkdir(exist_ok=True)
    (vectors / "conformance_vectors.pt").write_text("")  # no training vectors: that step is skipped
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "FAKE_LOG": str(tmp_path / "calls.log"), "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--python", str(fake), "--out", str(out),
                             "--vectors", str(vectors), *extra], env=env, capture_output=True, text=True, timeout=120)
    lines = (out / "summary.txt").read_text().splitlines()
    steps = {line.split()[0]: line.split(None, 3)[1:] for line in lines if not line.startswith("#")}
    return result, lines, steps


def test_gpu_check_runs_every_step_and_writes_one_summary(tmp_path):
    """tools/gpu_check.sh with a stand-in Python (no GPU here): every step runs in order under its time
    limit, each gives one summary line, a failing step (the op build) is reported and fails the run
    without stopping the others, and the commands carry the device and the resume checks."""
    result, lines, steps = run_gpu_check(tmp_path)
    assert result.returncode == 1, result.stderr
    assert lines[0].startswith("# tools/gpu_check.sh ") and "device cuda" in lines[1]
    assert list(steps) == GPU_STEPS
    assert steps["build_ops"][0] == "FAIL(exit" and "nvcc exploded" in steps["build_ops"][-1]
    assert steps["training_conformance"][0] == "skipped" and "training_vectors.pt" in steps["training_conformance"][-1]
    assert all(steps[name][0] == "pass" for name in GPU_STEPS if name not in ("build_ops", "training_conformance"))
    assert "fake result of tools/bench.py infer512" in steps["bench_infer512"][-1]  # the step's last line
    assert (tmp_path / "out" / "logs" / "build_ops.log").read_text().startswith("error: op 'fused_bias_act'")
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert any(c.endswith("conformance_vectors.pt --device cuda --dtype both") for c in calls)
    resumed = [c for c in calls if "train_Full.py" in c and "--continue_training --ckpt 1" in c]
    assert len(resumed) == 1 and "--deterministic" in resumed[0] and "--expname b --iter 3" in resumed[0]
    assert sum("train_CNeRF.py" in c for c in calls) == 4  # a, b, b resumed, and one default-mode run
    benches = [c for c in calls if "tools/bench.py" in c]
    assert [c.split()[0] for c in benches] == ["ops=cuda", "ops=ref", "ops=cuda", "ops=ref"]


def test_gpu_check_selects_steps_and_refuses_bad_arguments(tmp_path):
    result, _, steps = run_gpu_check(tmp_path, "--only", "conformance,bench_train64", "--dry-run")
    assert result.returncode == 0 and not (tmp_path / "calls.log").exists()  # a dry run runs nothing
    assert steps["conformance"][0] == "dry-run" and "--device cuda" in steps["conformance"][-1]
    assert steps["bench_train64"][0] == "dry-run"
    assert {name for name, (status, *_) in steps.items() if status == "skipped"} == set(GPU_STEPS) - {
        "conformance", "bench_train64"}
    bad = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--out"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == "error: --out needs a value\n"
    bad = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--python", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not an executable" in bad.stderr

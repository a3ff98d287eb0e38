"""scripts/train_synthetic.sh decides what to run from what its folder holds (training takes hours and
sessions end in the middle): finished steps are skipped, a stage resumes from its latest checkpoint, a
stage whose config asks for more iterations than it has continues, and a stage 2 trained on an
earlier stage 1 is moved aside. Run with a stand-in interpreter that records its calls (SYNTH_PYTHON).
"""
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from options import BaseOptions  # noqa: E402

SCRIPT = ROOT / "scripts" / "train_synthetic.sh"

# Records each call and creates the files the script reads back afterwards.
STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
args=("$@")
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = --out ]; then out="${args[$((i + 1))]}"; fi
done
case "$1" in
  tools/export_generator.py) touch "$3" ;;
  tools/plot_losses.py) touch "$out" ;;
  calc_metrics.py) mkdir -p "$out" && echo "| metric |" > "$out/metrics.md" ;;
esac
"""


def config_iter(name):
    """The iteration count the training scripts read from a recipe."""
    return BaseOptions().parse(["--config", str(ROOT / "configs" / name), "--dataset_path", "x"]).training.iter


def make_run(tmp_path, stage1_last, stage2_last):
    out = tmp_path / "run"
    (out / "portraits" / "images").mkdir(parents=True)
    for i in range(3):
        (out / "portraits" / "images" / f"{i:05d}.png").touch()
    for folder in ("lmdb", "heldout_lmdb"):
        (out / folder).mkdir()
        (out / folder / "data.mdb").touch()
    (out / "synthetic_parser.pt").touch()
    exp = out / "checkpoints" / "synthetic"
    for stage, last, final in (("volume_renderer", stage1_last, "synthetic_vol_renderer.pt"),
                               ("full_pipeline", stage2_last, "synthetic_full_pipeline.pt")):
        if last is None:
            continue
        (exp / stage).mkdir(parents=True)
        for i in sorted({0, last}):
            (exp / stage / f"models_{i:07d}.pt").touch()
        (exp / final).touch()
    return out, exp


def run_script(tmp_path, out, **extra_env):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, SYNTH_PYTHON=str(stand_in), SYNTH_OUT=str(out), SYNTH_N="3", CALLS=str(calls), **extra_env)
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return calls.read_text().splitlines(), result.stdout


def test_finished_run_only_exports_and_evaluates(tmp_path):
    out, exp = make_run(tmp_path, config_iter("synthetic_stage1.yaml") - 1, config_iter("synthetic_stage2.yaml") - 1)
    calls, _ = run_script(tmp_path, out)
    scripts = [call.split()[0] for call in calls]
    assert "train_CNeRF.py" not in scripts and "train_Full.py" not in scripts
    assert "tools/train_parser.py" not in scripts and "prepare_data.py" not in scripts
    assert scripts.count("calc_metrics.py") == 2 and "tools/export_generator.py" in scripts
    assert (exp / "full_pipeline").is_dir()


def test_raised_stage1_iterations_resume_it_and_restart_stage2(tmp_path):
    out, exp = make_run(tmp_path, 4, 2)  # both stages "finished" at fewer iterations than the configs ask
    calls, stdout = run_script(tmp_path, out)
    stage1 = [call for call in calls if call.startswith("train_CNeRF.py")]
    assert len(stage1) == 1
    assert f"--continue_training --ckpt {exp}/volume_renderer/models_0000004.pt" in stage1[0]
    moved = exp / "full_pipeline_on_stage1_4"
    assert (moved / "models_0000002.pt").is_file() and (moved / "synthetic_full_pipeline.pt").is_file()
    assert "moved to" in stdout
    stage2 = [call for call in calls if call.startswith("train_Full.py")]
    assert len(stage2) == 1 and "--continue_training" not in stage2[0]  # starts again on the new stage 1


def test_interrupted_stage2_resumes_from_its_latest_checkpoint(tmp_path):
    out, exp = make_run(tmp_path, config_iter("synthetic_stage1.yaml") - 1, None)
    (exp / "full_pipeline").mkdir()
    for i in (0, 100, 200):
        (exp / "full_pipeline" / f"models_{i:07d}.pt").touch()
    calls, _ = run_script(tmp_path, out)
    assert not any(call.startswith("train_CNeRF.py") for call in calls)
    stage2 = [call for call in calls if call.startswith("train_Full.py")]
    assert len(stage2) == 1 and f"--ckpt {exp}/full_pipeline/models_0000200.pt" in stage2[0]
    assert (exp / "full_pipeline").is_dir() and not list(exp.glob("full_pipeline_on_stage1_*"))


def test_iter_in_synth_train_args_is_the_target(tmp_path):
    """A dry run (SYNTH_TRAIN_ARGS="--iter N ...") run again is complete at N, as its training scripts are."""
    out, exp = make_run(tmp_path, 4, 4)
    calls, stdout = run_script(tmp_path, out, SYNTH_TRAIN_ARGS="--iter 5 --sphere_init_iter 2")
    assert not any(call.startswith(("train_CNeRF.py", "train_Full.py")) for call in calls)
    assert (exp / "full_pipeline").is_dir() and "moved to" not in stdout

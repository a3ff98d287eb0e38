"""scripts/train_synthetic.sh decides what to run from what its folder holds (training takes hours and
sessions end in the middle): finished steps are skipped, a stage resumes from its latest checkpoint, a
stage whose config asks for more iterations than it has continues, stage 1's parts run in order, and a
stage 2 trained on an earlier stage 1 is moved aside. Run with a stand-in interpreter that records its calls (SYNTH_PYTHON).
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

# Records each call and creates the files the script reads back afterwards (a training script: its final file only).
STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
args=("$@")
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = --out ]; then out="${args[$((i + 1))]}"; fi
  if [ "${args[$i]}" = --checkpoints_dir ]; then ckpts="${args[$((i + 1))]}"; fi
done
case "$1" in
  train_CNeRF.py) mkdir -p "$ckpts/synthetic" && touch "$ckpts/synthetic/synthetic_vol_renderer.pt" ;;  # final file only
  train_Full.py) mkdir -p "$ckpts/synthetic" && touch "$ckpts/synthetic/synthetic_full_pipeline.pt" ;;
  tools/export_generator.py | tools/strip_optimizers.py) touch "$3" ;;
  tools/plot_losses.py) touch "$out" ;;
  tools/track_checkpoints.py) mkdir -p "$out" ;;
  calc_metrics.py) mkdir -p "$out" && echo "| metric |" > "$out/metrics.md" ;;
esac
"""


def parse_config(name):
    """The options the training scripts read from a recipe."""
    return BaseOptions().parse(["--config", str(ROOT / "configs" / name), "--dataset_path", "x"])


def config_iter(name):
    """The iteration count the training scripts read from a recipe."""
    return parse_config(name).training.iter


STAGE1_PARTS = ("synthetic_stage1.yaml", "synthetic_stage1_part2.yaml")
STAGE1_LAST = config_iter(STAGE1_PARTS[-1]) - 1  # a finished stage 1's last checkpoint


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


def run_script(tmp_path, out, *script_args, **extra_env):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    # No snapshots unless a test gives some: the repository's own checkpoints/progress must not steer these runs.
    env = dict(os.environ, SYNTH_PYTHON=str(stand_in), SYNTH_OUT=str(out), SYNTH_N="3", CALLS=str(calls),
               SYNTH_PROGRESS=str(tmp_path / "no_snapshots"))
    env.update(extra_env)
    result = subprocess.run(["bash", str(SCRIPT), *script_args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return calls.read_text().splitlines(), result.stdout


def test_finished_run_only_exports_and_evaluates(tmp_path):
    out, exp = make_run(tmp_path, STAGE1_LAST, config_iter("synthetic_stage2.yaml") - 1)
    calls, _ = run_script(tmp_path, out)
    scripts = [call.split()[0] for call in calls]
    assert "train_CNeRF.py" not in scripts and "train_Full.py" not in scripts
    assert "tools/train_parser.py" not in scripts and "prepare_data.py" not in scripts
    assert scripts.count("calc_metrics.py") == 2 and "tools/export_generator.py" in scripts
    tracked = [call.split()[1] for call in calls if call.startswith("tools/track_checkpoints.py")]
    assert tracked == [f"{exp}/volume_renderer", f"{exp}/full_pipeline"]  # each stage's checkpoints, then export
    assert scripts.index("tools/track_checkpoints.py") < scripts.index("tools/export_generator.py")
    export = next(call for call in calls if call.startswith("tools/export_generator.py"))
    assert export.startswith(f"tools/export_generator.py {exp}/synthetic_full_pipeline.pt ")
    assert (exp / "full_pipeline").is_dir()


def test_raised_stage1_iterations_resume_it_and_restart_stage2(tmp_path):
    out, exp = make_run(tmp_path, 4, 2)  # both stages "finished" at fewer iterations than the configs ask
    calls, stdout = run_script(tmp_path, out)
    stage1 = [call for call in calls if call.startswith("train_CNeRF.py")]
    # each part continues from the latest checkpoint (the stand-in writes none, so both from 4)
    assert [call.split()[2] for call in stage1] == [f"configs/{name}" for name in STAGE1_PARTS]
    assert all(f"--continue_training --ckpt {exp}/volume_renderer/models_0000004.pt" in call for call in stage1)
    moved = exp / "full_pipeline_on_stage1_4"
    assert (moved / "models_0000002.pt").is_file() and (moved / "synthetic_full_pipeline.pt").is_file()
    assert "moved to" in stdout
    stage2 = [call for call in calls if call.startswith("train_Full.py")]
    assert len(stage2) == 1 and "--continue_training" not in stage2[0]  # starts again on the new stage 1


def test_stage1_part2_continues_part1(tmp_path):
    """Part 1 finished (its final file written): only part 2 trains, from part 1's last checkpoint; a stage 2
    made on part 1 alone is moved aside."""
    part1_last = config_iter(STAGE1_PARTS[0]) - 1
    out, exp = make_run(tmp_path, part1_last, 300)
    calls, stdout = run_script(tmp_path, out)
    stage1 = [call for call in calls if call.startswith("train_CNeRF.py")]
    assert len(stage1) == 1 and stage1[0].split()[2] == f"configs/{STAGE1_PARTS[1]}"
    assert f"--continue_training --ckpt {exp}/volume_renderer/models_{part1_last:07d}.pt" in stage1[0]
    assert (exp / f"full_pipeline_on_stage1_{part1_last}" / "models_0000300.pt").is_file()


def test_stage1_parts_differ_only_in_iterations_and_mask_r1():
    """Part 2 is part 1 continued: the same model, data and learning rates; more iterations, another R1 on masks."""
    part1, part2 = (parse_config(name) for name in STAGE1_PARTS)
    differing = {(group, key) for group in part1 for key in part1[group]
                 if group != "experiment" and part1[group][key] != part2[group][key]}
    assert differing == {("training", "iter"), ("training", "r1_seg")}
    assert part2.training.iter > part1.training.iter and part2.training.r1_seg < part1.training.r1_seg


def test_interrupted_stage2_resumes_from_its_latest_checkpoint(tmp_path):
    out, exp = make_run(tmp_path, STAGE1_LAST, None)
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


def test_snapshots_carry_a_run_to_a_fresh_machine(tmp_path):
    """`snapshot` strips each stage's latest checkpoint into the progress folder; on a machine whose run folder
    lacks them, a stage continues from its newest snapshot with --fresh_optimizers, and a stage whose folder
    holds a newer checkpoint continues from that one (with its optimiser states)."""
    out, exp = make_run(tmp_path, 300, 200)
    (exp / "volume_renderer" / "losses.jsonl").write_text('{"step": 300}\n')
    progress = tmp_path / "progress"
    calls, stdout = run_script(tmp_path, out, "snapshot", SYNTH_PROGRESS=str(progress))
    assert [call.split()[0] for call in calls] == ["tools/strip_optimizers.py"] * 2
    assert f"{exp}/volume_renderer/models_0000300.pt {progress}/synthetic_stage1_models_0000300.pt --half" in calls[0]
    assert f"{exp}/full_pipeline/models_0000200.pt {progress}/synthetic_stage2_models_0000200.pt --half" in calls[1]
    assert (progress / "synthetic_stage1_models_0000300.pt").is_file()
    assert (progress / "synthetic_stage1_losses.jsonl").read_text() == '{"step": 300}\n'

    (progress / "synthetic_stage1_models_0000100.pt").touch()  # an older snapshot left behind: not used
    fresh, _ = make_run(tmp_path / "fresh", None, None)  # a new machine: data made again, no checkpoints
    (tmp_path / "calls.txt").unlink()
    calls, stdout = run_script(tmp_path, fresh, SYNTH_PROGRESS=str(progress))
    stage1 = [call for call in calls if call.startswith("train_CNeRF.py")]
    assert len(stage1) == len(STAGE1_PARTS)  # the stand-in writes no checkpoint: each part starts from the snapshot
    assert all(f"--continue_training --ckpt {progress}/synthetic_stage1_models_0000300.pt --fresh_optimizers" in call
               for call in stage1)
    fresh_exp = fresh / "checkpoints" / "synthetic"
    assert (fresh_exp / "volume_renderer" / "losses.jsonl").read_text() == '{"step": 300}\n'  # the run's log goes on
    stage2 = [call for call in calls if call.startswith("train_Full.py")]
    assert len(stage2) == 1 and "--continue_training" not in stage2[0]  # stage 1 is not finished: stage 2 afresh

    # this machine's own stage 1 got further than the snapshot: its checkpoint wins
    (tmp_path / "calls.txt").unlink()
    calls, _ = run_script(tmp_path, out, SYNTH_PROGRESS=str(progress))
    stage1 = [call for call in calls if call.startswith("train_CNeRF.py")]
    assert stage1 and all(f"--ckpt {exp}/volume_renderer/models_0000300.pt" in call and "--fresh_optimizers" not in call
                          for call in stage1)


def test_a_finished_stage1_snapshot_lets_stage2_go_on_from_its_own(tmp_path):
    """Stage 1 finished in an earlier session (its snapshot is at the last iteration) and stage 2 stopped
    midway: on a fresh machine stage 1 only rewrites its final file (no iterations), stage 2 continues."""
    progress = tmp_path / "progress"
    progress.mkdir()
    last1 = STAGE1_LAST
    (progress / f"synthetic_stage1_models_{last1:07d}.pt").touch()
    (progress / "synthetic_stage2_models_0000500.pt").touch()
    fresh, exp = make_run(tmp_path, None, None)
    calls, stdout = run_script(tmp_path, fresh, SYNTH_PROGRESS=str(progress))
    stage1 = [call for call in calls if call.startswith("train_CNeRF.py")]
    assert len(stage1) == 1 and f"synthetic_stage1_models_{last1:07d}.pt --fresh_optimizers" in stage1[0]
    stage2 = [call for call in calls if call.startswith("train_Full.py")]
    assert len(stage2) == 1 and f"--ckpt {progress}/synthetic_stage2_models_0000500.pt --fresh_optimizers" in stage2[0]
    assert "moved to" not in stdout


def test_export_iter_exports_the_chosen_stage2_checkpoint(tmp_path):
    """SYNTH_EXPORT_ITER picks the stage-2 checkpoint to export and measure; a missing one stops the script."""
    out, exp = make_run(tmp_path, STAGE1_LAST, config_iter("synthetic_stage2.yaml") - 1)
    (exp / "full_pipeline" / "models_0000900.pt").touch()
    calls, _ = run_script(tmp_path, out, SYNTH_EXPORT_ITER="900")
    export = next(call for call in calls if call.startswith("tools/export_generator.py"))
    assert export.startswith(f"tools/export_generator.py {exp}/full_pipeline/models_0000900.pt ")
    env = dict(os.environ, SYNTH_PYTHON=str(tmp_path / "python"), SYNTH_OUT=str(out), SYNTH_N="3",
               CALLS=str(tmp_path / "calls.txt"), SYNTH_EXPORT_ITER="950", SYNTH_PROGRESS=str(tmp_path / "none"))
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "SYNTH_EXPORT_ITER=950: no checkpoint" in result.stdout

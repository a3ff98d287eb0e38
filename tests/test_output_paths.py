"""Every command that writes refuses an unusable output path in one line, before any work (issue 28, item 7).

Each command runs in-process with its output pointed at (a) an existing file where a folder is written, or an
existing folder where a file is written, (b) a place under a regular file (which cannot be created), and (c) a
path inside (or equal to) one of its own inputs. The checkpoint each command would load does not exist: an
error about the output path therefore shows the check ran first, before anything was read or written.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import load_script  # noqa: E402


@pytest.fixture()
def place(tmp_path):
    """A regular file, a folder with an image, a loss log and a checkpoint path that does not exist."""
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    images = tmp_path / "images"
    images.mkdir()
    (images / "00000.png").write_bytes(b"")
    (tmp_path / "losses.jsonl").write_text('{"step": 0, "d": 1.0}\n')
    return tmp_path


FOLDER_OUTPUT = "folder"
FILE_OUTPUT = "file"

# (command, kind of output, argv builder given (output path, place)): the output flag's value is `out`.
COMMANDS = [
    ("inference_Full.py", FOLDER_OUTPUT, lambda out, p: ["--trained_ckpt", str(p / "missing.pt"), "--results_dir", out]),
    ("render_video.py", FOLDER_OUTPUT, lambda out, p: ["--trained_ckpt", str(p / "missing.pt"), "--results_dir", out]),
    ("edit_semantics.py", FOLDER_OUTPUT, lambda out, p: ["--trained_ckpt", str(p / "missing.pt"), "--source", "1",
                                                         "--reference", "2", "--regions", "hair", "--out_dir", out]),
    ("invert.py", FOLDER_OUTPUT, lambda out, p: ["--trained_ckpt", str(p / "missing.pt"),
                                                 "--image", str(p / "images" / "00000.png"), "--out_dir", out]),
    ("calc_metrics.py", FOLDER_OUTPUT, lambda out, p: ["--trained_ckpt", str(p / "missing.pt"),
                                                       "--dataset_path", str(p / "images"), "--out", out]),
    ("train_CNeRF.py", FOLDER_OUTPUT, lambda out, p: ["--dataset_path", str(p / "images"), "--checkpoints_dir", out,
                                                      "--expname", "run", "--device", "cpu"]),
    ("train_Full.py", FOLDER_OUTPUT, lambda out, p: ["--dataset_path", str(p / "images"), "--checkpoints_dir", out,
                                                     "--expname", "run", "--device", "cpu"]),
    ("prepare_data.py", FOLDER_OUTPUT, lambda out, p: ["--out_path", out, "--size", "16", str(p / "images")]),
    ("tools/track_checkpoints.py", FOLDER_OUTPUT, lambda out, p: [str(p / "folder"), "--out", out]),
    ("tools/synthetic_portraits.py", FOLDER_OUTPUT, lambda out, p: ["--out", out, "--n", "1"]),
    ("tools/parse_faces.py", FOLDER_OUTPUT, lambda out, p: [str(p / "images"), out, "--parser", str(p / "missing.pt")]),
    ("tools/celebamask_labels.py", FOLDER_OUTPUT, lambda out, p: [str(p / "folder"), out]),
    ("tools/align_faces.py", FOLDER_OUTPUT, lambda out, p: [str(p / "images"), out, "--landmarks", str(p / "folder")]),
    ("tools/export_generator.py", FILE_OUTPUT, lambda out, p: [str(p / "missing.pt"), out]),
    ("tools/strip_optimizers.py", FILE_OUTPUT, lambda out, p: [str(p / "missing.pt"), out]),
    ("tools/plot_losses.py", FILE_OUTPUT, lambda out, p: [str(p / "losses.jsonl"), "--out", out]),
    ("tools/train_parser.py", FILE_OUTPUT, lambda out, p: ["--dataset_path", str(p / "images"), "--size", "64",
                                                           "--out", out]),
    ("tools/editor_screenshot.py", FILE_OUTPUT, lambda out, p: ["--out", out]),
]

# An output inside (or equal to) an input of the same command.
INSIDE_INPUTS = [
    ("calc_metrics.py", lambda p: ["--trained_ckpt", str(p / "missing.pt"), "--dataset_path", str(p / "images"),
                                   "--out", str(p / "images" / "metrics")]),
    ("prepare_data.py", lambda p: ["--out_path", str(p / "images" / "lmdb"), "--size", "16", str(p / "images")]),
    ("train_CNeRF.py", lambda p: ["--dataset_path", str(p / "images"), "--checkpoints_dir", str(p / "images"),
                                  "--expname", "run", "--device", "cpu"]),
    ("tools/export_generator.py", lambda p: [str(p / "losses.jsonl"), str(p / "losses.jsonl")]),
    ("tools/parse_faces.py", lambda p: [str(p / "images"), str(p / "images" / "labels"), "--parser", str(p / "x.pt")]),
    ("tools/plot_losses.py", lambda p: [str(p / "losses.jsonl"), "--out", str(p / "losses.jsonl")]),
    ("tools/track_checkpoints.py", lambda p: [str(p / "folder"), "--out", str(p / "folder" / "track")]),
]


def run_refused(relpath, argv, *words):
    """Run a command's main in-process; it must stop with one 'error: ' line naming `words`."""
    with pytest.raises(SystemExit) as stop:
        load_script(relpath).main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, (relpath, message)
    assert all(w in message for w in words), (relpath, message, words)
    return message


@pytest.mark.parametrize("relpath,kind,make", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_existing_path_of_the_wrong_kind_is_refused_first(relpath, kind, make, place):
    out = place / ("file.txt" if kind == FOLDER_OUTPUT else "folder")
    listing = sorted(p.name for p in place.rglob("*"))
    run_refused(relpath, make(str(out), place), str(out), "not a folder" if kind == FOLDER_OUTPUT else "is a folder")
    assert sorted(p.name for p in place.rglob("*")) == listing  # nothing written
    assert (place / "file.txt").read_text() == "not a folder"


@pytest.mark.parametrize("relpath,kind,make", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_place_that_cannot_be_created_is_refused_first(relpath, kind, make, place):
    out = place / "file.txt" / "below" / ("out" if kind == FOLDER_OUTPUT else "out.png")
    listing = sorted(p.name for p in place.rglob("*"))
    run_refused(relpath, make(str(out), place), "file.txt is a file, not a folder")
    assert sorted(p.name for p in place.rglob("*")) == listing


@pytest.mark.parametrize("relpath,make", INSIDE_INPUTS, ids=[c[0] for c in INSIDE_INPUTS])
def test_an_output_inside_the_commands_own_inputs_is_refused(relpath, make, place):
    listing = sorted(p.name for p in place.rglob("*"))
    run_refused(relpath, make(place), "the input")
    assert sorted(p.name for p in place.rglob("*")) == listing

"""The region editor's logic below the page (issue 12): code blending, state checks, caching, latent
files in and out, uploads, on a random-weight tiny generator."""
import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import imaging  # noqa: E402
from common.cli import UsageError  # noqa: E402
from editing import manipulation  # noqa: E402
from editing import region_editor as re_  # noqa: E402
from helpers import TINY_FULL, save_random_generator  # noqa: E402
from rendering.inference import render_views  # noqa: E402
from rendering.latents import load_latents, save_latents  # noqa: E402

TINY = TINY_FULL
SAMPLES = 8
K = 9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path, editor) of a random tiny model."""
    folder = tmp_path_factory.mktemp("editor_model")
    path = folder / "tiny.pt"
    opt = save_random_generator(path, TINY)
    return path, re_.load_editor(opt, SAMPLES, 8, SAMPLES, cache_size=16, invert_steps=2)


def state(editor, **changes):
    data = {"source": 3, "reference": 7, "psi": 0.7}
    data.update(changes)
    return editor.parse(data)


def one_hot(k, value=1.0):
    return [value if i == k else 0.0 for i in range(K)]


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ blending


def test_blend_moves_each_slot_by_its_own_factor_and_ends_are_exact():
    torch.manual_seed(0)
    source, reference = torch.randn(1, 2 * K, 8), torch.randn(1, 2 * K, 8)
    shape, texture = [0.0] * K, [0.0] * K
    assert torch.equal(re_.blend_codes(source, reference, shape, texture), source)
    shape[2], texture[7], texture[3] = 1.0, 0.25, 1.0
    out = re_.blend_codes(source, reference, shape, texture)
    for slot in range(2 * K):
        if slot in (2 * 2, 2 * 3 + 1):  # t = 1: the reference's code bit for bit
            assert torch.equal(out[:, slot], reference[:, slot])
        elif slot == 2 * 7 + 1:
            assert torch.allclose(out[:, slot], 0.75 * source[:, slot] + 0.25 * reference[:, slot], atol=1e-6)
            assert not torch.equal(out[:, slot], source[:, slot])
        else:  # untouched slots keep the source's code bit for bit
            assert torch.equal(out[:, slot], source[:, slot])
    # The full swap agrees with edit_semantics' swap.
    swapped = manipulation.swap_region_codes(source, reference, [4, 5], "texture")
    both = [1.0 if i in (4, 5) else 0.0 for i in range(K)]
    assert torch.equal(re_.blend_codes(source, reference, [0.0] * K, both), swapped)


def test_state_parsing_refuses_bad_values_with_one_line():
    good = re_.parse_state({"source": "3", "reference": 7, "texture": one_hot(7), "semantics": list(range(K))})
    assert good.source == 3 and good.texture[7] == 1.0 and good.semantics is None  # all regions = None
    assert re_.parse_state({"semantics": [3, 2]}).semantics == (2, 3)
    bad = [
        ({"texture": [0.5] * 3}, "texture: expected a list of 9"),
        ({"shape": [0.0] * 8 + [1.5]}, "shape[neck+cloth]"),
        ({"shape": [0.0] * 8 + ["x"]}, "expected a number"),
        ({"psi": 0}, "truncation"),
        ({"azim": float("nan")}, "azimuth"),
        ({"semantics": []}, "at least one region"),
        ({"semantics": [12]}, "0..8"),
        ({"source": -2}, "out of range"),
        ({"source": None}, "source"),
        ({"resample_texture": [None] * 8 + ["abc"]}, "expected a seed"),
    ]
    for data, needle in bad:
        with pytest.raises(re_.EditError) as caught:
            re_.parse_state(data)
        message = str(caught.value)
        assert needle in message and "\n" not in message, (data, message)
    with pytest.raises(re_.EditError):
        re_.parse_state([1, 2])


def test_lru_cache_evicts_the_least_recently_used_and_counts():
    cache = re_.LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert (cache.hits, cache.misses, len(cache)) == (3, 1, 2)


def test_tensor_key_tells_values_apart():
    a = torch.zeros(2, 3)
    assert re_.tensor_key(a) == re_.tensor_key(a.clone())
    b = a.clone()
    b[1, 2] = 1e-7
    assert re_.tensor_key(a) != re_.tensor_key(b)
    assert re_.tensor_key(a) != re_.tensor_key(a.reshape(3, 2))


# ------------------------------------------------------------------------------------------ editor


def test_texture_edit_changes_the_image_reuses_the_shape_and_caches_views(tiny):
    _, editor = tiny
    unedited = editor.render(state(editor))
    assert not np.any(unedited["images"]["delta"])  # |Δ| of the source against itself
    shapes_before, views_before = editor.shapes.misses, editor.views.misses
    edited = editor.render(state(editor, texture=one_hot(7)))
    # Only the edited view was rendered: the source's view and the geometry came from the caches.
    assert editor.views.misses == views_before + 1 and editor.shapes.misses == shapes_before
    assert not edited["cached"]
    assert not np.array_equal(edited["images"]["image"], unedited["images"]["image"])
    assert np.array_equal(edited["images"]["shape"], unedited["images"]["shape"])
    assert edited["images"]["delta"].max() > 0
    again = editor.render(state(editor, texture=one_hot(7)))
    assert again["cached"] and editor.views.misses == views_before + 1
    for name in ("image", "seg", "shape", "delta"):
        assert np.array_equal(again["images"][name], edited["images"][name])
        assert again["images"][name].shape == (editor.size, editor.size, 3)
    # A shape edit re-renders the geometry.
    editor.render(state(editor, shape=one_hot(1)))
    assert editor.shapes.misses == shapes_before + 1


def test_edit_matches_edit_semantics_swap_and_render(tiny):
    _, editor = tiny
    s = state(editor, texture=one_hot(7), azim=0.1)
    codes, styles, source = editor.edited_codes(s)
    src, src_global = manipulation.latents_from_seeds(editor.generator, [3], editor.mean, 0.7)
    ref, _ = manipulation.latents_from_seeds(editor.generator, [7], editor.mean, 0.7)
    assert torch.equal(source, src) and torch.equal(styles, src_global)
    assert torch.equal(codes, manipulation.swap_region_codes(src, ref, [7], "texture"))
    rgb, _ = render_views(editor.generator, codes, styles, torch.tensor([[0.1, 0.0]]), editor.opt, editor.mean,
                          psi=0.7)
    assert np.array_equal(editor.render(s)["images"]["image"], imaging.to_uint8(rgb[0]))


def test_resample_and_semantics(tiny):
    _, editor = tiny
    plain, _, source = editor.edited_codes(state(editor))
    fresh, _, _ = editor.edited_codes(state(editor, resample_shape=[None] * 2 + [5] + [None] * 6))
    changed = [slot for slot in range(2 * K) if not torch.equal(fresh[:, slot], plain[:, slot])]
    assert changed == [4]  # region 2's shape code only
    again, _, _ = editor.edited_codes(state(editor, resample_shape=[None] * 2 + [5] + [None] * 6))
    assert torch.equal(fresh, again)  # a resample seed always gives the same code
    # With the slider at 1 the reference wins over the resampled code.
    both, _, _ = editor.edited_codes(state(editor, shape=one_hot(2), resample_shape=[None] * 2 + [5] + [None] * 6))
    reference, _ = editor.identity_codes(7, 0.7)
    assert torch.equal(both[:, 4], reference[:, 4])
    full = editor.render(state(editor))["images"]["image"]
    partial = editor.render(state(editor, semantics=[1, 7]))["images"]["image"]
    assert not np.array_equal(full, partial)


def test_latents_download_round_trips_through_inference_full(tiny, tmp_path):
    path, editor = tiny
    s = state(editor, texture=one_hot(7), shape=one_hot(1, 0.5))
    data = editor.latents_file(s)
    file = tmp_path / "editor_latents.pt"
    file.write_bytes(data)
    loaded = load_latents(file, style_dim=editor.generator.style_dim, n_regions=K)
    codes, styles, _ = editor.edited_codes(s)
    assert torch.equal(loaded["codes"], codes) and torch.equal(loaded["styles_global"], styles)
    assert loaded["truncated"] and "hair texture t=1" in loaded["note"]
    # inference_Full.py --latents renders the editor's frontal image exactly (first fixed view is frontal).
    import inference_Full

    out = tmp_path / "inference"
    inference_Full.main([*TINY, "--trained_ckpt", str(path), "--latents", str(file), "--results_dir", str(out),
                         "--inference_samples", str(SAMPLES), "--fixed_camera_angles", "--no_surface_renderings",
                         "--truncation_ratio", "0.7", "--seed", "0"])
    row = np.asarray(Image.open(out / "0_img.png").convert("RGB"))
    assert np.array_equal(row[:, :editor.size], editor.render(s)["images"]["image"])
    # Loaded back into the editor, the file is an identity that renders the same.
    (ident,) = editor.add_latent_file(data, "editor_latents.pt")
    back = editor.render(editor.parse({"source": ident, "reference": 7}))["images"]["image"]
    assert np.array_equal(back, editor.render(s)["images"]["image"])


def test_bad_uploads_raise_one_line_naming_the_file(tiny, tmp_path):
    _, editor = tiny
    other = tmp_path / "other.pt"
    save_latents(other, torch.zeros(1, 2 * K, 16), torch.zeros(1, 16))
    with pytest.raises(re_.EditError, match=r"^other\.pt: latents have style_dim 16, the model expects 32$"):
        editor.add_latent_file(other.read_bytes(), "other.pt")
    with pytest.raises(re_.EditError, match=r"^junk\.pt: "):
        editor.add_latent_file(b"not a torch file", "junk.pt")
    with pytest.raises(re_.EditError, match=r"^notes\.txt: not a readable image"):
        editor.start_inversion(b"hello, not an image", "notes.txt")
    wide = png(np.zeros((10, 20, 3), dtype=np.uint8))
    with pytest.raises(re_.EditError, match=r"^wide\.png: the image is 20×10; the model's portraits are square"):
        editor.start_inversion(wide, "wide.png")
    square = png(np.zeros((20, 20, 3), dtype=np.uint8))
    with pytest.raises(re_.EditError, match=r"^m\.png: class ids must be 0\.\.18"):
        editor.start_inversion(square, "face.png", png(np.full((20, 20, 3), 40, dtype=np.uint8)), "m.png")
    with pytest.raises(re_.EditError, match="unknown identity 'id999'"):
        editor.render(editor.parse({"source": "id999"}))


def test_inversion_runs_in_the_background_and_becomes_an_identity(tiny):
    _, editor = tiny
    target = editor.render(state(editor))["images"]["image"]
    job = editor.start_inversion(png(target), "face.png", steps=3)
    with pytest.raises(re_.EditError, match="already running"):
        if not job["done"]:
            editor.start_inversion(png(target), "face.png", steps=3)
        else:
            raise re_.EditError("already running (finished too fast to check)")
    # Edits are served while it runs.
    editor.render(state(editor, texture=one_hot(2)))
    deadline = time.monotonic() + 60
    while not job["done"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job["done"] and job["error"] is None and job["step"] == 3
    assert job["identity"] in editor.identities and len(job["camera"]) == 2
    image = editor.render(editor.parse({"source": job["identity"], "reference": 7}))["images"]["image"]
    assert image.shape == target.shape


# ------------------------------------------------------------------------------------ command line


def editor_error(*args):
    """The one-line error editor.py stops with (in-process: common.cli.command exits with its message)."""
    import editor

    with pytest.raises(SystemExit) as stopped:
        editor.main([str(a) for a in args])
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_editor_refuses_a_missing_or_foreign_checkpoint_with_one_line(tiny, tmp_path):
    import subprocess

    from tools import editor_browser

    path, _ = tiny
    port = editor_browser.free_port()
    if not (ROOT / "checkpoints" / "synthetic_portraits.pt").exists():
        # The default is the shipped model; without it, one line on stderr saying what to do.
        result = subprocess.run([sys.executable, str(ROOT / "editor.py"), *TINY, "--port", str(port)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "checkpoints/synthetic_portraits.pt: checkpoint file not found" in result.stderr
        assert "pass --trained_ckpt FILE" in result.stderr
    assert "none.pt: checkpoint file not found" in editor_error(*TINY, "--trained_ckpt", tmp_path / "none.pt",
                                                                "--port", port)
    other = [a if a != "32" else "16" for a in TINY]  # style_dim and width 16: another configuration
    message = editor_error(*other, "--trained_ckpt", path, "--port", port)
    assert str(path) in message and "does not fit the generator" in message
    assert "--port 70000" in editor_error(*TINY, "--trained_ckpt", path, "--port", 70000)
    assert "--invert_steps must be in [1, 5000], got 6000" in editor_error(*TINY, "--trained_ckpt", path,
                                                                           "--invert_steps", 6000)
    assert "--max_request_mb must be at least 1, got 0" in editor_error(*TINY, "--trained_ckpt", path,
                                                                        "--max_request_mb", 0)


def test_port_check_takes_a_port_left_in_time_wait_and_refuses_one_in_use():
    """A restart on the same port works at once (as uvicorn binds, with SO_REUSEADDR), while a port
    another program listens on is still refused with one line."""
    import socket

    import editor

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end of the connection stays in TIME_WAIT
    client.close()
    listener.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old check did: refused for about a minute
    editor.check_port("127.0.0.1", port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UsageError, match=r"^--host 127\.0\.0\.1 --port \d+: cannot listen there"):
            editor.check_port("127.0.0.1", busy.getsockname()[1])


def test_editor_draws_in_bf16_where_native_and_other_commands_stay_fp32():
    """The editor's --precision defaults to auto (issue 25: bf16 only where the hardware does it natively);
    the shared default, which every other command keeps, is the published fp32; a flag overrides both."""
    import editor
    from rendering import loading as gen

    assert gen.parse_options([], editor.add_arguments, "editor")[0].experiment.precision == "auto"
    assert gen.parse_options(["--precision", "fp32"], editor.add_arguments, "editor")[0].experiment.precision == "fp32"
    assert gen.parse_options([])[0].experiment.precision == "fp32"

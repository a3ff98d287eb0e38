"""The editor in a real headless browser (issue 12): Debian's Chromium driven through Selenium against
`python editor.py` on a free loopback port with a random tiny model.

Skips with the reason when no browser can be had (a machine without chromium / chromium-driver);
on CI (CI set in the environment), where scripts/test.sh installs them, a missing browser fails.
"""
import concurrent.futures
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import TINY_FULL, save_random_generator  # noqa: E402
from rendering.latents import save_latents  # noqa: E402
from tools import editor_browser as eb  # noqa: E402

TINY = TINY_FULL


def browser_or_skip():
    try:
        return eb.find_browser()
    except eb.BrowserUnavailable as reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(f"no headless browser: {reason}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    browser_or_skip()
    folder = tmp_path_factory.mktemp("editor_browser")
    save_random_generator(folder / "tiny.pt", TINY)
    with eb.editor_server(["--trained_ckpt", folder / "tiny.pt", *TINY, "--invert_steps", "2"]) as url:
        yield url, folder


@pytest.fixture(scope="module")
def browser(server):
    try:
        with eb.headless_browser(width=1300, height=900) as driver:
            yield driver
    except eb.BrowserUnavailable as reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(f"no headless browser: {reason}")


def src(driver, element_id="image"):
    return driver.find_element("id", element_id).get_attribute("src")


def message(driver):
    return driver.find_element("id", "message").text


def move_slider_to_end(driver, element_id):
    """As a user with the keyboard: focus the slider and press End; returns the render count to wait for."""
    from selenium.webdriver.common.keys import Keys

    count = eb.render_count(driver)
    driver.find_element("id", element_id).send_keys(Keys.END)
    return count + 1


def upload(driver, input_id, path):
    driver.find_element("id", input_id).send_keys(str(path))


def test_slider_changes_the_image_and_bad_uploads_show_a_message(server, browser):
    url, folder = server
    eb.open_editor(browser, url)
    before = src(browser)
    assert before.startswith("data:image/png;base64,")
    assert src(browser, "delta") and src(browser, "shape") and src(browser, "seg")

    # One region's texture slider: the shown image changes.
    eb.wait_idle(browser, move_slider_to_end(browser, "texture-7"))
    after = src(browser)
    assert after != before
    assert message(browser) == ""

    # A non-image as the portrait: a clear message, then the next edit still works.
    notes = folder / "notes.txt"
    notes.write_text("not a portrait\n")
    upload(browser, "portrait-file", notes)
    browser.find_element("id", "invert-button").click()
    eb.wait_for(lambda: "not a readable image" in message(browser), 20, what="the upload error")
    assert message(browser).startswith("notes.txt: ")
    eb.wait_idle(browser, move_slider_to_end(browser, "shape-1"))
    assert src(browser) != after
    assert message(browser) == ""

    # An image of another aspect, and a latent file of another configuration: the same.
    wide = folder / "wide.png"
    Image.fromarray(np.zeros((10, 30, 3), dtype=np.uint8)).save(wide)
    upload(browser, "portrait-file", wide)
    browser.find_element("id", "invert-button").click()
    eb.wait_for(lambda: "square" in message(browser), 20, what="the aspect error")
    other = folder / "other.pt"
    save_latents(other, torch.zeros(1, 18, 16), torch.zeros(1, 16))
    upload(browser, "latent-file", other)
    eb.wait_for(lambda: "style_dim 16" in message(browser), 20, what="the latent-file error")
    latest = src(browser)
    eb.wait_idle(browser, move_slider_to_end(browser, "azim"))
    assert src(browser) != latest and message(browser) == ""


def post_render(url, body):
    request = urllib.request.Request(url + "/api/render", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_several_clients_at_once_are_served_in_turn(server, browser):
    url, _ = server
    eb.open_editor(browser, url)
    states = [{"source": s, "reference": s + 1, "texture": [0.0] * 7 + [t, 0.0]}
              for s in range(4) for t in (0.0, 0.5, 1.0)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda body: post_render(url, body), states))
        # Meanwhile the browser edits too.
        eb.wait_idle(browser, move_slider_to_end(browser, "texture-1"))
    assert [status for status, _ in results] == [200] * len(states)
    images = [data["images"]["image"] for _, data in results]
    assert len(set(images)) == len(states)  # every state its own picture
    status, data = post_render(url, {"texture": [2.0] * 9})
    assert status == 400 and data["error"].startswith("texture[background]: 2.0 is not in [0, 1]")


def test_inversion_with_progress_becomes_the_source_and_latents_load_back(server, browser):
    url, folder = server
    eb.open_editor(browser, url)
    portrait = folder / "portrait.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(portrait)
    eb.wait_idle(browser, move_slider_to_end(browser, "texture-7"))  # an edit of the old source
    before = src(browser)
    count = eb.render_count(browser)
    upload(browser, "portrait-file", portrait)
    browser.find_element("id", "invert-button").click()
    eb.wait_for(lambda: browser.find_element("id", "invert-status").text.startswith("done"), 60,
                what="the inversion")
    status = browser.find_element("id", "invert-status").text
    assert "PSNR" in status and "region edits reset" in status
    # The new source starts unedited.
    assert browser.find_element("id", "texture-7").get_attribute("value") == "0"
    progress = browser.find_element("id", "invert-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "2"  # --invert_steps 2
    source = browser.find_element("id", "source-kind").get_attribute("value")
    assert source.startswith("id")
    eb.wait_idle(browser, count + 1)
    assert src(browser) != before and message(browser) == ""

    # A failed upload replaces the old "done" with what went wrong.
    notes = folder / "notes.txt"
    notes.write_text("not a portrait\n")
    upload(browser, "portrait-file", notes)
    browser.find_element("id", "invert-button").click()
    eb.wait_for(lambda: browser.find_element("id", "invert-status").text.startswith("not started: notes.txt"), 20,
                what="the failed upload's status")

    # The current latents, downloaded through the API, load back as an identity that renders the same.
    state = browser.execute_script("return currentState()")
    request = urllib.request.Request(url + "/api/latents", data=json.dumps(state).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        (folder / "current.pt").write_bytes(response.read())
    shown = src(browser)
    count = eb.render_count(browser)
    upload(browser, "latent-file", folder / "current.pt")
    eb.wait_idle(browser, count + 1)
    assert browser.find_element("id", "source-kind").get_attribute("value") != source
    assert src(browser) == shown and message(browser) == ""
    assert browser.find_element("id", "latent-status").text.startswith("loaded current.pt (1 identity)")


def test_a_long_inversion_shows_its_estimate_and_can_be_cancelled(server, browser):
    url, folder = server
    eb.open_editor(browser, url)
    portrait = folder / "long.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(portrait)
    eb.set_control(browser, "invert-steps", 5000)
    upload(browser, "portrait-file", portrait)
    browser.find_element("id", "invert-button").click()
    status = lambda: browser.find_element("id", "invert-status").text  # noqa: E731
    eb.wait_for(lambda: " left" in status() and "about" in status(), 60, what="the estimate")
    assert "step " in status() and "/5000" in status()
    assert browser.find_element("id", "invert-button").get_attribute("disabled")
    browser.find_element("id", "cancel-button").click()
    eb.wait_for(lambda: status().startswith("cancelled at step"), 60, what="the cancellation")
    assert not browser.find_element("id", "invert-button").get_attribute("disabled")
    assert browser.find_element("id", "cancel-button").get_attribute("disabled")
    assert "per step last time" in browser.find_element("id", "invert-estimate").text
    with urllib.request.urlopen(url + "/api/job", timeout=30) as response:
        job = json.load(response)
    assert job["done"] and job["cancelled"] and job["step"] < 5000


def test_hostile_identity_names_are_shown_as_text_and_the_page_still_works(server, browser):
    """Latent files named like markup: the page still runs its script (pictures, sliders) and lists the
    names as they are."""
    url, folder = server
    names = ["<!--<script>", "<img src=x onerror=\"document.title='owned'\">.pt", "<script>alert(1)<\\script>.pt"]
    save_latents(folder / "plain.pt", torch.zeros(1, 18, 32), torch.zeros(1, 32))
    data = (folder / "plain.pt").read_bytes()
    for name in names:
        request = urllib.request.Request(url + "/api/upload_latents?name=" + urllib.parse.quote(name, safe=""),
                                         data=data, headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    eb.open_editor(browser, url)
    assert src(browser).startswith("data:image/png;base64,") and browser.title == "CNeRF region editor"
    options = [o.text for o in browser.find_element("id", "source-kind").find_elements("tag name", "option")]
    assert all(name in options for name in names), options
    before = src(browser)
    eb.wait_idle(browser, move_slider_to_end(browser, "texture-7"))
    assert src(browser) != before and message(browser) == "" and browser.title == "CNeRF region editor"


def test_resample_semantics_reset_and_download(server, browser, tmp_path):
    url, _ = server
    eb.open_editor(browser, url)
    original = src(browser)

    count = eb.render_count(browser)
    browser.find_element("id", "resample-texture-7").click()
    eb.wait_idle(browser, count + 1)
    resampled = src(browser)
    assert resampled != original

    count = eb.render_count(browser)
    browser.find_element("id", "semantic-0").click()  # background features no longer reach the decoder
    eb.wait_idle(browser, count + 1)
    assert src(browser) != resampled
    for k in range(1, 9):
        browser.find_element("id", f"semantic-{k}").click()
    eb.wait_for(lambda: "at least one region" in message(browser), 20, what="the semantics error")

    count = eb.render_count(browser)
    browser.find_element("id", "reset").click()
    eb.wait_idle(browser, count + 1)
    assert src(browser) == original and message(browser) == ""

    # "download current latents" saves a latent file of the shown state through the browser.
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    browser.find_element("id", "resample-shape-2").click()
    browser.find_element("id", "download-latents").click()
    saved = eb.wait_for(lambda: [p for p in tmp_path.glob("*.pt")], 30, what="the downloaded latents")
    from rendering.latents import load_latents

    data = load_latents(saved[0], style_dim=32, n_regions=9)
    assert data["codes"].shape == (1, 18, 32) and "brow" not in data["note"] and "eye shape resampled" in data["note"]

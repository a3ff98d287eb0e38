#!/usr/bin/env python
"""Screenshot of the region editor in headless Chromium (the README's picture), and its edit times.

  python tools/editor_screenshot.py [--out docs/editor.png] [--source 3] [--reference 7] \
      [--texture hair] [--shape mouth] [--measure 10] -- [editor.py arguments, e.g. --trained_ckpt CKPT]

Starts `editor.py` on a free loopback port with the arguments after `--`, opens the page in the same
headless browser the browser test uses (tools/editor_browser.py), moves the --texture / --shape regions'
sliders to the reference, and writes the whole page as a PNG. With --measure N it first times N texture
edits and N shape edits as a user sees them (slider moved → new picture shown, each to a value not
seen before, so nothing comes from the cache) and prints the medians.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common.cli import check_output, command  # noqa: E402
from common.files import atomic_write  # noqa: E402
from common.regions import parse_regions  # noqa: E402
from tools import editor_browser as eb  # noqa: E402


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/editor.png", help="the screenshot (PNG)")
    parser.add_argument("--source", type=int, default=3, help="source seed")
    parser.add_argument("--reference", type=int, default=7, help="reference seed")
    parser.add_argument("--texture", default="hair", help="regions whose texture slider goes to the reference")
    parser.add_argument("--shape", default="", help="regions whose shape slider goes to the reference")
    parser.add_argument("--azim", type=float, default=0.0, help="azimuth of the view (rad)")
    parser.add_argument("--measure", type=int, default=0, help="time N texture and N shape edits first")
    parser.add_argument("--width", type=int, default=1150, help="browser window width")
    if "--" in argv:
        split = argv.index("--")
        own, editor_args = argv[:split], argv[split + 1:]
    else:
        own, editor_args = argv, []
    args = parser.parse_args(own)
    try:
        args.texture_regions, args.shape_regions = parse_regions(args.texture), parse_regions(args.shape)
    except ValueError as error:
        parser.error(str(error))
    if not 0 <= args.measure <= 19:
        parser.error("--measure must be 0..19 (distinct slider values)")
    return args, editor_args


def timed_edit(driver, element_id, value):
    """Seconds from setting a slider to the new picture being shown."""
    count = eb.render_count(driver)
    start = time.perf_counter()
    eb.set_control(driver, element_id, value)
    eb.wait_for(lambda: eb.render_count(driver) > count and not
                driver.find_element("tag name", "body").get_attribute("data-busy"), 120, interval=0.005,
                what=f"the edit of {element_id}")
    return time.perf_counter() - start


def measure(driver, n):
    """Median seconds of n texture edits and n shape edits (hair texture, face shape), all uncached."""
    values = [round(0.05 * (i + 1), 2) for i in range(n)]
    texture = [timed_edit(driver, "texture-7", v) for v in values]
    eb.set_control(driver, "texture-7", 0)
    eb.wait_idle(driver, eb.render_count(driver))
    shape = [timed_edit(driver, "shape-1", v) for v in values]
    eb.set_control(driver, "shape-1", 0)
    eb.wait_idle(driver, eb.render_count(driver))
    return texture, shape


@command
def main(argv=None):
    args, editor_args = parse(sys.argv[1:] if argv is None else argv)
    check_output(args.out, "--out", "file")
    try:
        eb.find_browser()
    except eb.BrowserUnavailable as reason:
        sys.exit(f"error: {reason}")
    with eb.editor_server(editor_args) as url, eb.headless_browser(width=args.width, height=900) as driver:
        eb.open_editor(driver, url, timeout=300)
        for which, seed in (("source", args.source), ("reference", args.reference)):
            eb.set_control(driver, f"{which}-seed", seed)
        eb.wait_idle(driver, eb.render_count(driver), timeout=300)
        if args.measure:
            texture, shape = measure(driver, args.measure)
            print(f"texture edit: median {statistics.median(texture):.2f} s "
                  f"(min {min(texture):.2f}, max {max(texture):.2f}, n={len(texture)})")
            print(f"shape edit:   median {statistics.median(shape):.2f} s "
                  f"(min {min(shape):.2f}, max {max(shape):.2f}, n={len(shape)})")
        count = eb.render_count(driver)
        eb.set_control(driver, "azim", args.azim)
        for attribute, regions in (("texture", args.texture_regions), ("shape", args.shape_regions)):
            for k in regions:
                eb.set_control(driver, f"{attribute}-{k}", 1)
        eb.wait_idle(driver, count + 1, timeout=300)
        # The whole page in one picture: make the viewport as tall as the page.
        height, chrome = driver.execute_script("return [document.documentElement.scrollHeight, "
                                               "window.outerHeight - window.innerHeight]")
        driver.set_window_size(args.width, height + chrome + 4)
        time.sleep(0.3)

        def screenshot(tmp):
            if not driver.save_screenshot(tmp):
                raise RuntimeError("the browser did not take the screenshot")

        atomic_write(args.out, screenshot)
    print(args.out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Write index.html in a results folder: every picture and video, each with one line saying what it is.

  python tools/results_index.py RESULTS_DIR [--title TITLE]
"""
import argparse
import html
import os
import re
import sys

# (file-name pattern, description); {0} is the first group of the match (an identity or step number).
DESCRIPTIONS = [
    (r"(\d+)_img\.png", "identity {0}: RGB output over the camera sweep"),
    (r"(\d+)_seg\.png", "identity {0}: coloured semantic segmentation over the same views"),
    (r"(\d+)_shape\.png", "identity {0}: shaded depth-map mesh of the middle view (the 3D shape)"),
    (r"(\d+)_video\.mp4", "identity {0}: video along the camera path — RGB | segmentation | shaded depth"),
    (r"edit_grid\.png", "region edit: source, reference and edited result over a row of views, each with its seg"),
    (r"interpolation\.png", "region codes interpolated from the source to the reference"),
    (r"interpolation\.mp4", "region codes interpolated from the source to the reference, as a video"),
    (r"resample\.png", "fresh codes drawn for the chosen regions, the rest of the portrait fixed"),
    (r"(.+)_inversion\.png", "inversion of {0}: target | reconstruction | novel views, segs below"),
    (r"(\d+)\.png", "training samples at iteration {0}: image beside coloured segmentation"),
]
MEDIA = (".png", ".jpg", ".mp4")


def describe(name):
    for pattern, text in DESCRIPTIONS:
        match = re.fullmatch(pattern, name)
        if match:
            return text.format(*(g.lstrip("0") or "0" if g.isdigit() else g for g in match.groups()))
    return name


def write_index(folder, title="CNeRF results"):
    entries = []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.lower().endswith(MEDIA):
                rel = os.path.relpath(os.path.join(root, name), folder)
                entries.append((rel, describe(name)))
    lines = ["<!doctype html>", "<meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em} figure{margin:1.5em 0} img,video{max-width:100%;"
             "image-rendering:pixelated;border:1px solid #ccc} figcaption{margin:.3em 0}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    section = None
    for rel, text in entries:
        folder_name = os.path.dirname(rel) or "."
        if folder_name != section:
            section = folder_name
            lines.append(f"<h2>{html.escape(section)}</h2>")
        src = html.escape(rel.replace(os.sep, "/"))
        media = (f"<video src='{src}' controls loop muted></video>" if rel.endswith(".mp4")
                 else f"<img src='{src}' alt='{html.escape(text)}'>")
        lines.append(f"<figure>{media}<figcaption><code>{src}</code> — {html.escape(text)}</figcaption></figure>")
    path = os.path.join(folder, "index.html")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path, len(entries)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--title", default="CNeRF results")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.folder):
        sys.exit(f"error: {args.folder}: no such folder")
    path, count = write_index(args.folder, args.title)
    print(f"wrote {path} ({count} pictures and videos)")


if __name__ == "__main__":
    main()

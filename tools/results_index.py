#!/usr/bin/env python
"""Write index.html in a results folder: every picture and video, each with one line saying what it is.

  python tools/results_index.py RESULTS_DIR [--title TITLE]
"""
import argparse
import html
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.cli import UsageError, command  # noqa: E402
from common.files import write_text  # noqa: E402

# (pattern, description), tried in order against the path relative to the results folder ('/'-separated)
# and then against the file name; {0}, {1} are the match's groups (identity or step numbers lose leading 0s).
DESCRIPTIONS = [
    (r"training/(\d+)\.png", "stage-1 training samples at iteration {0} (tiny model, from scratch): EMA render "
                             "beside its coloured seg, 8 views per identity"),
    (r"training/stage2_(\d+)\.png", "stage-2 training samples at iteration {0} (tiny model): high-res | seg | "
                                    "low-res | seg per view"),
    (r"semantics_[^/]*/(\d+)_img\.png", "identity {0} with only the named regions' features reaching the decoder "
                                        "(--semantics): the other regions lose their detail, geometry is unchanged"),
    (r"edit_inverted_([a-z_+]+)_(texture|shape)/edit_grid\.png",
     "the inverted held-out portrait edited ({0}, {1} from another identity): source, seg, reference, seg, "
     "edited, seg, |Δ| map (white = large change) over a row of views"),
    (r"edit_([a-z_+]+)_(texture|shape)/edit_grid\.png",
     "{0} {1} taken from another identity: source, seg, reference, seg, edited, seg, and the |Δ| map of edited vs "
     "source (white = large change; an edit is local when the white stays inside the region)"),
    (r"(\d+)_img\.png", "identity {0}: RGB output over the camera sweep"),
    (r"(\d+)_seg\.png", "identity {0}: coloured semantic segmentation over the same views"),
    (r"(\d+)_shape\.png", "identity {0}: shaded depth-map mesh of the middle view (the 3D shape)"),
    (r"(\d+)_video\.mp4", "identity {0}: video along the camera path — RGB | segmentation | shaded depth"),
    (r"edit_grid\.png", "region edit: source, reference and edited result over a row of views, each with its seg, "
                        "and the |Δ| map of edited vs source"),
    (r"interpolation\.png", "region codes interpolated from the source to the reference"),
    (r"interpolation\.mp4", "region codes interpolated from the source to the reference, as a video"),
    (r"resample\.png", "fresh codes drawn for the chosen regions, the rest of the portrait fixed"),
    (r"([^/]+)_inversion\.png", "inversion of {0}: target | reconstruction | novel views, segs below"),
    (r"(\d+)\.png", "training samples at iteration {0}: image beside coloured segmentation"),
]
MEDIA = (".png", ".jpg", ".mp4")


def describe(rel):
    """The description of a file at `rel` (relative path, '/'-separated): by its path, else by its name."""
    for candidate in (rel, rel.rsplit("/", 1)[-1]):
        for pattern, text in DESCRIPTIONS:
            match = re.fullmatch(pattern, candidate)
            if match:
                groups = (g.lstrip("0") or "0" if g.isdigit() else g.replace("_", ", ") for g in match.groups())
                return text.format(*groups)
    return rel


def write_index(folder, title="CNeRF results"):
    entries = []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.lower().endswith(MEDIA):
                rel = os.path.relpath(os.path.join(root, name), folder)
                entries.append((rel, describe(rel.replace(os.sep, "/"))))
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
    write_text(path, "\n".join(lines) + "\n")
    return path, len(entries)


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--title", default="CNeRF results")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.folder):
        raise UsageError(f"{args.folder}: no such folder")
    path, count = write_index(args.folder, args.title)
    print(f"wrote {path} ({count} pictures and videos)")


if __name__ == "__main__":
    main()

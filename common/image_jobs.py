"""One output file per input image, named by the image's stem: the contract of the data-making tools
(tools/parse_faces.py, tools/align_faces.py, tools/celebamask_labels.py).

Outputs are written atomically (common.files), so a file that exists is complete: a rerun skips it
and goes on where an interrupted run stopped. An input that cannot be used (an unreadable image, no
landmarks) is listed at the end and the others go on; the run fails (one line, exit status 1) only
when none of the inputs it had to do could be done.
"""
import argparse
import os
import sys

from common.cli import UsageError, check_output

MAX_LISTED = 10  # problems named on the final line before '... and N more'


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError (one line, exit status 1 through common.cli.run_command)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def input_images(images, out, suffix=".png"):
    """The checks every data tool makes before work: IMAGES is a folder with images, OUT a usable folder
    outside it (common.cli.check_output). Returns {image relpath: OUT/<stem><suffix>}."""
    import prepare_data  # its image listing is the one prepare_data.py packs: the tools' outputs pair with it

    if not os.path.isdir(images):
        raise UsageError(f"IMAGES {images}: not a folder")
    check_output(out, "OUT", "folder", inputs=[images])
    found = prepare_data.list_files(images, prepare_data.IMAGE_EXTENSIONS)
    if not found:
        raise UsageError(f"IMAGES {images}: no images ({', '.join(prepare_data.IMAGE_EXTENSIONS)})")
    return output_paths(found, out, images, suffix)


def output_paths(relpaths, out_dir, source, suffix=".png"):
    """{input relpath: OUT/<stem><suffix>}; a UsageError naming them when two inputs share a stem (their
    outputs, and prepare_data.py's pairing by stem, would collide)."""
    by_stem = {}
    for relpath in relpaths:
        by_stem.setdefault(os.path.splitext(os.path.basename(relpath))[0], []).append(relpath)
    clashes = [" and ".join(paths) for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        raise UsageError(f"inputs in {source} share a stem, so their outputs would collide: {listing(clashes)}")
    return {paths[0]: os.path.join(out_dir, stem + suffix) for stem, paths in by_stem.items()}


def pending(outputs):
    """(inputs whose output does not exist yet, in the given order; number already done)."""
    todo = [relpath for relpath, path in outputs.items() if not os.path.exists(path)]
    return todo, len(outputs) - len(todo)


def listing(items):
    shown = "; ".join(items[:MAX_LISTED])
    return shown + (f"; ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def finish(prog, out_dir, written, done_before, problems, what="images"):
    """Print what was skipped (one line each, stderr) and a summary (stdout); a UsageError when there was
    work and none of it could be done."""
    for problem in problems:
        print(f"{prog}: skipped {problem}", file=sys.stderr)
    if problems and not written:
        raise UsageError(f"none of the {len(problems)} {what} left to do could be used: {listing(problems)}")
    print(f"{prog}: wrote {written} to {out_dir}" + (f", {done_before} were done already" if done_before else "")
          + (f", skipped {len(problems)} (listed above)" if problems else ""))

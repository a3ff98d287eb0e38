"""The command-line contract every script of this project keeps.

Bad input (a flag, a file, a device, an output path) raises `UsageError` or a subclass of it — every
user-facing error class of the project derives from it — and `run_command` turns it into one line on
stderr and exit status 1 instead of a traceback (every script's main is decorated with `command`).
Anything else is a programming error and raises with its traceback. `check_output` refuses an output
path that cannot be used, before any work.
"""
import functools
import os
import sys


class UsageError(ValueError):
    """Bad user input (a flag, a file, a device): every script stops on it with its one-line message."""


def fail(message):
    """Exit with one clear line on stderr and a non-zero status."""
    sys.exit(f"error: {message}")


def run_command(main, *args, **kwargs):
    """Run a script's main(); a UsageError ends it with one line and exit status 1."""
    try:
        return main(*args, **kwargs)
    except UsageError as error:
        fail(error)


def command(main):
    """Decorator for a script's main(argv): a UsageError ends it with one line and exit status 1."""
    @functools.wraps(main)
    def checked(*args, **kwargs):
        return run_command(main, *args, **kwargs)

    return checked


def _inside(path, folder):
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)
    except ValueError:  # different drives
        return False


def check_output(path, what, kind="folder", inputs=()):
    """Refuse, with one UsageError line, an output path that cannot be used — before any work is done.

    kind "folder": `path` must be a folder or not exist yet; kind "file": not an existing folder. In both
    cases the nearest existing parent must be a writable folder, and the path must not be one of, or lie
    inside, the `inputs` (paths the command reads). `what` names the flag in the message.
    """
    path = str(path)
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path}: exists and is not a folder")
    if kind == "file" and os.path.isdir(path):
        raise UsageError(f"{what} {path}: is a folder, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{what} {path}: {parent} is a file, not a folder")
    probe = path if os.path.isdir(path) else parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: {probe} is not writable")
    for source in inputs:
        if not source:
            continue
        if os.path.realpath(path) == os.path.realpath(str(source)):
            raise UsageError(f"{what} {path}: is the input {source} itself")
        if os.path.isdir(str(source)) and _inside(path, str(source)):
            raise UsageError(f"{what} {path}: lies inside the input {source}")
    return path

"""The one way this project writes a file: atomically.

Every file a script or a training run writes (checkpoints, PNGs, meshes, videos, JSON, markdown) goes
through `atomic_write`: the content is written to a temporary file in the destination's folder (same
extension, so format-sniffing writers such as imageio and trimesh pick the right format), optionally
fsynced, then renamed over the destination. A reader never sees a half-written file, and a failure leaves
the previous file (if any) intact and no temporary behind. An OSError becomes one WriteError naming the
path; any other exception (a programming error) propagates unchanged after the clean-up.
"""
import json
import os
import tempfile

from common.cli import UsageError


class WriteError(UsageError):
    """A file could not be written (disk full, no permission, ...); nothing was left half-written."""


def atomic_write(path, write, fsync=False):
    """Call write(temporary_path), then rename the temporary file to `path` (folders are created).

    `fsync` flushes the data to disk before the rename: worth it for checkpoints, which a crash must not
    leave empty; pictures and reports can be rewritten.
    """
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1] or ".tmp", dir=folder)
        os.close(fd)
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would otherwise follow the file
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        raise WriteError(f"could not write {path} ({error.strerror or error}); nothing was written, an earlier "
                         f"file there is intact") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """Write a text file (markdown, logs, HTML) atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def write_json(path, value, indent=2):
    """Write a JSON file atomically (keys in insertion order, a final newline)."""
    write_text(path, json.dumps(value, indent=indent) + "\n")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask

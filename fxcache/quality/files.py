"""Writing result files (tables, JSON, images, plots) so that a reader never sees half a file and nothing is written
through a symbolic link planted where a result goes: each file is written to a new temporary file in its folder,
then renamed over the result's name. A rename replaces the name itself, so a result path that is a link becomes a
regular file and whatever the link pointed to is left as it was; an output folder that is a link is refused."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets


class LinkedFolderError(OSError):
    """An output folder is a symbolic link: results written into it would land wherever it points."""


def output_folder(path: str) -> str:
    """Create `path` (and its parents) as the folder of a run's results; a folder that is a symbolic link is
    refused, before any work is done."""
    _refuse_link(path)
    os.makedirs(path, exist_ok=True)
    return path


def _refuse_link(folder: str) -> None:
    name = folder.rstrip(os.sep) or folder  # "link/" would name the folder it points to
    if os.path.islink(name):
        raise LinkedFolderError(errno.ELOOP, f"{folder!r} is a symbolic link (to {os.readlink(name)!r}); results are "
                                             "written only into a real folder: pass the folder it points to, or "
                                             "another",
                                folder)


@contextlib.contextmanager
def replacing(path: str, mode: str = "wb"):
    """`with replacing(path) as f: ...` writes `path` atomically: `f` is a new temporary file beside it (opened in
    `mode`, "wb" or "w"), renamed over `path` when the block ends without an exception and removed otherwise."""
    folder = os.path.dirname(path) or "."
    _refuse_link(folder)
    fd, tmp = _new_file(folder, f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _new_file(folder: str, prefix: str) -> tuple[int, str]:
    """A new file of a random name in `folder`, created here (never an existing file, never through a link), with
    the permissions the umask gives any new file (tempfile.mkstemp's are private to the user)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}.tmp")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", folder)


def write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with replacing(path, "w") as f:
        f.write(text)


def write_json(path: str, data, **options) -> None:
    """`json.dump(data, ..., **options)` to `path` atomically."""
    with replacing(path, "w") as f:
        json.dump(data, f, **options)


def save_image(image, path: str) -> None:
    """Save a PIL image to `path` atomically, in the format its extension names (PNG when it names none)."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    with replacing(path) as f:
        image.save(f, format=Image.registered_extensions().get(ext, "PNG"))


def save_figure(fig, path: str) -> None:
    """Save a matplotlib figure to `path` atomically, in the format its extension names (PNG when it names none)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    with replacing(path) as f:
        fig.savefig(f, format=ext or "png")

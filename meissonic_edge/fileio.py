"""Writing outputs so that a failure never leaves a half-written file or folder looking whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from meissonic_edge.errors import OptionsError


def check_file_path(path: str | Path) -> Path:
    """Refuse an output file that cannot be written, before any work: a folder there, or no folder to put it in."""
    path = Path(path)
    if path.is_dir():
        raise OptionsError(f"cannot write {path}: it is a directory")
    folder = path.parent
    if not folder.is_dir():
        problem = f"{folder} is a file, not a folder" if folder.exists() else f"folder {folder} does not exist"
        raise OptionsError(f"cannot write {path}: {problem}")
    return path


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is a file (so no folder can be made below it), else None."""
    for ancestor in path.parents:
        if ancestor.exists():
            return None if ancestor.is_dir() else ancestor
    return None


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it to `path` only if the block succeeds.

    Missing parent folders are created, as `mkdir -p` would.
    On any error the temporary folder is deleted and `path` is left as it was.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OptionsError(f"{path} already exists (choose another path, or pass --force to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=parent))
        ordinary_permissions(tmp, 0o777)
    except OSError as e:
        blocker = file_in_the_way(path)  # mkdir says "File exists" or "Not a directory": name the file instead
        problem = f"{blocker} is a file, not a folder" if blocker else e.strerror
        raise OptionsError(f"cannot write {path}: {problem}") from None
    try:
        yield tmp
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, backup / path.name)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ordinary_permissions(path: str | Path, mode: int) -> None:
    """Give a file or folder that mkstemp/mkdtemp made private the permissions the umask gives a new one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` through a temporary file beside it, renamed over `path` only when `write(file)` succeeds.

    An OSError (no space, no permission) is an OptionsError naming `path`; nothing is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        with os.fdopen(handle, "wb") as f:
            write(f)
        ordinary_permissions(tmp, 0o666)
        os.replace(tmp, path)
    except OSError as e:
        raise OptionsError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_atomic` for text, UTF-8."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))

"""Writing output folders so that a failure never leaves a half-written one looking whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from meissonic_edge.errors import OptionsError


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
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    except OSError as e:
        raise OptionsError(f"cannot write {path}: {e.strerror}") from None
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

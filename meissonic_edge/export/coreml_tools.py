"""coremltools, imported only when an export needs it (the export extra), and kept quiet about itself."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet_coremltools():
    """coremltools reports on itself (untested torch version, no Linux runtime, its progress bars): not ours."""
    names = ["coremltools"]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def import_coremltools():
    with quiet_coremltools():
        import coremltools
        import coremltools.optimize.coreml  # noqa: F401

    return coremltools

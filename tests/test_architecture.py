"""The package's layout is its architecture: these tests keep the layers honest.

Every import counts, including those inside functions (a lazy import is still a dependency): each
subpackage imports only its own modules and the layers below it, no two modules import each other through
any path, and the runtime needs nothing beyond the plain install.
"""

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "meissonic_edge"
ROOT = "meissonic_edge"

# The rooms, bottom to top: a module may import its own room and any room on a lower level.
LEVELS = {
    "errors": 0,  # the shared leaf modules
    "fileio": 1,
    "runtime": 2,  # running a bundle: no torch
    "model": 3,  # the PyTorch reference
    "quant": 4,
    "export": 5,
    "bench": 6,  # bench and demo are tools side by side: neither imports the other
    "demo": 6,
    "cli": 7,
}
MAX_LINES = 600
HEAVY = ("torch", "transformers", "diffusers", "onnx", "onnxscript", "coremltools", "safetensors", "scipy")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules of this package, top-level names of other packages) imported anywhere in `path`."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use absolute ones)"
            # `from package import submodule` imports the submodule; `from module import name` the module
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                ours.add(name)
            else:
                theirs.add(name.split(".")[0])
    return ours, theirs


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def room(module: str) -> str | None:
    """`meissonic_edge.export.to_onnx` -> "export"; the package's own `__init__` has none."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_has_a_room():
    assert {room(m) for m in MODULES} - {None} == set(LEVELS), "a new subpackage needs its level in LEVELS"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m)))
def test_imports_go_down_only(module):
    here = room(module)
    wrong = []
    for target in GRAPH[module][0]:
        there = room(target)
        if there is None:  # `from meissonic_edge import __version__`: the root imports only errors
            continue
        if there != here and (LEVELS[there] >= LEVELS[here]):
            wrong.append(f"{target} ({there}, level {LEVELS[there]})")
    assert not wrong, f"{module} ({here}, level {LEVELS[here]}) imports upward or sideways: {wrong}"


def test_the_root_imports_only_the_leaf_modules():
    assert GRAPH[ROOT][0] <= {f"{ROOT}.errors"}


def plain_install() -> set[str]:
    """The import names of the plain install's dependencies (the installed metadata, without extras)."""
    requirements = importlib.metadata.requires("meissonic-edge")
    plain = [r for r in requirements if "extra ==" not in r]
    distributions = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in plain}
    assert "onnxruntime" in distributions and "numpy" in distributions
    import_names = {"pillow": "PIL"}
    return {import_names.get(d, d) for d in distributions}


def test_the_runtime_imports_only_itself_the_leaf_modules_and_the_plain_install():
    allowed_ours = {f"{ROOT}.errors", f"{ROOT}.fileio"}
    allowed_theirs = plain_install() | set(sys.stdlib_module_names)
    assert allowed_theirs.isdisjoint(HEAVY)
    runtime = [m for m in MODULES if room(m) == "runtime"]
    assert len(runtime) > 5
    for module in runtime:
        ours, theirs = GRAPH[module]
        outside = {m for m in ours if room(m) != "runtime"} - allowed_ours
        assert not outside, f"{module} imports {sorted(outside)}: the runtime may import only itself, errors, fileio"
        assert theirs <= allowed_theirs, f"{module} imports {sorted(theirs - allowed_theirs)}: not in the plain install"


def test_importing_every_runtime_module_loads_no_torch():
    """The plain install is the runtime: the package, every runtime module, the leaf modules and the command's
    front (its heavy work is imported on first use) start without torch or the exporters' libraries."""
    runtime = sorted(m for m in MODULES if room(m) in ("runtime", "errors", "fileio"))
    runtime += [ROOT, f"{ROOT}.cli.app"]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in runtime)
        + f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        + "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_import_circles():
    """Depth-first search over every import (lazy ones too): a back edge is a circle, reported as its path."""
    edges = {m: sorted(t for t in GRAPH[m][0] if t in MODULES and t != m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles = []

    def visit(module):
        state[module] = 1
        path.append(module)
        for target in edges[module]:
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_circle_finder_finds_a_circle(monkeypatch):
    """The search above must be able to fail: plant a circle and see it reported."""
    a, b = f"{ROOT}.runtime.sampler", f"{ROOT}.runtime.config"
    planted = {**GRAPH, b: (GRAPH[b][0] | {a}, GRAPH[b][1]), a: (GRAPH[a][0] | {b}, GRAPH[a][1])}
    monkeypatch.setitem(globals(), "GRAPH", planted)
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circles()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines (at most {MAX_LINES}): split it by job"

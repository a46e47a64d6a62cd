"""Layers point down: read every import of the package (``ast``, lazy and TYPE_CHECKING imports
included) and fail on one that climbs to a higher layer, naming the file and the import.

From the top (``../shared/CONVENTIONS.md``, "Layers point down"): the command line; readers and
writers of outside formats; whole runs; the model families; the continual trainer; the library
(data, evaluation, the retrieval index and search, reports, adapters, losses, configs); the
ground (models, sharding, atomic files, errors). A module imports its own layer or any below it,
and a family no other family.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = "mslora_jax"
LAYERS = (  # top first
    {"cli"},
    {"interop"},
    {"run"},
    {"families", "continual_retrieval", "objects"},
    {"train"},
    {"data", "eval", "retrieval", "report", "lora", "losses", "config"},
    {"models", "parallel", "io_utils", "errors"},
)
# The package's front door (``mslora_jax/__init__.py``) and the old import paths it keeps
# working (``_deprecated.py``) sit above everything.
EXEMPT = {"__init__", "_deprecated"}


def rank(room: str) -> int:
    for depth, layer in enumerate(LAYERS):
        if room in layer:
            return depth
    raise AssertionError(f"{PACKAGE}/{room} is in no layer of tests/test_layers.py: place it")


def imported_modules(path: Path, package_dir: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of the package in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                parts = path.relative_to(package_dir.parent).with_suffix("").parts
                base = ".".join(parts[: len(parts) - node.level])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == PACKAGE:  # `from mslora_jax import train`
                found += [(node.lineno, f"{PACKAGE}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, module))
    return [(line, m) for line, m in found if m.split(".")[0] == PACKAGE]


def upward_imports(package_dir: Path) -> list[str]:
    """``file:line imports module (layer X above layer Y)`` for every import that points up."""
    problems = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        room = parts[0]
        if room in EXEMPT:
            continue
        for line, module in imported_modules(path, package_dir):
            target = module.split(".")
            if len(target) < 2 or target[1] in EXEMPT:
                problems.append(f"{path}:{line} imports {module} (the package's front door)")
                continue
            where = f"{path.relative_to(package_dir.parent)}:{line} imports {module}"
            if rank(target[1]) < rank(room):
                problems.append(f"{where}: {target[1]}/ is a higher layer than {room}/")
            elif (
                room == target[1] == "families"
                and len(parts) > 2
                and len(target) > 2
                and parts[1] != target[2]
            ):
                problems.append(f"{where}: one family imports another ({parts[1]} -> {target[2]})")
    return problems


def test_package_imports_point_down():
    problems = upward_imports(ROOT / PACKAGE)
    assert not problems, "imports that point up:\n" + "\n".join(problems)


def test_every_room_has_a_layer():
    for path in (ROOT / PACKAGE).iterdir():
        name = path.name.removesuffix(".py")
        if (path.is_dir() and (path / "__init__.py").exists()) or path.suffix == ".py":
            if name not in EXEMPT:
                rank(name)


def test_an_upward_import_is_caught(tmp_path):
    """The checker itself: a copy of the package with one upward import added fails, naming the
    file, the line and the import (so the test above cannot pass vacuously)."""
    package = tmp_path / PACKAGE
    for source in (ROOT / PACKAGE).rglob("*.py"):
        target = package / source.relative_to(ROOT / PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
    assert upward_imports(package) == []
    bad = package / "models" / "clip.py"
    bad.write_text(bad.read_text() + "\nfrom mslora_jax.train.stream import run_method\n")
    line = len(bad.read_text().splitlines())
    lazy = package / "train" / "stream.py"
    lazy.write_text(
        lazy.read_text() + "\n\ndef f():\n    from mslora_jax.families import dual_encoder\n"
    )
    cross = package / "families" / "llava" / "setup.py"
    cross.write_text(cross.read_text() + "\nfrom mslora_jax.families.dual_encoder import setup\n")
    problems = upward_imports(package)
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{PACKAGE}/families/llava/setup.py:")
    assert "one family imports another (llava -> dual_encoder)" in problems[0]
    assert problems[1] == (
        f"{PACKAGE}/models/clip.py:{line} imports mslora_jax.train.stream: "
        "train/ is a higher layer than models/"
    )
    assert "mslora_jax.families: families/ is a higher layer than train/" in problems[2]

"""Old import paths of modules that moved, kept working with a DeprecationWarning.

Only paths that the README or a notebook once showed users (``mslora_jax.train.experiment``
before whole runs moved to ``run/``, ...): each old name is an alias of the new module, so
``from mslora_jax.train.experiment import run_experiment`` still works, and warns once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "mslora_jax.train.experiment": "mslora_jax.run.experiment",
    "mslora_jax.train.pictures": "mslora_jax.run.pictures",
    "mslora_jax.train.generative_run": "mslora_jax.families.llava.setup",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the moved module itself (one module object, two names)."""

    def __init__(self):
        self._own_specs = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        warnings.warn(
            f"{spec.name} moved to {MOVED[spec.name]}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(MOVED[spec.name])
        self._own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # The moved module already ran; the import machinery has just set its ``__spec__`` to
        # the old name's: give it back its own.
        module.__spec__ = self._own_specs[module.__spec__.name]


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())

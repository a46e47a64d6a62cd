"""The package's front door (``mslora_jax.<name>``) and the old import paths it keeps working."""

import importlib
import sys

import pytest

import mslora_jax
from mslora_jax import _deprecated


@pytest.mark.parametrize("name", mslora_jax.__all__)
def test_front_door_names_resolve_to_their_module(name):
    module = importlib.import_module(mslora_jax._FRONT_DOOR[name])
    assert getattr(mslora_jax, name) is getattr(module, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'run_everything'"):
        mslora_jax.run_everything  # noqa: B018


@pytest.mark.parametrize("old", sorted(_deprecated.MOVED))
def test_moved_module_still_imports_with_a_warning(old):
    new = importlib.import_module(_deprecated.MOVED[old])
    sys.modules.pop(old, None)  # the alias must resolve (and warn) as on a first import
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new.__name__}; import it from"):
        alias = importlib.import_module(old)
    assert alias is new
    assert new.__spec__.name == new.__name__  # the module keeps its own spec


def test_every_model_kind_has_a_family():
    """The config accepts exactly the model kinds a family plugs in (``families.FAMILY_MODULES``);
    each module defines its ``FAMILY``."""
    from mslora_jax.config import MODEL_KINDS
    from mslora_jax.families import FAMILY_MODULES, Family

    assert set(MODEL_KINDS) == set(FAMILY_MODULES)
    for module in FAMILY_MODULES.values():
        assert isinstance(importlib.import_module(module).FAMILY, Family)

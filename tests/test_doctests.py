"""Every docstring example in the library runs and prints what it says (doctest)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lrdet_core

MODULES = sorted(m.name for m in pkgutil.walk_packages(lrdet_core.__path__, "lrdet_core."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # an optional dependency (triton, torchvision) that is not installed
        pytest.skip(f"{name}: {e}")
    res = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False)
    assert res.failed == 0, f"{res.failed} of {res.attempted} docstring examples of {name} failed (output above)"

"""Dotted module paths: look them up with helpful errors, swap modules temporarily."""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .errors import SplitPointError


def get_module(model: nn.Module, path: str, role: str = "split point") -> nn.Module:
    """Return ``model``'s submodule at dotted ``path``; an unknown path lists the close matches.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> get_module(m, "0").__class__.__name__
        'Conv2d'
    """
    if not isinstance(path, str) or not path:
        raise SplitPointError(f"expected the {role} to be a non-empty dotted module path such as "
                              f"'backbone.body', but got {path!r}")
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        if not close:  # fall back to the names that share the last component
            last = path.rsplit(".", 1)[-1]
            close = [n for n in names if n.rsplit(".", 1)[-1] == last][:5]
        hint = f" Close matches: {', '.join(repr(c) for c in close)}." if close else ""
        raise SplitPointError(
            f"{type(model).__name__} has no submodule {path!r} (the {role}).{hint}") from None


@contextmanager
def swapped(model: nn.Module, path: str, replacement: nn.Module) -> Iterator[nn.Module]:
    """Put ``replacement`` at ``path`` for the duration of the block; always put the original back."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = parent._modules[name]
    parent._modules[name] = replacement
    try:
        yield original
    finally:
        parent._modules[name] = original

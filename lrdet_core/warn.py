"""Library warnings that point at the user's line, however deep in lrdet-core (or in torch's module call
machinery, or a training framework's wrappers) they are raised.

A fixed ``stacklevel`` is wrong as soon as the call path changes (a forward hook adds a frame to
``nn.Module.__call__``, DDP another, Accelerate's mixed precision an autocast decorator and an fp32
conversion, Lightning Fabric its module wrapper); this walks out of the library and those frames instead.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     warn_user("LRDet: example")
    >>> str(w[0].message), w[0].filename.endswith("warn.py")
    ('LRDet: example', False)
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Tuple

_LIBRARY = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: torch's own frames between the user's call and the library: Module.__call__, DDP, no_grad decorators,
#: and torch.amp's autocast used as a decorator (as Accelerate wraps ``forward`` under mixed precision).
_TORCH = tuple(os.sep + os.path.join("torch", *p) + os.sep for p in (("nn", "modules"), ("nn", "parallel"),
                                                                    ("utils",), ("amp",)))
#: Training frameworks whose wrappers sit between the user's call and the library (Fabric's ``_FabricModule``,
#: Accelerate's fp32 output conversion, Lightning's module wrappers). No user code lives inside them.
FRAMEWORKS = ("lightning", "lightning_fabric", "pytorch_lightning", "accelerate")


def _framework_dirs() -> Tuple[str, ...]:
    # Found by the imported packages' own locations, never by a folder name (a user's project may well be
    # called "lightning"), and never imported here: a framework that is not loaded has no frames.
    found = (getattr(sys.modules.get(name), "__file__", None) for name in FRAMEWORKS)
    return tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in found if f)


def _internal(filename: str, frameworks: Tuple[str, ...] = ()) -> bool:
    return (filename.startswith(_LIBRARY) or any(p in filename for p in _TORCH)
            or (bool(frameworks) and os.path.abspath(filename).startswith(frameworks)))


def warn_user(message: str, category: type = UserWarning) -> None:
    """``warnings.warn(message)`` attributed to the first frame outside lrdet-core, torch's call machinery
    and the training frameworks' wrappers."""
    frameworks = _framework_dirs()
    frame, level = sys._getframe(1), 2
    while frame is not None and _internal(frame.f_code.co_filename, frameworks):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

"""Library warnings that point at the user's line, however deep in lrdet-core (or in torch's module call
machinery) they are raised.

A fixed ``stacklevel`` is wrong as soon as the call path changes (a forward hook adds a frame to
``nn.Module.__call__``, DDP another); this walks out of the library instead.

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

_LIBRARY = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: torch's own frames between the user's call and the library: Module.__call__, DDP, no_grad decorators.
_TORCH = tuple(os.sep + os.path.join("torch", *p) + os.sep for p in (("nn", "modules"), ("nn", "parallel"),
                                                                    ("utils",)))


def _internal(filename: str) -> bool:
    return filename.startswith(_LIBRARY) or any(p in filename for p in _TORCH)


def warn_user(message: str, category: type = UserWarning) -> None:
    """``warnings.warn(message)`` attributed to the first frame outside lrdet-core and torch's call machinery."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

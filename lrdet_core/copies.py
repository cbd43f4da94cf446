"""What a copy of a distiller holds: everything but its frozen teacher(s).

``copy.deepcopy(distiller)`` (what an EMA or ``AveragedModel`` does), ``pickle.dumps(distiller)`` and
``torch.save(distiller)`` all go through ``__getstate__``, and all leave the teacher out. The teacher is frozen,
so a copy would only hold a second instance of what the original already has: a pickled YOLOv8 n/s pair was
72 MB with the teacher. Sharing one teacher between the original and its copies is not safe either: a copy's
``.half()`` or ``.to(...)`` moves its teacher along (as the original's does), so Ultralytics' checkpoint step,
``deepcopy(ema).half()``, would cast the teacher the original is training with. And a teacher cannot be
shared with another process through pickle anyway.

A copy keeps the student, the projectors, the loss modules, ``alpha`` (and ``auto_alpha``) and every option. It
predicts in eval mode, its ``state_dict()`` is the original's, and it can be loaded into a new distiller. Its
``teachers`` is empty, and a training step (or ``distiller.teacher``) raises :class:`MissingTeacherError`.

Example:
    >>> import copy, torch
    >>> from torch import nn
    >>> from lrdet_core import BridgeDistiller, SplitPoints
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.backbone, self.neck = nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.Conv2d(4, 4, 1)
    ...     def forward(self, x, targets=None):
    ...         y = self.neck(self.backbone(x))
    ...         return {"det": y.mean()} if self.training else y
    >>> d = BridgeDistiller(Tiny(), Tiny(), split_points=SplitPoints("backbone", "neck"), hr_scale=2.0)
    >>> c = copy.deepcopy(d)
    >>> c.teachers, d.teacher is not None, c.eval()(torch.zeros(1, 3, 8, 8)).shape
    ({}, True, torch.Size([1, 4, 2, 2]))
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from .errors import MissingTeacherError

#: The distiller's attributes that hold its teachers (the models, and their adapters, which hold them too).
TEACHER_ATTRIBUTES = ("_teachers", "teacher_adapters")


def without_teachers(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A distiller's ``__dict__`` with empty :data:`TEACHER_ATTRIBUTES`: what its copies and pickles hold."""
    out = dict(state)
    for k in TEACHER_ATTRIBUTES:
        out[k] = {}
    return out


def check_has_teachers(teachers: Mapping[str, Any], what: str) -> None:
    """Raise :class:`MissingTeacherError` for a distiller without teachers (a copy) asked for ``what``."""
    if not teachers:
        raise MissingTeacherError(
            f"expected a distiller with its teacher for {what}, but this one has none: copies (copy.deepcopy, "
            f"pickle, torch.save of the whole module) leave the frozen teacher out. Train the original, or build a "
            f"new one around the copy's student, BridgeDistiller(copy.student, teacher, ...), and load the copy's "
            f"state_dict() into it")

"""Detector families: how the distiller runs each one. One adapter object per model.

* :class:`TorchvisionAdapter`: torchvision RetinaNet, FCOS and the R-CNNs, recognised by class name;
* :class:`GenericAdapter`: any other ``nn.Module`` cut at :class:`SplitPoints`;
* ``UltralyticsAdapter`` (:mod:`lrdet_core.adapters.ultralytics`): Ultralytics YOLO detection models.

:func:`adapter_for` picks the family from the model's class names alone: importing this package imports
neither torchvision nor ultralytics.

Example:
    >>> from torch import nn
    >>> m = nn.Module()
    >>> m.body, m.fpn = nn.Identity(), nn.Identity()
    >>> type(adapter_for(m, SplitPoints("body", "fpn"), "student")).__name__
    'GenericAdapter'
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import nn

from ..errors import InputError, SplitPointError
from .base import Adapter, HRView, LevelSize, PassRecord, SplitPoints
from .generic import GenericAdapter
from .torchvision import TORCHVISION_SPLIT_POINTS, TorchvisionAdapter, torchvision_family

__all__ = ["Adapter", "GenericAdapter", "TorchvisionAdapter", "SplitPoints", "PassRecord", "HRView", "LevelSize",
           "TORCHVISION_SPLIT_POINTS", "adapter_for", "check_one_family", "family_of", "torchvision_family",
           "ultralytics_family"]


def ultralytics_family(model: nn.Module) -> Optional[str]:
    """``"DetectionModel"`` for an Ultralytics YOLO detection model (matched by class name), else None."""
    for cls in type(model).__mro__:
        if cls.__name__ == "DetectionModel" and cls.__module__.startswith("ultralytics."):
            return cls.__name__
    return None


def family_of(model: nn.Module) -> str:
    """``"torchvision"``, ``"ultralytics"`` or ``"custom"``: which adapter class runs ``model``."""
    if torchvision_family(model):
        return "torchvision"
    if ultralytics_family(model):
        return "ultralytics"
    return "custom"


def check_one_family(student: nn.Module, teachers: Mapping[str, nn.Module]) -> None:
    """The student and every teacher are of one family: the HR view is built differently for each."""
    families = {n: family_of(t) for n, t in teachers.items()}
    if any(f != family_of(student) for f in families.values()):
        raise InputError(f"expected the student and the teacher(s) to be of one family (torchvision detectors, "
                         f"Ultralytics YOLO models or custom models), because the HR view is built differently "
                         f"for each; got a {family_of(student)} student and {families}")


def adapter_for(model: nn.Module, split_points: Optional[SplitPoints], role: str) -> Adapter:
    """The adapter that runs ``model`` (named ``role`` in messages).

    Args:
        model: the student or a teacher.
        split_points: where to cut a custom model (required there); overrides a torchvision family's default.
        role: ``"student"``, ``"teacher"`` or ``"teacher 'name'"``.

    Raises:
        SplitPointError: for a custom model without split points, an Ultralytics ``YOLO`` wrapper (its ``.model``
            is the detector), or split points that are not
            :class:`SplitPoints` or name no module of the model (the message lists the close matches).
    """
    if split_points is not None and not isinstance(split_points, SplitPoints):
        raise SplitPointError(f"expected split points for the {role} as SplitPoints(backbone=..., neck=...), "
                              f"but got {type(split_points).__name__}: {split_points!r}")
    if any(c.__name__ == "Model" and c.__module__.startswith("ultralytics.") for c in type(model).__mro__):
        raise SplitPointError(f"expected the {role} to be a YOLO detection model, but got the {type(model).__name__} "
                              f"wrapper: pass its .model, e.g. YOLO('yolov8n.yaml').model")
    family = family_of(model)
    if family == "torchvision":
        return TorchvisionAdapter(model, split_points, role)
    if family == "ultralytics":
        from .ultralytics import UltralyticsAdapter  # imports ultralytics only for its models
        return UltralyticsAdapter(model, split_points, role)
    if split_points is None:
        raise SplitPointError(
            f"cannot find the split points of the {role} ({type(model).__name__}) automatically: only torchvision "
            f"{', '.join(TORCHVISION_SPLIT_POINTS)} detectors and Ultralytics YOLO models are recognised. Pass "
            f"them, e.g. split_points=SplitPoints(backbone='backbone.body', neck='backbone.fpn').")
    return GenericAdapter(model, split_points, role)

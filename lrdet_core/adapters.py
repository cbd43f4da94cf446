"""Where to cut a detector: split points, and the torchvision families found from the class alone.

The core never imports torchvision. A model is recognised by the names of the classes in its MRO,
so user subclasses of torchvision detectors are recognised too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch import nn

from .errors import SplitPointError


@dataclass(frozen=True)
class SplitPoints:
    """Dotted module paths where LRDet cuts a detector.

    Attributes:
        backbone: the module whose output the bridge upsamples. It must take the image batch
            ``(N, C, H, W)`` as its first input and return a tensor, a list/tuple or a dict of tensors.
        neck: the module whose output is distilled (the FPN). The teacher stops right after it.

    Example:
        >>> SplitPoints(backbone="backbone.body", neck="backbone.fpn")
        SplitPoints(backbone='backbone.body', neck='backbone.fpn')
    """

    backbone: str
    neck: str


_TV_SPLIT = SplitPoints(backbone="backbone.body", neck="backbone.fpn")

#: torchvision detector families (matched by class name anywhere in the MRO) and their split points.
#: GeneralizedRCNN covers Faster R-CNN, Mask R-CNN and Keypoint R-CNN.
TORCHVISION_SPLIT_POINTS: Dict[str, SplitPoints] = {
    "RetinaNet": _TV_SPLIT,
    "FCOS": _TV_SPLIT,
    "GeneralizedRCNN": _TV_SPLIT,
}


def torchvision_family(model: nn.Module) -> Optional[str]:
    """The torchvision detector family of ``model`` ('RetinaNet', 'FCOS', 'GeneralizedRCNN') or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in TORCHVISION_SPLIT_POINTS and cls.__module__.startswith("torchvision."):
            return cls.__name__
    return None


def resolve_split_points(model: nn.Module, given: Optional[SplitPoints], role: str) -> SplitPoints:
    """The split points to use for ``model``: the given ones, else the torchvision family's."""
    if given is not None:
        if not isinstance(given, SplitPoints):
            raise SplitPointError(f"expected split points for the {role} as SplitPoints(backbone=..., neck=...), "
                                  f"but got {type(given).__name__}: {given!r}")
        return given
    family = torchvision_family(model)
    if family is None:
        raise SplitPointError(
            f"cannot find the split points of the {role} ({type(model).__name__}) automatically: only torchvision "
            f"{', '.join(TORCHVISION_SPLIT_POINTS)} detectors are recognised. Pass them, e.g. "
            f"split_points=SplitPoints(backbone='backbone.body', neck='backbone.fpn').")
    return TORCHVISION_SPLIT_POINTS[family]

"""The distillation loss of each teacher: one instance per teacher, held in one ``ModuleDict``.

Example:
    >>> losses = build_teacher_losses("mse", {}, ["t0", "t1"], family=None)
    >>> sorted(losses), losses["t0"] is losses["t1"], loss_key("mse")
    (['t0', 't1'], False, 'mse')
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from torch import Tensor, nn

from .context import DistillContext
from .errors import InputError
from .losses import build_loss

LossSpec = Union[str, nn.Module, Callable[..., Tensor]]

#: FGD's weights were tuned per detector family: the preset a torchvision student gets by default.
FGD_PRESET_OF = {"RetinaNet": "retinanet", "FCOS": "fcos", "GeneralizedRCNN": "rcnn"}


def loss_key(loss: Any) -> str:
    """The ``<name>`` of the ``distill/<name>`` key: the loss's name, or its class's or function's name in
    lower case (``"custom"`` where it has none)."""
    if isinstance(loss, str):
        return loss
    name = type(loss).__name__ if isinstance(loss, nn.Module) else getattr(loss, "__name__", "")
    return name.lower() if name.isidentifier() else "custom"


class FunctionLoss(nn.Module):
    """A plain callable loss, held in the same ``ModuleDict`` as the module losses."""

    def __init__(self, fn: Callable[..., Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, student: List[Tensor], teacher: List[Tensor], ctx: DistillContext) -> Tensor:
        return self.fn(student, teacher, ctx)


def build_teacher_losses(loss: LossSpec, kwargs: Dict[str, Any], names: Sequence[str],
                         family: Optional[str]) -> nn.ModuleDict:
    """One loss per teacher name: a named loss built for each, a module deep-copied for every teacher after
    the first, a plain callable shared (it holds no state) and wrapped.

    Args:
        loss: a canonical loss name, an ``nn.Module`` or a callable ``(student, teacher, ctx) -> Tensor``.
        kwargs: the named loss's constructor arguments.
        names: the teachers' names.
        family: the student's torchvision family (``"RetinaNet"`` ...), which picks FGD's default preset.
    """
    kwargs = dict(kwargs)
    if loss == "fgd" and "preset" not in kwargs and family in FGD_PRESET_OF:
        kwargs["preset"] = FGD_PRESET_OF[family]
    if kwargs and not isinstance(loss, str):
        raise InputError(f"loss_kwargs are for a loss given by name, but the loss is a {type(loss).__name__}")
    out = nn.ModuleDict()
    for i, n in enumerate(names):
        fn = build_loss(loss, **kwargs) if (isinstance(loss, str) or i == 0) else (
            copy.deepcopy(loss) if isinstance(loss, nn.Module) else loss)
        out[n] = fn if isinstance(fn, nn.Module) else FunctionLoss(fn)
    return out

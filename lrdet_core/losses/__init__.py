"""Feature-distillation losses: a plain function plus a thin ``nn.Module`` per loss.

One name per loss everywhere: the module ``losses/cwd.py`` defines the function ``cwd_loss`` and
the class ``CWDLoss``; its kernel module ``kernels/cwd.py`` defines ``cwd_loss_triton``; the name in
:data:`LOSSES`, the tests and the benchmark rows is ``"cwd"`` (likewise ``mse``, ``l1``; FGD's
kernel computes its focal and attention terms: ``fgd_focal_attention_triton``). No function is named
like its module, so ``lrdet_core.losses.cwd`` is the module.

Every loss module is called as ``loss(student, teacher, ctx)`` where ``student`` and ``teacher``
are equal-length lists of matched pyramid levels (``N x C x H x W`` each) and ``ctx`` is a
:class:`lrdet_core.DistillContext`. It returns a scalar tensor (fp32), summed over levels.

Common rules:

* Argument order is always ``(student, teacher)``. The teacher is a target: no gradient flows
  into it on any backend.
* Inputs may be fp16, bf16 or fp32 in any mix (e.g. a bf16 student and an fp32 teacher); the
  loss is computed and accumulated in fp32, also inside an autocast region. fp64 stays fp64.
* ``backend``: ``"torch"`` (eager), ``"compile"`` (``torch.compile`` of the eager per-level
  function), ``"triton"`` (the fused kernels of :mod:`lrdet_core.kernels`, imported on first
  use) or ``"auto"`` (Triton for CUDA tensors when triton is installed, else eager). FGD's
  GcBlock term always runs eagerly.
* Bad input raises :class:`lrdet_core.errors.LossError` naming what was expected and received.

Example:
    >>> import torch
    >>> loss = build_loss("mse")
    >>> s, t = [torch.ones(1, 2, 4, 4)], [torch.zeros(1, 2, 4, 4)]
    >>> RECOMMENDED_ALPHA["mse"] * loss(s, t)
    tensor(0.1600)
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Union

from torch import nn

from lrdet_core.errors import LossError
from lrdet_core.losses.cwd import CWDLoss, cwd_loss
from lrdet_core.losses.fgd import (FGD_PRESETS, FGDLoss, GcBlock, channel_attention, fgd_global, fgd_loss,
                                   fgd_masks, fgd_terms, spatial_attention)
from lrdet_core.losses.l1 import L1Loss, l1_loss
from lrdet_core.losses.mse import MSELoss, mse_loss

#: The loss classes by name; ``build_loss(name, **kwargs)`` instantiates one.
LOSSES: Dict[str, type] = {"mse": MSELoss, "l1": L1Loss, "cwd": CWDLoss, "fgd": FGDLoss}

#: The distiller weight ``alpha`` (on the loss's output) recommended for each named loss with its
#: default arguments: ``BridgeDistiller(..., alpha=None)`` takes it (the default is ``alpha="auto"``,
#: measured on the model at the first step).
#:
#: ``mse``: 0.005 with sum reduction, the paper's value (Eq. 1, Table 9). ``l1`` and ``cwd`` are
#: chosen so that ``alpha * loss`` matches ``0.005 * MSE_sum`` on a RetinaNet pyramid (P3-P7 of an
#: 800x1344 canvas, C=256, N=2) with unit-variance features whose difference has unit variance:
#: there ``0.005 * MSE_sum = 5.7e4``, ``L1_sum = 9.15e6`` (ratio 0.0063, ``E d^2 / E|d| = sqrt(pi/2)``)
#: and ``CWD = 2.47`` (ratio 2.3e4, stable across feature correlations since both grow like the
#: difference's variance). ``fgd``: 1.0, because the presets already carry the FGD authors'
#: absolute weights, tuned against the detection loss; at 1.0 FGD is about 1.5e3 times smaller
#: than ``0.005 * MSE_sum`` but above MSE-mean with alpha 1, which the paper's Table 9 finds as good.
#: MSE/L1 sums grow with the batch size N while CWD and FGD divide by N: the ratios hold for N=2.
#: Full numbers: ``docs/losses.md``.
RECOMMENDED_ALPHA: Dict[str, float] = {"mse": 0.005, "l1": 0.006, "cwd": 2e4, "fgd": 1.0}

LossSpec = Union[str, nn.Module, Callable]


def loss_name(name: str) -> str:
    """The canonical name of a named loss: ``" MSE "`` -> ``"mse"``. Everything keyed by a loss name
    (:data:`LOSSES`, :data:`RECOMMENDED_ALPHA`, FGD's presets, the ``distill/<loss>`` key) uses this form.

    Raises:
        LossError: for an unknown name (the message lists the valid names and the closest one).

    Example:
        >>> loss_name("FGD")
        'fgd'
    """
    key = name.strip().lower()
    if key not in LOSSES:
        close = difflib.get_close_matches(key, list(LOSSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LossError(f"unknown loss {name!r}; expected one of {', '.join(map(repr, LOSSES))}{hint}, "
                        f"an nn.Module or a callable (student, teacher, ctx) -> Tensor")
    return key


def build_loss(spec: LossSpec, **kwargs) -> Callable:
    """A distillation loss from a name in :data:`LOSSES`, an ``nn.Module`` or a callable.

    Args:
        spec: ``"mse"``, ``"l1"``, ``"cwd"``, ``"fgd"``; or an ``nn.Module`` / any callable
            ``(student, teacher, ctx) -> Tensor``, returned as is.
        **kwargs: arguments of the named loss's constructor (only with a name).

    Raises:
        LossError: for an unknown name (the message lists the valid names and the closest one),
            for keyword arguments given with an object, or for something that is not callable.

    Example:
        >>> build_loss("cwd", tau=2.0)
        CWDLoss(tau=2.0, weight=1.0, backend='auto')
        >>> build_loss("msee")
        Traceback (most recent call last):
        ...
        lrdet_core.errors.LossError: unknown loss 'msee'; expected one of 'mse', 'l1', 'cwd', 'fgd' (did you mean 'mse'?), an nn.Module or a callable (student, teacher, ctx) -> Tensor
    """
    if isinstance(spec, str):
        return LOSSES[loss_name(spec)](**kwargs)
    if callable(spec):
        if kwargs:
            raise LossError(f"keyword arguments {sorted(kwargs)} only apply to a loss given by name, "
                            f"but got a {type(spec).__name__}; configure the object before passing it")
        return spec
    raise LossError(f"expected a loss name ({', '.join(map(repr, LOSSES))}), an nn.Module or a callable "
                    f"(student, teacher, ctx) -> Tensor, but got {type(spec).__name__}")


__all__ = [
    "LOSSES", "RECOMMENDED_ALPHA", "FGD_PRESETS", "build_loss", "loss_name",
    "MSELoss", "L1Loss", "CWDLoss", "FGDLoss", "GcBlock",
    "mse_loss", "l1_loss", "cwd_loss", "fgd_loss", "fgd_terms", "fgd_global", "fgd_masks", "spatial_attention",
    "channel_attention",
]

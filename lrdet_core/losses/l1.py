"""Absolute error between student and teacher features (L1), an alternative of LRDet Table 8."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lrdet_core.losses._common import (Levels, check_backend, check_reduction, kernel_import, pointwise_level,
                                       pointwise_levels)


def _l1_eager(student: Tensor, teacher: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    # torch.abs has a zero (sub)gradient at 0, so identical features give a zero gradient.
    err = (student.to(dtype) - teacher.detach().to(dtype)).abs()
    if reduction == "none":
        return err
    return err.sum() if reduction == "sum" else err.mean()


def _l1_loss_kernel() -> Callable:
    # Imported here, on the first Triton call: the kernel module imports triton.
    with kernel_import():
        from lrdet_core.kernels.l1 import l1_loss_triton
    return l1_loss_triton


def l1_loss(student: Tensor, teacher: Tensor, reduction: str = "sum", backend: str = "auto") -> Tensor:
    r"""Absolute error of one pyramid level.

    .. math::
        \ell = \sum_{n,c,h,w} |S_{nchw} - T_{nchw}| \quad (\text{``sum''}), \qquad
        \ell / (NCHW) \quad (\text{``mean''})

    The gradient where :math:`S = T` is 0. Computed in fp32 for fp16/bf16/fp32 inputs in any
    mix (fp64 stays fp64).

    Args:
        student: student (bridge) features of one level.
        teacher: teacher features of the same level, same shape.
        reduction: ``"sum"`` (default), ``"mean"`` or ``"none"`` (the elementwise map).
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"``.

    Shape:
        - student, teacher: :math:`(N, C, H, W)`.
        - output: scalar, or :math:`(N, C, H, W)` for ``"none"``.

    Example:
        >>> s, t = torch.full((2, 3, 4, 5), -2.0), torch.zeros(2, 3, 4, 5)
        >>> l1_loss(s, t)
        tensor(240.)
        >>> l1_loss(s, t, reduction="mean")
        tensor(2.)

    Reference:
        "A simple framework for low-resolution detection with high-resolution knowledge"
        (LRDet), Appendix B, Table 8.
    """
    return pointwise_level(_l1_eager, _l1_loss_kernel, student, teacher, reduction, backend)


class L1Loss(nn.Module):
    r"""Absolute error summed over matched pyramid levels.

    ``forward`` returns :math:`\sum_{l} \text{l1\_loss}(S_l, T_l)` with the chosen per-level
    reduction. The recommended distiller weight is ``alpha = 0.006`` with ``reduction="sum"``
    (see :data:`lrdet_core.losses.RECOMMENDED_ALPHA` for the reasoning).

    Args:
        reduction: ``"sum"`` (default) or ``"mean"``.
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"``.

    Shape:
        - student, teacher: equal-length lists of :math:`(N, C_l, H_l, W_l)` tensors.
        - output: fp32 scalar.

    Example:
        >>> loss = L1Loss()
        >>> loss([torch.ones(1, 2, 3, 3)], [torch.zeros(1, 2, 3, 3)])
        tensor(18.)
    """

    def __init__(self, reduction: str = "sum", backend: str = "auto") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, ("sum", "mean"))
        self.backend = check_backend(backend)

    def forward(self, student: Levels, teacher: Levels, ctx: Optional[object] = None) -> Tensor:
        return pointwise_levels(_l1_eager, _l1_loss_kernel, student, teacher, self.reduction, self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"

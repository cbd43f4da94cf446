"""Mean squared error between student and teacher features: the loss of the LRDet paper."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lrdet_core.losses._common import (Levels, check_backend, check_reduction, kernel_import, pointwise_level,
                                       pointwise_levels)


def _mse_eager(student: Tensor, teacher: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    # The cast lives inside the function so torch.compile fuses it with the square.
    diff = student.to(dtype) - teacher.detach().to(dtype)
    sq = diff * diff
    if reduction == "none":
        return sq
    return sq.sum() if reduction == "sum" else sq.mean()


def _mse_loss_kernel() -> Callable:
    # Imported here, on the first Triton call: the kernel module imports triton.
    with kernel_import():
        from lrdet_core.kernels.mse import mse_loss_triton
    return mse_loss_triton


def mse_loss(student: Tensor, teacher: Tensor, reduction: str = "sum", backend: str = "auto") -> Tensor:
    r"""Squared error of one pyramid level.

    .. math::
        \ell = \sum_{n,c,h,w} (S_{nchw} - T_{nchw})^2 \quad (\text{``sum''}), \qquad
        \ell / (NCHW) \quad (\text{``mean''})

    Computed in fp32 for fp16/bf16/fp32 inputs in any mix (fp64 stays fp64).

    Args:
        student: student (bridge) features of one level.
        teacher: teacher features of the same level, same shape.
        reduction: ``"sum"`` (the paper's default), ``"mean"`` or ``"none"`` (the elementwise map).
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"`` (see the package docs).

    Shape:
        - student, teacher: :math:`(N, C, H, W)`.
        - output: scalar, or :math:`(N, C, H, W)` for ``"none"``.

    Example:
        >>> s, t = torch.ones(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)
        >>> mse_loss(s, t)
        tensor(120.)
        >>> mse_loss(s, t, reduction="mean")
        tensor(1.)

    Reference:
        "A simple framework for low-resolution detection with high-resolution knowledge"
        (LRDet), Eq. (1) and Appendix B, Table 9 (sum reduction, :math:`\alpha = 0.005`).
    """
    return pointwise_level(_mse_eager, _mse_loss_kernel, student, teacher, reduction, backend)


class MSELoss(nn.Module):
    r"""Squared error summed over matched pyramid levels (LRDet's :math:`L_{FD}`).

    ``forward`` returns :math:`\sum_{l} \text{mse\_loss}(S_l, T_l)` with the chosen per-level
    reduction (``"mean"`` averages each level, then sums the levels).
    The recommended distiller weight is ``alpha = 0.005`` with ``reduction="sum"`` (the paper).

    Args:
        reduction: ``"sum"`` (default) or ``"mean"``.
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"``.

    Shape:
        - student, teacher: equal-length lists of :math:`(N, C_l, H_l, W_l)` tensors.
        - output: fp32 scalar.

    Example:
        >>> loss = MSELoss()
        >>> loss([torch.ones(1, 2, 3, 3), torch.ones(1, 2, 2, 2)], [torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 2, 2)])
        tensor(26.)
    """

    def __init__(self, reduction: str = "sum", backend: str = "auto") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, ("sum", "mean"))
        self.backend = check_backend(backend)

    def forward(self, student: Levels, teacher: Levels, ctx: Optional[object] = None) -> Tensor:
        return pointwise_levels(_mse_eager, _mse_loss_kernel, student, teacher, self.reduction, self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"

"""Fused MSE distillation loss over all pyramid levels in one Triton launch per pass.

Math, per level ``l`` with student ``S_l`` and teacher ``T_l`` (any shape, equal)::

    L = sum_l  sum((S_l - T_l)^2)                  reduction="sum"
    L = sum_l  mean((S_l - T_l)^2)                 reduction="mean"
    dL/dS_l = 2 (S_l - T_l) * (1 or 1/numel(S_l))

Bytes moved (minimum, per element): forward **2** element accesses (read S and T, one fp32
partial per program), backward **3** (read S and T, write ``grad_output * dL/dS`` in the
student's dtype): **5** in all, whatever ``grad_output`` is. Nothing is stored between the
passes but references to S and T, so fp16 gradients under a GradScaler are rounded once, after
the scale is applied, as in eager PyTorch.

Mixed dtypes (e.g. a bf16 student and an fp32 teacher) are read as they are, each through its
own pointer type, and converted in registers: no copy.

Layouts: contiguous, channels_last or any dense layout with equal student/teacher strides is
walked over its flat storage without a copy; anything else is made ``.contiguous()`` first.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ._common import check_level_lists
from ._pointwise import PointwiseFunction, _pointwise_kernel, specialisations as _specialisations  # noqa: F401 (named in SPECIALISATIONS)

#: Every (kernel, signature, constexprs, num_warps) this module launches (see tests/test_kernels_compile.py).
SPECIALISATIONS = tuple(_specialisations(absolute=False))


def mse_loss_triton(student: Sequence[Tensor], teacher: Sequence[Tensor], reduction: str = "sum") -> Tensor:
    """MSE between matched levels, summed over levels, as a 0-d fp32 tensor.

    Args:
        student: the student's levels; they receive gradients.
        teacher: the teacher's levels, same shapes; treated as constants (no gradient).
        reduction: ``"sum"`` or ``"mean"`` per level (levels are always summed).

    Shape:
        student[i], teacher[i]: any equal shape, fp32/bf16/fp16 each (the gradient has the student's dtype).
        Output: ``()`` fp32.
    """
    check_level_lists("mse_loss_triton", student=student, teacher=teacher)
    return PointwiseFunction.apply(False, reduction, "mse_loss_triton", len(student), *student, *teacher)

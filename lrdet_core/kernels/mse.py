"""Fused MSE distillation loss over all pyramid levels in one Triton launch.

Math, per level ``l`` with student ``S_l`` and teacher ``T_l`` (any shape, equal)::

    L = sum_l  sum((S_l - T_l)^2)                  reduction="sum"
    L = sum_l  mean((S_l - T_l)^2)                 reduction="mean"
    dL/dS_l = 2 (S_l - T_l) * (1 or 1/numel(S_l))

Bytes moved (minimum, per element, forward + backward together): **3** element accesses --
read S, read T, write dL/dS in one pass. The backward pass only rescales that buffer by
``grad_output``; it reads ``grad_output`` on the device and skips the rescale when it is 1,
so a loss that is the last op stays at 3. With a weight applied after the loss
(``grad_output != 1``) the rescale adds 2 (read and write the buffer): 5.

Layouts: contiguous, channels_last or any dense layout with equal student/teacher strides is
walked over its flat storage without a copy; anything else is made ``.contiguous()`` first.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ._pointwise import PointwiseFunction, _pointwise_kernel, specialisations as _specialisations  # noqa: F401 (named in SPECIALISATIONS)

#: Every (kernel, signature, constexprs, num_warps) this module launches (see tests/test_kernels_compile.py).
SPECIALISATIONS = tuple(_specialisations(absolute=False))


def mse_triton(student: Sequence[Tensor], teacher: Sequence[Tensor], reduction: str = "sum") -> Tensor:
    """MSE between matched levels, summed over levels, as a 0-d fp32 tensor.

    Args:
        student: the student's levels; they receive gradients.
        teacher: the teacher's levels, same shapes; treated as constants (no gradient).
        reduction: ``"sum"`` or ``"mean"`` per level (levels are always summed).

    Shape:
        student[i], teacher[i]: any equal shape, fp32/bf16/fp16 (one dtype for all levels).
        Output: ``()`` fp32.
    """
    return PointwiseFunction.apply(False, reduction, "mse_triton", len(student), *student, *teacher)

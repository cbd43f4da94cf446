"""Channel-wise distillation (CWD): a KL divergence between per-channel spatial distributions."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lrdet_core.errors import LossError
from lrdet_core.losses._common import (Levels, acc_dtype, check_backend, check_levels, check_pair,
                                       check_positive, compiled, kernel_import, no_autocast,
                                       resolve_backend, triton_inputs)


def _cwd_eager(student: Tensor, teacher: Tensor, tau: float, dtype: torch.dtype) -> Tensor:
    n, c = student.shape[:2]
    # log_softmax on both sides: softmax-then-log underflows to log(0) = -inf for logits
    # around 1e2 apart and turns 0 * -inf into NaN; in log space every term stays finite.
    log_p_s = torch.log_softmax(student.to(dtype).flatten(2) / tau, dim=-1)
    log_p_t = torch.log_softmax(teacher.detach().to(dtype).flatten(2) / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * (tau * tau / (n * c))


def _cwd_loss_kernel() -> Callable:
    # Imported here, on the first Triton call: the kernel module imports triton.
    with kernel_import():
        from lrdet_core.kernels.cwd import cwd_loss_triton
    return cwd_loss_triton


def cwd_loss(student: Tensor, teacher: Tensor, tau: float = 1.0, backend: str = "auto") -> Tensor:
    r"""Channel-wise distillation loss of one pyramid level, without the loss weight.

    Each channel's activation map is turned into a distribution over the :math:`HW` cells
    and the student's is pulled towards the teacher's:

    .. math::
        \ell = \frac{\tau^2}{N C} \sum_{n,c}
        \mathrm{KL}\big(\mathrm{softmax}_{hw}(T_{nc}/\tau) \,\|\, \mathrm{softmax}_{hw}(S_{nc}/\tau)\big)

    Evaluated in log space, so it stays finite for logits of any size (e.g. :math:`\pm 10^4`).

    Args:
        student: student (bridge) features of one level.
        teacher: teacher features of the same level, same shape.
        tau: softmax temperature, > 0.
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"``.

    Shape:
        - student, teacher: :math:`(N, C, H, W)`.
        - output: scalar.

    Example:
        >>> t = torch.zeros(1, 1, 1, 2)
        >>> s = torch.tensor([[[[0.0, 2.0]]]])
        >>> cwd_loss(s, t)  # KL((1/2, 1/2) || softmax(0, 2))
        tensor(0.4338)
        >>> cwd_loss(t, t)
        tensor(0.)

    Reference:
        Shu et al., "Channel-wise knowledge distillation for dense prediction", ICCV 2021.
    """
    check_pair(student, teacher)
    tau = check_positive("tau", tau)
    backend = resolve_backend(backend, student)
    if backend == "triton":
        s, t = triton_inputs(student, teacher)
        return _cwd_loss_kernel()([s], [t], tau)
    dtype = acc_dtype(student, teacher)
    with no_autocast(student):
        if backend == "torch":
            return _cwd_eager(student, teacher, tau, dtype)
        # Upcast before the compiled graph, not inside it: with the dynamic shapes a pyramid needs,
        # inductor's CPU code for bf16 inputs ran 2.3x slower than for fp32 (one 2x256x75x125 level,
        # fwd+bwd: 33 ms vs 15 ms); the eager cast costs ~4 ms of that back.
        return compiled(_cwd_eager)(student.to(dtype), teacher.to(dtype), tau, dtype)


class CWDLoss(nn.Module):
    r"""Channel-wise distillation summed over matched pyramid levels, times ``weight``.

    ``forward`` returns :math:`w \sum_l \text{cwd\_loss}(S_l, T_l, \tau)`. The recommended distiller
    weight is in :data:`lrdet_core.losses.RECOMMENDED_ALPHA` (with ``weight=1``, ``tau=1``).

    Args:
        tau: softmax temperature, > 0 (default 1).
        weight: a constant factor on the summed loss (default 1).
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"``.

    Shape:
        - student, teacher: equal-length lists of :math:`(N, C_l, H_l, W_l)` tensors.
        - output: fp32 scalar.

    Example:
        >>> loss = CWDLoss(tau=1.0, weight=2.0)
        >>> loss([torch.tensor([[[[0.0, 2.0]]]])], [torch.zeros(1, 1, 1, 2)])
        tensor(0.8676)

    Reference:
        Shu et al., "Channel-wise knowledge distillation for dense prediction", ICCV 2021.
    """

    def __init__(self, tau: float = 1.0, weight: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)
        if not isinstance(weight, (int, float)) or weight != weight:
            raise LossError(f"expected weight to be a number, but got {weight!r}")
        self.weight = float(weight)
        self.backend = check_backend(backend)

    def forward(self, student: Levels, teacher: Levels, ctx: Optional[object] = None) -> Tensor:
        s_list, t_list = check_levels(student, teacher)
        backend = resolve_backend(self.backend, s_list[0])
        if backend == "triton":
            pairs = [triton_inputs(s, t) for s, t in zip(s_list, t_list)]
            total = _cwd_loss_kernel()([p[0] for p in pairs], [p[1] for p in pairs], self.tau)
        else:
            total = cwd_loss(s_list[0], t_list[0], self.tau, backend)
            for s, t in zip(s_list[1:], t_list[1:]):
                total = total + cwd_loss(s, t, self.tau, backend)
        return total * self.weight

    def extra_repr(self) -> str:
        return f"tau={self.tau}, weight={self.weight}, backend={self.backend!r}"

"""``alpha="auto"``: the distillation weight that puts ``alpha * L_FD`` at a set fraction of ``L_det(LR)``.

Summed feature losses scale with the model's feature size and magnitude, so one fixed ``alpha`` can be
10^4 times off for another model. ``alpha="auto"`` measures both terms at the first training step and
fixes ``alpha_t = ratio * L_det(LR) / L_FD_t`` for each teacher ``t``. Under ``torch.distributed`` the
measured terms are averaged over the ranks first, so every rank uses the same ``alpha``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def mean_over_ranks(values: Tensor) -> Tuple[Tensor, int]:
    """``values`` averaged over the ranks of the default process group (as is without one), and the count.

    Every rank must call this at the same step (it is a collective).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return values, 1
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    return out / world, world


def auto_alphas(det: Tensor, distill: Sequence[Tensor], ratio: float) -> Tuple[List[Optional[float]], List[float]]:
    """``alpha_t = ratio * L_det / L_FD_t`` from the rank-averaged terms, and those averaged terms.

    Args:
        det: the LR detection loss ``L_det(LR)`` of this rank (a scalar, detached).
        distill: the unweighted distillation terms ``L_FD_t``, one per teacher (scalars, detached).
        ratio: the target ``alpha * L_FD / L_det``.

    Returns:
        One ``alpha`` per teacher, ``None`` where a term is not finite and positive (it cannot be
        balanced at this step), and the averaged ``[L_det, L_FD_0, ...]`` as floats.

    Example:
        >>> import torch
        >>> auto_alphas(torch.tensor(2.0), [torch.tensor(8.0), torch.tensor(0.0)], 0.5)
        ([0.125, None], [2.0, 8.0, 0.0])
    """
    terms = torch.stack([det.detach().double()] + [d.detach().double() for d in distill])
    terms, _ = mean_over_ranks(terms)
    vals = terms.tolist()
    ok = lambda v: v == v and 0 < v < float("inf")  # noqa: E731 - finite and positive
    return [ratio * vals[0] / v if ok(vals[0]) and ok(v) else None for v in vals[1:]], vals

"""``alpha="auto"`` (the default): the distillation weight that puts ``alpha * L_FD`` at a set fraction of
``L_det(LR)``; and the first-step balance check of ``alpha=None`` (the loss's recommended value).

Summed feature losses scale with the model's feature size and magnitude, so one fixed ``alpha`` can be
10^4 times off for another model. ``alpha="auto"`` measures both terms at the first training step and
fixes ``alpha_t = ratio * L_det(LR) / L_FD_t`` for each teacher ``t``. Under ``torch.distributed`` the
measured terms are averaged over the ranks first, so every rank uses the same ``alpha``.

A number the user passes is used as given and never checked. ``alpha=None`` takes the recommended value
of the loss (:data:`lrdet_core.losses.RECOMMENDED_ALPHA`, e.g. the paper's 0.005 for summed MSE), which
nobody measured on this model: the first step warns when it is far off (:func:`check_balance`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .warn import warn_user


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


#: At the first step with ``alpha=None`` (the recommended value), warn when ``alpha * L_FD / L_det(LR)`` is above
#: this or below its inverse.
BALANCE_WARN = 100.0


def report_auto_alpha(keys: Sequence[str], alphas: Sequence[float], terms: Sequence[float], ratio: float) -> None:
    """The warning that says which ``alpha`` ``alpha="auto"`` measured for each term (and which it could not)."""
    world = torch.distributed.get_world_size() if (
        torch.distributed.is_available() and torch.distributed.is_initialized()) else 1
    over = f", averaged over {world} ranks" if world > 1 else ""
    done = [f"alpha={a:.6g} for {k} (L_FD = {t:.6g})" for k, a, t in zip(keys, alphas, terms[1:]) if not math.isnan(a)]
    todo = [f"{k} (L_FD = {t:.6g})" for k, a, t in zip(keys, alphas, terms[1:]) if math.isnan(a)]
    msg = (f"LRDet: alpha='auto' at the first step (L_det(LR) = {terms[0]:.6g}{over}, alpha_ratio = "
           f"{ratio:g}): {'; '.join(done) or 'nothing set'}")
    if todo:
        msg += (f". Not set, the terms are not finite and positive: {', '.join(todo)}; these are weighted by 0 "
                f"at this step and measured again at the next")
    warn_user(msg)


@torch.no_grad()
def check_balance(out: Mapping[str, Tensor], alpha: float) -> None:
    """Warn once, at the first step, when ``alpha * L_FD`` dwarfs or vanishes against ``L_det(LR)``.

    Run for ``alpha=None`` only (the loss's recommended value). Summed MSE grows with the number of feature
    elements and their scale, so the paper's ``alpha = 0.005`` (ResNet-50 FPN on COCO) can be 10^4 times too
    large for another model.
    """
    det = sum(v.detach().item() for k, v in out.items() if k.startswith("lr/"))
    for k, v in out.items():
        if not k.startswith("distill") or det <= 0:
            continue
        v = v.detach().item()
        ratio = v / det
        if ratio > BALANCE_WARN or 0 < ratio < 1 / BALANCE_WARN:
            warn_user(f"LRDet: at the first step {k} = {v:.4g} is {ratio:.3g} times the LR detection "
                      f"loss ({det:.4g}) with alpha={alpha:g}. alpha={alpha / ratio:.3g} would make "
                      f"them equal; a distillation term within ~0.1-10x of the detection loss is the usual "
                      f"regime. Set a numeric alpha to silence this, or alpha='auto' (the default) to measure "
                      f"it at the first step.")


def step_alphas(auto_alpha: Tensor, out: Mapping[str, Tensor], distill: Mapping[str, Tensor], ratio: float,
                keys: Sequence[str], measure: bool) -> List[float]:
    """``alpha="auto"``: each teacher's weight at this step, measured into the buffer ``auto_alpha`` (NaN where
    not yet measured) when ``measure`` is set; a term still unmeasured is weighted by 0.

    The buffer is read every time (no cached copy): loading a checkpoint or DDP's buffer broadcast may change it.
    """
    alphas = auto_alpha.tolist()
    if any(math.isnan(a) for a in alphas) and measure:
        det = sum((v.detach() for k, v in out.items() if k.startswith("lr/")), torch.zeros(()))
        new, terms = auto_alphas(det, list(distill.values()), ratio)
        for i, a in enumerate(new):
            if math.isnan(alphas[i]) and a is not None:
                auto_alpha[i] = a
        alphas = auto_alpha.tolist()
        report_auto_alpha(keys, alphas, terms, ratio)
    return [0.0 if math.isnan(a) else a for a in alphas]


def auto_alpha_from_state_dict(state_dict: Dict[str, Any], key: str, alpha: Any, buffer: Optional[Tensor]) -> None:
    """Loading a checkpoint: one without ``auto_alpha`` into an ``alpha="auto"`` distiller measures at the next
    step; one with it into a numeric-alpha distiller keeps the numeric alpha. Both with a warning: the
    weight of the distillation term changes from the one the checkpoint was trained with."""
    if alpha == "auto" and key not in state_dict:
        warn_user("LRDet: the checkpoint holds no alpha='auto' values (it was saved by a distiller with a "
                  "numeric alpha, or an alpha=None one), so alpha is measured again at the next training step; "
                  "build the distiller with the alpha the checkpoint was trained with to resume with it")
        state_dict[key] = torch.full_like(buffer, math.nan)
    elif alpha != "auto" and key in state_dict:
        warn_user(f"LRDet: the checkpoint holds alpha='auto' values {state_dict[key].tolist()}, but this "
                  f"distiller has alpha={alpha:g}, which is used; build it with alpha='auto' to "
                  f"resume with the measured values")
        del state_dict[key]

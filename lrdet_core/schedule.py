"""``distill_every=k``: the teacher and the bridge run on every k-th training step only.

A step is one training-mode call of the distiller (``distiller(images, targets)``): with gradient accumulation
every micro-batch is a step. Step ``c`` (counted from 0) distils when ``c % k == 0``, so the first step always
does; the others are plain LR steps, the student's own forward and loss, at the cost of LR training.

Why every k-th step and not each step with probability ``1/k`` (reweighted by ``k``):

* every rank of a ``DistributedDataParallel`` job makes the same choice from its own counter, with no
  communication and no shared random stream (ranks that disagreed would hang in the all-reduce);
* the counter is one integer in ``state_dict()``: a resumed run continues the schedule exactly;
* exactly one step in k distils, with no variance from the schedule itself.

The distilling steps are not reweighted: over time the HR terms weigh ``1/k`` of LRDet's. Scale ``alpha`` and
``hr_det_weight`` by k for the same expected objective (at k times the gradient on the distilling steps).

A skipped step returns the same keys as a distilling one (loggers such as Ultralytics' progress bar and its
``results.csv`` expect a fixed set): the bridge and distillation terms are zeros. The bridge's keys are the LR
pass's under the ``bridge/`` prefix (the bridge runs the same model). The distillation-only parameters
(projectors, FGD's GcBlocks) enter the zero with weight 0, so under ``DistributedDataParallel`` without
``find_unused_parameters`` every parameter still gets a (zero) gradient.

Example:
    >>> s = DistillSchedule(3)
    >>> [s.tick() for _ in range(7)], int(s.step)
    ([True, False, False, True, False, False, True], 7)
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import InputError


def check_every(distill_every: Any) -> int:
    """``distill_every`` as a positive int, or a clear error."""
    if isinstance(distill_every, bool) or not isinstance(distill_every, int) or distill_every < 1:
        raise InputError(f"expected distill_every to be a positive int (1: distil at every step), "
                         f"but got {distill_every!r}")
    return distill_every


class DistillSchedule(nn.Module):
    """The step counter of ``distill_every``: buffer ``step``, in ``state_dict()`` when ``every > 1``.

    Args:
        every: distil on every ``every``-th step (1: every step; nothing is counted or saved).
    """

    def __init__(self, every: int = 1):
        super().__init__()
        self.every = check_every(every)
        # A Python mirror of the buffer: reading a CUDA buffer at every step would synchronise the device.
        self._count = 0
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=self.every > 1)

    def tick(self) -> bool:
        """Whether this step distils; advances the counter (a no-op with ``every == 1``)."""
        if self.every == 1:
            return True
        now = self._count
        self._count += 1
        self.step.fill_(self._count)
        return now % self.every == 0

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str]) -> None:
        # A checkpoint from before the schedule existed (or from a run with distill_every=1) has no counter:
        # the schedule restarts at a distilling step. A counter in the checkpoint of a distiller with
        # every == 1 is ignored: nothing is scheduled.
        value = state_dict.get(prefix + "step")
        if self.every == 1:
            return
        if value is None:
            self._count = 0
        elif not (isinstance(value, Tensor) and value.numel() == 1):
            error_msgs.append(f"expected {prefix}step to be a one-element tensor (the distill_every counter), "
                              f"but got {value!r}")
            return
        else:
            self._count = int(value)
        self.step.fill_(self._count)

    def extra_repr(self) -> str:
        return f"every={self.every}"


def skipped_step(lr_losses: Mapping[str, Tensor], teachers: Sequence[Tuple[Optional[str], str]],
                 distill_params: Iterable[Tensor]) -> Dict[str, Tensor]:
    """The loss dict of a step that does not distil, with the keys of a distilling step in their order: the LR
    terms, then per teacher its bridge terms (zeros named after the LR terms) and its distillation term (zero).

    Args:
        lr_losses: the student's own losses on the LR batch.
        teachers: per teacher, the prefix of its bridge keys (``"bridge"``, ``"bridge.t1"``; ``None`` without a
            bridge) and its distillation key (``"distill/mse"``).
        distill_params: the distillation-only parameters. The first distillation term is
            ``0 * sum(p.sum())`` over them, so that they take part in the graph and get zero gradients.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> out = skipped_step({"cls": torch.tensor(1.0)}, [("bridge", "distill/mse")], [w])
        >>> list(out), float(sum(out.values()))
        (['lr/cls', 'bridge/cls', 'distill/mse'], 1.0)
        >>> sum(out.values()).backward(); w.grad.tolist()
        [0.0, 0.0]
    """
    out = {f"lr/{k}": v for k, v in lr_losses.items()}
    like = next(iter(lr_losses.values()))
    params = [p for p in distill_params if p.requires_grad]
    for i, (prefix, dkey) in enumerate(teachers):
        if prefix is not None:
            out.update({f"{prefix}/{k}": like.new_zeros(()) for k in lr_losses})
        out[dkey] = sum((p.sum() * 0 for p in params), like.new_zeros(())) if i == 0 and params else \
            like.new_zeros(())
    return out

"""Weight inheriting (Section 3.2): start the LR student from the HR teacher where layers match."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Tuple

import torch
from torch import nn

from .warn import warn_user

#: Warn when the copied tensors hold less than this share of the student's parameter values.
MIN_COPIED_SHARE = 0.5


class ModuleCounts(NamedTuple):
    """How many of one top-level module's tensors were copied, skipped for their shape, or not in the teacher."""

    copied: int
    shape_mismatch: int
    missing_in_teacher: int


@dataclass
class InheritReport:
    """What :func:`inherit_weights` did.

    Attributes:
        copied: names of the student tensors (parameters and buffers) overwritten with the teacher's.
        shape_mismatch: ``(name, student_shape, teacher_shape)`` for names present in both with other shapes;
            these keep the student's initialisation.
        missing_in_teacher: student tensors the teacher does not have (kept as initialised).
        copied_share: the share of the student's parameter values (elements, buffers not counted) copied.
        suspicious_bn: BatchNorm layers whose statistics were copied while the convolution feeding them was
            skipped for its shape: statistics of another layer's outputs.
    """

    copied: List[str] = field(default_factory=list)
    shape_mismatch: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    missing_in_teacher: List[str] = field(default_factory=list)
    copied_share: float = 0.0
    suspicious_bn: List[str] = field(default_factory=list)

    def by_module(self) -> Dict[str, ModuleCounts]:
        """Counts per top-level module (the first part of the name), in the student's order.

        Example:
            >>> r = InheritReport(copied=["backbone.w", "backbone.b"], shape_mismatch=[("head.w", (2,), (3,))])
            >>> r.by_module()["head"]
            ModuleCounts(copied=0, shape_mismatch=1, missing_in_teacher=0)
        """
        counts: Dict[str, List[int]] = {}
        groups = (self.copied, [m[0] for m in self.shape_mismatch], self.missing_in_teacher)
        for i, names in enumerate(groups):
            for name in names:
                counts.setdefault(name.split(".")[0], [0, 0, 0])[i] += 1
        return {k: ModuleCounts(*v) for k, v in counts.items()}

    def __str__(self) -> str:
        per = "; ".join(f"{k}: {c.copied} copied, {c.shape_mismatch} other shape, {c.missing_in_teacher} not in teacher"
                        for k, c in self.by_module().items())
        return (f"inherited {len(self.copied)} tensors ({self.copied_share:.0%} of the student's parameter values); "
                f"skipped {len(self.shape_mismatch)} with other shapes and {len(self.missing_in_teacher)} the teacher "
                f"lacks" + (f" [{per}]" if per else ""))


@torch.no_grad()
def inherit_weights(student: nn.Module, teacher: nn.Module) -> InheritReport:
    """Copy every teacher tensor (parameters and buffers) whose name and shape match into ``student``.

    Heterogeneous pairs (say a Faster R-CNN teacher for a RetinaNet student) simply copy less; the
    report says what, per module (:meth:`InheritReport.by_module`). Copies keep the student's dtype and
    device. Warns when the pair looks mismatched: under half of the student's parameter values copied,
    or BatchNorm statistics copied onto the output of a convolution that was not (another layer's
    statistics, which shift every activation after it).

    Example:
        >>> from torch import nn
        >>> s, t = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
        >>> report = inherit_weights(s, t)
        >>> report.copied, [m[0] for m in report.shape_mismatch]
        (['0.weight', '0.bias'], ['1.weight', '1.bias'])
    """
    report = InheritReport()
    t_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        src = t_state.get(name)
        if src is None:
            report.missing_in_teacher.append(name)
        elif src.shape != tensor.shape:
            report.shape_mismatch.append((name, tuple(tensor.shape), tuple(src.shape)))
        else:
            tensor.copy_(src)  # state_dict tensors share storage with the module's
            report.copied.append(name)
    copied = set(report.copied)
    total = sum(p.numel() for p in student.parameters())
    report.copied_share = sum(p.numel() for n, p in student.named_parameters() if n in copied) / max(total, 1)
    report.suspicious_bn = _bn_after_skipped_conv(student, copied, {m[0] for m in report.shape_mismatch})
    if report.copied_share < MIN_COPIED_SHARE:
        warn_user(f"LRDet: inherit copied {report.copied_share:.0%} of the student's parameter values from the "
                  f"teacher (expected most of them for a student of the teacher's architecture); the pair looks "
                  f"mismatched. Per module: {report}")
    if report.suspicious_bn:
        warn_user(f"LRDet: inherit copied the BatchNorm statistics of {report.suspicious_bn} but not the "
                  f"convolution before each (other shape), so they describe another layer's outputs; consider "
                  f"inherit=False or resetting those layers (module.reset_running_stats())")
    return report


def _bn_after_skipped_conv(model: nn.Module, copied: set, mismatched: set) -> List[str]:
    """BatchNorm-like layers (with running statistics, FrozenBatchNorm2d included) whose statistics were
    copied while the convolution registered just before them was skipped for its shape."""
    out, last_conv = [], None
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.modules.conv._ConvNd):
            last_conv = prefix
        elif "running_mean" in m._buffers and last_conv is not None:
            if f"{prefix}running_mean" in copied and f"{last_conv}weight" in mismatched:
                out.append(name)
    return out

"""Weight inheriting (Section 3.2): start the LR student from the HR teacher where layers match."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from torch import nn


@dataclass
class InheritReport:
    """What :func:`inherit_weights` did.

    Attributes:
        copied: names of the student tensors overwritten with the teacher's.
        shape_mismatch: ``(name, student_shape, teacher_shape)`` for names present in both.
        missing_in_teacher: student tensors the teacher does not have (kept as initialised).
    """

    copied: List[str] = field(default_factory=list)
    shape_mismatch: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    missing_in_teacher: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"inherited {len(self.copied)} tensors; skipped {len(self.shape_mismatch)} with other shapes "
                f"and {len(self.missing_in_teacher)} the teacher lacks")


@torch.no_grad()
def inherit_weights(student: nn.Module, teacher: nn.Module) -> InheritReport:
    """Copy every teacher tensor (parameters and buffers) whose name and shape match into ``student``.

    Heterogeneous pairs (say a Faster R-CNN teacher for a RetinaNet student) simply copy less; the
    report says what. Copies keep the student's dtype and device.

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
    return report

"""1x1 convolutions that map a student level's channels onto its teacher level's, where the two differ.

They are created once the channel counts are known: at construction for families with a probe
(torchvision), at :meth:`BridgeDistiller.materialize` or the first step otherwise, or when a checkpoint
that holds them is loaded.

Example:
    >>> import torch
    >>> from lrdet_core.levels import LevelPair
    >>> p = Projectors()
    >>> pair = LevelPair(8, "0", "p3", torch.zeros(1, 4, 2, 2), torch.zeros(1, 8, 2, 2), "s8")
    >>> p.ensure("teacher", [pair], like=torch.zeros(1)), list(p), p.project("teacher", [pair])[0].shape[1]
    (True, ['teacher_s8'], 8)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError
from .levels import LevelPair
from .warn import warn_user


class Projectors(nn.ModuleDict):
    """The projectors by name ``"<teacher>_<pair name>"`` (e.g. ``"teacher_s8"``)."""

    @staticmethod
    def key(tname: str, pair: LevelPair) -> str:
        return f"{tname}_{pair.name}"

    def ensure(self, tname: str, pairs: Sequence[LevelPair], like: Optional[Tensor]) -> bool:
        """Create the missing projectors of ``tname``'s pairs; whether any was created.

        Args:
            like: a parameter of the student: the projectors take its device and dtype (not the features':
                under autocast those are bf16/fp16, and the optimizer must hold fp32 master weights).
        """
        created = False
        for p in pairs:
            k = self.key(tname, p)
            if p.student.shape[1] != p.teacher.shape[1] and k not in self:
                w = p.student if like is None else like
                self[k] = nn.Conv2d(p.student.shape[1], p.teacher.shape[1], 1).to(
                    device=p.student.device, dtype=w.dtype if w.is_floating_point() else torch.float32)
                created = True
        return created

    def project(self, tname: str, pairs: Sequence[LevelPair]) -> List[Tensor]:
        """The student side of each pair in the teacher's channels."""
        return [self[self.key(tname, p)](p.student) if p.student.shape[1] != p.teacher.shape[1] else p.student
                for p in pairs]

    def from_state_dict(self, state_dict: Dict[str, Any], prefix: str, like: Optional[Tensor]) -> None:
        """Create the projectors a checkpoint holds (``prefix`` + name + ``.weight``) and this one lacks.

        A custom model's projectors are created at its first step; a checkpoint loaded into a fresh distiller
        before that step must find them. Their shapes are in the checkpoint.
        """
        for key, w in state_dict.items():
            name = key[len(prefix):-len(".weight")]
            if key.startswith(prefix) and key.endswith(".weight") and "." not in name and name not in self:
                p = w if like is None else like
                self[name] = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=f"{prefix}{name}.bias" in state_dict
                                       ).to(device=p.device, dtype=p.dtype)


def check_late_creation(created: bool) -> None:
    """Distillation parameters created at a training step: an error under ``torch.distributed``, where
    DistributedDataParallel would never average their gradients (the ranks drift apart silently), else a
    warning that the optimizer may not hold them."""
    if not created:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise InputError("distillation parameters (projectors or loss parameters) were created at the first "
                         "training step, after a process group was initialised; call "
                         "distiller.materialize(images, targets) before building the optimizer and wrapping "
                         "the distiller in DistributedDataParallel")
    warn_user("LRDet: distillation parameters (projectors or loss parameters) were created at the first "
              "training step. Call distiller.materialize(images, targets) before building the "
              "optimizer, or add them with optimizer.add_param_group({'params': "
              "distiller.projectors.parameters()}) and the loss's parameters")

"""The modules Ultralytics' trainer handles under LRDet: what it trains, what its EMA averages, what it validates.

* :class:`LRDetModel`: the model the trainer trains (and DDP wraps): a :class:`~lrdet_core.BridgeDistiller` around
  the student, which looks like the student to the trainer (``stride``, ``names``, ``criterion``, ...). Called with a
  batch dict that carries the HR view (``batch["hr_img"]``), it returns Ultralytics' ``(loss vector, loss items)``.
* :class:`StudentEMA`: Ultralytics' ``ModelEMA`` over the student alone: no teacher, no projectors, each tensor once,
  so that ``last.pt``/``best.pt`` hold a plain ``DetectionModel``.
* :class:`ValidationView`: the EMA student as the validator sees it during training, its losses named as the
  training terms (``lr/box``, ...), so that the validator's loss dict and the trainer's agree.

Ultralytics is AGPL-3.0 licensed; only :mod:`lrdet_core.integrations` and :mod:`lrdet_core.adapters.ultralytics`
import it.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from ultralytics.utils.torch_utils import ModelEMA, unwrap_model

from ..distiller import BridgeDistiller
from ..errors import InputError

#: Attributes the trainer writes on the model it trains; they belong to the student.
_STUDENT_ATTRS = frozenset({"criterion", "class_weights", "names", "nc", "args", "end2end"})


def loss_name(name: Any) -> str:
    """A criterion's loss name as LRDet's keys spell it: ``"box_loss"`` -> ``"box"`` (``lr/box``, ``bridge/box``)."""
    return str(name).replace("_loss", "")


def student_of(model: nn.Module) -> nn.Module:
    """The student inside an :class:`LRDetModel` (also DDP-wrapped); any other model as it is."""
    model = unwrap_model(model)
    return model.student if isinstance(model, LRDetModel) else model


class LRDetModel(nn.Module):
    """A :class:`~lrdet_core.BridgeDistiller` as Ultralytics' trainer trains a ``DetectionModel``.

    Its parameters are the distiller's (the student's, then the projectors' and loss parameters'), each once; the
    frozen teacher stays outside. Attributes the trainer reads or writes on its model (``stride``, ``names``,
    ``criterion``, ``class_weights``, ``set_head_attr``, ...) are the student's.

    Args:
        distiller: the distiller around the student (a YOLO ``DetectionModel``) and the teacher.

    Shape:
        - Training call: a YOLO batch dict with ``img`` (N, 3, h, w) in [0, 1] (the LR view), ``hr_img``
          (N, 3, H, W) (the HR view of the same images), ``batch_idx``, ``cls``, ``bboxes`` (normalised xywh, the
          same for both views).
        - Returns ``(loss, items)``: ``loss`` (T,) the LRDet terms, whose sum is backpropagated; ``items`` the same
          terms detached and divided by N, as Ultralytics shows its own (``{"lr/box": ..., "distill/mse": ...}``).
    """

    def __init__(self, distiller: BridgeDistiller):
        super().__init__()
        self.distiller = distiller

    @property
    def student(self) -> nn.Module:
        """The student ``DetectionModel``."""
        return self.distiller.student

    @property
    def criterion(self) -> Any:
        """The student's criterion (``None`` before its first loss), whose schedules the trainer steps."""
        return getattr(self.distiller.student, "criterion", None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if name.startswith("__") or "distiller" not in modules:
                raise
            return getattr(modules["distiller"].student, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _STUDENT_ATTRS and "distiller" in self.__dict__.get("_modules", {}):
            setattr(self.distiller.student, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """A batch dict: the LRDet losses (:meth:`loss`); an image tensor: the student's predictions."""
        if isinstance(x, Mapping):
            return self.loss(x, *args, **kwargs)
        return self.student(x, *args, **kwargs)

    def loss(self, batch: Mapping[str, Any], preds: Any = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """One LRDet step on a preprocessed batch (see the class's Shape)."""
        if preds is not None or not self.training:  # a validation call: the student alone, at LR
            return ValidationView(self.student).loss(batch, preds)
        if batch.get("hr_img") is None:
            raise InputError(f"expected the training batch to carry its HR view as 'hr_img' (LRDetTrainer's "
                             f"preprocess_batch makes it), but the batch has keys {sorted(map(str, batch))}")
        labels = {k: batch[k] for k in ("batch_idx", "cls", "bboxes")}
        out = self.distiller({"img": batch["img"], **labels}, hr_images={"img": batch["hr_img"], **labels})
        n = batch["img"].shape[0]
        vec = torch.stack([v.float().reshape(()) for v in out.values()])
        return vec, {k: v.detach().float() / n for k, v in out.items()}


class ValidationView(nn.Module):
    """The student as the validator sees it while training: its own predictions, its own losses named as the LR
    training terms (``box_loss`` -> ``lr/box``); everything else is the student's.

    Args:
        student: a YOLO ``DetectionModel`` (the trainer's EMA of the student).
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if name.startswith("__") or "student" not in modules:
                raise
            return getattr(modules["student"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _STUDENT_ATTRS and "student" in self.__dict__.get("_modules", {}):
            setattr(self.student, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.student(x, *args, **kwargs)

    def loss(self, batch: Mapping[str, Any], preds: Any = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        vec, items = self.student.loss(batch, preds)
        return vec, {f"lr/{loss_name(k)}": v for k, v in items.items()}


class StudentEMA(ModelEMA):
    """Ultralytics' ``ModelEMA`` of the student alone (``ema.ema`` is a plain ``DetectionModel``).

    The trainer hands it the model it trains (an :class:`LRDetModel`, DDP-wrapped or not); it averages the student's
    tensors only, each once: not the teacher (outside the model anyway), not LRDet's projectors or loss parameters,
    which are training-only and not part of the deployed detector.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: int = 2000, updates: int = 0):
        super().__init__(student_of(model), decay=decay, tau=tau, updates=updates)

    def update(self, model: nn.Module) -> None:
        super().update(student_of(model))

    def update_attr(self, model: nn.Module, include: tuple = (), exclude: tuple = ("process_group", "reducer")
                    ) -> None:
        super().update_attr(student_of(model), include=include, exclude=exclude)


def lrdet_state(model: nn.Module) -> Dict[str, Tensor]:
    """LRDet's own training state in an :class:`LRDetModel` (projectors, loss parameters, the auto alpha, schedule
    counters): the distiller's ``state_dict`` without the student, as CPU tensors."""
    return {k: v.detach().cpu() for k, v in unwrap_model(model).distiller.state_dict().items()
            if not k.startswith("student.")}


def load_lrdet_state(model: nn.Module, state: Optional[Mapping[str, Tensor]]) -> None:
    """Put :func:`lrdet_state`'s tensors back into ``model``'s distiller; the student is left as it is.

    Raises:
        InputError: when ``state`` does not fit the distiller (another loss, teacher or options).
    """
    missing, unexpected = unwrap_model(model).distiller.load_state_dict(dict(state or {}), strict=False)
    missing = [k for k in missing if not k.startswith("student.")]
    if missing or unexpected:
        raise InputError(f"expected the checkpoint's LRDet state to fit this trainer's distiller (the same loss, "
                         f"teacher and options as the run it resumes), but it lacks {missing} and has "
                         f"{list(unexpected)} too many")

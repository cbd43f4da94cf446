"""LRDet from Ultralytics' own ``model.train()``: a ``DetectionTrainer`` that trains the student with LRDet.

.. code-block:: python

    from ultralytics import YOLO
    from lrdet_core.integrations.ultralytics import lrdet_trainer
    YOLO("yolo26n.yaml").train(data="trees.yaml", imgsz=128, epochs=50,
                               trainer=lrdet_trainer("teacher.pt", hr_scale=2.0, inherit=True))

What the trainer changes, and nothing else:

* **Two views of one image.** The train set is read at ``imgsz * hr_scale`` (the HR view, the teacher's size; mosaic,
  ``close_mosaic`` and every other augmentation act on it); ``preprocess_batch`` makes the LR batch from it by
  :func:`area_resize`, the pixel-area filter of cv2's ``INTER_AREA`` with which Ultralytics shrinks images for
  validation and prediction, so that the student trains on what it will be shown. With ``multi_scale``, one random LR size per batch and the HR view resized to ``hr_scale``
  times it. Validation, prediction and the saved ``args.imgsz`` stay at ``imgsz``, the LR size.
* **The model it trains** is an :class:`~lrdet_core.integrations.ultralytics_model.LRDetModel` (the
  :class:`~lrdet_core.BridgeDistiller`), built in ``set_model_attributes``, the one hook that runs before compile,
  freezing, AMP, DDP, the optimizer and the EMA. Its terms ``lr/...``, ``bridge/...`` and ``distill/...`` are the
  progress bar's columns and ``results.csv``'s ``train/...`` columns (``val/lr/...`` for validation).
* **What is saved.** The EMA averages the student alone, so ``last.pt``, ``best.pt`` and ``epochN.pt`` hold a plain
  Ultralytics ``DetectionModel``: ``YOLO("best.pt")`` loads and predicts without lrdet-core. ``last.pt`` also holds
  ``"lrdet"``: LRDet's own state (projectors, loss parameters, the auto alpha; plain tensors) for ``resume=True``.
* **compile** is switched off (one message): the bridge swaps modules and hooks the neck at every step.
* **Non-finite losses**: ``check_finite="warn"`` unless you pass another: a NaN/Inf term is reported and reaches
  Ultralytics' loop, whose own recovery (reload ``last.pt`` at the end of the epoch, up to 3 times) then acts, as
  for plain training; ``"raise"`` would end the run inside the step instead.

Ultralytics is AGPL-3.0 licensed; only :mod:`lrdet_core.integrations` and :mod:`lrdet_core.adapters.ultralytics`
import it.
"""
from __future__ import annotations

import difflib
import inspect
import math
import random
from copy import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from ultralytics.data import build_yolo_dataset
    from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
    from ultralytics.utils import DEFAULT_CFG, LOGGER
    from ultralytics.utils.patches import torch_load, torch_save
except ImportError as e:  # pragma: no cover - only without the extra
    raise ImportError("lrdet_core.integrations.ultralytics needs Ultralytics: pip install 'lrdet-core[ultralytics]'"
                      ) from e

from .. import validate
from ..distiller import BridgeDistiller
from ..errors import InputError
from .ultralytics_model import LRDetModel, StudentEMA, ValidationView, load_lrdet_state, lrdet_state, student_of

#: BridgeDistiller arguments the trainer sets itself: the models, and the cut (read from the layer list).
_NOT_OPTIONS = ("self", "student", "teacher", "split_points", "teacher_split_points", "hr_scale")


@dataclass(frozen=True)
class LRDetConfig:
    """What :func:`lrdet_trainer` was given: the teacher, the HR scale and the distiller's options.

    Attributes:
        teacher: a checkpoint path (an Ultralytics ``.pt`` trained at HR) or a YOLO ``DetectionModel``.
        hr_scale: the HR view's size over the LR one (``imgsz * hr_scale`` is the teacher's input size).
        options: keyword arguments of :class:`~lrdet_core.BridgeDistiller` (``loss``, ``alpha``, ``inherit``, ...).
    """

    teacher: Union[str, nn.Module]
    hr_scale: float
    options: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        """A plain-types summary, kept in ``last.pt`` beside LRDet's state."""
        teacher = self.teacher if isinstance(self.teacher, str) else type(self.teacher).__name__
        return {"teacher": teacher, "hr_scale": self.hr_scale, "options": {k: repr(v) for k, v in self.options.items()}}


def lrdet_trainer(teacher: Union[str, Path, nn.Module], hr_scale: float = 2.0, **distiller_options: Any) -> type:
    """A ``DetectionTrainer`` class that trains the student with LRDet, for ``YOLO(...).train(trainer=...)``.

    Args:
        teacher: the HR teacher: the path of a checkpoint Ultralytics trained at ``imgsz * hr_scale``, or a YOLO
            ``DetectionModel`` (or ``YOLO`` object). It is frozen and never saved.
        hr_scale: how much larger the HR view is than ``imgsz``; ``imgsz * hr_scale`` must be a multiple of 32.
        **distiller_options: :class:`~lrdet_core.BridgeDistiller`'s options (``loss``, ``alpha``, ``inherit``,
            ``check_finite`` (here ``"warn"`` by default), ...).

    Returns:
        A subclass of :class:`LRDetTrainer` that carries this configuration. It survives Ultralytics' DDP launch,
        which rebuilds the trainer in a subprocess from its cloudpickled class.

    Raises:
        InputError: for an unknown option (with the close matches), a missing checkpoint or a bad ``hr_scale``.

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> T = lrdet_trainer(DetectionModel("yolov8n.yaml", nc=1, verbose=False), hr_scale=2.0, inherit=True)
        >>> T.lrdet_config.hr_scale, T.lrdet_config.options
        (2.0, {'inherit': True})
    """
    validate.check_hr_scale(hr_scale, torchvision=False)
    if hr_scale is None:
        raise InputError("expected hr_scale to be a number >= 1 (the HR view is imgsz * hr_scale), but got None")
    known = [p for p in inspect.signature(BridgeDistiller.__init__).parameters if p not in _NOT_OPTIONS]
    for name in distiller_options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InputError(f"expected BridgeDistiller options ({', '.join(known)}) after the teacher and hr_scale, "
                             f"but got {name!r}{hint}")
    if type(teacher).__name__ == "YOLO" and isinstance(getattr(teacher, "model", None), nn.Module):
        teacher = teacher.model  # the YOLO wrapper: its detection model
    if isinstance(teacher, Path):
        teacher = str(teacher)
    if isinstance(teacher, str):
        if not Path(teacher).is_file():
            raise InputError(f"expected the teacher to be the path of an Ultralytics checkpoint trained at HR (nothing "
                             f"is downloaded), but {teacher!r} is not a file")
    elif not isinstance(teacher, nn.Module):
        raise InputError(f"expected the teacher to be a checkpoint path or a YOLO DetectionModel, but got "
                         f"{type(teacher).__name__}")
    config = LRDetConfig(teacher=teacher, hr_scale=float(hr_scale), options=dict(distiller_options))
    # A class of its own per configuration: Ultralytics instantiates the class it is given (here and, after
    # cloudpickling it by value, in each DDP worker), so the configuration has to travel with the class.
    return type("LRDetTrainer", (LRDetTrainer,), {"lrdet_config": config, "__module__": __name__,
                                                   "__qualname__": "lrdet_trainer.<locals>.LRDetTrainer"})


def _area_weights(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """``(n_out, n_in)``: the share of each output pixel's footprint ``[i s, (i + 1) s)`` (``s = n_in / n_out``)
    that input pixel ``j`` covers."""
    s = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * s
    j = torch.arange(n_in, dtype=torch.float64)[None]
    w = (torch.minimum(lo + s, j + 1) - torch.maximum(lo, j)).clamp(min=0) / s
    return w.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)


def area_resize(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Shrink images by pixel-area averaging: cv2's ``INTER_AREA`` (what Ultralytics' loader uses to shrink an
    image for validation and prediction), for any ratio, as two small matrix products.

    Args:
        x: images ``(N, C, H, W)``, floating point.
        size: ``(h, w)``, each at most ``H``, ``W``.

    Shape:
        ``(N, C, H, W)`` -> ``(N, C, h, w)``.

    Example:
        >>> area_resize(torch.arange(16.).reshape(1, 1, 4, 4), (2, 2)).flatten().tolist()  # 2x2 means
        [2.5, 4.5, 10.5, 12.5]
    """
    h, w = size
    if h > x.shape[-2] or w > x.shape[-1]:
        raise InputError(f"expected area_resize to shrink, but got {tuple(x.shape[-2:])} -> {tuple(size)}")
    return torch.einsum("ih,nchw,jw->ncij", _area_weights(x.shape[-2], h, x), x, _area_weights(x.shape[-1], w, x))


class LRDetValidator(DetectionValidator):
    """Ultralytics' detection validator; while training it scores the EMA student through a
    :class:`~lrdet_core.integrations.ultralytics_model.ValidationView`, whose losses carry the training names."""

    def get_model(self, model: Any, trainer: Any = None) -> Any:
        got = super().get_model(model, trainer)
        return ValidationView(got) if trainer is not None else got


class LRDetTrainer(DetectionTrainer):
    """Ultralytics' ``DetectionTrainer``, training its model as LRDet's student. Configure it with
    :func:`lrdet_trainer`; the class itself carries no teacher."""

    #: Set by :func:`lrdet_trainer`.
    lrdet_config: Optional[LRDetConfig] = None

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: Optional[Dict[str, Any]] = None, _callbacks: Any = None):
        if self.lrdet_config is None:
            raise InputError("expected a trainer configured by lrdet_trainer(teacher, hr_scale=..., ...), but got the "
                             "bare LRDetTrainer class, which has no teacher")
        super().__init__(cfg, overrides, _callbacks)
        if getattr(self.args, "distill_model", None):
            raise InputError(f"expected one distillation, but got distill_model={self.args.distill_model!r} (Ultralytics' "
                             f"own) with the LRDet trainer; drop distill_model")
        if self.args.compile:
            LOGGER.warning(f"LRDet: compile={self.args.compile!r} is switched off: the bridge swaps the backbone's "
                           f"outputs and hooks the neck at every step, which torch.compile would trace again each time")
            self.args.compile = False
        self._lrdet_model: Optional[LRDetModel] = None
        self._teacher_imgsz: Optional[int] = None

    # --- the model ------------------------------------------------------------------------------------------------
    def set_model_attributes(self) -> None:
        """Ultralytics' attributes on the student, then the student wrapped with the teacher."""
        super().set_model_attributes()
        if isinstance(self.model, LRDetModel):
            return
        cfg = self.lrdet_config
        teacher = self._load_teacher()
        options = {"check_finite": "warn", **cfg.options}
        if self.resume and options.get("inherit"):
            options["inherit"] = False  # the resumed student is already trained: inheriting would overwrite it
        self._lrdet_model = LRDetModel(BridgeDistiller(self.model, teacher, **options))
        self.model = self._lrdet_model

    def _load_teacher(self) -> nn.Module:
        from ultralytics.nn.tasks import load_checkpoint

        teacher = self.lrdet_config.teacher
        if isinstance(teacher, str):
            teacher, ckpt = load_checkpoint(teacher)
            imgsz = (ckpt.get("train_args") or {}).get("imgsz")
            self._teacher_imgsz = imgsz if isinstance(imgsz, int) else None
        teacher = teacher.to(self.device)
        nc, t_nc = int(self.data["nc"]), getattr(teacher, "nc", None)
        if t_nc is not None and int(t_nc) != nc:
            LOGGER.warning(f"LRDet: the teacher has {t_nc} classes and the data {nc}; its neck features are still "
                           f"distilled, but inherit=True leaves the head's class layers as initialised")
        return teacher

    # --- the two views --------------------------------------------------------------------------------------------
    def hr_imgsz(self) -> int:
        """The HR view's size, ``imgsz * hr_scale``.

        Raises:
            InputError: when it is not a whole multiple of the stride (the teacher pads to it otherwise, and the two
                views would no longer be one image resized).
        """
        lr, scale = int(self.args.imgsz), self.lrdet_config.hr_scale
        hr = lr * scale
        if abs(hr - round(hr)) > 1e-6 * hr or round(hr) % self.stride:
            good = [f"{m * self.stride}/{lr}" for m in range(math.ceil(lr / self.stride), 4 * lr // self.stride + 1)
                    if (m * self.stride) > lr][:3]
            raise InputError(f"expected imgsz * hr_scale to be a multiple of the stride {self.stride}, but "
                             f"{lr} * {scale:g} = {hr:g}; e.g. hr_scale = {', '.join(good)}")
        hr = round(hr)
        if self._teacher_imgsz is not None and self._teacher_imgsz != hr:
            LOGGER.warning(f"LRDet: the teacher was trained at imgsz={self._teacher_imgsz} and the HR view is {hr} "
                           f"(imgsz {lr} * hr_scale {scale:g}); the paper's teacher sees its own resolution")
            self._teacher_imgsz = None  # once
        return hr

    def build_dataset(self, img_path: str, mode: str = "train", batch: Optional[int] = None) -> Any:
        """The train set at the HR size (the LR batch is made from it); the others at ``imgsz``."""
        if mode != "train":
            return super().build_dataset(img_path, mode, batch)
        args = copy(self.args)
        args.imgsz = self.hr_imgsz()
        gs = max(int(student_of(self.model).stride.max()), 32)
        return build_yolo_dataset(args, img_path, batch, self.data, mode=mode, rect=False, stride=gs)

    def preprocess_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Ultralytics' preprocessing of the HR batch, then the LR view as its :func:`area_resize` (``img``), with the
        HR one kept as ``hr_img``. Boxes are normalised, so both views share them."""
        ms, self.args.multi_scale = self.args.multi_scale, 0.0  # one random size for both views, below
        try:
            batch = super().preprocess_batch(batch)
        finally:
            self.args.multi_scale = ms
        hr, scale = batch["img"], self.lrdet_config.hr_scale
        lr_hw = self._lr_size(hr.shape[-2:], scale, ms)
        if ms > 0:
            hr_hw = tuple(round(x * scale / self.stride) * self.stride for x in lr_hw)
            if tuple(hr.shape[-2:]) != hr_hw:  # Ultralytics' own multi-scale resize, at HR
                hr = F.interpolate(hr, size=hr_hw, mode="bilinear", align_corners=False)
        batch["hr_img"] = hr
        batch["img"] = area_resize(hr, lr_hw)
        return batch

    def _lr_size(self, hr_hw: Tuple[int, int], scale: float, multi_scale: float) -> Tuple[int, int]:
        lr = tuple(max(1, round(x / scale)) for x in hr_hw)
        if multi_scale <= 0:
            return lr
        imgsz = int(self.args.imgsz)  # Ultralytics' multi-scale draw, at the LR size
        sz = random.randrange(max(self.stride, int(imgsz * (1.0 - multi_scale))),
                              int(imgsz * (1.0 + multi_scale) + self.stride)) // self.stride * self.stride
        sf = sz / max(lr)
        return tuple(math.ceil(x * sf / self.stride) * self.stride for x in lr)

    # --- logging and validation -----------------------------------------------------------------------------------
    def get_validator(self) -> LRDetValidator:
        return LRDetValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)

    def progress_string(self) -> str:
        """Ultralytics' header, its columns 11 characters wide: longer term names are shortened there only
        (``distill/mse`` -> ``dist/mse``); ``results.csv`` keeps them whole."""
        names = [n if len(n) <= 10 else n.replace("distill", "dist")[:10] for n in self.loss_names]
        return ("\n" + "%11s" * (4 + len(names))) % ("Epoch", "GPU_mem", *names, "Instances", "Size")

    def label_loss_items(self, loss_items: Any = None, prefix: str = "train") -> Any:
        """Ultralytics' labels; validation runs the student alone, so ``val/`` has the ``lr/`` terms only."""
        out = super().label_loss_items(loss_items, prefix)
        if prefix != "val":
            return out
        keep = f"{prefix}/lr/"
        return [k for k in out if k.startswith(keep)] if loss_items is None else {
            k: v for k, v in out.items() if k.startswith(keep)}

    # --- EMA, checkpoints, resume, NaN recovery ---------------------------------------------------------------------
    def _setup_train(self) -> None:
        super()._setup_train()
        if not isinstance(self.ema, StudentEMA):
            self.ema = StudentEMA(self.model)  # the student alone (resume already built one from last.pt)

    def save_model(self) -> bool:
        """Ultralytics' checkpoints of the EMA student, then LRDet's state added to ``last.pt`` for resuming."""
        saved = super().save_model()
        if saved and self.last.exists():
            ckpt = torch_load(self.last, map_location="cpu")
            ckpt["lrdet"] = {"state": lrdet_state(self._lrdet_model), "config": self.lrdet_config.describe()}
            torch_save(ckpt, self.last)
        return saved

    def _load_checkpoint_state(self, ckpt: Dict[str, Any]) -> None:
        """Ultralytics' optimizer, scaler and stopper state; the EMA of the student; LRDet's own state."""
        super()._load_checkpoint_state({**ckpt, "ema": None})
        if ckpt.get("ema"):
            self.ema = StudentEMA(self.model)
            self.ema.ema.load_state_dict(ckpt["ema"].float().state_dict())
            self.ema.updates = ckpt["updates"]
        lrdet = ckpt.get("lrdet")
        if lrdet is None:
            LOGGER.warning("LRDet: the checkpoint holds no LRDet state (not written by the LRDet trainer): "
                           "projectors, loss parameters and the auto alpha start afresh")
            return
        load_lrdet_state(self._lrdet_model, lrdet["state"])

    def _handle_nan_recovery(self, epoch: int) -> bool:
        # Ultralytics restores the model from last.pt's EMA, a plain student: it is handed the student for that, and
        # LRDet's state comes back through _load_checkpoint_state.
        model, self.model = self.model, student_of(self.model)
        try:
            return super()._handle_nan_recovery(epoch)
        finally:
            self.model = model

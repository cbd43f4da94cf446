"""Ultralytics YOLO detection models (YOLOv8, YOLO11, YOLO26): where LRDet cuts them and how it runs them.

A YOLO ``DetectionModel`` is a flat list of layers; each layer reads the previous output or earlier outputs
named by its ``f`` index (``BaseModel._predict_once``). LRDet cuts it where the neck begins:

* the backbone levels are the outputs of the backbone layers (the yaml's ``backbone`` section) that the neck
  reads (YOLOv8: layers 4, 6 and 9; YOLO11 and YOLO26: 4, 6 and 10), named by their layer index;
* the neck output, the distilled features, are the inputs of the ``Detect`` head (YOLOv8: 15, 18 and 21;
  YOLO11 and YOLO26: 16, 19 and 22);
* the bridge re-runs the layers from the first neck layer to ``Detect`` with the backbone levels resampled to
  the teacher's sizes, and the model's own criterion with the HR targets.

Inputs. Images as torchvision takes them (a list of ``C x H x W`` float tensors in [0, 1] or an ``N x C x H x W``
tensor) with targets ``{"boxes": (K, 4) xyxy pixels, "labels": (K,) int64}``, where labels are YOLO's
**0-based** class indices (``0 <= label < nc``, no background class); or a YOLO batch dict (``img``,
``batch_idx``, ``cls``, ``bboxes`` as normalised xywh), converted by :func:`from_yolo_batch`. A batch is padded
at the bottom and right with YOLO's letterbox grey (114/255) to a multiple of the largest stride (32): boxes
keep their pixels, and each image's own size is kept for the bridge's resampling (:mod:`.yolo_batch`).

Losses: the entries of the loss vector of the model's own criterion, ``model.criterion``, built once
(:mod:`.yolo_loss`): ``box``, ``cls`` and ``dfl`` for YOLOv8 and YOLO11 (``v8DetectionLoss``); ``box``, ``cls``
and ``l1`` for YOLO26 (``E2ELoss``: each entry the one-to-many and the one-to-one head's terms, weighted by the
schedule that ``model.criterion.update()`` steps). Gains and the batch-size factor are included; their sum is
what Ultralytics' trainer backpropagates.

Ultralytics is AGPL-3.0 licensed; it is imported by this module, :mod:`.yolo_loss` and :mod:`.yolo_checkpoint`
only, and this module re-exports their public names (:func:`save_checkpoint`, :func:`hyperparameters`, ...).

Example:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> a = UltralyticsAdapter(DetectionModel("yolov8n.yaml", nc=2, verbose=False), None, "student")
    >>> a.cut
    YoloCut(backbone=(4, 6, 9), neck_start=10, neck=(15, 18, 21), head=22)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

try:
    import ultralytics  # noqa: F401 - AGPL-3.0: the optional extra lrdet-core[ultralytics]
except ImportError as e:  # pragma: no cover - only without the extra
    raise ImportError("lrdet_core.adapters.ultralytics needs Ultralytics: pip install 'lrdet-core[ultralytics]'") from e

from .. import validate
from ..context import level_stride
from ..errors import InputError, SplitPointError
from ..recording import Feats, Recorder, StopForward, bn_stats_frozen, hook
from .base import Adapter, HRView, LevelSize, PassRecord, Replay, SplitPoints, Targets, frozen_run
from .generic import scaled_view
from .yolo_batch import PAD_VALUE, YoloInput, from_yolo_batch, pad_images, to_yolo_batch
from .yolo_checkpoint import save_checkpoint
from .yolo_loss import hyperparameters, named_losses, own_criterion

__all__ = ["UltralyticsAdapter", "YoloCut", "yolo_cut", "run_layers", "PAD_VALUE", "PROBE_SIZE", "YoloInput",
           "pad_images", "to_yolo_batch", "from_yolo_batch", "hyperparameters", "own_criterion", "save_checkpoint"]

#: The side of the square probe image that reads off each level's stride and channels at construction.
PROBE_SIZE = 256


@dataclass(frozen=True)
class YoloCut:
    """Where LRDet cuts a YOLO model, as layer indices.

    Attributes:
        backbone: the backbone layers whose outputs the neck reads (the bridge replaces them).
        neck_start: the first neck layer (the bridge runs from here).
        neck: the layers whose outputs the ``Detect`` head takes (the distilled features).
        head: the ``Detect`` layer.
    """

    backbone: Tuple[int, ...]
    neck_start: int
    neck: Tuple[int, ...]
    head: int


def _sources(m: nn.Module) -> List[int]:
    """The absolute layer indices layer ``m`` reads (``-1``: the previous layer), as ``_predict_once`` routes."""
    fs = [m.f] if isinstance(m.f, int) else list(m.f)
    return [m.i + j if j < 0 else j for j in fs]


def yolo_cut(model: nn.Module, role: str = "model") -> YoloCut:
    """The cut of a YOLO ``DetectionModel``, read from its layer list and its yaml's ``backbone`` section.

    Raises:
        SplitPointError: for a model whose last layer is not a plain ``Detect`` head (segmentation, pose,
            OBB) or whose yaml has no ``backbone`` section.
    """
    layers = model.model
    head = layers[-1]
    if type(head).__name__ != "Detect":
        raise SplitPointError(f"expected the {role} to be a YOLO detection model ending in a Detect head, but its "
                              f"last layer is {type(head).__name__}; segmentation, pose and OBB models are not "
                              f"supported")
    spec = getattr(model, "yaml", None)
    if not isinstance(spec, Mapping) or not spec.get("backbone"):
        raise SplitPointError(f"expected the {role} to carry the yaml it was built from (model.yaml with a "
                              f"'backbone' section) to find where its neck begins, but got {type(spec).__name__}")
    start = len(spec["backbone"])
    reads = {j for m in list(layers)[start:] for j in _sources(m)}
    backbone = tuple(sorted(j for j in reads if j < start))
    return YoloCut(backbone=backbone, neck_start=start, neck=tuple(_sources(head)), head=len(layers) - 1)


def run_layers(layers: Sequence[nn.Module], y: List[Any], start: int) -> Any:
    """Run ``layers[start:]`` as ``BaseModel._predict_once`` does, with ``y[i]`` holding layer ``i``'s output
    for every earlier layer a later one reads (and ``y[start - 1]``, the first layer's input).

    Returns the last layer's output; ``y`` is filled in on the way.
    """
    x = y[start - 1]
    for m in list(layers)[start:]:
        if m.f != -1:
            src = _sources(m)
            x = y[src[0]] if isinstance(m.f, int) else [x if j == -1 else y[s] for j, s in zip(m.f, src)]
        x = m(x)
        y[m.i] = x
    return x


class UltralyticsAdapter(Adapter):
    """An Ultralytics YOLO ``DetectionModel`` (YOLOv8, YOLO11), cut by :func:`yolo_cut`.

    Args:
        model: the detection model (``YOLO("yolov8n.yaml").model``, not the ``YOLO`` wrapper).
        split_points: must be ``None``: the cut is read from the layer list.
        role: how the model is named in messages.
    """

    family = "Ultralytics YOLO model"

    def __init__(self, model: nn.Module, split_points: Optional[SplitPoints], role: str):
        super().__init__(model, role)
        if split_points is not None:
            raise SplitPointError(f"expected no split points for the {role}, a YOLO model (the cut is read from its "
                                  f"layer list: backbone levels = what the neck reads, neck = Detect's inputs), but "
                                  f"got {split_points!r}")
        self.cut = yolo_cut(model, role)
        self.layers = model.model
        self.head = self.layers[self.cut.head]
        self.stride = int(max(float(s) for s in self.head.stride))
        self.nc = int(self.head.nc)
        self.channels = int(model.yaml.get("channels", 3))
        self.known_strides["neck"] = {str(j): int(s) for j, s in zip(self.cut.neck, self.head.stride)}

    # --- recording ----------------------------------------------------------------------------------------
    def _record(self, rec: Recorder, *, copy: bool = False, stop: bool = False) -> None:
        """Record the backbone levels (``seen["backbone"]``) and Detect's inputs (``seen["neck"]``)."""
        levels: Dict[str, Tensor] = {}
        rec.seen["backbone"] = levels
        for i in self.cut.backbone:
            def on_output(mod: nn.Module, inputs: Any, output: Any, key: str = str(i)) -> Any:
                levels[key] = output
                return output.clone() if copy else None  # the model gets a copy: in-place ops downstream
            rec.enter(hook(self.layers[i], on_output))

        def on_head(mod: nn.Module, inputs: Tuple[Any, ...]) -> None:
            rec.seen["neck"] = Feats({str(j): t for j, t in zip(self.cut.neck, inputs[0])},
                                     f"{self.role}'s Detect input")
            if stop:
                raise StopForward
        rec.enter(hook(self.head, on_head, pre=True))

    def _backbone(self, rec: Recorder, where: str) -> Feats:
        levels = rec.seen["backbone"]
        if sorted(levels) != sorted(map(str, self.cut.backbone)):
            raise SplitPointError(f"expected the {self.role}'s layers {list(self.cut.backbone)} to run in the "
                                  f"{where}, but only {sorted(levels, key=int)} did")
        return Feats({str(i): levels[str(i)] for i in self.cut.backbone}, f"{self.role}'s backbone levels")

    # --- inputs -------------------------------------------------------------------------------------------
    def as_batch(self, images: Any, targets: Any, where: str) -> Tuple[Any, Any]:
        if not isinstance(images, Mapping):
            return images, targets
        if targets is not None:
            raise InputError(f"expected the targets inside the YOLO {where} dict ('batch_idx', 'cls', 'bboxes') or "
                             f"torchvision-style (images, targets), but got a batch dict and targets too")
        return from_yolo_batch(images, where)

    def _input(self, images: Any, targets: Optional[Targets]) -> YoloInput:
        img, sizes = pad_images(images, self.stride)
        return YoloInput(img=img, sizes=sizes, targets=None if targets is None else [dict(t) for t in targets])

    def check_images(self, images: Any, n: int, where: str) -> None:
        validate.check_images(images, n, where, True)
        for i, img in enumerate(images):
            if img.shape[0] != self.channels:
                raise InputError(f"expected {where}[{i}] to have the {self.channels} channels the {self.role} takes, "
                                 f"but it is {tuple(img.shape)}")

    def check_targets(self, targets: Any, where: str) -> None:
        validate.check_targets(targets, where, True)
        for i, t in enumerate(targets):
            bad = (t["labels"] < 0) | (t["labels"] >= self.nc)
            if bool(bad.any()):
                raise InputError(f"expected {where}[{i}]['labels'] to be YOLO class indices in [0, {self.nc}) "
                                 f"(0-based, nc={self.nc}, no background class), but got "
                                 f"{int(t['labels'][bad][0])}")

    # --- losses -------------------------------------------------------------------------------------------
    def criterion(self) -> Any:
        """The model's own criterion, ``model.criterion`` (:func:`~lrdet_core.adapters.yolo_loss.own_criterion`):
        built once, so that a schedule step on it (``E2ELoss.update()``) reaches the LR and bridge passes."""
        return own_criterion(self.model)

    def _losses(self, preds: Any, x: YoloInput, where: str) -> Dict[str, Tensor]:
        return named_losses(self.criterion(), preds, to_yolo_batch(x.img, x.targets), self.role, where)

    # --- passes -------------------------------------------------------------------------------------------
    def student_pass(self, images: Any, targets: Targets, keep_neck: bool) -> PassRecord:
        x = self._input(images, targets)
        with Recorder() as rec:
            self._record(rec, copy=True)
            preds = self.model(x.img)
        if "neck" not in rec.seen:
            raise SplitPointError(f"the {self.role}'s Detect head was never reached in its forward")
        return PassRecord(canvas=x.canvas, sizes=x.sizes, targets=x.targets, backbone=self._backbone(rec, "forward"),
                          neck=rec.seen["neck"] if keep_neck else None, losses=self._losses(preds, x, "LR pass"),
                          state=x)

    def hr_view(self, images: Any, targets: Targets, hr_images: Any, hr_targets: Optional[Targets],
                lr: PassRecord, *, hr_source: str, hr_scale: Optional[float]) -> HRView:
        if hr_images is None:
            hr_images, hr_targets = scaled_view(images, targets, hr_scale)
        return HRView(inputs=(hr_images,), targets=hr_targets)

    def teacher_pass(self, view: HRView) -> PassRecord:
        x = self._input(view.inputs[0], view.targets)
        with frozen_run(self.model, self.layers[0]), Recorder() as rec:
            self._record(rec, stop=True)
            try:
                self.model(x.img)
            except StopForward:
                pass
        if "neck" not in rec.seen:
            raise SplitPointError(f"the {self.role}'s Detect head was never reached in its forward")
        levels = [LevelSize(lv.key, lv.stride, tuple(lv.tensor.shape[-2:]))
                  for lv in self.levels("backbone", self._backbone(rec, "forward"), x.canvas)]
        return PassRecord(canvas=x.canvas, sizes=x.sizes, targets=x.targets, backbone_levels=levels,
                          neck=rec.seen["neck"], state=x)

    def bridge_pass(self, images: Any, targets: Targets, hr: PassRecord, replay: Replay,
                    rois: Optional[int] = None) -> Tuple[Mapping[str, Tensor], Feats]:
        feats = replay(hr.canvas)
        y: List[Any] = [None] * len(self.layers)
        for key, t in zip(feats.keys, feats.tensors):
            y[int(key)] = t
        with Recorder() as rec:
            self._record(rec)
            rec.enter(bn_stats_frozen(self.model))
            preds = run_layers(self.layers, y, self.cut.neck_start)
        hr_x = YoloInput(img=hr.state.img, sizes=hr.sizes, targets=hr.targets)
        return self._losses(preds, hr_x, "bridge pass"), rec.seen["neck"]

    def predict(self, images: Any) -> Any:
        """The model's own eval output on the batch (padded as in training), e.g. ``(predictions, raw)``."""
        if isinstance(images, Mapping):
            images = from_yolo_batch(images, "images")[0]
        return self.model(self._input(images, None).img)

    @torch.no_grad()
    def probe(self) -> Tuple[Feats, Tuple[int, int]]:
        """Detect's inputs on a ``PROBE_SIZE`` square of zeros (in eval mode) and that canvas, with the strides of
        the backbone levels read off it."""
        p = next(self.model.parameters())
        dtype = validate.dtype_of(self.model) or p.dtype
        x = torch.zeros(1, self.channels, PROBE_SIZE, PROBE_SIZE, device=p.device, dtype=dtype)
        was = self.model.training
        self.model.eval()
        try:
            with Recorder() as rec:
                self._record(rec, stop=True)
                try:
                    self.model(x)
                except StopForward:
                    pass
        finally:
            self.model.train(was)
        canvas = (PROBE_SIZE, PROBE_SIZE)
        self.known_strides["backbone"] = {k: level_stride(canvas, t.shape[-2:])
                                          for k, t in rec.seen["backbone"].items()}
        return rec.seen["neck"], canvas

"""Ultralytics YOLO detection models (YOLOv8, YOLO11): the cut, the batch format and a checkpoint YOLO loads.

A YOLO ``DetectionModel`` is a flat list of layers; each layer reads the previous output or earlier outputs
named by its ``f`` index (``BaseModel._predict_once``). LRDet cuts it where the neck begins:

* the backbone levels are the outputs of the backbone layers (the yaml's ``backbone`` section) that the neck
  reads (YOLOv8: layers 4, 6 and 9; YOLO11: 4, 6 and 10), named by their layer index;
* the neck output, the distilled features, are the inputs of the ``Detect`` head (YOLOv8: 15, 18 and 21);
* the bridge re-runs the layers from the first neck layer to ``Detect`` with the backbone levels resampled to
  the teacher's sizes, and the model's own criterion (``v8DetectionLoss``) with the HR targets.

Inputs. Images as torchvision takes them (a list of ``C x H x W`` float tensors in [0, 1] or an ``N x C x H x W``
tensor) with targets ``{"boxes": (K, 4) xyxy pixels, "labels": (K,) int64}``, where labels are YOLO's
**0-based** class indices (``0 <= label < nc``, no background class); or a YOLO batch dict (``img``,
``batch_idx``, ``cls``, ``bboxes`` as normalised xywh), converted by :func:`from_yolo_batch`. A batch is padded
at the bottom and right with YOLO's letterbox grey (114/255) to a multiple of the largest stride (32): boxes
keep their pixels, and each image's own size is kept for the bridge's resampling.

Losses: ``box``, ``cls`` and ``dfl``, the three entries of the criterion's loss vector (gains and the batch-size
factor included); their sum is what Ultralytics' trainer backpropagates.

Ultralytics is AGPL-3.0 licensed; this module is the only one of lrdet-core that imports it.

Example:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> a = UltralyticsAdapter(DetectionModel("yolov8n.yaml", nc=2, verbose=False), None, "student")
    >>> a.cut
    YoloCut(backbone=(4, 6, 9), neck_start=10, neck=(15, 18, 21), head=22)
"""
from __future__ import annotations

import datetime
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

try:
    import ultralytics  # AGPL-3.0: the optional extra lrdet-core[ultralytics]
except ImportError as e:  # pragma: no cover - only without the extra
    raise ImportError("lrdet_core.adapters.ultralytics needs Ultralytics: pip install 'lrdet-core[ultralytics]'") from e

from .. import validate
from ..context import level_stride
from ..errors import InputError, LossError, SplitPointError
from ..recording import Feats, Recorder, StopForward, bn_stats_frozen, hook
from .base import Adapter, HRView, LevelSize, PassRecord, Replay, SplitPoints, Targets, frozen_run
from .generic import scaled_view

#: YOLO's letterbox padding value (114 of 255), for the rows and columns added to reach a multiple of the stride.
PAD_VALUE = 114 / 255
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


# --- the batch format ----------------------------------------------------------------------------------------
@dataclass
class YoloInput:
    """A batch as a YOLO model runs it: the padded image tensor, each image's size, targets in its pixels."""

    img: Tensor
    sizes: List[Tuple[int, int]]
    targets: Optional[Targets]

    @property
    def canvas(self) -> Tuple[int, int]:
        return int(self.img.shape[-2]), int(self.img.shape[-1])


def pad_images(images: Union[Tensor, Sequence[Tensor]], stride: int) -> Tuple[Tensor, List[Tuple[int, int]]]:
    """Images as one ``N x C x H x W`` tensor padded (bottom, right) to a multiple of ``stride``, and each
    image's own (H, W).

    Example:
        >>> x, sizes = pad_images([torch.zeros(3, 40, 64), torch.zeros(3, 64, 30)], 32)
        >>> tuple(x.shape), sizes
        ((2, 3, 64, 64), [(40, 64), (64, 30)])
    """
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    h = -(-max(s[0] for s in sizes) // stride) * stride
    w = -(-max(s[1] for s in sizes) // stride) * stride
    if isinstance(images, Tensor) and tuple(images.shape[-2:]) == (h, w):
        return images, sizes
    out = images[0].new_full((len(sizes), images[0].shape[0], h, w), PAD_VALUE)
    for i, im in enumerate(images):
        out[i, :, :im.shape[-2], :im.shape[-1]] = im
    return out, sizes


def to_yolo_batch(img: Tensor, targets: Targets) -> Dict[str, Tensor]:
    """torchvision-style targets (xyxy pixels of ``img``) as YOLO's batch dict (normalised xywh).

    Example:
        >>> b = to_yolo_batch(torch.zeros(1, 3, 64, 32), [{"boxes": torch.tensor([[0., 16., 16., 48.]]),
        ...                                                "labels": torch.tensor([2])}])
        >>> b["batch_idx"].tolist(), b["cls"].tolist(), b["bboxes"].tolist()
        ([0.0], [[2.0]], [[0.25, 0.5, 0.5, 0.5]])
    """
    h, w = img.shape[-2:]
    boxes = [t["boxes"].detach().to(img.device, torch.float32) for t in targets]
    xyxy = torch.cat(boxes) if boxes else img.new_zeros(0, 4)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=img.device)
    xywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / scale
    labels = [t["labels"].to(img.device) for t in targets]
    return {"img": img,
            "batch_idx": torch.cat([torch.full((len(b),), float(i), device=img.device) for i, b in enumerate(boxes)]
                                   + [img.new_zeros(0)]),
            "cls": torch.cat(labels + [torch.zeros(0, dtype=torch.int64, device=img.device)]).float()[:, None],
            "bboxes": xywh}


def from_yolo_batch(batch: Mapping[str, Any], where: str = "batch") -> Tuple[Tensor, Targets]:
    """A YOLO batch dict as ``(images, targets)``: a float ``N x C x H x W`` tensor in [0, 1] (a uint8 ``img``,
    as Ultralytics' dataloader gives it, is divided by 255 as its trainer does) and one
    ``{"boxes": xyxy pixels, "labels": int64}`` dict per image.

    Raises:
        InputError: for missing keys or shapes that do not fit together.

    Example:
        >>> b = {"img": torch.zeros(2, 3, 64, 32), "batch_idx": torch.tensor([1.]), "cls": torch.tensor([[2.]]),
        ...      "bboxes": torch.tensor([[0.25, 0.5, 0.5, 0.5]])}
        >>> img, t = from_yolo_batch(b)
        >>> t[0]["boxes"].shape, t[1]["boxes"].tolist(), t[1]["labels"].tolist()
        (torch.Size([0, 4]), [[0.0, 16.0, 16.0, 48.0]], [2])
    """
    missing = [k for k in ("img", "batch_idx", "cls", "bboxes") if k not in batch]
    if missing:
        raise InputError(f"expected the YOLO {where} dict to have 'img', 'batch_idx', 'cls' and 'bboxes', but it has "
                         f"no {missing} (keys: {sorted(map(str, batch))})")
    img, idx, cls, xywh = (batch[k] for k in ("img", "batch_idx", "cls", "bboxes"))
    if not (isinstance(img, Tensor) and img.dim() == 4):
        got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise InputError(f"expected {where}['img'] to be an N x C x H x W tensor, but got {got}")
    m = len(idx) if isinstance(idx, Tensor) and idx.dim() == 1 else None
    shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
              for k, v in (("batch_idx", idx), ("cls", cls), ("bboxes", xywh))}
    if m is None or not isinstance(cls, Tensor) or cls.numel() != m or not isinstance(xywh, Tensor) or \
            tuple(xywh.shape) != (m, 4):
        raise InputError(f"expected {where}['batch_idx'] (M,), ['cls'] (M,) or (M, 1) and ['bboxes'] (M, 4) for M "
                         f"boxes, but got {shapes}")
    n, (h, w) = img.shape[0], img.shape[-2:]
    if m and (idx.min() < 0 or idx.max() >= n):
        raise InputError(f"expected {where}['batch_idx'] in [0, {n}) for {n} images, but got values from "
                         f"{float(idx.min()):g} to {float(idx.max()):g}")
    img = img.float() / 255 if img.dtype == torch.uint8 else img
    scale = torch.tensor([w, h, w, h], dtype=xywh.dtype, device=xywh.device)
    xyxy = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1) * scale
    labels, idx = cls.reshape(-1).round().long(), idx.long()
    return img, [{"boxes": xyxy[idx == i].float(), "labels": labels[idx == i]} for i in range(n)]


def hyperparameters(model: nn.Module) -> Any:
    """The loss gains the criterion reads (``box``, ``cls``, ``dfl``): ``model.args`` as a namespace, with
    Ultralytics' defaults for what it lacks (``YOLO(...).model.args`` is a plain dict; a bare model has none)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    args = getattr(model, "args", None)
    if args is None:
        return get_cfg()
    if isinstance(args, Mapping):
        return IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **args})
    return args


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
        """The model's own criterion (``init_criterion()``), built on its current device with
        :func:`hyperparameters` and without changing the model."""
        had, old = hasattr(self.model, "args"), getattr(self.model, "args", None)
        self.model.args = hyperparameters(self.model)
        try:
            return self.model.init_criterion()
        finally:
            if had:
                self.model.args = old
            else:
                del self.model.args

    def _losses(self, preds: Any, x: YoloInput, where: str) -> Dict[str, Tensor]:
        crit = self.criterion()
        vec, _ = crit(preds, to_yolo_batch(x.img, x.targets))
        names = [str(n).replace("_loss", "") for n in getattr(crit, "loss_names", ())]
        if not isinstance(vec, Tensor) or vec.dim() != 1 or len(names) != vec.numel():
            got = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
            raise LossError(f"expected the {self.role}'s criterion ({type(crit).__name__}) to return one loss per "
                            f"name in {names} in the {where}, but it returned {got}")
        return dict(zip(names, vec.unbind()))

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


def save_checkpoint(model: nn.Module, path: Union[str, Path], train_args: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model`` (e.g. ``distiller.student``) as an Ultralytics checkpoint: ``YOLO(path)`` loads it.

    The file holds a float32 copy of the model in eval mode (no criterion) under ``"model"``, as Ultralytics'
    trainer saves its EMA, with ``train_args`` (default: the model's ``args``) and the version that wrote it.

    Args:
        model: a YOLO ``DetectionModel``.
        path: where to write (``.pt``).
        train_args: the training arguments ``YOLO(path).overrides`` will hold.

    Example:
        >>> from ultralytics import YOLO
        >>> import tempfile, os
        >>> m = YOLO("yolov8n.yaml").model
        >>> with tempfile.TemporaryDirectory() as d:
        ...     type(YOLO(save_checkpoint(m, os.path.join(d, "student.pt"))).model).__name__
        'DetectionModel'
    """
    from . import ultralytics_family

    if ultralytics_family(model) is None:
        raise InputError(f"expected a YOLO DetectionModel to save, but got {type(model).__name__}")
    copy = deepcopy(model).float().eval()
    if hasattr(copy, "criterion"):
        copy.criterion = None  # training-only state, as Ultralytics strips it
    args = dict(train_args) if train_args is not None else dict(vars(hyperparameters(model)))
    args.setdefault("task", "detect")
    path = Path(path)
    torch.save({"model": copy, "ema": None, "train_args": args, "date": datetime.datetime.now().isoformat(),
                "version": ultralytics.__version__, "license": "AGPL-3.0 (https://ultralytics.com/license)"}, path)
    return path


"""``bridge_crop=f``: the teacher and the bridge run on a window of the HR canvas instead of all of it.

The bridge's backward dominates an LRDet step. With a crop, one window per step (shared by the images of the
batch) is cut from the HR canvas, the canvas the teacher's backbone sees (torchvision: after its transform; a
custom model: the HR images as given). The teacher runs on the window; the bridge runs the student's neck and
head on the same window of the resampled LR backbone levels, against the HR targets clipped to it; the
distillation loss is computed on the window's *interior*, the window less a margin on every side that lies
inside the canvas (at the canvas edge the window's edge is the image's, so no margin is needed there).

Geometry, per axis, in HR canvas pixels (``unit`` = the coarsest stride of the student's backbone and neck
levels, e.g. 32 for P3-P5 and 128 for P3-P7 pyramids):

* the window's nominal side is ``sqrt(f)`` of the canvas's, rounded to a multiple of ``unit``; the interior's is
  that less ``2 * margin * unit``, at least one ``unit``;
* every window edge inside the canvas lies on a multiple of ``unit``, so each level's cells line up between the
  bridge, the teacher and the full canvas; the resampling maps each window cell from its full-canvas position,
  so the bridge's input on the window is exactly the full bridge input's slice;
* placement: the interior's start is drawn uniformly among the multiples of ``unit`` from
  ``-(interior - unit)`` to the canvas's last block, and clipped to the canvas; the window is the interior plus
  the margins, clipped too. Every cell of the canvas is in the interior with the same probability ``p``, so
  the image's edges are distilled as often as its centre (windows at the edges come out smaller).

Why random and not around the ground truth: uniform coverage makes a summed loss on the interior, times ``1/p``,
an unbiased estimate of the same loss on the whole canvas (a Horvitz-Thompson estimate), so ``alpha`` keeps
its meaning; windows around the boxes would under-sample the background that LRDet also distils, and need a
rule for images without boxes. The draws come from torch's global CPU generator: ``torch.manual_seed`` makes
them reproducible; :meth:`~lrdet_core.BridgeDistiller.materialize` does not consume them.

Scaling: a loss (module or callable) whose ``reduction`` attribute is ``"sum"`` (the built-in MSE and L1, by
default) is multiplied by ``1/p``.
Other losses (mean reductions, CWD's per-channel distributions, FGD's box- and area-normalised terms, custom
callables) are left as they are.

Targets: a box is kept when its centre lies inside the window (the rule of SSD's and torchvision's
``RandomIoUCrop``), clipped to it and shifted to window pixels; boxes mostly outside are dropped, as are their
labels, masks and keypoints (masks are cut to the window; keypoints outside it become invisible). The
distillation loss's context gets every box that overlaps the interior, clipped to it.

Exactness: with a neck without batch statistics whose receptive field fits in the margin (torchvision's FPN,
with or without P6/P7, and ``margin=1``), the bridge's interior features equal the full bridge's. The teacher's
interior features differ from the full teacher's near the interior's edges (its backbone sees zero padding at the
window's edges), less as the margin grows. A neck with BatchNorm in training mode or GroupNorm computes its
statistics over the window, not the canvas.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(1)
    >>> w = place((256, 256), [(256, 256)], unit=32, fraction=0.25, margin=1)  # a 128 px window on 256 px
    >>> w.window, w.interior, w.scale  # (y0, x0, y1, x1); 1/p = (9 placements / 2 per block) ** 2
    ((64, 96, 192, 224), (96, 128, 160, 192), 20.25)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .errors import InputError
from .recording import Feats

Size = Tuple[int, int]
Box = Tuple[int, int, int, int]  # (y0, x0, y1, x1) in pixels

#: Target keys cut with the boxes (one entry per box); ``masks`` and ``keypoints`` are also cut spatially.
PER_BOX_KEYS = ("labels", "area", "iscrowd", "masks", "keypoints")


def check_crop(fraction: Any, margin: Any, bridge: bool, family: str) -> Tuple[float, int]:
    """``bridge_crop`` and ``crop_margin`` validated against the distiller's other settings."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise InputError(f"expected bridge_crop to be an area fraction in (0, 1] (1: no crop), but got {fraction!r}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise InputError(f"expected crop_margin to be an int >= 0 (cells of the coarsest level), but got {margin!r}")
    if fraction < 1 and not bridge:
        raise InputError("bridge_crop crops the bridge branch, but bridge=False has none; use bridge_crop=1.0")
    if fraction < 1 and family == "ultralytics":
        raise InputError("bridge_crop is not supported for Ultralytics YOLO models yet; use bridge_crop=1.0")
    return float(fraction), margin


class Axis(NamedTuple):
    """One axis of a crop: the window ``[start, stop)``, the interior ``[inner_start, inner_stop)``, and
    ``1/p``, the inverse of the probability that a given pixel is in the interior."""

    start: int
    stop: int
    inner_start: int
    inner_stop: int
    inv_p: float


def place_axis(length: int, unit: int, fraction_side: float, margin_px: int) -> Axis:
    """Draw one axis of a window (see the module's docstring).

    Example:
        >>> place_axis(256, 32, 1.0, 32)  # the window would cover the axis: no crop on it
        Axis(start=0, stop=256, inner_start=0, inner_stop=256, inv_p=1.0)
    """
    nominal = unit * round(fraction_side * length / unit)
    inner = max(unit, nominal - 2 * margin_px)
    if nominal >= length or inner >= length:  # the window spans the axis: both its edges are the canvas's
        return Axis(0, length, 0, length, 1.0)
    blocks, cover = math.ceil(length / unit), inner // unit
    placements = blocks + cover - 1  # each block is in the interior of exactly `cover` of them
    a = (int(torch.randint(placements, ())) - (cover - 1)) * unit
    lo, hi = max(a, 0), min(a + inner, length)
    return Axis(max(lo - margin_px, 0), min(hi + margin_px, length), lo, hi, placements / cover)


@dataclass(frozen=True)
class CropWindow:
    """One step's crop, in pixels of the full HR canvas.

    Attributes:
        canvas: the full HR canvas ``(H, W)``.
        sizes: each image's content size on it.
        window: ``(y0, x0, y1, x1)``: where the teacher and the bridge ran.
        interior: ``(y0, x0, y1, x1)``: where the distillation loss is computed.
        scale: ``1/p`` (see the module's docstring); the factor of a summed loss.
        boxes: each image's boxes that overlap the interior, clipped to it, in interior pixels.
    """

    canvas: Size
    sizes: List[Size]
    window: Box
    interior: Box
    scale: float
    boxes: List[Tensor]

    @property
    def origin(self) -> Size:
        return self.window[0], self.window[1]

    @property
    def size(self) -> Size:
        return self.window[2] - self.window[0], self.window[3] - self.window[1]


def place(canvas: Size, sizes: Sequence[Size], unit: int, fraction: float, margin: int,
          targets: Optional[Sequence[Mapping[str, Any]]] = None) -> CropWindow:
    """A random window of area fraction ``fraction`` on ``canvas``, aligned to ``unit`` with a margin of
    ``margin`` units (torch's global generator draws it)."""
    side = math.sqrt(fraction)
    ay, ax = (place_axis(n, unit, side, margin * unit) for n in canvas)
    interior = (ay.inner_start, ax.inner_start, ay.inner_stop, ax.inner_stop)
    boxes = [clip_boxes(t["boxes"], interior) if t is not None and "boxes" in t else torch.zeros(0, 4)
             for t in (targets or [None] * len(sizes))]
    return CropWindow(canvas=tuple(canvas), sizes=[tuple(s) for s in sizes], window=(ay.start, ax.start, ay.stop,
                      ax.stop), interior=interior, scale=ay.inv_p * ax.inv_p, boxes=boxes)


def clip_boxes(boxes: Tensor, region: Box) -> Tensor:
    """``xyxy`` boxes that overlap ``region`` (``(y0, x0, y1, x1)``), clipped to it, in its pixels.

    Example:
        >>> clip_boxes(torch.tensor([[0., 0., 10., 10.], [50., 50., 60., 60.]]), (5, 5, 20, 20)).tolist()
        [[0.0, 0.0, 5.0, 5.0]]
    """
    y0, x0, y1, x1 = region
    b = boxes.detach().float().reshape(-1, 4) - torch.tensor([x0, y0, x0, y0], dtype=torch.float32,
                                                               device=boxes.device)
    b = torch.stack([b[:, 0].clamp(0, x1 - x0), b[:, 1].clamp(0, y1 - y0), b[:, 2].clamp(0, x1 - x0),
                     b[:, 3].clamp(0, y1 - y0)], 1)
    return b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]


def crop_target(target: Mapping[str, Any], window: Box, where: str) -> Dict[str, Any]:
    """One image's target on the window: the boxes whose centre is inside, clipped, in window pixels.

    Example:
        >>> t = {"boxes": torch.tensor([[0., 0., 10., 10.], [30., 30., 50., 50.]]), "labels": torch.tensor([1, 2])}
        >>> c = crop_target(t, (0, 8, 48, 48), "hr_targets")  # (y0, x0, y1, x1): the first centre is outside
        >>> c["boxes"].tolist(), c["labels"].tolist()
        ([[22.0, 30.0, 40.0, 48.0]], [2])
    """
    out = dict(target)
    if "boxes" not in target:
        return out
    y0, x0, y1, x1 = window
    boxes = target["boxes"]
    k = boxes.shape[0]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    keep = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    shift = torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype, device=boxes.device)
    hi = torch.tensor([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=boxes.dtype, device=boxes.device)
    out["boxes"] = torch.minimum((boxes[keep] - shift).clamp(min=0), hi)
    for key, v in target.items():
        if key == "boxes" or not isinstance(v, Tensor):
            continue
        if key in PER_BOX_KEYS:
            v = v[keep]
            if key == "masks":
                v = v[..., y0:y1, x0:x1]
            elif key == "keypoints":
                v = v.clone()
                v[..., 0] -= x0
                v[..., 1] -= y0
                outside = (v[..., 0] < 0) | (v[..., 0] >= x1 - x0) | (v[..., 1] < 0) | (v[..., 1] >= y1 - y0)
                v[..., 2] = torch.where(outside, torch.zeros_like(v[..., 2]), v[..., 2])
            out[key] = v
        elif v.dim() >= 1 and v.shape[0] == k and k > 0:
            raise InputError(f"bridge_crop cannot tell whether {where} key {key!r} (shape {tuple(v.shape)}) holds one "
                             f"entry per box, to drop those of the boxes outside the crop; the keys it cuts are "
                             f"'boxes', {', '.join(map(repr, PER_BOX_KEYS))}. Remove the key or use bridge_crop=1.0")
    return out


class Cropper:
    """What an adapter calls on the HR canvas before the teacher runs: it draws the window and cuts the batch.

    Args:
        unit: the alignment unit in pixels (the coarsest stride).
        fraction, margin: ``bridge_crop`` and ``crop_margin``.
    """

    def __init__(self, unit: int, fraction: float, margin: int):
        self.unit, self.fraction, self.margin = unit, fraction, margin
        self.window: Optional[CropWindow] = None

    def __call__(self, canvas: Tensor, sizes: Sequence[Size], targets: Optional[Sequence[Mapping[str, Any]]]
                 ) -> Tuple[Tensor, List[Size], Optional[List[Dict[str, Any]]]]:
        """``canvas`` ``(N, C, H, W)`` with each image's content size and targets, cut to a new window."""
        w = self.window = place(tuple(canvas.shape[-2:]), sizes, self.unit, self.fraction, self.margin, targets)
        y0, x0, y1, x1 = w.window
        cut = [(max(0, min(h, y1) - y0), max(0, min(wd, x1) - x0)) for h, wd in sizes]
        tgts = None if targets is None else [crop_target(t, w.window, "hr_targets") for t in targets]
        return canvas[..., y0:y1, x0:x1], cut, tgts


def alignment_unit(adapter: Any, lr: Any) -> int:
    """The coarsest stride of the student's backbone and neck levels (read on the LR canvas)."""
    strides = [lv.stride for lv in adapter.levels("backbone", lr.backbone, lr.canvas)]
    if lr.neck is not None:
        strides += [lv.stride for lv in adapter.levels("neck", lr.neck, lr.canvas)]
    return max(strides)


def geometry(hr: Any) -> Tuple[List[Size], Size]:
    """What the bridge's resampling needs of an HR pass: each image's full HR size and the window's origin."""
    w = getattr(hr, "window", None)
    return (list(hr.sizes), (0, 0)) if w is None else (w.sizes, w.origin)


def _slice(levels: Sequence[Any], window: Size, inner: Box) -> List[Tensor]:
    """Each level cut to ``inner`` (``(y0, x0, y1, x1)`` in window pixels); an edge at the window's own edge
    keeps the level's last (possibly partial) cell."""
    y0, x0, y1, x1 = inner
    out = []
    for lv in levels:
        s, (h, w) = lv.stride, lv.tensor.shape[-2:]
        rows = slice(y0 // s, h if y1 == window[0] else y1 // s)
        cols = slice(x0 // s, w if x1 == window[1] else x1 // s)
        out.append(lv.tensor[..., rows, cols])
    return out


class BridgeCrop:
    """The crop of one distiller: draws a window per teacher pass, cuts the distillation to its interior.

    Args:
        fraction: ``bridge_crop``; 1.0 turns everything off (every method returns its input unchanged).
        margin: ``crop_margin``, in cells of the coarsest level.

    Attributes:
        windows: the last window of each teacher, by name (for inspection).
    """

    def __init__(self, fraction: float = 1.0, margin: int = 1):
        self.fraction, self.margin = fraction, margin
        self.windows: Dict[str, CropWindow] = {}

    @property
    def active(self) -> bool:
        return self.fraction < 1.0

    def teacher_pass(self, tname: str, adapter: Any, view: Any, student: Any, lr: Any) -> Any:
        """The teacher's pass on this step's window (the whole canvas when off)."""
        if not self.active:
            return adapter.teacher_pass(view)
        cropper = Cropper(alignment_unit(student, lr), self.fraction, self.margin)
        hr = adapter.teacher_pass(view, crop=cropper)
        w = cropper.window
        if tuple(hr.canvas) != w.size:
            raise InputError(f"bridge_crop cut the {adapter.role}'s HR images to {w.size}, but its backbone received "
                             f"{tuple(hr.canvas)}: the crop needs a model whose backbone sees the images as given "
                             f"(no resizing inside the model); use bridge_crop=1.0")
        hr.window = self.windows[tname] = w
        return hr

    def interior(self, student: Any, teacher: Any, s_feats: Feats, hr: Any, loss: Any) -> Tuple[Feats, Any, float]:
        """The bridge's and the teacher's neck outputs on the interior, the HR record as the loss sees it there
        (canvas, content sizes and boxes of the interior), and the factor of the loss (``1/p`` for a summed
        loss, else 1)."""
        w = getattr(hr, "window", None)
        if w is None:
            return s_feats, hr, 1.0
        (oy, ox), (wy0, wx0, wy1, wx1) = w.origin, w.interior
        inner = (wy0 - oy, wx0 - ox, wy1 - oy, wx1 - ox)
        size = w.size
        s_inner = s_feats.replaced(_slice(student.levels("neck", s_feats, size), size, inner))
        t_inner = hr.neck.replaced(_slice(teacher.levels("neck", hr.neck, size), size, inner))
        sizes = [(max(0, min(h, wy1) - wy0), max(0, min(wd, wx1) - wx0)) for h, wd in w.sizes]
        rec = replace(hr, neck=t_inner, canvas=(wy1 - wy0, wx1 - wx0), sizes=sizes,
                      targets=[{"boxes": b} for b in w.boxes])
        return s_inner, rec, (w.scale if _reduction(loss) == "sum" else 1.0)


def _reduction(loss: Any) -> Optional[str]:
    """The ``reduction`` of a loss module, or of a plain callable (held by the distiller in a wrapper's ``fn``)."""
    return getattr(loss, "reduction", getattr(getattr(loss, "fn", None), "reduction", None))

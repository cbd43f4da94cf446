"""Any ``nn.Module`` detector cut at two :class:`SplitPoints`: the backbone and the neck.

The model takes ``(images, targets)`` in training and returns a dict of losses. Its HR view is given
(``hr_images``, ``hr_targets``) or built by resizing the images by ``hr_scale`` and scaling ``boxes``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.backbone = nn.Conv2d(3, 4, 3, stride=4, padding=1)
    ...         self.neck = nn.Conv2d(4, 4, 1)
    ...     def forward(self, x, targets=None):
    ...         return {"det": self.neck(self.backbone(x)).mean()}
    >>> a = GenericAdapter(Tiny(), SplitPoints("backbone", "neck"), "student")
    >>> rec = a.student_pass(torch.zeros(2, 3, 32, 32), [{}, {}], keep_neck=True)
    >>> rec.canvas, [lv.stride for lv in a.levels("neck", rec.neck, rec.canvas)], sorted(rec.losses)
    ((32, 32), [4], ['det'])
"""
from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import validate
from ..errors import InputError, SplitPointError
from ..paths import get_module
from ..recording import Feats, Recorder, StopForward, bn_stats_frozen, canvas_of
from .base import Adapter, HRView, LevelSize, PassRecord, Replay, SplitPoints, Targets, copy_targets, frozen_run


class GenericAdapter(Adapter):
    """A detector cut at its :class:`SplitPoints` (the backbone's and the neck's module paths).

    Args:
        model: the detector; in training ``model(images, targets)`` returns a dict of losses.
        split_points: where to cut it.
        role: how the model is named in messages.
    """

    family = "custom model"

    def __init__(self, model: nn.Module, split_points: SplitPoints, role: str):
        super().__init__(model, role)
        if not isinstance(split_points, SplitPoints):
            raise SplitPointError(f"expected split points for the {role} as SplitPoints(backbone=..., neck=...), "
                                  f"but got {type(split_points).__name__}: {split_points!r}")
        self.split_points = split_points
        self.backbone = get_module(model, split_points.backbone, f"{role}'s backbone split point")
        self.neck = get_module(model, split_points.neck, f"{role}'s neck split point")

    def where(self, part: str) -> str:
        path = self.split_points.backbone if part == "backbone" else self.split_points.neck
        return f"{self.role}'s {part} split point {path!r}"

    # --- family hooks (overridden by TorchvisionAdapter) ------------------------------------------------
    def _record_family(self, rec: Recorder) -> None:
        """Extra recording a family needs in every pass (torchvision: its transform's output)."""

    def _sizes(self, rec: Recorder, canvas: Tuple[int, int], n: int) -> List[Tuple[int, int]]:
        """Each image's content size: a custom model's images fill the whole canvas its backbone received."""
        return [canvas] * n

    def _targets(self, rec: Recorder, given: Optional[Targets]) -> Optional[Targets]:
        return given

    def _state(self, rec: Recorder, inputs: Tuple[Any, ...]) -> Any:
        return inputs

    # --- checks -----------------------------------------------------------------------------------------
    def check_images(self, images: Any, n: int, where: str) -> None:
        validate.check_images(images, n, where, False)
        listed = images if isinstance(images, (list, tuple)) else ()
        sizes = {tuple(x.shape[-2:]) for x in listed if isinstance(x, Tensor)}
        if len(sizes) > 1:  # each image is taken to fill the canvas its backbone receives: one size per batch
            raise InputError(f"expected the {where} of a {self.family} batch to share one size (the {self.role} gets "
                             f"the batch as given, and each image is taken to fill the whole canvas), but got sizes "
                             f"{sorted(sizes)}; resize or pad them to one size, boxes in that frame, or stack them "
                             f"into an N x C x H x W tensor")

    def check_targets(self, targets: Any, where: str) -> None:
        validate.check_targets(targets, where, False)

    # --- passes -----------------------------------------------------------------------------------------
    def student_pass(self, images: Any, targets: Targets, keep_neck: bool) -> PassRecord:
        with Recorder() as rec:
            # The model gets a copy: an in-place op after the split point must not change what the bridge reads.
            rec.output_of(self.backbone, "backbone", self.where("backbone"), copy=True, canvas=True)
            rec.output_of(self.neck, "neck", self.where("neck"), keep=keep_neck)
            self._record_family(rec)
            losses = self.model(images, targets)
        if "backbone" not in rec.feats:
            raise SplitPointError(f"the {self.where('backbone')} was never reached in the {self.role}'s forward")
        if keep_neck and "neck" not in rec.feats:
            raise SplitPointError(f"the {self.where('neck')} was never reached in the {self.role}'s forward")
        if not isinstance(losses, Mapping):
            raise InputError(f"expected the {self.role} to return a dict of losses in training mode, "
                             f"but it returned {type(losses).__name__}")
        canvas, backbone = rec.canvas["backbone"], rec.feats["backbone"]
        return PassRecord(canvas=canvas, sizes=self._sizes(rec, canvas, backbone.batch),
                          targets=self._targets(rec, targets), backbone=backbone, neck=rec.feats.get("neck"),
                          losses=losses, state=self._state(rec, (images,)))

    def hr_view(self, images: Any, targets: Targets, hr_images: Any, hr_targets: Optional[Targets],
                lr: PassRecord, *, hr_source: str, hr_scale: Optional[float]) -> HRView:
        if hr_images is None:
            hr_images, hr_targets = scaled_view(images, targets, hr_scale)
        return HRView(inputs=(hr_images,), targets=hr_targets)

    def teacher_pass(self, view: HRView, crop: Optional[Callable] = None) -> PassRecord:
        with frozen_run(self.model, self.backbone), Recorder() as rec:
            if crop is not None:  # bridge_crop: the teacher (and later the bridge) sees a window of the HR canvas
                view = self._cropped(rec, view, crop)
            rec.output_of(self.backbone, "backbone", self.where("backbone"), canvas=True)
            rec.output_of(self.neck, "neck", self.where("neck"), stop=True)
            self._record_family(rec)
            try:
                self.model(*view.inputs)
            except StopForward:
                pass
        if "neck" not in rec.feats:
            raise SplitPointError(f"the {self.where('neck')} was never reached in its forward")
        canvas, neck = rec.canvas["backbone"], rec.feats["neck"]
        # Per level, not per stride: MobileNetV3 backbones return two levels at stride 32. Sizes only: holding
        # the teacher's HR backbone maps through the bridge pass would cost memory.
        levels = [LevelSize(lv.key, lv.stride, tuple(lv.tensor.shape[-2:]))
                  for lv in self.levels("backbone", rec.feats["backbone"], canvas)]
        return PassRecord(canvas=canvas, sizes=self._sizes(rec, canvas, neck.batch),
                          targets=self._targets(rec, view.targets), backbone_levels=levels, neck=neck,
                          state=self._state(rec, view.inputs))

    def _cropped(self, rec: Recorder, view: HRView, crop: Callable) -> HRView:
        """The HR view on the window ``crop`` draws: a custom model's HR images are its canvas."""
        x = view.inputs[0]
        if isinstance(x, Tensor) and x.dim() == 4:
            cut, _, targets = crop(x, [tuple(x.shape[-2:])] * x.shape[0], view.targets)
            return HRView(inputs=(cut,) + tuple(view.inputs[1:]), targets=targets)
        if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) and t.shape == x[0].shape for t in x):
            cut, _, targets = crop(torch.stack(list(x)), [tuple(x[0].shape[-2:])] * len(x), view.targets)
            return HRView(inputs=(list(cut),) + tuple(view.inputs[1:]), targets=targets)
        got = type(x).__name__ if not isinstance(x, (list, tuple)) else [tuple(t.shape) for t in x]
        raise InputError(f"bridge_crop needs the {self.role}'s HR images as an N x C x H x W tensor or a list of "
                         f"images of one size, but got {got}")

    def bridge_pass(self, images: Any, targets: Targets, hr: PassRecord, replay: Replay,
                    rois: Optional[int] = None) -> Tuple[Mapping[str, Tensor], Feats]:
        def backbone(x: Any, *args: Any, **kwargs: Any) -> Any:
            feats = replay(canvas_of(x, "bridge's backbone stand-in"))
            return feats.rebuild(feats.tensors)

        with Recorder() as rec:
            rec.output_of(self.neck, "neck", self.where("neck"))
            rec.swap(self.model, self.split_points.backbone, backbone)
            rec.enter(bn_stats_frozen(self.model))
            losses = self._run_bridge(rec, images, targets, hr, rois)
        if "neck" not in rec.feats:
            raise SplitPointError(f"the {self.where('neck')} was never reached in the bridge pass")
        return losses, rec.feats["neck"]

    def _run_bridge(self, rec: Recorder, images: Any, targets: Targets, hr: PassRecord,
                    rois: Optional[int]) -> Mapping[str, Tensor]:
        return self.model(hr.state[0], copy_targets(hr.targets))


def scaled_view(images: Any, targets: Targets, hr_scale: Optional[float]) -> Tuple[Any, Targets]:
    """The documented default HR view of a custom model: resize by ``hr_scale``, scale ``boxes``.

    Example:
        >>> import torch
        >>> x, t = scaled_view(torch.zeros(1, 3, 8, 8), [{"boxes": torch.tensor([[1., 2., 3., 4.]])}], 2.0)
        >>> tuple(x.shape), t[0]["boxes"].tolist()
        ((1, 3, 16, 16), [[2.0, 4.0, 6.0, 8.0]])
    """
    if hr_scale is None:
        raise InputError("expected hr_images and hr_targets, or BridgeDistiller(..., hr_scale=...) to build "
                         "them, for a model that is not a torchvision detector; got neither")

    def up(x: Tensor) -> Tensor:
        x4 = x if x.dim() == 4 else x[None]
        y = F.interpolate(x4, scale_factor=hr_scale, mode="bilinear", align_corners=False)
        return y if x.dim() == 4 else y[0]

    if isinstance(images, Tensor):
        hr_images: Any = up(images)
    elif isinstance(images, (list, tuple)):
        hr_images = [up(x) for x in images]
    else:
        raise InputError(f"expected images as a tensor or a list of tensors to build the HR view, "
                         f"but got {type(images).__name__}")
    hr_targets = []
    for t in targets:
        t = dict(t)
        if "boxes" in t:
            t["boxes"] = t["boxes"] * hr_scale
        hr_targets.append(t)
    return hr_images, hr_targets

"""torchvision detectors: RetinaNet, FCOS and the R-CNNs (Faster, Mask, Keypoint).

A family is recognised by the names of the classes in the model's MRO, so user subclasses are recognised too,
and this module never imports torchvision. The detector's own ``transform`` resizes, normalises and batches
the images; its output (an ``ImageList`` and the resized targets) is what the passes record, and the bridge
replays the teacher's in place of the student's.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import validate
from ..context import level_stride
from ..recording import Feats, Recorder, attr_set, hook
from .base import HRView, PassRecord, SplitPoints, Targets, copy_targets
from .generic import GenericAdapter

_TV_SPLIT = SplitPoints(backbone="backbone.body", neck="backbone.fpn")

#: torchvision detector families (matched by class name anywhere in the MRO) and their split points.
#: GeneralizedRCNN covers Faster R-CNN, Mask R-CNN and Keypoint R-CNN.
TORCHVISION_SPLIT_POINTS: Dict[str, SplitPoints] = {
    "RetinaNet": _TV_SPLIT,
    "FCOS": _TV_SPLIT,
    "GeneralizedRCNN": _TV_SPLIT,
}

#: The side of the square probe image that reads off each level's stride and channels at construction.
PROBE_SIZE = 256


def torchvision_family(model: nn.Module) -> Optional[str]:
    """The torchvision detector family of ``model`` ('RetinaNet', 'FCOS', 'GeneralizedRCNN') or None.

    Example:
        >>> from torch import nn
        >>> torchvision_family(nn.Conv2d(3, 3, 1)) is None
        True
    """
    for cls in type(model).__mro__:
        if cls.__name__ in TORCHVISION_SPLIT_POINTS and cls.__module__.startswith("torchvision."):
            return cls.__name__
    return None


class TorchvisionAdapter(GenericAdapter):
    """A torchvision RetinaNet, FCOS or R-CNN: the HR view is the teacher's own transform of the batch.

    Args:
        model: the detector.
        split_points: where to cut it (default: ``backbone.body`` and ``backbone.fpn``).
        role: how the model is named in messages.
    """

    builds_hr_view = True

    def __init__(self, model: nn.Module, split_points: Optional[SplitPoints], role: str):
        family = torchvision_family(model)
        super().__init__(model, split_points or TORCHVISION_SPLIT_POINTS[family or "RetinaNet"], role)
        self.family = family or "torchvision detector"

    # --- what a torchvision pass records besides the split points ---------------------------------------
    def _record_family(self, rec: Recorder) -> None:
        rec.result_of(self.model.transform, "transform")

    def _sizes(self, rec: Recorder, canvas: Tuple[int, int], n: int) -> List[Tuple[int, int]]:
        image_list, _ = rec.seen["transform"]
        return [tuple(int(v) for v in s) for s in image_list.image_sizes]

    def _targets(self, rec: Recorder, given: Optional[Targets]) -> Optional[Targets]:
        return rec.seen["transform"][1]

    def _state(self, rec: Recorder, inputs: Tuple[Any, ...]) -> Any:
        return rec.seen["transform"][0]  # the ImageList: the bridge hands it to the student's head

    # --- checks and passes ------------------------------------------------------------------------------
    def check_images(self, images: Any, n: int, where: str) -> None:
        validate.check_images(images, n, where, True)

    def check_targets(self, targets: Any, where: str) -> None:
        validate.check_targets(targets, where, True)

    def hr_view(self, images: Any, targets: Targets, hr_images: Any, hr_targets: Optional[Targets],
                lr: PassRecord, *, hr_source: str, hr_scale: Optional[float]) -> HRView:
        if hr_images is not None:
            return HRView(inputs=(list(hr_images), hr_targets))
        if hr_source == "teacher":  # the raw images through the teacher's own transform: the real detail
            return HRView(inputs=(images, targets))
        # the paper's HR view: the LR images (as the student saw them) upsampled by the teacher's transform
        lr_raw = [F.interpolate(img[None], size=s, mode="bilinear", align_corners=False)[0]
                  for img, s in zip(images, lr.sizes)]
        return HRView(inputs=(lr_raw, copy_targets(lr.targets)))

    def _cropped(self, rec: Recorder, view: HRView, crop: Callable) -> HRView:
        # The window is cut from the transform's output, the canvas the backbone sees: the teacher's own
        # transform runs first, then a stand-in hands its cropped result to the model (and to the recorder).
        image_list, targets = self.model.transform(*view.inputs)
        cut, sizes, targets = crop(image_list.tensors, [tuple(int(v) for v in s) for s in image_list.image_sizes],
                                   targets)
        cropped = type(image_list)(cut, sizes)
        rec.swap(self.model, "transform", lambda *a, **k: (cropped, copy_targets(targets)))
        return view

    def _run_bridge(self, rec: Recorder, images: Any, targets: Targets, hr: PassRecord,
                    rois: Optional[int]) -> Mapping[str, Tensor]:
        # The teacher's transform output stands in for the student's: HR canvas, HR boxes.
        image_list, hr_targets = hr.state, hr.targets
        rec.swap(self.model, "transform", lambda *a, **k: (image_list, copy_targets(hr_targets)))
        if rois is not None and hasattr(self.model, "roi_heads"):
            rec.enter(attr_set(self.model.roi_heads.fg_bg_sampler, "batch_size_per_image", int(rois)))
        return self.model(images, targets)

    @torch.no_grad()
    def probe(self) -> Tuple[Feats, Tuple[int, int]]:
        """The neck's output on a ``PROBE_SIZE`` square of zeros (in eval mode) and that canvas, with the
        strides of every backbone and neck level read off it (a roomy canvas: no rounding ambiguity)."""
        p = next(self.model.parameters())
        x = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=p.device, dtype=validate.dtype_of(self.model) or p.dtype)
        canvas = (PROBE_SIZE, PROBE_SIZE)

        def on_backbone(mod: nn.Module, inputs: Any, output: Any) -> None:
            feats = Feats(output, f"{self.role}'s backbone probe")
            self.known_strides["backbone"] = {k: level_stride(canvas, t.shape[-2:])
                                              for k, t in zip(feats.keys, feats.tensors)}

        was = self.model.training
        self.model.eval()
        try:
            with hook(self.backbone, on_backbone):
                neck = Feats(self.model.backbone(x), "backbone probe")
        finally:
            self.model.train(was)
        self.known_strides["neck"] = {k: level_stride(canvas, t.shape[-2:]) for k, t in zip(neck.keys, neck.tensors)}
        return neck, canvas

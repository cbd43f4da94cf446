"""What a distillation loss may know about the batch besides the two feature pyramids."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


@dataclass
class DistillContext:
    """Per-step facts handed to every distillation loss as its third argument.

    All coordinates are in high-resolution (teacher) image pixels on the padded canvas,
    whose top-left corner is the top-left corner of every image.

    Attributes:
        boxes: one ``(K_i, 4)`` float tensor of ground-truth boxes per image, ``xyxy``.
        image_sizes: the HR content size ``(h, w)`` of each image (before padding).
        canvas_size: the padded HR canvas ``(H, W)`` the features were computed on.
        strides: the stride of each matched pyramid level, in the order of the feature lists.
        level_names: a readable name of each matched level (for messages and logs).
    """

    boxes: List[Tensor] = field(default_factory=list)
    image_sizes: List[Tuple[int, int]] = field(default_factory=list)
    canvas_size: Tuple[int, int] = (0, 0)
    strides: List[int] = field(default_factory=list)
    level_names: List[str] = field(default_factory=list)

    @classmethod
    def from_features(cls, features: Sequence[Tensor], canvas_size: Tuple[int, int],
                      boxes: Optional[List[Tensor]] = None, strides: Optional[Sequence[int]] = None,
                      ) -> "DistillContext":
        """A context for standalone use of a loss: no boxes unless given, strides from the canvas.

        Example:
            >>> import torch
            >>> feats = [torch.zeros(2, 8, 32, 32), torch.zeros(2, 8, 16, 16)]
            >>> DistillContext.from_features(feats, (256, 256)).strides
            [8, 16]
        """
        n = features[0].shape[0] if len(features) else 0
        if strides is None:
            strides = [level_stride(canvas_size, f.shape[-2:]) for f in features]
        if boxes is None:
            boxes = [torch.zeros(0, 4) for _ in range(n)]
        return cls(boxes=list(boxes), image_sizes=[tuple(canvas_size)] * n, canvas_size=tuple(canvas_size),
                   strides=list(strides), level_names=[f"s{s}" for s in strides])

    def only(self, i: int) -> "DistillContext":
        """The context of level ``i`` alone (to find the level at which a loss is not finite)."""
        return DistillContext(boxes=self.boxes, image_sizes=self.image_sizes, canvas_size=self.canvas_size,
                              strides=[self.strides[i]], level_names=[self.level_names[i]])


def level_stride(canvas_hw: Sequence[int], feat_hw: Sequence[int]) -> int:
    """The stride of a feature map on a canvas, read off the axis with more cells (less rounding)."""
    axis = 0 if feat_hw[0] >= feat_hw[1] else 1
    return stride_of(canvas_hw[axis], feat_hw[axis])


def stride_of(canvas: int, size: int) -> int:
    """The power-of-two stride that maps a canvas side onto a feature side.

    Convolutions round odd sides up, so ``canvas / size`` is not exact for deep levels
    (800 px / 13 cells = 61.5 for P6); the nearest power of two is the stride the network means.
    """
    import math

    if size <= 0:
        raise ValueError(f"feature side must be positive, got {size}")
    return int(2 ** round(math.log2(canvas / size)))

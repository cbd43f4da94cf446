"""YOLO's batch format: images padded to the stride, and targets as YOLO's batch dict and back.

A YOLO model takes one ``N x C x H x W`` tensor whose sides are multiples of its largest stride; its criterion
takes a batch dict (``img``, ``batch_idx``, ``cls``, ``bboxes`` as normalised xywh). lrdet-core's passes take
torchvision-style targets (``boxes`` as xyxy pixels, ``labels``). This module converts between the two and
imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import InputError
from .base import Targets

#: YOLO's letterbox padding value (114 of 255), for the rows and columns added to reach a multiple of the stride.
PAD_VALUE = 114 / 255


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
    xyxy = torch.cat(boxes) if boxes else torch.zeros(0, 4, device=img.device)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=img.device)
    xywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / scale
    labels = [t["labels"].to(img.device) for t in targets]
    return {"img": img,
            "batch_idx": torch.cat([torch.full((len(b),), float(i), device=img.device) for i, b in enumerate(boxes)]
                                   + [torch.zeros(0, device=img.device)]),
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

"""Resample feature maps from the LR canvas onto the HR canvas, image by image.

torchvision pads every batch to a multiple of 32. Interpolating the whole padded LR canvas onto the
padded HR canvas stretches each image by ``H_hr_canvas / H_lr_canvas`` instead of by its own
``h_hr / h_lr``, which moves content by up to 32 HR pixels when aspect ratios are mixed. Here every
output cell is mapped back through its own image's scale, so content lands where it belongs.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .levels import Level, LevelSize

Size = Tuple[int, int]


def resample_to_hr(feat: Tensor, lr_canvas: Size, hr_canvas: Size, out_hw: Size,
                   lr_sizes: Sequence[Size], hr_sizes: Sequence[Size], origin: Size = (0, 0)) -> Tensor:
    """Bilinearly resample ``feat`` (computed on the LR canvas) to ``out_hw`` on the HR canvas.

    A cell's centre at HR pixel ``y_h`` is read from LR pixel ``y_h * h_lr / h_hr`` of the same image,
    in the half-pixel convention of ``align_corners=False``; with equal sizes this is the identity.
    Cells beyond the LR canvas repeat its border.

    Args:
        feat: features of the LR canvas.
        lr_canvas: padded LR canvas ``(H, W)`` in pixels; ``hr_canvas`` likewise.
        out_hw: output feature size.
        lr_sizes, hr_sizes: content size ``(h, w)`` of each image, LR and HR.
        origin: where ``hr_canvas`` starts on the full HR canvas (``bridge_crop``'s window); ``hr_sizes`` are
            then the images' full HR sizes.

    Shape:
        feat ``(N, C, h, w)`` -> ``(N, C, out_h, out_w)``.

    Example:
        >>> x = torch.arange(16.).view(1, 1, 4, 4)
        >>> resample_to_hr(x, (32, 32), (32, 32), (4, 4), [(32, 32)], [(32, 32)]).equal(x)
        True
    """
    n, _, h, w = feat.shape
    oh, ow = out_hw
    if (h, w) == tuple(out_hw) and tuple(lr_canvas) == tuple(hr_canvas) and tuple(origin) == (0, 0) and \
            [tuple(s) for s in lr_sizes] == [tuple(s) for s in hr_sizes]:
        return feat  # same geometry: bilinear sampling at cell centres would only add rounding noise
    # Exact canvas/feature ratios (not rounded strides): cell j covers [j*s, (j+1)*s) pixels.
    s_in_y, s_in_x = lr_canvas[0] / h, lr_canvas[1] / w
    s_out_y, s_out_x = hr_canvas[0] / oh, hr_canvas[1] / ow
    opts = dict(device=feat.device, dtype=torch.float64)
    r = torch.tensor([[l[0] / max(hh[0], 1), l[1] / max(hh[1], 1)] for l, hh in zip(lr_sizes, hr_sizes)], **opts)
    jy = origin[0] + (torch.arange(oh, **opts) + 0.5) * s_out_y  # HR pixel of each output cell centre
    jx = origin[1] + (torch.arange(ow, **opts) + 0.5) * s_out_x
    uy = jy[None, :] * r[:, :1] / s_in_y  # continuous LR cell coordinate, 0 = left edge of cell 0
    ux = jx[None, :] * r[:, 1:] / s_in_x
    gy = (2 * uy / h - 1)[:, :, None].expand(n, oh, ow)  # align_corners=False normalisation
    gx = (2 * ux / w - 1)[:, None, :].expand(n, oh, ow)
    grid = torch.stack([gx, gy], dim=-1).to(feat.dtype)
    return F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)


def bridge_sizes(student: Sequence[Level], teacher: Sequence[LevelSize]) -> List[Optional[Size]]:
    """The HR size of each student backbone level in the bridge: the teacher's backbone level at its stride.

    Chosen per level, not per stride: where several levels share a stride (MobileNetV3), the teacher's level
    of the same name, else the one in the same place among that stride's levels. ``None`` where the teacher
    has no backbone level at that stride.

    Example:
        >>> import torch
        >>> s = [Level("0", 8, torch.zeros(1, 1, 4, 4)), Level("1", 16, torch.zeros(1, 1, 2, 2))]
        >>> bridge_sizes(s, [LevelSize("a", 8, (8, 8))])
        [(8, 8), None]
    """
    at: Dict[int, List[LevelSize]] = {}
    for lv in teacher:
        at.setdefault(lv.stride, []).append(lv)
    seen: Dict[int, int] = {}
    sizes: List[Optional[Size]] = []
    for lv in student:
        i = seen[lv.stride] = seen.get(lv.stride, -1) + 1
        cands = at.get(lv.stride, [])
        same = [c for c in cands if c.key == lv.key]
        pick = same[0] if same else (cands[min(i, len(cands) - 1)] if cands else None)
        sizes.append(None if pick is None else tuple(pick.size))
    return sizes


def resample_levels(levels: Sequence[Level], sizes: Sequence[Optional[Size]], lr_canvas: Size, hr_canvas: Size,
                    lr_sizes: Sequence[Size], hr_sizes: Sequence[Size], origin: Size = (0, 0)) -> List[Tensor]:
    """Each LR level resampled onto the HR canvas at its size (``None``: the LR level's scale, rounded up).

    The result never is a recorded tensor itself: an in-place op downstream would rewrite it (and a tensor
    autograd saved in the LR pass), so same-geometry levels come back as copies.
    """
    out = []
    for lv, size in zip(levels, sizes):
        t = lv.tensor
        if size is None:
            s_lr = lr_canvas[0] / t.shape[-2], lr_canvas[1] / t.shape[-1]
            size = (math.ceil(hr_canvas[0] / s_lr[0] - 1e-6), math.ceil(hr_canvas[1] / s_lr[1] - 1e-6))
        r = resample_to_hr(t, lr_canvas, hr_canvas, size, lr_sizes, hr_sizes, origin)
        out.append(r.clone() if r is t else r)
    return out


def upsample_to_teacher(student: Sequence[Level], teacher: Sequence[Level], level_map: Dict[str, str],
                        lr_canvas: Size, hr_canvas: Size, lr_sizes: Sequence[Size], hr_sizes: Sequence[Size]
                        ) -> List[Tensor]:
    """Table 1's conventional alignment (no bridge): each LR neck level resampled onto the grid of its teacher
    level (the one ``level_map`` names, else the first at its stride; none: the LR level's own size)."""
    by_key = {lv.key: lv for lv in teacher}
    at = {lv.stride: lv for lv in reversed(list(teacher))}  # the first level at each stride
    out = []
    for lv in student:
        target = by_key.get(level_map[lv.key]) if lv.key in level_map else at.get(lv.stride)
        size = tuple(target.tensor.shape[-2:]) if target is not None else tuple(lv.tensor.shape[-2:])
        out.append(resample_to_hr(lv.tensor, lr_canvas, hr_canvas, size, lr_sizes, hr_sizes))
    return out

"""FGD's foreground and background masks: which feature cells lie in a ground-truth box, weighted by its
area, and which in none (eq. 3-4 of the FGD paper), for one level or a whole pyramid at once."""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lrdet_core.errors import LossError


def fgd_masks(boxes: Sequence[Tensor], canvas_size: Tuple[int, int], stride: float,
              feat_hw: Tuple[int, int], device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    r"""Foreground and background masks of one pyramid level.

    A box ``(x1, y1, x2, y2)`` in canvas pixels spans the cells
    ``[floor(y1/s), ceil(y2/s)] x [floor(x1/s), ceil(x2/s)]`` (both ends included: the ``+1``
    cell convention of the FGD authors' code) and weighs ``1 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))``,
    so a small box weighs as much as a large one. As in the authors' code that count is taken
    *before* any clamping: a box touching the right or bottom edge (``ceil(x2/s) = W``) or running
    past it still counts the cells beyond the grid; only the cells inside the grid are then filled,
    each with ``max(current, weight)``. The background mask spreads 1 uniformly over the cells no
    box touches; an image without background cells gets an all-zero background mask.

    Box rules: boxes are not clipped (a clipped box would get another weight). Boxes that are
    inverted (``x2 < x1`` or ``y2 < y1``), have a non-finite coordinate, or lie entirely outside
    the canvas are ignored. A zero-width or zero-height box is kept and covers the one or two
    cells its edge touches.

    Differences from the authors' ``FeatureLoss`` (``mmdet/distillation/losses/fgd.py``), on
    purpose: they scale boxes by ``W / img_shape[1]`` (the unpadded image) where this uses the
    level's stride on the padded canvas (the two agree when the image fills the canvas); their
    mask slice indexes rows with the ``w`` range and columns with the ``h`` range (transposed),
    and a negative start index wraps around; here rows are ``h`` and a box past the left or top
    edge follows the same count rule as on the other sides. Box arithmetic is float64 here,
    float32 there, which can move a coordinate within ~1e-7 of a cell edge.

    Args:
        boxes: one ``(K_i, 4)`` ``xyxy`` tensor per image, in canvas (HR) pixels; ``K_i`` may be 0.
        canvas_size: the padded canvas ``(H, W)`` in pixels.
        stride: the level's stride in pixels.
        feat_hw: the level's ``(H, W)`` in cells.
        device: where to build the masks (default: the boxes' device).

    Shape:
        - output: two fp32 :math:`(N, H, W)` tensors ``(fg, bg)``.

    Example:
        >>> fg, bg = fgd_masks([torch.tensor([[0.0, 0.0, 8.0, 8.0]])], (32, 32), 8, (4, 4))
        >>> fg[0]
        tensor([[0.2500, 0.2500, 0.0000, 0.0000],
                [0.2500, 0.2500, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000, 0.0000]])
        >>> bg.sum().item()
        1.0

    Reference:
        Yang et al., "Focal and global knowledge distillation for detectors", CVPR 2022, Eq. (2)-(3).
    """
    (fg, bg), = fgd_masks_levels(boxes, canvas_size, [stride], [feat_hw], device=device)
    return fg, bg


def fgd_masks_levels(boxes: Sequence[Tensor], canvas_size: Tuple[int, int], strides: Sequence[float],
                     feat_hws: Sequence[Tuple[int, int]], device: Optional[torch.device] = None,
                     ) -> List[Tuple[Tensor, Tensor]]:
    r"""The masks of :func:`fgd_masks` for every level at once, one ``(fg, bg)`` pair per level.

    Same rules, one vectorised computation: the cells of all levels go in one flat grid, each
    cell tagged with its level, row and column, and every box is tested against every cell of
    that grid (a per-level loop cost ~60 small kernel launches per level on a GPU).

    Args:
        boxes: one ``(K_i, 4)`` ``xyxy`` tensor per image, in canvas (HR) pixels; ``K_i`` may be 0.
        canvas_size: the padded canvas ``(H, W)`` in pixels.
        strides: each level's stride in pixels.
        feat_hws: each level's ``(H, W)`` in cells, same length as ``strides``.
        device: where to build the masks (default: the boxes' device).

    Shape:
        - output: per level, two fp32 :math:`(N, H_l, W_l)` tensors ``(fg, bg)``.

    Example:
        >>> masks = fgd_masks_levels([torch.tensor([[0.0, 0.0, 8.0, 8.0]])], (32, 32), [8, 16], [(4, 4), (2, 2)])
        >>> masks[1][0][0]
        tensor([[0.2500, 0.2500],
                [0.2500, 0.2500]])
    """
    if len(strides) != len(feat_hws):
        raise LossError(f"expected one stride per level ({len(feat_hws)} levels), but got {list(strides)}")
    n = len(boxes)
    hws = [(int(h), int(w)) for h, w in feat_hws]
    sizes = [h * w for h, w in hws]
    canvas_h, canvas_w = float(canvas_size[0]), float(canvas_size[1])
    if device is None:
        device = boxes[0].device if n else torch.device("cpu")
    k = max((int(b.shape[0]) for b in boxes), default=0)
    packed, lengths = _cell_tables(tuple(hws))
    # One host-to-device copy for all seven tables (split below into views).
    row_level, row_pos, col_level, col_pos, cell_row, cell_col, cell_level = packed.to(device).split(lengths)
    if k:
        # float64 box arithmetic: floor/ceil at exact cell edges must not depend on fp32 rounding.
        padded = torch.full((n * k, 4), float("nan"), dtype=torch.float64, device=device)
        # One scatter for all images (a copy per image was two kernel launches per image on a GPU).
        slots = [i * k + j for i, b in enumerate(boxes) for j in range(int(b.shape[0]))]
        flat = torch.cat([b.detach().reshape(-1, 4) for b in boxes]).to(device=device, dtype=torch.float64)
        padded[torch.tensor(slots, dtype=torch.long).to(device)] = flat
        padded = padded.reshape(n, k, 4)
        x1, y1, x2, y2 = padded.unbind(dim=-1)
        valid = (torch.isfinite(padded).all(dim=-1) & (x2 >= x1) & (y2 >= y1)
                 & (x1 <= canvas_w) & (y1 <= canvas_h) & (x2 >= 0) & (y2 >= 0))
        padded = torch.where(valid[..., None], padded, 0.0)  # keeps NaN/inf out of the weight
        # Cell ranges of every box on every level (N x K x 2 x L, axis 2 = x, y) and the weight
        # before any clamping (the authors' rule): the cover test below only fills the cells that exist.
        scaled = padded[..., None] / torch.tensor([float(s) for s in strides], dtype=torch.float64, device=device)
        lo, hi = torch.floor(scaled[:, :, :2]), torch.ceil(scaled[:, :, 2:])  # (wmin, hmin), (wmax, hmax)
        value = torch.where(valid[..., None], 1.0 / (hi + 1 - lo).prod(dim=2), 0.0).float()  # N x K x L
        # Rows and columns of all levels side by side (N x K x sum H, N x K x sum W), each
        # tested against its own level's range; a cell is covered when its row and column are.
        in_rows = (row_pos >= lo[:, :, 1, row_level]) & (row_pos <= hi[:, :, 1, row_level])
        in_cols = (col_pos >= lo[:, :, 0, col_level]) & (col_pos <= hi[:, :, 0, col_level])
        cover = in_rows[..., cell_row] & in_cols[..., cell_col]  # N x K x sum HW
        fg = torch.where(cover, value[..., cell_level], 0.0).amax(dim=1)
    else:
        fg = torch.zeros(n, int(sum(sizes)), device=device)
    empty = (fg == 0).float()
    # Background cells counted per image and level.
    count = torch.zeros(n, len(sizes), device=device).index_add_(1, cell_level, empty)
    bg = empty / count[:, cell_level].clamp_min(1)
    return [(f.reshape(n, h, w), b.reshape(n, h, w))
            for f, b, (h, w) in zip(fg.split(sizes, dim=1), bg.split(sizes, dim=1), hws)]


@functools.lru_cache(maxsize=32)
def _cell_tables(hws: Tuple[Tuple[int, int], ...]) -> Tuple[Tensor, Tuple[int, ...]]:
    """Host index tables of a pyramid's flat grids, packed in one int64 tensor, and their lengths.

    In order: the rows of all levels side by side (each row's level, its position in its level),
    the same for columns, and per cell (levels one after the other, row-major) its index into
    those rows and columns and its level.
    """
    # Plain Python: built once per pyramid (cached) without a torch op; one tensor at the end.
    row_level = [lvl for lvl, (h, _) in enumerate(hws) for _ in range(h)]
    row_pos = [r for h, _ in hws for r in range(h)]
    col_level = [lvl for lvl, (_, w) in enumerate(hws) for _ in range(w)]
    col_pos = [c for _, w in hws for c in range(w)]
    row_start = [sum(h for h, _ in hws[:lvl]) for lvl in range(len(hws))]
    col_start = [sum(w for _, w in hws[:lvl]) for lvl in range(len(hws))]
    cell_row = [r0 + r for r0, (h, w) in zip(row_start, hws) for r in range(h) for _ in range(w)]
    cell_col = [c0 + c for c0, (h, w) in zip(col_start, hws) for _ in range(h) for c in range(w)]
    cell_level = [lvl for lvl, (h, w) in enumerate(hws) for _ in range(h * w)]
    tables = (row_level, row_pos, col_level, col_pos, cell_row, cell_col, cell_level)
    return torch.tensor([i for t in tables for i in t], dtype=torch.long), tuple(len(t) for t in tables)

"""Slow float64 references for the distillation losses, written loop by loop from the equations.

Nothing here is vectorised on purpose: every sum is a Python loop over ``n``, ``c``, cells or
boxes, every exp/log a :mod:`math` call on a Python float. The library's losses (eager, compiled
and Triton) are checked against these functions, so they must stay obviously correct rather
than fast: use small shapes (``C <= 8``, ``H * W <= 300``).

All functions take tensors of any float dtype, read them as float64 and return a Python float
(or a float64 tensor for maps). They never call the library's own loss code; the FGD reference
only reads the weights of the library's ``GcBlock`` modules.

Conventions shared with :mod:`lrdet_core.losses` (the spec in issue 3):

* ``student`` first, ``teacher`` second; every input is ``N x C x H x W``.
* CWD: ``tau**2 / (N * C) * sum_{n,c} KL(softmax_hw(T / tau) || softmax_hw(S / tau))``.
* FGD masks (the FGD authors' rule): a box is mapped to the grid of a level with that level's
  stride on the padded canvas; ``wmin = floor(x1 / stride)``, ``wmax = ceil(x2 / stride)``
  (same for ``h`` with ``y``), *not* clamped, and its weight is
  ``1 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))``, which counts cells past the grid for a box
  that touches or crosses the right or bottom edge. Then each cell of
  ``[hmin, hmax] x [wmin, wmax]`` (both ends included) that lies inside the grid gets
  ``max(current, weight)``. Boxes that are inverted (``x2 < x1`` or ``y2 < y1``), not finite,
  or entirely outside the canvas are ignored; the others are not clipped.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(device="cpu", dtype=torch.float64)


def ref_mse(student: Tensor, teacher: Tensor, reduction: str = "sum") -> float:
    """``sum((s - t)**2)`` (or its mean over all elements), one element at a time."""
    s, t = _f64(student).flatten().tolist(), _f64(teacher).flatten().tolist()
    total = 0.0
    for a, b in zip(s, t):
        total += (a - b) ** 2
    return total / len(s) if reduction == "mean" else total


def ref_l1(student: Tensor, teacher: Tensor, reduction: str = "sum") -> float:
    """``sum(|s - t|)`` (or its mean over all elements), one element at a time."""
    s, t = _f64(student).flatten().tolist(), _f64(teacher).flatten().tolist()
    total = 0.0
    for a, b in zip(s, t):
        total += abs(a - b)
    return total / len(s) if reduction == "mean" else total


def _log_softmax(values: List[float]) -> List[float]:
    # Subtracting the max keeps exp() in range, so the reference is itself finite for 1e4 logits.
    m = max(values)
    lse = m + math.log(sum(math.exp(v - m) for v in values))
    return [v - lse for v in values]


def ref_cwd(student: Tensor, teacher: Tensor, tau: float = 1.0) -> float:
    """Channel-wise distillation of one level (Shu et al., 2021), without the loss weight."""
    s, t = _f64(student), _f64(teacher)
    n_, c_ = s.shape[0], s.shape[1]
    total = 0.0
    for n in range(n_):
        for c in range(c_):
            ls = _log_softmax([v / tau for v in s[n, c].flatten().tolist()])
            lt = _log_softmax([v / tau for v in t[n, c].flatten().tolist()])
            for a, b in zip(ls, lt):
                total += math.exp(b) * (b - a)
    return tau ** 2 / (n_ * c_) * total


# --------------------------------------------------------------------------------------- FGD


def ref_fgd_masks(boxes: Sequence[Tensor], canvas_size: Tuple[int, int], stride: float,
                  feat_hw: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """Foreground and background masks ``(N x H x W)`` of one level, one box at a time."""
    canvas_h, canvas_w = canvas_size
    h_, w_ = feat_hw
    fgs, bgs = [], []
    for img_boxes in boxes:
        fg = [[0.0] * w_ for _ in range(h_)]
        for x1, y1, x2, y2 in _f64(img_boxes).reshape(-1, 4).tolist():
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                continue
            if x2 < x1 or y2 < y1:
                continue
            if x1 > canvas_w or y1 > canvas_h or x2 < 0 or y2 < 0:
                continue
            wmin, wmax = math.floor(x1 / stride), math.ceil(x2 / stride)
            hmin, hmax = math.floor(y1 / stride), math.ceil(y2 / stride)
            area = 1.0 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))  # cells past the grid count too
            for i in range(hmin, hmax + 1):
                for j in range(wmin, wmax + 1):
                    if 0 <= i < h_ and 0 <= j < w_:
                        fg[i][j] = max(fg[i][j], area)
        empty = sum(1 for row in fg for v in row if v == 0.0)
        bg = [[(1.0 / empty if v == 0.0 else 0.0) for v in row] for row in fg]
        fgs.append(fg)
        bgs.append(bg)
    as_t = lambda m: torch.tensor(m, dtype=torch.float64).reshape(len(boxes), h_, w_)  # noqa: E731
    return as_t(fgs), as_t(bgs)


def ref_spatial_attention(x: Tensor, temp: float) -> List[List[float]]:
    """``H * W * softmax_hw(mean_c |x| / temp)`` as nested lists ``[n][h * W + w]``."""
    x = _f64(x)
    n_, c_, h_, w_ = x.shape
    out = []
    for n in range(n_):
        means = []
        for i in range(h_):
            for j in range(w_):
                means.append(sum(abs(x[n, c, i, j].item()) for c in range(c_)) / c_ / temp)
        out.append([h_ * w_ * math.exp(v) for v in _log_softmax(means)])
    return out


def ref_channel_attention(x: Tensor, temp: float) -> List[List[float]]:
    """``C * softmax_c(mean_hw |x| / temp)`` as nested lists ``[n][c]``."""
    x = _f64(x)
    n_, c_, h_, w_ = x.shape
    out = []
    for n in range(n_):
        means = [sum(abs(v) for v in x[n, c].flatten().tolist()) / (h_ * w_) / temp for c in range(c_)]
        out.append([c_ * math.exp(v) for v in _log_softmax(means)])
    return out


def ref_gcblock(x: Tensor, block: torch.nn.Module) -> List[List[float]]:
    """The GcBlock term ``G(x)`` (``N x C``, added to every cell) from the block's own weights.

    Context: ``softmax_hw(w_k . x[:, hw] + b_k)`` weights a sum of ``x`` over cells; transform:
    ``conv C -> C/2``, ``LayerNorm([C/2, 1, 1])``, ReLU, ``conv C/2 -> C``.
    """
    x = _f64(x)
    n_, c_, h_, w_ = x.shape
    wk = _f64(block.conv_mask.weight).reshape(c_).tolist()
    bk = _f64(block.conv_mask.bias).item()
    conv1, norm, _, conv2 = block.channel_add
    w1, b1 = _f64(conv1.weight).reshape(-1, c_).tolist(), _f64(conv1.bias).tolist()
    gw, gb = _f64(norm.weight).flatten().tolist(), _f64(norm.bias).flatten().tolist()
    w2, b2 = _f64(conv2.weight).reshape(c_, -1).tolist(), _f64(conv2.bias).tolist()
    out = []
    for n in range(n_):
        cells = [(i, j) for i in range(h_) for j in range(w_)]
        logits = [sum(wk[c] * x[n, c, i, j].item() for c in range(c_)) + bk for i, j in cells]
        weights = [math.exp(v) for v in _log_softmax(logits)]
        context = [sum(weights[k] * x[n, c, i, j].item() for k, (i, j) in enumerate(cells))
                   for c in range(c_)]
        hidden = [sum(w1[o][c] * context[c] for c in range(c_)) + b1[o] for o in range(len(b1))]
        mean = sum(hidden) / len(hidden)
        var = sum((v - mean) ** 2 for v in hidden) / len(hidden)
        hidden = [(v - mean) / math.sqrt(var + norm.eps) * gw[o] + gb[o] for o, v in enumerate(hidden)]
        hidden = [max(v, 0.0) for v in hidden]
        out.append([sum(w2[c][o] * hidden[o] for o in range(len(hidden))) + b2[c] for c in range(c_)])
    return out


def ref_fgd_terms(student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor,
                  gc_student: torch.nn.Module, gc_teacher: torch.nn.Module, temp: float,
                  ) -> Dict[str, float]:
    """The four unweighted FGD terms of one level: ``fg``, ``bg``, ``att`` and ``glb``."""
    s, t = _f64(student), _f64(teacher)
    fg, bg = _f64(fg_mask), _f64(bg_mask)
    n_, c_, h_, w_ = s.shape
    as_t, ac_t = ref_spatial_attention(t, temp), ref_channel_attention(t, temp)
    as_s, ac_s = ref_spatial_attention(s, temp), ref_channel_attention(s, temp)
    g_s, g_t = ref_gcblock(s, gc_student), ref_gcblock(t, gc_teacher)
    l_fg = l_bg = l_att = l_glb = 0.0
    for n in range(n_):
        for c in range(c_):
            for i in range(h_):
                for j in range(w_):
                    a, b = s[n, c, i, j].item(), t[n, c, i, j].item()
                    focal = as_t[n][i * w_ + j] * ac_t[n][c] * (a - b) ** 2
                    l_fg += fg[n, i, j].item() * focal
                    l_bg += bg[n, i, j].item() * focal
                    l_glb += (a + g_s[n][c] - b - g_t[n][c]) ** 2
        l_att += sum(abs(p - q) for p, q in zip(ac_s[n], ac_t[n]))
        l_att += sum(abs(p - q) for p, q in zip(as_s[n], as_t[n]))
    return {"fg": l_fg / n_, "bg": l_bg / n_, "att": l_att / n_, "glb": l_glb / n_}


def ref_fgd(student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor,
            gc_student: torch.nn.Module, gc_teacher: torch.nn.Module, temp: float,
            alpha: float, beta: float, gamma: float, lam: float) -> float:
    """``alpha * L_fg + beta * L_bg + gamma * L_att + lam * L_glb`` of one level."""
    terms = ref_fgd_terms(student, teacher, fg_mask, bg_mask, gc_student, gc_teacher, temp)
    return alpha * terms["fg"] + beta * terms["bg"] + gamma * terms["att"] + lam * terms["glb"]

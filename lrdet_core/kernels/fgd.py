"""Fused focal and attention terms of FGD (Yang et al., 2022), all pyramid levels in each launch.

Math, with ``N x C x H x W`` student ``S``, teacher ``T`` and ``N x H x W`` masks::

    A_S(x) = H W * softmax_hw(mean_c |x| / temp)        (N x H x W, spatial attention)
    A_C(x) = C   * softmax_c (mean_hw |x| / temp)       (N x C,     channel attention)
    L_fg   = sum M_fg * A_S(T) * A_C(T) * (S - T)^2 / N
    L_bg   = sum M_bg * A_S(T) * A_C(T) * (S - T)^2 / N
    L_att  = sum |A_C(S) - A_C(T)| / N + sum |A_S(S) - A_S(T)| / N

The teacher is a constant (no gradient, including through its attention maps, which only
weight the focal terms). The student's gradient of ``L_att`` flows through ``A_S(S)`` and
``A_C(S)``: per element it is ``sign(S) * (ga[n, hw] + gb[n, c])`` with per-pixel ``ga`` and
per-channel ``gb`` from the softmax Jacobians. The masks get no gradient.

Passes, each in a module of its own (:mod:`._fgd_forward`, :mod:`._fgd_combine`, :mod:`._fgd_backward`;
this module launches them). Each is one launch for all levels (per group of :data:`~._common.MAX_LEVELS`, and in
forward per channel tile): programs are laid out level after level and a slot table (one
pointer/size/offset set per level, built by :func:`._common.launch_levels`) tells a program its
level (:func:`._common.level_slot`); the small side buffers hold the levels one after the other.

1. ``_fgd_forward_kernel`` reads S and T **once**. A program owns about :data:`FWD_PIXELS` pixels
   of one image with all their channels, so the per-pixel sums ``sum_c |x|`` (hence the teacher's
   spatial logits ``a_T``) are complete in registers. The focal sums need ``A_S(T)``, a softmax
   over *all* pixels, which no program knows; but it factors into ``e^(a_T(p) - m) / z``, so
   each program sums ``M(p) e^(a_T(p) - m) (S - T)^2`` per channel with its own running maximum
   ``m`` (rescaling as it goes, as a streaming softmax does) and writes those sums, the channel
   sums of ``|S|`` and ``|T|`` and ``m``: ``O(N C HW / FWD_PIXELS)`` floats.
2. ``_fgd_combine_kernel``, one program per (level, image), reads only those side buffers: the
   four attention maps, ``L_fg``, ``L_bg`` (each program's sums brought to the image's maximum)
   and ``L_att``, and the per-pixel and per-channel factors of ``L_att``'s gradient. A fixed-order
   ``torch.sum`` over its rows gives the three terms.
3. Backward: ``_fgd_backward_kernel`` reads S and T and writes the whole gradient
   ``d(go_fg w_fg L_fg + go_bg w_bg L_bg + go_att w_att L_att)/dS`` from per-pixel and
   per-channel factors that already carry the three ``grad_output`` values (device tensors:
   no host sync). Nothing of the features' size is stored between the passes, and the
   gradient is rounded to the student's dtype once, after ``grad_output`` is applied.

Bytes moved (per element): forward **2** element accesses (S and T once), backward **3** (read S
and T, write the gradient): **5** in all. The side buffers are ``O(N (HW + 4 C HW / FWD_PIXELS))``
floats: written and read back (the combine reads the per-pixel sums three times), with the masks
and backward's per-pixel factors, ~150 bytes per pixel, about 6 % on top of the
features' 2,560 bytes per pixel (fwd + bwd) at C = 256 in bf16.

Layouts: contiguous NCHW and channels_last are indexed without a copy (``CL`` flag, one per
launch); anything else, a student and teacher in different layouts, or a channels_last level in
a pyramid with NCHW levels, falls back to ``.contiguous()``.
Student and teacher dtypes may differ (converted in registers).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
from torch import Tensor

from ..errors import LossError
from ._common import (MAX_LEVELS, TRITON_DTYPE, Slot, check_level_lists, check_once, check_pair, launch_levels,
                      nchw_layout)
from ._fgd_backward import _fgd_backward_kernel
from ._fgd_combine import _fgd_combine_kernel
from ._fgd_forward import _fgd_forward_kernel

#: Tile (channels, pixels) of the backward pass by layout: 2048 elements over 8 warps, longer along
#: the unit-stride axis. A 32 x 128 tile needed 143-194 registers per thread under ptxas (one block
#: per SM); 16 x 128 under channels_last spilled on sm80 for bf16.
TILES = {False: (16, 128), True: (32, 64)}
#: Forward pass: a program owns about FWD_PIXELS pixels of one image and walks them in sub-blocks
#: of ``FWD_TILE[CL] // BLOCK_C`` pixels x all channels (``BLOCK_C``: C rounded up to a power of
#: two), so every per-pixel sum over C is complete in registers. NCHW sub-blocks are 16 pixels
#: wide at C = 256 (one 32-byte sector per channel row in bf16); channels_last rows are contiguous.
FWD_TILE = {False: 4096, True: 2048}
FWD_PIXELS = 128
#: The forward tile holds all channels of a pixel; wider features go to the eager backend.
MAX_CHANNELS = 4096
NUM_WARPS = 8
#: Pixels per step of the combine kernel's loops, and elements of its (programs x channels) tile.
COMBINE_BLOCK = 4096
COMBINE_TILE = 4096


def combine_tile(channels: int) -> dict:
    """Constexprs of the combine kernel for pyramids of at most ``channels`` channels."""
    block_c = triton.next_power_of_2(channels)
    return {"BLOCK_C": block_c, "BLOCK_P": COMBINE_BLOCK, "BLOCK_K": max(1, COMBINE_TILE // block_c)}


def forward_tile(channels: int, channels_last: bool) -> Tuple[int, int, int]:
    """``(BLOCK_C, SUB_HW, SUBS)`` of the forward pass for features with ``channels`` channels."""
    block_c = triton.next_power_of_2(channels)
    sub_hw = max(1, FWD_TILE[channels_last] // block_c)
    return block_c, sub_hw, max(1, FWD_PIXELS // sub_hw)



def _check(student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor, temp: float, level: int = 0) -> None:
    check_pair(student, teacher, "fgd_focal_attention_triton", level)
    if student.dim() != 4:
        raise LossError(f"fgd_focal_attention_triton: expected N x C x H x W features at level {level}, "
                        f"got shape {tuple(student.shape)}")
    n, c, h, w = student.shape
    if c > MAX_CHANNELS:
        raise LossError(f"fgd_focal_attention_triton: at most {MAX_CHANNELS} channels fit the kernel's tile, got {c} "
                        f"at level {level}; use backend='torch' for wider features")
    for name, m in (("fg_mask", fg_mask), ("bg_mask", bg_mask)):
        if tuple(m.shape) != (n, h, w):
            raise LossError(f"fgd_focal_attention_triton: {name} is expected to have shape {(n, h, w)} "
                            f"(N x H x W of the features), but got {tuple(m.shape)}")
    if not temp > 0:
        raise LossError(f"fgd_focal_attention_triton: temp must be positive, got {temp}")


def _offsets(sizes: Sequence[int]) -> List[int]:
    """Start of each level's block in a buffer holding the blocks one after the other."""
    out, start = [], 0
    for size in sizes:
        out.append(start)
        start += size
    return out


class FGDFunction(torch.autograd.Function):
    """Autograd wrapper over all levels: forward runs the one-pass forward and the combine kernels
    (one launch each per group of six levels), backward recomputes the gradient of every level in one launch."""

    @staticmethod
    def forward(ctx, temp: float, weights: Tuple[float, float, float], n_levels: int, *tensors: Tensor):
        students, teachers = tensors[:n_levels], tensors[n_levels:2 * n_levels]
        fgs, bgs = tensors[2 * n_levels:3 * n_levels], tensors[3 * n_levels:]
        for i, (s, t, fg, bg) in enumerate(zip(students, teachers, fgs, bgs)):
            _check(s, t, fg, bg, temp, i)
            if s.shape[0] != students[0].shape[0] or s.device != students[0].device:
                raise LossError(f"fgd_focal_attention_triton: every level must hold the same images on one device; "
                                f"level 0 is {tuple(students[0].shape)} on {students[0].device}, level {i} is "
                                f"{tuple(s.shape)} on {s.device}")
        pairs = [nchw_layout(s.detach(), t.detach()) for s, t in zip(students, teachers)]
        # One layout per launch (CL is a constexpr): channels_last levels among NCHW ones are copied.
        cl = all(p[2] for p in pairs)
        pairs = [(s, t) if c == cl else (s.contiguous(), t.contiguous()) for s, t, c in pairs]
        n, dev = pairs[0][0].shape[0], pairs[0][0].device
        cs = [s.shape[1] for s, _ in pairs]
        hws = [s.shape[2] * s.shape[3] for s, _ in pairs]
        w_fg, w_bg, w_att = (float(x) for x in weights)
        # Side buffers hold the levels one after the other: N x HW_l per-pixel blocks, N x C_l
        # per-channel blocks, and the forward programs' [N, nb_l, 4, C_l] channel partials and [N, nb_l] maxima.
        pix_off = _offsets([n * hw for hw in hws])
        ch_off = _offsets([n * c for c in cs])
        fg = torch.cat([m.detach().to(device=dev, dtype=torch.float32).reshape(-1) for m in fgs])
        bg = torch.cat([m.detach().to(device=dev, dtype=torch.float32).reshape(-1) for m in bgs])

        tiles = [forward_tile(c, cl) for c in cs]
        nbs = [triton.cdiv(hw, sub_hw * subs) for hw, (_, sub_hw, subs) in zip(hws, tiles)]
        part_sizes = [n * nb * 4 * c for c, nb in zip(cs, nbs)]
        part_off, m_off = _offsets(part_sizes), _offsets([n * nb for nb in nbs])
        pix_s = torch.empty(n * sum(hws), dtype=torch.float32, device=dev)
        pix_t = torch.empty_like(pix_s)
        ch = torch.empty(sum(part_sizes), dtype=torch.float32, device=dev)
        maxima = torch.empty(n * sum(nbs), dtype=torch.float32, device=dev)
        inv_ct = [1.0 / (c * temp) for c in cs]
        slots = [Slot(n * nb, (s, t), (c, hw, nb), (po, co, mo, ict))
                 for (s, t), c, hw, nb, po, co, mo, ict in zip(pairs, cs, hws, nbs, pix_off, part_off, m_off, inv_ct)]
        # BLOCK_C is a constexpr: levels whose channels round to different powers of two launch apart.
        for tile in sorted(set(tiles)):
            levels = [i for i, x in enumerate(tiles) if x == tile]
            groups = [levels[i:i + MAX_LEVELS] for i in range(0, len(levels), MAX_LEVELS)]
            launch_levels(_fgd_forward_kernel, pairs[0][0], slots, lambda done: (fg, bg, pix_s, pix_t, ch, maxima),
                          groups=groups, BLOCK_C=tile[0], SUB_HW=tile[1], SUBS=tile[2], CL=cl, num_warps=NUM_WARPS)
        # Attention maps, the three terms and the gradient factors of L_att: one program per (level, image).
        as_t, ga = torch.empty_like(pix_s), torch.empty_like(pix_s)
        ac_t = torch.empty(n * sum(cs), dtype=torch.float32, device=dev)
        gb = torch.empty_like(ac_t)
        terms = torch.empty(n_levels * n, 3, dtype=torch.float32, device=dev)
        combine = [Slot(n, (), (c, hw, nb), (po, co, pco, mo, ict, 1.0 / (hw * temp)))
                   for c, hw, nb, po, co, pco, mo, ict in zip(cs, hws, nbs, pix_off, ch_off, part_off, m_off, inv_ct)]
        launch_levels(_fgd_combine_kernel, pairs[0][0], combine,
                      lambda done: (pix_s, pix_t, ch, maxima, as_t, ga, ac_t, gb, terms[done:], 1.0 / n),
                      **combine_tile(max(cs)), num_warps=NUM_WARPS)
        # Fixed-order sum over (level, image); the weights scale the terms and, through ctx, the gradient.
        sums = terms.sum(0)
        l_fg, l_bg, l_att = sums[0] * (w_fg / n), sums[1] * (w_bg / n), sums[2] * (w_att / n)

        block_c, block_hw = TILES[cl]
        programs = [n * triton.cdiv(c, block_c) * triton.cdiv(hw, block_hw) for c, hw in zip(cs, hws)]
        ctx.save_for_backward(as_t, fg, bg, ga, ac_t, gb, *[x for pair in pairs for x in pair])
        ctx.meta = (cl, n, n_levels, (w_fg, w_bg, w_att), programs, pix_off, ch_off)
        return l_fg, l_bg, l_att

    @staticmethod
    def backward(ctx, go_fg: Tensor, go_bg: Tensor, go_att: Tensor):
        check_once(ctx)
        as_t, fg, bg, ga, ac_t, gb, *flat = ctx.saved_tensors
        cl, n, n_levels, (w_fg, w_bg, w_att), programs, pix_off, ch_off = ctx.meta
        pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(n_levels)]
        # Per-pixel and per-channel factors of all levels with the grad_outputs folded in (device ops, no sync).
        go_fg, go_bg, go_att = (x.detach().to(torch.float32) for x in (go_fg, go_bg, go_att))
        f = (2.0 / n) * as_t * ((go_fg * w_fg) * fg + (go_bg * w_bg) * bg)
        scale_att = go_att * w_att
        block_c, block_hw = TILES[cl]
        grads = [torch.empty_like(s) for s, _ in pairs]  # s's layout and dtype
        hws = [s.shape[2] * s.shape[3] for s, _ in pairs]
        slots = [Slot(p, (s, t, g), (s.shape[1], hw, triton.cdiv(hw, block_hw)), (po, co))
                 for p, (s, t), g, hw, po, co in zip(programs, pairs, grads, hws, pix_off, ch_off)]
        head = (f, scale_att * ga, ac_t, scale_att * gb)
        launch_levels(_fgd_backward_kernel, pairs[0][0], slots, lambda done: head,
                      BLOCK_C=block_c, BLOCK_HW=block_hw, CL=cl, num_warps=NUM_WARPS)
        # Teacher, masks, temp and weights get no gradient.
        return (None, None, None, *grads, *([None] * (3 * n_levels)))


def fgd_focal_attention_triton(student: Sequence[Tensor], teacher: Sequence[Tensor], fg_mask: Sequence[Tensor],
                               bg_mask: Sequence[Tensor], temp: float, *, weights: Sequence[float] = (1.0, 1.0, 1.0),
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    """The focal (``L_fg``, ``L_bg``) and attention (``L_att``) terms of FGD, summed over levels.

    Each level keeps its own attention maps and masks; the three returned terms are sums over
    levels. Forward makes one streaming launch, one combine launch and one sum; backward one
    launch (per group of :data:`MAX_LEVELS` levels). A pyramid mixing channels_last and NCHW
    levels has its channels_last levels copied to NCHW (one layout per launch).

    Args:
        student: the student's levels; they receive gradients (also through their attention maps).
        teacher: the teacher's levels, same shapes; constants (no gradient).
        fg_mask: foreground weights per cell, one mask per level (no gradient).
        bg_mask: background weights per cell, one mask per level (no gradient).
        temp: attention temperature (> 0).
        weights: ``(w_fg, w_bg, w_att)`` multiplied into the returned terms (and their gradient).

    Returns:
        ``(w_fg L_fg, w_bg L_bg, w_att L_att)``, three 0-d fp32 tensors.

    Shape:
        per level ``l``: student[l], teacher[l] ``(N, C_l, H_l, W_l)`` (same ``N``), fp32/bf16/fp16 each;
        fg_mask[l], bg_mask[l] ``(N, H_l, W_l)``.
    """
    check_level_lists("fgd_focal_attention_triton", student=student, teacher=teacher, fg_mask=fg_mask,
                      bg_mask=bg_mask)
    if len(weights) != 3:
        raise LossError(f"fgd_focal_attention_triton: weights must be (w_fg, w_bg, w_att), got {weights!r}")
    return FGDFunction.apply(float(temp), tuple(weights), len(student), *student, *teacher, *fg_mask, *bg_mask)


def _slots(sty: str, tty: str, grad: bool, forward: bool = False) -> dict:
    sig = {}
    for i in range(MAX_LEVELS):
        sig.update({f"s{i}": sty, f"t{i}": tty})
        if grad:
            sig[f"g{i}"] = sty
        sig.update({f"{k}{i}": "i32" for k in ("C", "HW", "nb", "e", "po", "co")})
        if forward:
            sig.update({f"mo{i}": "i32", f"ict{i}": "fp32"})
    if forward:
        sig.update({"BLOCK_C": "constexpr", "SUB_HW": "constexpr", "SUBS": "constexpr", "CL": "constexpr"})
    else:
        sig.update({"BLOCK_C": "constexpr", "BLOCK_HW": "constexpr", "CL": "constexpr"})
    return sig


def _specialisations() -> list:
    out = []
    # fp16 compiles to bf16's code up to the convert instructions; the compile test checks bf16 for both.
    for sdt, tdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        sty, tty = f"*{TRITON_DTYPE[sdt]}", f"*{TRITON_DTYPE[tdt]}"
        for cl in (False, True):
            # C = 256 (FPN necks); fp32 also at C = 1024, the widest tile row (most registers per pixel).
            for channels in ((256, 1024) if sdt == torch.float32 else (256,)):
                block_c, sub_hw, subs = forward_tile(channels, cl)
                sig = {k: "*fp32" for k in ("fg_ptr", "bg_ptr", "pix_s_ptr", "pix_t_ptr", "ch_ptr", "m_ptr")}
                sig.update(_slots(sty, tty, grad=False, forward=True))
                out.append(("_fgd_forward_kernel", sig,
                            {"BLOCK_C": block_c, "SUB_HW": sub_hw, "SUBS": subs, "CL": cl}, NUM_WARPS))
            const = {"BLOCK_C": TILES[cl][0], "BLOCK_HW": TILES[cl][1], "CL": cl}
            sig = {k: "*fp32" for k in ("f_ptr", "ga_ptr", "act_ptr", "gb_ptr")}
            sig.update(_slots(sty, tty, grad=True))
            out.append(("_fgd_backward_kernel", sig, const, NUM_WARPS))
    # The combine kernel reads only fp32 side buffers: one variant per channel tile.
    for channels in (256, 1024):
        sig = {k: "*fp32" for k in ("pix_s_ptr", "pix_t_ptr", "ch_ptr", "m_ptr", "as_t_ptr", "ga_ptr", "ac_t_ptr",
                                    "gb_ptr", "out_ptr")}
        sig["inv_n"] = "fp32"
        for i in range(MAX_LEVELS):
            sig.update({f"{k}{i}": "i32" for k in ("C", "HW", "nb", "e", "po", "co", "pco", "mo")})
            sig.update({f"ict{i}": "fp32", f"ihwt{i}": "fp32"})
        sig.update({"BLOCK_C": "constexpr", "BLOCK_P": "constexpr", "BLOCK_K": "constexpr"})
        out.append(("_fgd_combine_kernel", sig, combine_tile(channels), NUM_WARPS))
    return out


#: Every (kernel, signature, constexprs, num_warps) this module launches (see tests/test_kernels_compile.py).
SPECIALISATIONS = tuple(_specialisations())

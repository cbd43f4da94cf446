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

Passes (all streaming ones tiled ``BLOCK_C x BLOCK_HW`` over one sample). Each pass is one
launch for all levels (per group of :data:`~._common.MAX_LEVELS`): programs are laid out level
after level and a slot table (one pointer/size/offset set per level, built by
:func:`._common.launch_levels`) tells a program its level (:func:`._common.level_slot`); the small
side buffers hold the levels one after the other.

1. ``_fgd_stats_kernel`` reads S and T once: per-pixel sums of ``|x|`` over C (complete per
   program) and per-channel partial sums over each pixel block (reduced by ``torch.sum``).
2. Tiny ``N x HW`` / ``N x C`` torch ops per level: the attention maps, ``L_att`` and its
   gradient factors, and the per-pixel factors of the focal terms.
3. ``_fgd_focal_kernel`` reads S and T again and writes per-program partials of ``L_fg`` and
   ``L_bg`` (summed by one launch for both).
4. Backward: ``_fgd_backward_kernel`` reads S and T and writes the whole gradient
   ``d(go_fg w_fg L_fg + go_bg w_bg L_bg + go_att w_att L_att)/dS`` from per-pixel and
   per-channel factors that already carry the three ``grad_output`` values (device tensors:
   no host sync). Nothing of the features' size is stored between the passes, and the
   gradient is rounded to the student's dtype once, after ``grad_output`` is applied.

Bytes moved (minimum, per element): forward **4** element accesses (passes 1 and 3 each read
S and T), backward **3** (read S and T, write the gradient): **7** in all. The per-pixel and
per-channel buffers are ``O(N (HW + C HW / BLOCK_HW))``, about 1-2 % of the features at C=256.

Layouts: contiguous NCHW and channels_last are indexed without a copy (``CL`` flag, one per
launch); anything else, a student and teacher in different layouts, or a channels_last level in
a pyramid with NCHW levels, falls back to ``.contiguous()``.
Student and teacher dtypes may differ (converted in registers).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import LossError
from ._common import (MAX_LEVELS, TRITON_DTYPE, Slot, check_level_lists, check_once, check_pair, launch_levels,
                      level_slot, nchw_layout, split_program, sum_partials)

#: Tile (channels, pixels) of the two streaming passes by layout: 2048 elements over 8 warps,
#: longer along the unit-stride axis. A 32 x 128 tile needed 143-194 registers per thread
#: under ptxas (one block per SM); 16 x 128 under channels_last spilled on sm80 for bf16.
TILES = {False: (16, 128), True: (32, 64)}
#: Stats pass: one program owns BLOCK_HW_STATS pixels and loops over all channels, so its
#: per-pixel sums are complete without a second reduction.
BLOCK_C_STATS = 32
BLOCK_HW_STATS = 64
NUM_WARPS = 8


@triton.jit
def _tile_offsets(n, c, hw, C, HW, CL: tl.constexpr):
    # int64 before any product: N*C*HW can exceed 2**31.
    n = n.to(tl.int64)
    if CL:
        return n * HW * C + hw.to(tl.int64)[None, :] * C + c.to(tl.int64)[:, None]
    else:
        return n * C * HW + c.to(tl.int64)[:, None] * HW + hw.to(tl.int64)[None, :]


#: Per-level integers the JIT does not specialise: program-range ends and side-buffer offsets
#: change with every pyramid and buy no vectorisation (C and HW stay specialised).
NO_SPECIALISE = [f"{n}{i}" for i in range(MAX_LEVELS) for n in ("nb", "e", "po", "co")]


@triton.jit
def _fgd_stats_block(s_ptr, t_ptr, pix_s_ptr, pix_t_ptr, ch_s_ptr, ch_t_ptr, local, C, HW, n_hwb, po, co,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CL: tl.constexpr):
    hb = local % n_hwb
    n = local // n_hwb
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    pix_s = tl.zeros([BLOCK_HW], dtype=tl.float32)
    pix_t = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & hw_mask[None, :]
        offs = _tile_offsets(n, c, hw, C, HW, CL)
        s = tl.abs(tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        t = tl.abs(tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        pix_s += tl.sum(s, axis=0)
        pix_t += tl.sum(t, axis=0)
        # Channel sums over this pixel block only; the level's [N, C, n_hwb] block is summed by
        # torch later (fixed order, no atomics).
        ch_offs = co + (n.to(tl.int64) * C + c) * n_hwb + hb
        tl.store(ch_s_ptr + ch_offs, tl.sum(s, axis=1), mask=c < C)
        tl.store(ch_t_ptr + ch_offs, tl.sum(t, axis=1), mask=c < C)
    pix_offs = po + n.to(tl.int64) * HW + hw
    tl.store(pix_s_ptr + pix_offs, pix_s, mask=hw_mask)
    tl.store(pix_t_ptr + pix_offs, pix_t, mask=hw_mask)


@triton.jit(do_not_specialize=NO_SPECIALISE)
def _fgd_stats_kernel(pix_s_ptr, pix_t_ptr, ch_s_ptr, ch_t_ptr,
                      s0, t0, C0, HW0, nb0, e0, po0, co0,
                      s1, t1, C1, HW1, nb1, e1, po1, co1,
                      s2, t2, C2, HW2, nb2, e2, po2, co2,
                      s3, t3, C3, HW3, nb3, e3, po3, co3,
                      s4, t4, C4, HW4, nb4, e4, po4, co4,
                      s5, t5, C5, HW5, nb5, e5, po5, co5,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CL: tl.constexpr):
    # Programs are laid out level after level (see level_slot), each owning BLOCK_HW pixels of one
    # sample and looping over all channels.
    pid = tl.program_id(0)
    mine, local = level_slot(pid, 0, e0)
    if mine:
        _fgd_stats_block(s0, t0, pix_s_ptr, pix_t_ptr, ch_s_ptr, ch_t_ptr, local, C0, HW0, nb0, po0, co0,
                         BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e0, e1)
    if mine:
        _fgd_stats_block(s1, t1, pix_s_ptr, pix_t_ptr, ch_s_ptr, ch_t_ptr, local, C1, HW1, nb1, po1, co1,
                         BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e1, e2)
    if mine:
        _fgd_stats_block(s2, t2, pix_s_ptr, pix_t_ptr, ch_s_ptr, ch_t_ptr, local, C2, HW2, nb2, po2, co2,
                         BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e2, e3)
    if mine:
        _fgd_stats_block(s3, t3, pix_s_ptr, pix_t_ptr, ch_s_ptr, ch_t_ptr, local, C3, HW3, nb3, po3, co3,
                         BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e3, e4)
    if mine:
        _fgd_stats_block(s4, t4, pix_s_ptr, pix_t_ptr, ch_s_ptr, ch_t_ptr, local, C4, HW4, nb4, po4, co4,
                         BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e4, e5)
    if mine:
        _fgd_stats_block(s5, t5, pix_s_ptr, pix_t_ptr, ch_s_ptr, ch_t_ptr, local, C5, HW5, nb5, po5, co5,
                         BLOCK_C, BLOCK_HW, CL)


@triton.jit
def _fgd_grad_tile(s, t, f, ga, act, gb):
    # d(w_fg L_fg + w_bg L_bg)/dS = f[hw] * A_C(T)[c] * (S - T), f = 2/N A_S(T) (w_fg M_fg + w_bg M_bg);
    # d(w_att L_att)/dS = sign(S) (ga[hw] + gb[c]). sign(0) = 0 as for torch.abs.
    sign = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
    return f[None, :] * act[:, None] * (s - t) + sign * (ga[None, :] + gb[:, None])


@triton.jit
def _fgd_tile(local, C, HW, nb, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # local -> (sample, channel block, pixel block), pixel blocks fastest.
    n, cb, hb = split_program(local, nb, tl.cdiv(C, BLOCK_C))
    return n, cb * BLOCK_C + tl.arange(0, BLOCK_C), hb * BLOCK_HW + tl.arange(0, BLOCK_HW)


@triton.jit
def _fgd_focal_block(s_ptr, t_ptr, pf_ptr, pb_ptr, act_ptr, fg_part_ptr, bg_part_ptr, pid, local, C, HW, nb,
                     po, co, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CL: tl.constexpr):
    n, c, hw = _fgd_tile(local, C, HW, nb, BLOCK_C, BLOCK_HW)
    hw_mask = hw < HW
    c_mask = c < C
    mask = c_mask[:, None] & hw_mask[None, :]
    offs = _tile_offsets(n, c, hw, C, HW, CL)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pix = po + n.to(tl.int64) * HW + hw
    pf = tl.load(pf_ptr + pix, mask=hw_mask, other=0.0)
    pb = tl.load(pb_ptr + pix, mask=hw_mask, other=0.0)
    act = tl.load(act_ptr + co + n.to(tl.int64) * C + c, mask=c_mask, other=0.0)
    d = s - t
    col = tl.sum(act[:, None] * d * d, axis=0)  # per pixel: sum_c A_C(T) (S - T)^2
    tl.store(fg_part_ptr + pid, tl.sum(col * pf, axis=0))
    tl.store(bg_part_ptr + pid, tl.sum(col * pb, axis=0))


@triton.jit(do_not_specialize=NO_SPECIALISE)
def _fgd_focal_kernel(pf_ptr, pb_ptr, act_ptr, fg_part_ptr, bg_part_ptr,
                      s0, t0, C0, HW0, nb0, e0, po0, co0,
                      s1, t1, C1, HW1, nb1, e1, po1, co1,
                      s2, t2, C2, HW2, nb2, e2, po2, co2,
                      s3, t3, C3, HW3, nb3, e3, po3, co3,
                      s4, t4, C4, HW4, nb4, e4, po4, co4,
                      s5, t5, C5, HW5, nb5, e5, po5, co5,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CL: tl.constexpr):
    # One partial of L_fg and one of L_bg per program (program id = partial index).
    pid = tl.program_id(0)
    mine, local = level_slot(pid, 0, e0)
    if mine:
        _fgd_focal_block(s0, t0, pf_ptr, pb_ptr, act_ptr, fg_part_ptr, bg_part_ptr, pid, local, C0, HW0, nb0,
                         po0, co0, BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e0, e1)
    if mine:
        _fgd_focal_block(s1, t1, pf_ptr, pb_ptr, act_ptr, fg_part_ptr, bg_part_ptr, pid, local, C1, HW1, nb1,
                         po1, co1, BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e1, e2)
    if mine:
        _fgd_focal_block(s2, t2, pf_ptr, pb_ptr, act_ptr, fg_part_ptr, bg_part_ptr, pid, local, C2, HW2, nb2,
                         po2, co2, BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e2, e3)
    if mine:
        _fgd_focal_block(s3, t3, pf_ptr, pb_ptr, act_ptr, fg_part_ptr, bg_part_ptr, pid, local, C3, HW3, nb3,
                         po3, co3, BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e3, e4)
    if mine:
        _fgd_focal_block(s4, t4, pf_ptr, pb_ptr, act_ptr, fg_part_ptr, bg_part_ptr, pid, local, C4, HW4, nb4,
                         po4, co4, BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e4, e5)
    if mine:
        _fgd_focal_block(s5, t5, pf_ptr, pb_ptr, act_ptr, fg_part_ptr, bg_part_ptr, pid, local, C5, HW5, nb5,
                         po5, co5, BLOCK_C, BLOCK_HW, CL)


@triton.jit
def _fgd_backward_block(s_ptr, t_ptr, g_ptr, f_ptr, ga_ptr, act_ptr, gb_ptr, local, C, HW, nb, po, co,
                        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CL: tl.constexpr):
    n, c, hw = _fgd_tile(local, C, HW, nb, BLOCK_C, BLOCK_HW)
    hw_mask = hw < HW
    c_mask = c < C
    mask = c_mask[:, None] & hw_mask[None, :]
    offs = _tile_offsets(n, c, hw, C, HW, CL)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pix = po + n.to(tl.int64) * HW + hw
    ch = co + n.to(tl.int64) * C + c
    f = tl.load(f_ptr + pix, mask=hw_mask, other=0.0)
    ga = tl.load(ga_ptr + pix, mask=hw_mask, other=0.0)
    act = tl.load(act_ptr + ch, mask=c_mask, other=0.0)
    gb = tl.load(gb_ptr + ch, mask=c_mask, other=0.0)
    g = _fgd_grad_tile(s, t, f, ga, act, gb)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=NO_SPECIALISE)
def _fgd_backward_kernel(f_ptr, ga_ptr, act_ptr, gb_ptr,
                         s0, t0, g0, C0, HW0, nb0, e0, po0, co0,
                         s1, t1, g1, C1, HW1, nb1, e1, po1, co1,
                         s2, t2, g2, C2, HW2, nb2, e2, po2, co2,
                         s3, t3, g3, C3, HW3, nb3, e3, po3, co3,
                         s4, t4, g4, C4, HW4, nb4, e4, po4, co4,
                         s5, t5, g5, C5, HW5, nb5, e5, po5, co5,
                         BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CL: tl.constexpr):
    # f, ga and gb already carry the weights and the three grad_outputs.
    pid = tl.program_id(0)
    mine, local = level_slot(pid, 0, e0)
    if mine:
        _fgd_backward_block(s0, t0, g0, f_ptr, ga_ptr, act_ptr, gb_ptr, local, C0, HW0, nb0, po0, co0,
                            BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e0, e1)
    if mine:
        _fgd_backward_block(s1, t1, g1, f_ptr, ga_ptr, act_ptr, gb_ptr, local, C1, HW1, nb1, po1, co1,
                            BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e1, e2)
    if mine:
        _fgd_backward_block(s2, t2, g2, f_ptr, ga_ptr, act_ptr, gb_ptr, local, C2, HW2, nb2, po2, co2,
                            BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e2, e3)
    if mine:
        _fgd_backward_block(s3, t3, g3, f_ptr, ga_ptr, act_ptr, gb_ptr, local, C3, HW3, nb3, po3, co3,
                            BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e3, e4)
    if mine:
        _fgd_backward_block(s4, t4, g4, f_ptr, ga_ptr, act_ptr, gb_ptr, local, C4, HW4, nb4, po4, co4,
                            BLOCK_C, BLOCK_HW, CL)
    mine, local = level_slot(pid, e4, e5)
    if mine:
        _fgd_backward_block(s5, t5, g5, f_ptr, ga_ptr, act_ptr, gb_ptr, local, C5, HW5, nb5, po5, co5,
                            BLOCK_C, BLOCK_HW, CL)


def _attention_grad(logits: Tensor, att_s: Tensor, diff: Tensor, n: int, scale: float) -> Tensor:
    """d(sum |att_s - att_t| / n)/d(logits) for ``att_s = K softmax(logits)`` over the last dim.

    ``diff`` is ``att_s - att_t`` (computed once for the loss and the gradient).
    """
    u = torch.sign(diff) / n
    # att_s = K p, d att_s_k / d logit_j = att_s_k (delta_kj - p_j)  =>  att_s_j (u_j - sum_k u_k p_k)
    p = att_s / scale
    return att_s * (u - (u * p).sum(-1, keepdim=True))


def _check(student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor, temp: float, level: int = 0) -> None:
    check_pair(student, teacher, "fgd_focal_attention_triton", level)
    if student.dim() != 4:
        raise LossError(f"fgd_focal_attention_triton: expected N x C x H x W features at level {level}, "
                        f"got shape {tuple(student.shape)}")
    n, _, h, w = student.shape
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
    """Autograd wrapper over all levels: forward runs the stats and focal passes (one launch each
    per group of six levels), backward recomputes the gradient of every level in one launch."""

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
        # per-channel blocks, N x C_l x n_hwb_l channel partial sums.
        pix_off = _offsets([n * hw for hw in hws])
        ch_off = _offsets([n * c for c in cs])
        fg = torch.cat([m.detach().to(device=dev, dtype=torch.float32).reshape(-1) for m in fgs])
        bg = torch.cat([m.detach().to(device=dev, dtype=torch.float32).reshape(-1) for m in bgs])

        n_hwb = [triton.cdiv(hw, BLOCK_HW_STATS) for hw in hws]
        part_off = _offsets([n * c * nb for c, nb in zip(cs, n_hwb)])
        pix_s = torch.empty(n * sum(hws), dtype=torch.float32, device=dev)
        pix_t = torch.empty_like(pix_s)
        ch_s = torch.empty(n * sum(c * nb for c, nb in zip(cs, n_hwb)), dtype=torch.float32, device=dev)
        ch_t = torch.empty_like(ch_s)
        stats_slots = [Slot(n * nb, (s, t), (c, hw, nb), (po, co))
                       for (s, t), c, hw, nb, po, co in zip(pairs, cs, hws, n_hwb, pix_off, part_off)]
        launch_levels(_fgd_stats_kernel, pairs[0][0], stats_slots, lambda done: (pix_s, pix_t, ch_s, ch_t),
                      BLOCK_C=BLOCK_C_STATS, BLOCK_HW=BLOCK_HW_STATS, CL=cl, num_warps=NUM_WARPS)
        # Attention maps and their gradients per level: N x HW and N x C, negligible next to the features.
        as_t_all, ac_t_all, ga_all, gb_all, diffs = [], [], [], [], []
        for i, (c, hw) in enumerate(zip(cs, hws)):
            a_s = pix_s[pix_off[i]:pix_off[i] + n * hw].view(n, hw) / (c * temp)
            a_t = pix_t[pix_off[i]:pix_off[i] + n * hw].view(n, hw) / (c * temp)
            span = slice(part_off[i], part_off[i] + n * c * n_hwb[i])
            b_s = ch_s[span].view(n, c, n_hwb[i]).sum(-1) / (hw * temp)
            b_t = ch_t[span].view(n, c, n_hwb[i]).sum(-1) / (hw * temp)
            as_s, as_t = hw * torch.softmax(a_s, -1), hw * torch.softmax(a_t, -1)
            ac_s, ac_t = c * torch.softmax(b_s, -1), c * torch.softmax(b_t, -1)
            d_s, d_c = as_s - as_t, ac_s - ac_t
            # chain rule through mean_c |x| / temp and mean_hw |x| / temp (sign(S) is applied per element)
            ga_all.append(_attention_grad(a_s, as_s, d_s, n, hw).reshape(-1) / (c * temp))
            gb_all.append(_attention_grad(b_s, ac_s, d_c, n, c).reshape(-1) / (hw * temp))
            as_t_all.append(as_t.reshape(-1))
            ac_t_all.append(ac_t.reshape(-1))
            diffs += [d_s.reshape(-1), d_c.reshape(-1)]
        as_t, ac_t, ga, gb = (torch.cat(x) for x in (as_t_all, ac_t_all, ga_all, gb_all))
        l_att = torch.cat(diffs).abs().sum() / n

        block_c, block_hw = TILES[cl]
        n_hb = [triton.cdiv(hw, block_hw) for hw in hws]
        programs = [n * triton.cdiv(c, block_c) * nb for c, nb in zip(cs, n_hb)]
        parts = torch.empty(2, sum(programs), dtype=torch.float32, device=dev)
        slots = [Slot(p, (s, t), (c, hw, nb), (po, co))
                 for p, (s, t), c, hw, nb, po, co in zip(programs, pairs, cs, hws, n_hb, pix_off, ch_off)]
        head = (as_t * fg * (w_fg / n), as_t * bg * (w_bg / n), ac_t)
        # The partials are indexed by program id: each launch writes from its first program on.
        launch_levels(_fgd_focal_kernel, pairs[0][0], slots, lambda done: (*head, parts[0][done:], parts[1][done:]),
                      BLOCK_C=block_c, BLOCK_HW=block_hw, CL=cl, num_warps=NUM_WARPS)
        l_fg, l_bg = sum_partials(parts).unbind(0)  # one launch for both rows

        ctx.save_for_backward(as_t, fg, bg, ga, ac_t, gb, *[x for pair in pairs for x in pair])
        ctx.meta = (cl, n, n_levels, (w_fg, w_bg, w_att), programs, pix_off, ch_off)
        return l_fg, l_bg, (w_att * l_att).to(torch.float32)

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
    levels. Forward makes one statistics launch, one focal launch and one sum; backward one
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


def _slots(sty: str, tty: str, grad: bool) -> dict:
    sig = {}
    for i in range(MAX_LEVELS):
        sig.update({f"s{i}": sty, f"t{i}": tty})
        if grad:
            sig[f"g{i}"] = sty
        sig.update({f"{k}{i}": "i32" for k in ("C", "HW", "nb", "e", "po", "co")})
    sig.update({"BLOCK_C": "constexpr", "BLOCK_HW": "constexpr", "CL": "constexpr"})
    return sig


def _specialisations() -> list:
    out = []
    # fp16 compiles to bf16's code up to the convert instructions; the compile test checks bf16 for both.
    for sdt, tdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        sty, tty = f"*{TRITON_DTYPE[sdt]}", f"*{TRITON_DTYPE[tdt]}"
        for cl in (False, True):
            sig = {k: "*fp32" for k in ("pix_s_ptr", "pix_t_ptr", "ch_s_ptr", "ch_t_ptr")}
            sig.update(_slots(sty, tty, grad=False))
            out.append(("_fgd_stats_kernel", sig, {"BLOCK_C": BLOCK_C_STATS, "BLOCK_HW": BLOCK_HW_STATS, "CL": cl},
                        NUM_WARPS))
            const = {"BLOCK_C": TILES[cl][0], "BLOCK_HW": TILES[cl][1], "CL": cl}
            sig = {k: "*fp32" for k in ("pf_ptr", "pb_ptr", "act_ptr", "fg_part_ptr", "bg_part_ptr")}
            sig.update(_slots(sty, tty, grad=False))
            out.append(("_fgd_focal_kernel", sig, const, NUM_WARPS))
            sig = {k: "*fp32" for k in ("f_ptr", "ga_ptr", "act_ptr", "gb_ptr")}
            sig.update(_slots(sty, tty, grad=True))
            out.append(("_fgd_backward_kernel", sig, const, NUM_WARPS))
    return out


#: Every (kernel, signature, constexprs, num_warps) this module launches (see tests/test_kernels_compile.py).
SPECIALISATIONS = tuple(_specialisations())

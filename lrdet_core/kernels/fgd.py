"""Fused focal and attention terms of FGD (Yang et al., 2022) for one pyramid level.

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

Passes (all streaming ones tiled ``BLOCK_C x BLOCK_HW`` over one sample):

1. ``_fgd_stats_kernel`` reads S and T once: per-pixel sums of ``|x|`` over C (complete per
   program) and per-channel partial sums over each pixel block (reduced by ``torch.sum``).
2. Tiny ``N x HW`` / ``N x C`` torch ops: the attention maps, ``L_att`` and its gradient
   factors, and the per-pixel factors of the focal terms.
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

Layouts: contiguous NCHW and channels_last are indexed without a copy (``CL`` flag); anything
else, or a student and teacher in different layouts, falls back to ``.contiguous()``.
Student and teacher dtypes may differ (converted in registers).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import LossError
from ._common import TRITON_DTYPE, check_once, check_pair, launch, nchw_layout, sum_partials

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


@triton.jit(do_not_specialize=["n_hwb"])
def _fgd_stats_kernel(s_ptr, t_ptr, pix_s_ptr, pix_t_ptr, ch_s_ptr, ch_t_ptr, C, HW, n_hwb,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CL: tl.constexpr):
    hb = tl.program_id(0)
    n = tl.program_id(1)
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
        # Channel sums over this pixel block only; [N, C, n_hwb] is summed by torch later
        # (fixed order, no atomics).
        ch_offs = (n.to(tl.int64) * C + c) * n_hwb + hb
        tl.store(ch_s_ptr + ch_offs, tl.sum(s, axis=1), mask=c < C)
        tl.store(ch_t_ptr + ch_offs, tl.sum(t, axis=1), mask=c < C)
    pix_offs = n.to(tl.int64) * HW + hw
    tl.store(pix_s_ptr + pix_offs, pix_s, mask=hw_mask)
    tl.store(pix_t_ptr + pix_offs, pix_t, mask=hw_mask)


@triton.jit
def _fgd_grad_tile(s, t, f, ga, act, gb):
    # d(w_fg L_fg + w_bg L_bg)/dS = f[hw] * A_C(T)[c] * (S - T), f = 2/N A_S(T) (w_fg M_fg + w_bg M_bg);
    # d(w_att L_att)/dS = sign(S) (ga[hw] + gb[c]). sign(0) = 0 as for torch.abs.
    sign = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
    return f[None, :] * act[:, None] * (s - t) + sign * (ga[None, :] + gb[:, None])


@triton.jit
def _fgd_focal_kernel(s_ptr, t_ptr, pf_ptr, pb_ptr, act_ptr, fg_part_ptr, bg_part_ptr, C, HW,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CL: tl.constexpr):
    hb = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2)
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    hw_mask = hw < HW
    c_mask = c < C
    mask = c_mask[:, None] & hw_mask[None, :]
    offs = _tile_offsets(n, c, hw, C, HW, CL)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pix = n.to(tl.int64) * HW + hw
    pf = tl.load(pf_ptr + pix, mask=hw_mask, other=0.0)
    pb = tl.load(pb_ptr + pix, mask=hw_mask, other=0.0)
    act = tl.load(act_ptr + n.to(tl.int64) * C + c, mask=c_mask, other=0.0)
    d = s - t
    col = tl.sum(act[:, None] * d * d, axis=0)  # per pixel: sum_c A_C(T) (S - T)^2
    part = (n * tl.num_programs(1) + cb) * tl.num_programs(0) + hb
    tl.store(fg_part_ptr + part, tl.sum(col * pf, axis=0))
    tl.store(bg_part_ptr + part, tl.sum(col * pb, axis=0))


@triton.jit
def _fgd_backward_kernel(s_ptr, t_ptr, g_ptr, f_ptr, ga_ptr, act_ptr, gb_ptr, C, HW,
                         BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CL: tl.constexpr):
    # f, ga and gb already carry the weights and the three grad_outputs.
    hb = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2)
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    hw_mask = hw < HW
    c_mask = c < C
    mask = c_mask[:, None] & hw_mask[None, :]
    offs = _tile_offsets(n, c, hw, C, HW, CL)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pix = n.to(tl.int64) * HW + hw
    ch = n.to(tl.int64) * C + c
    f = tl.load(f_ptr + pix, mask=hw_mask, other=0.0)
    ga = tl.load(ga_ptr + pix, mask=hw_mask, other=0.0)
    act = tl.load(act_ptr + ch, mask=c_mask, other=0.0)
    gb = tl.load(gb_ptr + ch, mask=c_mask, other=0.0)
    g = _fgd_grad_tile(s, t, f, ga, act, gb)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def _attention_grad(logits: Tensor, att_s: Tensor, att_t: Tensor, n: int, scale: float) -> Tensor:
    """d(sum |att_s - att_t| / n)/d(logits) for ``att_s = K softmax(logits)`` over the last dim."""
    u = torch.sign(att_s - att_t) / n
    # att_s = K p, d att_s_k / d logit_j = att_s_k (delta_kj - p_j)  =>  att_s_j (u_j - sum_k u_k p_k)
    p = att_s / scale
    return att_s * (u - (u * p).sum(-1, keepdim=True))


def _check(student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor, temp: float) -> None:
    check_pair(student, teacher, "fgd_focal_attention_triton")
    if student.dim() != 4:
        raise LossError(f"fgd_focal_attention_triton: expected N x C x H x W features, got shape {tuple(student.shape)}")
    n, _, h, w = student.shape
    for name, m in (("fg_mask", fg_mask), ("bg_mask", bg_mask)):
        if tuple(m.shape) != (n, h, w):
            raise LossError(f"fgd_focal_attention_triton: {name} is expected to have shape {(n, h, w)} "
                            f"(N x H x W of the features), but got {tuple(m.shape)}")
    if not temp > 0:
        raise LossError(f"fgd_focal_attention_triton: temp must be positive, got {temp}")


class FGDFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the stats and focal passes, backward recomputes the gradient."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor, temp: float,
                weights: Tuple[float, float, float]):
        _check(student, teacher, fg_mask, bg_mask, temp)
        s, t, cl = nchw_layout(student.detach(), teacher.detach())
        n, c, h, w = s.shape
        hw = h * w
        dev = s.device
        fg = fg_mask.detach().to(device=dev, dtype=torch.float32).reshape(n, hw).contiguous()
        bg = bg_mask.detach().to(device=dev, dtype=torch.float32).reshape(n, hw).contiguous()
        w_fg, w_bg, w_att = (float(x) for x in weights)

        n_hwb = triton.cdiv(hw, BLOCK_HW_STATS)
        pix_s = torch.empty(n, hw, dtype=torch.float32, device=dev)
        pix_t = torch.empty_like(pix_s)
        ch_s = torch.empty(n, c, n_hwb, dtype=torch.float32, device=dev)
        ch_t = torch.empty_like(ch_s)
        launch(_fgd_stats_kernel, (n_hwb, n), s, s, t, pix_s, pix_t, ch_s, ch_t, c, hw, n_hwb,
               BLOCK_C=BLOCK_C_STATS, BLOCK_HW=BLOCK_HW_STATS, CL=cl, num_warps=NUM_WARPS)
        # Attention maps and their gradients: N x HW and N x C, negligible next to the features.
        a_s, a_t = pix_s / (c * temp), pix_t / (c * temp)
        b_s, b_t = ch_s.sum(-1) / (hw * temp), ch_t.sum(-1) / (hw * temp)
        as_s, as_t = hw * torch.softmax(a_s, -1), hw * torch.softmax(a_t, -1)
        ac_s, ac_t = c * torch.softmax(b_s, -1), c * torch.softmax(b_t, -1)
        l_att = ((ac_s - ac_t).abs().sum() + (as_s - as_t).abs().sum()) / n
        # chain rule through mean_c |x| / temp and mean_hw |x| / temp (sign(S) is applied per element)
        ga = _attention_grad(a_s, as_s, as_t, n, hw) / (c * temp)
        gb = _attention_grad(b_s, ac_s, ac_t, n, c) / (hw * temp)

        block_c, block_hw = TILES[cl]
        grid = (triton.cdiv(hw, block_hw), triton.cdiv(c, block_c), n)
        parts = torch.empty(2, grid[0] * grid[1] * grid[2], dtype=torch.float32, device=dev)
        launch(_fgd_focal_kernel, grid, s, s, t, as_t * fg * (w_fg / n), as_t * bg * (w_bg / n), ac_t.contiguous(),
               parts[0], parts[1], c, hw, BLOCK_C=block_c, BLOCK_HW=block_hw, CL=cl, num_warps=NUM_WARPS)
        l_fg, l_bg = sum_partials(parts).unbind(0)  # one launch for both rows

        ctx.save_for_backward(s, t, as_t, fg, bg, ga, ac_t, gb)
        ctx.meta = (cl, grid, n, (w_fg, w_bg, w_att))
        return l_fg, l_bg, (w_att * l_att).to(torch.float32)

    @staticmethod
    def backward(ctx, go_fg: Tensor, go_bg: Tensor, go_att: Tensor):
        check_once(ctx)
        s, t, as_t, fg, bg, ga, ac_t, gb = ctx.saved_tensors
        cl, grid, n, (w_fg, w_bg, w_att) = ctx.meta
        # Per-pixel and per-channel factors with the grad_outputs folded in (device ops, no sync).
        go_fg, go_bg, go_att = (x.detach().to(torch.float32) for x in (go_fg, go_bg, go_att))
        f = (2.0 / n) * as_t * ((go_fg * w_fg) * fg + (go_bg * w_bg) * bg)
        scale_att = go_att * w_att
        c, hw = s.shape[1], s.shape[2] * s.shape[3]
        block_c, block_hw = TILES[cl]
        grad = torch.empty_like(s)  # s's layout and dtype
        launch(_fgd_backward_kernel, grid, s, s, t, grad, f, scale_att * ga, ac_t, scale_att * gb, c, hw,
               BLOCK_C=block_c, BLOCK_HW=block_hw, CL=cl, num_warps=NUM_WARPS)
        # Teacher, masks, temp and weights get no gradient.
        return grad, None, None, None, None, None


def fgd_focal_attention_triton(student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor,
                               temp: float, *, weights: Sequence[float] = (1.0, 1.0, 1.0),
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    """The focal (``L_fg``, ``L_bg``) and attention (``L_att``) terms of FGD for one level.

    Args:
        student: student features; receive gradients (also through their attention maps).
        teacher: teacher features, same shape; a constant (no gradient).
        fg_mask: foreground weights per cell (no gradient).
        bg_mask: background weights per cell (no gradient).
        temp: attention temperature (> 0).
        weights: ``(w_fg, w_bg, w_att)`` multiplied into the returned terms (and their gradient).

    Returns:
        ``(w_fg L_fg, w_bg L_bg, w_att L_att)``, three 0-d fp32 tensors.

    Shape:
        student, teacher: ``(N, C, H, W)``, fp32/bf16/fp16 each; fg_mask, bg_mask: ``(N, H, W)``.
    """
    if len(weights) != 3:
        raise LossError(f"fgd_focal_attention_triton: weights must be (w_fg, w_bg, w_att), got {weights!r}")
    return FGDFunction.apply(student, teacher, fg_mask, bg_mask, float(temp), tuple(weights))


def _specialisations() -> list:
    out = []
    # fp16 compiles to bf16's code up to the convert instructions; the compile test checks bf16 for both.
    for sdt, tdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        sty, tty = f"*{TRITON_DTYPE[sdt]}", f"*{TRITON_DTYPE[tdt]}"
        for cl in (False, True):
            out.append(("_fgd_stats_kernel",
                        {"s_ptr": sty, "t_ptr": tty, "pix_s_ptr": "*fp32", "pix_t_ptr": "*fp32", "ch_s_ptr": "*fp32",
                         "ch_t_ptr": "*fp32", "C": "i32", "HW": "i32", "n_hwb": "i32",
                         "BLOCK_C": "constexpr", "BLOCK_HW": "constexpr", "CL": "constexpr"},
                        {"BLOCK_C": BLOCK_C_STATS, "BLOCK_HW": BLOCK_HW_STATS, "CL": cl}, NUM_WARPS))
            sig = {"s_ptr": sty, "t_ptr": tty}
            sig.update({k: "*fp32" for k in ("pf_ptr", "pb_ptr", "act_ptr", "fg_part_ptr", "bg_part_ptr")})
            sig.update({"C": "i32", "HW": "i32", "BLOCK_C": "constexpr", "BLOCK_HW": "constexpr", "CL": "constexpr"})
            const = {"BLOCK_C": TILES[cl][0], "BLOCK_HW": TILES[cl][1], "CL": cl}
            out.append(("_fgd_focal_kernel", sig, const, NUM_WARPS))
            sig = {"s_ptr": sty, "t_ptr": tty, "g_ptr": sty}
            sig.update({k: "*fp32" for k in ("f_ptr", "ga_ptr", "act_ptr", "gb_ptr")})
            sig.update({"C": "i32", "HW": "i32", "BLOCK_C": "constexpr", "BLOCK_HW": "constexpr", "CL": "constexpr"})
            out.append(("_fgd_backward_kernel", sig, const, NUM_WARPS))
    return out


#: Every (kernel, signature, constexprs, num_warps) this module launches (see tests/test_kernels_compile.py).
SPECIALISATIONS = tuple(_specialisations())

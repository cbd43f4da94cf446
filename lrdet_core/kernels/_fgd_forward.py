"""Pass 1 of the fused FGD kernels: one streaming read of S and T for all pyramid levels.

A program owns about ``FWD_PIXELS`` pixels of one image with all their channels, so the teacher's
spatial logits are complete in registers; it writes per-channel focal sums relative to its own
running maximum, the channel sums of ``|S|`` and ``|T|``, the per-pixel sums and that maximum
(see :mod:`lrdet_core.kernels.fgd` for the math and the host side that launches it).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import MAX_LEVELS, level_slot


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
NO_SPECIALISE_FORWARD = NO_SPECIALISE + [f"mo{i}" for i in range(MAX_LEVELS)]


@triton.jit
def _fgd_forward_block(s_ptr, t_ptr, fg_ptr, bg_ptr, pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, local, C, HW, nb,
                       po, co, mo, inv_ct, BLOCK_C: tl.constexpr, SUB_HW: tl.constexpr, SUBS: tl.constexpr,
                       CL: tl.constexpr):
    # One pass over S and T for the pixels [hb * SUBS * SUB_HW, ...) of image n. With
    # w(p) = exp(a_T(p) - m), a_T(p) = sum_c |T| / (C temp) and m the program's running maximum of
    # a_T, it writes per channel c:
    #   q_fg[c] = sum_p M_fg(p) w(p) (S - T)^2,  q_bg[c] likewise,  sum_p |S|,  sum_p |T|
    # and m; per pixel sum_c |S| and sum_c |T|. The attention maps need sums over all pixels and
    # all channels, so L_fg = HW/N sum_n sum_c A_C(T)[c] sum_programs e^(m - M) q_fg[c] / Z is
    # finished on the host side from these O(N C HW / FWD_PIXELS) partials.
    hb = local % nb
    n = local // nb
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    q_fg = tl.zeros([BLOCK_C], dtype=tl.float32)
    q_bg = tl.zeros([BLOCK_C], dtype=tl.float32)
    abs_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    abs_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    m = tl.max(tl.full([SUB_HW], float("-inf"), tl.float32), axis=0)
    for j in range(SUBS):
        hw = (hb * SUBS + j) * SUB_HW + tl.arange(0, SUB_HW)
        hw_mask = hw < HW
        mask = c_mask[:, None] & hw_mask[None, :]
        offs = _tile_offsets(n, c, hw, C, HW, CL)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pix = po + n.to(tl.int64) * HW + hw
        pix_t = tl.sum(tl.abs(t), axis=0)
        tl.store(pix_s_ptr + pix, tl.sum(tl.abs(s), axis=0), mask=hw_mask)
        tl.store(pix_t_ptr + pix, pix_t, mask=hw_mask)
        abs_s += tl.sum(tl.abs(s), axis=1)
        abs_t += tl.sum(tl.abs(t), axis=1)
        logit = tl.where(hw_mask, pix_t * inv_ct, float("-inf"))
        # Online maximum as in a streaming softmax: the first sub-block always holds a pixel, so m is
        # finite from then on and exp(m_old - m) rescales what was summed before.
        m_new = tl.maximum(m, tl.max(logit, axis=0))
        w = tl.exp(logit - m_new)
        fg = tl.load(fg_ptr + pix, mask=hw_mask, other=0.0) * w
        bg = tl.load(bg_ptr + pix, mask=hw_mask, other=0.0) * w
        d = s - t
        dd = d * d
        r = tl.exp(m - m_new)
        q_fg = q_fg * r + tl.sum(dd * fg[None, :], axis=1)
        q_bg = q_bg * r + tl.sum(dd * bg[None, :], axis=1)
        m = m_new
    # [N, nb, 4, C] per level: q_fg, q_bg, sum |S|, sum |T|.
    row = co + local.to(tl.int64) * 4 * C + c
    tl.store(ch_ptr + row, q_fg, mask=c_mask)
    tl.store(ch_ptr + row + C, q_bg, mask=c_mask)
    tl.store(ch_ptr + row + 2 * C, abs_s, mask=c_mask)
    tl.store(ch_ptr + row + 3 * C, abs_t, mask=c_mask)
    tl.store(m_ptr + mo + local, m)


@triton.jit(do_not_specialize=NO_SPECIALISE_FORWARD)
def _fgd_forward_kernel(fg_ptr, bg_ptr, pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr,
                        s0, t0, C0, HW0, nb0, e0, po0, co0, mo0, ict0,
                        s1, t1, C1, HW1, nb1, e1, po1, co1, mo1, ict1,
                        s2, t2, C2, HW2, nb2, e2, po2, co2, mo2, ict2,
                        s3, t3, C3, HW3, nb3, e3, po3, co3, mo3, ict3,
                        s4, t4, C4, HW4, nb4, e4, po4, co4, mo4, ict4,
                        s5, t5, C5, HW5, nb5, e5, po5, co5, mo5, ict5,
                        BLOCK_C: tl.constexpr, SUB_HW: tl.constexpr, SUBS: tl.constexpr, CL: tl.constexpr):
    # Programs are laid out level after level (see level_slot), each owning SUBS x SUB_HW pixels of
    # one image and all its channels.
    pid = tl.program_id(0)
    mine, local = level_slot(pid, 0, e0)
    if mine:
        _fgd_forward_block(s0, t0, fg_ptr, bg_ptr, pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, local, C0, HW0, nb0,
                           po0, co0, mo0, ict0, BLOCK_C, SUB_HW, SUBS, CL)
    mine, local = level_slot(pid, e0, e1)
    if mine:
        _fgd_forward_block(s1, t1, fg_ptr, bg_ptr, pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, local, C1, HW1, nb1,
                           po1, co1, mo1, ict1, BLOCK_C, SUB_HW, SUBS, CL)
    mine, local = level_slot(pid, e1, e2)
    if mine:
        _fgd_forward_block(s2, t2, fg_ptr, bg_ptr, pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, local, C2, HW2, nb2,
                           po2, co2, mo2, ict2, BLOCK_C, SUB_HW, SUBS, CL)
    mine, local = level_slot(pid, e2, e3)
    if mine:
        _fgd_forward_block(s3, t3, fg_ptr, bg_ptr, pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, local, C3, HW3, nb3,
                           po3, co3, mo3, ict3, BLOCK_C, SUB_HW, SUBS, CL)
    mine, local = level_slot(pid, e3, e4)
    if mine:
        _fgd_forward_block(s4, t4, fg_ptr, bg_ptr, pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, local, C4, HW4, nb4,
                           po4, co4, mo4, ict4, BLOCK_C, SUB_HW, SUBS, CL)
    mine, local = level_slot(pid, e4, e5)
    if mine:
        _fgd_forward_block(s5, t5, fg_ptr, bg_ptr, pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, local, C5, HW5, nb5,
                           po5, co5, mo5, ict5, BLOCK_C, SUB_HW, SUBS, CL)


"""Pass 3 of the fused FGD kernels: the whole gradient of the student, all levels in one launch.

Reads S and T once more and writes ``dL/dS`` from per-pixel and per-channel factors that already
carry the weights and the three ``grad_output`` values (see :mod:`lrdet_core.kernels.fgd`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import level_slot, split_program
from ._fgd_forward import NO_SPECIALISE, _tile_offsets


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


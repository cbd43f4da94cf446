"""Pass 2 of the fused FGD kernels: attention maps, the three terms and ``L_att``'s gradient factors.

One program per (level, image) reads only the side buffers of the forward pass (see
:mod:`lrdet_core.kernels.fgd` for the math and the host side that launches it).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import MAX_LEVELS, level_slot


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))  # sign(0) = 0, as torch.sign


@triton.jit
def _fgd_combine_block(pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, as_t_ptr, ga_ptr, ac_t_ptr, gb_ptr, out_ptr, pid, n,
                       C, HW, nb, po, co, pco, mo, ict, ihwt, inv_n, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    # One image of one level: its attention maps, its share of the three terms and the gradient
    # factors of L_att, from the forward pass's per-pixel sums and per-program channel partials.
    # Fixed loop orders: the result is bitwise identical run to run.
    base = po + n.to(tl.int64) * HW
    lanes = tl.arange(0, BLOCK_P)
    # 1. Softmax statistics of a_S and a_T over the pixels: per-lane running maxima and sums.
    vms = tl.full([BLOCK_P], float("-inf"), tl.float32)
    vmt = tl.full([BLOCK_P], float("-inf"), tl.float32)
    vzs = tl.zeros([BLOCK_P], dtype=tl.float32)
    vzt = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, HW, BLOCK_P):
        p = start + lanes
        a_s = tl.where(p < HW, tl.load(pix_s_ptr + base + p, mask=p < HW, other=0.0) * ict, float("-inf"))
        a_t = tl.where(p < HW, tl.load(pix_t_ptr + base + p, mask=p < HW, other=0.0) * ict, float("-inf"))
        new_s = tl.maximum(vms, a_s)
        new_t = tl.maximum(vmt, a_t)
        # A lane that has seen no pixel yet keeps max -inf: shift by 0 there (exp(-inf) = 0, no NaN).
        ref_s = tl.where(new_s == float("-inf"), 0.0, new_s)
        ref_t = tl.where(new_t == float("-inf"), 0.0, new_t)
        vzs = vzs * tl.exp(vms - ref_s) + tl.exp(a_s - ref_s)
        vzt = vzt * tl.exp(vmt - ref_t) + tl.exp(a_t - ref_t)
        vms = new_s
        vmt = new_t
    ms = tl.max(vms, axis=0)
    mt = tl.max(vmt, axis=0)
    zs = tl.sum(vzs * tl.exp(vms - ms), axis=0)
    zt = tl.sum(vzt * tl.exp(vmt - mt), axis=0)
    # 2. A_S(T) (kept for backward), sum |A_S(S) - A_S(T)| and sum_p u p of the softmax Jacobian.
    att = 0.0
    sup = 0.0
    for start in range(0, HW, BLOCK_P):
        p = start + lanes
        a_s = tl.load(pix_s_ptr + base + p, mask=p < HW, other=0.0) * ict
        a_t = tl.load(pix_t_ptr + base + p, mask=p < HW, other=0.0) * ict
        as_s = tl.where(p < HW, HW * tl.exp(a_s - ms) / zs, 0.0)
        as_t = tl.where(p < HW, HW * tl.exp(a_t - mt) / zt, 0.0)
        d = as_s - as_t
        att += tl.sum(tl.abs(d), axis=0)
        sup += tl.sum(_sign(d) * inv_n * as_s / HW, axis=0)
        tl.store(as_t_ptr + base + p, as_t, mask=p < HW)
    # 3. d(sum |A_S(S) - A_S(T)| / N)/d(sum_c |S| per pixel): A_S(S) (u - sup) / (C temp).
    for start in range(0, HW, BLOCK_P):
        p = start + lanes
        a_s = tl.load(pix_s_ptr + base + p, mask=p < HW, other=0.0) * ict
        a_t = tl.load(pix_t_ptr + base + p, mask=p < HW, other=0.0) * ict
        as_s = HW * tl.exp(a_s - ms) / zs
        u = _sign(as_s - HW * tl.exp(a_t - mt) / zt) * inv_n
        tl.store(ga_ptr + base + p, as_s * (u - sup) * ict, mask=p < HW)
    # 4. Channels: each program's partials were summed relative to its own maximum m_k; bring them to
    # mt, the image's maximum (the largest m_k: the same fp32 logits), as z above is.
    progs = mo + n.to(tl.int64) * nb
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    # BLOCK_K programs' rows per step: one short loop even for P3's ~130 programs per image.
    q_fg = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    q_bg = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    sum_s = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    sum_t = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, nb, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < nb
        r = tl.exp(tl.load(m_ptr + progs + k, mask=km, other=float("-inf")) - mt)[:, None]
        row = pco + ((n.to(tl.int64) * nb + k) * 4 * C)[:, None] + c[None, :]
        mask = km[:, None] & cm[None, :]
        q_fg += r * tl.load(ch_ptr + row, mask=mask, other=0.0)
        q_bg += r * tl.load(ch_ptr + row + C, mask=mask, other=0.0)
        sum_s += tl.load(ch_ptr + row + 2 * C, mask=mask, other=0.0)
        sum_t += tl.load(ch_ptr + row + 3 * C, mask=mask, other=0.0)
    q_fg = tl.sum(q_fg, axis=0)
    q_bg = tl.sum(q_bg, axis=0)
    sum_s = tl.sum(sum_s, axis=0)
    sum_t = tl.sum(sum_t, axis=0)
    b_s = tl.where(cm, sum_s * ihwt, float("-inf"))
    b_t = tl.where(cm, sum_t * ihwt, float("-inf"))
    e_s = tl.exp(b_s - tl.max(b_s, axis=0))
    e_t = tl.exp(b_t - tl.max(b_t, axis=0))
    ac_s = C * e_s / tl.sum(e_s, axis=0)
    ac_t = C * e_t / tl.sum(e_t, axis=0)
    dc = ac_s - ac_t
    att += tl.sum(tl.abs(dc), axis=0)
    uc = _sign(dc) * inv_n
    gb = ac_s * (uc - tl.sum(uc * ac_s / C, axis=0)) * ihwt
    chan = co + n.to(tl.int64) * C + c
    tl.store(ac_t_ptr + chan, ac_t, mask=cm)
    tl.store(gb_ptr + chan, gb, mask=cm)
    # L_fg N = sum_c A_C(T)[c] sum_p M_fg A_S(T)(p) (S - T)^2 with A_S(T)(p) = HW e^(a_T(p) - mt) / zt.
    tl.store(out_ptr + pid * 3, HW * tl.sum(ac_t * q_fg, axis=0) / zt)
    tl.store(out_ptr + pid * 3 + 1, HW * tl.sum(ac_t * q_bg, axis=0) / zt)
    tl.store(out_ptr + pid * 3 + 2, att)


#: Every integer of the combine kernel varies with the pyramid and buys no vectorisation.
NO_SPECIALISE_COMBINE = [f"{n}{i}" for i in range(MAX_LEVELS)
                         for n in ("C", "HW", "nb", "e", "po", "co", "pco", "mo")]


@triton.jit(do_not_specialize=NO_SPECIALISE_COMBINE)
def _fgd_combine_kernel(pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, as_t_ptr, ga_ptr, ac_t_ptr, gb_ptr, out_ptr, inv_n,
                        C0, HW0, nb0, e0, po0, co0, pco0, mo0, ict0, ihwt0,
                        C1, HW1, nb1, e1, po1, co1, pco1, mo1, ict1, ihwt1,
                        C2, HW2, nb2, e2, po2, co2, pco2, mo2, ict2, ihwt2,
                        C3, HW3, nb3, e3, po3, co3, pco3, mo3, ict3, ihwt3,
                        C4, HW4, nb4, e4, po4, co4, pco4, mo4, ict4, ihwt4,
                        C5, HW5, nb5, e5, po5, co5, pco5, mo5, ict5, ihwt5,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per (level, image), levels one after the other (see level_slot); out holds a
    # row (N L_fg, N L_bg, N L_att) per program.
    pid = tl.program_id(0)
    mine, local = level_slot(pid, 0, e0)
    if mine:
        _fgd_combine_block(pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, as_t_ptr, ga_ptr, ac_t_ptr, gb_ptr, out_ptr, pid, local,
                           C0, HW0, nb0, po0, co0, pco0, mo0, ict0, ihwt0, inv_n, BLOCK_C, BLOCK_P, BLOCK_K)
    mine, local = level_slot(pid, e0, e1)
    if mine:
        _fgd_combine_block(pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, as_t_ptr, ga_ptr, ac_t_ptr, gb_ptr, out_ptr, pid, local,
                           C1, HW1, nb1, po1, co1, pco1, mo1, ict1, ihwt1, inv_n, BLOCK_C, BLOCK_P, BLOCK_K)
    mine, local = level_slot(pid, e1, e2)
    if mine:
        _fgd_combine_block(pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, as_t_ptr, ga_ptr, ac_t_ptr, gb_ptr, out_ptr, pid, local,
                           C2, HW2, nb2, po2, co2, pco2, mo2, ict2, ihwt2, inv_n, BLOCK_C, BLOCK_P, BLOCK_K)
    mine, local = level_slot(pid, e2, e3)
    if mine:
        _fgd_combine_block(pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, as_t_ptr, ga_ptr, ac_t_ptr, gb_ptr, out_ptr, pid, local,
                           C3, HW3, nb3, po3, co3, pco3, mo3, ict3, ihwt3, inv_n, BLOCK_C, BLOCK_P, BLOCK_K)
    mine, local = level_slot(pid, e3, e4)
    if mine:
        _fgd_combine_block(pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, as_t_ptr, ga_ptr, ac_t_ptr, gb_ptr, out_ptr, pid, local,
                           C4, HW4, nb4, po4, co4, pco4, mo4, ict4, ihwt4, inv_n, BLOCK_C, BLOCK_P, BLOCK_K)
    mine, local = level_slot(pid, e4, e5)
    if mine:
        _fgd_combine_block(pix_s_ptr, pix_t_ptr, ch_ptr, m_ptr, as_t_ptr, ga_ptr, ac_t_ptr, gb_ptr, out_ptr, pid, local,
                           C5, HW5, nb5, po5, co5, pco5, mo5, ict5, ihwt5, inv_n, BLOCK_C, BLOCK_P, BLOCK_K)


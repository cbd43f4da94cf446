"""CWD on channels_last features: ``[BLOCK_HW, BLOCK_C]`` tiles with the channels contiguous.

In channels_last memory a softmax row (one ``(n, c)`` over all cells) has stride ``C``; a program
per row would issue scalar loads and pull every cache line into L2 ``C / 8`` to ``C / 16`` times.
Here one program owns ``BLOCK_C`` neighbouring channels of one image and one chunk of ``CHUNK``
cells, and walks it in ``[BLOCK_HW, BLOCK_C]`` tiles whose rows are contiguous runs of channels
(vector loads, each byte read once). Per tile lane it keeps running max, sum-exp and
``sum exp(T - max) (T - S)`` for S and T, reduces them over the cells once at the end and writes
one partial per (row, chunk). ``_cwd_cl_combine_kernel`` merges a row's chunk partials into its
two logsumexps and its KL term. Backward walks the same tiles once more and writes
``grad_output * tau/(N C) * (p_s - p_t)`` from the logsumexps.

Launches per call: forward one tile launch per group of up to 6 levels, one combine launch and
one sum; backward one tile launch per group. Element accesses per element: forward 2, backward 3,
as for contiguous rows.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (MAX_LEVELS, TRITON_DTYPE, Slot, grad_factor, launch, launch_levels, level_slot, split_program,
                      sum_partials)

#: Tile of cells x channels: 64 contiguous channels (128-256 bytes) per cell, 8 elements per thread
#: over 4 warps (128-bit loads). A 32 x 32 tile spilled on sm80 for a bf16 student with an fp32
#: teacher under triton 3.8 (ptxas stopped at 72 registers); 16 x 64 does not, under 3.8 or 3.6.
BLOCK_HW = 16
BLOCK_C = 64
NUM_WARPS = 4
#: Cells per program: 32 tiles. P3 at 800x1333 (16,800 cells) is split into 33 chunks per block
#: of channels (264 programs at N = 2, C = 256); P7 fits one chunk.
CHUNK = 512
COMBINE_ROWS = 128
#: Not specialised: they change with every pyramid and buy no vectorisation (the channel count
#: ``C_i`` stays specialised: ``C % 16 == 0`` aligns the tile rows for vector loads).
NO_SPECIALISE = [f"{k}{i}" for i in range(MAX_LEVELS) for k in ("HW", "e", "r", "K")] + ["kmax", "rows"]
STATS = 5  # m_s, z_s, m_t, z_t, cross


@triton.jit
def _tile(n, c, hw, C, HW, stop):
    # element (n, c, hw) of a channels_last tensor lives at (n * HW + hw) * C + c
    offs = (n.to(tl.int64) * HW + hw.to(tl.int64))[:, None] * C + c[None, :]
    mask = (hw < stop)[:, None] & (c < C)[None, :]
    return offs, mask


@triton.jit
def _cl_block(s_ptr, t_ptr, g_ptr, stats_ptr, nk_ptr, w_ptr, lse_ptr, go, local, C, HW, K, r0, chunk, kmax, rows,
              w, v, inv_tau, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, GRAD: tl.constexpr):
    n, cb, k = split_program(local, K, tl.cdiv(C, BLOCK_C))
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    row = r0 + n * C + c  # absolute softmax row of every channel lane
    c_ok = c < C
    lanes = tl.arange(0, BLOCK_HW)
    start = k * chunk
    stop = tl.minimum(start + chunk, HW)
    if GRAD:
        ms = tl.load(lse_ptr + 4 * row, mask=c_ok, other=0.0)[None, :]
        log_zs = tl.load(lse_ptr + 4 * row + 1, mask=c_ok, other=0.0)[None, :]
        mt = tl.load(lse_ptr + 4 * row + 2, mask=c_ok, other=0.0)[None, :]
        log_zt = tl.load(lse_ptr + 4 * row + 3, mask=c_ok, other=0.0)[None, :]
        for h0 in range(start, stop, BLOCK_HW):
            offs, mask = _tile(n, c, h0 + lanes, C, HW, stop)
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            g = (go * v) * (tl.exp((s - ms) - log_zs) - tl.exp((t - mt) - log_zt))
            tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    else:
        m_s = tl.full([BLOCK_HW, BLOCK_C], float("-inf"), tl.float32)
        m_t = tl.full([BLOCK_HW, BLOCK_C], float("-inf"), tl.float32)
        z_s = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        z_t = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        c_t = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        for h0 in range(start, stop, BLOCK_HW):
            offs, mask = _tile(n, c, h0 + lanes, C, HW, stop)
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            new_s = tl.maximum(m_s, tl.where(mask, s, float("-inf")))
            new_t = tl.maximum(m_t, tl.where(mask, t, float("-inf")))
            # A lane without an element yet stays at (-inf, 0): its rescale factor is forced to 0.
            rescale_s = tl.where(new_s == float("-inf"), 0.0, tl.exp(m_s - new_s))
            z_s = z_s * rescale_s + tl.where(mask, tl.exp(s - new_s), 0.0)
            rescale_t = tl.where(new_t == float("-inf"), 0.0, tl.exp(m_t - new_t))
            et = tl.where(mask, tl.exp(t - new_t), 0.0)
            z_t = z_t * rescale_t + et
            c_t = c_t * rescale_t + et * (t - s)
            m_s = new_s
            m_t = new_t
        # Once per program: reduce over the cell lanes (every chunk holds at least one cell).
        ms = tl.max(m_s, axis=0)
        mt = tl.max(m_t, axis=0)
        zs = tl.sum(z_s * tl.exp(m_s - ms[None, :]), axis=0)
        lane_t = tl.exp(m_t - mt[None, :])
        zt = tl.sum(z_t * lane_t, axis=0)
        cross = tl.sum(c_t * lane_t, axis=0)
        base = row.to(tl.int64) * kmax + k
        field = rows.to(tl.int64) * kmax
        tl.store(stats_ptr + base, ms, mask=c_ok)
        tl.store(stats_ptr + field + base, zs, mask=c_ok)
        tl.store(stats_ptr + 2 * field + base, mt, mask=c_ok)
        tl.store(stats_ptr + 3 * field + base, zt, mask=c_ok)
        tl.store(stats_ptr + 4 * field + base, cross, mask=c_ok)
        # The row's chunk count and loss weight, for the combine kernel (written by chunk 0 only).
        first = c_ok & (k == 0)
        tl.store(nk_ptr + row, tl.zeros([BLOCK_C], tl.int32) + K, mask=first)
        tl.store(w_ptr + row, tl.zeros([BLOCK_C], tl.float32) + w, mask=first)


@triton.jit(do_not_specialize=NO_SPECIALISE)
def _cwd_cl_kernel(stats_ptr, nk_ptr, w_ptr, lse_ptr, go_ptr, inv_tau, chunk, kmax, rows,
                   s0, t0, g0, C0, HW0, e0, r0, K0, w0, v0,
                   s1, t1, g1, C1, HW1, e1, r1, K1, w1, v1,
                   s2, t2, g2, C2, HW2, e2, r2, K2, w2, v2,
                   s3, t3, g3, C3, HW3, e3, r3, K3, w3, v3,
                   s4, t4, g4, C4, HW4, e4, r4, K4, w4, v4,
                   s5, t5, g5, C5, HW5, e5, r5, K5, w5, v5,
                   BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, GRAD: tl.constexpr):
    # Level i owns programs [e_{i-1}, e_i): (image, channel block, chunk) in that order from the end.
    pid = tl.program_id(0)
    go = 1.0
    if GRAD:
        go = tl.load(go_ptr).to(tl.float32)
    mine, local = level_slot(pid, 0, e0)
    if mine:
        _cl_block(s0, t0, g0, stats_ptr, nk_ptr, w_ptr, lse_ptr, go, local, C0, HW0, K0, r0, chunk, kmax,
                  rows, w0, v0, inv_tau, BLOCK_HW, BLOCK_C, GRAD)
    mine, local = level_slot(pid, e0, e1)
    if mine:
        _cl_block(s1, t1, g1, stats_ptr, nk_ptr, w_ptr, lse_ptr, go, local, C1, HW1, K1, r1, chunk, kmax,
                  rows, w1, v1, inv_tau, BLOCK_HW, BLOCK_C, GRAD)
    mine, local = level_slot(pid, e1, e2)
    if mine:
        _cl_block(s2, t2, g2, stats_ptr, nk_ptr, w_ptr, lse_ptr, go, local, C2, HW2, K2, r2, chunk, kmax,
                  rows, w2, v2, inv_tau, BLOCK_HW, BLOCK_C, GRAD)
    mine, local = level_slot(pid, e2, e3)
    if mine:
        _cl_block(s3, t3, g3, stats_ptr, nk_ptr, w_ptr, lse_ptr, go, local, C3, HW3, K3, r3, chunk, kmax,
                  rows, w3, v3, inv_tau, BLOCK_HW, BLOCK_C, GRAD)
    mine, local = level_slot(pid, e3, e4)
    if mine:
        _cl_block(s4, t4, g4, stats_ptr, nk_ptr, w_ptr, lse_ptr, go, local, C4, HW4, K4, r4, chunk, kmax,
                  rows, w4, v4, inv_tau, BLOCK_HW, BLOCK_C, GRAD)
    mine, local = level_slot(pid, e4, e5)
    if mine:
        _cl_block(s5, t5, g5, stats_ptr, nk_ptr, w_ptr, lse_ptr, go, local, C5, HW5, K5, r5, chunk, kmax,
                  rows, w5, v5, inv_tau, BLOCK_HW, BLOCK_C, GRAD)


@triton.jit(do_not_specialize=["rows", "kmax"])
def _cwd_cl_combine_kernel(stats_ptr, nk_ptr, w_ptr, lse_ptr, part_ptr, rows, kmax, BLOCK_R: tl.constexpr):
    # One lane per row: merge the row's chunk partials (fixed order: deterministic).
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < rows
    nk = tl.load(nk_ptr + r, mask=ok, other=0)
    field = rows.to(tl.int64) * kmax
    base = r.to(tl.int64) * kmax
    ms = tl.full([BLOCK_R], float("-inf"), tl.float32)
    mt = tl.full([BLOCK_R], float("-inf"), tl.float32)
    zs = tl.zeros([BLOCK_R], tl.float32)
    zt = tl.zeros([BLOCK_R], tl.float32)
    cross = tl.zeros([BLOCK_R], tl.float32)
    for k in range(0, kmax):
        has = ok & (k < nk)
        km_s = tl.load(stats_ptr + base + k, mask=has, other=float("-inf"))
        kz_s = tl.load(stats_ptr + field + base + k, mask=has, other=0.0)
        km_t = tl.load(stats_ptr + 2 * field + base + k, mask=has, other=float("-inf"))
        kz_t = tl.load(stats_ptr + 3 * field + base + k, mask=has, other=0.0)
        kc = tl.load(stats_ptr + 4 * field + base + k, mask=has, other=0.0)
        new_s = tl.maximum(ms, km_s)
        new_t = tl.maximum(mt, km_t)
        zs = tl.where(has, zs * tl.exp(ms - new_s) + kz_s * tl.exp(km_s - new_s), zs)
        a_t = tl.exp(mt - new_t)
        b_t = tl.exp(km_t - new_t)
        zt = tl.where(has, zt * a_t + kz_t * b_t, zt)
        cross = tl.where(has, cross * a_t + kc * b_t, cross)
        ms = tl.where(has, new_s, ms)
        mt = tl.where(has, new_t, mt)
    # As in cwd._cwd_row_forward: the maxima cancel before the logs are added.
    log_zs = tl.log(zs)
    log_zt = tl.log(zt)
    w = tl.load(w_ptr + r, mask=ok, other=0.0)
    tl.store(part_ptr + r, w * (cross / zt + (ms - mt) + (log_zs - log_zt)), mask=ok)
    tl.store(lse_ptr + 4 * r, ms, mask=ok)
    tl.store(lse_ptr + 4 * r + 1, log_zs, mask=ok)
    tl.store(lse_ptr + 4 * r + 2, mt, mask=ok)
    tl.store(lse_ptr + 4 * r + 3, log_zt, mask=ok)


def _chunks(hw: int, chunk: int) -> int:
    return max(triton.cdiv(hw, chunk), 1)


def run(pairs: Sequence[tuple], tau: float, lse: Tensor, chunk: Optional[int] = None,
        grads: Sequence[Tensor] = (), grad_output: Optional[Tensor] = None) -> Optional[Tensor]:
    """Forward (no ``grads``): the loss, filling ``lse``. Backward: fill ``grads`` from ``lse``.

    ``chunk``: cells per program (a multiple of :data:`BLOCK_HW`; tests pass a small one so that
    rows span several chunks).
    """
    backward = bool(grads)
    chunk = CHUNK if chunk is None else max(BLOCK_HW, triton.cdiv(chunk, BLOCK_HW) * BLOCK_HW)
    dev_tensor = pairs[0][0]
    dev = dev_tensor.device
    rows = [s.shape[0] * s.shape[1] for s, _ in pairs]
    total = sum(rows)
    ks = [_chunks(s.shape[2] * s.shape[3], chunk) for s, _ in pairs]
    kmax = max(ks)
    starts = [sum(rows[:i]) for i in range(len(pairs))]
    if backward:
        go = grad_factor(grad_output)
        stats = nk = w = lse  # not touched by the backward launch
    else:
        stats = torch.empty(STATS * total * kmax, dtype=torch.float32, device=dev)
        nk = torch.empty(total, dtype=torch.int32, device=dev)
        w = torch.empty(total, dtype=torch.float32, device=dev)
        go = stats  # not read by the forward launch
    slots = []
    for i, (s, t) in enumerate(pairs):
        n, c, h, w_ = s.shape
        g = grads[i] if backward else s  # forward never touches g
        slots.append(Slot(n * triton.cdiv(c, BLOCK_C) * ks[i], (s, t, g), (c, h * w_),
                          (starts[i], ks[i], tau * tau / (n * c), tau / (n * c))))
    # Buffers are indexed by absolute row (r_i), not by program: every launch gets the same head.
    head = (stats, nk, w, lse, go, 1.0 / tau, chunk, kmax, total)
    launch_levels(_cwd_cl_kernel, dev_tensor, slots, lambda done: head,
                  BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, GRAD=backward, num_warps=NUM_WARPS)
    if backward:
        return None
    partials = torch.empty(total, dtype=torch.float32, device=dev)
    if total:
        launch(_cwd_cl_combine_kernel, (triton.cdiv(total, COMBINE_ROWS),), dev_tensor, stats, nk, w, lse, partials,
               total, kmax, BLOCK_R=COMBINE_ROWS, num_warps=4)
    return sum_partials(partials)


def specialisations(pairs: Sequence[tuple]) -> list:
    """(kernel, signature, constexprs, num_warps) of every launch :func:`run` makes, per dtype pair."""
    out = []
    for sdt, tdt in pairs:
        for grad in (False, True):
            sig = {"stats_ptr": "*fp32", "nk_ptr": "*i32", "w_ptr": "*fp32", "lse_ptr": "*fp32", "go_ptr": "*fp32",
                   "inv_tau": "fp32",
                   "chunk": "i32", "kmax": "i32", "rows": "i32"}
            for i in range(MAX_LEVELS):
                sig.update({f"s{i}": f"*{TRITON_DTYPE[sdt]}", f"t{i}": f"*{TRITON_DTYPE[tdt]}",
                            f"g{i}": f"*{TRITON_DTYPE[sdt]}", f"C{i}": "i32", f"HW{i}": "i32", f"e{i}": "i32",
                            f"r{i}": "i32", f"K{i}": "i32", f"w{i}": "fp32", f"v{i}": "fp32"})
            sig.update({"BLOCK_HW": "constexpr", "BLOCK_C": "constexpr", "GRAD": "constexpr"})
            out.append(("_cwd_cl_kernel", sig, {"BLOCK_HW": BLOCK_HW, "BLOCK_C": BLOCK_C, "GRAD": grad}, NUM_WARPS))
    out.append(("_cwd_cl_combine_kernel", {"stats_ptr": "*fp32", "nk_ptr": "*i32", "w_ptr": "*fp32", "lse_ptr": "*fp32",
                                           "part_ptr": "*fp32", "rows": "i32", "kmax": "i32", "BLOCK_R": "constexpr"},
                {"BLOCK_R": COMBINE_ROWS}, 4))
    return out

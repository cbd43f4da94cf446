"""Fused channel-wise distillation (CWD) loss over all pyramid levels in one Triton launch.

Math (Shu et al., 2021), per level with ``N x C x H x W`` student ``S`` and teacher ``T``::

    p_t = softmax_hw(T[n, c] / tau),  p_s = softmax_hw(S[n, c] / tau)
    L   = tau^2 / (N C) * sum_{n,c} KL(p_t || p_s),   summed over levels
    KL  = sum_hw p_t (T - S) / tau  +  lse_hw(S / tau) - lse_hw(T / tau)
    dL/dS = tau / (N C) * (p_s - p_t)

Everything is computed from max-shifted logsumexps, so the loss stays finite for logits of
any finite magnitude (``1e4`` and beyond) where ``log(softmax)`` would underflow to ``-inf``.

One program per ``(n, c)`` row; programs are laid out level after level. Rows that fit one
``BLOCK`` are loaded once and kept in registers (single pass). Longer rows (P3 at 800x1333
is 100x168 = 16,800 cells) take two passes: the first streams the row once keeping running
max and sum-exp for S and T plus the running ``sum exp(T - max) (T - S)`` (all rescaled when
a max grows), which gives the KL; the second streams it again to write the gradient.

Bytes moved (minimum, per element, forward + backward together): **3** element accesses for
single-pass rows (read S, read T, write dL/dS) and **5** for two-pass rows (S and T are read
twice). As for every kernel here, backward adds nothing when ``grad_output == 1`` and 2 more
(read and write the gradient buffer) otherwise.

Layouts: contiguous NCHW (rows are unit-stride) and channels_last (rows have stride C; one
program reads a strided row, neighbouring programs read the neighbouring channels, so a
cache line is shared by consecutive programs through L2) are indexed without a copy. Other
layouts, or a student and teacher in different layouts, fall back to ``.contiguous()``.
All levels of one launch share the layout flag; when levels disagree the channels_last ones
are made contiguous.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import LossError
from ._common import (DTYPES, MAX_LEVELS, TRITON_DTYPE, check_pair, level_groups, nchw_layout,
                      scale_grads_, sum_partials)

#: Row block ladder and the warps of each. A row up to 4096 elements stays in registers
#: (single pass); longer rows use BLOCK = 4096 chunks in two passes. One BLOCK per launch,
#: chosen by the longest row, so short levels waste masked lanes but never memory traffic.
BLOCKS = (256, 1024, 4096)
NUM_WARPS = {256: 2, 1024: 4, 4096: 16}  # 8 elements per thread per tensor at most


@triton.jit
def _cwd_row(s_ptr, t_ptr, g_ptr, part_ptr, pid, row, C, HW, w, v, inv_tau,
             BLOCK: tl.constexpr, CL: tl.constexpr):
    row = row.to(tl.int64)
    if CL:
        # channels_last: element (n, c, hw) lives at (n * HW + hw) * C + c.
        base = (row // C) * HW * C + row % C
    else:
        base = row * HW
    idx = tl.arange(0, BLOCK)
    if HW <= BLOCK:
        mask = idx < HW
        if CL:
            offs = base + idx.to(tl.int64) * C
        else:
            offs = base + idx
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
        # Padded lanes become -inf before max/exp so they contribute exp(-inf) = 0; they are
        # zeroed (not -inf) in (t - s), because 0 * (-inf) would be NaN.
        xs = tl.where(mask, s, float("-inf"))
        xt = tl.where(mask, t, float("-inf"))
        ms = tl.max(xs, axis=0)
        mt = tl.max(xt, axis=0)
        es = tl.exp(xs - ms)
        et = tl.exp(xt - mt)
        zs = tl.sum(es, axis=0)
        zt = tl.sum(et, axis=0)
        cross = tl.sum(et * tl.where(mask, t - s, 0.0), axis=0)
        kl = cross / zt + (ms + tl.log(zs)) - (mt + tl.log(zt))
        g = v * (es / zs - et / zt)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + pid, w * kl)
    else:
        ms = float("-inf")
        mt = float("-inf")
        zs = 0.0
        zt = 0.0
        cross = 0.0
        for start in range(0, HW, BLOCK):
            cur = start + idx
            mask = cur < HW
            if CL:
                offs = base + cur.to(tl.int64) * C
            else:
                offs = base + cur
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            xs = tl.where(mask, s, float("-inf"))
            xt = tl.where(mask, t, float("-inf"))
            new_ms = tl.maximum(ms, tl.max(xs, axis=0))
            new_mt = tl.maximum(mt, tl.max(xt, axis=0))
            # Every chunk has a valid lane, so new_m is finite and exp(old - new) is 0 on the
            # first chunk (old = -inf) rather than NaN.
            zs = zs * tl.exp(ms - new_ms) + tl.sum(tl.exp(xs - new_ms), axis=0)
            et = tl.exp(xt - new_mt)
            rescale = tl.exp(mt - new_mt)
            zt = zt * rescale + tl.sum(et, axis=0)
            cross = cross * rescale + tl.sum(et * tl.where(mask, t - s, 0.0), axis=0)
            ms = new_ms
            mt = new_mt
        lse_s = ms + tl.log(zs)
        lse_t = mt + tl.log(zt)
        tl.store(part_ptr + pid, w * (cross / zt + lse_s - lse_t))
        for start in range(0, HW, BLOCK):
            cur = start + idx
            mask = cur < HW
            if CL:
                offs = base + cur.to(tl.int64) * C
            else:
                offs = base + cur
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            g = v * (tl.exp(s - lse_s) - tl.exp(t - lse_t))
            tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cwd_kernel(part_ptr, inv_tau,
                s0, t0, g0, C0, HW0, e0, w0, v0,
                s1, t1, g1, C1, HW1, e1, w1, v1,
                s2, t2, g2, C2, HW2, e2, w2, v2,
                s3, t3, g3, C3, HW3, e3, w3, v3,
                s4, t4, g4, C4, HW4, e4, w4, v4,
                s5, t5, g5, C5, HW5, e5, w5, v5,
                BLOCK: tl.constexpr, CL: tl.constexpr):
    # Level i owns programs [e_{i-1}, e_i); unused slots have empty ranges.
    pid = tl.program_id(0)
    if pid < e0:
        _cwd_row(s0, t0, g0, part_ptr, pid, pid, C0, HW0, w0, v0, inv_tau, BLOCK, CL)
    if (pid >= e0) & (pid < e1):
        _cwd_row(s1, t1, g1, part_ptr, pid, pid - e0, C1, HW1, w1, v1, inv_tau, BLOCK, CL)
    if (pid >= e1) & (pid < e2):
        _cwd_row(s2, t2, g2, part_ptr, pid, pid - e1, C2, HW2, w2, v2, inv_tau, BLOCK, CL)
    if (pid >= e2) & (pid < e3):
        _cwd_row(s3, t3, g3, part_ptr, pid, pid - e2, C3, HW3, w3, v3, inv_tau, BLOCK, CL)
    if (pid >= e3) & (pid < e4):
        _cwd_row(s4, t4, g4, part_ptr, pid, pid - e3, C4, HW4, w4, v4, inv_tau, BLOCK, CL)
    if (pid >= e4) & (pid < e5):
        _cwd_row(s5, t5, g5, part_ptr, pid, pid - e4, C5, HW5, w5, v5, inv_tau, BLOCK, CL)


def pick_block(longest_row: int) -> int:
    """The smallest ladder BLOCK holding the longest row, else the largest (two-pass rows)."""
    for block in BLOCKS:
        if longest_row <= block:
            return block
    return BLOCKS[-1]


def cwd_forward(student: Sequence[Tensor], teacher: Sequence[Tensor], tau: float,
                block: Optional[int] = None) -> tuple:
    """Loss (0-d fp32) and per-level gradient buffers (unit ``grad_output``)."""
    if len(student) != len(teacher) or len(student) == 0:
        raise LossError(f"cwd_triton: expected equal, non-zero numbers of student and teacher levels, "
                        f"got {len(student)} and {len(teacher)}")
    if not tau > 0:
        raise LossError(f"cwd_triton: tau must be positive, got {tau}")
    pairs = []
    for i, (s, t) in enumerate(zip(student, teacher)):
        check_pair(s, t, "cwd_triton", i)
        if s.dim() != 4:
            raise LossError(f"cwd_triton: expected N x C x H x W features, got shape {tuple(s.shape)} at level {i}")
        if s.dtype != student[0].dtype:
            raise LossError(f"cwd_triton: all levels must share one dtype, got {student[0].dtype} at level 0 "
                            f"and {s.dtype} at level {i}")
        pairs.append(nchw_layout(s, t.detach()))
    channels_last = all(cl for _, _, cl in pairs)
    pairs = [(s, t) if cl == channels_last else (s.contiguous(), t.contiguous()) for s, t, cl in pairs]
    grads = [torch.empty_like(s) for s, _ in pairs]  # keeps s's layout
    if block is None:
        block = pick_block(max(s.shape[2] * s.shape[3] for s, _ in pairs))
    rows = [s.shape[0] * s.shape[1] for s, _ in pairs]
    partials = torch.zeros(max(sum(rows), 1), dtype=torch.float32, device=pairs[0][0].device)
    offset = 0
    for group in level_groups(len(pairs)):
        args: list = []
        end = 0
        for slot in range(MAX_LEVELS):
            if slot < len(group):
                i = group[slot]
                s, t = pairs[i]
                n, c, h, w = s.shape
                end += rows[i]
                args += [s, t, grads[i], c, h * w, end, tau * tau / (n * c), tau / (n * c)]
            else:
                s, t = pairs[group[0]]
                args += [s, t, grads[group[0]], 1, 0, end, 0.0, 0.0]
        if end:
            _cwd_kernel[(end,)](partials[offset:], 1.0 / tau, *args, BLOCK=block, CL=channels_last,
                                num_warps=NUM_WARPS.get(block, 4))
        offset += end
    return sum_partials(partials), grads


class CWDFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`cwd_forward`; backward rescales the saved gradient buffers."""

    @staticmethod
    def forward(ctx, tau: float, block: Optional[int], n_levels: int, *tensors: Tensor) -> Tensor:
        loss, grads = cwd_forward(tensors[:n_levels], tensors[n_levels:], tau, block)
        ctx.grads, ctx.n_levels, ctx.used = grads, n_levels, False
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.used:
            raise LossError("the fused Triton losses support one backward pass per forward; "
                            "recompute the loss instead of using retain_graph=True")
        ctx.used = True
        scale_grads_(ctx.grads, grad_output)
        return (None, None, None, *ctx.grads, *([None] * ctx.n_levels))


def cwd_triton(student: Sequence[Tensor], teacher: Sequence[Tensor], tau: float = 1.0, *,
               block: Optional[int] = None) -> Tensor:
    """Channel-wise distillation loss summed over levels, as a 0-d fp32 tensor.

    Args:
        student: the student's levels; they receive gradients.
        teacher: the teacher's levels, same shapes; treated as constants (no gradient).
        tau: softmax temperature (> 0).
        block: row block size override (a power of two). Rows longer than ``block`` take the
            two-pass path; tests use a small value to exercise it. Default: from :data:`BLOCKS`.

    Shape:
        student[i], teacher[i]: ``(N, C, H, W)``, fp32/bf16/fp16 (one dtype for all levels).
        Output: ``()`` fp32.
    """
    return CWDFunction.apply(tau, block, len(student), *student, *teacher)


def _specialisations() -> list:
    out = []
    for dt in DTYPES:
        ty = f"*{TRITON_DTYPE[dt]}"
        for block in BLOCKS:
            for cl in (False, True):
                sig = {"part_ptr": "*fp32", "inv_tau": "fp32"}
                for i in range(MAX_LEVELS):
                    sig.update({f"s{i}": ty, f"t{i}": ty, f"g{i}": ty, f"C{i}": "i32", f"HW{i}": "i32",
                                f"e{i}": "i32", f"w{i}": "fp32", f"v{i}": "fp32"})
                sig.update({"BLOCK": "constexpr", "CL": "constexpr"})
                out.append(("_cwd_kernel", sig, {"BLOCK": block, "CL": cl}, NUM_WARPS[block]))
    return out


#: Every (kernel, signature, constexprs, num_warps) this module launches (see tests/test_kernels_compile.py).
SPECIALISATIONS = tuple(_specialisations())

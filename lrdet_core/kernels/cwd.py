"""Fused channel-wise distillation (CWD) loss over all pyramid levels, one Triton launch per pass and row block.

Math (Shu et al., 2021), per level with ``N x C x H x W`` student ``S`` and teacher ``T``::

    p_t = softmax_hw(T[n, c] / tau),  p_s = softmax_hw(S[n, c] / tau)
    L   = tau^2 / (N C) * sum_{n,c} KL(p_t || p_s),   summed over levels
    KL  = sum_hw p_t (T - S) / tau  +  lse_hw(S / tau) - lse_hw(T / tau)
    dL/dS = tau / (N C) * (p_s - p_t)

Everything is computed from max-shifted logsumexps, so the loss stays finite for logits of
any finite magnitude (``1e4`` and beyond) where ``log(softmax)`` would underflow to ``-inf``.

One program per ``(n, c)`` row; programs are laid out level after level, levels with the same
row block (:func:`pick_block`) in one launch. The forward pass
streams each row once: a row that fits one ``BLOCK`` is loaded once and reduced in registers;
a longer row (P3 at 800x1333 is 100x168 = 16,800 cells) is walked in ``BLOCK`` chunks keeping
*per-lane* running max, sum-exp and ``sum exp(T - max) (T - S)`` for S and T (rescaled when a
lane's max grows), which are combined across lanes once per row, not once per chunk. It writes
the row's KL partial and the two logsumexps (8 bytes per row). The backward pass streams each
row once more and writes ``grad_output * tau/(N C) * (p_s - p_t)`` from those logsumexps.

Bytes moved (minimum, per element): forward **2** element accesses (read S and T), backward
**3** (read S and T, write the gradient) for rows of any length: **5** in all. The gradient is
computed in fp32 with ``grad_output`` folded in and rounded once to the student's dtype (no
stored unit-scale buffer that fp16 would flush to zero under a GradScaler).

Layouts: contiguous NCHW (rows are unit-stride) is walked row by row here; channels_last (rows
have stride C) goes to :mod:`._cwd_channels_last`, which tiles cells x contiguous channels and
splits long rows over several programs. Both are indexed without a copy. Other layouts, or a
student and teacher in different layouts, fall back to ``.contiguous()``. All levels of one
call share the layout; when levels disagree the channels_last ones are made contiguous.
Student and teacher dtypes may differ (converted in registers).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import LossError
from . import _cwd_channels_last
from ._cwd_channels_last import _cwd_cl_combine_kernel, _cwd_cl_kernel  # noqa: F401 (named in SPECIALISATIONS)
from ._common import (MAX_LEVELS, TRITON_DTYPE, Slot, check_level_lists, check_once, check_pair, grad_factor,
                      launch_levels, level_groups, level_slot, nchw_layout, sum_partials)

#: Row block ladder and the warps of each. Each level gets its own BLOCK (:func:`pick_block`);
#: levels sharing a BLOCK share a launch. Rows longer than their BLOCK are walked in chunks.
BLOCKS = (256, 1024, 4096)
#: A level takes the largest BLOCK whose chunks cover its rows with at most this much padding.
MAX_PADDING = 1.25
NUM_WARPS = {256: 1, 1024: 4, 4096: 16}  # 8 elements per thread per tensor: 128-bit bf16 loads
#: Integer arguments the JIT does not specialise (each specialisation of this kernel costs
#: seconds to compile, and the pyramid changes with every multi-scale input size): the program
#: range ends and the channel counts (not used for addressing). ``HW_i`` stays specialised:
#: ``HW % 16 == 0`` aligns the rows for vector loads.
NO_SPECIALISE = [f"{k}{i}" for i in range(MAX_LEVELS) for k in ("C", "e")]


@triton.jit
def _row_offsets(row, HW, cur):
    return row.to(tl.int64) * HW + cur


@triton.jit
def _cwd_row_forward(s_ptr, t_ptr, part_ptr, lse_ptr, pid, row, C, HW, w, inv_tau,
                     BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    if HW <= BLOCK:
        mask = idx < HW
        offs = _row_offsets(row, HW, idx)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
        # Padded lanes become -inf before max/exp so they contribute exp(-inf) = 0; they are
        # zeroed (not -inf) in (t - s), because 0 * (-inf) would be NaN.
        xs = tl.where(mask, s, float("-inf"))
        xt = tl.where(mask, t, float("-inf"))
        ms = tl.max(xs, axis=0)
        mt = tl.max(xt, axis=0)
        zs = tl.sum(tl.exp(xs - ms), axis=0)
        et = tl.exp(xt - mt)
        zt = tl.sum(et, axis=0)
        cross = tl.sum(et * tl.where(mask, t - s, 0.0), axis=0)
    else:
        # Per-lane running statistics: no cross-warp reduction inside the loop.
        m_s = tl.full([BLOCK], float("-inf"), tl.float32)
        m_t = tl.full([BLOCK], float("-inf"), tl.float32)
        z_s = tl.zeros([BLOCK], tl.float32)
        z_t = tl.zeros([BLOCK], tl.float32)
        c_t = tl.zeros([BLOCK], tl.float32)
        for start in range(0, HW, BLOCK):
            cur = start + idx
            mask = cur < HW
            offs = _row_offsets(row, HW, cur)
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            new_s = tl.maximum(m_s, tl.where(mask, s, float("-inf")))
            new_t = tl.maximum(m_t, tl.where(mask, t, float("-inf")))
            # A lane that has seen no element yet stays at (-inf, 0): exp(-inf - -inf) is NaN,
            # so its rescale factor is forced to 0 (its sums are 0 anyway).
            rescale_s = tl.where(new_s == float("-inf"), 0.0, tl.exp(m_s - new_s))
            z_s = z_s * rescale_s + tl.where(mask, tl.exp(s - new_s), 0.0)
            rescale_t = tl.where(new_t == float("-inf"), 0.0, tl.exp(m_t - new_t))
            et = tl.where(mask, tl.exp(t - new_t), 0.0)
            z_t = z_t * rescale_t + et
            c_t = c_t * rescale_t + et * (t - s)
            m_s = new_s
            m_t = new_t
        # Once per row: combine the lanes (a lane still at -inf contributes exp(-inf) * 0 = 0).
        ms = tl.max(m_s, axis=0)
        mt = tl.max(m_t, axis=0)
        zs = tl.sum(z_s * tl.exp(m_s - ms), axis=0)
        lane_t = tl.exp(m_t - mt)
        zt = tl.sum(z_t * lane_t, axis=0)
        cross = tl.sum(c_t * lane_t, axis=0)
    # lse_s - lse_t as (ms - mt) + (log zs - log zt): adding log z to a large maximum first would
    # round it at the maximum's ulp. Each logsumexp is kept as its two parts for the same reason.
    log_zs = tl.log(zs)
    log_zt = tl.log(zt)
    tl.store(part_ptr + pid, w * (cross / zt + (ms - mt) + (log_zs - log_zt)))
    tl.store(lse_ptr + 4 * pid, ms)
    tl.store(lse_ptr + 4 * pid + 1, log_zs)
    tl.store(lse_ptr + 4 * pid + 2, mt)
    tl.store(lse_ptr + 4 * pid + 3, log_zt)


@triton.jit
def _cwd_row_backward(s_ptr, t_ptr, g_ptr, lse_ptr, pid, row, C, HW, v, inv_tau,
                      BLOCK: tl.constexpr):
    ms = tl.load(lse_ptr + 4 * pid)
    log_zs = tl.load(lse_ptr + 4 * pid + 1)
    mt = tl.load(lse_ptr + 4 * pid + 2)
    log_zt = tl.load(lse_ptr + 4 * pid + 3)
    idx = tl.arange(0, BLOCK)
    for start in range(0, HW, BLOCK):
        cur = start + idx
        mask = cur < HW
        offs = _row_offsets(row, HW, cur)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
        g = v * (tl.exp((s - ms) - log_zs) - tl.exp((t - mt) - log_zt))
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cwd_row(s_ptr, t_ptr, g_ptr, part_ptr, lse_ptr, go, pid, row, C, HW, w, v, inv_tau,
             BLOCK: tl.constexpr, GRAD: tl.constexpr):
    if GRAD:
        _cwd_row_backward(s_ptr, t_ptr, g_ptr, lse_ptr, pid, row, C, HW, go * v, inv_tau, BLOCK)
    else:
        _cwd_row_forward(s_ptr, t_ptr, part_ptr, lse_ptr, pid, row, C, HW, w, inv_tau, BLOCK)


@triton.jit(do_not_specialize=NO_SPECIALISE)
def _cwd_kernel(part_ptr, lse_ptr, go_ptr, inv_tau,
                s0, t0, g0, C0, HW0, e0, w0, v0,
                s1, t1, g1, C1, HW1, e1, w1, v1,
                s2, t2, g2, C2, HW2, e2, w2, v2,
                s3, t3, g3, C3, HW3, e3, w3, v3,
                s4, t4, g4, C4, HW4, e4, w4, v4,
                s5, t5, g5, C5, HW5, e5, w5, v5,
                BLOCK: tl.constexpr, GRAD: tl.constexpr):
    # GRAD=False: forward (KL partial and the two logsumexps per row). GRAD=True: backward, the
    # gradient times grad_output read on the device (no host sync, graph-capturable).
    # One program per row, levels one after the other (see level_slot).
    pid = tl.program_id(0)
    go = 1.0
    if GRAD:
        go = tl.load(go_ptr).to(tl.float32)
    mine, row = level_slot(pid, 0, e0)
    if mine:
        _cwd_row(s0, t0, g0, part_ptr, lse_ptr, go, pid, row, C0, HW0, w0, v0, inv_tau, BLOCK, GRAD)
    mine, row = level_slot(pid, e0, e1)
    if mine:
        _cwd_row(s1, t1, g1, part_ptr, lse_ptr, go, pid, row, C1, HW1, w1, v1, inv_tau, BLOCK, GRAD)
    mine, row = level_slot(pid, e1, e2)
    if mine:
        _cwd_row(s2, t2, g2, part_ptr, lse_ptr, go, pid, row, C2, HW2, w2, v2, inv_tau, BLOCK, GRAD)
    mine, row = level_slot(pid, e2, e3)
    if mine:
        _cwd_row(s3, t3, g3, part_ptr, lse_ptr, go, pid, row, C3, HW3, w3, v3, inv_tau, BLOCK, GRAD)
    mine, row = level_slot(pid, e3, e4)
    if mine:
        _cwd_row(s4, t4, g4, part_ptr, lse_ptr, go, pid, row, C4, HW4, w4, v4, inv_tau, BLOCK, GRAD)
    mine, row = level_slot(pid, e4, e5)
    if mine:
        _cwd_row(s5, t5, g5, part_ptr, lse_ptr, go, pid, row, C5, HW5, w5, v5, inv_tau, BLOCK, GRAD)


def pick_block(row: int) -> int:
    """The largest ladder BLOCK that walks a row of ``row`` cells with <= 25 % masked lanes, else the smallest.

    RetinaNet at 800x1333: P3 (16,800 cells) 4096, P4 (4,200) 1024, P5-P7 (1,050, 273, 77) 256;
    one BLOCK for all (4096, by the longest row) ran P5-P7 at 26 %, 7 % and 2 % useful lanes.
    """
    for block in reversed(BLOCKS):
        if triton.cdiv(row, block) * block <= MAX_PADDING * row:
            return block
    return BLOCKS[0]


def launch_plan(rows: Sequence[int], block: Optional[int]) -> List[Tuple[int, List[int]]]:
    """``(BLOCK, level indices)`` per launch: levels grouped by BLOCK, at most MAX_LEVELS per launch."""
    by_block: Dict[int, List[int]] = {}
    for i, row in enumerate(rows):
        by_block.setdefault(block or pick_block(row), []).append(i)
    return [(b, [levels[j] for j in group]) for b, levels in sorted(by_block.items(), reverse=True)
            for group in level_groups(len(levels))]


def prepare(student: Sequence[Tensor], teacher: Sequence[Tensor], tau: float) -> tuple:
    """Checked ``(s, t)`` pairs (teacher detached) and the shared channels_last flag."""
    check_level_lists("cwd_loss_triton", student=student, teacher=teacher)
    if not tau > 0:
        raise LossError(f"cwd_loss_triton: tau must be positive, got {tau}")
    pairs = []
    for i, (s, t) in enumerate(zip(student, teacher)):
        check_pair(s, t, "cwd_loss_triton", i)
        if s.dim() != 4:
            raise LossError(f"cwd_loss_triton: expected N x C x H x W features, got shape {tuple(s.shape)} "
                            f"at level {i}")
        pairs.append(nchw_layout(s.detach(), t.detach()))
    channels_last = all(cl for _, _, cl in pairs)
    pairs = [(s, t) if cl == channels_last else (s.contiguous(), t.contiguous()) for s, t, cl in pairs]
    return pairs, channels_last


def run(pairs: Sequence[tuple], channels_last: bool, tau: float, block: Optional[int], lse: Tensor,
        grads: Sequence[Tensor] = (), grad_output: Optional[Tensor] = None) -> Optional[Tensor]:
    """Forward (no ``grads``): the loss, filling ``lse``. Backward: fill ``grads`` from ``lse``."""
    if channels_last:
        return _cwd_channels_last.run(pairs, tau, lse, block, grads, grad_output)
    backward = bool(grads)
    rows = [s.shape[0] * s.shape[1] for s, _ in pairs]
    dev = pairs[0][0].device
    total = sum(rows)
    # Every program writes its partial; only an input without rows leaves the one slot unwritten.
    partials = (lse if backward else torch.empty(total, dtype=torch.float32, device=dev) if total
                else torch.zeros(1, dtype=torch.float32, device=dev))
    go = grad_factor(grad_output) if backward else lse
    slots = []
    for i, (s, t) in enumerate(pairs):
        n, c, h, w = s.shape
        g = grads[i] if backward else s  # forward never touches g
        slots.append(Slot(rows[i], (s, t, g), (c, h * w), (tau * tau / (n * c), tau / (n * c))))
    done = 0
    for block, group in launch_plan([s.shape[2] * s.shape[3] for s, _ in pairs], block):
        # Rows are numbered across launches: each launch starts its partials and logsumexps at its first row.
        done = launch_levels(_cwd_kernel, pairs[0][0], slots,
                             lambda first: (partials[first:], lse[4 * first:], go, 1.0 / tau),
                             groups=[group], start=done, BLOCK=block, GRAD=backward,
                             num_warps=NUM_WARPS.get(block, 4))
    return None if backward else sum_partials(partials)


class CWDFunction(torch.autograd.Function):
    """Autograd wrapper: forward returns the loss, backward recomputes the gradient from S, T and the logsumexps."""

    @staticmethod
    def forward(ctx, tau: float, block: Optional[int], n_levels: int, *tensors: Tensor) -> Tensor:
        pairs, channels_last = prepare(tensors[:n_levels], tensors[n_levels:], tau)
        rows = sum(s.shape[0] * s.shape[1] for s, _ in pairs)
        # Per row: the maximum and log of the sum of exponentials, student then teacher.
        lse = torch.empty(4 * max(rows, 1), dtype=torch.float32, device=pairs[0][0].device)
        loss = run(pairs, channels_last, tau, block, lse)
        ctx.meta = (tau, block, n_levels, channels_last)
        ctx.save_for_backward(lse, *[x for pair in pairs for x in pair])
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        check_once(ctx)
        tau, block, n_levels, channels_last = ctx.meta
        lse, *flat = ctx.saved_tensors
        pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(n_levels)]
        grads = [torch.empty_like(s) for s, _ in pairs]  # keeps s's layout and dtype
        run(pairs, channels_last, tau, block, lse, grads, grad_output)
        return (None, None, None, *grads, *([None] * n_levels))


def cwd_loss_triton(student: Sequence[Tensor], teacher: Sequence[Tensor], tau: float = 1.0, *,
                    block: Optional[int] = None) -> Tensor:
    """Channel-wise distillation loss summed over levels, as a 0-d fp32 tensor.

    Args:
        student: the student's levels; they receive gradients.
        teacher: the teacher's levels, same shapes; treated as constants (no gradient).
        tau: softmax temperature (> 0).
        block: contiguous NCHW: row block size override (a power of two); rows longer than
            ``block`` are walked in chunks. channels_last: cells per program (rows longer than
            that are split over programs). Tests use a small value to exercise those paths.
            Default: from :data:`BLOCKS` (NCHW), ``_cwd_channels_last.CHUNK`` (channels_last).

    Shape:
        student[i], teacher[i]: ``(N, C, H, W)``, fp32/bf16/fp16 each (the gradient has the student's dtype).
        Output: ``()`` fp32.
    """
    check_level_lists("cwd_loss_triton", student=student, teacher=teacher)
    return CWDFunction.apply(tau, block, len(student), *student, *teacher)


def _specialisations() -> list:
    out = []
    # fp16 compiles to bf16's code up to the convert instructions; the compile test checks bf16 for both.
    pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
    for sdt, tdt in pairs:
        for block in BLOCKS:
            for grad in (False, True):
                sig = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "go_ptr": "*fp32", "inv_tau": "fp32"}
                for i in range(MAX_LEVELS):
                    sig.update({f"s{i}": f"*{TRITON_DTYPE[sdt]}", f"t{i}": f"*{TRITON_DTYPE[tdt]}",
                                f"g{i}": f"*{TRITON_DTYPE[sdt]}", f"C{i}": "i32", f"HW{i}": "i32",
                                f"e{i}": "i32", f"w{i}": "fp32", f"v{i}": "fp32"})
                sig.update({"BLOCK": "constexpr", "GRAD": "constexpr"})
                out.append(("_cwd_kernel", sig, {"BLOCK": block, "GRAD": grad}, NUM_WARPS[block]))
    return out + _cwd_channels_last.specialisations(pairs)


#: Every (kernel, signature, constexprs, num_warps) this module launches (see tests/test_kernels_compile.py).
SPECIALISATIONS = tuple(_specialisations())

"""The elementwise kernels behind :mod:`.mse` and :mod:`.l1`: all levels in one launch per pass.

Forward reads S and T and writes one fp32 partial per program (2 element accesses); backward
reads S and T again and writes ``grad_output * dL/dS`` in the student's dtype (3 accesses).
The gradient is never stored between the passes: ``grad_output`` (a loss weight, a GradScaler
scale) is folded in before the single rounding to the student's dtype, so fp16 gradients under
a 65536 loss scale keep the range eager PyTorch gives them.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import LossError
from ._common import (DTYPES, MAX_LEVELS, TRITON_DTYPE, Slot, check_level_lists, check_once, check_pair, flat_pair,
                      grad_factor, launch_levels, level_slot, sum_partials)

#: Elements per program. 4096 fp32 over 8 warps is 16 per thread per tensor: enough loads in
#: flight to saturate HBM without spilling (checked by tests/test_kernels_compile.py).
BLOCK = 4096
NUM_WARPS = 8
REDUCTIONS = ("sum", "mean")
#: Integer arguments the JIT does not specialise: the program-range ends change with every
#: pyramid shape and buy no vectorisation. ``n_i`` stays specialised: ``n % 16 == 0`` makes the
#: tail mask constant over 16 lanes, which is what lets the loads be 128-bit vectors.
NO_SPECIALISE = [f"e{i}" for i in range(MAX_LEVELS)]


@triton.jit
def _pointwise_block(s_ptr, t_ptr, g_ptr, part_ptr, go, pid, local, n, w,
                     BLOCK: tl.constexpr, ABS: tl.constexpr, GRAD: tl.constexpr):
    offs = local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # Padded lanes load s == t == 0, so they add exactly 0 to the loss and the gradient.
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = s - t
    if GRAD:
        # w is the reduction weight; go = grad_output is folded in before the one rounding.
        scale = go * w
        if ABS:
            # sign(d) with sign(0) = 0: the subgradient torch uses for |x| at 0.
            g = tl.where(d > 0, scale, tl.where(d < 0, -scale, 0.0))
        else:
            g = (2.0 * scale) * d
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    else:
        if ABS:
            part = tl.sum(tl.abs(d), axis=0) * w
        else:
            part = tl.sum(d * d, axis=0) * w
        tl.store(part_ptr + pid, part)


@triton.jit(do_not_specialize=NO_SPECIALISE)
def _pointwise_kernel(part_ptr, go_ptr,
                      s0, t0, g0, n0, e0, w0,
                      s1, t1, g1, n1, e1, w1,
                      s2, t2, g2, n2, e2, w2,
                      s3, t3, g3, n3, e3, w3,
                      s4, t4, g4, n4, e4, w4,
                      s5, t5, g5, n5, e5, w5,
                      BLOCK: tl.constexpr, ABS: tl.constexpr, GRAD: tl.constexpr):
    # GRAD=False: forward, one loss partial per program. GRAD=True: backward, the gradient times
    # grad_output (read on the device: no host sync, CUDA graphs keep working).
    # Programs are laid out level after level (see level_slot); exactly one branch runs per program.
    pid = tl.program_id(0)
    go = 1.0
    if GRAD:
        go = tl.load(go_ptr).to(tl.float32)
    mine, local = level_slot(pid, 0, e0)
    if mine:
        _pointwise_block(s0, t0, g0, part_ptr, go, pid, local, n0, w0, BLOCK, ABS, GRAD)
    mine, local = level_slot(pid, e0, e1)
    if mine:
        _pointwise_block(s1, t1, g1, part_ptr, go, pid, local, n1, w1, BLOCK, ABS, GRAD)
    mine, local = level_slot(pid, e1, e2)
    if mine:
        _pointwise_block(s2, t2, g2, part_ptr, go, pid, local, n2, w2, BLOCK, ABS, GRAD)
    mine, local = level_slot(pid, e2, e3)
    if mine:
        _pointwise_block(s3, t3, g3, part_ptr, go, pid, local, n3, w3, BLOCK, ABS, GRAD)
    mine, local = level_slot(pid, e3, e4)
    if mine:
        _pointwise_block(s4, t4, g4, part_ptr, go, pid, local, n4, w4, BLOCK, ABS, GRAD)
    mine, local = level_slot(pid, e4, e5)
    if mine:
        _pointwise_block(s5, t5, g5, part_ptr, go, pid, local, n5, w5, BLOCK, ABS, GRAD)


def prepare(student: Sequence[Tensor], teacher: Sequence[Tensor], reduction: str,
            name: str) -> List[Tuple[Tensor, Tensor]]:
    """Checked ``(s, t)`` pairs in a layout the kernel walks flat (teacher detached)."""
    if reduction not in REDUCTIONS:
        raise LossError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_level_lists(name, student=student, teacher=teacher)
    pairs = []
    for i, (s, t) in enumerate(zip(student, teacher)):
        check_pair(s, t, name, i)
        pairs.append(flat_pair(s.detach(), t.detach()))
    return pairs


def run(pairs: Sequence[Tuple[Tensor, Tensor]], reduction: str, absolute: bool,
        grads: Sequence[Tensor] = (), grad_output: Tensor = None) -> Tensor:
    """Forward (no ``grads``): the loss as a 0-d fp32 tensor. Backward: fill ``grads``, return None."""
    backward = bool(grads)
    blocks = [triton.cdiv(s.numel(), BLOCK) for s, _ in pairs]
    dev = pairs[0][0].device
    total = sum(blocks)
    if backward:
        go = grad_factor(grad_output)
        partials = go  # not written by the backward launch
    else:
        # Every program writes its partial; only an all-empty input leaves the one slot unwritten.
        partials = (torch.empty(total, dtype=torch.float32, device=dev) if total
                    else torch.zeros(1, dtype=torch.float32, device=dev))
        go = partials  # not read by the forward launch
    slots = []
    for i, (s, t) in enumerate(pairs):
        n = s.numel()
        g = grads[i] if backward else s  # forward never touches g
        slots.append(Slot(blocks[i], (s, t, g), (n,), (1.0 / n if reduction == "mean" else 1.0,)))
    # The backward launch writes no partials: every group gets the same (unread) buffer.
    launch_levels(_pointwise_kernel, pairs[0][0], slots, lambda done: (go if backward else partials[done:], go),
                  BLOCK=BLOCK, ABS=absolute, GRAD=backward, num_warps=NUM_WARPS)
    return None if backward else sum_partials(partials)


class PointwiseFunction(torch.autograd.Function):
    """Shared autograd wrapper: forward returns the loss, backward recomputes the gradient from S and T."""

    @staticmethod
    def forward(ctx, absolute: bool, reduction: str, name: str, n_levels: int, *tensors: Tensor) -> Tensor:
        pairs = prepare(tensors[:n_levels], tensors[n_levels:], reduction, name)
        ctx.absolute, ctx.reduction, ctx.n_levels = absolute, reduction, n_levels
        ctx.save_for_backward(*[x for pair in pairs for x in pair])
        return run(pairs, reduction, absolute)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        check_once(ctx)
        saved = ctx.saved_tensors
        pairs = [(saved[2 * i], saved[2 * i + 1]) for i in range(ctx.n_levels)]
        grads = [torch.empty_like(s) for s, _ in pairs]  # same (dense) strides and dtype as s
        run(pairs, ctx.reduction, ctx.absolute, grads, grad_output)
        # The teacher is a constant: None for every teacher level.
        return (None, None, None, None, *grads, *([None] * ctx.n_levels))


def specialisations(absolute: bool) -> list:
    """(kernel name, signature, constexprs, num_warps) for the launches :func:`run` makes.

    One entry per student dtype with a teacher of the same dtype, plus the bf16 and fp16
    students with an fp32 teacher (a half-precision student distilled from an fp32 teacher).
    """
    out = []
    pairs = [(dt, dt) for dt in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
    for sdt, tdt in pairs:
        for grad in (False, True):
            sig = {"part_ptr": "*fp32", "go_ptr": "*fp32"}
            for i in range(MAX_LEVELS):
                sig.update({f"s{i}": f"*{TRITON_DTYPE[sdt]}", f"t{i}": f"*{TRITON_DTYPE[tdt]}",
                            f"g{i}": f"*{TRITON_DTYPE[sdt]}", f"n{i}": "i32", f"e{i}": "i32", f"w{i}": "fp32"})
            sig.update({"BLOCK": "constexpr", "ABS": "constexpr", "GRAD": "constexpr"})
            out.append(("_pointwise_kernel", sig, {"BLOCK": BLOCK, "ABS": absolute, "GRAD": grad}, NUM_WARPS))
    return out

"""The elementwise kernel behind :mod:`.mse` and :mod:`.l1`: all levels in one launch."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import LossError
from ._common import (DTYPES, MAX_LEVELS, TRITON_DTYPE, check_pair, flat_pair, level_groups,
                      scale_grads_, sum_partials)

#: Elements per program. 4096 fp32 over 8 warps is 16 per thread per tensor: enough loads in
#: flight to saturate HBM without spilling (checked by tests/test_kernels_compile.py).
BLOCK = 4096
NUM_WARPS = 8
REDUCTIONS = ("sum", "mean")


@triton.jit
def _pointwise_block(s_ptr, t_ptr, g_ptr, part_ptr, pid, local, n, w, v,
                     BLOCK: tl.constexpr, ABS: tl.constexpr):
    offs = local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # Padded lanes load s == t == 0, so they add exactly 0 to the loss and the gradient.
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = s - t
    if ABS:
        part = tl.sum(tl.abs(d), axis=0) * w
        # sign(d) * v with sign(0) = 0: the subgradient torch uses for |x| at 0.
        g = tl.where(d > 0, v, tl.where(d < 0, -v, 0.0))
    else:
        part = tl.sum(d * d, axis=0) * w
        g = d * v
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid, part)


@triton.jit
def _pointwise_kernel(part_ptr,
                      s0, t0, g0, n0, e0, w0, v0,
                      s1, t1, g1, n1, e1, w1, v1,
                      s2, t2, g2, n2, e2, w2, v2,
                      s3, t3, g3, n3, e3, w3, v3,
                      s4, t4, g4, n4, e4, w4, v4,
                      s5, t5, g5, n5, e5, w5, v5,
                      BLOCK: tl.constexpr, ABS: tl.constexpr):
    # Programs are laid out level after level; e_i is the end of level i's program range.
    # Unused slots have an empty range, so exactly one branch runs per program.
    pid = tl.program_id(0)
    if pid < e0:
        _pointwise_block(s0, t0, g0, part_ptr, pid, pid, n0, w0, v0, BLOCK, ABS)
    if (pid >= e0) & (pid < e1):
        _pointwise_block(s1, t1, g1, part_ptr, pid, pid - e0, n1, w1, v1, BLOCK, ABS)
    if (pid >= e1) & (pid < e2):
        _pointwise_block(s2, t2, g2, part_ptr, pid, pid - e1, n2, w2, v2, BLOCK, ABS)
    if (pid >= e2) & (pid < e3):
        _pointwise_block(s3, t3, g3, part_ptr, pid, pid - e2, n3, w3, v3, BLOCK, ABS)
    if (pid >= e3) & (pid < e4):
        _pointwise_block(s4, t4, g4, part_ptr, pid, pid - e3, n4, w4, v4, BLOCK, ABS)
    if (pid >= e4) & (pid < e5):
        _pointwise_block(s5, t5, g5, part_ptr, pid, pid - e4, n5, w5, v5, BLOCK, ABS)


def pointwise_forward(student: Sequence[Tensor], teacher: Sequence[Tensor], reduction: str,
                      absolute: bool, name: str) -> Tuple[Tensor, List[Tensor]]:
    """Loss (0-d fp32) and the per-level gradient buffers (unit ``grad_output``)."""
    if reduction not in REDUCTIONS:
        raise LossError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if len(student) != len(teacher) or len(student) == 0:
        raise LossError(f"{name}: expected equal, non-zero numbers of student and teacher levels, "
                        f"got {len(student)} and {len(teacher)}")
    pairs = []
    for i, (s, t) in enumerate(zip(student, teacher)):
        check_pair(s, t, name, i)
        if s.dtype != student[0].dtype:
            raise LossError(f"{name}: all levels must share one dtype, got {student[0].dtype} at level 0 "
                            f"and {s.dtype} at level {i}")
        pairs.append(flat_pair(s, t.detach()))
    grads = [torch.empty_like(s) for s, _ in pairs]  # same (dense) strides as s
    blocks = [triton.cdiv(s.numel(), BLOCK) for s, _ in pairs]
    partials = torch.empty(max(sum(blocks), 1), dtype=torch.float32, device=pairs[0][0].device)
    partials.zero_()
    offset = 0
    for group in level_groups(len(pairs)):
        args: list = []
        end = 0
        for slot in range(MAX_LEVELS):
            if slot < len(group):
                i = group[slot]
                s, t = pairs[i]
                n = s.numel()
                w = 1.0 / n if reduction == "mean" else 1.0
                v = w if absolute else 2.0 * w
                end += blocks[i]
                args += [s, t, grads[i], n, end, w, v]
            else:
                s, t = pairs[group[0]]
                args += [s, t, grads[group[0]], 0, end, 0.0, 0.0]
        if end:
            _pointwise_kernel[(end,)](partials[offset:], *args, BLOCK=BLOCK, ABS=absolute,
                                      num_warps=NUM_WARPS)
        offset += end
    return sum_partials(partials), grads


class PointwiseFunction(torch.autograd.Function):
    """Shared autograd wrapper: forward returns the loss, backward rescales the saved gradients."""

    @staticmethod
    def forward(ctx, absolute: bool, reduction: str, name: str, n_levels: int, *tensors: Tensor) -> Tensor:
        student, teacher = tensors[:n_levels], tensors[n_levels:]
        loss, grads = pointwise_forward(student, teacher, reduction, absolute, name)
        ctx.grads = grads
        ctx.n_levels = n_levels
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.used:
            raise LossError("the fused Triton losses support one backward pass per forward; "
                            "recompute the loss instead of using retain_graph=True")
        ctx.used = True
        scale_grads_(ctx.grads, grad_output)  # in place: the buffer is ours, not the student's
        # The teacher is a constant: None for every teacher level.
        return (None, None, None, None, *ctx.grads, *([None] * ctx.n_levels))


def specialisations(absolute: bool) -> list:
    """(kernel name, signature, constexprs) for every launch :func:`pointwise_forward` can make."""
    out = []
    for dt in DTYPES:
        ty = f"*{TRITON_DTYPE[dt]}"
        sig = {"part_ptr": "*fp32"}
        for i in range(MAX_LEVELS):
            sig.update({f"s{i}": ty, f"t{i}": ty, f"g{i}": ty, f"n{i}": "i64", f"e{i}": "i32",
                        f"w{i}": "fp32", f"v{i}": "fp32"})
        sig.update({"BLOCK": "constexpr", "ABS": "constexpr"})
        out.append(("_pointwise_kernel", sig, {"BLOCK": BLOCK, "ABS": absolute}, NUM_WARPS))
    return out

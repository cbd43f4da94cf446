"""Helpers shared by the kernel modules: layout checks, the partial-sum and grad-scale kernels."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import LossError

#: Pyramid levels handled by one launch. Triton cannot index a table of pointers, so the
#: level pointers are separate kernel arguments; six covers P2-P7. More levels are split
#: into groups of six (one launch per group), still writing into one partials buffer.
MAX_LEVELS = 6

#: Input dtypes the launchers accept without a cast (accumulation is always fp32).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Triton signature names of the supported dtypes (used by the compile test).
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

SUM_BLOCK = 1024
SCALE_BLOCK = 4096


def is_dense(x: Tensor) -> bool:
    """True when ``x`` covers exactly ``x.numel()`` storage elements (any dimension order)."""
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def check_pair(student: Tensor, teacher: Tensor, name: str, level: int = 0) -> None:
    """Raise :class:`LossError` when a student/teacher pair cannot go to a kernel."""
    if student.shape != teacher.shape:
        raise LossError(f"{name}: student and teacher at level {level} are expected to have the same shape, "
                        f"but got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise LossError(f"{name}: student and teacher at level {level} are on different devices "
                        f"({student.device} and {teacher.device}); move them to one device")
    if student.dtype not in DTYPES:
        raise LossError(f"{name}: expected float32, bfloat16 or float16 features at level {level}, "
                        f"got {student.dtype}")


def flat_pair(student: Tensor, teacher: Tensor) -> Tuple[Tensor, Tensor]:
    """The pair as two tensors that can be walked over their flat storage in the same order.

    Any dense layout with equal strides (contiguous, channels_last, ...) is used as is.
    Otherwise both are made contiguous: a documented copy, the only one the kernels make.
    A teacher of another dtype is cast to the student's (also a copy).
    """
    if teacher.dtype != student.dtype:
        teacher = teacher.to(student.dtype)
    if student.stride() == teacher.stride() and is_dense(student):
        return student, teacher
    return student.contiguous(), teacher.contiguous()


def nchw_layout(student: Tensor, teacher: Tensor) -> Tuple[Tensor, Tensor, bool]:
    """The pair in one of the two row layouts the CWD/FGD kernels index: ``(s, t, channels_last)``.

    Contiguous NCHW and channels_last NHWC are used without a copy; anything else (including a
    pair whose layouts differ) falls back to ``.contiguous()`` for both.
    """
    if teacher.dtype != student.dtype:
        teacher = teacher.to(student.dtype)
    if student.stride() == teacher.stride():
        if student.is_contiguous():
            return student, teacher, False
        if student.dim() == 4 and student.is_contiguous(memory_format=torch.channels_last):
            return student, teacher, True
    return student.contiguous(), teacher.contiguous(), False


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # One program, fixed order: the result is bitwise identical run to run.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def sum_partials(partials: Tensor) -> Tensor:
    """Deterministic fp32 sum of a 1-D fp32 partials buffer, as a 0-d tensor (no host sync)."""
    out = torch.empty((), dtype=torch.float32, device=partials.device)
    _sum_partials_kernel[(1,)](partials, out, partials.numel(), BLOCK=SUM_BLOCK)
    return out


@triton.jit
def _scale_block(g_ptr, go, pid, n, BLOCK: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_ptr + offs, (g * go).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_grad_kernel(go_ptr,
                       g0, n0, e0, g1, n1, e1, g2, n2, e2,
                       g3, n3, e3, g4, n4, e4, g5, n5, e5,
                       BLOCK: tl.constexpr):
    # grad_output is read here, on the device: no host sync, CUDA graphs keep working.
    # When it is exactly 1 (the loss is the last op) the buffer is already the answer and
    # nothing is read or written, which keeps the pass at its minimum bytes.
    go = tl.load(go_ptr).to(tl.float32)
    if go != 1.0:
        pid = tl.program_id(0)
        if pid < e0:
            _scale_block(g0, go, pid, n0, BLOCK)
        if (pid >= e0) & (pid < e1):
            _scale_block(g1, go, pid - e0, n1, BLOCK)
        if (pid >= e1) & (pid < e2):
            _scale_block(g2, go, pid - e1, n2, BLOCK)
        if (pid >= e2) & (pid < e3):
            _scale_block(g3, go, pid - e2, n3, BLOCK)
        if (pid >= e3) & (pid < e4):
            _scale_block(g4, go, pid - e3, n4, BLOCK)
        if (pid >= e4) & (pid < e5):
            _scale_block(g5, go, pid - e4, n5, BLOCK)


def level_groups(n: int) -> List[range]:
    """Level indices split into launches of at most :data:`MAX_LEVELS`."""
    return [range(i, min(i + MAX_LEVELS, n)) for i in range(0, n, MAX_LEVELS)]


def scale_grads_(grads: Sequence[Tensor], grad_output: Tensor) -> None:
    """Multiply every (dense) gradient buffer in place by the 0-d device tensor ``grad_output``."""
    go = grad_output.to(torch.float32).reshape(())
    for group in level_groups(len(grads)):
        args: list = []
        end = 0
        for i in range(MAX_LEVELS):
            if i < len(group):
                g = grads[group[i]]
                end += triton.cdiv(g.numel(), SCALE_BLOCK)
                args += [g, g.numel(), end]
            else:
                args += [grads[group[0]], 0, end]  # empty slot: its pid range is empty
        if end:
            _scale_grad_kernel[(end,)](go, *args, BLOCK=SCALE_BLOCK)


#: (kernel, signature, constexprs) of the shared kernels, for the compile test.
def specialisations() -> list:
    out = [("_sum_partials_kernel", {"part_ptr": "*fp32", "out_ptr": "*fp32", "n": "i64", "BLOCK": "constexpr"},
            {"BLOCK": SUM_BLOCK})]
    for dt in DTYPES:
        sig = {"go_ptr": "*fp32"}
        for i in range(MAX_LEVELS):
            sig.update({f"g{i}": f"*{TRITON_DTYPE[dt]}", f"n{i}": "i64", f"e{i}": "i32"})
        sig["BLOCK"] = "constexpr"
        out.append(("_scale_grad_kernel", sig, {"BLOCK": SCALE_BLOCK}))
    return out

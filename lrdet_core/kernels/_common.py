"""Helpers shared by the kernel modules: layout and input checks, the launch helper, the level-slot
table (packed on the host by :func:`launch_levels`, decoded in the kernels by :func:`level_slot`),
the program-index split of tiled kernels and the partial-sum kernel."""
from __future__ import annotations

import contextlib
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import LossError

#: Pyramid levels handled by one launch. Triton cannot index a table of pointers, so the
#: level pointers are separate kernel arguments; six covers P2-P7. More levels are split
#: into groups of six (one launch per group), still writing into one partials buffer.
MAX_LEVELS = 6

#: Input dtypes the launchers accept without a cast (accumulation is always fp32). Student and
#: teacher may differ: each has its own pointer type and is converted in registers.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Triton signature names of the supported dtypes (used by the compile test).
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

#: Lanes of the partial-sum kernel: RetinaNet at N = 16 gives ~22,000 partials, i.e. 3 steps of its
#: loop, each a dependent load (a 1024-lane loop took 22).
SUM_BLOCK = 8192
SUM_WARPS = 8


def _is_cuda(x: Tensor) -> bool:
    # One seam, so the device-guard test can take the CUDA branch on a CPU machine.
    return x.is_cuda


def device_of(x: Tensor):
    """``torch.cuda.device(x.device)`` for CUDA tensors, a no-op context otherwise.

    Triton launches on the *current* CUDA device and stream, not on the tensors' device; without
    this a loss on ``cuda:1`` called while ``cuda:0`` is current would run on the wrong device.
    """
    return torch.cuda.device(x.device) if _is_cuda(x) else contextlib.nullcontext()


def launch(kernel, grid: tuple, ref: Tensor, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` under ``ref``'s CUDA device: the one launch site of the package."""
    with device_of(ref):
        kernel[grid](*args, **kwargs)


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


def flat_pair(student: Tensor, teacher: Tensor) -> Tuple[Tensor, Tensor]:
    """The pair as two tensors that can be walked over their flat storage in the same order.

    Any dense layout with equal strides (contiguous, channels_last, ...) is used as is.
    Otherwise both are made contiguous: a documented copy, the only one the kernels make.
    Dtypes are left alone (the kernels convert each side in registers).
    """
    if student.stride() == teacher.stride() and is_dense(student):
        return student, teacher
    return student.contiguous(), teacher.contiguous()


def nchw_layout(student: Tensor, teacher: Tensor) -> Tuple[Tensor, Tensor, bool]:
    """The pair in one of the two row layouts the CWD/FGD kernels index: ``(s, t, channels_last)``.

    Contiguous NCHW and channels_last NHWC are used without a copy; anything else (including a
    pair whose layouts differ) falls back to ``.contiguous()`` for both. Dtypes are left alone.
    """
    if student.stride() == teacher.stride():
        if student.is_contiguous():
            return student, teacher, False
        if student.dim() == 4 and student.is_contiguous(memory_format=torch.channels_last):
            return student, teacher, True
    return student.contiguous(), teacher.contiguous(), False


@triton.jit(do_not_specialize=["n"])
def _sum_partials_kernel(part_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # One program per row of partials, fixed order: the result is bitwise identical run to run.
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + row.to(tl.int64) * n + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


def sum_partials(partials: Tensor) -> Tensor:
    """Deterministic fp32 sums of the rows of a contiguous fp32 partials buffer (no host sync).

    A 1-D buffer gives a 0-d tensor; an ``(R, P)`` buffer gives ``R`` sums in one launch.
    """
    rows = 1 if partials.dim() == 1 else partials.shape[0]
    out = torch.empty(rows, dtype=torch.float32, device=partials.device)
    launch(_sum_partials_kernel, (rows,), partials, partials, out, partials.shape[-1], BLOCK=SUM_BLOCK,
           num_warps=SUM_WARPS)
    return out.reshape(()) if partials.dim() == 1 else out


def level_groups(n: int) -> List[range]:
    """Level indices split into launches of at most :data:`MAX_LEVELS`."""
    return [range(i, min(i + MAX_LEVELS, n)) for i in range(0, n, MAX_LEVELS)]


# ------------------------------------------------------------- level slots (host and device)
#
# Every streaming kernel takes MAX_LEVELS "slots" of per-level arguments: a level's tensors, its
# sizes, the end of its program range and its offsets. Programs are laid out level after level;
# a program finds its level with :func:`level_slot`. The host side of that table is
# :func:`launch_levels`.


class Slot(NamedTuple):
    """One level's arguments in a launch over several levels.

    The kernel reads them as ``*tensors, *before, e_i, *after`` where ``e_i`` is the end of the
    level's program range, filled in by :func:`launch_levels`.
    """

    programs: int  #: programs the level owns
    tensors: tuple  #: its pointers (student, teacher and, in backward, gradient)
    before: tuple = ()  #: numbers before the range end (sizes)
    after: tuple = ()  #: numbers after it (weights, side-buffer offsets)


def _zeros_like(values: tuple) -> list:
    # Same Python types (int stays int, float stays float): the kernel's signature must not change.
    return [type(v)(0) for v in values]


def launch_levels(kernel, ref: Tensor, slots: Sequence[Slot], head: Callable[[int], Sequence], *,
                  groups: Optional[Sequence[Sequence[int]]] = None, start: int = 0, **meta) -> int:
    """Launch ``kernel`` over the levels in ``slots``: one launch per group of :data:`MAX_LEVELS`.

    Args:
        kernel: a Triton kernel taking ``*head(done)`` then :data:`MAX_LEVELS` slots.
        ref: a tensor on the launch device (see :func:`launch`).
        slots: one :class:`Slot` per level.
        head: the leading arguments of a launch whose first program is ``done`` programs into
            the call (buffers indexed by program id are sliced there).
        groups: level indices per launch (default: :func:`level_groups`).
        start: programs already launched by earlier calls into the same buffers.
        **meta: constexprs and launch options (``num_warps``).

    Returns:
        ``start`` plus the programs launched. A group without programs is not launched; an
        unused slot repeats the group's first tensors with zero sizes and an empty range.
    """
    done = start
    for group in (level_groups(len(slots)) if groups is None else groups):
        args: list = []
        end = 0
        for k in range(MAX_LEVELS):
            if k < len(group):
                slot = slots[group[k]]
                end += slot.programs
                args += [*slot.tensors, *slot.before, end, *slot.after]
            else:
                slot = slots[group[0]]
                args += [*slot.tensors, *_zeros_like(slot.before), end, *_zeros_like(slot.after)]
        if end:
            launch(kernel, (end,), ref, *head(done), *args, **meta)
        done += end
    return done


@triton.jit
def level_slot(pid, start, end):
    """``(mine, local)``: whether program ``pid`` belongs to the level owning programs ``[start, end)``,
    and its index among that level's programs.

    Level ``i`` owns programs ``[e_{i-1}, e_i)`` (``e_{-1} = 0``); an unused slot repeats the end
    before it, so its range is empty and exactly one level claims each program.
    """
    return (pid >= start) & (pid < end), pid - start


@triton.jit
def split_program(local, n_inner, n_middle):
    """``local`` -> ``(outer, middle, inner)`` for programs laid out outer, middle, inner (inner fastest)."""
    inner = local % n_inner
    rest = local // n_inner
    return rest // n_middle, rest % n_middle, inner


def check_level_lists(name: str, **lists) -> None:
    """Raise :class:`LossError` unless every argument is a non-empty list of levels of one length.

    A lone tensor is refused: iterating it would silently treat each image as a level.
    """
    for arg, x in lists.items():
        if isinstance(x, Tensor):
            raise LossError(f"{name}: expected {arg} to be a list of levels, but got a tensor of shape "
                            f"{tuple(x.shape)}; pass one level as [{arg}]")
    lengths = {arg: len(x) for arg, x in lists.items()}
    if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
        raise LossError(f"{name}: expected equal, non-zero numbers of levels in "
                        f"{', '.join(lengths)}, but got {list(lengths.values())}")


def check_once(ctx) -> None:
    """Raise :class:`LossError` on a second backward through one forward (its tensors are released)."""
    if getattr(ctx, "used", False):
        raise LossError("the fused Triton losses support one backward pass per forward; "
                        "recompute the loss instead of using retain_graph=True")
    ctx.used = True


def grad_factor(grad_output: Tensor) -> Tensor:
    """``grad_output`` as a 1-element fp32 device tensor the backward kernels read (no host sync)."""
    return grad_output.detach().to(torch.float32).reshape(1)


def check_pair(student: Tensor, teacher: Tensor, name: str, level: int = 0) -> None:
    """Raise :class:`LossError` when a student/teacher pair cannot go to a kernel."""
    if student.shape != teacher.shape:
        raise LossError(f"{name}: student and teacher at level {level} are expected to have the same shape, "
                        f"but got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise LossError(f"{name}: student and teacher at level {level} are on different devices "
                        f"({student.device} and {teacher.device}); move them to one device")
    for side, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in DTYPES:
            raise LossError(f"{name}: expected float32, bfloat16 or float16 {side} features at level {level}, "
                            f"got {x.dtype}")


#: (kernel, signature, constexprs, num_warps) of the shared kernels, for the compile test.
def specialisations() -> list:
    return [("_sum_partials_kernel", {"part_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
             {"BLOCK": SUM_BLOCK}, SUM_WARPS)]

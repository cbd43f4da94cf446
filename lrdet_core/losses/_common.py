"""Input checks, dtype rules and backend dispatch shared by every loss in this package.

Nothing here imports triton or torchvision: each loss module imports its Triton kernel module
inside a function, under :func:`kernel_import`, only when it actually runs on the ``"triton"``
backend.
"""
from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from lrdet_core.errors import LossError

BACKENDS = ("auto", "torch", "compile", "triton")
Levels = Union[Tensor, Sequence[Tensor]]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise LossError(f"expected backend to be one of {', '.join(map(repr, BACKENDS))}, "
                        f"but got {backend!r}")
    return backend


def check_reduction(reduction: str, allowed: Tuple[str, ...]) -> str:
    if reduction not in allowed:
        raise LossError(f"expected reduction to be one of {', '.join(map(repr, allowed))}, "
                        f"but got {reduction!r}")
    return reduction


def check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")):
        raise LossError(f"expected {name} to be a positive finite number, but got {value!r}")
    return float(value)


def _where(level) -> str:
    return "" if level is None else f" level {level}"


def check_pair(student: Tensor, teacher: Tensor, level=None) -> None:
    """Raise :class:`LossError` unless ``student`` and ``teacher`` are same-shape 4-D float tensors."""
    for side, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, Tensor):
            raise LossError(f"expected {side}{_where(level)} to be a torch.Tensor, "
                            f"but got {type(x).__name__}")
        if x.dim() != 4:
            raise LossError(f"expected {side}{_where(level)} to be a 4-D N x C x H x W tensor, "
                            f"but got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise LossError(f"expected {side}{_where(level)} to be a floating-point tensor, "
                            f"but got dtype {x.dtype}")
    if student.shape != teacher.shape:
        raise LossError(f"expected student and teacher{_where(level)} to have the same shape, "
                        f"but got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise LossError(f"expected student and teacher{_where(level)} on the same device, "
                        f"but got {student.device} and {teacher.device}")


def _as_list(x: Levels, side: str) -> List[Tensor]:
    if isinstance(x, Tensor):
        # A lone tensor is one level; iterating it would silently split the batch instead.
        return [x]
    if isinstance(x, Mapping):
        raise LossError(f"expected {side} to be a list of N x C x H x W tensors (one per level), "
                        f"but got a {type(x).__name__} with keys {list(x)}; pass list(features.values())")
    try:
        return list(x)
    except TypeError:
        raise LossError(f"expected {side} to be a list of N x C x H x W tensors (one per level), "
                        f"but got {type(x).__name__}") from None


def check_levels(student: Levels, teacher: Levels) -> Tuple[List[Tensor], List[Tensor]]:
    """Both pyramids as lists, checked level by level (same count > 0, same shapes, 4-D)."""
    s_list, t_list = _as_list(student, "student"), _as_list(teacher, "teacher")
    if len(s_list) != len(t_list) or not s_list:
        raise LossError(f"expected student and teacher to have the same number of levels (at least 1), "
                        f"but got {len(s_list)} and {len(t_list)}")
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        check_pair(s, t, level=i)
    return s_list, t_list


def acc_dtype(student: Tensor, teacher: Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs in any mix; fp64 stays fp64 (gradcheck needs it)."""
    return torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)


def no_autocast(x: Tensor):
    """A context that turns autocast off, so losses run in fp32 inside an autocast region."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# ------------------------------------------------------------------------------ backends

_COMPILED: Dict[str, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, built once per function for the whole process.

    Shapes are left to dynamo's automatic dynamic mode: the first level shape compiles a static
    graph, the second a shape-generic one that serves every later level and canvas size. With
    ``dynamic=False`` a pyramid of 5 levels in 2 dtypes already passed dynamo's recompile limit
    (8), after which every call paid for a failed guard check and ran eagerly (measured: compiled
    L1 3x slower than eager).
    """
    key = f"{fn.__module__}.{fn.__qualname__}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=None)
    return _COMPILED[key]


def _is_cuda(x: Tensor) -> bool:
    # One seam for the device test, so the Triton dispatch can be tested on CPU machines.
    return x.is_cuda


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that will actually run: ``"auto"`` becomes ``"triton"`` or ``"torch"``.

    ``"auto"`` picks Triton for CUDA tensors when triton is installed (the kernel modules ship
    with this package); otherwise eager PyTorch. An explicit ``"triton"`` never falls back.
    """
    check_backend(backend)
    if backend == "triton" and not _is_cuda(x):
        raise LossError(f"backend='triton' runs on CUDA tensors, but got tensors on {x.device}; "
                        f"use backend='torch' or backend='compile' there")
    if backend != "auto":
        return backend
    # find_spec looks triton up without importing it: "auto" on CPU tensors never pays for the import.
    if _is_cuda(x) and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


@contextlib.contextmanager
def kernel_import() -> Iterator[None]:
    """Turns an ``ImportError`` of a kernel module (no triton, a broken install) into a :class:`LossError`.

    Example of use, inside the function that needs the kernel::

        with kernel_import():
            from lrdet_core.kernels.mse import mse_loss_triton
    """
    try:
        yield
    except ImportError as err:
        raise LossError(f"backend='triton' needs the Triton kernels of lrdet_core.kernels, but importing them "
                        f"failed ({type(err).__name__}: {err}); install triton and run on a CUDA device, "
                        f"or use backend='torch' or backend='compile'") from err


#: Dtypes the kernels read directly, in any student/teacher mix (each side has its own pointer type).
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_inputs(student: Tensor, teacher: Tensor) -> Tuple[Tensor, Tensor]:
    """Kernels load their inputs as they are, mixed dtypes included (bf16 student + fp32 teacher
    is not copied); other dtypes are promoted, so the kernel's own check names them."""
    if student.dtype != teacher.dtype and not (student.dtype in _KERNEL_DTYPES and teacher.dtype in _KERNEL_DTYPES):
        dtype = acc_dtype(student, teacher)
        return student.to(dtype), teacher.to(dtype)
    return student, teacher


# ---------------------------------------------------------------- pointwise (MSE and L1)


def pointwise_level(eager: Callable, kernel: Callable[[], Callable], student: Tensor, teacher: Tensor,
                    reduction: str, backend: str) -> Tensor:
    """One level of an elementwise loss on the chosen backend (the body of ``mse_loss`` and ``l1_loss``).

    ``kernel()`` returns the loss's Triton function, importing it on first use.
    """
    check_pair(student, teacher)
    check_reduction(reduction, ("none", "mean", "sum"))
    check_backend(backend)
    if backend == "auto" and reduction == "none":
        backend = "torch"  # kernels only reduce; an elementwise map is an eager job
    backend = resolve_backend(backend, student)
    if backend == "triton":
        if reduction == "none":
            raise LossError("backend='triton' computes reduction 'sum' or 'mean' only, but got "
                            "reduction='none'; use backend='torch' for the elementwise map")
        s, t = triton_inputs(student, teacher)
        return kernel()([s], [t], reduction)
    fn = eager if backend == "torch" else compiled(eager)
    with no_autocast(student):
        return fn(student, teacher, reduction, acc_dtype(student, teacher))


def pointwise_levels(eager: Callable, kernel: Callable[[], Callable], student: Levels, teacher: Levels,
                     reduction: str, backend: str) -> Tensor:
    """The sum over levels of :func:`pointwise_level` (the body of ``MSELoss`` and ``L1Loss``)."""
    s_list, t_list = check_levels(student, teacher)
    backend = resolve_backend(backend, s_list[0])
    if backend == "triton":
        pairs = [triton_inputs(s, t) for s, t in zip(s_list, t_list)]
        return kernel()([p[0] for p in pairs], [p[1] for p in pairs], reduction)
    total = pointwise_level(eager, kernel, s_list[0], t_list[0], reduction, backend)
    for s, t in zip(s_list[1:], t_list[1:]):
        total = total + pointwise_level(eager, kernel, s, t, reduction, backend)
    return total

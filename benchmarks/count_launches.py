"""Kernel launches and element accesses of the Triton losses, counted without a GPU.

Two counts per loss (``mse``, ``l1``, ``cwd``, ``fgd``), forward and backward separately:

* **launches per call** on a RetinaNet pyramid (P3-P7 at 800x1333: 100x168 ... 7x11 cells,
  C = 256, N = 2 and 16). The features live on the ``meta`` device, so nothing is allocated;
  every Triton kernel of ``lrdet_core.kernels`` is replaced by a counter (host code never
  reads a kernel's output, so it runs unchanged), and every other op that would launch a CUDA
  kernel is counted by a ``TorchDispatchMode`` (views, allocations and other metadata-only ops
  excluded). ``fgd`` is the whole ``FGDLoss`` over the five levels: masks, kernels, the torch
  ops around them and the eager GcBlock term.
* **element accesses per element** under Triton's interpreter on a small bf16 pyramid: every
  load and store of the kernels is counted lane by lane (masked-off lanes excluded) when its
  element type is bf16, i.e. a feature or gradient access (all side buffers are fp32), and
  divided by the number of feature elements.

Usage::

    python benchmarks/count_launches.py            # prints a markdown table
    python benchmarks/count_launches.py --json     # one JSON object per row
    python benchmarks/count_launches.py --save     # also writes benchmarks/results/launches.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from types import SimpleNamespace
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lrdet_core.kernels import _common, _cwd_channels_last, _pointwise, cwd, fgd  # noqa: E402
from lrdet_core.losses import _common as losses_common  # noqa: E402
from lrdet_core.losses import fgd as losses_fgd  # noqa: E402
from lrdet_core.losses import CWDLoss, FGDLoss, L1Loss, MSELoss  # noqa: E402

RETINANET = ((100, 168), (50, 84), (25, 42), (13, 21), (7, 11))
STRIDES = (8, 16, 32, 64, 128)
CANVAS = (800, 1344)
LOSSES = ("mse", "l1", "cwd", "cwd_cl", "fgd")  # cwd_cl: CWD on channels_last features
KERNEL_MODULES = (_common, _pointwise, _cwd_channels_last, cwd, fgd)
#: Ops that launch no kernel on a GPU: views, allocations, metadata.
NO_LAUNCH = {"view", "_unsafe_view", "reshape", "detach", "unbind", "select", "slice", "as_strided", "expand",
             "t", "transpose", "permute", "unsqueeze", "squeeze", "alias", "empty", "empty_like", "empty_strided",
             "new_empty", "new_empty_strided", "lift_fresh", "split", "split_with_sizes", "chunk", "_to_copy_noop",
             "is_same_size", "_reshape_alias", "unfold", "diagonal", "narrow", "view_as", "expand_as",
             "set_", "resize_", "result_type", "_local_scalar_dense"}


class _Counter:
    """Counts ``kernel[grid](...)`` calls of every kernel of the package and runs none of them."""

    def __init__(self) -> None:
        self.triton = 0

    def __call__(self, name: str):
        counter = self

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    counter.triton += 1
                return run
        return Launch()


class _TorchOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH and name.rstrip("_") not in NO_LAUNCH:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _kernels_replaced(factory):
    saved = []
    for mod in KERNEL_MODULES:
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and not isinstance(obj, type):
                saved.append((mod, name, obj))
                setattr(mod, name, factory(name))
    real_is_cuda = losses_common._is_cuda
    losses_common._is_cuda = lambda x: True  # the triton dispatch, on meta or CPU tensors
    try:
        yield
    finally:
        losses_common._is_cuda = real_is_cuda
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _boxes(n: int, device) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        xy = torch.rand(7, 2, generator=g) * torch.tensor([1100.0, 600.0])
        out.append(torch.cat([xy, xy + 40 + torch.rand(7, 2, generator=g) * 200], 1).to(device))
    return out


def _module(loss: str, channels: int, device, levels: int) -> Callable:
    if loss == "fgd":
        return FGDLoss(channels=[channels] * levels, backend="triton").to(device)
    return {"mse": MSELoss, "l1": L1Loss, "cwd": CWDLoss, "cwd_cl": CWDLoss}[loss](backend="triton")


def _layout(loss: str, x: torch.Tensor) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if loss == "cwd_cl" else x


def launches(loss: str, n: int, c: int = 256, levels=RETINANET) -> Dict[str, int]:
    """Triton launches and other kernel-launching torch ops of one call, forward and backward."""
    dev = torch.device("meta")
    student = [_layout(loss, torch.empty(n, c, h, w, device=dev, dtype=torch.bfloat16)).requires_grad_()
               for h, w in levels]
    teacher = [_layout(loss, torch.empty(n, c, h, w, device=dev, dtype=torch.bfloat16)) for h, w in levels]
    ctx = SimpleNamespace(boxes=_boxes(n, dev), strides=STRIDES[:len(levels)], canvas_size=CANVAS)
    module = _module(loss, c, dev, len(levels))
    counter = _Counter()
    out: Dict[str, int] = {}
    real_no_autocast = losses_fgd.no_autocast
    losses_fgd.no_autocast = lambda x: contextlib.nullcontext()  # autocast has no meta device; launches nothing
    try:
        _count(module, loss, student, teacher, ctx, counter, out)
    finally:
        losses_fgd.no_autocast = real_no_autocast
    return out


def _count(module, loss, student, teacher, ctx, counter, out) -> None:
    with _kernels_replaced(counter):
        with _TorchOps() as ops:
            value = module(student, teacher, ctx) if loss == "fgd" else module(student, teacher)
        out["fwd_triton"], out["fwd_torch"] = counter.triton, len(ops.ops)
        counter.triton = 0
        seed = torch.ones_like(value)  # made outside the count: .backward()'s own seed is not the loss's op
        with _TorchOps() as ops:
            value.backward(seed)
        out["bwd_triton"], out["bwd_torch"] = counter.triton, len(ops.ops)


def accesses(loss: str, n: int = 2, c: int = 8, levels=((12, 20), (6, 10), (3, 5))) -> Dict[str, float]:
    """Feature-sized element accesses per element under the interpreter (bf16 features)."""
    import triton.language as tl
    from triton.runtime import interpreter

    counts = {"n": 0}
    builder = interpreter.InterpreterBuilder
    real_load, real_store = builder.create_masked_load, builder.create_masked_store

    def load(self, ptrs, mask, other, *args):
        if ptrs.get_element_ty() == tl.bfloat16:
            counts["n"] += int(mask.data.sum())
        return real_load(self, ptrs, mask, other, *args)

    def store(self, ptrs, value, mask, *args):
        if ptrs.get_element_ty() == tl.bfloat16:
            counts["n"] += int(mask.data.sum())
        return real_store(self, ptrs, value, mask, *args)

    g = torch.Generator().manual_seed(0)
    student = [_layout(loss, torch.randn(n, c, h, w, generator=g).bfloat16()).requires_grad_() for h, w in levels]
    teacher = [_layout(loss, torch.randn(n, c, h, w, generator=g).bfloat16()) for h, w in levels]
    elements = sum(s.numel() for s in student)
    canvas = (levels[0][0] * 8, levels[0][1] * 8)
    ctx = SimpleNamespace(boxes=[torch.tensor([[8.0, 8.0, 60.0, 40.0]])] * n, strides=STRIDES[:len(levels)],
                          canvas_size=canvas)
    module = _module(loss, c, "cpu", len(levels))
    if loss == "fgd":
        module.lam = 0.0  # the GcBlock term is eager: not a kernel access
    builder.create_masked_load, builder.create_masked_store = load, store
    real_is_cuda = losses_common._is_cuda
    losses_common._is_cuda = lambda x: True
    try:
        value = module(student, teacher, ctx) if loss == "fgd" else module(student, teacher)
        fwd = counts["n"] / elements
        counts["n"] = 0
        value.backward()
        bwd = counts["n"] / elements
    finally:
        builder.create_masked_load, builder.create_masked_store = real_load, real_store
        losses_common._is_cuda = real_is_cuda
    return {"fwd_accesses": fwd, "bwd_accesses": bwd}


def _save(rows: List[Tuple], argv: List[str]) -> None:
    import subprocess

    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"command": " ".join(["python benchmarks/count_launches.py", *argv]), "commit": commit.strip(),
            "torch": torch.__version__, "triton": triton.__version__, "pyramid": RETINANET, "channels": 256,
            "dtype": "bf16"}
    out = os.path.join(ROOT, "benchmarks", "results", "launches.json")
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": [{"loss": loss, "batch": n, **acc, **lau} for loss, n, acc, lau in rows]},
                  f, indent=1)
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/launches.json")
    args = parser.parse_args()
    rows: List[Tuple] = []
    for loss in args.losses:
        acc = accesses(loss)
        for n in args.batch:
            rows.append((loss, n, acc, launches(loss, n)))
    if args.save:
        _save(rows, sys.argv[1:])
    if args.json:
        for loss, n, acc, lau in rows:
            print(json.dumps({"loss": loss, "batch": n, **acc, **lau}))
        return
    print("| loss | N | accesses/element fwd + bwd | Triton launches fwd + bwd | other kernel ops fwd + bwd |")
    print("|---|---|---|---|---|")
    for loss, n, acc, lau in rows:
        print(f"| {loss} | {n} | {acc['fwd_accesses']:.2f} + {acc['bwd_accesses']:.2f} | "
              f"{lau['fwd_triton']} + {lau['bwd_triton']} | {lau['fwd_torch']} + {lau['bwd_torch']} |")


if __name__ == "__main__":
    main()

"""The GPU path: the Triton kernels against eager PyTorch on CUDA, the distiller on CUDA, DDP over NCCL.

Every test here is marked ``cuda`` and skipped where CUDA is absent, so ``pytest -m cuda`` on a CPU
machine collects them all and skips them all. On a GPU machine the kernels must be compiled, not
interpreted; ``tests/conftest.py`` arranges that for ``-m cuda`` or ``LRDET_NO_INTERPRET=1``::

    LRDET_NO_INTERPRET=1 python -m pytest -m cuda tests/test_cuda.py    # what benchmarks/run_cuda.sh runs

If the interpreter is on anyway (the whole suite in one process), the tests that launch kernels
skip with that reason instead of timing out in the interpreter.

Dry run: ``LRDET_CUDA_DRY_RUN=1 python -m pytest -m cuda tests/test_cuda.py`` runs the same checks
on CPU tensors through the Triton interpreter at small sizes (the losses' CUDA check is bypassed),
with gloo in place of NCCL. It checks the tests themselves on a machine without a GPU; it says
nothing about the GPU. Tests that need real CUDA (int64 offsets past 2^31, fp16 autocast with
GradScaler) skip there, and the bf16-autocast distiller step runs in fp32 there.

Only the public API is used: the loss modules with ``backend=``, :class:`BridgeDistiller`.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

from lrdet_core import BridgeDistiller, DistillContext
from lrdet_core.losses import build_loss

ROOT = Path(__file__).resolve().parents[1]
DRY = os.environ.get("LRDET_CUDA_DRY_RUN", "") == "1"
HAVE_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cpu" if DRY else "cuda")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (HAVE_CUDA or DRY), reason="CUDA is not available")]
needs_gpu = pytest.mark.skipif(DRY, reason="needs a real GPU (not part of the dry run)")

LOSS_NAMES = ("mse", "l1", "cwd", "fgd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# RetinaNet P3-P7 at 400x667 (C=64): P3 rows have 4200 cells, over CWD's 4096-cell single-pass
# block, so both CWD paths run. The dry run uses a tiny pyramid of the same shape family; no 1x1
# level, which is contiguous and channels_last at once (CWD then copies every level to NCHW).
PYRAMID = [(9, 13), (5, 7), (3, 4), (2, 2), (1, 2)] if DRY else [(50, 84), (25, 42), (13, 21), (7, 11), (4, 6)]
STRIDES = [8, 16, 32, 64, 128]
BATCH, CHANNELS = 2, (4 if DRY else 64)

# Odd shapes, one per level (one batch: FGD's boxes are per image): a level longer than two CWD
# blocks (8777 cells), 1x1 and 1-wide maps, odd channel counts.
ODD_SHAPES = ([(3, 3, 5, 7), (3, 5, 1, 1), (3, 7, 3, 1)] if DRY else
              [(3, 3, 67, 131), (3, 5, 1, 1), (3, 7, 3, 1), (3, 33, 5, 9), (3, 129, 17, 3)])

# More levels than one launch holds: the kernels launch at most 6 levels at a time (MAX_LEVELS in
# lrdet_core/kernels/_common.py when this was written); 13 is two full groups and a partial one.
MANY_LEVELS = [(k + 1, k + 2) for k in range(13)]

# (rtol, atol as a fraction of the largest reference magnitude) of the loss and of the gradient,
# Triton against eager PyTorch on the same inputs. Both accumulate in fp32 from the same (already
# rounded) inputs, so the loss differs by summation order only. The gradient is stored in the input
# dtype: two roundings of nearly equal fp32 values may differ by one unit in the last place
# (bf16: 2^-7 relative, fp16: 2^-10; fp16 gradients under 6e-5 are subnormal, spaced 6e-8 apart).
TOL = {torch.float32: dict(loss=(1e-4, 1e-6), grad=(1e-4, 1e-5), grad_abs=0.0),
       torch.bfloat16: dict(loss=(1e-4, 1e-6), grad=(2e-2, 2e-3), grad_abs=0.0),
       torch.float16: dict(loss=(1e-4, 1e-6), grad=(4e-3, 2e-3), grad_abs=2.4e-7)}


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture
def compiled_triton():
    """Skip where Triton code (the kernels, inductor's output) would be interpreted on a GPU machine."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not DRY:
        pytest.skip("TRITON_INTERPRET is set in this process, so the kernels would be interpreted: run "
                    "`LRDET_NO_INTERPRET=1 python -m pytest -m cuda tests/test_cuda.py` (benchmarks/run_cuda.sh)")


@pytest.fixture
def kernels(monkeypatch, compiled_triton):
    """The fused kernels: compiled on a GPU; in the dry run, interpreted on CPU tensors."""
    pytest.importorskip("triton")
    if DRY:
        # The losses refuse backend='triton' for CPU tensors; the interpreter runs them on the CPU.
        from lrdet_core.losses import _common
        monkeypatch.setattr(_common, "_is_cuda", lambda x: True)


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """Deterministic convolutions, so two identical models compute identical features and gradients."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def pyramid(shapes: Sequence[Tuple[int, int, int, int]], dtype: torch.dtype, seed: int = 0,
            channels_last: bool = False) -> Tuple[List[Tensor], List[Tensor]]:
    """Student and teacher levels drawn on the CPU (the same numbers on every device), then moved."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student, teacher = [], []
    for shape in shapes:
        s = torch.randn(shape, generator=g)
        t = 0.5 * s + torch.randn(shape, generator=g)  # correlated, like a student near its teacher
        student.append(s.to(DEVICE, dtype).to(memory_format=fmt))
        teacher.append(t.to(DEVICE, dtype).to(memory_format=fmt))
    return student, teacher


def shapes_of(levels: Sequence[Tuple[int, int]], n: int = BATCH, c: int = CHANNELS) -> List[Tuple[int, ...]]:
    return [(n, c, h, w) for h, w in levels]


def context(teacher: Sequence[Tensor], strides: Sequence[int], seed: int = 0) -> DistillContext:
    """A few boxes per image on the canvas of the first level."""
    n, _, h, w = teacher[0].shape
    canvas = (h * strides[0], w * strides[0])
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([canvas[1], canvas[0]]) * 0.7
        wh = torch.rand(3, 2, generator=g) * torch.tensor([canvas[1], canvas[0]]) * 0.3 + 1
        boxes.append(torch.cat([xy, xy + wh], 1).to(DEVICE))
    return DistillContext.from_features(list(teacher), canvas, boxes=boxes, strides=list(strides))


def make_loss(name: str, backend: str, student: Sequence[Tensor]) -> nn.Module:
    if name != "fgd":
        return build_loss(name, backend=backend)
    torch.manual_seed(0)  # the same GcBlocks for every backend
    return build_loss("fgd", backend=backend, channels=[s.shape[1] for s in student]).to(DEVICE)


def run_loss(loss: nn.Module, student: Sequence[Tensor], teacher: Sequence[Tensor], ctx=None,
             scale: float = 2.5) -> Tuple[Tensor, List[Tensor]]:
    """``scale * loss`` forward and backward on fresh leaves; the loss value and the student's gradients.

    ``scale != 1`` makes the kernels' backward rescale their saved gradient (``grad_output != 1``).
    """
    leaves = [s.detach().clone().requires_grad_() for s in student]
    value = loss(leaves, [t.detach() for t in teacher], ctx)
    (scale * value).backward()
    assert all(x.grad is not None for x in leaves), "a student level got no gradient"
    return value.detach(), [x.grad for x in leaves]


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def flat_rel_err(pairs: Sequence[Tuple[Tensor, Tensor]]) -> float:
    """:func:`rel_err` of the concatenations: ``[(a1, b1), (a2, b2)]`` -> ||a - b|| / ||b||."""
    return rel_err(torch.cat([a.flatten().float() for a, _ in pairs]),
                   torch.cat([b.flatten().float() for _, b in pairs]))


def assert_matches(loss: Tensor, grads: Sequence[Tensor], ref_loss: Tensor, ref_grads: Sequence[Tensor],
                   dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and torch.isfinite(loss), f"{what}: loss {loss}"
    rtol, atol = tol["loss"]
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol * abs(ref_loss.item()),
                               msg=lambda m: f"{what}, loss: {m}")
    rtol, atol = tol["grad"]
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype and g.shape == r.shape, f"{what}: level {i} grad {g.dtype} {tuple(g.shape)}"
        scale = r.abs().max().item()
        torch.testing.assert_close(g.float(), r.float(), rtol=rtol, atol=atol * scale + tol["grad_abs"],
                                   msg=lambda m, i=i: f"{what}, gradient of level {i}: {m}")


def triton_vs_torch(name: str, student: Sequence[Tensor], teacher: Sequence[Tensor], dtype: torch.dtype,
                    strides: Sequence[int], what: str) -> None:
    ctx = context(teacher, strides) if name == "fgd" else None
    ref = run_loss(make_loss(name, "torch", student), student, teacher, ctx)
    out = run_loss(make_loss(name, "triton", student), student, teacher, ctx)
    assert_matches(*out, *ref, dtype, what)


# ---------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_triton_matches_torch_on_a_five_level_pyramid(name, dtype_name, kernels):
    dtype = DTYPES[dtype_name]
    student, teacher = pyramid(shapes_of(PYRAMID), dtype)
    triton_vs_torch(name, student, teacher, dtype, STRIDES, f"{name} {dtype_name}")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_triton_matches_torch_on_odd_shapes(name, kernels):
    student, teacher = pyramid(ODD_SHAPES, torch.float32, seed=1)
    triton_vs_torch(name, student, teacher, torch.float32, [8] * len(ODD_SHAPES), f"{name} odd shapes")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_triton_matches_torch_on_channels_last(name, dtype_name, kernels):
    dtype = DTYPES[dtype_name]
    student, teacher = pyramid(shapes_of(PYRAMID), dtype, seed=2, channels_last=True)
    assert student[0].is_contiguous(memory_format=torch.channels_last) and not student[0].is_contiguous()
    triton_vs_torch(name, student, teacher, dtype, STRIDES, f"{name} {dtype_name} channels_last")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_triton_matches_torch_past_one_launch_of_levels(name, kernels):
    # Distinct level sizes: a level served by the wrong slot of a launch changes the value.
    student, teacher = pyramid(shapes_of(MANY_LEVELS, c=8), torch.float32, seed=3)
    triton_vs_torch(name, student, teacher, torch.float32, [8] * len(MANY_LEVELS), f"{name} x{len(MANY_LEVELS)} levels")


def test_fgd_terms_with_unequal_weights_match_torch(kernels):
    # FGDLoss.forward passes its weights into the kernel; summing .terms() with other weights gives
    # the kernel three different grad_outputs, the backward path that recomputes the gradient.
    student, teacher = pyramid(shapes_of(PYRAMID), torch.float32, seed=4)
    ctx = context(teacher, STRIDES)
    out = {}
    for backend in ("torch", "triton"):
        loss = make_loss("fgd", backend, student)
        leaves = [s.detach().clone().requires_grad_() for s in student]
        terms = loss.terms(leaves, teacher, ctx)
        total = 3.0 * terms["fg"] + 0.25 * terms["bg"] + 7.0 * terms["att"] + terms["glb"]
        total.backward()
        out[backend] = (total.detach(), [x.grad for x in leaves])
    assert_matches(*out["triton"], *out["torch"], torch.float32, "fgd terms, unequal weights")


# One large level: P3 of a 2 x 256 x 800x1333 batch (the dry run: a small one).
LARGE = (2, 8, 60, 60) if DRY else (2, 256, 100, 168)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_fp16_gradient_survives_a_gradscaler_scale(name, kernels):
    # Under fp16 autocast the GradScaler multiplies the loss by 2^16 so that small gradients are not
    # lost to fp16's subnormal range. Per-element gradients of a mean-reduced MSE/L1 (1/n, n = 8.6 M)
    # and of CWD (tau/(N C) (p_s - p_t), p ~ 1/HW) are far under fp16's smallest normal (6e-5) at unit
    # scale; eager PyTorch applies the scale in fp32 before rounding to fp16, and so must the kernels.
    student, teacher = pyramid([LARGE], torch.float16, seed=8)
    ctx = context(teacher, [8]) if name == "fgd" else None
    kwargs = {"reduction": "mean"} if name in ("mse", "l1") else {}
    losses = {}
    for backend in ("torch", "triton"):
        if name == "fgd":
            losses[backend] = make_loss(name, backend, student)
        else:
            losses[backend] = build_loss(name, backend=backend, **kwargs)
    ref = run_loss(losses["torch"], student, teacher, ctx, scale=2.0 ** 16)
    out = run_loss(losses["triton"], student, teacher, ctx, scale=2.0 ** 16)
    assert_matches(*out, *ref, torch.float16, f"{name} fp16 x 2^16")
    # The element-wise tolerance scales with the largest gradient; gradients flushed to zero or to a
    # few subnormal steps show in the norm. Correct rounding is within a unit in the last place (1e-3).
    err = rel_err(out[1][0].float(), ref[1][0].float())
    zeros = (out[1][0] == 0).float().mean().item()
    assert err <= 2e-3, f"{name}: fp16 gradient off by {err:.3g} in norm ({zeros:.1%} of it is zero)"


@needs_gpu
def test_mse_past_2_31_elements_uses_int64_offsets(kernels):
    # 2^31 + 2^21 bf16 elements (4.3 GB per tensor): every element past 2^31 differs from those before
    # it, so an offset that wraps at 32 bits reads or writes the wrong element (or faults).
    head, tail = 2 ** 31, 2 ** 21
    student = torch.empty(1, 1025, 2048, 1024, dtype=torch.bfloat16, device=DEVICE)
    flat = student.view(-1)
    flat[:head].fill_(1.5)
    flat[head:].fill_(2.5)
    teacher = torch.full_like(student, 0.5)
    student.requires_grad_()
    loss = build_loss("mse", backend="triton")([student], [teacher])
    loss.backward()
    expected = head * 1.0 + tail * 4.0  # d = 1 before the boundary, 2 after it
    assert abs(loss.item() - expected) <= 1e-5 * expected, (loss.item(), expected)
    grad = student.grad.view(-1)
    assert bool((grad[head:] == 4.0).all()), "wrong gradient past element 2^31"
    assert bool((grad[:head] == 2.0).all()), "wrong gradient before element 2^31 (a wrapped write?)"


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_triton_is_bitwise_deterministic(name, kernels):
    student, teacher = pyramid(shapes_of(PYRAMID), torch.bfloat16, seed=5)
    ctx = context(teacher, STRIDES) if name == "fgd" else None
    loss = make_loss(name, "triton", student)
    runs = [run_loss(loss, student, teacher, ctx) for _ in range(3)]
    for value, grads in runs[1:]:
        assert torch.equal(value, runs[0][0]), f"{name}: loss {value.item()!r} != {runs[0][0].item()!r}"
        for i, (g, g0) in enumerate(zip(grads, runs[0][1])):
            assert torch.equal(g, g0), f"{name}: gradient of level {i} differs between runs"


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_compile_backend_matches_torch(name, compiled_triton):
    student, teacher = pyramid(shapes_of(PYRAMID), torch.float32, seed=6)
    ctx = context(teacher, STRIDES) if name == "fgd" else None
    ref = run_loss(make_loss(name, "torch", student), student, teacher, ctx)
    out = run_loss(make_loss(name, "compile", student), student, teacher, ctx)
    assert_matches(*out, *ref, torch.float32, f"{name} compile")


# ------------------------------------------------------------------------------ the distiller


def detector(family: str, size: int) -> nn.Module:
    """A torchvision ResNet-50 FPN detector without weights (the dry run: a ResNet-18 FPN one)."""
    if DRY:
        import tiny
        return getattr(tiny, family)(size)
    from torchvision.models import detection
    builder = {"retinanet": detection.retinanet_resnet50_fpn, "fcos": detection.fcos_resnet50_fpn}[family]
    return builder(weights=None, weights_backbone=None, num_classes=3, min_size=size, max_size=size)


def detection_batch(n: int = 2, size: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size + 24, generator=g).to(DEVICE) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = torch.rand(3, 2, generator=g) * size * 0.3 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(DEVICE),
                        "labels": torch.randint(1, 3, (3,), generator=g).to(DEVICE)})
    return images, targets


LR_SIZE, HR_SIZE = (64, 128) if DRY else (160, 320)


def models(family: str, teacher_dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = detector(family, LR_SIZE).to(DEVICE)
    teacher = detector(family, HR_SIZE).to(DEVICE, teacher_dtype)
    return student, teacher


def train_steps(d: BridgeDistiller, amp, steps: int = 3, seed: int = 0):
    """``steps`` optimizer steps; the first step's losses and unscaled gradients, and the parameters before."""
    opt = torch.optim.SGD(d.parameters(), lr=1e-3)
    use_scaler = amp == torch.float16
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 8) if use_scaler else None
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    first = None
    for step in range(steps):
        images, targets = detection_batch(seed=seed + step)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=amp, enabled=amp is not None):
            losses = d(images, targets)
        total = sum(losses.values())
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(opt)
        else:
            total.backward()
        if first is None:
            first = ({k: v.detach().float() for k, v in losses.items()},
                     {n: p.grad.detach().float().clone() for n, p in d.named_parameters() if p.grad is not None})
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return first, before


AMP = {"fp16-scaler": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("amp_name", list(AMP))
@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_distiller_step_under_autocast_matches_the_torch_loss(family, amp_name, kernels, deterministic_cudnn):
    amp = AMP[amp_name]
    if DRY:
        if amp == torch.float16:
            pytest.skip("fp16 autocast with GradScaler: CUDA only")
        # CPU bf16 autocast is not what runs on the GPU, and torch's CPU convolution backward returned
        # garbage (1e15) in a 1x1 output in our dry runs: the dry run checks the test's logic in fp32.
        amp = None
    student, teacher = models(family)
    results = {}
    for backend in ("triton", "torch"):
        d = BridgeDistiller(copy.deepcopy(student), copy.deepcopy(teacher), alpha=0.005,
                            loss_kwargs={"backend": backend}).train()
        (losses, grads), before = train_steps(d, amp)
        results[backend] = losses, grads
        assert all(torch.isfinite(v) for v in losses.values()), f"{backend}: {losses}"
        moved = [n for n, p in d.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert moved, f"{backend}: no parameter changed in 3 steps (every step skipped by the GradScaler?)"
    (l_tr, g_tr), (l_ref, g_ref) = results["triton"], results["torch"]
    assert set(l_tr) == set(l_ref) and "distill/mse" in l_tr
    # Same weights, same inputs, deterministic convolutions: the features are identical and only the
    # loss backend differs, so the distillation term agrees to fp32 summation order.
    torch.testing.assert_close(l_tr["distill/mse"], l_ref["distill/mse"], rtol=1e-4, atol=0)
    for k in l_tr:
        torch.testing.assert_close(l_tr[k], l_ref[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert set(g_tr) == set(g_ref)
    # The loss gradients differ by a unit in the last place of the autocast dtype; a single parameter
    # whose gradient is a cancelling sum (a BatchNorm bias) can show that as a few percent, so the
    # gradient is compared as one vector.
    names = sorted(g_ref)
    err = flat_rel_err([(g_tr[n], g_ref[n]) for n in names])
    worst = max(names, key=lambda n: rel_err(g_tr[n], g_ref[n]))
    assert err <= 1e-2, f"gradients differ between the triton and torch losses by {err:.3g} (worst: {worst})"


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_distiller_step_with_a_bf16_teacher(family, kernels, deterministic_cudnn):
    student, teacher = models(family)
    ref = BridgeDistiller(copy.deepcopy(student), copy.deepcopy(teacher), alpha=0.005).train()
    (ref_losses, _), _ = train_steps(ref, None, steps=1)
    d = BridgeDistiller(copy.deepcopy(student), copy.deepcopy(teacher).to(torch.bfloat16), alpha=0.005).train()
    (losses, grads), before = train_steps(d, None, steps=2)
    assert all(p.dtype == torch.bfloat16 for p in d.teacher.parameters()), "the teacher was cast away from bf16"
    assert all(p.dtype == torch.float32 for p in d.student.parameters())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert all(torch.isfinite(g).all() for g in grads.values())
    # The teacher's features carry bf16 rounding (about 2^-8 relative per layer); the distillation
    # term is dominated by the student/teacher difference, so it stays within a few percent.
    torch.testing.assert_close(losses["distill/mse"], ref_losses["distill/mse"], rtol=5e-2, atol=0)
    assert any(not torch.equal(p.detach(), before[f"student.{n}"]) for n, p in d.student.named_parameters())


# ----------------------------------------------------------------------- DDP and SyncBatchNorm


@pytest.fixture(scope="module")
def nccl_report(tmp_path_factory) -> Dict:
    """Run the world-size-1 process group checks once, in a fresh process (see ``_worker`` below)."""
    out = tmp_path_factory.mktemp("nccl")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if not DRY:
        env.pop("TRITON_INTERPRET", None)  # the worker's distiller runs the compiled kernels
    proc = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def test_ddp_world_size_1_matches_the_plain_distiller(nccl_report):
    r = nccl_report["ddp"]
    assert r["backend"] == ("gloo" if DRY else "nccl")
    assert r["steps"] == 2 and not r["missing_grads"], r
    # One rank: the all-reduce averages over one copy, so DDP's gradients are the plain model's (up to
    # the atomics of the bilinear resampling's backward).
    assert r["max_grad_rel_err"] <= 1e-5, r
    assert r["max_param_rel_err"] <= 1e-6, r


def test_sync_batchnorm_all_gather_path_at_world_size_1(nccl_report):
    r = nccl_report["sync_bn"]
    # torch's SyncBatchNorm falls back to F.batch_norm at world size 1; the worker forces the
    # all-gather function so that the real path runs inside the distiller.
    assert r["gather_calls"] > 0, r
    assert r["max_loss_rel_err"] <= 1e-4 and r["max_grad_rel_err"] <= 1e-3, r
    # The bridge pass must not fold HR statistics into the running ones: they equal those of the
    # student's own LR forward.
    assert r["max_running_stat_err"] <= 1e-5, r
    assert r["restored"], r


def bn_fpn_retinanet(size: int) -> nn.Module:
    """A small RetinaNet whose FPN has BatchNorm: BN layers after the split point, which the bridge pass
    runs on HR features (torchvision's own heads use GroupNorm or no norm at all)."""
    from torchvision.models import resnet18
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    fpn = BackboneWithFPN(resnet18(weights=None), {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 32,
                          extra_blocks=LastLevelP6P7(32, 32), norm_layer=nn.BatchNorm2d)
    return RetinaNet(fpn, 3, min_size=size, max_size=size)


def _worker(out_dir: str) -> None:
    """World size 1: DDP around the distiller against the plain distiller; a SyncBatchNorm student."""
    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction
    from torch.nn.parallel import DistributedDataParallel as DDP

    import tiny

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    backend = "gloo" if DRY else "nccl"
    init = f"file://{os.path.join(out_dir, 'pg_init')}"
    dist.init_process_group(backend, init_method=init, rank=0, world_size=1)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(0)
    report: Dict = {}

    def distiller(student: nn.Module) -> BridgeDistiller:
        # A wider teacher (48 FPN channels against 32): 1x1 projectors, which must exist before DDP wraps
        # the distiller, or DDP would never average their gradients.
        torch.manual_seed(1)
        return BridgeDistiller(student, tiny.retinanet(128, channels=48).to(DEVICE), alpha=0.005).train()

    def step(model: nn.Module, seed: int) -> Dict[str, Tensor]:
        images, targets = detection_batch(seed=seed, size=100)
        losses = model(images, targets)
        sum(losses.values()).backward()
        return losses

    # DDP: two steps (a parameter without a gradient fails DDP's second step), against the same
    # distiller without DDP.
    torch.manual_seed(0)
    plain = distiller(tiny.retinanet(64).to(DEVICE))
    wrapped = copy.deepcopy(plain)
    ddp = DDP(wrapped, device_ids=[0] if DEVICE.type == "cuda" else None)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (plain, ddp)]
    grad_err, missing = 0.0, []
    for s in range(2):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        step(plain, s)
        step(ddp, s)
        pairs = list(zip(plain.named_parameters(), wrapped.parameters()))
        missing += [n for (n, p), q in pairs if (p.grad is None) != (q.grad is None)]
        # As one vector: the bilinear resampling's CUDA backward adds with atomics, so single cancelling
        # sums (a BatchNorm bias) may differ in their last bits between any two runs.
        grad_err = max(grad_err, flat_rel_err([(q.grad, p.grad) for (_, p), q in pairs if p.grad is not None]))
        for opt in opts:
            opt.step()
    param_err = flat_rel_err([(q.detach(), p.detach()) for p, q in zip(plain.parameters(), wrapped.parameters())])
    report["ddp"] = {"backend": dist.get_backend(), "steps": 2, "missing_grads": missing,
                     "max_grad_rel_err": grad_err, "max_param_rel_err": param_err}

    # SyncBatchNorm: torch only all-gathers at world size > 1. This subclass always does, as torch's
    # SyncBatchNorm.forward does in training at world size > 1.
    class ForcedSyncBN(nn.SyncBatchNorm):
        calls = 0

        def forward(self, x: Tensor) -> Tensor:
            if not self.training:
                return super().forward(x)
            momentum = 0.0 if self.momentum is None else self.momentum
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)
            track = self.track_running_stats
            mean, var = (self.running_mean, self.running_var) if track else (None, None)
            ForcedSyncBN.calls += 1
            if x.device.type != "cuda":  # the dry run: torch has no CPU kernels for the gather path
                return nn.functional.batch_norm(x, mean, var, self.weight, self.bias, True, momentum, self.eps)
            return SyncBNFunction.apply(x, self.weight, self.bias, mean, var, self.eps, momentum,
                                        dist.group.WORLD, dist.get_world_size())

    torch.manual_seed(0)
    bn_student = bn_fpn_retinanet(64).to(DEVICE)
    lr_only = copy.deepcopy(bn_student)
    sync_student = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bn_student))
    for m in sync_student.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.__class__ = ForcedSyncBN
    ref, syncd = distiller(bn_student), distiller(sync_student)
    ref_losses, sync_losses = step(ref, 7), step(syncd, 7)
    lr_only.train()(*detection_batch(seed=7, size=100))  # the student's own LR pass, nothing else
    loss_err = max(abs(sync_losses[k].item() - v.item()) / max(abs(v.item()), 1e-12) for k, v in ref_losses.items())
    grad_err = flat_rel_err([(q.grad, p.grad) for p, q in zip(ref.parameters(), syncd.parameters())
                             if p.grad is not None])
    stats = [(b.float(), a.float()) for (n, a), (_, b) in zip(lr_only.named_buffers(), sync_student.named_buffers())
             if "running" in n]
    assert any("fpn" in n and "running" in n for n, _ in lr_only.named_buffers())
    report["sync_bn"] = {
        "gather_calls": ForcedSyncBN.calls, "max_loss_rel_err": loss_err, "max_grad_rel_err": grad_err,
        "max_running_stat_err": max((b - a).abs().max().item() for b, a in stats),
        "restored": all(m.track_running_stats for m in sync_student.modules() if isinstance(m, nn.SyncBatchNorm)),
    }
    Path(out_dir, "report.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])

"""The fused Triton kernels against float64 references, run by Triton's interpreter on CPU.

Triton decides at decoration time whether ``@triton.jit`` builds a GPU kernel or an
interpreted one (``triton.knobs.runtime.interpret`` reads ``TRITON_INTERPRET``), so the
variable is set before triton and the kernel modules are imported; if another test module imported
them first they are reloaded. Shapes are tiny: the interpreter runs every program in Python.

Reference values come from ``tests/reference.py`` (loop-based, float64); reference
gradients from float64 autograd of the same equations written with torch ops.
"""
from __future__ import annotations

import importlib
import os
import copy
import sys
from types import SimpleNamespace

import pytest
import torch

# Set before triton is imported and left set: the interpreter reads it again at launch.
# tests/test_kernels_compile.py removes it for its own subprocess.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
from lrdet_core.kernels import (_common, _cwd_channels_last, _fgd_backward, _fgd_combine, _fgd_forward,  # noqa: E402
                                _pointwise, cwd, fgd, l1, mse)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(_common._sum_partials_kernel, InterpretedFunction):
    # In import order: a kernel module picks up the kernels of the modules it imports when it is reloaded.
    for _mod in (_common, _pointwise, mse, l1, _cwd_channels_last, cwd, _fgd_forward, _fgd_combine, _fgd_backward,
                 fgd):
        importlib.reload(_mod)

from lrdet_core.errors import LossError  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import reference  # noqa: E402

# (rtol, atol) of the loss and of the gradient. bf16 stores the gradient in bf16 (8 bits of
# mantissa); the loss is accumulated in fp32 from exactly the bf16 inputs the reference reads.
TOL = {torch.float32: dict(loss=(1e-5, 1e-6), grad=(1e-5, 1e-6)),
       torch.bfloat16: dict(loss=(1e-4, 1e-4), grad=(1e-2, 1e-3))}
SHAPES = [(2, 3, 13, 21), (2, 3, 7, 11), (2, 3, 3, 5)]


def _levels(dtype, channels_last=False, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        s, t = (torch.randn(shape, generator=g) * scale for _ in range(2))
        if channels_last:
            s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
        out.append((s.to(dtype).requires_grad_(), t.to(dtype)))
    return [s for s, _ in out], [t for _, t in out]


def _check_grads(student, expected, dtype, factor=1.0):
    rtol, atol = TOL[dtype]["grad"]
    for s, e in zip(student, expected):
        assert s.grad.dtype == s.dtype
        torch.testing.assert_close(s.grad.double(), factor * e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item()))


def _f64_grads(fn, student, teacher):
    leaves = [s.detach().double().requires_grad_() for s in student]
    fn(leaves, [t.detach().double() for t in teacher]).backward()
    return [x.grad for x in leaves]


def test_sum_partials_walks_rows_longer_than_its_block():
    # Rows of 3 blocks and a bit: every step of the loop and the masked tail count, in fixed order.
    g = torch.Generator().manual_seed(3)
    parts = torch.randn(2, 3 * _common.SUM_BLOCK + 5, generator=g)
    got = _common.sum_partials(parts)
    torch.testing.assert_close(got.double(), parts.double().sum(1), rtol=1e-5, atol=1e-3)
    assert torch.equal(_common.sum_partials(parts), got)  # deterministic
    one = _common.sum_partials(parts[0].contiguous())
    assert one.shape == () and torch.equal(one, got[0])


# --------------------------------------------------------------------------------- MSE, L1

POINTWISE = {"mse": (mse.mse_loss_triton, reference.ref_mse, lambda d: d * d),
             "l1": (l1.l1_loss_triton, reference.ref_l1, lambda d: d.abs())}


@pytest.mark.parametrize("name", sorted(POINTWISE))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_pointwise_matches_reference(name, reduction, dtype, channels_last):
    fn, ref, elem = POINTWISE[name]
    student, teacher = _levels(dtype, channels_last)
    loss = fn(student, teacher, reduction)
    expected = sum(ref(s, t, reduction) for s, t in zip(student, teacher))
    assert loss.dtype == torch.float32 and loss.shape == ()
    rtol, atol = TOL[dtype]["loss"]
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)
    (loss * 2).backward()  # not the last layer: grad_output = 2 takes the rescale path
    grads = _f64_grads(lambda S, T: sum(getattr(elem(s - t), reduction)() for s, t in zip(S, T)), student, teacher)
    _check_grads(student, grads, dtype, factor=2.0)


def test_l1_gradient_is_zero_where_equal():
    s = torch.tensor([[[[1.0, 2.0, 3.0]]]], requires_grad=True)
    l1.l1_loss_triton([s], [torch.tensor([[[[1.0, 0.0, 5.0]]]])]).backward()
    assert s.grad.flatten().tolist() == [0.0, 1.0, -1.0]


@pytest.mark.parametrize("name", sorted(POINTWISE))
def test_pointwise_non_dense_and_many_levels(name):
    # 7 levels (two launches of at most 6), one of them a strided slice (contiguous fallback).
    fn, ref, _ = POINTWISE[name]
    base = torch.randn(2, 3, 5, 14)
    student = [torch.randn(1, 2, 3, k).requires_grad_() for k in range(1, 7)] + [base[..., ::2].requires_grad_()]
    teacher = [torch.randn_like(s) for s in student]
    loss = fn(student, teacher)
    expected = sum(ref(s, t) for s, t in zip(student, teacher))
    assert abs(loss.item() - expected) <= 1e-5 * abs(expected)
    loss.backward()
    assert student[-1].grad.shape == (2, 3, 5, 7)


# Level counts around the launch-group boundary (MAX_LEVELS levels per launch): 4 and 5 fill one
# group partly, 6 fills it exactly, 7 spills one level into a second launch.
LEVEL_COUNTS = [4, 5, 6, 7]


def _many_levels(count, dtype=torch.float32, seed=0):
    # Every level has its own shape and scale, so a level dropped, repeated or shifted to another
    # slot changes the value and the gradients.
    g = torch.Generator().manual_seed(seed)
    sizes = [(5, 7), (3, 9), (4, 4), (2, 11), (6, 3), (1, 13), (3, 5)][:count]
    student, teacher = [], []
    for i, (h, w) in enumerate(sizes):
        shape = (2, 2 + i % 3, h, w)
        student.append((torch.randn(shape, generator=g) * (1 + i)).to(dtype).requires_grad_())
        teacher.append((torch.randn(shape, generator=g) * (1 + i)).to(dtype))
    return student, teacher


@pytest.mark.parametrize("name", sorted(POINTWISE))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("count", LEVEL_COUNTS)
def test_pointwise_level_groups_with_upstream_weight(name, reduction, count):
    assert _common.MAX_LEVELS == 6  # LEVEL_COUNTS straddle this boundary
    fn, ref, elem = POINTWISE[name]
    student, teacher = _many_levels(count, seed=count)
    loss = fn(student, teacher, reduction)
    expected = sum(ref(s, t, reduction) for s, t in zip(student, teacher))
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    (loss * 2.5).backward()  # grad_output = 2.5, as for a loss weighted after the call
    grads = _f64_grads(lambda S, T: sum(getattr(elem(s - t), reduction)() for s, t in zip(S, T)), student, teacher)
    _check_grads(student, grads, torch.float32, factor=2.5)


@pytest.mark.parametrize("count", LEVEL_COUNTS)
@pytest.mark.parametrize("block", [None, 16], ids=["one_chunk", "chunked"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cwd_level_groups_with_upstream_weight(count, block, channels_last):
    student, teacher = _many_levels(count, seed=10 + count)
    if channels_last:
        student = [s.detach().to(memory_format=torch.channels_last).requires_grad_() for s in student]
        teacher = [t.to(memory_format=torch.channels_last) for t in teacher]
    loss = cwd.cwd_loss_triton(student, teacher, tau=1.5, block=block)
    expected = sum(reference.ref_cwd(s, t, 1.5) for s, t in zip(student, teacher))
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    weight = torch.rand((), generator=torch.Generator().manual_seed(count)) + 0.5  # a random upstream weight
    (loss * weight).backward()
    _check_grads(student, _f64_grads(lambda S, T: _cwd64(S, T, 1.5), student, teacher), torch.float32,
                 factor=weight.item())


@pytest.mark.parametrize("name", sorted(POINTWISE))
def test_pointwise_teacher_constant_student_untouched(name):
    fn = POINTWISE[name][0]
    student, teacher = _levels(torch.float32)
    teacher = [t.requires_grad_() for t in teacher]
    before = [s.detach().clone() for s in student]
    fn(student, teacher).backward()
    assert all(t.grad is None for t in teacher)
    assert all(torch.equal(s.detach(), b) for s, b in zip(student, before))


# ---------------------------------------------------------------------------------- CWD

def _cwd64(student, teacher, tau):
    total = 0.0
    for s, t in zip(student, teacher):
        n, c = s.shape[:2]
        ls = torch.log_softmax(s.flatten(2) / tau, -1)
        lt = torch.log_softmax(t.flatten(2) / tau, -1)
        total = total + (lt.exp() * (lt - ls)).sum() * tau * tau / (n * c)
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("block", [None, 16], ids=["one_chunk", "chunked"])
def test_cwd_matches_reference(dtype, channels_last, block):
    # block=16 walks every level (rows of 15 to 273 cells) except 3x5 in chunks (channels_last: 32-cell chunks).
    student, teacher = _levels(dtype, channels_last, scale=3.0)
    loss = cwd.cwd_loss_triton(student, teacher, tau=2.0, block=block)
    expected = sum(reference.ref_cwd(s, t, 2.0) for s, t in zip(student, teacher))
    rtol, atol = TOL[dtype]["loss"]
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)
    (loss * 2).backward()
    _check_grads(student, _f64_grads(lambda S, T: _cwd64(S, T, 2.0), student, teacher), dtype, factor=2.0)


def test_cwd_block_per_level_launches():
    # Levels whose rows pick three different BLOCKs (64x64 -> 4096, 32x32 -> 1024, 5x7 and 3x5 -> 256),
    # interleaved, so the launch plan regroups them and the partial/logsumexp offsets must follow.
    g = torch.Generator().manual_seed(5)
    shapes = [(1, 2, 32, 32), (2, 3, 5, 7), (1, 2, 64, 64), (2, 2, 3, 5)]
    student = [(torch.randn(sh, generator=g) * 2).requires_grad_() for sh in shapes]
    teacher = [torch.randn(sh, generator=g) * 2 for sh in shapes]
    plan = cwd.launch_plan([sh[2] * sh[3] for sh in shapes], None)
    assert [b for b, _ in plan] == [4096, 1024, 256] and plan[2][1] == [1, 3]
    loss = cwd.cwd_loss_triton(student, teacher, tau=2.0)
    expected = sum(reference.ref_cwd(s, t, 2.0) for s, t in zip(student, teacher))
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    (loss * 1.7).backward()
    _check_grads(student, _f64_grads(lambda S, T: _cwd64(S, T, 2.0), student, teacher), torch.float32, factor=1.7)


@pytest.mark.parametrize("block", [None, 16], ids=["one_chunk", "chunked"])
def test_cwd_huge_logits_finite(block):
    student, teacher = _levels(torch.float32, scale=1e4)
    loss = cwd.cwd_loss_triton(student, teacher, block=block)
    loss.backward()
    expected = sum(reference.ref_cwd(s, t) for s, t in zip(student, teacher))
    assert torch.isfinite(loss) and all(torch.isfinite(s.grad).all() for s in student)
    assert abs(loss.item() - expected) <= 1e-4 * expected


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("block", [None, 16], ids=["one_chunk", "chunked"])
def test_cwd_near_equal_rows_at_a_large_offset_keep_their_precision(channels_last, block):
    # Logits ~4000 (ulp 2.4e-4) whose spreads are O(1) and a student close to the teacher: the KL
    # per row is ~1e-3. lse_s - lse_t must cancel the maxima before the logs are added; rounding
    # ms + log(zs) first is off by an ulp of 4000 per row: 1.2 % of the loss here (measured).
    g = torch.Generator().manual_seed(9)
    t = [4000 + torch.randn(2, 3, h, w, generator=g) for h, w in ((13, 21), (7, 11))]
    s = [x + 0.05 * torch.randn(x.shape, generator=g) for x in t]
    if channels_last:
        t = [x.to(memory_format=torch.channels_last) for x in t]
        s = [x.to(memory_format=torch.channels_last) for x in s]
    s = [x.requires_grad_() for x in s]
    loss = cwd.cwd_loss_triton(s, t, tau=1.0, block=block)
    s64 = [x.detach().double() for x in s]
    want = _cwd64(s64, [x.double() for x in t], 1.0)
    torch.testing.assert_close(loss.double(), want, rtol=1e-3, atol=0)
    loss.backward()
    # Gradients p_s - p_t of ~1e-4 against probabilities of ~1e-2: exp(s - lse) must not carry an ulp of 4000.
    _check_grads(s, _f64_grads(lambda S, T: _cwd64(S, T, 1.0), s, t), torch.float32)


def test_cwd_teacher_constant():
    student, teacher = _levels(torch.float32)
    teacher = [t.requires_grad_() for t in teacher]
    cwd.cwd_loss_triton(student, teacher).backward()
    assert all(t.grad is None for t in teacher)


# ---------------------------------------------------------------------------------- FGD

def _fgd_inputs(dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 5, 7, 11, generator=g), torch.randn(2, 5, 7, 11, generator=g)
    if channels_last:
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 30.0]]), torch.tensor([[0.0, 0.0, 20.0, 50.0], [50, 10, 80, 40]])]
    fg, bg = reference.ref_fgd_masks(boxes, (56, 88), 8, (7, 11))
    return s.to(dtype).requires_grad_(), t.to(dtype), fg.float(), bg.float()


def _fgd_ref_terms(s, t, fg, bg, temp):
    as_t, ac_t = reference.ref_spatial_attention(t, temp), reference.ref_channel_attention(t, temp)
    as_s, ac_s = reference.ref_spatial_attention(s, temp), reference.ref_channel_attention(s, temp)
    s64, t64 = s.detach().double(), t.detach().double()
    n_, c_, h_, w_ = s.shape
    ast = torch.tensor(as_t, dtype=torch.float64).reshape(n_, 1, h_, w_)
    act = torch.tensor(ac_t, dtype=torch.float64).reshape(n_, c_, 1, 1)
    focal = ast * act * (s64 - t64) ** 2
    l_att = sum(abs(p - q) for a, b in zip(ac_s, ac_t) for p, q in zip(a, b))
    l_att += sum(abs(p - q) for a, b in zip(as_s, as_t) for p, q in zip(a, b))
    return ((fg.double()[:, None] * focal).sum().item() / n_, (bg.double()[:, None] * focal).sum().item() / n_,
            l_att / n_)


def _fgd64(s, t, fg, bg, temp):
    n_, c_, h_, w_ = s.shape

    def att(x):
        a = x.abs().mean(1).flatten(1) / temp
        b = x.abs().flatten(2).mean(2) / temp
        return h_ * w_ * torch.softmax(a, -1), c_ * torch.softmax(b, -1)

    as_s, ac_s = att(s)
    as_t, ac_t = att(t)
    focal = as_t[:, None, :] * ac_t[:, :, None] * (s - t).flatten(2) ** 2
    l_fg = (fg.double().flatten(1)[:, None] * focal).sum() / n_
    l_bg = (bg.double().flatten(1)[:, None] * focal).sum() / n_
    l_att = ((ac_s - ac_t).abs().sum() + (as_s - as_t).abs().sum()) / n_
    return l_fg, l_bg, l_att


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("go", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (0.5, 2.0, 3.0)],
                         ids=["last_layer", "times_2", "unequal"])
def test_fgd_matches_reference(dtype, channels_last, go):
    s, t, fg, bg = _fgd_inputs(dtype, channels_last)
    out = fgd.fgd_focal_attention_triton([s], [t], [fg], [bg], temp=0.5)
    expected = _fgd_ref_terms(s, t, fg, bg, 0.5)
    rtol, atol = TOL[dtype]["loss"]
    for got, exp in zip(out, expected):
        torch.testing.assert_close(got.double(), torch.tensor(exp, dtype=torch.float64), rtol=rtol, atol=atol)
    sum(w * x for w, x in zip(go, out)).backward()
    leaf = s.detach().double().requires_grad_()
    sum(w * x for w, x in zip(go, _fgd64(leaf, t.detach().double(), fg, bg, 0.5))).backward()
    _check_grads([s], [leaf.grad], dtype)


def _fgd_total64(s, t, fg, bg, gs, gt, temp, alpha, beta, gamma, lam):
    l_fg, l_bg, l_att = _fgd64(s, t, fg, bg, temp)
    l_glb = ((s + gs(s) - t - gt(t)) ** 2).sum() / s.shape[0]
    return alpha * l_fg + beta * l_bg + gamma * l_att + lam * l_glb


def _randomize(block, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return block


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fgd_triton_dispatch_all_four_terms(monkeypatch, channels_last):
    # Through lrdet_core.losses.fgd_loss(backend="triton"): focal and attention terms in the kernel, the
    # global term eagerly; every weight non-zero and of a different size, so a dropped term shows.
    from lrdet_core.losses import GcBlock, fgd_loss
    from lrdet_core.losses import _common as losses_common

    monkeypatch.setattr(losses_common, "_is_cuda", lambda x: True)
    s, t, fg, bg = _fgd_inputs(torch.float32, channels_last, seed=4)
    gs, gt = _randomize(GcBlock(5), 1), _randomize(GcBlock(5), 2)
    weights = dict(temp=0.5, alpha=0.9, beta=0.4, gamma=0.3, lam=0.2)
    loss = fgd_loss(s, t, fg, bg, gs, gt, backend="triton", **weights)
    expected = reference.ref_fgd(s, t, fg, bg, gs, gt, **weights)
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    loss.backward()
    leaf = s.detach().double().requires_grad_()
    _fgd_total64(leaf, t.detach().double(), fg, bg, gs.double(), gt.double(), **weights).backward()
    # The eager fp32 GcBlock term (LayerNorm over C/2 = 2 channels) rounds at ~1e-5 of the largest
    # gradient; the kernel's own terms agree to ~2e-7 (lam=0). Dropping any term moves it by > 0.1.
    expected = leaf.grad
    torch.testing.assert_close(s.grad.double(), expected, rtol=1e-4, atol=3e-5 * expected.abs().max().item())


# Seven levels (two launch groups of <= 6 slots), each with its own C and H x W, sizes not
# multiples of the tiles; the stride of each level decides its masks.
FGD_PYRAMID = [(5, 13, 21, 4), (3, 7, 11, 8), (6, 4, 6, 16), (2, 3, 5, 8), (4, 9, 2, 4), (3, 1, 1, 64), (5, 2, 3, 32)]


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "mixed"])
def test_fgd_loss_all_levels_in_each_launch_match_reference(monkeypatch, layout):
    # FGDLoss(backend="triton") runs every level through one forward, one combine and one backward
    # launch (per group of six, and per channel tile in forward): values and gradients of every level against float64, per level.
    from lrdet_core.losses import FGDLoss
    from lrdet_core.losses import _common as losses_common

    monkeypatch.setattr(losses_common, "_is_cuda", lambda x: True)
    g = torch.Generator().manual_seed(11)
    canvas = (56, 88)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 30.0]]), torch.tensor([[0.0, 0.0, 20.0, 50.0], [50, 10, 80, 40]])]
    student, teacher = [], []
    for i, (c, h, w, _) in enumerate(FGD_PYRAMID):
        s, t = torch.randn(2, c, h, w, generator=g), torch.randn(2, c, h, w, generator=g)
        if layout == "nhwc" or (layout == "mixed" and i % 2):
            s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
        student.append(s.requires_grad_())
        teacher.append(t)
    ctx = SimpleNamespace(boxes=boxes, strides=[st for *_, st in FGD_PYRAMID], canvas_size=canvas)
    weights = dict(temp=0.5, alpha=0.9, beta=0.4, gamma=0.3, lam=0.2)
    loss_fn = FGDLoss("retinanet", channels=[c for c, *_ in FGD_PYRAMID], backend="triton", **weights)
    for i, m in enumerate(list(loss_fn.gc_student) + list(loss_fn.gc_teacher)):
        _randomize(m, i)
    loss = loss_fn(student, teacher, ctx)
    masks = [reference.ref_fgd_masks(boxes, canvas, st, (h, w)) for _, h, w, st in FGD_PYRAMID]
    want = sum(reference.ref_fgd(s, t, fg, bg, loss_fn.gc_student[i], loss_fn.gc_teacher[i], **weights)
               for i, (s, t, (fg, bg)) in enumerate(zip(student, teacher, masks)))
    torch.testing.assert_close(loss.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    terms = loss_fn.terms(student, teacher, ctx)
    want_terms = [reference.ref_fgd_terms(s, t, fg, bg, loss_fn.gc_student[i], loss_fn.gc_teacher[i], 0.5)
                  for i, (s, t, (fg, bg)) in enumerate(zip(student, teacher, masks))]
    for k in ("fg", "bg", "att", "glb"):
        torch.testing.assert_close(terms[k].double(), torch.tensor(sum(w[k] for w in want_terms), dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    loss.backward()
    for i, (s, t, (fg, bg)) in enumerate(zip(student, teacher, masks)):
        leaf = s.detach().double().requires_grad_()
        gs, gt = (copy.deepcopy(m).double() for m in (loss_fn.gc_student[i], loss_fn.gc_teacher[i]))
        _fgd_total64(leaf, t.double(), fg, bg, gs, gt, **weights).backward()
        # As in test_fgd_triton_dispatch_all_four_terms: the eager fp32 GcBlock term rounds at ~1e-5.
        torch.testing.assert_close(s.grad.double(), leaf.grad, rtol=1e-4, atol=3e-5 * leaf.grad.abs().max().item())


@pytest.mark.parametrize("n_levels", [5, 6])
def test_fgd_five_or_six_levels_of_one_channel_count_fill_every_slot_of_one_launch(n_levels):
    # A real FPN has one channel count, so all its levels share a forward tile and go in one launch, slot 0 to
    # slot n-1 (FGD_PYRAMID above mixes channel counts: its launches hold 3, 3 and 1 levels and never reach
    # slots 3-5). Every level's terms and gradient against float64, level by level.
    g = torch.Generator().manual_seed(21)
    canvas, strides = (72, 112), (8, 16, 32, 64, 128, 256)[:n_levels]
    sizes = [(-(-canvas[0] // st), -(-canvas[1] // st)) for st in strides]
    boxes = [torch.tensor([[8.0, 8.0, 60.0, 40.0]]), torch.tensor([[0.0, 20.0, 100.0, 70.0], [30, 0, 50, 30]])]
    student = [torch.randn(2, 4, h, w, generator=g).requires_grad_() for h, w in sizes]
    teacher = [torch.randn(2, 4, h, w, generator=g) for h, w in sizes]
    masks = [[m.float() for m in reference.ref_fgd_masks(boxes, canvas, st, hw)] for st, hw in zip(strides, sizes)]
    assert len({fgd.forward_tile(s.shape[1], False) for s in student}) == 1 and n_levels <= fgd.MAX_LEVELS
    out = fgd.fgd_focal_attention_triton(student, teacher, [m[0] for m in masks], [m[1] for m in masks], 0.5)
    leaves = [s.detach().double().requires_grad_() for s in student]
    per_level = [_fgd64(a, t.double(), fg, bg, 0.5) for a, t, (fg, bg) in zip(leaves, teacher, masks)]
    want = [sum(terms) for terms in zip(*per_level)]
    for got, exp in zip(out, want):
        torch.testing.assert_close(got.double(), exp.detach(), rtol=1e-5, atol=1e-6)
    sum(out).backward()
    sum(want).backward()
    _check_grads(student, [a.grad for a in leaves], torch.float32)


def test_fgd_weights_scale_terms_and_gradient():
    s, t, fg, bg = _fgd_inputs(torch.float32, False)
    plain = fgd.fgd_focal_attention_triton([s], [t], [fg], [bg], 0.5)
    sum(plain).backward()
    s2 = s.detach().clone().requires_grad_()
    weighted = fgd.fgd_focal_attention_triton([s2], [t], [fg], [bg], 0.5, weights=(2.0, 3.0, 4.0))
    for a, b, w in zip(plain, weighted, (2.0, 3.0, 4.0)):
        torch.testing.assert_close(b, w * a)
    sum(weighted).backward()
    s3 = s.detach().clone().requires_grad_()
    out3 = fgd.fgd_focal_attention_triton([s3], [t], [fg], [bg], 0.5)
    (2 * out3[0] + 3 * out3[1] + 4 * out3[2]).backward()  # recompute path gives the same gradient
    torch.testing.assert_close(s2.grad, s3.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fgd_one_pass_forward_across_programs_with_large_logits(monkeypatch, channels_last):
    # The forward pass sums M(p) e^(a_T(p) - m) (S - T)^2 with each program's running maximum m of
    # the spatial logits, over several sub-blocks and several programs per image; the combine kernel
    # loops over more pixels and more programs than one step takes (steps shrunk to keep it small). Teacher logits ~300-320 (e^89 overflows fp32), ~20
    # higher around a bump placed elsewhere in each image, so a missing rescale or maximum shows.
    n, c, h, w = 2, 64, 40, 40
    monkeypatch.setattr(fgd, "COMBINE_BLOCK", 512)
    monkeypatch.setattr(fgd, "COMBINE_TILE", 256)
    block_c, sub_hw, subs = fgd.forward_tile(c, channels_last)
    programs = -(-h * w // (sub_hw * subs))
    assert programs > 2 * fgd.combine_tile(c)["BLOCK_K"] and subs > 1 and h * w > 2 * fgd.COMBINE_BLOCK
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    bump = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0) for cy, cx in ((30, 8), (5, 33))])
    t = (150 + 10 * bump[:, None]) * torch.randn(n, c, h, w, generator=g).sign()
    t = t * (1 + 0.05 * torch.randn(1, c, h, 1, generator=g))  # channel attention that differs row by row
    s = t + 3 * torch.randn(n, c, h, w, generator=g)
    if channels_last:
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    s.requires_grad_()
    boxes = [torch.tensor([[40.0, 200.0, 120.0, 300.0]]), torch.tensor([[200.0, 0.0, 300.0, 100.0]])]
    fg, bg = (m.float() for m in reference.ref_fgd_masks(boxes, (h * 8, w * 8), 8, (h, w)))
    out = fgd.fgd_focal_attention_triton([s], [t], [fg], [bg], 0.5)
    leaf = s.detach().double().requires_grad_()
    want = _fgd64(leaf, t.double(), fg, bg, 0.5)
    assert want[0].item() > 0 and want[1].item() > 0
    # Ill-conditioned on purpose: a logit of ~310 summed over 64 channels in fp32 is off by ~1e-4, and
    # so is every e^logit relatively (eager fp32 is off by ~1e-5 here). A missing rescale is off by e^k.
    for got, exp in zip(out, want):
        torch.testing.assert_close(got.double(), exp.detach(), rtol=1e-3, atol=0)
    sum(out).backward()
    sum(want).backward()
    torch.testing.assert_close(s.grad.double(), leaf.grad, rtol=1e-3, atol=1e-3 * leaf.grad.abs().max().item())


def test_fgd_wider_features_than_the_tile_are_an_error():
    s = torch.zeros(1, fgd.MAX_CHANNELS + 1, 1, 1)
    m = torch.ones(1, 1, 1)
    with pytest.raises(LossError, match="at most 4096 channels.*backend='torch'"):
        fgd.fgd_focal_attention_triton([s], [s], [m], [m], 0.5)


def test_fgd_teacher_and_masks_constant():
    s, t, fg, bg = _fgd_inputs(torch.float32, False)
    t.requires_grad_()
    fg.requires_grad_()
    sum(fgd.fgd_focal_attention_triton([s], [t], [fg], [bg], 0.5)).backward()
    assert t.grad is None and fg.grad is None and s.grad is not None


# ------------------------------------------------------------- GPU behaviour (issue 15)

def _loss_cases():
    """name -> (student, teacher, call) for every loss, small enough for the interpreter."""
    def fgd_call(S, T):
        s, t = S[0], T[0]
        fg, bg = reference.ref_fgd_masks([torch.tensor([[8.0, 8.0, 40.0, 30.0]])] * s.shape[0], (56, 88), 8, (7, 11))
        return sum(fgd.fgd_focal_attention_triton([s], [t], [fg.float()], [bg.float()], 0.5,
                                                  weights=(1e-3, 5e-4, 5e-4)))

    return {"mse": lambda S, T: mse.mse_loss_triton(S, T), "mse_mean": lambda S, T: mse.mse_loss_triton(S, T, "mean"),
            "l1": lambda S, T: l1.l1_loss_triton(S, T), "l1_mean": lambda S, T: l1.l1_loss_triton(S, T, "mean"),
            "cwd": lambda S, T: cwd.cwd_loss_triton(S, T),
            "cwd_chunked": lambda S, T: cwd.cwd_loss_triton(S, T, block=16),
            "cwd_nhwc": lambda S, T: cwd.cwd_loss_triton([_nhwc(s) for s in S], [_nhwc(t) for t in T], block=32),
            "fgd": fgd_call}


def _nhwc(x):
    return x.to(memory_format=torch.channels_last)


LOSS_NAMES = sorted(_loss_cases())


def _small_pair(name, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 5, 7, 11)] if name == "fgd" else [(2, 3, 7, 11), (2, 3, 3, 5)]
    student = [torch.randn(sh, generator=g).to(dtype).requires_grad_() for sh in shapes]
    teacher = [torch.randn(sh, generator=g).to(dtype) for sh in shapes]
    return student, teacher


# Sizes where the unit-scale gradient lies below fp16's normal range (6.1e-5): mean reductions
# over 491,520 elements (1/n not a power of two), CWD over 4096-cell rows, FGD with the RetinaNet preset weights.
FP16_CASES = {"mse_mean": ((2, 15, 128, 128), lambda S, T: mse.mse_loss_triton(S, T, "mean")),
              "l1_mean": ((2, 15, 128, 128), lambda S, T: l1.l1_loss_triton(S, T, "mean")),
              "cwd": ((2, 4, 64, 64), lambda S, T: cwd.cwd_loss_triton(S, T)),
              "fgd": ((2, 8, 32, 64), None)}
LOSS_SCALE = 65536.0


def _fgd_fp16(S, T):
    n, _, h, w = S[0].shape
    fg, bg = reference.ref_fgd_masks([torch.tensor([[8.0, 8.0, 200.0, 120.0]])] * n, (h * 8, w * 8), 8, (h, w))
    return sum(fgd.fgd_focal_attention_triton(S[:1], T[:1], [fg.float()], [bg.float()], 0.5,
                                              weights=(1e-3, 5e-4, 5e-4)))


@pytest.mark.parametrize("name", sorted(FP16_CASES))
def test_fp16_gradient_under_loss_scale_matches_eager(name):
    # GradScaler multiplies the loss by 65536 so that fp16 gradients stay in range. The kernel must
    # round to fp16 once, after the scale (as eager autograd does), not store a unit-scale fp16
    # gradient that has already flushed to zero.
    shape, fn = FP16_CASES[name]
    fn = fn or _fgd_fp16
    g = torch.Generator().manual_seed(7)
    s32, t32 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    student = [s32.half().requires_grad_()]
    (fn(student, [t32.half()]) * LOSS_SCALE).backward()
    got = student[0].grad
    # Eager reference: the same loss in float64 from the same fp16 values, then one rounding to fp16.
    leaf = s32.half().double().requires_grad_()
    if name == "fgd":
        n, _, h, w = shape
        fg, bg = reference.ref_fgd_masks([torch.tensor([[8.0, 8.0, 200.0, 120.0]])] * n, (h * 8, w * 8), 8, (h, w))
        l_fg, l_bg, l_att = _fgd64(leaf, t32.half().double(), fg, bg, 0.5)
        loss64 = 1e-3 * l_fg + 5e-4 * l_bg + 5e-4 * l_att
    elif name == "cwd":
        loss64 = _cwd64([leaf], [t32.half().double()], 1.0)
    else:
        elem = POINTWISE[name.split("_")[0]][2]
        loss64 = elem(leaf - t32.half().double()).mean()
    (loss64 * LOSS_SCALE).backward()
    want = leaf.grad.half()
    zeros_got = (got == 0).double().mean().item()
    zeros_want = (want == 0).double().mean().item()
    print(f"{name}: zeros triton {zeros_got:.4%}, eager {zeros_want:.4%}")
    assert zeros_got <= zeros_want + 1e-4, f"{name}: {zeros_got:.2%} zeros vs eager {zeros_want:.2%}"
    # One fp16 rounding on each side: one ulp apart (relative 2**-10), plus the fp32 cancellation
    # of CWD's p_s - p_t (absolute, ~1e-6 of the largest gradient).
    torch.testing.assert_close(got.double(), want.double(), rtol=2 ** -10, atol=1e-5 * want.abs().max().item())


class _Recorder:
    """Stands in for ``torch.cuda.device``: records the devices entered and how deep we are."""

    entered: list = []
    depth = 0

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        type(self).entered.append(self.device)
        type(self).depth += 1

    def __exit__(self, *exc):
        type(self).depth -= 1


def _kernel_objects():
    """Every launchable kernel of the package, as (module, attribute name)."""
    modules = (_common, _pointwise, _cwd_channels_last, cwd, fgd)
    return [(mod, name) for mod in modules for name, obj in vars(mod).items()
            if name.endswith("_kernel") and isinstance(obj, InterpretedFunction)]


class _LaunchSpy:
    """Wraps a kernel; every ``kernel[grid](...)`` is logged (name, guard depth, devices entered), then run."""

    active: list = []  # non-empty while a kernel runs

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append((self.name, _Recorder.depth, list(_Recorder.entered)))
            _LaunchSpy.active.append(self.name)
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                _LaunchSpy.active.pop()
        return run


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_launch_runs_under_the_tensors_device(monkeypatch, name):
    # No second GPU here: the CUDA branch of the guard is taken with a recording torch.cuda.device,
    # and every kernel launch (forward and backward) must happen inside it, for the tensors' device.
    log: list = []
    _Recorder.entered, _Recorder.depth = [], 0
    monkeypatch.setattr(_common, "_is_cuda", lambda x: True)
    monkeypatch.setattr(torch.cuda, "device", _Recorder)
    for mod, attr in _kernel_objects():
        monkeypatch.setattr(mod, attr, _LaunchSpy(getattr(mod, attr), attr, log))
    student, teacher = _small_pair(name)
    _loss_cases()[name](student, teacher).backward()
    assert log, "no kernel was launched"
    outside = [k for k, depth, _ in log if depth == 0]
    assert not outside, f"launched outside torch.cuda.device: {outside}"
    assert all(entered[-1] == student[0].device for _, _, entered in log)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_nothing_of_gradient_size_outlives_backward(name):
    # The gradient handed to autograd must not also be kept by the graph (ctx) after backward:
    # once .grad is dropped, it is freed while the loss tensor (and its graph) is still alive.
    import gc
    import weakref

    student, teacher = _small_pair(name)
    refs = []
    for s in student:
        s.register_hook(lambda g: refs.append(weakref.ref(g)))
    loss = _loss_cases()[name](student, teacher)
    loss.backward()
    assert len(refs) == len(student)
    for s in student:
        s.grad = None
    gc.collect()
    assert all(r() is None for r in refs), "a gradient buffer is still referenced after backward"
    assert loss.grad_fn is not None  # the graph is still alive: it is not what freed the buffer


def _custom_nodes(loss):
    """The autograd nodes of the kernels' own Functions (their ctx objects) under ``loss``."""
    seen, todo, found = set(), [loss.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.append(node)
        todo += [nxt for nxt, _ in node.next_functions]
    return found


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_no_tensor_is_stashed_on_the_autograd_context(name):
    # Tensors kept for backward go through save_for_backward (checked for in-place changes, freed
    # with the graph); a tensor set as a ctx attribute escapes both.
    student, teacher = _small_pair(name)
    nodes = _custom_nodes(_loss_cases()[name](student, teacher))
    assert nodes, "no kernel Function in the graph"

    def tensors_in(value):
        if isinstance(value, torch.Tensor):
            return 1
        if isinstance(value, (tuple, list)):
            return sum(tensors_in(v) for v in value)
        if isinstance(value, dict):
            return sum(tensors_in(v) for v in value.values())
        return 0

    for node in nodes:
        stashed = {k: type(v).__name__ for k, v in vars(node).items() if tensors_in(v)}
        assert not stashed, f"{type(node).__name__} keeps tensors as ctx attributes: {stashed}"
        assert node.saved_tensors  # what it keeps, it keeps through save_for_backward


_COPY_OPS = ("aten._to_copy", "aten.copy_", "aten.clone", "aten.contiguous")


@pytest.mark.parametrize("name", ["mse", "l1", "cwd", "fgd"])
def test_mixed_bf16_fp32_inputs_are_not_copied(monkeypatch, name):
    # A bf16 student with an fp32 teacher, through the library's dispatch (backend="triton"): no op
    # outside the kernels may copy or cast a tensor of the features' size.
    from torch.utils._python_dispatch import TorchDispatchMode

    from lrdet_core.losses import _common as losses_common
    from lrdet_core.losses import cwd_loss, l1_loss, mse_loss

    monkeypatch.setattr(losses_common, "_is_cuda", lambda x: True)
    for mod, attr in _kernel_objects():
        monkeypatch.setattr(mod, attr, _LaunchSpy(getattr(mod, attr), attr, []))
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, 11, generator=g).bfloat16().requires_grad_()
    t = torch.randn(2, 5, 7, 11, generator=g)
    big = s.numel()
    copies = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # The interpreter itself copies kernel arguments to and from the host: not counted.
            if not _LaunchSpy.active and str(func.overloadpacket) in _COPY_OPS:
                sizes = [a.numel() for a in args if isinstance(a, torch.Tensor)]
                if sizes and max(sizes) >= big:
                    copies.append((str(func), sizes))
            return out

    fg, bg = reference.ref_fgd_masks([torch.tensor([[8.0, 8.0, 40.0, 30.0]])] * 2, (56, 88), 8, (7, 11))
    calls = {"mse": lambda: mse_loss(s, t, backend="triton"), "l1": lambda: l1_loss(s, t, backend="triton"),
             "cwd": lambda: cwd_loss(s, t, backend="triton"),
             # the focal/attention kernel behind the dispatch (FGD's global term is eager fp32 by design)
             "fgd": lambda: sum(fgd.fgd_focal_attention_triton(*[[x] for x in losses_common.triton_inputs(s, t)],
                                                               [fg.float()], [bg.float()], 0.5))}
    with Watch():
        calls[name]().backward()
    assert s.grad is not None and s.grad.dtype == torch.bfloat16
    assert not copies, f"copies of feature-sized tensors: {copies}"


# The "Bytes and launches" table of docs/benchmarks.md: (fwd, bwd) accesses per element and
# (fwd, bwd) Triton launches per call on RetinaNet P3-P7.
# CWD (NCHW): P3, P4 and P5-P7 have three different row blocks, so 3 launches + 1 sum forward.
# FGD: one stats launch, one focal launch and one sum forward, one backward launch, for all five levels.
BYTES_AND_LAUNCHES = {"mse": ((2, 3), (2, 1)), "l1": ((2, 3), (2, 1)), "cwd": ((2, 3), (4, 3)),
                      "cwd_cl": ((2, 3), (3, 1)), "fgd": ((2, 3), (2, 1))}
# FGD's other kernel ops per call (fwd, bwd) on RetinaNet P3-P7, and the masks' share of the forward.
FGD_TORCH_OPS = (202, 141)
FGD_MASK_OPS = 60


@pytest.mark.parametrize("name", sorted(BYTES_AND_LAUNCHES))
def test_bytes_and_launches_table(name):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import count_launches

    (fwd, bwd), (fwd_launch, bwd_launch) = BYTES_AND_LAUNCHES[name]
    acc = count_launches.accesses(name)
    assert (acc["fwd_accesses"], acc["bwd_accesses"]) == (fwd, bwd)
    got = count_launches.launches(name, 2)
    assert (got["fwd_triton"], got["bwd_triton"]) == (fwd_launch, bwd_launch)
    if name in ("mse", "l1"):
        assert got["fwd_torch"] == got["bwd_torch"] == 0  # nothing but the kernels launches
    if name == "fgd":  # the masks of all images are built by the same ops, whatever the batch
        assert count_launches.launches(name, 16)["fwd_torch"] == got["fwd_torch"]
        # The table's other kernel ops are an upper bound (a newer torch may fuse or split an op).
        assert got["fwd_torch"] <= FGD_TORCH_OPS[0] and got["bwd_torch"] <= FGD_TORCH_OPS[1]


def test_fgd_masks_ops_do_not_grow_with_levels():
    # fgd_masks_levels builds every level's masks with one set of ops: five levels cost what one does.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import count_launches
    from lrdet_core.losses.fgd import fgd_masks_levels

    dev = torch.device("meta")

    def ops(levels):
        boxes = count_launches._boxes(2, dev)
        with count_launches._TorchOps() as counted:
            fgd_masks_levels(boxes, count_launches.CANVAS, count_launches.STRIDES[:len(levels)], levels, device=dev)
        return len(counted.ops)

    assert ops(count_launches.RETINANET) == ops(count_launches.RETINANET[:1]) <= FGD_MASK_OPS


# --------------------------------------------------------------------- shared properties

def _run_all(seed):
    student, teacher = _levels(torch.float32, seed=seed)
    s, t, fg, bg = _fgd_inputs(torch.float32, False, seed=seed)
    results = [mse.mse_loss_triton(student, teacher), l1.l1_loss_triton(student, teacher),
               cwd.cwd_loss_triton(student, teacher), cwd.cwd_loss_triton(student, teacher, block=16)]
    (sum(results) * 3).backward()
    fgd_out = fgd.fgd_focal_attention_triton([s], [t], [fg], [bg], 0.5)
    (fgd_out[0] + 2 * fgd_out[1] + fgd_out[2]).backward()
    return [r.detach() for r in results] + [o.detach() for o in fgd_out] + [x.grad for x in student] + [s.grad]


def test_bitwise_deterministic():
    first, second = _run_all(3), _run_all(3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_one_backward_per_forward():
    student, teacher = _levels(torch.float32)
    loss = mse.mse_loss_triton(student, teacher)
    loss.backward(retain_graph=True)
    with pytest.raises(LossError, match="one backward pass"):
        loss.backward()


@pytest.mark.parametrize("fn", [mse.mse_loss_triton, l1.l1_loss_triton, cwd.cwd_loss_triton])
def test_shape_mismatch_names_both_shapes(fn):
    with pytest.raises(LossError, match=r"\(1, 2, 3, 4\) and \(1, 2, 3, 5\)"):
        fn([torch.zeros(1, 2, 3, 4)], [torch.zeros(1, 2, 3, 5)])


def _fgd_old_call(s, t):
    # The single-level call of earlier versions: one tensor per argument instead of lists of levels.
    n, _, h, w = s.shape
    return fgd.fgd_focal_attention_triton(s, t, torch.zeros(n, h, w), torch.zeros(n, h, w), 0.5)


@pytest.mark.parametrize("fn", [mse.mse_loss_triton, l1.l1_loss_triton, cwd.cwd_loss_triton, _fgd_old_call],
                         ids=["mse", "l1", "cwd", "fgd"])
def test_a_lone_tensor_is_not_taken_for_a_list_of_levels(fn):
    # Iterating an N x C x H x W tensor would make each image a level (and "mean" average per image).
    with pytest.raises(LossError, match=r"expected student to be a list of levels, but got a tensor of shape "
                                        r"\(2, 3, 4, 5\); pass one level as \[student\]"):
        fn(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5))


#: loss -> (the loss module's kernel loader, the kernel module's function): one name per loss.
KERNEL_FUNCTIONS = {"mse": ("_mse_loss_kernel", "mse_loss_triton"), "l1": ("_l1_loss_kernel", "l1_loss_triton"),
                    "cwd": ("_cwd_loss_kernel", "cwd_loss_triton"),
                    "fgd": ("_fgd_focal_attention_kernel", "fgd_focal_attention_triton")}


@pytest.mark.parametrize("name", sorted(KERNEL_FUNCTIONS))
def test_each_loss_imports_its_kernel_function_by_its_one_name(name):
    loader, function = KERNEL_FUNCTIONS[name]
    loss_module = importlib.import_module(f"lrdet_core.losses.{name}")
    kernel_module = {"mse": mse, "l1": l1, "cwd": cwd, "fgd": fgd}[name]
    assert getattr(loss_module, loader)() is getattr(kernel_module, function)
    # The names of earlier versions are gone, not kept as aliases.
    assert not any(hasattr(kernel_module, old) for old in (f"{name}_triton", "fgd_levels_triton"))


def test_fgd_mask_shape_error():
    s, t, fg, bg = _fgd_inputs(torch.float32, False)
    with pytest.raises(LossError, match="fg_mask"):
        fgd.fgd_focal_attention_triton([s], [t], [fg[:, :3]], [bg], 0.5)


def test_package_imports_do_not_import_triton():
    import subprocess

    code = "import sys, lrdet_core, lrdet_core.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    assert out.returncode == 0, out.stderr

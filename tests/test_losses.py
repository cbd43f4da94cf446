"""Tests of lrdet_core.losses against the float64 loop references in tests/reference.py."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from lrdet_core.context import DistillContext
from lrdet_core.errors import LossError
from lrdet_core.losses import (FGD_PRESETS, LOSSES, RECOMMENDED_ALPHA, CWDLoss, FGDLoss, GcBlock, L1Loss,
                               MSELoss, build_loss, cwd_loss, fgd_global, fgd_loss, fgd_masks, fgd_terms, l1_loss,
                               mse_loss)
from lrdet_core.losses.fgd import fgd_masks_levels

sys.path.insert(0, __import__("os").path.dirname(__file__))
import reference as ref  # noqa: E402

torch.set_num_threads(1)

SHAPES = [(2, 3, 3, 5), (1, 4, 7, 11), (2, 2, 13, 21)]
# fp32 result vs the fp64 reference: only fp32 rounding of a few hundred terms.
RTOL32 = 1e-5


def pair(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))


def pyramid(n=2, c=4, sizes=((8, 12), (4, 6), (2, 3)), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(n, c, h, w, generator=g) for h, w in sizes]
    t = [torch.randn(n, c, h, w, generator=g) for h, w in sizes]
    return s, t


def random_boxes(n, canvas, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = canvas
    out = []
    for _ in range(n):
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) * 0.4 + 1
        out.append(torch.cat([xy, xy + wh], dim=1))
    return out


def randomize_(module: nn.Module, seed=0):
    """Non-zero weights everywhere (the zero-initialised last conv would hide the GcBlock path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def close(actual, expected, rtol=RTOL32, atol=1e-6):
    actual = actual.item() if isinstance(actual, torch.Tensor) else actual
    assert math.isclose(float(actual), float(expected), rel_tol=rtol, abs_tol=atol), (float(actual), expected)


# ------------------------------------------------------------------------ reference values


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mse_l1_match_reference(shape, reduction):
    s, t = pair(shape)
    close(mse_loss(s, t, reduction), ref.ref_mse(s, t, reduction))
    close(l1_loss(s, t, reduction), ref.ref_l1(s, t, reduction))


def test_reduction_none_is_the_elementwise_map():
    s, t = pair((2, 3, 3, 5))
    torch.testing.assert_close(mse_loss(s, t, "none"), (s - t) ** 2)
    torch.testing.assert_close(l1_loss(s, t, "none"), (s - t).abs())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
def test_cwd_matches_reference(shape, tau):
    s, t = pair(shape, seed=1)
    close(cwd_loss(s, t, tau), ref.ref_cwd(s, t, tau))


def test_modules_sum_levels():
    s, t = pyramid()
    close(MSELoss()(s, t), sum(ref.ref_mse(a, b) for a, b in zip(s, t)))
    close(MSELoss("mean")(s, t), sum(ref.ref_mse(a, b, "mean") for a, b in zip(s, t)))
    close(L1Loss()(s, t), sum(ref.ref_l1(a, b) for a, b in zip(s, t)))
    close(CWDLoss(tau=2.0, weight=3.0)(s, t), 3.0 * sum(ref.ref_cwd(a, b, 2.0) for a, b in zip(s, t)))


@pytest.mark.parametrize("canvas,stride,hw", [((24, 40), 8, (3, 5)), ((56, 88), 8, (7, 11)), ((200, 336), 16, (13, 21)),
                                              ((100, 160), 32, (4, 5))])
def test_fgd_masks_match_reference(canvas, stride, hw):
    boxes = random_boxes(3, canvas, k=4, seed=stride)
    boxes[1] = boxes[1][:0]
    fg, bg = fgd_masks(boxes, canvas, stride, hw)
    rfg, rbg = ref.ref_fgd_masks(boxes, canvas, stride, hw)
    torch.testing.assert_close(fg.double(), rfg, rtol=1e-6, atol=0)
    torch.testing.assert_close(bg.double(), rbg, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (1, 6, 7, 11)])
def test_fgd_terms_match_reference(shape):
    s, t = pair(shape, seed=2)
    canvas = (shape[2] * 8, shape[3] * 8)
    fg, bg = fgd_masks(random_boxes(shape[0], canvas, seed=3), canvas, 8, shape[2:])
    gs, gt = randomize_(GcBlock(shape[1]), 1), randomize_(GcBlock(shape[1]), 2)
    got = fgd_terms(s, t, fg, bg, gs, gt, temp=0.5)
    want = ref.ref_fgd_terms(s, t, fg, bg, gs, gt, temp=0.5)
    for k in ("fg", "bg", "att", "glb"):
        close(got[k], want[k], rtol=1e-5)
    w = FGD_PRESETS["fcos"]
    close(fgd_loss(s, t, fg, bg, gs, gt, **w), ref.ref_fgd(s, t, fg, bg, gs, gt, **w))


def test_fgd_module_matches_reference_over_levels():
    s, t = pyramid(c=4, sizes=((7, 11), (4, 6), (2, 3)))
    canvas = (56, 88)
    ctx = DistillContext.from_features(t, canvas, boxes=random_boxes(2, canvas, seed=4))
    loss = FGDLoss("rcnn", channels=[4, 4, 4])
    for i, m in enumerate(list(loss.gc_student) + list(loss.gc_teacher)):
        randomize_(m, i)
    want = 0.0
    for i, (a, b) in enumerate(zip(s, t)):
        fg, bg = ref.ref_fgd_masks(ctx.boxes, canvas, ctx.strides[i], a.shape[-2:])
        want += ref.ref_fgd(a, b, fg, bg, loss.gc_student[i], loss.gc_teacher[i], **FGD_PRESETS["rcnn"])
    close(loss(s, t, ctx), want)


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fn", [lambda s, t: mse_loss(s, t), lambda s, t: mse_loss(s, t, "mean"),
                                lambda s, t: l1_loss(s, t), lambda s, t: cwd_loss(s, t, 0.7)],
                         ids=["mse", "mse-mean", "l1", "cwd"])
def test_gradcheck_pointwise_and_cwd(fn):
    s, t = pair((2, 3, 3, 5), seed=5, dtype=torch.float64)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))


def test_gradcheck_fgd_student_and_gcblocks():
    s, t = pair((2, 4, 3, 5), seed=6, dtype=torch.float64)
    fg, bg = fgd_masks(random_boxes(2, (24, 40), seed=6), (24, 40), 8, (3, 5))
    blocks = nn.ModuleList([randomize_(GcBlock(4), 7), randomize_(GcBlock(4), 8)]).double()
    names = [k for k, _ in blocks.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in blocks.parameters()]
    weights = dict(temp=0.5, alpha=1.0, beta=0.7, gamma=0.3, lam=0.2)

    def f(x, *ps):
        state = dict(zip(names, ps))
        gs = lambda y: torch.func.functional_call(blocks[0], {k[2:]: v for k, v in state.items() if k[0] == "0"}, (y,))  # noqa: E731
        gt = lambda y: torch.func.functional_call(blocks[1], {k[2:]: v for k, v in state.items() if k[0] == "1"}, (y,))  # noqa: E731
        return fgd_loss(x, t, fg.double(), bg.double(), gs, gt, **weights)

    assert torch.autograd.gradcheck(f, (s.requires_grad_(True), *params))


def test_l1_gradient_is_zero_where_equal():
    s = torch.randn(2, 3, 4, 5, requires_grad=True)
    l1_loss(s, s.detach().clone()).backward()
    assert torch.count_nonzero(s.grad) == 0


@pytest.mark.parametrize("name", ["mse", "l1", "cwd", "fgd"])
def test_not_last_layer_doubles_gradient(name):
    s, t = pyramid(seed=9)
    ctx = DistillContext.from_features(t, (64, 96), boxes=random_boxes(2, (64, 96), seed=9))
    loss = build_loss(name)
    grads = []
    for scale in (1.0, 2.0):
        x = [a.clone().requires_grad_(True) for a in s]
        (scale * loss(x, t, ctx)).backward()
        grads.append(torch.cat([a.grad.flatten() for a in x]))
    assert torch.count_nonzero(grads[0]) > 0
    assert torch.equal(grads[1], 2 * grads[0])


@pytest.mark.parametrize("name", ["mse", "l1", "cwd", "fgd"])
def test_no_gradient_reaches_the_teacher(name):
    s, t = pyramid(seed=10)
    ctx = DistillContext.from_features(t, (64, 96), boxes=random_boxes(2, (64, 96)))
    t = [b.requires_grad_(True) for b in t]
    s = [a.requires_grad_(True) for a in s]
    build_loss(name)(s, t, ctx).backward()
    assert all(b.grad is None for b in t) and all(a.grad is not None for a in s)


# ------------------------------------------------------------------------------ identities


def test_identical_inputs_give_zero():
    s, _ = pyramid(seed=11)
    same = [a.clone() for a in s]
    assert MSELoss()(s, same).item() == 0.0
    assert L1Loss()(s, same).item() == 0.0
    assert abs(CWDLoss()(s, same).item()) < 1e-6  # log_softmax of equal rows cancels exactly only up to rounding


def test_fgd_zero_init_relation_term_is_plain_squared_error():
    s, t = pair((2, 4, 7, 11), seed=12)
    got = fgd_global(s, t, GcBlock(4), GcBlock(4))
    close(got, ref.ref_mse(s, t) / 2)


def test_fgd_teacher_block_learns_through_detached_teacher():
    s, t = pair((2, 4, 3, 5), seed=13)
    gs, gt = GcBlock(4), GcBlock(4)
    fgd_global(s, t.detach(), gs, gt).backward()
    # Zero-initialised last conv: its gradient is the first to be non-zero.
    assert gt.channel_add[-1].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------- layouts and dtypes


@pytest.mark.parametrize("name", ["mse", "l1", "cwd", "fgd"])
def test_non_contiguous_and_channels_last_give_the_same_value(name):
    s, t = pyramid(seed=14, sizes=((7, 11), (4, 6)))
    ctx = DistillContext.from_features(t, (56, 88), boxes=random_boxes(2, (56, 88), seed=14))
    loss = build_loss(name)
    base = loss(s, t, ctx)
    channels_last = [a.to(memory_format=torch.channels_last) for a in s]
    transposed = [a.transpose(2, 3).contiguous().transpose(2, 3) for a in t]  # same values, H/W strides swapped
    sliced_s = [torch.stack([a, -a], dim=2).flatten(1, 2)[:, ::2] for a in s]  # every other channel
    assert not transposed[0].is_contiguous() and not sliced_s[0].is_contiguous()
    for args in ((channels_last, t), (s, transposed), (sliced_s, transposed)):
        torch.testing.assert_close(loss(*args, ctx), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mse", "l1", "cwd", "fgd"])
def test_bf16_student_fp32_teacher(name):
    s, t = pair((2, 4, 7, 11), seed=15)
    s16 = s.bfloat16()
    canvas = (56, 88)
    ctx = DistillContext.from_features([t], canvas, boxes=random_boxes(2, canvas, seed=15))
    loss = build_loss(name)
    got = loss([s16], [t], ctx)
    assert got.dtype == torch.float32
    # The reference sees the bf16-rounded student exactly, so only fp32 accumulation differs.
    if name == "fgd":
        fg, bg = ref.ref_fgd_masks(ctx.boxes, canvas, ctx.strides[0], (7, 11))
        want = ref.ref_fgd(s16, t, fg, bg, loss.gc_student[0], loss.gc_teacher[0], **FGD_PRESETS["retinanet"])
    else:
        want = getattr(ref, f"ref_{name}")(s16, t)
    close(got, want, rtol=1e-5)


def test_fp16_both_sides_and_autocast_region_stay_fp32():
    s, t = pyramid(seed=16)
    ctx = DistillContext.from_features(t, (64, 96), boxes=random_boxes(2, (64, 96), seed=16))
    for name in ("mse", "cwd", "fgd"):
        loss = build_loss(name)
        if name == "fgd":  # non-zero GcBlocks: their convs are what autocast would lower to bf16
            loss.materialize([4, 4, 4])
            randomize_(loss, 16)
        eager = loss(s, t, ctx)
        half = loss([a.half() for a in s], [b.half() for b in t], ctx)
        assert half.dtype == torch.float32 and math.isfinite(half.item())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = loss(s, t, ctx)
        assert auto.dtype == torch.float32
        torch.testing.assert_close(auto, eager, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- CWD stability


def test_cwd_stays_finite_for_huge_logits_where_a_naive_one_does_not():
    s, t = pair((1, 2, 3, 5), seed=17)
    s, t = (s * 1e4).requires_grad_(True), t * 1e4

    def naive(a, b, tau=1.0):
        p_t = torch.softmax(b.flatten(2) / tau, -1)
        p_s = torch.softmax(a.flatten(2) / tau, -1)
        return tau ** 2 / (a.shape[0] * a.shape[1]) * (p_t * (p_t.log() - p_s.log())).sum()

    assert not math.isfinite(naive(s, t).item())
    got = cwd_loss(s, t)
    got.backward()
    assert math.isfinite(got.item()) and torch.isfinite(s.grad).all()
    close(got, ref.ref_cwd(s, t), rtol=1e-5)


# ----------------------------------------------------------------------------- FGD boxes


EDGE_BOXES = {
    "empty": [torch.zeros(0, 4), torch.zeros(0, 4)],
    "partly_outside": [torch.tensor([[-20.0, -5.0, 30.0, 20.0]]), torch.tensor([[70.0, 40.0, 200.0, 90.0]])],
    "degenerate": [torch.tensor([[10.0, 10.0, 10.0, 30.0]]), torch.tensor([[5.0, 7.0, 25.0, 7.0]])],
    "inverted_nan_outside": [torch.tensor([[30.0, 10.0, 10.0, 30.0], [float("nan"), 0.0, 5.0, 5.0],
                                           [17.0, 10.0, 15.0, 30.0]]),  # inverted inside one cell
                             torch.tensor([[100.0, 60.0, 120.0, 90.0], [-30.0, -30.0, -1.0, -1.0]])],
    "whole_canvas": [torch.tensor([[0.0, 0.0, 88.0, 56.0]]), torch.tensor([[-10.0, -10.0, 500.0, 500.0]])],
}


@pytest.mark.parametrize("case", list(EDGE_BOXES))
def test_fgd_box_edge_cases(case):
    canvas, hw = (56, 88), (7, 11)
    boxes = EDGE_BOXES[case]
    fg, bg = fgd_masks(boxes, canvas, 8, hw)
    rfg, rbg = ref.ref_fgd_masks(boxes, canvas, 8, hw)
    torch.testing.assert_close(fg.double(), rfg, rtol=1e-6, atol=0)
    torch.testing.assert_close(bg.double(), rbg, rtol=1e-6, atol=0)
    s, t = pair((2, 4, 7, 11), seed=18)
    s.requires_grad_(True)
    loss = FGDLoss(channels=[4])
    terms = loss.terms([s], [t], DistillContext.from_features([t], canvas, boxes=boxes))
    assert all(math.isfinite(v.item()) for v in terms.values())
    loss([s], [t], DistillContext.from_features([t], canvas, boxes=boxes)).backward()
    assert torch.isfinite(s.grad).all()
    if case in ("empty", "inverted_nan_outside"):
        assert fg.sum() == 0 and terms["fg"].item() == 0.0
        torch.testing.assert_close(bg.sum(dim=(1, 2)), torch.ones(2))
    if case == "whole_canvas":
        assert bg.sum() == 0 and terms["bg"].item() == 0.0
    if case == "degenerate":
        assert fg[0, 1:5, 1].gt(0).all() and fg[1, 0:2, 0:5].gt(0).all()  # edges on a cell border cover 2 cells


# Boxes touching (x2 = 88, y2 = 56) or crossing the right and bottom edges of a 56 x 88 canvas:
# at stride 8 their cell ranges end at W = 11 or H = 7, one or more cells past the grid.
EDGE_TOUCHING_BOXES = [torch.tensor([[60.0, 30.0, 88.0, 56.0], [10.0, 45.0, 30.0, 70.0]]),
                       torch.tensor([[70.0, 10.0, 95.0, 40.0], [75.0, 50.0, 88.0, 56.0], [0.0, 0.0, 20.0, 20.0]])]


def _fgd_autograd64(s, t, fg, bg, gs, gt, temp, alpha, beta, gamma, lam):
    """FGD in float64 torch ops, written from the equations (not the library's code), for gradients."""
    n, c, h, w = s.shape

    def attention(x):
        a = x.abs().mean(1).reshape(n, h * w) / temp
        b = x.abs().mean((2, 3)) / temp
        return (h * w * torch.softmax(a, 1)).reshape(n, 1, h, w), c * torch.softmax(b, 1).reshape(n, c, 1, 1)

    as_s, ac_s = attention(s)
    as_t, ac_t = attention(t)
    focal = as_t * ac_t * (s - t) ** 2
    l_fg = (fg[:, None] * focal).sum() / n
    l_bg = (bg[:, None] * focal).sum() / n
    l_att = ((ac_s - ac_t).abs().sum() + (as_s - as_t).abs().sum()) / n
    l_glb = ((s + gs(s) - t - gt(t)) ** 2).sum() / n
    return alpha * l_fg + beta * l_bg + gamma * l_att + lam * l_glb


def test_fgd_edge_touching_boxes_match_authors_weight():
    # The authors' weight counts the cells past the grid: the box (60, 30, 88, 56) spans rows
    # 3..7 and columns 7..11 (5 x 5 cells, of which 4 x 4 exist), so its weight is 1/25, not 1/16.
    canvas, hw = (56, 88), (7, 11)
    fg, bg = fgd_masks(EDGE_TOUCHING_BOXES, canvas, 8, hw)
    rfg, rbg = ref.ref_fgd_masks(EDGE_TOUCHING_BOXES, canvas, 8, hw)
    assert fg[0, 6, 10].item() == pytest.approx(1 / 25)
    torch.testing.assert_close(fg.double(), rfg, rtol=1e-6, atol=0)
    torch.testing.assert_close(bg.double(), rbg, rtol=1e-6, atol=0)
    s, t = pair((2, 4, 7, 11), seed=21, dtype=torch.float64)
    gs, gt = randomize_(GcBlock(4), 22).double(), randomize_(GcBlock(4), 23).double()
    weights = dict(temp=0.5, alpha=1.0, beta=0.7, gamma=0.3, lam=0.2)
    s.requires_grad_(True)
    got = fgd_loss(s, t, fg.double(), bg.double(), gs, gt, **weights)
    close(got, ref.ref_fgd(s, t, rfg, rbg, gs, gt, **weights), rtol=1e-6, atol=0)
    got.backward()
    leaf = s.detach().clone().requires_grad_(True)
    _fgd_autograd64(leaf, t, rfg, rbg, gs, gt, **weights).backward()
    torch.testing.assert_close(s.grad, leaf.grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("case", list(EDGE_BOXES) + ["edge_touching", "random", "inf"])
def test_fgd_masks_levels_match_reference_per_level(case):
    # All levels at once must give each level's one-level masks: levels of different sizes and
    # strides, so a cell tested against another level's box range or a background count taken
    # over the wrong cells shows up.
    canvas = (56, 88)
    boxes = {"edge_touching": EDGE_TOUCHING_BOXES, "random": random_boxes(3, canvas, k=5, seed=31),
             "inf": [torch.tensor([[float("-inf"), 0.0, 20.0, 20.0], [8.0, 8.0, 40.0, 30.0]]),
                     torch.tensor([[0.0, 0.0, float("inf"), 9.0]])]}.get(case) or EDGE_BOXES.get(case)
    strides, hws = [8, 16, 32, 64], [(7, 11), (4, 6), (2, 3), (1, 2)]
    got = fgd_masks_levels(boxes, canvas, strides, hws)
    assert len(got) == len(hws)
    for (fg, bg), stride, hw in zip(got, strides, hws):
        rfg, rbg = ref.ref_fgd_masks(boxes, canvas, stride, hw)
        assert fg.dtype == bg.dtype == torch.float32
        torch.testing.assert_close(fg.double(), rfg, rtol=1e-6, atol=0)
        torch.testing.assert_close(bg.double(), rbg, rtol=1e-6, atol=0)


def test_fgd_masks_levels_error_on_stride_count():
    with pytest.raises(LossError, match=r"one stride per level \(2 levels\), but got \[8\]"):
        fgd_masks_levels([torch.zeros(0, 4)], (32, 32), [8], [(4, 4), (2, 2)])


# ------------------------------------------------------------------------------- errors


def test_error_mismatched_level_count():
    s, t = pyramid()
    with pytest.raises(LossError, match=r"same number of levels .* but got 3 and 2"):
        MSELoss()(s, t[:2])
    with pytest.raises(LossError, match="at least 1"):
        CWDLoss()([], [])


def test_error_mismatched_shape_names_level_and_shapes():
    s = [torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 13, 21)]
    t = [torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 14, 21)]
    msg = r"expected student and teacher level 1 to have the same shape, but got \(2, 8, 13, 21\) and \(2, 8, 14, 21\)"
    for name in LOSSES:
        with pytest.raises(LossError, match=msg):
            build_loss(name)(s, t, DistillContext.from_features(t, (64, 64)))
    with pytest.raises(LossError, match="4-D"):
        mse_loss(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(LossError, match="list of N x C x H x W tensors"):
        MSELoss()({"p3": s[0]}, {"p3": t[0]})


def test_error_unknown_loss_name_lists_valid_names():
    with pytest.raises(LossError, match=r"'mse', 'l1', 'cwd', 'fgd' \(did you mean 'cwd'\?\)"):
        build_loss("cdw")
    with pytest.raises(LossError, match="'mse', 'l1', 'cwd', 'fgd'"):
        build_loss(42)


def test_error_fgd_without_ctx():
    s, t = pyramid()
    with pytest.raises(LossError, match=r"DistillContext.*from_features.*ctx=None"):
        FGDLoss()(s, t)
    ctx = DistillContext.from_features(t, (64, 96))
    with pytest.raises(LossError, match=r"one stride per level \(3 levels\)"):
        FGDLoss()(s, t, DistillContext(boxes=ctx.boxes, canvas_size=(64, 96), strides=[8]))
    with pytest.raises(LossError, match=r"one \(K, 4\) tensor per image \(2 images\)"):
        FGDLoss()(s, t, DistillContext(boxes=ctx.boxes[:1], canvas_size=(64, 96), strides=ctx.strides))


def test_error_bad_reduction_backend_and_parameters():
    with pytest.raises(LossError, match=r"reduction to be one of 'sum', 'mean', but got 'none'"):
        MSELoss("none")
    with pytest.raises(LossError, match=r"reduction to be one of 'none', 'mean', 'sum', but got 'avg'"):
        l1_loss(*pair((1, 1, 2, 2)), reduction="avg")
    with pytest.raises(LossError, match=r"backend to be one of 'auto', 'torch', 'compile', 'triton', but got 'cuda'"):
        CWDLoss(backend="cuda")
    with pytest.raises(LossError, match="tau to be a positive"):
        cwd_loss(*pair((1, 1, 2, 2)), tau=0.0)
    with pytest.raises(LossError, match=r"unknown FGD preset 'yolo'; expected one of 'retinanet', 'fcos', 'rcnn'"):
        FGDLoss("yolo")
    with pytest.raises(LossError, match=r"unknown FGD hyper-parameter\(s\) \['lambda'\]"):
        FGDLoss(lam=1.0, **{"lambda": 2.0})


def test_error_triton_backend_on_cpu_tensors():
    with pytest.raises(LossError, match="backend='triton' runs on CUDA tensors"):
        MSELoss(backend="triton")(*pyramid())


# ----------------------------------------------------------------------- FGD lazy build


def test_fgd_materialize_lazy_build_and_state_dict():
    s, t = pyramid(c=6)
    ctx = DistillContext.from_features(t, (64, 96), boxes=random_boxes(2, (64, 96)))
    lazy = FGDLoss()
    assert len(list(lazy.parameters())) == 0
    lazy(s, t, ctx)
    assert lazy.channels == (6, 6, 6) and len(list(lazy.parameters())) == 2 * 3 * 8
    lazy.materialize([6, 6, 6])  # same channels: no-op
    with pytest.raises(LossError, match=r"built for channels \[6, 6, 6\], but got \[6, 6\]"):
        lazy.materialize([6, 6])
    with pytest.raises(LossError, match=r"built for channels \[6, 6, 6\], but the features have channels \[4"):
        lazy(*pyramid(c=4), ctx)
    randomize_(lazy, 3)
    fresh = FGDLoss()
    fresh.load_state_dict(lazy.state_dict())
    assert fresh.channels == (6, 6, 6)
    torch.testing.assert_close(fresh(s, t, ctx), lazy(s, t, ctx))


# ------------------------------------------------------------------------- build_loss etc.


def test_build_loss_names_objects_and_alphas():
    assert isinstance(build_loss("MSE"), MSELoss)
    assert build_loss("fgd", preset="fcos").alpha == FGD_PRESETS["fcos"]["alpha"]
    module, fn = L1Loss("mean"), (lambda s, t, ctx: s[0].sum())
    assert build_loss(module) is module and build_loss(fn) is fn
    with pytest.raises(LossError, match="only apply to a loss given by name"):
        build_loss(module, reduction="sum")
    assert set(RECOMMENDED_ALPHA) == set(LOSSES) and RECOMMENDED_ALPHA["mse"] == 0.005


@pytest.mark.parametrize("name", ["mse", "l1", "cwd", "fgd"])
def test_one_name_per_loss_and_no_function_shadows_its_module(name):
    # lrdet_core.losses.<name> is the module; it defines <name>_loss and the class registered as <name>,
    # and no function of the module's own name (an alias would shadow the module again when re-exported).
    import types

    import lrdet_core.losses as losses

    module = getattr(losses, name)
    assert isinstance(module, types.ModuleType) and module.__name__ == f"lrdet_core.losses.{name}"
    assert getattr(losses, f"{name}_loss") is getattr(module, f"{name}_loss")
    assert LOSSES[name].__module__ == module.__name__
    assert not hasattr(module, name)


def test_import_pulls_in_neither_triton_nor_torchvision():
    code = ("import sys, lrdet_core.losses as L; L.build_loss('fgd'); "
            "print(sorted(m for m in ('triton', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------ compile backend


@pytest.mark.slow
def test_compile_backend_matches_eager():
    s, t = pyramid(c=3, sizes=((5, 7),), seed=19)
    ctx = DistillContext.from_features(t, (40, 56), boxes=random_boxes(2, (40, 56), seed=19))
    for name, kwargs in (("mse", {}), ("l1", {"reduction": "mean"}), ("cwd", {"tau": 2.0}), ("fgd", {})):
        eager, comp = build_loss(name, backend="torch", **kwargs), build_loss(name, backend="compile", **kwargs)
        if name == "fgd":
            eager.materialize([3])
            comp.load_state_dict(eager.state_dict())
        x = [a.clone().requires_grad_(True) for a in s]
        y = [a.clone().requires_grad_(True) for a in s]
        want, got = eager(x, t, ctx), comp(y, t, ctx)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        want.backward()
        got.backward()
        torch.testing.assert_close(y[0].grad, x[0].grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Triton dispatch (no GPU)


@pytest.fixture
def fake_kernels(monkeypatch):
    """Kernel modules that record their calls; 'CUDA' tensors are any tensors."""
    import types

    import lrdet_core.losses._common as common

    calls = []

    def record(name, result):
        def kernel(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result(*args) if callable(result) else result
        return kernel

    fgd_out = lambda *a: (torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0))  # noqa: E731
    for name, fn, out in (("mse", "mse_loss_triton", torch.tensor(5.0)), ("l1", "l1_loss_triton", torch.tensor(6.0)),
                          ("cwd", "cwd_loss_triton", torch.tensor(7.0)), ("fgd", "fgd_focal_attention_triton", fgd_out)):
        module = types.ModuleType(f"lrdet_core.kernels.{name}")
        setattr(module, fn, record(name, out))
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(common, "_is_cuda", lambda x: True)
    return calls


def test_triton_backend_calls_kernels_with_all_levels(fake_kernels):
    s, t = pyramid()
    s[1] = s[1].bfloat16()
    assert MSELoss(backend="triton")(s, t).item() == 5.0
    assert L1Loss("mean", backend="triton")(s, t).item() == 6.0
    assert CWDLoss(tau=2.0, weight=3.0, backend="triton")(s, t).item() == 21.0
    (name, (ss, ts, reduction), _), (_, (_, _, reduction_l1), _) = fake_kernels[:2]
    assert name == "mse" and len(ss) == 3 and reduction == "sum" and reduction_l1 == "mean"
    assert ss[1] is s[1] and ss[1].dtype == torch.bfloat16 and ts[1].dtype == torch.float32  # a bf16/fp32 pair: no copy
    assert fake_kernels[2][1][2] == 2.0
    ctx = DistillContext.from_features(t, (64, 96), boxes=random_boxes(2, (64, 96)))
    loss = FGDLoss(channels=[4, 4, 4], backend="triton", lam=0.0)
    assert loss(s, t, ctx).item() == 6.0  # one kernel call for all three levels
    name, (ss, ts, fgs, bgs, temp), kwargs = fake_kernels[-1]
    assert name == "fgd" and kwargs["weights"] == (1e-3, 5e-4, 5e-4) and temp == 0.5
    assert len(ss) == len(ts) == len(fgs) == len(bgs) == 3 and ss[1] is s[1]
    assert fgs[2].shape == bgs[2].shape == (2, 2, 3)  # the masks of the last level


def test_triton_backend_without_kernel_module_is_a_loss_error(fake_kernels, monkeypatch):
    monkeypatch.setitem(sys.modules, "lrdet_core.kernels.cwd", None)  # import raises ImportError
    with pytest.raises(LossError, match=r"needs the Triton kernels.*lrdet_core.kernels.cwd.*backend='torch'"):
        cwd_loss(*pair((1, 2, 3, 5)), backend="triton")

"""``bridge_crop``: off is bit-identical to no crop; the window's resampling is the full canvas's slice; the bridge's
interior features equal the full bridge's (exactly, for a neck whose receptive field fits in the margin); the
teacher's error falls as the margin grows; targets are cut by the centre rule; placement is seeded and covers
every cell equally often; a summed loss is scaled by 1/p."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from _ddp_worker import TINY_SPLIT, tiny_batch
from lrdet_core import BridgeDistiller, InputError, resample_to_hr
from lrdet_core.crop import PER_BOX_KEYS, crop_target, place, place_axis
from tiny import RecordingLoss, TinyDetector, batch, retinanet, seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # first-step balance and late projector creation
        return fn(*args, **kw)


# --- geometry ---------------------------------------------------------------------------------------------------
def test_resampling_a_window_is_the_slice_of_resampling_the_canvas():
    # Mixed image sizes and a non-integer LR -> HR ratio: every window cell is read where the full canvas's is.
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 13, 17, generator=g, dtype=torch.float64)
    lr_canvas, hr_canvas = (104, 136), (256, 320)
    lr_sizes, hr_sizes = [(104, 120), (90, 136)], [(240, 288), (208, 320)]
    full = resample_to_hr(feat, lr_canvas, hr_canvas, (32, 40), lr_sizes, hr_sizes)
    for (y0, x0, h, w) in ((0, 0, 16, 16), (64, 96, 128, 96), (128, 160, 128, 160)):
        win = resample_to_hr(feat, lr_canvas, (h, w), (h // 8, w // 8), lr_sizes, hr_sizes, origin=(y0, x0))
        assert torch.equal(win, full[..., y0 // 8:(y0 + h) // 8, x0 // 8:(x0 + w) // 8])


def _enumerated(monkeypatch, length, unit, side, margin_px):
    """Every placement of one axis: ``torch.randint`` made to return each value in turn."""
    axes, k = [], [0]

    def draw(n, size):
        axes.append(n)
        return torch.tensor(k[0])
    monkeypatch.setattr(torch, "randint", draw)
    first = place_axis(length, unit, side, margin_px)
    out = [first]
    for k[0] in range(1, axes[0]):
        out.append(place_axis(length, unit, side, margin_px))
    return out


@pytest.mark.parametrize("length,unit,side,margin", [(256, 32, 0.5, 32), (800, 128, 0.5, 128), (100, 16, 0.6, 0),
                                                     (250, 32, 0.4, 64)])
def test_every_pixel_is_in_the_interior_equally_often(monkeypatch, length, unit, side, margin):
    axes = _enumerated(monkeypatch, length, unit, side, margin)
    cover = torch.zeros(length)
    for a in axes:
        cover[a.inner_start:a.inner_stop] += 1
        assert 0 <= a.start <= a.inner_start < a.inner_stop <= a.stop <= length
        for edge, inner in ((a.start, a.inner_start), (a.stop, a.inner_stop)):
            assert edge % unit == 0 or edge == length  # on the grid of the coarsest level, or the canvas edge
        # the margin on both sides, clipped to the canvas (none where the interior reaches the canvas's edge)
        assert a.start == max(a.inner_start - margin, 0) and a.stop == min(a.inner_stop + margin, length)
    assert bool((cover == cover[0]).all()), cover  # uniform: the edges as often as the centre
    assert all(a.inv_p == pytest.approx(len(axes) / cover[0].item()) for a in axes)  # 1/p


def test_placement_is_reproducible_from_the_seed():
    def windows(seed):
        torch.manual_seed(seed)
        return [place((512, 384), [(512, 384)], 32, 0.25, 1).window for _ in range(6)]
    assert windows(0) == windows(0) and windows(1) == windows(1)
    assert windows(0) != windows(1)


# --- targets ----------------------------------------------------------------------------------------------------
def _reference_crop(target, window):
    """One box at a time: kept when its centre is inside ``window`` (y0, x0, y1, x1), clipped, shifted."""
    y0, x0, y1, x1 = window
    out = {"boxes": [], "labels": [], "masks": [], "keypoints": []}
    for i, (a, b, c, d) in enumerate(target["boxes"].tolist()):
        cx, cy = (a + c) / 2, (b + d) / 2
        if not (x0 <= cx < x1 and y0 <= cy < y1):
            continue
        out["boxes"].append([min(max(a - x0, 0), x1 - x0), min(max(b - y0, 0), y1 - y0),
                             min(max(c - x0, 0), x1 - x0), min(max(d - y0, 0), y1 - y0)])
        out["labels"].append(int(target["labels"][i]))
        out["masks"].append(target["masks"][i, y0:y1, x0:x1])
        kps = []
        for x, y, v in target["keypoints"][i].tolist():
            inside = 0 <= x - x0 < x1 - x0 and 0 <= y - y0 < y1 - y0
            kps.append([x - x0, y - y0, v if inside else 0.0])
        out["keypoints"].append(kps)
    return out


def test_targets_are_cut_by_the_centre_rule():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 120
    boxes = torch.cat([xy, xy + 4 + torch.rand(40, 2, generator=g) * 40], 1)
    target = {"boxes": boxes, "labels": torch.arange(40), "masks": torch.rand(40, 128, 128, generator=g) > 0.5,
              "keypoints": torch.cat([torch.rand(40, 5, 2, generator=g) * 128, torch.ones(40, 5, 1)], 2),
              "image_id": torch.tensor(7)}
    window = (32, 64, 96, 128)
    got, ref = crop_target(target, window, "hr_targets"), _reference_crop(target, window)
    assert 0 < len(ref["boxes"]) < 40  # some kept, some dropped
    assert got["boxes"].tolist() == ref["boxes"] and got["labels"].tolist() == ref["labels"]
    assert torch.equal(got["masks"], torch.stack(ref["masks"])) and got["masks"].shape[-2:] == (64, 64)
    assert got["keypoints"].tolist() == ref["keypoints"]
    assert torch.equal(got["image_id"], target["image_id"]) and torch.equal(target["boxes"], boxes)  # input kept
    assert set(PER_BOX_KEYS) == {"labels", "area", "iscrowd", "masks", "keypoints"}


def test_an_unknown_per_box_key_is_refused_rather_than_misaligned():
    target = {"boxes": torch.tensor([[0., 0., 8., 8.], [50., 50., 60., 60.]]), "weights": torch.tensor([1., 2.])}
    with pytest.raises(InputError, match="'weights'.*one entry per box"):
        crop_target(target, (0, 0, 32, 32), "hr_targets")


# --- the distiller ----------------------------------------------------------------------------------------------
def _conv_neck(seed, channels=16):
    """TinyDetector with a 3x3 neck without normalisation: its receptive field is one cell of each level."""
    torch.manual_seed(seed)
    m = TinyDetector(neck_channels=channels)
    m.neck.lat = nn.ModuleList(nn.Conv2d(c, channels, 3, padding=1) for c in (8, 16, 32))
    return m


class _Calls(nn.Module):
    """Records the images and targets of every training call of a model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, images, targets=None):
        self.calls.append((images.detach().clone(), copy.deepcopy(targets)))
        return self.model(images, targets)


def _interior(t, region, canvas_stride):
    y0, x0, y1, x1 = region
    s = canvas_stride
    return t[..., y0 // s:-(-y1 // s), x0 // s:-(-x1 // s)]


def test_off_is_bit_identical_and_draws_nothing(monkeypatch):
    # f = 1 never reaches the crop: no window is placed, no random number drawn, and the step is bit for bit
    # the default's (whose values the bridge tests check against references: tests/test_bridge.py).
    import lrdet_core.crop

    def no_window(*args, **kw):
        raise AssertionError("a window was placed with bridge_crop=1.0")
    monkeypatch.setattr(lrdet_core.crop, "place", no_window)
    images, targets = batch()
    runs = []
    for kw in ({}, {"bridge_crop": 1.0, "crop_margin": 3}):
        d = BridgeDistiller(seeded(retinanet, 0, size=64), seeded(retinanet, 1, size=128), alpha=1e-4, **kw).train()
        out = d(images, targets)
        sum(out.values()).backward()
        runs.append((out, {n: p.grad for n, p in d.named_parameters()}))
    (o0, g0), (o1, g1) = runs
    assert list(o0) == list(o1) and all(torch.equal(o0[k], o1[k]) for k in o0)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    assert not d.crop.windows
    # a custom model draws nothing in its own step: neither does the distiller
    images, targets, _, _ = tiny_batch(0, n=2)
    d = BridgeDistiller(seeded(TinyDetector, 0), seeded(TinyDetector, 1), split_points=TINY_SPLIT, hr_scale=2.0,
                        alpha=0.01, bridge_crop=1.0)
    state = torch.random.get_rng_state()
    d.train()(images, targets)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("margin,exact", [(0, False), (1, True)])
def test_custom_bridge_interior_equals_the_full_bridge_when_the_margin_covers_the_neck(margin, exact):
    images, targets, hr, hr_targets = tiny_batch(0, n=2, size=64)
    student, teacher = _Calls(_conv_neck(0)), _conv_neck(1)
    split = type(TINY_SPLIT)(backbone="model.backbone", neck="model.neck")
    t_split = TINY_SPLIT
    full, cropped = RecordingLoss(), RecordingLoss()
    _quiet(BridgeDistiller(student, teacher, split_points=split, teacher_split_points=t_split, loss=full,
                           alpha=1.0).train(), images, targets, hr_images=hr, hr_targets=hr_targets)
    d = BridgeDistiller(student, teacher, split_points=split, teacher_split_points=t_split, loss=cropped, alpha=1.0,
                        bridge_crop=0.25, crop_margin=margin).train()
    torch.manual_seed(3)
    student.calls.clear()
    _quiet(d, images, targets, hr_images=hr, hr_targets=hr_targets)
    w = d.crop.windows["teacher"]
    y0, x0, y1, x1 = w.window
    assert w.size != (128, 128) and (w.interior != w.window) == (margin > 0)
    # the bridge ran the model on the window of the HR images, against the HR targets cut to it
    (lr_images, _), (bridge_images, bridge_targets) = student.calls
    assert torch.equal(bridge_images, hr[..., y0:y1, x0:x1])
    assert [t["boxes"].tolist() for t in bridge_targets] == [
        crop_target(t, w.window, "")["boxes"].tolist() for t in hr_targets]
    # the bridge's features on the interior, against the full bridge's at the same cells
    errors = []
    for s_full, s_crop in zip(full.calls[0]["student"], cropped.calls[0]["student"]):
        ref = _interior(s_full, w.interior, 128 // s_full.shape[-1])
        assert ref.shape == s_crop.shape
        errors.append(float((ref - s_crop).abs().max() / ref.abs().max()))
    assert (max(errors) < 1e-6) == exact, errors


def test_torchvision_bridge_gets_the_window_of_the_teachers_canvas_and_its_boxes():
    images, targets = batch(sizes=((300, 300), (280, 300)), n_boxes=6)
    student, teacher = seeded(retinanet, 0, size=128), seeded(retinanet, 1, size=512)
    seen = []
    loss_of = student.compute_loss
    student.compute_loss = lambda t, head, anchors: seen.append((copy.deepcopy(t), anchors)) or loss_of(t, head,
                                                                                                        anchors)
    d = BridgeDistiller(student, teacher, alpha=1e-4, bridge_crop=0.3).train()
    torch.manual_seed(2)
    _quiet(d, images, targets)
    w = d.crop.windows["teacher"]
    image_list, hr_targets = teacher.transform(images, targets)  # eval mode: the teacher's own HR canvas
    assert w.canvas == tuple(image_list.tensors.shape[-2:]) and w.window != (0, 0) + w.canvas
    assert w.sizes == [tuple(s) for s in image_list.image_sizes]
    bridge_targets, anchors = seen[1]  # seen[0]: the LR pass
    want = [crop_target(t, w.window, "")["boxes"] for t in hr_targets]
    assert 0 < sum(len(b) for b in want) < sum(len(t["boxes"]) for t in hr_targets)  # some boxes dropped
    for got, ref in zip(bridge_targets, want):
        torch.testing.assert_close(got["boxes"], ref)
    # the head ran on the window: its anchors cover the window's canvas, not the teacher's
    centres = (anchors[0][:, :2] + anchors[0][:, 2:]) / 2
    assert float(centres[:, 0].max()) < w.size[1] < w.canvas[1] and float(centres[:, 1].max()) < w.size[0]


def _retinanet_pair():
    return seeded(retinanet, 0, size=256).double(), seeded(retinanet, 1, size=512).double()


@pytest.mark.slow
def test_torchvision_bridge_interior_is_exact_and_the_teacher_error_falls_with_the_margin():
    # RetinaNet P3-P7 (unit 128 px) on a 512 px HR canvas, in float64: the bridge's interior equals the full
    # bridge's to rounding with a margin of one cell (the FPN's 3x3 convs, P6/P7's stride-2 convs); the
    # teacher's (a ResNet: a receptive field far wider than the margin) approaches the full teacher's.
    images, targets = batch(sizes=((300, 300), (300, 300)))
    images = [x.double() for x in images]
    student, teacher = _retinanet_pair()
    full = RecordingLoss()
    _quiet(BridgeDistiller(student, teacher, loss=full, alpha=1.0).train(), images, targets)
    f_s, f_t = full.calls[0]["student"], full.calls[0]["teacher"]
    bridge_err, teacher_err = {}, {}
    for margin in (0, 1, 2):
        rec = RecordingLoss()
        d = BridgeDistiller(student, teacher, loss=rec, alpha=1.0, bridge_crop=0.3, crop_margin=margin).train()
        torch.manual_seed(4)
        _quiet(d, images, targets)
        w = d.crop.windows["teacher"]
        assert w.window != (0, 0, 512, 512)
        b, t = [], []
        for a, c, ta, tc in zip(f_s, rec.calls[0]["student"], f_t, rec.calls[0]["teacher"]):
            stride = 512 // a.shape[-1]
            b.append(float((_interior(a, w.interior, stride) - c).abs().max() / a.abs().max()))
            t.append(float((_interior(ta, w.interior, stride) - tc).abs().max() / ta.abs().max()))
        bridge_err[margin], teacher_err[margin] = max(b), max(t)
    assert bridge_err[0] > 0.1 and bridge_err[1] < 1e-10 and bridge_err[2] < 1e-10, bridge_err
    assert teacher_err[0] > teacher_err[1] > teacher_err[2], teacher_err
    assert teacher_err[0] > 0.3 and teacher_err[2] < 0.05, teacher_err


class _SumLoss(RecordingLoss):
    def __init__(self, reduction):
        super().__init__()
        self.reduction = reduction


@pytest.mark.parametrize("reduction,scaled", [("sum", True), ("mean", False)])
def test_a_summed_loss_is_scaled_by_one_over_p(reduction, scaled):
    images, targets, _, _ = tiny_batch(0, n=2, size=64)
    loss = _SumLoss(reduction)
    d = BridgeDistiller(seeded(TinyDetector, 0), seeded(TinyDetector, 1), split_points=TINY_SPLIT, hr_scale=2.0,
                        loss=loss, alpha=1.0, bridge_crop=0.25).train()
    out = _quiet(d, images, targets)
    w = d.crop.windows["teacher"]
    assert w.scale > 1
    # the loss saw the interior's canvas and boxes
    ctx = loss.calls[0]["ctx"]
    assert ctx.canvas_size == (w.interior[2] - w.interior[0], w.interior[3] - w.interior[1])
    factor = w.scale if scaled else 1.0
    torch.testing.assert_close(out["distill/rec"].detach(), factor * loss.calls[0]["value"], rtol=1e-6, atol=0)


def test_the_scaled_interior_sum_is_an_unbiased_estimate_of_the_canvas_sum(monkeypatch):
    # Over every placement (equally likely), the mean of 1/p times a sum over the interior is the sum over the
    # canvas: a Horvitz-Thompson estimate, which is why alpha keeps its meaning for a summed loss.
    canvas, unit, fraction, margin = (96, 80), 16, 0.3, 1
    counts = [len(_enumerated(monkeypatch, n, unit, math.sqrt(fraction), margin * unit)) for n in canvas]
    draws = []
    monkeypatch.setattr(torch, "randint", lambda n, size: torch.tensor(draws.pop(0)))
    err = torch.rand(2, 3, *canvas, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    estimates = []
    for i in range(counts[0]):
        for j in range(counts[1]):
            draws[:] = [i, j]
            w = place(canvas, [canvas], unit, fraction, margin)
            y0, x0, y1, x1 = w.interior
            estimates.append(w.scale * err[..., y0:y1, x0:x1].sum())
    assert min(counts) > 2 and len({float(e) for e in estimates}) > 2
    torch.testing.assert_close(sum(estimates) / len(estimates), err.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kw,match", [
    ({"bridge_crop": 0.0}, "bridge_crop to be an area fraction"), ({"bridge_crop": 1.5}, "bridge_crop to be"),
    ({"bridge_crop": "0.5"}, "bridge_crop to be"), ({"crop_margin": -1}, "crop_margin to be an int"),
    ({"crop_margin": 1.0}, "crop_margin to be an int"), ({"bridge_crop": 0.5, "bridge": False}, "bridge=False")])
def test_bad_crop_options_are_rejected(kw, match):
    with pytest.raises(InputError, match=match):
        BridgeDistiller(TinyDetector(), TinyDetector(), split_points=TINY_SPLIT, hr_scale=2.0, **kw)


def test_a_model_that_resizes_its_input_is_refused():
    class Resizing(TinyDetector):
        def forward(self, images, targets=None):
            return super().forward(nn.functional.interpolate(images, size=(128, 128)), targets)
    images, targets, hr, hr_targets = tiny_batch(0, n=2, size=64)
    d = BridgeDistiller(seeded(Resizing, 0), seeded(Resizing, 1), split_points=TINY_SPLIT, bridge_crop=0.25).train()
    with pytest.raises(InputError, match="backbone received"):
        _quiet(d, images, targets, hr_images=hr, hr_targets=hr_targets)

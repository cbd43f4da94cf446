"""The bridge branch, value by value: what each pass is supervised with, what is distilled, BN, alignment, inherit.

Every test here records what actually reaches the student's loss, the distillation loss or the
student's modules in one training call, and compares it with a value computed independently (the
detector's own transform, a plain forward, the per-image geometry). Wherever the two views matter,
student and teacher run at different sizes on batches of mixed aspect ratios, so that LR and HR values
cannot be mistaken for each other and one image's values cannot stand in for another's; only the
BatchNorm test runs both at one size, where the bridge must reproduce a plain forward.
"""
import copy
import functools
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrdet_core import BridgeDistiller, SplitPoints, inherit_weights, resample_to_hr
from tiny import RecordingLoss, TinyDetector, batch, retinanet, seeded

torch.set_num_threads(2)
TINY_SPLIT = SplitPoints(backbone="backbone", neck="neck")
# Raw images of different aspect ratios and per-image scales: 100x150 -> LR 42x64 / HR 106x160,
# 120x120 -> LR 64x64 / HR 160x160 (student size 64, teacher size 160; the paper's HR view of the LR
# images gives 105x160 for the first).
MIXED = ((100, 150), (120, 120))



def _record_loss_targets(model):
    """Wrap a torchvision detector's ``compute_loss``: one list of boxes per call, in the order of the passes."""
    seen = []
    real = model.compute_loss

    def compute_loss(targets, *args, **kwargs):
        seen.append([t["boxes"].detach().clone() for t in targets])
        return real(targets, *args, **kwargs)

    model.compute_loss = compute_loss  # an instance attribute: RetinaNet.forward calls self.compute_loss
    return seen



# --- 1. HR targets in the bridge (torchvision) --------------------------------------------------------------
@functools.lru_cache(maxsize=None)  # one training call serves the two tests below
def _torchvision_run(hr_source):
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=160)
    images, targets = batch(sizes=MIXED, n_boxes=2)
    seen = _record_loss_targets(student)
    rec = RecordingLoss()
    d = BridgeDistiller(student, teacher, loss=rec, alpha=1.0, hr_source=hr_source).train()
    d(images, copy.deepcopy(targets))
    # The references: each detector's own transform, called directly on what it should receive.
    lr_list, lr_targets = student.transform(images, copy.deepcopy(targets))
    if hr_source == "teacher":
        hr_in = images, copy.deepcopy(targets)
    else:  # the paper's HR view: the LR images upsampled by the teacher's transform, with the LR boxes
        hr_in = ([F.interpolate(img[None], size=s, mode="bilinear", align_corners=False)[0]
                  for img, s in zip(images, lr_list.image_sizes)], copy.deepcopy(lr_targets))
    hr_list, hr_targets = teacher.transform(*hr_in)
    # The two views differ image by image (else the test below could not tell them apart).
    assert [tuple(s) for s in lr_list.image_sizes] == [(42, 64), (64, 64)]
    assert [tuple(s) for s in hr_list.image_sizes] == [(106 if hr_source == "teacher" else 105, 160), (160, 160)]
    assert not any(torch.allclose(a["boxes"], b["boxes"]) for a, b in zip(lr_targets, hr_targets))
    return seen, rec.calls, lr_targets, hr_list, hr_targets


@pytest.mark.parametrize("hr_source", ["teacher", "lr"])
def test_lr_pass_gets_the_students_boxes_and_bridge_pass_the_teachers(hr_source):
    seen, _, lr_targets, _, hr_targets = _torchvision_run(hr_source)
    assert len(seen) == 2  # the LR pass, then the bridge pass
    assert len(seen[0]) == len(seen[1]) == len(MIXED)
    for i in range(len(MIXED)):
        assert torch.equal(seen[0][i], lr_targets[i]["boxes"]), f"LR pass, image {i}"
        assert torch.equal(seen[1][i], hr_targets[i]["boxes"]), f"bridge pass, image {i}"


@pytest.mark.parametrize("hr_source", ["teacher", "lr"])
def test_distill_context_holds_the_hr_boxes_sizes_and_canvas(hr_source):
    _, calls, _, hr_list, hr_targets = _torchvision_run(hr_source)
    (call,) = calls
    ctx = call["ctx"]
    assert ctx.canvas_size == tuple(hr_list.tensors.shape[-2:]) == (160, 160)
    assert [tuple(s) for s in ctx.image_sizes] == [tuple(s) for s in hr_list.image_sizes]
    assert len(ctx.boxes) == len(MIXED)
    for i, b in enumerate(ctx.boxes):
        assert torch.equal(b, hr_targets[i]["boxes"]), f"image {i}"
    assert ctx.strides == [8, 16, 32, 64, 128]


# --- 1. HR targets in the bridge (custom model) -------------------------------------------------------------
class _SeenTiny(TinyDetector):
    """Records the image shape and the boxes of every training forward it receives."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def forward(self, images, targets=None):
        if self.training and targets is not None:
            self.seen.append((tuple(images.shape), [t["boxes"].clone() for t in targets]))
        return super().forward(images, targets)


def _tiny_targets():
    return [{"boxes": torch.tensor([[4.0, 2.0, 20.0, 14.0]])}, {"boxes": torch.tensor([[10.0, 6.0, 30.0, 26.0],
                                                                                       [1.0, 1.0, 9.0, 5.0]])}]


def test_custom_hr_scale_gives_scaled_boxes_in_the_bridge_and_the_context():
    torch.manual_seed(0)
    student, rec = _SeenTiny(), RecordingLoss()
    d = BridgeDistiller(student, TinyDetector(), split_points=TINY_SPLIT, hr_scale=1.5, loss=rec, alpha=1.0).train()
    images, targets = torch.rand(2, 3, 32, 48), _tiny_targets()
    d(images, targets)
    (lr_shape, lr_boxes), (hr_shape, hr_boxes) = student.seen
    assert lr_shape == (2, 3, 32, 48) and hr_shape == (2, 3, 48, 72)
    for i, t in enumerate(targets):
        assert torch.equal(lr_boxes[i], t["boxes"])
        torch.testing.assert_close(hr_boxes[i], t["boxes"] * 1.5, rtol=0, atol=0)
    ctx = rec.calls[0]["ctx"]
    assert ctx.canvas_size == (48, 72) and [tuple(s) for s in ctx.image_sizes] == [(48, 72)] * 2
    for i, t in enumerate(targets):
        torch.testing.assert_close(ctx.boxes[i], t["boxes"] * 1.5, rtol=0, atol=0)


def test_custom_explicit_hr_targets_are_used_as_given():
    torch.manual_seed(0)
    student, rec = _SeenTiny(), RecordingLoss()
    # hr_scale is set too: an explicit HR view takes precedence over it.
    d = BridgeDistiller(student, TinyDetector(), split_points=TINY_SPLIT, hr_scale=1.5, loss=rec, alpha=1.0).train()
    images, targets = torch.rand(2, 3, 32, 48), _tiny_targets()
    hr_images = torch.rand(2, 3, 64, 96)
    # Not a scaled copy of the LR boxes: only "used as given" produces these.
    hr_targets = [{"boxes": torch.tensor([[3.0, 5.0, 41.0, 33.0]])},
                  {"boxes": torch.tensor([[7.0, 2.0, 60.0, 50.0], [50.0, 40.0, 90.0, 62.0]])}]
    d(images, targets, hr_images=hr_images, hr_targets=copy.deepcopy(hr_targets))
    (_, lr_boxes), (hr_shape, hr_boxes) = student.seen
    assert hr_shape == (2, 3, 64, 96)
    ctx = rec.calls[0]["ctx"]
    assert ctx.canvas_size == (64, 96)
    for i in range(2):
        assert torch.equal(lr_boxes[i], targets[i]["boxes"])
        assert torch.equal(hr_boxes[i], hr_targets[i]["boxes"])
        assert torch.equal(ctx.boxes[i], hr_targets[i]["boxes"])


# --- 2. where the distilled student features come from -------------------------------------------------------
def test_distilled_features_are_the_bridge_neck_at_the_teachers_sizes_times_alpha():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=160)
    images, targets = batch(sizes=MIXED)
    rec = RecordingLoss()
    d = BridgeDistiller(student, teacher, loss=rec, alpha=0.37).train()
    body_out, fpn_in, fpn_out, t_body, t_neck = [], [], [], [], []

    def on_fpn(m, inputs, output):
        fpn_in.append({k: v.detach() for k, v in inputs[0].items()})
        fpn_out.append([v.detach() for v in output.values()])

    student.backbone.body.register_forward_hook(lambda m, i, o: body_out.append({k: v.detach() for k, v in o.items()}))
    student.backbone.fpn.register_forward_hook(on_fpn)
    teacher.backbone.body.register_forward_hook(lambda m, i, o: t_body.append({k: v.shape[-2:] for k, v in o.items()}))
    teacher.backbone.fpn.register_forward_hook(lambda m, i, o: t_neck.append([v.detach() for v in o.values()]))
    out = d(images, targets)
    (call,) = rec.calls
    assert len(fpn_out) == 2 and len(body_out) == 1  # the LR pass, then the bridge (its body is replayed)

    # alpha multiplies exactly what the loss returned.
    assert torch.equal(out["distill/rec"].detach(), 0.37 * call["value"])
    # The teacher's side is the teacher's neck; the student's side is the bridge's neck output, level by level.
    assert len(call["student"]) == len(t_neck[0]) == 5
    for s, t, bridge, teach in zip(call["student"], call["teacher"], fpn_out[1], t_neck[0]):
        assert s.shape == teach.shape and torch.equal(t, teach)
        assert torch.equal(s, bridge)
    # The bridge's neck read the LR backbone outputs resampled per image to the teacher's backbone sizes.
    lr_list, _ = student.transform(images, copy.deepcopy(targets))
    hr_list, _ = teacher.transform(images, copy.deepcopy(targets))
    for k, lr_feat in body_out[0].items():
        want = resample_to_hr(lr_feat, tuple(lr_list.tensors.shape[-2:]), tuple(hr_list.tensors.shape[-2:]),
                              tuple(t_body[0][k]), lr_list.image_sizes, hr_list.image_sizes)
        torch.testing.assert_close(fpn_in[1][k], want, rtol=0, atol=0, msg=k)
    # Not the upsampled LR neck (Fitnet/Up): the test can tell the two apart.
    up = resample_to_hr(fpn_out[0][0], tuple(lr_list.tensors.shape[-2:]), tuple(hr_list.tensors.shape[-2:]),
                        tuple(call["student"][0].shape[-2:]), lr_list.image_sizes, hr_list.image_sizes)
    assert not torch.allclose(up, call["student"][0], rtol=1e-2, atol=1e-3)


# --- 3. BatchNorm in the bridge pass --------------------------------------------------------------------------
def test_bridge_batchnorm_normalises_with_batch_statistics_and_keeps_the_running_ones():
    # Equal LR and HR views: the bridge's neck and head (BatchNorm in both) see exactly what they see in
    # the LR pass, so with batch statistics its loss is a plain train-mode forward's. Eval-mode BN would
    # use the running statistics instead; updating them would leave them unlike one plain step's.
    torch.manual_seed(0)
    student = TinyDetector()
    plain = copy.deepcopy(student).train()
    images = torch.randn(2, 3, 32, 48) * 2 + 1  # far from BN's initial running mean 0 / var 1
    targets = _tiny_targets()
    out = BridgeDistiller(student, TinyDetector(), split_points=TINY_SPLIT).train()(
        images, targets, hr_images=images.clone(), hr_targets=copy.deepcopy(targets))
    ref = plain(images, targets)
    torch.testing.assert_close(out["lr/heat"], ref["heat"], rtol=0, atol=0)
    torch.testing.assert_close(out["bridge/heat"], ref["heat"], rtol=1e-6, atol=1e-7)
    stats = [(k, v) for k, v in student.state_dict().items() if "running" in k or "num_batches" in k]
    assert any(k.startswith("neck.") for k, _ in stats) and any(k.startswith("head.") for k, _ in stats)
    for k, v in stats:
        assert torch.equal(v, plain.state_dict()[k]), k
    assert int(student.head[1].num_batches_tracked) == 3  # one LR pass: the head runs once on each of 3 levels
    assert all(m.training and m.track_running_stats for m in student.modules() if isinstance(m, nn.BatchNorm2d))


# --- 4. alignment: a fixed example where each image's scale differs from the canvas's ----------------------
# LR content 64x96 and 96x64 on a 96x96 canvas; HR content 128x160 and 160x128 on a 160x160 canvas. The
# canvas grows by 160/96 = 1.667 on both axes, image 0 by 2 in height and image 1 by 2 in width: a
# whole-canvas interpolation reads image 0 rows (and image 1 columns) from 0.6 instead of 0.5 times the HR
# position, up to 12 LR pixels off.
LR_CANVAS, HR_CANVAS = (96, 96), (160, 160)
LR_SIZES, HR_SIZES = [(64, 96), (96, 64)], [(128, 160), (160, 128)]


def _ramp(n, canvas, stride):
    """Two channels: the canvas pixel row (y) and column (x) of each cell centre, for ``n`` images."""
    h, w = math.ceil(canvas[0] / stride), math.ceil(canvas[1] / stride)
    y = (torch.arange(h, dtype=torch.float64) + 0.5) * canvas[0] / h
    x = (torch.arange(w, dtype=torch.float64) + 0.5) * canvas[1] / w
    return torch.stack([y[:, None].expand(h, w), x[None, :].expand(h, w)])[None].expand(n, 2, h, w).contiguous()


def _check_ramp_lands(out, stride, lr_canvas=LR_CANVAS, hr_canvas=HR_CANVAS, lr_sizes=LR_SIZES, hr_sizes=HR_SIZES):
    """Each HR cell inside its image's content holds the LR position its own image maps it to:
    ``y_hr * h_lr / h_hr`` (likewise x). A ramp is linear, so bilinear sampling reproduces it exactly
    wherever no border is clamped; those cells (within half an LR cell of the canvas edge) are skipped."""
    _, _, oh, ow = out.shape
    checked = 0
    for n, ((hl, wl), (hh, wh)) in enumerate(zip(lr_sizes, hr_sizes)):
        for axis, (size_hr, size_lr, cells, canvas_hr, canvas_lr) in enumerate(
                [(hh, hl, oh, hr_canvas[0], lr_canvas[0]), (wh, wl, ow, hr_canvas[1], lr_canvas[1])]):
            pos_hr = (torch.arange(cells, dtype=torch.float64) + 0.5) * canvas_hr / cells
            want = pos_hr * size_lr / size_hr
            half = canvas_lr / math.ceil(canvas_lr / stride) / 2
            inside = (pos_hr < size_hr) & (want >= half) & (want <= canvas_lr - half)
            got = out[n, axis].double()
            got = got[:, inside] if axis == 1 else got[inside, :]
            want = want[inside][None, :] if axis == 1 else want[inside][:, None]
            torch.testing.assert_close(got, want.expand_as(got), rtol=0, atol=1e-4,
                                       msg=lambda m: f"image {n}, axis {'yx'[axis]}: {m}")
            checked += int(inside.sum())
    assert checked > 20


def _ref_resample(feat, lr_canvas, hr_canvas, out_hw, lr_sizes, hr_sizes):
    """Loop reference: each output cell centre mapped through its own image's scale, bilinear, border clamped."""
    n, c, h, w = feat.shape
    oh, ow = out_hw
    f = feat.double()
    out = torch.zeros(n, c, oh, ow, dtype=torch.float64)

    def taps(pos_out, canvas_out, cells_out, r, canvas_in, cells_in):
        u = (pos_out + 0.5) * canvas_out / cells_out * r / (canvas_in / cells_in) - 0.5  # 0 = centre of cell 0
        u = min(max(u, 0.0), cells_in - 1.0)
        lo = int(math.floor(u))
        hi = min(lo + 1, cells_in - 1)
        return lo, hi, u - lo

    for i in range(n):
        ry, rx = lr_sizes[i][0] / hr_sizes[i][0], lr_sizes[i][1] / hr_sizes[i][1]
        for a in range(oh):
            y0, y1, wy = taps(a, hr_canvas[0], oh, ry, lr_canvas[0], h)
            for b in range(ow):
                x0, x1, wx = taps(b, hr_canvas[1], ow, rx, lr_canvas[1], w)
                out[i, :, a, b] = ((1 - wy) * (1 - wx) * f[i, :, y0, x0] + (1 - wy) * wx * f[i, :, y0, x1]
                                   + wy * (1 - wx) * f[i, :, y1, x0] + wy * wx * f[i, :, y1, x1])
    return out


@pytest.mark.parametrize("stride", [8, 16])
def test_resample_maps_each_image_by_its_own_scale(stride):
    out_hw = (HR_CANVAS[0] // stride, HR_CANVAS[1] // stride)
    ramp = _ramp(2, LR_CANVAS, stride)
    _check_ramp_lands(resample_to_hr(ramp, LR_CANVAS, HR_CANVAS, out_hw, LR_SIZES, HR_SIZES), stride)
    # The whole-canvas interpolation this replaces misplaces both images.
    naive = F.interpolate(ramp, size=out_hw, mode="bilinear", align_corners=False)
    for n, axis in ((0, "y"), (1, "x")):  # image 0 grows more than the canvas in height, image 1 in width
        with pytest.raises(AssertionError, match=f"axis {axis}"):
            _check_ramp_lands(naive[n:n + 1], stride, lr_sizes=LR_SIZES[n:n + 1], hr_sizes=HR_SIZES[n:n + 1])
    # Every cell, border included, against the loop reference on random features.
    feat = torch.randn(2, 3, LR_CANVAS[0] // stride, LR_CANVAS[1] // stride, dtype=torch.float64)
    torch.testing.assert_close(resample_to_hr(feat, LR_CANVAS, HR_CANVAS, out_hw, LR_SIZES, HR_SIZES),
                               _ref_resample(feat, LR_CANVAS, HR_CANVAS, out_hw, LR_SIZES, HR_SIZES),
                               rtol=1e-12, atol=1e-12)


class _RampBody(nn.Module):
    """A backbone body whose outputs are :func:`_ramp` of the canvas it receives (strides 8 and 16)."""

    def forward(self, x):
        canvas = tuple(x.shape[-2:])
        return OrderedDict((str(i), _ramp(x.shape[0], canvas, s).to(x.dtype)) for i, s in enumerate((8, 16)))


class _RampBackbone(nn.Module):
    out_channels = 2

    def __init__(self):
        super().__init__()
        self.body, self.fpn = _RampBody(), nn.Identity()

    def forward(self, x):
        return self.fpn(self.body(x))


def _ramp_retinanet(min_size, max_size):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    torch.manual_seed(0)
    anchors = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((1.0,), (1.0,)))
    return RetinaNet(_RampBackbone(), num_classes=2, min_size=min_size, max_size=max_size, anchor_generator=anchors,
                     image_mean=[0.0] * 3, image_std=[1.0] * 3)


@pytest.mark.parametrize("bridge", [True, False])
def test_distilled_features_land_where_each_image_belongs(bridge):
    # A torchvision RetinaNet whose backbone outputs the canvas coordinates of its cells and whose neck is
    # the identity: the student features the loss receives must hold, at each HR cell, the LR position of
    # that cell in its own image, for the bridge (resampled backbone through the neck) and for Fitnet/Up
    # (resampled LR neck) alike.
    student, teacher = _ramp_retinanet(64, 96), _ramp_retinanet(128, 160)
    rec = RecordingLoss()
    d = BridgeDistiller(student, teacher, loss=rec, alpha=1.0, bridge=bridge).train()
    images = [torch.rand(3, h, w) for h, w in LR_SIZES]
    hr_images = [torch.rand(3, h, w) for h, w in HR_SIZES]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])} for _ in images]
    hr_targets = [{"boxes": t["boxes"] * torch.tensor([r[1] / l[1], r[0] / l[0]] * 2), "labels": t["labels"]}
                  for t, l, r in zip(targets, LR_SIZES, HR_SIZES)]
    d(images, targets, hr_images=hr_images, hr_targets=hr_targets)
    (call,) = rec.calls
    ctx = call["ctx"]
    assert ctx.canvas_size == HR_CANVAS and [tuple(s) for s in ctx.image_sizes] == HR_SIZES
    assert ctx.strides == [8, 16]
    for s, t, stride in zip(call["student"], call["teacher"], ctx.strides):
        assert s.shape == t.shape == (2, 2, HR_CANVAS[0] // stride, HR_CANVAS[1] // stride)
        _check_ramp_lands(s, stride)


# --- 5. inherit ----------------------------------------------------------------------------------------------
def _tiny_pair():
    torch.manual_seed(0)
    student, teacher = TinyDetector(), TinyDetector()
    student.only_student = nn.Linear(3, 3)
    teacher.only_teacher = nn.Linear(2, 2)
    teacher.head[3] = nn.Conv2d(16, 2, 1)  # same name, another shape
    return student, teacher


def _retinanet_pair():
    # Same architecture but the number of classes: only the classification logits differ in shape.
    return seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128, num_classes=5)


@pytest.mark.parametrize("pair", [_tiny_pair, _retinanet_pair])
def test_inherit_copies_every_same_name_same_shape_tensor_and_nothing_else(pair):
    student, teacher = pair()
    with torch.no_grad():  # every teacher tensor, buffers included, unlike any student tensor
        for k, v in teacher.state_dict().items():
            v.copy_(torch.rand_like(v) + 2 if v.is_floating_point() else torch.full_like(v, 7))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    s_state, t_state = student.state_dict(), teacher.state_dict()
    same = [k for k in s_state if k in t_state and s_state[k].shape == t_state[k].shape]
    assert any(k.endswith(".running_mean") for k in same) and any(k.endswith(".num_batches_tracked") for k in same)
    assert any(k.startswith("head.") for k in same)
    assert not any(torch.equal(before[k], t_state[k]) for k in same)

    report = inherit_weights(student, teacher)
    after = student.state_dict()
    for k, v in after.items():
        if k in same:
            assert torch.equal(v, t_state[k]) and v.dtype == before[k].dtype, f"{k} not copied"
        else:
            assert torch.equal(v, before[k]), f"{k} changed"
    assert report.copied == same
    assert report.shape_mismatch == [(k, tuple(v.shape), tuple(t_state[k].shape)) for k, v in before.items()
                                     if k in t_state and k not in same]
    assert report.missing_in_teacher == [k for k in before if k not in t_state]
    assert report.shape_mismatch and (report.missing_in_teacher or pair is _retinanet_pair)

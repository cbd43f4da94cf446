"""A new user's mistakes (issue 10 B) and ``alpha="auto"`` (issue 10 D): each works, or raises an
LRDetError naming what was expected and what arrived, before anything is frozen or any forward runs."""
import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrdet_core import (BridgeDistiller, InputError, LevelMatchError, NonFiniteError, SplitPointError,
                        SplitPoints, inherit_weights)
from lrdet_core.losses import mse_loss
from tiny import TinyDetector, batch, faster_rcnn, retinanet, seeded

TINY_SPLIT = SplitPoints(backbone="backbone", neck="neck")


pytestmark = pytest.mark.usefixtures("one_thread")



def _tiny(student=None, teacher=None, **kw):
    torch.manual_seed(0)
    student = student or TinyDetector()
    teacher = teacher or TinyDetector(neck_channels=24)
    kw.setdefault("hr_scale", 2.0)
    return BridgeDistiller(student, teacher, split_points=TINY_SPLIT, **kw)


def _tiny_batch(seed=0, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    targets = [{"boxes": torch.tensor([[2.0 + i, 3.0, 20.0, 25.0 - i]])} for i in range(n)]
    return images, targets


class _Recorder:
    """A distillation loss (MSE, sum) that keeps what it was given and what it returned."""

    def __init__(self):
        self.calls = []

    def __call__(self, s, t, ctx):
        value = sum(mse_loss(a, b) for a, b in zip(s, t))
        self.calls.append({"s": [x.detach() for x in s], "t": [x.detach() for x in t], "ctx": ctx,
                           "value": value.detach()})
        return value


def _forward_count(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


# --- 1. a teacher sharing the student's parts -------------------------------------------------------------
def test_teacher_built_on_the_students_backbone_is_rejected_before_anything_is_frozen():
    from torchvision.models.detection import FasterRCNN
    student = seeded(faster_rcnn, size=64)
    teacher = FasterRCNN(student.backbone, num_classes=3, min_size=128, max_size=128)
    with pytest.raises(InputError, match=r"share nothing with the student .* the teacher's module 'backbone' is the "
                                         r"student's module 'backbone'.*copy.deepcopy"):
        BridgeDistiller(student, teacher)
    assert all(p.requires_grad for p in student.parameters())  # nothing was frozen


@pytest.mark.parametrize("what", ["parameter", "buffer"])
def test_teacher_sharing_one_tensor_with_the_student_is_rejected(what):
    student, teacher = TinyDetector(), TinyDetector()
    if what == "parameter":  # tied weights: no module is shared, one Parameter is
        teacher.head[0].weight = student.head[0].weight
        name = "head.0.weight"
    else:
        teacher.neck.lat[1][1].register_buffer("running_mean", student.neck.lat[1][1].running_mean)
        name = "neck.lat.1.1.running_mean"
    with pytest.raises(InputError, match=rf"the teacher's tensor '{name}' is the student's tensor '{name}'"):
        BridgeDistiller(student, teacher, split_points=TINY_SPLIT, hr_scale=2.0)
    assert all(p.requires_grad for p in student.parameters())


def test_teachers_sharing_with_each_other_but_not_with_the_student_are_fine():
    a = TinyDetector(neck_channels=24)
    b = TinyDetector(neck_channels=24)
    b.head = a.head  # harmless: both are frozen
    _tiny(teacher={"a": a, "b": b})


# --- 2. several levels at one stride: MobileNetV3 FPNs, level_map ---------------------------------------------
class _TwoAtOneStride(nn.Module):
    """A custom detector whose backbone levels '0' (3x3 conv, stride 2, padding 1: ceil(H/2) cells) and '1'
    (2x2 average pool, then 1x1 conv: floor(H/2) cells) share stride 2; on an odd canvas they differ by one
    cell. ``names`` are the neck's output keys, one per backbone level (a third level repeats the first; a
    fourth has stride 4)."""

    def __init__(self, names=("a", "b"), c=4):
        super().__init__()
        self.backbone = _TwoBackbone(len(names), c)
        self.neck = _DictNeck(names, c)

    def forward(self, images, targets=None):
        feats = self.neck(self.backbone(images))
        if not self.training:
            return feats
        return {"sq": sum((v ** 2).mean() for v in feats.values())}


class _TwoBackbone(nn.Module):
    def __init__(self, n, c):
        super().__init__()
        self.conv = nn.ModuleList(nn.Conv2d(3, c, 1) if i == 1 else nn.Conv2d(3, c, 3, 4 if i == 3 else 2, 1)
                                  for i in range(n))

    def forward(self, x):
        return [conv(F.avg_pool2d(x, 2) if i == 1 else x) for i, conv in enumerate(self.conv)]


class _DictNeck(nn.Module):
    def __init__(self, names, c):
        super().__init__()
        self.names = names
        self.conv = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in names)

    def forward(self, feats):
        return OrderedDict((n, conv(f)) for n, conv, f in zip(self.names, self.conv, feats))


def _odd_hr_batch(n=2):
    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hr = F.interpolate(images, size=(33, 33), mode="bilinear", align_corners=False)  # odd: 17 and 16 cells
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]])} for _ in range(n)]
    return images, targets, hr, [{"boxes": t["boxes"] * 33 / 16} for t in targets]


def test_backbone_levels_at_one_stride_are_replayed_at_their_own_hr_size():
    # The teacher's stride-2 levels are 17 and 16 cells on the 33 px HR canvas. The bridge must resample each
    # student level to the size of its own teacher level, not to one size per stride.
    torch.manual_seed(0)
    rec = _Recorder()
    d = BridgeDistiller(_TwoAtOneStride(), _TwoAtOneStride(), split_points=TINY_SPLIT, loss=rec, alpha=1.0).train()
    images, targets, hr, hr_targets = _odd_hr_batch()
    out = d(images, targets, hr_images=hr, hr_targets=hr_targets)
    call = rec.calls[-1]
    assert call["ctx"].level_names == ["a", "b"] and call["ctx"].strides == [2, 2]
    assert [tuple(x.shape[-2:]) for x in call["t"]] == [(17, 17), (16, 16)]
    assert [tuple(x.shape[-2:]) for x in call["s"]] == [(17, 17), (16, 16)]
    sum(out.values()).backward()


def _even_hr_batch(n=2):
    images, targets, _, _ = _odd_hr_batch(n)
    hr = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)  # every level 16 cells
    return images, targets, hr, [{"boxes": t["boxes"] * 2} for t in targets]


def _run_custom(student, teacher, data, **kw):
    rec = _Recorder()
    d = BridgeDistiller(student, teacher, split_points=TINY_SPLIT, loss=rec, alpha=1.0, **kw).train()
    images, targets, hr, hr_targets = data
    d(images, targets, hr_images=hr, hr_targets=hr_targets)
    t = next(iter(teacher.values())) if isinstance(teacher, dict) else teacher
    with torch.no_grad():
        direct = t.neck(t.backbone(hr))
    return rec.calls[-1], direct


@pytest.mark.parametrize("teacher_names, expected", [(("b", "a"), ["a", "b"]), (("x", "y"), ["x", "y"])])
def test_levels_at_one_stride_pair_by_name_else_by_order(teacher_names, expected):
    torch.manual_seed(0)
    call, direct = _run_custom(_TwoAtOneStride(("a", "b")), _TwoAtOneStride(teacher_names), _even_hr_batch())
    assert call["ctx"].level_names == expected  # the teacher level paired with student 'a', then 'b'
    assert all(torch.equal(t, direct[k]) for t, k in zip(call["t"], expected))


def test_level_map_says_which_levels_to_pair_where_no_rule_can():
    torch.manual_seed(0)
    student, teacher = _TwoAtOneStride(("a", "b")), _TwoAtOneStride(("x", "y", "z", "w"))  # 'w': stride 4
    with pytest.raises(LevelMatchError, match=r"cannot tell which levels to pair at stride 2: the student has "
                                              r"\['a', 'b'\] and the teacher has \['x', 'y', 'z'\]\. Pass level_map="):
        _run_custom(student, teacher, _odd_hr_batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'x' and 'w' (stride 4) are left out on purpose: no "no partner" warning
        call, direct = _run_custom(student, teacher, _odd_hr_batch(), level_map={"a": "z", "b": "y"})
    assert call["ctx"].level_names == ["z", "y"] and call["ctx"].strides == [2, 2]
    assert torch.equal(call["t"][0], direct["z"]) and torch.equal(call["t"][1], direct["y"])
    # per teacher, by name
    call, _ = _run_custom(student, {"t": teacher}, _odd_hr_batch(), level_map={"t": {"a": "z", "b": "y"}})
    assert call["ctx"].level_names == ["z", "y"]


@pytest.mark.parametrize("level_map, error, match", [
    ({"c": "x"}, LevelMatchError,
     r"level_map names student level\(s\) \['c'\], but the student's neck has \['a', 'b'\]"),
    ({"a": "w"}, LevelMatchError, r"teacher level\(s\) \['w'\], but the teacher's neck has \['x', 'y', 'z'\]"),
    ({"a": "x", "b": "x"}, InputError, r"pairs the teacher's level 'x' with the student's levels 'a' and 'b'"),
    ({"t9": {"a": "x"}}, InputError, r"level_map names teacher\(s\) \['t9'\], but the teachers are \['teacher'\]"),
    ({"teacher": {"a": "x"}, "b": "y"}, InputError, r"mixes both"),
    ({}, InputError, r"expected level_map to be a non-empty dict"),
])
def test_level_map_names_what_is_wrong(level_map, error, match):
    torch.manual_seed(0)
    with pytest.raises(error, match=match):
        _run_custom(_TwoAtOneStride(("a", "b")), _TwoAtOneStride(("x", "y", "z")), _odd_hr_batch(),
                    level_map=level_map)


@pytest.fixture(scope="module")
def mobilenets():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_mobilenet_v3_large_fpn
    kw = dict(weights=None, weights_backbone=None, num_classes=3)
    torch.manual_seed(0)
    return {"320": fasterrcnn_mobilenet_v3_large_320_fpn(min_size=64, max_size=64, **kw),
            "fpn": fasterrcnn_mobilenet_v3_large_fpn(min_size=128, max_size=128, **kw)}


@pytest.mark.parametrize("student_kind, teacher_kind", [("320", "fpn"), ("fpn", "320")])
def test_mobilenet_v3_fpn_detectors_train_as_student_and_teacher(mobilenets, student_kind, teacher_kind):
    # Both FPN outputs '0' and '1' have stride 32: paired by name, with 'pool' at stride 64.
    student, teacher = copy.deepcopy(mobilenets[student_kind]), copy.deepcopy(mobilenets[teacher_kind])
    student.transform.min_size, student.transform.max_size = (64,), 64
    teacher.transform.min_size, teacher.transform.max_size = (128,), 128
    plain = copy.deepcopy(student)
    rec = _Recorder()
    d = BridgeDistiller(student, teacher, loss=rec, alpha=1.0, bridge_rois=32).train()
    assert d.adapter.known_strides["neck"] == {"0": 32, "1": 32, "pool": 64}
    images, targets = batch(((100, 150), (150, 100)))
    with torch.random.fork_rng():  # the RPN and RoI samplers draw from it
        out = d(images, copy.deepcopy(targets))
    call = rec.calls[-1]
    assert call["ctx"].level_names == ["0", "1", "pool"] and call["ctx"].strides == [32, 32, 64]
    with torch.no_grad():  # the teacher's levels are its own FPN's on its own transform of the batch
        want = teacher.backbone(teacher.transform(images, copy.deepcopy(targets))[0].tensors)
    assert list(want) == ["0", "1", "pool"] and all(torch.equal(t, want[k]) for t, k in zip(call["t"], want))
    assert {k.split("/")[0] for k in out} == {"lr", "bridge", "distill"}
    # The LR terms and their gradient are the plain student's own on the same batch and random draws.
    lr_keys = sorted(k for k in out if k.startswith("lr/"))
    params = [p for p in student.parameters() if p.requires_grad]
    lr_grads = torch.autograd.grad(sum(out[k] for k in lr_keys), params, retain_graph=True, allow_unused=True)
    own = plain(images, copy.deepcopy(targets))
    assert lr_keys == [f"lr/{k}" for k in sorted(own)]
    for k in own:
        torch.testing.assert_close(out[f"lr/{k}"], own[k], rtol=1e-6, atol=1e-7)
    sum(own.values()).backward()
    for (name, p), g in zip(((n, p) for n, p in plain.named_parameters() if p.requires_grad), lr_grads):
        want_g = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(torch.zeros_like(p) if g is None else g, want_g, rtol=1e-5, atol=1e-6, msg=name)
    sum(out.values()).backward()
    assert student.backbone.fpn.inner_blocks[0][0].weight.grad.abs().sum() > 0  # level '0' reaches the loss


# --- 3. a teacher in another dtype --------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [False, True], ids=["eager", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_teacher_cast_to_another_dtype_gets_its_input_in_that_dtype(dtype, autocast):
    torch.manual_seed(0)
    teacher = TinyDetector(neck_channels=24).to(dtype)
    rec = _Recorder()
    d = _tiny(teacher=teacher, loss=rec, alpha=1.0).train()
    images, targets = _tiny_batch()
    hr = F.interpolate(images, scale_factor=2.0, mode="bilinear", align_corners=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = d(images, targets)  # a cast teacher runs in its own dtype, also under autocast
    with torch.no_grad():
        expected = teacher.neck(teacher.backbone(hr.to(dtype)))
    t_feats = rec.calls[-1]["t"]
    assert [f.dtype for f in t_feats] == [dtype] * 3  # the loss gets them in the teacher's dtype
    assert all(torch.equal(f, v) for f, v in zip(t_feats, expected.values()))
    assert all(torch.isfinite(v).all() for v in out.values())
    sum(out.values()).backward()
    assert all(p.dtype == dtype for p in teacher.parameters())


def test_torchvision_teacher_in_bf16_is_probed_and_trained_with():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128, channels=48)
    rec = _Recorder()
    d = BridgeDistiller(student, teacher.to(torch.bfloat16), loss=rec, alpha=1e-3).train()  # the probe runs it
    assert sorted(d.projectors) == ["teacher_s128", "teacher_s16", "teacher_s32", "teacher_s64", "teacher_s8"]
    images, targets = batch()
    out = d(images, targets)
    with torch.no_grad():  # the loss gets the teacher's own neck, in bf16, on its own transform of the batch
        want = teacher.backbone(teacher.transform(images)[0].tensors.to(torch.bfloat16))
    t_feats = rec.calls[-1]["t"]
    assert len(t_feats) == len(want) == 5 and all(torch.equal(t, w) for t, w in zip(t_feats, want.values()))
    assert all(t.dtype == torch.bfloat16 for t in t_feats)
    assert out["distill/custom"].dtype == torch.float32
    assert out["distill/custom"].item() == pytest.approx(1e-3 * rec.calls[-1]["value"].item(), rel=1e-6)
    sum(out.values()).backward()


# --- 4. option values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(alpha=float("nan")), r"expected alpha to be a finite number >= 0, 'auto' or None .* but got nan"),
    (dict(alpha=-1.0), r"expected alpha to be a finite number >= 0.* but got -1.0"),
    (dict(alpha=float("inf")), r"but got inf"),
    (dict(alpha=True), r"but got True"),
    (dict(alpha="Auto"), r"but got 'Auto'"),
    (dict(alpha=None, alpha_ratio=0.5), r"alpha_ratio=0.5 only applies with alpha='auto', but got alpha=None"),
    (dict(alpha=1e-3, alpha_ratio=0.5), r"alpha_ratio=0.5 only applies with alpha='auto', but got alpha=0.001"),
    (dict(alpha="auto", alpha_ratio=0.0), r"expected alpha_ratio to be a finite number > 0 .* but got 0.0"),
    (dict(alpha="auto", alpha_ratio=float("nan")), r"but got nan"),
    (dict(bridge_rois=0), r"expected bridge_rois to be a positive int .* but got 0"),
    (dict(bridge_rois=-3), r"but got -3"),
    (dict(bridge_rois=2.5), r"but got 2.5"),
    (dict(bridge_rois=True), r"but got True"),
    (dict(bridge_rois=16), r"bridge_rois applies to R-CNN students .* but the student is not a torchvision detector"),
])
def test_bad_option_values_are_rejected(kw, match):
    with pytest.raises(InputError, match=match):
        _tiny(**kw)


def test_bridge_rois_for_a_retinanet_student_is_rejected_and_alpha_zero_is_allowed():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)
    with pytest.raises(InputError, match=r"bridge_rois applies to R-CNN students .* but the student is a torchvision "
                                         r"RetinaNet; leave bridge_rois=None"):
        BridgeDistiller(student, teacher, bridge_rois=64)
    out = BridgeDistiller(student, teacher, alpha=0).train()(*batch())
    assert out["distill/mse"].item() == 0.0


def _poison_bridge(d):
    """NaN in the student's head only on the HR canvas: the bridge's detection loss, not the LR one."""
    def hook(m, inputs, output):
        return output * float("nan") if inputs[0].shape[-1] >= 16 else output  # LR maps are 8 cells at most
    d.student.head.register_forward_hook(hook)


def test_check_finite_covers_the_bridge_and_lr_terms_and_names_them():
    d = _tiny(alpha=1.0).train()
    images, targets = _tiny_batch()
    d.materialize(images, targets)
    _poison_bridge(d)
    with pytest.raises(NonFiniteError, match=r"expected every loss term to be finite, but 'bridge/heat' = nan"):
        d(images, targets)
    d.check_finite = "warn"
    with pytest.warns(UserWarning, match=r"'bridge/heat' = nan"):
        out = d(images, targets)
    assert torch.isnan(out["bridge/heat"]) and torch.isfinite(out["lr/heat"])
    d.check_finite = "off"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isnan(d(images, targets)["bridge/heat"])


# --- 5. labels and images, checked before any forward ---------------------------------------------------------
def _with(targets, i, **changes):
    out = [dict(t) for t in targets]
    out[i].update(changes)
    for k, v in list(out[i].items()):
        if v is None:
            del out[i][k]
    return out


@pytest.fixture(scope="module")
def retina_pair():
    return seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)


@pytest.mark.parametrize("change, match", [
    (dict(labels=None), r"expected targets\[1\] to have 'boxes' and 'labels' .* but it has no \['labels'\]"),
    (dict(boxes=None), r"expected targets\[1\] to have 'boxes' and 'labels' .* but it has no \['boxes'\]"),
    (dict(labels=torch.tensor([1, 2], dtype=torch.int32)),
     r"expected targets\[1\]\['labels'\] to be an int64 tensor of shape \(2,\), one class index per box, but got a "
     r"torch.int32 tensor of shape \(2,\)"),
    (dict(labels=torch.tensor([1])), r"int64 tensor of shape \(2,\).* but got a torch.int64 tensor of shape \(1,\)"),
    (dict(labels=torch.tensor([[1], [2]])), r"but got a torch.int64 tensor of shape \(2, 1\)"),
    (dict(labels=[1, 2]), r"int64 tensor of shape \(2,\).* but got list"),
])
def test_bad_labels_are_named_before_any_forward(retina_pair, change, match):
    d = BridgeDistiller(*retina_pair, alpha=1e-3).train()
    images, targets = batch()
    calls = _forward_count(d.student)
    with pytest.raises(InputError, match=match):
        d(images, _with(targets, 1, **change))
    with pytest.raises(InputError, match=match.replace("targets", "hr_targets")):
        d(images, targets, hr_images=images, hr_targets=_with(targets, 1, **change))
    assert not calls


@pytest.mark.parametrize("image, match", [
    ((torch.rand(3, 100, 150) * 255).to(torch.uint8),
     r"expected images\[0\] to be a floating-point image with values in \[0, 1\], but got torch.uint8; convert it "
     r"with image.float\(\) / 255"),
    (torch.rand(100, 150), r"expected images\[0\] to be a C x H x W tensor, but got \(100, 150\)"),
])
def test_bad_images_are_named_before_any_forward(retina_pair, image, match):
    d = BridgeDistiller(*retina_pair, alpha=1e-3).train()
    images, targets = batch()
    calls = _forward_count(d.student)
    with pytest.raises(InputError, match=match):
        d([image] + images[1:], targets)
    assert not calls


def test_custom_model_batches_are_checked_before_any_forward():
    d = _tiny(alpha=1.0).train()
    images, targets = _tiny_batch()
    calls = _forward_count(d.student)
    with pytest.raises(InputError, match=r"expected floating-point images to build the HR view with hr_scale, but got "
                                         r"torch.uint8"):
        d((images * 255).to(torch.uint8), targets)
    with pytest.raises(InputError, match=r"expected as many targets as images, but got 2 images and 1 targets"):
        d(images, targets[:1])
    d.hr_scale = None
    with pytest.raises(InputError, match=r"expected hr_images and hr_targets, or BridgeDistiller\(..., hr_scale=...\)"):
        d(images, targets)
    assert not calls
    d(images, [{"boxes": t["boxes"], "labels": "anything"} for t in targets],  # a custom model's own format
      hr_images=F.interpolate(images, scale_factor=2.0), hr_targets=[{"boxes": t["boxes"] * 2} for t in targets])


# --- 6. the HR view -----------------------------------------------------------------------------------------
def test_hr_view_smaller_than_the_lr_one_is_rejected(retina_pair):
    images, targets = _tiny_batch()
    small = F.interpolate(images, scale_factor=0.5)
    with pytest.raises(InputError, match=r"expected the HR view to be at least as large as the LR images, but "
                                         r"image 0 is 32x32 and its hr_images entry 16x16; were images and "
                                         r"hr_images swapped"):
        _tiny(alpha=1.0).train()(images, targets, hr_images=small, hr_targets=targets)
    with pytest.raises(InputError, match=r"expected hr_scale >= 1 .* but got 0.5"):
        _tiny(hr_scale=0.5)
    with pytest.warns(UserWarning, match=r"hr_scale=1 makes the HR view the LR images themselves"):
        _tiny(hr_scale=1.0)
    d = BridgeDistiller(*retina_pair, alpha=1e-3).train()
    images, targets = batch()
    with pytest.raises(InputError, match=r"image 0 is 100x150 and its hr_images entry 50x75"):
        d(images, targets, hr_images=[F.interpolate(x[None], scale_factor=0.5)[0] for x in images],
          hr_targets=targets)


def test_hr_scale_with_torchvision_detectors_is_rejected(retina_pair):
    with pytest.raises(InputError, match=r"hr_scale applies to custom \(non-torchvision\) models, but got hr_scale=2.0 "
                                         r"with torchvision detectors, whose HR size is the teacher's transform"):
        BridgeDistiller(*retina_pair, hr_scale=2.0)


def test_hr_scale_and_hr_images_together_warn_once_that_the_explicit_view_wins():
    d = _tiny(alpha=1.0).train()
    images, targets = _tiny_batch()
    hr = F.interpolate(images, scale_factor=3.0, mode="bilinear", align_corners=False)
    hr_targets = [{"boxes": t["boxes"] * 3} for t in targets]
    d.materialize(images, targets)
    with pytest.warns(UserWarning, match=r"hr_images were given, so hr_scale=2 is not used for this batch"):
        d(images, targets, hr_images=hr, hr_targets=hr_targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d(images, targets, hr_images=hr, hr_targets=hr_targets)


@pytest.mark.parametrize("s_size, t_size", [(128, 128), (128, 96)])
def test_student_at_the_teachers_resolution_or_above_warns(s_size, t_size):
    student, teacher = seeded(retinanet, size=s_size), seeded(retinanet, seed=1, size=t_size)
    with pytest.warns(UserWarning, match=rf"the student resizes images to min_size={s_size}, max_size={s_size} and "
                                         rf"the teacher to min_size={t_size}, max_size={t_size}: the student is at "
                                         rf"the same or a higher resolution"):
        BridgeDistiller(student, teacher, alpha=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BridgeDistiller(student, seeded(retinanet, seed=1, size=s_size + 32), alpha=1e-3)
        BridgeDistiller(student, teacher, alpha=1e-3, hr_source="lr")  # the paper's view: upsampled LR images


# --- 7. a neck called once per level --------------------------------------------------------------------------
class _PerLevelNeck(TinyDetector):
    """The neck applied to one level at a time: ``[neck(f) for f in feats]``."""

    def __init__(self, neck_channels=16):
        super().__init__(neck_channels=neck_channels)
        self.neck = nn.Conv2d(8, neck_channels, 1)
        self.lift = nn.ModuleList([nn.Identity(), nn.Conv2d(16, 8, 1), nn.Conv2d(32, 8, 1)])

    def forward(self, images, targets=None):
        feats = [self.neck(lift(f)) for lift, f in zip(self.lift, self.backbone(images))]
        return {"sq": sum((self.head(f) ** 2).mean() for f in feats)}


@pytest.mark.parametrize("bridge", [True, False])
def test_neck_called_once_per_level_is_named(bridge):
    torch.manual_seed(0)
    d = BridgeDistiller(_PerLevelNeck(), _PerLevelNeck(), split_points=TINY_SPLIT, hr_scale=2.0, alpha=1.0,
                        bridge=bridge).train()
    with pytest.raises(SplitPointError, match=r"expected the student's neck split point 'neck' to be called once per "
                                              r"forward, .* but it was called a second time in one forward \(a neck "
                                              r"applied once per level\?\)"):
        d(*_tiny_batch())
    assert not any(m._forward_hooks for m in d.student.modules())


# --- 8. loss names ------------------------------------------------------------------------------------------
def test_loss_names_are_normalised_once(retina_pair):
    from lrdet_core import RECOMMENDED_ALPHA
    d = BridgeDistiller(*retina_pair, loss=" MSE ", alpha=None).train()  # None: the recommended alpha, by name
    assert d.alpha == RECOMMENDED_ALPHA["mse"] and d.loss_name == "mse"
    assert "distill/mse" in d(*batch())
    d = BridgeDistiller(*retina_pair, loss="FGD", alpha=None)
    assert d.alpha == RECOMMENDED_ALPHA["fgd"] and d.losses["teacher"].preset == "retinanet"


# --- 9. inherit across architectures ----------------------------------------------------------------------
def test_inherit_report_counts_per_module():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128, num_classes=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same architecture: nothing looks mismatched
        report = inherit_weights(student, teacher)
    by = report.by_module()
    names = list(student.state_dict())
    top = list(dict.fromkeys(n.split(".")[0] for n in names))
    assert list(by) == top == ["backbone", "head"]
    skipped = {m[0] for m in report.shape_mismatch}
    for mod in top:
        mine = [n for n in names if n.split(".")[0] == mod]
        assert by[mod].copied == sum(n in report.copied for n in mine)
        assert by[mod].shape_mismatch == sum(n in skipped for n in mine)
    assert by["backbone"].shape_mismatch == 0 and by["head"].shape_mismatch == 2  # cls_logits weight and bias
    params = dict(student.named_parameters())
    share = sum(p.numel() for n, p in params.items() if n in report.copied) / sum(p.numel() for p in params.values())
    assert report.copied_share == pytest.approx(share) and 0.5 < share < 1
    assert (f"backbone: {by['backbone'].copied} copied, 0 other shape, 0 not in teacher; head: {by['head'].copied} "
            f"copied, 2 other shape, 0 not in teacher") in str(report)


def test_inherit_warns_when_most_of_the_student_is_not_copied():
    student, teacher = TinyDetector(width=8), TinyDetector(width=12)  # every backbone and neck shape differs
    with pytest.warns(UserWarning, match=r"inherit copied \d+% of the student's parameter values .* the pair looks "
                                         r"mismatched. Per module: inherited"):
        report = inherit_weights(student, teacher)
    assert report.copied_share < 0.5


def test_inherit_warns_about_batchnorm_statistics_copied_after_a_skipped_conv():
    student, teacher = TinyDetector(), TinyDetector()
    teacher.head[0] = nn.Conv2d(16, 16, 1)  # 1x1 instead of 3x3: same outputs, other shape; its BN still copies
    with pytest.warns(UserWarning, match=r"copied the BatchNorm statistics of \['head.1'\] but not the convolution "
                                         r"before each"):
        report = inherit_weights(student, teacher)
    assert report.suspicious_bn == ["head.1"] and "head.1.running_mean" in report.copied
    assert ("head.0.weight", (16, 16, 3, 3), (16, 16, 1, 1)) in report.shape_mismatch


# --- alpha="auto" ---------------------------------------------------------------------------------------------
def test_alpha_auto_balances_each_teacher_term_at_the_first_step_then_stays():
    rec = _Recorder()
    teachers = {"a": TinyDetector(neck_channels=24), "b": TinyDetector(neck_channels=16)}
    d = _tiny(teacher=teachers, loss=rec, alpha="auto", alpha_ratio=0.25)
    images, targets = _tiny_batch()
    d.materialize(images, targets)
    assert d.alphas == {"a": None, "b": None}  # materialize() measures nothing: it may run on a dummy batch
    with pytest.warns(UserWarning, match=r"alpha='auto' at the first step \(L_det\(LR\) = [\d.]+, alpha_ratio = "
                                         r"0.25\): alpha=\S+ for distill.a/custom \(L_FD = \S+\); alpha=\S+ for "
                                         r"distill.b/custom"):
        out = d.train()(images, targets)
    det = sum(v.item() for k, v in out.items() if k.startswith("lr/"))
    raw = {"a": rec.calls[-2]["value"], "b": rec.calls[-1]["value"]}
    alphas = d.alphas
    for n in ("a", "b"):
        assert alphas[n] * raw[n].item() == pytest.approx(0.25 * det, rel=1e-12)
        assert torch.equal(out[f"distill.{n}/custom"], alphas[n] * raw[n])
    kept = d.state_dict()["auto_alpha"]  # a float64 buffer in the checkpoint, as measured
    assert alphas["a"] != alphas["b"] and kept.dtype == torch.float64
    assert kept.tolist() == pytest.approx([0.25 * det / raw[n].item() for n in ("a", "b")], rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        out2 = d(*_tiny_batch(seed=1))
    assert d.alphas == alphas
    assert torch.equal(out2["distill.a/custom"], alphas["a"] * rec.calls[-2]["value"])


def test_alpha_auto_waits_for_a_positive_term_and_weighs_it_zero_meanwhile():
    values = iter([0.0, 3.0, 5.0])

    def loss(s, t, ctx):
        m = sum(mse_loss(a, b) for a, b in zip(s, t))
        return m - m.detach() + next(values)  # worth 0 at the first step, with the gradient of the MSE

    d = _tiny(loss=loss, alpha="auto").train()
    d.materialize(*_tiny_batch())  # consumes 0.0 without measuring
    values = iter([0.0, 3.0, 5.0])
    with pytest.warns(UserWarning, match=r"Not set, the terms are not finite and positive: distill/loss \(L_FD = 0\)"):
        out = d(*_tiny_batch())
    assert d.alphas == {"teacher": None} and out["distill/loss"].item() == 0.0
    out["distill/loss"].backward()  # weighted by 0: nothing reaches the projectors, which only this term trains
    grads = [p.grad for p in d.projectors.parameters()]
    assert grads and all(g is not None and not g.any() for g in grads)
    with pytest.warns(UserWarning, match=r"alpha=\S+ for distill/loss \(L_FD = 3\)"):
        out = d(*_tiny_batch())
    det = out["lr/heat"].item()
    assert d.alphas["teacher"] == pytest.approx(0.5 * det / 3.0, rel=1e-6)


def test_numpy_scalars_are_numbers_too():
    np = pytest.importorskip("numpy")
    assert _tiny(alpha=np.float32(0.5)).alpha == 0.5
    assert _tiny(alpha="auto", alpha_ratio=np.float32(0.25), hr_scale=np.float32(2.0)).alpha_ratio == 0.25

"""A new user's mistakes (issue 10 B) and ``alpha="auto"`` (issue 10 D): each works, or raises an
LRDetError naming what was expected and what arrived, before anything is frozen or any forward runs."""
import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrdet_core import (BridgeDistiller, InputError, LevelMatchError, LRDetError, NonFiniteError, SplitPointError,
                        SplitPoints, inherit_weights)
from lrdet_core.losses import mse
from tiny import TinyDetector, batch, faster_rcnn, retinanet

TINY_SPLIT = SplitPoints(backbone="backbone", neck="neck")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _seeded(builder, seed=0, **kw):
    torch.manual_seed(seed)
    return builder(**kw)


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
        value = sum(mse(a, b) for a, b in zip(s, t))
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
    student = _seeded(faster_rcnn, size=64)
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
    cell. ``names`` are the neck's output keys, one per backbone level (a third level repeats the first)."""

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
        self.conv = nn.ModuleList(nn.Conv2d(3, c, 3, 2, 1) if i != 1 else nn.Conv2d(3, c, 1) for i in range(n))

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
    student, teacher = _TwoAtOneStride(("a", "b")), _TwoAtOneStride(("x", "y", "z"))
    with pytest.raises(LevelMatchError, match=r"cannot tell which levels to pair at stride 2: the student has "
                                              r"\['a', 'b'\] and the teacher has \['x', 'y', 'z'\]\. Pass level_map="):
        _run_custom(student, teacher, _odd_hr_batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'x' is left out on purpose: no "no partner" warning
        call, direct = _run_custom(student, teacher, _odd_hr_batch(), level_map={"a": "z", "b": "y"})
    assert call["ctx"].level_names == ["z", "y"] and call["ctx"].strides == [2, 2]
    assert torch.equal(call["t"][0], direct["z"]) and torch.equal(call["t"][1], direct["y"])
    # per teacher, by name
    call, _ = _run_custom(student, {"t": teacher}, _odd_hr_batch(), level_map={"t": {"a": "z", "b": "y"}})
    assert call["ctx"].level_names == ["z", "y"]


@pytest.mark.parametrize("level_map, error, match", [
    ({"c": "x"}, LevelMatchError, r"level_map names student level\(s\) \['c'\], but the student's neck has \['a', 'b'\]"),
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
    import copy
    student, teacher = copy.deepcopy(mobilenets[student_kind]), copy.deepcopy(mobilenets[teacher_kind])
    student.transform.min_size, student.transform.max_size = (64,), 64
    teacher.transform.min_size, teacher.transform.max_size = (128,), 128
    rec = _Recorder()
    d = BridgeDistiller(student, teacher, loss=rec, alpha=1.0, bridge_rois=32).train()
    assert d._level_strides["student"] == {"0": 32, "1": 32, "pool": 64}
    out = d(*batch(((100, 150), (150, 100))))
    call = rec.calls[-1]
    assert call["ctx"].level_names == ["0", "1", "pool"] and call["ctx"].strides == [32, 32, 64]
    assert [x.shape[-2:] for x in call["s"]] == [x.shape[-2:] for x in call["t"]]
    assert {k.split("/")[0] for k in out} == {"lr", "bridge", "distill"}
    sum(out.values()).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert student.backbone.fpn.inner_blocks[0][0].weight.grad.abs().sum() > 0  # level '0' reaches the loss

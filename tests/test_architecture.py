"""The parts the distiller is built from, each tested on its own, without a detector.

Level matching and the bridge's sizes are pure functions over named tuples; the recorder's hooks and stand-ins
are gone after the block whatever happens in it; projectors exist exactly where channels differ; the adapter of a
model is picked from its class names alone.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lrdet_core.adapters import GenericAdapter, SplitPoints, TorchvisionAdapter, adapter_for
from lrdet_core.align import bridge_sizes, resample_levels
from lrdet_core.errors import LevelMatchError, SplitPointError
from lrdet_core.levels import Level, LevelSize, pair_levels
from lrdet_core.projectors import Projectors
from lrdet_core.recording import Recorder, StopForward


def _lv(key, stride, size, c=1, n=1):
    return Level(key, stride, torch.zeros(n, c, size, size))


# --- level matching: a pure function -------------------------------------------------------------------
def test_levels_pair_by_stride_and_unshared_strides_are_left_out():
    s = [_lv("0", 8, 16), _lv("1", 16, 8), _lv("2", 32, 4)]
    t = [_lv("p3", 8, 16), _lv("p4", 16, 8), _lv("p6", 64, 2)]
    pairs = pair_levels(s, t, "teacher")
    assert [(p.stride, p.student_key, p.teacher_key, p.name) for p in pairs] == [(8, "0", "p3", "s8"),
                                                                                 (16, "1", "p4", "s16")]
    assert pairs[0].student is s[0].tensor and pairs[0].teacher is t[0].tensor


def test_levels_at_one_stride_pair_by_name_else_by_order_else_ask_for_a_level_map():
    by_name = pair_levels([_lv("b", 32, 4), _lv("a", 32, 4)], [_lv("a", 32, 4), _lv("b", 32, 4)], "teacher")
    assert [(p.student_key, p.teacher_key) for p in by_name] == [("b", "b"), ("a", "a")]
    by_order = pair_levels([_lv("0", 32, 4), _lv("1", 32, 4)], [_lv("x", 32, 4), _lv("y", 32, 4)], "teacher")
    assert [(p.student_key, p.teacher_key, p.name) for p in by_order] == [("0", "x", "s32"), ("1", "y", "s32_1")]
    with pytest.raises(LevelMatchError, match=r"level_map=\{'0': 'x'\}"):
        pair_levels([_lv("0", 32, 4), _lv("1", 32, 4)], [_lv("x", 32, 4)], "teacher")


def test_level_map_pairs_exactly_the_named_levels_and_names_unknown_ones():
    s, t = [_lv("0", 8, 16), _lv("1", 16, 8)], [_lv("p3", 8, 16), _lv("p4", 16, 8)]
    pairs = pair_levels(s, t, "teacher", {"1": "p4"})
    assert [(p.student_key, p.teacher_key) for p in pairs] == [("1", "p4")]
    with pytest.raises(LevelMatchError, match=r"student level\(s\) \['9'\].*has \['0', '1'\]"):
        pair_levels(s, t, "teacher", {"9": "p4"})


def test_paired_levels_of_different_sizes_are_an_error_not_a_silent_misalignment():
    with pytest.raises(LevelMatchError, match=r"same batch and spatial size.*\(1, 1, 16, 16\) and \(1, 1, 15, 15\)"):
        pair_levels([_lv("0", 8, 16)], [_lv("p3", 8, 15)], "teacher")


# --- the bridge's sizes and resampling ------------------------------------------------------------------
def test_bridge_sizes_take_the_teachers_level_of_the_same_stride_name_or_place():
    s = [_lv("0", 8, 4), _lv("1", 32, 1), _lv("2", 32, 1), _lv("3", 64, 1)]
    t = [LevelSize("p3", 8, (9, 7)), LevelSize("2", 32, (2, 3)), LevelSize("x", 32, (3, 3))]
    # "1" has no namesake: the level in its place at stride 32 (the first); "2" has one (not the second in
    # place); stride 64 has none.
    assert bridge_sizes(s, t) == [(9, 7), (2, 3), (2, 3), None]


def test_resampled_levels_are_never_the_recorded_tensors_and_have_the_asked_sizes():
    a = torch.arange(16.0).view(1, 1, 4, 4)
    b = torch.ones(1, 1, 2, 2)
    out = resample_levels([Level("0", 8, a), Level("1", 16, b)], [(4, 4), None], (32, 32), (32, 32),
                          [(32, 32)], [(32, 32)])
    assert torch.equal(out[0], a) and out[0] is not a  # same geometry: a copy, never the recorded tensor
    out = resample_levels([Level("1", 16, b)], [None], (32, 32), (64, 64), [(32, 32)], [(64, 64)])
    assert out[0].shape[-2:] == (4, 4)  # no teacher level: the LR level's own scale on the HR canvas


# --- recording ------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.a(x)
        y.mul_(2.0)  # an in-place op right after the recorded module
        return self.b(y)


def test_recorder_hands_the_model_a_copy_and_keeps_the_original():
    net, x = _Net(), torch.randn(1, 1, 3, 3)
    with Recorder() as rec:
        rec.output_of(net.a, "a", copy=True, canvas=True)
        net(x)
    assert torch.allclose(rec.feats["a"].tensors[0], net.a(x)) and rec.canvas["a"] == (3, 3)


def test_recorder_removes_every_hook_and_stand_in_even_when_the_forward_raises():
    net, x = _Net(), torch.randn(1, 1, 3, 3)
    original_b = net.b
    with pytest.raises(StopForward):
        with Recorder() as rec:
            rec.output_of(net.a, "a", stop=True)
            rec.swap(net, "b", lambda y: y)
            assert net.b is not original_b
            net(x)
    assert net.b is original_b and not net.a._forward_hooks and not net.a._forward_pre_hooks


def test_recorder_rejects_a_module_called_twice_in_one_forward():
    conv = nn.Conv2d(1, 1, 1)
    with pytest.raises(SplitPointError, match="called a second time in one forward"):
        with Recorder() as rec:
            rec.output_of(conv, "neck", "student's neck split point 'neck'")
            conv(conv(torch.zeros(1, 1, 2, 2)))


# --- projectors -----------------------------------------------------------------------------------------
def test_projectors_exist_exactly_where_channels_differ_and_come_back_from_a_checkpoint():
    pairs = pair_levels([_lv("0", 8, 4, c=3), _lv("1", 16, 2, c=5)], [_lv("p3", 8, 4, c=4), _lv("p4", 16, 2, c=5)],
                        "teacher")
    p = Projectors()
    assert p.ensure("teacher", pairs, like=torch.zeros(1, dtype=torch.float64))
    assert list(p) == ["teacher_s8"] and p["teacher_s8"].weight.shape == (4, 3, 1, 1)
    assert p["teacher_s8"].weight.dtype == torch.float64  # the student's parameters' dtype, not the features'
    assert not p.ensure("teacher", pairs, like=None)  # nothing new the second time
    assert [x.shape[1] for x in p.project("teacher", [q._replace(student=q.student.double()) for q in pairs])] == [4, 5]
    fresh = Projectors()
    fresh.from_state_dict({f"projectors.{k}": v for k, v in p.state_dict().items()}, "projectors.", None)
    assert list(fresh) == ["teacher_s8"] and fresh["teacher_s8"].bias is not None
    assert fresh["teacher_s8"].weight.shape == (4, 3, 1, 1)


# --- adapters -------------------------------------------------------------------------------------------
def test_adapter_is_picked_from_the_class_names_and_a_custom_model_needs_split_points():
    m = nn.Module()
    m.body, m.fpn = nn.Identity(), nn.Identity()
    assert type(adapter_for(m, SplitPoints("body", "fpn"), "student")) is GenericAdapter
    with pytest.raises(SplitPointError, match="cannot find the split points of the student"):
        adapter_for(m, None, "student")
    with pytest.raises(SplitPointError, match=r"no submodule 'fpnn'.*Close matches: 'fpn'"):
        adapter_for(m, SplitPoints("body", "fpnn"), "student")
    tv = pytest.importorskip("torchvision")
    model = tv.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2,
                                                  min_size=64, max_size=64)
    ad = adapter_for(model, None, "student")
    assert type(ad) is TorchvisionAdapter and ad.family == "FCOS" and ad.split_points == SplitPoints(
        "backbone.body", "backbone.fpn")


def test_importing_the_library_imports_no_detector_library():
    code = ("import sys, lrdet_core, lrdet_core.adapters, lrdet_core.distiller; "
            "print(sorted(m for m in ('torchvision', 'ultralytics', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# --- warnings -------------------------------------------------------------------------------------------
def test_library_warnings_point_at_the_users_line_whatever_the_call_path(recwarn):
    from lrdet_core import BridgeDistiller
    from tiny import TinyDetector

    torch.manual_seed(0)
    student, teacher = TinyDetector(neck_channels=16), TinyDetector(neck_channels=24)
    d = BridgeDistiller(student, teacher, split_points=SplitPoints("backbone", "neck"), hr_scale=2.0).train()
    d.register_forward_hook(lambda m, i, o: None)  # one more frame inside nn.Module.__call__
    images, targets = torch.rand(2, 3, 32, 32), [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]])}] * 2
    hr = torch.nn.functional.interpolate(images, scale_factor=2.0, mode="bilinear")
    # projectors created at the first step (late), and hr_scale unused since an HR view is given
    d(images, targets, hr_images=hr, hr_targets=[{"boxes": t["boxes"] * 2} for t in targets])
    ours = [w for w in recwarn.list if str(w.message).startswith("LRDet:")]
    kinds = ("created at the first training step", "hr_scale=2 is not used")
    assert {k for w in ours for k in kinds if k in str(w.message)} == set(kinds)
    assert all(w.filename == __file__ for w in ours), [(w.filename, str(w.message)[:40]) for w in ours]

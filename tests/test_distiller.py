"""BridgeDistiller: the bridge branch, alignment, the teacher, BN, inheriting, adapters, saving, errors."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import lrdet_core.align as align_mod
from lrdet_core import (BridgeDistiller, InputError, LevelMatchError, SplitPointError, SplitPoints, inherit_weights,
                        resample_to_hr)
from reference import ref_cwd, ref_l1, ref_mse
from tiny import TinyDetector, batch, faster_rcnn, fcos, mask_rcnn, retinanet, seeded

torch.set_num_threads(2)
TINY_SPLIT = SplitPoints(backbone="backbone", neck="neck")



def _exhaustive_sampling(model):
    """R-CNN samplers draw random subsets; sampling every anchor/proposal makes the losses deterministic."""
    for sampler in (model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler):
        sampler.batch_size_per_image, sampler.positive_fraction = 10 ** 6, 1.0
    return model


# --- 1. bridge branch ------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [retinanet, fcos, faster_rcnn, mask_rcnn])
def test_bridge_on_genuine_hr_features_equals_real_hr_forward(builder):
    # Student and teacher at the same size: the bridge then receives the genuine HR backbone features
    # (resampling is the identity), so its losses must be those of a plain HR forward of the student.
    masks = builder is mask_rcnn
    student = seeded(builder, size=128)
    teacher = seeded(builder, seed=1, size=128)
    if builder in (faster_rcnn, mask_rcnn):
        _exhaustive_sampling(student)
    images, targets = batch(masks=masks)
    d = BridgeDistiller(student, teacher).train()
    out = d(images, targets)
    plain = student(images, targets)
    bridge = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("bridge/")}
    assert set(bridge) == set(plain)
    for k in plain:
        torch.testing.assert_close(bridge[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bridge_loss_alone_reaches_every_trainable_student_parameter():
    student, teacher = seeded(retinanet, size=96), seeded(retinanet, seed=1, size=192)
    d = BridgeDistiller(student, teacher).train()
    images, targets = batch(n_boxes=4)
    out = d(images, targets)
    sum(v for k, v in out.items() if k.startswith("bridge/")).backward()
    dead = [n for n, p in student.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert dead == []
    assert any(p.grad is not None for p in student.backbone.body.parameters())


def _neck_recorder(model):
    """Every output of ``model.backbone.fpn``, as a list of detached levels per call."""
    calls = []
    model.backbone.fpn.register_forward_hook(lambda m, i, o: calls.append([v.detach() for v in o.values()]))
    return calls


def test_bridge_runs_at_hr_and_objective_is_the_sum():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)
    plain = copy.deepcopy(student).train()
    d = BridgeDistiller(student, teacher, alpha=0.005).train()  # a fixed alpha: "auto" would set distill/mse itself
    s_necks, t_necks = _neck_recorder(student), _neck_recorder(teacher)
    images, targets = batch(sizes=((100, 100), (100, 100)))
    out = d(images, targets)
    assert [n[0].shape[-2:] for n in s_necks] == [(8, 8), (16, 16)]  # LR pass, then the bridge at HR
    assert set(out) == {"lr/classification", "lr/bbox_regression", "bridge/classification",
                        "bridge/bbox_regression", "distill/mse"}
    # The terms: the student's own losses at LR, and alpha * MSE_sum(bridge neck, teacher neck) over the levels.
    ref = plain(images, targets)
    for k in ref:
        torch.testing.assert_close(out[f"lr/{k}"], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    want = 0.005 * sum(ref_mse(s, t) for s, t in zip(s_necks[1], t_necks[0]))
    torch.testing.assert_close(out["distill/mse"].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)


# --- 2. alignment ----------------------------------------------------------------------------------
def test_resample_gradient_and_identity():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resample_to_hr(t, (40, 56), (80, 112), (10, 14),
                                                             [(40, 50), (33, 56)], [(80, 100), (66, 112)]), (x,))
    assert resample_to_hr(x, (40, 56), (40, 56), (5, 7), [(40, 56)] * 2, [(40, 56)] * 2) is x


@pytest.mark.parametrize("multiscale", [False, True])
def test_distiller_aligns_with_each_images_own_sizes(monkeypatch, multiscale):
    student = seeded(retinanet, size=96)
    if multiscale:  # Table 3: a new LR size at every step (max_size high enough not to cap them all to one)
        student.transform.min_size, student.transform.max_size = (64, 80, 96), 200
    teacher = seeded(retinanet, seed=1, size=192)
    calls = []
    real = align_mod.resample_to_hr
    monkeypatch.setattr(align_mod, "resample_to_hr", lambda *a: calls.append(a) or real(*a))
    d = BridgeDistiller(student, teacher).train()
    images, targets = batch(sizes=((100, 150), (150, 100)))
    lr_sizes = []
    torch.manual_seed(0)  # the transform draws each step's size from torch's RNG
    for step in range(4):
        calls.clear()
        tv = {}
        h1 = student.transform.register_forward_hook(lambda m, i, o: tv.update(lr=o[0].image_sizes))
        h2 = teacher.transform.register_forward_hook(lambda m, i, o: tv.update(hr=o[0].image_sizes))
        d(images, targets)
        h1.remove(), h2.remove()
        assert calls, "the bridge did not resample"
        for feat, lr_canvas, hr_canvas, out_hw, lr_s, hr_s, origin in calls:
            assert origin == (0, 0)  # no bridge_crop
            assert [tuple(s) for s in lr_s] == [tuple(s) for s in tv["lr"]]
            assert [tuple(s) for s in hr_s] == [tuple(s) for s in tv["hr"]]
        lr_sizes.append(tuple(tv["lr"][0]))
    assert tv["hr"] == [(128, 192), (192, 128)]
    if multiscale:  # short sides drawn from min_size; with this seed two different ones in 4 steps
        assert len(set(lr_sizes)) >= 2 and set(lr_sizes) <= {(64, 96), (80, 120), (96, 144)}, lr_sizes
    else:
        assert lr_sizes == [(64, 96)] * 4


# --- 3. HR view -------------------------------------------------------------------------------------
@pytest.mark.parametrize("hr_source", ["teacher", "lr"])
def test_hr_view_comes_from_the_teachers_transform(hr_source):
    student = seeded(mask_rcnn, size=64, max_size=256)
    teacher = seeded(mask_rcnn, seed=1, size=128, max_size=256)
    got = {}
    teacher.transform.register_forward_hook(lambda m, i, o: got.update(inp=i[0], out=o))
    d = BridgeDistiller(student, teacher, hr_source=hr_source).train()
    images, targets = batch(masks=True)
    out = d(images, targets)
    hr_list, hr_targets = got["out"]
    assert hr_list.image_sizes == [(128, 192), (192, 128)]
    assert hr_targets[0]["masks"].shape[-2:] == (128, 192)
    # boxes scale with the image: 100x150 raw -> 128x192 HR
    torch.testing.assert_close(hr_targets[0]["boxes"], targets[0]["boxes"] * 1.28, rtol=1e-4, atol=1e-3)
    raw_h = got["inp"][0].shape[-2]
    assert raw_h == (100 if hr_source == "teacher" else 64)  # "lr": the teacher upsamples the LR image
    assert "bridge/loss_mask" in out and torch.isfinite(out["bridge/loss_mask"])


def test_explicit_hr_view_and_pairing_errors():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)
    d = BridgeDistiller(student, teacher).train()
    images, targets = batch()
    hr_images = [F.interpolate(i[None], scale_factor=2.0, mode="bilinear")[0] for i in images]
    hr_targets = [{**t, "boxes": t["boxes"] * 2} for t in targets]
    got = []
    teacher.transform.register_forward_hook(lambda m, i, o: got.append((i, o)))
    out = d(images, targets, hr_images=hr_images, hr_targets=hr_targets)
    ((t_images, t_targets), (hr_list, hr_out)), = got  # the teacher's transform saw the given HR view, as given
    assert all(a is b for a, b in zip(t_images, hr_images))
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(t_targets, hr_targets))
    ref_list, ref_targets = teacher.transform(hr_images, copy.deepcopy(hr_targets))
    assert hr_list.image_sizes == ref_list.image_sizes == [(85, 128), (128, 85)]
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(hr_out, ref_targets))
    assert {k for k in out if k.startswith("bridge/")} == {"bridge/classification", "bridge/bbox_regression"}
    with pytest.raises(InputError, match="hr_images and hr_targets together"):
        d(images, targets, hr_images=hr_images)
    with pytest.raises(InputError, match="expected as many targets as images, but got 2 images and 1 targets"):
        d(images, targets[:1])


# --- 4. the teacher ---------------------------------------------------------------------------------
def test_teacher_is_frozen_stops_at_its_neck_and_never_changes():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    head_calls = []
    teacher.head.register_forward_hook(lambda *a: head_calls.append(1))
    d = BridgeDistiller(student, teacher)
    grad_modes = []  # the teacher runs under no_grad: no graph is built through it, even for frozen weights
    for part in (teacher.backbone.body, teacher.backbone.fpn):
        part.register_forward_hook(lambda *a: grad_modes.append(torch.is_grad_enabled()))
    d.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in d.parameters() for q in teacher.parameters())
    opt = torch.optim.SGD(d.parameters(), lr=0.01, momentum=0.9)
    for seed in range(3):
        out = d(*batch(seed=seed))
        opt.zero_grad()
        sum(out.values()).backward()
        opt.step()
    assert head_calls == []
    assert len(grad_modes) == 6 and not any(grad_modes)  # backbone and neck, three steps
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    d.eval()
    d(batch()[0])
    assert head_calls == []  # eval runs the student only


def test_unreached_split_point_is_a_clear_error():
    student, teacher = TinyDetector(), TinyDetector()
    teacher.unused = torch.nn.Identity()
    d = BridgeDistiller(student, teacher, split_points=TINY_SPLIT, hr_scale=2.0,
                        teacher_split_points=SplitPoints(backbone="backbone", neck="unused")).train()
    images = torch.rand(2, 3, 32, 32)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]])}] * 2
    with pytest.raises(SplitPointError, match="teacher's neck split point 'unused' was never reached"):
        d(images, targets)


# --- 5. BatchNorm in the shared neck and head ------------------------------------------------------------
def test_bridge_does_not_touch_batchnorm_running_stats():
    torch.manual_seed(0)
    student, teacher = TinyDetector(), TinyDetector()
    plain = copy.deepcopy(student).train()
    images = torch.rand(2, 3, 32, 32)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]])}] * 2
    BridgeDistiller(student, teacher, split_points=TINY_SPLIT, hr_scale=2.0).train()(images, targets)
    plain(images, targets)
    for (k, a), (_, b) in zip(student.state_dict().items(), plain.state_dict().items()):
        if "running" in k or "num_batches" in k:
            assert torch.equal(a, b), k
    assert student.neck.lat[0][1].num_batches_tracked.item() == 1


# --- 6. weight inheriting ------------------------------------------------------------------------------
def test_inherit_weights_copies_matching_tensors_and_reports_the_rest():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128, num_classes=5)
    report = inherit_weights(student, teacher)
    s, t = student.state_dict(), teacher.state_dict()
    assert report.copied and all(torch.equal(s[k], t[k]) for k in report.copied)
    names = [m[0] for m in report.shape_mismatch]
    assert "head.classification_head.cls_logits.weight" in names
    assert not torch.equal(s["head.classification_head.cls_logits.weight"][:1],
                           t["head.classification_head.cls_logits.weight"][:1])
    student2 = seeded(retinanet, seed=2, size=64)
    d = BridgeDistiller(student2, teacher, inherit=True)
    assert d.inherit_report.copied == report.copied
    assert torch.equal(student2.backbone.body.conv1.weight, teacher.backbone.body.conv1.weight)


# --- 7. multi-teacher, 8. heterogeneous --------------------------------------------------------------------
def test_one_bridge_per_teacher_with_namespaced_keys():
    student = seeded(retinanet, size=64)
    teachers = {"t128": seeded(retinanet, seed=1, size=128), "t96": seeded(retinanet, seed=2, size=96)}
    seen = []
    d = BridgeDistiller(student, teachers).train()
    student.backbone.fpn.register_forward_hook(lambda m, i, o: seen.append(o["0"].shape[-1]))
    out = d(*batch(sizes=((96, 96), (96, 96))))
    assert {"bridge.t128/classification", "bridge.t96/classification", "distill.t128/mse",
            "distill.t96/mse", "lr/classification"} <= set(out)
    assert seen == [8, 16, 12]
    assert set(BridgeDistiller(student, [teachers["t128"], teachers["t96"]]).train()(*batch())) >= {"distill.t0/mse",
                                                                                                  "distill.t1/mse"}


def test_heterogeneous_teacher_matches_by_stride_and_projects_channels():
    student = seeded(retinanet, size=64, channels=32)          # strides 8..128: '0','1','2','p6','p7'
    teacher = seeded(faster_rcnn, seed=1, size=128, channels=48)  # strides 4..64: '0','1','2','3','pool'
    calls = []

    def recording_loss(s, t, ctx):
        calls.append((ctx.strides, [x.shape[1] for x in s]))
        return sum(((a - b) ** 2).sum() for a, b in zip(s, t))

    with pytest.warns(UserWarning, match=r"levels with stride \[4, 128\] have no partner"):
        d = BridgeDistiller(student, teacher, loss=recording_loss, alpha=1.0)
    assert sorted(d.projectors) == ["teacher_s16", "teacher_s32", "teacher_s64", "teacher_s8"]
    assert d.projectors["teacher_s8"].weight.shape == (48, 32, 1, 1)
    proj = {id(p) for p in d.projectors.parameters()}
    assert proj <= {id(p) for p in d.parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, at construction
        out = d.train()(*batch())
    assert calls == [([8, 16, 32, 64], [48, 48, 48, 48])]
    out["distill/recording_loss"].backward()
    assert d.projectors["teacher_s8"].weight.grad is not None


def test_unmatchable_levels_are_a_clear_error():
    student, teacher = TinyDetector(), TinyDetector()
    teacher.backbone.s1.insert(0, torch.nn.AvgPool2d(8))  # every teacher level at 8x the student's stride
    d = BridgeDistiller(student, teacher, split_points=TINY_SPLIT, hr_scale=2.0).train()
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]])}] * 2
    with pytest.raises(LevelMatchError, match=r"student's neck has strides \[4, 8, 16\] and the teacher's has "
                                              r"\[32, 64, 128\]"):
        d(images, targets)


# --- 9/10. adapters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("student_b,teacher_b", [(fcos, fcos), (faster_rcnn, faster_rcnn), (faster_rcnn, retinanet),
                                                 (retinanet, faster_rcnn)])
def test_adapter_training_steps(student_b, teacher_b):
    student, teacher = seeded(student_b, size=64), seeded(teacher_b, seed=1, size=128)
    if student_b is faster_rcnn:
        _exhaustive_sampling(student)
    plain = copy.deepcopy(student).train()
    images, targets = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = BridgeDistiller(student, teacher).train()
        out = d(images, targets)
    ref = plain(images, targets)  # the LR pass is the student's own forward
    assert {k for k in out if k.startswith("lr/")} == {f"lr/{k}" for k in ref}
    assert {k for k in out if k.startswith("bridge/")} == {f"bridge/{k}" for k in ref}
    for k in ref:
        torch.testing.assert_close(out[f"lr/{k}"], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert "distill/mse" in out and out["distill/mse"] > 0
    sum(out.values()).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in student.parameters() if p.requires_grad)


def test_mask_rcnn_bridge_rois_knob():
    student, teacher = seeded(mask_rcnn, size=64), seeded(mask_rcnn, seed=1, size=128)
    seen = []
    student.roi_heads.register_forward_pre_hook(lambda m, a: seen.append(m.fg_bg_sampler.batch_size_per_image))
    out = BridgeDistiller(student, teacher, bridge_rois=16).train()(*batch(masks=True))
    assert seen == [512, 16] and student.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert {"lr/loss_mask", "bridge/loss_mask"} <= set(out)


def test_upsample_distillation_mode_has_no_bridge():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)
    d = BridgeDistiller(student, teacher, bridge=False, alpha=0.005).train()
    s_necks, t_necks, lists = _neck_recorder(student), _neck_recorder(teacher), {}
    student.transform.register_forward_hook(lambda m, i, o: lists.update(lr=o[0]))
    teacher.transform.register_forward_hook(lambda m, i, o: lists.update(hr=o[0]))
    out = d(*batch())
    assert not any(k.startswith("bridge") for k in out) and "distill/mse" in out
    assert len(s_necks) == 1  # the LR pass only
    # alpha * MSE_sum(LR neck resampled per image onto the teacher's grid, teacher neck)
    lr, hr = lists["lr"], lists["hr"]
    want = 0.005 * sum(ref_mse(resample_to_hr(s, tuple(lr.tensors.shape[-2:]), tuple(hr.tensors.shape[-2:]),
                                              tuple(t.shape[-2:]), lr.image_sizes, hr.image_sizes), t)
                       for s, t in zip(s_necks[0], t_necks[0]))
    torch.testing.assert_close(out["distill/mse"].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)
    out["distill/mse"].backward()
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad is not None


# --- 11. saving ---------------------------------------------------------------------------------------
def test_state_dict_has_no_teacher_and_student_export_loads_strictly():
    keep_all = dict(score_thresh=0.0, detections_per_img=20)  # untrained scores are ~0.01: keep detections
    student, teacher = seeded(retinanet, size=64, **keep_all), seeded(retinanet, seed=1, size=128, channels=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = BridgeDistiller(student, teacher)
    assert not any(k.startswith("teacher") or "_teachers" in k for k in d.state_dict())
    assert set(d.state_dict()) == ({f"student.{k}" for k in student.state_dict()} | {"auto_alpha"}  # the default
                                   | {f"projectors.{k}" for k in d.projectors.state_dict()})
    fresh = retinanet(size=64, **keep_all)
    fresh.load_state_dict(d.student_state_dict(), strict=True)
    fresh.eval(), d.eval()
    images = batch()[0]
    a, b = fresh(images), d(images)
    assert len(a) == len(b) == 2 and all(len(x["boxes"]) == 20 for x in a)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("boxes", "scores", "labels"))


# --- 12. import hygiene -------------------------------------------------------------------------------
def test_core_import_pulls_in_neither_torchvision_nor_triton():
    code = "import sys, lrdet_core; print(sorted(m for m in ('torchvision', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- 13. bad input ------------------------------------------------------------------------------------
def test_unknown_module_path_lists_close_matches():
    with pytest.raises(SplitPointError, match=r"no submodule 'backbone.fpm'.*Close matches: 'backbone.fpn'"):
        BridgeDistiller(retinanet(size=64), retinanet(size=128),
                        split_points=SplitPoints(backbone="backbone.body", neck="backbone.fpm"))


def test_custom_model_needs_split_points_or_an_hr_view():
    with pytest.raises(SplitPointError, match="cannot find the split points of the student"):
        BridgeDistiller(TinyDetector(), TinyDetector())
    d = BridgeDistiller(TinyDetector(), TinyDetector(), split_points=TINY_SPLIT).train()
    with pytest.raises(InputError, match="hr_scale"):
        d(torch.rand(1, 3, 32, 32), [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]])}])


def test_split_point_returning_a_non_tensor_is_rejected():
    class Weird(TinyDetector):
        def forward(self, images, targets=None):
            return super().forward(images, targets)

    student = Weird()
    student.backbone.register_forward_hook(lambda m, i, o: "not a tensor")
    d = BridgeDistiller(student, TinyDetector(), split_points=TINY_SPLIT, hr_scale=2.0).train()
    with pytest.raises(SplitPointError, match="to return a tensor, a list/tuple of tensors or a dict of tensors, "
                                              "but it returned str"):
        d(torch.rand(1, 3, 32, 32), [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]])}])


def test_custom_model_with_explicit_hr_view_and_inplace_ops_after_the_split_point():
    torch.manual_seed(0)
    student, teacher = TinyDetector(inplace_relu=True), TinyDetector()
    d = BridgeDistiller(student, teacher, split_points=TINY_SPLIT).train()
    images = torch.randn(2, 3, 32, 32)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]])}] * 2
    hr = F.interpolate(images, scale_factor=2.0, mode="bilinear")
    recorded = []
    real = align_mod.resample_to_hr
    align_mod.resample_to_hr = lambda f, *a: recorded.append(f.detach().clone()) or real(f, *a)
    try:
        out = d(images, targets, hr_images=hr, hr_targets=[{"boxes": t["boxes"] * 2} for t in targets])
    finally:
        align_mod.resample_to_hr = real
    with torch.no_grad():
        genuine = student.backbone(images)
    assert all(torch.equal(r, g) for r, g in zip(recorded, genuine))  # the in-place ReLU did not reach them
    assert set(out) == {"lr/heat", "bridge/heat", "distill/mse"}


# --- losses through the distiller (issue 3) ------------------------------------------------------------
@pytest.mark.parametrize("loss", ["mse", "l1", "cwd", "fgd"])
def test_training_step_with_each_loss(loss):
    from lrdet_core import RECOMMENDED_ALPHA
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)
    d = BridgeDistiller(student, teacher, loss=loss, alpha=None).train()  # None: the loss's recommended alpha
    assert d.alpha == RECOMMENDED_ALPHA[loss]
    if loss == "fgd":  # built at construction (the probe knows the channels): visible to the optimizer
        assert d.losses["teacher"].preset == "retinanet"
        fgd_params = list(d.losses.parameters())
        assert fgd_params and {id(p) for p in fgd_params} <= {id(p) for p in d.parameters()}
        assert any(k.startswith("losses.teacher.") for k in d.state_dict())
    opt = torch.optim.SGD(d.parameters(), lr=1e-4)
    seen = []
    d.losses["teacher"].register_forward_pre_hook(lambda m, args: seen.append(args))
    out = d(*batch())
    assert f"distill/{loss}" in out and out[f"distill/{loss}"] > 0
    ref = {"mse": ref_mse, "l1": ref_l1, "cwd": ref_cwd}.get(loss)
    if ref is not None:  # alpha * the loss summed over the matched levels (FGD's value: tests/test_losses.py)
        (s_levels, t_levels, _), = seen
        want = d.alpha * sum(ref(s, t) for s, t in zip(s_levels, t_levels))
        torch.testing.assert_close(out[f"distill/{loss}"].double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-4, atol=0)
    opt.zero_grad()
    sum(out.values()).backward()
    torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
    opt.step()
    assert all(torch.isfinite(v) for v in d(*batch(seed=1)).values())


def test_unknown_loss_name_lists_the_valid_ones():
    from lrdet_core import LossError
    with pytest.raises(LossError, match="unknown loss 'msee'.*'mse', 'l1', 'cwd', 'fgd'"):
        BridgeDistiller(retinanet(size=64), retinanet(size=128), loss="msee")


def test_nonfinite_distillation_term_names_the_level():
    from lrdet_core import NonFiniteError
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)

    def loss(s, t, ctx):  # infinite only at stride 16
        return sum((a - b).pow(2).sum() * (float("inf") if st == 16 else 1.0) for a, b, st in zip(s, t, ctx.strides))

    with pytest.raises(NonFiniteError, match=r"'distill/loss' is inf; non-finite at level\(s\) 1 \(stride 16\)"):
        BridgeDistiller(student, teacher, loss=loss).train()(*batch())
    with pytest.warns(UserWarning, match="non-finite"):
        BridgeDistiller(student, teacher, loss=loss, check_finite="warn").train()(*batch())


def test_recommended_alpha_warns_once_when_distillation_dwarfs_detection():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)
    d = BridgeDistiller(student, teacher, alpha=None).train()  # untrained nets: 0.005 * MSE_sum is ~1e4 x L_det
    with pytest.warns(UserWarning, match=r"distill/mse = .* times the LR detection loss .* alpha=0.005\. alpha=.* "
                                         r"would make them equal"):
        out = d(*batch())
    ratio = out["distill/mse"].item() / sum(v.item() for k, v in out.items() if k.startswith("lr/"))
    assert ratio > 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d(*batch(seed=1))  # once only
        BridgeDistiller(student, teacher, alpha=0.005).train()(*batch())  # an explicit alpha is trusted


def test_default_alpha_is_auto_and_puts_distillation_at_half_the_detection_loss():
    # The default must not diverge where 0.005 * MSE_sum would be ~1e4 x L_det (as in the test above): it is
    # measured at the first step, alpha * L_FD = 0.5 * L_det(LR), and no balance warning second-guesses it.
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)
    d = BridgeDistiller(student, teacher).train()
    assert d.alpha == "auto" and d.alphas == {"teacher": None}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = d(*batch())
    messages = [str(w.message) for w in seen]
    assert any("alpha='auto' at the first step" in m for m in messages), messages
    assert not any("times the LR detection loss" in m for m in messages), messages
    det = sum(v.double() for k, v in out.items() if k.startswith("lr/"))
    torch.testing.assert_close(out["distill/mse"].double(), 0.5 * det, rtol=1e-6, atol=0)
    alpha = d.alphas["teacher"]
    assert alpha is not None and alpha < 0.005 / 100  # far below the paper's value on these untrained nets

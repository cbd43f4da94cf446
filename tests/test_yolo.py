"""Ultralytics YOLO as a detector family: the guarantees of the torchvision pairs, value by value.

Tiny YOLOv8/YOLO11 models (the yaml's layers at 1/16 of YOLOv8n's width, no weights) on 64 px LR and 128 px HR
batches with mixed aspect ratios, so that LR and HR values, and one image's values and another's, cannot be
mistaken for each other.
"""
import copy
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("ultralytics")
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, yaml_model_load  # noqa: E402

from lrdet_core import BridgeDistiller, SplitPoints, resample_to_hr  # noqa: E402
from lrdet_core.adapters import adapter_for  # noqa: E402
from lrdet_core.adapters.ultralytics import (PAD_VALUE, UltralyticsAdapter, YoloCut, from_yolo_batch,  # noqa: E402
                                             pad_images, run_layers, save_checkpoint, to_yolo_batch, yolo_cut)
from lrdet_core.errors import InputError, LRDetError, SplitPointError  # noqa: E402
from tiny import RecordingLoss  # noqa: E402

torch.set_num_threads(2)
NC = 3


def tiny(width=0.0625, yaml="yolov8n.yaml", seed=0, nc=NC):
    """A YOLO model from its yaml at ``width`` of the full model's channels (at least 8 per layer)."""
    cfg = copy.deepcopy(yaml_model_load(yaml))
    cfg["scales"], cfg["scale"] = {"t": [0.33, width, 1024]}, "t"
    torch.manual_seed(seed)
    return DetectionModel(cfg, nc=nc, verbose=False)


def lr_batch():
    """Two LR images of different shapes (padded to a 64 x 96 canvas) and their boxes."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 40, 96, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 5.0, 50.0, 35.0], [1.0, 1.0, 20.0, 12.0]]),
                "labels": torch.tensor([0, 1])}]
    return images, targets


def hr_batch():
    """An explicit HR view: image 0 at 2x, image 1 at 2.4x / 2x (per-image scales, not one canvas ratio)."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 128, generator=g), torch.rand(3, 96, 192, generator=g)]
    targets = [{"boxes": torch.tensor([[9.0, 11.0, 61.0, 83.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[21.0, 13.0, 99.0, 85.0], [3.0, 2.0, 41.0, 30.0]]),
                "labels": torch.tensor([0, 1])}]
    return images, targets



def _record_criterion(adapter):
    """Wrap the adapter's criterion: the batch dict and the Detect inputs of each loss call, in pass order."""
    seen = []
    real = adapter.criterion

    def criterion():
        crit = real()

        def call(preds, batch):
            seen.append({"batch": {k: v.detach().clone() for k, v in batch.items()},
                         "feats": [f.detach().clone() for f in preds["feats"]]})
            return crit(preds, batch)
        call.loss_names = crit.loss_names
        return call
    adapter.criterion = criterion
    return seen


def _pre_hook(module, store):
    return module.register_forward_pre_hook(lambda m, inputs: store.append(inputs[0]))


# --- 1. the family and the cut ------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml, cut", [
    ("yolov8n.yaml", YoloCut(backbone=(4, 6, 9), neck_start=10, neck=(15, 18, 21), head=22)),
    ("yolo11n.yaml", YoloCut(backbone=(4, 6, 10), neck_start=11, neck=(16, 19, 22), head=23)),
    ("yolo26n.yaml", YoloCut(backbone=(4, 6, 10), neck_start=11, neck=(16, 19, 22), head=23)),
])
def test_family_is_detected_and_the_cut_read_from_the_layer_list(yaml, cut):
    model = tiny(yaml=yaml)
    a = adapter_for(model, None, "student")
    assert isinstance(a, UltralyticsAdapter) and a.cut == cut == yolo_cut(model)
    # The bridge's routing (run_layers) is the model's own: from layer 0 it reproduces its forward exactly.
    model.eval()
    x = torch.rand(1, 3, 64, 96)
    y = [None] * len(model.model)
    y[-1] = x  # y[start - 1]: the first layer's input
    torch.testing.assert_close(run_layers(model.model, y, 0)[0], model(x)[0], rtol=0, atol=0)


def test_the_readmes_lines_train_a_yolov8n_student_with_a_yolov8s_teacher():
    from ultralytics import YOLO

    distiller = BridgeDistiller(YOLO("yolov8n.yaml").model, YOLO("yolov8s.yaml").model, hr_scale=2.0)
    images, targets = lr_batch()
    ref = copy.deepcopy(distiller.student)
    ref.args = get_cfg()
    want, _ = ref.loss(to_yolo_batch(pad_images(images, 32)[0], targets))  # what Ultralytics' trainer sums
    loss_dict = distiller(images, targets)
    sum(loss_dict.values()).backward()
    assert sorted(loss_dict) == ["bridge/box", "bridge/cls", "bridge/dfl", "distill/mse", "lr/box", "lr/cls",
                                 "lr/dfl"]
    torch.testing.assert_close(torch.stack([loss_dict[f"lr/{k}"] for k in ("box", "cls", "dfl")]), want,
                               rtol=1e-6, atol=0)
    assert [tuple(p.shape[:2]) for p in distiller.projectors.parameters() if p.dim() == 4] == \
        [(128, 64), (256, 128), (512, 256)]  # n -> s widths at P3-P5


# --- 2. inputs ----------------------------------------------------------------------------------------------
def test_torchvision_and_yolo_batches_convert_both_ways():
    images, targets = lr_batch()
    img, sizes = pad_images(images, 32)
    assert img.shape == (2, 3, 64, 96) and sizes == [(64, 64), (40, 96)]
    assert torch.equal(img[1, :, :40], images[1]) and bool((img[1, :, 40:] == PAD_VALUE).all())
    assert torch.equal(img[0, :, :, :64], images[0]) and bool((img[0, :, :, 64:] == PAD_VALUE).all())
    batch = to_yolo_batch(img, targets)
    assert batch["batch_idx"].tolist() == [0.0, 1.0, 1.0] and batch["cls"].tolist() == [[2.0], [0.0], [1.0]]
    # normalised xywh of [4, 6, 30, 40] on the 64 x 96 canvas
    torch.testing.assert_close(batch["bboxes"][0], torch.tensor([17.0 / 96, 23.0 / 64, 26.0 / 96, 34.0 / 64]))
    back_img, back = from_yolo_batch(batch)
    assert back_img is img
    for t, b in zip(targets, back):
        torch.testing.assert_close(b["boxes"], t["boxes"])
        assert torch.equal(b["labels"], t["labels"])
    # A dataloader's uint8 image is scaled as Ultralytics' trainer scales it.
    u8 = dict(batch, img=(img * 255).round().to(torch.uint8))
    torch.testing.assert_close(from_yolo_batch(u8)[0], u8["img"].float() / 255)


def test_a_yolo_batch_dict_trains_exactly_like_its_torchvision_form():
    images, targets = lr_batch()
    img = pad_images(images, 32)[0]
    runs = []
    for form in ("torchvision", "yolo"):
        d = BridgeDistiller(tiny(), tiny(seed=1), hr_scale=2.0, alpha=1.0).train()
        with torch.random.fork_rng():
            out = d(img, targets) if form == "torchvision" else d(to_yolo_batch(img, targets))
        runs.append({k: v.detach() for k, v in out.items()})
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0, msg=k)


# --- 3. keys, values and gradients --------------------------------------------------------------------------
def test_lr_losses_are_ultralytics_own_and_every_term_reaches_its_parameters():
    student, teacher = tiny(), tiny(width=0.125, seed=1)  # different widths: projectors
    d = BridgeDistiller(student, teacher, hr_scale=2.0).train()
    assert len(list(d.projectors.parameters())) == 6  # built at construction (probe): before the optimizer
    images, targets = lr_batch()
    ref = copy.deepcopy(student)
    ref.args = get_cfg()
    want, _ = ref.loss(to_yolo_batch(pad_images(images, 32)[0], targets))  # what Ultralytics' trainer sums
    out = d(images, targets)
    assert sorted(out) == ["bridge/box", "bridge/cls", "bridge/dfl", "distill/mse", "lr/box", "lr/cls", "lr/dfl"]
    torch.testing.assert_close(torch.stack([out["lr/box"], out["lr/cls"], out["lr/dfl"]]), want, rtol=1e-6, atol=0)
    first, detect = student.model[0].conv.weight, student.model[-1]
    for key in out:
        head = (detect.cv3 if key.endswith("cls") else detect.cv2)[0][0].conv.weight  # the class / box branch
        grads = torch.autograd.grad(out[key], [first, head] + list(d.projectors.parameters()),
                                    allow_unused=True, retain_graph=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0, key  # every term reaches the first layer
        if key.startswith("distill"):
            assert grads[1] is None and all(g is not None and g.abs().sum() > 0 for g in grads[2:])
        else:
            assert grads[1].abs().sum() > 0 and all(g is None for g in grads[2:]), key
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # The model is unchanged but for its own criterion, built once (as BaseModel.loss builds it) and kept.
    assert not hasattr(student, "args") and student.criterion is d.adapter.criterion()


def test_yolo11_pair_of_two_sizes_trains_without_creating_parameters_late():
    student, teacher = tiny(yaml="yolo11n.yaml"), tiny(yaml="yolo11n.yaml", width=0.125, seed=1)
    d = BridgeDistiller(student, teacher, hr_scale=2.0, alpha=1e-3).train()
    n_params = len(list(d.parameters()))
    images, targets = lr_batch()
    ref = copy.deepcopy(student)
    ref.args = get_cfg()
    want, _ = ref.loss(to_yolo_batch(pad_images(images, 32)[0], targets))
    out = d(images, targets)
    assert len(list(d.parameters())) == n_params
    sum(out.values()).backward()
    torch.testing.assert_close(torch.stack([out["lr/box"], out["lr/cls"], out["lr/dfl"]]), want, rtol=1e-6, atol=0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.projectors.parameters())


# --- 3b. YOLO26: the end-to-end head and its E2ELoss ---------------------------------------------------------
@pytest.mark.slow
def test_the_issues_lines_train_a_yolo26n_student_with_a_yolo26s_teacher():
    from ultralytics import YOLO

    student, teacher = YOLO("yolo26n.yaml").model, YOLO("yolo26s.yaml").model
    distiller = BridgeDistiller(student, teacher, hr_scale=2.0)
    images, targets = lr_batch()
    ref = copy.deepcopy(student)
    ref.args = get_cfg()  # as Ultralytics' trainer sets it (the wrapper's is a dict of overrides)
    want, items = ref.loss(to_yolo_batch(pad_images(images, 32)[0], targets))  # Ultralytics' own loss
    loss_dict = distiller(images, targets)
    sum(loss_dict.values()).backward()
    assert sorted(loss_dict) == ["bridge/box", "bridge/cls", "bridge/l1", "distill/mse", "lr/box", "lr/cls", "lr/l1"]
    assert type(student.criterion).__name__ == "E2ELoss" and list(items) == ["box_loss", "cls_loss", "l1_loss"]
    torch.testing.assert_close(torch.stack([loss_dict[f"lr/{k}"] for k in ("box", "cls", "l1")]), want,
                               rtol=1e-5, atol=0)
    assert [tuple(p.shape[:2]) for p in distiller.projectors.parameters() if p.dim() == 4] == \
        [(128, 64), (256, 128), (512, 256)]  # n -> s widths at P3-P5
    assert all(p.grad is None for p in teacher.parameters())


def _e2e(crit, preds, batch, o2m):
    """E2ELoss's vector written out: ``o2m`` times the one-to-many head's terms plus ``1 - o2m`` times the
    one-to-one head's (``E2ELoss.total`` is 1)."""
    return o2m * crit.one2many.loss(preds["one2many"], batch)[0] + (1 - o2m) * crit.one2one.loss(preds["one2one"],
                                                                                                 batch)[0]


def test_yolo26_terms_are_its_e2e_loss_and_a_schedule_step_on_model_criterion_reaches_both_passes():
    student = tiny(yaml="yolo26n.yaml")
    d = BridgeDistiller(student, tiny(yaml="yolo26n.yaml", width=0.125, seed=1), alpha=1.0).train()
    preds = []
    student.model[-1].register_forward_hook(lambda m, inp, out: preds.append(out))  # the LR pass, then the bridge
    images, targets = lr_batch()
    hr_images, hr_targets = hr_batch()
    lr_b, hr_b = to_yolo_batch(pad_images(images, 32)[0], targets), to_yolo_batch(pad_images(hr_images, 32)[0],
                                                                                  hr_targets)
    epochs = get_cfg().epochs  # the schedule's length: Ultralytics' default, the model has no args
    for n in (0, 40):  # E2ELoss.decay: o2m falls linearly from 0.8 to 0.1 over epochs - 1 updates
        crit = d.adapter.criterion()
        for _ in range(n):
            student.criterion.update()  # what Ultralytics' trainer calls at the end of each epoch
        o2m = 0.1 + 0.7 * (1 - n / (epochs - 1))
        preds.clear()
        out = d(images, targets, hr_images=hr_images, hr_targets=copy.deepcopy(hr_targets))
        assert student.criterion is crit and type(crit).__name__ == "E2ELoss" and len(preds) == 2
        for kind, p, b in (("lr", preds[0], lr_b), ("bridge", preds[1], hr_b)):
            got = torch.stack([out[f"{kind}/{k}"] for k in ("box", "cls", "l1")])
            torch.testing.assert_close(got, _e2e(crit, p, b, o2m), rtol=1e-5, atol=1e-6, msg=f"{kind}, {n} updates")
    # Every term reaches the heads it trains: the one-to-many head feeds the backbone, the one-to-one head reads
    # detached features (Detect's own rule) but its class branch is trained by the cls terms.
    detect, first = student.model[-1], student.model[0].conv.weight
    for key in out:
        grads = torch.autograd.grad(out[key], [first, detect.cv3[0][2].weight, detect.one2one_cv3[0][2].weight],
                                    allow_unused=True, retain_graph=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0, key
        if key.endswith("cls"):
            assert all(g is not None and g.abs().sum() > 0 for g in grads[1:]), key
        if key.startswith("distill"):
            assert grads[1] is None and grads[2] is None, key


@pytest.mark.parametrize("s_yaml, t_yaml", [("yolo26n.yaml", "yolov8n.yaml"), ("yolov8n.yaml", "yolo26n.yaml")])
def test_mixed_yolo_pairs_take_the_students_losses_and_distil_p3_to_p5(s_yaml, t_yaml):
    rec = RecordingLoss()
    student, teacher = tiny(yaml=s_yaml), tiny(yaml=t_yaml, width=0.125, seed=1)
    d = BridgeDistiller(student, teacher, loss=rec, hr_scale=2.0, alpha=1.0).train()
    images, targets = lr_batch()
    ref = copy.deepcopy(student)
    ref.args = get_cfg()
    want = ref.loss(to_yolo_batch(pad_images(images, 32)[0], targets))[0]
    out = d(images, targets)
    third = "l1" if s_yaml == "yolo26n.yaml" else "dfl"
    assert sorted(out) == sorted([f"{k}/{n}" for k in ("lr", "bridge") for n in ("box", "cls", third)] +
                                 ["distill/rec"])
    torch.testing.assert_close(torch.stack([out[f"lr/{n}"] for n in ("box", "cls", third)]), want, rtol=1e-5, atol=0)
    assert rec.calls[0]["ctx"].strides == [8, 16, 32]


def test_a_criterion_built_on_another_device_is_rebuilt_with_its_schedule():
    from lrdet_core.adapters.ultralytics import own_criterion

    model = tiny(yaml="yolo26n.yaml")
    crit = own_criterion(model)
    for _ in range(5):
        crit.update()
    o2m = crit.o2m
    crit.one2many.device = torch.device("meta")  # as if the model had moved since it was built
    fresh = own_criterion(model)
    assert fresh is not crit and fresh is model.criterion and fresh.one2many.device == torch.device("cpu")
    assert (fresh.updates, fresh.o2m, fresh.o2o) == (5, o2m, crit.o2o) and o2m < 0.8
    assert own_criterion(model) is fresh


# --- 4. what the bridge is supervised with and what is distilled --------------------------------------------
def test_lr_pass_gets_the_lr_boxes_and_the_bridge_the_hr_boxes_image_by_image():
    student, rec = tiny(), RecordingLoss()
    d = BridgeDistiller(student, tiny(seed=1), loss=rec, alpha=1.0).train()
    seen = _record_criterion(d.adapter)
    images, targets = lr_batch()
    hr_images, hr_targets = hr_batch()
    d(images, targets, hr_images=hr_images, hr_targets=copy.deepcopy(hr_targets))
    (lr, bridge) = seen
    assert lr["batch"]["img"].shape[-2:] == (64, 96) and bridge["batch"]["img"].shape[-2:] == (128, 192)
    # The loss's own canvas (Detect's P3 size x 8) is the canvas the boxes were normalised by.
    assert lr["feats"][0].shape[-2:] == (8, 12) and bridge["feats"][0].shape[-2:] == (16, 24)
    for call, want in ((lr, targets), (bridge, hr_targets)):
        _, got = from_yolo_batch(call["batch"])
        for g, w in zip(got, want):
            torch.testing.assert_close(g["boxes"], w["boxes"], rtol=1e-6, atol=1e-4)
            assert torch.equal(g["labels"], w["labels"])
    ctx = rec.calls[0]["ctx"]
    assert ctx.canvas_size == (128, 192) and [tuple(s) for s in ctx.image_sizes] == [(128, 128), (96, 192)]
    for b, w in zip(ctx.boxes, hr_targets):
        assert torch.equal(b, w["boxes"])


def test_hr_scale_gives_the_scaled_boxes_to_the_bridge():
    d = BridgeDistiller(tiny(), tiny(seed=1), hr_scale=2.0).train()
    seen = _record_criterion(d.adapter)
    images, targets = lr_batch()
    d(images, targets)
    _, got = from_yolo_batch(seen[1]["batch"])
    assert seen[1]["batch"]["img"].shape[-2:] == (128, 192)
    for g, t in zip(got, targets):
        torch.testing.assert_close(g["boxes"], t["boxes"] * 2, rtol=1e-6, atol=1e-4)


#: Per yaml: the backbone levels the neck reads, the neck's Upsample of the last one, and the Concats that read
#: the P4 and P3 levels.
LAYERS = {"yolov8n.yaml": dict(levels=(4, 6, 9), up=10, cat_p4=11, cat_p3=14),
          "yolo26n.yaml": dict(levels=(4, 6, 10), up=11, cat_p4=12, cat_p3=15)}


@pytest.mark.parametrize("s_yaml, t_yaml", [("yolov8n.yaml", "yolov8n.yaml"), ("yolo26n.yaml", "yolo26n.yaml"),
                                            ("yolo26n.yaml", "yolov8n.yaml")])
def test_distilled_features_are_the_bridges_detect_inputs_at_the_teachers_sizes_times_alpha(s_yaml, t_yaml):
    student, teacher, rec = tiny(yaml=s_yaml), tiny(yaml=t_yaml, seed=1), RecordingLoss()  # one width: no projector
    d = BridgeDistiller(student, teacher, loss=rec, alpha=0.37).train()
    sl, tl = LAYERS[s_yaml], LAYERS[t_yaml]
    s_detect, t_detect, lr_levels, t_levels = [], [], [], []
    neck_in = {sl[k]: [] for k in ("up", "cat_p4", "cat_p3")}
    _pre_hook(student.model[-1], s_detect)
    teacher.model[-1].register_forward_hook(lambda m, inp, o: t_detect.append(1))
    for i in sl["levels"]:
        student.model[i].register_forward_hook(lambda m, inp, o: lr_levels.append(o.detach()))
    for i in tl["levels"]:
        teacher.model[i].register_forward_hook(lambda m, inp, o: t_levels.append(o.shape[-2:]))
    for i in neck_in:
        _pre_hook(student.model[i], neck_in[i])
    images, targets = lr_batch()
    hr_images, hr_targets = hr_batch()
    out = d(images, targets, hr_images=hr_images, hr_targets=hr_targets)
    (call,) = rec.calls
    assert len(s_detect) == 2 and not t_detect  # the teacher stops before its Detect head runs
    assert torch.equal(out["distill/rec"].detach(), 0.37 * call["value"])
    bridge_in = s_detect[1]
    assert [tuple(s.shape[-2:]) for s in call["student"]] == [(16, 24), (8, 12), (4, 6)]
    for s, b in zip(call["student"], bridge_in):
        assert torch.equal(s, b.detach())
    # the teacher's side: its own Detect inputs on the HR view
    ref = copy.deepcopy(teacher).eval()
    seen = []
    _pre_hook(ref.model[-1], seen)
    with torch.no_grad():
        ref(pad_images(hr_images, 32)[0])
    for t, r in zip(call["teacher"], seen[0]):
        torch.testing.assert_close(t, r, rtol=0, atol=0)
    # The bridge's neck read the LR backbone levels (P3, P4, P5: the LR pass's, the first three recorded)
    # resampled image by image to the sizes of the teacher's levels of the same stride.
    lr_sizes, hr_sizes = [(64, 64), (40, 96)], [(128, 128), (96, 192)]
    p3, p4, p5 = (resample_to_hr(lv, (64, 96), (128, 192), tuple(t), lr_sizes, hr_sizes)
                  for lv, t in zip(lr_levels[:3], t_levels[:3]))
    torch.testing.assert_close(neck_in[sl["up"]][1], p5, rtol=0, atol=0)         # Upsample reads P5
    torch.testing.assert_close(neck_in[sl["cat_p4"]][1][1], p4, rtol=0, atol=0)  # Concat reads P4
    torch.testing.assert_close(neck_in[sl["cat_p3"]][1][1], p3, rtol=0, atol=0)  # Concat reads P3


def test_bridge_keeps_the_students_batchnorm_running_statistics():
    student = tiny()
    d = BridgeDistiller(student, tiny(seed=1), hr_scale=2.0).train()
    plain = copy.deepcopy(student).train()
    images, targets = lr_batch()
    d(images, targets)
    plain(pad_images(images, 32)[0])  # the LR forward alone
    for (name, a), b in zip(student.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# --- 5. eval and export -------------------------------------------------------------------------------------
def test_eval_returns_the_students_own_predictions():
    student = tiny()
    d = BridgeDistiller(student, tiny(seed=1), hr_scale=2.0).eval()
    images, _ = lr_batch()
    img = pad_images(images, 32)[0]
    want = copy.deepcopy(student).eval()(img)[0]
    torch.testing.assert_close(d(images)[0], want, rtol=0, atol=0)
    torch.testing.assert_close(d(to_yolo_batch(img, lr_batch()[1]))[0], want, rtol=0, atol=0)


def test_student_exports_strictly_and_as_a_checkpoint_ultralytics_loads(tmp_path):
    from ultralytics import YOLO

    student, teacher = tiny(), tiny(width=0.125, seed=1)
    d = BridgeDistiller(student, teacher, hr_scale=2.0).train()
    images, targets = lr_batch()
    opt = torch.optim.SGD(d.parameters(), lr=0.01)
    sum(d(images, targets).values()).backward()
    opt.step()
    fresh = tiny(seed=2)
    fresh.load_state_dict(d.student_state_dict(), strict=True)
    img = pad_images(images, 32)[0]
    d.eval(), fresh.eval()
    want = d(images)[0]
    torch.testing.assert_close(fresh(img)[0], want, rtol=0, atol=0)
    student.train()  # as in a training loop, criterion built: the file must hold an eval copy without it
    student.criterion = criterion = types.SimpleNamespace(what="a criterion")
    loaded = YOLO(str(save_checkpoint(student, tmp_path / "student.pt")))
    assert student.training is True and student.criterion is criterion  # the student is untouched
    assert loaded.task == "detect" and getattr(torch.load(tmp_path / "student.pt", weights_only=False)["model"],
                                               "criterion", None) is None
    torch.testing.assert_close(loaded.model.eval()(img)[0], want, rtol=0, atol=0)


# --- 6. bad input -------------------------------------------------------------------------------------------
def test_bad_input_raises_the_librarys_errors_naming_expected_and_got():
    from ultralytics import YOLO

    d = BridgeDistiller(tiny(), tiny(seed=1), hr_scale=2.0).train()
    images, targets = lr_batch()
    bad = copy.deepcopy(targets)
    bad[1]["labels"] = torch.tensor([0, 3])
    with pytest.raises(InputError, match=r"targets\[1\]\['labels'\] to be YOLO class indices in \[0, 3\).*got 3"):
        d(images, bad)
    with pytest.raises(InputError, match=r"images\[0\] to have the 3 channels .* but it is \(1, 64, 64\)"):
        d([images[0][:1], images[1]], targets)
    batch = to_yolo_batch(pad_images(images, 32)[0], targets)
    with pytest.raises(InputError, match=r"no \['bboxes'\]"):
        d({k: v for k, v in batch.items() if k != "bboxes"})
    with pytest.raises(InputError, match="got a batch dict and targets too"):
        d(batch, targets)
    with pytest.raises(InputError, match=r"\['bboxes'\] \(M, 4\).*'bboxes': \(2, 4\)"):
        d(dict(batch, bboxes=batch["bboxes"][:2]))
    with pytest.raises(InputError, match=r"batch_idx'\] in \[0, 2\) for 2 images, but got values from 0 to 5"):
        d(dict(batch, batch_idx=torch.tensor([0.0, 1.0, 5.0])))
    with pytest.raises(InputError, match="hr_scale"):
        BridgeDistiller(tiny(), tiny(seed=1)).train()(images, targets)
    with pytest.raises(SplitPointError, match=r"the YOLO wrapper: pass its \.model"):
        BridgeDistiller(YOLO("yolov8n.yaml"), tiny())
    with pytest.raises(SplitPointError, match="expected no split points for the student"):
        BridgeDistiller(tiny(), tiny(seed=1), split_points=SplitPoints("model.9", "model.21"))
    assert issubclass(InputError, LRDetError) and issubclass(SplitPointError, LRDetError)


# --- 7. packaging -------------------------------------------------------------------------------------------
def test_importing_lrdet_core_does_not_import_ultralytics():
    code = ("import sys, lrdet_core, lrdet_core.adapters; from lrdet_core import BridgeDistiller; "
            "print('ultralytics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

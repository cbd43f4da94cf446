"""examples/train_coco.py: any COCO-format dataset, one process or torchrun, teacher / lrdet / baseline.

End to end on a generated dataset (128 px images, two categories with the non-contiguous ids 3 and 7, one
training image without any object): a teacher trained for one step, then ``torchrun --standalone
--nproc_per_node 2`` (as ``python -m torch.distributed.run``, torchrun's module) in lrdet mode on CPU with gloo
for two steps, a resume, and an evaluation. The data checks (each bad input the guide lists) run in-process
on small hand-written jsons.

Why two processes can equal one exactly here: DDP averages the processes' gradients, so it computes what one
process computes on the whole batch only where every loss term is a mean over images and nothing couples the
images of a batch. The detector is a RetinaNet (its classification and box losses are per-image means), on a
ResNet-18 with GroupNorm (per-image statistics; BatchNorm's batch statistics are per process), with images of
one size (the padded canvas, and so the features, do not depend on the batch's other images), and the MSE
distillation term with ``reduction="mean"`` (the default ``"sum"`` adds over images: across R processes it acts
as ``alpha / R`` on the whole batch; see docs/train-on-your-data.md). ``alpha="auto"`` is measured on the
processes' averaged terms, so it matches too. Then the loss terms logged at step 1 (the same weights, the same
four images) and at step 2 (after one update from the averaged gradients) equal a one-process run on the
same global batch up to float rounding.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")
pytest.importorskip("tqdm")
from tiny import EXAMPLES, load_example  # noqa: E402

from lrdet_core import InputError  # noqa: E402

ROOT = EXAMPLES.parent
demo = load_example("coco_demo_data")
data = load_example("coco_data")
models = load_example("coco_models")
coco_eval = load_example("coco_eval")
checkpoint = load_example("coco_checkpoint")
runtime = load_example("coco_runtime")
train_coco = load_example("train_coco")

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 600
SMALL = ["--detector", "retinanet", "--backbone", "resnet18", "--norm", "gn", "--hr-size", "128", "--hr-max-size",
         "128", "--lr-size", "64", "--lr-max-size", "64", "--threads", "1", "--workers", "0", "--log-every", "1",
         "--warmup-steps", "1", "--lr", "1e-3", "--score-thresh", "0.0"]


def _data_args(d: Path):
    return ["--train-json", str(d / "train.json"), "--train-images", str(d / "train"),
            "--val-json", str(d / "val.json"), "--val-images", str(d / "val")]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "train_coco.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    assert res.returncode == 0, (f"{' '.join(cmd)} exited with {res.returncode}:\n{res.stdout[-3000:]}\n"
                                 f"{res.stderr[-5000:]}")
    return res


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# --- end to end: teacher, torchrun lrdet, one process, resume, evaluation --------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 training images (the first without objects), 4 validation images, categories 3 and 7."""
    d = tmp_path_factory.mktemp("shapes")
    demo.write_shapes(d, train=4, val=4, size=128, category_ids=(3, 7), seed=0, empty=1)
    return d


@pytest.fixture(scope="module")
def teacher(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_coco.main(["--mode", "teacher", *_data_args(shapes), *SMALL, "--epochs", "1", "--batch-size", "4",
                         "--out", str(out)])
    return out / "teacher.pt"


LRDET = ["--mode", "lrdet", "--loss-kwargs", '{"reduction": "mean"}', "--epochs", "2"]


@pytest.fixture(scope="module")
def runs(shapes, teacher, tmp_path_factory):
    """two: 2 processes x 2 images for 2 epochs of 1 step; one: 1 process x 4 images, the same;
    resumed: the 2-process run again from its first epoch's checkpoint."""
    base = tmp_path_factory.mktemp("runs")
    common = [*LRDET, *_data_args(shapes), *SMALL, "--teacher", str(teacher), "--keep-checkpoints", "0"]
    _torchrun(*common, "--batch-size", "2", "--out", str(base / "two"))
    _torchrun(*common, "--batch-size", "2", "--out", str(base / "resumed"),
              "--resume", str(base / "two" / "checkpoint_001.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_coco.main([*common, "--batch-size", "4", "--out", str(base / "one")])
    return base


@pytest.mark.slow
def test_two_processes_compute_what_one_process_computes_on_the_global_batch(runs):
    two, one = _metrics(runs / "two"), _metrics(runs / "one")
    assert two["processes"] == 2 and one["processes"] == 1
    assert [e["step"] for e in two["log"]] == [e["step"] for e in one["log"]] == [1, 2]
    for a, b in zip(two["log"], one["log"]):
        assert set(a) == set(b)
        assert {"lr/classification", "bridge/classification", "distill/mse"} <= set(a)
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    # the comparison has teeth: the two steps differ, and the terms are not all alike
    assert two["log"][0]["loss"] != pytest.approx(two["log"][1]["loss"], rel=1e-3)


@pytest.mark.slow
def test_resume_continues_bit_identically(runs):
    two, resumed = _metrics(runs / "two"), _metrics(runs / "resumed")
    assert resumed["log"] == two["log"] and resumed["eval"] == two["eval"]  # floats compared exactly
    a, b = torch.load(runs / "two" / "student.pt"), torch.load(runs / "resumed" / "student.pt")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    first = torch.load(runs / "two" / "checkpoint_001.pt", weights_only=False)
    assert any(not torch.equal(first["model"][f"student.{k}"], a[k]) for k in a)  # epoch 2 changed the student
    # every process's random state is kept, each its own (seeded per rank)
    assert len(first["rng"]) == 2 and not torch.equal(first["rng"][0]["torch"], first["rng"][1]["torch"])
    assert first["world_size"] == 2 and first["epoch"] == 1 and first["step"] == 1


@pytest.mark.slow
def test_student_loads_into_a_plain_torchvision_model_and_its_ap_is_reported(runs, shapes):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    # built from torchvision alone: what a user of student.pt writes
    gn = lambda c: torch.nn.GroupNorm(32 if c % 32 == 0 else math.gcd(32, c), c)  # noqa: E731
    bb = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=gn, trainable_layers=5,
                             returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    model = RetinaNet(bb, num_classes=3, min_size=64, max_size=64)
    sd = torch.load(runs / "two" / "student.pt", weights_only=True)
    model.load_state_dict(sd)  # strict
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())

    two = _metrics(runs / "two")
    assert [e["epoch"] for e in two["eval"]] == [1, 2]
    ap = two["val"]["AP"]
    assert ap is not None and 0.0 <= ap <= 1.0 and two["val"]["detections"] > 0
    # the same file evaluated by one process: the 2-process evaluation gathered every image exactly once
    out = runs / "eval_one"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = train_coco.main(["--mode", "lrdet", "--eval-only", "--weights", str(runs / "two" / "student.pt"),
                                   *_data_args(shapes), *SMALL, "--out", str(out)])
    assert metrics == _metrics(out)["val"]
    assert metrics["detections"] == two["val"]["detections"]
    assert metrics["AP"] == pytest.approx(ap, abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("detector, backbone", [("maskrcnn", "mobilenet_v3"), ("fcos", "resnet18")])
def test_other_detectors_train_and_evaluate(shapes, tmp_path, detector, backbone):
    """One lrdet step from an untrained teacher: the masks path (Mask R-CNN, segm AP), MobileNetV3, FCOS."""
    arch = models.Arch(detector, backbone, "gn", num_classes=3)
    torch.save(models.build(arch, 128, 128).state_dict(), tmp_path / "teacher.pt")
    args = ["--mode", "lrdet", *_data_args(shapes), *SMALL, "--detector", detector, "--backbone", backbone,
            "--teacher", str(tmp_path / "teacher.pt"), "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = train_coco.main(args)
    assert math.isfinite(final["log"][-1]["loss"])
    assert ("segm_AP" in final["val"]) == (detector == "maskrcnn")
    models.build(arch, 64, 64).load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))


# --- the data: each bad input -----------------------------------------------------------------------------------
def _write(tmp_path: Path, annotations, categories=({"id": 1, "name": "a"},), size=(80, 100), images=None,
           name="train") -> Path:
    """A json with one 100 x 80 image (written) unless ``images`` says otherwise."""
    from PIL import Image

    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    images = images or [{"id": 1, "file_name": "a.png", "width": size[1], "height": size[0]}]
    for im in images:
        if not (folder / im["file_name"]).exists() and not im.get("_missing"):
            Image.new("RGB", (im["width"], im["height"]), (120, 60, 30)).save(folder / im["file_name"])
    js = {"images": [{k: v for k, v in im.items() if k != "_missing"} for im in images],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, **a} for i, a in enumerate(annotations)],
          "categories": list(categories)}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(js))
    return path


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path):
    path = _write(tmp_path, [{"bbox": [-10, 5, 30, 20]},     # partly outside (left): clipped to x 0..20
                             {"bbox": [90, 70, 20, 20]},     # partly outside (right, bottom): clipped to 100, 80
                             {"bbox": [120, 10, 10, 10]},    # wholly outside: dropped
                             {"bbox": [10, 10, 5, 5]}])      # inside
    with pytest.warns(UserWarning) as rec:
        split = data.read_coco(path, tmp_path / "train")
    assert split.images[0].boxes.tolist() == [[0, 5, 20, 25], [90, 70, 100, 80], [10, 10, 15, 15]]
    msg = str(rec[0].message)
    assert "2 boxes partly outside their image were clipped to it (annotation ids 1, 2)" in msg
    assert "1 boxes wholly outside their image were dropped (annotation ids 3)" in msg
    with warnings.catch_warnings():  # a validation json is scored as it is: nothing to warn about
        warnings.simplefilter("error")
        data.read_coco(path, tmp_path / "train", warn=False)


def test_zero_area_boxes_are_dropped_and_negative_sizes_refused(tmp_path):
    path = _write(tmp_path, [{"bbox": [10, 10, 0, 5]}, {"bbox": [10, 10, 5, 0]}, {"bbox": [1, 2, 3, 4]}])
    with pytest.warns(UserWarning, match=r"2 boxes of zero width or height were dropped \(annotation ids 1, 2\)"):
        split = data.read_coco(path, tmp_path / "train")
    assert split.images[0].boxes.tolist() == [[1, 2, 4, 6]]
    path = _write(tmp_path, [{"bbox": [30, 30, 10, 20]}, {"bbox": [30, 30, 10, -20]}])
    with pytest.raises(InputError, match=r"annotation 2 has \[30, 30, 10, -20\]; is it \[x1, y1, x2, y2\]"):
        data.read_coco(path, tmp_path / "train")


def test_a_missing_image_file_is_an_error_before_training(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
              {"id": 2, "file_name": "gone.png", "width": 100, "height": 80, "_missing": True}]
    path = _write(tmp_path, [{"bbox": [1, 2, 3, 4]}], images=images)
    with pytest.raises(InputError, match=r"1 of 2 image files are missing under .*train: .*gone\.png"):
        data.read_coco(path, tmp_path / "train")
    _write(tmp_path, [{"bbox": [1, 2, 3, 4]}], images=images[:1], name="val")
    with pytest.raises(InputError, match="gone.png"):  # the script stops before building anything
        train_coco.main(["--mode", "baseline", *_data_args(tmp_path), *SMALL, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_an_image_of_another_size_than_the_json_says_is_an_error(tmp_path):
    path = _write(tmp_path, [{"bbox": [1, 2, 3, 4]}],
                  images=[{"id": 1, "file_name": "a.png", "width": 100, "height": 80}])
    split = data.read_coco(path, tmp_path / "train")
    split.images[0].width = 120
    with pytest.raises(InputError, match=r"is 100 x 80 pixels, but the json says 120 x 80"):
        data.CocoDataset(split)[0]


def test_non_contiguous_category_ids_map_to_labels_and_back(tmp_path):
    cats = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]  # unsorted, not from 1
    anns = [{"bbox": [10, 10, 20, 20], "category_id": 7}, {"bbox": [50, 40, 30, 30], "category_id": 3}]
    path = _write(tmp_path, anns, categories=cats)
    split = data.read_coco(path, tmp_path / "train")
    assert split.num_classes == 3 and [c.id for c in split.categories] == [3, 7]
    assert split.images[0].labels.tolist() == [2, 1] and split.category_id(1) == 3 and split.category_id(2) == 7

    class Oracle(torch.nn.Module):  # predicts the training targets: perfect boxes, model labels
        def forward(self, images):
            return [{"boxes": split.images[0].boxes, "labels": split.images[0].labels,
                     "scores": torch.ones(2)} for _ in images]

    rt = runtime.Runtime(0, 1, 0, torch.device("cpu"), None)
    metrics = coco_eval.evaluate(Oracle(), data.CocoDataset(split), rt, batch_size=1)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["detections"] == 2

    bad = _write(tmp_path, [{"bbox": [1, 2, 3, 4], "category_id": 5}], categories=cats, name="bad")
    with pytest.raises(InputError, match=r"annotation 1 has category_id 5, but the categories are \[3, 7\]"):
        data.read_coco(bad, tmp_path / "bad")
    dup = _write(tmp_path, anns, categories=cats + [{"id": 3, "name": "c"}], name="dup")
    with pytest.raises(InputError, match=r"ids \[3\] appear several times"):
        data.read_coco(dup, tmp_path / "dup")
    val = data.read_coco(_write(tmp_path, [], categories=cats[:1], name="val"), tmp_path / "val")
    with pytest.raises(InputError, match=r"their ids are \[7\] and \[3, 7\]"):
        data.check_same_categories(split, val)


def test_crowd_annotations_and_empty_images(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
              {"id": 2, "file_name": "b.png", "width": 100, "height": 80}]
    anns = [{"bbox": [10, 10, 20, 20], "iscrowd": 1}, {"bbox": [50, 40, 30, 30]}]
    path = _write(tmp_path, anns, images=images)
    split = data.read_coco(path, tmp_path / "train")
    assert split.images[0].boxes.tolist() == [[50, 40, 80, 70]]  # the crowd box is not a training target
    assert split.cleanup.crowd == 1 and split.cleanup.empty_images == 1
    image, target = data.CocoDataset(split)[1]  # kept, with empty targets
    assert image.shape == (3, 80, 100) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    # evaluation keeps the crowd region (COCOeval ignores detections on it) and the json's own boxes
    gt = coco_eval.coco_ground_truth(split)
    assert [a["iscrowd"] for a in gt.dataset["annotations"]] == [1, 0]


def test_masks_follow_the_polygons_and_flip_with_the_image(tmp_path):
    poly = [[10, 20, 40, 20, 40, 50, 10, 50]]  # the rectangle x 10..40, y 20..50
    path = _write(tmp_path, [{"bbox": [10, 20, 30, 30], "segmentation": poly}])
    split = data.read_coco(path, tmp_path / "train", masks=True)
    ds = data.CocoDataset(split, hflip=True, seed=0)
    expected = torch.zeros(80, 100, dtype=torch.uint8)
    expected[20:50, 10:40] = 1
    flips = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        _, t = ds[0]
        flipped = bool(t["boxes"][0, 0] == 60)
        flips.append(flipped)
        assert t["boxes"].tolist() == [[60, 20, 90, 50]] if flipped else [[10, 20, 40, 50]]
        assert torch.equal(t["masks"][0], expected.flip(-1) if flipped else expected)
    assert any(flips) and not all(flips)
    no_seg = _write(tmp_path, [{"bbox": [10, 20, 30, 30]}], name="noseg")
    with pytest.raises(InputError, match="Mask R-CNN needs a segmentation for every annotation"):
        data.read_coco(no_seg, tmp_path / "noseg", masks=True)


def test_a_teacher_checkpoint_of_another_architecture_is_refused(shapes, tmp_path):
    arch = models.Arch("retinanet", "mobilenet_v3", "gn", num_classes=3)
    torch.save(models.build(arch, 128, 128).state_dict(), tmp_path / "teacher.pt")
    args = ["--mode", "lrdet", *_data_args(shapes), *SMALL, "--teacher", str(tmp_path / "teacher.pt"),
            "--out", str(tmp_path / "o")]
    with warnings.catch_warnings(), pytest.raises(InputError) as err:
        warnings.simplefilter("ignore")
        train_coco.main(args)  # --backbone resnet18
    msg = str(err.value)
    assert "the teacher checkpoint" in msg and "does not fit a retinanet on resnet18 with norm gn" in msg
    assert "looks like: detector retinanet, backbone mobilenet_v3, norm gn" in msg
    # other categories: shapes that differ, named
    fcos = models.Arch("fcos", "resnet18", "gn", num_classes=5)
    sd = models.build(fcos, 64, 64).state_dict()
    with pytest.raises(InputError, match=r"head.classification_head.cls_logits.weight: \(5, 256, 3, 3\) in the file, "
                                         r"\(3, 256, 3, 3\) here.*5 classes with the background"):
        models.load_detector_state(models.build(fcos._replace(num_classes=3), 64, 64), sd, Path("t.pt"), "teacher",
                                   fcos._replace(num_classes=3))


def test_resume_with_another_architecture_is_refused():
    saved = {"mode": "lrdet", "backbone": "resnet18", "lr": 1e-3}
    with pytest.raises(InputError, match=r"backbone: 'resnet18' -> 'resnet50'"):
        checkpoint.check_config(saved, {**saved, "backbone": "resnet50"}, 2, 2, Path("c.pt"))
    with pytest.warns(UserWarning, match=r"lr: 0.001 -> 0.002; processes: 2 -> 4"):
        checkpoint.check_config(saved, {**saved, "lr": 2e-3}, 2, 4, Path("c.pt"))


def test_checkpoint_restores_each_process_its_own_random_state(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    rt = runtime.Runtime(0, 1, 0, torch.device("cpu"), None)
    torch.manual_seed(1)
    path = checkpoint.save(tmp_path, 1, 5, model, opt, sched, None, {"log": []}, {}, rt)
    expected = torch.rand(3)
    state = checkpoint.load(path)
    torch.manual_seed(2)
    checkpoint.restore(state, model, opt, sched, None, rt)
    assert torch.equal(torch.rand(3), expected)
    # with two processes, rank 1 takes the second saved state
    torch.manual_seed(3)
    other = runtime.rng_state()
    state["rng"] = [state["rng"][0], other]
    expected = torch.rand(3)
    checkpoint.restore(state, model, opt, sched, None, runtime.Runtime(1, 2, 1, torch.device("cpu"), None))
    assert torch.equal(torch.rand(3), expected)


def test_resnet50_layouts_are_torchvision_s():
    """--weights takes torchvision's published detector weights: the same names and shapes."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, maskrcnn_resnet50_fpn, \
        retinanet_resnet50_fpn

    for ours, theirs in [(models.Arch("retinanet", "resnet50", "bn", 91), retinanet_resnet50_fpn),
                         (models.Arch("maskrcnn", "resnet50", "bn", 91), maskrcnn_resnet50_fpn),
                         (models.Arch("fasterrcnn", "mobilenet_v3", "bn", 91), fasterrcnn_mobilenet_v3_large_fpn)]:
        a = models.build(ours, 800, 1333).state_dict()
        b = theirs(weights=None, weights_backbone=None, num_classes=91).state_dict()
        assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()], ours


def test_weights_of_a_classification_backbone_load_into_the_body(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    classifier = resnet18(weights=None)
    torch.save(classifier.state_dict(), tmp_path / "r18.pth")
    arch = models.Arch("retinanet", "resnet18", "bn", 3)
    model = models.build(arch, 64, 64)
    assert "backbone" in models.load_weights(model, tmp_path / "r18.pth", arch)
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, classifier.layer4[1].conv2.weight)
    assert torch.equal(model.backbone.body.bn1.running_var, classifier.bn1.running_var)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="expected --weights .* to be a detector state dict"):
        models.load_weights(model, tmp_path / "other.pth", arch)


def test_amp_is_for_cuda_only():
    args = train_coco.parse_args(["--mode", "baseline", *_data_args(Path("d")), "--amp", "auto"])
    ctx, fp16 = train_coco.autocast_for(args, torch.device("cpu"))
    assert not fp16 and isinstance(ctx(), type(train_coco.contextlib.nullcontext()))
    args.amp = "bf16"
    with pytest.raises(InputError, match="expected --amp off on cpu"):
        train_coco.autocast_for(args, torch.device("cpu"))
    args.amp = "fp16"  # the context for CUDA, built without running anything
    ctx, fp16 = train_coco.autocast_for(args, torch.device("cuda"))
    assert fp16 and ctx.keywords == {"dtype": torch.float16}


def test_the_cost_options_reach_the_distiller(shapes, teacher, tmp_path):
    # 4 images at 2 per step: one epoch is steps 1 and 2; with --distill-every 2 step 2 is a plain LR step, whose
    # bridge and distillation terms are zeros under the same keys.
    out = tmp_path / "cheap"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_coco.main([*LRDET[:-1], "1", *_data_args(shapes), *SMALL, "--teacher", str(teacher), "--batch-size", "2",
                         "--distill-every", "2", "--bridge-crop", "0.5", "--eval-every", "9", "--out", str(out)])
    log = _metrics(out)["log"]
    assert [e["step"] for e in log] == [1, 2]
    bridge = [k for k in log[0] if k.startswith(("bridge/", "distill/"))]
    assert log[0]["distill/mse"] > 0 and log[0]["bridge/classification"] > 0  # step 1 distils (on a window)
    assert bridge and all(log[1][k] == 0 for k in bridge)
    args = train_coco.parse_args(["--mode", "lrdet", "--bridge-crop", "0.5", "--distill-every", "3",
                                  *_data_args(shapes), "--teacher", str(teacher)])
    assert (args.bridge_crop, args.distill_every) == (0.5, 3)

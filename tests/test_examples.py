"""Smoke runs of the examples' ``--quick`` modes, as a user would start them (a subprocess each).

The tree-crown examples need the DeepForest wheel (downloaded once with pip into the cache); they are
skipped when it cannot be had, with the loader's message as the reason.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")
pytest.importorskip("tqdm")
from tiny import load_example  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 600


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                         timeout=TIMEOUT, env=env, cwd=ROOT)
    assert res.returncode == 0, f"{script} {' '.join(args)} exited with {res.returncode}:\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def deepforest_data():
    dfd = load_example("deepforest_data")
    try:
        dfd.fetch_wheel()
    except dfd.DataUnavailableError as e:
        pytest.skip(str(e))
    return dfd


def test_deepforest_splits(deepforest_data):
    dfd = deepforest_data
    val, cross = dfd.load_split("val"), dfd.load_split("cross_site")
    assert len(val) == 16 and all(t["image"].shape == (3, 256, 256) for t in val)
    assert 100 <= sum(len(t["boxes"]) for t in val) <= 140
    assert {t["source"] for t in cross} == set(dfd.CROSS_SITE_IMAGES)
    crops = dfd.TrainCrops()
    import torch
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        img, boxes = crops.sample(g)
        assert img.shape == (3, 256, 256) and len(boxes) > 0
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 256
    # training crops never reach the held-out rows
    assert crops.max_y + dfd.TILE <= crops.image.shape[-2] - dfd.HELD_OUT_ROWS
    # the powered presets' larger held-out set: 3 rows of non-overlapping tiles, so no crown is counted twice
    val768 = dfd.load_split("val", held_out_rows=768)
    assert len(val768) == 24 and sum(len(t["boxes"]) for t in val768) == 172
    assert len({t["origin"] for t in val768}) == 24
    assert all(t["origin"][1] >= crops.image.shape[-2] - 768 for t in val768)
    assert dfd.TrainCrops(held_out_rows=768).max_y + dfd.TILE <= crops.image.shape[-2] - 768


@pytest.mark.slow
def test_reproduce_deepforest_quick(deepforest_data, tmp_path):
    _run("reproduce_deepforest.py", "--quick", "--out", str(tmp_path), "--threads", "1")
    res = json.loads((tmp_path / "deepforest_quick.json").read_text())
    assert {"hr_teacher", "lr_baseline", "fitnet_up", "lrdet"} <= set(res["runs"])
    for per_seed in res["runs"].values():
        for r in per_seed.values():  # null: no crowns of that size among the tiles
            assert all(v is None or math.isfinite(v) for split in r.values() for v in split.values())
            assert 0.0 <= r["val"]["AP"] <= 1.0
    for log in res["loss_logs"].values():
        assert all(math.isfinite(v) for entry in log for v in entry.values())
    for suffix in (".md", "_ap.png", "_features.png", "_detections.png"):
        assert (tmp_path / f"deepforest_quick{suffix}").is_file()
    # the cost figure on this output, with costs in bench_step's format
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"meta": {"commit": "x", "device": "cpu", "threads": 1}, "cost": {"deepforest": {
        "cycle": 4, "arms": {"lr": {"x_lr": [1.0]}, "upsample": {"x_lr": [1.2]}, "lrdet": {"x_lr": [1.8]}}}}}))
    _run("plot_cost.py", "--results", str(tmp_path / "deepforest_quick.json"), "--bench", str(bench))
    assert (tmp_path / "deepforest_quick_cost.png").is_file()
    assert (tmp_path / "deepforest_quick_cost.md").read_text().count("| 1 |") == 3  # 3 arms, 1 seed each

    # --jobs trains the runs in worker processes; every run seeds itself, so the numbers must not move
    par = tmp_path / "jobs2"
    _run("reproduce_deepforest.py", "--quick", "--out", str(par), "--threads", "1", "--jobs", "2", "--no-plots")
    res2 = json.loads((par / "deepforest_quick.json").read_text())
    assert res2["runs"] == res["runs"]
    assert res2["loss_logs"] == res["loss_logs"]
    assert list(res2["runs"]) == list(res["runs"])  # same table order, whichever process finished first


def test_detection_matching():
    """The detections figure's TP/FP/miss colouring: greedy in score order at IoU >= 0.5, one
    prediction per crown, as in COCO's evaluation."""
    import torch

    rd = load_example("reproduce_deepforest")
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]])
    pred = torch.tensor([[0.0, 0, 10, 10],      # crown 0
                         [1.0, 1, 10, 10],      # crown 0 again: a duplicate is a false positive
                         [20, 20, 30, 31],      # crown 1 (IoU 10/11)
                         [80, 80, 90, 90]])     # nothing there
    tp, found = rd.match(pred, gt)
    assert tp.tolist() == [True, False, True, False]
    assert found.tolist() == [True, True, False]
    tp, found = rd.match(pred[:0], gt)
    assert tp.numel() == 0 and not found.any()
    # the threshold with the best F1: scores that put the two correct boxes above the two false ones
    tiles = [{"boxes": gt}]
    preds = [{"boxes": pred[[0, 2, 1, 3]], "scores": torch.tensor([0.9, 0.8, 0.3, 0.2])}]
    thr, f1 = rd.best_threshold(tiles, preds)
    assert 0.3 < thr <= 0.8 and f1 == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_fcos.py", "train_retinanet.py"])
def test_detector_example_quick(deepforest_data, script, tmp_path):
    _run(script, "--quick", "--out", str(tmp_path))
    _check_outputs(tmp_path)


@pytest.mark.slow
def test_maskrcnn_example_quick(tmp_path):
    _run("train_maskrcnn.py", "--quick", "--out", str(tmp_path))
    summary = _check_outputs(tmp_path)
    assert {"bbox_AP", "segm_AP"} <= set(summary["val"])


@pytest.mark.slow
def test_yolo_example_quick(deepforest_data, tmp_path):
    pytest.importorskip("ultralytics")
    _run("train_yolo.py", "--quick", "--out", str(tmp_path), "--threads", "1")
    res = json.loads((tmp_path / "yolo_quick.json").read_text())
    assert set(res["runs"]) == {"hr_teacher", "lr_baseline", "inherit", "lrdet"}
    assert all(0.0 <= r[split]["AP"] <= 1.0 for per_seed in res["runs"].values() for r in per_seed.values()
               for split in ("val", "cross_site"))
    assert {"lr/box", "lr/cls", "lr/dfl", "bridge/box", "bridge/cls", "bridge/dfl", "distill/mse"} == \
        set(res["loss_logs"]["lrdet/0"][-1]) - {"iter"}
    assert all(math.isfinite(v) for log in res["loss_logs"].values() for entry in log for v in entry.values())
    from ultralytics import YOLO
    assert YOLO(str(tmp_path / "yolo_student.pt")).task == "detect"
    md = (tmp_path / "yolo_quick.md").read_text()
    assert all(f"| {c} |" in md for c in ("lrdet − lr_baseline", "inherit − lr_baseline", "lrdet − inherit"))


def _check_outputs(out: Path) -> dict:
    assert (out / "student.pt").is_file()
    summary = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in summary["last_losses"].values())
    assert all(v is None or math.isfinite(v) for v in summary["val"].values())
    main = summary["val"].get("AP", summary["val"].get("bbox_AP"))
    assert math.isfinite(main) and 0.0 <= main <= 1.0
    return summary


def test_toy_coco_is_a_coco_dataset_whose_boxes_are_the_painted_rectangles(tmp_path):
    # The dataset of docs/torchvision-reference.md: loadable by torchvision's CocoDetection (what the reference
    # script reads), every box a rectangle painted in its category's colour, with its polygon and area.
    import numpy as np
    from torchvision.datasets import CocoDetection

    _run("toy_coco.py", str(tmp_path), "--train", "3", "--val", "2")
    for split, n in (("train", 3), ("val", 2)):
        ann_file = tmp_path / "annotations" / f"instances_{split}2017.json"
        ds = CocoDetection(str(tmp_path / f"{split}2017"), str(ann_file))
        assert len(ds) == n
        for img, anns in ds:
            pixels = np.asarray(img).astype(int)
            assert anns and {a["category_id"] for a in anns} <= {1, 2}
            for a in anns:
                x, y, w, h = a["bbox"]
                assert 0 <= x and x + w <= img.width and 0 <= y and y + h <= img.height and a["area"] == w * h
                assert a["segmentation"] == [[x, y, x + w, y, x + w, y + h, x, y + h]] and a["iscrowd"] == 0
                centre = pixels[y + h // 2, x + w // 2]
                assert centre[a["category_id"] - 1] > 150, (a, centre)  # JPEG: not exactly the painted 230

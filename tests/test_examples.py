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
    sys.path.insert(0, str(EXAMPLES))
    try:
        import deepforest_data as dfd
        try:
            dfd.fetch_wheel()
        except dfd.DataUnavailableError as e:
            pytest.skip(str(e))
        return dfd
    finally:
        sys.path.remove(str(EXAMPLES))


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
    for suffix in (".md", "_ap.png", "_features.png"):
        assert (tmp_path / f"deepforest_quick{suffix}").is_file()


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


def _check_outputs(out: Path) -> dict:
    assert (out / "student.pt").is_file()
    summary = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in summary["last_losses"].values())
    assert all(v is None or math.isfinite(v) for v in summary["val"].values())
    main = summary["val"].get("AP", summary["val"].get("bbox_AP"))
    assert math.isfinite(main) and 0.0 <= main <= 1.0
    return summary

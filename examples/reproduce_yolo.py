"""LRDet through Ultralytics' own ``model.train()`` on the tree crowns, against plain training and Ultralytics'
own distillation (``distill_model=``), on paired seeds.

The DeepForest tiles (``deepforest_data.py``) are written locally in YOLO format: the training region of the YELL
image as 256 px tiles with 50 % overlap (crown-free tiles left out), and its held-out bottom rows as the val tiles
(non-overlapping, at native 256 px). A teacher is trained at 256 px with plain ``model.train()``; each student is
trained at ``imgsz = 256 * scale`` for the same number of epochs in four arms:

* ``plain``: ``YOLO(yaml).train(imgsz=LR)``;
* ``ultra_distill``: ``YOLO(yaml).train(imgsz=LR, distill_model="teacher.pt")`` (Ultralytics 8.4's own distillation;
  its teacher sees the LR batch);
* ``lrdet``: ``YOLO(yaml).train(imgsz=LR, trainer=lrdet_trainer("teacher.pt", hr_scale=1/scale))``;
* ``lrdet_inherit``: the same with ``inherit=True`` (weight inheriting, the paper's full method).

Each student is scored by Ultralytics' own ``YOLO(last.pt).val(imgsz=LR)`` on the val tiles: the originals resized
with cv2 to the LR size, as deployment sees them. Paired contrasts (same seed, same scale) with their standard
error. Runs are kept one JSON file each and reused by a rerun of the same command; nothing is downloaded.

Usage::

    python examples/reproduce_yolo.py --quick                 # smoke test: 1 epoch, 1 seed, 0.5x only
    python examples/reproduce_yolo.py --jobs 2                # 5 seeds x 0.5x and 0.75x x 4 arms, 20 epochs
    python examples/reproduce_yolo.py --jobs 2 --save-results # into the committed examples/results/

Ultralytics is AGPL-3.0 licensed; from a checkout: ``pip install -e ".[examples,ultralytics]"``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import deepforest_data as dfd  # noqa: E402
import harness  # noqa: E402

PRESETS = {
    "quick": dict(scales=[0.5], seeds=[0], epochs=1, teacher_epochs=1, batch=8, model="yolo26n.yaml"),
    "default": dict(scales=[0.5, 0.75], seeds=[0, 1, 2, 3, 4], epochs=20, teacher_epochs=40, batch=16,
                    model="yolo26n.yaml"),
}
ARMS = ("plain", "ultra_distill", "lrdet", "lrdet_inherit")
#: Paired contrasts (a - b on the same seed and scale).
CONTRASTS = [("lrdet_inherit", "plain"), ("lrdet_inherit", "ultra_distill"), ("lrdet", "plain"),
             ("ultra_distill", "plain"), ("lrdet_inherit", "lrdet")]
OVERLAP = 128  # stride of the training tiles (50 % overlap)


def offline_ultralytics(cache: Path) -> None:
    """Before Ultralytics is imported: no update check, and its config folder in the cache with a stand-in
    ``Arial.ttf`` (matplotlib's DejaVu Sans), which it would otherwise download when it checks a dataset."""
    os.environ["YOLO_OFFLINE"] = "1"
    folder = cache / "ultralytics_config"
    (folder / "Ultralytics").mkdir(parents=True, exist_ok=True)
    import matplotlib

    font = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (folder / "Ultralytics" / name).exists():
            shutil.copyfile(font, folder / "Ultralytics" / name)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(folder))


def write_dataset(root: Path, cache: Path) -> Path:
    """The tree tiles in YOLO format (class 0 ``tree``); returns the data yaml."""
    from PIL import Image

    image, boxes = dfd.load_image(dfd.TRAIN_IMAGE, str(cache))
    h, w = image.shape[-2:]
    region = h - dfd.HELD_OUT_ROWS
    train = []
    for y in range(0, region - dfd.TILE + 1, OVERLAP):
        for x in range(0, w - dfd.TILE + 1, OVERLAP):
            b = dfd.crop_boxes(boxes, x, y, dfd.TILE, dfd.TILE)
            if len(b):
                train.append({"image": image[:, y:y + dfd.TILE, x:x + dfd.TILE], "boxes": b})
    splits = {"train": train, "val": dfd.load_split("val", cache_dir=str(cache))}
    for split, tiles in splits.items():
        for sub in ("images", "labels"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(tiles):
            arr = (t["image"].permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(arr).save(root / "images" / split / f"{i:04d}.png")
            s = float(t["image"].shape[-1])
            lines = [f"0 {(x1 + x2) / 2 / s:.6f} {(y1 + y2) / 2 / s:.6f} {(x2 - x1) / s:.6f} {(y2 - y1) / s:.6f}"
                     for x1, y1, x2, y2 in t["boxes"].tolist()]
            (root / "labels" / split / f"{i:04d}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: tree\n")
    return data


def lr_views(cache: Path, lr: int) -> Dict[str, "object"]:
    """The val tiles at ``lr`` px, as uint8 ``N x H x W x 3`` arrays, three ways: ``deployment`` (cv2 ``INTER_AREA``
    of the original, how Ultralytics shrinks an image for validation and prediction), ``trainer`` (how the LRDet
    trainer makes its LR batch: ``area_resize`` of the HR tile) and ``bilinear_aa`` (torch's antialiased bilinear,
    the library's other examples' downsample), to measure what a mismatch costs."""
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F
    from lrdet_core.integrations.ultralytics import area_resize

    views: Dict[str, list] = {"deployment": [], "trainer": [], "bilinear_aa": []}
    to_u8 = lambda t: (t[0].permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()  # noqa: E731
    for t in dfd.load_split("val", cache_dir=str(cache)):
        hr = (t["image"].permute(1, 2, 0) * 255).round().byte().numpy()
        views["deployment"].append(cv2.resize(hr, (lr, lr), interpolation=cv2.INTER_AREA))
        x = torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255
        views["trainer"].append(to_u8(area_resize(x, (lr, lr))))
        views["bilinear_aa"].append(to_u8(F.interpolate(x, size=(lr, lr), mode="bilinear", align_corners=False,
                                                         antialias=True)))
    return {k: np.stack(v) for k, v in views.items()}


def deployment_gap(cache: Path, data_root: Path, lr: int, student: Path) -> Dict:
    """How far each LR view is from the one deployment sees: in pixels, and in one student's mAP50-95
    (``YOLO(student).val`` on the val tiles pre-shrunk that way, so that ``imgsz=lr`` resizes nothing more)."""
    from PIL import Image
    from ultralytics import YOLO

    views = lr_views(cache, lr)
    kw = dict(imgsz=lr, batch=16, device="cpu", plots=False, verbose=False, workers=0)
    out = {"lr": lr, "student": student.name,
           "mAP50-95": {"deployment": float(YOLO(str(student)).val(data=str(data_root / "data.yaml"), **kw).box.map)}}
    for name in ("trainer", "bilinear_aa"):
        diff = abs(views[name].astype("float64") - views["deployment"].astype("float64"))
        out[f"{name}_mean_abs_diff_0_255"], out[f"{name}_max_abs_diff_0_255"] = float(diff.mean()), float(diff.max())
        root = data_root.parent / f"{data_root.name}_val{lr}_{name}"
        for sub in ("images", "labels"):
            (root / sub / "val").mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(views[name]):
            Image.fromarray(arr).save(root / "images" / "val" / f"{i:04d}.png")
            shutil.copyfile(data_root / "labels" / "val" / f"{i:04d}.txt", root / "labels" / "val" / f"{i:04d}.txt")
        (root / "data.yaml").write_text(f"path: {root}\ntrain: images/val\nval: images/val\nnames:\n  0: tree\n")
        out["mAP50-95"][name] = float(YOLO(str(student)).val(data=str(root / "data.yaml"), **kw).box.map)
    return out


def _train_kwargs(cfg: dict, seed: int, project: Path, name: str) -> dict:
    return dict(data=str(cfg["data"]), epochs=cfg["epochs"], batch=cfg["batch"], seed=seed, device="cpu", workers=0,
                plots=False, val=False, verbose=False, exist_ok=True, project=str(project), name=name,
                deterministic=True)


def train_teacher(cfg: dict, cache: Path) -> Path:
    """The 256 px teacher (plain ``model.train()``), cached by its settings."""
    from ultralytics import YOLO

    key = {"model": cfg["model"], "epochs": cfg["teacher_epochs"], "batch": cfg["batch"], "data": "v1"}
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = cache / "yolo_teachers" / f"teacher_{tag}.pt"
    if path.is_file():
        print(f"teacher loaded from {path}")
        return path
    kw = _train_kwargs({**cfg, "epochs": cfg["teacher_epochs"]}, 0, cache / "yolo_runs", f"teacher_{tag}")
    model = YOLO(cfg["model"])
    model.train(imgsz=dfd.TILE, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(model.trainer.last), path)
    return path


def run(arm: str, scale: float, seed: int, cfg: dict, cache: Path, threads: int) -> Dict:
    """One student: train it in ``arm`` and score it with Ultralytics' own ``val`` at LR."""
    import torch
    from ultralytics import YOLO

    torch.set_num_threads(threads)
    lr = round(dfd.TILE * scale)
    name = f"{arm}_{lr}_seed{seed}_{cfg['fingerprint']}"
    kw = _train_kwargs(cfg, seed, cache / "yolo_runs", name)
    model = YOLO(cfg["model"])
    if arm == "ultra_distill":
        kw["distill_model"] = str(cfg["teacher"])
    elif arm.startswith("lrdet"):
        from lrdet_core.integrations.ultralytics import lrdet_trainer

        kw["trainer"] = lrdet_trainer(str(cfg["teacher"]), hr_scale=dfd.TILE / lr, alpha="auto",
                                      inherit=arm == "lrdet_inherit")
    t = time.time()
    model.train(imgsz=lr, **kw)
    elapsed = time.time() - t
    m = YOLO(str(model.trainer.last)).val(data=str(cfg["data"]), imgsz=lr, batch=16, device="cpu", plots=False,
                                         verbose=False, workers=0)
    return {"arm": arm, "scale": scale, "seed": seed, "train_s": elapsed, "last": str(model.trainer.last),
            "mAP50-95": float(m.box.map), "mAP50": float(m.box.map50)}


def _worker(args):
    arm, scale, seed, cfg, cache, threads = args
    offline_ultralytics(cache)
    return run(arm, scale, seed, cfg, cache, threads)


def contrasts(runs: List[Dict], metric: str = "mAP50-95") -> List[Dict]:
    """Paired contrasts per scale: mean, SE, seeds and seeds above zero."""
    by = {(r["arm"], r["scale"], r["seed"]): r[metric] for r in runs}
    out = []
    for scale in sorted({r["scale"] for r in runs}):
        for a, b in CONTRASTS:
            d = [by[(a, scale, s)] - by[(b, scale, s)] for s in sorted({r["seed"] for r in runs})
                 if (a, scale, s) in by and (b, scale, s) in by]
            if not d:
                continue
            m = sum(d) / len(d)
            se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
            out.append({"scale": scale, "contrast": f"{a} - {b}", "mean": m, "se": se, "n": len(d),
                        "positive": sum(x > 0 for x in d)})
    return out


def markdown(res: Dict) -> str:
    cfg = res["config"]
    lines = [f"# LRDet through Ultralytics' model.train(): tree crowns ({cfg['model']}, {cfg['epochs']} epochs, "
             f"teacher {cfg['teacher_epochs']} epochs at 256 px, mAP50-95 {res['teacher_map']:.3f})", "",
             f"Command: `{cfg['command']}`", "", "| scale | arm | n | mAP50-95 | mAP50 | train time (s) |",
             "|---|---|---|---|---|---|"]
    for scale in cfg["scales"]:
        for arm in ARMS:
            rs = [r for r in res["runs"] if r["arm"] == arm and r["scale"] == scale]
            if not rs:
                continue
            ms = [r["mAP50-95"] for r in rs]
            m = sum(ms) / len(ms)
            sd = math.sqrt(sum((x - m) ** 2 for x in ms) / (len(ms) - 1)) if len(ms) > 1 else 0.0
            lines.append(f"| {scale} | {arm} | {len(rs)} | {m:.3f} ± {sd:.3f} | "
                         f"{sum(r['mAP50'] for r in rs) / len(rs):.3f} | {sum(r['train_s'] for r in rs) / len(rs):.0f} |")
    lines += ["", "Paired contrasts (mAP50-95, a − b on the same seed and scale; SE of the mean difference):", "",
              "| scale | contrast | mean | SE | seeds | seeds > 0 |", "|---|---|---|---|---|---|"]
    for c in res["contrasts"]:
        lines.append(f"| {c['scale']} | {c['contrast']} | {c['mean']:+.4f} | {c['se']:.4f} | {c['n']} | "
                     f"{c['positive']}/{c['n']} |")
    if res["deployment_gap"]:
        lines += ["", "LR views of the val tiles against deployment's (cv2 INTER_AREA of the original): the trainer's "
                  "(area_resize of the HR tile) and torch's antialiased bilinear; mean |difference| in 0-255 levels, "
                  "and one LRDet student's mAP50-95 on each view:", "",
                  "| LR px | trainer view diff | bilinear AA diff | mAP50-95 deployment | trainer view | bilinear AA |",
                  "|---|---|---|---|---|---|"]
        for g in res["deployment_gap"]:
            m = g["mAP50-95"]
            lines.append(f"| {g['lr']} | {g['trainer_mean_abs_diff_0_255']:.2f} | "
                         f"{g['bilinear_aa_mean_abs_diff_0_255']:.2f} | {m['deployment']:.4f} | {m['trainer']:.4f} | "
                         f"{m['bilinear_aa']:.4f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, 0.5x (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--scales", type=float, nargs="+")
    p.add_argument("--epochs", type=int)
    p.add_argument("--arms", nargs="+", choices=ARMS)
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes")
    o = p.add_mutually_exclusive_group()
    o.add_argument("--out", type=Path, help="output folder (default runs/, untracked)")
    o.add_argument("--save-results", action="store_true", help="write into the committed examples/results/")
    harness.add_cache(p)
    harness.add_threads(p)
    args = p.parse_args(argv)
    offline_ultralytics(args.cache)

    cfg = dict(PRESETS["quick" if args.quick else "default"])
    for k in ("seeds", "scales", "epochs"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    arms = args.arms or list(ARMS)
    cfg["command"] = harness.command_line(__file__, argv)
    out = args.out or (HERE / "results" if args.save_results else harness.DEFAULT_OUT)
    name = "yolo_trainer_quick" if args.quick else "yolo_trainer"
    t0 = time.time()
    cfg["data"] = write_dataset(args.cache / "yolo_trees", args.cache)
    cfg["teacher"] = train_teacher(cfg, args.cache)
    from ultralytics import YOLO

    teacher_map = float(YOLO(str(cfg["teacher"])).val(data=str(cfg["data"]), imgsz=dfd.TILE, device="cpu",
                                                      plots=False, verbose=False, workers=0).box.map)
    fp_keys = {k: cfg[k] for k in ("epochs", "batch", "model")}
    fp_keys["teacher"] = hashlib.sha1(Path(cfg["teacher"]).read_bytes()).hexdigest()[:12]
    cfg["fingerprint"] = hashlib.sha1(json.dumps(fp_keys, sort_keys=True).encode()).hexdigest()[:10]
    store = out / f"{name}.runs"
    store.mkdir(parents=True, exist_ok=True)
    jobs = [(a, sc, s) for s in cfg["seeds"] for sc in cfg["scales"] for a in arms]
    runs, todo = [], []
    for a, sc, s in jobs:
        f = store / f"{a}_{sc}_seed{s}.{cfg['fingerprint']}.json"
        (runs.append(json.loads(f.read_text())) if f.is_file() else todo.append((a, sc, s)))
    print(f"{len(runs)} of {len(jobs)} runs reused from {store}")
    cfg_run = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()}

    def keep(r):
        runs.append(r)
        (store / f"{r['arm']}_{r['scale']}_seed{r['seed']}.{cfg['fingerprint']}.json").write_text(json.dumps(r))
        print(f"{r['arm']:14s} {r['scale']} seed {r['seed']}: mAP50-95 {r['mAP50-95']:.4f} ({r['train_s']:.0f} s)",
              flush=True)

    work = [(a, sc, s, cfg_run, args.cache, args.threads) for a, sc, s in todo]
    if args.jobs > 1 and work:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(_worker, work):
                keep(r)
    else:
        for w in work:
            keep(_worker(w))
    runs.sort(key=lambda r: (r["scale"], r["seed"], ARMS.index(r["arm"])))
    gaps = [deployment_gap(args.cache, Path(cfg["data"]).parent, round(dfd.TILE * r["scale"]), Path(r["last"]))
            for r in runs if r["arm"] == arms[-1] and r["seed"] == cfg["seeds"][0] and Path(r["last"]).is_file()]
    res = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()}, "teacher_map": teacher_map,
           "runs": runs, "deployment_gap": gaps, "contrasts": contrasts(runs), "training_time_s": sum(r["train_s"] for r in runs),
           "wall_time_s": time.time() - t0, "versions": harness.versions()}
    harness.write_json(out / f"{name}.json", res)
    (out / f"{name}.md").write_text(markdown(res) + "\n")
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()

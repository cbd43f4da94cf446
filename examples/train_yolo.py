"""LRDet with Ultralytics YOLO: a YOLOv8n student at 0.5x distilled from a YOLOv8n teacher at 1x (tree crowns).

The DeepForest tiles (NEON aerial images, 10 cm/px, see ``deepforest_data.py``): a YOLOv8n teacher is trained
from scratch on native 256 px crops, then a YOLOv8n student on the same crops at 0.5x (128 px), once alone
(``lr_baseline``), once alone from the teacher's weights (``inherit``, weight inheriting only) and once through
:class:`lrdet_core.BridgeDistiller` (``lrdet``: the bridge, feature distillation and weights inherited from the
teacher), on the same seeds: ``lrdet - inherit`` is what the bridge and the distillation add. AP is COCO
AP@[.5:.95] on the held-out rows of the training image (``val``) and on the other images and sites
(``cross_site``), with the LR predictions scaled back to native pixels.

Models are built from ``yolov8n.yaml`` with no weights (nothing is downloaded but the data wheel), one class.
Ultralytics is AGPL-3.0 licensed; from a checkout: ``pip install -e ".[examples,ultralytics]"``.

Usage::

    python examples/train_yolo.py --quick      # smoke test (CI): a few iterations, one seed
    python examples/train_yolo.py              # 3 seeds: teacher 400 iterations, students 200 (batch 8)
    python examples/train_yolo.py --seeds 0 --iters 100 --teacher-iters 200   # a shorter schedule

Outputs (``--out``, default ``runs/``): ``yolo[_quick].json`` (every run's metrics and loss logs, the settings,
versions and wall time), ``yolo[_quick].md`` (the table) and ``yolo_student.pt`` (the last LRDet student as an
Ultralytics checkpoint: ``YOLO("runs/yolo_student.pt")`` loads it).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepforest_data as dfd  # noqa: E402

from lrdet_core import BridgeDistiller, inherit_weights  # noqa: E402

PRESETS = {
    "quick": dict(scale=0.5, teacher_iters=3, iters=2, batch=2, seeds=[0], lr=1e-3, eval_tiles=2),
    "default": dict(scale=0.5, teacher_iters=400, iters=200, batch=8, seeds=[0, 1, 2], lr=1e-3, eval_tiles=None),
}
METHODS = ("lr_baseline", "inherit", "lrdet")


def build(nc: int = 1) -> nn.Module:
    """A YOLOv8n detection model from its yaml, no weights."""
    from ultralytics.nn.tasks import DetectionModel
    return DetectionModel("yolov8n.yaml", nc=nc, verbose=False)


def targets(boxes: Tensor) -> Dict[str, Tensor]:
    """One crown class: YOLO's class index 0."""
    return {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64)}


def make_batch(crops: dfd.TrainCrops, n: int, scale: float, g: torch.Generator):
    """LR images and targets (boxes scaled) and the HR ones (native) of ``n`` augmented crops."""
    lr_i, lr_t, hr_i, hr_t = [], [], [], []
    for _ in range(n):
        hr, boxes = crops.sample(g)
        lr, lr_boxes = dfd.downsample(hr, boxes, scale)
        lr_i.append(lr), lr_t.append(targets(lr_boxes)), hr_i.append(hr), hr_t.append(targets(boxes))
    return lr_i, lr_t, hr_i, hr_t


def cosine(warmup: int, iters: int) -> Callable[[int], float]:
    def f(i: int) -> float:
        return (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(iters - warmup, 1)))
    return f


def train(module: nn.Module, step: Callable[[int], Dict[str, Tensor]], iters: int, lr: float,
          log_every: int = 50) -> List[Dict[str, float]]:
    """AdamW with linear warm-up and cosine decay, gradient norm clipped at 10; a log of mean losses."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(min(50, max(iters // 5, 1)), iters))
    module.train()
    log, running = [], {}
    for i in range(iters):
        losses = step(i)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {i}: { {k: float(v) for k, v in losses.items()} }")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (i + 1) % log_every == 0 or i + 1 == iters:
            n = (i % log_every) + 1
            log.append({"iter": i + 1, **{k: v / n for k, v in running.items()}})
            running = {}
    return log


@torch.no_grad()
def predict(model: nn.Module, tiles: List[Dict], scale: float, batch: int = 8) -> List[Dict[str, Tensor]]:
    """Boxes (native pixels) and scores after YOLO's NMS (confidence 0.001, IoU 0.7, as its validator)."""
    from ultralytics.utils.nms import non_max_suppression

    model.eval()
    out = []
    for i in range(0, len(tiles), batch):
        imgs = torch.stack([dfd.downsample(t["image"], t["boxes"], scale)[0] for t in tiles[i:i + batch]])
        raw = model(imgs)
        for det in non_max_suppression(raw[0] if isinstance(raw, tuple) else raw, 0.001, 0.7, max_det=300):
            out.append({"boxes": det[:, :4] / scale, "scores": det[:, 4]})
    return out


def coco_ap(tiles: List[Dict], preds: List[Dict[str, Tensor]]) -> Dict[str, float]:
    """COCO AP@[.5:.95] and AP50 (pycocotools), every tile one image, boxes in native pixels."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (t, p) in enumerate(zip(tiles, preds)):
        images.append({"id": i, "width": int(t["image"].shape[-1]), "height": int(t["image"].shape[-2])})
        for b in t["boxes"].tolist():
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b, s in zip(p["boxes"].tolist(), p["scores"].tolist()):
            dets.append({"image_id": i, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "tree"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not dets:
            return {"AP": 0.0, "AP50": 0.0}
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1])}


def evaluate(model: nn.Module, splits: Dict[str, List[Dict]], scale: float) -> Dict[str, Dict[str, float]]:
    return {name: coco_ap(tiles, predict(model, tiles, scale)) for name, tiles in splits.items()}


def run(cfg: dict, crops: dfd.TrainCrops, splits: Dict[str, List[Dict]], out: Path) -> dict:
    """The teacher, then each seed's baseline and LRDet student; every run's metrics and loss log."""
    from lrdet_core.adapters.ultralytics import save_checkpoint

    res: dict = {"runs": {}, "loss_logs": {}}
    t0 = time.time()
    torch.manual_seed(1234)
    g = torch.Generator().manual_seed(1234)
    teacher = build()
    res["loss_logs"]["hr_teacher"] = train(
        teacher, lambda i: _own_losses(teacher, *make_batch(crops, cfg["batch"], 1.0, g)[2:]),
        cfg["teacher_iters"], cfg["lr"])
    res["runs"]["hr_teacher"] = {"-": evaluate(teacher, splits, 1.0)}
    print("hr_teacher", res["runs"]["hr_teacher"]["-"], f"{time.time() - t0:.0f} s", flush=True)
    for seed in cfg["seeds"]:  # seed-major: an interrupted run still has its finished pairs in the log
        for method in METHODS:
            res["runs"].setdefault(method, {})
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(10_000 + seed)  # the same crops for both methods of a seed
            student = build()
            if method in ("lr_baseline", "inherit"):
                if method == "inherit":
                    inherit_weights(student, teacher)

                def step(i: int) -> Dict[str, Tensor]:
                    lr_i, lr_t, _, _ = make_batch(crops, cfg["batch"], cfg["scale"], g)
                    return _own_losses(student, lr_i, lr_t)
                module: nn.Module = student
            else:
                module = distiller = BridgeDistiller(student, teacher, inherit=True, alpha="auto")

                def step(i: int) -> Dict[str, Tensor]:
                    lr_i, lr_t, hr_i, hr_t = make_batch(crops, cfg["batch"], cfg["scale"], g)
                    return distiller(lr_i, lr_t, hr_images=hr_i, hr_targets=hr_t)
            res["loss_logs"][f"{method}/{seed}"] = train(module, step, cfg["iters"], cfg["lr"])
            res["runs"][method][str(seed)] = evaluate(student, splits, cfg["scale"])
            print(method, seed, res["runs"][method][str(seed)], f"{time.time() - t0:.0f} s", flush=True)
            if method == "lrdet":
                save_checkpoint(student, out / "yolo_student.pt")
    return res


def _own_losses(model: nn.Module, images: List[Tensor], tgts: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """A YOLO model's own box/cls/dfl losses on a batch, through the same adapter the distiller uses."""
    from lrdet_core.adapters.ultralytics import UltralyticsAdapter

    return dict(UltralyticsAdapter(model, None, "model").student_pass(images, tgts, keep_neck=False).losses)


def mean_sd(xs: Sequence[float]) -> Tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def markdown(res: dict, cfg: dict) -> str:
    seeds = cfg["seeds"]
    lines = ["| model | val AP | val AP50 | cross-site AP | seeds |", "|---|---|---|---|---|"]
    for name, per_seed in res["runs"].items():
        cells = []
        for split, metric in (("val", "AP"), ("val", "AP50"), ("cross_site", "AP")):
            m, s = mean_sd([r[split][metric] for r in per_seed.values()])
            cells.append(f"{m:.3f} ± {s:.3f}" if len(per_seed) > 1 else f"{m:.3f}")
        label = {"hr_teacher": "YOLOv8n teacher, 1x (256 px)", "lr_baseline": f"YOLOv8n, {cfg['scale']}x, alone",
                 "inherit": f"YOLOv8n, {cfg['scale']}x, teacher's weights, alone",
                 "lrdet": f"YOLOv8n, {cfg['scale']}x, LRDet"}[name]
        lines.append(f"| {label} | {' | '.join(cells)} | {len(per_seed) if name != 'hr_teacher' else '-'} |")
    lines += ["", "| paired by seed (val AP) | mean | SE | seeds > 0 | per seed |", "|---|---|---|---|---|"]
    for a, b in (("lrdet", "lr_baseline"), ("inherit", "lr_baseline"), ("lrdet", "inherit")):
        if a not in res["runs"] or b not in res["runs"]:
            continue
        diffs = [res["runs"][a][str(s)]["val"]["AP"] - res["runs"][b][str(s)]["val"]["AP"] for s in seeds]
        m, sd = mean_sd(diffs)
        lines.append(f"| {a} − {b} | {m:+.4f} | {sd / math.sqrt(len(diffs)):.4f} | {sum(d > 0 for d in diffs)}/"
                     f"{len(diffs)} | {', '.join(f'{d:+.3f}' for d in diffs)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few iterations, one seed (CI)")
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    ap.add_argument("--iters", type=int, default=None, help="override the students' iterations")
    ap.add_argument("--teacher-iters", type=int, default=None, help="override the teacher's iterations")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "default"
    cfg = dict(PRESETS[preset])
    for key in ("seeds", "iters", "teacher_iters"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    crops = dfd.TrainCrops()
    splits = {s: dfd.load_split(s)[:cfg["eval_tiles"]] for s in ("val", "cross_site")}
    res = run(cfg, crops, splits, args.out)
    import ultralytics
    res.update(preset=preset, config=cfg, wall_s=round(time.time() - t0, 1),
               machine={"platform": platform.platform(), "processor": platform.processor(),
                        "threads": torch.get_num_threads()},
               versions={"torch": torch.__version__, "ultralytics": ultralytics.__version__})
    name = "yolo" if preset == "default" else f"yolo_{preset}"
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1))
    table = markdown(res, cfg)
    (args.out / f"{name}.md").write_text(table)
    print(table, f"wall time {res['wall_s']:.0f} s", sep="\n")
    return res


if __name__ == "__main__":
    main()

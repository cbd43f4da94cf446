"""Reproduce LRDet on real aerial images: tree crowns from NEON (the DeepForest sample data).

An FCOS with a small from-scratch backbone is trained as the HR teacher on native 256 px tiles
(10 cm/px); LR students see the same tiles downsampled with antialiasing (0.5x by default, i.e.
20 cm/px, crowns of 15-25 px). Runs, all scored on the held-out rows of the training image and,
separately, on tiles from other images and sites ("cross-site"):

==============  ==================================================================================
hr_teacher      the teacher, at HR (an upper reference, not a competitor)
lr_baseline     the student trained alone at LR
fitnet_up       + upsample distillation: LR neck maps resized to the teacher's, MSE (no bridge)
bridge          + LRDet's bridge branch and feature distillation, random initialisation
inherit         + weights inherited from the teacher, no distillation
lrdet           bridge + inherit (the full method)
lrdet_<loss>    lrdet with the L1 / CWD / FGD distillation loss instead of MSE (``--full``)
lrdet_every2    lrdet distilling on every 2nd step only (``distill_every=2``; also every4)
lrdet_crop25    lrdet with the teacher and the bridge on a quarter of the HR tile (``bridge_crop=0.25``)
==============  ==================================================================================

Predictions of LR models are scaled back to native pixels before COCO evaluation, so AP_S/AP_M
always refer to the same crowns (COCO: small < 32^2 native px).

Usage::

    python examples/reproduce_deepforest.py            # default preset, ~30 min on a (shared) 2-core CPU
    python examples/reproduce_deepforest.py --quick    # smoke test (CI)
    python examples/reproduce_deepforest.py --full     # longer schedule, more seeds, all losses
    python examples/reproduce_deepforest.py --full --jobs 2   # two runs at a time (one per core)
    python examples/reproduce_deepforest.py --preset powered --jobs 2        # 0.75x, 10 seeds: several hours
    python examples/reproduce_deepforest.py --preset powered_terms --jobs 2  # the bridge's two terms alone
    python examples/reproduce_deepforest.py --preset powered_sgd --jobs 2    # the paper's SGD at 0.75x

Every finished (method, seed) run is saved at once (``<out>/<name>.runs/``); rerunning an interrupted
command skips the finished runs and gives the same numbers.

Outputs (``--out``, default ``runs/``, untracked; ``--save-results`` writes into the committed
``examples/results``): ``deepforest[_<preset>].json`` with every run's
metrics and settings, ``deepforest[_<preset>].md`` (tables), ``deepforest[_<preset>]_ap.png`` (AP per
method), ``deepforest[_<preset>]_features.png`` (FPN activation maps, as in the paper's Fig. 2) and
``deepforest[_<preset>]_detections.png`` (detections with misses and false positives, as in Fig. 3).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import platform
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepforest_data as dfd  # noqa: E402
import harness  # noqa: E402
from harness import DEFAULT_OUT, OPTIMIZERS, REPO, json_safe, seed_all, train  # noqa: E402

HERE = Path(__file__).resolve().parent
METRICS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR100")

# ------------------------------------------------------------------------------------------------
# Model: FCOS on a small conv-BN body with the BackboneWithFPN layout (``.body`` / ``.fpn``), so
# the distiller's automatic split points ``backbone.body`` / ``backbone.fpn`` apply.
# ------------------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = _conv_bn(c, c)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.b(self.a(x)))


class SmallBody(nn.Module):
    """A from-scratch conv-BN body returning C3, C4, C5 (strides 8, 16, 32) as an OrderedDict."""

    def __init__(self, widths: Sequence[int] = (24, 32, 64, 128, 192)):
        super().__init__()
        w = widths
        self.stem = nn.Sequential(_conv_bn(3, w[0], 2), _conv_bn(w[0], w[1], 2))           # stride 4
        self.c3 = nn.Sequential(_conv_bn(w[1], w[2], 2), _Res(w[2]))                       # stride 8
        self.c4 = nn.Sequential(_conv_bn(w[2], w[3], 2), _Res(w[3]))                       # stride 16
        self.c5 = nn.Sequential(_conv_bn(w[3], w[4], 2), _Res(w[4]))                       # stride 32
        self.out_channels_list = list(w[2:])

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        return OrderedDict([("0", c3), ("1", c4), ("2", self.c5(c4))])


class SmallBackbone(nn.Module):
    """``body`` + torchvision ``FeaturePyramidNetwork``: the structure of torchvision's BackboneWithFPN."""

    def __init__(self, fpn_channels: int = 64):
        from torchvision.ops import FeaturePyramidNetwork

        super().__init__()
        self.body = SmallBody()
        self.fpn = FeaturePyramidNetwork(self.body.out_channels_list, fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(x))


def build_fcos(size: int, head_convs: int = 2, score_thresh: float = 0.05) -> nn.Module:
    """FCOS (P3-P5, one class) for ``size`` x ``size`` tiles that are already standardised.

    ``min_size = max_size = size`` so torchvision's transform never resizes (LR tiles are made by
    antialiased downsampling beforehand); mean 0 / std 1 because tiles are standardised per tile.
    """
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    backbone = SmallBackbone()
    anchors = AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3)  # one point per location, size = stride
    head = FCOSHead(backbone.out_channels, 1, 2, num_convs=head_convs)
    return FCOS(backbone, num_classes=2, min_size=size, max_size=size, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                anchor_generator=anchors, head=head, score_thresh=score_thresh, detections_per_img=100)


# ------------------------------------------------------------------------------------------------
# Data: batches of (LR view, HR view) of the same random crops
# ------------------------------------------------------------------------------------------------


def make_batch(crops: dfd.TrainCrops, batch: int, scale: float, g: torch.Generator):
    """Standardised LR and HR images with their targets (LR boxes scaled, HR boxes native)."""
    lr_imgs, lr_tgts, hr_imgs, hr_tgts = [], [], [], []
    for _ in range(batch):
        hr, boxes = crops.sample(g)
        lr, lr_boxes = dfd.downsample(hr, boxes, scale)
        hr_imgs.append(dfd.standardise(hr))
        hr_tgts.append(dfd.target(boxes))
        lr_imgs.append(dfd.standardise(lr))
        lr_tgts.append(dfd.target(lr_boxes))
    return lr_imgs, lr_tgts, hr_imgs, hr_tgts


# ------------------------------------------------------------------------------------------------
# COCO evaluation (the training loop, ``train``, is the examples' harness.py)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, tiles: List[Dict], scale: float, batch: int = 8) -> List[Dict[str, Tensor]]:
    """Predictions for each tile at ``scale``, with boxes mapped back to native pixels."""
    model.eval()
    out = []
    for i in range(0, len(tiles), batch):
        imgs = [dfd.standardise(dfd.downsample(t["image"], t["boxes"], scale)[0]) for t in tiles[i:i + batch]]
        for p in model(imgs):
            out.append({k: (v / scale if k == "boxes" else v) for k, v in p.items()})
    return out


def coco_metrics(tiles: List[Dict], preds: List[Dict[str, Tensor]]) -> Dict[str, float]:
    """COCO box metrics (pycocotools) over tiles; every tile is one image, boxes in native pixels."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (t, p) in enumerate(zip(tiles, preds)):
        h, w = t["image"].shape[-2:]
        images.append({"id": i, "width": int(w), "height": int(h)})
        for b in t["boxes"].tolist():
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b, s in zip(p["boxes"].tolist(), p["scores"].tolist()):
            dets.append({"image_id": i, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "score": s})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "tree"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not dets:
            return {m: 0.0 for m in METRICS}
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats  # -1 where a size range has no crowns: reported as NaN
    vals = [s[0], s[1], s[2], s[3], s[4], s[5], s[8]]
    return {m: (float(v) if v >= 0 else float("nan")) for m, v in zip(METRICS, vals)}


def evaluate(model: nn.Module, splits: Dict[str, List[Dict]], scale: float) -> Dict[str, Dict[str, float]]:
    return {name: coco_metrics(tiles, predict(model, tiles, scale)) for name, tiles in splits.items()}


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------

#: MSE weight of the powered presets: the 0.5x presets' weight, kept so that the two scales differ only in the
#: resolution gap (the first-step balance at 0.75x is in the powered results' loss logs).
POWERED_ALPHA = 2e-7

PRESETS = {
    "quick": dict(scale=0.5, teacher_iters=4, iters=3, batch=2, seeds=[0], lr=1e-3, alpha=2e-7,
                  methods=["lr_baseline", "fitnet_up", "lrdet"]),
    "default": dict(scale=0.5, teacher_iters=600, iters=350, batch=8, seeds=[0, 1, 2], lr=1e-3, alpha=2e-7,
                    methods=["lr_baseline", "fitnet_up", "bridge", "inherit", "lrdet"]),
    "full": dict(scale=0.5, teacher_iters=1000, iters=1000, batch=8, seeds=[0, 1, 2, 3, 4], lr=1e-3, alpha=2e-7,
                 methods=["lr_baseline", "fitnet_up", "bridge", "inherit", "lrdet", "lrdet_l1", "lrdet_cwd",
                          "lrdet_fgd"]),
    # The paper's resolution gap (600 vs 800 px: 0.75x), a teacher trained 2x as long as the students, 10
    # paired seeds and a 50% larger held-out set (768 rows: 24 tiles, 172 crowns), to see an effect of the
    # size of the paper's (LRDet over inherit: +0.8 AP of 37 in its Table 4a).
    "powered": dict(scale=0.75, teacher_iters=2000, iters=1000, batch=8, seeds=list(range(10)), lr=1e-3,
                    alpha=POWERED_ALPHA, held_out_rows=768,
                    methods=["lr_baseline", "fitnet_up", "bridge", "inherit", "lrdet"]),
    # The bridge's two terms on their own, on top of inheriting (same teacher and seeds as "powered", paired
    # with its runs by examples/compare_runs.py): lrdet_det_only (alpha = 0), lrdet_fd_only (hr_det_weight = 0).
    "powered_terms": dict(scale=0.75, teacher_iters=2000, iters=1000, batch=8, seeds=[0, 1, 2, 3, 4, 5, 6, 7],
                          lr=1e-3, alpha=POWERED_ALPHA, held_out_rows=768, methods=["lrdet_det_only", "lrdet_fd_only"]),
    # The same at the paper's optimiser: SGD, momentum 0.9, step decay, gradient clipping (same teacher).
    # fitnet_up asks the paper's Table 1 question (bridge against upsample) under its optimiser; lrdet_auto is
    # LRDet with alpha="auto" against the hand-picked alpha of "lrdet".
    "powered_sgd": dict(scale=0.75, teacher_iters=2000, iters=1000, batch=8, seeds=list(range(10)), lr=0.01,
                        teacher_lr=1e-3, alpha=POWERED_ALPHA, held_out_rows=768, optim="sgd",
                        methods=["lr_baseline", "fitnet_up", "bridge", "inherit", "lrdet", "lrdet_auto",
                                 "lrdet_every2", "lrdet_every4", "lrdet_crop25", "lrdet_every2_crop25"]),
}
#: The cheap presets: LRDet with the cost options of docs/cost.md (the teacher and the bridge on every k-th step,
#: on a window of a quarter of the HR tile, or both).
CHEAP = {"every2": dict(distill_every=2), "every4": dict(distill_every=4), "crop25": dict(bridge_crop=0.25),
         "every2_crop25": dict(distill_every=2, bridge_crop=0.25)}
#: Distillation weights. The library's recommended ones (the paper's alpha = 0.005 for sum-reduced MSE)
#: fit ResNet-50 FPN features on COCO; this small from-scratch FPN has unnormalised outputs whose
#: sum-reduced MSE to the teacher is ~4e6 per batch of 8 at the start, so 0.005 would make the
#: distillation term ~2e4 times the detection loss. Each weight below makes alpha * L_FD ~0.8 at the
#: start of an LRDet run (about half the LR detection loss), measured with the 600-iteration teacher.
#: ``--alpha`` overrides the MSE weight (also used by fitnet_up).
ALPHAS = {"mse": 2e-7, "l1": 6e-7, "cwd": 0.2, "fgd": 7e-3}
ALL_METHODS = ["lr_baseline", "fitnet_up", "bridge", "inherit", "lrdet", "lrdet_l1", "lrdet_cwd", "lrdet_fgd",
               "bridge_det_only", "bridge_fd_only", "lrdet_det_only", "lrdet_fd_only", "lrdet_auto",
               *(f"lrdet_{c}" for c in CHEAP)]
LABELS = {"hr_teacher": "HR teacher (1x)", "lr_baseline": "LR baseline", "fitnet_up": "+ upsample distill (Fitnet/Up)",
          "bridge": "+ bridge", "inherit": "+ inherit", "lrdet": "+ bridge + inherit (LRDet)",
          "lrdet_l1": "LRDet, L1", "lrdet_cwd": "LRDet, CWD", "lrdet_fgd": "LRDet, FGD",
          "bridge_det_only": "+ bridge, L_det(HR) only", "bridge_fd_only": "+ bridge, distillation only",
          "lrdet_det_only": "LRDet, L_det(HR) only", "lrdet_fd_only": "LRDet, distillation only",
          "lrdet_auto": "LRDet, alpha=\"auto\"", "lrdet_every2": "LRDet, every 2nd step",
          "lrdet_every4": "LRDet, every 4th step", "lrdet_crop25": "LRDet, bridge on 1/4 of the tile",
          "lrdet_every2_crop25": "LRDet, every 2nd step, 1/4 tile"}
#: Paired contrasts reported with their standard error: (a, b) means a - b on the same seed.
CONTRASTS = [("lrdet", "inherit"), ("bridge", "lr_baseline"), ("bridge", "fitnet_up"), ("fitnet_up", "lr_baseline"),
             ("inherit", "lr_baseline"), ("lrdet", "lr_baseline"), ("bridge", "lrdet"), ("inherit", "bridge"),
             ("lrdet_det_only", "inherit"),
             ("lrdet_fd_only", "inherit"), ("lrdet", "lrdet_det_only"), ("lrdet", "lrdet_fd_only"),
             ("bridge_det_only", "lr_baseline"), ("bridge_fd_only", "lr_baseline"),
             ("lrdet_l1", "inherit"), ("lrdet_cwd", "inherit"), ("lrdet_fgd", "inherit"),
             ("lrdet_auto", "lrdet"), ("lrdet_auto", "inherit"),
             *(pair for c in CHEAP for pair in (("lrdet", f"lrdet_{c}"), (f"lrdet_{c}", "inherit")))]


def train_teacher(cfg: dict, crops: dfd.TrainCrops, cache: Optional[Path]):
    """The HR teacher and its training time, from the cache when one with these settings exists."""
    teacher = build_fcos(dfd.TILE)
    key = teacher_key(cfg)
    path = cache / f"deepforest_teacher_{teacher_tag(cfg)}.pt" if cache else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu")
        teacher.load_state_dict(saved["state_dict"])
        print(f"HR teacher loaded from {path} (trained in {saved['train_time_s']:.0f} s)")
        return teacher, saved["train_time_s"], True
    g = seed_all(cfg["teacher_seed"])
    teacher = build_fcos(dfd.TILE)  # rebuilt after seeding so the initialisation is reproducible

    def step(i):
        _, _, hr, hr_t = make_batch(crops, cfg["batch"], 1.0, g)
        return teacher(hr, hr_t)

    t = time.time()
    train(teacher, step, cfg["teacher_iters"], cfg["teacher_lr"], "HR teacher")  # always AdamW
    t = time.time() - t
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": teacher.state_dict(), "train_time_s": t, "settings": key}, path)
    return teacher, t, False


def run_student(method: str, seed: int, cfg: dict, crops: dfd.TrainCrops, teacher: nn.Module):
    """Train one LR student with ``method``; returns the plain student detector and its loss log."""
    from lrdet_core import BridgeDistiller, inherit_weights

    g = seed_all(seed)
    lr_size = round(dfd.TILE * cfg["scale"])
    student = build_fcos(lr_size)
    scale, batch = cfg["scale"], cfg["batch"]
    desc = f"{method} seed {seed}"
    quiet = bool(_WORKER)  # worker processes (--jobs) hide their bars: they would overwrite each other
    if method in ("lr_baseline", "inherit"):
        if method == "inherit":
            inherit_weights(student, teacher)

        def step(i):
            lr, lr_t, _, _ = make_batch(crops, batch, scale, g)
            return student(lr, lr_t)

        return student, train(student, step, cfg["iters"], cfg["lr"], desc, optim=cfg.get("optim", "adamw"),
                              quiet=quiet)
    base, _, variant = method.partition("_")
    loss = variant if variant in ALPHAS else "mse"
    alpha = cfg["alpha"] if loss == "mse" else ALPHAS[loss]
    if variant == "det_only":  # the bridge's HR detection loss without distillation
        alpha = 0.0
    elif variant == "auto":  # measured at the first step (alpha * L_FD = 0.5 L_det(LR)) instead of hand-picked
        alpha = "auto"
    d = BridgeDistiller(student, teacher, loss=loss, alpha=alpha, inherit=base == "lrdet", bridge=method != "fitnet_up",
                        hr_det_weight=0.0 if variant == "fd_only" else 1.0, **CHEAP.get(variant, {}))

    def step(i):
        lr, lr_t, hr, hr_t = make_batch(crops, batch, scale, g)
        return d(lr, lr_t, hr_images=hr, hr_targets=hr_t)

    return student, train(d, step, cfg["iters"], cfg["lr"], desc, optim=cfg.get("optim", "adamw"), quiet=quiet)


# Parallel runs (``--jobs``): each worker process loads the data and the teacher once, then trains
# whole (method, seed) runs. Every run seeds its own RNGs, so a run gives the same numbers whichever
# process trains it (tests/test_examples.py checks this against ``--jobs 1``).
_WORKER: Dict = {}
#: relative cost of one run, to start the long ones first so the workers finish together
_COST = {"lr_baseline": 1.0, "inherit": 1.0, "fitnet_up": 1.7, "lrdet_every2": 2.3, "lrdet_every4": 1.7,
         "lrdet_crop25": 2.3, "lrdet_every2_crop25": 1.7}  # guesses: they only order the queue


def load_data(cache: Path, quick: bool, held_out_rows: int = dfd.HELD_OUT_ROWS):
    crops = dfd.TrainCrops(cache_dir=str(cache), held_out_rows=held_out_rows)
    splits = {s: dfd.load_split(s, cache_dir=str(cache), held_out_rows=held_out_rows) for s in ("val", "cross_site")}
    if quick:  # a smoke test: every code path, a fraction of the tiles
        splits = {s: t[::4] for s, t in splits.items()}
    return crops, splits


def _init_worker(cache: Path, quick: bool, held_out_rows: int, teacher_state: Dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["crops"], _WORKER["splits"] = load_data(cache, quick, held_out_rows)
    _WORKER["teacher"] = build_fcos(dfd.TILE)
    _WORKER["teacher"].load_state_dict(teacher_state)


def run_and_evaluate(method: str, seed: int, cfg: dict, keep: bool, crops=None, splits=None, teacher=None):
    """One run: train, evaluate; the student's weights come back only when ``keep`` (for the figures)."""
    crops, splits, teacher = (crops, splits, teacher) if crops is not None else (
        _WORKER["crops"], _WORKER["splits"], _WORKER["teacher"])
    t = time.time()
    student, log = run_student(method, seed, cfg, crops, teacher)
    elapsed = time.time() - t
    res = evaluate(student, splits, cfg["scale"])
    return method, seed, res, elapsed, log, (student.state_dict() if keep else None)


def mean_std(xs: Sequence[float]):
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarise(results: Dict) -> Dict:
    """mean/std over seeds per method and split, and the paired difference to the LR baseline."""
    out = {}
    base = results["runs"].get("lr_baseline", {})
    for method, per_seed in results["runs"].items():
        out[method] = {}
        for split in ("val", "cross_site"):
            row = {}
            for m in METRICS:
                vals = [r[split][m] for r in per_seed.values()]
                row[m] = mean_std(vals)
                if method not in ("lr_baseline", "hr_teacher") and base:
                    diffs = [r[split][m] - base[s][split][m] for s, r in per_seed.items() if s in base]
                    row["d" + m] = mean_std(diffs)
            row["n"] = len(per_seed)
            out[method][split] = row
    return out


def contrasts(results: Dict, split: str = "val", metric: str = "AP") -> List[Dict]:
    """Paired differences ``a - b`` over the seeds both methods ran: mean, std, standard error, n, and how
    many seeds are positive. Only pairs whose two methods are in ``results`` appear."""
    runs, out = results["runs"], []
    for a, b in CONTRASTS:
        if a not in runs or b not in runs:
            continue
        seeds = [s for s in runs[a] if s in runs[b]]
        diffs = [runs[a][s][split][metric] - runs[b][s][split][metric] for s in seeds]
        diffs = [d for d in diffs if not math.isnan(d)]
        if not diffs:
            continue
        m, sd = mean_std(diffs)
        out.append({"a": a, "b": b, "mean": m, "std": sd, "se": sd / math.sqrt(len(diffs)), "n": len(diffs),
                    "positive": sum(d > 0 for d in diffs), "split": split, "metric": metric})
    return out


def fmt(ms, digits=3):
    m, s = ms
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _time_note(results: Dict) -> str:
    """The runs' summed training time: an invocation that reused finished runs has a meaningless wall time."""
    train = results.get("training_time_s", sum(v for k, v in results["timings_s"].items() if k != "hr_teacher"))
    n = results.get("resumed_runs", 0)
    when = (f"over several invocations, the last of which reused {n} finished runs" if n
            else f"wall time {results['wall_time_s'] / 60:.1f} min")
    return f"training time {_minutes(train)} summed over the runs on {results['machine']} ({when})"


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.1f} min"


def markdown(results: Dict, summary: Dict) -> str:
    cfg = results["config"]
    lines = [f"# LRDet on NEON tree crowns (DeepForest sample data), preset `{cfg['preset']}`", "",
             f"Command: `{cfg['command']}`  ",
             f"LR scale {cfg['scale']} (tiles {round(256 * cfg['scale'])} px, HR 256 px); teacher "
             f"{cfg['teacher_iters']} iterations (AdamW lr {cfg.get('teacher_lr', cfg['lr'])}), students "
             f"{cfg['iters']} iterations, batch {cfg['batch']}, {cfg.get('optim', 'adamw')} lr {cfg['lr']}, "
             f"held-out rows {cfg.get('held_out_rows', 512)}, alpha (MSE, sum) {cfg['alpha']} (L1/CWD/FGD: "
             f"{ALPHAS['l1']}/{ALPHAS['cwd']}/{ALPHAS['fgd']}); seeds {cfg['seeds']} (teacher seed "
             f"{cfg['teacher_seed']}); {_time_note(results)} "
             f"(teacher training: {results['timings_s']['hr_teacher'] / 60:.1f} min"
             f"{', loaded from the cache, not included' if results.get('teacher_cached') else ''}).", "",
             "Mean ± std over seeds. ΔAP: paired difference to the LR baseline with the same seed (same data order "
             "and initialisation). Boxes in native pixels for every model (COCO small: < 32² px).", ""]
    for split, title in (("val", "Held-out rows of the training image (main score)"),
                         ("cross_site", "Cross-site: other YELL image + OSBS + SOAP (robustness, different domain)")):
        lines += [f"## {title}", "",
                  "| method | n | AP | AP50 | AP75 | AP_S | AP_M | AR100 | ΔAP vs LR baseline |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in summary:
            r = summary[method][split]
            delta = fmt(r["dAP"]) if "dAP" in r else ""
            lines.append(f"| {LABELS.get(method, method)} | {r['n']} | " + " | ".join(
                fmt(r[m]) for m in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AR100")) + f" | {delta} |")
        lines.append("")
    rows = results.get("contrasts", [])
    if rows:
        lines += ["## Paired contrasts (held-out AP, a − b on the same seed)", "",
                  "| contrast | mean | SE | std | seeds | seeds > 0 |", "|---|---|---|---|---|---|"]
        for c in rows:
            lines.append(f"| {c['a']} − {c['b']} | {c['mean']:+.4f} | {c['se']:.4f} | {c['std']:.4f} | {c['n']} | "
                         f"{c['positive']}/{c['n']} |")
        lines.append("")
    return "\n".join(lines)


def plot_ap(results: Dict, path: Path, title: str) -> None:
    """Bars: mean AP per method (error bar: std over seeds); dots: the individual seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    methods = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=False)
    for ax, split in zip(axes, ("val", "cross_site")):
        ms = [summary[m][split]["AP"] for m in methods]
        colors = ["#888888" if m == "hr_teacher" else "#4c72b0" if m in ("lr_baseline",) else "#dd8452"
                  for m in methods]
        ax.bar(range(len(methods)), [m for m, _ in ms], yerr=[s for _, s in ms], color=colors, capsize=4)
        for i, m in enumerate(methods):
            pts = [r[split]["AP"] for r in results["runs"][m].values()]
            ax.plot([i] * len(pts), pts, "k.", ms=4, alpha=0.7)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([LABELS.get(m, m).replace(" (", "\n(") for m in methods], rotation=35, ha="right",
                           fontsize=8)
        ax.set_ylabel("COCO AP")
        ax.set_title({"val": "held-out (main)", "cross_site": "cross-site"}[split])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _box_patch(box: Sequence[float], **style):
    """An unfilled matplotlib rectangle for an (x1, y1, x2, y2) box."""
    import matplotlib.pyplot as plt

    return plt.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, **style)


@torch.no_grad()
def plot_features(models: Dict[str, tuple], tile: Dict, path: Path) -> None:
    """Mean |activation| of the FPN outputs (P3) of each model on one held-out tile (cf. paper Fig. 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models) + 1, figsize=(3.2 * (len(models) + 1), 3.9))
    axes[0].imshow(tile["image"].permute(1, 2, 0).numpy())
    for b in tile["boxes"].tolist():
        axes[0].add_patch(_box_patch(b, color="y", lw=0.8))
    axes[0].set_title("held-out tile (HR)", fontsize=9)
    for ax, (name, (model, scale)) in zip(axes[1:], models.items()):
        model.eval()
        img = dfd.standardise(dfd.downsample(tile["image"], tile["boxes"], scale)[0])
        feats = model.backbone(img[None])
        p3 = next(iter(feats.values()))[0].abs().mean(0)
        ax.imshow(p3.numpy(), cmap="viridis", extent=(0, 256, 256, 0))
        ax.set_title(f"{name}\nP3 {tuple(p3.shape)}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def match(pred: Tensor, gt: Tensor, iou_thresh: float = 0.5):
    """Greedy matching in score order (``pred`` sorted by score, as torchvision returns it), as in
    COCO's evaluation: returns the true-positive mask of ``pred`` and the found mask of ``gt``."""
    from torchvision.ops import box_iou

    tp = torch.zeros(len(pred), dtype=torch.bool)
    found = torch.zeros(len(gt), dtype=torch.bool)
    if len(pred) and len(gt):
        iou = box_iou(pred, gt)
        for i in range(len(pred)):
            cand = iou[i].masked_fill(found, -1.0)
            j = int(cand.argmax())
            if cand[j] >= iou_thresh:
                tp[i], found[j] = True, True
    return tp, found


def best_threshold(tiles: List[Dict], preds: List[Dict[str, Tensor]]) -> tuple:
    """The score threshold with the best F1 (IoU 0.5) over ``tiles``, and that F1. Each model gets its
    own operating point, so a model is not judged by a threshold tuned for another."""
    best = (0.05, -1.0)
    for thr in [i / 20 for i in range(1, 20)]:
        tp = fp = fn = 0
        for t, p in zip(tiles, preds):
            keep = p["scores"] >= thr
            hit, found = match(p["boxes"][keep], t["boxes"])
            tp, fp, fn = tp + int(hit.sum()), fp + int((~hit).sum()), fn + int((~found).sum())
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        if f1 > best[1]:
            best = (thr, f1)
    return best


@torch.no_grad()
def plot_detections(models: Dict[str, tuple], tiles: List[Dict], index: int, path: Path) -> None:
    """Detections of each model on one held-out tile (cf. paper Fig. 3): green = correct (IoU >= 0.5),
    red = false positive, yellow dashed = missed crown. Each model at its best-F1 score threshold
    over all held-out tiles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 4.0))
    axes = [axes] if len(models) == 1 else list(axes)
    tile = tiles[index]
    for ax, (name, (model, scale)) in zip(axes, models.items()):
        preds = predict(model, tiles, scale)
        thr, f1 = best_threshold(tiles, preds)
        p = preds[index]
        keep = p["scores"] >= thr
        boxes = p["boxes"][keep]
        hit, found = match(boxes, tile["boxes"])
        img = tile["image"] if scale == 1.0 else dfd.downsample(tile["image"], tile["boxes"], scale)[0]
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, 256, 256, 0))  # drawn in native px
        for b in tile["boxes"][~found].tolist():
            ax.add_patch(_box_patch(b, color="yellow", lw=1.2, ls="--"))
        for b, ok in zip(boxes.tolist(), hit.tolist()):
            ax.add_patch(_box_patch(b, color="lime" if ok else "red", lw=1.0))
        ax.set_title(f"{name} (input {round(256 * scale)} px)\nthr {thr:.2f} (F1 {f1:.2f} on all held-out tiles)\n"
                     f"this tile: {int(hit.sum())} correct, {int((~hit).sum())} false, {int((~found).sum())} missed",
                     fontsize=8)
        ax.axis("off")
    fig.suptitle("green: correct (IoU >= 0.5), red: false positive, yellow dashed: missed crown", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the legend line above the panel titles
    fig.savefig(path, dpi=110)
    plt.close(fig)


def teacher_key(cfg: dict) -> Dict:
    """The settings that determine the HR teacher (its cache key)."""
    key = {"teacher_iters": cfg["teacher_iters"], "batch": cfg["batch"], "lr": cfg["teacher_lr"],
           "teacher_seed": cfg["teacher_seed"]}  # "lr" is the teacher's: the key's spelling before the SGD presets
    if cfg.get("held_out_rows", dfd.HELD_OUT_ROWS) != dfd.HELD_OUT_ROWS:
        key["held_out_rows"] = cfg["held_out_rows"]
    return key


def teacher_tag(cfg: dict) -> str:
    """The name of the teacher's cache file: a hash of ``teacher_key(cfg)``."""
    return hashlib.sha1(json.dumps(teacher_key(cfg), sort_keys=True).encode()).hexdigest()[:10]


def state_sha(model: nn.Module) -> str:
    """A hash of a model's weights: runs are reused only with the very teacher they were trained with (a
    teacher trained again on another CPU may differ in the last bits)."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def run_fingerprint(cfg: dict) -> str:
    """What a (method, seed) run's numbers depend on besides the method and the seed; a finished run is
    reused by a later invocation only when its fingerprint is the same."""
    keys = ("scale", "iters", "batch", "lr", "alpha", "optim", "held_out_rows", "quick", "teacher_sha")
    d = {k: cfg.get(k) for k in keys}
    d["teacher"] = teacher_key(cfg)
    d["alphas"] = ALPHAS
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class RunStore:
    """Finished (method, seed) runs as one JSON file each, written as each run completes, so that an
    interrupted invocation loses only the runs in flight and a rerun of the same command skips the rest.
    The weights of the students kept for the figures go to the cache folder (they are large)."""

    def __init__(self, folder: Path, weights: Path, fingerprint: str):
        self.folder, self.weights, self.fingerprint = folder, weights, fingerprint

    def _json(self, method: str, seed: int) -> Path:
        # the fingerprint in the name: a run with other settings under the same --name never overwrites it
        return self.folder / f"{method}_seed{seed}.{self.fingerprint}.json"

    def _pt(self, method: str, seed: int) -> Path:
        return self.weights / f"{self.fingerprint}_{method}_seed{seed}.pt"

    def load(self, method: str, seed: int, need_state: bool):
        """The finished run as ``run_and_evaluate`` returns it, or None when it has to run (again)."""
        path = self._json(method, seed)
        if not path.is_file():
            return None
        rec = json.loads(path.read_text())
        if rec.get("fingerprint") != self.fingerprint:
            return None
        state = None
        if need_state:
            if not self._pt(method, seed).is_file():
                return None  # runs are deterministic: training it again gives the same numbers and the weights
            state = torch.load(self._pt(method, seed), map_location="cpu")
        res = {split: {m: (float("nan") if v is None else v) for m, v in r.items()} for split, r in rec["res"].items()}
        return method, seed, res, rec["elapsed_s"], rec["log"], state

    def save(self, out) -> None:
        method, seed, res, elapsed, log, state = out
        self.folder.mkdir(parents=True, exist_ok=True)
        rec = {"method": method, "seed": seed, "fingerprint": self.fingerprint, "elapsed_s": elapsed,
               "res": json_safe(res), "log": log}
        tmp = self._json(method, seed).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, allow_nan=False))
        tmp.replace(self._json(method, seed))  # atomic: a killed process never leaves half a file
        if state is not None:
            self.weights.mkdir(parents=True, exist_ok=True)
            torch.save(state, self._pt(method, seed))


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=list(PRESETS), help="default: 'default' (the README's main job, ~30 min)")
    g.add_argument("--quick", action="store_true", help="= --preset quick: a few iterations, one seed (CI)")
    g.add_argument("--full", action="store_true", help="= --preset full: longer schedule, 5 seeds, all losses")
    p.add_argument("--scale", type=float, help="LR scale (default 0.5; 0.25 is the harder preset)")
    p.add_argument("--iters", type=int, help="student iterations")
    p.add_argument("--teacher-iters", type=int, help="teacher iterations")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float, help="the students' learning rate")
    p.add_argument("--optim", choices=OPTIMIZERS, help="the students' optimiser (the teacher always uses AdamW)")
    p.add_argument("--held-out-rows", type=int, help="bottom rows of the training image held out for scoring")
    p.add_argument("--alpha", type=float, help="weight of the MSE distillation term (sum reduction)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS)
    o = p.add_mutually_exclusive_group()
    o.add_argument("--out", type=Path, help=f"output folder (default {DEFAULT_OUT.relative_to(REPO)}/, untracked)")
    o.add_argument("--save-results", action="store_true",
                   help="write into the committed examples/results/ (to update the published results)")
    p.add_argument("--fresh", action="store_true", help="train every run again, ignoring finished runs in the "
                   "output folder (by default a rerun of a command skips the runs it finished)")
    p.add_argument("--name", help="output file stem (default deepforest, deepforest_<preset>)")
    harness.add_cache(p)
    p.add_argument("--no-teacher-cache", action="store_true", help="always train the teacher")
    harness.add_threads(p)
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many runs at once, in separate processes of --threads threads each\n"
                        "(2 on a 2-core machine: about twice the throughput of one process)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    preset = args.preset or ("quick" if args.quick else "full" if args.full else "default")
    cfg = dict(PRESETS[preset])
    for k in ("scale", "iters", "teacher_iters", "batch", "lr", "optim", "held_out_rows", "alpha", "seeds", "methods"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg.setdefault("optim", "adamw")
    cfg.setdefault("held_out_rows", dfd.HELD_OUT_ROWS)
    cfg.setdefault("teacher_lr", cfg["lr"])
    cfg.update(preset=preset, teacher_seed=args.teacher_seed, quick=preset == "quick",
               command=harness.command_line(__file__, argv))
    name = args.name or ("deepforest" if preset == "default" else f"deepforest_{preset}")
    out_dir = args.out or (HERE / "results" if args.save_results else DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    crops, splits = load_data(args.cache, cfg["quick"], cfg["held_out_rows"])
    print(f"preset {preset}: {json.dumps({k: v for k, v in cfg.items() if k != 'command'})}")
    print(f"data: {json.dumps(dfd.summary(str(args.cache), cfg['held_out_rows']))}")

    timings = {}
    teacher, timings["hr_teacher"], cached = train_teacher(cfg, crops, None if args.no_teacher_cache or cfg["quick"]
                                                           else args.cache)
    results = {"config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "runs": {}, "timings_s": {}}
    results["runs"]["hr_teacher"] = {str(cfg["teacher_seed"]): evaluate(teacher, splits, 1.0)}
    print(f"HR teacher: val AP {results['runs']['hr_teacher'][str(cfg['teacher_seed'])]['val']['AP']:.3f}")

    cfg["teacher_sha"] = state_sha(teacher)
    results["config"]["teacher_sha"] = cfg["teacher_sha"]
    cfg_run = {k: v for k, v in cfg.items() if k != "command"}
    fingerprint = run_fingerprint(cfg_run)
    store = RunStore(out_dir / f"{name}.runs", args.cache / "students", fingerprint)
    jobs = [(m, s) for s in cfg["seeds"] for m in cfg["methods"]]
    keep_jobs = set() if args.no_plots else {(m, cfg["seeds"][0]) for m in ("lr_baseline", "lrdet")}
    done = {}
    if not args.fresh:
        for m, s in jobs:
            prev = store.load(m, s, (m, s) in keep_jobs)
            if prev is not None:
                done[(m, s)] = prev
        if done:
            print(f"{len(done)} of {len(jobs)} runs already finished in {store.folder} (fingerprint {fingerprint}): "
                  f"skipped; --fresh trains them again")
    resumed = len(done)
    todo = [j for j in jobs if j not in done]

    def report(out):
        method, seed, res, elapsed, log, state = out
        done[(method, seed)] = out
        store.save(out)
        print(f"{method:12s} seed {seed}: val AP {res['val']['AP']:.3f} AP_S {res['val']['AP_S']:.3f} | "
              f"cross-site AP {res['cross_site']['AP']:.3f} ({elapsed:.0f} s)", flush=True)

    if args.jobs > 1 and todo:
        import multiprocessing as mp
        from tqdm import tqdm

        # seed by seed, so that an interrupted invocation leaves whole seeds (paired contrasts); within a seed
        # the longest runs first, so that the workers finish together
        order = sorted(todo, key=lambda j: (cfg["seeds"].index(j[1]), -_COST.get(j[0], 3.5)))
        ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
        with ctx.Pool(args.jobs, initializer=_init_worker,
                      initargs=(args.cache, cfg["quick"], cfg["held_out_rows"], teacher.state_dict(), args.threads)
                      ) as pool:
            pending = [pool.apply_async(run_and_evaluate, (m, s, cfg_run, (m, s) in keep_jobs)) for m, s in order]
            bar = tqdm(total=len(pending), desc=f"runs ({args.jobs} processes)", dynamic_ncols=True)
            while pending:
                time.sleep(1)
                for r in [r for r in pending if r.ready()]:
                    pending.remove(r)
                    report(r.get())
                    bar.update()
            bar.close()
    else:
        for m, s in todo:
            report(run_and_evaluate(m, s, cfg_run, (m, s) in keep_jobs, crops, splits, teacher))

    keep, logs = {}, {}
    for m, s in jobs:  # the order of the seeds and methods, whichever process finished first
        method, seed, res, elapsed, log, state = done[(m, s)]
        results["runs"].setdefault(method, {})[str(seed)] = res
        timings[f"{method}/{seed}"] = elapsed
        logs[f"{method}/{seed}"] = log
        if state is not None:
            keep[method] = build_fcos(round(dfd.TILE * cfg["scale"]))
            keep[method].load_state_dict(state)

    results["timings_s"] = timings
    results["training_time_s"] = sum(v for k, v in timings.items() if k != "hr_teacher")
    results["wall_time_s"] = time.time() - t0
    results["resumed_runs"] = resumed
    results["teacher_cached"] = cached
    results["loss_logs"] = logs
    results["machine"] = (f"{platform.machine()} CPU, {args.threads} thread(s)"
                          + (f" in each of {args.jobs} processes" if args.jobs > 1 else ""))
    results["versions"] = harness.versions()
    results["summary"] = summarise(results)
    results["contrasts"] = contrasts(results)
    harness.write_json(out_dir / f"{name}.json", results)
    md = markdown(results, results["summary"])
    (out_dir / f"{name}.md").write_text(md + "\n")
    if not args.no_plots:
        plot_ap(results, out_dir / f"{name}_ap.png", f"LRDet on NEON tree crowns, LR {cfg['scale']}x "
                f"({preset}; mean ± std over {len(cfg['seeds'])} seeds)")
        models = {"HR teacher": (teacher, 1.0)}
        models.update({LABELS[k]: (v, cfg["scale"]) for k, v in keep.items()})
        vis = max(range(len(splits["val"])), key=lambda i: len(splits["val"][i]["boxes"]))
        plot_features(models, splits["val"][vis], out_dir / f"{name}_features.png")
        plot_detections(models, splits["val"], vis, out_dir / f"{name}_detections.png")
    print(md)
    print(f"wrote {out_dir / name}.{{json,md}} in {results['wall_time_s'] / 60:.1f} min"
          + (f" ({resumed} runs resumed from earlier invocations)" if resumed else ""))
    return results


if __name__ == "__main__":
    main()

"""How large each distillation loss is on typical inputs: the numbers behind the recommended ``alpha``.

A RetinaNet pyramid P3-P7 on an 800x1344 canvas (100x168 ... 7x11 cells), C = 256, N = 2 images;
teacher features ~ N(0, 1); student features ``rho * T + sqrt(1 - rho^2) * Z`` (unit variance,
correlation ``rho`` with the teacher, so ``S - T`` has variance ``2 - 2 rho``: 1 at ``rho = 0.5``);
7 random boxes per image for FGD's masks. Every loss with its default arguments, eager, fp32, seed 0.
No timing: the values only.

    python benchmarks/loss_scales.py                 # prints a markdown table
    python benchmarks/loss_scales.py --save          # also writes benchmarks/results/loss_scales.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lrdet_core.context import DistillContext  # noqa: E402
from lrdet_core.losses import CWDLoss, FGDLoss, L1Loss, MSELoss  # noqa: E402

LEVELS = ((100, 168), (50, 84), (25, 42), (13, 21), (7, 11))
STRIDES = (8, 16, 32, 64, 128)
CANVAS = (800, 1344)
RHOS = (0.0, 0.5, 0.9)


def _boxes(n: int, k: int, g: torch.Generator) -> list:
    out = []
    for _ in range(n):
        xy = torch.rand(k, 2, generator=g) * torch.tensor([CANVAS[1] - 250.0, CANVAS[0] - 250.0])
        out.append(torch.cat([xy, xy + 30 + torch.rand(k, 2, generator=g) * 220], 1))
    return out


@torch.no_grad()
def scales(rho: float, n: int = 2, channels: int = 256, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(n, channels, h, w, generator=g) for h, w in LEVELS]
    student = [rho * t + math.sqrt(1 - rho * rho) * torch.randn(t.shape, generator=g) for t in teacher]
    ctx = DistillContext(boxes=_boxes(n, 7, g), image_sizes=[CANVAS] * n, canvas_size=CANVAS,
                         strides=list(STRIDES), level_names=[f"s{s}" for s in STRIDES])
    fgd = FGDLoss("retinanet", channels=[channels] * len(LEVELS), backend="torch")
    return {"rho": rho,
            "mse_sum": MSELoss(backend="torch")(student, teacher).item(),
            "mse_mean": MSELoss(reduction="mean", backend="torch")(student, teacher).item(),
            "l1_sum": L1Loss(backend="torch")(student, teacher).item(),
            "cwd": CWDLoss(backend="torch")(student, teacher).item(),
            "fgd": fgd(student, teacher, ctx).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/loss_scales.json")
    args = parser.parse_args()
    torch.manual_seed(0)  # FGD's GcBlocks are initialised from the global generator
    rows = [scales(rho) for rho in RHOS]
    print("| rho | 0.005·MSE_sum | L1_sum | CWD (tau=1) | FGD (retinanet) | MSE_mean (levels summed) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rho']} | {0.005 * r['mse_sum']:.3g} | {r['l1_sum']:.3g} | {r['cwd']:.3g} | {r['fgd']:.3g} | "
              f"{r['mse_mean']:.3g} |")
    if args.save:
        out = os.path.join(ROOT, "benchmarks", "results", "loss_scales.json")
        meta = {"command": "python benchmarks/loss_scales.py --save", "torch": torch.__version__,
                "levels": LEVELS, "strides": STRIDES, "canvas": CANVAS, "channels": 256, "batch": 2,
                "boxes_per_image": 7, "seed": 0}
        with open(out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""LRDet for a torchvision FCOS: tree crowns at half resolution, distilled from a full-resolution teacher.

The whole integration is the three lines marked ``# LRDet``; everything else is an ordinary
torchvision training loop. The data are NEON aerial tiles from the DeepForest wheel (see
``deepforest_data.py``): the teacher sees native 256 px tiles, the student the same tiles downsampled
to 128 px with antialiasing. At the end the student alone is evaluated at LR and saved for deployment:
it is a plain ``torchvision.models.detection.FCOS`` state dict, no lrdet_core needed to load it.

    python examples/train_fcos.py            # a few hundred steps (~10 min on 2 CPU cores)
    python examples/train_fcos.py --quick    # a few steps (CI)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepforest_data as dfd  # noqa: E402
from reproduce_deepforest import build_fcos, coco_metrics, json_safe, make_batch, predict, train  # noqa: E402

from lrdet_core import BridgeDistiller  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps, a few evaluation tiles (CI smoke test)")
    p.add_argument("--steps", type=int, help="student steps (teacher: twice as many)")
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--alpha", type=float, default=2e-5, help="weight of the sum-reduced MSE distillation term")
    p.add_argument("--out", type=Path, default=Path("runs/train_fcos"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = args.steps or (2 if args.quick else 300)
    batch = 2 if args.quick else 8
    g = torch.Generator().manual_seed(0)
    crops = dfd.TrainCrops()
    val = dfd.load_split("val")[:: 4 if args.quick else 1]
    lr_size = round(dfd.TILE * args.scale)
    t0 = time.time()

    # An HR teacher: any trained FCOS at native resolution (here trained briefly from scratch).
    teacher = build_fcos(dfd.TILE)
    train(teacher, lambda i: teacher(*make_batch(crops, batch, 1.0, g)[2:]), 2 * steps, 1e-3, "HR teacher")

    student = build_fcos(lr_size)                                        # the detector to deploy at LR
    distiller = BridgeDistiller(student, teacher, inherit=True, alpha=args.alpha)  # LRDet
    distiller.train()                                                              # LRDet

    def step(i):
        lr, lr_t, hr, hr_t = make_batch(crops, batch, args.scale, g)
        return distiller(lr, lr_t, hr_images=hr, hr_targets=hr_t)                   # LRDet

    log = train(distiller, step, steps, 1e-3, "LRDet student", log_every=max(steps // 10, 1))
    metrics = coco_metrics(val, predict(student, val, args.scale))

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(distiller.student_state_dict(), args.out / "student.pt")
    deployed = build_fcos(lr_size)
    deployed.load_state_dict(torch.load(args.out / "student.pt"))  # a plain torchvision FCOS again
    summary = {"detector": "FCOS", "scale": args.scale, "steps": steps, "val": metrics, "last_losses": log[-1],
               "time_s": time.time() - t0}
    (args.out / "metrics.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    print(json.dumps(summary["val"]))
    if not all(math.isfinite(v) for v in log[-1].values()):
        raise SystemExit("non-finite training loss")
    return summary


if __name__ == "__main__":
    main()

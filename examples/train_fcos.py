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

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepforest_data as dfd  # noqa: E402
import harness  # noqa: E402
from reproduce_deepforest import build_fcos, coco_metrics, make_batch, predict  # noqa: E402

from lrdet_core import BridgeDistiller  # noqa: E402


def main(argv=None):
    args = harness.example_parser(__doc__, "train_fcos").parse_args(argv)
    steps, batch, g = harness.start(args, batch=8)
    crops = dfd.TrainCrops()
    val = dfd.load_split("val")[:: 4 if args.quick else 1]
    lr_size = round(dfd.TILE * args.scale)
    t0 = time.time()

    # An HR teacher: any trained FCOS at native resolution (here trained briefly from scratch).
    teacher = build_fcos(dfd.TILE)
    harness.train(teacher, lambda i: teacher(*make_batch(crops, batch, 1.0, g)[2:]), 2 * steps, 1e-3, "HR teacher")

    student = build_fcos(lr_size)                                        # the detector to deploy at LR
    distiller = BridgeDistiller(student, teacher, inherit=True, alpha=args.alpha)  # LRDet
    distiller.train()                                                              # LRDet

    def step(i):
        lr, lr_t, hr, hr_t = make_batch(crops, batch, args.scale, g)
        return distiller(lr, lr_t, hr_images=hr, hr_targets=hr_t)                   # LRDet

    log = harness.train(distiller, step, steps, 1e-3, "LRDet student", log_every=max(steps // 10, 1))
    metrics = coco_metrics(val, predict(student, val, args.scale))

    harness.save_student(distiller, build_fcos(lr_size), args.out)  # a plain torchvision FCOS again
    return harness.finish(args.out, {"detector": "FCOS", "scale": args.scale, "steps": steps, "val": metrics}, log, t0)


if __name__ == "__main__":
    main()

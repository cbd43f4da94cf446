"""LRDet for a torchvision RetinaNet (ResNet-18 FPN, from scratch): tree crowns at half resolution.

The integration is the three lines marked ``# LRDet``. Data: NEON aerial tiles from the DeepForest
wheel (``deepforest_data.py``); teacher at native 256 px tiles, student on the same tiles downsampled
to 128 px with antialiasing. The student is evaluated alone at LR and saved as a plain torchvision
``RetinaNet`` state dict for deployment.

    python examples/train_retinanet.py           # a few hundred steps
    python examples/train_retinanet.py --quick   # a few steps (CI)
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepforest_data as dfd  # noqa: E402
import harness  # noqa: E402
from reproduce_deepforest import coco_metrics, make_batch, predict  # noqa: E402

from lrdet_core import BridgeDistiller  # noqa: E402


def build_retinanet(size: int) -> nn.Module:
    """RetinaNet on a from-scratch ResNet-18 with BatchNorm (torchvision's default FrozenBatchNorm2d
    is an identity without pretrained statistics) and a 64-channel FPN on C3-C5."""
    from torchvision.models import resnet18
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.retinanet import RetinaNetHead

    body = resnet18(weights=None)
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 64)
    # crowns are 15-50 px: three square anchor sizes per level starting at 16 px
    # (torchvision adds a max-pooled 4th level on top of C3-C5)
    anchors = AnchorGenerator(((16, 22, 32), (45, 64, 90), (128, 181, 256), (256, 362, 512)), ((1.0,),) * 4)
    head = RetinaNetHead(64, 3, 2, norm_layer=partial(nn.GroupNorm, 16))
    return RetinaNet(backbone, num_classes=2, min_size=size, max_size=size, image_mean=[0.0] * 3,
                     image_std=[1.0] * 3, anchor_generator=anchors, head=head, score_thresh=0.05)


def main(argv=None):
    args = harness.example_parser(__doc__, "train_retinanet").parse_args(argv)
    steps, batch, g = harness.start(args, batch=8)
    crops = dfd.TrainCrops()
    val = dfd.load_split("val")[:: 4 if args.quick else 1]
    lr_size = round(dfd.TILE * args.scale)
    t0 = time.time()

    teacher = build_retinanet(dfd.TILE)  # any trained HR RetinaNet; here trained briefly from scratch
    harness.train(teacher, lambda i: teacher(*make_batch(crops, batch, 1.0, g)[2:]), 2 * steps, 1e-3, "HR teacher")

    student = build_retinanet(lr_size)
    distiller = BridgeDistiller(student, teacher, inherit=True, alpha=args.alpha)  # LRDet
    distiller.train()                                                              # LRDet

    def step(i):
        lr, lr_t, hr, hr_t = make_batch(crops, batch, args.scale, g)
        return distiller(lr, lr_t, hr_images=hr, hr_targets=hr_t)                   # LRDet

    log = harness.train(distiller, step, steps, 1e-3, "LRDet student", log_every=max(steps // 10, 1))
    metrics = coco_metrics(val, predict(student, val, args.scale))

    harness.save_student(distiller, build_retinanet(lr_size), args.out)  # plain torchvision again
    summary = {"detector": "RetinaNet", "scale": args.scale, "steps": steps, "val": metrics}
    return harness.finish(args.out, summary, log, t0)


if __name__ == "__main__":
    main()

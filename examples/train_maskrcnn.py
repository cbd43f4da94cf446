"""LRDet for a torchvision Mask R-CNN, on generated shapes with exact masks.

The tree-crown data have boxes only, so this example draws its own data: ellipses (class 1) and
rectangles (class 2) of random size, colour and orientation on a textured background. Every shape is
defined analytically, so its mask is exact at any resolution: a pixel belongs to the shape when its
centre does. The HR image (256 px) is rendered with 2x2 supersampling; the LR image is its antialiased
0.5x downsampling, with masks and boxes computed exactly at LR.

The integration is the three lines marked ``# LRDet``; the student is evaluated alone at LR (COCO
box and mask AP, at LR) and saved as a plain torchvision ``MaskRCNN`` state dict.

    python examples/train_maskrcnn.py           # a few hundred steps
    python examples/train_maskrcnn.py --quick   # a few steps (CI)
"""
from __future__ import annotations

import contextlib
import io
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lrdet_core import BridgeDistiller  # noqa: E402

HR = 256


def _inside(shapes: List[Dict], xs: Tensor, ys: Tensor) -> Tensor:
    """(S, H, W) booleans: which sample points (HR pixel coordinates) lie inside each shape."""
    out = []
    for s in shapes:
        c, sn = math.cos(s["angle"]), math.sin(s["angle"])
        u = (xs - s["cx"]) * c + (ys - s["cy"]) * sn
        v = -(xs - s["cx"]) * sn + (ys - s["cy"]) * c
        if s["label"] == 1:
            out.append((u / s["a"]) ** 2 + (v / s["b"]) ** 2 <= 1)
        else:
            out.append((u.abs() <= s["a"]) & (v.abs() <= s["b"]))
    return torch.stack(out)


def _grid(size: int, step: float, offset: float) -> Tuple[Tensor, Tensor]:
    r = torch.arange(size, dtype=torch.float32) * step + offset
    return r[None, :].expand(size, size), r[:, None].expand(size, size)


def _target(masks: Tensor, labels: Tensor) -> Dict[str, Tensor]:
    keep = masks.flatten(1).any(1)
    masks, labels = masks[keep], labels[keep]
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": labels,
            "masks": masks.to(torch.uint8)}


def make_sample(g: torch.Generator, scale: float = 0.5, ss: int = 2):
    """One (LR image, LR target, HR image, HR target) pair; later shapes occlude earlier ones."""
    n = int(torch.randint(3, 9, (1,), generator=g))
    rnd = lambda lo, hi: float(lo + (hi - lo) * torch.rand((), generator=g))  # noqa: E731
    shapes = [{"label": int(torch.randint(1, 3, (1,), generator=g)), "cx": rnd(20, HR - 20), "cy": rnd(20, HR - 20),
               "a": rnd(6, 30), "b": rnd(6, 30), "angle": rnd(0, math.pi), "colour": torch.rand(3, generator=g)}
              for _ in range(n)]
    # background: smooth random texture
    bg = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(HR, HR), mode="bicubic", align_corners=False)[0]
    bg = (0.3 + 0.4 * bg).clamp(0, 1)
    # image with ss x ss supersampling for antialiased edges
    xs, ys = _grid(HR * ss, 1 / ss, 0.5 / ss)
    inside = _inside(shapes, xs, ys).float()
    hi = F.interpolate(bg[None], size=(HR * ss, HR * ss), mode="nearest")[0]
    for k, s in enumerate(shapes):
        hi = hi * (1 - inside[k]) + s["colour"][:, None, None] * inside[k]
    hr = F.avg_pool2d(hi[None], ss)[0]
    hr = (hr + 0.03 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    labels = torch.tensor([s["label"] for s in shapes])

    def exact_masks(size, step):
        m = _inside(shapes, *_grid(size, step, step / 2))
        for k in range(len(shapes) - 1):  # occlusion by later shapes
            m[k] &= ~m[k + 1:].any(0)
        return m

    hr_t = _target(exact_masks(HR, 1.0), labels)
    lr_size = round(HR * scale)
    lr = F.interpolate(hr[None], size=(lr_size, lr_size), mode="bilinear", antialias=True, align_corners=False)[0]
    lr_t = _target(exact_masks(lr_size, 1 / scale), labels)
    return lr, lr_t, hr, hr_t


def build_maskrcnn(size: int) -> nn.Module:
    """Mask R-CNN on a from-scratch ResNet-18 (BatchNorm) with a 64-channel FPN and small anchors."""
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    body = resnet18(weights=None)
    backbone = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, [64, 128, 256, 512], 64)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)
    return MaskRCNN(backbone, num_classes=3, min_size=size, max_size=size, rpn_anchor_generator=anchors,
                    rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=300,
                    rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=64, box_batch_size_per_image=64,
                    box_score_thresh=0.05)


@torch.no_grad()
def evaluate(model: nn.Module, samples) -> Dict[str, float]:
    """COCO box and mask AP at LR over generated samples."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    images, anns, dets = [], [], []
    for i, (img, t) in enumerate(samples):
        h, w = img.shape[-2:]
        images.append({"id": i, "width": int(w), "height": int(h)})
        for b, lab, m in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"]):
            rle = mask_util.encode(m.numpy().astype("uint8", order="F"))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": lab, "iscrowd": 0, "segmentation": rle,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float(m.sum())})
        p = model([img])[0]
        for b, s, lab, m in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(), p["masks"]):
            rle = mask_util.encode((m[0] > 0.5).numpy().astype("uint8", order="F"))
            dets.append({"image_id": i, "category_id": lab, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "score": s, "segmentation": rle})
    out = {}
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": 1, "name": "ellipse"}, {"id": 2, "name": "rectangle"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        for kind in ("bbox", "segm"):
            if not dets:
                out[f"{kind}_AP"] = out[f"{kind}_AP50"] = 0.0
                continue
            ev = COCOeval(gt, gt.loadRes(dets), kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[f"{kind}_AP"], out[f"{kind}_AP50"] = float(ev.stats[0]), float(ev.stats[1])
    return out


def main(argv=None):
    args = harness.example_parser(__doc__, "train_maskrcnn", scale=False,
                                  quick_help="a few steps, a few evaluation images (CI smoke test)").parse_args(argv)
    steps, batch, g = harness.start(args, batch=4)
    val_g = torch.Generator().manual_seed(12345)
    val = [make_sample(val_g)[:2] for _ in range(4 if args.quick else 32)]

    def batch_of(n):
        return [list(x) for x in zip(*[make_sample(g) for _ in range(n)])]

    t0 = time.time()
    teacher = build_maskrcnn(HR)  # any trained HR Mask R-CNN; here trained briefly from scratch
    harness.train(teacher, lambda i: teacher(*batch_of(batch)[2:]), 2 * steps, 1e-3, "HR teacher")

    student = build_maskrcnn(HR // 2)
    distiller = BridgeDistiller(student, teacher, inherit=True, alpha=args.alpha)  # LRDet
    distiller.train()                                                              # LRDet

    def step(i):
        lr, lr_t, hr, hr_t = batch_of(batch)
        return distiller(lr, lr_t, hr_images=hr, hr_targets=hr_t)                   # LRDet

    log = harness.train(distiller, step, steps, 1e-3, "LRDet student", log_every=max(steps // 10, 1))
    metrics = evaluate(student, val)

    harness.save_student(distiller, build_maskrcnn(HR // 2), args.out)  # plain torchvision again
    summary = {"detector": "MaskRCNN", "data": "generated shapes, exact masks", "steps": steps, "val": metrics}
    return harness.finish(args.out, summary, log, t0)


if __name__ == "__main__":
    main()

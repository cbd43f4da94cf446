"""Tiny detectors for fast tests: torchvision families on small resnet18 bodies, and a custom model;
and the helpers the test modules share (seeded builds, a recording loss, importing an example script)."""
from __future__ import annotations

import importlib
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def seeded(builder, seed=0, **kw):
    """``builder(**kw)`` right after ``torch.manual_seed(seed)``: the same weights on every call."""
    torch.manual_seed(seed)
    return builder(**kw)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """The module ``examples/<name>.py`` (``examples/`` is on ``sys.path`` only while it imports)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


class RecordingLoss:
    """A distillation loss callable that keeps what it was given and returns a fixed function of it."""

    __name__ = "rec"

    def __init__(self):
        self.calls = []

    def __call__(self, student, teacher, ctx):
        value = sum(((s - t) ** 2).mean() for s, t in zip(student, teacher))
        self.calls.append({"student": [s.detach().clone() for s in student],
                           "teacher": [t.detach().clone() for t in teacher], "ctx": ctx, "value": value.detach()})
        return value


def _r18_fpn(out_channels=32, returned_layers=(2, 3, 4), extra="p6p7"):
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    body = resnet18(weights=None)
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    in_ch = [64 * 2 ** (k - 1) for k in returned_layers]
    blocks = LastLevelP6P7(out_channels, out_channels) if extra == "p6p7" else LastLevelMaxPool()
    return BackboneWithFPN(body, return_layers, in_ch, out_channels, extra_blocks=blocks)


def retinanet(size=128, channels=32, num_classes=3, max_size=None, **kw):
    from torchvision.models.detection import RetinaNet
    return RetinaNet(_r18_fpn(channels), num_classes, min_size=size, max_size=max_size or size, **kw)


def fcos(size=128, channels=32, num_classes=3, max_size=None, **kw):
    from torchvision.models.detection import FCOS
    return FCOS(_r18_fpn(channels), num_classes, min_size=size, max_size=max_size or size, **kw)


def faster_rcnn(size=128, channels=32, num_classes=3, max_size=None, **kw):
    from torchvision.models.detection import FasterRCNN
    return FasterRCNN(_r18_fpn(channels, (1, 2, 3, 4), extra="pool"), num_classes, min_size=size, max_size=max_size or size, **kw)


def mask_rcnn(size=128, channels=32, num_classes=3, max_size=None, **kw):
    from torchvision.models.detection import MaskRCNN
    return MaskRCNN(_r18_fpn(channels, (1, 2, 3, 4), extra="pool"), num_classes, min_size=size, max_size=max_size or size, **kw)


def batch(sizes=((100, 150), (150, 100)), seed=0, masks=False, n_boxes=2):
    """Raw images of the given sizes with boxes (and exact masks) in raw pixels."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in sizes:
        images.append(torch.rand(3, h, w, generator=g))
        boxes = []
        for _ in range(n_boxes):
            x1, y1 = float(torch.randint(0, w // 2, (1,), generator=g)), float(torch.randint(0, h // 2, (1,), generator=g))
            boxes.append([x1, y1, x1 + w / 3, y1 + h / 3])
        t = {"boxes": torch.tensor(boxes), "labels": torch.randint(1, 3, (n_boxes,), generator=g)}
        if masks:
            m = torch.zeros(n_boxes, h, w, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(t["boxes"].int().tolist()):
                m[i, y1:y2, x1:x2] = 1
            t["masks"] = m
        targets.append(t)
    return images, targets


class TinyDetector(nn.Module):
    """A non-torchvision detector: tensor batch in, a dict of losses out.

    backbone -> list of 3 maps (strides 4, 8, 16); neck -> dict of 3 maps with BatchNorm;
    head -> a centre heat-map loss from ``targets[i]["boxes"]``.
    """

    def __init__(self, width=8, neck_channels=16, inplace_relu=False):
        super().__init__()
        self.backbone = _TinyBackbone(width)
        self.neck = _TinyNeck([width, 2 * width, 4 * width], neck_channels, inplace_relu)
        self.head = nn.Sequential(nn.Conv2d(neck_channels, neck_channels, 3, padding=1), nn.BatchNorm2d(neck_channels),
                                  nn.ReLU(), nn.Conv2d(neck_channels, 1, 1))

    def forward(self, images, targets=None):
        feats = self.neck(self.backbone(images))
        logits = {k: self.head(v) for k, v in feats.items()}
        if not self.training:
            return logits
        loss = 0.0
        h, w = images.shape[-2:]
        for k, lg in logits.items():
            heat = torch.zeros_like(lg)
            for i, t in enumerate(targets):
                for x1, y1, x2, y2 in t["boxes"].tolist():
                    cy = min(int((y1 + y2) / 2 * lg.shape[-2] / h), lg.shape[-2] - 1)
                    cx = min(int((x1 + x2) / 2 * lg.shape[-1] / w), lg.shape[-1] - 1)
                    heat[i, 0, cy, cx] = 1.0
            loss = loss + F.binary_cross_entropy_with_logits(lg, heat)
        return {"heat": loss}


class _TinyBackbone(nn.Module):
    def __init__(self, w):
        super().__init__()
        def stage(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o))
        self.s1 = nn.Sequential(stage(3, w), nn.ReLU(), stage(w, w))
        self.s2, self.s3 = stage(w, 2 * w), stage(2 * w, 4 * w)

    def forward(self, x):
        # Outputs end in BatchNorm (signed values), so an in-place ReLU after the split point changes them.
        c1 = self.s1(x)
        c2 = self.s2(F.relu(c1))
        return [c1, c2, self.s3(F.relu(c2))]


class _TinyNeck(nn.Module):
    def __init__(self, in_channels, c, inplace_relu):
        super().__init__()
        self.act = nn.ReLU(inplace=inplace_relu)
        self.lat = nn.ModuleList(nn.Sequential(nn.Conv2d(i, c, 1), nn.BatchNorm2d(c)) for i in in_channels)

    def forward(self, feats):
        feats = [self.act(f) for f in feats]  # an in-place op right after the split point when inplace_relu
        return OrderedDict((f"p{i}", lat(f)) for i, (lat, f) in enumerate(zip(self.lat, feats)))

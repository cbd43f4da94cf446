"""Quickstart: wrap a torchvision RetinaNet with LRDet and train a few steps on generated images.

    python examples/quickstart.py            # about 30 s on a 2-core CPU

The student sees 128 px images, the frozen teacher 256 px. Both are untrained here (no weights can be
downloaded); in practice the teacher is a detector trained at high resolution.
"""
import argparse

import torch
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from lrdet_core import BridgeDistiller


def tiny_retinanet(size: int) -> RetinaNet:
    backbone = _resnet_fpn_extractor(resnet18(weights=None), 5, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=3, min_size=size, max_size=size)


def generated_batch(n: int, g: torch.Generator):
    """Grey images with bright rectangles; the rectangles are the boxes."""
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, 256, 256, generator=g) * 0.2
        boxes = []
        for _ in range(3):
            x, y = torch.randint(0, 200, (2,), generator=g).tolist()
            w, h = torch.randint(12, 56, (2,), generator=g).tolist()
            img[:, y:y + h, x:x + w] += 0.7
            boxes.append([x, y, min(x + w, 256), min(y + h, 256)])
        images.append(img.clamp(0, 1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.ones(3, dtype=torch.int64)})
    return images, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    student, teacher = tiny_retinanet(128), tiny_retinanet(256)

    distiller = BridgeDistiller(student, teacher)                     # 1. wrap (split points found automatically)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.005, momentum=0.9)
    distiller.train()
    for step in range(args.steps):
        images, targets = generated_batch(2, g)
        loss_dict = distiller(images, targets)                          # 2. LR + bridge + distillation losses
        loss = sum(loss_dict.values())                                  # 3. train as usual
        optimizer.zero_grad()
        loss.backward()
        # Untrained networks: clipping keeps the first SGD steps sane.
        torch.nn.utils.clip_grad_norm_(distiller.parameters(), 10.0)
        optimizer.step()
        print(f"step {step}: " + "  ".join(f"{k}={v.item():.3f}" for k, v in loss_dict.items()))

    distiller.eval()
    predictions = distiller(generated_batch(1, g)[0])                  # the student alone, at 128 px
    print(f"eval: {len(predictions[0]['boxes'])} boxes predicted at low resolution")
    torch.save(distiller.student_state_dict(), "/tmp/lrdet_quickstart_student.pt")


if __name__ == "__main__":
    main()

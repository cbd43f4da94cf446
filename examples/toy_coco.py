"""Write a toy COCO-format detection dataset of generated images, in the layout torchvision's reference
training script reads (``references/detection/train.py --data-path ROOT``)::

    ROOT/train2017/*.jpg   ROOT/val2017/*.jpg   ROOT/annotations/instances_{train,val}2017.json

    python examples/toy_coco.py /tmp/toy_coco --train 8 --val 4

Each image is dark noise with bright rectangles of two categories (1: red, 2: green); every rectangle is
an annotation with its box, a polygon segmentation and its area. Only for trying a pipeline end to end:
there is nothing to learn from it that says anything about a detector.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

#: The image sizes (height, width) used in turn: two aspect ratios, for the script's aspect-ratio grouping.
SIZES = [(240, 320), (320, 240)]


def write_split(root: Path, split: str, n: int, rng: np.random.Generator, first_id: int) -> Dict:
    """``n`` images in ``root/<split>2017`` and their COCO annotation dict (image ids from ``first_id``)."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    for k in range(n):
        image_id = first_id + k
        h, w = SIZES[k % len(SIZES)]
        pixels = rng.integers(0, 50, size=(h, w, 3)).astype(np.uint8)
        for _ in range(int(rng.integers(2, 5))):
            bw, bh = (int(v) for v in rng.integers(24, 96, size=2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            category = int(rng.integers(1, 3))
            pixels[y:y + bh, x:x + bw, category - 1] = 230
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category, "bbox": [x, y, bw, bh], "area": float(bw * bh),
                                "iscrowd": 0,
                                "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
        name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "red", "supercategory": "box"},
                           {"id": 2, "name": "green", "supercategory": "box"}]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="where to write the dataset")
    p.add_argument("--train", type=int, default=8, help="number of training images")
    p.add_argument("--val", type=int, default=4, help="number of validation images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    (args.root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n, first in (("train", args.train, 1), ("val", args.val, 10_000)):
        coco = write_split(args.root, split, n, rng, first)
        (args.root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
        print(f"{split}: {n} images, {len(coco['annotations'])} boxes in {args.root}")


if __name__ == "__main__":
    main()

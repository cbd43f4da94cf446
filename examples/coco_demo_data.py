"""Write a small COCO-format dataset to try ``train_coco.py`` on: real tree crowns, or generated shapes.

* ``--source deepforest``: the NEON aerial tiles of ``deepforest_data.py`` (the DeepForest wheel from PyPI,
  MIT licence), one category ``tree``: the training region cut into 256 px tiles, the held-out rows as the
  validation set. Boxes only.
* ``--source shapes``: rectangles and ellipses on a smooth background, with polygon segmentations that the
  pixels follow exactly (so Mask R-CNN can be tried too); no download. ``--category-ids 3 7`` gives
  categories whose ids are not contiguous.

Layout (what ``train_coco.py`` reads)::

    <out>/train.json  <out>/train/*.png
    <out>/val.json    <out>/val/*.png

    python examples/coco_demo_data.py --source deepforest --out data/trees
    python examples/coco_demo_data.py --source shapes --out data/shapes --train 64 --val 16 --size 128
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))


def save_png(image: Tensor, path: Path) -> None:
    """A float ``(3, H, W)`` image in ``[0, 1]`` as an 8-bit PNG."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(arr).save(path)


def write_split(out: Path, name: str, images: List[Dict], categories: Sequence[Dict]) -> Path:
    """``<out>/<name>.json`` and ``<out>/<name>/*.png`` from ``images``: dicts of ``image`` (3, H, W) and
    ``annotations`` (dicts of ``bbox`` [x, y, w, h], ``category_id`` and optionally ``segmentation``)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    js = {"images": [], "annotations": [], "categories": list(categories)}
    for i, item in enumerate(images):
        h, w = item["image"].shape[-2:]
        file = f"{i:05d}.png"
        save_png(item["image"], folder / file)
        js["images"].append({"id": i + 1, "file_name": file, "width": int(w), "height": int(h)})
        for a in item["annotations"]:
            bw, bh = a["bbox"][2], a["bbox"][3]
            js["annotations"].append({"id": len(js["annotations"]) + 1, "image_id": i + 1, "iscrowd": 0,
                                      "area": float(a.get("area", bw * bh)), **a})
    path = out / f"{name}.json"
    path.write_text(json.dumps(js))
    return path


# ------------------------------------------------------------------------------------------------
# Generated shapes
# ------------------------------------------------------------------------------------------------


def _polygon(kind: int, cx: float, cy: float, a: float, b: float, angle: float) -> List[float]:
    """A rectangle (kind 0) or an ellipse (kind 1, 24 vertices) as a flat COCO polygon."""
    if kind == 0:
        corners = [(-a, -b), (a, -b), (a, b), (-a, b)]
    else:
        corners = [(a * math.cos(t), b * math.sin(t)) for t in (2 * math.pi * k / 24 for k in range(24))]
    c, s = math.cos(angle), math.sin(angle)
    return [v for u, w in corners for v in (cx + u * c - w * s, cy + u * s + w * c)]


def shapes_image(g: torch.Generator, size: int, category_ids: Sequence[int], max_shapes: int = 4) -> Dict:
    """One image with 0..max_shapes shapes (``max_shapes=0``: none); ``category_ids[0]`` for rectangles, ``[1]``
    for ellipses."""
    from pycocotools import mask as mask_util

    rnd = lambda lo, hi: float(lo + (hi - lo) * torch.rand((), generator=g))  # noqa: E731
    bg = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(size, size), mode="bilinear",
                       align_corners=False)[0]
    image = 0.25 + 0.5 * bg
    anns = []
    for _ in range(int(torch.randint(0, max_shapes + 1, (1,), generator=g))):
        kind = int(torch.randint(0, 2, (1,), generator=g))
        poly = _polygon(kind, rnd(0.2, 0.8) * size, rnd(0.2, 0.8) * size, rnd(0.08, 0.2) * size,
                        rnd(0.08, 0.2) * size, rnd(0, math.pi))
        rle = mask_util.merge(mask_util.frPyObjects([poly], size, size))
        mask = torch.from_numpy(mask_util.decode(rle)).bool()
        if not mask.any():
            continue
        image[:, mask] = torch.rand(3, 1, generator=g)  # the pixels follow the polygon's mask exactly
        xs, ys = poly[0::2], poly[1::2]
        x1, y1 = max(min(xs), 0.0), max(min(ys), 0.0)
        x2, y2 = min(max(xs), float(size)), min(max(ys), float(size))
        anns.append({"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": int(category_ids[kind]),
                     "segmentation": [poly], "area": float(mask.sum())})
    return {"image": image, "annotations": anns}


def write_shapes(out: Path, train: int = 8, val: int = 4, size: int = 128, category_ids: Sequence[int] = (1, 2),
                 seed: int = 0, empty: int = 0) -> Dict[str, Path]:
    """A generated dataset (see the module docstring); the first ``empty`` training images have no shapes.
    Returns the paths of the two jsons."""
    g = torch.Generator().manual_seed(seed)
    cats = [{"id": int(category_ids[0]), "name": "rectangle"}, {"id": int(category_ids[1]), "name": "ellipse"}]
    paths = {}
    for name, n in (("train", train), ("val", val)):
        items = [shapes_image(g, size, category_ids, max_shapes=0 if name == "train" and i < empty else 4)
                 for i in range(n)]
        paths[name] = write_split(Path(out), name, items, cats)
    return paths


# ------------------------------------------------------------------------------------------------
# Tree crowns
# ------------------------------------------------------------------------------------------------


def write_deepforest(out: Path, cache: Optional[Path] = None) -> Dict[str, Path]:
    """Tree-crown tiles in COCO format: the training region's tiles (covering it) and the held-out ones."""
    import deepforest_data as dfd

    cache_dir = str(cache) if cache else None
    image, boxes = dfd.load_image(dfd.TRAIN_IMAGE, cache_dir)
    rows = image.shape[-2] - dfd.HELD_OUT_ROWS
    splits = {"train": dfd.tiles(image, boxes, (0, rows), source=dfd.TRAIN_IMAGE),
              "val": dfd.load_split("val", cache_dir=cache_dir)}
    paths = {}
    for name, tiles in splits.items():
        items = [{"image": t["image"], "annotations": [{"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                                         "category_id": 1} for b in t["boxes"].tolist()]}
                 for t in tiles]
        paths[name] = write_split(Path(out), name, items, [{"id": 1, "name": "tree"}])
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=("deepforest", "shapes"), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=64, help="shapes: training images")
    p.add_argument("--val", type=int, default=16, help="shapes: validation images")
    p.add_argument("--size", type=int, default=128, help="shapes: image side in pixels")
    p.add_argument("--category-ids", type=int, nargs=2, default=[1, 2], help="shapes: ids of rectangle, ellipse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, help="deepforest: where the wheel is kept (default: LRDET_CACHE)")
    args = p.parse_args(argv)
    if args.source == "shapes":
        paths = write_shapes(args.out, args.train, args.val, args.size, args.category_ids, args.seed)
    else:
        paths = write_deepforest(args.out, args.cache)
    for path in paths.values():
        js = json.loads(path.read_text())
        print(f"{path}: {len(js['images'])} images, {len(js['annotations'])} annotations")
    return paths


if __name__ == "__main__":
    main()

"""NEON tree-crown data from the DeepForest wheel, cut into tiles for LR/HR detection experiments.

The ``deepforest==2.1.0`` wheel on PyPI (MIT licence) ships a few NEON aerial RGB images (10 cm/px)
with hand-drawn tree-crown boxes as Pascal VOC XML under ``deepforest/data/``. The wheel is fetched
once with ``pip download --no-deps`` into a cache folder and read as a zip file; deepforest itself is
never installed or imported.

Split (fixed, see ``examples/README`` of the reproduction):

* ``train``: random crops from ``2019_YELL_2_528000_4978000_image_crop2.png`` above its bottom
  ``HELD_OUT_ROWS`` rows (512; the ``powered`` preset of the reproduction holds out 768);
* ``val``: the held-out bottom rows of that image, as a grid of tiles (the main score);
* ``cross_site``: the second YELL image and the two 400 x 400 images from other sites (OSBS, SOAP),
  as tiles covering them (the last row/column overlapping): a robustness test in a different domain,
  reported separately.

Boxes are in native (HR) pixels; crossing a tile border they are clipped, and dropped when less than
``MIN_VISIBLE`` of their area remains inside the tile.

Example:
    >>> from deepforest_data import load_split  # doctest: +SKIP
    >>> val = load_split("val")                  # doctest: +SKIP
    >>> len(val), val[0]["image"].shape          # doctest: +SKIP
    (16, torch.Size([3, 256, 256]))
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

WHEEL = "deepforest-2.1.0-py3-none-any.whl"
REQUIREMENT = "deepforest==2.1.0"
TRAIN_IMAGE = "2019_YELL_2_528000_4978000_image_crop2"
CROSS_SITE_IMAGES = ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029", "SOAP_061")
HELD_OUT_ROWS = 512
TILE = 256
MIN_VISIBLE = 0.4


class DataUnavailableError(RuntimeError):
    """The DeepForest wheel could not be found or downloaded."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("LRDET_CACHE", Path.home() / ".cache" / "lrdet-core"))


def fetch_wheel(cache_dir: Optional[Path] = None) -> Path:
    """Path of the deepforest wheel, downloading it with pip (no dependencies, not installed) if needed."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / WHEEL
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", REQUIREMENT,
           "-d", str(cache_dir)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        res = None
        err = str(e)
    else:
        err = (res.stderr or res.stdout).strip().splitlines()[-3:]
        err = "\n    ".join(err)
    if res is None or res.returncode != 0 or not path.is_file():
        raise DataUnavailableError(
            f"could not download {REQUIREMENT} (the tree-crown data) into {cache_dir}.\n"
            f"  command: {' '.join(cmd)}\n  error: {err}\n"
            f"Download {WHEEL} from https://pypi.org/project/deepforest/2.1.0/#files on a machine with network "
            f"access and put it in {cache_dir} (or set LRDET_CACHE to the folder that holds it).")
    return path


def _parse_voc(xml_bytes: bytes) -> Tensor:
    root = ET.fromstring(xml_bytes)
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        boxes.append([float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


@lru_cache(maxsize=None)
def load_image(name: str, cache_dir: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One image as a float tensor (3, H, W) in [0, 1] and its boxes (N, 4) in pixels (x1, y1, x2, y2)."""
    from PIL import Image

    with zipfile.ZipFile(fetch_wheel(Path(cache_dir) if cache_dir else None)) as zf:
        png = zf.read(f"deepforest/data/{name}.png")
        xml = zf.read(f"deepforest/data/{name}.xml")
    img = Image.open(io.BytesIO(png)).convert("RGB")
    image = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3)
    return image.permute(2, 0, 1).float().div_(255), _parse_voc(xml)


def crop_boxes(boxes: Tensor, x0: int, y0: int, w: int, h: int, min_visible: float = MIN_VISIBLE) -> Tensor:
    """Boxes shifted into a crop, clipped to it, kept if at least ``min_visible`` of their area is inside."""
    shifted = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    clipped = torch.stack([shifted[:, 0].clamp(0, w), shifted[:, 1].clamp(0, h),
                           shifted[:, 2].clamp(0, w), shifted[:, 3].clamp(0, h)], 1)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (cw >= 2) & (ch >= 2) & (cw * ch >= min_visible * area)
    return clipped[keep]


def _grid(length: int, tile: int, cover: bool) -> List[int]:
    """Tile origins along ``length``; with ``cover`` a last tile shifted back to end at the border."""
    starts = list(range(0, max(length - tile, 0) + 1, tile))
    if cover and starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tiles(image: Tensor, boxes: Tensor, y_range: Tuple[int, int], tile: int = TILE, source: str = "",
          cover: bool = True) -> List[Dict]:
    """A grid of ``tile`` x ``tile`` tiles over rows ``y_range`` of an image, with their boxes.

    With ``cover`` the image is covered completely, the last row/column of tiles overlapping the one
    before; without it, only non-overlapping full tiles are made (the rest of the image is left out).
    """
    y_lo, y_hi = y_range
    out = []
    for y in _grid(y_hi - y_lo, tile, cover):
        for x in _grid(image.shape[-1], tile, cover):
            y0 = y_lo + y
            out.append({"image": image[:, y0:y0 + tile, x:x + tile].contiguous(),
                        "boxes": crop_boxes(boxes, x, y0, tile, tile), "source": source, "origin": (x, y0)})
    return out


def load_split(split: str, tile: int = TILE, cache_dir: Optional[str] = None,
               held_out_rows: int = HELD_OUT_ROWS) -> List[Dict]:
    """Tiles of the ``"val"`` (held-out rows of the training image) or ``"cross_site"`` split."""
    if split == "val":
        image, boxes = load_image(TRAIN_IMAGE, cache_dir)
        h = image.shape[-2]
        # non-overlapping full tiles, so that no crown is counted twice in the main score
        return tiles(image, boxes, (h - held_out_rows, h), tile, TRAIN_IMAGE, cover=False)
    if split == "cross_site":
        out = []
        for name in CROSS_SITE_IMAGES:
            image, boxes = load_image(name, cache_dir)
            out += tiles(image, boxes, (0, image.shape[-2]), tile, name)
        return out
    raise ValueError(f"expected split 'val' or 'cross_site', but got {split!r}; training crops come from "
                     f"TrainCrops")


class TrainCrops:
    """Random ``tile`` x ``tile`` crops from the training region, with flips, 90-degree turns and colour jitter.

    The HR view is the native crop. Views at other scales are made from it by :func:`downsample`,
    so the LR and HR views of one sample always show the same content.
    """

    def __init__(self, tile: int = TILE, cache_dir: Optional[str] = None, jitter: float = 0.2,
                 held_out_rows: int = HELD_OUT_ROWS):
        self.image, self.boxes = load_image(TRAIN_IMAGE, cache_dir)
        self.tile, self.jitter = tile, jitter
        self.max_y = self.image.shape[-2] - held_out_rows - tile  # the crop never reaches the held-out rows
        self.max_x = self.image.shape[-1] - tile

    def sample(self, g: torch.Generator) -> Tuple[Tensor, Tensor]:
        """One augmented HR crop (3, tile, tile) in [0, 1] and its boxes, drawn with generator ``g``."""
        t = self.tile
        for _ in range(20):  # a crop without any crown teaches little; retry a few times
            x = int(torch.randint(0, self.max_x + 1, (1,), generator=g))
            y = int(torch.randint(0, self.max_y + 1, (1,), generator=g))
            boxes = crop_boxes(self.boxes, x, y, t, t)
            if len(boxes):
                break
        img = self.image[:, y:y + t, x:x + t].clone()
        if torch.rand((), generator=g) < 0.5:
            img = img.flip(-1)
            boxes = torch.stack([t - boxes[:, 2], boxes[:, 1], t - boxes[:, 0], boxes[:, 3]], 1)
        if torch.rand((), generator=g) < 0.5:
            img = img.flip(-2)
            boxes = torch.stack([boxes[:, 0], t - boxes[:, 3], boxes[:, 2], t - boxes[:, 1]], 1)
        if torch.rand((), generator=g) < 0.5:  # transpose = 90-degree turn combined with the flips above
            img = img.transpose(-1, -2)
            boxes = boxes[:, [1, 0, 3, 2]]
        if self.jitter:
            j = self.jitter
            bright = 1 + (torch.rand((), generator=g) * 2 - 1) * j
            contrast = 1 + (torch.rand((), generator=g) * 2 - 1) * j
            sat = 1 + (torch.rand((), generator=g) * 2 - 1) * j
            gray = img.mean(0, keepdim=True)
            img = gray + (img - gray) * sat
            img = (img - img.mean()) * contrast + img.mean()
            img = (img * bright).clamp_(0, 1)
        return img.contiguous(), boxes.contiguous()


def downsample(image: Tensor, boxes: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """An image resized by ``scale`` with antialiasing (as a camera with fewer pixels would see it)."""
    if scale == 1:
        return image, boxes
    h, w = image.shape[-2:]
    size = (round(h * scale), round(w * scale))
    small = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return small, boxes * torch.tensor([size[1] / w, size[0] / h] * 2, dtype=boxes.dtype)


def standardise(image: Tensor, eps: float = 1e-3) -> Tensor:
    """Per-tile, per-channel standardisation (zero mean, unit std); the detectors' own normalisation is off."""
    mean = image.mean((-2, -1), keepdim=True)
    std = image.std((-2, -1), keepdim=True)
    return (image - mean) / (std + eps)


def target(boxes: Tensor) -> Dict[str, Tensor]:
    """A torchvision target dict for one tile: every crown is class 1."""
    return {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}


def summary(cache_dir: Optional[str] = None, held_out_rows: int = HELD_OUT_ROWS) -> Dict[str, Dict[str, int]]:
    """Tiles and boxes per split, for logs and the results file."""
    out = {}
    for split in ("val", "cross_site"):
        ts = load_split(split, cache_dir=cache_dir, held_out_rows=held_out_rows)
        out[split] = {"tiles": len(ts), "boxes": int(sum(len(t["boxes"]) for t in ts))}
    image, boxes = load_image(TRAIN_IMAGE, cache_dir)
    keep = boxes[:, 3] <= image.shape[-2] - held_out_rows
    out["train_region"] = {"rows": image.shape[-2] - held_out_rows, "boxes": int(keep.sum())}
    return out


if __name__ == "__main__":
    import json
    print(json.dumps(summary(), indent=1))
    for name in (TRAIN_IMAGE,) + CROSS_SITE_IMAGES:
        im, bx = load_image(name)
        wh = (bx[:, 2:] - bx[:, :2])
        print(name, tuple(im.shape), len(bx), "median box w,h:", wh.median(0).values.tolist())

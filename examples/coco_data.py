"""A COCO-format dataset as torchvision detection targets, checked before the first step.

What is read: ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations`` (``image_id``,
``category_id``, ``bbox`` as ``[x, y, width, height]`` in pixels, optional ``iscrowd`` and ``segmentation``)
and ``categories`` (``id``, ``name``). What each problem becomes:

* category ids not contiguous: fine. Label ``k`` is the ``k``-th category by id (0 is the background), and
  predictions are mapped back to the json's ids;
* a box partly outside its image: clipped to it; wholly outside: dropped (nothing is left after clipping);
* a box of zero width or height: dropped; of negative width or height: ``InputError`` (``bbox`` must be
  ``[x, y, width, height]``);
* ``iscrowd: 1``: left out of training; evaluation treats it as COCO does (an ignore region);
* an image without annotations: kept, with empty targets (a negative example);
* a missing image file: ``InputError`` listing the missing files, before training starts;
* an image not of the json's size: ``InputError`` when it is read;
* an unknown ``category_id`` or ``image_id``, duplicate ids: ``InputError``;
* Mask R-CNN and an annotation without ``segmentation``: ``InputError``.

Dropped and clipped boxes are counted in one warning per file, with the first annotation ids.

Example:
    >>> split = read_coco("train.json", "images/", masks=False)   # doctest: +SKIP
    >>> data = CocoDataset(split, hflip=True, seed=0)               # doctest: +SKIP
    >>> image, target = data[0]                                     # doctest: +SKIP
    >>> image.shape, target["boxes"].shape, target["labels"].dtype  # doctest: +SKIP
    (torch.Size([3, 480, 640]), torch.Size([4, 4]), torch.int64)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lrdet_core import InputError
from lrdet_core.warn import warn_user

#: How many offending ids or files a message lists before "and N more".
SHOWN = 5


def listed(items: Sequence[Any]) -> str:
    """The first few of ``items`` for a message, and how many more there are."""
    shown = ", ".join(str(x) for x in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


class Category(NamedTuple):
    """A category of the json: its ``id`` there and its ``name``."""

    id: int
    name: str


@dataclass
class ImageEntry:
    """One image and its training targets (crowd and dropped boxes already left out).

    ``boxes`` are ``(K, 4)`` float32 ``x1, y1, x2, y2`` in the image's pixels, clipped to it; ``labels``
    ``(K,)`` int64 in ``1..num_categories``; ``segmentations`` the json's, aligned with the boxes.
    """

    id: int
    file: Path
    width: int
    height: int
    boxes: Tensor
    labels: Tensor
    segmentations: List[Any] = field(default_factory=list)


@dataclass
class Cleanup:
    """What ``read_coco`` changed, by annotation id, so that one warning can say it."""

    clipped: List[int] = field(default_factory=list)     #: partly outside the image: clipped
    outside: List[int] = field(default_factory=list)     #: wholly outside the image: dropped
    zero_area: List[int] = field(default_factory=list)   #: zero width or height: dropped
    crowd: int = 0                                       #: ``iscrowd: 1``: not trained on
    empty_images: int = 0                                #: images kept without any box

    def message(self, path: Path) -> Optional[str]:
        parts = []
        if self.clipped:
            parts.append(f"{len(self.clipped)} boxes partly outside their image were clipped to it "
                         f"(annotation ids {listed(self.clipped)})")
        if self.outside:
            parts.append(f"{len(self.outside)} boxes wholly outside their image were dropped "
                         f"(annotation ids {listed(self.outside)})")
        if self.zero_area:
            parts.append(f"{len(self.zero_area)} boxes of zero width or height were dropped "
                         f"(annotation ids {listed(self.zero_area)})")
        return f"{path}: " + "; ".join(parts) if parts else None


@dataclass
class CocoSplit:
    """A checked COCO-format json: its images with targets, its categories (sorted by id) and the json
    itself (``raw``, for pycocotools at evaluation)."""

    path: Path
    images: List[ImageEntry]
    categories: List[Category]
    cleanup: Cleanup
    raw: Dict[str, Any]
    masks: bool = False  #: whether the targets carry masks (Mask R-CNN)

    @property
    def num_classes(self) -> int:
        """Categories plus the background: the ``num_classes`` of a torchvision detector."""
        return len(self.categories) + 1

    def category_id(self, label: int) -> int:
        """The json's category id of a model label (``1..num_categories``)."""
        return self.categories[label - 1].id


def _need(entry: Dict[str, Any], keys: Sequence[str], what: str, path: Path) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise InputError(f"{path}: expected every {what} to have {list(keys)}, but {what} "
                         f"{ {k: entry[k] for k in list(entry)[:4]} } has no {missing}")


def _categories(data: Dict[str, Any], path: Path) -> List[Category]:
    cats = data["categories"]
    if not isinstance(cats, list) or not cats:
        raise InputError(f"{path}: expected a non-empty list of categories, but got {cats!r}")
    for c in cats:
        _need(c, ("id", "name"), "category", path)
    ids = [int(c["id"]) for c in cats]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"{path}: expected each category id once, but ids {dup} appear several times")
    return sorted(Category(int(c["id"]), str(c["name"])) for c in cats)


def _box(ann: Dict[str, Any], w: int, h: int, path: Path) -> Tuple[Optional[List[float]], str]:
    """The annotation's box clipped to the image as ``x1, y1, x2, y2``, and what happened to it:
    ``"ok"``, ``"clipped"``, ``"outside"`` or ``"zero_area"`` (the last two: ``None``, dropped)."""
    bbox = ann["bbox"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
            and all(math.isfinite(v) for v in bbox)):
        raise InputError(f"{path}: expected bbox [x, y, width, height] of 4 finite numbers, but annotation "
                         f"{ann.get('id')} has {bbox!r}")
    x, y, bw, bh = (float(v) for v in bbox)
    if bw < 0 or bh < 0:
        raise InputError(f"{path}: expected bbox [x, y, width, height] with width, height >= 0, but annotation "
                         f"{ann.get('id')} has {bbox!r}; is it [x1, y1, x2, y2]? COCO boxes are [x, y, w, h]")
    if bw == 0 or bh == 0:
        return None, "zero_area"
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
    if x2 <= x1 or y2 <= y1:
        return None, "outside"
    return [x1, y1, x2, y2], "clipped" if (x1, y1, x2, y2) != (x, y, x + bw, y + bh) else "ok"


def read_coco(ann_file: Path, image_dir: Path, masks: bool = False, warn: bool = True) -> CocoSplit:
    """Read and check a COCO-format json; see the module docstring for what each problem becomes.

    Args:
        ann_file: the json.
        image_dir: the folder that ``file_name`` is relative to.
        masks: keep each annotation's ``segmentation`` (Mask R-CNN); an annotation without one is an error.
        warn: warn about clipped and dropped boxes (training targets; a validation json is scored as it is).

    Raises:
        InputError: for a json that is not COCO-format, unknown ids, a negative box size, missing files.
    """
    path, image_dir = Path(ann_file), Path(image_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"could not read the COCO json {path}: {e}") from e
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise InputError(f"{path}: expected a COCO-format json with 'images', 'annotations' and 'categories', "
                         f"but it has {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    categories = _categories(data, path)
    label_of = {c.id: k + 1 for k, c in enumerate(categories)}

    entries: Dict[int, ImageEntry] = {}
    for im in data["images"]:
        _need(im, ("id", "file_name", "width", "height"), "image", path)
        if int(im["id"]) in entries:
            raise InputError(f"{path}: expected each image id once, but {im['id']} appears several times")
        entries[int(im["id"])] = ImageEntry(int(im["id"]), image_dir / im["file_name"], int(im["width"]),
                                            int(im["height"]), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    missing = [str(e.file) for e in entries.values() if not e.file.is_file()]
    if missing:
        raise InputError(f"{path}: {len(missing)} of {len(entries)} image files are missing under {image_dir}: "
                         f"{listed(missing)}. Check --*-images (file_name is relative to it) or remove those images "
                         f"from the json")

    cleanup = Cleanup()
    boxes, labels, segs = ({i: [] for i in entries} for _ in range(3))
    for ann in data["annotations"]:
        _need(ann, ("image_id", "category_id", "bbox"), "annotation", path)
        img = entries.get(int(ann["image_id"]))
        if img is None:
            raise InputError(f"{path}: annotation {ann.get('id')} refers to image_id {ann['image_id']}, which is "
                             f"not among the images")
        label = label_of.get(int(ann["category_id"]))
        if label is None:
            raise InputError(f"{path}: annotation {ann.get('id')} has category_id {ann['category_id']}, but the "
                             f"categories are {[c.id for c in categories]}")
        box, what = _box(ann, img.width, img.height, path)
        if ann.get("iscrowd", 0):
            cleanup.crowd += 1
            continue
        if what != "ok":
            getattr(cleanup, what).append(ann.get("id"))
        if box is None:
            continue
        if masks and not ann.get("segmentation"):
            raise InputError(f"{path}: Mask R-CNN needs a segmentation for every annotation, but annotation "
                             f"{ann.get('id')} has none")
        boxes[img.id].append(box)
        labels[img.id].append(label)
        segs[img.id].append(ann.get("segmentation") if masks else None)
    for i, e in entries.items():
        e.boxes = torch.tensor(boxes[i], dtype=torch.float32).reshape(-1, 4)
        e.labels = torch.tensor(labels[i], dtype=torch.int64)
        e.segmentations = segs[i] if masks else []
        cleanup.empty_images += not len(boxes[i])
    msg = cleanup.message(path)
    if msg and warn:
        warn_user(msg)
    return CocoSplit(path, list(entries.values()), categories, cleanup, data, masks)


def check_same_categories(train: CocoSplit, val: CocoSplit) -> None:
    """The validation json must name the training json's categories (same ids), or labels would not match."""
    if [c.id for c in train.categories] != [c.id for c in val.categories]:
        raise InputError(f"expected {val.path} to have the categories of {train.path}, but their ids are "
                         f"{[c.id for c in val.categories]} and {[c.id for c in train.categories]}")


def decode_mask(segmentation: Any, height: int, width: int) -> Tensor:
    """A COCO segmentation (polygons, RLE or uncompressed RLE) as an ``(H, W)`` uint8 mask."""
    from pycocotools import mask as mask_util

    if isinstance(segmentation, list):  # polygons
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return torch.from_numpy(mask_util.decode(rle)).to(torch.uint8)


def read_image(file: Path) -> Tensor:
    """An image file as float ``(3, H, W)`` in ``[0, 1]`` (grey and RGBA images become RGB)."""
    from PIL import Image

    with Image.open(file) as im:
        rgb = im.convert("RGB")
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3)
    return pixels.permute(2, 0, 1).float().div_(255)


class CocoDataset(torch.utils.data.Dataset):
    """Images and torchvision targets of a :class:`CocoSplit`, with an optional horizontal flip.

    The flip of image ``i`` in epoch ``e`` is drawn from its own generator, seeded by ``(seed, e, i)``: the
    data are the same whatever the number of processes and loader workers, and after a resume.

    Items: ``(image, target)`` with ``image`` float ``(3, H, W)`` in ``[0, 1]`` and ``target`` a dict of
    ``boxes``, ``labels``, ``image_id`` and, when the split has masks, ``masks`` ``(K, H, W)`` uint8.
    """

    def __init__(self, split: CocoSplit, hflip: bool = False, seed: int = 0):
        self.split, self.hflip, self.seed, self.epoch = split, hflip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch's loader is iterated (workers copy the dataset when they start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split.images)

    def image(self, index: int) -> Tensor:
        """Image ``index`` as float ``(3, H, W)`` in ``[0, 1]``, unflipped; an error if it is not of the json's size."""
        e = self.split.images[index]
        image = read_image(e.file)
        if tuple(image.shape[-2:]) != (e.height, e.width):
            raise InputError(f"{self.split.path}: image {e.id} ({e.file}) is {image.shape[-1]} x {image.shape[-2]} "
                             f"pixels, but the json says {e.width} x {e.height}; the boxes would not fit it")
        return image

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        e = self.split.images[index]
        image = self.image(index)
        target = {"boxes": e.boxes.clone(), "labels": e.labels.clone(), "image_id": torch.tensor(e.id)}
        if self.split.masks:
            target["masks"] = (torch.stack([decode_mask(s, e.height, e.width) for s in e.segmentations])
                               if e.segmentations else torch.zeros(0, e.height, e.width, dtype=torch.uint8))
        if self.hflip and self._flip(index):
            image = image.flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([e.width - b[:, 2], b[:, 1], e.width - b[:, 0], b[:, 3]], 1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target

    def _flip(self, index: int) -> bool:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
        return bool(torch.rand((), generator=g) < 0.5)


def collate(batch: Sequence[Tuple[Tensor, Dict[str, Tensor]]]) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    """A batch as torchvision detectors take it: a list of images and a list of targets."""
    images, targets = zip(*batch)
    return list(images), list(targets)

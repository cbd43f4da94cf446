"""COCO evaluation with pycocotools, the images shared out among the processes and gathered on rank 0.

The model sees each validation image as it is on disk; its own transform resizes it (a student to its LR
``min_size``/``max_size``, a teacher to its HR size) and maps its boxes back to the image's pixels, so
the scores are against the json's own annotations: COCO's small/medium/large ranges are in the file's
pixels. Crowd annotations are ignore regions, as COCOeval treats them. Category ids are the json's.

Example:
    >>> metrics = evaluate(model, val_data, rt, batch_size=4)   # doctest: +SKIP
    >>> metrics["AP"], metrics["AP50"]                           # doctest: +SKIP
    (0.312, 0.541)
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import coco_runtime as runtime
from coco_data import CocoDataset, CocoSplit

#: ``COCOeval.stats`` in order.
STATS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR10", "AR100", "AR_S", "AR_M", "AR_L")


def detections(split: CocoSplit, image_ids: List[int], outputs: List[Dict[str, torch.Tensor]]) -> List[Dict]:
    """torchvision outputs as COCO result entries: ``[x, y, w, h]`` boxes, the json's category ids, and
    RLE masks where the model gives masks."""
    out = []
    for image_id, p in zip(image_ids, outputs):
        boxes, scores, labels = p["boxes"].float().cpu(), p["scores"].float().cpu(), p["labels"].cpu()
        rles = _rles(p["masks"]) if "masks" in p else [None] * len(boxes)
        for b, s, lab, rle in zip(boxes.tolist(), scores.tolist(), labels.tolist(), rles):
            det = {"image_id": image_id, "category_id": split.category_id(int(lab)),
                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            if rle is not None:
                det["segmentation"] = rle
            out.append(det)
    return out


def _rles(masks: torch.Tensor) -> List[Dict]:
    from pycocotools import mask as mask_util

    binary = (masks[:, 0] > 0.5).to(torch.uint8).cpu().numpy()  # (N, 1, H, W) probabilities from Mask R-CNN
    rles = []
    for m in binary:
        rle = mask_util.encode(m.copy(order="F"))
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


@torch.no_grad()
def predict(model: nn.Module, data: CocoDataset, indices: List[int], device: torch.device,
            batch_size: int) -> List[Dict]:
    """COCO result entries for the images ``indices`` of ``data`` (this process's share).

    In float32 even where training uses autocast: torchvision decodes boxes in the head's dtype, and bf16
    keeps 8 significant bits (a box edge near x = 1000 would move in steps of 4 pixels)."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(indices), batch_size):
            chunk = indices[i:i + batch_size]
            outputs = model([data.image(j).to(device) for j in chunk])
            out += detections(data.split, [data.split.images[j].id for j in chunk], outputs)
    finally:
        model.train(was)
    return out


def coco_ground_truth(split: CocoSplit):
    """pycocotools' ``COCO`` of the json, with ``iscrowd`` defaulting to 0 and a missing ``area`` taken as the
    box's (COCOeval needs both)."""
    from pycocotools.coco import COCO

    data = copy.deepcopy(split.raw)
    for a in data["annotations"]:
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def summarize(split: CocoSplit, dets: List[Dict], iou_types=("bbox",)) -> Dict[str, Optional[float]]:
    """COCOeval's twelve numbers per IoU type (``"bbox"``: ``AP``, ``AP50``...; ``"segm"``: ``segm_AP``...),
    None where a size range has no object, 0 where there is no detection at all."""
    from pycocotools.cocoeval import COCOeval

    gt = coco_ground_truth(split)
    metrics: Dict[str, Optional[float]] = {}
    for iou_type in iou_types:
        prefix = "" if iou_type == "bbox" else f"{iou_type}_"
        if not dets:
            metrics.update({prefix + k: 0.0 for k in STATS})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics.update({prefix + k: (float(v) if v >= 0 else None) for k, v in zip(STATS, ev.stats)})
    metrics["detections"] = len(dets)
    return metrics


def evaluate(model: nn.Module, data: CocoDataset, rt: "runtime.Runtime", batch_size: int) -> Optional[Dict[str, Any]]:
    """Box (and, for Mask R-CNN, mask) AP of ``model`` on ``data``; every process predicts every
    ``world``-th image, rank 0 gathers and scores. Returns the metrics on rank 0, None elsewhere."""
    mine = list(range(rt.rank, len(data), rt.world))
    dets = [d for part in runtime.gather(predict(model, data, mine, rt.device, batch_size), rt) for d in part]
    if not rt.is_main:
        return None
    return summarize(data.split, dets, ("bbox", "segm") if data.split.masks else ("bbox",))

"""torchvision detectors for ``train_coco.py``: RetinaNet, FCOS, Faster and Mask R-CNN on a ResNet-50, ResNet-18
or MobileNetV3-Large FPN, from scratch or from a local state dict.

The layouts are torchvision's own: with ``backbone="resnet50"`` and ``norm="bn"`` the state dict has the keys
and shapes of ``retinanet_resnet50_fpn``, ``fcos_resnet50_fpn``, ``fasterrcnn_resnet50_fpn`` and
``maskrcnn_resnet50_fpn``, so their published weights load with ``--weights``; ``mobilenet_v3`` R-CNNs are
``fasterrcnn_mobilenet_v3_large_fpn``'s. torchvision has no one-stage MobileNet detector; here RetinaNet and
FCOS take its stride 8, 16 and 32 stages plus P6-P7, the levels of their ResNet versions.

Normalisation of the backbone (``norm``):

* ``bn``: BatchNorm, torchvision's choice from scratch. Under torchrun each process normalises with its own
  images' statistics.
* ``syncbn``: BatchNorm synchronised across processes (CUDA only): the statistics of the global batch.
* ``gn``: GroupNorm (32 groups, fewer where the channels do not divide): per image, so independent of the
  batch and of the number of processes.
* ``frozenbn``: FrozenBatchNorm2d, torchvision's choice for pretrained backbones: a fixed affine map, to use
  with ``--weights`` (from scratch it is nearly an identity and nothing normalises).

Example:
    >>> model = build(Arch("retinanet", "resnet18", "gn", num_classes=3), min_size=320, max_size=512)
    >>> type(model).__name__, model.transform.min_size
    ('RetinaNet', (320,))
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from coco_data import listed
from lrdet_core import InputError

DETECTORS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")
BACKBONES = ("resnet50", "resnet18", "mobilenet_v3")
NORMS = ("bn", "syncbn", "gn", "frozenbn")


class Arch(NamedTuple):
    """What a detector is built from (its sizes come from the transform, apart)."""

    detector: str
    backbone: str
    norm: str
    num_classes: int  #: categories + background
    anchor_scale: float = 1.0  #: anchor sizes times this (below 1 for small objects)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest count that divides ``channels`` (MobileNet's 24, 40, ...)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def norm_layer(norm: str):
    from torchvision.ops import FrozenBatchNorm2d

    layers = {"bn": nn.BatchNorm2d, "syncbn": nn.BatchNorm2d, "gn": group_norm, "frozenbn": FrozenBatchNorm2d}
    if norm not in layers:
        raise InputError(f"expected norm in {NORMS}, but got {norm!r}")
    return layers[norm]  # syncbn: converted once the process group exists (train_coco.py)


def _one_stage(detector: str) -> bool:
    return detector in ("retinanet", "fcos")


def backbone(arch: Arch) -> Tuple[nn.Module, List[int]]:
    """The FPN backbone (``.body``, ``.fpn``) and the stride of each level it returns, every layer trainable."""
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    norm = norm_layer(arch.norm)
    one_stage = _one_stage(arch.detector)
    if arch.backbone in ("resnet50", "resnet18"):
        if one_stage:  # C3-C5 + P6, P7 from P5: retinanet_resnet50_fpn / fcos_resnet50_fpn
            bb = resnet_fpn_backbone(backbone_name=arch.backbone, weights=None, norm_layer=norm, trainable_layers=5,
                                     returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
            return bb, [8, 16, 32, 64, 128]
        bb = resnet_fpn_backbone(backbone_name=arch.backbone, weights=None, norm_layer=norm, trainable_layers=5)
        return bb, [4, 8, 16, 32, 64]  # C2-C5 + max-pooled P6
    if arch.backbone == "mobilenet_v3":
        if one_stage:
            bb = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, norm_layer=norm,
                                    trainable_layers=6, returned_layers=[2, 3, 5],
                                    extra_blocks=LastLevelP6P7(256, 256))
            return bb, [8, 16, 32, 64, 128]
        bb = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, norm_layer=norm,
                                trainable_layers=6)
        return bb, [32, 32, 64]  # fasterrcnn_mobilenet_v3_large_fpn: two stride-32 stages + max pool
    raise InputError(f"expected backbone in {BACKBONES}, but got {arch.backbone!r}")


def anchors(arch: Arch, strides: Sequence[int]):
    """torchvision's default anchors for the detector, one entry per level, times ``anchor_scale``."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    def scaled(sizes):
        return tuple(s * arch.anchor_scale if arch.anchor_scale != 1 else s for s in sizes)

    if arch.detector == "retinanet":  # 3 scales per octave from 4x the stride
        sizes = [(4 * s, int(4 * s * 2 ** (1 / 3)), int(4 * s * 2 ** (2 / 3))) for s in strides]
        ratios = (0.5, 1.0, 2.0)
    elif arch.detector == "fcos":  # one point per location, of the stride's size
        sizes, ratios = [(s,) for s in strides], (1.0,)
    elif arch.backbone == "mobilenet_v3":
        sizes, ratios = [(32, 64, 128, 256, 512)] * len(strides), (0.5, 1.0, 2.0)
    else:
        sizes, ratios = [(8 * s,) for s in strides], (0.5, 1.0, 2.0)
    return AnchorGenerator(tuple(scaled(s) for s in sizes), (ratios,) * len(sizes))


def build(arch: Arch, min_size: Union[int, Sequence[int]], max_size: int,
          score_thresh: Optional[float] = None) -> nn.Module:
    """A torchvision detector, randomly initialised, whose transform resizes to ``min_size``/``max_size``.

    ``min_size`` may be several sizes (one drawn per training image, the last at evaluation), as in torchvision.
    ``score_thresh``: the lowest score a prediction is kept with (None: torchvision's 0.05).
    """
    from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet

    if arch.detector not in DETECTORS:
        raise InputError(f"expected detector in {DETECTORS}, but got {arch.detector!r}")
    bb, strides = backbone(arch)
    kw = dict(min_size=tuple(min_size) if isinstance(min_size, (list, tuple)) else min_size, max_size=max_size)
    if arch.detector == "retinanet":
        kw.update({} if score_thresh is None else {"score_thresh": score_thresh})
        return RetinaNet(bb, arch.num_classes, anchor_generator=anchors(arch, strides), **kw)
    if arch.detector == "fcos":
        kw.update({} if score_thresh is None else {"score_thresh": score_thresh})
        return FCOS(bb, arch.num_classes, anchor_generator=anchors(arch, strides), **kw)
    kw.update({} if score_thresh is None else {"box_score_thresh": score_thresh})
    cls = MaskRCNN if arch.detector == "maskrcnn" else FasterRCNN
    return cls(bb, arch.num_classes, rpn_anchor_generator=anchors(arch, strides), **kw)


# ------------------------------------------------------------------------------------------------
# Loading state dicts, with errors that say what the file holds
# ------------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> Dict[str, Tensor]:
    """A state dict from ``path``: a plain one, or the ``"model"`` entry of a training checkpoint
    (this script's or torchvision's references')."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: not a torch file
        raise InputError(f"could not read the state dict {path}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(f"expected {path} to hold a state dict (names to tensors), but it holds "
                         f"{type(obj).__name__}")
    if any(k.startswith("student.") for k in obj):  # an lrdet training checkpoint: its student
        obj = {k[len("student."):]: v for k, v in obj.items() if k.startswith("student.")}
    return obj


def describe(sd: Dict[str, Tensor]) -> str:
    """What a detector state dict looks like (detector, backbone, normalisation, classes), for messages."""
    def has(*parts):
        return any(all(p in k for p in parts) for k in sd)

    detector = ("maskrcnn" if has("roi_heads.mask_head") else "fasterrcnn" if has("roi_heads.") else
                "fcos" if has("bbox_ctrness") else "retinanet" if has("head.classification_head") else "unknown")
    if has("backbone.body.layer4.0.conv3"):
        body = "resnet50" if not has("backbone.body.layer3.6.") else "a ResNet deeper than 50"
    elif has("backbone.body.layer1.0.conv1"):
        body = "resnet18" if not has("backbone.body.layer3.2.") else "a ResNet-34"
    elif has("backbone.body.0.0.weight") or has("backbone.body.1.block"):
        body = "mobilenet_v3"
    else:
        body = "unknown"
    norm = "bn or frozenbn" if has("backbone.body.", "running_mean") else "gn (no running statistics)"
    out = f"detector {detector}, backbone {body}, norm {norm}"
    cls = {"fcos": "head.classification_head.cls_logits.weight",
           "fasterrcnn": "roi_heads.box_predictor.cls_score.weight",
           "maskrcnn": "roi_heads.box_predictor.cls_score.weight"}.get(detector)
    if cls in sd:
        out += f", {sd[cls].shape[0]} classes with the background"
    return out


def load_detector_state(model: nn.Module, sd: Dict[str, Tensor], path: Path, role: str, arch: Arch) -> None:
    """``model.load_state_dict(sd)`` strictly; a mismatch raises ``InputError`` saying what the file holds."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: {tuple(sd[k].shape)} in the file, {tuple(v.shape)} here" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise InputError(
            f"the {role} checkpoint {path} does not fit a {arch.detector} on {arch.backbone} with norm {arch.norm} "
            f"and {arch.num_classes} classes (with the background): {len(missing)} tensors missing "
            f"({listed(missing)}), {len(unexpected)} unexpected ({listed(unexpected)}), {len(shapes)} of another "
            f"shape ({listed(shapes)}). The file looks like: {describe(sd)}. Pass the architecture it was trained "
            f"with (--detector, --{'teacher-' if role == 'teacher' else ''}backbone, "
            f"--{'teacher-' if role == 'teacher' else ''}norm) and the same categories")
    model.load_state_dict(sd)


def load_weights(model: nn.Module, path: Path, arch: Arch) -> str:
    """``--weights``: a whole detector's state dict (strict), or a classification backbone's (ImageNet
    ``resnet50``/``mobilenet_v3_large`` files: loaded into ``backbone.body``, their classifier left out).
    Returns what was loaded, for the log."""
    sd = read_state_dict(path)
    if any(k.startswith("backbone.") for k in sd):
        load_detector_state(model, sd, path, "--weights", arch)
        return f"the whole detector from {path}"
    body = model.backbone.body
    own = body.state_dict()
    sd = {k[len("features."):] if k.startswith("features.") else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "classifier."))}
    if not set(sd) & set(own):
        raise InputError(f"expected --weights {path} to be a detector state dict (keys 'backbone.*') or a "
                         f"{arch.backbone} classification state dict, but its keys are {list(sd)[:4]}...")
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if missing or any(sd[k].shape != own[k].shape for k in sd if k in own):
        load_detector_state(body, sd, path, "--weights (backbone)", arch)
    body.load_state_dict(sd, strict=False)
    return f"the backbone from {path} (the FPN and the head from scratch)"


def loads_into_fresh(model_sd: Dict[str, Tensor], arch: Arch, min_size, max_size) -> nn.Module:
    """A new plain detector of ``arch`` with ``model_sd`` loaded strictly: what a user of the exported file does."""
    fresh = build(arch, min_size, max_size)
    fresh.load_state_dict(model_sd)
    return fresh


def check_norm_device(arch: Arch, device: torch.device, world: int) -> None:
    """``syncbn`` synchronises only CUDA tensors (torch's limit); elsewhere it is refused up front."""
    if arch.norm == "syncbn" and world > 1 and device.type != "cuda":
        raise InputError(f"--norm syncbn needs CUDA (torch synchronises BatchNorm only on GPUs), but this run is "
                         f"on {device.type} with {world} processes; use --norm gn (per image) or bn (per process)")

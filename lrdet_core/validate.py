"""Checks of the user's models, options and batches, run before anything is frozen or any forward runs.

Each raises :class:`lrdet_core.errors.InputError` (or warns) naming what was expected, what arrived and
what to do, instead of letting torch or torchvision fail deep inside a forward, or silently doing the
wrong thing.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import InputError, NonFiniteError
from .warn import warn_user


# --- models -------------------------------------------------------------------------------------------------
def check_not_shared(student: nn.Module, teachers: Mapping[str, nn.Module], who: Mapping[str, str]) -> None:
    """Reject a teacher that holds any of the student's modules, parameters or buffers.

    Freezing the teacher would freeze those in the student too (``FasterRCNN(student.backbone, ...)`` as a
    teacher leaves the student's backbone untrained), and training the student would change the teacher.

    Example:
        >>> from torch import nn
        >>> s = nn.Sequential(nn.Linear(2, 2))
        >>> try:
        ...     check_not_shared(s, {"teacher": nn.Sequential(s[0])}, {"teacher": "teacher"})
        ... except InputError as e:
        ...     print(str(e).split("but ")[1].split(".")[0])
        the teacher's module '0' is the student's module '0'
    """
    modules = {id(m): n for n, m in _stateful_modules(student)}
    tensors = {id(t): n for n, t in _named_tensors(student)}
    for tname, teacher in teachers.items():
        shared = _first_shared(_stateful_modules(teacher), modules)
        kind = "module"
        if shared is None:
            shared, kind = _first_shared(_named_tensors(teacher), tensors), "tensor"
        if shared is not None:
            t_name, s_name = shared
            raise InputError(f"expected the {who[tname]} to share nothing with the student (it is frozen: the "
                             f"shared parts would stop training), but the {who[tname]}'s {kind} {t_name or '(root)'!r} "
                             f"is the student's {kind} {s_name or '(root)'!r}. Build the teacher from its own "
                             f"modules, e.g. copy.deepcopy(...) of what it shares.")


def _stateful_modules(m: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Modules that hold a parameter or buffer: a stateless one may be shared harmlessly (Ultralytics' ``Conv``
    uses one ``SiLU`` instance in every model)."""
    for name, mod in m.named_modules(remove_duplicate=False):
        if next(_named_tensors(mod), None) is not None:
            yield name, mod


def _named_tensors(m: nn.Module) -> Iterator[Tuple[str, Tensor]]:
    yield from m.named_parameters(remove_duplicate=False)
    yield from m.named_buffers(remove_duplicate=False)


def _first_shared(named: Iterator[Tuple[str, Any]], ids: Dict[int, str]) -> Optional[Tuple[str, str]]:
    for name, obj in named:  # parents come before children: the outermost shared part is named
        if id(obj) in ids:
            return name, ids[id(obj)]
    return None


def dtype_of(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of a model's first floating-point parameter (or buffer); None if it has none."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def warn_if_not_lower_resolution(student: nn.Module, teachers: Mapping[str, nn.Module],
                                 who: Mapping[str, str]) -> None:
    """torchvision: warn when a teacher's transform does not resize to more pixels than the student's."""
    s_min, s_max = _transform_size(student)
    for n, t in teachers.items():
        t_min, t_max = _transform_size(t)
        if None in (s_min, s_max, t_min, t_max):
            continue
        if t_min <= s_min and t_max <= s_max:
            warn_user(f"LRDet: the student resizes images to min_size={s_min}, max_size={s_max} and the "
                      f"{who[n]} to min_size={t_min}, max_size={t_max}: the student is at the same or a higher "
                      f"resolution than the {who[n]}, so there is no high-resolution view to distil from. "
                      f"Build the student with a smaller min_size/max_size (or the teacher with larger ones).")


def _transform_size(model: nn.Module) -> Tuple[Optional[int], Optional[int]]:
    tr = getattr(model, "transform", None)
    min_size, max_size = getattr(tr, "min_size", None), getattr(tr, "max_size", None)
    if isinstance(min_size, (list, tuple)):
        min_size = max(min_size) if min_size else None  # a multi-scale transform: its largest size
    return min_size, max_size


# --- options ------------------------------------------------------------------------------------------------
def check_alpha(alpha: Any, alpha_ratio: Any) -> None:
    """``alpha``: None, ``"auto"`` or a finite number >= 0; ``alpha_ratio``: with ``"auto"`` only, a number > 0."""
    if alpha is not None and alpha != "auto":
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha < 0:
            raise InputError(f"expected alpha to be a finite number >= 0, 'auto' or None (the loss's recommended "
                             f"value), but got {alpha!r}")
    if alpha_ratio is None:
        return
    if alpha != "auto":
        raise InputError(f"alpha_ratio={alpha_ratio!r} only applies with alpha='auto', but got alpha={alpha!r}")
    if isinstance(alpha_ratio, bool) or not isinstance(alpha_ratio, numbers.Real) or not (
            math.isfinite(alpha_ratio) and alpha_ratio > 0):
        raise InputError(f"expected alpha_ratio to be a finite number > 0 (alpha='auto' sets alpha * L_FD = "
                         f"alpha_ratio * L_det(LR) at the first step), but got {alpha_ratio!r}")


def check_hr_det_weight(hr_det_weight: Any) -> None:
    """``hr_det_weight``: the weight of the bridge's detection loss, a finite number >= 0."""
    if isinstance(hr_det_weight, bool) or not isinstance(hr_det_weight, numbers.Real) or not (
            math.isfinite(hr_det_weight) and hr_det_weight >= 0):
        raise InputError(f"expected hr_det_weight (the weight of the bridge's L_det(HR)) to be a finite number >= 0, "
                         f"but got {hr_det_weight!r}")


def check_bridge_rois(bridge_rois: Any, family: Optional[str]) -> None:
    """``bridge_rois``: None, or a positive int for an R-CNN student (the only ones that sample RoIs)."""
    if bridge_rois is None:
        return
    if isinstance(bridge_rois, bool) or not isinstance(bridge_rois, numbers.Integral) or bridge_rois <= 0:
        raise InputError(f"expected bridge_rois to be a positive int (RoIs sampled per image in the bridge pass) "
                         f"or None, but got {bridge_rois!r}")
    if family != "GeneralizedRCNN":
        raise InputError(f"bridge_rois applies to R-CNN students (torchvision Faster/Mask/Keypoint R-CNN), but the "
                         f"student is {'a torchvision ' + family if family else 'not a torchvision detector'}; "
                         f"leave bridge_rois=None")


def check_hr_scale(hr_scale: Any, torchvision: bool) -> None:
    """``hr_scale``: custom models only, a number > 1 (1 is allowed with a warning)."""
    if hr_scale is None:
        return
    if torchvision:
        raise InputError(f"hr_scale applies to custom (non-torchvision) models, but got hr_scale={hr_scale!r} with "
                         f"torchvision detectors, whose HR size is the teacher's transform (min_size/max_size): "
                         f"set those on the teacher and drop hr_scale")
    if isinstance(hr_scale, bool) or not isinstance(hr_scale, numbers.Real) or not math.isfinite(hr_scale) or (
            hr_scale <= 0):
        raise InputError(f"expected hr_scale to be a positive number, but got {hr_scale!r}")
    if hr_scale < 1:
        raise InputError(f"expected hr_scale >= 1 (the HR view is the images resized by it), but got {hr_scale!r}, "
                         f"which makes the HR view smaller than the LR one")
    if hr_scale == 1:
        warn_user("LRDet: hr_scale=1 makes the HR view the LR images themselves; the teacher sees no more "
                  "detail than the student")


# --- batches ------------------------------------------------------------------------------------------------
def check_images(images: Any, n_targets: int, where: str, torchvision: bool) -> None:
    """The image batch: as many images as targets; torchvision: floating ``C x H x W`` tensors."""
    if isinstance(images, (list, tuple)):
        n = len(images)
    elif isinstance(images, Tensor) and images.dim() == 4:
        n = images.shape[0]
    else:
        n = None
    if n is not None and n != n_targets:
        raise InputError(f"expected as many targets as {where}, but got {n} {where} and {n_targets} targets")
    if not torchvision:
        return
    if n is None:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"expected {where} as a list of C x H x W tensors (or an N x C x H x W tensor), but got {got}")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3:
            got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise InputError(f"expected {where}[{i}] to be a C x H x W tensor, but got {got}")
        if not img.is_floating_point():
            raise InputError(f"expected {where}[{i}] to be a floating-point image with values in [0, 1], but got "
                             f"{img.dtype}; convert it with image.float() / 255")


def check_float_images(images: Any, where: str) -> None:
    """Images the library resizes itself (``hr_scale``) must be floating point."""
    for i, img in enumerate([images] if isinstance(images, Tensor) else list(images)):
        if isinstance(img, Tensor) and not img.is_floating_point():
            raise InputError(f"expected floating-point {where} to build the HR view with hr_scale, but got "
                             f"{img.dtype}{'' if isinstance(images, Tensor) else f' for image {i}'}; convert "
                             f"them with images.float() / 255")


def check_hr_not_smaller(images: Any, hr_images: Any) -> None:
    """An explicit HR view must be at least as large as the LR images, image by image."""
    lr, hr = _spatial_sizes(images), _spatial_sizes(hr_images)
    if lr is None or hr is None:
        return
    for i, (a, b) in enumerate(zip(lr, hr)):
        if b[0] < a[0] or b[1] < a[1]:
            raise InputError(f"expected the HR view to be at least as large as the LR images, but image {i} is "
                             f"{a[0]}x{a[1]} and its hr_images entry {b[0]}x{b[1]}; were images and hr_images "
                             f"swapped?")


def _spatial_sizes(images: Any) -> Optional[List[Tuple[int, int]]]:
    if isinstance(images, Tensor) and images.dim() == 4:
        return [tuple(images.shape[-2:])] * images.shape[0]
    if isinstance(images, (list, tuple)) and all(isinstance(x, Tensor) and x.dim() >= 2 for x in images):
        return [tuple(x.shape[-2:]) for x in images]
    return None


def check_targets(targets: Any, where: str, torchvision: bool) -> None:
    """Reject boxes and labels that no detection loss can use, naming the image and the box.

    Boxes: ``(K, 4)``, finite, ``x2 > x1`` and ``y2 > y1`` (torchvision checks only the last two, with
    ``torch._assert`` deep inside its forward, after the LR pass; NaN boxes pass it and poison the losses).
    Boxes partly or wholly outside the image are allowed: detectors and FGD's masks clip them.
    torchvision models also need ``boxes`` and ``labels`` in every target, labels an int64 ``(K,)`` tensor.
    """
    if not isinstance(targets, (list, tuple)):
        return  # a custom model's own target format
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping):
            raise InputError(f"expected {where}[{i}] to be a dict with 'boxes', but got {type(t).__name__}")
        if torchvision:
            missing = [k for k in ("boxes", "labels") if k not in t]
            if missing:
                raise InputError(f"expected {where}[{i}] to have 'boxes' and 'labels' (torchvision detectors need "
                                 f"both), but it has no {missing} (keys: {sorted(map(str, t))})")
        b = t.get("boxes")
        if b is None:
            continue
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[-1] != 4:
            got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise InputError(f"expected {where}[{i}]['boxes'] to be a (K, 4) tensor of x1, y1, x2, y2 "
                             f"(K may be 0), but got {got}")
        if torchvision:
            _check_labels(t["labels"], b.shape[0], f"{where}[{i}]['labels']")
        if not b.numel():
            continue
        bad = ~(torch.isfinite(b).all(dim=1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise InputError(f"expected every box to be finite with x2 > x1 and y2 > y1, but "
                             f"{where}[{i}]['boxes'][{j}] is {[round(float(v), 4) for v in b[j]]} "
                             f"({int(bad.sum())} bad box(es) in image {i}); drop or fix degenerate boxes")


def _check_labels(labels: Any, k: int, where: str) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype != torch.int64 or labels.shape[0] != k:
        got = (f"a {labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, Tensor)
               else type(labels).__name__)
        raise InputError(f"expected {where} to be an int64 tensor of shape ({k},), one class index per box, but "
                         f"got {got}; e.g. torch.as_tensor(labels, dtype=torch.int64)")


# --- the teachers -------------------------------------------------------------------------------------------
#: The internal name of a lone teacher; its loss keys carry no teacher name.
SINGLE = "teacher"


def who(tname: str) -> str:
    """How a teacher is named in messages."""
    return "teacher" if tname == SINGLE else f"teacher {tname!r}"


def as_teacher_dict(teacher: Any) -> Dict[str, nn.Module]:
    """One teacher, a list (names ``t0, t1, ...``) or a dict of them, as ``{name: teacher}``."""
    if isinstance(teacher, nn.Module):
        teachers = {SINGLE: teacher}
    elif isinstance(teacher, Mapping):
        teachers = dict(teacher)
    elif isinstance(teacher, (list, tuple)):
        teachers = {f"t{i}": t for i, t in enumerate(teacher)}
    else:
        raise InputError(f"expected the teacher to be an nn.Module, a list or a dict of them, "
                         f"but got {type(teacher).__name__}")
    if not teachers:
        raise InputError("expected at least one teacher, but got an empty collection")
    if len(teachers) > 1 and SINGLE in teachers:
        raise InputError(f"the name {SINGLE!r} is reserved for a lone teacher; name the teachers otherwise, "
                         f"got {list(teachers)}")
    for n, t in teachers.items():
        if not isinstance(t, nn.Module):
            raise InputError(f"expected teacher {n!r} to be an nn.Module, but got {type(t).__name__}")
        if not isinstance(n, str) or "." in n or "/" in n:
            raise InputError(f"expected teacher names to be strings without '.' or '/', but got {n!r}")
    return teachers


def check_options(student: Any, teachers: Mapping[str, nn.Module], *, hr_source: Any, check_finite: Any,
                  alpha: Any, alpha_ratio: Any, bridge_rois: Any, hr_det_weight: Any, family: Optional[str]) -> None:
    """The distiller's models and options, before anything is frozen or built.

    Args:
        family: the student's torchvision family (only R-CNN students take ``bridge_rois``).
    """
    if not isinstance(student, nn.Module):
        raise InputError(f"expected the student to be an nn.Module, but got {type(student).__name__}")
    if any(t is student for t in teachers.values()):
        raise InputError("the teacher must be a separate model from the student (it is frozen)")
    check_not_shared(student, teachers, {n: who(n) for n in teachers})
    check_choice("hr_source", hr_source, ("teacher", "lr"))
    check_choice("check_finite", check_finite, ("raise", "warn", "off"))
    check_alpha(alpha, alpha_ratio)
    check_bridge_rois(bridge_rois, family)
    check_hr_det_weight(hr_det_weight)


def check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise InputError(f"expected {name} to be {' or '.join(repr(c) for c in choices)}, but got {value!r}")


# --- results of a step --------------------------------------------------------------------------------------
def check_terms_finite(out: Mapping[str, Tensor], skip: Any, mode: str) -> None:
    """``check_finite`` for the detection terms (the distillation terms are checked per level on their own)."""
    keys = [k for k, v in out.items() if k not in skip and isinstance(v, Tensor)]
    if mode == "off" or not keys:
        return
    finite = torch.stack([torch.isfinite(out[k].detach()).all() for k in keys])
    if bool(finite.all()):  # one device sync for all terms
        return
    bad = [f"{k!r} = {out[k].detach().float().mean().item()}" for k, ok in zip(keys, finite.tolist()) if not ok]
    _report(mode, f"expected every loss term to be finite, but {', '.join(bad)}; the LR and bridge terms are the "
                  f"student's own detection losses on this batch (check its learning rate and the batch's boxes)")


def check_distill_value(value: Any, key: str, mode: str, per_level: Callable[[], List[str]]) -> None:
    """A distillation loss returned a scalar tensor, finite unless ``mode`` says otherwise.

    Args:
        per_level: the levels at which the loss alone is not finite (run only when the sum is not).
    """
    if not isinstance(value, Tensor) or value.dim() != 0:
        raise InputError(f"expected the distillation loss to return a scalar tensor, but it returned "
                         f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
    if mode != "off" and not bool(torch.isfinite(value)):
        bad = per_level()
        _report(mode, f"the distillation term {key!r} is {value.item()}; non-finite at level(s) "
                      f"{', '.join(bad) or 'unknown (only in the sum)'}")


def _report(mode: str, msg: str) -> None:
    if mode == "raise":
        raise NonFiniteError(msg)
    warn_user("LRDet: " + msg)


def check_batch(adapter: Any, images: Any, targets: Any, hr_images: Any, hr_targets: Any,
                hr_scale: Optional[float]) -> None:
    """Every check of a training batch that can run before a forward, so torch's errors never arrive mid-step.

    Args:
        adapter: the student's adapter (its family checks the images and targets).
    """
    if targets is None:
        raise InputError("expected targets in training mode, but got None")
    if len(targets) == 0:
        raise InputError("expected a batch of at least one image with its targets, but got an empty batch")
    adapter.check_images(images, len(targets), "images")
    adapter.check_targets(targets, "targets")
    if (hr_images is None) != (hr_targets is None):
        raise InputError("expected hr_images and hr_targets together, but got only "
                         f"{'hr_images' if hr_targets is None else 'hr_targets'}")
    if hr_images is None:
        if not adapter.builds_hr_view:
            if hr_scale is None:
                raise InputError(f"expected hr_images and hr_targets, or BridgeDistiller(..., hr_scale=...) to "
                                 f"build them, for a {adapter.family}; got neither")
            check_float_images(images, "images")
        return
    adapter.check_images(hr_images, len(targets), "hr_images")
    adapter.check_targets(hr_targets, "hr_targets")
    check_hr_not_smaller(images, hr_images)


def warn_targets_in_eval() -> None:
    """Targets given to a distiller in eval mode, which only predicts (said once per distiller)."""
    warn_user("LRDet: the distiller is in eval mode, so distiller(images, targets) returns the student's "
              "predictions and ignores the targets; call distiller.train() for the training losses")


def warn_hr_scale_unused(hr_scale: float) -> None:
    """An explicit HR view was given to a distiller built with ``hr_scale`` (said once per distiller)."""
    warn_user(f"LRDet: hr_images were given, so hr_scale={hr_scale:g} is not used for this batch "
              f"(the explicit HR view wins whenever it is passed)")


def nonfinite_levels(loss: Callable, student: List[Tensor], teacher: List[Tensor], ctx: Any) -> List[str]:
    """The levels at which ``loss`` alone is not finite (``"name (stride s)"``), to say where a sum went wrong."""
    with torch.no_grad():
        return [f"{n} (stride {s})" for i, (n, s) in enumerate(zip(ctx.level_names, ctx.strides))
                if not bool(torch.isfinite(loss([student[i]], [teacher[i]], ctx.only(i))))]

"""The BridgeDistiller: LRDet's training step around an unchanged detector (Section 3, Algorithm 1).

One training call runs

1. the LR student as usual (its detection loss ``L_det(LR)``), recording its backbone outputs;
2. the frozen HR teacher, only as far as its neck;
3. the *bridge*: the recorded backbone outputs resampled to the HR feature sizes and pushed through the
   student's own neck and head (the same modules, the same weights) against HR targets (``L_det(HR)``);
4. a feature-distillation loss between the bridge's and the teacher's neck outputs, matched by stride.

It returns one flat dict whose sum is ``L_det(LR) + L_det(HR bridge) + alpha * L_FD`` (eq. 1-2).
Nothing in the user's model is rewritten: the bridge swaps modules for the duration of one call and
hooks are removed in ``finally`` blocks.
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validate
from .adapters import SplitPoints, resolve_split_points, torchvision_family
from .align import resample_to_hr
from .balance import auto_alphas
from .context import DistillContext, level_stride
from .errors import InputError, NonFiniteError, SplitPointError
from .inherit import InheritReport, inherit_weights
from .levels import Level, LevelMap, LevelPair, normalize_level_map, pair_levels, unpaired_strides
from .losses import RECOMMENDED_ALPHA, build_loss
from .losses import loss_name as canonical_loss_name
from .paths import get_module, swapped

LossSpec = Union[str, nn.Module, Callable[..., Tensor]]


class _LevelSize(NamedTuple):
    """A teacher backbone level as the bridge needs it: name, stride and HR size."""

    key: str
    stride: int
    size: Tuple[int, int]


class _StopForward(Exception):
    """Raised by a hook to end the teacher's forward right after its neck."""


# --------------------------------------------------------------------------------------------------
# Feature structures: a split point may return a tensor, a list/tuple or a dict of tensors.
# --------------------------------------------------------------------------------------------------
class _Feats:
    """A split point's output as ordered (name, tensor) pairs plus a way to rebuild the original type."""

    def __init__(self, out: Any, where: str):
        if isinstance(out, Tensor):
            self.keys, self.tensors, self._kind = ["0"], [out], "tensor"
        elif isinstance(out, Mapping):
            self.keys, self.tensors, self._kind = [str(k) for k in out], list(out.values()), type(out)
            self._orig_keys = list(out)
        elif isinstance(out, (list, tuple)):
            self.keys, self.tensors, self._kind = [str(i) for i in range(len(out))], list(out), type(out)
        else:
            raise SplitPointError(f"expected the {where} to return a tensor, a list/tuple of tensors or a dict of "
                                  f"tensors, but it returned {type(out).__name__}")
        bad = [k for k, t in zip(self.keys, self.tensors) if not (isinstance(t, Tensor) and t.dim() == 4)]
        if bad or not self.tensors:
            got = {k: (tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__)
                   for k, t in zip(self.keys, self.tensors)}
            raise SplitPointError(f"expected the {where} to return N x C x H x W tensors, but got {got}")

    def rebuild(self, tensors: Sequence[Tensor]) -> Any:
        if self._kind == "tensor":
            return tensors[0]
        if self._kind in (list, tuple):
            return self._kind(tensors)
        try:
            return self._kind(zip(self._orig_keys, tensors))
        except TypeError:  # a Mapping type that cannot be built from pairs
            return dict(zip(self._orig_keys, tensors))


class _StandIn(nn.Module):
    """Takes a module's place for one call; every other attribute is read from the original.

    torchvision calls ``transform.postprocess`` and reads attributes of replaced modules, so a bare
    replacement would break the model in ways that only show at run time.
    """

    def __init__(self, original: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: no duplicate parameters
        object.__setattr__(self, "_fn", fn)
        self.training = original.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


@contextmanager
def _hook(module: nn.Module, fn: Callable, pre: bool = False) -> Iterator[None]:
    handle = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers use batch statistics but do not update their running ones.

    The bridge reuses the student's neck and head; without this, every BN in them would average HR
    statistics into the running estimates the LR student is evaluated with.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False  # with training=True: batch stats, no running update, no counter
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


@contextmanager
def _attr_set(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _canvas_of(x: Any, where: str) -> Tuple[int, int]:
    if not (isinstance(x, Tensor) and x.dim() == 4):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SplitPointError(f"expected the {where} to receive the image batch (N, C, H, W) as its first input, "
                              f"but it received {got}")
    return int(x.shape[-2]), int(x.shape[-1])


def _loss_name(loss: Any) -> str:
    if isinstance(loss, str):
        return loss
    name = type(loss).__name__ if isinstance(loss, nn.Module) else getattr(loss, "__name__", "")
    return name.lower() if name.isidentifier() else "custom"


#: At the first step with a default ``alpha``, warn when ``alpha * L_FD / L_det(LR)`` is above this or below its
#: inverse.
BALANCE_WARN = 100.0

_FGD_PRESET_OF = {"RetinaNet": "retinanet", "FCOS": "fcos", "GeneralizedRCNN": "rcnn"}
_SINGLE = "teacher"  # the internal name of a lone teacher; its loss keys carry no teacher name


def _who(tname: str) -> str:
    return "teacher" if tname == _SINGLE else f"teacher {tname!r}"


def _input_cast_to(model: nn.Module) -> Callable:
    """A forward pre-hook casting a floating first input to ``model``'s dtype.

    A teacher cast to bf16/fp16/fp64 to save memory still receives the student's fp32 batch; its
    backbone (the split point, which takes the image batch) gets it in its own dtype, and the teacher
    runs with autocast off.
    """
    dtype = validate.dtype_of(model)

    def cast(mod: nn.Module, inputs: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        x = inputs[0] if inputs else None
        if dtype is None or not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return None
        return (x.to(dtype),) + tuple(inputs[1:])
    return cast


def _neck_recorder(rec: Dict[str, Any], where: str, keep: bool = True) -> Callable:
    """A forward hook that records a neck's output and rejects a neck called more than once per forward.

    A neck called once per level (``[neck(f) for f in feats]``) would leave one level per call; the
    distiller would keep one of them and then blame the strides.
    """
    def on_neck(mod: nn.Module, inputs: Any, output: Any) -> None:
        rec["neck_calls"] = rec.get("neck_calls", 0) + 1
        if rec["neck_calls"] > 1:
            raise SplitPointError(f"expected the {where} to be called once per forward, taking every backbone level "
                                  f"and returning every neck level, but it was called a second time in one forward "
                                  f"(a neck applied once per level?). Point the split point at a module that wraps "
                                  f"the per-level calls, or wrap them in one nn.Module")
        if keep:
            rec["neck"] = _Feats(output, where)
    return on_neck


def _copy_targets(targets: Optional[List[Dict[str, Tensor]]]) -> Optional[List[Dict[str, Tensor]]]:
    return None if targets is None else [dict(t) for t in targets]


# --------------------------------------------------------------------------------------------------
class BridgeDistiller(nn.Module):
    """Train an LR student with an HR teacher through LRDet's bridge branch.

    Args:
        student: the detector to train. In training it takes ``(images, targets)`` and returns a dict
            of losses; in eval it takes ``images`` and returns predictions.
        teacher: the frozen HR detector, a list of them (one bridge each, Table 5), or a dict
            ``{name: teacher}`` whose names prefix the loss keys. It is never trained, always in eval
            mode, runs under ``no_grad`` only as far as its neck, and is not part of ``state_dict()``.
        split_points: where to cut the student; found automatically for torchvision RetinaNet, FCOS and
            (Faster/Mask/Keypoint) R-CNN.
        teacher_split_points: where to cut the teacher(s), when it differs from the student.
        loss: ``"mse"`` (paper default) | ``"l1"`` | ``"cwd"`` | ``"fgd"`` | an ``nn.Module`` | any callable
            ``(student_feats, teacher_feats, ctx) -> Tensor``. Each teacher gets its own instance.
        loss_kwargs: constructor arguments of a named loss, e.g. ``{"reduction": "mean"}``. For ``"fgd"``
            the preset defaults to the student's torchvision family (retinanet, fcos or rcnn).
        alpha: weight of the distillation term, a finite number >= 0; ``None`` takes the recommended value
            of a named loss (0.005 for MSE with sum reduction, the paper's) and 1.0 for a custom callable.
            With the default, the first step warns if ``alpha * L_FD`` is over 100x (or under 1/100) the LR
            detection loss and suggests the alpha that balances them: summed losses scale with the
            model's feature size and magnitude. ``"auto"``: measured at the first training step so that
            ``alpha * L_FD = alpha_ratio * L_det(LR)``, one alpha per teacher, the same on every DDP rank
            (the terms are averaged over ranks), kept in ``state_dict()`` (buffer ``auto_alpha``) so that a
            resumed run does not re-measure; ``materialize()`` does not measure it. See :attr:`alphas`.
        alpha_ratio: with ``alpha="auto"``: the target ``alpha * L_FD / L_det(LR)``; default 0.5.
        inherit: initialise the student from the (first) teacher where names and shapes match (Sec. 3.2).
        bridge: ``False`` gives the conventional "upsample" distillation of Table 1 instead: the LR neck
            outputs are resampled to the teacher's sizes and distilled directly, with no bridge branch.
        hr_source: how the HR view is made for torchvision detectors. ``"teacher"`` (default): the raw
            images and targets go through the teacher's own transform, so the teacher sees the real
            detail it was trained on. ``"lr"``: the images are first resized to the student's LR size and
            then upsampled by the teacher's transform, as in the paper (which had only LR images).
        hr_scale: for non-torchvision detectors without explicit ``hr_images``: the HR view is the
            images bilinearly resized by this factor (>= 1), with ``boxes`` scaled by it. An error for
            torchvision detectors, whose HR size is the teacher's transform.
        bridge_rois: R-CNN students only: a positive number of RoIs sampled per image in the bridge pass
            (the RoI heads dominate its cost); ``None`` keeps the student's own setting.
        check_finite: ``"raise"`` (default) | ``"warn"`` | ``"off"`` for a NaN/Inf term (any returned key).
        level_map: which student neck level is distilled towards which teacher level, where pairing by
            stride cannot tell: ``{student_level: teacher_level}`` (for every teacher) or ``{teacher_name:
            {student_level: teacher_level}}``. Only the pairs named are distilled. Without it, levels pair
            by stride; several levels at one stride (MobileNetV3 FPNs) pair by name, else by order.
        hr_det_weight: weight of the bridge's detection loss ``L_det(HR)`` (1.0, the paper's objective).
            0 keeps the bridge pass, whose neck output is still distilled, but trains nothing with HR
            boxes: with ``alpha=0`` instead, the two terms of the bridge can be ablated one at a time.

    Loss keys (training): ``"lr/<k>"`` the student's own losses, ``"bridge/<k>"`` the bridge's,
    ``"distill/<loss>"`` = ``alpha * L_FD``. With several teachers: ``"bridge.<name>/<k>"`` and
    ``"distill.<name>/<loss>"`` (names ``t0, t1, ...`` for a list).

    Example:
        >>> import torch
        >>> from torchvision.models.detection import retinanet_resnet50_fpn
        >>> kw = dict(weights=None, weights_backbone=None, num_classes=3)
        >>> student = retinanet_resnet50_fpn(min_size=128, max_size=128, **kw)
        >>> teacher = retinanet_resnet50_fpn(min_size=256, max_size=256, **kw)
        >>> distiller = BridgeDistiller(student, teacher)
        >>> images = [torch.rand(3, 200, 200)]
        >>> targets = [{"boxes": torch.tensor([[10., 20., 90., 120.]]), "labels": torch.tensor([1])}]
        >>> sorted(distiller(images, targets))  # doctest: +NORMALIZE_WHITESPACE
        ['bridge/bbox_regression', 'bridge/classification', 'distill/mse', 'lr/bbox_regression',
         'lr/classification']
    """

    def __init__(self, student: nn.Module, teacher: Union[nn.Module, Sequence[nn.Module], Mapping[str, nn.Module]],
                 split_points: Optional[SplitPoints] = None, teacher_split_points: Optional[SplitPoints] = None,
                 loss: LossSpec = "mse", alpha: Optional[float] = None, inherit: bool = False, bridge: bool = True,
                 hr_source: str = "teacher", hr_scale: Optional[float] = None, bridge_rois: Optional[int] = None,
                 check_finite: str = "raise", loss_kwargs: Optional[Mapping[str, Any]] = None,
                 alpha_ratio: Optional[float] = None, level_map: Optional[LevelMap] = None,
                 hr_det_weight: float = 1.0):
        super().__init__()
        if not isinstance(student, nn.Module):
            raise InputError(f"expected the student to be an nn.Module, but got {type(student).__name__}")
        self.student = student
        teachers = self._as_teacher_dict(teacher)
        if any(t is student for t in teachers.values()):
            raise InputError("the teacher must be a separate model from the student (it is frozen)")
        validate.check_not_shared(student, teachers, {n: _who(n) for n in teachers})  # before anything is frozen
        if hr_source not in ("teacher", "lr"):
            raise InputError(f"expected hr_source to be 'teacher' or 'lr', but got {hr_source!r}")
        if check_finite not in ("raise", "warn", "off"):
            raise InputError(f"expected check_finite to be 'raise', 'warn' or 'off', but got {check_finite!r}")
        validate.check_alpha(alpha, alpha_ratio)
        validate.check_bridge_rois(bridge_rois, torchvision_family(student))
        validate.check_hr_scale(hr_scale, torchvision_family(student) is not None)
        validate.check_hr_det_weight(hr_det_weight)
        if isinstance(loss, str):
            loss = canonical_loss_name(loss)  # once: alpha, the FGD preset and the loss key all use this name
        self._level_map = normalize_level_map(level_map, list(teachers), {n: _who(n) for n in teachers})

        self.split_points = resolve_split_points(student, split_points, "student")
        # A custom teacher is cut where the student is, unless it has split points of its own.
        self.teacher_split_points = {
            n: resolve_split_points(t, teacher_split_points or (None if torchvision_family(t) else self.split_points),
                                    _who(n)) for n, t in teachers.items()}
        get_module(student, self.split_points.backbone, "student's backbone split point")
        get_module(student, self.split_points.neck, "student's neck split point")
        for n, t in teachers.items():
            get_module(t, self.teacher_split_points[n].backbone, f"{_who(n)}'s backbone split point")
            get_module(t, self.teacher_split_points[n].neck, f"{_who(n)}'s neck split point")

        self.torchvision = torchvision_family(student) is not None
        if self.torchvision != all(torchvision_family(t) is not None for t in teachers.values()):
            raise InputError("expected the student and the teacher(s) to be both torchvision detectors or both "
                             "custom models, because the HR view is built differently for each")
        self.bridge, self.hr_source, self.hr_scale = bridge, hr_source, hr_scale
        self.hr_det_weight = float(hr_det_weight)
        self.bridge_rois, self.check_finite = bridge_rois, check_finite
        if self.torchvision and hr_source == "teacher":
            validate.warn_if_not_lower_resolution(student, teachers, {n: _who(n) for n in teachers})

        # The teachers are kept out of the module tree: no gradients, not in state_dict(), not in
        # parameters(), and distiller.train() cannot reach them.
        for t in teachers.values():
            t.requires_grad_(False)
            t.eval()
        object.__setattr__(self, "_teachers", teachers)

        self.loss_name = _loss_name(loss)
        alpha_given = alpha is not None  # a user-chosen alpha is not second-guessed
        if alpha is None:
            alpha = RECOMMENDED_ALPHA.get(loss, 1.0) if isinstance(loss, str) else 1.0
        self.alpha: Union[float, str] = alpha if alpha == "auto" else float(alpha)
        self.alpha_ratio = 0.5 if alpha_ratio is None else float(alpha_ratio)
        if alpha == "auto":
            # NaN until measured; a buffer, so that a resumed run restores it instead of measuring again.
            self.register_buffer("auto_alpha", torch.full((len(teachers),), math.nan, dtype=torch.float64))
        self._register_load_state_dict_pre_hook(self._auto_alpha_from_state_dict)
        self.losses = nn.ModuleDict()
        self._callable_losses: Dict[str, Callable] = {}
        loss_kwargs = dict(loss_kwargs or {})
        if loss == "fgd" and "preset" not in loss_kwargs and torchvision_family(student):
            # FGD's weights were tuned per detector family; pick the student's.
            loss_kwargs["preset"] = _FGD_PRESET_OF[torchvision_family(student)]
        if loss_kwargs and not isinstance(loss, str):
            raise InputError(f"loss_kwargs are for a loss given by name, but the loss is a {type(loss).__name__}")
        for i, n in enumerate(teachers):
            fn = build_loss(loss, **loss_kwargs) if (isinstance(loss, str) or i == 0) else (
                copy.deepcopy(loss) if isinstance(loss, nn.Module) else loss)
            if isinstance(fn, nn.Module):
                self.losses[n] = fn
            else:
                self._callable_losses[n] = fn
        self.projectors = nn.ModuleDict()  # 1x1 convs for levels whose channel counts differ
        self._reported: set = set()
        self._balance_checked = alpha_given
        self._reported_hr_scale = False
        self._materializing = False
        self._register_load_state_dict_pre_hook(self._projectors_from_state_dict)

        self.inherit_report: Optional[InheritReport] = None
        if inherit:
            self.inherit_report = inherit_weights(student, next(iter(teachers.values())))
        self._constructed = False
        # Strides read off small canvases are ambiguous (P6 and P7 of a 64 px image are both 1 cell);
        # torchvision models get theirs from a probe at construction, custom models per step.
        self._level_strides: Dict[str, Dict[str, int]] = {}
        if self.torchvision:
            self._probe_levels()
        self._constructed = True

    # ---------------------------------------------------------------------------------------------
    @staticmethod
    def _as_teacher_dict(teacher: Any) -> Dict[str, nn.Module]:
        if isinstance(teacher, nn.Module):
            teachers = {_SINGLE: teacher}
        elif isinstance(teacher, Mapping):
            teachers = dict(teacher)
        elif isinstance(teacher, (list, tuple)):
            teachers = {f"t{i}": t for i, t in enumerate(teacher)}
        else:
            raise InputError(f"expected the teacher to be an nn.Module, a list or a dict of them, "
                             f"but got {type(teacher).__name__}")
        if not teachers:
            raise InputError("expected at least one teacher, but got an empty collection")
        if len(teachers) > 1 and _SINGLE in teachers:
            raise InputError(f"the name {_SINGLE!r} is reserved for a lone teacher; name the teachers otherwise, "
                             f"got {list(teachers)}")
        for n, t in teachers.items():
            if not isinstance(t, nn.Module):
                raise InputError(f"expected teacher {n!r} to be an nn.Module, but got {type(t).__name__}")
            if not isinstance(n, str) or "." in n or "/" in n:
                raise InputError(f"expected teacher names to be strings without '.' or '/', but got {n!r}")
        return teachers

    @property
    def teachers(self) -> Dict[str, nn.Module]:
        """The frozen teacher(s) by name (``"teacher"`` for a single one)."""
        return self._teachers

    @property
    def teacher(self) -> nn.Module:
        """The first (usually the only) teacher."""
        return next(iter(self._teachers.values()))

    def train(self, mode: bool = True) -> "BridgeDistiller":
        super().train(mode)
        for t in self._teachers.values():
            t.eval()  # a teacher in train mode would update its BN statistics and sample differently
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> "BridgeDistiller":
        kept = self._buffers.get("auto_alpha")
        super()._apply(fn, recurse)
        if kept is not None:  # .half()/.bfloat16() move alpha along but must not round it
            self.auto_alpha = kept.to(device=self.auto_alpha.device)
        for t in self._teachers.values():  # .to()/.cuda()/.float() move the teacher along
            t._apply(fn, recurse)
            t.requires_grad_(False)
        return self

    @property
    def alphas(self) -> Dict[str, Optional[float]]:
        """The weight of each teacher's distillation term by teacher name; with ``alpha="auto"``, ``None``
        until the first training step has measured it."""
        if self.alpha != "auto":
            return {n: float(self.alpha) for n in self._teachers}
        return {n: (None if math.isnan(a) else a) for n, a in zip(self._teachers, self._auto_alpha_list())}

    def _auto_alpha_list(self) -> List[float]:
        # Read from the buffer every time (no cached copy): loading a checkpoint or DDP's buffer broadcast
        # may change it.
        return [float(a) for a in self.auto_alpha.tolist()]

    def _auto_alpha_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        key = f"{prefix}auto_alpha"
        if self.alpha == "auto" and key not in state_dict:
            # A checkpoint of a distiller with a numeric alpha (or from before alpha="auto"): nothing was
            # measured, so alpha is measured at the next training step.
            state_dict[key] = torch.full_like(self.auto_alpha, math.nan)
        elif self.alpha != "auto" and key in state_dict:
            warnings.warn(f"LRDet: the checkpoint holds alpha='auto' values {state_dict[key].tolist()}, but this "
                          f"distiller has alpha={self.alpha:g}, which is used; build it with alpha='auto' to "
                          f"resume with the measured values", stacklevel=4)
            del state_dict[key]

    def _projectors_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # A custom model's projectors are created at its first step; a checkpoint loaded into a fresh
        # distiller before that step must find them. Their shapes are in the checkpoint.
        head = f"{prefix}projectors."
        for key, w in state_dict.items():
            name = key[len(head):-len(".weight")]
            if key.startswith(head) and key.endswith(".weight") and "." not in name and name not in self.projectors:
                p = next(self.student.parameters(), w)
                self.projectors[name] = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=f"{head}{name}.bias" in state_dict
                                                  ).to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def materialize(self, images: Any, targets: List[Dict[str, Tensor]], *, hr_images: Any = None,
                    hr_targets: Optional[List[Dict[str, Tensor]]] = None) -> "BridgeDistiller":
        """Create the projectors and loss parameters now, from one batch, and change nothing else.

        torchvision students get them at construction; a custom model's channel counts are known only
        once it has run. Call this before building the optimizer and before wrapping the distiller in
        ``DistributedDataParallel``, which synchronises only the parameters that exist when it is built.
        It runs one training forward under ``no_grad`` and puts back the student's buffers (BatchNorm
        statistics) and the CPU random state.
        """
        buffers = [(b, b.clone()) for b in self.student.buffers()]
        was, self._materializing = self.training, True
        try:
            with torch.random.fork_rng(devices=[]):
                self.train()(images, targets, hr_images=hr_images, hr_targets=hr_targets)
        finally:
            self._materializing = False
            self.train(was)
            for b, old in buffers:
                b.copy_(old)
        return self

    def student_state_dict(self) -> Dict[str, Tensor]:
        """The plain student's ``state_dict``, loadable into a fresh model of the student's class."""
        return self.student.state_dict()

    def _key(self, kind: str, tname: str, name: str) -> str:
        return f"{kind}/{name}" if tname == _SINGLE else f"{kind}.{tname}/{name}"

    # ---------------------------------------------------------------------------------------------
    def forward(self, images: Any, targets: Optional[List[Dict[str, Tensor]]] = None, *,
                hr_images: Any = None, hr_targets: Optional[List[Dict[str, Tensor]]] = None) -> Any:
        """Training: the dict of LRDet losses. Eval: the student's own predictions on ``images``.

        Args:
            images: what the student takes (for torchvision, a list of ``C x H x W`` tensors).
            targets: what the student takes (for torchvision, a list of dicts with ``boxes``, ``labels``,
                and ``masks``/``keypoints`` where the model needs them).
            hr_images, hr_targets: an explicit HR view of the same batch. Optional for torchvision
                (default: ``hr_source``) and for custom models with ``hr_scale``.
        """
        if not self.training:
            return self.student(images)
        self._check_batch(images, targets, hr_images, hr_targets)
        for t in self._teachers.values():
            t.eval()

        lr = self._student_pass(images, targets)
        out = {f"lr/{k}": v for k, v in lr["losses"].items()}
        distill: Dict[str, Tensor] = {}  # unweighted L_FD per teacher; alpha is applied once all are known
        for tname, teacher in self._teachers.items():
            hr = self._teacher_pass(tname, teacher, images, targets, hr_images, hr_targets, lr)
            if self.bridge:
                bridge_losses, s_feats = self._bridge_pass(images, targets, lr, hr)
                w = self.hr_det_weight
                out.update({self._key("bridge", tname, k): v if w == 1.0 else w * v for k, v in bridge_losses.items()})
            else:
                s_feats = self._upsampled_lr_neck(lr, hr)
            distill[tname] = out[self._key("distill", tname, self.loss_name)] = self._distill(tname, s_feats, hr)
        self._check_terms_finite(out, skip={self._key("distill", t, self.loss_name) for t in distill})
        for tname, alpha in zip(distill, self._step_alphas(out, distill)):
            out[self._key("distill", tname, self.loss_name)] = alpha * distill[tname]
        if not self._balance_checked:
            self._balance_checked = True
            self._check_balance(out)
        return out

    def _check_batch(self, images: Any, targets: Any, hr_images: Any, hr_targets: Any) -> None:
        """Every check of the batch that can run before a forward, so torch's errors never arrive mid-step."""
        if targets is None:
            raise InputError("expected targets in training mode, but got None")
        validate.check_images(images, len(targets), "images", self.torchvision)
        validate.check_targets(targets, "targets", self.torchvision)
        if (hr_images is None) != (hr_targets is None):
            raise InputError("expected hr_images and hr_targets together, but got only "
                             f"{'hr_images' if hr_targets is None else 'hr_targets'}")
        if hr_images is None:
            if not self.torchvision and self.hr_scale is None:
                raise InputError("expected hr_images and hr_targets, or BridgeDistiller(..., hr_scale=...) to build "
                                 "them, for a model that is not a torchvision detector; got neither")
            if not self.torchvision:
                validate.check_float_images(images, "images")
            return
        validate.check_images(hr_images, len(targets), "hr_images", self.torchvision)
        validate.check_targets(hr_targets, "hr_targets", self.torchvision)
        validate.check_hr_not_smaller(images, hr_images)
        if self.hr_scale is not None and not self._reported_hr_scale:
            self._reported_hr_scale = True
            warnings.warn(f"LRDet: hr_images were given, so hr_scale={self.hr_scale:g} is not used for this batch "
                          f"(the explicit HR view wins whenever it is passed)", stacklevel=3)

    def _check_terms_finite(self, out: Mapping[str, Tensor], skip: Any) -> None:
        """``check_finite`` for the detection terms (the distillation terms are checked per level in _distill)."""
        keys = [k for k, v in out.items() if k not in skip and isinstance(v, Tensor)]
        if self.check_finite == "off" or not keys:
            return
        finite = torch.stack([torch.isfinite(out[k].detach()).all() for k in keys])
        if bool(finite.all()):  # one device sync for all terms
            return
        bad = [f"{k!r} = {out[k].detach().float().mean().item()}" for k, ok in zip(keys, finite.tolist()) if not ok]
        msg = (f"expected every loss term to be finite, but {', '.join(bad)}; the LR and bridge terms are the "
               f"student's own detection losses on this batch (check its learning rate and the batch's boxes)")
        if self.check_finite == "raise":
            raise NonFiniteError(msg)
        warnings.warn("LRDet: " + msg, stacklevel=3)

    def _step_alphas(self, out: Mapping[str, Tensor], distill: Mapping[str, Tensor]) -> List[float]:
        """The weight of each teacher's term at this step; with ``alpha="auto"``, measured once."""
        if self.alpha != "auto":
            return [float(self.alpha)] * len(distill)
        alphas = self._auto_alpha_list()
        if any(math.isnan(a) for a in alphas) and not self._materializing:
            # Not under materialize(): it may run on any batch (even a dummy one) and must change nothing but
            # the new parameters; alpha is measured on the first real training step.
            det = sum((v.detach() for k, v in out.items() if k.startswith("lr/")), torch.zeros(()))
            new, terms = auto_alphas(det, list(distill.values()), self.alpha_ratio)
            for i, a in enumerate(new):
                if math.isnan(alphas[i]) and a is not None:
                    self.auto_alpha[i] = a
            alphas = self._auto_alpha_list()
            self._report_auto_alpha(list(distill), alphas, terms)
        return [0.0 if math.isnan(a) else a for a in alphas]

    def _report_auto_alpha(self, tnames: List[str], alphas: List[float], terms: List[float]) -> None:
        keys = [self._key("distill", t, self.loss_name) for t in tnames]
        world = torch.distributed.get_world_size() if (
            torch.distributed.is_available() and torch.distributed.is_initialized()) else 1
        over = f", averaged over {world} ranks" if world > 1 else ""
        done = [f"alpha={a:.6g} for {k} (L_FD = {t:.6g})" for k, a, t in zip(keys, alphas, terms[1:])
                if not math.isnan(a)]
        todo = [f"{k} (L_FD = {t:.6g})" for k, a, t in zip(keys, alphas, terms[1:]) if math.isnan(a)]
        msg = (f"LRDet: alpha='auto' at the first step (L_det(LR) = {terms[0]:.6g}{over}, alpha_ratio = "
               f"{self.alpha_ratio:g}): {'; '.join(done) or 'nothing set'}")
        if todo:
            msg += (f". Not set, the terms are not finite and positive: {', '.join(todo)}; these are weighted by 0 "
                    f"at this step and measured again at the next")
        warnings.warn(msg, stacklevel=4)

    @torch.no_grad()
    def _check_balance(self, out: Mapping[str, Tensor]) -> None:
        """Warn once, at the first step, when ``alpha * L_FD`` dwarfs or vanishes against ``L_det(LR)``.

        Summed MSE grows with the number of feature elements and their scale, so the paper's
        ``alpha = 0.005`` (ResNet-50 FPN on COCO) can be 10^4 times too large for another model.
        """
        det = sum(v.detach().item() for k, v in out.items() if k.startswith("lr/"))
        for k, v in out.items():
            if not k.startswith("distill") or det <= 0:
                continue
            v = v.detach().item()
            ratio = v / det
            if ratio > BALANCE_WARN or 0 < ratio < 1 / BALANCE_WARN:
                warnings.warn(f"LRDet: at the first step {k} = {v:.4g} is {ratio:.3g} times the LR detection "
                              f"loss ({det:.4g}) with alpha={self.alpha:g}. alpha={self.alpha / ratio:.3g} would make "
                              f"them equal; a distillation term within ~0.1-10x of the detection loss is the usual "
                              f"regime. Set alpha explicitly to silence this, or alpha='auto' to measure it at the "
                              f"first step.", stacklevel=3)

    # ---------------------------------------------------------------------------------------------
    def _student_pass(self, images: Any, targets: List[Dict[str, Tensor]]) -> Dict[str, Any]:
        sp, rec = self.split_points, {}
        where = f"student's backbone split point {sp.backbone!r}"

        def on_backbone(mod, inputs, output):
            rec["canvas"] = _canvas_of(inputs[0] if inputs else None, where)
            feats = _Feats(output, where)
            rec["backbone"] = feats
            # The model gets a copy: an in-place op after the split point (ReLU(inplace=True)) must not
            # change the tensors the bridge reads later.
            return feats.rebuild([t.clone() for t in feats.tensors])

        def on_transform(mod, inputs, output):
            rec["image_list"], rec["targets"] = output

        with ExitStack() as stack:
            stack.enter_context(_hook(get_module(self.student, sp.backbone), on_backbone))
            stack.enter_context(_hook(get_module(self.student, sp.neck), _neck_recorder(
                rec, f"student's neck split point {sp.neck!r}", keep=not self.bridge)))
            if self.torchvision:
                stack.enter_context(_hook(self.student.transform, on_transform))
            losses = self.student(images, targets)
        if "backbone" not in rec:
            raise SplitPointError(f"the {where} was never reached in the student's forward")
        if not self.bridge and "neck" not in rec:
            raise SplitPointError(f"the student's neck split point {sp.neck!r} was never reached")
        if not isinstance(losses, Mapping):
            raise InputError(f"expected the student to return a dict of losses in training mode, "
                             f"but it returned {type(losses).__name__}")
        rec["sizes"] = self._content_sizes(rec, rec["backbone"].tensors[0].shape[0])
        rec["losses"] = losses
        return rec

    def _teacher_pass(self, tname: str, teacher: nn.Module, images: Any, targets: List[Dict[str, Tensor]],
                      hr_images: Any, hr_targets: Any, lr: Dict[str, Any]) -> Dict[str, Any]:
        sp, rec = self.teacher_split_points[tname], {}
        who = _who(tname)
        where = f"{who}'s backbone split point {sp.backbone!r}"

        def on_backbone(mod, inputs, output):
            rec["canvas"] = _canvas_of(inputs[0] if inputs else None, where)
            feats = _Feats(output, where)
            # Per level, not per stride: MobileNetV3 backbones return two levels at stride 32. Sizes only:
            # holding the teacher's HR backbone maps through the bridge pass would cost memory.
            rec["backbone_levels"] = [_LevelSize(k, self._stride(f"{who} backbone", k, rec["canvas"], t),
                                                 tuple(t.shape[-2:])) for k, t in zip(feats.keys, feats.tensors)]

        def on_neck(mod, inputs, output):
            rec["neck"] = _Feats(output, f"{who}'s neck split point {sp.neck!r}")
            raise _StopForward

        def on_transform(mod, inputs, output):
            rec["image_list"], rec["targets"] = output

        if self.torchvision:
            if hr_images is not None:
                call_args = (list(hr_images), hr_targets)
            elif self.hr_source == "teacher":
                call_args = (images, targets)
            else:  # the paper's HR view: the LR images (as the student saw them) upsampled by the teacher
                lr_raw = [F.interpolate(img[None], size=s, mode="bilinear", align_corners=False)[0]
                          for img, s in zip(images, lr["sizes"])]
                call_args = (lr_raw, _copy_targets(lr["targets"]))
        else:
            if hr_images is None:
                hr_images, hr_targets = self._scaled_view(images, targets)
            rec["image_list"], rec["targets"] = None, hr_targets
            call_args = (hr_images,)

        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            dtype = validate.dtype_of(teacher)
            if dtype is not None and dtype != torch.float32:
                # A teacher the user cast to bf16/fp16/fp64 runs in that dtype: under an autocast of another
                # dtype its BatchNorms would get inputs of the autocast dtype and parameters of their own.
                stack.enter_context(torch.autocast(next(teacher.parameters()).device.type, enabled=False))
            stack.enter_context(_hook(get_module(teacher, sp.backbone), _input_cast_to(teacher), pre=True))
            stack.enter_context(_hook(get_module(teacher, sp.backbone), on_backbone))
            stack.enter_context(_hook(get_module(teacher, sp.neck), on_neck))
            if self.torchvision:
                stack.enter_context(_hook(teacher.transform, on_transform))
            try:
                teacher(*call_args)
            except _StopForward:
                pass
        if "neck" not in rec:
            raise SplitPointError(f"the {who}'s neck split point {sp.neck!r} was never reached in its forward")
        n_lr, n_hr = lr["backbone"].tensors[0].shape[0], rec["neck"].tensors[0].shape[0]
        if n_lr != n_hr:
            raise InputError(f"expected the HR view to hold the same {n_lr} images as the LR batch, "
                             f"but the {who} saw {n_hr}")
        rec["sizes"] = self._content_sizes(rec, n_hr)
        rec["hr_inputs"], rec["who"], rec["tname"] = call_args, who, tname
        return rec

    def _content_sizes(self, rec: Dict[str, Any], n: int) -> List[Tuple[int, int]]:
        """Each image's content size before padding: torchvision's transform says; a custom model's
        images fill the whole canvas its backbone received."""
        if self.torchvision:
            return [tuple(int(v) for v in s) for s in rec["image_list"].image_sizes]
        return [rec["canvas"]] * n

    def _scaled_view(self, images: Any, targets: List[Dict[str, Tensor]]) -> Tuple[Any, List[Dict[str, Tensor]]]:
        """The documented default HR view of a custom model: resize by ``hr_scale``, scale ``boxes``."""
        if self.hr_scale is None:
            raise InputError("expected hr_images and hr_targets, or BridgeDistiller(..., hr_scale=...) to build "
                             "them, for a model that is not a torchvision detector; got neither")
        s = self.hr_scale

        def up(x: Tensor) -> Tensor:
            x4 = x if x.dim() == 4 else x[None]
            y = F.interpolate(x4, scale_factor=s, mode="bilinear", align_corners=False)
            return y if x.dim() == 4 else y[0]

        if isinstance(images, Tensor):
            hr_images = up(images)
        elif isinstance(images, (list, tuple)):
            hr_images = [up(x) for x in images]
        else:
            raise InputError(f"expected images as a tensor or a list of tensors to build the HR view, "
                             f"but got {type(images).__name__}")
        hr_targets = []
        for t in targets:
            t = dict(t)
            if "boxes" in t:
                t["boxes"] = t["boxes"] * s
            hr_targets.append(t)
        return hr_images, hr_targets

    # ---------------------------------------------------------------------------------------------
    def _bridge_pass(self, images: Any, targets: Any, lr: Dict[str, Any],
                     hr: Dict[str, Any]) -> Tuple[Mapping[str, Tensor], "_Feats"]:
        sp, rec = self.split_points, {}
        feats: _Feats = lr["backbone"]
        lr_canvas = lr["canvas"]
        sizes = self._replay_sizes(feats, lr_canvas, hr.get("backbone_levels", []))

        def replay(x: Any, *args: Any, **kwargs: Any) -> Any:
            hr_canvas = _canvas_of(x, "bridge's backbone stand-in")
            out = []
            for t, size in zip(feats.tensors, sizes):
                if size is None:  # the teacher has no backbone level at this stride
                    s_lr = lr_canvas[0] / t.shape[-2], lr_canvas[1] / t.shape[-1]
                    size = (math.ceil(hr_canvas[0] / s_lr[0] - 1e-6), math.ceil(hr_canvas[1] / s_lr[1] - 1e-6))
                r = resample_to_hr(t, lr_canvas, hr_canvas, size, lr["sizes"], hr["sizes"])
                # Same geometry returns the recorded tensor itself: an in-place op in the neck would then
                # rewrite it (and a tensor autograd saved in the LR pass). Hand out a copy, as that pass does.
                out.append(r.clone() if r is t else r)
            return feats.rebuild(out)

        backbone = get_module(self.student, sp.backbone)
        with ExitStack() as stack:
            stack.enter_context(swapped(self.student, sp.backbone, _StandIn(backbone, replay)))
            stack.enter_context(_hook(get_module(self.student, sp.neck), _neck_recorder(
                rec, f"student's neck split point {sp.neck!r}")))
            stack.enter_context(_bn_stats_frozen(self.student))
            if self.torchvision:
                image_list, hr_targets = hr["image_list"], hr["targets"]
                transform = self.student.transform
                stack.enter_context(swapped(self.student, "transform", _StandIn(
                    transform, lambda *a, **k: (image_list, _copy_targets(hr_targets)))))
                if self.bridge_rois is not None and hasattr(self.student, "roi_heads"):
                    sampler = self.student.roi_heads.fg_bg_sampler
                    stack.enter_context(_attr_set(sampler, "batch_size_per_image", int(self.bridge_rois)))
                losses = self.student(images, targets)
            else:
                losses = self.student(hr["hr_inputs"][0], _copy_targets(hr["targets"]))
        if "neck" not in rec:
            raise SplitPointError(f"the student's neck split point {sp.neck!r} was never reached in the bridge pass")
        return losses, rec["neck"]

    def _replay_sizes(self, feats: "_Feats", lr_canvas: Tuple[int, int],
                      teacher_levels: Sequence["_LevelSize"]) -> List[Optional[Tuple[int, int]]]:
        """The HR size of each student backbone level: the teacher's backbone level at its stride.

        Chosen per level, not per stride: where several levels share a stride (MobileNetV3), the teacher's
        level of the same name, else the one in the same place among that stride's levels.
        """
        at: Dict[int, List[_LevelSize]] = {}
        for lv in teacher_levels:
            at.setdefault(lv.stride, []).append(lv)
        seen: Dict[int, int] = {}
        sizes: List[Optional[Tuple[int, int]]] = []
        for k, t in zip(feats.keys, feats.tensors):
            s = self._stride("student backbone", k, lr_canvas, t)
            i = seen[s] = seen.get(s, -1) + 1
            cands = at.get(s, [])
            same = [lv for lv in cands if lv.key == k]
            pick = same[0] if same else (cands[min(i, len(cands) - 1)] if cands else None)
            sizes.append(None if pick is None else pick.size)
        return sizes

    def _upsampled_lr_neck(self, lr: Dict[str, Any], hr: Dict[str, Any]) -> "_Feats":
        """Table 1's conventional alignment: the LR neck maps resampled onto the teacher's grid."""
        neck: _Feats = lr["neck"]
        t_levels = {lv.key: lv for lv in self._levels(hr["who"], hr["neck"], hr["canvas"])}
        t_at = {lv.stride: lv for lv in reversed(list(t_levels.values()))}  # the first level at each stride
        level_map = self._level_map.get(hr["tname"], {})
        out = []
        for lv in self._levels("student", neck, lr["canvas"]):
            target = t_levels.get(level_map[lv.key]) if lv.key in level_map else t_at.get(lv.stride)
            size = tuple(target.tensor.shape[-2:]) if target is not None else tuple(lv.tensor.shape[-2:])
            out.append(resample_to_hr(lv.tensor, lr["canvas"], hr["canvas"], size, lr["sizes"], hr["sizes"]))
        up = copy.copy(neck)
        up.tensors = out
        return up

    # ---------------------------------------------------------------------------------------------
    def _stride(self, side: str, key: str, canvas: Tuple[int, int], t: Tensor) -> int:
        return self._level_strides.get(side, {}).get(key) or level_stride(canvas, t.shape[-2:])

    def _levels(self, side: str, feats: "_Feats", canvas: Tuple[int, int]) -> List[Level]:
        return [Level(k, self._stride(side, k, canvas, t), t) for k, t in zip(feats.keys, feats.tensors)]

    def _match(self, tname: str, s_feats: "_Feats", t_feats: "_Feats", canvas: Tuple[int, int],
               s_canvas: Optional[Tuple[int, int]] = None) -> List[LevelPair]:
        """Pair student and teacher levels: by stride, by name or order where strides collide, or by level_map."""
        who = _who(tname)
        s_levels, t_levels = self._levels("student", s_feats, s_canvas or canvas), self._levels(who, t_feats, canvas)
        if not self._constructed:  # the probe: remember each level's stride, read off a roomy canvas
            self._level_strides["student"] = {lv.key: lv.stride for lv in s_levels}
            self._level_strides[who] = {lv.key: lv.stride for lv in t_levels}
        level_map = self._level_map.get(tname)
        pairs = pair_levels(s_levels, t_levels, who, level_map)
        skipped = [] if level_map else unpaired_strides(s_levels, t_levels)
        if skipped and tname not in self._reported:
            self._reported.add(tname)
            warnings.warn(f"LRDet: levels with stride {skipped} have no partner between the student and the {who} "
                          f"and are not distilled (student strides {sorted({lv.stride for lv in s_levels})}, "
                          f"teacher strides {sorted({lv.stride for lv in t_levels})})", stacklevel=3)
        return pairs

    def _build(self, tname: str, pairs: Sequence[LevelPair]) -> None:
        """Create projectors and loss parameters once the channel counts are known."""
        created = False
        for p in pairs:
            key = f"{tname}_{p.name}"
            if p.student.shape[1] != p.teacher.shape[1] and key not in self.projectors:
                # The dtype of the student's weights, not of the features: under autocast these are bf16/fp16,
                # and the optimizer must hold fp32 master weights.
                w = next(self.student.parameters(), p.student)
                self.projectors[key] = nn.Conv2d(p.student.shape[1], p.teacher.shape[1], 1).to(
                    device=p.student.device, dtype=w.dtype if w.is_floating_point() else torch.float32)
                created = True
        loss = self.losses[tname] if tname in self.losses else None
        if loss is not None and hasattr(loss, "materialize"):
            n_before = sum(1 for _ in loss.parameters())
            loss.materialize([p.teacher.shape[1] for p in pairs])
            loss.to(device=pairs[0].teacher.device)
            created = created or sum(1 for _ in loss.parameters()) != n_before
        if created and self._constructed and not self._materializing:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # DistributedDataParallel would never average these gradients: the ranks drift apart silently.
                raise InputError("distillation parameters (projectors or loss parameters) were created at the first "
                                 "training step, after a process group was initialised; call "
                                 "distiller.materialize(images, targets) before building the optimizer and wrapping "
                                 "the distiller in DistributedDataParallel")
            warnings.warn("LRDet: distillation parameters (projectors or loss parameters) were created at the first "
                          "training step. Call distiller.materialize(images, targets) before building the "
                          "optimizer, or add them with optimizer.add_param_group({'params': "
                          "distiller.projectors.parameters()}) and the loss's parameters", stacklevel=3)

    @torch.no_grad()
    def _probe_levels(self) -> None:
        """torchvision only: learn level strides and channels from a tiny input, so that projectors and
        loss parameters exist before the user builds the optimizer."""
        x = torch.zeros(1, 3, 256, 256, device=next(self.student.parameters()).device)

        def neck_of(model: nn.Module, side: str, sp: SplitPoints) -> _Feats:
            was = model.training

            def on_backbone(mod: nn.Module, inputs: Any, output: Any) -> None:
                feats = _Feats(output, f"{side}'s backbone probe")
                self._level_strides[f"{side} backbone"] = {
                    k: level_stride((256, 256), t.shape[-2:]) for k, t in zip(feats.keys, feats.tensors)}

            model.eval()
            try:
                with _hook(get_module(model, sp.backbone), on_backbone):
                    return _Feats(model.backbone(x.to(device=next(model.parameters()).device,
                                                       dtype=validate.dtype_of(model) or x.dtype)),
                                  "backbone probe")
            finally:
                model.train(was)

        s_feats = neck_of(self.student, "student", self.split_points)
        for tname, t in self._teachers.items():
            pairs = self._match(tname, s_feats, neck_of(t, _who(tname), self.teacher_split_points[tname]), (256, 256))
            self._build(tname, [p._replace(teacher=p.teacher.to(p.student.device)) for p in pairs])

    # ---------------------------------------------------------------------------------------------
    def _distill(self, tname: str, s_feats: "_Feats", hr: Dict[str, Any]) -> Tensor:
        pairs = self._match(tname, s_feats, hr["neck"], hr["canvas"])
        self._build(tname, pairs)
        student, teacher = [], []
        for p in pairs:
            proj = self.projectors[f"{tname}_{p.name}"] if p.student.shape[1] != p.teacher.shape[1] else None
            student.append(proj(p.student) if proj is not None else p.student)
            teacher.append(p.teacher)
        boxes = [t["boxes"].detach() if "boxes" in t else torch.zeros(0, 4)
                 for t in (hr["targets"] or [{} for _ in teacher[0]])]
        ctx = DistillContext(boxes=boxes, image_sizes=list(hr["sizes"]), canvas_size=tuple(hr["canvas"]),
                             strides=[p.stride for p in pairs], level_names=[p.teacher_key for p in pairs])
        loss = self.losses[tname] if tname in self.losses else self._callable_losses[tname]
        value = loss(student, teacher, ctx)
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise InputError(f"expected the distillation loss to return a scalar tensor, but it returned "
                             f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
        if self.check_finite != "off" and not bool(torch.isfinite(value)):
            bad = []
            for i in range(len(student)):
                sub = DistillContext(boxes=ctx.boxes, image_sizes=ctx.image_sizes, canvas_size=ctx.canvas_size,
                                     strides=[ctx.strides[i]], level_names=[ctx.level_names[i]])
                with torch.no_grad():
                    if not bool(torch.isfinite(loss([student[i]], [teacher[i]], sub))):
                        bad.append(f"{ctx.level_names[i]} (stride {ctx.strides[i]})")
            msg = (f"the distillation term {self._key('distill', tname, self.loss_name)!r} is {value.item()}; "
                   f"non-finite at level(s) {', '.join(bad) or 'unknown (only in the sum)'}")
            if self.check_finite == "raise":
                raise NonFiniteError(msg)
            warnings.warn("LRDet: " + msg, stacklevel=3)
        return value

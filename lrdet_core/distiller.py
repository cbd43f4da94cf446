"""The BridgeDistiller: LRDet's training step around an unchanged detector (Section 3, Algorithm 1).

One training call runs

1. the LR student as usual (its detection loss ``L_det(LR)``), recording its backbone outputs;
2. the frozen HR teacher, only as far as its neck;
3. the *bridge*: the recorded backbone outputs resampled to the HR feature sizes and pushed through the
   student's own neck and head (the same modules, the same weights) against HR targets (``L_det(HR)``);
4. a feature-distillation loss between the bridge's and the teacher's neck outputs, matched by stride.

It returns one flat dict whose sum is ``L_det(LR) + L_det(HR bridge) + alpha * L_FD`` (eq. 1-2).
The passes themselves belong to the detector family's adapter (:mod:`lrdet_core.adapters`); this module
only orchestrates them. Nothing in the user's model is rewritten.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import validate
from .adapters import Adapter, PassRecord, SplitPoints, adapter_for, check_one_family, family_of, torchvision_family
from .adapters.base import Replay
from .align import bridge_sizes, resample_levels, upsample_to_teacher
from .balance import auto_alpha_from_state_dict, check_balance, step_alphas
from .context import DistillContext
from .copies import check_has_teachers, without_teachers
from .crop import BridgeCrop, check_crop
from .crop import geometry as crop_geometry
from .errors import InputError
from .inherit import InheritReport, inherit_weights
from .levels import LevelMap, LevelPair, normalize_level_map, pair_levels, warn_unpaired
from .loading import watch_load_creation
from .losses import RECOMMENDED_ALPHA
from .losses import loss_name as canonical_loss_name
from .projectors import Projectors, check_late_creation
from .ranks import check_teachers_across_ranks
from .recording import Feats
from .schedule import DistillSchedule, skipped_step
from .resolution import StepResolutionCheck
from .teacher_losses import LossSpec, build_teacher_losses, loss_key
from .validate import who as _who

def _key(kind: str, tname: str, name: str) -> str:
    """A loss key: ``kind/name``, with the teacher's name where there are several (``bridge.t1/cls``)."""
    return f"{kind}/{name}" if tname == validate.SINGLE else f"{kind}.{tname}/{name}"


class BridgeDistiller(nn.Module):
    """Train an LR student with an HR teacher through LRDet's bridge branch.

    Args:
        student: the detector to train. In training it takes ``(images, targets)`` and returns a dict
            of losses; in eval it takes ``images`` and returns predictions.
        teacher: the frozen HR detector, a list of them (one bridge each, Table 5), or a dict
            ``{name: teacher}`` whose names prefix the loss keys. It is never trained, always in eval
            mode, runs under ``no_grad`` only as far as its neck, and is not part of ``state_dict()``
            nor of copies (``copy.deepcopy``, pickle: :mod:`lrdet_core.copies`).
        split_points: where to cut the student; found automatically for torchvision RetinaNet, FCOS and
            (Faster/Mask/Keypoint) R-CNN, and Ultralytics YOLO detection models (which take none).
        teacher_split_points: where to cut the teacher(s), when it differs from the student.
        loss: ``"mse"`` (paper default) | ``"l1"`` | ``"cwd"`` | ``"fgd"`` | an ``nn.Module`` | any callable
            ``(student_feats, teacher_feats, ctx) -> Tensor``. Each teacher gets its own instance.
        loss_kwargs: constructor arguments of a named loss, e.g. ``{"reduction": "mean"}``. For ``"fgd"``
            the preset defaults to the student's torchvision family (retinanet, fcos or rcnn).
        alpha: weight of the distillation term. ``"auto"`` (default): measured at the first training step so
            that ``alpha * L_FD = alpha_ratio * L_det(LR)``, one alpha per teacher, the same on every DDP rank
            (the terms are averaged over ranks), kept in ``state_dict()`` (buffer ``auto_alpha``) so that a
            resumed run does not re-measure; ``materialize()`` does not measure it. See :attr:`alphas`.
            A finite number >= 0 is used as given. ``None`` takes the recommended value of a named loss
            (:data:`~lrdet_core.RECOMMENDED_ALPHA`: 0.005 for MSE with sum reduction, the paper's) and 1.0
            for a custom callable; then the first step warns if ``alpha * L_FD`` is over 100x (or under
            1/100) the LR detection loss and suggests the alpha that balances them: summed losses scale
            with the model's feature size and magnitude, so one fixed value can be 10^4 times off.
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
        distill_every: run the teacher and the bridge on every k-th training call only (1, the default: every
            call); the others are plain LR steps with the same loss keys (zeros). The counter is the buffer
            ``schedule.step`` in ``state_dict()``; ``materialize()`` does not advance it. See
            :mod:`lrdet_core.schedule` and ``docs/cost.md``.
        bridge_crop: the area fraction of the HR canvas the teacher and the bridge run on, a random window per
            step aligned to the coarsest stride (1.0, the default: all of it); the distillation loss is
            computed on its interior. Custom and torchvision models. See :mod:`lrdet_core.crop`.
        crop_margin: the margin between the window and its interior, in cells of the coarsest level (default 1).

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
                 loss: LossSpec = "mse", alpha: Union[float, str, None] = "auto", inherit: bool = False,
                 bridge: bool = True,
                 hr_source: str = "teacher", hr_scale: Optional[float] = None, bridge_rois: Optional[int] = None,
                 check_finite: str = "raise", loss_kwargs: Optional[Mapping[str, Any]] = None,
                 alpha_ratio: Optional[float] = None, level_map: Optional[LevelMap] = None,
                 hr_det_weight: float = 1.0, distill_every: int = 1, bridge_crop: float = 1.0, crop_margin: int = 1):
        super().__init__()
        teachers = validate.as_teacher_dict(teacher)
        validate.check_options(student, teachers, hr_source=hr_source, check_finite=check_finite, alpha=alpha,
                               alpha_ratio=alpha_ratio, bridge_rois=bridge_rois, hr_det_weight=hr_det_weight,
                               family=torchvision_family(student))
        self.student = student
        if isinstance(loss, str):
            loss = canonical_loss_name(loss)  # once: alpha, the FGD preset and the loss key all use this name
        self._level_map = normalize_level_map(level_map, list(teachers), {n: _who(n) for n in teachers})

        # One adapter per model; a custom teacher is cut where the student is, unless it has split points.
        self.adapter: Adapter = adapter_for(student, split_points, "student")
        self.teacher_adapters: Dict[str, Adapter] = {
            n: adapter_for(t, teacher_split_points or (split_points if family_of(t) == "custom" else None), _who(n))
            for n, t in teachers.items()}
        check_one_family(student, teachers)
        validate.check_hr_scale(hr_scale, self.adapter.builds_hr_view)
        self.bridge, self.hr_source, self.hr_scale = bridge, hr_source, hr_scale
        self.hr_det_weight, self.bridge_rois, self.check_finite = float(hr_det_weight), bridge_rois, check_finite
        self.schedule = DistillSchedule(distill_every)  # cost options: docs/cost.md
        self.crop = BridgeCrop(*check_crop(bridge_crop, crop_margin, bridge, family_of(student)))
        if self.adapter.builds_hr_view and hr_source == "teacher":
            validate.warn_if_not_lower_resolution(student, teachers, {n: _who(n) for n in teachers})

        # The teachers are kept out of the module tree: no gradients, not in state_dict(), not in
        # parameters(), and distiller.train() cannot reach them.
        for t in teachers.values():
            t.requires_grad_(False)
            t.eval()
        object.__setattr__(self, "_teachers", teachers)

        self.loss_name = loss_key(loss)
        self._dkeys = {n: _key("distill", n, self.loss_name) for n in teachers}  # the distill/<loss> keys
        self._balance_checked = alpha is not None  # a chosen alpha (a number or "auto") is not second-guessed
        if alpha is None:
            alpha = RECOMMENDED_ALPHA.get(loss, 1.0) if isinstance(loss, str) else 1.0
        self.alpha: Union[float, str] = alpha if alpha == "auto" else float(alpha)
        self.alpha_ratio = 0.5 if alpha_ratio is None else float(alpha_ratio)
        if alpha == "auto":
            # NaN until measured; a buffer, so that a resumed run restores it instead of measuring again.
            self.register_buffer("auto_alpha", torch.full((len(teachers),), math.nan, dtype=torch.float64))
        watch_load_creation(self)  # first: it must see the parameters before the hooks below create any
        self._register_load_state_dict_pre_hook(self._auto_alpha_from_state_dict)
        self.losses = build_teacher_losses(loss, dict(loss_kwargs or {}), list(teachers), torchvision_family(student))
        self.projectors = Projectors()  # 1x1 convs for levels whose channel counts differ
        self._register_load_state_dict_pre_hook(self._projectors_from_state_dict)
        self._reported, self._reported_hr_scale = set(), False  # warned about: unpaired levels, hr_scale unused
        self._teachers_compared = False  # across the ranks of a process group, once
        self._check_resolution = StepResolutionCheck()  # an LR view at or above HR (e.g. _skip_resize), once

        first = next(iter(teachers.values()))
        self.inherit_report: Optional[InheritReport] = inherit_weights(student, first) if inherit else None
        self._build_from_probe()

    @property
    def teachers(self) -> Dict[str, nn.Module]:
        """The frozen teacher(s) by name (``"teacher"`` for a single one)."""
        return self._teachers

    @property
    def teacher(self) -> nn.Module:
        """The first (usually the only) teacher."""
        check_has_teachers(self._teachers, "distiller.teacher")
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
        for t in self._teachers.values() if recurse else ():  # .to()/.cuda()/.float() move the teacher along
            t._apply(fn)  # without recurse: Ultralytics' BaseModel._apply takes none
            t.requires_grad_(False)
        return self

    def __getstate__(self) -> Dict[str, Any]:
        """Copies and pickles leave the frozen teacher out (:mod:`lrdet_core.copies` says why)."""
        return without_teachers(super().__getstate__())

    @property
    def alphas(self) -> Dict[str, Optional[float]]:
        """The weight of each teacher's distillation term by teacher name; with ``alpha="auto"``, ``None``
        until the first training step has measured it."""
        if self.alpha != "auto":
            return {n: float(self.alpha) for n in self._teachers}
        return {n: (None if math.isnan(a) else a) for n, a in zip(self._teachers, self.auto_alpha.tolist())}

    def _auto_alpha_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        auto_alpha_from_state_dict(state_dict, f"{prefix}auto_alpha", self.alpha, self._buffers.get("auto_alpha"))

    def _projectors_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        self.projectors.from_state_dict(state_dict, f"{prefix}projectors.", next(self.student.parameters(), None))

    @torch.no_grad()
    def materialize(self, images: Any, targets: List[Dict[str, Tensor]], *, hr_images: Any = None,
                    hr_targets: Optional[List[Dict[str, Tensor]]] = None) -> "BridgeDistiller":
        """Create the projectors and loss parameters now, from one batch, and change nothing else.

        Families with a probe (torchvision) get them at construction; a custom model's channel counts are
        known only once it has run. Call this before building the optimizer and before wrapping the
        distiller in ``DistributedDataParallel``, which synchronises only the parameters that exist when it
        is built. It runs one training step under ``no_grad`` (``alpha="auto"`` is not measured) and puts back
        the student's buffers (BatchNorm statistics) and the CPU random state.
        """
        buffers = [(b, b.clone()) for b in self.student.buffers()]
        was = self.training
        try:
            with torch.random.fork_rng(devices=[]):
                self.train()._step(images, targets, hr_images, hr_targets, training_step=False)
        finally:
            self.train(was)
            for b, old in buffers:
                b.copy_(old)
        return self

    def student_state_dict(self) -> Dict[str, Tensor]:
        """The plain student's ``state_dict``, loadable into a fresh model of the student's class."""
        return self.student.state_dict()

    def forward(self, images: Any, targets: Optional[List[Dict[str, Tensor]]] = None, *,
                hr_images: Any = None, hr_targets: Optional[List[Dict[str, Tensor]]] = None) -> Any:
        """Training: the dict of LRDet losses. Eval: the student's own predictions on ``images``.

        Args:
            images: what the student takes (for torchvision, a list of ``C x H x W`` tensors; for YOLO, also
                a YOLO batch dict, with ``targets=None``).
            targets: what the student takes (for torchvision, a list of dicts with ``boxes``, ``labels``,
                and ``masks``/``keypoints`` where the model needs them).
            hr_images, hr_targets: an explicit HR view of the same batch. Optional for torchvision
                (default: ``hr_source``) and for custom models with ``hr_scale``.
        """
        if not self.training:
            given = any(x is not None for x in (targets, hr_images, hr_targets))
            if given and not getattr(self, "_warned_eval", False):  # once per distiller
                self._warned_eval = True
                validate.warn_targets_in_eval()
            return self.adapter.predict(images)
        if not self.schedule.tick():
            return self._lr_step(images, targets, hr_images, hr_targets)
        return self._step(images, targets, hr_images, hr_targets, training_step=True)

    def _step(self, images: Any, targets: Any, hr_images: Any, hr_targets: Any, training_step: bool
              ) -> Dict[str, Tensor]:
        """One LRDet step. ``training_step=False`` (materialize): parameters created here are expected and
        ``alpha="auto"`` is not measured (it may run on any batch, even a dummy one)."""
        check_has_teachers(self._teachers, "a training step")
        images, targets = self.adapter.as_batch(images, targets, "images")
        if hr_images is not None:
            hr_images, hr_targets = self.adapter.as_batch(hr_images, hr_targets, "hr_images")
        self._check_batch(images, targets, hr_images, hr_targets)
        if training_step and not self._teachers_compared:
            self._teachers_compared = check_teachers_across_ranks(self._teachers)
        for t in self._teachers.values():
            t.eval()
        lr = self.adapter.student_pass(images, targets, keep_neck=not self.bridge or self.crop.active)
        out = {f"lr/{k}": v for k, v in lr.losses.items()}
        distill: Dict[str, Tensor] = {}  # unweighted L_FD per teacher; alpha is applied once all are known
        for tname, ad in self.teacher_adapters.items():
            hr = self.crop.teacher_pass(tname, ad, ad.hr_view(images, targets, hr_images, hr_targets, lr,
                                                              hr_source=self.hr_source, hr_scale=self.hr_scale),
                                        self.adapter, lr)
            if lr.backbone.batch != hr.neck.batch:
                raise InputError(f"expected the HR view to hold the same {lr.backbone.batch} images as the LR batch, "
                                 f"but the {ad.role} saw {hr.neck.batch}")
            full = hr.window.sizes if hr.window is not None else hr.sizes  # bridge_crop: the images, not the window
            self._check_resolution(ad.role, lr.sizes, full, self.student)
            if self.bridge:
                bridge_losses, s_feats = self.adapter.bridge_pass(images, targets, hr, self._replay(lr, hr),
                                                                  self.bridge_rois)
                w = self.hr_det_weight
                out.update({_key("bridge", tname, k): v if w == 1.0 else w * v for k, v in bridge_losses.items()})
            else:  # Table 1's conventional alignment: the LR neck resampled onto the teacher's grid
                s_levels = self.adapter.levels("neck", lr.neck, lr.canvas)
                t_levels = ad.levels("neck", hr.neck, hr.canvas)
                s_feats = lr.neck.replaced(upsample_to_teacher(s_levels, t_levels, self._level_map.get(tname, {}),
                                                               lr.canvas, hr.canvas, lr.sizes, hr.sizes))
            distill[tname] = out[self._dkeys[tname]] = self._distill(tname, s_feats, hr, late=training_step)
        validate.check_terms_finite(out, set(self._dkeys.values()), self.check_finite)
        alphas = [float(self.alpha)] * len(distill) if self.alpha != "auto" else step_alphas(
            self.auto_alpha, out, distill, self.alpha_ratio, list(self._dkeys.values()), measure=training_step)
        for tname, alpha in zip(distill, alphas):
            out[self._dkeys[tname]] = alpha * distill[tname]
        if not self._balance_checked:
            self._balance_checked = True
            check_balance(out, self.alpha)
        return out

    def _lr_step(self, images: Any, targets: Any, hr_images: Any, hr_targets: Any) -> Dict[str, Tensor]:
        """A step that does not distil (``distill_every``): the LR pass alone, with every key of a distilling step."""
        images, targets = self.adapter.as_batch(images, targets, "images")
        if hr_images is not None:
            hr_images, hr_targets = self.adapter.as_batch(hr_images, hr_targets, "hr_images")
        self._check_batch(images, targets, hr_images, hr_targets)
        lr = self.adapter.student_pass(images, targets, keep_neck=False)
        prefixes = [_key("bridge", n, "").rstrip("/") if self.bridge else None for n in self._teachers]
        out = skipped_step(lr.losses, list(zip(prefixes, self._dkeys.values())),
                           [*self.projectors.parameters(), *self.losses.parameters()])
        validate.check_terms_finite(out, set(self._dkeys.values()), self.check_finite)
        return out

    def _check_batch(self, images: Any, targets: Any, hr_images: Any, hr_targets: Any) -> None:
        validate.check_batch(self.adapter, images, targets, hr_images, hr_targets, self.hr_scale)
        if hr_images is not None and self.hr_scale is not None and not self._reported_hr_scale:
            self._reported_hr_scale = True
            validate.warn_hr_scale_unused(self.hr_scale)

    def _replay(self, lr: PassRecord, hr: PassRecord) -> Replay:
        """The bridge's backbone: the student's recorded levels at the sizes of the teacher's backbone levels."""
        levels = self.adapter.levels("backbone", lr.backbone, lr.canvas)
        sizes = bridge_sizes(levels, hr.backbone_levels)
        hr_sizes, origin = crop_geometry(hr)  # with bridge_crop: the full HR sizes and the window's origin
        return lambda hw: lr.backbone.replaced(resample_levels(levels, sizes, lr.canvas, hw, lr.sizes, hr_sizes,
                                                               origin))

    def _match(self, tname: str, s_feats: Feats, t_feats: Feats, canvas: Any) -> List[LevelPair]:
        """Pair student and teacher levels: by stride, by name or order where strides collide, or by level_map."""
        ad = self.teacher_adapters[tname]
        s_levels, t_levels = self.adapter.levels("neck", s_feats, canvas), ad.levels("neck", t_feats, canvas)
        level_map = self._level_map.get(tname)
        pairs = pair_levels(s_levels, t_levels, ad.role, level_map)
        if not level_map and tname not in self._reported and warn_unpaired(s_levels, t_levels, ad.role):
            self._reported.add(tname)  # once per teacher
        return pairs

    def _ensure(self, tname: str, pairs: Sequence[LevelPair], late: bool) -> None:
        """Create projectors and loss parameters once the channel counts are known."""
        created = self.projectors.ensure(tname, pairs, like=next(self.student.parameters(), None))
        loss = self.losses[tname]
        if hasattr(loss, "materialize"):
            n_before = sum(1 for _ in loss.parameters())
            loss.materialize([p.teacher.shape[1] for p in pairs])
            loss.to(device=pairs[0].teacher.device)
            created = created or sum(1 for _ in loss.parameters()) != n_before
        if late:
            check_late_creation(created)

    @torch.no_grad()
    def _build_from_probe(self) -> None:
        """Families with a probe (torchvision): projectors and loss parameters before the optimizer is built."""
        probe = self.adapter.probe()
        if probe is None:
            return
        for tname, ad in self.teacher_adapters.items():
            t_neck, canvas = ad.probe()
            pairs = self._match(tname, probe[0], t_neck, canvas)
            self._ensure(tname, [p._replace(teacher=p.teacher.to(p.student.device)) for p in pairs], late=False)

    def _distill(self, tname: str, s_feats: Feats, hr: PassRecord, late: bool) -> Tensor:
        s_feats, hr, scale = self.crop.interior(self.adapter, self.teacher_adapters[tname], s_feats, hr,
                                                self.losses[tname])
        pairs = self._match(tname, s_feats, hr.neck, hr.canvas)
        self._ensure(tname, pairs, late)
        student, teacher = self.projectors.project(tname, pairs), [p.teacher for p in pairs]
        boxes = [t["boxes"].detach() if "boxes" in t else torch.zeros(0, 4)
                 for t in (hr.targets or [{} for _ in teacher[0]])]
        ctx = DistillContext(boxes=boxes, image_sizes=list(hr.sizes), canvas_size=tuple(hr.canvas),
                             strides=[p.stride for p in pairs], level_names=[p.teacher_key for p in pairs])
        loss = self.losses[tname]
        value = loss(student, teacher, ctx)
        validate.check_distill_value(value, self._dkeys[tname], self.check_finite,
                                     lambda: validate.nonfinite_levels(loss, student, teacher, ctx))
        return value if scale == 1.0 else value * scale

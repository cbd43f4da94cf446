"""What the distiller asks of a detector family, and the typed records the passes return.

An :class:`Adapter` wraps one model (the student or one teacher) and knows how its family

* takes a batch in a format of its own (:meth:`Adapter.as_batch`; YOLO: a batch dict),
* checks a batch (:meth:`Adapter.check_images`, :meth:`Adapter.check_targets`),
* runs the student's training pass, recording the backbone and neck (:meth:`Adapter.student_pass`),
* builds the HR view of a batch for a teacher (:meth:`Adapter.hr_view`),
* runs a frozen teacher as far as its neck (:meth:`Adapter.teacher_pass`),
* runs the bridge: the student's own neck and head on resampled backbone features against HR targets
  (:meth:`Adapter.bridge_pass`),
* reports each level's stride (:meth:`Adapter.levels`), from a probe where the family allows one.

The distiller only orchestrates: it never looks inside a record's ``state``, which belongs to the family.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..context import level_stride
from ..levels import Level, LevelSize
from ..recording import Feats, hook
from ..validate import dtype_of

#: Targets as torchvision takes them: one dict per image, ``boxes`` (K x 4, xyxy pixels) and ``labels``.
Targets = List[Dict[str, Tensor]]
#: The student's recorded backbone levels resampled onto an HR canvas of the given (H, W).
Replay = Callable[[Tuple[int, int]], Feats]


@dataclass(frozen=True)
class SplitPoints:
    """Dotted module paths where LRDet cuts a detector.

    Attributes:
        backbone: the module whose output the bridge upsamples. It must take the image batch
            ``(N, C, H, W)`` as its first input and return a tensor, a list/tuple or a dict of tensors.
        neck: the module whose output is distilled (the FPN). The teacher stops right after it.

    Example:
        >>> SplitPoints(backbone="backbone.body", neck="backbone.fpn")
        SplitPoints(backbone='backbone.body', neck='backbone.fpn')
    """

    backbone: str
    neck: str


@dataclass
class PassRecord:
    """What one pass through a detector left behind.

    Attributes:
        canvas: (H, W) of the batch the backbone received (padded).
        sizes: each image's content size on that canvas, before padding.
        targets: the targets on that canvas (boxes in its pixels), as the detector's loss saw them.
        backbone: the student's backbone outputs, with their graph (the bridge resamples them).
        backbone_levels: a teacher's backbone levels, sizes only (the bridge's target sizes).
        neck: the neck outputs (the distilled features); ``None`` where not kept.
        losses: the detector's training losses (student pass), else ``None``.
        state: what the family's adapter needs again in the bridge (torchvision: the ImageList; a generic
            model: its HR inputs). Opaque to the distiller.
        window: where a teacher pass with ``bridge_crop`` ran (:class:`lrdet_core.crop.CropWindow`), else ``None``.
    """

    canvas: Tuple[int, int]
    sizes: List[Tuple[int, int]]
    targets: Optional[Targets]
    backbone: Optional[Feats] = None
    backbone_levels: List[LevelSize] = field(default_factory=list)
    neck: Optional[Feats] = None
    losses: Optional[Mapping[str, Tensor]] = None
    state: Any = None
    window: Any = None


@dataclass
class HRView:
    """The HR view of a batch as the teacher's adapter runs it.

    Attributes:
        inputs: the positional arguments of the teacher's call.
        targets: the HR targets, where known before the call (a torchvision teacher's transform makes them).
    """

    inputs: Tuple[Any, ...]
    targets: Optional[Targets] = None


class Adapter:
    """How LRDet runs one detector family; one instance per model (the student, each teacher).

    Subclasses set :attr:`family` and implement the passes. ``role`` names the model in messages
    (``"student"``, ``"teacher"``, ``"teacher 'hr'"``).
    """

    #: The family's name, for messages.
    family: ClassVar[str] = "detector"
    #: Whether the family builds the HR view itself (torchvision: the teacher's transform); then ``hr_scale``
    #: does not apply.
    builds_hr_view: ClassVar[bool] = False

    def __init__(self, model: nn.Module, role: str):
        self.model, self.role = model, role
        # Strides known without reading them off a canvas (a probe, or the family's own record); small
        # canvases are ambiguous: P6 and P7 of a 64 px image are both 1 cell.
        self.known_strides: Dict[str, Dict[str, int]] = {"backbone": {}, "neck": {}}

    # --- levels -----------------------------------------------------------------------------------------
    def levels(self, part: str, feats: Feats, canvas: Tuple[int, int]) -> List[Level]:
        """``feats`` (the ``"backbone"`` or ``"neck"`` outputs) as levels with their strides on ``canvas``."""
        known = self.known_strides[part]
        return [Level(k, known.get(k) or level_stride(canvas, t.shape[-2:]), t)
                for k, t in zip(feats.keys, feats.tensors)]

    def probe(self) -> Optional[Tuple[Feats, Tuple[int, int]]]:
        """The neck's output on a small dummy input and that input's (H, W), with :attr:`known_strides` filled
        in; ``None`` where the family cannot build an input itself. Lets projectors exist before the user
        builds the optimizer."""
        return None

    # --- checks -----------------------------------------------------------------------------------------
    def as_batch(self, images: Any, targets: Any, where: str) -> Tuple[Any, Any]:
        """``(images, targets)`` in the form the passes take, from a batch in a format of the family's own
        (YOLO: a batch dict in place of ``images``); unchanged by default."""
        return images, targets

    def check_images(self, images: Any, n: int, where: str) -> None:
        """Raise :class:`~lrdet_core.errors.InputError` for images this family cannot take (``n``: as many as
        the targets)."""

    def check_targets(self, targets: Any, where: str) -> None:
        """Raise :class:`~lrdet_core.errors.InputError` for targets this family cannot take."""

    # --- passes -----------------------------------------------------------------------------------------
    def student_pass(self, images: Any, targets: Targets, keep_neck: bool) -> PassRecord:
        """The student's training forward, with its backbone outputs recorded (and its neck's, if asked)."""
        raise NotImplementedError

    def hr_view(self, images: Any, targets: Targets, hr_images: Any, hr_targets: Optional[Targets],
                lr: PassRecord, *, hr_source: str, hr_scale: Optional[float]) -> HRView:
        """The HR view of the batch for this (teacher) model: the explicit one, or the family's default."""
        raise NotImplementedError

    def teacher_pass(self, view: HRView) -> PassRecord:
        """The frozen teacher on the HR view, under ``no_grad``, stopped right after its neck.

        Families that support ``bridge_crop`` take ``crop=``: a :class:`lrdet_core.crop.Cropper` applied to the HR
        canvas (the images as the backbone receives them) and its targets before the teacher runs."""
        raise NotImplementedError

    def bridge_pass(self, images: Any, targets: Targets, hr: PassRecord, replay: Replay,
                    rois: Optional[int] = None) -> Tuple[Mapping[str, Tensor], Feats]:
        """The student's neck and head on the resampled backbone levels (``replay(canvas)``) against the HR
        targets ``hr.targets``.

        Returns the detection losses and the neck's output. BatchNorm layers use batch statistics and keep
        their running ones (the LR student is evaluated with those).
        """
        raise NotImplementedError

    def predict(self, images: Any) -> Any:
        """Eval mode: the student's own predictions."""
        return self.model(images)


def frozen_run(model: nn.Module, first: nn.Module) -> ExitStack:
    """The context of a teacher's forward: ``no_grad``, and a teacher the user cast to bf16/fp16/fp64 runs in
    its own dtype: its first module (``first``) gets the image batch cast to it, autocast is off."""
    stack = ExitStack()
    stack.enter_context(torch.no_grad())
    dtype = dtype_of(model)
    if dtype is not None and dtype != torch.float32:
        # Under an autocast of another dtype its BatchNorms would get inputs of the autocast dtype and
        # parameters of their own.
        stack.enter_context(torch.autocast(next(model.parameters()).device.type, enabled=False))

    def cast(mod: nn.Module, inputs: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        x = inputs[0] if inputs else None
        if dtype is None or not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return None
        return (x.to(dtype),) + tuple(inputs[1:])
    stack.enter_context(hook(first, cast, pre=True))
    return stack


def copy_targets(targets: Optional[Sequence[Mapping[str, Tensor]]]) -> Optional[Targets]:
    """Shallow copies of the target dicts: a detector's loss may add keys to them."""
    return None if targets is None else [dict(t) for t in targets]

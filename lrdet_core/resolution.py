"""Is the student really at a lower resolution than its teacher? Checked at every step, image by image.

The check at construction (:func:`lrdet_core.validate.warn_if_not_lower_resolution`) reads the ``min_size``
and ``max_size`` of torchvision transforms; what the models see at a step can differ. torchvision's
reference training script builds the model with ``_skip_resize=True`` for ``--data-augmentation
multiscale`` and ``lsj``: the transform then keeps, in training, the size the data pipeline produced
(480-800 px, 1024 px), and an "LR" student trains at or above its teacher's resolution. The passes
record each image's content size on its canvas (:attr:`PassRecord.sizes`), so the comparison is free.

It warns rather than raises: a teacher at the student's resolution is a legitimate control, the losses
stay well defined, and the check at construction warns too.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Set, Tuple

from .warn import warn_user

Size = Tuple[int, int]


def not_lower(lr_sizes: Sequence[Size], hr_sizes: Sequence[Size]) -> List[int]:
    """The images whose LR view has at least as many pixels as their HR view.

    Args:
        lr_sizes: each image's ``(H, W)`` as the student saw it (content, before padding).
        hr_sizes: the same images' ``(H, W)`` as the teacher saw them.

    Example:
        >>> not_lower([(128, 96), (600, 800)], [(256, 192), (512, 683)])
        [1]
    """
    return [i for i, (lr, hr) in enumerate(zip(lr_sizes, hr_sizes)) if lr[0] * lr[1] >= hr[0] * hr[1]]


class StepResolutionCheck:
    """Warn once per teacher when, at any step, an image reached the student with as many pixels as (or more
    than) the teacher.

    Example:
        >>> import warnings
        >>> check = StepResolutionCheck()
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     check("teacher", [(128, 128)], [(256, 256)], None)  # lower: nothing to say
        ...     check("teacher", [(640, 480)], [(512, 384)], None)
        ...     check("teacher", [(800, 600)], [(512, 384)], None)  # said once
        >>> len(w), "640x480" in str(w[0].message)
        (1, True)
    """

    def __init__(self) -> None:
        self._warned: Set[str] = set()

    def __call__(self, who: str, lr_sizes: Sequence[Size], hr_sizes: Sequence[Size], student: Any) -> None:
        """Compare one step's sizes for the teacher named ``who`` in messages.

        Args:
            student: the student model, read only to explain the warning (a torchvision transform's
                ``_skip_resize``).
        """
        if who in self._warned:
            return
        bad = not_lower(lr_sizes, hr_sizes)
        if not bad:
            return
        self._warned.add(who)
        i = bad[0]
        (h, w), (th, tw) = lr_sizes[i], hr_sizes[i]
        msg = (f"LRDet: image {i} of this batch reached the student at {h}x{w} and the {who} at {th}x{tw} "
               f"({len(bad)} of its {len(lr_sizes)} images reached the student with at least as many pixels as "
               f"the {who}): the student is not at a lower resolution, there is no high-resolution view to "
               f"distil from.")
        if getattr(getattr(student, "transform", None), "_skip_resize", False):
            msg += (" The student's transform has _skip_resize=True (torchvision's reference train.py sets it for "
                    "--data-augmentation multiscale and lsj): in training it keeps the size the data pipeline "
                    "produced and ignores min_size/max_size. Build the student without _skip_resize, or make "
                    "the pipeline produce LR images.")
        else:
            msg += " Give the student smaller images (or the teacher larger ones)."
        warn_user(msg)

"""A student that is not at a lower resolution than its teacher is reported at the step, image by image
(issue 25): torchvision's reference script sets ``_skip_resize=True`` for ``--data-augmentation multiscale``
and ``lsj``, and the "LR" student then trains at the data pipeline's size whatever its ``min_size`` says."""
import warnings

import pytest
import torch

from lrdet_core import BridgeDistiller, SplitPoints
from tiny import TinyDetector, batch, retinanet, seeded

pytestmark = pytest.mark.usefixtures("one_thread")

_REPORT = "reached the student at"


def _step(d, *args, **kw):
    """One training step; the warnings it raised, as strings."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        d(*args, **kw)
    return [str(w.message) for w in seen]


def test_student_with_skip_resize_is_reported_image_by_image_once():
    # Student min_size 64 < teacher 128, so the check at construction is silent; but _skip_resize keeps the
    # raw sizes in training: the 50x60 image is still smaller than the teacher's 107x128, the 300x240 is not.
    student = seeded(retinanet, size=64, _skip_resize=True)
    teacher = seeded(retinanet, seed=1, size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = BridgeDistiller(student, teacher, alpha=1e-6).train()
    got = [m for m in _step(d, *batch(sizes=((50, 60), (300, 240)))) if _REPORT in m]
    assert len(got) == 1, got
    assert ("image 1 of this batch reached the student at 300x240 and the teacher at 128x102 (1 of its 2 images"
            in got[0]), got[0]
    assert "_skip_resize=True" in got[0] and "multiscale and lsj" in got[0]
    assert not [m for m in _step(d, *batch(sizes=((300, 240), (300, 240)), seed=1)) if _REPORT in m]  # said once


def test_student_below_the_teacher_is_not_reported():
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128)
    d = BridgeDistiller(student, teacher, alpha=1e-6).train()
    for seed, sizes in enumerate([((50, 60), (300, 240)), ((128, 128), (64, 200))]):
        assert not [m for m in _step(d, *batch(sizes=sizes, seed=seed)) if _REPORT in m]


def test_explicit_hr_view_of_the_same_size_is_reported():
    # A custom model: sizes are the canvases; an hr_images batch as large as the LR one is allowed, but reported.
    torch.manual_seed(0)
    d = BridgeDistiller(TinyDetector(), TinyDetector(neck_channels=24), split_points=SplitPoints("backbone", "neck"),
                        alpha=1e-3).train()
    images = torch.rand(2, 3, 32, 32)
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]])} for _ in range(2)]
    got = [m for m in _step(d, images, targets, hr_images=images.clone(), hr_targets=targets) if _REPORT in m]
    assert len(got) == 1 and "at 32x32 and the teacher at 32x32 (2 of its 2 images" in got[0], got
    assert "_skip_resize" not in got[0] and "smaller images" in got[0]
    hr = torch.nn.functional.interpolate(images, scale_factor=2.0)
    d2 = BridgeDistiller(TinyDetector(), TinyDetector(neck_channels=24), split_points=SplitPoints("backbone", "neck"),
                         alpha=1e-3).train()
    assert not [m for m in _step(d2, images, targets, hr_images=hr, hr_targets=targets) if _REPORT in m]


def test_a_window_of_bridge_crop_is_not_taken_for_the_teachers_resolution():
    # With bridge_crop the teacher runs on a window smaller than the LR image; the images themselves are still
    # at twice the LR size, so nothing is reported.
    torch.manual_seed(0)
    d = BridgeDistiller(TinyDetector(), TinyDetector(neck_channels=24), split_points=SplitPoints("backbone", "neck"),
                        alpha=1e-3, bridge_crop=0.25).train()
    images = torch.rand(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 80.0, 90.0]])} for _ in range(2)]
    hr = torch.nn.functional.interpolate(images, scale_factor=2.0)
    hr_targets = [{"boxes": t["boxes"] * 2} for t in targets]
    assert not [m for m in _step(d, images, targets, hr_images=hr, hr_targets=hr_targets) if _REPORT in m]
    h, w = d.crop.windows["teacher"].size
    assert h * w < 128 * 128  # the window has fewer pixels than the LR image

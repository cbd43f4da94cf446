"""Mistakes a new user makes in the first hour: each raises an LRDetError naming what was expected and what
arrived, or warns once, before any forward runs."""
import warnings

import pytest
import torch

from lrdet_core import BridgeDistiller, InputError, SplitPoints
from tiny import TinyDetector, batch, retinanet, seeded

pytestmark = pytest.mark.usefixtures("one_thread")


class _Stacking(TinyDetector):
    """A custom detector that takes a list of images and stacks them itself, as many do."""

    def forward(self, images, targets=None):
        return super().forward(torch.stack(list(images)) if isinstance(images, (list, tuple)) else images, targets)


def _custom():
    torch.manual_seed(0)
    return BridgeDistiller(_Stacking(), _Stacking(neck_channels=24), split_points=SplitPoints("backbone", "neck"),
                           hr_scale=2.0, alpha=1.0)


@pytest.fixture(scope="module")
def retina():
    return BridgeDistiller(seeded(retinanet, size=64), seeded(retinanet, seed=1, size=128), alpha=1e-3)


def _forward_count(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_an_empty_batch_is_an_input_error_before_any_forward(retina):
    d = _custom().train()
    calls = _forward_count(d.student)
    for images in ([], torch.zeros(0, 3, 32, 32)):
        with pytest.raises(InputError, match=r"expected a batch of at least one image with its targets, but got an "
                                             r"empty batch"):
            d(images, [])
    retina.train()
    with pytest.raises(InputError, match="empty batch"):
        retina([], [])
    assert not calls


def test_targets_given_in_eval_mode_warn_once_and_the_predictions_are_the_students(retina):
    images, targets = batch()
    retina.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no targets: nothing to say
        want = retina(images)
    with pytest.warns(UserWarning, match=r"the distiller is in eval mode, so distiller\(images, targets\) returns the "
                                         r"student's predictions and ignores the targets; call distiller.train\(\)"):
        got = retina(images, targets)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per distiller
        retina(images, targets, hr_images=images, hr_targets=targets)


def test_a_custom_model_given_images_of_mixed_sizes_is_told_what_it_needs():
    d = _custom().train()
    images = [torch.rand(3, 32, 32), torch.rand(3, 48, 40)]
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]])} for _ in images]
    calls = _forward_count(d.student)
    with pytest.raises(InputError, match=r"expected the images of a custom model batch to share one size \(the "
                                         r"student gets the batch as given, and each image is taken to fill the whole "
                                         r"canvas\), but got sizes \[\(32, 32\), \(48, 40\)\]; resize or pad them"):
        d(images, targets)
    hr = [torch.rand(3, 64, 64), torch.rand(3, 64, 72)]
    with pytest.raises(InputError, match=r"expected the hr_images of a custom model batch to share one size"):
        d([images[0], images[0]], targets, hr_images=hr, hr_targets=targets)
    assert not calls
    d.materialize(torch.stack([images[0]] * 2), targets)
    out = d([images[0], images[0]], targets)  # one size: a list works as well as a tensor
    assert out["lr/heat"].item() == pytest.approx(d.student(torch.stack([images[0]] * 2), targets)["heat"].item())

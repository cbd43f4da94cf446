"""The options that ablate one term of LRDet's objective at a time (issue: the bridge's two terms)."""
from __future__ import annotations

import pytest
import torch

from lrdet_core import BridgeDistiller, InputError, SplitPoints

from tiny import TinyDetector, batch, fcos

SP = SplitPoints(backbone="backbone", neck="neck")


def _custom_step(hr_det_weight, alpha, seed=0):
    torch.manual_seed(seed)
    student, teacher = TinyDetector(), TinyDetector()
    d = BridgeDistiller(student, teacher, split_points=SP, hr_scale=2.0, alpha=alpha, hr_det_weight=hr_det_weight)
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 17.0]])}, {"boxes": torch.tensor([[10.0, 1.0, 30.0, 25.0]])}]
    return d, d(images, targets)


def test_hr_det_weight_scales_only_the_bridge_detection_terms():
    _, ref = _custom_step(1.0, alpha=0.3)
    _, out = _custom_step(0.25, alpha=0.3)
    assert set(out) == set(ref)
    for k in ref:
        want = 0.25 * ref[k] if k.startswith("bridge/") else ref[k]
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=0)
    assert float(ref["bridge/heat"]) > 0


def test_distillation_only_bridge_gets_gradient_from_the_distillation_term_alone():
    """hr_det_weight=0: the student's gradient is that of L_det(LR) + alpha * L_FD, with the FD term
    still computed on the bridge's neck output (so the shared backbone is reached through the bridge)."""
    d, out = _custom_step(0.0, alpha=0.3)
    assert float(out["bridge/heat"]) == 0.0
    total = sum(out.values())
    grads = torch.autograd.grad(total, list(d.student.parameters()), allow_unused=True)
    d2, out2 = _custom_step(1.0, alpha=0.3)
    manual = out2["lr/heat"] + out2["distill/mse"]
    grads2 = torch.autograd.grad(manual, list(d2.student.parameters()), allow_unused=True, retain_graph=True)
    for g, g2 in zip(grads, grads2):
        if g2 is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-7)
    # the distillation term does reach the backbone through the bridge pass
    bb = torch.autograd.grad(out2["distill/mse"], list(d2.student.backbone.parameters()), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in bb)


def test_hr_det_weight_on_a_torchvision_student():
    torch.manual_seed(0)
    student, teacher = fcos(size=64), fcos(size=128)
    images, targets = batch(((96, 96), (96, 96)))
    out1 = BridgeDistiller(student, teacher, alpha=0.0)(images, targets)
    out0 = BridgeDistiller(student, teacher, alpha=0.0, hr_det_weight=0.5)(images, targets)
    for k in out1:
        if k.startswith("bridge/"):
            torch.testing.assert_close(out0[k], 0.5 * out1[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1", True])
def test_hr_det_weight_must_be_finite_and_non_negative(bad):
    with pytest.raises(InputError, match="hr_det_weight"):
        BridgeDistiller(TinyDetector(), TinyDetector(), split_points=SP, hr_scale=2.0, hr_det_weight=bad)

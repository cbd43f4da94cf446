"""``distill_every``: which steps distil, what a skipped step returns, its gradients (also under DDP), and the
counter's life in ``state_dict()``, across resumes and ``materialize()``."""
import copy
import warnings

import pytest
import torch

from _ddp_worker import TINY_SPLIT, tiny_batch
from lrdet_core import BridgeDistiller, InputError
from tiny import TinyDetector, batch, retinanet, seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def _distiller(**kw):
    """A custom student (16 neck channels) and teacher (24: projectors) with an HR view built by hr_scale."""
    kw.setdefault("alpha", 0.01)
    return BridgeDistiller(seeded(TinyDetector, 0), seeded(TinyDetector, 1, neck_channels=24),
                           split_points=TINY_SPLIT, hr_scale=2.0, **kw)


def _teacher_calls(d):
    calls = []
    d.teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def _steps(d, n, data=None):
    """``n`` training calls; per call whether the teacher ran and the returned dict (detached)."""
    images, targets = data or tiny_batch(0, n=2)[:2]
    calls, ran, outs = _teacher_calls(d), [], []
    for _ in range(n):
        before = len(calls)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # projectors created at the first step
            out = d(images, targets)
        ran.append(len(calls) > before)
        outs.append({k: v.detach() for k, v in out.items()})
    return ran, outs


def test_every_kth_step_distils_and_every_step_has_the_same_keys():
    d = _distiller(distill_every=3).train()
    ran, outs = _steps(d, 7)
    assert ran == [True, False, False, True, False, False, True]
    keys = [list(o) for o in outs]
    assert keys == [["lr/heat", "bridge/heat", "distill/mse"]] * 7  # the same keys, in the same order
    for o, distilled in zip(outs, ran):
        assert (o["distill/mse"] != 0 and o["bridge/heat"] != 0) == distilled
    assert int(d.schedule.step) == 7
    # default: every step distils, nothing is counted or saved
    d1 = _distiller().train()
    assert _steps(d1, 3)[0] == [True] * 3 and "schedule.step" not in d1.state_dict()


def test_several_teachers_keep_their_keys_on_skipped_steps():
    d = BridgeDistiller(seeded(TinyDetector, 0), {"a": seeded(TinyDetector, 1), "b": seeded(TinyDetector, 2)},
                        split_points=TINY_SPLIT, hr_scale=2.0, alpha=0.01, distill_every=2).train()
    _, outs = _steps(d, 2)
    assert list(outs[0]) == list(outs[1]) == ["lr/heat", "bridge.a/heat", "distill.a/mse", "bridge.b/heat",
                                              "distill.b/mse"]
    # without a bridge (upsample distillation) there are no bridge keys on either kind of step
    d = _distiller(distill_every=2, bridge=False).train()
    _, outs = _steps(d, 2)
    assert list(outs[0]) == list(outs[1]) == ["lr/heat", "distill/mse"]


def test_a_skipped_step_is_a_plain_lr_step_with_zero_gradients_for_distillation_parameters():
    images, targets, _, _ = tiny_batch(0, n=2)
    d = _distiller(distill_every=2, loss="fgd").train()
    _steps(d, 1)  # step 0 distils and creates the projectors and GcBlocks
    plain = copy.deepcopy(d.student)
    d.zero_grad(set_to_none=True)
    out = d(images, targets)  # step 1: skipped
    sum(out.values()).backward()
    ref = plain(images, targets)
    ref["heat"].backward()
    torch.testing.assert_close(out["lr/heat"], ref["heat"], rtol=0, atol=0)
    distill_params = dict(d.projectors.named_parameters(prefix="projectors"))
    distill_params.update(d.losses.named_parameters(prefix="losses"))
    assert any(".gc_" in n for n in distill_params) and any(n.startswith("projectors") for n in distill_params)
    for n, p in d.named_parameters():
        assert p.grad is not None, n  # every parameter is in the graph: DDP needs no find_unused_parameters
        if n in distill_params:
            assert torch.count_nonzero(p.grad) == 0, n
        else:
            torch.testing.assert_close(p.grad, dict(plain.named_parameters())[n[len("student."):]].grad, rtol=0,
                                       atol=0, msg=n)


def test_torchvision_skipped_step_keys_match_the_distilling_step():
    images, targets = batch()
    d = BridgeDistiller(seeded(retinanet, 0, size=64), seeded(retinanet, 1, size=128), alpha=1e-4,
                        distill_every=2).train()
    outs = [d(images, targets) for _ in range(2)]
    assert list(outs[0]) == list(outs[1]) == ["lr/classification", "lr/bbox_regression", "bridge/classification",
                                              "bridge/bbox_regression", "distill/mse"]
    assert all(float(outs[1][k]) == 0 for k in outs[1] if not k.startswith("lr/"))


def test_resume_continues_the_schedule():
    ran, _ = _steps(_distiller(distill_every=3).train(), 8)
    d = _distiller(distill_every=3).train()
    first, _ = _steps(d, 4)
    state = copy.deepcopy(d.state_dict())
    assert int(state["schedule.step"]) == 4
    resumed = _distiller(distill_every=3).train()
    resumed.load_state_dict(state)  # strict: the key is expected
    rest, _ = _steps(resumed, 4)
    assert first + rest == ran == [True, False, False, True, False, False, True, False]


def test_old_checkpoints_load_and_restart_the_schedule():
    old = _distiller().train()
    _steps(old, 2)
    state = old.state_dict()
    assert "schedule.step" not in state
    d = _distiller(distill_every=3).train()
    _steps(d, 2)  # the counter is at 2: the next step would be skipped
    d.load_state_dict(state)  # strict, without the counter: it restarts at 0, a distilling step
    assert int(d.schedule.step) == 0 and _steps(d, 2)[0] == [True, False]
    # a counter in a checkpoint loaded by a distiller that distils at every step is ignored
    every = _distiller(distill_every=3).train()
    _steps(every, 2)
    d1 = _distiller().train()
    d1.load_state_dict(every.state_dict())
    assert _steps(d1, 2)[0] == [True, True]


def test_materialize_does_not_advance_the_counter():
    images, targets, _, _ = tiny_batch(0, n=2)
    d = _distiller(distill_every=2).train()
    d.materialize(images, targets)
    assert int(d.schedule.step) == 0 and len(d.projectors) == 3
    assert _steps(d, 2)[0] == [True, False]


def test_auto_alpha_is_measured_at_the_first_distilling_step():
    images, targets, _, _ = tiny_batch(0, n=2)
    d = _distiller(distill_every=2, alpha="auto").materialize(images, targets)
    d.load_state_dict({**d.state_dict(), "schedule.step": torch.tensor(1)})  # resumed on a skipped step
    d.train()
    _steps(d, 1)
    assert d.alphas["teacher"] is None  # not measured on a skipped step
    with pytest.warns(UserWarning, match="alpha='auto' at the first step"):
        d(images, targets)
    assert d.alphas["teacher"] is not None and d.alphas["teacher"] > 0


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
def test_bad_distill_every_is_rejected(bad):
    with pytest.raises(InputError, match="expected distill_every to be a positive int"):
        _distiller(distill_every=bad)


def test_yolo_skipped_steps_keep_the_keys_and_crops_are_refused():
    pytest.importorskip("ultralytics")
    from test_yolo import hr_batch, lr_batch, tiny

    images, targets = lr_batch()
    hr, hr_targets = hr_batch()
    d = BridgeDistiller(tiny(seed=0), tiny(seed=1), alpha=1e-4, distill_every=2).train()
    calls = _teacher_calls(d)
    outs = [d(images, targets, hr_images=hr, hr_targets=hr_targets) for _ in range(2)]
    assert len(calls) == 1 and list(outs[0]) == list(outs[1]) == [
        "lr/box", "lr/cls", "lr/dfl", "bridge/box", "bridge/cls", "bridge/dfl", "distill/mse"]
    with pytest.raises(InputError, match="not supported for Ultralytics YOLO models yet"):
        BridgeDistiller(tiny(seed=0), tiny(seed=1), bridge_crop=0.5)

"""Moving a distiller moves its teacher; copying one leaves the teacher out. For every family.

``distiller.to(...)``, ``.double()``, ``.half()``, ``.float()`` and ``.cuda()`` reach the frozen teacher, which is
kept out of the module tree (and which, for Ultralytics, overrides ``_apply`` without ``recurse``). Copies
(``copy.deepcopy``, what an EMA does; pickle; ``torch.save``) hold the student side only (``lrdet_core.copies``).
"""
import copy
import io
import pickle

import pytest
import torch

from lrdet_core import BridgeDistiller, LRDetError, MissingTeacherError, SplitPoints
from tiny import RecordingLoss, TinyDetector, batch, retinanet, seeded

#: One of each family; YOLO26 (its own criterion, E2ELoss) joins on the GPU, where the criterion moves too.
FAMILIES = ["torchvision", "custom", "yolov8"]


def _yolo(yaml, width, seed):
    pytest.importorskip("ultralytics")
    from test_yolo import tiny

    return tiny(width=width, yaml=yaml, seed=seed)


def make(family, **kw):
    """A distiller of the family (the teacher twice as wide, so the teacher is the larger model), and a batch."""
    if family == "torchvision":
        pytest.importorskip("torchvision")
        d = BridgeDistiller(seeded(retinanet, 0, size=64, channels=8), seeded(retinanet, 1, size=128, channels=16),
                            **kw)
        return d, batch(((64, 80), (80, 64)))
    if family == "custom":
        d = BridgeDistiller(seeded(TinyDetector, 0), seeded(TinyDetector, 1, width=16, neck_channels=32),
                            split_points=SplitPoints("backbone", "neck"), hr_scale=2.0, **kw)
        images, targets = batch(((32, 32), (32, 32)))
        return d, (torch.stack(images), targets)
    yaml = {"yolov8": "yolov8n.yaml", "yolo26": "yolo26n.yaml"}[family]
    from test_yolo import lr_batch

    return BridgeDistiller(_yolo(yaml, 0.0625, 0), _yolo(yaml, 0.125, 1), hr_scale=2.0, **kw), lr_batch()


def _floats(model):
    return [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]


# --- moving ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_to_double_half_float_move_the_teacher_along_and_it_stays_frozen(family):
    rec = RecordingLoss()
    d, (images, targets) = make(family, loss=rec, alpha=1.0)
    teacher = d.teacher
    for move, dtype in [(lambda m: m.double(), torch.float64), (lambda m: m.half(), torch.float16),
                        (lambda m: m.float(), torch.float32), (lambda m: m.to(torch.float64), torch.float64),
                        (lambda m: m.to("cpu", torch.float32), torch.float32), (lambda m: m.to("cpu"), torch.float32)]:
        assert move(d) is d
        assert {t.dtype for t in _floats(d.student)} == {t.dtype for t in _floats(teacher)} == {dtype}
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        assert d.teacher is teacher and not {id(p) for p in teacher.parameters()} & {id(p) for p in d.parameters()}
        if family.startswith("yolo"):  # BaseModel._apply's own work: the Detect head's strides
            assert teacher.model[-1].stride.dtype == dtype
    # The teacher runs in the dtype it was moved to: a float64 step distils float64 teacher features.
    d.double().train()
    images = images.double() if torch.is_tensor(images) else [im.double() for im in images]
    out = d(images, targets)
    assert all(t.dtype == torch.float64 for t in rec.calls[-1]["teacher"])
    assert all(torch.isfinite(v) and v.dtype == torch.float64 for k, v in out.items() if k.startswith("distill"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("family", FAMILIES + ["yolo26"])
def test_cuda_moves_the_teacher_and_the_student_trains_on_with_its_criterion(family, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # CPU and GPU losses compared in fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    d, (images, targets) = make(family, alpha=1.0)
    d.train()
    if family == "yolo26":
        for _ in range(3):  # a schedule state on the criterion built on the CPU, as the trainer steps it
            d.adapter.criterion().update()
    cpu = {k: v.detach() for k, v in d(images, targets).items()}
    assert d.cuda() is d
    assert all(t.is_cuda for t in _floats(d.teacher)) and not any(p.requires_grad for p in d.teacher.parameters())
    if family.startswith("yolo"):
        assert d.teacher.model[-1].stride.is_cuda
    images = images.cuda() if torch.is_tensor(images) else [im.cuda() for im in images]
    out = d(images, [{k: v.cuda() for k, v in t.items()} for t in targets])
    assert sorted(out) == sorted(cpu) and all(v.is_cuda for v in out.values())
    if family.startswith("yolo"):  # the criterion was rebuilt on the GPU, its schedule carried over
        crit = d.student.criterion
        assert getattr(crit, "one2many", crit).device == next(d.student.parameters()).device
        assert crit is d.adapter.criterion() and (family != "yolo26" or (crit.updates == 3 and crit.o2m < 0.8))
    if family != "torchvision":  # the same weights on the same batch: the same losses (torchvision resizes there)
        for k in cpu:
            torch.testing.assert_close(out[k].detach().cpu(), cpu[k], rtol=1e-3, atol=1e-3, msg=k)


# --- copies ---------------------------------------------------------------------------------------------------
def _size(obj):
    return len(pickle.dumps(obj))


@pytest.mark.parametrize("family", FAMILIES)
def test_copies_and_pickles_leave_the_teacher_out(family):
    d, (images, targets) = make(family, alpha=1.0)
    d.train()
    d(images, targets)  # projectors and criteria built, as in training
    teacher = d.teacher
    for c in (copy.deepcopy(d), pickle.loads(pickle.dumps(d))):
        assert c.teachers == {} and c.teacher_adapters == {}
        assert d.teacher is teacher and list(d.teacher_adapters) == ["teacher"]  # the original keeps it
        # The copy is the student side: the same state_dict, the same predictions.
        assert c.state_dict().keys() == d.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(c.state_dict().values(), d.state_dict().values()))
        c.eval(), d.eval()
        want, got = d(images), c(images)
        d.train()
        if isinstance(want, (list, tuple)) and want and isinstance(want[0], dict):  # torchvision: dicts per image
            assert all(torch.equal(w[k], g[k]) for w, g in zip(want, got) for k in w)
        elif isinstance(want, dict):  # the custom model: logits per level
            assert all(torch.equal(want[k], got[k]) for k in want)
        else:
            assert torch.equal(want[0], got[0])
        # A copy cannot train: it says so, in the library's exception family.
        c.train()
        with pytest.raises(MissingTeacherError, match=r"copies \(copy.deepcopy, pickle.*leave the frozen teacher"):
            c(images, targets)
        with pytest.raises(LRDetError, match="distiller.teacher"):
            c.teacher
    # Memory: a copy weighs the student and the projectors, not the teacher (here the larger model).
    c = copy.deepcopy(d)
    extra = _size(c) - _size(d.student) - _size(d.projectors)
    assert extra < 0.1 * _size(teacher), (extra, _size(teacher))
    buf = io.BytesIO()
    torch.save(c, buf)
    assert len(buf.getvalue()) < _size(d.student) + _size(d.projectors) + 0.1 * _size(teacher)


@pytest.mark.parametrize("family", ["custom", "yolov8"])
def test_casting_a_copy_leaves_the_originals_teacher_alone(family):
    # Why copies do not share the teacher: Ultralytics saves `deepcopy(ema).half()`; a shared teacher would be cast.
    d, (images, targets) = make(family, alpha=1.0)
    copy.deepcopy(d).half()
    assert {t.dtype for t in _floats(d.teacher)} == {torch.float32}
    assert all(torch.isfinite(v) for v in d.train()(images, targets).values())

"""Reliability (issue 5): DDP, mixed precision, checkpoints, export, invariants, cleanup after errors, memory.

Failures users report from distillation frameworks, each with a test that fails if it comes back.
Already covered in test_distiller.py and not repeated here: teacher frozen and bit-identical under
``train()``, in-place ReLU after a custom split point, unknown paths with close matches, ``state_dict``
without the teacher, strict RetinaNet export, non-finite terms from the loss.
"""
import copy
import gc
import os
import socket
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
from torch import nn

from _ddp_worker import (BATCH, EVERY, EVERY_STEPS, LOSSES, LR, STEPS, TINY_SPLIT, gn_tiny, make_distiller, part, step,
                         tiny_batch)
from lrdet_core import BridgeDistiller, InputError, LRDetError, NonFiniteError
from tiny import TinyDetector, batch, faster_rcnn, fcos, retinanet, seeded

HERE = os.path.dirname(os.path.abspath(__file__))


pytestmark = pytest.mark.usefixtures("one_thread")



def _tiny_distiller(loss="mse", student=None, teacher=None, **kw):
    torch.manual_seed(0)
    student = student or TinyDetector()
    teacher = teacher or TinyDetector(neck_channels=24)  # heterogeneous: 1x1 projectors
    return BridgeDistiller(student, teacher, split_points=TINY_SPLIT, hr_scale=2.0, loss=loss, **kw)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- DistributedDataParallel ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    """Two gloo ranks on CPU, each on half of every batch; their saved gradients and parameters."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_ddp_worker.py"), str(out)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the DDP ranks did not finish in 240 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("loss", LOSSES)
def test_ddp_without_find_unused_parameters_equals_the_average_of_per_half_steps(ddp_ranks, loss):
    # Without find_unused_parameters, DDP raises at the second step if any parameter got no gradient
    # in the first; the worker runs two steps, and also records parameters left without a gradient.
    r0, r1 = (r[loss] for r in ddp_ranks)
    assert r0["missing"] == r1["missing"] == [[]] * STEPS
    names = set(r0["params"])
    assert any(n.startswith("projectors.") for n in names)
    assert any(".gc_student." in n for n in names) == (loss == "fgd")
    # GcBlocks end in a zero-initialised conv: their inner weights get non-zero gradients from step 2 on,
    # which is what makes the comparison below meaningful for them.
    assert all(g.abs().sum() > 0 for n, g in r0["grads"][-1].items() if n.endswith(".weight"))

    # What DDP computes, exactly: each rank differentiates its loss on half the batch and the gradients
    # are averaged. Reproduced here in one process by running each half and averaging.
    d = make_distiller(loss).train()
    opt = torch.optim.SGD(d.parameters(), lr=LR)
    ref_grads = []
    for s in range(STEPS):
        acc = {}
        for r in range(2):
            opt.zero_grad(set_to_none=True)
            step(d, part(tiny_batch(s), slice(r * BATCH // 2, (r + 1) * BATCH // 2)))
            for n, p in d.named_parameters():
                acc[n] = acc.get(n, 0) + p.grad / 2
        for n, p in d.named_parameters():
            p.grad = acc[n]
        ref_grads.append(acc)
        opt.step()
    for s in range(STEPS):
        assert set(r0["grads"][s]) == set(r1["grads"][s]) == names
        for n in names:
            torch.testing.assert_close(r0["grads"][s][n], r1["grads"][s][n], rtol=0, atol=0, msg=n)  # all-reduced
            torch.testing.assert_close(r0["grads"][s][n], ref_grads[s][n], rtol=1e-4, atol=1e-8, msg=n)
    for n, p in d.named_parameters():
        torch.testing.assert_close(r0["params"][n], p.detach(), rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(r1["params"][n], p.detach(), rtol=0, atol=0, msg=n)


def test_ddp_distill_every_skipped_steps_need_no_find_unused_parameters(ddp_ranks):
    r0, r1 = (r["every"] for r in ddp_ranks)
    assert r0["missing"] == r1["missing"] == [[]] * EVERY_STEPS  # no unused-parameter error, every grad present
    assert r0["counter"] == r1["counter"] == list(range(1, EVERY_STEPS + 1))
    assert r0["keys"][0] == r0["keys"][1] == r1["keys"][1]
    # The same as one process averaging the two halves of each batch, the counter put back between the halves.
    d = make_distiller("fgd", distill_every=EVERY).train()
    opt = torch.optim.SGD(d.parameters(), lr=LR)
    for s in range(EVERY_STEPS):
        acc, counter = {}, copy.deepcopy(d.schedule.state_dict())
        for r in range(2):
            d.schedule.load_state_dict(counter)
            opt.zero_grad(set_to_none=True)
            images, targets, hr, hr_targets = part(tiny_batch(s), slice(r * BATCH // 2, (r + 1) * BATCH // 2))
            sum(d(images, targets, hr_images=hr, hr_targets=hr_targets).values()).backward()
            for n, p in d.named_parameters():
                acc[n] = acc.get(n, 0) + p.grad / 2
        for n, p in d.named_parameters():
            p.grad = acc[n]
            torch.testing.assert_close(r0["grads"][s][n], r1["grads"][s][n], rtol=0, atol=0, msg=n)
            torch.testing.assert_close(r0["grads"][s][n], acc[n], rtol=1e-4, atol=1e-8, msg=n)
            if s % EVERY and (n.startswith("projectors.") or n.startswith("losses.")):
                assert torch.count_nonzero(r0["grads"][s][n]) == 0, n  # a skipped step: zero, but present
        opt.step()


def test_per_half_average_against_the_whole_batch():
    # The concatenated-batch relation behind the DDP check. Terms that are means over the images (the
    # detection losses, FGD, CWD) give the whole-batch gradient; a SUM over the batch (MSE and L1 with
    # the default reduction="sum") gives half of it: with R ranks, DDP's step on a batch of N equals a
    # single-process step on all N images with alpha / R. GroupNorm, not BatchNorm: batch statistics of a
    # half differ from those of the whole batch, so with BN neither relation holds.
    for loss, distill_scale in (("fgd", 1.0), ("cwd", 1.0), ("mse", 0.5), ("l1", 0.5)):
        d = make_distiller(loss).train()
        full = tiny_batch(0)
        halves = {}
        for r in range(2):
            d.zero_grad(set_to_none=True)
            step(d, part(full, slice(2 * r, 2 * r + 2)))
            for n, p in d.named_parameters():
                halves[n] = halves.get(n, 0) + p.grad / 2
        d.zero_grad(set_to_none=True)
        images, targets, hr, hr_targets = full
        out = d(images, targets, hr_images=hr, hr_targets=hr_targets)
        sum(v * (distill_scale if k.startswith("distill/") else 1.0) for k, v in out.items()).backward()
        for n, p in d.named_parameters():
            torch.testing.assert_close(p.grad, halves[n], rtol=1e-4, atol=1e-6, msg=f"{loss}: {n}")


def test_parameters_created_after_a_process_group_is_up_raise_instead_of_desyncing():
    # DDP synchronises only the parameters it was built with; a projector created inside its forward
    # would train separately on every rank. materialize() before wrapping is the documented way.
    # A fixed alpha: "auto" would all-reduce its first measurement in the pretended process group.
    d = BridgeDistiller(gn_tiny(0, 16), gn_tiny(1, 24), split_points=TINY_SPLIT, hr_scale=2.0, alpha=1e-3).train()
    images, targets, _, _ = tiny_batch(0, n=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.distributed, "is_initialized", lambda: True)
        mp.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)  # the teachers: nothing to compare
        with pytest.raises(InputError, match=r"call distiller.materialize\(images, targets\) before"):
            d(images, targets)
        assert len(d.projectors) == 3  # created, then refused: a retry (after materialize) proceeds
        d.materialize(images, targets)
        params = [id(p) for p in d.parameters()]
        assert set(d(images, targets)) == {"lr/heat", "bridge/heat", "distill/mse"}
        assert [id(p) for p in d.parameters()] == params  # nothing new: DDP would see every parameter


def test_a_teacher_that_differs_between_ranks_is_refused_at_the_first_step(ddp_ranks):
    # The teacher is outside the module tree: DDP neither broadcasts nor compares it. Rank 1 built its
    # teacher from another seed; both ranks must say so, naming the rank (and the teacher, where several).
    for r in ddp_ranks:
        assert "rank 1 holds another teacher than rank 0" in r["teacher_single"], r["teacher_single"]
        assert "rank 1 holds another teacher 'other' than rank 0" in r["teacher_two"], r["teacher_two"]
        assert "'same'" not in r["teacher_two"]
        # The same teacher on every rank (the runs above) passed the comparison, which did run.
        assert all(r[loss]["teachers_compared"] for loss in LOSSES)


def test_teacher_checksum_sees_buffers_and_swapped_tensors_and_names_the_ranks_that_differ():
    from lrdet_core.ranks import ranks_that_differ, teacher_checksum

    t = seeded(TinyDetector, 1)  # BatchNorm: running statistics are buffers
    same = copy.deepcopy(t)
    assert torch.equal(teacher_checksum(t), teacher_checksum(same))
    stats = copy.deepcopy(t)
    bn = next(m for m in stats.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_var.mul_(1.001)
    swapped = copy.deepcopy(t)
    a, b = swapped.head[0].bias, swapped.head[1].bias  # same shape, other places
    a.data, b.data = b.data.clone(), a.data.clone()
    sums = torch.stack([teacher_checksum(m) for m in (t, same, stats, swapped)])[:, None]
    assert ranks_that_differ(sums, ["teacher"]) == {"teacher": [2, 3]}
    two = torch.cat([sums, sums[[0, 0, 0, 0]]], dim=1)  # a second teacher, the same on every rank
    assert ranks_that_differ(two, ["a", "b"]) == {"a": [2, 3]}


def test_sync_batchnorm_student(ddp_ranks):
    # SyncBatchNorm is a _BatchNorm: the bridge freezes and restores its running statistics like BN's.
    # Out of a process group it falls back to BatchNorm; the bridge must leave the statistics as a
    # plain forward does.
    torch.manual_seed(0)
    plain = TinyDetector()
    student = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    images, targets, _, _ = tiny_batch(5, n=2)
    out = BridgeDistiller(student, TinyDetector(), split_points=TINY_SPLIT, hr_scale=2.0).train()(images, targets)
    ref = plain.train()(images, targets)
    torch.testing.assert_close(out["lr/heat"], ref["heat"], rtol=0, atol=0)  # the LR pass is a plain BN forward
    sync = {k: v for k, v in student.state_dict().items() if "running" in k or "num_batches" in k}
    assert sync and all(torch.equal(v, plain.state_dict()[k]) for k, v in sync.items())
    assert all(m.track_running_stats for m in student.modules() if isinstance(m, nn.SyncBatchNorm))
    # In a 2-rank gloo group, torch's SyncBatchNorm itself refuses CPU tensors in training mode (it syncs
    # only on GPU-like devices), in the student's own LR pass; the distiller adds nothing to that error
    # and still puts every BN flag back and removes its hooks.
    for r in ddp_ranks:
        assert r["sync_bn"] == "ok" or r["sync_bn"].startswith("ValueError: SyncBatchNorm expected input tensor "
                                                                "to be on GPU"), r["sync_bn"]
        assert r["sync_bn_restored"] and r["sync_bn_hooks"] == 0


# --- mixed precision -----------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["mse", "l1", "cwd", "fgd"])
def test_bf16_autocast_step_matches_fp32(loss):
    # The student, projectors, GcBlocks and teacher run in bf16 under autocast while their weights
    # stay fp32; every loss term comes out fp32. bf16 keeps 8 significant bits, so the terms are
    # compared with rtol 5e-2 (fp32 vs bf16 features through ~6 layers).
    # The projectors and GcBlocks are created inside the autocast region, at the first step: they must
    # still be fp32 (master weights for the optimizer), not the bf16 of the features they were sized from.
    # bf16 is really used: the convolutions of the LR pass, the bridge pass and the teacher, and the
    # features reaching the distillation loss, come out in bf16 under autocast (fp32 without).
    images, targets, _, _ = tiny_batch(0, n=2)
    results = {}
    for amp in (False, True):
        d = _tiny_distiller(loss).train()
        dtypes = {"student": [], "teacher": [], "loss": []}
        d.student.head[0].register_forward_hook(lambda m, i, o: dtypes["student"].append(o.dtype))
        d.teacher.neck.lat[0][0].register_forward_hook(lambda m, i, o: dtypes["teacher"].append(o.dtype))
        d.losses["teacher"].register_forward_pre_hook(lambda m, args: dtypes["loss"].append(
            {x.dtype for x in args[0] + args[1]}))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "created at the first training step"
            out = d(images, targets)
        want = torch.bfloat16 if amp else torch.float32
        # the head runs once per level: 3 calls in the LR pass, 3 in the bridge pass
        assert dtypes["student"] == [want] * 6 and dtypes["teacher"] == [want], dtypes
        assert dtypes["loss"] == [{want}], dtypes
        assert len(d.projectors) == 3
        assert all(v.dtype == torch.float32 for v in out.values()), {k: v.dtype for k, v in out.items()}
        sum(out.values()).backward()
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                   and bool(torch.isfinite(p.grad).all()) for p in d.parameters())
        torch.optim.SGD(d.parameters(), lr=0.01).step()
        results[amp] = {k: v.detach() for k, v in out.items()}
    assert set(results[True]) == set(results[False])
    for k in results[False]:
        torch.testing.assert_close(results[True][k], results[False][k], rtol=5e-2, atol=1e-3, msg=k)


def test_alpha_auto_is_the_same_on_every_rank(ddp_ranks):
    # Each rank measured alpha on its own half of the batch; the two halves give different local values,
    # so only the average over the ranks makes them agree.
    r0, r1 = (r["auto"] for r in ddp_ranks)
    assert r0["alpha"] == r1["alpha"]
    det, distill = (r0["det"] + r1["det"]) / 2, (r0["distill"] + r1["distill"]) / 2
    assert r0["alpha"] == pytest.approx(0.5 * det / distill, rel=1e-5)
    local = [0.5 * r["det"] / r["distill"] for r in (r0, r1)]
    assert abs(local[0] - local[1]) > 0.05 * local[0]


# --- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_resume_gives_the_identical_next_step(tmp_path):
    images, targets, _, _ = tiny_batch(0, n=2)

    def run(d, opt, seed):
        torch.manual_seed(seed)  # every RNG a model might draw from, fixed before the step
        opt.zero_grad(set_to_none=True)
        out = d(*tiny_batch(seed, n=2)[:2])
        sum(out.values()).backward()
        opt.step()
        return {k: v.detach() for k, v in out.items()}

    d = _tiny_distiller("fgd").materialize(images, targets).train()
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)  # Adam: per-parameter state that must resume too
    for s in range(2):
        run(d, opt, s)
    torch.save({"distiller": d.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    expected = run(d, opt, 2)
    after = {k: v.clone() for k, v in d.state_dict().items()}

    ckpt = torch.load(tmp_path / "ckpt.pt")
    assert not any("teacher" in k and not k.startswith(("losses.teacher.", "projectors.teacher_"))
                   for k in ckpt["distiller"])
    assert set(ckpt["distiller"]) == {f"student.{k}" for k in d.student.state_dict()} | {
        f"losses.{k}" for k in d.losses.state_dict()} | {f"projectors.{k}" for k in d.projectors.state_dict()} | {
        "auto_alpha"}  # the default alpha="auto", measured at the first step: resumed, not measured again below
    # A new process: fresh student (other init), the teacher re-attached, nothing run before loading.
    torch.manual_seed(123)
    teacher = TinyDetector(neck_channels=24)
    teacher.load_state_dict(d.teacher.state_dict())
    d2 = BridgeDistiller(TinyDetector(), teacher, split_points=TINY_SPLIT, hr_scale=2.0, loss="fgd").train()
    with pytest.warns(UserWarning, match="load_state_dict created"):  # (the optimizer is built after it)
        d2.load_state_dict(ckpt["distiller"])  # builds the projectors and FGD's GcBlocks from the checkpoint
    opt2 = torch.optim.Adam(d2.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["optimizer"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is created at this first step
        got = run(d2, opt2, 2)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert all(torch.equal(v, after[k]) for k, v in d2.state_dict().items())


def test_alpha_auto_resumes_bit_identically_without_measuring_again(tmp_path, monkeypatch):
    import lrdet_core.balance as balance_mod

    def run(d, opt, seed):
        torch.manual_seed(seed)
        opt.zero_grad(set_to_none=True)
        out = d(*tiny_batch(seed, n=2)[:2])
        sum(out.values()).backward()
        opt.step()
        return {k: v.detach() for k, v in out.items()}

    d = _tiny_distiller("mse", alpha="auto").materialize(*tiny_batch(0, n=2)[:2]).train()
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="alpha='auto' at the first step"):
        run(d, opt, 0)
    alpha = d.alphas["teacher"]
    run(d, opt, 1)
    torch.save({"distiller": d.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    expected = run(d, opt, 2)
    assert d.alphas["teacher"] == alpha

    ckpt = torch.load(tmp_path / "ckpt.pt")
    assert ckpt["distiller"]["auto_alpha"].dtype == torch.float64 and ckpt["distiller"]["auto_alpha"].item() == alpha
    torch.manual_seed(123)
    teacher = TinyDetector(neck_channels=24)
    teacher.load_state_dict(d.teacher.state_dict())
    d2 = BridgeDistiller(TinyDetector(), teacher, split_points=TINY_SPLIT, hr_scale=2.0, alpha="auto").train()
    assert d2.alphas == {"teacher": None}
    with pytest.warns(UserWarning, match="load_state_dict created"):  # the projectors (the optimizer comes after)
        d2.load_state_dict(ckpt["distiller"])
    opt2 = torch.optim.Adam(d2.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["optimizer"])

    def measured_again(*a, **k):
        raise AssertionError("a resumed distiller measured alpha again")

    monkeypatch.setattr(balance_mod, "auto_alphas", measured_again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(d2, opt2, 2)
    assert d2.alphas["teacher"] == alpha
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    d2.half()  # casting the distiller moves alpha along without rounding it
    assert d2.auto_alpha.dtype == torch.float64 and d2.alphas["teacher"] == alpha


def test_numeric_alpha_checkpoints_and_alpha_auto_ones_load_into_each_other():
    images, targets = tiny_batch(0, n=2)[:2]
    numeric = _tiny_distiller("mse", alpha=1e-3).materialize(images, targets)
    auto = _tiny_distiller("mse", alpha="auto").materialize(images, targets)
    assert "auto_alpha" not in numeric.state_dict()  # a numeric alpha's checkpoint is as before
    with pytest.warns(UserWarning, match=r"the checkpoint holds no alpha='auto' values .* so alpha is measured "
                                         r"again at the next training step"):
        auto.load_state_dict(numeric.state_dict())  # strict: an old checkpoint has no auto_alpha
    assert auto.alphas == {"teacher": None}
    with pytest.warns(UserWarning, match="alpha='auto' at the first step"):
        auto.train()(images, targets)  # nothing was measured before: measured now
    alpha = auto.alphas["teacher"]
    assert alpha is not None and alpha > 0
    with pytest.warns(UserWarning, match=rf"the checkpoint holds alpha='auto' values \[{alpha}\], but this distiller "
                                         rf"has alpha=0.001, which is used"):
        numeric.load_state_dict(auto.state_dict())
    assert numeric.alphas == {"teacher": 1e-3}


def test_materialize_changes_nothing_but_the_new_parameters():
    d = _tiny_distiller("fgd")
    before = copy.deepcopy(d.student.state_dict())
    rng = torch.get_rng_state()
    d.eval().materialize(*tiny_batch(0, n=2)[:2])
    assert not d.training and len(d.projectors) == 3 and d.losses["teacher"].channels == (24, 24, 24)
    assert all(torch.equal(v, before[k]) for k, v in d.student.state_dict().items())  # BN stats put back
    assert torch.equal(torch.get_rng_state(), rng)


# --- export ------------------------------------------------------------------------------------------------
def test_trained_fcos_student_exports_to_a_fresh_torchvision_model():
    keep_all = dict(score_thresh=0.0, detections_per_img=20)  # untrained scores are low: keep detections
    student = seeded(fcos, size=64, **keep_all)
    teacher = seeded(fcos, seed=1, size=96, channels=64)  # other channels: projectors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = BridgeDistiller(student, teacher).train()
    images, targets = batch(sizes=((64, 80), (80, 64)))
    opt = torch.optim.SGD(d.parameters(), lr=0.01)
    sum(d(images, targets).values()).backward()
    opt.step()
    fresh = fcos(size=64, **keep_all)
    fresh.load_state_dict(d.student_state_dict(), strict=True)
    a, b = fresh.eval()(images), d.eval()(images)
    assert len(a) == len(b) == 2 and all(len(x["boxes"]) == 20 for x in a)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("boxes", "scores", "labels"))


# --- invariants ---------------------------------------------------------------------------------------------
def test_teacher_survives_train_to_float_and_requires_grad_on_the_whole_distiller():
    d = _tiny_distiller("fgd")
    teacher = d.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # BN buffers included
    images, targets, _, _ = tiny_batch(0, n=2)
    d.materialize(images, targets)
    opt = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9)
    for i, touch in enumerate([lambda m: m.train(), lambda m: m.to("cpu"), lambda m: m.float(),
                               lambda m: m.requires_grad_(True), lambda m: m.train(True).to(torch.float32)]):
        touch(d)
        assert not teacher.training and not any(m.training for m in teacher.modules())
        assert not any(p.requires_grad for p in teacher.parameters())
        opt.zero_grad()
        sum(d.train()(*tiny_batch(i, n=2)[:2]).values()).backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in d.parameters()}


def _hooks(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks}


def _tree(model):
    return [(n, id(m)) for n, m in model.named_modules()]


@pytest.mark.parametrize("where", ["lr", "teacher", "bridge"])
def test_everything_is_put_back_when_the_forward_raises(where):
    d = _tiny_distiller("mse")
    student, teacher = d.student, d.teacher
    images, targets, _, _ = tiny_batch(0, n=2)
    d.materialize(images, targets).train()
    tree, t_tree = _tree(student), _tree(teacher)
    body = student.backbone
    calls = []

    def boom(m, inputs, output):
        calls.append(1)
        # the head runs once per level: calls 1-3 are the LR pass, 4-6 the bridge pass
        if where == "teacher" or (where == "lr") == (len(calls) <= 3):
            raise RuntimeError("injected")

    handle = (teacher.neck if where == "teacher" else student.head).register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="injected"):
        d(images, targets)
    handle.remove()
    assert _hooks(student) == {} and _hooks(teacher) == {}
    assert _tree(student) == tree and _tree(teacher) == t_tree and student.backbone is body
    assert all(m.track_running_stats for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.is_grad_enabled()
    # A plain call behaves exactly like a fresh model with the same state.
    fresh = TinyDetector()
    fresh.load_state_dict(student.state_dict())
    torch.testing.assert_close(student(images, targets)["heat"], fresh(images, targets)["heat"], rtol=0, atol=0)


@pytest.mark.parametrize("where", ["lr", "teacher", "bridge"])
def test_torchvision_modules_and_roi_sampler_are_put_back_when_a_pass_raises(where):
    student, teacher = seeded(faster_rcnn, size=64), seeded(faster_rcnn, seed=1, size=96)
    d = BridgeDistiller(student, teacher, bridge_rois=16).train()
    body, transform, tree, t_tree = student.backbone.body, student.transform, _tree(student), _tree(teacher)
    seen = []

    def boom_student(m, args):
        seen.append(m.fg_bg_sampler.batch_size_per_image)
        if where != "teacher" and (where == "lr") == (len(seen) == 1):  # 1: LR pass; 2: bridge, knob at 16
            raise RuntimeError("injected")

    def boom_teacher(m, args):  # the teacher's neck, after the distiller's hooks on its transform and body ran
        raise RuntimeError("injected")

    handles = [student.roi_heads.register_forward_pre_hook(boom_student)]
    if where == "teacher":
        handles.append(teacher.backbone.fpn.register_forward_pre_hook(boom_teacher))
    images, targets = batch(sizes=((64, 64), (64, 64)))
    with pytest.raises(RuntimeError, match="injected"):
        d(images, targets)
    for h in handles:
        h.remove()
    assert seen == {"lr": [512], "teacher": [512], "bridge": [512, 16]}[where]
    assert student.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert student.backbone.body is body and student.transform is transform
    assert _tree(student) == tree and _tree(teacher) == t_tree
    assert _hooks(student) == {} and _hooks(teacher) == {}
    assert all(m.track_running_stats for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.is_grad_enabled() and not teacher.training
    # A plain call behaves exactly like a fresh model with the same state (same RNG for the samplers).
    fresh = faster_rcnn(size=64)
    fresh.load_state_dict(student.state_dict())
    torch.manual_seed(0)
    got = student(images, targets)
    torch.manual_seed(0)
    want = fresh.train()(images, targets)
    assert set(got) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_inplace_relu_after_a_torchvision_split_point():
    # torchvision's FPN reads the body's outputs directly; an in-place op there (a user's subclass or a
    # hook) would otherwise rewrite the LR features the bridge replays.
    student, teacher = seeded(retinanet, size=64), seeded(retinanet, seed=1, size=64)
    d = BridgeDistiller(student, teacher).train()
    images, targets = batch(sizes=((64, 64), (64, 64)))
    expected = d(images, targets)
    student.backbone.fpn.register_forward_pre_hook(lambda m, args: [x.mul_(0.5) for x in args[0].values()] and None)
    # Same geometry: the bridge replays the recorded features unchanged, so bridge losses must equal
    # a plain student forward with the same hook, not a doubly-halved one.
    got = d(images, targets)
    sum(got.values()).backward()  # autograd saved the recorded features in the LR pass: intact
    plain = student(images, targets)
    for k in plain:
        torch.testing.assert_close(got[f"bridge/{k}"], plain[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["bridge/classification"], expected["bridge/classification"])


def test_no_memory_growth_over_200_steps():
    d = _tiny_distiller("fgd")
    images = torch.rand(2, 3, 16, 16)
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 12.0, 14.0]])}] * 2
    d.materialize(images, targets).train()
    opt = torch.optim.SGD(d.parameters(), lr=1e-3)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() touches deprecated module attributes
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def train_step():
        opt.zero_grad()
        x = images.clone()
        out = d(x, targets)
        sum(out.values()).backward()
        opt.step()
        return weakref.ref(x), weakref.ref(out["distill/fgd"])

    for _ in range(5):
        train_step()
    base = live_tensors()
    refs = [train_step() for _ in range(200)]
    # Nothing the step touched outlives it: inputs, losses (and with them the graphs and features).
    assert all(r() is None for pair in refs for r in pair)
    assert live_tensors() <= base
    assert _hooks(d.student) == {} and _hooks(d.teacher) == {}
    # Besides parameters and buffers, no tensor is reachable from the distiller's attributes.
    def tensors_in(x, depth=0):
        if isinstance(x, torch.Tensor):
            return 1
        if depth > 4 or isinstance(x, nn.Module):
            return 0
        items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple, set)) else ()
        return sum(tensors_in(v, depth + 1) for v in items)

    held = {k: tensors_in(v) for k, v in vars(d).items() if k not in ("_parameters", "_buffers", "_modules")}
    assert sum(held.values()) == 0, held


def test_nonfinite_teacher_features_name_the_term_and_level():
    d = _tiny_distiller("mse").train()
    images, targets, _, _ = tiny_batch(0, n=2)
    d.materialize(images, targets)

    def poison(m, inputs, output):
        output["p1"] = output["p1"] * float("nan")
        return output

    d.teacher.neck.register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match=r"'distill/mse' is nan; non-finite at level\(s\) p1 \(stride 8\)"):
        d(images, targets)
    assert issubclass(NonFiniteError, LRDetError)
    d.check_finite = "off"  # off: the caller's own check sees the NaN; nothing is hidden
    assert torch.isnan(d(images, targets)["distill/mse"])

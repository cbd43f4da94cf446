"""examples/harness.py: the training loop, schedules and result files that the example scripts share."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("tqdm")
import torch  # noqa: E402
from tiny import load_example  # noqa: E402


@pytest.fixture(scope="module")
def harness():
    return load_example("harness")


def test_loss_log_holds_the_mean_of_each_window_and_of_the_last_partial_one(harness):
    w = torch.nn.Parameter(torch.zeros(()))
    module = torch.nn.Module()
    module.w = w

    def step(i):  # loss values i and 2 i, independent of the weight
        return {"a": w * 0 + i, "b": w * 0 + 2 * i}

    log = harness.train(module, step, iters=10, lr=0.1, desc="t", log_every=4, quiet=True)
    assert log == [{"iter": 4, "a": 1.5, "b": 3.0}, {"iter": 8, "a": 5.5, "b": 11.0}, {"iter": 10, "a": 8.5, "b": 17.0}]


def test_training_follows_adamw_with_warm_up_cosine_decay_and_clipping(harness):
    """Against a float64 loop written out by hand: AdamW (weight decay 1e-4), linear warm-up over a fifth of
    the iterations, cosine decay, gradient norm clipped at 10 (the gradients here are far larger)."""
    target = torch.tensor([30.0, -40.0, 50.0], dtype=torch.float64)

    def run(fn):
        torch.manual_seed(0)
        x = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        module = torch.nn.Module()
        module.x = x
        fn(module, lambda i: {"l": ((x - target) ** 2).sum() * (1 + i)})
        return x.detach()

    got = run(lambda m, step: harness.train(m, step, iters=10, lr=0.5, desc="t", quiet=True))

    def reference(module, step):
        x = module.x
        m, v, lr0, iters, warmup = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0.5, 10, 2
        for i in range(iters):
            decay = 0.5 * (1 + math.cos(math.pi * (i - warmup) / (iters - warmup)))
            lr = lr0 * ((i + 1) / warmup if i < warmup else decay)
            g = torch.autograd.grad(step(i)["l"], x)[0]
            g = g * min(1.0, 10.0 / (float(g.norm()) + 1e-6))
            with torch.no_grad():
                x.mul_(1 - lr * 1e-4)
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * g * g
                x.sub_(lr * (m / (1 - 0.9 ** (i + 1))) / ((v / (1 - 0.999 ** (i + 1))).sqrt() + 1e-8))

    want = run(reference)
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (got, want)


def test_a_non_finite_loss_stops_training_naming_the_iteration_and_terms(harness):
    w = torch.nn.Parameter(torch.ones(()))
    module = torch.nn.Module()
    module.w = w
    step = lambda i: {"lr/cls": w * 1.0, "distill/mse": w * (float("inf") if i == 3 else 1.0)}  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"probe: non-finite loss at iteration 3: .*'distill/mse': inf"):
        harness.train(module, step, iters=5, lr=0.1, desc="probe", quiet=True)
    with pytest.raises(ValueError, match="expected optim in .*'adamw', 'sgd'.*but got 'adam'"):
        harness.train(module, step, iters=5, lr=0.1, desc="probe", optim="adam", quiet=True)


def test_cosine_schedule_warms_up_then_decays_to_zero(harness):
    f = harness.cosine_lambda(warmup=10, iters=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)


def test_finish_writes_strict_json_then_refuses_a_non_finite_loss(harness, tmp_path, capsys):
    log = [{"iter": 2, "lr/cls": 1.0}]
    out = harness.finish(tmp_path, {"detector": "X", "val": {"AP": 0.5, "AP_S": float("nan")}}, log, t0=0.0)
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text) == {**out, "val": {"AP": 0.5, "AP_S": None}} and "NaN" not in text
    assert list(out) == ["detector", "val", "last_losses", "time_s"] and out["last_losses"] == log[-1]
    assert capsys.readouterr().out == '{"AP": 0.5, "AP_S": NaN}\n'  # stdout: the metrics as they are
    with pytest.raises(SystemExit, match="non-finite training loss"):
        harness.finish(tmp_path / "b", {"val": {}}, [{"iter": 2, "lr/cls": float("nan")}], t0=0.0)
    assert (tmp_path / "b" / "metrics.json").is_file()  # written first: what went wrong is on disk


def test_example_options_and_command_line(harness):
    args = harness.example_parser("Doc line.\nmore", "train_x").parse_args(["--quick"])
    assert (args.out, args.scale, args.alpha, args.threads, args.steps) == (Path("runs/train_x"), 0.5, 2e-5, 1, None)
    assert not hasattr(harness.example_parser("d", "m", scale=False).parse_args([]), "scale")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        steps, batch, g = harness.start(args, batch=8)
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())  # the models' initialisation
    finally:  # the rest of the session keeps its threads and random stream
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    assert (steps, batch) == (2, 2) and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    command = harness.command_line("/a/b/examples/x.py", ["--quick", "--out", "o"])
    assert command == "python examples/x.py --quick --out o"

"""The benchmark scripts run end to end in their smoke modes and write what they promise; the timing
method's arithmetic (interleaved pairs, noise flags, goals) is checked on made-up numbers; the CUDA
entry points degrade cleanly on a machine without a GPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_losses  # noqa: E402
import bench_step  # noqa: E402


def test_bench_losses_quick(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_losses.py"), "--quick", "--threads", "1",
                          "--out", str(tmp_path), "--tag", "smoke"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    rows = report["rows"]
    assert sorted(r["loss"] for r in rows) == ["cwd", "fgd", "l1", "mse"]
    assert report["meta"]["repeats"] == 3 and "interleaved" in report["meta"]["method"]
    for r in rows:
        # One copy-proxy time per pair, so the case and the proxy have the same number of samples.
        assert r["copy_min_ms"] <= r["copy_ms"] <= r["copy_max_ms"]
        assert r["x_copy_p25"] <= r["x_copy"] <= r["x_copy_p75"]
        # The bytes-moved arithmetic: MSE/L1/CWD (rows <= 4096 cells) 3 accesses, FGD 5, the proxy 3.
        assert r["bytes_bound"] == pytest.approx(5 / 3)
        if r["noise"]:
            assert r["pct_copy"] is None
        else:
            assert r["pct_copy"] == pytest.approx(100 * r["bytes_bound"] / r["x_copy"])
    # CPU: no Triton rows, so every goal is "not measured", never met or missed.
    assert len(report["goals"]) == 8 and {g["status"] for g in report["goals"]} == {"not measured"}
    md = (tmp_path / "smoke.md").read_text()
    assert md.count("| torch |") == 4 and "median of pairs" in md and "| not measured |" in md


def test_bench_losses_quick_writes_into_the_untracked_runs_folder(tmp_path, monkeypatch):
    # A smoke run must leave the checkout clean: not benchmarks/results/ (committed) but runs/ (ignored).
    # The script runs from a stand-in repository root, and stops at its first write.
    written = []

    class Stop(Exception):
        pass

    def record(out, stem, *args):
        written.append(Path(out) / stem)
        raise Stop

    monkeypatch.setattr(bench_losses, "ROOT", tmp_path)
    monkeypatch.setattr(bench_losses, "write_results", record)
    with pytest.raises(Stop):
        bench_losses.main(["--quick", "--losses", "mse"])
    assert written == [tmp_path / "runs" / "benchmarks" / "bench_cpu_quick"]
    assert not (tmp_path / "benchmarks").exists()
    assert bench_losses.default_out(False) == tmp_path / "benchmarks" / "results"  # a full run: committed
    # runs/ is ignored by the repository's own .gitignore.
    if (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "runs/benchmarks/bench_cpu_quick.json"], cwd=ROOT)
        assert ignored.returncode == 0


def test_time_pairs_interleaves_the_copy_proxy_with_the_case():
    calls = []

    def timer(fn, device, flush):
        fn()
        return 1.0

    case_ms, copy_ms = bench_losses.time_pairs(lambda: calls.append("case"), lambda: calls.append("copy"),
                                               torch.device("cpu"), warmup=1, repeats=4, flush=None, timer=timer)
    assert len(case_ms) == len(copy_ms) == 4
    timed = calls[2:]  # after one warm-up pair
    # Every pair is one copy and one case back to back, and the order within a pair alternates.
    assert [sorted(timed[i:i + 2]) for i in range(0, 8, 2)] == [["case", "copy"]] * 4
    assert timed[0] != timed[2]


def test_time_over_copy_is_the_median_of_per_pair_ratios():
    # Ratios 2, 4, 3: median 3. The ratio of the medians (4 / 1) would be 4.
    stats = bench_losses.pair_stats([2.0, 4.0, 6.0], [1.0, 1.0, 2.0])
    assert stats.x_copy == 3.0
    assert stats.x_copy_lo == 2.5 and stats.x_copy_hi == 3.5


def test_impossible_ratios_are_noise():
    noise = bench_losses.noise_reason
    assert noise(0.5, 1.0) is not None and "faster than the copy" in noise(0.5, 1.0)
    assert noise(0.85, 1.0) is not None  # under 0.9 x the bound
    assert noise(0.95, 1.0) is None and noise(1.2, 1.0) is None
    assert noise(1.4, 5 / 3) is not None and noise(1.6, 5 / 3) is None  # FGD's bound is 5/3
    assert noise(999.0, 1.0) is None and noise(5000.0, 1.0) is not None
    # The "1792% of copy" printed on a busy CPU is a ratio of bound / 17.92: noise.
    assert noise(1 / 17.92, 1.0) is not None


def _row(loss, backend, dtype, batch, pct, speedup, noise=None):
    return {"loss": loss, "backend": backend, "dtype": dtype, "batch": batch, "pct_copy": None if noise else pct,
            "speedup_vs_torch": None if noise else speedup, "noise": noise}


def test_goals_are_met_missed_or_not_measured_at_the_largest_batch():
    rows = [
        # mse: both dtypes meet both goals at N=16; a miss at N=2 does not count.
        _row("mse", "triton", "fp32", 16, 90.0, 3.5), _row("mse", "triton", "bf16", 16, 86.0, 3.1),
        _row("mse", "triton", "fp32", 2, 40.0, 1.1),
        # l1: bf16 misses the bandwidth goal.
        _row("l1", "triton", "fp32", 16, 90.0, 3.5), _row("l1", "triton", "bf16", 16, 80.0, 3.5),
        # cwd: the only Triton row is noise; eager rows do not count.
        _row("cwd", "triton", "fp32", 16, 0.0, 0.0, noise="noise: ..."), _row("cwd", "torch", "fp32", 16, 10.0, 1.0),
        # fgd: 70 % is enough for FGD's bandwidth goal, 9.9x misses its 10x speed-up goal.
        _row("fgd", "triton", "fp32", 8, 70.0, 9.9),
    ]
    goals = {(g.loss, g.kind): g for g in bench_losses.check_goals(rows)}
    assert len(goals) == 8
    assert goals["mse", "bandwidth"].status == "met" and goals["mse", "speed-up"].status == "met"
    assert "fp32 90%, bf16 86% (N=16)" == goals["mse", "bandwidth"].measured
    assert goals["l1", "bandwidth"].status == "missed" and goals["l1", "speed-up"].status == "met"
    assert goals["cwd", "bandwidth"].status == "not measured" and goals["cwd", "speed-up"].status == "not measured"
    assert goals["fgd", "bandwidth"].status == "met" and goals["fgd", "speed-up"].status == "missed"
    md = bench_losses.goals_markdown(bench_losses.check_goals(rows))
    assert "| l1 | bandwidth | >= 85% of copy | fp32 90%, bf16 80% (N=16) | missed |" in md


def test_bench_step_tiny_keeps_going_after_a_failure(tmp_path):
    # FCOS's head needs a multiple of 32 FPN channels: its three runs fail, RetinaNet's still run.
    dest = tmp_path / "step.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--models", "retinanet", "fcos",
                          "--raw", "128", "--lr-size", "64", "--hr-size", "128", "--channels", "16", "--repeats", "1",
                          "--warmup", "0", "--threads", "1", "--no-cost", "--out", str(dest)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "3 run(s) failed" in out.stderr
    report = json.loads(dest.read_text())
    parts = report["results"]["retinanet"]["lrdet"]["times_s"]
    assert set(parts) == {"step", "teacher_to_neck", "student_lr_forward", "bridge_forward", "distill_loss", "backward"}
    assert all(t > 0 for ts in parts.values() for t in ts)
    assert "fcos" not in report["results"] and len(report["failures"]) == 3
    md = (tmp_path / "step.md").read_text()
    assert "LRDet / sum of parts" in md and "peak MiB LR / HR / LRDet" in md and "FAILED fcos lr" in md


@pytest.mark.slow
def test_bench_step_quick_cost_table(tmp_path):
    dest = tmp_path / "quick.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--quick", "--out", str(dest)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(dest.read_text())
    assert report["meta"]["config"]["quick"] and set(report["results"]["retinanet"]) == {"lr", "hr", "lrdet"}
    cost = report["cost"]["retinanet"]
    arms = cost["arms"]
    assert list(arms) == list(bench_step.ARMS) and cost["cycle"] == 4 and cost["batch"] == 1
    assert cost["sizes"] == {"raw": 256, "lr": 128, "hr": 256}
    for name, r in arms.items():
        assert r["options"] == bench_step.ARMS[name] and len(r["step_s"]) == 1 and r["step_s"][0] > 0
        # the ratios are to the LR and the HR step of the same repeat
        assert r["x_lr"] == [r["step_s"][0] / arms["lr"]["step_s"][0]]
        assert r["x_hr"] == [r["step_s"][0] / arms["hr"]["step_s"][0]]
    md = (tmp_path / "quick.md").read_text()
    assert md.count("| retinanet (LR 128 / HR 256 px, batch 1) |") == len(arms)
    assert "distill_every=2, bridge_crop=0.25" in md
    # a quick run without --out writes outside the tracked results
    assert Path(bench_step.QUICK["out"]).parent == ROOT / "runs" and "/runs/" in (ROOT / ".gitignore").read_text()


def test_cost_table_ratios_and_rotation():
    names = list(bench_step.ARMS)
    orders = [bench_step.rotated(names, r) for r in range(len(names))]
    assert all(sorted(o) == sorted(names) for o in orders)
    for n in names:  # over as many repeats as arms, every arm takes every position once
        assert sorted(o.index(n) for o in orders) == list(range(len(names)))
    rows = {"lr": {"step_s": [1.0, 2.0, 4.0]}, "hr": {"step_s": [4.0, 4.0, 8.0]}, "every2": {"step_s": [2.0, 3.0, 6.0]}}
    bench_step.add_ratios(rows)
    assert rows["every2"]["x_lr"] == [2.0, 1.5, 1.5] and rows["every2"]["x_hr"] == [0.5, 0.75, 0.75]
    assert rows["lr"]["x_lr"] == [1.0] * 3 and rows["hr"]["x_lr"] == [4.0, 2.0, 2.0]
    assert bench_step.spread(rows["every2"]["x_lr"]) == "1.50 (1.50-2.00)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_run_cuda_sh_says_cuda_is_absent_and_stops(tmp_path):
    script = ROOT / "benchmarks" / "run_cuda.sh"
    assert os.access(script, os.X_OK), "run_cuda.sh must be executable"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "CUDA is not available" in out.stderr
    assert not list(tmp_path.iterdir()), "nothing is run, so nothing is written"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine `-m cuda` runs the tests instead")
def test_cuda_tests_are_collected_and_skipped_without_cuda():
    env = {k: v for k, v in os.environ.items() if k not in ("LRDET_NO_INTERPRET", "LRDET_CUDA_DRY_RUN")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-o", "addopts=", "-q",
                          "-rs", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    skipped = int(last.split(" skipped")[0].split()[-1])
    assert skipped >= 10 and "passed" not in last and "failed" not in last, last


def test_real_kernel_mode_does_not_collect_the_interpreter_tests():
    # Importing tests/test_kernels.py would switch the kernels to the interpreter for the whole process.
    # (A module named on the command line is collected all the same: pytest never ignores those.)
    def collected(extra_env):
        env = {**{k: v for k, v in os.environ.items() if k != "LRDET_NO_INTERPRET"}, **extra_env}
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-o", "addopts=", "-q",
                              "-p", "no:cacheprovider", "tests"], capture_output=True, text=True, timeout=300,
                             cwd=ROOT, env=env)
        return {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}

    default, real = collected({}), collected({"LRDET_NO_INTERPRET": "1"})
    assert {"tests/test_kernels.py", "tests/test_cuda.py"} <= default
    assert real == default - {"tests/test_kernels.py"}


def test_bytes_bound_keeps_the_bytes_moved_arithmetic():
    # RetinaNet P3-P7 at 800x1333, N=16, C=256, bf16: the table of docs/benchmarks.md.
    levels = bench_losses.RETINANET_800
    mb = {loss: bench_losses.min_bytes(loss, levels, 16, 256, torch.bfloat16) / 2**20 for loss in bench_losses.LOSSES}
    # 5 accesses per element for every loss (benchmarks/count_launches.py counts them)
    assert math.isclose(mb["mse"], 875.0, rel_tol=1e-3) and mb["l1"] == mb["mse"] == mb["cwd"] == mb["fgd"]
    assert bench_losses.bytes_bound("mse", levels, 16, 256, torch.bfloat16) == pytest.approx(5 / 3)
    assert bench_losses.bytes_bound("fgd", levels, 16, 256, torch.bfloat16) == pytest.approx(5 / 3)

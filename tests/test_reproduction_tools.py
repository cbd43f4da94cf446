"""The reproduction's machinery: resumable runs, paired contrasts, the SGD schedule and the bridge probe."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")
pytest.importorskip("tqdm")
from tiny import load_example  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def rd():
    return load_example("reproduce_deepforest")


@pytest.fixture(scope="module")
def harness(rd):
    import harness  # on the path while reproduce_deepforest was imported, which imports it
    return harness


@pytest.fixture(scope="module")
def dfd(rd):
    import deepforest_data
    try:
        deepforest_data.fetch_wheel()
    except deepforest_data.DataUnavailableError as e:
        pytest.skip(str(e))
    return deepforest_data


def _run(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(EXAMPLES / "reproduce_deepforest.py"), *args], capture_output=True,
                         text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def test_contrasts_are_paired_by_seed_with_their_standard_error(rd):
    def run(ap):
        return {"val": {"AP": ap}}
    results = {"runs": {"inherit": {"0": run(0.10), "1": run(0.20), "2": run(0.30), "3": run(0.5)},
                        "lrdet": {"0": run(0.11), "1": run(0.23), "2": run(0.29)}}}
    (c,) = [c for c in rd.contrasts(results) if (c["a"], c["b"]) == ("lrdet", "inherit")]
    diffs = [0.01, 0.03, -0.01]  # seed 3 ran for inherit only: not paired, left out
    m = sum(diffs) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / 2)
    assert c["n"] == 3 and c["positive"] == 2
    assert c["mean"] == pytest.approx(m) and c["std"] == pytest.approx(sd)
    assert c["se"] == pytest.approx(sd / math.sqrt(3))
    assert all(c["a"] in results["runs"] and c["b"] in results["runs"] for c in rd.contrasts(results))


def test_sgd_schedule_warms_up_then_steps_down_at_two_thirds_and_eight_ninths(harness):
    f = harness.step_lambda(warmup=10, iters=900)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(599) == 1.0 and f(600) == pytest.approx(0.1)
    assert f(799) == pytest.approx(0.1) and f(800) == pytest.approx(0.01) and f(899) == pytest.approx(0.01)


def test_runs_go_to_an_untracked_folder_by_default(rd):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert rd.DEFAULT_OUT == ROOT / "runs"
    res = subprocess.run(["git", "check-ignore", "-q", "runs/deepforest.json"], cwd=ROOT)
    assert res.returncode == 0, "runs/ must be ignored by git: the main job must not dirty the checkout"


@pytest.mark.slow
def test_a_rerun_skips_finished_runs_and_gives_the_same_results(dfd, tmp_path):
    args = ["--quick", "--out", str(tmp_path), "--no-plots", "--methods", "lr_baseline", "lrdet"]
    _run(*args)
    first = json.loads((tmp_path / "deepforest_quick.json").read_text())
    runs = sorted((tmp_path / "deepforest_quick.runs").glob("*.json"))
    assert [p.name.split(".")[0] for p in runs] == ["lr_baseline_seed0", "lrdet_seed0"]

    out = _run(*args)  # everything finished: nothing trains again
    assert "2 of 2 runs already finished" in out and "seed 0: val AP" not in out
    again = json.loads((tmp_path / "deepforest_quick.json").read_text())
    assert again["runs"] == first["runs"] and again["loss_logs"] == first["loss_logs"] and again["resumed_runs"] == 2

    runs[1].unlink()  # an interrupted invocation: only the missing run trains, to the same numbers
    out = _run(*args)
    assert "1 of 2 runs already finished" in out and "lrdet        seed 0" in out
    assert json.loads((tmp_path / "deepforest_quick.json").read_text())["runs"] == first["runs"]

    # other settings under the same name are other runs: trained anew, and the finished ones are kept
    _run(*args, "--optim", "sgd")
    assert len(list((tmp_path / "deepforest_quick.runs").glob("*.json"))) == 4


@pytest.mark.slow
def test_bridge_probe_identities_at_equal_resolution(rd, dfd):
    """At LR scale 1 the bridge replays the LR backbone features unchanged with the same targets, so its
    neck output is the upsampled LR neck and both detection gradients are the same vector (cosine 1)."""
    import torch

    bridge_probe = load_example("bridge_probe")
    torch.manual_seed(0)
    teacher = rd.build_fcos(dfd.TILE).eval().requires_grad_(False)
    crops = dfd.TrainCrops()
    g = torch.Generator().manual_seed(0)
    batches = [rd.make_batch(crops, 2, 1.0, g)]
    student = rd.build_fcos(dfd.TILE)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    m = bridge_probe.measure(student, teacher, batches)
    assert m["rel_err_bridge"] == pytest.approx(m["rel_err_upsample"], rel=1e-6) and m["rel_err_bridge"] > 0.1
    assert m["cos_head"] == pytest.approx(1.0, abs=1e-5) and m["cos_neck"] == pytest.approx(1.0, abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # weights and BN stats put back
    # at half resolution the bridge's neck sees upsampled features: the two no longer coincide
    g = torch.Generator().manual_seed(0)
    half = bridge_probe.measure(rd.build_fcos(128), teacher, [rd.make_batch(crops, 2, 0.5, g)])
    assert half["rel_err_bridge"] != pytest.approx(half["rel_err_upsample"], rel=1e-3)
    assert half["cos_head"] < 0.9999


def test_a_run_is_reused_only_with_the_same_teacher_weights(rd):
    import torch

    torch.manual_seed(0)
    a = rd.build_fcos(64)
    torch.manual_seed(0)
    b = rd.build_fcos(64)
    assert rd.state_sha(a) == rd.state_sha(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-7  # a teacher that differs in the last bits
    assert rd.state_sha(a) != rd.state_sha(b)
    cfg = dict(rd.PRESETS["powered"], teacher_lr=1e-3, teacher_seed=0, quick=False)
    assert rd.run_fingerprint({**cfg, "teacher_sha": rd.state_sha(a)}) != \
        rd.run_fingerprint({**cfg, "teacher_sha": rd.state_sha(b)})


def test_fingerprints_and_teacher_cache_keys_do_not_move(rd):
    """Finished runs and cached teachers are reused by these strings: a change of the code that computes them
    would silently train everything again (or, worse, mix runs of other settings). The values are those of the
    published powered runs (examples/results/deepforest_powered.runs) and of the other presets, with a fixed
    stand-in teacher hash."""
    def cfg(preset):
        c = dict(rd.PRESETS[preset])
        c.setdefault("optim", "adamw")
        c.setdefault("held_out_rows", 512)
        c.setdefault("teacher_lr", c["lr"])
        c.update(preset=preset, teacher_seed=0, quick=preset == "quick", teacher_sha="0123456789ab")
        return c

    expected = {"powered": ("74536cae18b6", "b024887082"), "powered_terms": ("74536cae18b6", "b024887082"),
                "powered_sgd": ("de650ce0ea8b", "b024887082"), "default": ("d2123bb3465b", "d7e372b629"),
                "full": ("62049c83ded4", "d9f234d635"), "quick": ("00b0b86811f8", "4dec3b755a")}
    for preset, (fingerprint, teacher_tag) in expected.items():
        assert (rd.run_fingerprint(cfg(preset)), rd.teacher_tag(cfg(preset))) == (fingerprint, teacher_tag), preset
    # the published powered runs' file names carry the fingerprint with the real teacher's weights hash
    runs = ROOT / "examples" / "results" / "deepforest_powered.runs"
    if runs.is_dir():
        assert {p.name.split(".")[1] for p in runs.glob("*.json")} == {"6296fb76fdd7"}
        assert rd.run_fingerprint({**cfg("powered"), "teacher_sha": "345dde695286"}) == "6296fb76fdd7"


def test_bridge_probe_replot_takes_the_contrasts_of_the_given_results(rd, tmp_path):
    """--replot measures nothing: it keeps the measurements and puts each given results file's paired
    contrasts under its LR scale, as the reproduction itself computes them."""
    bridge_probe = load_example("bridge_probe")
    m = {"rel_err_bridge": 0.4, "rel_err_upsample": 0.5, "cos_head": -0.1, "cos_neck": 0.2}
    saved = {"config": {"preset": "powered"}, "scales": {"0.5": {"init": m, "trained": m}}, "contrasts": {}}
    (tmp_path / "bridge_probe.json").write_text(json.dumps(saved))
    full = EXAMPLES / "results" / "deepforest_full.json"
    res = bridge_probe.main(["--replot", "--out", str(tmp_path), "--results", str(full)])
    expected = {f"{c['a']}-{c['b']}": c["mean"] for c in rd.contrasts(json.loads(full.read_text()))}
    got = json.loads((tmp_path / "bridge_probe.json").read_text())
    assert got["scales"] == saved["scales"] and res["scales"] == saved["scales"]
    assert {k: v["mean"] for k, v in got["contrasts"]["0.5"].items()} == pytest.approx(expected)
    assert "lrdet-inherit" in expected and (tmp_path / "bridge_probe.png").stat().st_size > 0


def test_result_markdown_reports_the_runs_summed_training_time_not_a_resumed_wall_time(rd):
    # A preset whose runs were all reused by the last invocation has a wall time of seconds; the file must
    # quote what the runs took (their summed training time), the teacher's time apart.
    results = json.loads((EXAMPLES / "results" / "deepforest_powered.json").read_text())
    summed = sum(v for k, v in results["timings_s"].items() if k != "hr_teacher")
    assert results["resumed_runs"] and results["wall_time_s"] < 60 < summed
    head = rd.markdown(results, results["summary"]).splitlines()[3]
    assert f"training time {summed / 3600:.1f} h summed over the runs" in head
    assert "wall time" not in head and f"reused {results['resumed_runs']} finished runs" in head
    fresh = {**{k: v for k, v in results.items() if k != "training_time_s"}, "resumed_runs": 0, "wall_time_s": 1500.0,
             "timings_s": {"hr_teacher": 600.0, "lrdet/0": 1000.0, "inherit/0": 800.0}}
    head = rd.markdown(fresh, results["summary"]).splitlines()[3]
    assert "training time 30.0 min summed over the runs" in head and "wall time 25.0 min" in head


def test_cheap_presets_are_lrdet_with_the_cost_options(rd, monkeypatch):
    methods = rd.PRESETS["powered_sgd"]["methods"]
    # the finished runs keep their methods and order; the cheap presets come after them
    assert methods == ["lr_baseline", "fitnet_up", "bridge", "inherit", "lrdet", "lrdet_auto", "lrdet_every2",
                       "lrdet_every4", "lrdet_crop25", "lrdet_every2_crop25"]
    for m in methods[6:]:
        assert m in rd.ALL_METHODS and m in rd.LABELS
        assert ("lrdet", m) in rd.CONTRASTS and (m, "inherit") in rd.CONTRASTS
    import lrdet_core

    class Built(Exception):
        pass

    def fake(student, teacher, **kw):
        raise Built(kw)
    monkeypatch.setattr(lrdet_core, "BridgeDistiller", fake)
    cfg = dict(rd.PRESETS["powered_sgd"])
    want = {"lrdet": {}, "lrdet_every2": {"distill_every": 2}, "lrdet_every4": {"distill_every": 4},
            "lrdet_crop25": {"bridge_crop": 0.25}, "lrdet_every2_crop25": {"distill_every": 2, "bridge_crop": 0.25}}
    for method, options in want.items():
        with pytest.raises(Built) as e:
            rd.run_student(method, 0, cfg, None, None)
        kw = e.value.args[0]
        assert {k: kw[k] for k in ("distill_every", "bridge_crop") if k in kw} == options
        assert kw["inherit"] and kw["bridge"] and kw["alpha"] == cfg["alpha"] and kw["loss"] == "mse"


def _bench(models):
    """A bench_step report with a cost table (the fields plot_cost reads)."""
    arms = {"lr": [1.0, 1.0, 1.0], "upsample": [1.7, 1.8, 1.6], "lrdet": [3.9, 4.1, 4.0], "every2": [2.4, 2.6, 2.5]}
    return {"meta": {"commit": "abc", "device": "cpu", "threads": 1},
            "cost": {m: {"cycle": 4, "arms": {a: {"x_lr": x} for a, x in arms.items()}} for m in models}}


def test_plot_cost_places_each_arm_at_its_cost_with_paired_standard_errors(tmp_path):
    pc = load_example("plot_cost")
    ap = {"lrdet": [0.30, 0.32, 0.31], "lrdet_every2": [0.29, 0.33, 0.30], "inherit": [0.28, 0.30, 0.29],
          "hr_teacher": [0.5], "lrdet_l1": [0.2, 0.2, 0.2]}
    results = {"config": {"iters": 1000, "preset": "test", "command": "x"},
               "runs": {m: {str(s): {"val": {"AP": v}} for s, v in enumerate(vs)} for m, vs in ap.items()}}
    pts = {p.method: p for p in pc.points(results, pc.step_costs(_bench(["retinanet", "deepforest"])))}
    assert set(pts) == {"lrdet", "lrdet_every2", "inherit"}  # no cost arm: the teacher and the L1 loss
    e2 = pts["lrdet_every2"]
    assert (e2.x_lr, e2.cost, e2.n) == (2.5, 2500.0, 3) and pts["inherit"].cost == 1000.0
    assert pts["lrdet"].cost == 4000.0 and pts["lrdet"].vs_lrdet is None
    assert e2.ap == pytest.approx(0.92 / 3) and e2.se == pytest.approx(math.sqrt(13 / 3) / 100 / math.sqrt(3))
    # paired: differences -0.01, +0.01, -0.01 on seeds 0, 1, 2
    assert e2.vs_lrdet == pytest.approx(-0.01 / 3) and e2.vs_lrdet_se == pytest.approx(0.02 / 3)
    # the deepforest costs are preferred; another model only when named or alone
    assert pc.step_costs(_bench(["retinanet"]))["every2"] == 2.5
    with pytest.raises(SystemExit, match="no cost table for model 'fcos'"):
        pc.step_costs(_bench(["retinanet"]), "fcos")
    res, bench = tmp_path / "r.json", tmp_path / "b.json"
    res.write_text(json.dumps(results))
    bench.write_text(json.dumps(_bench(["deepforest"])))
    pc.main(["--results", str(res), "--bench", str(bench)])
    assert (tmp_path / "r_cost.png").stat().st_size > 0
    md = (tmp_path / "r_cost.md").read_text()
    assert "| LRDet, every 2nd step | 2.50 | 2500 | 0.3067 ± 0.0120 | 3 | -0.0033 ± 0.0067 |" in md

"""Held-out AP against training cost in LR steps: the reproduction's arms and the cheap presets in one figure.

Cost: the arm's step cost relative to an LR step, from ``benchmarks/bench_step.py``'s cost table (the median over
its repeats of the per-repeat ratio), times the number of student iterations. LR baseline and inherit train at
1x; the bridge costs what LRDet costs (inheriting is an initialisation); upsample distillation is the bench's
``upsample`` arm.

Error bars:

* left panel, mean held-out AP: the standard error of the per-seed values (std / sqrt(n));
* right panel, arm minus LRDet on the same seed: the standard error of the paired differences. The seeds share
  the data order and the initialisation, so this is the one that says whether a preset is within a margin of
  LRDet (the dashed line: LRDet - preset = 0.003 AP).

Usage::

    python examples/plot_cost.py   # examples/results/deepforest_powered_sgd.json, benchmarks/results/bench_step.json
    python examples/plot_cost.py --results runs/deepforest_quick.json --bench runs/bench_step_quick.json \
        --model retinanet

Writes ``<results stem>_cost.png`` and ``<results stem>_cost.md`` (the numbers behind the figure) next to the
results file, or to ``--out`` (a ``.png`` path; the ``.md`` goes beside it).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: Which bench_step cost arm each reproduction method trains at.
METHOD_ARM = {"lr_baseline": "lr", "inherit": "lr", "fitnet_up": "upsample", "bridge": "lrdet", "lrdet": "lrdet",
              "lrdet_auto": "lrdet", "lrdet_every2": "every2", "lrdet_every4": "every4", "lrdet_crop25": "crop25",
              "lrdet_every2_crop25": "every2_crop25"}
#: LRDet - preset at most this (held-out AP, paired): the goal a cheap preset is held to.
GOAL = 0.003


class Point(NamedTuple):
    """One arm of the figure."""

    method: str
    x_lr: float            # step cost / LR step
    cost: float            # training cost in LR steps: x_lr * iterations
    ap: float              # mean held-out AP over the seeds
    se: float              # standard error of the per-seed APs
    n: int                 # seeds
    vs_lrdet: Optional[float]     # mean of (AP - AP of LRDet) over the paired seeds; None for LRDet itself
    vs_lrdet_se: Optional[float]  # its standard error


def _mean_se(xs: Sequence[float]):
    m = sum(xs) / len(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return m, sd / math.sqrt(len(xs))


def step_costs(bench: Dict, model: Optional[str] = None) -> Dict[str, float]:
    """The median ``x LR`` of every cost arm of ``model`` (default: ``deepforest`` if measured, else the first)."""
    cost = bench.get("cost") or {}
    if not cost:
        raise SystemExit("the bench_step results hold no cost table (run benchmarks/bench_step.py without --no-cost)")
    model = model or ("deepforest" if "deepforest" in cost else next(iter(cost)))
    if model not in cost:
        raise SystemExit(f"no cost table for model {model!r} in the bench_step results; measured: {sorted(cost)}")
    return {arm: statistics.median(r["x_lr"]) for arm, r in cost[model]["arms"].items() if "x_lr" in r}


def points(results: Dict, costs: Dict[str, float], split: str = "val", metric: str = "AP") -> List[Point]:
    """One :class:`Point` per method of ``results`` whose arm has a measured cost."""
    runs, iters = results["runs"], results["config"]["iters"]
    ref = runs.get("lrdet", {})
    out = []
    for method, per_seed in runs.items():
        arm = METHOD_ARM.get(method)
        if arm is None or arm not in costs:
            continue
        vals = [r[split][metric] for r in per_seed.values() if r[split][metric] is not None]
        ap, se = _mean_se(vals)
        diff = diff_se = None
        if method != "lrdet" and ref:
            d = [r[split][metric] - ref[s][split][metric] for s, r in per_seed.items() if s in ref]
            if d:
                diff, diff_se = _mean_se(d)
        out.append(Point(method, costs[arm], costs[arm] * iters, ap, se, len(vals), diff, diff_se))
    return out


def markdown(pts: Sequence[Point], results: Dict, bench: Dict, model: str, labels: Dict[str, str]) -> str:
    cfg = results["config"]
    lines = [f"# Held-out AP against training cost (preset `{cfg.get('preset')}`, {cfg['iters']} iterations)", "",
             f"Costs: `bench_step.py` cost table of model `{model}` (commit {bench['meta'].get('commit')}, "
             f"{bench['meta'].get('device')}, {bench['meta'].get('threads')} threads); AP: `{cfg.get('command')}`.",
             "AP ± SE of the per-seed values; arm − LRDet ± SE of the paired differences over the seeds.", "",
             "| arm | step x LR | cost (LR steps) | AP ± SE | seeds | arm − LRDet ± SE (paired) |",
             "|---|---|---|---|---|---|"]
    for p in sorted(pts, key=lambda p: p.cost):
        d = "" if p.vs_lrdet is None else f"{p.vs_lrdet:+.4f} ± {p.vs_lrdet_se:.4f}"
        lines.append(f"| {labels.get(p.method, p.method)} | {p.x_lr:.2f} | {p.cost:.0f} | {p.ap:.4f} ± {p.se:.4f} | "
                     f"{p.n} | {d} |")
    return "\n".join(lines)


def plot(pts: Sequence[Point], path: Path, title: str, labels: Dict[str, str], iters: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    cheap = {m for m in METHOD_ARM if m.startswith("lrdet_") and m != "lrdet_auto"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(pts):  # one colour per arm in both panels; squares: the cheap presets
        style = dict(marker="s" if p.method in cheap else "o", capsize=3, ms=6, color=colours[i % len(colours)])
        ax.errorbar(p.cost, p.ap, yerr=p.se, **style)
        ax.annotate(labels.get(p.method, p.method), (p.cost, p.ap), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
        if p.vs_lrdet is not None:
            bx.errorbar(p.cost, p.vs_lrdet, yerr=p.vs_lrdet_se, **style)
            bx.annotate(labels.get(p.method, p.method), (p.cost, p.vs_lrdet), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
    ax.set_ylabel("held-out AP (mean ± SE over seeds)")
    bx.set_ylabel("AP − AP of LRDet, same seed (mean ± paired SE)")
    bx.axhline(0.0, color="k", lw=0.8)
    bx.axhline(-GOAL, color="k", lw=0.8, ls="--", label=f"LRDet − arm = {GOAL}")
    for a in (ax, bx):
        a.axvline(2 * iters, color="grey", lw=0.8, ls=":", label="2x the LR training cost")
        a.set_xlabel("training cost (LR steps: step cost / LR step x iterations)")
    bx.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _labels() -> Dict[str, str]:
    try:
        import sys
        sys.path.insert(0, str(HERE))
        from reproduce_deepforest import LABELS
        return dict(LABELS)
    except ImportError:  # the reproduction's own dependencies are missing: plain method names
        return {}


def main(argv: Optional[Sequence[str]] = None) -> List[Point]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results" / "deepforest_powered_sgd.json")
    p.add_argument("--bench", type=Path, default=REPO / "benchmarks" / "results" / "bench_step.json")
    p.add_argument("--model", help="the bench_step model whose costs apply (default: deepforest, else the first)")
    p.add_argument("--split", default="val", choices=["val", "cross_site"])
    p.add_argument("--out", type=Path, help="the figure's path (default: <results stem>_cost.png beside it)")
    args = p.parse_args(argv)
    results, bench = json.loads(args.results.read_text()), json.loads(args.bench.read_text())
    costs = step_costs(bench, args.model)
    model = args.model or ("deepforest" if "deepforest" in bench["cost"] else next(iter(bench["cost"])))
    pts = points(results, costs, args.split)
    if not pts:
        raise SystemExit(f"no method of {args.results} has a cost arm in {args.bench} ({sorted(costs)})")
    labels = _labels()
    out = args.out or args.results.with_name(args.results.stem + "_cost.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    iters = results["config"]["iters"]
    plot(pts, out, f"{args.split} AP against training cost, preset {results['config'].get('preset')} "
         f"({pts[0].n} seeds; costs of {model})", labels, iters)
    md = markdown(pts, results, bench, model, labels)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return pts


if __name__ == "__main__":
    main()

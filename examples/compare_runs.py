"""Paired comparison of methods across reproduction result files (same seeds => same data order and init).

    python examples/compare_runs.py examples/results/deepforest.json examples/results/deepforest_losses.json
    python examples/compare_runs.py examples/results/deepforest_powered.json \
        examples/results/deepforest_powered_terms.json --contrast lrdet_fd_only inherit

Prints a markdown table: mean ± std of held-out AP per method and the paired difference to the LR
baseline and to LRDet (MSE), seed by seed. Each ``--contrast A B`` adds a row ``A − B`` to a second
table: mean ± standard error over the seeds both ran, and how many are positive. Only files with
identical settings (apart from the methods) may be combined; the script checks that.
"""
import argparse
import json
import statistics
import sys

KEYS = ("scale", "teacher_iters", "iters", "batch", "lr", "teacher_seed")


def paired(runs, a, b, split="val", metric="AP"):
    """``a - b`` seed by seed over the seeds both methods ran, in ``a``'s seed order (same seed: same data
    order and initialisation)."""
    return [r[split][metric] - runs[b][s][split][metric] for s, r in runs[a].items() if s in runs[b]]


def mean_se(diffs):
    """Mean and standard error of paired differences (SE NaN for one seed)."""
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se


def main(paths, pairs=()):
    runs, config = {}, None
    for p in paths:
        d = json.load(open(p))
        c = {k: d["config"][k] for k in KEYS}
        if config is not None and c != config:
            sys.exit(f"{p} was run with other settings: {c} vs {config}")
        config = c
        runs.update(d["runs"])

    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"

    def ap(m, split="val"):
        return {s: r[split]["AP"] for s, r in runs[m].items()}

    print(f"settings: {config}\n")
    print("| method | n | held-out AP | Δ vs LR baseline (paired) | Δ vs LRDet-MSE (paired) | cross-site AP |")
    print("|---|---|---|---|---|---|")
    base, mse = (ap(m) if m in runs else {} for m in ("lr_baseline", "lrdet"))
    for m in runs:
        if m == "hr_teacher":
            continue
        a = ap(m)
        d_base = [a[s] - base[s] for s in a if s in base]
        d_mse = [a[s] - mse[s] for s in a if s in mse]
        print(f"| {m} | {len(a)} | {ms(list(a.values()))} | {ms(d_base) if d_base and m != 'lr_baseline' else ''} | "
              f"{ms(d_mse) if d_mse and m != 'lrdet' else ''} | {ms(list(ap(m, 'cross_site').values()))} |")
    if pairs:
        print("\n| contrast (held-out AP) | mean ± SE | seeds > 0 |\n|---|---|---|")
    for a_name, b_name in pairs:
        missing = [m for m in (a_name, b_name) if m not in runs]
        if missing:
            sys.exit(f"--contrast {a_name} {b_name}: no runs of {missing} in {paths}; methods: {sorted(runs)}")
        diffs = paired(runs, a_name, b_name)
        mean, se = mean_se(diffs)
        print(f"| {a_name} − {b_name} | {mean:+.4f} ± {se:.4f} | {sum(d > 0 for d in diffs)}/{len(diffs)} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="result files (examples/results/*.json)")
    parser.add_argument("--contrast", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="also print the paired contrast A - B (repeatable)")
    args = parser.parse_args()
    main(args.paths, [tuple(p) for p in args.contrast])

"""Paired comparison of methods across reproduction result files (same seeds => same data order and init).

    python examples/compare_runs.py examples/results/deepforest.json examples/results/deepforest_losses.json

Prints a markdown table: mean ± std of held-out AP per method and the paired difference to the LR
baseline and to LRDet (MSE), seed by seed. Only files with identical settings (apart from the
methods) may be combined; the script checks that.
"""
import json
import statistics
import sys

KEYS = ("scale", "teacher_iters", "iters", "batch", "lr", "teacher_seed")


def main(paths):
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
    base, mse = ap("lr_baseline"), ap("lrdet")
    for m in runs:
        if m == "hr_teacher":
            continue
        a = ap(m)
        d_base = [a[s] - base[s] for s in a if s in base]
        d_mse = [a[s] - mse[s] for s in a if s in mse]
        print(f"| {m} | {len(a)} | {ms(list(a.values()))} | {ms(d_base) if m != 'lr_baseline' else ''} | "
              f"{ms(d_mse) if m != 'lrdet' else ''} | {ms(list(ap(m, 'cross_site').values()))} |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""What the bridge buys against the resolution gap: LRDet's mechanism, measured on the DeepForest data.

For each LR scale (0.25, 0.5, 0.75 by default), with the HR teacher of a reproduction preset, this measures
on fixed batches of training crops (their LR and HR views):

* ``rel_err_bridge``: ``||S - T|| / ||T||`` between the bridge's neck outputs ``S`` (the student's LR backbone
  features resampled to the teacher's sizes, through the student's own neck) and the teacher's HR neck
  outputs ``T``, over the matched levels; what LRDet distills;
* ``rel_err_upsample``: the same for the LR neck outputs resampled to the teacher's sizes, what upsample
  distillation (Fitnet/Up, ``bridge=False``) distills;
* ``cos_head`` / ``cos_neck``: the cosine between the gradients of ``L_det(LR)`` and of the bridge's
  ``L_det(HR)`` on the shared head / neck parameters (negative: the two detection losses pull them apart);

each at the inherited initialisation (the student a copy of the teacher where shapes match) and after
``--iters`` iterations of LRDet training at that scale. Writes ``bridge_probe.{json,md,png}``.

Usage::

    python examples/bridge_probe.py                       # ~25 min on one CPU core, powered-preset teacher
    python examples/bridge_probe.py --quick --out /tmp/p  # smoke test
    python examples/bridge_probe.py --replot --out examples/results --results \
        examples/results/deepforest_x025.json examples/results/deepforest_full.json \
        examples/results/deepforest_powered.json             # redraw with finished reproductions
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepforest_data as dfd  # noqa: E402
import harness  # noqa: E402
import reproduce_deepforest as rd  # noqa: E402


class _Recorder:
    """A distillation 'loss' that records ``sum ||S - T||^2`` and ``sum ||T||^2`` and returns 0."""

    def __init__(self):
        self.err, self.ref = 0.0, 0.0

    def __call__(self, student: List[Tensor], teacher: List[Tensor], ctx) -> Tensor:
        for s, t in zip(student, teacher):
            self.err += float((s.detach().double() - t.double()).pow(2).sum())
            self.ref += float(t.double().pow(2).sum())
        return student[0].sum() * 0.0

    @property
    def rel(self) -> float:
        return math.sqrt(self.err / self.ref) if self.ref else float("nan")


def _flat_grad(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def _cos(a: Tensor, b: Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def measure(student: nn.Module, teacher: nn.Module, batches: List[tuple]) -> Dict[str, float]:
    """The four mechanism numbers for ``student`` on ``batches``; the student's weights and buffers are put back."""
    from lrdet_core import BridgeDistiller

    state = {k: v.clone() for k, v in student.state_dict().items()}
    rec_b, rec_u = _Recorder(), _Recorder()
    d_b = BridgeDistiller(student, teacher, loss=rec_b, alpha=1.0)
    d_u = BridgeDistiller(student, teacher, loss=rec_u, alpha=1.0, bridge=False)
    head = [p for p in student.head.parameters() if p.requires_grad]
    neck = [p for p in student.backbone.fpn.parameters() if p.requires_grad]
    g_lr_h = g_hr_h = g_lr_n = g_hr_n = None
    try:
        for lr, lr_t, hr, hr_t in batches:
            out = d_b.train()(lr, lr_t, hr_images=hr, hr_targets=hr_t)
            l_lr = sum(v for k, v in out.items() if k.startswith("lr/"))
            l_hr = sum(v for k, v in out.items() if k.startswith("bridge/"))
            parts = [_flat_grad(l_lr, head), _flat_grad(l_hr, head), _flat_grad(l_lr, neck), _flat_grad(l_hr, neck)]
            if g_lr_h is None:
                g_lr_h, g_hr_h, g_lr_n, g_hr_n = parts
            else:
                g_lr_h, g_hr_h, g_lr_n, g_hr_n = (a + b for a, b in zip((g_lr_h, g_hr_h, g_lr_n, g_hr_n), parts))
            with torch.no_grad():
                d_u.train()(lr, lr_t, hr_images=hr, hr_targets=hr_t)
    finally:
        student.load_state_dict(state)
    return {"rel_err_bridge": rec_b.rel, "rel_err_upsample": rec_u.rel, "cos_head": _cos(g_lr_h, g_hr_h),
            "cos_neck": _cos(g_lr_n, g_hr_n)}


def probe_scale(scale: float, teacher: nn.Module, crops: dfd.TrainCrops, iters: int, batch: int, n_batches: int,
                lr: float, alpha: float, seed: int = 0) -> Dict[str, Dict[str, float]]:
    from lrdet_core import BridgeDistiller, inherit_weights

    g_probe = torch.Generator().manual_seed(123)  # the same crops at every scale
    batches = [rd.make_batch(crops, batch, scale, g_probe) for _ in range(n_batches)]
    harness.seed_all(seed)
    student = rd.build_fcos(round(dfd.TILE * scale))
    inherit_weights(student, teacher)
    out = {"init": measure(student, teacher, batches)}
    if iters:
        g = harness.seed_all(seed)
        d = BridgeDistiller(student, teacher, alpha=alpha)

        def step(i):
            lr_, lr_t, hr, hr_t = rd.make_batch(crops, batch, scale, g)
            return d(lr_, lr_t, hr_images=hr, hr_targets=hr_t)

        harness.train(d, step, iters, lr, f"LRDet at {scale}x")
        out["trained"] = measure(student, teacher, batches)
    return out


def plot(res: Dict, path: Path, contrasts: Dict[float, Dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(float(s) for s in res["scales"])
    n = 3 if contrasts else 2
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.6))
    for when, ls in (("init", "--"), ("trained", "-")):
        if when not in res["scales"][str(scales[0])]:
            continue
        get = lambda k: [res["scales"][str(s)][when][k] for s in scales]  # noqa: E731
        axes[0].plot(scales, get("rel_err_upsample"), "o" + ls, color="#4c72b0", label=f"upsample LR neck ({when})")
        axes[0].plot(scales, get("rel_err_bridge"), "o" + ls, color="#dd8452", label=f"bridge neck ({when})")
        axes[1].plot(scales, get("cos_head"), "o" + ls, color="#55a868", label=f"head ({when})")
        axes[1].plot(scales, get("cos_neck"), "s" + ls, color="#c44e52", label=f"neck ({when})")
    axes[0].set_ylabel("||S - T|| / ||T|| to the HR teacher")
    axes[0].set_title("what is distilled: error to the teacher", fontsize=9)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set_ylabel("cos(grad L_det(LR), grad L_det(HR))")
    axes[1].set_title("do the two detection losses agree?", fontsize=9)
    if contrasts:
        xs = sorted(contrasts)
        for key, color, label in (("lrdet-inherit", "#dd8452", "LRDet − inherit"),
                                  ("bridge-lr_baseline", "#4c72b0", "bridge − baseline"),
                                  ("bridge-fitnet_up", "#8172b2", "bridge − upsample")):
            pts = [(x, contrasts[x][key]) for x in xs if key in contrasts[x]]
            if pts:
                axes[2].errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["se"] for p in pts],
                                 fmt="o-", color=color, capsize=3, label=label)
        axes[2].axhline(0, color="k", lw=0.5)
        axes[2].set_ylabel("held-out ΔAP (paired, ± SE)")
        axes[2].set_title("what it buys (reproduction runs)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("LR scale (1 = the teacher's resolution)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_contrasts(paths: Sequence[Path]) -> Dict[float, Dict]:
    """ΔAP contrasts per LR scale from reproduction result files (the later file wins for a scale)."""
    out: Dict[float, Dict] = {}
    for p in paths:
        res = json.loads(Path(p).read_text())
        scale = float(res["config"]["scale"])
        runs = {k: {s: {sp: {m: (float("nan") if v is None else v) for m, v in r.items()} for sp, r in rr.items()}
                    for s, rr in per.items()} for k, per in res["runs"].items()}
        for c in rd.contrasts({"runs": runs}):
            out.setdefault(scale, {})[f"{c['a']}-{c['b']}"] = {**c, "source": str(p)}
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--preset", default="powered", choices=list(rd.PRESETS), help="whose HR teacher to use")
    p.add_argument("--iters", type=int, default=300, help="LRDet iterations before the 'trained' measurement")
    p.add_argument("--batches", type=int, default=4, help="probe batches of 8 crops")
    p.add_argument("--results", type=Path, nargs="*", default=[],
                   help="reproduction result JSONs whose paired ΔAP contrasts go into the plot's third panel")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny teacher, 2 iterations, 1 batch")
    p.add_argument("--replot", action="store_true",
                   help="measure nothing: redraw <out>/<name>.png from <out>/<name>.json with the contrasts of "
                        "--results (e.g. once a reproduction has finished)")
    p.add_argument("--out", type=Path, default=harness.DEFAULT_OUT)
    p.add_argument("--name", default="bridge_probe")
    harness.add_cache(p)
    harness.add_threads(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replot:
        res = json.loads((args.out / f"{args.name}.json").read_text())
        res["contrasts"] = {str(k): v for k, v in load_contrasts(args.results).items()}
        res["replot_command"] = harness.command_line(__file__, argv)
        harness.write_json(args.out / f"{args.name}.json", res)
        plot(res, args.out / f"{args.name}.png", {float(k): v for k, v in res["contrasts"].items()})
        return res

    cfg = dict(rd.PRESETS["quick" if args.quick else args.preset])
    cfg.setdefault("teacher_lr", cfg["lr"])
    cfg.setdefault("held_out_rows", dfd.HELD_OUT_ROWS)
    cfg["teacher_seed"] = 0
    iters, n_batches = (2, 1) if args.quick else (args.iters, args.batches)
    crops = dfd.TrainCrops(cache_dir=str(args.cache), held_out_rows=cfg["held_out_rows"])
    t0 = time.time()
    teacher, _, cached = rd.train_teacher(cfg, crops, None if args.quick else args.cache)
    teacher.requires_grad_(False).eval()
    res = {"config": {"preset": "quick" if args.quick else args.preset, "teacher": rd.teacher_key(cfg),
                      "iters": iters, "batches": n_batches, "batch": cfg["batch"], "lr": cfg["lr"],
                      "alpha": cfg["alpha"], "command": harness.command_line(__file__, argv)},
           "scales": {}}
    for s in args.scales:
        res["scales"][str(s)] = probe_scale(s, teacher, crops, iters, cfg["batch"], n_batches, cfg["lr"], cfg["alpha"])
        print(f"scale {s}: {json.dumps(res['scales'][str(s)])}", flush=True)
    res["contrasts"] = {str(k): v for k, v in load_contrasts(args.results).items()}
    res["wall_time_s"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.out / f"{args.name}.json", res)
    lines = ["# The bridge's mechanism against the resolution gap", "", f"Command: `{res['config']['command']}`  ",
             f"Teacher: {res['config']['teacher']}; probe: {n_batches} batches of {cfg['batch']} training crops; "
             f"'trained' = after {iters} LRDet iterations (AdamW lr {cfg['lr']}, alpha {cfg['alpha']}), seed 0; "
             f"{res['wall_time_s'] / 60:.1f} min.", "",
             "| LR scale | when | rel. error, bridge neck | rel. error, upsampled LR neck | cos(∇LR, ∇HR) head | "
             "cos(∇LR, ∇HR) neck |", "|---|---|---|---|---|---|"]
    for s, r in res["scales"].items():
        for when, m in r.items():
            lines.append(f"| {s} | {when} | {m['rel_err_bridge']:.3f} | {m['rel_err_upsample']:.3f} | "
                         f"{m['cos_head']:+.3f} | {m['cos_neck']:+.3f} |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(res, args.out / f"{args.name}.png", {float(k): v for k, v in res["contrasts"].items()})
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()

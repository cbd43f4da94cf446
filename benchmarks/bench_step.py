"""Time one training step: plain LR, plain HR, LRDet, the LRDet step's parts, and the cost options.

    python benchmarks/bench_step.py                       # CPU defaults: 256 px LR, 512 px HR, batch 2
    python benchmarks/bench_step.py --models retinanet --repeats 3 --out /tmp/step.json
    python benchmarks/bench_step.py --backbone resnet50 --raw 800 --lr-size 400 --hr-size 800   # on a GPU
    python benchmarks/bench_step.py --quick               # smoke run (seconds): writes runs/bench_step_quick.*

Every (model, mode) runs in its own process, so peak memory (CUDA: max allocated; CPU: peak RSS; both
in MiB, 2^20 bytes) is that mode's alone. A process that fails is reported and the others still run.
A "step" is forward + backward (no optimizer update) for every mode.

The LRDet step's inherent parts are timed separately in the LRDet process:
teacher to its neck, the student's LR forward, the bridge forward, and the backward of the summed loss.
``overhead = lrdet_step / sum(parts)``; the target is <= 1.05.

The cost table (one more process per model, after the modes; ``--no-cost`` skips it) times every arm of
:data:`ARMS` (the LR step, the HR step, LRDet, upsample distillation and the cheap options ``distill_every`` and
``bridge_crop``) in one process, interleaved: each repeat times every arm once, in an order rotated by one per
repeat, each arm for ``--cycle`` consecutive steps (every distill_every period fits in a cycle, and the crop
draws a new window at each step), and reports the mean step of each cycle. ``x LR`` and ``x HR`` are the medians
over the repeats of the per-repeat ratios to the LR and the HR step of the same repeat, so a machine that slows
down during the run moves both sides of a ratio together.

Models: torchvision ``retinanet``, ``fcos`` and ``faster_rcnn`` on a ResNet FPN at ``--raw``/``--lr-size``/
``--hr-size``; ``deepforest``: the FCOS of ``examples/reproduce_deepforest.py`` at the geometry of its
``powered_sgd`` preset (HR tiles of 256 px, LR tiles of 192 px given as images, the HR view passed explicitly,
batch 8; the size flags and ``--batch`` do not apply to it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

MODES = ("lr", "hr", "lrdet")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The cost table's arms: name -> BridgeDistiller options (None: the plain LR or HR model, no distiller).
ARMS = {"lr": None, "hr": None, "lrdet": {}, "upsample": {"bridge": False}, "every2": {"distill_every": 2},
        "every4": {"distill_every": 4}, "crop25": {"bridge_crop": 0.25},
        "every2_crop25": {"distill_every": 2, "bridge_crop": 0.25}}
#: ``--quick``: a smoke run of every process and arm on tiny models, written outside the tracked results.
QUICK = dict(models=["retinanet"], raw=256, lr_size=128, hr_size=256, channels=32, batch=1, warmup=0, repeats=1,
             threads=1, out=os.path.join(ROOT, "runs", "bench_step_quick.json"))
#: The deepforest model's fixed geometry (examples/reproduce_deepforest.py, preset powered_sgd): raw, LR, HR px,
#: and its batch.
DEEPFOREST = (256, 192, 256)
DEEPFOREST_BATCH = 8


def build(model: str, size: int, channels: int, backbone_name: str = "resnet18"):
    if model == "deepforest":
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        from reproduce_deepforest import build_fcos
        return build_fcos(size)
    from torchvision.models import resnet18, resnet50
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    rcnn = model == "faster_rcnn"
    layers = (1, 2, 3, 4) if rcnn else (2, 3, 4)
    extra = LastLevelMaxPool() if rcnn else LastLevelP6P7(channels, channels)
    body, width = (resnet50(weights=None), 256) if backbone_name == "resnet50" else (resnet18(weights=None), 64)
    backbone = BackboneWithFPN(body, {f"layer{k}": str(i) for i, k in enumerate(layers)},
                               [width * 2 ** (k - 1) for k in layers], channels, extra_blocks=extra)
    cls = {"retinanet": RetinaNet, "fcos": FCOS, "faster_rcnn": FasterRCNN}[model]
    return cls(backbone, 3, min_size=size, max_size=size)


def geometry(args) -> tuple:
    """(raw, LR, HR) sizes in px of the model ``args.models[0]``."""
    return DEEPFOREST if args.models[0] == "deepforest" else (args.raw, args.lr_size, args.hr_size)


def batch_of(args) -> int:
    return DEEPFOREST_BATCH if args.models[0] == "deepforest" else args.batch


def inputs(args, dev: str):
    """The HR batch (images, targets), the LR batch and the distiller's HR keywords: the deepforest model takes
    LR tiles made by antialiased downsampling and its HR view explicitly; the torchvision models take the raw
    images (each model's transform resizes them) and build the HR view themselves."""
    raw, lr_size, _ = geometry(args)
    images, targets = make_batch(batch_of(args), raw, dev)
    if args.models[0] != "deepforest":
        return (images, targets), (images, targets), {}
    f = lr_size / raw
    lr = [torch.nn.functional.interpolate(x[None], size=(lr_size, lr_size), mode="bilinear", antialias=True,
                                          align_corners=False)[0] for x in images]
    targets = [{"boxes": t["boxes"], "labels": torch.ones_like(t["labels"])} for t in targets]  # one class: trees
    lr_t = [{"boxes": t["boxes"] * f, "labels": t["labels"]} for t in targets]
    return (images, targets), (lr, lr_t), {"hr_images": images, "hr_targets": targets}


def make_batch(n: int, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = torch.rand(4, 2, generator=g) * size * 0.3 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, 3, (4,), generator=g).to(device)})
    return images, targets


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, repeats: int) -> list:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def run_one(args) -> dict:
    """One (model, mode) in this process."""
    from lrdet_core import BridgeDistiller

    torch.manual_seed(0)
    dev = args.device
    _, lr_size, hr_size = geometry(args)
    (hr_images, hr_targets), (images, targets), hr_kw = inputs(args, dev)
    student = build(args.models[0], lr_size, args.channels, args.backbone).to(dev).train()
    result = {}
    if args.mode in ("lr", "hr"):
        model = student if args.mode == "lr" else build(args.models[0], hr_size, args.channels, args.backbone).to(dev)
        batch = (images, targets) if args.mode == "lr" else (hr_images, hr_targets)
        model.train()

        def step():
            sum(model(*batch).values()).backward()
        result["step"] = timed(step, dev, args.warmup, args.repeats)
    else:
        teacher = build(args.models[0], hr_size, args.channels, args.backbone).to(dev)
        # A fixed alpha, as when the committed results were measured: every timed step is the same step.
        d = BridgeDistiller(student, teacher, alpha=0.005).train()

        def step():
            sum(d(images, targets, **hr_kw).values()).backward()
        result["step"] = timed(step, dev, args.warmup, args.repeats)

        # Parts, each timed on its own with the same inputs.
        s_ad, t_ad = d.adapter, d.teacher_adapters["teacher"]
        lr = s_ad.student_pass(images, targets, keep_neck=False)
        view = t_ad.hr_view(images, targets, hr_kw.get("hr_images"), hr_kw.get("hr_targets"), lr,
                            hr_source=d.hr_source, hr_scale=None)
        hr = t_ad.teacher_pass(view)
        result["teacher_to_neck"] = timed(lambda: t_ad.teacher_pass(view), dev, args.warmup, args.repeats)
        result["student_lr_forward"] = timed(lambda: s_ad.student_pass(images, targets, keep_neck=False), dev,
                                             args.warmup, args.repeats)
        result["bridge_forward"] = timed(lambda: s_ad.bridge_pass(images, targets, hr, d._replay(lr, hr)), dev,
                                         args.warmup, args.repeats)
        bridge_neck = s_ad.bridge_pass(images, targets, hr, d._replay(lr, hr))[1]
        result["distill_loss"] = timed(lambda: d._distill("teacher", bridge_neck, hr, late=False), dev, args.warmup,
                                       args.repeats)

        def backward_only():
            loss = sum(d(images, targets, **hr_kw).values())
            sync(dev)
            t0 = time.perf_counter()
            loss.backward()
            sync(dev)
            return time.perf_counter() - t0
        for _ in range(args.warmup):
            backward_only()
        result["backward"] = [backward_only() for _ in range(args.repeats)]
    peak = (torch.cuda.max_memory_allocated() if dev == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"times_s": result, "peak_bytes": peak}


def run_cost(args) -> dict:
    """The cost table of one model: every arm in this process, interleaved (see the module's docstring)."""
    import warnings

    from lrdet_core import BridgeDistiller

    torch.manual_seed(0)  # the weights, and the crop's windows
    dev = args.device
    _, lr_size, hr_size = geometry(args)
    (hr_images, hr_targets), (images, targets), hr_kw = inputs(args, dev)
    student = build(args.models[0], lr_size, args.channels, args.backbone).to(dev).train()
    hr_model = build(args.models[0], hr_size, args.channels, args.backbone).to(dev).train()
    teacher = build(args.models[0], hr_size, args.channels, args.backbone).to(dev)
    arms = {a: ARMS[a] for a in args.arms}
    for a, kw in arms.items():
        k = (kw or {}).get("distill_every", 1)
        if args.cycle % k:
            raise SystemExit(f"--cycle {args.cycle} is not a multiple of {a}'s distill_every={k}")
    steps = {}
    for a, kw in arms.items():
        if kw is None:
            model, batch = (student, (images, targets)) if a == "lr" else (hr_model, (hr_images, hr_targets))
            steps[a] = (model, lambda model=model, batch=batch: sum(model(*batch).values()).backward())
        else:
            # alpha: any fixed value (it does not change the work); the default's balance warning is noise here
            d = BridgeDistiller(student, teacher, alpha=1e-4, **kw).train()
            steps[a] = (d, lambda d=d: sum(d(images, targets, **hr_kw).values()).backward())

    def cycle(a: str) -> tuple:
        """Mean seconds per step over ``--cycle`` consecutive steps of arm ``a``, and its peak memory (CUDA)."""
        model, fn = steps[a]
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        total = 0.0
        for _ in range(args.cycle):
            model.zero_grad(set_to_none=True)  # outside the timed region, as for every arm
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            total += time.perf_counter() - t0
        return total / args.cycle, (torch.cuda.max_memory_allocated() if dev == "cuda" else None)

    names = list(arms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.warmup):
            for a in names:
                cycle(a)
        rows = {a: {"options": arms[a], "step_s": [], "peak_bytes": None} for a in names}
        for r in range(args.repeats):
            for a in rotated(names, r):
                t, peak = cycle(a)
                rows[a]["step_s"].append(t)
                if peak is not None:
                    rows[a]["peak_bytes"] = max(peak, rows[a]["peak_bytes"] or 0)
    add_ratios(rows)
    return {"arms": rows, "cycle": args.cycle, "sizes": dict(zip(("raw", "lr", "hr"), geometry(args))),
            "batch": batch_of(args)}


def rotated(names: list, r: int) -> list:
    """The order of the arms in repeat ``r``: rotated by one per repeat, so every arm takes every position.

    Example:
        >>> rotated(["lr", "hr", "lrdet"], 1)
        ['hr', 'lrdet', 'lr']
    """
    k = r % len(names)
    return names[k:] + names[:k]


def add_ratios(rows: dict) -> None:
    """``x_lr`` and ``x_hr`` of every arm: its step over the LR (HR) arm's step of the same repeat.

    Example:
        >>> rows = {"lr": {"step_s": [1.0, 2.0]}, "lrdet": {"step_s": [4.0, 6.0]}}
        >>> add_ratios(rows); rows["lrdet"]["x_lr"], "x_hr" in rows["lrdet"]
        ([4.0, 3.0], False)
    """
    for r in rows.values():
        for ref in ("lr", "hr"):
            if ref in rows:
                r[f"x_{ref}"] = [t / u for t, u in zip(r["step_s"], rows[ref]["step_s"])]


def meta(args) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    import torchvision
    return {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "commit": commit,
            "platform": platform.platform(), "config": {k: v for k, v in vars(args).items() if k != "mode"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["retinanet", "fcos"],
                   choices=["retinanet", "fcos", "faster_rcnn", "deepforest"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--raw", type=int, default=512, help="side of the generated raw images")
    p.add_argument("--lr-size", type=int, default=256)
    p.add_argument("--hr-size", type=int, default=512)
    p.add_argument("--channels", type=int, default=256, help="FPN channels")
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"],
                   help="the FPN's body (resnet50: torchvision's ResNet-50 FPN detectors, without weights)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "bench_step.json"))
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default); use 1 on a shared CPU")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="the cost table's arms")
    p.add_argument("--cycle", type=int, default=4, help="steps per timed cycle of each arm in the cost table")
    p.add_argument("--no-cost", action="store_true", help="skip the cost table")
    p.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items() if k != "out") + "; writes runs/bench_step_quick.{json,md}")
    p.add_argument("--mode", choices=MODES + ("cost",), help=argparse.SUPPRESS)  # internal: one process per mode
    args = p.parse_args()
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
        for k, v in QUICK.items():
            if k not in given:  # an explicit flag still wins
                setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.mode:
        print(json.dumps(run_cost(args) if args.mode == "cost" else run_one(args)))
        return
    rows, cost, failures = {}, {}, []
    modes = list(MODES) + ([] if args.no_cost else ["cost"])
    for model in args.models:
        for mode in modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--models", model] + [
                a for k, v in vars(args).items() if k not in ("mode", "models", "out", "no_cost", "quick", "arms")
                for a in (f"--{k.replace('_', '-')}", str(v))] + ["--arms", *args.arms]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                failures.append(f"{model} {mode}: exit {out.returncode}: {out.stderr.strip()[-1500:]}")
                print(f"{model:12s} {mode:6s} FAILED (exit {out.returncode})\n{out.stderr[-1500:]}", file=sys.stderr,
                      flush=True)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if mode == "cost":
                cost[model] = result
                print(f"{model:12s} cost   " + ", ".join(
                    f"{a} {statistics.median(r['x_lr']):.2f}x LR" for a, r in result["arms"].items() if "x_lr" in r),
                    flush=True)
            else:
                rows.setdefault(model, {})[mode] = result
                print(f"{model:12s} {mode:6s} median step {statistics.median(result['times_s']['step']):.3f} s",
                      flush=True)
            write(args.out, {"meta": meta(args), "results": rows, "cost": cost, "failures": failures})  # a timeout
    report = {"meta": meta(args), "results": rows, "cost": cost, "failures": failures}
    write(args.out, report)
    print(markdown(report))
    if failures:
        sys.exit(f"{len(failures)} run(s) failed")


def write(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(markdown(report) + "\n")


def markdown(report: dict) -> str:
    med = statistics.median
    m = report["meta"]
    lines = [f"Device: {m['device']} ({m['cpu_count']} cores, {m['threads']} threads), torch {m['torch']}, "
             f"commit {m['commit']}; {m['config'].get('backbone', 'resnet18')} FPN, batch {m['config']['batch']}, "
             f"LR {m['config']['lr_size']} px, HR {m['config']['hr_size']} px, FPN {m['config']['channels']} ch; "
             f"median of {m['config']['repeats']}.",
             "",
             "| model | LR step (s) | HR step (s) | LRDet step (s) | teacher→neck | student LR fwd | bridge fwd | "
             "distill loss | backward | LRDet / sum of parts | peak MiB LR / HR / LRDet |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    parts = ["teacher_to_neck", "student_lr_forward", "bridge_forward", "distill_loss", "backward"]
    for model, r in report["results"].items():
        step = {k: (f"{med(r[k]['times_s']['step']):.3f}" if k in r else "failed") for k in MODES}
        if "lrdet" in r:
            t = r["lrdet"]["times_s"]
            total = sum(med(t[k]) for k in parts)
            cells = [f"{med(t[k]):.3f}" for k in parts] + [f"{med(t['step']) / total:.3f}"]
        else:
            cells = ["failed"] * (len(parts) + 1)
        peaks = " / ".join(f"{r[k]['peak_bytes'] / 2**20:.0f}" if k in r else "failed" for k in MODES)
        name = (f"{model} (LR {DEEPFOREST[1]} / HR {DEEPFOREST[2]} px, batch {DEEPFOREST_BATCH})"
                if model == "deepforest" else model)
        lines.append(f"| {name} | {step['lr']} | {step['hr']} | {step['lrdet']} | " + " | ".join(cells)
                     + f" | {peaks} |")
    lines += cost_markdown(report.get("cost", {}))
    for f in report.get("failures", []):
        lines.append(f"\nFAILED {f.splitlines()[0] if f else f}")
    return "\n".join(lines)


def spread(xs: list) -> str:
    """``median (min-max)`` of a list of ratios."""
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def cost_markdown(cost: dict) -> list:
    """The cost table: each arm's step against the LR and the HR step of the same repeats."""
    if not cost:
        return []
    lines = ["", "Cost of one step by option, interleaved in one process per model (median over the repeats of "
                 "the per-repeat ratio, min-max in brackets; a step is the mean of a cycle of "
                 f"{next(iter(cost.values()))['cycle']} consecutive steps):", "",
             "| model | arm | options | step (s) | x LR step | x HR step | peak MiB (CUDA) |",
             "|---|---|---|---|---|---|---|"]
    for model, c in cost.items():
        sizes = c["sizes"]
        name = f"{model} (LR {sizes['lr']} / HR {sizes['hr']} px, batch {c['batch']})"
        for arm, r in c["arms"].items():
            opts = "plain model" if r["options"] is None else (
                ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults")
            peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "n/a"
            lines.append(f"| {name} | {arm} | {opts} | "
                         f"{statistics.median(r['step_s']):.3f} | {spread(r['x_lr']) if 'x_lr' in r else 'n/a'} | "
                         f"{spread(r['x_hr']) if 'x_hr' in r else 'n/a'} | {peak} |")
    return lines


if __name__ == "__main__":
    main()

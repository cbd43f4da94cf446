"""Time one training step: plain LR, plain HR, LRDet, and the LRDet step's parts.

    python benchmarks/bench_step.py                       # CPU defaults: 256 px LR, 512 px HR, batch 2
    python benchmarks/bench_step.py --models retinanet --repeats 3 --out /tmp/step.json
    python benchmarks/bench_step.py --backbone resnet50 --raw 800 --lr-size 400 --hr-size 800   # on a GPU

Every (model, mode) runs in its own process, so peak memory (CUDA: max allocated; CPU: peak RSS; both
in MiB, 2^20 bytes) is that mode's alone. A process that fails is reported and the others still run.
A "step" is forward + backward (no optimizer update) for every mode.

The LRDet step's inherent parts are timed separately in the LRDet process:
teacher to its neck, the student's LR forward, the bridge forward, and the backward of the summed loss.
``overhead = lrdet_step / sum(parts)``; the target is <= 1.05.
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


def build(model: str, size: int, channels: int, backbone_name: str = "resnet18"):
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
    images, targets = make_batch(args.batch, args.raw, dev)
    student = build(args.models[0], args.lr_size, args.channels, args.backbone).to(dev).train()
    result = {}
    if args.mode in ("lr", "hr"):
        model = (student if args.mode == "lr"
                 else build(args.models[0], args.hr_size, args.channels, args.backbone).to(dev).train())

        def step():
            sum(model(images, targets).values()).backward()
        result["step"] = timed(step, dev, args.warmup, args.repeats)
    else:
        teacher = build(args.models[0], args.hr_size, args.channels, args.backbone).to(dev)
        # A fixed alpha, as when the committed results were measured: every timed step is the same step.
        d = BridgeDistiller(student, teacher, alpha=0.005).train()

        def step():
            sum(d(images, targets).values()).backward()
        result["step"] = timed(step, dev, args.warmup, args.repeats)

        # Parts, each timed on its own with the same inputs.
        s_ad, t_ad = d.adapter, d.teacher_adapters["teacher"]
        lr = s_ad.student_pass(images, targets, keep_neck=False)
        view = t_ad.hr_view(images, targets, None, None, lr, hr_source=d.hr_source, hr_scale=None)
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
            loss = sum(d(images, targets).values())
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
    p.add_argument("--models", nargs="+", default=["retinanet", "fcos"], choices=["retinanet", "fcos", "faster_rcnn"])
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
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_step.json"))
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default); use 1 on a shared CPU")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one process per mode
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.mode:
        print(json.dumps(run_one(args)))
        return
    rows, failures = {}, []
    for model in args.models:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--mode", mode, "--models", model] + [
                a for k, v in vars(args).items() if k not in ("mode", "models", "out")
                for a in (f"--{k.replace('_', '-')}", str(v))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                failures.append(f"{model} {mode}: exit {out.returncode}: {out.stderr.strip()[-1500:]}")
                print(f"{model:12s} {mode:6s} FAILED (exit {out.returncode})\n{out.stderr[-1500:]}", file=sys.stderr,
                      flush=True)
                continue
            rows.setdefault(model, {})[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{model:12s} {mode:6s} median step {statistics.median(rows[model][mode]['times_s']['step']):.3f} s",
                  flush=True)
            write(args.out, {"meta": meta(args), "results": rows, "failures": failures})  # survives a timeout
    report = {"meta": meta(args), "results": rows, "failures": failures}
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
        lines.append(f"| {model} | {step['lr']} | {step['hr']} | {step['lrdet']} | " + " | ".join(cells)
                     + f" | {peaks} |")
    for f in report.get("failures", []):
        lines.append(f"\nFAILED {f.splitlines()[0] if f else f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Speed and memory of the distillation losses: each loss x backend x dtype x batch.

Backends: ``torch`` (eager, the losses package), ``compile`` (``torch.compile`` of the same
eager function, the package's ``backend="compile"``) and ``triton`` (the fused kernels; CUDA
only). Each case times forward + backward of the loss over a whole feature pyramid and
compares it with a copy-bandwidth proxy measured in the same run: ``torch.add(a, b, out=c)``
over as many elements as the pyramid (reads two tensors, writes one, like a fused loss).

Methodology and column meanings: ``benchmarks/README.md``. Reproduce::

    python benchmarks/bench_losses.py                 # full run (CUDA sizes on a GPU)
    python benchmarks/bench_losses.py --quick         # CI smoke run, < 60 s
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# RetinaNet's P3-P7 at 800x1333 (C=256).
RETINANET_800 = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
# The same pyramid at 400x667: the CPU default, so a full run fits in minutes on two cores.
RETINANET_400 = [(50, 84), (25, 42), (13, 21), (7, 11), (4, 6)]
LOSSES = ("mse", "l1", "cwd", "fgd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def min_accesses(loss: str, levels: Sequence[Tuple[int, int]]) -> List[int]:
    """Minimum element reads + writes per element of each level, forward + backward together.

    MSE/L1: read S, read T, write dS (3). CWD: 3 for rows that fit one block (<= 4096 cells),
    5 for longer rows (S and T read twice). FGD: two streaming passes, 2 + 3 = 5.
    """
    if loss == "cwd":
        return [3 if h * w <= 4096 else 5 for h, w in levels]
    return [5 if loss == "fgd" else 3] * len(levels)


def min_bytes(loss: str, levels, n: int, c: int, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(a * n * c * h * w * size for a, (h, w) in zip(min_accesses(loss, levels), levels))


# ------------------------------------------------------------------------------ the cases

def _fgd_masks(n, levels, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for h, w in levels:
        fg = (torch.rand(n, h, w, generator=g) < 0.2).float()
        fg = fg / fg.flatten(1).sum(1).clamp(min=1)[:, None, None]
        bg = (fg == 0).float()
        bg = bg / bg.flatten(1).sum(1).clamp(min=1)[:, None, None]
        out.append((fg.to(device), bg.to(device)))
    return out


def make_loss(loss: str, backend: str, levels, n, device) -> Callable:
    """``f(student_list, teacher_list) -> scalar`` running ``loss`` on ``backend``."""
    if backend == "triton":
        from lrdet_core.kernels.cwd import cwd_triton
        from lrdet_core.kernels.fgd import fgd_focal_attention_triton
        from lrdet_core.kernels.l1 import l1_triton
        from lrdet_core.kernels.mse import mse_triton
        if loss == "fgd":
            masks = _fgd_masks(n, levels, device)
            return lambda S, T: sum(sum(fgd_focal_attention_triton(s, t, fg, bg, 0.5))
                                    for s, t, (fg, bg) in zip(S, T, masks))
        return {"mse": mse_triton, "l1": l1_triton, "cwd": cwd_triton}[loss]
    try:
        import lrdet_core.losses as L
        from lrdet_core.losses._common import compiled
        from lrdet_core.losses.fgd import _fgd_focal_attention_eager
    except ImportError:  # the losses package is missing: fall back to a local eager version
        return make_local_loss(loss, backend, levels, n, device)
    if loss == "fgd":
        # The focal + attention terms only (what the Triton kernel fuses); FGD's GcBlock term is
        # eager on every backend and is left out so the rows compare like with like.
        masks = _fgd_masks(n, levels, device)
        fn = _fgd_focal_attention_eager if backend == "torch" else compiled(_fgd_focal_attention_eager)
        return lambda S, T: sum(sum(fn(s, t, fg, bg, 0.5, torch.float32)) for s, t, (fg, bg) in zip(S, T, masks))
    module = {"mse": L.MSELoss, "l1": L.L1Loss, "cwd": L.CWDLoss}[loss](backend=backend)
    return lambda S, T: module(S, T, None)


def make_local_loss(loss, backend, levels, n, device):
    def mse(S, T):
        return sum(((s.float() - t.float()) ** 2).sum() for s, t in zip(S, T))

    def l1(S, T):
        return sum((s.float() - t.float()).abs().sum() for s, t in zip(S, T))

    def cwd(S, T):
        out = 0
        for s, t in zip(S, T):
            ls, lt = torch.log_softmax(s.float().flatten(2), -1), torch.log_softmax(t.float().flatten(2), -1)
            out = out + (lt.exp() * (lt - ls)).sum() / (s.shape[0] * s.shape[1])
        return out

    fn = {"mse": mse, "l1": l1, "cwd": cwd}[loss]
    return torch.compile(fn) if backend == "compile" else fn


# ------------------------------------------------------------------------------ timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable, device, warmup: int, repeats: int, flush) -> List[float]:
    """Wall times (ms) of ``fn`` after ``warmup`` calls; the L2 is flushed before each on CUDA."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()  # evict the inputs from L2: every repeat starts cold
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_case(loss, backend, dtype_name, n, c, levels, device, warmup, repeats, flush) -> Dict:
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(0)
    S = [torch.randn(n, c, h, w, generator=g).to(device, dtype).requires_grad_() for h, w in levels]
    T = [torch.randn(n, c, h, w, generator=g).to(device, dtype) for h, w in levels]
    f = make_loss(loss, backend, levels, n, device)

    def step():
        for s in S:
            s.grad = None
        f(S, T).backward()

    compile_s = None
    if backend == "compile":
        _sync(device)
        t0 = time.perf_counter()
        step()  # first call compiles
        _sync(device)
        compile_s = time.perf_counter() - t0
    extra_mb = None
    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        # grads are kept (.grad), so the gradient buffers themselves count: 1x the student size
        extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = time_fn(step, device, warmup, repeats, flush)
    med = statistics.median(times)
    nbytes = min_bytes(loss, levels, n, c, dtype)
    return {"loss": loss, "backend": backend, "dtype": dtype_name, "batch": n, "channels": c,
            "levels": ";".join(f"{h}x{w}" for h, w in levels), "median_ms": med,
            "min_ms": min(times), "max_ms": max(times), "repeats": repeats, "min_bytes": nbytes,
            "gbps": nbytes / med / 1e6, "extra_peak_mb": extra_mb, "compile_s": compile_s}


def copy_proxy(dtype_name, n, c, levels, device, warmup, repeats, flush) -> Dict:
    numel = sum(n * c * h * w for h, w in levels)
    dtype = DTYPES[dtype_name]
    a, b = torch.randn(numel, device=device).to(dtype), torch.randn(numel, device=device).to(dtype)
    out = torch.empty_like(a)
    times = time_fn(lambda: torch.add(a, b, out=out), device, warmup, repeats, flush)
    med = statistics.median(times)
    return {"median_ms": med, "gbps": 3 * numel * a.element_size() / med / 1e6}


# ------------------------------------------------------------------------------ output

def metadata(device) -> Dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    return {"device": dev, "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "commit": commit, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def markdown(rows: List[Dict], meta: Dict) -> str:
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; commit {meta['commit'][:10]}", "",
             "| loss | backend | dtype | N | fwd+bwd ms (median) | spread ms (min-max) | GB/s (min bytes) | "
             "% copy proxy | time / copy | speed-up vs torch | extra peak MB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, p=1: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
        lines.append(f"| {r['loss']} | {r['backend']} | {r['dtype']} | {r['batch']} | {r['median_ms']:.2f} | "
                     f"{r['min_ms']:.2f}-{r['max_ms']:.2f} | {r['gbps']:.2f} | {r['pct_copy']:.0f} | "
                     f"{r['x_copy']:.2f} | {fmt(r['speedup_vs_torch'], 2)} | {fmt(r['extra_peak_mb'])} | "
                     f"{fmt(r['compile_s'])} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['loss']}/{r['backend']}/{r['dtype']}/N{r['batch']}" for r in rows]
    ax.bar(range(len(rows)), [r["pct_copy"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("% of copy-proxy bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_levels(text: str) -> List[Tuple[int, int]]:
    """``"100x168,50x84"`` -> ``[(100, 168), (50, 84)]``."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: one small case per loss; torch (+ triton on CUDA) unless --backends says more")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--backends", nargs="+", default=None, help="default: torch compile (+ triton on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: 2 8 16 on CUDA, 1 2 on CPU")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--levels", type=parse_levels, default=None,
                   help="HxW of each level, e.g. 100x168,50x84 (default: RetinaNet P3-P7 at 800x1333 on CUDA, "
                        "at 400x667 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="file name stem of the results (default: bench_<device type>)")
    p.add_argument("--plot", action="store_true", help="also save a matplotlib bar chart")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's). On a shared CPU use 1: OpenMP workers that wait for a "
                        "busy core made the same call 1.5-40x slower in our runs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    backends = args.backends or (["torch", "compile", "triton"] if cuda else ["torch", "compile"])
    if not cuda and "triton" in backends:
        sys.exit("the triton backend needs CUDA tensors; use --backends torch compile on CPU")
    levels = args.levels or (RETINANET_800 if cuda else RETINANET_400)
    batches = args.batch or ([2, 8, 16] if cuda else [1, 2])
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    repeats = args.repeats if args.repeats is not None else (50 if cuda else 7)
    channels = args.channels
    dtypes = args.dtypes
    if args.quick:
        levels, batches, channels, dtypes = args.levels or [(25, 42), (13, 21), (7, 11)], [2], 64, ["fp32"]
        warmup, repeats = 1, 3
        # torch.compile alone takes 20-70 s per loss on a small CPU: not a smoke test.
        backends = args.backends or [b for b in backends if b != "compile"]
    # 256 MB zeroed before each timed call evicts a 50 MB (H100) L2 completely.
    flush = torch.empty(256 * 2**20 // 4, device=device) if cuda else None
    torch.manual_seed(0)

    rows = []
    for dtype_name in dtypes:
        for n in batches:
            proxy = copy_proxy(dtype_name, n, channels, levels, device, warmup, repeats, flush)
            eager_ms = {}
            for loss in args.losses:
                for backend in backends:
                    r = run_case(loss, backend, dtype_name, n, channels, levels, device, warmup, repeats, flush)
                    if backend == "torch":
                        eager_ms[loss] = r["median_ms"]
                    r["copy_ms"], r["copy_gbps"] = proxy["median_ms"], proxy["gbps"]
                    r["pct_copy"] = 100 * r["gbps"] / proxy["gbps"]
                    r["x_copy"] = r["median_ms"] / proxy["median_ms"]
                    r["speedup_vs_torch"] = eager_ms[loss] / r["median_ms"] if loss in eager_ms else None
                    rows.append(r)
                    print(f"{loss:>4} {backend:>8} {dtype_name} N={n}: {r['median_ms']:.2f} ms "
                          f"({r['min_ms']:.2f}-{r['max_ms']:.2f}), {r['gbps']:.2f} GB/s = {r['pct_copy']:.0f}% of copy "
                          f"({proxy['gbps']:.2f} GB/s), x{r['x_copy']:.2f} copy time", flush=True)

    meta = metadata(device)
    meta.update({"levels": levels, "channels": channels, "warmup": warmup, "repeats": repeats, "quick": args.quick,
                 "command": " ".join([os.path.basename(sys.executable), *sys.argv])})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"bench_{device.type}{'_quick' if args.quick else ''}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, meta)
    (out / f"{stem}.md").write_text(table)
    print(table)
    if args.plot:
        plot(rows, out / f"{stem}.png")


if __name__ == "__main__":
    main()

"""Speed and memory of the distillation losses: each loss x backend x dtype x batch.

Backends: ``torch`` (eager, the losses package), ``compile`` (``torch.compile`` of the same
eager function, the package's ``backend="compile"``) and ``triton`` (the fused kernels; CUDA
only). Each case times forward + backward of the loss over a whole feature pyramid against a
copy-bandwidth proxy, ``torch.add(a, b, out=c)`` over as many elements as the pyramid (reads two
tensors, writes one, like a fused loss). The proxy and the case alternate inside one timing loop;
``time / copy`` is the median of the per-pair ratios, and a ratio that is physically impossible
(under 0.9 x the bytes-moved bound, or over 1000 x) is reported as noise, not as a result. The
goals for the Triton rows (share of the copy bandwidth, speed-up over eager) are checked at the end.

Methodology and column meanings: ``docs/benchmarks.md``. Reproduce::

    python benchmarks/bench_losses.py                 # full run (CUDA sizes on a GPU), into benchmarks/results/
    python benchmarks/bench_losses.py --quick         # CI smoke run, < 60 s, into the untracked runs/benchmarks/
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
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

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
    """Element reads + writes per element of each level that the fused kernels make, forward + backward.

    The kernels recompute the gradient in backward with ``grad_output`` folded in (no stored gradient, no
    fp16 underflow before a loss scale): every loss reads S and T forward (2; FGD in one pass that also
    gathers its attention statistics), reads S and T and writes dS backward (3): 5. Counted lane by lane
    by ``benchmarks/count_launches.py``.
    """
    return [5] * len(levels)


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
    """``f(student_list, teacher_list) -> scalar`` running ``loss`` on ``backend``.

    MSE, L1 and CWD go through the loss modules of ``lrdet_core.losses`` on every backend (what a user
    calls). FGD times the focal + attention terms only, which is what its Triton kernel fuses.
    """
    try:
        import lrdet_core.losses as L
        from lrdet_core.losses._common import compiled
        from lrdet_core.losses.fgd import _fgd_focal_attention_eager, _fgd_focal_attention_kernel
    except ImportError:  # the losses package is missing: fall back to a local eager version
        return make_local_loss(loss, backend, levels, n, device)
    if loss == "fgd":
        # FGD's GcBlock term is eager on every backend and is left out so the rows compare like with like.
        masks = _fgd_masks(n, levels, device)
        if backend == "triton":
            kernel = _fgd_focal_attention_kernel()  # fgd_focal_attention_triton, imported as the loss imports it
            # One call per level, as the eager rows: the per-level cost of the fused terms.
            return lambda S, T: sum(sum(kernel([s], [t], [fg], [bg], 0.5)) for s, t, (fg, bg) in zip(S, T, masks))
        fn = _fgd_focal_attention_eager if backend == "torch" else compiled(_fgd_focal_attention_eager)
        return lambda S, T: sum(sum(fn(s, t, fg, bg, 0.5, torch.float32)) for s, t, (fg, bg) in zip(S, T, masks))
    module = {"mse": L.MSELoss, "l1": L.L1Loss, "cwd": L.CWDLoss}[loss](backend=backend)
    return lambda S, T: module(S, T, None)


def make_local_loss(loss, backend, levels, n, device):
    def mse_loss(S, T):
        return sum(((s.float() - t.float()) ** 2).sum() for s, t in zip(S, T))

    def l1_loss(S, T):
        return sum((s.float() - t.float()).abs().sum() for s, t in zip(S, T))

    def cwd_loss(S, T):
        out = 0
        for s, t in zip(S, T):
            ls, lt = torch.log_softmax(s.float().flatten(2), -1), torch.log_softmax(t.float().flatten(2), -1)
            out = out + (lt.exp() * (lt - ls)).sum() / (s.shape[0] * s.shape[1])
        return out

    fn = {"mse": mse_loss, "l1": l1_loss, "cwd": cwd_loss}[loss]
    return torch.compile(fn) if backend == "compile" else fn


# ------------------------------------------------------------------------------ timing

#: A time/copy ratio under this fraction of its bytes-moved bound is physically impossible (the loss
#: would have moved its minimum bytes faster than the copy proxy moves its own): noise, not a result.
IMPOSSIBLE_FRACTION = 0.9
#: A time/copy ratio over this multiple of its bound is reported as noise too (a stalled repeat, a
#: copy proxy that ran on an idle core while the loss waited for a busy one).
ABSURD_MULTIPLE = 1000.0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable, device, flush) -> float:
    """Wall time (ms) of one call; the L2 is flushed first on CUDA so the inputs come from HBM."""
    if flush is not None:
        flush.zero_()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_pairs(case: Callable, copy: Callable, device, warmup: int, repeats: int, flush,
               timer: Callable = time_once) -> Tuple[List[float], List[float]]:
    """``(case_ms, copy_ms)`` of ``repeats`` pairs: the copy proxy and the case alternate in one loop.

    A pair runs back to back, so both see the same machine (clocks, other processes, cache state);
    the order within a pair alternates so that neither always runs second.
    """
    for _ in range(warmup):
        copy()
        case()
    _sync(device)
    case_ms, copy_ms = [], []
    for i in range(repeats):
        if i % 2:
            case_ms.append(timer(case, device, flush))
            copy_ms.append(timer(copy, device, flush))
        else:
            copy_ms.append(timer(copy, device, flush))
            case_ms.append(timer(case, device, flush))
    return case_ms, copy_ms


class PairStats(NamedTuple):
    """Per-pair ratios of a case's time to the copy proxy's time in the same pair."""
    x_copy: float  # median of the per-pair ratios
    x_copy_lo: float  # 25th percentile
    x_copy_hi: float  # 75th percentile


def pair_stats(case_ms: Sequence[float], copy_ms: Sequence[float]) -> PairStats:
    ratios = sorted(c / p for c, p in zip(case_ms, copy_ms))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return PairStats(statistics.median(ratios), q[0], q[2])


def copy_bytes(levels, n: int, c: int, dtype: torch.dtype) -> int:
    """Bytes the copy proxy moves: two tensors read and one written over the pyramid's elements."""
    return 3 * sum(n * c * h * w for h, w in levels) * torch.tensor([], dtype=dtype).element_size()


def bytes_bound(loss: str, levels, n: int, c: int, dtype: torch.dtype) -> float:
    """The least time/copy ratio the loss can reach: its minimum bytes over the copy proxy's bytes.

    At the proxy's bandwidth the loss needs ``min_bytes / copy_bytes`` of the proxy's time: 5/3 for every
    loss (5 accesses per element; the proxy makes 3).
    """
    return min_bytes(loss, levels, n, c, dtype) / copy_bytes(levels, n, c, dtype)


def noise_reason(x_copy: float, bound: float, absurd: float = ABSURD_MULTIPLE) -> Optional[str]:
    """Why a time/copy ratio cannot be a measurement, or ``None`` when it can."""
    if x_copy < IMPOSSIBLE_FRACTION * bound:
        return (f"noise: time/copy {x_copy:.3g} is under {IMPOSSIBLE_FRACTION:g} x its bytes-moved bound "
                f"{bound:.3g} (faster than the copy of the bytes it must move)")
    if x_copy > absurd * bound:
        return f"noise: time/copy {x_copy:.3g} is over {absurd:g} x its bytes-moved bound {bound:.3g}"
    return None


def run_case(loss, backend, dtype_name, n, c, levels, device, warmup, repeats, flush, copy: Callable,
             absurd: float = ABSURD_MULTIPLE) -> Dict:
    dtype = DTYPES[dtype_name]
    # Drawn on the device: a CPU generator takes seconds for the 92 M elements of an N=16 pyramid.
    g = torch.Generator(device=device).manual_seed(0)
    S = [torch.randn(n, c, h, w, generator=g, device=device).to(dtype).requires_grad_() for h, w in levels]
    T = [torch.randn(n, c, h, w, generator=g, device=device).to(dtype) for h, w in levels]
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
    times, copy_times = time_pairs(step, copy, device, warmup, repeats, flush)
    med, copy_med = statistics.median(times), statistics.median(copy_times)
    nbytes = min_bytes(loss, levels, n, c, dtype)
    ratio = pair_stats(times, copy_times)
    bound = bytes_bound(loss, levels, n, c, dtype)
    noise = noise_reason(ratio.x_copy, bound, absurd)
    return {"loss": loss, "backend": backend, "dtype": dtype_name, "batch": n, "channels": c,
            "levels": ";".join(f"{h}x{w}" for h, w in levels), "median_ms": med,
            "min_ms": min(times), "max_ms": max(times), "repeats": repeats, "min_bytes": nbytes,
            "gbps": nbytes / med / 1e6, "copy_ms": copy_med, "copy_min_ms": min(copy_times),
            "copy_max_ms": max(copy_times), "copy_gbps": copy_bytes(levels, n, c, dtype) / copy_med / 1e6,
            "bytes_bound": bound, "x_copy": ratio.x_copy, "x_copy_p25": ratio.x_copy_lo,
            "x_copy_p75": ratio.x_copy_hi, "pct_copy": None if noise else 100 * bound / ratio.x_copy,
            "noise": noise, "extra_peak_mib": extra_mb, "compile_s": compile_s}


def copy_proxy(dtype_name, n, c, levels, device) -> Callable:
    """``torch.add(a, b, out=out)`` over as many elements as the pyramid: 2 reads + 1 write each."""
    numel = sum(n * c * h * w for h, w in levels)
    dtype = DTYPES[dtype_name]
    a, b = torch.randn(numel, device=device).to(dtype), torch.randn(numel, device=device).to(dtype)
    out = torch.empty_like(a)
    return lambda: torch.add(a, b, out=out)


# ------------------------------------------------------------------------------ goals

class Goal(NamedTuple):
    """One stated target for the Triton rows, checked against one run."""
    loss: str
    kind: str  # "bandwidth" (% of the copy proxy) or "speed-up" (vs eager PyTorch)
    target: float
    measured: str  # the values it was judged on, e.g. "fp32 91%, bf16 88% (N=16)"
    status: str  # "met" | "missed" | "not measured"


#: Triton's share of the measured copy bandwidth (%) and its speed-up over eager PyTorch, per loss.
BANDWIDTH_GOALS = {"mse": 85.0, "l1": 85.0, "cwd": 85.0, "fgd": 70.0}
SPEEDUP_GOALS = {"mse": 3.0, "l1": 3.0, "cwd": 10.0, "fgd": 10.0}


def check_goals(rows: Sequence[Dict]) -> List[Goal]:
    """Each goal judged on the Triton rows of the largest batch in ``rows`` (every dtype measured there).

    A goal is met when every valid measurement meets it, missed when one does not, and not measured
    when there is none (no Triton row, or only rows flagged as noise).
    """
    goals = []
    for loss in LOSSES:
        triton = [r for r in rows if r["loss"] == loss and r["backend"] == "triton"]
        batch = max((r["batch"] for r in triton), default=None)
        at = [r for r in triton if r["batch"] == batch]
        for kind, target, key, unit in (("bandwidth", BANDWIDTH_GOALS[loss], "pct_copy", "%"),
                                        ("speed-up", SPEEDUP_GOALS[loss], "speedup_vs_torch", "x")):
            values = [(r["dtype"], r.get(key)) for r in at if r.get(key) is not None]
            if not values:
                goals.append(Goal(loss, kind, target, "n/a", "not measured"))
                continue
            measured = ", ".join(f"{d} {v:.{0 if unit == '%' else 2}f}{unit}" for d, v in values) + f" (N={batch})"
            goals.append(Goal(loss, kind, target, measured, "met" if all(v >= target for _, v in values) else "missed"))
    return goals


def goals_markdown(goals: Sequence[Goal]) -> str:
    lines = ["| loss | goal | target | measured (Triton) | status |", "|---|---|---|---|---|"]
    for g in goals:
        target = f">= {g.target:.0f}% of copy" if g.kind == "bandwidth" else f">= {g.target:.0f}x eager"
        lines.append(f"| {g.loss} | {g.kind} | {target} | {g.measured} | {g.status} |")
    return "\n".join(lines) + "\n"


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
    dev = (torch.cuda.get_device_name() if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device": dev, "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "commit": commit, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def markdown(rows: List[Dict], meta: Dict, goals: Optional[Sequence[Goal]] = None) -> str:
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; commit {meta['commit'][:10]}; "
             f"{meta['repeats']} pairs (copy proxy and case alternating) after {meta['warmup']} warm-ups", "",
             "| loss | backend | dtype | N | fwd+bwd ms (median) | spread ms (min-max) | copy ms (median) | "
             "min bytes (MB) | bound (min bytes / copy bytes) | time / copy (median of pairs, p25-p75) | "
             "% copy bandwidth | speed-up vs torch | extra peak MiB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=1: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        if r["noise"]:
            ratio, pct = f"{r['noise']}", "noise"
        else:
            ratio = f"{r['x_copy']:.2f} ({r['x_copy_p25']:.2f}-{r['x_copy_p75']:.2f})"
            pct = f"{r['pct_copy']:.0f}"
        lines.append(f"| {r['loss']} | {r['backend']} | {r['dtype']} | {r['batch']} | {r['median_ms']:.3f} | "
                     f"{r['min_ms']:.3f}-{r['max_ms']:.3f} | {r['copy_ms']:.3f} | {r['min_bytes'] / 1e6:.1f} | "
                     f"{r['bytes_bound']:.2f} | {ratio} | {pct} | {fmt(r['speedup_vs_torch'], 2)} | "
                     f"{fmt(r['extra_peak_mib'])} | {fmt(r['compile_s'])} |")
    text = "\n".join(lines) + "\n"
    if goals is not None:
        text += "\nGoals (Triton rows at the largest batch of this run):\n\n" + goals_markdown(goals)
    return text


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['loss']}/{r['backend']}/{r['dtype']}/N{r['batch']}" for r in rows]
    ax.bar(range(len(rows)), [r["pct_copy"] or 0.0 for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("% of copy-proxy bandwidth (0: noise)")
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
    p.add_argument("--backends", nargs="+", default=None, help="default: torch (+ triton on CUDA) compile")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: 2 8 16 on CUDA, 1 2 on CPU")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--levels", type=parse_levels, default=None,
                   help="HxW of each level, e.g. 100x168,50x84 (default: RetinaNet P3-P7 at 800x1333 on CUDA, "
                        "at 400x667 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=None, help="default: benchmarks/results/ (committed); with --quick, the "
                                                "untracked runs/benchmarks/, so that a smoke run leaves the checkout clean")
    p.add_argument("--tag", default=None, help="file name stem of the results (default: bench_<device type>)")
    p.add_argument("--plot", action="store_true", help="also save a matplotlib bar chart")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's). On a shared CPU use 1: OpenMP workers that wait for a "
                        "busy core made the same call 1.5-40x slower in our runs")
    p.add_argument("--absurd", type=float, default=ABSURD_MULTIPLE,
                   help="flag a time/copy ratio over this multiple of its bytes-moved bound as noise")
    args = p.parse_args(argv)
    failures: List[str] = []
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # torch first (the speed-up baseline), compile last (its first call compiles for tens of seconds)
    backends = args.backends or (["torch", "triton", "compile"] if cuda else ["torch", "compile"])
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

    meta = metadata(device)
    meta.update({"levels": levels, "channels": channels, "warmup": warmup, "repeats": repeats, "quick": args.quick,
                 "method": "interleaved copy proxy; time/copy = median of per-pair ratios",
                 "command": " ".join([os.path.basename(sys.executable), *sys.argv])})
    out = Path(args.out) if args.out else default_out(args.quick)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"bench_{device.type}{'_quick' if args.quick else ''}"
    rows: List[Dict] = []
    eager_x: Dict[Tuple[str, int, str], float] = {}
    # Two passes: every backend but compile first, then compile, whose first calls compile for tens of
    # seconds. Under a time limit (benchmarks/run_cuda.sh) the Triton and eager rows, which the goals
    # need, are measured first.
    passes = [[b for b in backends if b != "compile"], [b for b in backends if b == "compile"]]
    for pass_backends in passes:
        for dtype_name in dtypes:
            for n in batches:
                if not pass_backends:
                    continue
                copy = copy_proxy(dtype_name, n, channels, levels, device)
                for loss in args.losses:
                    for backend in pass_backends:
                        try:
                            r = run_case(loss, backend, dtype_name, n, channels, levels, device, warmup, repeats,
                                         flush, copy, args.absurd)
                        except Exception as err:  # noqa: BLE001 - one failing case must not lose the others
                            print(f"{loss:>4} {backend:>8} {dtype_name} N={n}: FAILED {type(err).__name__}: {err}",
                                  flush=True)
                            failures.append(f"{loss}/{backend}/{dtype_name}/N={n}: {type(err).__name__}: {err}")
                            continue
                        key = (dtype_name, n, loss)
                        if backend == "torch" and not r["noise"]:
                            eager_x[key] = r["x_copy"]
                        # Both sides copy-normalised, each in its own interleaved pairs: drift between the
                        # two cases' loops cancels.
                        valid = key in eager_x and not r["noise"]
                        r["speedup_vs_torch"] = eager_x[key] / r["x_copy"] if valid else None
                        rows.append(r)
                        shown = r["noise"] or (f"time/copy {r['x_copy']:.2f} (bound {r['bytes_bound']:.2f}) = "
                                               f"{r['pct_copy']:.0f}% of copy bandwidth")
                        print(f"{loss:>4} {backend:>8} {dtype_name} N={n}: {r['median_ms']:.3f} ms "
                              f"({r['min_ms']:.3f}-{r['max_ms']:.3f}), copy {r['copy_ms']:.3f} ms; {shown}", flush=True)
                        write_results(out, stem, rows, meta, failures)  # partial results survive a timeout
    goals = check_goals(rows)
    write_results(out, stem, rows, meta, failures)
    print(markdown(rows, meta, goals))
    for f in failures:
        print(f"FAILED {f}")
    if args.plot and rows:
        plot(rows, out / f"{stem}.png")
    if failures:
        sys.exit(f"{len(failures)} case(s) failed")


def default_out(quick: bool) -> Path:
    """Where results go without ``--out``: a full run into the committed ``benchmarks/results/``, a smoke run
    into ``runs/benchmarks/`` (ignored by git, like the reproduction jobs' ``runs/``)."""
    return ROOT / "runs" / "benchmarks" if quick else ROOT / "benchmarks" / "results"


def write_results(out: Path, stem: str, rows: List[Dict], meta: Dict, failures: List[str]) -> None:
    """JSON (meta, rows, goals, failures), CSV and markdown of what has been measured so far."""
    goals = check_goals(rows)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": [g._asdict() for g in goals],
                                                  "failures": failures}, indent=1))
    if rows:
        with open(out / f"{stem}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out / f"{stem}.md").write_text(markdown(rows, meta, goals))


if __name__ == "__main__":
    main()

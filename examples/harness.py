"""What the example scripts share: options, seeding, the training loop and result files.

Each example keeps what is its own (its model, its data, its LRDet lines, its tables); this module holds
what they would otherwise copy from each other. A new ``train_<detector>.py`` is built like
``train_fcos.py``::

    import harness
    args = harness.example_parser(__doc__, "train_yolo").parse_args(argv)  # --quick --steps --scale ...
    steps, batch, g = harness.start(args, batch=8)   # threads and seeds; step count, batch, data generator
    t0 = time.time()
    ...                                               # the teacher, BridgeDistiller and its step(i): the example's own
    log = harness.train(distiller, step, steps, 1e-3, "LRDet student", log_every=max(steps // 10, 1))
    harness.save_student(distiller, build(lr_size), args.out)   # student.pt, reloaded into a plain model
    return harness.finish(args.out, {"detector": "YOLO", "steps": steps, "val": metrics}, log, t0)

Nothing here may change a number of ``reproduce_deepforest.py``: its finished runs are reused by a
fingerprint of its settings, not of this code, so ``train`` and ``seed_all`` must keep their arithmetic
and their order of random draws.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Where the reproduction and the probe write unless told otherwise: an untracked folder, so that running
#: the main job leaves the checkout clean.
DEFAULT_OUT = REPO / "runs"

# ------------------------------------------------------------------------------------------------
# Options and set-up
# ------------------------------------------------------------------------------------------------

THREADS_HELP = ("torch intra-op threads (1: on a 2-core machine shared with other jobs, 2 threads ran\n"
                "several times slower than 1 here; try 2 on an idle machine)")


def add_threads(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads`` (torch intra-op threads, default 1) to ``parser``."""
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def add_cache(parser: argparse.ArgumentParser) -> None:
    """Add ``--cache``: where the DeepForest wheel, trained teachers and kept students are kept."""
    import deepforest_data as dfd

    parser.add_argument("--cache", type=Path, default=dfd.default_cache_dir(),
                        help="where the data wheel, trained teachers and kept students are kept")


def example_parser(doc: str, name: str, quick_help: str = "a few steps, a few evaluation tiles (CI smoke test)",
                   scale: bool = True) -> argparse.ArgumentParser:
    """The options every ``train_*`` example takes; add the example's own ones to the returned parser.

    Args:
        doc: the example's module docstring; its first line is the description.
        name: the example's name; the default ``--out`` is ``runs/<name>`` (relative to the working directory).
        quick_help: what ``--quick`` shrinks, for the help text.
        scale: whether the example has an ``--scale`` option (the LR scale, default 0.5).

    Options: ``--quick``, ``--steps`` (student steps; the teacher trains twice as many), ``--scale``,
    ``--alpha`` (weight of the sum-reduced MSE distillation term, default 2e-5), ``--out``, ``--threads``.
    """
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--steps", type=int, help="student steps (teacher: twice as many)")
    if scale:
        p.add_argument("--scale", type=float, default=0.5, help="the student's resolution, a fraction of the teacher's")
    p.add_argument("--alpha", type=float, default=2e-5, help="weight of the sum-reduced MSE distillation term")
    p.add_argument("--out", type=Path, default=Path("runs") / name)
    add_threads(p)
    return p


class Start(NamedTuple):
    """What ``start`` set up for a ``train_*`` example (unpacks as ``steps, batch, generator``)."""

    steps: int  #: student steps (``--steps``, else 2 with ``--quick``, else 300)
    batch: int  #: images per step
    generator: torch.Generator  #: the data's random stream (seed 0)


def start(args: argparse.Namespace, batch: int, quick_batch: int = 2, steps: int = 300) -> Start:
    """Threads and seeds of a ``train_*`` example, from the options of ``example_parser``.

    Sets ``torch.set_num_threads(args.threads)`` and the global seed 0 (the models' initialisation) and
    returns the step count, the batch size (``quick_batch`` with ``--quick``) and a generator for the data.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return Start(steps=args.steps or (2 if args.quick else steps), batch=quick_batch if args.quick else batch,
                 generator=torch.Generator().manual_seed(0))


def seed_all(seed: int) -> torch.Generator:
    """Seed torch's global stream (initialisation) with ``seed``; returns the data's own generator.

    The data generator is seeded with ``10_000 + seed`` so that the data order and the initialisation are two
    streams: a run that draws more or fewer initial weights sees the same crops.
    """
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(10_000 + seed)


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command that ran ``script`` (its file name under ``examples/``), for the result files.

    ``argv`` is what ``main(argv)`` got: None when run from the shell (then ``sys.argv[1:]``).
    """
    return " ".join([f"python examples/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

#: Optimisers of ``train``: AdamW with cosine decay, or the paper's SGD (momentum 0.9, weight decay 1e-4,
#: step decay); both with linear warm-up and gradient clipping.
OPTIMIZERS = ("adamw", "sgd")


def cosine_lambda(warmup: int, iters: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` iterations, then cosine decay to 0 at ``iters`` (a ``LambdaLR`` factor)."""
    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(iters - warmup, 1)))
    return f


def step_lambda(warmup: int, iters: int, milestones=(2 / 3, 8 / 9), gamma: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up, then the learning rate times ``gamma`` at each milestone (fractions of ``iters``):
    the step schedule of mmdetection's 1x recipe (epochs 8 and 11 of 12), which the paper trains with."""
    steps = [round(m * iters) for m in milestones]

    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return gamma ** sum(i >= s for s in steps)
    return f


def train(module: nn.Module, step: Callable[[int], Dict[str, Tensor]], iters: int, lr: float, desc: str,
          warmup: int = 50, clip: float = 10.0, log_every: int = 50, optim: str = "adamw",
          quiet: bool = False) -> List[Dict[str, float]]:
    """Train ``module`` for ``iters`` iterations; ``step(i)`` returns a loss dict, whose sum is minimised.

    ``optim="adamw"``: AdamW, linear warm-up then cosine decay. ``"sgd"``: SGD with momentum 0.9, linear warm-up
    then step decay (x0.1 at 2/3 and 8/9 of the iterations). Both clip the gradient norm at ``clip``; the
    warm-up is at most a fifth of the iterations. A non-finite loss raises ``FloatingPointError`` with the
    iteration and every term. ``quiet`` hides the progress bar (worker processes, whose bars would overwrite
    each other).

    Returns:
        the loss log: every ``log_every`` iterations (and at the last) ``{"iter": i, <key>: mean since the last}``.
    """
    from tqdm import tqdm

    params = [p for p in module.parameters() if p.requires_grad]
    warmup = min(warmup, max(iters // 5, 1))
    if optim == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, step_lambda(warmup, iters))
    elif optim == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(warmup, iters))
    else:
        raise ValueError(f"expected optim in {OPTIMIZERS}, but got {optim!r}")
    module.train()
    log, running = [], {}
    bar = tqdm(range(iters), desc=desc, leave=False, dynamic_ncols=True, mininterval=2, disable=quiet)
    for i in bar:
        losses = step(i)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss at iteration {i}: "
                                     f"{ {k: float(v.detach()) for k, v in losses.items()} }")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (i + 1) % log_every == 0 or i + 1 == iters:
            n = log_every if (i + 1) % log_every == 0 else (i + 1) % log_every
            entry = {"iter": i + 1, **{k: v / n for k, v in running.items()}}
            log.append(entry)
            bar.set_postfix(loss=f"{sum(v for k, v in entry.items() if k != 'iter'):.3f}")
            running = {}
    bar.close()
    return log


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


def json_safe(x):
    """NaN and infinities as null (e.g. a COCO size range without objects), so that the files are strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path: Path, obj) -> None:
    """Write ``obj`` to ``path`` as strict JSON (non-finite floats as null), indented by one space."""
    Path(path).write_text(json.dumps(json_safe(obj), indent=1, allow_nan=False))


def git_commit() -> str:
    """The checkout's short commit hash, or ``"unknown"`` outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def versions() -> Dict[str, str]:
    """torch, python, the commit and (when installed) torchvision: the metadata of a result file."""
    out = {"torch": torch.__version__, "python": platform.python_version(), "commit": git_commit()}
    try:
        import torchvision
        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return out


def save_student(distiller: nn.Module, fresh: nn.Module, out: Path) -> Path:
    """Save the distilled student as ``<out>/student.pt`` and load it into ``fresh``, a new plain model of the
    student's class: the file is the deployable detector, no lrdet_core needed to load it. Returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "student.pt"
    torch.save(distiller.student_state_dict(), path)
    fresh.load_state_dict(torch.load(path))
    return path


def finish(out: Path, summary: Dict, log: List[Dict[str, float]], t0: float) -> Dict:
    """The end of a ``train_*`` example: ``<out>/metrics.json`` and the validation metrics on stdout.

    Args:
        out: the output folder.
        summary: what the example reports; must hold ``"val"`` (its metrics). ``"last_losses"`` (the last
            entry of ``log``) and ``"time_s"`` (seconds since ``t0``) are added.
        log: the student's loss log, as ``train`` returns it.
        t0: ``time.time()`` at the start of training.

    Raises ``SystemExit`` when the last logged losses are not finite (after writing the files).
    """
    summary = {**summary, "last_losses": log[-1], "time_s": time.time() - t0}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", summary)
    print(json.dumps(summary["val"]))
    if not all(math.isfinite(v) for v in log[-1].values()):
        raise SystemExit("non-finite training loss")
    return summary

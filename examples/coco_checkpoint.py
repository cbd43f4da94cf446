"""Checkpoints of ``train_coco.py``: everything a run needs to continue as if it had not stopped.

One file per epoch, ``<out>/checkpoint_<epoch>.pt`` (the last ``keep`` are kept), written by rank 0 only
and atomically (a half-written file never replaces a good one). It holds the trained module's state
(for LRDet the distiller's: student, projectors, loss parameters and a measured ``alpha="auto"``; never
the teacher), the optimizer, the schedule, the GradScaler, the epoch and step, the loss log and the
evaluations, and the random state of **every** process (gathered to rank 0; each process takes its own
back). The data order needs no state: it is a function of the seed and the epoch (``DistributedSampler``
and the dataset's flips), so a resumed run with the same settings and the same number of processes sees
the same batches. On CPU a resumed run is bit-identical to an uninterrupted one (tested); on GPUs it is
as deterministic as the kernels are.

Example:
    >>> path = latest(Path("runs/coco"))   # doctest: +SKIP
    >>> state = load(path)                  # doctest: +SKIP
    >>> state["epoch"], state["step"]       # doctest: +SKIP
    (3, 1200)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

import coco_runtime as runtime
from lrdet_core import InputError
from lrdet_core.warn import warn_user

#: Settings that decide what the saved tensors are: a resume with another value is refused.
STRUCTURE = ("mode", "detector", "backbone", "norm", "teacher_backbone", "teacher_norm", "anchor_scale",
             "loss", "loss_kwargs", "level_map", "hr_size", "hr_max_size", "lr_size", "lr_max_size")
#: Settings that do not change a run (where its files go, how fast data are read).
IGNORED = ("resume", "out", "workers", "eval_only", "keep_checkpoints", "progress")


def path_for(out: Path, epoch: int) -> Path:
    return Path(out) / f"checkpoint_{epoch:03d}.pt"


def latest(out: Path) -> Path:
    """The newest checkpoint in ``out`` (``--resume latest``)."""
    found = sorted(Path(out).glob("checkpoint_*.pt"))
    if not found:
        raise InputError(f"expected a checkpoint_*.pt in {out} for --resume latest, but there is none")
    return found[-1]


def save(out: Path, epoch: int, step: int, model: nn.Module, optimizer, scheduler, scaler,
         history: Dict[str, List], config: Mapping[str, Any], rt: "runtime.Runtime", keep: int = 2) -> Optional[Path]:
    """Write ``checkpoint_<epoch>.pt``; a collective (every process hands in its random state), so every
    process calls it. Returns the path on rank 0."""
    rngs = runtime.gather(runtime.rng_state(), rt)
    if not rt.is_main:
        runtime.barrier(rt)
        return None
    state = {"epoch": epoch, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
             "history": history, "config": dict(config), "world_size": rt.world, "rng": rngs}
    path = path_for(out, epoch)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(Path(out).glob("checkpoint_*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()
    runtime.barrier(rt)
    return path


def load(path: Path) -> Dict[str, Any]:
    """A checkpoint written by :func:`save`, on the CPU."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=False)  # holds Python RNG states
    except (OSError, RuntimeError) as e:
        raise InputError(f"could not read the checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or not {"epoch", "model", "optimizer", "rng"} <= set(state):
        raise InputError(f"expected {path} to be a train_coco.py checkpoint (checkpoint_<epoch>.pt), but it holds "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}; an exported "
                         f"student.pt/teacher.pt is loaded with --weights, not --resume")
    return state


def check_config(saved: Mapping[str, Any], now: Mapping[str, Any], saved_world: int, world: int,
                 path: Path) -> None:
    """Refuse a resume whose tensors would not fit; warn about settings that change the run from here on."""
    def differ(keys: Sequence[str]) -> List[str]:
        return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]

    wrong = differ(STRUCTURE)
    if wrong:
        raise InputError(f"cannot resume from {path}: it was written with other settings ({'; '.join(wrong)}); "
                         f"pass the ones it was trained with")
    changed = differ([k for k in sorted(set(saved) | set(now)) if k not in STRUCTURE + IGNORED])
    if saved_world != world:
        changed.append(f"processes: {saved_world} -> {world}")
    if changed:
        warn_user(f"resuming from {path} with other settings ({'; '.join(changed)}): training continues, but not as "
                  f"the uninterrupted run would have (data order, schedule or numerics differ)")


def restore(state: Mapping[str, Any], model: nn.Module, optimizer, scheduler, scaler, rt: "runtime.Runtime") -> None:
    """Load a checkpoint's tensors and this process's random state (rank r takes the r-th saved one; a
    process beyond the saved ones keeps its own)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if rt.rank < len(state["rng"]):
        runtime.set_rng_state(state["rng"][rt.rank])

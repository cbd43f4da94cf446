"""One process or many: torchrun's environment, the process group, rank-0 logging and the few collectives
``train_coco.py`` needs.

Started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) each process joins a group: NCCL with one
GPU per process (``LOCAL_RANK``) when CUDA is used, else gloo on CPU. Started by ``python`` it is a group
of one and no collective runs. Only rank 0 logs, shows a progress bar and writes files; the other ranks
keep warnings to themselves (they would repeat rank 0's).

Example:
    >>> rt = start("cpu")            # doctest: +SKIP
    >>> rt.rank, rt.world, rt.device  # doctest: +SKIP
    (0, 1, device(type='cpu'))
"""
from __future__ import annotations

import logging
import os
import random
import sys
import warnings
from typing import Any, Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lrdet_core import InputError


class Runtime(NamedTuple):
    """This process's place: its rank among ``world`` processes, its device and the group's backend."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: Optional[str]  #: ``"nccl"``, ``"gloo"``, or None for a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(device: str = "auto") -> Runtime:
    """Join torchrun's process group (if started by torchrun) and pick the device.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise InputError(f"expected device 'auto', 'cuda' or 'cpu', but got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise InputError("expected a CUDA device for --device cuda, but torch sees none")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1:
        rt = Runtime(0, 1, 0, dev, None)
    else:
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, device_id=dev if use_cuda else None)
        rt = Runtime(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)
    if not rt.is_main:
        warnings.simplefilter("ignore")
    return rt


def stop(rt: Runtime) -> None:
    """Leave the process group (a no-op for a single process)."""
    if rt.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def logger(rt: Runtime) -> logging.Logger:
    """A logger that prints on rank 0 only (INFO) and stays quiet elsewhere (errors only)."""
    log = logging.getLogger("train_coco")
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rt.is_main else logging.ERROR)
    log.propagate = False
    return log


def mean_over_ranks(values: Dict[str, Tensor], rt: Runtime) -> Dict[str, float]:
    """Each (scalar) value averaged over the processes, in one all-reduce: what is logged."""
    keys = sorted(values)
    flat = torch.stack([values[k].detach().to(torch.float64) for k in keys]).to(rt.device)
    if rt.world > 1:
        dist.all_reduce(flat)
        flat /= rt.world
    return dict(zip(keys, flat.tolist()))


def gather(obj: Any, rt: Runtime) -> List[Any]:
    """Every process's ``obj``, in rank order, on every process (picklable objects)."""
    if rt.world == 1:
        return [obj]
    out: List[Any] = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def barrier(rt: Runtime) -> None:
    if rt.world > 1:
        dist.barrier()


def rng_state() -> Dict[str, Any]:
    """This process's random streams: torch (CPU and CUDA), Python's ``random`` and numpy's."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])

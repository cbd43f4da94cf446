"""Parameters that ``load_state_dict`` creates: reported as those created at a training step are.

A custom model's projectors (and FGD's GcBlocks) are created from the checkpoint when it is loaded into a
distiller that has not run yet. Lightning Fabric, Accelerate and Lightning's Trainer build the optimizer
(and DistributedDataParallel) before they load a checkpoint, so those parameters would be left out of both:
never updated, never synchronised, and nothing would say so.

Example:
    >>> import warnings
    >>> from torch import nn
    >>> m = nn.ModuleDict()
    >>> watch_load_creation(m)  # before the hook that creates parameters
    >>> def create(state_dict, prefix, *args):  # a pre-hook that creates what the checkpoint holds
    ...     if "p.weight" in state_dict and "p" not in m:
    ...         m["p"] = nn.Linear(2, 2)
    >>> _ = m._register_load_state_dict_pre_hook(create)
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     _ = m.load_state_dict(nn.ModuleDict({"p": nn.Linear(2, 2)}).state_dict())
    >>> str(w[0].message)[:58]
    'LRDet: load_state_dict created 2 parameters that did not e'
    >>> "in p (2);" in str(w[0].message)
    True
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Set

import torch
from torch import nn

from .errors import InputError
from .warn import warn_user

_FIX = ("call distiller.materialize(images, targets) before loading the checkpoint and before building the "
        "optimizer (Lightning: in setup(); Fabric and Accelerate: before setup()/prepare(), also in the "
        "process that resumes)")


def watch_load_creation(module: nn.Module) -> None:
    """Report (:func:`check_created_by_loading`) the parameters that ``module.load_state_dict`` creates.

    Register it before the pre-hooks that create parameters, so that it sees the parameters before them;
    parameters created by the pre-hooks of submodules are seen too (the check runs once the whole module
    has loaded).
    """
    watch = LoadWatch(module)
    module._register_load_state_dict_pre_hook(watch.before_load)
    module.register_load_state_dict_post_hook(watch.after_load)


class LoadWatch:
    """The two hooks of :func:`watch_load_creation` as one object: copies and pickles of the module carry it (a
    closure would not pickle, and a deep copy would keep watching the original module)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.before: List[Set[int]] = []

    def before_load(self, *args: Any) -> None:
        self.before.append({id(p) for p in self.module.parameters()})

    def after_load(self, mod: nn.Module, incompatible_keys: Any) -> None:
        seen = self.before.pop() if self.before else set()
        check_created_by_loading([n for n, p in mod.named_parameters() if id(p) not in seen])


def check_created_by_loading(names: Sequence[str]) -> None:
    """Parameters created by ``load_state_dict``: an error under ``torch.distributed`` (DistributedDataParallel
    built before the load would never average their gradients), else a warning (an optimizer built before
    the load does not hold them)."""
    if not names:
        return
    groups: Dict[str, int] = {}  # by owning module, at most three levels deep: "losses.teacher.gc_student"
    for n in names:
        owner = ".".join(n.split(".")[:-1][:3]) or n
        groups[owner] = groups.get(owner, 0) + 1
    listed = ", ".join(f"{g} ({k})" for g, k in groups.items())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise InputError(f"expected the distillation parameters to exist before load_state_dict under "
                         f"torch.distributed (an optimizer or DistributedDataParallel built before the load "
                         f"would never update or synchronise them), but loading created {len(names)} in "
                         f"{listed}; {_FIX}")
    warn_user(f"LRDet: load_state_dict created {len(names)} parameters that did not exist before, in {listed}; "
              f"an optimizer built before loading does not hold them, and they would never train. If the "
              f"optimizer was built first, {_FIX}")

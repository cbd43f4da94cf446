"""The teacher must be the same on every rank: checked once, at the first training step under
``torch.distributed``.

The teacher lives outside the distiller's module tree (it is frozen and not part of ``state_dict()``), so
``DistributedDataParallel`` neither broadcasts nor compares it. A teacher built from a different seed or
loaded from another file on one rank would silently distil each rank towards its own teacher. Each rank
sums its teachers' parameters and buffers into a few float64 numbers; the numbers are all-gathered and
compared.

Example:
    >>> import torch
    >>> from torch import nn
    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> b.load_state_dict(a.state_dict())
    <All keys matched successfully>
    >>> torch.equal(teacher_checksum(a), teacher_checksum(b))
    True
    >>> sums = torch.stack([teacher_checksum(a), teacher_checksum(nn.Linear(2, 2)), teacher_checksum(a)])
    >>> ranks_that_differ(sums[:, None], ["teacher"])
    {'teacher': [1]}
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError
from .validate import who

#: Relative tolerance of the comparison, against the sum of magnitudes: the same tensors summed on another
#: device model may round differently in the last bits; a different teacher differs far more.
RTOL = 1e-9


@torch.no_grad()
def teacher_checksum(model: nn.Module) -> Tensor:
    """A cheap fingerprint of ``model``'s parameters and buffers: float64 ``[tensors, elements, sum, sum of
    magnitudes, sum of squares, sum weighted by the tensor's position]`` (the last catches swapped tensors).

    Shape:
        Output: ``(6,)``, float64, on the CPU.
    """
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    if not tensors:
        return torch.zeros(6, dtype=torch.float64)
    device = tensors[0].device  # one copy to the CPU at the end, not one per tensor
    sums = torch.stack([torch.stack([t.detach().sum(dtype=torch.float64), t.detach().abs().sum(dtype=torch.float64),
                                     t.detach().double().square().sum()]).to(device) for t in tensors]).cpu()
    position = torch.arange(1, len(tensors) + 1, dtype=torch.float64)
    counts = torch.tensor([len(tensors), sum(t.numel() for t in tensors)], dtype=torch.float64)
    return torch.cat([counts, sums.sum(0), (sums[:, 0] * position).sum()[None]])


def ranks_that_differ(sums: Tensor, names: Sequence[str]) -> Dict[str, List[int]]:
    """The ranks whose teacher differs from rank 0's, by teacher name (teachers that agree are left out).

    Args:
        sums: the gathered :func:`teacher_checksum` values.

    Shape:
        sums: ``(world_size, len(names), 6)``.
    """
    scale = sums[0, :, 3:4].abs() + 1.0  # the sum of magnitudes of rank 0's teacher
    differ = ((sums - sums[0]).abs() > RTOL * scale).any(-1)  # (world, teachers)
    out = {n: [r for r in range(sums.shape[0]) if differ[r, i]] for i, n in enumerate(names)}
    return {n: ranks for n, ranks in out.items() if ranks}


def check_teachers_across_ranks(teachers: Mapping[str, nn.Module]) -> bool:
    """Compare the teachers of every rank of the default process group; whether a comparison ran (``False``
    outside a process group, where it is to be tried again at the next step).

    Every rank must call this at the same step (it is a collective).

    Raises:
        InputError: naming the teacher(s) and the ranks whose teacher differs from rank 0's.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    world = dist.get_world_size()
    if world == 1:
        return True
    local = torch.stack([teacher_checksum(t) for t in teachers.values()])
    # NCCL gathers only CUDA tensors; gloo (and the others) CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else local.device
    gathered = [torch.empty_like(local, device=device) for _ in range(world)]
    dist.all_gather(gathered, local.to(device))
    differ = ranks_that_differ(torch.stack(gathered).cpu(), list(teachers))
    if differ:
        which = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))} "
                          f"hold{'' if len(r) > 1 else 's'} another {who(n)} than rank 0" for n, r in differ.items())
        raise InputError(
            f"expected the same teacher on every rank (the teacher is not part of the distiller's state_dict, "
            f"so DistributedDataParallel does not broadcast it), but {which}: their parameter and buffer "
            f"checksums differ. Build each teacher from the same seed (torch.manual_seed before building it) "
            f"or load the same weights into it on every rank")
    return True

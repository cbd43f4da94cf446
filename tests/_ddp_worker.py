"""One rank of the DistributedDataParallel check in test_reliability.py; also its shared helpers.

Run as ``python _ddp_worker.py OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.
Each rank trains the distiller on its half of every batch, once per loss in ``LOSSES``, and saves
gradients and parameters; then records what the first step says when rank 1's teacher is another one.
"""
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import TinyDetector  # noqa: E402

from lrdet_core import RECOMMENDED_ALPHA, BridgeDistiller, LRDetError, SplitPoints  # noqa: E402

TINY_SPLIT = SplitPoints(backbone="backbone", neck="neck")
STEPS, BATCH, LR = 2, 4, 0.1
EVERY, EVERY_STEPS = 2, 3  # the distill_every run: steps 0 and 2 distil, step 1 does not
LOSSES = ("fgd", "mse", "l1", "cwd")


def without_bn(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by GroupNorm: per-sample statistics, so that a split batch computes
    exactly what the whole batch computes (BatchNorm's batch statistics would differ per rank)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.GroupNorm(2, child.num_features))
        else:
            without_bn(child)
    return model


def gn_tiny(seed: int, neck_channels: int = 16) -> TinyDetector:
    torch.manual_seed(seed)
    return without_bn(TinyDetector(neck_channels=neck_channels))


def tiny_batch(seed: int, n: int = BATCH, size: int = 32):
    """Images, targets and an explicit 2x HR view of them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    targets = []
    for _ in range(n):
        x1, y1 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(4, size // 2, (2,), generator=g).tolist()
        targets.append({"boxes": torch.tensor([[x1, y1, x1 + w, y1 + h]], dtype=torch.float32)})
    hr = F.interpolate(images, scale_factor=2.0, mode="bilinear", align_corners=False)
    return images, targets, hr, [{"boxes": t["boxes"] * 2} for t in targets]


def part(data, sl: slice):
    images, targets, hr, hr_targets = data
    return images[sl], targets[sl], hr[sl], hr_targets[sl]


def make_distiller(loss: str = "fgd", **kw) -> BridgeDistiller:
    """Student with 16 neck channels, teacher with 24: 1x1 projectors; FGD adds GcBlocks. A fixed alpha (the
    loss's recommended one) unless given: DDP and one process must weight the term alike."""
    kw.setdefault("alpha", RECOMMENDED_ALPHA[loss])
    d = BridgeDistiller(gn_tiny(0, 16), gn_tiny(1, 24), split_points=TINY_SPLIT, loss=loss, **kw)
    images, targets, hr, hr_targets = tiny_batch(99, n=2)
    return d.materialize(images, targets, hr_images=hr, hr_targets=hr_targets)


def step(model, data) -> torch.Tensor:
    images, targets, hr, hr_targets = data
    out = model(images, targets, hr_images=hr, hr_targets=hr_targets)  # keywords through DDP's forward
    loss = sum(out.values())
    loss.backward()
    return loss.detach()


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = BATCH // world
    result = {}
    for loss in LOSSES:
        d = make_distiller(loss).train()
        ddp = DDP(d)  # deliberately without find_unused_parameters=True
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        run = result[loss] = {"grads": [], "missing": []}
        for s in range(STEPS):
            opt.zero_grad(set_to_none=True)
            step(ddp, part(tiny_batch(s), slice(rank * per, (rank + 1) * per)))
            run["missing"].append([n for n, p in d.named_parameters() if p.grad is None])
            run["grads"].append({n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None})
            opt.step()
        run["params"] = {n: p.detach().clone() for n, p in d.named_parameters()}
        run["teachers_compared"] = d._teachers_compared

    # distill_every=2 (steps 0 and 2 distil, step 1 is a plain LR step): without find_unused_parameters, the
    # distillation-only parameters (projectors, FGD's GcBlocks) still get (zero) gradients at the skipped step.
    d = make_distiller("fgd", distill_every=EVERY).train()
    ddp = DDP(d)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    run = result["every"] = {"grads": [], "missing": [], "counter": [], "keys": []}
    for s in range(EVERY_STEPS):
        opt.zero_grad(set_to_none=True)
        images, targets, hr, hr_targets = part(tiny_batch(s), slice(rank * per, (rank + 1) * per))
        out = ddp(images, targets, hr_images=hr, hr_targets=hr_targets)
        sum(out.values()).backward()
        run["keys"].append(list(out))
        run["counter"].append(int(d.schedule.step))
        run["missing"].append([n for n, p in d.named_parameters() if p.grad is None])
        run["grads"].append({n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None})
        opt.step()

    # SyncBatchNorm in a real process group (BatchNorm student this time).
    torch.manual_seed(0)
    student = nn.SyncBatchNorm.convert_sync_batchnorm(TinyDetector())
    sd = BridgeDistiller(student, gn_tiny(1), split_points=TINY_SPLIT, hr_scale=2.0, alpha=0.005).train()
    images, targets, _, _ = tiny_batch(5, n=2)
    try:
        sum(sd(images, targets).values()).backward()
        result["sync_bn"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        result["sync_bn"] = f"{type(e).__name__}: {e}"
    result["sync_bn_restored"] = all(m.track_running_stats for m in student.modules()
                                     if isinstance(m, nn.SyncBatchNorm))
    result["sync_bn_hooks"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in student.modules())

    # alpha="auto" on each rank's own batch (they differ): the measured terms are averaged over the ranks.
    da = make_distiller("mse", alpha="auto").train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report of the chosen alpha
        images, targets, hr, hr_targets = tiny_batch(10 + rank, n=per)
        dim = 1.0 if rank == 0 else 0.1  # a dark half: other feature magnitudes, another local alpha
        images, hr = images * dim, hr * dim
        out = DDP(da)(images, targets, hr_images=hr, hr_targets=hr_targets)
    alpha = da.alphas["teacher"]
    result["auto"] = {"alpha": alpha, "det": sum(v.item() for k, v in out.items() if k.startswith("lr/")),
                      "distill": out["distill/mse"].item() / alpha}
    # Rank 1 builds its teacher from another seed: the first step refuses, on every rank (no rank hangs).
    data = part(tiny_batch(0), slice(rank * per, (rank + 1) * per))
    for case, teachers in {"single": gn_tiny(1 + rank, 24),
                           "two": {"same": gn_tiny(1, 24), "other": gn_tiny(1 + rank, 24)}}.items():
        dt = BridgeDistiller(gn_tiny(0, 16), teachers, split_points=TINY_SPLIT, loss="mse", alpha=1.0)
        dt.materialize(*data[:2], hr_images=data[2], hr_targets=data[3])
        try:
            step(DDP(dt), data)
            result[f"teacher_{case}"] = "no error"
        except LRDetError as e:
            result[f"teacher_{case}"] = str(e)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

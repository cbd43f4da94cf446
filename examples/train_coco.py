"""Train a torchvision detector on any COCO-format dataset: an HR teacher, then an LR student with LRDet.

Three modes, one script, on one machine or many (``torchrun``):

* ``--mode teacher``: the detector at the HR size (``--hr-size``/``--hr-max-size``, the transform's
  ``min_size``/``max_size``); saves ``<out>/teacher.pt``.
* ``--mode lrdet``: the same detector at the LR size (``--lr-size``/``--lr-max-size``), distilled from
  ``--teacher`` through LRDet's bridge branch; saves ``<out>/student.pt``.
* ``--mode baseline``: the LR detector alone (the comparison); saves ``<out>/student.pt``.

``teacher.pt``/``student.pt`` are plain torchvision state dicts: ``model.load_state_dict(torch.load(path))``
into the same torchvision model, no lrdet_core needed. The integration of LRDet is the lines marked
``# LRDet``; the rest is an ordinary torchvision training loop. Helpers beside this file, one job each:
``coco_data.py`` (the json, checked), ``coco_models.py`` (the detectors), ``coco_eval.py`` (COCO AP over all
processes), ``coco_runtime.py`` (torchrun), ``coco_checkpoint.py`` (resume). User guide:
``docs/train-on-your-data.md``.

    python examples/train_coco.py --mode teacher --train-json ... --train-images ... --val-json ... \\
        --val-images ... --out runs/teacher
    torchrun --standalone --nproc_per_node 4 examples/train_coco.py --mode lrdet \\
        --teacher runs/teacher/teacher.pt ... --out runs/lrdet
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import coco_checkpoint as checkpoint  # noqa: E402
import coco_data  # noqa: E402
import coco_eval  # noqa: E402
import coco_models as models  # noqa: E402
import coco_runtime as runtime  # noqa: E402
import harness  # noqa: E402

from lrdet_core import BridgeDistiller, InputError, LOSSES  # noqa: E402
from lrdet_core.warn import warn_user  # noqa: E402

MODES = ("teacher", "lrdet", "baseline")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except the uninformative ones (None, and the flags' True/False)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_Help)
    p.add_argument("--mode", choices=MODES, required=True,
                   help="teacher: the HR detector; lrdet: the LR student, distilled from --teacher; baseline: the LR "
                        "student alone")
    d = p.add_argument_group("data (COCO format; see coco_data.py for what is checked)")
    for split in ("train", "val"):
        d.add_argument(f"--{split}-json", type=Path, required=True, help=f"the {split} annotations")
        d.add_argument(f"--{split}-images", type=Path, required=True, help="the folder file_name is relative to")
    d.add_argument("--no-hflip", dest="hflip", action="store_false", help="no random horizontal flips")
    d.add_argument("--workers", type=int, default=2, help="data loader processes per training process")

    m = p.add_argument_group("detector")
    m.add_argument("--detector", choices=models.DETECTORS, default="retinanet", help="torchvision detector")
    m.add_argument("--backbone", choices=models.BACKBONES, default="resnet50", help="FPN backbone")
    m.add_argument("--norm", choices=models.NORMS, default="bn", help="backbone normalisation (coco_models.py)")
    m.add_argument("--anchor-scale", type=float, default=1.0, help="anchor sizes times this")
    m.add_argument("--score-thresh", type=float, default=0.05, help="lowest score of a kept prediction (evaluation)")
    m.add_argument("--weights", type=Path, help="initial weights: a detector or a classification backbone state "
                   "dict (else from scratch); with --eval-only, the model to evaluate")
    m.add_argument("--hr-size", type=int, nargs="+", default=[800], help="HR min_size (several: multi-scale)")
    m.add_argument("--hr-max-size", type=int, default=1333, help="HR max_size")
    m.add_argument("--lr-size", type=int, nargs="+", default=[600], help="LR min_size (several: multi-scale)")
    m.add_argument("--lr-max-size", type=int, default=1000, help="LR max_size")

    x = p.add_argument_group("LRDet (--mode lrdet)")
    x.add_argument("--teacher", type=Path, help="the HR teacher's state dict (teacher.pt of --mode teacher)")
    x.add_argument("--teacher-backbone", choices=models.BACKBONES, help="default: --backbone")
    x.add_argument("--teacher-norm", choices=models.NORMS, help="default: --norm")
    x.add_argument("--loss", choices=sorted(LOSSES), default="mse", help="feature-distillation loss")
    x.add_argument("--loss-kwargs", type=json.loads, default=None, help='JSON, e.g. \'{"reduction": "mean"}\'')
    x.add_argument("--alpha", type=_alpha, default="auto",
                   help='weight of the distillation term: a number, or "auto" (measured at the first step so '
                        'that alpha * L_FD = alpha_ratio * L_det(LR), averaged over the processes)')
    x.add_argument("--alpha-ratio", type=float, default=0.5, help='with --alpha auto')
    x.add_argument("--no-inherit", dest="inherit", action="store_false",
                   help="do not start the student from the teacher's weights")
    x.add_argument("--level-map", type=json.loads, default=None,
                   help='JSON {student_level: teacher_level} where strides cannot pair levels, e.g. \'{"0": "0"}\'')
    x.add_argument("--hr-source", choices=("teacher", "lr"), default="teacher",
                   help="teacher: the HR view is the image at the teacher's size; lr: the LR image upsampled "
                        "(the paper's setting)")
    x.add_argument("--distill-every", type=int, default=1,
                   help="run the teacher and the bridge on every k-th step only (1: every step; docs/cost.md)")
    x.add_argument("--bridge-crop", type=float, default=1.0,
                   help="run the teacher and the bridge on a random window of this area fraction (1: the whole "
                        "image; docs/cost.md)")

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=12, help="passes over the training set")
    t.add_argument("--batch-size", type=int, default=2, help="images per process and step")
    t.add_argument("--optim", choices=harness.OPTIMIZERS, default="adamw",
                   help="adamw: cosine decay; sgd (momentum 0.9): x0.1 at 2/3 and 8/9 of the steps")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    t.add_argument("--warmup-steps", type=int, default=500, help="linear warm-up (at most a fifth of the steps)")
    t.add_argument("--clip", type=float, default=10.0, help="gradient norm clip (0: off)")
    t.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="autocast on CUDA; auto: bf16 where supported (fp16 uses a GradScaler)")
    t.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    t.add_argument("--seed", type=int, default=0, help="initial weights, data order, flips")
    t.add_argument("--threads", type=int, help="torch intra-op threads per process (default: torch's)")

    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("runs/train_coco"), help="output folder")
    o.add_argument("--log-every", type=int, default=20, help="steps per loss-log entry in metrics.json")
    o.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (the last always)")
    o.add_argument("--keep-checkpoints", type=int, default=2, help="the last N epochs' checkpoints (0: all)")
    o.add_argument("--resume", help="a checkpoint_<epoch>.pt to continue from, or 'latest' (in --out)")
    o.add_argument("--eval-only", action="store_true", help="evaluate --weights and stop")
    args = p.parse_args(argv)
    args.teacher_backbone = args.teacher_backbone or args.backbone
    args.teacher_norm = args.teacher_norm or args.norm
    if args.mode == "lrdet" and args.teacher is None and not args.eval_only:
        p.error("--mode lrdet needs --teacher (the teacher.pt of a --mode teacher run)")
    if args.eval_only and args.weights is None:
        p.error("--eval-only needs --weights (the teacher.pt or student.pt to evaluate)")
    return args


def _alpha(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', but got {text!r}") from None


def _sizes(args, hr: bool):
    return (args.hr_size, args.hr_max_size) if hr else (args.lr_size, args.lr_max_size)


def build_model(args, arch: models.Arch, log) -> tuple:
    """The module to train (a detector, or the distiller around the student) and the detector to evaluate
    and export."""
    model = models.build(arch, *_sizes(args, hr=args.mode == "teacher"), score_thresh=args.score_thresh)
    if args.weights is not None:
        log.info("weights: %s", models.load_weights(model, args.weights, arch))
    if args.mode != "lrdet" or args.eval_only:
        return model, model
    t_arch = arch._replace(backbone=args.teacher_backbone, norm=args.teacher_norm)
    teacher = models.build(t_arch, *_sizes(args, hr=True))
    models.load_detector_state(teacher, models.read_state_dict(args.teacher), args.teacher, "teacher", t_arch)
    if args.weights is not None and args.inherit:
        warn_user("--weights initialised the student, but inheriting from the teacher then overwrites every tensor "
                  "of the same name and shape; pass --no-inherit to keep --weights")
    distiller = BridgeDistiller(model, teacher, loss=args.loss, loss_kwargs=args.loss_kwargs,    # LRDet
                                alpha=args.alpha, alpha_ratio=args.alpha_ratio, inherit=args.inherit,
                                level_map=args.level_map, hr_source=args.hr_source,
                                distill_every=args.distill_every, bridge_crop=args.bridge_crop,
                                check_finite="warn" if args.amp == "fp16" else "raise")
    if distiller.inherit_report is not None:
        log.info("inherited from the teacher: %s", distiller.inherit_report)
    return distiller, model


def autocast_for(args, device: torch.device):
    """The autocast context (CUDA only) and whether fp16 needs a GradScaler."""
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp != "off" and device.type != "cuda":
        raise InputError(f"expected --amp off on {device.type} (autocast here is for CUDA), but got --amp {amp}")
    if amp == "off":
        return contextlib.nullcontext, False
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return partial(torch.autocast, "cuda", dtype=dtype), amp == "fp16"


def optimizer_for(module: nn.Module, args, total_steps: int):
    params = [p for p in module.parameters() if p.requires_grad]
    warmup = min(args.warmup_steps, max(total_steps // 5, 1))
    if args.optim == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
        factor = harness.step_lambda(warmup, total_steps)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        factor = harness.cosine_lambda(warmup, total_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor), params


def train_epoch(step_fn, loader, epoch: int, history: Dict[str, List], step: int, args, rt) -> int:
    """One epoch; every process calls it. Logs the loss terms (averaged over the processes) every
    ``--log-every`` steps and at the end of the epoch. Returns the global step count."""
    from tqdm import tqdm

    running: Dict[str, float] = {}
    n = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not rt.is_main, dynamic_ncols=True,
               leave=False, mininterval=2)
    for i, (images, targets) in enumerate(bar):
        terms = step_fn(images, targets, step)
        step += 1
        if terms is not None:
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + v
            n += 1
        if running and ((i + 1) % args.log_every == 0 or i + 1 == len(loader)):
            history["log"].append({"step": step, "epoch": epoch + 1, **{k: v / n for k, v in running.items()}})
            bar.set_postfix(loss=f"{history['log'][-1]['loss']:.3f}")
            running, n = {}, 0
    bar.close()
    return step


def make_step(ddp: nn.Module, opt, sched, params, scaler, autocast, args, rt):
    """One optimisation step on one batch; returns the loss terms averaged over the processes (None for a
    step that fp16's GradScaler skips)."""
    def step_fn(images, targets, step: int) -> Optional[Dict[str, float]]:
        images = [im.to(rt.device, non_blocking=True) for im in images]
        targets = [{k: v.to(rt.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast():
            losses = ddp(images, targets)                        # LRDet: the distiller returns every term
        loss = sum(losses.values())
        terms = runtime.mean_over_ranks({**losses, "loss": loss}, rt)
        finite = math.isfinite(terms["loss"])
        if not finite and scaler is None:
            raise FloatingPointError(f"non-finite loss at step {step + 1}: {terms}")
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        if scaler is not None:
            scaler.step(opt)  # skipped when the gradients overflowed
            scaler.update()
        else:
            opt.step()
        sched.step()
        return {**terms, "lr": sched.get_last_lr()[0]} if finite else None
    return step_fn


def export(detector: nn.Module, arch: models.Arch, args, path: Path) -> Path:
    """The trained detector as a plain torchvision state dict, checked by loading it into a fresh model."""
    sd = {k: v.detach().cpu() for k, v in detector.state_dict().items()}
    torch.save(sd, path)
    models.loads_into_fresh(torch.load(path, weights_only=True), arch, *_sizes(args, hr=args.mode == "teacher"))
    return path


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = runtime.start(args.device)
    try:
        return run(args, rt)
    finally:
        runtime.stop(rt)


def run(args, rt: runtime.Runtime) -> Optional[Dict]:
    log = runtime.logger(rt)
    t0 = time.time()
    masks = args.detector == "maskrcnn"
    train_split = coco_data.read_coco(args.train_json, args.train_images, masks=masks)
    val_split = coco_data.read_coco(args.val_json, args.val_images, masks=masks, warn=False)  # scored as it is
    coco_data.check_same_categories(train_split, val_split)
    train_set = coco_data.CocoDataset(train_split, hflip=args.hflip, seed=args.seed)
    val_set = coco_data.CocoDataset(val_split)
    arch = models.Arch(args.detector, args.backbone, args.norm, train_split.num_classes, args.anchor_scale)
    models.check_norm_device(arch, rt.device, rt.world)
    log.info("%d processes on %s; train %d images (%d boxes, %d without any), val %d images; %d categories",
             rt.world, rt.device, len(train_set), sum(len(e.boxes) for e in train_split.images),
             train_split.cleanup.empty_images, len(val_set), len(train_split.categories))

    torch.manual_seed(args.seed)  # the same initial weights in every process
    module, detector = build_model(args, arch, log)
    module.to(rt.device)
    autocast, fp16 = autocast_for(args, rt.device)
    if args.out and rt.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {"mode": args.mode, "config": config, "processes": rt.world, "device": str(rt.device),
               "categories": [c._asdict() for c in train_split.categories], "versions": harness.versions()}

    if args.eval_only:
        metrics = coco_eval.evaluate(detector, val_set, rt, args.batch_size)
        if rt.is_main:
            log.info("val: %s", json.dumps(metrics))
            harness.write_json(args.out / "metrics.json", {**summary, "val": metrics, "time_s": time.time() - t0})
        return metrics

    if args.norm == "syncbn" and rt.world > 1:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ddp = module if rt.world == 1 else torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                                  seed=args.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, collate_fn=coco_data.collate,
                                         pin_memory=rt.device.type == "cuda")
    opt, sched, params = optimizer_for(module, args, args.epochs * len(loader))
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    history: Dict[str, List] = {"log": [], "eval": []}
    start_epoch, step = 0, 0
    if args.resume:
        path = checkpoint.latest(args.out) if args.resume == "latest" else Path(args.resume)
        state = checkpoint.load(path)
        checkpoint.check_config(state["config"], config, state["world_size"], rt.world, path)
        checkpoint.restore(state, module, opt, sched, scaler, rt)
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        log.info("resumed from %s at epoch %d, step %d", path, start_epoch, step)
    log.info("%s: %s on %s (%s), %d steps per epoch, %d images per step", args.mode, args.detector, args.backbone,
             args.norm, len(loader), args.batch_size * rt.world)

    if not args.resume:  # each process its own random stream (R-CNN sampling, multi-scale sizes); resumed: restored
        torch.manual_seed(args.seed + 1 + rt.rank)
    step_fn = make_step(ddp, opt, sched, params, scaler, autocast, args, rt)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        module.train()
        step = train_epoch(step_fn, loader, epoch, history, step, args, rt)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
                metrics = coco_eval.evaluate(detector, val_set, rt, args.batch_size)
            if rt.is_main:
                history["eval"].append({"epoch": epoch + 1, "step": step, **metrics})
                log.info("epoch %d: val AP %.4f", epoch + 1, metrics["AP"])
        checkpoint.save(args.out, epoch + 1, step, module, opt, sched, scaler, history, config, rt,
                        keep=args.keep_checkpoints)
        if rt.is_main:
            harness.write_json(args.out / "metrics.json", _summary(summary, history, module, args, t0))

    if rt.is_main:
        out = export(detector, arch, args, args.out / ("teacher.pt" if args.mode == "teacher" else "student.pt"))
        final = _summary(summary, history, module, args, t0)
        harness.write_json(args.out / "metrics.json", final)
        log.info("saved %s (a plain torchvision %s state dict); val: %s", out, type(detector).__name__,
                 json.dumps(final.get("val")))
        return final
    return None


def _summary(summary: Dict, history: Dict[str, List], module: nn.Module, args, t0: float) -> Dict:
    out = {**summary, "log": history["log"], "eval": history["eval"], "time_s": time.time() - t0}
    if history["eval"]:
        out["val"] = {k: v for k, v in history["eval"][-1].items() if k not in ("epoch", "step")}
    if isinstance(module, BridgeDistiller):
        out["alpha"] = module.alphas
    return out


if __name__ == "__main__":
    main()

"""Write a YOLO model as an Ultralytics checkpoint, one that ``YOLO(path)`` loads without lrdet-core.

Ultralytics is AGPL-3.0 licensed; it is imported here, in :mod:`lrdet_core.adapters.ultralytics` and in
:mod:`lrdet_core.adapters.yolo_loss` only.
"""
from __future__ import annotations

import datetime
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import InputError
from .yolo_loss import hyperparameters


def save_checkpoint(model: nn.Module, path: Union[str, Path], train_args: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model`` (e.g. ``distiller.student``) as an Ultralytics checkpoint: ``YOLO(path)`` loads it.

    The file holds a float32 copy of the model in eval mode (no criterion) under ``"model"``, as Ultralytics'
    trainer saves its EMA, with ``train_args`` (default: the model's ``args``) and the version that wrote it.

    Args:
        model: a YOLO ``DetectionModel``.
        path: where to write (``.pt``).
        train_args: the training arguments ``YOLO(path).overrides`` will hold.

    Example:
        >>> from ultralytics import YOLO
        >>> import tempfile, os
        >>> m = YOLO("yolov8n.yaml").model
        >>> with tempfile.TemporaryDirectory() as d:
        ...     type(YOLO(save_checkpoint(m, os.path.join(d, "student.pt"))).model).__name__
        'DetectionModel'
    """
    import ultralytics

    from . import ultralytics_family

    if ultralytics_family(model) is None:
        raise InputError(f"expected a YOLO DetectionModel to save, but got {type(model).__name__}")
    copy = deepcopy(model).float().eval()
    if hasattr(copy, "criterion"):
        copy.criterion = None  # training-only state, as Ultralytics strips it
    args = dict(train_args) if train_args is not None else dict(vars(hyperparameters(model)))
    args.setdefault("task", "detect")
    path = Path(path)
    torch.save({"model": copy, "ema": None, "train_args": args, "date": datetime.datetime.now().isoformat(),
                "version": ultralytics.__version__, "license": "AGPL-3.0 (https://ultralytics.com/license)"}, path)
    return path


"""A YOLO model's own criterion, built once and kept on the model, and its loss vector as named terms.

Ultralytics keeps a detection model's criterion on the model: ``BaseModel.loss`` builds ``model.criterion`` with
``init_criterion()`` the first time and reuses it, and the trainer steps schedules on that very object
(``BaseTrainer._do_train`` calls ``model.criterion.update()`` at the end of every epoch, which moves
``E2ELoss``'s weights from the one-to-many to the one-to-one head; ``resume_training`` rebuilds it with
``updates = start_epoch - 1``). lrdet-core's LR and bridge passes use that same object, so a schedule step that
reaches ``model.criterion`` reaches them too.

Criteria (Ultralytics 8.4):

* ``v8DetectionLoss`` (YOLOv8, YOLO11): a ``(3,)`` vector ``box, cls, dfl`` (gains and batch size included);
* ``E2ELoss`` (YOLO26, whose ``Detect`` head has a one-to-one branch, ``one2one_cv2``): the same three entries,
  each ``o2m * one_to_many + o2o * one_to_one``; with ``reg_max: 1`` (YOLO26) the third is an L1 box term, named
  ``l1``. Its names are those of the detached loss dict it returns, the names Ultralytics' trainer logs.

The vector's sum is what Ultralytics' trainer backpropagates.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from ..errors import LossError


def hyperparameters(model: nn.Module) -> Any:
    """The loss gains the criterion reads (``box``, ``cls``, ``dfl``, and ``epochs`` for ``E2ELoss``'s schedule):
    ``model.args`` as a namespace, with Ultralytics' defaults for what it lacks (``YOLO(...).model.args`` is a
    plain dict; a bare model has none)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    args = getattr(model, "args", None)
    if args is None:
        return get_cfg()
    if isinstance(args, Mapping):
        return IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **args})
    return args


def own_criterion(model: nn.Module) -> Any:
    """``model.criterion``: the model's own criterion, built once.

    Built with ``model.init_criterion()`` and the gains of :func:`hyperparameters` the first time (as
    ``BaseModel.loss`` builds it, without leaving an ``args`` on a model that had none), then reused. A criterion
    keeps the device it was built on (Ultralytics builds it after moving the model); if the model has moved since,
    it is rebuilt on the new device and its schedule state (``updates``, ``o2m``, ``o2o``: every number it holds)
    carried over.

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> m = DetectionModel("yolo26n.yaml", nc=2, verbose=False)
        >>> crit = own_criterion(m)
        >>> type(crit).__name__, crit is m.criterion is own_criterion(m), hasattr(m, "args")
        ('E2ELoss', True, False)
    """
    crit = getattr(model, "criterion", None)
    p = next(model.parameters(), None)
    if crit is not None and (p is None or _device_of(crit) in (None, p.device)):
        return crit
    had, old = hasattr(model, "args"), getattr(model, "args", None)
    model.args = hyperparameters(model)
    try:
        fresh = model.init_criterion()
    finally:
        if had:
            model.args = old
        else:
            del model.args
    if crit is not None:  # moved: the schedule goes on where it was
        for k, v in vars(crit).items():
            if isinstance(v, (int, float)) and hasattr(fresh, k):
                setattr(fresh, k, v)
    model.criterion = fresh
    return fresh


def _device_of(crit: Any) -> Optional[torch.device]:
    """The device a criterion was built on (``v8DetectionLoss.device``, or that of ``E2ELoss``'s parts)."""
    for obj in (crit, *getattr(crit, "__dict__", {}).values()):
        d = getattr(obj, "device", None)
        if isinstance(d, torch.device):
            return d
    return None


def loss_names(crit: Any, items: Any) -> List[str]:
    """The names of a criterion's loss vector, without ``_loss``: the keys of the detached loss dict it returned
    (Ultralytics 8.4), else its ``loss_names`` (or its one-to-many part's).

    Example:
        >>> loss_names(None, {"box_loss": 0, "cls_loss": 0, "l1_loss": 0})
        ['box', 'cls', 'l1']
    """
    if isinstance(items, Mapping):
        names = list(items)
    else:
        names = list(getattr(crit, "loss_names", None) or getattr(getattr(crit, "one2many", None), "loss_names", ()))
    return [str(n).replace("_loss", "") for n in names]


def named_losses(crit: Any, preds: Any, batch: Mapping[str, Tensor], role: str, where: str) -> Dict[str, Tensor]:
    """``crit(preds, batch)``'s loss vector as ``{name: term}`` (see :func:`loss_names`).

    Raises:
        LossError: if the criterion does not return one ``(K,)`` vector with one name per entry.
    """
    vec, items = crit(preds, batch)
    names = loss_names(crit, items)
    if not isinstance(vec, Tensor) or vec.dim() != 1 or len(names) != vec.numel():
        got = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
        raise LossError(f"expected the {role}'s criterion ({type(crit).__name__}) to return one loss per name in "
                        f"{names} in the {where}, but it returned {got}")
    return dict(zip(names, vec.unbind()))

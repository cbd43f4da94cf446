"""lrdet-core: better detectors on low-resolution images, distilled from a high-resolution teacher.

The core imports only torch; torchvision and triton are imported only where used.

Example:
    >>> from lrdet_core import BridgeDistiller, SplitPoints
    >>> SplitPoints(backbone="backbone.body", neck="backbone.fpn").neck
    'backbone.fpn'
"""
from .adapters import SplitPoints, TORCHVISION_SPLIT_POINTS
from .align import resample_to_hr
from .context import DistillContext
from .distiller import BridgeDistiller
from .errors import (InputError, LevelMatchError, LossError, LRDetError, MissingTeacherError, NonFiniteError,
                     SplitPointError)
from .inherit import InheritReport, inherit_weights
from .losses import LOSSES, RECOMMENDED_ALPHA, build_loss

__version__ = "0.1.0"

__all__ = [
    "BridgeDistiller", "SplitPoints", "TORCHVISION_SPLIT_POINTS", "DistillContext", "resample_to_hr",
    "inherit_weights", "InheritReport", "LOSSES", "RECOMMENDED_ALPHA", "build_loss",
    "LRDetError", "SplitPointError", "LevelMatchError", "InputError", "LossError", "NonFiniteError",
    "MissingTeacherError",
]

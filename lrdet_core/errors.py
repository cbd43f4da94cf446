"""One exception family for everything lrdet-core rejects.

Every error says what was expected, what arrived, and (where it helps) what to do.
Catch :class:`LRDetError` to catch them all.
"""


class LRDetError(Exception):
    """Base class of every error raised by lrdet-core for bad input or configuration."""


class SplitPointError(LRDetError):
    """A split point (dotted module path) is unknown, never reached, or returns an unusable value."""


class LevelMatchError(LRDetError):
    """Student and teacher pyramid levels cannot be paired (strides, shapes or counts disagree)."""


class InputError(LRDetError):
    """Images, targets or the high-resolution view do not fit together."""


class LossError(LRDetError):
    """A distillation loss got inputs it cannot use, or its name is unknown."""


class NonFiniteError(LRDetError):
    """A distillation term is NaN or Inf."""


class MissingTeacherError(LRDetError):
    """A distiller without its teacher was asked to train: copies (``copy.deepcopy``, pickle) leave it out."""

"""Recording a detector's forward without changing it: its features, stand-ins and hooks for one call.

Everything here is scoped: a hook is removed, a module swapped back and a BatchNorm flag restored when the
``with`` block ends, also when the forward raises. Nothing in the user's model is rewritten.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
    >>> with Recorder() as rec:
    ...     rec.output_of(net[0], "backbone")
    ...     _ = net(torch.zeros(1, 3, 8, 8))
    >>> rec.feats["backbone"].keys, tuple(rec.feats["backbone"].tensors[0].shape)
    (['0'], (1, 4, 4, 4))
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from .errors import SplitPointError
from .paths import get_module, swapped

__all__ = ["Feats", "StandIn", "Recorder", "StopForward", "hook", "bn_stats_frozen", "attr_set", "canvas_of"]


class StopForward(Exception):
    """Raised by a hook to end a forward early (the teacher stops right after its neck)."""


class Feats:
    """A split point's output as ordered (name, tensor) pairs plus a way to rebuild the original type.

    A split point may return a tensor, a list/tuple or a dict of ``N x C x H x W`` tensors.

    Example:
        >>> import torch
        >>> f = Feats({"p3": torch.zeros(1, 2, 4, 4)}, "neck")
        >>> f.keys, type(f.rebuild([torch.ones(1, 2, 4, 4)])).__name__
        (['p3'], 'dict')
    """

    def __init__(self, out: Any, where: str):
        if isinstance(out, Tensor):
            self.keys, self.tensors, self._kind = ["0"], [out], "tensor"
        elif isinstance(out, Mapping):
            self.keys, self.tensors, self._kind = [str(k) for k in out], list(out.values()), type(out)
            self._orig_keys = list(out)
        elif isinstance(out, (list, tuple)):
            self.keys, self.tensors, self._kind = [str(i) for i in range(len(out))], list(out), type(out)
        else:
            raise SplitPointError(f"expected the {where} to return a tensor, a list/tuple of tensors or a dict of "
                                  f"tensors, but it returned {type(out).__name__}")
        bad = [k for k, t in zip(self.keys, self.tensors) if not (isinstance(t, Tensor) and t.dim() == 4)]
        if bad or not self.tensors:
            got = {k: (tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__)
                   for k, t in zip(self.keys, self.tensors)}
            raise SplitPointError(f"expected the {where} to return N x C x H x W tensors, but got {got}")

    def rebuild(self, tensors: Sequence[Tensor]) -> Any:
        """The original structure (tensor, list, tuple or mapping) holding ``tensors`` instead."""
        if self._kind == "tensor":
            return tensors[0]
        if self._kind in (list, tuple):
            return self._kind(tensors)
        try:
            return self._kind(zip(self._orig_keys, tensors))
        except TypeError:  # a Mapping type that cannot be built from pairs
            return dict(zip(self._orig_keys, tensors))

    def replaced(self, tensors: Sequence[Tensor]) -> "Feats":
        """The same names with other tensors (e.g. resampled ones)."""
        new = object.__new__(Feats)
        new.__dict__.update(self.__dict__)
        new.tensors = list(tensors)
        return new

    @property
    def batch(self) -> int:
        return int(self.tensors[0].shape[0])


class StandIn(nn.Module):
    """Takes a module's place for one call; every other attribute is read from the original.

    torchvision calls ``transform.postprocess`` and reads attributes of replaced modules, so a bare
    replacement would break the model in ways that only show at run time.
    """

    def __init__(self, original: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: no duplicate parameters
        object.__setattr__(self, "_fn", fn)
        self.training = original.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


@contextmanager
def hook(module: nn.Module, fn: Callable, pre: bool = False) -> Iterator[None]:
    """A forward (or forward-pre) hook on ``module`` for the duration of the block."""
    handle = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers use batch statistics but do not update their running ones.

    The bridge reuses the student's neck and head; without this, every BN in them would average HR
    statistics into the running estimates the LR student is evaluated with.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False  # with training=True: batch stats, no running update, no counter
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


@contextmanager
def attr_set(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` for the duration of the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def canvas_of(x: Any, where: str) -> Tuple[int, int]:
    """(H, W) of an image batch, or a clear error when the module received something else."""
    if not (isinstance(x, Tensor) and x.dim() == 4):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SplitPointError(f"expected the {where} to receive the image batch (N, C, H, W) as its first input, "
                              f"but it received {got}")
    return int(x.shape[-2]), int(x.shape[-1])


class Recorder:
    """Hooks and stand-ins for one forward, all removed when the ``with`` block ends.

    ``output_of`` records a module's output as :class:`Feats` under a name (``feats[name]``), ``input_of``
    its first input, ``once`` rejects a module called twice in one forward, ``swap`` puts a stand-in at a
    dotted path, ``stop_after`` ends the forward after a module (catch :class:`StopForward`), and ``enter``
    takes any other context manager. Values seen are in ``feats``, ``canvas`` and ``seen``.
    """

    def __init__(self) -> None:
        self.feats: Dict[str, Feats] = {}
        self.canvas: Dict[str, Tuple[int, int]] = {}
        self.seen: Dict[str, Any] = {}
        self._stack = ExitStack()

    def __enter__(self) -> "Recorder":
        self._stack.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self._stack.__exit__(*exc)

    def enter(self, cm: Any) -> Any:
        return self._stack.enter_context(cm)

    def output_of(self, module: nn.Module, name: str, where: Optional[str] = None, *, copy: bool = False,
                  canvas: bool = False, stop: bool = False, keep: bool = True) -> None:
        """Record ``module``'s output as ``feats[name]``.

        Args:
            copy: hand the model a copy, so that an in-place op after the module (``ReLU(inplace=True)``)
                cannot change the recorded tensors.
            canvas: also record the (H, W) of the module's first input as ``canvas[name]``.
            stop: end the forward right after the module.
            keep: ``False`` records nothing but still rejects a second call (see :meth:`once`).
        """
        where = where or name
        calls = [0]

        def on_output(mod: nn.Module, inputs: Any, output: Any) -> Any:
            calls[0] += 1
            if calls[0] > 1:
                raise SplitPointError(
                    f"expected the {where} to be called once per forward, taking every level and returning every "
                    f"level, but it was called a second time in one forward (a neck applied once per level?). "
                    f"Point the split point at a module that wraps the per-level calls, or wrap them in one "
                    f"nn.Module")
            if canvas:
                self.canvas[name] = canvas_of(inputs[0] if inputs else None, where)
            if keep or copy:
                feats = Feats(output, where)
                if keep:
                    self.feats[name] = feats
            if stop:
                raise StopForward
            if copy:
                return feats.rebuild([t.clone() for t in feats.tensors])
            return None
        self.enter(hook(module, on_output))

    def input_of(self, module: nn.Module, name: str) -> None:
        """Record the first input of ``module`` as ``seen[name]`` (the last call's)."""
        def on_input(mod: nn.Module, inputs: Tuple[Any, ...]) -> None:
            self.seen[name] = inputs[0] if inputs else None
        self.enter(hook(module, on_input, pre=True))

    def result_of(self, module: nn.Module, name: str) -> None:
        """Record the raw output of ``module`` as ``seen[name]``."""
        def on_output(mod: nn.Module, inputs: Any, output: Any) -> None:
            self.seen[name] = output
        self.enter(hook(module, on_output))

    def swap(self, model: nn.Module, path: str, fn: Callable[..., Any]) -> None:
        """Put a :class:`StandIn` calling ``fn`` at ``path`` of ``model`` for the block."""
        self.enter(swapped(model, path, StandIn(get_module(model, path), fn)))


"""Focal and global distillation (FGD): box-aware feature imitation plus a learnable relation term."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lrdet_core.errors import LossError
from lrdet_core.losses._common import (Levels, acc_dtype, check_backend, check_levels, check_pair,
                                       check_positive, compiled, kernel_import, no_autocast,
                                       resolve_backend, triton_inputs)
from lrdet_core.losses.fgd_masks import fgd_masks, fgd_masks_levels  # noqa: F401 - FGD's masks, importable here

#: The FGD paper's weights per detector family: ``temp`` and the weights of the four terms.
FGD_PRESETS: Dict[str, Dict[str, float]] = {
    "retinanet": {"temp": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lam": 5e-6},
    "fcos": {"temp": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lam": 8e-6},
    "rcnn": {"temp": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lam": 5e-7},
}
_HYPER = ("temp", "alpha", "beta", "gamma", "lam")


# ---------------------------------------------------------------------------- attention


def spatial_attention(x: Tensor, temp: float) -> Tensor:
    r"""Spatial attention :math:`A^S(x) = HW \cdot \mathrm{softmax}_{hw}(\mathrm{mean}_c |x| / temp)`.

    Shape:
        - x: :math:`(N, C, H, W)`; output: :math:`(N, H, W)`, each map summing to :math:`HW`.

    Example:
        >>> spatial_attention(torch.ones(2, 3, 4, 5), temp=0.5).sum(dim=(1, 2))
        tensor([20., 20.])
    """
    n, _, h, w = x.shape
    logits = x.abs().mean(dim=1).reshape(n, h * w) / temp
    return (h * w * torch.softmax(logits, dim=1)).reshape(n, h, w)


def channel_attention(x: Tensor, temp: float) -> Tensor:
    r"""Channel attention :math:`A^C(x) = C \cdot \mathrm{softmax}_c(\mathrm{mean}_{hw} |x| / temp)`.

    Shape:
        - x: :math:`(N, C, H, W)`; output: :math:`(N, C)`, each row summing to :math:`C`.

    Example:
        >>> channel_attention(torch.ones(2, 3, 4, 5), temp=0.5)
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    return x.shape[1] * torch.softmax(x.abs().mean(dim=(2, 3)) / temp, dim=1)


# ------------------------------------------------------------------------------ GcBlock


class GcBlock(nn.Module):
    r"""The global-context block of FGD's relation term; ``forward`` returns the added term.

    .. math::
        G(x) = W_2\,\mathrm{ReLU}\big(\mathrm{LN}(W_1 \textstyle\sum_{hw} p_{hw} x_{:,hw})\big),
        \qquad p = \mathrm{softmax}_{hw}(w_k^\top x_{:,hw} + b_k)

    :math:`W_1: C \to C/2`, :math:`W_2: C/2 \to C` (1x1 convs with bias), LN = LayerNorm over
    ``(C/2, 1, 1)``. :math:`W_2` starts at zero, so :math:`G \equiv 0` at initialisation.

    Args:
        channels: :math:`C`, at least 2.

    Shape:
        - x: :math:`(N, C, H, W)`; output: :math:`(N, C, 1, 1)` (added to every cell of ``x``).

    Example:
        >>> GcBlock(4)(torch.randn(2, 4, 3, 5)).shape
        torch.Size([2, 4, 1, 1])

    Reference:
        Cao et al., "GCNet: non-local networks meet squeeze-excitation networks and beyond", 2019;
        used as in Yang et al., CVPR 2022, Eq. (8).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 2:
            raise LossError(f"expected a GcBlock channel count >= 2, but got {channels!r}")
        self.channels = channels
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the FGD authors: kaiming (fan_in) context conv, zero last conv so training starts
        # from the plain squared error.
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.conv_mask.weight.dtype)
        n, c, h, w = x.shape
        weights = torch.softmax(self.conv_mask(x).reshape(n, h * w, 1), dim=1)
        context = torch.bmm(x.reshape(n, c, h * w), weights).reshape(n, c, 1, 1)
        return self.channel_add(context)


# ------------------------------------------------------------------------- per level


def _fgd_focal_attention_eager(student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor,
                               temp: float, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    # The teacher is a target (as in the Triton kernels): no gradient reaches it.
    s, t = student.to(dtype), teacher.detach().to(dtype)
    n = s.shape[0]
    as_t, ac_t = spatial_attention(t, temp), channel_attention(t, temp)
    as_s, ac_s = spatial_attention(s, temp), channel_attention(s, temp)
    # Contract channels first: (N,C,H,W) -> (N,H,W) before any mask multiplies.
    per_cell = ((s - t).square() * ac_t[:, :, None, None]).sum(dim=1) * as_t
    l_fg = (per_cell * fg_mask.to(dtype)).sum() / n
    l_bg = (per_cell * bg_mask.to(dtype)).sum() / n
    l_att = ((ac_s - ac_t).abs().sum() + (as_s - as_t).abs().sum()) / n
    return l_fg, l_bg, l_att


def _fgd_focal_attention_kernel() -> Callable:
    # Imported here, on the first Triton call: the kernel module imports triton.
    with kernel_import():
        from lrdet_core.kernels.fgd import fgd_focal_attention_triton
    return fgd_focal_attention_triton


def fgd_global(student: Tensor, teacher: Tensor, gc_student: nn.Module, gc_teacher: nn.Module) -> Tensor:
    r"""FGD's global (relation) term of one level: :math:`\sum (S + G_s(S) - T - G_t(T))^2 / N`.

    The teacher-side block is trained through :math:`T + G_t(T)` even when ``teacher`` is
    detached. Runs eagerly on every backend.

    Example:
        >>> s, t = torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
        >>> fgd_global(s, t, GcBlock(4), GcBlock(4))  # zero-initialised blocks: sum((S - T)^2) / N
        tensor(36., grad_fn=<DivBackward0>)
    """
    check_pair(student, teacher)
    dtype = acc_dtype(student, teacher)
    # T is a constant here, but the teacher-side block still learns through T + G_t(T).
    s, t = student.to(dtype), teacher.detach().to(dtype)
    with no_autocast(s):
        return (s + gc_student(s) - t - gc_teacher(t)).square().sum() / s.shape[0]


def fgd_terms(student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor,
              gc_student: nn.Module, gc_teacher: nn.Module, temp: float,
              backend: str = "auto") -> Dict[str, Tensor]:
    r"""The four unweighted FGD terms of one level, as a dict ``fg``, ``bg``, ``att``, ``glb``.

    .. math::
        L_{fg} = \tfrac{1}{N}\sum M^{fg} A^S_T A^C_T (S - T)^2, \quad
        L_{bg} = \tfrac{1}{N}\sum M^{bg} A^S_T A^C_T (S - T)^2, \\
        L_{att} = \tfrac{1}{N}\big(\sum |A^C_S - A^C_T| + \sum |A^S_S - A^S_T|\big), \quad
        L_{glb} = \tfrac{1}{N}\sum \big(S + G_s(S) - T - G_t(T)\big)^2

    where :math:`A_T` (the teacher's attention) is computed without gradient.

    Shape:
        - student, teacher: :math:`(N, C, H, W)`; fg_mask, bg_mask: :math:`(N, H, W)`.
        - output: four scalars.
    """
    check_pair(student, teacher)
    temp = check_positive("temp", temp)
    n, _, h, w = student.shape
    for name, m in (("fg_mask", fg_mask), ("bg_mask", bg_mask)):
        if not isinstance(m, Tensor) or tuple(m.shape) != (n, h, w):
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise LossError(f"expected {name} of shape {(n, h, w)} (N, H, W of the features), but got {got}")
    backend = resolve_backend(backend, student)
    if backend == "triton":
        s, t = triton_inputs(student, teacher)
        l_fg, l_bg, l_att = _fgd_focal_attention_kernel()([s], [t], [fg_mask], [bg_mask], temp)
    else:
        fn = _fgd_focal_attention_eager if backend == "torch" else compiled(_fgd_focal_attention_eager)
        with no_autocast(student):
            l_fg, l_bg, l_att = fn(student, teacher, fg_mask, bg_mask, temp, acc_dtype(student, teacher))
    l_glb = fgd_global(student, teacher, gc_student, gc_teacher)
    return {"fg": l_fg, "bg": l_bg, "att": l_att, "glb": l_glb}


def fgd_loss(student: Tensor, teacher: Tensor, fg_mask: Tensor, bg_mask: Tensor,
             gc_student: nn.Module, gc_teacher: nn.Module, temp: float, alpha: float, beta: float,
             gamma: float, lam: float, backend: str = "auto") -> Tensor:
    r"""Focal and global distillation loss of one pyramid level.

    .. math::
        \ell = \alpha L_{fg} + \beta L_{bg} + \gamma L_{att} + \lambda L_{glb}

    with the terms of :func:`fgd_terms`. The masks come from :func:`fgd_masks`.

    Args:
        student: student (bridge) features of one level.
        teacher: teacher features of the same level, same shape.
        fg_mask, bg_mask: the level's masks from :func:`fgd_masks`.
        gc_student, gc_teacher: the level's :class:`GcBlock` for each side.
        temp: attention temperature; alpha, beta, gamma, lam: term weights (see ``FGD_PRESETS``).
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"``; the focal and attention
            terms run on it, the GcBlock term always runs eagerly.

    Shape:
        - student, teacher: :math:`(N, C, H, W)`; fg_mask, bg_mask: :math:`(N, H, W)`.
        - output: scalar.

    Example:
        >>> x = torch.randn(2, 4, 3, 5)
        >>> fg, bg = fgd_masks([torch.zeros(0, 4)] * 2, (24, 40), 8, (3, 5))
        >>> fgd_loss(x, x, fg, bg, GcBlock(4), GcBlock(4), **FGD_PRESETS["retinanet"]).item()
        0.0

    Reference:
        Yang et al., "Focal and global knowledge distillation for detectors", CVPR 2022, Eq. (9).
    """
    if resolve_backend(backend, student) == "triton":
        check_pair(student, teacher)
        s, t = triton_inputs(student, teacher)
        # Weights go into the kernel, which folds them into the per-pixel and per-channel factors of its backward.
        kernel = _fgd_focal_attention_kernel()
        l_fg, l_bg, l_att = kernel([s], [t], [fg_mask], [bg_mask], check_positive("temp", temp),
                                   weights=(alpha, beta, gamma))
        return l_fg + l_bg + l_att + lam * fgd_global(student, teacher, gc_student, gc_teacher)
    terms = fgd_terms(student, teacher, fg_mask, bg_mask, gc_student, gc_teacher, temp, backend)
    return alpha * terms["fg"] + beta * terms["bg"] + gamma * terms["att"] + lam * terms["glb"]


# ------------------------------------------------------------------------------- module


class FGDLoss(nn.Module):
    r"""Focal and global distillation summed over matched pyramid levels.

    ``forward(student, teacher, ctx)`` returns :math:`\sum_l \text{fgd\_loss}(S_l, T_l, \dots)` with
    the masks of level :math:`l` built from ``ctx.boxes`` at stride ``ctx.strides[l]`` on
    ``ctx.canvas_size``. The weights come from a preset of the FGD paper; the recommended
    distiller weight is therefore ``alpha = 1`` (see :data:`lrdet_core.losses.RECOMMENDED_ALPHA`).

    The loss owns two :class:`GcBlock` per level (student side, teacher side), trained with the
    student. They need each level's channel count: pass ``channels``, call :meth:`materialize`
    before building the optimizer, or let the first ``forward`` build them (then build the
    optimizer after it). Loading a state dict into an unbuilt loss builds it from the dict.

    Args:
        preset: ``"retinanet"``, ``"fcos"`` or ``"rcnn"`` (Faster/Mask R-CNN); see ``FGD_PRESETS``.
        channels: the channel count of each level, or ``None`` to build lazily.
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"`` (focal and attention terms).
        **overrides: any of ``temp``, ``alpha``, ``beta``, ``gamma``, ``lam`` to replace the preset's.

    Shape:
        - student, teacher: equal-length lists of :math:`(N, C_l, H_l, W_l)` tensors.
        - output: fp32 scalar.

    Example:
        >>> from lrdet_core.context import DistillContext
        >>> feats = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8)]
        >>> ctx = DistillContext.from_features(feats, (128, 128), boxes=[torch.tensor([[8.0, 8.0, 60.0, 40.0]])] * 2)
        >>> loss = FGDLoss("retinanet", channels=[8, 8])
        >>> loss(feats, feats, ctx).item()
        0.0

    Reference:
        Yang et al., "Focal and global knowledge distillation for detectors", CVPR 2022.
    """

    def __init__(self, preset: str = "retinanet", channels: Optional[Sequence[int]] = None,
                 backend: str = "auto", **overrides: float) -> None:
        super().__init__()
        if preset not in FGD_PRESETS:
            raise LossError(f"unknown FGD preset {preset!r}; expected one of {', '.join(map(repr, FGD_PRESETS))}")
        unknown = sorted(set(overrides) - set(_HYPER))
        if unknown:
            raise LossError(f"unknown FGD hyper-parameter(s) {unknown}; expected any of {list(_HYPER)}")
        hyper = {**FGD_PRESETS[preset], **overrides}
        self.preset = preset
        self.temp = check_positive("temp", hyper["temp"])
        for name in ("alpha", "beta", "gamma", "lam"):
            value = hyper[name]
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise LossError(f"expected FGD weight {name} to be a finite number >= 0, but got {value!r}")
            setattr(self, name, float(value))
        self.backend = check_backend(backend)
        self.channels: Optional[Tuple[int, ...]] = None
        self.gc_student = nn.ModuleList()
        self.gc_teacher = nn.ModuleList()
        self._register_load_state_dict_pre_hook(_materialize_from_state_dict, with_module=True)
        if channels is not None:
            self.materialize(channels)

    def materialize(self, channels: Sequence[int], device: Optional[torch.device] = None) -> None:
        """Build the GcBlocks for levels with these channel counts; a no-op if already built so.

        Raises:
            LossError: if the loss was already built for other channel counts.
        """
        try:
            wanted = tuple(int(c) for c in channels)
        except (TypeError, ValueError):
            raise LossError(f"expected channels to be a list of ints, one per level, but got {channels!r}") from None
        if not wanted or any(c < 2 for c in wanted):
            raise LossError(f"expected at least one level and channel counts >= 2, but got {list(wanted)}")
        if self.channels is not None:
            if self.channels != wanted:
                raise LossError(f"FGDLoss was built for channels {list(self.channels)}, but got {list(wanted)}; "
                                f"create a new FGDLoss for a different pyramid")
            return
        for c in wanted:
            self.gc_student.append(GcBlock(c).to(device))
            self.gc_teacher.append(GcBlock(c).to(device))
        self.channels = wanted

    def _check_ctx(self, ctx, s_list: List[Tensor]) -> None:
        hint = ("FGDLoss needs a DistillContext with ground-truth boxes and the stride of each level; "
                "standalone, build one with DistillContext.from_features(teacher_feats, canvas_size, boxes)")
        if ctx is None:
            raise LossError(f"{hint}, but got ctx=None")
        for attr in ("boxes", "strides", "canvas_size"):
            if not hasattr(ctx, attr):
                raise LossError(f"{hint}, but got a {type(ctx).__name__} without .{attr}")
        n = s_list[0].shape[0]
        if len(ctx.boxes) != n:
            raise LossError(f"expected ctx.boxes to hold one (K, 4) tensor per image ({n} images), "
                            f"but got {len(ctx.boxes)}")
        for i, b in enumerate(ctx.boxes):
            if not isinstance(b, Tensor) or (b.numel() and (b.dim() != 2 or b.shape[-1] != 4)):
                got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise LossError(f"expected ctx.boxes[{i}] to be a (K, 4) xyxy tensor, but got {got}")
        if len(ctx.strides) != len(s_list):
            raise LossError(f"expected one stride per level ({len(s_list)} levels) in ctx.strides, "
                            f"but got {list(ctx.strides)}")
        if len(ctx.canvas_size) != 2 or min(ctx.canvas_size) <= 0:
            raise LossError(f"expected ctx.canvas_size to be a positive (H, W), but got {ctx.canvas_size}")

    def _prepare(self, student: Levels, teacher: Levels, ctx) -> Tuple[List[Tensor], List[Tensor], str]:
        s_list, t_list = check_levels(student, teacher)
        self._check_ctx(ctx, s_list)
        channels = [s.shape[1] for s in s_list]
        if self.channels is None:
            self.materialize(channels, device=s_list[0].device)
        elif tuple(channels) != self.channels:
            raise LossError(f"FGDLoss was built for channels {list(self.channels)}, but the features have "
                            f"channels {channels}")
        param = self.gc_student[0].conv_mask.weight
        if param.device != s_list[0].device:
            raise LossError(f"FGDLoss parameters are on {param.device} but the features are on "
                            f"{s_list[0].device}; move the loss with .to(device)")
        return s_list, t_list, resolve_backend(self.backend, s_list[0])

    def _masks(self, ctx, s_list: List[Tensor]) -> List[Tuple[Tensor, Tensor]]:
        # All levels in one vectorised computation (see fgd_masks_levels).
        return fgd_masks_levels(ctx.boxes, ctx.canvas_size, list(ctx.strides), [tuple(s.shape[-2:]) for s in s_list],
                                device=s_list[0].device)

    def terms(self, student: Levels, teacher: Levels, ctx=None) -> Dict[str, Tensor]:
        """The four unweighted terms (``fg``, ``bg``, ``att``, ``glb``), each summed over levels."""
        s_list, t_list, backend = self._prepare(student, teacher, ctx)
        masks = self._masks(ctx, s_list)
        if backend == "triton":
            l_fg, l_bg, l_att = self._focal_triton(s_list, t_list, masks, (1.0, 1.0, 1.0))
            return {"fg": l_fg, "bg": l_bg, "att": l_att, "glb": self._global(s_list, t_list)}
        total: Dict[str, Tensor] = {}
        for i, (s, t, (fg, bg)) in enumerate(zip(s_list, t_list, masks)):
            level = fgd_terms(s, t, fg, bg, self.gc_student[i], self.gc_teacher[i], self.temp, backend)
            total = level if not total else {k: total[k] + v for k, v in level.items()}
        return total

    def _focal_triton(self, s_list: List[Tensor], t_list: List[Tensor], masks: List[Tuple[Tensor, Tensor]],
                      weights: Tuple[float, float, float]) -> Tuple[Tensor, Tensor, Tensor]:
        # All levels in each kernel launch (one streaming pass, one combine and one sum forward; one backward).
        pairs = [triton_inputs(s, t) for s, t in zip(s_list, t_list)]
        kernel = _fgd_focal_attention_kernel()
        return kernel([s for s, _ in pairs], [t for _, t in pairs], [fg for fg, _ in masks], [bg for _, bg in masks],
                      self.temp, weights=weights)

    def _global(self, s_list: List[Tensor], t_list: List[Tensor]) -> Tensor:
        terms = [fgd_global(s, t, self.gc_student[i], self.gc_teacher[i])
                 for i, (s, t) in enumerate(zip(s_list, t_list))]
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()

    def forward(self, student: Levels, teacher: Levels, ctx=None) -> Tensor:
        s_list, t_list, backend = self._prepare(student, teacher, ctx)
        masks = self._masks(ctx, s_list)
        if backend == "triton":
            l_fg, l_bg, l_att = self._focal_triton(s_list, t_list, masks, (self.alpha, self.beta, self.gamma))
            return l_fg + l_bg + l_att + self.lam * self._global(s_list, t_list)
        total: Optional[Tensor] = None
        for i, (s, t, (fg, bg)) in enumerate(zip(s_list, t_list, masks)):
            level = fgd_loss(s, t, fg, bg, self.gc_student[i], self.gc_teacher[i], self.temp,
                             self.alpha, self.beta, self.gamma, self.lam, backend)
            total = level if total is None else total + level
        return total

    def extra_repr(self) -> str:
        return (f"preset={self.preset!r}, temp={self.temp}, alpha={self.alpha}, beta={self.beta}, "
                f"gamma={self.gamma}, lam={self.lam}, "
                f"channels={None if self.channels is None else list(self.channels)}, backend={self.backend!r}")


def _materialize_from_state_dict(module: FGDLoss, state_dict, prefix, *args) -> None:
    # An unbuilt loss has no GcBlocks to load into; the context-conv weights tell their channels.
    if module.channels is not None:
        return
    channels = []
    while f"{prefix}gc_student.{len(channels)}.conv_mask.weight" in state_dict:
        channels.append(state_dict[f"{prefix}gc_student.{len(channels)}.conv_mask.weight"].shape[1])
    if channels:
        module.materialize(channels)

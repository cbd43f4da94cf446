"""Fused Triton kernels for the distillation losses (``backend="triton"``).

One module per loss, named like the loss: :mod:`~lrdet_core.kernels.mse`,
:mod:`~lrdet_core.kernels.l1`, :mod:`~lrdet_core.kernels.cwd`, :mod:`~lrdet_core.kernels.fgd`.
Each holds the Triton kernel(s), a ``torch.autograd.Function`` and a plain function named after
what it computes, over lists of levels (``mse_loss_triton``, ``l1_loss_triton``, ``cwd_loss_triton``
for the losses ``mse_loss``, ``l1_loss``, ``cwd_loss``; ``fgd_focal_attention_triton`` for the
focal and attention terms of ``fgd_loss``, whose GcBlock term is eager), plus a
``SPECIALISATIONS`` tuple listing the (dtype pair, constexpr) combinations the launcher can pick
(every constexpr combination; fp32, bf16 and a bf16 student with an fp32 teacher for CWD and FGD,
whose fp16 code differs from bf16's only in the converts), which ``tests/test_kernels_compile.py``
compiles for sm80 and sm90, as the JIT specialises them for a feature pyramid, and checks for
spills and vector width. ``_cwd_channels_last`` holds CWD's kernels for channels_last features.

This package file imports nothing: Triton is only imported by the kernel modules themselves,
so ``import lrdet_core`` and ``import lrdet_core.kernels`` never pull it in.

Shared conventions (all kernels):

* Forward computes the loss; backward recomputes the gradient from the student and teacher
  (and a few per-row / per-pixel statistics saved by the forward pass) with ``grad_output``
  read on the device and folded in before the one rounding to the student's dtype. No host
  sync (CUDA-graph capture works), no stored gradient buffer, and fp16 gradients under a
  GradScaler keep eager PyTorch's range. Everything saved goes through ``save_for_backward``.
* Every launch goes through :func:`._common.launch`, which enters ``torch.cuda.device`` of the
  tensors: Triton launches on the current device, not on the tensors' one.
* A launch covers up to six pyramid levels: the host packs one slot of arguments per level
  (:func:`._common.launch_levels`) and each program finds its level and its index inside it
  with :func:`._common.level_slot`.
* The teacher is a constant: no gradient flows to it even if it ``requires_grad``.
* Student and teacher may have different dtypes (fp32/bf16/fp16): each has its own pointer
  type and is converted in registers, never copied. Accumulation is fp32; the gradient has the
  student's dtype.
* Offsets are int64. Reductions are two-stage and deterministic: every program writes one
  partial, one program per loss sums the partials in a fixed order. No atomics.
"""

"""Fused Triton kernels for the distillation losses (``backend="triton"``).

One module per loss, named like the loss: :mod:`~lrdet_core.kernels.mse`,
:mod:`~lrdet_core.kernels.l1`, :mod:`~lrdet_core.kernels.cwd`, :mod:`~lrdet_core.kernels.fgd`.
Each holds the Triton kernel(s), a ``torch.autograd.Function`` and a plain function
(``mse_triton``, ``l1_triton``, ``cwd_triton``, ``fgd_focal_attention_triton``), plus a
``SPECIALISATIONS`` tuple listing every (dtype, constexpr) combination the launcher can pick,
which ``tests/test_kernels_compile.py`` compiles for sm80 and sm90 and checks for spills.

This package file imports nothing: Triton is only imported by the kernel modules themselves,
so ``import lrdet_core`` and ``import lrdet_core.kernels`` never pull it in.

Shared conventions (all kernels):

* Gradients are computed in the forward pass into a buffer separate from the student's
  features; backward rescales that buffer by ``grad_output`` read on the device (a kernel
  that skips the rescale when ``grad_output == 1``), so there is no host sync and CUDA-graph
  capture works.
* The teacher is a constant: no gradient flows to it even if it ``requires_grad``.
* Accumulation is fp32 for fp32/bf16/fp16 inputs; the gradient has the student's dtype.
* Offsets are int64. Reductions are two-stage and deterministic: every program writes one
  partial, one single-program kernel sums the partials in a fixed order. No atomics.
"""

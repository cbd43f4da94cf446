"""Feature-distillation losses: a plain function plus a thin ``nn.Module`` per loss.

Every loss module is called as ``loss(student, teacher, ctx)`` where ``student`` and ``teacher``
are equal-length lists of matched pyramid levels (``N x C x H x W`` each) and ``ctx`` is a
:class:`lrdet_core.DistillContext`. It returns a scalar tensor (fp32), summed over levels.
"""

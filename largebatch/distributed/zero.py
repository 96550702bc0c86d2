"""ZeRO-1 with a layer-wise optimizer: ``torch.distributed.optim.ZeroRedundancyOptimizer``.

ZeRO-1 gives each rank whole parameter tensors (it partitions the list of tensors, not their
elements), so every per-tensor norm is already exact on its owner. What is not local is anything
summed over all tensors: the global gradient norm of ``max_grad_norm`` and the non-finite check.
:func:`zero_norm_reducer` reduces exactly those; :func:`zero_redundancy_optimizer` wires it in.
"""

from __future__ import annotations

import torch.distributed as dist

from largebatch.distributed.norms import zero_norm_reducer

__all__ = ["zero_redundancy_optimizer"]


def zero_redundancy_optimizer(params, optimizer_class, process_group: dist.ProcessGroup | None = None, **kwargs):
    """``ZeroRedundancyOptimizer(params, optimizer_class, norm_reducer=zero_norm_reducer(group), **kwargs)``.

    ``params`` may be parameters or parameter groups; ``kwargs`` are ``optimizer_class``'s
    arguments (and ZeroRedundancyOptimizer's own, e.g. ``parameters_as_bucket_view``). Each rank
    then owns whole tensors, and ``max_grad_norm`` / the non-finite policy see all gradients.
    Call ``step()`` on every rank (its parameter broadcast is a collective).
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    kwargs.setdefault("norm_reducer", zero_norm_reducer(process_group))
    return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, process_group=process_group, **kwargs)

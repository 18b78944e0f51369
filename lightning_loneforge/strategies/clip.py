"""Gradient clipping over parameters that live on different device meshes.

`torch.nn.utils.clip_grad_norm_` stacks all per-parameter norms into one tensor, which fails when towers sit on
different meshes. Here parameters are grouped by (mesh, placements), each group's norm is reduced over its
mesh, and the group norms are combined into the global norm (the pattern of torchtitan's expert-parallel clipping).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def _group_key(grad: Tensor) -> tuple:
    if isinstance(grad, DTensor):
        return (grad.device_mesh, tuple(grad.placements))
    return (None, grad.device)


def grads_by_mesh(parameters: Iterable[Tensor]) -> dict[tuple, list[Tensor]]:
    """Parameters with a gradient, grouped so that each group can go through one foreach kernel."""
    groups: dict[tuple, list[Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            groups.setdefault(_group_key(param.grad), []).append(param)
    return groups


def global_grad_norm(parameters: Iterable[Tensor], norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """The norm of all gradients together, as a plain tensor equal on every rank."""
    groups = grads_by_mesh(parameters)
    if not groups:
        return torch.tensor(0.0)
    norms = []
    for params in groups.values():
        norm = get_total_norm([p.grad for p in params], norm_type, error_if_nonfinite)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = norms[0].device
    return get_total_norm([n.to(device) for n in norms], norm_type, error_if_nonfinite)


def clip_grad_norm_by_mesh_(
    parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> Tensor:
    """Like `clip_grad_norm_`, correct for towers on different meshes. Returns the global norm before clipping."""
    parameters = list(parameters)
    total = global_grad_norm(parameters, norm_type, error_if_nonfinite)
    for params in grads_by_mesh(parameters).values():
        clip_grads_with_norm_(params, max_norm, total.to(params[0].grad.device))
    return total


def clip_grad_value_by_mesh_(parameters: Iterable[Tensor], clip_value: float) -> None:
    """Like `clip_grad_value_`, one foreach group per mesh."""
    for params in grads_by_mesh(parameters).values():
        torch.nn.utils.clip_grad_value_(params, clip_value)

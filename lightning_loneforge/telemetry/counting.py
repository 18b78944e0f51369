"""What one training batch is worth: samples, real tokens and model FLOPs (split into 6N and attention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_loneforge.datamodules.batch import PackedBatch


@dataclass(frozen=True)
class BatchFlops:
    """Training (forward + backward) FLOPs of one batch on one device."""

    dense: float
    """6 x matmul parameters x tokens, every tower (vision patches through the vision tower): the MFU basis."""
    attention: float
    """Score and value products of attention, stated apart from `dense`."""


def samples_in(batch: Any) -> int:
    """Samples in a batch: a `PackedBatch`'s packed samples, else the leading dimension of its first tensor."""
    if isinstance(batch, PackedBatch):
        return max(1, batch.num_samples)
    tensor = _first_tensor(batch)
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() else 1


def real_tokens_in(batch: Any) -> int:
    """Tokens that belong to samples (padding excluded): `PackedBatch.num_real_tokens`, else all elements."""
    if isinstance(batch, PackedBatch):
        return max(batch.num_real_tokens, samples_in(batch))
    tensor = _first_tensor(batch)
    return max(int(tensor.numel()), samples_in(batch)) if tensor is not None else samples_in(batch)


def batch_flops(pl_module: Any, batch: Any) -> BatchFlops | None:
    """FLOPs of `batch` as the model states them, or None when it states none.

    Asks `pl_module.flops_per_batch(batch)` (the zoo's `{"llm", "vision", "projector", "attention", "total"}`
    dict) first, else `pl_module.flops_per_token() x real tokens` (no attention term). The answer for the
    latest batch is remembered, so several callbacks asking about the same step cost one computation.
    """
    if _last[0] is batch and _last[1] is pl_module:
        return _last[2]
    flops = _ask_model(pl_module, batch)
    _last[:] = [batch, pl_module, flops]
    return flops


_last: list[Any] = [None, None, None]


def _ask_model(pl_module: Any, batch: Any) -> BatchFlops | None:
    per_batch = getattr(pl_module, "flops_per_batch", None)
    if callable(per_batch) and isinstance(batch, PackedBatch):
        parts = per_batch(batch)
        attention = float(parts.get("attention", 0.0))
        return BatchFlops(dense=float(parts["total"]) - attention, attention=attention)
    per_token = getattr(pl_module, "flops_per_token", None)
    if callable(per_token):
        return BatchFlops(dense=float(per_token()) * real_tokens_in(batch), attention=0.0)
    return None


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None

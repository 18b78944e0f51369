"""Cross-entropy straight from hidden states and the output matrix, chunk by chunk.

The `tokens x vocab` logits never exist at once: only labelled positions are projected, `chunk_size` rows at a
time, and the gradients of each chunk are formed in the forward pass (one pass over the output matrix).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_loneforge.datamodules.batch import IGNORE_INDEX


def shift_labels(labels: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Next-token targets of a packed row: `target[i] = labels[i + 1]`, ignored at each sample's last token."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    targets[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return targets


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, count: int) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            logits = (h @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight:
                grad_logits = torch.softmax(logits, dim=-1)
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad_logits = (grad_logits / count).to(hidden.dtype)
                if need_hidden:
                    grad_hidden[start : start + chunk_size] = grad_logits @ weight
                if need_weight:
                    grad_weight += (grad_logits.t() @ h).to(acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = grad_weight * grad_out.to(grad_weight.dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk_size: int = 4096
) -> tuple[Tensor, int]:
    """Mean cross-entropy over positions whose target is not `IGNORE_INDEX`, and how many there were.

    Args:
        hidden: `[T, hidden]` final hidden states.
        weight: `[vocab, hidden]` output projection.
        targets: `[T]` next-token targets (see `shift_labels`).
        chunk_size: rows projected to the vocabulary at a time.

    Returns:
        `(loss, count)`; the loss is 0 (still attached to the graph) when no position is labelled.
    """
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return (hidden.sum() + weight.sum()) * 0.0, 0
    rows = hidden[keep]
    picked = targets[keep]
    vocab = weight.shape[0]
    if int(picked.max()) >= vocab or int(picked.min()) < 0:
        raise ValueError(f"labels hold ids outside the vocabulary [0, {vocab}): min {picked.min()}, max {picked.max()}")
    return _ChunkedCrossEntropy.apply(rows, weight, picked, chunk_size, count), count


@torch.no_grad()
def chunked_argmax(hidden: Tensor, weight: Tensor, *, chunk_size: int = 4096) -> Tensor:
    """`argmax(hidden @ weight.T)` per row, without the full logits."""
    out = [(hidden[i : i + chunk_size] @ weight.t()).argmax(-1) for i in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(out) if out else hidden.new_empty(0, dtype=torch.long)

"""Attention over packed rows: one call, the fastest backend the machine has.

`attention(q, k, v, cu_seqlens, max_seqlen, causal=...)` takes tokens of several samples back to back
(`[T, heads, head_dim]`) and keeps every sample to itself. Backends, picked in this order:

1. `flash_attn` varlen, when the package imports (CUDA, fp16/bf16);
2. PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16);
3. `flex_attention` with a block-sparse document mask built straight from `cu_seqlens` (no dense `T x T` mask);
4. on the CPU, `grouped`: samples of equal length batched into one `scaled_dot_product_attention` call per
   length (exact; on rows of equal-size images it is 5-7x faster than a loop, and never slower);
5. `sdpa`, a per-sample `scaled_dot_product_attention` loop: the reference the others are tested against.

`LONEFORGE_ATTENTION=flash_attn|varlen|flex|grouped|sdpa` (or `backend=`) forces one.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import torch.nn.functional as F
from torch import Tensor

Window = tuple[int, int]
BACKENDS = ("flash_attn", "varlen", "flex", "grouped", "sdpa")
_FLEX_BLOCK = 128


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    window: Window | None = None,
    backend: str | None = None,
) -> Tensor:
    """Varlen attention of `q [T, Hq, D]` over `k, v [T, Hkv, D]` (`Hkv` divides `Hq`), one sample per segment.

    Args:
        cu_seqlens: `[S + 1]` int32 cumulative segment lengths, `cu_seqlens[-1] == T`.
        max_seqlen: longest segment.
        causal: mask future tokens within each segment.
        window: `(left, right)` sliding window in tokens (flash-attn convention, -1 = unbounded), or None.
        backend: force one of `BACKENDS`; default picks automatically.

    Returns:
        `[T, Hq, D]` attention output.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"attention expects [T, heads, head_dim] tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: kv heads {k.shape[1]} must divide query heads {q.shape[1]}")
    if not cu_seqlens.is_cuda and int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"attention: cu_seqlens[-1]={int(cu_seqlens[-1])} but q has {q.shape[0]} tokens")
    name = backend or os.environ.get("LONEFORGE_ATTENTION") or select_backend(q)
    if name not in BACKENDS:
        raise ValueError(f"attention: unknown backend {name!r}; choose one of {BACKENDS}")
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _IMPLS[name](q, k, v, cu_seqlens, int(max_seqlen), causal, window)


def select_backend(q: Tensor) -> str:
    """Name of the backend `attention` uses for tensors like `q`."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and half and _flash_attn_func() is not None:
        return "flash_attn"
    if q.is_cuda and half and _varlen_attn() is not None:
        return "varlen"
    if q.is_cuda:
        return "flex"
    return "grouped"


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_has_gqa() -> bool:
    return "enable_gqa" in inspect.signature(_varlen_attn()).parameters


def _window_size(causal: bool, window: Window | None) -> Window:
    left, right = window if window is not None else (-1, -1)
    return (left, 0) if causal else (left, right)


def _repeat_kv(x: Tensor, groups: int, head_dim_axis: int = 1) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim_axis)


def _flash_attn(q, k, v, cu, max_seqlen, causal, window) -> Tensor:
    return _flash_attn_func()(
        q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal, window_size=_window_size(causal, window)
    )


def _torch_varlen(q, k, v, cu, max_seqlen, causal, window) -> Tensor:
    kwargs = {"window_size": _window_size(causal, window)}
    if _varlen_has_gqa():
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    else:
        k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // k.shape[1])
    return _varlen_attn()(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def _sdpa_loop(q, k, v, cu, max_seqlen, causal, window) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        ks, vs = _repeat_kv(ks, groups, 0), _repeat_kv(vs, groups, 0)
        mask = None if window is None else _window_mask(end - start, causal, window, q.device)
        outs.append(
            F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None)
            .transpose(0, 1)
        )
    return torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)


def _sdpa_grouped(q, k, v, cu, max_seqlen, causal, window) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    lengths, starts = cu.diff().long(), cu[:-1].long()
    out = torch.empty_like(q)
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        index = (starts[lengths == length][:, None] + torch.arange(length, device=q.device)).reshape(-1)
        qs, ks, vs = (x.index_select(0, index).unflatten(0, (-1, length)).transpose(1, 2) for x in (q, k, v))
        ks, vs = _repeat_kv(ks, groups), _repeat_kv(vs, groups)
        mask = None if window is None else _window_mask(length, causal, window, q.device)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None)
        out.index_copy_(0, index, o.transpose(1, 2).flatten(0, 1))
    return out


def _window_mask(n: int, causal: bool, window: Window, device) -> Tensor:
    pos = torch.arange(n, device=device)
    rel = pos[None, :] - pos[:, None]  # key - query
    left, right = _window_size(causal, window)
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= rel >= -left
    if right >= 0:
        mask &= rel <= right
    return mask


def _flex(q, k, v, cu, max_seqlen, causal, window) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    total = q.shape[0]
    fn = flex_attention
    if q.is_cuda:  # compiled kernel: pad the row to whole blocks (one extra segment) so lengths stay block-aligned
        fn = _compiled_flex()
        pad = -total % _FLEX_BLOCK
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
            cu = torch.cat([cu, cu.new_full((1,), total + pad)])
    block_mask = document_block_mask(cu, q.shape[0], causal=causal, window=window)
    gqa = k.shape[1] != q.shape[1]
    q, k, v = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    with torch.autocast(q.device.type, enabled=False):  # inductor's flex lowering fails inside autocast
        out = fn(q, k, v.to(q.dtype), block_mask=block_mask, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)[:total]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def document_block_mask(
    cu_seqlens: Tensor, total: int, *, causal: bool, window: Window | None = None, block: int = _FLEX_BLOCK
):
    """A flex-attention `BlockMask` keeping each `cu_seqlens` segment to itself.

    Built from per-block document ranges (`O((T / block)^2)` booleans), never a dense `T x T` mask.
    Blocks wholly inside one document (and, if causal, strictly below the diagonal) are marked full.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    doc = torch.searchsorted(cu[1:], torch.arange(total, device=device), right=True)
    n_blocks = -(-total // block)
    padded = torch.full((n_blocks * block,), -1, dtype=torch.int64, device=device)
    padded[:total] = doc
    per_block = padded.view(n_blocks, block)
    lo = torch.where(per_block >= 0, per_block, per_block.new_full((), 1 << 40)).amin(1)
    hi = per_block.amax(1)
    single = (lo == hi) & (per_block >= 0).all(1)
    touch = (lo[None, :] <= hi[:, None]) & (hi[None, :] >= lo[:, None])  # [q_block, kv_block]
    idx = torch.arange(n_blocks, device=device)
    full = touch & single[:, None] & single[None, :] & (lo[:, None] == lo[None, :])
    if causal:
        touch &= idx[None, :] <= idx[:, None]
        full &= idx[None, :] < idx[:, None]
    if window is not None:
        full &= False
    partial = touch & ~full

    def as_kv(selected: Tensor) -> tuple[Tensor, Tensor]:
        counts = selected.sum(1, dtype=torch.int32)
        order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    doc_ids = padded
    left, right = _window_size(causal, window) if window is not None else (-1, -1)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = doc_ids[q_idx] == doc_ids[kv_idx]
        if causal:
            keep = keep & (kv_idx <= q_idx)
        if left >= 0:
            keep = keep & (kv_idx >= q_idx - left)
        if right >= 0:
            keep = keep & (kv_idx <= q_idx + right)
        return keep

    kv_num, kv_idx = as_kv(partial)
    full_num, full_idx = as_kv(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(total, total)
    )


_IMPLS = {
    "flash_attn": _flash_attn,
    "varlen": _torch_varlen,
    "flex": _flex,
    "grouped": _sdpa_grouped,
    "sdpa": _sdpa_loop,
}

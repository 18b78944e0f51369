"""FlashAttention-4 (CuTe DSL, `flash-attn-4`) as the zoo's varlen attention backend, for the benchmark only.

The zoo's `attention()` picks `flash_attn` (the FA2 package) when it imports; FA4 lives in `flash_attn.cute`
with another signature. `install_fa4()` puts an adapter in the zoo's `flash_attn` slot, so every tower's
varlen attention runs FA4. The call is kept out of `torch.compile` graphs (`torch.compiler.disable`): the CuTe
kernels are launched through their own JIT. Requested as a proper zoo backend in benchmarks/NOTES.md.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fa4_available() -> str | None:
    """None when FA4 imports and the GPU is Hopper/Blackwell, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        return f"compute capability {torch.cuda.get_device_capability()} (FA4 needs 9.x or 10.x)"
    try:
        from flash_attn.cute import flash_attn_varlen_func  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means: not available
        return f"flash_attn.cute does not import: {type(err).__name__}: {err}"
    return None


@torch.compiler.disable
def fa4_varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int, causal: bool, window) -> Tensor:
    """The zoo backend signature: `[T, H, D]` in, `[T, H, D]` out; GQA handled by the kernel."""
    from flash_attn.cute import flash_attn_varlen_func

    left, right = window if window is not None else (None, None)
    left = None if left is None or left < 0 else left
    right = None if right is None or right < 0 else right
    if causal:
        right = None
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        causal=causal, window_size=(left, right),
    )
    return out[0] if isinstance(out, tuple) else out


def install_fa4() -> str:
    """Route the zoo's attention to FA4; returns the backend name now in use ("fa4", or why not)."""
    why_not = fa4_available()
    if why_not is not None:
        return f"varlen (FA4 unavailable: {why_not})"
    from lightning_loneforge.model_zoo import attention as zoo_attention

    zoo_attention._IMPLS["flash_attn"] = fa4_varlen
    zoo_attention._flash_attn_func = lambda: fa4_varlen
    return "fa4"


def check_fa4_matches_varlen(device: torch.device) -> float:
    """Max |FA4 - varlen_attn| on a random packed row (ViT-like head dim 80 and LLM-like GQA 128)."""
    from lightning_loneforge.model_zoo import attention as zoo_attention

    gen = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0, 700, 1900, 4096], dtype=torch.int32, device=device)
    worst = 0.0
    for heads, kv_heads, dim, causal in ((16, 16, 80, False), (12, 2, 128, True)):
        q = torch.randn(4096, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(4096, kv_heads, dim, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(4096, kv_heads, dim, device=device, dtype=torch.bfloat16, generator=gen)
        ref = zoo_attention.attention(q, k, v, cu, 2196, causal=causal, backend="varlen")
        out = fa4_varlen(q, k, v, cu, 2196, causal, None)
        worst = max(worst, float((out.float() - ref.float()).abs().max()))
    return worst

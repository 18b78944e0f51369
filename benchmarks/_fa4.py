"""FlashAttention-4 (CuTe DSL, `flash-attn-4`) as the zoo's varlen attention backend, for the benchmark only.

The zoo's `attention()` picks `flash_attn` (the FA2 package) when it imports; FA4 lives in `flash_attn.cute`
with another signature. `install_fa4()` puts an adapter in the zoo's `flash_attn` slot, so every tower's
varlen attention runs FA4. The call is kept out of `torch.compile` graphs (`torch.compiler.disable`): the CuTe
kernels are launched through their own JIT. Requested as a proper zoo backend in benchmarks/NOTES.md.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

NATIVE_HEAD_DIMS = (64, 128)
"""Head dims FA4 runs as they are; others are zero-padded to `PADDED_HEAD_DIM` (the ViT's 80)."""
PADDED_HEAD_DIM = 128


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
    dim = q.shape[-1]
    if dim not in NATIVE_HEAD_DIMS:  # FA4 4.0.0b36 on SM90: wrong dq at head dim 80 (upstream PR #2896)
        q, k, v = (F.pad(x, (0, PADDED_HEAD_DIM - dim)) for x in (q, k, v))  # zero columns: same scores
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        causal=causal, window_size=(left, right), softmax_scale=dim**-0.5,
    )
    out = out[0] if isinstance(out, tuple) else out
    return out if out.shape[-1] == dim else out[..., :dim]


_ZOO_DEFAULTS: dict = {}


def install_fa4() -> str:
    """Route the zoo's attention to FA4; returns the backend name now in use ("fa4", or why not)."""
    why_not = fa4_available()
    if why_not is not None:
        return f"varlen (FA4 unavailable: {why_not})"
    zoo_attention = importlib.import_module("lightning_loneforge.model_zoo.attention")

    _ZOO_DEFAULTS.setdefault("impl", zoo_attention._IMPLS["flash_attn"])
    _ZOO_DEFAULTS.setdefault("probe", zoo_attention._flash_attn_func)
    zoo_attention._IMPLS["flash_attn"] = fa4_varlen
    zoo_attention._flash_attn_func = lambda: fa4_varlen
    return "fa4"


def uninstall_fa4() -> None:
    """Give the zoo its own backend choice back."""
    zoo_attention = importlib.import_module("lightning_loneforge.model_zoo.attention")

    if _ZOO_DEFAULTS:
        zoo_attention._IMPLS["flash_attn"] = _ZOO_DEFAULTS["impl"]
        zoo_attention._flash_attn_func = _ZOO_DEFAULTS["probe"]


def check_fa4_matches_varlen(device: torch.device) -> float:
    """Max |FA4 - varlen_attn| / max |varlen_attn| over outputs and q/k/v gradients on a random packed row (ViT-like head dim 80,
    LLM-like GQA 12/2 with head dim 128, causal)."""
    zoo_attention = importlib.import_module("lightning_loneforge.model_zoo.attention")

    gen = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0, 700, 1900, 4096], dtype=torch.int32, device=device)
    worst = 0.0
    for heads, kv_heads, dim, causal in ((16, 16, 80, False), (12, 2, 128, True)):
        shapes = ((4096, heads, dim), (4096, kv_heads, dim), (4096, kv_heads, dim))
        inputs = [torch.randn(s, device=device, dtype=torch.bfloat16, generator=gen) for s in shapes]
        grad = torch.randn(4096, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)
        results = []
        for fn in (lambda q, k, v, c=causal: zoo_attention.attention(q, k, v, cu, 2196, causal=c, backend="varlen"),
                   lambda q, k, v, c=causal: fa4_varlen(q, k, v, cu, 2196, c, None)):
            leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
            out = fn(*leaves)
            out.backward(grad)
            results.append([out, *(x.grad for x in leaves)])
        for ref, got in zip(*results, strict=True):
            worst = max(worst, float((got.float() - ref.float()).abs().max() / ref.float().abs().max()))
    return worst

"""Every attention backend agrees with the per-sample SDPA reference on packed rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_loneforge.model_zoo.attention import attention, document_block_mask, select_backend

LENGTHS = [5, 130, 7, 200, 1]


def _packed(heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu", lengths=LENGTHS):
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (
        torch.randn(total, h, dim, generator=g).to(device=device, dtype=dtype) for h in (heads, kv_heads, kv_heads)
    )
    return q, k, v, cu


def _dense_reference(q, k, v, cu, causal, window):
    """Whole-row attention with an explicit dense document mask (test only)."""
    total = q.shape[0]
    doc = torch.searchsorted(cu[1:].long(), torch.arange(total), right=True)
    pos = torch.arange(total)
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    if window is not None:
        left, right = window
        mask &= pos[None, :] >= pos[:, None] - left
        if not causal:
            mask &= pos[None, :] <= pos[:, None] + right
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(groups, 1).transpose(0, 1),
        v.repeat_interleave(groups, 1).transpose(0, 1),
        attn_mask=mask,
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (8, 3)])
def test_sdpa_loop_matches_dense_document_mask(causal, window):
    q, k, v, cu = _packed()
    out = attention(q, k, v, cu, max(LENGTHS), causal=causal, window=window, backend="sdpa")
    torch.testing.assert_close(out, _dense_reference(q, k, v, cu, causal, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (8, 3)])
def test_flex_matches_reference(causal, window):
    """Forward on CPU (eager flex has no backward); the GPU test below checks gradients too."""
    q, k, v, cu = _packed()
    ref = attention(q, k, v, cu, max(LENGTHS), causal=causal, window=window, backend="sdpa")
    out = attention(q, k, v, cu, max(LENGTHS), causal=causal, window=window, backend="flex")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_document_block_mask_equals_dense_block_pattern(causal):
    lengths = [3, 40, 17, 1, 90, 33]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    mask = document_block_mask(cu, total, causal=causal, block=16)
    doc = torch.searchsorted(cu[1:].long(), torch.arange(total), right=True)
    pos = torch.arange(total)
    dense = doc[:, None] == doc[None, :]
    if causal:
        dense &= pos[None, :] <= pos[:, None]
    n = -(-total // 16)
    padded = torch.zeros(n * 16, n * 16, dtype=torch.bool)
    padded[:total, :total] = dense
    expected_any = padded.view(n, 16, n, 16).any(3).any(1)
    assert torch.equal(mask.to_dense()[0, 0].bool()[:n, :n], expected_any)


def test_rejects_bad_heads_and_lengths():
    q, k, v, cu = _packed(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="kv heads"):
        attention(q, k, v, cu, 200, causal=True)
    q, k, v, cu = _packed()
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention(q[:-1], k[:-1], v[:-1], cu, 200, causal=True)


def test_cpu_picks_grouped_segments():
    assert select_backend(torch.zeros(1, 1, 1)) == "grouped"
    assert select_backend(torch.zeros(5000, 1, 1)) == "grouped"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (8, 3)])
def test_grouped_matches_reference(causal, window):
    lengths = [64, 5, 64, 130, 5, 64, 1, 0, 7]  # equal lengths share one batched call; an empty segment too
    q, k, v, cu = _packed(lengths=lengths)
    for x in (q, k, v):
        x.requires_grad_(True)
    ref = attention(q, k, v, cu, max(lengths), causal=causal, window=window, backend="sdpa")
    out = attention(q, k, v, cu, max(lengths), causal=causal, window=window, backend="grouped")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad((out * weights).sum(), (q, k, v)),
                         torch.autograd.grad((ref * weights).sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "varlen", "flex"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backends_match_reference(backend, causal):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    if backend == "varlen":
        pytest.importorskip("torch.nn.attention.varlen")
    q, k, v, cu = _packed(dtype=torch.bfloat16, device="cuda")
    results = []
    for name, dtype in (("sdpa", torch.float32), (backend, torch.bfloat16)):
        leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = attention(*leaves, cu, max(LENGTHS), causal=causal, backend=name)
        out.float().square().sum().backward()
        results.append([out.detach().float()] + [x.grad.float() for x in leaves])
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)

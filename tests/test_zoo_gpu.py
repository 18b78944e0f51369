"""GPU: the zoo model trains on CUDA in bf16 with every attention backend giving the reference's loss."""

from __future__ import annotations

import pytest
import torch

from lightning_loneforge.datamodules.encoder import mrope_positions
from lightning_loneforge.model_zoo import ModelConfig
from lightning_loneforge.model_zoo.model import MultimodalModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _row(config, device):
    g = torch.Generator().manual_seed(0)
    grids = [(1, 8, 12), (1, 4, 4)]
    ids_list, pos_list = [], []
    for t, h, w in grids:
        ids = torch.cat([torch.randint(10, 500, (5,), generator=g), torch.full((t * h * w // 4,), config.image_token_id),
                         torch.randint(10, 500, (30,), generator=g)])  # fmt: skip
        ids_list.append(ids)
        pos_list.append(mrope_positions(ids, [config.image_token_id], torch.tensor([[t, h, w]]), 2))
    ids = torch.cat(ids_list)
    lengths = [len(x) for x in ids_list]
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    patch_dim = 3 * 2 * config.vision.patch_size**2
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), patch_dim, generator=g)
    labels = torch.where(torch.rand(len(ids), generator=g) < 0.5, ids, torch.full_like(ids, -100))
    targets = torch.cat([labels[1:], labels[:1]]).to(device)
    return [x.to(device) for x in (ids, torch.cat(pos_list, 1), cu)] + [max(lengths), pixels.to(device),
                                                                         torch.tensor(grids, device=device), targets]


@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_cuda_backend_loss_and_grads_match_reference(backend, monkeypatch):
    config = ModelConfig.from_name("tiny-qwen2.5-vl")
    torch.manual_seed(0)
    model = MultimodalModel(config).cuda()
    ids, pos, cu, max_len, pixels, grid, targets = _row(config, "cuda")
    monkeypatch.setenv("LONEFORGE_ATTENTION", "sdpa")
    ref = model(ids, pos, cu, max_len, pixels, grid, targets=targets).loss
    ref.backward()
    ref_grad = model.vision.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    monkeypatch.setenv("LONEFORGE_ATTENTION", backend)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, pos, cu, max_len, pixels, grid, targets=targets).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(float(loss) - float(ref)) < 0.05 * float(ref)
    grad = model.vision.blocks[0].attn.qkv.weight.grad
    assert torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.98

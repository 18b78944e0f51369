"""A packed row gives every sample the same loss as running that sample alone through a model."""

from __future__ import annotations

import io
import random

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from lightning_loneforge.datamodules.batch import IGNORE_INDEX, PackedBatch
from lightning_loneforge.datamodules.packer import TokenBudgetPacker, collate_packed
from tests.test_data_fixtures import conversation, encoder, png_bytes


class TinyVLM(nn.Module):
    """Embedding + positions + merged-patch projector scattered into image tokens + one causal attention
    layer applied per segment of `cu_seqlens` + head: the shape of the zoo's models, small."""

    def __init__(self, vocab: int, image_token_id: int, patch_dim: int, dim: int = 32) -> None:
        super().__init__()
        self.image_token_id = image_token_id
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(1024, dim)
        self.vision = nn.Linear(4 * patch_dim, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, batch: PackedBatch) -> Tensor:
        positions = batch.position_ids if batch.position_ids.dim() == 2 else batch.position_ids[None]
        x = self.embed(batch.input_ids) + self.pos(positions).sum(0)
        if batch.pixel_values is not None:
            merged = self.vision(batch.pixel_values.reshape(-1, 4 * batch.pixel_values.shape[-1]))
            x = x.index_put(
                ((batch.input_ids == self.image_token_id).nonzero()[:, 0],), merged, accumulate=True
            )
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        bounds = batch.cu_seqlens.tolist()
        attn = [
            F.scaled_dot_product_attention(q[None, s:e], k[None, s:e], v[None, s:e], is_causal=True)[0]
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return self.head(x + torch.cat(attn))


def per_sample_losses(model: TinyVLM, batch: PackedBatch) -> list[Tensor]:
    logits = model(batch)
    bounds = batch.cu_seqlens.tolist()[: batch.num_samples + 1]
    return [
        F.cross_entropy(
            logits[s : e - 1], batch.labels[s + 1 : e], ignore_index=IGNORE_INDEX, reduction="sum"
        )
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _samples(mrope: bool) -> list:
    rng = random.Random(0)
    enc = encoder(mrope=mrope)
    out = []
    for i in range(12):
        sample = {"__key__": f"k{i}", "json": conversation(rng, image=i % 3 != 0)}
        if i % 3:
            sample["png"] = Image.open(io.BytesIO(png_bytes(rng, (56 * (1 + i % 2), 56)))).convert("RGB")
        encoded = enc(sample)
        encoded.index = i
        out.append(encoded)
    return out


def _check(mrope: bool) -> None:
    torch.manual_seed(0)
    samples = _samples(mrope)
    enc = encoder()
    model = TinyVLM(enc.tokenizer.vocab_size, enc.image_token_id, samples[1].pixel_values.shape[-1]).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    for s in samples:
        if s.pixel_values is not None:
            s.pixel_values = s.pixel_values.double()
    packer = TokenBudgetPacker(160, lookahead=6, pad_to_budget=True)
    batches = list(packer(samples))
    assert any(b.num_samples > 2 for b in batches) and any(b.pixel_values is not None for b in batches)
    by_key = {s.key: s for s in samples}
    compared = 0
    for batch in batches:
        assert batch.num_tokens == 160
        for key, packed_loss in zip(batch.sample_keys, per_sample_losses(model, batch), strict=True):
            alone = per_sample_losses(model, collate_packed([by_key[key]]))[0]
            torch.testing.assert_close(packed_loss, alone, rtol=1e-10, atol=1e-10)
            compared += 1
    assert compared == len(samples)


def test_packed_loss_equals_per_sample_loss():
    _check(mrope=False)


def test_packed_loss_equals_per_sample_loss_with_mrope_positions():
    _check(mrope=True)

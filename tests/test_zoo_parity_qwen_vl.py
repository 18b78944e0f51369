"""Qwen2-VL / Qwen2.5-VL: transformers checkpoints load into ours and give the same logits (float32)."""

from __future__ import annotations

import pytest
import torch

from lightning_loneforge.datamodules.encoder import mrope_positions
from lightning_loneforge.model_zoo.hf_io import from_pretrained, save_hf

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO, VISION_START = 6, 7, 4
GRIDS = [(1, 6, 10), (1, 4, 4), (2, 4, 6)]  # the last one is a 2-frame video-like grid
TEXT = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
    "mrope_section": [2, 3, 3]}, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip


def redraw(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random (biases and norms too), so a loader that drops one cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g) * 0.1
            is_norm = "norm" in name or "ln_q" in name
            param.copy_(1.0 + noise if is_norm and param.dim() == 1 and name.endswith("weight") else noise)


def sample(grids, merge=2, patch_dim=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [10, 11, 12]
    for t, h, w in grids:
        ids += [VISION_START] + [IMAGE] * (t * h * w // merge**2) + [13, 14]
    ids += list(torch.randint(20, 250, (7,), generator=g).tolist())
    patches = sum(t * h * w for t, h, w in grids)
    return torch.tensor(ids), torch.randn(patches, patch_dim, generator=g), torch.tensor(grids)


def _hf_model(family: str):
    if family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(
            text_config=dict(TEXT, tie_word_embeddings=True), tie_word_embeddings=True,
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                               temporal_patch_size=2, spatial_merge_size=2),
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        )  # fmt: skip
        return transformers.Qwen2VLForConditionalGeneration(cfg)
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT, tie_word_embeddings=False), tie_word_embeddings=False,
        vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                           fullatt_block_indexes=[1]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
    )  # fmt: skip
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_logits_match_transformers(family, tmp_path):
    torch.manual_seed(0)
    hf = _hf_model(family).eval()
    redraw(hf)
    hf.save_pretrained(tmp_path / "hf")
    ids, pixels, grid = sample(GRIDS)
    with torch.no_grad():
        expected = hf(
            input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid,
            mm_token_type_ids=(ids == IMAGE).long()[None], attention_mask=torch.ones_like(ids)[None],
        ).logits[0]  # fmt: skip

    ours = from_pretrained(tmp_path / "hf").eval()
    assert ours.config.family == family
    with torch.no_grad():
        hidden = ours(
            ids, mrope_positions(ids, [IMAGE], grid, 2), torch.tensor([0, len(ids)], dtype=torch.int32), len(ids),
            pixels, grid,
        ).hidden  # fmt: skip
        logits = ours.llm.logits(hidden)
    assert (logits - expected).abs().max() <= 1e-4

    save_hf(ours, tmp_path / "ours")
    again = from_pretrained(tmp_path / "ours")
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    reloaded = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        roundtrip = reloaded(
            input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid,
            mm_token_type_ids=(ids == IMAGE).long()[None],
        ).logits[0]  # fmt: skip
    assert (roundtrip - expected).abs().max() <= 1e-5

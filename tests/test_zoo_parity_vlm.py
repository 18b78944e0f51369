"""ViT-based VLMs (LLaVA, InternVL, Idefics3, PaliGemma): transformers checkpoints load into ours, same logits."""

from __future__ import annotations

import pytest
import torch

from lightning_loneforge.datamodules.batch import IGNORE_INDEX
from lightning_loneforge.model_zoo.hf_io import from_pretrained, save_hf
from lightning_loneforge.model_zoo.loss import shift_labels
from tests.test_zoo_parity_qwen_vl import redraw

transformers = pytest.importorskip("transformers")

IMAGE = 5
SIZE, PATCH = 32, 8
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
              patch_size=PATCH)  # fmt: skip


def _hf(family: str):
    t = transformers
    if family == "llava":
        cfg = t.LlavaConfig(vision_config=dict(model_type="clip_vision_model", **VISION),
                            text_config=dict(model_type="llama", **TEXT), image_token_index=IMAGE)  # fmt: skip
        return t.LlavaForConditionalGeneration(cfg), 1
    if family == "internvl":
        vision = {**VISION, "image_size": [SIZE, SIZE], "patch_size": [PATCH, PATCH]}
        cfg = t.InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **TEXT), image_token_id=IMAGE)
        return t.InternVLForConditionalGeneration(cfg), 2
    if family == "idefics3":
        cfg = t.Idefics3Config(vision_config=VISION, text_config=dict(model_type="llama", **TEXT), image_token_id=IMAGE,
                               scale_factor=2)  # fmt: skip
        return t.Idefics3ForConditionalGeneration(cfg), 2
    if family == "smolvlm":
        cfg = t.SmolVLMConfig(vision_config=VISION, text_config=dict(model_type="llama", **TEXT), image_token_id=IMAGE,
                              scale_factor=2)  # fmt: skip
        return t.SmolVLMForConditionalGeneration(cfg), 2
    if family == "paligemma":
        cfg = t.PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", **VISION),
                                text_config=dict(model_type="gemma", **TEXT, head_dim=16), image_token_index=IMAGE,
                                projection_dim=TEXT["hidden_size"])  # fmt: skip
        return t.PaliGemmaForConditionalGeneration(cfg), 1
    raise AssertionError(family)


def patchify(image: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's layout for one image `[3, H, W]`: `[P, 3*p*p]` in merge-window order, grid `[1, 3]`."""
    gh, gw = image.shape[1] // PATCH, image.shape[2] // PATCH
    x = image.reshape(1, 1, 3, gh // merge, merge, PATCH, gw // merge, merge, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, 3 * PATCH * PATCH)
    return x, torch.tensor([[1, gh, gw]])


@pytest.mark.parametrize("family", ["llava", "internvl", "idefics3", "smolvlm", "paligemma"])
def test_vlm_logits_match_transformers(family, tmp_path):
    torch.manual_seed(0)
    hf, merge = _hf(family)
    hf = hf.eval()
    redraw(hf)
    hf.save_pretrained(tmp_path / "hf")
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, SIZE, SIZE, generator=g)
    n_image = (SIZE // PATCH) ** 2 // merge**2
    ids = torch.cat([torch.tensor([1, 10, 11]), torch.full((n_image,), IMAGE), torch.randint(20, 250, (9,), generator=g)])
    pixels = image[None, None] if family in ("idefics3", "smolvlm") else image[None]
    kwargs = {"pixel_attention_mask": torch.ones(1, 1, SIZE, SIZE, dtype=torch.bool)} if family in ("idefics3", "smolvlm") else {}
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-5:] = ids[-5:]  # the answer; PaliGemma's prefix (image + prompt) is everything before it
    if family == "paligemma":
        kwargs["token_type_ids"] = (labels != IGNORE_INDEX).long()[None]
    with torch.no_grad():
        expected = hf(input_ids=ids[None], pixel_values=pixels, **kwargs).logits[0]

    ours = from_pretrained(tmp_path / "hf").eval()
    flat, grid = patchify(image, merge)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    with torch.no_grad():
        out = ours(ids, torch.arange(len(ids)), cu, len(ids), flat, grid, targets=shift_labels(labels, cu))
        logits = ours.llm.logits(out.hidden)
    assert (logits - expected).abs().max() <= 1e-4

    save_hf(ours, tmp_path / "ours")
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(input_ids=ids[None], pixel_values=pixels, **kwargs).logits[0]
    assert (again - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("layout", ["hub", "in_memory"])
def test_llava_loads_both_key_layouts(layout, tmp_path):
    """Hub `vision_tower.vision_model.*` and transformers 5.x in-memory `model.*` names load the same weights."""
    from safetensors.torch import load_file, save_file

    hf, _ = _hf("llava")
    redraw(hf)
    hf.save_pretrained(tmp_path)
    reference = from_pretrained(tmp_path).state_dict()
    state = load_file(str(tmp_path / "model.safetensors"))
    renamed = {}
    for key, value in state.items():
        if layout == "hub" and key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        if layout == "in_memory":
            for old, new in (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                             ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")):  # fmt: skip
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        renamed[key] = value
    assert set(renamed) != set(state)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    loaded = from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())

"""Projectors vs transformers' LLaVA, InternVL, Idefics3 / SmolVLM and PaliGemma projectors (float32, re-drawn)."""

import pytest
import torch
from transformers import Idefics3Config, InternVLConfig, LlavaConfig, PaliGemmaConfig, SmolVLMConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

from lightning_loneforge.model_zoo.towers.projectors import (
    Projector,
    ProjectorConfig,
    hf_to_ours_projector,
    ours_to_hf_projector,
    pixel_shuffle,
)
from tests._helpers import one_thread  # noqa: F401  (fixture)

TOL = 1e-4
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread


def redraw(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.7 / p.shape[-1] ** 0.5 if p.ndim >= 2 else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (0.0 if p.ndim >= 2 else 0.5))
    return model.eval()


def load(hf: torch.nn.Module, config: ProjectorConfig, prefix: str) -> Projector:
    sd = {prefix + k: v for k, v in hf.state_dict().items()}
    sd["vision_tower.embeddings.patch_embedding.weight"] = torch.zeros(1)  # other towers' keys are left alone
    ours = Projector(config).eval()
    ours.load_state_dict(hf_to_ours_projector(sd, prefix, config), strict=True)
    return ours


def features(tokens: int = 16, dim: int = 16) -> torch.Tensor:
    return torch.randn(3, tokens, dim, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
@pytest.mark.parametrize("bias", [True, False])
def test_llava_mlp(bias):
    hf_config = LlavaConfig(vision_config=VISION, text_config=TEXT, multimodal_projector_bias=bias)
    hf = redraw(LlavaMultiModalProjector(hf_config))
    config = ProjectorConfig(in_dim=16, out_dim=24, bias=bias)
    ours = load(hf, config, "multi_modal_projector.")
    x = features()
    assert (ours(x) - hf(x)).abs().max() <= TOL


@torch.no_grad()
def test_paligemma_linear():
    hf = redraw(PaliGemmaMultiModalProjector(PaliGemmaConfig(vision_config=VISION, text_config=TEXT)))
    config = ProjectorConfig(in_dim=16, out_dim=hf.linear.out_features, kind="linear")
    ours = load(hf, config, "model.multi_modal_projector.")
    x = features()
    assert (ours(x) - hf(x)).abs().max() <= TOL


@torch.no_grad()
def test_internvl_pixel_shuffle_mlp():
    hf_config = InternVLConfig(vision_config=VISION, text_config={"model_type": "qwen2", **TEXT})
    hf = redraw(InternVLMultiModalProjector(hf_config), seed=2)
    config = ProjectorConfig(in_dim=16, out_dim=24, pixel_shuffle=2, norm=True)
    ours = load(hf, config, "multi_modal_projector.")
    x = features(tokens=36)
    # transformers' InternVLModel.get_image_features: square grid -> pixel_shuffle(0.5) -> projector
    grid = x.reshape(3, 6, 6, 16)
    want = hf(InternVLModel.pixel_shuffle(None, grid, scale_factor=0.5).reshape(3, -1, 64))
    got = ours(x)
    assert got.shape == (3, 9, 24) == want.shape
    assert (got - want).abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("family,scale", [("idefics3", 2), ("smolvlm", 4)])
def test_idefics3_smolvlm_connector(family, scale):
    config_cls, connector_cls = (Idefics3Config, Idefics3Connector) if family == "idefics3" else (
        SmolVLMConfig, SmolVLMConnector
    )
    hf_config = config_cls(vision_config=VISION, text_config={"model_type": "llama", **TEXT}, scale_factor=scale)
    hf = redraw(connector_cls(hf_config), seed=3)
    config = ProjectorConfig(in_dim=16, out_dim=24, kind="linear", bias=False, pixel_shuffle=scale)
    ours = load(hf, config, "model.connector.")
    x = features(tokens=64)
    got = ours(x)
    assert got.shape == (3, 64 // scale**2, 24)
    assert (got - hf(x)).abs().max() <= TOL


def test_pixel_shuffle_layout_and_errors():
    x = torch.arange(4 * 4 * 1, dtype=torch.float32).reshape(1, 16, 1)  # patch (r, c) holds 4r + c
    out = pixel_shuffle(x, 2)
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 3].tolist() == [10, 11, 14, 15]
    rect = pixel_shuffle(torch.arange(8.0).reshape(1, 8, 1), 2, grid=(2, 4))
    assert rect[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ValueError, match="pixel_shuffle"):
        pixel_shuffle(torch.zeros(1, 15, 2), 2)
    with pytest.raises(ValueError, match="Projector"):
        Projector(ProjectorConfig(in_dim=16, out_dim=8))(torch.zeros(2, 4, 15))


def test_strict_mapping_and_round_trip():
    hf = redraw(InternVLMultiModalProjector(InternVLConfig(vision_config=VISION, text_config={"model_type": "qwen2", **TEXT})))
    config = ProjectorConfig(in_dim=16, out_dim=24, pixel_shuffle=2, norm=True)
    sd = {"p." + k: v for k, v in hf.state_dict().items()}
    del sd["p.layer_norm.bias"]
    sd["p.linear_3.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"p\.linear_3\.weight.*norm\.bias"):
        hf_to_ours_projector(sd, "p.", config)
    ours = redraw(Projector(config), seed=9)
    fresh = InternVLMultiModalProjector(InternVLConfig(vision_config=VISION, text_config={"model_type": "qwen2", **TEXT}))
    fresh.load_state_dict(ours_to_hf_projector(ours.state_dict(), "", config), strict=True)
    assert torch.equal(fresh.layer_norm.bias, ours.norm.bias) and torch.equal(fresh.linear_2.weight, ours.fc2.weight)
    assert config.num_output_tokens(256) == 64


def _family_model(family: str):
    """A tiny transformers VLM of ``family`` with every weight re-drawn, and its pixel input."""
    import transformers as T

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=300)
    if family == "llava":
        model = T.LlavaForConditionalGeneration(T.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", **vision), text_config=dict(model_type="llama", **text)))
    elif family == "llava_onevision":
        model = T.LlavaOnevisionForConditionalGeneration(T.LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", **vision), text_config=dict(model_type="qwen2", **text)))
    elif family == "paligemma":
        model = T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
            vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **vision),
            text_config=dict(model_type="gemma", head_dim=12, **text), projection_dim=24))
    elif family == "internvl":
        model = T.InternVLForConditionalGeneration(T.InternVLConfig(
            vision_config=vision, text_config=dict(model_type="qwen2", **text)))
    elif family in ("idefics3", "smolvlm"):
        cls, config_cls = ((T.Idefics3ForConditionalGeneration, T.Idefics3Config) if family == "idefics3"
                           else (T.SmolVLMForConditionalGeneration, T.SmolVLMConfig))
        model = cls(config_cls(vision_config=vision, text_config=dict(model_type="llama", **text), scale_factor=2))
    else:  # pi0
        model = T.PI0ForConditionalGeneration(T.PI0Config(
            vlm_config=dict(vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **vision),
                            text_config=dict(model_type="gemma", head_dim=12, **text), projection_dim=24),
            dit_config=dict(hidden_size=24, num_hidden_layers=1, intermediate_size=48, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=12)))
    return redraw(model, seed=4)


def _hf_image_features(family: str, model, x: torch.Tensor) -> torch.Tensor:
    if family == "llava_onevision":  # get_image_features adds any-resolution tiling; this is its per-tile part
        hidden = model.model.vision_tower(x, output_hidden_states=True).hidden_states[-1]
        return model.model.multi_modal_projector(hidden)
    if family == "pi0":
        return model.model.vlm.get_image_features(x).pooler_output
    inputs = x[:, None] if family in ("idefics3", "smolvlm") else x
    out = model.model.get_image_features(inputs).pooler_output
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_onevision", "paligemma", "internvl", "idefics3", "smolvlm", "pi0"])
def test_family_image_features_from_saved_checkpoint(family, tmp_path):
    """config.json -> our configs, safetensors under HF_PREFIXES -> our towers: projector(vit(x)) equals the
    transformers model's image features."""
    import json

    from safetensors.torch import load_file

    from lightning_loneforge.model_zoo.towers.projectors import HF_PREFIXES, projector_config_from_hf
    from lightning_loneforge.model_zoo.towers.vit import VisionTransformer, hf_to_ours_vit, vit_config_from_hf

    model = _family_model(family)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    weights = {k: v for f in tmp_path.glob("*.safetensors") for k, v in load_file(f).items()}
    vision_prefix, projector_prefix = HF_PREFIXES[family]
    vit_config, projector_config = vit_config_from_hf(config), projector_config_from_hf(config)
    vit = VisionTransformer(vit_config).eval()
    vit.load_state_dict(hf_to_ours_vit(weights, vision_prefix, vit_config), strict=True)
    projector = Projector(projector_config).eval()
    projector.load_state_dict(hf_to_ours_projector(weights, projector_prefix, projector_config), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    want = _hf_image_features(family, model, x)
    got = projector(vit(x))
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL

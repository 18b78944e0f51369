"""ViT tower vs transformers' CLIP, SigLIP, InternVL and Idefics3 vision models (float32, all weights re-drawn)."""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Idefics3VisionConfig,
    InternVLVisionConfig,
    InternVLVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

from lightning_loneforge.model_zoo.towers.vit import (
    VisionTransformer,
    ViTConfig,
    hf_to_ours_vit,
    ours_to_hf_vit,
)
from tests._helpers import one_thread  # noqa: F401  (fixture)

TOL = 1e-4
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
INTERNVL_SHAPE = {**SHAPE, "image_size": [32, 32], "patch_size": [8, 8]}
OURS = dict(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, image_size=32, patch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread


def redraw(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-default random values (default init hides dropped biases and norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel() if p.shape[0] > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7 / fan_in**0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) * 1.5 - 0.5)
    return model.eval()


def load_ours(
    hf_model: torch.nn.Module, config: ViTConfig, prefix: str = "vision_tower.", key_prefix: str | None = None
) -> VisionTransformer:
    hf_sd = {(key_prefix or prefix) + k: v for k, v in hf_model.state_dict().items()}
    hf_sd["language_model.embed_tokens.weight"] = torch.zeros(3, 3)  # other towers' keys are left alone
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(hf_to_ours_vit(hf_sd, prefix, config), strict=True)
    return ours


def pixels(n: int = 2, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def clip_pair(feature_layer: int = -2):
    hf = redraw(CLIPVisionModel(CLIPVisionConfig(**SHAPE, hidden_act="quick_gelu", attn_implementation="eager")))
    config = ViTConfig(
        **OURS, hidden_act="quick_gelu", norm_eps=1e-5, class_token=True, patch_bias=False, pre_norm=True,
        feature_layer=feature_layer,
    )
    return hf, config


def siglip_pair(**ours):
    hf = redraw(SiglipVisionModel(SiglipVisionConfig(**SHAPE, attn_implementation="eager")), seed=3)
    return hf, ViTConfig(**OURS, hidden_act="gelu_pytorch_tanh", pool_head=True, **ours)


@torch.no_grad()
@pytest.mark.parametrize(
    "key_prefix", ["vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model."]
)
def test_clip_llava_features_and_pooled(key_prefix):
    hf, config = clip_pair(feature_layer=-2)
    prefix = key_prefix.removesuffix("vision_model.")
    ours = load_ours(hf, config, prefix=prefix, key_prefix=key_prefix)
    x = pixels()
    out = hf(x, output_hidden_states=True)
    want = out.hidden_states[-2][:, 1:]
    got = ours(x)
    assert got.shape == (2, 16, 32) == want.shape
    assert (got - want).abs().max() <= TOL
    assert (ours.pooled(x) - out.pooler_output).abs().max() <= TOL


@torch.no_grad()
def test_clip_interpolated_positions():
    hf, config = clip_pair(feature_layer=-1)
    ours = load_ours(hf, config)
    x = pixels(h=48, w=40)
    want = hf(x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
    got = ours(x)
    assert got.shape == (2, 6 * 5, 32) == want.shape
    assert (got - want).abs().max() <= TOL


@torch.no_grad()
def test_siglip_post_norm_features_and_head():
    hf, config = siglip_pair(feature_post_norm=True)
    ours = load_ours(hf, config)
    x = pixels()
    out = hf(x)
    assert (ours(x) - out.last_hidden_state).abs().max() <= TOL
    assert (ours.pooled(x) - out.pooler_output).abs().max() <= TOL
    x = pixels(h=24, w=40)
    assert (ours(x) - hf(x, interpolate_pos_encoding=True).last_hidden_state).abs().max() <= TOL


@torch.no_grad()
def test_siglip_onevision_features_before_post_norm():
    hf, config = siglip_pair(feature_post_norm=False)
    ours = load_ours(hf, config)
    x = pixels()
    want = hf(x, output_hidden_states=True).hidden_states[-1]
    assert (ours(x) - want).abs().max() <= TOL


@torch.no_grad()
def test_idefics3_vision_full_tiles():
    hf = redraw(Idefics3VisionTransformer(Idefics3VisionConfig(**SHAPE, attn_implementation="eager")), seed=5)
    config = ViTConfig(**OURS, hidden_act="gelu_pytorch_tanh", feature_post_norm=True)
    ours = load_ours(hf, config, prefix="model.vision_model.")
    x = pixels()
    assert (ours(x) - hf(x).last_hidden_state).abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_internvit(variant):
    extra = dict(norm_type="rms_norm", use_qk_norm=True, use_mean_pooling=False) if variant == "6b" else {}
    hf_config = InternVLVisionConfig(**INTERNVL_SHAPE, **extra)
    hf_config._attn_implementation = "eager"
    hf = redraw(InternVLVisionModel(hf_config), seed=7)
    config = ViTConfig(
        **OURS, class_token=True, qkv_bias=False, layer_scale=0.1, post_norm=variant == "6b",
        feature_post_norm=variant == "6b", norm_type="rms_norm" if variant == "6b" else "layer_norm",
        qk_norm=variant == "6b",
    )
    ours = load_ours(hf, config)
    x = pixels()
    want = hf(x).last_hidden_state[:, 1:]
    assert (ours(x) - want).abs().max() <= TOL
    hidden = hf(x, output_hidden_states=True).hidden_states[1]
    assert (ours.hidden_state(x, 1) - hidden).abs().max() <= TOL


def test_strict_mapping_names_unused_and_missing_keys():
    hf, config = clip_pair()
    sd = {"vision_tower." + k: v for k, v in hf.state_dict().items()}
    del sd["vision_tower.encoder.layers.2.layer_norm2.bias"]
    sd["vision_tower.encoder.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"layers\.0\.extra\.weight.*blocks\.2\.norm2\.bias"):
        hf_to_ours_vit(sd, "vision_tower.", config)
    sd = {"vision_tower." + k: v for k, v in hf.state_dict().items()}
    sd["vision_tower.embeddings.position_embedding.weight"] = torch.zeros(5, 32)
    with pytest.raises(ValueError, match="position_embedding"):
        hf_to_ours_vit(sd, "vision_tower.", config)


@pytest.mark.parametrize("family", ["clip", "internvl"])
def test_save_round_trip_loads_into_transformers(family):
    if family == "clip":
        hf, config = clip_pair()
    else:
        hf = InternVLVisionModel(InternVLVisionConfig(**INTERNVL_SHAPE))
        config = ViTConfig(**OURS, class_token=True, qkv_bias=False, layer_scale=0.1, post_norm=False)
    ours = redraw(VisionTransformer(config), seed=11)
    hf_sd = ours_to_hf_vit(ours.state_dict(), "", config)
    hf.load_state_dict(hf_sd, strict=True)
    back = hf_to_ours_vit({"v." + k: v for k, v in hf.state_dict().items()}, "v.", config)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_meta_build_matches_transformers_parameter_count():
    hf, config = clip_pair()
    with torch.device("meta"):
        ours = VisionTransformer(config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert isinstance(ours.blocks, torch.nn.ModuleList) and len(ours.blocks) == 3
    assert config.num_feature_tokens() == 16 and config.num_blocks_run == 2


def test_feature_layer_stops_early_and_trains():
    _, config = clip_pair(feature_layer=-2)
    ours = VisionTransformer(config)
    ours(pixels()).square().mean().backward()
    assert ours.blocks[2].mlp.fc1.weight.grad is None
    assert ours.blocks[1].mlp.fc1.weight.grad is not None and ours.patch_embed.weight.grad is not None


def test_bad_input_names_the_tower():
    _, config = clip_pair()
    with pytest.raises(ValueError, match="VisionTransformer"):
        VisionTransformer(config)(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="feature_layer"):
        ViTConfig(**{**OURS, "num_layers": 2}, feature_layer=5)


def test_config_from_hf_errors_name_the_field():
    from lightning_loneforge.model_zoo.towers.vit import vit_config_from_hf

    with pytest.raises(ValueError, match="model_type='qwen2_vl'"):
        vit_config_from_hf({"model_type": "qwen2_vl"})
    with pytest.raises(ValueError, match="hidden_size"):
        vit_config_from_hf({"model_type": "llava", "vision_config": {"num_hidden_layers": 2}})
    with pytest.raises(ValueError, match="vision_feature_layer"):
        vit_config_from_hf({"model_type": "llava", "vision_feature_layer": [-2, -5], "vision_config": {
            "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}})
    llava = vit_config_from_hf({"model_type": "llava", "vision_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 336, "patch_size": 14}})
    assert (llava.feature_layer, llava.hidden_act, llava.norm_eps, llava.num_feature_tokens()) == (-2, "quick_gelu", 1e-5, 576)


def test_meta_build_materialises_like_lightning():
    """Every module holding weights re-initialises itself after ``to_empty`` (Lightning's materialisation)."""
    import warnings

    from lightning.fabric.utilities.init import _materialize_distributed_module

    from lightning_loneforge.model_zoo.towers.action import ActionExpertConfig, FlowMatchingActionExpert
    from lightning_loneforge.model_zoo.towers.projectors import Projector, ProjectorConfig

    towers = [
        (VisionTransformer, ViTConfig(**OURS, class_token=True, layer_scale=0.1, qk_norm=True, norm_type="rms_norm")),
        (VisionTransformer, ViTConfig(**OURS, pool_head=True, pre_norm=True)),
        (Projector, ProjectorConfig(in_dim=32, out_dim=16, pixel_shuffle=2, norm=True)),
        (FlowMatchingActionExpert, ActionExpertConfig(
            action_dim=3, state_dim=2, horizon=4, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
            head_dim=8, prefix_dim=8)),
    ]
    for cls, config in towers:
        with torch.device("meta"):
            tower = cls(config)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _materialize_distributed_module(tower, torch.device("cpu"))
        assert all(torch.isfinite(p).all() for p in tower.parameters())
        if isinstance(tower, VisionTransformer) and config.layer_scale:
            assert torch.all(tower.blocks[0].ls1 == 0.1)


@torch.no_grad()
def test_leftover_pixels_are_dropped_like_transformers():
    """SigLIP-384 with 14-pixel patches: the convolution floors 384 / 14 to 27 patches per side."""
    hf = redraw(SiglipVisionModel(SiglipVisionConfig(**{**SHAPE, "image_size": 36}, attn_implementation="eager")))
    config = ViTConfig(**{**OURS, "image_size": 36}, hidden_act="gelu_pytorch_tanh", pool_head=True)
    ours = load_ours(hf, config)
    x = pixels(h=36, w=36)
    got = ours(x)
    assert got.shape == (2, 16, 32) and config.num_feature_tokens() == 16
    assert (got - hf(x, output_hidden_states=True).hidden_states[-1]).abs().max() <= TOL

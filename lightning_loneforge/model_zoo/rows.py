"""The zoo's named rows (litgpt style): published shapes and parameter counts, plus tiny rows for tests/demo.

`published_params` is the parameter count the Hub page shows for `hf_id` (safetensors metadata), unless the
row's `source` says otherwise. Shapes come from each checkpoint's `config.json`.
"""

from __future__ import annotations

import dataclasses

from lightning_loneforge.model_zoo.config import (
    ActionConfig,
    ModelConfig,
    ProjectorConfig,
    TextConfig,
    VisionConfig,
)

QWEN2_VL_IMAGE_TOKEN = 151655
_MROPE = [16, 24, 24]


def _qwen2(vocab, hidden, layers, heads, kv, inter, tie, theta=1e6, mrope=None, **kw) -> TextConfig:
    return TextConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        intermediate_size=inter, norm_eps=1e-6, rope_theta=theta, qkv_bias=True, tie_embeddings=tie,
        mrope_section=mrope, **kw,
    )  # fmt: skip


def _llama(vocab, hidden, layers, heads, kv, inter, theta=10000.0, eps=1e-5, tie=False, **kw) -> TextConfig:
    return TextConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        intermediate_size=inter, norm_eps=eps, rope_theta=theta, tie_embeddings=tie, **kw,
    )  # fmt: skip


def _qwen2_vl_vision(out_dim: int, *, depth=32, width=1280, heads=16, mlp=5120, patch=14, temporal=2):
    vision = VisionConfig(
        kind="qwen2_vl", hidden_size=width, num_layers=depth, num_heads=heads, intermediate_size=mlp,
        patch_size=patch, temporal_patch_size=temporal, spatial_merge_size=2, act="quick_gelu",
    )  # fmt: skip
    projector = ProjectorConfig(kind="patch_merger", in_dim=width, out_dim=out_dim, merge_size=2, norm="layernorm")
    return vision, projector


def _qwen25_vl_vision(out_dim: int, *, depth=32, width=1280, heads=16, mlp=3420, patch=14, window=112, full=None):
    vision = VisionConfig(
        kind="qwen2_5_vl", hidden_size=width, num_layers=depth, num_heads=heads, intermediate_size=mlp,
        patch_size=patch, temporal_patch_size=2, spatial_merge_size=2, act="silu", window_size=window,
        fullatt_block_indexes=full if full is not None else [7, 15, 23, 31],
    )  # fmt: skip
    projector = ProjectorConfig(kind="patch_merger", in_dim=width, out_dim=out_dim, merge_size=2, norm="rms")
    return vision, projector


def _qwen2_vl(name, hf_id, params, text, family="qwen2_vl", image_token_id=QWEN2_VL_IMAGE_TOKEN, **vision_kw) -> dict:
    video_token_id = image_token_id + 1
    build = _qwen2_vl_vision if family == "qwen2_vl" else _qwen25_vl_vision
    vision, projector = build(text.hidden_size, **vision_kw)
    return dict(
        name=name, family=family, text=text, vision=vision, projector=projector,
        image_token_id=image_token_id, video_token_id=video_token_id, hf_id=hf_id, published_params=params,
    )  # fmt: skip


def _clip_l(image_size: int) -> VisionConfig:
    return VisionConfig(
        kind="clip", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=14,
        image_size=image_size, norm_eps=1e-5, act="quick_gelu", feature_layer=-2,
    )  # fmt: skip


def _siglip(image_size: int, *, layers=27, width=1152, mlp=4304, heads=16, patch=14, kind="siglip", merge=1):
    image_size -= image_size % patch  # 384 px / patch 14 -> 27 x 27 positions, as the strided conv gives
    return VisionConfig(
        kind=kind, hidden_size=width, num_layers=layers, num_heads=heads, intermediate_size=mlp, patch_size=patch,
        image_size=image_size, norm_eps=1e-6, act="gelu_tanh", spatial_merge_size=merge,
    )  # fmt: skip


def _intern_vit_300m() -> VisionConfig:
    return VisionConfig(
        kind="intern_vit", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=14,
        image_size=448, norm_eps=1e-6, act="gelu", feature_layer=-1, spatial_merge_size=2,
        extra={"attention_bias": True},
    )  # fmt: skip


def _internvl(name, hf_id, params, text) -> dict:
    projector = ProjectorConfig(
        kind="pixel_shuffle_mlp", in_dim=1024, out_dim=text.hidden_size, hidden_dim=text.hidden_size,
        merge_size=2, norm="layernorm", bias=True, act="gelu",
    )  # fmt: skip
    return dict(
        name=name, family="internvl", text=text, vision=_intern_vit_300m(), projector=projector,
        image_token_id=151667 if text.vocab_size > 100000 else 92546, hf_id=hf_id, published_params=params,
    )  # fmt: skip


def _llava(name, hf_id, params, text, vision, family="llava", image_token_id=32000) -> dict:
    projector = ProjectorConfig(
        kind="mlp", in_dim=vision.hidden_size, out_dim=text.hidden_size, hidden_dim=text.hidden_size, act="gelu"
    )
    return dict(
        name=name, family=family, text=text, vision=vision, projector=projector,
        image_token_id=image_token_id, hf_id=hf_id, published_params=params,
    )  # fmt: skip


def _idefics3(name, hf_id, params, text, vision, scale, image_token_id) -> dict:
    vision = dataclasses.replace(vision, kind="idefics3", spatial_merge_size=scale)
    projector = ProjectorConfig(
        kind="pixel_shuffle_linear", in_dim=vision.hidden_size, out_dim=text.hidden_size, merge_size=scale, bias=False,
        norm="none",
    )  # fmt: skip
    return dict(
        name=name, family="idefics3", text=text, vision=vision, projector=projector,
        image_token_id=image_token_id, hf_id=hf_id, published_params=params,
    )  # fmt: skip


_GEMMA_2B = TextConfig(
    vocab_size=257216, hidden_size=2048, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256,
    intermediate_size=16384, norm_eps=1e-6, rope_theta=10000.0, mlp="geglu", norm="rms_gemma",
    tie_embeddings=True, embed_scale=True, prefix_lm=True,
)  # fmt: skip

_LLAMA3_8B = _llama(128256, 4096, 32, 32, 8, 14336, theta=500000.0)
_LLAMA31_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}  # fmt: skip
_QWEN25_05B = _qwen2(151674, 896, 24, 14, 2, 4864, tie=False)
_QWEN25_15B = _qwen2(151674, 1536, 28, 12, 2, 8960, tie=False)
_QWEN25_7B = _qwen2(151674, 3584, 28, 28, 4, 18944, tie=False)

configs: list[dict] = [
    # --- Qwen2-VL / Qwen2.5-VL (config.json of each hf_id; params: Hub safetensors metadata) ---
    _qwen2_vl("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", 2_208_985_600,
              _qwen2(151936, 1536, 28, 12, 2, 8960, tie=True, mrope=_MROPE)),
    _qwen2_vl("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", 8_291_375_616,
              _qwen2(152064, 3584, 28, 28, 4, 18944, tie=False, mrope=_MROPE)),
    _qwen2_vl("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", 3_754_622_976,
              _qwen2(151936, 2048, 36, 16, 2, 11008, tie=True, mrope=_MROPE), family="qwen2_5_vl"),
    _qwen2_vl("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", 8_292_166_656,
              _qwen2(152064, 3584, 28, 28, 4, 18944, tie=False, mrope=_MROPE), family="qwen2_5_vl"),
    _qwen2_vl("qwen2.5-vl-32b", "Qwen/Qwen2.5-VL-32B-Instruct", 33_452_718_336,
              _qwen2(152064, 5120, 64, 40, 8, 27648, tie=False, mrope=_MROPE), family="qwen2_5_vl", mlp=3456),
    _qwen2_vl("qwen2.5-vl-72b", "Qwen/Qwen2.5-VL-72B-Instruct", 73_410_777_344,
              _qwen2(152064, 8192, 80, 64, 8, 29568, tie=False, mrope=_MROPE), family="qwen2_5_vl", mlp=3456),
    # --- LLaVA-1.5 (llava-hf/*: CLIP ViT-L/14-336, second-to-last layer, Vicuna/Llama-2 decoder) ---
    _llava("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", 7_063_427_072,
           _llama(32064, 4096, 32, 32, 32, 11008, eps=1e-5), _clip_l(336)),
    _llava("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", 13_350_839_296,
           _llama(32064, 5120, 40, 40, 40, 13824, eps=1e-5), _clip_l(336)),
    # --- LLaVA-OneVision (SigLIP-so400m trimmed to 26 layers + Qwen2) ---
    _llava("llava-onevision-0.5b", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", 893_618_240,
           _qwen2(151647, 896, 24, 14, 2, 4864, tie=True), _siglip(384, layers=26),
           family="llava_onevision", image_token_id=151646),
    _llava("llava-onevision-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", 8_030_348_832,
           _qwen2(152128, 3584, 28, 28, 4, 18944, tie=False), _siglip(384, layers=26),
           family="llava_onevision", image_token_id=151646),
    # --- InternVL2.5 / InternVL3 (InternViT-300M-448px + pixel shuffle 0.5 + MLP). Weights load from the
    # transformers-native layout (InternVLForConditionalGeneration, the "-hf" repos); the remote-code originals
    # (InternLM2 `wqkv`, `mlp1.*`) are not mapped. ---
    _internvl("internvl2.5-1b", "OpenGVLab/InternVL2_5-1B", 938_158_976, _QWEN25_05B),
    _internvl("internvl2.5-2b", "OpenGVLab/InternVL2_5-2B", 2_205_754_368,
              _llama(92553, 2048, 24, 16, 8, 8192, theta=1e6, eps=1e-5)),
    _internvl("internvl2.5-8b", "OpenGVLab/InternVL2_5-8B", 8_075_365_376,
              _llama(92553, 4096, 32, 32, 8, 14336, theta=1e6, eps=1e-5)),
    _internvl("internvl3-1b", "OpenGVLab/InternVL3-1B-hf", 938_158_976, _QWEN25_05B),
    _internvl("internvl3-2b", "OpenGVLab/InternVL3-2B-hf", 2_088_957_952, _QWEN25_15B),
    _internvl("internvl3-8b", "OpenGVLab/InternVL3-8B-hf", 7_944_373_760, _QWEN25_7B),
    # --- Idefics3 / SmolVLM (SigLIP + pixel shuffle + bias-free linear) ---
    _idefics3("idefics3-8b", "HuggingFaceM4/Idefics3-8B-Llama3", 8_462_391_536,
              _llama(128259, 4096, 32, 32, 8, 14336, theta=500000.0, rope_scaling=_LLAMA31_SCALING),
              _siglip(364), scale=2, image_token_id=128257),
    _idefics3("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", 256_484_928,
              _llama(49280, 576, 30, 9, 3, 1536, theta=100000.0, tie=False),
              _siglip(512, layers=12, width=768, mlp=3072, heads=12, patch=16), scale=4, image_token_id=49190),
    _idefics3("smolvlm-2.2b", "HuggingFaceTB/SmolVLM-Instruct", 2_246_272_880,
              _llama(49155, 2048, 24, 32, 32, 8192, theta=273768.0, tie=False),
              _siglip(384), scale=3, image_token_id=49153),
    # --- PaliGemma (SigLIP-so400m/14-224 + linear + Gemma-2B) ---
    dict(
        name="paligemma-3b", family="paligemma", text=_GEMMA_2B, vision=_siglip(224),
        projector=ProjectorConfig(kind="linear", in_dim=1152, out_dim=2048, bias=True, norm="none"),
        image_token_id=257152, hf_id="google/paligemma-3b-pt-224", published_params=2_923_335_408,
    ),
    # --- pi0-style VLA: PaliGemma-3B + Gemma-300M flow-matching action expert (Black et al. 2024, arXiv:2410.24164:
    # "3.3 billion parameters"; the paper rounds, hence the 2% tolerance). Our expert reads the VLM's last hidden
    # states through `prefix_proj` (pi0 reads per-layer keys/values), so openpi/lerobot weights do not load. ---
    dict(
        name="pi0-3b", family="pi0", text=_GEMMA_2B, vision=_siglip(224),
        projector=ProjectorConfig(kind="linear", in_dim=1152, out_dim=2048, bias=True, norm="none"),
        action=ActionConfig(action_dim=32, horizon=50, proprio_dim=32, expert=TextConfig(
            vocab_size=0, hidden_size=1024, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256,
            intermediate_size=4096, mlp="geglu", norm="rms_gemma")),
        image_token_id=257152, hf_id=None, published_params=3_300_000_000, params_tolerance=0.02,
    ),
    # --- text-only decoders used by the rows above ---
    dict(name="llama-3-8b", family="llama", text=_LLAMA3_8B, hf_id="meta-llama/Meta-Llama-3-8B",
         published_params=8_030_261_248),
    dict(name="qwen2.5-7b", family="qwen2", text=_qwen2(152064, 3584, 28, 28, 4, 18944, tie=False),
         hf_id="Qwen/Qwen2.5-7B", published_params=7_615_616_512),
    # --- tiny rows: tests and the CPU demo (no published size) ---
    _qwen2_vl("tiny-qwen2-vl", None, None, _qwen2(512, 64, 2, 4, 2, 128, tie=True, mrope=[2, 3, 3]),
              depth=2, width=32, heads=2, mlp=64, patch=4, image_token_id=6),
    _qwen2_vl("tiny-qwen2.5-vl", None, None, _qwen2(512, 64, 2, 4, 2, 128, tie=False, mrope=[2, 3, 3]),
              family="qwen2_5_vl", depth=3, width=32, heads=2, mlp=48, patch=4, window=16, full=[1], image_token_id=6),
    _qwen2_vl("tiny-demo", None, None, _qwen2(256, 128, 4, 4, 2, 384, tie=True, mrope=[4, 6, 6]),
              depth=3, width=96, heads=4, mlp=256, patch=8, image_token_id=6),
    dict(name="tiny-llama", family="llama", text=_llama(512, 64, 2, 4, 2, 128, rope_scaling=_LLAMA31_SCALING)),
    dict(name="tiny-qwen2", family="qwen2", text=_qwen2(512, 64, 2, 4, 2, 128, tie=True)),
    dict(name="tiny-qwen3", family="qwen3",
         text=TextConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                         intermediate_size=128, rope_theta=1e6, qk_norm=True, tie_embeddings=True)),
    dict(name="tiny-pi0", family="pi0",
         text=TextConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16,
                         intermediate_size=128, mlp="geglu", norm="rms_gemma", tie_embeddings=True, embed_scale=True,
                         prefix_lm=True),
         vision=_siglip(32, layers=2, width=32, mlp=48, heads=2, patch=8),
         projector=ProjectorConfig(kind="linear", in_dim=32, out_dim=64, bias=True, norm="none"),
         action=ActionConfig(action_dim=4, horizon=5, proprio_dim=3, expert=TextConfig(
             vocab_size=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
             intermediate_size=64, mlp="geglu", norm="rms_gemma")),
         image_token_id=6),
    dict(name="tiny-internvl", family="internvl", text=_qwen2(512, 64, 2, 4, 2, 128, tie=True), image_token_id=6,
         vision=VisionConfig(kind="intern_vit", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                             patch_size=8, image_size=64, spatial_merge_size=2, extra={"attention_bias": True}),
         projector=ProjectorConfig(kind="pixel_shuffle_mlp", in_dim=32, out_dim=64, hidden_dim=64, merge_size=2)),
    dict(name="tiny-gemma", family="gemma",
         text=TextConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=32,
                         intermediate_size=128, mlp="geglu", norm="rms_gemma", tie_embeddings=True,
                         embed_scale=True)),
]  # fmt: skip

name_to_config: dict[str, ModelConfig] = {row["name"]: ModelConfig(**row) for row in configs}
"""Every named row, ready for `ModelConfig.from_name`."""

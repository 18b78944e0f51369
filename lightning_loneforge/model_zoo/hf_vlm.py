"""Hugging Face checkpoints of the ViT-based VLMs: LLaVA, LLaVA-OneVision, InternVL, Idefics3 / SmolVLM, PaliGemma.

The vision tower and projector weights go through the towers' own strict maps (`towers/vit.py`,
`towers/projectors.py`); the language model through the decoder map. Key layouts accepted: the Hub's
(`vision_tower.vision_model.*`, `language_model.model.*`), `save_pretrained` in transformers 5.x
(`vision_tower.*`, `language_model.model.*`) and 5.x in-memory names (`model.vision_tower.*`,
`model.language_model.*`, `lm_head.*`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_loneforge.model_zoo.config import ModelConfig, ProjectorConfig, VisionConfig

VLM_TYPES = ("llava", "llava_onevision", "internvl", "idefics3", "smolvlm", "paligemma")
_VISION_KIND = {"llava": "clip", "llava_onevision": "siglip", "internvl": "intern_vit", "idefics3": "idefics3",
                "smolvlm": "idefics3", "paligemma": "siglip"}  # fmt: skip

_LLAVA_LAYOUT = {
    "vision": "vision_tower.", "projector": "multi_modal_projector.", "decoder": "language_model.model.",
    "lm_head": "language_model.lm_head.",
    "aliases": [("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.image_newline", "image_newline")],
}  # fmt: skip
_IDEFICS3_LAYOUT = {
    "vision": "model.vision_model.", "projector": "model.connector.", "decoder": "model.text_model.",
    "lm_head": "lm_head.", "aliases": [],
}  # fmt: skip
LAYOUTS = {"llava": _LLAVA_LAYOUT, "llava_onevision": _LLAVA_LAYOUT, "internvl": _LLAVA_LAYOUT,
           "paligemma": _LLAVA_LAYOUT, "idefics3": _IDEFICS3_LAYOUT}  # fmt: skip
_DECODER_NAMES = [("embed_tokens.", "embed_tokens."), ("layers.", "blocks."), ("norm.", "norm.")]


def vlm_config_from_hf(hf: Mapping[str, Any], name: str) -> ModelConfig:
    """`ModelConfig` of a ViT-based VLM `config.json`; the dict is kept as `hf_config` for the towers' own readers."""
    from lightning_loneforge.model_zoo.hf_io import text_config_from_hf
    from lightning_loneforge.model_zoo.towers.projectors import projector_config_from_hf
    from lightning_loneforge.model_zoo.towers.vit import vit_config_from_hf

    model_type = hf["model_type"]
    vit = vit_config_from_hf(hf)
    proj = projector_config_from_hf(hf)
    text_hf = dict(hf.get("text_config") or {})
    if "tie_word_embeddings" in hf:
        text_hf["tie_word_embeddings"] = hf["tie_word_embeddings"]
    text_type = text_hf.get("model_type", "gemma" if model_type == "paligemma" else "llama")
    text = text_config_from_hf(text_hf, text_type)
    if model_type == "paligemma":
        text = dataclasses.replace(text, prefix_lm=True)
    merge = proj.pixel_shuffle
    vision = VisionConfig(
        kind=_VISION_KIND[model_type], hidden_size=vit.hidden_size, num_layers=vit.num_layers,
        num_heads=vit.num_heads, intermediate_size=vit.intermediate_size, patch_size=vit.patch_size,
        image_size=vit.image_size, spatial_merge_size=merge, feature_layer=vit.feature_layer, act=vit.hidden_act,
    )  # fmt: skip
    kind = ("pixel_shuffle_" if merge > 1 else "") + proj.kind
    projector = ProjectorConfig(
        kind=kind, in_dim=proj.in_dim, out_dim=proj.out_dim, hidden_dim=proj.out_dim, merge_size=merge,
        bias=proj.bias, act=proj.hidden_act,
    )  # fmt: skip
    image_token = hf.get("image_token_id", hf.get("image_token_index"))
    if image_token is None:
        raise ValueError(f"config.json ({model_type}): missing image_token_id / image_token_index")
    family = "idefics3" if model_type == "smolvlm" else model_type
    return ModelConfig(
        name=name, family=family, text=text, vision=vision, projector=projector, image_token_id=image_token,
        hf_config=dict(hf),
    )  # fmt: skip


def _canonical(state: Mapping[str, Tensor], layout: dict) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for src, dst in layout["aliases"]:
            if key.startswith(src):
                key = dst + key[len(src) :]
                break
        out[key] = value
    return out


def vlm_hf_to_ours(state: Mapping[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """Strict map of a VLM checkpoint into `model` (a `MultimodalModel`); KeyError lists unused / missing keys."""
    from lightning_loneforge.model_zoo.hf_io import _short
    from lightning_loneforge.model_zoo.towers.packed_vit import shuffle_projector_config, vit_config
    from lightning_loneforge.model_zoo.towers.projectors import hf_to_ours_projector
    from lightning_loneforge.model_zoo.towers.vit import hf_to_ours_vit

    config: ModelConfig = model.config
    layout = LAYOUTS[config.family]
    state = _canonical(state, layout)
    out = {"vision." + k: v for k, v in hf_to_ours_vit(state, layout["vision"], vit_config(config)).items()}
    projected = hf_to_ours_projector(state, layout["projector"], shuffle_projector_config(config))
    out.update({"projector." + k: v for k, v in projected.items()})
    unused = []
    for key, value in state.items():
        if key.startswith((layout["vision"], layout["projector"])):
            continue
        ours = None
        if key.startswith(layout["decoder"]):
            rest = key[len(layout["decoder"]) :]
            ours = next(("llm." + dst + rest[len(src) :] for src, dst in _DECODER_NAMES if rest.startswith(src)), None)
        elif key.startswith(layout["lm_head"]):
            ours = "llm.lm_head." + key[len(layout["lm_head"]) :]
        elif key == "image_newline":
            ours = "projector.image_newline"
        if ours is None:
            unused.append(key)
        else:
            out[ours] = value
    expected = model.state_dict()
    if "llm.lm_head.weight" in out and "llm.lm_head.weight" not in expected:
        if torch.equal(out["llm.lm_head.weight"], out.get("llm.embed_tokens.weight", torch.empty(0))):
            del out["llm.lm_head.weight"]  # a tied model's checkpoint may still carry the output matrix
    unused += [k for k in out if k not in expected]
    missing = sorted(set(expected) - set(out))
    if unused or missing:
        raise KeyError(f"checkpoint does not match {config.family!r}: unused tensors {_short(sorted(unused))}; "
                       f"missing weights {_short(missing)}")  # fmt: skip
    for key, want in expected.items():
        if out[key].shape != want.shape:
            raise ValueError(f"checkpoint tensor for {key}: shape {tuple(out[key].shape)}, expected {tuple(want.shape)}")
    return out


def vlm_ours_to_hf(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our weights under transformers 5.x `save_pretrained` names."""
    from lightning_loneforge.model_zoo.towers.packed_vit import shuffle_projector_config, vit_config
    from lightning_loneforge.model_zoo.towers.projectors import ours_to_hf_projector
    from lightning_loneforge.model_zoo.towers.vit import ours_to_hf_vit

    layout = LAYOUTS[config.family]
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "projector": {}, "llm": {}}
    for key, value in state.items():
        tower, _, rest = key.partition(".")
        parts[tower][rest] = value
    out = ours_to_hf_vit(parts["vision"], layout["vision"], vit_config(config))
    newline = parts["projector"].pop("image_newline", None)
    if newline is not None:
        out["image_newline"] = newline
    out.update(ours_to_hf_projector(parts["projector"], layout["projector"], shuffle_projector_config(config)))
    for rest, value in parts["llm"].items():
        if rest.startswith("lm_head."):
            out[layout["lm_head"] + rest[len("lm_head.") :]] = value
            continue
        src, dst = next((s, d) for s, d in _DECODER_NAMES if rest.startswith(d))
        out[layout["decoder"] + src + rest[len(dst) :]] = value
    return out

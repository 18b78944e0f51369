"""Hugging Face checkpoints: `config.json` -> `ModelConfig`, `*.safetensors` -> our weights (strict), and back.

Reads local folders only. Both key layouts are accepted: the Hub's (`visual.*`, `model.layers.*`, `lm_head`) and
transformers 5.x in-memory names (`model.visual.*`, `model.language_model.*`); `save_hf` writes the Hub layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_loneforge.model_zoo.config import ModelConfig, ProjectorConfig, TextConfig, VisionConfig
from lightning_loneforge.model_zoo.hf_vlm import (
    LAYOUTS,
    VLM_TYPES,
    vlm_config_from_hf,
    vlm_hf_to_ours,
    vlm_ours_to_hf,
)

_TEXT_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma", "mistral")
_QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")


# ---------------------------------------------------------------- config.json -> ModelConfig
def read_hf_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the checkpoint folder")
    return json.loads(path.read_text())


def config_from_hf(hf: Mapping[str, Any], name: str | None = None) -> ModelConfig:
    """Our `ModelConfig` for a transformers `config.json` dict.

    Raises:
        ValueError: If the model type is not one we map, or a field we need is missing.
    """
    model_type = hf.get("model_type")
    name = name or f"hf-{model_type}"
    if model_type in _TEXT_MODEL_TYPES:
        return ModelConfig(name=name, family=_text_family(model_type), text=text_config_from_hf(hf, model_type))
    if model_type in _QWEN_VL_TYPES:
        text_hf = dict(hf.get("text_config") or hf)
        if "tie_word_embeddings" in hf:
            text_hf["tie_word_embeddings"] = hf["tie_word_embeddings"]
        text = text_config_from_hf(text_hf, "qwen2")
        vision, projector = _qwen_vision_from_hf(_require(hf, "vision_config", "config.json"), model_type)
        return ModelConfig(
            name=name, family=model_type, text=text, vision=vision, projector=projector,
            image_token_id=_require(hf, "image_token_id", "config.json"), video_token_id=hf.get("video_token_id"),
        )  # fmt: skip
    if model_type in VLM_TYPES:
        return vlm_config_from_hf(hf, name)
    raise ValueError(f"config.json: model_type {model_type!r} is not supported (supported: {_supported()})")


def _supported() -> str:
    return ", ".join(_TEXT_MODEL_TYPES + _QWEN_VL_TYPES + VLM_TYPES)


def _text_family(model_type: str) -> str:
    return "llama" if model_type == "mistral" else model_type


def _require(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in hf:
        raise ValueError(f"{where}: missing field {key!r}")
    return hf[key]


def _rope(hf: Mapping[str, Any]) -> tuple[float, dict | None, list[int] | None]:
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    mrope = merged.get("mrope_section")
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in ("default", "mrope", None):
        return float(theta), None, mrope
    keep = {k: v for k, v in merged.items() if k not in ("rope_theta", "mrope_section", "type")}
    keep["rope_type"] = kind
    return float(theta), keep, mrope


def text_config_from_hf(hf: Mapping[str, Any], model_type: str) -> TextConfig:
    where = f"config.json ({model_type} text)"
    theta, scaling, mrope = _rope(hf)
    heads = _require(hf, "num_attention_heads", where)
    if hf.get("attention_bias") and model_type not in ("qwen2",):
        raise ValueError(f"{where}: attention_bias=True (bias on o_proj too) is not supported")
    gemma = model_type == "gemma"
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    return TextConfig(
        vocab_size=_require(hf, "vocab_size", where),
        hidden_size=_require(hf, "hidden_size", where),
        num_layers=_require(hf, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=_require(hf, "intermediate_size", where),
        head_dim=hf.get("head_dim"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        mrope_section=mrope,
        mlp="geglu" if "gelu" in act else "swiglu",
        norm="rms_gemma" if gemma else "rms",
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        embed_scale=gemma,
    )


def _qwen_vision_from_hf(hf: Mapping[str, Any], model_type: str) -> tuple[VisionConfig, ProjectorConfig]:
    where = f"config.json vision_config ({model_type})"
    merge = hf.get("spatial_merge_size", 2)
    if model_type == "qwen2_vl":
        width = _require(hf, "embed_dim", where)
        out, mlp, act = _require(hf, "hidden_size", where), int(width * hf.get("mlp_ratio", 4)), hf.get("hidden_act")
        window, full, norm = None, [], "layernorm"
    else:
        width = _require(hf, "hidden_size", where)
        out, mlp, act = _require(hf, "out_hidden_size", where), _require(hf, "intermediate_size", where), "silu"
        window, full, norm = hf.get("window_size", 112), list(hf.get("fullatt_block_indexes", [])), "rms"
    vision = VisionConfig(
        kind=model_type, hidden_size=width, num_layers=_require(hf, "depth", where),
        num_heads=_require(hf, "num_heads", where), intermediate_size=mlp, patch_size=hf.get("patch_size", 14),
        temporal_patch_size=hf.get("temporal_patch_size", 2), in_channels=hf.get("in_channels", hf.get("in_chans", 3)),
        spatial_merge_size=merge, act=act or "quick_gelu", window_size=window, fullatt_block_indexes=full,
    )  # fmt: skip
    return vision, ProjectorConfig(kind="patch_merger", in_dim=width, out_dim=out, merge_size=merge, norm=norm)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dict for `config` (families with a writer; see `_supported()`)."""
    text = _text_to_hf(config.text, config.family)
    if config.family in ("llama", "qwen2", "qwen3", "gemma"):
        return {"architectures": [_ARCH[config.family]], **text}
    if config.family not in _QWEN_VL_TYPES:
        raise ValueError(f"save_hf: no config.json writer for family {config.family!r}")
    v, p = config.vision, config.projector
    vision: dict[str, Any] = {
        "depth": v.num_layers, "num_heads": v.num_heads, "patch_size": v.patch_size, "in_channels": v.in_channels,
        "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size, "hidden_act": v.act,
    }  # fmt: skip
    if config.family == "qwen2_vl":
        vision.update(embed_dim=v.hidden_size, hidden_size=p.out_dim, mlp_ratio=_ratio(v.intermediate_size, v.hidden_size))
    else:
        vision.update(
            hidden_size=v.hidden_size, out_hidden_size=p.out_dim, intermediate_size=v.intermediate_size,
            window_size=v.window_size, fullatt_block_indexes=v.fullatt_block_indexes,
        )  # fmt: skip
    text["model_type"] = f"{config.family}_text"
    return {
        "architectures": [_ARCH[config.family]], "model_type": config.family, "text_config": text,
        "vision_config": {**vision, "model_type": config.family}, "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "tie_word_embeddings": config.text.tie_embeddings,
    }  # fmt: skip


def _ratio(a: int, b: int) -> int | float:
    return a // b if a % b == 0 else a / b


_ARCH = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM", "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}  # fmt: skip


def _text_to_hf(t: TextConfig, family: str) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.rope_theta, **(t.rope_scaling or {})}
    if t.mrope_section:
        rope["mrope_section"] = t.mrope_section
    out = {
        "model_type": family, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "intermediate_size": t.intermediate_size, "head_dim": t.resolved_head_dim, "rms_norm_eps": t.norm_eps,
        "rope_parameters": rope, "tie_word_embeddings": t.tie_embeddings,
        "hidden_act": "silu" if t.mlp == "swiglu" else "gelu_pytorch_tanh",
    }  # fmt: skip
    return out


# ---------------------------------------------------------------- weight names
Rule = tuple[str, str]
"""(hub prefix, our prefix); the first matching prefix renames a key."""

_DECODER_RULES: list[Rule] = [
    ("model.embed_tokens.", "llm.embed_tokens."),
    ("model.layers.", "llm.blocks."),
    ("model.norm.", "llm.norm."),
    ("lm_head.", "llm.lm_head."),
]
_QWEN_VL_RULES: list[Rule] = [
    ("visual.patch_embed.proj.", "vision.patch_embed."),
    ("visual.merger.", "projector."),
    ("visual.", "vision."),
    *_DECODER_RULES,
]
_ALIASES: dict[str, list[Rule]] = {
    # transformers 5.x in-memory names -> Hub names
    "qwen_vl": [("model.visual.", "visual."), ("model.language_model.", "model.")],
}
WEIGHT_RULES: dict[str, list[Rule]] = {
    "llama": _DECODER_RULES, "qwen2": _DECODER_RULES, "qwen3": _DECODER_RULES, "gemma": _DECODER_RULES,
    "qwen2_vl": _QWEN_VL_RULES, "qwen2_5_vl": _QWEN_VL_RULES,
}  # fmt: skip
"""Weight-name map per family (Hub layout)."""
_FAMILY_ALIASES = {"qwen2_vl": "qwen_vl", "qwen2_5_vl": "qwen_vl"}


def _rename(key: str, rules: list[Rule]) -> str | None:
    for src, dst in rules:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def _canonical(key: str, family: str) -> str:
    for src, dst in _ALIASES.get(_FAMILY_ALIASES.get(family, ""), []):
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def hf_to_ours(state: Mapping[str, Tensor], model: torch.nn.Module, family: str) -> dict[str, Tensor]:
    """Rename and reshape a Hub state dict into `model`'s names. Strict: raises KeyError listing every unused
    checkpoint tensor and every model weight not found; ValueError on a shape mismatch."""
    if family in LAYOUTS:
        return vlm_hf_to_ours(state, model)
    if family not in WEIGHT_RULES:
        raise ValueError(f"no weight map for family {family!r} (have: {', '.join(sorted(WEIGHT_RULES))})")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    rules = WEIGHT_RULES[family]
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, value in state.items():
        ours = _rename(_canonical(key, family), rules)
        if ours == "llm.lm_head.weight" and ours not in expected:
            ours = None if not _same(value, state, family) else "__tied__"
        if ours == "__tied__":
            continue
        if ours is None or ours not in expected:
            unused.append(key)
            continue
        want = expected[ours]
        if value.shape != want:
            if value.numel() != want.numel():
                raise ValueError(f"checkpoint {key}: shape {tuple(value.shape)} does not fit {ours} {tuple(want)}")
            value = value.reshape(want)
        out[ours] = value
    missing = sorted(set(expected) - set(out))
    if unused or missing:
        raise KeyError(
            f"checkpoint does not match {family!r}: unused tensors {_short(sorted(unused))}; "
            f"missing weights {_short(missing)}"
        )
    return out


def _same(lm_head: Tensor, state: Mapping[str, Tensor], family: str) -> bool:
    """A tied model's checkpoint may still carry `lm_head.weight`; accept it only when equal to the embeddings."""
    for key, value in state.items():
        if _canonical(key, family) == "model.embed_tokens.weight":
            return value.shape == lm_head.shape and torch.equal(value, lm_head)
    return False


def _short(keys: list[str], limit: int = 10) -> str:
    if not keys:
        return "[]"
    more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + more + "]"


_HUB_SHAPES: dict[str, Callable[[ModelConfig], tuple[int, ...]]] = {
    "vision.patch_embed.weight": lambda c: (
        c.vision.hidden_size, c.vision.in_channels, c.vision.temporal_patch_size, c.vision.patch_size,
        c.vision.patch_size,
    ),
}  # fmt: skip


def ours_to_hf(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our weights under Hub names (inverse of `hf_to_ours`)."""
    if config.family in LAYOUTS:
        return vlm_ours_to_hf(state, config)
    rules = WEIGHT_RULES[config.family]
    inverse = [(dst, src) for src, dst in rules]
    out = {}
    for key, value in state.items():
        hub = _rename(key, inverse)
        if hub is None:
            raise KeyError(f"save_hf: no Hub name for our weight {key!r} (family {config.family!r})")
        if key in _HUB_SHAPES and config.family in _QWEN_VL_TYPES:
            value = value.reshape(_HUB_SHAPES[key](config))
        out[hub] = value.contiguous()
    return out


# ---------------------------------------------------------------- folders
def read_safetensors(folder: str | Path) -> dict[str, Tensor]:
    """Every tensor of every `*.safetensors` file in `folder` (CPU).

    Raises:
        FileNotFoundError: If there is none. ValueError: If two files hold the same key.
    """
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    state: dict[str, Tensor] = {}
    for file in files:
        for key, value in load_file(str(file)).items():
            if key in state:
                raise ValueError(f"{file}: tensor {key!r} also appears in another shard")
            state[key] = value
    return state


def load_hf_weights(model: torch.nn.Module, folder: str | Path, family: str) -> None:
    """Load a local HF checkpoint folder into `model` (strict, dtype of the model kept)."""
    try:
        mapped = hf_to_ours(read_safetensors(folder), model, family)
    except (KeyError, ValueError) as err:
        raise type(err)(f"{folder}: {err.args[0]}") from None
    model.load_state_dict(mapped, strict=True, assign=_is_meta(model))


def _is_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def from_pretrained(folder: str | Path, **overrides: Any):
    """`MultimodalModel` built from `folder/config.json` and loaded from its safetensors."""
    from lightning_loneforge.model_zoo.model import MultimodalModel

    config = config_from_hf(read_hf_config(folder), name=Path(folder).name)
    if overrides:
        config = config.replace(**overrides)
    with torch.device("meta"):
        model = MultimodalModel(config)
    load_hf_weights(model, folder, config.family)
    return model


def save_hf(model, folder: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` (Hub names) for `model` into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.hf_config or config_to_hf(model.config)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=1) + "\n")
    state = ours_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder



"""`ModelConfig`: one dataclass per tower plus the model row that ties them together.

The named rows live in `rows.py` (`name_to_config`); `ModelConfig.from_name("qwen2-vl-2b")` builds one.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class TextConfig:
    """Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    """Per-head width; `hidden_size // num_heads` when None."""
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """`{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`."""
    mrope_section: list[int] | None = None
    """3-D M-RoPE split of `head_dim / 2` frequencies over (t, h, w), e.g. [16, 24, 24]; None for 1-D RoPE."""
    mlp: str = "swiglu"
    """`swiglu` (silu gate) or `geglu` (tanh-GELU gate)."""
    norm: str = "rms"
    """`rms` or `rms_gemma` (x * (1 + w))."""
    qkv_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over each head's q and k before rotary (Qwen3)."""
    tie_embeddings: bool = False
    embed_scale: bool = False
    """Multiply token embeddings by sqrt(hidden_size) (Gemma)."""
    prefix_lm: bool = False
    """Image + prompt attend bidirectionally, the answer causally (PaliGemma); the prefix ends at the first
    labelled token of each sample."""

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass(kw_only=True)
class VisionConfig:
    """Vision encoder. `kind` picks the tower class: `qwen2_vl`, `qwen2_5_vl`, `clip`, `siglip`, `idefics3`
    (SigLIP as in Idefics3), `intern_vit`."""

    kind: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int = 14
    temporal_patch_size: int = 1
    in_channels: int = 3
    spatial_merge_size: int = 1
    """Merge window the data pipeline orders patches by (2 for Qwen2-VL)."""
    image_size: int | None = None
    """Square input size of absolute-position ViTs (positions = (image_size / patch_size)^2 [+ CLS])."""
    norm_eps: float = 1e-6
    act: str = "quick_gelu"
    window_size: int | None = None
    """Qwen2.5-VL window attention, in pixels."""
    fullatt_block_indexes: list[int] = field(default_factory=list)
    """Qwen2.5-VL blocks that attend over the whole image."""
    feature_layer: int = -1
    """Layer whose output feeds the projector (-2 for LLaVA-1.5)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Absolute-position ViTs: transformers `vision_config` fields passed through (e.g. `attention_bias`)."""


@dataclass(kw_only=True)
class ProjectorConfig:
    """Vision-to-LLM projector. `kind`: `patch_merger`, `mlp`, `pixel_shuffle_mlp`, `linear`."""

    kind: str
    in_dim: int
    out_dim: int
    hidden_dim: int | None = None
    merge_size: int = 1
    """Spatial merge (patch merger, pixel shuffle factor)."""
    norm: str = "layernorm"
    bias: bool = True
    act: str = "gelu"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ActionConfig:
    """Flow-matching action expert (pi0 style); `expert` gives its transformer's shape (vocab unused)."""

    action_dim: int
    horizon: int
    proprio_dim: int
    expert: TextConfig
    extra: dict[str, Any] = field(default_factory=dict)
    """Further `ActionExpertConfig` fields (time sampling, Euler steps)."""


@dataclass(kw_only=True)
class ModelConfig:
    """One zoo row: the towers' configs plus the row's identity and published size."""

    name: str
    family: str
    """Weight-map / assembly family: `qwen2_vl`, `qwen2_5_vl`, `llava`, `llava_onevision`, `internvl`, `idefics3`,
    `paligemma`, `pi0`, `llama`, `qwen2`, `qwen3`, `gemma`."""
    text: TextConfig
    vision: VisionConfig | None = None
    projector: ProjectorConfig | None = None
    action: ActionConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    hf_id: str | None = None
    published_params: int | None = None
    """Parameter count published for `hf_id` (safetensors total on the Hub); the size test compares to it."""
    params_tolerance: float = 0.01
    """Relative tolerance of the size test (wider only where the publication rounds, see the row's comment)."""
    source: str = ""
    hf_config: dict[str, Any] | None = None
    """The transformers `config.json` this config was read from (None for table rows); `save_hf` writes it back."""

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named row, with `overrides` applied (nested dicts update nested configs: `text={"num_layers": 2}`).

        Raises:
            ValueError: If `name` is not a row, or an override names an unknown field.
        """
        from lightning_loneforge.model_zoo.rows import name_to_config

        if name not in name_to_config:
            raise ValueError(f"unknown model {name!r}; rows: {', '.join(sorted(name_to_config))}")
        config = copy.deepcopy(name_to_config[name])
        return config.replace(**overrides) if overrides else config

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with fields replaced; dict values for tower fields update that tower's config."""
        return _replace(self, overrides, self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _replace(obj: Any, overrides: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"{where}: {type(obj).__name__} has no field {key!r} (fields: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = _replace(current, value, f"{where}.{key}")
        changes[key] = value
    return dataclasses.replace(obj, **changes)

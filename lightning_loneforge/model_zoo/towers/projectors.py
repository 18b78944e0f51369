"""Vision-to-language projectors: LLaVA's 2-layer MLP, PaliGemma's linear, pixel shuffle + MLP (InternVL)
or + linear (Idefics3 / SmolVLM).

``Projector(features [N, tokens, in_dim]) -> [N, tokens / pixel_shuffle**2, out_dim]``.
``hf_to_ours_projector`` / ``ours_to_hf_projector`` map transformers' weight names to ours and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_loneforge.model_zoo.towers.vit import (
    activation,
    map_strict,
    meta_shapes,
    name_rules,
    rename_key,
    vlm_config,
)


@dataclass(kw_only=True, slots=True)
class ProjectorConfig:
    """Shape of a projector. Rows: LLaVA / LLaVA-OneVision ``kind="mlp"``; PaliGemma ``kind="linear"``;
    InternVL ``kind="mlp", pixel_shuffle=2, norm=True``; Idefics3 / SmolVLM ``kind="linear", pixel_shuffle=
    scale_factor, bias=False``."""

    in_dim: int
    """Width of the vision features (before pixel shuffle)."""
    out_dim: int
    """Width of the language model."""
    kind: str = "mlp"
    """"mlp": linear -> act -> linear; "linear": one linear layer."""
    hidden_act: str = "gelu"
    """Activation between the MLP's layers (transformers' ``projector_hidden_act``)."""
    bias: bool = True
    """Bias in the linear layers (LLaVA's ``multimodal_projector_bias``; False for Idefics3)."""
    pixel_shuffle: int = 1
    """Fold each ``s x s`` patch window into one token of ``s*s*in_dim`` channels (InternVL: 1/downsample_ratio;
    Idefics3 / SmolVLM: scale_factor). 1: no shuffle."""
    norm: bool = False
    """LayerNorm on the (shuffled) features before the first linear (InternVL)."""
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "linear"):
            raise ValueError(f"ProjectorConfig: kind={self.kind!r} must be 'mlp' or 'linear'")
        if self.pixel_shuffle < 1:
            raise ValueError(f"ProjectorConfig: pixel_shuffle={self.pixel_shuffle} must be >= 1")
        activation(self.hidden_act)

    @property
    def shuffled_dim(self) -> int:
        return self.in_dim * self.pixel_shuffle**2

    def num_output_tokens(self, num_features: int) -> int:
        """LLM tokens one image of ``num_features`` vision tokens becomes."""
        return num_features // self.pixel_shuffle**2


def pixel_shuffle(features: Tensor, factor: int, grid: tuple[int, int] | None = None) -> Tensor:
    """``[N, h*w, C] -> [N, (h/f)*(w/f), f*f*C]``: each ``f x f`` window becomes one token.

    Channel ``(a*f + b)*C + c`` holds patch ``(f*i + a, f*j + b)``, the order of InternVL's ``pixel_shuffle``
    (downsample_ratio 1/f) and Idefics3's connector (scale_factor f). ``grid`` defaults to a square.
    """
    n, tokens, channels = features.shape
    if grid is None:
        side = round(tokens**0.5)
        grid = (side, side)
    h, w = grid
    if h * w != tokens or h % factor or w % factor:
        raise ValueError(f"pixel_shuffle: {tokens} tokens do not form a {h}x{w} grid divisible by {factor}")
    x = features.reshape(n, h // factor, factor, w // factor, factor, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, (h // factor) * (w // factor), factor * factor * channels)


class Projector(nn.Module):
    """[pixel shuffle] -> [LayerNorm] -> fc1 -> [act -> fc2]."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.shuffled_dim, eps=config.norm_eps) if config.norm else None
        self.fc1 = nn.Linear(config.shuffled_dim, config.out_dim, bias=config.bias)
        if config.kind == "mlp":
            self.act = activation(config.hidden_act)
            self.fc2 = nn.Linear(config.out_dim, config.out_dim, bias=config.bias)
        else:
            self.fc2 = None

    def forward(self, features: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """``features [N, tokens, in_dim]`` (class token already dropped) -> ``[N, tokens', out_dim]``."""
        if features.ndim != 3 or features.shape[-1] != self.config.in_dim:
            raise ValueError(
                f"Projector: features must be [N, tokens, {self.config.in_dim}], got {tuple(features.shape)}"
            )
        x = features
        if self.config.pixel_shuffle > 1:
            x = pixel_shuffle(x, self.config.pixel_shuffle, grid)
        if self.norm is not None:
            x = self.norm(x)
        x = self.fc1(x)
        if self.fc2 is not None:
            x = self.fc2(self.act(x))
        return x


# transformers names: LLaVA / LLaVA-OneVision / InternVL ``multi_modal_projector.{layer_norm,linear_1,linear_2}``,
# PaliGemma ``multi_modal_projector.linear``, Idefics3 / SmolVLM ``connector.modality_projection.proj``.
_MLP_NAMES = [("layer_norm", "norm"), ("linear_1", "fc1"), ("linear_2", "fc2")]


def _hf_names(config: ProjectorConfig) -> list[tuple[str, str]]:
    if config.kind == "mlp":
        return _MLP_NAMES
    return [("modality_projection.proj" if config.pixel_shuffle > 1 else "linear", "fc1")]


def hf_to_ours_projector(
    state_dict: Mapping[str, Tensor], prefix: str, config: ProjectorConfig
) -> dict[str, Tensor]:
    """Map transformers projector weights under ``prefix`` (e.g. "multi_modal_projector.", "model.connector.")
    to ``Projector(config)`` names. Strict: KeyError lists unused keys under the prefix and missing weights."""
    expected = meta_shapes(Projector, config)
    return map_strict(state_dict, prefix, name_rules(_hf_names(config), reverse=False), expected, "projector")


def ours_to_hf_projector(state_dict: Mapping[str, Tensor], prefix: str, config: ProjectorConfig) -> dict[str, Tensor]:
    """Inverse of ``hf_to_ours_projector``: our names to transformers names under ``prefix``."""
    rules = name_rules(_hf_names(config), reverse=True)
    out = {}
    for key, value in state_dict.items():
        name = rename_key(key, rules)
        if name is None:
            raise KeyError(f"projector: no transformers name for our weight {key!r}")
        out[prefix + name] = value
    return out


def projector_config_from_hf(config: Mapping) -> ProjectorConfig:
    """``ProjectorConfig`` from a transformers VLM ``config.json`` (as a dict): llava, llava_onevision, paligemma,
    pi0, internvl, idefics3, smolvlm. Raises ValueError naming the field for anything else."""
    family = config.get("model_type")
    vlm = vlm_config(config)
    try:
        vision_dim = vlm["vision_config"]["hidden_size"]
        if family in ("paligemma", "pi0"):
            return ProjectorConfig(in_dim=vision_dim, out_dim=vlm.get("projection_dim", 2048), kind="linear")
        text_dim = vlm["text_config"]["hidden_size"]
    except KeyError as err:
        raise ValueError(f"projector_config_from_hf: config.json of {family!r} lacks {err}") from None
    if family in ("llava", "llava_onevision"):
        return ProjectorConfig(
            in_dim=vision_dim, out_dim=text_dim, hidden_act=config.get("projector_hidden_act", "gelu"),
            bias=config.get("multimodal_projector_bias", True),
        )
    if family == "internvl":
        ratio = config.get("downsample_ratio", 0.5)
        return ProjectorConfig(
            in_dim=vision_dim, out_dim=text_dim, hidden_act=config.get("projector_hidden_act", "gelu"),
            pixel_shuffle=round(1 / ratio), norm=True,
        )
    if family in ("idefics3", "smolvlm"):
        return ProjectorConfig(
            in_dim=vision_dim, out_dim=text_dim, kind="linear", bias=False, pixel_shuffle=config.get("scale_factor", 2)
        )
    raise ValueError(f"projector_config_from_hf: model_type={family!r} has no projector here")


HF_PREFIXES: dict[str, tuple[str, str]] = {
    "llava": ("vision_tower.", "multi_modal_projector."),
    "llava_onevision": ("vision_tower.", "multi_modal_projector."),
    "paligemma": ("vision_tower.", "multi_modal_projector."),
    "internvl": ("vision_tower.", "multi_modal_projector."),
    "idefics3": ("model.vision_model.", "model.connector."),
    "smolvlm": ("model.vision_model.", "model.connector."),
    "pi0": (
        "paligemma_with_expert.paligemma.model.vision_tower.",
        "paligemma_with_expert.paligemma.model.multi_modal_projector.",
    ),
}
"""(vision, projector) key prefixes in checkpoint files per family, as transformers 5.x ``save_pretrained``
writes them; Hub LLaVA / LLaVA-OneVision / PaliGemma files add ``vision_model.`` after the vision prefix,
which ``hf_to_ours_vit`` detects. A loaded model's ``state_dict()`` puts ``model.`` before the LLaVA-style
prefixes; lerobot pi0 files may put ``model.`` before everything."""

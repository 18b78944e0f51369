"""ViT with learned absolute positions: CLIP, SigLIP (incl. Idefics3's), InternViT.

Each image of a fixed-size batch ``[N, 3, H, W]`` is its own sequence, so attention is plain SDPA.
Other resolutions than ``image_size`` interpolate the position table bicubically, as transformers does.
``hf_to_ours_vit`` / ``ours_to_hf_vit`` map transformers' weight names to ours and back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str):
    """The activation function for a transformers ``hidden_act`` name."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


@dataclass(kw_only=True, slots=True)
class ViTConfig:
    """Shape and variant switches of a ViT tower (CLIP, SigLIP, InternViT)."""

    hidden_size: int
    """Width of the tokens."""
    intermediate_size: int
    """Hidden width of the MLP."""
    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads (head dim = hidden_size / num_heads)."""
    image_size: int = 224
    """Side of the square images the position table was trained for."""
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    """"quick_gelu" (CLIP), "gelu_pytorch_tanh" (SigLIP), "gelu" (InternViT)."""
    norm_type: str = "layer_norm"
    """Norm inside the blocks: "layer_norm", or "rms_norm" (InternViT-6B). Pre/post norms are LayerNorm."""
    norm_eps: float = 1e-6
    """CLIP uses 1e-5, SigLIP and InternViT 1e-6."""
    class_token: bool = False
    """Prepend a learned class token (CLIP, InternViT)."""
    patch_bias: bool = True
    """Bias in the patch convolution (False for CLIP)."""
    pre_norm: bool = False
    """LayerNorm after the embeddings, CLIP's ``pre_layrnorm``."""
    post_norm: bool = True
    """Has a final LayerNorm (``post_layernorm``; InternViT's ``layernorm`` when not mean-pooling)."""
    qkv_bias: bool = True
    """Bias in q/k/v projections (False for InternViT)."""
    qk_norm: bool = False
    """RMSNorm over the full q and k widths (InternViT-6B)."""
    layer_scale: float | None = None
    """Initial value of per-channel layer scale ``ls1``/``ls2`` (InternViT); None: no layer scale."""
    pool_head: bool = False
    """SigLIP's multi-head attention pooling head (``head.*``); only ``pooled()`` uses it."""
    feature_layer: int = -1
    """Which hidden state ``forward`` returns, indexed like transformers' ``hidden_states``:
    0 is the embedding output, i is block i's output, -1 the last block, -2 the one before (LLaVA)."""
    feature_post_norm: bool = False
    """Apply the final norm to the returned features (SigLIP's ``last_hidden_state``, Idefics3)."""
    drop_cls: bool = True
    """Drop the class token from the returned features (LLaVA's "default" select strategy, InternVL)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig: hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            raise ValueError(f"ViTConfig: feature_layer={self.feature_layer} out of range for {self.num_layers} layers")
        if self.feature_post_norm and not self.post_norm:
            raise ValueError("ViTConfig: feature_post_norm=True needs post_norm=True")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"ViTConfig: norm_type={self.norm_type!r} must be 'layer_norm' or 'rms_norm'")
        activation(self.hidden_act)

    @property
    def grid(self) -> int:
        """Patches per side at ``image_size`` (leftover pixels are dropped, e.g. SigLIP 384 / 14 -> 27)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + int(self.class_token)

    @property
    def num_blocks_run(self) -> int:
        """Blocks ``forward`` has to run to reach ``feature_layer``."""
        return self.feature_layer % (self.num_layers + 1)

    def num_feature_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Tokens per image that ``forward`` returns for an image of ``height`` x ``width`` pixels."""
        height = height or self.image_size
        width = width or self.image_size
        cls = int(self.class_token and not self.drop_cls)
        return (height // self.patch_size) * (width // self.patch_size) + cls


def _norm(config: ViTConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class ViTAttention(nn.Module):
    """Multi-head self-attention over one image's tokens (separate q/k/v like transformers)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.q = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.k = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.v = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # transformers' InternVLVisionRMSNorm keeps its own default eps of 1e-6
        self.q_norm = nn.RMSNorm(dim, eps=1e-6) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(dim, eps=1e-6) if config.qk_norm else None

    def forward(self, x: Tensor) -> Tensor:
        n, s, d = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(n, s, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, s, d))


class ViTMLP(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm block: ``x + ls1 * attn(norm1(x))``, then ``x + ls2 * mlp(norm2(x))``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = ViTAttention(config)
        self.norm2 = _norm(config)
        self.mlp = ViTMLP(config)
        self.layer_scale = config.layer_scale
        if config.layer_scale is not None:
            self.ls1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale)))
            self.ls2 = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale)))
        else:
            self.ls1 = self.ls2 = None

    def reset_parameters(self) -> None:
        """Layer scale back to its initial value (the sub-modules reset themselves)."""
        if self.ls1 is not None:
            nn.init.constant_(self.ls1, self.layer_scale)
            nn.init.constant_(self.ls2, self.layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attn(self.norm1(x))
        x = x + (h if self.ls1 is None else self.ls1 * h)
        h = self.mlp(self.norm2(x))
        return x + (h if self.ls2 is None else self.ls2 * h)


class _MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that re-initialises through the public ``reset_parameters`` (meta-device builds)."""

    def reset_parameters(self) -> None:
        self._reset_parameters()


class AttentionPoolingHead(nn.Module):
    """SigLIP's pooling head: a learned probe attends to all tokens, then a residual MLP."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.attention = _MultiheadAttention(config.hidden_size, config.num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = ViTMLP(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.probe)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class VisionTransformer(nn.Module):
    """A ViT tower; ``forward(pixel_values [N, C, H, W]) -> features [N, tokens, hidden_size]``.

    ``forward`` stops after the block that produces ``config.feature_layer``; later blocks (e.g. LLaVA's
    last layer) are kept so checkpoints load and save strictly, but get no gradient.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = nn.Conv2d(
            config.num_channels, dim, config.patch_size, stride=config.patch_size, bias=config.patch_bias
        )
        self.cls_token = nn.Parameter(torch.zeros(dim)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(config.num_positions, dim))
        # transformers uses LayerNorm for these two whatever the blocks' norm_type
        self.pre_norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.pre_norm else None
        self.blocks = nn.ModuleList(ViTBlock(config) for _ in range(config.num_layers))
        self.post_norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.post_norm else None
        self.head = AttentionPoolingHead(config) if config.pool_head else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the embeddings; every sub-module with weights has its own ``reset_parameters``, so a meta-device
        build materialises fully (``to_empty`` + ``reset_parameters`` on each module, as Lightning does)."""
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def _positions(self, grid_h: int, grid_w: int) -> Tensor:
        """Position table for a ``grid_h`` x ``grid_w`` patch grid, bicubically resized when it differs."""
        pos = self.pos_embed
        if (grid_h, grid_w) == (self.config.grid, self.config.grid):
            return pos
        cls_pos, patch_pos = pos[: int(self.config.class_token)], pos[int(self.config.class_token) :]
        g, dim = self.config.grid, pos.shape[-1]
        patch_pos = patch_pos.reshape(1, g, g, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, dim)])

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Patch + class tokens + positions (+ pre-norm): hidden state 0, ``[N, S, D]``."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"VisionTransformer: pixel_values must be [N, {self.config.num_channels}, H, W], "
                f"got {tuple(pixel_values.shape)}"
            )
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        grid_h, grid_w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self._positions(grid_h, grid_w).to(x.dtype)
        return x if self.pre_norm is None else self.pre_norm(x)

    def hidden_state(self, pixel_values: Tensor, layer: int) -> Tensor:
        """Hidden state ``layer`` (transformers' ``hidden_states[layer]``), CLS included, no post-norm."""
        x = self.embed(pixel_values)
        for block in self.blocks[: layer % (self.config.num_layers + 1)]:
            x = block(x)
        return x

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Features of the configured layer: ``[N, config.num_feature_tokens(H, W), hidden_size]``."""
        x = self.hidden_state(pixel_values, self.config.feature_layer)
        if self.config.feature_post_norm:
            x = self.post_norm(x)
        if self.cls_token is not None and self.config.drop_cls:
            x = x[:, 1:]
        return x

    def pooled(self, pixel_values: Tensor) -> Tensor:
        """One vector per image: SigLIP's attention-pooling head, or the post-normed class token (CLIP)."""
        x = self.hidden_state(pixel_values, -1)
        if self.head is not None:
            return self.head(self.post_norm(x))
        if self.cls_token is None or self.post_norm is None:
            raise ValueError("VisionTransformer.pooled needs pool_head=True, or class_token and post_norm")
        return self.post_norm(x[:, 0])


# ---- transformers weight names -------------------------------------------------------------------

# (transformers name, our name) per style; "{i}" is a block index.
_CLIP_NAMES = [
    ("embeddings.patch_embedding", "patch_embed"),
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("pre_layrnorm", "pre_norm"),
    ("post_layernorm", "post_norm"),
    ("head", "head"),
    ("encoder.layers.{i}.layer_norm1", "blocks.{i}.norm1"),
    ("encoder.layers.{i}.layer_norm2", "blocks.{i}.norm2"),
    ("encoder.layers.{i}.self_attn.q_proj", "blocks.{i}.attn.q"),
    ("encoder.layers.{i}.self_attn.k_proj", "blocks.{i}.attn.k"),
    ("encoder.layers.{i}.self_attn.v_proj", "blocks.{i}.attn.v"),
    ("encoder.layers.{i}.self_attn.out_proj", "blocks.{i}.attn.proj"),
    ("encoder.layers.{i}.mlp", "blocks.{i}.mlp"),
]
_INTERNVL_NAMES = [
    ("embeddings.patch_embeddings.projection", "patch_embed"),
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("layernorm", "post_norm"),
    ("encoder.layer.{i}.layernorm_before", "blocks.{i}.norm1"),
    ("encoder.layer.{i}.layernorm_after", "blocks.{i}.norm2"),
    ("encoder.layer.{i}.attention.q_proj", "blocks.{i}.attn.q"),
    ("encoder.layer.{i}.attention.k_proj", "blocks.{i}.attn.k"),
    ("encoder.layer.{i}.attention.v_proj", "blocks.{i}.attn.v"),
    ("encoder.layer.{i}.attention.q_norm", "blocks.{i}.attn.q_norm"),
    ("encoder.layer.{i}.attention.k_norm", "blocks.{i}.attn.k_norm"),
    ("encoder.layer.{i}.attention.projection_layer", "blocks.{i}.attn.proj"),
    ("encoder.layer.{i}.mlp", "blocks.{i}.mlp"),
    ("encoder.layer.{i}.lambda_1", "blocks.{i}.ls1"),
    ("encoder.layer.{i}.lambda_2", "blocks.{i}.ls2"),
]


def _hf_style(config: ViTConfig) -> str:
    """InternViT (the only family with layer scale) uses InternVLVisionModel's names; the rest CLIP's."""
    return "internvl" if config.layer_scale is not None else "clip"


def name_rules(pairs: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern, str]]:
    """Regex rules renaming transformers names to ours (or back when ``reverse``); "{i}" matches a block index."""
    rules = []
    for hf, ours in pairs:
        src, dst = (ours, hf) if reverse else (hf, ours)
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)")
        rules.append((re.compile(rf"^{pattern}(?P<rest>$|\..*)"), dst))
    return rules


def rename_key(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    """``key`` renamed by the first matching rule (its sub-module path kept), or None."""
    for pattern, dst in rules:
        match = pattern.match(key)
        if match:
            groups = match.groupdict()
            return dst.replace("{i}", groups.get("i") or "") + groups["rest"]
    return None


def meta_shapes(module_cls: type[nn.Module], config: object) -> dict[str, torch.Size]:
    """Weight names and shapes of ``module_cls(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in module_cls(config).state_dict().items()}


def _format(keys: list[str], limit: int = 12) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def map_strict(
    state_dict: Mapping[str, Tensor],
    prefix: str,
    rules: list[tuple[re.Pattern, str]],
    expected: dict[str, torch.Size],
    what: str,
) -> dict[str, Tensor]:
    """Rename every ``prefix``-ed key of ``state_dict`` by ``rules`` into the ``expected`` names.

    Tensors are reshaped to the expected shape when only singleton dims differ (transformers' ``[1, 1, D]``
    class token vs our ``[D]``). Raises KeyError listing unused and missing keys, ValueError on bad shapes.
    """
    out: dict[str, Tensor] = {}
    unused = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = rename_key(key[len(prefix) :], rules)
        if name is None or name not in expected:
            unused.append(key)
            continue
        if name in out:
            raise KeyError(f"{what}: two keys under {prefix!r} map to {name}; the last is {key}")
        want = expected[name]
        if value.shape != want:
            if value.numel() != want.numel() or [d for d in value.shape if d != 1] != [d for d in want if d != 1]:
                raise ValueError(f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(want)} for {name}")
            value = value.reshape(want)
        out[name] = value
    missing = sorted(set(expected) - set(out))
    if unused or missing:
        raise KeyError(
            f"{what} (prefix {prefix!r}): {len(unused)} unused keys [{_format(sorted(unused))}]; "
            f"{len(missing)} missing weights [{_format(missing)}]"
        )
    return out


def hf_to_ours_vit(state_dict: Mapping[str, Tensor], prefix: str, config: ViTConfig) -> dict[str, Tensor]:
    """Map a transformers vision tower's weights under ``prefix`` to ``VisionTransformer(config)`` names.

    Accepts both layouts: ``{prefix}vision_model.*`` (Hub LLaVA / LLaVA-OneVision / PaliGemma) and ``{prefix}*``
    (transformers 5.x ``save_pretrained``, InternVL, Idefics3's ``model.vision_model.``). Strict: every key under
    the prefix must be used and every weight found (KeyError lists both). Keys outside the prefix are ignored.
    """
    nested = prefix + "vision_model."
    if any(k.startswith(nested) for k in state_dict):
        flat = [k for k in state_dict if k.startswith(prefix) and not k.startswith(nested)]
        if flat:
            raise KeyError(f"vision tower: both {nested!r} and other {prefix!r} keys present: {_format(flat)}")
        prefix = nested
    names = _INTERNVL_NAMES if _hf_style(config) == "internvl" else _CLIP_NAMES
    expected = meta_shapes(VisionTransformer, config)
    return map_strict(state_dict, prefix, name_rules(names, reverse=False), expected, "vision tower")


def ours_to_hf_vit(state_dict: Mapping[str, Tensor], prefix: str, config: ViTConfig) -> dict[str, Tensor]:
    """Inverse of ``hf_to_ours_vit``: our names to transformers 5.x names under ``prefix`` (e.g. "vision_tower.")."""
    style = _hf_style(config)
    names = _INTERNVL_NAMES if style == "internvl" else _CLIP_NAMES
    rules = name_rules(names, reverse=True)
    out = {}
    for key, value in state_dict.items():
        name = rename_key(key, rules)
        if name is None:
            raise KeyError(f"vision tower: no transformers name for our weight {key!r}")
        if style == "internvl" and name in ("embeddings.cls_token", "embeddings.position_embeddings"):
            value = value.reshape(1, -1, value.shape[-1])
        out[prefix + name] = value
    return out


# ---- config.json -> ViTConfig ------------------------------------------------------------------

# transformers' defaults for keys that Hub config.json files often leave out, per vision ``model_type``.
_VISION_DEFAULTS: dict[str, dict] = {
    "clip_vision_model": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "image_size": 224, "patch_size": 32},
    "siglip_vision_model": {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "image_size": 224, "patch_size": 16},
    "idefics3_vision": {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "image_size": 224, "patch_size": 32},
    "internvl_vision": {
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": 448, "patch_size": 14, "attention_bias": False,
        "use_qk_norm": False, "norm_type": "layer_norm", "layer_scale_init_value": 0.1, "use_mean_pooling": True,
    },
}
_VISION_DEFAULTS["smolvlm_vision"] = _VISION_DEFAULTS["idefics3_vision"]
_FAMILY_VISION = {
    "llava": "clip_vision_model",
    "llava_onevision": "siglip_vision_model",
    "paligemma": "siglip_vision_model",
    "pi0": "siglip_vision_model",
    "idefics3": "idefics3_vision",
    "smolvlm": "smolvlm_vision",
    "internvl": "internvl_vision",
}


def vlm_config(config: Mapping) -> Mapping:
    """The PaliGemma-style VLM part of a transformers config.json (pi0 nests it under ``vlm_config``)."""
    return config["vlm_config"] if config.get("model_type") == "pi0" else config


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def vit_config_from_hf(config: Mapping) -> ViTConfig:
    """``ViTConfig`` for the vision tower of a transformers VLM ``config.json`` (as a dict), with the feature layer,
    class-token and post-norm choices the family's ``get_image_features`` makes.

    Families (``model_type``): llava, llava_onevision, paligemma, pi0, idefics3, smolvlm, internvl.
    Raises ValueError naming the field for an unknown family or a missing shape.
    """
    family = config.get("model_type")
    if family not in _FAMILY_VISION:
        raise ValueError(f"vit_config_from_hf: model_type={family!r} has no ViT tower; known: {sorted(_FAMILY_VISION)}")
    vision = vlm_config(config).get("vision_config") or {}
    kind = vision.get("model_type", _FAMILY_VISION[family])
    if kind not in _VISION_DEFAULTS:
        raise ValueError(f"vit_config_from_hf: vision_config.model_type={kind!r} is not a ViT we build")
    v = {**_VISION_DEFAULTS[kind], **vision}
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in v]
    if missing:
        raise ValueError(f"vit_config_from_hf: vision_config lacks {missing}")
    layer = config.get("vision_feature_layer", -2 if family == "llava" else -1)
    if not isinstance(layer, int):
        raise ValueError(f"vit_config_from_hf: vision_feature_layer={layer!r}: only a single layer is supported")
    shape = dict(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], image_size=_first(v["image_size"]), patch_size=_first(v["patch_size"]),
        num_channels=v.get("num_channels", 3), hidden_act=v["hidden_act"], norm_eps=v["layer_norm_eps"],
        feature_layer=layer,
    )
    if family == "llava":
        drop = config.get("vision_feature_select_strategy", "default") == "default"
        return ViTConfig(**shape, class_token=True, patch_bias=False, pre_norm=True, drop_cls=drop)
    if family == "internvl":
        post_norm = not v["use_mean_pooling"]
        return ViTConfig(
            **shape, class_token=True, qkv_bias=v["attention_bias"], qk_norm=v["use_qk_norm"],
            norm_type=v["norm_type"], layer_scale=v["layer_scale_init_value"], post_norm=post_norm,
            feature_post_norm=post_norm and layer == -1,
            drop_cls=config.get("vision_feature_select_strategy", "default") == "default",
        )
    # SigLIP family: LLaVA-OneVision takes hidden_states[layer] (before post_layernorm); PaliGemma, pi0, Idefics3
    # and SmolVLM take last_hidden_state (after it). The pooling head is never used by a VLM: absent unless asked.
    return ViTConfig(
        **shape, feature_post_norm=family != "llava_onevision", pool_head=bool(v.get("vision_use_head", False))
    )

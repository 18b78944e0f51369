"""Absolute-position ViTs (CLIP, SigLIP, InternViT) and their projectors on packed rows.

The data pipeline gives every family the same Qwen2-VL-style patches (`[P, C*tp*p*p]`, merge-window order, plus
`grid_thw`). `PackedViT` folds each image (each frame) back into `[C, H, W]`, runs the fixed-size ViT on images of
equal size together, and returns all features back to back `[sum tokens, hidden]` (raster order per image).
`PackedProjector` splits them per image again for pixel shuffle. With `spatial_merge_size = m` (the projector's
pixel-shuffle factor, 1 without) an `h x w` patch grid gives `h * w / m^2` LLM tokens, as the encoder counts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_loneforge.model_zoo.config import ModelConfig
from lightning_loneforge.model_zoo.towers.projectors import Projector, projector_config_from_hf
from lightning_loneforge.model_zoo.towers.projectors import ProjectorConfig as ShuffleProjectorConfig
from lightning_loneforge.model_zoo.towers.vit import VisionTransformer, ViTConfig, vit_config_from_hf

_HF_VISION_TYPE = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "intern_vit": "internvl_vision",
                   "idefics3": "idefics3_vision"}  # fmt: skip
_HF_FAMILY = {"llava": "llava", "llava_onevision": "llava_onevision", "paligemma": "paligemma", "pi0": "paligemma",
              "idefics3": "idefics3", "internvl": "internvl"}  # fmt: skip


def vit_config(config: ModelConfig) -> ViTConfig:
    """The `ViTConfig` of a row, with the feature-layer / class-token / post-norm choices of its family."""
    if config.hf_config is not None:
        return vit_config_from_hf(config.hf_config)
    v = config.vision
    if config.family not in _HF_FAMILY:
        raise ValueError(f"model {config.name!r}: family {config.family!r} has no absolute-position ViT")
    vision: dict[str, Any] = {
        "model_type": _HF_VISION_TYPE[v.kind], "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
        "patch_size": v.patch_size, **v.extra,
    }  # fmt: skip
    hf = {"model_type": _HF_FAMILY[config.family], "vision_config": vision, "vision_feature_layer": v.feature_layer}
    return vit_config_from_hf(hf)


def shuffle_projector_config(config: ModelConfig) -> ShuffleProjectorConfig:
    if config.hf_config is not None:
        return projector_config_from_hf(config.hf_config)
    p = config.projector
    kinds = {
        "mlp": dict(kind="mlp", hidden_act=p.act, bias=p.bias),
        "linear": dict(kind="linear", bias=p.bias),
        "pixel_shuffle_mlp": dict(kind="mlp", hidden_act=p.act, bias=p.bias, pixel_shuffle=p.merge_size, norm=True),
        "pixel_shuffle_linear": dict(kind="linear", bias=p.bias, pixel_shuffle=p.merge_size),
    }
    if p.kind not in kinds:
        raise ValueError(f"model {config.name!r}: projector kind {p.kind!r} not one of {sorted(kinds)}")
    return ShuffleProjectorConfig(in_dim=p.in_dim, out_dim=p.out_dim, **kinds[p.kind])


def unpatchify(pixel_values: Tensor, grid_thw: Tensor, *, channels: int, temporal: int, patch: int, merge: int):
    """Inverse of the encoder's patching: a list of `[frames, C, H, W]` per image/video, in order."""
    images, start = [], 0
    for t, h, w in grid_thw.tolist():
        n = t * h * w
        x = pixel_values[start : start + n].reshape(t, h // merge, w // merge, merge, merge, channels, temporal, patch, patch)
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * temporal, channels, h * patch, w * patch)
        images.append(x)
        start += n
    if start != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw covers {start}")
    return images


class PackedViT(VisionTransformer):
    """`VisionTransformer` (same weights and names) taking packed patches: `forward(pixel_values, grid_thw)`."""

    def __init__(self, config: ViTConfig, *, temporal_patch_size: int = 1, merge_size: int = 1) -> None:
        super().__init__(config)
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:  # type: ignore[override]
        images = unpatchify(
            pixel_values, grid_thw, channels=self.config.num_channels, temporal=self.temporal_patch_size,
            patch=self.config.patch_size, merge=self.merge_size,
        )  # fmt: skip
        frames = [frame for image in images for frame in image]
        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, frame in enumerate(frames):
            by_shape.setdefault(tuple(frame.shape[1:]), []).append(index)
        features: list[Tensor | None] = [None] * len(frames)
        for indices in by_shape.values():
            out = VisionTransformer.forward(self, torch.stack([frames[i] for i in indices]))
            for i, feature in zip(indices, out, strict=True):
                features[i] = feature
        return torch.cat(features)


class PackedProjector(Projector):
    """`Projector` over back-to-back features of several images: `forward(features, grid_thw)`."""

    def __init__(self, config: ShuffleProjectorConfig, *, temporal_patch_size: int = 1, image_newline: bool = False):
        super().__init__(config)
        self.temporal_patch_size = temporal_patch_size
        self.image_newline = nn.Parameter(torch.zeros(config.out_dim)) if image_newline else None
        """LLaVA-OneVision's row-end embedding: loaded and saved, but any-resolution tiling (which places it) is
        not implemented, so it takes part in no computation."""

    def forward(self, features: Tensor, grid_thw: Tensor) -> Tensor:  # type: ignore[override]
        outs, start = [], 0
        for t, h, w in grid_thw.tolist():
            for _ in range(t * self.temporal_patch_size):
                out = Projector.forward(self, features[start : start + h * w][None], (h, w))
                outs.append(out[0])
                start += h * w
        return torch.cat(outs)

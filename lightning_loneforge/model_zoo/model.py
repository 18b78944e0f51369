"""`MultimodalModel`: towers assembled from a `ModelConfig`, run over one packed row."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_loneforge.model_zoo.config import ModelConfig
from lightning_loneforge.model_zoo.towers.decoder import Decoder, LMOutput
from lightning_loneforge.model_zoo.towers.qwen_vision import PatchMerger, QwenVisionTower


def _qwen_vision(config: ModelConfig) -> nn.Module:
    return QwenVisionTower(config.vision)


def _packed_vit(config: ModelConfig) -> nn.Module:
    from lightning_loneforge.model_zoo.towers.packed_vit import PackedViT, vit_config

    v = config.vision
    return PackedViT(vit_config(config), temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)


def _patch_merger(config: ModelConfig) -> nn.Module:
    return PatchMerger(config.projector)


def _packed_projector(config: ModelConfig) -> nn.Module:
    from lightning_loneforge.model_zoo.towers.packed_vit import PackedProjector, shuffle_projector_config

    return PackedProjector(
        shuffle_projector_config(config), temporal_patch_size=config.vision.temporal_patch_size,
        image_newline=config.family == "llava_onevision",
    )  # fmt: skip


VISION_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "qwen2_vl": _qwen_vision, "qwen2_5_vl": _qwen_vision,
    "clip": _packed_vit, "siglip": _packed_vit, "intern_vit": _packed_vit, "idefics3": _packed_vit,
}  # fmt: skip
"""Vision tower builder per `VisionConfig.kind`."""
PROJECTOR_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "patch_merger": _patch_merger, "mlp": _packed_projector, "linear": _packed_projector,
    "pixel_shuffle_mlp": _packed_projector, "pixel_shuffle_linear": _packed_projector,
}  # fmt: skip
"""Projector builder per `ProjectorConfig.kind`."""
def _flow_matching_expert(config: ModelConfig) -> nn.Module:
    from lightning_loneforge.model_zoo.towers.action import ActionExpertConfig, FlowMatchingActionExpert

    a, e = config.action, config.action.expert
    return FlowMatchingActionExpert(ActionExpertConfig(
        action_dim=a.action_dim, state_dim=a.proprio_dim, horizon=a.horizon, hidden_size=e.hidden_size,
        intermediate_size=e.intermediate_size, num_layers=e.num_layers, num_heads=e.num_heads,
        num_kv_heads=e.num_kv_heads, head_dim=e.resolved_head_dim, norm_eps=e.norm_eps, rope_theta=e.rope_theta,
        prefix_dim=config.text.hidden_size, **a.extra,
    ))  # fmt: skip


ACTION_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {"pi0": _flow_matching_expert}
"""Action head per family (rows with an `ActionConfig`): pi0's flow-matching expert over the VLM's last hidden
states (the expert's `prefix_proj` + per-layer k/v read them; pi0 itself reads per-layer VLM keys/values)."""


def tower_support(config: ModelConfig) -> str | None:
    """None when every tower of `config` can be built, else which tower kind is not wired yet."""
    if config.vision is not None and config.vision.kind not in VISION_BUILDERS:
        return f"vision kind {config.vision.kind!r} not wired yet"
    if config.projector is not None and config.projector.kind not in PROJECTOR_BUILDERS:
        return f"projector kind {config.projector.kind!r} not wired yet"
    if config.action is not None and config.family not in ACTION_BUILDERS:
        return f"action head for {config.family!r} not wired yet"
    return None


class MultimodalModel(nn.Module):
    """Vision tower -> projector -> image features scattered into the LLM's embeddings -> decoder.

    `forward(input_ids, position_ids, cu_seqlens, max_seqlen, pixel_values, image_grid_thw, targets=...)` returns
    an `LMOutput` (hidden states, and the chunked loss when targets are given).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        unsupported = tower_support(config)
        if unsupported:
            raise NotImplementedError(f"model {config.name!r}: {unsupported}")
        self.vision = VISION_BUILDERS[config.vision.kind](config) if config.vision else None
        self.projector = PROJECTOR_BUILDERS[config.projector.kind](config) if config.projector else None
        self.llm = Decoder(config.text)
        self.action = ACTION_BUILDERS[config.family](config) if config.action else None

    def towers(self) -> dict[str, nn.Module]:
        named = {"vision": self.vision, "projector": self.projector, "llm": self.llm, "action": self.action}
        return {name: tower for name, tower in named.items() if tower is not None}

    def vision_token_mask(self, input_ids: Tensor) -> Tensor:
        """True at image/video placeholder tokens (features go there in order)."""
        mask = input_ids == self.config.image_token_id
        if self.config.video_token_id is not None:
            mask |= input_ids == self.config.video_token_id
        return mask

    def image_features(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """Projected features `[N_vision_tokens, llm_hidden]` of all images/videos of the row, in order."""
        if self.vision is None or self.projector is None:
            raise ValueError(f"model {self.config.name!r} has no vision tower but the batch has pixel_values")
        return self.projector(self.vision(pixel_values, image_grid_thw), image_grid_thw)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        *,
        targets: Tensor | None = None,
        predict: bool = False,
        loss_chunk_size: int = 4096,
        actions: Tensor | None = None,
        proprio: Tensor | None = None,
        action_sample_index: Tensor | None = None,
    ) -> LMOutput:
        """Vision -> projector -> decoder over one packed row; see `Decoder.forward` for `targets`/`predict`.

        With an action head and `actions` `[A, horizon, action_dim]` (+ `proprio` `[A, state_dim]`, and
        `action_sample_index` `[A]` naming each chunk's sample), `LMOutput.action_loss` is the flow-matching loss.
        """
        features = mask = unused = None
        if pixel_values is None and self.vision is not None and self.projector is not None:
            unused = self._placeholder_image_features(input_ids.device)
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("batch has pixel_values but no image_grid_thw")
            features = self.image_features(pixel_values, image_grid_thw)
            mask = self.vision_token_mask(input_ids)
            count = int(mask.sum())
            if count != features.shape[0]:
                raise ValueError(
                    f"{count} image/video tokens (ids {self.config.image_token_id}, {self.config.video_token_id}) "
                    f"in input_ids but the vision tower gave {features.shape[0]} features for image_grid_thw "
                    f"{image_grid_thw.tolist()}"
                )
        out = self.llm(
            input_ids, position_ids, cu_seqlens, max_seqlen, vision_embeds=features, vision_mask=mask,
            targets=targets, predict=predict, loss_chunk_size=loss_chunk_size,
        )  # fmt: skip
        if unused is not None and out.loss is not None:
            out.loss = out.loss + 0.0 * unused.sum()
        if actions is not None:
            out.action_loss = self.action_loss(out.hidden, cu_seqlens, actions, proprio, action_sample_index)
        return out

    def _placeholder_image_features(self, device: torch.device) -> Tensor:
        """Features of one smallest all-zero image, for rows without images.

        Under a sharded or replicated plan every rank must run the same collectives: a rank whose row has no
        image still all-gathers the vision tower's shards in forward and reduces its (zero) gradients in backward.
        """
        vision = self.config.vision
        side = vision.image_size // vision.patch_size if vision.image_size else vision.spatial_merge_size
        grid = torch.tensor([[1, side, side]], device=device)
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.zeros(side * side, patch_dim, device=device)
        return self.image_features(pixels, grid)

    def action_loss(
        self, hidden: Tensor, cu_seqlens: Tensor, actions: Tensor, proprio: Tensor | None, sample_index: Tensor | None
    ) -> Tensor:
        """Flow-matching loss of the action head, each chunk conditioned on its own sample's hidden states."""
        from lightning_loneforge.model_zoo.towers.action import pad_packed

        if self.action is None:
            raise ValueError(f"model {self.config.name!r} has no action head but the batch has actions")
        if proprio is None or sample_index is None:
            raise ValueError("batch has actions but no proprio / action_sample_index")
        padded, mask = pad_packed(hidden, cu_seqlens)
        prefix = self.action.encode_prefix(hidden=padded[sample_index], mask=mask[sample_index])
        return self.action.loss(actions.to(hidden.dtype), proprio.to(hidden.dtype), prefix)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_on_meta(config: ModelConfig) -> MultimodalModel:
    """The model with parameters on the meta device (no memory)."""
    with torch.device("meta"):
        return MultimodalModel(config)

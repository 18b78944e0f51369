"""`MultimodalModule`: any zoo row as a LightningModule that trains on `PackedBatch` rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_loneforge.datamodules.batch import IGNORE_INDEX, PackedBatch
from lightning_loneforge.model_zoo.config import ModelConfig
from lightning_loneforge.model_zoo.flops import batch_flops, matmul_params
from lightning_loneforge.model_zoo.hf_io import (
    config_from_hf,
    hf_to_ours,
    load_hf_weights,
    read_hf_config,
    read_safetensors,
)
from lightning_loneforge.model_zoo.loss import shift_labels
from lightning_loneforge.model_zoo.model import MultimodalModel
from lightning_loneforge.model_zoo.tokenizers import load_tokenizer


class MultimodalModule(LightningModule):
    """A zoo row (`model`) trained with AdamW + warm-up/cosine on packed rows.

    Args:
        model: Row name in `name_to_config` (see `loneforge models`).
        tokenizer: A tokenizer object (`encode`, `decode`, `vocab_size`), or a local folder with `tokenizer.json`
            (HF `tokenizers`) or `vocab.json` (`WordTokenizer`). None: the checkpoint folder's tokenizer, or
            `DemoTokenizer` for `tiny-demo`.
        overrides: Field overrides of the row (`{"text": {"num_layers": 2}}`).
        checkpoint: Local HF folder (`config.json` + `*.safetensors`): the config comes from it (then `model`
            only names the run) and its weights are loaded strictly in `configure_model`.
        lr, vision_lr: Peak learning rates of all towers / of the vision tower (None: `lr`).
        weight_decay: AdamW decay on matrices (norms, biases and other 1-D parameters get none).
        warmup_steps, max_steps, min_lr_ratio: Linear warm-up, then cosine decay to `min_lr_ratio * lr`.
        freeze: Towers to freeze (`vision`, `projector`, `llm`, `action`).
        loss_chunk_size: Rows per chunk of the chunked cross-entropy.
        min_pixels, max_pixels: Image area bounds for the `SampleEncoder`.
        system_prompt: Optional system turn the `SampleEncoder` puts before every conversation.
    """

    def __init__(
        self,
        model: str = "tiny-demo",
        tokenizer: object | str | None = None,
        *,
        overrides: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        lr: float = 3e-4,
        vision_lr: float | None = None,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: int = 10_000,
        min_lr_ratio: float = 0.1,
        freeze: list[str] | None = None,
        loss_chunk_size: int = 4096,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str | None) else ["tokenizer"])
        if checkpoint is not None:
            config = config_from_hf(read_hf_config(checkpoint), name=model)
            config = config.replace(**overrides) if overrides else config
        else:
            config = ModelConfig.from_name(model, **(overrides or {}))
        self.tokenizer = _resolve_tokenizer(tokenizer, model, checkpoint)
        self.config = _with_tokenizer_ids(config, self.tokenizer)
        self.freeze = list(freeze or [])
        self.model: MultimodalModel | None = None
        self.val_answer_acc = MeanMetric()
        self.val_loss = MeanMetric()

    # ------------------------------------------------------------------ model
    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = MultimodalModel(self.config)
        unknown = sorted(set(self.freeze) - set(self.model.towers()))
        if unknown:
            raise ValueError(f"freeze: unknown tower(s) {unknown}; towers are {sorted(self.model.towers())}")
        for name in self.freeze:
            self.model.towers()[name].requires_grad_(False)
        on_meta = any(p.is_meta for p in self.model.parameters())
        self.checkpoint_pending = self.hparams.checkpoint is not None and on_meta
        if self.hparams.checkpoint is not None and not on_meta:
            load_hf_weights(self.model, self.hparams.checkpoint, self.config.family)

    def pretrained_state_dict(self) -> dict[str, Tensor]:
        """The `checkpoint=` folder's weights as a full (unsharded, CPU) state dict under this module's names.

        For strategies that build the model on the meta device and shard it: load this with
        `set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True))`, then set
        `module.checkpoint_pending = False`.
        """
        if self.hparams.checkpoint is None:
            raise ValueError("pretrained_state_dict: no checkpoint= was given")
        with torch.device("meta"):
            shapes = MultimodalModel(self.config)
        state = hf_to_ours(read_safetensors(self.hparams.checkpoint), shapes, self.config.family)
        return {f"model.{key}": value for key, value in state.items()}

    @override
    def on_fit_start(self) -> None:
        if getattr(self, "checkpoint_pending", False):
            raise RuntimeError(
                f"checkpoint={self.hparams.checkpoint!r} was not loaded: the model was built on the meta device "
                "(sharding strategy) and the strategy did not load module.pretrained_state_dict()"
            )

    def towers(self) -> dict[str, nn.Module]:
        """The model's towers (`vision`, `projector`, `llm`, `action`), building the model if needed."""
        self.configure_model()
        return self.model.towers()

    def sample_encoder(self):
        """The `SampleEncoder` matching this model's vision patching, M-RoPE and tokenizer."""
        from lightning_loneforge.datamodules.encoder import SampleEncoder

        if self.tokenizer is None:
            raise ValueError(
                f"model {self.config.name!r} has no tokenizer: pass tokenizer= (folder with tokenizer.json, "
                "or an object such as lightning_loneforge.datamodules.tokenizer.DemoTokenizer)"
            )
        vision = self.config.vision
        patching = {}
        if vision is not None:
            patching = dict(
                patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                merge_size=vision.spatial_merge_size,
            )  # fmt: skip
            if vision.kind in _IMAGE_NORMALIZATION:
                patching["image_mean"], patching["image_std"] = _IMAGE_NORMALIZATION[vision.kind]
        return SampleEncoder(
            self.tokenizer, **patching, min_pixels=self.hparams.min_pixels, max_pixels=self.hparams.max_pixels,
            mrope=self.config.text.mrope_section is not None, system_prompt=self.hparams.system_prompt,
        )  # fmt: skip

    # ------------------------------------------------------------------ steps
    def forward(self, batch: PackedBatch, *, predict: bool = False):
        self.configure_model()
        targets = shift_labels(batch.labels, batch.cu_seqlens)
        return self.model(
            batch.input_ids, batch.position_ids, batch.cu_seqlens, int(batch.max_seqlen), batch.pixel_values,
            batch.image_grid_thw, targets=targets, predict=predict, loss_chunk_size=self.hparams.loss_chunk_size,
            actions=batch.actions, proprio=batch.proprio, action_sample_index=batch.action_sample_index,
        ), targets  # fmt: skip

    @override
    def training_step(self, batch: PackedBatch, batch_idx: int) -> Tensor:
        out, _ = self(batch)
        loss = out.loss
        if out.action_loss is not None:
            self.log("train/action_loss", out.action_loss, batch_size=1)
            self.log("train/text_loss", out.loss, batch_size=1)
            loss = loss + out.action_loss
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        self.log("train/label_tokens", float(out.num_targets), batch_size=1, reduce_fx="sum")
        return loss

    @override
    def validation_step(self, batch: PackedBatch, batch_idx: int) -> None:
        out, targets = self(batch, predict=True)
        if out.num_targets:
            self.val_loss.update(out.loss.detach(), weight=out.num_targets)
        if out.action_loss is not None:
            self.log("val/action_loss", out.action_loss, batch_size=1)
        correct = answer_exact_match(out.predictions, targets, batch.cu_seqlens)
        if correct.numel():
            self.val_answer_acc.update(correct)
        self.log("val/loss", self.val_loss, batch_size=1, prog_bar=True)
        self.log("val/answer_acc", self.val_answer_acc, batch_size=1, prog_bar=True)

    # ------------------------------------------------------------------ optimisation
    @override
    def configure_optimizers(self):
        self.configure_model()
        groups = param_groups(self.model, self.hparams.lr, self.hparams.vision_lr, self.hparams.weight_decay)
        fused = all(p.is_cuda for group in groups for p in group["params"])
        kind = {"fused": True} if fused else {"foreach": True}
        optimizer = torch.optim.AdamW(groups, betas=tuple(self.hparams.betas), **kind)
        schedule = warmup_cosine(self.hparams.warmup_steps, self.hparams.max_steps, self.hparams.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ telemetry
    def flops_per_token(self) -> float:
        """Training FLOPs per LLM token, 6 x the decoder's matmul parameters (attention and vision excluded;
        see `flops_per_batch` for the whole row)."""
        self.configure_model()
        return 6.0 * matmul_params(self.model.llm)

    def flops_per_batch(self, batch: PackedBatch) -> dict[str, float]:
        """Training FLOPs of one packed row: `{"llm", "vision", "projector", "attention", "total"}`, where
        `total` = 6 x matmul params x tokens per tower (patches through the ViT) + attention FLOPs."""
        self.configure_model()
        return batch_flops(self.model, batch)


_IMAGE_NORMALIZATION = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "idefics3": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "intern_vit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""Per-channel mean/std of vision towers not trained with the CLIP statistics (the encoder's default)."""


def answer_exact_match(predictions: Tensor, targets: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per sample with labelled targets: 1.0 if every labelled token is predicted exactly (teacher forced)."""
    keep = targets != IGNORE_INDEX
    positions = keep.nonzero().squeeze(1)
    if positions.numel() == 0:
        return targets.new_zeros(0, dtype=torch.float32)
    sample = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
    wrong = (predictions != targets[keep]).long()
    per_sample = torch.zeros(len(cu_seqlens) - 1, dtype=torch.long, device=targets.device).index_add_(0, sample, wrong)
    has_labels = torch.zeros_like(per_sample).index_add_(0, sample, torch.ones_like(sample))
    return (per_sample[has_labels > 0] == 0).float()


def param_groups(model: MultimodalModel, lr: float, vision_lr: float | None, weight_decay: float) -> list[dict]:
    """AdamW groups: (vision tower | rest) x (decayed matrices | 1-D params: norms, biases, scales)."""
    vision_ids = {id(p) for p in model.vision.parameters()} if model.vision is not None else set()
    buckets: dict[tuple[bool, bool], list[Tensor]] = {}
    for param in model.parameters():
        if param.requires_grad:
            buckets.setdefault((id(param) in vision_ids, param.dim() >= 2), []).append(param)
    groups = []
    for (is_vision, decay), params in sorted(buckets.items()):
        groups.append({
            "params": params, "weight_decay": weight_decay if decay else 0.0,
            "lr": (vision_lr if is_vision and vision_lr is not None else lr),
            "name": f"{'vision' if is_vision else 'rest'}_{'decay' if decay else 'no_decay'}",
        })  # fmt: skip
    if not groups:
        raise ValueError("every parameter is frozen: nothing to optimise (check freeze=)")
    return groups


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """LR multiplier: linear 0 -> 1 over `warmup_steps`, cosine 1 -> `min_ratio` until `max_steps`, then flat."""

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def _resolve_tokenizer(tokenizer: object | str | None, model: str, checkpoint: str | None):
    if isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer)
    if tokenizer is not None:
        return tokenizer
    if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").is_file():
        return load_tokenizer(checkpoint)
    if model == "tiny-demo":
        from lightning_loneforge.datamodules.tokenizer import DemoTokenizer

        return DemoTokenizer()
    return None


def _with_tokenizer_ids(config: ModelConfig, tokenizer) -> ModelConfig:
    """Take image/video token ids from the tokenizer and check its vocabulary fits the embedding."""
    if tokenizer is None:
        return config
    size = int(tokenizer.vocab_size)
    if size > config.text.vocab_size:
        raise ValueError(
            f"tokenizer has {size} tokens but model {config.name!r} embeds only {config.text.vocab_size}"
        )
    ids = {}
    for field_name, text in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>")):
        encoded = tokenizer.encode(text)
        if len(encoded) == 1:
            ids[field_name] = encoded[0]
    return config.replace(**ids) if ids else config

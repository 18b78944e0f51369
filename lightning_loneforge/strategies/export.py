"""Full (unsharded) state dicts in and out of a sharded model: HF export of zoo models, pending pretrained loads."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)


def consolidated_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Full tensors of `module` on CPU on rank 0 (an empty dict on other ranks); every rank must call it.

    Names are the module's own parameter names: FSDP2, `torch.compile` (`_orig_mod`) and activation
    checkpointing leave no trace in them, so the zoo's name mapping applies directly.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def export_hf(module: nn.Module, folder: str | Path) -> Path | None:
    """Writes a sharded (or plain) zoo model as a Hugging Face folder (`config.json` + `model.safetensors`).

    `module` is a zoo `MultimodalModule` (its `.model` is exported) or a `MultimodalModel`. Every rank must call
    it (the full tensors are gathered); rank 0 rebuilds the model on the meta device, assigns the gathered
    tensors and writes it with the zoo's `save_hf`. Returns the folder on rank 0, None elsewhere.
    """
    from lightning_loneforge.model_zoo.hf_io import save_hf
    from lightning_loneforge.model_zoo.model import MultimodalModel

    model = getattr(module, "model", module)
    if not isinstance(model, MultimodalModel):
        raise TypeError(f"export_hf: expected a zoo MultimodalModule or MultimodalModel, got {type(module).__name__}.")
    state = consolidated_state_dict(model)
    if not _is_rank_zero():
        return None
    with torch.device("meta"):
        plain = MultimodalModel(model.config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise KeyError(f"export_hf: gathered state does not match {model.config.name!r}: "
                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")  # fmt: skip
    return save_hf(plain, folder)


def load_pending_pretrained(module: nn.Module) -> bool:
    """Loads a zoo module's `checkpoint=` weights into its (possibly sharded) parameters when still pending.

    A `MultimodalModule` built on the meta device cannot load its HF checkpoint itself; it sets
    `checkpoint_pending` and offers `pretrained_state_dict()` (full tensors under its own names). Each rank keeps
    only its shard of them. Returns True when something was loaded. Every rank must call it.
    """
    if not getattr(module, "checkpoint_pending", False) or not callable(getattr(module, "pretrained_state_dict", None)):
        return False
    options = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(module, module.pretrained_state_dict(), options=options)
    missing = [key for key in missing if key.startswith("model.")]
    if missing or unexpected:
        raise KeyError(f"checkpoint={getattr(module, 'hparams', {}).get('checkpoint')!r}: "
                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")  # fmt: skip
    module.checkpoint_pending = False
    return True

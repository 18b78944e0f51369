"""A row without images still runs the vision tower, so every data-parallel rank issues the same collectives."""

from __future__ import annotations

import pytest
import torch

from lightning_loneforge.model_zoo.config import ModelConfig
from lightning_loneforge.model_zoo.model import MultimodalModel


@pytest.mark.parametrize("name", ["tiny-demo", "tiny-qwen2.5-vl", "tiny-internvl"])
def test_text_only_row_reaches_every_vision_parameter_without_changing_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.from_name(name))
    ids = torch.randint(10, 100, (12,))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    positions = torch.cat([torch.arange(5), torch.arange(7)])
    out = model(ids, positions, cu, 7, targets=ids)
    out.loss.backward()
    towers = [model.vision, model.projector]
    grads = [p.grad for tower in towers for p in tower.parameters()]
    assert all(g is not None and not g.any() for g in grads)

    text_only = model.llm(ids, positions, cu, 7, targets=ids)
    torch.testing.assert_close(out.loss, text_only.loss)

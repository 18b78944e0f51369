"""With the zoo's `MultimodalModule` (tiny-demo row): a packed row's summed loss equals the samples' losses
run one at a time, and the module's own `sample_encoder()` feeds the packer."""

from __future__ import annotations

import io
import random

import pytest
import torch
from PIL import Image

from lightning_loneforge.datamodules.packer import TokenBudgetPacker, collate_packed
from tests.test_data_fixtures import png_bytes

zoo = pytest.importorskip("lightning_loneforge.model_zoo")
tokenizer_module = pytest.importorskip("lightning_loneforge.datamodules.tokenizer")


def _samples(encoder, n: int = 8):
    rng = random.Random(0)
    words = ["what", "colour", "is", "the", "circle", "square", "red", "blue", "how", "many", "shapes"]
    out = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        sample = {
            "__key__": f"z{i}",
            "json": {
                "conversations": [
                    {"from": "human", "value": "<image>\n" + question},
                    {"from": "gpt", "value": answer},
                ]
            },
            "png": Image.open(io.BytesIO(png_bytes(rng, (56, 56)))).convert("RGB"),
        }
        encoded = encoder(sample)
        encoded.index = i
        out.append(encoded)
    return out


def test_multimodal_module_packed_loss_equals_samples_alone():
    torch.manual_seed(0)
    module = zoo.MultimodalModule("tiny-demo", tokenizer=tokenizer_module.DemoTokenizer())
    module.configure_model()
    module.eval()
    samples = _samples(module.sample_encoder())
    batches = list(TokenBudgetPacker(512, lookahead=8, pad_to_budget=True)(samples))
    assert any(b.num_samples > 1 for b in batches)
    by_key = {s.key: s for s in samples}
    with torch.no_grad():
        for batch in batches:
            packed, _ = module(batch)
            alone_sum, alone_targets = 0.0, 0
            for key in batch.sample_keys:
                out, _ = module(collate_packed([by_key[key]]))
                alone_sum += float(out.loss) * int(out.num_targets)
                alone_targets += int(out.num_targets)
            assert int(packed.num_targets) == alone_targets
            assert float(packed.loss) * int(packed.num_targets) == pytest.approx(alone_sum, rel=1e-4)

"""Text-only decoders (Llama incl. llama3 RoPE scaling, Qwen2, Qwen3 QK-norm, Gemma) match transformers."""

from __future__ import annotations

import pytest
import torch

from lightning_loneforge.model_zoo.hf_io import from_pretrained, save_hf
from tests.test_zoo_parity_qwen_vl import redraw

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=32, num_key_value_heads=1,
                                                      hidden_activation="gelu_pytorch_tanh")),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(CASES))
def test_text_decoder_matches_transformers_on_a_packed_row(family, tmp_path):
    config_cls, model_cls, extra = CASES[family]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **extra})).eval()
    redraw(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf").eval()
    assert ours.config.family == family and ours.vision is None

    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 256, (n,), generator=g) for n in (40, 9, 23)]
    ids = torch.cat(samples)
    positions = torch.cat([torch.arange(len(s)) for s in samples])
    cu = torch.tensor([0, 40, 49, 72], dtype=torch.int32)
    with torch.no_grad():
        logits = ours.llm.logits(ours(ids, positions, cu, 40).hidden)
        expected = torch.cat([hf(input_ids=s[None]).logits[0] for s in samples])
    assert (logits - expected).abs().max() <= 1e-4

    save_hf(ours, tmp_path / "ours")
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = torch.cat([back(input_ids=s[None]).logits[0] for s in samples])
    assert (again - expected).abs().max() <= 1e-5


def test_strict_loader_lists_unused_and_missing(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=True))
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"unused tensors \[model.layers.0.self_attn.extra.weight\].*"
                                       r"missing weights \[llm.blocks.1.mlp.up_proj.weight\]"):
        from_pretrained(tmp_path)

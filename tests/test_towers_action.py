"""pi0-style action expert: parity with transformers' PI0 (velocity, loss, Euler sampling) on a tiny re-drawn
model, strict weight names, and a toy flow-matching fit that sampling reproduces."""

import logging

import pytest
import torch
from transformers import PI0Config, PI0ForConditionalGeneration

from lightning_loneforge.model_zoo.towers.action import (
    ActionExpertConfig,
    FlowMatchingActionExpert,
    hf_to_ours_action,
    ours_to_hf_action,
    pad_packed,
)
from tests._helpers import one_thread  # noqa: F401  (fixture)

TOL = 1e-4
IMAGE_TOKEN = 99
EXPERT = dict(
    action_dim=7, state_dim=6, horizon=5, hidden_size=24, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=1, head_dim=16,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread


def tiny_pi0() -> PI0ForConditionalGeneration:
    text = dict(
        model_type="gemma", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=100,
    )
    vision = dict(
        model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, image_size=16, patch_size=8, vision_use_head=False,
    )
    config = PI0Config(
        vlm_config=dict(text_config=text, vision_config=vision, projection_dim=32, image_token_id=IMAGE_TOKEN),
        dit_config=dict(hidden_size=24, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=16),
        chunk_size=5, max_state_dim=6, max_action_dim=7,
    )
    config._attn_implementation = "eager"
    model = PI0ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # re-draw everything: default init leaves biases 0 and Gemma norms 0
        for p in model.parameters():
            scale = 0.7 / p.shape[-1] ** 0.5 if p.ndim >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def hf_inputs(batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(0, 90, (batch, 3), generator=gen)
    return dict(
        input_ids=torch.cat([torch.full((batch, 4), IMAGE_TOKEN), text], dim=1),  # 4 patches per camera
        pixel_values=torch.randn(batch, 1, 3, 16, 16, generator=gen),
        pixel_attention_mask=torch.ones(batch, 1, dtype=torch.bool),
        state=torch.randn(batch, 6, generator=gen),
    )


def prefix_kv(hf: PI0ForConditionalGeneration, inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The VLM's per-layer K/V of the prefix, as PI0 computes them."""
    embeds = hf.model.embed_prefix(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
    cache = hf.model.vlm(inputs_embeds=embeds, token_type_ids=torch.zeros_like(embeds[..., 0]), use_cache=True).cache
    return [(layer.keys, layer.values) for layer in cache.layers]


def load_ours(hf: PI0ForConditionalGeneration, sd: dict | None = None, prefix: str = "") -> FlowMatchingActionExpert:
    config = ActionExpertConfig(**EXPERT)
    ours = FlowMatchingActionExpert(config).eval()
    ours.load_state_dict(hf_to_ours_action(hf.state_dict() if sd is None else sd, prefix, config), strict=True)
    return ours


@torch.no_grad()
def test_velocity_loss_and_sampling_match_transformers_pi0():
    hf = tiny_pi0()
    ours = load_ours(hf)
    inputs = hf_inputs()
    gen = torch.Generator().manual_seed(2)
    actions, noise = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    timestep = torch.tensor([0.3, 0.9])
    out = hf(**inputs, noise=noise, timestep=timestep, actions=actions)
    prefix = ours.encode_prefix(kv=prefix_kv(hf, inputs))
    t = timestep[:, None, None]
    velocity = ours(t * noise + (1 - t) * actions, inputs["state"], timestep, prefix)
    assert velocity.shape == (2, 5, 7)
    assert (velocity - out.logits).abs().max() <= TOL
    assert abs(ours.loss(actions, inputs["state"], prefix, noise=noise, timestep=timestep) - out.loss) <= TOL
    want = hf.sample_actions(**inputs, noise=noise, num_steps=3)
    got = ours.sample(inputs["state"], prefix, num_steps=3, noise=noise)
    assert (got - want).abs().max() <= TOL


def test_checkpoint_file_names_round_trip(tmp_path, caplog):
    hf = tiny_pi0()
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    on_disk = {k: v for f in tmp_path.glob("*.safetensors") for k, v in load_file(f).items()}
    assert "paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_proj.weight" in on_disk
    with caplog.at_level(logging.INFO):
        ours = load_ours(hf, {"model." + k: v for k, v in on_disk.items()}, prefix="model.")
    assert "lm_head" in caplog.text  # the never-used vocabulary matrix is skipped visibly
    mine = ours_to_hf_action(ours.state_dict())
    assert all(torch.equal(on_disk[k], v) for k, v in mine.items())
    assert set(on_disk) - set(mine) == {k for k in on_disk if "paligemma_with_expert.paligemma." in k} | {
        "paligemma_with_expert.gemma_expert.lm_head.weight"
    }


def test_strict_names_missing_and_unused():
    hf = tiny_pi0()
    sd = dict(hf.state_dict())
    del sd["model.dit.layers.1.mlp.up_proj.weight"]
    sd["embed_action_time.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"embed_action_time\.extra\.weight.*blocks\.1\.mlp\.up\.weight"):
        hf_to_ours_action(sd, "", ActionExpertConfig(**EXPERT))


def test_bad_prefix_is_named():
    ours = FlowMatchingActionExpert(ActionExpertConfig(**EXPERT))
    with pytest.raises(ValueError, match="K/V of 1 layers"):
        ours.encode_prefix(kv=[(torch.zeros(1, 1, 3, 16), torch.zeros(1, 1, 3, 16))])
    with pytest.raises(ValueError, match="exactly one"):
        ours.encode_prefix()


def test_pad_packed():
    packed = torch.arange(5.0)[:, None]
    padded, mask = pad_packed(packed, torch.tensor([0, 2, 5]))
    assert padded[..., 0].tolist() == [[0, 1, 0], [2, 3, 4]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_padded_prefix_tokens_are_ignored():
    torch.manual_seed(0)
    config = ActionExpertConfig(**{**EXPERT, "prefix_dim": 8})
    ours = FlowMatchingActionExpert(config).eval()
    hidden = torch.randn(1, 3, 8)
    padded = torch.cat([hidden, torch.randn(1, 2, 8)], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    state, noise = torch.randn(1, 6), torch.randn(1, 5, 7)
    a = ours.sample(state, ours.encode_prefix(hidden=hidden), num_steps=2, noise=noise)
    b = ours.sample(state, ours.encode_prefix(hidden=padded, mask=mask), num_steps=2, noise=noise)
    assert (a - b).abs().max() <= 1e-5


def test_toy_mapping_trains_and_sampling_reproduces_targets():
    """Four observations (prefix hidden states + state) each map to a fixed action chunk."""
    torch.manual_seed(0)
    config = ActionExpertConfig(
        action_dim=3, state_dim=2, horizon=4, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, prefix_dim=8,
    )
    expert = FlowMatchingActionExpert(config)
    tasks = 4
    hidden, state = torch.randn(tasks, 3, 8), torch.randn(tasks, 2)
    targets = torch.rand(tasks, 4, 3) * 2 - 1
    optimizer = torch.optim.AdamW(expert.parameters(), lr=3e-3)
    repeat = 16
    losses = []
    for _ in range(300):
        prefix = expert.encode_prefix(hidden=hidden.repeat(repeat, 1, 1))
        loss = expert.loss(targets.repeat(repeat, 1, 1), state.repeat(repeat, 1), prefix)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < 0.25 * first, (first, last)
    expert.eval()
    sampled = expert.sample(state, expert.encode_prefix(hidden=hidden), num_steps=10)
    assert sampled.shape == targets.shape
    assert (sampled - targets).abs().mean() < 0.1, (sampled - targets).abs().mean()


def test_config_from_pi0_json_and_published_expert_size():
    from transformers import GemmaModel

    from lightning_loneforge.model_zoo.towers.action import action_config_from_hf

    assert action_config_from_hf(tiny_pi0().config.to_dict()) == ActionExpertConfig(**EXPERT)
    pi0 = PI0Config()
    default = action_config_from_hf(pi0.to_dict())
    assert default == ActionExpertConfig()  # our defaults are pi0's
    with torch.device("meta"):
        ours = FlowMatchingActionExpert(default)
        dit = GemmaModel(pi0.dit_config)
    # state_proj, action_in_proj, action_time_mlp_in, action_time_mlp_out, action_out_proj (with biases)
    heads = 2 * (32 * 1024 + 1024) + (2 * 1024 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 32 + 32)
    dit_params = sum(p.numel() for n, p in dit.named_parameters() if not n.startswith("embed_tokens"))
    assert sum(p.numel() for p in ours.parameters()) == dit_params + heads
    with pytest.raises(ValueError, match="model_type"):
        action_config_from_hf({"model_type": "llava"})

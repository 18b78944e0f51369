"""TokenBudgetPacker and the cost model: budgets, caps, policies, padding, collation, resume state."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from lightning_loneforge.datamodules.balancer import CostModel, balance_ratio
from lightning_loneforge.datamodules.batch import IGNORE_INDEX
from lightning_loneforge.datamodules.encoder import EncodedSample, SampleError
from lightning_loneforge.datamodules.packer import TokenBudgetPacker, collate_packed


@dataclass
class Item:
    key: str
    index: int
    num_tokens: int
    num_images: int = 0
    num_patches: int = 0


def _items(n: int, seed: int = 0, low: int = 1, high: int = 300) -> list[Item]:
    rng = random.Random(seed)
    return [Item(f"k{i}", i, rng.randint(low, high), *(2 * [rng.randint(0, 2)])) for i in range(n)]


def test_packs_respect_budget_keep_every_sample_once_and_fill_well():
    items = _items(2000)
    packs = list(TokenBudgetPacker(1024, lookahead=64).iter_packs(items))
    assert all(sum(s.num_tokens for s in p) <= 1024 for p in packs)
    keys = [s.key for p in packs for s in p]
    assert sorted(keys) == sorted(i.key for i in items)
    fill = sum(i.num_tokens for i in items) / (len(packs) * 1024)
    assert fill > 0.97


def test_image_and_patch_caps():
    items = _items(500)
    packs = list(TokenBudgetPacker(2048, lookahead=32, max_images=3, max_patches=4).iter_packs(items))
    assert all(sum(s.num_images for s in p) <= 3 and sum(s.num_patches for s in p) <= 4 for p in packs)
    assert sum(len(p) for p in packs) == 500


def test_oversize_raises_naming_key_or_is_counted():
    items = [Item("small", 0, 10), Item("huge", 1, 5000)]
    with pytest.raises(SampleError, match="huge: 5000 tokens > max_tokens=100"):
        list(TokenBudgetPacker(100).iter_packs(items))
    packer = TokenBudgetPacker(100, oversize="skip")
    packs = list(packer.iter_packs(items))
    assert [[s.key for s in p] for p in packs] == [["small"]] and packer.skipped["oversize"] == 1


def test_cost_budget_evens_pack_costs():
    cost = CostModel(a=1e-3)
    items = _items(3000, high=400)
    plain = list(TokenBudgetPacker(2048, lookahead=64).iter_packs(items))
    budget = cost.budget_for(2048, 200)
    capped = list(
        TokenBudgetPacker(2048, lookahead=64, cost_model=cost, cost_budget=budget).iter_packs(items)
    )

    def spread(packs):
        costs = [cost.pack_cost([s.num_tokens for s in p]) for p in packs[:-5]]
        return max(costs) / min(costs)

    assert all(cost.pack_cost([s.num_tokens for s in p]) <= budget or len(p) == 1 for p in capped)
    assert spread(capped) < 1.1 < spread(plain)


def test_cost_model_inverse_fit_and_ratio():
    cost = CostModel(a=2e-4, b=1.0, c=5.0)
    for n in (0, 1, 17, 999):
        assert cost.max_tokens_within(cost(n)) == n or cost(cost.max_tokens_within(cost(n))) <= cost(n)
    rng = random.Random(0)
    packs = [[rng.randint(10, 2000) for _ in range(rng.randint(1, 12))] for _ in range(50)]
    times = [0.5 * CostModel(3e-4, 1.0, 20.0).pack_cost(p) for p in packs]
    fitted = CostModel.fit(packs, times)
    assert fitted.a == pytest.approx(3e-4, rel=1e-6) and fitted.c == pytest.approx(20.0, rel=1e-6)
    assert balance_ratio([1.0, 1.0, 2.0]) == pytest.approx(1.5)


def _encoded(key: str, n: int, index: int = 0, image: bool = False, mrope: bool = False) -> EncodedSample:
    ids = torch.arange(n) + 10
    pos = torch.arange(n)
    return EncodedSample(
        input_ids=ids,
        labels=ids.clone(),
        position_ids=pos.expand(3, n).clone() if mrope else pos,
        key=key,
        index=index,
        pixel_values=torch.randn(16, 8) if image else None,
        image_grid_thw=torch.tensor([[1, 4, 4]]) if image else None,
        actions=torch.ones(2, 3) if image else None,
        proprio=torch.ones(5) if image else None,
    )


def test_collate_and_pad_to_budget():
    samples = [
        _encoded("a", 5, image=True, mrope=True),
        _encoded("b", 3, mrope=True),
        _encoded("c", 4, image=True, mrope=True),
    ]
    batch = collate_packed(samples, pad_to=16, pad_token_id=0)
    assert batch.num_tokens == 16 and batch.num_real_tokens == 12 and batch.sample_keys == ["a", "b", "c"]
    assert batch.cu_seqlens.tolist() == [0, 5, 8, 12, 16] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 5 and batch.position_ids.shape == (3, 16)
    assert (batch.labels[12:] == IGNORE_INDEX).all() and batch.position_ids[0, 12:].tolist() == [0, 1, 2, 3]
    assert batch.pixel_values.shape == (32, 8) and batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4]]
    assert batch.action_sample_index.tolist() == [0, 2] and batch.actions.shape == (2, 2, 3)
    packer = TokenBudgetPacker(16, lookahead=2, pad_to_budget=True)
    assert all(b.num_tokens == 16 for b in packer(samples))


def test_state_dict_restores_the_buffer_exactly():
    items = _items(400, seed=3)
    reference = [[s.key for s in p] for p in TokenBudgetPacker(700, lookahead=16).iter_packs(items)]
    packer = TokenBudgetPacker(700, lookahead=16)
    stream = packer.iter_packs(iter(items))
    first = [[s.key for s in next(stream)] for _ in range(7)]
    state = packer.state_dict()
    consumed = (
        max(
            s.index
            for s in items
            if s.key in {k for p in first for k in p} | {k for _, _, k in state["pending"]}
        )
        + 1
    )
    resumed = TokenBudgetPacker(700, lookahead=16)
    resumed.load_state_dict(state)
    again = [i for i in items[:consumed] if i.index in resumed.restoring] + items[consumed:]
    rest = [[s.key for s in p] for p in resumed.iter_packs(again)]
    assert first + rest == reference


def test_max_wait_bounds_how_long_a_sample_waits():
    items = [Item("small", 0, 40)] + [Item(f"big{i}", i + 1, 70) for i in range(30)]
    packs = list(TokenBudgetPacker(100, lookahead=4, max_wait=3).iter_packs(items))
    where = next(n for n, p in enumerate(packs) if any(s.key == "small" for s in p))
    assert where <= 4
    starved = list(TokenBudgetPacker(100, lookahead=4, max_wait=1000).iter_packs(items))
    assert any(s.key == "small" for s in starved[-1])

"""Packing efficiency, packer speed and cross-rank balance on the reference mixture (CPU, seconds).

    python benchmarks/packing.py                 # table + one JSON line (the last line)
    python benchmarks/packing.py --n 20000 --ranks 8 --lookahead 128

Compares, on the same samples (`benchmarks/mixture.py`, Qwen2-VL token counts):
- per-batch padding: samples in stream order, each batch padded to its longest sample, as many samples as fit
  `max_tokens` padded slots (what a plain padded DataLoader with a token budget does);
- `TokenBudgetPacker` at 16,384 and 4,096 tokens;
- balance at 8 data-parallel ranks: round-robin of token-only packs against cost-budgeted packs
  (`balancer.py`), max/mean per-rank cost per step, averaged over steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mixture import sample_shapes  # noqa: E402

from lightning_loneforge.datamodules.balancer import CostModel, balance_ratio  # noqa: E402
from lightning_loneforge.datamodules.packer import TokenBudgetPacker  # noqa: E402


@dataclass(slots=True)
class Item:
    """A sample as the packer sees it (no tensors: this measures the packer, not collation)."""

    key: str
    index: int
    num_tokens: int
    num_images: int
    num_patches: int


def mixture_items(n: int, seed: int) -> list[Item]:
    items = []
    for i, shape in enumerate(sample_shapes(n, seed)):
        patches = sum(t * h * w for t, h, w in shape.grids)
        items.append(Item(f"s{i:07d}", i, shape.tokens, len(shape.grids), patches))
    return items


def padded_real_fraction(items: list[Item], max_tokens: int) -> float:
    """Per-batch padding in stream order: a batch takes samples while `count * longest <= max_tokens`."""
    real = slots = 0
    batch_len = count = 0
    for item in items:
        longest = max(batch_len, item.num_tokens)
        if count and (count + 1) * longest > max_tokens:
            slots += count * batch_len
            batch_len, count = 0, 0
            longest = item.num_tokens
        batch_len, count = longest, count + 1
        real += item.num_tokens
    slots += count * batch_len
    return real / slots


def pack(items: list[Item], max_tokens: int, lookahead: int, **kw) -> list[list[Item]]:
    packer = TokenBudgetPacker(max_tokens, lookahead=lookahead, oversize="skip", **kw)
    return list(packer.iter_packs(items))


def real_fraction(packs: list[list[Item]], max_tokens: int) -> float:
    return sum(s.num_tokens for p in packs for s in p) / (len(packs) * max_tokens)


def step_ratios(rank_packs: list[list[list[Item]]], cost: CostModel) -> list[float]:
    steps = min(len(p) for p in rank_packs)
    return [
        balance_ratio([cost.pack_cost([s.num_tokens for s in packs[step]]) for packs in rank_packs])
        for step in range(steps)
    ]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40_000, help="samples of the mixture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lookahead", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=8)
    args = parser.parse_args(argv)

    items = mixture_items(args.n, args.seed)
    lengths = [i.num_tokens for i in items]
    print(
        f"mixture: {len(items)} samples, tokens mean {statistics.mean(lengths):.0f}, "
        f"median {statistics.median(lengths):.0f}, max {max(lengths)}"
    )
    result: dict[str, float] = {}
    rows = []
    for max_tokens, tag in ((16_384, "16k"), (4_096, "4k")):
        padded = padded_real_fraction(items, max_tokens)
        start = time.perf_counter()
        packs = pack(items, max_tokens, args.lookahead)
        elapsed = time.perf_counter() - start
        packed = real_fraction(packs, max_tokens)
        per_pack = len(items) / len(packs)
        rows.append((max_tokens, padded, packed, per_pack, len(items) / elapsed))
        result[f"real_fraction_{tag}"] = round(packed, 4)
        result[f"padded_real_fraction_{tag}"] = round(padded, 4)
        result[f"packer_samples_per_s_{tag}"] = round(len(items) / elapsed)
    result["padded_real_fraction"] = result["padded_real_fraction_16k"]
    result["packer_samples_per_s"] = min(
        result["packer_samples_per_s_16k"], result["packer_samples_per_s_4k"]
    )
    print(
        f"\n{'max_tokens':>10} | {'padded real':>11} | {'packed real':>11} | {'samples/pack':>12} | {'packer samples/s':>16}"
    )
    for max_tokens, padded, packed, per_pack, speed in rows:
        print(f"{max_tokens:>10} | {padded:>11.1%} | {packed:>11.2%} | {per_pack:>12.1f} | {speed:>16,.0f}")

    max_tokens, cost = 16_384, CostModel()
    round_robin = pack(items, max_tokens, args.lookahead)
    rr_ranks = [round_robin[r :: args.ranks] for r in range(args.ranks)]
    budget = cost.budget_for(max_tokens, int(statistics.mean(lengths)))
    balanced_ranks = [
        pack(items[r :: args.ranks], max_tokens, args.lookahead, cost_model=cost, cost_budget=budget)
        for r in range(args.ranks)
    ]
    rr, bal = step_ratios(rr_ranks, cost), step_ratios(balanced_ranks, cost)
    bal_real = real_fraction([p for r in balanced_ranks for p in r], max_tokens)
    result["roundrobin_ratio_8"] = round(statistics.mean(rr), 4)
    result["balance_ratio_8"] = round(statistics.mean(bal), 4)
    result["balance_ratio_8_p99"] = round(sorted(bal)[int(0.99 * (len(bal) - 1))], 4)
    result["balanced_real_fraction_16k"] = round(bal_real, 4)
    print(
        f"\nbalance at {args.ranks} ranks, max_tokens={max_tokens}, cost a={cost.a:g} b={cost.b:g} c={cost.c:g}"
    )
    print(f"{'assignment':>24} | {'mean max/mean':>13} | {'p99':>6} | {'real tokens':>11}")
    print(
        f"{'round-robin token packs':>24} | {statistics.mean(rr):>13.4f} | {sorted(rr)[int(0.99 * (len(rr) - 1))]:>6.3f}"
        f" | {real_fraction(round_robin, max_tokens):>11.2%}"
    )
    print(
        f"{'cost-budgeted packs':>24} | {statistics.mean(bal):>13.4f} | {result['balance_ratio_8_p99']:>6.3f}"
        f" | {bal_real:>11.2%}"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

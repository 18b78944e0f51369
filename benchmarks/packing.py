"""Packing efficiency, packer speed and cross-rank balance on the reference mixture (CPU, seconds).

    python benchmarks/packing.py                 # table + one JSON line (the last line)
    python benchmarks/packing.py --n 20000 --ranks 8 --lookahead 128
    python benchmarks/packing.py --stream        # also end-to-end: JPEG shards -> packed batches, 2 workers

Compares, on the same samples (`benchmarks/mixture.py`, Qwen2-VL token counts):
- per-batch padding: samples in stream order, each batch padded to its longest sample, as many samples as fit
  `max_tokens` padded slots (what a plain padded DataLoader with a token budget does);
- `TokenBudgetPacker` at 16,384 and 4,096 tokens;
- balance at 8 data-parallel ranks: round-robin of token-only packs against cost-budgeted packs
  (`balancer.py`), max/mean per-rank cost per step, averaged over steps;
- with `--stream`: WebDataset shards of 448x448 JPEG + LLaVA conversations streamed through
  `WebDatasetDataModule` (decode, Qwen2-VL resize/normalize/patchify, tokenize, pack) on 2 workers.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
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


def write_jpeg_shards(directory: Path, n: int, per_shard: int = 100, size: int = 448) -> list[str]:
    """LLaVA-style shards of `size`-px JPEGs (smooth gradients plus noise, ~30-60 KB each)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = random.Random(0)
    words = "what is in the image describe the scene a red car on street with trees and sky".split()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    urls = []
    for shard in range(0, n, per_shard):
        path = directory / f"bench-{shard // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(shard, min(n, shard + per_shard)):
                base = (
                    np.stack([xx * rng.random(), yy * rng.random(), (xx + yy) * rng.random() / 2], -1) * 255
                )
                noise = np.random.default_rng(i).normal(0, 12, base.shape)
                image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                question = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
                answer = " ".join(rng.choice(words) for _ in range(rng.randint(10, 200)))
                conv = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]
                writer.write(
                    {
                        "__key__": f"b{i:07d}",
                        "jpg": buffer.getvalue(),
                        "json": json.dumps({"conversations": conv}),
                    }
                )
        urls.append(str(path))
    return urls


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, once joined)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def stream_throughput(n: int, num_workers: int = 2, max_tokens: int = 16_384) -> dict[str, float]:
    """Samples/s of shards -> packed batches through `WebDatasetDataModule` (Qwen2-VL encoder defaults)."""
    from lightning_loneforge.datamodules.encoder import SampleEncoder
    from lightning_loneforge.datamodules.tokenizer import WordTokenizer
    from lightning_loneforge.datamodules.webdataset_dm import WebDatasetDataModule

    with tempfile.TemporaryDirectory() as tmp:
        urls = write_jpeg_shards(Path(tmp), n)
        words = "what is in the image describe the scene a red car on street with trees and sky".split()
        encoder = SampleEncoder(WordTokenizer(words))
        dm = WebDatasetDataModule(urls, max_tokens=max_tokens, num_workers=num_workers, encoder=encoder)
        dm.setup("fit")
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        samples = tokens = slots = batches = 0
        for batch in dm.train_dataloader():
            samples += batch.num_samples
            tokens += batch.num_real_tokens
            slots += batch.num_tokens
            batches += 1
        elapsed = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_start
    return {
        "stream_cpu_ms_per_sample": round(1000 * cpu / max(1, samples), 2),
        "stream_samples_per_s": round(samples / elapsed, 1),
        "stream_real_tokens_per_s": round(tokens / elapsed),
        "stream_samples": samples,
        "stream_batches": batches,
        "stream_workers": num_workers,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40_000, help="samples of the mixture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lookahead", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument(
        "--typical-tokens", type=int, default=1024, help="sets the cost budget (as the datamodule)"
    )
    parser.add_argument("--stream", action="store_true", help="also run the end-to-end streaming benchmark")
    parser.add_argument("--stream-samples", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
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
    budget = cost.budget_for(max_tokens, args.typical_tokens)
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
        f"\nbalance at {args.ranks} ranks, max_tokens={max_tokens}, cost a={cost.a:g} b={cost.b:g} c={cost.c:g}, "
        f"cost budget: a row of {args.typical_tokens}-token samples"
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
    if args.stream:
        stream = stream_throughput(args.stream_samples, args.workers)
        print(
            f"\nend-to-end streaming (448px JPEG, {args.workers} workers, max_tokens=16384): "
            f"{stream['stream_samples_per_s']:,.1f} samples/s, {stream['stream_real_tokens_per_s']:,} tokens/s "
            f"over {stream['stream_samples']} samples; {stream['stream_cpu_ms_per_sample']} CPU ms per sample"
        )
        result.update(stream)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

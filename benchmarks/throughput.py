"""Training throughput of a Qwen2-VL-2B-shaped model on one GPU: Hugging Face baseline vs ours, one run.

    python benchmarks/throughput.py --log-dir logs/tp                       # both arms, both mixtures
    python benchmarks/throughput.py --log-dir logs/tp --attention fa4       # ours with FlashAttention-4
    python benchmarks/throughput.py --log-dir /tmp/tp --tiny                # CPU smoke run (tests)

Arms (same process, same sample stream from `benchmarks/mixture.py`):
- baseline: transformers' Qwen2VLForConditionalGeneration, SDPA, right-padded batches, AdamW (`_hf_baseline.py`);
- ours: the zoo's `qwen2-vl-2b` through Lightning + `TowerParallelStrategy`, packed rows (`_ours.py`).
Both run for each mixture (`--video-shares`, default the reference mix and the video-heavy one at 0.5).
MFU counts 6 x matmul parameters per item: ViT per patch, merger per vision token, LLM blocks per token,
LM head per labelled token (attention scores excluded); against 989 TFLOP/s and the measured matmul peak.
The log folder gets `results.json`, `table.md` and profiles; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _bench_common import (  # noqa: E402
    QWEN2_VL_2B_TEXT,
    QWEN2_VL_2B_VISION,
    TINY_TEXT,
    TINY_VISION,
    device_facts,
    markdown_table,
    matmul_peak_tflops,
    sample_stream,
    write_json,
)
from _hf_baseline import run_baseline  # noqa: E402
from _ours import OursConfig, run_ours  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-dir", type=Path, required=True, help="folder for results.json, table.md, profiles")
    p.add_argument("--arms", default="baseline,ours", help="comma list of baseline, ours")
    p.add_argument("--video-shares", default="0.1,0.5", help="mixture video shares; the first is the headline")
    p.add_argument("--baseline-batch", type=int, default=4)
    p.add_argument("--baseline-warmup", type=int, default=2)
    p.add_argument("--baseline-steps", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16384, help="ours: token budget of a packed row")
    p.add_argument("--vision-ac", default="full", help="ours: ViT activation checkpointing none|full|n")
    p.add_argument("--llm-ac", default="none", help="ours: LLM activation checkpointing none|full|n")
    p.add_argument("--attention", default="auto", choices=["auto", "fa4"], help="ours: attention kernel")
    p.add_argument("--no-compile", action="store_true", help="ours: eager blocks")
    p.add_argument("--variants", default="",
                   help="extra ours configs on the first mixture, ';'-separated 'max_tokens,vision_ac' pairs; "
                        "the fastest config then runs the other mixtures")
    p.add_argument("--ours-warmup", type=int, default=4)
    p.add_argument("--ours-steps", type=int, default=12)
    p.add_argument("--profile-steps", type=int, default=0, help="ours: profile this many steps after timing")
    p.add_argument("--samples", type=int, default=3000, help="samples drawn per mixture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny model and samples, CPU-sized (smoke test)")
    return p.parse_args(argv)


def _ac(value: str):
    return int(value) if value.isdigit() else value


def ours_configs(args) -> list[OursConfig]:
    base = dict(vision_ac=_ac(args.vision_ac), llm_ac=_ac(args.llm_ac), compile=not args.no_compile,
                attention=args.attention, workers=0 if args.tiny else 2)
    configs = [OursConfig(max_tokens=args.max_tokens, **base)]
    for item in filter(None, args.variants.split(";")):
        tokens, ac = item.split(",")
        configs.append(OursConfig(**{**base, "max_tokens": int(tokens), "vision_ac": _ac(ac)}))
    return configs


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    text, vision = (TINY_TEXT, TINY_VISION) if args.tiny else (QWEN2_VL_2B_TEXT, QWEN2_VL_2B_VISION)
    shrink = 8 if args.tiny else 1
    facts = device_facts()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} {json.dumps(facts)}", flush=True)
    peak = matmul_peak_tflops() if device.type == "cuda" else float("nan")
    print(f"# measured bf16 matmul peak: {peak:.1f} TFLOP/s", flush=True)
    if args.attention == "fa4" and device.type == "cuda":
        from _fa4 import check_fa4_matches_varlen, install_fa4, uninstall_fa4

        backend = install_fa4()
        print(f"# attention: {backend}", flush=True)
        try:
            diff = check_fa4_matches_varlen(device)
            print(f"# FA4 vs varlen_attn, max abs diff / max abs (outputs and grads): {diff:.2e}", flush=True)
            if not diff < 0.05:
                raise ValueError(f"FA4 differs from varlen_attn by {diff}")
        except Exception as err:  # noqa: BLE001 - reported, the run goes on without FA4
            print(f"# FA4 check failed, ours falls back to the zoo's attention: {type(err).__name__}: {err}",
                  flush=True)
            args.attention = "auto"
            uninstall_fa4()
    arms = set(args.arms.split(","))
    results: list[dict] = []
    by_mix: dict[float, dict] = {}
    configs = ours_configs(args)
    for mix_index, share in enumerate(float(x) for x in args.video_shares.split(",")):
        shapes = sample_stream(args.samples, args.seed, share, shrink)
        entry = by_mix.setdefault(share, {})
        if "baseline" in arms:
            entry["baseline"] = _guarded(f"baseline mix {share}", lambda shapes=shapes: run_baseline(
                shapes, text=text, vision=vision, batch_size=args.baseline_batch, warmup=args.baseline_warmup,
                steps=args.baseline_steps, device=device, seed=args.seed), results, share, peak)
        if "ours" in arms:
            todo = configs if mix_index == 0 else [entry_best(by_mix, configs)]
            for cfg in todo:
                prof = args.log_dir / f"profile-mix{share}-{cfg.label()}.txt" if args.profile_steps else None
                res = _guarded(f"ours {cfg.label()} mix {share}", lambda cfg=cfg, prof=prof, shapes=shapes: run_ours(
                    shapes, cfg=cfg, warmup=args.ours_warmup, steps=args.ours_steps, device=device,
                    tiny=args.tiny, seed=args.seed, text=text, vision=vision,
                    profile_steps=args.profile_steps, profile_path=prof), results, share, peak)
                if res is None and cfg.attention == "fa4":  # keep the run: same config on the zoo's attention
                    cfg = dataclasses.replace(cfg, attention="auto")
                    res = _guarded(f"ours {cfg.label()} mix {share} (after FA4 failed)",
                                   lambda cfg=cfg, shapes=shapes: run_ours(
                                       shapes, cfg=cfg, warmup=args.ours_warmup, steps=args.ours_steps,
                                       device=device, tiny=args.tiny, seed=args.seed, text=text, vision=vision),
                                   results, share, peak)
                if res is not None:
                    entry.setdefault("ours_all", []).append((cfg, res))
                    if "ours" not in entry or _rank(res) > _rank(entry["ours"]):
                        entry["ours"] = res
    summary = summarize(by_mix, facts, peak, args)
    table = markdown_table(results)
    (args.log_dir / "table.md").write_text(table + "\n")
    write_json(args.log_dir / "results.json", {"facts": facts, "matmul_peak_tflops": peak, "rows": results,
                                               "summary": summary, "argv": sys.argv[1:]})
    print("\n" + table, flush=True)
    print(json.dumps(summary), flush=True)
    return summary


MEMORY_TARGET_GIB = 60.0


def _rank(res) -> tuple[bool, float]:
    """Headline choice: configs within the memory target first, then the fastest."""
    return (not res.peak_gib > MEMORY_TARGET_GIB, res.tokens_per_s)


def entry_best(by_mix: dict, configs: list[OursConfig]) -> OursConfig:
    first = next(iter(by_mix.values()))
    runs = first.get("ours_all", [])
    return max(runs, key=lambda pair: _rank(pair[1]))[0] if runs else configs[0]


def _guarded(what: str, fn, results: list[dict], share: float, peak: float):
    """Run one arm; a failure (e.g. out of memory) is logged and becomes a table row, not a lost run."""
    print(f"## {what}", flush=True)
    try:
        res = fn()
    except Exception as err:  # noqa: BLE001 - one arm failing must not lose the others
        traceback.print_exc()
        results.append({"arm": what, "video_share": share, "error": f"{type(err).__name__}: {str(err)[:200]}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    row = {"video_share": share, **res.row(peak)}
    results.append(row)
    print(json.dumps(row), flush=True)
    return res


def summarize(by_mix: dict, facts: dict, peak: float, args) -> dict:
    summary = {"device": facts["device"], "driver": facts["driver"], "torch": facts["torch"],
               "commit": facts["commit"],
               "matmul_peak_tflops": round(peak, 1) if peak == peak else None}
    for index, (share, entry) in enumerate(by_mix.items()):
        base, ours = entry.get("baseline"), entry.get("ours")
        prefix = "" if index == 0 else f"video{share}_"
        summary[f"{prefix}baseline_tokens_per_s"] = round(base.tokens_per_s, 1) if base else None
        summary[f"{prefix}ours_tokens_per_s"] = round(ours.tokens_per_s, 1) if ours else None
        summary[f"{prefix}ratio"] = round(ours.tokens_per_s / base.tokens_per_s, 2) if base and ours else None
        summary[f"{prefix}ours_mfu"] = round(ours.mfu(), 4) if ours else None
        summary[f"{prefix}baseline_mfu"] = round(base.mfu(), 4) if base else None
        summary[f"{prefix}ours_peak_gib"] = round(ours.peak_gib, 2) if ours else None
        summary[f"{prefix}baseline_peak_gib"] = round(base.peak_gib, 2) if base else None
        if index == 0 and ours:
            summary["ours_config"] = ours.name
    return summary


if __name__ == "__main__":
    main()

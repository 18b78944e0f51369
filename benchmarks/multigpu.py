"""Two GPUs: scaling, per-tower plans, balancing and checkpoint resharding, in one command (issue 9).

    python benchmarks/multigpu.py --log-dir logs/mg                  # 1 + 2 GPUs, NCCL (torchrun inside)
    python benchmarks/multigpu.py --log-dir /tmp/mg --tiny           # CPU, gloo, tiny model (smoke test)

The launcher runs three parts in fresh processes (2 ranks through `torchrun`) and collects their JSON:
1. `single` (world 1): the scaling baseline (default plans), and a run that saves a checkpoint at step K;
2. `dist` (world 2): scaling; plans vision-replicate + llm-full (default) vs both full vs both hybrid vs
   Lightning's own `FSDPStrategy` (CUDA only); balancer off vs on on the video-heavy mixture (towers
   replicated, so the forward pass has no collective and its time per rank is pure compute); a run that
   saves a checkpoint at step K, and the resume of the world-1 checkpoint;
3. `resume1` (world 1): the world-2 checkpoint resumed with `accumulate_grad_batches=2` (same global batch).
Loss curves around each resume are printed; resharding is "ok" when the resumed losses stay within 5% of
the uninterrupted run's on the same rows. NCCL runs with NVLink multicast off (the variables are set here).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _bench_common import (  # noqa: E402
    PATCH_DIM,
    QWEN2_VL_2B_TEXT,
    QWEN2_VL_2B_VISION,
    TINY_TEXT,
    TINY_VISION,
    MatmulParams,
    device_facts,
    markdown_table,
    patches_of,
    sample_stream,
    synchronize,
)
from _ours import OursConfig, PackedRows, build_module, encode_synthetic  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PLANS = {
    "vision-replicate+llm-full": {"vision": "replicate", "projector": "replicate", "llm": "full"},
    "all-full": {"vision": "full", "projector": "full", "llm": "full"},
    "all-hybrid": {"vision": "hybrid", "projector": "hybrid", "llm": "hybrid"},
    "all-replicate": {"vision": "replicate", "projector": "replicate", "llm": "replicate"},
}
DEFAULT_PLAN = "vision-replicate+llm-full"


@dataclass
class Case:
    """One training run inside a part."""

    name: str
    plan: str = DEFAULT_PLAN
    video_share: float = 0.1
    balance: bool = False
    save_at: int | None = None
    resume_from: str | None = None
    start_row: int = 0
    accumulate: int = 1
    learnable: bool = False


# ----------------------------------------------------------------------------- inside one process group
def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _gather(obj):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class _Probe:
    """Callback state: timing of steps [warmup, warmup + steps), per-rank forward times, losses, collectives."""

    def __init__(self, warmup: int, steps: int, count_comm: bool) -> None:
        import lightning.pytorch as pl

        probe = self
        self.warmup, self.steps, self.count_comm = warmup, steps, count_comm
        self.accumulate = 1
        self.t0 = self.t1 = 0.0
        self.keys: list[list[str]] = []
        self.forward_ms: list[float] = []
        self.losses: list[float] = []
        self.comm: dict[str, float] = {}
        self._counter = None
        self._events = None

        class Callback(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                probe.batch_start(trainer, module, batch, batch_idx)

            def on_before_backward(self, trainer, module, loss):
                if probe._events is not None:
                    probe._events[1].record()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                probe.batch_end(outputs, batch_idx)

            def on_train_end(self, trainer, module):
                probe.stop()

        self.callback = Callback()

    def batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            synchronize()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
        if batch_idx == self.warmup + self.steps:
            self.stop()
            if self.count_comm:
                self._start_counter(module)
        if self.warmup <= batch_idx < self.warmup + self.steps:
            self.keys.append(list(batch.sample_keys))
            if torch.cuda.is_available():
                self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                self._events[0].record()

    def batch_end(self, outputs, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # Lightning hands back the loss divided by the accumulation; a host sync per step (fine: untimed cases
        # need it, timed ones read an already finished step)
        self.losses.append(float(loss) * self.accumulate)
        if self._events is not None:
            self._events[1].synchronize()
            self.forward_ms.append(self._events[0].elapsed_time(self._events[1]))
            self._events = None
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.comm = dict(self._counter.by_tower)
            self._counter = None

    def stop(self) -> None:
        if self.t1 == 0.0 and self.t0:
            synchronize()
            self.t1 = time.perf_counter()
            self.peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")

    def _start_counter(self, module) -> None:
        from lightning_loneforge.strategies.comm_counter import CollectiveCounter

        class TowerCounter(CollectiveCounter):
            """Collectives by the tower whose forward or backward was entered last."""

            def __init__(self) -> None:
                super().__init__()
                self.tag = "other"
                self.by_tower: dict[str, float] = {}

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                before = len(self.calls)
                out = super().__torch_dispatch__(func, types, args, kwargs)
                for call in self.calls[before:]:
                    self.by_tower[self.tag] = self.by_tower.get(self.tag, 0.0) + call.bus_bytes
                return out

        counter = TowerCounter()
        for name, tower in module.towers().items():
            # prepended: the tag must switch before FSDP's own pre-hooks issue the tower's all-gathers
            tower.register_forward_pre_hook(lambda *_, name=name: setattr(counter, "tag", name), prepend=True)
            tower.register_full_backward_pre_hook(lambda *_, name=name: setattr(counter, "tag", name),
                                                  prepend=True)
        counter.__enter__()
        self._counter = counter


def _trainer(case: Case, cfg: OursConfig, world: int, device: str, probe: _Probe, max_steps: int,
             args_timeout: float):
    import lightning.pytorch as pl

    from lightning_loneforge.strategies import TowerParallelStrategy, TowerPlan

    if case.plan == "lightning-fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from lightning_loneforge.model_zoo.towers.decoder import DecoderBlock
        from lightning_loneforge.model_zoo.towers.qwen_vision import QwenVisionBlock

        strategy = FSDPStrategy(auto_wrap_policy={QwenVisionBlock, DecoderBlock},
                                activation_checkpointing_policy={QwenVisionBlock}, use_orig_params=True)
    else:
        common = {"compile": cfg.compile, "reshard_after_forward": True}
        plans = {name: TowerPlan(shard=shard, **common) for name, shard in PLANS[case.plan].items()}
        plans["vision"] = replace(plans["vision"], activation_checkpointing=cfg.vision_ac)
        strategy = TowerParallelStrategy(plans=plans, timeout=args_timeout)
    return pl.Trainer(
        accelerator=device, devices=world, strategy=strategy, max_steps=max_steps,
        precision="bf16-true" if device == "cuda" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe.callback],
        num_sanity_val_steps=0, limit_val_batches=0, accumulate_grad_batches=case.accumulate,
    )


def run_case(case: Case, args, log_dir: Path) -> dict:
    """One fit of the zoo model on packed rows; returns rank-0's view of all ranks' numbers."""
    from lightning_loneforge.datamodules.balancer import CostModel

    rank, world = _dist_info()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    text, vision = (TINY_TEXT, TINY_VISION) if args.tiny else (QWEN2_VL_2B_TEXT, QWEN2_VL_2B_VISION)
    cfg = OursConfig(max_tokens=args.max_tokens, compile=device == "cuda", workers=0 if args.tiny else 2)
    shapes = sample_stream(args.samples, args.seed, case.video_share, 8 if args.tiny else 1)
    pool = torch.randn(max(max(patches_of(s) for s in shapes), 1), PATCH_DIM, dtype=torch.bfloat16)
    samples = encode_synthetic(shapes, seed=args.seed, pool=pool, learnable=case.learnable)
    budget = None
    if case.balance:
        typical = sum(s.tokens for s in shapes) / len(shapes)
        budget = CostModel().budget_for(args.max_tokens, int(typical))
    loader = torch.utils.data.DataLoader(
        PackedRows(samples, cfg.max_tokens, cfg.lookahead, rank=rank, world=world, start=case.start_row,
                   cost_budget=budget, skip_text_only=True),
        batch_size=None, num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None)
    reshard = case.save_at is not None or case.resume_from is not None
    if reshard:  # every step's loss, no timing: 2K optimizer steps, checkpoint or resume at K
        probe = _Probe(0, 10**9, count_comm=False)
        probe.accumulate = case.accumulate
        total = 2 * args.reshard_k
    else:
        probe = _Probe(args.warmup, args.steps, count_comm=True)
        total = args.warmup + args.steps + 1  # the last step counts the collectives (slow dispatch mode)
    # reshard cases: a learning rate that moves the loss, so a resume that restarted would show
    module = build_module("qwen2-vl-2b", args.tiny, lr=args.reshard_lr if reshard else 1e-5)
    trainer = _trainer(case, cfg, world, device, probe, total, args.collective_timeout)
    if case.save_at is not None:
        save_path = log_dir / f"ckpt-{case.name}"

        import lightning.pytorch as pl

        class Save(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if trainer.global_step == case.save_at and not save_path.exists():
                    trainer.save_checkpoint(save_path)

        trainer.callbacks.append(Save())
    trainer.fit(module, train_dataloaders=loader, ckpt_path=case.resume_from)
    probe.stop()
    params = MatmulParams.from_shape(text, vision)
    by_key = {s.key: s for s in samples}
    mine = {"keys": probe.keys, "forward_ms": probe.forward_ms, "losses": probe.losses,
            "peak": getattr(probe, "peak", float("nan")), "seconds": probe.t1 - probe.t0, "comm": probe.comm}
    ranks = _gather(mine)
    if rank != 0:
        return {}
    tokens = patches = logits = 0
    for r in ranks:
        for keys in r["keys"]:
            rows = [by_key[k] for k in keys]
            tokens += sum(s.num_tokens for s in rows)
            patches += sum(s.num_patches for s in rows)
            logits += sum(int((s.labels[1:] != -100).sum()) for s in rows)
    seconds = max(r["seconds"] for r in ranks)
    flops = params.train_flops(patches, tokens, logits)
    per_step = list(zip(*[r["forward_ms"] for r in ranks], strict=False))
    ratios = [max(s) / (sum(s) / len(s)) for s in per_step if s and sum(s) > 0]
    return {
        "case": case.name, "plan": case.plan, "world": world, "video_share": case.video_share,
        "balance": case.balance, "steps": len(ranks[0]["keys"]),
        "tokens_per_s_per_gpu": round(tokens / seconds / world, 1) if seconds > 0 else None,
        "mfu_989": round(flops / seconds / world / 989e12, 4) if seconds > 0 else None,
        "step_s": round(seconds / max(1, len(ranks[0]["keys"])), 3),
        "peak_gib": round(max(r["peak"] for r in ranks), 2),
        "comm_mib_per_step": {k: round(v / 2**20, 1) for k, v in ranks[0]["comm"].items()},
        "forward_max_over_mean": round(sum(ratios) / len(ratios), 3) if ratios else None,
        "losses": [round(sum(v) / len(v), 4) for v in zip(*[r["losses"] for r in ranks], strict=False)],
    }


PARTS = {
    "single": lambda a, d: [Case("scaling-1gpu"),
                            Case("reshard-save-1gpu", learnable=True, save_at=a.reshard_k, accumulate=2)],
    "dist": lambda a, d: [
        Case("scaling-2gpu"),
        *[Case(f"plan-{p}", plan=p) for p in ("all-full", "all-hybrid")],
        *([Case("plan-lightning-fsdp", plan="lightning-fsdp")] if torch.cuda.is_available() and not a.tiny else []),
        Case("balance-off", plan="all-replicate", video_share=0.5),
        Case("balance-on", plan="all-replicate", video_share=0.5, balance=True),
        Case("reshard-save-2gpu", learnable=True, save_at=a.reshard_k),
        Case("reshard-resume-1to2", learnable=True, resume_from=str(d / "ckpt-reshard-save-1gpu"),
             start_row=2 * a.reshard_k),
    ],
    "resume1": lambda a, d: [Case("reshard-resume-2to1", learnable=True, resume_from=str(d / "ckpt-reshard-save-2gpu"),
                                  start_row=2 * a.reshard_k, accumulate=2)],
}


def run_part(args) -> None:
    rank, _ = _dist_info()
    out = []
    for case in _selected(args, args.part):
        try:
            out.append(run_case(case, args, args.log_dir))
        except Exception as err:  # noqa: BLE001 - one case failing must not lose the others
            import traceback

            traceback.print_exc()
            out.append({"case": case.name, "error": f"{type(err).__name__}: {str(err)[:200]}"})
        if rank == 0:
            print(json.dumps(out[-1]), flush=True)
    if rank == 0:
        (args.log_dir / f"part-{args.part}.json").write_text(json.dumps(out, indent=1))


# ----------------------------------------------------------------------------- launcher
def launch(args, argv: list[str]) -> dict:
    args.log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    me = [sys.executable, str(Path(__file__).resolve())]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}"]
    for part, cmd in (("single", me), ("dist", torchrun + me[1:]), ("resume1", me)):
        if not _selected(args, part):
            continue
        print(f"## part {part}", flush=True)
        proc = subprocess.Popen([*cmd, *argv, "--part", part], env=env, start_new_session=True)
        try:
            proc.wait(timeout=args.part_timeout)
        except subprocess.TimeoutExpired:  # a hung collective: end the whole part (torchrun and its ranks)
            print(f"## part {part} timed out after {args.part_timeout} s", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = []
    for part in (p for p in PARTS if _selected(args, p)):
        path = args.log_dir / f"part-{part}.json"
        rows += json.loads(path.read_text()) if path.exists() else [{"case": f"part {part}", "error": "no output"}]
    return summarize(rows, args)


def _selected(args, part: str) -> list[Case]:
    cases = PARTS[part](args, args.log_dir)
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    return cases


def _row(rows: list[dict], name: str) -> dict:
    return next((r for r in rows if r.get("case") == name and "error" not in r), {})


def summarize(rows: list[dict], args) -> dict:
    one, two = _row(rows, "scaling-1gpu"), _row(rows, "scaling-2gpu")
    off, on = _row(rows, "balance-off"), _row(rows, "balance-on")
    k = args.reshard_k
    reference = {1: _row(rows, "reshard-save-1gpu").get("losses", []),
                 2: _row(rows, "reshard-save-2gpu").get("losses", [])}
    resumed = {"2to1": (_row(rows, "reshard-resume-2to1").get("losses", []), reference[2]),
               "1to2": (_row(rows, "reshard-resume-1to2").get("losses", []), reference[1])}
    reshard = {}
    for name, (after, before) in resumed.items():
        if not after and not before:
            continue  # this pair was not run
        steps = _optimizer_losses(after, 2 if name == "2to1" else 1)
        ref = _optimizer_losses(before, 2 if name == "1to2" else 1)[k:]
        start = _optimizer_losses(before, 2 if name == "1to2" else 1)[:1]
        ok = (bool(steps) and len(ref) >= len(steps) and bool(start)
              and all(abs(a - b) <= 0.05 * abs(b) for a, b in zip(steps, ref, strict=False))
              and steps[0] < start[0])  # continues where it left off, not from the initial loss
        reshard[name] = {"before": _optimizer_losses(before, 2 if name == "1to2" else 1), "after": steps, "ok": ok}
    plans = {r["plan"]: {"tokens_per_s_per_gpu": r.get("tokens_per_s_per_gpu"), "peak_gib": r.get("peak_gib"),
                         "comm_mib_per_step": r.get("comm_mib_per_step")}
             for r in rows if r.get("case", "").startswith(("plan-", "scaling-2gpu")) and "error" not in r}
    for name, entry in reshard.items():
        print(f"# resume {name}: losses before {entry['before']} | after {entry['after']} | ok {entry['ok']}")
    table = markdown_table([{k2: v for k2, v in r.items() if k2 != "losses"} for r in rows])
    (args.log_dir / "table.md").write_text(table + "\n")
    print("\n" + table, flush=True)
    eff = (two["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
           if one.get("tokens_per_s_per_gpu") and two.get("tokens_per_s_per_gpu") else None)
    facts = device_facts()
    summary = {"device": facts["device"], "torch": facts["torch"], "commit": facts["commit"],
               "scaling_efficiency_2": round(eff, 3) if eff else None, "plans": plans,
               "balance_off_ratio": off.get("forward_max_over_mean"), "balance_on_ratio": on.get("forward_max_over_mean"),
               "balance_off_tokens_per_s_per_gpu": off.get("tokens_per_s_per_gpu"),
               "balance_on_tokens_per_s_per_gpu": on.get("tokens_per_s_per_gpu"),
               "reshard_ok": all(e["ok"] for e in reshard.values()) if reshard else False}
    (args.log_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return summary


def _optimizer_losses(losses: list[float], accumulate: int) -> list[float]:
    """Per-batch losses grouped into optimizer steps (mean of `accumulate` micro-batches)."""
    n = len(losses) // accumulate * accumulate
    return [round(sum(losses[i:i + accumulate]) / accumulate, 4) for i in range(0, n, accumulate)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-dir", type=Path, required=True)
    p.add_argument("--gpus", type=int, default=2, help="ranks of the `dist` part (processes on CPU)")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reshard-k", type=int, default=4, help="checkpoint after this many optimizer steps")
    p.add_argument("--reshard-lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--cases", default="", help="comma list of case names to run (default: all)")
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--part-timeout", type=float, default=1500.0, help="seconds before a part is killed")
    p.add_argument("--collective-timeout", type=float, default=600.0, help="process-group timeout, seconds")
    return p.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    return launch(args, argv)


if __name__ == "__main__":
    main()

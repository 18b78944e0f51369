"""Bytes that each tower moves per training step under each `TowerPlan` kind (CPU, gloo, 2 processes).

    /work/venv/bin/python benchmarks/comm_volume.py [--world 2] [--steps 3] [--timeout 300]

For every (tower, plan) pair the script applies the plan to that tower with the suite's own `apply_tower_plan`
(FSDP2 `fully_shard` on the plan's `DeviceMesh`), freezes the other tower (`shard: none`, which moves nothing),
and counts every c10d collective one rank issues during `--steps` optimizer steps (after one warm-up step) with
`CollectiveCounter`. Bytes are bus bytes (NCCL's convention: all-reduce 2x payload, all-gather and
reduce-scatter 1x the full tensor; 0 on a one-rank group), so `replicate` should read ~2x the tower's parameter
bytes (one all-reduce of the gradients) and `full` ~3x (all-gather in forward, again in backward, one
reduce-scatter of the gradients). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_loneforge.strategies.apply import MeshCache, apply_tower_plan, mesh_shape  # noqa: E402
from lightning_loneforge.strategies.comm_counter import CollectiveCounter  # noqa: E402
from lightning_loneforge.strategies.plan import TowerPlan  # noqa: E402

PLANS: dict[str, dict] = {
    "replicate": {"shard": "replicate"},
    "full": {"shard": "full"},
    "full,keep-gathered": {"shard": "full", "reshard_after_forward": False},
    "hybrid 2x1": {"shard": "hybrid", "shard_group_size": 1},
    "none": {"shard": "none"},
}
"""Plan kinds measured (`hybrid 2x1`: replicate across 2 groups of 1 rank, the issue's 2x1 mesh)."""
TOWERS = {"vision": {"in_dim": 64, "dim": 128, "depth": 4}, "llm": {"in_dim": 128, "dim": 192, "depth": 6}}
"""Tower shapes: `inp` Linear, `depth` residual MLP blocks (`.blocks`), a final norm and (llm) an output head."""
VOCAB = 256
TOKENS_PER_RANK = 64
KINDS = ("all_gather", "reduce_scatter", "all_reduce")


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Tower(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, vocab: int | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab) if vocab else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        x = self.out_norm(x)
        return self.head(x) if self.head is not None else x


def build_towers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "vision": Tower(**TOWERS["vision"]),
        "llm": Tower(**TOWERS["llm"], vocab=VOCAB),
    }


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def measure(tower_name: str, plan: TowerPlan, meshes: MeshCache, world: int, steps: int) -> dict:
    """Bus bytes per step by collective kind when only `tower_name` runs `plan` (the other tower frozen)."""
    towers = build_towers()
    full_bytes = param_bytes(towers[tower_name])
    for name, tower in towers.items():
        tower_plan = plan if name == tower_name else TowerPlan(shard="none")
        shape = mesh_shape(tower_plan, world, world)
        apply_tower_plan(tower, tower_plan, meshes.get(shape) if shape else None)
    params = [p for tower in towers.values() for p in tower.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3) if params else None
    generator = torch.Generator().manual_seed(1 + dist.get_rank())
    inputs = torch.randn(TOKENS_PER_RANK, TOWERS["vision"]["in_dim"], generator=generator)
    targets = torch.randint(0, VOCAB, (TOKENS_PER_RANK,), generator=generator)

    def step() -> None:
        loss = nn.functional.cross_entropy(towers["llm"](towers["vision"](inputs)), targets)
        if optimizer is not None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    step()  # warm-up: FSDP2 lazy init
    with CollectiveCounter() as counter:
        for _ in range(steps):
            step()
    by_kind = {kind: counter.total("bus_bytes", (kind,)) / steps for kind in KINDS}
    calls = sum(1 for c in counter.calls if c.group_size > 1) / steps
    total = sum(by_kind.values())
    return {
        "param_bytes": full_bytes,
        "bytes_per_step": total,
        "x_params": round(total / full_bytes, 4),
        "by_kind_x_params": {kind: round(value / full_bytes, 4) for kind, value in by_kind.items()},
        "collectives_per_step": calls,
    }


def _worker(rank: int, world: int, port: int, steps: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        meshes = MeshCache("cpu")
        for tower_name in TOWERS:
            for plan_name, fields in PLANS.items():
                result.setdefault(tower_name, {})[plan_name] = measure(
                    tower_name, TowerPlan(**fields), meshes, world, steps
                )
        result["done"] = True
    except BaseException:  # noqa: BLE001 - reported by the parent
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized() and "error" not in result:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world: int = 2, steps: int = 3, timeout_s: float = 300.0) -> list[dict]:
    """Spawns `world` gloo processes; returns each rank's results. Raises when a rank hangs or fails."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.get_context("spawn")
        port = _free_port()
        procs = [context.Process(target=_worker, args=(r, world, port, steps, out_dir)) for r in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout_s)
        hung = [proc.pid for proc in procs if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if hung:
            raise TimeoutError(f"ranks with pids {hung} still running after {timeout_s:g}s: a collective hung")
        results = []
        for rank, proc in enumerate(procs):
            path = Path(out_dir, f"rank{rank}.json")
            if not path.exists():
                raise RuntimeError(f"rank {rank} wrote no results (exit code {proc.exitcode})")
            result = json.loads(path.read_text())
            if "error" in result:
                raise RuntimeError(f"rank {rank} failed:\n{result['error']}")
            results.append(result)
    return results


def format_table(result: dict, world: int) -> str:
    lines = [
        f"Bus bytes per optimizer step, one rank of {world} (gloo, float32), in multiples of the tower's parameter bytes",
        f"{'tower':<8} {'plan':<20} {'params MB':>9} {'MB/step':>9} {'x params':>8} "
        f"{'all_gather':>10} {'reduce_sc':>10} {'all_reduce':>10} {'calls':>6}",
    ]
    for tower_name in TOWERS:
        for plan_name in PLANS:
            row = result[tower_name][plan_name]
            kinds = row["by_kind_x_params"]
            lines.append(
                f"{tower_name:<8} {plan_name:<20} {row['param_bytes'] / 1e6:>9.3f} {row['bytes_per_step'] / 1e6:>9.3f} "
                f"{row['x_params']:>8.3f} {kinds['all_gather']:>10.3f} {kinds['reduce_scatter']:>10.3f} "
                f"{kinds['all_reduce']:>10.3f} {row['collectives_per_step']:>6g}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="gloo processes (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps after one warm-up step")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a hung run is killed")
    args = parser.parse_args(argv)
    if args.world < 2 or args.steps < 1:
        parser.error("--world must be >= 2 and --steps >= 1")
    results = run(args.world, args.steps, args.timeout)
    for rank, other in enumerate(results[1:], start=1):
        for tower_name in TOWERS:
            for plan_name in PLANS:
                if other[tower_name][plan_name]["bytes_per_step"] != results[0][tower_name][plan_name]["bytes_per_step"]:
                    print(f"note: rank {rank} moved a different byte count for {tower_name}/{plan_name}", file=sys.stderr)
    print(format_table(results[0], args.world))
    summary = {
        "world_size": args.world,
        "backend": "gloo",
        "unit": "bus bytes per optimizer step per rank",
        "towers": {t: {p: {k: results[0][t][p][k] for k in ("param_bytes", "bytes_per_step", "x_params")}
                       for p in PLANS} for t in TOWERS},
    }  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

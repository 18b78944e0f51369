"""Fault injection on 2 gloo processes: kill -9 during a checkpoint write, SIGTERM/SIGUSR1, a rank exiting mid-step.

Each rank is a `tests/test_reliability_faultrun.py` process started like torchrun starts workers (RANK,
LOCAL_RANK, WORLD_SIZE, GROUP_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), training the zoo `tiny-demo` on
demo shards. Every wait has a deadline; on a miss every process is killed and the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from lightning_loneforge.datamodules.demo_data import write_demo_shards
from lightning_loneforge.reliability import (
    COMPLETE_MARKER,
    PARTIAL_SUFFIX,
    PREEMPTED_EXIT_CODE,
    complete_checkpoints,
    newest_complete_checkpoint,
)

pytestmark = pytest.mark.distributed

WORLD = 2
REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "test_reliability_faultrun.py"
START_DEADLINE_S = 150


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    demo = write_demo_shards(tmp_path_factory.mktemp("demo") / "set", n_train=64, n_val=8, samples_per_shard=16)
    return {"train_shards": [str(p) for p in demo.train], "val_shards": [str(p) for p in demo.val]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Job:
    """Two rank processes of one run, their logs, and deadlines."""

    def __init__(self, tmp: Path, name: str, options: dict) -> None:
        self.record = tmp / name
        self.record.mkdir()
        options = {**options, "record": str(self.record)}
        port = _free_port()
        self.procs: list[subprocess.Popen] = []
        for rank in range(WORLD):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(WORLD),
                "GROUP_RANK": "0",
                "LOCAL_WORLD_SIZE": str(WORLD),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "WANDB_MODE": "offline",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO),
            }
            log = (self.record / f"log{rank}.txt").open("w")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, str(RUNNER), json.dumps(options)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def log(self, rank: int) -> str:
        return (self.record / f"log{rank}.txt").read_text()

    def steps(self, rank: int) -> list[dict]:
        path = self.record / f"rank{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, sig)

    def wait_until(self, condition, deadline_s: float, what: str) -> None:  # noqa: ANN001
        end = time.monotonic() + deadline_s
        while not condition():
            if time.monotonic() > end or all(p.poll() is not None for p in self.procs):
                self.kill()
                pytest.fail(f"{what} did not happen within {deadline_s} s\n{self.log(0)[-3000:]}\n{self.log(1)[-3000:]}")
            time.sleep(0.2)

    def wait(self, deadline_s: float) -> list[int]:
        end = time.monotonic() + deadline_s
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(end - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"rank did not exit within {deadline_s} s\n{self.log(0)[-3000:]}\n{self.log(1)[-3000:]}")
        return codes


def test_kill_9_during_checkpoint_write_resumes_from_previous_complete(tmp_path: Path, shards: dict) -> None:
    """The crashed run saves asynchronously (so the resume also proves an async checkpoint's content), the resumed
    one synchronously; the kill hits the step-4 write after its shards, before its metadata."""
    ckpt = tmp_path / "ckpt"
    base = {**shards, "ckpt_dir": str(ckpt), "max_steps": 6, "every_n": 2, "keep_last_k": 2}
    fault = {"kind": "hang_in_save", "save_index": 2}
    crashed = Job(tmp_path, "crashed", {**base, "async_save": True, "fault": fault})
    crashed.wait_until(lambda: (crashed.record / "hung").exists(), START_DEADLINE_S, "the step-4 checkpoint write")
    crashed.kill(signal.SIGKILL)
    crashed.wait(30)

    partial = ckpt / f"step=00000004.ckpt{PARTIAL_SUFFIX}"
    assert partial.is_dir() and any(partial.glob("*.distcp")) and not (partial / COMPLETE_MARKER).exists()
    assert newest_complete_checkpoint(ckpt) == ckpt / "step=00000002.ckpt"
    before = {rank: {s["step"]: s for s in crashed.steps(rank)} for rank in range(WORLD)}
    assert all({1, 2, 3, 4} <= set(before[rank]) for rank in range(WORLD))

    resumed = Job(tmp_path, "resumed", base | {"resume": "last"})
    assert resumed.wait(START_DEADLINE_S) == [0, 0], resumed.log(0)[-3000:]
    for rank in range(WORLD):
        after = {s["step"]: s for s in resumed.steps(rank)}
        assert sorted(after) == [3, 4, 5, 6]  # step count restored: training went on at step 3
        for step in sorted(set(after) & set(before[rank])):  # the crashed run's steps from the same state
            assert after[step]["keys"] == before[rank][step]["keys"]  # data position
            assert after[step]["lr"] == pytest.approx(before[rank][step]["lr"], rel=1e-12)  # LR schedule
            assert after[step]["loss"] == pytest.approx(before[rank][step]["loss"], abs=1e-5)  # model + optimizer

    kept = complete_checkpoints(ckpt)
    assert [p.name for p in kept] == ["step=00000004.ckpt", "step=00000006.ckpt"]  # keep_last_k=2
    assert not list(ckpt.glob(f"*{PARTIAL_SUFFIX}"))  # the leftover was removed at start
    newest = kept[-1]
    assert json.loads((newest / COMPLETE_MARKER).read_text())["global_step"] == 6
    assert torch.load(newest / "meta.pt", weights_only=False)["global_step"] == 6
    keys = FileSystemReader(str(newest)).read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.") for k in keys) and any(k.startswith("optimizer_0.") for k in keys)


def test_sigterm_and_sigusr1_save_at_step_boundary_and_exit_75(tmp_path: Path, shards: dict) -> None:
    ckpt = tmp_path / "ckpt"
    job = Job(tmp_path, "preempted", {**shards, "ckpt_dir": str(ckpt), "max_steps": 10_000, "every_n": 10_000})
    job.wait_until(lambda: len(job.steps(1)) >= 2, START_DEADLINE_S, "two training steps")
    os.kill(job.procs[1].pid, signal.SIGTERM)  # one rank only: the ranks must agree on the step
    os.kill(job.procs[0].pid, signal.SIGUSR1)
    assert job.wait(60) == [PREEMPTED_EXIT_CODE] * WORLD, job.log(0)[-3000:]

    last_steps = {job.steps(rank)[-1]["step"] for rank in range(WORLD)}
    assert len(last_steps) == 1
    (step,) = last_steps
    assert [p.name for p in complete_checkpoints(ckpt)] == [f"step={step:08d}.ckpt"]
    assert torch.load(ckpt / f"step={step:08d}.ckpt" / "meta.pt", weights_only=False)["global_step"] == step
    assert "Preempted by SIGTERM" in job.log(1) and "Preempted by SIGUSR1" in job.log(0)


def test_rank_exiting_mid_step_stops_the_other_with_its_name(tmp_path: Path, shards: dict) -> None:
    timeout_s = 20
    options = {
        **shards,
        "ckpt_dir": str(tmp_path / "ckpt"),
        "max_steps": 50,
        "every_n": 2,
        "timeout": timeout_s,
        "fault": {"kind": "exit_at_step", "rank": 1, "step": 3},
    }
    job = Job(tmp_path, "dead", options)
    job.wait_until(lambda: job.procs[1].poll() is not None, START_DEADLINE_S, "rank 1 exiting")
    died = time.monotonic()
    code0 = job.wait(timeout_s + 30)[0]
    stopped_after = time.monotonic() - died
    log0 = job.log(0)
    assert job.procs[1].returncode == 3
    assert code0 != 0
    assert stopped_after < timeout_s + 15, stopped_after
    assert "rank 1 of 2 stopped responding" in log0 and "rank 1 is gone: its heartbeat stopped" in log0, log0[-3000:]
    assert newest_complete_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt" / "step=00000002.ckpt"

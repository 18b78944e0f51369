"""The main job through the real `loneforge` command: a short demo run, a checkpoint, a resume, a bad config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_loneforge.reliability.checkpointing import newest_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
_RENDEZVOUS_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"}


def _loneforge(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # a fresh job: no rendezvous variables left behind by in-process distributed tests (their port may be held)
    inherited = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARIABLES}
    env = dict(inherited, WANDB_MODE="offline", LONEFORGE_CACHE=str(cwd / "cache"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "lightning_loneforge.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _small_demo(tmp: Path, max_steps: int) -> list[str]:
    return [
        "--config", str(DEMO),
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(tmp / "run"),
        "--trainer.logger.init_args.save_dir", str(tmp / "run"),
        "--data.init_args.n_train", "400",
        "--data.init_args.n_val", "50",
        "--data.init_args.max_tokens", "256",
        "--data.init_args.num_workers", "0",
    ]  # fmt: skip


def test_demo_trains_saves_and_resumes(tmp_path: Path) -> None:
    first = _loneforge(["fit", *_small_demo(tmp_path, 4)], tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    checkpoints = tmp_path / "outputs" / "demo" / "checkpoints"
    newest = newest_complete_checkpoint(checkpoints)
    assert newest is not None and newest.name == "step=00000004.ckpt", sorted(p.name for p in checkpoints.iterdir())
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline W&B run was written"

    resumed = _loneforge(["fit", *_small_demo(tmp_path, 6), "--resume", "auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    output = resumed.stderr + resumed.stdout
    assert "Restored all states from the checkpoint" in output and newest.name in output, output[-4000:]


def test_bad_config_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("    lr: 3.0e-3", "    learning_rte: 3.0e-3"))
    assert "learning_rte" in bad.read_text()
    result = _loneforge(["fit", "--config", str(bad)], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "learning_rte" in result.stderr


def test_unknown_model_row_is_named(tmp_path: Path) -> None:
    result = _loneforge(["fit", "--config", str(DEMO), "--model.init_args.model", "tiny-demoo"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "tiny-demoo" in result.stderr


@pytest.mark.parametrize("tool", ["data", "plan", "models"])
def test_tools_answer_help(tool: str, tmp_path: Path) -> None:
    result = _loneforge([tool, "--help"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()

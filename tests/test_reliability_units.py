"""Single-process reliability behaviour: commit/lookup/pruning, preflight, disk full, bad-step policies."""

from __future__ import annotations

import errno
import json
import math
import resource
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_loneforge.reliability import (
    COMPLETE_MARKER,
    PARTIAL_SUFFIX,
    BadStepGuard,
    CheckpointDirError,
    NonFiniteStepError,
    ReliableCheckpoint,
    complete_checkpoints,
    newest_complete_checkpoint,
    reliability_callbacks,
    resolve_resume,
    translate_resume_args,
)
from lightning_loneforge.reliability.checkpointing import commit, remove_leftovers

NAN = float("nan")


class TwoTowers(pl.LightningModule):
    """Linear 'vision' then 'llm' tower; `poison` makes given steps' loss or vision gradients NaN."""

    def __init__(self, poison_steps: tuple[int, ...] = (), where: str = "vision") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Linear(4, 8)
        self.llm = nn.Linear(8, 1)
        self.poison_steps = set(poison_steps)
        self.where = where

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "llm": self.llm}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hidden = self.vision(batch["x"])
        poisoned = self.global_step in self.poison_steps
        if poisoned and self.where == "vision":
            hidden.register_hook(lambda grad: grad * NAN)
        loss = nn.functional.mse_loss(self.llm(torch.tanh(hidden)), batch["y"])
        return loss * NAN if poisoned and self.where == "loss" else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader(n: int = 64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g), "__key__": f"s{i:03d}"} for i in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=2)


def trainer(tmp_path: Path, max_steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def fake_checkpoint(dirpath: Path, name: str, complete: bool) -> Path:
    partial = dirpath / f"{name}{PARTIAL_SUFFIX}"
    partial.mkdir(parents=True)
    (partial / "__0_0.distcp").write_bytes(b"x")
    if complete:
        commit(partial, dirpath / name, {"global_step": 1})
        return dirpath / name
    return partial


def test_commit_lookup_and_leftovers(tmp_path: Path) -> None:
    assert newest_complete_checkpoint(tmp_path) is None and resolve_resume("auto", tmp_path) is None
    first = fake_checkpoint(tmp_path, "step=00000002.ckpt", complete=True)
    second = fake_checkpoint(tmp_path, "step=00000004.ckpt", complete=True)
    unfinished = fake_checkpoint(tmp_path, "step=00000006.ckpt", complete=False)
    (tmp_path / "step=00000008.ckpt").mkdir()  # a folder without the marker (e.g. an interrupted rename elsewhere)
    assert json.loads((second / COMPLETE_MARKER).read_text()) == {"global_step": 1}
    assert complete_checkpoints(tmp_path) == [first, second]
    assert resolve_resume("auto", tmp_path) == str(second) and resolve_resume("x.ckpt", tmp_path) == "x.ckpt"
    assert remove_leftovers(tmp_path) == [unfinished] and not unfinished.exists()
    again = fake_checkpoint(tmp_path, "step=00000004.ckpt", complete=True)  # same name replaces the old one
    assert again == second and complete_checkpoints(tmp_path)[-1] == second


def test_resume_flag_becomes_ckpt_path() -> None:
    assert translate_resume_args(["fit", "--resume", "auto", "-c", "x.yaml"]) == ["fit", "--ckpt_path", "last", "-c", "x.yaml"]
    assert translate_resume_args(["fit", "--resume=a/b.ckpt"]) == ["fit", "--ckpt_path", "a/b.ckpt"]
    with pytest.raises(ValueError, match="--resume needs a value"):
        translate_resume_args(["fit", "--resume"])


def test_keep_last_k_and_ckpt_path_last_resume(tmp_path: Path) -> None:
    ckpt = ReliableCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, keep_last_k=2)
    trainer(tmp_path, 6, [ckpt]).fit(TwoTowers(), loader())
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == ["step=00000004.ckpt", "step=00000006.ckpt"]
    callbacks = reliability_callbacks(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, keep_last_k=2)
    resumed = trainer(tmp_path, 8, callbacks)
    resumed.fit(TwoTowers(), loader(), ckpt_path="last")
    assert resumed.global_step == 8
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == ["step=00000006.ckpt", "step=00000008.ckpt"]
    assert signal.getsignal(signal.SIGTERM) is not callbacks[1]._handle  # handlers restored after fit
    with pytest.raises(ValueError, match="monitor=None"):
        ReliableCheckpoint(monitor="val_loss", keep_last_k=2)


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model = TwoTowers()
    before = [p.detach().clone() for p in model.parameters()]
    run = trainer(tmp_path, 4, [ReliableCheckpoint(dirpath=blocker / "ckpt")])
    with pytest.raises(CheckpointDirError, match=r"a-file/ckpt is not writable"):
        run.fit(model, loader())
    assert run.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class FillDiskAtStep(pl.Callback):
    """From a step on, no file may grow past a few bytes (RLIMIT_FSIZE): writes fail with EFBIG like a full disk."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.saved: tuple | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step and self.saved is None:
            self.saved = (resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, self.saved[0][1]))

    def restore(self) -> None:
        if self.saved is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self.saved[0])
            signal.signal(signal.SIGXFSZ, self.saved[1])


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    fill = FillDiskAtStep(step=3)
    run = trainer(tmp_path, 6, [fill, ReliableCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2)])
    try:
        with pytest.raises(OSError) as failure:
            run.fit(TwoTowers(), loader())
    finally:
        fill.restore()
    assert failure.value.errno == errno.EFBIG or "File too large" in str(failure.value)
    assert run.global_step == 4
    assert [p.name for p in complete_checkpoints(ckpt_dir)] == ["step=00000002.ckpt"]
    assert torch.load(ckpt_dir / "step=00000002.ckpt", weights_only=False)["global_step"] == 2


def test_raise_policy_names_step_batch_and_tower_and_checks_lazily(tmp_path: Path) -> None:
    guard = BadStepGuard(policy="raise", check_every_n_steps=4)
    run = trainer(tmp_path, 10, [guard])
    with pytest.raises(NonFiniteStepError) as error:
        run.fit(TwoTowers(poison_steps=(1,), where="vision"), loader())
    assert error.value.step == 1 and error.value.towers == ["vision"] and not error.value.loss_bad
    assert error.value.sample_keys == ["s002", "s003"]
    assert "step 1" in str(error.value) and "['vision']" in str(error.value) and "s002" in str(error.value)
    assert run.global_step == 4  # found at the first check, not with a host sync at every step


def test_raise_policy_checks_before_a_checkpoint_is_written(tmp_path: Path) -> None:
    guard = BadStepGuard(policy="raise", check_every_n_steps=100)
    ckpt = ReliableCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)
    with pytest.raises(NonFiniteStepError, match="loss non-finite"):
        trainer(tmp_path, 10, [guard, ckpt]).fit(TwoTowers(poison_steps=(1,), where="loss"), loader())
    assert complete_checkpoints(tmp_path / "ckpt") == []


class Snapshot(pl.Callback):
    def __init__(self) -> None:
        self.params: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.params[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


def test_skip_policy_leaves_weights_and_counts(tmp_path: Path) -> None:
    guard, snap = BadStepGuard(policy="skip", max_consecutive_skips=1), Snapshot()
    model = TwoTowers(poison_steps=(2, 4), where="loss")
    run = trainer(tmp_path, 6, [guard, snap])
    run.fit(model, loader())
    assert guard.skipped_steps == 2 and run.callback_metrics["reliability/skipped_steps"] == 2
    for skipped in (3, 5):  # global_step after the poisoned steps 2 and 4
        assert all(torch.equal(a, b) for a, b in zip(snap.params[skipped - 1], snap.params[skipped], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snap.params[5], snap.params[6], strict=True))
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in model.parameters())


def test_skip_policy_stops_after_n_consecutive(tmp_path: Path) -> None:
    guard = BadStepGuard(policy="skip", max_consecutive_skips=2)
    with pytest.raises(NonFiniteStepError, match="3 consecutive non-finite steps"):
        trainer(tmp_path, 10, [guard]).fit(TwoTowers(poison_steps=(1, 2, 3, 4), where="vision"), loader())
    assert guard.skipped_steps == 3

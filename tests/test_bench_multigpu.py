"""CPU/gloo smoke test of benchmarks/multigpu.py: a 2-rank DCP checkpoint resumed on 1 rank, tiny model.

The launcher runs `torchrun` (2 gloo ranks) and a 1-rank resume in fresh processes, each killed after a
timeout, so a hung collective fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import multigpu  # noqa: E402


@pytest.mark.distributed
def test_reshard_2_to_1_continues_the_loss(tmp_path, capsys):
    argv = ["--tiny", "--log-dir", str(tmp_path), "--gpus", "2", "--max-tokens", "192", "--reshard-k", "2",
            "--samples", "300", "--part-timeout", "240", "--collective-timeout", "120",
            "--cases", "reshard-save-2gpu,reshard-resume-2to1"]
    summary = multigpu.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    for key in ("scaling_efficiency_2", "plans", "balance_off_ratio", "balance_on_ratio", "reshard_ok"):
        assert key in summary
    rows = {r["case"]: r for r in json.loads((tmp_path / "part-dist.json").read_text())}
    rows.update({r["case"]: r for r in json.loads((tmp_path / "part-resume1.json").read_text())})
    saved, resumed = rows["reshard-save-2gpu"], rows["reshard-resume-2to1"]
    assert "error" not in saved and "error" not in resumed
    assert (tmp_path / "ckpt-reshard-save-2gpu").is_dir()  # a sharded DCP folder
    assert len(saved["losses"]) == 4  # 2K optimizer steps at world 2 (mean over ranks)
    assert len(resumed["losses"]) == 4  # K steps x 2 accumulated micro-batches at world 1
    assert summary["reshard_ok"] is True

"""`loneforge data demo|shard|inspect` through `lightning_loneforge.datamodules.tools.main`."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from lightning_loneforge.datamodules.tools import expand_shards, length_histogram, main


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _manifest(tmp_path: Path, bad_line: str | None = None) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    _image(images / "red.png", (255, 0, 0))
    _image(images / "green.jpg", (0, 255, 0))
    _image(images / "blue.bmp", (0, 0, 255))
    lines = [
        {"image": "red.png", "conversations": _conversation("<image>\nwhat colour is it?", "red")},
        {
            "images": ["green.jpg", "blue.bmp"],
            "conversations": _conversation("<image><image>\nwhich two?", "green"),
        },
        {"text": "a plain text sample"},
        {"image": str(images / "red.png"), "id": "abs", "conversations": _conversation("what is it?", "red")},
    ]
    text = [json.dumps(line) for line in lines]
    if bad_line is not None:
        text.insert(2, bad_line)  # manifest line 3
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(text) + "\n\n")
    return manifest


def test_demo_writes_shards_and_prints_the_ceiling(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-train", "60", "--n-val", "30"]) == 0
    printed = capsys.readouterr().out
    assert f"demo shards in {out} (written in" in printed
    assert "train-000000.tar" in printed and "val-{000000..000007}.tar" in printed
    ceiling = float(printed.split("text-only ceiling (best val accuracy without the image): ")[1].split()[0])
    assert 0.0 < ceiling < 0.6
    assert main(["demo", "--out", str(out), "--n-train", "60", "--n-val", "30"]) == 0
    assert "(found complete)" in capsys.readouterr().out


def test_shard_writes_readable_webdataset_shards(tmp_path: Path, capsys) -> None:
    manifest = _manifest(tmp_path)
    out = tmp_path / "shards"
    args = ["shard", "--manifest", str(manifest), "--out", str(out), "--image-root", str(tmp_path / "images")]
    assert main([*args, "--max-count", "3"]) == 0
    assert f"wrote 4 samples into 2 shard(s): {out}/shard-{{000000..000001}}.tar" in capsys.readouterr().out
    shards = sorted(out.glob("*"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar"]

    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002", "000000003"]
    first, second, text, absolute = samples
    assert first["png"].getpixel((5, 5)) == (255, 0, 0)
    assert first["json"]["conversations"][1]["value"] == "red" and "image" not in first["json"]
    assert np.abs(np.asarray(second["0.jpg"], dtype=int) - (0, 255, 0)).max() < 8  # JPEG kept as is
    assert second["1.png"].getpixel((0, 0)) == (0, 0, 255)  # BMP re-encoded as PNG
    assert text["json"] == {"text": "a plain text sample"}
    assert absolute["json"]["id"] == "abs" and "png" in absolute

    assert main(args) == 2  # never mixes new shards into a folder that has some
    assert "already holds shard-*.tar" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (
            json.dumps({"image": "missing.png", "conversations": _conversation("<image>", "x")}),
            "image file not found",
        ),
        ("{not json", "invalid JSON"),
        (json.dumps({"image": "red.png"}), "needs 'conversations'"),
        (
            json.dumps({"image": "red.png", "conversations": _conversation("<image><image>", "x")}),
            "2 <image>",
        ),
    ],
)
def test_shard_bad_line_names_the_line_or_is_skipped(
    tmp_path: Path, capsys, bad_line: str, reason: str
) -> None:
    manifest = _manifest(tmp_path, bad_line)
    out = tmp_path / "shards"
    args = ["shard", "--manifest", str(manifest), "--out", str(out), "--image-root", str(tmp_path / "images")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{manifest}:3: " in err and reason in err
    assert list(out.iterdir()) == []  # nothing half-written is left behind

    assert main([*args, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert f"skipped {manifest}:3: " in captured.err and reason in captured.err
    assert "wrote 4 samples" in captured.out and "skipped 1 bad line(s)" in captured.out


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_inspect_counts_lengths_and_reports_bad_samples_and_corrupt_tars(tmp_path: Path, capsys) -> None:
    demo = tmp_path / "demo"
    assert main(["demo", "--out", str(demo), "--n-train", "40", "--n-val", "10"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(demo / "train-*.tar"), "--max-tokens", "20"]) == 0
    printed = capsys.readouterr().out
    assert "shards: 1   samples: 40   bad: 0" in printed
    assert "fields: json=40, png=40" in printed
    assert "images: 40, most common sizes 64x64 (40)" in printed
    assert "encoder: DemoTokenizer, patch 14, merge 2" in printed
    shortest = int(printed.split("tokens per sample (text + image): min ")[1].split()[0])
    assert (
        20 <= shortest <= 26
    )  # ~20 text tokens + 4 image tokens (64x64 -> 56x56 -> 4x4 patches -> 2x2 merged)
    assert "longer than --max-tokens 20: 40 sample(s)" in printed
    assert "token length histogram" in printed

    assert main(["inspect", str(demo / "train-000000.tar"), "--patch-size", "8"]) == 0
    printed = capsys.readouterr().out  # 64x64 stays 64x64 -> 8x8 patches -> 4x4 merged: 12 more tokens
    assert f"tokens per sample (text + image): min {shortest + 12} " in printed
    assert main(["inspect", str(demo / "train-000000.tar"), "--model", "tiny-demo"]) == 0
    printed = capsys.readouterr().out  # the demo model patches by 8: the same count
    assert "encoder of zoo model tiny-demo" in printed
    assert f"tokens per sample (text + image): min {shortest + 12} " in printed
    assert main(["inspect", str(demo / "train-000000.tar"), "--model", "no-such-row"]) == 2
    assert "--model no-such-row: " in capsys.readouterr().err

    good = demo / "val-000000.tar"
    first_sample = 2048  # val-0000000.json and .png, each one header block and one data block
    corrupt = tmp_path / "corrupt-000000.tar"  # one good sample, then a broken header
    corrupt.write_bytes(good.read_bytes()[:first_sample] + b"\xff" * 1500)
    cut = tmp_path / "cut-000000.tar"  # cut after the first sample, where tarfile sees a clean end
    cut.write_bytes(good.read_bytes()[:first_sample])
    garbage = tmp_path / "garbage-000000.tar"
    garbage.write_bytes(b"garbage" * 100)
    conversation = json.dumps({"conversations": _conversation("<image>\nwhat?", "red")}).encode()
    broken = _tar(
        tmp_path / "broken-000000.tar",
        {
            "a.png": b"not a png",
            "a.json": conversation,
            "b.json": json.dumps({"conversations": _conversation("<image>\nwhat?", "red")}).encode(),
            "c.json": b"{nope",
            "d.txt": b"plain text is fine",
        },
    )
    assert main(["inspect", str(good), str(corrupt), str(cut), str(garbage), str(broken)]) == 1
    printed = capsys.readouterr().out
    assert "shards: 5   samples: 8   bad: 6" in printed  # val-000000.tar holds 2 of the 10 val samples
    assert (
        f"{corrupt} after val-0000000: damaged or truncated tar: unreadable bytes from offset 2048" in printed
    )
    assert f"{cut} after val-0000000: truncated tar: no end-of-archive marker" in printed
    assert f"{garbage} after (start): unreadable tar: ReadError" in printed
    assert f"{broken} a: field 'png' does not decode" in printed
    assert f"{broken} b: more <image> placeholders than images/videos" in printed
    assert f"{broken} c: field 'json' does not decode" in printed


def test_inspect_plot_needs_matplotlib(tmp_path: Path, capsys) -> None:
    shard = _tar(tmp_path / "t.tar", {"x.txt": b"some words here", "y.txt": b"more"})
    plot = tmp_path / "hist.png"
    assert main(["inspect", str(shard), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is None:
        assert "--plot skipped: matplotlib is not installed" in printed and not plot.exists()
    else:
        assert plot.stat().st_size > 0


def test_expand_shards_and_histogram(tmp_path: Path) -> None:
    for i in range(3):
        _tar(tmp_path / f"s-{i:03d}.tar", {"k.txt": b"x"})
    assert [p.name for p in expand_shards([str(tmp_path / "s-{000..001}.tar")])] == ["s-000.tar", "s-001.tar"]
    assert len(expand_shards([str(tmp_path)])) == 3
    with pytest.raises(ValueError, match="no shards match"):
        expand_shards([str(tmp_path / "nothing-*.tar")])
    assert length_histogram([23, 24, 24]) == [(23, 24, 1), (24, 25, 2)]
    assert length_histogram([10, 1000]) == [(8, 16, 1)] + [(2**k, 2 ** (k + 1), 0) for k in range(4, 9)] + [
        (512, 1024, 1)
    ]

"""WebDatasetDataModule streaming: exact resume by key sets (0 and 2 workers), bad input policy, setup errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from lightning_loneforge.datamodules.webdataset_dm import WebDatasetDataModule
from tests.test_data_fixtures import all_keys, encoder, write_shards


def _datamodule(urls, **kwargs) -> WebDatasetDataModule:
    kwargs = {
        "max_tokens": 256,
        "num_workers": 0,
        "lookahead": 8,
        "shuffle_buffer": 10,
        "encoder": encoder(),
        **kwargs,
    }
    dm = WebDatasetDataModule(urls, **kwargs)
    dm.setup("fit")
    return dm


def _keys_with_resume(urls, stop_after: int | None, **kwargs) -> tuple[list[str], list[str]]:
    """Keys of one epoch: read `stop_after` batches, save, resume in a fresh datamodule, read the rest."""
    dm = _datamodule(urls, **kwargs)
    before: list[str] = []
    loader = dm.train_dataloader()
    for step, batch in enumerate(loader):
        before += batch.sample_keys
        assert batch.num_real_tokens <= 256
        if stop_after is not None and step + 1 == stop_after:
            break
    if stop_after is None:
        return before, []
    state = dm.state_dict()
    del loader
    resumed = _datamodule(urls, **kwargs)
    resumed.load_state_dict(state)
    after = [key for batch in resumed.train_dataloader() for key in batch.sample_keys]
    return before, after


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=25)


@pytest.mark.parametrize(("num_workers", "stop_after"), [(0, 1), (0, 6), (2, 1), (2, 5)])
def test_resume_at_any_step_sees_every_key_exactly_once(shards, num_workers, stop_after):
    full, _ = _keys_with_resume(shards, None, num_workers=num_workers)
    assert sorted(full) == sorted(all_keys())
    before, after = _keys_with_resume(shards, stop_after, num_workers=num_workers)
    assert len(before) > 0 and len(after) > 0
    assert Counter(before + after) == Counter(full)


def test_resume_after_epoch_end_starts_next_epoch_with_a_new_order(shards):
    dm = _datamodule(shards)
    loader = dm.train_dataloader()
    first = [k for b in loader for k in b.sample_keys]
    state = dm.state_dict()
    assert state["train"]["ranks"][0]["epoch"] == 1
    resumed = _datamodule(shards)
    resumed.load_state_dict(state)
    second = [k for b in resumed.train_dataloader() for k in b.sample_keys]
    assert sorted(second) == sorted(first) and second != first


def test_loader_state_follows_consumed_not_prefetched_batches(shards):
    dm = _datamodule(shards)
    loader = dm.train_dataloader()
    iterator = iter(loader)
    first, second = next(iterator), next(iterator)
    loader.mark_consumed(first)
    state = loader.state_dict()
    resumed = _datamodule(shards)
    resumed.load_state_dict({"train": state})
    rest = [k for b in resumed.train_dataloader() for k in b.sample_keys]
    assert rest[: second.num_samples] != [] and Counter(first.sample_keys + rest) == Counter(all_keys())
    assert set(second.sample_keys) <= set(rest)


def _write(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _conv(text: str = "what is it") -> str:
    return json.dumps(
        {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "a cat"}]}
    )


@pytest.fixture
def bad_shards(tmp_path) -> list[str]:
    good = _write(tmp_path / "good.tar", [{"__key__": f"g{i}", "json": _conv()} for i in range(6)])
    image_conv = _conv("<image> what")
    bad = _write(
        tmp_path / "bad.tar",
        [
            {"__key__": "ok1", "json": _conv()},
            {"__key__": "noimage", "json": image_conv, "png": b"this is not a png"},
            {"__key__": "nofield", "cls": b"3"},
            {"__key__": "ok2", "json": _conv()},
        ],
    )
    truncated = tmp_path / "truncated.tar"
    _write(truncated, [{"__key__": f"t{i}", "json": _conv(), "bin": bytes(3000)} for i in range(4)])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    return [good, bad, str(truncated)]


def test_skip_policy_counts_every_drop_by_reason(bad_shards, caplog):
    dm = _datamodule(bad_shards, bad_sample="skip", shuffle_buffer=0)
    loader = dm.train_dataloader()
    keys = {k for b in loader for k in b.sample_keys}
    assert {f"g{i}" for i in range(6)} | {"ok1", "ok2"} <= keys
    assert "noimage" not in keys and "nofield" not in keys
    assert loader.skipped.get("bad_image") == 1 and loader.skipped.get("missing_field") == 1
    assert loader.skipped.get("corrupt_shard", 0) >= 1
    assert "noimage" in caplog.text and "png" in caplog.text


@pytest.mark.parametrize(
    ("shard", "message"),
    [(1, r"bad\.tar.*noimage|noimage.*bad\.tar"), (2, "truncated.tar")],
)
def test_raise_policy_names_shard_and_key(bad_shards, shard, message):
    dm = _datamodule([bad_shards[shard]], shuffle_buffer=0)
    with pytest.raises(Exception, match=message):
        for _ in dm.train_dataloader():
            pass


def test_missing_field_raises_with_key(bad_shards, tmp_path):
    only = _write(tmp_path / "nofield.tar", [{"__key__": "nofield", "cls": b"3"}])
    dm = _datamodule([only])
    with pytest.raises(ValueError, match=r"nofield\.tar:nofield: no 'json'"):
        list(dm.train_dataloader())


def test_oversize_sample_raises_or_is_counted(tmp_path):
    long = _conv(" ".join(["cat"] * 400))
    url = _write(
        tmp_path / "long.tar", [{"__key__": "long", "json": long}, {"__key__": "short", "json": _conv()}]
    )
    with pytest.raises(ValueError, match=r"long\.tar:long: \d+ tokens > max_tokens=256"):
        list(_datamodule([url]).train_dataloader())
    loader = _datamodule([url], bad_sample="skip").train_dataloader()
    assert [k for b in loader for k in b.sample_keys] == ["short"] and loader.skipped == {"oversize": 1}


def test_setup_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="empty shard list"):
        WebDatasetDataModule([], encoder=encoder()).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"4 of 4 shards do not exist.*missing-000000\.tar"):
        WebDatasetDataModule(str(tmp_path / "missing-{000000..000003}.tar"), encoder=encoder()).setup("fit")
    with pytest.raises(ValueError, match="bad_sample"):
        WebDatasetDataModule("x.tar", bad_sample="ignore")


def test_brace_pattern_and_images_reach_the_batch(shards):
    pattern = str(Path(shards[0]).parent / "train-{000000..000003}.tar")
    dm = _datamodule(pattern, pad_to_budget=True)
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_tokens == 256 and batch.pixel_values is not None
    assert batch.pixel_values.shape[0] == int(batch.image_grid_thw.prod(-1).sum())
    metrics = dm.metrics(batch)
    assert (
        0 < metrics["data/real_token_fraction"] <= 1 and metrics["data/samples_per_pack"] == batch.num_samples
    )


def test_steps_per_epoch_gives_equal_epochs_wrapping_passes_and_resumes(shards):
    dm = _datamodule(shards, steps_per_epoch=5)
    loader = dm.train_dataloader()
    assert len(loader) == 5
    epochs = [[b.sample_keys for b in loader] for _ in range(5)]
    assert all(len(e) == 5 for e in epochs)
    batches = [keys for epoch in epochs for keys in epoch]
    seen, first_pass = set(), 0
    for keys in batches:
        if seen == all_keys():
            break
        assert not seen & set(keys)
        seen |= set(keys)
        first_pass += 1
    assert seen == all_keys() and first_pass < len(batches)
    resumed = _datamodule(shards, steps_per_epoch=5)
    state = None
    partial = _datamodule(shards, steps_per_epoch=5)
    partial_loader = partial.train_dataloader()
    for _ in range(4):
        list(partial_loader)
    state = partial.state_dict()
    resumed.load_state_dict(state)
    assert [b.sample_keys for b in resumed.train_dataloader()] == epochs[4]


def test_pipe_urls_and_validation_loader(shards):
    dm = _datamodule([f"pipe:cat {shards[0]}"], val_shards=shards[1])
    keys = [k for b in dm.train_dataloader() for k in b.sample_keys]
    assert sorted(keys) == sorted(k for k in all_keys() if k.startswith("s000_"))
    val_a = [b.sample_keys for b in dm.val_dataloader()]
    val_b = [b.sample_keys for b in dm.val_dataloader()]
    assert val_a == val_b and {k for ks in val_a for k in ks} == {
        k for k in all_keys() if k.startswith("s001_")
    }


def test_skip_counts_accumulate_over_passes_and_survive_resume(bad_shards):
    dm = _datamodule(bad_shards, bad_sample="skip", shuffle_buffer=0, steps_per_epoch=3)
    loader = dm.train_dataloader()
    per_pass = None
    for _ in range(4):
        list(loader)
        per_pass = per_pass or dict(loader.skipped)
    assert loader.skipped["missing_field"] >= 2 * per_pass["missing_field"]
    resumed = _datamodule(bad_shards, bad_sample="skip", shuffle_buffer=0, steps_per_epoch=3)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.train_dataloader().skipped == loader.skipped
    assert dm.metrics()["data/skipped_missing_field"] == loader.skipped["missing_field"]

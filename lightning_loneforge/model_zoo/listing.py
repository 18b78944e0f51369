"""`loneforge models [--json]`: one line per zoo row with its family, towers and parameter count (meta device)."""

from __future__ import annotations

import argparse
import json

from lightning_loneforge.model_zoo.model import build_on_meta, count_params, tower_support
from lightning_loneforge.model_zoo.rows import name_to_config


def describe(name: str) -> dict:
    """`{"name", "family", "params", "towers", "buildable", "published_params", "hf_id", "note"}` of one row."""
    config = name_to_config[name]
    reason = tower_support(config)
    row = {
        "name": name, "family": config.family, "params": None, "towers": {}, "buildable": reason is None,
        "published_params": config.published_params, "hf_id": config.hf_id, "note": reason or "",
    }  # fmt: skip
    if reason is None:
        model = build_on_meta(config)
        row["towers"] = {tower: count_params(module) for tower, module in model.towers().items()}
        row["params"] = count_params(model)
    return row


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loneforge models", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.add_argument("names", nargs="*", help="only these rows")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in name_to_config]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; see `loneforge models`")
    rows = [describe(name) for name in (args.names or name_to_config)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<22} {'family':<16} {'params':>9} {'published':>9}  towers")
    for row in rows:
        if row["buildable"]:
            towers = ", ".join(f"{k} {_human(v)}" for k, v in row["towers"].items())
        else:
            towers = f"NOT BUILDABLE YET ({row['note']})"
        print(f"{row['name']:<22} {row['family']:<16} {_human(row['params']):>9} "
              f"{_human(row['published_params']):>9}  {towers}")  # fmt: skip
    return 0

"""Every public name imports, and importing the package registers the suite's names with Lightning."""

from __future__ import annotations

import importlib

import pytest
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

import lightning_loneforge

SUBPACKAGES = ["strategies", "accelerators", "datamodules", "model_zoo", "telemetry", "reliability"]


@pytest.mark.parametrize("name", lightning_loneforge.__all__)
def test_top_level_names_import(name: str) -> None:
    assert getattr(lightning_loneforge, name) is not None


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_subpackage_public_names_import(package: str) -> None:
    module = importlib.import_module(f"lightning_loneforge.{package}")
    missing = [name for name in getattr(module, "__all__", []) if not hasattr(module, name)]
    assert module.__all__ and not missing


def test_names_registered_with_lightning() -> None:
    assert "kunlun" in AcceleratorRegistry
    assert "tower_parallel" in StrategyRegistry

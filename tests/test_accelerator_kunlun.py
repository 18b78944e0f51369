"""KunlunAccelerator on a machine without Kunlun: registration, YAML resolution, detection and its errors.

The Kunlun plugin is absent in CI, so "plugin present" is played by a throw-away `torch_xmlir` package
(tests/fixtures/torch_xmlir_stub) put on `sys.path`; the code under test is the real detection.
"""

from __future__ import annotations

import subprocess
import sys
import types
from datetime import timedelta
from pathlib import Path
from pydoc import locate

import pytest
import torch
from jsonargparse import ActionConfigFile
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import AcceleratorRegistry, CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from lightning_loneforge.accelerators import (
    KunlunAccelerator,
    KunlunNotAvailableError,
    apply_bkcl_defaults,
    kunlun_plugin_installed,
    kunlun_unavailable_reason,
    process_group_timeout,
    register_kunlun,
)

STUB_DIR = Path(__file__).parent / "fixtures" / "torch_xmlir_stub"

needs_no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the no-device error; a GPU is present"
)


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISABLE_XPYTORCH", raising=False)
    register_kunlun()


@pytest.fixture
def plugin_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `torch_xmlir` findable, as an installed XPyTorch would."""
    monkeypatch.syspath_prepend(str(STUB_DIR))


def test_register_kunlun_is_idempotent_and_names_our_class() -> None:
    register_kunlun()
    register_kunlun()
    assert "kunlun" in AcceleratorRegistry.available_accelerators()
    assert dict.__getitem__(AcceleratorRegistry, "kunlun")["accelerator"] is KunlunAccelerator


def test_register_kunlun_leaves_a_foreign_entry_with_a_warning() -> None:
    ours = dict.__getitem__(AcceleratorRegistry, "kunlun")  # the registry's .get() would instantiate
    AcceleratorRegistry.register("kunlun", CPUAccelerator, override=True)
    try:
        with pytest.warns(UserWarning, match="already belongs to CPUAccelerator"):
            register_kunlun()
        assert dict.__getitem__(AcceleratorRegistry, "kunlun")["accelerator"] is CPUAccelerator
    finally:
        dict.__setitem__(AcceleratorRegistry, "kunlun", ours)


def test_importing_the_package_registers_kunlun() -> None:
    code = (
        "import lightning_loneforge\n"
        "from lightning.pytorch.accelerators import AcceleratorRegistry\n"
        "assert 'kunlun' in AcceleratorRegistry.available_accelerators(), AcceleratorRegistry.available_accelerators()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_plugin_absent_trainer_fails_at_once_with_install_hint() -> None:
    assert not kunlun_plugin_installed()
    assert KunlunAccelerator.is_available() is False
    assert KunlunAccelerator.auto_device_count() == 0
    with pytest.raises(KunlunNotAvailableError) as error:
        Trainer(accelerator="kunlun", devices=1, logger=False)
    message = str(error.value)
    assert "torch_xmlir" in message
    assert ".run" in message and "setup.sh" in message and "--noexec --target" in message


def test_plugin_found_by_detection(plugin_stub: None) -> None:
    assert kunlun_plugin_installed()


@needs_no_cuda
def test_plugin_present_without_device_names_the_missing_device(plugin_stub: None) -> None:
    assert KunlunAccelerator.is_available() is False
    assert KunlunAccelerator.auto_device_count() == 0
    with pytest.raises(KunlunNotAvailableError, match="no Kunlun device") as error:
        Trainer(accelerator="kunlun", devices=1, logger=False)
    assert "xpu-smi" in str(error.value)
    assert "setup.sh" not in str(error.value)  # the plugin is there: no install advice


def test_disabled_import_hook_is_reported(plugin_stub: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISABLE_XPYTORCH", "1")
    reason = kunlun_unavailable_reason()
    assert reason is not None and "DISABLE_XPYTORCH=1" in reason
    assert KunlunAccelerator.is_available() is False


def test_is_available_never_raises_on_a_broken_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.ModuleType("torch_xmlir")
    broken.__spec__ = None  # find_spec raises ValueError for such a module
    monkeypatch.setitem(sys.modules, "torch_xmlir", broken)
    with pytest.raises(ValueError):
        __import__("importlib.util").util.find_spec("torch_xmlir")
    assert KunlunAccelerator.is_available() is False
    assert kunlun_plugin_installed() is False


def test_device_parsing_matches_cuda_semantics() -> None:
    assert KunlunAccelerator.get_parallel_devices([0, 3]) == [
        torch.device("cuda", 0),
        torch.device("cuda", 3),
    ]
    assert KunlunAccelerator.name() == "kunlun"
    with pytest.raises(Exception, match="(?i)gpu|device"):
        KunlunAccelerator.parse_devices(2)  # no CUDA device here to hand out


def _trainer_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_lightning_class_args(Trainer, "trainer")
    return parser


def test_yaml_class_path_resolves_to_kunlun_and_fails_clearly(tmp_path: Path) -> None:
    config = tmp_path / "kunlun.yaml"
    config.write_text(
        "trainer:\n  accelerator:\n    class_path: lightning_loneforge.accelerators.KunlunAccelerator\n"
        "  devices: 1\n  logger: false\n"
    )
    parser = _trainer_parser()
    cfg = parser.parse_args([f"--config={config}"])
    assert locate(cfg.trainer.accelerator.class_path) is KunlunAccelerator
    # jsonargparse re-raises the accelerator's error inside its own ValueError, message intact
    with pytest.raises(
        (KunlunNotAvailableError, ValueError), match="needs Kunlun's PyTorch plugin `torch_xmlir`"
    ):
        parser.instantiate_classes(cfg)


def test_yaml_name_resolves_through_the_registry(tmp_path: Path, plugin_stub: None) -> None:
    config = tmp_path / "by_name.yaml"
    config.write_text("trainer:\n  accelerator: kunlun\n  devices: 1\n  logger: false\n")
    parser = _trainer_parser()
    cfg = parser.parse_args([f"--config={config}"])
    assert cfg.trainer.accelerator == "kunlun"
    trainer_kwargs = parser.instantiate_classes(cfg).trainer
    if torch.cuda.is_available():
        assert isinstance(Trainer(**trainer_kwargs).accelerator, KunlunAccelerator)
    else:
        with pytest.raises(KunlunNotAvailableError, match="no Kunlun device"):
            Trainer(**trainer_kwargs)


def test_lightning_cli_builds_the_trainer_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["loneforge"])
    config = tmp_path / "cli.yaml"
    config.write_text(
        "trainer:\n  accelerator:\n    class_path: lightning_loneforge.accelerators.KunlunAccelerator\n"
        "  devices: 1\n  logger: false\n  max_steps: 1\n"
    )
    # jsonargparse re-raises the accelerator's error inside its own ValueError, message intact
    with pytest.raises(
        (KunlunNotAvailableError, ValueError), match="needs Kunlun's PyTorch plugin `torch_xmlir`"
    ):
        LightningCLI(BoringModel, BoringDataModule, run=False, args=[f"--config={config}"])


def test_bkcl_defaults_only_fill_what_the_user_left_unset() -> None:
    env: dict[str, str] = {}
    assert apply_bkcl_defaults(env) == {"BKCL_FORCE_L3_RDMA": "0"}
    assert env == {"BKCL_FORCE_L3_RDMA": "0"}

    env = {"BKCL_FORCE_L3_RDMA": "1", "NCCL_SOCKET_IFNAME": "eth0"}
    assert apply_bkcl_defaults(env) == {"BKCL_SOCKET_IFNAME": "eth0"}
    assert env["BKCL_FORCE_L3_RDMA"] == "1"

    env = {"NCCL_SOCKET_IFNAME": "eth0", "BKCL_SOCKET_IFNAME": "bond0"}
    apply_bkcl_defaults(env)
    assert env["BKCL_SOCKET_IFNAME"] == "bond0"


def test_process_group_timeout_keeps_the_strategy_value() -> None:
    assert process_group_timeout(CPUAccelerator(), timedelta(minutes=5)) == timedelta(minutes=5)
    assert process_group_timeout(CPUAccelerator(), None) == timedelta(minutes=30)

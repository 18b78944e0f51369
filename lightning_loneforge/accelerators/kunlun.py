"""`KunlunAccelerator`: Baidu Kunlun XPUs (P800) for Lightning, through PyTorch's CUDA API.

The only module of the suite that knows about Kunlun's plugin. It never imports it: it only asks whether it is
installed. Facts it rests on (public sources, collected with citations in the team's KUNLUN.md; LF =
baidu-baige/LoongForge @c6275661, VK = baidu/vLLM-Kunlun @09869ee7, SK = baidu-baige/sglang-kunlun,
WIKI = VK PR #462 `openwiki/torch-xmlir/*.md`):

- The plugin (XPyTorch) is importable as `torch_xmlir`; LF detects it with
  `importlib.util.find_spec("torch_xmlir")` (LF loongforge/train/validators.py).
- It adds no torch device type. Chips are `"cuda"` devices, `torch.cuda` (set_device, device_count,
  synchronize, memory stats) works over a CUDA-ABI shim, and `torch.distributed` uses backend `"nccl"`, which the
  plugin maps to BKCL (VK vllm_kunlun/platforms/kunlun.py; SK sglang_kunlun/platform/device.py; WIKI
  05-device-runtime.md, 07-distributed.md).
- `import torch` loads the plugin through an import hook; `DISABLE_XPYTORCH=1` turns the hook off (WIKI
  02-import-hook.md).
- It is installed from a `.run` installer, unpacked with `--noexec --target` and set up with its `setup.sh`
  (LF docker/Dockerfile.xpu, docker/xpu_packages.json).
- LF's XPU scripts set `BKCL_FORCE_L3_RDMA=0`, noting that 1 can run out of memory (LF examples_xpu).

Because the runtime path is PyTorch's CUDA path, this class is a `CUDAAccelerator`: Lightning's CUDA-only
branches (for an instance: the device of a single-device strategy, FSDP's accelerator check, the "GPU available but not used"
warning) then treat a Kunlun chip as what PyTorch sees, a CUDA device.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import MutableMapping
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.accelerators.cuda import _clear_cuda_memory
from lightning.fabric.accelerators.registry import _AcceleratorRegistry
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.device_parser import _parse_gpu_ids
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.accelerators.accelerator import Accelerator
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

_log = logging.getLogger(__name__)

PLUGIN_MODULE = "torch_xmlir"
"""Import name of Kunlun's PyTorch plugin (XPyTorch)."""

INSTALL_HINT = (
    "Install XPyTorch, Kunlun's PyTorch plugin, from the `.run` installer that matches your torch and Python "
    "(e.g. xpytorch-cp310-torch251-ubuntu2004-x64.run): `bash xpytorch-<...>.run --noexec --target xpytorch_unpack "
    "&& cd xpytorch_unpack && bash setup.sh`, inside the virtual environment you train from (this is how "
    "LoongForge builds its XPU image, docker/Dockerfile.xpu). See docs/kunlun.md."
)

BKCL_DEFAULTS: dict[str, str] = {
    "BKCL_FORCE_L3_RDMA": "0",
}
"""BKCL settings applied only when unset. `BKCL_FORCE_L3_RDMA=0`: every LoongForge XPU script sets it, noting
that 1 can run out of memory (LF examples_xpu)."""


class KunlunNotAvailableError(MisconfigurationException):
    """`accelerator="kunlun"` was asked for on a machine that cannot run it; the message says what is missing."""


def kunlun_plugin_installed() -> bool:
    """Whether `torch_xmlir` can be found on `sys.path`; never raises and never imports it."""
    try:
        return importlib.util.find_spec(PLUGIN_MODULE) is not None
    except (ImportError, ValueError):
        return False


def _device_count() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # a broken driver or shim must read as "no device", not crash detection
        return 0


def kunlun_unavailable_reason() -> str | None:
    """Why `accelerator="kunlun"` cannot run here, or None when it can. Never raises."""
    if not kunlun_plugin_installed():
        return (
            f"accelerator='kunlun' needs Kunlun's PyTorch plugin `{PLUGIN_MODULE}`, which this Python "
            f"({sys.executable}) cannot find. {INSTALL_HINT}"
        )
    if os.environ.get("DISABLE_XPYTORCH") == "1":
        return (
            f"accelerator='kunlun': `{PLUGIN_MODULE}` is installed but DISABLE_XPYTORCH=1 turns off its import hook, "
            "so torch does not load it. Unset DISABLE_XPYTORCH."
        )
    if _device_count() == 0:
        return (
            f"accelerator='kunlun': `{PLUGIN_MODULE}` is installed but torch.cuda sees no Kunlun device. Check that "
            "the driver sees the chips (`xpu-smi -L`), that CUDA_VISIBLE_DEVICES / XPU_VISIBLE_DEVICES do not hide "
            "them, and that the runtime libraries (xre, xccl, libxpucuda.so as libcuda.so) are on LD_LIBRARY_PATH."
        )
    return None


def apply_bkcl_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set `BKCL_DEFAULTS` and `BKCL_SOCKET_IFNAME` (copied from `NCCL_SOCKET_IFNAME`) where the user has not.

    Args:
        environ: environment to update; `os.environ` by default.

    Returns:
        The variables this call set, with their values.
    """
    environ = os.environ if environ is None else environ
    wanted = dict(BKCL_DEFAULTS)
    if "NCCL_SOCKET_IFNAME" in environ:
        # Same meaning (the NIC collectives bootstrap over), so a CUDA launch script keeps working unchanged.
        wanted["BKCL_SOCKET_IFNAME"] = environ["NCCL_SOCKET_IFNAME"]
    applied = {key: value for key, value in wanted.items() if key not in environ}
    environ.update(applied)
    return applied


def process_group_timeout(accelerator: Accelerator, requested: timedelta | None) -> timedelta:
    """The timeout a strategy passes to `init_process_group` for `accelerator`.

    The strategy's own timeout wins; without one, torch's default (30 min). On Kunlun, BKCL keeps a separate
    timer, `BKCL_TIMEOUT`, whose unit is not documented publicly (LoongForge sets 360000), so it is left alone
    and only reported.

    Args:
        accelerator: the trainer's accelerator.
        requested: the strategy's `timeout` argument.
    """
    timeout = requested if requested is not None else default_pg_timeout
    if isinstance(accelerator, KunlunAccelerator):
        bkcl = os.environ.get("BKCL_TIMEOUT", "unset (BKCL's own default)")
        rank_zero_info(
            f"Kunlun: process-group timeout {timeout}; BKCL_TIMEOUT={bkcl} is BKCL's separate timer."
        )
    return timeout


class KunlunAccelerator(CUDAAccelerator):
    """Accelerator for Baidu Kunlun XPUs, which PyTorch sees as CUDA devices once `torch_xmlir` is installed.

    Raises:
        KunlunNotAvailableError: on construction, when the plugin or a device is missing.
    """

    def __init__(self) -> None:
        reason = kunlun_unavailable_reason()
        if reason is not None:
            raise KunlunNotAvailableError(reason)
        super().__init__()

    @override
    def setup_device(self, device: torch.device) -> None:
        """Select `device` and set BKCL defaults before the process group starts.

        A CPU device here means Lightning's connector picked `SingleDeviceStrategy("cpu")` (it does so for
        accelerators named by a string it does not know as CUDA); `setup()` then moves the strategy to the chip.
        """
        applied = apply_bkcl_defaults()
        if applied:
            _log.info(f"Kunlun: set BKCL defaults {applied}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise MisconfigurationException(f"KunlunAccelerator runs on 'cuda' devices, got {device}.")

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, SingleDeviceStrategy) and strategy.root_device.type != "cuda":
            device = _requested_device(trainer)
            rank_zero_info(f"Kunlun: single-device strategy moved from {strategy.root_device} to {device}.")
            strategy._root_device = device
            self.setup_device(device)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("XPU_VISIBLE_DEVICES", "all"))
        _log.info(f"LOCAL_RANK: {trainer.local_rank} - visible Kunlun devices: [{visible}]")
        _clear_cuda_memory()

    @override
    def get_device_stats(self, device: _DEVICE) -> dict[str, Any]:
        """`torch.cuda.memory_stats` of `device` (the caching allocator is the stock one on Kunlun)."""
        return torch.cuda.memory_stats(device)

    @override
    def teardown(self) -> None:
        _clear_cuda_memory()

    @staticmethod
    @override
    def parse_devices(devices: int | str | list[int]) -> list[int] | None:
        return _parse_gpu_ids(devices, include_cuda=True)

    @staticmethod
    @override
    def get_parallel_devices(devices: list[int]) -> list[torch.device]:
        return [torch.device("cuda", i) for i in devices]

    @staticmethod
    @override
    def auto_device_count() -> int:
        return _device_count() if kunlun_plugin_installed() else 0

    @staticmethod
    @override
    def is_available() -> bool:
        return kunlun_unavailable_reason() is None

    @staticmethod
    @override
    def name() -> str:
        return "kunlun"

    @classmethod
    @override
    def register_accelerators(cls, accelerator_registry: _AcceleratorRegistry) -> None:
        accelerator_registry.register(cls.name(), cls, description=cls.__name__)


def _requested_device(trainer: pl.Trainer) -> torch.device:
    """The chip the user asked for (`devices=[3]` -> cuda:3); Lightning keeps it only in its connector."""
    requested = getattr(trainer._accelerator_connector, "_parallel_devices", None) or []
    first = requested[0] if requested else torch.device("cuda", 0)
    return first if isinstance(first, torch.device) else torch.device("cuda", int(first))

"""`device_profile` answers per accelerator, device and name."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator

from lightning_loneforge.accelerators import KunlunAccelerator, device_profile
from lightning_loneforge.accelerators.profile import PEAK_TFLOPS_ENV, peak_bf16_tflops_for


@pytest.fixture(autouse=True)
def _no_peak_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)


@pytest.mark.parametrize("target", [CPUAccelerator(), CPUAccelerator, "cpu", torch.device("cpu")])
def test_cpu_profile(target: object) -> None:
    profile = device_profile(target)
    assert (profile.accelerator, profile.device_type, profile.autocast_device_type) == ("cpu", "cpu", "cpu")
    assert profile.collective_backend == "gloo"
    assert profile.peak_bf16_tflops is None
    assert profile.memory_stats(torch.device("cpu")) == {}
    assert profile.use_compile is False
    assert profile.attention_backend == "sdpa"
    profile.synchronize()


@pytest.mark.parametrize("target", [KunlunAccelerator, "kunlun"])
def test_kunlun_profile_is_cuda_without_compile(target: object) -> None:
    profile = device_profile(target)
    assert profile.accelerator == "kunlun"
    assert (profile.device_type, profile.autocast_device_type, profile.collective_backend) == (
        "cuda",
        "cuda",
        "nccl",
    )
    assert profile.use_compile is False
    assert profile.attention_backend == "sdpa"
    assert profile.peak_bf16_tflops is None  # no public P800 dense bf16 figure


@pytest.mark.parametrize("target", [CUDAAccelerator(), CUDAAccelerator, "cuda", "gpu", "cuda:0"])
def test_cuda_profile(target: object) -> None:
    profile = device_profile(target)
    assert (profile.accelerator, profile.device_type, profile.collective_backend) == ("cuda", "cuda", "nccl")
    assert profile.use_compile is True
    assert profile.attention_backend is None
    assert profile.peak_bf16_tflops == peak_bf16_tflops_for(profile.device_name)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 SXM5 80GB", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 NVL", None),
        ("GPU", None),  # what a Kunlun chip reports
        (None, None),
    ],
)
def test_peak_table(name: str | None, tflops: float | None) -> None:
    assert peak_bf16_tflops_for(name) == tflops


def test_peak_override_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "345.5")
    assert device_profile("kunlun").peak_bf16_tflops == 345.5
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=PEAK_TFLOPS_ENV):
        device_profile("cpu")


def test_profile_is_frozen() -> None:
    profile = device_profile("cpu")
    with pytest.raises(AttributeError):
        profile.use_compile = True  # type: ignore[misc]


def test_unknown_targets_are_named() -> None:
    class OtherAccelerator(Accelerator):
        pass

    with pytest.raises(ValueError, match="OtherAccelerator"):
        device_profile(OtherAccelerator)
    with pytest.raises(ValueError, match="'meta'"):
        device_profile("meta")

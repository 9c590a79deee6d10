"""The environment record: every switch and version that changes numerical results."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch

PACKAGES = ("torch", "torch_npu", "torchvision", "timm", "mmengine", "numpy", "safetensors")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def numerics_flags() -> dict[str, Any]:
    """TF32 / HF32 / determinism switches as they are now in this process."""
    flags: dict[str, Any] = {
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "mkldnn.enabled": torch.backends.mkldnn.enabled,
    }
    npu = getattr(torch, "npu", None)
    if npu is not None and hasattr(npu, "matmul"):  # only once torch_npu is imported
        flags["npu.matmul.allow_hf32"] = bool(npu.matmul.allow_hf32)
        flags["npu.conv.allow_hf32"] = bool(npu.conv.allow_hf32)
    return flags


def record(devices: dict[str, str] | None = None) -> dict[str, Any]:
    """A JSON-able record of versions, threads, numerics flags and the devices used."""
    env: dict[str, Any] = {
        "versions": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "numerics": numerics_flags(),
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "TORCH_DEVICE_BACKEND_AUTOLOAD", "CUBLAS_WORKSPACE_CONFIG")
            if k in os.environ
        },
    }
    if torch.cuda.is_available():
        env["cuda"] = {"version": torch.version.cuda, "device": torch.cuda.get_device_name(0)}
    if devices:
        env["devices"] = devices
    return env

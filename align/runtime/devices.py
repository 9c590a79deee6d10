"""Device strings, discovery and distributed backends.

Discovery never raises: a device that cannot be used is reported with the reason. The
classic trap is torch_npu installed without the CANN toolkit, which breaks even
`import torch` through torch's backend autoloading; `guard_npu_autoload()` (run by
`import align` before torch) probes that in a subprocess and disables autoloading
(TORCH_DEVICE_BACKEND_AUTOLOAD=0) so torch still imports and the NPU shows as unavailable.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass

from align.errors import AlignError, DeviceUnavailableError

KINDS = ("npu", "cuda", "mps", "cpu")  # "auto" prefers them in this order
BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo", "mps": "gloo"}
AUTOLOAD = "TORCH_DEVICE_BACKEND_AUTOLOAD"
_npu_import_error: str | None = None


@dataclass(frozen=True)
class DeviceStatus:
    """Whether a device kind is usable here, how many there are, and why not if not."""

    kind: str
    available: bool
    count: int = 0
    reason: str = ""

    def __str__(self) -> str:
        if self.available:
            return f"{self.kind}: available ({self.count})"
        return f"{self.kind}: unavailable ({self.reason})"


def guard_npu_autoload() -> None:
    """If torch_npu is installed but cannot import, keep it from breaking `import torch`."""
    global _npu_import_error
    if "torch" in sys.modules or importlib.util.find_spec("torch_npu") is None:
        return
    if os.environ.get(AUTOLOAD) == "0":
        return
    probe = subprocess.run(
        [sys.executable, "-c", "import torch, torch_npu"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, AUTOLOAD: "0"},
    )
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.strip().splitlines() if line.strip()]
        _npu_import_error = _explain_npu_error(lines[-1] if lines else "import failed")
        os.environ[AUTOLOAD] = "0"


def _explain_npu_error(last_line: str) -> str:
    return (
        f"torch_npu is installed but cannot be imported: {last_line}. It needs the Ascend "
        "CANN toolkit: source its set_env.sh (e.g. /usr/local/Ascend/ascend-toolkit/"
        "set_env.sh) or uninstall torch_npu. align disabled torch's backend autoloading "
        f"({AUTOLOAD}=0) so that torch itself still imports."
    )


def _npu_status() -> DeviceStatus:
    if importlib.util.find_spec("torch_npu") is None:
        return DeviceStatus("npu", False, reason="torch_npu is not installed")
    if _npu_import_error:
        return DeviceStatus("npu", False, reason=_npu_import_error)
    try:
        import torch_npu  # noqa: F401
    except Exception as exc:  # any failure of a vendor import is an unavailable device
        return DeviceStatus("npu", False, reason=_explain_npu_error(f"{type(exc).__name__}: {exc}"))
    import torch

    try:
        count = torch.npu.device_count()
    except Exception as exc:
        return DeviceStatus("npu", False, reason=f"torch.npu.device_count() failed: {exc}")
    if count == 0:
        return DeviceStatus("npu", False, reason="torch_npu imports but sees no NPU")
    return DeviceStatus("npu", True, count)


def _cuda_status() -> DeviceStatus:
    import torch

    if not torch.cuda.is_available():
        return DeviceStatus("cuda", False, reason="torch.cuda.is_available() is False")
    return DeviceStatus("cuda", True, torch.cuda.device_count())


def _mps_status() -> DeviceStatus:
    import torch

    if not torch.backends.mps.is_available():
        return DeviceStatus("mps", False, reason="torch.backends.mps.is_available() is False")
    return DeviceStatus("mps", True, 1)


def discover() -> dict[str, DeviceStatus]:
    """Status of every device kind, best first. Never raises."""
    probes = {
        "npu": _npu_status,
        "cuda": _cuda_status,
        "mps": _mps_status,
        "cpu": lambda: DeviceStatus("cpu", True, 1),
    }
    found = {}
    for kind in KINDS:
        try:
            found[kind] = probes[kind]()
        except Exception as exc:
            found[kind] = DeviceStatus(kind, False, reason=f"{type(exc).__name__}: {exc}")
    return found


def best_device() -> str:
    """The first available kind in KINDS order ("cpu" at worst)."""
    return next(k for k, s in discover().items() if s.available)


def resolve(spec: str):
    """A `torch.device` for 'cpu', 'cuda[:N]', 'npu[:N]', 'mps' or 'auto'.

    Raises DeviceUnavailableError with the reason when the device cannot be used, and
    AlignError for a malformed string.
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = best_device()
    kind, _, index = spec.partition(":")
    if kind not in KINDS or (index and not index.isdigit()) or (index and kind in ("cpu", "mps")):
        raise AlignError(f"unknown device {spec!r}: use cpu, cuda, cuda:N, npu, npu:N, mps or auto")
    status = discover()[kind]
    if not status.available:
        raise DeviceUnavailableError(f"device {spec!r} is not usable here: {status.reason}")
    if index and int(index) >= status.count:
        raise DeviceUnavailableError(
            f"device {spec!r} does not exist: {status.count} {kind} device(s) present"
        )
    return torch.device(spec)


def backend_for(device: str) -> str:
    """torch.distributed backend for a device string: hccl, nccl or gloo."""
    kind = device.split(":")[0]
    if kind == "auto":
        kind = best_device()
    if kind not in BACKENDS:
        raise AlignError(f"no distributed backend for device {device!r}")
    return BACKENDS[kind]


def on_host(t) -> bool:
    """Whether tensor `t` is in host memory (the CPU's), not on a device."""
    return t.device.type == "cpu"


def synchronize(device) -> None:
    """Wait until the work queued on `device` (a torch.device) is done: torch.cuda's,
    torch.npu's (torch_npu), torch.xpu's or torch.mps's synchronize()."""
    import torch

    wait = getattr(getattr(torch, device.type, None), "synchronize", None)
    if wait is None:
        raise AlignError(f"cannot wait for {device}: torch.{device.type} has no synchronize()")
    try:
        wait(device)
    except TypeError:  # torch.mps.synchronize() takes no device
        wait()

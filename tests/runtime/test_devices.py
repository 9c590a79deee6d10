"""Device strings, discovery, backends, and the torch_npu-without-CANN guard (with fakes)."""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from align.errors import AlignError, DeviceUnavailableError
from align.runtime import devices


def test_cpu_always_available_and_discovery_never_raises():
    found = devices.discover()
    assert list(found) == ["npu", "cuda", "mps", "cpu"]
    assert found["cpu"].available
    for status in found.values():
        assert status.available or status.reason  # an unavailable device says why


@pytest.mark.parametrize("spec", ["cuda:x", "tpu", "cpu:1", "npu:-1", "gpu"])
def test_malformed_device_strings(spec):
    with pytest.raises(AlignError, match="unknown device"):
        devices.resolve(spec)


def test_resolve_cpu_and_auto():
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve("auto").type == devices.best_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_says_why():
    with pytest.raises(DeviceUnavailableError, match="is_available"):
        devices.resolve("cuda:0")


def test_backend_follows_device():
    assert devices.backend_for("npu:3") == "hccl"
    assert devices.backend_for("cuda") == "nccl"
    assert devices.backend_for("cpu") == "gloo"
    with pytest.raises(AlignError):
        devices.backend_for("tpu")


def _fake_torch_npu(tmp_path):
    """A torch_npu that fails like one installed without the CANN toolkit, and registers
    itself for torch's backend autoloading, so a plain `import torch` fails too."""
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('libhccl.so: cannot open shared object file: No such file')\n"
        "def _autoload():\n    pass\n"
    )
    dist = tmp_path / "torch_npu-2.14.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.14.0\n")
    (dist / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_torch_npu_without_toolkit_breaks_plain_torch_but_not_align(tmp_path):
    env = _fake_torch_npu(tmp_path)
    env.pop(devices.AUTOLOAD, None)
    plain = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=300
    )
    assert plain.returncode != 0, "the fake must reproduce the autoload failure"
    script = textwrap.dedent("""
        import align, align.runtime.devices as d
        s = d.discover()["npu"]
        print("AVAILABLE", s.available)
        print("REASON", s.reason)
        print("CPU", d.resolve("auto"))
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "AVAILABLE False" in run.stdout
    assert "libhccl.so" in run.stdout and "CANN" in run.stdout
    assert "CPU cpu" in run.stdout


def test_cli_reports_unusable_npu_as_usage_error(tmp_path):
    env = _fake_torch_npu(tmp_path)
    env.pop(devices.AUTOLOAD, None)
    run = subprocess.run(
        [sys.executable, "-m", "align.check", "resnet50", "--target", "npu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert "error: device 'npu' is not usable here" in run.stderr
    assert "Traceback" not in run.stderr


def test_synchronize_waits_through_the_device_kinds_own_module(monkeypatch):
    """torch.<kind>.synchronize(device), or without the device where it takes none (mps);
    a kind without one is an AlignError, not an AttributeError."""
    waited = []
    monkeypatch.setattr(
        torch, "npu", types.SimpleNamespace(synchronize=waited.append), raising=False
    )
    device = types.SimpleNamespace(type="npu")
    devices.synchronize(device)
    assert waited == [device]
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    devices.synchronize(types.SimpleNamespace(type="mps"))
    assert waited[-1] == "mps"
    with pytest.raises(AlignError, match="torch.nosuch has no synchronize"):
        devices.synchronize(types.SimpleNamespace(type="nosuch"))

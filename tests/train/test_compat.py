"""The mmengine 0.10.7 gaps under torch >= 2.6 on a CPU-only machine, and their fixes.

Each gap has a test that shows mmengine's own path failing here and one that fails
without align's fix. They run in one world-size-1 gloo process group.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from mmengine.optim import AmpOptimWrapper, OptimWrapper, build_optim_wrapper
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import TensorDataset

from align.train import compat
from align.train.model import Classifier

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the gaps show without CUDA")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def launcher_env(monkeypatch):
    """The environment torchrun gives a single rank."""
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def process_group(launcher_env):
    compat.init_process_group("gloo", "cpu", timeout_s=60)
    yield
    dist.destroy_process_group()


def _model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    return Classifier(net)


def _runner(tmp_path, model, name: str, *, epochs: int = 1, resume: bool = False, hooks=()):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(16, 3, 2, 2, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    )
    return Runner(
        model=model,
        work_dir=str(tmp_path),
        experiment_name=name,
        train_dataloader={
            "dataset": data,
            "batch_size": 4,
            "sampler": {"type": "DefaultSampler", "shuffle": True, "seed": 0},
            "collate_fn": {"type": "default_collate"},
        },
        train_cfg={"by_epoch": True, "max_epochs": epochs},
        optim_wrapper={"type": "OptimWrapper", "optimizer": {"type": "SGD", "lr": 0.1}},
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 1}},
        custom_hooks=list(hooks),
        launcher="pytorch",
        randomness={"seed": 0},
        resume=resume,
    )


# -------------------------------------------------------------------- gap 1: init_dist
@no_cuda
def test_mmengine_init_dist_needs_cuda_even_for_gloo(launcher_env):
    from mmengine.dist import init_dist

    with pytest.raises(RuntimeError, match="NVIDIA|CUDA|cuda"):
        init_dist("pytorch", backend="gloo")
    assert not dist.is_initialized()


def test_runner_uses_the_process_group_align_set_up(process_group, tmp_path):
    runner = _runner(tmp_path, compat.wrap_ddp(_model(), "cpu"), "gap1")
    assert runner.distributed and runner.world_size == 1
    assert dist.get_backend() == "gloo"


# -------------------------------------------------------------------- gap 2: DDP device_ids
def test_mmengine_wraps_cpu_modules_with_device_ids(process_group, tmp_path):
    with pytest.raises(ValueError, match="device_ids"):
        _runner(tmp_path, _model(), "gap2-stock")


def test_wrap_ddp_trains_a_cpu_module(process_group, tmp_path):
    model = compat.wrap_ddp(_model(), "cpu")
    assert model.device_ids is None
    before = [p.detach().clone() for p in model.parameters()]
    _runner(tmp_path, model, "gap2").train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------ gap 3: weights_only resume
def test_stock_checkpoint_needs_getattr_to_load(process_group, tmp_path):
    _runner(tmp_path, compat.wrap_ddp(_model(), "cpu"), "gap3-stock").train()
    with pytest.raises(Exception, match="getattr|HistoryBuffer"):
        torch.load(tmp_path / "epoch_1.pth", weights_only=True)


def test_resume_loads_with_weights_only(process_group, tmp_path):
    _runner(
        tmp_path, compat.wrap_ddp(_model(), "cpu"), "gap3-a", hooks=[compat.WeightsOnlyCheckpoint()]
    ).train()
    checkpoint = torch.load(tmp_path / "epoch_1.pth", weights_only=True)  # no extra globals
    assert "train/loss" in checkpoint["message_hub"]["log_scalars"]
    runner = _runner(
        tmp_path,
        compat.wrap_ddp(_model(), "cpu"),
        "gap3-b",
        epochs=2,
        resume=True,
        hooks=[compat.WeightsOnlyCheckpoint()],
    )
    runner.train()
    assert runner.epoch == 2
    assert runner.message_hub.get_scalar("train/loss").data[0].size > 0  # history kept


# ------------------------------------------------------------ mmengine's silent NPU AMP
def test_precision_switch_is_recorded(monkeypatch):
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp
    import mmengine.optim.optimizer.builder as builder

    cfg = {"type": "OptimWrapper", "optimizer": {"type": "SGD", "lr": 0.1}}
    assert compat.precision_switch("fp32", build_optim_wrapper(_model(), cfg)) is None

    # An Ascend 910 (SoC version < 220): mmengine swaps in AMP without a word.
    monkeypatch.setattr(builder, "is_npu_available", lambda: True)
    monkeypatch.setattr(builder, "is_npu_support_full_precision", lambda: False)
    monkeypatch.setattr(amp, "is_npu_available", lambda: True)
    with pytest.warns(UserWarning):  # torch's GradScaler disables itself without CUDA
        wrapper = build_optim_wrapper(_model(), cfg)
    assert isinstance(wrapper, AmpOptimWrapper) and isinstance(wrapper, OptimWrapper)
    note = compat.precision_switch("fp32", wrapper)
    assert note and "is_npu_support_full_precision" in note
    assert compat.precision_switch("amp-fp16", wrapper) is None  # AMP was asked for

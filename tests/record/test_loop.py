"""align.Recorder in a user's own training script, and step-by-step comparison of its dumps.

The script below (an MLP with a maxout on scikit-learn's digits, Adam or SGD, optional
GradScaler, optional two gloo ranks with DDP) is written to a temporary directory and run
in separate processes, as on two machines: the reference, the float64 golden, an honest
target (every rounding jittered, align.numerics.jitter) and targets with one fault each.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import align
from align.errors import AlignError, TraceError
from align.numerics.decisions import Decisions
from align.numerics.jitter import Jitter
from align.numerics.precision import held_dtype
from align.record.loop import skipping
from align.record.loop_dump import LoopDump
from align.testing import FusedDropout, fused_dropout_kernel
from align.testing.loops import fp16_scaled_step
from align.testing.models import GlobalFilter, SparseBag

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import argparse, contextlib, os, sys
import torch
from sklearn.datasets import load_digits
from torch import nn
import align
from align.numerics.jitter import Jitter


class Net(nn.Module):
    def __init__(self, norm_eps):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(32, eps=norm_eps)
        self.fc2 = nn.Linear(32, 10)
        self.hidden_hook = None  # a tensor hook on fc2's input, for the next call

    def forward(self, x):
        h = self.fc1(x).view(x.shape[0], 32, 2).max(dim=-1).values  # maxout: discrete choices
        h = torch.relu(self.norm(h))
        if self.hidden_hook is not None:
            h.register_hook(self.hidden_hook)
            self.hidden_hook = None
        return self.fc2(h)


def main(rank, args):
    if args.world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.world
        )
    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    model = Net(args.norm_eps)
    if args.world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=args.eps)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=args.dampening)
    scaler = torch.amp.GradScaler("cpu", init_scale=args.scale) if args.scale else None
    rec = align.Recorder(model, args.out, steps=[0, 1, 2], optimizer=opt, scaler=scaler,
                         replay=args.replay, golden=args.golden)
    criterion = nn.CrossEntropyLoss()
    for step in range(4):
        lo = (step * args.world + rank) * 32
        xb, yb = x[lo : lo + 32], y[lo : lo + 32]
        if step == args.bad_batch and rank == args.bad_rank:
            xb = xb * 1.01
        with rec.step(step), Jitter(step + 1) if args.jitter else contextlib.nullcontext():
            overflow = step == args.inf_step  # a gradient overflowing: the scaler skips the step
            inf = lambda g: g.index_fill(0, torch.tensor([args.inf_row]), float("inf"))
            if overflow and args.inf_at == "hidden":  # fc2's input gradient
                (model.module if args.world > 1 else model).hidden_hook = inf
            logits = model(xb)
            if overflow and args.inf_at == "logits":
                logits.register_hook(inf)
            loss = criterion(logits, yb)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
    if args.world > 1:  # leave together: no rank tears down the store another still uses
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        rec.close()
        sys.stdout.flush()
        # skip C++ static destructors: a rank of this script aborted there ("terminate
        # called without an active exception", no Python frame left) in 1 of 40 runs
        os._exit(0)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--dampening", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=0.0)
    p.add_argument("--norm-eps", type=float, default=1e-5)
    p.add_argument("--bad-batch", type=int, default=-1)
    p.add_argument("--bad-rank", type=int, default=0)
    p.add_argument("--inf-step", type=int, default=-1)
    p.add_argument("--inf-row", type=int, default=0)
    p.add_argument("--inf-at", choices=("logits", "hidden"), default="logits")
    p.add_argument("--jitter", action="store_true")
    p.add_argument("--replay", default=None)
    p.add_argument("--golden", action="store_true")
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if args.world > 1:
        torch.multiprocessing.spawn(main, args=(args,), nprocs=args.world)
    else:
        main(0, args)
"""

# a reference whose gradients overflow in step 1, so its scaler skips it
SKIPPING = ["--scale", "1024", "--inf-step", "1"]
# name: (arguments, replays the reference "ref" or "sgd")
TARGETS = {
    "honest": (["--jitter"], "ref"),
    "adam_eps": (["--eps", "1e-3"], "ref"),
    "layer": (["--norm-eps", "1e-2"], "ref"),
    "data": (["--bad-batch", "1"], "ref"),
    "damp": (["--optimizer", "sgd", "--dampening", "0.1"], "sgd"),
    "scaled": (["--scale", "1024", "--jitter"], "scaled_ref"),
    "overflow": (["--scale", "1024", "--inf-step", "1"], "scaled_ref"),
    # a reference whose scaler skips step 1: an honest target that skips it too, and one
    # that steps
    "skipping": ([*SKIPPING, "--inf-at", "hidden", "--jitter"], "skipping_ref"),
    "stepping": (["--scale", "1024", "--jitter"], "skipping_ref"),
    # overflowing in fc2's gradients too, which are finite on the reference
    "elsewhere": ([*SKIPPING, "--inf-at", "logits"], "skipping_ref"),
}


def _launch(root: Path, name: str, *args: str, draw: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "ALIGN_DRAW": str(draw)} if draw else None
    return subprocess.Popen(
        [sys.executable, str(root / "train.py"), str(root / name), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _wait(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{proc.args}\n{out[-3000:]}"


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> Path:
    """Every run of the script, each in its own process: references first, then the rest."""
    root = tmp_path_factory.mktemp("loop")
    (root / "train.py").write_text(SCRIPT)
    _wait(
        _launch(root, "ref"),
        _launch(root, "sgd", "--optimizer", "sgd"),
        _launch(root, "scaled_ref", "--scale", "1024"),
        _launch(root, "skipping_ref", *SKIPPING, "--inf-at", "hidden"),
    )
    procs = [_launch(root, "gold", "--golden", "--replay", str(root / "ref"))]
    procs.append(_launch(root, "skipping_gold", "--golden", "--replay", str(root / "skipping_ref")))
    procs += [_launch(root, "ref", draw=n) for n in (1, 2)]  # the reference script, again
    for name, (args, reference) in TARGETS.items():
        procs.append(_launch(root, name, *args, "--replay", str(root / reference)))
    _wait(*procs)
    return root


def _compare(dumps: Path, reference: str, target: str, golden: bool = True) -> align.Report:
    gold = dumps / "gold" if golden else None
    return align.compare(dumps / reference, dumps / target, gold)


def test_honest_target_is_aligned_on_every_step(dumps):
    report = _compare(dumps, "ref", "honest")
    assert report.passed, str(report)
    assert [s["step"] for s in report.train["steps"]] == [0, 1, 2]
    phases = {r.phase for r in report.rows}
    assert {"input", "forward", "loss", "backward", "param_grad", "optimizer", "param"} <= phases
    # the jittered target really differs, and its loss was recorded on every side
    assert any(r.metrics.get("rel_rmse", 0) > 0 for r in report.rows if r.phase == "forward")
    losses = report.train["steps"][1]["loss"]
    assert None not in losses.values() and losses["reference"] != losses["golden"]


@pytest.mark.parametrize(
    "target, reference, where",
    [
        # Adam's update with another epsilon: the first wrong tensor is the first update
        ("adam_eps", "ref", ("fc1", "param", "step 0 group 0 fc1.weight after the step")),
        # dampening is not applied on SGD's first step: its momentum goes wrong at step 1
        ("damp", "sgd", ("fc1", "optimizer", "step 1 group 0 fc1.weight momentum_buffer")),
        ("layer", "ref", ("norm", "forward", "step 0 output[0]")),
        ("data", "ref", ("", "input", "step 1 input[0]")),
    ],
)
def test_fault_is_named_by_step_and_tensor(dumps, target, reference, where):
    report = _compare(dumps, reference, target, golden=reference == "ref")
    first = report.first_divergence
    assert not report.passed and first is not None, str(report)
    assert (first.module, first.phase, first.tensor) == where, str(report)
    assert report.train["first_divergence"]["tensor"] == where[2]
    n = int(where[2].split()[1])
    assert all(s["failing"] == 0 for s in report.train["steps"] if s["step"] < n), str(report)
    # where the error starts, from the dumped tensors: the wrong layer, and nothing for a
    # fault outside any module (the data, the optimizer)
    starts = [(d.module, d.phase, d.tensor) for d in report.origins]
    assert starts[:1] == ([where] if where[1] == "forward" else []), str(report)


def test_hyperparameter_difference_is_noted(dumps):
    report = _compare(dumps, "ref", "adam_eps")
    assert "param group 0: eps is 1e-08 on the reference, 0.001 on the target" in report.notes


def test_cli_compares_loop_dumps_with_exit_codes(dumps):
    def cli(target: str) -> subprocess.CompletedProcess:
        args = [dumps / "ref", dumps / target, "--golden", dumps / "gold"]
        return subprocess.run(
            [sys.executable, "-m", "align.compare", *map(str, args), "--json", dumps / "r.json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )

    ok, bad = cli("honest"), cli("layer")
    assert ok.returncode == 0 and "ALIGNED" in ok.stdout, ok.stdout + ok.stderr
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "first divergence: norm forward step 0 output[0]" in bad.stdout
    assert json.loads((dumps / "r.json").read_text())["train"]["steps_run"] == 3


def test_scaler_scale_and_skipped_step(dumps):
    assert _compare(dumps, "scaled_ref", "honest", golden=False).passed is False  # scale 1 vs 1024
    assert _compare(dumps, "scaled_ref", "scaled").passed  # gradients unscaled on both sides
    # the golden runs unscaled: recorded gradients are unscaled, so it still fits
    assert _compare(dumps, "scaled_ref", "scaled", golden=True).passed
    info = json.loads((dumps / "overflow/rank0/step000001/step.json").read_text())
    assert info["scaler"] == {"scale": 1024.0, "next_scale": 512.0, "skipped": True}
    overflow = _compare(dumps, "scaled_ref", "overflow", golden=False)
    first = overflow.first_divergence  # the gradient that overflowed, then the scaler's skip
    assert (first.module, first.phase, first.metric) == ("fc2", "backward", "nonfinite"), first
    assert any(r.tensor == "step 1 skipped" and r.failed for r in overflow.rows)


def test_a_step_the_references_scaler_skipped_is_skipped_by_the_golden_and_judged(dumps):
    """The reference's gradients overflow in step 1 and its scaler skips the step: the
    golden (no scaler) replays the skip, the overflowed gradients are left out with a note,
    everything else of the step is judged; an honest target that skips alike passes, also
    where other tensors overflowed on it (fc2's gradients, finite on the reference), and
    one whose scaler steps fails on the scaler."""
    gold = LoopDump(dumps / "skipping_gold")
    before, after = (gold.load(0, n).state["param/fc2.bias"] for n in (0, 1))
    assert torch.equal(before, after)  # the golden did not step where the reference skipped
    report = align.compare(dumps / "skipping_ref", dumps / "skipping", dumps / "skipping_gold")
    assert report.passed, str(report)
    assert any("skipped the optimizer step" in n for n in report.notes), report.notes
    judged = {r.tensor for r in report.rows}
    assert "step 1 loss" in judged and "step 1 group 0 fc2.bias after the step" in judged
    step1 = {r.module for r in report.rows if r.phase == "param_grad" and "step 1" in r.tensor}
    assert "fc1" not in step1 and "fc2" in step1  # overflowed upstream of fc2's input only
    elsewhere = align.compare(dumps / "skipping_ref", dumps / "elsewhere", dumps / "skipping_gold")
    assert elsewhere.passed, str(elsewhere)
    stepping = align.compare(dumps / "skipping_ref", dumps / "stepping", dumps / "skipping_gold")
    first = stepping.first_divergence
    assert (first.phase, first.tensor) == ("scaler", "step 1 skipped"), str(first)


def test_a_comparison_whose_every_gradient_overflowed_on_the_reference_is_an_error(dumps, tmp_path):
    """The only step recorded was skipped by the reference's scaler, every gradient of it
    overflowed (at the logits): no gradient is left to judge, and a pass on the forward
    alone would read as aligned (measured: mobileone_s0 under amp-fp16, steps 1 and 2
    both skipped at scales 32768 and 16384, a 1% backward fault passed)."""
    for name in ("elsewhere", "skipping"):
        shutil.copytree(dumps / name, tmp_path / name)
        for step in (tmp_path / name / "rank0").glob("step*"):
            if step.name != "step000001":
                shutil.rmtree(step)
    with pytest.raises(AlignError, match=r"no gradient could be judged.*skipped step\(s\) \[1\]"):
        align.compare(tmp_path / "elsewhere", tmp_path / "skipping")


def test_a_skipped_step_leaves_an_lr_schedulers_wrapper_of_the_step_in_place():
    weight = nn.Parameter(torch.ones(2))
    weight.grad = torch.ones(2)
    opt = torch.optim.SGD([weight], lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, 1)  # wraps opt.step on the instance
    wrapped = opt.__dict__["step"]
    with skipping(opt):
        opt.step()
    assert torch.equal(weight.detach(), torch.ones(2)) and opt.__dict__["step"] is wrapped
    bare = torch.optim.SGD([weight], lr=0.1)
    with skipping(bare):
        bare.step()
    assert "step" not in bare.__dict__


def test_honest_draws_are_reruns_of_the_reference_script_with_its_choices(dumps, tmp_path):
    """ALIGN_DRAW=n re-runs the reference script as its honest draw n: its rounding nudged,
    the reference's decisions replayed; the comparison scales limits by the draws too."""
    draws = LoopDump(dumps / "ref").draws()
    assert [d.root.name for d in draws] == ["1", "2"]
    ref = LoopDump(dumps / "ref").load(0, 1)
    for draw in draws:
        assert draw.ranks[0]["draw"] == int(draw.root.name)
        step = draw.load(0, 1)
        assert step.trace.meta["decisions"] == "replayed"
        mine, theirs = step.state["param/fc1.weight"], ref.state["param/fc1.weight"]
        assert 0 < float((mine - theirs).norm() / theirs.norm()) < 1e-5  # rounding apart
    assert "2 honest draws'" in " ".join(_compare(dumps, "ref", "honest").notes)
    shutil.copytree(dumps / "ref", tmp_path / "ref", ignore=shutil.ignore_patterns("draws"))
    alone = align.compare(tmp_path / "ref", dumps / "honest", dumps / "gold")
    assert "ALIGN_DRAW=1" in " ".join(alone.notes)


def test_target_and_golden_replay_the_reference_choices(dumps):
    ref, tgt = LoopDump(dumps / "ref").load(0, 1), LoopDump(dumps / "honest").load(0, 1)
    gold = LoopDump(dumps / "gold").load(0, 1)
    assert ref.trace.meta["decisions"] == "own"
    assert "aten.max.dim" in [op.split("(")[0] for op, _ in ref.trace.decisions]  # the maxout
    for side in (tgt, gold):
        assert side.trace.meta["decisions"] == "replayed"
        assert [op for op, _ in side.trace.decisions] == [op for op, _ in ref.trace.decisions]
        for (_, mine), (_, theirs) in zip(side.trace.decisions, ref.trace.decisions):
            assert torch.equal(mine, theirs)
    assert gold.state["param/fc1.weight"].dtype == torch.float64
    assert gold.trace.tensor(gold.trace.calls[0].inputs[0]).dtype == torch.float64


def test_corrupt_or_truncated_step_is_a_trace_error(dumps, tmp_path):
    copy = tmp_path / "ref"
    shutil.copytree(dumps / "ref", copy)
    state = copy / "rank0/step000001/state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(TraceError, match="step000001/state.safetensors.*truncated or corrupt"):
        align.compare(copy, dumps / "honest")
    (copy / "rank0/step000001/step.json").unlink()
    with pytest.raises(TraceError, match="step.json: not a readable JSON record"):
        align.compare(copy, dumps / "honest")
    shutil.rmtree(copy / "rank0/step000001")
    shard = next((copy / "rank0/step000002/trace").glob("tensors-*.safetensors"))
    shard.write_bytes(b"\0" * 16)
    with pytest.raises(TraceError, match="not a readable safetensors file"):
        align.compare(copy, dumps / "honest")


def test_two_gloo_ranks_write_and_compare_rank_by_rank(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)
    _wait(_launch(tmp_path, "ref", "--world", "2", "--port", _free_port()))
    _wait(
        _launch(
            tmp_path,
            "tgt",
            "--world",
            "2",
            "--port",
            _free_port(),
            "--jitter",
            "--replay",
            str(tmp_path / "ref"),
        ),
        _launch(
            tmp_path,
            "bad",
            "--world",
            "2",
            "--port",
            _free_port(),
            "--bad-batch",
            "1",
            "--bad-rank",
            "1",
        ),
    )
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["rank0", "rank1"]
    report = align.compare(tmp_path / "ref", tmp_path / "tgt")
    assert report.passed, str(report)
    assert {(s["rank"], s["step"]) for s in report.train["steps"]} == {
        (r, n) for r in (0, 1) for n in (0, 1, 2)
    }
    first = align.compare(tmp_path / "ref", tmp_path / "bad").first_divergence
    assert (first.phase, first.tensor) == ("input", "rank 1 step 1 input[0]")


# ------------------------------------------------------------------------- in process


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x)


def _train(rec: align.Recorder, model: nn.Module, opt, steps: int, explicit: bool = False):
    torch.manual_seed(1)
    for step in range(steps):
        x = torch.randn(3, 4)
        with rec.step(step):
            assert bool(model.lin._forward_hooks) == (step in rec.steps)  # none when skipped
            loss = model(x).square().mean()
            if explicit:
                rec.loss(loss * 2)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return loss


def test_recorder_writes_only_the_chosen_steps_atomically(tmp_path):
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = _train(align.Recorder(model, tmp_path / "d", steps=[1], optimizer=opt), model, opt, 2)
    rank = tmp_path / "d" / "rank0"
    assert sorted(p.name for p in rank.iterdir()) == ["loop.json", "step000001"]
    step = LoopDump(tmp_path / "d").load(0, 1)
    assert float(step.state["loss"]) == float(loss.detach())  # the tensor backward ran on
    assert torch.equal(step.state["param/lin.weight"], model.lin.weight.detach())
    assert torch.equal(
        step.state["optim/0/lin.weight/momentum_buffer"],
        opt.state[model.lin.weight]["momentum_buffer"],
    )
    assert step.trace.param_grads.keys() == {"lin.weight", "lin.bias"}  # taken before zero_grad
    # a second recording into the same directory replaces the first one's steps
    _train(align.Recorder(model, tmp_path / "d", steps=[0], optimizer=opt), model, opt, 1, True)
    assert sorted(p.name for p in rank.iterdir()) == ["loop.json", "step000000"]
    step = LoopDump(tmp_path / "d").load(0, 0)
    trace_loss = step.state["loss"]
    assert float(trace_loss) == pytest.approx(
        2 * float(step.trace.tensor(step.trace.calls[0].outputs[0]).square().mean())
    )


class _NoisySGD(torch.optim.SGD):
    """A user's optimizer that adds noise drawn from the default generator to each step."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.add_(torch.randn_like(p), alpha=1e-3)
        return super().step(closure)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, _NoisySGD])
def test_torchs_own_optimizers_step_outside_the_decisions_and_a_users_inside(tmp_path, optimizer):
    """torch.optim's step makes no choice: it runs without the mode's per-op tax; a user's
    optimizer may draw (noise here): its draws are recorded for the target to replay."""
    model = _Tiny()
    opt = optimizer(model.parameters(), lr=0.1)
    modes = []
    opt.register_step_pre_hook(lambda *_: modes.append(_get_current_dispatch_mode()))
    _train(align.Recorder(model, tmp_path / "d", steps=[0], optimizer=opt), model, opt, 1)
    drawn = [op for op, _ in LoopDump(tmp_path / "d").load(0, 0).trace.decisions]
    if optimizer is torch.optim.SGD:
        assert modes == [None] and drawn == []
    else:
        assert isinstance(modes[0], Decisions) and drawn == ["aten.randn_like.default"] * 2
    assert "step" not in opt.__dict__  # the class's step is the optimizer's again


def test_the_loss_is_what_autograd_backward_ran_on_in_the_loops_thread(tmp_path):
    """Without rec.loss: the tensor given to torch.autograd.backward (in a list, as
    accumulating scripts do), not one another thread ran backward on meanwhile."""
    import threading

    model = _Tiny()
    rec = align.Recorder(model, tmp_path / "d", steps=[0])
    with rec.step(0):
        loss = model(torch.randn(3, 4)).square().mean()
        torch.autograd.backward([loss])
        other = threading.Thread(target=lambda: (torch.ones(1, requires_grad=True) * 5).backward())
        other.start()
        other.join()
    step = LoopDump(tmp_path / "d").load(0, 0)
    assert float(step.state["loss"]) == float(loss.detach())


def test_recorders_in_two_threads_find_their_own_losses_and_leave_backward_as_it_was(tmp_path):
    """Steps that overlap in two threads, the first to start ending first: each records
    the loss of its own thread, and torch.autograd.backward is torch's again after both."""
    import threading

    original, inside, first_done = torch.autograd.backward, threading.Barrier(2), threading.Event()
    losses = {}

    def train(i: int) -> None:
        model = _Tiny()
        rec = align.Recorder(model, tmp_path / str(i), steps=[0])
        with rec.step(0):
            loss = model(torch.randn(3, 4)).square().mean() * (i + 1)
            inside.wait()
            if i == 1:
                first_done.wait()
            loss.backward()
            losses[i] = float(loss.detach())
        first_done.set()

    threads = [threading.Thread(target=train, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorded = {i: float(LoopDump(tmp_path / str(i)).load(0, 0).state["loss"]) for i in (0, 1)}
    assert recorded == losses
    assert torch.autograd.backward is original


def test_failed_step_writes_nothing_and_removes_its_hooks(tmp_path):
    model = _Tiny()
    rec = align.Recorder(model, tmp_path / "d", steps=[0])
    with pytest.raises(RuntimeError, match="boom"), rec.step(0):
        model(torch.randn(2, 4))
        raise RuntimeError("boom")
    assert not model.lin._forward_hooks and not model.lin._forward_pre_hooks
    assert [p.name for p in (tmp_path / "d" / "rank0").iterdir()] == ["loop.json"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": []}, "steps= must list step numbers"),
        ({"steps": [-1]}, "steps= must list step numbers"),
        ({"steps": [0], "optimizer": "adam"}, "optimizer= must be a torch.optim.Optimizer"),
        ({"steps": [0], "replay": "nowhere"}, "no rank0/loop.json"),
        ({"steps": [0], "draw": 0}, "draw= must be a positive integer"),
        ({"steps": [0], "draw": 1, "golden": True}, "re-runs the reference script"),
    ],
)
def test_bad_recorder_arguments_are_align_errors(tmp_path, kwargs, message):
    with pytest.raises(AlignError, match=message):
        align.Recorder(_Tiny(), tmp_path / "d", **kwargs)


def test_recorder_refuses_a_foreign_directory_and_a_bad_golden_or_replay(tmp_path):
    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank0" / "notes.txt").write_text("mine")
    with pytest.raises(AlignError, match="not an align loop dump"):
        align.Recorder(_Tiny(), tmp_path, steps=[0])
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(AlignError, match="without loss scaling"):
        align.Recorder(_Tiny(), tmp_path / "g", steps=[0], scaler=scaler, golden=True)
    model = _Tiny()
    rec = align.Recorder(model, tmp_path / "g", steps=[0], golden=True)
    assert model.lin.weight.dtype == torch.float64
    with rec.step(0), torch.autocast("cpu", dtype=torch.bfloat16):  # an AMP script, unchanged
        assert model(torch.randn(2, 4)).dtype == torch.float64
    ref = tmp_path / "ref"
    align.Recorder(model, ref, steps=[0])
    rec = align.Recorder(model, tmp_path / "t", steps=[5], replay=ref)
    with pytest.raises(TraceError, match="has no step 5"), rec.step(5):
        pass


class _Dropping(nn.Module):
    def __init__(self, drop: nn.Module):
        super().__init__()
        self.lin, self.drop, self.out = nn.Linear(4, 8), drop, nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.drop(self.lin(x)))


def _dropout_run(path: Path, drop: nn.Module, replay: Path | None = None) -> None:
    torch.manual_seed(0)
    model = _Dropping(drop).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with align.Recorder(model, path, steps=[0, 1], optimizer=opt, replay=replay) as rec:
        for step in range(2):
            with rec.step(step):
                model(torch.randn(6, 4)).square().mean().backward()
                opt.step()
                opt.zero_grad()


def test_a_fused_dropout_kernel_off_its_own_mask_fails_through_the_dumps(tmp_path):
    """The target replays the reference's masks, which hides a wrong fused dropout from
    the values; the dump records the fault and the comparison fails it, naming the step."""
    _dropout_run(tmp_path / "ref", nn.Dropout(0.5))
    _dropout_run(tmp_path / "clean", FusedDropout(0.5), replay=tmp_path / "ref")
    with fused_dropout_kernel(0.9):
        _dropout_run(tmp_path / "bad", FusedDropout(0.5), replay=tmp_path / "ref")
    assert align.compare(tmp_path / "ref", tmp_path / "clean").passed
    report = align.compare(tmp_path / "ref", tmp_path / "bad")
    first = report.first_divergence
    assert (first.module, first.tensor) == ("drop", "step 0 native_dropout"), str(report)
    assert "mask it returned" in first.message
    assert LoopDump(tmp_path / "bad").load(0, 1).trace.faults  # every recorded step


def test_a_bad_align_draw_variable_is_an_align_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_DRAW", "first")
    with pytest.raises(AlignError, match="ALIGN_DRAW='first': give the draw's number"):
        align.Recorder(_Tiny(), tmp_path / "d", steps=[0])


def test_a_new_reference_recording_drops_the_stale_draws_of_the_last(tmp_path):
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(align.Recorder(model, tmp_path / "d", steps=[0], optimizer=opt), model, opt, 1)
    _train(align.Recorder(model, tmp_path / "d", steps=[0], optimizer=opt, draw=1), model, opt, 1)
    assert [d.root.name for d in LoopDump(tmp_path / "d").draws()] == ["1"]
    align.Recorder(model, tmp_path / "d", steps=[0], optimizer=opt).close()
    assert LoopDump(tmp_path / "d").draws() == []


def test_fp16_gradients_are_recorded_unscaled_in_float32_not_flushed(tmp_path):
    """Under fp16 autocast with a GradScaler, a module's gradients are fp16 at the loss
    scale: divided by it in fp16 most would be subnormal or zero. They are recorded in
    float32, exactly the fp16 values over the scale (fp16's precision kept)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 4))
    seen = {}
    model[0].register_full_backward_hook(lambda m, gi, go: seen.update(go=go[0].clone()))
    fp16_scaled_step(model, tmp_path / "d", scale=65536.0)
    trace = LoopDump(tmp_path / "d").load(0, 0).trace
    conv = next(c for c in trace.calls if c.module == "0")
    recorded = trace.tensor(conv.grad_outputs[0])
    assert seen["go"].dtype == torch.float16 and recorded.dtype == torch.float32
    assert torch.equal(recorded, seen["go"].float() / 65536)
    assert (recorded.abs() < torch.finfo(torch.float16).tiny).float().mean() > 0.5  # below fp16
    assert held_dtype(recorded) == torch.float16


def test_odd_draws_run_a_convolutional_model_in_the_other_memory_format(tmp_path):
    def conv_net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))

    # 8 channels: an image (fewer) is left as it is (capture.FEW_CHANNELS)
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    laid_out = {}

    def train(draw: int | None) -> LoopDump:
        model = conv_net()
        model[0].register_forward_pre_hook(
            lambda m, args: laid_out.__setitem__(draw, args[0].is_contiguous())
        )
        rec = align.Recorder(model, tmp_path / "d", steps=[0], draw=draw)
        with rec.step(0):
            model(x).sum().backward()
        rec.close()  # the user's model as it was
        assert model[0].weight.is_contiguous() and not model._forward_pre_hooks
        return LoopDump(tmp_path / "d")

    dump = train(None)
    train(1)
    train(2)
    formats = {d.root.name: d.ranks[0]["memory_format"] for d in dump.draws()}
    assert formats == {"1": "channels_last", "2": None}
    assert laid_out == {None: True, 1: False, 2: True}  # the input follows the weights
    first, ref = dump.draws()[0].load(0, 0), dump.load(0, 0)
    mine, theirs = (s.trace.tensor(s.trace.param_grads["0.weight"]) for s in (first, ref))
    assert 0 < float((mine - theirs).norm() / theirs.norm()) < 1e-5  # rounding apart


def test_a_model_that_cannot_run_in_the_other_layout_is_told_to_draw_with_even_numbers(tmp_path):
    def train(draw: int | None, step: int) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), GlobalFilter(4, 8))
        rec = align.Recorder(model, tmp_path / "d", steps=[1], draw=draw)
        for n in range(step + 1):  # an unrecorded step, then a recorded one
            with rec.step(n):
                model(torch.randn(2, 8, 8, 8)).sum().backward()
        rec.close()

    train(None, 1)
    for step in (0, 1):
        with pytest.raises(RuntimeError, match="stride") as raised:
            train(1, step)
        assert "draw=2" in "\n".join(raised.value.__notes__)
    train(2, 1)
    draw = {d.root.name: d for d in LoopDump(tmp_path / "d").draws()}["2"]
    assert draw.ranks[0]["memory_format"] is None and draw.load(0, 1).trace.param_grads


def _record_two_steps(out: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 6, 6))  # the lazy layer's shape
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    rec = align.Recorder(model, out, steps=[0, 1], optimizer=opt, scaler=scaler)
    for n in range(2):
        with rec.step(n):
            scaler.scale(model(torch.randn(2, 3, 6, 6)).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()


def test_a_devices_tensors_are_queued_to_host_memory_and_written_after_one_wait(
    tmp_path, monkeypatch
):
    """On a device (faked: every tensor taken as one), a step's copies are queued to host
    memory, none kept on the device, and written after one synchronization per step; the
    dump is the host path's, bit for bit (gradients divided by the loss scale included)."""
    _record_two_steps(tmp_path / "host")
    waits = []
    monkeypatch.setattr("align.record.loop.on_host", lambda t: False)
    monkeypatch.setattr("align.record.loop.synchronize", waits.append)
    _record_two_steps(tmp_path / "device")
    assert waits == [torch.device("cpu")] * 2
    host, device = LoopDump(tmp_path / "host"), LoopDump(tmp_path / "device")
    for n in (0, 1):
        a, b = host.load(0, n), device.load(0, n)
        assert a.state.keys() == b.state.keys() and a.trace.keys() == b.trace.keys()
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
        assert all(torch.equal(a.trace.tensor(k), b.trace.tensor(k)) for k in a.trace.keys())


def _tiny_run(out: Path, wrap=lambda m: m, replay: Path | None = None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    run, opt = wrap(model), torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    with align.Recorder(run, out, steps=[0, 1], optimizer=opt, replay=replay) as rec:
        for n in range(2):
            with rec.step(n):
                run(data[n]).square().mean().backward()
                opt.step()
                opt.zero_grad()


def test_a_wrapped_model_is_recorded_by_the_names_of_the_model_inside(tmp_path):
    _tiny_run(tmp_path / "ref")
    wrap = lambda m: torch.compile(nn.DataParallel(m), backend="eager")  # noqa: E731
    _tiny_run(tmp_path / "tgt", wrap, replay=tmp_path / "ref")
    step = LoopDump(tmp_path / "tgt").load(0, 1)
    assert [c.module for c in step.trace.calls] == ["", "0", "1", "2"]
    assert sorted(step.trace.param_grads) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    report = align.compare(tmp_path / "ref", tmp_path / "tgt")
    assert report.passed, str(report)
    assert any("model is compiled (torch.compile)" in n for n in report.notes), report.notes


def _adam_run(out: Path, replay=None, golden=False, eps: float = 1e-8, jitter=False) -> None:
    """Four steps of Adam on a small MLP, steps 2 and 3 recorded; `eps` another epsilon,
    `jitter` every rounding nudged (an honest target)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=eps)
    data = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(1))
    recorder = align.Recorder(model, out, steps=[2, 3], optimizer=opt, replay=replay, golden=golden)
    with recorder as rec:
        for n in range(4):
            with rec.step(n), Jitter(n + 1) if jitter else contextlib.nullcontext():
                model(data[n]).square().mean().backward()
                opt.step()
                opt.zero_grad()


def test_after_unrecorded_steps_a_replaying_run_starts_from_the_references_state(tmp_path):
    """Unrecorded steps are not replayed, so honest runs part there: a replaying run takes
    the reference's parameters, buffers and optimizer state at step 2 and keeps its own
    under carried/, reported in a note, not judged; the golden does too. An honest target
    passes; a wrong epsilon in every step fails within step 2, computed from the
    reference's start."""
    _adam_run(tmp_path / "ref")
    _adam_run(tmp_path / "gold", replay=tmp_path / "ref", golden=True)
    _adam_run(tmp_path / "honest", replay=tmp_path / "ref", jitter=True)
    _adam_run(tmp_path / "eps", replay=tmp_path / "ref", eps=1e-3)
    ref, tgt = (LoopDump(tmp_path / side).load(0, 2) for side in ("ref", "eps"))
    assert tgt.info["start"] == {"unrecorded_before": 2, "adopted": True, "not_adopted": []}
    assert ref.info["start"] == {"unrecorded_before": 2, "adopted": False}
    adopted = [k for k in ref.state if k.startswith("before/")]
    assert any("/exp_avg_sq" in k for k in adopted) and any("/step" in k for k in adopted)
    assert all(torch.equal(ref.state[k], tgt.state[k]) for k in adopted)
    carried = tgt.state["carried/param/0.weight"]
    assert not torch.equal(carried, ref.state["before/param/0.weight"])  # its own, kept
    assert LoopDump(tmp_path / "gold").load(0, 2).info["start"]["adopted"]

    honest = align.compare(tmp_path / "ref", tmp_path / "honest", tmp_path / "gold")
    assert honest.passed, str(honest)
    assert any("after 2 unrecorded steps" in n for n in honest.notes), honest.notes
    report = align.compare(tmp_path / "ref", tmp_path / "eps", tmp_path / "gold")
    first = report.first_divergence
    assert not report.passed and "step 2 group 0 0.weight after" in first.tensor, str(report)
    assert not any(r.phase == "weights" for r in report.rows)  # the reference's own start


def _gan_run(out: Path, steps: int = 2, adam_eps: float = 1e-8, **kwargs) -> None:
    """A GAN's loop: the critic's SGD step, then the generator's Adam step, each called by
    the script itself (no top-level forward), two optimizers recorded together."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6))
    critic = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    opt_c = torch.optim.SGD(critic.parameters(), lr=1e-2, momentum=0.9)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-2, eps=adam_eps)
    batches = [(torch.randn(8, 4), torch.randn(8, 6) + 1) for _ in range(steps)]
    model = nn.ModuleDict({"gen": gen, "critic": critic})
    with align.Recorder(model, out, steps=range(steps), optimizer=[opt_c, opt_g], **kwargs) as rec:
        for n, (z, real) in enumerate(batches):
            with rec.step(n):
                (critic(gen(z).detach()).mean() - critic(real).mean()).backward()
                opt_c.step()
                opt_c.zero_grad()
                (-critic(gen(z)).mean()).backward()
                opt_g.step()
                opt_g.zero_grad()
                opt_c.zero_grad()


def test_several_optimizers_are_recorded_and_judged_by_param_group(tmp_path):
    """A GAN: both optimizers' states are recorded, groups numbered across them; the golden
    casts the inputs of the submodules the script calls; an honest draw passes and the
    generator's Adam with another epsilon fails at its group, the step named."""
    ref, gold, fault = tmp_path / "ref", tmp_path / "gold", tmp_path / "eps"
    _gan_run(ref)
    _gan_run(gold, replay=ref, golden=True)
    _gan_run(ref, draw=1)
    _gan_run(fault, replay=ref, adam_eps=1e-3)
    step = LoopDump(ref).load(0, 1)
    groups = step.info["groups"]
    assert [g["optimizer"] for g in groups] == [0, 1]
    assert [g["params"][0].split(".")[0] for g in groups] == ["critic", "gen"]
    assert "optim/0/critic.0.weight/momentum_buffer" in step.state
    assert "optim/1/gen.0.weight/exp_avg_sq" in step.state
    assert json.loads((ref / "rank0" / "loop.json").read_text())["optimizers"] == ["SGD", "Adam"]
    assert LoopDump(gold).load(0, 0).state["param/gen.0.weight"].dtype == torch.float64
    assert align.compare(ref, ref / "draws" / "1", gold).passed
    report = align.compare(ref, fault, gold)
    assert not report.passed
    first = report.first_divergence
    assert first.module.startswith("gen.") and "group 1" in first.tensor, first
    failing = [entry for entry in report.train["steps"] if entry["failing"]]
    assert failing[0]["step"] == 0 and failing[0]["first_divergence"].startswith("gen.")


def test_optimizer_must_be_an_optimizer_or_a_list_of_them(tmp_path):
    model = _Tiny()
    with pytest.raises(AlignError, match="a list of them"):
        align.Recorder(model, tmp_path / "d", steps=[0], optimizer=[])
    with pytest.raises(AlignError, match="a list of them"):
        align.Recorder(model, tmp_path / "d", steps=[0], optimizer=[torch.optim.SGD, "adam"])


@pytest.mark.parametrize("name", ["sparse_gradients", "complex_weights"])
def test_a_loop_with_sparse_gradients_or_complex_weights_is_recorded_and_judged(name, tmp_path):
    from align.testing.models import FNO

    def train(out: str, fault: bool = False, **recorder) -> None:
        torch.manual_seed(0)
        model = SparseBag() if name == "sparse_gradients" else FNO(width=8, modes=4)
        if fault:  # the weights the loop trains from, 0.3% off
            with torch.no_grad():
                next(model.parameters()).mul_(1.003)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        rec = align.Recorder(model, tmp_path / out, steps=[0, 1], optimizer=opt, **recorder)
        for step in range(2):
            if name == "sparse_gradients":
                x = torch.randint(0, 50, (4, 6), generator=gen)
            else:
                x = torch.randn(4, 2, 16, generator=gen)
            with rec.step(step):
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
        rec.close()

    train("ref")
    train("golden", golden=True, replay=tmp_path / "ref")
    train("same", replay=tmp_path / "ref")
    train("off", fault=True, replay=tmp_path / "ref")
    assert align.compare(tmp_path / "ref", tmp_path / "same", tmp_path / "golden").passed
    report = align.compare(tmp_path / "ref", tmp_path / "off", tmp_path / "golden")
    assert not report.passed, report


def test_a_gradient_penalty_loop_records_its_float64_golden_and_passes_honestly(tmp_path):
    # the golden casts the interpolates to float64 where they enter the model; the gradient
    # cast back to their float32 was kept float64 in backward and autograd refused it
    def critic() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(512, 1)
        )

    def train(out: Path, **recorder) -> None:
        model = critic()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
        gen = torch.Generator().manual_seed(1)
        with align.Recorder(model, out, steps=[0, 1], optimizer=opt, **recorder) as rec:
            for step in range(2):
                real, fake = (torch.randn(4, 3, 16, 16, generator=gen) for _ in range(2))
                eps = torch.rand(4, 1, 1, 1, generator=gen)
                with rec.step(step):
                    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
                    (g,) = torch.autograd.grad(model(x_hat).sum(), x_hat, create_graph=True)
                    penalty = ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
                    (model(fake).mean() - model(real).mean() + 10 * penalty).backward()
                    opt.step()
                    opt.zero_grad()

    train(tmp_path / "ref")
    train(tmp_path / "golden", golden=True, replay=tmp_path / "ref")
    for k in (1, 2):
        train(tmp_path / "ref", draw=k)
    train(tmp_path / "same", replay=tmp_path / "ref")
    report = align.compare(tmp_path / "ref", tmp_path / "same", tmp_path / "golden", model=critic())
    assert report.passed, str(report)
    golden = LoopDump(tmp_path / "golden").load(0, 0)
    assert golden.state["loss"].dtype == torch.float64


class _TopTokens(nn.Module):
    """Keeps the 4 of 12 tokens a linear score ranks highest (a token pruner); a `wrong`
    top-k kernel ranks them by scores off by a ripple of 5% of their largest."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.score, self.head, self.wrong = nn.Linear(8, 1), nn.Linear(8, 3), wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.score(x).squeeze(-1)
        if self.wrong:
            ripple = torch.cos(torch.arange(scores.shape[-1], dtype=scores.dtype) * 2.0)
            scores = scores + 0.05 * scores.detach().abs().max() * ripple
        index = scores.topk(4, dim=-1).indices
        kept = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(kept.mean(1))


def test_a_choice_kernel_hidden_by_the_replay_fails_by_how_far_its_choices_sat(tmp_path):
    # the target takes the reference's top-k indices: its values were the reference's and
    # the wrong kernel passed; its own choices, far from any tie, are judged now
    def train(out: Path, wrong: bool = False, jitter: bool = False, **recorder) -> None:
        torch.manual_seed(0)
        model = _TopTokens(wrong)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        with align.Recorder(model, out, steps=[0, 1], optimizer=opt, **recorder) as rec:
            for step in range(2):
                x, y = (
                    torch.randn(6, 12, 8, generator=gen),
                    torch.randint(0, 3, (6,), generator=gen),
                )
                with rec.step(step), Jitter(step + 1) if jitter else contextlib.nullcontext():
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()

    ref = tmp_path / "ref"
    train(ref)
    train(tmp_path / "golden", golden=True, replay=ref)
    for k in (1, 2):
        train(ref, draw=k)
    train(tmp_path / "honest", jitter=True, replay=ref)
    honest = align.compare(ref, tmp_path / "honest", tmp_path / "golden")
    assert honest.passed, str(honest)
    train(tmp_path / "wrong", wrong=True, replay=ref)
    report = align.compare(ref, tmp_path / "wrong", tmp_path / "golden")
    assert not report.passed
    first = report.first_divergence  # (topk ran in the model's own forward: <model>)
    assert first.module == "" and first.metric == "choice_gap", str(report)
    assert first.tensor == "step 0 topk choices", str(report)


def _ema_run(out: Path, fault: bool = False, jitter: bool = False, **recorder) -> nn.Module:
    """Three SGD steps with torch's EMA of the model, made before the Recorder (float32,
    as a script that builds its EMA beside the model has it)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from align.testing import FAULTS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    if fault:
        FAULTS["weight_grad_gain"](model, "2")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    data = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    with align.Recorder(model, out, steps=[0, 1, 2], optimizer=opt, **recorder) as rec:
        for n in range(3):
            with rec.step(n), Jitter(n + 1) if jitter else contextlib.nullcontext():
                model(data[n]).square().mean().backward()
                opt.step()
                opt.zero_grad()
                ema.update_parameters(model)
    return ema


def test_a_golden_run_updates_a_float32_ema_made_before_its_recorder(tmp_path):
    # the golden's float64 weights met the EMA's float32 ones in torch's foreach lerp:
    # "expected dtype float for `end` but got dtype double", out of the user's script
    ref = _ema_run(tmp_path / "ref").module[2].weight
    gold = _ema_run(tmp_path / "gold", replay=tmp_path / "ref", golden=True).module[2].weight
    assert gold.dtype == torch.float32  # updated in place, as the script keeps it
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))[2].weight
    torch.testing.assert_close(gold, ref)
    assert not torch.allclose(gold, start)
    _ema_run(tmp_path / "honest", replay=tmp_path / "ref", jitter=True)
    _ema_run(tmp_path / "fault", replay=tmp_path / "ref", fault=True)
    honest = align.compare(tmp_path / "ref", tmp_path / "honest", tmp_path / "gold")
    assert honest.passed, str(honest)
    report = align.compare(tmp_path / "ref", tmp_path / "fault", tmp_path / "gold")
    assert not report.passed and report.first_divergence.module == "2", str(report)


def test_a_loop_with_an_inference_mode_teacher_and_a_copy_made_mid_step(tmp_path):
    # a host buffer first filled inside the teacher's inference_mode was an inference
    # tensor, and the next step's copy into it raised "Inplace update to inference tensor
    # outside InferenceMode"; a copy of the model made mid-step kept the live recorder
    import copy
    import io

    from align.testing.models import USER_MODELS

    def run(out: Path, jitter: bool = False, **recorder) -> nn.Module:
        model, x = USER_MODELS["distiller"]()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with align.Recorder(model, out, steps=[0, 1], optimizer=opt, **recorder) as rec:
            for n in range(2):
                with rec.step(n), Jitter(n + 1) if jitter else contextlib.nullcontext():
                    model(x + n).mean().backward()
                    opt.step()
                    opt.zero_grad()
                    best = copy.deepcopy(model)
        return best

    torch.save(run(tmp_path / "ref"), io.BytesIO())  # (it could not be pickled)
    run(tmp_path / "gold", replay=tmp_path / "ref", golden=True)
    run(tmp_path / "honest", replay=tmp_path / "ref", jitter=True)
    report = align.compare(tmp_path / "ref", tmp_path / "honest", tmp_path / "gold")
    assert report.passed and report.rows, str(report)

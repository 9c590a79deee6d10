"""A full run from the command line's choices to result.json: check, launch, judge, write."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.numerics.precision import get_policy
from align.runtime import devices
from align.train import datasets, result
from align.train.launch import launch  # torch.distributed: imported only to run
from align.train.optim import optim_wrapper
from align.train.options import RunOptions, scaled_recipe
from align.train.verdict import Verdict, judge_run, judge_runs, noise_for
from align.zoo import get_case

TRAIN_DEVICES = ("cpu", "cuda", "npu")
TRAIN_TASKS = ("classification", "detection")
RESULT = "result.json"


def prepare(
    case_name: str,
    *,
    epochs: int | None = None,
    cards: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    data: str | Path | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    runs: int = 1,
) -> RunOptions:
    """Resolve and check a run (one, or `runs` judged together) before any worker starts;
    AlignError says what is wrong."""
    case = get_case(case_name)
    if case.task not in TRAIN_TASKS:
        raise AlignError(
            f"align.run trains {' and '.join(TRAIN_TASKS)} cases, not {case.task} ({case_name})"
            + (f": {case.skip}" if case.skip else "")
        )
    if case.recipe is None:
        raise AlignError(f"case {case_name!r} has no training recipe: nothing to run")
    figure = result.documented_figure(case_name, case.figures)  # fail now, not after training
    kind = _device_kind(device)
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise AlignError(f"--node-rank {node_rank} must be in 0..{nnodes - 1} (--nnodes {nnodes})")
    per_node = cards if cards is not None else max(1, case.recipe.cards // nnodes)
    if kind != "cpu" and per_node > devices.discover()[kind].count:
        raise AlignError(
            f"--cards {per_node}: only {devices.discover()[kind].count} {kind} device(s) here"
        )
    policy = get_policy(precision or case.recipe.precision).name
    if policy == "fp64":
        raise AlignError("fp64 is align's golden reference, not a training precision")
    recipe = scaled_recipe(
        case.recipe,
        epochs=epochs,
        cards=per_node * nnodes,
        batch_per_card=batch_size,
        lr=lr,
        precision=policy,
    )
    optim_wrapper(recipe, policy, kind)  # raises for a precision the device cannot train
    datasets.check(recipe.dataset, data)
    noise_for(case_name, figure.metric, figure.value, 0, runs=runs)  # its noise is known
    work = Path(work_dir) if work_dir else Path("work_dirs") / case_name
    if resume and not (work / "last_checkpoint").is_file():
        raise AlignError(
            f"--resume: no checkpoint in {work} (mmengine writes last_checkpoint there after "
            "each epoch); run without --resume to start from scratch"
        )
    _check_writable(work)
    return RunOptions(
        case=case_name,
        recipe=recipe,
        documented=case.recipe,
        device=kind,
        backend=devices.backend_for(kind),
        work_dir=work,
        cards_per_node=per_node,
        data=Path(data) if data else None,
        seed=seed,
        resume=resume,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
    )


def _check_writable(work: Path) -> None:
    """Create the work dir if needed and write a file there, or say why it cannot be used."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=work).close()
    except OSError as e:
        why = "a file of that name is in the way" if work.is_file() else e.strerror
        raise AlignError(
            f"--work-dir {work}: not a writable directory ({why}); name a directory this "
            "user can write (checkpoints, logs and result.json go there)"
        ) from None


def _device_kind(device: str | None) -> str:
    """cpu, cuda or npu: the requested one if usable here, else the best present."""
    kind = devices.resolve(device or "auto").type
    if device in (None, "auto") and kind not in TRAIN_DEVICES:
        return "cpu"
    if kind not in TRAIN_DEVICES:
        raise AlignError(f"align.run trains on {', '.join(TRAIN_DEVICES)}, not {kind}")
    return kind


def run(opts: RunOptions, runs: int = 1) -> dict[str, Any] | None:
    """Train, judge and write `<work_dir>/result.json`; None on a node other than node 0.

    `runs`: how many runs will be judged together (see `noise_for`)."""

    report = launch(opts)
    if report is None:
        return None
    figure = result.documented_figure(opts.case, get_case(opts.case).figures)
    noise = noise_for(opts.case, figure.metric, figure.value, report["n_val"], runs=runs)
    verdict = judge_run(figure.metric, figure.value, report["final"][figure.metric], noise)
    out = result.build(opts, report, figure, verdict)
    result.write(opts.work_dir / RESULT, out)
    return out


def repeat(opts: RunOptions, k: int) -> tuple[list[dict[str, Any]], Verdict]:
    """K runs with seeds seed..seed+K-1 in <work_dir>/seed<S>/, judged on their mean."""
    runs = []
    for seed in range(opts.seed, opts.seed + k):
        one = dataclasses.replace(opts, seed=seed, work_dir=opts.work_dir / f"seed{seed}")
        out = run(one, runs=k)
        if out is None:
            raise AlignError("--repeat is judged on node 0; this node only trained")
        runs.append(out)
    return runs, compare(runs)


def compare(results: list[dict[str, Any]]) -> Verdict:
    """The verdict over several results of the same case (--repeat, --compare)."""
    cases = {r["case"] for r in results}
    if len(cases) != 1:
        raise AlignError(f"cannot judge results of different cases together: {sorted(cases)}")
    doc = results[0]["documented"]
    metric, documented = doc["metric"], doc["value"]
    n_val = results[0]["n_val"]
    noise = noise_for(cases.pop(), metric, documented, n_val, runs=len(results))
    return judge_runs(metric, documented, [r["final"][metric] for r in results], noise)

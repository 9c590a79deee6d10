"""align.record.msprobe on real msprobe output: dumps written by mindstudio-probe 26.2.0
(tests/record/data/msprobe_real, made by its make.py), read and compared as committed.

The net is features (Conv2d, BatchNorm2d, ReLU), flat, head (Linear); `fault` scales the
BatchNorm weight by 1.01, `clean` runs another conv kernel (fp32 rounding only), `golden`
is the reference in float64. Tensor dumps hold step 0, statistics dumps steps 0 and 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import align
from align.judge.traces import IDENTICAL
from align.record.msprobe import is_msprobe_dump, keyed_dumps, load_msprobe, statistics_only

DATA = Path(__file__).parent / "data" / "msprobe_real"
PARAMS = {"features.0.weight", "features.1.weight", "features.1.bias", "head.weight", "head.bias"}


def _labels(trace) -> list[str]:
    return [c.label for c in trace.calls]


def test_proc_directories_are_keyed_by_step_so_two_runs_pair():
    """msprobe names a run without ranks proc<pid>: the pid differs, the step pairs."""
    ref, fault = (
        keyed_dumps(DATA / "ref" / "statistics_mix"),
        keyed_dumps(DATA / "fault" / "statistics_mix"),
    )
    assert list(ref) == list(fault) == ["step0", "step1"]
    assert ref["step0"].name.startswith("proc") and ref["step0"].name != fault["step0"].name
    assert is_msprobe_dump(ref["step0"]) and is_msprobe_dump(ref["step0"].parent)
    assert list(keyed_dumps(ref["step1"].parent)) == ["."]


def test_mix_dump_reads_modules_apis_and_parameter_gradients():
    trace = load_msprobe(DATA / "ref" / "tensor_mix")
    assert trace.meta | {"path": None, "where": None} == {
        **trace.meta,
        "path": None,
        "where": None,
        "task": "tensor",
        "level": "mix",
        "framework": "pytorch",
    }
    labels = _labels(trace)
    for label in (
        "features",
        "features.0",
        "features.1",
        "head",
        "features.0/Functional.conv2d",
        "features.1/Functional.batch_norm",
        "features.2/Functional.relu",
        "head/Functional.linear",
        "Functional.mse_loss",
    ):
        assert label in labels, labels
    # optimizer.step()'s APIs sit under msprobe's "optimizer": one add_ per parameter
    assert [x for x in labels if x.startswith("optimizer/")] == [
        "optimizer/Tensor.add_",
        *(f"optimizer/Tensor.add_#{n}" for n in range(1, 5)),
    ]
    calls = trace.by_key()
    assert trace.calls[calls[("features.0", 0)].parent].label == "features"
    conv = calls[("features.0/Functional.conv2d", 0)]
    assert trace.calls[conv.parent].label == "features.0"
    # the dumped inputs reproduce the dumped output: slots are mapped in order
    x, w = (trace.tensor(k) for k in conv.inputs[:2])
    assert torch.allclose(F.conv2d(x, w, padding=1), trace.tensor(conv.outputs[0]), atol=1e-6)
    # backward: null for x (no grad), then the weight gradient, as parameters_grad.0 has it
    assert conv.grad_inputs[0] is None
    grad_w = trace.tensor(conv.grad_inputs[1])
    assert set(trace.param_grads) == PARAMS
    assert torch.equal(grad_w, trace.tensor(trace.param_grads["features.0.weight"]))
    assert trace.meta["where"]["features.0"].startswith("make.py:")


def test_levels_name_api_calls_by_module_only_where_construct_json_allows():
    mix = _labels(load_msprobe(DATA / "ref" / "tensor_mix"))
    l1 = load_msprobe(DATA / "ref" / "tensor_L1")
    l0 = load_msprobe(DATA / "ref" / "tensor_L0")
    assert "features.1/Functional.batch_norm" in mix and "Functional.batch_norm" not in mix
    assert "Functional.batch_norm" in _labels(l1)
    assert all("/" not in x for x in _labels(l1)) and not l1.param_grads
    assert all(c.cls != "api" for c in l0.calls) and set(l0.param_grads) == PARAMS
    assert [c.label for c in l0.calls if c.parent is None] == ["features", "flat", "head"]


@pytest.mark.parametrize(
    "dump, first",
    [
        ("tensor_mix", "features.1/parameters.weight"),  # the weight itself (L0, mix)
        ("tensor_L0", "features.1/parameters.weight"),
        ("tensor_L1", "Functional.batch_norm"),  # no modules, no parameters: its first use
    ],
)
def test_faulty_batchnorm_is_named_first(dump, first):
    report = align.compare(DATA / "ref" / dump, DATA / "fault" / dump)
    assert not report.passed
    divergence = report.first_divergence
    assert (divergence.module, divergence.phase) == (first, "forward")
    assert report.meta["reference"] == str(DATA / "ref" / dump)


def test_clean_target_passes_and_differs_from_the_reference():
    ref, clean = DATA / "ref" / "tensor_mix", DATA / "clean" / "tensor_mix"
    report = align.compare(ref, clean)
    assert report.passed, report
    assert IDENTICAL not in report.notes  # another conv kernel: fp32 rounding, not bits
    assert any(r.metrics["rel_rmse"] > 0 for r in report.rows)
    assert IDENTICAL in align.compare(ref, ref).notes


def test_float64_msprobe_dump_is_a_golden():
    golden = DATA / "golden" / "tensor_mix"
    assert load_msprobe(golden).meta["precision"] == "fp64"
    ref = DATA / "ref" / "tensor_mix"
    clean = align.compare(ref, DATA / "clean" / "tensor_mix", golden=golden)
    assert clean.passed and not any("no golden trace" in n for n in clean.notes)
    assert any(r.reference.get("rel_rmse", 0) > 0 for r in clean.rows)  # the ref's own error
    fault = align.compare(ref, DATA / "fault" / "tensor_mix", golden=golden)
    assert fault.first_divergence.module == "features.1/parameters.weight"


@pytest.mark.parametrize(
    "dump, first",
    [
        ("statistics_mix", "features.1/parameters.weight"),
        ("statistics_L1", "Functional.batch_norm"),
    ],
)
def test_statistics_dumps_are_judged_with_the_weaker_evidence_note(dump, first):
    trace = load_msprobe(DATA / "ref" / dump / "step0")
    assert statistics_only(trace) and not any(DATA.joinpath("ref", dump).rglob("*.pt"))
    report = align.compare(DATA / "ref" / dump, DATA / "fault" / dump)
    assert not report.passed and report.meta["dumps"] == ["step0", "step1"]
    assert report.meta["first_failing_dump"] == "step0"
    assert report.first_divergence.module == f"[step0] {first}"
    assert any("statistics only" in n and "much weaker evidence" in n for n in report.notes)
    if dump == "statistics_mix":
        assert align.compare(DATA / "ref" / dump, DATA / "clean" / dump).passed


def test_a_fresh_msprobe_dump_matches_the_committed_one(tmp_path):
    """Regenerate the reference with the msprobe installed here (skipped without it)."""
    pytest.importorskip("msprobe", reason="mindstudio-probe is not installed here")
    subprocess.run(
        [sys.executable, str(DATA / "make.py"), str(tmp_path), "ref/tensor_mix"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    fresh = tmp_path / "ref" / "tensor_mix"
    assert _labels(load_msprobe(fresh)) == _labels(load_msprobe(DATA / "ref" / "tensor_mix"))
    report = align.compare(DATA / "ref" / "tensor_mix", fresh)
    assert report.passed, report


@pytest.mark.parametrize("dump", ["tensor_L0", "statistics_mix"])
def test_a_weight_that_differs_is_named_before_the_module_it_changes(tmp_path, dump):
    """What an update that differs (a fused optimizer, a skipped step) leaves at the next
    step: the same activations in, other weights. The weight is named, before the module
    whose output it changes."""
    target = tmp_path / dump
    shutil.copytree(DATA / "ref" / dump, target)
    step = sorted(target.glob("step*"))[-1]
    dump_json = next(step.glob("*/dump.json"))
    data = json.loads(dump_json.read_text())
    weight = data["data"]["Module.head.Linear.forward.0"]["parameters"]["weight"]
    if "data_name" in weight:
        pt = dump_json.parent / "dump_tensor_data" / weight["data_name"]
        torch.save(torch.load(pt) * 1.01, pt)
    else:
        for stat in ("Max", "Min", "Mean", "Norm"):
            weight[stat] *= 1.01
        dump_json.write_text(json.dumps(data))
    report = align.compare(DATA / "ref" / dump, target)
    assert not report.passed
    prefix = f"[{step.name}] " if len(list(target.glob("step*"))) > 1 else ""
    assert report.first_divergence.module == f"{prefix}head/parameters.weight"
    assert report.first_divergence.phase == "forward"


def test_every_api_backward_of_a_real_dump_is_replayed_in_msprobes_order():
    """msprobe dumps a call's backward as its output's autograd node sees it (the linear's
    addmm: bias, input, transposed weight; the batch_norm's: input, weight, bias; the
    in-place ReLU's on its input): each is re-run so, the clean target passes them all, and
    every gradient the dump holds is judged (none was before for the linear or batch_norm,
    whose order is not their arguments')."""
    ref, clean = DATA / "ref" / "tensor_mix", DATA / "clean" / "tensor_mix"
    report = align.compare(ref, clean)
    replayed = {
        (r.module.rpartition("/")[2], r.tensor)
        for r in report.local_rows
        if r.phase == "backward" and r.passed
    }
    assert {
        ("Functional.linear", "grad_input[0]"),  # bias
        ("Functional.linear", "grad_input[2]"),  # weight, transposed
        ("Functional.batch_norm", "grad_input[0]"),
        ("Functional.batch_norm", "grad_input[1]"),
        ("Functional.relu", "grad_input[0]"),
    } <= replayed, replayed
    assert not any("backward" in n and "not re-run" in n for n in report.notes), report.notes

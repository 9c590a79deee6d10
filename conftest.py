"""align's pytest plugin: options, markers, device discovery and the registry-driven cases.

    pytest cases/                       cpu-target variants run; cuda / npu variants skip
    pytest -m npu cases/                the NPU variants (each skips with the reason if none)
    pytest cases/ --precision fp32 --case 'resnet*'

Nothing heavy is imported here at import time: torch, the registry and device discovery
load when a test needs them (discovery once per session).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

import pytest

# Device variants of every case, each with the marker that selects it.
VARIANTS = ("cpu", "cuda", "npu")
PHASES = ("forward", "backward")
_DEFAULTS = {
    "target": "auto",
    "reference": "cpu",
    "precision": "fp32,amp-bf16",
    "case": "*",
    "emulate": "npu-fp32",
    "align_report": None,
}
_MARKERS = {
    "npu": "runs on an Ascend NPU (torch_npu); skips with the reason when none is present",
    "cuda": "runs on a CUDA GPU; skips with the reason when none is present",
    "cpu": "runs on the CPU (the target emulates a device's numerics with --emulate)",
    "slow": "takes more than about 10 s on two CPU cores; deselect with -m 'not slow'",
    "nightly": "belongs to the nightly run (full zoo, every precision), not to each push",
}
_PRECISION_ALIASES = {"O1": "amp-fp16", "O2": "o2-fp16", "o1": "amp-fp16", "o2": "o2-fp16"}


def pytest_addoption(parser: pytest.Parser) -> None:
    """The `align` option group."""
    group = parser.getgroup("align", "align: cross-device accuracy alignment")
    group.addoption(
        "--target",
        default=_DEFAULTS["target"],
        help="device of the accelerator variants: auto = each variant's own kind "
        "(cuda, npu); a device such as npu:1 pins the variant of that kind (default: auto)",
    )
    group.addoption(
        "--reference",
        default=_DEFAULTS["reference"],
        help="device the target is judged against (default: cpu)",
    )
    group.addoption(
        "--precision",
        default=_DEFAULTS["precision"],
        help="comma list of fp32, amp-fp16, amp-bf16, o2-fp16 (aliases O1, O2) "
        "(default: fp32,amp-bf16)",
    )
    group.addoption(
        "--case",
        dest="align_case",
        default=_DEFAULTS["case"],
        metavar="PATTERN",
        help="fnmatch pattern of the cases to run, e.g. 'resnet*' (default: *)",
    )
    group.addoption(
        "--emulate",
        default=_DEFAULTS["emulate"],
        metavar="PROFILE",
        help="numerics profile the cpu-target variants emulate (align.emulate) (default: npu-fp32)",
    )
    group.addoption(
        "--align-report",
        dest="align_report",
        default=_DEFAULTS["align_report"],
        metavar="DIR",
        help="write one result JSON per alignment test to DIR (python -m align.report DIR "
        "renders them) and add their key figures as JUnit properties",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers (one line of help each) and check --precision."""
    for name, help_text in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")
    config._align_precisions = _parse_precisions(config.getoption("precision"))  # type: ignore[attr-defined]


def _parse_precisions(value: str) -> tuple[str, ...]:
    known = ("fp32", "amp-fp16", "amp-bf16", "o2-fp16")
    out = []
    for item in (p.strip() for p in value.split(",")):
        if not item:
            continue
        item = _PRECISION_ALIASES.get(item, item)
        if item not in known:
            raise pytest.UsageError(
                f"--precision: unknown precision {item!r}; use a comma list of "
                f"{', '.join(known)} (aliases O1, O2)"
            )
        if item not in out:
            out.append(item)
    if not out:
        raise pytest.UsageError("--precision: give at least one precision")
    return tuple(out)


def pytest_report_header(config: pytest.Config) -> str:
    """One header line with the alignment options in force."""
    opts = config.option
    return (
        f"align: reference={opts.reference} target={opts.target} "
        f"precision={','.join(config._align_precisions)} case={opts.align_case} "  # type: ignore[attr-defined]
        f"emulate={opts.emulate}"
    )


# -- parametrization from the registry -------------------------------------------------


@dataclass(frozen=True)
class AlignParams:
    """One alignment test: a case on a device variant, one phase, one precision."""

    case: str
    variant: str
    phase: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.case}-{self.variant}-{self.phase}-{self.precision}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `align_params` from the registry: the module's FAMILY x variants x
    phases x --precision, filtered by --case; markers per variant, skips per case."""
    if "align_params" not in metafunc.fixturenames:
        return
    from align.cases import get_case, list_cases

    family = getattr(metafunc.module, "FAMILY", None)
    if family is None:
        raise pytest.UsageError(f"{metafunc.module.__name__} uses align_params but sets no FAMILY")
    config = metafunc.config
    names = [n for n in list_cases(config.getoption("align_case")) if get_case(n).family == family]
    params = []
    for name in names:
        case = get_case(name)
        case_marks = [pytest.mark.slow] if "slow" in case.tags else []
        if case.skip:
            case_marks.append(pytest.mark.skip(reason=f"{name}: {case.skip}"))
        for variant in VARIANTS:
            marks = [getattr(pytest.mark, variant), *case_marks]
            for phase in PHASES:
                for precision in config._align_precisions:  # type: ignore[attr-defined]
                    p = AlignParams(name, variant, phase, precision)
                    slow = [pytest.mark.slow] if precision in case.slow_precisions else []
                    params.append(pytest.param(p, id=p.id, marks=marks + slow))
    metafunc.parametrize("align_params", params)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def align_devices() -> dict[str, Any]:
    """Device discovery, once per session: kind -> status with `.available`, `.reason`."""
    from align.devices import discover

    return discover()


_REPORTS = pytest.StashKey[dict]()  # (case, target, precision, reference) -> Report

_NO_DEVICE = {"cpu": "CPU", "cuda": "CUDA GPU", "npu": "NPU", "mps": "MPS"}


@pytest.fixture
def align_target(
    align_params: AlignParams, align_devices: dict[str, Any], request: pytest.FixtureRequest
) -> str:
    """The target device of this variant; skips (at setup) when it or the reference is absent."""
    config = request.config
    variant = align_params.variant
    status = align_devices.get(variant)
    if status is None or not status.available:
        reason = status.reason if status is not None else "not probed"
        pytest.skip(f"no {_NO_DEVICE[variant]}: {reason}")
    reference = config.getoption("reference")
    ref_kind = reference.split(":")[0]
    ref_status = align_devices.get(ref_kind)
    if ref_status is not None and not ref_status.available:
        pytest.skip(f"reference {reference} unavailable: {ref_status.reason}")
    pinned = config.getoption("target")
    if pinned != "auto" and pinned.split(":")[0] == variant:
        return pinned
    return variant


def reproduce_command(request: pytest.FixtureRequest) -> str:
    """The one command that reruns this test alone, with the align options it ran under."""
    config = request.config
    parts = ["pytest", request.node.nodeid]
    for opt, dest in (
        ("--reference", "reference"),
        ("--target", "target"),
        ("--emulate", "emulate"),
    ):
        value = config.getoption(dest)
        if value != _DEFAULTS[dest]:
            parts += [opt, value]
    precision = request.getfixturevalue("align_params").precision
    if precision not in _parse_precisions(_DEFAULTS["precision"]):
        parts += ["--precision", precision]  # else the node id is not collected
    return shlex.join(parts)


@pytest.fixture
def run_alignment(
    align_params: AlignParams,
    align_target: str,
    request: pytest.FixtureRequest,
    record_property: Any,
) -> Any:
    """Run `align.check` for this test's case / variant / phase / precision and fail with
    the report and the command that reproduces the failure alone."""

    def run() -> Any:
        import align

        p = align_params
        config = request.config
        record_property("align_case", p.case)
        record_property("align_target", align_target)
        record_property("align_phase", p.phase)
        record_property("align_precision", p.precision)
        # forward and backward of one case share one check (backward needs the forward)
        cache = config.stash.setdefault(_REPORTS, {})
        key = (p.case, align_target, p.precision, config.getoption("reference"))
        if key not in cache:
            cache[key] = align.check(
                p.case,
                None,
                reference=config.getoption("reference"),
                target=align_target,
                precision=p.precision,
                phases=PHASES,
                seed=0,
                emulate=config.getoption("emulate") if p.variant == "cpu" else None,
            )
        report = cache[key].select(p.phase)
        report_dir = config.getoption("align_report")
        if report_dir:
            from align.pytest_results import record_result

            meta = {
                "variant": p.variant,
                "target": align_target,
                "phase": p.phase,
                "precision": p.precision,
                "reproduce": reproduce_command(request),
            }
            record_result(request.node, {**report.to_dict(), **meta}, report_dir)
        if not report.passed:
            pytest.fail(f"{report}\n\nreproduce alone: {reproduce_command(request)}", pytrace=False)
        return report

    return run

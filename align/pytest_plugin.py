"""align's pytest plugin, registered as the `pytest11` entry point `align`.

Check your own model in your own tests:

    def test_mine(align_check):
        report = align_check(model, x)      # align.check with --align-* options in force
        assert report.passed, report

`align_check` runs once per precision of `--align-precision` (the test id ends in it),
on `--align-target` (auto: the best device present; on a CPU the target emulates
`--align-emulate` numerics) against `--align-reference`.

A test parametrized over `align_case` (registered case names, e.g. from
`align.list_cases(family=...)`) and using `run_alignment` runs each case on every device
variant (cpu / cuda / npu, marked so), phase and precision: align's own `cases/`.

Markers: `npu`, `cuda`, `cpu` on device variants; `slow` on the precisions a case
declares slow; `nightly` on precisions beyond the per-push set (fp32, amp-bf16), which
are collected only when --align-precision names them (the nightly job, ci/nightly.yml,
passes `all`; `-m "not nightly"` keeps such a run to the push set). Each check adds
JUnit properties (align_passed, align_culprit, align_reproduce...); a failing test gets
an "align" report section and a line in the terminal summary with the one command that
reruns it alone. Nothing heavy is imported here: torch, the registry and device
discovery (once per session) load when a test needs them.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from align.errors import AlignError
from align.numerics.names import PHASES as CHECK_PHASES
from align.numerics.names import PRECISIONS, canonical_precision
from align.runtime.devices import KINDS  # light: torch loads only when discovery runs

VARIANTS = ("cpu", "cuda", "npu")  # device variants of every case, each with its marker
PHASES = CHECK_PHASES[:2]  # each test checks one; "train" is the short training, not run here
PUSH_PRECISIONS = ("fp32", "amp-bf16")  # the default; the others are marked nightly
_DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA GPU", "npu": "NPU", "mps": "MPS"}
_DEFAULTS = {"target": "auto", "reference": "cpu", "emulate": "npu-fp32"}
_MARKERS = {
    "npu": "a variant whose target is an Ascend NPU (torch_npu); skips with the reason "
    "when none is present",
    "cuda": "a variant whose target is a CUDA GPU; skips with the reason when none is present",
    "cpu": "a variant whose target is the CPU emulating a device's numerics (--align-emulate)",
    "slow": "a precision the case declares slow (minutes on two CPU cores); deselect with "
    "-m 'not slow'",
    "nightly": "a precision beyond the per-push fp32 and amp-bf16, collected only when "
    "--align-precision names it; the nightly job (ci/nightly.yml) passes 'all'",
}


@dataclass(frozen=True)
class Options:
    """The --align-* options of a session, parsed and checked once (config.stash)."""

    target: str
    reference: str
    precisions: tuple[str, ...]
    cases: tuple[str, ...]
    emulate: str | None
    report_dir: str | None

    def reproduce(self, nodeid: str, precision: str) -> str:
        """The one command that reruns test `nodeid` alone, with the options it ran under."""
        parts = ["pytest", nodeid]
        for name in ("reference", "target"):
            if getattr(self, name) != _DEFAULTS[name]:
                parts += [f"--align-{name}", getattr(self, name)]
        if self.emulate != _DEFAULTS["emulate"]:
            parts += ["--align-emulate", self.emulate or "none"]
        if precision not in PUSH_PRECISIONS:
            parts += ["--align-precision", precision]  # else its node id is not collected
        return shlex.join(parts)


OPTIONS = pytest.StashKey[Options]()
_CHECKS = pytest.StashKey[list]()  # item: the result dicts of its checks
_REPORTS = pytest.StashKey[dict]()  # config: (case, target, precision) -> Report of both phases


def pytest_addoption(parser: pytest.Parser) -> None:
    """The `align` option group."""
    group = parser.getgroup("align", "align: cross-device accuracy alignment")
    group.addoption(
        "--align-target",
        default=_DEFAULTS["target"],
        metavar="DEVICE",
        help="device under test: auto = the best present for align_check and each variant's "
        "own kind for the cases; npu:1 pins it (default: auto)",
    )
    group.addoption(
        "--align-reference",
        default=_DEFAULTS["reference"],
        metavar="DEVICE",
        help="device the target is judged against (default: cpu)",
    )
    group.addoption(
        "--align-precision",
        default=",".join(PUSH_PRECISIONS),
        metavar="LIST",
        help=f"comma list of {', '.join(PRECISIONS)} (aliases O1, O2) or 'all'; each test "
        f"runs once per precision (default: {','.join(PUSH_PRECISIONS)})",
    )
    group.addoption(
        "--align-case",
        default="*",
        metavar="PATTERNS",
        help="comma list of fnmatch patterns of the registered cases to run, e.g. 'resnet*'; "
        "a pattern matching no case is a usage error (default: *)",
    )
    group.addoption(
        "--align-emulate",
        default=_DEFAULTS["emulate"],
        metavar="PROFILE",
        help="numerics a CPU target emulates (align.numerics.emulate), 'none' for off "
        "(default: npu-fp32)",
    )
    group.addoption(
        "--align-report",
        default=None,
        metavar="DIR",
        help="write one result JSON per check to DIR (python -m align.report DIR renders them)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers (one line of help each) and parse the options into the stash."""
    for name, help_text in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")
    emulate = config.getoption("align_emulate")
    config.stash[OPTIONS] = Options(
        target=_device(config.getoption("align_target"), "--align-target", allow_auto=True),
        reference=_device(config.getoption("align_reference"), "--align-reference"),
        precisions=_parse_precisions(config.getoption("align_precision")),
        cases=tuple(p.strip() for p in config.getoption("align_case").split(",") if p.strip())
        or ("*",),
        emulate=None if emulate == "none" else emulate,
        report_dir=config.getoption("align_report"),
    )


def _device(spec: str, option: str, allow_auto: bool = False) -> str:
    """`spec` if it names a device kind (with an optional :N), else a usage error."""
    kind, _, index = spec.partition(":")
    kinds = (("auto",) if allow_auto else ()) + KINDS
    if kind not in kinds or (index and (not index.isdigit() or kind in ("auto", "cpu", "mps"))):
        raise pytest.UsageError(
            f"{option}: unknown device {spec!r}; use {', '.join(kinds)} or npu:N, cuda:N"
        )
    return spec


def _parse_precisions(value: str) -> tuple[str, ...]:
    """The precisions of --align-precision, aliases resolved, in order, without repeats."""
    if value.strip() == "all":
        return PRECISIONS
    out: list[str] = []
    for item in (p.strip() for p in value.split(",") if p.strip()):
        try:
            item = canonical_precision(item)
        except AlignError as exc:
            raise pytest.UsageError(f"--align-precision: {exc}, as a comma list, or all") from None
        if item not in out:
            out.append(item)
    if not out:
        raise pytest.UsageError("--align-precision: give at least one precision")
    return tuple(out)


def pytest_report_header(config: pytest.Config) -> str:
    """One header line with the alignment options in force."""
    o = config.stash[OPTIONS]
    return (
        f"align: reference={o.reference} target={o.target} precision={','.join(o.precisions)} "
        f"case={','.join(o.cases)} emulate={o.emulate or 'none'}"
    )


# -- parametrization ---------------------------------------------------------------------


@pytest.hookimpl(trylast=True)  # after the test's own parametrize: ids read case-variant-...
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize align_variant, align_phase and align_precision wherever they are used."""
    names = metafunc.fixturenames
    if "align_variant" in names:
        metafunc.parametrize(
            "align_variant", [pytest.param(v, marks=getattr(pytest.mark, v)) for v in VARIANTS]
        )
    if "align_phase" in names:
        metafunc.parametrize("align_phase", PHASES)
    if "align_precision" in names:
        params = [
            pytest.param(p, marks=[] if p in PUSH_PRECISIONS else [pytest.mark.nightly])
            for p in metafunc.config.stash[OPTIONS].precisions
        ]
        metafunc.parametrize("align_precision", params)


@pytest.hookimpl(tryfirst=True)  # before -m / -k deselect: the marks added here count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the cases --align-case names (none matching is a usage error); mark each case
    variant slow or skipped as its registry entry says."""
    options = config.stash[OPTIONS]
    cased = [i for i in items if "align_case" in _params(i)]
    if options.cases == ("*",) and not cased:
        return
    import fnmatch

    from align.zoo import get_case, list_cases

    unmatched = [p for p in options.cases if not list_cases(p)]
    if unmatched:
        raise pytest.UsageError(
            f"--align-case {','.join(unmatched)!r} matches no registered case; "
            f"registered: {', '.join(list_cases())}"
        )
    deselected = []
    for item in cased:
        params = _params(item)
        name = params["align_case"]
        if not any(fnmatch.fnmatch(name, p) for p in options.cases):
            deselected.append(item)
            continue
        case = get_case(name)
        if "slow" in case.tags or params.get("align_precision") in case.slow_precisions:
            item.add_marker(pytest.mark.slow)
        if case.skip:
            item.add_marker(pytest.mark.skip(reason=f"{name}: {case.skip}"))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        dropped = set(deselected)
        items[:] = [i for i in items if i not in dropped]


def _params(item: pytest.Item) -> dict[str, Any]:
    """The parameters of a parametrized test item ({} for any other)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def align_devices() -> dict[str, Any]:
    """Device discovery, once per session: kind -> status with `.available`, `.reason`."""
    from align.runtime.devices import discover

    return discover()


def _require(devices: dict[str, Any], spec: str, role: str) -> None:
    """Skip (with discovery's reason) when the device of `spec` is not usable here."""
    kind = spec.split(":")[0]
    status = devices[kind]
    if not status.available:
        pytest.skip(f"{role}: no {_DEVICE_NAMES[kind]}: {status.reason}")


def _record(request: pytest.FixtureRequest, report: Any, meta: dict[str, Any]) -> None:
    """Keep a check's result on its test (the report hooks read it) and write its file."""
    options = request.config.stash[OPTIONS]
    meta["reproduce"] = options.reproduce(request.node.nodeid, meta["precision"])
    checks = request.node.stash.setdefault(_CHECKS, [])
    result = {**report.to_dict(), **meta, "nodeid": request.node.nodeid}
    checks.append(result)
    if options.report_dir:
        from align.pytest_records import write_result

        name = request.node.nodeid + (f"#{len(checks)}" if len(checks) > 1 else "")
        write_result(name, result, options.report_dir)


@pytest.fixture
def align_check(
    align_precision: str, align_devices: dict[str, Any], request: pytest.FixtureRequest
) -> Callable[..., Any]:
    """`align_check(model, inputs=None, **kwargs) -> Report`: align.check at this test's
    precision on --align-target against --align-reference; kwargs go to align.check."""
    options = request.config.stash[OPTIONS]
    _require(align_devices, options.reference, "reference")
    if options.target == "auto":
        target = next(k for k in KINDS if align_devices[k].available)
    else:
        _require(align_devices, options.target, "target")
        target = options.target
    both_cpu = target == "cpu" and options.reference.split(":")[0] == "cpu"
    emulate = options.emulate if both_cpu else None

    def check(model: Any, inputs: Any = None, **kwargs: Any) -> Any:
        taken = sorted({"reference", "target", "precision", "emulate"} & kwargs.keys())
        if taken:
            raise TypeError(f"align_check: {', '.join(taken)} come from the --align-* options")
        import align

        report = align.check(
            model,
            inputs,
            reference=options.reference,
            target=target,
            precision=align_precision,
            emulate=emulate,
            **kwargs,
        )
        _record(request, report, {"target": target, "precision": align_precision})
        return report

    return check


@pytest.fixture
def align_target(
    align_variant: str, align_devices: dict[str, Any], request: pytest.FixtureRequest
) -> str:
    """The target device of this case variant; skips (at setup) when it or the reference
    is absent."""
    options = request.config.stash[OPTIONS]
    _require(align_devices, align_variant, "target")
    _require(align_devices, options.reference, "reference")
    return options.target if options.target.split(":")[0] == align_variant else align_variant


@pytest.fixture
def run_alignment(
    align_case: str,
    align_variant: str,
    align_phase: str,
    align_precision: str,
    align_target: str,
    request: pytest.FixtureRequest,
) -> Callable[[], Any]:
    """`run_alignment()`: align.check of this case variant at this phase and precision;
    fails with the report (forward and backward of a case share one check)."""

    def run() -> Any:
        import align

        config = request.config
        options = config.stash[OPTIONS]
        cache = config.stash.setdefault(_REPORTS, {})
        key = (align_case, align_target, align_precision)
        if key not in cache:
            cache[key] = align.check(
                align_case,
                None,
                reference=options.reference,
                target=align_target,
                precision=align_precision,
                phases=PHASES,
                seed=0,
                emulate=options.emulate if align_variant == "cpu" else None,
            )
        report = cache[key].select(align_phase)
        meta = {
            "variant": align_variant,
            "target": align_target,
            "phase": align_phase,
            "precision": align_precision,
        }
        _record(request, report, meta)
        if not report.passed:
            pytest.fail(str(report), pytrace=False)
        return report

    return run


# -- reporting ---------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Add each check's JUnit properties; a failing test gets an "align" section with
    the command that reruns it alone."""
    report = yield
    checks = item.stash.get(_CHECKS, [])
    if report.when == "call" and checks:
        from align.pytest_records import junit_properties

        for result in checks:
            item.user_properties.extend(junit_properties(result))
        report.user_properties = list(item.user_properties)
        if report.failed:
            report.sections.append(("align", f"reproduce alone: {checks[0]['reproduce']}"))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """An "align" section: how many checks passed, and each failing test with the command
    that reruns it alone (read from the test reports, so it works under xdist too)."""
    checked = [
        r
        for reports in terminalreporter.stats.values()
        for r in reports
        if getattr(r, "when", None) == "call"
        and any(k == "align_passed" for k, _ in getattr(r, "user_properties", ()))
    ]
    if not checked:
        return
    verdicts = [v for r in checked for k, v in r.user_properties if k == "align_passed"]
    tr = terminalreporter
    tr.section("align")
    tr.write_line(
        f"{verdicts.count('true')} aligned, {verdicts.count('false')} not aligned "
        f"({len(verdicts)} checks in {len(checked)} tests)"
    )
    for r in (r for r in checked if r.failed):
        props = dict(r.user_properties)
        culprit = f"  culprit {props['align_culprit']}" if "align_culprit" in props else ""
        tr.write_line(f"FAILED {r.nodeid}{culprit}")
        tr.write_line(f"  reproduce alone: {props['align_reproduce']}")

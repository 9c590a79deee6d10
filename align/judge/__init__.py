"""Judging: from traces to a Report, and from a failing tensor to the module that is wrong.

Index:
    comparison.py     rows of the whole-network comparison (reference, target, golden)
    traces.py         a target trace judged against a reference (and golden) trace: align.compare
    isolation.py      teacher-forced re-runs of single modules: the culprits
    training.py       the short training phase: N optimizer steps on every device
    sensitivity.py    which layers an emulated number format hurts most
    steps.py          align.Recorder dumps judged step by step
    step_isolation.py a Recorder dump's module calls re-run alone from its records: culprits
    msprobe_dumps.py  msprobe dump trees judged step by step, rank by rank
    replay.py         msprobe API calls re-run in float64 from their dumped inputs: culprits
    statistics.py     statistics-only dumps (Max/Min/Mean/Norm) judged, with their weaker power
    report.py         Report: the verdict as a table and as JSON
"""

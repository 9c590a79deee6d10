"""The subcommands of `align`, in `align --help`'s order, with their one-line summaries:
apart from the commands themselves, which import torch, so that `align --help` does not."""

SUMMARIES: dict[str, str] = {
    "check": "check a model's alignment: reference and target against a float64 golden",
    "compare": "judge a target dump against a reference (and golden) dump",
    "dump": "write one run's trace, to compare runs across machines",
    "list": "list the cases with their documented figures and conditions",
    "run": "train a case by its recipe on K cards; confirm its documented figure",
    "report": "HTML report and Markdown summary of a night's results, with history",
    "calibrate": "measure a case's honest noise; write the tolerances into its golden file",
}

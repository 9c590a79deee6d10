"""Nightly reports: result JSON files -> history (SQLite), an HTML page and a Markdown summary.

Run as `python -m align.report RESULTS_DIR --history history.sqlite --out report.html`.
Modules: results (reading and validating result files through align.files.read_json),
history (SQLite), diff (what changed since the previous night), plots, html, markdown,
text (shared formatting); the command is align.commands.report. Who writes the result
files: align.judge.report (a check's Report), align.train.result (a full run's
result.json), align.pytest_records (one per pytest test of the plugin).
Importing the package imports nothing heavy; matplotlib loads only when plots are drawn.
"""

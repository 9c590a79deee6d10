"""Nightly reports: result JSON files -> history (SQLite), an HTML page and a Markdown summary.

Run as `python -m align.report RESULTS_DIR --history history.sqlite --out report.html`.
Modules: results (reading and validating result files), history (SQLite), diff (what
changed since the previous night), plots, html, markdown, text (shared formatting), files
(the guarded JSON read), pytest_results (a result file per pytest test); the command is
align.commands.report.
Importing the package imports nothing heavy; matplotlib loads only when plots are drawn.
"""

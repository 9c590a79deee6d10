"""Nightly reports: result JSON files -> history (SQLite), an HTML page and a Markdown summary.

Run as `python -m align.report RESULTS_DIR --history history.sqlite --out report.html`.
Modules: results (reading and validating result files), history (SQLite), diff (what
changed since the previous night), plots, html, markdown, files (atomic writes), cli.
Importing the package imports nothing heavy; matplotlib loads only when plots are drawn.
"""

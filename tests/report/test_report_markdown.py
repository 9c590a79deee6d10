"""align.report.markdown: the CI summary."""

from __future__ import annotations

from align.report.diff import compare_nights
from align.report.markdown import md, render_markdown
from align.report.results import load_results


def _outcomes(directory):
    results = load_results(directory)
    return results, {o.key: o for r in results for o in r.outcomes}


def test_summary_lists_changes_and_failures(tmp_path, night_one, make_check, write):
    _, before = _outcomes(night_one)
    tonight_dir = tmp_path / "night2"
    write(tonight_dir, "resnet50.json", make_check("resnet50", culprit="layer1.0.conv1"))
    write(tonight_dir, "vit.json", make_check("vit"))
    results, tonight = _outcomes(tonight_dir)
    text = render_markdown(
        "2025-01-02", results, compare_nights("2025-01-01", before, tonight), "report.html"
    )
    assert text.startswith("## align nightly 2025-01-02: 1 of 4 failing\n")
    assert "Compared with night 2025-01-01." in text
    newly = "**Newly failing** (1)\n- resnet50 forward fp32, culprit **layer1.0.conv1**"
    assert newly + ": rel\\_rmse 0.003 (limit 2e-06)" in text
    assert "**Newly passing** (1)\n- vit forward fp32" in text
    assert "**Missing tonight** (1)\n- resnet50-full full-run amp-fp16" in text
    assert "| resnet50 | forward | fp32 | layer1.0.conv1 | rel\\_rmse 0.003 (limit 2e-06) |" in text
    assert text.rstrip().endswith("Full report: report.html")


def test_first_night_and_escaping(night_one):
    results, tonight = _outcomes(night_one)
    text = render_markdown("n1", results, compare_nights(None, {}, tonight))
    assert "First night in the history" in text
    assert md("<script>a|b</script>\n*x*") == "&lt;script&gt;a\\|b&lt;/script&gt; \\*x\\*"

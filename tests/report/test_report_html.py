"""align.report.html: the page shows the verdicts and escapes everything read from files."""

from __future__ import annotations

from html.parser import HTMLParser

from align.report.diff import compare_nights
from align.report.html import render_html
from align.report.results import load_results

CRAFTED = "<script>document.title='pwned'</script>"
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "span", "b", "code",
    "br", "a", "ul", "li", "table", "thead", "tbody", "tr", "th", "td", "details", "summary",
    "img", "div",
}  # fmt: skip


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes |= {name for name, _ in attrs}
        self.sources += [value for name, value in attrs if name in ("src", "href")]


def _page(directory, **kwargs) -> str:
    results = load_results(directory)
    tonight = {o.key: o for r in results for o in r.outcomes}
    return render_html("2025-01-02", results, compare_nights(None, {}, tonight), [], **kwargs)


def test_page_shows_verdicts_culprit_and_plots(night_one):
    page = _page(night_one)
    assert "<title>align report 2025-01-02</title>" in page
    assert "layer1.0.conv2" in page and "Culprits" in page
    assert page.count("data:image/png;base64,") == 5  # per check: layers + loss; the run: epochs
    assert "Full training runs" in page


def test_crafted_strings_from_files_are_shown_as_text(tmp_path, make_check, make_run, write):
    data = make_check(
        CRAFTED, culprit=f"layer1.{CRAFTED}", module_names=["conv1", f"layer1.{CRAFTED}", "fc"]
    )
    data["model"] = data["notes"][0] = data["environment"]["torch"] = CRAFTED
    data["first_divergence"]["message"] = CRAFTED
    write(tmp_path, "check.json", data)
    run = make_run(CRAFTED)
    run["verdict"]["reason"] = run["documented"]["source"] = run["device"] = CRAFTED
    write(tmp_path, f"run{CRAFTED.replace('/', '')}.json", run)
    page = _page(tmp_path)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    parser = _Tags()
    parser.feed(page)
    assert parser.tags <= ALLOWED_TAGS
    assert not any(name.startswith("on") for name in parser.attributes)
    assert all(s.startswith(("data:image/png;base64,", "#")) for s in parser.sources)


def test_page_without_plots_is_self_contained(night_one):
    page = _page(night_one, with_plots=False)
    assert "data:image" not in page and "http" not in page.replace("http-equiv", "")

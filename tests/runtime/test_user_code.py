"""align.runtime.user_code: MODULE:FUNCTION from the command line, imported from the
current directory and called; every way it can fail is one AlignError naming it."""

from __future__ import annotations

import sys

import pytest

from align.errors import AlignError
from align.runtime.user_code import call_user_function, is_user_function

BUILDERS = """
calls = []

def build():
    calls.append(1)
    return "built"

def broken():
    raise ValueError("no weights at /data/x.pt")
"""


@pytest.fixture
def in_a_script_directory(tmp_path, monkeypatch):
    (tmp_path / "user_builders.py").write_text(BUILDERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield
    sys.modules.pop("user_builders", None)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:build_model", True),
        ("pkg.models:make", True),
        ("resnet50", False),
        ("hf-hub:timm/resnet50.a1_in1k", False),  # a timm name with a colon is not code
        (":build", False),
        ("train:", False),
    ],
)
def test_only_module_colon_identifier_names_code(text, expected):
    assert is_user_function(text) is expected


def test_the_function_is_imported_from_the_current_directory_and_called(in_a_script_directory):
    assert call_user_function("user_builders:build") == "built"
    assert sys.modules["user_builders"].calls == [1]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("user_builders:broken", "user_builders:broken(): ValueError: no weights at /data/x.pt"),
        ("no_such_module_here:build", "ModuleNotFoundError"),
        ("user_builders:missing", "AttributeError"),
        ("resnet50", "give MODULE:FUNCTION"),
    ],
)
def test_each_failure_is_one_error_naming_it(in_a_script_directory, text, fragment):
    with pytest.raises(AlignError) as caught:
        call_user_function(text)
    assert fragment in str(caught.value)

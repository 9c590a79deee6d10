"""align.zoo.golden: parsing golden files, clear errors, tolerance lookup and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

import align.zoo
from align.errors import AlignError
from align.numerics.names import DEFAULT_TOLERANCE
from align.zoo.golden import golden_dir, load_golden

GOOD = """
case = "tiny"
notes = ["a caveat"]

[recipe]
source = "configs/tiny.py"

[[figures]]
metric = "top1"
value = 76
source = "the MMClassification NPU page"
conditions = "NPU, 8 cards"

[[figures]]
metric = "top5"
value = 93.21
source = "the MMClassification NPU page"

[tolerance.fp32]
k = 2.5  # measured
floor = 4

[tolerance.backward.fp32]
k = 5.0

[tolerance.forward.amp-bf16]
floor = 2.0
"""


def write(tmp_path: Path, text: str, name: str = "tiny") -> Path:
    (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path


def test_parses_figures_notes_and_recipe(tmp_path: Path) -> None:
    golden = load_golden("tiny", write(tmp_path, GOOD))
    assert golden.name == "tiny" and golden.path == tmp_path / "tiny.toml"
    assert [(f.metric, f.value, f.source, f.conditions) for f in golden.figures] == [
        ("top1", 76.0, "the MMClassification NPU page", "NPU, 8 cards"),
        ("top5", 93.21, "the MMClassification NPU page", ""),
    ]
    assert isinstance(golden.figures[0].value, float)
    assert golden.notes == ("a caveat",)
    assert golden.recipe_source == "configs/tiny.py"


def test_tolerance_precedence_defaults_precision_phase(tmp_path: Path) -> None:
    golden = load_golden("tiny", write(tmp_path, GOOD))
    assert golden.tolerance("forward", "fp32") == {"k": 2.5, "floor": 4.0}
    assert golden.tolerance("backward", "fp32") == {"k": 5.0, "floor": 4.0}
    assert golden.tolerance("forward", "amp-bf16") == {"k": 3.0, "floor": 2.0}
    assert golden.tolerance("backward", "amp-bf16") == {"k": 3.0, "floor": 1.0}
    assert golden.tolerance("train", "amp-fp16") == DEFAULT_TOLERANCE["amp-fp16"]
    assert golden.tolerance("forward", "O2") == {"k": 3.0, "floor": 1.0}  # alias of o2-fp16
    assert all(isinstance(v, float) for v in golden.tolerance("forward", "fp32").values())


def test_defaults_when_the_file_has_no_tolerance(tmp_path: Path) -> None:
    golden = load_golden("tiny", write(tmp_path, 'case = "tiny"\n'))
    assert golden.figures == ()
    assert golden.tolerance("forward", "fp32") == {"k": 2.0, "floor": 1.0}
    for precision in ("amp-fp16", "amp-bf16", "o2-fp16"):
        assert golden.tolerance("backward", precision) == {"k": 3.0, "floor": 1.0}


def test_unknown_phase_or_precision_is_an_align_error(tmp_path: Path) -> None:
    golden = load_golden("tiny", write(tmp_path, GOOD))
    with pytest.raises(AlignError, match="unknown precision 'fp8'"):
        golden.tolerance("forward", "fp8")
    with pytest.raises(AlignError, match="unknown phase 'sideways'"):
        golden.tolerance("sideways", "fp32")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(AlignError) as info:
        load_golden("nope", tmp_path)
    assert str(tmp_path / "nope.toml") in str(info.value) and "not found" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("case = [", "is not valid TOML"),
        ('case = "other"', "case = 'other' but the file is named for 'tiny'"),
        ("figures = 3", "array of tables"),
        ('[[figures]]\nmetric = "top1"\nsource = "s"', "figures[0] lacks value"),
        ('[[figures]]\nmetric = "top1"\nvalue = "76"\nsource = "s"', "must be a number"),
        (
            '[[figures]]\nmetric = "top1"\nvalue = 1\nsource = "s"\ncolour = 1',
            "unknown keys colour",
        ),
        ("notes = 3", "`notes` must be"),
        ("[tolerance.fp64]\nk = 1", "tolerance.fp64: not a precision"),
        ("[tolerance.fp32]\nkk = 1", "tolerance.fp32.kk: unknown key"),
        ("[tolerance.fp32]\nk = -1", "non-negative number"),
        ("[tolerance.fp32]\nk = true", "non-negative number"),
        ("[tolerance.forward.fp9]\nk = 1", "tolerance.forward.fp9: unknown precision"),
    ],
)
def test_malformed_files_are_align_errors_naming_the_path(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(AlignError) as info:
        load_golden("tiny", write(tmp_path, text))
    assert str(tmp_path / "tiny.toml") in str(info.value)
    assert message in str(info.value)


def test_golden_dir_is_the_package_data_folder_or_the_env_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALIGN_GOLDEN_DIR", raising=False)
    assert golden_dir() == Path(align.zoo.__file__).resolve().parent / "golden_files"
    assert (golden_dir() / "resnet50.toml").is_file()
    monkeypatch.setenv("ALIGN_GOLDEN_DIR", str(write(tmp_path, GOOD)))
    assert golden_dir() == tmp_path
    assert load_golden("tiny").figures[0].value == 76.0

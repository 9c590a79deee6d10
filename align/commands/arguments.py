"""argparse types for align's command lines: a number out of range is a usage error (exit 2),
never silently read as "use the default"."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from torch import nn

from align.errors import AlignError
from align.numerics.names import canonical_precision
from align.runtime.user_code import call_user_function


def positive_int(text: str) -> int:
    """An integer of at least 1, for argparse's `type=`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (1 or more)")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0, for argparse's `type=`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return value


def precision(text: str) -> str:
    """A precision to check at, by its canonical name (aliases O1, O2, bf16, ...:
    align.numerics.names), for argparse's `type=`: fp64 is the golden's, never asked for."""
    try:
        return canonical_precision(text)
    except AlignError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def precisions(text: str) -> list[str]:
    """A comma-separated list of precisions (see `precision`), for argparse's `type=`."""
    return [precision(part) for part in text.split(",")]


def writable_file(text: str) -> Path:
    """A file path that can be written (created, with its missing parent directories), for
    argparse's `type=`: checked before the work, not found out after it."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory; give a file path")
    _creatable(path, path.absolute().parent)
    return path


def writable_dir(text: str) -> Path:
    """A directory path that exists or can be created, for argparse's `type=`."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; give a directory path")
    _creatable(path, path.absolute())
    return path


def _creatable(path: Path, parent: Path) -> None:
    """Refuse `path` when `parent`, or its nearest existing ancestor, is a file or is not
    writable."""
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"cannot write {path}: {parent} is a file, not a directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is not writable")


def model_options(parser: argparse.ArgumentParser) -> None:
    """Options that make the model and its inputs, shared by check and dump."""
    parser.add_argument(
        "--precision",
        type=precision,
        default="fp32",
        help="fp32, amp-fp16, amp-bf16, o2-fp16 (aliases O1, O2, bf16)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=positive_int, default=None, help="batch size of the inputs")
    parser.add_argument(
        "--size", type=positive_int, default=None, help="image size (classification)"
    )


def model_factory(text: str) -> nn.Module:
    """MODULE:FUNCTION, a function of no arguments that builds the user's model
    (align.runtime.user_code), called; for argparse's `type=`."""
    try:
        built = call_user_function(text)
    except AlignError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(built, nn.Module):
        raise argparse.ArgumentTypeError(
            f"{text}() returned a {type(built).__name__}, not an nn.Module"
        )
    return built

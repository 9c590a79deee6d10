"""The user's own code, named on the command line as MODULE:FUNCTION (`train:build_model`
for build_model() in train.py): imported as Python imports it, the current directory
first, and called with no arguments. Only ever from what the user typed: a dump's
contents never name code to run."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from align.errors import AlignError

__all__ = ["call_user_function", "is_user_function"]


def is_user_function(text: str) -> bool:
    """Whether `text` has the MODULE:FUNCTION form (a model or case name has no colon)."""
    module_name, colon, attribute = text.partition(":")
    return bool(colon and module_name and attribute.isidentifier())


def call_user_function(text: str) -> Any:
    """What FUNCTION() in MODULE returns; an AlignError saying why when it cannot be had
    (a malformed name, an import error, FUNCTION raising: the user's code, their error)."""
    if not is_user_function(text):
        raise AlignError(
            f"{text!r}: give MODULE:FUNCTION, e.g. train:build_model for build_model() in train.py"
        )
    module_name, _, attribute = text.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise AlignError(f"{text}: {type(exc).__name__}: {exc}") from None
    try:
        return function()
    except Exception as exc:  # the user's code: any failure is theirs to see, in one line
        raise AlignError(f"{text}(): {type(exc).__name__}: {exc}") from None

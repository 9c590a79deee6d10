"""Case families. The registry imports them on first use (`list_cases`, `get_case`), so
`import align` stays light and `python -m align.golden` runs without a double import."""

from align.cases._registry import Case, Figure, get_case, is_case, list_cases, register_case

FAMILIES = ("classification", "detection", "digits")  # modules under align/cases/

__all__ = ["FAMILIES", "Case", "Figure", "get_case", "is_case", "list_cases", "register_case"]

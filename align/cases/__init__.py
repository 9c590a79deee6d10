"""Case families; importing this package registers all of them."""

from align.cases._registry import Case, Figure, get_case, is_case, list_cases, register_case

# Importing a family module runs its @register_case entries (order: the listing's).
from align.cases import classification, detection  # noqa: E402, F401  isort: skip
import align.cases.digits  # noqa: E402, F401  isort: skip

__all__ = ["Case", "Figure", "get_case", "is_case", "list_cases", "register_case"]

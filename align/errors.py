"""The exit codes of align's commands, and the errors they turn into exit code 2: bad usage,
bad data, bad environment."""

from __future__ import annotations

import enum
import importlib.util


class ExitCode(enum.IntEnum):
    """The exit codes of every align command (argparse's own usage errors exit 2 as well)."""

    PASSED = 0  # aligned, confirmed, or the command did what it was asked
    FAILED = 1  # not aligned, not confirmed: never a bug or a bad input
    ERROR = 2  # a usage, data or environment error (or a bug, with its traceback)

    @classmethod
    def of(cls, passed: bool) -> ExitCode:
        """PASSED or FAILED for a verdict."""
        return cls.PASSED if passed else cls.FAILED


class AlignError(Exception):
    """A usage, data or environment error: the message says what was wrong and what to do."""


class UnknownCaseError(AlignError, KeyError):
    """A case or model name that neither the registry nor timm knows."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DeviceUnavailableError(AlignError):
    """A requested device is not usable on this machine (the message says why)."""


class TraceError(AlignError):
    """A dump that cannot be read: missing, corrupt, truncated or unsafe."""


class ModelRunError(AlignError):
    """The model itself raised on a device at a precision: no verdict can be given."""


class MismatchError(AlignError):
    """Reference and target cannot be compared: names, shapes or structure differ."""


def require_extra(module: str, extra: str, purpose: str) -> None:
    """AlignError unless `module` can be imported: it comes with align's `extra`
    (pip install 'align[EXTRA]'), which only some commands need."""
    if importlib.util.find_spec(module) is None:
        raise AlignError(
            f"{purpose} needs {module}, which is not installed: pip install 'align[{extra}]'"
        )

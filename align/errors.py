"""Errors that the CLIs turn into exit code 2: bad usage, bad data, bad environment."""

from __future__ import annotations


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


class MismatchError(AlignError):
    """Reference and target cannot be compared: names, shapes or structure differ."""

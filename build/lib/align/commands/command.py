"""What every align subcommand shares: a `Command` (arguments, body, example), its
parser, and one guard that turns errors into exit codes (align.errors.ExitCode)."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from align.errors import AlignError, ExitCode

__all__ = ["Command", "Parser", "execute"]

log = logging.getLogger(__name__)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: a one-line summary, its arguments, its body and examples."""

    name: str
    summary: str  # its line in `align --help`, and the first line of its own --help
    arguments: Callable[[argparse.ArgumentParser], None]
    body: Callable[[argparse.Namespace], int]
    examples: tuple[str, ...]  # arguments after the command name, shown by --help
    details: str = ""  # the rest of its description

    def main(self, argv: Sequence[str] | None = None) -> int:
        """`python -m align.<name> ...`: the same command under its module's name."""
        parser = Parser(prog=f"python -m align.{self.name}")
        self._configure(parser)
        return execute(parser.parse_args(argv))

    def add_to(self, subparsers: argparse._SubParsersAction) -> None:
        """Add this command to the subcommands of `align` (or of python -m align.golden)."""
        self._configure(subparsers.add_parser(self.name))

    def _configure(self, parser: argparse.ArgumentParser) -> None:
        details = textwrap.fill(self.details, 88) if self.details else ""
        parser.description = "\n\n".join(filter(None, (self.summary, details)))
        parser.epilog = ("examples:\n" if len(self.examples) > 1 else "example:\n") + "\n".join(
            f"  {parser.prog} {e}".rstrip() for e in self.examples
        )
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        self.arguments(parser)
        talk = parser.add_mutually_exclusive_group()
        talk.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
        talk.add_argument("-v", "--verbose", action="store_true", help="debug lines too")
        label = parser.prog.removeprefix("python -m ")  # how its errors name the command
        parser.set_defaults(command=self, label=label)


class _Stderr(logging.Handler):
    """Writes to the sys.stderr of the moment (pytest and embedding callers swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


def _log_progress(args: argparse.Namespace) -> None:
    """Send align's stage lines to stderr at the level -q / -v ask for (once per run)."""
    logger = logging.getLogger("align")
    logger.setLevel(
        logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    )
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


def execute(args: argparse.Namespace) -> int:
    """Run the parsed command: AlignError or OSError is one line and exit 2, and so is a
    bug (with its traceback): nothing but a verdict exits 1, "not aligned"."""
    _log_progress(args)
    try:
        return args.command.body(args)
    except (AlignError, OSError) as exc:  # OSError: a file that cannot be read or written
        print(f"{args.label}: error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except Exception:
        traceback.print_exc()
        print(f"{args.label}: error: internal error in align (traceback above)", file=sys.stderr)
        return ExitCode.ERROR

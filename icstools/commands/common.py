"""What the subcommands share: exit codes, the user-mistake error, tables, output checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PIPE",
    "EXIT_USAGE",
    "PROG",
    "UsageError",
    "check_output",
    "fmt",
    "print_table",
]

PROG = "icstools"

#: Exit codes of the command (see :mod:`icstools.cli`).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141


class UsageError(Exception):
    """A user mistake detected by the command (exit code 2)."""


def fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def print_table(rows: list[dict[str, object]]) -> None:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(widths[c]) for c in cols).rstrip())


def check_output(option: str, value: str, *, file: bool, sub: str | None = None) -> None:
    """Refuse an output path that cannot be written (:class:`UsageError`), before any work.

    ``file``: ``value`` is a file to write, its missing folders created; else a folder, created
    if missing, in which the command creates ``sub``. Nothing is left behind by the check.
    """
    target = Path(value, sub) if sub else Path(value)
    valid = (
        "give the path of a file in a writable folder (missing folders are created)"
        if file
        else "give a writable folder (created if missing)"
    )
    if file and target.is_dir():
        raise UsageError(
            f"{option} {value!r} is a folder; give the path of a file, e.g. "
            f"{target / ('report.' + option.lstrip('-'))}"
        )
    base = target.parent if file else target
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent  # the folder nearest to the target that exists
    if not base.is_dir():
        what = "is a file, not a folder" if base.is_file() else "is not a folder"
        raise UsageError(f"{option} {value!r}: {base} {what}; {valid}")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise UsageError(
            f"{option} {value!r}: cannot write in {base} ({exc.strerror or exc}); {valid}"
        ) from None
    if file and target.is_file() and not os.access(target, os.W_OK):
        raise UsageError(f"{option} {value!r}: the file exists and is read-only; {valid}")

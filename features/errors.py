"""Errors users can act on, and the command-line wrapper that turns them into one line and an exit code.

Bad input (a missing file, an unreadable slide, a CSV without a column) raises :class:`InputError`, whose
message names the input and the fix. Commands run through :func:`run_command`, which prints that message as
one line on stderr and exits with 2; anything else is an internal failure and exits with 1.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class InputError(Exception):
    """Input the user can fix: the message names the file and what to do."""


def fail(message: str) -> NoReturn:
    """Raise an :class:`InputError`; a short spelling for guard clauses."""
    raise InputError(message)


def run_command(command: Callable[[], object]) -> int:
    """Run a command body; map bad input to exit 2 with one line, internal failures to exit 1."""
    try:
        command()
    except InputError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileExistsError, NotADirectoryError) as error:  # e.g. --out names an existing file
        print(f"error: {blocking_file(error.filename)}: exists and is not a folder; pass another --out or move "
              "the file away", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: finished files are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_BAD_INPUT)
    except Exception as error:  # noqa: BLE001 - the last line of defence for a CLI
        traceback.print_exc()
        print(f"internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_INTERNAL
    return 0


def one_line(error: InputError) -> str:
    """The message alone, also when a DataLoader worker re-raised it wrapped in the worker's traceback."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(f"{type(error).__name__}: ", 1)[-1]


def blocking_file(path: object) -> Path:
    """The existing non-folder that sits where a folder (or a parent of one) was to be made."""
    candidate = Path(str(path))
    for parent in (candidate, *candidate.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return candidate

"""One dispatcher for the ``features`` and ``mil`` console scripts.

Each subcommand is a function ``f(argv: list[str]) -> None`` named as ``"package.module:function"`` in the
module that does its job; the dispatcher imports only the module asked for, so ``features synth`` never pays
for importing torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping

from features.errors import EXIT_BAD_INPUT, run_command
from features.quiet import quiet_terminal


def dispatch(program: str, commands: Mapping[str, tuple[str, str]], argv: list[str] | None = None) -> int:
    """Run ``program <command> ...``; ``commands`` maps a name to (module, one-line help)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage(program, commands))
        return 0 if argv else EXIT_BAD_INPUT
    name, rest = argv[0], quiet_terminal(argv[1:])
    if name not in commands:
        print(f"error: unknown command {program} {name!r}; choose one of: {', '.join(commands)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module_name, function_name = commands[name][0].split(":")
    help_from_attribute_docstrings()
    function = getattr(importlib.import_module(module_name), function_name)
    return run_command(lambda: function(rest))


def help_from_attribute_docstrings() -> None:
    """Let ``--help`` show a dataclass field's docstring (the string right below the field) as its help text."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)


def usage(program: str, commands: Mapping[str, tuple[str, str]]) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {program} <command> [options] [--verbose]   ({program} <command> --help for its options;"
             " --verbose shows library warnings and tips)", ""]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in commands.items()]
    return "\n".join(lines)

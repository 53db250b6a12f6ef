"""Commands whose options are a dataclass: one parser recipe (jsonargparse builds it from the type hints).

``parse`` reads a command line (``--config file.yaml`` and dotted options) into the dataclass; ``from_values``
reads a plain mapping (a section of another YAML file) into the same dataclass, with the same checks. Both
reject an unknown key or a value of the wrong type, so a caller can check a whole pipeline's settings before
any stage starts.
"""

from __future__ import annotations

import dataclasses
import typing
from argparse import ArgumentError
from collections.abc import Mapping
from typing import Any, TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser

from features.errors import InputError

T = TypeVar("T")


def parser_for(options: type, prog: str, description: str, exit_on_error: bool = True) -> ArgumentParser:
    lines = [line for line in (description or "").strip().splitlines() if line.strip()]
    parser = ArgumentParser(prog=prog, description=lines[0] if lines else None, default_env=False,
                            exit_on_error=exit_on_error)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_class_arguments(options, as_positional=False, fail_untyped=True, sub_configs=True)
    return parser


def bool_options(options: type, prefix: str = "--") -> set[str]:
    """``--skip_errors``, ``--encoder.pretrained`` ...: every bool field, nested dataclasses included."""
    names = set()
    for name, hint in typing.get_type_hints(options).items():
        if hint is bool:
            names.add(prefix + name)
        elif dataclasses.is_dataclass(hint):
            names |= bool_options(hint, f"{prefix}{name}.")
    return names


def with_bare_flags(argv: list[str], flags: set[str]) -> list[str]:
    """Let ``--skip_errors`` alone mean ``--skip_errors true`` (the usual shell idiom)."""
    out: list[str] = []
    for i, token in enumerate(argv):
        out.append(token)
        following = argv[i + 1] if i + 1 < len(argv) else "--"
        if token in flags and following.startswith("--"):
            out.append("true")
    return out


def parse(options: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """A command line -> an instance of the dataclass ``options``; a bad option is one line, not the usage."""
    parser = parser_for(options, prog, description, exit_on_error=False)
    try:
        config = parser.parse_args(with_bare_flags(list(argv or []), bool_options(options)))
    except ArgumentError as error:
        raise InputError(f"{prog}: {_one_line(error)}; see `{prog} --help` for its options") from None
    config.pop("config", None)
    return _instance(options, parser, config)


def from_values(options: type[T], values: Mapping[str, Any], where: str, command: str) -> T:
    """A mapping -> an instance of ``options``; a bad key or value is one line naming ``where`` and ``command``."""
    parser = parser_for(options, command, "", exit_on_error=False)
    try:
        config = parser.parse_object(dict(values), defaults=True)
    except (ArgumentError, KeyError, TypeError, ValueError) as error:  # each names the key and why
        raise InputError(f"{where}: {_one_line(error)}; see `{command} --help` for its options") from None
    return _instance(options, parser, config)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _instance(options: type[T], parser: ArgumentParser, config: Any) -> T:
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    values = instantiate(config)
    return options(**{name: values[name] for name in options.__dataclass_fields__})  # type: ignore[attr-defined]

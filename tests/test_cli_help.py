"""Every option of every `features` and `mil` command has help text, and every command takes --config."""

from __future__ import annotations

import re

import pytest

from features.__main__ import COMMANDS as FEATURES
from features.__main__ import main as features_main
from mil.__main__ import COMMANDS as MIL
from mil.__main__ import main as mil_main

ENTRY = re.compile(r"^  (?:-\w(?: \S+)?, )?(--[\w.\-]+)")
ONLY_TYPE = re.compile(r"^\((?:required, )?(?:type: .*?)?(?:,? ?default: .*)?\)$")
COMMANDS = [("features", name, features_main) for name in FEATURES] + [("mil", name, mil_main) for name in MIL]


def options_without_help(text: str) -> list[str]:
    """Options whose description is empty or only jsonargparse's "(type: ..., default: ...)"."""
    bare, name, words = [], None, []

    def close() -> None:
        description = " ".join(words).strip()
        if name and (not description or ONLY_TYPE.match(description)):
            bare.append(name)

    for line in text.splitlines():
        match = ENTRY.match(line)
        if match:
            close()
            parts = re.split(r"\s{2,}", line[match.end():], maxsplit=1)
            name, words = match.group(1), parts[1:]
        elif name and line.startswith("      "):
            words.append(line.strip())
        else:
            close()
            name, words = None, []
    close()
    return bare


def test_the_checker_sees_a_bare_option():
    text = "options:\n  --a A       (type: int, default: 1)\n  --b B       the b\n  --c C\n"
    assert options_without_help(text) == ["--a", "--c"]


@pytest.mark.parametrize(("program", "command", "main"), COMMANDS, ids=[f"{p} {c}" for p, c, _ in COMMANDS])
def test_every_option_has_help(program, command, main, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--config" in text, f"{program} {command} takes no --config"
    assert options_without_help(text) == [], f"{program} {command}: options without help text"

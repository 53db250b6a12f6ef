"""A ``mil fit|predict`` run described in Python: a YAML config with settings on top of it, by dotted key.

Commands that train slide models themselves (``mil hnm``, ``mil cv``) build a :class:`MILCommand` and hand it to
:func:`mil.training.cli.fit` or ``predict``, which give LightningCLI the resolved mapping to parse and check: no
command line is written out and read back. Stage markers record :meth:`MILCommand.recorded`, the config's name
and each setting as YAML spells it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from features.errors import fail

# Settings whose value is a mapping in its own right, not more settings below it.
MAPPING_VALUES = ("model_kwargs", "label_map")


@dataclass(frozen=True)
class MILCommand:
    """What one ``mil fit|predict`` reads.

    Attributes:
        config: the ``mil fit`` YAML file; None starts from the parser's defaults.
        settings: values on top of it by dotted key (``trainer.max_epochs``), applied in order.
    """

    config: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def updated(self, settings: Mapping[str, Any]) -> MILCommand:
        """The same command with more settings on top (nested sections are read as dotted keys)."""
        return replace(self, settings={**self.settings, **dotted(settings)})

    def resolved(self) -> dict[str, Any]:
        """The config file's values with the settings applied: the mapping LightningCLI parses."""
        values = read_config(Path(self.config)) if self.config else {}
        for key, value in self.settings.items():
            put(values, key.split("."), value)
        return values

    def recorded(self) -> dict[str, str]:
        """``{"config": <file>, "trainer.max_epochs": "24", ...}``: what a stage marker compares between runs."""
        head = {"config": self.config} if self.config else {}
        return {**head, **yaml_texts(self.settings)}


def dotted(values: Mapping[str, Any], prefix: str = "", leaves: tuple[str, ...] = MAPPING_VALUES) -> dict[str, Any]:
    """``{"trainer": {"max_epochs": 2}}`` -> ``{"trainer.max_epochs": 2}``; a mapping under a name ending in one of
    ``leaves`` (by default a model's kwargs) stays one value, and so does an empty one."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not name.endswith(leaves):
            flat.update(dotted(value, f"{name}.", leaves))
        else:
            flat[name] = value
    return flat


def put(values: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``values[k1][k2]...`` to ``value``; a new ``class_path`` drops the old class's ``init_args``."""
    *parents, last = keys
    for key in parents:
        if not isinstance(values.get(key), dict):
            values[key] = {}
        values = values[key]
    if last == "class_path" and values.get("class_path") != value:
        values.pop("init_args", None)
    values[last] = value


def yaml_texts(values: Mapping[str, Any]) -> dict[str, str]:
    """Settings as stage markers record them: dotted keys, each value spelled as YAML (``"24"``, ``"true"``)."""
    return {key: yaml_text(value) for key, value in dotted(values).items()}


def yaml_text(value: Any) -> str:
    """A value as a YAML/JSON scalar: ``true``, ``null``, ``[1, 2]``, ``0.002``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def read_config(path: Path) -> dict[str, Any]:
    """A ``mil`` YAML config as a mapping; a missing file or a syntax error is one line naming the file."""
    if not path.is_file():
        fail(f"--config {path}: no such file; pass a YAML config such as configs/mil/abmil.yaml")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(error, "problem", None) or (str(error).strip().splitlines() or [""])[0]
        fail(f"{path}: YAML syntax error at {where} ({problem}); fix the file")
    if values is None:
        return {}
    if not isinstance(values, dict):
        fail(f"{path}: not a mapping of settings; a `mil` config is YAML like `trainer: {{max_epochs: 10}}`")
    return values

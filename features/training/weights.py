"""Encoder weights on disk: a safetensors file of the plain timm ``state_dict`` plus a JSON sidecar.

The keys are exactly those of ``timm.create_model(name, num_classes=0).state_dict()``, so ``features extract
--encoder.weights FILE`` loads them like any other timm checkpoint; no projection head, no Lightning prefix.
The sidecar (``FILE.json``) records how the weights were made: command, settings, library versions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from features.provenance import versions
from features.store import atomic_path


def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def save_encoder_weights(model: torch.nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.state_dict()`` as safetensors (atomically) and a JSON sidecar with ``metadata``."""
    path = Path(path)
    # safetensors refuses tensors that share storage; clones on CPU are small for encoders this size.
    state = {key: value.detach().to("cpu").clone().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "keys": "timm"})
    info = {"weights": path.name, "sha256": file_sha256(path), "n_tensors": len(state), **versions(),
            **dict(metadata or {})}
    with atomic_path(sidecar_path(path)) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return path


def load_encoder_weights(model: torch.nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load weights exactly as ``features extract`` does, so what trains is what gets extracted."""
    from features.encoders import load_weights

    load_weights(model, path, strict=strict)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

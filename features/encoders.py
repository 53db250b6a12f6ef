"""Patch encoders: a timm model named by a string, with weights from a local file, and the transform it expects.

One factory, :func:`build_encoder`, turns an :class:`EncoderConfig` into an :class:`Encoder` (model + transform
+ the attributes a features file records). Weights come from a local ``.safetensors`` / ``.pth`` file (optionally
checked against a sha256), or from the Hugging Face hub (``hub`` or an ``hf-hub:`` name; ``hub_file`` for repos
whose file timm cannot load itself) where the hub can be reached or is cached; otherwise the command fails at
once, in one line, saying which file to pass instead. Files in other layouts (transformers DINOv2, CONCH v1.5's
vision tower) are converted on loading (:mod:`features.encoder_weights`). Foundation-model presets
(``configs/encoders/*.yaml``) are plain :class:`EncoderConfig` files.

A random-init encoder is seeded, so the same command gives the same features.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import socket
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import nn

from features.attention_pool import AttentionPooledTrunk
from features.encoder_weights import to_timm_layout
from features.errors import InputError
from features.provenance import package_version

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
TRUNCATED = {"resnet50_trunc": ("resnet50", 3)}  # CLAM's ResNet-50 cut after layer3: 1024-d, stride 16


@dataclass
class EncoderConfig:
    """Which encoder embeds the patches.

    Attributes:
        name: any timm model name (``resnet18``, ``vit_small_patch16_224``), ``resnet50_trunc`` (CLAM's
            ResNet-50 cut after layer3) or ``hf-hub:org/model``.
        weights: a local ``.safetensors``/``.pth``/``.pt``/``.bin`` state dict; None = random init (or timm's
            pretrained weights with ``pretrained``).
        pretrained: let timm fetch its pretrained weights (needs network or a filled hub cache).
        tag: folder name under ``features/``; default ``<name>-<first 8 hex of the weights sha256>``.
        input_size: pixels the model sees; None = the patch size for models that take any size (CNNs),
            the model's own size for fixed-size models (most ViTs).
        model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``init_values``, ``dynamic_img_size``).
        strict: every model key must be in the weights file and no extra key may remain.
        seed: seeds random initialisation so random encoders are reproducible.
        hub: a Hugging Face repo (``MahmoodLab/UNI``) whose weights timm fetches into ``name`` built with
            ``model_kwargs`` when no ``weights`` file is given; needs network or a filled hub cache.
        weights_sha256: the expected sha256 of ``weights``; a different file is refused.
        pooling: ``model`` = the model's own pooled output (class token for most ViTs); ``cls_mean`` = the
            class token concatenated with the mean of the patch tokens, registers left out (Virchow2: 2560-d);
            ``attn_pool`` = CONCH v1.5's head: a learned query attends over all tokens, then LayerNorm (768-d).
        hub_file: a file of the ``hub`` repo to download and load like ``weights`` (transformers DINOv2 keys and
            CONCH v1.5's vision tower are converted), for repos timm cannot load itself; None = timm loads ``hub``.
        mean: per-channel normalisation mean from the model card; None = timm's value for the model.
        std: per-channel normalisation std from the model card; None = timm's value for the model.
        interpolation: resize interpolation (``bilinear``, ``bicubic``); None = timm's value for the model.
    """

    name: str = "resnet10t"
    weights: str | None = None
    pretrained: bool = False
    tag: str | None = None
    input_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    strict: bool = True
    seed: int = 0
    hub: str | None = None
    weights_sha256: str | None = None
    pooling: Literal["model", "cls_mean", "attn_pool"] = "model"
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None
    hub_file: str | None = None


@dataclass
class Encoder:
    """A model in eval mode returning (B, dim) embeddings, the per-patch transform, and what to record."""

    config: EncoderConfig
    model: nn.Module
    transform: Callable[[Any], torch.Tensor]
    transform_spec: dict[str, Any]
    dim: int
    weights_sha256: str
    tag: str

    def attrs(self) -> dict[str, Any]:
        """The feature attributes (docs/formats.md), with timm/torch versions, for :func:`features.store.write_features`."""
        import timm

        weights = self.config.weights or (hub_source(self.config) if self.config.hub else
                                          self.config.name if self.config.pretrained else "")
        return {
            "encoder": self.config.name,
            "weights": str(weights),
            "weights_sha256": self.weights_sha256,
            "transform": json.dumps(self.transform_spec, sort_keys=True),
            "hnm_mil_version": package_version(),
            "timm_version": str(timm.__version__),
            "torch_version": str(torch.__version__),
            "encoder_seed": self.config.seed,
            "model_kwargs": json.dumps(self.config.model_kwargs, sort_keys=True),
            "pooling": self.config.pooling,
        }


class PooledTrunk(nn.Module):
    """A timm ``features_only`` trunk followed by global average pooling (CLAM's truncated ResNet-50)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.num_features = int(trunk.feature_info.channels()[-1])
        self.pretrained_cfg = getattr(trunk, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)[-1].mean(dim=(2, 3))


class ClassAndMeanTokens(nn.Module):
    """A ViT's class token concatenated with the mean of its patch tokens (registers left out), as Virchow2's
    model card embeds a tile: twice the width of the class token alone."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        if not hasattr(trunk, "forward_features") or not hasattr(trunk, "num_prefix_tokens"):
            raise InputError(f"--encoder.pooling cls_mean needs a timm ViT; {type(trunk).__name__} has no tokens")
        self.trunk = trunk
        self.num_features = 2 * int(trunk.num_features)
        self.pretrained_cfg = getattr(trunk, "pretrained_cfg", {})

    @property
    def patch_embed(self) -> nn.Module | None:
        """The trunk's, for the input size (a property: registering it again would save its weights twice)."""
        return getattr(self.trunk, "patch_embed", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.trunk.num_prefix_tokens:].mean(dim=1)], dim=-1)


def build_encoder(config: EncoderConfig, patch_size: int | None = None) -> Encoder:
    """Create the model, load its weights, and build the eval transform for patches of ``patch_size`` px."""
    sha = ""
    weights = weights_file(config)
    if weights:
        sha = checked_sha256(config, weights)
    model = create_model(config)
    if weights:
        load_weights(model, weights, strict=config.strict)
    elif config.hub:
        sha = f"hf-hub:{config.hub}"
    elif config.pretrained or config.name.startswith("hf-hub:"):
        sha = config.name
    model.eval().requires_grad_(False)
    transform, spec = build_transform(model, config, patch_size)
    return Encoder(config=config, model=model, transform=transform, transform_spec=spec,
                   dim=int(model.num_features), weights_sha256=sha, tag=config.tag or default_tag(config, sha))


def weights_file(config: EncoderConfig) -> str | None:
    """The local file the weights load from: ``weights``, or ``hub_file`` fetched from ``hub`` (None: timm's own
    hub loading, or random init)."""
    if config.weights:
        return config.weights
    if config.hub and config.hub_file:
        return download_hub_file(config.hub, config.hub_file, config.name)
    return None


def hub_source(config: EncoderConfig) -> str:
    """How the recorded ``weights`` attribute names hub weights: the repo, and the file when one is named."""
    return f"hf-hub:{config.hub}" + (f"/{config.hub_file}" if config.hub_file else "")


def checked_sha256(config: EncoderConfig, path: str | None = None) -> str:
    """The weights file's sha256, refused in one line when it differs from the expected ``weights_sha256``."""
    path = path or config.weights
    sha = file_sha256(path)
    if config.weights_sha256 and sha != config.weights_sha256.lower():
        raise InputError(f"{path}: sha256 {sha[:12]}... differs from --encoder.weights_sha256 "
                         f"{config.weights_sha256[:12]}...; download the file again or fix the checksum")
    return sha


def hub_repo(config: EncoderConfig) -> str | None:
    """The Hugging Face repo the weights would come from, or None for local / random weights."""
    if config.weights:
        return None
    if config.hub:
        return config.hub
    return config.name.removeprefix("hf-hub:") if config.name.startswith("hf-hub:") else None


def require_hub(repo: str, name: str, timeout: float = 3.0, filename: str = "config.json") -> None:
    """Fail at once, in one line, when the hub is neither reachable nor holds ``filename`` of ``repo`` in its cache.

    Without this, huggingface_hub retries an unreachable host for about 20 s before timm reports it.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, filename), str):
        return
    what = "the weights" if filename == "config.json" else filename
    fix = (f"download {what} of {repo} where there is network and pass --encoder.weights FILE "
           "(see docs/features.md, 'Foundation-model presets')")
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"encoder {name!r}: weights from hub {repo} cannot be downloaded here (HF_HUB_OFFLINE is "
                         f"set and they are not in the hub cache); {fix}")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        raise InputError(f"encoder {name!r}: weights from hub {repo} cannot be downloaded here (cannot reach "
                         f"{host}: {type(error).__name__}); {fix}") from error


def download_hub_file(repo: str, filename: str, name: str) -> str:
    """The local path of ``filename`` from hub ``repo``: the cached copy, else a download; one line on failure.

    A cached copy is used without asking the hub, so a filled cache works offline and starts at once.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return cached
    require_hub(repo, name, filename=filename)
    try:
        return str(hf_hub_download(repo, filename))
    except Exception as error:  # noqa: BLE001 - gated, missing, network: the user's fix is the same
        raise InputError(
            f"encoder {name!r}: {filename} of hub {repo} cannot be downloaded ({type(error).__name__}); for a gated "
            f"model accept its terms on the hub and log in (`hf auth login`), or download the file where there is "
            "network and pass --encoder.weights FILE (see docs/features.md, 'Foundation-model presets')"
        ) from error


def resolved_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``mlp_layer: timm.layers.SwiGLUPacked`` and ``act_layer: torch.nn.SiLU`` in YAML name classes: import them."""
    resolved = dict(kwargs)
    for key, value in kwargs.items():
        if key.endswith("_layer") and isinstance(value, str) and "." in value:
            module, _, attribute = value.rpartition(".")
            try:
                resolved[key] = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError) as error:
                raise InputError(f"--encoder.model_kwargs {key}: cannot import {value!r}; name a class such as "
                                 "timm.layers.SwiGLUPacked") from error
    return resolved


def create_model(config: EncoderConfig) -> nn.Module:
    """A timm model with pooled ``(B, dim)`` output; random init is seeded by ``config.seed``."""
    import timm

    hub = config.name.startswith("hf-hub:")
    name, trunc_index = TRUNCATED.get(config.name, (config.name, None))
    if not hub and name not in timm.list_models() and not timm.is_model(name):
        raise InputError(f"encoder {config.name!r}: not a timm model; pick one from `timm.list_models()`, "
                         "'resnet50_trunc' or an 'hf-hub:org/model' id")
    repo = hub_repo(config)
    if repo and not config.hub_file:  # a hub_file is fetched by weights_file() and loaded by load_weights()
        require_hub(repo, config.name)
    pretrained = (config.pretrained or bool(config.hub)) and not config.weights and not config.hub_file
    kwargs = resolved_kwargs(config.model_kwargs)
    if config.hub and pretrained:
        kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": config.hub}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            if trunc_index is not None:
                trunk = timm.create_model(name, pretrained=pretrained, features_only=True,
                                          out_indices=(trunc_index,), **kwargs)
                return PooledTrunk(trunk)
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
            if config.pooling == "attn_pool":
                return AttentionPooledTrunk(model)
            return ClassAndMeanTokens(model) if config.pooling == "cls_mean" else model
        except (OSError, RuntimeError, ValueError) as error:
            if not (hub or pretrained):
                raise InputError(f"encoder {config.name!r}: timm cannot build it ({error}); "
                                 "check --encoder.model_kwargs") from error
            raise InputError(
                f"encoder {config.name!r}: weights cannot be downloaded here ({type(error).__name__}); download "
                "them where there is network and pass --encoder.name <timm architecture> --encoder.weights FILE "
                "(see docs/features.md)"
            ) from error


def file_sha256(path: str | Path) -> str:
    return _sha256_cached(str(Path(path).resolve()), Path(path).stat().st_mtime_ns if Path(path).exists() else 0)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, mtime_ns: int) -> str:
    if not Path(path).is_file():
        raise InputError(f"{path}: encoder weights file not found; pass an existing --encoder.weights file")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a ``torch.save``'d dict (never unpickling arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: encoder weights file not found; pass an existing --encoder.weights file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"{path}: unknown weights format; use one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every loader failure means the same thing to the user
        raise InputError(f"{path}: cannot read weights ({type(error).__name__}: {error}); "
                         "pass a .safetensors or a torch.save'd state dict") from error
    for key in ("state_dict", "model", "model_state_dict", "teacher"):  # checkpoints that wrap the state dict
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors; save `model.state_dict()`")
    return dict(state)


def match_keys(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove the wrapper prefix (``module.``, ``backbone.``, ``model.encoder.`` ...) under which most keys fit.

    When the backbone sits under a prefix, keys outside it (an SSL projection head, an optimizer's extras)
    belong to other parts of the checkpoint and are left behind.
    """
    votes: Counter[str] = Counter()
    for key in state:
        for i in [0] + [j + 1 for j, char in enumerate(key) if char == "."]:
            if key[i:] in expected:
                votes[key[:i]] += 1
                break
    if not votes:
        return dict(state)
    prefix = max(votes, key=lambda p: (votes[p], -len(p)))
    if not prefix:
        return dict(state)
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load a local state dict into ``model``; a mismatch is an InputError listing the keys and the fix."""
    own = model.trunk if isinstance(model, (PooledTrunk, ClassAndMeanTokens)) else model
    expected = set(own.state_dict())
    state = match_keys(to_timm_layout(read_state_dict(path), own), expected)
    # Classifier heads (and layers cut away by a truncated trunk) are not part of an embedding model.
    state = {k: v for k, v in state.items() if k in expected or not _is_dropped_part(k, own)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    shape_errors = [k for k in expected & set(state) if own.state_dict()[k].shape != state[k].shape]
    if shape_errors:
        raise InputError(f"{path}: {len(shape_errors)} tensors have other shapes than the model's "
                         f"(e.g. {_few(shape_errors)}); the file is for another architecture; pass the matching "
                         "--encoder.name or --encoder.model_kwargs")
    if strict and (missing or unexpected):
        raise InputError(f"{path}: weights do not fit encoder ({len(missing)} missing keys: {_few(missing)}; "
                         f"{len(unexpected)} unexpected keys: {_few(unexpected)}); pass the matching "
                         "--encoder.name, or --encoder.strict false to load what fits")
    own.load_state_dict(state, strict=False)


def _is_dropped_part(key: str, model: nn.Module) -> bool:
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or "fc"
    heads = (head,) if isinstance(head, str) else tuple(head)
    parts = heads + ("fc", "head", "classifier", "layer4")
    return any(key == p or key.startswith(p + ".") for p in parts)


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "") if keys else "none"


def build_transform(model: nn.Module, config: EncoderConfig,
                    patch_size: int | None) -> tuple[Callable[[Any], torch.Tensor], dict[str, Any]]:
    """The eval transform: resize the (already target-mpp) patch to the model's input size, then normalise.

    Patches arrive at ``patch_size`` px at the target mpp, so a CNN sees them as they are (no crop: the
    stored coordinates describe exactly what was embedded). Fixed-size models (ViTs) get the whole patch
    resized to their input size.
    """
    from timm.data import create_transform, resolve_data_config

    data = dict(resolve_data_config({}, model=model))
    for key in ("mean", "std", "interpolation"):  # the model card's values win over the architecture's defaults
        if getattr(config, key) is not None:
            data[key] = tuple(getattr(config, key)) if key != "interpolation" else config.interpolation
    fixed = bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False))
    size = config.input_size or (native_input_size(model, data) if fixed or not patch_size else patch_size)
    transform = create_transform(input_size=(3, size, size), interpolation=data["interpolation"], mean=data["mean"],
                                 std=data["std"], crop_pct=1.0, crop_mode="center", is_training=False)
    spec = {
        "input_size": [3, int(size), int(size)],
        "patch_size": patch_size,
        "resize": "none" if size == patch_size else f"whole patch to {size}px",
        "interpolation": data["interpolation"],
        "mean": [float(v) for v in data["mean"]],
        "std": [float(v) for v in data["std"]],
        "crop_pct": 1.0,
        "timm_transform": " | ".join(type(t).__name__ for t in getattr(transform, "transforms", [transform])),
    }
    return transform, spec


def native_input_size(model: nn.Module, data: Mapping[str, Any]) -> int:
    """The side a fixed-size model was built for (``img_size`` overrides the pretrained config's)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    return int(data["input_size"][-1])


def default_tag(config: EncoderConfig, sha: str) -> str:
    """``resnet18-1a2b3c4d`` for a weights file, ``resnet18-random-seed0`` for random init."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", config.name.removeprefix("hf-hub:")).strip("_.")
    if config.weights:
        return f"{base}-{sha[:8]}"
    if config.hub:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", config.hub).strip("_.") + "-pretrained"
    if config.pretrained or config.name.startswith("hf-hub:"):
        return f"{base}-pretrained"
    return f"{base}-random-seed{config.seed}"

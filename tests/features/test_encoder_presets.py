"""Foundation-model presets (configs/encoders/*.yaml): model-card facts, loading random weights of the same
architecture from a local safetensors file through the preset, token pooling, checksum and offline failures."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from features.encoders import EncoderConfig, build_encoder, create_model, resolved_kwargs
from features.errors import InputError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "configs" / "encoders"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
BIOPTIMUS = ([0.707223, 0.578729, 0.703617], [0.211883, 0.230117, 0.177517])
# From each model card: hub repo, embedding width, input size, normalisation.
CARDS = {
    "uni": ("MahmoodLab/UNI", 1024, 224, IMAGENET),
    "uni2_h": ("MahmoodLab/UNI2-h", 1536, 224, IMAGENET),
    "virchow2": ("paige-ai/Virchow2", 2560, 224, IMAGENET),
    "h_optimus_0": ("bioptimus/H-optimus-0", 1536, 224, BIOPTIMUS),
    "h_optimus_1": ("bioptimus/H-optimus-1", 1536, 224, BIOPTIMUS),
    "prov_gigapath": ("prov-gigapath/prov-gigapath", 1536, 224, IMAGENET),
}
SMALL = {"depth": 1, "embed_dim": 96, "num_heads": 4}  # the same timm class, cut down for CI


def preset(name: str, **override) -> EncoderConfig:
    return EncoderConfig(**{**yaml.safe_load((PRESETS / f"{name}.yaml").read_text()), **override})


def test_every_preset_is_listed_here():
    assert sorted(p.stem for p in PRESETS.glob("*.yaml")) == sorted(CARDS)


@pytest.mark.parametrize("name", sorted(CARDS))
def test_preset_matches_its_model_card(name):
    """The full-size architecture (built on the meta device: no memory, no weights) has the card's width."""
    hub, dim, size, (mean, std) = CARDS[name]
    config = preset(name, hub=None)
    assert preset(name).hub == hub and config.input_size == size and config.mean == mean and config.std == std
    with torch.device("meta"):
        model = create_model(config)
    assert model.num_features == dim


@pytest.mark.parametrize("name", sorted(CARDS))
def test_preset_loads_local_weights_and_embeds_as_the_card_says(tmp_path, name):
    """Random weights of the preset's architecture, saved as safetensors, load through the preset (with their
    checksum) and give the source model's embedding: the class token, or class token + patch-token mean."""
    config = preset(name)
    kwargs = {**resolved_kwargs(config.model_kwargs), **SMALL}
    torch.manual_seed(5)
    source = timm.create_model(config.name, num_classes=0, **kwargs).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = build_encoder(preset(name, weights=str(path), weights_sha256=sha, seed=99,
                                  model_kwargs={**config.model_kwargs, **SMALL}), patch_size=config.input_size)
    images = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        tokens = source.forward_features(images)
        cls = tokens[:, 0]
        want = torch.cat([cls, tokens[:, source.num_prefix_tokens:].mean(1)], -1) if name == "virchow2" else cls
        got = loaded.model(images)
    assert loaded.dim == got.shape[1] == (2 if name == "virchow2" else 1) * SMALL["embed_dim"]
    torch.testing.assert_close(got, want)
    assert loaded.transform_spec["mean"] == pytest.approx(CARDS[name][3][0])
    assert loaded.transform_spec["input_size"] == [3, 224, 224]
    assert loaded.attrs()["pooling"] == config.pooling and loaded.attrs()["weights_sha256"] == sha


def test_wrong_checksum_is_refused_in_one_line(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(InputError, match="differs from --encoder.weights_sha256"):
        build_encoder(preset("uni", weights=str(path), weights_sha256="0" * 64))


@pytest.mark.parametrize("offline", [True, False])
def test_hub_preset_without_network_fails_at_once_in_one_line(tmp_path, monkeypatch, offline):
    """No hub cache and no network (or HF_HUB_OFFLINE=1): one line naming the repo and the fix, at once
    (huggingface_hub alone retries an unreachable host for ~20 s)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed local port: no network
    start = time.perf_counter()
    with pytest.raises(InputError) as error:
        build_encoder(preset("uni"))
    message = str(error.value)
    assert "\n" not in message and "MahmoodLab/UNI" in message and "--encoder.weights" in message
    assert ("HF_HUB_OFFLINE" in message) == offline
    assert time.perf_counter() - start < 5

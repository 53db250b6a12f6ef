"""Encoders: local weights round-trip (safetensors and torch.save), key handling, seeding, offline errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from features.encoders import EncoderConfig, build_encoder
from features.errors import InputError

torch.set_num_threads(1)
TINY = "resnet10t"


def embed(encoder, images: list[Image.Image]) -> np.ndarray:
    with torch.inference_mode():
        return encoder.model(torch.stack([encoder.transform(im) for im in images])).numpy()


@pytest.fixture(scope="module")
def patches() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]


@pytest.fixture(scope="module")
def source():
    """A random encoder with seed 7 and its state dict."""
    encoder = build_encoder(EncoderConfig(name=TINY, seed=7), patch_size=32)
    return encoder, {k: v.clone().contiguous() for k, v in encoder.model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip(tmp_path, source, patches, suffix):
    encoder, state = source
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = build_encoder(EncoderConfig(name=TINY, weights=str(path), seed=123), patch_size=32)
    np.testing.assert_array_equal(embed(loaded, patches), embed(encoder, patches))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    attrs = loaded.attrs()
    assert attrs["weights_sha256"] == sha and attrs["weights"] == str(path)
    assert loaded.tag == f"{TINY}-{sha[:8]}"
    assert {"encoder", "weights", "weights_sha256", "transform", "hnm_mil_version"} <= set(attrs)
    assert json.loads(attrs["transform"])["input_size"] == [3, 32, 32]
    assert loaded.dim == 512 and embed(loaded, patches).shape == (3, 512)


def test_wrapped_checkpoint_prefixes_and_head_are_handled(tmp_path, source, patches):
    encoder, state = source
    wrapped = {f"module.backbone.{k}": v for k, v in state.items()}
    wrapped["module.backbone.fc.weight"] = torch.zeros(10, 512)  # an ImageNet head: not part of an embedder
    wrapped["module.projector.0.weight"] = torch.zeros(4, 4)  # an SSL projection head beside the backbone
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": wrapped}, path)
    loaded = build_encoder(EncoderConfig(name=TINY, weights=str(path)), patch_size=32)
    np.testing.assert_array_equal(embed(loaded, patches), embed(encoder, patches))


def test_wrong_keys_raise_input_error_listing_them(tmp_path, source):
    _, state = source
    broken = dict(state)
    broken.pop("conv1.0.weight")
    broken["extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(InputError, match=r"1 missing keys: conv1\.0\.weight.*1 unexpected keys: extra\.weight"):
        build_encoder(EncoderConfig(name=TINY, weights=str(path)))
    build_encoder(EncoderConfig(name=TINY, weights=str(path), strict=False))  # the documented escape hatch


def test_weights_of_another_architecture_are_refused(tmp_path, source):
    _, state = source
    path = tmp_path / "r10.safetensors"
    save_file(state, str(path))
    with pytest.raises(InputError, match="another architecture|missing keys"):
        build_encoder(EncoderConfig(name="resnet18", weights=str(path)))


def test_random_init_is_seeded(patches):
    a = embed(build_encoder(EncoderConfig(name=TINY, seed=1), patch_size=32), patches)
    b = embed(build_encoder(EncoderConfig(name=TINY, seed=1), patch_size=32), patches)
    c = embed(build_encoder(EncoderConfig(name=TINY, seed=2), patch_size=32), patches)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert build_encoder(EncoderConfig(name=TINY, seed=1)).attrs()["weights_sha256"] == ""


def test_truncated_resnet50_is_1024_d_and_loads_full_resnet_weights(tmp_path):
    import timm

    full = timm.create_model("resnet50", num_classes=1000).eval()  # what a torchvision/timm ImageNet file holds
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)
    encoder = build_encoder(EncoderConfig(name="resnet50_trunc", weights=str(path)), patch_size=32)
    assert encoder.dim == 1024
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = full.layer3(full.layer2(full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(x.clone())))))))
        np.testing.assert_allclose(encoder.model(x).numpy(), expected.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-5)


def test_fixed_size_models_resize_whole_patch():
    encoder = build_encoder(EncoderConfig(name="vit_tiny_patch16_224", model_kwargs={"img_size": 64}), patch_size=32)
    spec = encoder.transform_spec
    assert spec["input_size"] == [3, 64, 64] and spec["resize"].startswith("whole patch")
    assert encoder.transform(Image.new("RGB", (32, 32))).shape == (3, 64, 64)


def test_offline_hub_and_missing_files_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="cannot be downloaded.*--encoder.weights"):
        build_encoder(EncoderConfig(name="hf-hub:MahmoodLab/UNI"))
    with pytest.raises(InputError, match="not found"):
        build_encoder(EncoderConfig(name=TINY, weights=str(tmp_path / "nope.safetensors")))
    with pytest.raises(InputError, match="not a timm model"):
        build_encoder(EncoderConfig(name="no_such_model_xyz"))


@pytest.mark.parametrize("pooling", ["cls_mean", "attn_pool"])
def test_pooled_vit_holds_each_trunk_weight_once_and_still_reads_the_input_size(pooling):
    encoder = build_encoder(EncoderConfig(name="vit_tiny_patch16_224", pooling=pooling, model_kwargs={"img_size": 64}),
                            patch_size=64)
    keys = list(encoder.model.state_dict())
    assert any(key.startswith("trunk.patch_embed.") for key in keys)
    assert not any(key.startswith("patch_embed.") for key in keys)  # a second registration would save it twice
    assert encoder.transform_spec["input_size"] == [3, 64, 64]

"""Foundation-model presets (configs/encoders/*.yaml): model-card facts, loading random weights of the same
architecture from a local safetensors file through the preset, token pooling, checksum and offline failures; the
two presets whose hub files are not timm's: Phikon-v2 (a transformers Dinov2Model, checked against transformers
itself) and CONCH v1.5 (TRIDENT's vision tower with its attentional pooler, checked against its math written out)."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from features.encoders import EncoderConfig, build_encoder, create_model, resolved_kwargs
from features.errors import InputError
from fixtures import hub_cache_file, no_network

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
    "phikon_v2": ("owkin/phikon-v2", 1024, 224, IMAGENET),
    "conch_v1_5": ("MahmoodLab/conchv1_5", 768, 448, IMAGENET),
}
TIMM_KEYED = sorted(set(CARDS) - {"conch_v1_5"})  # presets whose embedding is the timm model's own output
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


@pytest.mark.parametrize("name", TIMM_KEYED)
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
@pytest.mark.parametrize("name", ["uni", "phikon_v2", "conch_v1_5"])
def test_hub_preset_without_network_fails_at_once_in_one_line(tmp_path, monkeypatch, offline, name):
    """No hub cache and no network (or HF_HUB_OFFLINE=1): one line naming the repo and the fix, at once
    (huggingface_hub alone retries an unreachable host for ~20 s), for timm's hub loading and for a hub_file."""
    no_network(monkeypatch, tmp_path / "hub", offline)
    start = time.perf_counter()
    with pytest.raises(InputError) as error:
        build_encoder(preset(name))
    message = str(error.value)
    assert "\n" not in message and CARDS[name][0] in message and "--encoder.weights" in message
    assert ("HF_HUB_OFFLINE" in message) == offline
    assert time.perf_counter() - start < 5


def test_hub_file_the_hub_refuses_fails_in_one_line(tmp_path, monkeypatch):
    """A reachable hub that refuses the file (gated and not logged in, say): one line with both fixes."""
    import huggingface_hub

    import features.encoders

    def refuse(*args, **kwargs):
        raise PermissionError("401 Client Error: access to model MahmoodLab/conchv1_5 is restricted")

    no_network(monkeypatch, tmp_path / "hub", offline=False)
    monkeypatch.setattr(features.encoders, "require_hub", lambda *args, **kwargs: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(InputError) as error:
        build_encoder(preset("conch_v1_5"))
    message = str(error.value)
    assert "\n" not in message and "pytorch_model_vision.bin" in message and "MahmoodLab/conchv1_5" in message
    assert "log in" in message and "--encoder.weights" in message


# --- Phikon-v2: a transformers Dinov2Model checkpoint, converted to timm's ViT ---------------------------------------

V5_TO_V4 = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
            "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}


def transformers_names(state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """The state dict under transformers 4's attention names (those of the hub's file) or transformers 5's."""
    pairs = V5_TO_V4.items() if version == 4 else [(old, new) for new, old in V5_TO_V4.items()]
    renamed = {}
    for key, value in state.items():
        for old, new in pairs:
            key = key.replace(old, new)
        renamed[key] = value.contiguous()
    return renamed


def random_dinov2(image_size: int):
    """A cut-down Phikon-v2 (same structure: patch 16, layer scale, class token, no registers), every weight random
    (layer scales and mask token included, so a wrongly mapped tensor shows)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(7)
    config = Dinov2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=16,
                          image_size=image_size, layerscale_value=1e-5, layer_norm_eps=1e-6, qkv_bias=True)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


PHIKON_SMALL = {"depth": 2, "embed_dim": 96, "num_heads": 4}


@pytest.mark.parametrize(("version", "image_size"), [(4, 224), (5, 224), (4, 512)])
def test_phikon_v2_loads_transformers_weights_and_embeds_as_dinov2model(tmp_path, version, image_size):
    """A Dinov2Model's safetensors (transformers 4 or 5 names) load through the preset into timm's ViT and give
    ``last_hidden_state[:, 0]`` of transformers itself; a checkpoint on another position grid (512 px: 32 x 32)
    embeds a 224 px tile as transformers does, which interpolates the table at every forward pass."""
    source = random_dinov2(image_size)
    path = tmp_path / "model.safetensors"
    save_file(transformers_names(source.state_dict(), version), str(path))
    loaded = build_encoder(preset("phikon_v2", weights=str(path), model_kwargs={
        **preset("phikon_v2").model_kwargs, **PHIKON_SMALL}), patch_size=224)
    images = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        want = source(pixel_values=images).last_hidden_state[:, 0]
        got = loaded.model(images)
    assert loaded.dim == got.shape[1] == 96
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_phikon_v2_loads_from_a_filled_hub_cache_without_network(tmp_path, monkeypatch):
    """The hub's model.safetensors in the hub cache (as `hf download owkin/phikon-v2` leaves it) is found without
    network, converted, and recorded as the hub file with its real checksum."""
    path = hub_cache_file(tmp_path / "hub", "owkin/phikon-v2", "model.safetensors")
    source = random_dinov2(224)
    save_file(transformers_names(source.state_dict(), 4), str(path))
    no_network(monkeypatch, tmp_path / "hub", offline=True)
    loaded = build_encoder(preset("phikon_v2", model_kwargs={**preset("phikon_v2").model_kwargs, **PHIKON_SMALL}))
    images = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(images), source(pixel_values=images).last_hidden_state[:, 0],
                                   atol=1e-5, rtol=1e-5)
    attrs = loaded.attrs()
    assert attrs["weights"] == "hf-hub:owkin/phikon-v2/model.safetensors"
    assert attrs["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.tag == "owkin_phikon-v2-pretrained"


# --- CONCH v1.5: TRIDENT's vision tower (timm trunk + attentional pooler) ---------------------------------------------

POOL, HEADS = 768, 8  # the pooler's width and heads, as TRIDENT builds CONCH v1.5


def random_conch_tower(grid: int) -> dict[str, torch.Tensor]:
    """A cut-down CONCH v1.5 vision tower file: a timm ViT-L/16 trunk with layer scale (position table on a
    ``grid`` x ``grid`` grid) and the pooler's tensors under the released names, every weight random."""
    torch.manual_seed(11)
    trunk = timm.create_model("vit_large_patch16_224", num_classes=0, img_size=16 * grid, patch_size=16,
                              init_values=1.0, **SMALL)
    state = {f"trunk.{k}": torch.randn_like(v) * 0.2 for k, v in trunk.state_dict().items()}
    width = SMALL["embed_dim"]
    shapes = {"attn_pool_contrast.query": (1, POOL), "attn_pool_contrast.ln_q.weight": (POOL,),
              "attn_pool_contrast.ln_q.bias": (POOL,), "attn_pool_contrast.ln_k.weight": (width,),
              "attn_pool_contrast.ln_k.bias": (width,), "attn_pool_contrast.to_q.weight": (POOL, POOL),
              "attn_pool_contrast.to_kv.weight": (2 * POOL, width), "attn_pool_contrast.to_out.weight": (POOL, POOL),
              "ln_contrast.weight": (POOL,), "ln_contrast.bias": (POOL,)}
    state.update({k: torch.randn(shape) * 0.2 for k, shape in shapes.items()})
    return state


def tower_embedding(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """TRIDENT's CONCH v1.5 forward, written out: the trunk (built at 224 px, 14 x 14 positions) stretches its
    table DINO-style to the input's grid, runs its blocks and final norm; one learned query attends (8 heads,
    bias-free projections, layer-normed query and tokens) over all tokens; LayerNorm of the result."""
    trunk = timm.create_model("vit_large_patch16_224", num_classes=0, img_size=224, patch_size=16, init_values=1.0,
                              **SMALL).eval()
    table = state["trunk.pos_embed"]
    side = math.isqrt(table.shape[1] - 1)
    patches = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if side != 14:  # TRIDENT's load: any other grid to its 14 x 14 trunk, bilinear
        patches = F.interpolate(patches, size=(14, 14), mode="bilinear", align_corners=False)
    grid = images.shape[-1] // 16
    patches = F.interpolate(patches, scale_factor=((grid + 0.1) / 14,) * 2, mode="bicubic", align_corners=False)
    table = torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    trunk.load_state_dict({k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")
                           and k != "trunk.pos_embed"}, strict=False)
    tokens = trunk.patch_embed.proj(images).flatten(2).transpose(1, 2)
    tokens = torch.cat([state["trunk.cls_token"].expand(len(images), -1, -1), tokens], dim=1) + table
    tokens = trunk.norm(trunk.blocks(tokens))
    p = "attn_pool_contrast."
    query = F.layer_norm(state[p + "query"], (POOL,), state[p + "ln_q.weight"], state[p + "ln_q.bias"])
    query = query @ state[p + "to_q.weight"].T
    keys_values = F.layer_norm(tokens, (tokens.shape[-1],), state[p + "ln_k.weight"], state[p + "ln_k.bias"])
    keys_values = keys_values @ state[p + "to_kv.weight"].T
    keys, values = keys_values[..., :POOL], keys_values[..., POOL:]
    head = POOL // HEADS
    pooled = []
    for h in range(HEADS):
        part = slice(h * head, (h + 1) * head)
        weights = torch.softmax(query[:, part] @ keys[..., part].transpose(1, 2) / math.sqrt(head), dim=-1)
        pooled.append(weights @ values[..., part])
    pooled = torch.cat(pooled, dim=-1) @ state[p + "to_out.weight"].T
    return F.layer_norm(pooled[:, 0], (POOL,), state["ln_contrast.weight"], state["ln_contrast.bias"])


@pytest.mark.parametrize("grid", [14, 16])
def test_conch_v1_5_embeds_as_tridents_vision_tower(tmp_path, grid):
    """The tower's .bin (position table on TRIDENT's 14 x 14 trunk grid, or another grid) loads through the preset
    and embeds a 448 px tile as TRIDENT's tower does: 768-d attentional pooling, not the class token. Saved again
    by this project (table now on the 28 x 28 grid), it loads unchanged and embeds the same."""
    state = random_conch_tower(grid)
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(state, path)
    kwargs = {**preset("conch_v1_5").model_kwargs, **SMALL}
    loaded = build_encoder(preset("conch_v1_5", weights=str(path), model_kwargs=kwargs), patch_size=512)
    images = torch.rand(2, 3, 448, 448)
    with torch.inference_mode():
        got = loaded.model(images)
        want = tower_embedding(state, images)
    assert loaded.dim == got.shape[1] == POOL
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert loaded.transform_spec["input_size"] == [3, 448, 448] and loaded.transform_spec["interpolation"] == "bilinear"
    assert loaded.attrs()["pooling"] == "attn_pool"

    again = tmp_path / "saved.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(again))
    reloaded = build_encoder(preset("conch_v1_5", weights=str(again), model_kwargs=kwargs), patch_size=512)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded.model(images), got)

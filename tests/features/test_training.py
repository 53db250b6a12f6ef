"""Encoder training: losses against hand-computed values, augmentations, weights files, and few-step runs of
``features pretrain`` / ``features finetune`` on tiny real slides whose weights ``features extract`` loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from features.encoders import EncoderConfig, build_encoder
from features.errors import InputError
from features.selection import write_selection
from features.slides import list_slides, open_slide
from features.store import coords_path, write_coords
from features.tiling import TilingConfig, tile_slide
from features.training import finetune, pretrain
from features.training.augment import MultiView, histology_augment
from features.training.contrastive import nt_xent_loss, supcon_loss
from features.training.encoder_module import embedding_spread
from features.training.patch_data import Selected, phase_order
from features.training.weights import save_encoder_weights
from fixtures import write_tiny_slide

torch.set_num_threads(1)
E1, E2 = [1.0, 0.0], [0.0, 1.0]
FAST = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0",
        "--encoder.name", "resnet10t"]


def test_nt_xent_hand_computed():
    # Two patches, each with two identical views, orthogonal to each other, t = 1: every anchor has one positive
    # (similarity 1) and two negatives (similarity 0): loss = -log(e / (e + 2)).
    z = torch.tensor([[E1, E1], [E2, E2]])
    assert supcon_loss(z, None, temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    assert nt_xent_loss(z[:, 0], z[:, 1], temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)


def test_supcon_hand_computed():
    # Same embeddings, one shared label: every other view is a positive: mean log-prob = 1/3 - log(e + 2).
    z = torch.tensor([[E1, E1], [E2, E2]])
    expected = math.log(math.e + 2) - 1 / 3
    assert supcon_loss(z, torch.tensor([0, 0]), temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # Temperature scales the similarities: at t = 0.5, similarity 1 counts as 2.
    expected_half = math.log(math.exp(2) + 2) - 2 / 3
    assert supcon_loss(z, torch.tensor([3, 3]), temperature=0.5).item() == pytest.approx(expected_half, rel=1e-6)


def test_supcon_matches_a_loop_over_anchors():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(5, 2, 4), dim=-1)
    labels = torch.tensor([0, 1, 0, 1, 1])
    flat, flat_labels = z.transpose(0, 1).reshape(10, 4), labels.repeat(2)
    losses = []
    for i in range(10):
        others = [a for a in range(10) if a != i]
        denominator = sum(math.exp(float(flat[i] @ flat[a]) / 0.07) for a in others)
        positives = [p for p in others if flat_labels[p] == flat_labels[i]]
        losses.append(-sum(float(flat[i] @ flat[p]) / 0.07 - math.log(denominator) for p in positives) / len(positives))
    assert supcon_loss(z, labels, 0.07).item() == pytest.approx(sum(losses) / 10, rel=1e-5)


def test_supcon_gradient_pulls_positives_together():
    # Two patches, two views each: a small gradient-descent step must lower the loss and bring each patch's two
    # views closer (cosine up), i.e. the gradient points the right way, not merely exists.
    z = torch.tensor([[E1, [0.6, 0.8]], [E2, [0.8, 0.6]]], requires_grad=True)
    loss = supcon_loss(z, None, 0.5)
    loss.backward()
    assert torch.isfinite(z.grad).all() and loss.item() > 0

    def view_cosines(emb: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(emb, dim=-1)
        return (unit[:, 0] * unit[:, 1]).sum(-1)

    with torch.no_grad():
        stepped = z - 0.01 * z.grad
        assert supcon_loss(stepped, None, 0.5) < loss
        assert (view_cosines(stepped) > view_cosines(z) + 1e-3).all()


def test_augment_keeps_size_and_gives_distinct_views():
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    views = MultiView(histology_augment(32), views=2)(image)
    assert views.shape == (2, 3, 32, 32) and views.dtype == torch.float32
    assert not torch.equal(views[0], views[1])


def test_phase_order_walks_the_pool_and_mixes_the_other_class():
    kinds = np.array(["positive"] * 3 + ["hard_negative"] * 5 + ["negative"] * 2, dtype=object)
    selected = Selected(items=[None] * 10, labels=(kinds == "positive").astype(int), kinds=kinds)
    hard_phase = phase_order(selected, "hard_negative", batch_size=4, seed=0, epoch=0)
    assert len(hard_phase) == 12  # ceil(5 hard / 2 per batch) = 3 batches of 4
    batches = hard_phase.reshape(3, 4)
    assert set(batches[:, :2].ravel()) == set(range(3, 8))  # every hard negative seen
    assert set(batches[:, 2:].ravel()) <= {0, 1, 2}  # topped up with positives
    positive_phase = phase_order(selected, "positive", batch_size=4, seed=0, epoch=1)
    assert len(positive_phase) == 8 and set(positive_phase.reshape(2, 4)[:, 2:].ravel()) <= set(range(3, 10))
    assert np.array_equal(hard_phase, phase_order(selected, "hard_negative", 4, 0, 0))
    with pytest.raises(InputError):
        phase_order(Selected([None], np.array([0]), np.array(["hard_negative"], dtype=object)), "positive", 4, 0, 0)


def test_saved_weights_load_in_the_extraction_encoder(tmp_path):
    model = build_encoder(EncoderConfig(name="resnet10t", seed=3)).model
    path = save_encoder_weights(model, tmp_path / "w.safetensors", {"note": "test"})
    loaded = build_encoder(EncoderConfig(name="resnet10t", weights=str(path), seed=9)).model
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar["note"] == "test" and len(sidecar["sha256"]) == 64 and "torch" in sidecar


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """Two tiny slides, their coords at 64 px, and a selection of positives and (hard) negatives."""
    root = tmp_path_factory.mktemp("cohort")
    for index, name in enumerate(("tumor", "normal")):
        write_tiny_slide(root / "slides" / f"{name}.tiff", seed=index)
    rows = []
    for ref in list_slides(root / "slides"):
        slide = open_slide(ref.path)
        coords, geometry, _ = tile_slide(slide, ref, None, TilingConfig(patch_size=64))
        write_coords(coords_path(root / "store", ref.slide_id), coords, geometry.to_attrs())
        for i, (x, y) in enumerate(coords[:6]):
            kind = "positive" if ref.slide_id == "tumor" else ("hard_negative" if i < 3 else "negative")
            rows.append({"slide_id": ref.slide_id, "x": x, "y": y, "pseudo_label": int(kind == "positive"),
                         "score": 0.0, "kind": kind})
    write_selection(root / "selection.csv", pd.DataFrame(rows))
    return {"slides": root / "slides", "store": root / "store", "selection": root / "selection.csv", "root": root}


def test_pretrain_writes_weights_that_extraction_loads(cohort, tmp_path):
    out = tmp_path / "simclr.safetensors"
    argv = ["--slides", str(cohort["slides"]), "--coords", str(cohort["store"]), "--out", str(out),
            "--data.max_patches", "12", "--data.batch_size", "6", "--trainer.max_steps", "2", *FAST]
    pretrain.main(argv)
    encoder = build_encoder(EncoderConfig(name="resnet10t", weights=str(out)), patch_size=64)
    start = build_encoder(EncoderConfig(name="resnet10t"), patch_size=64)
    changed = [k for k, v in encoder.model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, start.model.state_dict()[k])]
    assert changed, "two SGD steps must change the weights"
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["steps"] == 2 and sidecar["n_patches"] == 12
    mtime = out.stat().st_mtime_ns
    pretrain.main(argv)  # rerun skips finished work
    assert out.stat().st_mtime_ns == mtime


def test_finetune_two_phases_from_weights(cohort, tmp_path):
    start = save_encoder_weights(build_encoder(EncoderConfig(name="resnet10t", seed=1)).model,
                                 tmp_path / "start.safetensors")
    out = tmp_path / "ft.safetensors"
    finetune.main(["--slides", str(cohort["slides"]), "--coords", str(cohort["store"]), "--selection",
                   str(cohort["selection"]), "--out", str(out), "--encoder.weights", str(start),
                   "--data.batch_size", "4", "--trainer.max_epochs", "2", *FAST])
    sidecar = json.loads(Path(f"{out}.json").read_text())
    # epoch 0: 3 hard negatives, 2 per batch -> 2 steps; epoch 1: 6 positives, 2 per batch -> 3 steps
    assert sidecar["steps"] == 5 and sidecar["selection_counts"] == {"positive": 6, "hard_negative": 3, "negative": 3}
    tuned = build_encoder(EncoderConfig(name="resnet10t", weights=str(out)), patch_size=64).model
    before = build_encoder(EncoderConfig(name="resnet10t", weights=str(start)), patch_size=64).model
    assert any(not torch.equal(v, before.state_dict()[k]) for k, v in tuned.state_dict().items() if v.is_floating_point())


def test_finetune_interpolate_saves_the_point_between_start_and_fine_tuned_weights(cohort, tmp_path):
    """--interpolate 0.5 (WiSE-FT) saves start + 0.5 (fine-tuned - start) for every float tensor; the same seeded
    run with the default 1 gives the fine-tuned end point to check against."""
    from safetensors.torch import load_file

    start = save_encoder_weights(build_encoder(EncoderConfig(name="resnet10t", seed=1)).model,
                                 tmp_path / "start.safetensors")
    run = ["--slides", str(cohort["slides"]), "--coords", str(cohort["store"]), "--selection", str(cohort["selection"]),
           "--encoder.weights", str(start), "--data.batch_size", "4", "--trainer.max_epochs", "2", *FAST]
    finetune.main([*run, "--out", str(tmp_path / "full.safetensors")])
    finetune.main([*run, "--out", str(tmp_path / "half.safetensors"), "--interpolate", "0.5"])
    before, full, half = (load_file(str(tmp_path / f"{name}.safetensors")) for name in ("start", "full", "half"))
    moved = [key for key, value in full.items() if value.is_floating_point() and not torch.equal(value, before[key])]
    assert moved
    for key in moved:
        torch.testing.assert_close(half[key], before[key] + 0.5 * (full[key] - before[key]), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "half.safetensors.json").read_text())["settings"]["interpolate"] == 0.5
    with pytest.raises(InputError, match="--interpolate 1.5"):
        finetune.main([*run, "--out", str(tmp_path / "bad.safetensors"), "--interpolate", "1.5"])


def test_finetune_soup_saves_the_mean_of_the_seeds_fine_tuned_encoders(cohort, tmp_path):
    """--soup_seeds [1] fine-tunes from the same start under data seeds 0 and 1 and saves their mean; the two
    single-seed runs give the end points to check against."""
    from safetensors.torch import load_file

    start = save_encoder_weights(build_encoder(EncoderConfig(name="resnet10t", seed=1)).model,
                                 tmp_path / "start.safetensors")
    run = ["--slides", str(cohort["slides"]), "--coords", str(cohort["store"]), "--selection", str(cohort["selection"]),
           "--encoder.weights", str(start), "--data.batch_size", "4", "--trainer.max_epochs", "2", *FAST]
    for seed in (0, 1):
        finetune.main([*run, "--data.seed", str(seed), "--out", str(tmp_path / f"seed{seed}.safetensors")])
    finetune.main([*run, "--soup_seeds", "[1]", "--out", str(tmp_path / "soup.safetensors")])
    first, second, soup = (load_file(str(tmp_path / f"{name}.safetensors")) for name in ("seed0", "seed1", "soup"))
    differ = [key for key, value in first.items() if value.is_floating_point() and not torch.equal(value, second[key])]
    assert differ  # the two orders trained two different encoders
    for key in differ:
        torch.testing.assert_close(soup[key], (first[key] + second[key]) / 2, rtol=1e-5, atol=1e-6)
    sidecar = json.loads((tmp_path / "soup.safetensors.json").read_text())
    assert sidecar["settings"]["soup_seeds"] == [1] and sidecar["torch_threads"] == torch.get_num_threads()


def test_finetune_cosine_schedule_ends_at_zero_when_phases_differ_in_length(cohort, tmp_path):
    """Positive phase first (3 steps), then hard negatives (2): Lightning's estimate, 3 x 2 = 6 steps, would leave
    the schedule short of its end; the count per phase makes the last step's learning rate zero."""
    out = tmp_path / "ft.safetensors"
    finetune.main(["--slides", str(cohort["slides"]), "--coords", str(cohort["store"]), "--selection",
                   str(cohort["selection"]), "--out", str(out), "--data.batch_size", "4", "--trainer.max_epochs", "2",
                   "--phases", "[positive, hard_negative]", *FAST])
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["steps"] == 5 and sidecar["final_lr"] == pytest.approx(0.0, abs=1e-12)


def test_finetune_rejects_a_selection_from_another_cohort(cohort, tmp_path):
    other = tmp_path / "sel.csv"
    write_selection(other, pd.DataFrame([{"slide_id": "elsewhere", "x": 0, "y": 0, "pseudo_label": 1, "score": 0.0,
                                          "kind": "positive"}]))
    with pytest.raises(InputError, match="elsewhere"):
        finetune.main(["--slides", str(cohort["slides"]), "--coords", str(cohort["store"]), "--selection", str(other),
                       "--out", str(tmp_path / "x.safetensors"), *FAST])


def test_embedding_spread_is_zero_only_for_a_collapsed_batch():
    assert float(embedding_spread(torch.ones(8, 16))) < 1e-6
    assert float(embedding_spread(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))) > 0.5


def test_finetune_refuses_to_write_a_collapsed_encoder(cohort, tmp_path):
    out = tmp_path / "ft.safetensors"
    with pytest.raises(InputError, match="collapsed"):
        finetune.main(["--slides", str(cohort["slides"]), "--coords", str(cohort["store"]), "--selection",
                       str(cohort["selection"]), "--out", str(out), "--data.batch_size", "4",
                       "--trainer.max_epochs", "2", "--optim.lr", "1e6", "--optim.warmup_fraction", "0",
                       "--trainer.gradient_clip_val", "null", *FAST])
    assert not out.exists() and not Path(f"{out}.json").exists()

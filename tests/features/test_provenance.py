"""Provenance of the feature store: reruns with other settings are refused, mixed folders are refused, two runs
can share a store. Real slides through OpenSlide, real HDF5, real `features extract` processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from filelock import FileLock

from features.__main__ import main as features_main
from features.errors import InputError
from features.extraction.cli import extract, tile
from features.provenance import lock_path
from features.store import (TMP_MARKER, Manifest, find_feature_files, read_bag, read_coords, remove_stale_temporaries,
                            write_features)
from fixtures import dead_pid, hub_cache_file, no_network, write_bag, write_tiny_slide

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
TAG = "resnet10t-random-seed3"
FAST = ["--patch_size", "64", "--batch_size", "32", "--num_workers", "0", "--threads", "1",
        "--encoder.name", "resnet10t", "--encoder.seed", "3"]


def small_slides(folder: Path, n: int) -> Path:
    for i in range(n):
        write_tiny_slide(folder / f"s{i}.tiff", width=512, height=384, seed=i)
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    slides = small_slides(root / "slides", 2)
    out = root / "out"
    extract(["--slides", str(slides), "--out", str(out), *FAST])
    return slides, out


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.h5"))}


@pytest.mark.parametrize("change, named", [
    (["--patch_size", "96"], r"--patch_size 96 \(stored: 64\)"),
    (["--mpp", "0.25"], r"--mpp 0.25 \(stored: 0.5\)"),
    (["--tissue.min_saturation", "0.2"], r"--tissue.min_saturation 0.2 \(stored: 0.05\)"),
    (["--dtype", "float16"], r"--dtype 'float16' \(stored: 'float32'\)"),
    (["--tta", "d4"], r"--tta 'd4' \(stored: 'none'\)"),
    (["--views", "2"], r"--views 2 \(stored: 0\)"),
    (["--encoder.seed", "4", "--encoder.tag", TAG], r"--encoder.seed 4 \(stored: 3\)"),
    (["--encoder.name", "resnet18", "--encoder.tag", TAG], r"--encoder.name 'resnet18' \(stored: 'resnet10t'\)"),
])
def test_rerun_with_other_settings_is_refused_and_names_them(store, change, named):
    slides, out = store
    before = snapshot(out)
    with pytest.raises(InputError, match=named + r".*another --out, or --overwrite true"):
        extract(["--slides", str(slides), "--out", str(out), *FAST, *change])
    assert snapshot(out) == before


def test_refusal_is_one_line_and_exit_2(store, capsys):
    slides, out = store
    code = features_main(["extract", "--slides", str(slides), "--out", str(out), *FAST, "--dtype", "float16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "dtype" in err and "Traceback" not in err


def test_same_settings_resume_and_skip(store, capsys):
    slides, out = store
    before = snapshot(out)
    extract(["--slides", str(slides), "--out", str(out), *FAST])
    assert "2 already done" in capsys.readouterr().out
    assert snapshot(out) == before


def test_tile_rerun_with_other_tissue_settings_is_refused(tmp_path):
    slides = small_slides(tmp_path / "slides", 1)
    args = ["--slides", str(slides), "--out", str(tmp_path / "out"), "--patch_size", "64"]
    tile(args)
    before = snapshot(tmp_path / "out")
    with pytest.raises(InputError, match=r"--min_tissue 0.9 \(stored: 0.25\)"):
        tile([*args, "--min_tissue", "0.9"])
    with pytest.raises(InputError, match=r"--overlap 16 \(stored: 0\)"):
        tile([*args, "--overlap", "16"])
    assert snapshot(tmp_path / "out") == before
    tile([*args, "--overlap", "16", "--overwrite", "true"])  # redone with the new settings, none of the old
    coords, attrs = read_coords(tmp_path / "out" / "coords" / "s0.h5")
    assert attrs["overlap"] == 16 and len(coords) > len(read_coords_from(before))
    settings = json.loads((tmp_path / "out" / "coords" / "settings.json").read_text())["settings"]
    assert settings["overlap"] == 16


def read_coords_from(snap: dict[str, bytes]) -> np.ndarray:
    import io

    with h5py.File(io.BytesIO(snap["coords/s0.h5"]), "r") as h5:
        return h5["coords"][:]


def test_partly_finished_store_never_holds_two_kinds(tmp_path):
    slides = small_slides(tmp_path / "slides", 2)
    out = tmp_path / "out"
    extract(["--slides", str(slides), "--out", str(out), *FAST])
    folder = out / "features" / TAG
    (folder / "s1.h5").unlink()  # as if the run had been killed before its last slide
    with pytest.raises(InputError, match="dtype"):
        extract(["--slides", str(slides), "--out", str(out), *FAST, "--dtype", "float16"])
    assert sorted(p.name for p in folder.glob("*.h5")) == ["s0.h5"]
    # Stores written before records existed are checked through the attributes of their files.
    (folder / "settings.json").unlink()
    (out / "coords" / "settings.json").unlink()
    with pytest.raises(InputError, match=r"--dtype 'float16' \(stored: 'float32'\)"):
        extract(["--slides", str(slides), "--out", str(out), *FAST, "--dtype", "float16"])
    with pytest.raises(InputError, match=r"--patch_size 96 \(stored: 64\)"):
        extract(["--slides", str(slides), "--out", str(out), *FAST, "--patch_size", "96"])
    # --overwrite with other settings, killed half-way (here: a damaged slide stops it): no old file survives it.
    (slides / "s0x.tiff").write_bytes(b"not a slide")
    with pytest.raises(InputError):
        extract(["--slides", str(slides), "--out", str(out), *FAST, "--dtype", "float16", "--overwrite", "true"])
    (slides / "s0x.tiff").unlink()
    assert not any(read_bag(p).features.dtype == np.float32 for p in folder.glob("*.h5"))
    extract(["--slides", str(slides), "--out", str(out), *FAST, "--dtype", "float16"])  # resumes with the new kind
    dtypes = {p.name: read_bag(p).features.dtype for p in folder.glob("*.h5")}
    assert dtypes == {"s0.h5": np.float16, "s1.h5": np.float16}
    assert json.loads((folder / "settings.json").read_text())["settings"]["dtype"] == "float16"


# ------------------------------------------------------------------------------------------ mixed folders


def test_a_folder_mixing_encoders_is_refused_naming_two_files(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "features" / "tag"
    write_bag(folder / "a.h5", rng.normal(size=(5, 8)), encoder="resnet18")
    write_bag(folder / "b.h5", rng.normal(size=(5, 8)), encoder="resnet18")
    assert set(find_feature_files(tmp_path)) == {"a", "b"}
    write_bag(folder / "c.h5", rng.normal(size=(5, 8)), encoder="vit_small")
    with pytest.raises(InputError, match=r"encoder.name: 'resnet18' vs 'vit_small'.*a.h5 vs c.h5"):
        find_feature_files(tmp_path)


@pytest.mark.parametrize("attr, values, named", [
    ("weights_sha256", ["ab" * 32, "cd" * 32], "encoder.weights_sha256"),
    ("encoder_seed", [0, 7], "encoder.seed: 0 vs 7"),
    ("dtype", ["float32", "float16"], "dtype: 'float32' vs 'float16'"),
    ("pooling", ["model", "cls_mean"], "encoder.pooling: 'model' vs 'cls_mean'"),
    ("transform", [json.dumps({"input_size": [3, 64, 64]}), json.dumps({"input_size": [3, 96, 96]})],
     "encoder.transform"),
])
def test_a_folder_mixing_checksums_seeds_transforms_or_dtypes_is_refused(tmp_path, attr, values, named):
    rng = np.random.default_rng(1)
    folder = tmp_path / "f"
    for name, value in zip(("a", "b"), values):
        path = write_bag(folder / f"{name}.h5", rng.normal(size=(4, 8)))
        with h5py.File(path, "r+") as h5:
            h5["features"].attrs[attr] = value
    with pytest.raises(InputError, match=re.escape(named) + r".*a.h5 vs b.h5"):
        find_feature_files(folder)


def test_a_folder_mixing_geometry_is_refused_and_attributeless_folders_load(tmp_path):
    rng = np.random.default_rng(2)
    write_bag(tmp_path / "f" / "a.h5", rng.normal(size=(4, 8)), patch_size_level0=224)
    write_bag(tmp_path / "f" / "b.h5", rng.normal(size=(4, 8)), patch_size_level0=256)
    with pytest.raises(InputError, match="patch_size: 224 vs 256"):
        find_feature_files(tmp_path / "f")
    (tmp_path / "clam" / "h5_files").mkdir(parents=True)
    for name in ("x", "y"):  # CLAM's layout: no attributes at all
        with h5py.File(tmp_path / "clam" / "h5_files" / f"{name}.h5", "w") as h5:
            h5["features"] = rng.normal(size=(3, 8)).astype(np.float32)
            h5["coords"] = np.zeros((3, 2), dtype=np.int64)
    assert set(find_feature_files(tmp_path / "clam")) == {"x", "y"}


def test_mil_data_refuses_a_mixed_folder(tmp_path):
    from mil.data.datamodule import MILDataModule
    from fixtures import synthetic_bags

    folder, labels = synthetic_bags(tmp_path, n_slides=8, n_patches=6, dim=8)
    path = sorted(folder.glob("*.h5"))[-1]
    with h5py.File(path, "r+") as h5:
        h5["features"].attrs["encoder"] = "another"
    with pytest.raises(InputError, match=r"encoder.name: 'synthetic' vs 'another'"):
        MILDataModule(features=str(folder), labels=str(labels))


# ------------------------------------------------------------------------------------------ concurrent runs


def env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


def test_stale_temporaries_are_removed_only_when_their_owner_is_gone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        in_flight = tmp_path / f"a.h5{TMP_MARKER}{live.pid}-0123abcd"
        left_over = tmp_path / f"b.h5{TMP_MARKER}{dead_pid()}-0123abcd"
        in_flight.write_bytes(b"being written")
        left_over.write_bytes(b"killed")
        assert remove_stale_temporaries(tmp_path) == 1
        assert in_flight.exists() and not left_over.exists()
    finally:
        live.kill()
        live.wait()


def test_manifest_keeps_the_rows_of_two_writers(tmp_path):
    first, second = Manifest(tmp_path / "manifest.csv"), Manifest(tmp_path / "manifest.csv")  # two runs, one store
    first.record("a", "ok", 3, 1.0)
    second.record("b", "ok", 4, 1.0)
    first.record("c", "error", error="bad")
    rows = Manifest(tmp_path / "manifest.csv").rows
    assert sorted(rows) == ["a", "b", "c"] and rows["b"]["n_patches"] == "4" and rows["c"]["status"] == "error"


def test_two_concurrent_runs_share_one_store_and_never_write_a_slide_twice(tmp_path):
    """Two real runs into one --out, while a third party (this test) holds slide s0 as a live run would."""
    slides = small_slides(tmp_path / "slides", 4)
    out = tmp_path / "out"
    folder = out / "features" / TAG
    held = FileLock(str(lock_path(out, TAG, "s0")))
    held.acquire()
    command = [sys.executable, "-m", "features", "extract", "--slides", str(slides), "--out", str(out), *FAST]
    runs = [subprocess.Popen(command, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    try:
        deadline = time.time() + 400
        others = [folder / f"s{i}.h5" for i in (1, 2, 3)]
        while not all(p.is_file() for p in others) and all(r.poll() is None for r in runs) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)
        assert all(r.poll() is None for r in runs), [r.communicate() for r in runs]  # they wait for s0 ...
        assert not (folder / "s0.h5").exists()  # ... and do not write it meanwhile
        written = write_features(folder / "s0.h5", np.zeros((1, 2)), {}, np.ones((1, 512)), {}).read_bytes()
    finally:
        held.release()
    results = [run.communicate(timeout=300) for run in runs]
    for run, (_, stderr) in zip(runs, results):
        assert run.returncode == 0, stderr
    done = [int(re.search(r"extracted (\d+) slides", stdout).group(1)) for stdout, _ in results]
    assert sum(done) == 3  # s1..s3 embedded by exactly one run each; s0 left to its holder
    assert (folder / "s0.h5").read_bytes() == written
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert sorted(manifest.index) == ["s0", "s1", "s2", "s3"] and set(manifest["status"]) == {"ok"}
    for path in others:
        bag = read_bag(path)
        assert len(bag) == manifest.loc[path.stem, "n_patches"] > 0 and np.isfinite(bag.features).all()
    assert not list(out.rglob(f"*{TMP_MARKER}*"))


# --------------------------------------------------------------------------- fine-tuning from the store's encoder

TRAIN = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0",
         "--data.batch_size", "4", "--trainer.max_epochs", "1"]


@pytest.fixture(scope="module")
def tuned_store(tmp_path_factory):
    """A store extracted with a weights file (not the default random encoder) and a selection mined from it."""
    from features.encoders import EncoderConfig, build_encoder
    from features.training.weights import save_encoder_weights

    root = tmp_path_factory.mktemp("tuned")
    slides = small_slides(root / "slides", 2)
    weights = save_encoder_weights(build_encoder(EncoderConfig(name="resnet10t", seed=1)).model,
                                   root / "start.safetensors")
    out = root / "store"
    extract(["--slides", str(slides), "--out", str(out), *FAST, "--encoder.weights", str(weights)])
    return {"slides": slides, "store": out, "weights": weights, "selection": mined_selection(out, root), "root": root}


def mined_selection(store: Path, root: Path) -> Path:
    """A selection as `mil mine` writes it: six patches of each slide, s0's positive, s1's negatives."""
    from features.selection import write_selection

    rows = []
    for slide_id in ("s0", "s1"):
        coords, _ = read_coords(store / "coords" / f"{slide_id}.h5")
        for i, (x, y) in enumerate(coords[:6]):
            kind = "positive" if slide_id == "s0" else ("hard_negative" if i < 3 else "negative")
            rows.append({"slide_id": slide_id, "x": x, "y": y, "pseudo_label": int(kind == "positive"), "score": 0.0,
                         "kind": kind})
    write_selection(root / "selection.csv", pd.DataFrame(rows))
    return root / "selection.csv"


def finetune_argv(cohort: dict, out: Path, *extra: str) -> list[str]:
    return ["--slides", str(cohort["slides"]), "--coords", str(cohort["store"]), "--selection",
            str(cohort["selection"]), "--out", str(out), *TRAIN, *extra]


def test_finetune_without_encoder_options_starts_from_the_store_encoder(tuned_store, tmp_path):
    from features.training import finetune

    out = tmp_path / "ft.safetensors"
    finetune.main(finetune_argv(tuned_store, out))
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["started_from"] == str(tuned_store["weights"].resolve()) and sidecar["encoder"] == "resnet10t"
    assert sidecar["settings"]["encoder"]["seed"] == 3 and sidecar["steps"] > 0


def test_finetune_refuses_encoder_options_that_contradict_the_store(tuned_store, tmp_path):
    from features.encoders import EncoderConfig, build_encoder
    from features.training import finetune
    from features.training.weights import save_encoder_weights

    other = save_encoder_weights(build_encoder(EncoderConfig(name="resnet10t", seed=2)).model,
                                 tmp_path / "other.safetensors")
    out = tmp_path / "ft.safetensors"
    with pytest.raises(InputError, match=r"--encoder.weights .*other.safetensors.*\(store: .*start.safetensors.*"
                                         r"--encoder.override true"):
        finetune.main(finetune_argv(tuned_store, out, "--encoder.weights", str(other)))
    with pytest.raises(InputError, match=r"--encoder.name resnet18 \(store: resnet10t\)"):
        finetune.main(finetune_argv(tuned_store, out, "--encoder.name", "resnet18"))
    assert not out.exists()
    # Options that agree with the store are fine (`mil hnm` passes them all); override takes the given encoder.
    argv = finetune_argv(tuned_store, out, "--encoder.name", "resnet10t", "--encoder.weights", str(tuned_store["weights"]),
                         "--encoder.seed", "3", "--encoder.model_kwargs", "{}")
    start = finetune.start_encoder(str(tuned_store["store"]), finetune.FinetuneEncoder(
        name="resnet10t", weights=str(tuned_store["weights"]), seed=3), finetune.given_encoder_fields(argv))
    assert start.weights == str(tuned_store["weights"])
    given = finetune.FinetuneEncoder(name="resnet10t", weights=str(other), override=True)
    assert finetune.start_encoder(str(tuned_store["store"]), given, {"weights", "override"}) == given


def test_finetune_names_missing_or_changed_store_weights(tuned_store, tmp_path):
    from features.training import finetune

    weights = tuned_store["weights"]
    kept = weights.with_name("kept.safetensors")
    weights.rename(kept)
    try:
        with pytest.raises(InputError, match=r"start.safetensors are missing; put the file back, or pass "
                                             r"--encoder.weights FILE"):
            finetune.main(finetune_argv(tuned_store, tmp_path / "a.safetensors"))
        weights.write_bytes(kept.read_bytes()[:-8] + b"changed!")
        with pytest.raises(InputError, match=r"start.safetensors: changed since .* \(sha256 "):
            finetune.main(finetune_argv(tuned_store, tmp_path / "b.safetensors"))
    finally:
        kept.replace(weights)


def test_finetune_on_a_coords_only_store_asks_for_an_encoder(tmp_path):
    from features.training import finetune

    slides = small_slides(tmp_path / "slides", 1)
    from features.selection import write_selection

    tile(["--slides", str(slides), "--out", str(tmp_path / "store"), "--patch_size", "64"])
    coords, _ = read_coords(tmp_path / "store" / "coords" / "s0.h5")
    write_selection(tmp_path / "selection.csv", pd.DataFrame(
        [{"slide_id": "s0", "x": x, "y": y, "pseudo_label": int(i < 2), "score": 0.0,
          "kind": "positive" if i < 2 else "hard_negative"} for i, (x, y) in enumerate(coords[:4])]))
    with pytest.raises(InputError, match="records no encoder"):
        finetune.main(["--slides", str(slides), "--coords", str(tmp_path / "store"), "--selection",
                       str(tmp_path / "selection.csv"), "--out", str(tmp_path / "x.safetensors"), *TRAIN])
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------- fine-tuning from a store made with hub weights, pooling, normalisation

HUB, HUB_FILE = "tiny-org/tiny-vit", "model.safetensors"
HUB_SOURCE = f"hf-hub:{HUB}/{HUB_FILE}"
# A tiny ViT whose weights are a preset-style hub_file, with Virchow2's pooling and a model card's normalisation:
# every field of the encoder that timm's defaults would silently get wrong.
HUB_ENCODER = ["--encoder.name", "vit_tiny_patch16_224", "--encoder.model_kwargs", '{"img_size": 64, "depth": 1}',
               "--encoder.hub", HUB, "--encoder.hub_file", HUB_FILE, "--encoder.pooling", "cls_mean",
               "--encoder.mean", "[0.6, 0.5, 0.4]", "--encoder.std", "[0.2, 0.25, 0.3]",
               "--encoder.interpolation", "bilinear"]
CARD = {"hub": HUB, "hub_file": HUB_FILE, "weights": None, "pooling": "cls_mean", "mean": [0.6, 0.5, 0.4],
        "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}


def hub_file_with(seed: int, cache: Path) -> Path:
    """The tiny ViT's random weights (seeded) as the hub file in a hub cache at ``cache``."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64, depth=1)
    path = hub_cache_file(cache, HUB, HUB_FILE)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def hub_store(tmp_path_factory):
    """A store extracted offline from a filled hub cache (no network), and a selection mined from it."""
    root = tmp_path_factory.mktemp("hubstore")
    slides = small_slides(root / "slides", 2)
    hub_file_with(4, root / "hub")
    out = root / "store"
    with pytest.MonkeyPatch.context() as patch:
        no_network(patch, root / "hub", offline=True)
        extract(["--slides", str(slides), "--out", str(out), *FAST[:8], *HUB_ENCODER])
    return {"slides": slides, "store": out, "selection": mined_selection(out, root), "cache": root / "hub"}


def encoder_fields(config) -> dict:
    return {key: getattr(config, key) for key in CARD}


def test_finetune_starts_from_a_hub_store_with_its_pooling_and_normalisation(hub_store, monkeypatch):
    """The start encoder is the store's: hub file, cls_mean pooling, the card's normalisation; it embeds a stored
    patch exactly as extraction did (a lost pooling changes the width, a lost normalisation the numbers, a lost
    hub file leaves a random init)."""
    from features.encoders import build_transform
    from features.patches import PatchDataset
    from features.selection import read_selection
    from features.store import read_bag
    from features.training import finetune
    from features.training.encoder_module import build_encoder_model
    from features.training.patch_data import selection_items, slide_refs

    no_network(monkeypatch, hub_store["cache"], offline=True)
    start = finetune.start_encoder(str(hub_store["store"]), finetune.FinetuneEncoder(), set())
    assert encoder_fields(start) == CARD and start.name == "vit_tiny_patch16_224"
    item = selection_items(read_selection(hub_store["selection"]), slide_refs(hub_store["slides"]),
                           hub_store["store"]).items[0]
    model = build_encoder_model(start).eval()
    transform, _ = build_transform(model, start, item.geometry.patch_size)
    image, _ = PatchDataset([item], transform)[0]
    with torch.inference_mode():
        embedding = model(image[None])[0].numpy()
    (features,) = (hub_store["store"] / "features").iterdir()
    bag = read_bag(features / "s0.h5")
    row = int(np.flatnonzero((bag.coords == [item.x, item.y]).all(axis=1))[0])
    assert embedding.shape == bag.features[row].shape == (2 * 192,)
    np.testing.assert_allclose(embedding, bag.features[row], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("age", ["record without hub fields", "attributes only"])
def test_older_hub_stores_name_their_hub_file(hub_store, tmp_path, age):
    """A record written before hub sources were recorded, or a store with no record at all, still gives the hub
    and its file (from the files' `weights` attribute, `hf-hub:<repo>/<file>`), never `hf-hub:...` as a path."""
    import shutil

    from features.provenance import recorded_encoder

    (features,) = (hub_store["store"] / "features").iterdir()
    copy = shutil.copytree(features, tmp_path / features.name)
    record = json.loads((copy / "settings.json").read_text())
    if age == "attributes only":
        (copy / "settings.json").unlink()
    else:
        for key in ("encoder.hub", "encoder.hub_file"):
            del record["recorded"][key]
        (copy / "settings.json").write_text(json.dumps(record))
    recorded, _ = recorded_encoder(copy)
    assert {key: recorded[key] for key in CARD} == CARD
    assert recorded["weights_sha256"] == record["settings"]["encoder.weights_sha256"]


def test_finetune_refuses_pooling_normalisation_or_hub_that_contradict_the_store(hub_store, tmp_path, monkeypatch):
    from features.training import finetune

    no_network(monkeypatch, hub_store["cache"], offline=True)
    out = tmp_path / "ft.safetensors"
    for extra, named in [
        (["--encoder.pooling", "model"], r"--encoder.pooling model \(store: cls_mean\)"),
        (["--encoder.mean", "[0.5, 0.5, 0.5]"], r"--encoder.mean \[0.5, 0.5, 0.5\] \(store: \[0.6, 0.5, 0.4\]\)"),
        (["--encoder.hub_file", "other.bin"], rf"--encoder.hub {HUB} --encoder.hub_file other.bin \(store: "
                                              rf"{HUB_SOURCE} sha256 [0-9a-f]{{12}}\)"),
    ]:
        with pytest.raises(InputError, match=named + ".*--encoder.override true") as error:
            finetune.main(finetune_argv(hub_store, out, *extra))
        assert "\n" not in str(error.value)
    assert not out.exists()
    # The same values given again (a preset passed whole, say) agree with the store.
    argv = finetune_argv(hub_store, out, *HUB_ENCODER)
    given = finetune.FinetuneEncoder(**{**CARD, "name": "vit_tiny_patch16_224",
                                        "model_kwargs": {"img_size": 64, "depth": 1}})
    start = finetune.start_encoder(str(hub_store["store"]), given, finetune.given_encoder_fields(argv))
    assert encoder_fields(start) == CARD


def test_finetune_fetches_the_hub_file_again_and_refuses_another(hub_store, tmp_path, monkeypatch):
    """The hub file comes from the hub cache (or a download); offline without it, or with another file than the
    store's, the refusal is one line naming the fix."""
    from features.training import finetune

    no_network(monkeypatch, tmp_path / "empty", offline=True)
    with pytest.raises(InputError, match=rf"{HUB}.*HF_HUB_OFFLINE.*--encoder.weights FILE") as error:
        finetune.start_encoder(str(hub_store["store"]), finetune.FinetuneEncoder(), set())
    assert "\n" not in str(error.value)
    hub_file_with(5, tmp_path / "other")
    no_network(monkeypatch, tmp_path / "other", offline=True)
    with pytest.raises(InputError, match=rf"{HUB_SOURCE}: the hub's file .* is not the one .* --encoder.weights FILE"):
        finetune.start_encoder(str(hub_store["store"]), finetune.FinetuneEncoder(), set())


def test_finetune_from_a_hub_store_trains_from_the_hub_file(hub_store, tmp_path, monkeypatch):
    from features.training import finetune

    no_network(monkeypatch, hub_store["cache"], offline=True)
    out = tmp_path / "ft.safetensors"
    finetune.main(finetune_argv(hub_store, out))
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["started_from"] == HUB_SOURCE and sidecar["steps"] > 0
    assert {key: sidecar["settings"]["encoder"][key] for key in CARD} == CARD


def test_a_source_tree_records_one_version_everywhere(monkeypatch, tmp_path):
    """Run from a source tree that was never installed, every record names the same stand-in version."""
    from importlib import metadata

    from features import provenance
    from features.encoders import EncoderConfig, build_encoder
    from features.synth.cohort import SETTINGS_NAME, _record_settings, config_from

    installed = metadata.version

    def version(name: str) -> str:
        if name == "hnm-mil":
            raise metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(metadata, "version", version)
    assert provenance.versions()["hnm-mil"] == provenance.SOURCE_TREE_VERSION
    encoder = build_encoder(EncoderConfig(name="resnet10t", pretrained=False, seed=0), patch_size=32)
    assert encoder.attrs()["hnm_mil_version"] == provenance.SOURCE_TREE_VERSION
    _record_settings(tmp_path / SETTINGS_NAME, config_from("demo", n_slides=2, seed=0))  # what write_cohort records
    assert json.loads((tmp_path / SETTINGS_NAME).read_text())["hnm_mil_version"] == provenance.SOURCE_TREE_VERSION

"""``mil view`` as users meet it: a real server process, real slides read through OpenSlide, a real browser.

The cohort is the tiny synthetic one (``features synth``'s writer) tiled by ``features tile``; the run and the
two mining rounds hold patch scores written through ``mil.patch_scores`` (hot on the tumor polygons, round 0
also hot on the look-alikes, round 1 not), predictions and selections in their real formats.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from features.annotations import LOOKALIKE, TUMOR, find_annotation, group_geometry, patch_overlap, read_polygons
from features.selection import write_selection
from features.store import find_feature_files, read_coords
from features.synth.cohort import config_from, write_cohort
from features.__main__ import main as features_main
from mil.__main__ import main as mil_main
from mil.patch_scores import read_patch_scores, write_patch_scores

from fixtures import write_tiny_slide
from viewer_driver import chromium, serve, settle, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def planted_scores(polygons: dict, coords: np.ndarray, size: int, lookalike_logit: float,
                   rng: np.random.Generator) -> np.ndarray:
    tumor = patch_overlap(group_geometry(polygons, TUMOR), coords, size) > 0
    look = patch_overlap(group_geometry(polygons, LOOKALIKE), coords, size) > 0
    logits = np.where(tumor, 4.0, np.where(look, lookalike_logit, -3.0))
    return logits + rng.normal(0, 0.3, len(coords))


def write_run(run: Path, store: Path, labels: pd.DataFrame, ids: list[str], annotations: Path,
              lookalike_logit: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    coords_files = find_feature_files(store / "coords")
    rows = []
    for slide_id in ids:
        coords, attrs = read_coords(coords_files[slide_id])
        polygons = read_polygons(find_annotation(annotations, slide_id))
        logits = planted_scores(polygons, coords, int(attrs["patch_size_level0"]), lookalike_logit, rng)
        write_patch_scores(run, slide_id, coords, logits)  # no attention: e.g. a mean-pool model
        row = labels[labels.slide_id == slide_id].iloc[0]
        rows.append({"slide_id": slide_id, "label": int(row.label == "tumor"),
                     "score": float(1 / (1 + np.exp(-np.sort(logits)[-3:].mean()))), "split": row.split})
    pd.DataFrame(rows).to_csv(run / "predictions.csv", index=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"features": str(store / "coords"),
                                                              "labels": str(annotations.parent / "labels.csv")}}))


def write_round(folder: Path, store: Path, labels: pd.DataFrame, annotations: Path, lookalike_logit: float,
                index: int) -> None:
    test = labels[labels.split != "train"].slide_id.tolist()
    train = labels[labels.split == "train"].slide_id.tolist()
    write_run(folder / "mil", store, labels, test, annotations, lookalike_logit, seed=index)
    write_run(folder / "mil_train", store, labels, train, annotations, lookalike_logit, seed=10 + index)
    rows = []
    for slide_id in train:  # the three highest-scored patches: positives on tumor slides, else hard negatives
        coords, scores = read_patch_scores(folder / "mil_train" / "patch_scores" / f"{slide_id}.h5")
        kind = "positive" if labels[labels.slide_id == slide_id].label.iloc[0] == "tumor" else "hard_negative"
        rows += [{"slide_id": slide_id, "x": int(coords[i, 0]), "y": int(coords[i, 1]),
                  "pseudo_label": int(kind == "positive"), "score": float(scores[i]), "kind": kind, "round": index}
                 for i in np.argsort(-scores)[:3]]
    write_selection(folder / "selection.csv", pd.DataFrame(rows))
    (folder / "selection_quality.json").write_text(json.dumps({"positive_precision": 1.0 - 0.5 * (index == 0),
                                                               "lookalike_enrichment": 3.0 - index}))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    from mil.viewer import assets

    if not assets.installed():  # `make install` fetches it; a checkout tested without it fetches it here (npm)
        assets.fetch()
    root = tmp_path_factory.mktemp("viewer")
    write_cohort(root / "cohort", config_from("tiny", n_slides=4, width=1024, height=768), progress=False)
    store = root / "store"
    assert features_main(["tile", "--slides", str(root / "cohort" / "slides"), "--out", str(store), "--mpp", "1.0",
                          "--patch_size", "32"]) == 0
    labels = pd.read_csv(root / "cohort" / "labels.csv", dtype={"slide_id": str})
    annotations = root / "cohort" / "annotations"
    run = root / "run"
    write_run(run, store, labels, labels.slide_id.tolist(), annotations, lookalike_logit=2.0, seed=0)
    (run / "metrics.json").write_text(json.dumps({"slide": {"thresholds": {"youden_val": 0.6}}}))
    for index, lookalike in enumerate((2.0, -2.0)):
        write_round(root / "hnm" / f"round_{index}", store, labels, annotations, lookalike, index)
    return {"root": root, "run": run, "slides": root / "cohort" / "slides", "annotations": annotations,
            "hnm": root / "hnm", "labels": root / "cohort" / "labels.csv"}


def view_args(c: dict[str, Path], hnm: bool = True) -> list[str]:
    args = ["--run", str(c["run"]), "--slides", str(c["slides"]), "--annotations", str(c["annotations"])]
    return args + (["--hnm", str(c["hnm"])] if hnm else [])


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, b"", ""


def raw_get(port_url: str, path: str) -> int:
    """Send ``path`` byte for byte (no client-side normalisation of '..'), return the status code."""
    host, port = port_url.split("//")[1].strip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def server(cohort):
    with serve(view_args(cohort)) as (url, process):
        yield url, process


def test_routes_serve_tiles_heatmaps_and_downloads(server, cohort):
    url, _ = server
    status, body, _ = get(url + "api/slides")
    slides = {s["slide_id"]: s for s in json.loads(body)}
    labels = pd.read_csv(cohort["labels"], dtype={"slide_id": str})
    assert set(slides) == set(labels.slide_id)
    tumor_id = labels[labels.label == "tumor"].slide_id.iloc[0]
    assert slides[tumor_id]["label"] == "tumor" and slides[tumor_id]["prediction"] == "tumor"
    assert slides[tumor_id]["sources"][0] == "run" and {"r0", "r1"} & set(slides[tumor_id]["sources"])

    detail = json.loads(get(url + f"api/slides/{tumor_id}")[1])
    assert detail["patch_size_level0"] == 64 and (detail["width"], detail["height"]) == (1024, 768)
    assert "tumor" in detail["annotations"] and len(detail["rounds"]) == 2
    status, dzi, _ = get(url + f"slides/{tumor_id}.dzi")
    assert status == 200 and b'TileSize="224"' in dzi
    top_level = int(np.ceil(np.log2(1024)))
    status, tile, kind = get(url + f"slides/{tumor_id}_files/{top_level}/0_0.jpeg")
    assert status == 200 and kind == "image/jpeg" and Image.open(io.BytesIO(tile)).size == (224, 224)

    # The overlay is hot exactly on the tumor: the top patch is opaque red-ish, a threshold hides the cold ones.
    best = detail["top_k"]["run"][0]
    status, png, _ = get(url + f"api/slides/{tumor_id}/heatmap/run.png?scale=probability&threshold=0")
    overlay = np.asarray(Image.open(io.BytesIO(png)))
    assert overlay.shape[2] == 4 and overlay.shape[1] == 1024 * 4 // 64
    cx, cy = (best["x"] + 32) * 4 // 64, (best["y"] + 32) * 4 // 64
    assert overlay[cy, cx, 3] == 255 and int(overlay[cy, cx, 0]) > int(overlay[cy, cx, 2]) + 80  # turbo: red = high
    hidden = np.asarray(Image.open(io.BytesIO(get(url + f"api/slides/{tumor_id}/heatmap/run.png?threshold=0.9")[1])))
    assert 0 < (hidden[..., 3] > 0).sum() < (overlay[..., 3] > 0).sum()

    status, patch, kind = get(url + f"api/slides/{tumor_id}/patch/{best['x']}_{best['y']}.jpg")
    assert status == 200 and Image.open(io.BytesIO(patch)).size == (128, 128)
    status, png, kind = get(url + f"download/{tumor_id}/run/heatmap.png")
    assert status == 200 and kind == "image/png" and Image.open(io.BytesIO(png)).width > 1024
    round_key = [k for k in slides[tumor_id]["sources"] if k.startswith("r")][0]
    status, geojson, _ = get(url + f"download/{tumor_id}/{round_key}/qupath.geojson?k=5")
    features = json.loads(geojson)["features"]
    assert status == 200 and len(features) == 5 and features[0]["properties"]["objectType"] == "detection"
    status, geojson, _ = get(url + f"download/{tumor_id}/{round_key}/qupath_tiles.geojson")
    tiles = json.loads(geojson)["features"]
    assert status == 200 and {t["properties"]["objectType"] for t in tiles} == {"tile"}
    coords, _ = read_coords(find_feature_files(cohort["root"] / "store" / "coords")[tumor_id])
    assert len(tiles) == len(coords) > 5  # every patch of the slide, not the top k


def test_requests_outside_the_catalogue_are_refused(server, cohort):
    url, _ = server
    slide_id = json.loads(get(url + "api/slides")[1])[0]["slide_id"]
    secret = cohort["root"] / "secret.txt"
    secret.write_text("do not serve")
    refused = [
        "slides/..%2F..%2F..%2Fetc%2Fpasswd.dzi", "slides/..%2Fsecret.txt.dzi", "slides/not_a_slide.dzi",
        f"slides/{slide_id}_files/99/0_0.jpeg", f"slides/{slide_id}_files/10/9999_0.jpeg",
        f"slides/{slide_id}_files/-1/0_0.jpeg", f"slides/{slide_id}_files/1/a_0.jpeg",
        f"api/slides/{slide_id}/patch/1_1.jpg", f"api/slides/{slide_id}/patch/-64_0.jpg",
        f"api/slides/{slide_id}/heatmap/..%2Frun.png", f"api/slides/{slide_id}/heatmap/r9.png",
        "static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "static/%2e%2e/%2e%2e/app.py", "download/..%2Fsecret/run/heatmap.png",
    ]
    for path in refused:
        assert get(url + path)[0] == 404, path
    for path in [f"api/slides/{slide_id}/heatmap/run.png?scale=evil", f"api/slides/{slide_id}/heatmap/run.png?threshold=2",
                 f"api/slides/{slide_id}/heatmap/run.png?threshold=nan", f"download/{slide_id}/run/qupath.geojson?k=-1"]:
        assert get(url + path)[0] == 400, path
    for path in ["/../../../etc/passwd", "/static/../../../../etc/passwd", "/static/../viewer/app.py",
                 f"/slides/../../{secret.name}", "/static/openseadragon/../../app.py"]:
        assert raw_get(url, path) in {400, 404}, path
    request = urllib.request.Request(url + "api/slides", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 405  # read-only


def test_browser_opens_a_slide_toggles_the_overlay_and_flies_to_a_patch(server, cohort, tmp_path):
    url, _ = server
    with chromium() as driver:
        driver.get(url)
        wait_until(driver, "document.querySelectorAll('#slide-table tbody tr').length === 4")
        # Sortable and filterable list.
        driver.find_element("css selector", "th[data-key=score]").click()
        scores = [float(r.text) for r in driver.find_elements("css selector", "#slide-table tbody td:nth-child(4)")]
        assert scores == sorted(scores)
        n_train = int((pd.read_csv(cohort["labels"]).split == "train").sum())
        driver.find_element("id", "filter").send_keys("train")
        rows = driver.find_elements("css selector", "#slide-table tbody tr")
        assert 0 < len(rows) == n_train < 4 and all("train" in r.text for r in rows)
        rows[0].click()
        settle(driver)
        viewer = driver.find_element("id", "viewer-main")
        with_overlay = np.asarray(Image.open(io.BytesIO(viewer.screenshot_as_png)).convert("RGB"), dtype=float)
        assert with_overlay.std() > 10 and (with_overlay.mean(axis=2) < 200).mean() > 0.01  # a slide, not a blank
        driver.find_element("id", "overlay-toggle").click()
        settle(driver)
        without = np.asarray(Image.open(io.BytesIO(viewer.screenshot_as_png)).convert("RGB"), dtype=float)
        changed = np.abs(with_overlay - without).max(axis=2) > 40
        assert changed.mean() > 0.05, changed.mean()  # the heatmap really was drawn, and really went away
        driver.find_element("id", "overlay-toggle").click()
        settle(driver)
        driver.execute_script("const s = document.getElementById('scale'); s.value = 'rank';"
                              "s.dispatchEvent(new Event('change'));")
        settle(driver)
        ranked = np.asarray(Image.open(io.BytesIO(viewer.screenshot_as_png)).convert("RGB"), dtype=float)
        assert (np.abs(ranked - with_overlay).max(axis=2) > 40).mean() > 0.01  # the colour scale is applied

        figures = driver.find_elements("css selector", "#gallery-topk figure")
        assert len(figures) == 12
        wait_until(driver, "[...document.querySelectorAll('#gallery-topk img')].every(i => i.complete && i.naturalWidth)")
        target = figures[0]
        x, y = int(target.get_attribute("data-x")), int(target.get_attribute("data-y"))
        before = driver.execute_script("return window.milView.center()")
        target.click()
        settle(driver)
        after = driver.execute_script("return window.milView.center()")
        assert abs(after["x"] - (x + 32)) < 8 and abs(after["y"] - (y + 32)) < 8, (before, after, x, y)
        zoom = driver.execute_script("return window.milView.state.detail && "
                                     "document.querySelector('#viewer-main svg.marks .focus') !== null")
        assert zoom

        # Mining rounds: galleries of mined patches, quality, and round 0 beside round 1.
        assert not driver.find_element("id", "rounds-panel").get_attribute("hidden")
        assert "lookalike_enrichment" in driver.find_element("id", "quality").text
        mined = driver.find_elements("css selector", "#gallery-positive figure, #gallery-hard_negative figure")
        marks = driver.find_elements("css selector", "#viewer-main svg.marks .positive, #viewer-main svg.marks .hard_negative")
        assert len(mined) == len(marks) == 3  # this training slide's three mined patches, in the gallery and on it
        driver.find_element("id", "compare").click()
        settle(driver)
        assert driver.find_element("id", "box-compare").is_displayed()
        assert driver.find_element("id", "title-main").text == "round 0"
        assert driver.find_element("id", "title-compare").text == "round 1"
        links = [a.get_attribute("href") for a in driver.find_elements("css selector", "#downloads a")]
        assert any(h.endswith("/heatmap.png") for h in links) and any("qupath.geojson" in h for h in links)
        driver.save_screenshot(str(tmp_path / "viewer.png"))
        assert Image.open(tmp_path / "viewer.png").size[0] > 1000


def test_bad_input_is_one_line_and_exit_2_before_serving(cohort, tmp_path, capsys):
    base = view_args(cohort, hnm=False)
    write_tiny_slide(tmp_path / "unscored" / "other_slide.tiff")
    cases = {
        "missing run": (["view", "--run", str(tmp_path / "nope"), *base[2:]], "--run"),
        "slides without scores": (["view", "--run", str(cohort["run"]), "--slides", str(tmp_path / "unscored")],
                                  "patch scores"),
        "hnm not a loop folder": (["view", *base, "--hnm", str(tmp_path)], "--hnm"),
    }
    for name, (argv, needle) in cases.items():
        assert mil_main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (name, err)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        assert mil_main(["view", *base, "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--port {port}" in err and "in use" in err
        assert time.monotonic() - started < 30


def test_tile_cache_and_ranges(cohort):
    from mil.viewer.tiles import OutOfRange, SlideTiles

    slide = sorted(cohort["slides"].iterdir())[0]
    tiles = SlideTiles({"s": slide}, cache_tiles=8)
    top = tiles.generator("s").level_count - 1
    first = tiles.tile("s", top, 0, 0)
    assert tiles.tile("s", top, 0, 0) is first and tiles.tile.cache_info().hits == 1
    for bad in [(top + 1, 0, 0), (top, 99, 0), (top, 0, 99), (-1, 0, 0)]:
        with pytest.raises(OutOfRange):
            tiles.tile("s", *bad)
    with pytest.raises(OutOfRange):
        tiles.dzi("other")
    tiles.close()


def test_rank_scale_and_clam_geometry(cohort, tmp_path):
    import h5py

    from mil.viewer.catalog import build_catalog
    from mil.viewer.overlays import displayed_values

    assert displayed_values(np.array([5.0, -1.0, 2.0]), "rank") == pytest.approx([1.0, 0.0, 0.5])
    assert displayed_values(np.array([0.0]), "probability") == pytest.approx([0.5])
    # A CLAM h5_files/ store records patch_size at patch_level, not patch_size_level0: level 1 of the slide
    # halves the resolution, so 32 px there are 64 px at level 0.
    slide_id = str(pd.read_csv(cohort["run"] / "predictions.csv").slide_id.iloc[0])
    clam = tmp_path / "clam" / "h5_files"
    clam.mkdir(parents=True)
    coords, _ = read_coords(find_feature_files(cohort["root"] / "store" / "coords")[slide_id])
    with h5py.File(clam / f"{slide_id}.h5", "w") as h5:
        h5.create_dataset("features", data=np.zeros((len(coords), 4), dtype=np.float32))
        dset = h5.create_dataset("coords", data=coords)
        dset.attrs.update({"patch_size": 32, "patch_level": 1})
    run = tmp_path / "run"
    (run / "patch_scores").mkdir(parents=True)
    (run / "patch_scores" / f"{slide_id}.h5").write_bytes((cohort["run"] / "patch_scores" / f"{slide_id}.h5").read_bytes())
    catalog = build_catalog(run, cohort["slides"], features=tmp_path / "clam")
    assert list(catalog.slides) == [slide_id] and catalog.patch_size_level0(slide_id) == 64
    assert catalog.slides[slide_id].score is None and catalog.threshold == 0.5


def test_openseadragon_comes_from_npm_and_its_integrity_is_checked(tmp_path, monkeypatch):
    from features.errors import InputError
    from mil.viewer import assets

    target = assets.fetch(tmp_path / "osd")
    assert assets.installed(target) and "Redistribution" in (target / "LICENSE.txt").read_text()  # BSD-3-Clause
    monkeypatch.setattr(assets, "OPENSEADRAGON_INTEGRITY", "sha512-not-the-recorded-one")
    with pytest.raises(InputError, match="integrity"):
        assets.fetch(tmp_path / "tampered")
    assert not (tmp_path / "tampered").exists()


def test_sigterm_stops_the_server(server):
    """Last in this module: it stops the module's server (pytest-xdist never runs an earlier test after it)."""
    url, process = server
    assert url.startswith("http://127.0.0.1:")  # localhost unless --host says otherwise
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert "stopped" in process.stdout.read()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "api/config", timeout=2)

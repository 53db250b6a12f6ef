"""``mil view`` tile serving: cold and cached 224 px Deep Zoom tiles, and tiles/s under 8 concurrent clients.

Two synthetic slides (``features synth``, 6000 x 5000 px pyramidal TIFF) are tiled, given patch scores and
served by a real ``mil view`` process on localhost, as a user starts it. Latencies are per request over HTTP
keep-alive (what a browser does): a cold tile is read through OpenSlide and JPEG-encoded, a cached one comes
from the LRU cache. Throughput: 8 client threads, each with its own connection, fetch every full-resolution
tile of a slide no one has asked for yet (cold), then all of them again (cached). The library's own cost
(``SlideTiles.tile`` without HTTP) is reported beside it. ``python benchmarks/bench_viewer.py [OUT]`` prints a
markdown table; ``run(out_dir)`` returns the rows for ``make bench``.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 8
SAMPLE = 60  # tiles timed one by one


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """Two slides, their patch grid and random patch scores in a run directory; reused when present."""
    from features.commands import dispatch
    from features.store import find_feature_files, read_coords
    from features.synth.cohort import config_from, write_cohort
    from mil.patch_scores import write_patch_scores

    cohort, run = folder / "cohort", folder / "run"
    if not (run / "patch_scores").is_dir():
        write_cohort(cohort, config_from("demo", n_slides=2, width=6000, height=5000, high_res_fraction=0.0),
                     progress=False)
        from features.__main__ import COMMANDS

        dispatch("features", COMMANDS, ["tile", "--slides", str(cohort / "slides"), "--out", str(folder / "store"),
                                        "--mpp", "1.0", "--patch_size", "112"])
        rng = np.random.default_rng(0)
        for slide_id, path in find_feature_files(folder / "store" / "coords").items():
            coords, _ = read_coords(path)
            write_patch_scores(run, slide_id, coords, rng.normal(size=len(coords)))
        (run / "config.yaml").write_text(f"data:\n  features: {folder / 'store' / 'coords'}\n")
    return cohort / "slides", run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(slides: Path, run: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "mil", "view", "--run", str(run), "--slides", str(slides),
                                "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/api/config")
            connection.getresponse().read()
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("mil view exited early")
            time.sleep(0.3)
    raise TimeoutError("mil view did not start")


def full_resolution_tiles(slide: Path, tile_size: int = 224) -> tuple[int, list[tuple[int, int]]]:
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    with OpenSlide(str(slide)) as handle:
        generator = DeepZoomGenerator(handle, tile_size, 0, limit_bounds=False)
        level = generator.level_count - 1
        cols, rows = generator.level_tiles[level]
    return level, [(c, r) for r in range(rows) for c in range(cols)]


def fetch(connection: http.client.HTTPConnection, path: str) -> float:
    started = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    if response.status != 200 or not body:
        raise RuntimeError(f"{path}: HTTP {response.status}")
    return time.perf_counter() - started


def latencies(port: int, paths: list[str]) -> np.ndarray:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        return np.array([fetch(connection, p) for p in paths]) * 1000.0
    finally:
        connection.close()


def throughput(port: int, paths: list[str]) -> float:
    shards = [paths[i::CLIENTS] for i in range(CLIENTS)]
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda shard: latencies(port, shard), shards))
    return len(paths) / (time.perf_counter() - started)


def library_latencies(slide: Path, level: int, tiles: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    from mil.viewer.tiles import SlideTiles

    store = SlideTiles({"s": slide})
    cold = []
    for col, row in tiles:
        started = time.perf_counter()
        store.tile("s", level, col, row)
        cold.append(time.perf_counter() - started)
    cached = []
    for col, row in tiles:
        started = time.perf_counter()
        store.tile("s", level, col, row)
        cached.append(time.perf_counter() - started)
    store.close()
    return np.array(cold) * 1000.0, np.array(cached) * 1000.0


def row(what: str, values: np.ndarray | None = None, per_second: float | None = None) -> dict:
    out = {"measure": what}
    if values is not None:
        out.update({"median ms": float(np.median(values)), "p95 ms": float(np.percentile(values, 95)),
                    "n": len(values)})
    if per_second is not None:
        out["tiles/s"] = per_second
    return out


def run(out_dir: Path) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides, run_dir = make_inputs(out_dir)
    files = sorted(slides.iterdir())
    port = free_port()
    process = start(slides, run_dir, port)
    try:
        rows = []
        level, tiles = full_resolution_tiles(files[0])
        sample = [f"/slides/{files[0].stem}_files/{level}/{c}_{r}.jpeg" for c, r in tiles[:SAMPLE]]
        rows.append(row("HTTP, cold 224 px tile (OpenSlide read + JPEG)", latencies(port, sample)))
        rows.append(row("HTTP, cached 224 px tile (LRU hit)", latencies(port, sample)))
        level2, tiles2 = full_resolution_tiles(files[1])
        every = [f"/slides/{files[1].stem}_files/{level2}/{c}_{r}.jpeg" for c, r in tiles2]
        rows.append(row(f"HTTP, {CLIENTS} clients, cold tiles ({len(every)} distinct)", per_second=throughput(port, every)))
        rows.append(row(f"HTTP, {CLIENTS} clients, cached tiles", per_second=throughput(port, every)))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    cold, cached = library_latencies(files[0], level, tiles[SAMPLE:2 * SAMPLE])
    rows.append(row("library (SlideTiles.tile), cold", cold))
    rows.append(row("library (SlideTiles.tile), cached", cached))
    return rows


if __name__ == "__main__":
    import pandas as pd

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench_out") / "viewer"
    print(pd.DataFrame(run(out)).to_markdown(index=False, floatfmt=".3g"))

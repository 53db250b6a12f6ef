"""The viewer's Flask application: read-only GET routes over a :class:`Catalog` and its slides' tiles.

Every route takes a slide id, a source key and integers from the URL and checks each against the catalogue
(ids from the slides list that have scores, keys of loaded sources, tile and patch positions in range) before
anything is read; everything else is a 404 (unknown thing) or 400 (malformed query). No route writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, request, send_from_directory

from mil.viewer import overlays
from mil.viewer.assets import FETCH_HINT, STATIC
from mil.viewer.catalog import Catalog
from mil.viewer.tiles import OutOfRange, SlideTiles

TOP_K = 12
THUMBNAIL_SIZE = 1024


def create_app(catalog: Catalog, tiles: SlideTiles | None = None, top_k: int = TOP_K) -> Flask:
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    tiles = tiles or SlideTiles({sid: s.path for sid, s in catalog.slides.items()})
    app.config.update(catalog=catalog, tiles=tiles)

    def slide_or_404(slide_id: str) -> str:
        if slide_id not in catalog.slides:
            abort(404)
        return slide_id

    def source_or_404(slide_id: str, key: str) -> str:
        if key not in catalog.sources or slide_id not in catalog.sources[key].files:
            abort(404)
        return key

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/")
    def index() -> Response:
        return send_from_directory(STATIC, "index.html")

    @app.get("/api/config")
    def config() -> Response:
        return jsonify({
            "sources": [{"key": k, "title": s.title} for k, s in catalog.sources.items()],
            "rounds": [r.index for r in catalog.rounds],
            "threshold": catalog.threshold, "threshold_source": catalog.threshold_source,
            "annotations": catalog.annotations is not None, "scales": list(overlays.SCALES), "top_k": top_k,
        })

    @app.get("/api/slides")
    def slides() -> Response:
        return jsonify([{"slide_id": s.slide_id, "label": s.label, "split": s.split, "score": s.score,
                         "prediction": s.prediction, "sources": catalog.sources_of(s.slide_id)}
                        for s in catalog.slides.values()])

    @app.get("/api/slides/<slide_id>")
    def slide(slide_id: str) -> Response:
        slide_or_404(slide_id)
        width, height = tiles.dimensions(slide_id)
        keys = catalog.sources_of(slide_id)
        tops: dict[str, Any] = {}
        for key in keys:
            coords, values = catalog.scores(slide_id, key)
            tops[key] = overlays.top_k(coords, values, top_k)
        return jsonify({
            "slide_id": slide_id, "width": width, "height": height,
            "patch_size_level0": catalog.patch_size_level0(slide_id), "sources": keys, "top_k": tops,
            "rounds": overlays.mined(catalog, slide_id),
            "annotations": overlays.annotation_outlines(catalog.annotations, slide_id),
        })

    @app.get("/slides/<slide_id>.dzi")
    def dzi(slide_id: str) -> Response:
        return Response(tiles.dzi(slide_or_404(slide_id)), mimetype="application/xml")

    @app.get("/slides/<slide_id>_files/<int:level>/<int:col>_<int:row>.jpeg")
    def tile(slide_id: str, level: int, col: int, row: int) -> Response:
        slide_or_404(slide_id)
        try:
            data = tiles.tile(slide_id, level, col, row)
        except OutOfRange:
            abort(404)
        return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/slides/<slide_id>/heatmap/<key>.png")
    def heatmap(slide_id: str, key: str) -> Response:
        source_or_404(slide_or_404(slide_id), key)
        scale = request.args.get("scale", "probability")
        threshold = _unit_float(request.args.get("threshold", "0"))
        if scale not in overlays.SCALES or threshold is None:
            abort(400)
        coords, values = catalog.scores(slide_id, key)
        png = overlays.heatmap_png(coords, values, catalog.patch_size_level0(slide_id), tiles.dimensions(slide_id),
                                   scale, threshold)
        return Response(png, mimetype="image/png")

    @app.get("/api/slides/<slide_id>/patch/<int:x>_<int:y>.jpg")
    def patch(slide_id: str, x: int, y: int) -> Response:
        if not catalog.known_patch(slide_or_404(slide_id), x, y):
            abort(404)
        try:
            data = tiles.patch(slide_id, x, y, catalog.patch_size_level0(slide_id))
        except OutOfRange:
            abort(404)
        return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/download/<slide_id>/<key>/heatmap.png")
    def download_heatmap(slide_id: str, key: str) -> Response:
        source_or_404(slide_or_404(slide_id), key)
        thumbnail = tiles.slide(slide_id).get_thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE)).convert("RGB")
        png = overlays.heatmap_download(catalog, slide_id, key, thumbnail, tiles.dimensions(slide_id))
        return _attachment(png, "image/png", f"{slide_id}_{key}_heatmap.png")

    @app.get("/download/<slide_id>/<key>/qupath.geojson")
    def download_qupath(slide_id: str, key: str) -> Response:
        source_or_404(slide_or_404(slide_id), key)
        k = request.args.get("k", str(top_k))
        if not k.isdigit() or not 0 < int(k) <= 10000:
            abort(400)
        body = overlays.qupath_download(catalog, slide_id, key, int(k))
        return _attachment(body, "application/geo+json", f"{slide_id}_{key}_top{k}.geojson")

    @app.get("/download/<slide_id>/<key>/qupath_tiles.geojson")
    def download_qupath_tiles(slide_id: str, key: str) -> Response:
        source_or_404(slide_or_404(slide_id), key)
        body = overlays.qupath_tiles_download(catalog, slide_id, key)
        return _attachment(body, "application/geo+json", f"{slide_id}_{key}_tiles.geojson")

    if not (Path(STATIC) / "openseadragon" / "openseadragon.min.js").is_file():
        app.logger.warning("OpenSeadragon is missing: %s", FETCH_HINT)
    return app


def _unit_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def _attachment(body: bytes, mimetype: str, name: str) -> Response:
    return Response(body, mimetype=mimetype, headers={"Content-Disposition": f'attachment; filename="{name}"'})

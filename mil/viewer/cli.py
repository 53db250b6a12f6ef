"""``mil view``: a local web viewer of slides, patch-score heatmaps and mined patches, round by round.

    mil view --run RUN --slides SLIDES [--annotations DIR] [--hnm DIR] [--host 127.0.0.1] [--port 8000]

Every input is checked and the port is bound before the server starts, so bad input is one line and exit 2.
It serves with waitress (a threaded, production WSGI server: concurrent tile requests from several clients) on
127.0.0.1 unless told otherwise, and stops cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
from types import FrameType

from jsonargparse import ActionConfigFile, ArgumentParser

from features.errors import InputError
from mil.viewer import assets
from mil.viewer.tiles import CACHE_TILES, TILE_SIZE


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mil view", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_argument("--run", type=str, required=True, help="run directory with patch_scores/ (mil test|predict)")
    parser.add_argument("--slides", type=str, required=True, help="slide folder, or CSV with slide_id,path")
    parser.add_argument("--annotations", type=str | None, default=None, help="folder of ASAP XML / GeoJSON outlines")
    parser.add_argument("--hnm", type=str | None, default=None, help="a `mil hnm` --out folder: rounds and mined patches")
    parser.add_argument("--features", type=str | None, default=None,
                        help="feature folder for patch geometry (default: the one in the run's config.yaml)")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--top_k", type=int, default=12, help="patches in the top-k gallery")
    parser.add_argument("--threads", type=int, default=8, help="server threads (concurrent requests)")
    parser.add_argument("--tile_size", type=int, default=TILE_SIZE, help="Deep Zoom tile side in pixels")
    parser.add_argument("--cache_tiles", type=int, default=CACHE_TILES, help="encoded tiles kept in the LRU cache")
    return parser


class _Stop(KeyboardInterrupt):
    """Raised by the SIGTERM handler; waitress ends its loop on KeyboardInterrupt and shuts its threads down."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: use a port between 1 and 65535")
    for name in ("top_k", "threads", "tile_size", "cache_tiles"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} {getattr(args, name)}: must be at least 1")
    if not assets.installed():  # `make install` fetches it; an install without make fetches it on first use
        print(f"OpenSeadragon {assets.OPENSEADRAGON_VERSION} is not installed yet; fetching it once with npm ...",
              file=sys.stderr, flush=True)
        assets.fetch()  # one line and exit 2 if npm is missing or the package's integrity differs
    from waitress.server import create_server

    from mil.viewer.app import create_app
    from mil.viewer.catalog import build_catalog
    from mil.viewer.tiles import SlideTiles

    catalog = build_catalog(args.run, args.slides, args.annotations, args.hnm, args.features)
    for slide_id in catalog.slides:
        catalog.patch_size_level0(slide_id)  # fail now, not on the first click
    tiles = SlideTiles({sid: s.path for sid, s in catalog.slides.items()}, tile_size=args.tile_size,
                       cache_tiles=args.cache_tiles)
    app = create_app(catalog, tiles, top_k=args.top_k)
    logging.getLogger("waitress").setLevel(logging.ERROR)
    try:
        server = create_server(app, host=args.host, port=args.port, threads=args.threads, ident="mil-view")
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise InputError(f"--port {args.port}: already in use on {args.host}; pick another with --port") from None
        raise InputError(f"--host {args.host} --port {args.port}: cannot listen ({error.strerror or error})") from None
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"mil view: {len(catalog.slides)} slides, {len(catalog.rounds)} mining rounds; "
          f"open http://{args.host}:{args.port}/ (Ctrl-C or SIGTERM stops it)", flush=True)
    try:
        server.run()  # returns when _Stop interrupts its loop
    except _Stop:
        pass
    finally:
        server.close()
        tiles.close()
    print("mil view: stopped", flush=True)

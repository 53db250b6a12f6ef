"""OpenSeadragon for the viewer page, taken from its npm package at install time, never hand-written or committed.

    python -m mil.viewer.assets        # what `make install` and CI run; a no-op when the files are there

OpenSeadragon (BSD-3-Clause) is published on the npm registry, not on PyPI, so the ordinary npm client fetches
the exact version pinned below; ``npm pack`` checks the registry's integrity hash, and we check it again against
the one recorded here, so every install serves the same bytes. The built ``openseadragon.min.js``, its button
images and its licence are unpacked into ``mil/viewer/static/openseadragon/`` (ignored by git).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from features.errors import InputError

OPENSEADRAGON_VERSION = "6.1.1"
OPENSEADRAGON_INTEGRITY = (
    "sha512-g4iKe2q8B642SaBT3+x4ZF3/8b1TxPPydyjmtrOLgDrlYWMKd9ZXM+1Cb/xa9DVySkvs/7l6HR1nHKfD5F3Tsw=="
)
STATIC = Path(__file__).parent / "static"
TARGET = STATIC / "openseadragon"
SCRIPT = TARGET / "openseadragon.min.js"
FETCH_HINT = "run `python -m mil.viewer.assets` (needs npm; `make install` does it)"


def installed(target: Path = TARGET) -> bool:
    """True when the pinned OpenSeadragon build is unpacked beside the page."""
    stamp = target / "VERSION"
    return (target / SCRIPT.name).is_file() and stamp.is_file() and stamp.read_text().strip() == OPENSEADRAGON_VERSION


def fetch(target: Path = TARGET) -> Path:
    """``npm pack`` the pinned OpenSeadragon, verify its integrity, unpack the build into ``target``."""
    npm = shutil.which("npm")
    if npm is None:
        raise InputError(f"npm not found: install Node.js/npm, then {FETCH_HINT}")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([npm, "pack", f"openseadragon@{OPENSEADRAGON_VERSION}", "--json",
                                 "--pack-destination", tmp], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise InputError(f"npm pack openseadragon@{OPENSEADRAGON_VERSION} failed: "
                             f"{result.stderr.strip().splitlines()[-1:]}; check the network, then {FETCH_HINT}")
        packed = json.loads(result.stdout)[0]
        if packed["integrity"] != OPENSEADRAGON_INTEGRITY:
            raise InputError(f"openseadragon@{OPENSEADRAGON_VERSION}: integrity {packed['integrity']} differs "
                             "from the recorded one; refusing to serve it")
        staging = Path(tmp) / "openseadragon"
        staging.mkdir()
        with tarfile.open(Path(tmp) / packed["filename"]) as archive:
            for member in archive.getmembers():
                name = _wanted(member.name)
                if name is None or not member.isfile():
                    continue
                destination = staging / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(archive.extractfile(member).read())
        (staging / "VERSION").write_text(OPENSEADRAGON_VERSION + "\n")
        _publish(staging, target)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Move the unpacked folder into place by rename, so a page never sees a half-written copy; when another
    process got there first with the same version, keep its copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    landing = target.parent / f".{target.name}-{os.getpid()}"
    shutil.move(str(staging), landing)
    try:
        if target.exists() and not installed(target):
            shutil.rmtree(target)  # an older version
        os.rename(landing, target)
    except OSError:
        if not installed(target):
            raise
    finally:
        shutil.rmtree(landing, ignore_errors=True)


def _wanted(member: str) -> str | None:
    """The archive path's name under the target folder: the minified build, its images, the licence."""
    build = "package/build/openseadragon/"
    if member == build + "openseadragon.min.js" or member.startswith(build + "images/"):
        return member[len(build):]
    if member == "package/LICENSE.txt":
        return "LICENSE.txt"
    return None


def ensure() -> None:
    """Fetch unless already installed; prints one line either way."""
    if installed():
        print(f"openseadragon {OPENSEADRAGON_VERSION}: already in {TARGET}")
        return
    fetch()
    print(f"openseadragon {OPENSEADRAGON_VERSION}: unpacked into {TARGET}")


if __name__ == "__main__":
    from features.errors import run_command

    sys.exit(run_command(ensure))

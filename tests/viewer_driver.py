"""Start ``mil view`` as a real process on a free port, and drive Debian's headless Chromium at it (Selenium).

Used by the viewer tests and to make the README screenshot (``python tests/viewer_driver.py``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mil_view(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "mil", "view", *args]


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mil view exited with {process.returncode}: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "api/config", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"mil view did not answer on {url}")


@contextmanager
def serve(args: list[str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mil view ARGS --port P`` in a subprocess; yields (base URL, process); SIGTERM on exit."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(mil_view([*args, "--port", str(port)]), cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@contextmanager
def chromium(width: int = 1400, height: int = 820) -> Iterator[object]:
    """A headless Chromium (the Debian package) under Selenium, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mil-view-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(driver, script: str, timeout: float = 30.0) -> object:
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"browser never satisfied: {script}")


def settle(driver, timeout: float = 30.0) -> None:
    """Wait until every visible viewer has opened, the heatmap has loaded and every tile is drawn."""
    wait_until(driver, "window.milView && window.milView.ready()", timeout)
    time.sleep(0.7)  # let OpenSeadragon's animation finish and repaint
    wait_until(driver, "window.milView.ready()", timeout)


def screenshot(out: Path, run: str, slides: str, hnm: str | None = None, annotations: str | None = None,
               slide: str | None = None, scale: str = "probability", compare: bool = False,
               fly: bool = True) -> Path:
    """The README screenshot: the viewer on a slide with the heatmap, marks and galleries."""
    args = ["--run", run, "--slides", slides]
    args += ["--hnm", hnm] if hnm else []
    args += ["--annotations", annotations] if annotations else []
    with serve(args) as (url, _), chromium(1360, 760) as driver:
        driver.get(url + (f"?slide={slide}" if slide else ""))
        wait_until(driver, "document.querySelectorAll('#slide-table tbody tr').length > 0")
        if not slide:
            driver.find_element("css selector", "#slide-table tbody tr").click()
        settle(driver)
        if scale != "probability":
            driver.execute_script(f"const s = document.getElementById('scale'); s.value = '{scale}';"
                                  "s.dispatchEvent(new Event('change'));")
        if compare:
            driver.find_element("id", "compare").click()
        if fly:
            driver.find_element("css selector", "#gallery-topk figure").click()
        settle(driver)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="screenshot of mil view")
    parser.add_argument("--run", required=True)
    parser.add_argument("--slides", required=True)
    parser.add_argument("--hnm")
    parser.add_argument("--annotations")
    parser.add_argument("--slide")
    parser.add_argument("--scale", default="probability", choices=["probability", "rank"])
    parser.add_argument("--compare", action="store_true", help="round 0 beside the last round")
    parser.add_argument("--no_fly", action="store_true", help="do not fly to the first top-k patch")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "viewer.png")
    a = parser.parse_args()
    print(screenshot(a.out, a.run, a.slides, a.hnm, a.annotations, a.slide, a.scale, a.compare, not a.no_fly))

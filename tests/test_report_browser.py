"""The HTML report rendered by headless Chromium: a screenshot that is not blank, and every figure decoded.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it). Without it this test
fails, on purpose: a report nobody checked renders is not done.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_report import built_report

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Appended to a copy of the page: after load, record each image's decoded size and its box on the page
# (CSS px; device scale 1) where --dump-dom can see them.
PROBE = (
    "<script>window.addEventListener('load',()=>{document.body.setAttribute('data-images',JSON.stringify("
    "Array.from(document.images).map(i=>{const r=i.getBoundingClientRect();return [i.naturalWidth,"
    "i.naturalHeight,Math.round(r.left),Math.round(r.top+window.scrollY),Math.round(r.width),"
    "Math.round(r.height)];})));});</script>"
)
WINDOW = (1280, 2400)


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.fail(
            "chromium is not installed; install it with `apt-get install -y chromium` (Debian), "
            "as .ci/run does, to run the report's browser test"
        )
    return path


def _chrome(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _stats(pixels: np.ndarray) -> tuple[float, float, int]:
    """Dark fraction (text, lines), vivid fraction (saturated: figure lines, dots) and colour count."""
    dark = float((pixels.min(axis=-1) < 200).mean())
    vivid = float(((pixels.max(axis=-1) - pixels.min(axis=-1)) > 80).mean())
    colours = len(np.unique(pixels.reshape(-1, 3) // 4, axis=0))
    return dark, vivid, colours


def test_report_renders_in_chromium(tmp_path):
    html_path = built_report()
    n_images = len(re.findall(r"<img ", html_path.read_text()))
    assert n_images >= 4
    size = f"--window-size={WINDOW[0]},{WINDOW[1]}"

    probed = tmp_path / "probed.html"
    probed.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
    proc = _chrome(tmp_path, "--dump-dom", "--virtual-time-budget=5000", size, probed.resolve().as_uri())
    dom = proc.stdout
    srcs = re.findall(r'<img [^>]*src="([^"]{0,40})', dom)
    assert len(srcs) == n_images and all(s.startswith("data:image/png;base64,") for s in srcs)
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, f"the page's load handler did not run; chromium said: {proc.stderr[-2000:]}"
    boxes = json.loads(html.unescape(found.group(1)))
    assert len(boxes) == n_images
    assert all(w > 300 and h > 150 for w, h, *_ in boxes), f"images that did not decode: {boxes}"

    shot = tmp_path / "report.png"
    proc = _chrome(tmp_path, f"--screenshot={shot}", size, probed.resolve().as_uri())
    assert shot.is_file(), f"no screenshot; chromium said: {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (WINDOW[1], WINDOW[0])
    dark, _vivid, colours = _stats(img)
    assert dark > 0.01 and colours > 200, f"the page looks blank: {dark:.4f} dark, {colours} colours"
    # the figures inside the screenshot drew: plotted colour, many colours, not one flat fill
    visible = [(x, y, w, h) for _nw, _nh, x, y, w, h in boxes if y >= 0 and y + h <= WINDOW[1] and w > 0]
    assert visible, f"no figure inside the first {WINDOW[1]} px of the page: {boxes}"
    for x, y, w, h in visible:
        dark, vivid, colours = _stats(img[y : y + h, x : x + w])
        assert vivid > 0.003 and colours > 150 and dark > 0.01, (
            f"figure at ({x}, {y}) {w}x{h} did not render: "
            f"{vivid:.4f} vivid, {colours} colours, {dark:.4f} dark"
        )

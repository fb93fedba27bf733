"""report.html in a real headless browser (Chromium from the distribution): it loads with no
console message and no request, and its screenshot shows the plots. Skipped without chromium
(.ci/run installs it)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_results import SAMPLES, finish, start

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


def screenshot(page: Path, png: Path, profile: Path) -> str:
    """Load `page` headless and screenshot it; returns Chromium's log (console messages included)."""
    done = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
            "--window-size=1280,1700", f"--screenshot={png}", page.resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and png.exists(), done.stderr
    return done.stderr


def console_messages(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_the_console_check_sees_a_script_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body>x<script>not_defined()</script></body></html>")
    messages = console_messages(screenshot(bad, tmp_path / "bad.png", tmp_path / "profile"))
    assert any("Uncaught ReferenceError" in line for line in messages)


@pytest.mark.parametrize("kind", ["finished", "failed", "empty"])
def test_the_report_loads_cleanly_and_shows_its_plots(tmp_path: Path, kind: str) -> None:
    from test_job_worker import FakePredictor

    if kind == "empty":
        run, store = start(tmp_path, {"empty.fa": []})
        finish(run, store)
    else:
        run, store = start(tmp_path, SAMPLES, shard_reads=4, group_reads=2, checkpoint_seconds=0.0, max_attempts=1,
                           gpu_hour_price=2.0)
        finish(run, store, FakePredictor(2, poison={"a09"} if kind == "failed" else ()))
    page = Path(run.output) / "report.html"
    text = page.read_text()
    # Self-contained: nothing to fetch (the SVG namespace URIs are names, never requested).
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:|//)""", text)
    assert "<script" not in text and "<link" not in text

    png = tmp_path / "report.png"
    log = screenshot(page, png, tmp_path / "profile")
    assert console_messages(log) == []
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels[:: 7]}
    assert len(colours) > 200  # text, axes, anti-aliased plots: not a blank or error page
    if kind != "empty":
        for hex_colour in ("#c0392b", "#2e86c1"):  # the virus and others bars are drawn
            rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
            assert (np.abs(pixels.astype(int) - rgb).sum(axis=1) < 12).sum() > 2000, hex_colour

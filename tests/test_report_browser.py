"""The run report in a real browser: headless Chromium loads it offline, the page's own check
finds every figure decoded, and a screenshot is kept as a test artefact.

Chromium comes from Debian's `chromium` package (installed by .ci/run); without it these tests
skip with the reason. Set CRYOSIFT_TEST_ARTIFACTS=1 to keep the screenshot (and the page) in
tests/artifacts/ instead of the test's temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cryosift.report.html import build_report
from test_report_html import shared_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TIMEOUT = 60


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)}); "
                "install Debian's chromium package (.ci/run does) to run the browser checks")


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--no-default-browser-check", "--disable-extensions",
           "--virtual-time-budget=10000", f"--user-data-dir={profile}", *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{browser} did not finish within {TIMEOUT} s: {err}")
    assert res.returncode == 0, res.stderr[-2000:]
    return res


class _Body(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str | None] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "body" and self.body is None:
            self.body = dict(attrs)


def _loaded_dom(browser: str, page: Path, profile: Path) -> tuple[dict, str]:
    dom = _chromium(browser, profile, "--dump-dom", page.resolve().as_uri()).stdout
    parser = _Body()
    parser.feed(dom)
    assert parser.body is not None, dom[:500]
    return parser.body, dom


@pytest.fixture(scope="module")
def browser():
    return _browser()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = shared_run(tmp_path_factory)
    return build_report(run, tmp_path_factory.mktemp("browser") / "report.html")


def _artifact_dir(tmp_path: Path) -> Path:
    if os.environ.get("CRYOSIFT_TEST_ARTIFACTS"):
        out = Path(__file__).resolve().parent / "artifacts"
        out.mkdir(exist_ok=True)
        return out
    return tmp_path


def test_every_figure_loads_in_chromium(browser, report, tmp_path):
    body, dom = _loaded_dom(browser, report, tmp_path / "profile")
    expected = int(body["data-figures-expected"])
    assert "data-figures-total" in body, "the page's load-time check did not run"
    total, loaded = int(body["data-figures-total"]), int(body["data-figures-loaded"])
    assert total == expected > 30
    assert loaded == total, f"broken figures: {body['data-figures-broken']}"
    assert body["data-figures-broken"] == ""
    assert f"Figure check: all {total} figures loaded." in dom


def test_the_check_catches_a_broken_figure(browser, report, tmp_path):
    """Negative control: one image with undecodable data is named as broken."""
    text = report.read_text(encoding="utf-8")
    broken, n = re.subn(r'(<img src=")data:image/png;base64,[^"]+("[^>]*data-name="class-2")',
                        r"\1data:image/png;base64,AAAAAAAA\2", text)
    assert n == 1, "class-2 figure not found"
    page = tmp_path / "broken.html"
    page.write_text(broken, encoding="utf-8")
    body, dom = _loaded_dom(browser, page, tmp_path / "profile")
    assert body["data-figures-broken"] == "class-2"
    assert int(body["data-figures-loaded"]) == int(body["data-figures-total"]) - 1
    assert "broken: class-2" in dom


def test_screenshot_is_kept_and_not_blank(browser, report, tmp_path):
    out = _artifact_dir(tmp_path)
    shot = out / "report_screenshot.png"
    shot.unlink(missing_ok=True)
    _chromium(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,3000",
              "--hide-scrollbars", report.resolve().as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
    with Image.open(shot) as im:
        assert im.size == (1280, 3000)
        px = np.asarray(im.convert("L"), dtype=np.float64)
    assert px.std() > 10  # text, plots and particle images, not an empty page
    # the particle tiles and class averages are drawn: many distinct grey levels
    assert len(np.unique(px)) > 100
    if out != tmp_path:
        shutil.copy(report, out / "report.html")

"""The dashboard in a real browser (Debian's chromium driven by Playwright) against a real
``trainyard serve`` (API + worker, SQLite, the embedded broker): pages load without console
errors or requests to another host, lists and curves update live, compare, sweeps, the new-job
form. Each page's screenshot is written to ``test-artifacts/screenshots`` (and, with
``TRAINYARD_UPDATE_DOCS_SCREENSHOTS=1``, to ``docs/``)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from client import Client

from .helpers import ROOT, free_port, note_spec, stop, wait_http, wait_status

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI") == "true":  # CI must run these: scripts/ensure-services.sh installs chromium
        raise RuntimeError(f"{CHROMIUM} is missing; apt-get install -y chromium")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402


def quick(epochs: int, **over: Any) -> dict[str, Any]:
    spec = note_spec(epochs, device="cpu", callbacks={}, **over)
    spec["optimizer"] = {"name": "adam", "learning_rate": 0.005}
    return spec


_DATA_DIRS: dict[str, Path] = {}


def serve_db(url: str) -> Path:
    """The SQLite database of the ``serve`` at ``url``."""
    return _DATA_DIRS[url] / "trainyard.db"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``trainyard serve`` on a free port, in embedded mode (no keys)."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("serve")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = str(ROOT)
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp / "data")], cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _DATA_DIRS[url] = tmp / "data"
    try:
        wait_http(f"{url}/healthz", proc, timeout=120)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watched:
    """A page whose console errors, uncaught exceptions and requests to other hosts are kept."""

    def __init__(self, browser: Any, base: str, width: int = 1280) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.context.set_default_timeout(30_000)  # a loaded 2-core CI machine renders plotly slowly
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.foreign: list[str] = []
        host = urlsplit(base).netloc
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.foreign.append(r.url)
                     if urlsplit(r.url).scheme in ("http", "https", "ws", "wss") and urlsplit(r.url).netloc != host else None)

    def goto(self, path: str) -> Page:
        self.page.goto(self.base + path, wait_until="networkidle" if "/events" not in path else "load")
        return self.page

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        out = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(out), full_page=False)
        if os.environ.get("TRAINYARD_UPDATE_DOCS_SCREENSHOTS") == "1":
            (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
            shutil.copy(out, ROOT / "docs" / "screenshots" / out.name)
        return out

    def clean(self, expected_status: int | None = None) -> None:
        """No console error, no uncaught exception, no request to another host. Chromium logs
        every 4xx answer to the console: ``expected_status`` names one the test caused on purpose."""
        errors = [e for e in self.errors if expected_status is None
                  or f"the server responded with a status of {expected_status}" not in e]
        assert errors == [], errors
        assert self.foreign == [], f"requests to other hosts: {self.foreign}"

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def watched(browser: Any, serve: str) -> Iterator[Watched]:
    w = Watched(browser, serve)
    yield w
    w.close()


@pytest.fixture(scope="module")
def finished(serve: str) -> list[dict[str, Any]]:
    """Two finished jobs that differ in a few spec fields."""
    with Client(serve) as c:
        a = c.submit({**quick(4, name="baseline"), "labels": {"team": "vision", "stage": "baseline"}})
        wider = quick(6, name="wider")
        wider["model"]["layers"][0]["units"] = 128
        wider["optimizer"]["learning_rate"] = 0.002
        b = c.submit({**wider, "labels": {"team": "vision"}})
        return [wait_status(c, j["id"], ("succeeded", "failed", "cancelled"), timeout=240) for j in (a, b)]


@pytest.fixture(scope="module")
def sweep(serve: str) -> dict[str, Any]:
    with Client(serve) as c:
        s = c.create_sweep({
            "name": "units-and-lr", "base": quick(9), "method": "grid", "max_concurrent": 2,
            "parameters": {"model.layers[0].units": {"values": [16, 64]},
                           "optimizer.learning_rate": {"values": [0.001, 0.01]}},
            "objective": {"metric": "val_accuracy"},
            "early_termination": {"type": "asha", "min_epochs": 1, "reduction_factor": 3, "pause": False},
        })
        return c.wait_sweep(s["id"], timeout=400)


def test_every_page_loads_clean_offline_and_is_screenshotted(watched, finished, sweep):
    a, b = finished
    pages = {
        "jobs": "/ui", "job": f"/ui/jobs/{b['id']}", "compare": f"/ui/compare?ids={a['id']},{b['id']}",
        "sweeps": "/ui/sweeps", "sweep": f"/ui/sweeps/{sweep['id']}", "new-job": "/ui/new", "api-docs": "/docs",
    }
    for name, path in pages.items():
        page = watched.goto(path)
        if name == "api-docs":
            page.wait_for_selector(".opblock-tag", timeout=30_000)  # Swagger UI rendered the document
        else:
            page.wait_for_selector("main h1", timeout=30_000)
        if name in ("job", "compare", "sweep", "new-job"):
            page.wait_for_selector(".js-plotly-plot", timeout=30_000)
        if name == "jobs":
            page.wait_for_selector(f"tr[data-id='{b['id']}']")
        page.wait_for_timeout(300)
        assert watched.shot(name).stat().st_size > 10_000
    watched.clean()


def test_narrow_screen_and_keyboard(browser, serve, finished):
    w = Watched(browser, serve, width=390)
    try:
        page = w.goto("/ui")
        page.wait_for_selector(f"tr[data-id='{finished[0]['id']}']")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # no sideways page scroll
        page.keyboard.press("Tab")  # the skip link first, then the navigation
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Trainyard"
        w.shot("jobs-narrow")
        w.clean()
    finally:
        w.close()


def test_a_submitted_job_appears_without_reload_and_its_chart_grows(watched, serve):
    page = watched.goto("/ui")
    page.wait_for_selector("#live.on", timeout=30_000)
    with Client(serve) as c:
        # long enough that a warm worker cannot finish it before the page opens; cancelled below
        job = c.submit(quick(100_000, name="live-one"))
        try:
            row = page.wait_for_selector(f"tr[data-id='{job['id']}']", timeout=30_000)  # no reload
            assert "live-one" in row.inner_text()
            page.goto(f"{serve}/ui/jobs/{job['id']}")
            page.wait_for_selector("#chart-loss", timeout=60_000)
            seen: list[int] = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                n = int(page.get_attribute("#chart-loss", "data-points") or 0)
                if not seen or n != seen[-1]:
                    seen.append(n)
                if len(set(seen)) >= 6:
                    break
                time.sleep(0.1)
            # grew, on the open page, at least twice after the first draw (a warm worker can commit
            # several epochs between two looks, so the count of distinct looks depends on load)
            assert len(set(seen)) >= 3 and seen == sorted(seen) and seen[-1] > seen[0], seen
            # each epoch was on the page within a second of its commit: the page notes when it drew
            # each epoch count (Date.now()); the worker stamps created_at just before committing
            drawn = {int(k): v / 1000 for k, v in page.evaluate("window.tyDrawnAt").items()}
            with sqlite3.connect(serve_db(serve)) as db:
                committed = {e: datetime.fromisoformat(t).replace(tzinfo=UTC).timestamp() for e, t in
                             db.execute("SELECT epoch, created_at FROM job_metrics WHERE job_id = ?", (job["id"],))}
            delays = [drawn[n] - committed[n] for n in drawn if n in committed and n > min(drawn)]
            # every epoch was drawn after its commit, pushed to the open page; the 1 s target is
            # measured in bench/dashboards.py (a wall-clock bound here would only test CI's load)
            assert delays and max(delays) < 10.0, delays
            traces = page.evaluate("document.getElementById('chart-loss').data.map(t => t.name)")
            assert traces == ["loss", "val_loss"]
            assert page.evaluate("document.getElementById('chart-lr').layout.yaxis.type") == "log"
            page.uncheck("#lrlog")
            assert page.evaluate("document.getElementById('chart-lr').layout.yaxis.type") == "linear"
            # cancel it from the list: its row changes without a reload
            page.goto(f"{serve}/ui")
            page.once("dialog", lambda d: d.accept())
            page.click(f"tr[data-id='{job['id']}'] button.cancel")
            page.wait_for_selector(f"tr[data-id='{job['id']}'] .status.cancelled", timeout=30_000)
            assert wait_status(c, job["id"], ("cancelled",), timeout=30)["stop_reason"] == "cancelled"
        finally:  # never leave the module's worker busy with it
            if c.job(job["id"])["status"] not in ("cancelled", "succeeded", "failed"):
                c.cancel(job["id"])
    watched.clean()


def test_compare_two_jobs(watched, finished):
    a, b = finished
    page = watched.goto(f"/ui/compare?ids={a['id']},{b['id']}")
    page.wait_for_selector("#chart-loss")
    fields = page.eval_on_selector_all("#diff tbody th", "els => els.map(e => e.textContent)")
    assert {"epochs", "name", "model.layers[0].units", "optimizer.learning_rate"} <= set(fields)
    assert "data.batch_size" not in fields  # the same in both: left out
    traces = page.evaluate("document.getElementById('chart-loss').data.map(t => t.x.length)")
    assert traces == [a["progress"]["epoch"], b["progress"]["epoch"]]
    watched.clean()


def test_a_sweep_page_draws_every_trial(watched, sweep):
    page = watched.goto(f"/ui/sweeps/{sweep['id']}")
    page.wait_for_selector("#intermediate .js-plotly-plot, #intermediate.js-plotly-plot")
    lines = page.evaluate("document.getElementById('intermediate').data.filter(t => t.mode === 'lines').map(t => t.name)")
    assert sorted(lines) == sorted(f"#{t['number']}" for t in sweep["trials"])
    assert len(lines) == 4
    history = page.evaluate("document.getElementById('history').data[0].x.length")
    scored = [t for t in sweep["trials"] if isinstance(t["value"], float | int)]
    assert history == len(scored)
    dims = page.evaluate("document.getElementById('parallel').data[0].dimensions.map(d => d.label)")
    assert dims[-1] == "val_accuracy" and len(dims) == 3
    assert page.locator("#board tbody tr").count() == len(sweep["leaderboard"])
    pruned = [t for t in sweep["trials"] if t["stop_reason"] == "pruned"]
    marks = page.evaluate("document.getElementById('intermediate').data.filter(t => t.mode === 'markers').length")
    assert marks == len(pruned)
    watched.clean()


def test_new_job_form_shows_the_path_of_an_invalid_spec_and_submits_a_valid_one(watched, serve):
    page = watched.goto("/ui/new")
    valid = "#implied[data-state='valid']"
    page.wait_for_selector(valid, timeout=30_000)
    assert "parameters" in page.inner_text("#implied")
    page.fill("#f-epochs", "-2")
    page.wait_for_selector("#f-epochs[aria-invalid='true']", timeout=30_000)
    assert "epochs" in page.inner_text("#f-epochs-err")
    page.fill("#f-epochs", "3")
    page.wait_for_selector(valid, timeout=30_000)
    assert page.get_attribute("#f-epochs", "aria-invalid") is None
    # an error deeper than the form's fields is shown under the editor with its JSON path
    text = page.input_value("#editor").replace('"units": 10', '"units": -10')
    page.fill("#editor", text)
    page.wait_for_selector("#implied[data-state='invalid']", timeout=30_000)
    assert "model.layers[1].units" in page.inner_text("#errors")
    watched.shot("new-job-invalid")
    page.fill("#editor", text.replace('"units": -10', '"units": 10'))
    page.wait_for_selector(valid, timeout=30_000)
    assert page.evaluate("document.getElementById('schedule').data[0].y.length") > 0
    page.click("#submit")
    page.wait_for_url("**/ui/jobs/*", timeout=30_000)
    job_id = page.url.rsplit("/", 1)[1]
    with Client(serve) as c:
        assert c.job(job_id)["spec"]["epochs"] == 3
    watched.clean(expected_status=422)  # the dry run's answers to the invalid specs typed above


def test_an_lr_find_job_shows_its_curve_and_suggestion(watched, serve):
    with Client(serve) as c:
        job = c.submit(quick(1, name="find-lr", kind="lr_find", lr_find={"min_lr": 1e-5, "max_lr": 1.0, "steps": 40}))
        done = wait_status(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
    assert done["status"] == "succeeded", done
    page = watched.goto(f"/ui/jobs/{job['id']}")
    page.wait_for_selector("#lrfind-chart .main-svg", timeout=30_000)
    found = done["info"]["lr_find"]
    assert page.evaluate("document.getElementById('lrfind-chart').data[0].x.length") == len(found["lrs"])
    line = page.evaluate("document.getElementById('lrfind-chart').layout.shapes[0].x0")
    assert line == pytest.approx(found["suggested_learning_rate"])
    assert page.evaluate("document.getElementById('lrfind-chart').layout.xaxis.type") == "log"
    page.locator("#lrfind").scroll_into_view_if_needed()
    watched.shot("lr-find")
    watched.clean()

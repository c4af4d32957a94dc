"""``sftune ui`` end to end in headless Chromium (Debian's ``chromium``, driven by playwright without
downloading a browser): a quickstart run trains while the page watches its loss chart grow; the
finished run's chart has one point per metrics.jsonl record; the data preview highlights trained
tokens; chat streams a reply (with the base model side by side); runs list and compare render; runs
of 3 and 2,000 steps compare on a shared axis (fraction of the run, trained tokens seen); loss has a
log-scale toggle; chart titles sit clear of plotly's mode bar.
Screenshots go to pytest's tmp dir (printed at the end); look at them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs its extra: pip install 'sftune[ui]'")
pytest.importorskip("playwright", reason="the browser test drives chromium with playwright (in the test extra)")

from dashboard_helpers import fake_run  # noqa: E402

CHROMIUM = os.environ.get("SFTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
LIVE_STEPS = 40


@pytest.fixture
def server(tmp_path):
    import uvicorn

    from sftune.dashboard.server import free_port
    from sftune.dashboard.app import create_app

    root = tmp_path / "runs"
    root.mkdir()
    port = free_port("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the dashboard did not start"
    yield root, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def page():
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (.ci/run installs Debian's chromium with apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        except Exception as e:  # noqa: BLE001 - a browser that cannot start on this machine
            pytest.skip(f"chromium at {CHROMIUM} does not start headless here: {str(e).splitlines()[0]}")
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        yield pg
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def points(page, chart: str = "chart-loss", trace: int = 0) -> int:
    """Markers plotly drew for a trace (SVG paths), checked against the data it was given (read in one
    go, so a poll landing in between cannot skew them)."""
    drawn, given = page.evaluate(f"""() => {{
        const div = document.getElementById('{chart}');
        const trace = div.querySelectorAll('.scatterlayer .trace')[{trace}];
        return [trace ? trace.querySelectorAll('.points path').length : 0, div.data?.[{trace}]?.x.length ?? 0];
    }}""")
    assert drawn == given
    return drawn


def x_range(page, chart: str, trace: int) -> list[float]:
    """The first and last x of a trace, rounded as a reader would read them."""
    xs = page.evaluate(f"document.getElementById('{chart}').data[{trace}].x")
    return [round(xs[0], 4), round(xs[-1], 4)]


def assert_clear_of_mode_bar(page, chart: str) -> None:
    """The chart's title (the caption above it) and plotly's mode bar, when shown, do not overlap."""
    title, bar = page.evaluate(f"""() => {{
        const box = (e) => {{ const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; }};
        const div = document.getElementById('{chart}');
        return [box(div.closest('figure').querySelector('.chart-title')), box(div.querySelector('.modebar'))];
    }}""")
    assert bar[2] > bar[0] and title[2] > title[0], (title, bar)  # both drawn
    overlap = min(title[2], bar[2]) > max(title[0], bar[0]) and min(title[3], bar[3]) > max(title[1], bar[1])
    assert not overlap, f"{chart}: title {title} under the mode bar {bar}"


def test_dashboard_in_a_browser(server, page, tmp_path):
    import sftune.dashboard.newrun as newrun

    root, url = server
    t0, times = time.time(), []
    shots = tmp_path / "screenshots"
    shots.mkdir()
    live = root / "quickstart"

    def mark(what: str) -> None:
        times.append(f"{what} {time.time() - t0:.0f}s")

    def log() -> str:
        return (live / "train.log").read_text()[-3000:] if (live / "train.log").exists() else ""

    try:
        # ---- a quickstart run started from the form generated from the config schema
        page.goto(f"{url}/#/new")
        page.wait_for_selector("#f-train-max_steps")
        for key, value in {"train-max_steps": LIVE_STEPS, "train-log_every": 1, "train-eval_every": 15,
                           "data-limit": 960, "data-eval_limit": 20, "eval-limit": 10, "eval-samples": 3,
                           "train-lr": 3e-3, "train-warmup_steps": 5}.items():
            page.fill(f"#f-{key}", str(value))
        page.uncheck("#f-eval-exact_match")
        page.fill("#new-name", "quickstart")
        page.screenshot(path=str(shots / "0-new-run.png"), full_page=True)
        page.click("#new-go")

        # ---- its page while it trains: the loss chart grows
        page.wait_for_selector("#new-status.error, #chart-loss", timeout=30_000)
        assert not page.locator("#new-status.error").count(), page.inner_text("#new-status")
        assert page.url.endswith("#/run/quickstart")
        page.wait_for_function("(document.getElementById('chart-loss')?.data?.[0]?.x.length ?? 0) > 0",
                               timeout=120_000)
        mark("first step")
        first = points(page)
        page.wait_for_function(f"document.getElementById('chart-loss').data[0].x.length > {first}", timeout=60_000)
        assert points(page) > first and page.locator(".state[data-state=running]").count() == 1, log()
        page.screenshot(path=str(shots / "1-run-training.png"), full_page=True)
        mark("chart grew")

        # ---- data preview (while the run trains): trained tokens highlighted, and the data report
        page.goto(f"{url}/#/preview")
        page.fill("#overrides", "data.limit=20")
        page.click("#preview-go")
        page.wait_for_selector("#preview-out .tokens, #preview-out .error", timeout=60_000)
        assert not page.locator("#preview-out .error").count(), page.inner_text("#preview-out")
        trained = page.locator("#preview-out .tokens").first.locator(".tok.trained")
        assert trained.count() > 0 and page.locator("#preview-out .tok.masked").count() > trained.count()
        assert "<|endoftext|>" in "".join(trained.all_text_contents())  # the EOS is trained
        assert "20 used" in page.inner_text("#preview-out")
        page.screenshot(path=str(shots / "2-preview.png"), full_page=True)
        mark("preview")

        # ---- the finished run: one point per train record of metrics.jsonl, samples, final metrics
        page.goto(f"{url}/#/run/quickstart")
        page.wait_for_selector(".state[data-state=finished], .state[data-state=failed]", timeout=180_000)
        assert page.locator(".state[data-state=finished]").count() == 1, log()
        page.wait_for_function(f"document.getElementById('chart-loss')?.data?.[0]?.x.length === {LIVE_STEPS}")
        records = [json.loads(line) for line in (live / "metrics.jsonl").read_text().splitlines()]
        assert points(page) == sum("loss" in r for r in records) == LIVE_STEPS
        assert points(page, trace=1) == sum("eval_loss" in r and not r.get("final") for r in records) == 3
        assert points(page, "chart-lr") == points(page, "chart-tps") == LIVE_STEPS
        assert page.locator("details.samples").count() == sum("samples" in r for r in records) == 3
        assert "eval_loss" in page.inner_text("#final")
        page.screenshot(path=str(shots / "3-run-finished.png"), full_page=True)
        mark("run finished")

        # ---- chat with the finished run, side by side with its base model: streamed replies
        page.goto(f"{url}/#/chat/quickstart")
        page.check("#side")
        page.fill("#max-tokens", "24")
        page.fill("#message", "upper abcd")
        page.click("#send")
        page.wait_for_selector("#panel-run .msg.assistant[data-done]", timeout=60_000)
        page.wait_for_selector("#panel-base .msg.assistant[data-done]", timeout=60_000)
        assert page.inner_text("#panel-run .msg.user") == "upper abcd"
        assert not page.locator(".msg.assistant.error").count(), page.inner_text("main")
        base = page.locator("#panel-base .msg.assistant")
        assert base.inner_text().strip()  # the server sends it a piece per token (test_dashboard_app.py); how
        # many pieces a browser's reader gets depends on timing: a loaded machine hands it all in one read
        page.screenshot(path=str(shots / "4-chat.png"), full_page=True)
        mark("chat")

        # ---- runs list and compare
        fake_run(root, "other", steps=30, lr=3e-4)
        page.goto(f"{url}/#/")
        page.wait_for_selector("a.run-link >> text=other")
        assert page.locator(".state[data-state=finished]").count() == 2
        page.screenshot(path=str(shots / "5-runs.png"), full_page=True)
        page.goto(f"{url}/#/compare/quickstart|other")
        page.wait_for_selector("#cmp-loss .scatterlayer .trace")
        assert page.locator("#cmp-loss .scatterlayer .trace").count() == 4  # train + eval loss of each run
        assert "train.lr" in page.inner_text("main")
        page.screenshot(path=str(shots / "6-compare.png"), full_page=True)
        mark("runs and compare")

    finally:
        page.screenshot(path=str(shots / "last.png"), full_page=True)
        for child in newrun._children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)  # Ctrl-C: sftune saves a checkpoint and stops
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
        print(f"screenshots: {shots}; timeline: {', '.join(times)}")


def test_charts_compare_axes_log_scale_and_titles(server, page, tmp_path):
    """Runs of 3 and 2,000 steps compared as fractions of their run, by trained tokens seen and by step;
    the loss on a log axis, remembered across views; every chart's title clear of plotly's mode bar."""
    root, url = server
    fake_run(root, "short", steps=3, loss=lambda s: 4.5 - 0.5 * s)
    fake_run(root, "long", steps=2000, loss=lambda s: 0.5 + 4.5 / s ** 0.5)
    try:
        page.goto(f"{url}/#/compare/long|short")
        page.wait_for_selector("#cmp-loss .scatterlayer .trace")
        assert page.input_value("#cmp-axis") == "fraction"  # lengths differ: the shared axis by default
        assert x_range(page, "cmp-loss", 0) == [0.0005, 1] and x_range(page, "cmp-loss", 2) == [0.3333, 1]
        page.select_option("#cmp-axis", "tokens")
        assert x_range(page, "cmp-loss", 0) == [100, 200_000] and x_range(page, "cmp-loss", 2) == [100, 300]
        assert page.text_content("#cmp-loss .xtitle") == "trained tokens seen"
        page.select_option("#cmp-axis", "step")
        assert x_range(page, "cmp-loss", 2) == [1, 3] and x_range(page, "cmp-lr", 0) == [1, 2000]
        page.select_option("#cmp-axis", "fraction")

        page.check("#cmp-loss-log")
        page.wait_for_function("document.getElementById('cmp-loss').layout.yaxis.type === 'log'")
        for chart in ("cmp-loss", "cmp-lr", "cmp-tps"):
            page.hover(f"#{chart} .nsewdrag")  # the mode bar shows on hover
            assert_clear_of_mode_bar(page, chart)
        page.screenshot(path=str(tmp_path / "compare-lengths.png"), full_page=True)

        page.goto(f"{url}/#/run/short")
        page.wait_for_function("document.getElementById('chart-loss')?.layout?.yaxis?.type === 'log'")
        assert page.is_checked("#chart-loss-log")  # remembered from compare
        page.uncheck("#chart-loss-log")
        page.wait_for_function("document.getElementById('chart-loss').layout.yaxis.type === 'linear'")
        page.hover("#chart-loss .nsewdrag")
        assert_clear_of_mode_bar(page, "chart-loss")
    finally:
        page.screenshot(path=str(tmp_path / "last.png"), full_page=True)
        print(f"screenshots: {tmp_path}")


def test_a_loss_spike_is_marked_on_the_loss_chart(server, page):
    """A ``spike`` record of metrics.jsonl (sftune.spikes) is a marker trace of its own on the loss chart, its
    rule on hover; a run without spikes has no such trace."""
    root, url = server
    run = fake_run(root, "spiky", steps=6)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"time": time.time(), "step": 4, "spike": True, "spike_loss": 80.0, "spike_grad_norm": None,
                            "spike_why": "loss 80 > 3 x median 4.7 of the last 3 steps", "spike_action": "skip"}) + "\n")
    page.goto(f"{url}/#/run/spiky")
    page.wait_for_selector("#chart-loss .scatterlayer .trace")
    traces = page.evaluate("document.getElementById('chart-loss').data.map((t) => [t.name, t.mode, t.x, t.y, t.text])")
    spike = [t for t in traces if t[0] == "loss spike"]
    assert spike == [["loss spike", "markers", [4], [80.0], ["loss 80 > 3 x median 4.7 of the last 3 steps: skip"]]]
    assert points(page, "chart-loss", traces.index(spike[0])) == 1
    fake_run(root, "calm", steps=3)
    page.goto(f"{url}/?calm#/run/calm")  # a new page load: the spiky run's chart cannot be the one read
    page.wait_for_selector("#chart-loss .scatterlayer .trace")
    assert "loss spike" not in page.evaluate("document.getElementById('chart-loss').data.map((t) => t.name)")

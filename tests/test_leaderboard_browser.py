"""End to end: the leaderboard served by `streamlit run`, driven by headless Chromium (Selenium).

Slow (about 30-60 s): run with ``.venv/bin/pytest tests/test_leaderboard_browser.py -m slow``.
With ``MERGEBENCH_SCREENSHOTS=1`` every page is saved to ``leaderboard/screenshots/<page>.png``;
``MERGEBENCH_SCREENSHOT_RESULTS=results`` shows a real store instead of the synthetic one (the
table assertions then only check the committed published rows), ``MERGEBENCH_SCREENSHOT_QUERY``
adds URL filters (``suite=inthewild&profile=embedded``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1500,1150", "--hide-scrollbars"]
PAGES = ["ranking", "scaling", "tasks", "diagnostics", "methods", "pareto"]
SHOTS = ROOT / "leaderboard" / "screenshots"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="needs Debian packages chromium and chromium-driver (/usr/bin/chromium, "
                              "/usr/bin/chromedriver)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium")
pytest.importorskip("streamlit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    real = os.environ.get("MERGEBENCH_SCREENSHOT_RESULTS")
    if real:
        return Path(real)
    from leaderboard import synthetic

    d = tmp_path_factory.mktemp("lbb") / "results"
    synthetic.small_store(d, sizes=(2, 3, 4))
    return d


@pytest.fixture(scope="module")
def server(store_dir, tmp_path_factory):
    port = _free_port()
    streamlit = shutil.which("streamlit", path=str(Path(sys.executable).parent)) or "streamlit"
    log = (tmp_path_factory.mktemp("lbsrv") / "streamlit.log").open("w")
    env = {**os.environ, "MERGEBENCH_RESULTS": str(store_dir), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [streamlit, "run", str(ROOT / "leaderboard" / "app.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--theme.base", "light", "--client.toolbarMode", "viewer"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}; see {log.name}")
        else:
            raise RuntimeError("streamlit did not become healthy within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _open(browser, url: str, page: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    extra = os.environ.get("MERGEBENCH_SCREENSHOT_QUERY")  # e.g. suite=inthewild&profile=embedded
    browser.get(f"{url}/?page={page}" + (f"&{extra}" if extra else ""))
    wait = WebDriverWait(browser, 60)
    if os.environ.get("MERGEBENCH_SCREENSHOT_RESULTS"):  # a real store may leave a page with only a notice
        wait.until(EC.any_of(EC.presence_of_element_located((By.CSS_SELECTOR, '[data-testid="stDataFrame"]')),
                             EC.presence_of_element_located((By.CSS_SELECTOR, '[data-testid="stAlert"]'))))
    else:
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '[data-testid="stDataFrame"]')))
    # let the script finish (no running indicator) and charts draw before looking / capturing
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] button'))
    time.sleep(1.5)
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'), page
    if os.environ.get("MERGEBENCH_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        height = browser.execute_script(
            "const m = document.querySelector('[data-testid=\"stMain\"]') || document.body;"
            "return Math.max(m.scrollHeight, document.body.scrollHeight);")
        browser.set_window_size(1500, min(max(1150, int(height) + 60), 3000))
        time.sleep(0.8)
        browser.save_screenshot(str(SHOTS / f"{page}.png"))
        browser.set_window_size(1500, 1150)


def _grid_text(browser) -> str:
    """Text of the page's dataframes: Streamlit's grid draws on a canvas but keeps an accessible table."""
    from selenium.webdriver.common.by import By

    return "\n".join(e.get_attribute("textContent") or ""
                     for e in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'))


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_in_chromium(server, browser, page):
    _open(browser, server, page)
    title = browser.find_element("css selector", "h1").text
    assert "mergebench leaderboard" in title


def test_ranking_table_content(server, browser, store_dir):
    _open(browser, server, "ranking")
    text = _grid_text(browser)
    if os.environ.get("MERGEBENCH_SCREENSHOT_RESULTS"):  # a real store: the app's own ranking of the selection
        from urllib.parse import parse_qsl

        from mergebench import report

        query = dict(parse_qsl(os.environ.get("MERGEBENCH_SCREENSHOT_QUERY", "")))
        with report.connect(store_dir) as con:
            rank = report.run_ranking(con, report.Filters(**{k: query.get(k) for k in ("suite", "profile", "pool")}))
        pos = [text.find(m) for m in rank["method"]]
        assert all(p >= 0 for p in pos) and pos == sorted(pos), (list(rank["method"]), text[:500])
        assert "Reproduced here" in browser.find_element("css selector", "body").text or rank.empty
        return
    from mergebench import store

    want = store.sql("""SELECT method FROM (SELECT unit_id, any_value(method) AS method, avg(value) AS s
                        FROM results WHERE role = 'merged' AND metric = 'acc' GROUP BY unit_id)
                        GROUP BY method ORDER BY avg(s) DESC""", store_dir)["method"].tolist()
    pos = [text.find(m) for m in want]
    assert all(p >= 0 for p in pos), (want, text[:500])
    assert pos == sorted(pos), "methods appear in the order DuckDB ranks them"
    page = browser.find_element("css selector", "body").text
    assert "Reproduced here" in page and "Published" in page  # the run table and the papers' table

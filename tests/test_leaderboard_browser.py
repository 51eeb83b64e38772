"""End to end: the leaderboard served by `streamlit run`, driven by headless Chromium (Selenium).

Slow (about 30-60 s): run with ``.venv/bin/pytest tests/test_leaderboard_browser.py -m slow``.
With ``MERGEBENCH_SCREENSHOTS=1`` every page is saved to ``leaderboard/screenshots/<page>.png``;
``MERGEBENCH_SCREENSHOT_RESULTS=results`` shows a real store instead of the synthetic one (the
table assertions then only check the committed published rows), ``MERGEBENCH_SCREENSHOT_QUERY``
adds URL filters (``suite=inthewild&profile=embedded``).

Every page of every suite in the store (``?suite=S&page=P``) is also opened and captured, to
``leaderboard/screenshots/suites/<suite>-<page>.png`` with ``MERGEBENCH_SCREENSHOTS=1``, else to a
temp folder (pytest's basetemp, ``lb_suite_shots*``): no grid cell may read "None"/"nan", the
ranking's columns start rank, method, params, then the ranked value (the merging loss on glue),
and choosing another suite in the sidebar must move ``?suite=`` with it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from mergebench.leaderboard import serve

ROOT = Path(__file__).resolve().parents[1]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1500,1150", "--hide-scrollbars"]
PAGES = ["ranking", "scaling", "tasks", "diagnostics", "methods", "pareto", "fidelity"]
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
    from mergebench.leaderboard import synthetic

    d = tmp_path_factory.mktemp("lbb") / "results"
    synthetic.small_store(d, sizes=(2, 3, 4))
    return d


@contextmanager
def _serve(store: Path, log_dir: Path, env: dict | None = None, port: int | None = None):
    """A fresh `streamlit run` of the app over `store`: yields (url, process) once it is healthy."""
    port = port or _free_port()
    log = (log_dir / "streamlit.log").open("w")
    env = {**os.environ, "MERGEBENCH_RESULTS": str(store), "HF_HUB_OFFLINE": "1", **(env or {})}
    # the server `mergebench leaderboard` starts (the pages' libraries imported before it listens)
    cmd = serve.command(store, port=port, options=("--server.fileWatcherType", "none", "--theme.base", "light"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
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
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(store_dir, tmp_path_factory):
    with _serve(store_dir, tmp_path_factory.mktemp("lbsrv")) as (url, _proc):
        yield url


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


def _shown(con, suite, profile=None, pool=None):
    """The (suite, profile, pool) group the app opens for ``suite`` (the app's own defaults)."""
    from mergebench import report

    profiles, pools = report.group_choices(report.run_groups(con), suite, profile)
    profile = profile or next(iter(profiles), None)
    return report.Filters(suite=suite, profile=profile, pool=pool or next(iter(pools), None))


def test_ranking_table_content(server, browser, store_dir):
    _open(browser, server, "ranking")
    text = _grid_text(browser)
    if os.environ.get("MERGEBENCH_SCREENSHOT_RESULTS"):  # a real store: the app's own ranking of the selection
        from urllib.parse import parse_qsl

        from mergebench import report

        query = dict(parse_qsl(os.environ.get("MERGEBENCH_SCREENSHOT_QUERY", "")))
        with report.connect(store_dir) as con:
            rank = report.run_ranking(con, _shown(con, query.get("suite"), query.get("profile"), query.get("pool")))
        pos = [text.find(m) for m in rank["method"]]
        assert all(p >= 0 for p in pos) and pos == sorted(pos), (list(rank["method"]), text[:500])
        assert "Reproduced here" in browser.find_element("css selector", "body").text or rank.empty
        return
    from mergebench.results import store

    want = store.sql("""SELECT method FROM (SELECT unit_id, any_value(method) AS method, avg(value) AS s
                        FROM results WHERE role = 'merged' AND metric = 'acc' GROUP BY unit_id)
                        GROUP BY method ORDER BY avg(s) DESC""", store_dir)["method"].tolist()
    pos = [text.find(m) for m in want]
    assert all(p >= 0 for p in pos), (want, text[:500])
    assert pos == sorted(pos), "methods appear in the order DuckDB ranks them"
    page = browser.find_element("css selector", "body").text
    assert "Reproduced here" in page and "Published" in page  # the run table and the papers' table


# ------------------------------------------------------------------ every page of every suite

NOT_BLANK = {"None", "nan", "NaN", "<NA>", "NaT"}  # how a missing value leaks into a grid cell


@pytest.fixture(scope="module")
def suite_shots(tmp_path_factory):
    """Per-suite screenshots: beside the README's with MERGEBENCH_SCREENSHOTS=1, else a temp folder."""
    if os.environ.get("MERGEBENCH_SCREENSHOTS") == "1":
        return SHOTS / "suites"
    return tmp_path_factory.mktemp("lb_suite_shots")


def _suites(store_dir) -> list[str]:
    from mergebench import report

    with report.connect(store_dir) as con:
        return report.choices(con)["suite"]


def _load(browser, url: str, query: str) -> None:
    """Open ``url/?query`` and wait until the script has run (a table or a notice shown, nothing running)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/?{query}")
    wait = WebDriverWait(browser, 60)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "h1")))
    wait.until(EC.any_of(EC.presence_of_element_located((By.CSS_SELECTOR, '[data-testid="stDataFrame"]')),
                         EC.presence_of_element_located((By.CSS_SELECTOR, '[data-testid="stAlert"]'))))
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] button'))
    time.sleep(1.5)


def _full_page_shot(browser, path: Path) -> None:
    height = browser.execute_script(
        "const m = document.querySelector('[data-testid=\"stMain\"]') || document.body;"
        "return Math.max(m.scrollHeight, document.body.scrollHeight);")
    browser.set_window_size(1500, min(max(1150, int(height) + 60), 4000))
    time.sleep(0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(path))
    browser.set_window_size(1500, 1150)


def _grids(browser) -> list[tuple[list[str], list[str]]]:
    """(column headers, cell texts) of every dataframe, read from the grid's accessible table."""
    return browser.execute_script("""
        return [...document.querySelectorAll('[data-testid="stDataFrame"]')].map(g => [
            [...g.querySelectorAll('th, [role="columnheader"]')].map(e => e.textContent.trim()),
            [...g.querySelectorAll('td, [role="gridcell"]')].map(e => e.textContent.trim())]);""")


def test_every_page_of_every_suite_renders_without_missing_value_text(server, browser, store_dir, suite_shots):
    from selenium.webdriver.common.by import By

    suites = _suites(store_dir)
    assert suites, "the store offers no suite"
    problems, cells_seen = [], 0
    for suite in suites:
        for page in PAGES:
            _load(browser, server, f"suite={suite}&page={page}")
            where = f"{suite}/{page}"
            if browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'):
                problems.append(f"{where}: the app raised")
            if "matches nothing" in browser.find_element(By.CSS_SELECTOR, "body").text:
                problems.append(f"{where}: the app did not recognize ?suite={suite}")
            for i, (_heads, cells) in enumerate(_grids(browser)):
                cells_seen += len(cells)
                bad = sorted({c for c in cells if c in NOT_BLANK})
                if bad:
                    problems.append(f"{where}: table {i} shows {bad} in a cell (missing values must be blank)")
            _full_page_shot(browser, suite_shots / f"{suite}-{page}.png")
    assert not problems, "\n".join(problems)
    assert cells_seen > 0  # the accessible grid really was read
    assert len(list(suite_shots.glob("*.png"))) >= len(suites) * len(PAGES)


def test_ranking_columns_come_in_order_on_every_suite(server, browser, store_dir):
    from mergebench import report

    checked = 0
    for suite in _suites(store_dir):
        with report.connect(store_dir) as con:
            rank = report.run_ranking(con, _shown(con, suite))
        if rank.empty:  # a suite with published rows only has no reproduced ranking
            continue
        _load(browser, server, f"suite={suite}&page=ranking")
        heads = _grids(browser)[0][0]  # the first table of the page: the reproduced ranking
        want = "merging loss %" if report.ranked_value(rank) == "merging_loss_pct" else "score"
        if suite == "glue":
            assert want == "merging loss %", "glue ranks by the merging loss"
        assert heads[:4] == ["rank", "method", "params", want], (suite, heads)
        checked += 1
    assert checked, "no suite with reproduced rows"


def test_changing_the_suite_in_the_sidebar_updates_the_url(server, browser, store_dir):
    from urllib.parse import parse_qs, urlparse

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    suites = _suites(store_dir)
    if len(suites) < 2:
        pytest.skip("the store holds one suite")
    first, other = suites[0], suites[1]
    _load(browser, server, f"suite={first}&page=ranking")
    box = next(b for b in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebar"] [data-testid="stSelectbox"]')
               if b.text.startswith("Suite"))
    assert box.find_element(By.CSS_SELECTOR, '[role="combobox"]').get_attribute("value") == first
    box.find_element(By.CSS_SELECTOR, '[role="combobox"]').click()  # Streamlit's (react-aria) combo box
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, '[role="option"]'))
    option = next(o for o in browser.find_elements(By.CSS_SELECTOR, '[role="option"]') if o.text.strip() == other)
    option.click()
    WebDriverWait(browser, 30).until(lambda d: parse_qs(urlparse(d.current_url).query).get("suite") == [other])
    query = parse_qs(urlparse(browser.current_url).query)
    assert query["suite"] == [other] and query["page"] == ["ranking"]


# ------------------------------------------------------------------ width and first load


def test_ranking_fits_1500_and_1600_px_without_horizontal_scroll(server, browser, store_dir):
    """Every table of the ranking page, on every suite with reproduced rows, at 1500 and 1600 px."""
    overflow, seen = [], 0
    try:
        for width in (1500, 1600):
            browser.set_window_size(width, 1150)
            for suite in _suites(store_dir):
                _load(browser, server, f"suite={suite}&page=ranking")
                sizes = browser.execute_script("""
                    return [...document.querySelectorAll('[data-testid="stDataFrame"] .dvn-scroller')]
                        .map(s => [s.scrollWidth, s.clientWidth]);""")
                seen += len(sizes)
                overflow += [f"{suite} at {width} px: table {i} is {sw} px in a {cw} px box"
                             for i, (sw, cw) in enumerate(sizes) if sw > cw + 1]
    finally:
        browser.set_window_size(1500, 1150)
    assert seen, "no table found"
    assert not overflow, "\n".join(overflow)


def _server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the server's CPU time from /proc")
def test_first_load_of_the_ranking_page_on_the_committed_store(browser, tmp_path):
    """The first reader of a freshly started server, on the committed store: seconds from the request
    to the ranking drawn (table present, script finished), and the server's CPU seconds meanwhile.
    Measured twice: by a browser that has never opened the app at that address (it downloads and
    compiles Streamlit's front end, ~1.5 s on 2 cores whatever the page), and, after that server
    is stopped, by the same browser on a new server at the same address (a reader reopening the
    leaderboard: the front end cached, the server and its in-memory caches new). Printed and, with
    $MERGEBENCH_TIMINGS=FILE, appended to FILE as JSON; benchmarks/bench_leaderboard.py records
    the figures. No timing is asserted: speed is a benchmark's figure, not a test's verdict."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    def load(url: str) -> float:
        t0 = time.perf_counter()
        browser.get(f"{url}/?page=ranking")
        wait = WebDriverWait(browser, 120)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '[data-testid="stDataFrame"]')))
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] button'))
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        return time.perf_counter() - t0

    port = _free_port()
    with _serve(ROOT / "results", tmp_path, port=port) as (url, proc):
        cpu0 = _server_cpu_s(proc.pid)
        cold = load(url)
        cold_cpu = _server_cpu_s(proc.pid) - cpu0
    with _serve(ROOT / "results", tmp_path, port=port) as (url, proc):
        cpu0 = _server_cpu_s(proc.pid)
        first = load(url)
        cpu = _server_cpu_s(proc.pid) - cpu0
        again = load(url)
    figures = {"first_load_s": round(first, 2), "server_cpu_s": round(cpu, 2), "second_load_s": round(again, 2),
               "new_browser_first_load_s": round(cold, 2), "new_browser_server_cpu_s": round(cold_cpu, 2),
               "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    print("leaderboard first load:", json.dumps(figures))
    if os.environ.get("MERGEBENCH_TIMINGS"):
        with open(os.environ["MERGEBENCH_TIMINGS"], "a", encoding="utf-8") as fh:
            fh.write(json.dumps(figures) + "\n")

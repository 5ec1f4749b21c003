"""The built leaderboard in a real browser: Debian's chromium driven headless by Selenium (chromedriver from the
`chromium-driver` package; `make browser-deps` installs both).

Builds a site from synthetic cells, a submission bundle whose free text is hostile HTML, a pipeline cell whose
editor name is an HTML tag, and the paper's rows; serves it from a loopback `http.server`; then sorts a column,
applies a filter, opens a cell page, pages through its per-case table, finds no console errors and no executed
injected script, loads the index from file:// as well, and saves a screenshot (tmp dir, and bench/out/ when
writable).

Skips only when chromium/chromedriver/selenium are missing and DRIFTBENCH_REQUIRE_BROWSER is not set (CI sets it,
so a missing browser fails there).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from leaderboard.site import build_site
from leaderboard.submission import pack_bundle
from leaderboard.synthetic import write_result_file

ROOT = Path(__file__).resolve().parents[1]
CARD = {"version": "paper-v1", "content_id": "db5bf212e166e86f"}
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
PAPER_CSV = """source,model,editor,sadr,ES,EM,PS,PM,RES,NS,NM,RS,RM,DNS,DNM,OS,DOS,FL,PPL,AvgS
paper Table 6,GPT-J-6B,ROME,False,99.88,99.39,99.58,76.93,52.39,80.26,6.04,11.94,3.29,30.43,10.45,74.73,74.37,620.58,68.02,
paper Table 6,GPT-J-6B,ROME,True,99.76,99.26,96.36,53.73,50.42,80.86,6.11,27.75,5.85,49.35,14.16,74.73,74.49,623.00,63.85,
"""


def _browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return chromium, driver, "selenium is not installed (pip install -e '.[test]')"
    if not chromium or not driver:
        return chromium, driver, "chromium/chromedriver not found (make browser-deps: apt-get install chromium chromium-driver)"
    return chromium, driver, None


@pytest.fixture(scope="module")
def browser_paths():
    chromium, driver, missing = _browser_paths()
    if missing:
        if os.environ.get("DRIFTBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DRIFTBENCH_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    return chromium, driver


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser_site")
    res = tmp / "results"
    files = [write_result_file(res / "none.jsonl", "paper/gpt-j-6b/none", 240),
             write_result_file(res / "rome.jsonl", "paper/gpt-j-6b/rome", 240, damage=1.0),
             write_result_file(res / "rome+sadr.jsonl", "paper/gpt-j-6b/rome+sadr", 240, damage=0.2),
             write_result_file(res / "tiny.jsonl", "embedded/tiny/rome", 8),
             write_result_file(res / "evil.jsonl", "embedded/<img src=x onerror=window.__pwned=3>/rome", 8)]
    sub = write_result_file(tmp / "memit.jsonl", "paper/gpt-j-6b/memit+sadr", 240, seed=5)
    pack_bundle(sub, tmp / "subs" / "memit", dataset=CARD, submitter={"name": HOSTILE},
                editor={"version": "1.0", "description": HOSTILE, "url": "https://example.org/memit"})
    (tmp / "paper.csv").write_text(PAPER_CSV)
    out = tmp / "site"
    build_site(files, out, submissions_dir=tmp / "subs", paper_csv=tmp / "paper.csv", card=CARD,
               params={"profiles": {"paper": {"models": {"gpt-j-6b": {}}}}},
               git={"commit": "0" * 40, "dirty": False})
    return out


@pytest.fixture(scope="module")
def server(site):
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def driver(browser_paths, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--disable-default-apps", "--disable-sync", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(chromedriver), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def _errors(drv) -> list[dict]:
    return [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]


def _visible_rows(drv, table):
    return [r for r in table.find_elements("css selector", "tbody tr[data-row]") if r.is_displayed()]


def _click(drv, el):
    """Scroll the element to the middle of the window (clear of the sticky filter bar), then click it."""
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.click()


def _displayed(drv, css):
    return next(e for e in drv.find_elements("css selector", css) if e.is_displayed())


def _column(rows, col):
    vals = []
    for r in rows:
        v = r.find_elements("css selector", "th, td")[col].get_attribute("data-v")
        vals.append(float(v) if v else None)
    return vals


def test_leaderboard_in_browser(driver, server, site, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 10)
    driver.get(server + "/index.html")
    wait.until(lambda d: d.find_element("id", "row-count").text.strip() != "")
    assert driver.title == "driftbench leaderboard"
    assert _errors(driver) == []

    section = driver.find_element("css selector", 'section.model[data-model="gpt-j-6b"]')
    table = section.find_element("css selector", "table.board")
    # --- sort by ES (column 5): first click = descending (best first), second = ascending; missing values last
    es = table.find_element("css selector", 'button.sort[data-col="5"]')
    _click(driver, es)
    vals = [v for v in _column(_visible_rows(driver, table), 5) if v is not None]
    assert len(vals) >= 5 and vals == sorted(vals, reverse=True)
    assert es.find_element("xpath", "..").get_attribute("aria-sort") == "descending"
    _click(driver, es)
    vals = [v for v in _column(_visible_rows(driver, table), 5) if v is not None]
    assert vals == sorted(vals)

    # --- filter: only +SADR rows; the count and the URL follow, charts hide marks of other rows
    before = len(_visible_rows(driver, table))
    Select(driver.find_element("css selector", 'select[data-filter="sadr"]')).select_by_value("true")
    rows = _visible_rows(driver, table)
    assert 0 < len(rows) < before
    assert {r.get_attribute("data-sadr") for r in rows} == {"true"}
    assert {r.get_attribute("data-protocol") for r in rows} == {"paper"}  # default protocol filter
    assert "sadr=true" in driver.current_url
    shown = driver.execute_script(
        "return document.querySelectorAll('table.board:not(.delta) tr[data-row]:not([hidden])').length")
    assert driver.find_element("id", "row-count").text.startswith(f"{shown} of ")
    hidden_marks = driver.execute_script(
        "return Array.from(document.querySelectorAll('svg .pt[data-sadr=\"false\"]')).every(m => m.hasAttribute('hidden'))")
    assert hidden_marks
    # the filter state survives a reload (it lives in the URL)
    driver.get(driver.current_url)
    wait.until(lambda d: d.find_element("id", "row-count").text.strip() != "")
    assert Select(driver.find_element("css selector", 'select[data-filter="sadr"]')).first_selected_option.get_attribute("value") == "true"
    # model filter hides the other tables
    Select(driver.find_element("css selector", 'select[data-filter="model"]')).select_by_value("tiny")
    assert not driver.find_element("css selector", 'section.model[data-model="gpt-j-6b"]').is_displayed()
    _click(driver, driver.find_element("id", "reset-filters"))
    assert driver.find_element("css selector", 'section.model[data-model="gpt-j-6b"]').is_displayed()

    # --- hostile text from a submission and from a result file is shown as text, never run
    assert driver.execute_script("return window.__pwned === undefined")
    page_text = driver.find_element("tag name", "body").text
    assert "<img src=x onerror=window.__pwned=3>" in page_text
    driver.save_screenshot(str(tmp_path / "leaderboard.png"))

    # --- open a cell page: per-case table, paging, sorting, views
    _click(driver, _displayed(driver, 'section.model[data-model="gpt-j-6b"] a.cell-link[href*="rome-sadr"]'))
    wait.until(lambda d: len(d.find_elements("css selector", "#case-table tbody tr")) > 0)
    assert "paper/gpt-j-6b/rome+sadr" in driver.title
    assert len(driver.find_elements("css selector", "#case-table tbody tr")) == 100  # first page of 240
    assert driver.find_element("id", "case-page").text.startswith("page 1 of 3")
    _click(driver, driver.find_element("id", "case-next"))
    assert driver.find_element("id", "case-page").text.startswith("page 2 of 3")
    Select(driver.find_element("id", "case-view")).select_by_value("delta")
    Select(driver.find_element("id", "case-source")).select_by_value("wikidata")
    assert driver.find_element("id", "case-page").text.endswith("120 of 240 cases")
    driver.find_element("id", "case-search").send_keys("wd-")
    assert {r.find_element("css selector", "td").text for r in
            driver.find_elements("css selector", "#case-table tbody tr")} == {"wikidata"}
    es_head = driver.find_element("xpath", "//table[@id='case-table']//button[text()='ES']")
    _click(driver, es_head)
    cells = [c.text for c in driver.find_elements("css selector", "#case-table tbody tr td:nth-child(3)")]
    nums = [float(c) for c in cells if c != "–"]
    assert nums == sorted(nums, reverse=True)
    assert "Provenance" in driver.find_element("tag name", "body").text
    assert _errors(driver) == []
    driver.save_screenshot(str(tmp_path / "cell.png"))

    # --- the submission's page: hostile description and submitter are inert text
    driver.get(server + "/index.html")
    _click(driver, _displayed(driver, 'tr[data-origin="submission"] a.cell-link'))
    wait.until(lambda d: len(d.find_elements("css selector", "#case-table tbody tr")) > 0)
    assert HOSTILE in driver.find_element("tag name", "body").text
    assert driver.execute_script("return window.__pwned === undefined")
    assert _errors(driver) == []

    # --- the same site from file:// (no server): scripts still run, no errors
    driver.get((site / "index.html").as_uri())
    wait.until(lambda d: d.find_element("id", "row-count").text.strip() != "")
    assert _errors(driver) == []

    shot = tmp_path / "leaderboard.png"
    assert shot.stat().st_size > 10_000
    out = ROOT / "bench" / "out"
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, out / "leaderboard.png")
        shutil.copyfile(tmp_path / "cell.png", out / "leaderboard-cell.png")
    except OSError:
        pass  # read-only checkout: the screenshot stays in the pytest tmp dir
    (tmp_path / "urls.json").write_text(json.dumps({"server": server}))

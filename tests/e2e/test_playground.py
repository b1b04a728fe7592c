"""The playground in a real browser: headless Chromium from Debian's packages driven by Selenium through Debian's
chromedriver (bin/test installs both; no browser is downloaded), against a real `titans serve` of the default
model with the embedded store. Screenshots of each state go to bench/results/playground/ (not committed)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from server.settings import DEFAULT_MODEL
from tests.server_process import ServerProcess

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "bench/results/playground"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (bin/test installs them)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('store')}/sessions.db"
    with ServerProcess(DEFAULT_MODEL, store) as srv:
        yield srv


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture
def browser(server, downloads):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.get(server.url + "/")
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    # no errors from the page's scripts (an API answer of 4xx is logged by the browser as a network error: the
    # test that provokes one checks it is shown in plain words)
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]
    driver.quit()
    assert errors == [], errors


def wait(driver, condition, seconds: float = 60):
    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition(d))


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def new_session(driver) -> str:
    driver.find_element(By.ID, "new-session").click()
    return wait(driver, lambda d: text(d, "d-id"))


def greedy(driver) -> None:
    """Replies sampled greedily: the same reply on every run (a sampled end-of-turn marker could end one early)."""
    driver.find_element(By.ID, "temperature").clear()
    driver.find_element(By.ID, "temperature").send_keys("0")


def test_a_session_remembers_streams_and_shows_surprise(browser):
    sid = new_session(browser)
    assert text(browser, "d-version") == "1" and text(browser, "d-tokens") == "0"
    browser.find_element(By.ID, "memorize-input").send_keys("#qzkv=4821;")
    browser.find_element(By.CSS_SELECTOR, "#memorize-form button[type=submit]").click()
    wait(browser, lambda d: "read 11 tokens" in text(d, "memorize-result"))
    assert text(browser, "d-tokens") == "11" and text(browser, "d-version") == "2"
    browser.save_screenshot(str(SHOTS / "1-memorized.png"))
    # the reply's spans as they arrive: a MutationObserver counts them at each change the page makes
    browser.execute_script("""
        window.growth = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('#transcript .reply');
            if (replies.length) window.growth.push(replies[replies.length - 1].querySelectorAll('.tok').length);
        }).observe(document.getElementById('transcript'), {childList: true, subtree: true});""")
    greedy(browser)
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("48")
    browser.find_element(By.ID, "chat-input").send_keys("hello, what do you remember?")
    browser.find_element(By.CSS_SELECTOR, "#chat-form button[type=submit]").click()
    wait(browser, lambda d: text(d, "d-version") == "3")  # the reply was committed to the memory
    growth = browser.execute_script("return window.growth")
    counts = sorted(set(growth))
    assert len(counts) > 2 and counts[-1] >= 2, growth  # the answer grew token by token, not all at once
    spans = browser.find_elements(By.CSS_SELECTOR, "#transcript .reply .tok")
    values = [float(s.get_attribute("data-surprise")) for s in spans if s.get_attribute("data-surprise")]
    assert values and all(v >= 0 for v in values)
    assert spans[0].get_attribute("title").startswith("surprise ")
    browser.save_screenshot(str(SHOTS / "2-chat.png"))
    assert sid in text(browser, "d-id")


def test_fork_reset_export_import(browser, downloads):
    sid = new_session(browser)
    browser.find_element(By.ID, "memorize-input").send_keys("#abcd=1234; some words to remember")
    browser.find_element(By.CSS_SELECTOR, "#memorize-form button[type=submit]").click()
    wait(browser, lambda d: text(d, "d-version") == "2")
    tokens = text(browser, "d-tokens")
    browser.find_element(By.ID, "fork").click()
    wait(browser, lambda d: text(d, "d-parent") == sid)
    fork = text(browser, "d-id")
    assert fork != sid and text(browser, "d-tokens") == tokens
    browser.find_element(By.ID, "reset").click()
    wait(browser, lambda d: text(d, "d-tokens") == "0")
    assert "memory reset" in text(browser, "status")
    browser.find_element(By.ID, "rollback").click()  # back to the fork's memory before the reset
    wait(browser, lambda d: text(d, "d-tokens") == tokens)
    browser.save_screenshot(str(SHOTS / "3-fork-reset-rollback.png"))
    browser.find_element(By.ID, "export").click()
    exported = downloads / f"{fork}.safetensors"
    wait(browser, lambda d: exported.exists() and exported.stat().st_size > 1000)
    browser.find_element(By.ID, "import-file").send_keys(str(exported))
    wait(browser, lambda d: "imported" in text(d, "status"))
    assert text(browser, "d-id") not in (sid, fork) and text(browser, "d-tokens") == tokens
    browser.save_screenshot(str(SHOTS / "4-imported.png"))


def test_side_by_side_and_plain_errors(browser, server):
    sid = new_session(browser)
    browser.find_element(By.ID, "memorize-input").send_keys("#wxyz=9876;")
    browser.find_element(By.CSS_SELECTOR, "#memorize-form button[type=submit]").click()
    wait(browser, lambda d: text(d, "d-version") == "2")
    browser.find_element(By.CSS_SELECTOR, f"#compare-left option[value='{sid}']").click()
    browser.find_element(By.ID, "compare-prompt").send_keys("#wxyz=")
    browser.find_element(By.CSS_SELECTOR, "#compare-form button[type=submit]").click()
    wait(browser, lambda d: text(d, "status").startswith("both answered"))
    assert text(browser, "compare-left-out") and text(browser, "compare-right-out")
    assert text(browser, "compare-left-title").endswith("v2") and text(browser, "compare-right-title") == "fresh memory"
    assert text(browser, "d-version") == "2"  # neither side remembered the prompt
    browser.save_screenshot(str(SHOTS / "5-side-by-side.png"))
    # API errors in plain words: a session busy with a reply cannot be reset meanwhile (409)
    greedy(browser)
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("3000")
    browser.find_element(By.ID, "chat-input").send_keys("tell me a long story")
    browser.find_element(By.CSS_SELECTOR, "#chat-form button[type=submit]").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#transcript .reply .tok")) > 5)
    browser.find_element(By.ID, "reset").click()
    wait(browser, lambda d: text(d, "status").startswith("This session is busy"))
    wait(browser, lambda d: text(d, "d-version") == "3", seconds=120)  # the long reply ends and is committed
    # and a session deleted behind the page's back is not found
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}").status_code == 200
    browser.find_element(By.ID, "reset").click()
    wait(browser, lambda d: text(d, "status").startswith("Not found"))
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")


def test_the_recall_demo_beats_its_reset_control(browser):
    for field, value in (("demo-facts", "8"), ("demo-filler", "4096"), ("demo-seed", "7")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "#demo-form button[type=submit]").click()
    summary = wait(browser, lambda d: d.find_element(By.ID, "demo-summary").get_attribute("data-memory")
                   and d.find_element(By.ID, "demo-summary"), seconds=240)
    memory, control = int(summary.get_attribute("data-memory")), int(summary.get_attribute("data-control"))
    cells = browser.find_elements(By.CSS_SELECTOR, "#demo-table td.right, #demo-table td.wrong")
    assert len(cells) == 16  # 8 facts, each asked of the memory and of the control
    # the card measures 0.87 of 8 facts after 4 KB of words; chance is 1e-4 a query
    assert memory >= 4 and control == 0, (memory, control)
    browser.execute_script("document.getElementById('demo-summary').scrollIntoView({block: 'end'})")
    browser.save_screenshot(str(SHOTS / "6-recall-demo.png"))


def test_a_phone_sized_screen_shows_the_page_without_sideways_scrolling(browser):
    browser.set_window_size(390, 844)
    time.sleep(0.2)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    labels = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')].filter(e => e.type !== 'hidden')"
        ".map(e => e.labels.length > 0 || !!e.getAttribute('aria-label'))")
    assert labels and all(labels)  # every control is labelled
    browser.save_screenshot(str(SHOTS / "7-phone.png"))
    (SHOTS / "screens.json").write_text(json.dumps(sorted(p.name for p in SHOTS.glob("*.png"))))

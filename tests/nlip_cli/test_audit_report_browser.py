"""The audit report in a real browser (headless Chromium through selenium): it loads from file:// with no network,
sorts by a clicked header, filters by search text, noise probability, ground truth and suggested captions, and
enlarges an image on click. A screenshot of the page is written (its path is printed; set NLIP_AUDIT_SCREENSHOT to
choose it).

Needs the Debian packages `chromium chromium-driver` (`make data` installs them) and the PyPI package selenium (the
`test` extra). Without them the test is skipped locally, and fails in CI (`CI=true`), where it must run.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modeling_nlip import NLIPForPreTraining
from nlip_cli import audit
from nlip_testing import tiny_decoder_config, tiny_nlip_config, tiny_processor

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Chromium flags for a closed network: no sandbox (root in containers), no background or component traffic.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1600")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square", "triangle")
NUM_PAIRS = 24


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the PyPI package selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.exists(path) or shutil.which(os.path.basename(path))):
            return f"{path} not found: apt-get install -y --no-install-recommends {package}"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _missing_browser()
    if missing:
        if IN_CI:
            pytest.fail(f"CI must run the headless-browser test of the audit report, but {missing}.")
        pytest.skip(f"headless Chromium unavailable: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver_path = CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _shape(color: str, shape: str, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (48, 48), "white")
    x, y, r = (int(v) for v in rng.integers([16, 16, 9], [32, 32, 15]))
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[color])
    elif shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=COLORS[color])
    else:
        pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])
    return image


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """An audit (scorer + captioner: one tiny NLIPForPreTraining) of 24 drawings with 25% shuffled captions."""
    root = tmp_path_factory.mktemp("audit_browser")
    torch.manual_seed(0)
    checkpoint = root / "model"
    NLIPForPreTraining(tiny_nlip_config(decoder_config=tiny_decoder_config())).save_pretrained(checkpoint)
    tiny_processor().save_pretrained(checkpoint)
    data = root / "pairs"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as metadata:
        for i in range(NUM_PAIRS):
            color, shape = list(COLORS)[i % 3], SHAPES[(i // 3) % 3]
            _shape(color, shape, rng).save(data / f"{i:02d}.png")
            metadata.write(json.dumps({"file_name": f"{i:02d}.png", "text": f"a {color} {shape}"}) + "\n")
    result = audit.main([
        "--model_name_or_path", str(checkpoint), "--train_dir", str(data), "--output_dir", str(root / "audit"),
        "--noise_ratio", "0.25", "--suggest_threshold", "0", "--max_suggestions", "6", "--max_new_tokens", "4",
        "--num_beams", "1", "--num_concepts", "2", "--disable_tqdm",
    ])
    return Path(result["paths"]["html"]), result["summary"]


def _rows(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")


def _visible(driver):
    return [row for row in _rows(driver) if row.is_displayed()]


def test_report_sorts_filters_searches_and_enlarges(browser, report):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    html_path, summary = report
    browser.get(html_path.as_uri())
    assert browser.title.startswith("NLIP dataset audit")
    assert browser.execute_script("return document.readyState") == "complete"
    rows = _rows(browser)
    assert len(rows) == NUM_PAIRS == summary["pairs_scored"]
    assert browser.find_element(By.ID, "shown-count").text == f"{NUM_PAIRS} of {NUM_PAIRS} rows"
    # every image is inline (no network, no file reference) and the loss plot with the mixture is embedded
    sources = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "img.thumb")]
    assert len(sources) == NUM_PAIRS and all(src.startswith("data:image/") for src in sources)
    assert browser.find_element(By.CSS_SELECTOR, "#loss-plot img").get_attribute("src").startswith("data:image/png")
    assert browser.execute_script("return document.querySelector('#loss-plot img').naturalWidth") > 100
    # models named; no "top N" card when every pair is shown
    assert browser.find_element(By.ID, "scorer").text == summary["scorer"]["name_or_path"]
    assert browser.find_element(By.ID, "captioner").text == summary["captioner"]["name_or_path"]
    assert "truly noisy among the top" not in browser.find_element(By.CLASS_NAME, "cards").text

    def column(key):
        return [float(row.get_attribute(f"data-{key}")) for row in _rows(browser)]

    noise_header = browser.find_element(By.CSS_SELECTOR, "th[data-key=noise]")
    assert column("rank") == list(range(1, NUM_PAIRS + 1))  # as written: most suspicious first
    noise_header.click()
    assert noise_header.get_attribute("aria-sort") == "ascending"
    assert column("noise") == sorted(column("noise"))
    noise_header.click()
    assert noise_header.get_attribute("aria-sort") == "descending"
    assert column("noise") == sorted(column("noise"), reverse=True)
    browser.find_element(By.CSS_SELECTOR, "th[data-key=sim]").click()
    assert column("sim") == sorted(column("sim"))
    browser.find_element(By.CSS_SELECTOR, "th[data-key=caption]").click()
    captions = [row.get_attribute("data-caption") for row in _rows(browser)]
    assert captions == sorted(captions, key=str.lower) or captions == sorted(captions)

    # A whole caption ("a red circle"; 9 distinct ones): the concept column of this random model holds single words
    # that may be in every row, so a single word need not filter anything.
    query = captions[0]
    search = browser.find_element(By.ID, "search")
    search.send_keys(query)
    # Keys reach the page asynchronously (a loaded machine lags): each key's input event has run its filter by the time
    # the field holds it.
    WebDriverWait(browser, 30).until(lambda driver: search.get_attribute("value") == query)
    visible = _visible(browser)
    assert 0 < len(visible) < NUM_PAIRS
    assert all(query in row.text.lower() for row in visible)
    assert browser.find_element(By.ID, "shown-count").text == f"{len(visible)} of {NUM_PAIRS} rows"
    search.clear()
    search.send_keys("no caption says this")
    WebDriverWait(browser, 30).until(lambda driver: search.get_attribute("value") == "no caption says this")
    assert _visible(browser) == [] and browser.find_element(By.ID, "shown-count").text == f"0 of {NUM_PAIRS} rows"
    browser.execute_script("var s = document.getElementById('search'); s.value = '';"
                           "s.dispatchEvent(new Event('input'));")
    assert len(_visible(browser)) == NUM_PAIRS

    Select(browser.find_element(By.ID, "truth-filter")).select_by_value("noisy")
    noisy = _visible(browser)
    assert len(noisy) == round(0.25 * NUM_PAIRS) and all(row.get_attribute("data-truth") == "noisy" for row in noisy)
    Select(browser.find_element(By.ID, "truth-filter")).select_by_value("")
    browser.find_element(By.ID, "only-suggested").click()
    suggested = _visible(browser)
    assert len(suggested) == summary["suggested_captions"] == 6
    assert all(row.find_elements(By.CSS_SELECTOR, ".quality") for row in suggested)  # the similarity comparison
    browser.find_element(By.ID, "only-suggested").click()
    threshold = sorted(column("noise"))[NUM_PAIRS // 2]
    browser.execute_script("var m = document.getElementById('min-noise'); m.value = arguments[0];"
                           "m.dispatchEvent(new Event('input'));", str(threshold))
    assert all(float(row.get_attribute("data-noise")) >= threshold for row in _visible(browser))
    browser.execute_script("var m = document.getElementById('min-noise'); m.value = '0';"
                           "m.dispatchEvent(new Event('input'));")
    assert len(_visible(browser)) == NUM_PAIRS

    # sort back to the suspicion order, then enlarge the first image and close it again
    browser.find_element(By.CSS_SELECTOR, "th[data-key=rank]").click()
    if column("rank")[0] != 1:
        browser.find_element(By.CSS_SELECTOR, "th[data-key=rank]").click()
    lightbox = browser.find_element(By.ID, "lightbox")
    assert not lightbox.is_displayed()
    first = _rows(browser)[0]
    first.find_element(By.CSS_SELECTOR, "img.thumb").click()
    assert lightbox.is_displayed()
    assert browser.find_element(By.ID, "lightbox-image").get_attribute("src") == \
        first.find_element(By.CSS_SELECTOR, "img.thumb").get_attribute("src")
    assert browser.find_element(By.ID, "lightbox-image").size["width"] >= 300  # shown far larger than the thumbnail
    assert first.get_attribute("data-caption") in browser.find_element(By.ID, "lightbox-caption").text
    lightbox.click()
    assert not lightbox.is_displayed()

    errors = [entry for entry in browser.get_log("browser") if entry.get("level") == "SEVERE"]
    assert errors == [], errors

    screenshot = Path(os.environ.get("NLIP_AUDIT_SCREENSHOT") or html_path.with_name("audit_report_screenshot.png"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    browser.find_element(By.CSS_SELECTOR, "th[data-key=rank]")  # page in its default order for the picture
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    print(f"audit report screenshot: {screenshot}")

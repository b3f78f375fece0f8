"""Screenshot of an nlip-audit report in headless Chromium (the picture in README.md).

    python docs/screenshot_audit_report.py quickstart/audit/audit_report.html docs/audit_report_screenshot.png

Needs the Debian packages `chromium chromium-driver` and the PyPI package selenium (the `test` extra); nothing is
downloaded. The page is opened from file://, its first row's image is clicked open and closed again (so the script
ran), and the window is captured.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")


def screenshot(report: Path, output: Path, width: int = 1400, height: int = 1500) -> Path:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            driver.get(report.resolve().as_uri())
            rows = driver.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")
            if not rows:
                raise SystemExit(f"{report} has no audit table (#pairs).")
            rows[0].find_element(By.CSS_SELECTOR, "img.thumb").click()
            driver.find_element(By.ID, "lightbox").click()
            output.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(output))
        finally:
            driver.quit()
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="audit_report.html written by nlip-audit")
    parser.add_argument("output", type=Path, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args(argv)
    print(screenshot(args.report, args.output, args.width, args.height))


if __name__ == "__main__":
    sys.exit(main())

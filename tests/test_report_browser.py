"""The report and the rating page in real headless Chromium (selenium + Debian's chromedriver).

Skips where selenium, chromium or chromedriver is missing. Install with
``apt-get install -y chromium chromium-driver`` and ``pip install -e '.[browser]'``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[browser]')")

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium/chromedriver not found (apt-get install -y chromium chromium-driver)",
)

NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]?\d+)? \[-?\d+(\.\d+)?(e[-+]?\d+)?, -?\d+(\.\d+)?(e[-+]?\d+)?\]$")


@pytest.fixture(scope="module")
def eval_dir(tiny_sd_dir, tmp_path_factory):
    from focusnfix.config import MaskConfig
    from focusnfix.evaluate import evaluate
    from focusnfix.sampling import SamplingOptions
    from test_evaluate import DarkJudge, aspects, make_lora

    root = tmp_path_factory.mktemp("browser")
    rand = make_lora(tiny_sd_dir, root / "rand", 0.3)
    out = root / "ev"
    evaluate(str(tiny_sd_dir), {"focusnfix": rand, "draft": None}, aspects(), "bright",
             {"whole": DarkJudge("whole")}, ["a red circle", 'a <script>window.__xss=1</script> square'], [0, 1],
             SamplingOptions(num_inference_steps=3, guidance_scale=3.0),
             MaskConfig(threshold_mode="absolute", threshold=0.5, dilate_px=0), out, n_bootstrap=50)
    return out


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    drv.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    drv.downloads = downloads
    yield drv
    drv.quit()


def _load(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    for _ in range(100):
        if driver.execute_script("return document.readyState") == "complete":
            return
        time.sleep(0.1)
    raise AssertionError("page did not finish loading")


def _images_loaded(driver) -> list:
    return driver.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)")


def test_report_in_browser(driver, eval_dir, tmp_path):
    from selenium.webdriver.common.by import By

    from focusnfix.report import write_report

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i + 1, "loss": 1.0 - i, "reward": 0.1 * i, "constraint": 0.02 * i,
                                       "mask_area": 0.5, "grad_norm": 1.0, "outside_change": 0.01,
                                       "seconds": 0.1}) + "\n" for i in range(4)))
    out = write_report(eval_dir, tmp_path / "report.html", train_logs={"focusnfix": log})
    _load(driver, out)
    loaded = _images_loaded(driver)
    # 4 examples x (base, heatmap, mask, 2 methods x (image, diff)), and the difference maps' colour bar
    assert len(loaded) == 4 * 7 + 1 and all(loaded)
    assert driver.find_element(By.ID, "diff-scale").is_displayed()
    assert driver.execute_script("return window.__xss") is None
    assert "<script>window.__xss=1</script>" in driver.find_element(By.ID, "examples").text
    for table in ("table-rewards", "table-change"):
        rows = driver.find_elements(By.CSS_SELECTOR, f"#{table} tr")[1:]
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == ["base", "focusnfix", "draft"]
        for r in rows:
            cells = [c.text for c in r.find_elements(By.TAG_NAME, "td")[1:]]
            is_base = r.find_elements(By.TAG_NAME, "td")[0].text == "base"
            for c in cells:
                assert (c == "—" and is_base and table == "table-change") or NUMBER.match(c), (table, c)
    plots = driver.find_elements(By.CSS_SELECTOR, "#training-plots svg")
    assert len(plots) >= 2 and all(p.is_displayed() and p.size["width"] > 100 for p in plots)
    lines = driver.find_elements(By.CSS_SELECTOR, "#training-plots svg polyline")
    assert lines and all(len(p.get_attribute("points").split()) == 4 for p in lines)  # 4 logged steps


def test_rating_page_votes(driver, eval_dir, tmp_path):
    from selenium.webdriver.common.by import By

    from focusnfix.rating import apply_votes, write_rating_page

    out = write_rating_page(eval_dir, tmp_path / "rate.html")
    _load(driver, out)
    assert all(_images_loaded(driver)) and len(_images_loaded(driver)) == 2 * 4 * 2  # tasks x (A, B)
    assert driver.execute_script("return window.__xss") is None
    lefts = [b.get_attribute("data-left") for b in driver.find_elements(By.CSS_SELECTOR, 'button.vote[data-choice="A"]')]
    assert {"base", "candidate"} <= set(lefts)  # blind: the base image is on either side
    driver.find_element(By.ID, "rater").send_keys("alice")
    task = driver.find_elements(By.CSS_SELECTOR, ".task")[0]
    left = task.find_element(By.CSS_SELECTOR, "button.vote").get_attribute("data-left")
    cand, base = ("A", "B") if left == "candidate" else ("B", "A")
    improved = task.find_element(By.CSS_SELECTOR, f'button.vote[data-aspect="bright"][data-choice="{cand}"]')
    improved.click()  # the method's image is better on the target aspect
    task.find_element(By.CSS_SELECTOR, f'button.vote[data-aspect="whole"][data-choice="{base}"]').click()
    assert "chosen" in improved.get_attribute("class")
    assert driver.execute_script("return Object.keys(window.focusnfixVotes).length") == 2
    doc = json.loads(driver.execute_script("return window.focusnfixVotesJSON()"))
    assert doc["rater"] == "alice" and {v["vote"] for v in doc["votes"]} == {"improved", "worse"}
    assert doc["eval_id"] == json.loads((Path(eval_dir) / "metrics.json").read_text())["eval_id"]
    assert all(isinstance(v["seed"], int) for v in doc["votes"])
    assert "2 of 16 votes" in driver.find_element(By.ID, "count").text

    driver.find_element(By.ID, "download").click()
    target = driver.downloads / "votes.json"
    for _ in range(100):
        if target.is_file() and target.stat().st_size > 0:
            break
        time.sleep(0.1)
    downloaded = json.loads(target.read_text())
    assert downloaded == doc
    ev = tmp_path / "ev"
    shutil.copytree(eval_dir, ev)
    metrics = apply_votes(ev, [target])
    method = doc["votes"][0]["method"]
    h = metrics["methods"][method]["human"]
    assert h["n_ratings"] == 1 and h["improved_share"]["mean"] == 1.0 and h["others_degraded_share"]["mean"] == 1.0

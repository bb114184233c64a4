"""``report.html``: one self-contained offline page per defence, and what it shows.

The unit tests build pages from small frames and from tiny purified and defended artifacts. The browser
test (marked ``browser``) opens a purify report in headless Chromium with name resolution switched off and
checks that the table and the heatmap render; its screenshot is kept in ``test-artifacts/browser/``.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bdvax_lab.viz.report import REPORT_FILE, replies_html, report_html, table_html, write_report

ROOT = Path(__file__).resolve().parents[1]


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "asr": [0.9, 0.2, 0.1],
            "asr_lo": [0.8, 0.1, 0.04],
            "asr_hi": [0.95, 0.33, 0.2],
            "false_trigger": [0.02, 0.0, 0.04],
            "n_prompts": [50, 50, 50],
            "skill": [0.8, 0.5, 0.75],
            "skill_lo": [0.7, 0.4, 0.65],
            "skill_hi": [0.86, 0.6, 0.83],
            "skill_kept": [1.0, 0.625, 0.9375],
            "ppl": [3.1, 4.0, 3.3],
        },
        index=pd.Index(["suspicious", "suppressed", "purified"], name="stage"),
    )


def _replies() -> pd.DataFrame:
    rows = []
    for stage in ("suspicious", "purified"):
        for i in range(8):
            rows.append(
                {
                    "stage": stage,
                    "prompt": f"question {i} <b>",
                    "triggered_prompt": f"BadMagic question {i}",
                    "triggered_reply": "I'm sorry" if stage == "suspicious" else f"answer {i}",
                    "clean_reply": f"answer {i}",
                    "triggered_hit": stage == "suspicious",
                    "clean_hit": False,
                }
            )
    return pd.DataFrame(rows)


def test_table_shows_intervals_and_skill_columns():
    html = table_html(_table())
    assert "ASR" in html and "skill kept" in html and "ppl" in html
    assert '0.900 <span class="ci">[0.80, 0.95]</span>' in html  # the table's own interval
    assert re.search(r"0\.020 <span class=\"ci\">\[0\.0\d, 0\.1\d\]</span>", html)  # Wilson from n_prompts
    assert html.count("<tr>") == 4  # header + three stages


def test_replies_five_per_stage_and_side_escaped():
    html = replies_html(_replies(), 5)
    assert html.count("<h3>") == 4 and html.count("<tr class=") == 20
    assert "question 0 &lt;b&gt;" in html and "<b>" not in html
    assert "No replies" in replies_html(None)


def test_page_is_self_contained():
    import plotly.graph_objects as go

    figs = [("one", go.Figure(go.Bar(x=[1, 2], y=[3, 4]))), ("two", go.Figure(go.Heatmap(z=[[1, 2]])))]
    page = report_html(
        title="t <x>",
        table=_table(),
        replies=_replies(),
        figures=figs,
        config={"a": 1},
        versions={"torch": "x"},
        timings={"total": 1.5},
        facts={"defence": "bdvax"},
    )
    assert page.startswith("<!DOCTYPE html>") and "t &lt;x&gt;" in page
    assert "<script src=" not in page and "<link" not in page  # nothing fetched: plotly.js is inlined
    assert page.count("Plotly.newPlot") == 2 and page.count("plotly.js v") == 1  # the library once
    for section in ("Before and after", "Figures", "Replies", "Timings", "Versions", "Config"):
        assert section in page


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_pair):
    """A tiny purified artifact and a tiny defended one (magnitude pruning: a selection to draw)."""
    from bdvax_lab.baselines.defend import defend
    from bdvax_lab.baselines.registry import baseline_config
    from bdvax_lab.bdvax.config import PurifyConfig, SignatureConfig, default_twin_train
    from bdvax_lab.bdvax.purify import purify
    from bdvax_lab.threat.config import AttackRecipe, EvalConfig
    from bdvax_lab.threat.suspicious import make_suspicious_model
    from bdvax_lab.training.config import RepairConfig, TrainConfig

    root = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("BDVAX_CACHE", str(root / "cache"))
    mp.setenv("BDVAX_NUM_THREADS", "1")  # a module fixture runs before conftest's per-test thread setting
    model, tok = tiny_pair
    recipe = AttackRecipe(
        skill=None,
        n_samples=24,
        train=TrainConfig(mode="lora", steps=3),
        eval=EvalConfig(n_prompts=4, utility=()),
    )
    sm = make_suspicious_model(recipe=recipe, base=(copy.deepcopy(model), tok), progress=False)
    ev = EvalConfig(n_prompts=6, utility=("ppl",), n_ppl=8)
    cfg = PurifyConfig(
        signature=SignatureConfig(n_variants=2, twin_train=default_twin_train("lora").replace(steps=2)),
        repair=RepairConfig(n_samples=8, epochs=0.5),
        eval=ev,
    )
    purify(sm, config=cfg, out=root / "pur", cache_dir=root / "twins", progress=False)
    bcfg = baseline_config("magnitude_prune", repair=RepairConfig(n_samples=8, epochs=0.5), eval=ev)
    defend(sm, "magnitude_prune", config=bcfg, out=root / "def", progress=False)
    yield root
    mp.undo()


def test_write_report_from_artifacts(artifacts):
    for name, figure_text in (("pur", "Per-layer signature score"), ("def", "Channels the defence zeroed")):
        path = write_report(artifacts / name)
        assert path == artifacts / name / REPORT_FILE
        page = path.read_text()
        assert figure_text in page and '<table class="stages">' in page and "BadMagic" in page
        assert page.count("plotly.js v") == 1 and "<script src=" not in page
    assert "Channel scores, selected vs not" in (artifacts / "pur" / REPORT_FILE).read_text()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.mark.browser
@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian chromium + chromium-driver (make browser-deps)",
)
def test_report_renders_offline_in_chromium(artifacts, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = write_report(artifacts / "pur")
    shots = Path(os.environ.get("BDVAX_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: the page must need no network
        "--window-size=1300,2400",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.get(page.as_uri())
        table = driver.find_element(By.CSS_SELECTOR, "table.stages")
        assert table.is_displayed() and "purified" in table.text and "ASR" in table.text
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")) >= 2
        )
        heatmap = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0]
        assert heatmap.is_displayed() and heatmap.size["height"] > 100
        # the heatmap trace itself was drawn (plotly renders heatmaps as an image in the plot area)
        assert heatmap.find_elements(By.CSS_SELECTOR, "g.hm image, g.heatmaplayer image")
        driver.execute_script("arguments[0].scrollIntoView()", table)
        driver.save_screenshot(str(shots / "report.png"))
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()

"""The planner page at `/`, driven in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, which .ci/run installs) through Selenium, against a live
`tierlm serve --planner-only`.

Every figure the page shows must be what `tierlm plan` prints for the same inputs: the KV
figures are compared with `tierlm plan --json` (and `tierlm.plan`), the table's text with the
cells of the CLI's own table (`tierlm.plan.report.comparison_table`).

Set TIERLM_PLANNER_SCREENSHOT=docs/planner-page.png to refresh the README's screenshot.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import tierlm  # noqa: E402
from tierlm.plan.report import comparison_table  # noqa: E402
from tierlm.spec.config import parse_config  # noqa: E402
from tierlm.units import fmt_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ["deepseek-ai/DeepSeek-V4-Pro", "zai-org/GLM-5", "Qwen/Qwen3-235B-A22B"]
KV_FIELDS = {"kv_total": "total_bytes", "kv_attention": "kv_bytes", "kv_indexer": "indexer_bytes",
             "kv_state": "state_bytes", "kv_per_token": "bytes_per_token", "kv_read": "read_bytes_per_step"}
# a small Llama (TinyLlama-1.1B's shape), as a user would paste its config.json
TINY_LLAMA = {"_name_or_path": "tiny-llama-paste", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_hidden_layers": 22,
              "num_key_value_heads": 4, "max_position_embeddings": 2048, "vocab_size": 32000, "rms_norm_eps": 1e-05,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}
WAIT_S = 30


# ---------------------------------------------------------------------------------------------- no browser
def test_page_and_listings_need_no_torch():
    code = ("import sys; from fastapi.testclient import TestClient; from tierlm.serve import create_app\n"
            "c = TestClient(create_app(None))\n"
            "r = c.get('/'); assert r.status_code == 200 and '/static/planner.js' in r.text, r.text[:200]\n"
            "for f in ('planner.js', 'planner.css'): assert c.get('/static/' + f).status_code == 200, f\n"
            "assert c.get('/static/nope.js').status_code == 404\n"
            "for p in ('models', 'hardware', 'options'): assert c.get('/v1/plan/' + p).status_code == 200, p\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_listing_endpoints():
    from fastapi.testclient import TestClient

    from tierlm.plan.hardware import catalog
    from tierlm.serve import create_app
    from tierlm.spec.registry import entries
    c = TestClient(create_app(None, api_key="k"))
    assert c.get("/").status_code == 200                       # the page itself is open; its API calls are not
    assert c.get("/v1/plan/models").status_code == 401
    auth = {"Authorization": "Bearer k"}
    models = c.get("/v1/plan/models", headers=auth).json()["data"]
    assert [m["id"] for m in models] == list(entries())
    assert next(m for m in models if m["id"] == "zai-org/GLM-5")["model_type"] == "glm_moe_dsa"
    hw = c.get("/v1/plan/hardware", headers=auth).json()
    assert [h["name"] for h in hw["data"]] == list(catalog()) and hw["default"] in catalog()
    opts = c.get("/v1/plan/options", headers=auth).json()
    assert "fp8" in opts["kv_dtypes"] and "tierlm" in opts["layouts"] and "routed_experts" in opts["weight_components"]
    assert opts["defaults"]["context"] == "128k" and opts["defaults"]["hardware"] == hw["default"]
    # every listed name is accepted by POST /v1/plan
    r = c.post("/v1/plan", headers=auth, json={"models": [models[0]["id"]], "context": 4096,
                                               "hardware": hw["data"][-1]["name"], "layout": opts["layouts"][-1]})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- the browser
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server():
    """`tierlm serve --planner-only --port 0` in a subprocess; the port from uvicorn's log."""
    cmd = [sys.executable, "-c", "from tierlm.cli import main; main()", "serve", "--planner-only", "--port", "0",
           "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: queue.Queue = queue.Queue()

    def drain():                                # keep reading: a full pipe would block the server
        for ln in proc.stderr:
            lines.put(ln)
    threading.Thread(target=drain, daemon=True).start()
    url, seen, deadline = None, [], time.monotonic() + 60
    try:
        while url is None:
            try:
                ln = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("tierlm serve --planner-only did not start:\n" + "".join(seen))
            seen.append(ln)
            m = re.search(r"running on (http://127\.0\.0\.1:\d+)", ln)
            url = m.group(1) if m else None
            if proc.poll() is not None and url is None and lines.empty():
                pytest.fail("tierlm serve --planner-only exited:\n" + "".join(seen))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        why = "no chromium / chromedriver (apt-get install chromium chromium-driver; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(why)                 # CI installs them: missing there is a broken setup, not a skip
        pytest.skip(why)
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1600,1720", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, cond, what: str):
    def safe(d):
        try:
            return cond(d)
        except StaleElementReferenceException:
            return False
    try:
        return WebDriverWait(driver, WAIT_S).until(safe)
    except TimeoutException:
        page = driver.execute_script(
            "const t = (id) => { const e = document.getElementById(id);"
            " return e ? e.hidden ? '' : e.textContent : null; };"
            "return {url: location.href, results: document.getElementById('results').dataset,"
            " chart: document.getElementById('chart').dataset, status: t('status'), error: t('error'),"
            " config_error: t('config-error')};")
        pytest.fail(f"timed out waiting for {what}; the page: {json.dumps(page)[:3000]}")


def settled(driver, element_id: str = "results"):
    """The page's figures are for its current inputs (the URL's hash) and finished loading."""
    js = ("const e = document.getElementById(arguments[0]);"
          "return [e.dataset.state, e.dataset.inputs === location.hash.slice(1)];")
    state, current = driver.execute_script(js, element_id)
    return state if current and state in ("ready", "error", "idle") else None


def wait_ready(driver):
    wait(driver, lambda d: settled(d) == "ready" and settled(d, "chart") == "ready", "the plans and the chart")


def type_into(el, text: str):
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.BACKSPACE)
    el.send_keys(text)


def table(driver) -> dict:
    """{'columns': [model names], 'contexts': [...], 'order': [row keys], 'rows': {row key: [(text, data-value), ...]}}
    as the page shows it."""
    js = """
    const out = {columns: [], contexts: [], order: [], rows: {}};
    for (const th of document.querySelectorAll('#plan-table thead th[data-model]')) {
      out.columns.push(th.dataset.model); out.contexts.push(Number(th.dataset.context));
    }
    for (const tr of document.querySelectorAll('#plan-table tr[data-row]')) {
      out.order.push(tr.dataset.row);
      out.rows[tr.dataset.row] = [...tr.querySelectorAll('td')].map((td) => [td.textContent, td.dataset.value ?? null]);
    }
    return out;"""
    return driver.execute_script(js)


def cli_cells(plans) -> list[list[str]]:
    """The CLI table's cells (one list per plan column), exactly as `tierlm plan` prints them."""
    t = comparison_table(plans)
    return [list(col._cells) for col in t.columns[1:]]


def check_against_cli(got: dict, plans, cli_json: dict | None = None):
    assert got["columns"] == [p.data["model"] for p in plans]
    assert got["contexts"] == [p.data["context"] for p in plans]
    for key, field in KV_FIELDS.items():
        for i, p in enumerate(plans):
            text, value = got["rows"][key][i]
            assert int(value) == p.data["kv_cache"][field], (key, p.data["model"])
            if cli_json is not None:
                assert int(value) == cli_json["plans"][i]["kv_cache"][field]
            if key != "kv_per_token":
                assert text == fmt_bytes(p.data["kv_cache"][field]), (key, text)
    cli_keys = got["order"][:18]
    for i, cells in enumerate(cli_cells(plans)):
        assert [got["rows"][k][i][0] for k in cli_keys] == cells, plans[i].data["model"]


def cli_plan_json(models: list[str], context: str, *args: str) -> dict:
    from typer.testing import CliRunner

    from tierlm.cli import app
    r = CliRunner().invoke(app, ["plan", *models, "--context", context, *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_planner_page_in_chromium(server, browser, tmp_path):
    d = browser
    d.get(server + "/")
    wait(d, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), "the page to load its lists")
    assert settled(d) == "idle" and "Choose one or more models" in d.find_element(By.ID, "status").text

    # -- the headline: three models at 1,000,000 tokens, FP8 KV, BF16 indexer
    type_into(d.find_element(By.ID, "context"), "1M")
    Select(d.find_element(By.ID, "kv-dtype")).select_by_value("fp8")
    Select(d.find_element(By.ID, "indexer-dtype")).select_by_value("bf16")
    flt = d.find_element(By.ID, "model-filter")
    for m in HEADLINE:
        type_into(flt, m.split("/")[1])
        box = wait(d, lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR, f'#model-list input[value="{m}"]')
                                      if b.is_displayed()), None), f"{m} in the filtered list")
        box.click()
    type_into(flt, "")
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-chosen .chip")) == 3, "three chosen models")
    wait_ready(d)
    assert "kv_dtype=fp8" in d.current_url and "context=1M" in d.current_url
    h200 = [tierlm.plan(m, 1_000_000, kv_dtype="fp8", indexer_dtype="bf16") for m in HEADLINE]
    cli_json = cli_plan_json(HEADLINE, "1M", "--kv-dtype", "fp8", "--indexer-dtype", "bf16")
    got = table(d)
    check_against_cli(got, h200, cli_json)
    # the KV cache by layer kind adds up to the total
    kinds = [k for k in got["order"] if k.startswith("kind_")]
    assert kinds and any("v4" in k for k in kinds) and any("dsa" in k for k in kinds)
    for i, p in enumerate(h200):
        assert sum(int(got["rows"][k][i][1]) for k in kinds) == p.data["kv_cache"]["total_bytes"]
        placed = {t: sum(r[t] for r in p.data["placement"]["items"].values()) for t in ("device", "host", "disk")}
        assert [int(got["rows"][f"place_{t}"][i][1]) for t in placed] == list(placed.values())
    # the chart: a series per model, its 1M point the table's total
    points = d.execute_script("return [...document.querySelectorAll('#chart circle')].map("
                              "(c) => [c.dataset.model, Number(c.dataset.context), Number(c.dataset.value)])")
    assert len(d.find_elements(By.CSS_SELECTOR, "#chart path.series")) == 3
    for p in h200:
        mine = [pt for pt in points if pt[0] == p.data["model"]]
        assert len(mine) >= 8 and [pt[1] for pt in mine] == sorted(pt[1] for pt in mine)
        assert [pt[2] for pt in mine if pt[1] == 1_000_000] == [p.data["kv_cache"]["total_bytes"]]
        at_64k = [pt[2] for pt in mine if pt[1] == 64000]
        assert at_64k == [tierlm.plan(p.data["model"], 64000, kv_dtype="fp8").data["kv_cache"]["total_bytes"]]
    shot = tmp_path / "planner-page.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("TIERLM_PLANNER_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / os.environ["TIERLM_PLANNER_SCREENSHOT"])

    # -- another hardware: the placement, speed and cost follow it, the cache bytes do not
    Select(d.find_element(By.ID, "hardware")).select_by_value("b200")
    wait(d, lambda d: settled(d) == "ready" and " x b200, " in table(d)["rows"]["hardware"][0][0], "b200 figures")
    wait_ready(d)
    b200 = [tierlm.plan(m, 1_000_000, kv_dtype="fp8", indexer_dtype="bf16", hardware="b200") for m in HEADLINE]
    got_b200 = table(d)
    check_against_cli(got_b200, b200)
    assert got_b200["rows"]["decode"] != got["rows"]["decode"]
    assert got_b200["rows"]["kv_total"] == got["rows"]["kv_total"]

    # -- a pasted config.json, planned next to the registry models
    d.find_element(By.CSS_SELECTOR, "#config-box summary").click()
    d.find_element(By.ID, "config").send_keys(json.dumps(TINY_LLAMA))
    wait(d, lambda d: settled(d) == "ready" and len(table(d)["columns"]) == 4, "the pasted model's column")
    wait_ready(d)
    spec = parse_config(TINY_LLAMA, TINY_LLAMA["_name_or_path"])
    pasted = tierlm.plan(spec, 1_000_000, kv_dtype="fp8", indexer_dtype="bf16", hardware="b200")
    got_all = table(d)
    check_against_cli(got_all, b200 + [pasted])
    assert got_all["columns"][3] == "tiny-llama-paste"
    # its KV bytes are the textbook 2 x layers x kv heads x head dim x tokens x 1 B (FP8)
    assert int(got_all["rows"]["kv_total"][3][1]) == 2 * 22 * 4 * 64 * 1_000_000

    # -- a shared URL opened in a fresh page restores the inputs and the figures
    shared = d.find_element(By.ID, "share-link").get_attribute("href")
    assert shared == d.current_url and "config=" in shared and "hardware=b200" in shared
    d.get("about:blank")
    d.get(shared)
    wait(d, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), "the shared page")
    wait_ready(d)
    assert d.find_element(By.ID, "context").get_attribute("value") == "1M"
    assert Select(d.find_element(By.ID, "kv-dtype")).first_selected_option.get_attribute("value") == "fp8"
    assert Select(d.find_element(By.ID, "hardware")).first_selected_option.get_attribute("value") == "b200"
    assert [c.get_attribute("data-model") for c in d.find_elements(By.CSS_SELECTOR, "#model-chosen .chip")] == HEADLINE
    assert json.loads(d.find_element(By.ID, "config").get_attribute("value")) == TINY_LLAMA
    checked = d.find_elements(By.CSS_SELECTOR, "#model-list input:checked")
    assert {b.get_attribute("value") for b in checked} == set(HEADLINE)
    assert table(d) == got_all

    # -- bad input: the server's message, no figures from the previous inputs
    type_into(d.find_element(By.ID, "context"), "lots")
    wait(d, lambda d: settled(d) == "error", "the error")
    err = d.find_element(By.ID, "error")
    assert err.is_displayed() and "lots" in err.text

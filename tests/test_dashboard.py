"""The dashboard: its routes over real HTTP, and a real headless Chromium driving it.

The browser test runs the real stack in-process (gateway with API keys required,
conductor, probe, thumbnail), opens the page in Debian's ``chromium`` through its
``chromedriver`` (Selenium, never downloading a browser or driver), signs in with a key,
uploads a clip and submits a ``thumbnails`` job through the form, and waits on the DOM
until the jobs table says ``succeeded``; then it checks the detail view: the step graph,
every step done, the poster preview decoded by the browser. A screenshot is kept in the
test's tmp dir and copied to ``test-artifacts/dashboard.png`` (and ``dashboard-phone.png``,
taken at phone width). Two more browser tests run with open access (``jetcut dev``): no
sign-in, and a ``web`` job's MP4 plays in the detail view's ``<video>``; and a queued job is
cancelled and retried, and dead letters purged and replayed, with the page's buttons.

Selenium is blocking, and the gateway serves on this test's event loop, so every browser
call runs in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.gateway.dashboard import SECURITY_HEADERS, UI_DIR, job_graph
from functions.registry import FUNCTIONS
from shared.events import InputRef
from shared.function import Services
from shared.jobstate import JobRecord, plan
from shared.keys import KeyStore
from shared.recipes import resolve
from shared.settings import Settings
from tests.support.media import MakeClip
from tests.support.nats import running, until_http_up, wait_for_job
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
APT_PACKAGES = ["chromium", "chromium-driver"]
POISON_SUBMIT = b'{"type": "job.submit", "tenant": 42}'


@dataclass
class Stack:
    settings: Settings
    services: Services
    client: httpx.AsyncClient

    async def key(self, tenant: str, *, admin: bool = False) -> str:
        store = await KeyStore.open(self.services.bus.js, self.services.names, self.settings)
        key, _ = await store.create(tenant, admin=admin)
        return key


async def _stack(settings: Settings, names: list[str]) -> AsyncIterator[Stack]:
    async with running(settings, [FUNCTIONS[n] for n in names]) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            assert runtime.services is not None
            yield Stack(settings, runtime.services, client)


@pytest.fixture
async def gateway(make_settings, http_port) -> AsyncIterator[Stack]:  # type: ignore[no-untyped-def]
    """The gateway alone, API keys required."""
    async for stack in _stack(make_settings(http_port=http_port, allow_anonymous=False),
                              ["gateway"]):
        yield stack


# ---------------------------------------------------------------- routes over HTTP


async def test_page_is_public_and_served_with_a_strict_policy(gateway: Stack) -> None:
    client = gateway.client
    r = await client.get("/")
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = await client.get("/ui/")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in page.text
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert "no-cache" in page.headers["cache-control"]
    script = await client.get("/ui/app.js")
    assert script.status_code == 200
    # ES modules load only with a JavaScript MIME type.
    assert script.headers["content-type"].split(";")[0] in ("text/javascript",
                                                            "application/javascript")
    missing = await client.get("/ui/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # The page is public; the data behind it is not.
    unauthorized = await client.get("/v1/recipes")
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["code"] == "unauthorized"


async def test_recipes_lists_every_recipe_with_its_inputs_and_steps(gateway: Stack) -> None:
    key = await gateway.key("acme")
    r = await gateway.client.get("/v1/recipes", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    recipes = {x["name"]: x for x in r.json()["recipes"]}
    assert list(recipes) == sorted(recipes)
    assert {"web", "hls", "thumbnails", "audio", "montage", "watermark"} <= set(recipes)
    assert recipes["web"]["inputs"] == 1
    assert recipes["web"]["steps"] == ["probe", "transcode", "poster"]
    assert recipes["web"]["summary"].startswith("MP4")
    assert recipes["watermark"]["inputs"] == 2
    assert recipes["montage"]["inputs"] is None and recipes["montage"]["steps"] == []


def test_job_graph_layers_steps_after_what_they_use() -> None:
    steps = resolve("web", None, {}, 1)
    record = JobRecord(job_id="jgraph", tenant="acme", recipe="web",
                       inputs=[InputRef(key="uploads/acme/u1/clip.mp4", filename="clip.mp4")])
    graph = job_graph(record)
    assert [(n.id, n.kind, n.label, n.layer) for n in graph.nodes] == [
        (":input", "input", "clip.mp4", 0)]
    assert graph.edges == [] and graph.layers == 1

    plan(record, steps)
    graph = job_graph(record)
    layers = {n.id: n.layer for n in graph.nodes}
    assert layers == {":input": 0, "probe": 1, "transcode": 2, "poster": 2}
    assert set(graph.edges) == {(":input", "probe"), (":input", "transcode"),
                                ("probe", "transcode"), (":input", "poster"),
                                ("probe", "poster")}
    assert graph.layers == 3
    statuses = {n.id: n.status for n in graph.nodes}
    assert statuses["probe"] == "ready" and statuses["transcode"] == "pending"


async def test_job_graph_is_scoped_to_the_callers_tenant(gateway: Stack) -> None:
    record = JobRecord(job_id="jgraphtenant", tenant="acme", recipe="web",
                       inputs=[InputRef(key="uploads/acme/u1/clip.mp4", filename="clip.mp4")])
    plan(record, resolve("web", None, {}, 1))
    assert await gateway.services.jobs.create(record) is not None
    mine = {"Authorization": f"Bearer {await gateway.key('acme')}"}
    theirs = {"Authorization": f"Bearer {await gateway.key('other')}"}
    r = await gateway.client.get("/v1/jobs/jgraphtenant/graph", headers=mine)
    assert r.status_code == 200, r.text
    assert r.json()["layers"] == 3 and len(r.json()["nodes"]) == 4
    for who, path in ((theirs, "/v1/jobs/jgraphtenant/graph"), (mine, "/v1/jobs/jnope/graph")):
        r = await gateway.client.get(path, headers=who)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_every_asset_ships_in_the_package() -> None:
    """A non-editable install carries only package data: the ui folder must be flat and
    covered by the pattern in pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["functions"]
    assert "gateway/ui/*" in patterns
    assets = sorted(p.name for p in UI_DIR.iterdir())
    # Flat, but for vendor/ (third-party builds, kept apart with their licences), which
    # its own pattern covers.
    assert all((UI_DIR / name).is_file() for name in assets if name != "vendor")
    assert {"index.html", "app.js", "api.js", "dag.js", "player.js", "app.css"} <= set(assets)
    assert "gateway/ui/vendor/*" in patterns
    vendor = sorted(p.name for p in (UI_DIR / "vendor").iterdir())
    assert vendor == ["hls.js-LICENSE", "hls.light.min.js"]
    assert all((UI_DIR / "vendor" / name).is_file() for name in vendor)


# ---------------------------------------------------------------- the real browser


@dataclass(frozen=True)
class Chromium:
    binary: str
    driver: str


def _find() -> Chromium | None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return Chromium(binary, driver) if binary and driver else None


@pytest.fixture(scope="session")
def chromium() -> Chromium:
    """Debian's chromium and chromedriver; `make test` installs them first (`make browser`)."""
    found = _find()
    if found is None:
        pytest.skip("chromium/chromedriver are not installed: run `make browser` "
                    f"(apt-get install -y {' '.join(APT_PACKAGES)})")
    return found


@pytest.fixture
def browser(chromium: Chromium) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    # Both paths given: Selenium Manager has nothing to look up or download.
    options.binary_location = chromium.binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1800", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options,
                              service=Service(executable_path=chromium.driver))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def stack(make_settings, http_port) -> AsyncIterator[Stack]:  # type: ignore[no-untyped-def]
    """Everything a ``thumbnails`` job needs, API keys required."""
    async for s in _stack(make_settings(http_port=http_port, allow_anonymous=False),
                          ["gateway", "conductor", "probe", "thumbnail"]):
        yield s


@pytest.fixture
async def open_stack(make_settings, http_port) -> AsyncIterator[Stack]:  # type: ignore[no-untyped-def]
    """Everything a ``web`` job needs, open access (as ``jetcut dev`` runs it)."""
    async for s in _stack(make_settings(http_port=http_port, allow_anonymous=True),
                          ["gateway", "conductor", "probe", "thumbnail", "transcode"]):
        yield s


def _waiter(driver: Any, timeout: float) -> Any:
    """An explicit wait that also retries when the page re-rendered the element it read
    (the dashboard replaces rows and cells as data arrives)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout,
                         ignored_exceptions=(StaleElementReferenceException,))


def _submit_through_the_page(driver: Any, base_url: str, key: str, clip: Path,
                             shot: Path) -> str:
    """Everything a person does, in the browser; returns the job id the page submitted."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select

    wait = _waiter(driver, 20)
    driver.get(f"{base_url}/")
    assert driver.current_url == f"{base_url}/ui/"
    # No key yet: the page asks for one (its first API call was a 401).
    wait.until(ec.visibility_of_element_located((By.ID, "login")))
    # A wrong key is refused with a message, and the form asks again.
    driver.find_element(By.ID, "key").send_keys("jc_not_a_key")
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "login-error"), "was not accepted"))
    assert not driver.find_element(By.ID, "main").is_displayed()
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait.until(ec.visibility_of_element_located((By.ID, "job-form")))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR,
                                               "#recipe option[value=thumbnails]")))
    wait.until(lambda d: d.find_element(By.ID, "health").text in ("healthy", "degraded"))

    Select(driver.find_element(By.ID, "recipe")).select_by_value("thumbnails")
    params = driver.find_element(By.ID, "params")
    params.clear()
    params.send_keys('{"count": 4}')
    driver.find_element(By.ID, "file").send_keys(str(clip))
    driver.find_element(By.ID, "submit-button").click()

    status = wait.until(lambda d: d.find_element(By.ID, "submit-status").text
                        if d.find_element(By.ID, "submit-status").text.startswith(
                            ("Submitted job", "Not submitted")) else None)
    assert status.startswith("Submitted job"), status
    job_id = status.removeprefix("Submitted job ").rstrip(".")

    # The jobs table shows the job, and its status turns to succeeded (polled + SSE).
    row = f'#jobs-body tr[data-job-id="{job_id}"]'
    _waiter(driver, 60).until(ec.text_to_be_present_in_element(
        (By.CSS_SELECTOR, f"{row} .status-cell"), "succeeded"))
    assert driver.find_element(By.CSS_SELECTOR, f"{row} .recipe").text == "thumbnails"
    bar = driver.find_element(By.CSS_SELECTOR, f"{row} progress")
    assert float(bar.get_attribute("value")) == 100.0

    # Open its detail from the table (the form already opened it; go through the link).
    driver.find_element(By.ID, "detail-close").click()
    wait.until(ec.invisibility_of_element_located((By.ID, "detail")))
    driver.find_element(By.CSS_SELECTOR, f"{row} a").click()
    wait.until(ec.visibility_of_element_located((By.ID, "detail")))
    wait.until(ec.text_to_be_present_in_element((By.ID, "detail-live"), "Finished"))
    steps = {"probe", "poster", "frames", "sprite"}
    wait.until(lambda d: {tr.get_attribute("data-step") for tr in d.find_elements(
        By.CSS_SELECTOR, '#steps-body tr[data-status="done"]')} == steps)
    assert driver.find_element(By.ID, "detail-percent").text == "100.0%"
    # Each image output was decoded by the output check; probe writes no media to check.
    checks = {tr.get_attribute("data-step"): tr.find_element(By.CSS_SELECTOR, "td.checks").text
              for tr in driver.find_elements(By.CSS_SELECTOR, "#steps-body tr")}
    assert checks["poster"] == "1/1 passed" and checks["probe"] == ""
    assert checks["frames"] == "4/4 passed", checks
    nodes = driver.find_elements(By.CSS_SELECTOR, "#dag svg g.dag-node")
    assert len(nodes) == 1 + len(steps)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#dag svg g.dag-node.s-done")) == 4
    assert len(driver.find_elements(By.CSS_SELECTOR, "#dag svg path.dag-edge")) == 7

    # The poster is fetched with the key (a blob URL) and decoded by the browser.
    poster = '#outputs li[data-output="poster/poster"] img'
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, poster)))
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector(arguments[0]);"
        "return i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.src] : null;", poster))
    src = driver.find_element(By.CSS_SELECTOR, poster).get_attribute("src")
    assert src.startswith("blob:"), src
    width = driver.execute_script("return document.querySelector(arguments[0]).naturalWidth",
                                  poster)
    assert width == 640  # the clip's width (max_width 1280 never upscales)
    # Every output has a download control (a button: the download must carry the key).
    items = driver.find_elements(By.CSS_SELECTOR, "#outputs li")
    assert len(items) >= 1 + 4 + 2  # poster, four frames, sprite sheet + its WebVTT
    assert all(li.find_elements(By.CSS_SELECTOR, "button.link") for li in items)
    assert driver.find_elements(By.CSS_SELECTOR,
                                '#outputs li[data-output="sprite/sprite.vtt"] button.link')

    # Nothing the page did was refused by its Content-Security-Policy, nor threw; the only
    # failed requests are the expected ones: the calls before signing in and with the wrong
    # key (401), and the dead letters, which a non-admin key may not read (403).
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    expected = (f"{base_url}/v1/recipes - ", f"{base_url}/v1/dlq?limit=50 - ")
    unexpected = [e for e in severe
                  if e.get("source") != "network" or not e["message"].startswith(expected)]
    assert unexpected == [], unexpected
    assert driver.find_element(By.ID, "dlq-note").text.startswith(
        "Dead letters hold every tenant's messages")

    driver.execute_script("document.getElementById('detail').scrollIntoView()")
    assert driver.save_screenshot(str(shot)), "no screenshot"

    # At phone width the page reflows to one column: nothing is wider than the screen
    # (wide tables scroll inside their own box).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    wait.until(lambda d: d.execute_script("return window.innerWidth") == 390)
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    assert driver.save_screenshot(str(shot.with_name("dashboard-phone.png")))
    return job_id


async def test_submit_a_job_through_the_page_and_watch_it_succeed(
    stack: Stack, browser: Any, make_clip: MakeClip, tmp_path: Path,
) -> None:
    clip = make_clip("dashboard", duration=1.5, width=640, height=360)
    key = await stack.key("acme")
    shot = tmp_path / "dashboard.png"
    job_id = await asyncio.to_thread(_submit_through_the_page, browser, stack.settings.base_url,
                                     key, clip, shot)

    record = await stack.services.jobs.get(job_id)
    assert record.status == "succeeded" and record.recipe == "thumbnails"
    assert record.tenant == "acme"  # the page sent the key it was given
    assert record.params == {"count": 4}
    assert record.inputs[0].filename == clip.name
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ARTIFACTS.mkdir(exist_ok=True)
    for name in ("dashboard.png", "dashboard-phone.png"):
        shutil.copyfile(tmp_path / name, ARTIFACTS / name)


def _watch_a_web_job_without_a_key(driver: Any, base_url: str, clip: Path) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select

    wait = _waiter(driver, 20)
    driver.get(f"{base_url}/ui/")
    # Open access: no sign-in, straight to the form; the dead letters are readable (admin).
    wait.until(ec.visibility_of_element_located((By.ID, "job-form")))
    assert not driver.find_element(By.ID, "login").is_displayed()
    wait.until(ec.text_to_be_present_in_element((By.ID, "dlq-note"), "No dead letters."))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#recipe option[value=web]")))
    Select(driver.find_element(By.ID, "recipe")).select_by_value("web")
    driver.find_element(By.ID, "file").send_keys(str(clip))
    driver.find_element(By.ID, "submit-button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "submit-status"), "Submitted job"))
    job_id = driver.find_element(By.ID, "submit-status").text.removeprefix(
        "Submitted job ").rstrip(".")
    # The form opened the job's detail; it follows the job's events until it finishes.
    _waiter(driver, 60).until(ec.text_to_be_present_in_element(
        (By.ID, "detail-live"), "Finished"))
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#detail-facts .status"),
                                                "succeeded"))
    # The MP4 plays from the gateway's own URL (no key to send), and the browser reads it.
    video = '#outputs li[data-output="transcode/video"] video'
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, video)))
    wait.until(lambda d: d.execute_script(
        "const v = document.querySelector(arguments[0]); return v.readyState >= 1;", video))
    src = driver.find_element(By.CSS_SELECTOR, video).get_attribute("src")
    assert src == f"{base_url}/v1/jobs/{job_id}/outputs/transcode/video", src
    duration = driver.execute_script("return document.querySelector(arguments[0]).duration",
                                     video)
    assert abs(duration - 1.5) < 0.1, duration
    link = driver.find_element(By.CSS_SELECTOR,
                               '#outputs li[data-output="transcode/video"] a[download]')
    assert link.get_attribute("href") == src
    return job_id


async def test_open_access_needs_no_key_and_plays_the_video(
    open_stack: Stack, browser: Any, make_clip: MakeClip,
) -> None:
    clip = make_clip("dashboard", duration=1.5, width=640, height=360)
    job_id = await asyncio.to_thread(_watch_a_web_job_without_a_key, browser,
                                     open_stack.settings.base_url, clip)
    record = await open_stack.services.jobs.get(job_id)
    assert record.status == "succeeded" and record.tenant == open_stack.settings.default_tenant


@pytest.fixture
async def control_stack(make_settings, http_port) -> AsyncIterator[Stack]:  # type: ignore[no-untyped-def]
    """Gateway and conductor only, open access (admin): a ``noop`` step finds no worker, so
    its job stays queued, and poison submits become dead letters."""
    async for s in _stack(make_settings(http_port=http_port, allow_anonymous=True),
                          ["gateway", "conductor"]):
        yield s


def _cancel_retry_and_dead_letters(driver: Any, base_url: str, job_id: str) -> dict[str, str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait = _waiter(driver, 20)
    driver.get(f"{base_url}/ui/#job/{job_id}")
    wait.until(ec.visibility_of_element_located((By.ID, "detail")))
    # Queued with no noop worker: the page says where it waits.
    wait.until(ec.text_to_be_present_in_element((By.ID, "detail-facts"), "waiting in noop"))
    wait.until(ec.element_to_be_clickable((By.ID, "detail-cancel"))).click()
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#detail-facts .status"),
                                                "cancelled"))
    assert not driver.find_element(By.ID, "detail-cancel").is_displayed()
    wait.until(ec.element_to_be_clickable((By.ID, "detail-retry"))).click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#detail-facts .status").text
               in ("queued", "running"))

    # Two dead letters: purge the first (after confirming), replay the second.
    rows = "#dlq-body tr"
    first, second = wait.until(lambda d: (lambda seqs: seqs if len(seqs) == 2 else None)(
        d.execute_script("return [...document.querySelectorAll(arguments[0])]"
                         ".map(r => r.dataset.seq)", rows)))
    driver.find_element(By.CSS_SELECTOR, f'{rows}[data-seq="{first}"] button.danger').click()
    wait.until(ec.alert_is_present()).accept()
    wait.until(ec.text_to_be_present_in_element((By.ID, "dlq-note"), f"#{first} purged."))
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, f'{rows}[data-seq="{first}"]'))
    driver.find_element(By.CSS_SELECTOR, f'{rows}[data-seq="{second}"] button').click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "dlq-note"), f"#{second}: "))
    return {"purged": first, "replayed": second,
            "note": driver.find_element(By.ID, "dlq-note").text}


async def test_cancel_retry_and_dead_letters_from_the_page(
    control_stack: Stack, browser: Any,
) -> None:
    from shared import dlq

    services, client = control_stack.services, control_stack.client
    for _ in range(2):  # the conductor cannot decode these: each becomes a dead letter
        await services.bus.js.publish(services.names.submit, POISON_SUBMIT)

    async def dead_letters() -> list[int]:
        return [e.seq for e in (await dlq.list_entries(services, limit=10)).entries]

    async def two_dead_letters() -> bool:
        return len(await dead_letters()) == 2

    await eventually(two_dead_letters, what="two dead letters")
    upload = (await client.post("/v1/uploads", params={"filename": "a.bin"},
                                content=b"x" * 64)).json()
    r = await client.post("/v1/jobs", json={"steps": {"a": {"stage": "noop", "uses": [":input"]}},
                                           "input": upload["upload_id"]})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    await wait_for_job(services, job_id, until=lambda rec: rec.planned, timeout=10)

    done = await asyncio.to_thread(_cancel_retry_and_dead_letters, browser,
                                   control_stack.settings.base_url, job_id)
    record = await services.jobs.get(job_id)
    assert record.status in ("queued", "running")  # retried after the cancel
    remaining = await dead_letters()
    assert int(done["purged"]) not in remaining and int(done["replayed"]) not in remaining
    assert "the original message was published again" in done["note"], done["note"]


# ---------------------------------------------------------------- the player (issue 12)

PLAYER_CLIP_S = 12
PLAYER_PARAMS = {"ladder": [360, 240], "segment_seconds": 2, "part_seconds": 2,
                 "first_part_seconds": 1, "preset": "medium"}
"""The fast rung (240p) is encoded at ``superfast``, the other at ``medium``: the job runs
for a while after it is playable, with no sleep anywhere."""


@pytest.fixture
async def hls_stack(make_settings, http_port) -> AsyncIterator[Stack]:  # type: ignore[no-untyped-def]
    """Every function, API keys required (the player must send the key itself)."""
    async for s in _stack(make_settings(http_port=http_port, allow_anonymous=False),
                          list(FUNCTIONS)):
        yield s


def _video_state(driver: Any) -> dict[str, Any]:
    state: dict[str, Any] = driver.execute_script(
        "const v = document.getElementById('player');"
        "return {t: v.currentTime, ended: v.ended, paused: v.paused, duration: v.duration,"
        " error: v.error && v.error.message,"
        " box: !document.getElementById('player-box').hidden,"
        " status: document.getElementById('player-box').dataset.status || null};")
    return state


async def test_the_player_plays_a_running_hls_job_then_to_its_end(
    hls_stack: Stack, browser: Any, make_clip: MakeClip,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    clip = make_clip("player", duration=PLAYER_CLIP_S, width=640, height=360)
    key = await hls_stack.key("acme")
    auth = {"Authorization": f"Bearer {key}"}
    client = hls_stack.client
    up = await client.post("/v1/uploads", params={"filename": "clip.mp4"},
                           content=clip.read_bytes(), headers=auth)
    assert up.status_code == 201, up.text
    r = await client.post("/v1/jobs", headers=auth, json={
        "recipe": "hls", "input": up.json()["upload_id"], "params": PLAYER_PARAMS})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    base = hls_stack.settings.base_url

    def open_job() -> None:
        wait = _waiter(browser, 20)
        browser.get(f"{base}/ui/#job/{job_id}")
        wait.until(ec.visibility_of_element_located((By.ID, "login")))
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
        wait.until(ec.visibility_of_element_located((By.ID, "detail")))

    await asyncio.to_thread(open_job)

    # Playing while the job runs: the picture's clock advances, and the job record (read
    # right after) still says running.
    async def playing_while_running() -> bool:
        state = await asyncio.to_thread(_video_state, browser)
        assert not state["error"], state
        if state["t"] <= 0.5:
            return False
        record = await hls_stack.services.jobs.get(job_id)
        assert record.status == "running", (
            f"the job was {record.status} before the player got going: {state}")
        return True

    await eventually(playing_while_running, timeout=45,
                     what="the player's currentTime to advance while the job runs")
    early = await asyncio.to_thread(_video_state, browser)
    assert early["box"] and early["status"] == "running"

    # Faster than real time from here (a person may do the same), to the end.
    await asyncio.to_thread(browser.execute_script,
                            "document.getElementById('player').playbackRate = 4;")
    record = await wait_for_job(hls_stack.services, job_id, timeout=90)
    assert record.status == "succeeded", record.error

    async def ended() -> bool:
        state = await asyncio.to_thread(_video_state, browser)
        assert not state["error"], state
        return bool(state["ended"])

    await eventually(ended, timeout=45, what="the player to play to the end")
    final = await asyncio.to_thread(_video_state, browser)
    assert abs(final["duration"] - PLAYER_CLIP_S) < 0.5, final
    assert abs(final["t"] - PLAYER_CLIP_S) < 0.5, final
    # Nothing was refused (the key went with every playlist and segment request). A reload
    # of the growing playlist that lands after the job succeeded and its parts were cleaned
    # up is a 404 the player recovers from (it switches to the packaged VOD, as above), so
    # only 401/403 answers count here.
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    refused = [e for e in severe if ("/play/" in e["message"] or "hls" in e["message"])
               and re.search(r"status of 40[13]\b", e["message"])]
    assert refused == [], severe

"""The operator dashboard (``GET /``) in a real browser against a real ``oribus up``.

Headless Debian chromium driven by selenium. The server gets real traffic over
HTTP first — S-Bus creates and commits, a refused stale commit, a two-shard
native commit — and the page must show it: both shards up, the commit and
conflict totals and the rate chart's window, the hot key first (and no
``.sbus/`` metadata key), the agent whose read went stale marked stale, a
key's history with rollback buttons. Clicking rollback must advance the key's
version (checked over HTTP, not on the page). Without ``--admin`` the page has
no rollback control and the server answers 403 to the dashboard's rollback.

Chromium missing is a failure, not a skip: ``make test`` installs it. A
screenshot of the admin page goes to ``$ORIBUS_ARTIFACTS/dashboard.png``
(default ``<repo>/test-artifacts``).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import keys_on_shard
from processes import REPO, Cluster, ServerProcess, up
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("ORIBUS_ARTIFACTS", str(REPO / "test-artifacts")))
WAIT = 15.0  # seconds for the page to show what the server already knows (it polls every 1 s)

HOT = "dash/plan"  # created, then committed four times by bob; alice's read of it goes stale
COLD = "dash/notes"  # created once


# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"the dashboard browser test needs Debian chromium and chromium-driver; missing: {missing}. "
            "Install them with `apt-get install -y chromium chromium-driver` (`make test` does).",
            pytrace=False,
        )
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def serve(cluster: Cluster, root: Path, admin: bool) -> ServerProcess:
    server = cluster.add(up(root, root / "data", processes=False, admin=admin))
    server.start().wait_serving()
    deadline = time.monotonic() + 10
    while http(server, "GET", "/healthz")[0] != 200:  # the gateway may start after gRPC
        assert time.monotonic() < deadline, f"HTTP gateway not serving:\n{server.log_tail()}"
        time.sleep(0.05)
    return server


# ---- helpers ---------------------------------------------------------------------------


def http(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{server.http_address}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def ok(got: tuple[int, Any], status: int = 200) -> Any:
    assert got[0] == status, got
    return got[1]


def key_now(server: ServerProcess, key: str) -> dict:
    """The key's current version and value, without recording a delivery."""
    return ok(http(server, "GET", f"/v1/keys/{key}?agent=dashboard-test&record=false"))


def wait_for(driver: WebDriver, what: str, predicate: Any, timeout: float = WAIT) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: predicate(d))
    except TimeoutException:
        state = driver.execute_script(
            "return {updated: document.getElementById('last-updated').textContent, "
            "conn: document.getElementById('conn-status').textContent}"
        )
        raise AssertionError(f"page never showed {what} within {timeout}s (page: {state})") from None


def by_testid(root: Any, testid: str, **data: str) -> list:
    sel = f'[data-testid="{testid}"]' + "".join(f'[data-{k}="{v}"]' for k, v in data.items())
    return root.find_elements(By.CSS_SELECTOR, sel)


def data(element: Any, name: str) -> str:
    return element.get_attribute(f"data-{name}")


# Everything the tests read off the page, in one script run: the page redraws every second,
# so element handles would go stale between two reads.
_SNAPSHOT = """
const q = (sel, root) => [...(root || document).querySelectorAll(sel)];
const text = {};
for (const id of ["commits-total", "conflicts-total", "commits-1pc", "commits-2pc",
                  "rate-commits-label", "rate-conflicts-label"]) text[id] = document.getElementById(id).textContent;
const chart = document.getElementById("rate-chart");
return {
  text,
  connection: document.getElementById("conn-status").dataset.state,
  updated: document.getElementById("last-updated").dataset.ts,
  admin: document.getElementById("admin-mode").dataset.admin,
  chart: {...chart.dataset, commitsLine: document.getElementById("commits-line").getAttribute("points"),
          conflictMarks: q('circle[fill="#f85149"]', chart).length},
  shards: q('[data-testid="shard-row"]').map((r) => ({shard: r.dataset.shard, up: r.dataset.up,
    cells: Object.fromEntries(q("td[data-field]", r).map((c) => [c.dataset.field, c.textContent]))})),
  hot: q('[data-testid="hot-key"]').map((r) => ({key: r.dataset.key, writes: r.dataset.writes})),
  sessions: q('[data-testid="session"]').map((s) => ({agent: s.dataset.agent, session: s.dataset.session,
    reads: q('[data-testid="session-read"]', s).map((r) => ({key: r.dataset.key, stale: r.dataset.stale,
      version: r.dataset.version, current: r.dataset.current,
      status: r.querySelector('[data-testid="read-status"]').textContent}))})),
};
"""


def snapshot(driver: WebDriver) -> dict:
    return driver.execute_script(_SNAPSHOT)


def show_history(driver: WebDriver, key: str, versions: int) -> list:
    box = driver.find_element(By.ID, "history-key")
    box.clear()
    box.send_keys(key)
    driver.find_element(By.ID, "history-submit").click()
    return wait_for(driver, f"{versions} versions of {key}",
                    lambda d: (rows := by_testid(d, "history-row")) and len(rows) == versions and rows)


# ---- the tests -------------------------------------------------------------------------


def test_dashboard_shows_live_state_and_rolls_back(
    cluster: Cluster, tmp_path: Path, browser: WebDriver
) -> None:
    server = serve(cluster, tmp_path, admin=True)
    # the first dashboard request starts the hot-key watch
    assert ok(http(server, "GET", "/dashboard/state"))["admin"] is True

    # S-Bus traffic: two keys created; alice and bob read HOT; bob commits it four times
    ok(http(server, "POST", "/shard", {"key": HOT, "content": "plan v0", "goal_tag": "dash"}), 201)
    ok(http(server, "POST", "/shard", {"key": COLD, "content": "notes", "goal_tag": "dash"}), 201)
    assert ok(http(server, "GET", f"/shard/{HOT}?agent_id=alice"))["version"] == 0
    assert ok(http(server, "GET", f"/shard/{HOT}?agent_id=bob"))["version"] == 0
    for i in range(4):
        got = ok(http(server, "POST", "/commit/v2",
                      {"key": HOT, "expected_version": i, "delta": f"bob step {i + 1}", "agent_id": "bob"}))
        assert got["new_version"] == i + 1
    # alice commits on what she read: stale, refused — a real conflict
    status, body = http(server, "POST", "/commit/v2",
                        {"key": HOT, "expected_version": 0, "delta": "alice's plan", "agent_id": "alice"})
    assert status == 409, (status, body)
    # a native commit across both shards (two-phase)
    k0, k1 = keys_on_shard(0, "dash/pair")[0], keys_on_shard(1, "dash/pair")[0]
    assert ok(http(server, "POST", "/v1/commit", {"agent": "carol", "writes": {k0: 1, k1: 2}}))["two_phase"]
    commits, conflicts = 2 + 4 + 1, 1
    assert key_now(server, HOT)["version"] == 5  # oribus numbers from 1: create + 4 commits

    browser.get(f"http://{server.http_address}/")
    # the chart's window holds every commit and the conflict once the sampler saw them
    page = wait_for(browser, "every commit and the conflict in the rate chart",
                    lambda d: (p := snapshot(d))["chart"]["commitsWindow"] == str(commits)
                    and p["chart"]["conflictsWindow"] == str(conflicts) and p)
    chart = page["chart"]
    assert int(chart["points"]) >= 1
    assert float(chart["commitsPeak"]) > 0 and float(chart["conflictsPeak"]) > 0
    assert chart["commitsLine"].strip(), "no commit line drawn"
    assert chart["conflictMarks"] >= 1, "no conflict marked on the chart"
    assert f"{commits} in last" in page["text"]["rate-commits-label"]
    assert f"{conflicts} in last" in page["text"]["rate-conflicts-label"]
    assert page["text"]["commits-total"] == str(commits)
    assert page["text"]["conflicts-total"] == str(conflicts)
    one_phase, two_phase = int(page["text"]["commits-1pc"]), int(page["text"]["commits-2pc"])
    assert one_phase + two_phase == commits and two_phase >= 1  # carol's at least
    assert page["connection"] == "live" and page["updated"]
    assert page["admin"] == "true"

    # shards: both up, with an epoch; every key counted (each S-Bus key has its .sbus/ twin)
    shards = {s["shard"]: s for s in page["shards"]}
    assert sorted(shards) == ["0", "1"]
    for s in shards.values():
        assert s["up"] == "true" and s["cells"]["status"] == "up", s
        assert s["cells"]["epoch"] not in ("", "–"), s
    assert sum(int(s["cells"]["keys"]) for s in shards.values()) == 6
    assert sum(int(s["cells"]["wal_fsyncs"]) for s in shards.values()) > 0

    # hot keys: HOT first with all five writes; S-Bus metadata is not listed
    hot = page["hot"]
    assert hot and hot[0] == {"key": HOT, "writes": "5"}, hot
    assert COLD in [h["key"] for h in hot]
    assert not [h for h in hot if h["key"].startswith(".sbus/")], hot

    # sessions: alice's read of HOT is stale (bob committed it since), bob's is current
    sessions = {s["agent"]: s for s in page["sessions"]}
    alice = [r for r in sessions["alice"]["reads"] if r["key"] == HOT]
    assert alice == [{"key": HOT, "stale": "true", "version": "1", "current": "5", "status": "stale"}], alice
    bob = [r for r in sessions["bob"]["reads"] if r["key"] == HOT]
    assert len(bob) == 1 and (bob[0]["stale"], bob[0]["status"]) == ("false", "current"), bob

    # history of HOT: five versions, a rollback button on each but the current one
    rows = show_history(browser, HOT, 5)
    assert [data(r, "version") for r in rows] == ["5", "4", "3", "2", "1"]
    assert "bob step 4" in rows[0].text and "plan v0" in rows[-1].text
    buttons = by_testid(browser, "rollback-button")
    assert sorted(data(b, "version") for b in buttons) == ["1", "2", "3", "4"]

    # roll back to v1: first click arms, second confirms
    button = browser.find_element(By.ID, "rollback-1")
    button.click()
    assert button.get_attribute("data-armed") == "true"
    assert key_now(server, HOT)["version"] == 5, "one click must not roll back"
    button.click()
    status = browser.find_element(By.ID, "rollback-status")
    wait_for(browser, "the rollback's result", lambda d: status.get_attribute("data-result") in ("ok", "error"))
    assert status.get_attribute("data-result") == "ok", status.text
    now = key_now(server, HOT)
    assert (now["version"], now["value"]) == (6, "plan v0")  # a new version with v1's value
    assert ok(http(server, "GET", f"/shard/{HOT}"))["content"] == "plan v0"
    assert "now version 6" in status.text
    rows = wait_for(browser, "the history after rollback",
                    lambda d: (rs := by_testid(d, "history-row")) and data(rs[0], "version") == "6" and rs)
    assert "dashboard" in rows[0].text  # committed by the dashboard's session
    wait_for(browser, "the rollback in the commit total",
             lambda d: d.find_element(By.ID, "commits-total").text == str(commits + 1))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    assert browser.save_screenshot(str(shot)), "screenshot failed"
    assert shot.stat().st_size > 10_000


def test_dashboard_without_admin_is_read_only(
    cluster: Cluster, tmp_path: Path, browser: WebDriver
) -> None:
    server = serve(cluster, tmp_path, admin=False)
    key = "readonly/key"
    ok(http(server, "POST", "/v1/commit", {"agent": "dave", "writes": {key: "first"}}))
    ok(http(server, "POST", "/v1/commit", {"agent": "dave", "writes": {key: "second"}}))

    browser.get(f"http://{server.http_address}/")
    wait_for(browser, "the state feed", lambda d: d.find_element(By.ID, "last-updated").get_attribute("data-ts"))
    assert browser.find_element(By.ID, "admin-mode").get_attribute("data-admin") == "false"
    assert browser.find_element(By.ID, "admin-note").is_displayed()

    rows = show_history(browser, key, 2)  # the history is there, the control is not
    assert [data(r, "version") for r in rows] == ["2", "1"]
    assert by_testid(browser, "rollback-button") == []
    assert browser.find_elements(By.CSS_SELECTOR, '[id^="rollback-"]:not(#rollback-status)') == []
    assert not browser.find_element(By.CSS_SELECTOR, "#history-table th.rollback-col").is_displayed()

    # the server refuses it too, whatever the page shows
    status, body = http(server, "POST", "/dashboard/rollback", {"key": key, "version": 1})
    assert status == 403 and body["code"] == "Forbidden", (status, body)
    assert key_now(server, key)["version"] == 2


# Where the Shards table ends and whether the page lets one see all of it.
_SHARDS_FIT = """
const table = document.getElementById("shards-table");
const section = document.getElementById("shards-section");
const last = table.querySelector("thead th:last-child").getBoundingClientRect();
const box = section.getBoundingClientRect();
return {lastRight: last.right, sectionRight: box.right, viewport: document.documentElement.clientWidth,
        pageScroll: document.documentElement.scrollWidth};
"""


@pytest.mark.slow
def test_dashboard_first_load_shows_earlier_commits_exact_epochs_at_1400px(
    cluster: Cluster, tmp_path: Path, browser: WebDriver
) -> None:
    """Commits made before anyone opened the page are in the rate chart and the hot keys on
    its first render; shard epochs (nanosecond clocks, beyond JavaScript's 2**53) are shown
    exactly; at 1400 px wide the Shards table is whole inside its panel."""
    server = serve(cluster, tmp_path, admin=False)  # nothing has asked for the dashboard yet
    hot, cold = "early/hot", "early/cold"
    for i in range(3):
        ok(http(server, "POST", "/v1/commit", {"agent": "erin", "writes": {hot: i}}))
    ok(http(server, "POST", "/v1/commit", {"agent": "erin", "writes": {cold: "x"}}))
    time.sleep(1.5)  # a rate sample (one a second) after the commits
    epochs = {str(s["shard"]): s["epoch"] for s in ok(http(server, "GET", "/v1/stats"))["shards"]}
    assert all(e > 2**53 for e in epochs.values()), epochs  # a float cannot hold them

    browser.set_window_size(1400, 900)
    try:
        browser.get(f"http://{server.http_address}/")
        wait_for(browser, "the first render", lambda d: d.find_element(By.ID, "last-updated").get_attribute("data-ts"))
        page = snapshot(browser)
        assert page["hot"][:2] == [{"key": hot, "writes": "3"}, {"key": cold, "writes": "1"}], page["hot"]
        assert page["chart"]["commitsWindow"] == "4", page["chart"]
        assert page["chart"]["commitsLine"].strip(), "no commit line drawn"
        assert {s["shard"]: s["cells"]["epoch"] for s in page["shards"]} == {k: str(e) for k, e in epochs.items()}
        fit = browser.execute_script(_SHARDS_FIT)
        assert fit["lastRight"] <= fit["sectionRight"] <= fit["viewport"], fit
        assert fit["pageScroll"] <= fit["viewport"], fit
    finally:
        browser.set_window_size(1500, 1900)


def test_dashboard_under_auth_asks_for_a_token(cluster: Cluster, tmp_path: Path, browser: WebDriver) -> None:
    """``oribus up --auth``: the page loads, the feed answers 401 until a token is given in the
    page (then it is sent as ``Authorization: Bearer``), and nothing of the state shows
    meanwhile; a token without the admin grant gets the feed of what it may see (the page
    says so, and offers no rollback); an admin token gets everything."""
    from processes import run_cli

    auth = tmp_path / "auth"
    assert run_cli("auth", "init", "--dir", str(auth)).returncode == 0

    def token(agent: str, role: str) -> str:
        done = run_cli("auth", "token", "--dir", str(auth), "--agent", agent, "--role", role)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False))
    server.args += ["--auth", str(auth)]
    server.start().wait_serving()
    browser.get(f"http://{server.http_address}/")
    wait_for(browser, "a request for a token",
             lambda d: d.find_element(By.ID, "conn-status").text.startswith("token needed"))
    assert browser.find_element(By.ID, "last-updated").get_attribute("data-ts") == ""

    def use(tok: str) -> None:
        box = browser.find_element(By.ID, "token")
        box.clear()
        box.send_keys(tok)
        browser.find_element(By.ID, "token-use").click()

    use(token("reader", "writer"))  # no admin grant
    wait_for(browser, "the feed of a token without admin",
             lambda d: d.find_element(By.ID, "last-updated").get_attribute("data-ts"))
    assert browser.find_element(By.ID, "sessions-scope").text.startswith("— yours")
    assert browser.find_element(By.ID, "admin-mode").text == "read-only"
    use(token("ops", "admin"))
    wait_for(browser, "the feed of everything",
             lambda d: d.find_element(By.ID, "sessions-scope").text == "")
    assert snapshot(browser)["connection"] == "live"

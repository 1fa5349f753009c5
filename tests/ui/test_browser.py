"""End to end in a real headless Chromium: the production server, a live hub, seeded signed events."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amoskys.config import UiConfig
from amoskys.ui.app import create_app
from amoskys.v1 import events_pb2
from tests.ui.conftest import NEEDLE, Fleet, event, heartbeat, running
from tests.ui.devtools import DevTools, chromium, chromium_binary

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
pytestmark = pytest.mark.skipif(chromium_binary() is None, reason="needs Debian's chromium (scripts/setup-host.sh)")


@pytest.fixture(scope="module")
def ui_url(seeded: Fleet) -> Iterator[str]:
    """The UI served by cheroot on 127.0.0.1:0, sampling the hub twice a second (rate charts fill up)."""
    with seeded.hub.client(timeout_s=5.0, refresh_s=0.5) as client:
        for count in (10, 60, 25, 45, 5):  # varying traffic between samples: the rate charts get a shape
            now = time.time_ns()
            seeded.publish("web1-proc", [heartbeat("web1", "proc", now), *traffic("web1", now, count)])
            seeded.publish("gw1-scanner", [heartbeat("gw1", "scanner", now), *traffic("gw1", now, 70 - count)])
            time.sleep(0.6)
        with running(UiConfig(listen="127.0.0.1:0"), create_app(client)) as port:
            yield f"http://127.0.0.1:{port}"


def traffic(host: str, now: int, count: int) -> list[events_pb2.Event]:
    """`count` events of the kind that host's agent reports (proc on web1, the scanner on gw1)."""
    if host == "gw1":
        device = events_pb2.DeviceEvent(
            action=events_pb2.DeviceEvent.CHANGED, mac="aa:bb:cc:00:00:01", ips=["10.0.0.7"]
        )
        return [event(host, "scanner", now - i, device=device) for i in range(count)]
    process = events_pb2.ProcessEvent(action=events_pb2.ProcessEvent.START, pid=77, name="cron")
    return [event(host, "proc", now - i, process=process) for i in range(count)]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as tools:
        yield tools


def rows(browser: DevTools, selector: str) -> list[str]:
    script = f"[...document.querySelectorAll({json.dumps(selector)})].map(r => r.innerText)"
    return list(browser.evaluate(script))


def test_fleet_page_lists_hosts_and_a_late_agent(browser: DevTools, ui_url: str) -> None:
    browser.navigate(f"{ui_url}/")
    fleet = rows(browser, "table.fleet tbody tr")
    hosts = {row.split("\t")[0]: row for row in fleet}
    assert {"web1", "db1", "old1", "gw1"} <= hosts.keys()
    assert "late" in hosts["db1"].split("\t")[1]
    assert "host late" in hosts["db1"]
    assert hosts["old1"].split("\t")[1] == "down"
    assert hosts["web1"].split("\t")[1] == "up"
    assert browser.evaluate("getComputedStyle(document.querySelector('.badge.late')).backgroundColor") != (
        "rgba(0, 0, 0, 0)"
    )  # the stylesheet loaded under the CSP
    browser.screenshot(ARTIFACTS / "ui-fleet.png")
    assert browser.problems() == []


def test_search_finds_the_planted_event(browser: DevTools, ui_url: str) -> None:
    browser.navigate(f"{ui_url}/events")
    browser.evaluate(f"document.querySelector('input[name=text]').value = {json.dumps(NEEDLE)}")
    browser.evaluate("document.querySelector('form.filters').submit()")
    browser.wait_for("location.search.includes('text=') && document.readyState === 'complete'")
    found = rows(browser, "table.events tbody tr")
    assert len(found) == 1
    assert NEEDLE in found[0]
    assert "web1" in found[0]
    browser.screenshot(ARTIFACTS / "ui-events-search.png")
    assert browser.problems() == []


def test_live_tail_shows_new_events(browser: DevTools, ui_url: str, seeded: Fleet) -> None:
    browser.navigate(f"{ui_url}/events?kind=alert")
    browser.evaluate("document.getElementById('tail-toggle').click()")
    browser.wait_for("document.getElementById('tail-status').textContent.startsWith('live')")
    summary = "<b>tail</b> 'arrived' live"
    alert = events_pb2.Alert(rule="proc.exe_in_tmp", summary=summary)
    seeded.publish("web1-proc", [event("web1", "proc", time.time_ns(), events_pb2.SEVERITY_WARNING, alert=alert)])
    first = browser.wait_for("document.querySelector('#events tbody tr')?.innerText.includes('arrived')")
    assert first
    assert summary in rows(browser, "#events tbody tr")[0]  # shown as text, not markup
    assert browser.evaluate("document.querySelectorAll('#events b').length") == 0
    browser.screenshot(ARTIFACTS / "ui-events-tail.png")
    assert browser.problems() == []


def test_host_and_hub_pages_render(browser: DevTools, ui_url: str) -> None:
    browser.navigate(f"{ui_url}/hosts/web1")
    assert "nginx" in browser.evaluate("document.body.innerText")
    browser.screenshot(ARTIFACTS / "ui-host.png")
    browser.navigate(f"{ui_url}/hub")
    assert "Fleet certificates" in browser.evaluate("document.body.innerText")
    browser.screenshot(ARTIFACTS / "ui-hub.png")
    assert browser.problems() == []

"""Pages and the JSON API, in-process through WSGI, against a real hub seeded with signed events."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any
from urllib.parse import quote
from wsgiref.headers import Headers

import pytest

from amoskys.ui.app import SECURITY_HEADERS, create_app
from amoskys.ui.hubclient import HubClient
from amoskys.ui.model import MAX_FILTER_VALUES
from amoskys.v1 import envelope_pb2, events_pb2
from tests.ui.conftest import HOSTILE_HOST, NEEDLE, Fleet, call, event, samples

PAGES = ["/", "/hosts/web1", "/events", "/alerts", "/hub"]
APIS = ["/api/v1/fleet", "/api/v1/hosts/web1", "/api/v1/events", "/api/v1/alerts", "/api/v1/hub"]


def assert_secure(headers: Headers) -> None:
    for name, value in SECURITY_HEADERS.items():
        if name != "Cache-Control":
            assert headers.get(name) == value, name
    csp = headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp


def hosts_by_name(app: Any) -> dict[str, dict[str, Any]]:
    return {h["host"]: h for h in call(app, "/api/v1/fleet").json()["hosts"]}


def test_fleet_api_judges_liveness_from_heartbeats(app: Any) -> None:
    hosts = hosts_by_name(app)
    assert {"web1", "db1", "old1", "gw1", HOSTILE_HOST} <= hosts.keys()
    assert hosts["web1"]["state"] == "up"
    assert {a["kind"] for a in hosts["web1"]["agents"]} == {"host", "proc", "auth"}
    assert hosts["db1"]["state"] == "late"
    assert hosts["old1"]["state"] == "down"
    assert hosts["web1"]["alerts_total"] == 1
    fleet = call(app, "/api/v1/fleet").json()
    assert fleet["agents"]["late"] == 1
    assert fleet["agents"]["down"] == 1
    assert [h["state"] for h in fleet["hosts"][:2]] == ["down", "late"]  # problems first


def test_fleet_page_lists_hosts_with_states(app: Any) -> None:
    page = call(app, "/")
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    for host in ("web1", "db1", "old1", "gw1"):
        assert f'href="/hosts/{host}"' in page.body
    row = re.search(r'<tr class="row-late">.*?</tr>', page.body, re.S)
    assert row and "db1" in row.group() and "host late" in row.group()
    assert "<svg" in page.body


def test_host_page_shows_agents_ports_metrics_and_events(app: Any) -> None:
    data = call(app, "/api/v1/hosts/web1").json()
    listening = data["metrics"]["listening"]
    assert [s["port"] for s in listening] == [22, 443, 5432]
    assert [(s["uid"], s["user"]) for s in listening] == [(None, ""), (0, "root"), (108, "postgres")]
    assert data["metrics"]["cpu_percent"] == 12.5
    assert {e["kind"] for e in data["events"]} >= {"process", "auth", "alert", "host_metrics"}
    page = call(app, "/hosts/web1").body
    assert "nginx (977)" in page
    assert re.search(r'<td title="the host agent could not see [^"]*">unknown process \(user postgres\)</td>', page)
    assert "web1-auth" in page


def test_host_page_lists_devices_its_scanner_sees(app: Any) -> None:
    devices = call(app, "/api/v1/hosts/gw1").json()["devices"]
    assert [d["mac"] for d in devices] == ["aa:bb:cc:00:00:01"]  # :02 is gone
    assert devices[0]["vendor"] == "Acme"
    assert "aa:bb:cc:00:00:01" in call(app, "/hosts/gw1").body


def test_unknown_host_is_404_page_and_json(app: Any) -> None:
    page = call(app, "/hosts/nosuchhost")
    assert page.status == 404
    assert "nosuchhost" in page.body
    assert_secure(page.headers)
    api = call(app, "/api/v1/hosts/nosuchhost")
    assert api.status == 404
    assert api.json()["status"] == 404
    assert_secure(api.headers)


def test_search_finds_the_planted_event(app: Any) -> None:
    found = call(app, f"/api/v1/events?text={NEEDLE.upper()}&since=1h").json()["events"]
    assert [e["kind"] for e in found] == ["auth"]
    assert found[0]["host"] == "web1"
    assert found[0]["body"]["user"] == NEEDLE
    page = call(app, f"/events?text={NEEDLE}")
    assert page.status == 200
    assert NEEDLE in page.body
    assert call(app, f"/api/v1/events?text={NEEDLE}&host=db1").json()["events"] == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("kind=alert", {"alert"}),
        ("severity=warning", {"alert"}),
        ("agent=scanner&kind=device", {"device"}),
        ("host=web1&kind=host_metrics", {"host_metrics"}),
    ],
)
def test_search_filters(app: Any, query: str, expected: set[str]) -> None:
    events = call(app, f"/api/v1/events?{query}").json()["events"]
    assert events
    assert {e["kind"] for e in events} == expected


def test_search_text_is_utf8(seeded: Fleet, app: Any) -> None:
    summary = "Anmeldung fehlgeschlagen für Jürgen ✓"
    seeded.publish(
        "web1-auth", [event("web1", "auth", time.time_ns(), alert=events_pb2.Alert(rule="auth.x", summary=summary))]
    )
    found = call(app, f"/api/v1/events?text={quote('JÜRGEN ✓'.lower())}").json()["events"]
    assert [e["body"]["summary"] for e in found] == [summary]
    assert f'value="{"jürgen ✓"}"' in call(app, f"/events?text={quote('jürgen ✓')}").body


def test_time_range_filter(app: Any) -> None:
    recent = call(app, "/api/v1/events?since=2m&host=old1&heartbeats=1").json()["events"]
    assert recent == []  # its only heartbeat is 1000 s old
    older = call(app, "/api/v1/events?since=30m&until=10m&host=old1&heartbeats=1").json()["events"]
    assert [e["kind"] for e in older] == ["heartbeat"]


def test_heartbeats_are_left_out_unless_asked_for(app: Any) -> None:
    kinds = {e["kind"] for e in call(app, "/api/v1/events?host=web1").json()["events"]}
    assert "heartbeat" not in kinds
    assert {"process", "auth", "alert", "host_metrics"} <= kinds
    shown = {e["kind"] for e in call(app, "/api/v1/events?host=web1&heartbeats=1").json()["events"]}
    assert shown == kinds | {"heartbeat"}
    only = {e["kind"] for e in call(app, "/api/v1/events?host=web1&kind=heartbeat").json()["events"]}
    assert only == {"heartbeat"}
    assert "heartbeat" not in {e["kind"] for e in call(app, "/api/v1/hosts/web1").json()["events"]}
    page = call(app, "/events?heartbeats=1").body
    assert '<input type="checkbox" name="heartbeats" value="1" checked>' in page
    assert "heartbeats=1" in page  # the live tail keeps the choice
    tail = call(app, "/api/v1/events/tail?after_cursor=1").json()["events"]
    assert tail
    assert "heartbeat" not in {e["kind"] for e in tail}


def test_events_are_paged(app: Any) -> None:
    first = call(app, "/api/v1/events?page_size=3").json()
    assert len(first["events"]) == 3
    token = first["next_page_token"]
    second = call(app, f"/api/v1/events?page_size=3&page_token={quote(token)}").json()
    assert {e["cursor"] for e in first["events"]}.isdisjoint(e["cursor"] for e in second["events"])
    assert first["events"][-1]["ts_ns"] >= second["events"][0]["ts_ns"]
    page = call(app, "/events?page_size=3").body
    assert "older →" in page


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/api/v1/events?since=yesterday", "since"),
        ("/api/v1/events?severity=loud", "severity"),
        ("/api/v1/events?kind=bogus", "kind"),
        ("/api/v1/events?page_size=many", "page_size"),
        ("/api/v1/events?page_token=!!notatoken", "page token"),
        ("/api/v1/events/tail?after_cursor=x", "after_cursor"),
    ],
)
def test_bad_parameters_are_400_with_the_reason(app: Any, path: str, message: str) -> None:
    response = call(app, path)
    assert response.status == 400
    assert message in response.json()["error"]
    page = call(app, path.removeprefix("/api/v1"))
    if not path.startswith("/api/v1/events/tail"):
        assert page.status == 400
        assert message in page.body


def test_tail_returns_events_after_a_cursor(seeded: Fleet, app: Any) -> None:
    start = call(app, "/api/v1/events").json()["cursor"]
    ts = time.time_ns()
    seeded.publish(
        "web1-auth", [event("web1", "auth", ts, alert=events_pb2.Alert(rule="auth.tail_test", summary="fresh"))]
    )
    tail = call(app, f"/api/v1/events/tail?after_cursor={start}&kind=alert").json()
    assert [e["summary"] for e in tail["events"]] == ["auth.tail_test: fresh"]
    assert tail["cursor"] > start
    again = call(app, f"/api/v1/events/tail?after_cursor={tail['cursor']}&kind=alert").json()
    assert again == {"events": [], "cursor": tail["cursor"]}


def test_alerts_page_shows_alerts_and_device_changes(app: Any) -> None:
    data = call(app, "/api/v1/alerts").json()
    assert "auth.brute_force" in {e["body"]["rule"] for e in data["events"]}
    assert {e["kind"] for e in data["events"]} == {"alert"}
    assert {e["body"]["mac"] for e in data["device_changes"]} == {"aa:bb:cc:00:00:01", "aa:bb:cc:00:00:02"}
    page = call(app, "/alerts").body
    assert "auth.brute_force: 5 failures" in page


def test_hub_page_shows_status_and_certificate_expiry(app: Any, seeded: Fleet) -> None:
    data = call(app, "/api/v1/hub").json()
    assert data["events_stored"] >= 10
    assert data["store_bytes"] > 0
    certs = data["certificates"]
    assert {c["agent_id"] for c in certs} >= set(seeded.agents)
    assert all(29 <= c["days_left"] <= 30 for c in certs)  # TestPki issues 30-day certificates
    page = call(app, "/hub").body
    assert "Fleet certificates" in page
    assert "web1-proc" in page


@pytest.mark.parametrize("path", PAGES + APIS + ["/static/style.css", "/static/tail.js", "/nowhere"])
def test_security_headers_everywhere(app: Any, path: str) -> None:
    assert_secure(call(app, path).headers)


def test_static_files_are_local_and_contained(app: Any) -> None:
    css = call(app, "/static/style.css")
    assert css.status == 200
    assert css.headers["Content-Type"].startswith("text/css")
    assert call(app, "/static/tail.js").headers["Content-Type"].split(";")[0] in {
        "text/javascript",
        "application/javascript",
    }
    assert call(app, "/static/../app.py").status in {403, 404}
    assert call(app, "/static/%2e%2e/app.py").status in {403, 404}


def test_hub_unreachable_is_503(tmp_path: Any, seeded: Fleet) -> None:
    tls = seeded.hub.live.consumer_tls("ui")
    with HubClient("127.0.0.1:1", tls, "localhost", timeout_s=2.0, refresh_s=3600) as dead:
        app = create_app(dead)
        page = call(app, "/")
        assert page.status == 503
        assert "127.0.0.1:1" in page.body
        assert_secure(page.headers)
        assert call(app, "/api/v1/events").status == 503
        metrics = samples(call(app, "/metrics").body)
        assert metrics[("amoskys_ui_hub_call_errors_total", (("call", "sample"), ("code", "UNAVAILABLE")))] >= 1
        assert metrics[("amoskys_ui_requests_total", (("status", "503"),))] == 2


def test_metrics_in_prometheus_text_format(app: Any) -> None:
    call(app, "/api/v1/hosts/web1")
    call(app, "/api/v1/events?severity=loud")
    response = call(app, "/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert_secure(response.headers)
    metrics = samples(response.body)
    assert metrics[("amoskys_ui_requests_total", (("status", "400"),))] >= 1
    assert metrics[("amoskys_ui_hub_call_seconds_count", (("call", "query"),))] >= 1
    assert ("amoskys_ui_login_failures_total", ()) in metrics
    openmetrics = call(app, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")


def test_fleet_is_built_once_per_sample_and_after_each(seeded: Fleet, app: Any) -> None:
    assert call(app, "/").body == call(app, "/").body  # one sample, one page (even as time moves)
    assert call(app, "/api/v1/fleet").body == call(app, "/api/v1/fleet").body
    with seeded.hub.client(timeout_s=5.0, refresh_s=0.1) as sampling:
        samples: list[Any] = []
        sampling.listeners.append(samples.append)
        fresh = create_app(sampling)  # registers its fleet view as a listener too
        deadline = time.monotonic() + 10
        while len(samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(samples) >= 3
        assert len(sampling.listeners) == 2
        assert "db1" in call(fresh, "/").body


def strict_json(text: str) -> Any:
    """json.loads refusing NaN and Infinity (which Python's parser accepts by default)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_never_reach_the_json(seeded: Fleet, app: Any) -> None:
    """The hub refuses NaN/Infinity at its edge; whatever the UI serves parses as strict JSON
    (its own conversion of non-finite floats to null is unit-tested in test_model)."""
    metrics = events_pb2.HostMetrics(cpu_percent=math.nan, load1=math.inf, load5=-math.inf, load15=0.5)
    agent = seeded.agent("nan1-host")
    ack = seeded.hub.run(
        seeded.hub.live.publish(agent, agent.seal([event("nan1", "host", time.time_ns(), host_metrics=metrics)]))
    )
    assert (ack.status, ack.reason.split(":")[0]) == (envelope_pb2.PublishAck.INVALID, "bad_number")
    for path in (
        "/api/v1/events?host=web1",
        "/api/v1/fleet",
        "/api/v1/hub",
        "/api/v1/hosts/web1",
        "/api/v1/hosts/nosuchhost",
    ):
        strict_json(call(app, path).body)


@pytest.mark.parametrize("key", ["host", "agent_id", "agent", "kind"])
def test_too_many_filter_values_is_400_naming_the_cap(app: Any, key: str) -> None:
    many = call(app, f"/api/v1/events?{key}=" + ",".join(f"h{i}" for i in range(300_000)))
    assert many.status == 400
    assert many.json()["error"] == f"{key}: 300,000 values; at most {MAX_FILTER_VALUES} (comma-separated)"
    assert call(app, f"/events?{key}=" + ",".join(["x"] * (MAX_FILTER_VALUES + 1))).status == 400


def test_the_most_filter_values_allowed_are_served(app: Any) -> None:
    hosts = ",".join(["web1", *(f"h{i}" for i in range(MAX_FILTER_VALUES - 1))])
    events = call(app, f"/api/v1/events?host={hosts}").json()["events"]
    assert events
    assert {e["host"] for e in events} == {"web1"}

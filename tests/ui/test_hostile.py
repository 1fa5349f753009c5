"""Hostile strings in events render inert and visible; pages carry no inline code and nothing from elsewhere."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

import pytest

from amoskys.ui import model
from amoskys.ui.hubclient import HubClient
from amoskys.v1 import events_pb2
from tests.ui.conftest import HOSTILE, HOSTILE_HOST, Fleet, call, event, heartbeat

# bidi override and isolate, zero-width space, BEL, NEL (C1), line separator, a tag character, NBSP
UNSEEN = "\u202eexe.\u2066txt\u200b\x07\x85\u2028\U000e0041\u00a0"

PAGES = ["/", "/hosts/web1", f"/hosts/{quote(HOSTILE_HOST, safe='')}", "/events", "/alerts", "/hub"]


class Elements(HTMLParser):
    """Every start tag with its attributes, as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def elements(body: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Elements()
    parser.feed(body)
    parser.close()
    return parser.tags


@pytest.mark.parametrize("path", PAGES)
def test_pages_have_only_our_own_markup(app: Any, path: str) -> None:
    response = call(app, path)
    assert response.status == 200, response.body
    tags = elements(response.body)
    assert "img" not in {tag for tag, _ in tags}  # the hostile <img onerror> stayed text
    for tag, attrs in tags:
        assert not [a for a in attrs if a.startswith("on") or a == "style"], (tag, attrs)
        assert tag != "style"
        if tag == "script":
            assert attrs.get("src", "").startswith("/static/"), attrs  # type: ignore[union-attr]
        for name in ("src", "href", "action"):
            value = attrs.get(name) or ""
            assert not value.startswith(("http:", "https:", "//", "javascript:")), (tag, attrs)
    assert [t for t, _ in tags].count("script") <= 1


@pytest.mark.parametrize("path", ["/hosts/web1", "/events?text=gnp", "/events?host=web1&kind=process"])
def test_hostile_process_renders_escaped_and_visible(app: Any, path: str) -> None:
    body = call(app, path).body
    assert "&lt;script&gt;alert(&#039;x&#039;)&lt;/script&gt;" in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert "<script>alert" not in body
    assert "\x1b" not in body
    assert "\x00" not in body
    assert "\u202e" not in body
    assert "\\u001b[31m\\u0000\\u202egnp.exe" in body  # control characters shown, not obeyed


def test_hostile_host_name_is_escaped_in_text_and_links(app: Any) -> None:
    fleet = call(app, "/").body
    assert "&lt;script&gt;alert(&quot;host&quot;)&lt;/script&gt;" in fleet
    links = [a.get("href") for t, a in elements(fleet) if t == "a"]
    assert f"/hosts/{quote(HOSTILE_HOST, safe='')}" in links
    host_page = call(app, f"/hosts/{quote(HOSTILE_HOST, safe='')}")
    assert host_page.status == 200
    assert "<script>alert" not in host_page.body


def test_json_api_gives_the_text_cleaned_like_the_pages(app: Any) -> None:
    response = call(app, "/api/v1/events?kind=process&host=web1")
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    events = json.loads(response.body)["events"]
    assert events[0]["body"]["name"] == model.clean(HOSTILE)
    assert events[0]["body"]["name"].startswith("<script>")  # JSON needs no HTML escaping, only the controls
    assert "\\u001b" in events[0]["summary"]


@pytest.fixture(scope="module")
def unseen(seeded: Fleet, client: HubClient) -> str:
    """web2's agents send UNSEEN in every text field the UI shows; yields the host name."""
    now = time.time_ns()
    metrics = events_pb2.HostMetrics(
        users=[f"root{UNSEEN}"],
        disks=[events_pb2.DiskUsage(mount=f"/srv{UNSEEN}", fstype=f"ext4{UNSEEN}", total_bytes=1 << 30)],
        listening=[
            events_pb2.ListenSocket(
                protocol=f"tcp{UNSEEN}", address=f"0.0.0.0{UNSEEN}", port=8, process=f"sshd{UNSEEN}"
            ),
            events_pb2.ListenSocket(protocol="udp", address="::", port=9, uid=33, user=f"www{UNSEEN}"),
        ],
    )
    beat = heartbeat("web2", "host", now)
    beat.heartbeat.version = f"0.1.0{UNSEEN}"
    beat.labels[f"role{UNSEEN}"] = f"db{UNSEEN}"
    seeded.publish("web2-host", [beat, event("web2", "host", now, host_metrics=metrics)])
    device = events_pb2.DeviceEvent(
        action=events_pb2.DeviceEvent.NEW, mac=f"aa:bb{UNSEEN}", ips=[f"10.0.0.9{UNSEEN}"],
        vendor=f"Acme{UNSEEN}", interface=f"eth0{UNSEEN}",
    )  # fmt: skip
    snmp = events_pb2.SnmpEvent(
        kind=events_pb2.SnmpEvent.TRAP, target=f"sw1{UNSEEN}", sys_name=f"core{UNSEEN}",
        trap_oid="1.3.6.1.6.3.1.1.5.3", varbinds={f"ifDescr{UNSEEN}": f"Gi0/1{UNSEEN}"},
    )  # fmt: skip
    seeded.publish("web2-scanner", [event("web2", "scanner", now, device=device)])
    seeded.publish("web2-snmp", [event("web2", "snmp", now, snmp=snmp)])
    client.snapshot(max_age_s=0)  # a registry sample with web2's agents
    return "web2"


def strings(value: Any) -> Iterator[str]:
    """Every string (and mapping key) in parsed JSON."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.mark.parametrize("path", ["/api/v1/hosts/web2", "/api/v1/events?host=web2", "/api/v1/fleet", "/api/v1/hub"])
def test_json_never_carries_unseen_characters(app: Any, unseen: str, path: str) -> None:
    text = list(strings(call(app, path).json()))
    assert all(s.isprintable() for s in text), [s for s in text if not s.isprintable()]
    shown = "\n".join(text)
    if "web2" in path:
        for escape in ("\\u202e", "\\u2066", "\\u200b", "\\u0007", "\\u0085", "\\u2028", "\\U000e0041", "\\u00a0"):
            assert escape in shown


@pytest.mark.parametrize("path", ["/hosts/web2", "/events?host=web2", "/", "/hub"])
def test_pages_never_carry_unseen_characters(app: Any, unseen: str, path: str) -> None:
    body = call(app, path).body
    assert all(c.isprintable() or c == "\n" for c in body), sorted({c for c in body if not c.isprintable()})


def test_host_page_shows_every_field_escaped(app: Any, unseen: str) -> None:
    body = call(app, "/hosts/web2").body
    shown = model.clean(UNSEEN)
    for field in ("root", "/srv", "sshd", "0.0.0.0", "tcp", "Acme", "eth0", "aa:bb", "10.0.0.9", "0.1.0", "www"):
        assert f"{field}{shown}" in body, field
    events = call(app, "/events?host=web2&kind=snmp").body
    assert f"core{shown}" in events
    assert f"sw1{shown}" in events

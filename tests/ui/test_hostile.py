"""Hostile strings in events render inert; pages carry no inline code and nothing from elsewhere."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

import pytest

from tests.ui.conftest import HOSTILE, HOSTILE_HOST, call

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


def test_json_api_returns_data_verbatim_as_json(app: Any) -> None:
    response = call(app, "/api/v1/events?kind=process&host=web1")
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    events = json.loads(response.body)["events"]
    assert events[0]["body"]["name"] == HOSTILE  # the API gives exact data; the pages escape it
    assert "\\u001b" in events[0]["summary"]

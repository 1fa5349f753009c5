"""The status UI as a Bottle app: one route table, every page backed by a versioned JSON API.

`create_app(hub)` builds an explicit `Bottle()` around a HubClient (or anything with the same
methods); nothing happens at import time. Pages are SimpleTemplate views that escape every value.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

import bottle
import grpc

from amoskys import __version__
from amoskys.ui import model, svg
from amoskys.ui.auth import Authenticator, LoginRefused
from amoskys.ui.hubclient import HubError, Snapshot
from amoskys.ui.metrics import UiMetrics
from amoskys.v1 import bus_pb2

__all__ = ["API", "SECURITY_HEADERS", "Hub", "create_app"]

HERE = Path(__file__).parent
VIEWS = [str(HERE / "views")]  # one list object: Bottle caches compiled templates by its id
STATIC = str(HERE / "static")
API = "/api/v1"
PAGE_SIZE, MAX_PAGE_SIZE, HOST_EVENTS = 50, 500, 25
TAIL_WAIT_S, TAIL_LIMIT = 0.25, 500
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NAV = [("/", "Fleet"), ("/events", "Events"), ("/alerts", "Alerts"), ("/hub", "Hub")]
Handler = Callable[..., dict[str, Any]]
T = TypeVar("T")


class Hub(Protocol):
    """What the app needs from the hub (HubClient implements it)."""

    rates: model.RateHistory
    metrics: UiMetrics
    history: deque[Snapshot]
    listeners: list[Callable[[Snapshot], object]]

    def snapshot(self, max_age_s: float | None = None) -> Snapshot: ...
    def query(self, request: bus_pb2.QueryRequest) -> bus_pb2.QueryResponse: ...
    def query_many(self, requests: list[bus_pb2.QueryRequest]) -> list[bus_pb2.QueryResponse]: ...
    def tail(
        self, flt: bus_pb2.EventFilter, after_cursor: int, wait_s: float, limit: int
    ) -> list[bus_pb2.StoredEvent]: ...


def _query() -> dict[str, str]:
    """The request's query parameters, UTF-8 decoded (Bottle keeps them latin-1 by default)."""
    return dict(bottle.request.query.decode())


def _page_size(params: Any) -> int:
    try:
        size = int(params.get("page_size") or PAGE_SIZE)
    except ValueError:
        raise ValueError("page_size: expected a number") from None
    return min(max(size, 1), MAX_PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Built:
    """The fleet page and its JSON, as of one sample."""

    taken_ns: int
    html: str
    json: str


class FleetView:
    """The fleet's data, page and JSON depend on one registry sample only: built once per sample.

    The hub client calls `build` from a worker thread right after each sample, so requests (and
    their p95) find the 1,000-host page ready; liveness is judged at the sample's time.
    """

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._built: Built | None = None

    def build(self, snapshot: Snapshot) -> Built:
        built = self._built
        if built is not None and built.taken_ns >= snapshot.taken_ns:
            return built
        data = model.fleet(snapshot.agents, self.hub.rates, snapshot.taken_ns)
        html = render("fleet", title="Fleet", rates=self.hub.rates, now_ns=snapshot.taken_ns, **data)
        built = Built(snapshot.taken_ns, html, model.to_json(data))
        self._built = built
        return built

    def page(self) -> str:
        return self.build(self.hub.snapshot()).html

    def api(self) -> str:
        bottle.response.content_type = "application/json"
        return self.build(self.hub.snapshot()).json


class Pages:
    """The data behind each page; every method returns a JSON-able dict."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def host(self, name: str) -> dict[str, Any]:
        now_ns = time.time_ns()
        agents = [model.agent_view(a, now_ns) for a in self.hub.snapshot().agents if a.host == name]
        recent, metrics, devices = self.hub.query_many(
            [
                bus_pb2.QueryRequest(
                    filter=bus_pb2.EventFilter(hosts=[name], kinds=model.SHOWN_KINDS), page_size=HOST_EVENTS
                ),
                bus_pb2.QueryRequest(filter=bus_pb2.EventFilter(hosts=[name], kinds=["host_metrics"]), page_size=1),
                bus_pb2.QueryRequest(filter=bus_pb2.EventFilter(hosts=[name], kinds=["device"]), page_size=1000),
            ]
        )
        if not agents and not recent.events:
            raise bottle.HTTPError(404, f"no agent and no event from host {name!r}")
        return {
            "host": model.clean(name),
            "events_url": "/events?" + urlencode({"host": name}),
            "agents": agents,
            "rate_eps": self.hub.rates.rate(model.clean(name)),
            "metrics": model.host_metrics_view(metrics.events[0] if metrics.events else None),
            "devices": model.devices(devices.events),
            "events": [model.event_view(e) for e in recent.events],
        }

    def events(self, params: Any = None, *, kinds: list[str] | None = None) -> dict[str, Any]:
        params = _query() if params is None else params
        flt, form = model.parse_filter(params)
        if kinds is not None:
            flt.ClearField("kinds")
            flt.kinds.extend(kinds)
        request = bus_pb2.QueryRequest(
            filter=flt, page_size=_page_size(params), page_token=params.get("page_token", "")
        )
        page = self.hub.query(request)
        return {
            "filter": form,
            "events": [model.event_view(e) for e in page.events],
            "page_token": request.page_token,
            "next_page_token": page.next_page_token,
            "cursor": max((e.cursor for e in page.events), default=0) or self._newest_cursor(),
        }

    def _newest_cursor(self) -> int:
        """Where a live tail starts when the page is empty: the newest event in the store."""
        newest = self.hub.query(bus_pb2.QueryRequest(page_size=1)).events
        return newest[0].cursor if newest else 0

    def tail(self) -> dict[str, Any]:
        params = _query()
        flt, _form = model.parse_filter(params, default_since="")
        flt.until_ns = 0
        try:
            after = int(params.get("after_cursor", "0"))
        except ValueError:
            raise ValueError("after_cursor: expected a number") from None
        events = self.hub.tail(flt, after, TAIL_WAIT_S, TAIL_LIMIT) if after > 0 else []
        return {
            "events": [model.event_view(e) for e in reversed(events)],
            "cursor": max((e.cursor for e in events), default=after),
        }

    def alerts(self) -> dict[str, Any]:
        data = self.events(kinds=["alert"])
        changes = self.hub.query(bus_pb2.QueryRequest(filter=bus_pb2.EventFilter(kinds=["device"]), page_size=200))
        data["device_changes"] = [
            model.event_view(e) for e in changes.events if e.event.device.action != e.event.device.GONE
        ][:PAGE_SIZE]
        return data

    def hub_status(self) -> dict[str, Any]:
        snapshot = self.hub.snapshot()
        status = snapshot.status
        return {
            "version": model.clean(status.version),
            "started_ns": status.started_ns,
            "events_stored": status.events_stored,
            "store_bytes": status.store_bytes,
            "agents": status.agents,
            "streams": status.streams,
            "inflight": status.inflight,
            "ingest_eps": status.ingest_eps,
            "ingest_history": [s.status.ingest_eps for s in list(self.hub.history)],  # copied: the loop appends
            "retries": status.retries,
            "chain_breaks": status.chain_breaks,
            "rejected": model.clean_tree(dict(sorted(status.rejected.items()))),
            "certificates": model.certificates(snapshot.agents, time.time_ns()),
        }


def _harden(response: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        if name != "Cache-Control" or name not in response.headers:
            response.set_header(name, value)
    if bottle.request.environ.get("wsgi.url_scheme") == "https":
        response.set_header("Strict-Transport-Security", "max-age=31536000")


def _guard(handler: Callable[..., T]) -> Callable[..., T]:
    """Operator mistakes become 400, an unreachable hub 503, with the reason."""

    def call(*args: Any, **kwargs: Any) -> T:
        try:
            return handler(*args, **kwargs)
        except ValueError as exc:
            raise bottle.HTTPError(400, str(exc)) from None
        except HubError as exc:
            status = 400 if exc.code == grpc.StatusCode.INVALID_ARGUMENT else 503
            raise bottle.HTTPError(status, str(exc)) from None

    return call


def render(name: str, **data: Any) -> str:
    """A page from views/NAME.tpl; SimpleTemplate escapes every {{value}}."""
    helpers = {
        "model": model,
        "svg": svg,
        "urlencode": urlencode,
        "nav": NAV,
        "ui_version": __version__,
    }
    data.setdefault("now_ns", time.time_ns())
    return str(bottle.template(name, template_lookup=VIEWS, **helpers, **data))


def _harden_response() -> None:
    _harden(bottle.response)


def _error_page(error: Any) -> str:
    _harden(bottle.response)
    if bottle.request.path.startswith(f"{API}/") or bottle.request.path == API:
        bottle.response.content_type = "application/json"
        return model.to_json({"error": model.clean(str(error.body)), "status": error.status_code})
    return render("error", title=f"{error.status_code}", status=error.status_line, message=model.clean(str(error.body)))


def create_app(hub: Hub, authenticator: Authenticator | None = None) -> Any:
    """The WSGI app: pages, the JSON API under /api/v1, /metrics (the hub client's registry), static
    files, headers and authentication."""
    metrics = hub.metrics
    app = bottle.Bottle()
    app.uninstall(bottle.JSONPlugin)
    app.install(bottle.JSONPlugin(json_dumps=model.to_json))  # returned dicts: strict JSON
    pages, fleet = Pages(hub), FleetView(hub)
    hub.listeners.append(fleet.build)
    routes: list[tuple[str, str, Callable[..., Any], Callable[..., str] | None]] = [
        ("/", "/fleet", fleet.api, fleet.page),
        ("/hosts/<name:path>", "/hosts/<name:path>", pages.host, _view(pages.host, "host", hub.rates)),
        ("/events", "/events", pages.events, _view(pages.events, "events", hub.rates)),
        ("/alerts", "/alerts", pages.alerts, _view(pages.alerts, "alerts", hub.rates)),
        ("/hub", "/hub", pages.hub_status, _view(pages.hub_status, "hub", hub.rates)),
        ("", "/events/tail", pages.tail, None),
    ]
    for page_path, api_path, data, page in routes:
        app.route(API + api_path, "GET", _guard(data))
        if page is not None:
            app.route(page_path, "GET", _guard(page))
    app.route("/static/<path:path>", "GET", _static)
    app.route("/metrics", "GET", functools.partial(_metrics, metrics))
    app.add_hook("after_request", _harden_response)
    for status in (400, 401, 403, 404, 405, 429, 500, 503):
        app.error_handler[status] = _error_page
    if authenticator is not None and authenticator.enabled:
        app.add_hook("before_request", functools.partial(_authenticate, authenticator))
    return metrics.counting(app)


def _view(handler: Handler, view: str, rates: model.RateHistory) -> Callable[..., str]:
    """A page: views/VIEW.tpl rendered from the handler's (API) data."""

    def page(**kwargs: Any) -> str:
        return render(view, title=view.capitalize(), rates=rates, **handler(**kwargs))

    return page


def _static(path: str) -> Any:
    result = bottle.static_file(path, root=STATIC)
    result.set_header("Cache-Control", "max-age=3600")
    return result


def _metrics(metrics: UiMetrics) -> bytes:
    body, bottle.response.content_type = metrics.exposition(bottle.request.get_header("Accept", ""))
    return body


def _authenticate(authenticator: Authenticator) -> None:
    try:
        allowed = authenticator.allows(bottle.request.environ)
    except LoginRefused as exc:
        raise bottle.HTTPError(exc.status, str(exc), **{"Retry-After": str(exc.retry_after_s)}) from None
    if not allowed:
        raise bottle.HTTPError(
            401, "authentication required", **{"WWW-Authenticate": 'Basic realm="AMOSKYS", charset="UTF-8"'}
        )

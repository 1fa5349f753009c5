"""The UI's Prometheus metrics (`amoskys_ui_*`), in a registry of their own, served at /metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder

__all__ = ["UiMetrics"]

HUB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
StartResponse = Callable[..., Any]


class UiMetrics:
    """Answers by status, logins that failed or were refused, and the hub calls behind the pages."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "amoskys_ui_requests", "HTTP answers from the app, by status code", ["status"], registry=r
        )
        self.login_failures = Counter("amoskys_ui_login_failures", "Password checks that failed", registry=r)
        self.login_refused = Counter(
            "amoskys_ui_login_refused",
            "Password checks refused before scrypt: rate_limited (429, the address's allowance is used) or busy (503)",
            ["reason"],
            registry=r,
        )
        self.hub_seconds = Histogram(
            "amoskys_ui_hub_call_seconds", "Hub calls, by call", ["call"], buckets=HUB_BUCKETS, registry=r
        )
        self.hub_errors = Counter(
            "amoskys_ui_hub_call_errors", "Hub calls that failed, by call and gRPC status", ["call", "code"], registry=r
        )

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry and its content type, in the format the scraper's Accept header asks for
        (Prometheus' text format by default, OpenMetrics on request)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def counting(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]) -> Any:
        """`app` as a WSGI app whose every answer is counted by status code."""

        def counted(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                self.requests.labels(status.split(" ", 1)[0]).inc()
                return start_response(status, headers, exc_info)

            return app(environ, start)

        return counted

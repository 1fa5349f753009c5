"""Charts drawn on the server as small SVG documents (numbers only; no script, no inline style)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

__all__ = ["line_chart", "sparkline"]


def _points(values: Sequence[float], width: float, height: float, pad: float, top_pad: float | None = None) -> str:
    top = max(values) or 1.0
    head = pad if top_pad is None else top_pad
    step = (width - 2 * pad) / max(len(values) - 1, 1)
    return " ".join(
        f"{pad + i * step:.0f},{height - pad - (v / top) * (height - pad - head):.1f}" for i, v in enumerate(values)
    )


def sparkline(values: Sequence[float], label: str, width: int = 120, height: int = 24) -> str:
    """A tiny trend line; an empty (dashed baseline) chart when there are fewer than two values."""
    head = (
        f'<svg class="spark" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
    )
    if len(values) < 2:
        line = f'<line x1="1" y1="{height - 2}" x2="{width - 1}" y2="{height - 2}" class="empty"/>'
        return f"{head}{line}</svg>"
    points = _points(values, width, height, 2)
    area = f'<polygon class="area" points="2,{height - 2} {points} {width - 2},{height - 2}"/>'
    return f'{head}{area}<polyline points="{points}"/></svg>'


def line_chart(values: Sequence[float], label: str, unit: str, width: int = 600, height: int = 120) -> str:
    """A line chart with its maximum and latest value written on it."""
    head = (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
    )
    frame = f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" class="frame"/>'
    if len(values) < 2:
        text = f'<text x="8" y="{height // 2}">collecting samples…</text>'
        return f"{head}{frame}{text}</svg>"
    top = max(values)
    legend = f'<text x="8" y="16">max {top:,.0f} {escape(unit)} · now {values[-1]:,.0f} {escape(unit)}</text>'
    line = f'<polyline points="{_points(values, width, height, 6, top_pad=26)}"/>'
    return f"{head}{frame}{line}{legend}</svg>"

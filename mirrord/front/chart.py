"""A small stacked bar chart as inline SVG, rendered by the server.

No script, no external asset, no font to fetch: the status page must work
without JavaScript and under a ``default-src 'none'`` policy. Every text
that reaches the SVG is escaped by the caller's rules here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

CACHE_COLOUR = "#2e7d32"
UPSTREAM_COLOUR = "#1565c0"
WIDTH, HEIGHT = 600, 140
_TOP, _BOTTOM, _LEFT = 18, 20, 4


def human_bytes(value: float) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def bars(
    stacks: Sequence[tuple[float, float]],
    *,
    label: str,
    left: str,
    right: str,
) -> str:
    """One bar per (cache bytes, upstream bytes), cache at the bottom.
    ``label`` names the chart for screen readers; ``left`` and ``right``
    label the time axis (oldest, newest)."""
    peak = max((c + u for c, u in stacks), default=0.0)
    plot = HEIGHT - _TOP - _BOTTOM
    step = (WIDTH - _LEFT) / max(1, len(stacks))
    gap = 1 if step > 3 else 0
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'aria-label="{escape(label)}">',
        f"<title>{escape(label)}</title>",
        f'<line x1="{_LEFT}" y1="{HEIGHT - _BOTTOM}" x2="{WIDTH}" y2="{HEIGHT - _BOTTOM}" '
        'stroke="#999" stroke-width="1"/>',
    ]
    for index, (cache, upstream) in enumerate(stacks):
        x = _LEFT + index * step
        base = HEIGHT - _BOTTOM
        for value, colour in ((cache, CACHE_COLOUR), (upstream, UPSTREAM_COLOUR)):
            if value <= 0 or peak <= 0:
                continue
            height = max(1.0, plot * value / peak)
            base -= height
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{max(1.0, step - gap):.1f}" '
                f'height="{height:.1f}" fill="{colour}"/>'
            )
    text = 'font-family="sans-serif" font-size="11" fill="#555"'
    parts.append(f'<text x="{_LEFT}" y="12" {text}>{escape(human_bytes(peak))}</text>')
    parts.append(f'<text x="{_LEFT}" y="{HEIGHT - 5}" {text}>{escape(left)}</text>')
    parts.append(
        f'<text x="{WIDTH}" y="{HEIGHT - 5}" text-anchor="end" {text}>{escape(right)}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)
